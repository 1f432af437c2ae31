"""LLM-Pruner (Ma et al., NeurIPS 2023): coupled structures of a language model scored by a Taylor expansion of
the loss in their parameters, on a few calibration windows.

The engine already finds LLM-Pruner's groups: a key/value head with its query heads (q/k/v rows and
o_proj columns), an FFN neuron (gate/up rows and the down_proj column), and — channel-wise — a direction
of the hidden stream. What this module adds is the paper's importance and recipe:

- per parameter entry, the estimated loss change of removing it: first order ``W·∇W``; second order
  ``½·W·H·W`` with the diagonal empirical Fisher ``H = Σ_n (∂L_n/∂W)²`` as Hessian; their mix
  ``W·∇W − ½·W·H·W``;
- per layer and channel, *vector-wise* ``|Σ W·∇W|`` over the channel's weights, or *element-wise* the sum of
  the entries' absolute values (``"elementwise"``, ``"second"``, ``"mix"``);
- over a group, ``aggregate``: ``"sum"`` (the paper's default), ``"mean"``, ``"max"``, ``"prod"``, ``"last"``;
- calibration: ``count`` windows of ``length`` tokens (the paper: 10 × 64), one window per backward pass so
  that ``H`` is per example; a uniform ratio per layer; layers outside ``[first, last)`` left whole (the paper
  keeps 4 first and 2 last of Llama-7B's 32 in its block-wise mode, which also leaves the stream whole).

Registered criteria: ``"taylor_vectorwise"``, ``"taylor_elementwise"``, ``"taylor_second"``, ``"taylor_mix"``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lightning_prune.api import PruningResult, prune
from lightning_prune.budget import DenseSize
from lightning_prune.depth import find_blocks
from lightning_prune.errors import PruningError
from lightning_prune.graph.groups import DependencyGraph, Group, match_modules
from lightning_prune.importance import AGGREGATES, CRITERIA, ScoringContext, aggregate_members
from lightning_prune.language import check_windows
from lightning_prune.methods.base import METHODS
from lightning_prune.running import ExampleInputs
from lightning_prune.selection import SelectionOptions
from lightning_prune.slicing import index_rows
from lightning_prune.statistics import Statistics, collect_parameter_gradients

VARIANTS = ("vectorwise", "elementwise", "second", "mix")


@dataclass
class ParameterTaylor:
    """LLM-Pruner's importance of each group element from accumulated parameter gradients (see the module doc)."""

    variant: str = "vectorwise"
    aggregate: str = "sum"
    needs_gradients: bool = True

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise PruningError(f"`variant` must be one of {', '.join(VARIANTS)}; got {self.variant!r}.")
        if self.aggregate not in AGGREGATES:
            raise PruningError(f"`aggregate` must be one of {', '.join(AGGREGATES)}; got {self.aggregate!r}.")

    def collect(self, model: nn.Module, graph: DependencyGraph, batches: Iterable[Any], loss_fn: Any) -> Statistics:
        """Parameter gradients over ``batches``; for the second-order variants one window per backward pass, so
        that the squared gradients are the per-example diagonal Fisher whatever the batch size."""
        second = self.variant in ("second", "mix")
        return collect_parameter_gradients(
            model, one_per_batch(batches) if second else batches, loss_fn, squares=second
        )

    def salience(self, weight: Tensor, grad: Tensor, grad_squared: Tensor | None) -> Tensor:
        """Estimated loss change per parameter entry (signed for first order; a magnitude for second order)."""
        weight, grad = weight.detach().double(), grad.double()
        if self.variant in ("vectorwise", "elementwise"):
            return weight * grad
        curvature = weight * grad_squared.double() * weight
        return 0.5 * curvature if self.variant == "second" else weight * grad - 0.5 * curvature

    def __call__(self, group: Group, context: ScoringContext) -> Tensor | None:
        gradients = context.statistics.get("parameters")
        if not gradients:
            raise PruningError(
                f"`importance='taylor_{self.variant}'` needs parameter gradients from calibration batches: pass "
                "`batches` and `loss_fn` to `prune`, or `calibration_batches` to StructuredPruning."
            )
        values = []
        for member in group.members:
            name = member.slot.tensor
            if name not in gradients["grad"]:
                continue  # a buffer, or a frozen parameter
            salience = self.salience(context.tensor(name), gradients["grad"][name], gradients["grad_squared"].get(name))
            values.append((member, self._per_channel(salience, member.slot.dim, member.slot.groups)))
        return aggregate_members(group, values, self.aggregate) if values else None

    def _per_channel(self, salience: Tensor, dim: int, groups: int) -> Tensor:
        """One value per index of ``dim``: vector-wise the magnitude of the sum, else the sum of magnitudes.

        With ``groups`` > 1 each block of rows reads indices of its own (a grouped convolution's inputs, each
        expert's neurons): see :func:`~lightning_prune.slicing.index_rows`.
        """
        rows = index_rows(salience, dim, groups)
        return rows.sum(1).abs() if self.variant == "vectorwise" else rows.abs().sum(1)


