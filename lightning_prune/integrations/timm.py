"""timm layers that keep channel counts in attributes: updates after surgery (registered by class name; nothing
here imports timm).

CSPNet's cross stages split their expansion in two halves by ``expand_chs // 2``, Res2Net's bottleneck splits
into scales of ``width`` channels, the selective-kernel convolution splits its input among its paths by
``in_channels // num_paths``, and MixNet's ``MixedConv2d`` by the list ``splits``. The tracer assumes such
splits follow a pruned width (equal parts lose equally many channels); these fixups make it so, from the
shapes of the layers each part feeds.
"""

from __future__ import annotations

from torch import nn

from lightning_prune.fixups import register_layer

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


register_layer(CSPNET + "CrossStage", _cross_stage)
register_layer(CSPNET + "CrossStage3", _cross_stage)
register_layer("timm.models.res2net.Bottle2neck", _res2net_bottleneck)
register_layer("timm.layers.selective_kernel.SelectiveKernel", _selective_kernel)
register_layer("timm.layers.mixed_conv2d.MixedConv2d", _mixed_conv)
