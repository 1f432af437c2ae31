"""Attribute updates for Hugging Face transformers layers after surgery (registered by class name).

Most of their attention code already derives sizes from tensors (``view(..., -1, head_dim)``); these
are the layers that keep a size in an attribute and use it in ``forward``.
"""

from __future__ import annotations

from torch import nn

from lightning_prune.cuts import Drop
from lightning_prune.errors import PruningError
from lightning_prune.fixups import DROP_FIXUPS, register_layer


def _conv1d(module: nn.Module) -> None:
    """GPT-2's ``Conv1D`` stores its weight input-major and its output width in ``nf``."""
    module.nx, module.nf = module.weight.shape


def _gpt2_attention(module: nn.Module) -> None:
    """``split_size`` splits the fused q, k, v projection; it follows the number of heads left."""
    if getattr(module, "is_cross_attention", False):
        module.split_size = module.q_attn.nf
    else:
        module.split_size = module.c_attn.nf // 3
    module.num_heads = module.split_size // module.head_dim
    module.embed_dim = module.split_size


register_layer("transformers.pytorch_utils.Conv1D", _conv1d)
register_layer("transformers.models.gpt2.modeling_gpt2.GPT2Attention", _gpt2_attention)


QUERY = ("q_proj", "query")
KEY = ("k_proj", "key")
FEED_FORWARD = ("up_proj", "fc1", "c_fc")


def _out_features(module: nn.Module) -> int:
    weight = module.weight
    return weight.shape[1] if type(module).__name__ == "Conv1D" else weight.shape[0]


def _pretrained_model(model: nn.Module) -> None:
    """Keep a Hugging Face model's config in step with its pruned layers, where one value fits all layers.

    Heads are removed whole, so the head size stays; hidden size, head counts and FFN width follow the
    modules. Where layers differ (global pruning), the config keeps the dense values: such a model is
    saved with the record and rebuilt by ``restore`` (``from_pretrained`` cannot express it).
    """
    config = getattr(model, "config", None)
    embeddings = getattr(model, "get_input_embeddings", lambda: None)()
    if config is None or not hasattr(config, "num_attention_heads") or embeddings is None:
        return
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    found: dict[str, set[int]] = {"num_attention_heads": set(), "num_key_value_heads": set(), "ffn": set()}
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if not hasattr(module, "weight"):
            continue
        if leaf in QUERY:
            found["num_attention_heads"].add(_out_features(module) // head_dim)
        elif leaf in KEY:
            found["num_key_value_heads"].add(_out_features(module) // head_dim)
        elif leaf == "c_attn":
            found["num_attention_heads"].add(_out_features(module) // 3 // head_dim)
        elif leaf in FEED_FORWARD or name.endswith("intermediate.dense"):
            found["ffn"].add(_out_features(module))
    _key_value_groups(model, head_dim)
    values = {"hidden_size": {embeddings.weight.shape[1]}, **found}
    ffn_key = "n_inner" if hasattr(config, "n_inner") else "intermediate_size"
    values[ffn_key] = values.pop("ffn")
    for key, options in values.items():
        if len(options) == 1 and hasattr(config, key):
            setattr(config, key, options.pop())
    if hasattr(config, "head_dim"):
        config.head_dim = head_dim


def _key_value_groups(model: nn.Module, head_dim: int) -> None:
    """Grouped-query attention repeats each key/value head ``num_key_value_groups`` times: it must follow."""
    for name, module in model.named_modules():
        if not hasattr(module, "num_key_value_groups"):
            continue
        query = next((getattr(module, n) for n in QUERY if hasattr(module, n)), None)
        key = next((getattr(module, n) for n in KEY if hasattr(module, n)), None)
        if query is None or key is None:
            continue
        rows, kv_rows = _out_features(query), _out_features(key)
        heads, kv_heads = rows // head_dim, kv_rows // head_dim
        if rows % head_dim or kv_rows % head_dim or kv_heads == 0 or heads % kv_heads:
            raise PruningError(
                f"`{name}` of {type(model).__name__}: {rows} query rows and {kv_rows} key rows are not "
                f"{head_dim}-row heads in which every key/value head serves the same number of query heads; "
                "remove whole heads, a key/value head together with its query heads (the record or cuts do "
                "not fit this model).",
                module=name,
            )
        module.num_key_value_groups = heads // kv_heads


register_layer("transformers.modeling_utils.PreTrainedModel", _pretrained_model)


def _dropped_layers(model: nn.Module, drop: Drop) -> None:
    """After blocks leave a Hugging Face model's layer stack, its config counts and types what is left."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "num_hidden_layers", None) != drop.size:
        return
    config.num_hidden_layers = len(drop.keep)
    types = getattr(config, "layer_types", None)
    if isinstance(types, list) and len(types) == drop.size:
        config.layer_types = [types[i] for i in drop.keep]


DROP_FIXUPS.register("transformers.config.num_hidden_layers", _dropped_layers)
