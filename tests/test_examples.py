"""Every script in examples/ runs at a tiny size, in its own process, and does what its docstring says."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from pydoc_data.topics import topics

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
# One thread: these models are tiny, and the machine is shared.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}


def run(command: list[str], cwd: Path, timeout: int = 300) -> str:
    done = subprocess.run(command, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return done.stdout


def number(label: str, output: str) -> int:
    """The integer printed after ``label:`` (with thousands separators)."""
    found = re.search(rf"^{re.escape(label)}: ([\d,]+)", output, re.MULTILINE)
    assert found, f"no '{label}:' line in:\n{output}"
    return int(found.group(1).replace(",", ""))


def test_every_example_has_a_docstring_and_a_line_in_the_readme() -> None:
    readme = (EXAMPLES / "README.md").read_text()
    scripts = sorted(path for path in EXAMPLES.iterdir() if path.suffix in (".py", ".sh"))
    assert [path.name for path in scripts] == [
        "callbacks_in_your_trainer.py",
        "hydra_sweep.sh",
        "prune_causal_lm.py",
        "prune_then_shard.py",
        "prune_torchvision.py",
    ]
    for script in scripts:
        assert f"`{script.name}`" in readme
        text = script.read_text()
        opening = text.split("\n\n", 1)[0]
        assert opening.startswith('"""' if script.suffix == ".py" else "#!/usr/bin/env bash\n# ")
        assert f"examples/{script.name}" in text, f"{script.name} does not say how to run it"


def test_callbacks_in_your_trainer(tmp_path: Path) -> None:
    checkpoints = tmp_path / "checkpoints"
    command = [sys.executable, str(EXAMPLES / "callbacks_in_your_trainer.py"), "--epochs", "4", "--tiny"]
    output = run([*command, "--checkpoints", str(checkpoints)], tmp_path)
    before, after = number("params before", output), number("params after", output)
    assert 0 < after < 0.5 * before  # 50% of the channels: the parameters fall roughly quadratically
    assert number("MACs per image after", output) < 0.5 * number("MACs per image before", output)
    best = re.search(r"^best checkpoint: (.+)$", output, re.MULTILINE).group(1)
    assert Path(best).parent == checkpoints and Path(best).name.startswith("epoch=3")  # after the last cut
    assert (checkpoints / "last.ckpt").is_file()
    assert re.search(r"^test accuracy of the reloaded model: \d+\.\d\d%$", output, re.MULTILINE)


def test_prune_torchvision(tmp_path: Path) -> None:
    command = [sys.executable, str(EXAMPLES / "prune_torchvision.py"), "--arch", "resnet18", "--size", "32"]
    output = run([*command, "--amount", "0.5", "--target", "macs"], tmp_path)
    assert number("params after", output) < number("params before", output)
    assert number("MACs after", output) <= 0.5 * number("MACs before", output)
    assert "output shape: (2, 1000) (unchanged)" in output


TINY_LM = ["--tiny", "--window", "32", "--recovery-windows", "16", "--eval-windows", "8"]


def test_prune_causal_lm_saves_a_model_that_reloads(tmp_path: Path) -> None:
    out = tmp_path / "pruned"
    output = run(
        [sys.executable, str(EXAMPLES / "prune_causal_lm.py"), *TINY_LM, "--amount", "0.5", "--out", str(out)], tmp_path
    )
    assert number("params after", output) < number("params before", output)
    assert "per layer: 4 heads (2 key/value), 64 FFN neurons -> 2 heads (1 key/value), 32 FFN neurons" in output
    assert re.search(r"^test perplexity: dense [\d.]+, after the cut [\d.]+, after LoRA [\d.]+$", output, re.MULTILINE)
    assert "reloads it with the same logits" in output
    config = json.loads((out / "config.json").read_text())
    assert (config["num_key_value_heads"], config["intermediate_size"]) == (1, 32)
    assert (out / "tokenizer.json").is_file()

    # the user's path: their own text files and the saved folder (model and tokenizer) as --pretrained
    documents = [topics[name] for name in sorted(topics)[:40]]
    (tmp_path / "a.txt").write_text("\n".join(documents[:20]))
    (tmp_path / "b.jsonl").write_text("".join(json.dumps({"text": text}) + "\n" for text in documents[20:]))
    again = tmp_path / "again"
    command = [sys.executable, str(EXAMPLES / "prune_causal_lm.py"), "--files", "a.txt", "b.jsonl"]
    output = run([*command, "--pretrained", str(out), *TINY_LM[1:], "--out", str(again)], tmp_path)
    assert "per layer: 2 heads (1 key/value), 32 FFN neurons -> " in output
    assert number("params after", output) < number("params before", output)
    assert "reloads it with the same logits" in output


@pytest.mark.slow
def test_prune_causal_lm_on_the_default_model(tmp_path: Path) -> None:
    """Trains ``lp.default_language_model()`` first if it is not cached yet (about 15 minutes on 2 cores)."""
    output = run([sys.executable, str(EXAMPLES / "prune_causal_lm.py"), "--out", "pruned"], tmp_path, timeout=3600)
    assert number("params after", output) < number("params before", output)
    perplexities = re.search(r"dense ([\d.]+), after the cut ([\d.]+), after LoRA ([\d.]+)$", output, re.MULTILINE)
    dense, cut, recovered = map(float, perplexities.groups())
    assert dense < 200  # a trained model (the README's run: 85.8)
    assert dense < cut and recovered < cut  # the cut costs perplexity, LoRA wins part of it back
    assert "reloads it with the same logits" in output


@pytest.mark.slow  # test_hydra's multirun_and_report runs the same sweep and report from the CLI
def test_hydra_sweep_and_report(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    overrides = ["debug=smoke", "measure.min_run_time=0.05"]
    output = run(["bash", str(EXAMPLES / "hydra_sweep.sh"), str(sweep), *overrides], tmp_path)
    runs = [json.loads((sweep / job / "results.json").read_text()) for job in ("0", "1")]
    assert [r["overrides"] for r in runs] == [[f"callbacks.pruning.amount={a}", *overrides] for a in ("0.3", "0.6")]
    assert runs[1]["final"]["macs"] < runs[0]["final"]["macs"] < runs[0]["dense"]["macs"]
    report = (sweep / "report.md").read_text()
    assert report in output  # the report is printed too
    rows = [line for line in report.splitlines() if line.startswith(("| 0 |", "| 1 |"))]
    assert [row.split(" | ")[1] for row in rows] == ["callbacks.pruning.amount=0.3", "callbacks.pruning.amount=0.6"]
    assert (sweep / "report.png").read_bytes().startswith(b"\x89PNG")


@pytest.mark.slow  # two processes under FSDP2 (about 30 s); each part is tested in tests/test_sharding.py (-m slow)
def test_prune_then_shard_saves_a_whole_stock_model(tmp_path: Path) -> None:
    out = tmp_path / "pruned"
    output = run([sys.executable, str(EXAMPLES / "prune_then_shard.py"), "--tiny", "--out", str(out)], tmp_path)
    assert number("params after", output) < number("params before", output)
    assert "memory per rank: strategy=fsdp, devices=2" in output
    assert "reloads it with the same logits" in output
    config = json.loads((out / "config.json").read_text())
    assert config["intermediate_size"] < 64 and config["dtype"] == "bfloat16"
