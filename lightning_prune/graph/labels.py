"""Label tensors: which channel-space element every position of an activation belongs to.

While the model runs on the example inputs, every tensor gets a *label tensor* of the same number of
dimensions holding, for each position, the id of the element it was computed from (a channel of a
producer layer, or one entry of a raw parameter). Dimensions along which the label does not vary are
kept at size 1, so labels of ``(N, C, H, W)`` activations cost ``C`` integers. Id ``FROZEN`` (0)
marks positions whose origin is unknown or that must never change size (inputs, outputs).
"""

from __future__ import annotations

import torch
from torch import Tensor

FROZEN = 0


def constant(value: int, ndim: int) -> Tensor:
    return torch.full((1,) * ndim, value, dtype=torch.long)


def compress(labels: Tensor) -> Tensor:
    """Shrink every dimension along which ``labels`` is constant to size 1."""
    for dim in range(labels.ndim):
        if labels.shape[dim] > 1:
            first = labels.narrow(dim, 0, 1)
            if torch.equal(labels, first.expand_as(labels)):
                labels = first
    return labels.contiguous()


def varying_dims(labels: Tensor) -> frozenset[int]:
    return frozenset(dim for dim, size in enumerate(labels.shape) if size > 1)


def align(labels: Tensor, ndim: int) -> Tensor:
    """View ``labels`` with leading size-1 dimensions so it has ``ndim`` dimensions (broadcast alignment)."""
    if labels.ndim > ndim:
        return labels.reshape(labels.shape[labels.ndim - ndim :])
    return labels.reshape((1,) * (ndim - labels.ndim) + tuple(labels.shape))


def along(labels: Tensor, dim: int, size: int) -> Tensor:
    """Labels as a ``(size, rest)`` matrix: one row per index of ``dim``."""
    labels = labels.movedim(dim, 0)
    labels = labels.expand((size, *labels.shape[1:])) if labels.shape[0] == 1 else labels
    return labels.reshape(size, -1)


def connected_components(num_elements: int, edges: list[tuple[Tensor, Tensor]]) -> Tensor:
    """Smallest element id of each element's connected component, for undirected ``edges``.

    Vectorised hooking and pointer jumping; converges in a number of rounds logarithmic in the
    component diameter for the graphs tracing produces.
    """
    root = torch.arange(num_elements, dtype=torch.long)
    if not edges:
        return root
    a = torch.cat([edge[0].reshape(-1) for edge in edges])
    b = torch.cat([edge[1].reshape(-1) for edge in edges])
    while True:
        ra, rb = root[a], root[b]
        low = torch.minimum(ra, rb)
        hooked = root.clone()
        hooked.scatter_reduce_(0, ra, low, reduce="amin")
        hooked.scatter_reduce_(0, rb, low, reduce="amin")
        while True:
            jumped = hooked[hooked]
            if torch.equal(jumped, hooked):
                break
            hooked = jumped
        if torch.equal(hooked, root):
            return root
        root = hooked
