"""ShearedPruning in a real Trainer: the mask phase (one Lagrangian per optimizer step under accumulation), the cut
to the target shape with the gates leaving the optimizer, continued training, and resume before and after the cut."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from test_llm_callbacks import CONFIG, loader, trainer
from test_llm_pruner import windows

import lightning_prune as lp
from lightning_prune.callbacks import ShearedPruning

TARGET = {"hidden_size": 16, "intermediate_size": 24, "num_hidden_layers": 2}


def shape(module: lp.CausalLM) -> dict[str, int]:
    config = module.model.config
    return {name: getattr(config, name) for name in ("hidden_size", "intermediate_size", "num_hidden_layers")}


def shearing(mask_steps: int = 4) -> ShearedPruning:
    return ShearedPruning(TARGET, mask_steps=mask_steps, warmup=2, gate_lr=0.1, multiplier_lr=0.1)


class AtCut(pl.Callback):
    """The module's weights right after the cut (the first batch that starts on the smaller model)."""

    def __init__(self) -> None:
        self.weights, self.gates = None, []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        shearing = next(c for c in trainer.callbacks if isinstance(c, ShearedPruning))
        self.gates.append(shearing.optimizer is not None)
        if self.weights is None and pl_module.model.config.hidden_size == TARGET["hidden_size"]:
            self.weights = {k: v.clone() for k, v in pl_module.state_dict().items()}


def test_the_mask_phase_learns_the_gates_then_the_cut_model_keeps_training(tmp_path) -> None:
    pl.seed_everything(0, verbose=False)
    module = lp.CausalLM(config=CONFIG, vocabulary=64, warmup_steps=1)
    callback, at_cut = shearing(), AtCut()
    trainer(3, [callback, at_cut], tmp_path, max_steps=7, accumulate_grad_batches=2).fit(module, loader())
    assert shape(module) == TARGET
    assert module.model.model.layers[0].mlp.down_proj.weight.shape == (16, 24)
    assert [h["step"] for h in callback.history] == [0, 1, 2, 3]  # one Lagrangian per optimizer step
    assert len({h["params"] for h in callback.history}) == 4  # the gates step with the model
    assert at_cut.gates[0] and not at_cut.gates[-1]  # the gates train until the cut, then are gone
    assert callback.done["step"] == 4 and callback.done["params_after"] < callback.done["params_before"]
    after = module.state_dict()
    assert any(not torch.equal(at_cut.weights[k], after[k]) for k in after)  # training went on after the cut
    fresh = lp.CausalLM(config=CONFIG, vocabulary=64, warmup_steps=1)
    lp.restore_pruned(fresh, {"lightning_prune": {"record": lp.applied_record(module)}})
    fresh.load_state_dict(after)  # the record rebuilds the cut shape on a fresh module


