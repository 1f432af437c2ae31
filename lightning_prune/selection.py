"""Which group elements go: global or per-group ranking under the structural constraints.

Constraints honoured for every group: at most ``max_fraction`` of its elements go, what remains is a
multiple of ``round_to``, equal counts leave every block of a blocked group (grouped convolutions,
GroupNorm, ``chunk``), and no producer layer is ever emptied.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

import torch
from torch import Tensor

from lightning_prune.errors import PruningError
from lightning_prune.graph.groups import Group

SCOPES = ("global", "local")
NORMALIZERS = ("mean", "max", "sum", "lamp", "none")
AUTO = "auto"  # round_to measured for the model and device (lightning_prune.widths.round_to_for)


@dataclass(frozen=True)
class SelectionOptions:
    """How elements are chosen, validated on construction; mirrored 1:1 by the yaml keys of the callbacks.

    Args:
        scope: ``"global"`` ranks all elements together, ``"local"`` removes the same fraction of every group.
        round_to: widths that remain are multiples of this; ``"auto"``: the multiple the device's kernels reward,
            measured when :func:`lightning_prune.prune` sees the model (it hands ``select`` the number).
        max_fraction: at most this fraction of any group is removed.
        normalize: how global ranking makes groups comparable: ``"mean"``, ``"max"``, ``"sum"``, ``"lamp"``,
            ``"none"``.
    """

    scope: str = "global"
    round_to: int | str = 1
    max_fraction: float = 0.9
    normalize: str = "mean"

    def __post_init__(self) -> None:
        if self.scope not in SCOPES:
            raise PruningError(f"`scope` must be one of {', '.join(SCOPES)}; got {self.scope!r}.")
        if self.round_to != AUTO and (
            isinstance(self.round_to, bool) or not isinstance(self.round_to, int) or self.round_to < 1
        ):
            raise PruningError(f"`round_to` must be a positive integer or {AUTO!r}, got {self.round_to!r}.")
        fraction = self.max_fraction
        if isinstance(fraction, bool) or not isinstance(fraction, int | float) or not 0.0 < fraction <= 1.0:
            raise PruningError(f"`max_fraction` must be in (0, 1], got {fraction!r}.")
        if self.normalize not in NORMALIZERS:
            raise PruningError(f"`normalize` must be one of {', '.join(NORMALIZERS)}; got {self.normalize!r}.")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SelectionOptions:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise PruningError(f"unknown selection option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}.")
        return cls(**data)


def check_amount(amount: object, argument: str = "amount") -> float:
    """``amount`` as a float if it is a fraction in [0, 1), else an error naming ``argument``."""
    if isinstance(amount, bool) or not isinstance(amount, int | float) or not 0.0 <= amount < 1.0:
        raise PruningError(f"`{argument}` must be a fraction in [0, 1), got {amount!r}.")
    return float(amount)


@dataclass
class Plan:
    """Local element indices to remove, per group index (plain data)."""

    removed: dict[int, list[int]]

    @property
    def count(self) -> int:
        return sum(len(v) for v in self.removed.values())


def normalize_scores(scores: Tensor, how: str) -> Tensor:
    """Make scores of different groups comparable for global ranking (+inf stays +inf).

    ``"mean"``, ``"max"``, ``"sum"`` divide by that statistic of the group; ``"lamp"`` (Lee et al. 2021)
    divides each score by the sum of the scores at least as large, so every group's best element scores 1.
    """
    if how == "none":
        return scores
    finite = torch.isfinite(scores)
    if not finite.any():
        return scores
    if how == "lamp":
        values = scores[finite]
        order = torch.argsort(values, stable=True)
        tail = values[order].flip(0).cumsum(0).flip(0)
        lamp = torch.empty_like(values)
        lamp[order] = values[order] / tail.clamp(min=torch.finfo(values.dtype).tiny)
        normalized = scores.clone()
        normalized[finite] = lamp
        return normalized
    values = scores[finite]
    scale = {"mean": values.mean(), "max": values.abs().max(), "sum": values.abs().sum()}[how]
    return scores / scale if scale > 0 else scores


def allowed_count(group: Group, wanted: int, round_to: int, max_fraction: float) -> int:
    """Largest number of elements ≤ ``wanted`` that may leave ``group``."""
    blocks = int(group.blocks.max()) + 1 if group.blocks is not None else 1
    smallest_block = int(torch.bincount(group.blocks).min()) if group.blocks is not None else group.width
    keep_per_block = max([1] + [minimum for _, minimum in group.floors]) if group.blocks is not None else 1
    cap = min(
        wanted,
        math.floor(max_fraction * group.width + 1e-9),
        group.width - 1 if group.frozen_channels == 0 else group.width,
    )
    for count in range(max(cap, 0), 0, -1):
        kept = group.width - count
        if kept % round_to and kept != 0:
            continue
        if count % blocks or smallest_block - count // blocks < keep_per_block:
            continue
        return count
    return 0


def lowest(group: Group, scores: Tensor, count: int) -> list[int]:
    """The ``count`` lowest-scoring elements, taken evenly from the blocks if the group has blocks."""
    if count == 0:
        return []
    if group.blocks is None:
        return sorted(torch.argsort(scores, stable=True)[:count].tolist())
    blocks = int(group.blocks.max()) + 1
    chosen: list[int] = []
    for block in range(blocks):
        members = torch.nonzero(group.blocks == block).reshape(-1)
        order = torch.argsort(scores[members], stable=True)[: count // blocks]
        chosen.extend(members[order].tolist())
    return sorted(chosen)


def _respect_floors(group: Group, scores: Tensor, removed: list[int]) -> list[int]:
    """Give back the best-scored removed elements of any floor that would keep too few.

    Blocked groups cannot give back single elements (every block must lose as many): they keep all.
    """
    gone = set(removed)
    for elements, minimum in group.floors:
        members = elements.tolist()
        kept = sum(1 for e in members if e not in gone)
        if kept >= minimum:
            continue
        if group.blocks is not None:
            return []
        taken = sorted((e for e in members if e in gone), key=lambda e: -float(scores[e]))
        gone -= set(taken[: minimum - kept])
    return sorted(gone)


def _protect_spaces(group: Group, removed: list[int]) -> list[int]:
    """Never empty a producer: give back the best element of any space that would lose everything."""
    if not removed:
        return removed
    gone = torch.zeros(group.width, dtype=torch.bool)
    gone[removed] = True
    local = {int(c): i for i, c in enumerate(group.classes.tolist())}
    for _, _, classes in group.spaces:
        elements = [local.get(int(c)) for c in classes.tolist()]
        if all(e is not None and bool(gone[e]) for e in elements):
            return []
    return removed


def select(
    groups: Sequence[Group],
    scores: Sequence[Tensor | None],
    amount: float,
    options: SelectionOptions | None = None,
    **option_fields: Any,
) -> Plan:
    """Choose ``amount`` (a fraction) of the scored elements to remove.

    ``options`` (or its fields as keywords, e.g. ``scope="local"``) say how: ``"local"`` removes the same
    fraction from every group; ``"global"`` ranks all elements together after ``normalize`` made each
    group's scores comparable.
    """
    amount = check_amount(amount)
    options = replace(options or SelectionOptions(), **option_fields)
    if options.round_to == AUTO:
        raise PruningError(
            "`round_to='auto'` is measured for a model: resolve it with `lightning_prune.widths.round_to_for(model, "
            "example_inputs)` before `select`, or call `lightning_prune.prune`, which does."
        )
    scope, round_to, max_fraction, normalize = options.scope, options.round_to, options.max_fraction, options.normalize
    scored = [(g, s) for g, s in zip(groups, scores, strict=True) if s is not None]
    removed: dict[int, list[int]] = {}
    if scope == "local":
        for group, values in scored:
            count = allowed_count(group, math.floor(amount * group.width + 1e-9), round_to, max_fraction)
            removed[group.index] = lowest(group, values, count)
        _local_whole_convolution_groups(scored, removed, amount, options)
    elif scored:
        # One global order (ties broken by group, then element): the lowest `taken` are the candidates however
        # many scores are equal, and each group removes only candidates, as many as its constraints allow.
        normalized = [normalize_scores(s, normalize) for _, s in scored]
        flat = torch.cat(normalized)
        order = torch.argsort(flat, stable=True)
        order = order[torch.isfinite(flat[order])]
        target = round(amount * sum(g.width for g, _ in scored))
        offsets = [0, *itertools.accumulate(g.width for g, _ in scored)]

        def choose(taken: int) -> list[list[int]]:
            candidate = torch.zeros(flat.numel(), dtype=torch.bool)
            candidate[order[:taken]] = True
            masks = [candidate[offsets[i] : offsets[i + 1]] for i in range(len(scored))]
            chosen = [_candidates_within(g, v, m, options) for (g, v), m in zip(scored, masks, strict=True)]
            _whole_convolution_groups(scored, normalized, masks, chosen, options)
            return chosen

        low, high = 0, order.numel()
        while low < high:
            middle = (low + high) // 2
            if sum(len(c) for c in choose(middle)) >= target:
                high = middle
            else:
                low = middle + 1
        chosen = choose(low) if target > 0 else [[] for _ in scored]
        for (group, _), elements in zip(scored, chosen, strict=True):
            removed[group.index] = elements
    by_index = groups_by_index(groups)
    values = {g.index: s for g, s in scored}
    whole = {g.index for g, _ in scored if g.partner is not None and _whole_blocks(g, removed.get(g.index, []))}
    removed = {
        index: r
        if index in whole
        else _protect_spaces(by_index[index], _respect_floors(by_index[index], values[index], r))
        for index, r in removed.items()
    }
    return Plan({index: r for index, r in removed.items() if r})


def _whole_blocks(group: Group, elements: list[int]) -> bool:
    """Whether ``elements`` are whole blocks of ``group`` (a grouped convolution's groups removed whole)."""
    if not elements:
        return False
    gone = torch.zeros(group.width, dtype=torch.bool)
    gone[elements] = True
    blocks = int(group.blocks.max()) + 1
    per_block = torch.zeros(blocks, dtype=torch.long).index_add_(0, group.blocks, gone.long())
    size = torch.bincount(group.blocks, minlength=blocks)
    return bool(((per_block == 0) | (per_block == size)).all()) and bool((per_block < size).any())


def _candidates_within(group: Group, scores: Tensor, candidate: Tensor, options: SelectionOptions) -> list[int]:
    """The lowest elements of ``group`` it may remove among ``candidate``: for a blocked group, as many from
    every block as the block with the fewest candidates holds, so that no block loses an element that is not
    one (the lowest of a block are its candidates: the global order ranks a group's elements by score)."""
    share = int(candidate.sum())
    if group.blocks is not None and share:
        blocks = int(group.blocks.max()) + 1
        share = blocks * int(torch.bincount(group.blocks[candidate], minlength=blocks).min())
    return lowest(group, scores, allowed_count(group, share, options.round_to, options.max_fraction))


def _pairs(scored: Sequence[tuple[Group, Tensor]]) -> Iterator[tuple[int, int, Group, Group, Tensor, int]]:
    """Each grouped convolution's paired input and output groups (``Group.partner``), once: positions in
    ``scored``, the two groups, the partner's block of each of the first group's blocks, and the block count."""
    position = {g.index: i for i, (g, _) in enumerate(scored)}
    for i, (group, _) in enumerate(scored):
        if group.partner is not None and position.get(group.partner[0].index, -1) > i:
            partner, mapping = group.partner
            yield i, position[partner.index], group, partner, mapping, int(group.blocks.max()) + 1


def _may_lose_blocks(group: Group, partner: Group, count: int, blocks: int, options: SelectionOptions) -> bool:
    return (
        count >= 1
        and not group.frozen_channels
        and not partner.frozen_channels
        and not any((g.width - count * (g.width // blocks)) % options.round_to for g in (group, partner))
    )


def _block_sums(group: Group, values: Tensor, blocks: int, to_mine: Tensor | None) -> Tensor:
    """``values`` summed per block of ``group``, in the order of the pair's first group's blocks."""
    sums = torch.zeros(blocks, dtype=values.dtype).index_add_(0, group.blocks, values)
    return sums if to_mine is None else sums[to_mine]


def _elements_of_blocks(group: Group, partner: Group, mapping: Tensor, gone: Tensor) -> list[Tensor]:
    return [
        torch.nonzero(torch.isin(group.blocks, gone)).reshape(-1),
        torch.nonzero(torch.isin(partner.blocks, mapping[gone])).reshape(-1),
    ]


def _whole_convolution_groups(
    scored: Sequence[tuple[Group, Tensor]],
    scores: Sequence[Tensor],
    candidates: Sequence[Tensor],
    chosen: list[list[int]],
    options: SelectionOptions,
) -> None:
    """Where a grouped convolution's input and output groups are paired (``Group.partner``), remove whole
    convolution groups, all of whose elements on both sides are candidates, if that removes more than an
    equal count from every block of each side; the lowest-scored such groups go first."""
    for i, j, group, partner, mapping, blocks in _pairs(scored):
        sides = ((group, i, None), (partner, j, mapping))
        full = [
            _block_sums(g, candidates[k].long(), blocks, m) == _block_sums(g, torch.ones_like(g.blocks), blocks, m)
            for g, k, m in sides
        ]
        cost = sum(_block_sums(g, scores[k], blocks, m) for g, k, m in sides)
        eligible = torch.nonzero(full[0] & full[1]).reshape(-1)
        count = min(eligible.numel(), blocks - 2, math.floor(options.max_fraction * blocks + 1e-9))
        if not _may_lose_blocks(group, partner, count, blocks, options):
            continue
        if count * (group.width + partner.width) // blocks <= len(chosen[i]) + len(chosen[j]):
            continue
        gone = eligible[torch.argsort(cost[eligible], stable=True)[:count]]
        chosen[i], chosen[j] = (e.tolist() for e in _elements_of_blocks(group, partner, mapping, gone))


def _per_element(scores: Sequence[Tensor], chosen: Sequence[Sequence[int] | Tensor]) -> float:
    """Mean score of the elements ``chosen`` on the two sides of a pair."""
    total = sum(float(values[elements].sum()) for values, elements in zip(scores, chosen, strict=True))
    return total / max(sum(len(elements) for elements in chosen), 1)


def _local_whole_convolution_groups(
    scored: Sequence[tuple[Group, Tensor]], removed: dict[int, list[int]], amount: float, options: SelectionOptions
) -> None:
    """Under local scope a grouped convolution's paired input and output groups may lose ``amount`` of its
    convolution groups whole instead of an equal count from every one: chosen where an equal count removes
    nothing, or where the whole groups cost less per removed element (scores relative to each side's mean)."""
    for i, j, group, partner, mapping, blocks in _pairs(scored):
        count = min(math.floor(amount * blocks + 1e-9), blocks - 2, math.floor(options.max_fraction * blocks + 1e-9))
        if not _may_lose_blocks(group, partner, count, blocks, options):
            continue
        relative = [
            v.double() / v[torch.isfinite(v)].abs().mean().clamp_min(1e-30) for v in (scored[i][1], scored[j][1])
        ]
        cost = _block_sums(group, relative[0], blocks, None) + _block_sums(partner, relative[1], blocks, mapping)
        eligible = torch.nonzero(torch.isfinite(cost)).reshape(-1)
        if eligible.numel() < count:
            continue
        gone = eligible[torch.argsort(cost[eligible], stable=True)[:count]]
        whole = _elements_of_blocks(group, partner, mapping, gone)
        equal = [removed.get(group.index, []), removed.get(partner.index, [])]
        if any(equal) and _per_element(relative, whole) > _per_element(relative, equal):
            continue
        removed[group.index], removed[partner.index] = whole[0].tolist(), whole[1].tolist()


def groups_by_index(groups: Sequence[Group]) -> dict[int, Group]:
    return {g.index: g for g in groups}
