"""GPU benchmark: dilated_sparse CUDA kernels vs FlexAttention (same block mask) vs dense SDPA.

One process, medians of ``triton.testing.do_bench``; TFLOP/s counted on the active blocks only
(forward ``4 * nnz * bq * bk * D * B * H``, forward+backward 3.5x that), as in
``../shared/bench/peer_baseline.py``. Writes ``gpu_bench.json`` and ``gpu_bench.md`` to ``$OUT``
(or ``--out``) and prints the table last.

    python benchmarks/gpu_bench.py                 # B1 H16 D128 bf16, S = 8k, 16k, 32k
    python benchmarks/gpu_bench.py --quick         # S=16384 only
    python benchmarks/gpu_bench.py --full          # + issue matrix (B1 H32 D64, S=65536)

Peers that are not installed on the machine (flashinfer, MIT block-sparse-attention, DeepSpeed
sparse attention) are listed as such in the output rather than silently left out.

Each timing carries the SM clock, power draw and throttle reasons that ``nvidia-smi`` sampled
while it ran (``gpu_fwd`` / ``gpu_fwdbwd`` in the JSON rows; the last column of the table): the
H200 runs the S=64k kernels at its power cap, and slow timings go with clock dips (RESULTS.md).
After each shape's rows, the issue's two ratio targets (block 64 against block 128, local 2.5%
against local 10%) are also timed in alternation, call by call (``time_paired``; ``--paired-rounds``):
the rows' medians of two points are taken seconds apart, at clocks that can differ by 10%.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import torch


def pattern(nb: int, kind: str, density: float) -> torch.Tensor:
    """Block layout [nb, nb] bool (same definitions as peer_baseline.py, plus global_local)."""
    i = torch.arange(nb)[:, None]
    j = torch.arange(nb)[None, :]
    if kind == "local":
        w = max(0, round(density * nb / 2 - 0.5))
        return (i - j).abs() <= w
    if kind == "dilated":
        r = max(2, round(1.0 / max(density - 3.0 / nb, 1e-3)))
        return ((i - j).abs() <= 1) | ((j % r) == (i % r))
    if kind == "causal_local":
        w = max(0, round(density * nb - 0.5))
        return (j <= i) & (i - j <= w)
    if kind == "global_local":  # one global block row and column plus a local band
        w = max(0, round((density - 2.0 / nb) * nb / 2 - 0.5))
        return ((i - j).abs() <= w) | (i == 0) | (j == 0)
    raise ValueError(kind)


def csr(mask: torch.Tensor, dev: str) -> tuple[torch.Tensor, ...]:
    flat = mask.reshape(-1, mask.shape[-1])
    crow = torch.zeros(flat.shape[0] + 1, dtype=torch.int64)
    crow[1:] = flat.sum(1).cumsum(0)
    col = torch.nonzero(flat)[:, 1]
    flat_t = mask.transpose(-1, -2).reshape(-1, mask.shape[-2])
    ccol = torch.zeros(flat_t.shape[0] + 1, dtype=torch.int64)
    ccol[1:] = flat_t.sum(1).cumsum(0)
    row = torch.nonzero(flat_t)[:, 1]
    return tuple(t.to(dev, torch.int32).contiguous() for t in (crow, col, ccol, row))


def flex_block_mask(layout: torch.Tensor, seq: int, block: int, device: str) -> Any:
    """FlexAttention's BlockMask of the block layout [nb, nb] (bool) over `seq` tokens, blocks of
    `block`: the same blocks our kernels see."""
    from torch.nn.attention.flex_attention import create_block_mask

    lay = layout.to(device)

    def mask_mod(b, h, qi, ki):
        return lay[qi // block, ki // block]

    return create_block_mask(mask_mod, None, None, seq, seq, device=device, BLOCK_SIZE=block)


class _Attn(torch.autograd.Function):
    """Thin autograd wrapper over the ops (what ds.block_sparse_attention runs, minus validation)."""

    @staticmethod
    def forward(ctx, q, k, v, lay, bq, bk, scale):  # type: ignore[override]
        crow, col, _, _ = lay
        out, lse = torch.ops.dilated_sparse.block_sparse_attn_fwd(
            q, k, v, crow, col, bq, bk, 1, 1, scale, False, -1, -1, None, None)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.cfg = (lay, bq, bk, scale)
        return out

    @staticmethod
    def backward(ctx, dout):  # type: ignore[override]
        q, k, v, out, lse = ctx.saved_tensors
        (crow, col, ccol, row), bq, bk, scale = ctx.cfg
        dq, dk, dv = torch.ops.dilated_sparse.block_sparse_attn_bwd(
            dout, q, k, v, out, lse, ccol, row, crow, col, bq, bk, 1, 1, scale, False, -1, -1, None, None)
        return dq, dk, dv, None, None, None, None


# Which machine a run had: two lent H200s can time our D128 kernels up to ~9% apart at the same SM
# clock while Flex reads the same on both (RESULTS.md, twenty-third and twenty-fourth sessions), so
# each run records the GPU's identity and fixed settings beside its rows.
IDENTITY_FIELDS = ("uuid", "pci.bus_id", "driver_version", "vbios_version", "clocks.max.sm", "clocks.max.mem",
                   "power.limit", "ecc.mode.current", "temperature.gpu")


def _smi_query(fields: str, *extra: str) -> list[str] | None:
    """The ``nvidia-smi`` command that queries `fields` (CSV, no header or units) of the current CUDA
    device (selected by uuid where torch has one), or None without ``nvidia-smi`` or CUDA."""
    exe = shutil.which("nvidia-smi")
    if exe is None or not torch.cuda.is_available():
        return None
    uuid = getattr(torch.cuda.get_device_properties(torch.cuda.current_device()), "uuid", None)
    select = ["-i", f"GPU-{uuid}"] if uuid is not None else []
    return [exe, f"--query-gpu={fields}", "--format=csv,noheader,nounits", *extra, *select]


def parse_identity(line: str) -> dict[str, str]:
    """One ``nvidia-smi --query-gpu=<IDENTITY_FIELDS>`` CSV line as a dict (empty if it is not one)."""
    parts = [x.strip() for x in line.strip().split(",")]
    return dict(zip(IDENTITY_FIELDS, parts)) if len(parts) == len(IDENTITY_FIELDS) else {}


def gpu_identity() -> dict[str, str]:
    """The current GPU's identity and fixed settings from ``nvidia-smi`` (empty without it)."""
    cmd = _smi_query(",".join(IDENTITY_FIELDS))
    if cmd is None:
        return {}
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=False).stdout
    except (OSError, subprocess.TimeoutExpired):
        return {}
    return parse_identity(out.splitlines()[0]) if out.strip() else {}


