"""Check that a pruned model still moves channels exactly as the plan promised.

The pruned model is traced again with every surviving channel labelled by its id in the dense model.
Every layer must then read the same channels, in the same order, as it read in the dense model minus
the removed ones, and no op may combine channels the dense model kept apart. Any difference means
some op behaves differently at the smaller size (a hard-coded split, a stale attribute): the caller
rolls the surgery back instead of returning a model that runs and computes something else.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import Tensor, nn

from lightning_prune.cuts import Cut
from lightning_prune.errors import VerificationError
from lightning_prune.graph.builder import Trace
from lightning_prune.graph.groups import DependencyGraph
from lightning_prune.graph.tracer import trace_model
from lightning_prune.running import ExampleInputs
from lightning_prune.slicing import slice_tensor


def _owner_of(graph: DependencyGraph, element: int) -> tuple[str, str | None]:
    """A description of ``element`` and the name of the tensor it belongs to."""
    for (name, dim), ids in graph.trace.spaces.items():
        if ids.numel() and int(ids[0]) <= element <= int(ids[-1]):
            return f"channel {element - int(ids[0])} of `{name}` (dim {dim})", name
    for name, ids in graph.trace.raw.items():
        flat = ids.reshape(-1)
        if flat.numel() and int(flat[0]) <= element <= int(flat[-1]):
            return f"entry {element - int(flat[0])} of `{name}`", name
    return f"element {element}", None


def verify_pruned(
    model: nn.Module,
    example_inputs: ExampleInputs,
    graph: DependencyGraph,
    cuts: Sequence[Cut],
    modes: Iterable[str] = ("train", "eval"),
    fixed_splits: Iterable[str] = (),
) -> Trace:
    """Raise :class:`VerificationError` if ``model`` (already cut by ``cuts``) deviates from the plan.

    Returns the trace of the pruned model (its ``macs`` were counted on the way). ``fixed_splits`` as the
    dense model was traced with.
    """
    trace, root = graph.trace, graph.root
    by_key = {(cut.tensor, cut.dim): cut for cut in cuts}
    space_init: dict[str | tuple[str, int], Tensor] = {}
    for key, ids in trace.spaces.items():
        cut = by_key.get(key)
        space_init[key] = ids[torch.tensor(cut.keep)] if cut else ids
    for name, ids in trace.raw.items():
        if name in trace.computed_weights:  # a layer's weight: its entries are not elements of their own
            continue
        tensor_cuts = [cut for cut in cuts if cut.tensor == name]
        space_init[name] = slice_tensor(ids, tensor_cuts) if tensor_cuts else ids
    retrace = trace_model(
        model, example_inputs, modes, space_init, num_elements=trace.num_elements, fixed_splits=fixed_splits
    )

    for reason, module in retrace.freeze_sites:
        if (reason, module) not in trace.freeze_sites:
            raise VerificationError(f"after pruning, {reason} in `{module}`, which it did not before.", module=module)

    for a, b in retrace.edges:
        known = (a < trace.num_elements) & (b < trace.num_elements)
        a, b = a[known], b[known]
        wrong = torch.nonzero(root[a] != root[b]).reshape(-1)
        if wrong.numel():
            first = int(wrong[0])
            (left, tensor), (right, _) = _owner_of(graph, int(a[first])), _owner_of(graph, int(b[first]))
            raise VerificationError(
                f"after pruning, {left} is combined with {right}, which the dense model kept apart: some op "
                "computes differently at the smaller width.",
                module=tensor.rpartition(".")[0] if tensor else None,
            )
    for key, found in retrace.slots.items():
        original = trace.slots.get(key)
        cut = by_key.get(key)
        if original is None:
            raise VerificationError(
                f"after pruning, `{key[0]}` (dim {key[1]}) reads channels it did not read before.",
                module=min(found.modules, default=None),
            )
        expected = root[original.labels]
        if cut is not None:
            expected = expected[torch.tensor(cut.keep)]
        actual = root[found.labels.clamp(max=trace.num_elements - 1)]
        if actual.shape != expected.shape or not torch.equal(actual, expected):
            modules = ", ".join(f"`{m}`" for m in sorted(found.modules))
            raise VerificationError(
                f"after pruning, {modules} reads different channels through `{key[0]}` (dim {key[1]}) than the "
                "plan promised.",
                module=min(found.modules, default=None),
            )
    return retrace
