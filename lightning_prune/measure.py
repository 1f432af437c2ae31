"""Parameters, MACs and latency, measured with torch's own tools.

MACs come from ``torch.utils.flop_counter.FlopCounterMode`` (MACs = FLOPs / 2); latency from
``torch.utils.benchmark.Timer.blocked_autorange``. Models are measured in eval mode and left as
they were.
"""

from __future__ import annotations

import logging
from types import ModuleType

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils.flop_counter import FlopCounterMode

from lightning_prune.running import ExampleInputs, preserved_state, run_model


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


def latency(
    model: nn.Module, example_inputs: ExampleInputs, *, threads: int | None = None, min_run_time: float = 1.0
) -> float:
    """Median seconds per eval-mode forward on ``example_inputs`` (``torch.utils.benchmark``)."""
    benchmark = _import_benchmark()
    with preserved_state(model), torch.inference_mode():
        model.eval()
        timer = benchmark.Timer(
            stmt="run_model(model, inputs)",
            globals={"run_model": run_model, "model": model, "inputs": example_inputs},
            num_threads=threads or torch.get_num_threads(),
        )
        return timer.blocked_autorange(min_run_time=min_run_time).median


def _import_benchmark() -> ModuleType:
    """``torch.utils.benchmark``, without the line its import prints on a machine with CUDA_HOME but no GPU.

    It imports ``torch.utils.cpp_extension`` (for C++ timers, unused here), which logs "No CUDA runtime is
    found, using CUDA_HOME=..." once, when imported.
    """
    logger = logging.getLogger("torch.utils.cpp_extension")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        from torch.utils import benchmark
    finally:
        logger.setLevel(level)
    return benchmark
