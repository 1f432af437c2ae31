"""Channel pruning (the default method): coupled channels, heads, neurons and the stream, scored and cut.

One step is one call of :func:`lightning_prune.prune` with the budget relative to the dense model.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from lightning_prune.api import PruningResult, prune
from lightning_prune.budget import TARGETS, DenseSize
from lightning_prune.errors import PruningError
from lightning_prune.graph.groups import build_graph, match_modules
from lightning_prune.importance import get_criterion, needs_gradients
from lightning_prune.latency import LatencySettings
from lightning_prune.methods.base import METHODS
from lightning_prune.running import ExampleInputs
from lightning_prune.selection import SelectionOptions
from lightning_prune.statistics import Statistics


class ChannelPruning:
    """Prune the weakest channels by ``importance``; ``amount`` is a fraction of the dense model's ``target``.

    Args:
        importance: a criterion name (see :func:`lightning_prune.prune`).
        target: ``"channels"``, ``"macs"``, ``"params"`` or ``"latency"``.
        selection: how elements are chosen (:class:`~lightning_prune.SelectionOptions`).
        ignore, aggregate, seed, verify: as in :func:`lightning_prune.prune`.
        latency: how ``target="latency"`` times: :class:`~lightning_prune.latency.LatencySettings`, or a mapping
            of its plain values (``{"rounds": 3, "min_run_time": 0.5}``, what a yaml file gives).
    """

    def __init__(
        self,
        importance: str = "l1",
        target: str = "channels",
        selection: SelectionOptions | None = None,
        ignore: Sequence[str] = (),
        aggregate: str = "sum",
        seed: int = 0,
        verify: bool = True,
        latency: LatencySettings | Mapping[str, Any] | None = None,
    ) -> None:
        if target not in TARGETS:
            raise PruningError(f"`target` must be one of {', '.join(TARGETS)}; got {target!r}.")
        if isinstance(ignore, str):
            raise PruningError(f"`ignore` is a list of module names or glob patterns; got the string {ignore!r}.")
        criterion = get_criterion(importance, aggregate=aggregate, seed=seed)
        self.needs_gradients = needs_gradients(criterion)
        # statistics of the criterion's own kind come from calibration batches; None: observed in training too
        self.collect: Callable[..., Statistics] | None = getattr(criterion, "collect", None)
        self.importance, self.target, self.selection = importance, target, selection or SelectionOptions()
        self.ignore, self.aggregate, self.seed, self.verify = list(ignore), aggregate, seed, verify
        if latency is not None and not isinstance(latency, LatencySettings | Mapping):
            raise PruningError(
                f"`latency` must be a LatencySettings or a mapping of its plain values, got {type(latency).__name__}."
            )
        self.latency = latency if isinstance(latency, LatencySettings) else LatencySettings.from_dict(latency or {})

    def to_dict(self) -> dict[str, Any]:
        return {
            "importance": self.importance, "target": self.target, **self.selection.to_dict(), "ignore": self.ignore,
            "aggregate": self.aggregate, "seed": self.seed, "verify": self.verify, "latency": self.latency.to_dict(),
        }  # fmt: skip

    def check(self, model: nn.Module, example_inputs: ExampleInputs | None) -> None:
        match_modules(model, self.ignore)
        if self.importance == "bn_scale" and not any(
            isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()
        ):
            raise PruningError(
                f"`importance='bn_scale'` scores channels by BatchNorm scales, but {type(model).__name__} has "
                "no BatchNorm layer. Choose another criterion, e.g. 'l1'."
            )
        if example_inputs is not None:
            graph = build_graph(model, example_inputs, ignore=self.ignore)
            if not graph.groups:
                reasons = "; ".join(f"{k}: {v}" for k, v in list(graph.unprunable.items())[:5])
                raise PruningError(f"StructuredPruning found nothing prunable in {type(model).__name__} ({reasons}).")

    def step(
        self,
        model: nn.Module,
        example_inputs: ExampleInputs,
        amount: float,
        dense: DenseSize | None,
        *,
        optimizers: Iterable[torch.optim.Optimizer] = (),
        statistics: Mapping[str, Any] | None = None,
    ) -> PruningResult:
        return prune(
            model,
            example_inputs,
            amount,
            self.importance,
            target=self.target,
            dense=dense,
            ignore=self.ignore,
            aggregate=self.aggregate,
            seed=self.seed,
            optimizers=optimizers,
            statistics=statistics,
            verify=self.verify,
            latency=self.latency,
            **self.selection.to_dict(),
        )


METHODS.register("channels", ChannelPruning)
