"""The digits recipe with lightning-prune, with Lightning's ModelPruning and with Torch-Pruning, side by side.

    python benchmarks/digits_peers.py [--seed 0]

Same data, model, seed, epochs, Network Slimming penalty and pruning epochs for all three; only the
pruning differs:

- lightning-prune: ``StructuredPruning(0.6, "bn_scale", target="macs")`` in four steps (the demo);
- Lightning ``ModelPruning("ln_structured")`` on every conv, in four steps, to the same overall
  fraction of filters as lightning-prune removed: it only masks, so nothing gets smaller or faster;
- Torch-Pruning 1.6.1 ``BNScalePruner`` driven by hand from a callback (4 iterative steps, same
  global fraction of channels). Its surgery creates new ``nn.Parameter`` objects, so the optimizer is
  rebuilt with ``configure_optimizers`` after each step (momentum is lost) and the LR schedule is
  fast-forwarded to the current epoch, the kindest way to use it in a Lightning run.

Prints test accuracy, parameters (and non-zero ones), MACs per image and CPU latency on the test split.
"""

from __future__ import annotations

import argparse
import warnings

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback, ModelPruning
from torch import nn

from lightning_prune.demo import default_pruning, fit, measure, parse


def filters(model: nn.Module) -> int:
    return sum(m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d))


class ConvFilterPruning(ModelPruning):
    """Lightning's ModelPruning restricted to conv weights (it needs module objects, so it picks them itself)."""

    def filter_parameters_to_prune(self, parameters_to_prune: list) -> list:
        return [(module, name) for module, name in parameters_to_prune if isinstance(module, nn.Conv2d)]


class TorchPruningSteps(Callback):
    """Torch-Pruning's BN-scale pruner stepped at the end of the scheduled epochs."""

    def __init__(self, ratio: float, epochs: list[int]) -> None:
        self.ratio, self.epochs, self.pruner = ratio, epochs, None

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        import torch_pruning as tp

        if trainer.current_epoch not in self.epochs:
            return
        if self.pruner is None:
            self.pruner = tp.pruner.BNScalePruner(
                pl_module.net,
                pl_module.example_input_array.to(pl_module.device),
                importance=tp.importance.BNScaleImportance(),
                iterative_steps=len(self.epochs),
                pruning_ratio=self.ratio,
                global_pruning=True,
                ignored_layers=[pl_module.net.classifier],
            )
        self.pruner.step()
        trainer.strategy.setup_optimizers(trainer)  # new Parameter objects: the old optimizer holds dead tensors
        for config in trainer.lr_scheduler_configs:
            for _ in range(trainer.current_epoch + 1):
                config.scheduler.step()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0)
    seed = parser.parse_args().seed
    warnings.filterwarnings("ignore")
    args = parse(["--seed", str(seed), "--root", "benchmark_runs/ours"])
    epochs = list(range(args.start_epoch, args.start_epoch + args.steps))

    dense, ours, data = fit(args, default_pruning(args))
    fraction = 1 - filters(ours) / filters(dense)
    per_step = 1 - (1 - fraction) ** (1 / args.steps)
    masked = ConvFilterPruning(
        "ln_structured",
        parameter_names=["weight"],
        amount=lambda epoch: per_step if epoch in epochs else 0.0,
        pruning_dim=0,
        pruning_norm=1,
        use_global_unstructured=False,
        make_pruning_permanent=True,
        verbose=0,
    )
    args.root = args.root.parent / "model_pruning"
    _, lightning_model, _ = fit(args, masked)
    args.root = args.root.parent / "torch_pruning"
    _, peer_model, _ = fit(args, TorchPruningSteps(fraction, epochs))

    rows = [("dense, before pruning", dense), ("lightning-prune", ours)]
    rows += [("Lightning ModelPruning", lightning_model), ("Torch-Pruning 1.6.1", peer_model)]
    base = measure(dense, data)
    print(f"\nfilters removed: {fraction:.1%} (lightning-prune's result; ModelPruning and Torch-Pruning aimed at it)")
    print("| method | test accuracy | params | non-zero params | MACs/image | latency (360 images) | speedup |")
    print("|---|---|---|---|---|---|---|")
    for name, model in rows:
        result = measure(model, data)
        nonzero = sum(int((p != 0).sum()) for p in model.parameters())
        print(
            f"| {name} | {result['accuracy']:.2%} | {result['params']:,} | {nonzero:,} | {result['macs']:,} | "
            f"{result['latency'] * 1e3:.2f} ms | {base['latency'] / result['latency']:.2f}x |",
            flush=True,
        )


if __name__ == "__main__":
    main()
