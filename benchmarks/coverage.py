"""Coverage: which torchvision classification models prune at 50% and still run, ours next to Torch-Pruning.

Every model of ``torchvision.models.list_models(module=torchvision.models)`` (weights=None) is pruned by
L1 norm, 50% of channels, the classifier excluded, once by lightning-prune and once by Torch-Pruning
(``pip install torch-pruning==1.6.1``), each in a fresh subprocess with a time limit. A model counts
when pruning finishes and the pruned model runs with the dense output shape. For lightning-prune the
pruned model is also verified by re-tracing (a plan that would compute something else is rolled back).

    python benchmarks/coverage.py                 # every model, both engines (about an hour on 2 cores)
    python benchmarks/coverage.py resnet18 swin_t # a few
    python benchmarks/coverage.py --engines ours --timeout 120
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import torch


def inputs_for(name: str) -> torch.Tensor:
    size = 299 if name == "inception_v3" else 224
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))


def classifier_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [
        m
        for m in model.modules()
        if (isinstance(m, torch.nn.Linear) and m.out_features == 1000)
        or (isinstance(m, torch.nn.Conv2d) and m.out_channels == 1000)
    ]


def run_one(name: str, engine: str) -> dict:
    import torchvision

    torch.manual_seed(0)
    torch.set_num_threads(2)
    model = torchvision.models.get_model(name, weights=None).eval()
    x = inputs_for(name)
    with torch.no_grad():
        shape = tuple(model(x).shape)
    params = sum(p.numel() for p in model.parameters())
    start = time.perf_counter()
    if engine == "ours":
        import lightning_prune as lp

        result = lp.prune(model, x, 0.5, "l1")
        left_alone = len(result.unprunable)
    else:
        import torch_pruning as tp

        pruner = tp.pruner.MagnitudePruner(
            model,
            x,
            importance=tp.importance.MagnitudeImportance(p=1),
            pruning_ratio=0.5,
            ignored_layers=classifier_layers(model),
        )
        pruner.step()
        left_alone = None
    seconds = time.perf_counter() - start
    model.eval()
    with torch.no_grad():
        out = model(x)
    ok = tuple(out.shape) == shape and bool(torch.isfinite(out).all())
    after = sum(p.numel() for p in model.parameters())
    return {"ok": ok, "seconds": seconds, "params": after / params, "left_alone": left_alone}


def run_isolated(name: str, engine: str, timeout: float) -> dict:
    command = [sys.executable, __file__, "--one", name, "--engines", engine]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": f"no result in {timeout:.0f} s"}
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode or not lines:
        last = (done.stderr.strip().splitlines() or ["?"])[-1]
        return {"ok": False, "error": last[:90]}
    return json.loads(lines[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="*")
    parser.add_argument("--engines", default="ours,tp")
    parser.add_argument("--timeout", type=float, default=300.0)
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one, args.engines)))
        return
    import torchvision

    names = args.models or torchvision.models.list_models(module=torchvision.models)
    engines = args.engines.split(",")
    totals = dict.fromkeys(engines, 0)
    print(f"| model | {' | '.join(f'{e}: result | {e}: s | {e}: params kept' for e in engines)} |")
    print("|---|" + "---|---|---|" * len(engines))
    for name in names:
        cells = []
        for engine in engines:
            result = run_isolated(name, engine, args.timeout)
            totals[engine] += result["ok"]
            if result["ok"]:
                cells += ["ok", f"{result['seconds']:.1f}", f"{result['params']:.0%}"]
            else:
                cells += [result.get("error", "wrong output"), "", ""]
        print(f"| {name} | {' | '.join(cells)} |", flush=True)
    print()
    for engine in engines:
        print(f"{engine}: {totals[engine]} of {len(names)} models pruned at 50% and ran with the right output shape")


if __name__ == "__main__":
    main()
