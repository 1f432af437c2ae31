"""From a selection to cuts: the removed elements of each group become indices removed from every slot it touches."""

from __future__ import annotations

from collections import defaultdict

import torch

from lightning_prune.cuts import Cut
from lightning_prune.graph.groups import DependencyGraph
from lightning_prune.selection import Plan, groups_by_index


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
        cuts.append(Cut(slot.tensor, slot.dim, size, keep, slot.groups))
    return sorted(cuts, key=lambda c: (c.tensor, c.dim))
