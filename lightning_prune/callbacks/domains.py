"""Sheared-LLaMA's dynamic batch loading: every few steps, each domain's validation loss against its reference moves
the sampling weights of a :class:`~lightning_prune.data.domains.MixedTextDataModule` toward the domains that lag."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

from lightning_prune.errors import PruningError
from lightning_prune.language import perplexity


class DynamicBatchLoading(Callback):
    """Every ``every`` optimizer steps, measure each domain's loss on ``windows`` of its validation windows and update
    the data module's weights (``softmax(log w + η·max(ℓ − ℓ_ref, 0))``, smoothed; see
    :class:`~lightning_prune.data.domains.DomainWeights`).

    Args:
        every: optimizer steps between updates (the paper: 50).
        reference: each domain's reference loss; ``None``: the losses at the start of fit (for pruning: recover
            every domain to where the dense model was).
        windows: validation windows per domain per measurement.
        model_attribute: the LightningModule attribute holding the Hugging Face model (``""``: the module itself).

    Logs ``domains/weight_<name>`` and ``domains/loss_<name>`` at every update; ``history`` keeps them.

    Raises:
        PruningError: bad arguments (at construction); in ``setup``, a data module without domains, or a
            ``reference`` that does not name exactly its domains.

    Example::

        data = lightning_prune.MixedTextDataModule()   # pydoc prose and stdlib docstrings
        Trainer(callbacks=[DynamicBatchLoading(every=50), ShearedPruning(target, mask_steps=400)]).fit(model, data)
    """

    def __init__(
        self,
        every: int = 50,
        reference: Mapping[str, float] | None = None,
        windows: int = 8,
        model_attribute: str = "model",
    ) -> None:
        for name, value in (("every", every), ("windows", windows)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise PruningError(f"`{name}` must be a positive integer, got {value!r}.")
        self.every, self.windows, self.model_attribute = every, windows, model_attribute
        self.reference = dict(reference) if reference is not None else None
        self.history: list[dict[str, Any]] = []
        self.last_step = -1

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(every=self.every)

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        data = trainer.datamodule
        if data is None or not hasattr(data, "weights") or not hasattr(data, "domain_windows"):
            raise PruningError(
                f"DynamicBatchLoading needs a MixedTextDataModule (data with domains), got {type(data).__name__}: "
                "pass `datamodule=lightning_prune.MixedTextDataModule(...)` to fit."
            )
        if self.reference is not None and set(self.reference) != set(data.weights.names):
            raise PruningError(
                f"`reference` names {sorted(self.reference)}, the data module's domains are {data.weights.names}: "
                "give one reference loss per domain."
            )

    def losses(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, float]:
        model = getattr(pl_module, self.model_attribute) if self.model_attribute else pl_module
        windows = trainer.datamodule.domain_windows("val")
        return {
            name: math.log(perplexity(model, w[: self.windows].to(pl_module.device))) for name, w in windows.items()
        }

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.reference is None:
            self.reference = self.losses(trainer, pl_module)
        if self.history:
            trainer.datamodule.weights.load(self.history[-1]["weights"])

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if step == 0 or step % self.every or step == self.last_step:
            return
        self.last_step = step
        losses = self.losses(trainer, pl_module)
        weights = trainer.datamodule.weights.update(losses, self.reference)
        self.history.append({"step": step, "losses": losses, "weights": weights})
        for name in weights:
            pl_module.log(f"domains/weight_{name}", weights[name], on_step=True, on_epoch=False)
            pl_module.log(f"domains/loss_{name}", losses[name], on_step=True, on_epoch=False)
        shown = ", ".join(f"{name} {weights[name]:.3f}" for name in weights)
        rank_zero_info(f"DynamicBatchLoading: step {step} weights {shown}")

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"reference": self.reference, "history": self.history, "last_step": self.last_step}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.reference = state_dict.get("reference")
        self.history = list(state_dict.get("history", []))
        self.last_step = state_dict.get("last_step", -1)
