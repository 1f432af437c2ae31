"""Whole experts of a mixture of experts, removed with their router rows, scored by how the router uses them.

An expert is a structural unit of its own: index ``e`` of every tensor of the experts module whose first
dimension counts the experts (``gate_up_proj``, ``down_proj``, biases) and row ``e`` of the router (its weight,
a bias). Removing it is a cut of dimension 0 of each, so it is recorded, replayed and saved like any cut; the
layers' fixups set the expert count (and cap the experts each token picks) and the config follows.

Scores, lowest removed first, per MoE layer:

- ``"frequency"``: the share of calibration tokens that pick the expert among their top-k;
- ``"weight"``: its mean routing weight over all tokens (0 where a token does not pick it);
- ``"l1"``: the L1 norm of the expert's weights and its router row.

The model is found by structure, never by family name: a module holding 3-D ``gate_up_proj`` / ``down_proj``
parameters (``(experts, ...)``) and a sibling router whose weight has one row per expert. Every layer loses the
same number of experts, so that one config value still describes them all.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from lightning_prune.api import LayerChange
from lightning_prune.budget import DenseSize
from lightning_prune.cuts import Cut, Step
from lightning_prune.errors import PruningError
from lightning_prune.measure import count_macs, count_params
from lightning_prune.methods.base import METHODS
from lightning_prune.methods.depth_methods import batches_from, collect_batches
from lightning_prune.record import new_record
from lightning_prune.running import ExampleInputs, observe
from lightning_prune.surgery import apply_cuts

SCORES = ("frequency", "weight", "l1")


@dataclass(frozen=True)
class ExpertLayer:
    """One MoE layer: the path of its experts module and of its router, and how many experts it has."""

    experts: str
    router: str
    count: int


@dataclass
class ExpertPruningResult:
    """What :func:`prune_experts` removed: per experts module, the expert indices removed and every expert's score."""

    record: dict[str, Any]
    params_before: int
    params_after: int
    removed: dict[str, list[int]] = field(default_factory=dict)
    scores: dict[str, list[float]] = field(default_factory=dict)
    macs_before: int = 0  # measured by the scheduled step (``StructuredPruning(structure="experts")``), on its inputs
    macs_after: int = 0
    dense: DenseSize | None = None  # units: experts per layer

    @property
    def layers(self) -> list[LayerChange]:
        """Each experts module's expert count, before → after."""
        return [
            LayerChange(n, "experts", len(self.scores[n]), len(self.scores[n]) - len(r))
            for n, r in self.removed.items()
            if r
        ]

    def __str__(self) -> str:
        kept = {len(s) - len(self.removed[name]) for name, s in self.scores.items()}
        return (
            f"removed {sum(map(len, self.removed.values()))} experts from {len(self.removed)} MoE layers "
            f"({sorted(kept)} left each): params {self.params_before:,} -> {self.params_after:,}"
        )


def _stacked(module: nn.Module) -> int | None:
    """The expert count of a module holding ``(experts, ...)`` ``gate_up_proj`` / ``down_proj``; None otherwise."""
    tensors = [getattr(module, name, None) for name in ("gate_up_proj", "down_proj")]
    if all(isinstance(t, nn.Parameter) and t.ndim == 3 for t in tensors) and tensors[0].shape[0] == tensors[1].shape[0]:
        return tensors[0].shape[0]
    return None


def find_expert_layers(model: nn.Module) -> list[ExpertLayer]:
    """Every MoE layer of ``model``: an experts module and the sibling module with one weight row per expert."""
    found = []
    for name, module in model.named_modules():
        count = _stacked(module)
        if count is None or not name:
            continue
        parent_path = name.rpartition(".")[0]
        parent = model.get_submodule(parent_path)
        routers = [
            child
            for child, sibling in parent.named_children()
            if sibling is not module and getattr(getattr(sibling, "weight", None), "shape", (None,))[0] == count
        ]
        if len(routers) == 1:
            found.append(ExpertLayer(name, f"{parent_path}.{routers[0]}" if parent_path else routers[0], count))
    return found


