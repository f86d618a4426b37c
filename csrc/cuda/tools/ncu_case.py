"""One forward + backward of the ops at one benchmark point, for Nsight Compute (device-run helper).

    ncu --target-processes all -k regex:"sm90_kernel|delta_kernel" -c 8 \\
        --metrics sm__pipe_tensor_cycles_active.avg.pct_of_peak_sustained_elapsed,... \\
        python3 csrc/cuda/tools/ncu_case.py --config 1x16x16384x128 --pattern local:0.10

Runs the pair twice (the second is warm); bf16, block 128 unless --block says otherwise.
"""

import argparse
import math
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "..", "benchmarks"))
from gpu_bench import csr, pattern

import dilated_sparse  # noqa: F401  (registers the ops)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="1x16x16384x128", help="BxHxSxD")
    ap.add_argument("--pattern", default="local:0.10", help="kind:density (gpu_bench patterns)")
    ap.add_argument("--block", type=int, default=128)
    args = ap.parse_args()
    B, H, S, D = (int(x) for x in args.config.split("x"))
    kind, dens = args.pattern.split(":")
    ops = torch.ops.dilated_sparse
    q, k, v, do = (torch.randn(B, S, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(4))
    crow, col, ccol, row = csr(pattern(S // args.block, kind, float(dens)), "cuda")
    a = (crow, col, args.block, args.block, 1, 1, 1 / math.sqrt(D), False, -1, -1, None, None)
    for _ in range(2):
        out, lse = ops.block_sparse_attn_fwd(q, k, v, *a)
        ops.block_sparse_attn_bwd(do, q, k, v, out, lse, ccol, row, *a)
    torch.cuda.synchronize()
    return 0


if __name__ == "__main__":
    sys.exit(main())
