"""Retraining-free structured baselines from activations: Wanda-sp and FLAP (An et al., AAAI 2024).

Both score a head or an FFN neuron by the input channels it feeds into its output projection (``o_proj``,
``down_proj``: the "in" slots of the group), from statistics of those inputs over calibration windows,
gathered by forward hooks in float64 with memory that does not grow with the number of windows:

- Wanda-sp: ``Σ_i |W_ij| · ‖X_j‖₂`` per input channel ``j``, summed over the element; a uniform ratio per layer.
- FLAP: the fluctuation ``Var_tokens(X_j) · ‖W_{:, j}‖²``, standardised per module type (all attention
  outputs together, all MLP outputs together) so that one global threshold compares layers and kinds; the
  removed channels' mean contribution is then added to the projection's bias (``compensate``), which is
  what keeps the model working without retraining.

A Llama-style projection has no bias. Compensation gives it one, and so that the result still saves and
reloads as a stock model, every linear layer of the attention and MLP blocks gets a (zero) bias and the
config's ``attention_bias``/``mlp_bias`` are set: ``from_pretrained`` then rebuilds exactly this model.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lightning_prune.api import PruningResult, prune
from lightning_prune.budget import DenseSize
from lightning_prune.cuts import Cut
from lightning_prune.errors import PruningError
from lightning_prune.graph.groups import DependencyGraph, Group, build_graph, match_modules
from lightning_prune.importance import CRITERIA, ScoringContext, aggregate_members
from lightning_prune.language import check_windows
from lightning_prune.methods.base import METHODS
from lightning_prune.methods.llm_pruner import left_whole
from lightning_prune.record import new_record, parse_record
from lightning_prune.running import observe, tensor_owners
from lightning_prune.selection import SelectionOptions
from lightning_prune.statistics import Statistics


def _consumers(model: nn.Module, graph: DependencyGraph) -> dict[str, nn.Linear]:
    """The linear layers whose input channels are the elements of some group ("in" slots of a weight)."""
    owners, found = tensor_owners(model), {}
    for group in graph.groups:
        for member in group.members_with_role("in"):
            path = (owners.get(member.slot.tensor) or [None])[0]
            module = model.get_submodule(path) if path is not None else None
            if isinstance(module, nn.Linear) and member.slot.tensor == f"{path}.weight":
                found[member.slot.tensor] = module
    return found


def collect_activations(model: nn.Module, graph: DependencyGraph, batches: Iterable[Any]) -> Statistics:
    """``{"activations": {weight: {"sum", "squares", "count"}}}``: per input channel of every consumer in ``graph``,
    over every token of ``batches`` (model inputs), in float64. A model whose groups feed no linear layer gets
    no statistics, and the criteria then score no group."""
    consumers = _consumers(model, graph)
    sums = {name: torch.zeros(m.in_features, dtype=torch.float64) for name, m in consumers.items()}
    squares = {name: torch.zeros(m.in_features, dtype=torch.float64) for name, m in consumers.items()}
    counts = dict.fromkeys(consumers, 0)

    def hook(name: str):
        def observe(module: nn.Module, inputs: tuple) -> None:
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).to("cpu", torch.float64)
            sums[name] += x.sum(0)
            squares[name] += x.square().sum(0)
            counts[name] += x.shape[0]

        return observe

    handles = [module.register_forward_pre_hook(hook(name)) for name, module in consumers.items()]
    observe(model, batches, handles)
    if consumers and not any(counts.values()):
        raise PruningError("`calibration` reached no output projection: nothing to score heads and neurons by.")
    stats = {name: {"sum": sums[name], "squares": squares[name], "count": counts[name]} for name in consumers}
    return {"activations": stats}


def _channel_scores(kind: str, weight: Tensor, stats: dict[str, Any]) -> Tensor:
    weight = weight.detach().to("cpu", torch.float64)
    count = max(stats["count"], 2)
    if kind == "wanda_sp":
        return weight.abs().sum(0) * stats["squares"].sqrt()
    mean = stats["sum"] / count
    variance = (stats["squares"] - count * mean.square()) / (count - 1)
    return variance.clamp(min=0) * weight.square().sum(0)


@dataclass
class ActivationImportance:
    """Wanda-sp (``kind="wanda_sp"``) or FLAP's fluctuation (``kind="flap"``) of each element of a group.

    FLAP's standardisation per module type uses ``statistics["standardize"]`` (see :func:`flap`)."""

    kind: str = "wanda_sp"
    needs_gradients: bool = True  # it needs statistics of calibration batches, of its own kind (collect)
    needs_loss: bool = False  # forward passes only

    def collect(
        self, model: nn.Module, graph: DependencyGraph, batches: Iterable[Any], loss_fn: Any = None
    ) -> Statistics:
        """Activation statistics over ``batches`` (model inputs; no loss is needed), and for FLAP the mean and
        standard deviation of the raw scores of each module type, for standardisation."""
        statistics = collect_activations(model, graph, batches)
        if self.kind == "flap":
            raw: dict[str, list[Tensor]] = {}
            context = ScoringContext(model, statistics)
            for group in graph.groups:
                values = self(group, context)
                if values is not None:
                    raw.setdefault(_kind_of(group, statistics["activations"]), []).append(values)
            statistics["standardize"] = {
                kind: (torch.cat(v).mean(), torch.cat(v).std().clamp(min=1e-12)) for kind, v in raw.items()
            }
        return statistics

    def __call__(self, group: Group, context: ScoringContext) -> Tensor | None:
        activations = context.statistics.get("activations")
        if activations is None:
            raise PruningError(f"`importance={self.kind!r}` needs activation statistics: use lp.{self.kind}(...).")
        values = [
            (member, _channel_scores(self.kind, context.tensor(member.slot.tensor), activations[member.slot.tensor]))
            for member in group.members_with_role("in")
            if member.slot.tensor in activations
        ]
        if not values:
            return None
        scores = aggregate_members(group, values, "sum")
        moments = context.statistics.get("standardize", {}).get(_kind_of(group, activations))
        return scores if moments is None else (scores - moments[0]) / moments[1]


