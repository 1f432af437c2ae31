"""Depth methods on a tiny Llama: angular-distance spans, the deepest-blocks baseline and LaCo's merges, each
against a direct computation, replayed by restore, saved and reloaded, and refusing bad input unchanged."""

from __future__ import annotations

import copy
import math

import lightning.pytorch as pl
import pytest
import torch
from test_llm_pruner import llama, windows

import lightning_prune as lp
from lightning_prune.callbacks import StructuredPruning
from lightning_prune.errors import PruningError

transformers = pytest.importorskip("transformers")


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(input_ids=ids, use_cache=False).logits


def stream(model, calibration: torch.Tensor) -> torch.Tensor:
    """The last position's hidden state entering each layer and leaving the last, by running the layers by hand."""
    inner = model.model
    states = []
    for window in calibration:
        ids = window[None]
        hidden = inner.embed_tokens(ids)
        positions = torch.arange(ids.shape[1])[None]
        embeddings = inner.rotary_emb(hidden, positions)
        mask = torch.full((ids.shape[1], ids.shape[1]), -math.inf).triu(1)[None, None]
        row = [hidden[0, -1]]
        for layer in inner.layers:
            hidden = layer(hidden, attention_mask=mask, position_embeddings=embeddings, position_ids=positions)
            hidden = hidden[0] if isinstance(hidden, tuple) else hidden
            row.append(hidden[0, -1])
        states.append(torch.stack(row))
    return torch.stack(states, 1).double()  # (layers + 1, windows, features)


def test_angular_distances_equal_a_direct_computation() -> None:
    model, calibration = llama(4).eval(), windows(3, 10)
    with torch.no_grad():
        x = stream(model, calibration)
    batches = [{"input_ids": w[None], "use_cache": False} for w in calibration]
    for count in (1, 2, 3):
        cosine = torch.nn.functional.cosine_similarity(x[: 5 - count], x[count:], dim=-1)
        expected = (torch.arccos(cosine.clamp(-1, 1)) / math.pi).mean(-1)
        measured = lp.angular_distances(model, "model.layers", batches, count)
        assert measured.shape == (5 - count,)
        torch.testing.assert_close(measured, expected, rtol=1e-5, atol=1e-6)


def quiet(model, layers: list[int]):
    """Layers that add (almost) nothing to the stream: their output projections are zero."""
    with torch.no_grad():
        for index in layers:
            model.model.layers[index].self_attn.o_proj.weight.zero_()
            model.model.layers[index].mlp.down_proj.weight.mul_(1e-3)
    return model


def test_drop_angular_removes_the_closest_span_and_drop_deepest_the_deepest_but_the_last() -> None:
    model = quiet(llama(5), [1, 2])
    result = lp.drop_angular(model, windows(), 2)
    assert result.removed == [1, 2] and model.config.num_hidden_layers == 3
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == [0, 1, 2]
    deepest = lp.drop_deepest(llama(5), windows(), 2)
    assert deepest.removed == [2, 3] and deepest.layers[0].after == 3


def rdsc(model, base: int, others: list[int]) -> dict[str, torch.Tensor]:
    """θ_base + Σ (θ_other − θ_base) for every linear weight of layer ``base``; everything else stays its own."""
    layers = model.model.layers
    merged = {}
    for name, tensor in layers[base].state_dict().items():
        if name.endswith("proj.weight"):
            tensor = tensor + sum(layers[i].state_dict()[name] - tensor for i in others)
        merged[name] = tensor.clone()
    return merged


def test_a_laco_merge_equals_the_formula_on_the_weights() -> None:
    model = llama(4)
    expected, top = rdsc(model, 0, [1, 2]), copy.deepcopy(model.model.layers[3].state_dict())
    result = lp.laco(model, windows(), merge=2, threshold=-0.99, target=2)
    assert result.removed == [1, 2] and result.merged == {0: [1, 2]}
    assert "[1, 2] merged into 0" in str(result)
    for name, tensor in model.model.layers[0].state_dict().items():
        torch.testing.assert_close(tensor, expected[name], rtol=0, atol=1e-6)
    for name, tensor in model.model.layers[1].state_dict().items():
        assert torch.equal(tensor, top[name])


def test_laco_walks_down_from_the_top_merging_into_what_was_merged_already() -> None:
    model = llama(6)
    original = [copy.deepcopy(layer.state_dict()) for layer in model.model.layers]
    result = lp.laco(model, windows(), merge=1, interval=1, threshold=-0.99, target=3)
    # walk: 4 into 3, then (3+4) into 2, then (2+3+4) into 1; with one layer merged θ_l + (θ_{l+1} − θ_l) = θ_{l+1}
    assert result.removed == [2, 3, 4] and result.merged == {1: [2, 3, 4]}
    for name, tensor in model.model.layers[1].state_dict().items():
        source = original[4] if name.endswith("proj.weight") else original[1]
        torch.testing.assert_close(tensor, source[name], rtol=0, atol=1e-6)


