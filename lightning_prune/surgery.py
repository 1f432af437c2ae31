"""In-place surgery: shrink tensors along dimensions, then let each layer type update its attributes.

Slicing is generic: a :class:`Cut` keeps some indices of one dimension of one parameter or buffer,
and the same function slices the parameter, its gradient and every optimizer state tensor shaped
like it (momentum, Adam moments), so an optimizer keeps working and keeps its state. Parameters stay
the same ``nn.Parameter`` objects (only ``.data`` changes). Layer attributes (``in_channels``,
``num_features``, ``normalized_shape`` ...) are then derived from the new shapes by a registry keyed by
module type, which users extend with :func:`register_layer`.
"""

from __future__ import annotations

import itertools
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from lightning_prune.errors import RecordError, shown
from lightning_prune.graph.groups import DependencyGraph, tensor_owners
from lightning_prune.selection import Plan, groups_by_index


@dataclass
class Cut:
    """Keep indices ``keep`` (sorted) of dimension ``dim`` of tensor ``tensor``, which had ``size`` entries.

    For the inputs of a grouped convolution (``groups`` > 1) ``size`` and ``keep`` refer to the
    layer's input channels; every convolution group keeps the same number of them.
    """

    tensor: str
    dim: int
    size: int
    keep: list[int]
    groups: int = 1

    def to_dict(self) -> dict:
        keep = list(self.keep)
        return {"tensor": self.tensor, "dim": self.dim, "size": self.size, "keep": keep, "groups": self.groups}

    @classmethod
    def from_dict(cls, data: dict, where: str = "record") -> Cut:
        if not isinstance(data, dict) or set(data) - {"tensor", "dim", "size", "keep", "groups"}:
            raise RecordError(
                f"{where}: a cut must be a dict with keys tensor, dim, size, keep[, groups]; got {shown(data)}"
            )
        tensor, dim, size, keep, groups = (data.get(k) for k in ("tensor", "dim", "size", "keep", "groups"))
        groups = 1 if groups is None else groups
        if not isinstance(tensor, str):
            raise RecordError(f"{where}: `tensor` must be a string, got {shown(tensor)}")
        for key, value in (("dim", dim), ("size", size), ("groups", groups)):
            if isinstance(value, bool) or not isinstance(value, int) or value < (0 if key == "dim" else 1):
                raise RecordError(
                    f"{where}: `{key}` of cut on `{tensor}` must be a non-negative integer, got {shown(value)}"
                )
        if not isinstance(keep, list) or any(isinstance(i, bool) or not isinstance(i, int) for i in keep):
            raise RecordError(f"{where}: `keep` of cut on `{tensor}` must be a list of integers.")
        return cls(tensor, dim, size, keep, groups)


def _increasing_below(keep: Sequence[int], size: int) -> bool:
    """Non-empty, strictly increasing, in [0, size); compared as Python integers, which cannot overflow."""
    return bool(keep) and keep[0] >= 0 and keep[-1] < size and all(a < b for a, b in itertools.pairwise(keep))


