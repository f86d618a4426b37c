"""Attention-probability dropout over a block-sparse layout (the modules' training path).

The compiled op has no dropout. ``nn.MultiheadAttention`` drops attention *probabilities* in
training mode, which cannot be expressed through the op's arguments, so when a module has
``dropout > 0`` and is training it computes attention here instead: plain PyTorch over the
active blocks only, in an ELL layout (each query-block row padded to the longest row of the
layout), memory ``O(B * H * nqb * max_row_blocks * block_q * block_k)`` (the size of the
sparse weights dict, never ``S x S`` unless the layout is dense). Semantics equal the op's
(causal top-left aligned, key padding mask, empty rows give 0) followed by
``F.dropout`` on the probabilities, as ``nn.MultiheadAttention`` does. In eval mode, or with
``dropout == 0``, the modules use the op.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from ..layout import BlockSparseLayout
from ..reference import allowed_keys
from ._common import derived

__all__ = ["dropout_block_sparse_attention", "entry_tables"]


def _ell(layout: BlockSparseLayout) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """``(idx, valid, pos, max_row)``: key blocks per row padded to ``[Lb, Lh, nqb, max_row]``,
    and each CSR entry's position in its row (``[nnz]``). Built once per layout (cached)."""
    return derived(layout, "ell", _build_ell)


def _build_ell(layout: BlockSparseLayout) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    counts = layout.row_counts()
    rows = layout.row_ids()
    crow = layout.crow_indices.to(torch.int64)
    max_row = max(int(counts.max().item()) if counts.numel() else 0, 1)
    pos = torch.arange(layout.nnz, device=rows.device) - crow[rows]
    n_rows = layout.num_slices * layout.num_query_blocks
    idx = torch.zeros(n_rows, max_row, dtype=torch.int64, device=rows.device)
    valid = torch.zeros(n_rows, max_row, dtype=torch.bool, device=rows.device)
    idx[rows, pos] = layout.col_indices.to(torch.int64)
    valid[rows, pos] = True
    shape = (layout.layout_batch, layout.layout_heads, layout.num_query_blocks, max_row)
    return idx.view(shape), valid.view(shape), pos, max_row


