"""SliceGPT as a scheduled step: ``StructuredPruning(amount, structure="slicegpt", calibration_batches=n)``.

The step slices the residual stream of the Hugging Face decoder inside the module (a ``CausalLM``'s ``.model``)
on ``n`` training batches. Its record replays on a freshly built dense module: cuts to the sliced shapes (every
tensor on the stream keeps its first ``k`` entries, which the rotated weights of the state dict then fill), and a
``"slicegpt"`` rewrite for what shapes cannot say (the untied head, the norms' ε, the shortcut matrices of
``per_layer=True``; for OPT, GPT-2 and Phi the scale-free norms over the dense width and the biases folding
added). Every weight on the stream is rotated, so the optimizers forget their state (moments in the
old basis mean nothing in the new one); new parameters (an untied head, shortcuts) make the callback build its
optimizers again.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lightning_prune.api import LayerChange
from lightning_prune.budget import DenseSize
from lightning_prune.cuts import Cut, Step
from lightning_prune.errors import PruningError
from lightning_prune.measure import count_macs, count_params
from lightning_prune.methods.base import METHODS
from lightning_prune.methods.decoder_families import DECODERS
from lightning_prune.methods.depth_methods import batches_from, collect_batches
from lightning_prune.methods.slicegpt import check_model, check_options, kept_width, rewrite_of, slice_to
from lightning_prune.record import new_record
from lightning_prune.running import ExampleInputs, named_tensors


def find_decoder(model: nn.Module) -> tuple[str, nn.Module]:
    """The path and module of the first decoder of a family SliceGPT knows inside ``model`` (``""``: the model)."""
    for name, module in model.named_modules():
        if getattr(getattr(module, "config", None), "model_type", None) in DECODERS:
            return name, module
    raise PruningError(
        f"structure='slicegpt' needs a Hugging Face decoder of a known family inside {type(model).__name__} "
        f"(model_type one of {sorted(DECODERS)}); found none."
    )


@dataclass
class SliceStepResult:
    """What one scheduled SliceGPT step did; ``record`` replays it (:func:`lightning_prune.restore`)."""

    record: dict[str, Any]
    module: str  # the embeddings, whose width is the stream's
    hidden_before: int
    hidden_after: int
    params_before: int
    params_after: int
    macs_before: int
    macs_after: int
    dense: DenseSize
    kept_variance: float

    @property
    def layers(self) -> list[LayerChange]:
        changed = self.hidden_after != self.hidden_before
        return [LayerChange(self.module, "hidden", self.hidden_before, self.hidden_after)] if changed else []


def _calibration_inputs(batches: Iterable[Any]) -> list[dict[str, Any]]:
    inputs = []
    for batch in batches:
        ids = batch.get("input_ids") if isinstance(batch, Mapping) else batch
        if not isinstance(ids, torch.Tensor) or ids.ndim != 2:
            raise PruningError(
                "structure='slicegpt' calibrates on token ids: each training batch must be a (batch, tokens) tensor or "
                f"a mapping with `input_ids`; got {type(batch).__name__}."
            )
        inputs.append({"input_ids": ids, "use_cache": False})
    return inputs


class StreamSlicing:
    """SliceGPT (:func:`lightning_prune.slicegpt`) as a step: ``amount`` is the fraction of the dense stream's
    dimensions removed (cumulative; a later single-basis step slices the sliced stream further).

    Args:
        per_layer: a basis per position of the stream, with shortcut matrices (at most one such step).
        round_to, damping: as in :func:`lightning_prune.slicegpt`.
    """

    needs_gradients = True  # statistics of calibration batches, of its own kind (``collect``): the batches
    collect = staticmethod(collect_batches)

    def __init__(self, per_layer: bool = False, round_to: int = 8, damping: float = 0.01) -> None:
        check_options(round_to, damping)
        if not isinstance(per_layer, bool):
            raise PruningError(f"`per_layer` must be True or False; got {per_layer!r}.")
        self.per_layer, self.round_to, self.damping = per_layer, round_to, damping

    def to_dict(self) -> dict[str, Any]:
        return {"method": "slicegpt", "per_layer": self.per_layer, "round_to": self.round_to, "damping": self.damping}

    def check(self, model: nn.Module, example_inputs: ExampleInputs | None) -> None:
        check_model(find_decoder(model)[1])

    def step(
        self,
        model: nn.Module,
        example_inputs: ExampleInputs,
        amount: float,
        dense: DenseSize | None,
        *,
        optimizers: Iterable[torch.optim.Optimizer] = (),
        statistics: Mapping[str, Any] | None = None,
    ) -> SliceStepResult:
        prefix, decoder = find_decoder(model)
        layout = check_model(decoder)
        embeddings = f"{prefix}.{layout.embeddings}" if prefix else layout.embeddings
        width = decoder.get_submodule(layout.embeddings).weight.shape[1]
        params, macs = count_params(model), count_macs(model, example_inputs)
        dense = dense or DenseSize(params, macs, width)
        kept = min(width, kept_width(dense.units, amount, self.round_to))
        if kept >= width:
            return SliceStepResult(new_record(), embeddings, width, width, params, params, macs, macs, dense, 1.0)
        batches = _calibration_inputs(batches_from(statistics, "structure='slicegpt'"))
        shapes = {name: tuple(tensor.shape) for name, tensor in named_tensors(model).items()}
        options = {"amount": amount, "round_to": self.round_to, "damping": self.damping, "per_layer": self.per_layer}
        result = slice_to(decoder, batches, kept, **options)
        after = named_tensors(model)
        cuts = [
            Cut(name, dim, before, list(range(now)))
            for name, shape in shapes.items()
            if name in after and tuple(after[name].shape) != shape
            for dim, (before, now) in enumerate(zip(shape, after[name].shape, strict=True))
            if before != now
        ]
        self._forget(model, optimizers)
        record = new_record([Step(cuts, [], [rewrite_of(decoder, prefix)])])
        return SliceStepResult(
            record, embeddings, width, kept, params, count_params(model), macs, count_macs(model, example_inputs),
            dense.after(width - kept), result.kept_variance,
        )  # fmt: skip

    @staticmethod
    def _forget(model: nn.Module, optimizers: Iterable[torch.optim.Optimizer]) -> None:
        """Rotated weights start afresh: no gradient, no optimizer state from the old basis."""
        for parameter in model.parameters():
            parameter.grad = None
            for optimizer in optimizers:
                optimizer.state.pop(parameter, None)


METHODS.register("slicegpt", StreamSlicing)
