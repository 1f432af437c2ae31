"""A causal language model LightningModule around any Hugging Face ``AutoModelForCausalLM``."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor
from torchmetrics import MeanMetric
from typing_extensions import override

from lightning_prune.callbacks.checkpoint import PrunableModule
from lightning_prune.data.text import CausalLMDataModule
from lightning_prune.depth import find_blocks
from lightning_prune.language import check_windows
from lightning_prune.running import preserved_state

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
    """A model from a local ``from_pretrained`` folder, or built from ``config`` (a dict with ``model_type``).

    Raises:
        ValueError: both or a bad one of ``pretrained`` and ``config``, a model that is not a causal LM, or a
            ``vocabulary`` larger than the model's embeddings.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    if pretrained is not None and config is not None:
        raise ValueError(
            f"give `pretrained` or `config`, not both: got `pretrained`={str(pretrained)!r} and a `config` that "
            "would be ignored. Drop `config` to load the folder, or `pretrained` to build a new model."
        )
    if pretrained is not None:
        folder = _model_folder(pretrained)
        source = f"`pretrained` '{folder}'"
        try:
            model_config = AutoConfig.from_pretrained(folder)
        except (OSError, ValueError) as error:  # not JSON, an unknown model type: transformers says which
            raise ValueError(f"{source}: its config.json could not be read. {error}") from error
        _check_causal_config(model_config, source)
        try:
            model = AutoModelForCausalLM.from_pretrained(folder, config=model_config)
        except OSError as error:  # no weights, or broken ones
            raise ValueError(
                f"{source} holds no weights that load: {error} Save the model with `save_pretrained`."
            ) from error
    else:
        options = dict(DEFAULT_CONFIG if config is None else config)
        if vocabulary is not None:
            options["vocab_size"] = vocabulary
        source = f"`config` with `model_type`={options.get('model_type')!r}"
        model_config = _built_config(options)
        _check_causal_config(model_config, source)
        model = AutoModelForCausalLM.from_config(model_config)
    _check_vocabulary(model, vocabulary)
    _check_causal(model, source)
    return model


def _model_folder(pretrained: str | Path) -> Path:
    folder = Path(pretrained)
    hint = "Pass the folder `save_pretrained` wrote for the model, or `config` (a dict) to build a new one."
    if not folder.exists():
        raise ValueError(f"`pretrained` '{folder}' does not exist. {hint}")
    if not (folder / "config.json").is_file():
        raise ValueError(f"`pretrained` '{folder}' has no config.json: it is not a model folder. {hint}")
    return folder


def _built_config(options: dict[str, Any]) -> Any:
    from transformers import AutoConfig

    model_type = options.pop("model_type", None)
    if model_type is None:
        raise ValueError(f"`config` needs a `model_type` (e.g. 'llama', 'qwen2', 'gpt2'); got {sorted(options)}.")
    try:
        return AutoConfig.for_model(model_type, **options)
    except ValueError as error:
        raise ValueError(
            f"`config` has `model_type`={model_type!r}, which transformers does not know; use a causal LM's, "
            "e.g. 'llama', 'qwen2' or 'gpt2'."
        ) from error


def _check_causal_config(config: Any, source: str) -> None:
    """Refuse, before any weights are built, a model type without a causal-LM class, or a folder of a model
    saved without its language-model head (e.g. ``LlamaModel`` or ``BertForMaskedLM``)."""
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        raise ValueError(
            f"{source} is a {config.model_type!r} model, which has no causal-LM head in transformers (no "
            "…ForCausalLM class): a causal language model is needed, e.g. 'llama', 'qwen2' or 'gpt2'."
        )
    causal = {name for names in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values() for name in _names(names)}
    saved = list(getattr(config, "architectures", None) or [])
    if saved and not causal.intersection(saved):
        expected = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(config.model_type, "…ForCausalLM")
        raise ValueError(
            f"{source} holds a {', '.join(saved)} (config.json `architectures`), which has no causal-LM head: a "
            f"causal language model is needed. Save the {_names(expected)[0]} model, not its base or another task's."
        )


def _names(names: str | tuple[str, ...]) -> tuple[str, ...]:
    return (names,) if isinstance(names, str) else names


def _check_causal(model: Any, source: str) -> None:
    """Refuse a model whose predictions see later tokens: changing the last token must leave the earlier logits."""
    rows = model.get_input_embeddings().num_embeddings
    ids = torch.arange(4).remainder(rows)[None].repeat(2, 1)
    ids[1, -1] = (ids[0, -1] + 1) % rows
    with preserved_state(model), torch.no_grad():
        model.eval()
        logits = model(input_ids=ids, use_cache=False).logits
    if not torch.allclose(logits[0, :-1], logits[1, :-1], atol=1e-5):
        raise ValueError(
            f"{source} builds a {type(model).__name__} whose predictions see later tokens: it is not a causal "
            "language model. For an encoder with a decoder mode (BERT-like), set `is_decoder: true` in its config."
        )


