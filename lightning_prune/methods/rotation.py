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

A family's knowledge is its table in :mod:`~lightning_prune.methods.decoder_families`: which modules are the
embeddings, the norms, the readers and writers after each norm, whether its norms are LayerNorms (folded first:
:mod:`~lightning_prune.methods.layernorm_fold`), and its decoder layer's forward with shortcuts.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from lightning_prune.errors import PruningError
from lightning_prune.methods import layernorm_fold
from lightning_prune.methods.decoder_families import Site, StreamLayout
from lightning_prune.methods.layernorm_fold import StreamRMSNorm, matrix, set_matrix


def eps_attribute(norm: nn.Module) -> str | None:
    """The name of the attribute holding an RMS norm's ε (None if it has none)."""
    return next((a for a in ("variance_epsilon", "eps") if isinstance(getattr(norm, a, None), float)), None)


def check_norms(model: nn.Module, layout: StreamLayout) -> None:
    """Refuse norms whose work cannot be folded away: a LayerNorm family's (its table says so) must be LayerNorms
    (:func:`~lightning_prune.methods.layernorm_fold.check_layer_norms`); the others a scale-only RMS norm
    ``g · x / sqrt(mean(x²) + ε)``, checked by what they compute (a LayerNorm subtracts the mean, Gemma's norm
    scales by ``1 + g``)."""
    if layout.table.layer_norm:
        layernorm_fold.check_layer_norms(model, layout)
        return
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
                f"be folded into the layers after it. A {model.config.model_type!r} model's table says its norms "
                "are RMS norms (the LayerNorm families are OPT, GPT-2 and Phi)."
            )


def untie_head(model: nn.Module, layout: StreamLayout) -> None:
    """Give the LM head its own weight if it shares the embeddings' (the two are rotated from different sides)."""
    head = model.get_submodule(layout.sites[-1].readers[0])
    embeddings = model.get_submodule(layout.embeddings)
    if head.weight is embeddings.weight:
        head.weight = nn.Parameter(embeddings.weight.detach().clone(), embeddings.weight.requires_grad)
        model.config.tie_word_embeddings = False


def fuse_norms(model: nn.Module, layout: StreamLayout) -> None:
    """Leave scale-free norms on the stream, the function unchanged: an RMS norm's scale is folded into its readers
    (``W ← W·diag(g)``) and set to ones; LayerNorms are folded into the layers around them and replaced
    (:func:`~lightning_prune.methods.layernorm_fold.fold_layer_norms`). The LM head is untied first."""
    untie_head(model, layout)
    if layout.table.layer_norm:
        layernorm_fold.fold_layer_norms(model, layout)
        return
    with torch.no_grad():
        for site in layout.sites:
            norm = model.get_submodule(site.norm)
            scale = norm.weight.detach().double()
            for reader in (model.get_submodule(name) for name in site.readers):
                set_matrix(reader, matrix(reader) * scale.to(reader.weight.device))
            norm.weight.data = torch.ones_like(norm.weight)


def _times(tensor: Tensor, basis: Tensor) -> Tensor:
    """``tensor @ basis`` in float64, back in ``tensor``'s dtype."""
    return (tensor.double() @ basis.to(tensor.device, torch.float64)).to(tensor.dtype)


def rotate_embeddings(model: nn.Module, layout: StreamLayout, basis: Tensor) -> None:
    """``E ← E·basis``: the token (and position) embeddings write the stream in ``basis`` (``D × k``)."""
    for name in (layout.embeddings, *layout.positions):
        embeddings = model.get_submodule(name)
        with torch.no_grad():
            embeddings.weight.data = _times(embeddings.weight, basis)
        embeddings.embedding_dim = basis.shape[1]


def rotate_readers(model: nn.Module, site: Site, basis: Tensor) -> None:
    """``site`` reads a stream expressed in ``basis`` (``D × k``): ``W ← W·basis`` for its (fused) readers. An RMS
    norm of the model's own class shrinks to ``k`` with weight ``sqrt(D/k)`` and ``ε·D/k``, which keep the average
    over ``D``; a :class:`StreamRMSNorm` averages over ``D`` already."""
    width, kept = basis.shape
    with torch.no_grad():
        for reader in (model.get_submodule(name) for name in site.readers):
            set_matrix(reader, matrix(reader) @ basis.to(reader.weight.device, torch.float64))
        norm = model.get_submodule(site.norm)
        if isinstance(norm, StreamRMSNorm):
            return
        scale = math.sqrt(width / kept) * norm.weight.detach()[0]  # the fused norm's weight is one constant
        norm.weight.data = torch.full((kept,), float(scale), dtype=norm.weight.dtype, device=norm.weight.device)
    attribute = eps_attribute(norm)
    setattr(norm, attribute, getattr(norm, attribute) * width / kept)


def rotate_writers(model: nn.Module, site: Site, basis: Tensor) -> None:
    """``site``'s block writes the stream in ``basis`` (``D × k``): ``W ← basisᵀ·W``, ``b ← basisᵀ·b``."""
    with torch.no_grad():
        for writer in (model.get_submodule(name) for name in site.writers):
            set_matrix(writer, basis.T.to(writer.weight.device, torch.float64) @ matrix(writer))
            if writer.bias is not None:
                writer.bias.data = _times(writer.bias, basis)


def narrow_config(model: nn.Module, layout: StreamLayout, kept: int) -> None:
    """The config of a stream of ``kept`` dimensions, for an RMS family: ``hidden_size``, ``head_dim`` (kept
    explicit, it no longer follows from the width), and the norms' scaled ``ε`` as ``rms_norm_eps``.

    A LayerNorm family's config keeps the dense width, which its :class:`StreamRMSNorm` divides by and from which
    its layers' head sizes follow: such a model is no stock model (its norms are not the class's), and
    :func:`lightning_prune.from_pretrained` rebuilds it from the dense config, the rewrite and the saved shapes.
    """
    if layout.table.layer_norm:
        return
    config = model.config
    config.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    config.hidden_size = kept
    final = model.get_submodule(layout.sites[-1].norm)
    config.rms_norm_eps = getattr(final, eps_attribute(final))


def rotate_stream(model: nn.Module, layout: StreamLayout, basis: Tensor) -> None:
    """Fuse the norms, then express the whole stream in the orthonormal columns of ``basis`` (``D × k``, ``k ≤ D``):
    a rotation when ``k = D``, a rotation and a slice to ``k`` dimensions otherwise (see the module doc).

    The config follows (:func:`narrow_config`), so ``save_pretrained`` writes a stock model of this width (RMS
    families). Fusing twice changes nothing: the basis may come from a PCA of the fused model.
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
