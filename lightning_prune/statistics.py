"""Gradient statistics of channels, accumulated from forward and backward passes by hooks.

For every producer layer (conv, linear, embedding) a forward hook keeps its output ``a`` and a
tensor hook on that output sees its gradient ``g``. Per example and channel ``t = Σ a·g`` over the
other positions is the derivative of the loss with respect to a multiplicative mask on the channel.
From it, per channel and in O(channels) memory:

- ``"taylor"`` accumulates ``|Σ_examples t|`` per batch (first-order Taylor, Molchanov et al. 2017);
- ``"fisher"`` accumulates ``Σ_examples (Σ_members t)²`` where the inner sum runs over every producer
  of a coupled group, since one mask removes them together (group Fisher, Liu et al. 2021). Every
  producer channel stores its group element's value.

Weights used by a functional call instead of their module (torchvision's Swin attention calls
``F.linear(x, self.qkv.weight)``; ``nn.MultiheadAttention`` keeps a raw fused in-projection) have no
output a hook can see. They are measured on the weight: a tensor hook on the parameter sees each
backward's gradient ``G``, and ``t = Σ W·G`` over a channel's rows is the derivative of the loss with
respect to a mask on those rows (bias excluded), already summed over the batch. Both forms are
registered until the first batch shows which one a weight gets; a group whose members mix the two
folds its per-example values into batch sums, and ``fisher`` squares batch sums. When per-example
terms are uncorrelated and centred that has the same expectation as the per-example sum of squares,
so the scores of both kinds of group stay comparable.

The hooks read and never write: the observed training steps compute exactly what they would without
them. ``detach()`` removes every hook.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

from lightning_prune.errors import PruningError
from lightning_prune.graph.groups import DependencyGraph
from lightning_prune.running import preserved_state, tensor_owners
from lightning_prune.slicing import index_rows

KINDS = ("taylor", "fisher")
# Finished batches are kept on their device and folded into the accumulators in one pass, every FOLD_EVERY
# batches or once they hold FOLD_VALUES values (a fold costs about as much for 2 batches as for 200)
FOLD_EVERY = 256
FOLD_VALUES = 1 << 22
FEW_POSITIONS = 64  # per channel and example, summed by a matrix-vector product (see _on_gradient)
SCRATCH_FROM = 1 << 20  # a·g of at least this many values goes into one reused buffer (below, a fresh tensor is faster)
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
        parameters = dict(model.named_parameters())
        self.producers: dict[str, tuple[nn.Module, int]] = {}  # measured on a·g of the module's output
        self.weights: dict[str, tuple[list[nn.Module], Tensor, int, int]] = {}  # measured on W·G (see module doc)
        self.members: list[list[tuple[str, Tensor, Tensor]]] = []  # per group: (tensor, positions, elements)
        self._in_order: set[str] = set()  # the one producer of its group, position i being element i
        for group in graph.groups:
            entries = []
            for member in group.members_with_role("out"):
                name, parameter = member.slot.tensor, parameters.get(member.slot.tensor)
                path = (owners.get(name) or [None])[0]
                if path is None or parameter is None or not parameter.requires_grad or parameter.ndim < 2:
                    continue
                module = model.get_submodule(path)
                dim = _output_channel_dim(module)
                if dim is not None and name.endswith(".weight"):
                    self.producers[name] = (module, dim)
                parent = model.get_submodule(path.rpartition(".")[0]) if path else module
                self.weights[name] = ([module, parent], parameter, member.slot.dim, member.slot.groups)
                entries.append((name, member.positions, member.elements))
            self.members.append(entries)
            order = torch.arange(group.width)
            if len(entries) == 1 and torch.equal(entries[0][1], order) and torch.equal(entries[0][2], order):
                self._in_order.add(entries[0][0])
        self.widths = [group.width for group in graph.groups]
        self.taylor: dict[str, Tensor] = {}
        self.fisher: dict[str, Tensor] = {}
        self.batches = 0
        self._pending: dict[str, Tensor] = {}  # this batch, per example, from outputs (float32, on its device)
        self._pending_weights: dict[str, Tensor] = {}  # this batch, per batch, from weights
        self._done: list[dict[str, Tensor]] = []  # finished batches not folded into the accumulators yet
        self._done_values = 0
        self._scratch: Tensor | None = None
        self._ones: dict[tuple[int, torch.device], Tensor] = {}
        self._handles: list[Any] = []
        self._weight_handles: dict[str, Any] = {}
        self._flush_handles: list[Any] = []  # while some weight may still be measured on its gradient

    def attach(self) -> GradientStatistics:
        for name, (module, dim) in self.producers.items():
            self._handles.append(module.register_forward_hook(self._forward_hook(name, dim)))
        flush_on = {id(m): m for modules, *_ in self.weights.values() for m in modules}
        self._flush_handles = [module.register_forward_pre_hook(self._flush_hook) for module in flush_on.values()]
        for name, (_, parameter, dim, groups) in self.weights.items():
            self._weight_handles[name] = parameter.register_hook(self._weight_hook(name, parameter, dim, groups))
        return self

    def _forward_hook(self, name: str, dim: int) -> Callable[..., None]:
        def hook(module: nn.Module, inputs: Any, output: Tensor) -> None:
            if self._pending.get(name) is not None or self._pending_weights:
                self._end_batch()  # a new forward started: the previous backward is complete
            if isinstance(output, Tensor) and output.requires_grad and torch.is_grad_enabled():
                activation = output.detach()
                output.register_hook(lambda grad: self._on_gradient(name, dim, activation, grad))

        return hook

    def _flush_hook(self, module: nn.Module, inputs: Any) -> None:
        if self._pending_weights:
            self._end_batch()

    def _weight_hook(self, name: str, parameter: Tensor, dim: int, groups: int) -> Callable[[Tensor], None]:
        def hook(grad: Tensor) -> None:
            product = index_rows(parameter.detach() * grad, dim, groups)
            per_channel = product.sum(1, dtype=torch.float32).unsqueeze(0)
            pending = self._pending_weights.get(name)
            self._pending_weights[name] = per_channel if pending is None else pending + per_channel

        return hook

    def _on_gradient(self, name: str, dim: int, activation: Tensor, grad: Tensor) -> None:
        # a·g of a large activation goes into a buffer kept between calls (one, the size of the largest): on CPU a
        # fresh tensor per producer and step was 9% slower for 64x64x32x32, but 20% faster for the digits CNN's
        # 64x32x8x8; the product is faster than a batched dot product (bmm, einsum) at both sizes
        count, scratch = activation.numel(), self._scratch
        if count < SCRATCH_FROM:
            product = activation * grad
        else:
            if (
                scratch is None
                or scratch.numel() < count
                or scratch.dtype != grad.dtype
                or scratch.device != grad.device
            ):
                self._scratch = scratch = torch.empty(count, dtype=grad.dtype, device=grad.device)
            product = torch.mul(activation, grad, out=scratch[:count].view(activation.shape))
        if product.ndim == 1:
            product = product.unsqueeze(0)
        channel = dim % product.ndim
        reduce = [d for d in range(product.ndim) if d not in (0, channel)]
        if not reduce:
            per_example = product.to(torch.float32, copy=True)
        elif (
            channel == 1
            and product.dtype == torch.float32
            and 0 < math.prod(product.shape[2:]) <= FEW_POSITIONS
            and product.numel()
            and product.is_contiguous()
        ):
            # a small feature map's positions summed as a matrix-vector product with ones: on a CPU 0.6-0.8 of the
            # time of `sum((2, 3))` for 8x8 maps and smaller, and slower from 14x14 on
            rows = product.view(product.shape[0] * product.shape[1], -1)
            ones = self._ones.get((rows.shape[1], rows.device))
            if ones is None:
                ones = self._ones[(rows.shape[1], rows.device)] = rows.new_ones(rows.shape[1])
            per_example = torch.mv(rows, ones).view(product.shape[0], product.shape[1])
        else:
            per_example = product.sum(reduce, dtype=torch.float32)
        if channel == 0:
            per_example = per_example.unsqueeze(0)
        self._pending[name] = per_example if name not in self._pending else self._pending[name] + per_example

    def _end_batch(self) -> None:
        """Keep the finished batch's values (on their device) and fold every ``FOLD_EVERY`` batches."""
        if not self._pending and not self._pending_weights:
            return
        for name in self._pending:  # seen through its output: the weight form is not needed
            handle = self._weight_handles.pop(name, None)
            if handle is not None:
                handle.remove()
        if not self._weight_handles:  # no weight is measured on its gradient any more: nothing left to flush
            for handle in self._flush_handles:
                handle.remove()
            self._flush_handles = []
        batch = {**self._pending_weights, **self._pending}
        self._done.append(batch)
        self._done_values += sum(values.numel() for values in batch.values())
        self._pending, self._pending_weights = {}, {}
        if len(self._done) >= FOLD_EVERY or self._done_values >= FOLD_VALUES:
            self._fold()

    def flush(self) -> None:
        """Fold the last batch's values, and every batch not folded yet, into the accumulators."""
        self._end_batch()
        self._fold()

    def _fold(self) -> None:
        """Fold the finished batches into the accumulators, each group in one pass over all of them.

        As if each batch were folded on its own: a member a batch did not see adds nothing to that batch's
        masks and gets no share of its fisher, and a group whose members a batch saw in mixed forms (per
        example and per batch) folds that batch to batch sums.
        """
        batches, self._done, self._done_values = self._done, [], 0
        for entries, width in zip(self.members, self.widths, strict=True):
            names = list(dict.fromkeys(name for name, _, _ in entries if any(name in b for b in batches)))
            if not names:
                continue
            channels = {name: next(b[name].shape[1] for b in batches if name in b) for name in names}
            columns: dict[str, list[Tensor]] = {name: [] for name in names}
            present: dict[str, list[bool]] = {name: [] for name in names}  # per batch
            counts = []
            for batch in batches:
                seen = [batch[name] for name in names if name in batch]
                if not seen:
                    continue
                mixed = len({values.shape[0] for values in seen}) > 1
                rows = 1 if mixed else seen[0].shape[0]
                counts.append(rows)
                for name in names:
                    values = batch.get(name)
                    present[name].append(values is not None)
                    if values is None:
                        values = seen[0].new_zeros(rows, channels[name])
                    columns[name].append(values.sum(0, keepdim=True) if mixed else values)
            stacked = {name: torch.cat(parts).to("cpu", torch.float64) for name, parts in columns.items()}
            # index_select/index_add_ rather than tensor indexing (a third of the time on the digits CNN); a group
            # of one producer whose channels are its elements in order (most groups) needs no index at all
            direct = len(entries) == 1 and names[0] in self._in_order and stacked[names[0]].shape[1] == width
            if direct:
                masks = stacked[names[0]]
            else:
                masks = torch.zeros(sum(counts), width, dtype=torch.float64)
                for name, positions, elements in entries:
                    if name in stacked:
                        masks.index_add_(1, elements, stacked[name].index_select(1, positions))
            squares = masks.square()
            group_fisher = squares.sum(0)
            if len(set(counts)) == 1:
                segments = None
            else:
                segments = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
            for name, positions, elements in entries:
                if name not in stacked:
                    continue
                values = stacked[name]
                if segments is None:
                    per_batch = values.view(len(counts), counts[0], values.shape[1]).sum(1)
                else:
                    per_batch = values.new_zeros(len(counts), values.shape[1]).index_add_(0, segments, values)
                taylor = self.taylor.setdefault(name, torch.zeros(values.shape[1], dtype=torch.float64))
                fisher = self.fisher.setdefault(name, torch.zeros(values.shape[1], dtype=torch.float64))
                if all(present[name]):
                    member_fisher = group_fisher
                else:  # a member gets the group's value of the batches that saw it
                    rows = torch.repeat_interleave(torch.tensor(present[name]), torch.tensor(counts))
                    member_fisher = squares[rows].sum(0)
                if direct:
                    taylor += per_batch.abs().sum(0)
                    fisher += member_fisher
                else:
                    taylor.index_add_(0, positions, per_batch.index_select(1, positions).abs().sum(0))
                    fisher.index_add_(0, positions, member_fisher.index_select(0, elements))
        self.batches += len(batches)

    def detach(self) -> Statistics:
        """Remove every hook and return the statistics."""
        for handle in [*self._handles, *self._weight_handles.values(), *self._flush_handles]:
            handle.remove()
        self._handles, self._weight_handles, self._flush_handles = [], {}, []
        self.flush()
        return self.state()

    def state(self) -> Statistics:
        self._fold()  # the finished batches; the one in flight ends with the next forward
        return {"taylor": dict(self.taylor), "fisher": dict(self.fisher), "batches": self.batches}

    def load(self, state: Statistics) -> None:
        self.taylor = {k: v.clone().to(torch.float64) for k, v in state.get("taylor", {}).items()}
        self.fisher = {k: v.clone().to(torch.float64) for k, v in state.get("fisher", {}).items()}
        self.batches = int(state.get("batches", 0))