def test_a_run_resumed_in_the_mask_phase_continues_its_gates_and_cuts_once(tmp_path) -> None:
    pl.seed_everything(0, verbose=False)
    module = lp.CausalLM(config=CONFIG, vocabulary=64, warmup_steps=1)
    first = shearing(mask_steps=4)
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True, every_n_train_steps=2)
    trainer(3, [first, checkpoint], tmp_path, max_steps=2).fit(module, loader())
    assert first.done == {} and len(first.history) == 2
    saved = {k: v.detach().clone() for k, v in first.shearing.log_alpha.items()}
    pl.seed_everything(0, verbose=False)
    fresh = lp.CausalLM(config=CONFIG, vocabulary=64, warmup_steps=1)
    resumed = shearing(mask_steps=4)
    seen = {}

    class Gates(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            if not seen:
                seen.update({k: v.detach().clone() for k, v in resumed.shearing.log_alpha.items()})

    trainer(3, [resumed, Gates()], tmp_path / "resumed", max_steps=6).fit(
        fresh, loader(), ckpt_path=tmp_path / "last.ckpt"
    )
    assert all(torch.equal(seen[k], saved[k]) for k in saved)  # the gates went on from where they were
    assert [h["step"] for h in resumed.history] == [0, 1, 2, 3] and resumed.history[:2] == first.history
    assert shape(fresh) == TARGET and resumed.done["step"] == 4


def test_a_run_resumed_after_the_cut_has_the_target_shape_and_does_not_cut_again(tmp_path) -> None:
    pl.seed_everything(0, verbose=False)
    module = lp.CausalLM(config=CONFIG, vocabulary=64, warmup_steps=1)
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True, every_n_train_steps=6)
    trainer(3, [shearing(), checkpoint], tmp_path, max_steps=6).fit(module, loader())
    pl.seed_everything(0, verbose=False)
    fresh = lp.CausalLM(config=CONFIG, vocabulary=64, warmup_steps=1)
    resumed, at_cut = shearing(), AtCut()
    trainer(3, [resumed, at_cut], tmp_path / "resumed", max_steps=8).fit(
        fresh, loader(), ckpt_path=tmp_path / "last.ckpt"
    )
    assert shape(fresh) == TARGET and resumed.done["step"] == 4 and resumed.shearing is None
    assert not any(at_cut.gates)  # no gates in the resumed run


@pytest.mark.parametrize(
    ("target", "options", "message"),
    [
        ({"hidden_size": 64}, {}, r"`hidden_size`=64 is larger than the model's 32"),
        ({"num_attention_heads": 3}, {}, r"`num_attention_heads`=3 is not a multiple of the model's 2"),
        ({"num_hidden_layers": 4}, {}, r"`num_hidden_layers`=4 is larger than the model's 3"),
        ({"num_attention_heads": 4, "num_key_value_heads": 1}, {}, r"ratio of 2 .*`num_attention_heads`=2"),
        ({"hidden_size": 30}, {}, r"family refuses: .*hidden size \(30\) is not a multiple.*heads \(4\)"),
    ],
)
def test_an_unreachable_target_is_refused_before_training(target, options, message) -> None:
    module = lp.CausalLM(config=CONFIG, vocabulary=64, warmup_steps=1)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    with pytest.raises(lp.PruningError, match=message):
        trainer(1, [ShearedPruning(target, mask_steps=2, **options)], enable_checkpointing=False).fit(module, loader())
    assert all(torch.equal(before[k], v) for k, v in module.state_dict().items())


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (({}, 2), r"`target` names no field"),
        (({"hidden_size": 16}, 0), r"`mask_steps` must be a positive integer, got 0"),
        (({"hidden_size": 16}, 4, 5), r"`warmup` must be an integer in \[0, `mask_steps`=4\], got 5"),
        (({"hidden_sise": 16}, 4), r"unknown field\(s\) \['hidden_sise'\]"),
    ],
)
def test_bad_arguments_are_refused_at_construction(arguments, message) -> None:
    with pytest.raises(lp.PruningError, match=message):
        ShearedPruning(*arguments)


def test_the_phase_runs_under_bf16_autocast_and_cuts_to_a_head_target() -> None:
    pl.seed_everything(0, verbose=False)
    module = lp.CausalLM(config=CONFIG, vocabulary=64, warmup_steps=1)
    callback = ShearedPruning({"hidden_size": 16, "num_key_value_heads": 1}, mask_steps=3, warmup=1, gate_lr=0.1)
    trainer(2, [callback], max_steps=5, precision="bf16-mixed", enable_checkpointing=False).fit(module, loader())
    config = module.model.config
    assert (config.hidden_size, config.num_attention_heads, config.num_key_value_heads) == (16, 2, 1)
    assert module.model.model.layers[0].self_attn.q_proj.weight.shape == (16, 16)
    assert len(callback.history) == 3 and callback.done["step"] == 3


