"""Pruned architectures in Lightning checkpoints.

A pruned ``LightningModule`` carries the record of what was cut from it (``applied_record``); every
checkpoint stores it under ``checkpoint["lightning_prune"]["record"]`` as plain data. Before weights
load into a module (resume, inference), the record is replayed on the freshly built dense module so
that the shapes match (:func:`restore_pruned`): in Lightning's own ``MyModule.load_from_checkpoint`` for a
:class:`PrunableModule`, in :func:`load_from_checkpoint` for any module. Checkpoints are read with
``weights_only=True``: nothing in them runs code.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import lightning.pytorch as pl
import torch
from torch import nn
from typing_extensions import override

from lightning_prune.errors import RecordError
from lightning_prune.record import add_recorded_biases, check_record, merge_records, new_record, parse_record
from lightning_prune.surgery import apply_step

CHECKPOINT_KEY = "lightning_prune"
_ATTRIBUTE = "_lightning_prune_record"

Module = TypeVar("Module", bound=pl.LightningModule)


def applied_record(module: nn.Module) -> dict[str, Any]:
    """The record of everything cut from ``module`` since it was built (empty if nothing)."""
    return getattr(module, _ATTRIBUTE, None) or new_record()


def add_to_applied(module: nn.Module, record: Mapping[str, Any]) -> None:
    setattr(module, _ATTRIBUTE, merge_records(applied_record(module), record))


def record_in(checkpoint: Mapping[str, Any], where: str) -> dict[str, Any]:
    entry = checkpoint.get(CHECKPOINT_KEY)
    if entry is None:
        return new_record()
    if not isinstance(entry, Mapping) or "record" not in entry:
        raise RecordError(f"{where}: `{CHECKPOINT_KEY}` entry must be a dict with a `record`.")
    parse_record(entry["record"], where)
    return dict(entry["record"])


def restore_pruned(module: nn.Module, checkpoint: Mapping[str, Any], where: str = "checkpoint") -> None:
    """Cut ``module`` to the architecture recorded in ``checkpoint`` (a loaded checkpoint dict) before weights load.

    The module is one freshly built from the checkpoint's hyper-parameters, or one already part of the way
    there: only the steps it lacks are applied, so calling this twice cuts once. A checkpoint without a record
    (written without pruning) leaves the module as it is. :class:`PrunableModule` calls it in
    ``on_load_checkpoint``; call it yourself to load a checkpoint by hand, as below.

    Raises:
        RecordError: naming ``where``, if the module was pruned differently or the record does not fit;
            the module is unchanged.

    Example::

        checkpoint = torch.load("last.ckpt", weights_only=True)
        model = MyModule(**checkpoint["hyper_parameters"])
        restore_pruned(model, checkpoint)
        model.load_state_dict(checkpoint["state_dict"])
    """
    target = record_in(checkpoint, where)
    wanted, done = parse_record(target, where), parse_record(applied_record(module))
    if wanted[: len(done)] != done:
        raise RecordError(
            f"{where}: the model was already pruned differently ({len(done)} steps) from this checkpoint's record "
            f"({len(wanted)} steps). Load the checkpoint into a freshly built model."
        )
    remaining = new_record(wanted[len(done) :])
    add_recorded_biases(module, remaining, where)
    for step in check_record(module, remaining, where):
        apply_step(module, step)
    setattr(module, _ATTRIBUTE, target)


def read_checkpoint(path: str | Path, trainer: pl.Trainer | None = None) -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True`` (memory-mapped when it is a local file)."""
    where = f"checkpoint '{path}'"
    try:
        if Path(path).is_file():
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        if trainer is not None:
            return trainer.strategy.checkpoint_io.load_checkpoint(path, map_location="cpu", weights_only=True)
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as error:
        raise RecordError(f"{where} does not exist.") from error
    except Exception as error:
        raise unreadable(path, error) from error


def unreadable(path: str | Path, error: Exception) -> RecordError:
    """The error for a checkpoint file that exists but cannot be loaded."""
    return RecordError(
        f"checkpoint '{path}' could not be read as a checkpoint ({type(error).__name__}: {str(error)[:200]}). "
        "It may be truncated or corrupt, or contain pickled objects that weights_only=True refuses."
    )


def load_from_checkpoint(
    module_class: type[Module], checkpoint_path: str | Path, map_location: Any = "cpu", **kwargs: Any
) -> Module:
    """Build ``module_class`` (a ``LightningModule`` class) from a checkpoint written by a run with pruning,
    in its pruned shape.

    The module is built from the checkpoint's hyper-parameters (``kwargs`` override them, as in
    ``LightningModule.load_from_checkpoint``), cut to the recorded architecture, then the weights
    load. Everything is read with ``weights_only=True``. Any ``LightningModule`` works; a
    :class:`PrunableModule` also loads with its own ``module_class.load_from_checkpoint(checkpoint_path)``.

    Example::

        from lightning_prune.models import ImageClassifier

        model = lightning_prune.load_from_checkpoint(ImageClassifier, "last.ckpt").eval()
    """
    where = f"checkpoint '{checkpoint_path}'"
    record = record_in(read_checkpoint(checkpoint_path), where)

    class Restoring(module_class):  # type: ignore[valid-type,misc]
        def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
            restore_pruned(self, {CHECKPOINT_KEY: {"record": record}}, where)
            super().on_load_checkpoint(checkpoint)

    Restoring.__name__ = Restoring.__qualname__ = module_class.__name__
    model = Restoring.load_from_checkpoint(checkpoint_path, map_location=map_location, weights_only=True, **kwargs)
    model.__class__ = module_class
    return model


class PrunableModule(pl.LightningModule):
    """A ``LightningModule`` whose own ``load_from_checkpoint`` loads checkpoints of pruned runs.

    Lightning builds the module from the checkpoint's hyper-parameters, dense, then calls
    ``on_load_checkpoint`` before it loads the weights; this class cuts the module there to the architecture
    recorded in the checkpoint (:func:`restore_pruned`), so that the pruned weights fit. Derive from it instead
    of ``LightningModule``; a subclass that overrides ``on_load_checkpoint`` calls ``super().on_load_checkpoint``.
    Resuming with ``trainer.fit(model, ckpt_path=...)`` cuts once, as without it.

    Example::

        class MyModule(lightning_prune.PrunableModule):
            ...

        model = MyModule.load_from_checkpoint("last.ckpt").eval()
    """

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        trainer = self._trainer  # attached when resuming fit(ckpt_path=...); not in load_from_checkpoint
        path = getattr(trainer, "ckpt_path", None) if trainer is not None else None
        restore_pruned(self, checkpoint, f"checkpoint '{path}'" if path else "checkpoint")
        super().on_load_checkpoint(checkpoint)
