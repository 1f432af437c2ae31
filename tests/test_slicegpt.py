"""SliceGPT: norm fusion and rotations leave the function unchanged; slicing a stream that lives in k dimensions is
exact; the sliced model is a stock model that reloads; bad input leaves the model as it was."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

import lightning_prune as lp
from lightning_prune.methods.decoder_families import stream_layout
from lightning_prune.methods.rotation import fuse_norms, rotate_stream
from lightning_prune.methods.slicegpt import kept_width


def decoder(family: str = "llama", tied: bool = False, bias: bool = False) -> nn.Module:
    """A tiny random decoder (D = 32, 4 query / 2 KV heads) with norm scales that are not ones."""
    import transformers

    config_class, model_class = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    }[family]
    torch.manual_seed(0)
    extra = {"attention_bias": bias} if family == "llama" else {}
    config = config_class(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=tied, **extra,
    )  # fmt: skip
    model = model_class(config).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                parameter.copy_(torch.rand_like(parameter) + 0.5)
    return model


def windows(count: int = 4, tokens: int = 12) -> torch.Tensor:
    return torch.randint(0, 64, (count, tokens), generator=torch.Generator().manual_seed(1))


@pytest.fixture
def float64_norms(monkeypatch):
    """HF's RMS norms compute in float32 whatever the input; in these float64 tests they keep the input's dtype."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    from transformers.models.mistral.modeling_mistral import MistralRMSNorm
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm

    def forward(self, hidden_states):
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        return self.weight * hidden_states * torch.rsqrt(variance + self.variance_epsilon)

    for norm in (LlamaRMSNorm, MistralRMSNorm, Qwen2RMSNorm):
        monkeypatch.setattr(norm, "forward", forward)


def logits(model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=inputs, use_cache=False).logits


@pytest.mark.parametrize("tied", [False, True])
def test_folding_the_norms_into_their_readers_leaves_the_logits_unchanged(float64_norms, tied: bool) -> None:
    model, inputs = decoder(tied=tied).double(), windows()
    expected = logits(model, inputs)
    fuse_norms(model, stream_layout(model))
    assert all(torch.equal(m.weight, torch.ones_like(m.weight)) for n, m in model.named_modules() if "norm" in n)
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    assert not model.config.tie_word_embeddings
    assert torch.allclose(logits(model, inputs), expected, rtol=0, atol=1e-10)


@pytest.mark.parametrize(("family", "bias"), [("llama", False), ("llama", True), ("mistral", False), ("qwen2", False)])
def test_a_random_rotation_with_nothing_sliced_leaves_the_logits_unchanged(float64_norms, family, bias) -> None:
    model, inputs = decoder(family, bias=bias).double(), windows()
    expected = logits(model, inputs)
    rotation, _ = torch.linalg.qr(torch.randn(32, 32, generator=torch.Generator().manual_seed(2), dtype=torch.float64))
    rotate_stream(model, stream_layout(model), rotation)
    assert not torch.allclose(
        model.model.embed_tokens.weight, decoder(family, bias=bias).double().model.embed_tokens.weight
    )
    assert torch.allclose(logits(model, inputs), expected, rtol=0, atol=1e-9)


def confined(model: nn.Module, kept: int) -> nn.Module:
    """``model`` with its stream confined to a random ``kept``-dimensional subspace: the embeddings and every writer
    project onto it, so nothing of the stream lies outside and slicing the rest away must be exact."""
    basis, _ = torch.linalg.qr(torch.randn(32, 32, generator=torch.Generator().manual_seed(3), dtype=torch.float64))
    projection = basis[:, :kept] @ basis[:, :kept].T
    with torch.no_grad():
        model.model.embed_tokens.weight.copy_(model.model.embed_tokens.weight @ projection)
        for layer in model.model.layers:
            for writer in (layer.self_attn.o_proj, layer.mlp.down_proj):
                writer.weight.copy_(projection @ writer.weight)
    return model


@pytest.mark.parametrize("per_layer", [False, True])
def test_slicing_a_stream_that_lives_in_k_dimensions_keeps_the_logits_exactly(float64_norms, per_layer) -> None:
    """Exact only if the norms of the sliced model still average over D: weights sqrt(D/k), ε·D/k."""
    model, inputs = confined(decoder().double(), 24), windows()
    expected = logits(model, inputs)
    result = lp.slicegpt(model, inputs, 0.25, per_layer=per_layer)
    assert (result.hidden_before, result.hidden_after, model.config.hidden_size) == (32, 24, 24)
    assert result.kept_variance == pytest.approx(1.0, abs=1e-12)
    assert result.params_after == lp.count_params(model) < result.params_before
    assert len(result.eigenvalues) == (5 if per_layer else 1)  # a basis per position: 2 layers × 2 sites + 1
    assert torch.allclose(model.model.norm.weight, torch.full((24,), (32 / 24) ** 0.5, dtype=torch.float64))
    assert model.config.rms_norm_eps == pytest.approx(1e-6 * 32 / 24)
    assert torch.allclose(logits(model, inputs), expected, rtol=0, atol=1e-9)


