"""Importance criteria side by side on the digits data, and what gradient statistics cost per training step.

    python benchmarks/criteria.py                  # 3 seeds, both tables (about 10 minutes on 2 cores)
    python benchmarks/criteria.py --seeds 0 --skip-cost

Table 1: one dense model per seed (15 epochs with Network Slimming, λ=1e-3) is copied for every
criterion and amount; each copy trains one more epoch (during which gradient criteria accumulate
their statistics), loses 50% or 70% of its prunable channels (global ranking, scores normalised per
group by their mean) and is fine-tuned 10 epochs. Test accuracy right after the cut and after
fine-tuning, mean ± spread over seeds; params and MACs. Random is the floor.

Table 2: time per training step (forward, backward, SGD step) of a model without and with the taylor/fisher
hooks attached, the same model timed in alternating turns (``--threads``; median and interquartile range), for
the digits CNN and a CIFAR ResNet-18 shape (batch 64, 32×32), and the memory the accumulated statistics take.
``benchmarks/hook_instructions.py`` counts the same overhead in instructions, which the machine's noise does not
move.

    python benchmarks/criteria.py --skip-accuracy --threads 1 --repeats 10 --min-run-time 3   # the cost only
    OMP_NUM_THREADS=1 python benchmarks/criteria.py --skip-accuracy --threads 1 --repeats 40   # as in the README
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
import warnings

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback

import lightning_prune as lp
from lightning_prune.callbacks import NetworkSlimming, StructuredPruning
from lightning_prune.data import DigitsDataModule
from lightning_prune.demo import accuracy
from lightning_prune.models import ImageClassifier
from lightning_prune.statistics import GradientStatistics

CRITERIA = ["random", "l1", "l2", "bn_scale", "fpgm", "taylor", "fisher"]
AMOUNTS = [0.5, 0.7]


class AccuracyAfterCut(Callback):
    """Test accuracy right after the pruning step of epoch 0 (listed after StructuredPruning)."""

    def __init__(self, data: DigitsDataModule) -> None:
        self.data, self.value = data, None

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch == 0:
            self.value = accuracy(pl_module, self.data)
            pl_module.train()


def quiet_trainer(epochs: int, callbacks: list) -> pl.Trainer:
    return pl.Trainer(
        max_epochs=epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
    )


def dense_model(seed: int, data: DigitsDataModule) -> ImageClassifier:
    pl.seed_everything(seed, verbose=False)
    model = ImageClassifier()
    quiet_trainer(15, [NetworkSlimming(1e-3)]).fit(model, data)
    return model


def prune_and_finetune(dense: ImageClassifier, data: DigitsDataModule, importance: str, amount: float) -> dict:
    model = copy.deepcopy(dense)
    model.hparams.lr = 0.01
    after_cut = AccuracyAfterCut(data)
    pruning = StructuredPruning(amount, importance, schedule="oneshot", start_epoch=0, log_table=False)
    quiet_trainer(11, [pruning, after_cut]).fit(model, data)
    return {
        "cut": after_cut.value,
        "tuned": accuracy(model, data),
        "params": lp.count_params(model),
        "macs": lp.count_macs(model, model.example_input_array[:1]),
    }


def spread(values: list[float]) -> str:
    mean = statistics.mean(values)
    return f"{mean:.2%} ± {statistics.pstdev(values):.2%}" if len(values) > 1 else f"{mean:.2%}"


def accuracy_table(seeds: list[int]) -> None:
    data = DigitsDataModule()
    data.setup()
    results: dict[tuple[str, float], list[dict]] = {}
    dense_accuracy = []
    for seed in seeds:
        dense = dense_model(seed, data)
        dense_accuracy.append(accuracy(dense, data))
        dense.train()
        for amount in AMOUNTS:
            for importance in CRITERIA:
                pl.seed_everything(seed, verbose=False)
                results.setdefault((importance, amount), []).append(prune_and_finetune(dense, data, importance, amount))
    print(f"dense test accuracy: {spread(dense_accuracy)} over seeds {seeds}")
    print(
        "| channels removed | criterion | accuracy after the cut | after 10 fine-tuning epochs | params | MACs/image |"
    )
    print("|---|---|---|---|---|---|")
    for amount in AMOUNTS:
        floor = statistics.mean(r["tuned"] for r in results[("random", amount)])
        for importance in CRITERIA:
            runs = results[(importance, amount)]
            tuned = [r["tuned"] for r in runs]
            mark = "" if importance == "random" or statistics.mean(tuned) > floor else " (not above random)"
            params, macs = (statistics.mean(r[key] for r in runs) for key in ("params", "macs"))
            print(
                f"| {amount:.0%} | {importance} | {spread([r['cut'] for r in runs])} | {spread(tuned)}{mark} | "
                f"{params:,.0f} | {macs:,.0f} |",
                flush=True,
            )


def stepper(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor):
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

    def step() -> None:
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()

    return step


MIN_STEPS = 20  # per turn: the first hooked step of a turn also measures every weight on its gradient


def alternating(step, collector: GradientStatistics, repeats: int, min_run_time: float) -> list[list[float]]:
    """Seconds per step of one model without and with the hooks, in alternating turns of the same number of steps:
    the hooks are attached for a hooked turn and detached (their last batches folded) after it. One model for
    both, so that where its tensors happen to lie in memory favours neither (two copies differed by ±4% here).
    A turn has at least ``MIN_STEPS`` steps: attaching costs its first step more than training does (every weight
    is also measured on its gradient until that step shows which form it needs)."""
    for hooked in (False, True):  # warm-up
        if hooked:
            collector.attach()
        step()
        if hooked:
            collector.detach()
    start = time.perf_counter()
    step()
    number = max(MIN_STEPS, round(min_run_time / repeats / (time.perf_counter() - start)))
    samples: list[list[float]] = [[], []]
    for turn in range(repeats):
        for hooked in (False, True) if turn % 2 == 0 else (True, False):
            if hooked:
                collector.attach()
            start = time.perf_counter()
            for _ in range(number):
                step()
            if hooked:
                collector.detach()
            samples[hooked].append((time.perf_counter() - start) / number)
    return samples


def cost_table(repeats: int, min_run_time: float) -> None:
    import torchvision

    cases = [
        ("digits CNN, batch 64, 8x8", ImageClassifier().net, torch.randn(64, 1, 8, 8)),
        ("resnet18, batch 64, 32x32", torchvision.models.resnet18(num_classes=10), torch.randn(64, 3, 32, 32)),
    ]
    print(
        f"\n{torch.get_num_threads()} thread(s); the same model timed without and with hooks in {repeats} turns "
        f"(at least {MIN_STEPS} steps each)"
    )
    print(
        "| model | step without hooks [IQR] | with taylor+fisher hooks [IQR] | overhead of the medians "
        "| overhead, median of the turns' ratios [IQR] | statistics memory |"
    )
    print("|---|---|---|---|---|---|")
    for name, model, x in cases:
        y = torch.randint(0, 10, (x.shape[0],))
        collector = GradientStatistics(model, lp.build_graph(model, x[:2]))
        plain_times, hooked_times = alternating(stepper(model, x, y), collector, repeats, min_run_time)
        accumulated = collector.state()
        size = sum(t.numel() * t.element_size() for kind in ("taylor", "fisher") for t in accumulated[kind].values())
        cells = []
        for times in (plain_times, hooked_times):
            low, median, high = statistics.quantiles(times, n=4, method="inclusive")
            cells.append((median, f"{median * 1e3:.2f} ms [{low * 1e3:.2f}-{high * 1e3:.2f}]"))
        overhead = cells[1][0] / cells[0][0] - 1
        # each turn times both back to back: its ratio cancels the machine's drift between turns
        low, median, high = statistics.quantiles(
            [h / p - 1 for p, h in zip(plain_times, hooked_times, strict=True)], n=4, method="inclusive"
        )
        paired = f"{median:+.1%} [{low:+.1%} to {high:+.1%}]"
        print(
            f"| {name} | {cells[0][1]} | {cells[1][1]} | {overhead:+.1%} | {paired} | {size / 1024:.1f} KiB |",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--skip-accuracy", action="store_true")
    parser.add_argument("--skip-cost", action="store_true")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=20, help="alternating turns of the cost table")
    parser.add_argument("--min-run-time", type=float, default=6.0, help="seconds per model of the cost table")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    if not args.skip_accuracy:
        accuracy_table(args.seeds)
    if not args.skip_cost:
        cost_table(args.repeats, args.min_run_time)


if __name__ == "__main__":
    main()
