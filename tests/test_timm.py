"""Real timm architectures (pretrained=False, small inputs): measuring, pruning, training, and exactness."""

from __future__ import annotations

import pytest
import torch
from nets import removed_zeroed
from torch.utils.flop_counter import FlopCounterMode

import lightning_prune as lp
from lightning_prune import apply_cuts, plan_cuts
from lightning_prune.graph.groups import build_graph
from lightning_prune.importance import ScoringContext, get_criterion, score
from lightning_prune.measure import MacCounter, count_macs
from lightning_prune.selection import select

timm = pytest.importorskip("timm")


def build(name: str, size: int = 64, **options: object) -> tuple[torch.nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, **options)
    return model, torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def exact_plan(model: torch.nn.Module, x: torch.Tensor, amount: float, importance: str):
    """Graph and plan over the groups whose removal is exact (not under a LayerNorm/GroupNorm/standardisation)."""
    graph = build_graph(model, x)
    scores = score(graph.groups, ScoringContext(model), get_criterion(importance))
    scores = [None if g.normalized else s for g, s in zip(graph.groups, scores, strict=True)]
    return graph, select(graph.groups, scores, amount)


def train_one_step(model: torch.nn.Module, x: torch.Tensor) -> None:
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    model(x).square().mean().backward()
    optimizer.step()


def test_cait_macs_are_counted_and_pruning_goes_on() -> None:
    model, x = build("cait_xxs24_224", 32, img_size=32, depth=2)
    model.eval()
    with FlopCounterMode(display=False) as stock:  # with gradients the stock tracker hooks work
        model(x)
    stock_without_gradients = FlopCounterMode(display=False)
    with pytest.raises(AssertionError, match="Expected gradient function"), torch.no_grad(), stock_without_gradients:
        model(x)
    assert count_macs(model, x) == stock.get_total_flops() // 2 > 0
    result = lp.prune(model, x, 0.3, "l1")
    assert result.macs_before == stock.get_total_flops() // 2
    assert result.params_after < result.params_before and result.macs_after < result.macs_before
    assert result.macs_after == count_macs(model, x)
    train_one_step(model, x)


def test_an_op_the_counter_cannot_count_is_named_not_fatal() -> None:
    model, x = build("cait_xxs24_224", 32, img_size=32, depth=1)
    counter = MacCounter()
    whole = MacCounter()

    def broken(*args: object, **kwargs: object) -> int:
        raise ValueError("no formula for this shape")

    addmm = torch.ops.aten.addmm
    counter.flop_registry = {**counter.flop_registry, addmm: broken}
    with torch.no_grad(), counter:
        model(x)
    with torch.no_grad(), whole:
        model(x)
    with pytest.warns(RuntimeWarning, match=r"MACs are a lower bound: .*`aten.addmm` \(ValueError: no formula"):
        counter.warn_uncounted()
    assert 0 < counter.macs < whole.macs


@pytest.mark.parametrize("layer", ["StdConv2d", "ScaledStdConv2d"])
def test_standardised_convolution_loses_output_channels_exactly(layer: str) -> None:
    torch.manual_seed(0)
    conv = getattr(timm.layers, layer)(3, 16, 3)
    if hasattr(conv, "gain"):
        torch.nn.init.uniform_(conv.gain, 0.5, 1.5)
    model = torch.nn.Sequential(
        conv, torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(16, 5)
    )
    model.eval()
    x = torch.randn(2, 3, 16, 16)
    graph, plan = exact_plan(model, x, 0.4, "l1")
    assert plan.count == 6 and not any(g.normalized for g in graph.groups)
    reference = removed_zeroed(model, graph, plan)
    apply_cuts(model, plan_cuts(graph, plan))
    assert conv.weight.shape[0] == conv.out_channels == 10 and (not hasattr(conv, "gain") or conv.gain.shape[0] == 10)
    with torch.no_grad():
        assert relative_error(model(x), reference(x)) < 1e-5


@pytest.mark.parametrize("name", ["test_nfnet", pytest.param("nf_resnet26", marks=pytest.mark.slow)])
def test_nf_net_convolutions_are_cut_and_every_whole_layer_says_why(name: str) -> None:
    model, x = build(name)
    convs = [name for name, m in model.named_modules() if isinstance(m, timm.layers.ScaledStdConv2d)]
    assert len(convs) == {"test_nfnet": 25, "nf_resnet26": 29}[name]
    graph = build_graph(model, x)
    assert any(g.normalized for g in graph.groups)  # inputs of standardised convs: their statistics change
    result = lp.prune(model, x, 0.3, "l1")
    cut = {change.module for change in result.layers}
    assert set(convs) <= cut
    assert result.params_ratio < 0.8
    layers = [name for name, m in model.named_modules() if isinstance(m, torch.nn.Conv2d | torch.nn.Linear)]
    assert all(name in cut or name in result.unprunable for name in layers), set(layers) - cut - set(result.unprunable)
    with torch.no_grad():
        assert model.eval()(x).shape == (2, 1000)
    train_one_step(model, x)


def test_a_computed_weight_that_cannot_be_followed_is_named() -> None:
    class Flipped(torch.nn.Conv2d):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self._conv_forward(x, self.weight.flip(0), self.bias)

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), Flipped(8, 8, 3), torch.nn.Flatten())
    graph = build_graph(model, torch.randn(2, 3, 8, 8))
    assert graph.unprunable["2"] == "its weight in `conv2d` is computed in a way the engine cannot follow"
    assert "0" in graph.unprunable  # its consumer is left whole, so it is too
