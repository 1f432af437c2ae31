"""Killed jobs, DDP checkpoints and broken checkpoints.

A job killed at any point (in a pruning step, while a checkpoint is written, under DDP) resumes from
``last.ckpt`` to the bit-identical result of an uninterrupted job; checkpoints move between DDP and a
single process; a checkpoint that cannot be resumed is named and no file is touched.
"""

from __future__ import annotations

import shutil
import signal
import warnings
from collections.abc import Callable
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from jobs import EPOCHS, run_job
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_prune.callbacks import (
    AtomicCheckpointIO,
    NetworkSlimming,
    StructuredPruning,
    applied_record,
    load_from_checkpoint,
)
from lightning_prune.data import DigitsDataModule
from lightning_prune.errors import RecordError
from lightning_prune.models import ImageClassifier

DDP = ("--devices", "2", "--importance", "fisher")  # the DDP job of test_importance: one reference run for both
KILLED = -signal.SIGKILL
warnings.filterwarnings("ignore", ".*does not have many workers.*")


def finished(root: Path, rank: int | None = None) -> dict:
    return torch.load(root / ("final.pt" if rank is None else f"final-rank{rank}.pt"), weights_only=True)


def checkpoint(path: Path) -> dict:
    return torch.load(path, weights_only=True)


def assert_same_run(actual: dict, expected: dict) -> None:
    assert actual["record"] == expected["record"] and len(actual["record"]["steps"]) == 3
    assert actual["pruning"] == expected["pruning"]
    assert (actual["epoch"], actual["global_step"]) == (expected["epoch"], expected["global_step"])
    assert actual["state_dict"].keys() == expected["state_dict"].keys()
    for key, value in expected["state_dict"].items():
        assert torch.equal(actual["state_dict"][key], value), key


def assert_ranks_agree(root: Path) -> list[dict]:
    ranks = [finished(root, rank) for rank in (0, 1)]
    assert ranks[0]["record"] == ranks[1]["record"]
    assert all(torch.equal(value, ranks[1]["state_dict"][key]) for key, value in ranks[0]["state_dict"].items())
    return ranks


# --- kills in a pruning step and while saving -----------------------------------------------------
KILLS = [(1, "selection"), (2, "surgery"), (3, "checkpoint")]  # one in each pruning epoch


def test_a_job_killed_in_each_pruning_step_and_while_saving_resumes_to_the_uninterrupted_result(
    tmp_path, completed_job
) -> None:
    checkpoints = tmp_path / "checkpoints"
    partial = checkpoints / ".last.ckpt.partial"
    for number, (epoch, point) in enumerate(KILLS):
        resume = ("--resume",) if number else ()
        killed = run_job(tmp_path, *resume, "--kill-at-epoch", str(epoch), "--kill-point", point)
        assert killed.returncode == KILLED, f"{point}: {killed.stderr[-3000:]}"
        last = checkpoint(checkpoints / "last.ckpt")  # complete: the one of the epoch before, with its steps
        assert (last["epoch"], len(last["lightning_prune"]["record"]["steps"])) == (epoch - 1, epoch - 1), point
        assert partial.exists() == (point == "checkpoint"), point
    assert partial.stat().st_size > 0  # killed mid-write of last.ckpt, after epoch 3's other file was saved
    assert checkpoint(next(checkpoints.glob("epoch=3-*.ckpt")))["epoch"] == 3
    resumed = run_job(tmp_path, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_run(finished(tmp_path), finished(completed_job()))
    assert not partial.exists()


def test_atomic_checkpoint_io_replaces_the_default_one_only(tmp_path) -> None:
    from lightning.pytorch.plugins.io import AsyncCheckpointIO

    def installed(**options) -> object:
        trainer = pl.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, **options)
        pruning, model = StructuredPruning(0.5, log_table=False), ImageClassifier(arch_kwargs={"channels": [8, 16, 32]})
        pruning.setup(trainer, model, "fit")
        pruning.teardown(trainer, model, "fit")
        return trainer.strategy.checkpoint_io

    assert type(installed()) is AtomicCheckpointIO
    assert type(installed(plugins=[AsyncCheckpointIO()])) is AsyncCheckpointIO
    io = AtomicCheckpointIO()
    io.save_checkpoint({"weight": torch.arange(4.0)}, tmp_path / "deep" / "x.ckpt")
    assert [p.name for p in (tmp_path / "deep").iterdir()] == ["x.ckpt"]
    assert torch.equal(io.load_checkpoint(tmp_path / "deep" / "x.ckpt")["weight"], torch.arange(4.0))


# --- DDP checkpoints ----------------------------------------------------------------------------
def kill(root: Path, *arguments: str) -> list:
    """Run the job until it is killed; the steps recorded in the ``last.ckpt`` it leaves."""
    killed = run_job(root, *arguments)
    assert killed.returncode == KILLED, killed.stderr[-3000:]
    assert not list(root.glob("final*.pt"))
    return checkpoint(root / "checkpoints" / "last.ckpt")["lightning_prune"]["record"]["steps"]


