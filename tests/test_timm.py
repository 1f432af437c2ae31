"""Real timm architectures (pretrained=False, small inputs): measuring, pruning, training, and exactness."""

from __future__ import annotations

import pytest
import torch
from nets import removed_zeroed
from torch.utils.flop_counter import FlopCounterMode

import lightning_prune as lp
from lightning_prune import apply_cuts, plan_cuts
from lightning_prune.fixups import LAYER_FIXUPS
from lightning_prune.graph.groups import build_graph
from lightning_prune.importance import ScoringContext, get_criterion, score
from lightning_prune.measure import MacCounter, count_macs
from lightning_prune.running import meta_clone
from lightning_prune.selection import select

timm = pytest.importorskip("timm")
CROSS_STAGE = "timm.models.cspnet.CrossStage3"


def build(name: str, size: int = 64, **options: object) -> tuple[torch.nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, **options)
    return model, torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def exact_plan(model: torch.nn.Module, x: torch.Tensor, amount: float, importance: str):
    """Graph and plan over the groups whose removal is exact (not under a LayerNorm/GroupNorm/standardisation)."""
    graph = build_graph(model, x)
    scores = score(graph.groups, ScoringContext(model), get_criterion(importance))
    scores = [None if g.normalized else s for g, s in zip(graph.groups, scores, strict=True)]
    return graph, select(graph.groups, scores, amount)


def train_one_step(model: torch.nn.Module, x: torch.Tensor) -> None:
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    model(x).square().mean().backward()
    optimizer.step()


def test_cait_macs_are_counted_and_pruning_goes_on() -> None:
    model, x = build("cait_xxs24_224", 32, img_size=32, depth=2)
    model.eval()
    # with gradients the stock tracker hooks work; on meta tensors attention takes the math path, which the stock
    # registry counts (its CPU kernel it does not)
    with FlopCounterMode(display=False) as stock:
        meta_clone(model)(x.to("meta"))
    stock_without_gradients = FlopCounterMode(display=False)
    with pytest.raises(AssertionError, match="Expected gradient function"), torch.no_grad(), stock_without_gradients:
        model(x)
    with FlopCounterMode(display=False) as stock_on_cpu:
        model(x)
    assert count_macs(model, x) == stock.get_total_flops() // 2 > stock_on_cpu.get_total_flops() // 2
    result = lp.prune(model, x, 0.3, "l1")
    assert result.macs_before == stock.get_total_flops() // 2
    assert result.params_after < result.params_before and result.macs_after < result.macs_before
    assert result.macs_after == count_macs(model, x)
    train_one_step(model, x)


def test_an_op_the_counter_cannot_count_is_named_not_fatal() -> None:
    model, x = build("cait_xxs24_224", 32, img_size=32, depth=1)
    counter = MacCounter()
    whole = MacCounter()

    def broken(*args: object, **kwargs: object) -> int:
        raise ValueError("no formula for this shape")

    addmm = torch.ops.aten.addmm
    counter.flop_registry = {**counter.flop_registry, addmm: broken}
    with torch.no_grad(), counter:
        model(x)
    with torch.no_grad(), whole:
        model(x)
    with pytest.warns(RuntimeWarning, match=r"MACs are a lower bound: .*`aten.addmm` \(ValueError: no formula"):
        counter.warn_uncounted()
    assert 0 < counter.macs < whole.macs


@pytest.mark.parametrize("layer", ["StdConv2d", "ScaledStdConv2d"])
def test_standardised_convolution_loses_output_channels_exactly(layer: str) -> None:
    torch.manual_seed(0)
    conv = getattr(timm.layers, layer)(3, 16, 3)
    if hasattr(conv, "gain"):
        torch.nn.init.uniform_(conv.gain, 0.5, 1.5)
    model = torch.nn.Sequential(
        conv, torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(16, 5)
    )
    model.eval()
    x = torch.randn(2, 3, 16, 16)
    graph, plan = exact_plan(model, x, 0.4, "l1")
    assert plan.count == 6 and not any(g.normalized for g in graph.groups)
    reference = removed_zeroed(model, graph, plan)
    apply_cuts(model, plan_cuts(graph, plan))
    assert conv.weight.shape[0] == conv.out_channels == 10 and (not hasattr(conv, "gain") or conv.gain.shape[0] == 10)
    with torch.no_grad():
        assert relative_error(model(x), reference(x)) < 1e-5


