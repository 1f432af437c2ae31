"""Ops over some dimensions: reductions, ops that mix values along one dimension, pooling, resampling, padding."""

from __future__ import annotations

import re
from typing import Any

from torch import Tensor

from lightning_prune.graph import labels as L
from lightning_prune.graph.builder import TraceBuilder
from lightning_prune.graph.rules.base import OP_RULES, Call, dims_argument, rule
from lightning_prune.graph.rules.elementwise import elementwise


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
    dims = [d % max(source.ndim, 1) for d in dims_argument(dim, source.ndim)]
    b.require(labels, dims, f"`{call.name}` across a channel dimension")
    for output in call.outputs:
        if output.ndim == source.ndim:  # topk and kthvalue keep fewer entries along it: any of the channels
            shrunk = {d for d in dims if output.shape[d] != source.shape[d]} & L.varying_dims(labels)
            b.set(output, labels.amin(dim=tuple(shrunk), keepdim=True) if shrunk else labels)


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
                OP_RULES.register(f"{_prefix}{_kind}_pool{_rank}d{_suffix}", pooling)
for _rank in "123":
    OP_RULES.register(f"max_unpool{_rank}d", pooling)


@rule("pad")
def pad(b: TraceBuilder, call: Call) -> None:
    source, amounts = call.args[0], list(call.arg(1, "pad"))
    affected = {source.ndim - 1 - i // 2 for i, amount in enumerate(amounts) if amount}
    _spatial(b, call, affected)
