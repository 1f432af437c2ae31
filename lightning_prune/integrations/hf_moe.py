"""Hugging Face mixtures of experts (Mixtral, Qwen3-MoE): experts stored as ``(experts, ...)`` tensors.

transformers keeps a layer's experts in two 3-D parameters, ``gate_up_proj`` ``(experts, 2 × neurons, hidden)``
(the gate rows, then the up rows) and ``down_proj`` ``(experts, hidden, neurons)``, and runs them through
``torch._grouped_mm``, a batched matmul or a loop over the experts the router picked, by configuration. The
experts module is traced as a whole here, whatever kernel runs it: the neurons of each expert are its own
channels (an expert's gate row, up row and ``down_proj`` column go together, and every expert keeps as many,
since the tensors stay rectangular); the hidden stream is read by ``gate_up_proj`` and written by
``down_proj``. The router is a plain linear layer over the stream; its expert rows stay (``topk`` picks among
them), whole experts go with :func:`lightning_prune.prune_experts`.

The fixups keep the attributes the modules size themselves by, and the config fields the family builds its
experts from: the neuron count (Mixtral: ``intermediate_size``; Qwen3-MoE: ``moe_intermediate_size``, since its
dense layers read ``intermediate_size``), the expert count and the experts each token picks.
"""

from __future__ import annotations

import warnings

import torch.nn.functional as F
from torch import Tensor, nn

from lightning_prune.fixups import register_layer
from lightning_prune.graph import labels as L
from lightning_prune.graph.builder import TraceBuilder
from lightning_prune.graph.module_rules import register_module_rule
from lightning_prune.graph.rules.base import OP_RULES, Call
from lightning_prune.integrations.huggingface import _pretrained_model

# model_type -> (config field of each expert's neurons, config field of the expert count)
MOE_FIELDS = {
    "mixtral": ("intermediate_size", "num_local_experts"),
    "qwen3_moe": ("moe_intermediate_size", "num_experts"),
}
_LAYOUT = {"is_transposed": False, "is_concatenated": True, "has_gate": True, "has_bias": False}


def _is_experts(module: nn.Module) -> bool:
    tensors = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
    return (
        type(module).__name__.endswith("Experts")
        and type(module).__module__.startswith("transformers.")
        and all(isinstance(t, nn.Parameter) and t.ndim == 3 for t in tensors)
    )


