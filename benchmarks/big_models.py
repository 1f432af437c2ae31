"""Big models on this CPU: time and peak memory of trace + prune, next to Torch-Pruning on resnet152.

    python benchmarks/big_models.py                  # every case, 3 runs each (about 5 minutes on 2 idle cores)
    python benchmarks/big_models.py --repeats 1 --layers 16 --skip-peer

Cases (random weights, fp32, CPU, 2 threads):

- a Llama-style decoder: ``transformers.LlamaForCausalLM`` from a ``LlamaConfig`` with hidden 2048, FFN
  5632, 22 layers, 32 heads / 8 key-value heads of 64 and a vocabulary of 32000 (TinyLlama-1.1B's shape
  with 8 key-value heads instead of 4): 1,123,117,056 parameters, 4.18 GiB. ``lp.prune`` on one sequence
  of 8 tokens, ``amount=0.25, scope="local"``, L1 scores for head and FFN groups only (the residual
  stream keeps its width): every layer loses 25% of its FFN neurons (5632 -> 4224) and 2 of its 8
  key-value heads with their 8 query heads (32 -> 24).
- torchvision ``resnet152(weights=None)``, 60,192,808 parameters, on a batch of 2 × 3 × 224 × 224:
  ``lp.prune(..., 0.25, scope="local", ignore=["fc"])`` (L1) removes 25% of every group's channels; next
  to Torch-Pruning 1.6.1: ``MetaPruner`` (which builds the ``DependencyGraph``) with
  ``MagnitudeImportance(p=1)``, ``pruning_ratio=0.25``, ``ignored_layers=[fc]``, then ``step()``.

lightning-prune runs with its defaults (traced in training and eval mode, then verified by a re-trace
while the surgery can still be undone), with ``verify=False``, and, on resnet152, also traced in eval
mode only: then, like Torch-Pruning, it runs the model once.

Memory: every run is a fresh Python process. Once the model is built, the process's peak resident set
is reset (``5`` written to ``/proc/self/clear_refs``, Linux), its RSS read ("before"), the pruning call
made, and the peak RSS (``VmHWM``) read. *Peak extra* = peak − before: everything pruning needs on top
of the model and the loaded libraries, also given as a multiple of the model's own size (its parameter
and buffer bytes before pruning). The goal of issue 7, read this way: peak extra ≤ 1.5× the model's
size, so no full copy of the model may ever exist. Time: wall seconds of the call (trace, scoring,
surgery, verification; model construction excluded) and CPU seconds of the process in it (user +
system, both threads) of the fastest of ``--repeats`` runs (the cases take turns), since on a shared
machine other load only ever adds time (here up to 10x); peak extra is the largest of the runs.
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from typing import Any

GOAL = 1.5


def _status(field: str) -> int:
    """A ``/proc/self/status`` field, in bytes."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _llama(layers: int, verify: bool) -> tuple[Any, Callable[[], Any]]:
    import torch
    import transformers

    import lightning_prune as lp
    from lightning_prune.importance import get_criterion

    config = transformers.LlamaConfig(
        vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=layers,
        num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=2048,
    )  # fmt: skip
    with torch.no_grad():
        model = transformers.LlamaForCausalLM(config).eval()
    inputs = {"input_ids": torch.randint(0, 32000, (1, 8)), "use_cache": False}
    l1 = get_criterion("l1")

    def heads_and_ffn(group, context):
        return None if group.normalized else l1(group, context)  # the residual stream is the normalized group

    return model, lambda: lp.prune(model, inputs, 0.25, heads_and_ffn, scope="local", verify=verify)


def _resnet152(peer: bool, **options: Any) -> tuple[Any, Callable[[], Any]]:
    import torch
    import torchvision

    import lightning_prune as lp

    model = torchvision.models.resnet152(weights=None).eval()
    inputs = torch.randn(2, 3, 224, 224)
    if not peer:
        return model, lambda: lp.prune(model, inputs, 0.25, scope="local", ignore=["fc"], **options)

    import torch_pruning as tp

    def prune() -> None:
        importance = tp.importance.MagnitudeImportance(p=1)
        tp.pruner.MetaPruner(model, inputs, importance, pruning_ratio=0.25, ignored_layers=[model.fc]).step()

    return model, prune


