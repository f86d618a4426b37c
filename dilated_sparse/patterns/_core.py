"""Shared machinery of the pattern generators.

Every generator builds COO coordinates ``(query block, key block)`` with vectorised integer
arithmetic (``torch.arange`` / ``repeat_interleave`` over per-row ranges), never a token mask and
never an ``nqb x nkb`` matrix, then hands them to :meth:`BlockSparseLayout.from_coo`. Memory and
time are O(nnz) (O(nnz log nnz) for the sort inside ``from_coo`` and the target selection).

Conventions shared by all patterns (documented once here, referred to by the generators):

* **Token geometry.** Query block ``qb`` covers tokens ``[qb*bq, min((qb+1)*bq, Sq) - 1]``, key
  block ``kb`` covers ``[kb*bk, min((kb+1)*bk, Sk) - 1]``. Token-defined patterns (local window,
  global tokens, Sparse Transformer local/strided, hierarchical windows) keep a block pair iff it
  contains at least one token pair allowed by the token-level rule (an exact cover).
* **Pattern blocks.** Patterns defined on a square block grid (BigBird, DeepSpeed fixed/variable,
  butterfly, block neighbour, LongNet segments x dilation) use a grid cell of
  ``unit = max(bq, bk)`` tokens. Block sizes are powers of two, so a cell is exactly
  ``unit/bq`` query blocks by ``unit/bk`` key blocks; with ``bq == bk`` the grid is the layout.
* **Causal.** ``causal=True`` keeps a block iff its first key token is ``<=`` the last query
  token of the query block (top-left aligned, as SDPA's ``is_causal``); it is a filter applied
  to the non-causal pattern. The kernel's ``causal`` flag then masks inside diagonal blocks.
* **Target density.** As in the seed guides, ``sparsity_ratio`` is the fraction of blocks that
  are *computed* (``sparsity_ratio=0.1`` = 90 % sparse); ``density=`` is the same quantity
  under a clearer name (give one, or both equal). A pattern asked for a target reaches
  ``round(target * nqb * nkb)`` active blocks per slice exactly, spread over the rows as evenly
  as their (causal) capacity allows; ``layout.density`` reports the result. A target the
  geometry cannot reach (e.g. more than the causal half) is a ``ValueError``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ..layout import BlockSparseLayout, normalize_block_size

BlockSize = int | Sequence[int]
DeviceLike = torch.device | str | None

__all__ = ["BlockSize", "DeviceLike", "Geometry", "causal_filter", "make_geometry"]


def check_int(name: str, value: object, *, minimum: int = 0) -> int:
    """``value`` as an int ``>= minimum`` or a TypeError/ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} ({value!r})")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def check_int_list(name: str, value: object, *, minimum: int = 0, allow_empty: bool = False) -> list[int]:
    """A sequence of ints (a bare int is accepted as a one-element list)."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value]
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise TypeError(f"{name} must be a sequence of ints, got {type(value).__name__}")
    out = [check_int(f"{name}[{i}]", v, minimum=minimum) for i, v in enumerate(value)]
    if not out and not allow_empty:
        raise ValueError(f"{name} must not be empty")
    return out


def check_bool(name: str, value: object) -> bool:
    """``value`` as a bool or a TypeError naming ``name``."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


def resolve_alias(names: Sequence[str], values: Sequence[object]) -> object:
    """The one value given among aliases ``names`` (None if none); ValueError if they differ."""
    given = [(n, v) for n, v in zip(names, values) if v is not None]
    if len(given) > 1 and any(v != given[0][1] for _, v in given[1:]):
        listed = ", ".join(f"{n}={v!r}" for n, v in given)
        raise ValueError(f"{' and '.join(names)} are aliases; got conflicting values {listed}")
    return given[0][1] if given else None


def resolve_attention(attention: str, causal: bool, horizontal: bool = False) -> bool:
    """DeepSpeed's ``attention='unidirectional'|'bidirectional'`` merged with ``causal``."""
    if attention not in ("bidirectional", "unidirectional"):
        raise ValueError(f"attention must be 'bidirectional' or 'unidirectional', got {attention!r}")
    causal = check_bool("causal", causal) or attention == "unidirectional"
    if horizontal and causal:
        raise ValueError(
            "horizontal_global_attention needs bidirectional, non-causal attention "
            "(a global query row would see future keys)"
        )
    return causal


