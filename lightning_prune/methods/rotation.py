"""Orthogonal rotations of a decoder's residual stream, and where a model family reads and writes it.

Computational invariance (SliceGPT, Ashkboos et al. 2024): a scale-free RMS norm commutes with an orthogonal
``Q``, ``‖xQ‖ = ‖x‖``, so once each norm's scale is folded into the layers that read its output, a model whose
stream is ``h`` computes the same function with the stream ``hQ``:

- the embeddings and every writer of the stream (``o_proj``, ``down_proj``): ``E ← EQ``, ``W ← QᵀW``, ``b ← Qᵀb``;
- every reader (``q/k/v_proj``, ``gate/up_proj``, the LM head): ``W ← WQ``.

With ``Q`` of ``D`` rows and only ``k < D`` orthonormal columns the same formulas *slice* the stream to ``k``
dimensions. An RMS norm of the sliced stream then averages over ``k`` squares instead of ``D``: with
``y = hQ`` (``‖y‖ ≈ ‖h‖``) the dense norm computes ``h / sqrt(‖h‖²/D + ε)`` and the sliced one
``w · y / sqrt(‖y‖²/k + ε')``, which is ``y / sqrt(‖y‖²/D + ε)`` exactly when ``w = sqrt(D/k)`` and
``ε' = ε·D/k``. Both are set, on the modules and in the config, so the sliced model is a stock model whose
norms keep the dense model's normalisation (exact when the dropped directions carry nothing).

A basis per position of the stream (the paper's per-layer ``Q``) needs the residual around each attention and
MLP carried from the basis before it to the one after: ``residual @ Q_inᵀ Q_out``. :func:`add_shortcuts` turns
the decoder layers into subclasses that hold those matrices; :func:`set_shortcut` sets one.

A family's knowledge is the table :data:`DECODERS`: which modules are the embeddings, the norms, the readers and
writers after each norm, and its decoder layer's forward with shortcuts. A new family with the same pattern is
one more entry.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
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


def _llama_block_with_shortcuts(self: nn.Module, hidden_states: Tensor, **kwargs: Any) -> Tensor:
    """A Llama-style decoder layer whose residual connections pass through ``attention_shortcut`` and
    ``mlp_shortcut`` (``k_in × k_out`` matrices, or None for the identity), as per-layer bases need."""
    residual = _through(hidden_states, self.attention_shortcut)
    hidden_states, _ = self.self_attn(hidden_states=self.input_layernorm(hidden_states), **kwargs)
    hidden_states = residual + hidden_states
    residual = _through(hidden_states, self.mlp_shortcut)
    return residual + self.mlp(self.post_attention_layernorm(hidden_states))


def _through(hidden_states: Tensor, shortcut: Tensor | None) -> Tensor:
    return hidden_states if shortcut is None else hidden_states @ shortcut


@dataclass(frozen=True)
class DecoderTable:
    """Where a pre-norm decoder keeps its stream, as module paths (per block: relative to ``blocks[i]``), and the
    forward of its decoder layer with shortcut matrices on the residual."""

    embeddings: str
    blocks: str
    block_sites: tuple[Site, ...]
    final: Site
    forward_with_shortcuts: Callable[..., Tensor]


_LLAMA = DecoderTable(
    embeddings="model.embed_tokens",
    blocks="model.layers",
    block_sites=(
        Site("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.o_proj",),
             shortcut="attention_shortcut"),
        Site("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",), shortcut="mlp_shortcut"),
    ),
    final=Site("model.norm", ("lm_head",)),
    forward_with_shortcuts=_llama_block_with_shortcuts,
)  # fmt: skip
DECODERS = {"llama": _LLAMA, "mistral": _LLAMA, "qwen2": _LLAMA}  # config.model_type → its table


@dataclass(frozen=True)
class StreamLayout:
    """One model's stream: its embeddings and every norm site, in order (the last one feeds the LM head)."""

    embeddings: str
    sites: tuple[Site, ...]
    table: DecoderTable


