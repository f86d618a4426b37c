"""Shared machinery of the modules: the layout cache, pattern statistics, option checks.

Every module computes attention through :func:`dilated_sparse.ops.block_sparse_attention` (the
op) over a :class:`~dilated_sparse.layout.BlockSparseLayout` built by
:mod:`dilated_sparse.patterns`; this file only caches layouts and reports on them.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable
from typing import Any, TypeVar

import torch

from ..layout import BlockSparseLayout

__all__ = ["LayoutCache", "check_options", "derived", "pattern_stats", "resolve_mixed_precision"]

_T = TypeVar("_T")
_DERIVED: weakref.WeakKeyDictionary[BlockSparseLayout, dict[str, Any]] = weakref.WeakKeyDictionary()


def derived(layout: BlockSparseLayout, name: str, build: Callable[[BlockSparseLayout], _T]) -> _T:
    """``build(layout)``, computed once per layout object and kept while the layout lives.

    For tables the modules derive from a layout on every forward (ELL index tables, dense block
    masks, row maxima): a cached layout then pays for them (and their host syncs) once.
    """
    entries = _DERIVED.setdefault(layout, {})
    if name not in entries:
        entries[name] = build(layout)
    return entries[name]


class LayoutCache:
    """A small LRU cache of layouts keyed by ``(sequence lengths, device, ...)``.

    Layouts are built once per key and reused across calls (a layout also caches its CSC
    transpose, so the backward reuses it too).

    Args:
        max_entries: how many layouts to keep (least recently used ones are dropped).
        enabled: when False every :meth:`get` rebuilds the layout (nothing is kept).
    """

    def __init__(self, max_entries: int = 32, enabled: bool = True) -> None:
        if isinstance(max_entries, bool) or not isinstance(max_entries, int) or max_entries < 1:
            raise ValueError(f"max_entries must be a positive int, got {max_entries!r}")
        self.max_entries = max_entries
        self.enabled = enabled
        self._entries: OrderedDict[Hashable, BlockSparseLayout] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def get(self, key: Hashable, build: Callable[[], BlockSparseLayout]) -> BlockSparseLayout:
        """The layout cached under ``key``, building (and caching) it with ``build()`` if absent."""
        if self.enabled and key in self._entries:
            self._entries.move_to_end(key)
            self.hits += 1
            return self._entries[key]
        self.misses += 1
        layout = build()
        if self.enabled:
            self._entries[key] = layout
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)
        return layout

    def clear(self) -> None:
        """Drop every cached layout."""
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)

    def keys(self) -> list[Hashable]:
        """The cached keys, least recently used first."""
        return list(self._entries)


_INDEX_BYTES = 4  # int32 indices


def pattern_stats(
    layout: BlockSparseLayout,
    *,
    batch_size: int = 1,
    num_heads: int = 1,
    dtype: torch.dtype = torch.float32,
) -> dict[str, Any]:
    """Statistics of a layout: sparsity, density, nnz, blocks per row, bytes.

    Args:
        layout: the layout.
        batch_size, num_heads: sizes used for the bytes of a weights dict.
        dtype: dtype of the weights dict's values.

    Returns:
        A dict with ``sparsity``, ``density``, ``nnz_blocks``, ``total_blocks``,
        ``blocks_per_row_min``/``_mean``/``_max`` (over every query-block row of every slice),
        ``active_blocks`` (alias of ``nnz_blocks``), ``num_query_blocks``, ``num_key_blocks``,
        ``block_size``, ``layout_shape``,
        ``layout_bytes`` (CSR + cached CSC indices, int32), ``weights_bytes`` (the
        ``block_values`` of a weights dict for ``batch_size x num_heads``) and
        ``dense_weights_bytes`` (a dense ``[B, H, Sq, Sk]`` tensor, for comparison).
    """
    counts = layout.row_counts().to(torch.float64)
    nqb, nkb = layout.num_query_blocks, layout.num_key_blocks
    bq, bk = layout.block_size
    element = torch.empty((), dtype=dtype).element_size()
    csr = (layout.crow_indices.numel() + layout.col_indices.numel()) * _INDEX_BYTES
    csc = (layout.num_slices * nkb + 1 + layout.nnz) * _INDEX_BYTES
    max_slice = layout.max_slice_nnz
    return {
        "sparsity": layout.sparsity,
        "density": layout.density,
        "nnz_blocks": layout.nnz,
        "active_blocks": layout.nnz,
        "total_blocks": layout.num_slices * nqb * nkb,
        "blocks_per_row_min": int(counts.min().item()) if counts.numel() else 0,
        "blocks_per_row_mean": float(counts.mean().item()) if counts.numel() else 0.0,
        "blocks_per_row_max": int(counts.max().item()) if counts.numel() else 0,
        "num_query_blocks": nqb,
        "num_key_blocks": nkb,
        "block_size": layout.block_size,
        "layout_shape": layout.layout_shape,
        "layout_bytes": csr + csc,
        "weights_bytes": batch_size * num_heads * max_slice * bq * bk * element,
        "dense_weights_bytes": batch_size * num_heads * layout.seq_len_q * layout.seq_len_k * element,
    }


def visualize_layout(layout: BlockSparseLayout, max_blocks: int = 32) -> str:
    """ASCII picture of slice 0 of a layout (``#`` active, ``.`` not), downsampled to at most
    ``max_blocks`` x ``max_blocks`` cells (a cell is active if any block in it is), plus its
    sparsity and block count."""
    nqb, nkb = layout.num_query_blocks, layout.num_key_blocks
    fq, fk = -(-nqb // max_blocks), -(-nkb // max_blocks)
    rows = layout.row_ids()
    cols = layout.col_indices.to(torch.int64)
    first = rows < nqb
    cells = torch.zeros(-(-nqb // fq), -(-nkb // fk), dtype=torch.bool)
    cells[(rows[first] // fq).cpu(), (cols[first] // fk).cpu()] = True
    lines = ["".join("#" if c else "." for c in row) for row in cells.tolist()]
    border = "-" * (cells.shape[1] + 2)
    body = "\n".join(f"|{line}|" for line in lines)
    slice_nnz = int(first.sum())
    return (f"{border}\n{body}\n{border}\nSparsity: {1 - slice_nnz / (nqb * nkb):.1%}\n"
            f"Active blocks: {slice_nnz}/{nqb * nkb}" + (f" (cell = {fq}x{fk} blocks)" if fq * fk > 1 else ""))


def check_options(owner: str, given: Iterable[str], valid: Iterable[str]) -> None:
    """TypeError listing the valid options when ``given`` holds a name not in ``valid``."""
    valid_sorted = sorted(set(valid))
    unknown = sorted(set(given) - set(valid_sorted))
    if unknown:
        raise TypeError(f"{owner} got unknown option(s) {unknown}; valid options are {valid_sorted}")


def resolve_mixed_precision(value: Any) -> torch.dtype | None:
    """``mixed_precision`` option -> the compute dtype (None = compute in the input dtype).

    ``True`` means bfloat16; a ``torch.float16``/``torch.bfloat16`` dtype (or its name) picks it.
    """
    if value is None or value is False:
        return None
    if value is True:
        return torch.bfloat16
    if isinstance(value, str):
        value = {"fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
                 "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}.get(value.lower(), value)
    if value in (torch.float16, torch.bfloat16):
        return value
    raise ValueError(
        f"mixed_precision must be a bool, torch.float16 or torch.bfloat16, got {value!r}"
    )


def check_segments(
    segment_lengths: Iterable[int] | None, dilation_rates: Iterable[int] | None
) -> tuple[list[int] | None, list[int] | None]:
    """A module's own copies of LongNet ``segment_lengths``/``dilation_rates`` (None stays None).

    Raises ``ValueError`` when both are given with different lengths.
    """
    segs = None if segment_lengths is None else list(segment_lengths)
    rates = None if dilation_rates is None else list(dilation_rates)
    if segs is not None and rates is not None and len(segs) != len(rates):
        raise ValueError(f"segment_lengths {segs} and dilation_rates {rates} must have the same length")
    return segs, rates


def check_segments_used(pattern_type: str, segment_lengths: Any, dilation_rates: Any) -> None:
    """``ValueError`` when ``segment_lengths``/``dilation_rates`` were given for a pattern that ignores them."""
    if segment_lengths is None and dilation_rates is None:
        return
    from ..patterns import pattern_options

    if "segment_lengths" not in pattern_options(pattern_type):
        raise ValueError(
            f"segment_lengths/dilation_rates were given but pattern {pattern_type!r} does not use them (only "
            "'dilated_sparse' does); drop them or choose pattern_type='dilated_sparse'"
        )


def check_dropout(dropout: Any) -> float:
    """``dropout`` as a float, checked to lie in ``[0, 1)``."""
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be a float in [0, 1), got {dropout!r}")
    return float(dropout)


def check_use_memory_pool(value: Any) -> None:
    """Validate the guides' ``use_memory_pool`` option.

    Buffers are always pooled here: layouts are cached per (lengths, device) and every tensor
    comes from PyTorch's caching allocator, so ``True`` describes what happens. ``False`` cannot
    be honoured (there is no unpooled allocation path) and raises.
    """
    if not isinstance(value, bool):
        raise TypeError(f"use_memory_pool must be a bool, got {value!r}")
    if not value:
        raise ValueError(
            "use_memory_pool=False is not supported: layouts are always cached and tensors come from "
            "PyTorch's caching allocator (use torch.cuda.empty_cache() to release memory)"
        )
