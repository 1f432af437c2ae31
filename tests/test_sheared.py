"""Sheared-LLaMA: gates on the real model computing exactly what the cut model computes, the cut reaching the target
shape of a stock model, the expected size, the Lagrangian, and targets refused before anything changes."""

from __future__ import annotations

import pytest
import torch
from test_llm_pruner import llama, windows

import lightning_prune as lp
from lightning_prune.methods.shear_masks import (
    Lagrangian,
    ShearTarget,
    deterministic_gates,
    expected_gates,
    sample_gates,
)
from lightning_prune.methods.sheared import Shearing

TARGETS = [
    {"hidden_size": 24, "num_key_value_heads": 1, "intermediate_size": 20, "num_hidden_layers": 2},
    {"hidden_size": 16},
    {"num_attention_heads": 2},
    {"intermediate_size": 8},
    {"num_hidden_layers": 1},
]


def shape(model) -> dict[str, int]:
    return {name: getattr(model.config, name) for name in ShearTarget.__dataclass_fields__}


def scrambled(shearing: Shearing) -> Shearing:
    """Gates of different strengths, so that the deterministic ones keep values in (0, 1) and pick a real subset."""
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for log_alpha in shearing.log_alpha.values():
            log_alpha.copy_(torch.randn(log_alpha.shape, generator=generator) * 2)
    return shearing


@pytest.mark.parametrize("target", TARGETS, ids=lambda t: "-".join(f"{k[:10]}{v}" for k, v in t.items()))
def test_the_gated_model_in_eval_mode_computes_what_the_cut_model_computes(target, tmp_path) -> None:
    from transformers import AutoModelForCausalLM

    model, ids = llama(), windows(2, 10)
    dense = model(input_ids=ids).logits.detach()
    shearing = scrambled(Shearing(model, target))
    shearing.attach()
    model.eval()
    with torch.no_grad():
        gated = model(input_ids=ids).logits
    assert (gated - dense).abs().max() > 1e-3  # the gates do something
    result = shearing.cut()
    with torch.no_grad():
        cut = model(input_ids=ids).logits
    torch.testing.assert_close(cut, gated, atol=1e-5, rtol=1e-5)
    expected = {**shape(llama()), **ShearTarget.from_any(target).to_dict()}
    if "num_attention_heads" in target:  # two query heads per key/value head: whole groups go
        expected["num_key_value_heads"] = target["num_attention_heads"] // 2
    if "num_key_value_heads" in target:
        expected["num_attention_heads"] = target["num_key_value_heads"] * 2
    assert shape(model) == result.shape == expected
    assert model.model.layers[0].self_attn.q_proj.out_features == expected["num_attention_heads"] * 8
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, cut, atol=1e-5, rtol=1e-5)
    fresh = llama()  # the record replays the cut on a fresh dense model: the state dict then loads
    lp.restore(fresh, result.record)
    fresh.load_state_dict(model.state_dict())


def test_detached_gates_leave_the_model_as_it_was_and_training_samples_give_gate_gradients() -> None:
    model, ids = llama(), windows(2, 10)
    dense = model(input_ids=ids).logits.detach()
    shearing = Shearing(model, TARGETS[0])
    shearing.attach()
    model.train()
    torch.manual_seed(0)
    for _ in range(3):  # a sampled layer gate may be exactly 0 (it then passes no gradient to that layer's gates)
        model(input_ids=ids, labels=ids).loss.backward()
    for key, log_alpha in shearing.log_alpha.items():
        assert log_alpha.grad is not None and log_alpha.grad.abs().sum() > 0, key
    shearing.detach()
    torch.testing.assert_close(model(input_ids=ids).logits, dense)


