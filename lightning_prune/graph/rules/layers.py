"""Layers used through their functional form: convolutions, linear, embeddings and normalisations."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lightning_prune.graph import labels as L
from lightning_prune.graph.builder import TraceBuilder
from lightning_prune.graph.rules.base import Call, add_computed_bias, is_named, rule, set_all, unknown


def _layer_weight(b: TraceBuilder, call: Call, weight: Any) -> Tensor | None:
    """The parameter ``weight`` is, or is computed from row by row; None (the layer is left whole) otherwise.

    A weight whose rows are the rows of a parameter of its shape, each computed from its own (weight
    standardisation, see ``_standardised``: timm's ``StdConv2d``, NFNets' ``ScaledStdConv2d``), is that
    parameter's: its slots are the parameter's. Removing output channels is then exact; removing input
    channels changes the statistics of the rows a little, like removing channels under a LayerNorm (the
    caller marks the inputs ``normalized``).
    """
    if is_named(b, weight):
        return weight
    labels = b.label(weight, create=False) if isinstance(weight, Tensor) and weight.ndim >= 2 else None
    for name in list(b.raw) if labels is not None else []:
        rows = b.spaces.get((name, 0))
        same_shape = rows is not None and b.tensors[name].shape == weight.shape
        if same_shape and torch.equal(labels, rows.view(-1, *[1] * (weight.ndim - 1))):
            b.computed_weights.add(name)
            return b.tensors[name]
    b.whole.setdefault(b.where, f"its weight in `{call.name}` is computed in a way the engine cannot follow")
    unknown(b, call)
    return None


@rule("conv1d", "conv2d", "conv3d")
def convolution(b: TraceBuilder, call: Call) -> None:
    source, bias = call.arg(0, "input"), call.arg(2, "bias")
    groups = call.arg(6, "groups", 1)
    weight = _layer_weight(b, call, call.arg(1, "weight"))
    if weight is None:
        return
    channel_dim = 1 if source.ndim == weight.ndim else 0
    inputs = b.along(source, channel_dim)
    if weight is not call.arg(1, "weight"):
        b.normalized.append(inputs)
    produced = b.space(b.name_of(weight), 0, weight.shape[0])
    b.slot(weight, 0, "out", produced)
    if is_named(b, bias):
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
        b.convolution_groups.append((inputs.view(groups, -1), produced.view(groups, -1)))
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
    if not is_named(b, weight) or groups != 1:
        why = "its weight is computed" if groups == 1 else f"grouped transposed convolutions (groups={groups})"
        b.whole.setdefault(b.where, f"`{call.name}`: {why}, which the engine does not follow")
        unknown(b, call)
        return
    channel_dim = 1 if source.ndim == weight.ndim else 0
    b.slot(weight, 0, "in", b.along(source, channel_dim))
    produced = b.space(b.name_of(weight), 1, weight.shape[1])
    b.slot(weight, 1, "out", produced)
    if is_named(b, bias):
        b.slot(bias, 0, "follow", produced)
    out = call.outputs[0]
    shape = [1] * out.ndim
    shape[channel_dim] = weight.shape[1]
    b.set(out, produced.view(shape))


@rule("linear")
def linear(b: TraceBuilder, call: Call) -> None:
    source, bias = call.arg(0, "input"), call.arg(2, "bias")
    weight = _layer_weight(b, call, call.arg(1, "weight"))
    if weight is None:
        return
    inputs = b.along(source, -1)
    if weight is not call.arg(1, "weight"):
        b.normalized.append(inputs)
    b.slot(weight, 1, "in", inputs)
    produced = b.space(b.name_of(weight), 0, weight.shape[0])
    b.slot(weight, 0, "out", produced)
    if is_named(b, bias):
        b.slot(bias, 0, "follow", produced)
    out = call.outputs[0]
    b.set(out, produced.view([1] * (out.ndim - 1) + [-1]))
    if bias is not None and not is_named(b, bias):  # a computed bias (Swin v2 zeroes a copy's key part)
        add_computed_bias(b, call, bias)


@rule("embedding")
def embedding(b: TraceBuilder, call: Call) -> None:
    weight = call.arg(1, "weight")
    if not is_named(b, weight):
        b.whole.setdefault(b.where, "its embedding table is computed, which the engine does not follow")
        unknown(b, call)
        return
    produced = b.space(b.name_of(weight), 1, weight.shape[1])
    b.slot(weight, 1, "out", produced)
    out = call.outputs[0]
    b.set(out, produced.view([1] * (out.ndim - 1) + [-1]))


def _standardised(b: TraceBuilder, call: Call, tensors: list[Any], channel_dim: int) -> bool:
    """Batch statistics over the rows of a parameter (weight standardisation: ``F.batch_norm`` over
    ``weight.reshape(1, out_channels, -1)``, no running statistics): each row is normalised by itself.

    The rows become the parameter's output channels (its space along dim 0) and the affine entries follow
    them. Until a layer takes the result as its weight (``_layer_weight``), the parameter's entries stay raw
    and tied to their rows, so that rows used any other way are frozen with them.
    """
    source = call.args[0]
    labels = b.label(source)
    name = None if any(isinstance(t, Tensor) for t in tensors[:2]) else b.raw_owner(labels)
    size = source.shape[channel_dim]
    if name is None or b.raw[name].shape[0] != size:
        return False
    rows = L.along(labels, channel_dim, size)
    if not torch.equal(rows, b.raw[name].reshape(size, -1)):
        return False
    channels = b.space(name, 0, size)
    b.unify(channels, rows[:, 0])
    for tensor in tensors[2:]:
        if isinstance(tensor, Tensor):
            b.unify(channels, b.along(tensor, 0))
    shape = [1] * source.ndim
    shape[channel_dim] = -1
    set_all(b, call, channels.view(shape))
    return True


def _per_channel(b: TraceBuilder, call: Call, tensors: list[Any], channel_dim: int) -> Tensor | None:
    source = call.args[0]
    if set(L.varying_dims(b.label(source))) - {channel_dim}:
        b.freeze(b.label(source), f"`{call.name}` over multi-dimensional channel labels")
        return None
    channels = b.along(source, channel_dim)
    for tensor in tensors:
        if is_named(b, tensor):
            b.slot(tensor, 0, "follow", channels)
        elif isinstance(tensor, Tensor):
            b.freeze(channels, f"`{call.name}` with a computed per-channel tensor")
    set_all(b, call, b.label(source))
    return channels


@rule("batch_norm", "instance_norm")
def batch_norm(b: TraceBuilder, call: Call) -> None:
    tensors = [call.arg(i, n) for i, n in enumerate(("running_mean", "running_var", "weight", "bias"), 1)]
    if call.name == "batch_norm" and _standardised(b, call, tensors, 1):
        return
    _per_channel(b, call, tensors, 1)


@rule("prelu")
def prelu(b: TraceBuilder, call: Call) -> None:
    weight, source = call.arg(1, "weight"), call.args[0]
    if weight.numel() == 1:
        set_all(b, call, b.label(source))
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
        if not is_named(b, weight):
            b.freeze(labels, f"`{call.name}` without affine parameters")
            return
        channels = b.along(source, dim)
        b.normalized.append(channels)
        for tensor in (weight, bias):
            if is_named(b, tensor):
                b.slot(tensor, offset, "follow", channels)
    set_all(b, call, labels)
