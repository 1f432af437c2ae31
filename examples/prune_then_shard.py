"""Prune a causal LM once on every rank, then recover it sharded with FSDP2, distilling from the dense model.

Shows: ``lp.PruneBeforeSharding`` (LLM-Pruner's vector-wise Taylor importance on the data module's first
calibration batches, in ``setup``, identically on every rank, before the strategy wraps anything), Lightning's
``ModelParallelStrategy`` (FSDP2: ``CausalLM`` shards each decoder layer with ``fully_shard``), ``lp.Distillation``
(the whole dense model kept on every rank as the teacher, taken before the cut), bf16 weights
(``precision="bf16-true"``) and gradient checkpointing, then the full weights gathered to rank 0
(``lightning_prune.saving.gathered``) and saved as a stock folder that ``AutoModelForCausalLM`` reloads.

Two processes on this machine's CPU (gloo) by default; ``--gpus N`` runs on N GPUs (nccl). The memory each rank
needs is printed first (``lp.memory_plan`` of the dense and the pruned model under FSDP).

    python examples/prune_then_shard.py --tiny                      # a tiny untrained Llama: about a minute
    python examples/prune_then_shard.py --pretrained my-model/ --files notes.txt --gpus 4 --out pruned/
"""

from __future__ import annotations

import argparse

import lightning.pytorch as pl
import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from transformers import AutoModelForCausalLM

import lightning_prune as lp
from lightning_prune.saving import gathered

TINY = {
    "model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128, "tie_word_embeddings": False,
}  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", nargs="+", help=".txt/.jsonl files or datasets folders (default: pydoc prose)")
    parser.add_argument("--pretrained", help="a save_pretrained folder holding the model and its tokenizer")
    parser.add_argument("--tiny", action="store_true", help="a tiny untrained Llama and few steps")
    parser.add_argument("--amount", type=float, default=0.25, help="fraction of every layer's FFN neurons (0.25)")
    parser.add_argument("--gpus", type=int, default=0, help="GPUs to shard over (0: 2 CPU processes with gloo)")
    parser.add_argument("--steps", type=int, default=200, help="recovery steps (200; --tiny: 4)")
    parser.add_argument("--window", type=int, default=128, help="tokens per window (128)")
    parser.add_argument("--out", default="pruned-sharded", help="where rank 0 saves the pruned model")
    args = parser.parse_args(argv)
    if args.tiny and args.pretrained:
        parser.error("--tiny builds a model from scratch: give --tiny or --pretrained, not both")

    pl.seed_everything(0, verbose=False)  # every rank builds the same weights (checked before the cut)
    pretrained = args.pretrained or (None if args.tiny else str(lp.default_language_model()))
    window = 32 if args.tiny else args.window
    data = lp.CausalLMDataModule(files=args.files, tokenizer=pretrained, window=window, batch_size=4)
    model = lp.CausalLM(
        pretrained=pretrained, config=TINY if args.tiny else None, vocabulary=data.vocabulary,
        gradient_checkpointing=True, sample_tokens=0, warmup_steps=1 if args.tiny else 20,
    )  # fmt: skip
    devices = args.gpus or 2
    dense = lp.memory_plan(model, batch_size=4, sequence_length=window, strategy="fsdp", devices=devices,
                           precision="bf16-true", gradient_checkpointing=True)  # fmt: skip
    pruning = lp.PruneBeforeSharding(
        amount=args.amount, structure="llm_pruner", importance="taylor_vectorwise", calibration_batches=2,
        target="channels", log_table=False,
    )  # fmt: skip
    strategy = ModelParallelStrategy(
        data_parallel_size=devices, tensor_parallel_size=1, save_distributed_checkpoint=False,
        process_group_backend=None if args.gpus else "gloo",
    )  # fmt: skip
    trainer = pl.Trainer(
        accelerator="gpu" if args.gpus else "cpu", devices=devices, strategy=strategy, precision="bf16-true",
        max_steps=4 if args.tiny else args.steps, callbacks=[lp.Distillation(alpha=0.5), pruning], logger=False,
        limit_val_batches=0, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(model, datamodule=data)

    whole = gathered(model.model)  # a collective: every rank takes part, rank 0 receives the whole model
    if not trainer.is_global_zero:
        return
    pruned = lp.memory_plan(whole, batch_size=4, sequence_length=window, strategy="fsdp", devices=devices,
                            precision="bf16-true", gradient_checkpointing=True)  # fmt: skip
    print(lp.format_plans({"dense": dense, "pruned": pruned}))
    print(f"params before: {dense.parameters:,}")
    print(f"params after: {lp.count_params(whole):,}")
    print(f"distillation loss at the last step: {float(trainer.callback_metrics['distill/loss']):.3f}")
    whole.save_pretrained(args.out)
    data.tokenizer.save_pretrained(args.out)
    reloaded = AutoModelForCausalLM.from_pretrained(args.out).eval()
    ids = data.splits["test"].windows[:2]
    with torch.no_grad():  # the same bf16 weights, compared in float32 (rotary tables rebuilt: within 1e-5)
        difference = (whole.eval().float()(input_ids=ids).logits - reloaded.float()(input_ids=ids).logits).abs().max()
    if difference > 1e-5:
        raise SystemExit(f"the model reloaded from '{args.out}' computes different logits (max |Δ| {difference:.3g})")
    print(f"saved to {args.out} (bf16); AutoModelForCausalLM.from_pretrained reloads it with the same logits")


if __name__ == "__main__":
    main()