for _variant in VARIANTS:
    CRITERIA.register(
        f"taylor_{_variant}", lambda aggregate="sum", _variant=_variant, **_: ParameterTaylor(_variant, aggregate)
    )


def causal_lm_loss(model: nn.Module, batch: Tensor) -> Tensor:
    """Next-token loss of a Hugging Face causal LM on a ``(batch, tokens)`` window batch."""
    return model(input_ids=batch, labels=batch, use_cache=False).loss


def one_per_batch(batches: Iterable[Any]) -> Iterator[Any]:
    """Every example of ``batches`` (tensors, or mappings of tensors with a common first dimension) on its own."""
    for batch in batches:
        if isinstance(batch, Tensor):
            yield from batch.split(1)
            continue
        rows = (
            {v.shape[0] for v in batch.values() if isinstance(v, Tensor) and v.ndim}
            if isinstance(batch, Mapping)
            else set()
        )
        if len(rows) != 1:
            yield batch  # not a batch of rows we can tell apart: as it is
            continue
        count = rows.pop()
        for index in range(count):
            yield {k: v[index : index + 1] if isinstance(v, Tensor) and v.ndim else v for k, v in batch.items()}


def embedding_paths(model: nn.Module) -> list[str]:
    """Module paths of the token embeddings (a Hugging Face model's input embeddings, or every ``nn.Embedding``),
    anywhere inside ``model``: left whole, they keep the hidden stream whole."""
    inner = next((m for m in model.modules() if callable(getattr(m, "get_input_embeddings", None))), None)
    embeddings = inner.get_input_embeddings() if inner is not None else None
    return [
        name
        for name, module in model.named_modules()
        if module is embeddings or (embeddings is None and isinstance(module, nn.Embedding))
    ]


def left_whole(model: nn.Module, first: int, last: int | None, stream: bool, ignore: Sequence[str]) -> list[str]:
    """What a block-wise LLM method leaves whole: ``ignore``, the blocks outside ``[first, last)`` and, unless
    ``stream``, the embeddings (so the hidden size stays)."""
    return [*ignore, *layers_left_whole(model, first, last), *([] if stream else embedding_paths(model))]


def layers_left_whole(model: nn.Module, first: int, last: int | None, blocks: str | None = None) -> list[str]:
    """Module paths of the blocks outside ``[first, last)`` of the model's block stack (``last`` None: the end)."""
    if first == 0 and last is None:
        return []
    blocks = blocks or find_blocks(model)
    size = len(model.get_submodule(blocks))
    end = size if last is None else last if last >= 0 else size + last
    if not 0 <= first < end <= size:
        raise PruningError(
            f"the layers to prune, [{first}, {last}), must be a non-empty range of the {size} blocks of `{blocks}`."
        )
    return [f"{blocks}.{index}" for index in range(size) if not first <= index < end]


