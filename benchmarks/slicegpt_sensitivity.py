"""Why SliceGPT loses what it loses on the trained default model: calibration size, damping, float precision.

    python benchmarks/slicegpt_sensitivity.py --threads 1          # 25% of the stream, one basis, no recovery

Each line slices a copy of the dense model and prints its test perplexity and the share of the calibration
signal (``XᵀX`` of the per-token normalised stream) that the kept directions hold.
"""

from __future__ import annotations

import argparse
import copy
import json
import warnings

import torch
from transformers import AutoModelForCausalLM

import lightning_prune as lp


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--amount", type=float, default=0.25, help="of the stream's dimensions")
    parser.add_argument("--windows", type=int, nargs="+", default=[32, 128, 512], help="calibration windows")
    parser.add_argument("--dampings", type=float, nargs="+", default=[0.0, 0.01, 0.1])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    folder = lp.default_language_model()
    summary = json.loads((folder / "training.json").read_text())
    data = lp.CausalLMDataModule(tokenizer=folder, window=summary["window"], batch_size=summary["batch_size"])
    data.setup()
    test = data.splits["test"].windows
    dense = AutoModelForCausalLM.from_pretrained(folder).eval()
    print(f"dense test ppl {lp.perplexity(dense, test):.2f}; {args.amount:.0%} of the stream sliced, one basis")
    runs = [(count, 0.01, torch.float32) for count in args.windows]
    runs += [(128, damping, torch.float32) for damping in args.dampings if damping != 0.01]
    runs.append((128, 0.01, torch.float64))
    for count, damping, dtype in runs:
        model = copy.deepcopy(dense).to(dtype)
        calibration = data.calibration(count, summary["window"], seed=0)
        result = lp.slicegpt(model, calibration, args.amount, damping=damping)
        print(
            f"calibration {count} × {summary['window']}, damping {damping}, {str(dtype).removeprefix('torch.')}: "
            f"ppl {lp.perplexity(model, test):.2f}, kept share {result.kept_variance:.4f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
