"""Prune, then shard: PruneBeforeSharding cuts in setup, FSDP2 (ModelParallelStrategy, CPU + gloo) or DDP shards
the smaller model, checkpoints resume to the pruned shape in 2 processes and in one.

This file is also the 2-process job the slow tests start::

    python tests/test_sharding.py ROOT --strategy fsdp2|ddp [--resume] [--steps N] [--sharded] [--distill] [--bad WHAT]
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader

from lightning_prune import from_pretrained
from lightning_prune.callbacks import Distillation, PruneBeforeSharding, StructuredPruning, applied_record
from lightning_prune.errors import PruningError
from lightning_prune.models import CausalLM

CONFIG = {
    "model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64, "tie_word_embeddings": False,
}  # fmt: skip
VOCABULARY = 50


class Windows(pl.LightningDataModule):
    """Seeded random token windows: the same on every rank."""

    def __init__(self, rows: int = 32, tokens: int = 16) -> None:
        super().__init__()
        ids = torch.randint(0, VOCABULARY, (rows, tokens), generator=torch.Generator().manual_seed(0))
        self.rows = [{"input_ids": row} for row in ids]

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.rows, batch_size=4)


def language_model() -> CausalLM:
    pl.seed_everything(0, verbose=False)
    return CausalLM(config=CONFIG, vocabulary=VOCABULARY, sample_tokens=0, warmup_steps=1)


def pruning(**options) -> PruneBeforeSharding:
    return PruneBeforeSharding(amount=0.25, importance="l1", log_table=False, **options)


def shapes(module: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    """Full (global) shapes: a sharded parameter is a DTensor whose shape is the whole tensor's."""
    return {name: tuple(parameter.shape) for name, parameter in module.named_parameters()}


def trainer(root: Path, steps: int, **options) -> pl.Trainer:
    save = ModelCheckpoint(dirpath=root / "checkpoints", every_n_train_steps=2, save_last=True, save_top_k=0)
    return pl.Trainer(
        accelerator="cpu", max_steps=steps, logger=False, callbacks=[save, *options.pop("callbacks", [])],
        enable_progress_bar=False, enable_model_summary=False, **options,
    )  # fmt: skip


# --- the job ------------------------------------------------------------------------------------------------
def job(root: Path, strategy_name: str, resume: bool, steps: int, sharded: bool = False, distill: bool = False) -> None:
    from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy

    warnings.filterwarnings("ignore")
    if strategy_name == "fsdp2":
        strategy = ModelParallelStrategy(
            data_parallel_size=2, tensor_parallel_size=1, save_distributed_checkpoint=sharded,
            process_group_backend="gloo",
        )  # fmt: skip
    else:
        strategy = DDPStrategy(process_group_backend="gloo")
    from torch.distributed.tensor import DTensor

    model = language_model()
    teacher = Distillation() if distill else None  # after the pruning: it cuts in its setup, before ours runs
    run = trainer(root, steps, devices=2, strategy=strategy, callbacks=[pruning(), *[teacher] * distill])
    run.fit(model, datamodule=Windows(), ckpt_path=root / "checkpoints" / "last.ckpt" if resume else None)
    wrapped = type(model.model).__name__
    taught = {}
    if teacher is not None:
        taught = {"teacher": shapes(teacher.teacher), "distill": float(run.callback_metrics["distill/loss"]),
                  "teacher_sharded": any(isinstance(p, DTensor) for p in teacher.teacher.parameters())}  # fmt: skip
    torch.save(
        {"shapes": shapes(model), "record": applied_record(model), "step": run.global_step, "class": wrapped,
         "loss": float(run.callback_metrics["train/loss"]), **taught},
        root / f"{'resumed' if resume else 'final'}-rank{run.global_rank}.pt",
    )  # fmt: skip


