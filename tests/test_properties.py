"""Property-based tests: random networks of every coupling pattern, random amounts, scopes and criteria.

For each generated case pruning either succeeds or raises one of our documented errors; the pruned
model computes what the dense model computes with the removed channels zeroed; a fresh model plus
the record plus the pruned state_dict reproduces the pruned outputs exactly. ``derandomize=True``
makes the cases the same on every run.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from nets import removed_zeroed
from torch import Tensor, nn

import lightning_prune as lp
from lightning_prune.errors import PruningError
from lightning_prune.importance import ScoringContext, get_criterion, score
from lightning_prune.selection import select
from lightning_prune.surgery import apply_cuts, plan_cuts

KINDS = ["conv", "residual", "concat", "depthwise", "grouped", "gate", "pool"]


def conv_bn(inputs: int, outputs: int, kernel: int = 3, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(inputs, outputs, kernel, padding=kernel // 2, groups=groups), nn.BatchNorm2d(outputs), nn.ReLU()
    )


class Residual(nn.Module):
    def __init__(self, channels: int, width: int) -> None:
        super().__init__()
        self.body = nn.Sequential(conv_bn(channels, width), nn.Conv2d(width, channels, 3, padding=1))

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(x + self.body(x))


class Concat(nn.Module):
    def __init__(self, channels: int, width: int) -> None:
        super().__init__()
        self.a, self.b = conv_bn(channels, width, 1), conv_bn(channels, width + 1)

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([self.a(x), self.b(x)], dim=1)


class Gate(nn.Module):
    def __init__(self, channels: int, width: int) -> None:
        super().__init__()
        self.squeeze, self.excite = nn.Conv2d(channels, width, 1), nn.Conv2d(width, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(self.excite(F.relu(self.squeeze(x.mean((2, 3), keepdim=True)))))


class RandomNet(nn.Module):
    def __init__(self, spec: list[tuple[str, int]], flatten_head: bool) -> None:
        super().__init__()
        layers, channels, size = [conv_bn(3, 8)], 8, 8
        for kind, width in spec:
            if kind == "conv":
                layers.append(conv_bn(channels, width))
                channels = width
            elif kind == "residual":
                layers.append(Residual(channels, width))
            elif kind == "concat":
                layers.append(Concat(channels, width))
                channels = 2 * width + 1
            elif kind == "depthwise":
                layers.append(conv_bn(channels, 2 * channels, groups=channels))
                channels *= 2
            elif kind == "grouped" and channels % 2 == 0:
                layers.append(conv_bn(channels, 2 * width, groups=2))
                channels = 2 * width
            elif kind == "gate":
                layers.append(Gate(channels, width))
            elif kind == "pool" and size >= 4:
                layers.append(nn.MaxPool2d(2))
                size //= 2
        self.features = nn.Sequential(*layers)
        self.flatten_head = flatten_head
        self.head = nn.Linear(channels * size * size if flatten_head else channels, 5)

    def forward(self, x: Tensor) -> Tensor:
        x = self.features(x)
        return self.head(x.flatten(1) if self.flatten_head else x.mean((2, 3)))


networks = st.tuples(
    st.lists(st.tuples(st.sampled_from(KINDS), st.integers(2, 12)), min_size=1, max_size=6), st.booleans()
)


def inputs() -> Tensor:
    return torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))


@settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(
    network=networks,
    amount=st.floats(0.2, 0.95),
    scope=st.sampled_from(["global", "local"]),
    importance=st.sampled_from(["l1", "l2", "bn_scale", "fpgm", "random"]),
    round_to=st.sampled_from([1, 1, 2, 4]),
)
def test_random_networks_prune_exactly_and_restore(network, amount, scope, importance, round_to) -> None:
    spec, flatten_head = network
    torch.manual_seed(0)
    model = RandomNet(spec, flatten_head).eval()
    dense_state = copy.deepcopy(model.state_dict())
    x = inputs()
    try:
        graph = lp.build_graph(model, x)
        scores = score(graph.groups, ScoringContext(model), get_criterion(importance))
        plan = select(graph.groups, scores, amount, scope=scope, round_to=round_to)
    except PruningError as error:
        event(f"rejected: {type(error).__name__}")
        return
    event("pruned something" if plan.count else "nothing to prune at this amount")
    reference = removed_zeroed(model, graph, plan)
    cuts = plan_cuts(graph, plan)
    apply_cuts(model, cuts)
    lp.verify_pruned(model, x, graph, cuts)
    with torch.no_grad():
        pruned, expected = model(x), reference(x)
    assert float((pruned - expected).norm() / expected.norm().clamp(min=1e-12)) < 1e-4

    fresh = RandomNet(spec, flatten_head).eval()
    fresh.load_state_dict(dense_state)
    lp.restore(fresh, lp.record.new_record([cuts]))
    fresh.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert torch.equal(fresh(x), pruned)


@settings(max_examples=30, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(network=networks, amount=st.floats(0.05, 0.9), target=st.sampled_from(["channels", "macs", "params"]))
def test_prune_api_trains_after_any_cut(network, amount, target) -> None:
    spec, flatten_head = network
    torch.manual_seed(0)
    model = RandomNet(spec, flatten_head)
    try:
        result = lp.prune(model, inputs(), amount, target=target)
    except PruningError as error:
        event(f"rejected: {type(error).__name__}")
        return
    event("pruned something" if result.layers else "nothing pruned")
    assert result.params_after <= result.params_before and result.macs_after <= result.macs_before
    model.train()
    model(inputs()).square().mean().backward()
    assert all(p.grad is None or p.grad.shape == p.shape for p in model.parameters())
