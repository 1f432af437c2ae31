"""The Hydra entry point: ``lightning-prune [overrides]`` trains, prunes, fine-tunes, tests and writes results.json.

    lightning-prune                                        # the digits recipe of lightning-prune-demo
    lightning-prune experiment=cifar10_vgg_slimming data.root=/path/to/cifar10
    lightning-prune -m callbacks.pruning.amount=0.3,0.6    # then: lightning-prune-report <sweep folder>
    lightning-prune experiment=llm_pruner model.pretrained=/path/to/hf/folder data.files=[a.txt,b.jsonl]

With a language model (``model=causal_lm``, ``data=text``; the LLM experiments set both) the run also writes the
pruned model with ``save_pretrained`` into ``model/`` of the run folder (``lightning_prune.from_pretrained``
loads it in every case, ``AutoModelForCausalLM.from_pretrained`` when its widths are uniform), and
results.json holds the test perplexity; without ``model.pretrained`` the default model is trained first
(cached; ``lightning_prune.default_language_model``).

The configs are ``conf/`` at the root of a checkout; the wheel ships a copy as ``lightning_prune/conf``. A
config is checked before anything is built (missing ``???`` values, interpolations, keys that are not
arguments of their ``_target_``), so a bad one fails in seconds and leaves no results behind.
"""

from __future__ import annotations

import difflib
import inspect
import json
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import hydra
import lightning.pytorch as pl
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import get_object, instantiate
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from torch import nn

from lightning_prune.callbacks import Distillation, ShearedPruning, StructuredPruning
from lightning_prune.callbacks.snapshot import keep_dense
from lightning_prune.data import SplitDataModule
from lightning_prune.export import EXPORTERS, export_pair
from lightning_prune.measure import compare_latency, count_macs, count_params
from lightning_prune.report import RESULTS

MEASURED = ("params", "macs", "latency", "perplexity", "tokens_per_second")  # besides the test metrics
LANGUAGE_MODEL = "lightning_prune.CausalLM"


def config_dir() -> Path:
    """The configs shipped inside the installed package, or ``conf/`` at the root of a checkout."""
    packaged = Path(__file__).resolve().parent / "conf"
    return packaged if packaged.is_dir() else Path(__file__).resolve().parent.parent / "conf"


class ConfigError(ValueError):
    """A composed config that cannot run; the message names the key and the fix."""


# --- checks before anything is built ---------------------------------------------------------------
def check_config(cfg: DictConfig) -> None:
    """Raise :class:`ConfigError` for missing ``???`` values, broken interpolations, unknown arguments and metrics.

    Raises:
        ConfigError: naming every missing key, or the key whose interpolation fails, or the key that is
            not an argument of its ``_target_`` (with the closest argument name), or an ``optimized_metric``
            that no run records.
    """
    try:
        missing = sorted(OmegaConf.missing_keys(cfg))
        plain = {} if missing else OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as error:  # interpolation errors carry the full key
        raise ConfigError(f"the config does not resolve: {error}") from error
    if missing:
        raise ConfigError(
            f"required value(s) not set (??? in the config): {', '.join(missing)}. Set them on the command line "
            f"({missing[0]}=<value>), in an experiment file, or pick a preset that sets them (e.g. pruning=slimming)."
        )
    for key, node in nodes_with_target(plain):
        check_arguments(key, node)
        target = get_object(node["_target_"])
        if inspect.isclass(target) and issubclass(target, StructuredPruning) and node.get("when") == "validation_end":
            raise ConfigError(
                f"`{key}.when`='validation_end': lightning-prune keeps the dense model at the end of the training "
                "epoch of the first step, after a 'validation_end' cut. Use when=train_epoch_end (the default) with "
                "this entry point."
            )
    check_export(plain.get("export") or {})
    metric = plain.get("optimized_metric")
    for name in [metric] if isinstance(metric, str) else metric or []:
        if name not in MEASURED and not name.startswith("test/"):
            raise ConfigError(
                f"`optimized_metric` {name!r} is not something a run records: use one of {', '.join(MEASURED)} "
                "or a metric the model logs in `test_step` (test/acc for ImageClassifier)."
            )


