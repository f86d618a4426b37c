"""Time, SM clock, power and energy a call of our kernels (and FlexAttention's), each call looped
back to back under ``nvidia-smi``: the power-capped steady state of a training loop.

The matrix's ``do_bench`` timings are 100 ms windows, each after other work, with the H200's power
controller reacting within them. Looped for seconds, both implementations sit at the 700 W cap,
and what separates them is the clock each keeps there, that is the energy each spends a call
(RESULTS.md, twenty-fourth session). A change that removes instructions or bytes may show more in
the energy a call than in a short timing.

    python csrc/cuda/tools/energy.py --points 1x16x16384x128:causal_local:0.05 --flex [--seconds 3]

Points are ``BxHxSxD:pattern:density[:block]`` (``bench_point.py``; block 128 unless named, bf16). Each point times
ours, then Flex (``--flex``), then ours again, forward and forward+backward. The first
``--settle`` seconds of each loop are left out of its clock and power (the controller's first
reaction).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_point import flex_point_calls, point_calls
from gpu_bench import GpuMonitor


def loop(fn: Callable[[], object], seconds: float, settle: float, monitor: GpuMonitor) -> tuple[float, dict]:
    """Microseconds a call of `fn` run back to back for `seconds`, and the monitor's window after
    the first `settle` seconds."""
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    t0, calls = time.monotonic(), 0
    while time.monotonic() - t0 < seconds:
        for _ in range(20):
            fn()
        torch.cuda.synchronize()
        calls += 20
    t1 = time.monotonic()
    return (t1 - t0) / calls * 1e6, monitor.window(t0 + settle, t1)


def row(point: str, impl: str, what: str, us: float, window: dict) -> str:
    """A markdown row: time, median (min) SM clock, median power and energy a call (median power x
    time a call) of one loop; '-' where the monitor had no samples."""
    if not window:
        return f"| {point} | {impl} | {what} | {us:.0f} | - | - | - |"
    mj = window["power_w"] * us / 1e3
    return (f"| {point} | {impl} | {what} | {us:.0f} | {window['sm_mhz']:.0f} ({window['sm_mhz_min']:.0f}) | "
            f"{window['power_w']:.0f} | {mj:.0f} |")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--points", required=True, help="comma-separated BxHxSxD:pattern:density")
    ap.add_argument("--flex", action="store_true", help="also loop FlexAttention on the same block mask")
    ap.add_argument("--seconds", type=float, default=3.0, help="length of each loop")
    ap.add_argument("--settle", type=float, default=0.5, help="seconds left out at each loop's start")
    args = ap.parse_args()
    monitor = GpuMonitor(period_ms=20)
    print("| point | impl | what | us a call | SM MHz (min) | W | mJ a call |")
    print("|---|---|---|---|---|---|---|")
    try:
        for point in args.points.split(","):
            impls = [("ours", point_calls(point))]
            if args.flex:
                impls += [("flex", flex_point_calls(point)), impls[0]]
            for impl, calls in impls:
                for what, fn in zip(("fwd", "fwd+bwd"), calls):
                    us, window = loop(fn, args.seconds, args.settle, monitor)
                    print(row(point, impl, what, us, window), flush=True)
    finally:
        monitor.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
