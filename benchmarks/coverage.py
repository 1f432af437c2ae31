"""Coverage: which image models prune and still run and train, ours next to Torch-Pruning.

Every model of ``torchvision.models.list_models(module=torchvision.models)`` (weights=None), or with
``--zoo timm`` one representative model of each timm family (``TIMM``, pretrained=False), is pruned by L1
norm (50% of channels for torchvision, 30% for timm; ``--scope`` global for torchvision, local — every group
loses the same fraction, Torch-Pruning's default — for timm), once by lightning-prune (which keeps the model's
output whole itself) and once by Torch-Pruning (its ``ignored_layers`` set to the classifier;
``pip install torch-pruning==1.6.1``), each in a fresh subprocess with a time limit.
A model counts when pruning finishes, the pruned model runs with the dense output shape and takes one
training step (SGD on a cross-entropy loss) with finite outputs. For lightning-prune the pruned model is
also verified by re-tracing (a plan that would compute something else is rolled back).

``--exact`` adds the equivalence test of BatchNorm models: zero γ and β of the first quarter of the channels of
every BatchNorm that is the only reader of a convolution's output (a pre-norm BatchNorm on a residual stream is
left: the stream carries a channel its branch drops, so the test does not apply there), prune 10% of channels by
``bn_scale`` (Torch-Pruning: ``BNScaleImportance``), and
report the largest change of the eval-mode output relative to its scale (0 is exact: only dead channels went).

    python benchmarks/coverage.py                 # every torchvision model, both engines (about an hour)
    python benchmarks/coverage.py resnet18 swin_t # a few
    python benchmarks/coverage.py --zoo timm --exact --timeout 240
    python benchmarks/coverage.py --engines ours --timeout 120
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import torch

# One model per timm family (the smallest of each), as a user would pick them.
TIMM = [
    "resnet18", "resnext26ts", "regnetx_002", "regnety_002", "efficientnet_b0", "mobilenetv3_small_100",
    "mobilenetv2_050", "mixnet_s", "ghostnet_100", "rexnet_100", "lcnet_050", "tinynet_e", "hardcorenas_a",
    "densenet121", "dla34", "dpn48b", "cspresnet50", "cspdarknet53", "cs3darknet_s", "res2net50_14w_8s",
    "skresnet18", "selecsls42b", "vovnet39a", "repvgg_a0", "hrnet_w18_small", "inception_v3", "xception41",
    "nf_resnet26", "convnext_atto", "convnextv2_atto", "efficientformer_l1", "edgenext_xx_small",
    "mobilevit_xxs", "fastvit_t8", "poolformer_s12", "vit_tiny_patch16_224", "deit_tiny_patch16_224",
    "cait_xxs24_224", "beit_base_patch16_224", "swin_tiny_patch4_window7_224", "levit_128s", "pit_ti_224",
    "mixer_s32_224", "resmlp_12_224", "convmixer_768_32", "twins_svt_small", "visformer_tiny", "coat_lite_tiny",
    "maxvit_nano_rw_256", "tresnet_m",
]  # fmt: skip


def build(name: str, zoo: str) -> tuple[torch.nn.Module, torch.Tensor]:
    """The model (random weights) and two inputs of the size it was made for."""
    if zoo == "timm":
        import timm

        model = timm.create_model(name, pretrained=False)
        size = model.pretrained_cfg.get("input_size", (3, 224, 224))
    else:
        import torchvision

        model = torchvision.models.get_model(name, weights=None)
        size = (3, 299, 299) if name == "inception_v3" else (3, 224, 224)
    return model.eval(), torch.randn(2, *size, generator=torch.Generator().manual_seed(0))


def trains_one_step(model: torch.nn.Module, x: torch.Tensor) -> bool:
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    out = model(x)
    out = out[0] if isinstance(out, tuple) else out  # inception's auxiliary logits in training mode
    loss = torch.nn.functional.cross_entropy(out, torch.zeros(len(x), dtype=torch.long))
    loss.backward()
    optimizer.step()
    return bool(torch.isfinite(loss))


def post_conv_norms(model: torch.nn.Module, x: torch.Tensor) -> list[torch.nn.BatchNorm2d]:
    """The BatchNorms that are the only reader of a convolution's output (Network Slimming's setting). A
    BatchNorm whose input also feeds a shortcut (MaxViT's pre-norm over the stem output) or that reads the
    residual stream (Visformer) silences a channel for its branch only, the stream carries it on, so the
    zeroed-channel test does not apply to it. Readers are counted on the autograd graph of one forward."""
    conv_out, found = set(), []

    def conv_hook(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> None:
        conv_out.add(output.grad_fn)

    def norm_hook(module: torch.nn.Module, args: tuple) -> None:
        node = args[0].grad_fn
        if node in conv_out and all(module is not norm for norm, _ in found):
            found.append((module, node))

    handles = [
        m.register_forward_hook(conv_hook) if isinstance(m, torch.nn.Conv2d) else m.register_forward_pre_hook(norm_hook)
        for m in model.modules()
        if isinstance(m, (torch.nn.Conv2d, torch.nn.BatchNorm2d))
    ]
    try:
        with torch.enable_grad():
            out = model(x)
    finally:
        for handle in handles:
            handle.remove()
    readers: dict = {}
    stack, seen = [t.grad_fn for t in (out if isinstance(out, (tuple, list)) else [out])], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        for child, _ in node.next_functions:
            if child is not None:
                readers[child] = readers.get(child, 0) + 1
                stack.append(child)
    return [norm for norm, node in found if readers.get(node, 0) == 1]


def exact_change(model: torch.nn.Module, x: torch.Tensor, engine: str) -> float | str | None:
    """Largest relative change of the output when 10% of channels go by BN scale after the first quarter of
    every post-convolution BatchNorm's channels was zeroed (None: no BatchNorm, or none in a prunable group;
    "pre-norm only": every BatchNorm reads something other than a convolution's output)."""
    if not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules()):
        return None
    norms = post_conv_norms(model, x)
    if not norms:
        return "pre-norm only"
    with torch.no_grad():
        for norm in norms:
            quarter = norm.num_features // 4
            norm.weight[:quarter] = 0
            norm.bias[:quarter] = 0
        before = model(x)
    if engine == "ours":
        import lightning_prune as lp

        try:
            lp.prune(model, x, 0.1, "bn_scale")
        except lp.PruningError as error:
            if "scored none" not in str(error):
                raise
            return None  # every BatchNorm sits in channels left whole (FastViT's): the test does not apply
    else:
        import torch_pruning as tp

        tp.pruner.MagnitudePruner(
            model, x, importance=tp.importance.BNScaleImportance(), pruning_ratio=0.1,
            ignored_layers=classifier_layers(model),
        ).step()  # fmt: skip
    with torch.no_grad():
        after = model(x)
    return float((after - before).abs().max() / before.abs().max().clamp_min(1e-12))


