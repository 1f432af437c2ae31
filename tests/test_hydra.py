"""The Hydra entry point: every config composes and instantiates, experiments run, sweeps run and report,
the installed wheel works from anywhere, and bad configs fail before training with a message that says why."""

from __future__ import annotations

import inspect
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.utils import get_object, instantiate
from omegaconf import DictConfig, OmegaConf

from lightning_prune import cli, demo
from lightning_prune.callbacks import NetworkSlimming, ShearedPruning, StructuredPruning, load_from_checkpoint
from lightning_prune.cli import (
    ConfigError,
    build_callbacks,
    build_data,
    build_loggers,
    build_model,
    check_config,
    config_dir,
    keep_dense,
)
from lightning_prune.data import DigitsDataModule
from lightning_prune.models import CausalLM, ImageClassifier
from lightning_prune.report import RESULTS

ROOT = Path(__file__).resolve().parent.parent
CONF = ROOT / "conf"
CLI = [sys.executable, "-m", "lightning_prune.cli"]
# One thread per job: sweeps run jobs side by side, and these tiny models gain nothing from more.
ENV = {**{k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}, "OMP_NUM_THREADS": "1"}
FAST = ["trainer.enable_progress_bar=false", "trainer.enable_model_summary=false", "measure.min_run_time=0.05"]
# A language model small enough for seconds: random weights from a config (no trained default model), short windows.
TINY_MODEL = [
    "model.config={model_type:llama,hidden_size:32,intermediate_size:48,num_hidden_layers:3,num_attention_heads:4,"
    "num_key_value_heads:2,max_position_embeddings:256,tie_word_embeddings:false}",
    "data.window=32", "measure.repeats=3", "measure.new_tokens=4",
]  # fmt: skip
TINY_LM = [*TINY_MODEL, "callbacks.pruning.calibration_batches=2", "callbacks.pruning.target=channels"]
# Sheared-LLaMA has no StructuredPruning entry: a target the tiny model can reach, cut after 3 of debug=smoke's 6 steps
TINY_SHEARED = [*TINY_MODEL, "callbacks.shearing.target={hidden_size:24,intermediate_size:32}",
                "callbacks.shearing.mask_steps=3"]  # fmt: skip


def run(command: list[str], cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=timeout)


def options(group: str) -> list[str]:
    return sorted(path.stem for path in (CONF / group).glob("*.yaml"))


def compose_into(tmp_path: Path, overrides: list[str], hydra_config: bool = False) -> DictConfig:
    """The composed train config, with every path it reads or writes inside ``tmp_path``.

    ``paths.data_dir`` holds an empty CIFAR-10 folder: enough for the data module's check at construction
    (nothing is read before ``setup``).
    """
    (tmp_path / "data" / "cifar10" / "cifar-10-batches-py").mkdir(parents=True, exist_ok=True)
    paths = [f"paths.{name}={tmp_path / name.removesuffix('_dir')}" for name in ("output_dir", "log_dir", "data_dir")]
    with initialize_config_dir(str(CONF), version_base="1.3"):
        return compose("train", overrides=[*overrides, *paths], return_hydra_config=hydra_config)


def instantiate_all(cfg: DictConfig) -> dict[str, object]:
    """Build what the entry point builds, in its order; the trainer on the CPU when no GPU is present."""
    import torch

    check_config(cfg)
    data = build_data(cfg)
    callbacks = build_callbacks(cfg)
    keep_dense(callbacks)
    trainer_cfg = cfg.trainer
    if trainer_cfg.accelerator == "gpu" and not torch.cuda.is_available():
        trainer_cfg = OmegaConf.merge(trainer_cfg, {"accelerator": "cpu"})  # every other key is still checked
    trainer = instantiate(trainer_cfg, callbacks=callbacks, logger=build_loggers(cfg) or False)
    return {"data": data, "model": build_model(cfg, data), "callbacks": callbacks, "trainer": trainer}


