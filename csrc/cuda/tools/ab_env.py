"""A/B of an environment switch of the CUDA kernels, call by call, in one process.

The kernels read their ``DILATED_SPARSE_*`` switches at every call, so the modes can alternate from
one call to the next: each round times one call of every mode (CUDA events; the order reversed every
other round; L2 flushed before each call, as ``triton.testing.do_bench`` does, unless ``--warm-l2``), and the result is the
median over rounds of each mode's time divided by mode 0's time in the same round. The H200's clock
drifts with power and temperature by more than the changes this measures (RESULTS.md, twenty-third
session: the same forward 4-6% apart between two ``do_bench`` medians of one process), and two calls
a few hundred microseconds apart share that drift, where two medians taken seconds apart do not.
Meant for switches that keep the kernel: with modes that pick different kernels (the
``*_VARIANT`` switches) the ratios split by the calls' order within a round (RESULTS.md, same
session). A change without a switch is timed against the other build by ``ab_builds.py``.

    python csrc/cuda/tools/ab_env.py --var DILATED_SPARSE_POST_LOOKUP --modes 0,1 \\
        --points 1x16x16384x128:causal_local:0.05,1x32x16384x64:local:0.025 --rounds 300

Points are ``BxHxSxD:pattern:density[:block]`` (``bench_point.py``; block 128 unless named, bf16).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_point import point_calls
from gpu_bench import l2_flush_buffer, time_rounds


def time_modes(call: Callable[[], object], var: str, modes: list[str], rounds: int,
               flush: torch.Tensor | None) -> list[list[float]]:
    """Microseconds of `call` under each value of `var` (by position in `modes`, which may repeat
    a value: a null A/B), as ``time_rounds`` alternates calls; `var` is restored afterwards."""
    before = os.environ.get(var)

    def set_mode(i: int) -> None:
        os.environ[var] = modes[i]

    try:
        return time_rounds([call] * len(modes), rounds, flush, set_mode)
    finally:
        if before is None:
            os.environ.pop(var, None)
        else:
            os.environ[var] = before


def summarise(times: list[list[float]]) -> list[str]:
    """Cells: mode 0's median time, then each other mode's median paired ratio and the share of
    rounds in which it was the faster one."""
    base = times[0]
    cells = [f"{statistics.median(base):.1f}"]
    for t in times[1:]:
        ratios = [a / b for a, b in zip(t, base)]
        faster = sum(r < 1.0 for r in ratios) / len(ratios)
        cells.append(f"{statistics.median(ratios):.3f} ({faster:.0%})")
    return cells


def measure_point(point: str, var: str, modes: list[str], rounds: int, fwd_only: bool,
                  flush: torch.Tensor | None) -> list[str]:
    """The table cells of one point."""
    fwd, fwd_bwd = point_calls(point)
    cells = summarise(time_modes(fwd, var, modes, rounds, flush))
    if not fwd_only:
        cells += summarise(time_modes(fwd_bwd, var, modes, rounds, flush))
    return cells


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--var", required=True, help="the environment variable")
    ap.add_argument("--modes", default="0,1", help="its values, the first one the baseline")
    ap.add_argument("--points", required=True, help="comma-separated BxHxSxD:pattern:density")
    ap.add_argument("--rounds", type=int, default=200)
    ap.add_argument("--fwd-only", action="store_true", help="time the forward alone")
    ap.add_argument("--warm-l2", action="store_true",
                    help="no L2 flush before a call (what the previous call left stays, as in a model)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("needs a CUDA device", file=sys.stderr)
        return 2
    modes = args.modes.split(",")
    flush = None if args.warm_l2 else l2_flush_buffer()
    header = ["point", f"fwd {modes[0]} (us)"] + [f"fwd {m} / {modes[0]} (faster)" for m in modes[1:]]
    if not args.fwd_only:
        header += [f"f+b {modes[0]} (us)"] + [f"f+b {m} / {modes[0]} (faster)" for m in modes[1:]]
    rows = []
    for point in args.points.split(","):
        cells = measure_point(point, args.var, modes, args.rounds, args.fwd_only, flush)
        rows.append([point] + cells)
        print(" | ".join(rows[-1]), flush=True)
    print(f"\n{args.var}: median over {args.rounds} rounds of each mode's time / mode {modes[0]}'s in the "
          "same round (share of rounds where the mode was faster)" + (", L2 not flushed" if args.warm_l2 else ""))
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in rows:
        print("| " + " | ".join(r) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
