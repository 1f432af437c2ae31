"""lightning-prune: structured pruning that leaves smaller dense models, as PyTorch Lightning callbacks.

The core (everything here except the callbacks, data, models, ``cli`` and ``report``) is plain
PyTorch: trace → groups, score, select → plan, cut, verify.
"""

from lightning_prune.api import LayerChange, PruningResult, prune
from lightning_prune.depth import LayerPruningResult, find_blocks, prune_layers
from lightning_prune.errors import PruningError, RecordError, TraceError, VerificationError
from lightning_prune.graph.groups import DependencyGraph, Group, Slot, build_graph
from lightning_prune.importance import ScoringContext, get_criterion, register_criterion, score
from lightning_prune.measure import count_macs, count_params, latency
from lightning_prune.record import check_record, merge_records, restore
from lightning_prune.selection import Plan, select
from lightning_prune.surgery import Cut, Drop, Step, apply_cuts, plan_cuts, register_layer, slice_tensor
from lightning_prune.verify import verify_pruned

__version__ = "0.1.0"

# Lightning-facing names load on first use, so that the engine imports neither Lightning nor Hydra.
_LAZY = {
    "AtomicCheckpointIO": "lightning_prune.callbacks",
    "NetworkSlimming": "lightning_prune.callbacks",
    "StructuredPruning": "lightning_prune.callbacks",
    "load_from_checkpoint": "lightning_prune.callbacks",
    "applied_record": "lightning_prune.callbacks",
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
    "Cifar10DataModule",
    "Cut",
    "DependencyGraph",
    "DigitsDataModule",
    "Drop",
    "Group",
    "ImageClassifier",
    "LayerChange",
    "LayerPruningResult",
    "NetworkSlimming",
    "Plan",
    "PruningError",
    "PruningResult",
    "RecordError",
    "ScoringContext",
    "Slot",
    "Step",
    "StructuredPruning",
    "SyntheticDataModule",
    "TraceError",
    "VerificationError",
    "applied_record",
    "apply_cuts",
    "build_graph",
    "check_record",
    "count_macs",
    "count_params",
    "find_blocks",
    "get_criterion",
    "latency",
    "load_from_checkpoint",
    "merge_records",
    "plan_cuts",
    "prune",
    "prune_layers",
    "register_criterion",
    "register_layer",
    "restore",
    "score",
    "select",
    "slice_tensor",
    "verify_pruned",
]
