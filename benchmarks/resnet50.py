"""ResNet-50 on this CPU: time to trace and prune next to Torch-Pruning, and real inference speedups.

    python benchmarks/resnet50.py            # both tables
    python benchmarks/resnet50.py --skip-peer
    python benchmarks/resnet50.py --race 5 --threads 1   # default prune vs Torch-Pruning, interleaved, 5 rounds

Table 1 times building the dependency graph and pruning 50% of channels (L1), median of 3 runs,
for lightning-prune (by default it traces in training and eval mode and verifies the result by a
re-trace; both can be turned off) and Torch-Pruning 1.6.1.
Table 2 measures eval-mode latency with ``lightning_prune.compare_latency`` (2 threads), dense and pruned timed in
alternating turns in the same process, for 30% and 50% of every layer's filters removed (``scope="local"``), at
batch 1 and 16, in three layouts (NCHW; channels-last; BatchNorm folded into the convolutions and channels-last, the
deployment form), next to the MACs ratio and the reference figures (1.4x at 30%, 2.0x at 50% of filters).

    python benchmarks/resnet50.py --latency-only --threads 2
"""

from __future__ import annotations

import argparse
import copy
import itertools
import statistics
import time

import torch
import torchvision

import lightning_prune as lp

REFERENCE = {0.3: 1.4, 0.5: 2.0}


def fresh() -> torch.nn.Module:
    torch.manual_seed(0)
    return torchvision.models.resnet50(weights=None).eval()


def median_seconds(run, repeats: int = 3) -> float:
    """Median wall time of ``run(model)`` on a freshly built model (construction not timed)."""
    times = []
    for _ in range(repeats):
        model = fresh()
        start = time.perf_counter()
        run(model)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def peer_prune(model: torch.nn.Module, x: torch.Tensor) -> None:
    """Torch-Pruning 1.6.1's 50% L1 prune of ``model``, its graph built on ``x`` and the classifier kept."""
    import torch_pruning as tp

    importance = tp.importance.MagnitudeImportance(p=1)
    tp.pruner.MagnitudePruner(model, x, importance=importance, pruning_ratio=0.5, ignored_layers=[model.fc]).step()


def timing_table(skip_peer: bool) -> None:
    x = torch.randn(2, 3, 224, 224)
    rows = [
        ("lightning-prune: trace -> groups", median_seconds(lambda m: lp.build_graph(m, x))),
        (
            "lightning-prune: prune 50% (eval-mode trace only, verify=False)",
            median_seconds(lambda m: lp.prune(m, x, 0.5, verify=False, modes=("eval",))),
        ),
        ("lightning-prune: prune 50% (verify=False)", median_seconds(lambda m: lp.prune(m, x, 0.5, verify=False))),
        (
            "lightning-prune: prune 50% (verified, traced in both modes, the earlier default)",
            median_seconds(lambda m: lp.prune(m, x, 0.5, modes=("train", "eval"))),
        ),
        (
            "lightning-prune: prune 50% (verified; default: eval only, no module branches on `training`)",
            median_seconds(lambda m: lp.prune(m, x, 0.5)),
        ),
    ]
    if not skip_peer:
        import torch_pruning as tp

        rows += [
            ("Torch-Pruning 1.6.1: build graph", median_seconds(lambda m: tp.DependencyGraph().build_dependency(m, x))),
            ("Torch-Pruning 1.6.1: prune 50% (graph included)", median_seconds(lambda m: peer_prune(m, x))),
        ]
    print("| resnet50, batch 2, 224x224 (model construction not timed) | seconds |")
    print("|---|---|")
    for label, seconds in rows:
        print(f"| {label} | {seconds:.2f} |", flush=True)


