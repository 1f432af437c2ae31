"""Run a model once per mode under a ``TorchFunctionMode`` and record how channels flow.

The tracer sees every torch function call of the forward (``F.conv2d``, ``Tensor.view``, ``torch.cat``,
``+`` ...), gives the outputs label tensors (see :mod:`labels`) by the rules in :mod:`rules`, and
collects three things: *spaces* (the output channels of every producer, keyed by the producing
parameter so a layer called twice has one space), *slots* (every dimension of every parameter or
buffer whose indices follow a space) and *edges* (pairs of elements that must be removed together).
Nothing of the model changes: modes, buffers and the RNG state are restored afterwards.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import _disable_current_modes
from torch.utils.flop_counter import FlopCounterMode
from torch.utils.weak import WeakIdKeyDictionary

from lightning_prune.errors import TraceError
from lightning_prune.graph import labels as L
from lightning_prune.graph.labels import FROZEN

ExampleInputs = Tensor | tuple[Any, ...] | list[Any] | Mapping[str, Any]
MAX_ELEMENTS = 3_037_000_499  # element ids stay below this, so that a pair of them fits one int64 (see ``unify``)


@dataclass
class SlotRecord:
    """One dimension of one parameter or buffer whose indices follow channel-space elements.

    ``role`` is ``"out"`` for a producer's own output channels, ``"in"`` for a layer that contracts
    over its input channels (conv/linear inputs; ``groups`` > 1 for grouped convolutions) and
    ``"follow"`` for per-channel tensors (norm weights and statistics, biases, raw parameters).
    """

    tensor: str
    dim: int
    role: str
    labels: Tensor
    groups: int = 1
    modules: set[str] = field(default_factory=set)


@dataclass
class Requirement:
    """A condition on classes, checked once all couplings are known; a violation freezes the classes.

    Classes of ``labels`` must not vary along ``dims`` (a slice, a reduction, a mixing op along a dim
    stays valid when whole rows of it go), or, for a view that split one channel dimension into
    several (``split``), may vary along at most one of them (whole heads go, or the same index of
    every block, as in a channel shuffle).
    """

    labels: Tensor
    dims: frozenset[int]
    reason: str
    where: str
    split: bool = False


@dataclass
class Trace:
    num_elements: int
    spaces: dict[tuple[str, int], Tensor]
    raw: dict[str, Tensor]
    slots: dict[tuple[str, int], SlotRecord]
    edges: list[tuple[Tensor, Tensor]]
    frozen: list[tuple[Tensor, str]]
    freeze_sites: dict[tuple[str, str], None]
    partitions: list[tuple[list[Tensor], str]]
    normalized: list[Tensor]
    requirements: list[Requirement]
    floors: list[tuple[Tensor, int]]
    macs: int | None = None


class TraceBuilder:
    """State shared by the rules while the model runs."""

    def __init__(
        self,
        model: nn.Module,
        space_init: Mapping[str | tuple[str, int], Tensor] | None = None,
        num_elements: int = 1,
    ) -> None:
        self.names: dict[int, str] = {}
        self.tensors: dict[str, Tensor] = {}
        self.parameters = {id(p) for p in model.parameters()}
        for name, tensor in [*model.named_parameters(remove_duplicate=False), *model.named_buffers()]:
            if id(tensor) not in self.names:
                self.names[id(tensor)] = name
                self.tensors[name] = tensor
        self.module_names: dict[int, str] = {}
        for name, module in model.named_modules(remove_duplicate=False):
            self.module_names.setdefault(id(module), name or "<model>")
        self.module_stack: list[str] = []
        self.failed_at: str | None = None
        self.atomic: tuple[nn.Module, Any] | None = None  # the module traced as a whole, while it runs
        self.labels = WeakIdKeyDictionary()
        self.num_elements = num_elements  # id 0 is FROZEN
        self.spaces: dict[tuple[str, int], Tensor] = {}
        self.raw: dict[str, Tensor] = {}
        self.slots: dict[tuple[str, int], SlotRecord] = {}
        self.edges: list[tuple[Tensor, Tensor]] = []
        self.frozen: list[tuple[Tensor, str]] = []
        self.freeze_sites: dict[tuple[str, str], None] = {}  # (reason, module), in order
        self.partitions: list[tuple[list[Tensor], str]] = []
        self.normalized: list[Tensor] = []
        self.requirements: list[Requirement] = []
        self.floors: list[tuple[Tensor, int]] = []  # (elements, how many of their classes must stay)
        self.space_init = dict(space_init or {})

    # --- where are we -------------------------------------------------------------------------
    @property
    def inside_atomic(self) -> bool:
        return self.atomic is not None

    @property
    def where(self) -> str:
        return self.module_stack[-1] if self.module_stack else "<model>"

    def name_of(self, tensor: Any) -> str | None:
        return self.names.get(id(tensor)) if isinstance(tensor, Tensor) else None

    # --- labels -------------------------------------------------------------------------------
    def label(self, tensor: Tensor, create: bool = True) -> Tensor:
        """Compressed labels of ``tensor`` with ``tensor.ndim`` dimensions.

        A parameter met outside a known layer gets labels of its own (``create``), so that it can follow
        the channels it is combined with (layer scales, tokens, position tables). Buffers (statistics,
        rotary tables) and tensors of unknown origin are constants: FROZEN.
        """
        found = self.labels.get(tensor)
        if found is not None and found.ndim == tensor.ndim:
            return found
        name = self.name_of(tensor)
        trainable = id(tensor) in self.parameters and tensor.numel() > 0 and tensor.is_floating_point()
        if name is not None and trainable and (create or name in self.raw):
            return self.raw_label(name, tensor)
        return L.constant(FROZEN, tensor.ndim)

    def raw_label(self, name: str, tensor: Tensor) -> Tensor:
        """Every entry of a parameter or buffer used outside a known layer is an element of its own."""
        if name not in self.raw:
            self.raw[name] = self._allocate(name, tensor.numel()).view(tensor.shape)
        return L.compress(self.raw[name])

    def expanded(self, tensor: Tensor) -> Tensor:
        return self.label(tensor).expand(tensor.shape).contiguous()

    def set(self, tensor: Tensor, labels: Tensor) -> None:
        labels = L.align(labels, tensor.ndim) if labels.ndim != tensor.ndim else labels
        if any(size not in (1, actual) for size, actual in zip(labels.shape, tensor.shape, strict=True)):
            # A rule met a case it does not model: never guess, freeze what flowed in.
            self.freeze(
                labels, f"labels of shape {tuple(labels.shape)} do not fit an output of shape {tuple(tensor.shape)}"
            )
            return
        self.labels[tensor] = L.compress(labels)

    def _allocate(self, key: str | tuple[str, int], size: int) -> Tensor:
        initial = self.space_init.get(key)
        if initial is not None:
            # Re-tracing a pruned model: its elements are the surviving elements of the original.
            return initial.reshape(-1)
        offset = self.num_elements
        self.num_elements += size
        if self.num_elements > MAX_ELEMENTS:
            raise TraceError(
                f"labelling `{key}` ({size:,} entries) takes the model past {MAX_ELEMENTS:,} channels and raw "
                "parameter entries, more than the tracer can pair in one int64."
            )
        return torch.arange(offset, offset + size)

    def space(self, name: str, dim: int, size: int) -> Tensor:
        """Element ids of the output channels produced along ``dim`` of tensor ``name``."""
        key = (name, dim)
        if key not in self.spaces:
            self.spaces[key] = self._allocate(key, size)
        ids = self.spaces[key]
        if ids.numel() != size:
            raise TraceError(f"`{name}` has {size} entries along dim {dim}, expected {ids.numel()}.")
        return ids

    # --- relations ----------------------------------------------------------------------------
    def unify(self, a: Tensor, b: Tensor) -> None:
        a, b = torch.broadcast_tensors(a, b)
        a, b = a.reshape(-1), b.reshape(-1)
        differ = a != b
        if differ.any():
            # Every id is below num_elements, so a pair is one integer (unique over pairs, dim=1, is ~10x slower).
            pairs = torch.unique(a[differ] * self.num_elements + b[differ])
            self.edges.append((pairs // self.num_elements, pairs % self.num_elements))

    def unify_rows(self, matrix: Tensor) -> Tensor:
        """Unify all entries of each row; returns the first column."""
        if matrix.shape[1] > 1:
            self.unify(matrix, matrix[:, :1])
        return matrix[:, 0]

    def freeze(self, labels: Tensor, reason: str) -> None:
        ids = torch.unique(labels)
        ids = ids[ids != FROZEN]
        if ids.numel():
            self.frozen.append((ids, f"{reason} in `{self.where}`"))
            self.freeze_sites[(reason, self.where)] = None

    def require(self, labels: Tensor, dims: Iterable[int], reason: str, split: bool = False) -> None:
        """Record a :class:`Requirement` (cheap to skip when the labels themselves do not vary)."""
        dims = frozenset(d % max(labels.ndim, 1) for d in dims)
        if not split and not dims & L.varying_dims(labels):
            return
        self.requirements.append(Requirement(labels, dims, reason, self.where, split))

    def freeze_tensors(self, tensors: Iterable[Any], reason: str) -> None:
        for tensor in tensors:
            if isinstance(tensor, Tensor):
                self.freeze(self.label(tensor, create=False), reason)

    def slot(self, tensor: Tensor, dim: int, role: str, labels: Tensor, groups: int = 1) -> None:
        name = self.name_of(tensor)
        if name is None:
            raise TraceError(f"internal: slot on an unnamed tensor in `{self.where}`")
        dim = dim % tensor.ndim
        labels = labels.reshape(-1)
        if labels.numel() == 1 and tensor.shape[dim] != 1:
            labels = labels.expand(tensor.shape[dim])
        key = (name, dim)
        found = self.slots.get(key)
        if found is None:
            self.slots[key] = SlotRecord(name, dim, role, labels.clone(), groups, {self.where})
            return
        self.unify(found.labels, labels)
        found.modules.add(self.where)

    def along(self, tensor: Tensor, dim: int) -> Tensor:
        """One label per index of ``dim`` of ``tensor`` (entries of each slice are unified)."""
        return self.unify_rows(L.along(self.label(tensor), dim % tensor.ndim, tensor.shape[dim]))

    def trace(self) -> Trace:
        return Trace(
            self.num_elements,
            self.spaces,
            self.raw,
            self.slots,
            self.edges,
            self.frozen,
            self.freeze_sites,
            self.partitions,
            self.normalized,
            self.requirements,
            self.floors,
        )


class _Mode(TorchFunctionMode):
    def __init__(self, builder: TraceBuilder) -> None:
        super().__init__()
        self.builder = builder

    def __torch_function__(self, func, types, args=(), kwargs=None):
        from lightning_prune.graph.rules import apply_rule

        kwargs = kwargs or {}
        try:
            out = func(*args, **kwargs)
        except Exception:
            if self.builder.failed_at is None:
                self.builder.failed_at = self.builder.where
            raise
        if self.builder.inside_atomic:
            return out
        with _disable_current_modes():  # label bookkeeping is not part of the model (nor of its MAC count)
            apply_rule(self.builder, func, args, kwargs, out)
        return out


@contextlib.contextmanager
def _module_stack(builder: TraceBuilder) -> Iterator[None]:
    from lightning_prune.graph.modules import atomic_rule

    def push(module: nn.Module, inputs: Any) -> None:
        name = builder.module_names.get(id(module), f"<{type(module).__name__} outside the model>")
        builder.module_stack.append(name)
        if builder.atomic is None and atomic_rule(module) is not None:
            builder.atomic = (module, inputs)

    def pop(module: nn.Module, inputs: Any, output: Any) -> None:
        if builder.failed_at is None and sys.exc_info()[1] is not None:
            builder.failed_at = builder.where  # the innermost module an exception is leaving
        if builder.atomic is not None and builder.atomic[0] is module:
            rule = atomic_rule(module)
            builder.atomic = None
            with _disable_current_modes():
                rule(builder, module, inputs, output)
        if builder.module_stack:
            builder.module_stack.pop()

    pre = nn.modules.module.register_module_forward_pre_hook(push)
    post = nn.modules.module.register_module_forward_hook(pop, always_call=True)
    try:
        yield
    finally:
        pre.remove()
        post.remove()


@contextlib.contextmanager
def preserved_state(model: nn.Module) -> Iterator[None]:
    """Restore training flags, buffers and the RNG after running ``model``."""
    modes = [(module, module.training) for module in model.modules()]
    buffers = [(buffer, buffer.detach().clone()) for buffer in model.buffers()]
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        for module, training in modes:
            module.training = training
        with torch.no_grad():
            for buffer, saved in buffers:
                if buffer.shape == saved.shape:
                    buffer.copy_(saved)


def run_model(model: nn.Module, example_inputs: ExampleInputs) -> Any:
    if isinstance(example_inputs, Mapping):
        return model(**example_inputs)
    if isinstance(example_inputs, tuple | list):
        return model(*example_inputs)
    return model(example_inputs)


def _freeze_outputs(builder: TraceBuilder, output: Any) -> None:
    leaves, _ = torch.utils._pytree.tree_flatten(output)
    stack = list(leaves)
    while stack:
        leaf = stack.pop()
        if isinstance(leaf, Tensor):
            builder.freeze(builder.label(leaf), "model output")
        elif isinstance(leaf, Mapping):
            stack.extend(leaf.values())
        elif isinstance(leaf, tuple | list):
            stack.extend(leaf)
        elif hasattr(leaf, "__dict__") and not isinstance(leaf, nn.Module):
            stack.extend(vars(leaf).values())


def record(
    model: nn.Module,
    example_inputs: ExampleInputs,
    modes: Iterable[str] = ("train", "eval"),
    space_init: Mapping[str | tuple[str, int], Tensor] | None = None,
    num_elements: int = 1,
) -> Trace:
    """Run ``model`` on ``example_inputs`` once per mode and return what flowed where.

    The eval-mode pass also counts the model's MACs (``Trace.macs``, as ``measure.count_macs`` would).

    ``space_init`` gives fixed element ids to spaces (``(tensor, dim)``) and raw tensors (``name``);
    verification uses it to label a pruned model with the ids of the original elements it kept.
    """
    builder = TraceBuilder(model, space_init, num_elements)
    macs = None
    for mode in modes:
        if mode not in ("train", "eval"):
            raise TraceError(f"`modes` entries must be 'train' or 'eval', got {mode!r}.")
        counter = FlopCounterMode(display=False) if mode == "eval" else contextlib.nullcontext()
        with preserved_state(model), torch.no_grad(), _module_stack(builder):
            model.train(mode == "train")
            try:
                with counter, _Mode(builder):
                    output = run_model(model, example_inputs)
            except TraceError:
                raise
            except Exception as error:  # the user's forward failed: say where and with what
                where = builder.failed_at or builder.where
                builder.module_stack.clear()
                hint = ""
                if "more than 1 value per channel" in str(error):
                    hint = " Hint: BatchNorm in training mode needs a batch of at least 2 examples."
                raise TraceError(
                    f"running the model on `example_inputs` in {mode} mode failed in module `{where}`: "
                    f"{type(error).__name__}: {error}. Pass inputs the model accepts: a tensor, a tuple of "
                    f"positional inputs or a dict of keyword inputs.{hint}",
                    module=where,
                ) from error
        _freeze_outputs(builder, output)
        if isinstance(counter, FlopCounterMode):
            macs = counter.get_total_flops() // 2
    trace = builder.trace()
    trace.macs = macs
    return trace
