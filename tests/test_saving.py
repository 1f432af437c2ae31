"""Pruned Hugging Face models saved as folders: stock ``from_pretrained`` for uniform widths, and
``lightning_prune.from_pretrained`` for every case (per-layer widths, added biases, a tied head), same logits."""

from __future__ import annotations

import json

import pytest
import torch
from test_llm_pruner import llama, windows

import lightning_prune as lp


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(input_ids=ids).logits


def test_per_layer_widths_and_added_biases_reload_through_the_manifest(tmp_path) -> None:
    from transformers import AutoModelForCausalLM

    model = llama(layers=4)
    lp.flap(model, windows(8), 0.4)  # global: layers keep different widths, and biases appear
    assert len({layer.mlp.down_proj.in_features for layer in model.model.layers}) > 1
    assert lp.save_pretrained(model, tmp_path / "pruned") is False
    manifest = json.loads((tmp_path / "pruned" / "lightning_prune.json").read_text())
    assert not manifest["stock"] and "model.layers.0.mlp.down_proj.weight" in manifest["shapes"]
    ids = windows(2, 10)
    with pytest.raises(RuntimeError, match="mismatched_sizes"):  # the config cannot say per-layer widths
        AutoModelForCausalLM.from_pretrained(tmp_path / "pruned")
    reloaded = lp.from_pretrained(tmp_path / "pruned")
    assert torch.allclose(logits(reloaded, ids), logits(model, ids), atol=1e-6)
    assert [layer.mlp.down_proj.in_features for layer in reloaded.model.layers] == [
        layer.mlp.down_proj.in_features for layer in model.model.layers
    ]
    reloaded(input_ids=ids, labels=ids).loss.backward()  # the layers' attributes followed: it trains


def test_uniform_widths_are_a_stock_model_and_both_loaders_agree(tmp_path) -> None:
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True,
    )  # fmt: skip
    model = LlamaForCausalLM(config)
    lp.llm_pruner(model, windows(4), 0.5, stream=True)  # the stream too: the tied head is cut with the embeddings
    assert model.config.hidden_size < 32
    assert lp.save_pretrained(model, tmp_path / "pruned") is True
    ids = windows(2, 10)
    for loaded in (AutoModelForCausalLM.from_pretrained(tmp_path / "pruned"), lp.from_pretrained(tmp_path / "pruned")):
        assert torch.allclose(logits(loaded, ids), logits(model, ids), atol=1e-6)
        assert loaded.lm_head.weight is loaded.model.embed_tokens.weight


def test_a_failed_save_leaves_the_previous_folder_and_bad_folders_are_named(tmp_path) -> None:
    model = llama(layers=1)
    lp.save_pretrained(model, tmp_path / "model")
    before = sorted(p.name for p in (tmp_path / "model").iterdir())
    with pytest.raises(AttributeError):
        lp.save_pretrained(model, tmp_path / "model", tokenizer=object())  # fails after the weights were written
    assert sorted(p.name for p in (tmp_path / "model").iterdir()) == before
    assert not [p for p in tmp_path.iterdir() if "partial" in p.name]
    with pytest.raises(lp.PruningError, match=r"no config\.json"):
        lp.from_pretrained(tmp_path / "nowhere")
    with pytest.raises(lp.PruningError, match="PreTrainedModel"):
        lp.save_pretrained(torch.nn.Linear(2, 2), tmp_path / "linear")
    (tmp_path / "model" / "lightning_prune.json").unlink()
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    config["intermediate_size"] = 24  # smaller than the saved weights: they cannot belong to this config
    (tmp_path / "model" / "config.json").write_text(json.dumps(config))
    with pytest.raises(lp.PruningError, match="can only be smaller"):
        lp.from_pretrained(tmp_path / "model")
