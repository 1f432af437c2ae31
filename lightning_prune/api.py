"""``prune``: trace → score → select → cut → verify, in one call."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lightning_prune.errors import PruningError, VerificationError
from lightning_prune.graph.groups import DependencyGraph, group_trace, match_modules, tensor_owners
from lightning_prune.graph.tracer import ExampleInputs, record
from lightning_prune.importance import Criterion, ScoringContext, get_criterion, needs_gradients, score
from lightning_prune.measure import count_macs, count_params, meta_clone, to_device
from lightning_prune.record import new_record
from lightning_prune.selection import Plan, check_selection_arguments, select
from lightning_prune.statistics import collect_statistics
from lightning_prune.surgery import Cut, apply_cuts, plan_cuts
from lightning_prune.verify import verify_pruned

TARGETS = ("channels", "macs", "params")
MAX_ATTEMPTS = 6


@dataclass
class LayerChange:
    module: str
    tensor: str
    before: int
    after: int


@dataclass
class PruningResult:
    """What one pruning call did. ``record`` replays it on a fresh dense model (:func:`restore`)."""

    record: dict[str, Any]
    params_before: int
    params_after: int
    macs_before: int
    macs_after: int
    layers: list[LayerChange]
    unprunable: dict[str, str]
    channels_before: int
    channels_removed: int
    graph: DependencyGraph = field(repr=False)

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


def _measure(model: nn.Module, cuts: list[Cut], example_inputs: ExampleInputs, target: str) -> int:
    clone = meta_clone(model)
    apply_cuts(clone, cuts)
    return count_params(clone) if target == "params" else count_macs(clone, to_device(example_inputs, "meta"))


def _search(
    model: nn.Module,
    graph: DependencyGraph,
    scores: list,
    example_inputs: ExampleInputs,
    target: str,
    goal: int,
    selection: Mapping[str, Any],
) -> Plan:
    """Smallest channel fraction whose plan brings ``target`` (params or MACs) to at most ``goal``."""
    low, high = 0.0, 0.999
    best: Plan | None = None
    reached = None
    for _ in range(16):
        middle = (low + high) / 2
        plan = select(graph.groups, scores, middle, **selection)
        value = _measure(model, plan_cuts(graph, plan), example_inputs, target)
        if value <= goal:
            best, high = plan, middle
        else:
            low = middle
            reached = value
    if best is None:
        plan = select(graph.groups, scores, high, **selection)
        value = _measure(model, plan_cuts(graph, plan), example_inputs, target)
        if value > goal:
            raise PruningError(
                f"`target={target!r}` cannot reach {goal:,}: removing everything the constraints allow leaves "
                f"{value:,} (last try {reached}). Lower `amount`, raise `max_fraction` or shrink `ignore`."
            )
        best = plan
    return best


def prune(
    model: nn.Module,
    example_inputs: ExampleInputs,
    amount: float,
    importance: str | Criterion = "l1",
    *,
    scope: str = "global",
    ignore: Iterable[str] = (),
    round_to: int = 1,
    target: str = "channels",
    max_fraction: float = 0.9,
    normalize: str = "mean",
    aggregate: str = "sum",
    seed: int = 0,
    optimizers: Iterable[torch.optim.Optimizer] = (),
    statistics: Mapping[str, Any] | None = None,
    batches: Iterable[Any] | None = None,
    loss_fn: Callable[[nn.Module, Any], torch.Tensor] | None = None,
    verify: bool = True,
    modes: Iterable[str] = ("train", "eval"),
) -> PruningResult:
    """Remove the least important structures of ``model`` in place, leaving a smaller dense model.

    Args:
        model: any ``nn.Module``; its parameters stay the same objects, with smaller data.
        example_inputs: a tensor, a tuple of positional inputs or a dict of keyword inputs, used to
            trace the model (a batch of 2 or more if the model has BatchNorm).
        amount: with ``target="channels"``, the fraction of prunable channels to remove; with
            ``target="macs"`` or ``"params"``, the fraction of the model's MACs or parameters to remove
            (``amount=0.5`` with ``target="macs"`` prunes until MACs ≤ 50% of what they were).
        importance: a criterion name (``"l1"``, ``"l2"``, ``"bn_scale"``, ``"taylor"``, ``"fisher"``,
            ``"fpgm"``, ``"random"``) or a callable ``criterion(group, context) -> scores``.
        scope: ``"global"`` ranks all channels together, ``"local"`` removes ``amount`` of every group.
        ignore: module names or glob patterns whose parameters keep their shapes.
        round_to: widths that remain are multiples of this.
        max_fraction: at most this fraction of any group is removed.
        normalize: how global ranking makes groups comparable (``"mean"``, ``"max"``, ``"sum"``, ``"none"``).
        aggregate: how a group's producers' scores combine (``"sum"``, ``"mean"``, ``"max"``).
        seed: seed of the ``"random"`` criterion.
        optimizers: optimizers whose per-parameter state (momentum, Adam moments) is sliced alike.
        statistics: gradient statistics accumulated elsewhere (see :mod:`lightning_prune.statistics`).
        batches: for gradient criteria (``"taylor"``, ``"fisher"``) without ``statistics``: an iterable of
            batches to run forward and backward on before scoring.
        loss_fn: ``loss_fn(model, batch) -> scalar loss`` for those calibration passes.
        verify: re-trace the pruned model and roll back if it deviates from the plan.
        modes: modes to trace in; both by default so training-only branches are covered.

    Returns:
        A :class:`PruningResult` with the plain-data ``record`` and params/MACs before and after.

    Raises:
        PruningError: bad arguments (before anything runs), untraceable model or inputs; the model
            is left unchanged.
    """
    check_selection_arguments(amount, scope, round_to, max_fraction, normalize)
    if target not in TARGETS:
        raise PruningError(f"`target` must be one of {', '.join(TARGETS)}; got {target!r}.")
    criterion = get_criterion(importance, aggregate=aggregate, seed=seed)
    if needs_gradients(criterion) and statistics is None and (batches is None or loss_fn is None):
        missing = " and ".join(f"`{n}`" for n, v in (("batches", batches), ("loss_fn", loss_fn)) if v is None)
        raise PruningError(
            f"`importance={importance!r}` is a gradient criterion and needs {missing}: pass `batches` (an iterable "
            "of batches) and `loss_fn(model, batch) -> scalar loss`, or precomputed `statistics`."
        )
    ignored = dict.fromkeys(match_modules(model, ignore), "which is listed in `ignore`")
    optimizers = list(optimizers)
    modes = tuple(modes)
    selection = {"scope": scope, "round_to": round_to, "max_fraction": max_fraction, "normalize": normalize}
    params_before = count_params(model)
    macs_before: int | None = None
    left_alone: dict[str, str] = {}
    for _ in range(MAX_ATTEMPTS):
        graph = group_trace(model, record(model, example_inputs, modes), {**ignored, **left_alone})
        if macs_before is None:
            macs_before = graph.trace.macs if graph.trace.macs is not None else count_macs(model, example_inputs)
        if needs_gradients(criterion) and statistics is None:
            statistics = collect_statistics(model, graph, batches, loss_fn)
        scores = score(graph.groups, ScoringContext(model, statistics or {}), criterion)
        if target == "channels" or amount == 0:
            plan = select(graph.groups, scores, amount, **selection)
        else:
            dense = params_before if target == "params" else macs_before
            plan = _search(model, graph, scores, example_inputs, target, int((1 - amount) * dense), selection)
        cuts = plan_cuts(graph, plan)
        undo = apply_cuts(model, cuts, optimizers, undoable=verify)
        macs_after = None if cuts else macs_before
        if not verify or not cuts:
            break
        try:
            macs_after = verify_pruned(model, example_inputs, graph, cuts, modes).macs
            break
        except PruningError as error:
            undo()
            culprits = _same_code(model, error.module)
            if not culprits or set(culprits) <= set(left_alone):
                raise VerificationError(
                    f"the pruned model deviates from the plan and was restored: {error} "
                    "Add the module named here to `ignore`, and please report the model.",
                    module=error.module,
                ) from error
            cause = error.__cause__ or error
            reason = f"whose code does not follow a pruned width ({type(cause).__name__}: {str(cause)[:160]})"
            left_alone.update(dict.fromkeys(culprits, reason))
    else:
        raise VerificationError(f"gave up after {MAX_ATTEMPTS} attempts to find a plan that verifies.")
    return PruningResult(
        new_record([cuts]),
        params_before,
        count_params(model),
        macs_before,
        macs_after if macs_after is not None else _count_macs_cheaply(model, example_inputs),
        _layer_changes(model, cuts, graph),
        {**graph.unprunable, **left_alone},
        sum(g.width for g in graph.groups),
        plan.count,
        graph,
    )


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
