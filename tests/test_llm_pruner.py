"""LLM-Pruner: parameter Taylor importance checked against autograd, the block-wise recipe, and the callback path."""

from __future__ import annotations

import warnings

import lightning.pytorch as pl
import pytest
import torch

import lightning_prune as lp
from lightning_prune.callbacks import StructuredPruning
from lightning_prune.importance import ScoringContext, get_criterion, score
from lightning_prune.methods.llm_pruner import causal_lm_loss
from lightning_prune.statistics import collect_parameter_gradients

warnings.filterwarnings("ignore", ".*does not have many workers.*")


def llama(layers: int = 3, vocabulary: int = 64):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocabulary, hidden_size=32, intermediate_size=48, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
    )  # fmt: skip
    return LlamaForCausalLM(config)


def windows(count: int = 4, tokens: int = 12, vocabulary: int = 64) -> torch.Tensor:
    return torch.randint(0, vocabulary, (count, tokens), generator=torch.Generator().manual_seed(1))


def reference_gradients(model, calibration: torch.Tensor) -> tuple[dict, dict]:
    """Σ G and Σ G² over one-window backward passes, by plain autograd."""
    total = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    squared = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    model.train()
    for window in calibration:
        model.zero_grad()
        causal_lm_loss(model, window[None]).backward()
        for name, parameter in model.named_parameters():
            total[name] += parameter.grad
            squared[name] += parameter.grad.square()
    model.zero_grad()
    return total, squared


@pytest.mark.parametrize("variant", ["vectorwise", "elementwise", "second", "mix"])
def test_the_importance_of_an_ffn_neuron_is_the_papers_formula_on_its_three_weights(variant: str) -> None:
    model, calibration = llama(), windows()
    graph = lp.build_graph(model, {"input_ids": calibration[:1], "use_cache": False})
    criterion = get_criterion(f"taylor_{variant}")
    statistics = collect_parameter_gradients(model, calibration.split(1), causal_lm_loss)
    total, squared = reference_gradients(model, calibration)
    scores = score(graph.groups, ScoringContext(model, statistics), criterion)
    prefix = "model.layers.1.mlp."
    index = next(  # the neurons of layer 1's MLP: the group whose producers include gate_proj's rows
        i
        for i, g in enumerate(graph.groups)
        if prefix + "gate_proj.weight" in {m.slot.tensor for m in g.members_with_role("out")}
    )
    expected = torch.zeros(48, dtype=torch.float64)
    for name, dim in (("gate_proj.weight", 0), ("up_proj.weight", 0), ("down_proj.weight", 1)):
        weight, grad, fisher = (
            t[prefix + name].detach().double() for t in (dict(model.named_parameters()), total, squared)
        )
        first, second = weight * grad, 0.5 * weight * fisher * weight
        salience = {"vectorwise": first, "elementwise": first, "second": second, "mix": first - second}[variant]
        rows = salience if dim == 0 else salience.T
        expected += rows.sum(1).abs() if variant == "vectorwise" else rows.abs().sum(1)
    group = graph.groups[index]
    member = next(m for m in group.members_with_role("out") if m.slot.tensor == prefix + "gate_proj.weight")
    assert {m.slot.tensor for m in group.members} == {
        prefix + n for n in ("gate_proj.weight", "up_proj.weight", "down_proj.weight")
    }
    found = scores[index][member.elements]  # the group's elements in the order of gate_proj's rows
    assert torch.allclose(found, expected[member.positions], rtol=1e-4, atol=1e-12)


def test_block_wise_recipe_keeps_the_stream_and_the_outer_layers_and_cuts_heads_and_neurons_uniformly() -> None:
    model, calibration = llama(layers=4), windows()
    result = lp.llm_pruner(model, calibration, 0.5, first=1, last=-1)
    layers = model.model.layers
    assert model.model.embed_tokens.weight.shape == (64, 32)  # the hidden size stays
    for index, layer in enumerate(layers):
        inner = 1 <= index < 3
        assert layer.self_attn.q_proj.weight.shape[0] == (8 * 2 if inner else 8 * 4)  # 2 of 4 heads (1 of 2 KV)
        assert layer.self_attn.k_proj.weight.shape[0] == (8 if inner else 16)
        assert layer.mlp.gate_proj.weight.shape[0] == (24 if inner else 48)
    assert result.params_after < result.params_before
    ids = windows(2, 10)
    logits = model(input_ids=ids).logits
    assert logits.shape == (2, 10, 64) and torch.isfinite(logits).all()
    causal_lm_loss(model, ids).backward()  # and it trains