def test_per_layer_bases_with_nothing_sliced_leave_the_logits_unchanged(float64_norms) -> None:
    """Every position of the stream gets its own PCA basis; the shortcuts Q_inᵀ Q_out carry the residual across."""
    model, inputs = decoder("mistral", bias=False).double(), windows()
    expected = logits(model, inputs)
    result = lp.slicegpt(model, inputs, 0.0, per_layer=True)
    shortcut = model.model.layers[1].attention_shortcut
    assert shortcut.shape == (32, 32) and not torch.allclose(shortcut, torch.eye(32, dtype=torch.float64))
    assert torch.allclose(shortcut @ shortcut.T, torch.eye(32, dtype=torch.float64), atol=1e-12)
    assert result.params_after == result.params_before + 2 * 2 * 32 * 32
    assert type(model.model.layers[0]).__name__ == "MistralDecoderLayerWithShortcuts"
    assert torch.allclose(logits(model, inputs), expected, rtol=0, atol=1e-9)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_the_sliced_model_is_a_stock_model_that_reloads_with_the_same_logits(tmp_path, family: str) -> None:
    from transformers import AutoModelForCausalLM

    model, inputs = decoder(family, tied=True), windows()
    dense = logits(model, inputs)
    result = lp.slicegpt(model, inputs, 0.25)
    sliced = logits(model, inputs)
    assert (sliced - dense).abs().max() < (dense - dense.mean()).abs().max()  # close, not equal: 8 directions went
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(reloaded) is type(model)
    assert (reloaded.config.hidden_size, reloaded.config.head_dim) == (24, 8)
    assert lp.count_params(reloaded) == result.params_after
    assert torch.allclose(logits(reloaded, inputs), sliced, rtol=0, atol=1e-6)


def test_a_per_layer_model_reloads_with_its_shortcuts(tmp_path) -> None:
    from lightning_prune.methods.slicegpt import load_sliced

    model, inputs = decoder(), windows()
    lp.slicegpt(model, inputs, 0.25, per_layer=True)
    model.save_pretrained(tmp_path)
    reloaded = load_sliced(tmp_path)
    assert reloaded.model.layers[1].mlp_shortcut.shape == (24, 24)
    assert torch.allclose(logits(reloaded, inputs), logits(model, inputs), rtol=0, atol=1e-6)
    with pytest.raises(lp.PruningError, match=re.escape("`model.layers.0.attention_shortcut` does not exist")):
        lp.from_pretrained(tmp_path)
    with pytest.raises(lp.PruningError, match="already sliced with `per_layer=True`"):
        lp.slicegpt(reloaded, inputs, 0.5)


def test_the_kept_width_is_rounded_to_a_multiple() -> None:
    assert [kept_width(128, amount, 8) for amount in (0.0, 0.2, 0.25, 0.3)] == [128, 104, 96, 88]
    assert (kept_width(128, 0.2, 1), kept_width(48, 0.25, 8)) == (102, 40)  # halves round up


class ScaledLayerNorm(nn.LayerNorm):
    """A LayerNorm with Llama's ``variance_epsilon`` attribute: only what it computes gives it away."""

    def __init__(self, width: int) -> None:
        super().__init__(width, bias=False)
        self.variance_epsilon = 1e-6


@pytest.mark.parametrize(
    ("change", "amount", "calibration", "message"),
    [
        ("layernorm", 0.25, windows(), "not an RMS norm g·x/sqrt(mean(x²)+ε)"),
        (None, 0.9, windows(), "`amount=0.9` keeps 0 of the stream's 32 dimensions"),
        (None, 0.25, windows(2, 12), "holds 24 tokens, fewer than the stream's 32 dimensions"),
        (None, 1.0, windows(), "in [0, 1)"),
        (None, 0.25, windows()[:, :1], "must be (count, tokens ≥ 2) token ids"),
        ("gpt_neox", 0.25, windows(), "model_type 'gpt_neox'"),
    ],
)
def test_bad_input_is_refused_and_the_model_is_unchanged(change, amount, calibration, message) -> None:
    if change == "gpt_neox":
        from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

        config = GPTNeoXConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                               num_attention_heads=4, max_position_embeddings=64)  # fmt: skip
        model = GPTNeoXForCausalLM(config)
    else:
        model = decoder()
    if change == "layernorm":
        model.model.layers[1].post_attention_layernorm = ScaledLayerNorm(32)
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    with pytest.raises(lp.PruningError, match=re.escape(message)):
        lp.slicegpt(model, calibration, amount)
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(before[n], after[n]) for n in before)
    assert model.config.hidden_size == 32


def test_a_width_the_config_rejects_names_the_round_to_that_fits() -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=64, hidden_size=48, intermediate_size=48, num_hidden_layers=1,
                         num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=64)  # fmt: skip
    model = LlamaForCausalLM(config)
    with pytest.raises(lp.PruningError, match="use `round_to=16`"):
        lp.slicegpt(model, windows(), 0.1)  # 43.2 → 40, not a multiple of 16 heads
