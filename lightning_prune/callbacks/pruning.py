"""Scheduled structured pruning inside a Lightning run, with fine-tuning, checkpoints and exact resume.

The callback decides *when*; what a step does is a method of :mod:`lightning_prune.methods`, gradient
statistics come from :mod:`.calibration`, multi-process agreement from :mod:`.distributed`, the log lines
from :mod:`.reporting` and the pruned architecture in checkpoints from :mod:`.checkpoint`.
"""

from __future__ import annotations

import inspect
import weakref
from collections.abc import Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.strategies.launchers.multiprocessing import _MultiProcessingLauncher
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn
from typing_extensions import override

from lightning_prune.budget import DenseSize
from lightning_prune.callbacks.calibration import StepStatistics
from lightning_prune.callbacks.checkpoint import (
    CHECKPOINT_KEY,
    PrunableModule,
    add_to_applied,
    applied_record,
    read_checkpoint,
    restore_pruned,
)
from lightning_prune.callbacks.distributed import agree_on_round_to, check_same_cut, check_strategy, rewrap_distributed
from lightning_prune.callbacks.inputs import batch_rows, first_rows, select_input
from lightning_prune.callbacks.io import AtomicCheckpointIO
from lightning_prune.callbacks.optimizers import parameter_ids, rebuild_optimizers
from lightning_prune.callbacks.reporting import latency_summary, report_step
from lightning_prune.depth import LayerPruningResult
from lightning_prune.errors import PruningError
from lightning_prune.graph.groups import build_graph
from lightning_prune.measure import count_params
from lightning_prune.methods import METHODS
from lightning_prune.running import to_device
from lightning_prune.schedules import schedule_amounts
from lightning_prune.selection import SelectionOptions

WHEN = ("train_epoch_end", "validation_end", "train_epoch_start")


