"""Decoder families of Hugging Face transformers: what 25% local pruning cuts, and what survives a reload.

One tiny randomly initialised model per family (``from_config``), pruned by L1 with ``scope="local"``:
once with the embedding in ``ignore`` (heads and FFN neurons only) and once with the residual stream too.
Then ``save_pretrained`` → ``AutoModelForCausalLM.from_pretrained`` must give the same logits, cached
``generate`` must equal uncached, and one training step must run. Where a family cannot be cut or cannot
express the cut in its config, :data:`FAMILIES` says why and the test asserts that reason, the warning
given when pruning, that ``lightning_prune.save_pretrained`` → ``lightning_prune.from_pretrained`` reloads
the model instead, and that ``restore`` on a fresh dense model rebuilds it from its record.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass

import pytest
import torch
from nets import removed_zeroed

import lightning_prune as lp
from lightning_prune import apply_cuts, plan_cuts
from lightning_prune.importance import ScoringContext, get_criterion, score
from lightning_prune.integrations.hf_families import FEED_FORWARD, HEAD_SIZE, OUTPUT, QUERY, family
from lightning_prune.selection import select

transformers = pytest.importorskip("transformers")
warnings.filterwarnings("ignore", ".*token_id.*")

# 8 query heads over 4 key/value heads of 6 features: 25% leaves 6 over 3, which 48 (and a 36-wide stream) divides.
STANDARD = {
    "vocab_size": 97, "hidden_size": 48, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 8,
    "num_key_value_heads": 4, "max_position_embeddings": 32, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2,
}  # fmt: skip
TOKENS = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
GEMMA = {"head_dim": 6, "query_pre_attn_scalar": 6}

# The family's code computes the head size as `hidden // heads`: fewer heads over the whole stream reload wrong.
HEAD_SIZE_FROM_HIDDEN = "its code computes the head size as"
# ALiBi slopes are computed for the config's head count: a layer that lost heads reads its kept heads' ones
ALIBI = "its layers read the ALiBi slopes of the dense heads they kept, which no config computes"
FALCON = {**STANDARD, "num_key_value_heads": None, "intermediate_size": None, "ffn_hidden_size": 64}


@dataclass(frozen=True)
class Expected:
    """What 25% local pruning of one family does: True where a structure is cut, else the reason it is not.

    FFN neurons are cut in every family. ``round_trip`` (per case: heads+FFN, with the stream) is True where
    the family's own ``from_pretrained`` gives the same logits, else the reason its config cannot say the
    cut; the config then keeps widths it can build and ``lightning_prune.from_pretrained`` reloads the model
    through the shapes saved beside it.
    """

    config: str
    options: dict
    heads: bool | str = True
    stream: bool | str = True
    round_trip: tuple[bool | str, bool | str] = (True, True)


NO_KV = {"num_key_value_heads": None, "intermediate_size": None}  # families without grouped heads or this name
GPT2 = {"vocab_size": 97, "n_embd": 48, "n_layer": 2, "n_head": 8, "n_positions": 32, "n_inner": 64, **TOKENS}
FAMILIES = {
    "llama": Expected("LlamaConfig", STANDARD),
    "mistral": Expected("MistralConfig", STANDARD),
    "qwen2": Expected("Qwen2Config", STANDARD),
    "qwen3": Expected("Qwen3Config", {**STANDARD, "head_dim": 6}),
    "gemma": Expected("GemmaConfig", {**STANDARD, "head_dim": 6}),
    "gemma2": Expected("Gemma2Config", {**STANDARD, **GEMMA}),
    "gemma3_text": Expected("Gemma3TextConfig", {**STANDARD, **GEMMA}),
    "phi": Expected("PhiConfig", {**STANDARD, "hidden_size": 64}),  # head size 8: its rotary half must be even
    "phi3": Expected("Phi3Config", STANDARD),
    "olmo": Expected("OlmoConfig", STANDARD),  # its weight-free LayerNorms follow a cut stream
    "olmo2": Expected("Olmo2Config", STANDARD),
    "cohere": Expected("CohereConfig", STANDARD),
    "granite": Expected("GraniteConfig", STANDARD),
    "stablelm": Expected("StableLmConfig", STANDARD, round_trip=(HEAD_SIZE_FROM_HIDDEN, True)),
    "gpt2": Expected("GPT2Config", GPT2, round_trip=(HEAD_SIZE_FROM_HIDDEN, True)),
    "gpt_neox": Expected("GPTNeoXConfig", {**STANDARD, **NO_KV, "intermediate_size": 64},
                         round_trip=(HEAD_SIZE_FROM_HIDDEN, True)),
    "opt": Expected("OPTConfig", {**STANDARD, **NO_KV, "ffn_dim": 64, "word_embed_proj_dim": 48},
                    round_trip=(HEAD_SIZE_FROM_HIDDEN, True)),
    "falcon": Expected("FalconConfig", FALCON, round_trip=(HEAD_SIZE_FROM_HIDDEN, True)),  # multi-query
    "falcon_heads": Expected("FalconConfig", {**FALCON, "multi_query": False},
                             round_trip=(HEAD_SIZE_FROM_HIDDEN, True)),
    "falcon_grouped": Expected("FalconConfig", {**FALCON, "new_decoder_architecture": True, "num_kv_heads": 4},
                               round_trip=(HEAD_SIZE_FROM_HIDDEN, True)),
    "falcon_alibi": Expected("FalconConfig", {**FALCON, "alibi": True}, round_trip=(ALIBI, ALIBI)),
}  # fmt: skip


def build(name: str) -> torch.nn.Module:
    expected = FAMILIES[name]
    config_class = getattr(transformers, expected.config, None)
    if config_class is None:
        pytest.skip(f"transformers {transformers.__version__} has no {expected.config}")
    torch.manual_seed(0)
    options = {k: v for k, v in expected.options.items() if v is not None}
    return transformers.AutoModelForCausalLM.from_config(config_class(**options)).eval()


def ids() -> torch.Tensor:
    return torch.randint(3, 97, (2, 8), generator=torch.Generator().manual_seed(0))


def widths(config) -> tuple[int, int, int]:
    """Query heads, FFN width and stream width, as the config records them."""
    return config.num_attention_heads, getattr(config, family(config).ffn), config.hidden_size


def measured(model: torch.nn.Module) -> tuple[int, int, int]:
    """Query rows, FFN width and stream width, as the weights of the first layer have them."""
    first = {name.rsplit(".", 1)[-1]: m for name, m in model.named_modules() if re.search(r"\b(layers|h)\.0\.", name)}

    def rows(names: dict) -> int:
        leaf = next(leaf for leaf in names if leaf in first)
        weight = first[leaf].weight
        return (weight.shape[1] if type(first[leaf]).__name__ == "Conv1D" else weight.shape[0]) // names[leaf]

    if any(leaf in first for leaf in QUERY):
        query = rows(QUERY)
    else:  # q, k and v fused: the query rows are what the output projection reads
        query = first[next(leaf for leaf in OUTPUT if leaf in first)].weight.shape[1]
    return query, rows(FEED_FORWARD), model.get_input_embeddings().weight.shape[1]


def produced(model: torch.nn.Module) -> dict[str, int]:
    """How many output channels every layer with a weight matrix produces (embeddings: their vectors' width)."""
    widths = {}
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.Tensor) and weight.ndim == 2:
            transposed = type(module).__name__ == "Conv1D" or isinstance(module, torch.nn.Embedding)
            widths[name] = weight.shape[1] if transposed else weight.shape[0]
    return widths


