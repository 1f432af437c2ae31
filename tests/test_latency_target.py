"""``target="latency"``: the per-layer table and its cache, the knapsack on a synthetic table, the search loop
with injected timings, and bad input. No test asserts a measured time (the machine is shared)."""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable

import pytest
import torch
from nets import MobileNet, PlainCNN, small_input
from torch import nn

import lightning_prune as lp
from lightning_prune.budget import Budget, DenseSize
from lightning_prune.errors import PruningError
from lightning_prune.graph.groups import group_trace
from lightning_prune.graph.tracer import trace_model
from lightning_prune.latency import LatencySettings, plan_for_latency, search_latency
from lightning_prune.latency_table import LatencyModel, LatencyTable, layer_specs
from lightning_prune.measure import LatencyComparison, Spread, count_macs
from lightning_prune.selection import SelectionOptions


def macs_time(layer: nn.Module, x: torch.Tensor) -> float:
    """A layer's 'seconds': its MACs on ``x`` (deterministic work, standing in for a clock)."""
    return count_macs(layer, x) * 1e-9


FIXED = 0.1 * count_macs(PlainCNN(), small_input())


def macs_timing(dense: nn.Module, pruned: nn.Module, inputs: torch.Tensor) -> LatencyComparison:
    """Whole-model 'seconds': MACs plus a fixed tenth of the dense PlainCNN's, which no pruning removes."""
    seconds = [(count_macs(dense, inputs) + FIXED) * 1e-9, (count_macs(pruned, inputs) + FIXED) * 1e-9]
    return LatencyComparison(*(Spread(s, s, s) for s in seconds), threads=1)


def ticks() -> Callable[[], float]:
    """A clock that moves one 'second' per reading: the time between layers is the same after every layer."""
    count = itertools.count()
    return lambda: float(next(count))


def product_time(layer: nn.Module, x: torch.Tensor) -> float:
    return layer.weight.shape[0] * layer.weight.shape[1] * 1e-6


