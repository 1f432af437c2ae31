"""A copy of the model as it was right before the first pruning step: the dense baseline a run compares with."""

from __future__ import annotations

import copy

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from lightning_prune.callbacks.pruning import StructuredPruning
from lightning_prune.callbacks.sharding import PruneBeforeSharding
from lightning_prune.callbacks.sheared import ShearedPruning


class KeepDense(Callback):
    """Keeps a copy of the model at the end of ``epoch`` (list it before the pruning callback, which cuts then).

    Args:
        epoch: the epoch of the first pruning step; ``None``: copy at the start of fit (list it before
            :class:`~lightning_prune.ShearedPruning`, whose masks attach then).
        at_start: copy at the start of ``epoch`` instead (for steps with ``when="train_epoch_start"``).
        at_setup: copy in ``setup`` instead, before a strategy shards the model (for ``PruneBeforeSharding``).
    """

    def __init__(self, epoch: int | None, at_start: bool = False, at_setup: bool = False) -> None:
        self.epoch, self.at_start, self.at_setup, self.model = epoch, at_start or at_setup, at_setup, None

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.at_setup and stage == "fit" and self.model is None:
            self.model = copy.deepcopy(pl_module)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.epoch is None:
            self.model = copy.deepcopy(pl_module)

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.at_start and not self.at_setup and trainer.current_epoch == self.epoch:
            self.model = copy.deepcopy(pl_module)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.at_start and trainer.current_epoch == self.epoch:
            self.model = copy.deepcopy(pl_module)


def keep_dense(callbacks: list[pl.Callback]) -> KeepDense | None:
    """Insert a :class:`KeepDense` right before the first pruning callback; ``None`` if nothing prunes.

    With :class:`~lightning_prune.StructuredPruning` the copy is taken right before its first step; with
    :class:`~lightning_prune.ShearedPruning` at the start of fit, before its masks attach (the model the mask phase
    starts from; the weights it trains under the masks are only ever used cut).
    """
    prunings = [(i, c) for i, c in enumerate(callbacks) if isinstance(c, StructuredPruning | ShearedPruning)]
    if not prunings:
        return None
    if any(isinstance(c, ShearedPruning) for _, c in prunings):
        keeper = KeepDense(None)
    else:
        start = any(c.when == "train_epoch_start" for _, c in prunings)
        before = any(isinstance(c, PruneBeforeSharding) for _, c in prunings)  # cuts in setup, before sharding
        keeper = KeepDense(min(min(c.steps) for _, c in prunings), at_start=start, at_setup=before)
    callbacks.insert(prunings[0][0], keeper)
    return keeper
