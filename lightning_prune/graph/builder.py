"""The state of one trace: label tensors, channel spaces, slots, couplings and the constraints rules add.

Rules (:mod:`lightning_prune.graph.rules`, :mod:`lightning_prune.graph.module_rules` and the integrations)
read and extend it through :class:`TraceBuilder`; :mod:`lightning_prune.graph.tracer` runs the model and
returns the finished :class:`Trace`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.weak import WeakIdKeyDictionary

from lightning_prune.errors import TraceError
from lightning_prune.graph import labels as L
from lightning_prune.graph.labels import FROZEN

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
    whole: dict[str, str] = field(default_factory=dict)  # layers a rule could not follow at all, and why
    computed_weights: set[str] = field(default_factory=set)  # raw parameters that turned out layer weights
    split_sites: dict[str, set[str]] = field(default_factory=dict)  # fixed-size splits assumed to follow: modules
    convolution_groups: list[tuple[Tensor, Tensor]] = field(default_factory=list)  # grouped convs: (inputs, outputs)


class ValuesNeeded(RuntimeError):
    """A rule needs values a meta-device copy of the model does not hold: the model itself must be traced."""


class TraceBuilder:
    """State shared by the rules while the model runs."""

    def __init__(
        self,
        model: nn.Module,
        space_init: Mapping[str | tuple[str, int], Tensor] | None = None,
        num_elements: int = 1,
        fixed_splits: Iterable[str] = (),
        on_meta: bool = False,
    ) -> None:
        self.on_meta = on_meta  # tracing a meta-device copy: a rule that would need values raises ValuesNeeded
        self.names: dict[int, str] = {}
        self.tensors: dict[str, Tensor] = {}
        self.parameters = {id(p) for p in model.parameters()}
        for name, tensor in [*model.named_parameters(remove_duplicate=False), *model.named_buffers()]:
            if id(tensor) not in self.names:
                self.names[id(tensor)] = name
                self.tensors[name] = tensor
        # an embedding table read whole (DeBERTa's relative positions through its projections) produces its columns
        self.embedding_tables = {
            f"{name}.weight".lstrip(".") for name, module in model.named_modules() if isinstance(module, nn.Embedding)
        }
        self.module_names: dict[int, str] = {}
        self.modules: dict[str, nn.Module] = {}
        for name, module in model.named_modules(remove_duplicate=False):
            self.module_names.setdefault(id(module), name or "<model>")
            self.modules.setdefault(self.module_names[id(module)], module)
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
        self.whole: dict[str, str] = {}  # module → why its layer could not be followed (it has no channel space)
        self.computed_weights: set[str] = set()  # raw parameters a layer's weight is computed from, row by row
        # Splits into parts of sizes the code holds (``x.split(self.width)``) are assumed to follow a pruned width
        # (a fixup updates the size) and recorded by site; sites in ``fixed_splits`` keep their sizes.
        self.split_sites: dict[str, set[str]] = {}
        self.fixed_splits = frozenset(fixed_splits)
        self.convolution_groups: list[tuple[Tensor, Tensor]] = []  # (inputs, outputs), each [groups, per group]
        self.space_init = dict(space_init or {})

    # --- where are we -------------------------------------------------------------------------
    @property
    def inside_atomic(self) -> bool:
        return self.atomic is not None

    @property
    def where(self) -> str:
        return self.module_stack[-1] if self.module_stack else "<model>"

    @property
    def module(self) -> nn.Module | None:
        """The innermost module of the model running now (None outside the model's own modules)."""
        return self.modules.get(self.where)

    def name_of(self, tensor: Any) -> str | None:
        return self.names.get(id(tensor)) if isinstance(tensor, Tensor) else None

    # --- labels -------------------------------------------------------------------------------
    def label(self, tensor: Tensor, create: bool = True) -> Tensor:
        """Compressed labels of ``tensor`` with ``tensor.ndim`` dimensions.

        A parameter met outside a known layer gets labels of its own (``create``), so that it can follow
        the channels it is combined with (layer scales, tokens, position tables); the weight of an
        ``nn.Embedding`` read as a whole table has the output channels a lookup gives, its columns. Buffers
        (statistics, rotary tables) and tensors of unknown origin are constants: FROZEN.
        """
        found = self.labels.get(tensor)
        if found is not None and found.ndim == tensor.ndim:
            return found
        name = self.name_of(tensor)
        trainable = id(tensor) in self.parameters and tensor.numel() > 0 and tensor.is_floating_point()
        if name in self.embedding_tables and trainable and tensor.ndim == 2:
            produced = self.space(name, 1, tensor.shape[1])
            self.slot(tensor, 1, "out", produced)
            return produced.view(1, -1)
        if name is not None and trainable and (create or name in self.raw):
            return self.raw_label(name, tensor)
        return L.constant(FROZEN, tensor.ndim)

    def raw_label(self, name: str, tensor: Tensor) -> Tensor:
        """Every entry of a parameter or buffer used outside a known layer is an element of its own."""
        if name not in self.raw:
            self.raw[name] = self._allocate(name, tensor.numel()).view(tensor.shape)
        return L.compress(self.raw[name])

    def raw_owner(self, labels: Tensor) -> str | None:
        """The parameter whose raw entries ``labels`` all are, if one is."""
        low, high = int(labels.min()), int(labels.max())
        for name, ids in self.raw.items():
            if ids.numel() and int(ids.min()) <= low and high <= int(ids.max()):
                return name
        return None

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

    def linear_output(self, linear: nn.Module, output: Tensor) -> None:
        """``output`` is produced by ``linear`` (called functionally inside a module traced as a whole) along
        its last dimension: the output projection of an attention layer, say."""
        produced = self.space(self.name_of(linear.weight), 0, linear.weight.shape[0])
        self.slot(linear.weight, 0, "out", produced)
        if linear.bias is not None:
            self.slot(linear.bias, 0, "follow", produced)
        self.set(output, produced.view([1] * (output.ndim - 1) + [-1]))

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
            whole=self.whole,
            computed_weights=self.computed_weights,
            split_sites=self.split_sites,
            convolution_groups=self.convolution_groups,
        )
