"""The contract every pruning method meets, and the registry the callbacks and Hydra pick methods from."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Protocol

import torch
from torch import nn

from lightning_prune.api import LayerChange
from lightning_prune.budget import DenseSize
from lightning_prune.registry import Registry
from lightning_prune.running import ExampleInputs


class StepResult(Protocol):
    """What a method step reports (``PruningResult`` and ``LayerPruningResult`` are two)."""

    record: dict[str, Any]
    params_before: int
    params_after: int
    macs_before: int
    macs_after: int
    dense: DenseSize

    @property
    def layers(self) -> Sequence[LayerChange]: ...


class Method(Protocol):
    needs_gradients: bool

    def to_dict(self) -> dict[str, Any]: ...

    def check(self, model: nn.Module, example_inputs: ExampleInputs | None) -> None: ...

    def step(
        self,
        model: nn.Module,
        example_inputs: ExampleInputs,
        amount: float,
        dense: DenseSize | None,
        *,
        optimizers: Iterable[torch.optim.Optimizer] = (),
        statistics: Mapping[str, Any] | None = None,
    ) -> StepResult: ...


METHODS: Registry[str, Callable[..., Method]] = Registry(
    "pruning method", "Register one with lightning_prune.methods.METHODS.register(name, factory)."
)


def get_method(name: str, **options: Any) -> Method:
    """The method ``name`` built with ``options``."""
    return METHODS[name](**options)
