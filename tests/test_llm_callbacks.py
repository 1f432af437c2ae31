"""The language-model methods inside a real Trainer: one-shot at the start of fit on calibration batches, then
recovery; a checkpoint of the pruned model resumes to its shape without cutting again."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from test_llm_pruner import windows

import lightning_prune as lp
from lightning_prune.callbacks import StructuredPruning

CONFIG = {
    "model_type": "llama", "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 3,
    "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64, "tie_word_embeddings": False,
}  # fmt: skip


def loader() -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader([{"input_ids": w} for w in windows(8, 12)], batch_size=2)


def trainer(epochs: int, callbacks: list, root=None, **options) -> pl.Trainer:
    return pl.Trainer(
        max_epochs=epochs, logger=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=callbacks, default_root_dir=root, **options,
    )  # fmt: skip


def widths(module: lp.CausalLM) -> list[tuple[int, int]]:
    return [
        (layer.self_attn.q_proj.out_features, layer.mlp.down_proj.in_features) for layer in module.model.model.layers
    ]


@pytest.mark.parametrize(
    ("structure", "importance"), [("llm_pruner", "taylor_second"), ("wanda_sp", "wanda_sp"), ("flap", "flap")]
)
def test_language_model_methods_cut_at_fit_start_leave_the_stream_and_outer_layers_whole(structure, importance) -> None:
    pl.seed_everything(0, verbose=False)
    module = lp.CausalLM(config=CONFIG, vocabulary=64, warmup_steps=1)
    dense = widths(module)
    pruning = StructuredPruning(
        0.5, importance, structure=structure, when="train_epoch_start", calibration_batches=2, log_table=False,
        options={"first": 1, "last": -1},
    )  # fmt: skip
    seen = []

    class Widths(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            seen.append(widths(pl_module))

    trainer(1, [pruning, Widths()], enable_checkpointing=False).fit(module, loader())
    assert seen[0] == seen[-1] == widths(module)  # cut before the first training step
    assert widths(module)[0] == dense[0] and widths(module)[2] == dense[2]  # first and last layers whole
    assert widths(module)[1][0] < dense[1][0] or widths(module)[1][1] < dense[1][1]
    assert module.model.config.hidden_size == 32 and module.model.model.norm.weight.shape == (32,)


def test_an_epoch_start_cut_resumes_from_its_checkpoint_without_cutting_again(tmp_path) -> None:
    pl.seed_everything(0, verbose=False)
    module = lp.CausalLM(config=CONFIG, vocabulary=64, warmup_steps=1)
    options = {"when": "train_epoch_start", "calibration_batches": 2, "log_table": False}
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    trainer(1, [StructuredPruning(0.5, "taylor_vectorwise", structure="llm_pruner", **options), checkpoint]).fit(
        module, loader()
    )
    pruned = widths(module)
    pl.seed_everything(0, verbose=False)
    fresh = lp.CausalLM(config=CONFIG, vocabulary=64, warmup_steps=1)
    resumed = StructuredPruning(0.5, "taylor_vectorwise", structure="llm_pruner", **options)
    trainer(2, [resumed], tmp_path / "resumed").fit(fresh, loader(), ckpt_path=tmp_path / "last.ckpt")
    assert widths(fresh) == pruned and list(resumed.done) == [0]


def test_bad_method_options_and_epoch_start_without_calibration_are_refused() -> None:
    with pytest.raises(lp.PruningError, match=r"`options` \['firts'\].*first, last, stream"):
        StructuredPruning(0.2, "taylor_mix", structure="llm_pruner", calibration_batches=2, options={"firts": 1})
    with pytest.raises(lp.PruningError, match="set those directly"):
        StructuredPruning(
            0.2, "taylor_mix", structure="llm_pruner", calibration_batches=2, options={"target": "params"}
        )
    with pytest.raises(lp.PruningError, match="calibration_batches"):
        StructuredPruning(0.2, "taylor", when="train_epoch_start")
    with pytest.raises(lp.PruningError, match="taylor_vectorwise, taylor_elementwise"):
        StructuredPruning(0.2, "l1", structure="llm_pruner", calibration_batches=2)


def test_a_flap_checkpoint_with_added_biases_loads_into_a_module_built_from_its_hyperparameters(tmp_path) -> None:
    from lightning_prune.callbacks import load_from_checkpoint

    pl.seed_everything(0, verbose=False)
    module = lp.CausalLM(config=CONFIG, vocabulary=64, warmup_steps=1)
    options = {"when": "train_epoch_start", "calibration_batches": 2, "log_table": False}
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    trainer(1, [StructuredPruning(0.4, "flap", structure="flap", **options), checkpoint]).fit(module, loader())
    assert module.model.model.layers[0].self_attn.o_proj.bias is not None  # compensation gave Llama biases
    reloaded = load_from_checkpoint(lp.CausalLM, tmp_path / "last.ckpt").eval()
    ids = windows(2, 10)
    with torch.no_grad():
        assert torch.allclose(reloaded(ids), module.eval()(ids), atol=1e-6)
    pl.seed_everything(0, verbose=False)
    fresh = lp.CausalLM(config=CONFIG, vocabulary=64, warmup_steps=1)
    trainer(2, [StructuredPruning(0.4, "flap", structure="flap", **options)], tmp_path / "resumed").fit(
        fresh, loader(), ckpt_path=tmp_path / "last.ckpt"
    )  # the biases are there before the optimizer is built: they train on
    assert fresh.model.model.layers[0].self_attn.o_proj.bias.grad is not None
