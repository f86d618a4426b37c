"""Combining layouts: per-head and per-batch stacks, broadcasting, union and intersection.

Items may be ready :class:`BlockSparseLayout` objects or pattern specs (a name, a
``{"pattern": name, **options}`` dict or a ``(name, options)`` pair) built with
:func:`make_layout` for the given geometry. All work on the CSR/COO indices (O(nnz log nnz)).
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ..layout import BlockSparseLayout
from ._core import (
    BlockSize,
    DeviceLike,
    causal_filter,
    check_bool,
    check_int,
    check_same_geometry,
    stack_layouts,
)
from .registry import get_pattern, make_layout, register_pattern

__all__ = ["broadcast_layout", "causal_filter", "intersection", "per_batch", "per_head", "union"]


def _build_items(
    items: Sequence[Any],
    what: str,
    *,
    seq_len_q: int | None,
    seq_len_k: int | None,
    block_size: BlockSize | None,
    causal: bool | None,
    device: DeviceLike,
    seed: int | None,
) -> list[BlockSparseLayout]:
    if isinstance(items, (str, bytes)) or not isinstance(items, Sequence) or len(items) == 0:
        raise TypeError(f"{what}: expected a non-empty list of layouts or pattern specs")
    if causal is not None:
        check_bool("causal", causal)
    out: list[BlockSparseLayout] = []
    for i, item in enumerate(items):
        if isinstance(item, BlockSparseLayout):
            lay = item
        else:
            if seq_len_q is None or block_size is None:
                raise ValueError(f"{what}: item {i} is a pattern spec; pass seq_len_q= and block_size= to build it")
            extra: dict[str, Any] = {}
            target, given = _spec_target(item)
            accepted = _accepted_options(target)
            if causal is not None and "causal" not in given and "causal" in accepted:
                extra["causal"] = causal
            if device is not None and "device" not in given and "device" in accepted:
                extra["device"] = device
            if seed is not None and "seed" not in given and "seed" in accepted:
                extra["seed"] = seed + i
            lay = make_layout(item, seq_len_q=seq_len_q, seq_len_k=seq_len_k, block_size=block_size, **extra)
            if causal and "causal" not in given and "causal" not in accepted:
                lay = causal_filter(lay)  # a generator without a causal option: filter its blocks
        out.append(lay)
    check_same_geometry(out, what)
    if device is not None:
        out = [lay.to(device) for lay in out]
    else:
        out = [lay.to(out[0].device) for lay in out]
    return out


def _spec_target(item: Any) -> tuple[Any, set[str]]:
    """The pattern (name or callable) a spec refers to and the option names it sets itself."""
    if isinstance(item, Mapping):
        return item.get("pattern", item.get("pattern_type")), set(item)
    if isinstance(item, tuple) and len(item) == 2 and isinstance(item[1], Mapping):
        return item[0], set(item[1])
    return item, set()


def _accepted_options(target: Any) -> frozenset[str] | _Everything:
    """Option names a pattern name or generator callable accepts (everything for ``**kwargs``)."""
    if isinstance(target, str):
        fn = get_pattern(target)
    elif callable(target):
        fn = target
    else:
        return frozenset()
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return _Everything()
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return _Everything()
    return frozenset(params)


class _Everything:
    """A set that contains every name (for generators taking ``**kwargs``)."""

    def __contains__(self, name: object) -> bool:
        return True


def broadcast_layout(layout: BlockSparseLayout, *, layout_batch: int, layout_heads: int) -> BlockSparseLayout:
    """Repeat a layout's slices to ``(layout_batch, layout_heads)`` (each dim from 1 or equal)."""
    lb, lh = layout.layout_shape
    check_int("layout_batch", layout_batch, minimum=1)
    check_int("layout_heads", layout_heads, minimum=1)
    if lb not in (1, layout_batch) or lh not in (1, layout_heads):
        raise ValueError(f"cannot broadcast a layout of shape {(lb, lh)} to {(layout_batch, layout_heads)}")
    if (lb, lh) == (layout_batch, layout_heads):
        return layout
    nqb = layout.num_query_blocks
    dev = layout.device
    b = torch.arange(layout_batch, device=dev)[:, None]
    h = torch.arange(layout_heads, device=dev)[None, :]
    src = ((b if lb > 1 else b * 0) * lh + (h if lh > 1 else h * 0)).reshape(-1)
    crow = layout.crow_indices.to(torch.int64)
    start = crow[src * nqb]
    count = crow[(src + 1) * nqb] - start
    total = int(count.sum())
    offsets = torch.cumsum(count, 0) - count
    pos = torch.arange(total, device=dev) - torch.repeat_interleave(offsets - start, count, output_size=total)
    counts = layout.row_counts().view(layout.num_slices, nqb)[src].reshape(-1)
    new_crow = torch.zeros(counts.numel() + 1, dtype=torch.int64, device=dev)
    new_crow[1:] = torch.cumsum(counts, 0)
    return BlockSparseLayout(
        new_crow,
        layout.col_indices[pos],
        block_size=layout.block_size,
        seq_len_q=layout.seq_len_q,
        seq_len_k=layout.seq_len_k,
        layout_batch=layout_batch,
        layout_heads=layout_heads,
    )


