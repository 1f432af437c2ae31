"""A training job for subprocess tests: digits, slimming, scheduled pruning, checkpoints, optional SIGKILL.

    python tests/jobs.py ROOT [--kill-at-epoch E] [--resume] [--when train_epoch_end|validation_end]

Writes ROOT/final.pt (state_dict, record, callback state) when training completes. With
``--kill-at-epoch E`` the process SIGKILLs itself at the start of epoch E, after the checkpoint of
epoch E-1 was written. ``--resume`` continues from ROOT/checkpoints/last.ckpt.
"""

from __future__ import annotations

import argparse
import os
import signal
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


class KillAt(Callback):
    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch == self.epoch:
            os.kill(os.getpid(), signal.SIGKILL)


def build(root: Path, kill_at: int | None, when: str) -> tuple[pl.Trainer, ImageClassifier, DigitsDataModule]:
    pl.seed_everything(0, verbose=False)
    model = ImageClassifier(arch_kwargs={"channels": [8, 16, 32]}, lr=0.05)
    pruning = StructuredPruning(importance="l1", when=when, log_table=False, **SCHEDULE)
    callbacks = [
        NetworkSlimming(1e-3, stop_epoch="after_pruning"),
        pruning,
        ModelCheckpoint(root / "checkpoints", save_last=True, every_n_epochs=1, save_on_train_epoch_end=True),
    ]
    if kill_at is not None:
        callbacks.append(KillAt(kill_at))
    trainer = pl.Trainer(
        max_epochs=EPOCHS,
        limit_train_batches=6,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,
        callbacks=callbacks,
    )
    return trainer, model, DigitsDataModule(batch_size=32)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("root", type=Path)
    parser.add_argument("--kill-at-epoch", type=int)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--when", default="train_epoch_end")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    trainer, model, data = build(args.root, args.kill_at_epoch, args.when)
    trainer.fit(model, data, ckpt_path="last" if args.resume else None)
    pruning = next(cb for cb in trainer.callbacks if isinstance(cb, StructuredPruning))
    torch.save(
        {"state_dict": model.state_dict(), "record": applied_record(model), "pruning": pruning.state_dict()},
        args.root / "final.pt",
    )


if __name__ == "__main__":
    main()
