"""In-place surgery: slice a model's tensors by cuts, let each layer follow, remove blocks, and undo.

Parameters stay the same ``nn.Parameter`` objects (only ``.data`` changes), and gradients and optimizer
state are sliced alike (:func:`lightning_prune.slicing.slice_tensor`), so an optimizer keeps working and
keeps its state. Layer attributes are then derived from the new shapes by the fixups of
:mod:`lightning_prune.fixups`. Nothing here knows how the cuts were chosen.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from lightning_prune.cuts import Cut, Drop, Step, check_cuts
from lightning_prune.fixups import DROP_FIXUPS, apply_rewrites, fixup_for
from lightning_prune.running import named_tensors, tensor_owners
from lightning_prune.slicing import slice_tensor, unslice_tensor


def apply_drops(model: nn.Module, drops: Sequence[Drop], optimizers: Iterable[torch.optim.Optimizer] = ()) -> None:
    """Remove blocks from block stacks in place; their parameters leave the optimizers too."""
    optimizers = list(optimizers)
    for drop in drops:
        container = model.get_submodule(drop.module)
        entries = list(container)
        gone = {id(p) for i, block in enumerate(entries) if i not in drop.keep for p in block.parameters()}
        kept = [entries[i] for i in drop.keep]
        replacement = nn.Sequential(*kept) if isinstance(container, nn.Sequential) else nn.ModuleList(kept)
        parent, _, leaf = drop.module.rpartition(".")
        setattr(model.get_submodule(parent), leaf, replacement)
        for index, block in enumerate(kept):
            for module in block.modules():
                if isinstance(getattr(module, "layer_idx", None), int):
                    module.layer_idx = index
        for optimizer in optimizers:
            for group in optimizer.param_groups:
                group["params"] = [p for p in group["params"] if id(p) not in gone]
            for parameter in [p for p in optimizer.state if id(p) in gone]:
                del optimizer.state[parameter]
        for fixup in DROP_FIXUPS.values():
            fixup(model, drop)


def apply_step(model: nn.Module, step: Step, optimizers: Iterable[torch.optim.Optimizer] = ()) -> None:
    optimizers = list(optimizers)
    if step.cuts:
        apply_cuts(model, step.cuts, optimizers)
    apply_drops(model, step.drops, optimizers)
    apply_rewrites(model, step.rewrites)


@dataclass
class Undo:
    """Everything needed to put a model (and its optimizers) back as they were before surgery.

    Only what the cuts removed is kept (see :func:`slice_tensor`), never a full copy of a tensor: undoing
    rebuilds each tensor from its smaller self and its removed entries.
    """

    tensors: list[tuple[Tensor, list[Cut], list[Tensor], list[Tensor] | None]] = field(default_factory=list)
    states: list[tuple[dict, str, list[Cut], list[Tensor]]] = field(default_factory=list)
    attributes: list[tuple[nn.Module, dict]] = field(default_factory=list)
    replaced: list[tuple[nn.Module, str, nn.Module]] = field(default_factory=list)

    def __call__(self) -> None:
        for parent, name, module in self.replaced:
            setattr(parent, name, module)
        with torch.no_grad():
            for tensor, cuts, removed, removed_grad in self.tensors:
                tensor.data = unslice_tensor(tensor.data, cuts, removed)
                if removed_grad is not None:
                    tensor.grad = unslice_tensor(tensor.grad, cuts, removed_grad)
            for state, key, cuts, removed in self.states:
                state[key] = unslice_tensor(state[key], cuts, removed)
        for module, attributes in self.attributes:
            module.__dict__.update(attributes)
        for module, _ in self.attributes:  # what lives outside the modules (a shared config) follows the shapes back
            fixup = fixup_for(module)
            if fixup is not None:
                fixup(module)


def _touched_modules(model: nn.Module, tensors: Iterable[str]) -> dict[int, nn.Module]:
    """Modules owning the cut tensors, and their ancestors (an attention layer keeps a head count)."""
    owners = tensor_owners(model)
    found: dict[int, tuple[int, nn.Module]] = {}
    for name in tensors:
        for path in owners.get(name, []):
            parts = path.split(".") if path else []
            for depth in range(len(parts), -1, -1):
                module = model.get_submodule(".".join(parts[:depth]))
                found.setdefault(id(module), (depth, module))
    ordered = sorted(found.items(), key=lambda item: -item[1][0])  # deepest first
    return {key: module for key, (_, module) in ordered}


def apply_cuts(
    model: nn.Module,
    cuts: Sequence[Cut],
    optimizers: Iterable[torch.optim.Optimizer] = (),
    *,
    undoable: bool = False,
) -> Undo | None:
    """Slice the model's tensors (and optimizer state, gradients) in place; update layer attributes.

    All cuts are validated before anything changes. With ``undoable`` an :class:`Undo` is returned; it
    holds the removed entries only, so each old tensor is freed as soon as its smaller self exists.
    """
    check_cuts(model, [cuts], "cuts")
    tensors = named_tensors(model)
    optimizers = list(optimizers)
    undo = Undo() if undoable else None
    by_tensor: dict[str, list[Cut]] = defaultdict(list)
    for cut in cuts:
        by_tensor[cut.tensor].append(cut)
    modules = _touched_modules(model, by_tensor)
    if undo is not None:
        undo.attributes = [(m, {k: v for k, v in vars(m).items() if not k.startswith("_")}) for m in modules.values()]
    with torch.no_grad():
        for name, tensor_cuts in by_tensor.items():
            tensor = tensors[name]
            old_shape = tensor.shape
            for optimizer in optimizers:
                state = optimizer.state.get(tensor)
                for key, value in (state or {}).items():
                    if isinstance(value, Tensor) and value.shape == old_shape and value.ndim > 0:
                        removed = [] if undo is not None else None
                        state[key] = slice_tensor(value, tensor_cuts, removed)
                        if undo is not None:
                            undo.states.append((state, key, tensor_cuts, removed))
            grad = tensor.grad
            removed = [] if undo is not None else None
            removed_grad = [] if undo is not None and grad is not None else None
            tensor.data = slice_tensor(tensor.data, tensor_cuts, removed)
            if grad is not None:
                tensor.grad = slice_tensor(grad, tensor_cuts, removed_grad)
            if undo is not None:
                undo.tensors.append((tensor, tensor_cuts, removed, removed_grad))
    owners = tensor_owners(model)
    for cut in cuts:  # a grouped convolution that lost whole groups has fewer of them (its fixup reads this)
        if cut.kept_groups < cut.groups:
            for path in owners.get(cut.tensor, []):
                model.get_submodule(path).groups = cut.kept_groups
    for module in modules.values():  # children before the layers that contain them
        fixup = fixup_for(module)
        replacement = fixup(module) if fixup is not None else None
        if replacement is not None:
            replaced = _replace_module(model, module, replacement)
            if undo is not None:
                undo.replaced.extend(replaced)
    return undo


def _replace_module(model: nn.Module, old: nn.Module, new: nn.Module) -> list[tuple[nn.Module, str, nn.Module]]:
    """Put ``new`` wherever ``old`` sits in ``model``; returns (parent, attribute, old) for undoing."""
    replaced = []
    for parent in model.modules():
        for name, child in list(parent.named_children()):
            if child is old:
                setattr(parent, name, new)
                replaced.append((parent, name, old))
    return replaced
