"""Checkpoints written by an earlier release resume to the result that release finished with."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch
from jobs import run_job
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_prune.callbacks import StructuredPruning, applied_record
from lightning_prune.callbacks.checkpoint import STATE_KEY
from lightning_prune.data import DigitsDataModule
from lightning_prune.models import ImageClassifier

RELEASE_0_1 = Path(__file__).parent / "data" / "checkpoints_0_1"


def assert_same_run(finished: dict, expected: dict) -> None:
    """Same cuts, steps and weights. The expected results were computed on another machine: float kernels differ
    across CPUs by rounding (1.9e-7 measured on an AMD EPYC against the stored run), so weights are compared to
    1e-5; resuming on one machine is bit-identical (test_callbacks' kill-and-resume tests)."""
    assert finished["record"] == expected["record"]
    assert (finished["epoch"], finished["global_step"]) == (expected["epoch"], expected["global_step"])
    # the record now also travels in the module's own state dict (for ddp_spawn); the rest is the 0.1 format
    carried = finished["state_dict"].pop(STATE_KEY)
    assert json.loads(bytes(carried.tolist()).decode()) == finished["record"]
    assert finished["state_dict"].keys() == expected["state_dict"].keys()
    for name, tensor in expected["state_dict"].items():
        assert finished["state_dict"][name].shape == tensor.shape, name
        assert torch.allclose(finished["state_dict"][name].double(), tensor.double(), rtol=0, atol=1e-5), name


def test_a_channel_pruning_checkpoint_of_release_0_1_resumes_to_its_result(tmp_path) -> None:
    (tmp_path / "checkpoints").mkdir()
    shutil.copy(RELEASE_0_1 / "digits_epoch1.ckpt", tmp_path / "checkpoints" / "last.ckpt")
    job = run_job(tmp_path, "--resume")
    assert job.returncode == 0, job.stderr[-3000:]
    finished = torch.load(tmp_path / "final.pt", weights_only=True)
    assert_same_run(finished, torch.load(RELEASE_0_1 / "digits_final.pt", weights_only=True))
    assert sorted(finished["pruning"]["done"]) == ["1", "2", "3"]


def layer_run(root: Path, resume: Path | None = None) -> dict:
    """Two layer-dropping steps of a digits transformer; what ``layers_final.pt`` holds."""
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    torch.set_num_threads(1)
    pl.seed_everything(0, verbose=False)
    model = ImageClassifier(arch="digits_transformer", arch_kwargs={"dim": 32, "hidden": 64})
    pruning = StructuredPruning(0.5, "block_influence", structure="layers", schedule={1: 0.25, 2: 0.5}, log_table=False)
    trainer = pl.Trainer(
        max_epochs=4, limit_train_batches=3, limit_val_batches=1, logger=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=root, callbacks=[pruning, ModelCheckpoint(root, save_last=True)],
    )  # fmt: skip
    try:
        trainer.fit(model, DigitsDataModule(), ckpt_path=resume)
    finally:
        torch.set_num_threads(2)
    return {
        "state_dict": model.state_dict(),
        "record": applied_record(model),
        "epoch": trainer.current_epoch,
        "global_step": trainer.global_step,
        "done": sorted(pruning.done),
    }


def test_a_layer_dropping_checkpoint_of_release_0_1_resumes_to_its_result(tmp_path) -> None:
    finished = layer_run(tmp_path, resume=RELEASE_0_1 / "layers_epoch1.ckpt")
    assert_same_run(finished, torch.load(RELEASE_0_1 / "layers_final.pt", weights_only=True))
    assert finished["done"] == [1, 2]
