"""Modules traced as a whole: their internals are not followed, a rule maps their inputs to their output.

Used where a module's own ops would say less than the module means: Hugging Face's hand-written
RMSNorm computes ``x * rsqrt(mean(x²))``, a reduction over channels that is really a normalisation
(pruning a channel changes the statistic slightly, like LayerNorm), not a mixing of channels.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor, nn

from lightning_prune.graph import labels as L
from lightning_prune.graph.tracer import TraceBuilder

AtomicRule = Callable[[TraceBuilder, nn.Module, tuple, Any], None]
ATOMIC: list[tuple[Callable[[nn.Module], bool], AtomicRule]] = []


def register_atomic(predicate: Callable[[nn.Module], bool], rule: AtomicRule) -> None:
    """Trace modules for which ``predicate(module)`` holds with ``rule(builder, module, inputs, output)``."""
    ATOMIC.append((predicate, rule))


def atomic_rule(module: nn.Module) -> AtomicRule | None:
    for predicate, rule in ATOMIC:
        if predicate(module):
            return rule
    return None


def _is_rms_norm(module: nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    return (
        type(module).__name__.endswith("RMSNorm")
        and not isinstance(module, nn.RMSNorm)
        and isinstance(weight, nn.Parameter)
        and weight.ndim == 1
    )


def _rms_norm(b: TraceBuilder, module: nn.Module, inputs: tuple, output: Any) -> None:
    source = inputs[0] if inputs else None
    if not isinstance(source, Tensor) or not isinstance(output, Tensor):
        b.freeze_tensors([*inputs, output], f"{type(module).__name__} with unexpected inputs")
        return
    labels = b.label(source)
    if L.varying_dims(labels) - {source.ndim - 1}:
        b.freeze(labels, f"{type(module).__name__} over multi-dimensional channel labels")
        return
    channels = b.along(source, -1)
    b.normalized.append(channels)
    b.slot(module.weight, 0, "follow", channels)
    b.set(output, labels)


register_atomic(_is_rms_norm, _rms_norm)


def _is_attention(module: nn.Module) -> bool:
    from lightning_prune.layers import PrunedMultiheadAttention

    if isinstance(module, PrunedMultiheadAttention):
        return True
    return (
        isinstance(module, nn.MultiheadAttention)
        and module._qkv_same_embed_dim
        and module.bias_k is None
        and not module.add_zero_attn
    )


def _attention(b: TraceBuilder, module: nn.Module, inputs: tuple, output: Any) -> None:
    """Multi-head attention over a fused projection: each head's q, k, v rows and out-projection columns go
    together; the projection reads the query, key and value channels through the same columns."""
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
    _output_projection(b, out_proj, result)


def _output_projection(b: TraceBuilder, linear: nn.Linear, output: Tensor) -> None:
    """The module's output is produced by ``linear`` (called functionally inside it) along its last dimension."""
    produced = b.space(b.name_of(linear.weight), 0, linear.weight.shape[0])
    b.slot(linear.weight, 0, "out", produced)
    if linear.bias is not None:
        b.slot(linear.bias, 0, "follow", produced)
    b.set(output, produced.view([1] * (output.ndim - 1) + [-1]))


register_atomic(_is_attention, _attention)


def _is_window_attention(module: nn.Module) -> bool:
    from lightning_prune.integrations.torchvision import PrunedWindowAttention

    swin = ("ShiftedWindowAttention", "ShiftedWindowAttentionV2")
    if isinstance(module, PrunedWindowAttention):
        return True
    return type(module).__module__ == "torchvision.models.swin_transformer" and type(module).__name__ in swin


def _window_attention(b: TraceBuilder, module: nn.Module, inputs: tuple, output: Any) -> None:
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
    _output_projection(b, proj, output)


register_atomic(_is_window_attention, _window_attention)


def _sync_batch_norm(b: TraceBuilder, module: nn.Module, inputs: tuple, output: Any) -> None:
    """``nn.SyncBatchNorm`` under a process group runs statistics kernels of its own (no rules); per channel
    it is a BatchNorm: its weight, bias and running statistics follow the channels of dimension 1."""
    source = inputs[0] if inputs else None
    if not isinstance(source, Tensor) or not isinstance(output, Tensor) or source.ndim < 2:
        b.freeze_tensors([*inputs, output], "SyncBatchNorm called oddly")
        return
    labels = b.label(source)
    if L.varying_dims(labels) - {1}:
        b.freeze(labels, "SyncBatchNorm over multi-dimensional channel labels")
        return
    channels = b.along(source, 1)
    for tensor in (module.weight, module.bias, module.running_mean, module.running_var):
        if tensor is not None:
            b.slot(tensor, 0, "follow", channels)
    b.set(output, labels)


register_atomic(lambda module: isinstance(module, nn.SyncBatchNorm), _sync_batch_norm)
