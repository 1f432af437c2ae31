"""The main job on the embedded default data: train with Network Slimming, prune, fine-tune, compare.

    lightning-prune-demo                      # or: python -m lightning_prune.demo
    lightning-prune-demo --epochs 40 --amount 0.6 --importance bn_scale

A small VGG-style CNN learns sklearn's 8x8 digits with an L1 penalty on its BatchNorm scales; from
``--start-epoch`` on, ``StructuredPruning`` removes channels in four steps until the MACs are at most
``1 - amount`` of the dense model's, and training continues as fine-tuning. The dense model (as it
was right before the first cut) and the final one are then compared on the test split: accuracy,
parameters, MACs and measured CPU latency (both models timed in turns: median and interquartile range,
and a ratio only where the ranges are apart).
"""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from lightning_prune.callbacks import NetworkSlimming, StructuredPruning
from lightning_prune.callbacks.snapshot import KeepDense
from lightning_prune.data import DigitsDataModule
from lightning_prune.measure import Spread, compare_latency, count_macs, count_params
from lightning_prune.models import ImageClassifier


def accuracy(model: pl.LightningModule, data: DigitsDataModule) -> float:
    model.eval()
    correct = total = 0
    with torch.inference_mode():
        for x, y in data.test_dataloader():
            correct += int((model(x).argmax(1) == y).sum())
            total += len(y)
    return correct / total


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=40, help="total training epochs (default 40)")
    parser.add_argument("--start-epoch", type=int, default=15, help="epoch of the first pruning step (default 15)")
    parser.add_argument("--steps", type=int, default=4, help="pruning steps, one per epoch (default 4)")
    parser.add_argument("--amount", type=float, default=0.6, help="fraction of MACs to remove (default 0.6)")
    parser.add_argument("--importance", default="bn_scale", help="criterion (default bn_scale)")
    parser.add_argument("--penalty", type=float, default=1e-3, help="Network Slimming λ (default 1e-3)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--root", type=Path, default=Path("lightning_prune_demo"), help="checkpoints and logs")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    run(parse(argv))


def default_pruning(args: argparse.Namespace) -> StructuredPruning:
    return StructuredPruning(
        args.amount,
        args.importance,
        schedule="linear",
        start_epoch=args.start_epoch,
        end_epoch=args.start_epoch + args.steps - 1,
        target="macs",
    )


def fit(args: argparse.Namespace, pruning: Callback) -> tuple[pl.LightningModule, pl.LightningModule, DigitsDataModule]:
    """Train the recipe with ``pruning``; return the model right before the first step, the final one, the data."""
    pl.seed_everything(args.seed, verbose=False)
    data = DigitsDataModule(seed=args.seed)
    model = ImageClassifier()
    dense = KeepDense(args.start_epoch)
    trainer = pl.Trainer(
        max_epochs=args.epochs,
        default_root_dir=args.root,
        logger=pl.loggers.CSVLogger(args.root),
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[
            NetworkSlimming(args.penalty, stop_epoch=args.start_epoch + args.steps),
            dense,
            pruning,
            ModelCheckpoint(args.root / "checkpoints", save_last=True),
        ],
    )
    trainer.fit(model, data)
    data.setup()
    return dense.model, model, data


def measure(model: pl.LightningModule, data: DigitsDataModule, images: torch.Tensor) -> dict[str, float]:
    """Test accuracy, parameters and MACs per image, on the CPU."""
    model = model.cpu().eval()
    return {"accuracy": accuracy(model, data), "params": count_params(model), "macs": count_macs(model, images[:1])}


def milliseconds(spread: Spread) -> str:
    return f"{spread.median * 1e3:.2f} ms [{spread.low * 1e3:.2f}-{spread.high * 1e3:.2f}]"


def run(args: argparse.Namespace) -> dict[str, float]:
    """Train, prune and fine-tune as ``args`` say; print the table and return the headline ratios."""
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    dense, model, data = fit(args, default_pruning(args))
    images = torch.cat([x for x, _ in data.test_dataloader()])
    before, after = measure(dense, data, images), measure(model, data, images)
    timing = compare_latency(dense, model, images, min_run_time=2.0)  # both on the CPU now
    speed = f"{timing.ratio:.2f}x faster" if timing.resolved else "within noise"
    lines = [
        f"| digits test split ({len(images)} images) | dense (slimmed) | pruned + fine-tuned | change |",
        "|---|---|---|---|",
        f"| test accuracy | {before['accuracy']:.2%} | {after['accuracy']:.2%} | "
        f"{100 * (after['accuracy'] - before['accuracy']):+.2f} points |",
        f"| parameters | {before['params']:,} | {after['params']:,} | "
        f"{before['params'] / after['params']:.2f}x fewer |",
        f"| MACs per image | {before['macs']:,} | {after['macs']:,} | {before['macs'] / after['macs']:.2f}x fewer |",
        f"| CPU latency, whole split (median [IQR], {timing.threads} threads) | "
        f"{milliseconds(timing.dense)} | {milliseconds(timing.pruned)} | {speed} |",
    ]
    print("\n".join(lines))
    return {
        "accuracy_drop": before["accuracy"] - after["accuracy"],
        "macs_ratio": before["macs"] / after["macs"],
        "latency_ratio": timing.ratio,
        "latency_resolved": timing.resolved,
    }


if __name__ == "__main__":
    main()
