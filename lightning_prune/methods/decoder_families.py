"""Where each decoder family keeps its residual stream: the one table a method that rotates the stream reads.

A family's :class:`DecoderTable` names, as module paths, its embeddings (token and learned positions), its decoder
layers and, per layer, each norm on the stream with the layers that read the norm's output and the layers that
write their result back; then the final norm and the LM head. It also says whether the norms are LayerNorms
(their mean subtraction is folded into the writers: :mod:`~lightning_prune.methods.layernorm_fold`), which
configurations the rotation cannot take, and the forward of its decoder layer with a shortcut matrix on each
residual (per-layer bases). A family with the same pattern is one more entry in :data:`DECODERS`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from lightning_prune.errors import PruningError


@dataclass(frozen=True)
class Site:
    """A norm on the stream, the layers that read its output and the layers that write their result back."""

    norm: str
    readers: tuple[str, ...]
    writers: tuple[str, ...] = ()
    block: str = ""  # the decoder layer the site is in ("" for the final norm)
    shortcut: str = ""  # the block's attribute for the residual's shortcut matrix around this site (per-layer Q)


def _supported(config: Any) -> str:
    return ""


@dataclass(frozen=True)
class DecoderTable:
    """Where a pre-norm decoder keeps its stream, as module paths (per block: relative to ``blocks[i]``).

    ``forward_with_shortcuts`` is its decoder layer's forward with shortcut matrices on the residual;
    ``unsupported(config)`` says what in a config the rotation cannot take ("" when nothing).
    """

    embeddings: str
    blocks: str
    block_sites: tuple[Site, ...]
    final: Site
    forward_with_shortcuts: Callable[..., Tensor]
    positions: tuple[str, ...] = ()  # learned position embeddings, also writers of the stream
    layer_norm: bool = False  # LayerNorms (mean subtracted, scale and bias) rather than RMS norms
    unsupported: Callable[[Any], str] = _supported


def _through(hidden_states: Tensor, shortcut: Tensor | None) -> Tensor:
    return hidden_states if shortcut is None else hidden_states @ shortcut


# The decoder layers with shortcuts: ``attention_shortcut`` and ``mlp_shortcut`` (``k_in × k_out`` matrices, or None
# for the identity) carry the residual from the basis before each site to the one after it.


def _llama_block(self: nn.Module, hidden_states: Tensor, **kwargs: Any) -> Tensor:
    residual = _through(hidden_states, self.attention_shortcut)
    hidden_states, _ = self.self_attn(hidden_states=self.input_layernorm(hidden_states), **kwargs)
    hidden_states = residual + hidden_states
    residual = _through(hidden_states, self.mlp_shortcut)
    return residual + self.mlp(self.post_attention_layernorm(hidden_states))


def _opt_block(self: nn.Module, hidden_states: Tensor, use_cache: bool | None = False, **kwargs: Any) -> Tensor:
    def dropout(tensor: Tensor) -> Tensor:
        return nn.functional.dropout(tensor, p=self.dropout, training=self.training)

    residual = _through(hidden_states, self.attention_shortcut)
    attention, _ = self.self_attn(hidden_states=self.self_attn_layer_norm(hidden_states), **kwargs)
    hidden_states = residual + dropout(attention)
    residual = _through(hidden_states, self.mlp_shortcut)
    return residual + dropout(self.fc2(self.activation_fn(self.fc1(self.final_layer_norm(hidden_states)))))


def _gpt2_block(
    self: nn.Module, hidden_states: Tensor, cache: Any = None, attention_mask: Tensor | None = None,
    encoder_hidden_states: None = None, **kwargs: Any,
) -> Tensor:  # fmt: skip
    """GPT-2's block (no cross-attention: the table refuses it); its model passes the first four positionally."""
    residual = _through(hidden_states, self.attention_shortcut)
    attention, _ = self.attn(self.ln_1(hidden_states), cache=cache, attention_mask=attention_mask, **kwargs)
    hidden_states = residual + attention
    residual = _through(hidden_states, self.mlp_shortcut)
    return residual + self.mlp(self.ln_2(hidden_states))


def _phi_block(self: nn.Module, hidden_states: Tensor, **kwargs: Any) -> Tensor:
    """Phi's parallel block: attention and MLP read the same norm output, so one shortcut serves both."""
    residual = _through(hidden_states, self.shortcut)
    normed = self.input_layernorm(hidden_states)
    attention, _ = self.self_attn(hidden_states=normed, **kwargs)
    return self.resid_dropout(attention) + self.resid_dropout(self.mlp(normed)) + residual


