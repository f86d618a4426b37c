"""Pattern generators: the one source of every block-sparse layout in the project.

Each generator takes keyword arguments ``seq_len_q``, ``seq_len_k`` (default ``seq_len_q``),
``block_size`` (int or ``(block_q, block_k)``) plus its options, and returns a validated
:class:`~dilated_sparse.layout.BlockSparseLayout`. Layouts are built from COO coordinates with
vectorised index arithmetic (:meth:`BlockSparseLayout.from_coo`): no token mask and no
``nqb x nkb`` matrix is ever made, so memory and time are O(nnz) (a 1M-token sequence with
128-token blocks takes well under a second). Random patterns are seeded (``seed=``) and
deterministic. Every pattern takes ``causal=`` (keep only key blocks not wholly after the query
block, top-left aligned; the kernel's ``causal`` flag then masks inside the diagonal blocks)
and ``device=`` (where the index tensors are built).

Patterns (``available_patterns()``; build any by name with :func:`make_layout`):

========================  ==================================================================
``local_window``          sliding window (``window_size``/``local_window_size`` tokens, or
                          ``window=(left, right)``, or a target ``sparsity_ratio``)
``dilated_sparse``        LongNet segments x dilation at block granularity (``segment_lengths``,
                          ``dilation_rates``, optional ``sparsity_ratio``); alias ``longnet``
``global_local``          ``global_tokens`` + local window (or a target)
``all``/``local``/        OpenAI Sparse Transformer modes (``local_attn_ctx``, ``blocksize``)
``strided``
``bigbird``               global + sliding window + random blocks
``longformer``            sliding window + global tokens
``fixed``/``variable``    DeepSpeed-style fixed and variable patterns
``hierarchical``          multi-level ``{"stride", "window_size", "block_size"}`` windows
                          (``levels`` / ``level_configs``; ``window_size=-1`` = global)
``butterfly``             flat block butterfly
``random``                random blocks at a target ``sparsity_ratio``
``block_neighbour``       blocks ``i-1, i, i+1`` (``radius``)
``dense``                 every block
``per_head``/``union``/   combinations of specs (``patterns=[...]``)
``intersection``
========================  ==================================================================

``sparsity_ratio`` follows the seed guides: it is the fraction of blocks **computed**
(``sparsity_ratio=0.1`` means 90 % sparse); ``density=`` is an alias. A target is met
exactly: ``round(target * nqb * nkb)`` blocks per slice, spread evenly over the query blocks.
Token-defined patterns keep a block iff it holds a token pair allowed by the token rule (an
exact cover). See :mod:`dilated_sparse.patterns._core` for the shared conventions and
:func:`register_pattern` to add a pattern of your own.
"""

from __future__ import annotations

from . import basic, combine, deepspeed, dilated, sparse_transformer  # noqa: F401  (registration)
from .basic import (
    block_neighbour,
    butterfly,
    dense,
    global_local,
    local_window,
    longformer,
    random_pattern,
)
from .combine import broadcast_layout, causal_filter, intersection, per_batch, per_head, union
from .deepspeed import bigbird, fixed, variable
from .dilated import DEFAULT_HIERARCHICAL_LEVELS, dilated_sparse, hierarchical
from .registry import (
    available_patterns,
    get_pattern,
    make_layout,
    pattern_options,
    register_pattern,
)
from .sparse_transformer import (
    sparse_transformer_all,
    sparse_transformer_local,
    sparse_transformer_strided,
)

__all__ = [
    "DEFAULT_HIERARCHICAL_LEVELS",
    "available_patterns",
    "bigbird",
    "block_neighbour",
    "broadcast_layout",
    "butterfly",
    "causal_filter",
    "dense",
    "dilated_sparse",
    "fixed",
    "get_pattern",
    "global_local",
    "hierarchical",
    "intersection",
    "local_window",
    "longformer",
    "make_layout",
    "pattern_options",
    "per_batch",
    "per_head",
    "random_pattern",
    "register_pattern",
    "sparse_transformer_all",
    "sparse_transformer_local",
    "sparse_transformer_strided",
    "union",
    "variable",
]
