"""Dynamic batch loading: the weights' update formula, batches drawn by the current weights, domains kept apart,
and the callback moving the weights toward the domain that lags its reference inside a real Trainer."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import pytest
import torch
from test_llm_callbacks import trainer

import lightning_prune as lp
from lightning_prune.callbacks import DynamicBatchLoading
from lightning_prune.data.domains import DomainBatchSampler, DomainWeights, stdlib_docstrings
from lightning_prune.data.text import pydoc_documents

CONFIG = {
    "model_type": "llama", "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64, "tie_word_embeddings": False,
}  # fmt: skip


def small_domains() -> dict:
    return {"prose": lambda: pydoc_documents()[:6], "docstrings": lambda: stdlib_docstrings(("json", "textwrap"))}


def test_the_weights_follow_the_excess_loss_by_softmax_and_are_smoothed() -> None:
    weights = DomainWeights(["a", "b"], eta=1.0, smoothing=0.0)
    new = weights.update({"a": 3.0, "b": 1.0}, {"a": 2.0, "b": 2.0})  # b below its reference: no excess
    assert new["a"] == pytest.approx(math.e / (math.e + 1)) and new["b"] == pytest.approx(1 / (math.e + 1))
    smoothed = DomainWeights(["a", "b"], eta=2.0, smoothing=0.5)
    new = smoothed.update({"a": 3.0, "b": 2.0}, {"a": 2.0, "b": 2.0})
    raw = math.exp(2) / (math.exp(2) + 1)
    assert new["a"] == pytest.approx(0.5 * raw + 0.25)
    with pytest.raises(ValueError, match=r"no loss or reference loss for domain\(s\) \['b'\]"):
        weights.update({"a": 1.0}, {"a": 1.0, "b": 1.0})


def test_batches_are_drawn_by_the_weights_of_the_moment() -> None:
    weights = DomainWeights(["a", "b"])
    weights.load({"a": 0.9, "b": 0.1})
    sampler = DomainBatchSampler([100, 50], batch_size=50, weights=weights, seed=0)
    batches = iter(sampler)
    first = torch.tensor([next(batches) for _ in range(2)])
    assert 0.8 < (first < 100).float().mean() < 0.98 and first.max() < 150
    weights.load({"a": 0.0, "b": 1.0})
    assert all(index >= 100 for index in next(batches))  # read at every batch


def test_the_domains_are_kept_apart_and_an_empty_one_is_refused() -> None:
    data = lp.MixedTextDataModule(small_domains(), window=32, batch_size=4)
    data.setup()
    assert set(data.domain_splits) == {"prose", "docstrings"}
    sizes = {name: len(parts["train"]) for name, parts in data.domain_splits.items()}
    assert len(data.splits["train"]) == sum(sizes.values())
    assert not set(map(tuple, data.domain_windows("val")["prose"].tolist())) & set(
        map(tuple, data.domain_windows("val")["docstrings"].tolist())
    )
    assert len(stdlib_docstrings()) > 20 and not set(stdlib_docstrings()) & set(pydoc_documents())
    with pytest.raises(ValueError, match="domain 'empty' holds no text"):
        lp.MixedTextDataModule({"empty": lambda: [" "], **small_domains()}, window=32).setup()


def test_the_callback_moves_the_weights_toward_the_domain_above_its_reference() -> None:
    pl.seed_everything(0, verbose=False)
    data = lp.MixedTextDataModule(small_domains(), window=32, batch_size=4)
    module = lp.CausalLM(config=CONFIG, vocabulary=data.vocabulary, warmup_steps=1, example_tokens=8)
    loading = DynamicBatchLoading(every=2, reference={"prose": 0.0, "docstrings": 100.0}, windows=2)
    trainer(1, [loading], enable_checkpointing=False, max_steps=4, limit_val_batches=0).fit(module, datamodule=data)
    assert [h["step"] for h in loading.history] == [2, 4]
    assert loading.history[0]["weights"]["prose"] > 0.5 and loading.history[1]["weights"]["prose"] > 0.99
    assert data.weights.as_dict() == loading.history[-1]["weights"]
    assert set(loading.history[0]["losses"]) == {"prose", "docstrings"}


def test_a_reference_for_other_domains_is_refused_before_training() -> None:
    data = lp.MixedTextDataModule(small_domains(), window=32, batch_size=4)
    module = lp.CausalLM(config=CONFIG, vocabulary=data.vocabulary, warmup_steps=1, example_tokens=8)
    with pytest.raises(lp.PruningError, match=r"`reference` names \['prose'\].*\['prose', 'docstrings'\]"):
        trainer(1, [DynamicBatchLoading(reference={"prose": 1.0})], enable_checkpointing=False).fit(
            module, datamodule=data
        )
