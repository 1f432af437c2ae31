"""Prune, then shard: a one-shot cut made in ``setup``, before any strategy wraps or shards the model.

Under FSDP no rank holds a whole tensor once training runs, so a scheduled step cannot score or slice
(:func:`~lightning_prune.callbacks.distributed.check_strategy` refuses it). Before the strategy's setup every
rank still holds the whole model: :class:`PruneBeforeSharding` cuts it there, on every rank identically (same
weights, same calibration batches, checked), and the strategy then shards the smaller model.
"""

from __future__ import annotations

import hashlib
from itertools import islice
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from typing_extensions import override

from lightning_prune.callbacks.calibration import _training_loss
from lightning_prune.callbacks.checkpoint import (
    add_to_applied,
    read_checkpoint,
    restore_pruned,
)
from lightning_prune.callbacks.distributed import agree_on_round_to, check_same_cut
from lightning_prune.callbacks.inputs import batch_rows, first_rows
from lightning_prune.callbacks.pruning import StructuredPruning
from lightning_prune.callbacks.reporting import report_step
from lightning_prune.depth import LayerPruningResult
from lightning_prune.errors import PruningError

# StructuredPruning's arguments for one step at the start of fit: a config written for it may keep them
ONE_SHOT = {"schedule": "oneshot", "start_epoch": 0, "end_epoch": None, "every": 1, "when": "train_epoch_start"}
METADATA_FILE = "meta.pt"  # what Lightning's ModelParallelStrategy writes beside a sharded checkpoint's shards


class PruneBeforeSharding(StructuredPruning):
    """One-shot pruning at the start of ``fit``, before the strategy shards the model (FSDP, FSDP2, DDP, one device).

    In the callback's ``setup`` (before ``configure_model`` and before the strategy wraps anything) every rank
    checks that it holds the same weights as the others, runs the method on the same calibration batches (the
    first ``calibration_batches`` of the data module's own training loader, identical on every rank), and checks
    that all made the same cut; then the strategy shards the pruned model and training is the recovery. Resuming:
    Lightning tells the callbacks a ``fit(..., ckpt_path=...)`` path only after ``setup``, so such a run cuts the
    same weights again and the checkpoint's record is checked when it loads (``RecordError`` if the cuts differ);
    set ``trainer.ckpt_path = path`` before ``fit`` instead (a file or a sharded folder) and the checkpoint's
    record is replayed without a cut of its own, whatever weights the module was built with.

    Args:
        amount, importance, structure, calibration_batches, options, target: as in :class:`StructuredPruning`;
            the schedule is one step before epoch 0.
        kwargs: the other arguments of :class:`StructuredPruning` (``scope``, ``ignore``, ``round_to``, ...);
            the schedule's and ``when`` only at their one-shot values (:data:`ONE_SHOT`), so that a config written
            for ``StructuredPruning(when="train_epoch_start")`` takes this class as its ``_target_``.

    Raises:
        PruningError: at construction, bad arguments (as :class:`StructuredPruning`); in ``setup``, ranks holding
            different weights or making different cuts, or a gradient method without a data module.

    Example::

        pruning = PruneBeforeSharding(amount=0.3, structure="llm_pruner", importance="taylor_first",
                                      calibration_batches=10)
        strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)  # FSDP2
        Trainer(strategy=strategy, devices=2, callbacks=[pruning]).fit(CausalLM(...), datamodule)
    """

    def __init__(
        self,
        amount: float = 0.2,
        importance: str = "l1",
        structure: str = "channels",
        calibration_batches: int = 0,
        options: dict[str, Any] | None = None,
        target: str = "channels",
        **kwargs: Any,
    ) -> None:
        fixed = [name for name, value in ONE_SHOT.items() if name in kwargs and kwargs.pop(name) != value]
        if fixed:
            raise PruningError(
                f"PruneBeforeSharding cuts once before training: {fixed} cannot be set (only to the one-shot "
                f"values {ONE_SHOT}). For a schedule use StructuredPruning (under DDP or one device)."
            )
        super().__init__(
            amount=amount, importance=importance, structure=structure, calibration_batches=calibration_batches,
            options=options, target=target, schedule="oneshot", start_epoch=0, when="train_epoch_start", **kwargs,
        )  # fmt: skip

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self.method.check(pl_module, None)
        if trainer.ckpt_path:
            path = Path(trainer.ckpt_path)
            checkpoint = read_checkpoint(path / METADATA_FILE if path.is_dir() else path, trainer)
            restore_pruned(pl_module, checkpoint, f"checkpoint '{path}'")
        elif not self.done:
            for callback in trainer.callbacks:  # Distillation keeps the dense model as its teacher now
                getattr(callback, "before_first_cut", lambda *_: None)(trainer, pl_module)
            self._cut(trainer, pl_module)

    def _cut(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        check_same_weights(trainer, pl_module)
        batches = self._calibration_batches(trainer, pl_module)
        if pl_module.example_input_array is None:
            self._example = first_rows(self._select_input(batches[0]))
        example = self._example_inputs(pl_module)
        agree_on_round_to(trainer, self.method, pl_module, example)
        statistics = None
        if self.method.needs_gradients:
            statistics = self.statistics.collect(pl_module, self._graph(pl_module), iter(batches), _training_loss)
        result = self.method.step(pl_module, example, self.steps[0], None, statistics=statistics)
        check_same_cut(trainer, result.record)
        add_to_applied(pl_module, result.record)
        self.dense = result.dense
        self.done[0] = {"amount": self.steps[0], "params": result.params_after, "macs": result.macs_after,
                        "removed": result.dense.removed}  # fmt: skip
        what = "blocks" if isinstance(result, LayerPruningResult) else self.target
        report_step(
            trainer, "PruneBeforeSharding", what, self.amount_done, self.dense, result.params_after,
            result.macs_after, result.layers, self.log_table, batch_rows(example),
        )  # fmt: skip

    def _calibration_batches(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> list[Any]:
        """The first batches of the data module's own loader: no distributed sampler yet, so every rank's are the
        same (one when only example inputs are needed)."""
        count = self.statistics.calibration_batches if self.method.needs_gradients else 1
        if pl_module.example_input_array is not None and not self.method.needs_gradients:
            return []
        data = trainer.datamodule
        if data is None:
            raise PruningError(
                "PruneBeforeSharding cuts before training starts and takes its batches from the data module: pass "
                "`datamodule=` to fit (or set `example_input_array` on the module for a method without gradients)."
            )
        return [move_data_to_device(batch, pl_module.device) for batch in islice(data.train_dataloader(), count)]

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        pass  # the model may be sharded by now: it was checked and cut in setup


def check_same_weights(trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
    """Fail unless every rank holds the same parameters: sharding keeps each rank's own slice, it does not
    broadcast rank 0's weights as DDP does."""
    if trainer.world_size == 1:
        return
    digest = hashlib.sha256()
    for name, parameter in pl_module.named_parameters():
        digest.update(name.encode())
        digest.update(parameter.detach().float().cpu().numpy().tobytes())
    local = torch.tensor([int.from_bytes(digest.digest()[:7], "big")], device=trainer.strategy.root_device)
    gathered = trainer.strategy.all_gather(local).reshape(-1)
    if not bool((gathered == gathered[0]).all()):
        raise PruningError(
            f"ranks hold different weights before PruneBeforeSharding (digests {gathered.tolist()}): a sharding "
            "strategy keeps each rank's own slice. Seed every rank alike (`seed_everything`) or load the same "
            "`pretrained` folder on every rank."
        )
