"""What the taylor/fisher statistics hooks cost per training step, counted in CPU instructions (callgrind).

    python benchmarks/hook_instructions.py                 # digits CNN and ResNet-18, 4 steps each way
    python benchmarks/hook_instructions.py --steps 8 --models digits

Wall-clock overheads of a few percent drown in this shared machine's noise (paired turns of
``benchmarks/criteria.py`` spread by ±5%). Instruction counts do not depend on what else runs: the script
re-runs itself under ``valgrind --tool=callgrind`` with instrumentation off, switches it on only around the
training steps (a small C library built here with gcc calls callgrind's client requests), and dumps the
counters after each block of steps of one model, alternating plain and hooked blocks on the same model.
Instructions are not time (memory stalls are not counted), but they are the hooks' work exactly: the
overhead printed is hooked / plain instructions per step minus 1. Needs valgrind (with its headers) and gcc.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

TOGGLE_C = """#include <valgrind/callgrind.h>
void start(void) { CALLGRIND_START_INSTRUMENTATION; CALLGRIND_ZERO_STATS; }
void dump(const char *name) { CALLGRIND_DUMP_STATS_AT(name); }
"""
UNDER = "LIGHTNING_PRUNE_CALLGRIND_LIB"


def run_steps(args: argparse.Namespace) -> None:
    """Inside valgrind: plain and hooked blocks of steps, each followed by a dump named after it."""
    import torch
    import torchvision
    from criteria import stepper  # this folder's: the step benchmarks/criteria.py times

    import lightning_prune as lp
    from lightning_prune.models import ImageClassifier
    from lightning_prune.statistics import GradientStatistics

    torch.set_num_threads(1)
    library = ctypes.CDLL(os.environ[UNDER])
    cases = {
        "digits": (lambda: ImageClassifier().net, (64, 1, 8, 8)),
        "resnet18": (lambda: torchvision.models.resnet18(num_classes=10), (64, 3, 32, 32)),
    }
    for name in args.models:
        torch.manual_seed(0)
        make, shape = cases[name]
        model, x = make(), torch.randn(shape)
        y = torch.randint(0, 10, (shape[0],))
        step = stepper(model, x, y)
        collector = GradientStatistics(model, lp.build_graph(model, x[:2]))
        for hooked in (False, True):  # warm-up, not counted
            if hooked:
                collector.attach()
            step()
            if hooked:
                collector.detach()
        library.start()
        for block in range(args.blocks):
            for hooked in (False, True) if block % 2 == 0 else (True, False):
                if hooked:
                    collector.attach()
                for _ in range(args.steps):
                    step()
                if hooked:
                    collector.detach()
                library.dump(f"{name} {'hooked' if hooked else 'plain'} {block}".encode())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["digits", "resnet18"], choices=["digits", "resnet18"])
    parser.add_argument("--steps", type=int, default=4, help="training steps per counted block")
    parser.add_argument("--blocks", type=int, default=2, help="plain/hooked pairs per model, in alternating order")
    args = parser.parse_args()
    if UNDER in os.environ:
        run_steps(args)
        return
    missing = [tool for tool in ("valgrind", "gcc") if shutil.which(tool) is None]
    if missing:
        sys.exit(f"needs {' and '.join(missing)} (Debian: apt install valgrind gcc)")
    with tempfile.TemporaryDirectory() as folder:
        source, library = Path(folder) / "toggle.c", Path(folder) / "libtoggle.so"
        source.write_text(TOGGLE_C)
        subprocess.run(["gcc", "-shared", "-fPIC", "-O1", "-o", str(library), str(source)], check=True)
        out = Path(folder) / "callgrind.out"
        command = ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}"]
        environment = {**os.environ, UNDER: str(library), "OMP_NUM_THREADS": "1"}
        done = subprocess.run(
            [*command, sys.executable, __file__, *sys.argv[1:]], env=environment, capture_output=True, text=True
        )
        if done.returncode:
            sys.exit(f"valgrind failed:\n{done.stderr[-3000:]}")
        counts: dict[tuple[str, str], list[int]] = {}
        for dump in Path(folder).glob("callgrind.out*"):
            text = dump.read_text(errors="replace")
            trigger = re.search(r"^desc: Trigger: Client Request: (\S+) (\S+) \d+$", text, re.M)
            total = re.search(r"^(?:totals|summary): (\d+)", text, re.M)
            if trigger and total:
                counts.setdefault((trigger[1], trigger[2]), []).append(int(total[1]) // args.steps)
    print(f"instructions per training step (callgrind, 1 thread, {args.blocks} blocks of {args.steps} steps each)")
    print("| model | plain | with taylor+fisher hooks | overhead |")
    print("|---|---|---|---|")
    for name in args.models:
        plain, hooked = min(counts[(name, "plain")]), min(counts[(name, "hooked")])
        print(f"| {name} | {plain / 1e6:,.1f} M | {hooked / 1e6:,.1f} M | {hooked / plain - 1:+.2%} |")


if __name__ == "__main__":
    main()
