"""Importance criteria: one score per group element, lower means pruned first.

A criterion is any callable ``criterion(group, context) -> Tensor | None`` returning a score per
element of the group (``None`` leaves the group unpruned). Built-ins are chosen by name:

- ``"l1"`` / ``"l2"``: norm of each producer's output filter (conv/linear weight rows), aggregated
  over the group's producers;
- ``"bn_scale"``: ``|γ|`` of the BatchNorms in the group (Network Slimming); groups without a
  BatchNorm are left unpruned;
- ``"taylor"``: first-order Taylor expansion, ``|Σ activation × gradient|`` per channel and batch
  (Molchanov et al. 2017);
- ``"fisher"``: accumulated squared gradient of a mask shared by the group's channels (Theis et al.
  2018; group Fisher of Liu et al. 2021);
- ``"fpgm"``: distance of each filter to the others, i.e. how far it is from the geometric median
  of its layer (He et al. 2019): filters near the median are replaceable;
- ``"random"``: a seeded random score, the floor every other criterion must beat.

Gradient criteria (``needs_gradients = True``) read ``ScoringContext.statistics``, which
:mod:`lightning_prune.statistics` accumulates from training or calibration batches; a criterion with a
``collect(model, graph, batches, loss_fn)`` method gathers statistics of its own kind on calibration batches
(LLM-Pruner's parameter gradients, see :mod:`lightning_prune.methods.llm_pruner`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from lightning_prune.errors import PruningError
from lightning_prune.graph.groups import Group, Member
from lightning_prune.registry import Registry
from lightning_prune.slicing import index_rows

AGGREGATES = ("sum", "mean", "max", "prod", "last")


@dataclass
class ScoringContext:
    """What a criterion may look at: the model's tensors by name, and accumulated statistics."""

    model: nn.Module
    statistics: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._tensors = {**dict(self.model.named_parameters()), **dict(self.model.named_buffers())}

    def tensor(self, name: str) -> Tensor:
        return self._tensors[name]

    def module(self, path: str) -> nn.Module:
        return self.model.get_submodule(path)


class Criterion(Protocol):
    def __call__(self, group: Group, context: ScoringContext) -> Tensor | None: ...


def aggregate_members(group: Group, values: list[tuple[Member, Tensor]], how: str) -> Tensor:
    """Per-element scores from per-position values of several slots.

    Positions of one slot that belong to the same element are summed; slots are then combined by
    ``how`` over the slots that hold the element: ``"sum"``, ``"mean"``, ``"max"``, ``"prod"``, or ``"last"``
    (the value of the last slot in ``values`` that holds it: in trace order, the most downstream layer).
    Elements held by none score +inf.
    """
    rows, masks = [], []
    for member, per_position in values:
        row = torch.zeros(group.width, dtype=torch.float64)
        row.index_add_(0, member.elements, per_position[member.positions].to(torch.float64))
        mask = torch.zeros(group.width, dtype=torch.bool)
        mask[member.elements] = True
        rows.append(row)
        masks.append(mask)
    if not rows:
        return torch.full((group.width,), float("inf"), dtype=torch.float64)
    stacked, covered = torch.stack(rows), torch.stack(masks)
    count = covered.sum(0)
    if how == "sum":
        result = stacked.sum(0)
    elif how == "mean":
        result = stacked.sum(0) / count.clamp(min=1)
    elif how == "prod":
        result = stacked.masked_fill(~covered, 1.0).prod(0)
    elif how == "last":
        last = (covered * torch.arange(1, len(rows) + 1)[:, None]).argmax(0)
        result = stacked.gather(0, last[None]).reshape(-1)
    else:
        result = stacked.masked_fill(~covered, float("-inf")).amax(0)
    return result.masked_fill(count == 0, float("inf"))


def _per_index_norm(tensor: Tensor, dim: int, p: int, groups: int = 1) -> Tensor:
    rows = index_rows(tensor.detach(), dim, groups)
    if p == 1:  # summed in float64 without a float64 copy of the weight (|x| of a float is exact)
        return rows.abs().sum(1, dtype=torch.float64)
    return rows.to(torch.float64).pow(2).sum(1).sqrt()


@dataclass
class Magnitude:
    """L1 or L2 norm of the group's producer filters (Li et al. 2017)."""

    p: int = 1
    aggregate: str = "sum"

    def __call__(self, group: Group, context: ScoringContext) -> Tensor | None:
        values = [
            (m, _per_index_norm(context.tensor(m.slot.tensor), m.slot.dim, self.p, m.slot.groups))
            for m in group.members_with_role("out")
        ]
        return aggregate_members(group, values, self.aggregate)


@dataclass
class BNScale:
    """|γ| of the group's BatchNorm layers (Liu et al. 2017); groups without one stay unpruned."""

    aggregate: str = "sum"

    def __call__(self, group: Group, context: ScoringContext) -> Tensor | None:
        values = []
        for member in group.members_with_role("follow"):
            name = member.slot.tensor
            owner, _, local = name.rpartition(".")
            if local == "weight" and isinstance(context.module(owner), nn.modules.batchnorm._BatchNorm):
                values.append((member, context.tensor(name).detach().abs()))
        return aggregate_members(group, values, self.aggregate) if values else None


