"""Ops that move data around: views, permutations, selections, indexing, concatenation and splits."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from lightning_prune.graph import labels as L
from lightning_prune.graph.builder import TraceBuilder, ValuesNeeded
from lightning_prune.graph.rules.base import Call, dims_argument, leaves, names_in, rule
from lightning_prune.registry import Registry


def _index_on_meta(value: Any) -> bool:
    """An integer or boolean meta tensor: its values (which it does not hold) would decide where labels go."""
    return isinstance(value, Tensor) and value.is_meta and not (value.is_floating_point() or value.is_complex())


def _replay(b: TraceBuilder, call: Call, data: list[Tensor]) -> list[Tensor] | None:
    """Run the op again with label tensors in place of ``data``; None if it cannot run on integers."""
    substitutes = {id(t): b.expanded(t) for t in data}

    def swap(value: Any) -> Any:
        if isinstance(value, Tensor) and id(value) in substitutes:
            return substitutes[id(value)]
        if isinstance(value, list | tuple) and any(isinstance(v, Tensor) for v in value):
            return type(value)(swap(v) for v in value)
        return value

    args, kwargs = [swap(a) for a in call.args], {k: swap(v) for k, v in call.kwargs.items()}
    if b.on_meta and any(_index_on_meta(v) for v in leaves((args, kwargs))):
        raise ValuesNeeded(f"`{call.name}` reads the values of an index or a mask to move channels")
    try:
        result = call.func(*args, **kwargs)
    except (RuntimeError, TypeError, NotImplementedError):
        if b.on_meta:
            raise ValuesNeeded(f"`{call.name}` could not be replayed on channel labels") from None
        return None
    produced = [value for value in leaves(result) if isinstance(value, Tensor)]
    return produced if len(produced) == len(call.outputs) else None


def _moved(
    b: TraceBuilder, call: Call, data: list[Tensor], selected: Iterable[int] = (), reason: str | None = None
) -> None:
    """Set output labels by replaying the op on labels, and record what a smaller model must still satisfy.

    Selecting part of dimension ``selected`` (slicing, ``select``, indexing) stays valid only if whole
    rows along it are removed; a view that splits a channel dimension into several stays valid if
    channels go by whole blocks (attention heads) or by the same index of every block (a channel
    shuffle). Both are checked on the final classes (see ``Requirement``).
    """
    replayed = _replay(b, call, data)
    if replayed is None:
        b.freeze_tensors(data, f"`{call.name}` could not be replayed on channel labels")
        return
    before = max(len(L.varying_dims(b.label(t))) for t in data)
    selected = list(selected)
    for tensor in data:
        b.require(b.label(tensor), selected, reason or f"`{call.name}` selects part of a channel dimension")
    for output, labels in zip(call.outputs, replayed, strict=True):
        labels = L.compress(labels)
        if len(L.varying_dims(labels)) > before:
            b.require(labels, L.varying_dims(labels), f"`{call.name}` splits a channel dimension", split=True)
        b.set(output, labels)


_MOVEMENT = names_in(
    """