def test_expected_parameters_are_the_dense_count_with_open_gates_and_the_cut_count_with_decided_gates() -> None:
    model = llama()
    shearing = Shearing(model, TARGETS[0])
    with torch.no_grad():
        for log_alpha in shearing.log_alpha.values():
            log_alpha.fill_(50.0)
    assert shearing.expected()["params"].item() == pytest.approx(lp.count_params(model), rel=1e-6)
    scrambled(shearing)
    decided = shearing.gates(deterministic=True)
    with torch.no_grad():
        for key, log_alpha in shearing.log_alpha.items():
            log_alpha.copy_(torch.where(decided[key] > 0, 50.0, -50.0))
    expected = shearing.expected()
    assert expected["hidden_size"].item() == pytest.approx(24)
    assert expected["num_key_value_heads"].item() == pytest.approx(1)
    assert expected["intermediate_size"].item() == pytest.approx(20)
    assert expected["num_hidden_layers"].item() == pytest.approx(2)
    predicted = expected["params"].item()
    assert predicted == pytest.approx(shearing.cut().params_after, rel=1e-6)


def test_attention_and_mlp_have_their_own_layer_gates_and_whole_layers_are_kept_by_both() -> None:
    import copy

    model, ids = llama(layers=4), windows(2, 10)
    reference = copy.deepcopy(model)
    shearing = Shearing(model, {"num_hidden_layers": 2})
    assert set(shearing.log_alpha) == {"layers_attention", "layers_mlp"}
    with torch.no_grad():  # open gates are exactly 1 and closed ones exactly 0, sampled or not
        shearing.log_alpha["layers_attention"].fill_(50.0)
        shearing.log_alpha["layers_mlp"].copy_(torch.tensor([50.0, -50.0, 50.0, 50.0]))
        reference.model.layers[1].mlp.down_proj.weight.zero_()  # layer 1 without its MLP, its attention kept
    shearing.attach()
    model.train()
    torch.testing.assert_close(model(input_ids=ids).logits, reference(input_ids=ids).logits)
    mlp = lp.count_params(model.model.layers[1].mlp)
    norms = sum(p.numel() for n, p in model.model.layers[1].named_parameters() if "norm" in n)
    expected = shearing.expected()
    assert expected["num_hidden_layers"].item() == pytest.approx(3.5)  # half of layer 1 is gone
    assert expected["params"].item() == pytest.approx(lp.count_params(model) - mlp - norms / 2, rel=1e-6)
    with torch.no_grad():  # attention alone would keep layers 0 and 2; both halves together keep 0 and 3
        shearing.log_alpha["layers_attention"].copy_(torch.tensor([3.0, -5.0, 1.0, 0.0]))
        shearing.log_alpha["layers_mlp"].copy_(torch.tensor([3.0, 4.0, -2.0, 0.5]))
    model.eval()
    with torch.no_grad():
        gated = model(input_ids=ids).logits
    assert shearing.step().drops[0].keep == [0, 3]
    shearing.cut()
    assert model.config.num_hidden_layers == 2
    with torch.no_grad():  # each kept half folded its own gate value
        torch.testing.assert_close(model(input_ids=ids).logits, gated, atol=1e-5, rtol=1e-5)


def test_hard_concrete_gates_follow_the_papers_formulas() -> None:
    torch.manual_seed(0)
    log_alpha = torch.tensor([-3.0, 0.0, 2.0]).repeat_interleave(20000).reshape(3, -1)
    samples = sample_gates(log_alpha)
    assert samples.min() == 0 and samples.max() == 1  # the stretch reaches both ends
    nonzero = (samples > 0).float().mean(1)
    torch.testing.assert_close(nonzero, expected_gates(log_alpha[:, 0]), atol=0.01, rtol=0)
    gates = deterministic_gates(torch.tensor([0.5, -1.0, 3.0, 0.0]), 2)
    assert (gates > 0).tolist() == [True, False, True, False]
    assert gates[2].item() == pytest.approx(torch.sigmoid(torch.tensor(3.0 / (2 / 3) * 0.8)).item())


