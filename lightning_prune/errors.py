"""Errors raised by lightning-prune.

Every error names the argument, module path or file it is about, the value found, and what to do.
They subclass ``ValueError`` or ``TypeError`` so callers can catch them with the usual types.
"""

from __future__ import annotations

import reprlib

_SHORT = reprlib.Repr()
_SHORT.maxlevel, _SHORT.maxlist, _SHORT.maxdict, _SHORT.maxstring, _SHORT.maxother = 3, 8, 8, 80, 80


class PruningError(ValueError):
    """Base class for errors about a pruning request (arguments, model, record).

    ``module`` names the module path the error is about, when there is one.
    """

    def __init__(self, message: str, *, module: str | None = None) -> None:
        super().__init__(message)
        self.module = module


class TraceError(PruningError):
    """The model could not be run or analysed on the example inputs."""


class RecordError(PruningError):
    """A pruning record does not fit the model it is applied to, or is malformed."""


class VerificationError(PruningError):
    """The pruned model no longer computes what the plan promised; the model was rolled back."""


def shown(value: object) -> str:
    """``repr(value)`` cut short, for messages about input that may be huge or nested beyond recursion limits."""
    return _SHORT.repr(value)
