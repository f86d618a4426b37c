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