def routing_statistics(
    model: nn.Module, layers: list[ExpertLayer], calibration: Iterable[Any]
) -> dict[str, tuple[Tensor, Tensor]]:
    """Per experts module: the share of tokens that pick each expert, and each expert's mean routing weight.

    Read from what the experts module receives, ``(hidden_states, top_k_index, top_k_weights)``: the routing
    the model really runs, whatever its router computes.
    """
    picked = {layer.experts: torch.zeros(layer.count, dtype=torch.float64) for layer in layers}
    weight = {layer.experts: torch.zeros(layer.count, dtype=torch.float64) for layer in layers}
    tokens = dict.fromkeys(picked, 0)

    def hook(name: str, count: int):
        def record(module: nn.Module, args: tuple, kwargs: dict) -> None:
            index = kwargs.get("top_k_index", args[1] if len(args) > 1 else None)
            values = kwargs.get("top_k_weights", args[2] if len(args) > 2 else None)
            if not isinstance(index, Tensor) or not isinstance(values, Tensor) or index.shape != values.shape:
                raise PruningError(
                    f"`{name}` was not called as experts(hidden_states, top_k_index, top_k_weights): cannot read "
                    "its routing; score its experts with `score='l1'`."
                )
            index, values = index.reshape(-1, index.shape[-1]).cpu(), values.reshape(-1, index.shape[-1]).cpu()
            valid = (index >= 0) & (index < count)
            picked[name] += torch.bincount(index[valid], minlength=count)[:count].double()
            weight[name].index_add_(0, index[valid], values[valid].double())
            tokens[name] += index.shape[0]

        return record

    handles = [
        model.get_submodule(layer.experts).register_forward_pre_hook(hook(layer.experts, layer.count), with_kwargs=True)
        for layer in layers
    ]
    observe(model, calibration, handles)
    if not all(tokens.values()):
        raise PruningError("`calibration` routed no tokens through the experts: pass a non-empty list of batches.")
    return {name: (picked[name] / tokens[name], weight[name] / tokens[name]) for name in picked}


def _l1(model: nn.Module, layer: ExpertLayer) -> Tensor:
    total = torch.zeros(layer.count, dtype=torch.float64)
    for tensor in _expert_tensors(model, layer).values():
        total += tensor.detach().abs().reshape(layer.count, -1).sum(1).double().cpu()
    return total


def _expert_tensors(model: nn.Module, layer: ExpertLayer) -> dict[str, Tensor]:
    """Every parameter and buffer whose dimension 0 indexes this layer's experts."""
    found = {}
    for path in (layer.experts, layer.router):
        module = model.get_submodule(path)
        for name, tensor in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
            if tensor is not None and tensor.ndim and tensor.shape[0] == layer.count:
                found[f"{path}.{name}"] = tensor
    return found


