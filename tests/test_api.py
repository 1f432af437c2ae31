"""``prune`` end to end: scopes, rounding, compute targets, inputs, verification and bad input."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from nets import SMALL_NETS, PlainCNN, ResidualNet, small_input
from torch import nn

import lightning_prune as lp
from lightning_prune.errors import PruningError, TraceError, VerificationError


def widths(model: nn.Module) -> dict[str, int]:
    return {n: m.out_channels for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}


def unchanged(model: nn.Module, before: dict) -> bool:
    return all(torch.equal(before[k], v) for k, v in model.state_dict().items()) and len(before) == len(
        model.state_dict()
    )


def test_local_scope_removes_the_same_fraction_of_every_group() -> None:
    model = PlainCNN()
    lp.prune(model, small_input(), 0.5, scope="local")
    assert widths(model) == {"features.0": 8, "features.3": 12, "features.7": 16}
    assert model.classifier[1].out_features == 20 and model.classifier[1].in_features == 16 * 16


def test_global_scope_removes_the_requested_fraction_overall() -> None:
    torch.manual_seed(0)
    model = PlainCNN()
    result = lp.prune(model, small_input(), 0.5)
    removed = sum(change.before - change.after for change in result.layers)
    assert removed == 56  # half of 16 + 24 + 32 + 40 prunable channels
    assert len(set(widths(model).values())) > 1  # global ranking: not uniform


@pytest.mark.parametrize("target", ["channels", "macs"])
def test_tied_scores_remove_exactly_what_was_asked(target: str) -> None:
    model = ResidualNet()  # fresh BatchNorm scales are all 1: every bn_scale score ties
    result = lp.prune(model, small_input(), 0.5, "bn_scale", target=target)
    if target == "channels":
        assert result.channels_removed == round(0.5 * result.channels_before)
    else:
        assert 0.4 * result.macs_before < result.macs_after <= 0.5 * result.macs_before


def test_round_to_and_max_fraction_bound_every_layer() -> None:
    torch.manual_seed(0)
    model = ResidualNet()
    lp.prune(model, small_input(), 0.5, round_to=4, max_fraction=0.5)  # global: some layers want more than half
    for name, width in widths(model).items():
        assert width % 4 == 0, name
    assert widths(model)["block1.0"] >= 6 and widths(model)["block2.0"] >= 10


@pytest.mark.parametrize("target", ["macs", "params"])
def test_compute_targets_are_met(target: str) -> None:
    torch.manual_seed(0)
    model = PlainCNN()
    result = lp.prune(model, small_input(), 0.5, target=target)
    before, after = (
        (result.macs_before, result.macs_after) if target == "macs" else (result.params_before, result.params_after)
    )
    assert 0.40 * before < after <= 0.5 * before
    assert lp.count_params(model) == result.params_after
    assert lp.count_macs(model, small_input()) == result.macs_after


def test_example_inputs_as_tuple_and_dict() -> None:
    class TwoInputs(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Conv2d(3, 8, 3)
            self.b = nn.Conv2d(8, 4, 3)

        def forward(self, image: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
            return self.b(F.relu(self.a(image))) * scale

    x, scale = small_input(), torch.tensor(2.0)
    for inputs in [(x, scale), {"image": x, "scale": scale}]:
        model = TwoInputs()
        lp.prune(model, inputs, 0.5)
        assert model.a.out_channels == 4


def test_result_reports_a_table_and_totals() -> None:
    result = lp.prune(PlainCNN(), small_input(), 0.5, scope="local")
    table = result.table().splitlines()
    assert table[0].split() == ["layer", "width"]
    assert "features.0  " in table[1] and table[1].endswith("16 -> 8")
    assert "params" in str(result) and 0 < result.macs_ratio < 1


def test_verification_rolls_back_code_that_does_not_follow_a_width() -> None:
    class Stale(nn.Module):
        """Reshapes with a channel count fixed at construction: wrong, silently, once pruned."""

        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 16, 3, padding=1)
            self.head = nn.Linear(16, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.conv(x)
            return self.head(y.reshape(y.shape[0], 16, -1).mean(-1))

    model = Stale()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(VerificationError, match="the pruned model deviates from the plan and was restored"):
        lp.prune(model, small_input(), 0.5)
    assert unchanged(model, before) and model.conv.out_channels == 16


def test_modules_whose_code_does_not_follow_are_left_alone_and_the_rest_is_pruned() -> None:
    class Heads(nn.Module):
        """Attention-like code deriving its head size from the input width (like torchvision's swin)."""

        def __init__(self, dim: int = 16) -> None:
            super().__init__()
            self.qkv = nn.Linear(dim, 3 * dim)
            self.proj = nn.Linear(dim, dim)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            b, n, c = x.shape
            q, k, v = self.qkv(x).reshape(b, n, 3, c).unbind(2)
            return x + self.proj(q * k.sigmoid() + v)

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Linear(8, 16)
            self.block = Heads()
            self.hidden = nn.Linear(16, 32)
            self.head = nn.Linear(32, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(F.relu(self.hidden(self.block(self.embed(x)))))

    model = Net()
    result = lp.prune(model, torch.randn(2, 5, 8), 0.5)
    assert "does not follow a pruned width" in result.unprunable["embed"]
    assert model.embed.out_features == 16 and model.hidden.out_features < 32


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"amount": -0.1}, r"`amount` must be a fraction in \[0, 1\), got -0.1"),
        ({"amount": 1.0}, r"`amount` must be a fraction in \[0, 1\), got 1.0"),
        ({"amount": "half"}, "`amount` must be a fraction"),
        (
            {"importance": "taylorr"},
            "`importance` 'taylorr' is not a known criterion. Known: bn_scale, fisher, flap, fpgm, l1, l2, random, "
            "taylor",
        ),
        ({"scope": "everywhere"}, "`scope` must be one of global, local"),
        ({"round_to": 0}, "`round_to` must be a positive integer"),
        ({"target": "flops"}, "`target` must be one of channels, macs, params"),
        ({"ignore": ["layer4"]}, "`ignore` entry 'layer4' matches no module of the model"),
        ({"ignore": 4}, r"`ignore` must be a list of module names or glob patterns, got int 4"),
        ({"aggregate": "median"}, "`aggregate` must be one of sum, mean, max"),
    ],
)
def test_bad_arguments_are_named_and_leave_the_model_unchanged(kwargs: dict, message: str) -> None:
    model = PlainCNN()
    before = copy.deepcopy(model.state_dict())
    arguments = {"amount": 0.3, **kwargs}
    with pytest.raises(PruningError, match=message):
        lp.prune(model, small_input(), **arguments)
    assert unchanged(model, before)


