"""OpenAI Sparse Transformer attention modes ``all``, ``local`` and ``strided`` (Child et al., 2019).

The original ``attn_mode`` masks are token-level and always causal; here each is the exact block
cover of its token rule, bidirectional unless ``causal=True`` (pass it for the original
behaviour). ``local_attn_ctx`` is in tokens; ``blocksize`` is accepted as the original's name for
``block_size``.
"""

from __future__ import annotations

import torch

from ..layout import BlockSparseLayout
from ._core import (
    BlockSize,
    DeviceLike,
    Geometry,
    block_range,
    check_bool,
    check_int,
    expand_ranges,
    make_geometry,
    resolve_alias,
    token_span_to_blocks,
)
from .basic import dense
from .registry import register_pattern

__all__ = ["sparse_transformer_all", "sparse_transformer_local", "sparse_transformer_strided"]


def _geometry(
    seq_len_q: int, seq_len_k: int | None, block_size: BlockSize | None, blocksize: BlockSize | None,
    device: DeviceLike,
) -> Geometry:
    bs = resolve_alias(("block_size", "blocksize"), (block_size, blocksize))
    if bs is None:
        raise TypeError("block_size= (or blocksize=) is required")
    return make_geometry(seq_len_q, seq_len_k, bs, device)  # type: ignore[arg-type]


def _context_geometry(
    seq_len_q: int, seq_len_k: int | None, block_size: BlockSize | None, blocksize: BlockSize | None,
    device: DeviceLike, causal: bool, local_attn_ctx: int,
) -> tuple[Geometry, bool, int]:
    """``(geometry, causal, local_attn_ctx)`` checked, for the ``local`` and ``strided`` modes."""
    geom = _geometry(seq_len_q, seq_len_k, block_size, blocksize, device)
    return geom, check_bool("causal", causal), check_int("local_attn_ctx", local_attn_ctx, minimum=1)


@register_pattern("all", aliases=("sparse_transformer_all",))
def sparse_transformer_all(
    *,
    seq_len_q: int,
    seq_len_k: int | None = None,
    block_size: BlockSize | None = None,
    blocksize: BlockSize | None = None,
    local_attn_ctx: int | None = None,
    causal: bool = False,
    device: DeviceLike = None,
) -> BlockSparseLayout:
    """``attn_mode='all'``: dense attention. ``local_attn_ctx`` is accepted and unused, as in
    the original API (it only matters for ``local`` and ``strided``)."""
    geom = _geometry(seq_len_q, seq_len_k, block_size, blocksize, device)
    if local_attn_ctx is not None:
        check_int("local_attn_ctx", local_attn_ctx, minimum=1)
    return dense(seq_len_q=geom.seq_len_q, seq_len_k=geom.seq_len_k, block_size=geom.block_size,
                 causal=causal, device=geom.device)


@register_pattern("local", aliases=("sparse_transformer_local",))
def sparse_transformer_local(
    *,
    seq_len_q: int,
    seq_len_k: int | None = None,
    block_size: BlockSize | None = None,
    blocksize: BlockSize | None = None,
    local_attn_ctx: int,
    causal: bool = False,
    device: DeviceLike = None,
) -> BlockSparseLayout:
    """``attn_mode='local'``: query ``i`` sees keys with ``|i - j| < local_attn_ctx``
    (causal: the last ``local_attn_ctx`` positions ``i - ctx < j <= i``)."""
    geom, causal, ctx = _context_geometry(seq_len_q, seq_len_k, block_size, blocksize, device, causal, local_attn_ctx)
    rows = geom.arange_q()
    r, c = token_span_to_blocks(geom, rows, geom.q_start() - (ctx - 1), geom.q_end() + (ctx - 1))
    return geom.build(r, c, causal=causal)


@register_pattern("strided", aliases=("sparse_transformer_strided",))
def sparse_transformer_strided(
    *,
    seq_len_q: int,
    seq_len_k: int | None = None,
    block_size: BlockSize | None = None,
    blocksize: BlockSize | None = None,
    local_attn_ctx: int,
    causal: bool = False,
    device: DeviceLike = None,
) -> BlockSparseLayout:
    """``attn_mode='strided'``: query ``i`` sees keys with ``(i - j) % local_attn_ctx == 0``.

    A block pair is kept iff some ``i - j`` between them is a multiple of the stride, i.e. key
    blocks overlapping the query block shifted by ``m * local_attn_ctx`` tokens for some ``m``.
    With a stride not larger than a block, rows are (almost) dense.
    """
    geom, causal, ctx = _context_geometry(seq_len_q, seq_len_k, block_size, blocksize, device, causal, local_attn_ctx)
    rows = geom.arange_q()
    qs, qe = geom.q_start(), geom.q_end()
    if ctx <= max(geom.block_q, geom.block_k):
        # Nearly every block qualifies: test every allowed block exactly (output is ~dense).
        r, c = block_range(rows, torch.zeros_like(rows), geom.row_limit(causal))
        ks = c * geom.block_k
        ke = torch.clamp(ks + geom.block_k, max=geom.seq_len_k) - 1
        lo, hi = qs[r] - ke, qe[r] - ks  # the differences i - j spanned by the block pair
        keep = torch.div(hi, ctx, rounding_mode="floor") * ctx >= lo
        return geom.build(r[keep], c[keep], causal=causal)
    # Otherwise enumerate the shifts m with the shifted query block inside [0, Sk).
    m_lo = -torch.div(geom.seq_len_k - 1 - qs, ctx, rounding_mode="floor")
    if causal:
        m_lo = torch.clamp(m_lo, min=0)
    m_hi = torch.div(qe, ctx, rounding_mode="floor")
    r, m, _ = expand_ranges(rows, m_lo, m_hi - m_lo + 1)
    r, c = token_span_to_blocks(geom, r, qs[r] - m * ctx, qe[r] - m * ctx)
    return geom.build(r, c, causal=causal)
