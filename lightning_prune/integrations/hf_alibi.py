"""BLOOM's attention heads, whose ALiBi slopes are those of the model's dense head count.

``BloomModel`` builds one ALiBi tensor, ``(batch × heads, 1, keys)``, for ``config.n_head`` heads and passes it to
every block; each ``BloomAttention`` reads it by its own head count. A layer that lost heads must read the rows of
the heads it kept, with their slopes. So before a trace each attention layer gets ``alibi_heads``, the indices of
the dense heads it holds (all of them: it computes what it did), and a forward pre-hook that selects those rows of
the ALiBi tensor; a head cut slices ``alibi_heads`` with the head's rows. The model and its config keep the dense
head count, from which the slopes are computed.

Once heads are gone the buffer is saved with the weights (a dense layer's is not: its state dict stays the
stock one), and a layer built afresh gets it back before the cuts of a record (``restore``) or the saved shapes
(``lightning_prune.from_pretrained``) reach it (:data:`~lightning_prune.fixups.ADDED_TENSORS`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from lightning_prune.fixups import ADDED_TENSORS, register_layer
from lightning_prune.graph.builder import TraceBuilder
from lightning_prune.graph.module_rules import register_module_rule
from lightning_prune.graph.rules.base import combine
from lightning_prune.integrations.hf_families import ALIBI_HEADS
from lightning_prune.integrations.huggingface import _is_class

BLOOM_ATTENTION = "transformers.models.bloom.modeling_bloom.BloomAttention"


def _is_bloom_attention(module: nn.Module) -> bool:
    return _is_class(module, BLOOM_ATTENTION)


def _kept_alibi(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]] | None:
    """The rows of the dense ALiBi tensor that belong to the heads ``module`` kept (none to select in a dense one)."""
    alibi, heads = kwargs.get("alibi"), module.alibi_heads
    hidden = args[0] if args else kwargs.get("hidden_states")
    if not isinstance(alibi, Tensor) or not isinstance(hidden, Tensor):
        return None
    dense = alibi.shape[0] // hidden.shape[0]
    if heads.numel() == dense:
        return None
    per_head = alibi.view(hidden.shape[0], dense, *alibi.shape[1:])
    return args, {**kwargs, "alibi": per_head.index_select(1, heads.to(alibi.device)).flatten(0, 1)}


def _select_alibi_heads(module: nn.Module, persistent: bool = False) -> None:
    """Give a BLOOM attention layer its dense heads' indices and the hook reading their ALiBi rows (once)."""
    if ALIBI_HEADS in module._buffers:
        return
    module.alibi_dense_heads = module.num_heads  # the head count the model computes slopes for
    indices = torch.arange(module.num_heads, device=module.query_key_value.weight.device)
    module.register_buffer(ALIBI_HEADS, indices, persistent=persistent)
    module.register_forward_pre_hook(_kept_alibi, with_kwargs=True)


def _added(module: nn.Module, name: str) -> bool:
    """A record or a saved folder names the kept heads of a layer built afresh: its dense ones, cut next."""
    if name != ALIBI_HEADS or not _is_bloom_attention(module):
        return False
    _select_alibi_heads(module, persistent=True)
    return True


def _saved_once_cut(module: nn.Module) -> None:
    """The kept heads are part of the state dict exactly when some are gone (``alibi_heads`` was cut)."""
    heads = module._buffers.get(ALIBI_HEADS)
    if heads is None:
        return
    if heads.numel() < module.alibi_dense_heads:
        module._non_persistent_buffers_set.discard(ALIBI_HEADS)
    else:
        module._non_persistent_buffers_set.add(ALIBI_HEADS)


def _bloom_attention(b: TraceBuilder, module: nn.Module, inputs: tuple, output: Any) -> None:
    """``query_key_value`` holds each head's query, key and value rows in turn (``[h0 q k v][h1 q k v]…``); a head
    is those rows with its ``dense`` columns and its entry of ``alibi_heads``. The residual is added inside."""
    result, probabilities = output if isinstance(output, tuple) and len(output) == 2 else (output, None)
    if len(inputs) < 2 or not all(isinstance(t, Tensor) for t in (*inputs[:2], result)):
        b.freeze_tensors([*inputs, result], "BloomAttention called oddly")
        return
    hidden, residual = inputs[:2]
    fused, dense, size = module.query_key_value, module.dense, module.head_dim
    heads = dense.weight.shape[1] // size
    rows = b.space(b.name_of(fused.weight), 0, fused.weight.shape[0])
    b.slot(fused.weight, 0, "out", rows)
    b.slot(fused.bias, 0, "follow", rows)
    b.slot(fused.weight, 1, "in", b.along(hidden, -1))
    per_head = rows.view(heads, 3 * size)
    b.unify_rows(per_head)
    b.slot(dense.weight, 1, "in", per_head[:, 2 * size :].reshape(-1))
    b.slot(module.alibi_heads, 0, "follow", per_head[:, 0])
    if module.pretraining_tp > 1 and module.slow_but_exact:
        b.freeze(rows, "`pretraining_tp` slices `dense` at bounds computed from the hidden size")
    produced = b.space(b.name_of(dense.weight), 0, dense.weight.shape[0])
    b.slot(dense.weight, 0, "out", produced)
    b.slot(dense.bias, 0, "follow", produced)
    shape = tuple(result.shape)
    items = [(produced.view(1, 1, -1), shape), (b.label(residual), tuple(residual.shape))]
    b.set(result, combine(b, items, shape, "add"))
    if isinstance(probabilities, Tensor) and probabilities.ndim == 4:
        b.set(probabilities, per_head[:, 0].view(1, heads, 1, 1))


register_module_rule(
    "transformers.bloom.BloomAttention", _is_bloom_attention, _bloom_attention, prepare=_select_alibi_heads
)
register_layer(BLOOM_ATTENTION, _saved_once_cut)
ADDED_TENSORS.register("transformers.bloom.alibi_heads", _added)
