"""One registry type for everything chosen by name or class: duplicates refused, lookups that name what is known."""

from __future__ import annotations

import pytest
import torch
from nets import small_input
from torch import nn

import lightning_prune as lp
from lightning_prune.depth import BLOCK_SCORES, BLOCK_SPANS
from lightning_prune.fixups import DROP_FIXUPS, LAYER_FIXUPS
from lightning_prune.graph.module_rules import MODULE_RULES
from lightning_prune.graph.rules import OP_RULES
from lightning_prune.importance import CRITERIA
from lightning_prune.methods import METHODS
from lightning_prune.registry import Registry, RegistryError


def test_register_refuses_a_duplicate_unless_asked_to_replace() -> None:
    registry: Registry[str, int] = Registry("thing")
    registry.register("a", 1)
    with pytest.raises(RegistryError, match="thing 'a' is already registered; pass replace=True"):
        registry.register("a", 2)
    assert registry["a"] == 1
    registry.register("a", 3, replace=True)
    assert registry["a"] == 3 and list(registry) == ["a"]


def test_lookup_of_an_unknown_key_names_what_is_known_and_the_hint() -> None:
    registry: Registry[str, int] = Registry("thing", "Register one with things.add().")
    registry.register("b", 1)
    registry.register("a", 2)
    with pytest.raises(RegistryError, match=r"thing 'c' is not registered\. Known: a, b\. Register one with") as error:
        registry["c"]
    assert isinstance(error.value, ValueError) and isinstance(error.value, KeyError)
    assert registry.get("c") is None and "c" not in registry


def test_unregister_and_a_temporary_registration_leave_the_registry_as_it_was() -> None:
    registry: Registry[str, int] = Registry("thing")
    registry.register("kept", 1)
    with registry.registered("temporary", 2):
        assert registry["temporary"] == 2
    assert "temporary" not in registry
    with registry.registered("kept", 5, replace=True):
        assert registry["kept"] == 5
    assert registry["kept"] == 1
    with pytest.raises(ValueError, match="boom"), registry.registered("temporary", 2):
        raise ValueError("boom")
    assert "temporary" not in registry
    assert registry.unregister("kept") == 1 and len(registry) == 0
    with pytest.raises(RegistryError, match="thing 'kept' is not registered, so it cannot be unregistered"):
        registry.unregister("kept")


def test_decorator_registers_under_every_name() -> None:
    registry: Registry[str, object] = Registry("rule")

    @registry.decorator("x", "y")
    def function() -> None: ...

    assert registry["x"] is registry["y"] is function


def test_every_extension_point_of_the_engine_is_a_registry_holding_the_built_ins() -> None:
    expected = {
        CRITERIA: {"l1", "l2", "bn_scale", "taylor", "fisher", "fpgm", "random"},
        OP_RULES: {"conv2d", "linear", "add", "matmul", "scaled_dot_product_attention", "max_pool2d"},
        MODULE_RULES: {
            "rms_norm",
            "sync_batch_norm",
            "torch.nn.MultiheadAttention",
            "torchvision.swin.window_attention",
        },
        LAYER_FIXUPS: {nn.Linear, nn.MultiheadAttention, "transformers.pytorch_utils.Conv1D"},
        DROP_FIXUPS: {"transformers.config.num_hidden_layers"},
        BLOCK_SCORES: {"block_influence", "random"},
        BLOCK_SPANS: {"angular", "deepest"},
        METHODS: {"channels", "layers", "laco"},
    }
    for registry, names in expected.items():
        assert isinstance(registry, Registry)
        assert names <= set(registry), f"{registry}: missing {names - set(registry)}"


def test_a_criterion_registered_for_a_block_is_used_by_name_and_gone_afterwards() -> None:
    def first_channels_least(group, context):  # scores rise with the index: the first channels go
        return torch.arange(group.width, dtype=torch.float64)

    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3))
    with CRITERIA.registered("first_least", lambda **_: first_channels_least):
        result = lp.prune(model, small_input(), 0.5, importance="first_least", scope="local")
    kept = next(cut for cut in lp.record.parse_record(result.record)[0].cuts if cut.tensor == "0.weight").keep
    assert kept == [4, 5, 6, 7]
    with pytest.raises(lp.PruningError, match="'first_least' is not a known criterion"):
        lp.prune(model, small_input(), 0.5, importance="first_least")
