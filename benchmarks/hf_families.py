"""Every Hugging Face family of the family tests: 25% local L1 pruning, then a reload with the family's own class.

    python benchmarks/hf_families.py --threads 1

The tiny configs are the ones ``tests/test_families.py``, ``tests/test_hf_encoders.py`` and ``tests/test_experts.py``
build (random weights, transformers from this environment), so this table and the tests describe the same models.
Each family is pruned by L1 with ``scope="local"``, the residual stream included; then saved with
``lightning_prune.save_pretrained`` and reloaded twice: by the family's own ``from_pretrained`` ("stock") and by
``lightning_prune.from_pretrained`` ("lp"). A row gives the share of parameters removed and the largest
``|Δ logit|`` of each reload against the pruned model in memory ("fails": the loader raised). A family prunes
when any parameter went; it round-trips when the stock or the lp reload gives the same logits (within 1e-5).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import test_experts  # the tests' family tables
import test_families
import test_hf_encoders

import lightning_prune as lp

transformers = test_families.transformers
SAME = 1e-5


def families() -> list[tuple[str, Callable[[], torch.nn.Module], dict, type]]:
    """(name, build, inputs, the class whose ``from_pretrained`` reloads it) for every family of the tests."""
    rows = []
    for name in sorted(test_families.FAMILIES):
        rows.append((name, lambda n=name: test_families.build(n), {"input_ids": test_families.ids()}, None))
    for name, expected in sorted(test_hf_encoders.FAMILIES.items()):
        build = lambda n=name: test_hf_encoders.build(n)  # noqa: E731
        inputs = {k: v for k, v in test_hf_encoders.inputs(name).items() if k != "use_cache"}
        rows.append((name, build, inputs, getattr(transformers, expected.model)))
    for name in sorted(test_experts.CONFIGS):
        rows.append((name, lambda n=name: test_experts.build(n), {"input_ids": test_experts.ids()}, None))
    return rows


def largest_difference(load: Callable[[], torch.nn.Module], inputs: dict, reference: torch.Tensor) -> float | None:
    try:
        with torch.no_grad():
            return float((load().eval()(**inputs).logits - reference).abs().max())
    except Exception:  # a loader that refuses the folder: reported as such
        return None


def row(name: str, build: Callable[[], torch.nn.Module], inputs: dict, own: type | None) -> tuple[bool, bool, str]:
    model = build()
    dense = sum(p.numel() for p in model.parameters())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lp.prune(model, {**inputs, "use_cache": False}, 0.25, "l1", scope="local")
    cut = 1 - sum(p.numel() for p in model.parameters()) / dense
    with torch.no_grad():
        reference = model(**inputs).logits
    own = own or transformers.AutoModelForCausalLM
    with tempfile.TemporaryDirectory() as folder, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lp.save_pretrained(model, folder)
        stock = largest_difference(lambda: own.from_pretrained(folder), inputs, reference)
        ours = largest_difference(lambda: lp.from_pretrained(folder), inputs, reference)
    shown = ["fails" if d is None else f"{d:.1e}" for d in (stock, ours)]
    round_trip = any(d is not None and d <= SAME for d in (stock, ours))
    return cut > 0, round_trip, f"| {name} | {100 * cut:.1f}% | {shown[0]} | {shown[1]} |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    torch.set_num_threads(parser.parse_args().threads)
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    print("| family | parameters removed | stock reload max abs Δlogit | lp reload max abs Δlogit |")
    print("|---|---|---|---|")
    pruned = round_trips = 0
    table = families()
    for name, build, inputs, own in table:
        prunes, round_trip, line = row(name, build, inputs, own)
        pruned, round_trips = pruned + prunes, round_trips + round_trip
        print(line, flush=True)
    print(f"\n{pruned}/{len(table)} prune, {round_trips}/{len(table)} round-trip (stock or lp reload within {SAME:g})")


if __name__ == "__main__":
    main()
