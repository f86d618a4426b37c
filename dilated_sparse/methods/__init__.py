"""Sparse-attention methods from the literature, on the same footing.

Every method takes ``q [B, Sq, H, D]``, ``k, v [B, Sk, Hkv, D]`` (GQA allowed) and returns
``[B, Sq, H, D]``; none builds an ``Sq x Sk`` tensor: row-wise methods run over query chunks
(``O(chunk x Sk)`` memory, recomputed in the backward) or over the active blocks of a layout, and
block methods run the block-sparse kernel.

================================  ===============================================================
``sparsemax``                     Euclidean projection on the simplex (Martins & Astudillo, 2016)
``entmax15``, ``entmax_bisect``   1.5-entmax exact / alpha-entmax by bisection with d/d alpha
                                  (Peters et al., 2019; Correia et al., 2019)
``entmax_attention``              alpha-entmax attention, chunked / over a layout's blocks
                                  (AdaSplash-style, Goncalves et al., 2025)
``sparsemax_attention``           sparsemax attention, chunked
``topk_attention``                keep the top-k scores per query (Zhao et al., 2019; Gupta et
                                  al., 2021)
``adaptive_topk``/``AdaptiveTopK``  learned per-head k in [k_min, k_max] (soft rank ramp)
``block_topk_attention``          MoBA/XAttention-style dynamic block selection from pooled q/k,
                                  CSR built on the device, run by the kernel
``rela_attention``/``ReLA``       ReLU attention + RMSNorm (Zhang et al., 2021)
``gumbel_softmax_attention``      Gumbel-softmax, straight-through hard (Jang et al., 2017),
                                  with ``GumbelTemperatureSchedule``
``LearnableBlockMask``            Bernoulli (binary Concrete) block gates + L0 penalty (Louizos
                                  et al., 2018); ``to_layout()`` for the kernel
``sparsek_attention``/``SparseK``  scoring network + differentiable top-k mask (Lou et al., 2024)
``GECO``                          constrained sparsity regulariser (Rezende & Viola, 2018)
``sla_attention``/``SLA``         sparse (critical blocks) + linear (marginal blocks) attention
                                  (Zhang et al., 2025)
``lsh_attention``                 Reformer LSH attention (Kitaev et al., 2020)
``block_neighbour_attention``     blocks i-1, i, i+1 through the kernel
``bigbird_attention``             BigBird global + window + random (Zaheer et al., 2020)
``dilated_attention``             LongNet dilated blocks (Ding et al., 2023)
``pattern_attention``             any registered pattern through the kernel
metrics                           ``binary_sparsity``, ``normalized_entropy``, ``gini``,
                                  ``row_quantiles``, ``attention_metrics`` (dense or weights dict)
``SparseTransformerBlock``        pre-norm block + MLP using any of the above by name
================================  ===============================================================
"""

from __future__ import annotations

from ._common import rowwise_attention
from .block import SparseMethodAttention, SparseTransformerBlock, available_methods
from .block_topk import block_scores, block_topk_attention, block_topk_layout, fixed_row_layout, pool_blocks
from .geco import GECO
from .gumbel import GumbelTemperatureSchedule, LearnableBlockMask, block_gated_attention, gumbel_softmax_attention
from .lsh import lsh_attention, lsh_buckets, lsh_rotations
from .metrics import (
    AttentionRows,
    attention_metrics,
    attention_rows,
    binary_sparsity,
    gini,
    normalized_entropy,
    row_quantiles,
)
from .normalizers import entmax15, entmax_attention, entmax_bisect, sparsemax, sparsemax_attention
from .rela import ReLA, rela_attention
from .sla import SLA, sla_attention, sla_block_classes
from .sparsek import SparseK, sparsek_attention, sparsek_mask
from .structured import bigbird_attention, block_neighbour_attention, dilated_attention, pattern_attention
from .topk import AdaptiveTopK, adaptive_topk, adaptive_topk_attention, topk_attention

__all__ = [
    "GECO",
    "SLA",
    "AdaptiveTopK",
    "AttentionRows",
    "GumbelTemperatureSchedule",
    "LearnableBlockMask",
    "ReLA",
    "SparseK",
    "SparseMethodAttention",
    "SparseTransformerBlock",
    "adaptive_topk",
    "adaptive_topk_attention",
    "attention_metrics",
    "attention_rows",
    "available_methods",
    "bigbird_attention",
    "binary_sparsity",
    "block_gated_attention",
    "block_neighbour_attention",
    "block_scores",
    "block_topk_attention",
    "block_topk_layout",
    "dilated_attention",
    "entmax15",
    "entmax_attention",
    "entmax_bisect",
    "fixed_row_layout",
    "gini",
    "gumbel_softmax_attention",
    "lsh_attention",
    "lsh_buckets",
    "lsh_rotations",
    "normalized_entropy",
    "pattern_attention",
    "pool_blocks",
    "rela_attention",
    "row_quantiles",
    "rowwise_attention",
    "sla_attention",
    "sla_block_classes",
    "sparsek_attention",
    "sparsek_mask",
    "sparsemax",
    "sparsemax_attention",
    "topk_attention",
]