def prune_experts(
    model: nn.Module,
    calibration: Iterable[Any] | None = None,
    amount: float | None = None,
    *,
    count: int | None = None,
    score: str = "frequency",
    optimizers: Iterable[torch.optim.Optimizer] = (),
) -> ExpertPruningResult:
    """Remove the lowest-scoring experts of every MoE layer of ``model`` in place, each with its router row.

    Args:
        model: a model with mixture-of-experts layers (Mixtral, Qwen3-MoE: experts stored as 3-D tensors).
        calibration: batches (model inputs) to route, for ``score="frequency"`` or ``"weight"``.
        amount: the fraction of each layer's experts to remove (rounded down); or give ``count``.
        count: how many experts each layer loses.
        score: ``"frequency"``, ``"weight"`` or ``"l1"`` (see the module doc).
        optimizers: optimizers whose state is sliced alike.

    Returns:
        An :class:`ExpertPruningResult` with the plain-data ``record`` (``lightning_prune.restore`` replays it).

    Raises:
        PruningError: bad arguments, or no MoE layer found; the model is left unchanged.

    Warns:
        UserWarning: where fewer experts remain than each token picks: the router then picks all of them.
    """
    if score not in SCORES:
        raise PruningError(f"`score` must be one of {', '.join(SCORES)}; got {score!r}.")
    if (amount is None) == (count is None):
        raise PruningError(f"give exactly one of `amount` and `count`; got amount={amount!r}, count={count!r}.")
    if amount is not None and not (isinstance(amount, int | float) and 0 <= amount < 1):
        raise PruningError(f"`amount` is the fraction of each layer's experts to remove, in [0, 1); got {amount!r}.")
    layers = find_expert_layers(model)
    if not layers:
        raise PruningError(
            f"{type(model).__name__} has no mixture-of-experts layer (a module with 3-D `gate_up_proj` and "
            "`down_proj` parameters and a sibling router with one weight row per expert)."
        )
    experts = {layer.count for layer in layers}
    if len(experts) > 1:
        raise PruningError(f"MoE layers of {type(model).__name__} have different expert counts {sorted(experts)}.")
    total = experts.pop()
    removed_count = math.floor(amount * total + 1e-9) if amount is not None else count
    if isinstance(removed_count, bool) or not isinstance(removed_count, int) or not 0 <= removed_count < total:
        raise PruningError(
            f"`count` must be an integer in [0, {total}) (each layer has {total} experts); got {count!r}."
        )
    if score != "l1" and calibration is None:
        raise PruningError(f"`score={score!r}` reads the router on `calibration` batches: pass them, or use 'l1'.")
    statistics = routing_statistics(model, layers, calibration) if score != "l1" else {}
    params_before = count_params(model)
    cuts: list[Cut] = []
    result = ExpertPruningResult({}, params_before, params_before)
    for layer in layers:
        values = _l1(model, layer) if score == "l1" else statistics[layer.experts][0 if score == "frequency" else 1]
        gone = sorted(torch.argsort(values, stable=True)[:removed_count].tolist())
        keep = [e for e in range(total) if e not in gone]
        result.removed[layer.experts], result.scores[layer.experts] = gone, values.tolist()
        cuts.extend(Cut(name, 0, total, keep) for name in sorted(_expert_tensors(model, layer)))
    picks = {getattr(model.get_submodule(layer.router), "top_k", 0) for layer in layers}
    if removed_count and max(picks) > total - removed_count:
        warnings.warn(
            f"each token picks {max(picks)} experts and {total - removed_count} remain per layer: the router now "
            "picks all of them (`num_experts_per_tok` follows).",
            UserWarning,
            stacklevel=2,
        )
    if cuts and removed_count:
        apply_cuts(model, cuts, list(optimizers))
    result.record = new_record([Step(cuts if removed_count else [])])
    result.params_after = count_params(model)
    return result


class ExpertDropping:
    """Whole experts as a scheduled step (``StructuredPruning(structure="experts")``): each step removes experts until
    ``amount`` of each MoE layer's experts in the dense model are gone.

    Args:
        score: ``"frequency"``, ``"weight"`` or ``"l1"`` (see :func:`prune_experts`).
        calibration_batches: the callback's; when set, the router is read on that many training batches, otherwise
            on the example inputs.
    """

    def __init__(self, score: str = "frequency", calibration_batches: int = 0) -> None:
        if score not in SCORES:
            raise PruningError(f"`score` for structure='experts' must be one of {', '.join(SCORES)}; got {score!r}.")
        self.score = score
        self.needs_gradients = bool(calibration_batches) and score != "l1"  # the batches themselves (collect)
        self.collect = collect_batches

    def to_dict(self) -> dict[str, Any]:
        return {"score": self.score}

    def check(self, model: nn.Module, example_inputs: ExampleInputs | None) -> None:
        if not find_expert_layers(model):
            raise PruningError(f"structure='experts': {type(model).__name__} has no mixture-of-experts layer.")

    def step(
        self,
        model: nn.Module,
        example_inputs: ExampleInputs,
        amount: float,
        dense: DenseSize | None,
        *,
        optimizers: Iterable[torch.optim.Optimizer] = (),
        statistics: Mapping[str, Any] | None = None,
    ) -> ExpertPruningResult:
        self.check(model, example_inputs)
        total = find_expert_layers(model)[0].count
        units, gone = (dense.units, dense.removed) if dense else (total, 0)
        due = max(math.floor(amount * units + 1e-9) - gone, 0)
        calibration = batches_from(statistics, "structure='experts'") if self.needs_gradients else [example_inputs]
        macs_before = count_macs(model, example_inputs)
        result = prune_experts(model, calibration, count=due, score=self.score, optimizers=optimizers)
        result.macs_before, result.macs_after = macs_before, count_macs(model, example_inputs)
        result.dense = (dense or DenseSize(result.params_before, macs_before, total)).after(due)
        return result


METHODS.register("experts", ExpertDropping)