def classifier_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [
        m
        for m in model.modules()
        if (isinstance(m, torch.nn.Linear) and m.out_features == 1000)
        or (isinstance(m, torch.nn.Conv2d) and m.out_channels == 1000)
    ]


def run_one(name: str, engine: str, zoo: str, amount: float, exact: bool, scope: str, threads: int) -> dict:
    torch.manual_seed(0)
    torch.set_num_threads(threads)
    model, x = build(name, zoo)
    with torch.no_grad():
        shape = tuple(model(x).shape)
    params = sum(p.numel() for p in model.parameters())
    start = time.perf_counter()
    if engine == "ours":
        import lightning_prune as lp

        result = lp.prune(model, x, amount, "l1", scope=scope)  # the engine keeps the model's output whole
        left_alone = len(result.unprunable)
    else:
        import torch_pruning as tp

        pruner = tp.pruner.MagnitudePruner(
            model,
            x,
            importance=tp.importance.MagnitudeImportance(p=1),
            pruning_ratio=amount,
            ignored_layers=classifier_layers(model),
            global_pruning=scope == "global",
        )
        pruner.step()
        left_alone = None
    seconds = time.perf_counter() - start
    model.eval()
    with torch.no_grad():
        out = model(x)
    ok = tuple(out.shape) == shape and bool(torch.isfinite(out).all())
    after = sum(p.numel() for p in model.parameters())
    trained = ok and trains_one_step(model, x)
    change = exact_change(build(name, zoo)[0], x, engine) if exact else None
    return {"ok": ok and trained, "seconds": seconds, "params": after / params, "left_alone": left_alone,
            "exact": change}  # fmt: skip


