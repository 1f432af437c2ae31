"""Lightning's own loading path on pruned checkpoints: ``MyModule.load_from_checkpoint`` for a PrunableModule,
a warning naming the ways out for any other module, and resume cutting once."""

from __future__ import annotations

import warnings
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from test_llm_callbacks import CONFIG, loader
from test_llm_pruner import windows
from torch import Tensor, nn

import lightning_prune as lp
from lightning_prune.callbacks import StructuredPruning, applied_record, restore_pruned
from lightning_prune.data import DigitsDataModule
from lightning_prune.models import ImageClassifier

warnings.filterwarnings("ignore", ".*does not have many workers.*")
IMAGES = torch.linspace(-1, 1, 4 * 64).view(4, 1, 8, 8)


def fit(module: pl.LightningModule, data, folder: Path, pruning: StructuredPruning, epochs: int = 2, **options):
    pl.Trainer(
        max_epochs=epochs, limit_train_batches=4, limit_val_batches=2, logger=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=folder,
        callbacks=[pruning, ModelCheckpoint(dirpath=folder, save_last=True)],
    ).fit(module, data, **options)  # fmt: skip


def small_classifier() -> ImageClassifier:
    pl.seed_everything(0, verbose=False)
    return ImageClassifier(arch_kwargs={"channels": [8, 16, 32]})


def outputs(module: nn.Module, inputs: Tensor) -> Tensor:
    with torch.no_grad():
        return module.eval()(inputs)


def test_image_classifier_loads_its_pruned_checkpoint_with_lightnings_load_from_checkpoint(tmp_path) -> None:
    module = small_classifier()
    fit(module, DigitsDataModule(), tmp_path, StructuredPruning(0.5, schedule={0: 0.5}, log_table=False))
    loaded = ImageClassifier.load_from_checkpoint(tmp_path / "last.ckpt")
    assert type(loaded) is ImageClassifier
    assert lp.count_params(loaded) == lp.count_params(module) < lp.count_params(small_classifier())
    assert applied_record(loaded) == applied_record(module)
    assert torch.equal(outputs(loaded, IMAGES), outputs(module, IMAGES))
    restore_pruned(loaded, torch.load(tmp_path / "last.ckpt", weights_only=True))  # already there: cuts nothing
    assert lp.count_params(loaded) == lp.count_params(module)


def test_causal_lm_loads_its_pruned_checkpoint_with_lightnings_load_from_checkpoint(tmp_path) -> None:
    pl.seed_everything(0, verbose=False)
    module = lp.CausalLM(config=CONFIG, vocabulary=64, warmup_steps=1)
    pruning = StructuredPruning(
        0.5, "taylor_vectorwise", structure="llm_pruner", when="train_epoch_start", calibration_batches=2,
        log_table=False,
    )  # fmt: skip
    fit(module, loader(), tmp_path, pruning, epochs=1)
    loaded = lp.CausalLM.load_from_checkpoint(tmp_path / "last.ckpt")
    assert lp.count_params(loaded) == lp.count_params(module)
    ids = windows(2, 10)
    assert torch.allclose(outputs(loaded, ids), outputs(module, ids), atol=1e-6)


def test_resuming_a_prunable_module_cuts_it_once(tmp_path) -> None:
    module = small_classifier()
    fit(module, DigitsDataModule(), tmp_path, StructuredPruning(0.5, schedule={0: 0.5}, log_table=False))
    saved = torch.load(tmp_path / "last.ckpt", weights_only=True)
    resumed, pruning = small_classifier(), StructuredPruning(0.5, schedule={0: 0.5}, log_table=False)
    # on_load_checkpoint cuts, then the callback's pre-hook finds nothing left to do
    fit(resumed, DigitsDataModule(), tmp_path / "resumed", pruning, epochs=3, ckpt_path=tmp_path / "last.ckpt")
    assert applied_record(resumed) == saved["lightning_prune"]["record"] and list(pruning.done) == [0]
    assert lp.count_params(resumed) == lp.count_params(module)


class DigitsModule(pl.LightningModule):
    """A module written from scratch, with nothing of lightning-prune in it."""

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, 10),
        )  # fmt: skip
        self.example_input_array = torch.zeros(2, 1, 8, 8)

    def forward(self, images: Tensor) -> Tensor:
        return self.net(images)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        images, labels = batch
        return F.cross_entropy(self(images), labels)

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self.log("val/loss", F.cross_entropy(self(batch[0]), batch[1]))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05)


class PrunableDigits(lp.PrunableModule, DigitsModule):
    """The same module with the mixin in front."""


def test_a_module_without_the_mixin_is_warned_at_setup_and_loads_with_lightning_prune(tmp_path) -> None:
    pl.seed_everything(0, verbose=False)
    module = DigitsModule()
    message = (
        r"^`DigitsModule\.load_from_checkpoint\(path\)` will fail .* Derive DigitsModule from "
        r"`lightning_prune\.PrunableModule` .* `lightning_prune\.load_from_checkpoint\(DigitsModule, path\)`\.$"
    )
    with pytest.warns(UserWarning, match=message):
        fit(module, DigitsDataModule(), tmp_path, StructuredPruning(0.5, schedule={0: 0.5}, log_table=False))
    with pytest.raises(RuntimeError, match="size mismatch"):  # Lightning's own path, which the warning foretold
        DigitsModule.load_from_checkpoint(tmp_path / "last.ckpt")
    loaded = lp.load_from_checkpoint(DigitsModule, tmp_path / "last.ckpt")
    assert torch.equal(outputs(loaded, IMAGES), outputs(module, IMAGES))


def test_a_module_with_the_mixin_is_not_warned_and_loads_with_lightning(tmp_path) -> None:
    pl.seed_everything(0, verbose=False)
    module = PrunableDigits()
    with warnings.catch_warnings():
        warnings.filterwarnings("error", ".*PrunableModule.*")
        fit(module, DigitsDataModule(), tmp_path, StructuredPruning(0.5, schedule={0: 0.5}, log_table=False))
    loaded = PrunableDigits.load_from_checkpoint(tmp_path / "last.ckpt")
    assert lp.count_params(loaded) == lp.count_params(module) < lp.count_params(PrunableDigits())
    assert torch.equal(outputs(loaded, IMAGES), outputs(module, IMAGES))


def test_restore_pruned_leaves_a_module_alone_for_a_checkpoint_without_a_record() -> None:
    module = small_classifier()
    before = {name: tensor.clone() for name, tensor in module.state_dict().items()}
    restore_pruned(module, {"state_dict": before})
    assert {name: tensor.shape for name, tensor in module.state_dict().items()} == {
        name: tensor.shape for name, tensor in before.items()
    }