# --- every yaml composes and every _target_ instantiates ---------------------------------------------
GROUPS = ("data", "model", "pruning", "trainer", "logger", "experiment", "debug")  # callbacks: see below


def choose(group: str, option: str) -> list[str]:
    """``group=option``, with a CIFAR-sized partner where the digits defaults would not fit."""
    if (group, option) in (("data", "text"), ("data", "mixed_text"), ("model", "causal_lm")):
        return [f"data={option if group == 'data' else 'text'}", "model=causal_lm"]
    if group == "data" and option != "digits":
        return [f"data={option}", "model=resnet20"]
    if group == "model" and option != "digits_cnn":
        return [f"model={option}", "data=synthetic"]
    return [f"{group}={option}"]


CASES = [
    *[pytest.param(choose(group, option), id=f"{group}/{option}") for group in GROUPS for option in options(group)],
    pytest.param(["callbacks=default"], id="callbacks/default"),  # composes every other callbacks/*.yaml
    pytest.param([], id="train"),
]


@pytest.mark.parametrize("overrides", CASES)
def test_config_composes_and_instantiates(tmp_path: Path, overrides: list[str]) -> None:
    cfg = compose_into(tmp_path, overrides)
    built = instantiate_all(cfg)
    if cli.is_language(cfg):
        assert isinstance(built["model"], CausalLM)
        assert built["model"].model.get_input_embeddings().num_embeddings == built["data"].vocabulary
    else:
        assert isinstance(built["model"], ImageClassifier)
        channels, size, _ = built["data"].input_shape
        assert built["model"].example_input_array.shape[1:] == (channels, size, size)
    kinds = [type(c) for c in built["callbacks"]]
    pruning = next(kind for kind in kinds if kind in (StructuredPruning, ShearedPruning))
    assert kinds.index(demo.KeepDense) == kinds.index(pruning) - 1
    kinds.remove(demo.KeepDense)
    assert kinds == [get_object(node._target_) for node in cfg.callbacks.values() if node is not None]
    OmegaConf.save(cfg, tmp_path / "config.yaml")  # the composed config, kept with the test's files


def test_latency_target_from_the_command_line_builds_its_timing_settings(tmp_path: Path) -> None:
    overrides = ["pruning=l1", "callbacks.pruning.target=latency", "callbacks.pruning.amount=0.5"]
    timing = ["+callbacks.pruning.options.latency.rounds=3", "+callbacks.pruning.options.latency.min_run_time=0.2"]
    built = instantiate_all(compose_into(tmp_path, [*overrides, *timing]))
    (pruning,) = [c for c in built["callbacks"] if isinstance(c, StructuredPruning)]
    assert pruning.target == "latency" and pruning.options["target"] == "latency"
    assert pruning.options["latency"] == {
        "cache": True, "tolerance": 0.05, "rounds": 3, "repeats": 10, "min_run_time": 0.2
    }  # fmt: skip
    with pytest.raises(Exception, match="`amount` is 0 at epochs"):
        instantiate_all(
            compose_into(tmp_path, ["pruning=l1", "callbacks.pruning.target=latency", "callbacks.pruning.amount=0"])
        )


