"""``target="latency"`` on this machine: asked vs measured latency, and what ``target="macs"`` keeps at the same time.

    OMP_NUM_THREADS=1 python benchmarks/latency_target.py --threads 1                 # ResNet-50, 0.5 and 0.7
    OMP_NUM_THREADS=1 python benchmarks/latency_target.py --threads 1 --models resnet50 mobilenet_v3_large vit_b_16
    OMP_NUM_THREADS=1 python benchmarks/latency_target.py --threads 1 --repeats 4 --min-run-time 0.5   # quick
    OMP_NUM_THREADS=1 python benchmarks/latency_target.py --threads 1 --channels-last --round-to auto

For each model and asked latency ratio (pruned / dense seconds per forward, batch ``--batch``): prune with
``target="latency"`` (L1) and report the ratio its accepted copy measured, the tries of the search, and a fresh
re-measurement of dense against pruned (median and interquartile range of each, ``compare_latency``); then
search the ``target="macs"`` amount whose pruned model measures the same ratio (the same search loop, timing
each copy the same way) and compare the parameters and MACs each keeps. ``--repeats`` and ``--min-run-time``
set every whole-model timing (the search's and the re-measurement's). All timings share the machine with
whatever else runs: the spread printed is the honest error bar. A markdown table of every run closes the output.
``--channels-last`` converts models and inputs to channels-last first (the layout pruning keeps, and the one the
per-layer table and every timing then see); ``--round-to`` (a number or ``auto``) applies to both targets.
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
import torchvision

import lightning_prune as lp
from lightning_prune.latency import LatencySettings, search_latency

LAYOUT = {"memory_format": torch.contiguous_format}  # set by --channels-last


def fresh(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return getattr(torchvision.models, name)(weights=None).eval().to(**LAYOUT)


def spread(timing: lp.measure.LatencyComparison) -> str:
    d, p = timing.dense, timing.pruned
    return (
        f"dense {d.median * 1e3:.1f} ms [{d.low * 1e3:.1f}, {d.high * 1e3:.1f}], pruned {p.median * 1e3:.1f} ms "
        f"[{p.low * 1e3:.1f}, {p.high * 1e3:.1f}], ratio {1 / timing.ratio:.3f}"
        + ("" if timing.resolved else " (not resolved: ranges overlap)")
    )


def run(name: str, asked: float, x: torch.Tensor, settings: LatencySettings, round_to: int | str) -> str:
    dense = fresh(name)
    model = copy.deepcopy(dense)
    start = time.perf_counter()
    result = lp.prune(model, x, round(1 - asked, 6), target="latency", latency=settings, round_to=round_to)
    seconds = time.perf_counter() - start
    outcome = result.latency
    tries = ", ".join(f"{keep:.3f}->{ratio:.3f}" for keep, ratio in outcome.tries)
    print(f"\n{name} asked {asked:.2f}: measured {outcome.measured:.3f} by the search ({tries}), {seconds:.0f} s")
    print(f"  search's timing: {spread(outcome.timing)}")
    again = settings.compare(dense, model, x)
    print(f"  re-measured:     {spread(again)}")
    print(f"  target=latency keeps params {result.params_ratio:.1%}, MACs {result.macs_ratio:.1%}")

    def attempt(keep: float) -> tuple[torch.nn.Module, lp.PruningResult]:
        copy_ = copy.deepcopy(dense)
        return copy_, lp.prune(copy_, x, round(1 - keep, 6), target="macs", round_to=round_to)

    def measure(tried: tuple[torch.nn.Module, lp.PruningResult]) -> float:
        return 1 / settings.compare(dense, tried[0], x).ratio

    try:
        (_, macs), ratio, history = search_latency(attempt, measure, outcome.measured, rounds=settings.rounds)
    except lp.PruningError as error:  # target=macs did not reach the latency target=latency measured
        print(f"  target=macs at the same measured latency: {error}")
        same = f"not reached in {settings.rounds} tries | | "
    else:
        tries = ", ".join(f"{keep:.3f}->{r:.3f}" for keep, r in history)
        print(
            f"  target=macs at the same measured latency ({ratio:.3f}; tries MACs kept->ratio {tries}) keeps "
            f"params {macs.params_ratio:.1%}, MACs {macs.macs_ratio:.1%}"
        )
        same = f"{ratio:.3f} | {macs.params_ratio:.1%} | {macs.macs_ratio:.1%}"
    low, high = again.pruned.low / again.dense.high, again.pruned.high / again.dense.low
    return (
        f"| {name} | {asked:.2f} | {outcome.measured:.3f} ({len(outcome.tries)}) | {1 / again.ratio:.3f} "
        f"[{low:.2f}-{high:.2f}] | {result.params_ratio:.1%} | {result.macs_ratio:.1%} | {same} | {seconds:.0f} s |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--models", nargs="+", default=["resnet50"])
    parser.add_argument("--targets", nargs="+", type=float, default=[0.5, 0.7])
    parser.add_argument("--repeats", type=int, default=10, help="alternating turns per whole-model timing")
    parser.add_argument("--min-run-time", type=float, default=1.0, help="seconds per model of each timing")
    parser.add_argument("--rounds", type=int, default=5, help="pruned copies each search may time")
    parser.add_argument("--channels-last", action="store_true", help="models and inputs channels-last")
    parser.add_argument("--round-to", default="1", help="a positive number, or auto")
    args = parser.parse_args()
    round_to = args.round_to if args.round_to == "auto" else int(args.round_to)
    if args.channels_last:
        LAYOUT["memory_format"] = torch.channels_last
    torch.set_num_threads(args.threads)
    settings = LatencySettings(repeats=args.repeats, min_run_time=args.min_run_time, rounds=args.rounds)
    x = torch.randn(args.batch, 3, args.size, args.size).contiguous(**LAYOUT)
    print(
        f"{args.threads} thread(s), batch {args.batch}, {args.size}x{args.size}, torch {torch.__version__}, "
        f"{'channels-last' if args.channels_last else 'NCHW'}, round_to {round_to}"
    )
    rows = []
    for name in args.models:
        for asked in args.targets:
            try:
                rows.append(run(name, asked, x, settings, round_to))
            except lp.PruningError as error:  # the search tells what it tried
                print(f"\n{name} asked {asked:.2f}: {error}")
                rows.append(f"| {name} | {asked:.2f} | not reached: {str(error)[:160]} |")
    print(
        "\n| model | asked ratio | measured by the search (tries) | re-measured [IQR range] | params kept | "
        "MACs kept | target=macs: measured ratio | params kept | MACs kept | search time |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