CASES: dict[str, tuple[str, Callable[[int], tuple[Any, Callable[[], Any]]]]] = {
    "llama": ("Llama-style decoder, lightning-prune (verified)", lambda layers: _llama(layers, True)),
    "llama-unverified": ("Llama-style decoder, lightning-prune, verify=False", lambda layers: _llama(layers, False)),
    "resnet152": ("resnet152, lightning-prune (verified)", lambda _: _resnet152(False)),
    "resnet152-unverified": ("resnet152, lightning-prune, verify=False", lambda _: _resnet152(False, verify=False)),
    "resnet152-eval": (
        'resnet152, lightning-prune, verify=False, modes=("eval",)',
        lambda _: _resnet152(False, verify=False, modes=("eval",)),
    ),
    "resnet152-peer": ("resnet152, Torch-Pruning 1.6.1", lambda _: _resnet152(True)),
}


def run_case(case: str, layers: int, threads: int) -> dict:
    """Build the case's model, then prune it once and measure; runs inside the child process."""
    import torch

    warnings.filterwarnings("ignore")
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model, prune = CASES[case][1](layers)
    size = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    params_before = sum(p.numel() for p in model.parameters())
    gc.collect()
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")  # the peak resident set now starts from the current one
    before, cpu = _status("VmRSS"), _cpu_seconds()
    start = time.perf_counter()
    prune()
    seconds = time.perf_counter() - start
    return {
        "seconds": seconds,
        "cpu": _cpu_seconds() - cpu,
        "peak_extra": _status("VmHWM") - before,
        "before": before,
        "size": size,
        "params_before": params_before,
        "params_after": sum(p.numel() for p in model.parameters()),
    }


def run_once(case: str, args: argparse.Namespace) -> dict:
    command = [sys.executable, __file__, "--case", case, "--layers", str(args.layers), "--threads", str(args.threads)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode:
        raise RuntimeError(f"case {case} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=22, help="decoder layers (22: 1.12B parameters)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-peer", action="store_true")
    parser.add_argument("--case", choices=sorted(CASES), help=argparse.SUPPRESS)  # one run, in a child process
    args = parser.parse_args()
    if args.case:
        print(json.dumps(run_case(args.case, args.layers, args.threads)))
        return
    cases = [case for case in CASES if not (args.skip_peer and case.endswith("-peer"))]
    runs: dict[str, list[dict]] = {case: [] for case in cases}
    for _ in range(args.repeats):  # interleaved, so that a busy spell of the machine does not hit one case only
        for case in cases:
            runs[case].append(run_once(case, args))
    gib = 2**30
    print(
        f"| fp32, CPU, {args.threads} threads | params before -> after | model size | RSS before | "
        f"time (fastest of {args.repeats}) | CPU time | peak extra (largest) | peak extra / model size "
        f"(goal <= {GOAL}x) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for case in cases:
        label = CASES[case][0]
        if case.startswith("llama") and args.layers != 22:
            label = label.replace("decoder", f"decoder with {args.layers} layers")
        fastest = min(runs[case], key=lambda run: run["seconds"])
        peak = max(run["peak_extra"] for run in runs[case])
        ratio = peak / fastest["size"]
        print(
            f"| {label} | {fastest['params_before']:,} -> {fastest['params_after']:,} | {fastest['size'] / gib:.2f} "
            f"GiB | {fastest['before'] / gib:.2f} GiB | {fastest['seconds']:.1f} s | {fastest['cpu']:.1f} s | "
            f"{peak / gib:.2f} GiB | {ratio:.2f}x {'(met)' if ratio <= GOAL else '(missed)'} |"
        )


if __name__ == "__main__":
    main()
