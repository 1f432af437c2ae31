"""Layers used through their functional form: convolutions, linear, embeddings and normalisations."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from lightning_prune.graph import labels as L
from lightning_prune.graph.builder import TraceBuilder
from lightning_prune.graph.rules.base import Call, add_computed_bias, is_named, rule, set_all, unknown


@rule("conv1d", "conv2d", "conv3d")
def convolution(b: TraceBuilder, call: Call) -> None:
    source, weight, bias = call.arg(0, "input"), call.arg(1, "weight"), call.arg(2, "bias")
    groups = call.arg(6, "groups", 1)
    if not is_named(b, weight):
        unknown(b, call)
        return
    channel_dim = 1 if source.ndim == weight.ndim else 0
    inputs = b.along(source, channel_dim)
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
    source, weight, bias = call.arg(0, "input"), call.arg(1, "weight"), call.arg(2, "bias")
    if not is_named(b, weight):
        unknown(b, call)
        return
    b.slot(weight, 1, "in", b.along(source, -1))
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
        if is_named(b, tensor):
            b.slot(tensor, 0, "follow", channels)
        elif isinstance(tensor, Tensor):
            b.freeze(channels, f"`{call.name}` with a computed per-channel tensor")
    set_all(b, call, b.label(source))
    return channels


@rule("batch_norm", "instance_norm")
def batch_norm(b: TraceBuilder, call: Call) -> None:
    tensors = [call.arg(i, n) for i, n in enumerate(("running_mean", "running_var", "weight", "bias"), 1)]
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
