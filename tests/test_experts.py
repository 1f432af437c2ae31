"""Mixtures of experts (Mixtral, Qwen3-MoE): each expert's FFN neurons, and whole experts with their router rows.

Tiny configs, random weights. Widths stay multiples of 4: ``torch._grouped_mm`` (the experts' default kernel)
needs 16-byte strides.
"""

from __future__ import annotations

import pytest
import torch
from nets import removed_zeroed

import lightning_prune as lp
from lightning_prune import apply_cuts, plan_cuts
from lightning_prune.importance import ScoringContext, get_criterion, score
from lightning_prune.selection import select

transformers = pytest.importorskip("transformers")

COMMON = dict(
    vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    num_experts_per_tok=2, max_position_embeddings=64,
)  # fmt: skip
CONFIGS = {
    "mixtral": ("MixtralConfig", dict(intermediate_size=32, num_local_experts=4), "intermediate_size"),
    "qwen3_moe": (
        "Qwen3MoeConfig",
        dict(intermediate_size=48, moe_intermediate_size=32, num_experts=4, head_dim=8, mlp_only_layers=[1]),
        "moe_intermediate_size",
    ),
}


def build(name: str, **options) -> torch.nn.Module:
    config_class, extra, _ = CONFIGS[name]
    torch.manual_seed(0)
    config = getattr(transformers, config_class)(**{**COMMON, **extra, **options})
    return transformers.AutoModelForCausalLM.from_config(config).eval()


def ids() -> torch.Tensor:
    return torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))


def experts_of(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for m in model.modules() if type(m).__name__.endswith("Experts")]


def is_expert_group(group) -> bool:
    return any(m.slot.tensor.endswith("gate_up_proj") and m.slot.groups > 1 for m in group.members)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_removed_expert_neurons_compute_what_zeroed_ones_do(name: str) -> None:
    model = build(name)
    example = {"input_ids": ids(), "use_cache": False}
    graph = lp.build_graph(model, example)
    experts = [g for g in graph.groups if is_expert_group(g)]
    assert len(experts) == len(experts_of(model)) and all(g.blocks is not None for g in experts)
    assert experts[0].width == 4 * 32  # every expert's neurons are channels of their own
    scores = score(graph.groups, ScoringContext(model), get_criterion("l1"))
    scores = [s if is_expert_group(g) else None for g, s in zip(graph.groups, scores, strict=True)]
    plan = select(graph.groups, scores, 0.25, scope="local")
    reference = removed_zeroed(model, graph, plan)  # each removed neuron's down_proj column reads zero
    cuts = plan_cuts(graph, plan)
    apply_cuts(model, cuts)
    lp.verify_pruned(model, example, graph, cuts)
    for module in experts_of(model):
        assert module.gate_up_proj.shape == (4, 48, 32) and module.down_proj.shape == (4, 32, 24)
        assert module.intermediate_dim == 24
    grouped = next(c for c in cuts if c.tensor.endswith("experts.down_proj") and c.dim == 2)
    kept = torch.tensor(grouped.keep).view(4, -1) % 32
    assert not all(torch.equal(kept[0], row) for row in kept[1:])  # each expert chose its own neurons
    with torch.no_grad():
        torch.testing.assert_close(model(**example).logits, reference(**example).logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_expert_neurons_and_stream_cut_reload_in_the_stock_class_and_train(name: str, tmp_path) -> None:
    model = build(name)
    tokens = ids()
    result = lp.prune(model, {"input_ids": tokens, "use_cache": False}, 0.25, "l1", scope="local")
    for module in experts_of(model):
        assert module.down_proj.shape == (4, 24, 24) and module.gate_up_proj.shape == (4, 48, 24)
    assert getattr(model.config, CONFIGS[name][2]) == 24 and model.config.hidden_size == 24
    assert not [n for n in result.unprunable if n.endswith("experts")]
    assert lp.save_pretrained(model, tmp_path) is True
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=tokens).logits, model(input_ids=tokens).logits, atol=1e-5, rtol=0)
        # and lightning_prune's loader hands a stock folder to the class's own (which reads experts saved one by one)
        assert torch.equal(lp.from_pretrained(tmp_path)(input_ids=tokens).logits, loaded(input_ids=tokens).logits)
    fresh = build(name)  # the record replays the cut on a dense model
    lp.restore(fresh, result.record)
    fresh.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert torch.equal(fresh(input_ids=tokens).logits, model(input_ids=tokens).logits)

    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-2)
    before = model.model.layers[0].mlp.experts.gate_up_proj.detach().clone()
    loss = model(input_ids=tokens, labels=tokens).loss
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss) and not torch.equal(before, model.model.layers[0].mlp.experts.gate_up_proj)


