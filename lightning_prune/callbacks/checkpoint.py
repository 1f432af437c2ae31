"""Pruned architectures in Lightning checkpoints.

A pruned ``LightningModule`` carries the record of what was cut from it (``applied_record``); every
checkpoint stores it under ``checkpoint["lightning_prune"]["record"]`` as plain data. Before weights
load into a module (resume, inference), the record is replayed on the freshly built dense module so
that the shapes match (:func:`restore_pruned`): in Lightning's own ``MyModule.load_from_checkpoint`` for a
:class:`PrunableModule`, in :func:`load_from_checkpoint` for any module. Checkpoints are read with
``weights_only=True``: nothing in them runs code.

A :class:`PrunableModule` also carries its record in its own ``state_dict`` (key ``_lightning_prune_record``,
UTF-8 JSON as a uint8 tensor) and cuts itself to a carried record before weights load, so that
``load_state_dict`` of a pruned module's state into a dense one works as it is. That is what ``ddp_spawn``
needs: at the end of ``fit`` Lightning loads rank 0's ``state_dict`` into the main process's module, which no
callback has cut.
"""

from __future__ import annotations

import json
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
STATE_KEY = "_lightning_prune_record"  # the record in a PrunableModule's state dict

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
    if len(wanted) == len(done):  # cut already (a sharded module, say, cut before the strategy wrapped it)
        setattr(module, _ATTRIBUTE, target)
        return
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


def _carry_record(module: nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: Any) -> None:
    record = applied_record(module)
    if parse_record(record):  # an unpruned module's state dict is the usual one
        state_dict[prefix + STATE_KEY] = torch.tensor(list(json.dumps(record).encode()), dtype=torch.uint8)


def _cut_to_carried_record(module: nn.Module, state_dict: dict[str, Any], prefix: str, *_: Any) -> None:
    carried = state_dict.pop(prefix + STATE_KEY, None)
    if carried is None:
        return
    where = f"state dict key '{prefix + STATE_KEY}'"
    try:
        record = json.loads(bytes(carried.tolist()).decode())
    except (AttributeError, TypeError, ValueError) as error:
        raise RecordError(f"{where}: not a record written by lightning-prune ({error}).") from error
    shapes = {name: tuple(tensor.shape) for name, tensor in module.state_dict().items()}
    incoming = {
        name.removeprefix(prefix): tuple(tensor.shape)
        for name, tensor in state_dict.items()
        if name.startswith(prefix) and isinstance(tensor, torch.Tensor)
    }
    if all(shapes.get(name) == shape for name, shape in incoming.items()):
        return  # already in the record's shapes (cut by `lightning_prune.restore`, say)
    restore_pruned(module, {CHECKPOINT_KEY: {"record": record}}, where)


class PrunableModule(pl.LightningModule):
    """A ``LightningModule`` whose own ``load_from_checkpoint`` loads checkpoints of pruned runs.

    Lightning builds the module from the checkpoint's hyper-parameters, dense, then calls
    ``on_load_checkpoint`` before it loads the weights; this class cuts the module there to the architecture
    recorded in the checkpoint (:func:`restore_pruned`), so that the pruned weights fit. Derive from it instead
    of ``LightningModule``; a subclass that overrides ``on_load_checkpoint`` calls ``super().on_load_checkpoint``.
    Resuming with ``trainer.fit(model, ckpt_path=...)`` cuts once, as without it. Its ``state_dict`` carries the
    record too, and ``load_state_dict`` cuts a dense module to it first: ``strategy="ddp_spawn"`` hands the main
    process the pruned model this way.

    Example::

        class MyModule(lightning_prune.PrunableModule):
            ...

        model = MyModule.load_from_checkpoint("last.ckpt").eval()
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.register_state_dict_post_hook(_carry_record)
        self.register_load_state_dict_pre_hook(_cut_to_carried_record)

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        trainer = self._trainer  # attached when resuming fit(ckpt_path=...); not in load_from_checkpoint
        path = getattr(trainer, "ckpt_path", None) if trainer is not None else None
        restore_pruned(self, checkpoint, f"checkpoint '{path}'" if path else "checkpoint")
        super().on_load_checkpoint(checkpoint)
