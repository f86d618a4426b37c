"""Train a small causal language model on long synthetic sequences with block-sparse attention.

The data (:func:`synthetic_batch`) is a sparse Markov chain (the loss first falls from ``ln(vocab)``
to about ``ln(4)`` by learning the successors of each token) in which every token after the first
``period`` mostly copies the one ``period`` positions back: getting below ``ln(4)`` needs attention
``period`` tokens back, which the sparse pattern has to allow (the default local window does). A
progress bar (``tqdm``, if installed) shows the loss.

Run::

    python examples/train_long_sequence.py                       # 4096 tokens, local window, CPU ok
    python examples/train_long_sequence.py --seq-len 32768 --device cuda --dtype bfloat16 \\
        --pattern dilated_sparse --pattern-options '{"segment_lengths": [2048, 8192, 32768], "dilation_rates": [1, 4, 16]}'

The attention is :func:`dilated_sparse.block_sparse_attention` over a layout built once by
:func:`dilated_sparse.patterns.make_layout`; no ``S x S`` tensor is ever made, so memory grows
linearly with the sequence length.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

import dilated_sparse as ds
from dilated_sparse.patterns import make_layout


def rope(x: torch.Tensor, base: float = 10000.0) -> torch.Tensor:
    """Rotary position embedding over ``[B, S, H, D]`` (D even)."""
    _, seq, _, dim = x.shape
    freqs = base ** (-torch.arange(0, dim, 2, device=x.device, dtype=torch.float32) / dim)
    angles = torch.arange(seq, device=x.device, dtype=torch.float32)[:, None] * freqs[None]
    cos, sin = angles.cos()[None, :, None].to(x.dtype), angles.sin()[None, :, None].to(x.dtype)
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)


class SparseBlock(nn.Module):
    """Pre-norm transformer block whose attention is block-sparse over a fixed layout."""

    def __init__(self, dim: int, heads: int, kv_heads: int) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, dim // heads
        self.norm1, self.norm2 = nn.RMSNorm(dim), nn.RMSNorm(dim)
        self.qkv = nn.Linear(dim, (heads + 2 * kv_heads) * self.head_dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor, layout: ds.BlockSparseLayout) -> torch.Tensor:
        b, s, _ = x.shape
        q, k, v = self.qkv(self.norm1(x)).split(
            [self.heads * self.head_dim, self.kv_heads * self.head_dim, self.kv_heads * self.head_dim], dim=-1)
        q = rope(q.view(b, s, self.heads, self.head_dim))
        k = rope(k.view(b, s, self.kv_heads, self.head_dim))
        v = v.view(b, s, self.kv_heads, self.head_dim)  # a view: only the last dim must be contiguous
        attn = ds.block_sparse_attention(q, k, v, layout, causal=True)  # GQA handled by the kernel
        x = x + self.proj(attn.reshape(b, s, -1))
        return x + self.mlp(self.norm2(x))


class SparseLM(nn.Module):
    """Token embedding, ``depth`` sparse blocks, tied output head."""

    def __init__(self, vocab: int, dim: int, depth: int, heads: int, kv_heads: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList(SparseBlock(dim, heads, kv_heads) for _ in range(depth))
        self.norm = nn.RMSNorm(dim)
        nn.init.normal_(self.embed.weight, std=dim ** -0.5)  # tied head: keep the first logits O(1)

    def forward(self, tokens: torch.Tensor, layout: ds.BlockSparseLayout) -> torch.Tensor:
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x, layout)
        return self.norm(x) @ self.embed.weight.T


def synthetic_batch(batch: int, seq_len: int, vocab: int, period: int, noise: float,
                    generator: torch.Generator, *, low: int = 0) -> torch.Tensor:
    """``[batch, seq_len]`` tokens of a two-part synthetic language.

    The first ``period`` tokens follow a sparse Markov chain (each token has 4 likely successors,
    learnable from the current token alone); every later token copies the one ``period``
    positions back, or with probability ``noise`` continues the chain. Predicting the copies needs
    attention ``period`` tokens back. Token ids lie in ``[low, vocab)`` (``low`` keeps a model's
    special tokens out).
    """
    successors = torch.randint(low, vocab, (vocab, 4), generator=torch.Generator().manual_seed(1234))
    tokens = torch.empty(batch, seq_len, dtype=torch.long)
    tokens[:, 0] = torch.randint(low, vocab, (batch,), generator=generator)
    choice = torch.randint(4, (batch, seq_len), generator=generator)
    fresh = torch.rand(batch, seq_len, generator=generator) < noise
    for t in range(1, seq_len):
        chain = successors[tokens[:, t - 1], choice[:, t]]
        tokens[:, t] = chain if t < period else torch.where(fresh[:, t], chain, tokens[:, t - period])
    return tokens


def train_steps(model: nn.Module, optimizer: torch.optim.Optimizer, step_loss: Callable[[int], torch.Tensor],
                steps: int, *, desc: str, no_progress: bool = False) -> tuple[list[float], float]:
    """``steps`` optimiser steps on ``step_loss(step)`` (gradients clipped to norm 1).

    Shows the loss on a ``tqdm`` bar when tqdm is installed (else prints about ten lines);
    returns ``(losses, seconds)``.
    """
    try:
        from tqdm.auto import trange
    except ImportError:  # tqdm is optional
        trange = None
    progress = trange(steps, desc=desc, disable=no_progress) if trange else range(steps)
    losses: list[float] = []
    start = time.perf_counter()
    for step in progress:
        loss = step_loss(step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(float(loss.detach()))
        if trange and not no_progress:
            progress.set_postfix(loss=f"{losses[-1]:.3f}")
        elif step % max(1, steps // 10) == 0 or step == steps - 1:
            print(f"step {step:4d}  loss {losses[-1]:.4f}")
    return losses, time.perf_counter() - start


def default_dtype(device: str) -> str:
    """``--dtype``'s default: bfloat16 on CUDA (the CUDA kernels take float16 / bfloat16), else float32."""
    return "bfloat16" if torch.device(device).type == "cuda" else "float32"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=80)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--depth", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--vocab", type=int, default=64)
    p.add_argument("--period", type=int, default=48, help="copy distance in tokens (inside the window)")
    p.add_argument("--noise", type=float, default=0.1)
    p.add_argument("--pattern", default="local_window")
    p.add_argument("--pattern-options", default='{"window_size": 128}', help="JSON dict of pattern options")
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="default: bfloat16 on CUDA (the CUDA kernels take float16 / bfloat16), else float32")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--json", help="write the loss curve here")
    args = p.parse_args(argv)
    args.dtype = args.dtype or default_dtype(args.device)
    return args


