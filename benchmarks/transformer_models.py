"""Transformers on this CPU: head/FFN pruning latency, layer pruning generation speed, accuracy kept.

    python benchmarks/transformer_models.py                 # all three tables (about 10 minutes on 2 cores)
    python benchmarks/transformer_models.py --skip-accuracy

Table 1: a BERT-base-sized encoder (Hugging Face BertModel from a config, random weights, 12 layers,
hidden 768, 12 heads, FFN 3072), batch 8 × 128 tokens, 2 threads: dense vs 40% of the attention heads
removed (global ranking by L1 over head groups only), and vs heads and FFN neurons removed until
MACs ≤ 50%. Reference: "BERT, 40% of attention heads → 1.5× faster".

Table 2: a Llama-style decoder (LlamaForCausalLM from a config: 8 layers, hidden 512, 8 heads / 2 KV
heads, FFN 1376) with 25% of its layers removed by block influence: greedy generation of 32 tokens
after a 32-token prompt, time per generated token with the key/value cache.

Table 3: the digits transformer (``arch="digits_transformer"``: 16 patch tokens, 4 blocks, 4 heads,
hidden 64, FFN 128) trained 60 epochs; 40% of its heads and FFN neurons removed (the residual stream
kept), then fine-tuned 20 epochs; test accuracy kept.
"""

from __future__ import annotations

import argparse
import copy
import time
import warnings

import torch

import lightning_prune as lp
from lightning_prune.importance import get_criterion


def only(kind: str):
    """L1 scores for head groups (``kind="heads"``) or for head and FFN groups (``"heads+ffn"``)."""
    l1 = get_criterion("l1")

    def criterion(group, context):
        tensors = {m.slot.tensor for m in group.members_with_role("out")}
        heads = any(t.endswith(("query.weight", "q_proj.weight")) for t in tensors)
        if group.normalized or (kind == "heads" and not heads):
            return None
        return l1(group, context)

    return criterion


def seconds(function, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def bert_table() -> None:
    import transformers

    torch.manual_seed(0)
    dense = transformers.BertModel(transformers.BertConfig()).eval()
    trace = {"input_ids": torch.randint(0, 30522, (2, 128))}
    batch = {"input_ids": torch.randint(0, 30522, (8, 128))}
    rows = [("dense", dense, 1.0)]
    heads = copy.deepcopy(dense)
    lp.prune(heads, trace, 0.4, only("heads"))
    rows.append(("40% of heads removed", heads, 1.5))
    both = copy.deepcopy(dense)
    lp.prune(both, trace, 0.5, only("heads+ffn"), target="macs")
    rows.append(("heads + FFN to 50% of MACs", both, None))
    base = lp.latency(dense, batch, threads=2, min_run_time=5.0)
    print("| BERT-base encoder, batch 8 x 128 tokens | heads | MACs | latency | speedup | reference |")
    print("|---|---|---|---|---|---|")
    for name, model, reference in rows:
        count = sum(layer.attention.self.query.out_features // 64 for layer in model.encoder.layer)
        macs = lp.count_macs(model, batch)
        time_ = base if model is dense else lp.latency(model, batch, threads=2, min_run_time=5.0)
        ref = f"{reference:.1f}x" if reference and model is not dense else ""
        print(
            f"| {name} | {count} | {macs / 1e9:.1f} G | {time_ * 1e3:.0f} ms | {base / time_:.2f}x | {ref} |",
            flush=True,
        )


def llama_table() -> None:
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=32000, hidden_size=512, intermediate_size=1376, num_hidden_layers=8, num_attention_heads=8,
        num_key_value_heads=2, max_position_embeddings=256,
    )  # fmt: skip
    dense = transformers.LlamaForCausalLM(config).eval()
    pruned = copy.deepcopy(dense)
    prompt = torch.randint(0, 32000, (1, 32))
    result = lp.prune_layers(pruned, {"input_ids": prompt, "use_cache": False}, 0.25)
    print(f"\nremoved blocks {result.removed} of 8 (block influence {[round(s, 4) for s in result.scores]})")
    print("| Llama-style decoder, 32 new tokens | layers | params | ms per token | speedup |")
    print("|---|---|---|---|---|")
    base = None
    for name, model in (("dense", dense), ("25% of layers removed", pruned)):
        with torch.inference_mode():
            per_token = seconds(
                lambda m=model: m.generate(prompt, max_new_tokens=32, min_new_tokens=32, do_sample=False)
            )
        per_token /= 32
        base = base or per_token
        layers, params = model.config.num_hidden_layers, lp.count_params(model)
        print(
            f"| {name} | {layers} | {params / 1e6:.1f} M | {per_token * 1e3:.1f} | {base / per_token:.2f}x |",
            flush=True,
        )


def accuracy_table() -> None:
    import lightning.pytorch as pl

    from lightning_prune.callbacks import StructuredPruning
    from lightning_prune.data import DigitsDataModule
    from lightning_prune.demo import measure
    from lightning_prune.models import ImageClassifier

    def trainer(epochs: int, callbacks: list) -> pl.Trainer:
        return pl.Trainer(
            max_epochs=epochs, logger=False, enable_checkpointing=False, enable_progress_bar=False,
            enable_model_summary=False, callbacks=callbacks,
        )  # fmt: skip

    print("\n| digits transformer | test accuracy | params | MACs/image | latency (360 images) |")
    print("|---|---|---|---|---|")
    for seed in (0, 1, 2):
        pl.seed_everything(seed, verbose=False)
        data = DigitsDataModule(seed=seed)
        model = ImageClassifier(arch="digits_transformer", optimizer="adamw", lr=2e-3, weight_decay=0.05)
        trainer(60, []).fit(model, data)
        data.setup()
        dense = measure(copy.deepcopy(model), data)
        model.hparams.lr = 5e-4
        pruning = StructuredPruning(0.4, only("heads+ffn"), scope="local", log_table=False)
        model.train()
        trainer(21, [pruning]).fit(model, data)
        after = measure(model, data)
        print(
            f"| seed {seed}: dense | {dense['accuracy']:.2%} | {dense['params']:,} | {dense['macs']:,} | "
            f"{dense['latency'] * 1e3:.2f} ms |"
        )
        print(
            f"| seed {seed}: 40% of heads and FFN removed, fine-tuned 20 epochs | {after['accuracy']:.2%} "
            f"({after['accuracy'] / dense['accuracy']:.1%} kept) | {after['params']:,} | {after['macs']:,} | "
            f"{after['latency'] * 1e3:.2f} ms |",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--skip-accuracy", action="store_true")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(2)
    bert_table()
    llama_table()
    if not args.skip_accuracy:
        accuracy_table()


if __name__ == "__main__":
    main()
