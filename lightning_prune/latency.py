"""Pruning to a latency goal: a per-layer lookup table of latency by width, a greedy knapsack over it, and the
measure-and-correct loop that checks the whole model's time.

HALP (Shen et al. 2022) in outline: every convolution and linear layer is timed alone at a grid of input and
output widths once per device, layer shape and batch (:class:`LatencyTable`, cached as JSON under
``$LIGHTNING_PRUNE_CACHE/latency``); the estimated time of a pruned model is the interpolated sum over its
layers (:class:`LatencyModel`); :func:`plan_for_latency` removes, step by step, the chunk of channels that
loses least importance per second saved; :func:`search_latency` times the whole pruned model against the dense
one and moves the estimated goal until the measured ratio holds.
"""

from __future__ import annotations

import json
import math
import os
import platform
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

from lightning_prune.errors import PruningError
from lightning_prune.graph.groups import DependencyGraph
from lightning_prune.measure import LatencyComparison, _import_benchmark, compare_latency
from lightning_prune.running import ExampleInputs, preserved_state, run_model
from lightning_prune.selection import Plan, SelectionOptions, allowed_count, lowest, normalize_scores, select

FRACTIONS = (1.0, 0.75, 0.5, 0.25, 0.125)  # of a layer's dense width, timed on both sides
STEPS = 32  # a group loses at most 1/STEPS of its width per greedy step
TOLERANCE = 0.05  # of the goal ratio: a measured ratio within it below the goal ends the search
ROUNDS = 5
TimeLayer = Callable[[nn.Module, Tensor], float]


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
class LayerSpec:
    """A convolution or linear layer as one forward sees it: its dense widths, options and input shape."""

    kind: str
    in_width: int
    out_width: int
    input_shape: tuple[int, ...]
    options: tuple[Any, ...] = ()
    dtype: str = "float32"
    channels_last: bool = False

    @property
    def depthwise(self) -> bool:
        return self.kind == "Conv2d" and self.options[4] == self.in_width > 1

    @property
    def key(self) -> str:
        layout = "-cl" if self.channels_last else ""
        return f"{self.kind}{self.options}x{self.input_shape}:{self.in_width}->{self.out_width}{self.dtype}{layout}"

    def widths(self, in_width: int, out_width: int) -> tuple[int, int]:
        """Widths a layer of this kind can take near (``in_width``, ``out_width``)."""
        if self.depthwise:
            return in_width, in_width * (self.out_width // self.in_width)
        if self.kind == "Conv2d" and self.options[4] > 1:
            groups = self.options[4]
            return max(groups, in_width // groups * groups), max(groups, out_width // groups * groups)
        return in_width, out_width

    def build(self, in_width: int, out_width: int, device: torch.device) -> tuple[nn.Module, Tensor]:
        """A fresh layer at these widths and a random input of the recorded shape with ``in_width`` channels."""
        dtype = getattr(torch, self.dtype)
        if self.kind == "Linear":
            layer: nn.Module = nn.Linear(in_width, out_width, bias=self.options[0])
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
    """Every ``Conv2d`` and ``Linear`` of ``model`` by module name, seen in one eval-mode forward."""
    specs: dict[str, LayerSpec] = {}

    def hook(name: str) -> Callable[..., None]:
        def record(module: nn.Module, args: tuple[Any, ...]) -> None:
            if name in specs or not args or not isinstance(args[0], Tensor):
                return
            x = args[0]
            last = x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
            if isinstance(module, nn.Linear):
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
            specs[name] = replace(spec, dtype=str(x.dtype).removeprefix("torch."), channels_last=last)

        return record

    wanted = [(name, module) for name, module in model.named_modules() if type(module) in (nn.Conv2d, nn.Linear)]
    handles = [module.register_forward_pre_hook(hook(name)) for name, module in wanted]
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
        if spec.depthwise:
            index, weight = _bracket(grid["in"], in_width)
            diagonal = [grid["seconds"][i][i] for i in range(len(grid["in"]))]
            return diagonal[index] * (1 - weight) + diagonal[index + 1] * weight
        i, a = _bracket(grid["in"], in_width)
        j, b = _bracket(grid["out"], out_width)
        s = grid["seconds"]
        return (1 - a) * ((1 - b) * s[i][j] + b * s[i][j + 1]) + a * ((1 - b) * s[i + 1][j] + b * s[i + 1][j + 1])


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
    """The estimated seconds of a model's convolutions and linear layers at any widths, from a :class:`LatencyTable`."""

    def __init__(self, specs: Mapping[str, LayerSpec], table: LatencyTable) -> None:
        self.specs, self.table = dict(specs), table

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

    def layer(self, name: str, widths: Mapping[str, Sequence[int]]) -> float:
        return self.table.seconds(self.specs[name], *widths[name])

    def dense_widths(self) -> dict[str, list[int]]:
        return {name: [spec.in_width, spec.out_width] for name, spec in self.specs.items()}

    def seconds(self, widths: Mapping[str, Sequence[int]] | None = None) -> float:
        """Estimated seconds of all layers at ``widths`` (module name -> [in, out]; dense if None)."""
        widths = widths or self.dense_widths()
        return sum(self.layer(name, widths) for name in self.specs)

    def effects(self, group: Any) -> list[tuple[str, int, Tensor, int]]:
        """(layer, side 0 in / 1 out, element of each position, channels per position) of ``group`` in these layers."""
        found = []
        for member in group.members:
            name, _, leaf = member.slot.tensor.rpartition(".")
            spec = self.specs.get(name)
            if leaf != "weight" or spec is None or member.slot.dim > 1:
                continue
            if member.slot.dim == 0:
                found.append((name, 0 if spec.depthwise else 1, member.elements, 1))
            elif not spec.depthwise:
                factor = spec.options[4] if spec.kind == "Conv2d" else 1
                found.append((name, 0, member.elements, factor))
        return found


def plan_for_latency(
    graph: DependencyGraph,
    scores: Sequence[Tensor | None],
    cost: LatencyModel,
    keep: float,
    selection: SelectionOptions,
) -> Plan:
    """The plan that brings ``cost``'s estimated seconds to at most ``keep`` of the dense estimate.

    Greedy knapsack: each step removes, from one group, its next chunk of lowest-scored elements (about
    1/``STEPS`` of its width, as ``round_to``, blocks and ``max_fraction`` allow), choosing the chunk whose
    importance lost (scores normalized per group by ``selection.normalize``) per estimated second saved is
    least. Groups whose removal saves no time are never cut.

    Raises:
        PruningError: if removing everything the constraints allow does not reach the goal.
    """
    widths = cost.dense_widths()
    dense = cost.seconds(widths)
    goal, current = keep * dense, dense
    pairs = zip(graph.groups, scores, strict=True)
    scored = {g.index: (g, normalize_scores(s, selection.normalize)) for g, s in pairs if s is not None}
    effects = {index: cost.effects(group) for index, (group, _) in scored.items()}
    sharing: dict[str, set[int]] = {}
    for index, found in effects.items():
        for name, *_ in found:
            sharing.setdefault(name, set()).add(index)
    removed: dict[int, list[int]] = {index: [] for index in scored}

    def candidate(index: int) -> tuple[float, list[int], dict[str, list[int]], float] | None:
        group, values = scored[index]
        step = max(1, math.ceil(group.width / STEPS))
        count = next(
            (c for c in range(len(removed[index]) + step, group.width + 1)
             if allowed_count(group, c, selection.round_to, selection.max_fraction) == c),
            None,
        )  # fmt: skip
        if count is None:
            return None
        elements = lowest(group, values, count)
        loss = float(values[elements].sum() - values[removed[index]].sum())
        if not math.isfinite(loss):
            return None
        new, old = torch.tensor(elements, dtype=torch.long), torch.tensor(removed[index], dtype=torch.long)
        after = {name: list(widths[name]) for name, *_ in effects[index]}
        for name, side, owners, factor in effects[index]:
            after[name][side] -= factor * int(torch.isin(owners, new).sum() - torch.isin(owners, old).sum())
        saved = sum(cost.layer(name, widths) - cost.layer(name, after) for name in after)
        return (max(loss, 0.0) / saved if saved > 0 else math.inf), elements, after, saved

    candidates = {index: candidate(index) for index in scored}
    while current > goal:
        useful = [(c[0], index) for index, c in candidates.items() if c is not None and c[0] < math.inf]
        if not useful:
            raise PruningError(
                f"`target='latency'` cannot reach {keep:.0%} of the estimated dense time of the convolutions and "
                f"linear layers ({dense * 1e3:.3g} ms): removing everything the constraints allow leaves "
                f"{current / dense:.0%}. Lower `amount`, raise `max_fraction` or shrink `ignore`."
            )
        _, index = min(useful)
        _, elements, after, saved = candidates[index]
        removed[index] = elements
        widths.update(after)
        current -= saved
        touched = {other for name in after for other in sharing[name]}
        candidates.update({other: candidate(other) for other in touched})
    return _final_plan(scored, removed, selection)


def _final_plan(
    scored: Mapping[int, tuple[Any, Tensor]], removed: Mapping[int, list[int]], selection: SelectionOptions
) -> Plan:
    """The chosen counts through ``select`` (one group at a time), so floors and emptied producers are respected."""
    local = replace(selection, scope="local")
    plan: dict[int, list[int]] = {}
    for index, elements in removed.items():
        group, values = scored[index]
        if elements:
            plan.update(select([group], [values], len(elements) / group.width, local).removed)
    return Plan(plan)


Trial = TypeVar("Trial")
Timing = Callable[[nn.Module, nn.Module, ExampleInputs], LatencyComparison]


def _compare(dense: nn.Module, pruned: nn.Module, example_inputs: ExampleInputs) -> LatencyComparison:
    return compare_latency(dense, pruned, example_inputs)


@dataclass(frozen=True)
class LatencySettings:
    """How ``target="latency"`` measures, validated on construction.

    Args:
        timing: ``timing(dense, pruned, example_inputs) -> LatencyComparison`` times the whole models
            (:func:`~lightning_prune.measure.compare_latency` by default).
        time_layer: ``time_layer(layer, input) -> seconds`` times one layer for the table.
        cache: keep the table on disk (``$LIGHTNING_PRUNE_CACHE/latency/<device>.json``) and reuse it.
        tolerance: a measured ratio within this fraction below the goal ends the search.
        rounds: at most this many pruned copies are timed.
    """

    timing: Timing = _compare
    time_layer: TimeLayer = time_layer
    cache: bool = True
    tolerance: float = TOLERANCE
    rounds: int = ROUNDS

    def __post_init__(self) -> None:
        if not (isinstance(self.tolerance, int | float) and 0 < self.tolerance < 1):
            raise PruningError(f"`tolerance` must be a fraction in (0, 1), got {self.tolerance!r}.")
        if isinstance(self.rounds, bool) or not isinstance(self.rounds, int) or self.rounds < 1:
            raise PruningError(f"`rounds` must be a positive integer, got {self.rounds!r}.")


@dataclass(frozen=True)
class LatencyOutcome:
    """What a latency step reached: the goal (pruned / dense seconds), the timing that met it, every try."""

    goal: float
    timing: LatencyComparison
    tries: list[tuple[float, float]]

    @property
    def measured(self) -> float:
        return 1.0 / self.timing.ratio


def search_latency(
    attempt: Callable[[float], Trial],
    measure: Callable[[Trial], float],
    goal: float,
    *,
    tolerance: float = TOLERANCE,
    rounds: int = ROUNDS,
) -> tuple[Trial, float, list[tuple[float, float]]]:
    """Find the estimated fraction ``keep`` whose pruned model measures at most ``goal`` of the dense time.

    ``attempt(keep)`` prunes a copy to ``keep`` of the estimated time; ``measure(trial)`` times it against the
    dense model (pruned / dense seconds). The first try asks for ``goal``; the next ones aim a little below it
    (half the ``tolerance``), by the secant through the last two tries (after one, assuming time in proportion
    to ``keep``), kept between the best try on either side of the goal, until a trial measures within
    ``tolerance`` (a fraction of ``goal``) at or below the goal, or after ``rounds`` tries.

    Returns:
        The trial that met the goal with the largest ``keep``, its measured ratio, and every (keep, ratio) tried.

    Raises:
        PruningError: if no trial measured at or below ``goal``.
    """
    aim = goal * (1 - tolerance / 2)
    keep, history = goal, []
    best: tuple[float, Trial, float] | None = None
    slow: float | None = None  # the smallest keep measured above the goal
    for _ in range(rounds):
        trial = attempt(keep)
        ratio = measure(trial)
        history.append((keep, ratio))
        if ratio <= goal:
            if best is None or keep > best[0]:
                best = (keep, trial, ratio)
            if ratio >= goal * (1 - tolerance):
                break
        else:
            slow = keep if slow is None else min(slow, keep)
        following = _next_keep(history, aim)
        low, high = (best[0] if best else 0.0), (slow if slow is not None else 1.0)
        if not low < following < high:
            following = (low + high) / 2
        if abs(following - keep) < 1e-3:
            break
        keep = following
    if best is None:
        tried = ", ".join(f"{k:.3f} -> {r:.3f}" for k, r in history)
        raise PruningError(
            f"`target='latency'` could not bring the measured latency to {goal:.0%} of the dense model's in "
            f"{len(history)} tries (estimated fraction -> measured ratio: {tried}); the model is unchanged. The "
            "layers the table times may not dominate this model's time, or the machine is too busy to tell: "
            "lower `amount`'s demands or retry on a quieter machine."
        )
    return best[1], best[2], history


def _next_keep(history: Sequence[tuple[float, float]], aim: float) -> float:
    """The keep whose ratio the last two tries' secant puts at ``aim`` (after one try: in proportion)."""
    keep, ratio = history[-1]
    if len(history) > 1:
        before, ratio_before = history[-2]
        if ratio != ratio_before and keep != before:
            return keep + (aim - ratio) * (keep - before) / (ratio - ratio_before)
    return keep * aim / ratio if ratio > 0 else keep
