"""Depth methods on calibration windows: angular-distance block removal, its deepest-blocks baseline, and LaCo.

- :func:`drop_angular` (Gromov et al. 2024): remove the contiguous span of ``count`` blocks whose input and
  output hidden states, at the last position, are closest in angular distance ``arccos(cos)/π``.
  :func:`drop_deepest` is the paper's baseline: the ``count`` deepest blocks but the last.
- :func:`laco` (Yang et al. 2024, "Layer Collapse"): merge blocks ``l+1 .. l+m`` into block ``l`` by
  *Reserving-Differences-while-Seeking-Common*, ``θ_l + Σ_k (θ_{l+k} − θ_l)`` for the weight of every linear
  layer of the block (attention and MLP projections; norms and biases stay block ``l``'s), then delete the merged
  blocks. The walk starts at ``highest − m − 1`` (so the first merge ends just below ``highest``; at ``lowest`` if
  that is lower) and goes down to ``lowest``; a merge is kept when the mean cosine similarity of the final hidden
  states (the last block's output, each window flattened) of the merged and the original model exceeds
  ``threshold``; after a kept merge the walk moves ``interval`` blocks down (back to ``size − 1 − m`` if that is
  past the top), after a refused one a single block. Near the top a merge takes fewer blocks (those left above
  it), and never more than ``target`` allows.

  Two differences from the authors' notebook (``laco_llama-13b.ipynb``): it adds each difference to the base
  weights as they are being updated in place, so its "merge" leaves the *last* merged layer's weights rather than
  the paper's formula, which is what this module computes; and it compares the hidden states after the final
  norm (``hidden_states[-1]``), this module the last block's output, which any block stack has.

All three end in one :class:`~lightning_prune.Drop`: a record that ``restore`` replays on a fresh model, into which
the pruned ``state_dict`` (merged weights included) loads. Trial merges run on the model itself (skipped blocks
return their input; the base block's weights are swapped and put back), so no copy of the model is made.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_prune.budget import DenseSize
from lightning_prune.depth import LayerPruningResult, blocks_due, find_blocks, prune_layers
from lightning_prune.errors import PruningError
from lightning_prune.language import check_windows
from lightning_prune.methods.base import METHODS
from lightning_prune.running import ExampleInputs, observe

# LaCo on Llama-2-13B (40 layers), from the authors' notebook: 6 layers merged into each (7 together), interval 1,
# layers 0..39, threshold 0.45 on 5 English Wikipedia sentences.
LACO_MERGE, LACO_INTERVAL, LACO_THRESHOLD = 6, 1, 0.45


def calibration_batches(model: nn.Module, calibration: Tensor) -> list[dict[str, Any]]:
    """``(count, tokens)`` token ids as one model input per window (checked against the model first)."""
    try:
        check_windows(model, calibration, "calibration")
    except ValueError as error:
        raise PruningError(str(error)) from error
    return [{"input_ids": window[None], "use_cache": False} for window in calibration]


def block_stack(model: nn.Module, blocks: str | None) -> tuple[str, nn.ModuleList | nn.Sequential]:
    """The block stack's path and module; its blocks must all be of one class."""
    blocks = blocks or find_blocks(model)
    try:
        stack = model.get_submodule(blocks)
    except AttributeError as error:
        raise PruningError(f"`blocks` {blocks!r} is not a submodule of {type(model).__name__}.") from error
    if not isinstance(stack, nn.ModuleList | nn.Sequential):
        raise PruningError(f"`blocks` {blocks!r} is a {type(stack).__name__}, not an nn.ModuleList or nn.Sequential.")
    classes = sorted({type(block).__name__ for block in stack})
    if len(classes) != 1:
        raise PruningError(
            f"`blocks` {blocks!r} holds blocks of {len(classes)} classes ({', '.join(classes)}): depth methods need a "
            "stack of one block class. Pass `blocks=` with the path of such a stack."
        )
    return blocks, stack


def _check_count(count: Any, size: int, blocks: str) -> None:
    if isinstance(count, bool) or not isinstance(count, int) or not 0 <= count < size:
        raise PruningError(
            f"`count` must be an integer in [0, {size}) (blocks removed; `{blocks}` has {size}), got {count!r}."
        )


