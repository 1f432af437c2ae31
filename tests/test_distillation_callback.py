"""The Distillation callback in a real Trainer: the teacher is the model right before the first cut, the loss is the
stated mix, gradient accumulation and bf16 autocast keep it, a resumed run rebuilds the same teacher, bad input fails
before training."""

from __future__ import annotations

import copy
import logging
import warnings

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from test_llm_pruner import windows

import lightning_prune as lp
from lightning_prune.callbacks import Distillation, StructuredPruning
from lightning_prune.callbacks.snapshot import KeepDense
from lightning_prune.errors import PruningError
from lightning_prune.models import ImageClassifier

warnings.filterwarnings("ignore", ".*does not have many workers.*")
CONFIG = {
    "model_type": "llama", "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 3,
    "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64, "tie_word_embeddings": False,
}  # fmt: skip


def classifier(seed: int = 0) -> ImageClassifier:
    pl.seed_everything(seed, verbose=False)
    return ImageClassifier(arch_kwargs={"channels": [8, 16, 32]}, scheduler="none")


def images(batch_size: int = 16) -> torch.utils.data.DataLoader:
    generator = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(48, 1, 8, 8, generator=generator), torch.arange(48) % 10)
    return torch.utils.data.DataLoader(data, batch_size=batch_size)


def language_model(seed: int = 0, **options) -> lp.CausalLM:
    pl.seed_everything(seed, verbose=False)
    return lp.CausalLM(config=CONFIG, vocabulary=64, warmup_steps=1, **options)


def texts(batch_size: int = 4) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader([{"input_ids": w} for w in windows(8, 12)], batch_size=batch_size)


def trainer(epochs: int, callbacks: list, **options) -> pl.Trainer:
    settings = {"logger": False, "enable_progress_bar": False, "enable_model_summary": False,
                "enable_checkpointing": False, **options}  # fmt: skip
    return pl.Trainer(max_epochs=epochs, callbacks=callbacks, **settings)


class Losses(Callback):
    """Each training batch and the loss about to be backpropagated, with the student as it was then."""

    def __init__(self) -> None:
        self.seen: list[tuple] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.batch = batch

    def on_before_backward(self, trainer, pl_module, loss) -> None:
        self.seen.append((trainer.current_epoch, self.batch, float(loss), copy.deepcopy(pl_module).train()))


def test_the_teacher_is_the_model_before_the_first_cut_and_the_loss_is_the_stated_mix(caplog) -> None:
    module, alpha, temperature = classifier(), 0.3, 2.0
    dense, probe = KeepDense(0), Losses()
    distillation = Distillation("forward_kl", alpha=alpha, temperature=temperature)
    pruning = StructuredPruning(0.5, "l1", start_epoch=0, log_table=False)
    with caplog.at_level(logging.INFO):  # listed after the pruning on purpose: it moves itself before it
        trainer(2, [dense, pruning, distillation, probe], limit_train_batches=2).fit(module, images())
    teacher = distillation.teacher
    assert lp.count_params(teacher) == lp.count_params(dense.model) > lp.count_params(module)
    for key, value in dense.model.state_dict().items():  # the end of epoch 0, before the cut; never trained since
        assert torch.equal(teacher.state_dict()[key], value), key
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    in_optimizer = {id(p) for group in module.trainer.optimizers[0].param_groups for p in group["params"]}
    assert not in_optimizer & {id(p) for p in teacher.parameters()}
    assert "training_step" not in vars(module)  # the wrapper goes at teardown
    assert f"teacher = the model before the first cut (epoch 0): {lp.count_params(teacher):,} parameters" in caplog.text
    before, after = [s for s in probe.seen if s[0] == 0], [s for s in probe.seen if s[0] == 1]
    for _, (x, y), loss, student in before:  # no teacher yet: the task loss alone
        assert loss == pytest.approx(float(F.cross_entropy(student(x), y)), rel=1e-5)
    for _, (x, y), loss, student in after:
        with torch.no_grad():
            logits, target = student(x), teacher(x)
        kd = F.kl_div(F.log_softmax(logits / temperature, -1), F.log_softmax(target / temperature, -1),
                      log_target=True, reduction="batchmean") * temperature**2  # fmt: skip
        expected = (1 - alpha) * F.cross_entropy(logits, y) + alpha * kd
        assert kd > 0 and loss == pytest.approx(float(expected), rel=1e-5)


class Gradients(Callback):
    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if not hasattr(self, "first"):
            self.first = {n: p.grad.clone() for n, p in pl_module.named_parameters() if p.grad is not None}


