"""Plain-PyTorch reference implementations of block-sparse attention, from the definition.

These never call the extension: tests compare the kernels against two independent things.

* :func:`reference_attention` builds the dense token-level mask and the dense score matrix
  (``B x H x Sq x Sk``): exact and simple, for small sizes only.
* :func:`blocked_reference_attention` touches only the active blocks of each query-block row
  (gathers those key tokens, masks, softmax): for sizes where ``S x S`` does not fit.

Both take the same arguments as :func:`dilated_sparse.block_sparse_attention` and compute in
``float64`` when given float64 inputs, else in float32, returning the input dtype.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .layout import BlockSparseLayout

__all__ = ["allowed_keys", "blocked_reference_attention", "reference_attention"]


def allowed_keys(
    query_pos: torch.Tensor,
    key_pos: torch.Tensor,
    *,
    seq_len_k: int,
    causal: bool = False,
    window: tuple[int | None, int | None] | None = None,
) -> torch.Tensor:
    """Token rule shared by every path: may query ``i`` see key ``j`` (ignoring the layout)?

    ``query_pos`` and ``key_pos`` broadcast against each other; returns a bool tensor.
    """
    ok = key_pos < seq_len_k
    if causal:
        ok = ok & (key_pos <= query_pos)
    if window is not None:
        left, right = window
        if left is not None:
            ok = ok & (key_pos >= query_pos - left)
        if right is not None:
            ok = ok & (key_pos <= query_pos + right)
    return ok


def _key_valid(batch: int, seq_len_k: int, key_lengths: torch.Tensor | None,
               key_padding_mask: torch.Tensor | None, device: torch.device) -> torch.Tensor:
    """Bool ``[B, Sk]``: keys that are not padding."""
    valid = torch.ones(batch, seq_len_k, dtype=torch.bool, device=device)
    if key_lengths is not None:
        valid &= torch.arange(seq_len_k, device=device) < key_lengths.to(device).view(-1, 1)
    if key_padding_mask is not None:
        valid &= ~key_padding_mask.to(device)
    return valid


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _expand_kv(t: torch.Tensor, heads: int) -> torch.Tensor:
    """``[B, S, Hkv, D]`` -> ``[B, heads, S, D]`` repeating each kv head over its query group."""
    return t.transpose(1, 2).repeat_interleave(heads // t.shape[2], dim=1)


def _weights_dict(probs: torch.Tensor, layout: BlockSparseLayout) -> dict[str, Any]:
    """Sparse weights dict (DESIGN.md section 4) cut out of dense probabilities ``[B,H,Sq,Sk]``."""
    bsz, heads, sq, sk = probs.shape
    bq, bk = layout.block_size
    nqb, nkb = layout.num_query_blocks, layout.num_key_blocks
    padded = probs.new_zeros(bsz, heads, nqb * bq, nkb * bk)
    padded[:, :, :sq, :sk] = probs
    tiles = padded.view(bsz, heads, nqb, bq, nkb, bk).permute(0, 1, 2, 4, 3, 5)
    crow = layout.crow_indices.cpu().to(torch.int64)
    col = layout.col_indices.cpu().to(torch.int64)
    values = probs.new_zeros(bsz, heads, layout.max_slice_nnz, bq, bk)
    for b in range(bsz):
        for h in range(heads):
            s = (0 if layout.layout_batch == 1 else b) * layout.layout_heads + (0 if layout.layout_heads == 1 else h)
            start = int(crow[s * nqb])
            for qb in range(nqb):
                lo, hi = int(crow[s * nqb + qb]), int(crow[s * nqb + qb + 1])
                if hi > lo:
                    values[b, h, lo - start : hi - start] = tiles[b, h, qb, col[lo:hi].to(probs.device)]
    return layout.weights_dict(values, (bsz, heads, sq, sk))


def reference_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: BlockSparseLayout,
    *,
    scale: float | None = None,
    causal: bool = False,
    window: tuple[int | None, int | None] | None = None,
    key_lengths: torch.Tensor | None = None,
    key_padding_mask: torch.Tensor | None = None,
    return_attention_weights: bool = False,
    return_lse: bool = False,
) -> Any:
    """Dense definition of block-sparse attention (small sizes only: builds ``B x H x Sq x Sk``).

    Returns ``out`` ``[B, Sq, H, D]``; with ``return_lse`` also ``lse`` ``[B, H, Sq]``; with
    ``return_attention_weights`` also the sparse weights dict (in that order).
    """
    bsz, sq, heads, dim = q.shape
    sk = k.shape[1]
    cdt = _compute_dtype(q.dtype)
    scale = 1.0 / math.sqrt(dim) if scale is None else scale
    layout = layout.to(q.device)
    bq, bk = layout.block_size
    qh = q.transpose(1, 2).to(cdt)
    kh, vh = _expand_kv(k, heads).to(cdt), _expand_kv(v, heads).to(cdt)
    scores = torch.einsum("bhid,bhjd->bhij", qh, kh) * scale

    block_mask = layout.to_dense_mask()  # [Lb, Lh, nqb, nkb]
    token_mask = block_mask.repeat_interleave(bq, dim=2)[:, :, :sq].repeat_interleave(bk, dim=3)[:, :, :, :sk]
    qpos = torch.arange(sq, device=q.device).view(-1, 1)
    kpos = torch.arange(sk, device=q.device).view(1, -1)
    mask = token_mask & allowed_keys(qpos, kpos, seq_len_k=sk, causal=causal, window=window)
    mask = mask & _key_valid(bsz, sk, key_lengths, key_padding_mask, q.device).view(bsz, 1, 1, sk)
    mask = mask.expand(bsz, heads, sq, sk)

    scores = scores.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # -inf on empty rows
    probs = torch.where(mask, torch.exp(scores - lse.unsqueeze(-1).clamp_min(torch.finfo(cdt).min)), 0.0)
    out = torch.einsum("bhij,bhjd->bhid", probs, vh).transpose(1, 2).to(q.dtype)
    result: list[Any] = [out]
    if return_lse:
        result.append(lse.to(torch.float64 if q.dtype == torch.float64 else torch.float32))
    if return_attention_weights:
        result.append(_weights_dict(probs.to(q.dtype), layout))
    return result[0] if len(result) == 1 else tuple(result)


def blocked_reference_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: BlockSparseLayout,
    *,
    scale: float | None = None,
    causal: bool = False,
    window: tuple[int | None, int | None] | None = None,
    key_lengths: torch.Tensor | None = None,
    key_padding_mask: torch.Tensor | None = None,
    return_lse: bool = False,
) -> Any:
    """Reference that only touches active blocks: memory ``O(block_q x row keys)`` per step.

    Loops over the query-block rows of each layout slice (all batch/head members of a slice at
    once), so it is slow but fits sizes where the dense reference does not.
    """
    bsz, sq, heads, dim = q.shape
    sk = k.shape[1]
    cdt = _compute_dtype(q.dtype)
    scale = 1.0 / math.sqrt(dim) if scale is None else scale
    layout = layout.to(q.device)
    bq, bk = layout.block_size
    nqb = layout.num_query_blocks
    group = heads // k.shape[2]
    key_valid = _key_valid(bsz, sk, key_lengths, key_padding_mask, q.device)
    out = torch.zeros(bsz, sq, heads, dim, dtype=cdt, device=q.device)
    lse = torch.full((bsz, heads, sq), float("-inf"), dtype=cdt, device=q.device)
    crow = layout.crow_indices.cpu().tolist()
    col = layout.col_indices.to(torch.int64)
    lb, lh = layout.layout_shape
    for s in range(layout.num_slices):
        batches = list(range(bsz)) if lb == 1 else [s // lh]
        head_ids = list(range(heads)) if lh == 1 else [s % lh]
        b_idx = torch.tensor(batches, device=q.device).view(-1, 1)
        h_idx = torch.tensor(head_ids, device=q.device).view(1, -1)
        for qb in range(nqb):
            lo, hi = crow[s * nqb + qb], crow[s * nqb + qb + 1]
            q0, q1 = qb * bq, min(sq, (qb + 1) * bq)
            if hi == lo:
                continue
            keys = (col[lo:hi].view(-1, 1) * bk + torch.arange(bk, device=q.device)).view(-1)
            keys = keys[keys < sk]
            qpos = torch.arange(q0, q1, device=q.device).view(-1, 1)
            mask = allowed_keys(qpos, keys.view(1, -1), seq_len_k=sk, causal=causal, window=window)
            mask = mask.unsqueeze(0) & key_valid[b_idx.view(-1)][:, keys].unsqueeze(1)  # [b, i, j]
            qt = q[b_idx.view(-1), q0:q1][:, :, h_idx.view(-1)]
            kt = k[b_idx.view(-1)][:, keys][:, :, (h_idx.view(-1) // group)]
            vt = v[b_idx.view(-1)][:, keys][:, :, (h_idx.view(-1) // group)]
            scores = torch.einsum("bihd,bjhd->bhij", qt.to(cdt), kt.to(cdt)) * scale
            scores = scores.masked_fill(~mask.unsqueeze(1), float("-inf"))
            row_lse = torch.logsumexp(scores, dim=-1)
            probs = torch.where(mask.unsqueeze(1), torch.exp(scores - row_lse.unsqueeze(-1).clamp_min(torch.finfo(cdt).min)), 0.0)
            o = torch.einsum("bhij,bjhd->bihd", probs, vt.to(cdt))
            out[b_idx.view(-1, 1, 1), torch.arange(q0, q1, device=q.device).view(1, -1, 1), h_idx.view(1, 1, -1)] = o
            lse[b_idx.view(-1, 1, 1), h_idx.view(1, -1, 1), torch.arange(q0, q1, device=q.device).view(1, 1, -1)] = row_lse
    out = out.to(q.dtype)
    if return_lse:
        return out, lse.to(torch.float64 if q.dtype == torch.float64 else torch.float32)
    return out