def _kind_of(group: Group, activations: dict[str, Any]) -> str:
    """A group's module type: the leaf names of the projections it feeds (``o_proj``, ``down_proj`` ...)."""
    leaves = {m.slot.tensor.rsplit(".", 2)[-2] for m in group.members_with_role("in") if m.slot.tensor in activations}
    return "+".join(sorted(leaves))


CRITERIA.register("wanda_sp", lambda **_: ActivationImportance("wanda_sp"))
CRITERIA.register("flap", lambda **_: ActivationImportance("flap"))


def _prepare(
    model: nn.Module, calibration: Tensor, first: int, last: int | None, stream: bool, ignore: Sequence[str]
) -> tuple[dict[str, Any], list[str], list[dict[str, Any]]]:
    if not isinstance(calibration, Tensor) or calibration.ndim != 2 or calibration.shape[1] < 2:
        shape = tuple(calibration.shape) if isinstance(calibration, Tensor) else type(calibration).__name__
        raise PruningError(f"`calibration` must be (count, tokens ≥ 2) token ids, got {shape}.")
    try:
        check_windows(model, calibration, "calibration")
    except ValueError as error:
        raise PruningError(str(error)) from error
    example = {"input_ids": calibration[:1], "use_cache": False}
    return (
        example,
        left_whole(model, first, last, stream, ignore),
        [{"input_ids": window[None], "use_cache": False} for window in calibration],
    )


def wanda_sp(
    model: nn.Module, calibration: Tensor, amount: float, *, target: str = "channels", first: int = 0,
    last: int | None = None, stream: bool = False, ignore: Sequence[str] = (),
) -> PruningResult:  # fmt: skip
    """Wanda-sp: remove ``amount`` of every layer's heads and FFN neurons by ``Σ|W|·‖X‖`` (see the module doc).

    ``calibration`` is ``(count, tokens)`` token ids; ``target``, ``first``, ``last``, ``stream``, ``ignore`` as in
    :func:`lightning_prune.llm_pruner`.
    """
    example, left, batches = _prepare(model, calibration, first, last, stream, ignore)
    return prune(model, example, amount, ActivationImportance("wanda_sp"), target=target, scope="local", ignore=left,
                 batches=batches)  # fmt: skip


