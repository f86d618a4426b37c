"""Plain helpers shared by the test modules: random inputs and direct float64 attention definitions.

Imported as ``from _helpers import ...`` (pytest puts ``tests/`` on ``sys.path``); fixtures and
markers live in ``conftest.py``.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from typing import Any

import torch

F64 = torch.float64
# The devices a test runs on here: the CPU always, CUDA where a GPU is present.
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def random_qkv(b: int, sq: int, sk: int, h: int, hkv: int, d: int, *, seed: int = 0, dtype: torch.dtype = F64,
               requires_grad: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q ``[b, sq, h, d]``, k and v ``[b, sk, hkv, d]`` drawn (in that order) from one seeded generator."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, sq, h, d, generator=g, dtype=dtype)
    k = torch.randn(b, sk, hkv, d, generator=g, dtype=dtype)
    v = torch.randn(b, sk, hkv, d, generator=g, dtype=dtype)
    return q.requires_grad_(requires_grad), k.requires_grad_(requires_grad), v.requires_grad_(requires_grad)


def expand_heads(t: torch.Tensor, h: int) -> torch.Tensor:
    """``[B, S, Hkv, D]`` -> ``[B, h, S, D]``, each key/value head repeated for its query-head group."""
    return t.transpose(1, 2).repeat_interleave(h // t.shape[2], dim=1)


def attn_scores(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Scaled dot-product scores ``[B, H, Sq, Sk]`` (scale ``1/sqrt(D)``)."""
    return q.transpose(1, 2) @ expand_heads(k, q.shape[2]).transpose(-1, -2) / math.sqrt(q.shape[-1])


def allowed_mask(b: int, h: int, sq: int, sk: int, *, causal: bool = False, key_padding_mask=None,
                 layout=None) -> torch.Tensor:
    """Dense ``[b, h, sq, sk]`` bool mask of the allowed (query, key) pairs (test-only S x S)."""
    allowed = torch.ones(b, h, sq, sk, dtype=torch.bool)
    if causal:
        allowed &= torch.arange(sk).view(1, -1) <= torch.arange(sq).view(-1, 1)
    if key_padding_mask is not None:
        allowed &= ~key_padding_mask.view(b, 1, 1, sk)
    if layout is not None:  # token mask from the block mask
        bq, bk = layout.block_size
        blocks = layout.to_dense_mask()  # [Lb, Lh, nqb, nkb]
        tok = blocks.repeat_interleave(bq, dim=2).repeat_interleave(bk, dim=3)[:, :, :sq, :sk]
        allowed &= tok.expand(b, h, sq, sk)
    return allowed


def masked_softmax(scores: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """Softmax over the allowed keys; rows without any give 0."""
    return torch.nan_to_num(torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1), nan=0.0)


def apply_weights(weights: torch.Tensor, v: torch.Tensor, h: int) -> torch.Tensor:
    """``weights [B, h, Sq, Sk] @ v`` back in ``[B, Sq, h, D]``."""
    return (weights @ expand_heads(v, h)).transpose(1, 2)


def grads_of(out: torch.Tensor, inputs, seed: int = 1):
    """Gradients of ``(out * dout).sum()`` for a seeded random ``dout``."""
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype)
    return torch.autograd.grad((out * dout).sum(), inputs)


def assert_same_grads(out, ref, inputs, rtol: float = 1e-9, atol: float = 1e-10) -> None:
    """``out`` and ``ref`` have the same gradients w.r.t. ``inputs`` for one random upstream gradient."""
    for a, r in zip(grads_of(out, inputs), grads_of(ref, inputs)):
        torch.testing.assert_close(a, r, rtol=rtol, atol=atol)


def random_pattern_spec(rng: random.Random, heads: int, scale: float = 1.0) -> tuple[str, dict[str, Any]]:
    """``(name, options)`` of one of the package's pattern generators (``dilated_sparse.patterns``, the
    one source of layouts) drawn from ``rng``, for ``make_layout``: the fuzz tests' layouts. Token
    counts are for sequences of ~500-3000 tokens times ``scale``; generators that make per-head
    layouts make ``heads`` of them (or one shared)."""

    def tokens(n: int) -> int:  # n scaled, at least 1 unless n is 0
        return max(1, round(n * scale)) if n > 0 else 0

    per_head = {"num_heads": heads, "different_layout_per_head": rng.random() < 0.5}
    return rng.choice([
        ("local_window", {"window_size": rng.randint(tokens(16), tokens(1200))}),
        ("local_window", {"window": (rng.randint(0, tokens(600)), rng.randint(0, tokens(600)))}),
        ("global_local", {"global_tokens": tokens(rng.choice([16, 64, 128, 256])),
                          "window_size": rng.randint(tokens(16), tokens(600))}),
        ("dilated_sparse", {"segment_lengths": [tokens(256), tokens(512), tokens(1024)],
                            "dilation_rates": [1, 2, rng.choice([2, 4])]}),
        ("random", {"density": rng.uniform(0.01, 0.4), "seed": rng.randint(0, 999), **per_head}),
        ("bigbird", {"num_global_blocks": rng.randint(0, 2), "num_sliding_window_blocks": rng.choice([1, 3, 5]),
                     "num_random_blocks": rng.randint(0, 3), "seed": rng.randint(0, 999), **per_head}),
        ("longformer", {"window_size": rng.randint(tokens(16), tokens(600)),
                        "global_tokens": tokens(rng.choice([0, 32, 128]))}),
        ("fixed", {"num_local_blocks": 2 * rng.randint(1, 3), "num_global_blocks": rng.randint(1, 2)}),
        ("hierarchical", {}),
        ("butterfly", {}),
        ("block_neighbour", {"radius": rng.randint(0, 3)}),
    ])


def random_pattern_mask(rng: random.Random, *, batch: int, heads: int, seq_q: int, seq_k: int,
                        blocks: Sequence[int], scale: float = 1.0,
                        seed: int = 0) -> tuple[str, dict[str, Any], tuple[int, int], torch.Tensor] | None:
    """A fuzz case's layout, drawn from ``rng``: a ``random_pattern_spec``, block sizes from
    ``blocks``, causal in ~30% of the cases, made by ``make_layout``; with ``batch`` 2, in ~30% of
    the cases a per-batch layout whose second batch drops ~30% of the blocks (``seed``). Returns
    ``(name, options, (block_q, block_k), mask)``, the mask bool ``[Lb, Lh, nqb, nkb]`` on the CPU, or
    None where the generator refuses the request (it raises a ValueError saying why, e.g. a density
    that a causal grid cannot reach)."""
    from dilated_sparse.patterns import make_layout

    name, options = random_pattern_spec(rng, heads, scale)
    block = (rng.choice(blocks), rng.choice(blocks))
    try:
        layout = make_layout(name, seq_len_q=seq_q, seq_len_k=seq_k, block_size=block,
                             causal=rng.random() < 0.3, **options)
    except ValueError:
        return None
    mask = layout.to_dense_mask().cpu()
    if batch == 2 and rng.random() < 0.3:
        keep = torch.rand(mask.shape[1:], generator=torch.Generator().manual_seed(seed)) >= 0.3
        mask = torch.stack([mask[0], mask[0] & keep])
    return name, options, block, mask