def entry_tables(layout: BlockSparseLayout) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(q_block, k_block, row_pos, valid)`` ``[Lb, Lh, max(max_slice_nnz, 1)]``: for entry ``e`` of
    each slice's weights-dict values (CSR order), its query block, key block and position in its
    row (the ELL column of :func:`_ell`). Built once per layout (cached)."""
    return derived(layout, "entries", _build_entry_tables)


def _build_entry_tables(layout: BlockSparseLayout) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    nqb = layout.num_query_blocks
    rows = layout.row_ids()
    slices = rows // nqb
    local = torch.arange(layout.nnz, device=rows.device) - layout.crow_indices.to(torch.int64)[slices * nqb]
    pos = _ell(layout)[2]
    width = max(layout.max_slice_nnz, 1)
    qb = torch.zeros(layout.num_slices, width, dtype=torch.int64, device=rows.device)
    kb = torch.zeros_like(qb)
    row_pos = torch.zeros_like(qb)
    valid = torch.zeros(layout.num_slices, width, dtype=torch.bool, device=rows.device)
    qb[slices, local] = rows % nqb
    kb[slices, local] = layout.col_indices.to(torch.int64)
    row_pos[slices, local] = pos
    valid[slices, local] = True
    shape = (*layout.layout_shape, width)
    return qb.view(shape), kb.view(shape), row_pos.view(shape), valid.view(shape)


def _to_blocks(t: torch.Tensor, block: int, num_blocks: int) -> torch.Tensor:
    """``[B, S, H, D]`` -> ``[B, H, num_blocks, block, D]`` (zero padded at the end)."""
    pad = num_blocks * block - t.shape[1]
    if pad:
        t = F.pad(t, (0, 0, 0, 0, 0, pad))
    bsz, _, heads, dim = t.shape
    return t.view(bsz, num_blocks, block, heads, dim).permute(0, 3, 1, 2, 4)


def _weights_from_ell(probs: torch.Tensor, layout: BlockSparseLayout, out_shape: tuple[int, int, int, int]) -> dict[str, Any]:
    """The sparse weights dict (DESIGN.md section 4) from ELL probabilities.

    ``probs``: ``[B, H, nqb, bq, max_row, bk]``.
    """
    bsz, heads = probs.shape[:2]
    qb, _, pos, valid = (t.to(probs.device).expand(bsz, heads, -1) for t in entry_tables(layout))
    b_i = torch.arange(bsz, device=probs.device).view(-1, 1, 1)
    h_i = torch.arange(heads, device=probs.device).view(1, -1, 1)
    values = probs[b_i, h_i, qb, :, pos, :]  # [B, H, width, bq, bk]
    values = torch.where(valid[..., None, None], values, torch.zeros_like(values))
    return layout.weights_dict(values[:, :, : layout.max_slice_nnz], out_shape)


def dropout_block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: BlockSparseLayout,
    *,
    dropout_p: float,
    scale: float | None = None,
    causal: bool = False,
    window: tuple[int | None, int | None] | None = None,
    key_padding_mask: torch.Tensor | None = None,
    return_attention_weights: bool = False,
    block_gate: torch.Tensor | None = None,
) -> Any:
    """Block-sparse attention with dropout on the probabilities (differentiable, PyTorch ops).

    Args:
        q: ``[B, Sq, H, D]``; k, v: ``[B, Sk, Hkv, D]`` (``H % Hkv == 0``).
        layout: the layout (shared, per-batch or per-head).
        dropout_p: probability of zeroing an attention probability (survivors are scaled by
            ``1 / (1 - p)``), as ``nn.MultiheadAttention`` in training mode.
        scale, causal, window, key_padding_mask: as :func:`dilated_sparse.block_sparse_attention`
            (``window`` as a ``(left, right)`` pair, ``None`` sides unbounded).
        return_attention_weights: also return the weights dict of the *dropped* probabilities
            (what ``nn.MultiheadAttention`` returns in training mode).
        block_gate: optional ``[B or 1, H or 1, nqb, nkb]`` factors multiplying the exponentiated
            scores of each block before normalisation (differentiable; used by the adaptive
            module's straight-through gates). Only the layout's active blocks are read.

    Returns:
        ``out`` ``[B, Sq, H, D]`` in ``q``'s dtype, or ``(out, weights)``.
    """
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must lie in [0, 1), got {dropout_p}")
    bsz, sq, heads, dim = q.shape
    sk, kv_heads = k.shape[1], k.shape[2]
    if heads % kv_heads:
        raise ValueError(f"q heads ({heads}) must be a multiple of k/v heads ({kv_heads})")
    if (layout.seq_len_q, layout.seq_len_k) != (sq, sk):
        raise ValueError(
            f"layout was built for seq_len_q={layout.seq_len_q}, seq_len_k={layout.seq_len_k} but q has {sq} "
            f"and k has {sk} tokens"
        )
    layout = layout.to(q.device)
    scale = 1.0 / math.sqrt(dim) if scale is None else float(scale)
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    bq, bk = layout.block_size
    nqb, nkb = layout.num_query_blocks, layout.num_key_blocks
    if kv_heads != heads:
        k = k.repeat_interleave(heads // kv_heads, dim=2)
        v = v.repeat_interleave(heads // kv_heads, dim=2)
    qb = _to_blocks(q.to(cdt), bq, nqb)  # [B, H, nqb, bq, D]
    kb = _to_blocks(k.to(cdt), bk, nkb)  # [B, H, nkb, bk, D]
    vb = _to_blocks(v.to(cdt), bk, nkb)
    idx, valid, _, max_row = _ell(layout)
    idx = idx.expand(bsz, heads, nqb, max_row)
    valid = valid.expand(bsz, heads, nqb, max_row)
    b_i = torch.arange(bsz, device=q.device).view(-1, 1, 1, 1)
    h_i = torch.arange(heads, device=q.device).view(1, -1, 1, 1)
    kg = kb[b_i, h_i, idx]  # [B, H, nqb, R, bk, D]
    vg = vb[b_i, h_i, idx]
    scores = torch.einsum("bhqid,bhqrjd->bhqirj", qb, kg) * scale  # [B, H, nqb, bq, R, bk]
    key_pos = idx.unsqueeze(-1) * bk + torch.arange(bk, device=q.device)  # [B, H, nqb, R, bk]
    mask = valid.unsqueeze(-1)
    if key_padding_mask is not None:
        padded = F.pad(key_padding_mask.to(q.device), (0, nkb * bk - sk), value=True)
        mask = mask & ~padded[torch.arange(bsz, device=q.device).view(-1, 1, 1, 1, 1), key_pos]
    q_pos = (torch.arange(nqb, device=q.device).view(-1, 1) * bq + torch.arange(bq, device=q.device))
    q_pos = q_pos.view(1, 1, nqb, bq, 1, 1)
    token_ok = allowed_keys(q_pos, key_pos.unsqueeze(3), seq_len_k=sk, causal=causal, window=window)
    mask = (mask.unsqueeze(3) & token_ok).expand_as(scores)  # [B, H, nqb, bq, R, bk]
    flat_scores = scores.masked_fill(~mask, float("-inf")).flatten(-2)
    flat_mask = mask.flatten(-2)
    row_max = flat_scores.amax(dim=-1, keepdim=True)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    e = torch.exp(flat_scores - row_max) * flat_mask
    if block_gate is not None:
        gate = block_gate.to(cdt).expand(bsz, heads, nqb, nkb)
        gate = torch.gather(gate, 3, idx)  # [B, H, nqb, R]
        e = (e.view_as(scores) * gate.view(bsz, heads, nqb, 1, max_row, 1)).flatten(-2)
    denom = e.sum(dim=-1, keepdim=True)
    probs = e / torch.where(denom > 0, denom, torch.ones_like(denom))
    probs = F.dropout(probs, p=dropout_p, training=True).view_as(scores)
    out = torch.einsum("bhqirj,bhqrjd->bhqid", probs, vg)  # [B, H, nqb, bq, D]
    out = out.permute(0, 2, 3, 1, 4).reshape(bsz, nqb * bq, heads, dim)[:, :sq].to(q.dtype)
    if not return_attention_weights:
        return out
    weights = _weights_from_ell(probs.detach().to(q.dtype), layout, (bsz, heads, sq, sk))
    return out, weights
