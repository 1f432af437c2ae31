"""How each torch function moves channel labels from its inputs to its outputs.

Rules are looked up by the function's name (``F.conv2d`` and ``torch.conv2d`` are both ``conv2d``;
``x += y`` is ``add``). A function without a rule is treated conservatively: every channel that
flows into it is frozen (never pruned) and its outputs are of unknown origin. That is how the
engine stays correct on code it does not understand: it prunes less, never wrongly.
"""

from __future__ import annotations

import re
import string
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from lightning_prune.graph import labels as L
from lightning_prune.graph.labels import FROZEN
from lightning_prune.graph.tracer import TraceBuilder


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
        return [value for value in _leaves((self.args, self.kwargs)) if isinstance(value, Tensor)]

    @property
    def outputs(self) -> list[Tensor]:
        return [value for value in _leaves(self.out) if isinstance(value, Tensor)]


Rule = Callable[[TraceBuilder, Call], None]
RULES: dict[str, Rule] = {}


def _leaves(value: Any) -> Iterator[Any]:
    if isinstance(value, tuple | list):
        for item in value:
            yield from _leaves(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _leaves(item)
    else:
        yield value


def _names(text: str) -> list[str]:
    return text.split()


def rule(*names: str) -> Callable[[Rule], Rule]:
    def register(function: Rule) -> Rule:
        for name in names:
            RULES[name] = function
        return function

    return register


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
    if not any(isinstance(value, Tensor) for value in _leaves(out)):
        return
    call = Call(canonical_name(func), func, args, kwargs, out)
    RULES.get(call.name, unknown)(builder, call)


def unknown(b: TraceBuilder, call: Call) -> None:
    b.freeze_tensors(call.inputs, f"unsupported op `{call.name}`")


# --- combining labels under broadcasting ---------------------------------------------------------
def _full(shape: Sequence[int], out_shape: Sequence[int]) -> frozenset[int]:
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
        full = _full(shape, out_shape)
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


def _set_all(b: TraceBuilder, call: Call, labels: Tensor) -> None:
    for output in call.outputs:
        b.set(output, L.align(labels, output.ndim) if labels.ndim != output.ndim else labels)


# --- elementwise ---------------------------------------------------------------------------------
_ELEMENTWISE = _names(
    """
add sub rsub mul div true_divide floor_divide remainder fmod pow float_power maximum minimum fmax fmin atan2
arctan2 hypot where lerp addcmul addcdiv masked_fill copy eq ne lt le gt ge greater greater_equal less
less_equal not_equal equal logical_and logical_or logical_xor bitwise_and bitwise_or bitwise_xor clamp clip
clamp_min clamp_max heaviside xlogy copysign nextafter relu relu6 leaky_relu elu selu celu gelu silu mish
sigmoid hardsigmoid hardswish hardtanh tanh softplus softsign tanhshrink hardshrink softshrink threshold
logsigmoid rrelu dropout dropout1d dropout2d dropout3d alpha_dropout feature_alpha_dropout abs absolute neg
negative exp exp2 expm1 log log2 log10 log1p sqrt rsqrt square reciprocal sin cos tan sinh cosh asin acos atan
arcsin arccos arctan erf erfc erfinv sign sgn signbit floor ceil round trunc fix frac nan_to_num pos positive
logit isnan isinf isfinite isposinf isneginf logical_not bitwise_not deg2rad rad2deg i0 sinc lgamma digamma
"""
)


@rule(*_ELEMENTWISE)
def elementwise(b: TraceBuilder, call: Call) -> None:
    out = call.outputs[0]
    items = [(b.label(t), tuple(t.shape)) for t in call.inputs]
    _set_all(b, call, combine(b, items, tuple(out.shape), call.name))


_LIKE = _names(
    """
to type type_as contiguous clone detach float double half bfloat16 int long short bool cpu cuda requires_grad
zero fill bernoulli uniform normal exponential random cauchy log_normal geometric zeros_like ones_like
empty_like full_like rand_like randn_like randint_like data pin_memory share_memory_ coalesce
"""
)


@rule(*_LIKE)
def like(b: TraceBuilder, call: Call) -> None:
    """Same positions as the first argument (dtype or device changes, fills, ``*_like`` factories)."""
    source = call.inputs[0]
    for output in call.outputs:
        if output.shape == source.shape:
            b.set(output, b.label(source))


@rule("new_zeros", "new_ones", "new_empty", "new_full", "new_tensor", "detach_copy")
def factory(b: TraceBuilder, call: Call) -> None:
    """New tensors of explicit sizes: of unknown origin, and they read nothing of their template."""


# --- moving data around --------------------------------------------------------------------------
def _replay(b: TraceBuilder, call: Call, data: list[Tensor]) -> list[Tensor] | None:
    """Run the op again with label tensors in place of ``data``; None if it cannot run on integers."""
    substitutes = {id(t): b.expanded(t) for t in data}

    def swap(value: Any) -> Any:
        if isinstance(value, Tensor) and id(value) in substitutes:
            return substitutes[id(value)]
        if isinstance(value, list | tuple) and any(isinstance(v, Tensor) for v in value):
            return type(value)(swap(v) for v in value)
        return value

    try:
        result = call.func(*[swap(a) for a in call.args], **{k: swap(v) for k, v in call.kwargs.items()})
    except (RuntimeError, TypeError, NotImplementedError):
        return None
    produced = [value for value in _leaves(result) if isinstance(value, Tensor)]
    return produced if len(produced) == len(call.outputs) else None


def _moved(b: TraceBuilder, call: Call, data: list[Tensor], selected: Iterable[int] = ()) -> None:
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
        b.require(b.label(tensor), selected, f"`{call.name}` selects part of a channel dimension")
    for output, labels in zip(call.outputs, replayed, strict=True):
        labels = L.compress(labels)
        if len(L.varying_dims(labels)) > before:
            b.require(labels, L.varying_dims(labels), f"`{call.name}` splits a channel dimension", split=True)
        b.set(output, labels)


_MOVEMENT = _names(
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


def _dims_argument(value: Any, ndim: int) -> list[int]:
    if value is None:
        return list(range(ndim))
    return [value] if isinstance(value, int) else list(value)


@rule("roll")
def roll(b: TraceBuilder, call: Call) -> None:
    source = call.args[0]
    _moved(b, call, [source], selected=_dims_argument(call.arg(2, "dims", None), source.ndim))


@rule("narrow", "select", "index_select", "gather")
def along_one_dim(b: TraceBuilder, call: Call) -> None:
    _moved(b, call, [call.args[0]], selected=[call.arg(1, "dim")])


@rule("take_along_dim")
def take_along_dim(b: TraceBuilder, call: Call) -> None:
    source = call.args[0]
    _moved(b, call, [source], selected=_dims_argument(call.arg(2, "dim", None), source.ndim))


@rule("masked_select", "take")
def flattening_selection(b: TraceBuilder, call: Call) -> None:
    source = call.args[0]
    _moved(b, call, [source], selected=range(source.ndim))


def _indexed_dims(index: Any, ndim: int) -> set[int] | None:
    """Source dimensions an index selects part of (ints, tensors, slices other than ``:``); None if unparsed."""
    entries = list(index) if isinstance(index, tuple) else [index]
    if sum(1 for e in entries if e is Ellipsis) > 1:
        return None

    def width(entry: Any) -> int:
        if entry is None:
            return 0
        return entry.ndim if isinstance(entry, Tensor) and entry.dtype == torch.bool else 1

    explicit = sum(width(e) for e in entries if e is not Ellipsis)
    dims: set[int] = set()
    position = 0
    for entry in entries:
        if entry is None:
            continue
        if entry is Ellipsis:
            position += ndim - explicit
            continue
        if isinstance(entry, slice):
            if entry != slice(None):
                dims.add(position)
        elif isinstance(entry, int | Tensor | list) or hasattr(entry, "__index__"):
            dims.update(range(position, position + width(entry)))
        else:
            return None
        position += width(entry)
    return dims


@rule("getitem")
def getitem(b: TraceBuilder, call: Call) -> None:
    source = call.args[0]
    dims = _indexed_dims(call.args[1], source.ndim)
    if dims is None:
        b.freeze(b.label(source), "an index the engine cannot parse")
        return
    _moved(b, call, [source], selected=dims)


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


@rule("split", "chunk", "tensor_split", "unbind", "split_with_sizes", "hsplit", "vsplit")
def partition(b: TraceBuilder, call: Call) -> None:
    source = call.args[0]
    default = {"unbind": 0, "hsplit": 1 if source.ndim > 1 else 0, "vsplit": 0}.get(call.name, 0)
    dim = call.arg(1 if call.name == "unbind" else 2, "dim", default) % source.ndim
    if call.name in ("hsplit", "vsplit"):
        dim = default
    if dim not in L.varying_dims(b.label(source)):
        _moved(b, call, [source])
        return
    if call.name == "unbind":
        _moved(b, call, [source], selected=[dim])
        return
    sizes = {output.shape[dim] for output in call.outputs}
    if len(sizes) != 1 or len(call.outputs) < 2:
        _moved(b, call, [source], selected=[dim])
        return
    _moved(b, call, [source])
    blocks = [b.along(output, dim) for output in call.outputs]
    b.partitions.append((blocks, f"`{call.name}` in `{b.where}`"))


# --- ops over some dimensions --------------------------------------------------------------------
def _dims(value: Any, ndim: int) -> set[int] | None:
    if value is None or (isinstance(value, tuple | list) and len(value) == 0):
        return None
    if isinstance(value, int):
        return {value % max(ndim, 1)}
    if isinstance(value, tuple | list) and all(isinstance(v, int) for v in value):
        return {v % max(ndim, 1) for v in value}
    return set()


@rule("sum", "mean", "nansum", "nanmean", "amax", "amin", "max", "min", "std", "var", "norm", "prod",
      "logsumexp", "all", "any", "argmax", "argmin", "count_nonzero", "median", "nanmedian", "mode",
      "std_mean", "var_mean", "aminmax")  # fmt: skip
def reduction(b: TraceBuilder, call: Call) -> None:
    source = call.args[0]
    if call.name in ("max", "min") and len(call.args) > 1 and isinstance(call.args[1], Tensor):
        elementwise(b, call)
        return
    dim = call.arg(2, "dim") if call.name == "norm" else call.arg(1, "dim", call.kwargs.get("axis"))
    if isinstance(dim, bool):
        dim = None
    reduced = _dims(dim, source.ndim)
    reduced = set(range(source.ndim)) if reduced is None else reduced
    labels = b.label(source)
    b.require(labels, reduced, f"`{call.name}` over a channel dimension")
    labels = labels.amin(dim=tuple(reduced), keepdim=True) if reduced & L.varying_dims(labels) else labels
    for output in call.outputs:
        kept = labels
        if output.ndim != source.ndim:
            kept = kept.reshape([s for d, s in enumerate(kept.shape) if d not in reduced])
        b.set(output, kept)


_MIXING = {
    "softmax": 1, "log_softmax": 1, "softmin": 1, "cumsum": 1, "cumprod": 1, "logcumsumexp": 1,
    "cummax": 1, "cummin": 1, "normalize": 2, "sort": 1, "argsort": 1, "topk": 2, "kthvalue": 2, "glu": 1,
}  # fmt: skip
_MIXING_DEFAULT = {"normalize": 1, "sort": -1, "argsort": -1, "topk": -1, "kthvalue": -1, "glu": -1}


@rule(*_MIXING)
def mixing(b: TraceBuilder, call: Call) -> None:
    """Ops that mix values along one dimension: fine unless that dimension holds channels."""
    source = call.args[0]
    labels = b.label(source)
    dim = call.arg(_MIXING[call.name], "dim", _MIXING_DEFAULT.get(call.name))
    b.require(labels, _dims_argument(dim, source.ndim), f"`{call.name}` across a channel dimension")
    for output in call.outputs:
        if output.ndim == source.ndim:
            b.set(output, labels)


_SPATIAL = re.compile(r"^(adaptive_)?(avg|max|lp|fractional_max)_pool([123])d(_with_indices)?$|^max_unpool([123])d$")


def _spatial(b: TraceBuilder, call: Call, affected: set[int]) -> None:
    source = call.args[0]
    labels = b.label(source)
    b.require(labels, affected, f"`{call.name}` over a channel dimension")
    if affected & L.varying_dims(labels):
        labels = labels.amin(dim=tuple(affected), keepdim=True)
    for output in call.outputs:
        if output.ndim == source.ndim:
            b.set(output, labels)


@rule("interpolate", "upsample", "upsample_nearest", "upsample_bilinear", "grid_sample", "affine_grid")
def resample(b: TraceBuilder, call: Call) -> None:
    source = call.args[0]
    _spatial(b, call, set(range(2, source.ndim)))


def pooling(b: TraceBuilder, call: Call) -> None:
    match = _SPATIAL.match(call.name)
    spatial = int(match.group(3) or match.group(5))
    source = call.args[0]
    _spatial(b, call, set(range(source.ndim - spatial, source.ndim)))


for _kind in ("avg", "max", "lp", "fractional_max"):
    for _rank in "123":
        for _prefix in ("", "adaptive_"):
            for _suffix in ("", "_with_indices"):
                RULES[f"{_prefix}{_kind}_pool{_rank}d{_suffix}"] = pooling
    RULES.update({f"max_unpool{r}d": pooling for r in "123"})


@rule("pad")
def pad(b: TraceBuilder, call: Call) -> None:
    source, amounts = call.args[0], list(call.arg(1, "pad"))
    affected = {source.ndim - 1 - i // 2 for i, amount in enumerate(amounts) if amount}
    _spatial(b, call, affected)


# --- contractions --------------------------------------------------------------------------------
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
    _set_all(b, call, combine(b, items, tuple(call.outputs[0].shape), call.name))


def _batch_letters(count: int) -> str:
    return string.ascii_uppercase[:count]


def _linear_like(b: TraceBuilder, call: Call, source: Tensor, weight: Tensor, bias: Tensor | None) -> None:
    """``source @ weight`` with a named 2-D parameter: a linear layer stored input-major (GPT-2's Conv1D)."""
    b.slot(weight, 0, "in", b.along(source, -1))
    produced = b.space(b.name_of(weight), 1, weight.shape[1])
    b.slot(weight, 1, "out", produced)
    out = call.outputs[0]
    b.set(out, produced.view([1] * (out.ndim - 1) + [-1]))
    if _named(b, bias) and bias.ndim == 1 and bias.shape[0] == weight.shape[1]:
        b.slot(bias, 0, "follow", produced)
    elif bias is not None:
        _add_computed_bias(b, call, bias)


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
    if right.ndim == 2 and _named(b, right) and not _named(b, left):
        _linear_like(b, call, left, right, bias)
        return
    batch = max(left.ndim, right.ndim) - 2
    letters = _batch_letters(batch)
    operands = [(left, letters[batch - (left.ndim - 2) :] + "ik"), (right, letters[batch - (right.ndim - 2) :] + "kj")]
    _contract(b, call, operands, letters + "ij")
    if bias is not None:
        out = call.outputs[0]
        items = [(b.label(out), tuple(out.shape)), (b.label(bias), tuple(bias.shape))]
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
        operands.append((b.label(mask), tuple(mask.shape), (batch + "ls")[len(batch) + 2 - mask.ndim :]))
    _contract_labels(b, call, operands, batch + "lv")


# --- layers used through their functional form ---------------------------------------------------
def _named(b: TraceBuilder, tensor: Any) -> bool:
    return isinstance(tensor, Tensor) and b.name_of(tensor) is not None


@rule("conv1d", "conv2d", "conv3d")
def convolution(b: TraceBuilder, call: Call) -> None:
    source, weight, bias = call.arg(0, "input"), call.arg(1, "weight"), call.arg(2, "bias")
    groups = call.arg(6, "groups", 1)
    if not _named(b, weight):
        unknown(b, call)
        return
    channel_dim = 1 if source.ndim == weight.ndim else 0
    inputs = b.along(source, channel_dim)
    produced = b.space(b.name_of(weight), 0, weight.shape[0])
    b.slot(weight, 0, "out", produced)
    if _named(b, bias):
        b.slot(bias, 0, "follow", produced)
    if groups == 1:
        b.slot(weight, 1, "in", inputs)
    elif weight.shape[1] == 1:  # depthwise: output channel o reads input channel o // multiplier
        b.unify(produced.view(groups, -1), inputs.view(groups, 1))
        b.floors.append((inputs, 2))  # one group left would make it an ordinary convolution
    else:
        b.slot(weight, 1, "in", inputs, groups=groups)
        b.floors.extend((block, 2) for block in inputs.view(groups, -1))  # one input per group: depthwise
        reason = f"grouped convolution `{b.where}` (groups={groups})"
        b.partitions.append((list(inputs.view(groups, -1)), reason))
        b.partitions.append((list(produced.view(groups, -1)), reason))
    out = call.outputs[0]
    shape = [1] * out.ndim
    shape[channel_dim] = weight.shape[0]
    b.set(out, produced.view(shape))


@rule("conv_transpose1d", "conv_transpose2d", "conv_transpose3d")
def transposed_convolution(b: TraceBuilder, call: Call) -> None:
    source, weight, bias = call.arg(0, "input"), call.arg(1, "weight"), call.arg(2, "bias")
    groups = call.arg(6, "groups", 1)
    if not _named(b, weight) or groups != 1:
        unknown(b, call)
        return
    channel_dim = 1 if source.ndim == weight.ndim else 0
    b.slot(weight, 0, "in", b.along(source, channel_dim))
    produced = b.space(b.name_of(weight), 1, weight.shape[1])
    b.slot(weight, 1, "out", produced)
    if _named(b, bias):
        b.slot(bias, 0, "follow", produced)
    out = call.outputs[0]
    shape = [1] * out.ndim
    shape[channel_dim] = weight.shape[1]
    b.set(out, produced.view(shape))


@rule("linear")
def linear(b: TraceBuilder, call: Call) -> None:
    source, weight, bias = call.arg(0, "input"), call.arg(1, "weight"), call.arg(2, "bias")
    if not _named(b, weight):
        unknown(b, call)
        return
    b.slot(weight, 1, "in", b.along(source, -1))
    produced = b.space(b.name_of(weight), 0, weight.shape[0])
    b.slot(weight, 0, "out", produced)
    if _named(b, bias):
        b.slot(bias, 0, "follow", produced)
    out = call.outputs[0]
    b.set(out, produced.view([1] * (out.ndim - 1) + [-1]))
    if bias is not None and not _named(b, bias):  # a computed bias (Swin v2 zeroes a copy's key part)
        _add_computed_bias(b, call, bias)


def _add_computed_bias(b: TraceBuilder, call: Call, bias: Tensor) -> None:
    out = call.outputs[0]
    items = [(b.label(out), tuple(out.shape)), (b.label(bias), tuple(bias.shape))]
    b.set(out, combine(b, items, tuple(out.shape), call.name))


@rule("embedding")
def embedding(b: TraceBuilder, call: Call) -> None:
    weight = call.arg(1, "weight")
    if not _named(b, weight):
        unknown(b, call)
        return
    produced = b.space(b.name_of(weight), 1, weight.shape[1])
    b.slot(weight, 1, "out", produced)
    out = call.outputs[0]
    b.set(out, produced.view([1] * (out.ndim - 1) + [-1]))


def _per_channel(b: TraceBuilder, call: Call, tensors: list[Any], channel_dim: int) -> Tensor | None:
    source = call.args[0]
    if set(L.varying_dims(b.label(source))) - {channel_dim}:
        b.freeze(b.label(source), f"`{call.name}` over multi-dimensional channel labels")
        return None
    channels = b.along(source, channel_dim)
    for tensor in tensors:
        if _named(b, tensor):
            b.slot(tensor, 0, "follow", channels)
        elif isinstance(tensor, Tensor):
            b.freeze(channels, f"`{call.name}` with a computed per-channel tensor")
    _set_all(b, call, b.label(source))
    return channels


@rule("batch_norm", "instance_norm")
def batch_norm(b: TraceBuilder, call: Call) -> None:
    tensors = [call.arg(i, n) for i, n in enumerate(("running_mean", "running_var", "weight", "bias"), 1)]
    _per_channel(b, call, tensors, 1)


@rule("prelu")
def prelu(b: TraceBuilder, call: Call) -> None:
    weight, source = call.arg(1, "weight"), call.args[0]
    if weight.numel() == 1:
        _set_all(b, call, b.label(source))
        return
    _per_channel(b, call, [weight], 1 if source.ndim > 1 else 0)


@rule("group_norm")
def group_norm(b: TraceBuilder, call: Call) -> None:
    groups = call.arg(1, "num_groups")
    channels = _per_channel(b, call, [call.arg(2, "weight"), call.arg(3, "bias")], 1)
    if channels is not None:
        b.normalized.append(channels)
        if groups > 1:
            b.partitions.append((list(channels.view(groups, -1)), f"GroupNorm `{b.where}` (num_groups={groups})"))


@rule("layer_norm", "rms_norm")
def layer_norm(b: TraceBuilder, call: Call) -> None:
    source, shape = call.args[0], call.arg(1, "normalized_shape")
    weight = call.arg(2, "weight")
    bias = call.arg(3, "bias") if call.name == "layer_norm" else None
    labels = b.label(source)
    first = source.ndim - len(shape)
    for offset in range(len(shape)):
        dim = first + offset
        if dim not in L.varying_dims(labels):
            continue
        if not _named(b, weight):
            b.freeze(labels, f"`{call.name}` without affine parameters")
            return
        channels = b.along(source, dim)
        b.normalized.append(channels)
        for tensor in (weight, bias):
            if _named(b, tensor):
                b.slot(tensor, offset, "follow", channels)
    _set_all(b, call, labels)
