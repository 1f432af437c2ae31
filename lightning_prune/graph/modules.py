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
