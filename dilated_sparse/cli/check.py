"""``dilated-sparse check``: a quick self-test of the installed build against the reference.

On each device (the CPU, and CUDA when present) and a few dtypes it runs the three ops on small
random problems that exercise the awkward cases at once (lengths not a multiple of the block,
GQA, causal, a sliding window, key lengths, a key padding mask, per-head layouts, empty rows)
and compares with :func:`dilated_sparse.reference_attention`, printing PASS/FAIL per op.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ._args import DTYPES, CliError, device_name, dtype_name, non_negative_int

__all__ = ["add_parser", "run", "run_checks"]

# Max-abs-error tolerances per dtype (outputs are O(1); fp16/bf16 kernels accumulate in fp32).
_TOL = {torch.float64: 1e-9, torch.float32: 2e-4, torch.float16: 4e-3, torch.bfloat16: 2.5e-2}
_GRAD_TOL = {torch.float64: 1e-8, torch.float32: 1e-3, torch.float16: 2e-2, torch.bfloat16: 1e-1}


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """Register the ``check`` subcommand."""
    parser = sub.add_parser(
        "check", help="self-test the installed build against the reference",
        description="Run the forward, backward and weights ops on small random problems on each "
        "device and compare with the reference; prints PASS/FAIL per op (exit 1 on any FAIL).",
        allow_abbrev=False,
    )
    parser.add_argument("--device", type=device_name, action="append",
                        help="device to check (repeatable; default: cpu, and cuda when available)")
    parser.add_argument("--dtype", type=dtype_name, action="append",
                        help="dtype to check (repeatable; default: float32, float64, bfloat16, float16 on cpu; "
                        "float16, bfloat16 on cuda, the dtypes of the CUDA kernels: float32 there is refused "
                        "with an error, which this check reports as FAIL)")
    parser.add_argument("--seed", type=non_negative_int, default=0, help="random seed (default 0)")
    return parser


@dataclass
class CheckResult:
    """The outcome of one op on one device/dtype."""

    device: str
    dtype: str
    op: str
    passed: bool
    error: float | None
    tolerance: float
    detail: str = ""


def _case(device: torch.device, dtype: torch.dtype, generator: torch.Generator, per_head: bool):
    import dilated_sparse as ds

    batch, seq_q, seq_k, heads, kv_heads, dim, block = 2, 200, 176, 4, 2, 32, 32
    nqb, nkb = -(-seq_q // block), -(-seq_k // block)
    lh = heads if per_head else 1
    mask = torch.rand(lh, nqb, nkb, generator=generator) < 0.4
    mask |= torch.eye(nqb, nkb, dtype=torch.bool)  # every row sees its diagonal block ...
    mask[:, 1] = False  # ... except one empty row
    layout = ds.BlockSparseLayout.from_dense_mask(mask, block_size=block, seq_len_q=seq_q, seq_len_k=seq_k)

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator).to(device, dtype)

    q, k, v = rnd(batch, seq_q, heads, dim), rnd(batch, seq_k, kv_heads, dim), rnd(batch, seq_k, kv_heads, dim)
    kwargs: dict[str, Any] = {"causal": not per_head}
    if per_head:
        kwargs["window"] = (70, 40)
        pad = torch.zeros(batch, seq_k, dtype=torch.bool)
        pad[1, :9] = True  # left padding
        kwargs["key_padding_mask"] = pad.to(device)
    else:
        kwargs["key_lengths"] = torch.tensor([seq_k, 131], dtype=torch.int32, device=device)
    return q, k, v, layout, kwargs


def _max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    both_inf = torch.isinf(a) & torch.isinf(b) & (torch.sign(a) == torch.sign(b))
    diff = torch.where(both_inf, torch.zeros_like(a), (a - b).abs())
    return float(diff.max()) if diff.numel() else 0.0


def _check_one(device: torch.device, dtype: torch.dtype, seed: int) -> list[tuple[str, float, float]]:
    """``(op, max error, tolerance)`` for fwd, bwd and weights on two cases."""
    import dilated_sparse as ds

    generator = torch.Generator().manual_seed(seed)
    results: dict[str, tuple[float, float]] = {}
    ref_dtype = torch.float64 if device.type == "cpu" else torch.float32
    for per_head in (False, True):
        q, k, v, layout, kw = _case(device, dtype, generator, per_head)
        leaves = [t.detach().requires_grad_(True) for t in (q, k, v)]
        ref_leaves = [t.detach().to(ref_dtype).requires_grad_(True) for t in (q, k, v)]
        out, lse = ds.attention_forward(*leaves, layout, **kw)
        ref_out, ref_lse, ref_w = ds.reference_attention(*ref_leaves, layout, return_lse=True,
                                                         return_attention_weights=True, **kw)
        fwd_err = max(_max_err(out, ref_out), _max_err(lse, ref_lse))
        dout = torch.randn(out.shape, generator=generator).to(device, dtype)
        grads = torch.autograd.grad(out, leaves, dout)
        ref_grads = torch.autograd.grad(ref_out, ref_leaves, dout.to(ref_dtype))
        bwd_err = max(_max_err(g, r) for g, r in zip(grads, ref_grads))
        weights = ds.attention_weights(q, k, lse, layout, **kw)
        w_err = _max_err(ds.weights_to_dense(weights), ds.weights_to_dense(ref_w))
        finite = bool(torch.isfinite(out).all()) and all(bool(torch.isfinite(g).all()) for g in grads)
        if not finite:
            fwd_err = float("inf")
        for op, err, tol in (("block_sparse_attn_fwd", fwd_err, _TOL[dtype]),
                             ("block_sparse_attn_bwd", bwd_err, _GRAD_TOL[dtype]),
                             ("block_sparse_attn_weights", w_err, _TOL[dtype])):
            prev = results.get(op, (0.0, tol))[0]
            results[op] = (max(prev, err), tol)
    return [(op, err, tol) for op, (err, tol) in results.items()]


def _dtypes(device: torch.device) -> list[torch.dtype]:
    if device.type == "cpu":
        return [torch.float32, torch.float64, torch.bfloat16, torch.float16]
    return [torch.float16, torch.bfloat16]  # the CUDA kernels' dtypes; float32 there is refused


def run_checks(devices: list[torch.device], seed: int = 0,
               report: Callable[[CheckResult], None] | None = None,
               dtypes: list[torch.dtype] | None = None) -> list[CheckResult]:
    """Run every check on each device and dtype (default: :func:`_dtypes` of the device);
    ``report`` is called as each result arrives."""
    results = []
    for device in devices:
        for dtype in dtypes or _dtypes(device):
            name = str(dtype).removeprefix("torch.")
            try:
                outcomes = _check_one(device, dtype, seed)
                items = [CheckResult(str(device), name, op, err <= tol, err, tol) for op, err, tol in outcomes]
            except Exception as error:  # noqa: BLE001 - a crash is a FAIL line, not a traceback
                text = " ".join(str(error).split())[:200]
                items = [CheckResult(str(device), name, "all ops", False, None, 0.0, f"{type(error).__name__}: {text}")]
            for item in items:
                results.append(item)
                if report:
                    report(item)
    return results


def _print(result: CheckResult) -> None:
    verdict = "PASS" if result.passed else "FAIL"
    err = "-" if result.error is None else f"{result.error:.2e}"
    line = f"{result.device:<8} {result.dtype:<9} {result.op:<27} {verdict}  max err {err} (tol {result.tolerance:.0e})"
    if result.detail:
        line += f"  {result.detail}"
    print(line, flush=True)


def run(args: argparse.Namespace, extra: list[str]) -> int:
    """Print one line per (device, dtype, op); status 1 if any fails or the extension is missing."""
    import dilated_sparse as ds

    requested = args.device or (["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
    devices = []
    for text in dict.fromkeys(requested):
        if text.startswith("cuda") and not torch.cuda.is_available():
            raise CliError("--device", "cuda requested but CUDA is not available on this machine")
        devices.append(torch.device(text))
    if not ds.extension_available():
        from .. import ops

        print(f"extension: not available ({ops._LOAD_ERROR!r}); see `dilated-sparse info`")
        print("FAIL")
        return 1
    dtypes = [DTYPES[name] for name in dict.fromkeys(args.dtype)] if args.dtype else None
    if dtypes and torch.float64 in dtypes and any(d.type == "cuda" for d in devices):
        raise CliError("--dtype", "float64 runs on the cpu only")
    start = time.perf_counter()
    results = run_checks(devices, args.seed, report=_print, dtypes=dtypes)
    failed = sum(not r.passed for r in results)
    print(f"{len(results) - failed} passed, {failed} failed ({time.perf_counter() - start:.1f} s)")
    return 1 if failed else 0
