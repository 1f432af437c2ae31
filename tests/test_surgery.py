"""Surgery mechanics: parameter identity, gradients, optimizer state, layer registry, records."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from nets import SMALL_NETS, GroupedNet, MobileNet, PlainCNN, ResidualNet, small_input
from torch import nn

import lightning_prune as lp
from lightning_prune.cuts import Cut
from lightning_prune.errors import RecordError
from lightning_prune.fixups import LAYER_FIXUPS
from lightning_prune.record import parse_record
from lightning_prune.slicing import slice_tensor


def train_steps(model: nn.Module, optimizer: torch.optim.Optimizer, steps: int = 2) -> None:
    for _ in range(steps):
        optimizer.zero_grad()
        model(small_input()).square().mean().backward()
        optimizer.step()


@pytest.mark.parametrize(
    "make_optimizer",
    [
        lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
        lambda p: torch.optim.AdamW(p, lr=1e-3),
        lambda p: torch.optim.Adam(p, lr=1e-3, amsgrad=True),
    ],
    ids=["sgd_momentum", "adamw", "adam_amsgrad"],
)
def test_optimizer_state_is_sliced_bit_identically(make_optimizer) -> None:
    torch.manual_seed(0)
    model = ResidualNet()
    optimizer = make_optimizer(model.parameters())
    train_steps(model, optimizer)
    model(small_input()).sum().backward()  # a pending gradient must be sliced too
    params = dict(model.named_parameters())
    before_state = {name: {k: v.clone() for k, v in optimizer.state[p].items()} for name, p in params.items()}
    before_grad = {name: p.grad.clone() for name, p in params.items()}
    identities = {name: id(p) for name, p in params.items()}

    result = lp.prune(model, small_input(), 0.4, optimizers=[optimizer])

    cuts = parse_record(result.record)[0].cuts
    assert cuts
    by_tensor: dict[str, list[Cut]] = {}
    for cut in cuts:
        by_tensor.setdefault(cut.tensor, []).append(cut)
    assert {name: id(p) for name, p in model.named_parameters()} == identities
    assert [id(p) for p in optimizer.param_groups[0]["params"]] == list(identities.values())
    for name, param in model.named_parameters():
        tensor_cuts = by_tensor.get(name, [])
        for key, value in optimizer.state[param].items():
            if value.ndim == 0:
                assert torch.equal(value, before_state[name][key])
                continue
            assert value.shape == param.shape
            assert torch.equal(value, slice_tensor(before_state[name][key], tensor_cuts))
        assert torch.equal(param.grad, slice_tensor(before_grad[name], tensor_cuts))
    train_steps(model, optimizer)  # the optimizer keeps working on the smaller parameters


@pytest.mark.parametrize("name", sorted(SMALL_NETS))
def test_undo_rebuilds_weights_gradients_and_optimizer_state_from_the_removed_entries_only(name: str) -> None:
    torch.manual_seed(0)
    model, x = SMALL_NETS[name](), small_input()
    optimizer = torch.optim.Adam(model.parameters())
    train_steps(model, optimizer)
    model(x).sum().backward()
    before, layers = copy.deepcopy(model.state_dict()), repr(model)
    grads = {key: p.grad.clone() for key, p in model.named_parameters() if p.grad is not None}
    state = copy.deepcopy(optimizer.state_dict()["state"])
    cuts = parse_record(lp.prune(copy.deepcopy(model), x, 0.5, scope="local").record)[0].cuts
    entries = sum(t.numel() for t in model.state_dict().values())

    undo = lp.apply_cuts(model, cuts, [optimizer], undoable=True)

    kept = sum(t.numel() for t in model.state_dict().values())
    assert sum(part.numel() for _, _, removed, _ in undo.tensors for part in removed) == entries - kept  # no copies
    undo()
    assert repr(model) == layers  # widths, groups and replaced modules are back
    assert all(torch.equal(before[key], value) for key, value in model.state_dict().items())
    assert all(torch.equal(grads[key], p.grad) for key, p in model.named_parameters() if key in grads)
    after = optimizer.state_dict()["state"]
    assert all(
        torch.equal(value, after[index][key]) for index, values in state.items() for key, value in values.items()
    )
    train_steps(model, optimizer)


@pytest.mark.parametrize("name", ["residual", "mobile", "grouped"])
def test_a_channels_last_model_stays_channels_last_through_cut_and_undo(name: str) -> None:
    torch.manual_seed(0)
    plain, x = SMALL_NETS[name]().eval(), small_input()
    model = copy.deepcopy(plain).to(memory_format=torch.channels_last)
    x_last = x.contiguous(memory_format=torch.channels_last)
    before = copy.deepcopy(model.state_dict())
    cuts = parse_record(lp.prune(copy.deepcopy(plain), x, 0.5, scope="local").record)[0].cuts

    def layouts() -> set[bool]:
        weights = [m.weight for m in model.modules() if isinstance(m, nn.Conv2d) and m.weight.shape[-1] > 1]
        return {w.is_contiguous(memory_format=torch.channels_last) for w in weights}  # (depthwise: both layouts)

    undo = lp.apply_cuts(model, cuts, undoable=True)
    lp.apply_cuts(plain, cuts)
    assert layouts() == {True}  # every 3x3 weight as the user laid it out, not back in NCHW
    with torch.no_grad():
        out = model(x_last)
        torch.testing.assert_close(out, plain(x), atol=1e-5, rtol=1e-5)
    undo()
    assert layouts() == {True} and all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_grouped_slicing_keeps_each_groups_own_columns() -> None:
    weight = torch.arange(4 * 3 * 1 * 1, dtype=torch.float32).view(4, 3, 1, 1)  # 2 groups of 3 inputs
    cut = Cut("w", 1, 6, [0, 2, 4, 5], groups=2)
    sliced = slice_tensor(weight, [cut])
    assert torch.equal(sliced[:2, :, 0, 0], weight[:2, [0, 2], 0, 0])  # group 0 keeps inputs 0, 2
    assert torch.equal(sliced[2:, :, 0, 0], weight[2:, [1, 2], 0, 0])  # group 1 keeps inputs 4, 5


@pytest.mark.parametrize("make", [GroupedNet, MobileNet], ids=["grouped", "depthwise"])
def test_group_attributes_follow_the_surgery(make) -> None:
    torch.manual_seed(0)
    model, x = make(), small_input()
    lp.prune(model, x, 0.5, scope="local")
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            assert module.weight.shape[0] == module.out_channels
            assert module.weight.shape[1] * module.groups == module.in_channels
        if isinstance(module, nn.GroupNorm):
            assert module.num_channels % module.num_groups == 0
    model(x)


def test_registered_layer_updates_its_attributes() -> None:
    class Scale(nn.Module):
        def __init__(self, channels: int) -> None:
            super().__init__()
            self.channels = channels
            self.weight = nn.Parameter(torch.ones(channels, 1, 1))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * self.weight

    def fixup(module: Scale) -> None:
        module.channels = module.weight.shape[0]

    lp.register_layer(Scale, fixup)
    try:
        with pytest.raises(ValueError, match="already registered"):
            lp.register_layer(Scale, fixup)
        model = nn.Sequential(nn.Conv2d(3, 8, 3), Scale(8), nn.Conv2d(8, 4, 3))
        lp.prune(model, small_input(), 0.5, scope="local")
        assert model[1].channels == model[1].weight.shape[0] == model[0].out_channels == 4
    finally:
        LAYER_FIXUPS.unregister(Scale)
    assert Scale not in LAYER_FIXUPS


def test_record_is_plain_data_and_restores_after_several_steps(tmp_path) -> None:
    torch.manual_seed(0)
    model, x = PlainCNN(), small_input()
    dense = copy.deepcopy(model.state_dict())
    first = lp.prune(model, x, 0.3)
    second = lp.prune(model, x, 0.3, "l2")
    record = lp.merge_records(first.record, second.record)
    assert json.loads(json.dumps(record)) == record
    torch.save({"record": record}, tmp_path / "r.pt")
    loaded = torch.load(tmp_path / "r.pt", weights_only=True)["record"]
    fresh = PlainCNN()
    fresh.load_state_dict(dense)
    lp.restore(fresh, loaded)
    fresh.load_state_dict(model.state_dict())
    model.eval(), fresh.eval()
    assert torch.equal(model(x), fresh(x))


def corrupt(record: dict, **change) -> dict:
    record = copy.deepcopy(record)
    record["steps"][0]["cuts"][0].update(change)
    return record


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"tensor": "nope.weight"}, "no parameter or buffer `nope.weight`"),
        ({"size": 999}, "expects 999"),
        ({"dim": 7}, "dimensions, the record cuts dimension 7"),
        ({"keep": [3, 1]}, "strictly increasing"),
        ({"keep": [0, 10_000]}, "strictly increasing"),
        ({"keep": []}, "must keep 1..size"),
        ({"keep": "all"}, "list of integers"),
    ],
)
def test_bad_record_is_rejected_before_any_change(change: dict, message: str) -> None:
    torch.manual_seed(0)
    model, x = PlainCNN(), small_input()
    record = lp.prune(copy.deepcopy(model), x, 0.3).record
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(RecordError, match=message):
        lp.restore(model, corrupt(record, **change))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_record_from_another_model_or_a_newer_format_is_rejected() -> None:
    record = lp.prune(PlainCNN(), small_input(), 0.3).record
    with pytest.raises(RecordError, match="Was the record made for another model class"):
        lp.restore(ResidualNet(), record)
    with pytest.raises(RecordError, match="newer than this lightning-prune"):
        lp.restore(PlainCNN(), {**record, "version": 99})
    with pytest.raises(RecordError, match="expected a dict"):
        lp.restore(PlainCNN(), [record])
