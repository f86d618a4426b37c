"""LongNet dilated attention at block granularity, and hierarchical multi-level windows.

LongNet (Ding et al., 2023) splits the sequence into segments of ``w_i`` tokens and, inside each
segment, keeps every ``r_i``-th position; head ``h`` uses the offset ``h mod r_i`` so the heads
together cover all positions. The branches ``(w_i, r_i)`` are combined.

At block granularity (``dilated_sparse``): segments are ``w_i`` tokens rounded down to whole
pattern blocks (at least one; pattern blocks are ``max(bq, bk)`` tokens, i.e. the layout blocks
when ``bq == bk``) and the dilation ``r_i`` counts **blocks**:

* per head (``num_heads`` with ``different_layout_per_head=True``): LongNet exactly, with blocks
  for tokens: in segment ``[a, b)``, head ``h`` keeps the block pairs ``(p, p')`` with
  ``p - a == p' - a == h mod r_i (mod r_i)``;
* shared (default, one layout for every head): the union over the offsets, i.e. query block
  ``p`` sees the blocks ``p'`` of its segment with ``(p' - p) % r_i == 0``. Each branch keeps
  ``1 / r_i`` of a segment's block pairs, the fraction of token pairs a LongNet branch covers
  over all its heads.

The layout is the union of the branches. With a target ``sparsity_ratio`` (the fraction of
blocks computed, as in the seed guides; alias ``density``) the slice gets exactly
``round(target * nqb * nkb)`` blocks, spread evenly over the query blocks; each query block
chooses blocks of the dilated structure by the number of dilation steps from the diagonal (so
``0, +-1, +-2, +-4, ...`` for rates ``1, 2, 4``) and completes a short row with the nearest
blocks.

Defaults: ``dilation_rates`` ``1, 2, 4, 8`` (or ``2**i`` for branch ``i`` when only
``segment_lengths`` is given). Without ``segment_lengths``, a target keeps one segment spanning
the sequence per branch; without a target either, branch ``i`` gets segments of
``DEFAULT_SEGMENT_BLOCKS * r_i`` pattern blocks (LongNet's geometric segments, constant
``w_i / r_i``: about ``DEFAULT_SEGMENT_BLOCKS`` blocks per row and branch), since a single
rate-1 segment over the whole sequence would be dense.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ..layout import BlockSparseLayout
from ._core import (
    BlockSize,
    DeviceLike,
    build_heads,
    check_bool,
    check_int,
    check_int_list,
    expand_ranges,
    grid_to_layout,
    make_geometry,
    resolve_alias,
    select_to_counts,
    target_density,
    target_total,
    token_span_to_blocks,
    waterfill,
)
from .registry import register_pattern

__all__ = ["DEFAULT_HIERARCHICAL_LEVELS", "dilated_sparse", "hierarchical"]

DEFAULT_DILATION_RATES = (1, 2, 4, 8)
DEFAULT_SEGMENT_BLOCKS = 4


@register_pattern("dilated_sparse", aliases=("dilated", "longnet"))
def dilated_sparse(
    *,
    seq_len_q: int,
    seq_len_k: int | None = None,
    block_size: BlockSize,
    segment_lengths: Sequence[int] | None = None,
    dilation_rates: Sequence[int] | None = None,
    sparsity_ratio: float | None = None,
    density: float | None = None,
    num_heads: int | None = None,
    different_layout_per_head: bool = False,
    causal: bool = False,
    device: DeviceLike = None,
) -> BlockSparseLayout:
    """LongNet segments x dilation as blocks (see the module docstring for the exact rule).

    Args:
        segment_lengths: segment length per branch, in tokens, rounded down to whole pattern
            blocks (at least one); see the module docstring for the default.
        dilation_rates: dilation per branch, in blocks (default ``1, 2, 4, 8`` without
            segments, ``2**i`` for branch ``i`` with them); same length as segment_lengths.
        sparsity_ratio: optional target, the fraction of blocks computed (alias ``density``);
            met exactly per slice (see above).
        num_heads, different_layout_per_head: LongNet's per-head offsets (``layout_heads =
            num_heads``); otherwise one shared layout (the union over offsets).
        causal: keep only blocks not wholly after the query block.
    """
    geom = make_geometry(seq_len_q, seq_len_k, block_size, device)
    causal = check_bool("causal", causal)
    target = target_density(sparsity_ratio, density)
    n_grid = max(geom.nq_grid, geom.nk_grid)
    if segment_lengths is None:
        rates = list(DEFAULT_DILATION_RATES) if dilation_rates is None else check_int_list(
            "dilation_rates", dilation_rates, minimum=1)
        if target is None:
            segs = [min(n_grid, DEFAULT_SEGMENT_BLOCKS * r) for r in rates]
        else:
            segs = [n_grid] * len(rates)
    else:
        seg_tokens = check_int_list("segment_lengths", segment_lengths, minimum=1)
        if dilation_rates is None:
            rates = [2**i for i in range(len(seg_tokens))]
        else:
            rates = check_int_list("dilation_rates", dilation_rates, minimum=1)
        if len(rates) != len(seg_tokens):
            raise ValueError(
                f"segment_lengths and dilation_rates must have the same length, got "
                f"{len(seg_tokens)} and {len(rates)}"
            )
        segs = [max(1, s // geom.unit) for s in seg_tokens]
    fk = geom.unit // geom.block_k
    limit = geom.row_limit(causal)
    k = None
    steps = None
    if target is not None:
        k = waterfill(target_total(geom, target), torch.zeros_like(limit), limit + 1, "dilated_sparse")
        k_max = int(k.max()) if k.numel() else 0
        steps = max(1, -(-k_max // fk))  # steps 0..steps-1 of one branch already fill a row
    p = torch.arange(geom.nq_grid, dtype=torch.int64, device=geom.device)
    nk = geom.nk_grid

    def build(h: int) -> tuple[torch.Tensor, torch.Tensor]:
        rows, cols, prios = [], [], []
        per_head = different_layout_per_head
        for s, r in zip(segs, rates):
            a = (p // s) * s
            b = torch.clamp(a + s, max=nk)
            lo, hi = a, b - 1
            if steps is not None:
                lo = torch.maximum(lo, p - (steps - 1) * r)
                hi = torch.minimum(hi, p + (steps - 1) * r)
            first = lo + torch.remainder(p - lo, r)
            count = torch.where(first <= hi, (hi - first) // r + 1, torch.zeros_like(first))
            if per_head:
                count = torch.where(torch.remainder(p - a, r) == h % r, count, torch.zeros_like(count))
            gr, gc, _ = expand_ranges(p, first, count, step=r)
            rows.append(gr)
            cols.append(gc)
            if steps is not None:
                off = gc - gr
                prios.append(((off.abs() // r) * (nk + 1) + off.abs()) * 2 + (off > 0).long())
        gr, gc = torch.cat(rows), torch.cat(cols)
        prio = torch.cat(prios) if prios else None
        lr, lc, lp = grid_to_layout(geom, gr, gc, prio)
        if k is None:
            return lr, lc
        keep = lc <= limit[lr]
        assert lp is not None
        return select_to_counts(geom, lr[keep], lc[keep], lp[keep], k, limit)

    return build_heads(
        geom, build, num_heads=num_heads, different_layout_per_head=different_layout_per_head, causal=causal
    )


DEFAULT_HIERARCHICAL_LEVELS: tuple[dict[str, int], ...] = (
    {"stride": 64, "window_size": 256, "block_size": 64},
    {"stride": 256, "window_size": 1024, "block_size": 128},
    {"stride": 1024, "window_size": -1, "block_size": 256},
)
_LEVEL_KEYS = ("stride", "window_size", "block_size")


def _check_level(i: int, level: Any) -> tuple[int, int, int]:
    if not isinstance(level, Mapping):
        raise TypeError(f"levels[{i}] must be a dict with keys {', '.join(_LEVEL_KEYS)}, got {type(level).__name__}")
    unknown = sorted(set(level) - set(_LEVEL_KEYS))
    if unknown:
        raise TypeError(f"levels[{i}] has unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(_LEVEL_KEYS)}")
    if "window_size" not in level:
        raise ValueError(f"levels[{i}] needs 'window_size' (tokens, -1 = global)")
    stride = check_int(f"levels[{i}]['stride']", level.get("stride", 1), minimum=1)
    window = check_int(f"levels[{i}]['window_size']", level["window_size"], minimum=-1)
    gran = check_int(f"levels[{i}]['block_size']", level.get("block_size", 1), minimum=1)
    return stride, window, gran


@register_pattern("hierarchical")
def hierarchical(
    *,
    seq_len_q: int,
    seq_len_k: int | None = None,
    block_size: BlockSize,
    levels: Sequence[Mapping[str, int]] | None = None,
    level_configs: Sequence[Mapping[str, int]] | None = None,
    causal: bool = False,
    device: DeviceLike = None,
) -> BlockSparseLayout:
    """Multi-level windows: the union over ``levels`` (alias ``level_configs``).

    Each level is ``{"stride", "window_size", "block_size"}`` in tokens. A query block takes
    part in a level when it holds a position that is a multiple of ``stride``; it then sees the
    keys within ``window_size // 2`` tokens of its own tokens (``window_size == -1``: every
    key), with the window's ends rounded outward to multiples of the level's ``block_size``
    (its granularity: coarse levels see coarse, aligned spans). Fine levels with stride 1 give
    every block a local window; coarse levels give a few blocks a wide or global view. Default
    levels: :data:`DEFAULT_HIERARCHICAL_LEVELS`.
    """
    geom = make_geometry(seq_len_q, seq_len_k, block_size, device)
    causal = check_bool("causal", causal)
    lv = resolve_alias(("levels", "level_configs"), (levels, level_configs))
    lv = DEFAULT_HIERARCHICAL_LEVELS if lv is None else lv
    if isinstance(lv, Mapping) or not isinstance(lv, Sequence) or not lv:
        raise TypeError("levels must be a non-empty list of dicts {'stride', 'window_size', 'block_size'}")
    rows_all = geom.arange_q()
    qs, qe = geom.q_start(), geom.q_end()
    out_r, out_c = [], []
    for i, level in enumerate(lv):
        stride, window, gran = _check_level(i, level)
        first_multiple = -torch.div(-qs, stride, rounding_mode="floor") * stride
        rows = rows_all[first_multiple <= qe]
        if window < 0:
            lo = torch.zeros_like(rows)
            hi = torch.full_like(rows, geom.seq_len_k - 1)
        else:
            lo = torch.div(qs[rows] - window // 2, gran, rounding_mode="floor") * gran
            hi = (torch.div(qe[rows] + window // 2, gran, rounding_mode="floor") + 1) * gran - 1
        r, c = token_span_to_blocks(geom, rows, lo, hi)
        out_r.append(r)
        out_c.append(c)
    return geom.build(torch.cat(out_r), torch.cat(out_c), causal=causal)