def reasons(result: lp.PruningResult, module: str) -> str:
    """Why the modules whose path contains ``module`` were left whole, in one string."""
    return " | ".join(f"{name}: {reason}" for name, reason in result.unprunable.items() if module in name)


@pytest.mark.parametrize("stream", [False, True], ids=["heads_ffn", "stream"])
@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_family_prunes_reloads_generates_and_trains(name: str, stream: bool, tmp_path) -> None:
    expected = FAMILIES[name]
    model = build(name)
    embedding = next(n for n, m in model.named_modules() if m is model.get_input_embeddings())
    heads, ffn, hidden = widths(model.config)
    query = measured(model)[0]
    head_size = next(getattr(m, n) for m in model.modules() for n in HEAD_SIZE if isinstance(getattr(m, n, None), int))
    outputs = produced(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = lp.prune(
            model,
            {"input_ids": ids(), "use_cache": False},
            0.25,
            "l1",
            scope="local",
            ignore=[] if stream else [embedding],
        )
    said = [str(w.message) for w in caught if "config cannot describe the pruned model" in str(w.message)]
    whole = sorted(name for name, width in produced(model).items() if width == outputs[name])
    assert [name for name in whole if name not in result.unprunable] == []  # every layer left whole says why
    after = measured(model)
    cut = {"heads": after[0] < query, "ffn": after[1] < ffn, "stream": after[2] < hidden}
    assert cut["ffn"] and after[1] == ffn * 3 // 4
    if expected.heads is True:
        assert cut["heads"] and after[0] == query * 3 // 4
    else:
        assert not cut["heads"] and expected.heads in reasons(result, "att")
    if stream and expected.stream is True:
        assert cut["stream"] and after[2] == hidden * 3 // 4
    elif stream:
        assert not cut["stream"] and expected.stream in reasons(result, "o_proj")
    else:
        assert not cut["stream"]

    round_trip = expected.round_trip[stream]
    assert bool(said) == (round_trip is not True)  # a warning exactly where the family's loader cannot rebuild it
    tokens = ids()
    if round_trip is True:  # the config follows the weights
        config_heads = after[0] // head_size if expected.heads is True else heads
        assert widths(model.config) == (config_heads, *after[1:])
        kv_heads = getattr(model.config, "num_key_value_heads", None)  # Falcon's since transformers 5.25 too
        layer_kv = {m.num_kv_heads for m in model.modules() if isinstance(getattr(m, "num_kv_heads", None), int)}
        assert kv_heads in (None, *(layer_kv or {config_heads // 2}))  # what the layers produce (Falcon: 1, all, 1/2)
        assert getattr(model.config, "head_dim", head_size) == head_size
        model.save_pretrained(tmp_path)
        loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
        with torch.no_grad():
            torch.testing.assert_close(
                loaded(input_ids=tokens).logits, model(input_ids=tokens).logits, atol=1e-5, rtol=0
            )
    else:  # the config keeps widths it can build; the saved shapes say the rest
        assert round_trip in said[0] and widths(model.config) == (heads, ffn, hidden)
        assert lp.save_pretrained(model, tmp_path) is False
        with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):
            transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
        loaded = lp.from_pretrained(tmp_path).eval()
        with torch.no_grad():
            assert torch.equal(loaded(input_ids=tokens).logits, model(input_ids=tokens).logits)
        fresh = build(name)  # and the record rebuilds it from a dense model
        with pytest.warns(UserWarning, match="config cannot describe the pruned model"):
            lp.restore(fresh, result.record)
        fresh.load_state_dict(model.state_dict())
        with torch.no_grad():
            assert torch.equal(fresh(input_ids=tokens).logits, model(input_ids=tokens).logits)

    prompt = tokens[:1, :4]
    cached = model.generate(prompt, max_new_tokens=4, do_sample=False, use_cache=True)
    uncached = model.generate(prompt, max_new_tokens=4, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)

    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    model(input_ids=tokens, labels=tokens).loss.backward()
    optimizer.step()


# Families whose heads carry something of their own that a cut must keep exact: per-head q_norm/k_norm (Qwen3,
# Gemma 3), a fused q/k/v projection split at head-count bounds (Phi-3) or interleaved per head (GPT-NeoX), ALiBi
# slopes (Falcon with `alibi`; BLOOM: test_hf_encoders.py).
EQUIVALENT = [
    "llama", "qwen3", "gemma3_text", "phi3", "gpt_neox", "falcon", "falcon_heads", "falcon_grouped", "falcon_alibi"
]  # fmt: skip


@pytest.mark.parametrize("name", EQUIVALENT)
def test_removed_heads_and_neurons_compute_what_zeroed_ones_do(name: str) -> None:
    model = build(name)
    example = {"input_ids": ids(), "use_cache": False}
    graph = lp.build_graph(model, example)
    scores = score(graph.groups, ScoringContext(model), get_criterion("l1"))
    scores = [None if g.normalized else s for g, s in zip(graph.groups, scores, strict=True)]  # heads, FFN
    plan = select(graph.groups, scores, 0.25, scope="local")
    reference = removed_zeroed(model, graph, plan)  # every reader of a removed head or neuron reads zero
    query, ffn, hidden = measured(model)
    cuts = plan_cuts(graph, plan)
    apply_cuts(model, cuts)
    assert measured(model) == (query * 3 // 4, ffn * 3 // 4, hidden)
    lp.verify_pruned(model, example, graph, cuts)
    with torch.no_grad():
        torch.testing.assert_close(model(**example).logits, reference(**example).logits, atol=1e-5, rtol=0)


def test_a_config_that_checks_divisibility_keeps_its_heads_and_the_saved_shapes_say_the_rest(tmp_path) -> None:
    # Llama, Gemma 2/3 and GPT-NeoX configs check hidden_size % num_attention_heads even where head_dim is
    # explicit: 8 heads of 8 cut to 6 over the whole 64-wide stream run, but no such config can be saved.
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**STANDARD, "hidden_size": 64})).eval()
    with pytest.warns(UserWarning, match=r"llama config cannot describe .*\(6\)\), so it keeps the widths it had"):
        lp.prune(
            model, {"input_ids": ids(), "use_cache": False}, 0.25, "l1", scope="local", ignore=["model.embed_tokens"]
        )
    assert model.model.layers[0].self_attn.q_proj.out_features == 48
    config = model.config
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim, config.hidden_size) == (
        8,
        4,
        8,
        64,
    )
    assert lp.save_pretrained(model, tmp_path) is False
    with torch.no_grad():
        assert torch.equal(lp.from_pretrained(tmp_path).eval()(input_ids=ids()).logits, model(input_ids=ids()).logits)


