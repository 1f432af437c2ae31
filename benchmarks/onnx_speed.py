"""The speedup a pruned model keeps in ONNX Runtime, next to the eager one, measured in the same run.

    OMP_NUM_THREADS=1 python benchmarks/onnx_speed.py --threads 1                       # ResNet-50 and a BERT
    OMP_NUM_THREADS=1 python benchmarks/onnx_speed.py --threads 1 --models resnet50 --amount 0.3 0.5

For each model and amount: prune a copy to ``--amount`` of its MACs removed (L1, global ranking), time the eager
dense and pruned models in turns (``compare_latency``: warm-up, ``--repeats`` alternating turns, median and
interquartile range of each), then export both with ``lightning_prune.export_pair`` (each file checked against
the eager model in ONNX Runtime at two batch sizes, then the two sessions timed in turns the same way). The
table gives both speedups with the range their interquartile ranges allow, and the ONNX Runtime speedup over the
eager one (the issue's goal: within 10%). Models: torchvision's ResNet-50 (batch ``--batch`` × 224×224, the
TorchScript exporter) and a small BERT classifier (``BertForSequenceClassification`` from a config, random
weights: 4 layers, hidden 256, 4 heads, FFN 1024; batch ``--batch`` × 128 tokens, the dynamo exporter, which
Hugging Face models need). The machine is shared: the spread is the error bar, and a ratio whose ranges
overlap is marked.
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch

import lightning_prune as lp
from lightning_prune.measure import LatencyComparison, Spread


def resnet50(batch: int) -> tuple[torch.nn.Module, Any, Any, str]:
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet50(weights=None).eval()
    return model, torch.randn(batch, 3, 224, 224), torch.randn(batch + 1, 3, 224, 224), "torchscript"


def bert(batch: int) -> tuple[torch.nn.Module, Any, Any, str]:
    import transformers

    torch.manual_seed(0)
    config = transformers.BertConfig(
        hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024
    )
    model = transformers.BertForSequenceClassification(config).eval()
    ids = torch.randint(0, config.vocab_size, (batch, 128), generator=torch.Generator().manual_seed(0))
    other = torch.randint(0, config.vocab_size, (batch + 1, 128), generator=torch.Generator().manual_seed(1))
    return model, {"input_ids": ids}, {"input_ids": other}, "dynamo"


MODELS = {"resnet50": resnet50, "bert": bert}


def speedup(timing: LatencyComparison) -> str:
    """``ratio [low-high]``: dense over pruned medians, and the range the interquartile ranges allow."""
    low, high = timing.dense.low / timing.pruned.high, timing.dense.high / timing.pruned.low
    noise = "" if timing.resolved else " (ranges overlap)"
    return f"{timing.ratio:.2f}x [{low:.2f}-{high:.2f}]{noise}"


def milliseconds(spread: Spread) -> str:
    return f"{spread.median * 1e3:.1f}"


def run(name: str, amount: float, args: argparse.Namespace) -> str:
    dense, inputs, other, exporter = MODELS[name](args.batch)
    pruned = copy.deepcopy(dense)
    result = lp.prune(pruned, inputs, amount, target="macs")
    eager = lp.compare_latency(dense, pruned, inputs, repeats=args.repeats, min_run_time=args.min_run_time)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder:
        export = lp.export_pair(
            dense, pruned, inputs, Path(folder), exporter=exporter, dynamic_dims={0: "batch"}, check_inputs=[other],
            threads=args.threads, min_run_time=args.min_run_time,
        )  # fmt: skip
    seconds = time.perf_counter() - start
    spreads = [Spread(**export[f"onnx_latency_{k}"]) for k in ("dense", "final")]
    onnx = LatencyComparison(*spreads, export["onnx_threads"])
    error = max(export["dense"]["max_abs_error"], export["final"]["max_abs_error"])
    gap = onnx.ratio / eager.ratio - 1
    print(f"{name} {amount:.0%} of MACs: export + check + ONNX timing {seconds:.0f} s, max |ORT - eager| {error:.1e}")
    return (
        f"| {name} | {1 / result.macs_ratio:.2f}x | {milliseconds(eager.dense)} | {milliseconds(eager.pruned)} | "
        f"{speedup(eager)} | {milliseconds(onnx.dense)} | {milliseconds(onnx.pruned)} | {speedup(onnx)} | "
        f"{gap:+.1%} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=["resnet50", "bert"])
    parser.add_argument("--amount", nargs="+", type=float, default=[0.5])
    parser.add_argument("--repeats", type=int, default=10, help="alternating turns per timing (at least 3)")
    parser.add_argument("--min-run-time", type=float, default=2.0, help="seconds of timing per model")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")  # a pruned BERT's config cannot describe its per-layer widths: said once each
    torch.set_num_threads(args.threads)
    print(f"{args.threads} thread(s), batch {args.batch}, torch {torch.__version__}")
    rows = [run(name, amount, args) for name in args.models for amount in args.amount]
    print(
        "\n| model | MACs ratio | eager dense ms | eager pruned ms | eager speedup [IQR range] | ORT dense ms | "
        "ORT pruned ms | ORT speedup [IQR range] | ORT / eager speedup - 1 |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
