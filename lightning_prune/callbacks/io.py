"""Checkpoint files that are either the old one or the complete new one, whenever the process dies.

Lightning's ``TorchCheckpointIO`` serialises into memory, writes a temporary file in the system's
temporary directory, then moves it over the target. When that directory is on another file system
than the checkpoints (a tmpfs ``/tmp``, a node-local disk, checkpoints on a network file system), the
move is a copy into the target: a job killed during the copy leaves a truncated ``last.ckpt`` where a
good one was, and a full-size orphan in ``/tmp``. :class:`AtomicCheckpointIO` writes next to the target
and renames, which a kill cannot tear.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.cloud_io import get_filesystem
from typing_extensions import override

from lightning_prune.callbacks.checkpoint import unreadable


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose local writes are atomic and durable; reads name the file when they fail.

    A checkpoint is written to ``.{name}.partial`` in the target's directory, flushed to disk
    (``fsync``) and renamed over the target (``os.replace``), so a process killed at any moment leaves
    either the previous checkpoint or the new one, never a torn file. A kill mid-write leaves the
    partial file, which the next write of the same checkpoint overwrites; Lightning never reads it.
    The checkpoint is serialised straight into the file, without the in-memory copy Lightning makes.
    Remote paths (``s3://`` ...) are written by ``TorchCheckpointIO``.

    :class:`~lightning_prune.callbacks.StructuredPruning` installs it at setup when the trainer uses the
    default ``TorchCheckpointIO``; other checkpoint plugins are left alone.

    Raises:
        RecordError: on load, naming the file, when it exists but is not a readable checkpoint
            (truncated, corrupt, or holding objects that ``weights_only`` loading refuses).

    Example::

        Trainer(plugins=[AtomicCheckpointIO()], callbacks=[ModelCheckpoint(save_last=True)])
    """

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None or not isinstance(get_filesystem(path), LocalFileSystem):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        path = Path(os.fspath(path).removeprefix("file://"))
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.partial")
        try:
            with open(partial, "wb") as file:
                torch.save(checkpoint, file)
                file.flush()
                os.fsync(file.fileno())
            os.replace(partial, path)
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
        _sync_directory(path.parent)

    @override
    def load_checkpoint(
        self,
        path: Any,
        map_location: Callable | None = lambda storage, loc: storage,
        weights_only: bool | None = None,
    ) -> dict[str, Any]:
        try:
            return super().load_checkpoint(path, map_location, weights_only)
        except FileNotFoundError:
            raise
        except Exception as error:
            raise unreadable(path, error) from error


def _sync_directory(directory: Path) -> None:
    """Make the rename itself durable (POSIX; elsewhere directories cannot be opened)."""
    if os.name != "posix":
        return
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
