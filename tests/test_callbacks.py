"""The callbacks in a real Trainer on CPU: slimming, schedules, optimizer state, checkpoints, resume, bad input."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from jobs import run_job
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import nn

import lightning_prune as lp
from lightning_prune.callbacks import NetworkSlimming, StructuredPruning, applied_record, load_from_checkpoint
from lightning_prune.data import DigitsDataModule
from lightning_prune.errors import PruningError
from lightning_prune.models import ImageClassifier
from lightning_prune.schedules import schedule_amounts

warnings.filterwarnings("ignore", ".*does not have many workers.*")


def small_model(**kwargs) -> ImageClassifier:
    pl.seed_everything(0, verbose=False)
    return ImageClassifier(arch_kwargs={"channels": [8, 16, 32]}, **kwargs)


def trainer(tmp_path: Path, callbacks: list, epochs: int = 3, **kwargs) -> pl.Trainer:
    options = {
        "max_epochs": epochs,
        "limit_train_batches": 4,
        "limit_val_batches": 2,
        "logger": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "enable_checkpointing": False,
        "default_root_dir": tmp_path,
        "callbacks": callbacks,
        **kwargs,
    }
    return pl.Trainer(**options)


def gammas(model: nn.Module, name: str) -> torch.Tensor:
    return model.get_submodule(name).weight.detach().abs()


# --- NetworkSlimming ------------------------------------------------------------------------------
def test_slimming_shrinks_the_scales_it_penalises(tmp_path) -> None:
    plain, slim = small_model(weight_decay=0.0), small_model(weight_decay=0.0)
    trainer(tmp_path, [], epochs=2).fit(plain, DigitsDataModule())
    trainer(tmp_path, [NetworkSlimming(penalty=0.3)], epochs=2).fit(slim, DigitsDataModule())
    for name in ("net.features.1", "net.features.4", "net.features.8"):
        assert gammas(slim, name).sum() < 0.85 * gammas(plain, name).sum()


class GradientProbe(Callback):
    """Records γ gradients after every other callback's on_before_optimizer_step (it runs last)."""

    def __init__(self) -> None:
        self.seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        features = pl_module.net.features
        self.seen.append((features[1].weight.grad.clone(), features[4].weight.grad.clone()))


@pytest.mark.parametrize("accumulate", [1, 2])
def test_penalty_is_added_once_per_optimizer_step_and_spares_excluded_layers(tmp_path, accumulate: int) -> None:
    penalty = 0.25
    model = small_model(lr=0.0, weight_decay=0.0)  # lr 0: both runs see identical weights and batches
    with torch.no_grad():
        model.net.features[1].weight[::2] *= -1.0  # both signs
    plain, slimmed = GradientProbe(), GradientProbe()
    options = {"epochs": 1, "accumulate_grad_batches": accumulate, "limit_train_batches": 4}
    trainer(tmp_path, [plain], **options).fit(model, DigitsDataModule(batch_size=16))
    slimming = NetworkSlimming(penalty, exclude=["net.features.4"])
    trainer(tmp_path, [slimming, slimmed], **options).fit(model, DigitsDataModule(batch_size=16))
    sign = torch.sign(model.net.features[1].weight.detach())
    assert len(slimmed.seen) == 4 // accumulate
    for (without, excluded_without), (with_penalty, excluded_with) in zip(plain.seen, slimmed.seen, strict=True):
        assert torch.allclose(with_penalty - without, penalty * sign, atol=1e-6)
        assert torch.equal(excluded_with, excluded_without)


def test_penalty_schedule() -> None:
    callback = NetworkSlimming(1.0, start_epoch=2, warmup_epochs=2, stop_epoch=6)
    callback._stop = 6
    assert [callback.penalty_at(e) for e in range(8)] == [0.0, 0.0, 0.5, 1.0, 1.0, 1.0, 0.0, 0.0]


# --- schedules ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("arguments", "expected"),
    [
        (("oneshot", 0.5, 3), {3: 0.5}),
        (("linear", 0.6, 2, 4), {2: 0.2, 3: 0.4, 4: 0.6}),
        (("linear", 0.5, 0, 5, 2), {0: 0.5 / 4, 2: 0.25, 4: 0.375, 5: 0.5}),
        (("cubic", 0.8, 1, 4), {1: 0.8 * (1 - 0.75**3), 2: 0.8 * (1 - 0.5**3), 3: 0.8 * (1 - 0.25**3), 4: 0.8}),
        (({"5": 0.3, 2: 0.1},), {2: 0.1, 5: 0.3}),
    ],
)
def test_schedule_amounts_are_exact(arguments: tuple, expected: dict) -> None:
    amounts = schedule_amounts(*arguments)
    assert list(amounts) == list(expected)
    assert all(amounts[e] == pytest.approx(expected[e], abs=1e-12) for e in expected)


