"""Hardware-friendly widths: how a layer's time depends on its width on this device, and the ``round_to`` it asks.

Kernels often work in blocks of channels (vector lanes on a CPU, tensor-core tiles on a GPU): a width just
under a multiple of the block then takes as long as the multiple itself, and removing those channels saves
nothing. :func:`sweep` times a convolution and a linear layer at every width of a range;
:func:`choose_round_to` reads the largest block for which that holds; :func:`default_round_to` does both once
per device and keeps the sweep beside the latency table; ``prune(..., round_to="auto")`` reads the answer for
the layer kind that holds most of the model's weights, in the layout it runs in (:func:`round_to_for`).
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lightning_prune.latency_table import LayerSpec, TimeLayer, cache_dir, device_name, time_layer
from lightning_prune.running import ExampleInputs, map_tensors
from lightning_prune.slicing import layout

MULTIPLES = (8, 16, 32)
ROUNDS = 5  # passes of a sweep over its widths
SHARE = 0.25  # widths between multiples must save less than this share of the time their channels would


@dataclass(frozen=True)
class WidthTiming:
    """Seconds of one layer kind at one width (input and output channels alike)."""

    kind: str
    width: int
    channels_last: bool
    seconds: float


def sweep(
    widths: Sequence[int] = tuple(range(33, 129)),
    *,
    batch: int = 1,
    size: int = 14,
    channels_last: Sequence[bool] = (False, True),
    device: torch.device | str = "cpu",
    time: TimeLayer = time_layer,
    rounds: int = ROUNDS,
) -> list[WidthTiming]:
    """Time a 3x3 convolution (``batch`` x width x ``size`` x ``size``, each layout) and a linear layer
    (``batch * size * size`` rows) with ``width`` input and output channels, for each width: the median of
    ``rounds`` passes over all widths, every other pass in reverse order, so that a busy spell of the machine
    reaches every width alike rather than a few neighbours (single passes chose 1 or 8, and 16 or 32, for the same
    layer here)."""
    device = torch.device(device)
    layers = []
    for width in widths:
        for last in channels_last:
            spec = LayerSpec(
                "Conv2d", width, width, (batch, width, size, size), (3, 1, 1, 1, 1, False), channels_last=last
            )
            layers.append(("conv3x3", width, last, spec))
        layers.append(
            ("linear", width, False, LayerSpec("Linear", width, width, (batch * size * size, width), (False,)))
        )
    seconds: list[list[float]] = [[] for _ in layers]
    for round_ in range(rounds):
        for index in range(len(layers)) if round_ % 2 == 0 else reversed(range(len(layers))):
            _, width, _, spec = layers[index]
            seconds[index].append(float(time(*spec.build(width, width, device))))
    return [
        WidthTiming(kind, width, last, statistics.median(found))
        for (kind, width, last, _), found in zip(layers, seconds, strict=True)
    ]


def savings(seconds: Mapping[int, float], multiple: int) -> list[float]:
    """For each timed width between multiples of ``multiple`` (whose next multiple up was timed): the fraction of
    time it saves against that multiple, over the fraction of channels it has fewer (about 1 where time follows
    width, 2 where it follows width squared, near 0 or below where the kernel works in blocks of ``multiple``)."""
    found = []
    for width, time in seconds.items():
        up = -(-width // multiple) * multiple
        if width % multiple and up in seconds and seconds[up] > 0:
            found.append(((seconds[up] - time) / seconds[up]) / ((up - width) / up))
    return found


def choose_round_to(seconds: Mapping[int, float], multiples: Sequence[int] = MULTIPLES, share: float = SHARE) -> int:
    """The largest of ``multiples`` whose in-between widths save (in the median) less than ``share`` of the time
    their missing channels would in proportion (:func:`savings`), so that pruning to them buys nothing; else 1."""
    chosen = 1
    for multiple in sorted(multiples):
        found = savings(seconds, multiple)
        if found and statistics.median(found) < share:
            chosen = multiple
    return chosen


FORMAT = 3  # of the cached sweep: every layer kind's seconds by width, medians of ROUNDS passes
LINEAR, CONV, CONV_LAST = "linear", "conv3x3", "conv3x3 channels_last"


def kind_key(timing: WidthTiming) -> str:
    """``"linear"``, ``"conv3x3"`` or ``"conv3x3 channels_last"``: the column of a :func:`sweep` timing."""
    return timing.kind + (" channels_last" if timing.channels_last else "")


def swept_seconds(
    device: torch.device | str = "cpu", *, cache: bool = True, time: TimeLayer = time_layer
) -> dict[str, dict[int, float]]:
    """Seconds by width of each layer kind (:func:`kind_key`) in a :func:`sweep` on ``device``, measured once per
    device and kept in ``$LIGHTNING_PRUNE_CACHE/latency/widths-<device>.json`` when ``cache``."""
    device = torch.device(device)
    path = cache_dir() / f"widths-{device_name(device)}.json"
    if cache and path.exists():
        stored = json.loads(path.read_text())
        if stored.get("format") == FORMAT:  # an older file held one kind's answer only: measured again
            return {kind: {int(w): s for w, s in seconds.items()} for kind, seconds in stored["seconds"].items()}
    found: dict[str, dict[int, float]] = {}
    for timing in sweep(device=device, time=time):
        found.setdefault(kind_key(timing), {})[timing.width] = timing.seconds
    if cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        seconds = {kind: {str(w): s for w, s in by_width.items()} for kind, by_width in found.items()}
        path.write_text(json.dumps({"format": FORMAT, "seconds": seconds}))
    return found


def default_round_to(
    device: torch.device | str = "cpu",
    *,
    kind: str = CONV,
    cache: bool = True,
    time: TimeLayer = time_layer,
) -> int:
    """:func:`choose_round_to` of one layer kind (``"conv3x3"``, ``"conv3x3 channels_last"`` or ``"linear"``)
    in the sweep of ``device`` (:func:`swept_seconds`)."""
    seconds = swept_seconds(device, cache=cache, time=time)
    if kind not in seconds:
        raise ValueError(f"`kind` must be one of {', '.join(map(repr, seconds))}; got {kind!r}.")
    return choose_round_to(seconds[kind])


def dominant_kind(model: nn.Module, example_inputs: ExampleInputs = ()) -> str:
    """The layer kind of the sweep that holds most of ``model``'s weights: ``"linear"`` (``nn.Linear``, GPT-2's
    ``Conv1D``, ``nn.MultiheadAttention``'s input projection) or a convolution (``nn.Conv2d`` of one group),
    channels-last where the model's convolution weights or its 4-d example inputs are laid out so (what the
    kernels then run on: :func:`lightning_prune.slicing.layout`)."""
    convolutions = [m.weight for m in model.modules() if isinstance(m, nn.Conv2d) and m.groups == 1]
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D")
    linear += sum(m.in_proj_weight.numel() for m in model.modules() if getattr(m, "in_proj_weight", None) is not None)
    if sum(w.numel() for w in convolutions) <= linear:
        return LINEAR
    inputs: list[Tensor] = []
    map_tensors(example_inputs, lambda t: inputs.append(t) or t)
    laid_out = [*convolutions, *(t for t in inputs if t.ndim == 4)]
    return CONV_LAST if any(layout(t) == torch.channels_last for t in laid_out) else CONV


def round_to_for(
    model: nn.Module, example_inputs: ExampleInputs = (), *, cache: bool = True, time: TimeLayer = time_layer
) -> int:
    """``round_to="auto"``: :func:`default_round_to` of ``model``'s :func:`dominant_kind`, on the device its
    parameters are on (a CPU here: 1 for an NCHW CNN, 16 for a channels-last one or a transformer)."""
    parameter = next(model.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    return default_round_to(device, kind=dominant_kind(model, example_inputs), cache=cache, time=time)
