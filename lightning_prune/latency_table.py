"""The per-layer latency table behind ``target="latency"``: each convolution and linear layer timed alone at a
grid of widths, once per device, layer shape and batch, and the estimated time of a model at any widths.

:class:`LatencyTable` keeps the timings as JSON under ``$LIGHTNING_PRUNE_CACHE/latency``; :class:`LatencyModel`
sums a model's layers, interpolated between the timed widths, and after :meth:`LatencyModel.calibrate` also the
time the table does not hold (norms, activations, squeeze-excitation, elementwise ops, per-call overhead): the
whole model's measured time minus its layers timed now, shared out by where the forward spends it (the time
after each layer until the next one starts, :func:`time_between_layers`), each layer's share shrinking with its
output channels. :mod:`lightning_prune.latency` plans and searches over it.
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lightning_prune.measure import _import_benchmark
from lightning_prune.registry import Registry
from lightning_prune.running import ExampleInputs, preserved_state, run_model

FRACTIONS = (1.0, 0.75, 0.5, 0.25, 0.125)  # of a layer's dense width, timed on both sides
RUNS = 3  # forwards whose time between layers is read (the median per layer is kept)
TimeLayer = Callable[[nn.Module, Tensor], float]
Clock = Callable[[], float]


def cache_dir() -> Path:
    """``$LIGHTNING_PRUNE_CACHE/latency`` or ``~/.cache/lightning_prune/latency``."""
    return Path(os.environ.get("LIGHTNING_PRUNE_CACHE", Path.home() / ".cache" / "lightning_prune")) / "latency"


def device_name(device: torch.device) -> str:
    """A file-name-safe name of the device and the thread count it is timed with."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"{platform.machine()}-{_cpu_model()}-{torch.get_num_threads()}threads"
    return "".join(c if c.isalnum() or c in "-." else "_" for c in f"{device.type}-{name}-torch{torch.__version__}")