view reshape flatten unflatten permute transpose swapaxes swapdims movedim moveaxis t T mT H mH adjoint
squeeze unsqueeze expand broadcast_to flip fliplr flipud repeat tile repeat_interleave pixel_shuffle
pixel_unshuffle channel_shuffle native_channel_shuffle diagonal unfold atleast_1d atleast_2d atleast_3d
"""
)


@rule(*_MOVEMENT)
def movement(b: TraceBuilder, call: Call) -> None:
    _moved(b, call, [call.inputs[0]])


@rule("view_as", "reshape_as", "expand_as")
def movement_as(b: TraceBuilder, call: Call) -> None:
    _moved(b, call, [call.args[0]])


@rule("roll")
def roll(b: TraceBuilder, call: Call) -> None:
    source = call.args[0]
    _moved(b, call, [source], selected=dims_argument(call.arg(2, "dims", None), source.ndim))


@rule("narrow", "select", "index_select", "gather")
def along_one_dim(b: TraceBuilder, call: Call) -> None:
    _moved(b, call, [call.args[0]], selected=[call.arg(1, "dim")])


@rule("take_along_dim")
def take_along_dim(b: TraceBuilder, call: Call) -> None:
    source = call.args[0]
    _moved(b, call, [source], selected=dims_argument(call.arg(2, "dim", None), source.ndim))


@rule("masked_select", "take")
def flattening_selection(b: TraceBuilder, call: Call) -> None:
    source = call.args[0]
    _moved(b, call, [source], selected=range(source.ndim))


# Layers whose code slices a channel dimension at bounds it computes from sizes that follow a cut (head counts
# kept in step by their fixups), by qualified class name → why. A slice there need not keep whole rows of that
# dimension; verification re-traces the cut model and rolls back a layer whose bounds did not follow.
FOLLOWING_SLICES: Registry[str, str] = Registry(
    "layer with following slice bounds", "Register one with FOLLOWING_SLICES.register('package.module.Class', why)."
)


def _bounds_follow(module: Any) -> bool:
    return module is not None and any(
        f"{klass.__module__}.{klass.__qualname__}" in FOLLOWING_SLICES for klass in type(module).__mro__
    )


def _whole(entry: slice, size: int) -> bool:
    """Whether a slice takes every index now and after any cut: ``[:n]`` with ``n`` at least the size (GhostNet's
    ``out[:, :self.out_chs]`` after a concatenation of exactly that many channels) stays whole as the size shrinks."""
    stop = entry.stop
    return (
        entry.step in (None, 1) and entry.start in (None, 0) and (stop is None or (type(stop) is int and stop >= size))
    )


def _indexed_dims(index: Any, shape: torch.Size) -> tuple[set[int], set[int]] | None:
    """Source dimensions an index selects part of: by ints and tensors, and by slices that do not take the whole
    dimension (with step 1); None if unparsed."""
    ndim = len(shape)
    entries = list(index) if isinstance(index, tuple) else [index]
    if sum(1 for e in entries if e is Ellipsis) > 1:
        return None

    def width(entry: Any) -> int:
        if entry is None:
            return 0
        return entry.ndim if isinstance(entry, Tensor) and entry.dtype == torch.bool else 1

    explicit = sum(width(e) for e in entries if e is not Ellipsis)
    dims: set[int] = set()
    sliced: set[int] = set()
    position = 0
    for entry in entries:
        if entry is None:
            continue
        if entry is Ellipsis:
            position += ndim - explicit
            continue
        if isinstance(entry, slice):
            if not _whole(entry, shape[position]):
                (sliced if entry.step in (None, 1) else dims).add(position)
        elif isinstance(entry, int | Tensor | list) or hasattr(entry, "__index__"):
            dims.update(range(position, position + width(entry)))
        else:
            return None
        position += width(entry)
    return dims, sliced


@rule("getitem")
def getitem(b: TraceBuilder, call: Call) -> None:
    source = call.args[0]
    found = _indexed_dims(call.args[1], source.shape)
    if found is None:
        b.freeze(b.label(source), "an index the engine cannot parse")
        return
    dims, sliced = found
    _moved(b, call, [source], selected=dims if _bounds_follow(b.module) else dims | sliced)


@rule("setitem")
def setitem(b: TraceBuilder, call: Call) -> None:
    b.freeze_tensors([call.args[0], call.args[2]], "in-place assignment into a tensor")


@rule("cat", "concat", "concatenate", "stack")
def join(b: TraceBuilder, call: Call) -> None:
    """Concatenation: the pieces keep their labels along ``dim`` and are coupled along the other dimensions.

    A channel concatenation (inception, densenet) couples nothing; concatenating tokens couples their
    channels (a class token and the patch embeddings); halves of an attention head's features
    (rotary embeddings) couple within the head.
    """
    tensors = [t for t in call.args[0] if isinstance(t, Tensor) and not (t.ndim == 1 and t.numel() == 0)]
    out = call.outputs[0]
    dim = call.arg(1, "dim", 0) % out.ndim
    stack = call.name == "stack"
    compressed = [b.label(t).unsqueeze(dim) if stack else b.label(t) for t in tensors]
    varying = set().union(*(L.varying_dims(p) for p in compressed))
    others = sorted(varying - {dim})
    pieces = [
        p.expand(
            *[
                (1 if stack else t.shape[d]) if d == dim else (out.shape[d] if d in varying else 1)
                for d in range(out.ndim)
            ]
        )
        for p, t in zip(compressed, tensors, strict=True)
    ]
    if others and len(pieces) > 1:
        rest = [d for d in range(out.ndim) if d not in others]
        rows = [
            p.permute(*others, *rest).reshape(torch.Size([out.shape[d] for d in others]).numel(), -1) for p in pieces
        ]
        b.unify_rows(torch.cat(rows, dim=1))
    b.set(out, torch.cat(pieces, dim=dim))


def source_line() -> str:
    """``path:line`` of the innermost frame outside torch and this package: the model's own code."""
    frame = sys._getframe(1)
    while frame is not None:
        path = os.path.abspath(frame.f_code.co_filename)
        if not any(path.startswith(root) for root in _LIBRARIES):
            return f"{path}:{frame.f_lineno}"
        frame = frame.f_back
    return "<unknown>"