def test_laco_keeps_the_model_when_no_merge_reaches_the_threshold() -> None:
    model = llama(4)
    before = copy.deepcopy(model.state_dict())
    result = lp.laco(model, windows(), merge=2, threshold=1.0)
    assert result.removed == [] and result.record["steps"] == []
    assert all(torch.equal(before[name], tensor) for name, tensor in model.state_dict().items())


def test_laco_failing_half_way_leaves_the_model_as_it_was() -> None:
    model, calibration = llama(5), windows()
    before = copy.deepcopy(model.state_dict())
    calls = []

    def fail_in_the_second_trial(module, args, output) -> None:
        calls.append(1)
        if len(calls) > 2 * len(calibration):  # the reference pass, one trial (kept), then this
            raise RuntimeError("out of memory")

    model.model.norm.register_forward_hook(fail_in_the_second_trial)
    with pytest.raises(RuntimeError, match="out of memory"):
        lp.laco(model, calibration, merge=1, threshold=-0.99)
    assert len(model.model.layers) == 5
    assert all(torch.equal(before[name], tensor) for name, tensor in model.state_dict().items())


@pytest.mark.parametrize(
    "prune",
    [
        pytest.param(lambda model: lp.laco(model, windows(), merge=2, threshold=-0.99, target=2), id="laco"),
        pytest.param(lambda model: lp.drop_angular(model, windows(), 2), id="angular"),
    ],
)
def test_restore_and_saving_rebuild_a_depth_pruned_model_that_still_generates(tmp_path, prune) -> None:
    model = llama(4)
    dense, ids = copy.deepcopy(model), windows(2, 10)
    result = prune(model)
    fresh = copy.deepcopy(dense)
    lp.restore(fresh, result.record)
    fresh.load_state_dict(model.state_dict())
    assert torch.equal(logits(fresh, ids), logits(model, ids))
    model.save_pretrained(tmp_path)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    assert loaded.config.num_hidden_layers == 2
    assert torch.equal(logits(loaded, ids), logits(model, ids))
    prompt = ids[:1, :4]
    cached = model.generate(prompt, max_new_tokens=5, do_sample=False)
    assert cached.shape == (1, 9)
    assert torch.equal(cached, model.generate(prompt, max_new_tokens=5, do_sample=False, use_cache=False))


class Other(torch.nn.Module):
    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda m: lp.laco(m, windows(), merge=1, threshold=-1.0), "`threshold` must be a cosine similarity in"),
        (lambda m: lp.laco(m, windows(), merge=1, threshold=1.5), "in (-1, 1], got 1.5"),
        (lambda m: lp.laco(m, windows(), merge=4), "`merge` 4 exceeds the 3 blocks `model.layers` (4 blocks)"),
        (lambda m: lp.laco(m, windows(), merge=0), "`merge` must be a positive integer, got 0"),
        (lambda m: lp.laco(m, windows(), merge=1, target=0), "`target` (blocks to keep) must be an integer in [1, 3]"),
        (lambda m: lp.laco(m, windows(), merge=1, target=4), "has 4 blocks; got 4"),
        (lambda m: lp.laco(m, windows(), merge=1, lowest=2, highest=1), "`lowest` (2) must not be above `highest` (1)"),
        (lambda m: lp.laco(m, windows(), merge=1, highest=4), "`highest` must be a block of `model.layers` (0..3)"),
        (lambda m: lp.drop_angular(m, windows(), 4), "`count` must be an integer in [0, 4)"),
        (lambda m: lp.drop_deepest(m, windows(), -1), "got -1"),
        (lambda m: lp.drop_angular(m, windows()[0], 1), "`calibration` must be (count, tokens ≥ 2) token ids"),
    ],
)  # fmt: skip
def test_bad_depth_arguments_are_refused_by_name_and_value_with_the_model_unchanged(call, message) -> None:
    model = llama(4)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(PruningError) as raised:
        call(model)
    assert message in str(raised.value)
    assert model.config.num_hidden_layers == 4 and len(model.model.layers) == 4
    assert all(torch.equal(before[name], tensor) for name, tensor in model.state_dict().items())


@pytest.mark.parametrize("call", [lp.laco, lambda m, c, blocks: lp.drop_angular(m, c, 1, blocks=blocks)])
def test_a_stack_of_blocks_of_several_classes_is_refused(call) -> None:
    model = llama(3)
    model.model.layers.append(Other())
    with pytest.raises(
        PruningError, match=r"`blocks` 'model.layers' holds blocks of 2 classes \(LlamaDecoderLayer, Other\)"
    ):
        call(model, windows(), blocks="model.layers")
    assert len(model.model.layers) == 4


