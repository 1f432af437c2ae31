"""lightning-prune: structured pruning that leaves smaller dense models, as PyTorch Lightning callbacks.

The core (everything here except ``lightning_prune.callbacks`` and ``lightning_prune.cli``) is plain
PyTorch: trace → groups, score, select → plan, cut, verify.
"""

from lightning_prune.api import LayerChange, PruningResult, prune
from lightning_prune.errors import PruningError, RecordError, TraceError, VerificationError
from lightning_prune.graph.groups import DependencyGraph, Group, Slot, build_graph
from lightning_prune.importance import ScoringContext, get_criterion, register_criterion, score
from lightning_prune.measure import count_macs, count_params, latency
from lightning_prune.record import check_record, merge_records, restore
from lightning_prune.selection import Plan, select
from lightning_prune.surgery import Cut, apply_cuts, plan_cuts, register_layer, slice_tensor
from lightning_prune.verify import verify_pruned

__version__ = "0.1.0"

__all__ = [
    "Cut",
    "DependencyGraph",
    "Group",
    "LayerChange",
    "Plan",
    "PruningError",
    "PruningResult",
    "RecordError",
    "ScoringContext",
    "Slot",
    "TraceError",
    "VerificationError",
    "apply_cuts",
    "build_graph",
    "check_record",
    "count_macs",
    "count_params",
    "get_criterion",
    "latency",
    "merge_records",
    "plan_cuts",
    "prune",
    "register_criterion",
    "register_layer",
    "restore",
    "score",
    "select",
    "slice_tensor",
    "verify_pruned",
]
