"""Shared pieces of the sparse-attention methods: checks, masks and the row-chunked driver.

Every method in :mod:`dilated_sparse.methods` that needs the scores of a query against its keys
(entmax, sparsemax, ReLA, Gumbel, SPARSEK, gated masks, top-k over a layout) runs through
:func:`rowwise_attention` (dense top-k has its own select-then-gather path in ``topk.py``). It
never builds a ``Sq x Sk`` tensor: queries are processed in chunks (dense case: ``chunk x Sk``
scores) or in groups of query-block rows of a :class:`~dilated_sparse.BlockSparseLayout` (only the
keys of the active blocks are gathered: ``rows x block_q x row keys`` scores). Each chunk is
recomputed in the backward pass (activation checkpointing), so training memory is also
``O(chunk x Sk)`` rather than ``O(Sq x Sk)``.

A method supplies a *normaliser* ``normalize(scores, mask, info) -> weights``: ``scores`` are the
scaled scores with masked entries at ``-inf``, ``mask`` the bool mask of allowed keys (same
shape), ``info`` a :class:`RowInfo` with the token positions of the rows and keys. The weights
(same shape) multiply the values; a row with no allowed key must get all-zero weights.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint as _checkpoint

from ..layout import BlockSparseLayout
from ..ops import check_key_lengths, check_key_padding_mask, default_scale
from ..ops import check_qkv as ops_check_qkv

__all__ = [
    "Normalizer",
    "RowInfo",
    "auto_rows",
    "check_qkv",
    "chunk_seed",
    "compute_dtype",
    "default_scale",
    "expand_kv",
    "full_precision",
    "key_valid_mask",
    "masked_softmax",
    "maybe_checkpoint",
    "rms_norm",
    "rowwise_attention",
    "softmax_and_lse",
]

# Elements of one chunk's score tensor (B * H * rows * keys) the driver aims for by default.
_TARGET_CHUNK_ELEMENTS = 1 << 22


@dataclass
class RowInfo:
    """Where a chunk's scores sit in the sequence (passed to normalisers).

    Attributes:
        q_pos: int64 token positions of the chunk's queries, shaped to broadcast against the
            query dim of the scores (``[c, 1]`` dense; ``[G, bq, 1]`` layout path).
        k_pos: int64 token positions of the keys, broadcasting against the key dim
            (``[1, Sk]`` dense; ``[B, H, G, 1, W]`` layout path, padding slots hold 0).
        heads_dim: the dim of the scores that indexes query heads (always 1).
        chunk: index of the chunk (0, 1, ...), e.g. to derive per-chunk random seeds.
    """

    q_pos: torch.Tensor
    k_pos: torch.Tensor
    heads_dim: int
    chunk: int


Normalizer = Callable[[torch.Tensor, torch.Tensor, RowInfo], torch.Tensor]


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[int, int, int, int, int, int]:
    """The op's q/k/v checks (:func:`dilated_sparse.ops.check_qkv`); ``v`` may have its own head dim.

    Returns ``(B, Sq, Sk, H, Hkv, D)``.
    """
    return ops_check_qkv(q, k, v, v_head_dim_may_differ=True)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64 inputs, float32 otherwise (accumulation dtype of every method)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@contextlib.contextmanager
def full_precision(device: torch.device) -> Iterator[None]:
    """Turn autocast off for ``device`` inside the block.

    The methods cast their inputs to :func:`compute_dtype` themselves and compute scores,
    thresholds, normalisers and outputs in it (as flash-style kernels accumulate in float32);
    an enclosing ``torch.autocast`` would otherwise run their matmuls in bfloat16/float16 again
    (bf16 scores flip top-k selections and move sparsemax/entmax thresholds).
    """
    try:
        ctx = torch.autocast(device_type=device.type, enabled=False)
    except RuntimeError:  # a device type autocast does not know: nothing to turn off
        ctx = contextlib.nullcontext()
    with ctx:
        yield


def expand_kv(t: torch.Tensor, heads: int, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``[B, S, Hkv, D]`` -> ``[B, heads, S, D]``, each kv head repeated over its query group.

    With ``dtype`` the tensor is cast *before* the repeat, so the backward pass sums the group's
    gradients in ``dtype`` (not in bfloat16) and rounds once.
    """
    t = t.transpose(1, 2) if dtype is None else t.transpose(1, 2).to(dtype)
    group = heads // t.shape[1]
    return t if group == 1 else t.repeat_interleave(group, dim=1)


