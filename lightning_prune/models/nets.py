"""Architectures by name, so a checkpoint can rebuild its network from plain hyper-parameters."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

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


def _torchvision(name: str, num_classes: int, **kwargs: Any) -> nn.Module:
    import torchvision

    return torchvision.models.get_model(name, weights=None, num_classes=num_classes, **kwargs)


ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {"digits_cnn": DigitsCNN}


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
