"""Attribute and config updates for Hugging Face transformers models after surgery (registered by class name).

Most of their attention code already derives sizes from tensors (``view(..., -1, head_dim)``); the fixups
here update the layers that keep a size in an attribute and use it in ``forward``, the constants computed
from a width at build time, and the config, so that ``save_pretrained`` → ``from_pretrained`` rebuilds the
pruned model (which fields follow which widths, per family: :mod:`.hf_families`).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_prune.cuts import Drop
from lightning_prune.errors import PruningError
from lightning_prune.fixups import DROP_FIXUPS, register_layer
from lightning_prune.graph import labels as L
from lightning_prune.graph.builder import TraceBuilder
from lightning_prune.graph.module_rules import register_module_rule
from lightning_prune.graph.rules.movement import FOLLOWING_SLICES as SLICE_BOUNDS
from lightning_prune.integrations.hf_families import (
    ALIBI_HEADS,
    FEED_FORWARD,
    FOLLOWING_SLICES,
    FUSED_HEADS,
    HEAD_SIZE,
    KEY,
    OUTPUT,
    QUERY,
    SCALED_EMBEDDINGS,
    Family,
    family,
)


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


def _out_features(module: nn.Module) -> int:
    weight = module.weight
    return weight.shape[1] if type(module).__name__ == "Conv1D" else weight.shape[0]


def _child(module: nn.Module, names: Iterable[str]) -> tuple[nn.Module, str] | None:
    """The first child of ``module`` named in ``names`` that has a weight, with its name."""
    for name in names:
        child = getattr(module, name, None)
        if isinstance(child, nn.Module) and hasattr(child, "weight"):
            return child, name
    return None


def _pretrained_model(model: nn.Module) -> None:
    """Keep a Hugging Face model's config in step with its pruned layers, where one value fits all layers.

    Heads are removed whole, so the head size stays: it is read from the attention layers, which were built
    from the dense config, never from the config itself (the outer and the inner model share it, and this
    runs for both). Hidden size, head counts and FFN width follow the modules, under the names of
    :data:`~lightning_prune.integrations.hf_families.FAMILIES`. Where no config can say the cut (layers of
    different widths, a head count the config refuses, fewer heads where the family computes the head size
    as ``hidden // heads``), the config keeps the widths it had, which build a model the saved shapes fit:
    ``lightning_prune.save_pretrained`` records them and ``lightning_prune.from_pretrained`` rebuilds it.
    """
    config = getattr(model, "config", None)
    embeddings = getattr(model, "get_input_embeddings", lambda: None)()
    if config is None or not hasattr(config, "num_attention_heads") or embeddings is None:
        return
    names = family(config)
    attention = {name: _attention_heads(name, module, model) for name, module in model.named_modules()}
    values: dict[str, set[int]] = {names.head_size: set()}
    for name, counts in attention.items():  # all checked before anything changes
        if counts is not None:
            heads, key_value_heads, head_size = counts
            values[names.head_size].add(head_size)
            values.setdefault(_fields(names, model, name)[0], set()).add(heads)
            for field in (names.key_value_heads, names.key_value_mirror):
                if field is not None:
                    values.setdefault(field, set()).add(key_value_heads)
            _follow_heads(model.get_submodule(name), heads, key_value_heads, head_size)
    head_sizes = values[names.head_size]
    if not names.head_dim:
        del values[names.head_size]
    hidden = {embeddings.weight.shape[1]}
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        fused = FEED_FORWARD.get(leaf, 1 if name.endswith("intermediate.dense") else 0)
        ffn = _fields(names, model, name)[1] if fused else None
        if fused and ffn is not None and hasattr(module, "weight"):
            values.setdefault(ffn, set()).add(_out_features(module) // fused)
        elif leaf == names.stream and hasattr(module, "weight"):
            hidden = {_out_features(module)}
    values[names.hidden] = hidden
    for field in names.follow_hidden:
        if getattr(config, field, None) == getattr(config, names.hidden):
            values[field] = hidden
    if names.embedding is not None:
        values[names.embedding] = {embeddings.weight.shape[1]}
    for module in model.modules():
        if f"{type(module).__module__}.{type(module).__qualname__}" in SCALED_EMBEDDINGS:
            _scale_embedding(module)
    _width_free_norms(model)
    before = {key: getattr(config, key) for key in values if hasattr(config, key)}
    for key, options in values.items():
        if len(options) == 1 and (hasattr(config, key) or key == names.head_size):
            setattr(config, key, next(iter(options)))
    reason = _inexpressible(model, names, values, head_sizes)
    if not reason:
        return
    for key, options in values.items():  # widths it can build, and the saved shapes say the rest
        if key in before:  # never below a width the model has (a cut that verification undid left a smaller one)
            value = before[key]
            setattr(config, key, max(value, *options) if isinstance(value, int) and options else value)
        elif hasattr(config, key):
            delattr(config, key)
    warnings.warn(
        f"the {config.model_type} config cannot describe the pruned model ({reason}), so it keeps the widths "
        "it had: save the model with `lightning_prune.save_pretrained`, which records the shapes it does not "
        "build, and load it with `lightning_prune.from_pretrained` (not the class's own `from_pretrained`).",
        UserWarning,
        stacklevel=2,
    )


def _fields(names: Family, model: nn.Module, path: str) -> tuple[str, str | None]:
    """The config fields of the heads and FFN width of the layer at ``path``: by the classes around it, innermost
    first, in a family whose encoder and decoder have fields of their own."""
    parts = path.split(".") if path and names.sections else []
    return names.fields([type(model.get_submodule(".".join(parts[:d]))).__name__ for d in range(len(parts), -1, -1)])


def _scale_embedding(module: nn.Embedding) -> None:
    """Gemma's embedding scale is ``√hidden`` of the width it has, as ``from_pretrained`` will compute it.

    Set here rather than by a fixup of the embedding: this runs on every cut, so a scale changed by a cut
    that verification undid is set right again by the next one.
    """
    module.scalar_embed_scale = module.weight.shape[1] ** 0.5
    module.embed_scale.fill_(module.scalar_embed_scale)


def _inexpressible(model: nn.Module, names: Family, values: dict[str, set[int]], head_sizes: set[int]) -> str:
    """Why ``model.config``, updated to the pruned widths, does not build the pruned model; empty where it does."""
    config = model.config
    reasons = [f"layers of different {key}: {sorted(options)}" for key, options in values.items() if len(options) > 1]
    if any(ALIBI_HEADS in m._buffers and ALIBI_HEADS not in m._non_persistent_buffers_set for m in model.modules()):
        reasons.append("its layers read the ALiBi slopes of the dense heads they kept, which no config computes")
    hidden = getattr(config, names.hidden, None)
    for field in sorted(names.head_fields):
        heads = getattr(config, field, None)
        if not names.head_dim and len(head_sizes) == 1 and heads and hidden // heads not in head_sizes:
            reasons.append(
                f"its code computes the head size as {names.hidden} // {field} = {hidden} // {heads}, "
                f"not {next(iter(head_sizes))}"
            )
    try:
        getattr(config, "validate", lambda: None)()
    except Exception as error:  # the config's own checks: strict dataclasses raise their own error type
        reasons.append(str(error.__cause__ or error).rstrip("."))
    return "; ".join(reasons) or _built_otherwise(model)


def _built_otherwise(model: nn.Module) -> str:
    """How the model's class, built from its config (on the meta device), differs from the pruned model: widths
    its code derives (BLOOM's FFN is ``4 * hidden``) or fixes (a norm built at the stream width); empty if none.
    Tensors the class does not build at all (a bias a method added) are the saved shapes' business."""
    try:
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            built = {name: tuple(t.shape) for name, t in type(model)(model.config).state_dict().items()}
    except Exception as error:  # its own checks refuse the widths: what from_pretrained would meet
        return f"{type(model).__name__} refuses it ({type(error).__name__}: {str(error).rstrip('.')})"
    for name, tensor in model.state_dict().items():
        if name in built and built[name] != tuple(tensor.shape):
            return f"its code builds `{name}` as {list(built[name])}, not {list(tensor.shape)}"
    return ""


def _attention_heads(name: str, module: nn.Module, model: nn.Module) -> tuple[int | None, int | None, int] | None:
    """Query heads, key/value heads and head size of an attention layer; None for a module that is not one.

    Heads fused in one projection (``qkv_proj``, ``query_key_value``) are counted from the output projection.
    """
    query, key = _child(module, QUERY), _child(module, KEY)
    head_size = next((getattr(module, n) for n in HEAD_SIZE if isinstance(getattr(module, n, None), int)), None)
    if head_size is None:
        return None
    fused, output = _child(module, FUSED_HEADS), _child(module, OUTPUT)
    if query is not None:
        rows = _out_features(query[0]) // QUERY[query[1]]
        kv_rows = _out_features(key[0]) // KEY[key[1]] if key is not None else rows
    elif fused is not None and output is not None:  # q rows, then k and v rows alike
        rows = output[0].weight.shape[1]
        kv_rows = (_out_features(fused[0]) - rows) // 2
    else:
        return None
    heads, kv_heads = rows // head_size, kv_rows // head_size
    if rows % head_size or kv_rows % head_size or kv_heads == 0 or heads % kv_heads:
        raise PruningError(
            f"`{name}` of {type(model).__name__}: {rows} query rows and {kv_rows} key rows are not "
            f"{head_size}-row heads in which every key/value head serves the same number of query heads; "
            "remove whole heads, a key/value head together with its query heads (the record or cuts do "
            "not fit this model).",
            module=name,
        )
    return heads, kv_heads, head_size


def _follow_heads(module: nn.Module, heads: int, kv_heads: int, head_size: int) -> None:
    """An attention layer's stored head counts follow its weights.

    Grouped-query attention repeats each key/value head ``num_key_value_groups`` times; layers that keep
    ``num_heads`` / ``num_key_value_heads`` (StableLM, OPT), ``num_kv_heads`` (Falcon) or ``num_attention_heads``
    (DeBERTa-v2) use them in ``forward``. A layer that reads its head counts from the shared config in ``forward``
    (Phi-3 splits ``qkv_proj`` at ``config.num_attention_heads``) gets a :class:`LayerConfig` with its own.
    """
    if getattr(module, "config", None) is not None and _slices_at_config(module):
        shared = module.config.shared if isinstance(module.config, LayerConfig) else module.config
        module.config = LayerConfig(shared, num_attention_heads=heads, num_key_value_heads=kv_heads)
    for attribute, value in (
        ("num_key_value_groups", heads // kv_heads),
        ("num_heads", heads),
        ("num_attention_heads", heads),
        ("all_head_size", heads * head_size),
        ("num_key_value_heads", kv_heads),
        ("num_kv_heads", kv_heads),
        ("n_heads", heads),
    ):
        if isinstance(getattr(module, attribute, None), int):
            setattr(module, attribute, value)


class LayerConfig:
    """One layer's view of a model's shared config: its own head counts, everything else read from ``shared``.

    Under ``scope="global"`` layers keep different numbers of heads, which one config cannot hold; a layer whose
    ``forward`` reads them from its config sees its own here, and every other field (the attention implementation
    a user switches, say) stays the shared config's.
    """

    def __init__(self, shared: Any, **own: int) -> None:
        self.shared, self.own = shared, own

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name in ("shared", "own"):
            raise AttributeError(name)
        return self.own[name] if name in self.own else getattr(self.shared, name)

    def __repr__(self) -> str:
        return f"LayerConfig({self.own}, shared={type(self.shared).__name__})"


def _slices_at_config(module: nn.Module) -> bool:
    return any(f"{klass.__module__}.{klass.__qualname__}" in FOLLOWING_SLICES for klass in type(module).__mro__)


register_layer("transformers.modeling_utils.PreTrainedModel", _pretrained_model)
for _layer, _why in FOLLOWING_SLICES.items():
    SLICE_BOUNDS.register(_layer, _why)


def _is_class(module: nn.Module, qualified: str) -> bool:
    return any(f"{klass.__module__}.{klass.__qualname__}" == qualified for klass in type(module).__mro__)


OLMO_NORM = "transformers.models.olmo.modeling_olmo.OlmoLayerNorm"


class WidthFreeLayerNorm(nn.Module):
    """OLMo's LayerNorm (no weight, no bias, ε = 1e-5) over the width its input has.

    OLMo's own stores the stream width it was built with and holds no tensor, so no cut resizes it and no fixup
    reaches it: a cut puts this one, which computes the same function at every width, in its place.
    """

    def __init__(self, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps

    def forward(self, hidden_states: Tensor) -> Tensor:
        normalized = F.layer_norm(hidden_states.to(torch.float32), hidden_states.shape[-1:], None, None, self.eps)
        return normalized.to(hidden_states.dtype)


def _weight_free_norm(b: TraceBuilder, module: nn.Module, inputs: tuple, output: Any) -> None:
    """A norm over the stream with nothing to slice: the stream's channels can go (the statistics change a little)."""
    source = inputs[0] if inputs else None
    if not isinstance(source, Tensor) or not isinstance(output, Tensor):
        b.freeze_tensors([*inputs, output], f"{type(module).__name__} with unexpected inputs")
        return
    labels = b.label(source)
    if L.varying_dims(labels) - {source.ndim - 1}:
        b.freeze(labels, f"{type(module).__name__} over channels that vary along other dimensions too")
        return
    b.normalized.append(b.along(source, -1))
    b.set(output, labels)


def _width_free_norms(model: nn.Module) -> None:
    """Every OLMo LayerNorm of ``model`` becomes a :class:`WidthFreeLayerNorm`, which follows a cut stream."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if _is_class(child, OLMO_NORM):
                setattr(parent, name, WidthFreeLayerNorm())


register_module_rule(
    "transformers.olmo.OlmoLayerNorm",
    lambda module: _is_class(module, OLMO_NORM) or isinstance(module, WidthFreeLayerNorm),
    _weight_free_norm,
)


def _dropped_layers(model: nn.Module, drop: Drop) -> None:
    """After blocks leave a Hugging Face model's layer stack, its config counts and types what is left."""
    # the model may be a wrapper (a LightningModule around the Hugging Face model): its submodules share one config
    configs = (getattr(module, "config", None) for module in model.modules())
    config = next((c for c in configs if getattr(c, "num_hidden_layers", None) == drop.size), None)
    if config is None:
        return
    config.num_hidden_layers = len(drop.keep)
    types = getattr(config, "layer_types", None)
    if isinstance(types, list) and len(types) == drop.size:
        config.layer_types = [types[i] for i in drop.keep]


DROP_FIXUPS.register("transformers.config.num_hidden_layers", _dropped_layers)
