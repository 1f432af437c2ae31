"""The op-rule table and what every rule shares: the call being traced and how labels combine under
broadcasting.

Rules are looked up by the function's name (``F.conv2d`` and ``torch.conv2d`` are both ``conv2d``;
``x += y`` is ``add``). A function without a rule is treated conservatively: every channel that
flows into it is frozen (never pruned) and its outputs are of unknown origin. That is how the
engine stays correct on code it does not understand: it prunes less, never wrongly.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from lightning_prune.graph import labels as L
from lightning_prune.graph.builder import TraceBuilder
from lightning_prune.graph.labels import FROZEN
from lightning_prune.registry import Registry


@dataclass
class Call:
    name: str
    func: Callable[..., Any]
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    out: Any

    def arg(self, index: int, name: str, default: Any = None) -> Any:
        if name in self.kwargs:
            return self.kwargs[name]
        return self.args[index] if len(self.args) > index else default

    @property
    def inputs(self) -> list[Tensor]:
        return [value for value in leaves((self.args, self.kwargs)) if isinstance(value, Tensor)]

    @property
    def outputs(self) -> list[Tensor]:
        return [value for value in leaves(self.out) if isinstance(value, Tensor)]


Rule = Callable[[TraceBuilder, Call], None]
OP_RULES: Registry[str, Rule] = Registry("op rule")
rule = OP_RULES.decorator


def leaves(value: Any) -> Iterator[Any]:
    if isinstance(value, tuple | list):
        for item in value:
            yield from leaves(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from leaves(item)
    else:
        yield value


def names_in(text: str) -> list[str]:
    return text.split()


_DUNDER = {
    "iadd": "add", "radd": "add", "isub": "sub", "rsub": "rsub", "imul": "mul", "rmul": "mul",
    "truediv": "div", "itruediv": "div", "rtruediv": "div", "floordiv": "div", "rfloordiv": "div",
    "ifloordiv": "div", "mod": "remainder", "rmod": "remainder", "ipow": "pow", "rpow": "pow",
    "and": "logical_and", "iand": "logical_and", "rand": "logical_and", "or": "logical_or",
    "ior": "logical_or", "ror": "logical_or", "xor": "logical_xor", "ixor": "logical_xor",
    "rxor": "logical_xor", "invert": "logical_not", "imatmul": "matmul",
}  # fmt: skip


def canonical_name(func: Callable[..., Any]) -> str:
    name = getattr(func, "__name__", "") or ""
    if name == "__get__":  # a property of Tensor, such as .T or .data
        return getattr(getattr(func, "__self__", None), "__name__", name)
    if name.startswith("__") and name.endswith("__"):
        core = name[2:-2]
        return _DUNDER.get(core, core)
    if name.endswith("_") and not name.startswith("_"):
        return name[:-1]
    return name


def apply_rule(builder: TraceBuilder, func: Callable[..., Any], args: tuple, kwargs: dict, out: Any) -> None:
    if not any(isinstance(value, Tensor) for value in leaves(out)):
        return
    call = Call(canonical_name(func), func, args, kwargs, out)
    (OP_RULES.get(call.name) or unknown)(builder, call)


def unknown(b: TraceBuilder, call: Call) -> None:
    b.freeze_tensors(call.inputs, f"unsupported op `{call.name}`")


# --- combining labels under broadcasting ---------------------------------------------------------
def full_dims(shape: Sequence[int], out_shape: Sequence[int]) -> frozenset[int]:
    shape = (1,) * (len(out_shape) - len(shape)) + tuple(shape)
    return frozenset(d for d, (size, out) in enumerate(zip(shape, out_shape, strict=True)) if size == out)


def combine(b: TraceBuilder, items: list[tuple[Tensor, Sequence[int]]], out_shape: Sequence[int], op: str) -> Tensor:
    """Output labels of a broadcasting op over ``(labels, shape)`` items, unifying what must be cut together.

    Two inputs are coupled only along dimensions where both have the output's size (co-indexed
    dimensions): a residual sum couples its summands channel by channel; a ``(N, 1, H, W)`` spatial
    gate does not couple with the channels it multiplies.
    """
    ndim = len(out_shape)
    prepared = []
    for labels, shape in items:
        labels = L.align(labels, ndim)
        full = full_dims(shape, out_shape)
        prepared.append((labels, L.varying_dims(labels), full))
    order = sorted(range(len(prepared)), key=lambda i: -len(prepared[i][1] & prepared[i][2]))
    base, base_vary, base_full = prepared[order[0]]
    representative = base
    for index in order[1:]:
        labels, vary, full = prepared[index]
        co = base_full & full
        if torch.equal(labels, L.constant(FROZEN, ndim)):
            # A constant (an input, a buffer, a computed table) never shrinks: wherever it spans a dimension
            # the other operand varies along, that dimension must keep its size (rotary tables span a head's
            # features, not the heads; a same-size constant added to channels spans the channels).
            b.require(base, full & base_vary, f"`{op}` with a constant of the same size")
            if not base_vary and full == base_full and int(base.reshape(-1)[0]) != FROZEN:
                b.unify(base, labels)
            continue
        if vary <= co and base_vary <= co:
            b.unify(base, labels)
            if len(vary) < len(base_vary) and base_vary <= full:
                representative = labels
            continue
        shared = (vary | base_vary) & co
        if not shared:
            if (vary & full) - base_vary:  # an outer product: a position would belong to two channels
                b.freeze(torch.cat([base.reshape(-1), labels.reshape(-1)]), f"`{op}` mixes channel dimensions")
            continue
        # Coupled along the shared dimensions: everything in one slice of them becomes one class, so the
        # base's labels stay a valid representative wherever the other input varies.
        dims = sorted(shared)
        sizes = [out_shape[d] for d in dims]
        rows = []
        for part in (base, labels):
            expanded = part.expand(*[out_shape[d] if d in dims else part.shape[d] for d in range(ndim)])
            rows.append(expanded.permute(*dims, *[d for d in range(ndim) if d not in dims]).reshape(*sizes, -1))
        b.unify_rows(torch.cat(rows, dim=-1).reshape(-1, rows[0].shape[-1] + rows[1].shape[-1]))
    return representative


def effective_shape(b: TraceBuilder, tensor: Tensor) -> tuple[int, ...]:
    """``tensor``'s shape, with 1 where a computed constant's values do not change along a dimension.

    Such a constant broadcasts along that dimension like a size-1 tensor (T5's zero position bias of one row per
    head), so it does not tie the dimension to its size. The smaller model must build it at the smaller size, as
    verification checks. Buffers and parameters keep their shapes.
    """
    shape = tuple(tensor.shape)
    if tensor.numel() <= 1 or b.name_of(tensor) is not None:
        return shape
    if not torch.equal(b.label(tensor), L.constant(FROZEN, tensor.ndim)):
        return shape
    return tuple(
        1 if size > 1 and torch.equal(tensor, tensor.narrow(dim, 0, 1).expand_as(tensor)) else size
        for dim, size in enumerate(shape)
    )


def set_all(b: TraceBuilder, call: Call, labels: Tensor) -> None:
    for output in call.outputs:
        b.set(output, L.align(labels, output.ndim) if labels.ndim != output.ndim else labels)


def dims_argument(value: Any, ndim: int) -> list[int]:
    if value is None:
        return list(range(ndim))
    return [value] if isinstance(value, int) else list(value)


def is_named(b: TraceBuilder, tensor: Any) -> bool:
    return isinstance(tensor, Tensor) and b.name_of(tensor) is not None


def add_computed_bias(b: TraceBuilder, call: Call, bias: Tensor) -> None:
    out = call.outputs[0]
    items = [(b.label(out), tuple(out.shape)), (b.label(bias), effective_shape(b, bias))]
    b.set(out, combine(b, items, tuple(out.shape), call.name))