def test_gradient_criteria_score_each_experts_neurons() -> None:
    model = build("mixtral")
    tokens = ids()
    result = lp.prune(
        model,
        {"input_ids": tokens, "use_cache": False},
        0.25,
        "taylor",
        scope="local",
        batches=[tokens],
        loss_fn=lambda m, batch: m(input_ids=batch, labels=batch).loss,
    )
    assert result.channels_removed > 0
    assert all(m.down_proj.shape[2] == 24 for m in experts_of(model))


def never_routed(model: torch.nn.Module, expert: int) -> None:
    """Stream channel 0 holds 0.05 everywhere (the embedding writes it, no layer writes to it), so after each norm it
    is positive for every token; a router row reading it as -10⁴ makes its expert's routing probability exactly 0.
    The other rows do not read it, so that they route by what the tokens carry."""
    with torch.no_grad():
        model.get_input_embeddings().weight[:, 0] = 0.05
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight[0] = 0.0
            if hasattr(layer.mlp, "experts"):
                layer.mlp.experts.down_proj[:, 0, :] = 0.0
                layer.mlp.gate.weight[:, 0] = 0.0
                layer.mlp.gate.weight[expert] = 0.0
                layer.mlp.gate.weight[expert, 0] = -1e4
            else:
                layer.mlp.down_proj.weight[0] = 0.0


@pytest.mark.parametrize("score", ["frequency", "weight"])
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_an_expert_the_router_never_picks_is_removed_and_nothing_changes(name: str, score: str, tmp_path) -> None:
    model = build(name)
    never_routed(model, 1)
    tokens = ids()
    with torch.no_grad():
        dense = model(input_ids=tokens).logits
    result = lp.prune_experts(model, [tokens, tokens.flip(1)], count=1, score=score)
    assert set(map(tuple, result.removed.values())) == {(1,)}
    assert all(values[1] == 0.0 and min(values[:1] + values[2:]) > 0 for values in result.scores.values())
    expert_field = "num_local_experts" if name == "mixtral" else "num_experts"
    assert getattr(model.config, expert_field) == 3 and model.config.num_experts_per_tok == 2
    for module in experts_of(model):
        assert module.num_experts == 3 and module.gate_up_proj.shape[0] == 3
    with torch.no_grad():  # the softmax sums one exact zero fewer: float rounding only (measured: < 3e-8)
        pruned = model(input_ids=tokens).logits
        torch.testing.assert_close(pruned, dense, atol=1e-6, rtol=0)
    assert lp.save_pretrained(model, tmp_path) is True
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    fresh = build(name)
    lp.restore(fresh, result.record)
    fresh.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=tokens).logits, pruned)
        assert torch.equal(fresh(input_ids=tokens).logits, pruned)


def test_experts_by_weight_norm_and_fewer_experts_than_each_token_picks(tmp_path) -> None:
    model = build("mixtral")
    routers = [m for m in model.modules() if type(m).__name__.endswith("TopKRouter")]
    norms = [
        sum(t.detach().abs().flatten(1).sum(1) for t in (m.gate_up_proj, m.down_proj, r.weight))
        for m, r in zip(experts_of(model), routers, strict=True)
    ]
    with pytest.warns(UserWarning, match="each token picks 2 experts and 1 remain"):
        result = lp.prune_experts(model, amount=0.75, score="l1")
    assert [len(r) for r in result.removed.values()] == [3, 3]
    assert [r.top_k for r in routers] == [1, 1] and model.config.num_experts_per_tok == 1
    assert model.config.num_local_experts == 1
    for norm, removed, module, router in zip(norms, result.removed.values(), experts_of(model), routers, strict=True):
        assert removed == sorted(set(range(4)) - {int(norm.argmax())})  # the largest router row and weights stay
        assert module.down_proj.shape[0] == router.weight.shape[0] == 1
    tokens = ids()
    assert lp.save_pretrained(model, tmp_path) is True
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=tokens).logits, model(input_ids=tokens).logits)


