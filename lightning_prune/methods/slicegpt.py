"""SliceGPT (Ashkboos et al., ICLR 2024): rotate the residual stream to its principal directions, slice the rest.

The residual stream of a decoder uses its ``D`` dimensions unevenly. The principal directions of what the
norms see over calibration windows (``XᵀX`` accumulated in float64 over the input of the norms on the stream,
damped by ``damping · mean(diag)``, ``eigh``, sorted by decreasing eigenvalue) give an orthogonal basis; the
stream is rotated into it (:mod:`~lightning_prune.methods.rotation`) and only the leading ``k = (1 − amount)·D``
directions (rounded to a multiple of ``round_to``) are kept. Readers lose input columns, writers and the
embeddings lose output rows, the norms shrink to ``k`` and compensate for averaging over ``k``.

Two variants:

- one basis for the whole stream (default), from the inputs of every norm together. It needs no shortcut, so
  the result is a stock Hugging Face model with ``config.hidden_size = k`` that ``save_pretrained`` /
  ``from_pretrained`` reload as it is.
- ``per_layer=True``, the paper's: a basis per position of the stream (the input of each norm), each from a PCA
  on the model already sliced upstream, so it sees the errors made before it. The residual around each
  attention and MLP then carries a ``k × k`` shortcut ``Q_inᵀ Q_out`` (counted in the parameters, as the paper
  does), held by a subclass of the decoder layer; such a folder loads with :func:`load_sliced`.

LayerNorm families (OPT, GPT-2, Phi) have their norms folded first (:mod:`~lightning_prune.methods.layernorm_fold`:
writers and embeddings centred, scale and bias into the readers, a scale-free RMS norm over the dense width in
their place), and the PCA runs on that centred stream. Their sliced norms are not their class's: both variants
save with :func:`lightning_prune.save_pretrained` and load with :func:`lightning_prune.from_pretrained`.

Each token enters ``XᵀX`` scaled to unit RMS. The stream grows with depth, so raw inputs let the last layers
decide the one basis for all; but a norm passes on only a token's direction, and the error slicing makes in
its output is the share of that direction outside the kept subspace. On the default model (dense test
perplexity 85.8) one basis gives 89.3 / 91.3 / 93.6 at 20 / 25 / 30% with this weighting, against
98.4 / 106.5 / 111.6 with raw inputs; per-layer bases give 88.7 / 90.4 / 92.8, but with their shortcuts
they keep 87.8 / 80.6 / 73.5% of the parameters where one basis keeps 81.2 / 75.0 / 68.8%: at equal size one
basis is the better of the two on this model (89.3 at 81.2% against 90.4 at 80.6%).
A damping of ``λ·I`` moves every eigenvalue alike and leaves the eigenvectors, hence the result, as they are.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lightning_prune.cuts import Rewrite
from lightning_prune.errors import PruningError
from lightning_prune.fixups import REWRITES
from lightning_prune.language import check_windows
from lightning_prune.measure import count_params
from lightning_prune.methods import layernorm_fold, rotation
from lightning_prune.methods.decoder_families import StreamLayout, stream_layout
from lightning_prune.running import preserved_state, run_model

SMALLEST = 8  # fewer kept directions than this is not a model worth keeping
KIND = "slicegpt"  # the kind of its rewrites in records and in lightning_prune.json


@dataclass
class SliceResult:
    """What :func:`slicegpt` did: sizes before and after, and how much of the calibration signal was kept."""

    params_before: int
    params_after: int
    hidden_before: int
    hidden_after: int
    kept_variance: float  # share of the (undamped, per-token normalised) XᵀX along the kept directions; mean per basis
    eigenvalues: list[Tensor] = field(repr=False)  # of each basis's damped XᵀX, decreasing

    @property
    def params_ratio(self) -> float:
        return self.params_after / max(self.params_before, 1)


def kept_width(width: int, amount: float, round_to: int) -> int:
    """``(1 − amount)·width`` rounded to the nearest multiple of ``round_to`` (halves up), at most ``width``."""
    return min(width, round_to * math.floor((1 - amount) * width / round_to + 0.5))


def _batches(calibration: Tensor, batch_size: int) -> list[dict[str, Any]]:
    return [{"input_ids": chunk, "use_cache": False} for chunk in calibration.split(batch_size)]


class _Reached(Exception):
    """Raised after the last norm a PCA needs: the rest of the forward pass has nothing to give it (and may not run
    half-rotated: GPT-2 reshapes its output to the embeddings' width)."""


def stream_covariance(model: nn.Module, norms: Sequence[str], batches: Sequence[Any]) -> Tensor:
    """``Σ xᵀx`` in float64 over every token of ``batches`` (model inputs) at the input of each of ``norms`` (in the
    order the forward pass reaches them), each token ``x`` scaled to unit RMS (what the norm passes on, before its
    scale). Each forward pass stops at the last of ``norms``."""
    total: Tensor | None = None
    last = model.get_submodule(norms[-1])

    def accumulate(module: nn.Module, inputs: tuple) -> None:
        nonlocal total
        x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).double()
        x = x * torch.rsqrt(x.square().mean(-1, keepdim=True).clamp(min=1e-30))  # each token's direction only
        product = (x.T @ x).cpu()
        total = product if total is None else total + product
        if module is last:
            raise _Reached

    handles = [model.get_submodule(norm).register_forward_pre_hook(accumulate) for norm in norms]
    try:
        with preserved_state(model), torch.no_grad():
            model.eval()
            for batch in batches:
                with contextlib.suppress(_Reached):
                    run_model(model, batch)
    finally:
        for handle in handles:
            handle.remove()
    assert total is not None, "the calibration windows reached no norm"
    return total


