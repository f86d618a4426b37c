"""``BlockSparseHierarchical``: multi-level windows (fine local, coarse wide/global) as one layout.

The layout is :func:`dilated_sparse.patterns.hierarchical` over the levels of a
:class:`~dilated_sparse.configs.HierarchicalConfig`; attention runs through the op.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Any

import torch

from ..configs import HierarchicalConfig
from ..layout import SUPPORTED_BLOCK_SIZES, BlockSparseLayout
from ._common import check_segments
from .block_sparse import BlockSparseAttentionBase

__all__ = ["BlockSparseHierarchical"]


class BlockSparseHierarchical(BlockSparseAttentionBase):
    """Hierarchical block-sparse attention over ``[B, S, H, D]`` inputs.

    Args:
        segment_lengths, dilation_rates: optional LongNet branches combined with the levels:
            the layout is then the union of the hierarchical levels and the
            :func:`dilated_sparse.patterns.dilated_sparse` structure of these segments (the
            guides' "hierarchical + dilated"). Default: the levels alone.
        hierarchical_config: the levels (default ``HierarchicalConfig()``: three levels, fine to
            global). Each level ``{"stride", "window_size", "block_size"}``: the query blocks
            holding a multiple of ``stride`` see the keys within ``window_size // 2`` tokens
            (``-1``: all keys), rounded out to the level's ``block_size``.
        block_size: the layout's block (default: the finest level's ``block_size`` when it is a
            supported size, else 64).
        dropout, softmax_scale, mixed_precision, use_memory_pool, enable_caching: see
            :class:`BlockSparseAttentionBase`.
    """

    def __init__(
        self,
        segment_lengths: Sequence[int] | None = None,
        dilation_rates: Sequence[int] | None = None,
        hierarchical_config: HierarchicalConfig | None = None,
        *,
        block_size: int | None = None,
        dropout: float = 0.0,
        softmax_scale: float | None = None,
        mixed_precision: Any = False,
        use_memory_pool: bool = True,
        enable_caching: bool = True,
    ) -> None:
        super().__init__(dropout=dropout, softmax_scale=softmax_scale, mixed_precision=mixed_precision,
                         use_memory_pool=use_memory_pool, enable_caching=enable_caching)
        if hierarchical_config is None:
            hierarchical_config = HierarchicalConfig()
        elif not isinstance(hierarchical_config, HierarchicalConfig):
            raise TypeError(f"hierarchical_config must be a HierarchicalConfig, got {type(hierarchical_config).__name__}")
        self.hierarchical_config = hierarchical_config
        if block_size is None:
            finest = min(level["block_size"] for level in hierarchical_config.level_configs)
            block_size = finest if finest in SUPPORTED_BLOCK_SIZES else 64
        if block_size not in SUPPORTED_BLOCK_SIZES:
            raise ValueError(f"block_size must be one of {SUPPORTED_BLOCK_SIZES}, got {block_size!r}")
        self.block_size = block_size
        self.segment_lengths, self.dilation_rates = check_segments(segment_lengths, dilation_rates)

    def _layout_key(self) -> Hashable:
        levels = tuple(tuple(sorted(level.items())) for level in self.hierarchical_config.level_configs)
        return (levels, self.block_size, tuple(self.segment_lengths or ()), tuple(self.dilation_rates or ()))

    def _build_layout(
        self, seq_len_q: int, seq_len_k: int, *, causal: bool, num_heads: int, device: torch.device
    ) -> BlockSparseLayout:
        from ..patterns import dilated_sparse, hierarchical, union

        layout = hierarchical(seq_len_q=seq_len_q, seq_len_k=seq_len_k, block_size=self.block_size,
                              levels=self.hierarchical_config.level_configs, causal=causal, device=device)
        if self.segment_lengths is None and self.dilation_rates is None:
            return layout
        dilated = dilated_sparse(seq_len_q=seq_len_q, seq_len_k=seq_len_k, block_size=self.block_size,
                                 segment_lengths=self.segment_lengths, dilation_rates=self.dilation_rates,
                                 causal=causal, device=device)
        return union(layout, dilated)

    def get_pattern_stats(self, seq_len: int, **kwargs: Any) -> dict[str, Any]:
        """:meth:`BlockSparseAttentionBase.get_pattern_stats` plus ``levels``: per level
        ``{"level", "active_blocks", "coverage" (its block density), "active_positions" (query
        positions that are multiples of its stride)}``."""
        from ..patterns import hierarchical

        stats = super().get_pattern_stats(seq_len, **kwargs)
        causal = bool(kwargs.get("causal", False))
        seq_len_k = kwargs.get("seq_len_k") or seq_len
        levels = []
        for i, level in enumerate(self.hierarchical_config.level_configs):
            lay = hierarchical(seq_len_q=seq_len, seq_len_k=seq_len_k, block_size=self.block_size, levels=[level],
                               causal=causal)
            levels.append({"level": i, "active_blocks": lay.nnz, "coverage": lay.density,
                           "active_positions": -(-seq_len // level["stride"])})
        stats["levels"] = levels
        return stats

    def extra_repr(self) -> str:
        return f"levels={self.hierarchical_config.level_configs}, block_size={self.block_size}"