def bad_job(root: Path, strategy_name: str, what: str) -> None:
    """Two ranks that must not train: ``weights`` differ, ``records`` (each rank asks another amount), or a
    ``scheduled`` StructuredPruning step under FSDP2. Each rank writes the error it stopped with."""
    from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy

    warnings.filterwarnings("ignore")
    rank = int(os.environ.get("LOCAL_RANK", 0))
    if strategy_name == "fsdp2":
        strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1, process_group_backend="gloo")
    else:
        strategy = DDPStrategy(process_group_backend="gloo")
    model = language_model()
    callback = {"weights": pruning(), "records": PruneBeforeSharding(amount=0.25 + 0.25 * rank, log_table=False),
                "scheduled": StructuredPruning(amount=0.3, log_table=False)}[what]  # fmt: skip
    if what == "weights":
        with torch.no_grad():
            model.model.lm_head.weight.add_(rank)
    try:
        trainer(root, 2, devices=2, strategy=strategy, callbacks=[callback]).fit(model, datamodule=Windows())
    except PruningError as error:
        (root / f"error-rank{rank}.txt").write_text(str(error))


def run_job(
    root: Path,
    strategy: str,
    resume: bool = False,
    steps: int = 2,
    sharded: bool = False,
    bad: str | None = None,
    distill: bool = False,
) -> None:
    command = [sys.executable, __file__, str(root), "--strategy", strategy, "--steps", str(steps)]
    command += (["--resume"] if resume else []) + (["--sharded"] if sharded else []) + (["--bad", bad] if bad else [])
    command += ["--distill"] * distill
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


# --- tests --------------------------------------------------------------------------------------------------
def test_a_scheduled_step_under_fsdp_is_refused_and_names_the_one_shot_path() -> None:
    class ModelParallelStrategy:  # the check reads the strategy's class name only
        pass

    fake = type("T", (), {"strategy": ModelParallelStrategy(), "max_epochs": 3})()
    with pytest.raises(PruningError, match=r"ModelParallelStrategy for a scheduled step.*PruneBeforeSharding"):
        StructuredPruning(amount=0.3).setup(fake, language_model(), "fit")


def test_a_schedule_or_gradients_without_calibration_are_refused_at_construction() -> None:
    with pytest.raises(PruningError, match=r"\['schedule'\] cannot be set"):
        PruneBeforeSharding(schedule="linear", when="train_epoch_start")
    assert PruneBeforeSharding(schedule="oneshot", start_epoch=0, when="train_epoch_start").steps == {0: 0.2}
    with pytest.raises(PruningError, match="set `calibration_batches`"):
        PruneBeforeSharding(importance="taylor")


def test_one_process_cuts_in_setup_and_its_checkpoint_resumes_and_loads(tmp_path) -> None:
    model = language_model()
    dense = shapes(model)
    trainer(tmp_path, 2, callbacks=[pruning()]).fit(model, datamodule=Windows())
    pruned = shapes(model)
    assert pruned.keys() == dense.keys() and pruned != dense
    assert all(a <= b for name in dense for a, b in zip(pruned[name], dense[name], strict=True))
    last = tmp_path / "checkpoints" / "last.ckpt"
    resumed = language_model()
    again = trainer(tmp_path, 4, callbacks=[pruning()])
    again.fit(resumed, datamodule=Windows(), ckpt_path=last)
    assert shapes(resumed) == pruned and again.global_step == 4
    assert applied_record(resumed) == applied_record(model)  # cut again alike, then checked against the record
    loaded = CausalLM.load_from_checkpoint(last, weights_only=True)
    assert shapes(loaded) == pruned
    ids = torch.randint(0, VOCABULARY, (2, 8))
    checkpoint = torch.load(last, weights_only=True)
    reference = language_model()
    reference.load_state_dict(checkpoint["state_dict"])  # the carried record cuts the dense module first
    torch.testing.assert_close(loaded.eval()(ids), reference.eval()(ids))


def test_a_checkpoint_set_as_trainer_ckpt_path_is_replayed_without_a_second_cut(tmp_path, caplog) -> None:
    model = language_model()
    trainer(tmp_path, 2, callbacks=[pruning()]).fit(model, datamodule=Windows())
    other = CausalLM(config=CONFIG, vocabulary=VOCABULARY, sample_tokens=0, warmup_steps=1)  # other weights
    again = trainer(tmp_path, 4, callbacks=[pruning()])
    again.ckpt_path = tmp_path / "checkpoints" / "last.ckpt"  # known in setup: fit(ckpt_path=...) sets it later
    caplog.clear()
    with caplog.at_level("INFO"):
        again.fit(other, datamodule=Windows())
    assert "PruneBeforeSharding:" not in caplog.text  # no cut of its own weights, the checkpoint's record instead
    assert shapes(other) == shapes(model) and applied_record(other) == applied_record(model)
    assert again.global_step == 4


