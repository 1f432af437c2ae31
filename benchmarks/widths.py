"""How a layer's latency depends on its width on this CPU (or a GPU with --device cuda), and the round_to it asks.

Times a 3x3 convolution (NCHW and channels_last) and a linear layer at every width in a range and prints one
row per width; then, for multiples of 8, 16 and 32, how much of its channel share an in-between width saves,
and the ``round_to`` that ``lightning_prune.widths.choose_round_to`` reads from each column
(``round_to="auto"`` uses the column of the kind holding most of a model's weights, in its layout).

    OMP_NUM_THREADS=1 python benchmarks/widths.py --threads 1
"""

from __future__ import annotations

import argparse

import torch

from lightning_prune.widths import choose_round_to, kind_key, savings, sweep


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--size", type=int, default=14, help="feature map height and width")
    parser.add_argument("--first", type=int, default=33)
    parser.add_argument("--last", type=int, default=128)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    timings = sweep(range(args.first, args.last + 1), batch=args.batch, size=args.size, device=args.device)
    columns: dict[str, dict[int, float]] = {}
    for t in timings:
        columns.setdefault(kind_key(t), {})[t.width] = t.seconds
    names = list(columns)
    print(f"device {args.device}, {args.threads} thread(s), batch {args.batch}, {args.size}x{args.size}; microseconds")
    print("width  " + "  ".join(f"{name:>22}" for name in names))
    for width in range(args.first, args.last + 1):
        print(f"{width:>5}  " + "  ".join(f"{columns[name][width] * 1e6:>22.1f}" for name in names))
    for name in names:
        shares = []
        for multiple in (8, 16, 32):
            found = sorted(savings(columns[name], multiple))
            shares.append(f"x{multiple}: {found[len(found) // 2]:.2f}" if found else f"x{multiple}: -")
        print(f"{name}: median saving of in-between widths over their channel share {', '.join(shares)}; "
              f"round_to {choose_round_to(columns[name])}")  # fmt: skip


if __name__ == "__main__":
    main()