class _Principal:
    """The leading ``kept`` eigenvectors of damped ``XᵀX`` at some norms, and what share of ``XᵀX`` they keep."""

    def __init__(self, model: nn.Module, batches: Sequence[Any], kept: int, damping: float) -> None:
        self.model, self.batches, self.kept, self.damping = model, batches, kept, damping
        self.eigenvalues: list[Tensor] = []
        self.kept_shares: list[float] = []

    def __call__(self, norms: Sequence[str]) -> Tensor:
        covariance = stream_covariance(self.model, norms, self.batches)
        identity = torch.eye(covariance.shape[0], dtype=torch.float64)
        eigenvalues, vectors = torch.linalg.eigh(covariance + self.damping * covariance.diagonal().mean() * identity)
        order = eigenvalues.argsort(descending=True)
        basis = vectors[:, order[: self.kept]]
        self.eigenvalues.append(eigenvalues[order])
        self.kept_shares.append(float((basis.T @ covariance @ basis).trace() / covariance.trace().clamp(min=1e-300)))
        return basis


def _per_layer(model: nn.Module, layout: StreamLayout, principal: _Principal) -> None:
    """A basis per position of the stream, each from the PCA of the stream there on the model sliced so far; the
    residual around each site maps its input basis to its output basis (``Q_inᵀ Q_out``, ``k × k``)."""
    rotation.fuse_norms(model, layout)
    rotation.add_shortcuts(model, layout)
    first = layout.sites[0]
    previous = principal([first.norm])
    rotation.rotate_embeddings(model, layout, previous)
    rotation.rotate_readers(model, first, previous)
    rotation.set_shortcut(model, first, previous.T)  # the residual in full coordinates until the next basis is known
    for site, following in zip(layout.sites, layout.sites[1:], strict=False):
        basis = principal([following.norm])
        rotation.rotate_writers(model, site, basis)
        rotation.set_shortcut(model, site, previous.T @ basis)
        rotation.rotate_readers(model, following, basis)
        if following.shortcut:
            rotation.set_shortcut(model, following, basis.T)
        previous = basis
    rotation.narrow_config(model, layout, principal.kept)


def _check_width(model: nn.Module, layout: StreamLayout, kept: int, amount: float, round_to: int) -> None:
    width = model.get_submodule(layout.embeddings).weight.shape[1]
    if kept < SMALLEST:
        raise PruningError(
            f"`amount={amount}` keeps {kept} of the stream's {width} dimensions (rounded to a multiple of "
            f"`round_to={round_to}`); at least {SMALLEST} must stay: use a smaller amount."
        )
    if layout.table.layer_norm:  # the config keeps the dense width (rotation.narrow_config)
        return
    config = copy.deepcopy(model.config)
    config.head_dim = getattr(config, "head_dim", None) or width // config.num_attention_heads
    config.hidden_size = kept
    try:
        config.validate()
    except Exception as error:  # huggingface_hub's strict-dataclass errors are not ValueErrors
        heads = config.num_attention_heads
        raise PruningError(
            f"a stream of {kept} dimensions does not make a valid {type(config).__name__} ({error}); use "
            f"`round_to={math.lcm(round_to, heads)}` (a multiple of the {heads} attention heads too)."
        ) from error


