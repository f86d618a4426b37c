"""Block-sparse attention modules (the seed guides' API) over the block-sparse op.

One module per concern:

* :mod:`.block_sparse`: :class:`BlockSparseRingDilatedAttention` (alias ``...V2``), a named
  pattern from a :class:`~dilated_sparse.configs.SparsePatternConfig`.
* :mod:`.multihead`: :class:`BlockSparseMultiheadAttention`, an ``nn.MultiheadAttention``
  drop-in, and the guides' :class:`BlockSparseRingMultiheadDilatedAttention` (alias ``...V2``).
* :mod:`.dilated`: LongNet :class:`DilatedAttention` / :class:`MultiheadDilatedAttention`.
* :mod:`.hierarchical`: :class:`BlockSparseHierarchical`.
* :mod:`.adaptive`: :class:`BlockSparseAdaptive` (learned layout, straight-through gates).
* :mod:`.sparse_transformer`: :class:`SparseAttention` (OpenAI modes) and
  :class:`MultiPatternAttention` (a pattern per head group, one op call).
* :mod:`.training`: :class:`AdaptiveSparsityTrainer`, :class:`ProgressiveSparsityScheduler`.
* :mod:`.factory`: :func:`create_block_sparse_attention`, :func:`get_block_sparse_preset`.

Every module computes attention through :func:`dilated_sparse.ops.block_sparse_attention`
(training with dropout > 0 uses the block-sparse PyTorch path of :mod:`._dropout`), builds its
layouts through :mod:`dilated_sparse.patterns`, and caches them per (lengths, device, ...).
"""

from __future__ import annotations

from ._common import LayoutCache, pattern_stats, visualize_layout
from .adaptive import BlockSparseAdaptive, gated_block_sparse_attention
from .block_sparse import BlockSparseAttentionBase, BlockSparseRingDilatedAttention, BlockSparseRingDilatedAttentionV2
from .dilated import DilatedAttention, MultiheadDilatedAttention
from .factory import (
    create_adaptive_block_sparse,
    create_block_sparse_attention,
    get_block_sparse_preset,
    get_hierarchical_presets,
    list_block_sparse_presets,
)
from .hierarchical import BlockSparseHierarchical
from .multihead import (
    BlockSparseMultiheadAttention,
    BlockSparseRingMultiheadDilatedAttention,
    BlockSparseRingMultiheadDilatedAttentionV2,
)
from .sparse_transformer import MultiPatternAttention, SparseAttention
from .training import AdaptiveSparsityTrainer, ProgressiveSparsityScheduler

__all__ = [
    "AdaptiveSparsityTrainer",
    "BlockSparseAdaptive",
    "BlockSparseAttentionBase",
    "BlockSparseHierarchical",
    "BlockSparseMultiheadAttention",
    "BlockSparseRingDilatedAttention",
    "BlockSparseRingDilatedAttentionV2",
    "BlockSparseRingMultiheadDilatedAttention",
    "BlockSparseRingMultiheadDilatedAttentionV2",
    "DilatedAttention",
    "LayoutCache",
    "MultiPatternAttention",
    "MultiheadDilatedAttention",
    "ProgressiveSparsityScheduler",
    "SparseAttention",
    "create_adaptive_block_sparse",
    "create_block_sparse_attention",
    "gated_block_sparse_attention",
    "get_block_sparse_preset",
    "get_hierarchical_presets",
    "list_block_sparse_presets",
    "pattern_stats",
    "visualize_layout",
]