def test_the_lagrangian_warms_its_target_up_and_its_gradient_on_the_multipliers_is_the_gap() -> None:
    lagrangian = Lagrangian({"hidden_size": 100}, {"hidden_size": 60}, warmup=10)
    assert lagrangian.target_at("hidden_size", 0) == 100
    assert lagrangian.target_at("hidden_size", 5) == 80
    assert (
        Lagrangian({"hidden_size": 100}, {"hidden_size": 60}, 10, {"hidden_size": 80}).target_at("hidden_size", 5) == 70
    )
    assert lagrangian.target_at("hidden_size", 50) == 60
    value = lagrangian({"hidden_size": torch.tensor(90.0)}, 5)
    value.backward()
    first, second = lagrangian.multipliers["hidden_size_1"], lagrangian.multipliers["hidden_size_2"]
    assert first.grad.item() == pytest.approx(0.1) and second.grad.item() == pytest.approx(0.01)
    assert second.item() == 100.0  # the default damping
    lagrangian.ascend(2.0)  # plain ascent: λ moves by lr × gap (its square for λ₂), the gradients cleared
    assert first.item() == pytest.approx(0.2) and second.item() == pytest.approx(100.02)
    assert first.grad is None and second.grad is None
    with pytest.raises(lp.PruningError, match=r"`damping` must be a non-negative number, got -1"):
        Lagrangian({"hidden_size": 100}, {"hidden_size": 60}, 10, damping=-1)


def test_shear_trains_the_gates_to_the_target_and_cuts_to_it() -> None:
    model = llama(layers=2)
    target = {"hidden_size": 16, "intermediate_size": 24}
    torch.manual_seed(0)
    result = lp.shear(model, target, list(windows(8, 12).split(2)), steps=60)  # the defaults a user gets
    assert shape(model)["hidden_size"] == 16 and shape(model)["intermediate_size"] == 24
    assert len(result.history) == 60 and result.history[0]["hidden_size"] > 24  # open gates: most of 32
    last = result.history[-1]  # the expected counts end on the target, not past it (held for the last 30 steps)
    assert last["hidden_size"] == pytest.approx(16, rel=0.05) and last["intermediate_size"] == pytest.approx(
        24, rel=0.05
    )
    assert all(h["hidden_size"] > 16 * 0.85 for h in result.history)  # no overshoot on the way
    assert result.history[-1]["params"] < 0.8 * result.history[0]["params"]


@pytest.mark.slow
def test_without_damping_the_expected_counts_overshoot_the_target() -> None:
    """The reason for ``damping``: with ``λ₂`` starting at 0 the multiplier is an integral of the gap alone, and
    the gates (Adam, moving at their own pace) go far past the target before ``λ₁`` turns."""
    model = llama(layers=2)
    torch.manual_seed(0)
    result = lp.shear(model, {"hidden_size": 16, "intermediate_size": 24}, list(windows(8, 12).split(2)), 60, damping=0)
    assert min(h["hidden_size"] for h in result.history) < 16 * 0.7


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ({"hidden_size": 40}, r"`hidden_size`=40 is larger than the model's 32"),
        ({"intermediate_size": 0}, r"`intermediate_size` must be a positive integer, got 0"),
        ({"num_attention_heads": 3}, r"`num_attention_heads`=3 is not a multiple of the model's 2"),
        ({"num_attention_heads": 4, "num_key_value_heads": 1}, r"ratio of 2 .*`num_attention_heads`=2"),
        ({"hidden_size": 30}, r"family refuses: .*hidden size \(30\) is not a multiple.*heads \(4\)"),
        ({"hiden_size": 30}, r"unknown field\(s\) \['hiden_size'\]"),
        ({}, r"`target` names no field"),
    ],
)
def test_bad_targets_are_refused_naming_the_field_and_the_model_is_unchanged(target, message) -> None:
    model = llama()
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    with pytest.raises(lp.PruningError, match=message):
        Shearing(model, target)
    assert all(torch.equal(before[name], tensor) for name, tensor in model.state_dict().items())


def test_a_hugging_face_config_is_a_target() -> None:
    from transformers import LlamaConfig

    model = llama()
    config = LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1,
    )  # fmt: skip
    Shearing(model, config).cut()
    assert shape(model) == {
        "hidden_size": 16, "num_attention_heads": 2, "num_key_value_heads": 1, "intermediate_size": 24,
        "num_hidden_layers": 2,
    }  # fmt: skip