def test_expert_pruning_refuses_bad_arguments_and_leaves_the_model_unchanged() -> None:
    model = build("mixtral")
    shapes = {name: p.shape for name, p in model.named_parameters()}
    for options, message in (
        ({"amount": 0.25, "count": 1}, "exactly one of `amount` and `count`"),
        ({"count": 4}, r"`count` must be an integer in \[0, 4\)"),
        ({"amount": 1.0}, "fraction of each layer's experts"),
        ({"count": 1, "score": "often"}, "`score` must be one of frequency, weight, l1"),
        ({"count": 1}, "reads the router on `calibration` batches"),
    ):
        with pytest.raises(lp.PruningError, match=message):
            lp.prune_experts(model, **options)
    assert {name: p.shape for name, p in model.named_parameters()} == shapes
    with pytest.raises(lp.PruningError, match="has no mixture-of-experts layer"):
        lp.prune_experts(torch.nn.Linear(4, 4), count=1, score="l1")


def test_experts_as_a_scheduled_structure_remove_what_is_due_and_replay() -> None:
    from lightning_prune.methods import get_method

    model = build("qwen3_moe")
    tokens = ids()
    method = get_method("experts", score="weight")
    method.check(model, None)
    first = method.step(model, {"input_ids": tokens}, 0.25, None)
    second = method.step(model, {"input_ids": tokens}, 0.5, first.dense)
    assert (first.dense.units, first.dense.removed, second.dense.removed) == (4, 1, 2)
    assert [layer.after for layer in second.layers] == [2] and model.config.num_experts == 2
    assert second.macs_after <= second.macs_before and second.params_after < first.params_before
    fresh = build("qwen3_moe")
    lp.restore(fresh, lp.merge_records(first.record, second.record))
    fresh.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert torch.equal(fresh(input_ids=tokens).logits, model(input_ids=tokens).logits)
    with pytest.raises(lp.PruningError, match="has no mixture-of-experts layer"):
        method.check(torch.nn.Linear(2, 2), None)


def test_experts_a_kernel_cannot_run_at_the_cut_width_stay_whole_and_the_config_stays_dense() -> None:
    # torch._grouped_mm needs 16-byte strides: 24 neurons -> 18 fails, verification undoes the cut and keeps them
    model = build("mixtral", intermediate_size=24)
    result = lp.prune(model, {"input_ids": ids(), "use_cache": False}, 0.25, "l1", scope="local")
    assert "strides" in " ".join(reason for name, reason in result.unprunable.items() if name.endswith("experts"))
    assert all(m.down_proj.shape[2] == 24 for m in experts_of(model)) and model.config.intermediate_size == 24
    assert model.config.hidden_size == model.get_input_embeddings().weight.shape[1]


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_a_router_left_whole_names_itself_and_how_experts_go_instead(name: str) -> None:
    model = build(name)
    result = lp.prune(model, {"input_ids": ids(), "use_cache": False}, 0.25, "l1", scope="local")
    reason = result.unprunable["model.layers.0.mlp.gate"]
    assert reason.startswith("the router picks the top-k of its expert rows") and "`model.layers.0.mlp.gate`" in reason
    assert "lightning_prune.prune_experts" in reason and 'structure="experts"' in reason
    assert model.model.layers[0].mlp.gate.weight.shape[0] == 4  # the rows stay, the stream they read is cut


def test_experts_of_different_widths_per_layer_reload_through_lightning_prune(tmp_path) -> None:
    """Global selection over the experts' neurons, with the first layer's weakest: its experts keep fewer than
    the second's, which no config can say. ``save_pretrained`` keeps the fused experts under the model's own
    names (transformers writes Mixtral's experts one by one, which only its loader at the config's widths reads)."""
    model = build("mixtral")
    tokens = ids()
    with torch.no_grad():
        first = experts_of(model)[0]
        first.down_proj[:, :, :12] *= 0.01
        first.gate_up_proj[:, :12] *= 0.01
        first.gate_up_proj[:, 32:44] *= 0.01
    example = {"input_ids": tokens, "use_cache": False}
    graph = lp.build_graph(model, example)
    scores = score(graph.groups, ScoringContext(model), get_criterion("l1"))
    scores = [s if is_expert_group(g) else None for g, s in zip(graph.groups, scores, strict=True)]
    with pytest.warns(UserWarning, match="MoE layers of different widths"):
        apply_cuts(model, plan_cuts(graph, select(graph.groups, scores, 0.25, scope="global")))
    widths = [m.intermediate_dim for m in experts_of(model)]
    assert widths[0] < widths[1] < 32
    assert lp.save_pretrained(model, tmp_path) is False
    loaded = lp.from_pretrained(tmp_path)
    assert [m.intermediate_dim for m in experts_of(loaded)] == widths
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=tokens).logits, model(input_ids=tokens).logits)