@dataclass
class GradientImportance:
    """Taylor or Fisher scores from accumulated statistics (see :mod:`lightning_prune.statistics`)."""

    kind: str = "taylor"
    aggregate: str = "sum"
    needs_gradients: bool = True

    def __call__(self, group: Group, context: ScoringContext) -> Tensor | None:
        accumulated = context.statistics.get(self.kind)
        if not accumulated:
            raise PruningError(
                f"`importance={self.kind!r}` needs gradient statistics: pass `batches` (an iterable of batches) and "
                "`loss_fn(model, batch) -> loss` to `prune`, or use it in `StructuredPruning`, which accumulates "
                "them during training."
            )
        values = [
            (m, accumulated[m.slot.tensor]) for m in group.members_with_role("out") if m.slot.tensor in accumulated
        ]
        if not values:
            return None
        how = "mean" if self.kind == "fisher" else self.aggregate  # every fisher member holds its element's value
        return aggregate_members(group, values, how)


@dataclass
class GeometricMedian:
    """FPGM: the summed distance of each filter to the other filters of its layer (He et al. 2019)."""

    aggregate: str = "sum"

    def __call__(self, group: Group, context: ScoringContext) -> Tensor | None:
        values = []
        for member in group.members_with_role("out"):
            slot = member.slot
            rows = index_rows(context.tensor(slot.tensor).detach(), slot.dim, slot.groups).to(torch.float64)
            blocks = rows.view(slot.groups, -1, rows.shape[1])  # blocks of rows (experts) are layers of their own
            values.append((member, torch.cdist(blocks, blocks).sum(-1).reshape(-1)))
        return aggregate_members(group, values, self.aggregate)


@dataclass
class RandomImportance:
    """Uniform random scores from a seeded generator: the baseline every criterion must beat."""

    seed: int = 0

    def __post_init__(self) -> None:
        self._generator = torch.Generator().manual_seed(self.seed)

    def __call__(self, group: Group, context: ScoringContext) -> Tensor | None:
        return torch.rand(group.width, generator=self._generator, dtype=torch.float64)


CRITERIA: Registry[str, Callable[..., Criterion]] = Registry(
    "criterion", "Register one with lightning_prune.register_criterion(name, factory)."
)
for _name, _factory in (
    ("l1", lambda aggregate="sum", **_: Magnitude(1, aggregate)),
    ("l2", lambda aggregate="sum", **_: Magnitude(2, aggregate)),
    ("bn_scale", lambda aggregate="sum", **_: BNScale(aggregate)),
    ("random", lambda seed=0, **_: RandomImportance(seed)),
    ("taylor", lambda aggregate="sum", **_: GradientImportance("taylor", aggregate)),
    ("fisher", lambda aggregate="sum", **_: GradientImportance("fisher", aggregate)),
    ("fpgm", lambda aggregate="sum", **_: GeometricMedian(aggregate)),
):
    CRITERIA.register(_name, _factory)


def needs_gradients(criterion: Criterion) -> bool:
    return bool(getattr(criterion, "needs_gradients", False))


def register_criterion(name: str, factory: Callable[..., Criterion], *, replace: bool = False) -> None:
    """Make ``factory(**options)`` available as ``importance=name`` (options: ``aggregate``, ``seed``)."""
    CRITERIA.register(name, factory, replace=replace)


def get_criterion(importance: str | Criterion, *, aggregate: str = "sum", seed: int = 0) -> Criterion:
    if aggregate not in AGGREGATES:
        raise PruningError(f"`aggregate` must be one of {', '.join(AGGREGATES)}; got {aggregate!r}.")
    if callable(importance):
        return importance
    if importance not in CRITERIA:
        raise PruningError(
            f"`importance` {importance!r} is not a known criterion. Known: {', '.join(sorted(CRITERIA))}; "
            "or pass a callable `criterion(group, context) -> scores`."
        )
    return CRITERIA[importance](aggregate=aggregate, seed=seed)


def score(groups: list[Group], context: ScoringContext, criterion: Criterion) -> list[Tensor | None]:
    """Scores of every group; raises if a criterion returns a wrong shape or non-finite values."""
    scores: list[Tensor | None] = []
    for group in groups:
        values = criterion(group, context)
        if values is not None:
            values = torch.as_tensor(values, dtype=torch.float64).reshape(-1)
            if values.numel() != group.width:
                raise PruningError(
                    f"criterion returned {values.numel()} scores for group `{group.name}` of {group.width} channels."
                )
            if torch.isnan(values).any() or torch.isneginf(values).any():
                raise PruningError(
                    f"criterion returned NaN or -inf scores for group `{group.name}` ({group!r}); "
                    "check the weights and statistics of these layers for NaN/inf values."
                )
        scores.append(values)
    return scores