class GateGradients(pl.Callback):
    """The gates' gradients and values each time the callback's optimizer steps (training loss + Lagrangian)."""

    def __init__(self) -> None:
        self.gradients, self.before = [], []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        shearing = next(c for c in trainer.callbacks if isinstance(c, ShearedPruning))
        optimizer = shearing.optimizer
        if optimizer is None or getattr(optimizer, "probed", False):
            return
        step = optimizer.step

        def probed(*args, **kwargs):
            gates = shearing.shearing.log_alpha
            self.gradients.append({k: v.grad.clone() for k, v in gates.items()})
            self.before.append({k: v.detach().clone() for k, v in gates.items()})
            return step(*args, **kwargs)

        optimizer.step, optimizer.probed = probed, True


def float16_run(scale: float) -> tuple[ShearedPruning, GateGradients, lp.CausalLM]:
    from lightning.pytorch.plugins import MixedPrecision

    pl.seed_everything(0, verbose=False)
    module = lp.CausalLM(config=CONFIG, vocabulary=64, warmup_steps=1)
    callback, probe = (
        ShearedPruning({"hidden_size": 16, "intermediate_size": 24}, mask_steps=2, warmup=1),
        GateGradients(),
    )
    precision = MixedPrecision("16-mixed", "cpu", torch.amp.GradScaler("cpu", init_scale=scale))
    trainer(1, [callback, probe], max_steps=2, enable_checkpointing=False, plugins=[precision]).fit(module, loader())
    return callback, probe, module


@pytest.mark.slow
def test_under_float16_with_a_grad_scaler_the_gates_see_unscaled_gradients() -> None:
    _, large, _ = float16_run(2.0**16)
    _, small, _ = float16_run(2.0**4)
    assert len(large.gradients) == len(small.gradients) == 2
    for step, gradients in enumerate(large.gradients):  # the loss scale is divided out of the gates' gradients
        for key, gradient in gradients.items():
            assert gradient.abs().max() > 0, key
            torch.testing.assert_close(gradient, small.gradients[step][key], atol=1e-6, rtol=1e-3)


def test_under_float16_the_gates_do_not_step_when_the_grad_scaler_skips_an_overflowing_step() -> None:
    callback, overflow, module = float16_run(2.0**100)  # float16 gradients overflow at every step
    assert not overflow.gradients  # the gates' optimizer never stepped on infinite gradients
    assert len(callback.history) == 2 and module.model.config.hidden_size == 16  # the phase still ends in the cut


class SameGates(pl.Callback):
    """Every batch of one optimizer step draws the same gate samples (the random state is set by the step)."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        torch.manual_seed(trainer.global_step)


@pytest.mark.slow
def test_under_accumulation_the_gates_step_once_on_the_gradient_of_the_whole_batch() -> None:
    def steps(batch_size: int, accumulate: int) -> list[dict[str, torch.Tensor]]:
        pl.seed_everything(0, verbose=False)
        module = lp.CausalLM(config=CONFIG, vocabulary=64, warmup_steps=1)
        callback = ShearedPruning({"hidden_size": 16, "intermediate_size": 24}, mask_steps=4, warmup=1)
        probe = GateGradients()
        data = torch.utils.data.DataLoader([{"input_ids": w} for w in windows(8, 12)], batch_size=batch_size)
        options = {"max_steps": 3, "accumulate_grad_batches": accumulate, "enable_checkpointing": False}
        trainer(2, [callback, probe, SameGates()], **options).fit(module, data)
        assert len(probe.gradients) == len(callback.history) == 3
        return probe.gradients

    accumulated, whole = steps(2, accumulate=2), steps(4, accumulate=1)
    for step, gradients in enumerate(whole):  # both halves' loss gradients, and the Lagrangian's once
        for key, gradient in gradients.items():  # (the multipliers start at 0 and pull from the third step)
            assert gradient.abs().max() > 0, key
            torch.testing.assert_close(accumulated[step][key], gradient, atol=1e-7, rtol=1e-4)
