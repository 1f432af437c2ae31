"""What pruning under several processes needs: every rank makes the same cut (from the same statistics and the
same ``round_to``), and DDP wraps the new shapes."""

from __future__ import annotations

import gc
import hashlib
import json
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.apply_func import apply_to_collection
from torch import Tensor

from lightning_prune.errors import PruningError
from lightning_prune.selection import AUTO
from lightning_prune.statistics import Statistics, reduce_statistics
from lightning_prune.widths import round_to_for

UNSUPPORTED_STRATEGIES = ("FSDPStrategy", "DeepSpeedStrategy", "ModelParallelStrategy")


def check_strategy(trainer: pl.Trainer, target: str = "channels") -> None:
    if target == "latency" and trainer.world_size > 1:
        raise PruningError(
            f"`target='latency'` under {trainer.world_size} processes: each rank would time its own device and "
            "could cut a different model. Prune to latency in one process (e.g. `lightning_prune.prune(..., "
            "target='latency')` before training, then fine-tune under DDP), or use `target='macs'`."
        )
    strategy = type(trainer.strategy).__name__
    if strategy in UNSUPPORTED_STRATEGIES:
        raise PruningError(
            f"StructuredPruning does not support `strategy` {strategy} for a scheduled step: the cut needs "
            "every parameter whole on every rank, and a sharded rank holds only its slice. Prune once before "
            "the strategy shards the model with `lightning_prune.PruneBeforeSharding` (the one-shot path), or "
            "use strategy='ddp' (or 'ddp_spawn') for a schedule."
        )


def summed_over_ranks(trainer: pl.Trainer, statistics: Statistics, device: torch.device) -> Statistics:
    """Gradient statistics summed over all ranks (unchanged in one process).

    Calibration batches themselves (``{"batches": [...]}``, what the depth methods score blocks on) are not
    summed but gathered: every rank gets the batches of all ranks, in rank order, so each makes the choice one
    process would make on all of them (and the same choice as every other rank).
    """
    if trainer.world_size == 1:
        return statistics
    if isinstance(statistics, dict) and isinstance(statistics.get("batches"), list):  # not a count of batches
        return {**statistics, "batches": gathered_batches(trainer, statistics["batches"], device)}

    def reduce(tensor: Tensor) -> Tensor:
        return trainer.strategy.reduce(tensor.to(device), reduce_op="sum").cpu()

    return reduce_statistics(statistics, reduce)


def gathered_batches(trainer: pl.Trainer, batches: list[Any], device: torch.device) -> list[Any]:
    """Each of ``batches`` with its tensors concatenated over the ranks along the batch dimension (rank order);
    the ranks must hold as many batches of the same shapes (a distributed sampler's are)."""
    count = torch.tensor([len(batches)], device=device)
    counts = trainer.strategy.all_gather(count).reshape(-1).tolist()
    if len(set(counts)) != 1:
        raise PruningError(
            f"ranks hold different numbers of calibration batches ({counts}): `calibration_batches` needs as "
            "many training batches on every rank."
        )

    def gather(tensor: Tensor) -> Tensor:
        shape = torch.tensor(tensor.shape, device=device)
        shapes = trainer.strategy.all_gather(shape).reshape(trainer.world_size, -1)
        if not bool((shapes == shapes[0]).all()):
            raise PruningError(
                f"ranks hold calibration batches of different shapes ({shapes.tolist()}): use a training loader "
                "whose batches have one shape on every rank (drop_last=True, windows of one length)."
            )
        gathered = trainer.strategy.all_gather(tensor.to(device))
        return gathered.reshape(-1, *tensor.shape[1:]).to(tensor.device)

    return [apply_to_collection(batch, Tensor, gather) for batch in batches]


def agree_on_round_to(trainer: pl.Trainer, method: Any, pl_module: pl.LightningModule, example: Any) -> None:
    """Resolve a method's ``round_to="auto"`` once, measured on rank zero for the model as it runs there and
    broadcast, so that every rank rounds its cut alike (ranks timing the width sweep at once could disagree)."""
    selection = getattr(method, "selection", None)
    if selection is None or selection.round_to != AUTO:
        return
    chosen = round_to_for(pl_module, example) if trainer.is_global_zero else 0
    method.selection = replace(selection, round_to=int(trainer.strategy.broadcast(chosen, src=0)))


def check_same_cut(trainer: pl.Trainer, record: Mapping[str, Any]) -> None:
    """Under several processes, fail loudly unless every rank cut exactly the same channels."""
    if trainer.world_size == 1:
        return
    digest = hashlib.sha256(json.dumps(record, sort_keys=True).encode()).digest()[:7]
    local = torch.tensor([int.from_bytes(digest, "big")], dtype=torch.long, device=trainer.strategy.root_device)
    gathered = trainer.strategy.all_gather(local).reshape(-1)
    if not bool((gathered == gathered[0]).all()):
        raise PruningError(
            f"ranks made different cuts (record digests {gathered.tolist()}): their scores differ. With gradient "
            "criteria statistics are all-reduced; check that every rank holds the same weights."
        )


def rewrap_distributed(trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
    """Wrap the pruned module in a new DistributedDataParallel.

    The old wrapper's buckets have the old shapes, and its reducer keeps the parameters' gradient
    accumulators alive, which remember the old shapes too: it must be gone before the next backward.
    """
    from torch.nn.parallel import DistributedDataParallel

    strategy = trainer.strategy
    old = getattr(strategy, "model", None)
    if not isinstance(old, DistributedDataParallel):
        return
    old._remove_autograd_hooks()
    del old.reducer
    strategy.model = pl_module
    del old
    gc.collect()
    strategy.configure_ddp()