def test_gemma_embedding_scale_follows_a_cut_stream_as_the_reloaded_model_computes_it(tmp_path) -> None:
    model = build("gemma")
    assert float(model.model.embed_tokens.embed_scale) == pytest.approx(48**0.5)
    lp.prune(model, {"input_ids": ids(), "use_cache": False}, 0.25, "l1", scope="local")
    model.save_pretrained(tmp_path)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    scales = [
        (m.model.embed_tokens.scalar_embed_scale, float(m.model.embed_tokens.embed_scale)) for m in (model, loaded)
    ]
    assert scales == [(6.0, 6.0)] * 2  # √36, not the dense √48: no config field carries the dense one


def test_gemma_embedding_scale_is_set_again_after_verification_undid_a_stream_cut() -> None:
    from lightning_prune import apply_cuts, plan_cuts
    from lightning_prune.importance import ScoringContext, get_criterion, score
    from lightning_prune.selection import select

    model = build("gemma")
    example = {"input_ids": ids(), "use_cache": False}
    graph = lp.build_graph(model, example)
    plan = select(graph.groups, score(graph.groups, ScoringContext(model), get_criterion("l1")), 0.25, scope="local")
    cuts = plan_cuts(graph, plan)
    undo = apply_cuts(model, cuts, undoable=True)
    assert float(model.model.embed_tokens.embed_scale) == 6.0
    undo()  # as verification does before it retries with the culprit left whole: here, the stream
    apply_cuts(model, [cut for cut in cuts if ".mlp." in cut.tensor])
    embedding = model.model.embed_tokens
    assert embedding.weight.shape[1] == 48 and float(embedding.embed_scale) == pytest.approx(48**0.5)
    assert model.config.hidden_size == 48