def check_options(round_to: Any, damping: Any, amount: Any = 0.0) -> None:
    """What SliceGPT's arguments must be on any model."""
    if isinstance(amount, bool) or not isinstance(amount, int | float) or not 0 <= amount < 1:
        raise PruningError(f"`amount` is the fraction of the stream to remove, in [0, 1); got {amount!r}.")
    if isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1:
        raise PruningError(f"`round_to` must be a positive integer; got {round_to!r}.")
    if isinstance(damping, bool) or not isinstance(damping, int | float) or damping < 0:
        raise PruningError(f"`damping` must be ≥ 0 (a fraction of the mean of XᵀX's diagonal); got {damping!r}.")


def check_model(model: nn.Module) -> StreamLayout:
    """The stream of ``model`` if SliceGPT can slice it (known family, its kind of norms, not sliced per layer)."""
    layout = stream_layout(model)
    rotation.check_norms(model, layout)
    if rotation.has_shortcuts(model, layout):
        raise PruningError(
            "`model` was already sliced with `per_layer=True`: its shortcut matrices would not follow a second "
            "slicing. Slice the dense model once with the amount you want in all."
        )
    return layout


def slice_to(
    model: nn.Module, batches: Sequence[Any], kept: int, *, amount: float, round_to: int = 8, damping: float = 0.01,
    per_layer: bool = False,
) -> SliceResult:  # fmt: skip
    """:func:`slicegpt` to ``kept`` dimensions on ``batches`` (model inputs with ``input_ids``); ``amount`` and
    ``round_to`` only name the request in errors."""
    layout = check_model(model)
    width = model.get_submodule(layout.embeddings).weight.shape[1]
    _check_width(model, layout, kept, amount, round_to)
    tokens = sum(batch["input_ids"].numel() for batch in batches)
    if tokens < width:
        length = max(batch["input_ids"].shape[-1] for batch in batches)
        raise PruningError(
            f"`calibration` holds {tokens} tokens, fewer than the stream's {width} dimensions: XᵀX "
            f"would be rank-deficient and its trailing directions arbitrary. Give at least {width} tokens "
            f"(e.g. {math.ceil(width / length)} windows of {length})."
        )
    principal = _Principal(model, batches, kept, damping)
    before = count_params(model)
    if per_layer:
        _per_layer(model, layout, principal)
    else:
        rotation.fuse_norms(model, layout)  # the PCA sees the stream the rotated model carries (centred: LayerNorms)
        rotation.rotate_stream(model, layout, principal([site.norm for site in layout.sites]))
    model._lightning_prune_rewrites = [rewrite_of(model).to_dict()]  # what lightning_prune.save_pretrained writes
    shares = principal.kept_shares
    return SliceResult(before, count_params(model), width, kept, sum(shares) / len(shares), principal.eigenvalues)


def slicegpt(
    model: nn.Module, calibration: Tensor, amount: float, *, round_to: int = 8, damping: float = 0.01,
    batch_size: int = 8, per_layer: bool = False,
) -> SliceResult:  # fmt: skip
    """Rotate ``model``'s residual stream to its principal directions and slice off the least used ``amount``.

    Args:
        model: a Hugging Face causal LM of a family in ``lightning_prune.methods.decoder_families.DECODERS``
            (Llama, Mistral, Qwen2; OPT, GPT-2, Phi: LayerNorms folded first), changed in place.
        calibration: ``(count, tokens)`` token ids; at least ``hidden_size`` tokens in all.
        amount: the fraction of the stream's dimensions to remove, in ``[0, 1)``.
        round_to: the kept width is a multiple of this.
        damping: added to the diagonal of ``XᵀX`` as a fraction of its mean.
        batch_size: windows per forward pass while collecting ``XᵀX``.
        per_layer: a basis per position of the stream (the paper's SliceGPT), with ``k × k`` shortcut matrices on
            the residual (the decoder layers become subclasses that hold them); otherwise one basis for all, and
            a stock model (RMS families; a LayerNorm family's sliced norms are :class:`~.layernorm_fold.StreamRMSNorm`).

    Raises:
        PruningError: an unknown family or a configuration its table cannot take (post-norm OPT), norms that are
            not the family's RMS norms or LayerNorms, an amount that keeps fewer than 8 dimensions, a calibration set
            too small to span the stream; the model is then unchanged.

    Example::

        result = lp.slicegpt(model, data.calibration(128, 128), 0.25)
        lp.save_pretrained(model, folder)  # single basis, RMS family: AutoModelForCausalLM.from_pretrained reads it
        model = lp.from_pretrained(folder)  # either variant
    """
    check_options(round_to, damping, amount)
    layout = check_model(model)
    try:
        check_windows(model, calibration, "calibration")
    except ValueError as error:
        raise PruningError(str(error)) from error
    kept = kept_width(model.get_submodule(layout.embeddings).weight.shape[1], amount, round_to)
    return slice_to(
        model, _batches(calibration, batch_size), kept, amount=amount, round_to=round_to, damping=damping,
        per_layer=per_layer,
    )  # fmt: skip