@pytest.fixture(scope="module")
def killed_ddp_job(tmp_path_factory) -> Callable[[], tuple[Path, list]]:
    """A DDP job killed (every rank) at the start of epoch 2, after its first pruning step. Each call puts
    its directory back as the kill left it, in place (checkpoints remember their directory), and returns
    it with the steps recorded in its ``last.ckpt``."""
    root = tmp_path_factory.mktemp("killed-ddp") / "job"
    steps = kill(root, *DDP, "--kill-at-epoch", "2")
    as_killed = root.with_name("as-killed")
    shutil.copytree(root, as_killed)

    def as_it_was() -> tuple[Path, list]:
        shutil.rmtree(root)
        shutil.copytree(as_killed, root)
        return root, steps

    return as_it_was


@pytest.mark.slow  # DDP resume stays in the default suite: test_checkpoints_move_between_ddp_and_one_process
def test_a_killed_ddp_job_resumes_under_ddp_to_the_uninterrupted_result(completed_job, killed_ddp_job) -> None:
    root, _ = killed_ddp_job()
    resumed = run_job(root, "--resume", *DDP)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    reference = completed_job(*DDP)
    for rank, final in enumerate(assert_ranks_agree(root)):
        assert_same_run(final, finished(reference, rank))
    # written once, by rank zero: one file per checkpoint, not one per rank
    assert sorted(p.name for p in (root / "checkpoints").iterdir()) == ["epoch=5-step=36.ckpt", "last.ckpt"]


def test_checkpoints_move_between_ddp_and_one_process(completed_job, killed_ddp_job) -> None:
    """DDP → one process → DDP. Floats differ between the two (batches split over ranks), so the guarantee
    is: each checkpoint loads and resumes in the other mode, steps made before a kill stay exactly as
    recorded, the rest of the schedule runs to the same total, and the ranks agree at the end."""
    root, by_ddp = killed_ddp_job()
    last = root / "checkpoints" / "last.ckpt"
    model = load_from_checkpoint(ImageClassifier, last)
    saved = checkpoint(last)
    assert applied_record(model)["steps"] == by_ddp
    assert all(torch.equal(model.state_dict()[k], v) for k, v in saved["state_dict"].items())
    by_one_process = kill(root, "--resume", "--importance", "fisher", "--kill-at-epoch", "3")
    assert len(by_one_process) == 2 and by_one_process[:1] == by_ddp
    resumed = run_job(root, "--resume", *DDP)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    final = assert_ranks_agree(root)[0]
    steps = final["record"]["steps"]
    assert len(steps) == 3 and steps[:2] == by_one_process
    reference = finished(completed_job(*DDP), 0)
    assert sorted(final["pruning"]["done"]) == ["1", "2", "3"]
    assert final["pruning"]["dense"] == reference["pruning"]["dense"]  # the dense size and the channels removed
    assert (final["epoch"], final["global_step"]) == (reference["epoch"], reference["global_step"]) == (EPOCHS, 36)


# --- checkpoints that cannot be resumed -----------------------------------------------------------
def truncated(good: Path, into: Path) -> Path:
    into.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    return into


def with_record(good: Path, into: Path, change) -> Path:
    content = checkpoint(good)
    change(content["lightning_prune"]["record"])
    torch.save(content, into)
    return into


def renamed_first_cut(record: dict) -> None:
    record["steps"][0]["cuts"][0]["tensor"] = "net.missing.weight"


@pytest.mark.parametrize(
    ("make", "channels", "message"),
    [
        (
            lambda good, directory: truncated(good, directory / "cut-short.ckpt"),
            [8, 16, 32],
            r"checkpoint '\S+cut-short\.ckpt' could not be read as a checkpoint",
        ),
        (
            lambda good, directory: good,
            [16, 32, 64],
            r"checkpoint '\S+last\.ckpt' step 0: `net\.\S+` has \d+ entries along dimension \d, the record expects",
        ),
        (
            lambda good, directory: with_record(good, directory / "foreign.ckpt", renamed_first_cut),
            [8, 16, 32],
            r"checkpoint '\S+foreign\.ckpt' step 0: the model has no parameter or buffer `net\.missing\.weight`",
        ),
        (
            lambda good, directory: with_record(good, directory / "newer.ckpt", lambda r: r.update(version=2)),
            [8, 16, 32],
            r"checkpoint '\S+newer\.ckpt': record format version 2 is newer than this lightning-prune",
        ),
    ],
    ids=["truncated", "another_width", "another_architecture", "newer_format"],
)
def test_fit_from_a_checkpoint_that_does_not_fit_names_it_and_touches_no_file(
    tmp_path, completed_job, make, channels: list[int], message: str
) -> None:
    directory = tmp_path / "checkpoints"
    shutil.copytree(completed_job() / "checkpoints", directory)
    path = make(directory / "last.ckpt", directory)
    files = {p: p.read_bytes() for p in directory.rglob("*")}
    pl.seed_everything(0, verbose=False)
    model = ImageClassifier(arch_kwargs={"channels": channels})
    callbacks = [
        NetworkSlimming(1e-3),
        StructuredPruning(0.5, schedule="linear", start_epoch=1, end_epoch=3, log_table=False),
        ModelCheckpoint(directory, save_last=True, every_n_epochs=1, save_on_train_epoch_end=True),
    ]
    trainer = pl.Trainer(
        max_epochs=EPOCHS, limit_train_batches=2, logger=False, enable_progress_bar=False, callbacks=callbacks
    )
    with pytest.raises(RecordError, match=message):
        trainer.fit(model, DigitsDataModule(batch_size=32), ckpt_path=path)
    assert {p: p.read_bytes() for p in directory.rglob("*")} == files
