"""Small networks, one per coupling pattern the engine must discover, and the equivalence reference."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_prune import DependencyGraph, Plan


class PlainCNN(nn.Module):
    """conv → BN → ReLU chains, max-pool, flatten → Linear → Linear (each channel owns a spatial block)."""

    def __init__(self, batch_norm: bool = True) -> None:
        super().__init__()
        norm = nn.BatchNorm2d if batch_norm else (lambda c: nn.Identity())
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), norm(16), nn.ReLU(),
            nn.Conv2d(16, 24, 3, padding=1), norm(24), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(24, 32, 3, padding=1), norm(32), nn.ReLU(), nn.MaxPool2d(2),
        )  # fmt: skip
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(32 * 4 * 4, 40), nn.ReLU(), nn.Linear(40, 10))

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))


class ResidualNet(nn.Module):
    """Two residual blocks sharing one stream, the second with a projection shortcut."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.block1 = nn.Sequential(nn.Conv2d(16, 12, 3, padding=1), nn.BatchNorm2d(12), nn.ReLU(),
                                    nn.Conv2d(12, 16, 3, padding=1), nn.BatchNorm2d(16))  # fmt: skip
        self.block2 = nn.Sequential(nn.Conv2d(16, 20, 3, padding=1), nn.BatchNorm2d(20), nn.ReLU(),
                                    nn.Conv2d(20, 24, 3, padding=1), nn.BatchNorm2d(24))  # fmt: skip
        self.shortcut = nn.Sequential(nn.Conv2d(16, 24, 1), nn.BatchNorm2d(24))
        self.head = nn.Linear(24, 10)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        x = F.relu(x + self.block1(x))
        x = F.relu(self.shortcut(x) + self.block2(x))
        return self.head(x.mean((2, 3)))


class ConcatNet(nn.Module):
    """Inception-like branches concatenated on channels, then a consumer of the concatenation."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(3, 8, 1), nn.BatchNorm2d(8), nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(3, 12, 3, padding=1), nn.BatchNorm2d(12), nn.ReLU())
        self.mix = nn.Sequential(nn.Conv2d(20, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.head = nn.Linear(16 + 20, 10)

    def forward(self, x: Tensor) -> Tensor:
        joined = torch.cat([self.a(x), self.b(x)], dim=1)
        pooled = torch.cat([self.mix(joined).amax((2, 3)), joined.mean((2, 3))], dim=1)
        return self.head(pooled)


class MobileNet(nn.Module):
    """Inverted residual with a depthwise conv (multiplier 2), squeeze-excitation gate and hardswish."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.Hardswish())
        self.expand = nn.Sequential(nn.Conv2d(16, 24, 1), nn.BatchNorm2d(24), nn.ReLU6())
        self.depthwise = nn.Sequential(nn.Conv2d(24, 48, 3, padding=1, groups=24), nn.BatchNorm2d(48), nn.ReLU6())
        self.squeeze = nn.Conv2d(48, 8, 1)
        self.excite = nn.Conv2d(8, 48, 1)
        self.project = nn.Sequential(nn.Conv2d(48, 16, 1), nn.BatchNorm2d(16))
        self.head = nn.Linear(16, 10)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        y = self.depthwise(self.expand(x))
        gate = torch.sigmoid(self.excite(F.relu(self.squeeze(y.mean((2, 3), keepdim=True)))))
        x = x + self.project(y * gate)
        return self.head(F.adaptive_avg_pool2d(x, 1).flatten(1))


