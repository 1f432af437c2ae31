"""Importance criteria: shapes, determinism, hand computations, hooks that leave no trace, DDP agreement."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from nets import SMALL_NETS, PlainCNN, small_input
from torch import nn

import lightning_prune as lp
from lightning_prune.errors import PruningError
from lightning_prune.importance import CRITERIA, ScoringContext, get_criterion, score
from lightning_prune.methods.flap import _consumers
from lightning_prune.selection import normalize_scores
from lightning_prune.statistics import GradientStatistics, collect_statistics


def batches(count: int = 3, size: int = 8) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(3)
    return [
        (torch.randn(size, 3, 16, 16, generator=generator), torch.randint(0, 10, (size,), generator=generator))
        for _ in range(count)
    ]


def cross_entropy(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return F.cross_entropy(model(batch[0]), batch[1])


def all_scores(model: nn.Module, importance: str, seed: int = 0) -> list:
    graph = lp.build_graph(model, small_input())
    criterion = get_criterion(importance, seed=seed)
    collect = getattr(criterion, "collect", collect_statistics)  # LLM-Pruner's, Wanda-sp's: their own kind
    forward_only = not getattr(criterion, "needs_loss", True)  # activation statistics take model inputs
    data = [x for x, _ in batches()] if forward_only else batches()
    statistics = collect(model, graph, data, cross_entropy)
    return graph, score(graph.groups, ScoringContext(model, statistics), criterion)


@pytest.mark.parametrize("importance", sorted(CRITERIA))
@pytest.mark.parametrize("name", sorted(SMALL_NETS))
def test_scores_are_one_finite_value_per_element_and_deterministic(name: str, importance: str) -> None:
    torch.manual_seed(0)
    model = SMALL_NETS[name]()
    graph, first = all_scores(model, importance)
    _, second = all_scores(model, importance)
    has_batch_norm = any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    if importance in ("flap", "wanda_sp"):  # they score the inputs of linear layers: groups that feed one
        consumers = set(_consumers(model, graph))
        feeds = [any(m.slot.tensor in consumers for m in g.members_with_role("in")) for g in graph.groups]
        assert [s is not None for s in first] == feeds
    else:
        assert any(s is not None for s in first) == (importance != "bn_scale" or has_batch_norm)
    for group, values, again in zip(graph.groups, first, second, strict=True):
        if values is None:
            assert importance in ("bn_scale", "flap", "wanda_sp")
            continue
        assert values.shape == (group.width,)
        assert torch.isfinite(values).all()
        assert torch.equal(values, again)


@pytest.mark.parametrize("importance", ["taylor", "fisher", "fpgm"])
@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_small", "densenet121"])
def test_criteria_prune_torchvision_models(name: str, importance: str) -> None:
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None, num_classes=10)
    data = [(torch.randn(4, 3, 64, 64), torch.randint(0, 10, (4,))) for _ in range(2)]
    result = lp.prune(model, torch.randn(2, 3, 64, 64), 0.4, importance, batches=data, loss_fn=cross_entropy)
    assert result.params_after < result.params_before
    model(torch.randn(2, 3, 64, 64)).sum().backward()


def test_bn_scale_is_the_absolute_batch_norm_scale() -> None:
    model = PlainCNN()
    with torch.no_grad():
        model.features[1].weight.uniform_(-1, 1)
    graph, scores = all_scores(model, "bn_scale")
    index = next(i for i, g in enumerate(graph.groups) if g.name == "features.0")
    assert torch.equal(scores[index], model.features[1].weight.detach().abs().to(torch.float64))


class Coupled(nn.Module):
    """Two producers summed into one stream (one group) feeding a head; plus a plain hidden layer."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 3)
        self.b = nn.Linear(4, 3)
        self.hidden = nn.Linear(3, 5)
        self.head = nn.Linear(5, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.hidden(self.a(x) + self.b(x))))


