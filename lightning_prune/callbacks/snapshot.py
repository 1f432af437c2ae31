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
    """

    def __init__(self, epoch: int) -> None:
        self.epoch, self.model = epoch, None

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch == self.epoch:
            self.model = copy.deepcopy(pl_module)
