"""One small registry type for everything chosen by name or by class: criteria, op and module trace rules,
layer fixups, drop fixups, block scores and pruning methods.

A registry refuses a duplicate loudly unless asked to replace it, names what it knows when a lookup fails,
can forget an entry, and lends one for the length of a ``with`` block (tests, experiments)::

    with CRITERIA.registered("mine", factory):
        prune(model, x, 0.5, importance="mine")
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from lightning_prune.errors import PruningError

Key = TypeVar("Key")
Value = TypeVar("Value")


class RegistryError(PruningError, KeyError):
    """A name registered twice, or looked up and not found. ``str()`` is the plain message (not KeyError's repr)."""

    def __str__(self) -> str:
        return str(self.args[0])


def _shown(key: object) -> str:
    if isinstance(key, type):
        return f"{key.__module__}.{key.__qualname__}"
    return repr(key)


class Registry(Generic[Key, Value]):
    """Entries of one kind, by key, in registration order.

    Args:
        kind: what an entry is, for messages ("criterion", "layer fixup", ...).
        hint: what to do when a lookup fails, appended to the message.
    """

    def __init__(self, kind: str, hint: str = "") -> None:
        self.kind, self.hint = kind, hint
        self._entries: dict[Key, Value] = {}

    def register(self, key: Key, value: Value, *, replace: bool = False) -> Value:
        """Add ``value`` under ``key``; a key already present is an error unless ``replace``."""
        if key in self._entries and not replace:
            raise RegistryError(
                f"{self.kind} {_shown(key)} is already registered; pass replace=True to override it, or unregister "
                "it first."
            )
        self._entries[key] = value
        return value

    def decorator(self, *keys: Key, replace: bool = False) -> Callable[[Value], Value]:
        """``@registry.decorator("a", "b")`` registers the decorated object under each key."""

        def register(value: Value) -> Value:
            for key in keys:
                self.register(key, value, replace=replace)
            return value

        return register

    def unregister(self, key: Key) -> Value:
        """Remove and return the entry of ``key``."""
        if key not in self._entries:
            raise RegistryError(f"{self.kind} {_shown(key)} is not registered, so it cannot be unregistered.")
        return self._entries.pop(key)

    @contextlib.contextmanager
    def registered(self, key: Key, value: Value, *, replace: bool = False) -> Iterator[Value]:
        """Register ``value`` for the ``with`` block; afterwards the registry is as it was."""
        previous = self._entries.get(key)
        had = key in self._entries
        self.register(key, value, replace=replace)
        try:
            yield value
        finally:
            if had:
                self._entries[key] = previous  # type: ignore[assignment]
            else:
                self._entries.pop(key, None)

    def get(self, key: Key) -> Value | None:
        """The entry of ``key``, or None (hot path: tracing looks up a rule for every torch call)."""
        return self._entries.get(key)

    def __getitem__(self, key: Key) -> Value:
        if key not in self._entries:
            known = ", ".join(sorted(map(str, self._entries))) or "none"
            raise RegistryError(f"{self.kind} {_shown(key)} is not registered. Known: {known}. {self.hint}".strip())
        return self._entries[key]

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def __iter__(self) -> Iterator[Key]:
        return iter(list(self._entries))

    def __len__(self) -> int:
        return len(self._entries)

    def items(self) -> list[tuple[Key, Value]]:
        return list(self._entries.items())

    def values(self) -> list[Value]:
        return list(self._entries.values())

    def __repr__(self) -> str:
        return f"Registry({self.kind}: {len(self)} entries)"
