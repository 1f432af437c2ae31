"""When a pruning step adds parameters (FLAP's compensation gives bias-free projections a bias), the optimizers
are built again by the module's own ``configure_optimizers``, so that the new parameters train and the
optimizer state has the layout a resumed run (which builds its optimizers on the restored module) expects."""

from __future__ import annotations

import lightning.pytorch as pl
from torch import nn


def parameter_ids(module: nn.Module) -> set[int]:
    return {id(p) for p in module.parameters()}


def rebuild_optimizers(trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
    """``configure_optimizers`` again, keeping every old parameter's state, the learning rates and scheduler steps.

    The new parameters start with empty state (as at the first step of training).
    """
    old_optimizers, old_schedulers = list(trainer.optimizers), list(trainer.lr_scheduler_configs)
    trainer.strategy.setup_optimizers(trainer)
    for old, new in zip(old_optimizers, trainer.optimizers, strict=False):
        for parameter, state in old.state.items():
            new.state[parameter] = state
        if len(old.param_groups) == len(new.param_groups):
            for old_group, new_group in zip(old.param_groups, new.param_groups, strict=True):
                new_group["lr"] = old_group["lr"]
                if "initial_lr" in old_group:
                    new_group["initial_lr"] = old_group["initial_lr"]
    for old, new in zip(old_schedulers, trainer.lr_scheduler_configs, strict=False):
        new.scheduler.load_state_dict(old.scheduler.state_dict())