def race(rounds: int) -> None:
    """The default ``lp.prune`` (50%, L1) and Torch-Pruning's (50%, L1, fc kept) in alternating turns on fresh
    models, so that the machine's drift falls on both: median and range of each over ``rounds`` turns."""
    x = torch.randn(2, 3, 224, 224)
    runs = {
        "lightning-prune: prune 50% (default)": lambda m: lp.prune(m, x, 0.5),
        "Torch-Pruning 1.6.1": lambda m: peer_prune(m, x),
    }
    times: dict[str, list[float]] = {label: [] for label in runs}
    for turn in range(rounds):
        for label in list(runs)[:: 1 if turn % 2 == 0 else -1]:
            times[label].append(median_seconds(runs[label], repeats=1))
    print(
        f"| resnet50, batch 2, {torch.get_num_threads()} thread(s), {rounds} alternating turns | median s | range s |"
    )
    print("|---|---|---|")
    for label, values in times.items():
        print(f"| {label} | {statistics.median(values):.2f} | {min(values):.2f}-{max(values):.2f} |")


def folded(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` with each BatchNorm folded into the convolution before it (torch's FX fuser, eval mode): what
    ONNX Runtime and other inference engines do on loading."""
    from torch.fx.experimental.optimization import fuse

    return fuse(copy.deepcopy(model).eval())


FORMS = {
    "NCHW": (lambda m: m, False),
    "channels_last": (lambda m: m, True),
    "BN folded, channels_last": (folded, True),
}


def latency_table(
    threads: int, repeats: int, amounts: list[float], batches: list[int], round_tos: list[int], layouts: list[str]
) -> None:
    torch.set_num_threads(threads)
    dense = fresh().eval()
    print(f"\n{threads} thread(s); dense and pruned timed in {repeats} alternating turns; median [interquartile range]")
    print(
        "\n| filters removed | round_to | batch | layout | MACs ratio | dense ms | pruned ms | speedup "
        "| speedup / MACs ratio | reference |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for amount, round_to in itertools.product(amounts, round_tos):
        pruned = copy.deepcopy(dense)
        lp.prune(pruned, torch.randn(2, 3, 224, 224), amount, scope="local", round_to=round_to)
        for batch in batches:
            x = torch.randn(batch, 3, 224, 224)
            ratio = lp.count_macs(dense, x) / lp.count_macs(pruned, x)
            for layout in layouts:
                convert, channels_last = FORMS[layout]
                timing = lp.compare_latency(
                    convert(dense), convert(pruned), x, repeats=repeats, threads=threads,
                    min_run_time=repeats * (0.8 if batch > 1 else 0.2), channels_last=channels_last,
                )  # fmt: skip
                d, p = timing.dense, timing.pruned
                speedup = f"{timing.ratio:.2f}x" if timing.resolved else f"{timing.ratio:.2f}x (within noise)"
                print(
                    f"| {amount:.0%} | {round_to} | {batch} | {layout} | {ratio:.2f}x | "
                    f"{d.median * 1e3:.1f} [{d.low * 1e3:.1f}-{d.high * 1e3:.1f}] | "
                    f"{p.median * 1e3:.1f} [{p.low * 1e3:.1f}-{p.high * 1e3:.1f}] | {speedup} "
                    f"| {timing.ratio / ratio:.2f} | {REFERENCE[amount]:.1f}x |",
                    flush=True,
                )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--skip-peer", action="store_true")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--engine-only", action="store_true", help="only the time to prune, not the latency table")
    parser.add_argument("--race", type=int, default=0, help="only the interleaved prune race, this many turns")
    parser.add_argument("--repeats", type=int, default=10, help="alternating turns per latency comparison")
    parser.add_argument("--amounts", type=float, nargs="+", default=[0.3, 0.5])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--round-to", type=int, nargs="+", default=[1], help="round_to values of the latency table")
    parser.add_argument("--layouts", nargs="+", default=list(FORMS), choices=list(FORMS))
    parser.add_argument("--latency-only", action="store_true", help="only the latency table")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.latency_only:
        latency_table(args.threads, args.repeats, args.amounts, args.batches, args.round_to, args.layouts)
        return
    if args.race:
        race(args.race)
        return
    timing_table(args.skip_peer)
    if not args.engine_only:
        latency_table(args.threads, args.repeats, args.amounts, args.batches, args.round_to, args.layouts)


if __name__ == "__main__":
    main()
