"""``lightning-prune-report DIR``: one table row and one plotted point per ``results.json`` under DIR.

    lightning-prune -m callbacks.pruning.amount=0.3,0.5,0.7
    lightning-prune-report logs/train/multiruns/2026-01-01_12-00-00

Writes ``report.md`` (a Markdown table: test metric before and after pruning, parameters, MACs per sample,
measured speed) and ``report.png`` (the metric against MACs per sample: each run's pruned model, the Pareto
front of the sweep, and the dense baselines) into DIR, and prints the table. The metric is ``test/acc`` for
image runs and ``perplexity`` for language-model runs unless ``--metric`` names another.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

RESULTS = "results.json"  # what every run of lightning-prune writes into its folder


def collect(root: Path) -> list[dict[str, Any]]:
    """Every ``results.json`` under ``root``, in folder order, each with its folder as ``"run"``."""
    runs = []
    for path in sorted(root.rglob(RESULTS), key=lambda p: [int(s) if s.isdigit() else s for s in p.parent.parts]):
        results = json.loads(path.read_text())
        results["run"] = str(path.parent.relative_to(root)) or "."
        runs.append(results)
    if not runs:
        raise FileNotFoundError(
            f"no {RESULTS} under '{root}': point lightning-prune-report at the folder of a run or a sweep "
            "(logs/<task_name>/multiruns/<date>) whose jobs have finished."
        )
    return runs


def labels(runs: list[dict[str, Any]]) -> list[str]:
    """What tells the runs apart: the overrides that not every run shares."""
    shared = set.intersection(*(set(run["overrides"]) for run in runs))
    return [" ".join(o for o in run["overrides"] if o not in shared) or run["run"] for run in runs]


def is_fraction(metric: str) -> bool:
    """Accuracy-like metrics (shown in %, higher is better); anything else (perplexity, loss) as a number."""
    return not any(word in metric for word in ("ppl", "perplexity", "loss"))


def _speed(run: dict[str, Any]) -> str:
    if "latency_ratio" in run:
        told = run.get("latency_resolved", True)  # results of 0.1 runs have no spread
        return f"{run['latency_ratio']:.2f}x faster" if told else f"within noise ({run['latency_ratio']:.2f}x)"
    if "speed_ratio" in run:
        verdict = "" if run.get("speed_resolved") else " (within noise)"
        return f"{run['speed_ratio']:.2f}x tokens/s{verdict}"
    return "-"


def table(runs: list[dict[str, Any]], metric: str) -> str:
    per = next((run["units"]["macs"] for run in runs if "units" in run), "per sample")
    lines = [
        f"| run | overrides | dense {metric} | final {metric} | change | params | MACs ({per}) | MACs vs dense "
        "| speed |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for run, label in zip(runs, labels(runs), strict=True):
        dense, final = run["dense"], run["final"]
        if is_fraction(metric):
            values = f"{dense[metric]:.2%} | {final[metric]:.2%} | {100 * (final[metric] - dense[metric]):+.2f} points"
        else:
            values = f"{dense[metric]:.2f} | {final[metric]:.2f} | {final[metric] / dense[metric] - 1:+.1%}"
        lines.append(
            f"| {run['run']} | {label} | {values} | {final['params']:,} | {final['macs']:,} | "
            f"{final['macs'] / dense['macs']:.1%} | {_speed(run)} |"
        )
    return "\n".join(lines) + "\n"


def pareto(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points no other point beats on both cost (lower is better) and metric (higher is better)."""
    front: list[tuple[float, float]] = []
    for cost, value in sorted(points, key=lambda p: (p[0], -p[1])):
        if not front or value > front[-1][1]:
            front.append((cost, value))
    return front


def plot(runs: list[dict[str, Any]], metric: str, path: Path) -> None:
    try:
        from matplotlib.figure import Figure
    except ImportError as error:
        raise ImportError("the plot needs matplotlib: pip install 'lightning-prune[hydra]'") from error
    figure = Figure(figsize=(7, 4.5), layout="constrained")
    axes = figure.subplots()
    scale, sign = (100, 1) if is_fraction(metric) else (1, -1)  # the front wants higher-is-better
    pruned = [(run["final"]["macs"], scale * run["final"][metric]) for run in runs]
    dense = sorted({(run["dense"]["macs"], scale * run["dense"][metric]) for run in runs})
    front = [(x, sign * y) for x, y in pareto([(x, sign * y) for x, y in pruned])]
    axes.plot(*zip(*front, strict=True), color="tab:blue", alpha=0.4, drawstyle="steps-post", label="Pareto front")
    axes.scatter(*zip(*pruned, strict=True), color="tab:blue", zorder=3, label="pruned + fine-tuned")
    axes.scatter(*zip(*dense, strict=True), color="black", marker="*", s=150, zorder=3, label="dense baseline")
    for (macs, value), label in zip(pruned, labels(runs), strict=True):
        axes.annotate(label, (macs, value), textcoords="offset points", xytext=(4, 4), fontsize=7)
    axes.set_xlabel("MACs per sample")
    axes.set_ylabel(f"{metric} (%)" if is_fraction(metric) else metric)
    axes.set_title(f"{metric} vs MACs, {len(runs)} run(s)")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.savefig(path, dpi=150)


def report(root: Path, metric: str | None = None) -> tuple[Path, Path]:
    """Write ``report.md`` and ``report.png`` into ``root``; return their paths. ``metric`` None: ``test/acc``,
    or ``perplexity`` for language models."""
    runs = collect(root)
    metric = metric or ("test/acc" if "test/acc" in runs[0]["final"] else "perplexity")
    missing = [run["run"] for run in runs if metric not in run["final"]]
    if missing:
        known = ", ".join(k for k, v in runs[0]["final"].items() if isinstance(v, float | int))
        raise ValueError(f"`--metric` {metric!r} is not in the results of run {missing[0]}; known: {known}.")
    markdown, image = root / "report.md", root / "report.png"
    markdown.write_text(f"# {root.name}\n\n![{metric} vs MACs]({image.name})\n\n" + table(runs, metric))
    plot(runs, metric, image)
    return markdown, image


class SweepReport:
    """A Hydra callback (``hydra.callbacks.report`` in ``conf/hydra/default.yaml``): when a multirun ends, write the
    report of its folder and print where it is, so a sweep ends with the path of its table and plot."""

    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:
        root = Path(config.hydra.sweep.dir)
        try:
            markdown, image = report(root)
        except (FileNotFoundError, ValueError, ImportError) as error:  # no finished job, or no matplotlib
            print(f"lightning-prune: no report for {root}: {error}")
            return
        print(f"report: {markdown}\nplot: {image}")

    def __getattr__(self, name: str) -> Any:  # Hydra calls every hook of its Callback interface
        if name.startswith("on_"):
            return lambda *args, **kwargs: None
        raise AttributeError(name)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("directory", type=Path, help="a run or sweep folder (searched recursively for results.json)")
    parser.add_argument(
        "--metric", default=None, help="the metric to tabulate and plot (default: test/acc, or perplexity)"
    )
    args = parser.parse_args(argv)
    markdown, image = report(args.directory, args.metric)
    print(markdown.read_text(), end="")
    print(f"wrote {markdown} and {image}")


if __name__ == "__main__":
    main()
