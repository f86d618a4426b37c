"""Dynamic block top-k attention: pooled q/k pick the key blocks, the block-sparse kernel runs them.

:func:`block_topk_attention` follows MoBA (Lu et al., "MoBA: Mixture of Block Attention for
Long-Context LLMs", 2025) and XAttention (Xu et al., "XAttention: Block Sparse Attention with
Antidiagonal Scoring", 2025) in spirit: each query block scores every key block by the dot product
of the mean-pooled query block and the mean-pooled key block, keeps ``blocks_per_row`` of them
(with ``causal``, the query block's own key block is always kept and future blocks are ranked
last, as MoBA does; key blocks made only of padding are ranked last too), and runs exact attention over the kept blocks with
:func:`dilated_sparse.block_sparse_attention`. The CSR layout is built on the device with no host
synchronisation: every row has exactly ``blocks_per_row`` entries, so ``crow_indices`` is an
arange and ``col_indices`` the sorted top-k indices. (On CUDA the attention op then checks the new
layout's index values on the host, and its forward reads its split plan's counts: host
synchronisations every call, since the layout is new every call.)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..layout import BlockSparseLayout, normalize_block_size
from ..ops import block_sparse_attention
from ._common import check_qkv, expand_kv, full_precision, key_valid_mask

__all__ = ["block_scores", "block_topk_attention", "block_topk_layout", "fixed_row_layout", "pool_blocks"]


def pool_blocks(x: torch.Tensor, block: int, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over each block of tokens: ``[B, S, H, D]`` -> float ``[B, H, ceil(S/block), D]``.

    The last (partial) block is averaged over its real tokens only; with ``valid`` (bool
    ``[B, S]``) only valid tokens are averaged (a block without one pools to 0).
    """
    bsz, seq, heads, dim = x.shape
    nb = -(-seq // block)
    work = x.transpose(1, 2).to(torch.float64 if x.dtype == torch.float64 else torch.float32)
    weight = torch.ones(bsz, seq, dtype=work.dtype, device=x.device) if valid is None else valid.to(work.dtype)
    pad = nb * block - seq
    if pad:
        work = torch.cat([work, work.new_zeros(bsz, heads, pad, dim)], dim=2)
        weight = torch.cat([weight, weight.new_zeros(bsz, pad)], dim=1)
    weight = weight.view(bsz, 1, nb, block, 1)
    sums = (work.view(bsz, heads, nb, block, dim) * weight).sum(dim=3)
    counts = weight.sum(dim=3)
    return sums / counts.clamp_min(1)


def block_scores(
    q: torch.Tensor,
    k: torch.Tensor,
    block_size: int | Sequence[int],
    *,
    causal: bool = False,
    key_valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Pooled block scores ``[B, H, nqb, nkb]`` (float) used to rank key blocks.

    ``pool(q)_qb . pool(k)_kb``. With ``causal``, key blocks that start after the query block's
    last position are ``-inf``; the key block holding the query block's first position is
    ``+inf`` (always kept, so no query of the block is left without a key) and the one holding its
    last position gets the largest finite value (kept next; with ``block_q == block_k`` the two are
    the same block, MoBA's "current block"). With ``key_valid`` (bool ``[B, Sk]``, False =
    padding) keys are pooled over valid tokens only and key blocks without one are ``-inf``.
    """
    bq, bk = normalize_block_size(block_size)
    bsz, sq, sk, heads, _, _ = check_qkv(q, k, k)
    with full_precision(q.device):  # pooled scores in float32 even under autocast
        qp = pool_blocks(q, bq)
        kp = expand_kv(pool_blocks(k, bk, key_valid).transpose(1, 2), heads)  # [B,Hkv,n,D] -> [B,H,n,D]
        scores = torch.matmul(qp, kp.transpose(-1, -2))
    if causal:
        nqb, nkb = qp.shape[2], kp.shape[2]
        first_q = torch.arange(nqb, device=q.device) * bq
        last_q = torch.clamp(first_q + bq - 1, max=sq - 1)
        k_blocks = torch.arange(nkb, device=q.device).view(1, -1)
        future = k_blocks * bk > last_q.view(-1, 1)
        own_last = (last_q.clamp(max=sk - 1) // bk).view(-1, 1) == k_blocks
        own_first = (first_q.clamp(max=sk - 1) // bk).view(-1, 1) == k_blocks
        big = torch.finfo(scores.dtype).max
        scores = scores.masked_fill(future, float("-inf")).masked_fill(own_last, big)
        scores = scores.masked_fill(own_first, float("inf"))
    if key_valid is not None:
        nkb = kp.shape[2]
        pad = nkb * bk - sk
        kv = torch.cat([key_valid, key_valid.new_zeros(bsz, pad)], dim=1) if pad else key_valid
        empty = ~kv.view(bsz, nkb, bk).any(dim=-1)  # [B, nkb]
        scores = scores.masked_fill(empty.view(bsz, 1, 1, nkb), float("-inf"))
    return scores


def block_topk_layout(
    q: torch.Tensor,
    k: torch.Tensor,
    blocks_per_row: int,
    block_size: int | Sequence[int] = 64,
    *,
    causal: bool = False,
    key_lengths: torch.Tensor | None = None,
    key_padding_mask: torch.Tensor | None = None,
) -> BlockSparseLayout:
    """Per-(batch, head) layout of the ``blocks_per_row`` best key blocks of every query block.

    Built on ``q``'s device without host synchronisation (``layout_batch = B``,
    ``layout_heads = H``, trusted indices: ``validate=False``). Rows keep
    ``min(blocks_per_row, nkb)`` blocks; with ``causal`` a row near the start may keep future
    blocks, which the kernel's causal rule then masks entirely. Key blocks made only of padding
    (``key_lengths``/``key_padding_mask``) are ranked last.
    """
    if isinstance(blocks_per_row, bool) or not isinstance(blocks_per_row, int) or blocks_per_row < 1:
        raise ValueError(f"blocks_per_row must be a positive int, got {blocks_per_row!r}")
    bq, bk = normalize_block_size(block_size)
    bsz, sq, sk, _heads, _, _ = check_qkv(q, k, k)
    key_valid = key_valid_mask(bsz, sk, key_lengths, key_padding_mask, q.device)
    with torch.no_grad():
        scores = block_scores(q.detach(), k.detach(), (bq, bk), causal=causal, key_valid=key_valid)
        nkb = scores.shape[3]
        per_row = min(blocks_per_row, nkb)
        cols = torch.topk(scores, per_row, dim=-1, sorted=False).indices
    return fixed_row_layout(cols, (bq, bk), seq_len_q=sq, seq_len_k=sk)


def fixed_row_layout(
    cols: torch.Tensor, block_size: int | Sequence[int], *, seq_len_q: int, seq_len_k: int
) -> BlockSparseLayout:
    """Layout from ``cols`` ``[B, H, nqb, n]``: ``n`` distinct key blocks per row, any order.

    Built on the device with no host synchronisation: ``crow_indices`` is ``arange * n`` and
    ``col_indices`` the per-row sorted ``cols`` (``layout_batch = B``, ``layout_heads = H``,
    ``validate=False``: the caller guarantees distinct in-range ids).
    """
    bsz, heads, nqb, per_row = cols.shape
    sorted_cols = cols.sort(dim=-1).values.reshape(-1).to(torch.int32)
    crow = torch.arange(bsz * heads * nqb + 1, device=cols.device, dtype=torch.int32) * per_row
    return BlockSparseLayout(
        crow, sorted_cols, block_size=block_size, seq_len_q=seq_len_q, seq_len_k=seq_len_k,
        layout_batch=bsz, layout_heads=heads, validate=False, max_slice_nnz=nqb * per_row,
    )


def block_topk_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    blocks_per_row: int,
    block_size: int | Sequence[int] = 64,
    *,
    causal: bool = False,
    scale: float | None = None,
    key_lengths: torch.Tensor | None = None,
    key_padding_mask: torch.Tensor | None = None,
    return_layout: bool = False,
) -> Any:
    """Dynamic block top-k attention (MoBA / XAttention style) through the block-sparse kernel.

    Args:
        q: ``[B, Sq, H, D]``; k, v: ``[B, Sk, Hkv, D]``.
        blocks_per_row: key blocks kept per query block (per batch and head).
        block_size: ``block`` or ``(block_q, block_k)`` (16, 32, 64, 128 or 256).
        causal: causal attention (the query block's own block is always kept).
        scale, key_lengths, key_padding_mask: as :func:`dilated_sparse.block_sparse_attention`.
        return_layout: also return the chosen :class:`~dilated_sparse.BlockSparseLayout`.

    Returns:
        ``out`` ``[B, Sq, H, D]`` (or ``(out, layout)``). Gradients reach q, k, v through the
        kernel; the block selection itself is not differentiated (as in MoBA).
    """
    layout = block_topk_layout(q, k, blocks_per_row, block_size, causal=causal, key_lengths=key_lengths,
                               key_padding_mask=key_padding_mask)
    out = block_sparse_attention(
        q, k, v, layout, scale=scale, causal=causal, key_lengths=key_lengths,
        key_padding_mask=key_padding_mask,
    )
    return (out, layout) if return_layout else out
