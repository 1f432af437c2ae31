"""Where the taylor/fisher hooks spend their time: cProfile of the statistics code over digits-CNN steps.

    OMP_NUM_THREADS=1 python benchmarks/statistics_profile.py --steps 96

Runs forward and backward of the digits CNN (batch 64, 8×8, one thread) with ``GradientStatistics`` attached,
after 16 warm-up steps, and prints the cumulative seconds of each function of ``lightning_prune/statistics.py``
(the per-gradient product and reduction, the forward hook, the fold into the accumulators). Run it with
``PYTHONPATH`` at two checkouts to compare them under the same load.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats

import torch
import torch.nn.functional as F

import lightning_prune as lp
from lightning_prune.models import ImageClassifier
from lightning_prune.statistics import GradientStatistics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=96)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model, x = ImageClassifier().net, torch.randn(64, 1, 8, 8)
    y = torch.randint(0, 10, (64,))
    collector = GradientStatistics(model, lp.build_graph(model, x[:2])).attach()

    def step() -> None:
        F.cross_entropy(model(x), y).backward()

    for _ in range(16):
        step()
    profile = cProfile.Profile()
    profile.enable()
    for _ in range(args.steps):
        step()
    collector.detach()
    profile.disable()
    out = io.StringIO()
    pstats.Stats(profile, stream=out).sort_stats("cumulative").print_stats("statistics.py")
    print(f"{args.steps} steps; ncalls tottime percall cumtime percall")
    print("\n".join(line for line in out.getvalue().splitlines() if "statistics.py:" in line))


if __name__ == "__main__":
    main()
