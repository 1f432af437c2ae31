"""Property-based tests: random networks of every coupling pattern, random amounts, scopes and criteria.

For each generated case pruning either succeeds or raises one of our documented errors; the pruned
model computes what the dense model computes with the removed channels zeroed; a fresh model plus
the record plus the pruned state_dict reproduces the pruned outputs exactly. ``derandomize=True``
makes the cases the same on every run.
"""

from __future__ import annotations

import copy
import resource

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from nets import SMALL_NETS, removed_zeroed, small_input
from torch import Tensor, nn

import lightning_prune as lp
from lightning_prune import apply_cuts, plan_cuts
from lightning_prune.errors import PruningError, RecordError
from lightning_prune.fixups import LAYER_FIXUPS
from lightning_prune.importance import ScoringContext, get_criterion, score
from lightning_prune.selection import select

KINDS = ["conv", "residual", "concat", "depthwise", "grouped", "gate", "pool"]


def conv_bn(inputs: int, outputs: int, kernel: int = 3, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(inputs, outputs, kernel, padding=kernel // 2, groups=groups), nn.BatchNorm2d(outputs), nn.ReLU()
    )


class Residual(nn.Module):
    def __init__(self, channels: int, width: int) -> None:
        super().__init__()
        self.body = nn.Sequential(conv_bn(channels, width), nn.Conv2d(width, channels, 3, padding=1))

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(x + self.body(x))


class Concat(nn.Module):
    def __init__(self, channels: int, width: int) -> None:
        super().__init__()
        self.a, self.b = conv_bn(channels, width, 1), conv_bn(channels, width + 1)

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([self.a(x), self.b(x)], dim=1)


class Gate(nn.Module):
    def __init__(self, channels: int, width: int) -> None:
        super().__init__()
        self.squeeze, self.excite = nn.Conv2d(channels, width, 1), nn.Conv2d(width, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(self.excite(F.relu(self.squeeze(x.mean((2, 3), keepdim=True)))))


class RandomNet(nn.Module):
    def __init__(self, spec: list[tuple[str, int]], flatten_head: bool) -> None:
        super().__init__()
        layers, channels, size = [conv_bn(3, 8)], 8, 8
        for kind, width in spec:
            if kind == "conv":
                layers.append(conv_bn(channels, width))
                channels = width
            elif kind == "residual":
                layers.append(Residual(channels, width))
            elif kind == "concat":
                layers.append(Concat(channels, width))
                channels = 2 * width + 1
            elif kind == "depthwise":
                layers.append(conv_bn(channels, 2 * channels, groups=channels))
                channels *= 2
            elif kind == "grouped" and channels % 2 == 0:
                layers.append(conv_bn(channels, 2 * width, groups=2))
                channels = 2 * width
            elif kind == "gate":
                layers.append(Gate(channels, width))
            elif kind == "pool" and size >= 4:
                layers.append(nn.MaxPool2d(2))
                size //= 2
        self.features = nn.Sequential(*layers)
        self.flatten_head = flatten_head
        self.head = nn.Linear(channels * size * size if flatten_head else channels, 5)

    def forward(self, x: Tensor) -> Tensor:
        x = self.features(x)
        return self.head(x.flatten(1) if self.flatten_head else x.mean((2, 3)))


networks = st.tuples(
    st.lists(st.tuples(st.sampled_from(KINDS), st.integers(2, 12)), min_size=1, max_size=6), st.booleans()
)


def inputs() -> Tensor:
    return torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))


@settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(
    network=networks,
    amount=st.floats(0.2, 0.95),
    scope=st.sampled_from(["global", "local"]),
    importance=st.sampled_from(["l1", "l2", "bn_scale", "fpgm", "random"]),
    round_to=st.sampled_from([1, 1, 2, 4]),
)
def test_random_networks_prune_exactly_and_restore(network, amount, scope, importance, round_to) -> None:
    spec, flatten_head = network
    torch.manual_seed(0)
    model = RandomNet(spec, flatten_head).eval()
    dense_state = copy.deepcopy(model.state_dict())
    x = inputs()
    try:
        graph = lp.build_graph(model, x)
        scores = score(graph.groups, ScoringContext(model), get_criterion(importance))
        plan = select(graph.groups, scores, amount, scope=scope, round_to=round_to)
    except PruningError as error:
        event(f"rejected: {type(error).__name__}")
        return
    event("pruned something" if plan.count else "nothing to prune at this amount")
    reference = removed_zeroed(model, graph, plan)
    cuts = plan_cuts(graph, plan)
    apply_cuts(model, cuts)
    lp.verify_pruned(model, x, graph, cuts)
    with torch.no_grad():
        pruned, expected = model(x), reference(x)
    assert float((pruned - expected).norm() / expected.norm().clamp(min=1e-12)) < 1e-4

    fresh = RandomNet(spec, flatten_head).eval()
    fresh.load_state_dict(dense_state)
    lp.restore(fresh, lp.record.new_record([cuts]))
    fresh.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert torch.equal(fresh(x), pruned)


