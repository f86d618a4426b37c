"""One benchmark point of the CUDA tools (``ab_env.py``, ``ab_builds.py``, ``timeline.py``,
``item_trace.py``, ``energy.py``): seeded bf16 inputs and our forward / forward+backward calls
through ``benchmarks/gpu_bench.py``'s autograd Function, as the matrix times them; FlexAttention's
on the same block mask; and CUDA graph replays of our op calls (``ab_builds.py --graph``).

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


def parse_point(point: str) -> tuple[int, int, int, int, str, float]:
    """``BxHxSxD:pattern:density`` as (B, H, S, D, pattern, density)."""
    shape, kind, density = point.split(":")
    B, H, S, D = (int(x) for x in shape.split("x"))
    return B, H, S, D, kind, float(density)


def split_block(point: str, block: int) -> tuple[str, int]:
    """``BxHxSxD:pattern:density[:block]`` as the point without its block and the block (`block`
    where the point names none)."""
    parts = point.split(":")
    if len(parts) == 4:
        return ":".join(parts[:3]), int(parts[3])
    return point, block


def point_inputs(
    point: str, block: int, requires_grad: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, tuple[torch.Tensor, ...], int, int]:
    """`point`'s seeded bf16 q, k, v, output gradient and layout (crow, col, ccol, row), with square
    blocks of its block, else `block`; then the block and the head dim. Every call for a shape gets
    the same values."""
    point, block = split_block(point, block)
    B, H, S, D, kind, density = parse_point(point)
    torch.manual_seed(0)
    q, k, v = (torch.randn(B, S, H, D, device="cuda", dtype=torch.bfloat16, requires_grad=requires_grad)
               for _ in range(3))
    gout = torch.randn(B, S, H, D, device="cuda", dtype=torch.bfloat16)
    return q, k, v, gout, csr(pattern(S // block, kind, density), "cuda"), block, D


def point_calls(point: str, block: int = 128) -> tuple[Callable[[], torch.Tensor], Callable[[], None]]:
    """The forward and forward+backward calls of `point` (``BxHxSxD:pattern:density[:block]``,
    ``point_inputs``); the second clears q, k, v's gradients first."""
    q, k, v, gout, layout, block, D = point_inputs(point, block, requires_grad=True)

    def fwd() -> torch.Tensor:
        return _Attn.apply(q, k, v, layout, block, block, 1 / math.sqrt(D))

    def fwd_bwd() -> None:
        q.grad = k.grad = v.grad = None
        fwd().backward(gout)

    return fwd, fwd_bwd


def graph_point_calls(point: str, block: int = 128) -> tuple[Callable[[], None], Callable[[], None]]:
    """Replays of two CUDA graphs, one capturing `point`'s forward op call and one its forward and
    backward op calls (``point_inputs``, called eagerly once before each capture): what a captured
    call costs, its plans rebuilt and its index values checked on the device in every replay."""
    q, k, v, dout, (crow, col, ccol, row), block, D = point_inputs(point, block, requires_grad=False)
    rules = (block, block, 1, 1, 1 / math.sqrt(D), False, -1, -1, None, None)
    ops = torch.ops.dilated_sparse

    def fwd() -> tuple[torch.Tensor, torch.Tensor]:
        return ops.block_sparse_attn_fwd(q, k, v, crow, col, *rules)

    def fwd_bwd() -> tuple[torch.Tensor, ...]:
        out, lse = fwd()
        return ops.block_sparse_attn_bwd(dout, q, k, v, out, lse, ccol, row, crow, col, *rules)

    replays = []
    for fn in (fwd, fwd_bwd):
        fn()
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        replays.append(graph.replay)
    return replays[0], replays[1]


def flex_point_calls(point: str, block: int = 128) -> tuple[Callable[[], torch.Tensor], Callable[[], None]]:
    """FlexAttention's forward and forward+backward calls of `point` (``torch.compile``d, the same
    block mask as ``point_calls``' layout, [B, H, S, D] inputs), as ``gpu_bench.py`` times them."""
    from gpu_bench import flex_block_mask  # here: ab_builds.py loads this file over older trees' gpu_bench
    from torch.nn.attention.flex_attention import flex_attention

    point, block = split_block(point, block)
    B, H, S, D, kind, density = parse_point(point)
    block_mask = flex_block_mask(pattern(S // block, kind, density), S, block, "cuda")
    flex = torch.compile(flex_attention, dynamic=False)
    torch.manual_seed(0)
    q, k, v = (torch.randn(B, H, S, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    gout = torch.randn(B, H, S, D, device="cuda", dtype=torch.bfloat16)

    def fwd() -> torch.Tensor:
        return flex(q, k, v, block_mask=block_mask, scale=1 / math.sqrt(D))

    def fwd_bwd() -> None:
        q.grad = k.grad = v.grad = None
        fwd().backward(gout)

    return fwd, fwd_bwd
