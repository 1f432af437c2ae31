"""SliceGPT (Ashkboos et al., ICLR 2024) with one rotation for the whole stream: a stock, narrower model.

The residual stream of a decoder uses its ``D`` dimensions unevenly. The principal directions of what the
norms see over calibration windows (``XᵀX`` accumulated in float64 over the input of every norm on the stream,
damped by ``damping · mean(diag)``, ``eigh``, sorted by decreasing eigenvalue) give an orthogonal basis; the
stream is rotated into it (:func:`~lightning_prune.methods.rotation.rotate_stream`) and only the leading
``k = (1 − amount)·D`` directions (rounded to a multiple of ``round_to``) are kept. Readers lose input columns,
writers and the embeddings lose output rows, the norms shrink to ``k`` and compensate for averaging over ``k``.

One ``Q`` for every layer needs no shortcut matrices on the residual, so the result is a stock Hugging Face
model with ``config.hidden_size = k`` that ``save_pretrained`` / ``from_pretrained`` reload as it is. The
paper's per-layer ``Q`` (a PCA per block on the already-sliced model, with ``k × k`` shortcuts) is not here yet.

Each token enters ``XᵀX`` scaled to unit RMS. The stream grows with depth, so raw inputs let the last layers
decide the one basis for all; but a norm passes on only a token's direction, and the error slicing makes in
its output is the share of that direction outside the kept subspace. On the default model this weighting gives
test perplexity 89.3 / 91.3 / 93.6 at 20 / 25 / 30% against 98.4 / 106.5 / 111.6 with raw inputs (dense 85.8).
A damping of ``λ·I`` moves every eigenvalue alike and leaves the eigenvectors, hence the result, as they are.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from lightning_prune.errors import PruningError
from lightning_prune.language import check_windows
from lightning_prune.measure import count_params
from lightning_prune.methods.rotation import StreamLayout, check_norms, rotate_stream, stream_layout
from lightning_prune.running import observe

SMALLEST = 8  # fewer kept directions than this is not a model worth keeping


@dataclass
class SliceResult:
    """What :func:`slicegpt` did: sizes before and after, and how much of the calibration signal was kept."""

    params_before: int
    params_after: int
    hidden_before: int
    hidden_after: int
    kept_variance: float  # share of the (undamped, per-token normalised) stream energy along the kept directions
    eigenvalues: Tensor = field(repr=False)  # of the damped XᵀX, decreasing

    @property
    def params_ratio(self) -> float:
        return self.params_after / max(self.params_before, 1)


def kept_width(width: int, amount: float, round_to: int) -> int:
    """``(1 − amount)·width`` rounded to the nearest multiple of ``round_to`` (halves up), at most ``width``."""
    return min(width, round_to * math.floor((1 - amount) * width / round_to + 0.5))


def stream_covariance(model: nn.Module, layout: StreamLayout, calibration: Tensor, batch_size: int) -> Tensor:
    """``Σ xᵀx`` in float64 over every token of ``calibration`` at the input of every norm of ``layout``, each token
    ``x`` scaled to unit RMS (what the norm passes on, before its scale)."""
    width = model.get_submodule(layout.embeddings).weight.shape[1]
    total = torch.zeros(width, width, dtype=torch.float64)

    def accumulate(module: nn.Module, inputs: tuple) -> None:
        x = inputs[0].detach().reshape(-1, width).double()
        x = x * torch.rsqrt(x.square().mean(-1, keepdim=True).clamp(min=1e-30))  # each token's direction only
        total.add_((x.T @ x).cpu())

    handles = [model.get_submodule(s.norm).register_forward_pre_hook(accumulate) for s in layout.sites]
    batches = [{"input_ids": chunk, "use_cache": False} for chunk in calibration.split(batch_size)]
    observe(model, batches, handles)
    return total


def _check_width(model: nn.Module, kept: int, amount: float, round_to: int) -> None:
    width = model.config.hidden_size
    if kept < SMALLEST:
        raise PruningError(
            f"`amount={amount}` keeps {kept} of the stream's {width} dimensions (rounded to a multiple of "
            f"`round_to={round_to}`); at least {SMALLEST} must stay: use a smaller amount."
        )
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


def slicegpt(
    model: nn.Module, calibration: Tensor, amount: float, *, round_to: int = 8, damping: float = 0.01,
    batch_size: int = 8,
) -> SliceResult:  # fmt: skip
    """Rotate ``model``'s residual stream to its principal directions and slice off the least used ``amount``.

    Args:
        model: a Hugging Face causal LM of a family in ``lightning_prune.methods.rotation.DECODERS`` (Llama,
            Mistral, Qwen2), changed in place.
        calibration: ``(count, tokens)`` token ids; at least ``hidden_size`` tokens in all.
        amount: the fraction of the stream's dimensions to remove, in ``[0, 1)``.
        round_to: the kept width is a multiple of this.
        damping: added to the diagonal of ``XᵀX`` as a fraction of its mean.
        batch_size: windows per forward pass while collecting ``XᵀX``.

    Raises:
        PruningError: an unknown family, norms that are not RMS norms, an amount that keeps fewer than 8
            dimensions, a calibration set too small to span the stream; the model is then unchanged.

    Example::

        result = lp.slicegpt(model, data.calibration(128, 128), 0.25)
        model.save_pretrained(folder)  # AutoModelForCausalLM.from_pretrained(folder) reads it back
    """
    if not isinstance(amount, int | float) or not 0 <= amount < 1:
        raise PruningError(f"`amount` is the fraction of the stream to remove, in [0, 1); got {amount!r}.")
    if not isinstance(round_to, int) or round_to < 1:
        raise PruningError(f"`round_to` must be a positive integer; got {round_to!r}.")
    if not isinstance(damping, int | float) or damping < 0:
        raise PruningError(f"`damping` must be ≥ 0 (a fraction of the mean of XᵀX's diagonal); got {damping!r}.")
    layout = stream_layout(model)
    check_norms(model, layout)
    try:
        check_windows(model, calibration, "calibration")
    except ValueError as error:
        raise PruningError(str(error)) from error
    width = model.get_submodule(layout.embeddings).weight.shape[1]
    kept = kept_width(width, amount, round_to)
    _check_width(model, kept, amount, round_to)
    if calibration.numel() < width:
        raise PruningError(
            f"`calibration` holds {calibration.numel()} tokens, fewer than the stream's {width} dimensions: XᵀX "
            f"would be rank-deficient and its trailing directions arbitrary. Give at least {width} tokens "
            f"(e.g. {math.ceil(width / calibration.shape[1])} windows of {calibration.shape[1]})."
        )
    covariance = stream_covariance(model, layout, calibration, batch_size)
    damped = covariance + damping * covariance.diagonal().mean() * torch.eye(width, dtype=torch.float64)
    eigenvalues, vectors = torch.linalg.eigh(damped)
    order = eigenvalues.argsort(descending=True)
    eigenvalues, basis = eigenvalues[order], vectors[:, order[:kept]]
    energy = (basis.T @ covariance @ basis).trace() / covariance.trace().clamp(min=1e-300)
    before = count_params(model)
    rotate_stream(model, layout, basis)
    return SliceResult(before, count_params(model), width, kept, float(energy), eigenvalues)
