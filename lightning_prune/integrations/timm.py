"""timm layers that keep channel counts in attributes: updates after surgery (registered by class name; nothing
here imports timm).

CSPNet's cross stages split their expansion in two halves by ``expand_chs // 2``, Res2Net's bottleneck splits
into scales of ``width`` channels, the selective-kernel convolution splits its input among its paths by
``in_channels // num_paths``, and MixNet's ``MixedConv2d`` by the list ``splits``. The tracer assumes such
splits follow a pruned width (equal parts lose equally many channels); these fixups make it so, from the
shapes of the layers each part feeds. timm's ``Attention`` (ViT, DeiT and the models built on it) reshapes its
fused q/k/v by stored ``num_heads`` × ``head_dim``: a cut of whole heads updates ``num_heads`` and ``attn_dim``.

ConvNeXt-V2's ``GlobalResponseNorm`` divides each channel's spatial norm by the mean of those norms over the
channels: a normalisation across channels like LayerNorm's (removing a channel changes the statistic of the
others slightly), not a mixing of them, so it is traced as a whole with its weight and bias per channel.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from lightning_prune.fixups import register_layer
from lightning_prune.graph import labels as L
from lightning_prune.graph.builder import TraceBuilder
from lightning_prune.graph.module_rules import register_module_rule

CSPNET = "timm.models.cspnet."


def _cross_stage(module: nn.Module) -> None:
    module.expand_chs = module.conv_exp.conv.weight.shape[0]


def _res2net_bottleneck(module: nn.Module) -> None:
    module.width = module.convs[0].weight.shape[1] * module.convs[0].groups


def _selective_kernel(module: nn.Module) -> None:
    convs = [path.conv for path in module.paths]
    reads = convs[0].weight.shape[1] * convs[0].groups
    module.in_channels = reads * len(convs) if module.split_input else reads
    module.out_channels = convs[0].weight.shape[0]


def _mixed_conv(module: nn.Module) -> None:
    convs = list(module.values())
    module.splits = [conv.weight.shape[1] * conv.groups for conv in convs]
    module.in_channels = sum(module.splits)
    module.out_channels = sum(conv.weight.shape[0] for conv in convs)


def _attention(module: nn.Module) -> None:
    """timm's ``Attention`` (ViT, DeiT, ...) reshapes its fused q/k/v by stored ``num_heads`` × ``head_dim``."""
    module.num_heads = module.qkv.weight.shape[0] // (3 * module.head_dim)
    module.attn_dim = module.num_heads * module.head_dim


register_layer(CSPNET + "CrossStage", _cross_stage)
register_layer(CSPNET + "CrossStage3", _cross_stage)
register_layer("timm.models.res2net.Bottle2neck", _res2net_bottleneck)
register_layer("timm.layers.selective_kernel.SelectiveKernel", _selective_kernel)
register_layer("timm.layers.mixed_conv2d.MixedConv2d", _mixed_conv)
register_layer("timm.layers.attention.Attention", _attention)


def _is_response_norm(module: nn.Module) -> bool:
    return type(module).__qualname__ == "GlobalResponseNorm" and type(module).__module__.startswith("timm.")


def _response_norm(b: TraceBuilder, module: nn.Module, inputs: tuple, output: Any) -> None:
    source = inputs[0] if inputs else None
    if not isinstance(source, Tensor) or not isinstance(output, Tensor) or source.ndim != 4:
        b.freeze_tensors([*inputs, output], "GlobalResponseNorm called oddly")
        return
    labels = b.label(source)
    dim = module.channel_dim % source.ndim
    if L.varying_dims(labels) - {dim}:
        b.freeze(labels, "GlobalResponseNorm over channels that vary along other dimensions")
        return
    channels = b.along(source, dim)
    b.normalized.append(channels)
    for tensor in (module.weight, module.bias):
        b.slot(tensor, 0, "follow", channels)
    b.set(output, labels)


register_module_rule("timm.global_response_norm", _is_response_norm, _response_norm)