def _common_shape(layouts: Sequence[BlockSparseLayout], what: str) -> tuple[int, int]:
    lb = max(lay.layout_batch for lay in layouts)
    lh = max(lay.layout_heads for lay in layouts)
    for i, lay in enumerate(layouts):
        if lay.layout_batch not in (1, lb) or lay.layout_heads not in (1, lh):
            raise ValueError(
                f"{what}: layout {i} has layout shape {lay.layout_shape}, not broadcastable to {(lb, lh)}"
            )
    return lb, lh


def _keys(lay: BlockSparseLayout) -> torch.Tensor:
    return lay.row_ids() * lay.num_key_blocks + lay.col_indices.to(torch.int64)


def _from_keys(keys: torch.Tensor, like: BlockSparseLayout, lb: int, lh: int) -> BlockSparseLayout:
    nqb, nkb = like.num_query_blocks, like.num_key_blocks
    stacked = keys // nkb
    return BlockSparseLayout.from_coo(
        stacked % nqb,
        keys % nkb,
        slice_indices=stacked // nqb,
        block_size=like.block_size,
        seq_len_q=like.seq_len_q,
        seq_len_k=like.seq_len_k,
        layout_batch=lb,
        layout_heads=lh,
    )


def _broadcast_keys(layouts: Sequence[BlockSparseLayout], what: str) -> tuple[list[torch.Tensor], int, int]:
    """Block keys of every layout, broadcast to their common ``(Lb, Lh)``, and that shape."""
    if not layouts:
        raise TypeError(f"{what} needs at least one layout")
    check_same_geometry(list(layouts), what)
    lb, lh = _common_shape(layouts, what)
    dev = layouts[0].device
    keys = [_keys(broadcast_layout(lay.to(dev), layout_batch=lb, layout_heads=lh)) for lay in layouts]
    return keys, lb, lh


def union(*layouts: BlockSparseLayout) -> BlockSparseLayout:
    """Blocks active in any of ``layouts`` (same sizes; slices broadcast ``1 -> Lb/Lh``)."""
    keys, lb, lh = _broadcast_keys(layouts, "union")
    return _from_keys(torch.cat(keys), layouts[0], lb, lh)


def intersection(*layouts: BlockSparseLayout) -> BlockSparseLayout:
    """Blocks active in every one of ``layouts`` (same sizes; slices broadcast)."""
    keys, lb, lh = _broadcast_keys(layouts, "intersection")
    uniq, counts = torch.unique(torch.cat(keys), return_counts=True)
    return _from_keys(uniq[counts == len(layouts)], layouts[0], lb, lh)


