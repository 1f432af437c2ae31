"""SliceGPT as a scheduled step in a real Trainer: the stream narrows, training goes on (optimizer state of the old
basis forgotten, new parameters trained), and the record rebuilds the sliced module: restore + load_state_dict,
load_from_checkpoint, fit(ckpt_path=...); lightning_prune.save_pretrained / from_pretrained reload both variants."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from test_llm_callbacks import loader, trainer
from test_llm_pruner import windows

import lightning_prune as lp
from lightning_prune.callbacks import StructuredPruning, applied_record

CONFIG = {
    "model_type": "llama", "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64,
}  # fmt: skip
OPTIONS = {"when": "train_epoch_start", "calibration_batches": 4, "log_table": False}


def module(tied: bool = False) -> lp.CausalLM:
    pl.seed_everything(0, verbose=False)
    return lp.CausalLM(config={**CONFIG, "tie_word_embeddings": tied}, vocabulary=64, warmup_steps=1)


def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(ids)


def sliced(per_layer: bool, tied: bool = False, start_epoch: int = 0, root=None, **extra) -> lp.CausalLM:
    pruned = module(tied)
    pruning = StructuredPruning(0.25, structure="slicegpt", start_epoch=start_epoch, options={"per_layer": per_layer},
                                **OPTIONS)  # fmt: skip
    callbacks = [pruning, ModelCheckpoint(dirpath=root, save_last=True)] if root else [pruning]
    trainer(start_epoch + 1, callbacks, root, enable_checkpointing=root is not None, **extra).fit(pruned, loader())
    return pruned


@pytest.mark.parametrize(("per_layer", "tied"), [(False, False), (False, True), (True, False)])
def test_a_slicegpt_step_narrows_the_stream_and_the_record_rebuilds_the_model(per_layer, tied) -> None:
    pruned = sliced(per_layer, tied)
    decoder = pruned.model
    assert decoder.config.hidden_size == decoder.model.embed_tokens.weight.shape[1] == 24
    assert decoder.model.layers[0].self_attn.q_proj.in_features == 24 and decoder.config.head_dim == 8
    assert decoder.lm_head.weight is not decoder.model.embed_tokens.weight
    shortcut = getattr(decoder.model.layers[1], "mlp_shortcut", None)
    assert (shortcut is not None and shortcut.shape == (24, 24)) == per_layer
    if per_layer:
        assert shortcut.grad is not None  # the new parameters were in the rebuilt optimizer and trained
    fresh = module(tied)
    lp.restore(fresh, applied_record(pruned))
    fresh.load_state_dict(pruned.state_dict())
    ids = windows(2, 10)
    assert torch.allclose(logits(fresh, ids), logits(pruned, ids), rtol=0, atol=1e-6)
    assert fresh.model.model.norm.variance_epsilon == pytest.approx(1e-6 * 32 / 24)


def test_slicing_after_a_trained_epoch_forgets_the_old_optimizer_state() -> None:
    """Adam's moments of epoch 0 have the dense shapes: kept, the first step after the cut would fail."""
    pruned = sliced(per_layer=False, start_epoch=1)
    assert pruned.model.config.hidden_size == 24
    optimizer = pruned.trainer.optimizers[0]
    assert all(state["exp_avg"].shape == p.shape for p, state in optimizer.state.items())
    assert {id(p) for group in optimizer.param_groups for p in group["params"]} == {id(p) for p in pruned.parameters()}


@pytest.mark.parametrize("per_layer", [False, True])
def test_a_sliced_checkpoint_loads_and_resumes_without_slicing_again(tmp_path, per_layer) -> None:
    pruned = sliced(per_layer, root=tmp_path)
    ids = windows(2, 10)
    reloaded = lp.CausalLM.load_from_checkpoint(tmp_path / "last.ckpt")
    assert torch.allclose(logits(reloaded, ids), logits(pruned, ids), rtol=0, atol=1e-6)
    fresh = module()
    resumed = StructuredPruning(0.25, structure="slicegpt", options={"per_layer": per_layer}, **OPTIONS)
    trainer(2, [resumed], tmp_path / "resumed").fit(fresh, loader(), ckpt_path=tmp_path / "last.ckpt")
    assert list(resumed.done) == [0] and fresh.model.config.hidden_size == 24
    assert fresh.model.model.layers[0].self_attn.o_proj.weight.grad is not None  # trained on after the resume