class GpuMonitor:
    """SM clock (MHz), power draw (W) and active throttle reasons of the current GPU, sampled by
    ``nvidia-smi`` in the background every ``period_ms``; ``window(t0, t1)`` summarises the samples
    taken between two ``time.monotonic()`` readings. Without ``nvidia-smi`` (or with
    ``sample=False``) it records nothing, and every window is empty until ``samples`` holds some."""

    QUERY = "clocks.sm,power.draw,clocks_throttle_reasons.active"

    def __init__(self, period_ms: int = 50, sample: bool = True) -> None:
        self.samples: list[tuple[float, float, float, str]] = []
        self._proc: subprocess.Popen[str] | None = None
        cmd = _smi_query(self.QUERY, "-lms", str(period_ms)) if sample else None
        if cmd is None:
            return
        self._proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        threading.Thread(target=self._read, daemon=True).start()

    @staticmethod
    def parse(line: str, now: float) -> tuple[float, float, float, str] | None:
        """One ``nvidia-smi`` CSV line as (time, MHz, W, reasons), or None if it is not a sample."""
        parts = [x.strip() for x in line.split(",")]
        try:
            return now, float(parts[0]), float(parts[1]), parts[2]
        except (ValueError, IndexError):
            return None

    def _read(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        for line in self._proc.stdout:
            sample = self.parse(line, time.monotonic())
            if sample is not None:
                self.samples.append(sample)

    def window(self, t0: float, t1: float) -> dict[str, Any]:
        """Median and minimum SM clock, median power and the throttle reasons seen in [t0, t1]."""
        sel = [x for x in self.samples if t0 <= x[0] <= t1]
        if not sel:
            return {}
        clocks = sorted(x[1] for x in sel)
        power = sorted(x[2] for x in sel)
        return {"sm_mhz": clocks[len(clocks) // 2], "sm_mhz_min": clocks[0], "power_w": power[len(power) // 2],
                "throttle": sorted({x[3] for x in sel}), "samples": len(sel)}

    def close(self) -> None:
        if self._proc is not None:
            self._proc.terminate()
            self._proc.wait()
            self._proc = None
            if not self.samples:
                print("gpu_bench: nvidia-smi gave no samples; the rows carry no clocks", file=sys.stderr)


def bench(fn: Callable[[], torch.Tensor], tensors: list[torch.Tensor], grad: bool,
          monitor: GpuMonitor | None = None) -> tuple[float, float | None, dict[str, Any]]:
    """Forward (and forward+backward) do_bench medians in ms, and the GPU's conditions while each ran."""
    from triton.testing import do_bench

    cond: dict[str, Any] = {}
    t0 = time.monotonic()
    ms_f = do_bench(fn, warmup=25, rep=100, return_mode="median")
    if monitor is not None:
        cond["gpu_fwd"] = monitor.window(t0, time.monotonic())
    if not grad:
        return ms_f, None, cond
    gout = torch.randn_like(fn())

    def fb() -> None:
        fn().backward(gout)

    t0 = time.monotonic()
    ms_fb = do_bench(fb, warmup=25, rep=100, return_mode="median", grad_to_none=tensors)
    if monitor is not None:
        cond["gpu_fwdbwd"] = monitor.window(t0, time.monotonic())
    return ms_f, ms_fb, cond


def l2_flush_buffer() -> torch.Tensor:
    """256 MiB on the GPU whose ``zero_()`` before a timed call evicts the L2, as
    ``triton.testing.do_bench`` does between its calls."""
    return torch.empty(256 << 20, dtype=torch.int8, device="cuda")


def time_rounds(calls: list[Callable[[], object]], rounds: int, flush: torch.Tensor | None,
                prepare: Callable[[int], None] = lambda i: None) -> list[list[float]]:
    """Microseconds of each of `calls`, one call of each a round, the order reversed every other
    round (CUDA events): calls of one round share the GPU's clock and power state, which two
    ``do_bench`` medians taken seconds apart do not (RESULTS.md, twenty-third and forty-second
    sessions). `prepare(i)` runs on the host before call i is enqueued, outside its events.
    `flush`: the buffer zeroed before each call; None: the L2 keeps what the previous call left,
    and a sleep kernel of about the flush's length stands in for it, so that the host still
    enqueues the call ahead of the GPU (else a short call times the host's launch path: ~56 us for
    a ~31 us forward, twenty-eighth session)."""
    for i, call in enumerate(calls):  # warm-up: plans, autotuned variants, clocks
        prepare(i)
        for _ in range(5):
            call()
    torch.cuda.synchronize()
    order = list(range(len(calls)))
    events: list[list[tuple[torch.cuda.Event, torch.cuda.Event]]] = [[] for _ in calls]
    for r in range(rounds):
        for i in order if r % 2 == 0 else order[::-1]:
            prepare(i)
            if flush is not None:
                flush.zero_()
            else:
                torch.cuda._sleep(200_000)  # ~100 us of one thread's clock, no memory traffic
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            calls[i]()
            end.record()
            events[i].append((start, end))
    torch.cuda.synchronize()
    return [[s.elapsed_time(e) * 1e3 for s, e in ev] for ev in events]


def paired_ratios(times: list[list[float]], work: list[float]) -> list[float]:
    """For each call after the first (``time_rounds``' `times`, `work` its flops): the median over
    rounds of its throughput divided by the first call's in the same round."""
    return [statistics.median((w / t) / (work[0] / t0) for t, t0 in zip(ts, times[0]))
            for ts, w in zip(times[1:], work[1:])]


# The two ratio targets, timed in alternation after each shape's rows (--paired-rounds):
# (pattern, density, block) of the base and of the points measured against it.
PAIRED_BASE = ("local", 0.10, 128)
PAIRED_POINTS = {"block 64 / block 128 (local 10%)": ("local", 0.10, 64),
                 "local 2.5% / local 10% (block 128)": ("local", 0.025, 128)}


def forward_flops(nnz: int, block: int, B: int, H: int, D: int) -> float:
    """The forward's flops on a block layout's `nnz` active blocks, ``4 * nnz * block^2 * D * B * H``
    (the issue's counting; fwd+bwd: 3.5x that)."""
    return 4.0 * B * H * nnz * block * block * D


def timing_fields(flops: float, ms_f: float, ms_fb: float, cond: dict[str, Any]) -> dict[str, Any]:
    """A row's timing fields: the two medians, their TFLOP/s (fwd+bwd counted as 3.5x the forward's
    flops) and the GPU's conditions while they ran."""
    return {"fwd_ms": ms_f, "fwdbwd_ms": ms_fb, "tf_fwd": flops / ms_f / 1e9, "tf_fwdbwd": 3.5 * flops / ms_fb / 1e9,
            **cond}


def time_paired(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rounds: int, flush: torch.Tensor,
                monitor: GpuMonitor | None = None) -> list[dict[str, Any]]:
    """Each of PAIRED_POINTS against PAIRED_BASE on q, k, v ([B, S, H, D], bf16): the median
    per-round ratio of their forward, and of their fwd+bwd, TFLOP/s in alternation
    (``time_rounds``, ``paired_ratios``), with the SM clock while they ran."""
    B, S, H, D = q.shape
    scale = 1.0 / math.sqrt(D)
    gout = torch.randn_like(q)
    fwds, fwd_bwds, flops = [], [], []
    for kind, density, block in [PAIRED_BASE, *PAIRED_POINTS.values()]:
        mask = pattern(S // block, kind, density)
        flops.append(forward_flops(int(mask.sum()), block, B, H, D))

        def fwd(lay: tuple[torch.Tensor, ...] = csr(mask, "cuda"), block: int = block) -> torch.Tensor:
            return _Attn.apply(q, k, v, lay, block, block, scale)

        def fwd_bwd(fwd: Callable[[], torch.Tensor] = fwd) -> None:
            q.grad = k.grad = v.grad = None
            fwd().backward(gout)

        fwds.append(fwd)
        fwd_bwds.append(fwd_bwd)
    t0 = time.monotonic()
    fwd_ratios = paired_ratios(time_rounds(fwds, rounds, flush), flops)
    fwd_bwd_ratios = paired_ratios(time_rounds(fwd_bwds, rounds, flush), flops)
    cond = monitor.window(t0, time.monotonic()) if monitor is not None else {}
    return [{"what": what, "rounds": rounds, "fwd": a, "fwdbwd": b, "gpu": cond}
            for what, a, b in zip(PAIRED_POINTS, fwd_ratios, fwd_bwd_ratios)]


def _clock_cell(cond: dict[str, Any] | None) -> str:
    """'1650 (1620)': the median and minimum SM clock of a timing, '-' when none was sampled."""
    return f"{cond['sm_mhz']:.0f} ({cond['sm_mhz_min']:.0f})" if cond else "-"


def _peer_status() -> dict[str, str]:
    """Optional block-sparse peers: 'installed' or 'not installed' (they are not run here)."""
    out = {}
    for name, mod in (("flashinfer", "flashinfer"), ("MIT block_sparse_attn", "block_sparse_attn"),
                      ("deepspeed sparse_attention", "deepspeed")):
        out[name] = "installed (not benchmarked)" if importlib.util.find_spec(mod) else "not installed"
    return out


def _shapes(args: argparse.Namespace) -> list[tuple[int, int, int, int]]:
    if args.shapes:
        return [tuple(int(x) for x in s.split("x")) for s in args.shapes.split(",")]  # type: ignore[misc]
    if args.quick:
        return [(1, 16, 16384, 128)]
    shapes = [(1, 16, 8192, 128), (1, 16, 16384, 128), (1, 16, 32768, 128)]
    if args.full:
        shapes += [(1, 32, 16384, 64), (1, 16, 65536, 128), (1, 32, 65536, 64)]
    return shapes


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="S=16384 only")
    ap.add_argument("--full", action="store_true", help="add the issue's D64 and S=65536 points")
    ap.add_argument("--shapes", default="", help="comma list of BxHxSxD, overrides the defaults")
    ap.add_argument("--patterns", default="", help="comma list of kind:density (default: all)")
    ap.add_argument("--no-flex", action="store_true")
    ap.add_argument("--no-dense", action="store_true")
    ap.add_argument("--compare-variant", type=int, default=None, metavar="N",
                    help="also time ours with every kernel forced to tile variant N (e.g. 0: the mma.sync "
                         "kernels on an H100), reported as impl 'ours-vN'")
    ap.add_argument("--memory-only", action="store_true", help="skip the timings, measure memory only")
    ap.add_argument("--paired-rounds", type=int, default=200, metavar="N",
                    help="after each shape's rows, time block 64 and local 2.5%% against block 128 local 10%% "
                         "in alternation, N rounds (the issue's two ratio targets at one clock state; 0: skip)")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()

    try:
        import dilated_sparse  # noqa: F401  (registers the ops)
    except Exception as e:  # noqa: BLE001
        print(f"import dilated_sparse failed ({e!r}); using DILATED_SPARSE_TEST_LIB", file=sys.stderr)
    lib = os.environ.get("DILATED_SPARSE_TEST_LIB")
    if lib and not hasattr(torch.ops.dilated_sparse, "block_sparse_attn_fwd"):
        torch.ops.load_library(lib)
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    dev = "cuda"
    flex = None
    if not args.no_flex:
        from torch.nn.attention.flex_attention import flex_attention

        flex = torch.compile(flex_attention, dynamic=False)
    rows: list[dict[str, Any]] = []
    kinds = [("local", 0.10), ("dilated", 0.10), ("causal_local", 0.05), ("local", 0.025), ("global_local", 0.069)]
    if args.patterns:
        kinds = [(p.split(":")[0], float(p.split(":")[1])) for p in args.patterns.split(",")]

    monitor = None if args.memory_only else GpuMonitor()

    def emit(r: dict[str, Any]) -> None:
        rows.append(r)
        print(json.dumps(r), flush=True)

    paired: list[dict[str, Any]] = []
    flush = l2_flush_buffer() if args.paired_rounds > 0 and not args.memory_only else None
    for B, H, S, D in [] if args.memory_only else _shapes(args):
        torch.manual_seed(0)
        q, k, v = (torch.randn(B, S, H, D, device=dev, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
        scale = 1.0 / math.sqrt(D)
        cfg = f"B{B} H{H} S{S} D{D}"
        if not args.no_dense:
            qt, kt, vt = (t.detach().transpose(1, 2).contiguous().requires_grad_() for t in (q, k, v))
            for name, be in [("sdpa-flash", SDPBackend.FLASH_ATTENTION), ("sdpa-cudnn", SDPBackend.CUDNN_ATTENTION)]:
                try:
                    def f(be=be, qt=qt, kt=kt, vt=vt):
                        with sdpa_kernel(be):
                            return F.scaled_dot_product_attention(qt, kt, vt)
                    fm, fbm, cond = bench(f, [qt, kt, vt], True, monitor)
                    fl = 4 * B * H * S * S * D
                    emit({"cfg": cfg, "pattern": "dense", "impl": name, "block": 0, "density": 1.0,
                          **timing_fields(fl, fm, fbm, cond)})
                except Exception as e:  # noqa: BLE001
                    emit({"cfg": cfg, "pattern": "dense", "impl": name, "error": str(e)[:120]})
            del qt, kt, vt
        for kind, dens in kinds:
            for bs in ((128, 64) if kind == "local" and dens == 0.10 else (128,)):
                nb = S // bs
                lay_mask = pattern(nb, kind, dens)
                nnz = int(lay_mask.sum())
                density = nnz / nb / nb
                lay = csr(lay_mask, dev)
                fl = forward_flops(nnz, bs, B, H, D)
                pname = f"{kind} {density:.3f}"

                def ours(lay=lay, bs=bs, q=q, k=k, v=v, scale=scale):
                    return _Attn.apply(q, k, v, lay, bs, bs, scale)

                try:
                    fm, fbm, cond = bench(ours, [q, k, v], True, monitor)
                    emit({"cfg": cfg, "pattern": pname, "impl": "ours", "block": bs, "density": density,
                          **timing_fields(fl, fm, fbm, cond)})
                except Exception as e:  # noqa: BLE001
                    emit({"cfg": cfg, "pattern": pname, "impl": "ours", "block": bs, "error": str(e)[:200]})
                if args.compare_variant is not None:
                    forced = {f"DILATED_SPARSE_{op}_VARIANT": str(args.compare_variant) for op in ("FWD", "DQ", "DKV")}
                    os.environ.update(forced)
                    try:
                        fm, fbm, cond = bench(ours, [q, k, v], True, monitor)
                        emit({"cfg": cfg, "pattern": pname, "impl": f"ours-v{args.compare_variant}", "block": bs,
                              "density": density, **timing_fields(fl, fm, fbm, cond)})
                    finally:
                        for key in forced:
                            os.environ.pop(key, None)
                if flex is None or bs != 128:
                    continue
                try:
                    bm = flex_block_mask(lay_mask, S, bs, dev)
                    qf, kf, vf = (t.detach().transpose(1, 2).contiguous().requires_grad_() for t in (q, k, v))

                    def fx(bm=bm, qf=qf, kf=kf, vf=vf, scale=scale):
                        return flex(qf, kf, vf, block_mask=bm, scale=scale).transpose(1, 2)

                    with torch.no_grad():
                        a, b_ = fx().float(), ours().float()
                        diff = ((a - b_).norm() / b_.norm()).item()
                    fm, fbm, cond = bench(fx, [qf, kf, vf], True, monitor)
                    emit({"cfg": cfg, "pattern": pname, "impl": "flex", "block": bs, "density": density,
                          **timing_fields(fl, fm, fbm, cond), "rel_diff_vs_ours": diff})
                    del qf, kf, vf
                except Exception as e:  # noqa: BLE001
                    emit({"cfg": cfg, "pattern": pname, "impl": "flex", "block": bs, "error": str(e)[:200]})
        if flush is not None:
            for r in time_paired(q, k, v, args.paired_rounds, flush, monitor):
                paired.append({"cfg": cfg, **r})
                print(json.dumps(paired[-1]), flush=True)
        del q, k, v
        torch.cuda.empty_cache()
    del flush
    if monitor is not None:
        monitor.close()

    # Memory: grows with nnz, not S^2.
    mem = []
    # S16k: the sm_90 D128 backward keeps dS in a scratch of nnz x H x 128 x 128 x 2 bytes while it
    # fits DILATED_SPARSE_BWD_SCRATCH_MB (1024 MiB by default); S32k and S64k exceed it and run the
    # heads in chunks, each within the limit.
    mem_points = [(16384, 0.10)] if args.quick else [(16384, 0.025), (16384, 0.10), (32768, 0.10), (65536, 0.10),
                                                      (65536, 0.025)]
    for S, density in mem_points:
        B, H, D, bs = 1, 16, 128, 128
        q, k, v = (torch.randn(B, S, H, D, device=dev, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
        lay = csr(pattern(S // bs, "local", density), dev)
        g = torch.randn_like(q)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        _Attn.apply(q, k, v, lay, bs, bs, 1.0 / math.sqrt(D)).backward(g)
        torch.cuda.synchronize()
        mem.append({"what": f"fwd+bwd B1 H16 S{S} D128 local{density:.1%} bs128 (nnz={lay[1].numel()})",
                        "peak_extra_MiB": (torch.cuda.max_memory_allocated() - base) / 2**20,
                        "qkv_MiB": 3 * q.numel() * 2 / 2**20, "dense_scores_would_be_MiB": H * S * S * 2 / 2**20,
                        "ds_scratch_if_used_MiB": lay[1].numel() * H * bs * bs * 2 / 2**20})
        del q, k, v, g
    S, B, H, D, bs = 8192, 1, 16, 128, 128
    q, k = (torch.randn(B, S, H, D, device=dev, dtype=torch.bfloat16) for _ in range(2))
    lay_mask = pattern(S // bs, "local", 0.10)
    crow, col, _, _ = csr(lay_mask, dev)
    nnz = int(lay_mask.sum())
    _out, lse = torch.ops.dilated_sparse.block_sparse_attn_fwd(q, k, k, crow, col, bs, bs, 1, 1, 0.1, False, -1, -1,
                                                             None, None)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    w = torch.ops.dilated_sparse.block_sparse_attn_weights(q, k, lse, crow, col, bs, bs, 1, 1, nnz, 0.1, False, -1,
                                                          -1, None, None)
    torch.cuda.synchronize()
    mem.append({"what": f"weights B1 H16 S{S} D128 local10% bs128 (nnz={nnz})",
                    "peak_extra_MiB": (torch.cuda.max_memory_allocated() - base) / 2**20,
                    "dense_would_be_MiB": B * H * S * S * 2 / 2**20, "result_MiB": w.numel() * 2 / 2**20})

    # Ratios: speed-up of ours over flex (same block mask, block 128) and over dense SDPA (time ratio).
    flex_rows = {(r["cfg"], r["pattern"]): r for r in rows if r.get("impl") == "flex" and "error" not in r}
    dense_rows = {(r["cfg"], r["impl"]): r for r in rows if r.get("pattern") == "dense" and "error" not in r}
    for r in rows:
        if not str(r.get("impl", "")).startswith("ours") or "error" in r:
            continue
        f = flex_rows.get((r["cfg"], r.get("pattern")))
        if f and r["block"] == 128:
            r["x_flex_fwd"] = f["fwd_ms"] / r["fwd_ms"]
            r["x_flex_fwdbwd"] = f["fwdbwd_ms"] / r["fwdbwd_ms"]
        d = dense_rows.get((r["cfg"], "sdpa-cudnn")) or dense_rows.get((r["cfg"], "sdpa-flash"))
        if d:
            r["x_dense_fwd"] = d["fwd_ms"] / r["fwd_ms"]
            r["x_dense_fwdbwd"] = d["fwdbwd_ms"] / r["fwdbwd_ms"]
    peers = _peer_status()
    info = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "time": time.strftime("%Y-%m-%d %H:%M"),
                "command": " ".join(sys.argv), "gpu": gpu_identity(), "rows": rows, "memory": mem, "paired": paired,
                "other_peers": peers}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "gpu_bench.json"), "w") as fh:
        json.dump(info, fh, indent=1)
    nan = float("nan")
    gpu = info["gpu"]
    ident = (f", {gpu['uuid']}, max SM / memory clock {gpu['clocks.max.sm']} / {gpu['clocks.max.mem']} MHz, "
             f"power limit {gpu['power.limit']} W, driver {gpu['driver_version']}") if gpu else ""
    lines = [f"{info['device']}, torch {info['torch']}{ident}", "",
             ("| config | pattern | impl | block | fwd ms | fwd TF/s | fwd+bwd ms | fwd+bwd TF/s | x flex fwd | "
             "x flex f+b | x dense fwd | x dense f+b | SM MHz fwd / f+b (median, min) |"),
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['cfg']} | {r.get('pattern')} | {r['impl']} | {r.get('block', '')} | ERROR {r['error']} |")
            continue
        lines.append(
            f"| {r['cfg']} | {r['pattern']} | {r['impl']} | {r['block']} | {r['fwd_ms']:.3f} | {r['tf_fwd']:.0f} | "
            f"{r['fwdbwd_ms']:.3f} | {r['tf_fwdbwd']:.0f} | {r.get('x_flex_fwd', nan):.2f} | "
            f"{r.get('x_flex_fwdbwd', nan):.2f} | {r.get('x_dense_fwd', nan):.1f} | {r.get('x_dense_fwdbwd', nan):.1f} | "
            f"{_clock_cell(r.get('gpu_fwd'))} / {_clock_cell(r.get('gpu_fwdbwd'))} |")
    lines.append("")
    for m in mem:
        lines.append("- " + ", ".join(f"{k}={v:.1f}" if isinstance(v, float) else f"{k}={v}" for k, v in m.items()))
    for r in paired:
        lines.append(f"- {r['cfg']} {r['what']}, TFLOP/s in alternation ({r['rounds']} rounds, SM "
                     f"{_clock_cell(r['gpu'])} MHz): fwd {r['fwd']:.3f}, fwd+bwd {r['fwdbwd']:.3f}")
    lines.append("- other peers: " + ", ".join(f"{k}: {v}" for k, v in peers.items()))
    text = "\n".join(lines)
    with open(os.path.join(args.out, "gpu_bench.md"), "w") as fh:
        fh.write(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