class GroupedNet(nn.Module):
    """ResNeXt-style grouped convolution and GroupNorm: equal counts must leave every group."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.GroupNorm(4, 16), nn.ReLU())
        self.reduce = nn.Sequential(nn.Conv2d(16, 24, 1), nn.BatchNorm2d(24), nn.ReLU())
        self.grouped = nn.Sequential(nn.Conv2d(24, 32, 3, padding=1, groups=4), nn.BatchNorm2d(32), nn.ReLU())
        self.head = nn.Linear(32, 10)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.grouped(self.reduce(self.stem(x))).mean((2, 3)))


class ShuffleNet(nn.Module):
    """ShuffleNet-v2 unit: chunk, a branch, concatenation and channel shuffle."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.branch = nn.Sequential(nn.Conv2d(8, 12, 1), nn.BatchNorm2d(12), nn.ReLU(),
                                    nn.Conv2d(12, 8, 1), nn.BatchNorm2d(8), nn.ReLU())  # fmt: skip
        self.head = nn.Linear(16, 10)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        left, right = x.chunk(2, dim=1)
        x = torch.cat([left, self.branch(right)], dim=1)
        b, c, h, w = x.shape
        x = x.view(b, 2, c // 2, h, w).transpose(1, 2).reshape(b, c, h, w)
        return self.head(x.mean((2, 3)))


class ConvNeXtBlock(nn.Module):
    """Depthwise conv, channels-last LayerNorm, Linear MLP with GELU and a layer-scale parameter."""

    def __init__(self, dim: int = 16) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, dim, 4, stride=4)
        self.dwconv = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, 4 * dim)
        self.fc2 = nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(torch.full((dim,), 0.5))
        self.head = nn.Linear(dim, 10)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        y = self.norm(self.dwconv(x).permute(0, 2, 3, 1))
        y = self.gamma * self.fc2(F.gelu(self.fc1(y)))
        x = x + y.permute(0, 3, 1, 2)
        return self.head(x.mean((2, 3)))


class MLP(nn.Module):
    """Linear → Linear chains with per-channel PReLU and a bias-free layer."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 64), nn.PReLU(64),
                                  nn.Linear(64, 32, bias=False), nn.ReLU(), nn.Linear(32, 10))  # fmt: skip

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x)


class Unknown(nn.Module):
    """Channels flow through an op the engine has no rule for (an FFT across channels)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Linear(8, 10)

    def forward(self, x: Tensor) -> Tensor:
        x = self.b(torch.fft.fft(self.a(x), dim=1).real)
        return self.head(x.mean((2, 3)))


SMALL_NETS = {
    "plain": PlainCNN,
    "plain_no_bn": lambda: PlainCNN(batch_norm=False),
    "residual": ResidualNet,
    "concat": ConcatNet,
    "mobile": MobileNet,
    "grouped": GroupedNet,
    "shuffle": ShuffleNet,
    "convnext_block": ConvNeXtBlock,
    "mlp": MLP,
}


def small_input(batch: int = 4) -> Tensor:
    return torch.randn(batch, 3, 16, 16, generator=torch.Generator().manual_seed(1))


def removed_zeroed(dense: nn.Module, graph: DependencyGraph, plan: Plan) -> nn.Module:
    """A copy of ``dense`` in which every layer ignores the channels ``plan`` removes.

    Removing a channel is equivalent to every consumer (conv, linear) reading zero from it; the
    pruned model must compute what this copy computes.
    """
    reference = copy.deepcopy(dense)
    tensors = {**dict(reference.named_parameters()), **dict(reference.named_buffers())}
    groups = {g.index: g for g in graph.groups}
    with torch.no_grad():
        for index, elements in plan.removed.items():
            gone = torch.zeros(groups[index].width, dtype=torch.bool)
            gone[elements] = True
            for member in groups[index].members_with_role("in"):
                positions = member.positions[gone[member.elements]]
                weight = tensors[member.slot.tensor]
                if member.slot.groups == 1:
                    weight.index_fill_(member.slot.dim, positions, 0.0)
                    continue
                per_group = weight.shape[member.slot.dim]  # blocks of rows read indices of their own
                rows = weight.shape[0] // member.slot.groups
                for channel in positions.tolist():
                    group = channel // per_group
                    index = [slice(group * rows, (group + 1) * rows)] + [slice(None)] * (weight.ndim - 1)
                    index[member.slot.dim] = channel % per_group
                    weight[tuple(index)] = 0.0
    return reference