def test_params_drop_exactly_at_the_scheduled_epochs(tmp_path) -> None:
    class Params(Callback):
        def __init__(self) -> None:
            self.after_epoch: list[int] = []

        def on_train_epoch_end(self, trainer, pl_module) -> None:
            self.after_epoch.append(lp.count_params(pl_module))

    probe = Params()
    pruning = StructuredPruning(0.6, schedule={1: 0.2, 3: 0.6}, log_table=False)
    trainer(tmp_path, [pruning, probe], epochs=5).fit(small_model(), DigitsDataModule())
    p = probe.after_epoch
    assert p[0] > p[1] == p[2] > p[3] == p[4]
    assert pruning.dense.removed == round(0.6 * pruning.dense.units)
    assert pruning.done[1]["amount"] == 0.2 and pruning.done[3]["amount"] == 0.6


def test_training_in_chunks_runs_the_steps_beyond_max_epochs_when_training_continues(tmp_path) -> None:
    pruning = StructuredPruning(0.6, schedule={1: 0.2, 3: 0.6}, log_table=False)
    saving = ModelCheckpoint(dirpath=tmp_path / "checkpoints", save_last=True)
    first = trainer(tmp_path, [pruning, saving], epochs=2, enable_checkpointing=True)
    with pytest.warns(UserWarning, match=r"steps at epochs \[3\] are at or beyond `max_epochs`=2.*only if training"):
        first.fit(small_model(), DigitsDataModule())
    assert list(pruning.done) == [1] and pruning.dense.removed == round(0.2 * pruning.dense.units)

    continued = StructuredPruning(0.6, schedule={1: 0.2, 3: 0.6}, log_table=False)
    model = small_model()  # dense: the checkpoint's record cuts it before the weights load
    second = trainer(tmp_path, [continued], epochs=6)
    second.fit(model, DigitsDataModule(), ckpt_path=tmp_path / "checkpoints" / "last.ckpt")
    assert list(continued.done) == [1, 3] and second.current_epoch == 6
    assert continued.dense.removed == round(0.6 * continued.dense.units)
    assert len(applied_record(model)["steps"]) == 2


def test_optimizer_state_survives_each_step(tmp_path) -> None:
    class Snapshot(Callback):
        def on_train_epoch_end(self, trainer, pl_module) -> None:
            optimizer = trainer.optimizers[0]
            self.before = {id(p): optimizer.state[p]["momentum_buffer"].clone() for p in pl_module.parameters()}

    snapshot = Snapshot()
    pruning = StructuredPruning(0.5, schedule="oneshot", start_epoch=1, log_table=False)
    fit = trainer(tmp_path, [snapshot, pruning], epochs=2, limit_train_batches=3)
    # callbacks run in order: the snapshot is taken right before the pruning step of epoch 1
    model = small_model()
    fit.fit(model, DigitsDataModule())
    cuts = {}
    for cut in lp.record.parse_record(applied_record(model))[0].cuts:
        cuts.setdefault(cut.tensor, []).append(cut)
    optimizer = fit.optimizers[0]
    assert [id(p) for p in optimizer.param_groups[0]["params"]] == [id(p) for p in model.parameters()]
    for name, param in model.named_parameters():
        buffer = optimizer.state[param]["momentum_buffer"]
        assert buffer.shape == param.shape
        assert torch.equal(buffer, lp.slice_tensor(snapshot.before[id(param)], cuts.get(name, [])))


# --- checkpoints and resume ---------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kill_at", "criterion"),
    [
        # test_faults kills between the steps too and resumes to the uninterrupted result: this one is slow
        pytest.param(2, (), marks=pytest.mark.slow),
        # the kill after the last step replays the same record as taylor_between_steps and resumes no step: slow
        pytest.param(4, (), marks=pytest.mark.slow),
        (3, ("--importance", "taylor")),
    ],
    ids=["between_steps", "after_last_step", "taylor_between_steps"],
)
def test_sigkill_and_resume_equals_an_uninterrupted_run(
    tmp_path, completed_job, kill_at: int, criterion: tuple[str, ...]
) -> None:
    reference = completed_job(*criterion)
    interrupted = tmp_path / "interrupted"
    killed = run_job(interrupted, "--kill-at-epoch", str(kill_at), *criterion)
    assert killed.returncode == -9 and not (interrupted / "final.pt").exists()
    resumed = run_job(interrupted, "--resume", *criterion)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    expected = torch.load(reference / "final.pt", weights_only=True)
    actual = torch.load(interrupted / "final.pt", weights_only=True)
    assert actual["record"] == expected["record"] and len(actual["record"]["steps"]) == 3
    assert actual["pruning"] == expected["pruning"]
    assert actual["state_dict"].keys() == expected["state_dict"].keys()
    for key, value in expected["state_dict"].items():
        assert torch.equal(actual["state_dict"][key], value), key


