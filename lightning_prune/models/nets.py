"""Architectures by name, so a checkpoint can rebuild its network from plain hyper-parameters."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def conv_bn(inputs: int, outputs: int) -> list[nn.Module]:
    return [nn.Conv2d(inputs, outputs, 3, padding=1, bias=False), nn.BatchNorm2d(outputs), nn.ReLU(inplace=True)]


class DigitsCNN(nn.Module):
    """A small VGG-style CNN with BatchNorm for 8×8 digits: two conv pairs, max-pools, one conv, global pool."""

    def __init__(self, channels: Sequence[int] = (32, 64, 128), in_channels: int = 1, num_classes: int = 10) -> None:
        super().__init__()
        first, second, third = channels
        self.features = nn.Sequential(
            *conv_bn(in_channels, first), *conv_bn(first, first), nn.MaxPool2d(2),
            *conv_bn(first, second), *conv_bn(second, second), nn.MaxPool2d(2),
            *conv_bn(second, third), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )  # fmt: skip
        self.classifier = nn.Linear(third, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))


class CifarResNet(nn.Module):
    """The CIFAR ResNet of He et al. (2016): three stages of 16/32/64 channels, ``(depth - 2) / 6`` basic blocks each.

    Shortcuts that change shape are 1×1 conv + BatchNorm projections (option B), as in most pruning papers.
    ``depth=20`` and ``56`` are registered as ``"resnet20"`` and ``"resnet56"``.
    """

    def __init__(self, depth: int = 20, in_channels: int = 3, num_classes: int = 10, width: int = 16) -> None:
        super().__init__()
        if depth < 8 or (depth - 2) % 6:
            raise ValueError(f"`depth` of a CIFAR ResNet is 6n + 2 (20, 32, 44, 56, 110); got {depth}.")
        blocks = (depth - 2) // 6
        self.stem = nn.Sequential(*conv_bn(in_channels, width))
        layers, channels = [], width
        for stage in range(3):
            outputs = width * 2**stage
            for block in range(blocks):
                layers.append(BasicBlock(channels, outputs, stride=2 if stage and not block else 1))
                channels = outputs
        self.layers = nn.Sequential(*layers)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.classifier = nn.Linear(channels, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.pool(self.layers(self.stem(x))))


class BasicBlock(nn.Module):
    """Two 3×3 conv + BatchNorm layers with an identity (or projection) shortcut."""

    def __init__(self, inputs: int, outputs: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inputs, outputs, 3, stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(outputs)
        self.conv2 = nn.Conv2d(outputs, outputs, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(outputs)
        self.shortcut = nn.Identity()
        if stride != 1 or inputs != outputs:
            self.shortcut = nn.Sequential(nn.Conv2d(inputs, outputs, 1, stride, bias=False), nn.BatchNorm2d(outputs))

    def forward(self, x: Tensor) -> Tensor:
        out = self.bn1(self.conv1(x)).relu()
        return (self.bn2(self.conv2(out)) + self.shortcut(x)).relu()


VGG_LAYOUTS: dict[int, list[int | str]] = {
    11: [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512],
    19: [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512],
}


class CifarVGG(nn.Module):
    """The VGG with BatchNorm of the Network Slimming paper (Liu et al. 2017) for 32×32 images.

    3×3 conv + BatchNorm + ReLU layers with max-pools (``"M"`` in ``layout``), global average pooling and
    one linear classifier. ``layout`` defaults to ``VGG_LAYOUTS[depth]``; registered as ``"vgg11"``/``"vgg19"``.
    """

    def __init__(
        self, depth: int = 19, in_channels: int = 3, num_classes: int = 10, layout: Sequence[int | str] | None = None
    ) -> None:
        super().__init__()
        if layout is None and depth not in VGG_LAYOUTS:
            raise ValueError(f"`depth` must be one of {sorted(VGG_LAYOUTS)} (or give `layout`); got {depth}.")
        layers: list[nn.Module] = []
        channels = in_channels
        for entry in layout or VGG_LAYOUTS[depth]:
            if entry == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += conv_bn(channels, int(entry))
                channels = int(entry)
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.classifier = nn.Linear(channels, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))


def _torchvision(name: str, num_classes: int, **kwargs: Any) -> nn.Module:
    import torchvision

    return torchvision.models.get_model(name, weights=None, num_classes=num_classes, **kwargs)


class Attention(nn.Module):
    """Multi-head self-attention written as most code does it: projections, ``view(..., -1, head_dim)``, SDPA."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.head_dim = dim // heads
        self.query, self.key, self.value = (nn.Linear(dim, dim) for _ in range(3))
        self.out = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, n, _ = x.shape
        q, k, v = (p(x).view(b, n, -1, self.head_dim).transpose(1, 2) for p in (self.query, self.key, self.value))
        return self.out(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, -1))


class TransformerBlock(nn.Module):
    def __init__(self, dim: int, heads: int, hidden: int) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attention = Attention(dim, heads)
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attention(self.norm1(x))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class DigitsTransformer(nn.Module):
    """A small vision transformer for 8×8 digits: 2×2 patches as 16 tokens, pre-norm blocks, mean pooling."""

    def __init__(
        self,
        dim: int = 64,
        depth: int = 4,
        heads: int = 4,
        hidden: int = 128,
        in_channels: int = 1,
        num_classes: int = 10,
    ) -> None:
        super().__init__()
        self.patch = nn.Conv2d(in_channels, dim, 2, stride=2)
        self.position = nn.Parameter(torch.zeros(1, 16, dim))
        self.blocks = nn.ModuleList(TransformerBlock(dim, heads, hidden) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.patch(x).flatten(2).transpose(1, 2) + self.position
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x).mean(1))


ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {
    "digits_cnn": DigitsCNN,
    "digits_transformer": DigitsTransformer,
    "resnet20": functools.partial(CifarResNet, depth=20),
    "resnet56": functools.partial(CifarResNet, depth=56),
    "vgg11": functools.partial(CifarVGG, depth=11),
    "vgg19": functools.partial(CifarVGG, depth=19),
}


def build_network(arch: str, num_classes: int, in_channels: int = 3, **kwargs: Any) -> nn.Module:
    """``arch`` is a name of :data:`ARCHITECTURES` or ``"torchvision:<model name>"`` (random weights)."""
    if arch.startswith("torchvision:"):
        if in_channels != 3:
            raise ValueError(f"torchvision models take 3 input channels; `in_channels` is {in_channels}.")
        return _torchvision(arch.split(":", 1)[1], num_classes, **kwargs)
    if arch not in ARCHITECTURES:
        raise ValueError(
            f"`arch` {arch!r} is not known. Known: {', '.join(sorted(ARCHITECTURES))}, or 'torchvision:<name>' "
            "for any torchvision classification model (weights=None)."
        )
    return ARCHITECTURES[arch](in_channels=in_channels, num_classes=num_classes, **kwargs)