@pytest.mark.parametrize("per_layer", [False, True])
def test_a_sliced_model_saves_and_loads_with_the_same_logits(tmp_path, per_layer) -> None:
    from transformers import AutoModelForCausalLM

    decoder = sliced(per_layer).model.eval()
    stock = lp.save_pretrained(decoder, tmp_path)
    assert stock == (not per_layer)
    ids = windows(2, 10)
    expected = decoder(input_ids=ids).logits
    reloaded = lp.from_pretrained(tmp_path)
    assert torch.allclose(reloaded(input_ids=ids).logits, expected, rtol=0, atol=1e-6)
    if not per_layer:
        stock_model = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
        assert torch.allclose(stock_model(input_ids=ids).logits, expected, rtol=0, atol=1e-6)


def test_bad_slicegpt_options_are_refused_at_construction() -> None:
    with pytest.raises(lp.PruningError, match="`round_to` must be a positive integer; got 0"):
        StructuredPruning(0.25, structure="slicegpt", options={"round_to": 0}, **OPTIONS)
    with pytest.raises(lp.PruningError, match="`per_layer` must be True or False; got 'yes'"):
        StructuredPruning(0.25, structure="slicegpt", options={"per_layer": "yes"}, **OPTIONS)
    with pytest.raises(lp.PruningError, match="set `calibration_batches`"):
        StructuredPruning(0.25, structure="slicegpt", when="train_epoch_start")


def test_a_model_without_a_known_decoder_is_refused_before_training() -> None:
    neox = {"model_type": "gpt_neox", "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 1,
            "num_attention_heads": 4, "max_position_embeddings": 64}  # fmt: skip
    other = lp.CausalLM(config=neox, vocabulary=64)
    pruning = StructuredPruning(0.25, structure="slicegpt", **OPTIONS)
    with pytest.raises(lp.PruningError, match="needs a Hugging Face decoder of a known family"):
        trainer(1, [pruning], enable_checkpointing=False).fit(other, loader())


def test_a_record_with_an_unknown_or_malformed_rewrite_is_refused_and_the_model_unchanged() -> None:
    from lightning_prune.cuts import Rewrite, Step
    from lightning_prune.record import new_record

    fresh = module()
    before = {name: tensor.clone() for name, tensor in fresh.state_dict().items()}
    with pytest.raises(lp.RecordError, match=r"rewrites of kind \['unknown'\] are not registered"):
        lp.restore(fresh, new_record([Step([], [], [Rewrite("unknown", {})])]))
    malformed = {**new_record(), "steps": [{"cuts": [], "rewrites": [{"kind": "slicegpt", "options": {"x": {1}}}]}]}
    with pytest.raises(lp.RecordError, match="`options` of plain data"):
        lp.restore(fresh, malformed)
    assert all(torch.equal(before[name], tensor) for name, tensor in fresh.state_dict().items())


@pytest.mark.parametrize("per_layer", [False, True])
def test_the_slicegpt_experiment_saves_a_model_that_reloads_to_the_reported_perplexity(tmp_path, per_layer) -> None:
    import yaml
    from test_hydra import CLI, CONF, FAST, TINY_LM, read_results, run

    variant = [f"callbacks.pruning.options.per_layer={str(per_layer).lower()}"]
    command = [*CLI, "experiment=slicegpt", "debug=smoke", *TINY_LM, *FAST, *variant, f"hydra.run.dir={tmp_path}"]
    done = run(command, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    results = read_results(tmp_path)
    assert results["model"]["stock_from_pretrained"] is not per_layer
    model = lp.from_pretrained(results["model"]["path"])
    assert model.config.hidden_size == 24  # 25% of the 32 dimensions, a multiple of 8
    assert hasattr(model.model.layers[0], "attention_shortcut") == per_layer
    data = lp.CausalLMDataModule(window=32, tokenizer=results["model"]["path"])
    data.setup()
    batch_size = yaml.safe_load((CONF / "data" / "text.yaml").read_text())["batch_size"]
    with torch.no_grad():
        ppl = lp.perplexity(model, data.splits["test"].windows[:batch_size])
    assert ppl == pytest.approx(results["final"]["perplexity"], rel=1e-4)
