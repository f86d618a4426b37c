"""TFLOP/s of several benchmark points in alternation, call by call, each against the first point.

The issue's two ratio targets compare points that the matrix times seconds apart in one process:
block 64 against block 128 (>= 85% of its TFLOP/s) and local 2.5% against local 10% (>= 85% kept).
The H200's clock moves with power and temperature by more than those margins between two
``do_bench`` medians (RESULTS.md, forty-second session: block 64's fwd+bwd at 1770 MHz, block 128's
at 1980), so this times one call of every point a round (``gpu_bench.time_rounds``: CUDA events, the
order reversed every other round, the L2 flushed before each call) and reports, per point, its
median TFLOP/s and the median over rounds of its TFLOP/s divided by the first point's in the same
round. TFLOP/s count active blocks only, as ``benchmarks/gpu_bench.py`` does (forward
``4 * nnz * bq * bk * D * B * H``, forward+backward 3.5x that).

    python csrc/cuda/tools/ab_points.py --rounds 300 \\
        --points 1x16x16384x128:local:0.1,1x16x16384x128:local:0.1:64,1x16x16384x128:local:0.025

Points are ``BxHxSxD:pattern:density[:block]`` (``bench_point.py``; block 128 unless named, bf16).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_point import parse_point, point_calls, split_block
from gpu_bench import forward_flops, l2_flush_buffer, paired_ratios, pattern, time_rounds


def point_flops(point: str) -> float:
    """The forward's flops on `point`'s active blocks (``4 * nnz * block^2 * D * B * H``)."""
    point, block = split_block(point, 128)
    B, H, S, D, kind, density = parse_point(point)
    return forward_flops(int(pattern(S // block, kind, density).sum()), block, B, H, D)


def ratio_cells(times: list[list[float]], flops: list[float]) -> list[list[str]]:
    """Per point (`times`: microseconds a round, ``time_rounds``; `flops`: a call's): its median
    TFLOP/s and the median of its per-round ratio to the first point's (``paired_ratios``; the
    first point: its median alone)."""
    tflops = [statistics.median(f / us / 1e6 for us in t) for f, t in zip(flops, times)]
    ratios = [""] + [f"{r:.3f}" for r in paired_ratios(times, flops)]
    return [[f"{tf:.0f}", r] for tf, r in zip(tflops, ratios)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--points", required=True, help="comma-separated BxHxSxD:pattern:density[:block]; the first is the base")
    ap.add_argument("--rounds", type=int, default=200)
    ap.add_argument("--fwd-only", action="store_true", help="time the forward alone")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("needs a CUDA device", file=sys.stderr)
        return 2
    points = args.points.split(",")
    flops = [point_flops(p) for p in points]
    calls = [point_calls(p) for p in points]
    flush = l2_flush_buffer()
    columns = {}
    for what, index, scale in (("fwd", 0, 1.0), ("f+b", 1, 3.5))[: 1 if args.fwd_only else 2]:
        times = time_rounds([c[index] for c in calls], args.rounds, flush)
        columns[what] = ratio_cells(times, [scale * f for f in flops])
    header = ["point"] + [f"{what} {cell}" for what in columns for cell in ("TF", "/ first")]
    print(f"median over {args.rounds} rounds, one call of each point a round (L2 flushed)")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for i, point in enumerate(points):
        print("| " + " | ".join([point] + [c for what in columns for c in columns[what][i]]) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
