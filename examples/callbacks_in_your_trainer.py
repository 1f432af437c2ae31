"""Structured pruning added to your own LightningModule and Trainer, then the pruned model reloaded.

Shows: a LightningModule written from scratch (a small CNN with BatchNorm on scikit-learn's 8×8 digits,
Adam) trained by an ordinary ``pl.Trainer`` with two extra callbacks, ``NetworkSlimming`` (pushes unneeded
BatchNorm scales to zero) and ``StructuredPruning`` (cuts the weakest channels in two steps mid-training,
then training goes on as fine-tuning), next to a ``ModelCheckpoint``. The best checkpoint holds the pruned
architecture: the module derives from ``lightning_prune.PrunableModule`` (a LightningModule), so Lightning's own
``DigitsModule.load_from_checkpoint(path)`` rebuilds it in its pruned shape before the weights load (for a
module that cannot change its base class: ``lightning_prune.load_from_checkpoint(DigitsModule, path)``). Prints the
parameters before and after, and the test accuracy of the reloaded model.

    python examples/callbacks_in_your_trainer.py                       # 20 epochs, under a minute on 2 cores
    python examples/callbacks_in_your_trainer.py --epochs 4 --tiny     # a few batches per epoch, seconds
"""

from __future__ import annotations

import argparse

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from sklearn.datasets import load_digits
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_prune as lp


class DigitsModule(lp.PrunableModule):
    """Your own module: nothing in it knows about pruning."""

    def __init__(self, width: int = 32, lr: float = 3e-3) -> None:
        super().__init__()
        self.save_hyperparameters()  # load_from_checkpoint rebuilds the dense module from these
        self.net = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1, bias=False), nn.BatchNorm2d(2 * width), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(2 * width, 4 * width, 3, padding=1, bias=False), nn.BatchNorm2d(4 * width), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4 * width, 10),
        )  # fmt: skip
        self.example_input_array = torch.zeros(2, 1, 8, 8)  # what StructuredPruning traces

    def forward(self, images: Tensor) -> Tensor:
        return self.net(images)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        images, labels = batch
        loss = F.cross_entropy(self(images), labels)
        self.log("train/loss", loss)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        images, labels = batch
        self.log("val/acc", (self(images).argmax(1) == labels).float().mean())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


def digits_splits(seed: int = 0) -> dict[str, TensorDataset]:
    """scikit-learn's 1,797 digits as (1, 8, 8) images in [0, 1], split 1,077 / 360 / 360 at random."""
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16
    labels = torch.tensor(digits.target)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    parts = {"train": order[:-720], "val": order[-720:-360], "test": order[-360:]}
    return {name: TensorDataset(images[index], labels[index]) for name, index in parts.items()}


def accuracy(model: nn.Module, data: TensorDataset) -> float:
    images, labels = data.tensors
    with torch.no_grad():
        return (model.eval()(images).argmax(1) == labels).float().mean().item()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=20, help="training epochs, at least 4 (20)")
    parser.add_argument("--amount", type=float, default=0.5, help="fraction of the channels removed (0.5)")
    parser.add_argument("--checkpoints", default="checkpoints", help="folder of the checkpoints (checkpoints)")
    parser.add_argument("--tiny", action="store_true", help="three batches per epoch: a run in seconds")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.epochs < 4:
        parser.error(f"--epochs must be at least 4 (train, two pruning steps, fine-tune); got {args.epochs}")

    pl.seed_everything(args.seed, verbose=False)
    splits = digits_splits(args.seed)
    model = DigitsModule()
    image = torch.zeros(1, 1, 8, 8)
    params_before, macs_before = lp.count_params(model), lp.count_macs(model, image)

    # Prune in the middle of the run: two steps at the ends of epochs middle - 1 and middle, then fine-tune.
    middle = args.epochs // 2
    checkpoint = ModelCheckpoint(dirpath=args.checkpoints, monitor="val/acc", mode="max", save_last=True)
    trainer = pl.Trainer(
        max_epochs=args.epochs,
        callbacks=[
            lp.NetworkSlimming(penalty=1e-4, stop_epoch="after_pruning"),
            lp.StructuredPruning(
                amount=args.amount, importance="bn_scale", schedule="linear", start_epoch=middle - 1, end_epoch=middle
            ),
            checkpoint,
        ],
        logger=False,
        limit_train_batches=3 if args.tiny else None,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(
        model,
        DataLoader(splits["train"], batch_size=64, shuffle=True),
        DataLoader(splits["val"], batch_size=360),
    )

    # The best checkpoint after the last pruning step (StructuredPruning's reset_best), in its pruned shape.
    reloaded = DigitsModule.load_from_checkpoint(checkpoint.best_model_path).eval()
    print(f"best checkpoint: {checkpoint.best_model_path}")
    print(f"params before: {params_before:,}")
    print(f"params after: {lp.count_params(reloaded):,}")
    print(f"MACs per image before: {macs_before:,}")
    print(f"MACs per image after: {lp.count_macs(reloaded, image):,}")
    print(f"test accuracy of the reloaded model: {accuracy(reloaded, splits['test']):.2%}")


if __name__ == "__main__":
    torch.set_num_threads(min(torch.get_num_threads(), 2))  # a tiny CNN: more threads only add overhead
    main()
