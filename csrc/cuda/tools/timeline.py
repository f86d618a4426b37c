"""GPU timeline of one forward (+backward) call of ours, as gpu_bench.py times it (L2 flushed first).

Prints, for each pattern, the kernels of the median iteration (stream, start offset, duration, idle
gap before it), the wall time from the first kernel's start to the last one's end, the sum of the
kernel times, the host time to issue the call, and the do_bench-style event timing. It tells where
a call's time goes that per-kernel times miss: launch gaps, small kernels, stream overlap.

    python3 csrc/cuda/tools/timeline.py --shape 1x16x16384x128 --patterns causal_local:0.05,local:0.025
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def kernel_rows(trace_path: str) -> list[dict]:
    with open(trace_path) as f:
        events = json.load(f)["traceEvents"]
    ks = [e for e in events if e.get("cat") == "kernel"]
    return sorted(ks, key=lambda e: e["ts"])


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="1x16x16384x128", help="BxHxSxD")
    ap.add_argument("--patterns", default="causal_local:0.05")
    ap.add_argument("--block", type=int, default=128)
    ap.add_argument("--fwd-only", action="store_true")
    ap.add_argument("--iters", type=int, default=7)
    args = ap.parse_args()
    from bench_point import point_calls
    from gpu_bench import l2_flush_buffer

    flush = l2_flush_buffer()
    for spec in args.patterns.split(","):
        kind, dens = spec.split(":")
        fwd, fwd_bwd = point_calls(f"{args.shape}:{spec}", args.block)
        call = fwd if args.fwd_only else fwd_bwd  # fwd_bwd clears the gradients first

        for _ in range(5):
            flush.zero_()
            call()
        torch.cuda.synchronize()
        ev_ms, host_ms = [], []
        for _ in range(20):
            flush.zero_()
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            t0 = time.perf_counter()
            call()
            host_ms.append((time.perf_counter() - t0) * 1e3)
            e.record()
            torch.cuda.synchronize()
            ev_ms.append(s.elapsed_time(e))
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(args.iters):
                flush.zero_()
                call()
            torch.cuda.synchronize()
        path = os.path.join(tempfile.mkdtemp(), "trace.json")
        prof.export_chrome_trace(path)
        ks = kernel_rows(path)
        # Iterations: the kernels after each flush (the 256 MiB fill, the longest fill).
        fill_dur = max(kk["dur"] for kk in ks if "fill" in kk["name"].lower())
        iters: list[list[dict]] = []
        for kk in ks:
            if "fill" in kk["name"].lower() and kk["dur"] > 0.5 * fill_dur:
                iters.append([])
            elif iters:
                iters[-1].append(kk)
        spans = [(it[-1]["ts"] + it[-1]["dur"] - it[0]["ts"], it) for it in iters if it]
        spans.sort(key=lambda x: x[0])
        span, it = spans[len(spans) // 2]
        print(f"\n== {args.shape} {kind} {dens} {'fwd' if args.fwd_only else 'fwd+bwd'}: event median "
              f"{statistics.median(ev_ms) * 1e3:.1f} us, host issue median {statistics.median(host_ms) * 1e3:.1f} us, "
              f"kernel span {span:.1f} us (min {spans[0][0]:.1f}, max {spans[-1][0]:.1f}), "
              f"kernel sum {sum(kk['dur'] for kk in it):.1f} us")
        t0 = it[0]["ts"]
        end = t0
        for kk in it:
            gap = kk["ts"] - end
            name = kk["name"].split("(")[0].split("<")[0][-40:]
            print(f"  s{kk['args'].get('stream', '?'):<3} +{kk['ts'] - t0:8.1f} dur {kk['dur']:7.1f} "
                  f"gap {gap:7.1f}  {name}")
            end = max(end, kk["ts"] + kk["dur"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
