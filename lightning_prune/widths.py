"""Hardware-friendly widths: how a layer's time depends on its width on this device, and the ``round_to`` it asks.

Kernels often work in blocks of channels (vector lanes on a CPU, tensor-core tiles on a GPU): a width just
under a multiple of the block then takes as long as the multiple itself, and removing those channels saves
nothing. :func:`sweep` times a convolution and a linear layer at every width of a range;
:func:`choose_round_to` reads the largest block for which that holds; :func:`default_round_to` does both once
per device and keeps the answer beside the latency table (``prune(..., round_to="auto")``).
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from lightning_prune.latency_table import LayerSpec, TimeLayer, cache_dir, device_name, time_layer

MULTIPLES = (8, 16, 32)
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
) -> list[WidthTiming]:
    """Time a 3x3 convolution (``batch`` x width x ``size`` x ``size``, each layout) and a linear layer
    (``batch * size * size`` rows) with ``width`` input and output channels, for each width."""
    device = torch.device(device)
    found = []
    for width in widths:
        for last in channels_last:
            spec = LayerSpec(
                "Conv2d", width, width, (batch, width, size, size), (3, 1, 1, 1, 1, False), channels_last=last
            )
            found.append(WidthTiming("conv3x3", width, last, float(time(*spec.build(width, width, device)))))
        spec = LayerSpec("Linear", width, width, (batch * size * size, width), (False,))
        found.append(WidthTiming("linear", width, False, float(time(*spec.build(width, width, device)))))
    return found


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


def default_round_to(device: torch.device | str = "cpu", *, cache: bool = True, time: TimeLayer = time_layer) -> int:
    """``choose_round_to`` of the slowest-to-compute layer kind in a :func:`sweep` on ``device``, measured once
    per device and kept in ``$LIGHTNING_PRUNE_CACHE/latency/widths-<device>.json`` when ``cache``."""
    device = torch.device(device)
    path = cache_dir() / f"widths-{device_name(device)}.json"
    if cache and path.exists():
        return int(json.loads(path.read_text())["round_to"])
    timings = sweep(device=device, time=time)
    by_kind: dict[tuple[str, bool], dict[int, float]] = {}
    for timing in timings:
        by_kind.setdefault((timing.kind, timing.channels_last), {})[timing.width] = timing.seconds
    slowest = max(by_kind.values(), key=lambda seconds: sum(seconds.values()))
    round_to = choose_round_to(slowest)
    if cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"round_to": round_to, "seconds": {str(w): s for w, s in slowest.items()}}))
    return round_to