def stream_layout(model: nn.Module) -> StreamLayout:
    """The stream of ``model``, a Hugging Face causal LM of a family in :data:`DECODERS`.

    Raises:
        PruningError: for a model of another family, or one whose modules are not where its table says.
    """
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in DECODERS:
        raise PruningError(
            f"rotating the stream needs a decoder of a known family; got {type(model).__name__} "
            f"(model_type {model_type!r}). Known: {sorted(DECODERS)} (add a table to "
            "lightning_prune.methods.rotation.DECODERS for another Llama-style family)."
        )
    table = DECODERS[model_type]
    try:
        count = len(model.get_submodule(table.blocks))
        sites = [
            Site(f"{prefix}.{site.norm}", tuple(f"{prefix}.{r}" for r in site.readers),
                 tuple(f"{prefix}.{w}" for w in site.writers), prefix, site.shortcut)
            for prefix in (f"{table.blocks}.{i}" for i in range(count))
            for site in table.block_sites
        ]  # fmt: skip
        layout = StreamLayout(table.embeddings, (*sites, table.final), table)
        for name in (layout.embeddings, *(n for s in layout.sites for n in (s.norm, *s.readers, *s.writers))):
            model.get_submodule(name)
    except AttributeError as error:
        raise PruningError(
            f"{type(model).__name__} is not laid out as its {model_type!r} table says: {error}"
        ) from error
    return layout


def eps_attribute(norm: nn.Module) -> str | None:
    """The name of the attribute holding an RMS norm's ε (None if it has none)."""
    return next((a for a in ("variance_epsilon", "eps") if isinstance(getattr(norm, a, None), float)), None)


def check_norms(model: nn.Module, layout: StreamLayout) -> None:
    """Refuse norms that are not a scale-only RMS norm ``g · x / sqrt(mean(x²) + ε)``, by what they compute
    (a LayerNorm subtracts the mean, Gemma's norm scales by ``1 + g``): their scale could not be folded away."""
    for site in layout.sites:
        norm = model.get_submodule(site.norm)
        weight = getattr(norm, "weight", None)
        attribute = eps_attribute(norm)
        fits = isinstance(weight, Tensor) and weight.ndim == 1 and getattr(norm, "bias", None) is None
        if fits and attribute is not None:
            eps = getattr(norm, attribute)
            x = torch.randn(3, weight.numel(), generator=torch.Generator().manual_seed(0)).add(1.0)
            x = x.to(weight.device, weight.dtype)
            with torch.no_grad():
                expected = weight * x * torch.rsqrt(x.square().mean(-1, keepdim=True) + eps)
                fits = torch.allclose(norm(x), expected, rtol=1e-3, atol=1e-5)
        if not fits:
            raise PruningError(
                f"`{site.norm}` ({type(norm).__name__}) is not an RMS norm g·x/sqrt(mean(x²)+ε): its scale cannot "
                "be folded into the layers after it. Rotating the stream supports Llama-style RMSNorm models "
                "(LayerNorm models such as OPT, GPT-2 and Phi are not supported yet)."
            )


def untie_head(model: nn.Module, layout: StreamLayout) -> None:
    """Give the LM head its own weight if it shares the embeddings' (the two are rotated from different sides)."""
    head = model.get_submodule(layout.sites[-1].readers[0])
    embeddings = model.get_submodule(layout.embeddings)
    if head.weight is embeddings.weight:
        head.weight = nn.Parameter(embeddings.weight.detach().clone(), embeddings.weight.requires_grad)
        model.config.tie_word_embeddings = False


def fuse_norms(model: nn.Module, layout: StreamLayout) -> None:
    """Fold each norm's scale into its readers (``W ← W·diag(g)``) and set it to ones; the function is unchanged."""
    untie_head(model, layout)
    with torch.no_grad():
        for site in layout.sites:
            norm = model.get_submodule(site.norm)
            scale = norm.weight.detach().double()
            for name in site.readers:
                reader = model.get_submodule(name)
                reader.weight.data = (reader.weight.double() * scale.to(reader.weight.device)).to(reader.weight.dtype)
            norm.weight.data = torch.ones_like(norm.weight)


def _times(tensor: Tensor, basis: Tensor, left: bool = False) -> Tensor:
    """``tensor @ basis`` (or ``basisᵀ @ tensor``) in float64, back in ``tensor``'s dtype."""
    basis = basis.to(tensor.device, torch.float64)
    product = basis.T @ tensor.double() if left else tensor.double() @ basis
    return product.to(tensor.dtype)


def rotate_embeddings(model: nn.Module, layout: StreamLayout, basis: Tensor) -> None:
    """``E ← E·basis``: the embeddings write the stream in ``basis`` (``D × k``)."""
    embeddings = model.get_submodule(layout.embeddings)
    with torch.no_grad():
        embeddings.weight.data = _times(embeddings.weight, basis)
    embeddings.embedding_dim = basis.shape[1]


