"""A copy of the model as it was right before the first pruning step: the dense baseline a run compares with."""

from __future__ import annotations

import copy

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from typing_extensions import override


class KeepDense(Callback):
    """Keeps a copy of the model at the end of ``epoch`` (list it before the pruning callback, which cuts then).

    Args:
        epoch: the epoch of the first pruning step.
        at_start: copy at the start of ``epoch`` instead (for steps with ``when="train_epoch_start"``).
        at_setup: copy in ``setup`` instead, before a strategy shards the model (for ``PruneBeforeSharding``).
    """

    def __init__(self, epoch: int, at_start: bool = False, at_setup: bool = False) -> None:
        self.epoch, self.at_start, self.at_setup, self.model = epoch, at_start or at_setup, at_setup, None

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.at_setup and stage == "fit" and self.model is None:
            self.model = copy.deepcopy(pl_module)

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.at_start and not self.at_setup and trainer.current_epoch == self.epoch:
            self.model = copy.deepcopy(pl_module)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.at_start and trainer.current_epoch == self.epoch:
            self.model = copy.deepcopy(pl_module)