@settings(max_examples=30, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(network=networks, amount=st.floats(0.05, 0.9), target=st.sampled_from(["channels", "macs", "params"]))
def test_prune_api_trains_after_any_cut(network, amount, target) -> None:
    spec, flatten_head = network
    torch.manual_seed(0)
    model = RandomNet(spec, flatten_head)
    try:
        result = lp.prune(model, inputs(), amount, target=target)
    except PruningError as error:
        event(f"rejected: {type(error).__name__}")
        return
    event("pruned something" if result.layers else "nothing pruned")
    assert result.params_after <= result.params_before and result.macs_after <= result.macs_before
    model.train()
    model(inputs()).square().mean().backward()
    assert all(p.grad is None or p.grad.shape == p.shape for p in model.parameters())


# --- crafted records ------------------------------------------------------------------------------
RECORD_NETS = ["grouped", "mobile", "mlp", "residual"]
DEEP: list = []
for _ in range(5000):  # deeper than the interpreter's recursion limit: repr() of it fails
    DEEP = [DEEP]
HOSTILE = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.sampled_from([-1, 0, 2**31, 2**63, 2**64, 10**12, float("nan"), float("inf"), 1.5, "", "0", DEEP]),
    st.text(max_size=12),
    st.lists(st.integers(-(2**65), 2**65), max_size=6),
    st.dictionaries(st.text(max_size=6), st.integers(), max_size=3),
)
PATHS = ["", "head", "stem.0", "nope.weight", "head.weight.weight", "stem.0.weight", "stem", "body.1.bias"]


def built(name: str) -> nn.Module:
    torch.manual_seed(0)
    return SMALL_NETS[name]()


def valid_record(name: str) -> dict:
    """A pruning step found by ``prune``, then a step dropping the last entry of the model's first stack."""
    if name not in VALID_RECORDS:
        model = built(name)
        first = lp.prune(model, small_input(), 0.4).record
        stack, blocks = next((n, m) for n, m in model.named_modules() if n and isinstance(m, nn.Sequential))
        drop = lp.Drop(stack, len(blocks), list(range(len(blocks) - 1)))
        VALID_RECORDS[name] = lp.merge_records(first, lp.record.new_record([lp.Step([], [drop])]))
        lp.restore(built(name), VALID_RECORDS[name])  # it is valid
    return copy.deepcopy(VALID_RECORDS[name])


VALID_RECORDS: dict[str, dict] = {}


def places(tree: object, path: tuple = ()) -> list[tuple]:
    """Paths to every dict value and list item of ``tree``."""
    found = [path]
    if isinstance(tree, dict):
        for key, value in tree.items():
            found.extend(places(value, (*path, key)))
    elif isinstance(tree, list) and tree is not DEEP:
        for index, value in enumerate(tree):
            found.extend(places(value, (*path, index)))
    return found


def at(tree: object, path: tuple) -> object:
    for key in path:
        tree = tree[key]
    return tree


def mutate(record: dict, data: st.DataObject) -> str:
    """Change ``record`` in place at a random place; returns what was done."""
    by_depth: dict[int, list[tuple]] = {}
    for place in places(record)[1:]:
        by_depth.setdefault(len(place), []).append(place)
    depth = data.draw(st.sampled_from(sorted(by_depth)), "depth")  # cuts as likely as keep entries
    path = data.draw(st.sampled_from(by_depth[depth]), "place")
    parent, key = at(record, path[:-1]), path[-1]
    value = parent[key]
    kinds = ["replace", "delete", "duplicate"]
    if isinstance(value, int) and not isinstance(value, bool):
        kinds += ["shift", "scale"]
    if isinstance(value, list) and value:
        kinds += ["reverse", "append"]
    if isinstance(value, str):
        kinds.append("rename")
    if isinstance(value, dict) and {"size", "keep"} <= set(value):
        kinds.append("regroup")
    kind = data.draw(st.sampled_from(kinds), "kind")
    if kind == "replace":
        parent[key] = data.draw(HOSTILE, "value")
    elif kind == "delete":
        del parent[key]
    elif kind == "duplicate" and isinstance(parent, list):
        parent.insert(key, copy.deepcopy(value))
    elif kind == "duplicate":
        parent[data.draw(st.sampled_from(["extra", "cutz", "Layers", 7]), "new key")] = copy.deepcopy(value)
    elif kind == "shift":
        parent[key] = value + data.draw(st.sampled_from([-(2**40), -2, -1, 1, 2, 2**40]), "shift")
    elif kind == "scale":
        parent[key] = value * data.draw(st.sampled_from([0, 2, 3, 2**62, -1]), "factor")
    elif kind == "reverse":
        value.reverse()
    elif kind == "append":
        value.append(data.draw(st.one_of(st.sampled_from([-1, 2**63, 2**64 + 1]), st.integers(0, 70)), "item"))
    elif kind == "rename":
        parent[key] = data.draw(st.sampled_from(PATHS), "path")
    else:  # a grouped cut whose sizes add up: only the layer's real layout can reject it
        groups = data.draw(st.sampled_from([2, 3, 4, 8]), "groups")
        value["groups"], value["size"] = groups, value["size"] * groups
        value["keep"] = [i * groups + g for i in value["keep"] for g in range(groups)]
    return kind


