"""Gradient statistics of channels, accumulated from forward and backward passes by hooks.

For every producer layer (conv, linear, embedding) a forward hook keeps its output ``a`` and a
tensor hook on that output sees its gradient ``g``. Per example and channel ``t = Σ a·g`` over the
other positions is the derivative of the loss with respect to a multiplicative mask on the channel.
From it, per channel and in O(channels) memory:

- ``"taylor"`` accumulates ``|Σ_examples t|`` per batch (first-order Taylor, Molchanov et al. 2017);
- ``"fisher"`` accumulates ``Σ_examples (Σ_members t)²`` where the inner sum runs over every producer
  of a coupled group, since one mask removes them together (group Fisher, Liu et al. 2021). Every
  producer channel stores its group element's value.

Groups with no conv/linear/embedding producer whose output a hook can see (the heads of
``nn.MultiheadAttention``, whose fused in-projection is a raw parameter used inside one functional
call) are measured on the producer's weight instead: a tensor hook on the parameter sees each
backward's gradient ``G`` and ``t = Σ W·G`` over a channel's rows is the derivative of the loss with
respect to a mask on those rows (bias excluded). That value is already summed over the batch, so
``fisher`` squares the batch sum; when the per-example terms are uncorrelated and centred this has
the same expectation as the per-example sum of squares, so both kinds of group stay comparable.

The hooks read and never write: the observed training steps compute exactly what they would without
them. ``detach()`` removes every hook.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

from lightning_prune.errors import PruningError
from lightning_prune.graph.groups import DependencyGraph, tensor_owners
from lightning_prune.graph.tracer import preserved_state

KINDS = ("taylor", "fisher")
Statistics = dict[str, Any]


def _output_channel_dim(module: nn.Module) -> int | None:
    if isinstance(module, nn.modules.conv._ConvNd):
        return 1
    if isinstance(module, nn.Linear | nn.Embedding):
        return -1
    return None


class GradientStatistics:
    """Hooks that accumulate ``taylor`` and ``fisher`` statistics of the producers in ``graph``.

    Example::

        collector = GradientStatistics(model, graph).attach()
        for batch in batches:
            loss_fn(model, batch).backward()
        statistics = collector.detach()   # {"taylor": {tensor: per-channel}, "fisher": {...}, "batches": n}
    """

    def __init__(self, model: nn.Module, graph: DependencyGraph) -> None:
        self.model = model
        owners = tensor_owners(model)
        self.producers: dict[str, tuple[nn.Module, int]] = {}
        self.weights: dict[str, tuple[nn.Module, nn.Parameter, int]] = {}  # measured on W·G (see module doc)
        self.members: list[list[tuple[str, Tensor, Tensor]]] = []  # per group: (tensor, positions, elements)
        for group in graph.groups:
            entries = []
            for member in group.slots("out"):
                path = (owners.get(member.slot.tensor) or [None])[0]
                module = model.get_submodule(path) if path is not None else None
                dim = _output_channel_dim(module) if module is not None else None
                if dim is None or not member.slot.tensor.endswith(".weight"):
                    continue
                self.producers[member.slot.tensor] = (module, dim)
                entries.append((member.slot.tensor, member.positions, member.elements))
            if not entries:
                entries = self._weight_entries(model, owners, group)
            self.members.append(entries)
        self.widths = [group.width for group in graph.groups]
        self.taylor: dict[str, Tensor] = {}
        self.fisher: dict[str, Tensor] = {}
        self.batches = 0
        self._pending: dict[str, Tensor] = {}
        self._handles: list[Any] = []

    def _weight_entries(
        self, model: nn.Module, owners: dict[str, list[str]], group: Any
    ) -> list[tuple[str, Tensor, Tensor]]:
        entries = []
        parameters = dict(model.named_parameters())
        for member in group.slots("out"):
            name = member.slot.tensor
            parameter = parameters.get(name)
            path = (owners.get(name) or [None])[0]
            if parameter is None or not parameter.requires_grad or path is None or parameter.ndim < 2:
                continue
            self.weights[name] = (model.get_submodule(path), parameter, member.slot.dim)
            entries.append((name, member.positions, member.elements))
        return entries

    def attach(self) -> GradientStatistics:
        for name, (module, dim) in self.producers.items():
            self._handles.append(module.register_forward_hook(self._forward_hook(name, dim)))
        for name, (module, parameter, dim) in self.weights.items():
            self._handles.append(module.register_forward_pre_hook(self._flush_hook(name)))
            self._handles.append(parameter.register_hook(self._weight_hook(name, parameter, dim)))
        return self

    def _flush_hook(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, inputs: Any) -> None:
            if self._pending.get(name) is not None:
                self.flush()

        return hook

    def _weight_hook(self, name: str, parameter: Tensor, dim: int) -> Callable[[Tensor], None]:
        def hook(grad: Tensor) -> None:
            product = parameter.detach() * grad
            reduce = [d for d in range(product.ndim) if d != dim]
            per_channel = product.sum(reduce, dtype=torch.float32).detach().to("cpu", torch.float64).unsqueeze(0)
            pending = self._pending.get(name)
            self._pending[name] = per_channel if pending is None else pending + per_channel

        return hook

    def _forward_hook(self, name: str, dim: int) -> Callable[..., None]:
        def hook(module: nn.Module, inputs: Any, output: Tensor) -> None:
            if self._pending.get(name) is not None:
                self.flush()  # a new forward started: the previous backward is complete
            if isinstance(output, Tensor) and output.requires_grad and torch.is_grad_enabled():
                activation = output.detach()
                output.register_hook(lambda grad: self._on_gradient(name, dim, activation, grad))

        return hook

    def _on_gradient(self, name: str, dim: int, activation: Tensor, grad: Tensor) -> None:
        product = activation * grad  # faster than a batched dot product on CPU, measured
        if product.ndim == 1:
            product = product.unsqueeze(0)
        channel = dim % product.ndim
        reduce = [d for d in range(product.ndim) if d not in (0, channel)]
        per_example = product.sum(reduce, dtype=torch.float32) if reduce else product
        if channel == 0:
            per_example = per_example.unsqueeze(0)
        per_example = per_example.detach().to("cpu", torch.float64)
        self._pending[name] = per_example if name not in self._pending else self._pending[name] + per_example

    def flush(self) -> None:
        """Fold the last batch's per-example values into the accumulators."""
        if not self._pending:
            return
        for entries, width in zip(self.members, self.widths, strict=True):
            seen = [(name, positions, elements) for name, positions, elements in entries if name in self._pending]
            if not seen:
                continue
            examples = self._pending[seen[0][0]].shape[0]
            masks = torch.zeros(examples, width, dtype=torch.float64)
            for name, positions, elements in seen:
                values = self._pending[name]
                if values.shape[0] != examples:
                    continue
                masks.index_add_(1, elements, values[:, positions])
                taylor = self.taylor.setdefault(name, torch.zeros(values.shape[1], dtype=torch.float64))
                taylor += values.sum(0).abs()
            group_fisher = masks.square().sum(0)
            for name, positions, elements in seen:
                fisher = self.fisher.setdefault(name, torch.zeros(self._pending[name].shape[1], dtype=torch.float64))
                fisher[positions] += group_fisher[elements]
        self.batches += 1
        self._pending = {}

    def detach(self) -> Statistics:
        """Remove every hook and return the statistics."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.flush()
        return self.state()

    def state(self) -> Statistics:
        return {"taylor": dict(self.taylor), "fisher": dict(self.fisher), "batches": self.batches}

    def load(self, state: Statistics) -> None:
        self.taylor = {k: v.clone().to(torch.float64) for k, v in state.get("taylor", {}).items()}
        self.fisher = {k: v.clone().to(torch.float64) for k, v in state.get("fisher", {}).items()}
        self.batches = int(state.get("batches", 0))


def reduce_statistics(statistics: Statistics, reduce: Callable[[Tensor], Tensor]) -> Statistics:
    """Apply ``reduce`` (an all-reduce sum across ranks) to every accumulated tensor."""
    return {
        "taylor": {k: reduce(v) for k, v in sorted(statistics.get("taylor", {}).items())},
        "fisher": {k: reduce(v) for k, v in sorted(statistics.get("fisher", {}).items())},
        "batches": statistics.get("batches", 0),
    }


def collect_statistics(
    model: nn.Module,
    graph: DependencyGraph,
    batches: Iterable[Any],
    loss_fn: Callable[[nn.Module, Any], Tensor],
) -> Statistics:
    """Run ``loss_fn(model, batch)`` forward and backward on each batch and return the statistics.

    The model is left as it was: training mode, buffers (BatchNorm statistics), gradients and the
    RNG state are restored.
    """
    saved = [(p, p.grad) for p in model.parameters()]
    collector = GradientStatistics(model, graph)
    try:
        with preserved_state(model), torch.enable_grad():
            model.train()
            collector.attach()
            for batch in batches:
                for parameter, _ in saved:
                    parameter.grad = None
                loss = loss_fn(model, batch)
                if not isinstance(loss, Tensor) or loss.ndim != 0:
                    raise PruningError(
                        f"`loss_fn(model, batch)` must return a scalar tensor, got {type(loss).__name__}."
                    )
                loss.backward()
    finally:
        statistics = collector.detach()
        for parameter, grad in saved:
            parameter.grad = grad
    if statistics["batches"] == 0:
        raise PruningError("`batches` was empty: gradient criteria need at least one batch.")
    return statistics