def test_gradient_accumulation_gives_the_gradients_of_the_unaccumulated_step() -> None:
    teacher = language_model(seed=1).model  # a model of the user's: here a differently initialised one
    probes = []
    for batch_size, accumulate in ((8, 1), (4, 2)):
        probe = Gradients()
        distillation = Distillation("reverse_kl", alpha=0.5, teacher=copy.deepcopy(teacher))
        trainer(1, [distillation, probe], limit_train_batches=2, accumulate_grad_batches=accumulate).fit(
            language_model(), texts(batch_size)
        )
        probes.append(probe.first)
    whole, accumulated = probes
    assert whole.keys() == accumulated.keys() and len(whole) > 10
    for name, gradient in whole.items():
        assert torch.allclose(accumulated[name], gradient, rtol=1e-4, atol=1e-6), name


def test_under_bf16_autocast_the_distillation_term_is_the_float32_one_within_bf16_precision() -> None:
    teacher = language_model(seed=1)  # a module of the student's own class: its `model` is called
    probe, module = Losses(), language_model()
    distillation = Distillation("forward_kl", alpha=1.0, teacher=teacher)
    trainer(1, [distillation, probe], limit_train_batches=1, precision="bf16-mixed").fit(module, texts())
    _, batch, loss, student = probe.seen[0]
    with torch.no_grad():
        expected = lp.methods.distillation.forward_kl(student(batch["input_ids"]), teacher(batch["input_ids"]))
    assert loss == pytest.approx(float(expected), rel=3e-2) and expected > 0
    assert all(p.dtype == torch.float32 for p in teacher.parameters())


@pytest.mark.parametrize("save_teacher", [False, True])
def test_a_resumed_run_rebuilds_the_same_teacher_and_checkpoints_hold_it_only_when_asked(
    tmp_path, save_teacher
) -> None:
    pruning = {"amount": 0.5, "importance": "l1", "start_epoch": 0, "log_table": False}
    first = Distillation("reverse_kl", save_teacher=save_teacher)
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    module = classifier()
    trainer(2, [first, StructuredPruning(**pruning), checkpoint], limit_train_batches=2, enable_checkpointing=True).fit(
        module, images()
    )
    saved = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert set(saved["state_dict"]) == set(module.state_dict())  # the module's weights only
    (state,) = [v for k, v in saved["callbacks"].items() if k.startswith("Distillation")]
    assert state["source"] == "snapshot" and state["epoch"] == 0
    assert ("weights" in state) is save_teacher and (tmp_path / "distillation_teacher.pt").exists() is not save_teacher
    resumed, probe = Distillation("reverse_kl", save_teacher=save_teacher), Losses()
    trainer(3, [resumed, StructuredPruning(**pruning), probe], limit_train_batches=1).fit(
        classifier(seed=5), images(), ckpt_path=tmp_path / "last.ckpt"
    )
    assert lp.count_params(resumed.teacher) == lp.count_params(first.teacher)
    for key, value in first.teacher.state_dict().items():
        assert torch.equal(resumed.teacher.state_dict()[key], value), key
    _, (x, y), loss, student = probe.seen[0]
    with torch.no_grad():  # the resumed step distils from it
        kl = lp.methods.distillation.reverse_kl(student(x), first.teacher(x))
    assert loss == pytest.approx(float(0.5 * F.cross_entropy(student(x), y) + 0.5 * kl), rel=1e-5)
    if not save_teacher:
        (tmp_path / "distillation_teacher.pt").unlink()
        with pytest.raises(PruningError, match=r"distillation_teacher\.pt', which does not exist"):
            trainer(3, [Distillation("reverse_kl"), StructuredPruning(**pruning)]).fit(
                classifier(), images(), ckpt_path=tmp_path / "last.ckpt"
            )


@pytest.mark.parametrize("loss", ["forward_kl", "reverse_kl", "minillm"])
def test_each_loss_recovers_a_causal_lm_pruned_at_fit_start(loss: str) -> None:
    module, probe = language_model(), Gradients()
    pruning = StructuredPruning(0.5, "wanda_sp", structure="wanda_sp", when="train_epoch_start",
                                calibration_batches=2, log_table=False)  # fmt: skip
    distillation = Distillation(loss, alpha=0.5, prompt_tokens=4, new_tokens=3)
    trainer(1, [pruning, distillation, probe], limit_train_batches=2).fit(module, texts())
    widths = [layer.mlp.down_proj.in_features for layer in distillation.teacher.model.model.layers]
    assert widths == [48, 48, 48] and sum(layer.mlp.down_proj.in_features for layer in module.model.model.layers) < 144
    logged = float(module.trainer.callback_metrics["distill/loss"])  # MiniLLM's is a surrogate: of either sign
    assert logged > 0 if loss != "minillm" else logged != 0 and torch.isfinite(torch.tensor(logged))
    assert probe.first["model.lm_head.weight"].abs().sum() > 0


