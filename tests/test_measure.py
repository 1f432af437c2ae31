"""Timing two models in turns: a clear difference is resolved, a model against itself is not told as a speed-up."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import lightning_prune as lp
from lightning_prune.measure import Spread

INPUTS = torch.randn(64, 256, generator=torch.Generator().manual_seed(0))


def stack(width: int, depth: int) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(256, width), *(nn.Linear(width, width) for _ in range(depth)), nn.Linear(width, 8))


def test_a_model_many_times_costlier_is_resolved_and_its_ratio_told() -> None:
    big, tiny = stack(512, 6).train(), stack(8, 0)
    timing = lp.compare_latency(big, tiny, INPUTS, repeats=5, threads=1, min_run_time=0.2)
    assert timing.resolved and timing.ratio > 5 and timing.threads == 1
    for spread in (timing.dense, timing.pruned):
        assert 0 < spread.low <= spread.median <= spread.high
    assert timing.dense.low > timing.pruned.high
    assert big.training  # measured in eval mode, left as it was


def test_a_model_against_itself_is_unresolved_or_even() -> None:
    model = stack(128, 2)
    timing = lp.compare_latency(model, model, INPUTS, repeats=7, threads=1, min_run_time=0.2)
    assert not timing.resolved or abs(math.log(timing.ratio)) < math.log(1.5)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"repeats": 2}, r"^`repeats` must be an integer of at least 3, got 2\.$"),
        ({"min_run_time": 0}, r"^`min_run_time` must be a positive number of seconds, got 0\.$"),
    ],
)
def test_bad_timing_options_are_refused(options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        lp.compare_latency(stack(8, 0), stack(8, 0), INPUTS, **options)


class Seen(nn.Module):
    """A small CNN that notes the memory layout of what it computes with."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv, self.head = nn.Conv2d(3, 16, 3), nn.Linear(16, 4)
        self.layouts: set[tuple[bool, bool]] = set()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        last = torch.channels_last
        self.layouts.add((x.is_contiguous(memory_format=last), self.conv.weight.is_contiguous(memory_format=last)))
        return self.head(self.conv(x).mean((2, 3)))


def test_channels_last_times_copies_in_that_layout_and_leaves_the_models_as_they_were() -> None:
    dense, pruned, images = Seen(), Seen(), torch.randn(2, 3, 16, 16)
    timing = lp.compare_latency(dense, pruned, images, repeats=3, threads=1, min_run_time=0.05, channels_last=True)
    assert timing.dense.median > 0 and timing.pruned.median > 0
    assert dense.layouts == pruned.layouts == set()  # the copies ran, not the models
    assert dense.conv.weight.is_contiguous() and images.is_contiguous()
    copy, inputs = lp.measure.as_channels_last(dense, images)
    with torch.no_grad():
        assert torch.allclose(copy(inputs), dense(images), atol=1e-6)
    assert copy.layouts == {(True, True)} and dense.layouts == {(False, False)}


def test_channels_last_is_refused_where_it_would_change_nothing() -> None:
    with pytest.raises(ValueError, match=r"`channels_last=True`, but the model has no 4-d weight"):
        lp.compare_latency(stack(8, 0), stack(8, 0), INPUTS, repeats=3, channels_last=True)
    with pytest.raises(TypeError, match=r"`channels_last` needs an nn.Module to convert, got function"):
        lp.measure.as_channels_last(lambda x: x, torch.randn(1, 3, 4, 4))


def timing(resolved: bool) -> lp.measure.LatencyComparison:
    dense = Spread(0.020, 0.019, 0.022)
    pruned = Spread(0.010, 0.009, 0.011) if resolved else Spread(0.018, 0.012, 0.021)
    return lp.measure.LatencyComparison(dense, pruned, 2)


@pytest.mark.parametrize(("resolved", "change"), [(True, "2.00x faster"), (False, "within noise")])
def test_the_entry_point_table_tells_a_ratio_only_when_resolved(resolved: bool, change: str) -> None:
    from lightning_prune.cli import summary

    told = timing(resolved)
    entries = [
        {
            "test/acc": 0.9,
            "params": 100,
            "macs": 1000,
            "latency": s.median,
            "latency_low": s.low,
            "latency_high": s.high,
        }
        for s in (told.dense, told.pruned)
    ]
    results = {
        "dense": entries[0], "final": entries[1], "units": {"macs": "per sample: one image"}, "latency_batch": 64,
        "latency_ratio": told.ratio, "latency_resolved": told.resolved,
    }  # fmt: skip
    row = next(line for line in summary(results, []).splitlines() if line.startswith("latency"))
    assert row.startswith("latency (forward of 64 images; IQR)")
    assert row.split()[-2:] == change.split() and "20.00 ms [19.00-22.00]" in row


@pytest.mark.parametrize(("resolved", "change"), [(True, "2.00x faster"), (False, "within noise")])
def test_the_demo_table_tells_a_ratio_only_when_resolved(monkeypatch, capsys, resolved: bool, change: str) -> None:
    from lightning_prune import demo
    from lightning_prune.data import DigitsDataModule
    from lightning_prune.models import ImageClassifier

    data = DigitsDataModule()
    data.setup()
    model = ImageClassifier(arch_kwargs={"channels": [8, 16, 32]})
    monkeypatch.setattr(demo, "fit", lambda args, pruning: (model, model, data))
    monkeypatch.setattr(demo, "compare_latency", lambda *args, **options: timing(resolved))
    returned = demo.run(demo.parse([]))
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("| CPU latency"))
    assert row == (
        f"| CPU latency, whole split (median [IQR], 2 threads) | 20.00 ms [19.00-22.00] | "
        f"{demo.milliseconds(timing(resolved).pruned)} | {change} |"
    )
    assert returned["latency_resolved"] is resolved
