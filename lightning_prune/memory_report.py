"""``lightning-prune ... plan=true``: the memory plan of the composed run, dense and pruned, printed before training.

The settings come from the config: the data module's ``batch_size`` and ``window``, the trainer's ``strategy``,
``devices`` and ``precision``, the model's ``gradient_checkpointing``; the pruned column replays the first pruning
callback's one-shot step (at its final amount) on a copy of the model, with its calibration batches.
"""

from __future__ import annotations

import copy
from itertools import islice

import lightning.pytorch as pl
from omegaconf import DictConfig

from lightning_prune.callbacks import StructuredPruning
from lightning_prune.callbacks.calibration import _training_loss
from lightning_prune.memory import MemoryPlan, format_plans, memory_plan

FSDP_STRATEGIES = ("fsdp", "ModelParallelStrategy", "FSDPStrategy")


def planned_strategy(trainer: DictConfig) -> tuple[str, int]:
    """``("single" | "ddp" | "fsdp", devices)`` of a trainer config."""
    strategy = trainer.get("strategy", "auto")
    name = str(strategy.get("_target_", "")) if isinstance(strategy, DictConfig) else str(strategy)
    devices = trainer.get("devices", 1)
    count = devices if isinstance(devices, int) else len(devices) if hasattr(devices, "__len__") else 1
    count *= int(trainer.get("num_nodes", 1) or 1)
    if any(name.endswith(kind) or name.startswith(kind) for kind in FSDP_STRATEGIES):
        return "fsdp", count
    return ("ddp", count) if count > 1 else ("single", 1)


def plan_run(cfg: DictConfig, data: pl.LightningDataModule, model: pl.LightningModule, callbacks: list) -> str:
    """The table of the dense model's plan and, when a pruning callback is configured, the pruned model's."""
    strategy, devices = planned_strategy(cfg.trainer)
    precision = str(cfg.trainer.get("precision", "32-true"))
    settings = {
        "batch_size": int(data.batch_size), "sequence_length": int(data.window), "strategy": strategy,
        "devices": devices, "precision": precision,
        "gradient_checkpointing": bool(cfg.model.get("gradient_checkpointing", False)),
    }  # fmt: skip
    plans: dict[str, MemoryPlan] = {"dense": memory_plan(model, **settings)}
    pruning = next((callback for callback in callbacks if isinstance(callback, StructuredPruning)), None)
    if pruning is not None:
        plans["pruned"] = memory_plan(model, record=pruned_record(pruning, model, data), **settings)
    return format_plans(plans)


def pruned_record(pruning: StructuredPruning, model: pl.LightningModule, data: pl.LightningDataModule) -> dict:
    """The record of ``pruning``'s cut at its final amount, made on a copy of ``model``."""
    copied = copy.deepcopy(model)
    data.prepare_data()
    data.setup("fit")
    batches = list(islice(data.train_dataloader(), max(pruning.statistics.calibration_batches, 1)))
    example = copied.example_input_array if copied.example_input_array is not None else batches[0]
    statistics = None
    if pruning.method.needs_gradients:
        statistics = pruning.statistics.collect(copied, pruning._graph(copied), iter(batches), _training_loss)
    amount = max(pruning.steps.values())
    return pruning.method.step(copied, example, amount, None, statistics=statistics).record
