"""Parameters, MACs and latency, measured with torch's own tools.

MACs come from ``torch.utils.flop_counter.FlopCounterMode`` (MACs = FLOPs / 2, see :class:`MacCounter`); latency from
``torch.utils.benchmark.Timer``: one model's median (:func:`latency`), or two models timed in turns with
their spread (:func:`compare_latency`), so that a ratio is told only when the machine's noise allows it.
Models are measured in eval mode and left as they were.
"""

from __future__ import annotations

import copy
import logging
import statistics
import warnings
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop, sdpa_flop

from lightning_prune.running import ExampleInputs, map_tensors, preserved_state, run_model


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


class _Everywhere:
    """Stands in for ``FlopCounterMode``'s module tracker: every count goes to the total only."""

    parents = ("Global",)

    def __enter__(self) -> _Everywhere:
        return self

    def __exit__(self, *args: object) -> None:
        return None


class MacCounter(FlopCounterMode):
    """``FlopCounterMode`` counting the total only, and never stopping the run it measures.

    The stock mode attributes counts to modules through a tracker that hooks every module input needing
    gradients into autograd; under ``no_grad`` an expanded view of a parameter (CaiT's class token) has no
    gradient function, and the hook raises "Expected gradient function to be set". Totals need no module
    attribution, so this counter has no tracker. An op whose flop formula raises is left uncounted and
    named in a warning after the run (:meth:`warn_uncounted`): the total is then a lower bound.

    The stock registry has no formula for the kernel ``scaled_dot_product_attention`` runs on the CPU, so the stock
    count leaves a CPU model's attention out (on meta tensors, where the math path runs, it is in): here it counts
    as the CUDA kernels do.
    """

    def __init__(self) -> None:
        super().__init__(display=False)
        self.mod_tracker = _Everywhere()
        self.uncounted: dict[str, str] = {}
        self.flop_registry = {**self.flop_registry, **_CPU_ATTENTION}

    def _count_flops(self, func_packet: Any, out: Any, args: Any, kwargs: Any) -> Any:
        try:
            return super()._count_flops(func_packet, out, args, kwargs)
        except Exception as error:  # a formula that cannot handle this call: count the rest
            self.uncounted.setdefault(str(func_packet), f"{type(error).__name__}: {error}")
            return out

    @property
    def macs(self) -> int:
        return self.get_total_flops() // 2

    def warn_uncounted(self) -> None:
        if self.uncounted:
            causes = "; ".join(f"`{op}` ({why[:120]})" for op, why in self.uncounted.items())
            warnings.warn(
                f"MACs are a lower bound: torch's flop counter could not count {causes}.", RuntimeWarning, stacklevel=3
            )


_CPU_ATTENTION = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: sdpa_flop,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: sdpa_backward_flop,
}


