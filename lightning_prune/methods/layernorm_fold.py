"""LayerNorm models (OPT, GPT-2, Phi) made rotation-invariant: the norms' work moves into the layers around them.

A LayerNorm computes ``γ ⊙ (x − mean(x)) / sqrt(var(x) + ε) + β``. Three changes leave the function as it is and
leave a scale-free RMS norm in its place:

- the mean: the stream is the sum of what the embeddings and the writers (``o_proj``, ``fc2``, …) put into it;
  centring each of them (``W ← (I − 11ᵀ/D)·W``, ``b ← (I − 11ᵀ/D)·b``, every embedding row minus its mean)
  makes every token of the stream mean-free, so subtracting the mean does nothing any more and
  ``var(x) = ‖x‖²/D``;
- the scale and bias: each reader after a norm gets ``W ← W·diag(γ)`` and ``b ← b + W·β`` (a reader without a
  bias gets one when ``β ≠ 0``, as GPT-2's and OPT's LM heads);
- the norm: :class:`StreamRMSNorm`, ``x / sqrt(‖x‖²/D + ε)``, with ``D`` the original width. It commutes with
  any orthogonal ``Q``; sliced to ``k < D`` dimensions it still divides by ``D``, which keeps the dense model's
  normalisation (exact when the dropped directions carried nothing).

The weights of GPT-2's ``Conv1D`` are stored input × output; :func:`matrix` and :func:`set_matrix` give every
reader and writer as ``out × in``, so the folding here and the rotations read each layer the same way.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lightning_prune.errors import PruningError
from lightning_prune.fixups import fixup_for
from lightning_prune.methods.decoder_families import StreamLayout


class StreamRMSNorm(nn.Module):
    """``x / sqrt(‖x‖²/width + eps)``: a scale-free RMS norm over ``width`` squares, whatever width ``x`` has now
    (``width`` stays the dense stream's; computed in float32 at least)."""

    def __init__(self, width: int, eps: float) -> None:
        super().__init__()
        self.width, self.eps = width, eps

    def forward(self, hidden_states: Tensor) -> Tensor:
        x = hidden_states.to(torch.promote_types(hidden_states.dtype, torch.float32))
        return (x * torch.rsqrt(x.square().sum(-1, keepdim=True) / self.width + self.eps)).to(hidden_states.dtype)

    def extra_repr(self) -> str:
        return f"width={self.width}, eps={self.eps}"


def _transposed(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D"  # transformers.pytorch_utils.Conv1D: y = x·W + b, W is in × out


def matrix(module: nn.Module) -> Tensor:
    """The weight of a linear layer (``nn.Linear`` or GPT-2's ``Conv1D``) as ``out × in``, in float64."""
    weight = module.weight.detach().double()
    return weight.T if _transposed(module) else weight


def set_matrix(module: nn.Module, value: Tensor) -> None:
    """Set a linear layer's weight from an ``out × in`` ``value`` (in the weight's dtype) and its size attributes."""
    weight = module.weight
    module.weight.data = (value.T if _transposed(module) else value).contiguous().to(weight.device, weight.dtype)
    fixup = fixup_for(module)
    if fixup is not None:
        fixup(module)


def _reader_bias(module: nn.Module) -> Tensor:
    """A reader's bias, created as zeros (a new parameter) when it has none."""
    if module.bias is None:
        weight = module.weight
        module.bias = nn.Parameter(torch.zeros(matrix(module).shape[0], dtype=weight.dtype, device=weight.device))
    return module.bias


def _is_layer_norm(norm: nn.Module, width: int) -> bool:
    """Whether ``norm`` computes ``γ ⊙ (x − mean) / sqrt(var + ε) + β`` over ``width`` (γ, β optional)."""
    weight, bias, eps = getattr(norm, "weight", None), getattr(norm, "bias", None), getattr(norm, "eps", None)
    if not isinstance(eps, float) or any(p is not None and (p.ndim, p.numel()) != (1, width) for p in (weight, bias)):
        return False
    reference = next(norm.parameters(), torch.empty(0))
    x = torch.randn(3, width, generator=torch.Generator().manual_seed(0)).add(1.0).to(reference.device, reference.dtype)
    with torch.no_grad():
        expected = (x - x.mean(-1, keepdim=True)) * torch.rsqrt(x.var(-1, unbiased=False, keepdim=True) + eps)
        expected = expected * (1 if weight is None else weight) + (0 if bias is None else bias)
        return torch.allclose(norm(x), expected, rtol=1e-3, atol=1e-5)


def check_layer_norms(model: nn.Module, layout: StreamLayout) -> None:
    """Refuse a LayerNorm family's model whose norms cannot be folded: each must be a LayerNorm over the stream
    (or all already :class:`StreamRMSNorm`, from an earlier slicing), read by linear layers only."""
    width = model.get_submodule(layout.embeddings).weight.shape[1]
    norms = [(site, model.get_submodule(site.norm)) for site in layout.sites]
    folded = [isinstance(norm, StreamRMSNorm) for _, norm in norms]
    if all(folded):
        return
    for (site, norm), done in zip(norms, folded, strict=True):
        if done or not _is_layer_norm(norm, width):
            found = (
                "is a StreamRMSNorm (folded by an earlier slicing) while other norms are LayerNorms"
                if done
                else f"({type(norm).__name__}) is not a LayerNorm γ·(x−mean)/sqrt(var+ε)+β over the stream's {width} "
                "dimensions"
            )
            raise PruningError(
                f"`{site.norm}` {found}: a {model.config.model_type!r} model's norms must all be its LayerNorms (or "
                "all folded by an earlier slicing) for their mean, scale and bias to be folded into the layers around "
                "them."
            )
        for name in (*site.readers, *site.writers):
            layer = model.get_submodule(name)
            if not isinstance(layer, nn.Linear) and not _transposed(layer):
                raise PruningError(
                    f"`{name}` ({type(layer).__name__}) reads or writes the stream but is not a linear layer "
                    "(nn.Linear or Conv1D): the norm's scale, bias and mean cannot be folded into it."
                )


def fold_layer_norms(model: nn.Module, layout: StreamLayout) -> None:
    """Centre the embeddings and writers, fold each LayerNorm's γ and β into its readers and replace it by a
    :class:`StreamRMSNorm` over the stream's width; the function is unchanged (see the module doc). Does nothing
    when the norms were folded already."""
    width = model.get_submodule(layout.embeddings).weight.shape[1]
    if isinstance(model.get_submodule(layout.sites[0].norm), StreamRMSNorm):
        return
    with torch.no_grad():
        for name in (layout.embeddings, *layout.positions):
            embeddings = model.get_submodule(name).weight
            embeddings.data = (embeddings.double() - embeddings.double().mean(-1, keepdim=True)).to(embeddings.dtype)
        for writer in (model.get_submodule(name) for site in layout.sites for name in site.writers):
            weight = matrix(writer)
            set_matrix(writer, weight - weight.mean(0, keepdim=True))
            if writer.bias is not None:
                writer.bias.data = (writer.bias.double() - writer.bias.double().mean()).to(writer.bias.dtype)
        for site in layout.sites:
            norm = model.get_submodule(site.norm)
            scale = norm.weight.detach().double() if norm.weight is not None else None
            shift = norm.bias.detach().double() if norm.bias is not None else None
            for reader in (model.get_submodule(name) for name in site.readers):
                weight = matrix(reader)
                if shift is not None and bool(shift.ne(0).any()):
                    bias = _reader_bias(reader)
                    bias.data = (bias.double() + weight @ shift.to(weight.device)).to(bias.dtype)
                if scale is not None:
                    set_matrix(reader, weight * scale.to(weight.device))
            replace_norm(model, site.norm, StreamRMSNorm(width, norm.eps))


def replace_norm(model: nn.Module, path: str, norm: nn.Module) -> None:
    """Put ``norm`` at ``path`` in ``model``."""
    parent, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, name, norm)


def biased_readers(model: nn.Module, layout: StreamLayout) -> list[str]:
    """The readers of the stream that are ``nn.Linear`` layers with a bias (folding may have given them one)."""
    return [
        name
        for site in layout.sites
        for name in site.readers
        if isinstance(layer := model.get_submodule(name), nn.Linear) and layer.bias is not None
    ]


def add_reader_biases(model: nn.Module, names: list[str]) -> None:
    """Give each of the ``nn.Linear`` readers ``names`` a zero bias if it has none (its value: from a state dict)."""
    for name in names:
        _reader_bias(model.get_submodule(name))
