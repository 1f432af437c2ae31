"""Sheared-LLaMA's mask phase as one plain PyTorch loop (:func:`shear`); the Lightning callback
:class:`~lightning_prune.callbacks.ShearedPruning` runs the same phase inside ``Trainer.fit``."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lightning_prune.errors import PruningError
from lightning_prune.methods.llm_pruner import causal_lm_loss
from lightning_prune.methods.shear_masks import DAMPING
from lightning_prune.methods.sheared import Shearing, ShearResult


def shear(
    model: nn.Module,
    target: Any,
    batches: Iterable[Any],
    steps: int,
    *,
    loss_fn: Callable[[nn.Module, Any], Tensor] = causal_lm_loss,
    lr: float = 1e-4,
    gate_lr: float = 0.05,
    multiplier_lr: float = 1.0,
    warmup: int | None = None,
    droprate: float = 0.5,
    damping: float = DAMPING,
    log_every: int = 1,
) -> ShearResult:
    """Sheared-LLaMA's pruning phase in one call: train ``model`` and its gates for ``steps`` on ``batches``
    (cycled) with the Lagrangian, then cut it to ``target`` in place.

    Args:
        model, target, droprate, damping: as in :class:`Shearing`.
        batches: training batches for ``loss_fn(model, batch)`` (default: next-token loss on token-id windows).
        steps: optimizer steps of the mask phase (0: cut by the initial gates).
        lr, gate_lr: AdamW learning rates of the model and the gates' ``log α``.
        multiplier_lr: the multipliers' rate of plain gradient ascent (:meth:`Lagrangian.ascend`).
        warmup: steps over which the constrained counts reach the target (default: ``steps // 2``).
        log_every: every that many steps the expected counts go into ``result.history``.

    Returns:
        A :class:`ShearResult` whose ``history`` holds, every ``log_every`` steps after the step, the expected counts
        and parameters, and the warmed-up target of each constrained count (``target_<field>``).
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise PruningError(f"`steps` must be a non-negative integer, got {steps!r}.")
    shearing = Shearing(
        model, target, warmup=steps // 2 if warmup is None else warmup, droprate=droprate, damping=damping
    )
    history: list[dict[str, float]] = []
    if steps:
        optimizer = torch.optim.AdamW(
            [
                {"params": [p for p in model.parameters() if p.requires_grad], "lr": lr},
                {"params": shearing.parameters(), "lr": gate_lr, "weight_decay": 0.0},
            ]
        )
        shearing.attach()
        was_training = model.training
        model.train()
        try:
            for number, batch in zip(range(steps), itertools.cycle(_listed(batches)), strict=False):
                loss = loss_fn(model, batch) + shearing.penalty(number)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                shearing.lagrangian.ascend(multiplier_lr)
                if number % log_every == 0 or number == steps - 1:
                    expected = {k: float(v.detach()) for k, v in shearing.expected().items()}
                    goals = {
                        f"target_{k}": shearing.lagrangian.target_at(k, number) for k in shearing.lagrangian.target
                    }
                    history.append({"step": number, **expected, **goals})
        finally:
            shearing.detach()
            model.train(was_training)
    result = shearing.cut()
    result.history = history
    return result


def _listed(batches: Iterable[Any]) -> Sequence[Any]:
    listed = list(batches)
    if not listed:
        raise PruningError("`batches` is empty: the mask phase needs training batches.")
    return listed