@pytest.mark.parametrize("name", ["test_nfnet", pytest.param("nf_resnet26", marks=pytest.mark.slow)])
def test_nf_net_convolutions_are_cut_and_every_whole_layer_says_why(name: str) -> None:
    model, x = build(name)
    convs = [name for name, m in model.named_modules() if isinstance(m, timm.layers.ScaledStdConv2d)]
    assert len(convs) == {"test_nfnet": 25, "nf_resnet26": 29}[name]
    graph = build_graph(model, x)
    assert any(g.normalized for g in graph.groups)  # inputs of standardised convs: their statistics change
    result = lp.prune(model, x, 0.3, "l1")
    cut = {change.module for change in result.layers}
    assert set(convs) <= cut
    assert result.params_ratio < 0.8
    layers = [name for name, m in model.named_modules() if isinstance(m, torch.nn.Conv2d | torch.nn.Linear)]
    assert all(name in cut or name in result.unprunable for name in layers), set(layers) - cut - set(result.unprunable)
    with torch.no_grad():
        assert model.eval()(x).shape == (2, 1000)
    train_one_step(model, x)


def test_a_computed_weight_that_cannot_be_followed_is_named() -> None:
    class Flipped(torch.nn.Conv2d):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self._conv_forward(x, self.weight.flip(0), self.bias)

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), Flipped(8, 8, 3), torch.nn.Flatten())
    graph = build_graph(model, torch.randn(2, 3, 8, 8))
    assert graph.unprunable["2"] == "its weight in `conv2d` is computed in a way the engine cannot follow"
    assert "0" in graph.unprunable  # its consumer is left whole, so it is too


