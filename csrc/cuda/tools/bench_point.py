"""One benchmark point of the CUDA tools (``ab_env.py``, ``ab_builds.py``, ``timeline.py``,
``item_trace.py``): seeded bf16 inputs and our forward / forward+backward calls through
``benchmarks/gpu_bench.py``'s autograd Function, as the matrix times them.

A point is ``BxHxSxD:pattern:density`` (the patterns of ``gpu_bench.pattern``). ``gpu_bench`` and
``dilated_sparse`` are imported from this tree unless the caller imported them first (``ab_builds.py``
times another tree's package that way).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))

from gpu_bench import _Attn, csr, pattern

import dilated_sparse  # noqa: F401  (registers the ops that _Attn calls)


def point_calls(point: str, block: int = 128) -> tuple[Callable[[], torch.Tensor], Callable[[], None]]:
    """The forward and forward+backward calls of `point` with square blocks of `block` (inputs
    seeded, so every call of this for a shape gets the same values); the second clears q, k, v's
    gradients first."""
    shape, kind, density = point.split(":")
    B, H, S, D = (int(x) for x in shape.split("x"))
    torch.manual_seed(0)
    q, k, v = (torch.randn(B, S, H, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    gout = torch.randn(B, S, H, D, device="cuda", dtype=torch.bfloat16)
    layout = csr(pattern(S // block, kind, float(density)), "cuda")

    def fwd() -> torch.Tensor:
        return _Attn.apply(q, k, v, layout, block, block, 1 / math.sqrt(D))

    def fwd_bwd() -> None:
        q.grad = k.grad = v.grad = None
        fwd().backward(gout)

    return fwd, fwd_bwd