def test_resume_from_a_checkpoint_before_any_step(tmp_path, completed_job) -> None:
    reference, interrupted = completed_job(), tmp_path / "interrupted"
    assert run_job(interrupted, "--kill-at-epoch", "1").returncode == -9
    assert run_job(interrupted, "--resume").returncode == 0
    expected = torch.load(reference / "final.pt", weights_only=True)
    actual = torch.load(interrupted / "final.pt", weights_only=True)
    assert actual["record"] == expected["record"]
    assert all(torch.equal(actual["state_dict"][k], v) for k, v in expected["state_dict"].items())


def test_load_from_checkpoint_in_a_fresh_process(tmp_path, completed_job) -> None:
    checkpoint = completed_job() / "checkpoints" / "last.ckpt"
    final = torch.load(completed_job() / "final.pt", weights_only=True)
    script = f"""
import torch
from lightning_prune.callbacks import load_from_checkpoint
from lightning_prune.models import ImageClassifier
model = load_from_checkpoint(ImageClassifier, {str(checkpoint)!r}).eval()
assert type(model) is ImageClassifier
x = torch.linspace(-1, 1, 2 * 64).view(2, 1, 8, 8)
torch.save({{"out": model(x).detach(), "state": model.state_dict()}}, {str(tmp_path / "loaded.pt")!r})
"""
    loaded = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert loaded.returncode == 0, loaded.stderr[-2000:]
    result = torch.load(tmp_path / "loaded.pt", weights_only=True)
    assert all(torch.equal(result["state"][k], v) for k, v in final["state_dict"].items())
    model = ImageClassifier(arch_kwargs={"channels": [8, 16, 32]})
    lp.restore(model, final["record"])
    model.load_state_dict(final["state_dict"])
    assert torch.equal(model.eval()(torch.linspace(-1, 1, 128).view(2, 1, 8, 8)), result["out"])


def test_importing_and_measuring_print_no_cuda_home_line(tmp_path) -> None:
    script = """
import torch
import lightning_prune as lp
import lightning_prune.callbacks
import lightning_prune.cli
print(lp.latency(torch.nn.Linear(4, 2), torch.randn(2, 4), min_run_time=0.01))
"""
    # torch.utils.cpp_extension logs the line at import when CUDA_HOME exists and no GPU is visible
    environment = {**os.environ, "CUDA_HOME": str(tmp_path), "CUDA_VISIBLE_DEVICES": ""}
    ran = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=environment, timeout=300)
    assert ran.returncode == 0, ran.stderr[-2000:]
    assert "No CUDA runtime is found" not in ran.stdout + ran.stderr


def test_progress_is_logged_every_epoch(tmp_path) -> None:
    import csv

    logger = pl.loggers.CSVLogger(tmp_path, name="log")
    callbacks = [NetworkSlimming(1e-3), StructuredPruning(0.5, schedule={1: 0.5}, log_table=False)]
    trainer(tmp_path, callbacks, epochs=3, logger=logger).fit(small_model(), DigitsDataModule())
    rows = list(csv.DictReader((Path(logger.log_dir) / "metrics.csv").read_text().splitlines()))
    epochs = [row for row in rows if row.get("prune/params")]
    assert [float(r["prune/amount"]) for r in epochs] == [0.0, 0.5, 0.5]
    params = [float(r["prune/params"]) for r in epochs]
    assert params[0] > params[1] == params[2]
    assert all(0.0 <= float(r["slimming/gamma_below"]) <= 1.0 for r in rows if r.get("slimming/gamma_below"))


def test_best_checkpoint_is_the_best_pruned_model(tmp_path) -> None:
    checkpoint = ModelCheckpoint(tmp_path / "best", monitor="val/acc", mode="max", save_top_k=1)
    pruning = StructuredPruning(0.5, schedule="oneshot", start_epoch=1, log_table=False)
    model = small_model()
    trainer(tmp_path, [pruning, checkpoint], epochs=4, enable_checkpointing=True).fit(model, DigitsDataModule())
    best = torch.load(checkpoint.best_model_path, weights_only=True)
    assert best["epoch"] >= 2  # saved after the pruning step of epoch 1
    assert best["lightning_prune"]["record"] == applied_record(model)
    pruned = load_from_checkpoint(ImageClassifier, checkpoint.best_model_path)
    assert lp.count_params(pruned) == lp.count_params(model)


