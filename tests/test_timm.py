"""Real timm architectures (pretrained=False, small inputs): measuring, pruning, training, and exactness."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import lightning_prune as lp
from lightning_prune.measure import MacCounter, count_macs

timm = pytest.importorskip("timm")


def build(name: str, size: int = 64, **options: object) -> tuple[torch.nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, **options)
    return model, torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))


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
