"""A newcomer's first hour, as subprocesses at tiny sizes: the README's demo and entry point, what they print
(units, the final table, where the files went, no CUDA_HOME line), and a sweep that ends with its report."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
# a machine with CUDA_HOME and no GPU: torch.utils.cpp_extension would log a line at import
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_HOME": "/nonexistent-cuda", "CUDA_VISIBLE_DEVICES": ""}


def run(command: list[str], cwd: Path) -> subprocess.CompletedProcess:
    done = subprocess.run(command, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "No CUDA runtime is found" not in done.stdout + done.stderr
    return done


def test_the_readme_demo_prints_its_table_with_units_and_an_honest_latency(tmp_path: Path) -> None:
    done = run([str(BIN / "lightning-prune-demo"), "--epochs", "4", "--start-epoch", "1", "--steps", "2",
                "--root", str(tmp_path / "demo")], tmp_path)  # fmt: skip
    table = [line for line in done.stdout.splitlines() if line.startswith("|")]
    assert any(line.startswith("| MACs per image |") for line in table)
    latency = next(line for line in table if line.startswith("| CPU latency"))
    assert "median [IQR]" in latency and ("x faster" in latency or "within noise" in latency)


def test_the_entry_point_ends_with_a_table_with_units_and_the_paths_it_wrote(tmp_path: Path) -> None:
    done = run([str(BIN / "lightning-prune"), "debug=smoke", "trainer.enable_progress_bar=false"], tmp_path)
    out = done.stdout
    assert re.search(r"^MACs \(per sample: one image\)\s+[\d,]+\s+[\d,]+\s+[\d.]+x fewer", out, re.M), out[-2000:]
    assert re.search(r"^parameters\s+[\d,]+\s+[\d,]+", out, re.M)
    assert re.search(r"^latency \(.*\)\s+.*ms", out, re.M)
    paths = dict(re.findall(r"^(results|best checkpoint|last checkpoint): (.+)$", out, re.M))
    assert set(paths) == {"results", "best checkpoint", "last checkpoint"}
    assert all(Path(path).is_file() for path in paths.values()), paths
    assert "MACs per sample" in done.stderr + out  # the pruning step's log line says per what


def test_a_sweep_ends_with_the_path_of_its_report(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    done = run([str(BIN / "lightning-prune"), "-m", "callbacks.pruning.amount=0.3,0.6", "debug=smoke",
                "trainer.enable_progress_bar=false", "measure.min_run_time=0.05", f"hydra.sweep.dir={sweep}"],
               tmp_path)  # fmt: skip
    assert f"report: {sweep / 'report.md'}" in done.stdout
    assert (sweep / "report.md").read_text().count("| callbacks.pruning.amount=") == 2
