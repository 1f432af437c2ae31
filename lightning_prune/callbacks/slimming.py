"""Network Slimming (Liu et al. 2017): an L1 penalty on BatchNorm scales drives unneeded channels to zero."""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from lightning_prune.errors import PruningError


class NetworkSlimming(Callback):
    r"""Add ``penalty · sign(γ)`` to the gradient of every selected BatchNorm scale γ, once per optimizer step.

    This is the subgradient of ``penalty · Σ|γ|``: channels whose scale the task does not defend
    drift to zero, and ``StructuredPruning(importance="bn_scale")`` then removes them. The penalty is
    added in ``on_before_optimizer_step``: after mixed-precision gradients are unscaled, before
    gradient clipping, and once per optimizer step however many batches are accumulated.

    The paper's values: ``penalty=1e-4`` for VGG-like networks, ``1e-5`` for ResNet-like ones (their
    residual paths make scales less decisive); on small data more (``1e-3``) speeds things up.

    Args:
        penalty: λ, the L1 coefficient (≥ 0).
        include: glob patterns of BatchNorm module names to penalise (all by default).
        exclude: glob patterns of BatchNorm module names to leave alone.
        start_epoch: first epoch with a penalty.
        warmup_epochs: the penalty ramps up linearly over this many epochs from ``start_epoch``.
        stop_epoch: first epoch without penalty (``None``: never stops), or ``"after_pruning"`` to
            stop once every ``StructuredPruning`` of the trainer has made its last step.
        threshold: the γ magnitude below which a channel counts as "dead" in the logs.

    Logs every epoch: ``slimming/gamma_mean`` (mean |γ|), ``slimming/gamma_below`` (fraction of
    |γ| < ``threshold``) and ``slimming/penalty``.

    Raises:
        PruningError: for a negative penalty or bad epochs (at construction), and in ``setup`` if no
            BatchNorm layer matches ``include``/``exclude``.

    Example::

        trainer = Trainer(callbacks=[NetworkSlimming(penalty=1e-4), StructuredPruning(0.5, "bn_scale")])
    """

    def __init__(
        self,
        penalty: float = 1e-4,
        include: Sequence[str] = ("*",),
        exclude: Sequence[str] = (),
        start_epoch: int = 0,
        warmup_epochs: int = 0,
        stop_epoch: int | str | None = None,
        threshold: float = 1e-2,
    ) -> None:
        if isinstance(penalty, bool) or not isinstance(penalty, int | float) or penalty < 0:
            raise PruningError(f"`penalty` must be a non-negative number, got {penalty!r}.")
        for name, value in (("start_epoch", start_epoch), ("warmup_epochs", warmup_epochs)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise PruningError(f"`{name}` must be a non-negative integer, got {value!r}.")
        valid_stop = isinstance(stop_epoch, int) and not isinstance(stop_epoch, bool) and stop_epoch > start_epoch
        if stop_epoch is not None and stop_epoch != "after_pruning" and not valid_stop:
            raise PruningError(
                f"`stop_epoch` must be an epoch after `start_epoch` ({start_epoch}), 'after_pruning' or None; "
                f"got {stop_epoch!r}."
            )
        if isinstance(include, str) or isinstance(exclude, str):
            raise PruningError("`include` and `exclude` are lists of glob patterns, e.g. ['features.*'].")
        self.penalty = float(penalty)
        self.include, self.exclude = list(include), list(exclude)
        self.start_epoch, self.warmup_epochs = start_epoch, warmup_epochs
        self.stop_epoch = stop_epoch
        self.threshold = threshold
        self._layers: list[tuple[str, torch.nn.modules.batchnorm._BatchNorm]] = []
        self._stop: int | None = None

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(penalty=self.penalty, include=self.include, exclude=self.exclude)

    def penalty_at(self, epoch: int) -> float:
        if epoch < self.start_epoch or (self._stop is not None and epoch >= self._stop):
            return 0.0
        if self.warmup_epochs:
            return self.penalty * min(1.0, (epoch - self.start_epoch + 1) / self.warmup_epochs)
        return self.penalty

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        norms = [
            (name, module)
            for name, module in pl_module.named_modules()
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and module.affine
        ]
        self._layers = [
            (name, module)
            for name, module in norms
            if any(fnmatch.fnmatchcase(name, p) for p in self.include)
            and not any(fnmatch.fnmatchcase(name, p) for p in self.exclude)
        ]
        if not self._layers:
            found = ", ".join(name for name, _ in norms[:6]) or "none"
            raise PruningError(
                f"NetworkSlimming penalises BatchNorm scales, but no affine BatchNorm layer of "
                f"{type(pl_module).__name__} matches `include`={self.include} / `exclude`={self.exclude} "
                f"(BatchNorm layers found: {found}). Network Slimming needs a model with BatchNorm."
            )
        self._stop = self.stop_epoch if isinstance(self.stop_epoch, int) else None
        if self.stop_epoch == "after_pruning":
            from lightning_prune.callbacks.pruning import StructuredPruning

            ends = [max(cb.steps) + 1 for cb in trainer.callbacks if isinstance(cb, StructuredPruning)]
            if not ends:
                raise PruningError("`stop_epoch='after_pruning'` needs a StructuredPruning callback in the Trainer.")
            self._stop = max(ends)

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        penalty = self.penalty_at(trainer.current_epoch)
        if penalty == 0.0:
            return
        owned = {id(p) for group in optimizer.param_groups for p in group["params"]}
        with torch.no_grad():
            for _, module in self._layers:
                weight = module.weight
                if weight.grad is not None and id(weight) in owned:
                    weight.grad.add_(torch.sign(weight), alpha=penalty)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        gammas = torch.cat([module.weight.detach().abs().flatten() for _, module in self._layers])
        pl_module.log_dict(
            {
                "slimming/gamma_mean": gammas.mean().float(),
                "slimming/gamma_below": (gammas < self.threshold).float().mean(),
                "slimming/penalty": torch.tensor(self.penalty_at(trainer.current_epoch)),
            },
            on_epoch=True,
        )

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"penalty": self.penalty}