def main(argv: list[str] | None = None) -> dict:
    """Train; returns ``{"losses": [...], "density": ..., "seconds": ...}``."""
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    layout = make_layout(args.pattern, seq_len_q=args.seq_len, block_size=args.block_size, causal=True,
                         **json.loads(args.pattern_options)).to(device)
    print(f"pattern {args.pattern} {args.pattern_options}: {layout.num_query_blocks} x {layout.num_key_blocks} "
          f"blocks, density {100 * layout.density:.2f}% ({layout.nnz} of "
          f"{layout.num_query_blocks * layout.num_key_blocks} blocks)")
    model = SparseLM(args.vocab, args.dim, args.depth, args.heads, args.kv_heads).to(device, dtype)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(args.seed)

    def step_loss(step: int) -> torch.Tensor:
        tokens = synthetic_batch(args.batch, args.seq_len + 1, args.vocab, args.period, args.noise,
                                 generator).to(device)
        logits = model(tokens[:, :-1], layout)
        return F.cross_entropy(logits.float().reshape(-1, args.vocab), tokens[:, 1:].reshape(-1))

    losses, seconds = train_steps(model, optimizer, step_loss, args.steps, desc="train", no_progress=args.no_progress)
    print(f"loss {losses[0]:.3f} -> {losses[-1]:.3f} (ln vocab {math.log(args.vocab):.2f}, chain only "
          f"{math.log(4):.2f}, with the copies ~{args.noise * math.log(4 / args.noise) + 0.05:.2f}) "
          f"in {seconds:.1f} s, {args.steps * args.batch * args.seq_len / seconds:.0f} tokens/s")
    result = {"losses": losses, "density": layout.density, "seconds": seconds}
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh)
    return result


if __name__ == "__main__":
    main()