def llm_pruner(
    model: nn.Module,
    calibration: Tensor,
    amount: float,
    *,
    variant: str = "vectorwise",
    aggregate: str = "sum",
    target: str = "channels",
    first: int = 0,
    last: int | None = None,
    stream: bool = False,
    round_to: int = 1,
    ignore: Sequence[str] = (),
    optimizers: Iterable[torch.optim.Optimizer] = (),
) -> PruningResult:
    """Prune a Hugging Face causal LM in place with LLM-Pruner's recipe.

    Args:
        model: an ``AutoModelForCausalLM`` (its forward takes ``input_ids`` and ``labels``).
        calibration: ``(count, tokens)`` token ids; each window is one backward pass (the paper: 10 × 64).
        amount: the fraction of every prunable group's elements removed (uniform per layer: ``scope="local"``).
        variant: ``"vectorwise"``, ``"elementwise"``, ``"second"`` or ``"mix"`` (see the module doc).
        aggregate: how a group's per-layer importances combine.
        target: what ``amount`` is a fraction of: ``"channels"`` (elements of every group), ``"params"`` or ``"macs"``
            of the model (then the same fraction of every group is bisected until the model is that small).
        first, last: only blocks ``first .. last-1`` of the block stack are pruned (``last`` may be negative).
        stream: also remove directions of the hidden stream (the paper's channel-wise mode); by default only
            heads and FFN neurons go (block-wise), so the hidden size stays.
        round_to, ignore, optimizers: as in :func:`lightning_prune.prune`.

    Raises:
        PruningError: bad arguments, calibration that is not ``(count, tokens ≥ 2)`` token ids, or a range of
            layers outside the model; the model is unchanged.
    """
    if not isinstance(calibration, Tensor) or calibration.ndim != 2 or calibration.shape[1] < 2:
        shape = tuple(calibration.shape) if isinstance(calibration, Tensor) else type(calibration).__name__
        raise PruningError(f"`calibration` must be (count, tokens ≥ 2) token ids, got {shape}.")
    try:
        check_windows(model, calibration, "calibration")
    except ValueError as error:
        raise PruningError(str(error)) from error
    criterion = ParameterTaylor(variant, aggregate)
    left = left_whole(model, first, last, stream, ignore)
    example = {"input_ids": calibration[:1], "use_cache": False}  # cached keys and values would be outputs
    return prune(
        model,
        example,
        amount,
        criterion,
        target=target,
        scope="local",
        round_to=round_to,
        ignore=left,
        batches=list(calibration.split(1)),
        loss_fn=causal_lm_loss,
        optimizers=optimizers,
    )


class LLMPruner:
    """LLM-Pruner as a step of a schedule: ``StructuredPruning(structure="llm_pruner", importance="taylor_mix",
    calibration_batches=10, options={"first": 1, "last": -1})``.

    A uniform ratio per layer (``scope="local"``, as the paper), the Taylor variant named by ``importance``,
    gradients from ``calibration_batches`` of the trainer's training data (the module's own training loss).

    Args:
        importance: ``"taylor_vectorwise"``, ``"taylor_elementwise"``, ``"taylor_second"`` or ``"taylor_mix"``.
        aggregate, target, selection, ignore, verify: as in :class:`~lightning_prune.methods.channels.ChannelPruning`
            (``selection.scope`` is ignored: always local).
        first, last, stream: as in :func:`llm_pruner`.
    """

    needs_gradients = True

    def __init__(
        self,
        importance: str = "taylor_vectorwise",
        aggregate: str = "sum",
        target: str = "channels",
        selection: SelectionOptions | None = None,
        ignore: Sequence[str] = (),
        first: int = 0,
        last: int | None = None,
        stream: bool = False,
        verify: bool = True,
    ) -> None:
        variant = importance.removeprefix("taylor_") if isinstance(importance, str) else None
        if variant not in VARIANTS or not importance.startswith("taylor_"):
            names = ", ".join(f"taylor_{v}" for v in VARIANTS)
            raise PruningError(f"`importance` for structure='llm_pruner' must be one of {names}; got {importance!r}.")
        if isinstance(ignore, str):
            raise PruningError(f"`ignore` is a list of module names or glob patterns; got the string {ignore!r}.")
        self.criterion = ParameterTaylor(variant, aggregate)
        self.collect = self.criterion.collect
        self.importance, self.target, self.selection = importance, target, selection or SelectionOptions()
        self.ignore, self.first, self.last, self.stream, self.verify = list(ignore), first, last, stream, verify

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": "llm_pruner", "importance": self.importance, "aggregate": self.criterion.aggregate,
            "target": self.target, "round_to": self.selection.round_to, "max_fraction": self.selection.max_fraction,
            "ignore": self.ignore, "first": self.first, "last": self.last, "stream": self.stream,
        }  # fmt: skip

    def left(self, model: nn.Module) -> list[str]:
        return left_whole(model, self.first, self.last, self.stream, self.ignore)

    def check(self, model: nn.Module, example_inputs: ExampleInputs | None) -> None:
        match_modules(model, self.ignore)
        self.left(model)  # the range of layers fits the model

    def step(
        self,
        model: nn.Module,
        example_inputs: ExampleInputs,
        amount: float,
        dense: DenseSize | None,
        *,
        optimizers: Iterable[torch.optim.Optimizer] = (),
        statistics: Mapping[str, Any] | None = None,
    ) -> PruningResult:
        return prune(
            model, example_inputs, amount, self.criterion, target=self.target, dense=dense, scope="local",
            round_to=self.selection.round_to, max_fraction=self.selection.max_fraction, ignore=self.left(model),
            statistics=statistics, optimizers=optimizers, verify=self.verify,
        )  # fmt: skip


METHODS.register("llm_pruner", LLMPruner)
