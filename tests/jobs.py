"""A training job for subprocess tests: digits, slimming, scheduled pruning, checkpoints, optional SIGKILL.

    python tests/jobs.py ROOT [--kill-at-epoch E] [--resume] [--when train_epoch_end|validation_end]
                              [--importance NAME] [--devices N]

Writes ROOT/final.pt (state_dict, record, callback state) when training completes, or
ROOT/final-rank{r}.pt per process with ``--devices N`` (DDP on CPU with gloo). With
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
        callbacks.append(KillAt(args.kill_at_epoch))
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
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--when", default="train_epoch_end")
    parser.add_argument("--importance", default="l1")
    parser.add_argument("--devices", type=int, default=1)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    trainer, model, data = build(args)
    trainer.fit(model, data, ckpt_path="last" if args.resume else None)
    pruning = next(cb for cb in trainer.callbacks if isinstance(cb, StructuredPruning))
    name = f"final-rank{trainer.global_rank}.pt" if args.devices > 1 else "final.pt"
    torch.save(
        {"state_dict": model.state_dict(), "record": applied_record(model), "pruning": pruning.state_dict()},
        args.root / name,
    )


if __name__ == "__main__":
    main()
