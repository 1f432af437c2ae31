"""Sheared-LLaMA inside ``Trainer.fit``: a mask phase with the Lagrangian, the cut to the target shape, then
continued training of the smaller model, in one run that checkpoints and resumes anywhere."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from typing_extensions import override

from lightning_prune.callbacks.checkpoint import CHECKPOINT_KEY, add_to_applied, applied_record
from lightning_prune.callbacks.distributed import check_strategy
from lightning_prune.cuts import Cut, Drop, Step
from lightning_prune.errors import PruningError
from lightning_prune.methods.shear_masks import DAMPING, ShearTarget, target_shape
from lightning_prune.methods.sheared import Shearing
from lightning_prune.record import new_record


def _positive(name: str, value: object, zero: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0 or (value == 0 and not zero):
        raise PruningError(f"`{name}` must be a {'non-negative' if zero else 'positive'} number, got {value!r}.")


def prefixed(step: Step, prefix: str) -> Step:
    """``step`` with every tensor and module path under ``prefix`` (the Hugging Face model inside a module)."""
    if not prefix:
        return step
    cuts = [Cut(f"{prefix}.{c.tensor}", c.dim, c.size, c.keep, c.groups) for c in step.cuts]
    return Step(cuts, [Drop(f"{prefix}.{d.module}", d.size, d.keep) for d in step.drops], step.rewrites)


class ShearedPruning(Callback):
    """Learn hard-concrete masks that reach ``target`` for ``mask_steps`` optimizer steps, cut the model to it, and
    let training continue on the smaller model (Sheared-LLaMA's pruning phase, then continued pre-training).

    The gates' ``log α`` train in the callback's own AdamW and the Lagrange multipliers by plain gradient ascent
    (each moves by ``multiplier_lr`` times its gap, so it settles where the gap closes): the user's optimizer and
    its learning-rate schedule stay as they are (a schedule refuses an optimizer that grew parameter groups).
    In ``on_before_optimizer_step`` — once per optimizer step
    however many batches are accumulated — the gates' gradients from the training loss are unscaled (mixed
    precision), the Lagrangian is back-propagated, and the gates step with the model; ``training_step`` stays the
    user's own. Validation during the phase sees deterministic gates with exactly the
    target counts: what the cut model will compute. At the end the gates fold into the weights, the engine cuts
    the model (recorded like any pruning step, so checkpoints restore the shape, the user's optimizer state is
    sliced alike), and the gates' optimizer is gone.

    Args:
        target: the shape to reach: a dict of ``hidden_size``, ``num_attention_heads``, ``num_key_value_heads``,
            ``intermediate_size``, ``num_hidden_layers`` (any subset) or a Hugging Face config.
        mask_steps: optimizer steps of the mask phase; the cut follows the last one.
        warmup: steps over which the constrained counts move linearly to the target (default ``mask_steps // 2``).
        gate_lr: learning rate of the gates' ``log α``.
        multiplier_lr: rate of the Lagrange multipliers' plain gradient ascent (``λ += multiplier_lr · gap``).
        droprate: the gates' initial drop rate (the paper: 0.5).
        damping: the quadratic multiplier's initial value: a pull proportional to the gap that keeps the expected
            counts from overshooting the target.
        model_attribute: the attribute of the LightningModule holding the Hugging Face model (``"model"`` for
            :class:`~lightning_prune.CausalLM`); ``""`` when the module itself is one.

    Logs every step of the phase: ``shearing/<field>`` (expected counts), ``shearing/params`` (expected parameters)
    and ``shearing/lagrangian``; ``history`` keeps the expected counts per step.

    Raises:
        PruningError: bad arguments (at construction); in ``setup``, a target the model cannot reach (larger, or
            refused by its family or its query/key-value ratio), a module without a Hugging Face model, or more
            than one process.

    Example::

        shearing = ShearedPruning({"hidden_size": 96, "intermediate_size": 256}, mask_steps=200)
        Trainer(max_steps=1000, callbacks=[shearing]).fit(lightning_prune.CausalLM(), datamodule)
    """

    def __init__(
        self,
        target: Any,
        mask_steps: int,
        warmup: int | None = None,
        gate_lr: float = 0.05,
        multiplier_lr: float = 1.0,
        droprate: float = 0.5,
        damping: float = DAMPING,
        model_attribute: str = "model",
    ) -> None:
        self.target = ShearTarget.from_any(target)
        if not self.target.to_dict():
            raise PruningError(
                "`target` names no field: give at least one of " + ", ".join(ShearTarget.__annotations__)
            )
        if isinstance(mask_steps, bool) or not isinstance(mask_steps, int) or mask_steps < 1:
            raise PruningError(f"`mask_steps` must be a positive integer, got {mask_steps!r}.")
        warmup = mask_steps // 2 if warmup is None else warmup
        if isinstance(warmup, bool) or not isinstance(warmup, int) or not 0 <= warmup <= mask_steps:
            raise PruningError(f"`warmup` must be an integer in [0, `mask_steps`={mask_steps}], got {warmup!r}.")
        _positive("gate_lr", gate_lr)
        _positive("multiplier_lr", multiplier_lr)
        self.mask_steps, self.warmup, self.gate_lr, self.multiplier_lr = mask_steps, warmup, gate_lr, multiplier_lr
        self.droprate, self.damping, self.model_attribute = droprate, damping, model_attribute
        self.shearing: Shearing | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.start: int | None = None
        self.done: dict[str, Any] = {}
        self.history: list[dict[str, float]] = []
        self._saved: dict[str, Any] = {}

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(target=self.target.to_dict(), mask_steps=self.mask_steps)

    def language_model(self, pl_module: pl.LightningModule) -> nn.Module:
        model = getattr(pl_module, self.model_attribute) if self.model_attribute else pl_module
        if getattr(model, "config", None) is None:
            where = f"`{type(pl_module).__name__}.{self.model_attribute}`" if self.model_attribute else "the module"
            raise PruningError(
                f"{where} is not a Hugging Face model (no `config`): set `model_attribute` to the attribute holding "
                "it, or '' when the LightningModule is one."
            )
        return model

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        check_strategy(trainer)
        if trainer.world_size > 1:
            raise PruningError(
                f"ShearedPruning runs in one process; the trainer has {trainer.world_size}. The gates live outside "
                "the DistributedDataParallel module and their gradients would differ per rank."
            )
        model = self.language_model(pl_module)
        if not self.done:
            target_shape(model.config, self.target)  # refuse an unreachable target before training

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.done or self.shearing is not None:
            return
        self.shearing = Shearing(
            self.language_model(pl_module),
            self.target,
            warmup=self.warmup,
            droprate=self.droprate,
            damping=self.damping,
        )
        with torch.no_grad():
            for key, value in self._saved.get("gates", {}).items():
                self.shearing.log_alpha[key].copy_(value)
            for key, value in self._saved.get("multipliers", {}).items():
                self.shearing.lagrangian.multipliers[key].copy_(value)
        self.shearing.lagrangian.start = dict(self._saved.get("start_counts") or self.shearing.lagrangian.start)
        self.start = self._saved.get("start", trainer.global_step)
        self.shearing.attach()
        self.optimizer = torch.optim.AdamW(self.shearing.parameters(), lr=self.gate_lr, weight_decay=0.0)
        if "optimizer" in self._saved:
            self.optimizer.load_state_dict(self._saved["optimizer"])

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if self.shearing is None or self.done:
            return
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        gates = [p for p in self.shearing.parameters() if p.grad is not None]
        if scaler is not None:  # the model's gradients are unscaled by now, the gates' are not
            for parameter in gates:
                parameter.grad.div_(scaler.get_scale())
        step = trainer.global_step - self.start
        expected = self.shearing.expected()
        lagrangian = self.shearing.lagrangian(expected, step)
        lagrangian.backward()
        if all(torch.isfinite(p.grad).all() for p in gates):  # else mixed precision skips this step
            self.optimizer.step()
            self.shearing.lagrangian.ascend(self.multiplier_lr)
        self.optimizer.zero_grad(set_to_none=True)
        self.shearing.lagrangian.multipliers.zero_grad(set_to_none=True)
        values = {name: float(value.detach()) for name, value in expected.items()}
        self.history.append({"step": step, **values})
        for name, value in values.items():
            pl_module.log(f"shearing/{name}", value, on_step=True, on_epoch=False)
        pl_module.log("shearing/lagrangian", float(lagrangian.detach()), on_step=True, on_epoch=False)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.shearing is not None and not self.done and trainer.global_step - self.start >= self.mask_steps:
            self._cut(trainer, pl_module)

    def _cut(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        shearing = self.shearing
        result = shearing.cut(trainer.optimizers)
        path = next(name for name, module in pl_module.named_modules() if module is shearing.model)
        add_to_applied(pl_module, new_record([prefixed(result.step, path)]))
        self.done = {"step": trainer.global_step, "params_before": result.params_before, **result.shape}
        self.done["params_after"] = result.params_after
        self.shearing = self.optimizer = None
        shape = ", ".join(f"{k}={v}" for k, v in result.shape.items())
        rank_zero_info(
            f"ShearedPruning: cut at step {trainer.global_step} to {shape}; params {result.params_before:,} -> "
            f"{result.params_after:,} ({result.params_after / result.params_before:.1%})"
        )

    # --- checkpoints -------------------------------------------------------------------------
    @override
    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        checkpoint[CHECKPOINT_KEY] = {"record": applied_record(pl_module)}

    @override
    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"done": dict(self.done), "history": [dict(h) for h in self.history]}
        if self.shearing is not None:
            state["start"] = self.start
            state["start_counts"] = dict(self.shearing.lagrangian.start)
            state["gates"] = {k: v.detach().cpu().clone() for k, v in self.shearing.log_alpha.items()}
            state["multipliers"] = {
                k: v.detach().cpu().clone() for k, v in self.shearing.lagrangian.multipliers.items()
            }
            state["optimizer"] = self.optimizer.state_dict()
        return state

    @override
    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        self.done = dict(state_dict.get("done", {}))
        self.history = [dict(h) for h in state_dict.get("history", [])]
        self._saved = {
            k: state_dict[k] for k in ("start", "start_counts", "gates", "multipliers", "optimizer") if k in state_dict
        }