def test_table_is_timed_once_then_read_from_the_device_cache(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("LIGHTNING_PRUNE_CACHE", str(tmp_path))
    model, x = PlainCNN(), small_input()
    first = LatencyModel.of(model, x, time=product_time)
    dense = first.seconds()
    assert first.table.timed > 0
    files = list((tmp_path / "latency").glob("*.json"))
    assert len(files) == 1 and files[0].name.startswith("cpu-")

    def refuse(layer: nn.Module, x: torch.Tensor) -> float:
        raise AssertionError("the cached table was timed again")

    again = LatencyModel.of(model, x, time=refuse)
    assert again.seconds() == pytest.approx(dense) and again.table.timed == 0
    # another input shape is another entry: timed, and added to the same file
    third = LatencyModel.of(model, small_input(batch=2), time=product_time)
    third.seconds()
    assert third.table.timed > 0 and len(list((tmp_path / "latency").glob("*.json"))) == 1


def test_table_interpolates_between_timed_widths() -> None:
    model, x = PlainCNN(), small_input()
    specs = layer_specs(model, x)
    assert set(specs) == {"features.0", "features.3", "features.7", "classifier.1", "classifier.3"}
    spec = specs["features.3"]
    assert (spec.kind, spec.in_width, spec.out_width, spec.input_shape) == ("Conv2d", 16, 24, (4, 16, 16, 16))
    table = LatencyTable(torch.device("cpu"), None, product_time)
    # in * out is bilinear, so interpolation between the grid's widths is exact; below the grid it is clamped
    assert table.seconds(spec, 11, 17) == pytest.approx(11 * 17e-6)
    assert table.seconds(spec, 16, 24) == pytest.approx(16 * 24e-6)
    assert table.seconds(spec, 1, 24) == pytest.approx(2 * 24e-6)


def test_depthwise_layer_is_timed_with_its_output_following_its_input() -> None:
    spec = layer_specs(MobileNet(), small_input())["depthwise.0"]
    assert spec.depthwise and spec.widths(12, 99) == (12, 24)
    seen = []

    def record(layer: nn.Module, x: torch.Tensor) -> float:
        seen.append((layer.in_channels, layer.out_channels, layer.groups, x.shape[1]))
        return float(layer.in_channels)

    table = LatencyTable(torch.device("cpu"), None, record)
    assert table.seconds(spec, 15, 30) == pytest.approx(15.0)
    assert all(o == 2 * i and g == i == c for i, o, g, c in seen)


class Chain(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 16, 3, padding=1), nn.Conv2d(16, 8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(torch.relu(self.b(torch.relu(self.a(x)))))


def _synthetic(model: nn.Module, x: torch.Tensor, cost: dict[str, object]) -> tuple[LatencyModel, dict, list]:
    """A latency model whose table holds ``cost[layer](in, out)`` on each layer's grid, and the groups by producer."""
    specs = layer_specs(model, x)
    table = LatencyTable(torch.device("cpu"), None, lambda layer, x: 0.0)
    for name, spec in specs.items():
        ins, outs = list(range(1, spec.in_width + 1)), list(range(1, spec.out_width + 1))
        table.entries[spec.key] = {"in": ins, "out": outs, "seconds": [[cost[name](i, o) for o in outs] for i in ins]}
    graph = group_trace(model, trace_model(model, x, ("eval",)))
    producer = {m.slot.tensor: g for g in graph.groups for m in g.members_with_role("out")}
    return LatencyModel(specs, table), graph, [producer["a.weight"], producer["b.weight"]]


def test_knapsack_never_cuts_a_group_that_saves_no_time() -> None:
    model, x = Chain(), small_input(2)
    constant = lambda i, o: 1.0  # noqa: E731
    cost, graph, (first, second) = _synthetic(model, x, {"a": constant, "b": lambda i, o: 0.1 * i, "c": constant})
    scores = [torch.full((g.width,), 1.0 if g is first else 0.01) for g in graph.groups]
    plan = plan_for_latency(graph, scores, cost, 0.8, SelectionOptions(normalize="none"))
    assert second.index not in plan.removed  # lowest scores, but its widths cost nothing here
    assert len(plan.removed[first.index]) >= 6  # 3.6 s dense; 2.88 s asks 0.72 s off b's input at 0.1 s each
    widths = cost.dense_widths()
    widths["b"][0] -= len(plan.removed[first.index])
    assert cost.seconds(widths) <= 0.8 * cost.seconds()


def test_knapsack_cuts_least_importance_per_second_first() -> None:
    model, x = Chain(), small_input(2)
    constant = lambda i, o: 1.0  # noqa: E731
    saving = {"a": constant, "b": lambda i, o: 0.1 * i + 0.1 * o, "c": constant}
    cost, graph, (first, second) = _synthetic(model, x, saving)
    for cheap, dear in ((first, second), (second, first)):
        scores = [torch.full((g.width,), 1.0 if g is cheap else 5.0) for g in graph.groups]
        plan = plan_for_latency(graph, scores, cost, 0.9, SelectionOptions(normalize="none"))
        assert cheap.index in plan.removed and dear.index not in plan.removed
    with pytest.raises(PruningError, match="cannot reach 10%"):
        plan_for_latency(graph, scores, cost, 0.1, SelectionOptions(normalize="none"))
    # the search's copies take the floor instead: everything the constraints allow (max_fraction 0.9 of 16)
    floor = plan_for_latency(graph, scores, cost, 0.1, SelectionOptions(normalize="none"), floor=True)
    assert {len(floor.removed[first.index]), len(floor.removed[second.index])} == {14}


def test_search_corrects_for_time_the_estimate_does_not_see() -> None:
    tried = []

    def attempt(keep: float) -> float:
        tried.append(keep)
        return keep

    trial, ratio, history = search_latency(attempt, lambda keep: 0.3 + 0.7 * keep, 0.6)
    assert 0.6 * 0.95 <= ratio <= 0.6 and trial == pytest.approx((ratio - 0.3) / 0.7)
    assert [k for k, _ in history] == tried and len(tried) <= 3 and tried[0] == 0.6
    # over-pruned at first (the estimate overstates the time): it asks for less next
    _, ratio, history = search_latency(lambda keep: keep, lambda keep: 0.8 * keep, 0.6)
    assert 0.57 <= ratio <= 0.6 and history[1][0] > history[0][0]


def test_search_that_never_reaches_the_goal_says_what_it_tried() -> None:
    with pytest.raises(PruningError, match=r"in 4 tries .*0\.600 -> 0\.900"):
        search_latency(lambda keep: keep, lambda keep: 0.9, 0.6, rounds=4)


def test_prune_to_latency_with_injected_timing_cuts_the_model_like_the_accepted_copy() -> None:
    torch.manual_seed(0)
    model, x = PlainCNN(), small_input()
    dense = copy.deepcopy(model)
    settings = LatencySettings(timing=macs_timing, time_layer=macs_time, clock=ticks(), cache=False)
    result = lp.prune(model, x, 0.4, target="latency", latency=settings)
    assert 0.6 * 0.95 <= result.latency.measured <= 0.6
    assert macs_timing(dense, model, x).pruned.median / macs_timing(dense, dense, x).dense.median == pytest.approx(
        result.latency.measured
    )
    assert result.dense.latency == macs_timing(dense, dense, x).dense.median and result.channels_removed > 0
    fresh = PlainCNN()
    lp.restore(fresh, result.record)
    fresh.load_state_dict(model.state_dict())
    torch.testing.assert_close(fresh.eval()(x), model.eval()(x))
    # a second step, cumulative against the dense model's time carried in `dense`
    second = lp.prune(model, x, 0.6, target="latency", latency=settings, dense=result.dense)
    assert second.latency.goal == pytest.approx(0.4 / result.latency.measured, rel=1e-6)
    assert macs_timing(dense, model, x).pruned.median / result.dense.latency <= 0.4


def test_a_channels_last_model_is_timed_and_pruned_in_channels_last() -> None:
    torch.manual_seed(0)
    model = PlainCNN().eval().to(memory_format=torch.channels_last)
    x = small_input().contiguous(memory_format=torch.channels_last)
    layouts: dict[str, set[bool]] = {"layers": set(), "copies": set()}

    def layer_time(layer: nn.Module, inputs: torch.Tensor) -> float:
        if isinstance(layer, nn.Conv2d):
            layouts["layers"].add(inputs.is_contiguous(memory_format=torch.channels_last))
        return macs_time(layer, inputs)

    def timing(dense: nn.Module, pruned: nn.Module, inputs: torch.Tensor) -> LatencyComparison:
        weights = [m.weight for m in pruned.modules() if isinstance(m, nn.Conv2d)]
        layouts["copies"].update(w.is_contiguous(memory_format=torch.channels_last) for w in weights)
        return macs_timing(dense, pruned, inputs)

    settings = LatencySettings(timing=timing, time_layer=layer_time, clock=ticks(), cache=False)
    result = lp.prune(model, x, 0.4, target="latency", latency=settings)
    assert result.channels_removed > 0 and layouts == {"layers": {True}, "copies": {True}}
    assert all(
        m.weight.is_contiguous(memory_format=torch.channels_last) for m in model.modules() if isinstance(m, nn.Conv2d)
    )


@pytest.mark.parametrize("amount", [0, 0.0, 1.0, -0.1, 1.5])
def test_bad_latency_amount_raises_before_anything_is_cut(amount: float) -> None:
    model = PlainCNN()
    before = copy.deepcopy(model.state_dict())
    settings = LatencySettings(timing=macs_timing, time_layer=macs_time, clock=ticks(), cache=False)
    with pytest.raises(PruningError, match="amount"):
        lp.prune(model, small_input(), amount, target="latency", latency=settings)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_inputs_the_model_rejects_raise_before_anything_is_cut() -> None:
    model = PlainCNN()
    before = copy.deepcopy(model.state_dict())
    settings = LatencySettings(timing=macs_timing, time_layer=macs_time, clock=ticks(), cache=False)
    with pytest.raises(PruningError, match="`example_inputs` do not run through PlainCNN"):
        lp.prune(model, torch.randn(2, 5, 16, 16), 0.3, target="latency", latency=settings)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_bad_settings_and_targets_are_named() -> None:
    with pytest.raises(PruningError, match="`tolerance`"):
        LatencySettings(tolerance=0)
    with pytest.raises(PruningError, match="`rounds`"):
        LatencySettings(rounds=0)
    with pytest.raises(PruningError, match="latency"):
        lp.StructuredPruning(amount=0.3, target="speed")
    assert lp.StructuredPruning(amount=0.3, target="latency").target == "latency"


def test_dense_size_carries_the_dense_latency() -> None:
    size = DenseSize(100, 1000, 10, 2, latency=0.02)
    assert DenseSize.from_dict(size.to_dict()) == size and DenseSize.from_dict({**size.to_dict(), "latency": None})
    # 30% asked of the dense 20 ms; the model now takes 16 ms: it must lose 1 - 14/16 of its time
    assert Budget(0.3, "latency").fraction_now(size, 0.016) == pytest.approx(1 - 0.014 / 0.016)


# --- inside Trainer.fit -------------------------------------------------------------------------------
def _trainer(tmp_path, callbacks: list, epochs: int = 2):
    import lightning.pytorch as pl

    return pl.Trainer(
        max_epochs=epochs, limit_train_batches=2, limit_val_batches=1, logger=False, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False, default_root_dir=tmp_path, callbacks=callbacks,
    )  # fmt: skip


def _classifier():
    import lightning.pytorch as pl

    from lightning_prune.models import ImageClassifier

    pl.seed_everything(0, verbose=False)
    return ImageClassifier(arch_kwargs={"channels": [8, 16, 32]})


def test_latency_target_in_a_trainer_records_the_ratio_it_measured(tmp_path) -> None:
    import lightning.pytorch as pl

    from lightning_prune.data import DigitsDataModule

    model = _classifier()
    dense = copy.deepcopy(model)
    speed = [1.0]  # the machine's pace: it halves between the steps, which interleaved ratios do not see

    def seconds(model: nn.Module) -> float:
        """What ``product_time`` gives each layer, summed, plus a tenth of the dense model's that no cut removes."""
        layers = [m for m in model.modules() if isinstance(m, nn.Conv2d | nn.Linear)]
        return speed[0] * (sum(product_time(m, None) for m in layers) + 0.1 * fixed)

    fixed = sum(product_time(m, None) for m in dense.modules() if isinstance(m, nn.Conv2d | nn.Linear))

    def timing(reference: nn.Module, pruned: nn.Module, inputs: torch.Tensor) -> LatencyComparison:
        return LatencyComparison(*(Spread(s, s, s) for s in (seconds(reference), seconds(pruned))), threads=1)

    class Faster(pl.Callback):
        def on_train_epoch_start(self, trainer, pl_module) -> None:
            speed[0] = 0.5 if trainer.current_epoch >= 1 else 1.0

    settings = LatencySettings(timing=timing, time_layer=product_time, clock=ticks(), cache=False)
    pruning = lp.StructuredPruning(
        schedule={0: 0.4, 1: 0.7}, target="latency", log_table=False, options={"latency": settings}
    )
    trainer = _trainer(tmp_path, [Faster(), pruning], epochs=3)
    trainer.fit(model, DigitsDataModule())
    assert trainer.global_step == 6  # the last epoch trained the pruned model
    first, second = pruning.done[0]["latency"], pruning.done[1]["latency"]
    assert 0.6 * 0.95 <= first["ratio"] <= 0.6 and first["goal"] == pytest.approx(0.6)
    assert second["goal"] == pytest.approx(0.3 / first["ratio"]) and second["ratio"] <= second["goal"]
    assert first["batch"] == 8 and first["threads"] == 1
    speed[0] = 1.0
    final = timing(dense, model, model.example_input_array)
    measured = final.pruned.median / final.dense.median
    assert 0.3 * 0.9 <= measured <= 0.3 and measured == pytest.approx(first["ratio"] * second["ratio"])
    assert float(trainer.callback_metrics["prune/latency_ratio"]) == pytest.approx(measured)
    assert pruning.dense.latency == pytest.approx(first["dense_seconds"])


@pytest.mark.parametrize("amount", [0, 1.0, -0.2, 1.5])
def test_latency_target_outside_zero_one_is_refused_before_training(amount: float) -> None:
    with pytest.raises(PruningError, match="`amount`"):
        lp.StructuredPruning(amount=amount, target="latency")


def test_latency_schedule_with_a_zero_step_and_bad_settings_are_refused() -> None:
    with pytest.raises(PruningError, match=r"`amount` is 0 at epochs \[0\]"):
        lp.StructuredPruning(schedule={0: 0.0, 2: 0.4}, target="latency")
    with pytest.raises(PruningError, match=r"latency settings \['budget'\] are unknown"):
        lp.StructuredPruning(amount=0.3, target="latency", options={"latency": {"budget": 1}})
    with pytest.raises(PruningError, match="`min_run_time`"):
        lp.StructuredPruning(amount=0.3, target="latency", options={"latency": {"min_run_time": 0}})
    pruning = lp.StructuredPruning(amount=0.3, target="latency", options={"latency": {"rounds": 3, "repeats": 5}})
    assert pruning.options["latency"] == {**LatencySettings(rounds=3, repeats=5).to_dict()}


def test_table_of_a_layer_with_one_input_channel_has_one_row() -> None:
    spec = layer_specs(nn.Sequential(nn.Conv2d(1, 8, 3)), torch.zeros(2, 1, 8, 8))["0"]
    table = LatencyTable(torch.device("cpu"), None, product_time)
    assert table.grid(spec)["in"] == [1]
    assert table.seconds(spec, 1, 5) == pytest.approx(5e-6) and table.seconds(spec, 1, 8) == pytest.approx(8e-6)
