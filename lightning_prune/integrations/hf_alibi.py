"""BLOOM and Falcon: attention over one fused q/k/v projection, whose heads may carry ALiBi slopes.

``BloomModel`` (and ``FalconModel`` with ``alibi``) builds one ALiBi tensor for the config's head count and passes it
to every layer: BLOOM's ``(batch × heads, 1, keys)``, Falcon's ``(batch, heads, 1, keys)``, which Falcon also adds
into the attention mask, ``(batch, heads, queries, keys)``. A layer that lost heads must read the rows of the heads
it kept, with their slopes. So before a trace each such layer gets ``alibi_heads``, the indices of the dense heads it
holds (all of them: it computes what it did), and a forward pre-hook that selects those rows of the ALiBi tensor and
of a per-head mask; a head cut slices ``alibi_heads`` with the head's rows. The model and its config keep the dense
head count, from which the slopes are computed.

Once heads are gone the buffer is saved with the weights (a dense layer's is not: its state dict stays the
stock one), and a layer built afresh gets it back before the cuts of a record (``restore``) or the saved shapes
(``lightning_prune.from_pretrained``) reach it (:data:`~lightning_prune.fixups.ADDED_TENSORS`).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_prune.fixups import ADDED_TENSORS, register_layer
from lightning_prune.graph.builder import TraceBuilder
from lightning_prune.graph.module_rules import register_module_rule
from lightning_prune.graph.rules.base import OP_RULES, Call, combine
from lightning_prune.integrations.hf_families import ALIBI_HEADS
from lightning_prune.integrations.huggingface import _is_class

BLOOM_ATTENTION = "transformers.models.bloom.modeling_bloom.BloomAttention"
FALCON = "transformers.models.falcon.modeling_falcon"


def _is_bloom_attention(module: nn.Module) -> bool:
    return _is_class(module, BLOOM_ATTENTION)


def _is_falcon_attention(module: nn.Module) -> bool:
    return _is_class(module, f"{FALCON}.FalconAttention")


def _reads_alibi(module: nn.Module) -> bool:
    return _is_bloom_attention(module) or (_is_falcon_attention(module) and module.config.alibi)


def _kept_alibi(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]] | None:
    """The rows of the dense ALiBi tensor (and of a mask holding it) that belong to the heads ``module`` kept."""
    heads, dense = module.alibi_heads, module.alibi_dense_heads
    hidden = args[0] if args else kwargs.get("hidden_states")
    if heads.numel() == dense or not isinstance(hidden, Tensor):
        return None  # a dense layer: nothing to select
    batch, selected = hidden.shape[0], dict(kwargs)
    for key in ("alibi", "attention_mask"):
        value = kwargs.get(key)
        if not isinstance(value, Tensor):
            continue
        if value.ndim == 4 and value.shape[1] == dense:  # (batch, heads, queries or 1, keys)
            selected[key] = value.index_select(1, heads.to(value.device))
        elif value.ndim == 3 and value.shape[0] == batch * dense:  # (batch × heads, 1, keys)
            per_head = value.view(batch, dense, *value.shape[1:])
            selected[key] = per_head.index_select(1, heads.to(value.device)).flatten(0, 1)
    return args, selected


def _select_alibi_heads(module: nn.Module, persistent: bool = False) -> None:
    """Give an attention layer that reads ALiBi its dense heads' indices and the hook reading their rows (once)."""
    if ALIBI_HEADS in module._buffers or not _reads_alibi(module):
        return
    module.alibi_dense_heads = module.num_heads  # the head count the model computes slopes for
    indices = torch.arange(module.num_heads, device=module.query_key_value.weight.device)
    module.register_buffer(ALIBI_HEADS, indices, persistent=persistent)
    module.register_forward_pre_hook(_kept_alibi, with_kwargs=True)


def _added(module: nn.Module, name: str) -> bool:
    """A record or a saved folder names the kept heads of a layer built afresh: its dense ones, cut next."""
    if name != ALIBI_HEADS or not _reads_alibi(module):
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


