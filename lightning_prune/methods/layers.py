"""Layer dropping: whole blocks of the model's block stack leave (ShortGPT's block influence by default)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from lightning_prune.budget import DenseSize
from lightning_prune.depth import BLOCK_SCORES, LayerPruningResult, find_blocks, prune_layers
from lightning_prune.errors import PruningError
from lightning_prune.methods.base import METHODS
from lightning_prune.running import ExampleInputs


class LayerDropping:
    """Drop the least important blocks; ``amount`` is a fraction of the dense model's blocks.

    Args:
        importance: a block score name (``"block_influence"``, ``"random"``).
        blocks: the path of the block stack (found by :func:`lightning_prune.find_blocks` if None).
        seed: seed of ``"random"``.
    """

    needs_gradients = False

    def __init__(self, importance: str = "block_influence", blocks: str | None = None, seed: int = 0) -> None:
        if importance not in BLOCK_SCORES:
            raise PruningError(
                f"`importance` for structure='layers' must be one of {', '.join(BLOCK_SCORES)}; got {importance!r}."
            )
        self.importance, self.blocks, self.seed = importance, blocks, seed

    def to_dict(self) -> dict[str, Any]:
        return {"importance": self.importance, "blocks": self.blocks, "seed": self.seed}

    def check(self, model: nn.Module, example_inputs: ExampleInputs | None) -> None:
        if self.blocks is None:
            find_blocks(model)

    def step(
        self,
        model: nn.Module,
        example_inputs: ExampleInputs,
        amount: float,
        dense: DenseSize | None,
        *,
        optimizers: Iterable[torch.optim.Optimizer] = (),
        statistics: Mapping[str, Any] | None = None,
    ) -> LayerPruningResult:
        return prune_layers(
            model,
            example_inputs,
            amount,
            blocks=self.blocks or find_blocks(model),
            importance=self.importance,
            optimizers=optimizers,
            seed=self.seed,
            dense=dense,
        )


METHODS.register("layers", LayerDropping)