def reduce_statistics(statistics: Statistics, reduce: Callable[[Tensor], Tensor]) -> Statistics:
    """Apply ``reduce`` (an all-reduce sum across ranks) to every accumulated tensor, in a fixed order."""
    if isinstance(statistics, Tensor):
        return reduce(statistics)
    if isinstance(statistics, dict):
        return {key: reduce_statistics(statistics[key], reduce) for key in sorted(statistics)}
    return statistics


def backward_passes(
    model: nn.Module,
    batches: Iterable[Any],
    loss_fn: Callable[[nn.Module, Any], Tensor],
    after_backward: Callable[[], None] = lambda: None,
) -> int:
    """Run ``loss_fn(model, batch)`` forward and backward on each batch (gradients zeroed before each), calling
    ``after_backward()`` after each; returns the number of batches.

    The model is left as it was: training mode, buffers (BatchNorm statistics), gradients and the
    RNG state are restored.
    """
    saved = [(p, p.grad) for p in model.parameters()]
    count = 0
    try:
        with preserved_state(model), torch.enable_grad():
            model.train()
            for batch in batches:
                for parameter, _ in saved:
                    parameter.grad = None
                loss = loss_fn(model, batch)
                if not isinstance(loss, Tensor) or loss.ndim != 0:
                    raise PruningError(
                        f"`loss_fn(model, batch)` must return a scalar tensor, got {type(loss).__name__}."
                    )
                loss.backward()
                after_backward()
                count += 1
    finally:
        for parameter, grad in saved:
            parameter.grad = grad
    if count == 0:
        raise PruningError("`batches` was empty: gradient criteria need at least one batch.")
    return count


