"""What a pruning step tells the user: one summary line (stable, for logs and tests) and a per-layer table."""

from __future__ import annotations

from collections.abc import Sequence

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info

from lightning_prune.api import LayerChange
from lightning_prune.budget import DenseSize


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
) -> None:
    """``title: X% of <what> removed; params a -> b (c%), MACs per sample d -> e (f%)``, then the table on rank
    zero. MACs are counted on the example inputs, ``samples`` rows, and shown per row (they scale with the batch)."""
    per = max(samples, 1)
    rank_zero_info(
        f"{title}: {amount:.1%} of {what} removed; params {dense.params:,} -> {params:,} "
        f"({params / dense.params:.1%}), MACs per sample {dense.macs // per:,} -> {macs // per:,} "
        f"({macs / max(dense.macs, 1):.1%})"
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
