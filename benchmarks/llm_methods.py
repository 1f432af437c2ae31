"""One table for every LLM pruning method, on the trained default model (``lightning_prune.default_language_model``).

    python benchmarks/llm_methods.py                        # 20% and 50% of the decoder's parameters
    python benchmarks/llm_methods.py --amounts 0.2 --recovery-tokens 200000 --methods flap llm_pruner_vectorwise
    python benchmarks/llm_methods.py --amounts 0.25 0.5 --methods shortgpt angular drop_deepest laco  # whole layers
    python benchmarks/llm_methods.py --amounts 0.2 0.25 0.3 --methods slicegpt slicegpt_per_layer  # of the stream
    python benchmarks/llm_methods.py --methods sheared llm_pruner_vectorwise_ft  # a learned target shape

For each amount and method, from the same dense model: the parameters left (all, and the decoder's: the
block stack without embeddings and LM head), test perplexity right after the cut, test perplexity after
the same recovery budget for every method (``--recovery-tokens`` of training windows; LoRA r=8 as in
LLM-Pruner, or full fine-tuning where the row says so), greedy generation speed relative to dense (median
of repeats, dense and pruned timed alternately, with the interquartile range), and the time the cut took.

SliceGPT rows slice ``amount`` of the stream's dimensions (not of the decoder's parameters: it also narrows the
embeddings and the LM head, and per-layer bases add shortcut matrices, counted); each is followed by the
``--equal-size`` methods at the share of all parameters that SliceGPT removed, so they compare at the same size.

Sheared-LLaMA rows (``sheared``) learn masks for ``--sheared-steps`` steps of 8 training windows (tokens the other
methods do not see) toward the shape of :func:`sheared_target`, cut to it, and recover with full fine-tuning as the
``_ft`` rows do (the paper's continued pre-training).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
from transformers import AutoModelForCausalLM

import lightning_prune as lp
from lightning_prune.methods.llm_pruner import causal_lm_loss

PAPERS = [
    "LLM-Pruner (Ma et al. 2023): 20% of Llama-7B's parameters removed keeps 94.97% of its zero-shot accuracy (LoRA).",
    "FLAP (An et al. 2024): claims to beat LLM-Pruner without any retraining.",
    "ShortGPT (Men et al. 2024): 25% of the layers removed keeps ~85–92% of the benchmark performance.",
    "LaCo (Yang et al. 2024): > 80% of average task performance at 25–30% of the layers removed; claims to beat "
    "LLM-Pruner and SliceGPT.",
    "Sheared-LLaMA (Xia et al. 2024): Llama-2-7B to 2.7B (0.4B tokens of mask learning, 50B of continued "
    "pre-training) beats same-size models trained from scratch; Llama-7B -> 5.5B: 96% of the original, 1.3x faster.",
    "SliceGPT (Ashkboos et al. 2024): 25% of the parameters of Llama-2-70B / OPT-66B / Phi-2 removed keeps 99% / 99% "
    "/ 90% of zero-shot performance without recovery.",
]
DEPTH = ("shortgpt", "angular", "drop_deepest", "laco")  # whole layers: amount is rounded down to layers
SLICING = ("slicegpt", "slicegpt_per_layer")  # amount: of the stream's dimensions


def decoder_params(model: torch.nn.Module) -> int:
    return lp.count_params(model.get_submodule(lp.find_blocks(model)))


def blockwise(model: torch.nn.Module) -> list[str]:
    """Leave the stream whole (heads and FFN neurons only), as the block-wise methods do."""
    return [name for name, module in model.named_modules() if module is model.get_input_embeddings()]


def sheared_target(model: torch.nn.Module, amount: float) -> dict[str, int]:
    """A shape of ``model``'s family with ``amount`` fewer decoder parameters: the hidden size shrinks by half of
    ``amount`` (rounded up to a multiple of 8 and of the heads), the FFN width takes the rest (20% of the default
    model: 120:309, 50%: 96:213)."""
    config = model.config
    round_to = math.lcm(8, config.num_attention_heads)
    hidden = min(config.hidden_size, -(-round(config.hidden_size * (1 - amount / 2)) // round_to) * round_to)
    goal = (1 - amount) * decoder_params(model)

    def size(ffn: int) -> int:  # the decoder's parameter count is linear in the FFN width at a fixed hidden size
        shaped = copy.deepcopy(config)
        shaped.hidden_size, shaped.intermediate_size = hidden, ffn
        with torch.device("meta"):
            return decoder_params(AutoModelForCausalLM.from_config(shaped))

    per_neuron = size(2) - size(1)
    ffn = round(1 + (goal - size(1)) / per_neuron)
    return {"hidden_size": hidden, "intermediate_size": max(1, min(config.intermediate_size, ffn))}


def cut(
    method: str, calibration: torch.Tensor, activations: torch.Tensor, training: list[torch.Tensor], steps: int
) -> Callable[[Any, float], Any]:
    """``cut(model, fraction_of_all_params)`` for a table row's method; ``activations``: the calibration windows of
    the activation methods (Wanda-sp, FLAP), ``calibration`` those of LLM-Pruner, ``training`` the batches of
    Sheared-LLaMA's ``steps`` mask steps."""
    example = {"input_ids": calibration[:1], "use_cache": False}
    if method == "sheared":
        return lambda model, amount: lp.shear(
            model, sheared_target(model, amount * lp.count_params(model) / decoder_params(model)), training, steps,
            **SHEAR_OPTIONS,
        )  # fmt: skip
    if method in DEPTH:
        return lambda model, amount: depth_cut(method, model, calibration, amount)
    if method in ("random", "l1"):
        return lambda model, amount: lp.prune(
            model, example, amount, method, target="params", scope="local", ignore=blockwise(model)
        )
    if method.startswith("llm_pruner_"):
        variant = method.removeprefix("llm_pruner_").removesuffix("_ft")
        return lambda model, amount: lp.llm_pruner(model, calibration, amount, variant=variant, target="params")
    if method in SLICING:
        return lambda model, amount: lp.slicegpt(model, activations, amount, per_layer=method == "slicegpt_per_layer")
    if method == "wanda_sp":
        return lambda model, amount: lp.wanda_sp(model, activations, amount, target="params")
    compensate = method == "flap"
    return lambda model, amount: lp.flap(model, activations, amount, target="params", compensate=compensate)