def drop_angular(
    model: nn.Module, calibration: Tensor, count: int, *, blocks: str | None = None,
    optimizers: Iterable[torch.optim.Optimizer] = (),
) -> LayerPruningResult:  # fmt: skip
    """Remove the ``count`` contiguous blocks closest in angular distance on ``calibration`` (``(windows, tokens)``
    token ids), in place; ``result.record`` replays it. See :func:`lightning_prune.depth.angular_distances`."""
    blocks, stack = block_stack(model, blocks)
    _check_count(count, len(stack), blocks)
    batches = calibration_batches(model, calibration)
    return prune_layers(model, batches[0], count=count, blocks=blocks, importance="angular", batches=batches,
                        optimizers=optimizers)  # fmt: skip


def drop_deepest(
    model: nn.Module, calibration: Tensor, count: int, *, blocks: str | None = None,
    optimizers: Iterable[torch.optim.Optimizer] = (),
) -> LayerPruningResult:  # fmt: skip
    """Remove the ``count`` deepest blocks but the last, in place (``calibration`` only measures MACs)."""
    blocks, stack = block_stack(model, blocks)
    _check_count(count, len(stack), blocks)
    example = calibration_batches(model, calibration)[0]
    return prune_layers(model, example, count=count, blocks=blocks, importance="deepest", optimizers=optimizers)


def _check_laco(
    stack: Sequence[nn.Module], blocks: str, merge: Any, interval: Any, lowest: Any, highest: Any, threshold: Any,
    target: Any,
) -> int:  # fmt: skip
    """Validate LaCo's arguments against the stack; the highest block, resolved."""
    size = len(stack)
    _check_walk(merge, interval, threshold)
    if merge > size - 1:
        raise PruningError(
            f"`merge` {merge} exceeds the {size - 1} blocks `{blocks}` ({size} blocks) can merge into one; "
            f"lower it (LaCo on Llama-2-13B merges {LACO_MERGE})."
        )
    highest = size - 1 if highest is None else highest
    for name, value in (("lowest", lowest), ("highest", highest)):
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < size:
            raise PruningError(f"`{name}` must be a block of `{blocks}` (0..{size - 1}), got {value!r}.")
    if lowest > highest:
        raise PruningError(f"`lowest` ({lowest}) must not be above `highest` ({highest}).")
    if target is not None and (isinstance(target, bool) or not isinstance(target, int) or not 0 < target < size):
        raise PruningError(
            f"`target` (blocks to keep) must be an integer in [1, {size - 1}]: `{blocks}` has {size} blocks; got "
            f"{target!r}."
        )
    shapes = [{name: tuple(m.weight.shape) for name, m in _linears(block)} for block in stack]
    if any(shape != shapes[0] for shape in shapes):
        raise PruningError(
            f"the blocks of `{blocks}` have linear layers of different shapes: LaCo merges blocks of equal widths "
            "(prune depth before width, or width uniformly)."
        )
    return highest


