"""Contractions: matrix products, einsum and attention, where summed dimensions couple what they sum."""

from __future__ import annotations

import string

from torch import Tensor

from lightning_prune.graph.builder import TraceBuilder
from lightning_prune.graph.rules.base import (
    Call,
    add_computed_bias,
    combine,
    effective_shape,
    is_named,
    rule,
    set_all,
    unknown,
)


def _contract(b: TraceBuilder, call: Call, operands: list[tuple[Tensor, str]], output: str) -> None:
    """Einsum-style contraction ``operands -> output`` (letters name dimensions).

    Within each operand, the elements summed into one output value become one class; operands are
    then coupled along the output dimensions they share (``combine``). So ``q @ kᵀ`` over a head's
    features makes each attention head one class, shared by q, k and (through ``attn @ v``) v, and a
    contraction over a whole channel dimension leaves a single, unprunable class.
    """
    _contract_labels(b, call, [(b.label(t), tuple(t.shape), letters) for t, letters in operands], output)


def _contract_labels(b: TraceBuilder, call: Call, operands: list[tuple[Tensor, tuple, str]], output: str) -> None:
    items = []
    for labels, tensor_shape, letters in operands:
        if len(set(letters)) != len(letters) or len(letters) != len(tensor_shape):
            unknown(b, call)
            return
        kept = [letters.index(c) for c in output if c in letters]
        summed = [i for i, c in enumerate(letters) if c not in output]
        ordered = labels.permute(*kept, *summed).contiguous()
        kept_shape = ordered.shape[: len(kept)]
        collapsed = b.unify_rows(ordered.reshape(kept_shape.numel(), -1)).reshape(kept_shape)
        sizes = iter(collapsed.shape)
        label_shape = [next(sizes) if c in letters else 1 for c in output]
        shape = [tensor_shape[letters.index(c)] if c in letters else 1 for c in output]
        items.append((collapsed.reshape(label_shape), shape))
    set_all(b, call, combine(b, items, tuple(call.outputs[0].shape), call.name))


def _batch_letters(count: int) -> str:
    return string.ascii_uppercase[:count]


def _linear_like(b: TraceBuilder, call: Call, source: Tensor, weight: Tensor, bias: Tensor | None) -> None:
    """``source @ weight`` with a named 2-D parameter: a linear layer stored input-major (GPT-2's Conv1D)."""
    b.slot(weight, 0, "in", b.along(source, -1))
    produced = b.space(b.name_of(weight), 1, weight.shape[1])
    b.slot(weight, 1, "out", produced)
    out = call.outputs[0]
    b.set(out, produced.view([1] * (out.ndim - 1) + [-1]))
    if is_named(b, bias) and bias.ndim == 1 and bias.shape[0] == weight.shape[1]:
        b.slot(bias, 0, "follow", produced)
    elif bias is not None:
        add_computed_bias(b, call, bias)


@rule("matmul", "mm", "bmm", "rmatmul", "baddbmm", "addmm", "addbmm", "mv", "addmv", "dot", "vdot", "inner")
def matmul(b: TraceBuilder, call: Call) -> None:
    tensors = call.inputs
    bias = None
    if call.name in ("baddbmm", "addmm", "addbmm", "addmv"):
        bias, tensors = tensors[0], tensors[1:]
    if call.name == "rmatmul":
        tensors = tensors[::-1]
    left, right = tensors[:2]
    if left.ndim < 2 or right.ndim < 2 or call.name == "addbmm":
        unknown(b, call)
        return
    if right.ndim == 2 and is_named(b, right) and not is_named(b, left):
        _linear_like(b, call, left, right, bias)
        return
    batch = max(left.ndim, right.ndim) - 2
    letters = _batch_letters(batch)
    operands = [(left, letters[batch - (left.ndim - 2) :] + "ik"), (right, letters[batch - (right.ndim - 2) :] + "kj")]
    _contract(b, call, operands, letters + "ij")
    if bias is not None:
        out = call.outputs[0]
        items = [(b.label(out), tuple(out.shape)), (b.label(bias), effective_shape(b, bias))]
        b.set(out, combine(b, items, tuple(out.shape), call.name))


@rule("einsum")
def einsum(b: TraceBuilder, call: Call) -> None:
    equation = call.args[0].replace(" ", "")
    tensors = call.inputs
    if "->" not in equation:
        inputs = equation
        letters = [c for c in inputs if c.isalpha()]
        output = "".join(sorted(c for c in set(letters) if letters.count(c) == 1))
        equation = f"{inputs}->{output}"
    inputs, output = equation.split("->")
    terms = inputs.split(",")
    if len(terms) != len(tensors):
        unknown(b, call)
        return
    ellipsis = max(
        (t.ndim - len(term.replace("...", "")) for t, term in zip(tensors, terms, strict=True) if "..." in term),
        default=0,
    )
    batch = _batch_letters(ellipsis)
    expanded = []
    for tensor, term in zip(tensors, terms, strict=True):
        width = tensor.ndim - len(term.replace("...", ""))
        expanded.append((tensor, term.replace("...", batch[ellipsis - width :])))
    _contract(b, call, expanded, output.replace("...", batch))


@rule("scaled_dot_product_attention")
def attention(b: TraceBuilder, call: Call) -> None:
    query, key, value = call.args[:3]
    batch = _batch_letters(max(query.ndim, key.ndim, value.ndim) - 2)

    def letters(t: Tensor, tail: str) -> str:
        return batch[len(batch) - (t.ndim - 2) :] + tail

    def heads_repeated(t: Tensor) -> tuple[Tensor, tuple]:
        """With ``enable_gqa`` each key/value head serves a block of query heads: repeat its labels."""
        labels = b.label(t)
        if t.ndim < 3 or query.ndim < 3 or t.shape[-3] == query.shape[-3] or not call.kwargs.get("enable_gqa"):
            return labels, tuple(t.shape)
        repeat = query.shape[-3] // t.shape[-3]
        labels = labels.expand(t.shape).repeat_interleave(repeat, dim=-3)
        return labels, tuple(labels.shape)

    operands = [(b.label(query), tuple(query.shape), letters(query, "le"))]
    operands += [(*heads_repeated(key), letters(key, "se")), (*heads_repeated(value), letters(value, "sv"))]
    mask = call.arg(3, "attn_mask")
    if isinstance(mask, Tensor):
        operands.append((b.label(mask), effective_shape(b, mask), (batch + "ls")[len(batch) + 2 - mask.ndim :]))
    _contract_labels(b, call, operands, batch + "lv")