def _cpu_model() -> str:
    """The CPU's model name (Linux ``/proc/cpuinfo``), else what ``platform`` knows."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        lines = []
    names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    return names[0] if names else platform.processor() or "cpu"


@dataclass(frozen=True)
class TimedLayer:
    """How the table times a layer type besides ``nn.Conv2d`` and ``nn.Linear`` (attention, say).

    Args:
        matches: ``matches(module)``: the modules of this kind.
        describe: ``describe(module, args, kwargs, output) -> LayerSpec | None`` from one forward call (None: a
            call this kind cannot time alone, whose time then counts as the model's residual).
        build: ``build(spec, in_width, out_width) -> module`` a fresh layer at these widths, called on one
            random input of ``in_width`` features in the last dimension.
        weight: the parameter (by its name in the module) whose dim 0 is the ``out`` width and dim 1 the ``in``
            width, as the dependency graph sees them.
        block: ``block(spec)``: the ``out`` width comes in multiples of this (a head's rows).
        outputs: ``outputs(spec, in_width, out_width)``: channels of the module's output at these widths.
    """

    matches: Callable[[nn.Module], bool]
    describe: Callable[[nn.Module, tuple[Any, ...], dict[str, Any], Any], LayerSpec | None]
    build: Callable[[LayerSpec, int, int], nn.Module]
    weight: str
    block: Callable[[LayerSpec], int]
    outputs: Callable[[LayerSpec, int, int], int]


TIMED_LAYERS: Registry[str, TimedLayer] = Registry(
    "timed layer", "register one with `lightning_prune.latency_table.TIMED_LAYERS.register(kind, TimedLayer(...))`."
)


@dataclass(frozen=True)
class LayerSpec:
    """A convolution or linear layer as one forward sees it: its dense widths, options and input shape (and the
    shape of its output, which the table's key leaves out: it follows from the rest)."""

    kind: str
    in_width: int
    out_width: int
    input_shape: tuple[int, ...]
    options: tuple[Any, ...] = ()
    dtype: str = "float32"
    channels_last: bool = False
    output_shape: tuple[int, ...] = ()

    @property
    def depthwise(self) -> bool:
        return self.kind == "Conv2d" and self.options[4] == self.in_width > 1

    @property
    def weight_name(self) -> str:
        timed = TIMED_LAYERS.get(self.kind)
        return timed.weight if timed is not None else "weight"

    @property
    def key(self) -> str:
        layout = "-cl" if self.channels_last else ""
        return f"{self.kind}{self.options}x{self.input_shape}:{self.in_width}->{self.out_width}{self.dtype}{layout}"

    def activations(self, in_width: int, out_width: int) -> int:
        """Elements of the layer's output at these widths (its output channels times what each one holds)."""
        timed = TIMED_LAYERS.get(self.kind)
        if timed is not None:
            dense = timed.outputs(self, self.in_width, self.out_width)
            channels = timed.outputs(self, *self.widths(in_width, out_width))
        else:
            dense, channels = self.out_width, self.widths(in_width, out_width)[1]
        return math.prod(self.output_shape) // dense * channels if self.output_shape else 0

    def widths(self, in_width: int, out_width: int) -> tuple[int, int]:
        """Widths a layer of this kind can take near (``in_width``, ``out_width``)."""
        if self.depthwise:
            return in_width, in_width * (self.out_width // self.in_width)
        if self.kind == "Conv2d" and self.options[4] > 1:
            groups = self.options[4]
            return max(groups, in_width // groups * groups), max(groups, out_width // groups * groups)
        timed = TIMED_LAYERS.get(self.kind)
        if timed is not None:
            block = timed.block(self)
            return in_width, max(block, round(out_width / block) * block)
        return in_width, out_width

    def build(self, in_width: int, out_width: int, device: torch.device) -> tuple[nn.Module, Tensor]:
        """A fresh layer at these widths and a random input of the recorded shape with ``in_width`` channels."""
        dtype = getattr(torch, self.dtype)
        timed = TIMED_LAYERS.get(self.kind)
        if timed is not None:
            layer: nn.Module = timed.build(self, in_width, out_width)
            shape = (*self.input_shape[:-1], in_width)
        elif self.kind == "Linear":
            layer = nn.Linear(in_width, out_width, bias=self.options[0])
            shape = (*self.input_shape[:-1], in_width)
        else:
            kernel, stride, padding, dilation, groups, bias = self.options
            groups = in_width if self.depthwise else groups
            layer = nn.Conv2d(in_width, out_width, kernel, stride, padding, dilation, groups, bias)
            shape = (self.input_shape[0], in_width, *self.input_shape[2:])
        layout = torch.channels_last if self.channels_last else torch.contiguous_format
        layer = layer.to(device=device, dtype=dtype, memory_format=layout)
        return layer, torch.randn(shape, device=device, dtype=dtype).contiguous(memory_format=layout)


def layer_specs(model: nn.Module, example_inputs: ExampleInputs) -> dict[str, LayerSpec]:
    """Every ``Conv2d``, ``Linear`` and :data:`TIMED_LAYERS` layer of ``model`` by module name, seen in one
    eval-mode forward (a timed layer's own submodules are part of its time)."""
    specs: dict[str, LayerSpec] = {}

    def hook(name: str, timed: TimedLayer | None) -> Callable[..., None]:
        def record(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
            result = output[0] if timed is not None and isinstance(output, tuple) and output else output
            if name in specs or not args or not isinstance(args[0], Tensor) or not isinstance(result, Tensor):
                return
            x = args[0]
            last = x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
            if timed is not None:
                spec = timed.describe(module, args, kwargs, output)
                if spec is None:
                    return
            elif isinstance(module, nn.Linear):
                spec = LayerSpec(
                    "Linear", module.in_features, module.out_features, tuple(x.shape), (module.bias is not None,)
                )
            else:
                options = (module.kernel_size, module.stride, module.padding, module.dilation, module.groups)
                spec = LayerSpec(
                    "Conv2d",
                    module.in_channels,
                    module.out_channels,
                    tuple(x.shape),
                    (*options, module.bias is not None),
                )
            dtype = str(x.dtype).removeprefix("torch.")
            specs[name] = replace(spec, dtype=dtype, channels_last=last, output_shape=tuple(result.shape))

        return record

    wanted: list[tuple[str, nn.Module, TimedLayer | None]] = []
    for name, module in model.named_modules():
        if any(name.startswith(f"{inside}.") for inside, _, timed in wanted if timed is not None):
            continue
        timed = next((t for t in TIMED_LAYERS.values() if t.matches(module)), None)
        if timed is not None or type(module) in (nn.Conv2d, nn.Linear):
            wanted.append((name, module, timed))
    handles = [module.register_forward_hook(hook(name, timed), with_kwargs=True) for name, module, timed in wanted]
    try:
        with preserved_state(model), torch.no_grad():
            model.eval()
            run_model(model, example_inputs)
    finally:
        for handle in handles:
            handle.remove()
    return specs


def time_layer(layer: nn.Module, x: Tensor) -> float:
    """Median seconds of one forward of ``layer`` on ``x`` (``torch.utils.benchmark``, about 20 ms of runs)."""
    with torch.inference_mode():
        timer = _import_benchmark().Timer(
            "layer(x)", globals={"layer": layer, "x": x}, num_threads=torch.get_num_threads()
        )
        return timer.blocked_autorange(min_run_time=0.02).median


def time_between_layers(
    model: nn.Module, example_inputs: ExampleInputs, names: Sequence[str], *, clock: Clock = time.perf_counter
) -> tuple[dict[str, float], float]:
    """Seconds of an eval-mode forward spent outside the layers ``names``: after each one until the next starts
    (or the forward ends), the median over :data:`RUNS` forwards, and the time before the first one.

    Read with forward hooks and ``clock``; on CUDA each reading synchronises first. What follows a layer in call
    order is mostly what reads its output (its norm, activation, gate, the add after it), so a layer's share of
    the model's untimed work follows its output channels.
    """
    modules = dict(model.named_modules())
    cuda = any(p.is_cuda for p in model.parameters())
    state: dict[str, Any] = {}

    def now() -> float:
        if cuda:
            torch.cuda.synchronize()
        return clock()

    def close_gap(*_: Any) -> None:  # the time since the last layer ended goes to that layer (None: the start)
        state["gaps"][state["last"]] = state["gaps"].get(state["last"], 0.0) + now() - state["since"]

    def leave(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            state["last"], state["since"] = name, now()

        return hook

    handles = [modules[name].register_forward_pre_hook(close_gap) for name in names]
    handles += [modules[name].register_forward_hook(leave(name)) for name in names]
    runs: list[dict[str | None, float]] = []
    try:
        with preserved_state(model), torch.no_grad():
            model.eval()
            for _ in range(RUNS):
                state.update(gaps={}, last=None, since=now())
                run_model(model, example_inputs)
                close_gap()
                runs.append(state["gaps"])
    finally:
        for handle in handles:
            handle.remove()
    after = {name: statistics.median(run.get(name, 0.0) for run in runs) for name in names}
    return after, statistics.median(run.get(None, 0.0) for run in runs)


class LatencyTable:
    """Seconds of each layer spec on a grid of (input, output) widths, timed once and kept in a JSON file.

    ``time(layer, input) -> seconds`` times one layer (:func:`time_layer` by default); ``path`` is the cache
    file (one per device: :func:`cache_dir` / :func:`device_name`), None to keep the table in memory only.
    """

    def __init__(self, device: torch.device, path: Path | None, time: TimeLayer = time_layer) -> None:
        self.device, self.path, self.time = device, path, time
        self.entries: dict[str, dict[str, list]] = {}
        self.timed = 0
        if path is not None and path.exists():
            self.entries = json.loads(path.read_text())

    def grid(self, spec: LayerSpec) -> dict[str, list]:
        """The spec's grid, timing (and saving) it first if it is not in the table."""
        if spec.key not in self.entries:
            ins = sorted({max(1, round(f * spec.in_width)) for f in FRACTIONS})
            outs = sorted({max(1, round(f * spec.out_width)) for f in FRACTIONS})
            if spec.kind in TIMED_LAYERS:  # whole heads: the grid holds the widths the layer can take
                outs = sorted({spec.widths(spec.in_width, o)[1] for o in outs})
            if spec.depthwise:  # the output follows the input: one width, kept on the diagonal
                outs = [spec.widths(i, i)[1] for i in ins]
            seconds = [[self._time(spec, i, o) for o in outs] for i in ins]
            self.entries[spec.key] = {"in": ins, "out": outs, "seconds": seconds}
            if self.path is not None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self.path.write_text(json.dumps(self.entries))
        return self.entries[spec.key]

    def _time(self, spec: LayerSpec, in_width: int, out_width: int) -> float:
        if spec.depthwise and out_width != spec.widths(in_width, in_width)[1]:
            return math.nan  # a depthwise layer's output follows its input: never looked up
        self.timed += 1
        return float(self.time(*spec.build(*spec.widths(in_width, out_width), self.device)))

    def seconds(self, spec: LayerSpec, in_width: int, out_width: int) -> float:
        """Interpolated seconds of the layer at these widths (bilinear; clamped at the grid's edges)."""
        grid = self.grid(spec)
        i, a = _bracket(grid["in"], in_width)
        k = min(i + 1, len(grid["in"]) - 1)  # an axis of one width (a layer of one input channel) has no next
        s = grid["seconds"]
        if spec.depthwise:
            return s[i][i] * (1 - a) + s[k][k] * a
        j, b = _bracket(grid["out"], out_width)
        m = min(j + 1, len(grid["out"]) - 1)
        return (1 - a) * ((1 - b) * s[i][j] + b * s[i][m]) + a * ((1 - b) * s[k][j] + b * s[k][m])


def _bracket(points: Sequence[int], value: float) -> tuple[int, float]:
    """Index ``i`` and weight ``w`` so that ``value`` ≈ points[i] * (1 - w) + points[i + 1] * w (clamped)."""
    if len(points) == 1:
        return 0, 0.0
    value = min(max(value, points[0]), points[-1])
    for i in range(len(points) - 1):
        if value <= points[i + 1]:
            return i, (value - points[i]) / (points[i + 1] - points[i])
    return len(points) - 2, 1.0


class LatencyModel:
    """The estimated seconds of a model at any widths: its convolutions, linear and :data:`TIMED_LAYERS` layers
    from a :class:`LatencyTable`, and after :meth:`calibrate`, the rest of its measured time.

    ``scale`` turns the table's seconds into seconds now (the table may have been timed on a busier or quieter
    machine); ``fixed`` is the measured time before the first layer, which no width changes; ``residual`` holds,
    per layer, the dense model's measured seconds spent after it and outside any
    timed layer (the norms, activations, gates and adds that read its output), which shrinks in proportion to
    the layer's output elements: a layer with half its output channels carries half its share.
    """

    def __init__(self, specs: Mapping[str, LayerSpec], table: LatencyTable) -> None:
        self.specs, self.table = dict(specs), table
        self.scale, self.fixed = 1.0, 0.0
        self.residual: dict[str, float] = {}

    @classmethod
    def of(
        cls, model: nn.Module, example_inputs: ExampleInputs, *, time: TimeLayer = time_layer, cache: bool = True
    ) -> LatencyModel:
        """The layers of ``model`` at ``example_inputs`` and the table of their device (kept on disk if ``cache``)."""
        specs = layer_specs(model, example_inputs)
        parameter = next(model.parameters(), None)
        device = parameter.device if parameter is not None else torch.device("cpu")
        path = cache_dir() / f"{device_name(device)}.json" if cache else None
        return cls(specs, LatencyTable(device, path, time))

    def calibrate(
        self, model: nn.Module, example_inputs: ExampleInputs, seconds: float, *, clock: Clock = time.perf_counter
    ) -> None:
        """Fit the estimate to ``seconds``, the whole dense ``model``'s measured time per forward.

        Every layer is timed once more at its dense widths (now, beside that measurement), which sets ``scale``.
        What the model takes beyond its layers is shared over them as :func:`time_between_layers` finds it
        spent (the part before the first layer stays fixed). If the layers alone take longer than the model
        (noise, or caches they share when run together), they are scaled down to its time and nothing is residual.
        """
        tabled = sum(self.table.seconds(spec, spec.in_width, spec.out_width) for spec in self.specs.values())
        fresh: dict[str, float] = {}  # layers of one shape (a transformer's blocks) are timed once
        for spec in self.specs.values():
            if spec.key not in fresh:
                fresh[spec.key] = float(self.table.time(*spec.build(spec.in_width, spec.out_width, self.table.device)))
        now = sum(fresh[spec.key] for spec in self.specs.values())
        if not (tabled > 0 and now > 0 and seconds > 0):
            return
        self.scale = min(now, seconds) / tabled
        after, before = time_between_layers(model, example_inputs, list(self.specs), clock=clock)
        spent = sum(after.values()) + before
        rest = max(seconds - now, 0.0) if spent > 0 else 0.0
        self.residual = {name: rest * gap / spent for name, gap in after.items()}
        self.fixed = rest * before / spent if spent > 0 else 0.0

    def layer(self, name: str, widths: Mapping[str, Sequence[int]]) -> float:
        """Estimated seconds of one layer at ``widths``, with its share of the residual."""
        spec, (in_width, out_width) = self.specs[name], widths[name]
        seconds = self.scale * self.table.seconds(spec, in_width, out_width)
        share = self.residual.get(name, 0.0)
        if share:
            dense = spec.activations(spec.in_width, spec.out_width)
            seconds += share * (spec.activations(in_width, out_width) / dense if dense else 1.0)
        return seconds

    def dense_widths(self) -> dict[str, list[int]]:
        return {name: [spec.in_width, spec.out_width] for name, spec in self.specs.items()}

    def seconds(self, widths: Mapping[str, Sequence[int]] | None = None) -> float:
        """Estimated seconds of the model at ``widths`` (module name -> [in, out]; dense if None)."""
        widths = widths or self.dense_widths()
        return self.fixed + sum(self.layer(name, widths) for name in self.specs)

    def effects(self, group: Any) -> list[tuple[str, int, Tensor, int]]:
        """(layer, side 0 in / 1 out, element of each position, channels per position) of ``group`` in these layers."""
        found = []
        for member in group.members:
            name, _, leaf = member.slot.tensor.rpartition(".")
            spec = self.specs.get(name)
            if spec is None or leaf != spec.weight_name or member.slot.dim > 1:
                continue
            if member.slot.dim == 0:
                found.append((name, 0 if spec.depthwise else 1, member.elements, 1))
            elif not spec.depthwise:
                factor = spec.options[4] if spec.kind == "Conv2d" else 1
                found.append((name, 0, member.elements, factor))
        return found
