"""LSH attention: Reformer-style hashing rounds, sort by bucket, chunked attention.

Kitaev, Kaiser & Levskaya, "Reformer: The Efficient Transformer" (ICLR 2020). Queries and keys are
hashed with random rotations (angular LSH: ``h(x) = argmax([xR; -xR])`` of the unit vector), each
sequence is sorted by (bucket, position), cut into chunks of ``chunk_size``, and every query chunk
attends to the keys of the same and the previous chunk that fall in its bucket. Several hashing
rounds are combined by their log-sum-exp weights. Memory ``O(S x chunk_size)`` per round.

Differences from the paper, by choice: queries and keys are hashed separately (the same
rotations), so ``q`` and ``k`` need not be shared; ``shared_qk=True`` gives the paper's setting
(keys are the normalised queries and a query sees itself only when nothing else is allowed). The
first chunk has no previous chunk (no wrap-around). Pairs found by several rounds are not
de-duplicated.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.checkpoint import checkpoint as _checkpoint

from ._common import (
    check_qkv,
    compute_dtype,
    default_scale,
    expand_kv,
    full_precision,
    key_valid_mask,
    softmax_and_lse,
)

__all__ = ["lsh_attention", "lsh_buckets", "lsh_rotations"]


def _check_lsh_sizes(n_buckets: int, n_hashes: int) -> tuple[int, int]:
    """Check the LSH sizes shared by :func:`lsh_rotations`, :func:`lsh_attention` and the ``lsh`` block.

    Args:
        n_buckets: buckets per hashing round: an even int >= 2 (angular LSH uses ``n_buckets // 2``
            rotation columns and their negations).
        n_hashes: hashing rounds: a positive int.

    Returns:
        ``(n_buckets, n_hashes)``.

    Raises:
        ValueError: ``n_buckets`` not an even int >= 2, or ``n_hashes`` not a positive int.
    """
    if isinstance(n_buckets, bool) or not isinstance(n_buckets, int) or n_buckets < 2 or n_buckets % 2:
        raise ValueError(f"n_buckets must be an even number >= 2, got {n_buckets!r}")
    if isinstance(n_hashes, bool) or not isinstance(n_hashes, int) or n_hashes < 1:
        raise ValueError(f"n_hashes must be a positive int, got {n_hashes!r}")
    return n_buckets, n_hashes


def lsh_rotations(
    head_dim: int, n_buckets: int, n_hashes: int = 1, *, generator: torch.Generator | None = None,
    device: torch.device | str | None = None, dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Random rotations ``[n_hashes, head_dim, n_buckets // 2]`` (standard normal) for hashing.

    Raises:
        ValueError: ``n_buckets`` not an even int >= 2, or ``n_hashes`` not a positive int.
    """
    _check_lsh_sizes(n_buckets, n_hashes)
    r = torch.randn(n_hashes, head_dim, n_buckets // 2, generator=generator, dtype=dtype)
    return r.to(device) if device is not None else r


def lsh_buckets(x: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
    """Angular LSH buckets ``[n_hashes, ...]`` of ``x`` ``[..., D]``: ``argmax([xR; -xR])``.

    ``x`` is normalised first, so the bucket depends on the direction only. Computed in float32
    (float64 when either input is float64), with autocast off.
    """
    work = compute_dtype(torch.promote_types(x.dtype, rotations.dtype))
    with full_precision(x.device):
        unit = torch.nn.functional.normalize(x.to(work), dim=-1)
        proj = torch.einsum("...d,rdn->r...n", unit, rotations.to(work))
        return torch.cat([proj, -proj], dim=-1).argmax(dim=-1)


def _round(
    qh: torch.Tensor,
    kh: torch.Tensor,
    vh: torch.Tensor,
    bq: torch.Tensor,
    bk: torch.Tensor,
    key_valid: torch.Tensor | None,
    chunk: int,
    scale: float,
    causal: bool,
    shared_qk: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One hashing round: ``(out [B,H,S,Dv], lse [B,H,S])`` in original positions."""
    bsz, heads, seq, dim = qh.shape
    dim_v = vh.shape[-1]  # v may have its own head dim
    device = qh.device
    pos = torch.arange(seq, device=device)
    order_q = torch.argsort(bq * seq + pos, dim=-1)  # sort by (bucket, position)
    order_k = torch.argsort(bk * seq + pos, dim=-1)
    n_chunks = -(-seq // chunk)
    pad = n_chunks * chunk - seq

    def sort(x: torch.Tensor, order: torch.Tensor, fill: float) -> torch.Tensor:
        idx = order if x.dim() == 3 else order.unsqueeze(-1).expand(-1, -1, -1, x.shape[-1])
        out = torch.gather(x, 2, idx)
        if pad:
            shape = list(out.shape)
            shape[2] = pad
            out = torch.cat([out, out.new_full(shape, fill)], dim=2)
        return out

    qs = sort(qh, order_q, 0.0).view(bsz, heads, n_chunks, chunk, dim)
    ks = sort(kh, order_k, 0.0).view(bsz, heads, n_chunks, chunk, dim)
    vs = sort(vh, order_k, 0.0).view(bsz, heads, n_chunks, chunk, dim_v)
    bucket_q = sort(bq, order_q, -1).view(bsz, heads, n_chunks, chunk)
    bucket_k = sort(bk, order_k, -2).view(bsz, heads, n_chunks, chunk)
    pos_q = sort(pos.expand(bsz, heads, seq), order_q, -1).view(bsz, heads, n_chunks, chunk)
    pos_k = sort(pos.expand(bsz, heads, seq), order_k, -1).view(bsz, heads, n_chunks, chunk)

    def look_back(x: torch.Tensor, fill: float) -> torch.Tensor:
        prev = torch.cat([torch.full_like(x[:, :, :1], fill), x[:, :, :-1]], dim=2)
        return torch.cat([prev, x], dim=3)

    kw = look_back(ks, 0.0)
    vw = look_back(vs, 0.0)
    bucket_kw = look_back(bucket_k, -2)
    pos_kw = look_back(pos_k, -1)
    mask = (bucket_q.unsqueeze(-1) == bucket_kw.unsqueeze(-2)) & (pos_kw.unsqueeze(-2) >= 0)
    if causal:
        mask = mask & (pos_kw.unsqueeze(-2) <= pos_q.unsqueeze(-1))
    if key_valid is not None:
        valid = torch.gather(key_valid.view(bsz, 1, seq).expand(bsz, heads, seq), 2, pos_kw.clamp_min(0).flatten(2))
        mask = mask & valid.view(pos_kw.shape).unsqueeze(-2)
    scores = torch.matmul(qs, kw.transpose(-1, -2)) * scale  # [B, H, nc, c, 2c]
    if shared_qk:  # a query sees itself only when no other key is allowed (Reformer)
        is_self = pos_kw.unsqueeze(-2) == pos_q.unsqueeze(-1)
        scores = torch.where(is_self, torch.full_like(scores, -1e5), scores)
    probs, lse = softmax_and_lse(scores.masked_fill(~mask, float("-inf")))  # lse -inf on empty rows
    out_sorted = torch.matmul(probs, vw).view(bsz, heads, n_chunks * chunk, dim_v)[:, :, :seq]
    lse_sorted = lse.view(bsz, heads, n_chunks * chunk)[:, :, :seq]
    inverse = torch.argsort(order_q, dim=-1)
    out = torch.gather(out_sorted, 2, inverse.unsqueeze(-1).expand(-1, -1, -1, dim_v))
    return out, torch.gather(lse_sorted, 2, inverse)


def lsh_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    n_buckets: int = 8,
    n_hashes: int = 1,
    chunk_size: int = 64,
    causal: bool = False,
    shared_qk: bool = False,
    rotations: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    scale: float | None = None,
    key_lengths: torch.Tensor | None = None,
    key_padding_mask: torch.Tensor | None = None,
    checkpoint: bool = True,
    return_buckets: bool = False,
) -> Any:
    """Reformer LSH attention (Kitaev, Kaiser & Levskaya, ICLR 2020).

    Args:
        q: ``[B, S, H, D]``; k: ``[B, S, Hkv, D]`` (self-attention: equal lengths); v:
            ``[B, S, Hkv, Dv]`` (``Dv`` may differ from ``D``).
        n_buckets: buckets per round (even).
        n_hashes: hashing rounds, combined with weights ``softmax_r(lse_r)``.
        chunk_size: tokens per chunk; each chunk attends to itself and the previous chunk.
        causal: key position <= query position (original positions).
        shared_qk: Reformer's shared-QK setting (``k`` is ignored; keys are the unit queries).
        rotations: ``[n_hashes, D, n_buckets // 2]``, e.g. from :func:`lsh_rotations` (default:
            drawn from ``generator``); its shape must match ``n_hashes`` and ``n_buckets``.
        scale, key_lengths, key_padding_mask: as :func:`dilated_sparse.block_sparse_attention`.
        checkpoint: recompute each round in the backward pass.
        return_buckets: also return the buckets ``(bucket_q, bucket_k)``, each
            ``[n_hashes, B, H, S]``.

    Returns:
        ``[B, S, H, Dv]`` (or ``(out, (bucket_q, bucket_k))``); a query with no allowed key gets 0.

    Raises:
        ValueError: ``n_buckets`` not an even int >= 2, ``n_hashes`` not a positive int, ``rotations``
            not of shape ``[n_hashes, D, n_buckets // 2]`` or not on ``q``'s device, and the
            q/k/v, ``chunk_size`` and key-padding checks.
        TypeError: ``rotations`` not a floating-point tensor.
    """
    bsz, sq, sk, heads, _, dim = check_qkv(q, k, v)
    if sq != sk:
        raise ValueError(f"lsh_attention is self-attention: q and k need the same length, got {sq} and {sk}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    cdt = compute_dtype(q.dtype)
    scale = default_scale(scale, dim)
    _check_lsh_sizes(n_buckets, n_hashes)
    if rotations is None:
        rotations = lsh_rotations(dim, n_buckets, n_hashes, generator=generator, dtype=cdt).to(q.device)
    else:
        if not isinstance(rotations, torch.Tensor) or not rotations.dtype.is_floating_point:
            kind = f"dtype {rotations.dtype}" if isinstance(rotations, torch.Tensor) else type(rotations).__name__
            raise TypeError(f"rotations must be a floating-point tensor, got {kind}")
        expected = (n_hashes, dim, n_buckets // 2)
        if tuple(rotations.shape) != expected:
            raise ValueError(
                f"rotations must have shape [n_hashes, head_dim, n_buckets // 2] = {list(expected)} "
                f"(n_hashes={n_hashes}, n_buckets={n_buckets}), got {tuple(rotations.shape)}"
            )
        if rotations.device != q.device:
            raise ValueError(f"rotations must be on q's device {q.device}, got {rotations.device}")
    key_valid = key_valid_mask(bsz, sk, key_lengths, key_padding_mask, q.device)
    with full_precision(q.device):  # hashing and chunk attention in float32 even under autocast
        out, buckets_q, buckets_k = _lsh(q, k, v, rotations, cdt, heads, key_valid, chunk_size, scale, causal,
                                         shared_qk, checkpoint)
    return (out, (buckets_q, buckets_k)) if return_buckets else out


def _lsh(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rotations: torch.Tensor, cdt: torch.dtype, heads: int,
    key_valid: torch.Tensor | None, chunk_size: int, scale: float, causal: bool, shared_qk: bool, checkpoint: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    qh = q.transpose(1, 2).to(cdt)
    if shared_qk:
        kh = torch.nn.functional.normalize(qh, dim=-1)
    else:
        kh = expand_kv(k, heads, cdt)
    vh = expand_kv(v, heads, cdt)
    with torch.no_grad():
        buckets_q = lsh_buckets(qh.detach(), rotations.to(cdt))  # [R, B, H, S]
        buckets_k = lsh_buckets(kh.detach(), rotations.to(cdt))
    outs, lses = [], []
    for r in range(rotations.shape[0]):
        args = (qh, kh, vh, buckets_q[r], buckets_k[r], key_valid, chunk_size, scale, causal, shared_qk)
        if checkpoint and torch.is_grad_enabled():
            o, lse = _checkpoint(_round, *args, use_reentrant=False)
        else:
            o, lse = _round(*args)
        outs.append(o)
        lses.append(lse)
    if len(outs) == 1:
        out = outs[0]
    else:
        weights, _ = softmax_and_lse(torch.stack(lses), dim=0)  # [R, B, H, S]
        out = (torch.stack(outs) * weights.unsqueeze(-1)).sum(0)
    return out.transpose(1, 2).to(q.dtype), buckets_q, buckets_k