def test_bad_options_fail_at_construction() -> None:
    with pytest.raises(PruningError, match=r"`alpha`.*\[0, 1\], got 1.5"):
        Distillation(alpha=1.5)
    with pytest.raises(PruningError, match="`temperature` must be a number > 0, got 0"):
        Distillation(temperature=0)
    with pytest.raises(PruningError, match="`loss` must be one of forward_kl, reverse_kl, minillm; got 'kd'"):
        Distillation("kd")
    with pytest.raises(PruningError, match="`new_tokens` must be a positive integer, got 0"):
        Distillation("minillm", new_tokens=0)


def test_bad_setups_fail_before_the_first_step() -> None:
    class NoStep(Callback):
        def on_train_batch_start(self, *args) -> None:
            raise AssertionError("a training step ran")

    with pytest.raises(PruningError, match="predicts over 7 classes or tokens, ImageClassifier over 10"):
        wrong = ImageClassifier(num_classes=7, arch_kwargs={"channels": [8, 16, 32]})
        trainer(1, [Distillation(teacher=wrong), NoStep()]).fit(classifier(), images())
    with pytest.raises(PruningError, match="holds no model that can generate"):
        trainer(1, [Distillation("minillm"), StructuredPruning(0.5, "l1"), NoStep()]).fit(classifier(), images())
    with pytest.raises(PruningError, match="has no teacher: pass `teacher`"):
        trainer(1, [Distillation(), NoStep()]).fit(classifier(), images())

    class TwoCalls(ImageClassifier):  # features, then the head: no single call gives both models' logits
        def __init__(self) -> None:
            super().__init__(arch_kwargs={"channels": [8, 16, 32]})
            self.features, self.head = self.net.features, self.net.classifier

        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.cross_entropy(self.head(self.features(x)), y)

    pl.seed_everything(0, verbose=False)
    two = TwoCalls()
    with pytest.raises(PruningError, match="calls `features`, `head` one after the other"):
        trainer(1, [Distillation(teacher=copy.deepcopy(ImageClassifier()))]).fit(two, images())
    assert "training_step" not in vars(two)  # the failed fit leaves the module as it was
    module = classifier()
    with pytest.raises(PruningError, match=r"shares \d+ parameters with ImageClassifier"):
        trainer(1, [Distillation(teacher=module.net), NoStep()]).fit(module, images())


def ddp_job(root: str) -> None:
    """Two CPU ranks (gloo), a teacher of the user's on each: rank r writes ROOT/rank{r}.pt with the gradients of the
    first optimizer step and the windows it trained on (``python tests/test_distillation_callback.py ROOT``)."""
    warnings.filterwarnings("ignore")
    probe, seen = Gradients(), []

    class Windows(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            seen.append(batch["input_ids"])

    distillation = Distillation("forward_kl", alpha=0.7, temperature=2.0, teacher=language_model(seed=1).model)
    fit = trainer(1, [distillation, probe, Windows()], limit_train_batches=1, strategy="ddp", accelerator="cpu",
                  devices=2)  # fmt: skip
    fit.fit(language_model(), texts(batch_size=2))
    state = {"gradients": probe.first, "windows": seen[0], "teacher": distillation.teacher.state_dict()}
    torch.save(state, f"{root}/rank{fit.global_rank}.pt")


@pytest.mark.slow
def test_under_ddp_every_rank_distils_from_its_own_teacher_and_the_gradients_are_those_of_one_process(tmp_path) -> None:
    import subprocess
    import sys

    done = subprocess.run([sys.executable, __file__, str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    for key, value in ranks[0]["teacher"].items():
        assert torch.equal(ranks[1]["teacher"][key], value)
    probe = Gradients()  # one process on the windows of both ranks together
    distillation = Distillation("forward_kl", alpha=0.7, temperature=2.0, teacher=language_model(seed=1).model)
    both = torch.cat([ranks[0]["windows"], ranks[1]["windows"]])
    loader = torch.utils.data.DataLoader([{"input_ids": w} for w in both], batch_size=len(both))
    trainer(1, [distillation, probe], limit_train_batches=1).fit(language_model(), loader)
    for name, gradient in probe.first.items():
        for rank in ranks:
            assert torch.allclose(rank["gradients"][name], gradient, rtol=1e-4, atol=1e-6), name


if __name__ == "__main__":
    import sys

    ddp_job(sys.argv[1])