def target_density(sparsity_ratio: float | None, density: float | None) -> float | None:
    """The target block density (fraction of blocks computed), or None when no target is given.

    ``sparsity_ratio`` follows the seed guides: the fraction of blocks *computed* (0.1 = 90 %
    sparse). ``density`` is an alias; giving both with different values is a ``ValueError``.
    """
    for name, v in (("sparsity_ratio", sparsity_ratio), ("density", density)):
        if v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise TypeError(f"{name} must be a float in [0, 1], got {type(v).__name__}")
        if math.isnan(float(v)) or not 0.0 <= float(v) <= 1.0:
            raise ValueError(f"{name} must be in [0, 1] (the fraction of blocks computed), got {v}")
    if sparsity_ratio is not None and density is not None and float(sparsity_ratio) != float(density):
        raise ValueError(
            f"sparsity_ratio={sparsity_ratio} and density={density} disagree; both are the fraction of "
            "blocks computed, give one of them"
        )
    value = sparsity_ratio if sparsity_ratio is not None else density
    return None if value is None else float(value)


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class Geometry:
    """Sizes of one layout slice and the per-row helper vectors every generator needs."""

    seq_len_q: int
    seq_len_k: int
    block_q: int
    block_k: int
    device: torch.device

    @property
    def block_size(self) -> tuple[int, int]:
        """``(block_q, block_k)``."""
        return (self.block_q, self.block_k)

    @property
    def nqb(self) -> int:
        """Number of query blocks."""
        return _ceil_div(self.seq_len_q, self.block_q)

    @property
    def nkb(self) -> int:
        """Number of key blocks."""
        return _ceil_div(self.seq_len_k, self.block_k)

    # token extents of the query blocks -------------------------------------------------
    def arange_q(self) -> torch.Tensor:
        """int64 ``[nqb]``: the query block ids."""
        return torch.arange(self.nqb, dtype=torch.int64, device=self.device)

    def q_start(self) -> torch.Tensor:
        """First token of each query block."""
        return self.arange_q() * self.block_q

    def q_end(self) -> torch.Tensor:
        """Last token of each query block (the last block may be partial)."""
        return torch.clamp((self.arange_q() + 1) * self.block_q, max=self.seq_len_q) - 1

    def causal_limit(self) -> torch.Tensor:
        """Last key block a query block may use under ``causal`` (start <= its last token)."""
        return torch.clamp(self.q_end() // self.block_k, max=self.nkb - 1)

    def row_limit(self, causal: bool) -> torch.Tensor:
        """Last usable key block per query block."""
        if causal:
            return self.causal_limit()
        return torch.full((self.nqb,), self.nkb - 1, dtype=torch.int64, device=self.device)

    def nearness(self, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """Sort key of key block ``cols`` for query block ``rows``: nearer first, ties to the past.

        ``2 * gap + after``, where ``gap`` is the number of tokens between the two blocks' token
        spans (0 when they overlap) and ``after`` is 1 for a key block after the query block.
        """
        qs = rows * self.block_q
        qe = torch.clamp(qs + self.block_q, max=self.seq_len_q) - 1
        ks = cols * self.block_k
        ke = torch.clamp(ks + self.block_k, max=self.seq_len_k) - 1
        after = ks > qe
        gap = torch.where(after, ks - qe, torch.clamp(qs - ke, min=0))
        return gap * 2 + after.long()

    # pattern grid ------------------------------------------------------------------------
    @property
    def unit(self) -> int:
        """Tokens per pattern-grid cell: ``max(block_q, block_k)``."""
        return max(self.block_q, self.block_k)

    @property
    def nq_grid(self) -> int:
        """Query cells of the pattern grid."""
        return _ceil_div(self.seq_len_q, self.unit)

    @property
    def nk_grid(self) -> int:
        """Key cells of the pattern grid."""
        return _ceil_div(self.seq_len_k, self.unit)

    def build(
        self,
        rows: torch.Tensor,
        cols: torch.Tensor,
        *,
        causal: bool = False,
        slices: torch.Tensor | None = None,
        layout_heads: int = 1,
        layout_batch: int = 1,
    ) -> BlockSparseLayout:
        """A validated layout from layout-level COO (duplicates merged, causal applied)."""
        if causal:
            keep = cols <= self.causal_limit()[rows]
            rows, cols = rows[keep], cols[keep]
            if slices is not None:
                slices = slices[keep]
        return BlockSparseLayout.from_coo(
            rows,
            cols,
            slice_indices=slices,
            block_size=self.block_size,
            seq_len_q=self.seq_len_q,
            seq_len_k=self.seq_len_k,
            layout_batch=layout_batch,
            layout_heads=layout_heads,
        )


def make_geometry(
    seq_len_q: int, seq_len_k: int | None, block_size: BlockSize, device: DeviceLike = None
) -> Geometry:
    """Check the common arguments and return the :class:`Geometry` of one slice."""
    bq, bk = normalize_block_size(block_size)
    seq_len_q = check_int("seq_len_q", seq_len_q, minimum=1)
    seq_len_k = seq_len_q if seq_len_k is None else check_int("seq_len_k", seq_len_k, minimum=1)
    dev = torch.device("cpu") if device is None else torch.device(device)
    return Geometry(seq_len_q, seq_len_k, bq, bk, dev)


# ------------------------------------------------------------------------------ COO helpers
def expand_ranges(
    rows: torch.Tensor, start: torch.Tensor, count: torch.Tensor, step: int | torch.Tensor = 1
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Arithmetic progressions per row: ``start[i] + step * j`` for ``j < count[i]``.

    Returns ``(row, col, j)`` flattened in row order; O(total) time and memory.
    """
    count = torch.clamp(count, min=0)
    total = int(count.sum()) if count.numel() else 0
    dev = rows.device
    if total == 0:
        empty = torch.zeros(0, dtype=torch.int64, device=dev)
        return empty, empty.clone(), empty.clone()
    rep_rows = torch.repeat_interleave(rows, count, output_size=total)
    offsets = torch.cumsum(count, 0) - count
    j = torch.arange(total, dtype=torch.int64, device=dev) - torch.repeat_interleave(offsets, count, output_size=total)
    if isinstance(step, torch.Tensor):
        step = torch.repeat_interleave(step, count, output_size=total)
    cols = torch.repeat_interleave(start, count, output_size=total) + step * j
    return rep_rows, cols, j


def block_range(
    rows: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """All blocks ``lo[i]..hi[i]`` (inclusive) of each row; empty where ``hi < lo``."""
    r, c, _ = expand_ranges(rows, lo, hi - lo + 1)
    return r, c


def token_span_to_blocks(
    geom: Geometry, rows: torch.Tensor, lo_tok: torch.Tensor, hi_tok: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Key blocks overlapping the key-token interval ``[lo_tok, hi_tok]`` of each row."""
    lo = torch.clamp(lo_tok, min=0)
    hi = torch.clamp(hi_tok, max=geom.seq_len_k - 1)
    valid = lo <= hi
    lo_b = torch.where(valid, lo // geom.block_k, torch.ones_like(lo))
    hi_b = torch.where(valid, hi // geom.block_k, torch.zeros_like(hi))
    return block_range(rows, lo_b, hi_b)


def grid_to_layout(
    geom: Geometry, rows: torch.Tensor, cols: torch.Tensor, prio: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Expand pattern-grid cells into the layout blocks they consist of."""
    fq, fk = geom.unit // geom.block_q, geom.unit // geom.block_k
    if fq == 1 and fk == 1:
        return rows, cols, prio
    a = torch.arange(fq, dtype=torch.int64, device=rows.device)
    b = torch.arange(fk, dtype=torch.int64, device=rows.device)
    r = (rows[:, None, None] * fq + a[None, :, None]).expand(-1, fq, fk).reshape(-1)
    c = (cols[:, None, None] * fk + b[None, None, :]).expand(-1, fq, fk).reshape(-1)
    keep = (r < geom.nqb) & (c < geom.nkb)
    p = None if prio is None else prio[:, None, None].expand(-1, fq, fk).reshape(-1)[keep]
    return r[keep], c[keep], p


def grid_row_limit(geom: Geometry, causal: bool) -> torch.Tensor:
    """Last usable key cell of each query cell of the pattern grid."""
    p = torch.arange(geom.nq_grid, dtype=torch.int64, device=geom.device)
    if causal:
        return torch.clamp(p, max=geom.nk_grid - 1)
    return torch.full_like(p, geom.nk_grid - 1)


def lexsort(keys: Sequence[torch.Tensor]) -> torch.Tensor:
    """Stable permutation sorting by integer ``keys[0]``, then ``keys[1]``, ... (same length).

    The keys are packed into one int64 key (one sort) when their value ranges allow, otherwise
    sorted one after the other with stable sorts.
    """
    n = keys[0].numel()
    dev = keys[0].device
    if n == 0:
        return torch.zeros(0, dtype=torch.int64, device=dev)
    packed = torch.zeros(n, dtype=torch.int64, device=dev)
    span = 1
    for key in keys:
        lo, hi = int(key.min()), int(key.max())
        width = hi - lo + 1
        span *= width
        if span >= 2**62:
            break
        packed = packed * width + (key.to(torch.int64) - lo)
    else:
        return torch.argsort(packed, stable=True)
    order = torch.arange(n, dtype=torch.int64, device=dev)
    for key in reversed(keys):
        order = order[torch.argsort(key[order], stable=True)]
    return order


def rank_in_group(sorted_groups: torch.Tensor, num_groups: int) -> torch.Tensor:
    """Position of each element within its group, for elements already sorted by group."""
    counts = torch.bincount(sorted_groups, minlength=num_groups)
    starts = torch.cumsum(counts, 0) - counts
    return torch.arange(sorted_groups.numel(), device=sorted_groups.device) - starts[sorted_groups]


# -------------------------------------------------------------------------- target density
def target_total(geom: Geometry, density: float) -> int:
    """Active blocks per slice for a target density."""
    return round(density * geom.nqb * geom.nkb)


def waterfill(
    total: int, lo: torch.Tensor, hi: torch.Tensor, what: str = "pattern", hint: str = ""
) -> torch.Tensor:
    """Per-row counts ``k`` with ``lo <= k <= hi`` summing to ``total``, as even as possible.

    Rows are filled to a common level ``lam`` (``k = clamp(lam, lo, hi)``); the remainder goes
    one block each to rows spread evenly over those that can still grow.
    """
    lo_sum, hi_sum = int(lo.sum()), int(hi.sum())
    if not lo_sum <= total <= hi_sum:
        raise ValueError(
            f"{what}: sparsity_ratio/density asks for {total} active blocks per slice, which this "
            f"geometry cannot reach: it allows between {lo_sum} and {hi_sum}"
            + (f" ({hint})" if hint else "")
        )
    a, b = 0, int(hi.max()) if hi.numel() else 0
    while a < b:  # largest lam with sum(clamp(lam, lo, hi)) <= total
        mid = (a + b + 1) // 2
        if int(torch.maximum(torch.minimum(hi, torch.full_like(hi, mid)), lo).sum()) <= total:
            a = mid
        else:
            b = mid - 1
    k = torch.maximum(torch.minimum(hi, torch.full_like(hi, a)), lo)
    extra = total - int(k.sum())
    if extra > 0:
        eligible = torch.nonzero((lo <= a) & (hi >= a + 1)).flatten()
        pick = (torch.arange(extra, device=k.device) * eligible.numel()) // extra
        k[eligible[pick]] += 1
    return k


def dedupe_min_prio(
    rows: torch.Tensor, cols: torch.Tensor, prio: torch.Tensor, nkb: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Merge duplicate (row, col) entries, keeping the smallest priority value."""
    if rows.numel() == 0:
        return rows, cols, prio
    key = rows * nkb + cols
    order = lexsort([key, prio])
    k = key[order]
    first = torch.ones_like(k, dtype=torch.bool)
    first[1:] = k[1:] != k[:-1]
    sel = order[first]
    return rows[sel], cols[sel], prio[sel]


def select_to_counts(
    geom: Geometry,
    rows: torch.Tensor,
    cols: torch.Tensor,
    prio: torch.Tensor,
    k: torch.Tensor,
    limit: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exactly ``k[r]`` key blocks per query block ``r`` (layout level).

    Candidates (``rows``, ``cols``) are taken lower ``prio`` first, then nearer the query block
    (:meth:`Geometry.nearness`: token gap, ties to the past), then lower column, up to ``k[r]``;
    rows with fewer candidates are completed with the nearest other key blocks in
    ``[0, limit[r]]``. ``k[r] <= limit[r] + 1`` is required. O(candidates + sum(k)).
    """
    nqb, nkb = geom.nqb, geom.nkb
    rows, cols, prio = dedupe_min_prio(rows, cols, prio, nkb)
    if rows.numel():
        order = lexsort([rows, prio, geom.nearness(rows, cols), cols])
        rows, cols = rows[order], cols[order]
        keep = rank_in_group(rows, nqb) < k[rows]
        rows, cols = rows[keep], cols[keep]
    need = k - torch.bincount(rows, minlength=nqb)
    fill_rows = torch.nonzero(need > 0).flatten()
    if fill_rows.numel() == 0:
        return rows, cols
    # The k nearest blocks of a row lie within k blocks of the key blocks its tokens overlap.
    kk = k[fill_rows]
    first = torch.clamp(geom.q_start()[fill_rows] // geom.block_k, max=nkb - 1)
    last = torch.clamp(geom.q_end()[fill_rows] // geom.block_k, max=nkb - 1)
    lo = torch.clamp(first - kk, min=0)
    hi = torch.minimum(limit[fill_rows], last + kk)
    fr, fc = block_range(fill_rows, lo, hi)
    fresh = ~torch.isin(fr * nkb + fc, rows * nkb + cols)
    fr, fc = fr[fresh], fc[fresh]
    order = lexsort([fr, geom.nearness(fr, fc), fc])
    fr, fc = fr[order], fc[order]
    keep = rank_in_group(fr, nqb) < need[fr]
    return torch.cat([rows, fr[keep]]), torch.cat([cols, fc[keep]])


# ------------------------------------------------------------------------------- random
def make_generator(seed: int) -> torch.Generator:
    """A CPU generator seeded with ``seed`` (random layouts are drawn on the CPU, then moved)."""
    check_int("seed", seed)
    g = torch.Generator(device="cpu")
    g.manual_seed(seed)
    return g


def sample_columns(
    caps: torch.Tensor, k: torch.Tensor, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """``k[i]`` distinct uniform columns in ``[0, caps[i])`` for every row ``i`` (CPU tensors).

    Returns ``(row, col)``. Dense requests score every allowed cell (O(sum caps), at most four
    times the output); sparse ones use rejection sampling (O(sum k)). Deterministic for a
    given generator state.
    """
    caps = caps.cpu()
    k = torch.minimum(k.cpu(), caps)
    n = caps.numel()
    rows_all = torch.arange(n, dtype=torch.int64)
    total_k = int(k.sum()) if n else 0
    if total_k == 0:
        empty = torch.zeros(0, dtype=torch.int64)
        return empty, empty.clone()
    if 4 * total_k >= int(caps.sum()):
        r, c, _ = expand_ranges(rows_all, torch.zeros_like(caps), caps)
    else:
        width = int(caps.max())
        have = torch.zeros(0, dtype=torch.int64)
        need = k.clone()
        while True:
            todo = torch.nonzero(need > 0).flatten()
            if todo.numel() == 0:
                break
            dr, _, _ = expand_ranges(todo, torch.zeros_like(todo), 2 * need[todo] + 4)
            dc = (torch.rand(dr.numel(), generator=generator, dtype=torch.float64) * caps[dr]).long()
            dc = torch.minimum(dc, caps[dr] - 1)
            have = torch.unique(torch.cat([have, dr * width + dc]))
            need = torch.clamp(k - torch.bincount(have // width, minlength=n), min=0)
        r, c = have // width, have % width
    score = torch.randint(0, 2**40, (r.numel(),), generator=generator, dtype=torch.int64)
    order = lexsort([r, score])
    r, c = r[order], c[order]
    keep = rank_in_group(r, n) < k[r]
    return r[keep], c[keep]


# ----------------------------------------------------------------------------- per head
def build_heads(
    geom: Geometry,
    build_slice: Callable[[int], tuple[torch.Tensor, torch.Tensor]],
    *,
    num_heads: int | None,
    different_layout_per_head: bool,
    causal: bool,
) -> BlockSparseLayout:
    """One shared slice, or ``num_heads`` slices when ``different_layout_per_head``.

    ``build_slice(h)`` returns layout-level ``(rows, cols)`` for head ``h``. A shared layout
    (``layout_heads == 1``) is used for every head by the kernels, so ``num_heads`` alone does
    not replicate it.
    """
    different = check_bool("different_layout_per_head", different_layout_per_head)
    if num_heads is not None:
        check_int("num_heads", num_heads, minimum=1)
    if different and num_heads is None:
        raise ValueError("different_layout_per_head=True needs num_heads")
    if not different:
        rows, cols = build_slice(0)
        return geom.build(rows, cols, causal=causal)
    assert num_heads is not None
    parts = [build_slice(h) for h in range(num_heads)]
    rows = torch.cat([r for r, _ in parts])
    cols = torch.cat([c for _, c in parts])
    slices = torch.cat(
        [torch.full_like(r, h) for h, (r, _) in enumerate(parts)]
    )
    return geom.build(rows, cols, causal=causal, slices=slices, layout_heads=num_heads)


# ------------------------------------------------------------------------------ stacking
def stack_layouts(
    layouts: Sequence[BlockSparseLayout], *, layout_batch: int, layout_heads: int
) -> BlockSparseLayout:
    """Concatenate the slices of ``layouts`` (same sizes) into one ``(Lb, Lh)`` layout."""
    first = layouts[0]
    crows, cols, offset = [], [], 0
    for lay in layouts:
        crow = lay.crow_indices.to(first.device, torch.int64)
        crows.append(crow[:-1] + offset)
        cols.append(lay.col_indices.to(first.device))
        offset += lay.nnz
    crows.append(torch.tensor([offset], dtype=torch.int64, device=first.device))
    return BlockSparseLayout(
        torch.cat(crows),
        torch.cat(cols),
        block_size=first.block_size,
        seq_len_q=first.seq_len_q,
        seq_len_k=first.seq_len_k,
        layout_batch=layout_batch,
        layout_heads=layout_heads,
    )


def check_same_geometry(layouts: Sequence[BlockSparseLayout], what: str) -> None:
    """ValueError unless all layouts share block size and sequence lengths."""
    for i, lay in enumerate(layouts):
        if not isinstance(lay, BlockSparseLayout):
            raise TypeError(f"{what}: item {i} is a {type(lay).__name__}, expected a BlockSparseLayout")
    first = layouts[0]
    for i, lay in enumerate(layouts[1:], 1):
        if (lay.block_size, lay.seq_len_q, lay.seq_len_k) != (first.block_size, first.seq_len_q, first.seq_len_k):
            raise ValueError(
                f"{what}: layout {i} has block_size={lay.block_size}, seq_len_q={lay.seq_len_q}, "
                f"seq_len_k={lay.seq_len_k} but layout 0 has block_size={first.block_size}, "
                f"seq_len_q={first.seq_len_q}, seq_len_k={first.seq_len_k}"
            )


def causal_filter(layout: BlockSparseLayout) -> BlockSparseLayout:
    """``layout`` without the blocks wholly after their query block (top-left aligned causal).

    Keeps block ``(qb, kb)`` iff ``kb * block_k <= `` the last token of ``qb``, the rule every
    generator's ``causal=True`` applies. O(nnz); slices are kept.
    """
    if not isinstance(layout, BlockSparseLayout):
        raise TypeError(f"layout must be a BlockSparseLayout, got {type(layout).__name__}")
    nqb = layout.num_query_blocks
    stacked = layout.row_ids()
    rows = stacked % nqb
    cols = layout.col_indices.to(torch.int64)
    q_end = torch.clamp((rows + 1) * layout.block_q, max=layout.seq_len_q) - 1
    keep = cols * layout.block_k <= q_end
    if bool(keep.all()):
        return layout
    return BlockSparseLayout.from_coo(
        rows[keep],
        cols[keep],
        slice_indices=(stacked // nqb)[keep],
        block_size=layout.block_size,
        seq_len_q=layout.seq_len_q,
        seq_len_k=layout.seq_len_k,
        layout_batch=layout.layout_batch,
        layout_heads=layout.layout_heads,
    )