def test_taylor_and_fisher_equal_a_hand_computation() -> None:
    torch.manual_seed(0)
    model = Coupled()
    data = [torch.randn(5, 4) for _ in range(3)]
    graph = lp.build_graph(model, data[0])
    statistics = collect_statistics(model, graph, data, lambda m, x: m(x).square().sum())

    taylor_hidden = torch.zeros(5, dtype=torch.float64)
    fisher_hidden = torch.zeros(5, dtype=torch.float64)
    fisher_stream = torch.zeros(3, dtype=torch.float64)
    taylor_a = torch.zeros(3, dtype=torch.float64)
    for x in data:
        a, b = model.a(x), model.b(x)
        hidden = model.hidden(a + b)
        a.retain_grad(), b.retain_grad(), hidden.retain_grad()
        model.head(torch.tanh(hidden)).square().sum().backward()
        taylor_hidden += (hidden * hidden.grad).sum(0).abs().double()
        fisher_hidden += (hidden * hidden.grad).square().sum(0).double()  # a group of one producer, in order
        taylor_a += (a * a.grad).sum(0).abs().double()
        fisher_stream += ((a * a.grad + b * b.grad) ** 2).sum(0).double()  # one mask shared by a and b
        model.zero_grad()
    assert torch.allclose(statistics["taylor"]["hidden.weight"], taylor_hidden, rtol=1e-5)
    assert torch.allclose(statistics["fisher"]["hidden.weight"], fisher_hidden, rtol=1e-5)
    assert torch.allclose(statistics["taylor"]["a.weight"], taylor_a, rtol=1e-5)
    assert torch.allclose(statistics["fisher"]["a.weight"], fisher_stream, rtol=1e-5)
    assert torch.allclose(statistics["fisher"]["b.weight"], fisher_stream, rtol=1e-5)

    stream = next(g for g in graph.groups if g.name == "a")
    fisher = get_criterion("fisher")(stream, ScoringContext(model, statistics))
    assert torch.allclose(fisher, fisher_stream, rtol=1e-5)


