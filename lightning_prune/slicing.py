"""Slicing tensors by cuts, and putting them back.

One function slices a parameter, its gradient and every optimizer state tensor shaped like it (momentum,
Adam moments), so the same cut applies to all of them. For undoing, the entries a cut removes are kept
(a fraction of a full copy) and :func:`unslice_tensor` rebuilds the tensor from its smaller self. Both keep
the tensor's memory layout: a channels-last weight stays channels-last, so a model converted for deployment
runs its pruned convolutions in the layout it was timed and chosen in.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from lightning_prune.cuts import Cut


def _group_index(cut: Cut, positions: Tensor, shape: Sequence[int]) -> Tensor:
    """``gather``/``scatter`` index along ``cut.dim`` of a tensor whose rows (dim 0) split into ``cut.groups``
    blocks, each reading its own indices (``positions``, sorted, count the indices of all blocks): a grouped
    convolution's inputs (dim 1), or the neurons of each expert in a stack of experts (dim 1 or 2 of
    ``(experts, ...)``).

    Blocks that hold none of ``positions`` (a convolution group removed whole, or losing nothing) read the same
    entries as the first block that holds some: the same index gathers and scatters, so their rows round-trip
    unchanged. Built on the CPU (``positions``' device) so that replaying on the meta device works.
    """
    per_group = cut.size // cut.groups
    owner = positions // per_group
    held = torch.bincount(owner, minlength=cut.groups)
    width = int(held.max()) if positions.numel() else 0
    local = (positions % per_group).view(-1, width) if width else positions.new_zeros(cut.groups, 0)
    table = local[:1].expand(cut.groups, -1).clone() if width else local
    table[held > 0] = local
    rows = table[torch.arange(shape[0], device=positions.device) // (shape[0] // cut.groups)]
    view, target = [shape[0]] + [1] * (len(shape) - 1), list(shape)
    view[cut.dim], target[cut.dim] = -1, rows.shape[1]
    return rows.view(view).expand(target)


def index_rows(tensor: Tensor, dim: int, groups: int = 1) -> Tensor:
    """One row per index of a slot along ``dim``, ``(groups × size, rest)``; with ``groups`` > 1 the rows of
    ``tensor`` (dim 0) split into blocks, each with indices of its own along ``dim`` (see :class:`Cut`)."""
    if groups == 1:
        return tensor.movedim(dim, 0).reshape(tensor.shape[dim], -1)
    blocks = tensor.reshape(groups, tensor.shape[0] // groups, *tensor.shape[1:]).movedim(dim + 1, 1)
    return blocks.reshape(groups * tensor.shape[dim], -1)


def _take(tensor: Tensor, cut: Cut, positions: Tensor) -> Tensor:
    if cut.groups == 1:
        return tensor.index_select(cut.dim, positions.to(tensor.device))
    return tensor.gather(cut.dim, _group_index(cut, positions, tensor.shape).to(tensor.device))


def _put(target: Tensor, cut: Cut, positions: Tensor, values: Tensor) -> None:
    if cut.groups == 1:
        target.index_copy_(cut.dim, positions.to(target.device), values)
    else:
        target.scatter_(cut.dim, _group_index(cut, positions, target.shape).to(target.device), values)


def _kept_indices(cut: Cut) -> Tensor:
    """On the CPU (also for tensors on the meta device, whose grouped index depends on the values)."""
    return torch.tensor(cut.keep, dtype=torch.long)


def _removed_indices(cut: Cut) -> Tensor:
    gone = torch.ones(cut.size, dtype=torch.bool)
    gone[_kept_indices(cut)] = False
    return torch.nonzero(gone).reshape(-1)


def layout(tensor: Tensor) -> torch.memory_format:
    """``channels_last`` for a 4-d tensor laid out so (and not also plainly contiguous), else the default."""
    last = tensor.ndim == 4 and tensor.is_contiguous(memory_format=torch.channels_last) and not tensor.is_contiguous()
    return torch.channels_last if last else torch.contiguous_format


def _in_order(cuts: Sequence[Cut]) -> list[Cut]:
    return sorted(cuts, key=lambda c: c.groups == 1)  # grouped-input cuts first, on the original row layout


def slice_tensor(tensor: Tensor, cuts: Sequence[Cut], removed: list[Tensor] | None = None) -> Tensor:
    """``tensor`` with the cuts applied.

    With ``removed``, the entries each cut takes away are appended to it: with the result, they are all
    :func:`unslice_tensor` needs to rebuild ``tensor`` (a fraction of a full copy).
    """
    memory_format = layout(tensor)
    for cut in _in_order(cuts):
        if removed is not None:
            removed.append(_take(tensor, cut, _removed_indices(cut)))
        tensor = _take(tensor, cut, _kept_indices(cut))
    return tensor.contiguous(memory_format=memory_format)


def unslice_tensor(tensor: Tensor, cuts: Sequence[Cut], removed: Sequence[Tensor]) -> Tensor:
    """The tensor that :func:`slice_tensor` turned into ``tensor``, removing ``removed``."""
    memory_format = layout(tensor)
    for cut, gone in zip(reversed(_in_order(cuts)), reversed(removed), strict=True):
        shape = list(tensor.shape)
        shape[cut.dim] += gone.shape[cut.dim]
        whole = torch.empty(shape, dtype=tensor.dtype, device=tensor.device, memory_format=memory_format)
        _put(whole, cut, _kept_indices(cut), tensor)
        _put(whole, cut, _removed_indices(cut), gone)
        tensor = whole
    return tensor
