"""Fixed-pattern sparse attention through the block-sparse kernel (block-neighbour, BigBird, LongNet).

The patterns themselves live in :mod:`dilated_sparse.patterns` (the one source of layouts); this
module only builds the layout for the sequence at hand and runs
:func:`dilated_sparse.block_sparse_attention` on it:

* :func:`block_neighbour_attention` -- every query block attends to key blocks ``i-1, i, i+1``
  (blockwise local attention, as in the local part of Child et al., "Generating Long Sequences
  with Sparse Transformers", 2019, and Beltagy et al., "Longformer", 2020).
* :func:`bigbird_attention` -- Zaheer et al., "Big Bird: Transformers for Longer Sequences"
  (NeurIPS 2020): global + sliding-window + random blocks.
* :func:`dilated_attention` -- Ding et al., "LongNet: Scaling Transformers to 1,000,000,000
  Tokens" (2023): segments x dilation rates, at block granularity.
* :func:`pattern_attention` -- any registered pattern by name
  (:func:`dilated_sparse.patterns.available_patterns`).

Memory and time are ``O(nnz x block_q x block_k)``: no ``S x S`` tensor is made.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..layout import BlockSparseLayout
from ..ops import block_sparse_attention
from ..patterns import make_layout
from ._common import check_qkv

__all__ = ["bigbird_attention", "block_neighbour_attention", "dilated_attention", "pattern_attention"]


def pattern_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pattern: Any,
    *,
    block_size: int | Sequence[int] = 64,
    causal: bool = False,
    scale: float | None = None,
    window: Any = None,
    key_lengths: torch.Tensor | None = None,
    key_padding_mask: torch.Tensor | None = None,
    return_layout: bool = False,
    **pattern_options: Any,
) -> Any:
    """Block-sparse attention over the layout of a named pattern.

    Args:
        q: ``[B, Sq, H, D]``; k, v: ``[B, Sk, Hkv, D]``.
        pattern: a pattern name (``"bigbird"``, ``"dilated_sparse"``, ...), a spec accepted by
            :func:`dilated_sparse.patterns.make_layout`, or a ready
            :class:`~dilated_sparse.BlockSparseLayout`.
        block_size: ``block`` or ``(block_q, block_k)`` (ignored for a ready layout).
        causal: passed to the pattern (blocks wholly in the future are dropped) and to the kernel
            (token-level causal rule).
        scale, window, key_lengths, key_padding_mask: as
            :func:`dilated_sparse.block_sparse_attention`.
        return_layout: also return the layout used.
        **pattern_options: the pattern's own options (e.g. ``num_random_blocks``).

    Returns:
        ``out`` ``[B, Sq, H, D]`` or ``(out, layout)``.
    """
    _, sq, sk, _, _, _ = check_qkv(q, k, v)
    if isinstance(pattern, BlockSparseLayout):
        if pattern_options:
            raise TypeError(f"pattern options {sorted(pattern_options)} cannot be applied to a ready layout")
        layout = make_layout(pattern, seq_len_q=sq, seq_len_k=sk)
    else:
        layout = make_layout(
            pattern, seq_len_q=sq, seq_len_k=sk, block_size=block_size, causal=causal, device=q.device,
            **pattern_options,
        )
    out = block_sparse_attention(
        q, k, v, layout, scale=scale, causal=causal, window=window, key_lengths=key_lengths,
        key_padding_mask=key_padding_mask,
    )
    return (out, layout) if return_layout else out


def block_neighbour_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    block_size: int | Sequence[int] = 64,
    radius: int = 1,
    causal: bool = False,
    **options: Any,
) -> Any:
    """Block-neighbour attention: query block ``i`` sees key blocks ``i - radius .. i + radius``.

    Layout from :func:`dilated_sparse.patterns.block_neighbour`; other keyword arguments as
    :func:`pattern_attention`.
    """
    return pattern_attention(q, k, v, "block_neighbour", block_size=block_size, causal=causal, radius=radius,
                             **options)


def bigbird_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    block_size: int | Sequence[int] = 64,
    num_global_blocks: int = 1,
    num_sliding_window_blocks: int = 3,
    num_random_blocks: int = 1,
    seed: int = 0,
    causal: bool = False,
    **options: Any,
) -> Any:
    """BigBird attention (Zaheer et al., NeurIPS 2020) through the block-sparse kernel.

    Layout from :func:`dilated_sparse.patterns.bigbird` (global, window and seeded random
    blocks); other keyword arguments as :func:`pattern_attention`.
    """
    return pattern_attention(
        q, k, v, "bigbird", block_size=block_size, causal=causal, num_global_blocks=num_global_blocks,
        num_sliding_window_blocks=num_sliding_window_blocks, num_random_blocks=num_random_blocks, seed=seed,
        **options,
    )


def dilated_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    block_size: int | Sequence[int] = 64,
    segment_lengths: Sequence[int] | None = None,
    dilation_rates: Sequence[int] | None = None,
    causal: bool = False,
    **options: Any,
) -> Any:
    """LongNet dilated attention (Ding et al., 2023) at block granularity, through the kernel.

    Layout from :func:`dilated_sparse.patterns.dilated_sparse`; other keyword arguments as
    :func:`pattern_attention`.
    """
    return pattern_attention(
        q, k, v, "dilated_sparse", block_size=block_size, causal=causal, segment_lengths=segment_lengths,
        dilation_rates=dilation_rates, **options,
    )
