"""Layer dropping: whole blocks of the model's block stack leave (ShortGPT's block influence by default, or a
contiguous span: angular distance, the deepest blocks)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from lightning_prune.budget import DenseSize
from lightning_prune.depth import BLOCK_SCORES, BLOCK_SPANS, LayerPruningResult, find_blocks, prune_layers
from lightning_prune.errors import PruningError
from lightning_prune.methods.base import METHODS
from lightning_prune.methods.depth_methods import batches_from, collect_batches
from lightning_prune.running import ExampleInputs


class LayerDropping:
    """Drop the least important blocks; ``amount`` is a fraction of the dense model's blocks.

    Args:
        importance: a block score name (``"block_influence"``, ``"random"``) or a span (``"angular"``, ``"deepest"``).
        blocks: the path of the block stack (found by :func:`lightning_prune.find_blocks` if None).
        seed: seed of ``"random"``.
        calibration_batches: the callback's; when set, blocks are scored on that many training batches, otherwise
            on the example inputs.
    """

    def __init__(
        self,
        importance: str = "block_influence",
        blocks: str | None = None,
        seed: int = 0,
        calibration_batches: int = 0,
    ) -> None:
        if importance not in BLOCK_SCORES and importance not in BLOCK_SPANS:
            known = ", ".join([*BLOCK_SCORES, *BLOCK_SPANS])
            raise PruningError(f"`importance` for structure='layers' must be one of {known}; got {importance!r}.")
        self.importance, self.blocks, self.seed = importance, blocks, seed
        self.needs_gradients = bool(calibration_batches)  # statistics of calibration batches: the batches (collect)
        self.collect = collect_batches

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
            batches=batches_from(statistics, "structure='layers'") if self.needs_gradients else None,
            optimizers=optimizers,
            seed=self.seed,
            dense=dense,
        )


METHODS.register("layers", LayerDropping)
