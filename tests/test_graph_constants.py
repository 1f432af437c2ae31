"""A constant computed in ``forward`` ties a channel dimension to its size only where its values vary along it."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lightning_prune as lp


class ShiftedMLP(nn.Module):
    """fc1 → + a constant built at fc1's width (zeros: the same for every channel; arange: one per channel) → fc2."""

    def __init__(self, uniform: bool) -> None:
        super().__init__()
        self.uniform = uniform
        self.fc1, self.fc2 = nn.Linear(4, 8), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        width = self.fc1.out_features
        shift = torch.zeros(width) if self.uniform else torch.arange(width, dtype=x.dtype)
        return self.fc2(torch.relu(self.fc1(x) + shift))


def test_a_uniform_constant_follows_the_channels_and_a_varying_one_freezes_them() -> None:
    torch.manual_seed(0)
    x = torch.randn(5, 4)
    uniform, varying = ShiftedMLP(uniform=True), ShiftedMLP(uniform=False)
    reference = ShiftedMLP(uniform=True)
    reference.load_state_dict(uniform.state_dict())
    with torch.no_grad():
        dense = uniform(x)
    result = lp.prune(uniform, x, 0.5, "l1")
    assert uniform.fc1.out_features == 4
    keep = next(cut for cut in lp.record.parse_record(result.record)[0].cuts if cut.tensor == "fc1.weight").keep
    with torch.no_grad():
        reference.fc2.weight[:, [i for i in range(8) if i not in keep]] = 0  # what the removed channels feed
        torch.testing.assert_close(uniform(x), reference(x))
        assert not torch.allclose(uniform(x), dense)  # the removed channels did contribute
    result = lp.prune(varying, x, 0.5, "l1")
    assert varying.fc1.out_features == 8
    assert "`add` with a constant of the same size" in result.unprunable["fc1"]


@pytest.mark.parametrize("uniform", [True, False])
def test_the_constant_is_read_on_the_example_not_guessed(uniform: bool) -> None:
    graph = lp.build_graph(ShiftedMLP(uniform), torch.randn(2, 4))
    assert ("fc1" in graph.unprunable) is not uniform