def test_ignore_takes_none_or_one_pattern_as_a_string() -> None:
    def fresh() -> PlainCNN:
        torch.manual_seed(0)
        return PlainCNN()

    none = lp.prune(fresh(), small_input(), 0.3, ignore=None)
    default = lp.prune(fresh(), small_input(), 0.3)
    assert none.record == default.record and none.layers
    model = fresh()
    kept = lp.prune(model, small_input(), 0.3, ignore="features.0")
    assert model.features[0].out_channels == 16 and kept.unprunable["features.0"].endswith("listed in `ignore`")


def test_wrong_example_inputs_name_the_argument_and_the_module() -> None:
    model = PlainCNN()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(TraceError, match=r"`example_inputs` in eval mode failed in module `features.0`"):
        lp.prune(model, torch.randn(2, 5, 16, 16), 0.3)  # no forward branches on `training`: eval only
    with pytest.raises(TraceError, match=r"`example_inputs` in train mode failed in module `features.0`"):
        lp.prune(model, torch.randn(2, 5, 16, 16), 0.3, modes=("train", "eval"))
    with pytest.raises(TraceError, match=r"failed in module `classifier\.1`"):
        lp.prune(model, torch.randn(2, 3, 20, 20), 0.3)
    assert unchanged(model, before)


def test_model_that_cannot_run_is_reported() -> None:
    class Broken(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            raise RuntimeError("this model only runs on a GPU")

    with pytest.raises(TraceError, match="failed in module `<model>`: RuntimeError: this model only runs on a GPU"):
        lp.prune(Broken(), small_input(), 0.3)


def test_batch_of_one_with_batch_norm_gets_a_hint_when_traced_in_training() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 16), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 2))
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(TraceError, match="batch of at least 2 examples"):
        lp.prune(model, torch.randn(1, 3, 16, 16), 0.3, modes=("train", "eval"))
    assert unchanged(model, before)
    # nothing here branches on `training`, so the default traces in eval mode, where one example is enough
    assert lp.prune(model, torch.randn(1, 3, 16, 16), 0.3).params_after < lp.count_params(
        nn.Sequential(nn.Conv2d(3, 4, 16), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 2))
    )


