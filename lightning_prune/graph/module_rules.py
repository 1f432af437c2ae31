"""Modules traced as a whole: their internals are not followed, a rule maps their inputs to their output.

Used where a module's own ops would say less than the module means: a hand-written RMSNorm (Hugging Face,
timm) computes ``x * rsqrt(mean(x²))`` and a hand-written LayerNorm (Cohere) ``(x - mean(x)) * rsqrt(var(x))``,
reductions over channels that are really a normalisation (pruning a channel changes the statistic slightly,
like ``nn.LayerNorm``), not a mixing of channels; an attention layer
over a fused projection is a set of heads. Each rule is registered under a name with the predicate that
picks its modules; the first registered rule whose predicate holds is used. A rule may also ``prepare`` its
modules before the trace: give one a tensor that does not change what it computes but that its cuts slice
(BLOOM's and Falcon's attention get the indices of the heads whose ALiBi slopes they read). The rules here cover
``torch.nn`` and hand-written norms; libraries' layers are registered by :mod:`lightning_prune.integrations`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from lightning_prune.graph import labels as L
from lightning_prune.graph.builder import TraceBuilder
from lightning_prune.registry import Registry

Trace = Callable[[TraceBuilder, nn.Module, tuple, Any], None]


@dataclass(frozen=True)
class ModuleRule:
    """``trace(builder, module, inputs, output)`` for every module for which ``matches(module)`` holds, after
    ``prepare(module)`` (if given) has run on it."""

    matches: Callable[[nn.Module], bool]
    trace: Trace
    prepare: Callable[[nn.Module], None] | None = None


MODULE_RULES: Registry[str, ModuleRule] = Registry("module rule")


def register_module_rule(
    name: str,
    matches: Callable[[nn.Module], bool],
    trace: Trace,
    *,
    prepare: Callable[[nn.Module], None] | None = None,
    replace: bool = False,
) -> None:
    """Trace modules for which ``matches(module)`` holds as a whole, with ``trace(builder, module, inputs, output)``.

    ``prepare(module)``, if given, runs on each such module before every trace; it must leave what the module
    computes unchanged and do nothing the second time.
    """
    MODULE_RULES.register(name, ModuleRule(matches, trace, prepare), replace=replace)


def _entry(module: nn.Module) -> ModuleRule | None:
    return next((entry for entry in MODULE_RULES.values() if entry.matches(module)), None)


def module_rule(module: nn.Module) -> Trace | None:
    entry = _entry(module)
    return entry.trace if entry is not None else None


def prepare_modules(model: nn.Module) -> None:
    """Run the ``prepare`` of the rule of every module of ``model`` that has one."""
    for module in list(model.modules()):
        entry = _entry(module)
        if entry is not None and entry.prepare is not None:
            entry.prepare(module)


def _is_hand_written_norm(module: nn.Module) -> bool:
    """An RMSNorm or LayerNorm written by hand over the last dimension, with a 1-D weight (and bias, if any)."""
    weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
    return (
        type(module).__name__.endswith(("RMSNorm", "LayerNorm"))
        and not isinstance(module, nn.RMSNorm | nn.LayerNorm)
        and isinstance(weight, nn.Parameter)
        and weight.ndim == 1
        and (bias is None or (isinstance(bias, nn.Parameter) and bias.shape == weight.shape))
    )


def _rms_norm(b: TraceBuilder, module: nn.Module, inputs: tuple, output: Any) -> None:
    source = inputs[0] if inputs else None
    if not isinstance(source, Tensor) or not isinstance(output, Tensor):
        b.freeze_tensors([*inputs, output], f"{type(module).__name__} with unexpected inputs")
        return
    labels = b.label(source)
    if L.varying_dims(labels) - {source.ndim - 1}:
        _per_row_norm(b, module, labels, output)
        return
    channels = b.along(source, -1)
    b.normalized.append(channels)
    for tensor in (module.weight, getattr(module, "bias", None)):
        if tensor is not None:
            b.slot(tensor, 0, "follow", channels)
    b.set(output, labels)


def _per_row_norm(b: TraceBuilder, module: nn.Module, labels: Tensor, output: Tensor) -> None:
    """An RMSNorm over the last dimension of an input whose channels vary along other dimensions too: a
    per-head ``q_norm``/``k_norm`` (Qwen3, Gemma 3, OLMo 2 style) normalises each head's features on their own.

    Each row of the last dimension is normalised by itself, so removing whole rows (whole heads) changes
    nothing in the rows left, and the weight, shared by all rows, is not sliced. Only the last dimension must
    keep its size: its classes may not vary along it (a head's features go together or not at all).
    """
    b.require(labels, {labels.ndim - 1}, f"{type(module).__name__} normalises each row of its last dimension")
    b.set(output, labels)


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


register_module_rule("rms_norm", _is_hand_written_norm, _rms_norm)
register_module_rule("sync_batch_norm", lambda module: isinstance(module, nn.SyncBatchNorm), _sync_batch_norm)
