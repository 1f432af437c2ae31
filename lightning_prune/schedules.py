"""Pruning schedules: at which epochs, and how much in total (relative to the dense model) after each.

- ``"oneshot"``: everything at the end of ``start_epoch``;
- ``"linear"``: equal increments at ``start_epoch, start_epoch + every, ...`` up to and including
  ``end_epoch``;
- ``"cubic"``: gradual pruning of Zhu & Gupta (2017), ``amount · (1 - (1 - p)³)`` with ``p`` the
  fraction of steps done: large cuts early, small ones near the end;
- a mapping ``{epoch: cumulative_amount}`` for anything else.

Epochs are Lightning's 0-based ``current_epoch``; a step at epoch ``e`` runs when epoch ``e`` ends.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping

from lightning_prune.errors import PruningError

SCHEDULES = ("oneshot", "linear", "cubic")


def _fraction(value: object, argument: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 <= value < 1.0:
        raise PruningError(f"`{argument}` must be a fraction in [0, 1), got {value!r}.")
    return float(value)


def _epoch(value: object, subject: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise PruningError(f"{subject} must be a non-negative integer epoch (0-based `current_epoch`).")
    return value


def schedule_amounts(
    schedule: str | Mapping[int | str, float],
    amount: float | None = None,
    start_epoch: int = 0,
    end_epoch: int | None = None,
    every: int = 1,
) -> dict[int, float]:
    """Cumulative amount reached at the end of each pruning epoch, in epoch order.

    Raises:
        PruningError: naming the argument, for amounts outside [0, 1), ``end_epoch < start_epoch``,
            ``every < 1``, an unknown schedule name or a mapping whose amounts decrease.
    """
    if isinstance(schedule, Mapping):
        if not schedule:
            raise PruningError("`schedule` mapping is empty; give at least one {epoch: cumulative_amount}.")
        steps = {}
        for epoch, value in schedule.items():
            epoch = int(epoch) if isinstance(epoch, str) and epoch.isdigit() else epoch
            steps[_epoch(epoch, f"`schedule` epoch {epoch!r}")] = _fraction(value, f"schedule[{epoch}]")
        steps = dict(sorted(steps.items()))
        values = list(steps.values())
        if any(b < a for a, b in itertools.pairwise(values)):
            raise PruningError(f"`schedule` amounts are cumulative and must not decrease, got {steps}.")
        return steps
    if schedule not in SCHEDULES:
        raise PruningError(
            f"`schedule` must be one of {', '.join(SCHEDULES)} or a mapping {{epoch: cumulative_amount}}; "
            f"got {schedule!r}."
        )
    amount = _fraction(amount, "amount")
    start_epoch = _epoch(start_epoch, f"`start_epoch`={start_epoch!r}")
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise PruningError(f"`every` must be a positive integer, got {every!r}.")
    if schedule == "oneshot":
        return {start_epoch: amount}
    end_epoch = start_epoch if end_epoch is None else _epoch(end_epoch, f"`end_epoch`={end_epoch!r}")
    if end_epoch < start_epoch:
        raise PruningError(f"`end_epoch` ({end_epoch}) must not be before `start_epoch` ({start_epoch}).")
    epochs = list(range(start_epoch, end_epoch + 1, every))
    if epochs[-1] != end_epoch:
        epochs.append(end_epoch)
    steps = len(epochs)
    if schedule == "linear":
        return {epoch: amount * (k + 1) / steps for k, epoch in enumerate(epochs)}
    return {epoch: amount * (1 - (1 - (k + 1) / steps) ** 3) for k, epoch in enumerate(epochs)}
