"""Sheared-LLaMA's pieces that know nothing of a model: the target shape, hard-concrete gates and the Lagrangian.

Hard-concrete gates (Louizos et al. 2018, as in Sheared-LLaMA's code): a learnable ``log α`` per gated element,
temperature ``β = 2/3``, stretch ``(l, r) = (−0.1, 1.1)``. A training sample is
``z = clamp(sigmoid((log u − log(1 − u) + log α) / β)·(r − l) + l, 0, 1)`` with ``u ~ U(0, 1)``; the probability
that a gate is not exactly zero (its expected L0 contribution) is ``sigmoid(log α − β·log(−l / r))``. At the end
the gates become deterministic: the ``count`` elements with the largest ``sigmoid(log α / β · 0.8)`` keep that
value, every other one is zero.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
from torch import Tensor

from lightning_prune.errors import PruningError

LOW, HIGH = -0.1, 1.1
TEMPERATURE = 2.0 / 3.0
SHARPNESS = 0.8  # the reference code's factor on log α / β for the deterministic values
EPSILON = 1e-6
DAMPING = 100.0  # the quadratic multiplier's start: a restoring pull proportional to the gap from the first step


def initial_log_alpha(droprate: float) -> float:
    """``log α`` at which a gate is dropped with probability ``droprate`` before stretching (the paper's init)."""
    return math.log(1 - droprate) - math.log(droprate)


def sample_gates(log_alpha: Tensor) -> Tensor:
    """One hard-concrete sample per element, differentiable in ``log_alpha``."""
    uniform = torch.rand_like(log_alpha).clamp(EPSILON, 1 - EPSILON)
    relaxed = torch.sigmoid((torch.log(uniform) - torch.log1p(-uniform) + log_alpha) / TEMPERATURE)
    return (relaxed * (HIGH - LOW) + LOW).clamp(0, 1)


def expected_gates(log_alpha: Tensor) -> Tensor:
    """The probability of each gate being non-zero: its expected contribution to the count of kept elements."""
    return torch.sigmoid(log_alpha - TEMPERATURE * math.log(-LOW / HIGH))


def deterministic_gates(log_alpha: Tensor, count: int, ranking: Tensor | None = None) -> Tensor:
    """Exactly ``count`` non-zero gates (the largest ``ranking``, by default ``log_alpha``), each holding its score;
    the rest zero."""
    scores = torch.sigmoid(log_alpha.detach() / TEMPERATURE * SHARPNESS)
    gates = torch.zeros_like(scores)
    keep = torch.topk(log_alpha.detach() if ranking is None else ranking, count, sorted=False).indices
    gates[keep] = scores[keep]
    return gates


@dataclass(frozen=True)
class ShearTarget:
    """The architecture to reach, in Hugging Face config names; a field left None keeps the model's value.

    ``num_attention_heads`` and ``num_key_value_heads`` move together: whole key/value head groups go, so the
    ratio of query to key/value heads stays (give either one, or both in the model's ratio).
    """

    hidden_size: int | None = None
    num_attention_heads: int | None = None
    num_key_value_heads: int | None = None
    intermediate_size: int | None = None
    num_hidden_layers: int | None = None

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise PruningError(f"target `{name}` must be a positive integer, got {value!r}.")

    @classmethod
    def from_any(cls, target: Any) -> ShearTarget:
        """From a :class:`ShearTarget`, a dict of some of the fields, or a Hugging Face config (all it has)."""
        if isinstance(target, ShearTarget):
            return target
        names = [f.name for f in fields(cls)]
        if isinstance(target, Mapping):
            unknown = sorted(set(target) - set(names))
            if unknown:
                raise PruningError(
                    f"`target` has unknown field(s) {unknown}; a target names some of {', '.join(names)}."
                )
            return cls(**target)
        if not any(hasattr(target, name) for name in names):
            raise PruningError(
                f"`target` must be a dict or a Hugging Face config with some of {', '.join(names)}; "
                f"got {type(target).__name__}."
            )
        return cls(**{name: getattr(target, name) for name in names if getattr(target, name, None) is not None})

    def to_dict(self) -> dict[str, int]:
        return {name: value for name, value in asdict(self).items() if value is not None}


class Lagrangian:
    """``λ₁(ŝ − t) + λ₂(ŝ − t)²`` per constrained quantity, ``ŝ`` and ``t`` as fractions of the dense count (so one
    learning rate serves quantities of every size); ``t`` moves linearly from ``start`` (default: the dense count)
    to the target over ``warmup`` steps, then held. The multipliers are maximised by plain gradient ascent
    (:meth:`ascend`), so ``λ₁`` moves by the learning rate times the gap and stops where the gap closes; ``λ₂``
    starts at ``damping``, a pull on the gates proportional to the gap that stops them where ``λ₁`` alone (an
    integral of the gap) would carry them past the target.

    :class:`~lightning_prune.methods.sheared.Shearing` starts from the gates' initial expected counts (below the
    dense ones: a gate at ``log α = 0`` is open with probability 0.83): a target starting above them first drives
    the gates up, and the multiplier it builds then carries the counts past the target."""

    def __init__(
        self,
        dense: Mapping[str, int],
        target: Mapping[str, int],
        warmup: int,
        start: Mapping[str, float] | None = None,
        damping: float = DAMPING,
    ) -> None:
        if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
            raise PruningError(f"`warmup` must be a non-negative number of steps, got {warmup!r}.")
        if isinstance(damping, bool) or not isinstance(damping, int | float) or not damping >= 0:
            raise PruningError(f"`damping` must be a non-negative number, got {damping!r}.")
        self.dense, self.target, self.warmup = dict(dense), dict(target), warmup
        self.start = {name: float(start[name]) if start else float(dense[name]) for name in target}
        self.multipliers = torch.nn.ParameterDict(
            {
                f"{name}_{order}": torch.nn.Parameter(torch.tensor(0.0 if order == 1 else float(damping)))
                for name in target
                for order in (1, 2)
            }
        )

    def target_at(self, name: str, step: int) -> float:
        """The count quantity ``name`` should have reached at ``step``."""
        progress = 1.0 if self.warmup == 0 else min(1.0, step / self.warmup)
        return self.start[name] + (self.target[name] - self.start[name]) * progress

    def __call__(self, expected: Mapping[str, Tensor], step: int) -> Tensor:
        total = torch.zeros(())
        for name in self.target:
            gap = (expected[name] - self.target_at(name, step)) / self.dense[name]
            first, second = self.multipliers[f"{name}_1"], self.multipliers[f"{name}_2"]
            total = total + first.to(gap) * gap + second.to(gap) * gap * gap
        return total

    def ascend(self, lr: float) -> None:
        """One step of gradient ascent on the multipliers, ``λ += lr·∂L/∂λ`` (the gap, or its square), then their
        gradients cleared. Not Adam: its normalised step moves ``λ₁`` by about ``lr`` whatever the gap, and its
        momentum carries ``λ₁`` on after the gap closes, so the expected counts overshoot the target."""
        with torch.no_grad():
            for multiplier in self.multipliers.values():
                if multiplier.grad is not None:
                    multiplier.add_(multiplier.grad, alpha=lr)
        self.multipliers.zero_grad(set_to_none=True)


def dense_shape(config: Any) -> dict[str, int]:
    """The shape fields of a Hugging Face decoder config (key/value heads default to the heads)."""
    shape = {name: getattr(config, name, None) for name in ShearTarget.__dataclass_fields__}
    if shape["num_key_value_heads"] is None:
        shape["num_key_value_heads"] = shape["num_attention_heads"]
    missing = [name for name, value in shape.items() if not isinstance(value, int)]
    if missing:
        raise PruningError(f"`model.config` has no integer {', '.join(missing)}: shearing needs a decoder LM config.")
    return shape


def target_shape(config: Any, target: ShearTarget) -> dict[str, int]:
    """The full shape ``target`` asks of a model with ``config``, checked field by field and by the family's own
    config validation; raises :class:`PruningError` naming the field otherwise."""
    dense = dense_shape(config)
    wanted = target.to_dict()
    for name, value in wanted.items():
        if value > dense[name]:
            raise PruningError(
                f"target `{name}`={value} is larger than the model's {dense[name]}: shearing only removes. "
                f"Give at most {dense[name]}."
            )
    ratio = dense["num_attention_heads"] // dense["num_key_value_heads"]
    heads, kv_heads = wanted.get("num_attention_heads"), wanted.get("num_key_value_heads")
    if heads is not None and kv_heads is None:
        kv_heads = heads // ratio if heads % ratio == 0 else None
        if kv_heads is None:
            raise PruningError(
                f"target `num_attention_heads`={heads} is not a multiple of the model's {ratio} query heads per "
                f"key/value head: whole key/value head groups are removed. Give a multiple of {ratio}."
            )
    if kv_heads is not None:
        heads = kv_heads * ratio if heads is None else heads
        if heads != kv_heads * ratio:
            raise PruningError(
                f"target `num_attention_heads`={heads} and `num_key_value_heads`={kv_heads} change the model's "
                f"ratio of {ratio} query heads per key/value head; whole key/value head groups are removed, so "
                f"give `num_attention_heads`={kv_heads * ratio} (or only one of the two)."
            )
        wanted.update(num_attention_heads=heads, num_key_value_heads=kv_heads)
    shape = {**dense, **wanted}
    candidate = copy.deepcopy(config)
    for name, value in shape.items():
        setattr(candidate, name, value)
    try:
        type(config).from_dict(candidate.to_dict())
    except Exception as error:  # the family's own validation (a strict dataclass raises its own type)
        raise PruningError(
            f"`target` {target.to_dict()} gives a {config.model_type} config that its family refuses: "
            f"{str(error).strip().splitlines()[-1]} Choose values the family allows."
        ) from error
    if getattr(config, "head_dim", None) is None:  # the family computes head size as hidden // heads
        old = dense["hidden_size"] // dense["num_attention_heads"]
        if shape["hidden_size"] != old * shape["num_attention_heads"]:
            raise PruningError(
                f"the {config.model_type} family derives its head size from `hidden_size` / `num_attention_heads`: "
                f"the target {shape['hidden_size']} / {shape['num_attention_heads']} changes it from {old}. "
                f"Give `hidden_size`={old * shape['num_attention_heads']}."
            )
    return shape
