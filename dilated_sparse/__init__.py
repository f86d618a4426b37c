"""dilated_sparse: block-sparse attention over CSR block lists, with CPU and CUDA kernels.

Quick start::

    import torch, dilated_sparse as ds
    layout = ds.patterns.local_window(seq_len_q=1024, block_size=64, window_size=256)
    q = k = v = torch.randn(1, 1024, 8, 64)
    out = ds.block_sparse_attention(q, k, v, layout)
"""

from __future__ import annotations

__version__ = "0.1.0"

from .layout import SUPPORTED_BLOCK_SIZES, BlockSparseLayout
from .ops import (
    attention_backward,
    attention_forward,
    attention_weights,
    block_sparse_attention,
    extension_available,
    weights_to_bsr,
    weights_to_dense,
)
from .reference import blocked_reference_attention, reference_attention

__all__ = [
    "SUPPORTED_BLOCK_SIZES",
    "BlockSparseLayout",
    "attention_backward",
    "attention_forward",
    "attention_weights",
    "block_sparse_attention",
    "blocked_reference_attention",
    "extension_available",
    "reference_attention",
    "weights_to_bsr",
    "weights_to_dense",
]

from . import patterns  # layer 2: the pattern generators (they build layouts, never call the op)
from .patterns import available_patterns, make_layout, register_pattern

__all__ += ["available_patterns", "make_layout", "patterns", "register_pattern"]

from . import methods  # layer 3: imports the ops and patterns above

__all__ += ["methods"]

from . import distributed  # layer 3: sequence-parallel ring over torch.distributed
from .distributed import (
    BlockSparseRingDistributedDilatedAttention,
    DistributedSparseConfig,
    ring_block_sparse_attention,
)

__all__ += [
    "BlockSparseRingDistributedDilatedAttention",
    "DistributedSparseConfig",
    "distributed",
    "ring_block_sparse_attention",
]

from . import modules  # layer 3: nn.Modules, configs, factory and presets (the guides' API)
from .configs import AdaptiveConfig, HierarchicalConfig, SparsePatternConfig
from .modules import (
    AdaptiveSparsityTrainer,
    BlockSparseAdaptive,
    BlockSparseHierarchical,
    BlockSparseMultiheadAttention,
    BlockSparseRingDilatedAttention,
    BlockSparseRingDilatedAttentionV2,
    BlockSparseRingMultiheadDilatedAttention,
    BlockSparseRingMultiheadDilatedAttentionV2,
    DilatedAttention,
    MultiheadDilatedAttention,
    MultiPatternAttention,
    ProgressiveSparsityScheduler,
    SparseAttention,
    create_adaptive_block_sparse,
    create_block_sparse_attention,
    get_block_sparse_preset,
    get_hierarchical_presets,
    list_block_sparse_presets,
)

__all__ += [
    "AdaptiveConfig",
    "AdaptiveSparsityTrainer",
    "BlockSparseAdaptive",
    "BlockSparseHierarchical",
    "BlockSparseMultiheadAttention",
    "BlockSparseRingDilatedAttention",
    "BlockSparseRingDilatedAttentionV2",
    "BlockSparseRingMultiheadDilatedAttention",
    "BlockSparseRingMultiheadDilatedAttentionV2",
    "DilatedAttention",
    "HierarchicalConfig",
    "MultiPatternAttention",
    "MultiheadDilatedAttention",
    "ProgressiveSparsityScheduler",
    "SparseAttention",
    "SparsePatternConfig",
    "create_adaptive_block_sparse",
    "create_block_sparse_attention",
    "get_block_sparse_preset",
    "get_hierarchical_presets",
    "list_block_sparse_presets",
    "modules",
]