def key_valid_mask(
    batch: int,
    seq_len_k: int,
    key_lengths: torch.Tensor | None,
    key_padding_mask: torch.Tensor | None,
    device: torch.device,
) -> torch.Tensor | None:
    """Bool ``[B, Sk]`` of keys that are not padding, or None when nothing is masked.

    ``key_lengths`` (integer, not bool, ``[B]``, each in ``[0, Sk]``): keys at or past it are
    padding. ``key_padding_mask`` (bool ``[B, Sk]``): True marks padding, as in
    ``nn.MultiheadAttention``. Both are checked as :func:`dilated_sparse.block_sparse_attention`
    checks them (the value range is not checked while ``torch.compile`` traces, as in the op).

    Raises:
        TypeError: ``key_lengths`` not an integer tensor (bool and floating dtypes are refused),
            ``key_padding_mask`` not a bool tensor.
        ValueError: a wrong shape, or ``key_lengths`` outside ``[0, seq_len_k]``.
    """
    valid = None
    if key_lengths is not None:
        check_key_lengths(key_lengths, batch, seq_len_k, check_values=not torch.compiler.is_compiling())
        valid = torch.arange(seq_len_k, device=device) < key_lengths.to(device).view(-1, 1)
    if key_padding_mask is not None:
        check_key_padding_mask(key_padding_mask, batch, seq_len_k)
        keep = ~key_padding_mask.to(device)
        valid = keep if valid is None else valid & keep
    return valid