def test_keep_dense_before_shearing_copies_the_model_as_fit_starts(tmp_path: Path) -> None:
    import lightning.pytorch as pl
    import torch
    from lightning.pytorch.demos.boring_classes import BoringModel

    shearing = ShearedPruning({"hidden_size": 24}, mask_steps=3)
    callbacks: list = [shearing]
    keeper = keep_dense(callbacks)
    assert callbacks == [keeper, shearing] and keeper.epoch is None
    model = BoringModel()
    start = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    trainer = pl.Trainer(default_root_dir=tmp_path, max_steps=2, callbacks=[keeper], logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    trainer.fit(model)
    copied = keeper.model.state_dict()
    assert all(torch.equal(copied[name], tensor) for name, tensor in start.items())
    assert not torch.equal(model.state_dict()["layer.weight"], start["layer.weight"])  # training moved the original


def test_every_yaml_is_exercised() -> None:
    covered = {f"{group}/{option}.yaml" for group in GROUPS for option in options(group)}
    covered |= {f"callbacks/{o}.yaml" for o in options("callbacks")}  # composed by callbacks/default.yaml
    covered |= {f"callbacks/distillation/{o}.yaml" for o in options("callbacks/distillation")}  # + on the command line
    covered |= {"train.yaml", "hydra/default.yaml", "hydra/launcher/slurm.yaml"}
    covered |= {f"hparams_search/{o}.yaml" for o in options("hparams_search")}
    assert {str(p.relative_to(CONF)) for p in CONF.rglob("*.yaml")} == covered
    default = yaml.safe_load((CONF / "callbacks" / "default.yaml").read_text())["defaults"]
    assert set(default) - {"_self_"} == set(options("callbacks")) - {"default"}


def test_hydra_dirs_and_slurm_launcher(tmp_path: Path) -> None:
    cfg = compose_into(tmp_path, ["hydra/launcher=slurm"], hydra_config=True)
    dirs = OmegaConf.to_container(cfg.hydra, resolve=False)
    assert dirs["run"]["dir"].startswith("${paths.log_dir}/${task_name}/runs/")
    assert dirs["sweep"]["dir"].startswith("${paths.log_dir}/${task_name}/multiruns/")
    assert dirs["sweep"]["subdir"] == "${hydra.job.num}" and dirs["job"]["chdir"] is False
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher") and launcher.gpus_per_node == 1
    assert inspect.isclass(get_object(launcher._target_))  # the plugin is installed


@pytest.mark.parametrize("search", options("hparams_search"))
def test_hparams_search_sweeps_existing_keys(tmp_path: Path, search: str) -> None:
    cfg = compose_into(tmp_path, [f"hparams_search={search}"], hydra_config=True)
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_.endswith("OptunaSweeper")
    instantiate(sweeper.sampler)
    for key in sweeper.params:
        assert OmegaConf.select(cfg, key, throw_on_missing=False) is not None, f"{search} sweeps unknown key {key}"
    assert len(sweeper.direction) == len(cfg.optimized_metric)


@pytest.mark.parametrize("name", [o for o in options("callbacks") if o != "default"])
def test_callback_yaml_lists_every_constructor_argument_with_a_comment(name: str) -> None:
    text = (CONF / "callbacks" / f"{name}.yaml").read_text()
    ((key, node),) = yaml.safe_load(text).items()
    assert key == name
    parameters = set(inspect.signature(get_object(node["_target_"])).parameters)
    listed = set(node) - {"_target_"}
    if node["_target_"].startswith("lightning_prune."):
        assert listed == parameters, (
            f"conf/callbacks/{name}.yaml must list every argument of {node['_target_']}: "
            f"add {sorted(parameters - listed)}, remove {sorted(listed - parameters)}"
        )
    else:  # another project's callback: its new arguments need not be listed, but ours must exist
        assert listed <= parameters, sorted(listed - parameters)
    for line in text.splitlines():
        if re.match(r"^\s{2}\w+:", line) and "_target_" not in line:
            assert "  # " in line, f"conf/callbacks/{name}.yaml: no comment on {line.strip()!r}"


def test_default_run_is_the_demo_recipe(tmp_path: Path) -> None:
    cfg = compose_into(tmp_path, [])
    built = instantiate_all(cfg)
    args = demo.parse([])
    expected = demo.default_pruning(args)
    pruning = next(c for c in built["callbacks"] if isinstance(c, StructuredPruning))
    slimming = next(c for c in built["callbacks"] if isinstance(c, NetworkSlimming))
    assert pruning.steps == expected.steps and pruning.options == expected.options
    assert (pruning.importance, pruning.target) == (expected.importance, expected.target)
    assert slimming.penalty == args.penalty and slimming.stop_epoch == "after_pruning"
    assert max(pruning.steps) + 1 == args.start_epoch + args.steps  # where the demo stops the penalty
    assert built["trainer"].max_epochs == args.epochs and cfg.seed == args.seed
    assert built["data"].hparams == DigitsDataModule(seed=args.seed).hparams
    plain = {
        key: list(value) if isinstance(value, tuple) else value for key, value in ImageClassifier().hparams.items()
    }
    assert built["model"].hparams == plain


# --- runs in a subprocess ------------------------------------------------------------------------------
def read_results(folder: Path) -> dict:
    results = json.loads((folder / RESULTS).read_text())
    if "perplexity" in results["final"]:  # a language model
        assert {"overrides", "dense", "final", "units", "speed_ratio", "speed_resolved", "model"} <= set(results)
        measured = {"test/ppl", "perplexity", "params", "macs", "tokens_per_second", "low", "high"}
        assert (Path(results["model"]["path"]) / "config.json").is_file()
    else:
        assert {"overrides", "dense", "final", "units", "latency_ratio", "widths"} <= set(results)
        measured = {"test/acc", "params", "macs", "latency"}
        assert all(after <= before for before, after in results["widths"].values())
    for model in ("dense", "final"):
        assert measured <= set(results[model])
    assert results["final"]["params"] < results["dense"]["params"]
    assert results["final"]["macs"] < results["dense"]["macs"]
    return results


# Every experiment composes and instantiates in test_config_composes_and_instantiates; these run one of each kind
# by default (images: digits_slimming; language models: flap and sheared_llama, and the save/reload and sweep tests)
# and the rest slow.
SMOKE_FAST = {"digits_slimming", "flap", "sheared_llama"}


@pytest.mark.parametrize(
    "experiment",
    [e if e in SMOKE_FAST else pytest.param(e, marks=pytest.mark.slow) for e in options("experiment")],
)
def test_experiment_smoke_run(tmp_path: Path, experiment: str) -> None:
    cfg = compose_into(tmp_path, [f"experiment={experiment}"])
    # CIFAR-10 cannot be downloaded here: same-shaped synthetic images stand in for it
    data = ["data=synthetic"] if cfg.data._target_.endswith("Cifar10DataModule") else []
    data += (TINY_SHEARED if experiment == "sheared_llama" else TINY_LM) if cli.is_language(cfg) else []
    done = run([*CLI, f"experiment={experiment}", "debug=smoke", *data, f"hydra.run.dir={tmp_path / 'run'}"], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    results = read_results(tmp_path / "run")
    assert results["overrides"] == [f"experiment={experiment}", "debug=smoke", *data]
    assert results["final"]["params"] < results["dense"]["params"]
    if experiment == "sheared_llama":  # cut to the target; the saved model is a stock Llama of exactly that shape
        shape = {"hidden_size": 24, "intermediate_size": 32, "num_attention_heads": 4, "num_key_value_heads": 2,
                 "num_hidden_layers": 3}  # fmt: skip
        saved = json.loads((Path(results["model"]["path"]) / "config.json").read_text())
        assert {name: results["sheared"][name] for name in shape} == {name: saved[name] for name in shape} == shape
        assert results["sheared"]["step"] == 3 and results["model"]["stock_from_pretrained"]
        assert results["sheared"]["params_before"] == results["dense"]["params"]
        assert results["sheared"]["params_after"] == results["final"]["params"]


@pytest.mark.slow
def test_sheared_llama_on_mixed_domains_moves_their_weights(tmp_path: Path) -> None:
    import csv

    loading = ["data=mixed_text", "+callbacks.domains._target_=lightning_prune.DynamicBatchLoading",
               "+callbacks.domains.every=2", "+callbacks.domains.windows=2"]  # fmt: skip
    command = [*CLI, "experiment=sheared_llama", "debug=smoke", *loading, *TINY_SHEARED, *FAST]
    done = run([*command, f"hydra.run.dir={tmp_path / 'run'}"], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert read_results(tmp_path / "run")["sheared"]["hidden_size"] == 24
    rows = [r for r in csv.DictReader((tmp_path / "run" / "csv" / "metrics.csv").open()) if r["domains/weight_pydoc"]]
    weights = [(float(r["domains/weight_pydoc"]), float(r["domains/weight_docstrings"])) for r in rows]
    assert len(weights) == 3  # steps 2, 4 and 6 of 6
    assert all(pair[0] + pair[1] == pytest.approx(1.0) and pair[0] != 0.5 for pair in weights)


def test_language_model_run_saves_a_model_that_reloads_to_the_reported_perplexity(tmp_path: Path) -> None:
    import torch

    import lightning_prune as lp

    command = [*CLI, "experiment=flap", "debug=smoke", *TINY_LM, *FAST, f"hydra.run.dir={tmp_path / 'run'}"]
    done = run(command, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    results = read_results(tmp_path / "run")
    assert results["model"]["stock_from_pretrained"] is False  # FLAP: layers of different widths
    assert "test perplexity" in done.stdout and f"results: {tmp_path / 'run' / RESULTS}" in done.stdout
    model = lp.from_pretrained(results["model"]["path"])
    data = lp.CausalLMDataModule(window=32, tokenizer=results["model"]["path"])  # the tokenizer saved beside it
    data.setup()
    first_test_batch = data.splits["test"].windows[
        : yaml.safe_load((CONF / "data" / "text.yaml").read_text())["batch_size"]
    ]
    with torch.no_grad():
        assert lp.perplexity(model, first_test_batch) == pytest.approx(results["final"]["perplexity"], rel=1e-4)
    assert results["final"]["perplexity"] != results["dense"]["perplexity"]


@pytest.mark.slow  # one language-model run stays in the default suite (saves a model that reloads)
def test_language_model_sweep_over_methods_and_amounts_reports_perplexity(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    # model= and data= on the command line too: a sweep checks its overrides against the default config first
    grid = ["model=causal_lm", "data=text", "experiment=llm_pruner,wanda_sp", "callbacks.pruning.amount=0.25,0.5"]
    command = [*CLI, "-m", *grid, "debug=smoke", *TINY_LM, *FAST, f"hydra.sweep.dir={sweep}"]
    done = run(command, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    runs = [read_results(sweep / str(job)) for job in range(4)]
    params = {tuple(r["overrides"][2:4]): r["final"]["params"] for r in runs}
    for method in ("llm_pruner", "wanda_sp"):
        assert (
            params[(f"experiment={method}", "callbacks.pruning.amount=0.5")]
            < params[(f"experiment={method}", "callbacks.pruning.amount=0.25")]
        )
    report = run([str(Path(sys.executable).parent / "lightning-prune-report"), str(sweep)], tmp_path)
    assert report.returncode == 0, report.stderr[-3000:]
    rows = report_rows((sweep / "report.md").read_text())
    assert "dense perplexity" in (sweep / "report.md").read_text()
    for row, results in zip(rows, runs, strict=True):
        assert row[2:4] == [f"{results['dense']['perplexity']:.2f}", f"{results['final']['perplexity']:.2f}"]
        assert row[5] == f"{results['final']['params']:,}"


def report_rows(markdown: str) -> list[list[str]]:
    rows = [line.strip("|").split(" | ") for line in markdown.splitlines() if line.startswith("| ")]
    return [[cell.strip() for cell in row] for row in rows[1:]]


@pytest.mark.parametrize("launcher", ["basic", pytest.param("joblib", marks=pytest.mark.slow)])
def test_multirun_and_report(tmp_path: Path, launcher: str) -> None:
    sweep = tmp_path / "sweep"
    parallel = ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"] if launcher == "joblib" else []
    schedule = ["trainer.max_epochs=3", "callbacks.pruning.start_epoch=1", "callbacks.pruning.end_epoch=2"]
    command = [*CLI, "-m", "callbacks.pruning.amount=0.3,0.6", *schedule, *FAST, *parallel, f"hydra.sweep.dir={sweep}"]
    done = run(command, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    runs = [read_results(sweep / job) for job in ("0", "1")]
    assert [r["overrides"][0] for r in runs] == ["callbacks.pruning.amount=0.3", "callbacks.pruning.amount=0.6"]
    assert runs[1]["final"]["macs"] < runs[0]["final"]["macs"] <= 0.7 * runs[0]["dense"]["macs"] * 1.01

    report = run([str(Path(sys.executable).parent / "lightning-prune-report"), str(sweep)], tmp_path)
    assert report.returncode == 0, report.stderr[-3000:]
    assert sorted(p.name for p in sweep.glob("*.png")) == ["report.png"]
    assert (sweep / "report.png").read_bytes().startswith(b"\x89PNG")
    rows = report_rows((sweep / "report.md").read_text())
    assert len(rows) == 2
    for row, results, job in zip(rows, runs, ("0", "1"), strict=True):
        dense, final = results["dense"], results["final"]
        assert row[:2] == [job, results["overrides"][0]]
        assert row[2:4] == [f"{dense['test/acc']:.2%}", f"{final['test/acc']:.2%}"]
        assert row[5:7] == [f"{final['params']:,}", f"{final['macs']:,}"]
        told = f"{results['latency_ratio']:.2f}x faster" if results["latency_resolved"] else "within noise"
        assert row[8].startswith(told)


@pytest.mark.slow  # the basic sweep is multirun_and_report; this one adds the Optuna sweeper
def test_optuna_sweep(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    command = [*CLI, "hparams_search=digits_optuna", "hydra.sweeper.n_trials=2", "debug=smoke", *FAST]
    done = run([*command, f"hydra.sweep.dir={sweep}"], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    trials = [read_results(sweep / job) for job in ("0", "1")]
    swept = {o.split("=")[0] for trial in trials for o in trial["overrides"]}
    assert {"callbacks.slimming.penalty", "callbacks.pruning.amount"} <= swept
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    found = {(t["values"][0], t["values"][1]) for t in best["solutions"]}
    assert found <= {(t["final"]["test/acc"], t["final"]["macs"]) for t in trials}


# --- the installed package -----------------------------------------------------------------------------
@pytest.mark.slow  # builds and installs a wheel in a fresh venv (~30 s)
def test_wheel_ships_the_configs_and_runs_from_anywhere(tmp_path: Path) -> None:
    source = tmp_path / "source"
    ignore = shutil.ignore_patterns(".git", ".venv", "build", "dist", "logs", "*.egg-info", "__pycache__", "benchmarks")
    shutil.copytree(ROOT, source, ignore=ignore)
    pip = [sys.executable, "-m", "pip"]
    built = run(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist"), str(source)], tmp_path
    )
    assert built.returncode == 0, built.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    shipped = {n.removeprefix("lightning_prune/conf/") for n in zipfile.ZipFile(wheel).namelist() if "/conf/" in n}
    assert shipped == {str(p.relative_to(CONF)) for p in CONF.rglob("*.yaml")}

    venv = tmp_path / "venv"
    assert run([sys.executable, "-m", "venv", "--without-pip", str(venv)], tmp_path).returncode == 0
    python = venv / "bin" / "python"
    own = run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], tmp_path).stdout.strip()
    # torch and friends come from this environment instead of a multi-GB download
    Path(own, "base.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    installed = run([*pip, "--python", str(python), "install", "--no-deps", str(wheel)], tmp_path)
    assert installed.returncode == 0, installed.stderr[-3000:]

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    where = run([str(python), "-c", "import lightning_prune.cli as c; print(c.__file__, c.config_dir())"], elsewhere)
    assert where.stdout.split() == [f"{own}/lightning_prune/cli.py", f"{own}/lightning_prune/conf"], where.stderr
    helped = run([str(venv / "bin" / "lightning-prune"), "--help"], elsewhere)
    assert helped.returncode == 0 and "experiment: cifar10_resnet56_l1, cifar10_vgg_slimming" in helped.stdout
    done = run([str(venv / "bin" / "lightning-prune"), "debug=smoke", *FAST], elsewhere)
    assert done.returncode == 0, done.stderr[-3000:]
    (results,) = (elsewhere / "logs" / "debug" / "runs").glob(f"*/{RESULTS}")
    read_results(results.parent)


def test_checkout_reads_conf_at_the_root() -> None:
    installed = Path(cli.__file__).resolve()
    if not installed.is_relative_to(ROOT):
        pytest.skip(f"lightning_prune is imported from {installed.parent}, not from this checkout ({ROOT})")
    assert config_dir() == CONF
    assert not (ROOT / "lightning_prune" / "conf").exists()  # conf/ is the only copy in the source tree


# --- bad input -------------------------------------------------------------------------------------------
BAD = {
    "unknown_option": (["data=cifar100"], ["Could not find 'data/cifar100'", "Available options in 'data'", "digits"]),
    "misspelt_key": (
        ["callbacks.pruning.amont=0.3"],
        ["Could not override 'callbacks.pruning.amont'", "not in struct"],
    ),
    "misspelt_new_key": (
        ["+callbacks.pruning.amont=0.3"],
        ["`callbacks.pruning.amont` is not an argument", "Did you mean `callbacks.pruning.amount`?"],
    ),
    "missing_value": (["~pruning"], ["not set (??? in the config): callbacks.pruning.amount", "pruning=slimming"]),
    "missing_cifar10": (
        ["data=cifar10", "model=resnet20", "data.root=nowhere"],
        ["nowhere' has no folder cifar-10-batches-py", "data.root="],
    ),
    "unknown_exporter": (["export.onnx=true", "export.exporter=tflite"], ["`export.exporter` must be one of dynamo"]),
    "unsupported_when": (
        ["callbacks.pruning.when=validation_end"],
        ["`callbacks.pruning.when`='validation_end'", "when=train_epoch_end"],
    ),
}


# Raised by check_config: tested in process below; the CLI run of each is slow (the path is the same for all).
CHECKED = ("misspelt_new_key", "missing_value", "unknown_exporter", "unsupported_when")


@pytest.mark.parametrize(
    ("overrides", "messages"),
    [pytest.param(*BAD[name], id=name, marks=[pytest.mark.slow] if name in CHECKED[1:] else []) for name in BAD],
)
def test_bad_config_fails_before_training(tmp_path: Path, overrides: list[str], messages: list[str]) -> None:
    done = run([*CLI, *overrides, f"hydra.run.dir={tmp_path / 'run'}"], tmp_path)
    assert done.returncode != 0
    for message in messages:
        assert message in done.stderr, done.stderr[-3000:]
    written = {p.name for p in tmp_path.rglob("*") if p.is_file()}
    assert not written & {RESULTS, f".{RESULTS}.partial", "metrics.csv", "last.ckpt"}, written


@pytest.mark.parametrize("name", CHECKED)
def test_config_check_refuses_the_bad_configs_of_the_command_line(tmp_path: Path, name: str) -> None:
    overrides, messages = BAD[name]
    with pytest.raises(ConfigError) as refused:
        check_config(compose_into(tmp_path, overrides))
    for message in messages:
        assert message in str(refused.value)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["optimized_metric=accuracy"], "`optimized_metric` 'accuracy' is not something a run records"),
        (
            ["data.seed=${sed}"],
            "the config does not resolve: Interpolation key .sed. not found\n    full_key: data.seed",
        ),
        (["+model.lr_decay=0.1"], r"`model.lr_decay` is not an argument of lightning_prune.ImageClassifier\."),
        (["+trainer.max_epoch=3"], "Did you mean `trainer.max_epochs`?"),
    ],
    ids=["metric", "interpolation", "no_close_argument", "trainer_argument"],
)
def test_config_check_names_the_key(tmp_path: Path, overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        check_config(compose_into(tmp_path, overrides))


def test_export_writes_both_models_as_onnx_files_that_compute_what_the_run_measured(tmp_path: Path) -> None:
    import onnx
    import torch

    import lightning_prune as lp

    command = [*CLI, "debug=smoke", "export.onnx=true", "export.exporter=torchscript", *FAST]
    done = run([*command, f"hydra.run.dir={tmp_path / 'run'}"], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    results = read_results(tmp_path / "run")
    export = results["export"]
    assert export["exporter"] == "torchscript" and export["onnx_latency_dense"]["median"] > 0
    assert "ONNX Runtime latency (IQR)" in done.stdout
    channels = {}
    for name, column in (("dense", 0), ("final", 1)):
        path = Path(export[name]["path"])
        assert path.parent == tmp_path / "run" and export[name]["max_abs_error"] < 1e-3
        graph = onnx.load(path).graph
        shapes = {tuple(init.dims) for init in graph.initializer if len(init.dims) == 4}  # conv weights
        channels[name] = {shape[0] for shape in shapes}
        # each file holds its model's widths: every conv's output channels are among that model's layer widths
        assert channels[name] <= {pair[column] for pair in results["widths"].values()}, shapes
        session = lp.OnnxModule(path, threads=1)
        assert session(torch.randn(5, 1, 8, 8)).shape == (5, 10)  # any batch: the batch dimension is dynamic
    assert channels["final"] != channels["dense"]


@pytest.mark.slow
def test_default_run_reproduces_the_demo(tmp_path: Path) -> None:
    demo_run = run(
        [str(Path(sys.executable).parent / "lightning-prune-demo"), "--root", str(tmp_path / "demo")], tmp_path
    )
    assert demo_run.returncode == 0, demo_run.stderr[-3000:]
    hydra_run = run([*CLI, f"hydra.run.dir={tmp_path / 'run'}"], tmp_path)
    assert hydra_run.returncode == 0, hydra_run.stderr[-3000:]
    results = read_results(tmp_path / "run")
    table = {row[0]: row[1:3] for row in report_rows(demo_run.stdout)}
    dense, final = results["dense"], results["final"]
    assert table["test accuracy"] == [f"{dense['test/acc']:.2%}", f"{final['test/acc']:.2%}"]
    assert table["parameters"] == [f"{dense['params']:,}", f"{final['params']:,}"]
    assert table["MACs per image"] == [f"{dense['macs']:,}", f"{final['macs']:,}"]


def test_ddp_run_prunes_identically_and_writes_one_checkpoint(tmp_path: Path) -> None:
    # trainer=ddp_cpu: two real gloo processes launched by Lightning from the Hydra entry point.
    run_dir = tmp_path / "run"
    done = run([*CLI, "trainer=ddp_cpu", "debug=smoke", *FAST, f"hydra.run.dir={run_dir}"], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    results = read_results(run_dir)
    assert results["overrides"][0] == "trainer=ddp_cpu"
    steps = [line for line in (done.stdout + done.stderr).splitlines() if line.startswith("StructuredPruning: epoch")]
    assert len(steps) == 2  # reported once, by rank zero
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("*.ckpt")) == ["epoch=2-step=6.ckpt", "last.ckpt"]
    pruned = load_from_checkpoint(ImageClassifier, run_dir / "checkpoints" / "last.ckpt")  # in this single process
    assert sum(p.numel() for p in pruned.parameters()) == results["final"]["params"]