def test_a_uniform_cut_saves_and_reloads_with_the_models_own_class(tmp_path) -> None:
    from transformers import LlamaForCausalLM

    model, calibration = llama(), windows()
    lp.llm_pruner(model, calibration, 0.25, variant="mix", aggregate="prod")
    model.save_pretrained(tmp_path)
    reloaded = LlamaForCausalLM.from_pretrained(tmp_path).eval()
    ids = windows(2, 10)
    with torch.no_grad():
        assert torch.allclose(reloaded(input_ids=ids).logits, model.eval()(input_ids=ids).logits, atol=1e-5)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"variant": "third"}, "`variant` must be one of vectorwise, elementwise, second, mix; got 'third'"),
        ({"aggregate": "median"}, "`aggregate` must be one of sum, mean, max, prod, last"),
        ({"first": 2, "last": 2}, r"the layers to prune, \[2, 2\), must be a non-empty range of the 3 blocks"),
        ({"calibration": torch.zeros(5, dtype=torch.long)}, r"`calibration` must be \(count, tokens ≥ 2\)"),
        ({"amount": 1.0}, r"`amount` must be a fraction in \[0, 1\)"),
    ],
)
def test_bad_arguments_are_named_and_the_model_is_unchanged(kwargs: dict, message: str) -> None:
    model = llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    arguments = {"calibration": windows(), "amount": 0.5, **kwargs}
    with pytest.raises(lp.PruningError, match=message):
        lp.llm_pruner(model, arguments.pop("calibration"), arguments.pop("amount"), **arguments)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_the_callback_scores_with_llm_pruner_on_calibration_batches_and_refuses_without_them(tmp_path) -> None:
    with pytest.raises(lp.PruningError, match=r"measures its statistics on calibration batches.*calibration_batches"):
        StructuredPruning(0.3, "taylor_vectorwise")
    data = [{"input_ids": w} for w in windows(8, 12)]
    pl.seed_everything(0, verbose=False)
    module = lp.CausalLM(config={"model_type": "llama", "hidden_size": 32, "intermediate_size": 48,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64,
        "tie_word_embeddings": False}, vocabulary=64, warmup_steps=1)  # fmt: skip
    pruning = StructuredPruning(0.5, "taylor_vectorwise", calibration_batches=2, scope="local", log_table=False)
    trainer = pl.Trainer(
        max_epochs=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[pruning],
    )  # fmt: skip
    loader = torch.utils.data.DataLoader(data, batch_size=2)
    trainer.fit(module, loader)
    assert module.model.config.num_attention_heads == 2 and pruning.done[0]["removed"] > 0


def test_calibration_the_model_cannot_read_is_refused_before_anything_is_cut() -> None:
    model = llama(layers=2)
    widths = [layer.mlp.down_proj.in_features for layer in model.model.layers]
    with pytest.raises(lp.PruningError, match=r"`calibration`: windows of 65 tokens .* 64 positions"):
        lp.llm_pruner(model, windows(2, 65), 0.2)
    with pytest.raises(lp.PruningError, match=r"`calibration` holds token id 65, outside the model.s 64 embeddings"):
        lp.flap(model, windows(2, 12, vocabulary=65) + 1, 0.2)
    assert [layer.mlp.down_proj.in_features for layer in model.model.layers] == widths


def test_an_amount_beyond_what_every_layer_must_keep_is_refused_and_nothing_is_cut() -> None:
    model = llama(layers=2)
    with pytest.raises(lp.PruningError, match=r"`amount`=0.95 .* keeps at least 1 - `max_fraction` = 10%"):
        lp.llm_pruner(model, windows(2), 0.95)
    assert {layer.mlp.down_proj.in_features for layer in model.model.layers} == {48}
    lp.llm_pruner(model, windows(2), 0.9)  # the most max_fraction allows: every layer keeps a head group and neurons
    assert all(
        layer.mlp.down_proj.in_features >= 4 and layer.self_attn.q_proj.out_features > 0 for layer in model.model.layers
    )