def masked_softmax(scores: torch.Tensor, mask: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Softmax over ``dim`` of the entries where ``mask`` is True; all-zero rows where none is.

    ``scores`` may hold ``-inf`` at masked entries; the result has no NaN and zero gradient on
    fully masked rows.
    """
    scores = scores.masked_fill(~mask, float("-inf"))
    row_max = scores.amax(dim=dim, keepdim=True).detach()
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    e = torch.exp(scores - row_max)
    total = e.sum(dim=dim, keepdim=True)
    return e / torch.where(total > 0, total, torch.ones_like(total))


def softmax_and_lse(scores: torch.Tensor, dim: int = -1) -> tuple[torch.Tensor, torch.Tensor]:
    """``(softmax, logsumexp)`` over ``dim`` of scores with ``-inf`` entries, NaN-free.

    A slice of only ``-inf`` gets probabilities 0 and ``lse = -inf``, with zero (not NaN)
    gradients, unlike ``torch.logsumexp``.
    """
    row_max = scores.amax(dim=dim, keepdim=True).detach()
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    e = torch.exp(scores - row_max)
    total = e.sum(dim=dim, keepdim=True)
    nonempty = total > 0
    safe_total = torch.where(nonempty, total, torch.ones_like(total))
    lse = torch.where(nonempty, row_max + torch.log(safe_total), torch.full_like(total, float("-inf")))
    return e / safe_total, lse.squeeze(dim)


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None = None, eps: float = 1e-6) -> torch.Tensor:
    """RMSNorm over the last dim (Zhang & Sennrich, 2019): ``x / sqrt(mean(x^2) + eps) * weight``."""
    y = x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + eps)
    return y if weight is None else y * weight


def chunk_seed(generator: torch.Generator | None, device: torch.device) -> int:
    """A 62-bit seed drawn from ``generator`` (or the global RNG) for one chunk's noise.

    Noise drawn inside a checkpointed chunk comes from a fresh generator seeded with this value,
    so the recomputation in the backward pass sees the same noise.
    """
    del device
    return int(torch.randint(0, 2**62, (1,), generator=generator).item())


def auto_rows(requested: int | None, per_row: int, total: int) -> int:
    """Rows per chunk: ``requested`` (checked), or as many as keep ``rows * per_row`` near 4M elements."""
    if requested is not None:
        if isinstance(requested, bool) or not isinstance(requested, int) or requested <= 0:
            raise ValueError(f"chunk_size must be a positive int or None, got {requested!r}")
        return min(requested, total)
    return max(1, min(total, _TARGET_CHUNK_ELEMENTS // max(1, per_row)))


def maybe_checkpoint(fn: Callable[..., torch.Tensor], use: bool, *args: torch.Tensor) -> torch.Tensor:
    """``fn(*args)``, recomputed in the backward pass (non-reentrant checkpoint) when ``use`` and grad is on."""
    if use and torch.is_grad_enabled():
        return _checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)


def rowwise_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    normalize: Normalizer,
    *,
    layout: BlockSparseLayout | None = None,
    scale: float | None = None,
    causal: bool = False,
    key_lengths: torch.Tensor | None = None,
    key_padding_mask: torch.Tensor | None = None,
    chunk_size: int | None = None,
    checkpoint: bool = True,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Attention whose row weights come from ``normalize``, computed chunk by chunk.

    Args:
        q: ``[B, Sq, H, D]``; k: ``[B, Sk, Hkv, D]`` (GQA allowed); v: ``[B, Sk, Hkv, Dv]``
            (``Dv`` may differ from ``D``).
        normalize: ``(scores, mask, info) -> weights`` (see the module docstring).
        layout: optional block layout: only keys of active blocks are scored (``layout_batch``
            in ``{1, B}``, ``layout_heads`` in ``{1, H}``).
        scale: score scale, default ``1 / sqrt(D)``.
        causal: key position <= query position (top-left aligned).
        key_lengths, key_padding_mask: key padding as in :func:`dilated_sparse.block_sparse_attention`.
        chunk_size: queries per chunk (dense) or query-block rows per chunk (layout); default
            keeps one chunk's scores near 4M elements.
        checkpoint: recompute each chunk in the backward pass (memory ``O(chunk x keys)``).
        out_dtype: dtype of the result (default ``q``'s); e.g. the compute dtype, for a method
            that post-processes the output before its single rounding to ``q``'s dtype.

    Returns:
        ``[B, Sq, H, Dv]`` in ``out_dtype``. Scores, ``normalize`` and the weighted sum run in
        float32 (float64 for float64 inputs) whatever the input dtype, with autocast off (see
        :func:`full_precision`); the result is rounded once at the end.
    """
    bsz, _sq, sk, heads, _, dim = check_qkv(q, k, v)
    scale = default_scale(scale, dim)
    cdt = compute_dtype(q.dtype)
    device = q.device
    with full_precision(device):
        qh = q.transpose(1, 2).to(cdt)  # [B, H, Sq, D]
        kh = expand_kv(k, heads, cdt)
        vh = expand_kv(v, heads, cdt)
        key_valid = key_valid_mask(bsz, sk, key_lengths, key_padding_mask, device)
        if layout is None:
            out = _dense_rows(qh, kh, vh, normalize, scale, causal, key_valid, chunk_size, checkpoint)
        else:
            out = _layout_rows(qh, kh, vh, normalize, layout, scale, causal, key_valid, chunk_size, checkpoint)
        return out.transpose(1, 2).to(q.dtype if out_dtype is None else out_dtype)


def _dense_rows(
    qh: torch.Tensor,
    kh: torch.Tensor,
    vh: torch.Tensor,
    normalize: Normalizer,
    scale: float,
    causal: bool,
    key_valid: torch.Tensor | None,
    chunk_size: int | None,
    use_checkpoint: bool,
) -> torch.Tensor:
    bsz, heads, sq, _ = qh.shape
    sk = kh.shape[2]
    device = qh.device
    rows = auto_rows(chunk_size, bsz * heads * sk, sq)
    k_pos = torch.arange(sk, device=device).view(1, sk)
    outs = []
    for index, q0 in enumerate(range(0, sq, rows)):
        q1 = min(sq, q0 + rows)
        q_pos = torch.arange(q0, q1, device=device).view(-1, 1)
        info = RowInfo(q_pos=q_pos, k_pos=k_pos, heads_dim=1, chunk=index)

        def chunk(qc: torch.Tensor, kf: torch.Tensor, vf: torch.Tensor, info: RowInfo = info) -> torch.Tensor:
            scores = torch.matmul(qc, kf.transpose(-1, -2)) * scale  # [B, H, c, Sk]
            mask = torch.ones(scores.shape[-2:], dtype=torch.bool, device=device)
            if causal:
                mask = mask & (info.k_pos <= info.q_pos)
            if key_valid is not None:
                mask = mask & key_valid.view(bsz, 1, 1, sk)
            mask = mask.expand(scores.shape)
            weights = normalize(scores.masked_fill(~mask, float("-inf")), mask, info)
            return torch.matmul(weights.to(vf.dtype), vf)

        outs.append(maybe_checkpoint(chunk, use_checkpoint, qh[:, :, q0:q1], kh, vh))
    return torch.cat(outs, dim=2)


def _layout_rows(
    qh: torch.Tensor,
    kh: torch.Tensor,
    vh: torch.Tensor,
    normalize: Normalizer,
    layout: BlockSparseLayout,
    scale: float,
    causal: bool,
    key_valid: torch.Tensor | None,
    chunk_size: int | None,
    use_checkpoint: bool,
) -> torch.Tensor:
    bsz, heads, sq, dim = qh.shape
    sk, dim_v = kh.shape[2], vh.shape[-1]  # v may have its own head dim
    device = qh.device
    if not isinstance(layout, BlockSparseLayout):
        raise TypeError(f"layout must be a BlockSparseLayout or None, got {type(layout).__name__}")
    if layout.seq_len_q != sq or layout.seq_len_k != sk:
        raise ValueError(
            f"layout was built for seq_len_q={layout.seq_len_q}, seq_len_k={layout.seq_len_k}; "
            f"got {sq} queries and {sk} keys"
        )
    lb, lh = layout.layout_shape
    if lb not in (1, bsz) or lh not in (1, heads):
        raise ValueError(f"layout_shape {layout.layout_shape} must be (1 or {bsz}, 1 or {heads})")
    layout = layout.to(device)
    bq, bk = layout.block_size
    nqb = layout.num_query_blocks
    flat_crow = layout.crow_indices.to(torch.int64)
    starts = flat_crow[:-1].view(lb, lh, nqb)
    counts = (flat_crow[1:] - flat_crow[:-1]).view(lb, lh, nqb)
    col = layout.col_indices.to(torch.int64)
    # Row widths decide the chunk shapes on the host: read them from the layout's (cached) CPU copy,
    # so a device layout costs one copy in its lifetime rather than a sync per chunk and call.
    host_counts = layout.to("cpu").row_counts().view(lb, lh, nqb)
    max_row_keys = int(host_counts.max()) * bk if host_counts.numel() else 0
    rows = auto_rows(chunk_size, bsz * heads * bq * max(1, max_row_keys), nqb)
    if sq < nqb * bq:  # pad the queries to whole blocks; padded rows are masked and cut off
        qh = torch.cat([qh, qh.new_zeros(bsz, heads, nqb * bq - sq, dim)], dim=2)
    outs = []
    for index, g0 in enumerate(range(0, nqb, rows)):
        g1 = min(nqb, g0 + rows)
        cnt = counts[:, :, g0:g1]  # [lb, lh, G]
        width = int(host_counts[:, :, g0:g1].max()) if cnt.numel() else 0
        if width == 0:
            outs.append(vh.new_zeros(bsz, heads, (g1 - g0) * bq, dim_v))
            continue
        slot = torch.arange(width, device=device)
        slot_ok = slot < cnt.unsqueeze(-1)  # [lb, lh, G, width]
        entry = (starts[:, :, g0:g1].unsqueeze(-1) + slot).clamp_max(max(col.numel() - 1, 0))
        blocks = torch.where(slot_ok, col[entry], torch.zeros_like(entry))
        keys = (blocks.unsqueeze(-1) * bk + torch.arange(bk, device=device)).flatten(-2)  # [lb, lh, G, W]
        key_ok = slot_ok.repeat_interleave(bk, dim=-1) & (keys < sk)
        keys = torch.where(key_ok, keys, torch.zeros_like(keys))
        keys = keys.expand(bsz, heads, -1, -1)
        key_ok = key_ok.expand(bsz, heads, -1, -1)
        if key_valid is not None:
            kv = key_valid.view(bsz, 1, sk).expand(bsz, heads, sk)
            key_ok = key_ok & torch.gather(kv, 2, keys.flatten(2)).view(keys.shape)
        q_pos = torch.arange(g0 * bq, g1 * bq, device=device).view(g1 - g0, bq, 1)
        info = RowInfo(q_pos=q_pos, k_pos=keys.unsqueeze(-2), heads_dim=1, chunk=index)

        def chunk(qc: torch.Tensor, kf: torch.Tensor, vf: torch.Tensor, info: RowInfo = info,
                  keys: torch.Tensor = keys, key_ok: torch.Tensor = key_ok) -> torch.Tensor:
            n_rows, width_tokens = keys.shape[2], keys.shape[3]
            flat_keys = keys.flatten(2).unsqueeze(-1)
            kg = torch.gather(kf, 2, flat_keys.expand(-1, -1, -1, dim)).view(bsz, heads, n_rows, width_tokens, dim)
            vg = torch.gather(vf, 2, flat_keys.expand(-1, -1, -1, dim_v)).view(
                bsz, heads, n_rows, width_tokens, dim_v)
            qg = qc.view(bsz, heads, n_rows, bq, dim)
            scores = torch.matmul(qg, kg.transpose(-1, -2)) * scale  # [B, H, G, bq, W]
            mask = key_ok.unsqueeze(-2) & (info.q_pos < sq)
            if causal:
                mask = mask & (info.k_pos <= info.q_pos)
            mask = mask.expand(scores.shape)
            weights = normalize(scores.masked_fill(~mask, float("-inf")), mask, info)
            return torch.matmul(weights.to(vg.dtype), vg).view(bsz, heads, n_rows * bq, dim_v)

        outs.append(maybe_checkpoint(chunk, use_checkpoint, qh[:, :, g0 * bq : g1 * bq], kh, vh))
    return torch.cat(outs, dim=2)[:, :, :sq]
