"""What a pruning step removes, as plain data: :class:`Cut` (indices of one dimension of one tensor),
:class:`Drop` (blocks of a block stack), :class:`Rewrite` (a method's own change that is not a cut, replayed by
name) and :class:`Step` (the cuts, drops and rewrites of one pruning call).

Records (see :mod:`lightning_prune.record`) are lists of steps. Everything here is validated twice: on
parsing (types, keys) and against a model's current shapes (:func:`check_steps`), before anything changes.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from lightning_prune.errors import RecordError, shown
from lightning_prune.running import named_tensors


@dataclass
class Cut:
    """Keep indices ``keep`` (sorted) of dimension ``dim`` of tensor ``tensor``, which had ``size`` entries.

    With ``groups`` > 1 the rows of the tensor (dim 0) split into blocks that each have indices of their own along
    ``dim`` (the inputs of a grouped convolution, the neurons of each expert in ``(experts, ...)`` tensors):
    ``size`` and ``keep`` count the indices of all blocks, and every block keeps as many, or none: a
    convolution group that keeps none is removed whole (with its output rows, cut by another ``Cut``), and
    the layer has ``kept_groups`` groups afterwards.
    """

    tensor: str
    dim: int
    size: int
    keep: list[int]
    groups: int = 1

    @property
    def kept_groups(self) -> int:
        if self.groups == 1:
            return 1
        return len({index // (self.size // self.groups) for index in self.keep})

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
    if cut.groups > 1 and (cut.dim == 0 or shape[0] % cut.groups):
        raise RecordError(
            f"{where}: a grouped cut (groups={cut.groups}) takes indices of blocks of rows: a dimension after the "
            f"first of a tensor whose rows split into the groups; `{cut.tensor}` has shape {list(shape)}, the record "
            f"cuts dimension {cut.dim}."
        )
    if cut.groups > 1:
        if cut.size % cut.groups:
            raise RecordError(
                f"{where}: {cut.size} input channels of `{cut.tensor}` do not split into {cut.groups} groups."
            )
        per_group = torch.bincount(torch.tensor(cut.keep) // (cut.size // cut.groups), minlength=cut.groups)
        if per_group[per_group > 0].unique().numel() != 1:
            raise RecordError(f"{where}: grouped cut on `{cut.tensor}` keeps unequal channel counts per group.")


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


def _plain(value: object) -> bool:
    """JSON-like data: what a checkpoint read with ``weights_only=True`` and a JSON file both hold."""
    if isinstance(value, dict):
        return all(isinstance(k, str) and _plain(v) for k, v in value.items())
    if isinstance(value, list):
        return all(_plain(v) for v in value)
    return value is None or isinstance(value, bool | int | float | str)


@dataclass
class Rewrite:
    """A change of ``kind`` that a step makes besides cuts and drops (SliceGPT: untie the head, set the norms' ε,
    add shortcut matrices), described by ``options`` (plain data) and replayed by the function registered under
    ``kind`` in :data:`lightning_prune.fixups.REWRITES`. The values it sets are absolute: replaying twice is
    replaying once."""

    kind: str
    options: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"kind": self.kind, "options": dict(self.options)}

    @classmethod
    def from_dict(cls, data: dict, where: str = "record") -> Rewrite:
        if not isinstance(data, dict) or set(data) != {"kind", "options"}:
            raise RecordError(f"{where}: a rewrite must be a dict with keys kind, options; got {shown(data)}")
        if not isinstance(data["kind"], str) or not isinstance(data["options"], dict) or not _plain(data["options"]):
            raise RecordError(
                f"{where}: a rewrite needs a `kind` string and `options` of plain data (dicts, lists, numbers, "
                f"strings); got {shown(data)}"
            )
        return cls(data["kind"], dict(data["options"]))


@dataclass
class Step:
    """One pruning call: channel cuts (applied first), then layer drops, then rewrites."""

    cuts: list[Cut] = field(default_factory=list)
    drops: list[Drop] = field(default_factory=list)
    rewrites: list[Rewrite] = field(default_factory=list)

    def to_dict(self) -> dict:
        step: dict = {"cuts": [cut.to_dict() for cut in self.cuts]}
        if self.drops:
            step["layers"] = [drop.to_dict() for drop in self.drops]
        if self.rewrites:
            step["rewrites"] = [rewrite.to_dict() for rewrite in self.rewrites]
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
            shapes[cut.tensor][cut.dim] = len(cut.keep) // cut.kept_groups
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
