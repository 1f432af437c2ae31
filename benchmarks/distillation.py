"""Recovery by distillation vs plain fine-tuning, at the same token budget, inside a Lightning run (``Distillation``).

    python benchmarks/distillation.py                          # both parts, one thread
    python benchmarks/distillation.py --part lm --recovery-tokens 200000
    python benchmarks/distillation.py --part digits --seeds 0 1 2

Language model (the trained default model, ``lightning_prune.default_language_model``): 50% of the decoder's
parameters removed by the strongest width method (FLAP) and by the better of the two depth methods ShortGPT and
drop_deepest (lower perplexity right after the cut; cuts from ``benchmarks/llm_methods.py``). Each cut model is then
fine-tuned in a ``Trainer`` on the same training windows in the same order, with the same optimizer and schedule,
by the LM loss alone (CE) or by ``(1 − α)·CE + α·distill`` with the dense model as teacher: forward KL, reverse KL,
MiniLLM. Reported: test perplexity, teacher-student agreement on greedy continuations of test prompts (the share of
generated tokens the teacher would have chosen too), and CPU seconds per training step relative to CE.

Digits CNN (the demo's recipe: Network Slimming, four bn_scale steps at epochs 15-18 down to 40% of the MACs, 40
epochs): test accuracy after recovery by CE vs forward-KL distillation from the snapshot before the first cut.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from transformers import AutoModelForCausalLM

import lightning_prune as lp
from lightning_prune.callbacks import Distillation, NetworkSlimming
from lightning_prune.demo import accuracy as test_accuracy
from lightning_prune.methods.minillm import agreement

sys.path.insert(0, str(Path(__file__).resolve().parent))
from llm_methods import cut, decoder_params

# (loss, alpha): None is --alpha; forward KL also alone (alpha 1: Minitron's logit-only distillation)
RECOVERIES = (("ce", 0.0), ("forward_kl", None), ("forward_kl", 1.0), ("reverse_kl", None), ("minillm", None))


class StepTimer(Callback):
    """CPU seconds of this process per training step (batch start to batch end, the optimizer step included): with
    one thread, steadier than wall-clock time on a machine shared with other jobs."""

    def __init__(self) -> None:
        self.seconds: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.start = time.process_time()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.seconds.append(time.process_time() - self.start)


def quiet_trainer(callbacks: list[Callback], **options) -> pl.Trainer:
    return pl.Trainer(
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=callbacks, num_sanity_val_steps=0, **options,
    )  # fmt: skip


def recover(
    model, dense, windows: torch.Tensor, loss: str, alpha: float, args: argparse.Namespace
) -> tuple[lp.CausalLM, float]:
    """Fine-tune ``model`` (a cut Hugging Face model) on ``windows`` by ``loss``; return the module and s/step."""
    pl.seed_everything(0, verbose=False)
    module = lp.CausalLM(pretrained=str(lp.default_language_model()), lr=args.lr, weight_decay=0.0, warmup_steps=5,
                         sample_tokens=0)  # fmt: skip
    module.model = model  # the cut model in the module the recipe trains
    timer = StepTimer()
    callbacks: list[Callback] = [timer]
    if loss != "ce":
        teacher = copy.deepcopy(dense)
        callbacks.insert(0, Distillation(loss, alpha=alpha, teacher=teacher, prompt_tokens=16, new_tokens=16))
    loader = torch.utils.data.DataLoader([{"input_ids": w} for w in windows], batch_size=args.batch_size)
    quiet_trainer(callbacks, max_epochs=1, accelerator="cpu", gradient_clip_val=1.0).fit(module, loader)
    return module, float(torch.tensor(timer.seconds[2:] or timer.seconds).median())


def language_model_part(args: argparse.Namespace) -> list[str]:
    folder = lp.default_language_model()
    summary = json.loads((folder / "training.json").read_text())
    data = lp.CausalLMDataModule(tokenizer=folder, window=summary["window"], batch_size=summary["batch_size"])
    data.setup()
    test, train = data.splits["test"].windows, data.splits["train"].windows
    dense = AutoModelForCausalLM.from_pretrained(folder).eval()
    calibration, activations = data.calibration(10, 64, seed=0), data.calibration(128, 128, seed=0)
    dense_tokens = summary["steps"] * summary["batch_size"] * summary["window"]
    budget = args.recovery_tokens or dense_tokens // 20
    windows = train[torch.randperm(len(train), generator=torch.Generator().manual_seed(0))][
        : max(1, budget // train.shape[1])
    ]
    prompts = test[: args.prompts, :16]
    total, decoder = lp.count_params(dense), decoder_params(dense)
    lines = [
        f"dense: {total:,} parameters, test ppl {lp.perplexity(dense, test):.2f}; recovery: {len(windows)} windows "
        f"× {train.shape[1]} = {windows.numel():,} tokens ({windows.numel() / dense_tokens:.1%} of the dense "
        f"training tokens), batch {args.batch_size}, AdamW lr {args.lr}, T = 1; MiniLLM: 16-token "
        f"prompts, 16 sampled tokens, mix 0.2; agreement on {len(prompts)} test prompts × 16 greedy tokens; "
        f"{args.threads} thread(s)",
        "",
        "| 50% of the decoder removed | recovery | params | test ppl after cut | test ppl after recovery "
        "| agreement with teacher | CPU s/step (vs CE) |",
        "|---|---|---|---|---|---|---|",
    ]
    print("\n".join(lines), flush=True)
    depth = {}
    for method in ("shortgpt", "drop_deepest"):
        model = copy.deepcopy(dense)
        cut(method, calibration, activations)(model, 0.5 * decoder / total)
        depth[method] = (lp.perplexity(model, test), model)
    strongest_depth = min(depth, key=lambda m: depth[m][0])
    flap = copy.deepcopy(dense)
    cut("flap", calibration, activations)(flap, 0.5 * decoder / total)
    for method, pruned in (("flap", flap), (strongest_depth, depth[strongest_depth][1])):
        after_cut = lp.perplexity(pruned, test)
        base = None
        for loss, alpha in RECOVERIES:
            alpha = args.alpha if alpha is None else alpha
            module, seconds = recover(copy.deepcopy(pruned), dense, windows, loss, alpha, args)
            student = module.model.eval()
            base = base or seconds
            agreed = agreement(student, dense, prompts, 16)
            label = "CE (fine-tuning)" if loss == "ce" else f"{loss}, α = {alpha}"
            line = (
                f"| {method} | {label} | {lp.count_params(student):,} "
                f"| {after_cut:.2f} | {lp.perplexity(student, test):.2f} | {agreed:.1%} "
                f"| {seconds:.3f} ({seconds / base:.2f}×) |"
            )
            print(line, flush=True)
            lines.append(line)
    other = next(m for m in depth if m != strongest_depth)
    chosen, rejected = depth[strongest_depth][0], depth[other][0]
    note = f"\n{strongest_depth} chosen over {other}: ppl after cut {chosen:.2f} vs {rejected:.2f}"
    print(note, flush=True)
    return [*lines, note]


def digits_run(seed: int, distill: bool, epochs: int, args: argparse.Namespace) -> tuple[float, float | None]:
    """Test accuracy of the final model and, when distilling, of the teacher (the snapshot before the first cut)."""
    pl.seed_everything(seed, verbose=False)
    data = lp.DigitsDataModule(seed=seed)
    model = lp.ImageClassifier()
    pruning = lp.StructuredPruning(0.6, "bn_scale", schedule="linear", start_epoch=15, end_epoch=18, target="macs",
                                   log_table=False)  # fmt: skip
    callbacks: list[Callback] = [NetworkSlimming(1e-3, stop_epoch=19), pruning]
    distillation = Distillation("forward_kl", alpha=args.alpha, temperature=args.digits_temperature)
    if distill:
        callbacks.insert(1, distillation)
    trainer = quiet_trainer(callbacks, max_epochs=epochs, accelerator="cpu")
    trainer.fit(model, data)
    accuracy = float(trainer.test(model, data, verbose=False)[0]["test/acc"])
    return accuracy, test_accuracy(distillation.teacher, data) if distill else None


def digits_part(args: argparse.Namespace) -> list[str]:
    lines = [
        "",
        f"Digits CNN, demo recipe (Network Slimming, 60% of MACs removed at epochs 15-18); KD: forward KL, α = "
        f"{args.alpha}, T = {args.digits_temperature}, teacher = the snapshot before the first cut; seeds {args.seeds}",
        "",
        "| epochs (recovery epochs after the last cut) | recovery | test accuracy per seed | mean | teacher's |",
        "|---|---|---|---|---|",
    ]
    print("\n".join(lines), flush=True)
    for epochs in args.digits_epochs:
        for name in ("ce", "forward_kl"):
            runs = [digits_run(seed, name != "ce", epochs, args) for seed in args.seeds]
            values = [accuracy for accuracy, _ in runs]
            teachers = [teacher for _, teacher in runs if teacher is not None]
            label = "CE (fine-tuning)" if name == "ce" else "forward KL distillation"
            shown = ", ".join(f"{v:.2%}" for v in values)
            teacher = f"{sum(teachers) / len(teachers):.2%}" if teachers else "–"
            line = f"| {epochs} ({epochs - 19}) | {label} | {shown} | {sum(values) / len(values):.2%} | {teacher} |"
            print(line, flush=True)
            lines.append(line)
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=["lm", "digits", "both"], default="both")
    parser.add_argument("--recovery-tokens", type=int, default=None, help="default: 5%% of the dense training tokens")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--digits-temperature", type=float, default=4.0)
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--digits-epochs", type=int, nargs="+", default=[40, 21], help="40: the demo's recipe")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    if args.part in ("lm", "both"):
        language_model_part(args)
    if args.part in ("digits", "both"):
        digits_part(args)


if __name__ == "__main__":
    main()