def test_phi3_layers_keep_head_counts_of_their_own_under_global_selection(tmp_path) -> None:
    # Phi-3 splits `qkv_proj` at `config.num_attention_heads` in forward: each cut layer reads its own count
    model = build("phi3")
    with torch.no_grad():
        for parameter in model.model.layers[1].self_attn.parameters():
            parameter.mul_(3)  # layer 1's heads score higher: a global ranking takes heads from layer 0 only
    example = {"input_ids": ids(), "use_cache": False}
    with pytest.warns(UserWarning, match=r"layers of different num_attention_heads: \[6, 8\]"):
        result = lp.prune(model, example, 0.3, "l1", scope="global")
    assert [layer.self_attn.o_proj.in_features // 6 for layer in model.model.layers] == [6, 8]
    assert not [name for name in result.unprunable if ".self_attn." in name]
    assert model.config.num_attention_heads == 8 and model.model.layers[0].self_attn.config.num_attention_heads == 6
    assert lp.save_pretrained(model, tmp_path) is False
    tokens = ids()
    with torch.no_grad():
        assert torch.equal(lp.from_pretrained(tmp_path)(input_ids=tokens).logits, model(input_ids=tokens).logits)
        fresh = build("phi3")
        lp.restore(fresh, result.record)
        fresh.load_state_dict(model.state_dict())
        assert torch.equal(fresh.eval()(input_ids=tokens).logits, model(input_ids=tokens).logits)
    prompt = tokens[:1, :4]
    cached = model.generate(prompt, max_new_tokens=4, do_sample=False, use_cache=True)
    assert torch.equal(cached, model.generate(prompt, max_new_tokens=4, do_sample=False, use_cache=False))
