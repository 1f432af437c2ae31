"""Attention heads, FFN neurons and the residual stream of transformers, discovered by tracing."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from nets import removed_zeroed
from torch import nn

import lightning_prune as lp
from lightning_prune import apply_cuts, plan_cuts
from lightning_prune.importance import ScoringContext, get_criterion, score
from lightning_prune.selection import Plan, select

transformers = pytest.importorskip("transformers")
warnings.filterwarnings("ignore", ".*token_id.*")


class GroupedQueryAttention(nn.Module):
    """Hand-written attention with grouped query heads and ``view(..., -1, head_dim)``."""

    def __init__(self, dim: int = 32, heads: int = 4, kv_heads: int = 2) -> None:
        super().__init__()
        self.head_dim, self.repeat = dim // heads, heads // kv_heads
        self.q = nn.Linear(dim, heads * self.head_dim)
        self.k = nn.Linear(dim, kv_heads * self.head_dim)
        self.v = nn.Linear(dim, kv_heads * self.head_dim)
        self.o = nn.Linear(heads * self.head_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = (p(x).view(b, n, -1, self.head_dim).transpose(1, 2) for p in (self.q, self.k, self.v))
        k, v = (t.repeat_interleave(self.repeat, dim=1) for t in (k, v))
        return self.o(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, -1))


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(8, 32)
        self.norm = nn.LayerNorm(32)
        self.attention = GroupedQueryAttention()
        self.up = nn.Linear(32, 64)
        self.down = nn.Linear(64, 32)
        self.head = nn.Linear(32, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        x = x + self.attention(self.norm(x))
        x = x + self.down(F.gelu(self.up(x)))
        return self.head(x.mean(1))


def llama() -> nn.Module:
    config = transformers.LlamaConfig(
        vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=8,
        num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(config)


def bert() -> nn.Module:
    config = transformers.BertConfig(
        vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=64,
    )  # fmt: skip
    return transformers.BertForSequenceClassification(config)


def gpt2() -> nn.Module:
    config = transformers.GPT2Config(vocab_size=97, n_embd=64, n_layer=2, n_head=4, n_positions=64)
    return transformers.GPT2LMHeadModel(config)


def inputs() -> dict:
    return {"input_ids": torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(0)), "use_cache": False}


def head_groups(graph: lp.DependencyGraph, projection: str) -> list:
    return [g for g in graph.groups if any(m.slot.tensor.endswith(projection) for m in g.members_with_role("out"))]


def test_grouped_query_heads_are_one_group_per_key_value_head() -> None:
    graph = lp.build_graph(Block(), torch.randn(2, 5, 8))
    (heads,) = head_groups(graph, "attention.q.weight")
    assert heads.width == 2  # two KV heads, each with its two query heads
    rows = {m.slot.tensor: m.positions.numel() for m in heads.members}
    assert rows == {
        "attention.q.weight": 32, "attention.q.bias": 32, "attention.k.weight": 16, "attention.k.bias": 16,
        "attention.v.weight": 16, "attention.v.bias": 16, "attention.o.weight": 32,
    }  # fmt: skip


@pytest.mark.parametrize(
    ("make", "example", "projection", "heads"),
    [
        (Block, lambda: torch.randn(2, 5, 8), "attention.q.weight", 2),
        (llama, inputs, "self_attn.q_proj.weight", 2),
        (bert, inputs, "attention.self.query.weight", 4),
        (gpt2, inputs, "attn.c_attn.weight", 4),
    ],
    ids=["hand_written_gqa", "llama_gqa", "bert", "gpt2_fused_qkv"],
)
def test_removing_heads_and_neurons_equals_zeroing_them(make, example, projection: str, heads: int) -> None:
    torch.manual_seed(0)
    model, x = make().eval(), example()
    graph = lp.build_graph(model, x)
    assert all(g.width == heads for g in head_groups(graph, projection))
    scores = score(graph.groups, ScoringContext(model), get_criterion("l1"))
    scores = [None if g.normalized else s for g, s in zip(graph.groups, scores, strict=True)]  # heads, FFN
    plan = select(graph.groups, scores, 0.5, scope="local")
    assert plan.count > 0 and all(g.index in plan.removed for g in head_groups(graph, projection))
    reference = removed_zeroed(model, graph, plan)
    cuts = plan_cuts(graph, plan)
    apply_cuts(model, cuts)
    lp.verify_pruned(model, x, graph, cuts)
    run = (lambda m: m(**x).logits) if isinstance(x, dict) else (lambda m: m(x))
    with torch.no_grad():
        actual, expected = run(model), run(reference)
    assert float((actual - expected).norm() / expected.norm()) < 1e-5


@pytest.mark.parametrize("make", [llama, bert, gpt2], ids=["llama", "bert", "gpt2"])
def test_hugging_face_models_prune_heads_ffn_and_stream_and_train(make) -> None:
    torch.manual_seed(0)
    model = make()
    result = lp.prune(model, inputs(), 0.5, scope="local")
    pruned = {c.module.rsplit(".", 1)[-1] for c in result.layers}
    assert result.params_after < 0.5 * result.params_before
    assert pruned & {"q_proj", "query", "c_attn"} and pruned & {"up_proj", "intermediate", "dense", "c_fc"}
    model.train()
    output = model(**inputs(), labels=torch.randint(0, 2, (2,)) if make is bert else inputs()["input_ids"])
    output.loss.backward()


@pytest.mark.parametrize("batch_first", [True, False])
def test_multi_head_attention_heads_are_removed_exactly(batch_first: bool) -> None:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(32, 4, dim_feedforward=64, dropout=0.0, batch_first=batch_first)
    model = nn.Sequential(nn.Linear(8, 32), layer, nn.Linear(32, 3)).eval()
    x = torch.randn(2, 5, 8) if batch_first else torch.randn(5, 2, 8)
    graph = lp.build_graph(model, x)
    (heads,) = head_groups(graph, "self_attn.in_proj_weight")
    assert heads.width == 4
    scores = score(graph.groups, ScoringContext(model), get_criterion("l1"))
    scores = [None if g.normalized else s for g, s in zip(graph.groups, scores, strict=True)]
    plan = select(graph.groups, scores, 0.5, scope="local")
    reference = removed_zeroed(model, graph, plan)
    cuts = plan_cuts(graph, plan)
    apply_cuts(model, cuts)
    lp.verify_pruned(model, x, graph, cuts)
    attention = model[1].self_attn
    assert type(attention).__name__ == "PrunedMultiheadAttention" and attention.num_heads == 2
    with torch.no_grad():
        assert float((model(x) - reference(x)).norm() / reference(x).norm()) < 1e-5
    stream = model[0](x)
    with torch.no_grad():
        explicit, weights = attention(stream, stream, stream)  # need_weights=True, like nn.MultiheadAttention
        fused, none = attention(stream, stream, stream, need_weights=False)
    assert weights.shape == (2, 5, 5) and none is None and torch.allclose(explicit, fused, atol=1e-6)


def assert_restores(fresh: nn.Module, dense: dict, result: lp.PruningResult, model: nn.Module, x: torch.Tensor) -> None:
    """A freshly built dense model with the dense weights, given the record and the pruned weights, equals ``model``."""
    fresh.eval().load_state_dict(dense)
    lp.restore(fresh, result.record)
    fresh.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))


def test_vision_transformer_heads_prune_and_restore() -> None:
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.vit_b_16(weights=None, num_classes=10, image_size=64).eval()
    dense = copy.deepcopy(model.state_dict())
    x = torch.randn(2, 3, 64, 64)
    result = lp.prune(model, x, 0.4, scope="local")
    assert [layer.self_attention.num_heads for layer in model.encoder.layers] == [8] * 12
    assert model.hidden_dim == model.conv_proj.out_channels < 768 and result.macs_after < 0.5 * result.macs_before
    assert_restores(torchvision.models.vit_b_16(weights=None, num_classes=10, image_size=64), dense, result, model, x)
    model.train()
    model(x).sum().backward()


def small_swin(v2: bool) -> nn.Module:
    from torchvision.models import swin_transformer as swin

    blocks = {"block": swin.SwinTransformerBlockV2, "downsample_layer": swin.PatchMergingV2} if v2 else {}
    return swin.SwinTransformer([4, 4], 32, [2, 2], [2, 4], [4, 4], num_classes=10, **blocks)


def small_maxvit() -> nn.Module:
    from torchvision.models import maxvit

    return maxvit.MaxVit((32, 32), 16, 2, [16, 32], [1, 1], head_dim=8, stochastic_depth_prob=0.0, num_classes=10)


WINDOWED = {
    "swin": (lambda: small_swin(False), 40),  # 10x10 tokens: padded to 12x12, shifted windows with a mask
    "swin_v2": (lambda: small_swin(True), 32),
    "maxvit": (small_maxvit, 32),
}


@pytest.mark.parametrize("name", sorted(WINDOWED))
def test_windowed_attention_heads_are_removed_exactly(name: str) -> None:
    # torchvision's Swin and MaxViT attention cannot run with fewer heads: a cut replaces it by a layer
    # holding the same parameters, which must compute what the dense model computes with the heads zeroed.
    pytest.importorskip("torchvision")
    make, size = WINDOWED[name]
    torch.manual_seed(0)
    model = make().eval()
    x = torch.randn(2, 3, size, size)
    graph = lp.build_graph(model, x)
    heads = [
        g
        for g in graph.groups
        if g.width in (2, 4) and any("qkv.weight" in m.slot.tensor for m in g.members_with_role("out"))
    ]
    assert len(heads) == 4
    ffn = [g for g in graph.groups if g.width in (64, 128, 256) and not g.normalized]
    plan = Plan({**{g.index: [g.width - 1] for g in heads}, **{g.index: list(range(0, g.width, 3)) for g in ffn}})
    reference = removed_zeroed(model, graph, plan)
    cuts = plan_cuts(graph, plan)
    apply_cuts(model, cuts)
    lp.verify_pruned(model, x, graph, cuts)
    replaced = [m for m in model.modules() if type(m).__name__.startswith("Pruned")]
    assert len(replaced) == 4 and sorted(getattr(m, "num_heads", getattr(m, "n_heads", 0)) for m in replaced) == [
        1,
        1,
        3,
        3,
    ]
    with torch.no_grad():
        assert float((model(x) - reference(x)).norm() / reference(x).norm()) < 1e-5
    assert set(model.state_dict()) == set(reference.state_dict())


@pytest.mark.parametrize("name", sorted(WINDOWED))
def test_windowed_attention_prunes_trains_and_restores(name: str) -> None:
    make, size = WINDOWED[name]
    torch.manual_seed(0)
    model = make().eval()
    dense = copy.deepcopy(model.state_dict())
    x = torch.randn(2, 3, size, size)
    result = lp.prune(model, x, 0.4, importance="taylor", batches=[x], loss_fn=lambda m, b: m(b).logsumexp(-1).mean())
    assert not [reason for reason in result.unprunable.values() if "does not follow" in reason]
    assert result.macs_after < 0.7 * result.macs_before
    assert_restores(make(), dense, result, model, x)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(x).logsumexp(-1).mean().backward()
    optimizer.step()
    lp.prune(model, x, 0.3, scope="local")  # a second step traces the replacement layers
    with torch.no_grad():
        assert model.eval()(x).shape == (2, 10)


@pytest.mark.parametrize("make", [llama, bert, gpt2], ids=["llama", "bert", "gpt2"])
def test_uniform_pruning_round_trips_through_save_pretrained(make, tmp_path) -> None:
    torch.manual_seed(0)
    model = make().eval()
    heads = model.config.num_attention_heads
    lp.prune(model, inputs(), 0.5, scope="local")
    assert model.config.num_attention_heads == heads // 2 and model.config.hidden_size == 32
    model.save_pretrained(tmp_path)
    loaded = type(model).from_pretrained(tmp_path).eval()
    ids = inputs()["input_ids"]
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, loaded(input_ids=ids).logits)


def test_pruned_llama_generates_the_same_with_and_without_its_cache() -> None:
    torch.manual_seed(0)
    model = llama().eval()
    lp.prune(model, inputs(), 0.5, scope="local")
    assert model.config.num_key_value_heads == 1 and model.config.num_attention_heads == 4
    prompt = inputs()["input_ids"][:1, :4]
    cached = model.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=True)
    uncached = model.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)


def test_layers_of_different_widths_keep_the_dense_config_and_restore() -> None:
    torch.manual_seed(0)
    model = llama().eval()
    dense = copy.deepcopy(model.state_dict())
    with pytest.warns(UserWarning, match=r"llama config cannot describe .*layers of different intermediate_size"):
        result = lp.prune(model, inputs(), 0.6)  # global ranking: the two layers end up with different widths
    widths = {m.out_features for n, m in model.named_modules() if n.endswith("mlp.up_proj")}
    assert len(widths) == 2 and model.config.intermediate_size == 96
    fresh = llama().eval()
    fresh.load_state_dict(dense)
    lp.restore(fresh, result.record)
    fresh.load_state_dict(model.state_dict())
    ids = inputs()["input_ids"]
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, fresh(input_ids=ids).logits)


def test_an_attention_implementation_without_rules_keeps_its_heads_and_says_where() -> None:
    # A registered attention function calling an op the engine has no rule for: its heads stay whole
    # (named with the op and the module in `unprunable`), the FFN neurons are still pruned, and the
    # model keeps running with its own attention code.
    def opaque(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        key, value = (t.repeat_interleave(module.num_key_value_groups, 1) for t in (key, value))
        out, _ = torch.ops.aten._scaled_dot_product_attention_math(query, key, value, is_causal=True, scale=scaling)
        return out.transpose(1, 2).contiguous(), None

    transformers.AttentionInterface.register("lightning_prune_test_opaque", opaque)
    torch.manual_seed(0)
    model = llama()
    model.config._attn_implementation = "lightning_prune_test_opaque"
    model.eval()
    result = lp.prune(model, inputs(), 0.5, scope="local")
    for index, layer in enumerate(model.model.layers):
        assert layer.self_attn.q_proj.out_features == 64 and layer.self_attn.k_proj.out_features == 16
        reason = result.unprunable[f"model.layers.{index}.self_attn.q_proj"]
        assert reason == f"unsupported op `_scaled_dot_product_attention_math` in `model.layers.{index}.self_attn`"
        assert layer.mlp.up_proj.out_features == 48
    with torch.no_grad():
        assert model(**inputs()).logits.shape == (2, 12, 97)


def test_query_heads_that_no_longer_share_key_value_heads_evenly_are_named() -> None:
    # 8 query heads over 2 key/value heads; a (crafted) record removes one query head only: 7 cannot be
    # split evenly over 2 key/value heads. The error names the attention module; nothing is changed.
    from lightning_prune.cuts import Cut
    from lightning_prune.errors import PruningError
    from lightning_prune.record import new_record

    torch.manual_seed(0)
    model = llama().eval()
    before = copy.deepcopy(model.state_dict())
    keep = list(range(8, 64))  # head 0 of layer 0 (rows 0-7, head size 8) goes
    record = new_record(
        [
            [
                Cut("model.layers.0.self_attn.q_proj.weight", 0, 64, keep),
                Cut("model.layers.0.self_attn.o_proj.weight", 1, 64, keep),
            ]
        ]
    )
    message = r"`layers\.0\.self_attn` of LlamaModel: 56 query rows and 16 key rows"
    with pytest.raises(PruningError, match=message) as error:
        lp.restore(model, record)
    assert error.value.module == "layers.0.self_attn"  # inside model.model, the LlamaModel
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before) and set(before) == set(after)
    assert model.model.layers[0].self_attn.num_key_value_groups == 4 and model.config.num_attention_heads == 8
    with torch.no_grad():
        assert model(**inputs()).logits.shape == (2, 12, 97)
