"""Encoders, encoder-decoders and BLOOM from Hugging Face transformers: what 25% local pruning cuts, and the reload.

As in ``test_families.py``: one tiny randomly initialised model per family, pruned by L1 with ``scope="local"``,
once with the input embedding in ``ignore`` and once without. Where the family's config can say the cut, the
family's own ``from_pretrained`` must give the same logits and the config the widths of the weights; where it
cannot, :data:`FAMILIES` says why, the warning says so too, ``lightning_prune.from_pretrained`` reloads the
model and ``restore`` rebuilds it from its record. Then one training step.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import pytest
import test_families
import torch
from nets import removed_zeroed
from test_families import ALIBI, HEAD_SIZE_FROM_HIDDEN, produced, reasons

import lightning_prune as lp
from lightning_prune import apply_cuts, plan_cuts
from lightning_prune.importance import ScoringContext, get_criterion, score
from lightning_prune.integrations.hf_families import FEED_FORWARD, OUTPUT, QUERY
from lightning_prune.record import new_record
from lightning_prune.selection import select

transformers = pytest.importorskip("transformers")
warnings.filterwarnings("ignore", ".*token_id.*")

TOKENS = {"vocab_size": 97, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
BERT = {"hidden_size": 48, "num_hidden_layers": 2, "num_attention_heads": 8, "intermediate_size": 64}
ENCODER_OUTPUT = "model output"  # an encoder-decoder returns the encoder's last hidden state: its width stays
# DeBERTa-v2 (v3 is the same class): relative positions through the content projections (`share_att_key`, log
# buckets, a LayerNorm over the relative embeddings, the first layer's convolution), or through projections of
# their own (`pos_key_proj`, `pos_query_proj`), whose input is the relative embeddings' columns: a group of its own.
DEBERTA = {**BERT, "max_position_embeddings": 32, "relative_attention": True, "pos_att_type": ["p2c", "c2p"],
           "position_biased_input": False, "vocab_size": 97, "pad_token_id": 0}  # fmt: skip
DEBERTA_SHARED = {"share_att_key": True, "position_buckets": 16, "norm_rel_ebd": "layer_norm", "conv_kernel_size": 3,
                  "conv_act": "gelu", "attention_head_size": 6}  # fmt: skip
# its output projection is `hidden × hidden`: heads cut under a whole stream are not a DeBERTa the config builds
DEBERTA_HEADS = "attention.output.dense.weight` as [48, 48], not [48, 36]"
DEBERTA_POSITIONS = "attention.self.pos_key_proj.weight` as [36, 48], not [36, 36]"  # relative embeddings cut alone


@dataclass(frozen=True)
class Expected:
    """What 25% local pruning does (see ``test_families.Expected``); ``decoder``: the model takes decoder inputs."""

    model: str
    config: str
    options: dict
    heads: bool | str = True
    stream: bool | str = True
    round_trip: tuple[bool | str, bool | str] = (True, True)
    decoder: bool = False


FAMILIES = {
    "t5": Expected("T5ForConditionalGeneration", "T5Config",
                   {"d_model": 48, "d_kv": 6, "d_ff": 64, "num_layers": 2, "num_heads": 8,
                    "decoder_start_token_id": 0, **TOKENS},
                   stream=ENCODER_OUTPUT, decoder=True),
    "bart": Expected("BartForConditionalGeneration", "BartConfig",
                     {"d_model": 48, "encoder_layers": 2, "decoder_layers": 2, "encoder_attention_heads": 8,
                      "decoder_attention_heads": 8, "encoder_ffn_dim": 64, "decoder_ffn_dim": 64,
                      "max_position_embeddings": 32, **TOKENS},
                     stream=ENCODER_OUTPUT, round_trip=(HEAD_SIZE_FROM_HIDDEN, HEAD_SIZE_FROM_HIDDEN), decoder=True),
    # ALBERT's stream starts after its own projection from a 16-wide embedding: it is cut in both cases
    "albert": Expected("AlbertForMaskedLM", "AlbertConfig",
                       {**BERT, "embedding_size": 16, "max_position_embeddings": 32, **TOKENS}),
    "distilbert": Expected("DistilBertForMaskedLM", "DistilBertConfig",
                           {"dim": 48, "n_layers": 2, "n_heads": 8, "hidden_dim": 64, "max_position_embeddings": 32,
                            "vocab_size": 97, "pad_token_id": 0},
                           round_trip=(HEAD_SIZE_FROM_HIDDEN, True)),
    "electra": Expected("ElectraForMaskedLM", "ElectraConfig",
                        {**BERT, "embedding_size": 48, "max_position_embeddings": 32, **TOKENS},
                        round_trip=(HEAD_SIZE_FROM_HIDDEN, True)),
    "deberta_v2": Expected("DebertaV2ForMaskedLM", "DebertaV2Config", {**DEBERTA, **DEBERTA_SHARED},
                           round_trip=(DEBERTA_HEADS, True)),
    "deberta_v2_positions": Expected("DebertaV2ForSequenceClassification", "DebertaV2Config", DEBERTA,
                                     round_trip=(DEBERTA_POSITIONS, True)),
    "bloom": Expected("BloomForCausalLM", "BloomConfig", {"hidden_size": 48, "n_layer": 2, "n_head": 8, **TOKENS},
                      round_trip=(ALIBI, ALIBI)),
}  # fmt: skip


def build(name: str) -> torch.nn.Module:
    expected = FAMILIES[name]
    torch.manual_seed(0)
    return getattr(transformers, expected.model)(getattr(transformers, expected.config)(**expected.options)).eval()


def inputs(name: str) -> dict:
    """Tokens (and decoder tokens); a model that returns its cache traces without it (a cache is an output)."""
    tokens = torch.randint(3, 97, (2, 8), generator=torch.Generator().manual_seed(0))
    if FAMILIES[name].decoder:
        return {"input_ids": tokens, "decoder_input_ids": tokens, "use_cache": False}
    return {"input_ids": tokens, "use_cache": False} if name == "bloom" else {"input_ids": tokens}


def labels(name: str) -> torch.Tensor:
    """Targets of the training step: the tokens, or one class per sequence for a classifier."""
    if FAMILIES[name].model.endswith("SequenceClassification"):
        return torch.tensor([0, 1])
    return inputs(name)["input_ids"]


def widths(model: torch.nn.Module) -> tuple[int, int, int]:
    """Query rows of the first attention layer, and the width and input width (the stream) of the first FFN."""
    modules = dict(model.named_modules())
    ffn = next(
        module
        for name, module in modules.items()
        if (name.rsplit(".", 1)[-1] in FEED_FORWARD or name.endswith("intermediate.dense"))
        and hasattr(module, "weight")
    )
    for module in modules.values():
        query = next((getattr(module, leaf) for leaf in QUERY if hasattr(getattr(module, leaf, None), "weight")), None)
        if query is not None:
            rows = query.weight.shape[0]
            break
        if hasattr(getattr(module, "query_key_value", None), "weight"):  # fused: what the output projection reads
            rows = next(getattr(module, leaf) for leaf in OUTPUT if hasattr(module, leaf)).weight.shape[1]
            break
    return rows, ffn.weight.shape[0], ffn.weight.shape[1]


def logits(model: torch.nn.Module, name: str) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs(name)).logits


@pytest.mark.parametrize("stream", [False, True], ids=["heads_ffn", "stream"])
@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_family_prunes_reloads_and_trains(name: str, stream: bool, tmp_path) -> None:
    expected = FAMILIES[name]
    model = build(name)
    embedding = next(n for n, m in model.named_modules() if m is model.get_input_embeddings())
    dense, outputs = widths(model), produced(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = lp.prune(model, inputs(name), 0.25, "l1", scope="local", ignore=[] if stream else [embedding])
    said = [str(w.message) for w in caught if "config cannot describe the pruned model" in str(w.message)]
    whole = sorted(n for n, width in produced(model).items() if width == outputs[n])
    assert [n for n in whole if n not in result.unprunable] == []  # every layer left whole says why
    query, ffn, hidden = widths(model)
    assert ffn == dense[1] * 3 // 4
    if expected.heads is True:
        assert query == dense[0] * 3 // 4
    else:
        assert query == dense[0] and expected.heads in reasons(result, "att")
    if expected.stream is True and (stream or name == "albert"):
        assert hidden == dense[2] * 3 // 4
    else:
        assert hidden == dense[2]
        if stream:
            assert expected.stream in " | ".join(result.unprunable.values())

    round_trip = expected.round_trip[stream]
    assert bool(said) == (round_trip is not True)
    if round_trip is True:
        assert lp.save_pretrained(model, tmp_path) is True
        loaded = getattr(transformers, expected.model).from_pretrained(tmp_path).eval()
        torch.testing.assert_close(logits(loaded, name), logits(model, name), atol=1e-5, rtol=0)
        assert widths(loaded) == (query, ffn, hidden)
    else:
        assert round_trip in said[0]
        assert lp.save_pretrained(model, tmp_path) is False
        assert torch.equal(logits(lp.from_pretrained(tmp_path), name), logits(model, name))
        fresh = build(name)
        with pytest.warns(UserWarning, match="config cannot describe the pruned model"):
            lp.restore(fresh, result.record)
        fresh.load_state_dict(model.state_dict())
        assert torch.equal(logits(fresh.eval(), name), logits(model, name))

    if expected.decoder or name == "bloom":
        prompt = inputs(name)["input_ids"][:1, :4]
        cached = model.generate(prompt, max_new_tokens=4, do_sample=False, use_cache=True)
        assert torch.equal(cached, model.generate(prompt, max_new_tokens=4, do_sample=False, use_cache=False))
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    model(**inputs(name), labels=labels(name)).loss.backward()
    optimizer.step()


@pytest.mark.parametrize("name", ["t5", "bart", "distilbert", "deberta_v2", "deberta_v2_positions", "bloom"])
def test_removed_heads_and_neurons_compute_what_zeroed_ones_do(name: str) -> None:
    # T5's cross-attention adds a zero position bias of one row per head: it follows the heads left; BLOOM's
    # layers read the ALiBi rows of the heads they kept
    model = build(name)
    graph = lp.build_graph(model, inputs(name))
    scores = score(graph.groups, ScoringContext(model), get_criterion("l1"))
    scores = [None if g.normalized else s for g, s in zip(graph.groups, scores, strict=True)]  # heads, FFN
    plan = select(graph.groups, scores, 0.25, scope="local")
    reference = removed_zeroed(model, graph, plan)
    dense = widths(model)
    cuts = plan_cuts(graph, plan)
    apply_cuts(model, cuts)
    assert widths(model) == (dense[0] * 3 // 4, dense[1] * 3 // 4, dense[2])
    lp.verify_pruned(model, inputs(name), graph, cuts)
    torch.testing.assert_close(logits(model, name), logits(reference, name), atol=1e-5, rtol=0)


ALIBI_MODELS = {"bloom": lambda: build("bloom"), "falcon_alibi": lambda: test_families.build("falcon_alibi")}


@pytest.mark.parametrize("name", sorted(ALIBI_MODELS))
def test_layers_read_the_alibi_slopes_of_the_heads_they_kept(name: str, tmp_path) -> None:
    model = ALIBI_MODELS[name]()
    layers = [layer.self_attention for layer in model.transformer.h]
    with torch.no_grad():  # attention that matters to the logits, so that wrong slopes show
        for layer in layers:
            layer.query_key_value.weight.mul_(10)
            layer.dense.weight.mul_(10)
    example = inputs("bloom")  # the tokens, without a cache
    graph = lp.build_graph(model, example)
    assert lp.save_pretrained(model, tmp_path / "dense") is True  # a dense layer's kept heads are not saved
    scores = score(graph.groups, ScoringContext(model), get_criterion("l1"))
    scores = [None if g.normalized else s for g, s in zip(graph.groups, scores, strict=True)]
    plan = select(graph.groups, scores, 0.25, scope="local")
    reference = removed_zeroed(model, graph, plan)
    dense_keys = set(model.state_dict())
    undo = apply_cuts(model, plan_cuts(graph, plan), undoable=True)
    undo()  # as verification does: the full indices again, and a state dict like the stock one
    assert set(model.state_dict()) == dense_keys
    cuts = plan_cuts(graph, plan)
    apply_cuts(model, cuts)
    kept = [layer.alibi_heads.tolist() for layer in layers]
    assert all(len(heads) == 6 for heads in kept) and any(heads != list(range(6)) for heads in kept)
    # left padding: the ALiBi tensor comes from the mask's positions (cumsum), per sequence
    padded = {"input_ids": example["input_ids"], "attention_mask": torch.ones(2, 8, dtype=torch.long)}
    padded["attention_mask"][0, :3] = 0
    with torch.no_grad():
        expected = reference(**padded).logits
        torch.testing.assert_close(model(**padded).logits, expected, atol=1e-5, rtol=0)
        for layer in layers:  # the first six heads' slopes instead: a different model
            layer.alibi_heads.copy_(torch.arange(6))
        assert (model(**padded).logits - expected).abs().max() > 1e-2
        for layer, heads in zip(layers, kept, strict=True):
            layer.alibi_heads.copy_(torch.tensor(heads))
    again = lp.prune(model, example, 0.5, "l1", scope="local")  # a second step cuts them again
    assert [layer.alibi_heads.numel() for layer in layers] == [3, 3]
    record = lp.merge_records(new_record([cuts]), again.record)
    assert lp.save_pretrained(model, tmp_path / "pruned") is False
    with torch.no_grad():
        assert torch.equal(lp.from_pretrained(tmp_path / "pruned")(**padded).logits, model(**padded).logits)
        fresh = ALIBI_MODELS[name]()
        lp.restore(fresh, record)
        fresh.load_state_dict(model.state_dict())
        assert torch.equal(fresh.eval()(**padded).logits, model(**padded).logits)
