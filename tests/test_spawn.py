"""A PrunableModule carries its record in its state dict, so a dense module takes a pruned one's state as it is;
that is how ``strategy="ddp_spawn"`` hands the main process the pruned model of rank 0."""

from __future__ import annotations

import warnings
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

import lightning_prune as lp
from lightning_prune.callbacks import StructuredPruning, applied_record
from lightning_prune.callbacks.checkpoint import STATE_KEY
from lightning_prune.data import DigitsDataModule
from lightning_prune.errors import PruningError, RecordError
from lightning_prune.models import ImageClassifier

warnings.filterwarnings("ignore", ".*does not have many workers.*")


def small_model() -> ImageClassifier:
    pl.seed_everything(0, verbose=False)
    return ImageClassifier(arch_kwargs={"channels": [8, 16, 32]})


def fit(tmp_path: Path, model: pl.LightningModule, **kwargs) -> pl.Trainer:
    saving = ModelCheckpoint(dirpath=tmp_path / "checkpoints", save_last=True)
    trainer = pl.Trainer(
        max_epochs=2, limit_train_batches=2, limit_val_batches=1, logger=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=tmp_path, accelerator="cpu",
        callbacks=[StructuredPruning(0.5, schedule={0: 0.5}, log_table=False), saving], **kwargs,
    )  # fmt: skip
    trainer.fit(model, DigitsDataModule(batch_size=32))
    return trainer


def test_a_dense_module_takes_the_state_dict_of_a_pruned_one_and_computes_the_same(tmp_path) -> None:
    assert STATE_KEY not in small_model().state_dict()  # nothing pruned: the usual state dict
    pruned = small_model()
    fit(tmp_path, pruned)
    state = pruned.state_dict()
    assert STATE_KEY in state and state[STATE_KEY].dtype == torch.uint8
    fresh = small_model()
    fresh.load_state_dict(state)  # strict: the carried record is consumed, every weight fits
    assert lp.count_params(fresh) == lp.count_params(pruned) < lp.count_params(small_model())
    assert applied_record(fresh) == applied_record(pruned)
    images = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(images), pruned.eval()(images), rtol=0, atol=0)
    fresh.load_state_dict(state)  # already at the record: cuts nothing more
    assert lp.count_params(fresh) == lp.count_params(pruned)
    broken = {**state, STATE_KEY: torch.tensor(list(b"{not json"), dtype=torch.uint8)}
    with pytest.raises(RecordError, match=f"state dict key '{STATE_KEY}': not a record"):
        small_model().load_state_dict(broken)


def test_ddp_spawn_hands_the_main_process_rank_zeros_pruned_model(tmp_path) -> None:
    model = small_model()
    dense_params = lp.count_params(model)
    trainer = fit(tmp_path, model, strategy="ddp_spawn", devices=2)
    last = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)  # by rank 0
    assert lp.count_params(model) < dense_params and trainer.state.finished
    state = model.state_dict()
    assert set(state) == set(last["state_dict"])
    for name, tensor in last["state_dict"].items():
        torch.testing.assert_close(state[name], tensor, rtol=0, atol=0, msg=name)
    assert applied_record(model) == last["lightning_prune"]["record"]


class Plain(pl.LightningModule):  # a LightningModule that is not a PrunableModule
    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Conv2d(1, 8, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.LazyLinear(10)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(self(batch[0]), batch[1])

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self.log("val/loss", torch.nn.functional.cross_entropy(self(batch[0]), batch[1]))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_a_plain_lightning_module_under_ddp_spawn_is_refused_before_training(tmp_path) -> None:
    with pytest.raises(
        Exception, match=r"spawning strategy.*Derive Plain from `lightning_prune.PrunableModule`"
    ) as caught:
        fit(tmp_path, Plain(), strategy="ddp_spawn", devices=2)
    assert not isinstance(caught.value, AssertionError) and not (tmp_path / "checkpoints").exists()
    assert PruningError.__name__ in str(caught.value) or isinstance(caught.value, PruningError)