def _layout_problem(module: nn.Module) -> str:
    """Why the experts' tensors are not laid out as the rule reads them; empty where they are."""
    odd = [
        f"{name}={getattr(module, name, None)!r}"
        for name, value in _LAYOUT.items()
        if getattr(module, name, value) != value
    ]
    if getattr(module, "has_post_expert_norm", False):
        odd.append("has_post_expert_norm=True")
    experts, double, hidden = module.gate_up_proj.shape
    if double % 2 or module.down_proj.shape != (experts, hidden, double // 2):
        odd.append(f"gate_up_proj {tuple(module.gate_up_proj.shape)} and down_proj {tuple(module.down_proj.shape)}")
    return ", ".join(odd)


def _experts(b: TraceBuilder, module: nn.Module, inputs: tuple, output: object) -> None:
    """``output[t] = Σ_picked weight · down_e(act(gate_e(x_t)) · up_e(x_t))`` for the experts the router picked."""
    source = inputs[0] if inputs else None
    problem = _layout_problem(module)
    if problem or not isinstance(source, Tensor) or not isinstance(output, Tensor) or source.ndim != 2:
        why = f"experts laid out as {problem}" if problem else "experts called with inputs other than (tokens, hidden)"
        b.freeze_tensors([*inputs, output], f"{type(module).__name__}: {why}")
        return
    labels = b.label(source)
    if L.varying_dims(labels) - {1}:
        b.freeze(labels, f"{type(module).__name__} over channels that vary along tokens")
        return
    gate_up, down = module.gate_up_proj, module.down_proj
    experts, double, hidden = gate_up.shape
    neurons = double // 2
    b.slot(gate_up, 2, "in", b.along(source, -1))
    ids = b.space(b.name_of(gate_up), 1, experts * double).view(experts, double)
    b.unify(ids[:, :neurons], ids[:, neurons:])  # neuron j: gate row j and up row neurons + j of the same expert
    b.slot(gate_up, 1, "out", ids.reshape(-1), groups=experts)
    b.slot(down, 2, "in", ids[:, :neurons].reshape(-1), groups=experts)
    if experts > 1:
        b.partitions.append((list(ids[:, :neurons]), f"experts of `{b.where}` (all as wide)"))
    written = b.space(b.name_of(down), 1, hidden)
    b.slot(down, 1, "out", written)
    b.set(output, written.view(1, -1))


ROUTER_ROWS = (
    "the router picks the top-k of its expert rows, a choice that changes when one goes, so they stay: remove whole "
    "experts with their router rows instead (`lightning_prune.prune_experts`, or "
    '`StructuredPruning(structure="experts")`)'
)


def _router(b: TraceBuilder, module: nn.Module, inputs: tuple, output: object) -> None:
    """The router is a linear layer over the stream whose output rows (one per expert) are left whole, and said why."""
    source = inputs[0] if inputs else None
    logits = output[0] if isinstance(output, tuple) else None
    if not isinstance(source, Tensor) or not isinstance(logits, Tensor) or logits.shape[-1] != module.weight.shape[0]:
        b.freeze_tensors([*inputs, *(output if isinstance(output, tuple) else (output,))], "a router called oddly")
        return
    OP_RULES["linear"](b, Call("linear", F.linear, (source, module.weight, None), {}, logits))
    b.freeze(b.label(logits), ROUTER_ROWS)


def _fix_experts(module: nn.Module) -> None:
    module.num_experts, module.hidden_dim, module.intermediate_dim = module.down_proj.shape


def _fix_router(module: nn.Module) -> None:
    """The router picks ``top_k`` of its experts (rows): at most as many as are left."""
    module.num_experts, module.hidden_dim = module.weight.shape
    if isinstance(getattr(module, "top_k", None), int):
        module.top_k = min(module.top_k, module.num_experts)


def _fix_block(module: nn.Module) -> None:
    router = getattr(module, "gate", None)
    if isinstance(getattr(module, "top_k", None), int) and router is not None:
        module.top_k = router.top_k


def _moe_model(model: nn.Module) -> None:
    """The family's config follows its experts where every MoE layer has the same widths; then the rest of the
    model (heads, hidden, FFN) as for every Hugging Face model."""
    config = getattr(model, "config", None)
    fields = MOE_FIELDS.get(getattr(config, "model_type", ""))
    stacks = [m for m in model.modules() if _is_experts(m)]
    if fields is not None and stacks:
        neurons = {m.down_proj.shape[2] for m in stacks}
        experts = {m.down_proj.shape[0] for m in stacks}
        if len(neurons) == 1 and len(experts) == 1:
            setattr(config, fields[0], neurons.pop())
            setattr(config, fields[1], experts.pop())
            config.num_experts_per_tok = min(config.num_experts_per_tok, getattr(config, fields[1]))
        else:
            warnings.warn(
                f"the {config.model_type} config cannot describe MoE layers of different widths (experts "
                f"{sorted(experts)}, neurons per expert {sorted(neurons)}): save the model with "
                "`lightning_prune.save_pretrained` and load it with `lightning_prune.from_pretrained`.",
                UserWarning,
                stacklevel=2,
            )
    _pretrained_model(model)


register_module_rule("hf_experts", _is_experts, _experts)
ROUTERS = tuple(
    f"transformers.models.{package}.modeling_{package}.{prefix}TopKRouter"
    for package, prefix in (("mixtral", "Mixtral"), ("qwen3_moe", "Qwen3Moe"))
)
register_module_rule(
    "hf_router", lambda module: f"{type(module).__module__}.{type(module).__qualname__}" in ROUTERS, _router
)
for _package, _prefix in (("mixtral", "Mixtral"), ("qwen3_moe", "Qwen3Moe")):
    _where = f"transformers.models.{_package}.modeling_{_package}.{_prefix}"
    register_layer(f"{_where}Experts", _fix_experts)
    register_layer(f"{_where}TopKRouter", _fix_router)
    register_layer(f"{_where}SparseMoeBlock", _fix_block)
    register_layer(f"{_where}PreTrainedModel", _moe_model)
