"""Prune any torchvision classification model in one call, without Lightning.

Shows: ``lightning_prune.prune(model, example_input, amount, importance, target=...)`` on a torchvision model
(``weights=None``: random weights, nothing is downloaded), leaving a smaller dense model of the same class;
prints the parameters and MACs before and after and checks that the output shape did not change.

    python examples/prune_torchvision.py                                   # resnet18, 50% of its channels by L1
    python examples/prune_torchvision.py --arch mobilenet_v3_small --amount 0.5 --target macs
    python examples/prune_torchvision.py --size 64                         # smaller images: seconds
"""

from __future__ import annotations

import argparse

import torch
import torchvision

import lightning_prune as lp


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="resnet18", help="a name of torchvision.models.list_models() (resnet18)")
    parser.add_argument("--amount", type=float, default=0.5, help="fraction removed (0.5)")
    parser.add_argument("--importance", default="l1", help="l1, l2, bn_scale, fpgm or random (l1)")
    parser.add_argument("--target", default="channels", help="what --amount is a fraction of: channels, macs, params")
    parser.add_argument("--size", type=int, default=224, help="height and width of the example images (224)")
    args = parser.parse_args(argv)

    model = torchvision.models.get_model(args.arch, weights=None).eval()
    example = torch.randn(2, 3, args.size, args.size)  # a batch of two: BatchNorm needs it in training mode
    with torch.no_grad():
        shape = model(example).shape
    params, macs = lp.count_params(model), lp.count_macs(model, example)

    result = lp.prune(model, example, args.amount, args.importance, target=args.target)

    with torch.no_grad():
        pruned_shape = model.eval()(example).shape
    if pruned_shape != shape:
        raise SystemExit(f"output shape changed: {tuple(shape)} -> {tuple(pruned_shape)}")
    print(f"{args.arch}: {len(result.layers)} layers narrowed")
    print(f"params before: {params:,}")
    print(f"params after: {lp.count_params(model):,}")
    print(f"MACs before: {macs:,}")
    print(f"MACs after: {lp.count_macs(model, example):,}")
    print(f"output shape: {tuple(pruned_shape)} (unchanged)")


if __name__ == "__main__":
    main()