def rewrite_of(model: nn.Module, prefix: str = "") -> Rewrite:
    """What a sliced ``model`` (at ``prefix`` inside the model a record is for) has that cuts to its shapes do not
    rebuild: an untied head, the shortcut matrices (their shapes), the norms' ε; for an RMS family an explicit head
    size; for a LayerNorm family the dense width its :class:`~.layernorm_fold.StreamRMSNorm` norms divide by and
    the readers folding gave a bias."""
    layout = stream_layout(model)
    final = model.get_submodule(layout.sites[-1].norm)
    shortcuts = {
        f"{site.block}.{site.shortcut}": list(matrix.shape)
        for site in layout.sites
        if site.shortcut and (matrix := getattr(model.get_submodule(site.block), site.shortcut, None)) is not None
    }
    options: dict[str, Any] = {"model": prefix, "eps": getattr(final, rotation.eps_attribute(final))}
    if isinstance(final, layernorm_fold.StreamRMSNorm):
        options |= {"width": final.width, "biases": layernorm_fold.biased_readers(model, layout)}
    else:
        options["head_dim"] = model.config.head_dim
    return Rewrite(KIND, {**options, "shortcuts": shortcuts})


def replay(root: nn.Module, options: dict[str, Any]) -> None:
    """Replay :func:`rewrite_of` on a model already cut to the sliced shapes (values: from its state dict)."""
    model = root.get_submodule(options["model"])
    layout = stream_layout(model)
    rotation.untie_head(model, layout)
    eps = float(options["eps"])
    if "width" in options:  # a LayerNorm family: scale-free norms over the dense width, biases folding added
        for site in layout.sites:
            layernorm_fold.replace_norm(model, site.norm, layernorm_fold.StreamRMSNorm(int(options["width"]), eps))
        layernorm_fold.add_reader_biases(model, list(options["biases"]))
    else:
        for site in layout.sites:
            norm = model.get_submodule(site.norm)
            setattr(norm, rotation.eps_attribute(norm), eps)
        model.config.rms_norm_eps = eps
        model.config.head_dim = int(options["head_dim"])
        model.config.hidden_size = model.get_submodule(layout.embeddings).weight.shape[1]
    if options["shortcuts"]:
        rotation.add_shortcuts(model, layout)
        reference = model.get_submodule(layout.embeddings).weight
        for site in layout.sites:
            shape = options["shortcuts"].get(f"{site.block}.{site.shortcut}")
            if site.shortcut and shape is not None:
                rotation.set_shortcut(model, site, torch.zeros(shape, dtype=reference.dtype, device=reference.device))
    model._lightning_prune_rewrites = [rewrite_of(model).to_dict()]


REWRITES.register(KIND, replay)


def load_sliced(folder: str | Path) -> nn.Module:
    """Load a folder of a model sliced with ``per_layer=True`` that its own ``save_pretrained`` wrote, in eval mode
    (:func:`lightning_prune.save_pretrained` folders load with :func:`lightning_prune.from_pretrained`).

    Its decoder layers hold shortcut matrices no stock class builds (``from_pretrained`` would drop them with a
    warning, and :func:`lightning_prune.from_pretrained` refuses them without the manifest that names them): the
    model is built from the saved config, given its shortcuts at the saved shapes, and loaded strictly. A
    single-Q folder loads here too.
    """
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(folder)
    model = AutoModelForCausalLM.from_config(config)
    state: dict[str, Tensor] = {}
    for path in sorted(Path(folder).glob("*.safetensors")):
        state.update(load_file(path))
    layout = stream_layout(model)
    if layout.table.layer_norm:
        raise PruningError(
            f"`{folder}` holds a {config.model_type!r} model: a sliced LayerNorm family's norms are not its class's, "
            "which a plain folder cannot say. Save it with `lightning_prune.save_pretrained` and load it with "
            "`lightning_prune.from_pretrained`."
        )
    saved = [site for site in layout.sites if site.shortcut and f"{site.block}.{site.shortcut}" in state]
    if saved:
        rotation.add_shortcuts(model, layout)
        for site in saved:
            rotation.set_shortcut(model, site, state[f"{site.block}.{site.shortcut}"])
    model.load_state_dict(state, strict=True)
    return model.eval()