class Auxiliary(nn.Module):
    """A head that runs only in training, as in Inception: its input channels must be traced too."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU())
        self.aux = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2))
        self.head = nn.Sequential(nn.Conv2d(8, 8, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.stem(x)
        out = self.head(features)
        return out + self.aux(features) if self.training else out


def test_a_forward_that_branches_on_training_is_traced_in_both_modes() -> None:
    from lightning_prune.running import tracing_modes

    assert tracing_modes(PlainCNN()) == ("eval",) and tracing_modes(Auxiliary()) == ("train", "eval")
    model = Auxiliary()
    lp.prune(model, torch.randn(2, 3, 12, 12), 0.5)
    assert model.aux[2].in_features == model.stem[0].out_channels < 8  # the training-only head followed the cut
    model.train()(torch.randn(2, 3, 12, 12))


def test_non_finite_scores_name_the_layer() -> None:
    model = PlainCNN()
    with torch.no_grad():
        model.features[3].weight[0, 0, 0, 0] = float("nan")
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(PruningError, match=r"NaN or -inf scores for group `features\.3`"):
        lp.prune(model, small_input(), 0.3)
    assert all(torch.equal(before[k], v) or k == "features.3.weight" for k, v in model.state_dict().items())


@pytest.mark.parametrize("name", sorted(SMALL_NETS))
def test_amount_zero_changes_nothing(name: str) -> None:
    model = SMALL_NETS[name]()
    before = copy.deepcopy(model.state_dict())
    with pytest.warns(UserWarning, match=r"^`amount=0`: nothing will be pruned"):
        result = lp.prune(model, small_input(), 0.0)
    assert result.layers == [] and unchanged(model, before)


def test_a_criterion_that_scores_no_group_is_refused_by_name() -> None:
    model = PlainCNN(batch_norm=False)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(
        PruningError,
        match=r"^`importance='bn_scale'` scored none of the 4 prunable groups of PlainCNN, so `amount=0.3` would "
        r"remove nothing .* Choose another criterion, e\.g\. 'l1'\.$",
    ):
        lp.prune(model, small_input(), 0.3, "bn_scale")
    assert unchanged(model, before)

    def abstains(group, context):
        return None

    with pytest.raises(PruningError, match=r"^`importance='abstains'` scored none of the 4 prunable groups"):
        lp.prune(model, small_input(), 0.3, abstains)


@pytest.mark.parametrize("target", ["channels", "params", "macs"])
def test_a_second_call_given_the_dense_size_reaches_the_amount_of_the_dense_model(target: str) -> None:
    torch.manual_seed(0)
    model, x = ResidualNet(), small_input()
    first = lp.prune(model, x, 0.3, target=target)
    second = lp.prune(model, x, 0.6, target=target, dense=first.dense)
    dense = second.dense
    assert (dense.params, dense.macs, dense.units) == (first.params_before, first.macs_before, first.channels_before)
    assert dense.removed == first.channels_removed + second.channels_removed
    if target == "channels":
        assert dense.removed == round(0.6 * dense.units)
    else:
        reached = second.params_after if target == "params" else second.macs_after
        reference = dense.params if target == "params" else dense.macs
        assert 0.35 * reference < reached <= 0.4 * reference  # 60% of the dense model gone, not 60% of the rest
    assert lp.DenseSize.from_dict(dense.to_dict()) == dense


def test_a_dense_size_reads_what_release_0_1_stored_in_callback_state() -> None:
    assert lp.DenseSize.from_dict({"channels": 80, "params": 9202, "macs": 924160}, removed=13) == lp.DenseSize(
        9202, 924160, 80, 13
    )
    assert lp.DenseSize.from_dict({"blocks": 4, "params": 35242, "macs": 4213248}).units == 4
    with pytest.raises(PruningError, match="a dense size needs `params`, `macs` and `units`"):
        lp.DenseSize.from_dict({"params": 1})
