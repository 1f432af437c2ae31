"""A training job for subprocess tests: digits, slimming, scheduled pruning, checkpoints, optional SIGKILL.

Tests start it with :func:`run_job`; by hand::

    python tests/jobs.py ROOT [--kill-at-epoch E [--kill-point POINT]] [--resume]
                              [--when train_epoch_end|validation_end] [--importance NAME] [--devices N]

Writes ROOT/final.pt (state_dict, record, callback state, epoch and step) when training completes, or
ROOT/final-rank{r}.pt per process with ``--devices N`` (DDP on CPU with gloo). ``--resume``
continues from ROOT/checkpoints/last.ckpt.

The job leads its own process group (its DDP ranks join it), and a kill is ``SIGKILL`` to the whole
group by rank zero, as a scheduler kills a job: no rank outlives it. ``--kill-at-epoch E`` kills in
epoch E, at ``--kill-point``:

- ``epoch_start``: at the start of epoch E, after the checkpoints of epoch E-1 were written;
- ``selection``: in the pruning step of epoch E, after channels were scored and selected, before the
  first tensor is cut;
- ``surgery``: in the pruning step of epoch E, after some tensors (and their momentum) were cut;
- ``checkpoint``: while ``last.ckpt`` of epoch E is written (the second save of the epoch, after the
  ``epoch=E-...`` one), once half of its bytes reached the file.
"""

from __future__ import annotations

import argparse
import builtins
import io
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from lightning_prune.callbacks import NetworkSlimming, StructuredPruning, applied_record
from lightning_prune.data import DigitsDataModule
from lightning_prune.models import ImageClassifier

EPOCHS = 6
SCHEDULE = {"schedule": "linear", "start_epoch": 1, "end_epoch": 3, "amount": 0.5}


KILL_POINTS = ("epoch_start", "selection", "surgery", "checkpoint")
SLICES_BEFORE_KILL = 2


def kill_job() -> None:
    os.killpg(os.getpgid(0), signal.SIGKILL)


