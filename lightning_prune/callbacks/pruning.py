"""Scheduled structured pruning inside a Lightning run, with fine-tuning, checkpoints and exact resume."""

from __future__ import annotations

import gc
import hashlib
import json
import warnings
import weakref
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn
from typing_extensions import override

from lightning_prune.api import TARGETS, LayerChange, prune
from lightning_prune.callbacks.checkpoint import (
    CHECKPOINT_KEY,
    add_to_applied,
    applied_record,
    catch_up,
    read_checkpoint,
)
from lightning_prune.callbacks.io import AtomicCheckpointIO
from lightning_prune.depth import find_blocks, prune_layers
from lightning_prune.errors import PruningError
from lightning_prune.graph.groups import build_graph, match_modules
from lightning_prune.importance import get_criterion, needs_gradients
from lightning_prune.measure import count_macs, count_params, to_device
from lightning_prune.schedules import schedule_amounts
from lightning_prune.selection import check_selection_arguments
from lightning_prune.statistics import GradientStatistics, Statistics, collect_statistics, reduce_statistics

WHEN = ("train_epoch_end", "validation_end")
STRUCTURES = ("channels", "layers")
LAYER_IMPORTANCE = ("block_influence", "random")
UNSUPPORTED_STRATEGIES = ("FSDPStrategy", "DeepSpeedStrategy", "ModelParallelStrategy")
EXAMPLE_BATCH = 8


def _first_rows(value: Any, rows: int) -> Any:
    if isinstance(value, Tensor):
        return value[:rows].detach().clone() if value.ndim else value.detach().clone()
    if isinstance(value, Mapping):
        return {k: _first_rows(v, rows) for k, v in value.items()}
    if isinstance(value, tuple | list):
        return type(value)(_first_rows(v, rows) for v in value)
    return value


