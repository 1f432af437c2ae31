"""Sheared-LLaMA on the trained default model (``lightning_prune.default_language_model``): targets with about 20% and
50% fewer decoder parameters, against training the same shape from scratch on the same number of tokens.

    python benchmarks/sheared_llama.py                          # both targets, 100 mask steps of 8 windows
    python benchmarks/sheared_llama.py --mask-steps 200 --targets 96:213

For each target ``hidden_size:intermediate_size``: test perplexity right after the cut (the end of the mask phase),
after full fine-tuning on the recovery budget (5% of the dense model's training tokens, as
``benchmarks/llm_methods.py``), the same shape trained from random weights on mask + recovery tokens, how close the
expected sizes came to the target during the mask phase, and the cost of a masked training step over a plain one.
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
    parser.add_argument("--mask-steps", type=int, default=100, help="optimizer steps of the mask phase")
    parser.add_argument("--batch", type=int, default=8, help="windows per step")
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
        "| target (hidden:FFN) | decoder params | removed (decoder) | ppl after cut | ppl after recovery "
        "| same shape from scratch | closest expected (hidden, FFN) | mask phase |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for text in args.targets:
        hidden, ffn = (int(v) for v in text.split(":"))
        target = {"hidden_size": hidden, "intermediate_size": ffn}
        model = copy.deepcopy(dense)
        start = time.perf_counter()
        result = lp.shear(model, target, mask_batches, args.mask_steps, lr=1e-4, gate_lr=0.1, multiplier_lr=0.1)
        seconds = time.perf_counter() - start
        after_cut = lp.perplexity(model, test)
        lp.finetune(model, recovery, causal_lm_loss, lr=1e-4, epochs=1)
        recovered = lp.perplexity(model, test)
        config = copy.deepcopy(dense.config)
        config.hidden_size, config.intermediate_size = hidden, ffn
        scratch = AutoModelForCausalLM.from_config(config)
        lp.finetune(scratch, mask_batches + recovery, causal_lm_loss, lr=3e-3, epochs=1)
        closest = min(result.history, key=lambda h: abs(h["hidden_size"] - hidden) / hidden + abs(
            h["intermediate_size"] - ffn) / ffn)  # fmt: skip
        print(
            f"| {hidden}:{ffn} | {decoder_params(model):,} | {1 - decoder_params(model) / decoder_params(dense):.1%} "
            f"| {after_cut:.2f} | {recovered:.2f} | {lp.perplexity(scratch, test):.2f} "
            f"| {closest['hidden_size']:.1f}, {closest['intermediate_size']:.1f} (step {closest['step']}) "
            f"| {seconds:.0f} s |",
            flush=True,
        )


if __name__ == "__main__":
    main()