def _check_vocabulary(model: Any, vocabulary: int | None, argument: str = "vocabulary") -> None:
    """Refuse a tokenizer of ``vocabulary`` tokens that the model's input embeddings do not cover."""
    embeddings = model.get_input_embeddings().num_embeddings
    if vocabulary is not None and vocabulary > embeddings:
        raise ValueError(
            f"`{argument}`: the tokenizer has {vocabulary} tokens but the model embeds only {embeddings}: they do "
            "not belong together. Use the tokenizer saved with the model."
        )


class CausalLM(PrunableModule):
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
        sample_tokens: after each validation, log a greedy continuation of this many tokens of the first
            validation window's first 8 (0: none).
        gradient_checkpointing: recompute each decoder layer's activations in the backward pass instead of
            keeping them (Hugging Face's ``activation_checkpointing_enable``, non-reentrant): less memory, one
            more forward per step.

    Under Lightning's ``ModelParallelStrategy`` (FSDP2 over its ``data_parallel`` mesh, CPU with gloo too)
    ``configure_model`` shards every decoder layer and then the whole model with ``fully_shard``; under
    ``FSDPStrategy`` (GPU) Lightning wraps it. ``Trainer(precision="bf16-true")`` trains in bf16 end to end.

    Raises:
        ValueError: in ``__init__``, a missing folder or one without a model, a config without ``model_type``,
            both ``pretrained`` and ``config``, a model that is not a causal LM (no ``…ForCausalLM`` class, a
            folder saved without the head, or attention that sees later tokens), a ``vocabulary`` larger than the
            model's embeddings, or ``example_tokens`` beyond its positions. In ``setup``, before training, for a
            :class:`~lightning_prune.data.CausalLMDataModule` whose tokenizer is larger than the embeddings or whose
            ``window`` is longer than the model's positions (``config.max_position_embeddings``).
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
        sample_tokens: int = 24,
        gradient_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model = build_causal_lm(pretrained, config, vocabulary)
        if gradient_checkpointing:
            self.model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        self.example_input_array = {"input_ids": torch.zeros(2, example_tokens, dtype=torch.long)}
        self._prompt: Tensor | None = None
        check_windows(self.model, self.example_input_array["input_ids"], "example_tokens")
        self.val_nll, self.test_nll = MeanMetric(), MeanMetric()

    @override
    def setup(self, stage: str) -> None:
        data = self.trainer.datamodule
        if isinstance(data, CausalLMDataModule):  # set up already: Lightning sets up the data first
            _check_vocabulary(self.model, data.vocabulary, "tokenizer")
            for split in data.splits.values():
                check_windows(self.model, split.windows, "window")

    @override
    def configure_model(self) -> None:
        mesh = self.device_mesh
        if mesh is None:
            return
        from torch.distributed.fsdp import FSDPModule, fully_shard

        if isinstance(self.model, FSDPModule):  # configured for an earlier stage already
            return
        names = mesh.mesh_dim_names or ()
        mesh = mesh["data_parallel"] if "data_parallel" in names else mesh
        for layer in self.model.get_submodule(find_blocks(self.model)):
            fully_shard(layer, mesh=mesh)
        fully_shard(self.model, mesh=mesh)

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
        if batch_idx == 0:
            self._prompt = ids[:1, :8]

    def on_validation_epoch_end(self) -> None:
        loss = self.val_nll.compute()
        self.log_dict({"val/loss": loss, "val/ppl": torch.exp(loss)}, prog_bar=True)
        self.val_nll.reset()
        if self.hparams.sample_tokens and self._prompt is not None and not self.trainer.sanity_checking:
            rank_zero_info(f"epoch {self.current_epoch} sample: {self.sample(self._prompt)}")

    def sample(self, prompt: Tensor) -> str:
        """Greedy continuation of ``prompt`` (``sample_tokens`` tokens), decoded with the data module's tokenizer
        when there is one (token ids otherwise): what the model has learnt, in a line of the log."""
        with torch.no_grad():
            ids = self.model.generate(
                input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=self.hparams.sample_tokens,
                do_sample=False, use_cache=True,
            )[0]  # fmt: skip
        tokenizer = getattr(getattr(self._trainer, "datamodule", None), "tokenizer", None)
        if tokenizer is None:
            return str(ids.tolist())
        head, tail = tokenizer.decode(ids[: prompt.shape[1]]), tokenizer.decode(ids[prompt.shape[1] :])
        return f"{head!r} -> {tail!r}"

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