def depth_cut(method: str, model: torch.nn.Module, calibration: torch.Tensor, amount: float) -> Any:
    """Remove layers: ``amount`` of all parameters is turned back into a share of the decoder, then into layers
    (rounded down). LaCo merges pairs (one layer into the one below; on 4 layers a wider merge would start the walk
    at layer 0) with the paper's threshold 0.45, and may stop before the target."""
    layers = len(model.get_submodule(lp.find_blocks(model)))
    count = int(amount * lp.count_params(model) / decoder_params(model) * layers + 1e-6)
    if method == "shortgpt":
        batches = [{"input_ids": window[None], "use_cache": False} for window in calibration]
        return lp.prune_layers(model, batches[0], count=count, batches=batches)
    if method == "laco":
        return lp.laco(model, calibration, merge=1, threshold=0.45, target=layers - count)
    return (lp.drop_angular if method == "angular" else lp.drop_deepest)(model, calibration, count)


SHEAR_OPTIONS = {"lr": 1e-4, "gate_lr": 0.02, "multiplier_lr": 0.5}  # see benchmarks/sheared_llama.py
METHODS = [
    "random", "l1", "llm_pruner_vectorwise", "llm_pruner_elementwise", "llm_pruner_second", "llm_pruner_mix",
    "llm_pruner_vectorwise_ft", "wanda_sp", "flap", "flap_no_compensation", *DEPTH, *SLICING, "sheared",
]  # fmt: skip


