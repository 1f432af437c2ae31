"""``prune``: trace → score → select → cut → verify, in one call."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from lightning_prune.budget import Budget, DenseSize, plan_for_goal
from lightning_prune.cuts import Cut
from lightning_prune.errors import PruningError, VerificationError
from lightning_prune.graph.groups import DependencyGraph, group_trace, match_modules
from lightning_prune.graph.tracer import trace_model
from lightning_prune.importance import Criterion, ScoringContext, get_criterion, needs_gradients, score
from lightning_prune.latency import LatencyOutcome, LatencySettings, plan_for_latency, search_latency
from lightning_prune.latency_table import TIMED_LAYERS, LatencyModel
from lightning_prune.measure import count_macs, count_params
from lightning_prune.planning import plan_cuts
from lightning_prune.record import new_record
from lightning_prune.running import ExampleInputs, meta_clone, tensor_owners, to_device, tracing_modes
from lightning_prune.selection import AUTO, Plan, SelectionOptions, select
from lightning_prune.statistics import collect_statistics
from lightning_prune.surgery import apply_cuts
from lightning_prune.verify import verify_pruned
from lightning_prune.widths import round_to_for

MAX_ATTEMPTS = 6


@dataclass
class LayerChange:
    module: str
    tensor: str
    before: int
    after: int


@dataclass
class PruningResult:
    """What one pruning call did. ``record`` replays it on a fresh dense model (:func:`restore`).

    ``dense`` is the dense model's size with this call's removals counted: pass it as ``dense=`` to the
    next call so that its ``amount`` is again relative to the dense model.
    """

    record: dict[str, Any]
    params_before: int
    params_after: int
    macs_before: int
    macs_after: int
    layers: list[LayerChange]
    unprunable: dict[str, str]
    channels_before: int
    channels_removed: int
    dense: DenseSize
    graph: DependencyGraph = field(repr=False)
    latency: LatencyOutcome | None = None

    @property
    def params_ratio(self) -> float:
        return self.params_after / max(self.params_before, 1)

    @property
    def macs_ratio(self) -> float:
        return self.macs_after / max(self.macs_before, 1)

    def table(self) -> str:
        """Per-layer widths, before → after, as aligned plain text."""
        rows = [("layer", "width"), *((c.module, f"{c.before} -> {c.after}") for c in self.layers)]
        width = max(len(r[0]) for r in rows)
        return "\n".join(f"{name:<{width}}  {change}" for name, change in rows)

    def __str__(self) -> str:
        return (
            f"pruned {len(self.layers)} layers: params {self.params_before:,} -> {self.params_after:,} "
            f"({self.params_ratio:.1%}), MACs {self.macs_before:,} -> {self.macs_after:,} ({self.macs_ratio:.1%})"
        )


def _layer_changes(model: nn.Module, cuts: Iterable[Cut], graph: DependencyGraph) -> list[LayerChange]:
    outputs = {(s.tensor, s.dim) for s in graph.slots if s.role == "out"}
    owners = tensor_owners(model)
    order = {name: index for index, (name, _) in enumerate(model.named_modules())}
    changes = [
        LayerChange((owners.get(c.tensor) or [c.tensor])[0], c.tensor, c.size, len(c.keep))
        for c in cuts
        if (c.tensor, c.dim) in outputs
    ]
    return sorted(changes, key=lambda change: order.get(change.module, len(order)))


def _count_macs_cheaply(model: nn.Module, example_inputs: ExampleInputs) -> int:
    """MACs of a freshly cut model on the meta device: no kernels to prime for the new shapes."""
    try:
        return count_macs(meta_clone(model), to_device(example_inputs, "meta"))
    except Exception:  # data-dependent code cannot run on meta tensors
        return count_macs(model, example_inputs)


@dataclass
class _Planner:
    """Scores a traced model and chooses what goes to meet the budget; remembers the dense measurements."""

    model: nn.Module
    example_inputs: ExampleInputs
    budget: Budget
    dense: DenseSize | None
    selection: SelectionOptions
    criterion: Criterion
    importance: str | Criterion
    statistics: Mapping[str, Any] | None
    calibration: tuple[Iterable[Any] | None, Callable[[nn.Module, Any], torch.Tensor] | None]
    params_before: int = 0
    macs_before: int | None = None
    cost: LatencyModel | None = None  # with target="latency": the table of the model's layers
    keep: float = 1.0  # ... and the fraction of their estimated time to keep
    fixed: Plan | None = None  # a plan chosen on a copy, to apply as it is

    def __call__(self, graph: DependencyGraph) -> Plan:
        if self.macs_before is None:
            self.macs_before = (
                graph.trace.macs if graph.trace.macs is not None else count_macs(self.model, self.example_inputs)
            )
        if self.fixed is not None:
            return self.fixed
        if needs_gradients(self.criterion) and self.statistics is None:
            collect = getattr(self.criterion, "collect", collect_statistics)
            self.statistics = collect(self.model, graph, *self.calibration)
        scores = score(graph.groups, ScoringContext(self.model, self.statistics or {}), self.criterion)
        current = self.params_before if self.budget.target == "params" else self.macs_before
        fraction = self.budget.amount if self.cost else self.budget.fraction_now(self.dense, current)
        if fraction > 0 and graph.groups and all(s is None for s in scores):
            raise _nothing_scored(self.model, self.importance, self.budget.amount, len(graph.groups))
        if self.cost is not None:
            return plan_for_latency(graph, scores, self.cost, self.keep, self.selection, floor=True)
        if self.budget.target == "channels" or fraction == 0:
            return select(graph.groups, scores, fraction, self.selection)
        goal = int((1 - fraction) * current)
        return plan_for_goal(self.model, graph, scores, self.example_inputs, self.budget.target, goal, self.selection)


def _nothing_scored(model: nn.Module, importance: str | Criterion, amount: float, groups: int) -> PruningError:
    name = importance if isinstance(importance, str) else getattr(importance, "__name__", type(importance).__name__)
    return PruningError(
        f"`importance={name!r}` scored none of the {groups} prunable groups of {type(model).__name__}, so "
        f"`amount={amount}` would remove nothing (a criterion returns None for a group it cannot score: "
        "'bn_scale' one without a BatchNorm, gradient criteria one without statistics). "
        "Choose another criterion, e.g. 'l1'."
    )


def prune(
    model: nn.Module,
    example_inputs: ExampleInputs,
    amount: float,
    importance: str | Criterion = "l1",
    *,
    target: str = "channels",
    dense: DenseSize | None = None,
    scope: str = "global",
    round_to: int | str = 1,
    max_fraction: float = 0.9,
    normalize: str = "mean",
    ignore: Iterable[str] = (),
    aggregate: str = "sum",
    seed: int = 0,
    optimizers: Iterable[torch.optim.Optimizer] = (),
    statistics: Mapping[str, Any] | None = None,
    batches: Iterable[Any] | None = None,
    loss_fn: Callable[[nn.Module, Any], torch.Tensor] | None = None,
    verify: bool = True,
    modes: Iterable[str] | None = None,
    latency: LatencySettings | None = None,
) -> PruningResult:
    """Remove the least important structures of ``model`` in place, leaving a smaller dense model.

    Args:
        model: any ``nn.Module``; its parameters stay the same objects, with smaller data.
        example_inputs: a tensor, a tuple of positional inputs or a dict of keyword inputs, used to
            trace the model (a batch of 2 or more if the model has BatchNorm).
        amount: with ``target="channels"``, the fraction of prunable channels to remove; with
            ``target="macs"`` or ``"params"``, the fraction of the model's MACs or parameters to remove
            (``amount=0.5`` with ``target="macs"`` prunes until MACs ≤ 50% of what they were); with
            ``target="latency"``, the fraction of the dense model's measured seconds per forward to remove
            (``amount=0.3``: until a forward on ``example_inputs`` takes at most 70% of the time, on the device
            and thread count the model runs on now).
        importance: a criterion name (``"l1"``, ``"l2"``, ``"bn_scale"``, ``"taylor"``, ``"fisher"``,
            ``"fpgm"``, ``"random"``) or a callable ``criterion(group, context) -> scores``.
        target: what ``amount`` is a fraction of: ``"channels"``, ``"macs"``, ``"params"`` or ``"latency"``
            (convolutions and linear layers timed alone at several widths, cached per device and shape; a greedy
            knapsack removes what costs least importance per second saved; pruned copies are then timed against
            the dense model until one measures at the goal: :mod:`lightning_prune.latency`).
        dense: the ``result.dense`` of an earlier call on this model: ``amount`` is then cumulative and
            relative to the model as it was before its first pruning step.
        scope, round_to, max_fraction, normalize: how elements are selected (see :class:`SelectionOptions`);
            ``round_to="auto"``: the multiple this device's kernels reward for the layer kind holding most of the
            model's weights, in the layout it runs in (convolutions channels-last where their weights or the 4-d
            example inputs are), timed once per device and cached (:func:`lightning_prune.widths.round_to_for`).
        ignore: module names or glob patterns whose parameters keep their shapes.
        aggregate: how a group's producers' scores combine (``"sum"``, ``"mean"``, ``"max"``).
        seed: seed of the ``"random"`` criterion.
        optimizers: optimizers whose per-parameter state (momentum, Adam moments) is sliced alike.
        statistics: gradient statistics accumulated elsewhere (see :mod:`lightning_prune.statistics`).
        batches: for gradient criteria (``"taylor"``, ``"fisher"``) without ``statistics``: an iterable of
            batches to run forward and backward on before scoring.
        loss_fn: ``loss_fn(model, batch) -> scalar loss`` for those calibration passes.
        verify: re-trace the pruned model and roll back if it deviates from the plan.
        modes: modes to trace (and verify) in. None: both where some module's forward can branch on
            ``training`` (auxiliary heads, stochastic depth), else eval only (see ``running.tracing_modes``).
        latency: how ``target="latency"`` times (:class:`~lightning_prune.latency.LatencySettings`).

    Returns:
        A :class:`PruningResult` with the plain-data ``record`` and params/MACs before and after (and, for
        ``target="latency"``, ``latency``: the goal, the timing of dense against pruned, every try).

    Raises:
        PruningError: bad arguments (before anything runs), untraceable model or inputs, ``amount > 0``
            with a criterion that scores no group, or a latency goal no pruned copy reached (with every try in
            the message); the model is left unchanged.

    Warns:
        UserWarning: ``amount=0``, which prunes nothing.
    """
    budget = Budget(amount, target)
    selection = SelectionOptions(scope, round_to, max_fraction, normalize)
    if selection.round_to == AUTO:
        selection = replace(selection, round_to=round_to_for(model, example_inputs))
    if target == "channels" and amount > max_fraction:
        raise PruningError(
            f"`amount`={amount} of the channels cannot be removed: every group (a layer's heads, its FFN neurons ...) "
            f"keeps at least 1 - `max_fraction` = {1 - max_fraction:.0%} of its elements, so at most {max_fraction} "
            "can go. Lower `amount`, or raise `max_fraction` (at most 1: a layer may then lose all of them)."
        )
    criterion = get_criterion(importance, aggregate=aggregate, seed=seed)
    needs_loss = getattr(criterion, "needs_loss", True)  # activation statistics need batches only
    if needs_gradients(criterion) and statistics is None and (batches is None or (loss_fn is None and needs_loss)):
        wanted = (("batches", batches), ("loss_fn", loss_fn if needs_loss else True))
        missing = " and ".join(f"`{n}`" for n, v in wanted if v is None)
        raise PruningError(
            f"`importance={importance!r}` is a gradient criterion and needs {missing}: pass `batches` (an iterable "
            "of batches) and `loss_fn(model, batch) -> scalar loss`, or precomputed `statistics`."
        )
    if target == "latency" and amount == 0:
        raise PruningError(
            "`amount=0` with `target='latency'` asks for no speed-up; pass the fraction of the dense model's "
            "latency to remove, in (0, 1): `amount=0.3` prunes until a forward takes at most 70% of the time."
        )
    if amount == 0:
        warnings.warn("`amount=0`: nothing will be pruned. Pass a fraction in (0, 1).", UserWarning, stacklevel=2)
    ignored = dict.fromkeys(match_modules(model, ignore), "which is listed in `ignore`")
    planner = _Planner(
        model,
        example_inputs,
        budget,
        dense,
        selection,
        criterion,
        importance,
        statistics,
        (batches, loss_fn),
        count_params(model),
    )
    modes = tracing_modes(model) if modes is None else tuple(modes)
    if target == "latency":
        return _prune_to_latency(planner, ignored, list(optimizers), verify, modes, latency or LatencySettings())
    return _run(model, planner, ignored, list(optimizers), verify, modes)[0]


def _run(
    model: nn.Module,
    planner: _Planner,
    ignored: dict[str, str],
    optimizers: list[torch.optim.Optimizer],
    verify: bool,
    modes: tuple[str, ...],
) -> tuple[PruningResult, Plan, dict[str, str]]:
    """Prune ``model`` as ``planner`` chooses: the result, the plan that held and the modules left whole."""
    example_inputs = planner.example_inputs
    graph, plan, cuts, macs_after, left_alone = _cut_until_verified(
        model, example_inputs, planner, ignored, optimizers, verify, modes
    )
    macs_before = planner.macs_before
    if not cuts:
        macs_after = macs_before
    channels = sum(g.width for g in graph.groups)
    result = PruningResult(
        new_record([cuts]),
        planner.params_before,
        count_params(model),
        macs_before,
        macs_after if macs_after is not None else _count_macs_cheaply(model, example_inputs),
        _layer_changes(model, cuts, graph),
        {**graph.unprunable, **left_alone},
        channels,
        plan.count,
        (planner.dense or DenseSize(planner.params_before, macs_before, channels)).after(plan.count),
        graph,
    )
    return result, plan, left_alone


def _prune_to_latency(
    planner: _Planner,
    ignored: dict[str, str],
    optimizers: list[torch.optim.Optimizer],
    verify: bool,
    modes: tuple[str, ...],
    settings: LatencySettings,
) -> PruningResult:
    """Prune copies to estimated goals until one measures at the asked latency, then cut the model as it was cut."""
    model, example_inputs, dense = planner.model, planner.example_inputs, planner.dense
    try:
        cost = LatencyModel.of(model, example_inputs, time=settings.time_layer, cache=settings.cache)
    except Exception as error:
        raise PruningError(
            f"`example_inputs` do not run through {type(model).__name__} ({type(error).__name__}: {error}); nothing "
            "was pruned. Pass what its forward accepts: a tensor, a tuple of positional inputs or a dict of keywords."
        ) from error
    if not cost.specs:
        raise PruningError(
            f"`target='latency'` times convolutions (nn.Conv2d), linear layers (nn.Linear) and the layers in "
            f"`lightning_prune.latency_table.TIMED_LAYERS` ({', '.join(TIMED_LAYERS)}), and "
            f"{type(model).__name__} runs none on these inputs: use `target='macs'`."
        )
    reference = copy.deepcopy(model)
    seconds_now = settings.compare(reference, reference, example_inputs).dense.median
    goal, kept = 1.0 - planner.budget.amount, 1.0
    if dense is not None and dense.latency is not None:
        if dense.latency_kept is not None:  # the ratios measured in turns so far, not seconds from another time
            kept, now = dense.latency_kept, dense.latency * dense.latency_kept
        else:
            now, kept = seconds_now, seconds_now / dense.latency
        goal = 1.0 - planner.budget.fraction_now(dense, now)
        if goal >= 1.0:  # already at the goal: nothing is due in this step
            result = _run(model, replace(planner, fixed=Plan({})), ignored, optimizers, verify, modes)[0]
            result.dense = replace(result.dense, latency=dense.latency, latency_kept=kept)
            return result

    cost.calibrate(reference, example_inputs, seconds_now, clock=settings.clock)  # the time the table lacks

    def attempt(keep: float) -> list[Any]:
        trial = copy.deepcopy(model)
        chooser = replace(planner, model=trial, cost=cost, keep=keep)
        return [trial, *_run(trial, chooser, ignored, [], verify, modes)]

    def measure(tried: list[Any]) -> float:
        tried.append(settings.compare(reference, tried[0], example_inputs))
        return 1.0 / tried[-1].ratio

    best, _, tries = search_latency(attempt, measure, goal, tolerance=settings.tolerance, rounds=settings.rounds)
    _, _, plan, left_alone, timing = best
    result = _run(model, replace(planner, fixed=plan), {**ignored, **left_alone}, optimizers, verify, modes)[0]
    seconds = dense.latency if dense is not None and dense.latency is not None else timing.dense.median
    result.dense = replace(result.dense, latency=seconds, latency_kept=kept / timing.ratio)
    result.latency = LatencyOutcome(goal, timing, tries)
    return result


def _cut_until_verified(
    model: nn.Module,
    example_inputs: ExampleInputs,
    choose: Callable[[DependencyGraph], Plan],
    ignored: dict[str, str],
    optimizers: list[torch.optim.Optimizer],
    verify: bool,
    modes: tuple[str, ...],
) -> tuple[DependencyGraph, Plan, list[Cut], int | None, dict[str, str]]:
    """Trace, plan and cut; if the cut model deviates from the plan, undo and retry with the culprit left whole: a
    fixed-size split around where it deviates keeps its sizes if there is one, else the culprit's class.

    Returns the graph, plan and cuts that held, the pruned model's MACs when verification counted them
    (None otherwise), and the modules left whole with their reasons.
    """
    left_alone: dict[str, str] = {}
    fixed_splits: set[str] = set()
    for _ in range(MAX_ATTEMPTS):
        trace = trace_model(model, example_inputs, modes, fixed_splits=fixed_splits)
        graph = group_trace(model, trace, {**ignored, **left_alone})
        plan = choose(graph)
        cuts = plan_cuts(graph, plan)
        undo = apply_cuts(model, cuts, optimizers, undoable=verify)
        if not verify or not cuts:
            return graph, plan, cuts, None, left_alone
        try:
            retrace = verify_pruned(model, example_inputs, graph, cuts, modes, fixed_splits)
            return graph, plan, cuts, retrace.macs, left_alone
        except PruningError as error:
            undo()
            splits = set(_suspect_splits(trace.split_sites, error.module)) - fixed_splits
            if splits:
                fixed_splits.update(splits)
            else:
                left_alone.update(_leave_alone(model, error, left_alone))
    raise VerificationError(f"gave up after {MAX_ATTEMPTS} attempts to find a plan that verifies.")


def _suspect_splits(sites: Mapping[str, set[str]], module: str | None) -> list[str]:
    """Sites of fixed-size splits, assumed to follow, that ran in ``module`` or around it: where a pruned model
    deviates inside them, the split's stale sizes are the first suspect (their channels then stay whole)."""
    if module is None:
        return []
    return [
        site
        for site, modules in sites.items()
        if any(module == where or module.startswith(where + ".") or where == "<model>" for where in modules)
    ]


def _leave_alone(model: nn.Module, error: PruningError, left_alone: Mapping[str, str]) -> dict[str, str]:
    """The modules to keep whole after ``error``: every module running the culprit's code; raises if none is new."""
    culprits = _same_code(model, error.module)
    if not culprits or set(culprits) <= set(left_alone):
        raise VerificationError(
            f"the pruned model deviates from the plan and was restored: {error} "
            "Add the module named here to `ignore`, and please report the model.",
            module=error.module,
        ) from error
    cause = error.__cause__ or error
    reason = f"whose code does not follow a pruned width ({type(cause).__name__}: {str(cause)[:160]})"
    return dict.fromkeys(culprits, reason)


def _same_code(model: nn.Module, path: str | None) -> list[str]:
    """Modules running the same code as the innermost user-defined module around ``path``.

    When a pruned module misbehaves (it derives a head size from its input width, say), every
    module of its class is left unpruned on the next attempt.
    """
    modules = dict(model.named_modules())
    while path and path in modules and type(modules[path]).__module__.startswith("torch.nn"):
        path = path.rpartition(".")[0]
    if not path or path not in modules:
        return []
    kind = type(modules[path])
    return [name for name, module in modules.items() if name and type(module) is kind]
