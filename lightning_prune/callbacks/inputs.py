"""Example inputs for the callbacks' traces, taken from a training batch: which part is the input, its first rows."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor

from lightning_prune.errors import PruningError

EXAMPLE_BATCH = 8


def first_rows(value: Any, rows: int = EXAMPLE_BATCH) -> Any:
    """Detached copies of the first ``rows`` rows of every tensor in ``value`` (nested in dicts, tuples, lists)."""
    if isinstance(value, Tensor):
        return value[:rows].detach().clone() if value.ndim else value.detach().clone()
    if isinstance(value, Mapping):
        return {k: first_rows(v, rows) for k, v in value.items()}
    if isinstance(value, tuple | list):
        return type(value)(first_rows(v, rows) for v in value)
    return value


def batch_rows(example: Any) -> int:
    """The batch size of example inputs: the first dimension of their first tensor (1 if there is none)."""
    if isinstance(example, Tensor):
        return example.shape[0] if example.ndim else 1
    values = example.values() if isinstance(example, Mapping) else example if isinstance(example, tuple | list) else []
    return next((batch_rows(v) for v in values if isinstance(v, Tensor | Mapping | tuple | list)), 1)


def select_input(batch: Any, batch_input: int | str | None) -> Any:
    """The model's input in a training batch: ``batch[batch_input]`` (``None``: the whole batch).

    Raises:
        PruningError: ``batch_input`` selects nothing from ``batch``.
    """
    if batch_input is None:
        return batch
    try:
        return batch[batch_input]
    except (KeyError, IndexError, TypeError) as error:
        kind = list(batch) if isinstance(batch, Mapping) else type(batch).__name__
        raise PruningError(
            f"`batch_input`={batch_input!r} does not select the model input from a training batch ({kind}). "
            "Set `batch_input` to the index or key of the input, or set `example_input_array` on the module."
        ) from error