# --- bad input ----------------------------------------------------------------------------------
class FailOnFirstBatch(Callback):
    def on_train_batch_start(self, *args) -> None:
        raise AssertionError("training started")


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: NetworkSlimming(penalty=-1e-4), "`penalty` must be a non-negative number, got -0.0001"),
        (lambda: StructuredPruning(amount=1.2), r"`amount` must be a fraction in \[0, 1\), got 1.2"),
        (lambda: StructuredPruning(amount=-0.1), r"`amount` must be a fraction in \[0, 1\), got -0.1"),
        (
            lambda: StructuredPruning(schedule="linear", start_epoch=3, end_epoch=1),
            r"`end_epoch` \(1\) must not be before",
        ),
        (lambda: StructuredPruning(importance="magnitude"), "`importance` 'magnitude' is not a known criterion"),
        (lambda: StructuredPruning(schedule="exponential"), "`schedule` must be one of oneshot, linear, cubic"),
        (
            lambda: StructuredPruning(schedule={-1: 0.5}),
            r"^`schedule` epoch -1 must be a non-negative integer epoch \(0-based `current_epoch`\)\.$",
        ),
        (
            lambda: StructuredPruning(start_epoch=-2),
            r"^`start_epoch`=-2 must be a non-negative integer epoch \(0-based `current_epoch`\)\.$",
        ),
    ],
)
def test_bad_arguments_fail_at_construction(make, message: str) -> None:
    with pytest.raises(PruningError, match=message):
        make()


@pytest.mark.parametrize(
    "arguments", [{"amount": 0}, {"schedule": {1: 0.0, 2: 0}}, {"amount": 0.0, "schedule": "cubic"}]
)
def test_a_schedule_that_prunes_nothing_warns_at_construction(arguments: dict) -> None:
    with pytest.warns(UserWarning, match=r"^`amount` is 0 at every step of the schedule .*: nothing will be pruned"):
        StructuredPruning(**arguments)


@pytest.mark.parametrize(
    ("callbacks", "model", "message"),
    [
        ([StructuredPruning(importance="bn_scale")], "torchvision:squeezenet1_1", "has no BatchNorm layer"),
        ([NetworkSlimming()], "torchvision:squeezenet1_1", "no affine BatchNorm layer"),
        ([NetworkSlimming(include=["head.*"])], None, r"matches `include`=\['head\.\*'\]"),
        ([StructuredPruning(ignore=["net.layer9"])], None, "`ignore` entry 'net.layer9' matches no module"),
    ],
)
def test_bad_setup_fails_before_the_first_batch(tmp_path, callbacks: list, model: str | None, message: str) -> None:
    module = small_model() if model is None else ImageClassifier(arch=model, in_channels=3, input_size=32)
    with pytest.raises(PruningError, match=message):
        trainer(tmp_path, [*callbacks, FailOnFirstBatch()], epochs=3).fit(module, DigitsDataModule())


def test_unsupported_strategy_is_named() -> None:
    callback = StructuredPruning()

    class FSDPStrategy:  # stands in for the class name check only
        pass

    fake = type("T", (), {"strategy": FSDPStrategy(), "max_epochs": 3})()
    with pytest.raises(PruningError, match="does not support `strategy` FSDPStrategy"):
        callback.setup(fake, small_model(), "fit")


def test_broken_or_foreign_checkpoints_are_named_and_left_on_disk(tmp_path, completed_job) -> None:
    from lightning_prune.errors import RecordError

    good = completed_job() / "checkpoints" / "last.ckpt"
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    size = truncated.stat().st_size
    with pytest.raises(RecordError, match=r"checkpoint '.*truncated\.ckpt' could not be read as a checkpoint"):
        load_from_checkpoint(ImageClassifier, truncated)
    assert truncated.stat().st_size == size
    checkpoint = torch.load(good, weights_only=True)
    checkpoint["lightning_prune"]["record"]["version"] = 99
    newer = tmp_path / "newer.ckpt"
    torch.save(checkpoint, newer)
    with pytest.raises(RecordError, match="version 99 is newer than this lightning-prune"):
        load_from_checkpoint(ImageClassifier, newer)
    before = good.read_bytes()
    with pytest.raises(
        RecordError, match=r"last\.ckpt' step 0: `net\.\S+` has \d+ entries along dimension \d, the record expects"
    ):
        load_from_checkpoint(ImageClassifier, good, arch_kwargs={"channels": [32, 64, 128]})
    assert good.read_bytes() == before
    with pytest.raises(RecordError, match="does not exist"):
        load_from_checkpoint(ImageClassifier, tmp_path / "missing.ckpt")
