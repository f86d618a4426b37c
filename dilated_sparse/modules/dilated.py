"""LongNet dilated attention (``DilatedAttention``, ``MultiheadDilatedAttention``) as one layout.

LongNet (Ding et al., 2023) splits the sequence into segments of ``w_i`` tokens and keeps every
``r_i``-th position of a segment, with a per-head offset so the heads together cover every
position. Here the branches are expressed as a per-head block layout built by
:func:`dilated_sparse.patterns.dilated_sparse` (``different_layout_per_head=True``) and computed
in one call of the block-sparse op: no gather or scatter of q/k/v.

The exact rule, with blocks of ``block_size`` tokens in place of LongNet's tokens: in branch
``i`` with segments of ``w_i // block_size`` blocks (at least one) starting at block ``a``,
head ``h`` lets query block ``p`` see key block ``p'`` of the same segment iff
``(p - a) % r_i == (p' - a) % r_i == h % r_i``. The branches are combined by one softmax over
the union of the keys they allow (LongNet's denominator-weighted sum of branch outputs counts a
key allowed by two branches twice; here it counts once, which is the same when the branches'
keys are disjoint). A query block that no branch selects for a head gets output 0 for that head
(as in LongNet, where such positions are not attended by that head group). Sequence lengths need
not be multiples of the segment lengths or the block: the last segment/block is partial.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Any

import torch
from torch import nn

from ..layout import BlockSparseLayout
from ._common import check_dropout, check_segments
from .block_sparse import BlockSparseAttentionBase

__all__ = ["DilatedAttention", "MultiheadDilatedAttention"]


def _check_segments(segment_lengths: Sequence[int], dilation_rates: Sequence[int]) -> tuple[list[int], list[int]]:
    segs, rates = check_segments(segment_lengths, dilation_rates)
    if segs is None or rates is None:
        raise TypeError("segment_lengths and dilation_rates are required (lists of ints)")
    if not segs:
        raise ValueError("segment_lengths must not be empty")
    for name, values in (("segment_lengths", segs), ("dilation_rates", rates)):
        for value in values:
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must hold positive ints, got {values}")
    return segs, rates


class DilatedAttention(BlockSparseAttentionBase):
    """LongNet dilated attention over ``[B, S, H, D]`` inputs, computed by the block-sparse op.

    Args:
        segment_lengths: segment length per branch, in tokens.
        dilation_rates: dilation per branch, in blocks.
        block_size: block edge in tokens (16, 32, 64, 128, 256): LongNet's unit of dilation.
        softmax_scale: score scale (default ``1 / sqrt(head_dim)``).
        attention_dropout: dropout on the attention probabilities in training mode.
        mixed_precision, enable_caching: see :class:`BlockSparseAttentionBase`.

    ``forward(query, key, value, is_causal=False, return_attention_weights=False,
    key_padding_mask=None)``; the layout has one slice per head (``layout_heads = H``).
    """

    def __init__(
        self,
        segment_lengths: Sequence[int],
        dilation_rates: Sequence[int],
        softmax_scale: float | None = None,
        attention_dropout: float = 0.0,
        *,
        block_size: int = 64,
        mixed_precision: Any = False,
        enable_caching: bool = True,
    ) -> None:
        super().__init__(dropout=attention_dropout, softmax_scale=softmax_scale, mixed_precision=mixed_precision,
                         enable_caching=enable_caching)
        self.segment_lengths, self.dilation_rates = _check_segments(segment_lengths, dilation_rates)
        from ..layout import SUPPORTED_BLOCK_SIZES

        if block_size not in SUPPORTED_BLOCK_SIZES:
            raise ValueError(f"block_size must be one of {SUPPORTED_BLOCK_SIZES}, got {block_size!r}")
        self.block_size = block_size

    def _layout_key(self) -> Hashable:
        return (tuple(self.segment_lengths), tuple(self.dilation_rates), self.block_size)

    def _build_layout(
        self, seq_len_q: int, seq_len_k: int, *, causal: bool, num_heads: int, device: torch.device
    ) -> BlockSparseLayout:
        from ..patterns import dilated_sparse

        return dilated_sparse(
            seq_len_q=seq_len_q, seq_len_k=seq_len_k, block_size=self.block_size,
            segment_lengths=self.segment_lengths, dilation_rates=self.dilation_rates,
            num_heads=num_heads, different_layout_per_head=True, causal=causal, device=device,
        )

    def extra_repr(self) -> str:
        return (f"segment_lengths={self.segment_lengths}, dilation_rates={self.dilation_rates}, "
                f"block_size={self.block_size}, dropout={self.dropout}")


class MultiheadDilatedAttention(nn.Module):
    """LongNet multi-head dilated attention: projections + :class:`DilatedAttention` + output.

    Args:
        embed_dim, num_heads: model width and heads (``embed_dim % num_heads == 0``).
        dilation_rates, segment_lengths: LongNet branches (see :class:`DilatedAttention`).
        dropout: attention-probability dropout in training mode.
        bias: biases of the projections.
        layer_norm: MAGNETO's sub-LayerNorm on the attention output before ``out_proj``.
        layer_norm_eps: its epsilon.
        gamma_init: MAGNETO's init gain for ``v_proj`` and ``out_proj`` (xavier normal).
        batch_first: inputs ``[B, S, E]`` (default) or ``[S, B, E]``.
        block_size: LongNet's unit of dilation in tokens.
        device, dtype: of the parameters.

    ``forward(query, key, value, is_causal=False, key_padding_mask=None, need_weights=False)``
    returns ``(out, weights_dict or None)``.
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        dilation_rates: Sequence[int],
        segment_lengths: Sequence[int],
        dropout: float = 0.0,
        bias: bool = True,
        layer_norm: bool = True,
        layer_norm_eps: float = 1e-5,
        gamma_init: float = 1.0,
        batch_first: bool = True,
        *,
        block_size: int = 64,
        device: Any = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})")
        self.embed_dim, self.num_heads = embed_dim, num_heads
        self.head_dim = embed_dim // num_heads
        self.batch_first = batch_first
        self.gamma_init = gamma_init
        check_dropout(dropout)
        factory = {"device": device, "dtype": dtype}
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        self.k_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        self.v_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        self.attention = DilatedAttention(segment_lengths, dilation_rates, attention_dropout=dropout,
                                          block_size=block_size)
        self.norm = nn.LayerNorm(embed_dim, eps=layer_norm_eps, **factory) if layer_norm else None
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        nn.init.xavier_normal_(self.q_proj.weight)
        nn.init.xavier_normal_(self.k_proj.weight)
        nn.init.xavier_normal_(self.v_proj.weight, gain=self.gamma_init)
        nn.init.xavier_normal_(self.out_proj.weight, gain=self.gamma_init)
        for lin in (self.q_proj, self.k_proj, self.v_proj, self.out_proj):
            if lin.bias is not None:
                nn.init.zeros_(lin.bias)

    def get_pattern_stats(self, seq_len: int, **kwargs: Any) -> dict[str, Any]:
        """Layout statistics (see :meth:`BlockSparseAttentionBase.get_pattern_stats`)."""
        kwargs.setdefault("num_heads", self.num_heads)
        return self.attention.get_pattern_stats(seq_len, **kwargs)

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        is_causal: bool = False,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = False,
    ) -> tuple[torch.Tensor, dict[str, Any] | None]:
        """Multi-head LongNet attention; returns ``(out, weights_dict or None)``."""
        if not self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        bsz, sq, _ = query.shape
        sk = key.shape[1]
        q = self.q_proj(query).view(bsz, sq, self.num_heads, self.head_dim)
        k = self.k_proj(key).view(bsz, sk, self.num_heads, self.head_dim)
        v = self.v_proj(value).view(bsz, sk, self.num_heads, self.head_dim)
        result = self.attention(q, k, v, is_causal=is_causal, return_attention_weights=need_weights,
                                key_padding_mask=key_padding_mask)
        out, weights = result if need_weights else (result, None)
        out = out.reshape(bsz, sq, self.embed_dim)
        if self.norm is not None:
            out = self.norm(out)
        out = self.out_proj(out)
        if not self.batch_first:
            out = out.transpose(0, 1)
        return out, weights

