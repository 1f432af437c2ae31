"""The `callbacks/distillation` config group: each option composes with image and language experiments, lists every
argument of Distillation, and a run records in results.json which loss recovered the model."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest
import yaml
from test_hydra import CLI, CONF, FAST, TINY_LM, compose_into, instantiate_all, options, read_results, run

from lightning_prune.callbacks import Distillation

LOSSES = options("callbacks/distillation")


def test_the_group_offers_the_three_losses() -> None:
    assert LOSSES == ["forward_kl", "minillm", "reverse_kl"]


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("experiment", ["llm_pruner", "digits_slimming"])
def test_each_option_composes_with_a_pruning_experiment_and_lists_every_argument(
    tmp_path: Path, loss: str, experiment: str
) -> None:
    text = (CONF / "callbacks" / "distillation" / f"{loss}.yaml").read_text()
    node = yaml.safe_load(text)
    assert set(node) - {"_target_"} == set(inspect.signature(Distillation).parameters)
    for line in text.splitlines():
        if re.match(r"^\w+:", line) and not line.startswith("_target_"):
            assert "  # " in line, f"callbacks/distillation/{loss}.yaml: no comment on {line!r}"
    cfg = compose_into(tmp_path, [f"experiment={experiment}", f"+callbacks/distillation={loss}"])
    (distillation,) = [c for c in instantiate_all(cfg)["callbacks"] if isinstance(c, Distillation)]
    assert distillation.loss == loss and distillation.teacher is None


@pytest.mark.slow
def test_a_language_model_run_records_the_recovery_loss_in_results(tmp_path: Path) -> None:
    command = [*CLI, "experiment=llm_pruner", "+callbacks/distillation=reverse_kl", "debug=smoke", *TINY_LM, *FAST,
               f"hydra.run.dir={tmp_path / 'run'}"]  # fmt: skip
    done = run(command, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    results = read_results(tmp_path / "run")
    assert results["recovery"] == {"loss": "reverse_kl", "alpha": 0.5, "temperature": 1.0,
                                   "teacher": "snapshot before the first cut"}  # fmt: skip
    assert "Distillation: teacher = the model before the first cut (epoch 1)" in done.stdout + done.stderr
    assert (tmp_path / "run" / "checkpoints" / "distillation_teacher.pt").is_file()
