"""Gradient statistics for a scheduled step: observed during the pruning epoch's training steps, or computed
on extra calibration batches at the step, and kept across checkpoints."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import lightning.pytorch as pl
from lightning.fabric.utilities.apply_func import move_data_to_device
from torch import Tensor, nn

from lightning_prune.callbacks.distributed import summed_over_ranks
from lightning_prune.errors import PruningError
from lightning_prune.graph.groups import DependencyGraph
from lightning_prune.statistics import GradientStatistics, Statistics, collect_statistics


class StepStatistics:
    """Statistics of the coming step: ``calibration_batches=0`` observes training, ``n`` runs ``n`` extra batches.

    ``graph`` builds the dependency graph of the module as it is now (it changes with every step); ``collect``
    is the criterion's own way to gather statistics on calibration batches (None: activation gradients,
    which training steps can also be observed for).
    """

    def __init__(
        self,
        calibration_batches: int,
        graph: Callable[[pl.LightningModule], DependencyGraph],
        collect: Callable[..., Statistics] | None = None,
        importance: str = "",
    ) -> None:
        if isinstance(calibration_batches, bool) or not isinstance(calibration_batches, int) or calibration_batches < 0:
            raise PruningError(f"`calibration_batches` must be a non-negative integer, got {calibration_batches!r}.")
        if collect is not None and calibration_batches == 0:
            raise PruningError(
                f"`importance={importance!r}` measures its statistics on calibration batches, not by observing "
                "training: set `calibration_batches` (LLM-Pruner uses 10 windows)."
            )
        self.calibration_batches, self.graph, self.collect = calibration_batches, graph, collect or collect_statistics
        self._collector: GradientStatistics | None = None
        self._saved: Statistics | None = None

    @property
    def observes_training(self) -> bool:
        return self.calibration_batches == 0

    def observe(self, pl_module: pl.LightningModule) -> None:
        """Start accumulating from the training steps (once per pruning epoch; resumes saved values)."""
        if self._collector is not None:
            return
        self._collector = GradientStatistics(pl_module, self.graph(pl_module))
        if self._saved is not None:
            self._collector.load(self._saved)
        self._collector.attach()

    def take(self, trainer: pl.Trainer, pl_module: pl.LightningModule, importance: str) -> Statistics:
        """The statistics for the step now due, summed over ranks; the accumulation starts afresh."""
        if self.calibration_batches:
            batches = (move_data_to_device(b, pl_module.device) for b in _take(trainer, self.calibration_batches))
            statistics = self.collect(pl_module, self.graph(pl_module), batches, _training_loss)
        elif self._collector is not None:
            statistics = self._collector.detach()
        elif self._saved is not None:
            statistics = self._saved
        else:
            raise PruningError(
                f"`importance={importance!r}` has no statistics for this step (no training batch was seen "
                "in the pruning epoch); set `calibration_batches` to compute them at the step."
            )
        self._collector, self._saved = None, None
        return summed_over_ranks(trainer, statistics, pl_module.device)

    def state(self) -> Statistics | None:
        return self._collector.state() if self._collector is not None else self._saved

    def load(self, state: Statistics | None) -> None:
        self._saved = state


def _take(trainer: pl.Trainer, count: int) -> Iterator[Any]:
    loader = trainer.train_dataloader
    if loader is None:
        raise PruningError("`calibration_batches` needs the trainer's training dataloader.")
    for index, batch in enumerate(loader):
        if index >= count:
            return
        yield batch


def _training_loss(pl_module: nn.Module, batch: Any) -> Tensor:
    """The module's own training loss, with its logging detached (these passes are not training steps)."""
    trainer, pl_module._trainer = pl_module._trainer, None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            output = pl_module.training_step(batch, 0)
    finally:
        pl_module._trainer = trainer
    return output["loss"] if isinstance(output, Mapping) else output
