"""What tracing discovers: coupled channels, blocks, frozen channels and why."""

from __future__ import annotations

import pytest
import torch
from nets import SMALL_NETS, ConcatNet, GroupedNet, MobileNet, PlainCNN, ResidualNet, ShuffleNet, Unknown, small_input
from torch import nn

from lightning_prune import build_graph, prune
from lightning_prune.graph.labels import connected_components


def producers(group) -> set[str]:
    return {m.slot.tensor for m in group.members_with_role("out")}


def group_of(graph, tensor: str):
    return next(g for g in graph.groups if tensor in producers(g))


def test_plain_chain_has_one_group_per_producer_and_freezes_the_head() -> None:
    graph = build_graph(PlainCNN(), small_input())
    assert sorted(g.width for g in graph.groups) == [16, 24, 32, 40]
    assert "classifier.3" in graph.unprunable and "output" in graph.unprunable["classifier.3"]
    # flatten → Linear: each of the 32 channels owns its block of 4×4 input columns
    last = group_of(graph, "features.7.weight")
    linear_in = next(m for m in last.members if m.slot.tensor == "classifier.1.weight")
    assert linear_in.slot.role == "in" and linear_in.positions.numel() == 32 * 16
    assert torch.equal(linear_in.elements, torch.arange(32).repeat_interleave(16))


def test_residual_sum_ties_all_producers_of_the_stream() -> None:
    graph = build_graph(ResidualNet(), small_input())
    stem = group_of(graph, "stem.0.weight")
    assert producers(stem) == {"stem.0.weight", "block1.3.weight"}
    second = group_of(graph, "shortcut.0.weight")
    assert producers(second) == {"shortcut.0.weight", "block2.3.weight"}
    # every BN of the stream follows the same elements
    follow = {m.slot.tensor for m in stem.members_with_role("follow")}
    assert {"stem.1.weight", "stem.1.running_mean", "block1.4.weight", "block1.4.running_var"} <= follow


def test_concatenation_keeps_branches_apart_and_offsets_consumers() -> None:
    graph = build_graph(ConcatNet(), small_input())
    a, b = group_of(graph, "a.0.weight"), group_of(graph, "b.0.weight")
    assert a is not b and (a.width, b.width) == (8, 12)
    mix_in_b = next(m for m in b.members if m.slot.tensor == "mix.0.weight")
    assert torch.equal(mix_in_b.positions, torch.arange(8, 20))  # b sits after a's 8 channels
    head_in_b = next(m for m in b.members if m.slot.tensor == "head.weight")
    assert torch.equal(head_in_b.positions, torch.arange(16 + 8, 16 + 20))


def test_depthwise_multiplier_and_gate_join_the_expansion_group() -> None:
    graph = build_graph(MobileNet(), small_input())
    expansion = group_of(graph, "expand.0.weight")
    assert expansion.width == 24
    depthwise = next(m for m in expansion.members if m.slot.tensor == "depthwise.0.weight")
    assert depthwise.positions.numel() == 48  # two depthwise outputs per expanded channel
    assert torch.equal(depthwise.elements, torch.arange(24).repeat_interleave(2))
    assert "excite.weight" in producers(expansion)  # the SE gate multiplies these channels


def test_grouped_convolution_and_groupnorm_become_blocks() -> None:
    graph = build_graph(GroupedNet(), small_input())
    stem, reduce = group_of(graph, "stem.0.weight"), group_of(graph, "reduce.0.weight")
    assert torch.equal(torch.bincount(stem.blocks), torch.full((4,), 4)) and stem.normalized
    assert torch.equal(torch.bincount(reduce.blocks), torch.full((4,), 6))


def test_channel_shuffle_freezes_what_it_interleaves_and_says_why() -> None:
    graph = build_graph(ShuffleNet(), small_input())
    assert "splits a channel dimension" in graph.unprunable["branch.3"]
    assert group_of(graph, "branch.0.weight").width == 12  # the branch's inner channels stay prunable


def test_unknown_op_freezes_its_inputs_with_the_op_and_module_named() -> None:
    graph = build_graph(Unknown(), small_input())
    assert graph.unprunable["a"] == "unsupported op `fft_fft` in `<model>`"
    assert producers(graph.groups[0]) == {"b.weight"}


def test_training_only_branch_is_traced() -> None:
    class Aux(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Conv2d(3, 8, 3)
            self.aux = nn.Conv2d(8, 4, 1)
            self.head = nn.Linear(8, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
            x = self.body(x)
            out = self.head(x.mean((2, 3)))
            return (out, self.aux(x)) if self.training else out

    graph = build_graph(Aux(), small_input())
    body = group_of(graph, "body.weight")
    assert "aux.weight" in {m.slot.tensor for m in body.members_with_role("in")}
    assert "aux" in graph.unprunable  # its outputs are model outputs in training mode


def test_ignore_freezes_whole_modules() -> None:
    graph = build_graph(ResidualNet(), small_input(), ignore=["block1.*"])
    tensors = {m.slot.tensor for g in graph.groups for m in g.members}
    assert not any(t.startswith("block1.") for t in tensors)
    assert "reaches `block1.0`" in graph.unprunable["stem.0"]


@pytest.mark.parametrize("name", sorted(SMALL_NETS))
def test_tracing_leaves_the_model_untouched(name: str) -> None:
    torch.manual_seed(0)
    model = SMALL_NETS[name]()
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    build_graph(model, small_input())
    assert model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert torch.equal(rng, torch.get_rng_state())


def test_connected_components_matches_a_union_find() -> None:
    generator = torch.Generator().manual_seed(0)
    a = torch.randint(0, 300, (200,), generator=generator)
    b = torch.randint(0, 300, (200,), generator=generator)
    root = connected_components(300, [(a, b)])
    parent = list(range(300))

    def find(x: int) -> int:
        while parent[x] != x:
            x = parent[x]
        return x

    for x, y in zip(a.tolist(), b.tolist(), strict=True):
        parent[max(find(x), find(y))] = min(find(x), find(y))
    assert root.tolist() == [find(x) for x in range(300)]


def test_sync_batch_norm_is_traced_as_the_batch_norm_it_is() -> None:
    # Under a process group SyncBatchNorm runs kernels without rules (and only on GPUs), so it is traced as a
    # unit: the groups must be those of the same network with BatchNorm2d, and pruning must cut its statistics.
    torch.manual_seed(0)
    plain = PlainCNN()
    synced = nn.SyncBatchNorm.convert_sync_batchnorm(PlainCNN())
    synced.load_state_dict(plain.state_dict())

    def layout(model: nn.Module) -> list:
        graph = build_graph(model, small_input())
        return sorted((g.width, sorted((m.slot.tensor, m.slot.role) for m in g.members)) for g in graph.groups)

    from lightning_prune.graph.module_rules import module_rule

    assert module_rule(nn.SyncBatchNorm(4)) is not None  # the distributed path is never entered
    assert layout(synced) == layout(plain)
    result = prune(synced, small_input(), 0.5)
    norms = [m for m in synced.modules() if isinstance(m, nn.SyncBatchNorm)]
    assert norms and all(m.running_mean.shape == m.weight.shape and m.num_features == m.weight.numel() for m in norms)
    assert result.params_after < result.params_before
