"""Parameters, MACs and latency, measured with torch's own tools.

MACs come from ``torch.utils.flop_counter.FlopCounterMode`` (MACs = FLOPs / 2); latency from
``torch.utils.benchmark.Timer.blocked_autorange``. Models are measured in eval mode and left as
they were.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils.flop_counter import FlopCounterMode

from lightning_prune.graph.tracer import ExampleInputs, preserved_state, run_model


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


class _Plain(TorchFunctionMode):
    """Makes modules take their plain PyTorch path (``nn.MultiheadAttention`` has a fused fast path whose
    kernel FlopCounterMode cannot count); the same path tracing sees."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


def count_macs(model: nn.Module, example_inputs: ExampleInputs) -> int:
    """Multiply-accumulates of one eval-mode forward on ``example_inputs``."""
    with preserved_state(model), torch.no_grad():
        model.eval()
        counter = FlopCounterMode(display=False)
        with counter, _Plain():
            run_model(model, example_inputs)
    return counter.get_total_flops() // 2


def meta_clone(model: nn.Module) -> nn.Module:
    """A structural copy of ``model`` whose parameters and buffers live on the meta device (no memory)."""
    memo: dict[int, Any] = {}
    for tensor in [*model.parameters(), *model.buffers()]:
        meta = torch.empty_like(tensor, device="meta")
        memo[id(tensor)] = nn.Parameter(meta, tensor.requires_grad) if isinstance(tensor, nn.Parameter) else meta
    return copy.deepcopy(model, memo)


def to_device(inputs: Any, device: str | torch.device) -> Any:
    if isinstance(inputs, Tensor):
        return inputs.to(device)
    if isinstance(inputs, dict):
        return {k: to_device(v, device) for k, v in inputs.items()}
    if isinstance(inputs, tuple | list):
        return type(inputs)(to_device(v, device) for v in inputs)
    return inputs


def latency(
    model: nn.Module, example_inputs: ExampleInputs, *, threads: int | None = None, min_run_time: float = 1.0
) -> float:
    """Median seconds per eval-mode forward on ``example_inputs`` (``torch.utils.benchmark``)."""
    from torch.utils import benchmark

    with preserved_state(model), torch.inference_mode():
        model.eval()
        timer = benchmark.Timer(
            stmt="run_model(model, inputs)",
            globals={"run_model": run_model, "model": model, "inputs": example_inputs},
            num_threads=threads or torch.get_num_threads(),
        )
        return timer.blocked_autorange(min_run_time=min_run_time).median