def per_head(
    patterns: Sequence[Any],
    *,
    seq_len_q: int | None = None,
    seq_len_k: int | None = None,
    block_size: BlockSize | None = None,
    num_heads: int | None = None,
    causal: bool | None = None,
    seed: int | None = None,
    device: DeviceLike = None,
) -> BlockSparseLayout:
    """A per-head layout: head ``h`` uses ``patterns[h]`` (``layout_heads = H``).

    Args:
        patterns: layouts or pattern specs; an item that is itself per-head contributes all
            its heads, in order.
        num_heads: if given, each item is repeated for ``num_heads / (total heads)``
            consecutive heads (head groups, as ``MultiPatternAttention`` needs).
        causal, device: passed to every spec that does not set them.
        seed: passed as ``seed + i`` to item ``i`` when its pattern takes a seed.
    """
    items = _build_items(patterns, "per_head", seq_len_q=seq_len_q, seq_len_k=seq_len_k, block_size=block_size,
                         causal=causal, device=device, seed=seed)
    for i, lay in enumerate(items):
        if lay.layout_batch != 1:
            raise ValueError(f"per_head: item {i} is per-batch (layout_batch={lay.layout_batch}); use per_batch")
    heads = sum(lay.layout_heads for lay in items)
    if num_heads is not None:
        check_int("num_heads", num_heads, minimum=1)
        if num_heads % heads:
            raise ValueError(f"per_head: num_heads={num_heads} is not a multiple of the {heads} heads given")
        rep = num_heads // heads
        items = [lay for lay in items for _ in range(rep)]
        heads = num_heads
    slices = []
    for lay in items:
        slices.extend(_split_slices(lay))
    return stack_layouts(slices, layout_batch=1, layout_heads=heads)


def _split_slices(lay: BlockSparseLayout) -> list[BlockSparseLayout]:
    if lay.num_slices == 1:
        return [lay]
    nqb = lay.num_query_blocks
    crow = lay.crow_indices.to(torch.int64)
    out = []
    for s in range(lay.num_slices):
        c = crow[s * nqb:(s + 1) * nqb + 1]
        a, b = int(c[0]), int(c[-1])
        out.append(BlockSparseLayout(c - a, lay.col_indices[a:b], block_size=lay.block_size,
                                     seq_len_q=lay.seq_len_q, seq_len_k=lay.seq_len_k))
    return out


def per_batch(
    patterns: Sequence[Any],
    *,
    seq_len_q: int | None = None,
    seq_len_k: int | None = None,
    block_size: BlockSize | None = None,
    causal: bool | None = None,
    seed: int | None = None,
    device: DeviceLike = None,
) -> BlockSparseLayout:
    """A per-batch layout: batch element ``b`` uses ``patterns[b]`` (``layout_batch = B``).

    Items may be shared or per-head; shared items are broadcast to the per-head count.
    """
    items = _build_items(patterns, "per_batch", seq_len_q=seq_len_q, seq_len_k=seq_len_k, block_size=block_size,
                         causal=causal, device=device, seed=seed)
    for i, lay in enumerate(items):
        if lay.layout_batch != 1:
            raise ValueError(f"per_batch: item {i} is already per-batch (layout_batch={lay.layout_batch})")
    _, lh = _common_shape(items, "per_batch")
    slices = []
    for lay in items:
        slices.extend(_split_slices(broadcast_layout(lay, layout_batch=1, layout_heads=lh)))
    return stack_layouts(slices, layout_batch=len(items), layout_heads=lh)


@register_pattern("per_head", aliases=("mixture", "multi_pattern"))
def _per_head_pattern(
    *,
    seq_len_q: int,
    seq_len_k: int | None = None,
    block_size: BlockSize,
    patterns: Sequence[Any],
    num_heads: int | None = None,
    causal: bool | None = None,
    seed: int | None = None,
    device: DeviceLike = None,
) -> BlockSparseLayout:
    """Registry form of :func:`per_head` (``patterns`` = list of specs)."""
    return per_head(patterns, seq_len_q=seq_len_q, seq_len_k=seq_len_k, block_size=block_size,
                    num_heads=num_heads, causal=causal, seed=seed, device=device)


def _registry_form(combine: Any) -> Any:
    """The registry form of ``union`` / ``intersection``: ``patterns`` = list of specs or layouts."""

    def pattern(
        *,
        seq_len_q: int,
        seq_len_k: int | None = None,
        block_size: BlockSize,
        patterns: Sequence[Any],
        causal: bool | None = None,
        seed: int | None = None,
        device: DeviceLike = None,
    ) -> BlockSparseLayout:
        items = _build_items(patterns, combine.__name__, seq_len_q=seq_len_q, seq_len_k=seq_len_k,
                             block_size=block_size, causal=causal, device=device, seed=seed)
        return combine(*items)

    pattern.__name__ = pattern.__qualname__ = f"_{combine.__name__}_pattern"
    pattern.__doc__ = f"Registry form of :func:`{combine.__name__}` (``patterns`` = list of specs or layouts)."
    return pattern


register_pattern("union", _registry_form(union))
register_pattern("intersection", _registry_form(intersection))