def check_export(export: dict[str, Any]) -> None:
    """Refuse an ``export`` block the run could not carry out, before anything trains."""
    unknown = sorted(set(export) - {"onnx", "exporter"})
    if unknown:
        raise ConfigError(f"`export.{unknown[0]}` is not an export option: the options are `export.onnx` and "
                          "`export.exporter`.")  # fmt: skip
    if not isinstance(export.get("onnx", False), bool):
        raise ConfigError(f"`export.onnx` must be true or false, got {export['onnx']!r}.")
    if export.get("exporter", "dynamo") not in EXPORTERS:
        raise ConfigError(f"`export.exporter` must be one of {', '.join(EXPORTERS)}, got {export['exporter']!r}.")


def nodes_with_target(node: Any, key: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    if isinstance(node, dict):
        if "_target_" in node:
            yield key, node
        for name, value in node.items():
            yield from nodes_with_target(value, f"{key}.{name}" if key else str(name))
    elif isinstance(node, list):
        for index, item in enumerate(node):
            yield from nodes_with_target(item, f"{key}[{index}]")


def check_arguments(key: str, node: dict[str, Any]) -> None:
    """Every key of ``node`` must be an argument of its ``_target_`` (unless that takes ``**kwargs``)."""
    target = node["_target_"]
    try:
        parameters = inspect.signature(get_object(target)).parameters
    except Exception as error:
        raise ConfigError(f"`{key}._target_` {target!r} cannot be imported ({error}). Check the spelling.") from error
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return
    known = [name for name, p in parameters.items() if p.kind is not inspect.Parameter.VAR_POSITIONAL]
    for name in node:
        if not str(name).startswith("_") and name not in known:
            close = difflib.get_close_matches(str(name), known, n=1)
            hint = f"Did you mean `{key}.{close[0]}`? " if close else ""
            raise ConfigError(
                f"`{key}.{name}` is not an argument of {target}. {hint}Its arguments: {', '.join(known)}."
            )


# --- building the run ------------------------------------------------------------------------------
def build_data(cfg: DictConfig) -> SplitDataModule:
    return instantiate(cfg.data, _convert_="all")


def is_language(cfg: DictConfig) -> bool:
    return str(cfg.model.get("_target_", "")) in (LANGUAGE_MODEL, "lightning_prune.models.CausalLM")


def use_default_language_model(cfg: DictConfig) -> None:
    """A causal LM with neither ``pretrained`` nor ``config``: the trained default model (trained once, cached)."""
    if is_language(cfg) and cfg.model.get("pretrained") is None and cfg.model.get("config") is None:
        from lightning_prune.models import default_language_model

        print("lightning-prune: no `model.pretrained`: using the trained default model (training it on first use)")
        cfg.model.pretrained = str(default_language_model())


def build_model(cfg: DictConfig, data: SplitDataModule) -> pl.LightningModule:
    """The model, sized for the data module: its vocabulary (text), or its classes and image shape."""
    if hasattr(data, "vocabulary"):
        return instantiate(cfg.model, vocabulary=data.vocabulary, _convert_="all")
    channels, height, _ = data.input_shape
    return instantiate(
        cfg.model, num_classes=data.num_classes, in_channels=channels, input_size=height, _convert_="all"
    )


def build_callbacks(cfg: DictConfig) -> list[pl.Callback]:
    """The callbacks of ``cfg.callbacks`` in order; entries set to null, or left with no ``_target_``, are left out."""
    entries, built = cfg.get("callbacks") or {}, []
    for name, node in entries.items():
        if node is not None and "_target_" not in node:  # e.g. debug=smoke's schedule keys of a removed entry
            print(f"lightning-prune: `callbacks.{name}` has no `_target_` (removed): ignoring {', '.join(node)}")
        elif node is not None:
            built.append(instantiate(node, _convert_="all"))
    return built


def build_loggers(cfg: DictConfig) -> list[Any]:
    entries = cfg.get("logger") or {}
    return [instantiate(node, _convert_="all") for node in entries.values() if node is not None]


def recovery(callbacks: list[pl.Callback]) -> dict[str, Any]:
    """How the pruned model was recovered: the distillation loss and its settings, or the task loss alone."""
    found = [c for c in callbacks if isinstance(c, Distillation)]
    if not found:
        return {"loss": "task"}
    return {"loss": found[0].loss, "alpha": found[0].alpha, "temperature": found[0].temperature,
            "teacher": found[0].source}  # fmt: skip


# --- measuring ---------------------------------------------------------------------------------------
def widths(model: nn.Module) -> dict[str, int]:
    """Output width of every convolution, linear and normalisation layer."""
    found = {}
    for name, module in model.named_modules():
        for attribute in ("out_channels", "out_features", "num_features"):
            if isinstance(getattr(module, attribute, None), int):
                found[name] = getattr(module, attribute)
                break
    return found


def measure(
    models: tuple[pl.LightningModule, pl.LightningModule],
    tested: tuple[dict, dict],
    images: torch.Tensor,
    cfg: DictConfig,
) -> tuple[dict, dict, dict]:
    """Test metrics, parameters, MACs per image and seconds per forward of ``images`` of the dense and the final
    model, on the CPU; the two are timed in turns (median and interquartile range), and their latency ratio is
    ``latency_resolved`` when the ranges are apart."""
    timing = cfg.get("measure") or {}
    dense, final = (model.cpu().eval() for model in models)
    spreads = compare_latency(
        dense, final, images, threads=timing.get("threads"), min_run_time=timing.get("min_run_time", 1.0)
    )
    entries = [
        {**metrics, "params": count_params(model), "macs": count_macs(model, images[:1]), "latency": spread.median,
         "latency_low": spread.low, "latency_high": spread.high}
        for model, metrics, spread in zip((dense, final), tested, (spreads.dense, spreads.pruned), strict=True)
    ]  # fmt: skip
    ratio = {"latency_ratio": spreads.ratio, "latency_resolved": spreads.resolved, "latency_threads": spreads.threads}
    return entries[0], entries[1], ratio


def measure_language(model: pl.LightningModule, tested: dict[str, float], data: Any, cfg: DictConfig) -> dict:
    """Test perplexity, parameters, MACs per window and greedy generation speed (median and spread), on the CPU."""
    from lightning_prune.language import generation_speed

    model = model.cpu().eval()
    timing = cfg.get("measure") or {}
    window = data.splits["test"][0]["input_ids"][None]  # the first test window (of the first domain, if several)
    speed = generation_speed(
        model.model, window[:, :16], new_tokens=timing.get("new_tokens", 32), repeats=timing.get("repeats", 5),
        threads=timing.get("threads"),
    )  # fmt: skip
    return {
        **tested, "perplexity": tested["test/ppl"], "params": count_params(model),
        "macs": count_macs(model, {"input_ids": window}), **speed,
    }  # fmt: skip


def export_models(
    dense: pl.LightningModule, final: pl.LightningModule, data: Any, cfg: DictConfig, folder: Path
) -> dict:
    """Both models as checked ONNX files in ``folder`` and their ONNX Runtime latencies, timed in turns: one test
    window of a language model (any batch and length), the test batch of an image model (any batch)."""
    timing = cfg.get("measure") or {}
    if is_language(cfg):
        window = data.splits["test"][0]["input_ids"][None]  # the first test window (of the first domain, if several)
        models = (dense.model.cpu().eval(), final.model.cpu().eval())
        inputs: Any = {"input_ids": window, "use_cache": False}
        dims, checks = (
            {0: "batch", 1: "sequence"},
            [{"input_ids": window[:, : window.shape[1] // 2], "use_cache": False}],
        )
    else:
        images = next(iter(data.test_dataloader()))[0]
        models, inputs, dims, checks = (dense.cpu().eval(), final.cpu().eval()), images, {0: "batch"}, [images[:3]]
    return export_pair(
        *models, inputs, folder, exporter=cfg.export.exporter, dynamic_dims=dims, check_inputs=checks,
        threads=timing.get("threads"), min_run_time=timing.get("min_run_time", 1.0),
    )  # fmt: skip


def summary(results: dict[str, Any], paths: list[tuple[str, Any]]) -> str:
    """The before/after table a run ends with, and where its files are."""
    dense, final = results["dense"], results["final"]
    rows = [
        (
            "parameters",
            f"{dense['params']:,}",
            f"{final['params']:,}",
            f"{dense['params'] / final['params']:.2f}x fewer",
        )
    ]
    rows.append((f"MACs ({results['units']['macs']})", f"{dense['macs']:,}", f"{final['macs']:,}",
                 f"{dense['macs'] / final['macs']:.2f}x fewer"))  # fmt: skip
    if "perplexity" in final:
        rows.insert(0, ("test perplexity", f"{dense['perplexity']:.2f}", f"{final['perplexity']:.2f}",
                        f"{final['perplexity'] / dense['perplexity'] - 1:+.1%}"))  # fmt: skip
        told = f"{results['speed_ratio']:.2f}x" if results["speed_resolved"] else "within noise"
        rows.append(("generation tokens/s (IQR)", _spread(dense), _spread(final), told))
    else:
        metric = next((k for k in final if k.startswith("test/")), None)
        if metric is not None:
            rows.insert(0, (metric, f"{dense[metric]:.4g}", f"{final[metric]:.4g}", ""))
        ratio = f"{results['latency_ratio']:.2f}x faster" if results["latency_resolved"] else "within noise"
        rows.append((f"latency (forward of {results['latency_batch']} images; IQR)", _milliseconds(dense),
                     _milliseconds(final), ratio))  # fmt: skip
    if "export" in results:
        onnx = results["export"]
        told = f"{onnx['onnx_latency_ratio']:.2f}x faster" if onnx["onnx_latency_resolved"] else "within noise"
        rows.append(("ONNX Runtime latency (IQR)", _milliseconds(onnx["onnx_latency_dense"], ""),
                     _milliseconds(onnx["onnx_latency_final"], ""), told))  # fmt: skip
    width, cell = max(len(row[0]) for row in rows), max(14, *(len(value) for row in rows for value in row[1:3]))
    lines = [f"{'':{width}}  {'dense':>{cell}}  {'final':>{cell}}  change"]
    lines += [f"{name:{width}}  {before:>{cell}}  {after:>{cell}}  {change}" for name, before, after, change in rows]
    lines += [f"{name}: {where}" for name, where in paths if where]
    return "\n".join(lines)


def _spread(entry: dict[str, float]) -> str:
    return f"{entry['tokens_per_second']:.0f} [{entry['low']:.0f}-{entry['high']:.0f}]"


def _milliseconds(entry: dict[str, float], prefix: str = "latency_") -> str:
    """``entry``'s median and interquartile range in ms: keys ``latency``/``latency_low``/``latency_high``, or
    ``median``/``low``/``high`` with ``prefix=""``."""
    median, low, high = entry["latency" if prefix else "median"], entry[f"{prefix}low"], entry[f"{prefix}high"]
    return f"{median * 1e3:.2f} ms [{low * 1e3:.2f}-{high * 1e3:.2f}]"


def checkpoint_paths(trainer: pl.Trainer) -> list[tuple[str, Any]]:
    callback = trainer.checkpoint_callback
    if callback is None:
        return []
    return [("best checkpoint", getattr(callback, "best_model_path", "")),
            ("last checkpoint", getattr(callback, "last_model_path", ""))]  # fmt: skip


def model_path(results: dict[str, Any]) -> list[tuple[str, Any]]:
    saved = results.get("model")
    if not saved:
        return []
    how = (
        "AutoModelForCausalLM.from_pretrained" if saved["stock_from_pretrained"] else "lightning_prune.from_pretrained"
    )
    return [(f"pruned model (loads with {how})", saved["path"])]


def overrides() -> list[str]:
    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


def write_results(results: dict[str, Any], folder: Path) -> Path:
    """Write ``results.json`` atomically: a crash leaves either no file or a complete one."""
    folder.mkdir(parents=True, exist_ok=True)
    path, partial = folder / RESULTS, folder / f".{RESULTS}.partial"
    partial.write_text(json.dumps(results, indent=2) + "\n")
    os.replace(partial, path)
    return path


def optimized(results: dict[str, Any], metric: Any) -> float | list[float] | None:
    """The value(s) of ``metric`` (a key of ``results["final"]``, a list of keys, or null) for a sweeper."""
    if metric is None:
        return None
    names = [metric] if isinstance(metric, str) else list(metric)
    unknown = [name for name in names if name not in results["final"]]
    if unknown:
        raise ConfigError(
            f"`optimized_metric` {unknown[0]!r} is not a result of this run. Known: {', '.join(results['final'])}."
        )
    values = [float(results["final"][name]) for name in names]
    return values[0] if isinstance(metric, str) else values


# --- the run -------------------------------------------------------------------------------------------
def train(cfg: DictConfig) -> float | list[float] | None:
    """Check ``cfg``, build everything, fit and test; write results.json to ``paths.output_dir``.

    Returns:
        The value of ``cfg.optimized_metric`` in the final model's results (a list for a list of metrics).

    Raises:
        ConfigError: before anything is built or trained, for a config that cannot run.
    """
    check_config(cfg)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    use_default_language_model(cfg)
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    data = build_data(cfg)
    model = build_model(cfg, data)
    callbacks = build_callbacks(cfg)
    if cfg.get("plan"):  # the memory plan of this run, and no training
        from lightning_prune.memory_report import plan_run

        print(plan_run(cfg, data, model, callbacks))
        return None
    keeper = keep_dense(callbacks)
    loggers = build_loggers(cfg)
    trainer: pl.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False, _convert_="all")
    for logger in loggers:
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))

    trainer.fit(model, datamodule=data)
    final_test = trainer.test(model, datamodule=data, verbose=False)[0]
    dense = model
    if keeper is not None and keeper.model is not None:
        # a fresh module: the copy still carries Lightning's caches of the original's metric objects
        dense = build_model(cfg, data)
        dense.load_state_dict(keeper.model.state_dict())
    dense_test = final_test if dense is model else trainer.test(dense, datamodule=data, verbose=False)[0]

    folder = Path(cfg.paths.output_dir)
    if is_language(cfg):
        before, after = measure_language(dense, dense_test, data, cfg), measure_language(model, final_test, data, cfg)
        results = {
            "overrides": overrides(), "dense": before, "final": after,
            "units": {"macs": f"per sample: one window of {data.window} tokens", "tokens_per_second": "greedy "
                      "generation, KV cache, batch 1, median of repeats (low/high: interquartile range)"},
            "speed_ratio": after["tokens_per_second"] / before["tokens_per_second"],
            # a ratio is only told when the interquartile ranges of at least 3 runs each do not overlap
            "speed_resolved": (cfg.get("measure") or {}).get("repeats", 5) >= 3
            and (after["low"] > before["high"] or after["high"] < before["low"]),
        }  # fmt: skip
        from lightning_prune.saving import gathered, save_pretrained

        whole = gathered(model.model)  # every rank takes part in gathering a sharded model; rank 0 gets it
        if trainer.is_global_zero:
            stock = save_pretrained(whole, folder / "model", tokenizer=data.tokenizer)
            results["model"] = {"path": str(folder / "model"), "stock_from_pretrained": stock}
    else:
        images = next(iter(data.test_dataloader()))[0]
        before, after, ratio = measure((dense, model), (dense_test, final_test), images, cfg)
        dense_widths, final_widths = widths(dense), widths(model)
        results = {
            "overrides": overrides(), "dense": before, "final": after,
            "units": {"macs": "per sample: one image", "latency": f"seconds per forward of {len(images)} images, "
                      "median of repeats timed in turns (low/high: interquartile range)"},
            **ratio, "latency_batch": len(images),
            "widths": {name: [width, final_widths[name]] for name, width in dense_widths.items()},
        }  # fmt: skip
    results["recovery"] = recovery(callbacks)
    for sheared in (c for c in callbacks if isinstance(c, ShearedPruning)):
        results["sheared"] = dict(sheared.done)  # the step of the cut, the shape reached, parameters before/after
    if trainer.is_global_zero and (cfg.get("export") or {}).get("onnx"):
        results["export"] = export_models(dense, model, data, cfg, folder)
    if trainer.is_global_zero:
        path = write_results(results, folder)
        print(summary(results, [("results", path), *checkpoint_paths(trainer), *model_path(results)]))
    return optimized(results, cfg.get("optimized_metric"))


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="train")
def main(cfg: DictConfig) -> float | list[float] | None:
    return train(cfg)


if __name__ == "__main__":
    main()