class StructuredPruning(Callback):
    r"""Remove channels on a schedule during training; training then continues as fine-tuning.

    At the end of each scheduled epoch the model is traced, its coupled channels are scored, and the
    weakest are cut out of the ``LightningModule`` in place: a smaller dense model. The optimizer
    keeps going with its state sliced alike (momentum, Adam moments), the LR scheduler continues,
    ``configure_optimizers`` is not called again.

    Checkpoints hold the record of the cuts, so ``trainer.fit(model, ckpt_path=...)`` from any
    checkpoint (before, between or after pruning steps) rebuilds the pruned architecture before the
    weights load and continues the schedule without repeating or skipping a step, and
    :func:`lightning_prune.load_from_checkpoint` gives the pruned module for inference. When the trainer
    writes checkpoints with Lightning's default ``TorchCheckpointIO``, it is replaced at setup by
    :class:`~lightning_prune.callbacks.AtomicCheckpointIO` (same files, written atomically), so that a job
    killed at any moment, even while saving, resumes from a complete checkpoint.

    Args:
        amount: cumulative fraction removed by the end of the schedule, relative to the dense model (not
            compounding): of prunable channels, or of MACs/parameters with ``target``.
        importance: a criterion name: ``"l1"``, ``"l2"``, ``"bn_scale"``, ``"fpgm"``, ``"random"``, or the
            gradient criteria ``"taylor"`` and ``"fisher"`` (see ``calibration_batches``).
        schedule: ``"oneshot"`` (at the end of ``start_epoch``), ``"linear"``, ``"cubic"`` (Zhu & Gupta
            2017) from ``start_epoch`` to ``end_epoch`` every ``every`` epochs, or a mapping
            ``{epoch: cumulative_amount}``. Epochs are Lightning's 0-based ``current_epoch``.
        start_epoch, end_epoch, every: see ``schedule``.
        scope, ignore, round_to, max_fraction, normalize, aggregate, seed: as in :func:`lightning_prune.prune`.
        target: ``"channels"``, ``"macs"`` or ``"params"``: what ``amount`` is a fraction of.
        when: ``"train_epoch_end"`` or ``"validation_end"`` (after that epoch's validation).
        batch_input: where the model's input sits in a training batch (an index or a key; ``None``: the
            whole batch). Used for tracing when ``pl_module.example_input_array`` is not set.
        structure: ``"channels"`` (channels, heads, neurons, the stream: everything :func:`lightning_prune.prune`
            finds) or ``"layers"``: whole blocks of the model's block stack leave (``amount`` is then a
            fraction of the blocks; ``importance`` is ``"block_influence"`` or ``"random"``).
        blocks: with ``structure="layers"``, the path of the block stack (found automatically if None).
        calibration_batches: for gradient criteria (``"taylor"``, ``"fisher"``): ``0`` accumulates their
            statistics from the training steps of each pruning epoch (hooks, no extra passes); ``n > 0``
            runs ``training_step`` forward and backward on ``n`` extra training batches at the step
            instead (gradients, BatchNorm statistics and RNG are restored afterwards). Under DDP the
            statistics are summed over ranks before selection, so every rank makes the same cut.
        verify: re-trace each pruned model and roll back anything that deviates from the plan.
        reset_best: make every ``ModelCheckpoint`` that monitors a metric forget its best scores at the
            start of the epoch after each step, so that "best" means the best model *of the current
            (pruned) architecture*, scored after the cut, and never the dense one from before pruning
            (nor the checkpoint of the pruning epoch, whose score was measured before the cut).
            Earlier files stay on disk.
        log_table: print a per-layer table (rank zero) after each step.

    Example inputs for tracing come from ``pl_module.example_input_array`` if set, otherwise from the
    first training batch of the run (its first 8 rows).

    Raises:
        PruningError: bad arguments at construction; in ``setup`` a schedule epoch at or beyond
            ``max_epochs``, ``ignore`` names matching nothing, ``"bn_scale"`` on a model without
            BatchNorm, or an unsupported strategy.

    Example::

        pruning = StructuredPruning(amount=0.5, importance="l1", schedule="linear", start_epoch=5, end_epoch=8)
        Trainer(max_epochs=20, callbacks=[pruning]).fit(model, datamodule)
    """

    def __init__(
        self,
        amount: float = 0.5,
        importance: str = "l1",
        schedule: str | Mapping[int, float] = "oneshot",
        start_epoch: int = 0,
        end_epoch: int | None = None,
        every: int = 1,
        scope: str = "global",
        ignore: Sequence[str] = (),
        round_to: int = 1,
        target: str = "channels",
        max_fraction: float = 0.9,
        normalize: str = "mean",
        aggregate: str = "sum",
        seed: int = 0,
        when: str = "train_epoch_end",
        batch_input: int | str | None = 0,
        calibration_batches: int = 0,
        structure: str = "channels",
        blocks: str | None = None,
        verify: bool = True,
        reset_best: bool = True,
        log_table: bool = True,
    ) -> None:
        self.steps = schedule_amounts(schedule, amount, start_epoch, end_epoch, every)
        final = max(self.steps.values())
        check_selection_arguments(final, scope, round_to, max_fraction, normalize)
        if structure not in STRUCTURES:
            raise PruningError(f"`structure` must be one of {', '.join(STRUCTURES)}; got {structure!r}.")
        if structure == "layers" and importance not in LAYER_IMPORTANCE:
            raise PruningError(
                f"`importance` for structure='layers' must be one of {', '.join(LAYER_IMPORTANCE)}; got {importance!r}."
            )
        self._gradients = structure == "channels" and needs_gradients(
            get_criterion(importance, aggregate=aggregate, seed=seed)
        )
        if isinstance(calibration_batches, bool) or not isinstance(calibration_batches, int) or calibration_batches < 0:
            raise PruningError(f"`calibration_batches` must be a non-negative integer, got {calibration_batches!r}.")
        if target not in TARGETS:
            raise PruningError(f"`target` must be one of {', '.join(TARGETS)}; got {target!r}.")
        if when not in WHEN:
            raise PruningError(f"`when` must be one of {', '.join(WHEN)}; got {when!r}.")
        if isinstance(ignore, str):
            raise PruningError(f"`ignore` is a list of module names or glob patterns; got the string {ignore!r}.")
        self.importance, self.target, self.when = importance, target, when
        self.options = {
            "scope": scope,
            "ignore": list(ignore),
            "round_to": round_to,
            "max_fraction": max_fraction,
            "normalize": normalize,
            "aggregate": aggregate,
            "seed": seed,
            "verify": verify,
        }
        self.batch_input, self.reset_best, self.log_table = batch_input, reset_best, log_table
        self.calibration_batches = calibration_batches
        self.structure, self.blocks = structure, blocks
        self.done: dict[int, dict[str, Any]] = {}
        self.dense: dict[str, int] = {}
        self.removed_channels = 0
        self._example: Any = None
        self._hook: Any = None
        self._collector: GradientStatistics | None = None
        self._statistics: Statistics | None = None

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(
            importance=self.importance, target=self.target, steps=self.steps, structure=self.structure
        )

    @property
    def amount_done(self) -> float:
        return max((self.steps[e] for e in self.done), default=0.0)

    # --- validation before training ----------------------------------------------------------
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        strategy = type(trainer.strategy).__name__
        if strategy in UNSUPPORTED_STRATEGIES:
            raise PruningError(
                f"StructuredPruning does not support `strategy` {strategy}: the cut needs every parameter "
                "whole on every rank. Use strategy='ddp' (or 'ddp_spawn'), or prune before sharding."
            )
        last = max(self.steps)
        if trainer.max_epochs is not None and trainer.max_epochs >= 0 and last >= trainer.max_epochs:
            raise PruningError(
                f"the pruning schedule has a step at epoch {last} but `max_epochs` is {trainer.max_epochs} "
                f"(epochs are 0-based): no step would run at or after epoch {trainer.max_epochs}. Lower "
                "`end_epoch`/`start_epoch`/the schedule epochs or raise `max_epochs`."
            )
        match_modules(pl_module, self.options["ignore"])
        if self.importance == "bn_scale" and not any(
            isinstance(m, nn.modules.batchnorm._BatchNorm) for m in pl_module.modules()
        ):
            raise PruningError(
                f"`importance='bn_scale'` scores channels by BatchNorm scales, but {type(pl_module).__name__} has "
                "no BatchNorm layer. Choose another criterion, e.g. 'l1'."
            )
        reference = weakref.ref(trainer)
        self._hook = pl_module.register_load_state_dict_pre_hook(
            lambda module, state_dict, prefix, *_: self._restore_architecture(reference(), module, prefix)
        )
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def _restore_architecture(self, trainer: pl.Trainer | None, module: nn.Module, prefix: str) -> None:
        """Before a checkpoint's weights load into the module, cut it to the checkpoint's architecture."""
        if prefix or trainer is None or not trainer.ckpt_path:
            return
        path = trainer.ckpt_path
        catch_up(module, read_checkpoint(path, trainer), f"checkpoint '{path}'")

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.structure == "channels" and pl_module.example_input_array is not None and not self.done:
            graph = build_graph(pl_module, self._example_inputs(pl_module), ignore=self.options["ignore"])
            if not graph.groups:
                reasons = "; ".join(f"{k}: {v}" for k, v in list(graph.unprunable.items())[:5])
                raise PruningError(
                    f"StructuredPruning found nothing prunable in {type(pl_module).__name__} ({reasons})."
                )

    # --- example inputs ----------------------------------------------------------------------
    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._example is None and pl_module.example_input_array is None:
            self._example = _first_rows(self._select_input(batch), EXAMPLE_BATCH)
        epoch = trainer.current_epoch
        observing = self._gradients and not self.calibration_batches and epoch in self.steps and epoch not in self.done
        if observing and self._collector is None:
            graph = build_graph(pl_module, self._example_inputs(pl_module), ignore=self.options["ignore"])
            self._collector = GradientStatistics(pl_module, graph)
            if self._statistics is not None:
                self._collector.load(self._statistics)
            self._collector.attach()

    def _select_input(self, batch: Any) -> Any:
        if self.batch_input is None:
            return batch
        try:
            return batch[self.batch_input]
        except (KeyError, IndexError, TypeError) as error:
            kind = list(batch) if isinstance(batch, Mapping) else type(batch).__name__
            raise PruningError(
                f"`batch_input`={self.batch_input!r} does not select the model input from a training batch ({kind}). "
                "Set `batch_input` to the index or key of the input, or set `example_input_array` on the module."
            ) from error

    def _example_inputs(self, pl_module: pl.LightningModule) -> Any:
        example = pl_module.example_input_array if pl_module.example_input_array is not None else self._example
        if example is None:
            raise PruningError(
                "no example inputs: set `example_input_array` on the module or train at least one batch."
            )
        return to_device(example, pl_module.device)

    # --- the schedule ------------------------------------------------------------------------
    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for epoch in sorted(self.steps):  # a resumed run may start after a step it never made
            if epoch < trainer.current_epoch and epoch not in self.done:
                self._step(trainer, pl_module, epoch)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.when == "train_epoch_end":
            self._maybe_step(trainer, pl_module)
        pl_module.log_dict(
            {
                "prune/params": float(count_params(pl_module)),
                "prune/macs": float(self.done[max(self.done)]["macs"] if self.done else self.dense.get("macs", 0)),
                "prune/amount": self.amount_done,
            },
            on_epoch=True,
        )

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.when == "validation_end" and not trainer.sanity_checking and trainer.training:
            self._maybe_step(trainer, pl_module)

    def _maybe_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        epoch = trainer.current_epoch
        if epoch in self.steps and epoch not in self.done:
            self._step(trainer, pl_module, epoch)

    def _engine_amount(self, cumulative: float, pl_module: pl.LightningModule, example: Any) -> float:
        """The fraction of the *current* model that brings the total to ``cumulative`` of the dense one."""
        if self.target == "channels":
            if not self.dense:
                return cumulative
            total = self.dense["channels"]
            return max(0.0, (cumulative * total - self.removed_channels) / max(total - self.removed_channels, 1))
        current = count_params(pl_module) if self.target == "params" else count_macs(pl_module, example)
        dense = self.dense.get(self.target, current)
        return max(0.0, 1.0 - (1.0 - cumulative) * dense / current)

    def _gradient_statistics(self, trainer: pl.Trainer, pl_module: pl.LightningModule, example: Any) -> Statistics:
        if self.calibration_batches:
            graph = build_graph(pl_module, example, ignore=self.options["ignore"])
            batches = (move_data_to_device(b, pl_module.device) for b in _take(trainer, self.calibration_batches))
            statistics = collect_statistics(pl_module, graph, batches, _training_loss)
        elif self._collector is not None:
            statistics = self._collector.detach()
        elif self._statistics is not None:
            statistics = self._statistics
        else:
            raise PruningError(
                f"`importance={self.importance!r}` has no statistics for this step (no training batch was seen "
                "in the pruning epoch); set `calibration_batches` to compute them at the step."
            )
        self._collector, self._statistics = None, None

        def reduce(tensor: Tensor) -> Tensor:
            return trainer.strategy.reduce(tensor.to(pl_module.device), reduce_op="sum").cpu()

        return reduce_statistics(statistics, reduce) if trainer.world_size > 1 else statistics

    def _step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, epoch: int) -> None:
        if self.structure == "layers":
            self._drop_layers(trainer, pl_module, epoch)
            return
        example = self._example_inputs(pl_module)
        cumulative = self.steps[epoch]
        amount = min(self._engine_amount(cumulative, pl_module, example), 0.999)
        statistics = self._gradient_statistics(trainer, pl_module, example) if self._gradients else None
        result = prune(
            pl_module,
            example,
            amount,
            self.importance,
            target=self.target,
            optimizers=trainer.optimizers,
            statistics=statistics,
            **self.options,
        )
        _check_same_cut(trainer, result.record)
        _rewrap_distributed(trainer, pl_module)
        if not self.dense:
            self.dense = {
                "channels": result.channels_before,
                "params": result.params_before,
                "macs": result.macs_before,
            }
        self.removed_channels += result.channels_removed
        add_to_applied(pl_module, result.record)
        self.done[epoch] = {
            "amount": cumulative,
            "params": result.params_after,
            "macs": result.macs_after,
            "channels_removed": result.channels_removed,
        }
        self._report(trainer, epoch, result.params_after, result.macs_after, result.layers)

    def _drop_layers(self, trainer: pl.Trainer, pl_module: pl.LightningModule, epoch: int) -> None:
        example = self._example_inputs(pl_module)
        blocks = self.blocks or find_blocks(pl_module)
        if not self.dense:
            self.dense = {
                "blocks": len(pl_module.get_submodule(blocks)),
                "params": count_params(pl_module),
                "macs": count_macs(pl_module, example),
            }
        gone = sum(summary["blocks_removed"] for summary in self.done.values())
        count = max(0, round(self.steps[epoch] * self.dense["blocks"]) - gone)
        result = prune_layers(
            pl_module, example, count=count, blocks=blocks, importance=self.importance,
            optimizers=trainer.optimizers, seed=self.options["seed"],
        )  # fmt: skip
        _check_same_cut(trainer, result.record)
        _rewrap_distributed(trainer, pl_module)
        add_to_applied(pl_module, result.record)
        self.done[epoch] = {
            "amount": self.steps[epoch],
            "params": result.params_after,
            "macs": result.macs_after,
            "blocks_removed": len(result.removed),
        }
        self._report(trainer, epoch, result.params_after, result.macs_after, [])

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # The checkpoint written at the end of a pruning epoch holds the pruned model but a score measured
        # before the cut; forgetting best scores one epoch later keeps it and every dense one from winning.
        if self.reset_best and trainer.current_epoch - 1 in self.done:
            self._reset_best_checkpoints(trainer)

    def _reset_best_checkpoints(self, trainer: pl.Trainer) -> None:
        for callback in trainer.checkpoint_callbacks:
            if isinstance(callback, ModelCheckpoint) and callback.monitor is not None:
                callback.best_k_models = {}
                callback.best_model_score = None
                callback.best_model_path = ""
                callback.kth_best_model_path = ""
                callback.kth_value = torch.tensor(torch.inf if callback.mode == "min" else -torch.inf)

    def _report(self, trainer: pl.Trainer, epoch: int, params: int, macs: int, layers: list[LayerChange]) -> None:
        number = sorted(self.steps).index(epoch) + 1
        what = "blocks" if self.structure == "layers" else self.target
        rank_zero_info(
            f"StructuredPruning: epoch {epoch} step {number}/{len(self.steps)}: {self.amount_done:.1%} of "
            f"{what} removed; params {self.dense['params']:,} -> {params:,} "
            f"({params / self.dense['params']:.1%}), MACs {self.dense['macs']:,} -> "
            f"{macs:,} ({macs / max(self.dense['macs'], 1):.1%})"
        )
        if self.log_table and trainer.is_global_zero and layers:
            from rich.console import Console
            from rich.table import Table

            table = Table(title=f"StructuredPruning step {number} (epoch {epoch})")
            for column in ("layer", "before", "after"):
                table.add_column(column, justify="left" if column == "layer" else "right")
            for change in layers:
                table.add_row(change.module, str(change.before), str(change.after))
            Console().print(table)

    # --- checkpoints -------------------------------------------------------------------------
    @override
    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        checkpoint[CHECKPOINT_KEY] = {"record": applied_record(pl_module)}

    @override
    def state_dict(self) -> dict[str, Any]:
        statistics = self._collector.state() if self._collector is not None else self._statistics
        return {
            "done": {str(epoch): dict(summary) for epoch, summary in self.done.items()},
            "dense": dict(self.dense),
            "removed_channels": self.removed_channels,
            "statistics": statistics,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.done = {int(epoch): dict(summary) for epoch, summary in state_dict.get("done", {}).items()}
        self.dense = dict(state_dict.get("dense", {}))
        self.removed_channels = int(state_dict.get("removed_channels", 0))
        self._statistics = state_dict.get("statistics")


def _take(trainer: pl.Trainer, count: int) -> Iterator[Any]:
    loader = trainer.train_dataloader
    if loader is None:
        raise PruningError("`calibration_batches` needs the trainer's training dataloader.")
    for index, batch in enumerate(loader):
        if index >= count:
            return
        yield batch


def _training_loss(pl_module: nn.Module, batch: Any) -> Tensor:
    """The module's own training loss, with its logging detached (these passes are not training steps)."""
    trainer, pl_module._trainer = pl_module._trainer, None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            output = pl_module.training_step(batch, 0)
    finally:
        pl_module._trainer = trainer
    return output["loss"] if isinstance(output, Mapping) else output


def _check_same_cut(trainer: pl.Trainer, record: Mapping[str, Any]) -> None:
    """Under several processes, fail loudly unless every rank cut exactly the same channels."""
    if trainer.world_size == 1:
        return
    digest = hashlib.sha256(json.dumps(record, sort_keys=True).encode()).digest()[:7]
    local = torch.tensor([int.from_bytes(digest, "big")], dtype=torch.long, device=trainer.strategy.root_device)
    gathered = trainer.strategy.all_gather(local).reshape(-1)
    if not bool((gathered == gathered[0]).all()):
        raise PruningError(
            f"ranks made different cuts (record digests {gathered.tolist()}): their scores differ. With gradient "
            "criteria statistics are all-reduced; check that every rank holds the same weights."
        )


def _rewrap_distributed(trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
    """Wrap the pruned module in a new DistributedDataParallel.

    The old wrapper's buckets have the old shapes, and its reducer keeps the parameters' gradient
    accumulators alive, which remember the old shapes too: it must be gone before the next backward.
    """
    from torch.nn.parallel import DistributedDataParallel

    strategy = trainer.strategy
    old = getattr(strategy, "model", None)
    if not isinstance(old, DistributedDataParallel):
        return
    old._remove_autograd_hooks()
    del old.reducer
    strategy.model = pl_module
    del old
    gc.collect()
    strategy.configure_ddp()
