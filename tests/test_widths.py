"""Hardware-friendly widths: ``round_to`` read from a width sweep, per layer kind and layout, and
``round_to="auto"`` in ``prune`` and the callback. Sweeps use injected timings (the machine is shared)."""

from __future__ import annotations

import json

import pytest
import torch
import torchvision
from nets import MLP, PlainCNN, small_input
from torch import nn

import lightning_prune as lp
from lightning_prune.errors import PruningError
from lightning_prune.selection import SelectionOptions, select
from lightning_prune.slicing import layout
from lightning_prune.widths import (
    CONV,
    CONV_LAST,
    FORMAT,
    LINEAR,
    choose_round_to,
    dominant_kind,
    round_to_for,
    sweep,
)

BLOCKS = {LINEAR: 8, CONV: 1, CONV_LAST: 16}  # what the injected kernels reward


def blocked(calls: list) -> object:
    """'Seconds' of a layer: its width rounded up to the block of its kind (BLOCKS), the kind read from the layer
    and the layout of its input, as a real kernel would see them."""

    def time(layer: nn.Module, x: torch.Tensor) -> float:
        kind = LINEAR if isinstance(layer, nn.Linear) else CONV_LAST if layout(x) == torch.channels_last else CONV
        calls.append(kind)
        return float(-(-layer.weight.shape[0] // BLOCKS[kind]) * BLOCKS[kind])

    return time


@pytest.fixture
def swept(tmp_path, monkeypatch) -> list:
    """A cache directory of its own, holding the sweep of the injected kernels once the first call made it."""
    monkeypatch.setenv("LIGHTNING_PRUNE_CACHE", str(tmp_path))
    calls: list = []
    round_to_for(MLP(), time=blocked(calls))
    assert set(calls) == set(BLOCKS)  # one sweep times every kind
    calls.clear()
    return calls


def test_round_to_is_the_block_under_which_narrower_layers_save_nothing() -> None:
    by_16 = {w: float(-(-w // 16) * 16) for w in range(33, 129)}  # time of the next multiple of 16 up
    assert choose_round_to(by_16) == 16
    assert choose_round_to({w: float(w) for w in range(33, 129)}) == 1  # every channel saves its share
    slower_between = {w: float(w if w % 32 == 0 else 2 * w) for w in range(33, 129)}
    assert choose_round_to(slower_between) == 32


def test_the_kind_holding_most_weights_decides_in_the_layout_it_runs() -> None:
    resnet = torchvision.models.resnet18(weights=None)
    x = torch.randn(2, 3, 32, 32)
    assert dominant_kind(resnet, x) == CONV
    assert dominant_kind(resnet, x.contiguous(memory_format=torch.channels_last)) == CONV_LAST  # inputs say it
    assert dominant_kind(resnet.to(memory_format=torch.channels_last), x) == CONV_LAST  # or the weights do
    assert dominant_kind(PlainCNN(), small_input()) == LINEAR  # its classifier holds 2/3 of the weights
    vit = torchvision.models.VisionTransformer(32, 16, 2, 2, 64, 256, num_classes=10)  # in_proj counts too
    assert dominant_kind(vit.to(memory_format=torch.channels_last), torch.randn(1, 3, 32, 32)) == LINEAR


def test_round_to_auto_follows_the_model_and_is_measured_once(swept: list) -> None:
    resnet = torchvision.models.resnet18(weights=None).eval()
    x = torch.randn(2, 3, 32, 32)
    assert round_to_for(resnet, x) == 1 and round_to_for(MLP()) == 8
    last, x_last = resnet.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    assert round_to_for(last, x_last) == 16 and not swept  # read from the cache

    result = lp.prune(last, x_last, 0.3, round_to="auto")
    convolutions = [c for c in result.layers if c.module.startswith("layer") and c.after != c.before]
    assert convolutions and all(c.after % 16 == 0 for c in convolutions)
    mlp = MLP()
    result = lp.prune(mlp, small_input(), 0.3, round_to="auto")
    assert all(c.after % 8 == 0 for c in result.layers if c.after != c.before) and not swept


def test_a_cache_file_of_the_older_format_is_measured_again(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("LIGHTNING_PRUNE_CACHE", str(tmp_path))
    calls: list = []
    round_to_for(MLP(), time=blocked(calls))
    path = next(tmp_path.rglob("widths-*.json"))
    path.write_text(json.dumps({"round_to": 4, "seconds": {"33": 1.0}}))  # what one kind's answer looked like
    calls.clear()
    assert round_to_for(MLP(), time=blocked(calls)) == 8 and calls
    assert json.loads(path.read_text())["format"] == FORMAT


def test_bad_round_to_is_named_and_auto_is_never_used_unmeasured() -> None:
    with pytest.raises(PruningError, match="`round_to` must be a positive integer or 'auto', got 'fast'"):
        SelectionOptions(round_to="fast")
    with pytest.raises(PruningError, match="`round_to`"):
        lp.StructuredPruning(amount=0.3, round_to=0)
    with pytest.raises(PruningError, match="round_to_for"):
        select([], [], 0.3, SelectionOptions(round_to="auto"))
    with pytest.raises(ValueError, match="`kind` must be one of"):
        from lightning_prune.widths import default_round_to

        default_round_to(kind="conv5x5", time=blocked([]), cache=False)


def test_round_to_auto_in_a_trainer_is_resolved_at_the_step(swept: list, tmp_path) -> None:
    import lightning.pytorch as pl

    from lightning_prune.data import DigitsDataModule
    from lightning_prune.models import ImageClassifier

    pl.seed_everything(0, verbose=False)
    model = ImageClassifier(arch_kwargs={"channels": [16, 32, 64]}).to(memory_format=torch.channels_last)
    pruning = lp.StructuredPruning(amount=0.4, scope="local", round_to="auto", log_table=False)
    assert pruning.options["round_to"] == "auto"
    trainer = pl.Trainer(
        max_epochs=2, limit_train_batches=2, limit_val_batches=0, logger=False, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False, default_root_dir=tmp_path, callbacks=[pruning],
    )  # fmt: skip
    trainer.fit(model, DigitsDataModule())
    assert pruning.options["round_to"] == 16 and not swept  # the channels-last CNN's kind, from the cache
    widths = [m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert widths != [16, 32, 64] and all(w % 16 == 0 for w in widths)


def test_a_sweep_takes_each_widths_median_over_passes_in_alternating_order() -> None:
    order: list[int] = []
    busy = iter([5.0] + [1.0] * 1000)  # the first timing of all is slow: a busy spell of the machine

    def time(layer: nn.Module, x: torch.Tensor) -> float:
        order.append(layer.weight.shape[0])
        return next(busy) * layer.weight.shape[0]

    found = sweep([40, 41], channels_last=(False,), time=time, rounds=3)
    assert order == [40, 40, 41, 41, 41, 41, 40, 40, 40, 40, 41, 41]  # conv, linear per width; every other pass back
    assert {(t.kind, t.width): t.seconds for t in found} == {("conv3x3", 40): 40.0, ("linear", 40): 40.0,
                                                             ("conv3x3", 41): 41.0, ("linear", 41): 41.0}  # fmt: skip