class _Plain(TorchFunctionMode):
    """Makes modules take their plain PyTorch path (``nn.MultiheadAttention`` has a fused fast path whose
    kernel FlopCounterMode cannot count); the same path tracing sees."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


def count_macs(model: nn.Module, example_inputs: ExampleInputs) -> int:
    """Multiply-accumulates of one eval-mode forward on ``example_inputs``."""
    with preserved_state(model), torch.no_grad():
        model.eval()
        counter = MacCounter()
        with counter, _Plain():
            run_model(model, example_inputs)
    counter.warn_uncounted()
    return counter.macs


def latency(
    model: nn.Module,
    example_inputs: ExampleInputs,
    *,
    threads: int | None = None,
    min_run_time: float = 1.0,
    channels_last: bool = False,
) -> float:
    """Median seconds per eval-mode forward on ``example_inputs`` (``torch.utils.benchmark``); ``channels_last``
    as :func:`compare_latency`."""
    if channels_last:
        model, example_inputs = as_channels_last(model, example_inputs)
    with preserved_state(model), torch.inference_mode():
        model.eval()
        timer = _timer(model, example_inputs, threads or torch.get_num_threads())
        return timer.blocked_autorange(min_run_time=min_run_time).median


def _timer(model: nn.Module, example_inputs: ExampleInputs, threads: int) -> Any:
    """A ``torch.utils.benchmark.Timer`` of one forward of ``model`` on ``threads`` threads."""
    return _import_benchmark().Timer(
        stmt="run_model(model, inputs)",
        globals={"run_model": run_model, "model": model, "inputs": example_inputs},
        num_threads=threads,
    )


@dataclass(frozen=True)
class Spread:
    """Seconds per forward: the median and the interquartile range (``low``, ``high``) of the timed samples."""

    median: float
    low: float
    high: float


@dataclass(frozen=True)
class LatencyComparison:
    """Two models timed in turns in one process: each one's :class:`Spread`, and the threads they ran on.

    ``ratio`` is the dense model's median over the pruned one's (above 1: the pruned model is faster);
    ``resolved`` says whether their interquartile ranges are apart, i.e. whether the ratio stands out of
    the noise.
    """

    dense: Spread
    pruned: Spread
    threads: int

    @property
    def ratio(self) -> float:
        return self.dense.median / self.pruned.median

    @property
    def resolved(self) -> bool:
        return self.dense.low > self.pruned.high or self.dense.high < self.pruned.low


def compare_latency(
    dense: nn.Module,
    pruned: nn.Module,
    example_inputs: ExampleInputs,
    *,
    repeats: int = 10,
    threads: int | None = None,
    min_run_time: float = 1.0,
    channels_last: bool = False,
) -> LatencyComparison:
    """Seconds per eval-mode forward of two models on ``example_inputs``, timed in turns in one process.

    After a warm-up, each of ``repeats`` rounds times both models (alternating which goes first) for about
    ``min_run_time / repeats`` seconds each, so that drift of the machine's speed (other processes, clocks)
    falls on both alike; the samples' median and interquartile range are kept per model.

    ``channels_last``: time copies of both models, and of the inputs, in the channels-last memory format (see
    :func:`as_channels_last`), the layout convolutions on the CPU run fastest in, at pruned widths most of all.

    Raises:
        ValueError: ``repeats`` below 3 (no interquartile range to speak of) or ``min_run_time`` not positive.

    Example::

        timing = compare_latency(dense, pruned, images)
        print(f"{timing.ratio:.2f}x" if timing.resolved else "within noise")
    """
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 3:
        raise ValueError(f"`repeats` must be an integer of at least 3, got {repeats!r}.")
    if not min_run_time > 0:
        raise ValueError(f"`min_run_time` must be a positive number of seconds, got {min_run_time!r}.")
    threads = threads or torch.get_num_threads()
    if channels_last:
        pruned, _ = as_channels_last(pruned, example_inputs)
        dense, example_inputs = as_channels_last(dense, example_inputs)
    with preserved_state(dense), preserved_state(pruned), torch.inference_mode():
        timers = []
        for model in (dense, pruned):
            model.eval()
            timer = _timer(model, example_inputs, threads)
            once = min(timer.timeit(1).median for _ in range(3))  # the first run also warms up
            timers.append((timer, max(1, round(min_run_time / repeats / max(once, 1e-9)))))
        samples: tuple[list[float], list[float]] = ([], [])
        for turn in range(repeats):
            for index in (0, 1) if turn % 2 == 0 else (1, 0):
                timer, number = timers[index]
                samples[index].append(timer.timeit(number).median)
    spreads = []
    for values in samples:
        low, median, high = statistics.quantiles(values, n=4, method="inclusive")
        spreads.append(Spread(median, low, high))
    return LatencyComparison(*spreads, threads)


def as_channels_last(model: nn.Module, example_inputs: ExampleInputs) -> tuple[nn.Module, ExampleInputs]:
    """A copy of ``model`` whose 4-d parameters and buffers are channels-last, and ``example_inputs`` with every
    4-d tensor channels-last (values unchanged; ``model`` itself is left as it is).

    Raises:
        TypeError: ``model`` is not an ``nn.Module`` (an ONNX Runtime session has its own layout).
        ValueError: nothing would change: neither the model nor the inputs hold a 4-d tensor.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"`channels_last` needs an nn.Module to convert, got {type(model).__name__}.")
    four_d = [t for t in [*model.parameters(), *model.buffers()] if t.ndim == 4]

    def convert(tensor: Tensor) -> Tensor:
        if tensor.ndim != 4:
            return tensor
        four_d.append(tensor)
        return tensor.contiguous(memory_format=torch.channels_last)

    inputs = map_tensors(example_inputs, convert)
    if not four_d:
        raise ValueError(
            "`channels_last=True`, but the model has no 4-d weight and the inputs no 4-d tensor: the layout applies "
            "to convolutions over images (N, C, H, W). Time this model with `channels_last=False`."
        )
    return copy.deepcopy(model).to(memory_format=torch.channels_last), inputs


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
