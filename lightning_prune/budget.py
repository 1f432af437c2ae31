"""How much to remove, said once against the dense model, and the plan that reaches a MACs or parameter goal.

``amount`` is always a cumulative fraction *of the dense model*: of its prunable channels
(``target="channels"``), of its MACs or of its parameters. A model pruned before carries a
:class:`DenseSize` (returned by every pruning call as ``result.dense``): pass it back and the engine works
out what the current, smaller model must still lose; callers never convert amounts.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

from torch import Tensor, nn

from lightning_prune.errors import PruningError
from lightning_prune.graph.groups import DependencyGraph
from lightning_prune.measure import count_macs, count_params
from lightning_prune.planning import plan_cuts
from lightning_prune.running import ExampleInputs, meta_clone, to_device
from lightning_prune.selection import Plan, SelectionOptions, check_amount, select
from lightning_prune.surgery import apply_cuts

TARGETS = ("channels", "macs", "params", "latency")
MOST = 0.999  # the largest fraction of the current model one step asks for


@dataclass(frozen=True)
class DenseSize:
    """The size of a model before its first pruning step, and how many of its prunable units left it since.

    ``units`` are prunable channels (or, for depth pruning, blocks of the block stack); ``removed`` counts
    those gone in all steps so far; ``latency`` is the dense model's measured seconds per forward where a
    ``target="latency"`` step timed it, and ``latency_kept`` the model's measured time now over the dense
    model's: the product of every latency step's ratio, each timed against the model before it in turns (so
    that a machine running faster or slower between steps does not move the goal). Plain data: it lives in
    callback state and checkpoints.
    """

    params: int
    macs: int
    units: int
    removed: int = 0
    latency: float | None = None
    latency_kept: float | None = None

    def after(self, removed: int) -> DenseSize:
        """This size with ``removed`` more units gone."""
        return replace(self, removed=self.removed + removed)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], removed: int = 0) -> DenseSize:
        """Also reads the shapes 0.1 wrote: ``{"channels"|"blocks": n, "params", "macs"}`` (``removed`` apart)."""
        units = data.get("units", data.get("channels", data.get("blocks")))
        if units is None or "params" not in data or "macs" not in data:
            raise PruningError(f"a dense size needs `params`, `macs` and `units`; got {dict(data)}.")
        seconds, kept = data.get("latency"), data.get("latency_kept")
        return cls(
            int(data["params"]),
            int(data["macs"]),
            int(units),
            int(data.get("removed", removed)),
            None if seconds is None else float(seconds),
            None if kept is None else float(kept),
        )


@dataclass(frozen=True)
class Budget:
    """Remove ``amount`` (cumulative, relative to the dense model) of its ``target``; validated on construction."""

    amount: float
    target: str = "channels"

    def __post_init__(self) -> None:
        check_amount(self.amount)
        if self.target not in TARGETS:
            raise PruningError(f"`target` must be one of {', '.join(TARGETS)}; got {self.target!r}.")

    def fraction_now(self, dense: DenseSize | None, current: float) -> float:
        """The fraction of the current model's ``target`` to remove in this step.

        ``current`` is the current model's parameters or MACs (unused for channels, whose progress
        ``dense.removed`` counts), or its measured seconds for latency. Without ``dense`` (or, for latency,
        without its ``latency``) the current model is the dense one.
        """
        if dense is None or (self.target == "latency" and dense.latency is None):
            return self.amount
        if self.target == "channels":
            left = dense.units - dense.removed
            fraction = (self.amount * dense.units - dense.removed) / max(left, 1)
        else:
            reference = {"params": dense.params, "macs": dense.macs, "latency": dense.latency}[self.target]
            fraction = 1.0 - (1.0 - self.amount) * reference / current if current > 0 else 0.0
        return min(max(0.0, fraction), MOST)


def _measure(model: nn.Module, cuts: list, example_inputs: ExampleInputs, target: str) -> int:
    clone = meta_clone(model)
    apply_cuts(clone, cuts)
    return count_params(clone) if target == "params" else count_macs(clone, to_device(example_inputs, "meta"))


def plan_for_goal(
    model: nn.Module,
    graph: DependencyGraph,
    scores: Sequence[Tensor | None],
    example_inputs: ExampleInputs,
    target: str,
    goal: int,
    selection: SelectionOptions,
) -> Plan:
    """The plan of the smallest channel fraction that brings ``target`` (params or MACs) to at most ``goal``.

    Bisects over the fraction; each candidate is measured on a meta copy of the model (no memory, no kernels).
    """
    low, high = 0.0, MOST
    best: Plan | None = None
    reached = None
    for _ in range(16):
        middle = (low + high) / 2
        plan = select(graph.groups, scores, middle, selection)
        value = _measure(model, plan_cuts(graph, plan), example_inputs, target)
        if value <= goal:
            best, high = plan, middle
        else:
            low = middle
            reached = value
    if best is None:
        plan = select(graph.groups, scores, high, selection)
        value = _measure(model, plan_cuts(graph, plan), example_inputs, target)
        if value > goal:
            raise PruningError(
                f"`target={target!r}` cannot reach {goal:,}: removing everything the constraints allow leaves "
                f"{value:,} (last try {reached}). Lower `amount`, raise `max_fraction` or shrink `ignore`."
            )
        best = plan
    return best
