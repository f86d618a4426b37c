"""``BlockSparseRingDilatedAttention`` (the guides' base module) and the shared base class.

Inputs are ``[B, S, H, D]`` tensors (``q``; ``k``/``v`` may have fewer heads, GQA). The layout
comes from a :class:`~dilated_sparse.configs.SparsePatternConfig` through
:mod:`dilated_sparse.patterns`, is cached per (sequence lengths, device, causal, heads, config)
and the attention runs through :func:`dilated_sparse.ops.block_sparse_attention`.

On "ring": the guides' name is kept, but on one process this module is plain block-sparse
attention; the ring over devices is :mod:`dilated_sparse.distributed` (the ``'distributed'``
kind of :func:`~dilated_sparse.modules.create_block_sparse_attention`).
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from typing import Any

import torch
from torch import nn

from ..configs import SparsePatternConfig
from ..layout import BlockSparseLayout
from ..ops import _check_causal, _check_tensor, block_sparse_attention
from ._common import (
    LayoutCache,
    check_dropout,
    check_segments,
    check_segments_used,
    check_use_memory_pool,
    pattern_stats,
    resolve_mixed_precision,
    visualize_layout,
)
from ._dropout import dropout_block_sparse_attention

__all__ = ["BlockSparseAttentionBase", "BlockSparseRingDilatedAttention", "BlockSparseRingDilatedAttentionV2"]


def _check_qkv(q: Any, k: Any, v: Any) -> None:
    """The op's tensor checks (type, float dtype, 4-D), before their shapes pick a layout."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        _check_tensor(name, t)


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: BlockSparseLayout,
    *,
    training: bool,
    dropout: float,
    compute_dtype: torch.dtype | None,
    scale: float | None,
    causal: bool,
    window: tuple[int | None, int | None] | None = None,
    key_padding_mask: torch.Tensor | None = None,
    return_attention_weights: bool = False,
) -> Any:
    """The modules' attention call: the op, or the dropout path when ``training`` with ``dropout > 0``.

    With ``compute_dtype`` set, float32 ``q``/``k``/``v`` are cast to it for the attention and the
    output is cast back to ``q``'s dtype. Returns ``out`` or ``(out, weights_dict)``.
    """
    out_dtype = q.dtype
    if compute_dtype is not None and q.dtype == torch.float32:
        q, k, v = (t.to(compute_dtype) for t in (q, k, v))
    if training and dropout > 0.0:
        result = dropout_block_sparse_attention(
            q, k, v, layout, dropout_p=dropout, scale=scale, causal=causal, window=window,
            key_padding_mask=key_padding_mask, return_attention_weights=return_attention_weights,
        )
    else:
        result = block_sparse_attention(
            q, k, v, layout, scale=scale, causal=causal, window=window,
            key_padding_mask=key_padding_mask, return_attention_weights=return_attention_weights,
        )
    if return_attention_weights:
        out, weights = result
        return out.to(out_dtype), weights
    return result.to(out_dtype)