def batch_norms_that_matter(model: torch.nn.Module) -> None:
    """Non-trivial statistics and affine parameters, so that eval-mode BatchNorm changes what it passes."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
                torch.nn.init.uniform_(module.weight, 0.5, 1.5)
                torch.nn.init.uniform_(module.bias, -0.5, 0.5)


STORED_WIDTH_SPLITS = [  # model, options, the class holding the width: what it stores, what its layers read
    ("cs3darknet_s", {"size": 32}, "CrossStage3", lambda m: m.expand_chs, lambda m: m.conv_exp.conv.weight.shape[0]),
    pytest.param(
        "cspresnet50", {}, "CrossStage", lambda m: m.expand_chs, lambda m: m.conv_exp.conv.weight.shape[0],
        marks=pytest.mark.slow,
    ),
    (
        "res2net50_26w_4s", {"layers": [1, 1, 1, 1], "size": 32}, "Bottle2neck",
        lambda m: m.width, lambda m: m.convs[0].weight.shape[1] * m.convs[0].groups,
    ),
    (
        "skresnet18", {"layers": [1, 1, 1, 1], "size": 32}, "SelectiveKernel",
        lambda m: m.in_channels, lambda m: sum(p.conv.weight.shape[1] for p in m.paths),
    ),
    (
        "mixnet_s", {"size": 32}, "MixedConv2d",
        lambda m: m.splits, lambda m: [c.weight.shape[1] * c.groups for c in m.values()],
    ),
]  # fmt: skip


@pytest.mark.parametrize(("name", "options", "holder", "stored", "read"), STORED_WIDTH_SPLITS)
def test_splits_by_a_stored_width_are_pruned_exactly(name: str, options: dict, holder: str, stored, read) -> None:
    model, x = build(name, **options)
    batch_norms_that_matter(model)
    model.eval()
    # random scores: every part of a split holds candidates, so the parts shrink (an l1 ranking may spare one)
    graph, plan = exact_plan(model, x, 0.4, "random")
    assert set(graph.unprunable) == {model.default_cfg["classifier"]}
    reference = removed_zeroed(model, graph, plan)
    holders = [m for m in model.modules() if type(m).__name__ == holder]
    before = [stored(m) for m in holders]
    apply_cuts(model, plan_cuts(graph, plan))
    assert holders and all(stored(m) == read(m) for m in holders)
    assert any(stored(m) != width for m, width in zip(holders, before, strict=True))
    with torch.no_grad():
        assert relative_error(model(x), reference(x)) < 1e-4
    train_one_step(model, x)


class HalfAndHalf(torch.nn.Module):
    """Splits its expansion by a width it stores, with no fixup to update it."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.half = channels // 2
        self.expand = torch.nn.Conv2d(3, channels, 1)
        self.left, self.right = torch.nn.Conv2d(self.half, 8, 3, padding=1), torch.nn.Conv2d(self.half, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        left, right = torch.relu(self.expand(x)).split(self.half, dim=1)
        return self.left(left) + self.right(right)


def test_a_split_whose_width_does_not_follow_freezes_only_its_channels() -> None:
    torch.manual_seed(0)
    blocks = torch.nn.Sequential(HalfAndHalf(16), torch.nn.ReLU(), torch.nn.Conv2d(8, 12, 3, padding=1))
    model = torch.nn.Sequential(blocks, torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    model.append(torch.nn.Linear(12, 5))
    x = torch.randn(2, 3, 8, 8)
    result = lp.prune(model, x, 0.3)
    line = HalfAndHalf.forward.__code__.co_firstlineno + 1
    assert result.unprunable["0.0.expand"] == (
        f"`split` into parts of fixed sizes (wt14/tests/test_timm.py:{line}), which do not follow a pruned width "
        "in `0.0`"
    ).replace("wt14", __file__.rsplit("/", 3)[-3])
    assert set(result.unprunable) == {"0.0.expand", "4"}
    assert {c.module for c in result.layers} == {"0.0.left", "0.0.right", "0.2"}
    assert model[0][0].expand.weight.shape[0] == 16
    train_one_step(model, x)


def test_a_cross_stage_without_its_fixup_keeps_only_its_split_whole() -> None:
    model, x = build("cs3darknet_s")
    with LAYER_FIXUPS.registered(CROSS_STAGE, lambda module: None, replace=True):
        result = lp.prune(model, x, 0.3, "random")
    stages = [name for name, m in model.named_modules() if type(m).__name__ == "CrossStage3"]
    whole = {name for name, why in result.unprunable.items() if why.startswith("`split` into parts of fixed sizes")}
    assert {f"{stage}.conv_exp.conv" for stage in stages} <= whole  # and the residual streams the splits feed
    assert all(name.startswith(tuple(stages)) and not name.endswith(".conv1.conv") for name in whole)
    cut = {change.module for change in result.layers}
    assert all(f"{stage}.conv_transition.conv" in cut and f"{stage}.blocks.0.conv1.conv" in cut for stage in stages)
    assert result.params_ratio < 0.9
    train_one_step(model, x)


def zero_first_quarter_of_batch_norms(model: torch.nn.Module) -> None:
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                quarter = module.weight.numel() // 4
                module.weight[:quarter] = 0.0
                module.bias[:quarter] = 0.0


GROUPED = [
    ("timm", "resnext26ts", "global"), ("timm", "regnetx_002", "global"), ("timm", "regnety_002", "global"),
    ("torchvision", "regnet_y_400mf", "global"),
    pytest.param("torchvision", "resnext50_32x4d", "global", marks=pytest.mark.slow),
    pytest.param("torchvision", "regnet_x_400mf", "global", marks=pytest.mark.slow),
    ("timm", "regnetx_002", "local"), ("timm", "regnety_002", "local"),
]  # fmt: skip


@pytest.mark.parametrize(("source", "name", "scope"), GROUPED)
def test_grouped_convolutions_lose_only_channels_that_do_nothing(source: str, name: str, scope: str) -> None:
    """The first quarter of every BatchNorm's channels is zero (γ = β = 0): whole first convolution groups in
    ResNeXt and RegNet, which an equal count from every group cannot take; pruning 10% must change nothing,
    under global ranking and under local (every group loses the same fraction, whole convolution groups too)."""
    if source == "torchvision":
        torchvision = pytest.importorskip("torchvision")
        torch.manual_seed(0)
        model, x = torchvision.models.get_model(name, weights=None), torch.randn(2, 3, 64, 64)
    else:
        model, x = build(name)
    batch_norms_that_matter(model)
    zero_first_quarter_of_batch_norms(model)
    grouped = {
        n: m.groups for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d) and 1 < m.groups < m.in_channels
    }
    model.eval()
    with torch.no_grad():
        dense = model(x)
    result = lp.prune(model, x, 0.1, "bn_scale", scope=scope)
    assert result.params_after < 0.9 * result.params_before
    assert set(result.unprunable) == {"fc" if source == "torchvision" else "head.fc"}
    fewer = {n for n, m in model.named_modules() if n in grouped and m.groups < grouped[n]}
    assert fewer  # whole convolution groups went
    for n in fewer:
        conv = model.get_submodule(n)
        assert conv.in_channels == conv.weight.shape[1] * conv.groups and conv.out_channels % conv.groups == 0
    with torch.no_grad():
        assert relative_error(model(x), dense) < 1e-5
    train_one_step(model, x)


def test_whole_convolution_groups_replay_on_a_fresh_model() -> None:
    model, x = build("regnetx_002")
    zero_first_quarter_of_batch_norms(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    result = lp.prune(model, x, 0.1, "bn_scale")
    fresh, _ = build("regnetx_002")
    fresh.load_state_dict(state)
    lp.restore(fresh, result.record)
    fresh.load_state_dict(model.state_dict())
    assert [m.groups for m in fresh.modules() if isinstance(m, torch.nn.Conv2d)] == [
        m.groups for m in model.modules() if isinstance(m, torch.nn.Conv2d)
    ]
    model.eval(), fresh.eval()
    with torch.no_grad():
        assert torch.equal(model(x), fresh(x))


def test_global_response_norm_follows_its_channels() -> None:
    model, x = build("convnextv2_atto", 32, depths=(1, 1, 1, 1))
    norms = {name: m for name, m in model.named_modules() if type(m).__name__ == "GlobalResponseNorm"}
    assert len(norms) == 4
    graph = build_graph(model, x)
    hidden = [g for g in graph.groups if any(m.slot.tensor.endswith("mlp.grn.weight") for m in g.members)]
    assert len(hidden) == 4 and all(g.normalized for g in hidden)
    result = lp.prune(model, x, 0.3, "l1", ignore=["head.fc"])
    assert not [reason for reason in result.unprunable.values() if "grn" in reason]
    for name, norm in norms.items():
        fc1 = model.get_submodule(name.removesuffix("grn") + "fc1")
        assert norm.weight.shape == norm.bias.shape == fc1.weight.shape[:1]
    assert model.get_submodule("stages.0.blocks.0.mlp.fc1").weight.shape[0] < 4 * 40
    with torch.no_grad():
        assert model.eval()(x).shape == (2, 1000)
    train_one_step(model, x)


@pytest.mark.parametrize("depthwise", [True, False])
def test_parts_of_a_list_of_split_sizes_lose_different_counts_exactly(depthwise: bool) -> None:
    torch.manual_seed(0)
    mixed = timm.layers.MixedConv2d(24, 24, [3, 5, 7], depthwise=depthwise)
    nn = torch.nn
    model = nn.Sequential(
        nn.Conv2d(3, 24, 1), nn.BatchNorm2d(24), nn.ReLU(), mixed, nn.BatchNorm2d(24), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(24, 5),
    ).eval()  # fmt: skip
    for norm in (model[1], model[4]):
        nn.init.uniform_(norm.weight, 0.5, 1.5)
        nn.init.uniform_(norm.bias, -0.5, 0.5)
        with torch.no_grad():
            norm.weight[:6] = norm.bias[:6] = 0  # all in the first part of the split
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        before = model(x)
    lp.prune(model, x, 0.1, "bn_scale")
    convs = list(mixed.values())
    assert mixed.splits == [c.weight.shape[1] * c.groups for c in convs] and mixed.splits[1:] == [8, 8]
    assert mixed.splits[0] < 8
    with torch.no_grad():
        assert relative_error(model(x), before) < 1e-5
    train_one_step(model, x)


def test_a_slice_up_to_the_whole_width_follows_the_cut_exactly() -> None:
    torch.manual_seed(0)
    ghost = timm.models.ghostnet.GhostModule(8, 16)  # `out[:, :16]` of the 8 + 8 channels it concatenates
    nn = torch.nn
    model = nn.Sequential(
        nn.Conv2d(3, 8, 1), nn.BatchNorm2d(8), ghost, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5)
    ).eval()
    for norm in (m for m in model.modules() if isinstance(m, nn.BatchNorm2d)):
        nn.init.uniform_(norm.weight, 0.5, 1.5)
        with torch.no_grad():
            norm.weight[:2] = norm.bias[:2] = 0
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        before = model(x)
    result = lp.prune(model, x, 0.2, "bn_scale")
    assert not [reason for reason in result.unprunable.values() if "getitem" in reason]
    assert ghost.primary_conv[0].out_channels < 8
    with torch.no_grad():
        assert relative_error(model(x), before) < 1e-5
    train_one_step(model, x)


@pytest.mark.parametrize(("dead", "groups_after"), [("first block", 3), ("first of every block", 4)])
def test_local_scope_chooses_whole_convolution_groups_or_an_equal_count_by_importance(
    dead: str, groups_after: int
) -> None:
    """Every group must lose a quarter under local scope: one whole convolution group of four, or one channel
    from each. Whichever holds the dead channels (γ = β = 0 on both sides of the grouped convolution) is
    cheaper, and so taken; either way the output stays the same."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 1), torch.nn.BatchNorm2d(16), torch.nn.ReLU(),
        torch.nn.Conv2d(16, 16, 3, padding=1, groups=4), torch.nn.BatchNorm2d(16), torch.nn.ReLU(),
        torch.nn.Conv2d(16, 8, 1),
    )  # fmt: skip
    batch_norms_that_matter(model)
    channels = [0, 1, 2, 3] if dead == "first block" else [0, 4, 8, 12]
    with torch.no_grad():
        for norm in (model[1], model[4]):
            norm.weight[channels] = 0.0
            norm.bias[channels] = 0.0
    x = torch.randn(2, 3, 8, 8)
    model.eval()
    with torch.no_grad():
        dense = model(x)
    lp.prune(model, x, 0.25, "bn_scale", scope="local")
    assert model[3].groups == groups_after and model[3].out_channels == 12
    with torch.no_grad():
        assert relative_error(model(x), dense) < 1e-5


def test_vit_attention_loses_whole_heads_and_computes_what_zeroed_heads_do() -> None:
    """timm's ``Attention`` reshapes q/k/v by its stored ``num_heads``: after a cut of whole heads it reads the
    count its projection has left (before, the re-trace failed and the attention and the stream stayed whole)."""
    model, x = build("vit_tiny_patch16_224", 32, img_size=32, patch_size=8, depth=2, num_heads=4)
    model.eval()
    graph, plan = exact_plan(model, x, 0.5, "l1")
    reference = removed_zeroed(model, graph, plan)
    cuts = plan_cuts(graph, plan)
    apply_cuts(model, cuts)
    lp.verify_pruned(model, x, graph, cuts)
    heads = [block.attn.num_heads for block in model.blocks]
    assert all(h < 4 for h in heads)
    assert all(b.attn.qkv.out_features == 3 * b.attn.attn_dim == 3 * b.attn.num_heads * 48 for b in model.blocks)
    with torch.no_grad():
        assert relative_error(model(x), reference(x)) < 1e-5
    fresh, _ = build("vit_tiny_patch16_224", 32, img_size=32, patch_size=8, depth=2, num_heads=4)
    result = lp.prune(fresh, x, 0.4, "l1", scope="local")
    assert [b.attn.num_heads for b in fresh.blocks] == [3, 3] and not result.unprunable.keys() - {"head"}
    train_one_step(fresh, x)
