"""The meta-device trace: a CPU model is traced on a copy without values; where the trace needs values, or a forward
asks for its device, the model itself is traced. Either way the trace is the one the model itself gives."""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch
import torchvision
from torch import Tensor, nn
from torchvision.ops import StochasticDepth

from lightning_prune.graph.tracer import _trace_meta_copy, meta_traceable, trace_model
from lightning_prune.running import tracing_modes


def assert_same(a: object, b: object, where: str = "trace") -> None:
    """Every field equal, tensors by value (labels are element ids: equal means the same flow of channels)."""
    assert type(a) is type(b), f"{where}: {type(a).__name__} vs {type(b).__name__}"
    if isinstance(a, Tensor):
        assert a.shape == b.shape and torch.equal(a, b), f"{where}: tensors differ"
    elif dataclasses.is_dataclass(a):
        for f in dataclasses.fields(a):
            assert_same(getattr(a, f.name), getattr(b, f.name), f"{where}.{f.name}")
    elif isinstance(a, dict):
        assert list(a) == list(b), f"{where}: keys differ"
        for key in a:
            assert_same(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), f"{where}: {len(a)} vs {len(b)} entries"
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} vs {b!r}"


def traces(model: nn.Module, x: Tensor) -> tuple[object, object, object]:
    """(the model's own trace, the meta copy's trace or None, the default trace)."""
    modes = tracing_modes(model)
    real = trace_model(model, x, modes, on_meta=False)
    copy = _trace_meta_copy(model, x, modes, None, 1, ()) if meta_traceable(model) else None
    return real, copy, trace_model(model, x, modes)


@pytest.mark.parametrize(
    ("name", "size"),
    [("resnet18", 64), ("googlenet", 96), ("mobilenet_v3_small", 64), ("squeezenet1_0", 64)],
)
def test_meta_copy_traces_torchvision_models_as_the_models_themselves(name: str, size: int) -> None:
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(weights=None, num_classes=10)
    real, copy, default = traces(model, torch.randn(2, 3, size, size))
    assert copy is not None, f"{name}: the meta copy was not kept"
    assert real.macs and real.macs > 0
    assert_same(copy, real)
    assert_same(default, real)
    assert all(not p.is_meta for p in model.parameters())  # the model itself is untouched


class Permuted(nn.Module):
    """Reads its channels in a stored order: replaying the index needs the buffer's values."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.register_buffer("order", torch.randperm(8, generator=torch.Generator().manual_seed(0)))
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.conv(x)[:, self.order])


class Residual(nn.Module):
    """A residual block with stochastic depth: its noise is drawn (values) in training mode."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.body = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.drop = StochasticDepth(0.5, "row")
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        return self.head(x + self.drop(self.body(x)))


@pytest.mark.parametrize("model_type", [Permuted, Residual])
def test_a_trace_that_needs_values_falls_back_to_the_model_itself(model_type: type[nn.Module]) -> None:
    torch.manual_seed(0)
    model = model_type()
    real, copy, default = traces(model, torch.randn(2, 3, 8, 8))
    assert meta_traceable(model) and copy is None  # tried on meta, dropped
    assert_same(default, real)


def test_permuted_channels_are_followed_through_the_fallback() -> None:
    model = Permuted()
    trace = trace_model(model, torch.randn(2, 3, 8, 8))
    produced = trace.spaces[("conv.weight", 0)]
    read = trace.slots[("head.weight", 1)].labels
    assert torch.equal(read, produced[model.order])


class DeviceBranch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 1), nn.Conv2d(3, 8, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.a(x) if x.device.type == "cpu" else self.b(x)


def test_a_forward_that_asks_for_its_device_is_not_traced_on_meta() -> None:
    model = DeviceBranch()
    assert not meta_traceable(model)
    trace = trace_model(model, torch.randn(2, 3, 4, 4))
    assert ("a.weight", 0) in trace.slots and ("b.weight", 0) not in trace.slots  # the CPU branch, as run


class Warns(nn.Module):
    def __init__(self, permuted: bool) -> None:
        super().__init__()
        self.inner = Permuted() if permuted else nn.Conv2d(3, 4, 1)

    def forward(self, x: Tensor) -> Tensor:
        warnings.warn("lightning-prune test: a forward warns", UserWarning, stacklevel=1)
        return self.inner(x)


@pytest.mark.parametrize("permuted", [False, True], ids=["meta kept", "fell back"])
def test_a_forward_warning_is_raised_once_whichever_trace_is_kept(permuted: bool) -> None:
    model = Warns(permuted)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trace_model(model, torch.randn(2, 3, 8, 8), modes=("eval",))
    assert [str(w.message) for w in caught].count("lightning-prune test: a forward warns") == 1
