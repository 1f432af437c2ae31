"""Lightning callbacks: thin glue that decides *when* the plain-PyTorch engine runs."""

from lightning_prune.callbacks.checkpoint import PrunableModule, applied_record, load_from_checkpoint, restore_pruned
from lightning_prune.callbacks.distillation import Distillation
from lightning_prune.callbacks.domains import DynamicBatchLoading
from lightning_prune.callbacks.io import AtomicCheckpointIO
from lightning_prune.callbacks.pruning import StructuredPruning
from lightning_prune.callbacks.sharding import PruneBeforeSharding
from lightning_prune.callbacks.sheared import ShearedPruning
from lightning_prune.callbacks.slimming import NetworkSlimming

__all__ = [
    "AtomicCheckpointIO",
    "Distillation",
    "DynamicBatchLoading",
    "NetworkSlimming",
    "PrunableModule",
    "PruneBeforeSharding",
    "ShearedPruning",
    "StructuredPruning",
    "applied_record",
    "load_from_checkpoint",
    "restore_pruned",
]