def _validate_cut(cut: Cut, shape: Sequence[int], where: str) -> None:
    if cut.dim >= len(shape):
        raise RecordError(f"{where}: `{cut.tensor}` has {len(shape)} dimensions, the record cuts dimension {cut.dim}.")
    actual = shape[cut.dim] * cut.groups
    if actual != cut.size:
        raise RecordError(
            f"{where}: `{cut.tensor}` has {actual} entries along dimension {cut.dim}, the record expects {cut.size}. "
            "The record was made for another architecture or width; apply it to a freshly built dense model."
        )
    if not cut.keep or len(cut.keep) > cut.size:
        raise RecordError(
            f"{where}: cut on `{cut.tensor}` keeps {len(cut.keep)} of {cut.size} entries; must keep 1..size."
        )
    if not _increasing_below(cut.keep, cut.size):
        raise RecordError(
            f"{where}: `keep` of cut on `{cut.tensor}` must be strictly increasing indices in [0, {cut.size})."
        )
    if cut.groups > 1 and (cut.dim != 1 or shape[0] % cut.groups):
        raise RecordError(
            f"{where}: a grouped cut (groups={cut.groups}) takes the inputs of a grouped convolution: dimension 1 of "
            f"a weight whose rows split into the groups; `{cut.tensor}` has shape {list(shape)}, the record cuts "
            f"dimension {cut.dim}."
        )
    keep = torch.tensor(cut.keep)
    if cut.groups > 1:
        if cut.size % cut.groups:
            raise RecordError(
                f"{where}: {cut.size} input channels of `{cut.tensor}` do not split into {cut.groups} groups."
            )
        per_group = torch.bincount(keep // (cut.size // cut.groups), minlength=cut.groups)
        if per_group.unique().numel() != 1:
            raise RecordError(f"{where}: grouped cut on `{cut.tensor}` keeps unequal channel counts per group.")


def _group_index(cut: Cut, positions: Tensor, shape: Sequence[int]) -> Tensor:
    """``gather``/``scatter`` index along dim 1 of a grouped convolution's weight: each group of rows reads its
    own inputs (``positions`` count input channels of the whole layer)."""
    per_group = cut.size // cut.groups
    local = (positions % per_group).view(cut.groups, -1)
    rows = torch.arange(shape[0], device=positions.device) // (shape[0] // cut.groups)
    return local[rows].view(shape[0], -1, *([1] * (len(shape) - 2))).expand(-1, -1, *shape[2:])


def _take(tensor: Tensor, cut: Cut, positions: Tensor) -> Tensor:
    if cut.groups == 1:
        return tensor.index_select(cut.dim, positions)
    return tensor.gather(1, _group_index(cut, positions, tensor.shape))


def _put(target: Tensor, cut: Cut, positions: Tensor, values: Tensor) -> None:
    if cut.groups == 1:
        target.index_copy_(cut.dim, positions, values)
    else:
        target.scatter_(1, _group_index(cut, positions, target.shape), values)


def _kept_indices(cut: Cut, device: torch.device) -> Tensor:
    return torch.tensor(cut.keep, dtype=torch.long, device=device)


def _removed_indices(cut: Cut, device: torch.device) -> Tensor:
    gone = torch.ones(cut.size, dtype=torch.bool)
    gone[cut.keep] = False
    return torch.nonzero(gone).reshape(-1).to(device)


def _in_order(cuts: Sequence[Cut]) -> list[Cut]:
    return sorted(cuts, key=lambda c: c.groups == 1)  # grouped-input cuts first, on the original row layout


def slice_tensor(tensor: Tensor, cuts: Sequence[Cut], removed: list[Tensor] | None = None) -> Tensor:
    """``tensor`` with the cuts applied.

    With ``removed``, the entries each cut takes away are appended to it: with the result, they are all
    :func:`unslice_tensor` needs to rebuild ``tensor`` (a fraction of a full copy).
    """
    for cut in _in_order(cuts):
        if removed is not None:
            removed.append(_take(tensor, cut, _removed_indices(cut, tensor.device)))
        tensor = _take(tensor, cut, _kept_indices(cut, tensor.device))
    return tensor.contiguous()


def unslice_tensor(tensor: Tensor, cuts: Sequence[Cut], removed: Sequence[Tensor]) -> Tensor:
    """The tensor that :func:`slice_tensor` turned into ``tensor``, removing ``removed``."""
    for cut, gone in zip(reversed(_in_order(cuts)), reversed(removed), strict=True):
        shape = list(tensor.shape)
        shape[cut.dim] += gone.shape[cut.dim]
        whole = tensor.new_empty(shape)
        _put(whole, cut, _kept_indices(cut, tensor.device), tensor)
        _put(whole, cut, _removed_indices(cut, tensor.device), gone)
        tensor = whole
    return tensor


# --- layer attribute updates ---------------------------------------------------------------------
LayerFixup = Callable[[nn.Module], "nn.Module | None"]
LAYERS: dict[type, LayerFixup] = {}


def register_layer(module_type: type, fixup: LayerFixup, *, replace: bool = False) -> None:
    """Tell the engine how ``module_type`` updates its attributes after its tensors were sliced.

    ``fixup(module)`` is called once after surgery with the module's tensors already resized; it
    sets attributes such as ``in_features`` from the new shapes, or returns a module to put in its
    place when its class cannot express the new shape. Subclasses use their closest registered base
    type.
    """
    if module_type in LAYERS and not replace:
        raise ValueError(f"layer type {module_type.__name__} is already registered; pass replace=True to override.")
    LAYERS[module_type] = fixup


def _fix_conv(module: nn.modules.conv._ConvNd) -> None:
    weight = module.weight
    if module.transposed:
        module.in_channels = weight.shape[0]
        module.out_channels = weight.shape[1] * module.groups
        return
    if module.groups > 1 and module.in_channels == module.groups:  # depthwise: groups follow channels
        multiplier = module.out_channels // module.groups
        module.groups = weight.shape[0] // multiplier
        module.in_channels = module.groups
    else:
        module.in_channels = weight.shape[1] * module.groups
    module.out_channels = weight.shape[0]


def _fix_linear(module: nn.Linear) -> None:
    module.out_features, module.in_features = module.weight.shape


def _fix_norm(module: nn.modules.batchnorm._NormBase) -> None:
    reference = module.weight if module.weight is not None else module.running_mean
    module.num_features = reference.shape[0]


def _fix_group_norm(module: nn.GroupNorm) -> None:
    module.num_channels = module.weight.shape[0]


def _fix_layer_norm(module: nn.LayerNorm) -> None:
    module.normalized_shape = tuple(module.weight.shape)


def _fix_embedding(module: nn.Embedding) -> None:
    module.embedding_dim = module.weight.shape[1]


def _fix_prelu(module: nn.PReLU) -> None:
    module.num_parameters = module.weight.numel()


def _fix_attention(module: nn.MultiheadAttention) -> nn.Module | None:
    """A pruned ``nn.MultiheadAttention`` cannot hold its weights: hand them to a layer that can."""
    from lightning_prune.layers import PrunedMultiheadAttention

    if module.in_proj_weight.shape == (3 * module.embed_dim, module.embed_dim):
        return None
    return PrunedMultiheadAttention(module, module.head_dim)


def _fix_pruned_attention(module: nn.Module) -> None:
    module.resize()


for _type, _fixup in (
    (nn.modules.conv._ConvNd, _fix_conv),
    (nn.Linear, _fix_linear),
    (nn.modules.batchnorm._NormBase, _fix_norm),
    (nn.GroupNorm, _fix_group_norm),
    (nn.LayerNorm, _fix_layer_norm),
    (nn.RMSNorm, _fix_layer_norm),
    (nn.Embedding, _fix_embedding),
    (nn.PReLU, _fix_prelu),
    (nn.MultiheadAttention, _fix_attention),
):
    register_layer(_type, _fixup)


LAYER_NAMES: dict[str, LayerFixup] = {}


def register_layer_name(qualified_name: str, fixup: LayerFixup) -> None:
    """Like :func:`register_layer`, for a class named ``"package.module.Class"`` (its library is not imported)."""
    if qualified_name in LAYER_NAMES:
        raise ValueError(f"layer {qualified_name!r} is already registered.")
    LAYER_NAMES[qualified_name] = fixup


register_layer_name("lightning_prune.layers.PrunedMultiheadAttention", _fix_pruned_attention)


def _fixup_for(module: nn.Module) -> LayerFixup | None:
    for klass in type(module).__mro__:
        if klass in LAYERS:
            return LAYERS[klass]
        name = f"{klass.__module__}.{klass.__qualname__}"
        if name in LAYER_NAMES:
            return LAYER_NAMES[name]
    return None


# --- planning and applying -----------------------------------------------------------------------
def plan_cuts(graph: DependencyGraph, plan: Plan) -> list[Cut]:
    """Translate removed group elements into cuts of every slot they touch."""
    by_index = groups_by_index(graph.groups)
    dropped: dict[tuple[str, int], set[int]] = defaultdict(set)
    slots = {}
    for index, elements in plan.removed.items():
        group = by_index[index]
        gone = torch.zeros(group.width, dtype=torch.bool)
        gone[elements] = True
        for member in group.members:
            key = (member.slot.tensor, member.slot.dim)
            slots[key] = member.slot
            dropped[key].update(member.positions[gone[member.elements]].tolist())
    cuts = []
    for key, positions in dropped.items():
        if not positions:
            continue
        slot = slots[key]
        size = slot.classes.numel()
        keep = sorted(set(range(size)) - positions)
        cuts.append(Cut(slot.tensor, slot.dim, size, keep, slot.groups if slot.role == "in" else 1))
    return sorted(cuts, key=lambda c: (c.tensor, c.dim))


def named_tensors(model: nn.Module) -> dict[str, Tensor]:
    return {**dict(model.named_parameters()), **dict(model.named_buffers())}


@dataclass
class Drop:
    """Keep entries ``keep`` (sorted) of the block stack ``module``, an ``nn.ModuleList`` or ``nn.Sequential``
    that had ``size`` entries. The remaining blocks are renumbered (``layer_idx`` attributes included)."""

    module: str
    size: int
    keep: list[int]

    def to_dict(self) -> dict:
        return {"module": self.module, "size": self.size, "keep": list(self.keep)}

    @classmethod
    def from_dict(cls, data: dict, where: str = "record") -> Drop:
        if not isinstance(data, dict) or set(data) != {"module", "size", "keep"}:
            raise RecordError(f"{where}: a layer drop must be a dict with keys module, size, keep; got {shown(data)}")
        module, size, keep = data["module"], data["size"], data["keep"]
        if not isinstance(module, str) or isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise RecordError(f"{where}: layer drop needs a module path and a positive size, got {shown(data)}")
        if not isinstance(keep, list) or any(isinstance(i, bool) or not isinstance(i, int) for i in keep):
            raise RecordError(f"{where}: `keep` of the layer drop on `{module}` must be a list of integers.")
        return cls(module, size, keep)


@dataclass
class Step:
    """One pruning call: channel cuts (applied first), then layer drops."""

    cuts: list[Cut] = field(default_factory=list)
    drops: list[Drop] = field(default_factory=list)

    def to_dict(self) -> dict:
        step: dict = {"cuts": [cut.to_dict() for cut in self.cuts]}
        if self.drops:
            step["layers"] = [drop.to_dict() for drop in self.drops]
        return step


def _renamed(name: str, module: str, keep: Sequence[int]) -> str | None:
    """``name`` after the blocks of ``module`` not in ``keep`` are removed; None if it goes with them."""
    prefix = module + "."
    if not name.startswith(prefix):
        return name
    index, _, rest = name[len(prefix) :].partition(".")
    if not index.isdigit() or int(index) not in keep:
        return None
    return f"{prefix}{keep.index(int(index))}" + (f".{rest}" if rest else "")


def check_steps(model: nn.Module, steps: Iterable[Step], where: str = "record") -> None:
    """Validate steps in order against the model's current shapes and block stacks; nothing changes."""
    shapes = {name: list(t.shape) for name, t in named_tensors(model).items()}
    stacks = {  # the model itself cannot be replaced: its stacks are inside it
        name: len(m) for name, m in model.named_modules() if name and isinstance(m, nn.ModuleList | nn.Sequential)
    }
    for number, step in enumerate(steps):
        here = f"{where} step {number}"
        seen = set()
        for cut in step.cuts:
            if cut.tensor not in shapes:
                close = [n for n in shapes if n.rsplit(".", 1)[-1] == cut.tensor.rsplit(".", 1)[-1]][:5]
                raise RecordError(
                    f"{here}: the model has no parameter or buffer `{cut.tensor}` "
                    f"(similar names: {', '.join(close) or 'none'}). Was the record made for another model class?"
                )
            if (cut.tensor, cut.dim) in seen:
                raise RecordError(f"{here}: `{cut.tensor}` dimension {cut.dim} is cut twice.")
            seen.add((cut.tensor, cut.dim))
            _validate_cut(cut, shapes[cut.tensor], here)
        for cut in step.cuts:
            shapes[cut.tensor][cut.dim] = len(cut.keep) // cut.groups
        for drop in step.drops:
            if stacks.get(drop.module) != drop.size:
                raise RecordError(
                    f"{here}: the record drops layers of `{drop.module}`, a stack of {drop.size} blocks; the model "
                    f"has {stacks.get(drop.module, 'no such stack')} there. Apply it to a freshly built model."
                )
            if not _increasing_below(drop.keep, drop.size):
                raise RecordError(f"{here}: `keep` of `{drop.module}` must be increasing indices in [0, {drop.size}).")
            shapes = {new: v for name, v in shapes.items() if (new := _renamed(name, drop.module, drop.keep))}
            stacks = {new: v for name, v in stacks.items() if (new := _renamed(name, drop.module, drop.keep))}
            stacks[drop.module] = len(drop.keep)


def check_cuts(model: nn.Module, steps: Iterable[Sequence[Cut]], where: str = "record") -> None:
    """Validate cuts (possibly several steps, in order) against the model's current shapes; no changes."""
    check_steps(model, [Step(list(cuts)) for cuts in steps], where)


DropFixup = Callable[[nn.Module, Drop], None]
DROP_FIXUPS: list[DropFixup] = []


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
        for fixup in DROP_FIXUPS:
            fixup(model, drop)


def apply_step(model: nn.Module, step: Step, optimizers: Iterable[torch.optim.Optimizer] = ()) -> None:
    optimizers = list(optimizers)
    if step.cuts:
        apply_cuts(model, step.cuts, optimizers)
    apply_drops(model, step.drops, optimizers)


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
    for module in modules.values():  # children before the layers that contain them
        fixup = _fixup_for(module)
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


def cuts_to_step(cuts: Sequence[Cut]) -> dict:
    return Step(list(cuts)).to_dict()


from lightning_prune.integrations import huggingface as _huggingface  # noqa: E402,F401  (registers fixups)
from lightning_prune.integrations import torchvision as _torchvision  # noqa: E402,F401
