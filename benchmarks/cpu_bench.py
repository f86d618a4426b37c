"""CPU timing of the block-sparse op against dense attention, written to a JSON file.

    python benchmarks/cpu_bench.py                          # the issue's case + a few sizes
    python benchmarks/cpu_bench.py --seq 1024 4096 --threads 2 --out benchmarks/results_cpu.json

Each case: fp32, q/k/v [B, S, H, D], a local (banded) block layout of about ``--density`` of the
blocks (block 64 by default), and for comparison ``F.scaled_dot_product_attention`` on the dense
problem (the math path on CPU) plus, for S <= 2048, the dense masked reference
(``ds.reference_attention``), which is what an S x S mask costs. Forward and forward+backward,
best of ``--repeats`` runs after a warm-up. The issue's target case is B1 H8 D64 S4096 block 64
~10% dense: forward >= 3x and forward+backward >= 2x faster than SDPA.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

import dilated_sparse as ds
from dilated_sparse._extension import extension_info


def band_layout(seq_len: int, block: int, density: float) -> ds.BlockSparseLayout:
    """Local pattern: every query block sees the key blocks within +-w of it, w chosen so that
    the fraction of active blocks is closest to ``density``."""
    nb = -(-seq_len // block)
    idx = torch.arange(nb)
    best = None
    for w in range(nb):
        mask = (idx[:, None] - idx[None, :]).abs() <= w
        d = mask.float().mean().item()
        if best is None or abs(d - density) < abs(best[1] - density):
            best = (mask, d)
        if d >= density:
            break
    return ds.BlockSparseLayout.from_dense_mask(best[0], block_size=block, seq_len_q=seq_len)


def timeit(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)  # best of the repeats: the least disturbed by other processes


def bench_case(batch: int, seq: int, heads: int, dim: int, block: int, density: float, repeats: int,
               with_reference: bool) -> dict:
    torch.manual_seed(0)
    layout = band_layout(seq, block, density)
    q, k, v = (torch.randn(batch, seq, heads, dim, requires_grad=True) for _ in range(3))
    qt, kt, vt = (t.detach().transpose(1, 2).requires_grad_() for t in (q, k, v))
    grad = torch.randn(batch, seq, heads, dim)

    def ours_fwd():
        with torch.no_grad():
            return ds.block_sparse_attention(q, k, v, layout)

    def ours_fwd_bwd():
        out = ds.block_sparse_attention(q, k, v, layout)
        return torch.autograd.grad(out, (q, k, v), grad)

    def sdpa_fwd():
        with torch.no_grad():
            return F.scaled_dot_product_attention(qt, kt, vt)

    def sdpa_fwd_bwd():
        out = F.scaled_dot_product_attention(qt, kt, vt)
        return torch.autograd.grad(out, (qt, kt, vt), grad.transpose(1, 2))

    row = {
        "batch": batch, "seq_len": seq, "heads": heads, "head_dim": dim, "block": block,
        "density": layout.density, "nnz_blocks": layout.nnz,
        "ours_fwd_s": timeit(ours_fwd, repeats), "ours_fwd_bwd_s": timeit(ours_fwd_bwd, repeats),
        "sdpa_fwd_s": timeit(sdpa_fwd, repeats), "sdpa_fwd_bwd_s": timeit(sdpa_fwd_bwd, repeats),
    }
    row["speedup_fwd_vs_sdpa"] = row["sdpa_fwd_s"] / row["ours_fwd_s"]
    row["speedup_fwd_bwd_vs_sdpa"] = row["sdpa_fwd_bwd_s"] / row["ours_fwd_bwd_s"]
    if with_reference:
        def ref_fwd():
            with torch.no_grad():
                return ds.reference_attention(q, k, v, layout)

        row["dense_reference_fwd_s"] = timeit(ref_fwd, max(1, repeats // 2))
        row["speedup_fwd_vs_dense_reference"] = row["dense_reference_fwd_s"] / row["ours_fwd_s"]
    with torch.no_grad():  # the numbers are only worth something if the op is right
        ref = ds.blocked_reference_attention(q, k, v, layout)
        row["max_abs_err_vs_blocked_reference"] = (ds.block_sparse_attention(q, k, v, layout) - ref).abs().max().item()
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, nargs="+", default=[1024, 2048, 4096])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--block", type=int, default=64)
    parser.add_argument("--density", type=float, default=0.1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results_cpu.json")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    rows = []
    print(f"{'S':>6} {'density':>8} {'ours fwd':>10} {'sdpa fwd':>10} {'x':>6} {'ours f+b':>10} {'sdpa f+b':>10} {'x':>6}")
    for seq in args.seq:
        row = bench_case(args.batch, seq, args.heads, args.head_dim, args.block, args.density, args.repeats,
                         with_reference=seq <= 2048)
        rows.append(row)
        print(f"{seq:>6} {row['density']:>8.3f} {row['ours_fwd_s'] * 1e3:>8.1f}ms {row['sdpa_fwd_s'] * 1e3:>8.1f}ms "
              f"{row['speedup_fwd_vs_sdpa']:>6.2f} {row['ours_fwd_bwd_s'] * 1e3:>8.1f}ms "
              f"{row['sdpa_fwd_bwd_s'] * 1e3:>8.1f}ms {row['speedup_fwd_bwd_vs_sdpa']:>6.2f}")
    info = extension_info()
    result = {
        "command": "python benchmarks/cpu_bench.py " + " ".join(argv if argv is not None else __import__("sys").argv[1:]),
        "dtype": "float32",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_isa": info["cpu_isa"],
        "extension_mode": info["mode"],
        "cases": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
