"""Benchmark the distributed block-sparse ring (sequence parallel) against one device.

Run with torchrun, one process per GPU (NCCL), or on CPUs (gloo)::

    torchrun --nproc-per-node 8 benchmarks/distributed.py --seq-len 131072 --heads 16 --head-dim 128 \\
        --block-size 128 --patterns local_window,dilated_sparse,global_local --shardings contiguous,zigzag \\
        --causal --backward --json results.json
    torchrun --nproc-per-node 2 benchmarks/distributed.py --device cpu --seq-len 4096 --heads 4 --head-dim 64 \\
        --block-size 64 --iters 3 --warmup 1

For every (pattern, sharding) it prints, per step (forward, or forward + backward with
``--backward``):

* ``t_1``: the time of the single-process op on the whole sequence on rank 0's device alone
  (skipped with ``--no-single``, e.g. when one device cannot hold the sequence);
* ``t_N``: the time of the ring on all ``N`` ranks (the slowest rank, median over iterations);
* TFLOP/s: block-level FLOPs (``4 B H D`` per computed token pair, every computed block counted
  whole; x3.5 with the backward) over ``t_N``, in total and per device;
* efficiency ``t_1 / (N t_N)``;
* bytes each rank received / sent per step (max over ranks) and what a full ring (every rank's
  whole K/V to every other rank, and dK/dV back in the backward) would move;
* work balance: max / mean of the computed block pairs per rank.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time
from typing import Any

import torch
import torch.distributed as dist

import dilated_sparse as ds
import dilated_sparse.patterns as pat
from dilated_sparse.distributed import (
    get_ring_plan,
    make_sharding,
    ring_block_sparse_attention,
    track_communication,
)
from dilated_sparse.distributed.plan import pair_status

_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32, "fp64": torch.float64}


def _parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seq-len", type=int, default=32768)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=None, help="k/v heads (GQA); default = heads")
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--patterns", default="local_window,dilated_sparse,global_local",
                   help="comma-separated pattern names (dilated_sparse.patterns)")
    p.add_argument("--window-size", type=int, default=2048, help="local window in tokens (local patterns)")
    p.add_argument("--global-tokens", type=int, default=256)
    p.add_argument("--sparsity-ratio", type=float, default=None,
                   help="target for the patterns that take one (e.g. dilated_sparse), as dilated_sparse.patterns "
                        "defines it")
    p.add_argument("--shardings", default="contiguous,zigzag", help="comma-separated: contiguous, zigzag, balanced")
    p.add_argument("--causal", action="store_true")
    p.add_argument("--backward", action="store_true", help="time forward + backward")
    p.add_argument("--keep-remote-kv", action="store_true")
    p.add_argument("--dtype", choices=sorted(_DTYPES), default=None, help="default bf16 on CUDA, fp32 on CPU")
    p.add_argument("--device", choices=("cuda", "cpu"), default=None)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--no-single", action="store_true", help="skip the single-device baseline")
    p.add_argument("--json", default=None, help="write the results (rank 0) to this file")
    p.add_argument("--plan-only", type=int, default=None, metavar="N",
                   help="no compute, no torchrun: print the bytes each of N ranks would move per step (from the "
                        "plans) vs a full ring, and the work balance, for every pattern and sharding")
    return p.parse_args()


def _setup(args: argparse.Namespace) -> tuple[int, int, torch.device]:
    device_type = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if "RANK" in os.environ and not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        if device_type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend)
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    device = torch.device("cuda", torch.cuda.current_device()) if device_type == "cuda" else torch.device("cpu")
    return rank, world, device


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reduce(value: float, op: Any, device: torch.device) -> float:
    if not dist.is_initialized():
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t, op=op)
    return float(t.item())


def _layout(name: str, args: argparse.Namespace) -> ds.BlockSparseLayout:
    options: dict[str, Any] = {}
    accepted = set(pat.pattern_options(name))
    if args.sparsity_ratio is not None and "sparsity_ratio" in accepted:
        options["sparsity_ratio"] = args.sparsity_ratio
    elif "window_size" in accepted:
        options["window_size"] = args.window_size
    if "global_tokens" in accepted:
        options["global_tokens"] = args.global_tokens
    return pat.make_layout(name, seq_len_q=args.seq_len, block_size=args.block_size, **options)


def _block_flops(layout: ds.BlockSparseLayout, args: argparse.Namespace, window: tuple[int, int]) -> float:
    """4 B H D x (computed blocks x block area), blocks the rules exclude wholly not counted."""
    rows = layout.row_ids().cpu()
    nqb = layout.num_query_blocks
    qb = rows % nqb
    kb = layout.col_indices.cpu().to(torch.int64)
    status = pair_status(qb, kb, layout.block_q, layout.block_k, layout.seq_len_q, layout.seq_len_k,
                         args.causal, window)
    live = int((status >= 0).sum())
    per_slice_heads = args.heads // layout.layout_heads
    per_slice_batch = args.batch // layout.layout_batch
    return 4.0 * per_slice_batch * per_slice_heads * args.head_dim * live * layout.block_q * layout.block_k


def _time(fn: Any, args: argparse.Namespace, device: torch.device, barrier: bool = True) -> float:
    """Median seconds of fn over args.iters runs after args.warmup; with `barrier`, every rank
    starts each run together."""
    for _ in range(args.warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(args.iters):
        if barrier:
            _barrier()
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _inputs(args: argparse.Namespace, seq: int, device: torch.device, dtype: torch.dtype,
            seed: int) -> list[torch.Tensor]:
    g = torch.Generator(device="cpu").manual_seed(seed)
    kv = args.kv_heads or args.heads
    shapes = [(args.batch, seq, args.heads, args.head_dim), (args.batch, seq, kv, args.head_dim),
              (args.batch, seq, kv, args.head_dim)]
    return [torch.randn(*s, generator=g).to(device=device, dtype=dtype).requires_grad_(args.backward)
            for s in shapes]


def _step(fn: Any, inputs: list[torch.Tensor], backward: bool) -> Any:
    def run() -> None:
        out = fn(*inputs)
        if backward:
            out.backward(torch.ones_like(out))
            for t in inputs:
                t.grad = None
    return run


def plan_only(args: argparse.Namespace) -> None:
    """Bytes moved per rank (max over ranks) vs a full ring, and work balance, from the plans alone."""
    world = args.plan_only
    dtype = _DTYPES[args.dtype or "bf16"]
    elem = torch.empty((), dtype=dtype).element_size()
    kv = args.kv_heads or args.heads
    window = (-1, -1)
    print(f"plans for {world} ranks  S {args.seq_len}  B {args.batch}  Hkv {kv}  D {args.head_dim}  "
          f"{str(dtype).split('.')[-1]}  block {args.block_size}  causal {args.causal}  (bytes per step, fwd+bwd)")
    print(f"{'pattern':<16}{'sharding':<12}{'density':>8}{'recv MB':>10}{'full ring MB':>14}{'moved %':>9}"
          f"{'balance':>9}")
    results = []
    for name in args.patterns.split(","):
        layout = _layout(name.strip(), args)
        for kind in args.shardings.split(","):
            sharding = make_sharding(kind.strip(), layout, world, causal=args.causal, window=window)
            recv, full, work = [], [], []
            for rank in range(world):
                plan = get_ring_plan(layout, sharding, rank, causal=args.causal, window=window)
                c = plan.communication(batch=args.batch, kv_heads=kv, head_dim=args.head_dim, element_size=elem,
                                       keep_remote_kv=args.keep_remote_kv)
                recv.append(c["forward_received"] + c["backward_received"])
                full.append(c["full_ring_forward_received"] + c["full_ring_backward_received"])
                work.append(sum(f.pairs for f in plan.frames.values()))
            mean_work = sum(work) / world
            row = {"pattern": name, "sharding": kind, "world": world, "density": layout.density,
                   "recv_bytes_max": max(recv), "full_ring_bytes": max(full),
                   "moved_fraction": max(recv) / max(full) if max(full) else 0.0,
                   "balance": max(work) / mean_work if mean_work else 1.0}
            results.append(row)
            print(f"{name:<16}{kind:<12}{layout.density:>8.3f}{max(recv) / 2**20:>10.2f}{max(full) / 2**20:>14.2f}"
                  f"{100 * row['moved_fraction']:>8.1f}%{row['balance']:>9.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=2)


def main() -> None:
    args = _parse()
    if args.plan_only:
        plan_only(args)
        return
    rank, world, device = _setup(args)
    dtype = _DTYPES[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    window = (-1, -1)
    results = []
    if rank == 0:
        print(f"world {world}  device {device.type}  dtype {str(dtype).split('.')[-1]}  S {args.seq_len}  "
              f"B {args.batch}  H {args.heads}  D {args.head_dim}  block {args.block_size}  causal {args.causal}  "
              f"{'fwd+bwd' if args.backward else 'fwd'}")
        print(f"{'pattern':<16}{'sharding':<12}{'density':>8}{'t_1 ms':>10}{'t_N ms':>10}{'TFLOP/s':>9}"
              f"{'/dev':>8}{'eff':>7}{'recv MB':>10}{'sent MB':>10}{'ring MB':>10}{'moved %':>9}{'balance':>9}")
    for name in args.patterns.split(","):
        layout = _layout(name.strip(), args)
        flops = _block_flops(layout, args, window) * (3.5 if args.backward else 1.0)
        t_single = math.nan
        if not args.no_single:
            if rank == 0:
                full = _inputs(args, args.seq_len, device, dtype, seed=0)
                t_single = _time_alone(full, layout, args, device)
                del full
            _barrier()
            t_single = _reduce(t_single if rank == 0 else 0.0, dist.ReduceOp.SUM if dist.is_initialized() else None,
                               device)
        for kind in args.shardings.split(","):
            sharding = make_sharding(kind.strip(), layout, world, causal=args.causal, window=window)
            local = _inputs(args, sharding.local_length(rank), device, dtype, seed=1 + rank)

            def ring(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sharding: Any = sharding,
                     layout: ds.BlockSparseLayout = layout) -> torch.Tensor:
                return ring_block_sparse_attention(q, k, v, layout, causal=args.causal, sharding=sharding,
                                                   keep_remote_kv=args.keep_remote_kv)

            t_local = _time(_step(ring, local, args.backward), args, device)
            t_ring = _reduce(t_local, dist.ReduceOp.MAX if dist.is_initialized() else None, device)
            with track_communication() as log:
                _step(ring, local, args.backward)()
            _sync(device)
            plan = get_ring_plan(layout, sharding, rank, causal=args.causal, window=window, device=device)
            elem = torch.empty((), dtype=dtype).element_size()
            full = plan.communication(batch=args.batch, kv_heads=args.kv_heads or args.heads,
                                      head_dim=args.head_dim, element_size=elem)
            recv = log.forward_received + log.backward_received
            sent = log.forward_sent + log.backward_sent
            full_recv = full["full_ring_forward_received"] + (full["full_ring_backward_received"]
                                                              if args.backward else 0)
            work = float(sum(f.pairs for f in plan.frames.values()))
            max_work = _reduce(work, dist.ReduceOp.MAX if dist.is_initialized() else None, device)
            mean_work = _reduce(work, dist.ReduceOp.SUM if dist.is_initialized() else None, device) / world
            max_recv = _reduce(float(recv), dist.ReduceOp.MAX if dist.is_initialized() else None, device)
            max_sent = _reduce(float(sent), dist.ReduceOp.MAX if dist.is_initialized() else None, device)
            max_full = _reduce(float(full_recv), dist.ReduceOp.MAX if dist.is_initialized() else None, device)
            row = {
                "pattern": name, "sharding": kind, "world": world, "density": layout.density,
                "t_1_s": t_single, "t_N_s": t_ring, "tflops": flops / t_ring / 1e12,
                "tflops_per_device": flops / t_ring / 1e12 / world,
                "efficiency": t_single / (world * t_ring) if not math.isnan(t_single) else math.nan,
                "recv_bytes_max": max_recv, "sent_bytes_max": max_sent, "full_ring_bytes": max_full,
                "moved_fraction": max_recv / max_full if max_full else 0.0,
                "balance": max_work / mean_work if mean_work else 1.0,
            }
            results.append(row)
            if rank == 0:
                print(f"{name:<16}{kind:<12}{row['density']:>8.3f}{t_single * 1e3:>10.2f}{t_ring * 1e3:>10.2f}"
                      f"{row['tflops']:>9.2f}{row['tflops_per_device']:>8.2f}{row['efficiency']:>7.2f}"
                      f"{max_recv / 2**20:>10.2f}{max_sent / 2**20:>10.2f}{max_full / 2**20:>10.2f}"
                      f"{100 * row['moved_fraction']:>8.1f}%{row['balance']:>9.2f}")
            del local
    if rank == 0 and args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=2)
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def _time_alone(full: list[torch.Tensor], layout: ds.BlockSparseLayout, args: argparse.Namespace,
                device: torch.device) -> float:
    """Time the single-process op on rank 0 while the other ranks wait (no barriers inside)."""
    run = _step(lambda q, k, v: ds.block_sparse_attention(q, k, v, layout, causal=args.causal), full, args.backward)
    return _time(run, args, device, barrier=False)


if __name__ == "__main__":
    main()
