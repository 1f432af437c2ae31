"""A causal language model LightningModule around any Hugging Face ``AutoModelForCausalLM``."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor
from torchmetrics import MeanMetric

# The offline default: a small Llama with grouped-query attention (about 1.3M parameters at 2,048 tokens).
DEFAULT_CONFIG: dict[str, Any] = {
    "model_type": "llama",
    "hidden_size": 128,
    "intermediate_size": 384,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 1024,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
}


def build_causal_lm(pretrained: str | Path | None, config: dict[str, Any] | None, vocabulary: int | None) -> Any:
    """A model from a local ``from_pretrained`` folder, or built from ``config`` (a dict with ``model_type``)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if pretrained is not None:
        folder = Path(pretrained)
        if not (folder / "config.json").is_file():
            raise ValueError(
                f"`pretrained` '{folder}' is not a folder written by `save_pretrained` (no config.json there)."
            )
        model = AutoModelForCausalLM.from_pretrained(folder)
    else:
        options = dict(DEFAULT_CONFIG if config is None else config)
        if vocabulary is not None:
            options["vocab_size"] = vocabulary
        model_type = options.pop("model_type", None)
        if model_type is None:
            raise ValueError(f"`config` needs a `model_type` (e.g. 'llama', 'qwen2', 'gpt2'); got {sorted(options)}.")
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **options))
    embeddings = model.get_input_embeddings().weight.shape[0]
    if vocabulary is not None and vocabulary > embeddings:
        raise ValueError(
            f"the tokenizer has {vocabulary} tokens but the model embeds only {embeddings}: they do not belong "
            "together. Use the tokenizer saved with the model."
        )
    return model


class CausalLM(pl.LightningModule):
    """Next-token training of a Hugging Face causal LM: AdamW with linear warm-up and cosine decay.

    Logs ``train/loss`` every step, and ``val/loss``, ``val/ppl`` (token-weighted) per validation; the
    test split gives ``test/loss`` and ``test/ppl``.

    Args:
        pretrained: a local folder written by ``save_pretrained`` (model; the tokenizer may sit beside it).
        config: a Hugging Face config as a dict with ``model_type``, used when ``pretrained`` is None
            (default: :data:`DEFAULT_CONFIG`, a small Llama with grouped-query attention).
        vocabulary: the tokenizer's number of tokens: the vocabulary size of a model built from ``config``,
            and checked against a pretrained model's embeddings.
        lr, weight_decay, betas: AdamW.
        warmup_steps: linear warm-up, then cosine decay to ``min_lr_ratio · lr`` at the end of training.
        example_tokens: length of ``example_input_array`` (two windows), which the pruning callbacks trace.

    Raises:
        ValueError: a folder without a model, a config without ``model_type``, or a tokenizer larger than the
            model's embeddings.
    """

    def __init__(
        self,
        pretrained: str | None = None,
        config: dict[str, Any] | None = None,
        vocabulary: int | None = None,
        lr: float = 3e-3,
        weight_decay: float = 0.1,
        betas: tuple[float, float] = (0.9, 0.95),
        warmup_steps: int = 100,
        min_lr_ratio: float = 0.1,
        example_tokens: int = 32,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model = build_causal_lm(pretrained, config, vocabulary)
        self.example_input_array = {"input_ids": torch.zeros(2, example_tokens, dtype=torch.long)}
        self.val_nll, self.test_nll = MeanMetric(), MeanMetric()

    def forward(self, input_ids: Tensor) -> Tensor:
        return self.model(input_ids=input_ids, use_cache=False).logits

    def _loss(self, batch: dict[str, Tensor]) -> Tensor:
        ids = batch["input_ids"]
        return self.model(input_ids=ids, labels=ids, use_cache=False).loss

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        loss = self._loss(batch)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        ids = batch["input_ids"]
        self.val_nll.update(self._loss(batch), weight=ids.shape[0] * (ids.shape[1] - 1))

    def on_validation_epoch_end(self) -> None:
        loss = self.val_nll.compute()
        self.log_dict({"val/loss": loss, "val/ppl": torch.exp(loss)}, prog_bar=True)
        self.val_nll.reset()

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        ids = batch["input_ids"]
        self.test_nll.update(self._loss(batch), weight=ids.shape[0] * (ids.shape[1] - 1))

    def on_test_epoch_end(self) -> None:
        loss = self.test_nll.compute()
        self.log_dict({"test/loss": loss, "test/ppl": torch.exp(loss)})
        self.test_nll.reset()

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        decay = [p for p in self.parameters() if p.ndim >= 2]
        rest = [p for p in self.parameters() if p.ndim < 2]
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": hp.weight_decay}, {"params": rest, "weight_decay": 0.0}],
            lr=hp.lr,
            betas=tuple(hp.betas),
        )
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        warmup = min(hp.warmup_steps, total)

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            progress = min(1.0, (step - warmup) / max(total - warmup, 1))
            return hp.min_lr_ratio + (1 - hp.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