def flap(
    model: nn.Module, calibration: Tensor, amount: float, *, compensate: bool = True, target: str = "channels",
    first: int = 0, last: int | None = None, stream: bool = False, ignore: Sequence[str] = (),
) -> PruningResult:  # fmt: skip
    """FLAP: remove ``amount`` of all heads and FFN neurons together by standardised fluctuation, globally (layers
    end up with different widths), then add the removed channels' mean contribution to the biases."""
    example, left, batches = _prepare(model, calibration, first, last, stream, ignore)
    method = FLAPPruning(compensate=compensate, target=target, ignore=ignore, first=first, last=last, stream=stream)
    graph = build_graph(model, example, ignore=left)
    return method.step(model, example, amount, None, statistics=method.collect(model, graph, batches))


class _BlockwiseStep:
    """What the activation methods share as steps of a schedule: the layers and stream they leave whole."""

    needs_gradients = True  # statistics of calibration batches, of the criterion's own kind (``collect``)

    def __init__(
        self, ignore: Sequence[str] = (), first: int = 0, last: int | None = None, stream: bool = False
    ) -> None:
        if isinstance(ignore, str):
            raise PruningError(f"`ignore` is a list of module names or glob patterns; got the string {ignore!r}.")
        self.ignore, self.first, self.last, self.stream = list(ignore), first, last, stream

    def left(self, model: nn.Module) -> list[str]:
        return left_whole(model, self.first, self.last, self.stream, self.ignore)

    def check(self, model: nn.Module, example_inputs: Any) -> None:
        match_modules(model, self.ignore)
        self.left(model)

    def _where(self) -> dict[str, Any]:
        return {"ignore": self.ignore, "first": self.first, "last": self.last, "stream": self.stream}


class WandaSp(_BlockwiseStep):
    """Wanda-sp as a step (``StructuredPruning(structure="wanda_sp", calibration_batches=...)``): the same share of
    every layer's heads and FFN neurons; ``ignore``, ``first``, ``last``, ``stream`` as in :func:`wanda_sp`."""

    def __init__(
        self, target: str = "channels", selection: SelectionOptions | None = None, ignore: Sequence[str] = (),
        first: int = 0, last: int | None = None, stream: bool = False, verify: bool = True,
    ) -> None:  # fmt: skip
        super().__init__(ignore, first, last, stream)
        self.criterion = ActivationImportance("wanda_sp")
        self.collect = self.criterion.collect
        self.target, self.selection, self.verify = target, selection or SelectionOptions(), verify

    def to_dict(self) -> dict[str, Any]:
        return {"method": "wanda_sp", "target": self.target, "round_to": self.selection.round_to, **self._where()}

    def step(
        self,
        model: nn.Module,
        example_inputs: Any,
        amount: float,
        dense: DenseSize | None,
        *,
        optimizers: Iterable[torch.optim.Optimizer] = (),
        statistics: Statistics | None = None,
    ) -> PruningResult:
        return prune(
            model, example_inputs, amount, self.criterion, target=self.target, dense=dense, scope="local",
            round_to=self.selection.round_to, max_fraction=self.selection.max_fraction, ignore=self.left(model),
            statistics=statistics, optimizers=optimizers, verify=self.verify,
        )  # fmt: skip


METHODS.register("wanda_sp", WandaSp)


class FLAPPruning(_BlockwiseStep):
    """FLAP as a scheduled step (``StructuredPruning(structure="flap", calibration_batches=...)``).

    Args:
        compensate: add the removed channels' mean contribution to the projections' biases.
        target: what ``amount`` is a fraction of (``"channels"``, ``"params"``, ``"macs"``).
        ignore, first, last, stream: as in :func:`flap` (by default heads and neurons only).
    """

    def __init__(
        self, compensate: bool = True, target: str = "channels", ignore: Sequence[str] = (), first: int = 0,
        last: int | None = None, stream: bool = False,
    ) -> None:  # fmt: skip
        super().__init__(ignore, first, last, stream)
        self.criterion = ActivationImportance("flap")
        self.compensate, self.target = compensate, target
        self.collect = self.criterion.collect

    def to_dict(self) -> dict[str, Any]:
        return {"method": "flap", "compensate": self.compensate, "target": self.target, **self._where()}

    def step(
        self,
        model: nn.Module,
        example_inputs: Any,
        amount: float,
        dense: DenseSize | None,
        *,
        optimizers: Iterable[torch.optim.Optimizer] = (),
        statistics: Statistics | None = None,
    ) -> PruningResult:
        if not statistics or "activations" not in statistics:
            raise PruningError("FLAP needs activation statistics of calibration batches (`calibration_batches`).")
        activations = statistics["activations"]
        weights = {name: dict(model.named_parameters())[name] for name in activations}
        means = {name: stats["sum"] / max(stats["count"], 1) for name, stats in activations.items()}
        full = {name: weights[name].detach().double().cpu() @ means[name] for name in weights}
        result = prune(
            model, example_inputs, amount, self.criterion, target=self.target, dense=dense, scope="global",
            normalize="none", ignore=self.left(model), statistics=statistics, optimizers=optimizers,
        )  # fmt: skip
        if self.compensate:
            _compensate(model, result, weights, means, full)
        return result


