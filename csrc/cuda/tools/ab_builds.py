"""A/B of two builds of the package (for example main's and a change's), in alternating processes.

A change that is not behind a run-time switch cannot be timed call by call (``ab_env.py``); and two
processes of the same build differ by up to ~3% at some points (RESULTS.md, twenty-third session),
so one process of each is not enough. This runs ``--processes`` processes of each build, in the
order base, new, new, base, base, new, ... (each build first in half of the pairs; base in one
more with an odd count), each timing every
point's forward (and, unless ``--fwd-only``, forward+backward) with ``triton.testing.do_bench``
medians as ``benchmarks/gpu_bench.py`` does, and prints, per point, each build's median over its
processes, the range, and new / base.

    python csrc/cuda/tools/ab_builds.py --base /tmp/main_tree --new . --processes 4 \\
        --points 1x16x16384x128:local:0.025,1x32x16384x64:causal_local:0.05

Each tree must hold a built package (``python setup.py build_ext --inplace`` there; a reduced
instantiation set, the same in both, builds faster) and its ``benchmarks/gpu_bench.py``. Points are
``BxHxSxD:pattern:density[:block]`` (block 128 unless named, bf16). ``--graph`` times CUDA graph
replays of the op calls instead (a captured call's plans and index checks).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path


def child(src: Path, points: list[str], fwd_only: bool, graph: bool = False) -> dict[str, list[float]]:
    """In a process whose sys.path starts at `src`: microseconds of each point (fwd[, fwd+bwd]); with
    `graph`, of CUDA graph replays of the op calls (``bench_point.graph_point_calls``)."""
    sys.path[:0] = [str(src / "benchmarks"), str(src)]
    import gpu_bench  # noqa: F401  (src's, before bench_point's import of it finds it loaded)
    from triton.testing import do_bench

    import dilated_sparse

    assert Path(dilated_sparse.__file__).resolve().is_relative_to(src.resolve()), dilated_sparse.__file__
    spec = importlib.util.spec_from_file_location("_bench_point", Path(__file__).with_name("bench_point.py"))
    bench_point = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_point)  # its calls run src's package: both modules are loaded already
    out = {}
    for point in points:
        fwd, fwd_bwd = (bench_point.graph_point_calls if graph else bench_point.point_calls)(point)
        out[point] = [do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e3
                      for fn in ([fwd] if fwd_only else [fwd, fwd_bwd])]
    return out


def order(processes: int) -> list[str]:
    """base, new, new, base, base, new, ...: `processes` of each, each build first in half the pairs."""
    pairs = [("base", "new") if i % 2 == 0 else ("new", "base") for i in range(processes)]
    return [b for pair in pairs for b in pair]


def summarise(runs: dict[str, list[dict[str, list[float]]]], points: list[str], fwd_only: bool) -> list[str]:
    """Markdown rows: per point and measure, each build's median over its processes (range), new / base."""
    rows = []
    for point in points:
        for i, what in enumerate(["fwd"] if fwd_only else ["fwd", "fwd+bwd"]):
            cells = [point, what]
            med = {}
            for build in ("base", "new"):
                xs = [r[point][i] for r in runs[build]]
                med[build] = statistics.median(xs)
                cells.append(f"{med[build]:.1f} ({min(xs):.1f}-{max(xs):.1f})")
            cells.append(f"{med['new'] / med['base']:.3f}")
            rows.append("| " + " | ".join(cells) + " |")
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", type=Path, help="the baseline tree (built)")
    ap.add_argument("--new", type=Path, help="the changed tree (built)")
    ap.add_argument("--points", required=True, help="comma-separated BxHxSxD:pattern:density")
    ap.add_argument("--processes", type=int, default=4, help="processes of each build")
    ap.add_argument("--fwd-only", action="store_true")
    ap.add_argument("--graph", action="store_true", help="time CUDA graph replays of the op calls")
    ap.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    points = args.points.split(",")
    if args.child is not None:
        print(json.dumps(child(args.child, points, args.fwd_only, args.graph)))
        return 0
    if args.base is None or args.new is None:
        ap.error("--base and --new are required")
    runs: dict[str, list[dict[str, list[float]]]] = {"base": [], "new": []}
    for build in order(args.processes):
        src = (args.base if build == "base" else args.new).resolve()
        cmd = [sys.executable, __file__, "--child", str(src), "--points", args.points]
        cmd += ["--fwd-only"] * args.fwd_only + ["--graph"] * args.graph
        env = dict(os.environ, PYTHONPATH=str(src))
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
        if r.returncode != 0:
            print(r.stderr[-3000:], file=sys.stderr)
            return r.returncode
        runs[build].append(json.loads(r.stdout.strip().splitlines()[-1]))
        print(build, json.dumps(runs[build][-1]), flush=True)
    print(f"\nmedians over {args.processes} processes of each build (us; range), base {args.base}, new {args.new}")
    print("| point | measure | base | new | new / base |")
    print("|---|---|---|---|---|")
    print("\n".join(summarise(runs, points, args.fwd_only)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