def test_gradient_checkpointing_and_bf16_true_train_a_pruned_model(tmp_path) -> None:
    model = CausalLM(config=CONFIG, vocabulary=VOCABULARY, sample_tokens=0, warmup_steps=1, gradient_checkpointing=True)
    assert model.model.is_activation_checkpointing
    run = trainer(tmp_path, 2, callbacks=[pruning()], precision="bf16-true")
    run.fit(model, datamodule=Windows())
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert torch.isfinite(run.callback_metrics["train/loss"])


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["fsdp2", "ddp"])
def test_two_processes_prune_identically_then_shard_train_and_resume(tmp_path, strategy) -> None:
    run_job(tmp_path, strategy)
    ranks = [torch.load(tmp_path / f"final-rank{rank}.pt", weights_only=True) for rank in (0, 1)]
    assert ranks[0]["shapes"] == ranks[1]["shapes"] and ranks[0]["record"] == ranks[1]["record"]
    if strategy == "fsdp2":
        assert ranks[0]["class"].startswith("FSDP")  # fully_shard swaps in an FSDP subclass
    single = language_model()
    trainer(tmp_path / "single", 1, callbacks=[pruning()]).fit(single, datamodule=Windows())
    assert ranks[0]["shapes"] == shapes(single)  # the cut one process makes on the same weights
    run_job(tmp_path, strategy, resume=True, steps=4)
    resumed = [torch.load(tmp_path / f"resumed-rank{rank}.pt", weights_only=True) for rank in (0, 1)]
    assert all(r["shapes"] == ranks[0]["shapes"] and r["step"] == 4 for r in resumed)
    model = language_model()  # and the 2-process checkpoint resumes in one process
    one = trainer(tmp_path, 4, callbacks=[pruning()])
    one.fit(model, datamodule=Windows(), ckpt_path=tmp_path / "checkpoints" / "last.ckpt")
    assert shapes(model) == ranks[0]["shapes"] and one.global_step == 4


@pytest.mark.slow
def test_under_fsdp2_distillation_teaches_with_the_whole_dense_model_kept_before_the_cut(tmp_path) -> None:
    run_job(tmp_path, "fsdp2", distill=True)
    ranks = [torch.load(tmp_path / f"final-rank{rank}.pt", weights_only=True) for rank in (0, 1)]
    dense = shapes(language_model())
    for rank in ranks:
        assert rank["teacher"] == dense and not rank["teacher_sharded"]  # whole on every rank, not the student
        assert rank["shapes"] != dense and rank["class"].startswith("FSDP")
        assert rank["distill"] > 0 and torch.isfinite(torch.tensor(rank["distill"]))
    model, teacher = language_model(), Distillation()  # resumed in one process: the same teacher is rebuilt
    resumed = trainer(tmp_path, 4, callbacks=[pruning(), teacher])
    resumed.fit(model, datamodule=Windows(), ckpt_path=tmp_path / "checkpoints" / "last.ckpt")
    assert shapes(teacher.teacher) == dense and shapes(model) == ranks[0]["shapes"] and resumed.global_step == 4
    written = torch.load(tmp_path / "checkpoints" / "distillation_teacher.pt", weights_only=True)
    for name, tensor in teacher.teacher.state_dict().items():
        if name in written:
            torch.testing.assert_close(tensor, written[name])


@pytest.mark.parametrize(
    "what, message",
    [  # two processes each (~5 s quiet): the scheduled-step refusal stays in the default suite
        pytest.param(
            "weights",
            r"ranks hold different weights before PruneBeforeSharding \(digests \[\d+, \d+\]\).*seed_everything",
            id="weights",
            marks=pytest.mark.slow,
        ),
        pytest.param(
            "records",
            r"ranks made different cuts \(record digests \[\d+, \d+\]\)",
            id="records",
            marks=pytest.mark.slow,
        ),
        pytest.param("scheduled", r"ModelParallelStrategy for a scheduled step.*PruneBeforeSharding", id="scheduled"),
    ],
)
def test_two_fsdp2_ranks_stop_in_setup_with_a_named_error(tmp_path, what: str, message: str) -> None:
    run_job(tmp_path, "fsdp2", bad=what)
    for rank in (0, 1):
        assert re.search(message, (tmp_path / f"error-rank{rank}.txt").read_text(), re.DOTALL)
    assert not (tmp_path / "checkpoints").exists()  # stopped before the first step


