"""Block patterns in the style of DeepSpeed's sparsity configs: ``fixed``, ``variable``, ``bigbird``.

They are defined on the pattern grid (cells of ``max(bq, bk)`` tokens, the layout blocks when
``bq == bk``) with the option names of DeepSpeed's ``FixedSparsityConfig``,
``VariableSparsityConfig`` and ``BigBirdSparsityConfig``. ``attention='unidirectional'`` is the
same as ``causal=True``. ``num_heads`` with ``different_layout_per_head=True`` gives one layout
per head (different global positions for ``fixed``, different random blocks otherwise: head
``h`` draws with ``seed + h``); without it one layout is shared by all heads.
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
    grid_row_limit,
    grid_to_layout,
    make_generator,
    make_geometry,
    resolve_attention,
    sample_columns,
)
from .registry import register_pattern

__all__ = ["bigbird", "fixed", "variable"]


def _grid_rows(geom: Geometry) -> torch.Tensor:
    return torch.arange(geom.nq_grid, dtype=torch.int64, device=geom.device)


def _full_rows(geom: Geometry, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    rows = rows[rows < geom.nq_grid]
    return block_range(rows, torch.zeros_like(rows), torch.full_like(rows, geom.nk_grid - 1))


def _full_cols(geom: Geometry, cols: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    cols = cols[cols < geom.nk_grid]
    p = _grid_rows(geom)
    return p.repeat_interleave(cols.numel()), cols.repeat(geom.nq_grid)


def _random_blocks(
    geom: Geometry, num: int, causal: bool, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    if num == 0:
        e = torch.zeros(0, dtype=torch.int64, device=geom.device)
        return e, e.clone()
    caps = grid_row_limit(geom, causal) + 1
    r, c = sample_columns(caps, torch.full_like(caps, num), make_generator(seed))
    return r.to(geom.device), c.to(geom.device)


def _finish(geom: Geometry, parts: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    r = torch.cat([p[0] for p in parts])
    c = torch.cat([p[1] for p in parts])
    lr, lc, _ = grid_to_layout(geom, r, c)
    return lr, lc


def _global_positions(n: int, num_local: int, num_global: int, first: int) -> torch.Tensor:
    """Global cells of a ``fixed`` axis of ``n`` cells: ``num_global`` at offset ``first`` of each
    window of ``num_local`` cells; a short last window gets them at its end if needed."""
    end = n - n % num_local
    starts = list(range(first, end, num_local))
    if end < n:
        starts.append(max(0, min(end + first, n - num_global)))
    if not starts:
        return torch.zeros(0, dtype=torch.int64)
    s = torch.tensor(starts, dtype=torch.int64)
    pos = (s[:, None] + torch.arange(num_global, dtype=torch.int64)[None, :]).reshape(-1)
    return torch.unique(pos[pos < n])


@register_pattern("fixed")
def fixed(
    *,
    seq_len_q: int,
    seq_len_k: int | None = None,
    block_size: BlockSize,
    num_local_blocks: int = 4,
    num_global_blocks: int = 1,
    attention: str = "bidirectional",
    horizontal_global_attention: bool = False,
    num_different_global_patterns: int = 1,
    num_heads: int | None = None,
    different_layout_per_head: bool = False,
    causal: bool = False,
    device: DeviceLike = None,
) -> BlockSparseLayout:
    """Sparse Transformer "fixed" pattern as DeepSpeed's ``FixedSparsityConfig``.

    The blocks are cut into windows of ``num_local_blocks``; a block attends to its whole
    window. The last ``num_global_blocks`` of every window are global: every query block
    attends to them (vertical), and with ``horizontal_global_attention`` they attend to every
    key block. With ``num_different_global_patterns > 1`` (per-head layouts), head ``h`` moves
    its global blocks ``h mod num_different_global_patterns`` places to the left.
    """
    geom = make_geometry(seq_len_q, seq_len_k, block_size, device)
    horizontal = check_bool("horizontal_global_attention", horizontal_global_attention)
    causal = resolve_attention(attention, causal, horizontal)
    nl = check_int("num_local_blocks", num_local_blocks, minimum=1)
    ng = check_int("num_global_blocks", num_global_blocks, minimum=1)
    ndiff = check_int("num_different_global_patterns", num_different_global_patterns, minimum=1)
    if nl % ng:
        raise ValueError(f"num_local_blocks ({nl}) must be a multiple of num_global_blocks ({ng})")
    if ndiff > nl // ng:
        raise ValueError(
            f"num_different_global_patterns ({ndiff}) can be at most num_local_blocks // "
            f"num_global_blocks = {nl // ng}"
        )
    if ndiff > 1 and not different_layout_per_head:
        raise ValueError("num_different_global_patterns > 1 needs different_layout_per_head=True (and num_heads)")
    p = _grid_rows(geom)

    def build(h: int) -> tuple[torch.Tensor, torch.Tensor]:
        start = (p // nl) * nl
        end = torch.clamp(start + nl, max=geom.nk_grid) - 1
        parts = [block_range(p, start, end)]
        first = nl - (1 + h % ndiff) * ng
        gk = _global_positions(geom.nk_grid, nl, ng, first).to(geom.device)
        parts.append(_full_cols(geom, gk))
        if horizontal:
            gq = _global_positions(geom.nq_grid, nl, ng, first).to(geom.device)
            parts.append(_full_rows(geom, gq))
        return _finish(geom, parts)

    return build_heads(
        geom, build, num_heads=num_heads, different_layout_per_head=different_layout_per_head, causal=causal
    )


def _variable_windows(p: torch.Tensor, sizes: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Start and end (exclusive) of the local window of each cell ``p``."""
    bounds = torch.tensor([0, *torch.cumsum(torch.tensor(sizes), 0).tolist()], dtype=torch.int64, device=p.device)
    explicit_end = int(bounds[-1])
    idx = torch.clamp(torch.searchsorted(bounds, p, right=True) - 1, max=len(sizes) - 1)
    start = bounds[idx]
    end = bounds[idx + 1]
    last = sizes[-1]
    beyond = p >= explicit_end
    bstart = explicit_end + ((p - explicit_end) // last) * last
    start = torch.where(beyond, bstart, start)
    end = torch.where(beyond, bstart + last, end)
    return start, end


@register_pattern("variable")
def variable(
    *,
    seq_len_q: int,
    seq_len_k: int | None = None,
    block_size: BlockSize,
    num_random_blocks: int = 0,
    local_window_blocks: Sequence[int] = (4,),
    global_block_indices: Sequence[int] = (0,),
    global_block_end_indices: Sequence[int] | None = None,
    attention: str = "bidirectional",
    horizontal_global_attention: bool = False,
    seed: int = 0,
    num_heads: int | None = None,
    different_layout_per_head: bool = False,
    causal: bool = False,
    device: DeviceLike = None,
) -> BlockSparseLayout:
    """DeepSpeed's ``VariableSparsityConfig``: variable local windows + global + random blocks.

    Args:
        local_window_blocks: sizes of the consecutive local windows, in blocks; the last size
            repeats to the end. A block attends to its whole window.
        global_block_indices: global blocks (every query block attends to them; with
            ``horizontal_global_attention`` they attend to everything). Indices past the
            sequence are ignored.
        global_block_end_indices: if given, global ranges ``[global_block_indices[i],
            global_block_end_indices[i])`` instead of single blocks.
        num_random_blocks: random key blocks per query block (causal: among the earlier ones),
            drawn with ``seed``.
    """
    geom = make_geometry(seq_len_q, seq_len_k, block_size, device)
    horizontal = check_bool("horizontal_global_attention", horizontal_global_attention)
    causal = resolve_attention(attention, causal, horizontal)
    nrand = check_int("num_random_blocks", num_random_blocks)
    sizes = check_int_list("local_window_blocks", local_window_blocks, minimum=1)
    starts = check_int_list("global_block_indices", global_block_indices, allow_empty=True)
    if global_block_end_indices is None:
        ends = [s + 1 for s in starts]
    else:
        ends = check_int_list("global_block_end_indices", global_block_end_indices, allow_empty=True)
        if len(ends) != len(starts):
            raise ValueError("global_block_end_indices must have the same length as global_block_indices")
        for s, e in zip(starts, ends):
            if e <= s:
                raise ValueError(f"global block range [{s}, {e}) is empty: end indices must exceed start indices")
    check_int("seed", seed)
    glob = sorted({i for s, e in zip(starts, ends) for i in range(s, e)})
    gidx = torch.tensor(glob, dtype=torch.int64, device=geom.device)
    p = _grid_rows(geom)
    start, end = _variable_windows(p, sizes)
    end = torch.clamp(end, max=geom.nk_grid) - 1

    def build(h: int) -> tuple[torch.Tensor, torch.Tensor]:
        parts = [block_range(p, start, end), _full_cols(geom, gidx)]
        if horizontal:
            parts.append(_full_rows(geom, gidx))
        parts.append(_random_blocks(geom, nrand, causal, seed + h))
        return _finish(geom, parts)

    return build_heads(
        geom, build, num_heads=num_heads, different_layout_per_head=different_layout_per_head, causal=causal
    )


@register_pattern("bigbird", aliases=("big_bird",))
def bigbird(
    *,
    seq_len_q: int,
    seq_len_k: int | None = None,
    block_size: BlockSize,
    num_global_blocks: int = 1,
    num_sliding_window_blocks: int = 3,
    num_random_blocks: int = 1,
    attention: str = "bidirectional",
    seed: int = 0,
    num_heads: int | None = None,
    different_layout_per_head: bool = False,
    causal: bool = False,
    device: DeviceLike = None,
) -> BlockSparseLayout:
    """BigBird (Zaheer et al., 2020): global + sliding window + random blocks.

    The first ``num_global_blocks`` blocks attend to everything and are attended by everything;
    block ``i`` attends to ``i - w//2 .. i + w//2`` for ``w = num_sliding_window_blocks``; and
    to ``num_random_blocks`` distinct random blocks (causal: among the earlier ones, which may
    repeat window or global blocks), drawn with ``seed``.
    """
    geom = make_geometry(seq_len_q, seq_len_k, block_size, device)
    causal = resolve_attention(attention, causal)
    ng = check_int("num_global_blocks", num_global_blocks)
    w = check_int("num_sliding_window_blocks", num_sliding_window_blocks)
    nrand = check_int("num_random_blocks", num_random_blocks)
    check_int("seed", seed)
    p = _grid_rows(geom)
    g = torch.arange(ng, dtype=torch.int64, device=geom.device)
    lo = torch.clamp(p - w // 2, min=0)
    hi = torch.clamp(p + w // 2, max=geom.nk_grid - 1)
    if w == 0:
        hi = lo - 1
    fixed_parts = [block_range(p, lo, hi), _full_rows(geom, g), _full_cols(geom, g)]

    def build(h: int) -> tuple[torch.Tensor, torch.Tensor]:
        return _finish(geom, [*fixed_parts, _random_blocks(geom, nrand, causal, seed + h)])

    return build_heads(
        geom, build, num_heads=num_heads, different_layout_per_head=different_layout_per_head, causal=causal
    )
