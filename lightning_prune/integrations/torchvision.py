"""torchvision layers: how Swin's window attention is traced, and attribute updates and replacements after
surgery (registered by class name; nothing here imports torchvision).

Swin's ``ShiftedWindowAttention`` (v1 and v2) computes its head size as ``channels // num_heads``
from its *input*, and MaxViT's ``RelativePositionalMultiHeadAttention`` reshapes its heads' output to
the input width. Neither can run once heads or stream channels are removed, so a cut replaces them
by :class:`PrunedWindowAttention` / :class:`PrunedRelativeAttention`: the same parameters and buffers
under the same names (state_dicts and optimizers keep working) with the head size held explicitly.
They compute exactly what the original computes with the removed heads' or channels' weights zeroed.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_prune.fixups import register_layer
from lightning_prune.graph.builder import TraceBuilder
from lightning_prune.graph.module_rules import register_module_rule

SWIN = "torchvision.models.swin_transformer."
MAXVIT = "torchvision.models.maxvit."


def _vision_transformer(model: nn.Module) -> None:
    """``VisionTransformer`` reshapes its patch embeddings with ``hidden_dim``: it follows the stream."""
    model.hidden_dim = model.conv_proj.weight.shape[0]


def _region_ids(length: int, window: int, shift: int) -> Tensor:
    """Which of the three bands of a cyclically shifted axis each position came from (0, 1, 2)."""
    position = torch.arange(length)
    return (position >= length - window).long() + (position >= length - shift).long()


class PrunedWindowAttention(nn.Module):
    """(Shifted) window self-attention of Swin v1 (``cosine=False``) and v2 (``cosine=True``).

    Input and output are ``[batch, height, width, channels]``. Holds ``qkv``, ``proj``, the relative
    position bias parameters and buffers of the module it replaces.
    """

    def __init__(self, original: nn.Module, head_dim: int) -> None:
        super().__init__()
        self.window_size = list(original.window_size)
        self.shift_size = list(original.shift_size)
        self.attention_dropout = original.attention_dropout
        self.dropout = original.dropout
        self.head_dim = head_dim
        self.qkv, self.proj = original.qkv, original.proj
        self.cosine = hasattr(original, "logit_scale")
        if self.cosine:
            self.logit_scale = original.logit_scale
            self.cpb_mlp = original.cpb_mlp
            self.register_buffer("relative_coords_table", original.relative_coords_table)
        else:
            self.relative_position_bias_table = original.relative_position_bias_table
        self.register_buffer("relative_position_index", original.relative_position_index)
        self.resize()

    def resize(self) -> None:
        self.num_heads = self.qkv.weight.shape[0] // (3 * self.head_dim)

    def position_bias(self) -> Tensor:
        """``[heads, tokens, tokens]`` added to every window's attention logits."""
        tokens = self.window_size[0] * self.window_size[1]
        table = self.cpb_mlp(self.relative_coords_table).view(-1, self.num_heads) if self.cosine else None
        table = self.relative_position_bias_table if table is None else table
        bias = table[self.relative_position_index].view(tokens, tokens, self.num_heads).permute(2, 0, 1)
        return 16 * torch.sigmoid(bias) if self.cosine else bias

    def forward(self, x: Tensor) -> Tensor:
        batch, height, width, _ = x.shape
        (wh, ww), (sh, sw) = self.window_size, self.shift_size
        x = F.pad(x, (0, 0, 0, (-width) % ww, 0, (-height) % wh))
        rows, cols = x.shape[1], x.shape[2]
        sh, sw = (sh if wh < rows else 0), (sw if ww < cols else 0)
        if sh or sw:
            x = torch.roll(x, shifts=(-sh, -sw), dims=(1, 2))
        grid = (rows // wh, cols // ww)
        windows = x.reshape(batch, grid[0], wh, grid[1], ww, -1).transpose(2, 3).reshape(-1, wh * ww, x.shape[-1])

        bias = self.qkv.bias
        if self.cosine and bias is not None:  # v2 has no key bias
            query_bias, key_bias, value_bias = bias.chunk(3)
            bias = torch.cat([query_bias, torch.zeros_like(key_bias), value_bias])
        qkv = F.linear(windows, self.qkv.weight, bias).unflatten(-1, (3, self.num_heads, self.head_dim))
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [windows, heads, tokens, head_dim]
        if self.cosine:
            scale = torch.clamp(self.logit_scale, max=math.log(100.0)).exp()
            logits = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1) * scale
        else:
            logits = (q * self.head_dim**-0.5) @ k.transpose(-2, -1)
        logits = logits + self.position_bias().unsqueeze(0)
        if sh or sw:  # tokens that the shift brought together from different bands do not attend
            ids = _region_ids(rows, wh, sh).to(x.device)[:, None] * 3 + _region_ids(cols, ww, sw).to(x.device)
            ids = ids.reshape(grid[0], wh, grid[1], ww).transpose(1, 2).reshape(-1, wh * ww)
            mask = (ids[:, :, None] != ids[:, None, :]).to(logits.dtype) * -100.0
            logits = (logits.unflatten(0, (batch, -1)) + mask[None, :, None]).flatten(0, 1)
        attention = F.dropout(logits.softmax(-1), p=self.attention_dropout, training=self.training)
        out = (attention @ v).transpose(1, 2).flatten(2)
        out = F.dropout(self.proj(out), p=self.dropout, training=self.training)

        out = out.reshape(batch, grid[0], grid[1], wh, ww, -1).transpose(2, 3).reshape(batch, rows, cols, -1)
        if sh or sw:
            out = torch.roll(out, shifts=(sh, sw), dims=(1, 2))
        return out[:, :height, :width].contiguous()