def _check_walk(merge: Any, interval: Any, threshold: Any) -> None:
    """What LaCo's arguments must be on any model."""
    for name, value in (("merge", merge), ("interval", interval)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise PruningError(f"`{name}` must be a positive integer, got {value!r}.")
    if isinstance(threshold, bool) or not isinstance(threshold, int | float) or not -1 < threshold <= 1:
        raise PruningError(f"`threshold` must be a cosine similarity in (-1, 1], got {threshold!r}.")


def _linears(block: nn.Module) -> Iterator[tuple[str, nn.Linear]]:
    return ((name, m) for name, m in block.named_modules() if isinstance(m, nn.Linear))


def _replace_first(output: Any, value: Tensor) -> Any:
    if isinstance(output, Tensor):
        return value
    return type(output)((value, *output[1:]))


class _Collapse:
    """The model seen with some blocks skipped (their output is their input) and its final hidden states."""

    def __init__(self, model: nn.Module, stack: Sequence[nn.Module], batches: list[Any]) -> None:
        self.model, self.stack, self.batches = model, stack, batches
        self.skipped: set[int] = set()

    def final_states(self) -> list[Tensor]:
        states: list[Tensor] = []

        def skip(index: int) -> Callable[..., Any]:
            def identity(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
                if index in self.skipped:
                    source = args[0] if args else kwargs["hidden_states"]
                    return _replace_first(output, source)
                return None

            return identity

        def keep(module: nn.Module, args: tuple, output: Any) -> None:
            result = output if isinstance(output, Tensor) else output[0]
            states.extend(result.flatten(1).double().cpu())

        handles = [block.register_forward_hook(skip(i), with_kwargs=True) for i, block in enumerate(self.stack)]
        handles.append(self.stack[-1].register_forward_hook(keep))
        observe(self.model, self.batches, handles)
        return states


def _put_back(block: nn.Module, weights: dict[str, Tensor]) -> None:
    with torch.no_grad():
        for name, module in _linears(block):
            module.weight.copy_(weights[name])


def collapse(
    model: nn.Module, blocks: str, batches: list[Any], *, merge: int = LACO_MERGE, interval: int = LACO_INTERVAL,
    lowest: int = 0, highest: int | None = None, threshold: float = LACO_THRESHOLD, target: int | None = None,
) -> tuple[list[int], dict[int, list[int]]]:  # fmt: skip
    """LaCo's walk: merge in place, and return the blocks to keep and which blocks each kept block took in.

    Merged weights are written into the base blocks; nothing is deleted yet (the caller drops the rest).
    """
    stack = model.get_submodule(blocks)
    highest = _check_laco(stack, blocks, merge, interval, lowest, highest, threshold, target)
    target = 1 if target is None else target
    view = _Collapse(model, stack, batches)
    reference = view.final_states()
    alive, merged = list(range(len(stack))), {}
    originals: dict[int, dict[str, Tensor]] = {}  # put back if the walk fails half-way: the model stays as it was
    position = max(highest - merge - 1, lowest)
    try:
        while position >= lowest and len(alive) > target:
            taken = min(merge, len(alive) - position - 1, len(alive) - target)
            if taken < 1:
                position -= 1
                continue
            base, others = alive[position], alive[position + 1 : position + 1 + taken]
            weights = {name: m.weight for name, m in _linears(stack[base])}
            saved = {name: weight.detach().clone() for name, weight in weights.items()}
            originals.setdefault(base, saved)
            with torch.no_grad():
                for name, weight in weights.items():
                    weight.add_(sum(stack[i].get_submodule(name).weight - saved[name] for i in others))
            view.skipped.update(others)
            similarity = torch.stack(
                [F.cosine_similarity(a, b, dim=0) for a, b in zip(view.final_states(), reference, strict=True)]
            ).mean()
            if float(similarity) > threshold:
                alive = [i for i in alive if i not in others]
                merged[base] = [*merged.get(base, []), *others, *[i for o in others for i in merged.pop(o, [])]]
                position -= interval
                if position >= len(alive):
                    position = len(alive) - 1 - merge
            else:
                view.skipped.difference_update(others)
                _put_back(stack[base], saved)
                position -= 1
    except BaseException:
        for base, weights in originals.items():
            _put_back(stack[base], weights)
        raise
    return alive, {base: sorted(others) for base, others in merged.items()}


def laco(
    model: nn.Module, calibration: Tensor, *, merge: int = LACO_MERGE, interval: int = LACO_INTERVAL, lowest: int = 0,
    highest: int | None = None, threshold: float = LACO_THRESHOLD, target: int | None = None,
    blocks: str | None = None, optimizers: Iterable[torch.optim.Optimizer] = (), dense: DenseSize | None = None,
) -> LayerPruningResult:  # fmt: skip
    """LaCo (see the module doc), in place: merge and delete blocks until ``target`` blocks are left or the walk
    reaches ``lowest``.

    Args:
        model: the model; its stack of blocks is found by :func:`lightning_prune.find_blocks` unless ``blocks``
            names it (its blocks must be of one class and of equal widths).
        calibration: ``(windows, tokens)`` token ids on which merged and original final hidden states are compared
            (the paper: 5 sentences).
        merge: blocks merged into each base block (the paper's ``C − 1``; Llama-2-13B: 6).
        interval: blocks the walk moves down after a kept merge (Llama-2-13B: 1).
        lowest, highest: the walk goes from ``highest − merge − 1`` down to ``lowest`` (None: the last block;
            Llama-2-13B: 0 and 39).
        threshold: the cosine similarity in (-1, 1] a merge must exceed (Llama-2-13B: 0.45).
        target: blocks to keep, at least 1 and fewer than now (None: no limit but the threshold).
        optimizers: the deleted blocks' parameters leave these.
        dense: as in :func:`lightning_prune.prune_layers`, for a scheduled step.

    Raises:
        PruningError: an argument out of range (named with its value), blocks of several classes or widths;
            the model is unchanged.
    """
    blocks, stack = block_stack(model, blocks)
    _check_laco(stack, blocks, merge, interval, lowest, highest, threshold, target)
    batches = calibration_batches(model, calibration)
    return _collapse_and_drop(model, blocks, batches, batches[0], optimizers, dense, merge=merge, interval=interval,
                              lowest=lowest, highest=highest, threshold=threshold, target=target)  # fmt: skip


def _collapse_and_drop(
    model: nn.Module, blocks: str, batches: list[Any], example: ExampleInputs,
    optimizers: Iterable[torch.optim.Optimizer], dense: DenseSize | None, **options: Any,
) -> LayerPruningResult:  # fmt: skip
    size = len(model.get_submodule(blocks))
    alive, merged = collapse(model, blocks, batches, **options)
    removed = [i for i in range(size) if i not in alive]
    return prune_layers(model, example, indices=removed, blocks=blocks, optimizers=optimizers, dense=dense,
                        merged=merged)  # fmt: skip


def collect_batches(model: nn.Module, graph: Any, batches: Iterable[Any], loss_fn: Any = None) -> dict[str, Any]:
    """The calibration batches themselves (model inputs): depth methods run the model on them at the step."""
    return {"batches": list(batches)}


def batches_from(statistics: Mapping[str, Any] | None, what: str) -> list[Any]:
    batches = (statistics or {}).get("batches")
    if not batches:
        raise PruningError(f"{what} needs calibration batches: set `calibration_batches` (e.g. 10).")
    return list(batches)


class LayerCollapse:
    """LaCo as a scheduled step (``StructuredPruning(structure="laco", calibration_batches=...)``): each step merges
    until ``amount`` of the dense model's blocks are gone (or the threshold stops the walk).

    Args:
        merge, interval, lowest, highest, threshold: as in :func:`lightning_prune.laco`.
        blocks: the path of the block stack (found by :func:`lightning_prune.find_blocks` if None).
    """

    needs_gradients = True  # statistics of calibration batches, of its own kind (``collect``): the batches
    collect = staticmethod(collect_batches)

    def __init__(
        self, merge: int = LACO_MERGE, interval: int = LACO_INTERVAL, lowest: int = 0, highest: int | None = None,
        threshold: float = LACO_THRESHOLD, blocks: str | None = None,
    ) -> None:  # fmt: skip
        _check_walk(merge, interval, threshold)
        self.options = {"merge": merge, "interval": interval, "lowest": lowest, "highest": highest}
        self.options["threshold"] = threshold
        self.blocks = blocks

    def to_dict(self) -> dict[str, Any]:
        return {"method": "laco", **self.options, "blocks": self.blocks}

    def check(self, model: nn.Module, example_inputs: ExampleInputs | None) -> None:
        blocks, stack = block_stack(model, self.blocks)
        _check_laco(stack, blocks, target=None, **self.options)

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
        blocks, stack = block_stack(model, self.blocks)
        due = max(blocks_due(amount, dense, len(stack)), 0)
        if due >= len(stack):
            raise PruningError(f"cannot remove {due} of the {len(stack)} blocks of `{blocks}`: at least one must stay.")
        if due == 0:
            return prune_layers(model, example_inputs, count=0, blocks=blocks, dense=dense)
        batches = batches_from(statistics, "structure='laco'")
        return _collapse_and_drop(model, blocks, batches, example_inputs, optimizers, dense, target=len(stack) - due,
                                  **self.options)  # fmt: skip


METHODS.register("laco", LayerCollapse)