class BlockSparseAttentionBase(nn.Module):
    """Base of the ``[B, S, H, D]`` modules: layout cache, attention call, pattern statistics.

    Subclasses implement :meth:`_build_layout` (through :mod:`dilated_sparse.patterns`) and may
    extend :meth:`_layout_key` with whatever else shapes the layout.

    Args:
        dropout: dropout on the attention probabilities in training mode (see
            :mod:`dilated_sparse.modules._dropout`: that path runs in PyTorch over the active
            blocks; eval mode and ``dropout=0`` use the compiled op).
        softmax_scale: score scale, default ``1 / sqrt(head_dim)``.
        mixed_precision: ``True`` (bfloat16), ``torch.float16`` or ``torch.bfloat16``: q, k, v
            are cast to that dtype for the attention and the output is cast back; ``False``
            computes in the input dtype.
        use_memory_pool: accepted for the guides; ``True`` is what always happens (layouts
            cached, tensors from PyTorch's caching allocator), ``False`` raises.
        enable_caching: keep built layouts (per lengths, device, causal, heads, config).
        cache_size: how many layouts to keep.
    """

    def __init__(
        self,
        *,
        dropout: float = 0.0,
        softmax_scale: float | None = None,
        mixed_precision: Any = False,
        use_memory_pool: bool = True,
        enable_caching: bool = True,
        cache_size: int = 32,
    ) -> None:
        super().__init__()
        self.dropout = check_dropout(dropout)
        if softmax_scale is not None and (isinstance(softmax_scale, bool) or not isinstance(softmax_scale, (int, float))
                                          or not math.isfinite(softmax_scale)):
            raise TypeError(f"softmax_scale must be a finite float or None, got {softmax_scale!r}")
        self.softmax_scale = softmax_scale
        self.compute_dtype = resolve_mixed_precision(mixed_precision)
        check_use_memory_pool(use_memory_pool)
        if not isinstance(enable_caching, bool):
            raise TypeError(f"enable_caching must be a bool, got {enable_caching!r}")
        self._layout_cache = LayoutCache(cache_size, enabled=enable_caching)

    # ------------------------------------------------------------------ layouts
    def _build_layout(
        self, seq_len_q: int, seq_len_k: int, *, causal: bool, num_heads: int, device: torch.device
    ) -> BlockSparseLayout:
        raise NotImplementedError

    def _layout_key(self) -> Hashable:
        """What, besides lengths/device/causal/heads, shapes the layout (part of the cache key)."""
        return ()

    def get_layout(
        self,
        seq_len_q: int,
        seq_len_k: int | None = None,
        *,
        causal: bool = False,
        num_heads: int = 1,
        device: torch.device | str | None = None,
    ) -> BlockSparseLayout:
        """The (cached) layout used for these sizes."""
        seq_len_k = seq_len_q if seq_len_k is None else seq_len_k
        dev = torch.device("cpu") if device is None else torch.device(device)
        causal = _check_causal(causal)
        key = (seq_len_q, seq_len_k, str(dev), causal, num_heads, self._layout_key())
        return self._layout_cache.get(
            key, lambda: self._build_layout(seq_len_q, seq_len_k, causal=causal, num_heads=num_heads, device=dev)
        )

    def clear_layout_cache(self) -> None:
        """Drop the cached layouts (they are rebuilt on the next call)."""
        self._layout_cache.clear()

    def get_pattern_stats(
        self,
        seq_len: int,
        *,
        seq_len_k: int | None = None,
        causal: bool = False,
        batch_size: int = 1,
        num_heads: int = 1,
        dtype: torch.dtype = torch.float32,
    ) -> dict[str, Any]:
        """Statistics of the layout for ``seq_len`` (see :func:`~dilated_sparse.modules._common.pattern_stats`):
        ``sparsity``, ``density``, ``nnz_blocks``, ``blocks_per_row_min/mean/max``, ``layout_bytes``,
        ``weights_bytes`` (for ``batch_size x num_heads`` in ``dtype``), ...
        """
        layout = self.get_layout(seq_len, seq_len_k, causal=causal, num_heads=num_heads)
        return pattern_stats(layout, batch_size=batch_size, num_heads=num_heads, dtype=dtype)

    def visualize_pattern(self, seq_len: int, *, causal: bool = False, num_heads: int = 1, max_blocks: int = 32) -> str:
        """ASCII picture of the layout for ``seq_len`` (head 0), with its sparsity."""
        return visualize_layout(self.get_layout(seq_len, causal=causal, num_heads=num_heads), max_blocks)

    # ---------------------------------------------------------------- attention
    def _attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        layout: BlockSparseLayout,
        *,
        causal: bool,
        key_padding_mask: torch.Tensor | None = None,
        return_attention_weights: bool = False,
        window: tuple[int | None, int | None] | None = None,
    ) -> Any:
        """Attention over ``layout``: the op, or the dropout path when training with dropout."""
        return attend(
            q, k, v, layout, training=self.training, dropout=self.dropout, compute_dtype=self.compute_dtype,
            scale=self.softmax_scale, causal=causal, window=window, key_padding_mask=key_padding_mask,
            return_attention_weights=return_attention_weights,
        )

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        is_causal: bool = False,
        return_attention_weights: bool = False,
        key_padding_mask: torch.Tensor | None = None,
    ) -> Any:
        """Attention of ``q`` ``[B, Sq, H, D]`` over ``k``, ``v`` ``[B, Sk, Hkv, D]``.

        Args:
            is_causal: key position <= query position (top-left aligned).
            return_attention_weights: also return the sparse weights dict (DESIGN.md section 4).
            key_padding_mask: bool ``[B, Sk]``, True = padding.

        Returns:
            ``out`` ``[B, Sq, H, D]``, or ``(out, weights_dict)``.
        """
        _check_qkv(q, k, v)
        is_causal = _check_causal(is_causal, "is_causal")
        layout = self.get_layout(q.shape[1], k.shape[1], causal=is_causal, num_heads=q.shape[2], device=q.device)
        return self._attend(q, k, v, layout, causal=is_causal, key_padding_mask=key_padding_mask,
                            return_attention_weights=return_attention_weights)


