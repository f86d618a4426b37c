"""Time every compiled tile variant of the CUDA kernels (device-run helper, not part of the package).

For each config and block size: the forward alone per forward variant, and the backward op alone
(Delta + dQ + dK/dV) per (dQ variant, dK/dV variant). Medians of triton's do_bench. Prints one line
per measurement and writes tune.json to --out.
"""

import argparse
import functools
import itertools
import json
import math
import os
import sys

import torch
from triton.testing import do_bench

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "..", "benchmarks"))
from gpu_bench import csr, pattern

try:
    import dilated_sparse  # noqa: F401
except Exception:  # noqa: BLE001
    torch.ops.load_library(os.environ["DILATED_SPARSE_TEST_LIB"])

ops = torch.ops.dilated_sparse


def profile_kernels(fn, label: str, iters: int = 5) -> None:
    """Per-kernel CUDA time (mean over iters) of fn, via torch.profiler."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    for e in prof.key_averages():
        if e.device_type.name == "CUDA" and e.count >= iters:
            us = getattr(e, "device_time", None) or getattr(e, "cuda_time", 0.0)
            print(f"PROFILE {label} | {e.key[:90]} | {us:.1f} us x {e.count // iters}", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--configs", default="1x16x16384x128,1x32x16384x64")
    ap.add_argument("--blocks", default="128,64")
    ap.add_argument("--densities", default="0.10", help="local-pattern densities to time")
    ap.add_argument("--patterns", default="", help="kind:density list (gpu_bench patterns); replaces --densities")
    ap.add_argument("--fwd", default="0,1,2,3,4,5,6,7", help="forward variants to time")
    ap.add_argument("--dq", default="0,4", help="dQ variants (bwd is timed for every dq x dkv pair)")
    ap.add_argument("--dkv", default="0,4", help="dK/dV variants")
    ap.add_argument("--profile", action="store_true",
                    help="also print per-kernel CUDA times of one default fwd + bwd (torch.profiler)")
    args = ap.parse_args()
    fwd_vs, dq_vs, dkv_vs = ([int(x) for x in a.split(",")] for a in (args.fwd, args.dq, args.dkv))
    res = []
    for cfg in args.configs.split(","):
        B, H, S, D = (int(x) for x in cfg.split("x"))
        q, k, v, do = (torch.randn(B, S, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(4))
        scale = 1 / math.sqrt(D)
        kinds = ([(k.split(":")[0], float(k.split(":")[1])) for k in args.patterns.split(",")] if args.patterns
                 else [("local", float(d)) for d in args.densities.split(",")])
        for bs, (kind, dens) in itertools.product((int(b) for b in args.blocks.split(",")), kinds):
            mask = pattern(S // bs, kind, dens)
            nnz = int(mask.sum())
            crow, col, ccol, row = csr(mask, "cuda")
            fl = 4 * B * H * nnz * bs * bs * D
            a = (crow, col, bs, bs, 1, 1, scale, False, -1, -1, None, None)
            for fv in fwd_vs:
                os.environ["DILATED_SPARSE_FWD_VARIANT"] = str(fv)
                ms = do_bench(functools.partial(ops.block_sparse_attn_fwd, q, k, v, *a), warmup=10, rep=60, return_mode="median")
                r = {"cfg": cfg, "block": bs, "pattern": kind, "density": dens, "op": "fwd", "variant": fv, "ms": ms, "tflops": fl / ms / 1e9}
                res.append(r)
                print(json.dumps(r), flush=True)
            os.environ.pop("DILATED_SPARSE_FWD_VARIANT")
            out, lse = ops.block_sparse_attn_fwd(q, k, v, *a)
            for qv, kv in itertools.product(dq_vs, dkv_vs):
                os.environ["DILATED_SPARSE_DQ_VARIANT"] = str(qv)
                os.environ["DILATED_SPARSE_DKV_VARIANT"] = str(kv)
                fn = functools.partial(ops.block_sparse_attn_bwd, do, q, k, v, out, lse, ccol, row, *a)
                ms = do_bench(fn, warmup=10, rep=60, return_mode="median")
                r = {"cfg": cfg, "block": bs, "pattern": kind, "density": dens, "op": "bwd", "variant": f"dq{qv}/dkv{kv}", "ms": ms, "tflops": 2.5 * fl / ms / 1e9}
                res.append(r)
                print(json.dumps(r), flush=True)
            os.environ.pop("DILATED_SPARSE_DQ_VARIANT")
            os.environ.pop("DILATED_SPARSE_DKV_VARIANT")
            if args.profile:
                def fwd_bwd(q=q, k=k, v=v, do=do, out=out, lse=lse, ccol=ccol, row=row, a=a):
                    ops.block_sparse_attn_fwd(q, k, v, *a)
                    ops.block_sparse_attn_bwd(do, q, k, v, out, lse, ccol, row, *a)

                profile_kernels(fwd_bwd, f"{cfg} block {bs} {kind} {dens}")
    with open(os.path.join(args.out, "tune.json"), "w") as fh:
        json.dump(res, fh, indent=1)
    best = {}
    for r in res:
        key = (r["cfg"], r["block"], r["pattern"], r["density"], r["op"])
        if key not in best or r["ms"] < best[key]["ms"]:
            best[key] = r
    for key, r in best.items():
        print("BEST", key, r["variant"], f"{r['ms']:.3f} ms {r['tflops']:.0f} TF")
    return 0


if __name__ == "__main__":
    sys.exit(main())