class StructuredPruning(Callback):
    r"""Remove channels on a schedule during training; training then continues as fine-tuning.

    At the end of each scheduled epoch the model is traced, its coupled channels are scored, and the
    weakest are cut out of the ``LightningModule`` in place: a smaller dense model. The optimizer
    keeps going with its state sliced alike (momentum, Adam moments), the LR scheduler continues,
    ``configure_optimizers`` is not called again.

    Checkpoints hold the record of the cuts, so ``trainer.fit(model, ckpt_path=...)`` from any
    checkpoint (before, between or after pruning steps) rebuilds the pruned architecture before the
    weights load and continues the schedule without repeating or skipping a step. For inference,
    ``MyModule.load_from_checkpoint(path)`` gives the pruned module when ``MyModule`` derives from
    :class:`lightning_prune.PrunableModule`, and :func:`lightning_prune.load_from_checkpoint` does for any
    ``LightningModule``. When the trainer
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
        scope, ignore, round_to, max_fraction, normalize, aggregate, seed: as in :func:`lightning_prune.prune`
            (``round_to="auto"`` is measured at the first step, on rank zero, for the module as it trains).
        target: ``"channels"``, ``"macs"``, ``"params"`` or ``"latency"`` (seconds per eval-mode forward on the
            device the model trains on, timed on the example inputs; how: ``options={"latency": {"rounds": 3,
            "min_run_time": 0.5}}`` or a :class:`~lightning_prune.latency.LatencySettings`): what ``amount`` is a
            fraction of. Each latency step's measured ratio is kept in ``done[epoch]["latency"]``, printed in its
            summary line and logged as ``prune/latency_ratio`` (the model now over the dense model).
        when: ``"train_epoch_end"``, ``"validation_end"`` (after that epoch's validation) or
            ``"train_epoch_start"``: before the epoch trains, so that ``start_epoch=0`` prunes at the start of
            fit (one-shot pruning of a trained model, then recovery: LLM-Pruner, FLAP, Wanda-sp); statistics
            then come from ``calibration_batches``.
        batch_input: where the model's input sits in a training batch (an index or a key; ``None``: the
            whole batch). Used for tracing when ``pl_module.example_input_array`` is not set.
        structure: the pruning method (:mod:`lightning_prune.methods`): ``"channels"`` (channels, heads, neurons,
            the stream: everything :func:`lightning_prune.prune` finds), ``"layers"``: whole blocks of the
            model's block stack leave (``amount`` is then a fraction of the blocks; ``importance`` is
            ``"block_influence"``, ``"random"``, or a contiguous span: ``"angular"``, ``"deepest"``), ``"laco"``
            (blocks merged into others, then deleted), or the language-model methods ``"llm_pruner"`` (importance
            ``"taylor_*"``), ``"wanda_sp"`` and ``"flap"``. Each method takes the arguments here that apply to it.
        options: arguments of the method beyond those above, e.g. ``{"first": 1, "last": -1, "stream": False}``
            for the language-model methods or ``{"compensate": False}`` for FLAP.
        blocks: with ``structure="layers"``, the path of the block stack (found automatically if None).
        calibration_batches: for gradient criteria (``"taylor"``, ``"fisher"``): ``0`` accumulates their
            statistics from the training steps of each pruning epoch (hooks, no extra passes); ``n > 0``
            runs ``training_step`` forward and backward on ``n`` extra training batches at the step
            instead (gradients, BatchNorm statistics and RNG are restored afterwards). Under DDP the
            statistics are summed over ranks before selection, so every rank makes the same cut. Depth methods
            (``"layers"``, ``"laco"``) run the model on ``n`` training batches at the step (``"layers"`` with 0
            scores the example inputs).
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
        PruningError: bad arguments at construction; in ``setup`` ``ignore`` names matching nothing,
            ``"bn_scale"`` on a model without BatchNorm, or an unsupported strategy.

    Warns:
        UserWarning: at construction, when every amount of the schedule is 0 (nothing would be pruned); in
            ``setup``, when the trainer writes checkpoints of a module that is not a
            :class:`~lightning_prune.PrunableModule` (its own ``load_from_checkpoint`` would fail on them), and
            when steps of the schedule lie at or beyond ``max_epochs``: they run when a later
            ``fit(..., ckpt_path=...)`` with more epochs continues the run (training in chunks).

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
        round_to: int | str = 1,
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
        options: Mapping[str, Any] | None = None,
    ) -> None:
        self.steps = schedule_amounts(schedule, amount, start_epoch, end_epoch, every)
        selection = SelectionOptions(scope, round_to, max_fraction, normalize)
        if structure not in METHODS:
            raise PruningError(f"`structure` must be one of {', '.join(METHODS)}; got {structure!r}.")
        factory = METHODS[structure]
        offered = {
            "importance": importance, "target": target, "selection": selection, "ignore": ignore,
            "aggregate": aggregate, "seed": seed, "verify": verify, "blocks": blocks,
            "calibration_batches": calibration_batches,
        }  # fmt: skip
        accepted = inspect.signature(factory).parameters
        extra = dict(options or {})
        unknown = sorted(set(extra) - set(accepted) | set(extra) & set(offered))
        if unknown:
            own = [name for name in accepted if name not in offered]
            raise PruningError(
                f"`options` {unknown} are not arguments of structure={structure!r} beyond the callback's own "
                f"(set those directly); its options: {', '.join(own) or 'none'}."
            )
        zero = [epoch for epoch, value in self.steps.items() if value <= 0]
        if target == "latency" and "target" in accepted and zero:
            raise PruningError(
                f"`amount` is 0 at epochs {zero} of the schedule ({self.steps}) with `target='latency'`, which asks "
                "for no speed-up there: give the fraction of the dense model's latency to remove, in (0, 1) "
                "(`amount=0.3`: a forward then takes at most 70% of the dense time)."
            )
        self.method = factory(**{name: value for name, value in offered.items() if name in accepted}, **extra)
        collect = getattr(self.method, "collect", None) if getattr(self.method, "needs_gradients", False) else None
        self.statistics = StepStatistics(calibration_batches, self._graph, collect, importance)
        if when not in WHEN:
            raise PruningError(f"`when` must be one of {', '.join(WHEN)}; got {when!r}.")
        if when == "train_epoch_start" and self.method.needs_gradients and self.statistics.observes_training:
            raise PruningError(
                f"`when='train_epoch_start'` cuts before the epoch trains, so `importance={importance!r}` cannot "
                "observe its training steps: set `calibration_batches` (e.g. 10)."
            )
        self.importance, self.target, self.when, self.structure = importance, target, when, structure
        self.ignore = list(ignore)
        self.batch_input, self.reset_best, self.log_table = batch_input, reset_best, log_table
        self.done: dict[int, dict[str, Any]] = {}
        self.dense: DenseSize | None = None
        self._example: Any = None
        self._hook: Any = None
        if not any(self.steps.values()):
            rank_zero_warn(
                f"`amount` is 0 at every step of the schedule ({self.steps}): nothing will be pruned. Set `amount` "
                "(or the amounts of a `schedule` mapping) to a fraction in (0, 1).",
                stacklevel=5,  # the line that constructs the callback
            )

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(
            importance=self.importance, target=self.target, steps=self.steps, structure=self.structure
        )

    @property
    def options(self) -> dict[str, Any]:
        """The method's configuration, as plain data."""
        return self.method.to_dict()

    @property
    def amount_done(self) -> float:
        return max((self.steps[e] for e in self.done), default=0.0)

    # --- validation before training ----------------------------------------------------------
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        check_strategy(trainer, self.target)
        if isinstance(trainer.strategy.launcher, _MultiProcessingLauncher) and not isinstance(
            pl_module, PrunableModule
        ):
            name = type(pl_module).__name__
            raise PruningError(
                f"StructuredPruning under a spawning strategy ({type(trainer.strategy).__name__} started by "
                f"Lightning's multiprocessing launcher, e.g. 'ddp_spawn' or 'ddp_notebook'): at the end of fit "
                f"Lightning loads rank 0's weights into the main process's {name}, which is still dense, and {name} "
                f"cannot take the pruned shapes. Derive {name} from `lightning_prune.PrunableModule` (it carries its "
                "record in its state dict), or use strategy='ddp'."
            )
        limit = trainer.max_epochs
        later = [epoch for epoch in sorted(self.steps) if limit is not None and 0 <= limit <= epoch]
        if later:  # training in chunks: a later fit(..., ckpt_path=...) with more epochs runs them
            rank_zero_warn(
                f"StructuredPruning: the schedule's steps at epochs {later} are at or beyond `max_epochs`={limit} "
                "(epochs are 0-based): they run only if training continues, e.g. "
                f"`Trainer(max_epochs={later[-1] + 1}).fit(model, ckpt_path='last')`."
            )
        self.method.check(pl_module, None)
        reference = weakref.ref(trainer)
        self._hook = pl_module.register_load_state_dict_pre_hook(
            lambda module, state_dict, prefix, *_: self._restore_architecture(reference(), module, prefix)
        )
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        if trainer.checkpoint_callbacks and not isinstance(pl_module, PrunableModule):
            name = type(pl_module).__name__
            rank_zero_warn(
                f"`{name}.load_from_checkpoint(path)` will fail on this run's pruned checkpoints (a size mismatch): "
                f"{name} is not a `lightning_prune.PrunableModule`. Derive {name} from "
                f"`lightning_prune.PrunableModule` instead of `LightningModule`, or load with "
                f"`lightning_prune.load_from_checkpoint({name}, path)`."
            )

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
        restore_pruned(module, read_checkpoint(path, trainer), f"checkpoint '{path}'")

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if pl_module.example_input_array is not None and not self.done:
            self.method.check(pl_module, self._example_inputs(pl_module))

    # --- example inputs ----------------------------------------------------------------------
    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._example is None and pl_module.example_input_array is None:
            self._example = first_rows(self._select_input(batch))
        epoch = trainer.current_epoch
        due = epoch in self.steps and epoch not in self.done
        if due and self.method.needs_gradients and self.statistics.observes_training:
            self.statistics.observe(pl_module)

    def _select_input(self, batch: Any) -> Any:
        return select_input(batch, self.batch_input)

    def _example_inputs(self, pl_module: pl.LightningModule) -> Any:
        example = pl_module.example_input_array if pl_module.example_input_array is not None else self._example
        if example is None:
            raise PruningError(
                "no example inputs: set `example_input_array` on the module or train at least one batch."
            )
        return to_device(example, pl_module.device)

    def _graph(self, pl_module: pl.LightningModule) -> Any:
        left = getattr(self.method, "left", None)  # a method that leaves more whole than `ignore` (the stream ...)
        ignore = left(pl_module) if left is not None else self.ignore
        return build_graph(pl_module, self._example_inputs(pl_module), ignore=ignore)

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
        last = self.done[max(self.done)] if self.done else {}
        logged = {
            "prune/params": float(count_params(pl_module)),
            "prune/macs": float(last.get("macs", 0)),
            "prune/amount": self.amount_done,
        }
        if self.target == "latency":  # measured seconds now over the dense model's (1 before the first step)
            logged["prune/latency_ratio"] = getattr(self.dense, "latency_kept", None) or 1.0
        pl_module.log_dict(logged, on_epoch=True)

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.when == "validation_end" and not trainer.sanity_checking and trainer.training:
            self._maybe_step(trainer, pl_module)

    def _maybe_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        epoch = trainer.current_epoch
        if epoch in self.steps and epoch not in self.done:
            self._step(trainer, pl_module, epoch)

    def _step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, epoch: int) -> None:
        if self._example is None and pl_module.example_input_array is None and trainer.train_dataloader is not None:
            self._example = first_rows(self._select_input(next(iter(trainer.train_dataloader))))
        example = self._example_inputs(pl_module)
        agree_on_round_to(trainer, self.method, pl_module, example)
        statistics = self.statistics.take(trainer, pl_module, self.importance) if self.method.needs_gradients else None
        parameters = parameter_ids(pl_module)
        result = self.method.step(
            pl_module, example, self.steps[epoch], self.dense, optimizers=trainer.optimizers, statistics=statistics
        )
        if trainer.optimizers and parameter_ids(pl_module) - parameters:
            rebuild_optimizers(trainer, pl_module)
        check_same_cut(trainer, result.record)
        rewrap_distributed(trainer, pl_module)
        before = self.dense.removed if self.dense is not None else 0
        self.dense = result.dense
        add_to_applied(pl_module, result.record)
        self.done[epoch] = {
            "amount": self.steps[epoch],
            "params": result.params_after,
            "macs": result.macs_after,
            "removed": result.dense.removed - before,
        }
        if getattr(result, "latency", None) is not None:  # target="latency": timed against the model before the step
            self.done[epoch]["latency"] = latency_summary(result.latency, batch_rows(example))
        if self.when == "train_epoch_start" and self.reset_best:
            _reset_best_checkpoints(trainer)  # what they scored so far was the model before this cut
        number = sorted(self.steps).index(epoch) + 1
        what = "blocks" if isinstance(result, LayerPruningResult) else self.target
        title = f"StructuredPruning: epoch {epoch} step {number}/{len(self.steps)}"
        report_step(
            trainer, title, what, self.amount_done, self.dense, result.params_after, result.macs_after,
            result.layers, self.log_table, batch_rows(example), self.done[epoch].get("latency"),
        )  # fmt: skip

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.when == "train_epoch_start":
            self._maybe_step(trainer, pl_module)  # then every score of this epoch is the pruned model's
        # The checkpoint written at the end of a pruning epoch holds the pruned model but a score measured
        # before the cut; forgetting best scores one epoch later keeps it and every dense one from winning.
        elif self.reset_best and trainer.current_epoch - 1 in self.done:
            _reset_best_checkpoints(trainer)

    # --- checkpoints -------------------------------------------------------------------------
    @override
    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        checkpoint[CHECKPOINT_KEY] = {"record": applied_record(pl_module)}

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "done": {str(epoch): dict(summary) for epoch, summary in self.done.items()},
            "dense": self.dense.to_dict() if self.dense is not None else {},
            "statistics": self.statistics.state(),
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        done = {int(epoch): dict(summary) for epoch, summary in state_dict.get("done", {}).items()}
        for summary in done.values():  # 0.1 counted channels_removed or blocks_removed
            for legacy in ("channels_removed", "blocks_removed"):
                if legacy in summary:
                    summary["removed"] = summary.pop(legacy)
        self.done = done
        dense = state_dict.get("dense") or {}
        removed = sum(summary.get("removed", 0) for summary in done.values())
        self.dense = DenseSize.from_dict(dense, removed) if dense else None
        self.statistics.load(state_dict.get("statistics"))


def _reset_best_checkpoints(trainer: pl.Trainer) -> None:
    for callback in trainer.checkpoint_callbacks:
        if isinstance(callback, ModelCheckpoint) and callback.monitor is not None:
            callback.best_k_models = {}
            callback.best_model_score = None
            callback.best_model_path = ""
            callback.kth_best_model_path = ""
            callback.kth_value = torch.tensor(torch.inf if callback.mode == "min" else -torch.inf)
