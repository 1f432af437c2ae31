"""Wanda-sp and FLAP: activation statistics, scores against a direct computation, exact mean compensation, and a
compensated model that reloads with the stock class."""

from __future__ import annotations

import copy

import torch
from test_llm_pruner import llama, windows

import lightning_prune as lp
from lightning_prune.importance import ScoringContext, score
from lightning_prune.methods.flap import ActivationImportance, collect_activations


def down_proj_inputs(model, calibration: torch.Tensor, layer: int) -> torch.Tensor:
    seen = []
    hook = model.model.layers[layer].mlp.down_proj.register_forward_pre_hook(
        lambda module, inputs: seen.append(inputs[0].detach().reshape(-1, inputs[0].shape[-1]).double())
    )
    with torch.no_grad():
        for window in calibration:
            model(input_ids=window[None])
    hook.remove()
    return torch.cat(seen)


def test_wanda_sp_scores_a_neuron_by_its_down_projection_column_and_input_norm() -> None:
    model, calibration = llama(), windows()
    graph = lp.build_graph(model, {"input_ids": calibration[:1], "use_cache": False})
    batches = [{"input_ids": w[None], "use_cache": False} for w in calibration]
    statistics = collect_activations(model, graph, batches)
    scores = score(graph.groups, ScoringContext(model, statistics), ActivationImportance("wanda_sp"))
    name = "model.layers.2.mlp.down_proj.weight"
    index = next(i for i, g in enumerate(graph.groups) if name in {m.slot.tensor for m in g.members_with_role("in")})
    member = next(m for m in graph.groups[index].members_with_role("in") if m.slot.tensor == name)
    x = down_proj_inputs(model, calibration, 2)
    expected = model.model.layers[2].mlp.down_proj.weight.detach().double().abs().sum(0) * x.norm(dim=0)
    assert torch.allclose(scores[index][member.elements], expected[member.positions], rtol=1e-6)


def test_flap_compensation_is_exact_for_inputs_at_the_calibration_mean() -> None:
    """A pruned down_proj with its compensated bias equals the dense one fed the removed channels' means."""
    model, calibration = llama(), windows()
    dense = copy.deepcopy(model)
    mean = down_proj_inputs(dense, calibration, 1).mean(0)
    result = lp.flap(model, calibration, 0.3)
    cut = next(
        c
        for step in lp.record.parse_record(result.record)
        for c in step.cuts
        if c.tensor == "model.layers.1.mlp.down_proj.weight" and c.dim == 1
    )
    x = torch.randn(5, 48, dtype=torch.float64)
    filled = mean.expand(5, -1).clone()
    filled[:, cut.keep] = x[:, cut.keep]
    reference = dense.model.layers[1].mlp.down_proj.double()(filled)
    pruned = model.model.layers[1].mlp.down_proj.double()(x[:, cut.keep])
    assert torch.allclose(pruned, reference, atol=1e-9)


def test_flap_widths_differ_across_layers_and_the_compensated_model_rebuilds_from_config_and_record(tmp_path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    model, calibration = llama(layers=4), windows(8)
    result = lp.flap(model, calibration, 0.4)
    widths = {layer.mlp.down_proj.in_features for layer in model.model.layers}
    heads = {layer.self_attn.q_proj.out_features for layer in model.model.layers}
    assert len(widths | heads) > 2  # one global threshold: layers keep different numbers of neurons or heads
    assert model.config.attention_bias and model.config.mlp_bias
    model.save_pretrained(tmp_path)  # per-layer widths: from_pretrained cannot express them, the record can
    fresh = LlamaForCausalLM(LlamaConfig.from_pretrained(tmp_path))
    lp.restore(fresh, result.record)
    fresh.load_state_dict(model.state_dict())
    ids = windows(2, 10)
    with torch.no_grad():
        assert torch.allclose(fresh.eval()(input_ids=ids).logits, model.eval()(input_ids=ids).logits, atol=1e-6)


def test_a_uniformly_compensated_model_reloads_with_the_stock_class(tmp_path) -> None:
    from transformers import LlamaForCausalLM

    model = llama(layers=1)  # one layer: the global cut is uniform, so the config can say it
    lp.flap(model, windows(), 0.3)
    assert (
        model.model.layers[0].mlp.down_proj.bias is not None and model.model.layers[0].self_attn.q_proj.bias is not None
    )
    model.save_pretrained(tmp_path)
    reloaded = LlamaForCausalLM.from_pretrained(tmp_path).eval()
    ids = windows(2, 10)
    with torch.no_grad():
        assert torch.allclose(reloaded(input_ids=ids).logits, model.eval()(input_ids=ids).logits, atol=1e-5)


def test_wanda_sp_removes_the_same_share_of_every_layer_and_flap_without_compensation_adds_no_bias() -> None:
    model, calibration = llama(), windows()
    lp.wanda_sp(model, calibration, 0.5)
    assert {layer.mlp.down_proj.in_features for layer in model.model.layers} == {24}
    plain = llama()
    lp.flap(plain, windows(), 0.3, compensate=False)
    assert all(layer.mlp.down_proj.bias is None for layer in plain.model.layers)
    assert not plain.config.mlp_bias


def test_structured_pruning_runs_flap_and_wanda_sp_on_calibration_batches_of_a_trainer() -> None:
    import lightning.pytorch as pl

    from lightning_prune.callbacks import StructuredPruning

    config = {
        "model_type": "llama", "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64, "tie_word_embeddings": False,
    }  # fmt: skip
    loader = torch.utils.data.DataLoader([{"input_ids": w} for w in windows(8, 12)], batch_size=2)
    for structure, importance in (("flap", "flap"), ("channels", "wanda_sp")):
        pl.seed_everything(0, verbose=False)
        module = lp.CausalLM(config=config, vocabulary=64, warmup_steps=1)
        pruning = StructuredPruning(
            0.3, importance, structure=structure, calibration_batches=2, scope="local",
            ignore=["model.model.embed_tokens"], log_table=False,
        )  # fmt: skip
        trainer = pl.Trainer(
            max_epochs=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
            enable_model_summary=False, callbacks=[pruning],
        )  # fmt: skip
        trainer.fit(module, loader)
        layers = module.model.model.layers
        assert pruning.done[0]["removed"] > 0 and module.model.config.hidden_size == 32
        assert (layers[0].mlp.down_proj.bias is not None) == (structure == "flap")
