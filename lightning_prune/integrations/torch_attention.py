"""``torch.nn.MultiheadAttention``: heads traced as units, and the layer that holds it once heads are cut.

A head of a fused projection is its q, k and v rows and its out-projection columns. ``nn.MultiheadAttention``
derives its head size from ``embed_dim // num_heads`` and expects a fused projection of ``3 * embed_dim``
rows, so after heads (or stream channels) are removed it cannot hold its own weights: the cut replaces it
by :class:`PrunedMultiheadAttention`, which holds the very same parameters (the optimizer keeps working)
with an explicit head size, and is called exactly like the original.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_prune.errors import PruningError
from lightning_prune.fixups import register_layer
from lightning_prune.graph.builder import TraceBuilder
from lightning_prune.graph.module_rules import register_module_rule
from lightning_prune.latency_table import TIMED_LAYERS, LayerSpec, TimedLayer


class PrunedMultiheadAttention(nn.Module):
    """Self- or cross-attention over a fused q/k/v projection of ``num_heads * head_dim`` rows each.

    Drop-in for a pruned ``nn.MultiheadAttention`` (``_qkv_same_embed_dim``, no ``add_bias_kv``): same
    parameter names and state_dict keys, same call signature and outputs.
    """

    def __init__(self, original: nn.MultiheadAttention, head_dim: int) -> None:
        super().__init__()
        self.in_proj_weight = original.in_proj_weight
        self.in_proj_bias = original.in_proj_bias
        self.out_proj = original.out_proj
        self.head_dim = head_dim
        self.dropout = original.dropout
        self.batch_first = original.batch_first
        self._qkv_same_embed_dim = False  # keeps TransformerEncoderLayer off its fused fast path
        self.resize()

    def resize(self) -> None:
        self.num_heads = self.in_proj_weight.shape[0] // (3 * self.head_dim)
        self.embed_dim = self.in_proj_weight.shape[1]

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = True,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        batched = query.dim() == 3
        if not batched:
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
        if not self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        weights = self.in_proj_weight.chunk(3)
        biases = self.in_proj_bias.chunk(3) if self.in_proj_bias is not None else (None, None, None)
        batch, length, heads = query.shape[0], query.shape[1], self.num_heads

        def split(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
            return F.linear(x, weight, bias).view(batch, x.shape[1], heads, self.head_dim).transpose(1, 2)

        q, k, v = (split(x, w, b) for x, w, b in zip((query, key, value), weights, biases, strict=True))
        mask = self._mask(attn_mask, key_padding_mask, batch, length, k.shape[2], q.dtype)
        dropout = self.dropout if self.training else 0.0
        if need_weights:
            scores = q @ k.transpose(-2, -1) / math.sqrt(self.head_dim)
            if mask is not None:
                scores = scores + mask
            elif is_causal:
                scores = scores.masked_fill(torch.ones_like(scores, dtype=torch.bool).triu(1), float("-inf"))
            attention = F.dropout(scores.softmax(-1), dropout, self.training)
            output = attention @ v
            attention = attention.mean(1) if average_attn_weights else attention
        else:
            output = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=is_causal and mask is None
            )
            attention = None
        output = self.out_proj(output.transpose(1, 2).reshape(batch, length, heads * self.head_dim))
        if not self.batch_first:
            output = output.transpose(0, 1)
        if not batched:
            output = output.squeeze(1)
            attention = attention.squeeze(0) if attention is not None else None
        return output, attention

    def _mask(
        self, attn_mask: Tensor | None, padding: Tensor | None, batch: int, length: int, source: int, dtype: torch.dtype
    ) -> Tensor | None:
        """One additive mask of shape (batch, heads or 1, length, source) from PyTorch's two kinds."""
        mask = None
        if attn_mask is not None:
            if attn_mask.dim() == 3:
                if attn_mask.shape[0] != batch * self.num_heads:
                    raise PruningError(
                        f"a per-head `attn_mask` of {attn_mask.shape[0]} rows does not fit {batch} × "
                        f"{self.num_heads} heads left after pruning; pass a (length, source) mask."
                    )
                attn_mask = attn_mask.view(batch, self.num_heads, length, source)
            mask = _additive(attn_mask, dtype)
        if padding is not None:
            padded = _additive(padding, dtype).view(batch, 1, 1, source)
            mask = padded if mask is None else mask + padded
        return mask


def _additive(mask: Tensor, dtype: torch.dtype) -> Tensor:
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))
    return mask.to(dtype)


def _is_attention(module: nn.Module) -> bool:
    if isinstance(module, PrunedMultiheadAttention):
        return True
    return (
        isinstance(module, nn.MultiheadAttention)
        and module._qkv_same_embed_dim
        and module.bias_k is None
        and not module.add_zero_attn
    )