_PACKAGE = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # lightning_prune/
_LIBRARIES = (os.path.dirname(os.path.abspath(torch.__file__)) + os.sep, _PACKAGE + os.sep)


def _fixed_sizes(call: Call) -> bool:
    """Whether the parts' sizes are given (``split(32)``, ``split([16, 48])``) rather than their number."""
    if call.name in ("split", "split_with_sizes"):
        return True
    return call.name == "tensor_split" and not isinstance(call.arg(1, "indices_or_sections"), int)


def _sizes_argument(call: Call) -> Any:
    if len(call.args) > 1:
        return call.args[1]
    names = ("split_size_or_sections", "split_size", "split_sizes", "indices_or_sections", "indices", "sections")
    return next((call.kwargs[name] for name in names if name in call.kwargs), None)


@rule("split", "chunk", "tensor_split", "unbind", "split_with_sizes", "hsplit", "vsplit")
def partition(b: TraceBuilder, call: Call) -> None:
    """Splits along a channel dimension: equal parts must lose equally many channels (``chunk``); parts of
    sizes the code holds are assumed to follow a pruned width and their site is recorded, so that a pruned
    model that deviates there can be traced again with that site keeping its sizes (``fixed_splits``). A list
    of sizes (MixedConv2d's ``splits``) is held part by part, so its parts may lose different counts even where
    they are equal now; one size for all parts (``split(self.width)``) keeps them equal."""
    source = call.args[0]
    default = {"unbind": 0, "hsplit": 1 if source.ndim > 1 else 0, "vsplit": 0}.get(call.name, 0)
    dim = call.arg(1 if call.name == "unbind" else 2, "dim", default) % source.ndim
    if call.name in ("hsplit", "vsplit"):
        dim = default
    if dim not in L.varying_dims(b.label(source)):
        _moved(b, call, [source])
        return
    if call.name == "unbind" or len(call.outputs) < 2:
        _moved(b, call, [source], selected=[dim])
        return
    sizes = {output.shape[dim] for output in call.outputs}
    if _fixed_sizes(call):
        site = source_line()
        if site in b.fixed_splits:
            shown = "/".join(site.rsplit("/", 3)[-3:])
            why = f"`{call.name}` into parts of fixed sizes ({shown}), which do not follow a pruned width"
            _moved(b, call, [source], selected=[dim], reason=why)
            return
        b.split_sites.setdefault(site, set()).add(b.where)
    elif len(sizes) != 1:
        _moved(b, call, [source], selected=[dim])
        return
    _moved(b, call, [source])
    if len(sizes) == 1 and not isinstance(_sizes_argument(call), list | tuple):
        # Every position of every piece, not one label per index of `dim`: after a view into heads the pieces'
        # labels vary along the head dimension too, and unifying them would merge all heads into one class.
        labels = torch.broadcast_tensors(*(b.label(output) for output in call.outputs))
        blocks = [piece.reshape(-1) for piece in labels]
        b.partitions.append((blocks, f"`{call.name}` in `{b.where}`"))