class KillAt(Callback):
    """Kills the job at ``point`` of ``epoch`` (see the module docstring), from rank zero."""

    def __init__(self, epoch: int, point: str) -> None:
        self.epoch, self.point = epoch, point
        self.saves = 0

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch != self.epoch or not trainer.is_global_zero:
            return
        if self.point == "epoch_start":
            kill_job()
        elif self.point == "selection":
            _kill_before_cutting()
        elif self.point == "surgery":
            _kill_while_cutting()

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        if self.point != "checkpoint" or trainer.current_epoch != self.epoch or not trainer.is_global_zero:
            return
        self.saves += 1
        if self.saves == 2:
            buffer = io.BytesIO()
            torch.save(checkpoint, buffer)
            _kill_in_next_file_written(len(buffer.getvalue()) // 2)


def _real(tensor: torch.Tensor) -> bool:
    return tensor.device.type != "meta"  # meta clones measure candidate cuts; they are not the model


def _kill_before_cutting() -> None:
    import lightning_prune.api

    original = lightning_prune.api.apply_cuts

    def apply_cuts(model, *args, **kwargs):
        if _real(next(model.parameters())):
            kill_job()
        return original(model, *args, **kwargs)

    lightning_prune.api.apply_cuts = apply_cuts


def _kill_while_cutting() -> None:
    import lightning_prune.surgery

    original, count = lightning_prune.surgery.slice_tensor, [0]

    def slice_tensor(tensor, *args, **kwargs):
        if _real(tensor):
            count[0] += 1
            if count[0] > SLICES_BEFORE_KILL:
                kill_job()
        return original(tensor, *args, **kwargs)

    lightning_prune.surgery.slice_tensor = slice_tensor


class _KillingFile:
    """A file opened for writing that kills the job once ``limit`` bytes were written to it."""

    def __init__(self, file: io.BufferedWriter, limit: int) -> None:
        self.file, self.room = file, limit

    def write(self, data: bytes) -> int:
        data = memoryview(data).cast("B")
        if len(data) >= self.room:
            self.file.write(data[: self.room])
            self.file.flush()
            kill_job()
        self.room -= len(data)
        return self.file.write(data)

    def __getattr__(self, name: str):
        return getattr(self.file, name)

    def __enter__(self) -> _KillingFile:
        return self

    def __exit__(self, *exception) -> None:
        self.file.close()


def _kill_in_next_file_written(limit: int) -> None:
    original = builtins.open

    def killing_open(file, mode="r", *args, **kwargs):
        opened = original(file, mode, *args, **kwargs)
        if "w" in mode and "b" in mode:
            builtins.open = original
            return _KillingFile(opened, limit)
        return opened

    builtins.open = killing_open


def build(args: argparse.Namespace) -> tuple[pl.Trainer, ImageClassifier, DigitsDataModule]:
    root = args.root
    pl.seed_everything(0, verbose=False)
    model = ImageClassifier(arch_kwargs={"channels": [8, 16, 32]}, lr=0.05)
    pruning = StructuredPruning(importance=args.importance, when=args.when, log_table=False, **SCHEDULE)
    callbacks = [
        NetworkSlimming(1e-3, stop_epoch="after_pruning"),
        pruning,
        ModelCheckpoint(root / "checkpoints", save_last=True, every_n_epochs=1, save_on_train_epoch_end=True),
    ]
    if args.kill_at_epoch is not None:
        callbacks.append(KillAt(args.kill_at_epoch, args.kill_point))
    distributed = {"strategy": "ddp", "accelerator": "cpu", "devices": args.devices} if args.devices > 1 else {}
    trainer = pl.Trainer(
        max_epochs=EPOCHS,
        limit_train_batches=6,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,
        callbacks=callbacks,
        **distributed,
    )
    return trainer, model, DigitsDataModule(batch_size=32)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("root", type=Path)
    parser.add_argument("--kill-at-epoch", type=int)
    parser.add_argument("--kill-point", choices=KILL_POINTS, default="epoch_start")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--when", default="train_epoch_end")
    parser.add_argument("--importance", default="l1")
    parser.add_argument("--devices", type=int, default=1)
    args = parser.parse_args()
    if "LOCAL_RANK" not in os.environ and os.getpgid(0) != os.getpid():  # lead a group; DDP ranks join it
        os.setpgid(0, 0)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)  # convolutions this small only lose time to threads (and DDP ranks share the cores)
    trainer, model, data = build(args)
    trainer.fit(model, data, ckpt_path="last" if args.resume else None)
    pruning = next(cb for cb in trainer.callbacks if isinstance(cb, StructuredPruning))
    name = f"final-rank{trainer.global_rank}.pt" if args.devices > 1 else "final.pt"
    final = {"state_dict": model.state_dict(), "record": applied_record(model), "pruning": pruning.state_dict()}
    torch.save({**final, "epoch": trainer.current_epoch, "global_step": trainer.global_step}, args.root / name)


def run_job(root: Path, *arguments: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run the job in a subprocess, in a session of its own; fails if any of its processes outlives it."""
    command = [sys.executable, __file__, str(root), *arguments]
    job = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = job.communicate(timeout=timeout)  # returns once every rank closed the pipes
    finally:
        survivors = _survivors(job.pid)
        if survivors or job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
            job.wait()
    assert not survivors, f"processes of the job outlived it: {survivors}"
    return subprocess.CompletedProcess(command, job.returncode, stdout, stderr)


def _survivors(group: int, patience: float = 5.0) -> list[str]:
    """Live processes of a process group (zombies are dead), waiting ``patience`` seconds for exits."""
    deadline = time.monotonic() + patience
    while True:
        alive = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                name, fields = stat.read_text().rsplit(")", 1)
            except OSError:  # exited meanwhile
                continue
            state, _, process_group = fields.split()[:3]
            if int(process_group) == group and state != "Z":
                alive.append(f"{stat.parent.name} {name.split('(', 1)[1]}")
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.1)


if __name__ == "__main__":
    main()