def collect_statistics(
    model: nn.Module,
    graph: DependencyGraph,
    batches: Iterable[Any],
    loss_fn: Callable[[nn.Module, Any], Tensor],
) -> Statistics:
    """Activation-gradient statistics (``taylor``, ``fisher``) of ``graph``'s producers over ``batches``."""
    collector = GradientStatistics(model, graph).attach()
    try:
        backward_passes(model, batches, loss_fn)
    finally:
        statistics = collector.detach()
    return statistics


def collect_parameter_gradients(
    model: nn.Module,
    batches: Iterable[Any],
    loss_fn: Callable[[nn.Module, Any], Tensor],
    squares: bool = True,
) -> Statistics:
    """``{"parameters": {"grad": {name: Σ G}, "grad_squared": {name: Σ G²}}, "batches": n}`` over ``batches``.

    ``Σ G`` is the gradient of the summed loss; ``Σ G²`` (with ``squares``) is the diagonal empirical Fisher,
    as per-example as the batches are (LLM-Pruner's second-order term uses one example per batch). Kept in
    each parameter's dtype and device: twice the model's memory while it lasts.
    """
    parameters = {name: p for name, p in model.named_parameters() if p.requires_grad}
    grad = {name: torch.zeros_like(p) for name, p in parameters.items()}
    grad_squared = {name: torch.zeros_like(p) for name, p in parameters.items()} if squares else {}

    def accumulate() -> None:
        with torch.no_grad():
            for name, parameter in parameters.items():
                if parameter.grad is not None:
                    grad[name] += parameter.grad
                    if squares:
                        grad_squared[name] += parameter.grad.square()

    count = backward_passes(model, batches, loss_fn, accumulate)
    return {"parameters": {"grad": grad, "grad_squared": grad_squared}, "batches": count}