def _follow_alibi(b: TraceBuilder, module: nn.Module, head_rows: Tensor) -> None:
    """``alibi_heads`` follows the heads: ``head_rows`` holds one row label of each query head."""
    if ALIBI_HEADS in module._buffers:
        b.slot(module.alibi_heads, 0, "follow", head_rows)
    elif _reads_alibi(module):  # not prepared: traced by hand rather than through trace_model
        b.freeze(head_rows, "ALiBi slopes are computed for the model's head count")


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
    _follow_alibi(b, module, per_head[:, 0])
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


def _falcon_linear(b: TraceBuilder, module: nn.Module, inputs: tuple, output: Any) -> None:
    """``FalconLinear`` computes ``input @ weight.T + bias`` itself: it is a linear layer, traced as one."""
    if not inputs or not isinstance(inputs[0], Tensor) or not isinstance(output, Tensor):
        b.freeze_tensors([*inputs, output], "FalconLinear called oddly")
        return
    OP_RULES["linear"](b, Call("linear", F.linear, (inputs[0], module.weight, module.bias), {}, output))


def _falcon_attention(b: TraceBuilder, module: nn.Module, inputs: tuple, output: Any) -> None:
    """Falcon's fused ``query_key_value`` in its three layouts, each head's rows with its ``dense`` columns.

    ``_split_heads`` views the rows by the layer's head counts: per key/value head its query heads, key and value
    (``new_decoder_architecture``: a key/value head goes with its query heads); per head its query, key and value
    (``multi_query=False``); or every query head, then one key and one value head that all query heads share
    (``multi_query``: those two stay, the query heads go one by one). With ``alibi`` each query head's entry of
    ``alibi_heads`` goes with it.
    """
    result = output[0] if isinstance(output, tuple) else output
    if not inputs or not isinstance(inputs[0], Tensor) or not isinstance(result, Tensor):
        b.freeze_tensors([*inputs, result], "FalconAttention called oddly")
        return
    fused, dense, size = module.query_key_value, module.dense, module.head_dim
    heads = dense.weight.shape[1] // size
    rows = b.space(b.name_of(fused.weight), 0, fused.weight.shape[0])
    b.slot(fused.weight, 0, "out", rows)
    if fused.bias is not None:
        b.slot(fused.bias, 0, "follow", rows)
    b.slot(fused.weight, 1, "in", b.along(inputs[0], -1))
    if module.new_decoder_architecture:
        per_group = rows.view(module.num_kv_heads, -1, size)
        b.unify_rows(per_group.reshape(module.num_kv_heads, -1))
        queries = per_group[:, :-2]
    elif not module.multi_query:
        per_head = rows.view(heads, 3, size)
        b.unify_rows(per_head.reshape(heads, -1))
        queries = per_head[:, 0]
    else:
        queries = rows[: heads * size].view(heads, size)
        b.unify_rows(queries)
        b.freeze(rows[heads * size :], "multi-query attention: its one key and value head serve every query head")
    b.slot(dense.weight, 1, "in", queries.reshape(-1))
    _follow_alibi(b, module, queries.reshape(heads, size)[:, 0])
    b.linear_output(dense, result)


register_module_rule(
    "transformers.bloom.BloomAttention", _is_bloom_attention, _bloom_attention, prepare=_select_alibi_heads
)
register_module_rule(
    "transformers.falcon.FalconAttention", _is_falcon_attention, _falcon_attention, prepare=_select_alibi_heads
)
register_module_rule(
    "transformers.falcon.FalconLinear", lambda module: _is_class(module, f"{FALCON}.FalconLinear"), _falcon_linear
)
for _attention in (BLOOM_ATTENTION, f"{FALCON}.FalconAttention"):
    register_layer(_attention, _saved_once_cut)
ADDED_TENSORS.register("transformers.alibi_heads", _added)
