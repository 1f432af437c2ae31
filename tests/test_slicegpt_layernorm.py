"""SliceGPT on LayerNorm families (OPT, GPT-2 with its transposed Conv1D, Phi with partial rotary and a parallel
block): folding the norms and a random rotation leave the logits unchanged; slicing a stream that lives in k
dimensions is exact (the norms still divide by the dense width); a sliced model's record replays and its folder
reloads with the same logits; configurations the rotation cannot take are refused with the model unchanged."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

import lightning_prune as lp
from lightning_prune.methods.decoder_families import stream_layout
from lightning_prune.methods.layernorm_fold import StreamRMSNorm
from lightning_prune.methods.rotation import fuse_norms, rotate_stream
from lightning_prune.methods.slicegpt_step import StreamSlicing

FAMILIES = ["opt", "opt_without_biases", "gpt2", "phi"]


def decoder(family: str, **extra) -> nn.Module:
    """A tiny random float64 decoder (D = 32, 4 heads, 2 layers) whose norms and biases are far from their init."""
    import transformers

    config_class, model_class, sizes = {
        "opt": (transformers.OPTConfig, transformers.OPTForCausalLM, {"ffn_dim": 48, "word_embed_proj_dim": 32}),
        "opt_without_biases": (
            transformers.OPTConfig, transformers.OPTForCausalLM,
            {"ffn_dim": 48, "word_embed_proj_dim": 32, "enable_bias": False},
        ),
        "gpt2": (transformers.GPT2Config, transformers.GPT2LMHeadModel, {"n_inner": 48, "tie_word_embeddings": True}),
        "phi": (
            transformers.PhiConfig, transformers.PhiForCausalLM, {"intermediate_size": 48, "partial_rotary_factor": 0.5}
        ),
    }[family]  # fmt: skip
    torch.manual_seed(0)
    config = config_class(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64,
        bos_token_id=0, eos_token_id=0, pad_token_id=None, **{**sizes, **extra},
    )  # fmt: skip
    model = model_class(config).eval().double()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.LayerNorm):
                module.weight.copy_(torch.rand_like(module.weight) + 0.5)
                module.bias.normal_(0, 0.3)
            elif getattr(module, "bias", None) is not None and module.bias.ndim == 1:
                module.bias.normal_(0, 0.1)
    return model


def windows(count: int = 4, tokens: int = 12) -> torch.Tensor:
    return torch.randint(0, 64, (count, tokens), generator=torch.Generator().manual_seed(1))


def logits(model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=inputs, use_cache=False).logits


def random_rotation(seed: int) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(32, 32, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))[0]


@pytest.mark.parametrize("family", FAMILIES)
def test_folding_the_layer_norms_and_a_random_rotation_leave_the_logits_unchanged(family: str) -> None:
    model, inputs = decoder(family), windows()
    expected = logits(model, inputs)
    layout = stream_layout(model)
    fuse_norms(model, layout)
    norms = [model.get_submodule(site.norm) for site in layout.sites]
    assert all(isinstance(norm, StreamRMSNorm) and norm.width == 32 for norm in norms)
    assert not any(isinstance(module, nn.LayerNorm) for module in model.modules())
    for name in (layout.embeddings, *layout.positions):  # the stream starts mean-free
        assert model.get_submodule(name).weight.mean(-1).abs().max() < 1e-12
    assert model.lm_head.weight is not model.get_submodule(layout.embeddings).weight
    assert model.lm_head.bias is not None  # β of the final norm, folded into a head that had no bias (but Phi's)
    assert torch.allclose(logits(model, inputs), expected, rtol=0, atol=1e-10)
    rotate_stream(model, layout, random_rotation(2))
    assert model.get_submodule(layout.embeddings).weight.mean(-1).abs().max() > 1e-3  # rotated: no longer mean-free
    assert torch.allclose(logits(model, inputs), expected, rtol=0, atol=1e-9)


def confined(model: nn.Module, kept: int) -> nn.Module:
    """``model`` whose embeddings and writers all project onto one random ``kept``-dimensional subspace: the stream,
    and so its centred version, has nothing outside ``kept`` dimensions and slicing the rest away must be exact."""
    basis = random_rotation(3)[:, :kept]
    projection = basis @ basis.T
    layout = stream_layout(model)
    with torch.no_grad():
        for name in (layout.embeddings, *layout.positions):
            weight = model.get_submodule(name).weight
            weight.copy_(weight @ projection)
        for writer in (model.get_submodule(name) for site in layout.sites for name in site.writers):
            if type(writer).__name__ == "Conv1D":  # input × output
                writer.weight.copy_(writer.weight @ projection)
            else:
                writer.weight.copy_(projection @ writer.weight)
            writer.bias.copy_(writer.bias @ projection) if writer.bias is not None else None
    return model


@pytest.mark.parametrize("per_layer", [False, True])
@pytest.mark.parametrize("family", FAMILIES)
def test_slicing_a_stream_that_lives_in_k_dimensions_keeps_the_logits_exactly(family: str, per_layer: bool) -> None:
    """Exact only if the sliced norms still divide by the dense width D = 32, not by k = 24."""
    model, inputs = confined(decoder(family), 24), windows()
    expected = logits(model, inputs)
    result = lp.slicegpt(model, inputs, 0.25, per_layer=per_layer)
    assert (result.hidden_before, result.hidden_after) == (32, 24)
    assert result.params_after == lp.count_params(model) < result.params_before
    assert model.config.hidden_size == 32  # the dense width, which the norms divide by
    assert model.get_submodule(stream_layout(model).embeddings).weight.shape[1] == 24
    assert torch.allclose(logits(model, inputs), expected, rtol=0, atol=1e-9)


@pytest.mark.parametrize("per_layer", [False, True])
@pytest.mark.parametrize("family", FAMILIES)
def test_a_sliced_model_replays_from_its_record_and_reloads_from_its_folder(tmp_path, family, per_layer) -> None:
    model, inputs = decoder(family), windows()
    dense = logits(model, inputs)
    step = StreamSlicing(per_layer=per_layer).step(
        model, {"input_ids": inputs[:1]}, 0.25, None, statistics={"batches": [{"input_ids": inputs}]}
    )
    sliced = logits(model, inputs)
    assert step.hidden_after == 24 and not torch.allclose(sliced, dense, atol=1e-6)
    assert (sliced - dense).abs().max() < 0.5 * (dense - dense.mean()).abs().max()  # close: 8 of 32 directions went
    fresh = decoder(family)
    lp.restore(fresh, step.record)
    fresh.load_state_dict(model.state_dict())
    assert torch.allclose(logits(fresh, inputs), sliced, rtol=0, atol=1e-12)
    assert lp.save_pretrained(model, tmp_path) is False  # its norms are not its class's: not a stock folder
    reloaded = lp.from_pretrained(tmp_path, dtype=torch.float64)  # built in float32, then loaded: float32 weights
    assert lp.count_params(reloaded) == lp.count_params(model)
    assert torch.allclose(logits(reloaded, inputs), sliced, rtol=0, atol=1e-5)


def test_a_second_slicing_of_a_layer_norm_model_keeps_the_dense_width_in_its_norms() -> None:
    model, inputs = confined(decoder("gpt2"), 16), windows()
    expected = logits(model, inputs)
    lp.slicegpt(model, inputs, 0.25)
    lp.slicegpt(model, inputs, 1 / 3)  # 24 → 16
    assert model.transformer.wte.weight.shape[1] == 16 and model.transformer.ln_f.width == 32
    assert torch.allclose(logits(model, inputs), expected, rtol=0, atol=1e-9)


@pytest.mark.parametrize(
    ("family", "change", "message"),
    [
        ("opt", {"do_layer_norm_before": False}, "`do_layer_norm_before=False` (post-norm"),
        ("opt", {"word_embed_proj_dim": 16}, "`word_embed_proj_dim=16` differs from `hidden_size=32`"),
        ("gpt2", {"add_cross_attention": True}, "`add_cross_attention=True`"),
        ("gpt2", "rms_norm", "`transformer.h.1.ln_2` (RMSNorm) is not a LayerNorm γ·(x−mean)/sqrt(var+ε)+β"),
        (
            "phi",
            "folded_once",
            "`model.layers.1.input_layernorm` is a StreamRMSNorm (folded by an earlier slicing) while other",
        ),
    ],
)
def test_a_layer_norm_model_the_rotation_cannot_take_is_refused_and_unchanged(family, change, message) -> None:
    model = decoder(family, **(change if isinstance(change, dict) else {}))
    if change == "rms_norm":
        model.transformer.h[1].ln_2 = nn.RMSNorm(32, eps=1e-5, dtype=torch.float64)
    if change == "folded_once":
        model.model.layers[1].input_layernorm = StreamRMSNorm(32, 1e-5)
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    modules = [type(module) for module in model.modules()]
    with pytest.raises(lp.PruningError, match=re.escape(message)):
        lp.slicegpt(model, windows(), 0.25)
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(before[name], after[name]) for name in before)
    assert [type(module) for module in model.modules()] == modules


def test_a_plain_folder_of_a_sliced_layer_norm_model_names_the_loader_that_reads_it(tmp_path) -> None:
    from lightning_prune.methods.slicegpt import load_sliced

    model, inputs = decoder("phi"), windows()
    lp.slicegpt(model, inputs, 0.25, per_layer=True)
    model.save_pretrained(tmp_path)
    with pytest.raises(lp.PruningError, match=re.escape("load it with `lightning_prune.from_pretrained`")):
        load_sliced(tmp_path)
