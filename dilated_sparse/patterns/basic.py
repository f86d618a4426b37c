"""Basic patterns: dense, block neighbour, butterfly, random, local window, global+local, Longformer.

Conventions (token geometry, pattern grid, causal filter, target density) are described in
:mod:`dilated_sparse.patterns._core`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..layout import BlockSparseLayout
from ._core import (
    BlockSize,
    DeviceLike,
    Geometry,
    block_range,
    build_heads,
    check_bool,
    check_int,
    check_int_list,
    grid_to_layout,
    make_generator,
    make_geometry,
    resolve_alias,
    sample_columns,
    select_to_counts,
    target_density,
    target_total,
    token_span_to_blocks,
    waterfill,
)
from .registry import register_pattern

__all__ = [
    "block_neighbour",
    "butterfly",
    "dense",
    "global_local",
    "local_window",
    "longformer",
    "random_pattern",
]

DEFAULT_WINDOW_SIZE = 512


def _empty(geom: Geometry) -> torch.Tensor:
    return torch.zeros(0, dtype=torch.int64, device=geom.device)


@register_pattern("dense", aliases=("full",))
def dense(
    *,
    seq_len_q: int,
    seq_len_k: int | None = None,
    block_size: BlockSize,
    causal: bool = False,
    device: DeviceLike = None,
) -> BlockSparseLayout:
    """Every block (with ``causal``: every block not wholly after the query block)."""
    geom = make_geometry(seq_len_q, seq_len_k, block_size, device)
    causal = check_bool("causal", causal)
    rows = geom.arange_q()
    r, c = block_range(rows, torch.zeros_like(rows), geom.row_limit(causal))
    return geom.build(r, c)


@register_pattern("block_neighbour", aliases=("block_neighbor", "neighbour", "neighbor"))
def block_neighbour(
    *,
    seq_len_q: int,
    seq_len_k: int | None = None,
    block_size: BlockSize,
    radius: int = 1,
    causal: bool = False,
    device: DeviceLike = None,
) -> BlockSparseLayout:
    """Block ``i`` attends to blocks ``i - radius .. i + radius`` (``radius=1``: i-1, i, i+1).

    Defined on the pattern grid (cells of ``max(bq, bk)`` tokens); with ``causal`` only
    ``i - radius .. i`` remain.
    """
    geom = make_geometry(seq_len_q, seq_len_k, block_size, device)
    causal = check_bool("causal", causal)
    radius = check_int("radius", radius)
    p = torch.arange(geom.nq_grid, dtype=torch.int64, device=geom.device)
    lo = torch.clamp(p - radius, min=0)
    hi = torch.clamp(p + radius, max=geom.nk_grid - 1)
    r, c = block_range(p, lo, hi)
    r, c, _ = grid_to_layout(geom, r, c)
    return geom.build(r, c, causal=causal)


@register_pattern("butterfly", aliases=("pixelfly", "flat_butterfly"))
def butterfly(
    *,
    seq_len_q: int,
    seq_len_k: int | None = None,
    block_size: BlockSize,
    butterfly_size: int | None = None,
    causal: bool = False,
    device: DeviceLike = None,
) -> BlockSparseLayout:
    """Flat block butterfly (Pixelfly): block ``i`` attends to ``i`` and ``i XOR 2**s``.

    The strides ``2**s`` run over ``1, 2, 4, ... < butterfly_size`` (a power of two, in pattern
    blocks; default: enough levels to connect every pair through ``log2`` hops). That is the
    union of the supports of the butterfly factors, ``1 + log2(n)`` blocks per row.
    """
    geom = make_geometry(seq_len_q, seq_len_k, block_size, device)
    causal = check_bool("causal", causal)
    n = max(geom.nq_grid, geom.nk_grid)
    if butterfly_size is None:
        size = 1
        while size < n:
            size *= 2
    else:
        size = check_int("butterfly_size", butterfly_size, minimum=1)
        if size & (size - 1):
            raise ValueError(f"butterfly_size must be a power of two, got {size}")
    p = torch.arange(geom.nq_grid, dtype=torch.int64, device=geom.device)
    rows, cols = [p], [p]
    stride = 1
    while stride < size:
        rows.append(p)
        cols.append(torch.bitwise_xor(p, stride))
        stride *= 2
    r, c = torch.cat(rows), torch.cat(cols)
    keep = c < geom.nk_grid
    r, c, _ = grid_to_layout(geom, r[keep], c[keep])
    return geom.build(r, c, causal=causal)


@register_pattern("random")
def random_pattern(
    *,
    seq_len_q: int,
    seq_len_k: int | None = None,
    block_size: BlockSize,
    sparsity_ratio: float | None = None,
    density: float | None = None,
    seed: int = 0,
    num_heads: int | None = None,
    different_layout_per_head: bool = False,
    causal: bool = False,
    device: DeviceLike = None,
) -> BlockSparseLayout:
    """Uniformly random blocks at a target density.

    Args:
        sparsity_ratio: fraction of blocks computed (the seed guides' convention: 0.1 = 90 %
            sparse); alias ``density``. Required.
        seed: random seed (the layout is a pure function of the arguments).
        num_heads, different_layout_per_head: one layout per head, head ``h`` drawn with
            ``seed + h``; otherwise one shared layout.
        causal: draw only among the key blocks not wholly after the query block.

    Every slice gets exactly ``round(target * nqb * nkb)`` blocks, spread over the query
    blocks as evenly as their capacity allows (rows limited by ``causal`` take what fits), each
    row drawn uniformly without replacement.
    """
    geom = make_geometry(seq_len_q, seq_len_k, block_size, device)
    causal = check_bool("causal", causal)
    target = target_density(sparsity_ratio, density)
    if target is None:
        raise ValueError("random needs sparsity_ratio= (fraction of blocks computed) or its alias density=")
    check_int("seed", seed)
    limit = geom.row_limit(causal)
    k = waterfill(target_total(geom, target), torch.zeros_like(limit), limit + 1, "random")

    def build(h: int) -> tuple[torch.Tensor, torch.Tensor]:
        r, c = sample_columns(limit + 1, k, make_generator(seed + h))
        return r.to(geom.device), c.to(geom.device)

    return build_heads(
        geom, build, num_heads=num_heads, different_layout_per_head=different_layout_per_head, causal=causal
    )


def _window_sides(window_size: int | None, window: Sequence[int | None] | None) -> tuple[int | None, int | None]:
    if window is not None:
        if isinstance(window, (str, bytes)) or not isinstance(window, Sequence) or len(window) != 2:
            raise TypeError(f"window must be a pair (left, right) of token counts or None, got {window!r}")
        left, right = window
        if left is not None:
            check_int("window[0] (left)", left)
        if right is not None:
            check_int("window[1] (right)", right)
        return left, right
    ws = DEFAULT_WINDOW_SIZE if window_size is None else check_int("window_size", window_size)
    return ws // 2, ws // 2


def _window_blocks(
    geom: Geometry, rows: torch.Tensor, left: int | None, right: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    qs, qe = geom.q_start()[rows], geom.q_end()[rows]
    lo = qs - left if left is not None else torch.zeros_like(qs)
    hi = qe + right if right is not None else torch.full_like(qe, geom.seq_len_k - 1)
    return token_span_to_blocks(geom, rows, lo, hi)


def _only_one(what: str, **given: object) -> None:
    names = [n for n, v in given.items() if v is not None]
    if len(names) > 1:
        raise ValueError(f"{what}: give only one of {', '.join(given)} (got {', '.join(names)})")


@register_pattern("local_window", aliases=("local_window_attention", "sliding_window"))
def local_window(
    *,
    seq_len_q: int,
    seq_len_k: int | None = None,
    block_size: BlockSize,
    window_size: int | None = None,
    local_window_size: int | None = None,
    window: Sequence[int | None] | None = None,
    sparsity_ratio: float | None = None,
    density: float | None = None,
    causal: bool = False,
    device: DeviceLike = None,
) -> BlockSparseLayout:
    """Sliding window: blocks holding a key within ``window_size // 2`` tokens of a query.

    Args:
        window_size: total window in tokens (alias ``local_window_size``; default 512): query
            ``i`` covers keys ``|i - j| <= window_size // 2``, rounded out to whole blocks.
        window: ``(left, right)`` tokens instead (either ``None`` = unbounded).
        sparsity_ratio: a target density (fraction of blocks computed; alias ``density``):
            every query block keeps its ``k`` nearest key blocks (fewest tokens between the
            two blocks, ties to the past; the blocks of the window first when a window is also
            given), ``k`` spread evenly so that the slice has exactly
            ``round(target * nqb * nkb)`` blocks. With a symmetric window this is the same
            layout as without it.
        causal: keep only blocks not wholly after the query block (so a causal window reaches
            ``window_size // 2`` tokens back).
    """
    geom = make_geometry(seq_len_q, seq_len_k, block_size, device)
    causal = check_bool("causal", causal)
    ws = resolve_alias(("window_size", "local_window_size"), (window_size, local_window_size))
    target = target_density(sparsity_ratio, density)
    _only_one("local_window", window_size=ws, window=window)
    rows = geom.arange_q()
    if target is not None:
        limit = geom.row_limit(causal)
        k = waterfill(target_total(geom, target), torch.zeros_like(limit), limit + 1, "local_window")
        if ws is None and window is None:
            r = c = _empty(geom)
        else:
            r, c = _window_blocks(geom, rows, *_window_sides(ws, window))  # type: ignore[arg-type]
            keep = c <= limit[r]
            r, c = r[keep], c[keep]
        r, c = select_to_counts(geom, r, c, torch.zeros_like(r), k, limit)
        return geom.build(r, c)
    left, right = _window_sides(ws, window)  # type: ignore[arg-type]
    r, c = _window_blocks(geom, rows, left, right)
    return geom.build(r, c, causal=causal)


def _global_blocks(geom: Geometry, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Query and key blocks holding the given global token positions."""
    qb = torch.unique(positions[positions < geom.seq_len_q] // geom.block_q)
    kb = torch.unique(positions[positions < geom.seq_len_k] // geom.block_k)
    return qb, kb


def _global_structure(
    geom: Geometry, gq: torch.Tensor, gk: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Global query blocks see every key block; every query block sees the global key blocks."""
    rows = geom.arange_q()
    r1, c1 = block_range(gq, torch.zeros_like(gq), torch.full_like(gq, geom.nkb - 1))
    r2 = rows.repeat_interleave(gk.numel())
    c2 = gk.repeat(geom.nqb)
    return torch.cat([r1, r2]), torch.cat([c1, c2])


@register_pattern("global_local", aliases=("local_global",))
def global_local(
    *,
    seq_len_q: int,
    seq_len_k: int | None = None,
    block_size: BlockSize,
    global_tokens: int = 64,
    window_size: int | None = None,
    local_window_size: int | None = None,
    sparsity_ratio: float | None = None,
    density: float | None = None,
    causal: bool = False,
    device: DeviceLike = None,
) -> BlockSparseLayout:
    """The first ``global_tokens`` tokens are global, everything else uses a local window.

    Query blocks holding a global token attend to every key block; every query block attends
    to the key blocks holding global tokens; the rest is :func:`local_window` with
    ``window_size`` (alias ``local_window_size``, default 512).

    With a target ``sparsity_ratio`` (fraction of blocks computed; alias ``density``) the slice
    gets exactly ``round(target * nqb * nkb)`` blocks: the global rows stay whole, and every
    other row takes the global columns first, then the blocks of its window (when a window is
    given), then its nearest blocks, the counts spread evenly over the rows. A target below
    what the global rows alone need is a ``ValueError``.
    """
    geom = make_geometry(seq_len_q, seq_len_k, block_size, device)
    causal = check_bool("causal", causal)
    g = check_int("global_tokens", global_tokens)
    ws = resolve_alias(("window_size", "local_window_size"), (window_size, local_window_size))
    target = target_density(sparsity_ratio, density)
    gq, gk = _global_blocks(geom, torch.arange(g, dtype=torch.int64, device=geom.device))
    gr, gc = _global_structure(geom, gq, gk)
    rows = geom.arange_q()
    if target is not None:
        limit = geom.row_limit(causal)
        cap = limit + 1
        is_global = torch.zeros_like(cap, dtype=torch.bool)
        is_global[gq] = True
        k = waterfill(
            target_total(geom, target), torch.where(is_global, cap, 0), cap, "global_local",
            f"the {int(is_global.sum())} query blocks holding global tokens are kept whole",
        )
        prio = torch.zeros_like(gr)
        if ws is not None:
            lr, lc = _window_blocks(geom, rows, *_window_sides(ws, None))
            gr, gc = torch.cat([gr, lr]), torch.cat([gc, lc])
            prio = torch.cat([prio, torch.ones_like(lr)])
        keep = gc <= limit[gr]
        r, c = select_to_counts(geom, gr[keep], gc[keep], prio[keep], k, limit)
        return geom.build(r, c)
    left, right = _window_sides(ws, None)
    lr, lc = _window_blocks(geom, rows, left, right)
    return geom.build(torch.cat([gr, lr]), torch.cat([gc, lc]), causal=causal)


@register_pattern("longformer")
def longformer(
    *,
    seq_len_q: int,
    seq_len_k: int | None = None,
    block_size: BlockSize,
    window_size: int | None = None,
    attention_window: int | None = None,
    global_tokens: int = 0,
    global_indices: Sequence[int] | None = None,
    causal: bool = False,
    device: DeviceLike = None,
) -> BlockSparseLayout:
    """Longformer: sliding window plus global tokens (rows and columns of full attention).

    Args:
        window_size: total window in tokens (alias ``attention_window``, as in Hugging Face's
            Longformer; default 512): keys within ``window_size // 2`` of the query.
        global_tokens: the first ``global_tokens`` positions are global (e.g. 1 for ``[CLS]``).
        global_indices: further global token positions (any order).
    """
    geom = make_geometry(seq_len_q, seq_len_k, block_size, device)
    causal = check_bool("causal", causal)
    ws = resolve_alias(("window_size", "attention_window"), (window_size, attention_window))
    g = check_int("global_tokens", global_tokens)
    pos = [torch.arange(g, dtype=torch.int64, device=geom.device)]
    if global_indices is not None:
        idx = check_int_list("global_indices", global_indices, allow_empty=True)
        limit = max(geom.seq_len_q, geom.seq_len_k)
        bad = [i for i in idx if i >= limit]
        if bad:
            raise ValueError(f"global_indices {bad} are outside the sequences (max length {limit})")
        pos.append(torch.tensor(idx, dtype=torch.int64, device=geom.device))
    gq, gk = _global_blocks(geom, torch.cat(pos))
    gr, gc = _global_structure(geom, gq, gk)
    left, right = _window_sides(ws, None)  # type: ignore[arg-type]
    lr, lc = _window_blocks(geom, geom.arange_q(), left, right)
    return geom.build(torch.cat([gr, lr]), torch.cat([gc, lc]), causal=causal)