def _opt_unsupported(config: Any) -> str:
    if not config.do_layer_norm_before:
        return "`do_layer_norm_before=False` (post-norm, as OPT-350m): a norm after the residual add is not invariant"
    if config.word_embed_proj_dim != config.hidden_size:
        return (
            f"`word_embed_proj_dim={config.word_embed_proj_dim}` differs from `hidden_size={config.hidden_size}`: "
            "the stream is entered and left through project_in/project_out"
        )
    if getattr(config, "_remove_final_layer_norm", False):
        return "`_remove_final_layer_norm=True`: no final norm before the LM head"
    return ""


def _gpt2_unsupported(config: Any) -> str:
    return (
        "`add_cross_attention=True`: cross-attention blocks write the stream too" if config.add_cross_attention else ""
    )


_ATTENTION = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
_LLAMA = DecoderTable(
    embeddings="model.embed_tokens",
    blocks="model.layers",
    block_sites=(
        Site("input_layernorm", _ATTENTION, ("self_attn.o_proj",), shortcut="attention_shortcut"),
        Site("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",), shortcut="mlp_shortcut"),
    ),
    final=Site("model.norm", ("lm_head",)),
    forward_with_shortcuts=_llama_block,
)
_OPT = DecoderTable(
    embeddings="model.decoder.embed_tokens",
    positions=("model.decoder.embed_positions",),
    blocks="model.decoder.layers",
    block_sites=(
        Site("self_attn_layer_norm", _ATTENTION, ("self_attn.out_proj",), shortcut="attention_shortcut"),
        Site("final_layer_norm", ("fc1",), ("fc2",), shortcut="mlp_shortcut"),
    ),
    final=Site("model.decoder.final_layer_norm", ("lm_head",)),
    forward_with_shortcuts=_opt_block,
    layer_norm=True,
    unsupported=_opt_unsupported,
)
_GPT2 = DecoderTable(  # Conv1D weights are input × output: the rotations read each layer's orientation
    embeddings="transformer.wte",
    positions=("transformer.wpe",),
    blocks="transformer.h",
    block_sites=(
        Site("ln_1", ("attn.c_attn",), ("attn.c_proj",), shortcut="attention_shortcut"),
        Site("ln_2", ("mlp.c_fc",), ("mlp.c_proj",), shortcut="mlp_shortcut"),
    ),
    final=Site("transformer.ln_f", ("lm_head",)),
    forward_with_shortcuts=_gpt2_block,
    layer_norm=True,
    unsupported=_gpt2_unsupported,
)
_PHI = DecoderTable(  # partial rotary acts inside the heads, after q/k_proj: the stream does not see it
    embeddings="model.embed_tokens",
    blocks="model.layers",
    block_sites=(
        Site("input_layernorm", (*_ATTENTION, "mlp.fc1"), ("self_attn.dense", "mlp.fc2"), shortcut="shortcut"),
    ),
    final=Site("model.final_layernorm", ("lm_head",)),
    forward_with_shortcuts=_phi_block,
    layer_norm=True,
)
DECODERS = {"llama": _LLAMA, "mistral": _LLAMA, "qwen2": _LLAMA, "opt": _OPT, "gpt2": _GPT2, "phi": _PHI}
"""``config.model_type`` → its table."""


@dataclass(frozen=True)
class StreamLayout:
    """One model's stream: its embeddings (token, then positions) and every norm site, in order (the last one
    feeds the LM head)."""

    embeddings: str
    positions: tuple[str, ...]
    sites: tuple[Site, ...]
    table: DecoderTable


def stream_layout(model: nn.Module) -> StreamLayout:
    """The stream of ``model``, a Hugging Face causal LM of a family in :data:`DECODERS`.

    Raises:
        PruningError: for a model of another family, a configuration its table cannot take, or one whose modules
            are not where its table says.
    """
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in DECODERS:
        raise PruningError(
            f"rotating the stream needs a decoder of a known family; got {type(model).__name__} "
            f"(model_type {model_type!r}). Known: {sorted(DECODERS)} (add a table to "
            "lightning_prune.methods.decoder_families.DECODERS for another family)."
        )
    table = DECODERS[model_type]
    problem = table.unsupported(config)
    if problem:
        raise PruningError(f"{type(model).__name__} cannot have its stream rotated: {problem}.")
    try:
        count = len(model.get_submodule(table.blocks))
        sites = [
            Site(f"{prefix}.{site.norm}", tuple(f"{prefix}.{r}" for r in site.readers),
                 tuple(f"{prefix}.{w}" for w in site.writers), prefix, site.shortcut)
            for prefix in (f"{table.blocks}.{i}" for i in range(count))
            for site in table.block_sites
        ]  # fmt: skip
        layout = StreamLayout(table.embeddings, table.positions, (*sites, table.final), table)
        for name in (*layout.positions, layout.embeddings):
            model.get_submodule(name)
        for name in (n for s in layout.sites for n in (s.norm, *s.readers, *s.writers)):
            model.get_submodule(name)
    except AttributeError as error:
        raise PruningError(
            f"{type(model).__name__} is not laid out as its {model_type!r} table says: {error}"
        ) from error
    return layout
