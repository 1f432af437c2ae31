"""The default dense language model, actually trained: pruning an untrained model measures nothing.

:func:`default_language_model` trains :data:`~lightning_prune.models.causal_lm.DEFAULT_CONFIG` on the embedded
pydoc text until the validation loss stops improving by ``min_delta`` for ``patience`` validations, and saves
the model and its tokenizer with ``save_pretrained`` into the cache (``$LIGHTNING_PRUNE_CACHE``), with
``training.json`` saying what it reached and in how long. Later calls return the cached folder at once.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import EarlyStopping

from lightning_prune.data.text import CausalLMDataModule, cache_dir
from lightning_prune.models.causal_lm import DEFAULT_CONFIG, CausalLM


def default_language_model(
    *,
    window: int = 128,
    batch_size: int = 32,
    max_epochs: int = 80,
    patience: int = 3,
    min_delta: float = 0.005,
    lr: float = 3e-3,
    seed: int = 0,
) -> Path:
    """The folder of the trained default model and its tokenizer (``AutoModelForCausalLM.from_pretrained`` loads it).

    Trains on first use (minutes on 2 CPU cores), then reuses the cache; each setting gets its own folder.
    """
    settings: dict[str, Any] = {
        "config": DEFAULT_CONFIG, "window": window, "batch_size": batch_size, "max_epochs": max_epochs,
        "patience": patience, "min_delta": min_delta, "lr": lr, "seed": seed,
    }  # fmt: skip
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]
    folder = cache_dir() / f"llama-pydoc-{digest}"
    if (folder / "training.json").is_file():
        return folder
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    pl.seed_everything(seed, verbose=False)
    data = CausalLMDataModule(window=window, batch_size=batch_size, seed=seed)
    data.prepare_data()
    data.setup()
    model = CausalLM(vocabulary=data.vocabulary, lr=lr, warmup_steps=50)
    stop = EarlyStopping("val/loss", min_delta=min_delta, patience=patience)
    trainer = pl.Trainer(
        max_epochs=max_epochs, callbacks=[stop], logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    start = time.perf_counter()
    trainer.fit(model, data)
    seconds = time.perf_counter() - start
    validated = float(trainer.callback_metrics["val/ppl"])  # test() replaces the trainer's metrics
    tested = trainer.test(model, data, verbose=False)[0]
    partial = folder.with_name(f"{folder.name}.partial-{os.getpid()}")
    model.model.save_pretrained(partial)
    data.tokenizer.save_pretrained(partial)
    summary = {
        **settings, "epochs": trainer.current_epoch, "steps": trainer.global_step, "seconds": round(seconds, 1),
        "val_ppl": validated, "test_ppl": tested["test/ppl"],
        "train_tokens": int(data.tokens["train"].numel()),
    }  # fmt: skip
    (partial / "training.json").write_text(json.dumps(summary, indent=2) + "\n")
    try:
        os.replace(partial, folder)
    except OSError:  # another process finished first
        shutil.rmtree(partial, ignore_errors=True)
    return folder