METHODS.register("flap", FLAPPruning)


def _compensate(
    model: nn.Module, result: PruningResult, weights: dict[str, Tensor], means: dict[str, Tensor],
    full: dict[str, Tensor],
) -> None:  # fmt: skip
    """``b += W·mean(x)`` over the removed input channels: ``W_dense·m − W_kept·m_kept``, no copy of W needed."""
    owners = tensor_owners(model)
    compensated = []
    for step in parse_record(result.record):
        for cut in step.cuts:
            if cut.tensor not in full or cut.dim != 1:
                continue
            kept = weights[cut.tensor].detach().double().cpu() @ means[cut.tensor][cut.keep]
            module = model.get_submodule(owners[cut.tensor][0])
            _add_bias(module, (full[cut.tensor] - kept).to(module.weight.dtype))
            compensated.append(module)
    if compensated:
        added = _biases_everywhere_the_config_says(model)
        modules = {owners[name][0] for name in weights} | added
        sizes = {name: model.get_submodule(name).out_features for name in modules}
        result.record = _with_bias_cuts(result.record, modules, sizes)


def _with_bias_cuts(record: dict[str, Any], modules: set[str], sizes: dict[str, int]) -> dict[str, Any]:
    """The record with the new biases of ``modules``: cut like their weights' rows, or kept whole (``sizes``: their
    widths before the step) where no row goes, so that ``restore`` on a model built from the original config gives
    them biases too (:func:`~lightning_prune.record.add_recorded_biases`) and the state dict loads."""
    steps = parse_record(record)
    for step in steps:
        cuts = {(cut.tensor, cut.dim) for cut in step.cuts}
        rows = {
            cut.tensor.removesuffix(".weight"): cut
            for cut in step.cuts
            if cut.tensor.endswith(".weight") and cut.dim == 0
        }
        for module in sorted(modules):
            if (f"{module}.bias", 0) in cuts:
                continue
            cut = rows.get(module)
            keep = list(cut.keep) if cut is not None else list(range(sizes[module]))
            step.cuts.append(Cut(f"{module}.bias", 0, cut.size if cut is not None else sizes[module], keep))
    return new_record(steps)


def _add_bias(linear: nn.Linear, delta: Tensor) -> None:
    if linear.bias is None:
        linear.bias = nn.Parameter(torch.zeros(linear.out_features, dtype=linear.weight.dtype))
    with torch.no_grad():
        linear.bias += delta.to(linear.bias.device)


def _biases_everywhere_the_config_says(model: nn.Module) -> set[str]:
    """A config with ``attention_bias``/``mlp_bias`` (Llama, Mistral, Qwen2 ...) builds biases on every projection of
    those blocks: give them all a (zero) bias and set the flags, so ``from_pretrained`` rebuilds this model."""
    config = next((m.config for m in model.modules() if hasattr(m, "config")), None)  # also inside a wrapper
    flags = [flag for flag in ("attention_bias", "mlp_bias") if hasattr(config, flag)]
    added: set[str] = set()
    if not flags:
        return added
    for name, module in model.named_modules():
        parent = name.rsplit(".", 2)[-2] if name.count(".") >= 1 else ""
        inside = {"attention_bias": parent in ("self_attn", "attention"), "mlp_bias": parent in ("mlp",)}
        if isinstance(module, nn.Linear) and module.bias is None and any(inside[f] for f in flags):
            module.bias = nn.Parameter(torch.zeros(module.out_features, dtype=module.weight.dtype))
            added.add(name)
    for flag in flags:
        setattr(config, flag, True)
    return added