@pytest.mark.slow
def test_a_sharded_fsdp2_checkpoint_resumes_pruned_in_two_processes_and_loads_consolidated_in_one(tmp_path) -> None:
    run_job(tmp_path, "fsdp2", sharded=True)
    last = tmp_path / "checkpoints" / "last.ckpt"
    assert last.is_dir() and (last / "meta.pt").is_file()  # a folder of shards and its metadata
    pruned = torch.load(tmp_path / "final-rank0.pt", weights_only=True)["shapes"]
    assert pruned != shapes(language_model())
    run_job(tmp_path, "fsdp2", resume=True, steps=4, sharded=True)
    resumed = [torch.load(tmp_path / f"resumed-rank{rank}.pt", weights_only=True) for rank in (0, 1)]
    assert all(r["shapes"] == pruned and r["step"] == 4 for r in resumed)
    consolidate = [sys.executable, "-m", "lightning.fabric.utilities.consolidate_checkpoint", str(last)]
    done = subprocess.run(consolidate, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    # one process: Lightning's consolidated file holds the weights and the record (its optimizer states are in a
    # layout a one-process fit cannot resume), so the module loads pruned, in the shapes the shards were written in
    loaded = CausalLM.load_from_checkpoint(tmp_path / "checkpoints" / "last.ckpt.consolidated", weights_only=True)
    assert shapes(loaded) == pruned and applied_record(loaded) == resumed[0]["record"]
    assert torch.isfinite(loaded.eval()(torch.randint(0, VOCABULARY, (2, 8)))).all()


@pytest.mark.slow
def test_the_cli_under_trainer_fsdp_saves_a_whole_stock_model_that_computes_what_its_checkpoint_does(
    tmp_path: Path,
) -> None:
    from test_hydra import CLI, FAST, TINY_LM, read_results, run
    from transformers import AutoModelForCausalLM

    one_shot = ["callbacks.pruning._target_=lightning_prune.PruneBeforeSharding", "callbacks.pruning.start_epoch=0",
                "callbacks.pruning.end_epoch=null", "trainer.max_epochs=1"]  # fmt: skip
    fsdp = ["trainer=fsdp", "trainer.accelerator=cpu", "trainer.strategy.process_group_backend=gloo"]
    command = [*CLI, "experiment=llm_pruner", *fsdp, "debug=smoke", *one_shot, *TINY_LM, *FAST,
               f"hydra.run.dir={tmp_path / 'run'}"]  # fmt: skip
    done = run(command, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    results = read_results(tmp_path / "run")
    assert results["model"]["stock_from_pretrained"] and results["final"]["params"] < results["dense"]["params"]
    folder = tmp_path / "run" / "model"
    stock = AutoModelForCausalLM.from_pretrained(folder).eval()  # the class itself, not FSDP's subclass of it
    assert type(stock).__name__ == "LlamaForCausalLM" and stock.dtype == torch.bfloat16  # bf16-true, whole
    assert sum(p.numel() for p in stock.parameters()) == results["final"]["params"]
    checkpoint = CausalLM.load_from_checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    expected = checkpoint.eval().model(ids).logits
    torch.testing.assert_close(stock.float()(ids).logits, expected, rtol=0, atol=0)
    torch.testing.assert_close(from_pretrained(folder).float()(ids).logits, expected, rtol=0, atol=0)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("root", type=Path)
    parser.add_argument("--strategy", choices=["fsdp2", "ddp"], required=True)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--sharded", action="store_true", help="FSDP2 writes sharded checkpoints (folders)")
    parser.add_argument("--distill", action="store_true")
    parser.add_argument("--bad", choices=["weights", "records", "scheduled"], help="a run that must stop in setup")
    arguments = parser.parse_args()
    if arguments.bad:
        bad_job(arguments.root, arguments.strategy, arguments.bad)
    else:
        job(arguments.root, arguments.strategy, arguments.resume, arguments.steps, arguments.sharded, arguments.distill)
