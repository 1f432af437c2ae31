"""Depth pruning: remove whole blocks from a model's stack of blocks.

Blocks are scored by their *block influence* (Men et al. 2024, "ShortGPT"): ``1 - cos(input, output)``
of the hidden states a block receives and returns, averaged over positions and examples. A block
that barely changes its input is the cheapest to drop. Or a contiguous span of blocks goes at once
(``BLOCK_SPANS``): the span whose input and output are closest in angular distance on the last token
(Gromov et al. 2024, "The Unreasonable Ineffectiveness of the Deeper Layers"), or the deepest blocks but
the last, that paper's baseline. The remaining blocks are renumbered
(``layer_idx``, used by key/value caches) and a Hugging Face config's ``num_hidden_layers`` and
``layer_types`` follow.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_prune.api import LayerChange
from lightning_prune.budget import DenseSize
from lightning_prune.cuts import Drop, Step
from lightning_prune.errors import PruningError
from lightning_prune.measure import count_macs, count_params
from lightning_prune.record import new_record
from lightning_prune.registry import Registry
from lightning_prune.running import ExampleInputs, observe
from lightning_prune.selection import check_amount
from lightning_prune.surgery import apply_drops

BlockScore = Callable[[nn.Module, str, Iterable[Any]], Tensor]
BLOCK_SCORES: Registry[str, Callable[..., BlockScore]] = Registry(
    "block score", "Pass `importance=` a callable score(model, blocks, batches), or register a factory here."
)
# (model, blocks, batches, count) -> the first of the `count` contiguous blocks to remove
BlockSpan = Callable[[nn.Module, str, list[Any], int], int]
BLOCK_SPANS: Registry[str, Callable[..., BlockSpan]] = Registry(
    "block span", "Register a factory of span(model, blocks, batches, count) -> first block here."
)


def find_blocks(model: nn.Module) -> str:
    """The path of the longest ``nn.ModuleList``/``nn.Sequential`` whose entries are all of one class."""
    best, size = None, 1
    for name, module in model.named_modules():
        stack = isinstance(module, nn.ModuleList | nn.Sequential) and len(module) > size
        if stack and len({type(entry) for entry in module}) == 1:
            best, size = name, len(module)
    if best is None:
        raise PruningError(
            f"{type(model).__name__} has no stack of repeated blocks (an nn.ModuleList or nn.Sequential of one "
            "block class); pass `blocks=` with the path of the stack to prune."
        )
    return best


def _first_tensor(value: Any) -> Tensor | None:
    if isinstance(value, Tensor):
        return value
    if isinstance(value, tuple | list) and value and isinstance(value[0], Tensor):
        return value[0]
    return None


def block_influence(model: nn.Module, blocks: str, batches: Iterable[Any]) -> Tensor:
    """``1 - cos(input, output)`` of every block of ``blocks``; +inf for blocks that change the shape."""
    stack = model.get_submodule(blocks)
    totals = torch.zeros(len(stack), dtype=torch.float64)
    counts = torch.zeros(len(stack), dtype=torch.float64)
    changes_shape = torch.zeros(len(stack), dtype=torch.bool)

    def hook(index: int) -> Callable[..., None]:
        def measure(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            source = _first_tensor(args) if args else _first_tensor(list(kwargs.values()))
            result = _first_tensor(output)
            if source is None or result is None or source.shape != result.shape:
                changes_shape[index] = True
                return
            similarity = F.cosine_similarity(source.flatten(1) if source.ndim < 3 else source, result, dim=-1)
            totals[index] += float((1 - similarity.double()).sum())
            counts[index] += similarity.numel()

        return measure

    handles = [block.register_forward_hook(hook(i), with_kwargs=True) for i, block in enumerate(stack)]
    observe(model, batches, handles)
    scores = totals / counts.clamp(min=1)
    return scores.masked_fill(changes_shape | (counts == 0), math.inf)


def _random_blocks(seed: int = 0, **_: Any) -> BlockScore:
    def scores(model: nn.Module, blocks: str, batches: Iterable[Any]) -> Tensor:
        size = len(model.get_submodule(blocks))
        return torch.rand(size, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)

    return scores


BLOCK_SCORES.register("block_influence", lambda **_: block_influence)
BLOCK_SCORES.register("random", _random_blocks)


def angular_distances(model: nn.Module, blocks: str, batches: Iterable[Any], count: int) -> Tensor:
    """``arccos(cos(x_l, x_{l+count})) / π`` for every span of ``count`` blocks starting at ``l``.

    ``x_l`` is the last position's hidden state entering block ``l`` (``x_{size}``: leaving the last block),
    per example; the distance is averaged over the examples of ``batches``. Entry ``l`` of the result
    (``size - count + 1`` entries) is the span ``l .. l + count - 1``.
    """
    stack = model.get_submodule(blocks)
    size = len(stack)
    states: list[list[Tensor]] = [[] for _ in range(size + 1)]

    def hook(index: int) -> Callable[..., None]:
        def keep_last(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            source = _first_tensor(args) if args else _first_tensor(list(kwargs.values()))
            result = _first_tensor(output)
            if source is None or result is None or source.ndim != 3 or source.shape != result.shape:
                raise PruningError(
                    f"block {index} of `{blocks}` does not map (batch, positions, features) hidden states to the same "
                    "shape: angular distances need a residual stream."
                )
            states[index].append(source[:, -1].double().cpu())
            if index == size - 1:
                states[size].append(result[:, -1].double().cpu())

        return keep_last

    handles = [block.register_forward_hook(hook(i), with_kwargs=True) for i, block in enumerate(stack)]
    observe(model, batches, handles)
    if not states[size]:
        raise PruningError(f"the calibration batches reached no block of `{blocks}`.")
    stream = torch.stack([torch.cat(state) for state in states])  # (size + 1, examples, features)
    cosine = F.cosine_similarity(stream[: size - count + 1], stream[count:], dim=-1)
    return (torch.arccos(cosine.clamp(-1, 1)) / math.pi).mean(-1)


def _closest_span(model: nn.Module, blocks: str, batches: list[Any], count: int) -> int:
    return int(torch.argmin(angular_distances(model, blocks, batches, count)))


def _deepest_span(model: nn.Module, blocks: str, batches: list[Any], count: int) -> int:
    return len(model.get_submodule(blocks)) - 1 - count


BLOCK_SPANS.register("angular", lambda **_: _closest_span)
BLOCK_SPANS.register("deepest", lambda **_: _deepest_span)


@dataclass
class LayerPruningResult:
    """What one depth-pruning call removed; ``record`` replays it (:func:`lightning_prune.restore`)."""

    record: dict[str, Any]
    blocks: str
    removed: list[int]
    scores: list[float]
    params_before: int
    params_after: int
    macs_before: int
    macs_after: int
    dense: DenseSize
    merged: dict[int, list[int]] = field(default_factory=dict)  # LaCo: a kept block -> the blocks merged into it

    @property
    def layers(self) -> list[LayerChange]:
        """The block stack's length, before → after."""
        before = len(self.scores)
        return [LayerChange(self.blocks, "", before, before - len(self.removed))] if self.removed else []

    def __str__(self) -> str:
        merged = "".join(f", {others} merged into {base}" for base, others in self.merged.items())
        return (
            f"removed blocks {self.removed} of `{self.blocks}`{merged}: params {self.params_before:,} -> "
            f"{self.params_after:,}, MACs {self.macs_before:,} -> {self.macs_after:,}"
        )