_CONFIG_OVERRIDES = ("pattern_type", "sparsity_ratio", "block_size", "local_window_size", "window_size",
                     "global_tokens", "pattern_options")


class BlockSparseRingDilatedAttention(BlockSparseAttentionBase):
    """Block-sparse attention with a named pattern (the guides' ``BlockSparseRingDilatedAttention``).

    Args:
        segment_lengths: LongNet segment lengths in tokens for the ``dilated_sparse`` pattern
            (used when ``sparse_config.segment_lengths`` is unset). Sequences need not be
            multiples of them.
        dilation_rates: dilation per segment (in blocks; see
            :func:`dilated_sparse.patterns.dilated_sparse`).
        sparse_config: the pattern (default ``SparsePatternConfig()``: ``dilated_sparse`` at
            ``sparsity_ratio=0.1``, i.e. 10 % of the blocks computed). The module keeps this
            object: changing its fields later (e.g. ``sparse_config.sparsity_ratio = 0.2``, as
            :class:`~dilated_sparse.modules.ProgressiveSparsityScheduler` does) changes the
            layout used from the next call on.
        pattern_type, sparsity_ratio, block_size, local_window_size (alias window_size),
            global_tokens, pattern_options: shortcuts that set those fields of the config.
        dropout, softmax_scale, mixed_precision, use_memory_pool, enable_caching, cache_size:
            see :class:`BlockSparseAttentionBase`.

    ``forward(q, k, v, is_causal=False, return_attention_weights=False, key_padding_mask=None)``
    with ``q`` ``[B, Sq, H, D]`` and ``k``/``v`` ``[B, Sk, Hkv, D]`` returns ``out`` or
    ``(out, weights_dict)``.
    """

    def __init__(
        self,
        segment_lengths: Sequence[int] | None = None,
        dilation_rates: Sequence[int] | None = None,
        sparse_config: SparsePatternConfig | None = None,
        *,
        dropout: float = 0.0,
        softmax_scale: float | None = None,
        mixed_precision: Any = False,
        use_memory_pool: bool = True,
        enable_caching: bool | None = None,
        cache_size: int = 32,
        **config_overrides: Any,
    ) -> None:
        unknown = sorted(set(config_overrides) - set(_CONFIG_OVERRIDES))
        if unknown:
            valid = sorted(["segment_lengths", "dilation_rates", "sparse_config", "dropout", "softmax_scale",
                            "mixed_precision", "use_memory_pool", "enable_caching", "cache_size",
                            *_CONFIG_OVERRIDES])
            raise TypeError(f"{type(self).__name__} got unknown option(s) {unknown}; valid options are {valid}")
        if sparse_config is None:
            sparse_config = SparsePatternConfig(**config_overrides)
        elif not isinstance(sparse_config, SparsePatternConfig):
            raise TypeError(f"sparse_config must be a SparsePatternConfig, got {type(sparse_config).__name__}")
        elif config_overrides:
            sparse_config = sparse_config.replace(**config_overrides)
        if enable_caching is None:
            enable_caching = sparse_config.enable_caching
        super().__init__(dropout=dropout, softmax_scale=softmax_scale, mixed_precision=mixed_precision,
                         use_memory_pool=use_memory_pool, enable_caching=enable_caching, cache_size=cache_size)
        self.sparse_config = sparse_config
        self.segment_lengths, self.dilation_rates = check_segments(segment_lengths, dilation_rates)
        self._check_segments_used()

    def _check_segments_used(self) -> None:
        check_segments_used(self.sparse_config.pattern_type, self.segment_lengths, self.dilation_rates)

    @property
    def block_size(self) -> int:
        """The config's block size."""
        return self.sparse_config.block_size

    def _layout_key(self) -> Hashable:
        return (self.sparse_config.fingerprint(), tuple(self.segment_lengths or ()), tuple(self.dilation_rates or ()))

    def _get_sparse_block_indices(
        self, num_blocks: int, num_heads: int, device: torch.device | str | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The guides' customisation hook: ``(row_indices, col_indices)`` of the active blocks.

        The default returns the blocks of the config's pattern for ``num_blocks`` blocks of
        ``block_size`` tokens (a shared layout). A subclass that overrides this method defines
        the layout instead of the config (for equal query and key lengths; lengths that are not a
        multiple of the block use ``ceil(seq_len / block_size)`` blocks, the last one partial).
        """
        layout = self.sparse_config.make_layout(
            num_blocks * self.sparse_config.block_size, device=device,
            segment_lengths=self.segment_lengths, dilation_rates=self.dilation_rates,
        )
        if layout.num_slices != 1:
            raise ValueError("_get_sparse_block_indices describes one shared layout; this config builds per-head ones")
        return layout.row_ids(), layout.col_indices.to(torch.int64)

    def _build_layout(
        self, seq_len_q: int, seq_len_k: int, *, causal: bool, num_heads: int, device: torch.device
    ) -> BlockSparseLayout:
        if type(self)._get_sparse_block_indices is not BlockSparseRingDilatedAttention._get_sparse_block_indices:
            if seq_len_q != seq_len_k:
                raise ValueError("a _get_sparse_block_indices override describes square layouts; got "
                                 f"seq_len_q={seq_len_q} != seq_len_k={seq_len_k}")
            block = self.sparse_config.block_size
            rows, cols = self._get_sparse_block_indices(-(-seq_len_q // block), num_heads, device)
            return BlockSparseLayout.from_coo(torch.as_tensor(rows, device=device), torch.as_tensor(cols, device=device),
                                              block_size=block, seq_len_q=seq_len_q, seq_len_k=seq_len_k)
        self._check_segments_used()
        return self.sparse_config.make_layout(
            seq_len_q, seq_len_k, causal=causal, num_heads=num_heads, device=device,
            segment_lengths=self.segment_lengths, dilation_rates=self.dilation_rates,
        )

    def extra_repr(self) -> str:
        return (f"pattern={self.sparse_config.pattern_type!r}, sparsity_ratio={self.sparse_config.sparsity_ratio}, "
                f"block_size={self.sparse_config.block_size}, segment_lengths={self.segment_lengths}, "
                f"dilation_rates={self.dilation_rates}, dropout={self.dropout}")


#: The guides' V2 name: the same module (it already returns sparse weights dicts).
BlockSparseRingDilatedAttentionV2 = BlockSparseRingDilatedAttention