def test_laco_refuses_blocks_of_different_widths() -> None:
    model = llama(3)
    lp.prune(model, {"input_ids": windows(1, 8), "use_cache": False}, 0.5, ignore=["model.layers.0", "model.layers.2"])
    with pytest.raises(PruningError, match="different shapes: LaCo merges blocks of equal widths"):
        lp.laco(model, windows(), merge=1)


@pytest.mark.parametrize(
    ("structure", "importance", "options"),
    [("layers", "block_influence", {}), ("layers", "angular", {}), ("laco", "laco", {"merge": 2, "threshold": -0.99})],
)
def test_depth_methods_cut_at_fit_start_on_calibration_batches(structure, importance, options) -> None:
    from test_llm_callbacks import CONFIG, loader, trainer

    pl.seed_everything(0, verbose=False)
    module = lp.CausalLM(config=CONFIG, vocabulary=64, warmup_steps=1)
    pruning = StructuredPruning(
        0.34, importance, structure=structure, when="train_epoch_start", calibration_batches=2, log_table=False,
        options=options,
    )  # fmt: skip
    trainer(1, [pruning], enable_checkpointing=False).fit(module, loader())
    assert len(module.model.model.layers) == 2
    (step,) = lp.applied_record(module)["steps"]
    assert step["layers"][0]["size"] == 3 and len(step["layers"][0]["keep"]) == 2


def test_scheduled_laco_steps_are_cumulative_and_their_records_replay_in_order() -> None:
    model, calibration = llama(4), windows()
    dense = copy.deepcopy(model)
    method = lp.methods.get_method("laco", merge=1, threshold=-0.99)
    statistics = {"batches": [{"input_ids": w[None], "use_cache": False} for w in calibration]}
    example = statistics["batches"][0]
    first = method.step(model, example, 0.25, None, statistics=statistics)
    second = method.step(model, example, 0.5, first.dense, statistics=statistics)
    assert len(model.model.layers) == 2 and first.dense.removed == 1 and second.dense.removed == 2
    fresh = copy.deepcopy(dense)
    lp.restore(fresh, lp.merge_records(first.record, second.record))
    fresh.load_state_dict(model.state_dict())
    assert torch.equal(logits(fresh, calibration), logits(model, calibration))


def test_laco_in_the_callback_refuses_bad_options_and_a_missing_calibration_at_construction() -> None:
    with pytest.raises(PruningError, match=r"`threshold` must be a cosine similarity in \(-1, 1\], got 2"):
        StructuredPruning(0.3, structure="laco", calibration_batches=2, options={"threshold": 2})
    with pytest.raises(PruningError, match="`interval` must be a positive integer, got 0"):
        StructuredPruning(0.3, structure="laco", calibration_batches=2, options={"interval": 0})
    with pytest.raises(PruningError, match="set `calibration_batches`"):
        StructuredPruning(0.3, structure="laco", when="train_epoch_start")


def test_dropping_layers_of_a_wrapped_model_updates_its_config() -> None:
    from test_llm_callbacks import CONFIG

    module = lp.CausalLM(config=CONFIG, vocabulary=64)
    lp.prune_layers(module, module.example_input_array, count=1)
    assert module.model.config.num_hidden_layers == 2


@pytest.mark.parametrize("importance", ["angular", pytest.param("block_influence", marks=pytest.mark.slow)])
def test_ddp_ranks_choose_the_layers_one_process_chooses_on_the_batches_of_all_ranks(tmp_path, importance) -> None:
    import subprocess
    import sys
    from pathlib import Path

    from test_llm_callbacks import CONFIG, loader

    job = Path(__file__).with_name("depth_ddp_job.py")
    done = subprocess.run([sys.executable, job, tmp_path, importance], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    # every rank scored on the same batches: the batches of both ranks (a distributed sampler's halves)
    for mine, theirs in zip(ranks[0]["batches"], ranks[1]["batches"], strict=True):
        assert torch.equal(mine["input_ids"], theirs["input_ids"]) and mine["input_ids"].shape[0] == 4
    rows = torch.cat([batch["input_ids"] for batch in ranks[0]["batches"]])
    everything = torch.cat([batch["input_ids"] for batch in loader()])
    assert sorted(map(tuple, rows.tolist())) == sorted(map(tuple, everything.tolist()))
    assert ranks[0]["record"] == ranks[1]["record"]
    # and chose what one process chooses on them, from the same initial weights
    pl.seed_everything(0, verbose=False)
    module = lp.CausalLM(config=CONFIG, vocabulary=64, warmup_steps=1)
    method = lp.methods.get_method("layers", importance=importance, calibration_batches=2)
    batches = ranks[0]["batches"]
    result = method.step(module, batches[0], 0.34, None, statistics={"batches": batches})
    (step,) = ranks[0]["record"]["steps"]
    assert result.record["steps"][0]["layers"] == step["layers"]