class PrunedRelativeAttention(nn.Module):
    """MaxViT's relative-position attention over ``[batch, groups, tokens, channels]`` with explicit head size."""

    def __init__(self, original: nn.Module) -> None:
        super().__init__()
        self.head_dim, self.size, self.max_seq_len = original.head_dim, original.size, original.max_seq_len
        self.scale_factor = original.scale_factor
        self.to_qkv, self.merge = original.to_qkv, original.merge
        self.relative_position_bias_table = original.relative_position_bias_table
        self.register_buffer("relative_position_index", original.relative_position_index)
        self.resize()

    def resize(self) -> None:
        self.n_heads = self.to_qkv.weight.shape[0] // (3 * self.head_dim)

    def forward(self, x: Tensor) -> Tensor:
        batch, groups, tokens, _ = x.shape
        q, k, v = (
            t.reshape(batch, groups, tokens, self.n_heads, self.head_dim).transpose(2, 3)
            for t in self.to_qkv(x).chunk(3, dim=-1)
        )
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        bias = bias.view(self.max_seq_len, self.max_seq_len, self.n_heads).permute(2, 0, 1)
        attention = (q @ (k * self.scale_factor).transpose(-2, -1) + bias).softmax(-1)
        out = (attention @ v).transpose(2, 3).reshape(batch, groups, tokens, self.n_heads * self.head_dim)
        return self.merge(out)


def _swin_attention(module: nn.Module) -> nn.Module:
    heads = (
        module.logit_scale.shape[0] if hasattr(module, "logit_scale") else module.relative_position_bias_table.shape[1]
    )
    return PrunedWindowAttention(module, module.qkv.weight.shape[0] // (3 * heads))


def _resize(module: nn.Module) -> None:
    module.resize()


def _is_window_attention(module: nn.Module) -> bool:
    swin = ("ShiftedWindowAttention", "ShiftedWindowAttentionV2")
    if isinstance(module, PrunedWindowAttention):
        return True
    return type(module).__module__ == SWIN.rstrip(".") and type(module).__name__ in swin


def _trace_window_attention(b: TraceBuilder, module: nn.Module, inputs: tuple, output: Any) -> None:
    """Swin's (shifted) window attention: a head is its q, k, v rows, its projection columns and its column of
    the position-bias table (v1) or its row of the bias MLP's output and its logit scale (v2). The bias MLP's
    hidden neurons are a group of their own."""
    if len(inputs) != 1 or not isinstance(inputs[0], Tensor) or not isinstance(output, Tensor):
        b.freeze_tensors([*inputs, output], f"{type(module).__name__} called oddly")
        return
    qkv, proj = module.qkv, module.proj
    heads = module.num_heads
    rows = b.space(b.name_of(qkv.weight), 0, qkv.weight.shape[0]).view(3, heads, -1)
    head = b.unify_rows(rows.permute(1, 0, 2).reshape(heads, -1))
    b.slot(qkv.weight, 0, "out", rows.reshape(-1))
    if qkv.bias is not None:
        b.slot(qkv.bias, 0, "follow", rows.reshape(-1))
    b.slot(qkv.weight, 1, "in", b.along(inputs[0], -1))
    b.slot(proj.weight, 1, "in", rows[0].reshape(-1))
    if hasattr(module, "logit_scale"):
        b.slot(module.logit_scale, 0, "follow", head)
        hidden, last = module.cpb_mlp[0], module.cpb_mlp[2]
        neurons = b.space(b.name_of(hidden.weight), 0, hidden.weight.shape[0])
        b.slot(hidden.weight, 0, "out", neurons)
        if hidden.bias is not None:
            b.slot(hidden.bias, 0, "follow", neurons)
        b.slot(last.weight, 1, "in", neurons)
        b.slot(last.weight, 0, "follow", head)
    else:
        b.slot(module.relative_position_bias_table, 1, "follow", head)
    b.linear_output(proj, output)


register_module_rule("torchvision.swin.window_attention", _is_window_attention, _trace_window_attention)
register_layer("torchvision.models.vision_transformer.VisionTransformer", _vision_transformer)
register_layer(SWIN + "ShiftedWindowAttention", _swin_attention)
register_layer(MAXVIT + "RelativePositionalMultiHeadAttention", PrunedRelativeAttention)
register_layer(PrunedWindowAttention, _resize)
register_layer(PrunedRelativeAttention, _resize)