def run_isolated(name: str, engine: str, timeout: float, options: list[str]) -> dict:
    command = [sys.executable, __file__, "--one", name, "--engines", engine, *options]
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
    parser.add_argument("--zoo", choices=("torchvision", "timm"), default="torchvision")
    parser.add_argument("--amount", type=float, default=None, help="of channels (default 0.5 torchvision, 0.3 timm)")
    parser.add_argument("--exact", action="store_true", help="also the zeroed-BatchNorm equivalence test")
    parser.add_argument(
        "--scope", choices=("local", "global"), help="selection (default global torchvision, local timm)"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=2,
        help="torch threads per model (1 on a shared machine: the seconds stay honest)",
    )
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    amount = args.amount if args.amount is not None else (0.3 if args.zoo == "timm" else 0.5)
    scope = args.scope or ("local" if args.zoo == "timm" else "global")
    if args.one:
        print(json.dumps(run_one(args.one, args.engines, args.zoo, amount, args.exact, scope, args.threads)))
        return
    if args.zoo == "timm":
        names = args.models or TIMM
    else:
        import torchvision

        names = args.models or torchvision.models.list_models(module=torchvision.models)
    options = [
        "--zoo",
        args.zoo,
        "--amount",
        str(amount),
        "--scope",
        scope,
        "--threads",
        str(args.threads),
        *(["--exact"] if args.exact else []),
    ]
    engines = args.engines.split(",")
    totals, real, exact = dict.fromkeys(engines, 0), dict.fromkeys(engines, 0), dict.fromkeys(engines, 0)
    columns = ["result", "s", "params kept", "unprunable"] + (["BN zeroed: change"] if args.exact else [])
    print(f"| model | {' | '.join(f'{e}: {c}' for e in engines for c in columns)} |")
    print("|---|" + "---|" * len(columns) * len(engines))
    for name in names:
        cells = []
        for engine in engines:
            result = run_isolated(name, engine, args.timeout, options)
            totals[engine] += result["ok"]
            if result["ok"]:
                real[engine] += result["params"] <= 0.8
                left = result.get("left_alone")
                cells += [
                    "ok",
                    f"{result['seconds']:.1f}",
                    f"{result['params']:.0%}",
                    "–" if left is None else str(left),
                ]
            else:
                cells += [result.get("error", "wrong output"), "", "", ""]
            if args.exact:
                change = result.get("exact")
                exact[engine] += isinstance(change, float) and change < 1e-4
                cells.append("no BN" if change is None else change if isinstance(change, str) else f"{change:.1e}")
        print(f"| {name} | {' | '.join(cells)} |", flush=True)
    print()
    for engine in engines:
        print(f"{engine}: {totals[engine]} of {len(names)} models pruned at {amount:.0%} of channels, ran with the "
              f"right output shape and trained one step; {real[engine]} lost at least 20% of their parameters"
              + (f"; {exact[engine]} exact on zeroed BatchNorm channels" if args.exact else ""))  # fmt: skip


if __name__ == "__main__":
    main()
