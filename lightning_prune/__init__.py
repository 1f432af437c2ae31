"""lightning-prune: structured pruning that leaves smaller dense models, as PyTorch Lightning callbacks.

The core (everything here except the callbacks, data, models, ``cli`` and ``report``) is plain
PyTorch: trace → groups, score, select → plan, cut, verify. ``docs/ARCHITECTURE.md`` maps the folders.
"""

from lightning_prune.api import LayerChange, PruningResult, prune
from lightning_prune.budget import DenseSize
from lightning_prune.cuts import Cut, Drop, Step
from lightning_prune.depth import LayerPruningResult, angular_distances, find_blocks, prune_layers
from lightning_prune.errors import PruningError, RecordError, TraceError, VerificationError
from lightning_prune.export import ExportCheck, OnnxModule, export_onnx, export_pair, export_program
from lightning_prune.fixups import register_layer
from lightning_prune.graph.groups import DependencyGraph, Group, Slot, build_graph
from lightning_prune.graph.module_rules import register_module_rule
from lightning_prune.importance import ScoringContext, get_criterion, register_criterion, score
from lightning_prune.integrations import load_integrations
from lightning_prune.language import generation_speed, perplexity
from lightning_prune.measure import compare_latency, count_macs, count_params, latency
from lightning_prune.memory import MemoryPlan, format_plans, memory_plan
from lightning_prune.methods.depth_methods import drop_angular, drop_deepest, laco
from lightning_prune.methods.experts import ExpertPruningResult, prune_experts
from lightning_prune.methods.flap import flap, wanda_sp
from lightning_prune.methods.llm_pruner import llm_pruner
from lightning_prune.methods.recovery import finetune, lora_recover
from lightning_prune.methods.shear_training import shear
from lightning_prune.methods.sheared import Shearing, ShearResult
from lightning_prune.methods.slicegpt import SliceResult, slicegpt
from lightning_prune.planning import plan_cuts
from lightning_prune.record import check_record, merge_records, restore
from lightning_prune.registry import Registry, RegistryError
from lightning_prune.saving import from_pretrained, save_pretrained
from lightning_prune.selection import Plan, SelectionOptions, select
from lightning_prune.slicing import slice_tensor
from lightning_prune.surgery import apply_cuts
from lightning_prune.verify import verify_pruned

__version__ = "0.1.0"

load_integrations()  # each layer family registers its rules and fixups; third-party ones by entry point

# Lightning-facing names load on first use, so that the engine imports neither Lightning nor Hydra.
_LAZY = {
    "AtomicCheckpointIO": "lightning_prune.callbacks",
    "Distillation": "lightning_prune.callbacks",
    "NetworkSlimming": "lightning_prune.callbacks",
    "PrunableModule": "lightning_prune.callbacks",
    "PruneBeforeSharding": "lightning_prune.callbacks",
    "StructuredPruning": "lightning_prune.callbacks",
    "ShearedPruning": "lightning_prune.callbacks",
    "DynamicBatchLoading": "lightning_prune.callbacks",
    "MixedTextDataModule": "lightning_prune.data",
    "load_from_checkpoint": "lightning_prune.callbacks",
    "applied_record": "lightning_prune.callbacks",
    "restore_pruned": "lightning_prune.callbacks",
    "default_language_model": "lightning_prune.models",
    "CausalLM": "lightning_prune.models",
    "CausalLMDataModule": "lightning_prune.data",
    "Cifar10DataModule": "lightning_prune.data",
    "DigitsDataModule": "lightning_prune.data",
    "SyntheticDataModule": "lightning_prune.data",
    "ImageClassifier": "lightning_prune.models",
}


def __getattr__(name: str) -> object:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'lightning_prune' has no attribute {name!r}")


__all__ = [
    "AtomicCheckpointIO",
    "CausalLM",
    "CausalLMDataModule",
    "Cifar10DataModule",
    "Cut",
    "DenseSize",
    "DependencyGraph",
    "DigitsDataModule",
    "Distillation",
    "Drop",
    "DynamicBatchLoading",
    "ExpertPruningResult",
    "ExportCheck",
    "Group",
    "ImageClassifier",
    "LayerChange",
    "LayerPruningResult",
    "MemoryPlan",
    "MixedTextDataModule",
    "NetworkSlimming",
    "OnnxModule",
    "Plan",
    "PrunableModule",
    "PruneBeforeSharding",
    "PruningError",
    "PruningResult",
    "RecordError",
    "Registry",
    "RegistryError",
    "ScoringContext",
    "SelectionOptions",
    "ShearResult",
    "ShearedPruning",
    "Shearing",
    "SliceResult",
    "Slot",
    "Step",
    "StructuredPruning",
    "SyntheticDataModule",
    "TraceError",
    "VerificationError",
    "angular_distances",
    "applied_record",
    "apply_cuts",
    "build_graph",
    "check_record",
    "compare_latency",
    "count_macs",
    "count_params",
    "default_language_model",
    "drop_angular",
    "drop_deepest",
    "export_onnx",
    "export_pair",
    "export_program",
    "find_blocks",
    "finetune",
    "flap",
    "format_plans",
    "from_pretrained",
    "generation_speed",
    "get_criterion",
    "laco",
    "latency",
    "llm_pruner",
    "load_from_checkpoint",
    "lora_recover",
    "memory_plan",
    "merge_records",
    "perplexity",
    "plan_cuts",
    "prune",
    "prune_experts",
    "prune_layers",
    "register_criterion",
    "register_layer",
    "register_module_rule",
    "restore",
    "restore_pruned",
    "save_pretrained",
    "score",
    "select",
    "shear",
    "slice_tensor",
    "slicegpt",
    "verify_pruned",
    "wanda_sp",
]
