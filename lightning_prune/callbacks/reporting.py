"""What a pruning step tells the user: one summary line (stable, for logs and tests) and a per-layer table."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info

from lightning_prune.api import LayerChange
from lightning_prune.budget import DenseSize
from lightning_prune.latency import LatencyOutcome


def report_step(
    trainer: pl.Trainer,
    title: str,
    what: str,
    amount: float,
    dense: DenseSize,
    params: int,
    macs: int,
    layers: Sequence[LayerChange],
    table: bool,
    samples: int = 1,
    latency: Mapping[str, Any] | None = None,
) -> None:
    """``title: X% of <what> removed; params a -> b (c%), MACs per sample d -> e (f%)``, then the table on rank
    zero. MACs are counted on the example inputs, ``samples`` rows, and shown per row (they scale with the batch).
    A ``target="latency"`` step adds ``; latency g ms -> h ms (i% of the model before the step, asked j%)``."""
    per = max(samples, 1)
    timed = ""
    if latency is not None:
        noise = "" if latency["resolved"] else ", within noise"
        timed = (
            f"; latency {latency['dense_seconds'] * 1e3:.3g} ms -> {latency['pruned_seconds'] * 1e3:.3g} ms "
            f"({latency['ratio']:.1%} of the model before the step, asked {latency['goal']:.1%}; batch "
            f"{latency['batch']}, {latency['threads']} threads{noise})"
        )
    rank_zero_info(
        f"{title}: {amount:.1%} of {what} removed; params {dense.params:,} -> {params:,} "
        f"({params / dense.params:.1%}), MACs per sample {dense.macs // per:,} -> {macs // per:,} "
        f"({macs / max(dense.macs, 1):.1%}){timed}"
    )
    if table and trainer.is_global_zero and layers:
        from rich.console import Console
        from rich.table import Table

        rows = Table(title=title)
        for column in ("layer", "before", "after"):
            rows.add_column(column, justify="left" if column == "layer" else "right")
        for change in layers:
            rows.add_row(change.module, str(change.before), str(change.after))
        Console().print(rows)


def latency_summary(outcome: LatencyOutcome, batch: int) -> dict[str, Any]:
    """A ``target="latency"`` step as plain data: asked and measured ratio (pruned over the model before the
    step), both medians, whether their spreads are apart, the threads and the batch timed."""
    timing = outcome.timing
    return {
        "goal": outcome.goal,
        "ratio": outcome.measured,
        "dense_seconds": timing.dense.median,
        "pruned_seconds": timing.pruned.median,
        "resolved": timing.resolved,
        "threads": timing.threads,
        "batch": batch,
    }
