"""From a trace to groups of coupled channels.

Elements that must be removed together fall into one *class* (connected components of the traced
edges). A *group* is the set of classes that share producer layers: the 64 output channels of a conv
and its BN form one group of 64 classes; a ResNet stage whose blocks add into one residual stream is
one group whose classes each hold a channel of every producer in the stage. Removing a class
removes, in every *slot* (a dimension of a parameter or buffer), the indices that belong to it.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from lightning_prune.errors import PruningError
from lightning_prune.graph.builder import Trace
from lightning_prune.graph.labels import FROZEN, connected_components
from lightning_prune.graph.tracer import trace_model
from lightning_prune.running import ExampleInputs, tensor_owners


@dataclass(frozen=True)
class Slot:
    """A dimension of a parameter or buffer whose indices follow channels (see ``SlotRecord``)."""

    tensor: str
    dim: int
    role: str
    classes: Tensor
    groups: int = 1
    modules: tuple[str, ...] = ()


@dataclass
class Member:
    """The indices of one slot that belong to one group, and the group element each one is."""

    slot: Slot
    positions: Tensor
    elements: Tensor


@dataclass
class Group:
    """Coupled channels that are ranked and removed together.

    ``width`` elements; removing element ``i`` removes, in every member slot, the positions whose
    element is ``i``. ``blocks`` (if set) assigns elements to blocks that must lose the same number
    of elements (grouped convolutions, GroupNorm, ``chunk``); a group whose blocks are the input groups of a
    grouped convolution has a ``partner``, the group of its outputs, with the partner's block of each of its
    blocks: both can lose whole blocks together (the convolution then has fewer groups). ``floors`` are sets
    of elements of which at least so many must stay (a depthwise conv keeps two groups, a grouped conv two inputs per
    group, so that neither turns into another kind of layer). ``normalized`` groups pass through a
    LayerNorm/GroupNorm, so removing channels changes the statistics of the others slightly.
    """

    index: int
    name: str
    classes: Tensor
    members: list[Member]
    spaces: list[tuple[str, int, Tensor]]
    blocks: Tensor | None = None
    floors: list[tuple[Tensor, int]] = field(default_factory=list)
    normalized: bool = False
    frozen_channels: int = 0
    notes: list[str] = field(default_factory=list)
    partner: tuple[Group, Tensor] | None = field(default=None, repr=False, compare=False)

    @property
    def width(self) -> int:
        return int(self.classes.numel())

    def members_with_role(self, role: str | None = None) -> list[Member]:
        """Members whose slot has ``role`` (``"out"``, ``"in"``, ``"follow"``; all if None)."""
        return [m for m in self.members if role is None or m.slot.role == role]

    def __repr__(self) -> str:
        producers = sorted({m.slot.tensor.rsplit(".", 1)[0] for m in self.members_with_role("out")})
        shown = ", ".join(producers[:4]) + (f", ... ({len(producers)} producers)" if len(producers) > 4 else "")
        return f"Group({self.index}: {self.width} channels of {shown})"


@dataclass
class DependencyGraph:
    """Everything the engine knows about which channels of a model can be removed together."""

    groups: list[Group]
    slots: list[Slot]
    num_classes: int
    unprunable: dict[str, str]
    trace: Trace = field(repr=False)
    root: Tensor = field(repr=False)

    def __repr__(self) -> str:
        return (
            f"DependencyGraph({len(self.groups)} prunable groups, {sum(g.width for g in self.groups)} channels, "
            f"{len(self.unprunable)} layers left unpruned)"
        )


def match_modules(model: nn.Module, patterns: Iterable[str] | str | None, argument: str = "ignore") -> list[str]:
    """Module names matching each name or glob pattern (one string is one pattern, None is none); a pattern that
    matches nothing is an error."""
    if patterns is None:
        return []
    if isinstance(patterns, str):
        patterns = [patterns]
    elif not isinstance(patterns, Iterable):
        raise PruningError(
            f"`{argument}` must be a list of module names or glob patterns, got {type(patterns).__name__} "
            f'{patterns!r}; pass e.g. ["fc", "layer4.*"].'
        )
    names = [name for name, _ in model.named_modules() if name]
    matched: list[str] = []
    for pattern in patterns:
        if not isinstance(pattern, str):
            raise PruningError(f"`{argument}` entries must be module names or glob patterns, got {pattern!r}.")
        hits = [name for name in names if name == pattern or fnmatch.fnmatchcase(name, pattern)]
        if not hits:
            sample = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
            raise PruningError(
                f"`{argument}` entry {pattern!r} matches no module of the model. Module names look like: "
                f"{sample} (see `model.named_modules()`); glob patterns such as 'layer4.*' are allowed."
            )
        matched.extend(hit for hit in hits if hit not in matched)
    return matched


def build_graph(
    model: nn.Module,
    example_inputs: ExampleInputs,
    *,
    ignore: Iterable[str] = (),
    modes: Iterable[str] = ("train", "eval"),
) -> DependencyGraph:
    """Trace ``model`` on ``example_inputs`` and group its coupled channels.

    Args:
        model: any ``nn.Module``; it is run (without gradients) once per mode and left unchanged, but for what
            module rules prepare (a tensor that changes nothing it computes: :mod:`.module_rules`).
        example_inputs: a tensor, a tuple of positional inputs or a dict of keyword inputs.
        ignore: module names or glob patterns whose parameters keep their shapes.
        modes: tracing in both modes covers branches that run only in training (auxiliary heads).
    """
    ignored = dict.fromkeys(match_modules(model, ignore), "which is listed in `ignore`")
    trace = trace_model(model, example_inputs, modes)
    return group_trace(model, trace, ignored)


def violations(trace: Trace, root: Tensor) -> list[tuple[Tensor, str]]:
    """Requirements of ``trace`` that its classes (``root``) break: the classes involved, and why."""
    broken = []
    for requirement in trace.requirements:
        classes = root[requirement.labels]
        varying = [d for d in requirement.dims if (classes.amax(d) != classes.amin(d)).any()]
        if len(varying) > (1 if requirement.split else 0):
            broken.append((torch.unique(classes), f"{requirement.reason} in `{requirement.where}`"))
    return broken


def _raw_slots(trace: Trace, root: Tensor) -> tuple[list[Slot], Tensor]:
    """Slots of raw parameters (layer scales, tokens, position tables) and classes they cannot follow."""
    slots, uncovered = [], []
    for name, ids in trace.raw.items():
        if name in trace.computed_weights:  # a layer's weight after all: it has slots of its own
            continue
        classes = root[ids]
        covered = torch.zeros_like(classes, dtype=torch.bool)
        for dim in range(classes.ndim):
            rows = classes.movedim(dim, 0).reshape(classes.shape[dim], -1)
            if classes.shape[dim] > 1 and bool((rows == rows[:, :1]).all()):
                slots.append(Slot(name, dim, "follow", rows[:, 0].clone()))
                covered.fill_(True)
        uncovered.append(classes[~covered])
    return slots, torch.cat(uncovered) if uncovered else torch.empty(0, dtype=torch.long)


def group_trace(model: nn.Module, trace: Trace, ignored: Mapping[str, str] | None = None) -> DependencyGraph:
    """Group the classes of ``trace``; ``ignored`` maps module names to why they keep their shapes."""
    root = connected_components(trace.num_elements, trace.edges)
    owners = tensor_owners(model)
    slots = [
        Slot(s.tensor, s.dim, s.role, root[s.labels], s.groups, tuple(sorted(s.modules))) for s in trace.slots.values()
    ]
    raw_slots, uncovered = _raw_slots(trace, root)
    slots.extend(raw_slots)

    frozen = torch.zeros(trace.num_elements, dtype=torch.bool)
    frozen[root[FROZEN]] = True
    frozen[uncovered] = True
    for ids, _ in trace.frozen:
        frozen[root[ids]] = True
    reasons = [(torch.unique(root[ids]), reason) for ids, reason in trace.frozen]
    for classes, reason in violations(trace, root):
        frozen[classes] = True
        reasons.append((classes, reason))
    for slot in slots:
        modules = owners.get(slot.tensor, [])
        for name, why in (ignored or {}).items():
            if any(m == name or m.startswith(name + ".") for m in modules):
                frozen[slot.classes] = True
                reasons.append((torch.unique(slot.classes), f"reaches `{name}`, {why}"))
                break

    spaces = [(name, dim, root[ids]) for (name, dim), ids in trace.spaces.items()]
    # classes linked through shared producer spaces form one group
    links = []
    for _, _, classes in spaces:
        live = classes[~frozen[classes]]
        if live.numel() > 1:
            links.append((live, live[:1].expand_as(live)))
    component = connected_components(trace.num_elements, links)
    live_classes = torch.unique(torch.cat([c[~frozen[c]] for _, _, c in spaces])) if spaces else torch.empty(0)
    group_of = torch.full((trace.num_elements,), -1, dtype=torch.long)
    local_of = torch.full((trace.num_elements,), -1, dtype=torch.long)
    group_roots = torch.unique(component[live_classes]) if live_classes.numel() else torch.empty(0, dtype=torch.long)
    groups: list[Group] = []
    for index, group_root in enumerate(group_roots.tolist()):
        classes = live_classes[component[live_classes] == group_root]
        group_of[classes] = index
        local_of[classes] = torch.arange(classes.numel())
        groups.append(Group(index, "", classes, [], []))

    for name, dim, classes in spaces:
        for g in torch.unique(group_of[classes]).tolist():
            if g >= 0:
                groups[g].spaces.append((name, dim, classes))
                groups[g].frozen_channels += int(frozen[classes].sum())
    for slot in slots:
        if slot.classes.numel() == 0:
            continue
        owner = group_of[slot.classes]
        for g in torch.unique(owner).tolist():
            if g < 0:
                continue
            positions = torch.nonzero(owner == g).reshape(-1)
            groups[g].members.append(Member(slot, positions, local_of[slot.classes[positions]]))

    _apply_partitions(trace, root, groups, group_of, local_of)
    _link_convolution_groups(trace, root, groups, group_of, local_of)
    for elements, minimum in trace.floors:
        classes = torch.unique(root[elements])
        owner = torch.unique(group_of[classes])
        for g in owner[owner >= 0].tolist():
            mine = local_of[classes[group_of[classes] == g]]
            groups[g].floors.append((mine, min(minimum, int(mine.numel()))))
    normalized = torch.unique(root[torch.cat(trace.normalized)]) if trace.normalized else torch.empty(0)
    for g in torch.unique(group_of[normalized]).tolist() if normalized.numel() else []:
        if g >= 0:
            groups[g].normalized = True

    groups = [g for g in groups if g.width > 1 or (g.width == 1 and g.frozen_channels > 0)]
    for new_index, group in enumerate(groups):
        group.index = new_index
        producers = [m.slot.modules[0] if m.slot.modules else m.slot.tensor for m in group.members_with_role("out")]
        group.name = producers[0] if producers else group.spaces[0][0]
    unprunable = {**trace.whole, **_unprunable(root, spaces, frozen, owners, reasons)}
    return DependencyGraph(groups, slots, trace.num_elements, unprunable, trace, root)


def _apply_partitions(trace: Trace, root: Tensor, groups: list[Group], group_of: Tensor, local_of: Tensor) -> None:
    """Turn equal-count constraints into per-group block ids; freeze groups with unsatisfiable ones.

    With ``counts[element, block]`` the positions an element holds in each block: if every element
    holds as many in every block (attention heads across GPT-2's fused q, k, v), any removal keeps the
    blocks equal; if every element lies in one block with the same count (grouped convolutions,
    GroupNorm, ``chunk``), equal numbers of elements must leave each block; anything else is frozen.
    """
    for blocks, reason in trace.partitions:
        classes = [root[block] for block in blocks]
        involved = torch.unique(group_of[torch.cat(classes)])
        involved = involved[involved >= 0].tolist()
        if len(involved) > 1:
            for g in involved:
                _freeze_group(groups[g], f"{reason} spans several groups")
            continue
        for g in involved:
            group = groups[g]
            if group.width == 0:
                continue
            counts = torch.stack(
                [torch.bincount(local_of[block[group_of[block] == g]], minlength=group.width) for block in classes],
                dim=1,
            )
            if bool((counts == counts[:, :1]).all()):
                continue
            present = counts > 0
            block_of = counts.argmax(1)
            multiplicity = counts.gather(1, block_of[:, None]).reshape(-1)
            single = bool((present.sum(1) == 1).all()) and multiplicity.unique().numel() == 1
            if not single or torch.unique(block_of).numel() != len(classes):
                _freeze_group(group, f"cannot keep {reason} consistent")
            elif group.blocks is None:
                group.blocks = block_of
            elif not _same_partition(group.blocks, block_of):
                _freeze_group(group, f"conflicting block constraints ({reason})")


def _link_convolution_groups(
    trace: Trace, root: Tensor, groups: list[Group], group_of: Tensor, local_of: Tensor
) -> None:
    """Pair the group of a grouped convolution's inputs with the group of its outputs, block by block.

    Only where each side is one group whose blocks are exactly the convolution's groups, and neither side is
    paired with anything else: removing block ``g`` of both then removes the convolution's group ``g`` whole.
    """
    pairs: dict[int, tuple[Group, Tensor] | None] = {}
    for inputs, outputs in trace.convolution_groups:
        sides = []
        for ids in (inputs, outputs):
            classes = root[ids]
            owner = torch.unique(group_of[classes])
            group = groups[int(owner[0])] if owner.numel() == 1 and int(owner[0]) >= 0 else None
            if group is None or group.blocks is None or int(group.blocks.max()) + 1 != classes.shape[0]:
                break
            block = group.blocks[local_of[classes]]
            if not bool((block == block[:, :1]).all()) or torch.unique(block[:, 0]).numel() != classes.shape[0]:
                break
            sides.append((group, block[:, 0]))
        if len(sides) != 2 or sides[0][0] is sides[1][0]:
            continue
        (a, blocks_a), (b, blocks_b) = sides
        for group, partner, mine, theirs in ((a, b, blocks_a, blocks_b), (b, a, blocks_b, blocks_a)):
            mapping = torch.empty_like(mine)
            mapping[mine] = theirs
            known = pairs.get(group.index, (partner, mapping))
            same = known is not None and known[0] is partner and torch.equal(known[1], mapping)
            pairs[group.index] = (partner, mapping) if same else None
    for index, pair in pairs.items():
        if pair is not None and pairs.get(pair[0].index) is not None:
            groups[index].partner = pair


def _same_partition(a: Tensor, b: Tensor) -> bool:
    pairs = torch.unique(torch.stack([a, b]), dim=1)
    return pairs.shape[1] == torch.unique(a).numel() == torch.unique(b).numel()


def _freeze_group(group: Group, reason: str) -> None:
    group.notes.append(reason)
    group.members = []
    group.classes = group.classes[:0]


def _unprunable(
    root: Tensor,
    spaces: list[tuple[str, int, Tensor]],
    frozen: Tensor,
    owners: Mapping[str, list[str]],
    reasons: list[tuple[Tensor, str]],
) -> dict[str, str]:
    """Producer layers some of whose channels cannot be removed, with the first reason found."""
    reasons = [
        *reasons,
        (root[FROZEN].reshape(1), "meets the model's inputs or outputs, or a tensor of unknown origin"),
    ]
    found: dict[str, str] = {}
    for name, _, classes in spaces:
        stuck = torch.unique(classes[frozen[classes]])
        if stuck.numel() == 0:
            continue
        reason = next((r for ids, r in reasons if torch.isin(stuck, ids).any()), "cannot follow its consumers")
        for module in owners.get(name) or [name]:  # every layer holding the tensor (a tied LM head too)
            found[module or "<model>"] = reason
    return found
