"""Depth pruning: whole blocks leave a block stack, the rest is renumbered, records replay it."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import lightning_prune as lp
from lightning_prune.depth import block_influence, find_blocks, prune_layers
from lightning_prune.errors import PruningError, RecordError

transformers = pytest.importorskip("transformers")


class Skip(nn.Module):
    """What a removed block is equivalent to: its input, unchanged."""

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return hidden_states


def llama(layers: int = 4) -> nn.Module:
    config = transformers.LlamaConfig(
        vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=layers, num_attention_heads=8,
        num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(config).eval()


def ids() -> torch.Tensor:
    return torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(0))


def test_removing_blocks_equals_skipping_them_and_keeps_generation_and_saving_right(tmp_path) -> None:
    torch.manual_seed(0)
    model = llama()
    dense = copy.deepcopy(model)
    result = prune_layers(model, {"input_ids": ids(), "use_cache": False}, count=2)
    assert result.blocks == "model.layers" and len(result.removed) == 2
    assert model.config.num_hidden_layers == 2
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == [0, 1]
    reference = copy.deepcopy(dense)
    for index in result.removed:
        reference.model.layers[index] = Skip()
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids()).logits, reference(input_ids=ids()).logits)
    prompt = ids()[:1, :4]
    cached = model.generate(prompt, max_new_tokens=6, do_sample=False)
    assert torch.equal(cached, model.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=False))
    model.save_pretrained(tmp_path)
    with torch.no_grad():
        loaded = type(model).from_pretrained(tmp_path).eval()
        assert torch.equal(model(input_ids=ids()).logits, loaded(input_ids=ids()).logits)
    fresh = copy.deepcopy(dense)
    lp.restore(fresh, result.record)
    fresh.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids()).logits, fresh(input_ids=ids()).logits)


def test_block_influence_ranks_a_block_that_does_nothing_lowest() -> None:
    torch.manual_seed(0)
    model = llama()
    with torch.no_grad():
        layer = model.model.layers[2]
        layer.self_attn.o_proj.weight.zero_()
        layer.mlp.down_proj.weight.zero_()
    scores = block_influence(model, "model.layers", [{"input_ids": ids()}])
    assert int(torch.argmin(scores)) == 2 and float(scores[2]) == pytest.approx(0.0, abs=1e-6)
    assert prune_layers(model, {"input_ids": ids()}, count=1).removed == [2]


def test_channel_and_layer_pruning_compose_in_one_record() -> None:
    torch.manual_seed(0)
    model = llama()
    dense = copy.deepcopy(model)
    inputs = {"input_ids": ids(), "use_cache": False}
    first = lp.prune(model, inputs, 0.5, scope="local")
    second = prune_layers(model, inputs, 0.25)
    record = lp.merge_records(first.record, second.record)
    fresh = copy.deepcopy(dense)
    lp.restore(fresh, record)
    fresh.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids()).logits, fresh(input_ids=ids()).logits)


def test_chosen_blocks_go() -> None:
    model = llama()
    result = prune_layers(model, {"input_ids": ids()}, indices=[3, 0])
    assert result.removed == [0, 3] and model.config.num_hidden_layers == 2


def test_vision_transformer_blocks() -> None:
    torchvision = pytest.importorskip("torchvision")
    model = torchvision.models.vit_b_16(weights=None, num_classes=10).eval()
    assert find_blocks(model) == "encoder.layers"
    result = prune_layers(model, torch.randn(1, 3, 224, 224), 0.5)
    assert len(model.encoder.layers) == 6 and model(torch.randn(1, 3, 224, 224)).shape == (1, 10)
    assert result.params_after < result.params_before


def test_blocks_that_change_shape_cannot_go() -> None:
    stack = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 8), nn.Linear(8, 2))
    scores = block_influence(stack, "", [torch.randn(3, 4)])
    assert torch.isinf(scores[0]) and torch.isinf(scores[2]) and torch.isfinite(scores[1])
    with pytest.raises(PruningError, match="only 1 blocks of `` keep their input's shape"):
        prune_layers(stack, torch.randn(3, 4), count=2)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"amount": 0.5, "count": 1}, "exactly one of `amount`"),
        ({"indices": [1, 4]}, r"`indices` \[1, 4\] must be distinct block numbers of `model.layers`, which has 4"),
        ({"indices": [2, 2]}, "must be distinct block numbers"),
        ({"amount": 1.0}, r"`amount` must be a fraction in \[0, 1\)"),
        ({"count": 4}, "cannot remove 4 of the 4 blocks of `model.layers`"),
        ({"count": 1, "blocks": "model.nothing"}, "`blocks` 'model.nothing' is not a submodule"),
        (
            {"count": 1, "importance": "magic"},
            "`importance` must be 'block_influence', 'random', 'angular', 'deepest' or a callable",
        ),
    ],
)
def test_bad_arguments_name_themselves_and_change_nothing(kwargs: dict, message: str) -> None:
    model = llama()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(PruningError, match=message):
        prune_layers(model, {"input_ids": ids()}, **kwargs)
    assert len(model.model.layers) == 4 and all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_layer_record_for_another_depth_is_rejected() -> None:
    result = prune_layers(llama(), {"input_ids": ids()}, count=1)
    with pytest.raises(RecordError, match="a stack of 4 blocks; the model has 6 there"):
        lp.restore(llama(6), result.record)


def test_structured_pruning_drops_layers_on_schedule_and_checkpoints_them(tmp_path) -> None:
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import ModelCheckpoint

    from lightning_prune.callbacks import StructuredPruning, load_from_checkpoint
    from lightning_prune.data import DigitsDataModule
    from lightning_prune.models import ImageClassifier

    pl.seed_everything(0, verbose=False)
    model = ImageClassifier(arch="digits_transformer", arch_kwargs={"dim": 32, "hidden": 64})
    pruning = StructuredPruning(0.5, "block_influence", structure="layers", schedule={1: 0.25, 2: 0.5}, log_table=False)
    checkpoint = ModelCheckpoint(tmp_path, save_last=True)
    trainer = pl.Trainer(
        max_epochs=4, limit_train_batches=3, limit_val_batches=1, logger=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=tmp_path, callbacks=[pruning, checkpoint],
    )  # fmt: skip
    trainer.fit(model, DigitsDataModule())
    assert len(model.net.blocks) == 2 and [s["removed"] for s in pruning.done.values()] == [1, 1]
    loaded = load_from_checkpoint(ImageClassifier, tmp_path / "last.ckpt").eval()
    x = torch.randn(3, 1, 8, 8)
    assert len(loaded.net.blocks) == 2 and torch.equal(loaded(x), model.eval()(x))


def test_layer_structure_rejects_channel_criteria() -> None:
    from lightning_prune.callbacks import StructuredPruning

    with pytest.raises(PruningError, match="`importance` for structure='layers' must be one of block_influence"):
        StructuredPruning(0.5, "l1", structure="layers")