def _trace_attention(b: TraceBuilder, module: nn.Module, inputs: tuple, output: Any) -> None:
    """Each head's q, k, v rows and out-projection columns go together; the projection reads the query, key and
    value channels through the same columns."""
    result = output[0] if isinstance(output, tuple) else output
    if len(inputs) < 3 or not all(isinstance(t, Tensor) for t in inputs[:3]) or not isinstance(result, Tensor):
        b.freeze_tensors([*inputs, *(output if isinstance(output, tuple) else [output])], "attention called oddly")
        return
    weight, bias, out_proj = module.in_proj_weight, module.in_proj_bias, module.out_proj
    heads, head_dim = weight.shape[0] // (3 * module.head_dim), module.head_dim
    rows = b.space(b.name_of(weight), 0, weight.shape[0]).view(3, heads, head_dim)
    b.unify_rows(rows.permute(1, 0, 2).reshape(heads, -1))
    b.slot(weight, 0, "out", rows.reshape(-1))
    if bias is not None:
        b.slot(bias, 0, "follow", rows.reshape(-1))
    for source in inputs[:3]:
        b.slot(weight, 1, "in", b.along(source, -1))
    b.slot(out_proj.weight, 1, "in", rows[0].reshape(-1))
    b.linear_output(out_proj, result)


def _fix_attention(module: nn.MultiheadAttention) -> nn.Module | None:
    """A pruned ``nn.MultiheadAttention`` cannot hold its weights: hand them to a layer that can."""
    if module.in_proj_weight.shape == (3 * module.embed_dim, module.embed_dim):
        return None
    return PrunedMultiheadAttention(module, module.head_dim)


def _resize(module: PrunedMultiheadAttention) -> None:
    module.resize()


class _SelfAttention(nn.Module):
    """One self-attention call on ``x``, as the latency table times a layer."""

    def __init__(self, attention: nn.Module, need_weights: bool) -> None:
        super().__init__()
        self.attention, self.need_weights = attention, need_weights

    def forward(self, x: Tensor) -> Tensor:
        return self.attention(x, x, x, need_weights=self.need_weights)[0]


def _describe_attention(module: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> LayerSpec | None:
    """Self-attention without masks, as the table can time it alone: ``in`` is the stream's width (the fused
    projection's columns), ``out`` the projection's rows (3 per head channel); other calls stay residual time."""
    names = (
        "query",
        "key",
        "value",
        "key_padding_mask",
        "need_weights",
        "attn_mask",
        "average_attn_weights",
        "is_causal",
    )
    call = {**dict(zip(names, args, strict=False)), **kwargs}
    query = call.get("query")
    if call.get("key") is not query or call.get("value") is not query or query.dim() != 3:
        return None
    if any(call.get(name) is not None for name in ("key_padding_mask", "attn_mask")) or call.get("is_causal"):
        return None
    weight, out_proj = module.in_proj_weight, module.out_proj
    fused = type(module) is nn.MultiheadAttention
    options = (
        3 * module.head_dim, module.in_proj_bias is not None, module.batch_first, bool(call.get("need_weights", True)),
        out_proj.out_features, out_proj.bias is not None, fused,
    )  # fmt: skip
    return LayerSpec("MultiheadAttention", weight.shape[1], weight.shape[0], tuple(query.shape), options)


def _attention_outputs(spec: LayerSpec, in_width: int, out_width: int) -> int:
    """The out-projection's width: it follows the stream (``in``) where the dense layer's did."""
    return in_width if spec.options[4] == spec.in_width else spec.options[4]


def _build_attention(spec: LayerSpec, in_width: int, out_width: int) -> nn.Module:
    """``nn.MultiheadAttention`` at the dense widths of an unpruned layer (its fused fast path included), else the
    :class:`PrunedMultiheadAttention` a cut leaves, with ``out_width // block`` heads."""
    block, bias, batch_first, need_weights, _, out_bias, fused = spec.options
    heads, head_dim = max(1, out_width // block), block // 3
    attention = nn.MultiheadAttention(heads * head_dim, heads, bias=bias, batch_first=batch_first)
    if not (fused and (in_width, out_width) == (spec.in_width, spec.out_width)):
        attention.in_proj_weight = nn.Parameter(torch.randn(3 * heads * head_dim, in_width) / math.sqrt(in_width))
        attention.out_proj = nn.Linear(heads * head_dim, _attention_outputs(spec, in_width, out_width), bias=out_bias)
        attention = PrunedMultiheadAttention(attention, head_dim)
    return _SelfAttention(attention, need_weights).eval()


register_module_rule("torch.nn.MultiheadAttention", _is_attention, _trace_attention)
TIMED_LAYERS.register(
    "MultiheadAttention",
    TimedLayer(
        matches=_is_attention,
        describe=_describe_attention,
        build=_build_attention,
        weight="in_proj_weight",
        block=lambda spec: spec.options[0],
        outputs=_attention_outputs,
    ),
)
register_layer(nn.MultiheadAttention, _fix_attention)
register_layer(PrunedMultiheadAttention, _resize)
