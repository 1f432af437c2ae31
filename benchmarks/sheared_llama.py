"""Sheared-LLaMA on the trained default model (``lightning_prune.default_language_model``): targets with about 20% and
50% fewer decoder parameters, against LLM-Pruner at the same decoder size and training the same shape from scratch,
each on the same number of tokens.

    python benchmarks/sheared_llama.py --threads 1              # both targets, 60 mask steps of 8 windows
    python benchmarks/sheared_llama.py --mask-steps 200 --targets 96:213 --every 20
    python benchmarks/sheared_llama.py --masks-only --gate-lr 0.1 --multiplier-lr 0.1  # the mask phase's trajectory

For each target ``hidden_size:intermediate_size``: test perplexity right after the cut (the end of the mask phase),
after full fine-tuning on the recovery budget (5% of the dense model's training tokens, as
``benchmarks/llm_methods.py``); LLM-Pruner (block-wise, vectorwise: heads and FFN neurons, the stream kept, since
its one fraction per group cannot give the hidden and FFN widths different shares) cut to the same decoder
parameter count and fine-tuned on the mask + recovery tokens; the same shape trained from random weights on those
tokens; the expected sizes every ``--every`` steps of the mask phase against the warmed-up target; and the cost of
a masked training step over a plain one.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
import warnings

import torch
from transformers import AutoModelForCausalLM

import lightning_prune as lp
from lightning_prune.methods.llm_pruner import causal_lm_loss
from lightning_prune.methods.sheared import Shearing


def decoder_params(model: torch.nn.Module) -> int:
    return lp.count_params(model.get_submodule(lp.find_blocks(model)))


def step_seconds(model: torch.nn.Module, batch: torch.Tensor, repeats: int = 7) -> tuple[float, float]:
    """Median seconds of one forward + backward without and with the gates' hooks (and the Lagrangian), timed in
    turns so that a busy machine slows both alike."""
    plain, masked = copy.deepcopy(model).train(), copy.deepcopy(model).train()
    shearing = Shearing(masked, {"hidden_size": 96, "intermediate_size": 256})
    shearing.attach()
    times: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(repeats + 1):
        for gated, network in ((False, plain), (True, masked)):
            start = time.perf_counter()
            loss = causal_lm_loss(network, batch) + (shearing.penalty(0) if gated else 0)
            loss.backward()
            times[gated].append(time.perf_counter() - start)
    return tuple(sorted(times[gated][1:])[repeats // 2] for gated in (False, True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--targets", nargs="+", default=["120:308", "96:213"], help="hidden_size:intermediate_size")
    parser.add_argument("--mask-steps", type=int, default=60, help="optimizer steps of the mask phase")
    parser.add_argument("--batch", type=int, default=8, help="windows per step")
    parser.add_argument("--gate-lr", type=float, default=0.05, help="of the gates' log alpha (Adam)")
    parser.add_argument("--multiplier-lr", type=float, default=1.0, help="of the Lagrange multipliers (plain ascent)")
    parser.add_argument("--damping", type=float, default=100.0, help="the quadratic multiplier's initial value")
    parser.add_argument("--every", type=int, default=10, help="steps between the printed expected sizes")
    parser.add_argument("--masks-only", action="store_true", help="only the mask phase and its expected sizes")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    folder = lp.default_language_model()
    summary = json.loads((folder / "training.json").read_text())
    data = lp.CausalLMDataModule(tokenizer=folder, window=summary["window"], batch_size=summary["batch_size"])
    data.setup()
    test, windows = data.splits["test"].windows, data.splits["train"].windows
    dense = AutoModelForCausalLM.from_pretrained(folder).eval()
    dense_tokens = summary["steps"] * summary["batch_size"] * summary["window"]
    budget = dense_tokens // 20
    recovery = list(windows[: max(1, budget // windows.shape[1])].split(args.batch))
    mask_batches = list(windows[torch.randperm(len(windows))[: args.mask_steps * args.batch]].split(args.batch))
    mask_tokens = args.mask_steps * args.batch * windows.shape[1]
    plain, gated = step_seconds(dense, recovery[0])
    print(
        f"dense: {lp.count_params(dense):,} parameters ({decoder_params(dense):,} decoder), test ppl "
        f"{lp.perplexity(dense, test):.2f}; mask phase {args.mask_steps} steps × {args.batch} windows "
        f"({mask_tokens:,} tokens), recovery {budget:,} tokens; a masked training step costs {gated / plain:.2f}× "
        f"a plain one ({gated * 1000:.0f} vs {plain * 1000:.0f} ms, batch {args.batch})\n"
    )
    print(
        ""
        if args.masks_only
        else "| target (hidden:FFN) | decoder params | removed (decoder) | ppl after cut | ppl after recovery "
        "| LLM-Pruner + FT, same decoder params | same shape from scratch | expected at the end (hidden, FFN) "
        "| mask phase |"
    )
    print("" if args.masks_only else "|---|---|---|---|---|---|---|---|---|")
    calibration = data.calibration(10, 64, seed=0)
    trajectories = []
    for text in args.targets:
        hidden, ffn = (int(v) for v in text.split(":"))
        target = {"hidden_size": hidden, "intermediate_size": ffn}
        model = copy.deepcopy(dense)
        start = time.perf_counter()
        result = lp.shear(
            model, target, mask_batches, args.mask_steps, lr=1e-4, gate_lr=args.gate_lr,
            multiplier_lr=args.multiplier_lr, damping=args.damping, log_every=args.every,
        )  # fmt: skip
        seconds = time.perf_counter() - start
        points = [
            f"{h['step']}: {h['hidden_size']:.0f}/{h['intermediate_size']:.0f} "
            f"(target {h['target_hidden_size']:.0f}/{h['target_intermediate_size']:.0f})"
            for h in result.history
        ]
        trajectories.append(f"- {hidden}:{ffn}, expected hidden/FFN at step " + ", ".join(points))
        if args.masks_only:
            continue
        after_cut = lp.perplexity(model, test)
        lp.finetune(model, recovery, causal_lm_loss, lr=1e-4, epochs=1)
        recovered = lp.perplexity(model, test)
        config = copy.deepcopy(dense.config)
        config.hidden_size, config.intermediate_size = hidden, ffn
        scratch = AutoModelForCausalLM.from_config(config)
        lp.finetune(scratch, mask_batches + recovery, causal_lm_loss, lr=3e-3, epochs=1)
        pruner = copy.deepcopy(dense)
        share = (decoder_params(dense) - decoder_params(model)) / lp.count_params(dense)
        lp.llm_pruner(pruner, calibration, share, variant="vectorwise", target="params")
        lp.finetune(pruner, mask_batches + recovery, causal_lm_loss, lr=1e-4, epochs=1)
        last = result.history[-1]
        print(
            f"| {hidden}:{ffn} | {decoder_params(model):,} | {1 - decoder_params(model) / decoder_params(dense):.1%} "
            f"| {after_cut:.2f} | {recovered:.2f} | {lp.perplexity(pruner, test):.2f} ({decoder_params(pruner):,}) "
            f"| {lp.perplexity(scratch, test):.2f} | {last['hidden_size']:.1f}, {last['intermediate_size']:.1f} "
            f"| {seconds:.0f} s |",
            flush=True,
        )
    print("\nexpected sizes during the mask phase (the target warms up linearly over half the steps):")
    print("\n".join(trajectories))


if __name__ == "__main__":
    main()