def peak_memory_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@settings(max_examples=300, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(name=st.sampled_from(RECORD_NETS), mutations=st.integers(1, 3), data=st.data())
def test_crafted_records_are_rejected_with_our_errors_before_any_change(name, mutations, data) -> None:
    record = valid_record(name)
    kinds = [mutate(record, data) for _ in range(mutations)]
    model = built(name)
    before, layout = copy.deepcopy(model.state_dict()), str(model)
    peak = peak_memory_bytes()
    try:
        lp.restore(model, record)
    except PruningError as error:
        event(f"rejected ({type(error).__name__}) after {'+'.join(kinds)}")
        assert str(model) == layout
        after = model.state_dict()
        assert after.keys() == before.keys()
        assert all(torch.equal(after[k], v) for k, v in before.items())
    else:
        event(f"still a valid record after {'+'.join(kinds)}")
    assert peak_memory_bytes() - peak < 256 * 2**20


def with_change(name: str, change) -> dict:
    record = valid_record(name)
    change(record)
    return record


def first_cut(record: dict, tensor: str) -> dict:
    return next(cut for cut in record["steps"][0]["cuts"] if cut["tensor"] == tensor)


def grouped_bias(record: dict) -> None:
    cut = first_cut(record, "stem.0.bias")
    cut["groups"], cut["size"], cut["keep"] = 2, 2 * cut["size"], [2 * i + g for i in cut["keep"] for g in (0, 1)]


@pytest.mark.parametrize(
    ("name", "change", "message"),
    [
        (
            "grouped",
            lambda record: first_cut(record, "head.weight")["keep"].append(2**64),
            r"step 0: `keep` of cut on `head\.weight` must be strictly increasing indices in \[0, 32\)",
        ),
        (
            "grouped",
            grouped_bias,
            r"a grouped cut \(groups=2\) takes indices of blocks of rows.* `stem\.0\.bias` has shape \[16\]",
        ),
        ("grouped", lambda record: record.update(format=DEEP), r"`format` is \[\[\[\[\.\.\.\]\]\]\], expected"),
        ("grouped", lambda record: first_cut(record, "head.weight").update(tensor=DEEP), r"`tensor` must be a str"),
        (
            "mlp",
            lambda record: record["steps"][1]["layers"][0]["keep"].insert(0, -(2**70)),
            r"step 1: `keep` of `body` must be increasing indices in \[0, 6\)",
        ),
    ],
    ids=["index_beyond_int64", "grouped_cut_of_a_bias", "deep_format", "deep_tensor_name", "negative_block_index"],
)
def test_crafted_records_are_named(name: str, change, message: str) -> None:
    model = built(name)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(RecordError, match=message):
        lp.restore(model, with_change(name, change))
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


def test_a_record_cannot_drop_the_model_itself() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    record = lp.record.new_record([lp.Step([], [lp.Drop("", 3, [0, 2])])])
    with pytest.raises(RecordError, match=r"drops layers of ``, a stack of 3 blocks; the model has no such stack"):
        lp.restore(model, record)
    assert len(model) == 3


class EvenLinear(nn.Linear):
    """A layer whose fixup accepts only an even number of outputs: shapes alone cannot tell."""


def _even_outputs(module: nn.Module) -> None:
    module.out_features, module.in_features = module.weight.shape
    if module.out_features % 2:
        raise PruningError(f"EvenLinear needs an even width, got {module.out_features}", module="0")


def test_a_record_its_layers_reject_is_refused_before_any_step_is_applied() -> None:
    def cuts(width: int, keep: int) -> list[lp.Cut]:
        kept = list(range(keep))
        return [
            lp.Cut("0.weight", 0, width, kept),
            lp.Cut("0.bias", 0, width, kept),
            lp.Cut("2.weight", 1, width, kept),
        ]

    model = nn.Sequential(EvenLinear(4, 6), nn.ReLU(), nn.Linear(6, 2))
    before = copy.deepcopy(model.state_dict())
    record = lp.record.new_record([cuts(6, 4), cuts(4, 3)])  # step 0 fits; step 1 leaves an odd width
    with (
        LAYER_FIXUPS.registered(EvenLinear, _even_outputs),
        pytest.raises(RecordError, match="record: EvenLinear needs an even width, got 3") as error,
    ):
        lp.restore(model, record)
    assert error.value.module == "0"
    assert model[0].out_features == 6 and all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