def rotate_readers(model: nn.Module, site: Site, basis: Tensor) -> None:
    """``site`` reads a stream expressed in ``basis`` (``D × k``): ``W ← W·basis`` for its (fused) readers, and its
    norm shrinks to ``k`` with weight ``sqrt(D/k)`` and ``ε·D/k``, which keep the average over ``D``."""
    width, kept = basis.shape
    with torch.no_grad():
        for name in site.readers:
            reader = model.get_submodule(name)
            reader.weight.data = _times(reader.weight, basis)
            reader.in_features = kept
        norm = model.get_submodule(site.norm)
        scale = math.sqrt(width / kept) * norm.weight.detach()[0]  # the fused norm's weight is one constant
        norm.weight.data = torch.full((kept,), float(scale), dtype=norm.weight.dtype, device=norm.weight.device)
    attribute = eps_attribute(norm)
    setattr(norm, attribute, getattr(norm, attribute) * width / kept)


def rotate_writers(model: nn.Module, site: Site, basis: Tensor) -> None:
    """``site``'s block writes the stream in ``basis`` (``D × k``): ``W ← basisᵀ·W``, ``b ← basisᵀ·b``."""
    with torch.no_grad():
        for name in site.writers:
            writer = model.get_submodule(name)
            writer.weight.data = _times(writer.weight, basis, left=True)
            if writer.bias is not None:
                writer.bias.data = _times(writer.bias, basis)
            writer.out_features = basis.shape[1]


def narrow_config(model: nn.Module, layout: StreamLayout, kept: int) -> None:
    """The config of a stream of ``kept`` dimensions: ``hidden_size``, ``head_dim`` (kept explicit, it no longer
    follows from the width), and the norms' scaled ``ε`` as ``rms_norm_eps``."""
    config = model.config
    config.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    config.hidden_size = kept
    final = model.get_submodule(layout.sites[-1].norm)
    config.rms_norm_eps = getattr(final, eps_attribute(final))


def rotate_stream(model: nn.Module, layout: StreamLayout, basis: Tensor) -> None:
    """Fuse the norms, then express the whole stream in the orthonormal columns of ``basis`` (``D × k``, ``k ≤ D``):
    a rotation when ``k = D``, a rotation and a slice to ``k`` dimensions otherwise (see the module doc).

    The config follows (:func:`narrow_config`), so ``save_pretrained`` writes a stock model of this width.
    """
    fuse_norms(model, layout)
    rotate_embeddings(model, layout, basis)
    for site in layout.sites:
        rotate_readers(model, site, basis)
        rotate_writers(model, site, basis)
    narrow_config(model, layout, basis.shape[1])


_WITH_SHORTCUTS: dict[type, type] = {}


def add_shortcuts(model: nn.Module, layout: StreamLayout) -> None:
    """Turn every decoder layer into a subclass of its own class whose residual passes through shortcut matrices
    (the same call signature and modules; the shortcuts start as None, the identity): see :func:`set_shortcut`."""
    for block in dict.fromkeys(site.block for site in layout.sites if site.block):
        layer = model.get_submodule(block)
        base = type(layer)
        if base not in _WITH_SHORTCUTS.values():
            if base not in _WITH_SHORTCUTS:
                forward = layout.table.forward_with_shortcuts
                _WITH_SHORTCUTS[base] = type(f"{base.__name__}WithShortcuts", (base,), {"forward": forward})
            layer.__class__ = _WITH_SHORTCUTS[base]
        for site in layout.sites:
            if site.block == block and not hasattr(layer, site.shortcut):
                layer.register_parameter(site.shortcut, None)


def has_shortcuts(model: nn.Module, layout: StreamLayout) -> bool:
    """Whether the decoder layers of ``model`` already hold shortcut matrices (:func:`add_shortcuts`)."""
    return any(type(model.get_submodule(site.block)) in _WITH_SHORTCUTS.values() for site in layout.sites if site.block)


def set_shortcut(model: nn.Module, site: Site, matrix: Tensor) -> None:
    """The residual around ``site`` becomes ``residual @ matrix`` (a parameter, counted like any other)."""
    layer = model.get_submodule(site.block)
    current, reference = getattr(layer, site.shortcut), model.get_submodule(site.writers[0]).weight
    value = matrix.to(reference.device, reference.dtype)
    if current is None:
        setattr(layer, site.shortcut, nn.Parameter(value))
    else:
        current.data = value
