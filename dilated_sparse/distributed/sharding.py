"""How a sequence is split over the ranks of a process group (sequence / context parallelism).

A :class:`SequenceSharding` gives every rank an ordered list of token segments ``[start, end)``;
a rank's local tensor is the concatenation of its segments along the sequence dim. Segment
boundaries fall on whole blocks (multiples of ``unit = max(block_q, block_k)``), except the end
of the sequence, so a block never straddles two ranks and the tail block (a partial one when the
sequence is not a multiple of the block) is the last block of the rank that holds it.

Three splits are offered:

* :func:`contiguous_sharding`: rank ``r`` holds one contiguous range; the ``ceil(S / unit)``
  block units are dealt out as evenly as possible (ranks past the end get an empty shard).
* :func:`zigzag_sharding`: the units are cut into ``2 W`` chunks and rank ``r`` holds chunks
  ``r`` and ``2 W - 1 - r``. With a causal layout a contiguous split gives the last rank the most
  key blocks per query; the zig-zag (striped) split pairs an early chunk with a late one, so
  every rank gets about the same work.
* :func:`balanced_sharding`: a contiguous split whose boundaries are placed by the work per query
  block (active blocks from the layout, after the causal / window rules), for layouts whose rows
  carry uneven work.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..layout import BlockSparseLayout

__all__ = [
    "SequenceSharding",
    "balanced_sharding",
    "block_work",
    "contiguous_sharding",
    "make_sharding",
    "zigzag_sharding",
]

Segment = tuple[int, int]


def _units(seq_len: int, unit: int) -> int:
    return -(-seq_len // unit)


def _split_counts(total: int, parts: int) -> list[int]:
    """``total`` items dealt into ``parts`` counts, the first ``total % parts`` one larger."""
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


@dataclass(frozen=True)
class SequenceSharding:
    """Which token segments of a length-``seq_len`` sequence each rank holds.

    Args:
        seq_len: total sequence length ``S``.
        segments: per rank, a tuple of ``(start, end)`` token ranges, ascending and disjoint;
            all ranks together cover ``[0, S)`` exactly once. Empty tuples are empty shards.
        unit: the block alignment every boundary but ``S`` obeys (``max(block_q, block_k)``).
        name: a label (``"contiguous"``, ``"zigzag"``, ``"balanced"``, ``"custom"``).
    """

    seq_len: int
    segments: tuple[tuple[Segment, ...], ...]
    unit: int
    name: str = "custom"

    def __post_init__(self) -> None:
        covered: list[Segment] = []
        for rank, segs in enumerate(self.segments):
            last_end = -1
            for start, end in segs:
                if not (0 <= start < end <= self.seq_len):
                    raise ValueError(f"rank {rank}: segment ({start}, {end}) is empty or outside [0, {self.seq_len})")
                if start < last_end:
                    raise ValueError(f"rank {rank}: segments must be ascending and disjoint, got {segs}")
                for edge in (start, end):
                    if edge != self.seq_len and edge % self.unit:
                        raise ValueError(
                            f"rank {rank}: segment boundary {edge} is not a multiple of the block unit "
                            f"{self.unit} (only the sequence end {self.seq_len} may be)"
                        )
                last_end = end
                covered.append((start, end))
        covered.sort()
        position = 0
        for start, end in covered:
            if start != position:
                raise ValueError(f"segments must tile [0, {self.seq_len}) exactly; gap or overlap at token {position}")
            position = end
        if position != self.seq_len:
            raise ValueError(f"segments must tile [0, {self.seq_len}) exactly; they end at {position}")

    @property
    def world_size(self) -> int:
        """Number of ranks."""
        return len(self.segments)

    def local_length(self, rank: int) -> int:
        """Tokens held by ``rank``."""
        return sum(end - start for start, end in self.segments[rank])

    def local_lengths(self) -> list[int]:
        """Tokens held by every rank."""
        return [self.local_length(r) for r in range(self.world_size)]

    def positions(self, rank: int, device: torch.device | str | None = None) -> torch.Tensor:
        """int64 ``[local_length(rank)]``: the global token position of each local token."""
        parts = [torch.arange(start, end, dtype=torch.int64) for start, end in self.segments[rank]]
        out = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int64)
        return out if device is None else out.to(device)

    def split(self, x: torch.Tensor, rank: int, dim: int = 1) -> torch.Tensor:
        """``rank``'s shard of a full-sequence tensor (views concatenated along ``dim``)."""
        if x.shape[dim] != self.seq_len:
            raise ValueError(f"split: dim {dim} has {x.shape[dim]} entries, the sharding covers {self.seq_len}")
        parts = [x.narrow(dim, start, end - start) for start, end in self.segments[rank]]
        if not parts:
            return x.narrow(dim, 0, 0)
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=dim)

    def assemble(self, shards: Sequence[torch.Tensor], dim: int = 1) -> torch.Tensor:
        """The full-sequence tensor from every rank's shard (inverse of :meth:`split`)."""
        if len(shards) != self.world_size:
            raise ValueError(f"assemble: expected {self.world_size} shards, got {len(shards)}")
        pieces: list[tuple[int, torch.Tensor]] = []
        for rank, shard in enumerate(shards):
            if shard.shape[dim] != self.local_length(rank):
                raise ValueError(
                    f"assemble: rank {rank}'s shard has {shard.shape[dim]} tokens, expected {self.local_length(rank)}"
                )
            offset = 0
            for start, end in self.segments[rank]:
                pieces.append((start, shard.narrow(dim, offset, end - start)))
                offset += end - start
        pieces.sort(key=lambda item: item[0])
        return torch.cat([p for _, p in pieces], dim=dim)

    def owner_of_blocks(self, block: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(owner, local_index)`` int64 ``[ceil(S / block)]`` for blocks of ``block`` tokens.

        ``block`` must divide ``unit``; ``local_index`` is the block's position in its owner's
        local tensor (local token start ``local_index * block``).
        """
        if self.unit % block:
            raise ValueError(f"block {block} does not divide the sharding unit {self.unit}")
        nblocks = _units(self.seq_len, block)
        owner = torch.empty(nblocks, dtype=torch.int64)
        local = torch.empty(nblocks, dtype=torch.int64)
        for rank, segs in enumerate(self.segments):
            offset = 0
            for start, end in segs:
                first, stop = start // block, _units(end, block)
                owner[first:stop] = rank
                local[first:stop] = torch.arange(offset, offset + stop - first)
                offset += stop - first
        return owner, local

    def describe(self) -> str:
        """One line per rank: its segments and token count."""
        return "\n".join(
            f"rank {r}: {list(segs)} ({self.local_length(r)} tokens)" for r, segs in enumerate(self.segments)
        )


def _check_args(seq_len: int, world_size: int, unit: int) -> None:
    for name, value in (("seq_len", seq_len), ("world_size", world_size), ("unit", unit)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive int, got {value!r}")


def _unit_of(block_size: int | Sequence[int]) -> int:
    if isinstance(block_size, int):
        return block_size
    bq, bk = (int(b) for b in block_size)
    return math.lcm(bq, bk)


def _from_unit_counts(seq_len: int, unit: int, counts: Sequence[int], owners: Sequence[int], world_size: int,
                      name: str) -> SequenceSharding:
    """Chunks of ``counts[i]`` units, in sequence order, chunk ``i`` owned by ``owners[i]``."""
    segments: list[list[Segment]] = [[] for _ in range(world_size)]
    position = 0
    for count, owner in zip(counts, owners):
        if count == 0:
            continue
        end = min(seq_len, position + count * unit)
        segments[owner].append((position, end))
        position = end
    for segs in segments:
        segs.sort()
    return SequenceSharding(seq_len, tuple(tuple(s) for s in segments), unit, name)


def contiguous_sharding(seq_len: int, world_size: int, block_size: int | Sequence[int]) -> SequenceSharding:
    """Rank ``r`` holds one contiguous range; block units dealt out evenly, earlier ranks first.

    When ``seq_len / world_size`` is a multiple of the block every rank holds exactly that many
    tokens. Otherwise the first ranks hold one unit more and the last non-empty rank holds the
    partial tail; with fewer units than ranks, the last ranks hold nothing (empty shards still
    take part in every call).
    """
    unit = _unit_of(block_size)
    _check_args(seq_len, world_size, unit)
    counts = _split_counts(_units(seq_len, unit), world_size)
    return _from_unit_counts(seq_len, unit, counts, range(world_size), world_size, "contiguous")


def zigzag_sharding(seq_len: int, world_size: int, block_size: int | Sequence[int]) -> SequenceSharding:
    """Zig-zag (striped) split: ``2 W`` chunks, rank ``r`` holds chunks ``r`` and ``2 W - 1 - r``.

    Balances causal layouts: the work of a query block grows with its position, and each rank
    pairs an early chunk with a late one.
    """
    unit = _unit_of(block_size)
    _check_args(seq_len, world_size, unit)
    counts = _split_counts(_units(seq_len, unit), 2 * world_size)
    owners = list(range(world_size)) + list(reversed(range(world_size)))
    return _from_unit_counts(seq_len, unit, counts, owners, world_size, "zigzag")


def block_work(layout: BlockSparseLayout, *, causal: bool = False, window: tuple[int, int] = (-1, -1)) -> torch.Tensor:
    """float64 ``[nqb]``: active (query block, key block) pairs per query block, summed over slices.

    Pairs that the causal / window rules exclude entirely are not counted (the ring never
    computes them).
    """
    from .plan import pair_status  # local import: plan imports this module

    rows = layout.row_ids().cpu()
    nqb = layout.num_query_blocks
    qb = rows % nqb
    kb = layout.col_indices.cpu().to(torch.int64)
    status = pair_status(qb, kb, layout.block_q, layout.block_k, layout.seq_len_q, layout.seq_len_k, causal, window)
    work = torch.zeros(nqb, dtype=torch.float64)
    work.index_add_(0, qb[status >= 0], torch.ones(int((status >= 0).sum()), dtype=torch.float64))
    return work


def balanced_sharding(
    layout: BlockSparseLayout,
    world_size: int,
    *,
    causal: bool = False,
    window: tuple[int, int] = (-1, -1),
) -> SequenceSharding:
    """Contiguous split whose boundaries equalise the active-block work of the ranks.

    The work of a block unit is its active pairs (see :func:`block_work`) plus one per query
    block (the per-row cost of writing the output); boundaries are placed on the prefix sums at
    ``k / W`` of the total.
    """
    if layout.seq_len_q != layout.seq_len_k:
        raise ValueError("balanced_sharding: self-attention layouts only (seq_len_q == seq_len_k)")
    unit = math.lcm(layout.block_q, layout.block_k)
    seq_len = layout.seq_len_q
    _check_args(seq_len, world_size, unit)
    per_q_block = block_work(layout, causal=causal, window=window) + 1.0
    n_units = _units(seq_len, unit)
    per_unit = torch.zeros(n_units, dtype=torch.float64)
    q_unit = torch.arange(per_q_block.numel()) * layout.block_q // unit
    per_unit.index_add_(0, q_unit, per_q_block)
    prefix = torch.cumsum(per_unit, 0)
    total = float(prefix[-1])
    cuts = [0]
    for k in range(1, world_size):
        target = total * k / world_size
        cut = int(torch.searchsorted(prefix, torch.tensor(target, dtype=torch.float64)))
        # choose between cut and cut + 1 units, whichever prefix lands nearer the target
        if cut < n_units and abs(float(prefix[cut]) - target) < abs((float(prefix[cut - 1]) if cut else 0.0) - target):
            cut += 1
        cuts.append(max(cuts[-1], min(cut, n_units)))
    cuts.append(n_units)
    counts = [cuts[i + 1] - cuts[i] for i in range(world_size)]
    return _from_unit_counts(seq_len, unit, counts, range(world_size), world_size, "balanced")


_BALANCED: weakref.WeakKeyDictionary[BlockSparseLayout, dict[tuple, SequenceSharding]] = weakref.WeakKeyDictionary()


def make_sharding(
    kind: str | SequenceSharding,
    layout: BlockSparseLayout,
    world_size: int,
    *,
    causal: bool = False,
    window: tuple[int, int] = (-1, -1),
) -> SequenceSharding:
    """A sharding by name (``"contiguous"``, ``"zigzag"``, ``"balanced"``) for ``layout``, or check one."""
    if isinstance(kind, SequenceSharding):
        if kind.seq_len != layout.seq_len_q:
            raise ValueError(f"sharding covers {kind.seq_len} tokens, the layout {layout.seq_len_q}")
        if kind.world_size != world_size:
            raise ValueError(f"sharding has {kind.world_size} ranks, the process group {world_size}")
        if kind.unit % math.lcm(layout.block_q, layout.block_k):
            raise ValueError(
                f"sharding unit {kind.unit} is not a multiple of the layout's blocks {layout.block_size}"
            )
        return kind
    if kind == "contiguous":
        return contiguous_sharding(layout.seq_len_q, world_size, layout.block_size)
    if kind == "zigzag":
        return zigzag_sharding(layout.seq_len_q, world_size, layout.block_size)
    if kind == "balanced":
        # cached per layout: balancing reads the whole layout on the host, once, not on every ring call
        per_layout = _BALANCED.setdefault(layout, {})
        key = (world_size, bool(causal), tuple(window))
        if key not in per_layout:
            per_layout[key] = balanced_sharding(layout, world_size, causal=causal, window=window)
        return per_layout[key]
    raise ValueError(f"sharding must be 'contiguous', 'zigzag', 'balanced' or a SequenceSharding, got {kind!r}")
