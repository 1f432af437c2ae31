"""Real torchvision architectures (weights=None) and our small nets: prune, run, train, and compare numerically."""

from __future__ import annotations

import copy

import pytest
import torch
from nets import SMALL_NETS, removed_zeroed, small_input
from torch import nn

import lightning_prune as lp
from lightning_prune import apply_cuts, plan_cuts
from lightning_prune.errors import PruningError
from lightning_prune.graph.groups import build_graph
from lightning_prune.importance import ScoringContext, get_criterion, score
from lightning_prune.selection import select

torchvision = pytest.importorskip("torchvision")

ZOO = [
    "resnet18", "resnet50", "resnext50_32x4d", "wide_resnet50_2", "vgg16_bn", "mobilenet_v2",
    "mobilenet_v3_large", "efficientnet_b0", "mnasnet1_0", "regnet_y_400mf", "densenet121", "googlenet",
    "inception_v3", "shufflenet_v2_x1_0", "convnext_tiny",
]  # fmt: skip
NO_BATCH_NORM = {"convnext_tiny"}


def build(name: str) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None)
    for module in model.modules():  # non-trivial statistics so that BatchNorm matters in eval mode
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
            nn.init.uniform_(module.weight, 0.5, 1.5)
            nn.init.uniform_(module.bias, -0.5, 0.5)
    size = 299 if name == "inception_v3" else 64
    return model, torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))


def logits(output: object) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def exact_plan(model: nn.Module, x: torch.Tensor, amount: float, importance: str):
    """Graph and plan over the groups whose removal is exact (not under a LayerNorm/GroupNorm)."""
    graph = build_graph(model, x)
    scores = score(graph.groups, ScoringContext(model), get_criterion(importance))
    scores = [None if g.normalized else s for g, s in zip(graph.groups, scores, strict=True)]
    return graph, select(graph.groups, scores, amount)


@pytest.mark.parametrize("importance", ["l1", "bn_scale"])
@pytest.mark.parametrize("amount", [0.3, 0.5])
@pytest.mark.parametrize("name", ZOO)
def test_torchvision_prunes_runs_and_trains(name: str, amount: float, importance: str) -> None:
    if importance == "bn_scale" and name in NO_BATCH_NORM:
        pytest.skip("no BatchNorm for bn_scale to score: test_bn_scale_without_batch_norm_is_refused")
    model, x = build(name)
    model.eval()
    with torch.no_grad():
        shape = logits(model(x)).shape
    result = lp.prune(model, x, amount, importance)
    assert result.params_after < result.params_before and result.macs_after < result.macs_before
    assert result.layers and all(c.after < c.before for c in result.layers)
    with torch.no_grad():
        assert logits(model(x)).shape == shape
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    logits(model(x)).square().mean().backward()
    optimizer.step()


@pytest.mark.parametrize("name", sorted(NO_BATCH_NORM))
def test_bn_scale_without_batch_norm_is_refused(name: str) -> None:
    model, x = build(name)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(
        PruningError, match=r"^`importance='bn_scale'` scored none of the \d+ prunable groups of ConvNeXt"
    ):
        lp.prune(model, x, 0.3, "bn_scale")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("name", ZOO)
def test_pruned_equals_dense_with_removed_channels_zeroed(name: str) -> None:
    model, x = build(name)
    model.eval()
    graph, plan = exact_plan(model, x, 0.4, "l1")
    assert plan.count > 0
    reference = removed_zeroed(model, graph, plan)
    apply_cuts(model, plan_cuts(graph, plan))
    with torch.no_grad():
        assert relative_error(logits(model(x)), logits(reference(x))) < 1e-4


def zero_quarter_of_batch_norms(model: nn.Module) -> None:
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.weight[::4] = 0.0
                module.bias[::4] = 0.0


@pytest.mark.parametrize("name", [n for n in ZOO if n not in NO_BATCH_NORM])
def test_removing_channels_with_zero_batch_norm_changes_nothing(name: str) -> None:
    model, x = build(name)
    zero_quarter_of_batch_norms(model)
    model.eval()
    with torch.no_grad():
        dense = logits(model(x))
    result = lp.prune(model, x, 0.15, "bn_scale")
    assert result.params_after < result.params_before
    with torch.no_grad():
        assert relative_error(logits(model(x)), dense) < 1e-4


@pytest.mark.parametrize("name", sorted(SMALL_NETS))
def test_small_nets_equal_their_zeroed_reference(name: str) -> None:
    torch.manual_seed(0)
    model, x = SMALL_NETS[name]().eval(), small_input()
    graph, plan = exact_plan(model, x, 0.4, "l2")
    assert plan.count > 0
    reference = removed_zeroed(model, graph, plan)
    apply_cuts(model, plan_cuts(graph, plan))
    with torch.no_grad():
        assert relative_error(model(x), reference(x)) < 1e-5


def test_layer_norm_groups_are_marked_inexact() -> None:
    model, x = build("convnext_tiny")
    graph = build_graph(model, x)
    producers = [{m.slot.tensor for m in g.members_with_role("out")} for g in graph.groups]
    stream = next(g for g, names in zip(graph.groups, producers, strict=True) if "features.0.0.weight" in names)
    assert stream.normalized
    hidden = [
        g for g, names in zip(graph.groups, producers, strict=True) if any(n.endswith("block.3.weight") for n in names)
    ]
    assert len(hidden) == 18 and not any(g.normalized for g in hidden)  # MLP widths of the 18 blocks


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_large", "densenet121", "googlenet", "regnet_y_400mf"])
def test_restore_reproduces_the_pruned_model_exactly(name: str, tmp_path) -> None:
    model, x = build(name)
    dense_state = copy.deepcopy(model.state_dict())
    result = lp.prune(model, x, 0.5)
    torch.save({"record": result.record, "state_dict": model.state_dict()}, tmp_path / "pruned.pt")
    saved = torch.load(tmp_path / "pruned.pt", weights_only=True)
    fresh = torchvision.models.get_model(name, weights=None)
    fresh.load_state_dict(dense_state)
    lp.restore(fresh, saved["record"])
    fresh.load_state_dict(saved["state_dict"])
    model.eval(), fresh.eval()
    with torch.no_grad():
        assert torch.equal(logits(model(x)), logits(fresh(x)))