class TwoMaps(nn.Module):
    """A convolution on a 16x16 map and one on an 8x8 map: the two ways per-example sums over positions are taken."""

    def __init__(self) -> None:
        super().__init__()
        self.large, self.small, self.head = (
            nn.Conv2d(3, 6, 3, padding=1),
            nn.Conv2d(6, 5, 3, padding=1),
            nn.Linear(5, 2),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        small = self.small(F.max_pool2d(torch.tanh(self.large(x)), 2))
        return self.head(torch.tanh(small).mean((2, 3)))


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_convolution_statistics_equal_a_hand_computation_on_small_and_large_maps(channels_last: bool) -> None:
    torch.manual_seed(0)
    model = TwoMaps()
    data = [torch.randn(n, 3, 16, 16) for n in (4, 3, 4)]
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        data = [x.contiguous(memory_format=torch.channels_last) for x in data]
    graph = lp.build_graph(model, data[0])
    statistics = collect_statistics(model, graph, data, lambda m, x: m(x).square().sum())
    expected = {kind: {name: torch.zeros(c, dtype=torch.float64) for name, c in (("large", 6), ("small", 5))}
                for kind in ("taylor", "fisher")}  # fmt: skip
    for x in data:
        large = model.large(x)
        small = model.small(F.max_pool2d(torch.tanh(large), 2))
        large.retain_grad(), small.retain_grad()
        model.head(torch.tanh(small).mean((2, 3))).square().sum().backward()
        for name, output in (("large", large), ("small", small)):
            per_example = (output.double() * output.grad.double()).sum((2, 3))  # d loss / d channel mask
            expected["taylor"][name] += per_example.sum(0).abs()
            expected["fisher"][name] += per_example.square().sum(0)
        model.zero_grad()
    for kind, names in expected.items():
        for name, values in names.items():
            torch.testing.assert_close(statistics[kind][f"{name}.weight"], values, rtol=1e-5, atol=1e-12)


class Sometimes(nn.Module):
    """``b`` joins ``a``'s stream only on batches of odd size: a group member some batches do not see."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.head = nn.Linear(4, 3), nn.Linear(4, 3), nn.Linear(3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        stream = self.a(x) + self.b(x) if x.shape[0] % 2 else self.a(x)
        return self.head(torch.tanh(stream))


@pytest.mark.parametrize("fold_every", [1, 2, 16])
def test_statistics_do_not_depend_on_how_many_batches_are_folded_at_once(monkeypatch, fold_every: int) -> None:
    monkeypatch.setattr("lightning_prune.statistics.FOLD_EVERY", fold_every)
    torch.manual_seed(0)
    model = Sometimes()
    data = [torch.randn(n, 4) for n in (5, 4, 3, 6, 5)]
    graph = lp.build_graph(model, data[0])
    statistics = collect_statistics(model, graph, data, lambda m, x: m(x).square().sum())
    taylor_a, taylor_b, fisher, fisher_b = (torch.zeros(3, dtype=torch.float64) for _ in range(4))
    for x in data:
        a = model.a(x)
        a.retain_grad()
        b = model.b(x) if x.shape[0] % 2 else None
        if b is not None:
            b.retain_grad()
        model.head(torch.tanh(a if b is None else a + b)).square().sum().backward()
        mask = a * a.grad + (0 if b is None else b * b.grad)  # d loss / d a mask shared by a and b
        taylor_a += (a * a.grad).sum(0).abs().double()
        taylor_b += 0 if b is None else (b * b.grad).sum(0).abs().double()
        fisher += mask.square().sum(0).double()
        fisher_b += 0 if b is None else mask.square().sum(0).double()  # b's share: the batches that saw it
        model.zero_grad()
    assert statistics["batches"] == 5
    assert torch.allclose(statistics["taylor"]["a.weight"], taylor_a, rtol=1e-5)
    assert torch.allclose(statistics["taylor"]["b.weight"], taylor_b, rtol=1e-5)
    assert torch.allclose(statistics["fisher"]["a.weight"], fisher, rtol=1e-5)
    assert torch.allclose(statistics["fisher"]["b.weight"], fisher_b, rtol=1e-5)


def test_heads_of_multihead_attention_get_the_derivative_of_a_head_mask() -> None:
    # nn.MultiheadAttention's heads have no producer module a hook could see: their statistics come
    # from W·G of the fused in-projection; a head's fisher is (dL/dm_head)² summed over batches.
    torch.manual_seed(0)
    model = nn.TransformerEncoderLayer(16, 4, 32, batch_first=True, dropout=0.0)
    data = [torch.randn(3, 5, 16) for _ in range(2)]
    graph = lp.build_graph(model, data[0])
    heads = next(g for g in graph.groups if g.width == 4)
    statistics = collect_statistics(model, graph, data, lambda m, x: m(x).square().sum())

    rows = torch.arange(48).remainder(16).div(4, rounding_mode="floor")  # q, k, v rows -> head
    expected = torch.zeros(4, dtype=torch.float64)
    weight = model.self_attn.in_proj_weight.detach()
    for x in data:
        mask = torch.ones(4, requires_grad=True)
        masked = {"self_attn.in_proj_weight": weight * mask[rows].unsqueeze(1)}
        torch.func.functional_call(model, masked, (x,)).square().sum().backward()
        expected += mask.grad.double().square()
    fisher = get_criterion("fisher")(heads, ScoringContext(model, statistics))
    assert torch.allclose(fisher, expected, rtol=1e-4)
    taylor = get_criterion("taylor")(heads, ScoringContext(model, statistics))
    assert taylor.shape == (4,) and bool((taylor > 0).all())
    pruned = copy.deepcopy(model)
    lp.prune(pruned, data[0], amount=0.5, importance="fisher", batches=data, loss_fn=lambda m, x: m(x).square().sum())
    kept = expected.argsort()[2:].sort().values  # the two heads with the largest fisher stay
    assert pruned.self_attn.num_heads == 2
    assert torch.equal(pruned.self_attn.in_proj_weight, weight[torch.isin(rows, kept)])


def test_fpgm_ranks_filters_at_the_median_lowest() -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 6, 3)
    with torch.no_grad():
        center = conv.weight[[0, 1, 3, 5]].mean(0)
        conv.weight[2] = center
        conv.weight[4] = center  # a duplicated filter at the centre of the others: the most replaceable
    model = nn.Sequential(conv, nn.ReLU(), nn.Conv2d(6, 4, 3))
    graph = lp.build_graph(model, small_input())
    scores = get_criterion("fpgm")(graph.groups[0], ScoringContext(model))
    assert set(torch.argsort(scores)[:2].tolist()) == {2, 4}


def test_statistics_hooks_leave_no_trace() -> None:
    torch.manual_seed(0)
    observed, plain = PlainCNN(), PlainCNN()
    plain.load_state_dict(observed.state_dict())
    graph = lp.build_graph(observed, small_input())
    collector = GradientStatistics(observed, graph).attach()
    for model in (observed, plain):
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        for batch in batches(2):
            optimizer.zero_grad()
            cross_entropy(model, batch).backward()
            optimizer.step()
    statistics = collector.detach()
    assert statistics["batches"] == 2 and statistics["taylor"]
    assert all(not m._forward_hooks for m in observed.modules())
    for (name, a), (_, b) in zip(observed.state_dict().items(), plain.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_calibration_restores_gradients_and_batch_norm_statistics() -> None:
    torch.manual_seed(0)
    model = PlainCNN().eval()
    model(small_input()).sum().backward()
    before = copy.deepcopy(model.state_dict())
    grads = [p.grad.clone() for p in model.parameters()]
    lp.prune(copy.deepcopy(model), small_input(), 0.3, "taylor", batches=batches(), loss_fn=cross_entropy)
    collect_statistics(model, lp.build_graph(model, small_input()), batches(), cross_entropy)
    assert not model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(torch.equal(g, p.grad) for g, p in zip(grads, model.parameters(), strict=True))


@pytest.mark.parametrize("importance", ["taylor", "fisher"])
def test_gradient_criterion_without_batches_names_what_is_missing(importance: str) -> None:
    with pytest.raises(PruningError, match="needs `batches` and `loss_fn`"):
        lp.prune(PlainCNN(), small_input(), 0.3, importance)
    with pytest.raises(PruningError, match="needs `loss_fn`"):
        lp.prune(PlainCNN(), small_input(), 0.3, importance, batches=batches())


def test_non_finite_statistics_name_the_layer() -> None:
    model = PlainCNN()
    graph = lp.build_graph(model, small_input())
    statistics = collect_statistics(model, graph, batches(), cross_entropy)
    statistics["taylor"]["features.3.weight"][0] = float("nan")
    with pytest.raises(PruningError, match=r"NaN or -inf scores for group `features\.3`"):
        lp.prune(model, small_input(), 0.3, "taylor", statistics=statistics)


def test_lamp_normalisation() -> None:
    scores = torch.tensor([1.0, 3.0, 2.0, float("inf")], dtype=torch.float64)
    expected = torch.tensor([1 / 6, 3 / 3, 2 / 5, float("inf")], dtype=torch.float64)
    assert torch.allclose(normalize_scores(scores, "lamp"), expected)


@pytest.mark.parametrize("calibration", [0, 3])
def test_structured_pruning_with_gradient_statistics_in_a_trainer(tmp_path, calibration: int) -> None:
    import lightning.pytorch as pl

    from lightning_prune.callbacks import StructuredPruning
    from lightning_prune.data import DigitsDataModule
    from lightning_prune.models import ImageClassifier

    pl.seed_everything(0, verbose=False)
    model = ImageClassifier(arch_kwargs={"channels": [8, 16, 32]})
    pruning = StructuredPruning(0.4, "taylor", start_epoch=1, calibration_batches=calibration, log_table=False)
    trainer = pl.Trainer(
        max_epochs=2, limit_train_batches=4, limit_val_batches=1, logger=False, enable_progress_bar=False,
        enable_checkpointing=False, enable_model_summary=False, default_root_dir=tmp_path, callbacks=[pruning],
    )  # fmt: skip
    trainer.fit(model, DigitsDataModule())
    assert pruning.done[1]["removed"] > 0
    assert all(not m._forward_hooks for m in model.modules())


def test_ddp_ranks_make_the_same_cut_from_reduced_statistics(completed_job) -> None:
    root = completed_job("--devices", "2", "--importance", "fisher")
    ranks = [torch.load(root / f"final-rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert ranks[0]["record"] == ranks[1]["record"] and len(ranks[0]["record"]["steps"]) == 3
    for key, value in ranks[0]["state_dict"].items():
        assert torch.equal(value, ranks[1]["state_dict"][key]), key  # still in sync after further training
