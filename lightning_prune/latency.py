"""Pruning to a latency goal: a greedy knapsack over the per-layer latency table, and the measure-and-correct
loop that checks the whole model's time.

HALP (Shen et al. 2022) in outline: every convolution and linear layer is timed alone at a grid of widths
(:mod:`lightning_prune.latency_table`); :func:`plan_for_latency` removes, step by step, the chunk of channels
that loses least importance per second saved; :func:`search_latency` times the whole pruned model against the
dense one and moves the estimated goal until the measured ratio holds.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

from lightning_prune.errors import PruningError
from lightning_prune.graph.groups import DependencyGraph
from lightning_prune.latency_table import Clock, LatencyModel, TimeLayer, time_layer
from lightning_prune.measure import LatencyComparison, compare_latency
from lightning_prune.running import ExampleInputs
from lightning_prune.selection import Plan, SelectionOptions, allowed_count, lowest, normalize_scores, select

STEPS = 32  # a group loses at most 1/STEPS of its width per greedy step
TOLERANCE = 0.05  # of the goal ratio: a measured ratio within it below the goal ends the search
ROUNDS = 5


def plan_for_latency(
    graph: DependencyGraph,
    scores: Sequence[Tensor | None],
    cost: LatencyModel,
    keep: float,
    selection: SelectionOptions,
    *,
    floor: bool = False,
) -> Plan:
    """The plan that brings ``cost``'s estimated seconds to at most ``keep`` of the dense estimate (with
    ``floor``, where no plan can: the one that removes everything the constraints allow).

    Greedy knapsack: each step removes, from one group, its next chunk of lowest-scored elements (about
    1/``STEPS`` of its width, as ``round_to``, blocks and ``max_fraction`` allow), choosing the chunk whose
    importance lost (scores normalized per group by ``selection.normalize``) per estimated second saved is
    least. Groups whose removal saves no time are never cut.

    Raises:
        PruningError: if removing everything the constraints allow does not reach the goal (without ``floor``).
    """
    widths = cost.dense_widths()
    dense = cost.seconds(widths)
    goal, current = keep * dense, dense
    pairs = zip(graph.groups, scores, strict=True)
    scored = {g.index: (g, normalize_scores(s, selection.normalize)) for g, s in pairs if s is not None}
    effects = {index: cost.effects(group) for index, (group, _) in scored.items()}
    sharing: dict[str, set[int]] = {}
    for index, found in effects.items():
        for name, *_ in found:
            sharing.setdefault(name, set()).add(index)
    removed: dict[int, list[int]] = {index: [] for index in scored}

    def candidate(index: int) -> tuple[float, list[int], dict[str, list[int]], float] | None:
        group, values = scored[index]
        step = max(1, math.ceil(group.width / STEPS))
        count = next(
            (c for c in range(len(removed[index]) + step, group.width + 1)
             if allowed_count(group, c, selection.round_to, selection.max_fraction) == c),
            None,
        )  # fmt: skip
        if count is None:
            return None
        elements = lowest(group, values, count)
        loss = float(values[elements].sum() - values[removed[index]].sum())
        if not math.isfinite(loss):
            return None
        new, old = torch.tensor(elements, dtype=torch.long), torch.tensor(removed[index], dtype=torch.long)
        after = {name: list(widths[name]) for name, *_ in effects[index]}
        for name, side, owners, factor in effects[index]:
            after[name][side] -= factor * int(torch.isin(owners, new).sum() - torch.isin(owners, old).sum())
        saved = sum(cost.layer(name, widths) - cost.layer(name, after) for name in after)
        return (max(loss, 0.0) / saved if saved > 0 else math.inf), elements, after, saved

    candidates = {index: candidate(index) for index in scored}
    while current > goal:
        useful = [(c[0], index) for index, c in candidates.items() if c is not None and c[0] < math.inf]
        if not useful and floor:  # the search times it and judges
            break
        if not useful:
            raise PruningError(
                f"`target='latency'` cannot reach {keep:.0%} of the estimated dense time of the convolutions and "
                f"linear layers ({dense * 1e3:.3g} ms): removing everything the constraints allow leaves "
                f"{current / dense:.0%}. Lower `amount`, raise `max_fraction` or shrink `ignore`."
            )
        _, index = min(useful)
        _, elements, after, saved = candidates[index]
        removed[index] = elements
        widths.update(after)
        current -= saved
        touched = {other for name in after for other in sharing[name]}
        candidates.update({other: candidate(other) for other in touched})
    return _final_plan(scored, removed, selection)


def _final_plan(
    scored: Mapping[int, tuple[Any, Tensor]], removed: Mapping[int, list[int]], selection: SelectionOptions
) -> Plan:
    """The chosen counts through ``select`` (one group at a time), so floors and emptied producers are respected."""
    local = replace(selection, scope="local")
    plan: dict[int, list[int]] = {}
    for index, elements in removed.items():
        group, values = scored[index]
        if elements:
            plan.update(select([group], [values], len(elements) / group.width, local).removed)
    return Plan(plan)


Trial = TypeVar("Trial")
Timing = Callable[[nn.Module, nn.Module, ExampleInputs], LatencyComparison]
PLAIN = ("cache", "tolerance", "rounds", "repeats", "min_run_time")  # the settings a yaml file can give


@dataclass(frozen=True)
class LatencySettings:
    """How ``target="latency"`` measures, validated on construction.

    Args:
        timing: ``timing(dense, pruned, example_inputs) -> LatencyComparison`` times the whole models; None:
            :func:`~lightning_prune.measure.compare_latency` with ``repeats`` and ``min_run_time``.
        time_layer: ``time_layer(layer, input) -> seconds`` times one layer for the table.
        clock: ``clock() -> seconds``, read between layers to share the time the table does not hold
            (:meth:`~lightning_prune.latency_table.LatencyModel.calibrate`).
        cache: keep the table on disk (``$LIGHTNING_PRUNE_CACHE/latency/<device>.json``) and reuse it.
        tolerance: a measured ratio within this fraction below the goal ends the search.
        rounds: at most this many pruned copies are timed.
        repeats, min_run_time: turns and total seconds per model of each whole-model timing.
    """

    timing: Timing | None = None
    time_layer: TimeLayer = time_layer
    clock: Clock = time.perf_counter
    cache: bool = True
    tolerance: float = TOLERANCE
    rounds: int = ROUNDS
    repeats: int = 10
    min_run_time: float = 1.0

    def __post_init__(self) -> None:
        if not (isinstance(self.tolerance, int | float) and 0 < self.tolerance < 1):
            raise PruningError(f"`tolerance` must be a fraction in (0, 1), got {self.tolerance!r}.")
        for name in ("rounds", "repeats"):
            value, least = getattr(self, name), 1 if name == "rounds" else 3
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise PruningError(f"`{name}` must be an integer of at least {least}, got {value!r}.")
        if (
            isinstance(self.min_run_time, bool)
            or not isinstance(self.min_run_time, int | float)
            or self.min_run_time <= 0
        ):
            raise PruningError(f"`min_run_time` must be a positive number of seconds, got {self.min_run_time!r}.")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LatencySettings:
        """Settings from plain values (a yaml mapping): any of ``cache``, ``tolerance``, ``rounds``, ``repeats``,
        ``min_run_time``."""
        unknown = sorted(set(data) - set(PLAIN))
        if unknown:
            raise PruningError(f"latency settings {unknown} are unknown; the plain ones are: {', '.join(PLAIN)}.")
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        """The plain settings (the timing functions are code and stay out)."""
        return {name: getattr(self, name) for name in PLAIN}

    def compare(self, dense: nn.Module, pruned: nn.Module, example_inputs: ExampleInputs) -> LatencyComparison:
        """``dense`` and ``pruned`` timed on ``example_inputs`` as these settings say."""
        if self.timing is not None:
            return self.timing(dense, pruned, example_inputs)
        return compare_latency(dense, pruned, example_inputs, repeats=self.repeats, min_run_time=self.min_run_time)


@dataclass(frozen=True)
class LatencyOutcome:
    """What a latency step reached: the goal (pruned / dense seconds), the timing that met it, every try."""

    goal: float
    timing: LatencyComparison
    tries: list[tuple[float, float]]

    @property
    def measured(self) -> float:
        return 1.0 / self.timing.ratio


def search_latency(
    attempt: Callable[[float], Trial],
    measure: Callable[[Trial], float],
    goal: float,
    *,
    tolerance: float = TOLERANCE,
    rounds: int = ROUNDS,
) -> tuple[Trial, float, list[tuple[float, float]]]:
    """Find the estimated fraction ``keep`` whose pruned model measures at most ``goal`` of the dense time.

    ``attempt(keep)`` prunes a copy to ``keep`` of the estimated time; ``measure(trial)`` times it against the
    dense model (pruned / dense seconds). The first try asks for ``goal``; the next ones aim a little below it
    (half the ``tolerance``), by the secant through the last two tries, its slope held near the proportional
    one (after one try: time in proportion to ``keep``), kept strictly between the closest tries on either side
    of the goal (else the line through those two, else their midpoint), until a trial measures within
    ``tolerance`` (a fraction of ``goal``) at or below the goal, or after ``rounds`` tries.

    Returns:
        The trial that met the goal with the largest ``keep``, its measured ratio, and every (keep, ratio) tried.

    Raises:
        PruningError: if no trial measured at or below ``goal``.
    """
    aim = goal * (1 - tolerance / 2)
    keep, history = goal, []
    best: tuple[float, Trial, float] | None = None
    slow: tuple[float, float] | None = None  # the try of smallest keep measured above the goal, and its ratio
    for _ in range(rounds):
        trial = attempt(keep)
        ratio = measure(trial)
        history.append((keep, ratio))
        if ratio <= goal:
            if best is None or keep > best[0]:
                best = (keep, trial, ratio)
            if ratio >= goal * (1 - tolerance):
                break
        elif slow is None or keep < slow[0]:
            slow = (keep, ratio)
        following = _next_keep(history, aim)
        low, high = (best[0] if best else 0.0), (slow[0] if slow is not None else 1.0)
        if not low < following < high and best is not None and slow is not None:
            following = _through(best[0], best[2], *slow, aim)
        if not low < following < high:
            following = (low + high) / 2
        if abs(following - keep) < 1e-3:
            break
        keep = following
    if best is None:
        tried = ", ".join(f"{k:.3f} -> {r:.3f}" for k, r in history)
        raise PruningError(
            f"`target='latency'` could not bring the measured latency to {goal:.0%} of the dense model's in "
            f"{len(history)} tries (estimated fraction -> measured ratio: {tried}); the model is unchanged. The "
            "layers the table times may not dominate this model's time, or the machine is too busy to tell: "
            "lower `amount`'s demands or retry on a quieter machine."
        )
    return best[1], best[2], history


def _through(keep: float, ratio: float, other: float, other_ratio: float, aim: float) -> float:
    """The keep at which the line through two tries measures ``aim`` (their midpoint if they measured alike)."""
    if ratio == other_ratio:
        return (keep + other) / 2
    return keep + (aim - ratio) * (other - keep) / (other_ratio - ratio)


def _next_keep(history: Sequence[tuple[float, float]], aim: float) -> float:
    """The keep whose ratio the last two tries' secant puts at ``aim`` (after one try: in proportion). The secant's
    slope is held within half and twice the proportional one (``ratio / keep``): two noisy timings close together
    would otherwise send the next try far past the goal."""
    keep, ratio = history[-1]
    if ratio <= 0:
        return keep
    proportional = ratio / keep
    slope = proportional
    if len(history) > 1 and keep != history[-2][0]:
        before, ratio_before = history[-2]
        slope = min(max((ratio - ratio_before) / (keep - before), proportional / 2), proportional * 2)
    return keep + (aim - ratio) / slope