def blocks_due(amount: float, dense: DenseSize | None, size: int) -> int:
    """How many of ``size`` blocks a step to ``amount`` removes (cumulative, relative to ``dense`` when given)."""
    return math.floor(amount * (dense.units if dense else size) + 1e-9) - (dense.removed if dense else 0)


def prune_layers(
    model: nn.Module,
    example_inputs: ExampleInputs,
    amount: float | None = None,
    *,
    count: int | None = None,
    blocks: str | None = None,
    indices: Sequence[int] | None = None,
    importance: str | BlockScore = "block_influence",
    batches: Iterable[Any] | None = None,
    optimizers: Iterable[torch.optim.Optimizer] = (),
    seed: int = 0,
    dense: DenseSize | None = None,
    merged: dict[int, list[int]] | None = None,
) -> LayerPruningResult:
    """Remove the least important ``amount`` (a fraction) or ``count`` of the blocks of a block stack, in place.

    Args:
        model: the model; the stack is found by :func:`find_blocks` unless ``blocks`` names it.
        example_inputs: inputs for measuring; also the calibration batch when ``batches`` is None.
        amount, count: how many blocks go (one of the two). At least one block always stays.
        indices: instead of ``amount``/``count`` and scores, exactly these blocks go.
        importance: ``"block_influence"`` (ShortGPT), ``"random"``, or ``score(model, blocks, batches)``
            returning one score per block (lowest go first); or a span of contiguous blocks: ``"angular"``
            (the span closest in angular distance, see :func:`angular_distances`), ``"deepest"`` (the deepest
            blocks but the last).
        batches: model inputs (tensor, tuple or dict per batch) to measure block influence on.
        optimizers: the removed blocks' parameters leave these optimizers.
        seed: seed of ``importance="random"``.
        dense: the ``result.dense`` of an earlier call on this model: ``amount`` is then cumulative and
            relative to the number of blocks the model had before its first call.
        merged: reported in the result (:func:`lightning_prune.laco` merges blocks before it drops them).

    Raises:
        PruningError: a bad ``amount``/``count``, no stack of blocks, or a stack whose blocks all change
            their input's shape; the model is unchanged.
    """
    if sum(x is not None for x in (amount, count, indices)) != 1:
        raise PruningError(
            "pass exactly one of `amount` (a fraction of the blocks), `count` (a number of blocks) and `indices`."
        )
    if amount is not None:
        check_amount(amount)
    if count is not None and (isinstance(count, bool) or not isinstance(count, int) or count < 0):
        raise PruningError(f"`count` must be a non-negative integer, got {count!r}.")
    blocks = blocks or find_blocks(model)
    try:
        stack = model.get_submodule(blocks)
    except AttributeError as error:
        raise PruningError(f"`blocks` {blocks!r} is not a submodule of {type(model).__name__}.") from error
    if not isinstance(stack, nn.ModuleList | nn.Sequential):
        raise PruningError(f"`blocks` {blocks!r} is a {type(stack).__name__}, not an nn.ModuleList or nn.Sequential.")
    size = len(stack)
    if indices is not None:
        bad = [i for i in indices if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < size]
        if bad or len(set(indices)) != len(indices):
            raise PruningError(
                f"`indices` {list(indices)} must be distinct block numbers of `{blocks}`, which has {size} blocks "
                f"(0..{size - 1}); out of range: {bad}."
            )
        count = len(indices)
    if count is None:
        count = blocks_due(amount, dense, size)
    wanted = max(count, 0)
    if wanted >= size:
        raise PruningError(f"cannot remove {wanted} of the {size} blocks of `{blocks}`: at least one must stay.")
    calibration = list(batches) if batches is not None else [example_inputs]
    if isinstance(importance, str) and importance in BLOCK_SPANS and indices is None:
        first = BLOCK_SPANS[importance](seed=seed)(model, blocks, calibration, wanted) if wanted else 0
        indices = range(first, first + wanted)
    if indices is not None:
        scores = torch.ones(size, dtype=torch.float64)
        scores[list(indices)] = 0.0
    elif callable(importance) or importance in BLOCK_SCORES:
        scorer = importance if callable(importance) else BLOCK_SCORES[importance](seed=seed)
        scores = torch.as_tensor(scorer(model, blocks, calibration), dtype=torch.float64).reshape(-1)
    else:
        known = ", ".join(repr(name) for name in [*BLOCK_SCORES, *BLOCK_SPANS])
        raise PruningError(f"`importance` must be {known} or a callable, got {importance!r}.")
    if scores.numel() != size or torch.isnan(scores).any():
        raise PruningError(f"block scores for `{blocks}` must be {size} numbers without NaN, got {scores.tolist()}.")
    removable = int(torch.isfinite(scores).sum())
    if wanted > removable:
        raise PruningError(
            f"only {removable} blocks of `{blocks}` keep their input's shape and can be removed; {wanted} were asked."
        )
    params_before, macs_before = count_params(model), count_macs(model, example_inputs)
    removed = sorted(torch.argsort(scores, stable=True)[:wanted].tolist())
    drop = Drop(blocks, size, [i for i in range(size) if i not in removed])
    if removed:
        apply_drops(model, [drop], optimizers)
    return LayerPruningResult(
        new_record([Step(drops=[drop])] if removed else []),
        blocks,
        removed,
        scores.tolist(),
        params_before,
        count_params(model),
        macs_before,
        count_macs(model, example_inputs),
        (dense or DenseSize(params_before, macs_before, size)).after(len(removed)),
        dict(merged or {}),
    )