def speed_ratio(dense: torch.nn.Module, pruned: torch.nn.Module, prompt: torch.Tensor) -> tuple[float, float, float]:
    """Pruned / dense tokens per second: median and quartiles of ratios of alternating runs."""
    ratios = []
    for _ in range(3):
        base = lp.generation_speed(dense, prompt, new_tokens=32, repeats=3)["tokens_per_second"]
        fast = lp.generation_speed(pruned, prompt, new_tokens=32, repeats=3)["tokens_per_second"]
        ratios.append(fast / base)
    values = torch.tensor(ratios)
    return float(values.median()), float(values.min()), float(values.max())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--amounts", type=float, nargs="+", default=[0.2, 0.5], help="of the decoder's parameters")
    parser.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    parser.add_argument("--calibration", type=int, nargs=2, default=[10, 64], help="windows and tokens (LLM-Pruner)")
    parser.add_argument(
        "--activation-calibration", type=int, nargs=2, default=[128, 128],
        help="windows and tokens of Wanda-sp, FLAP and SliceGPT (FLAP's paper: 1024 × 128; its mean needs many tokens)",
    )  # fmt: skip
    parser.add_argument(
        "--equal-size", nargs="*", default=["llm_pruner_vectorwise", "flap"], choices=METHODS,
        help="methods run after each SliceGPT row at the share of all parameters it removed",
    )  # fmt: skip
    parser.add_argument("--sheared-steps", type=int, default=60, help="mask steps of 8 windows (Sheared-LLaMA)")
    parser.add_argument("--speed-batch", type=int, default=16, help="prompts generated side by side when timing")
    parser.add_argument("--recovery-tokens", type=int, default=None, help="default: 5%% of the dense training tokens")
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
    calibration = data.calibration(*args.calibration, seed=0)
    activations = data.calibration(*args.activation_calibration, seed=0)
    dense_tokens = summary["steps"] * summary["batch_size"] * summary["window"]
    budget = args.recovery_tokens or dense_tokens // 20
    windows = data.splits["train"].windows
    recovery = list(windows[: max(1, budget // windows.shape[1])].split(8))
    prompt = test[: args.speed_batch, :16]
    torch.manual_seed(0)
    shear_batches = list(windows[torch.randperm(len(windows))[: args.sheared_steps * 8]].split(8))
    dense_ppl = lp.perplexity(dense, test)
    total, decoder = lp.count_params(dense), decoder_params(dense)
    print(f"dense: {total:,} parameters ({decoder:,} in the decoder blocks), test ppl {dense_ppl:.2f}; trained "
          f"{summary['epochs']} epochs / {summary['seconds']:.0f} s; recovery budget {budget:,} tokens "
          f"({budget / dense_tokens:.1%} of the dense training tokens); calibration {args.calibration[0]} × "
          f"{args.calibration[1]} tokens (LLM-Pruner), {args.activation_calibration[0]} × "
          f"{args.activation_calibration[1]} (Wanda-sp, FLAP); generation speed at batch {args.speed_batch}, "
          f"{args.threads} threads\n")  # fmt: skip
    print(
        "| removed (decoder) | method | params (all) | decoder params | ppl after cut | ppl after recovery "
        "| tokens/s vs dense | time to prune |"
    )
    print("|---|---|---|---|---|---|---|---|")
    tuned = copy.deepcopy(dense)  # what the recovery budget alone does: the dense model is not fully converged
    lp.lora_recover(tuned, recovery, causal_lm_loss, lr=1e-3, epochs=1)
    print(f"| 0% | dense (+ LoRA on the same budget) | {total:,} | {decoder:,} | {dense_ppl:.2f} "
          f"| {lp.perplexity(tuned, test):.2f} | 1.00× | – |")  # fmt: skip

    def row(method: str, removed: str, share: float) -> torch.nn.Module:
        """Cut a copy of the dense model (``share`` of all its parameters, or of SliceGPT's stream), recover, time,
        print a table row; returns the cut model."""
        model = copy.deepcopy(dense)
        start = time.perf_counter()
        cut(method, calibration, activations, shear_batches, args.sheared_steps)(model, share)
        seconds = time.perf_counter() - start
        after_cut = lp.perplexity(model, test)
        full = method.endswith("_ft") or method == "sheared"
        recover = lp.finetune if full else lp.lora_recover
        options = {"lr": 1e-4, "epochs": 1} if full else {"lr": 1e-3, "epochs": 1}
        recover(model, recovery, causal_lm_loss, **options)
        recovered = lp.perplexity(model, test)
        ratio, low, high = speed_ratio(dense, model.eval(), prompt)
        label = method + (" + full FT" if full else " + LoRA")
        if method == "sheared":
            shape = model.config
            label += f" ({shape.hidden_size}:{shape.intermediate_size}, {args.sheared_steps} mask steps)"
        print(
            f"| {removed} | {label} | {lp.count_params(model):,} | {decoder_params(model):,} | {after_cut:.2f} "
            f"| {recovered:.2f} | {ratio:.2f}× ({low:.2f}–{high:.2f}) | {seconds:.1f} s |",
            flush=True,
        )
        return model

    for amount in args.amounts:
        for method in args.methods:
            if method not in SLICING:
                row(method, f"{amount:.0%}", amount * decoder / total)
                continue
            sliced = row(method, f"{amount:.0%} of the stream", amount)
            share = 1 - lp.count_params(sliced) / total  # shortcut matrices included
            for other in args.equal_size:
                row(other, f"{share:.1%} of all, as {method} {amount:.0%}", share)
    print()
    for line in PAPERS:
        print(f"- {line}")


if __name__ == "__main__":
    main()
