"""The communication and compute plan of one rank of the block-sparse ring.

Built once per (layout, sharding, rank, causal, window, device) from the global layout, with no
communication: every rank derives the same facts, so senders know what their peers need.

For the query blocks a rank owns, the key blocks named by their CSR rows (and not wholly excluded
by the causal / window rules) are grouped by the rank that owns them. From each such source rank
the plan fetches exactly those key blocks, packed in global order (the *frame* of that source);
the local shard is its own frame. Each frame is computed with one or a few calls of the op on
sub-layouts over the frame's key blocks, and the partial results merge by their lse.

Token rules and frames. The op applies ``causal`` and ``window`` to local token positions, but a
packed frame moves key blocks to other positions. Every active (query block, key block) pair is
one of:

* *compatible*: its distance in the frame equals its global distance, or the rules allow every
  token pair both globally and in the frame: computed in the frame's call with the rules;
* *full but moved*: the rules allow every token pair globally, not in the frame: computed in a
  second call with no rules;
* *partial and moved* (the rules cut through the block and the frame moved it; only happens for
  windows whose edge falls on a block held by another rank): gathered into *tile calls*, one per
  global distance, where each (query block, key block) pair is laid out at a distance whose local
  window rule is the global one shifted by a known amount.

So the result is exact, with the op's own masking, and no position-offset argument is needed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from ..layout import BlockSparseLayout
from .sharding import SequenceSharding

__all__ = ["RingPlan", "build_plan", "describe_plan", "pair_status", "rule_bounds"]

_INF = 1 << 62
DEAD, PARTIAL, FULL = -1, 0, 1


def rule_bounds(causal: bool, window: tuple[int, int]) -> tuple[int, int]:
    """Allowed range ``[lo, hi]`` of the distance ``g = query_pos - key_pos`` (+-2**62 = unbounded)."""
    window_left, window_right = window
    hi = window_left if window_left >= 0 else _INF
    lo = -window_right if window_right >= 0 else -_INF
    if causal:
        lo = max(lo, 0)
    return lo, hi


def _status(distance: torch.Tensor, len_q: torch.Tensor, len_k: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """int8 DEAD / PARTIAL / FULL of block pairs whose first tokens are ``distance`` apart."""
    gmin = distance - (len_k - 1)
    gmax = distance + (len_q - 1)
    status = torch.full(distance.shape, PARTIAL, dtype=torch.int8)
    status[(gmin >= lo) & (gmax <= hi)] = FULL
    status[(gmax < lo) | (gmin > hi)] = DEAD
    return status


def _block_lengths(blocks: torch.Tensor, block: int, seq_len: int) -> torch.Tensor:
    return torch.clamp(seq_len - blocks * block, max=block)


def pair_status(
    q_blocks: torch.Tensor,
    k_blocks: torch.Tensor,
    block_q: int,
    block_k: int,
    seq_len_q: int,
    seq_len_k: int,
    causal: bool,
    window: tuple[int, int],
) -> torch.Tensor:
    """int8 ``DEAD`` (-1) / ``PARTIAL`` (0) / ``FULL`` (1) of global (query block, key block) pairs."""
    lo, hi = rule_bounds(causal, window)
    return _status(
        q_blocks * block_q - k_blocks * block_k,
        _block_lengths(q_blocks, block_q, seq_len_q),
        _block_lengths(k_blocks, block_k, seq_len_k),
        lo,
        hi,
    )


def _token_index(starts: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Concatenated ``arange(start, start + length)`` for each block (int64)."""
    total = int(lengths.sum()) if lengths.numel() else 0
    if total == 0:
        return torch.zeros(0, dtype=torch.int64)
    first = torch.cumsum(lengths, 0) - lengths
    offsets = torch.arange(total, dtype=torch.int64) - torch.repeat_interleave(first, lengths, output_size=total)
    return torch.repeat_interleave(starts, lengths, output_size=total) + offsets


@dataclass
class DirectCall:
    """One op call on the whole local query shard against a frame (a sub-layout over it)."""

    layout: BlockSparseLayout
    causal: bool
    window: tuple[int | None, int | None] | None


@dataclass
class TileCall:
    """One op call on gathered (query block, key block) tiles laid out at a fixed distance.

    ``q_index`` / ``k_index`` (``[n_tiles * pitch]``) say which local query token / frame key
    token sits at each tile position; padding positions hold the sentinel (the length of the
    source tensor, which points at an appended zero row). ``q_rows`` / ``q_tokens`` are the
    non-padding tile positions and their local query tokens (likewise ``k_rows`` / ``k_tokens``);
    ``k_positions`` is the global position of each tile key (``2**62`` on padding).
    """

    layout: BlockSparseLayout
    window: tuple[int | None, int | None]
    q_index: torch.Tensor
    k_index: torch.Tensor
    q_rows: torch.Tensor
    q_tokens: torch.Tensor
    k_rows: torch.Tensor
    k_tokens: torch.Tensor
    k_positions: torch.Tensor


@dataclass
class Frame:
    """What one source rank contributes to this rank's queries."""

    source: int
    num_tokens: int
    positions: torch.Tensor  # global position of each frame key token, ascending
    calls: list[DirectCall | TileCall] = field(default_factory=list)
    pairs: int = 0  # active block pairs computed from this frame (over all slices)


@dataclass
class RingPlan:
    """Everything one rank needs to run the ring: frames to receive, blocks to send, schedule.

    Attributes:
        rank, world_size: this rank and the group size.
        sharding: the :class:`~dilated_sparse.distributed.sharding.SequenceSharding` in use.
        local_length: tokens this rank holds.
        frames: source rank -> :class:`Frame` (this rank's own frame included when it has work).
        send_index: destination rank -> int64 local token indices of the key blocks it needs.
    """

    rank: int
    world_size: int
    sharding: SequenceSharding
    local_length: int
    frames: dict[int, Frame]
    send_index: dict[int, torch.Tensor]
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    def recv_tokens(self, source: int) -> int:
        """Key/value tokens this rank receives from ``source`` (0 for itself or none)."""
        frame = self.frames.get(source)
        return 0 if frame is None or source == self.rank else frame.num_tokens

    def send_tokens(self, dest: int) -> int:
        """Key/value tokens this rank sends to ``dest``."""
        index = self.send_index.get(dest)
        return 0 if index is None else int(index.numel())

    def schedule(self) -> list[tuple[int, int, int]]:
        """``(step, source, dest)`` for steps ``1 .. W-1``: receive from ``rank - step``, send to ``rank + step``."""
        w, r = self.world_size, self.rank
        return [(t, (r - t) % w, (r + t) % w) for t in range(1, w)]

    def num_calls(self) -> int:
        """Op calls per forward on this rank."""
        return sum(len(f.calls) for f in self.frames.values())

    def communication(
        self,
        *,
        batch: int,
        kv_heads: int,
        head_dim: int,
        element_size: int,
        key_padding_mask: bool = False,
        keep_remote_kv: bool = False,
    ) -> dict[str, int]:
        """Bytes this rank sends and receives per forward and backward, and a full ring's.

        A full ring moves every other rank's whole K/V shard to this rank in the forward, and in
        the backward K/V again plus the dK/dV partials. Here the forward moves only the key
        blocks named by this rank's rows (the receive side) and those its peers need from it;
        the backward moves them again (unless ``keep_remote_kv``) plus the dK/dV partials of the
        same blocks, back home.
        """
        per_token = 2 * batch * kv_heads * head_dim * element_size
        mask_per_token = batch if key_padding_mask else 0
        recv = sum(self.recv_tokens(s) for s in range(self.world_size))
        send = sum(self.send_tokens(d) for d in range(self.world_size))
        fwd_recv = recv * (per_token + mask_per_token)
        fwd_send = send * (per_token + mask_per_token)
        refetch = 0 if keep_remote_kv else 1
        others = sum(self.sharding.local_length(p) for p in range(self.world_size) if p != self.rank)
        full_ring_fwd = others * per_token
        return {
            "forward_received": fwd_recv,
            "forward_sent": fwd_send,
            "backward_received": refetch * fwd_recv + send * per_token,
            "backward_sent": refetch * fwd_send + recv * per_token,
            "full_ring_forward_received": full_ring_fwd,
            "full_ring_backward_received": 2 * full_ring_fwd,
            "received_tokens": recv,
            "sent_tokens": send,
        }

    def to(self, device: torch.device) -> RingPlan:
        """This plan with its index tensors and sub-layouts on ``device``."""
        device = torch.device(device)
        if device == self.device:
            return self

        def move(call: DirectCall | TileCall) -> DirectCall | TileCall:
            if isinstance(call, DirectCall):
                return DirectCall(call.layout.to(device), call.causal, call.window)
            return TileCall(
                call.layout.to(device), call.window,
                *(t.to(device) for t in (call.q_index, call.k_index, call.q_rows, call.q_tokens,
                                         call.k_rows, call.k_tokens, call.k_positions)),
            )

        frames = {
            s: Frame(f.source, f.num_tokens, f.positions.to(device), [move(c) for c in f.calls], f.pairs)
            for s, f in self.frames.items()
        }
        send = {d: idx.to(device) for d, idx in self.send_index.items()}
        return RingPlan(self.rank, self.world_size, self.sharding, self.local_length, frames, send, device)


def _choose_tile_offsets(distance: int, lo: int, hi: int, block_q: int, block_k: int) -> tuple[int, int, int]:
    """``(oq, ok, pitch)``: query tile at ``oq``, key tile at ``ok`` inside each pitch-long slot.

    The local distance ``oq - ok`` must lie in ``[distance - hi, distance - lo]`` so that the
    shifted local window rule has non-negative sides; ``oq - ok = distance`` always does, and a
    smaller slot is preferred.
    """
    unit = math.lcm(block_q, block_k)
    best: tuple[int, int, int] | None = None
    limit = abs(distance) + 2 * (block_q + block_k)
    for oq in range(0, limit + 1, block_q):
        low = oq - distance + lo if lo > -_INF else 0
        high = oq - distance + hi if hi < _INF else _INF
        ok = max(0, -(-low // block_k) * block_k)
        if ok > high:
            continue
        pitch = -(-max(oq + block_q, ok + block_k) // unit) * unit
        if best is None or pitch < best[2]:
            best = (oq, ok, pitch)
        if best is not None and oq + block_q >= best[2]:
            break
    assert best is not None, "a tile offset always exists (the global distance itself)"
    return best


def _coo_layout(rows: torch.Tensor, cols: torch.Tensor, slices: torch.Tensor, layout: BlockSparseLayout,
                seq_len_q: int, seq_len_k: int) -> BlockSparseLayout:
    return BlockSparseLayout.from_coo(
        rows, cols, slice_indices=slices, block_size=layout.block_size, seq_len_q=seq_len_q,
        seq_len_k=seq_len_k, layout_batch=layout.layout_batch, layout_heads=layout.layout_heads,
    )


def build_plan(
    layout: BlockSparseLayout,
    sharding: SequenceSharding,
    rank: int,
    *,
    causal: bool = False,
    window: tuple[int, int] = (-1, -1),
) -> RingPlan:
    """Build rank ``rank``'s :class:`RingPlan` (on the CPU; see :meth:`RingPlan.to`).

    ``window`` is ``(left, right)`` in tokens with -1 for an unbounded side.
    """
    layout = layout.to("cpu")
    if layout.seq_len_q != layout.seq_len_k:
        raise ValueError(
            f"the ring shards one sequence: the layout must be square (seq_len_q {layout.seq_len_q} != "
            f"seq_len_k {layout.seq_len_k})"
        )
    seq_len = layout.seq_len_q
    bq, bk = layout.block_size
    nqb = layout.num_query_blocks
    world = sharding.world_size
    lo, hi = rule_bounds(causal, window)
    has_rules = lo > -_INF or hi < _INF
    rule_window: tuple[int | None, int | None] | None = None
    if window != (-1, -1):
        rule_window = (window[0] if window[0] >= 0 else None, window[1] if window[1] >= 0 else None)

    owner_q, local_q = sharding.owner_of_blocks(bq)
    owner_k, local_k = sharding.owner_of_blocks(bk)
    rows = layout.row_ids()
    slices = rows // nqb
    qb = rows - slices * nqb
    kb = layout.col_indices.to(torch.int64)
    status = pair_status(qb, kb, bq, bk, seq_len, seq_len, causal, window)
    alive = status != DEAD
    qb, kb, slices, status = qb[alive], kb[alive], slices[alive], status[alive]
    dst, src = owner_q[qb], owner_k[kb]
    len_q_all = _block_lengths(qb, bq, seq_len)
    len_k_all = _block_lengths(kb, bk, seq_len)

    def needed_blocks(receiver: int, source: int) -> torch.Tensor:
        return torch.unique(kb[(dst == receiver) & (src == source)])  # sorted

    # ---- what this rank sends: the key blocks each destination's rows name
    send_index: dict[int, torch.Tensor] = {}
    for dest in range(world):
        if dest == rank:
            continue
        blocks = needed_blocks(dest, rank)
        if blocks.numel():
            send_index[dest] = _token_index(local_k[blocks] * bk, _block_lengths(blocks, bk, seq_len))

    # ---- what this rank receives and computes, frame by frame
    local_len = sharding.local_length(rank)
    frames: dict[int, Frame] = {}
    mine = dst == rank
    for source in range(world):
        sel = mine & (src == source)
        if not bool(sel.any()):
            continue
        f_qb, f_kb, f_s, f_status = qb[sel], kb[sel], slices[sel], status[sel]
        f_lq, f_lk = len_q_all[sel], len_k_all[sel]
        m = local_q[f_qb]
        if source == rank:
            c = local_k[f_kb]
            frame_len = local_len
            positions = sharding.positions(rank)
        else:
            blocks = needed_blocks(rank, source)
            c = torch.searchsorted(blocks, f_kb)
            positions = _token_index(blocks * bk, _block_lengths(blocks, bk, seq_len))
            frame_len = int(positions.numel())
        frame = Frame(source, frame_len, positions, pairs=int(sel.sum()))
        global_distance = f_qb * bq - f_kb * bk
        frame_distance = m * bq - c * bk
        if has_rules:
            local_status = _status(frame_distance, f_lq, f_lk, lo, hi)
            compatible = (frame_distance == global_distance) | ((f_status == FULL) & (local_status == FULL))
        else:
            compatible = torch.ones_like(sel[sel])
        moved_full = ~compatible & (f_status == FULL)
        moved_partial = ~compatible & (f_status == PARTIAL)
        if not bool(moved_partial.any()) and bool(moved_full.any()) and bool((f_status[compatible] == FULL).all()):
            moved_full, compatible = moved_full | compatible, torch.zeros_like(compatible)
        if bool(compatible.any()):
            sub = _coo_layout(m[compatible], c[compatible], f_s[compatible], layout, local_len, frame_len)
            frame.calls.append(DirectCall(sub, causal, rule_window))
        if bool(moved_full.any()):
            sub = _coo_layout(m[moved_full], c[moved_full], f_s[moved_full], layout, local_len, frame_len)
            frame.calls.append(DirectCall(sub, False, None))
        if bool(moved_partial.any()):
            for distance in torch.unique(global_distance[moved_partial]).tolist():
                pick = moved_partial & (global_distance == distance)
                frame.calls.append(_tile_call(
                    layout, int(distance), lo, hi, m[pick], c[pick], f_s[pick], f_lq[pick], f_lk[pick],
                    local_len, frame_len, positions,
                ))
        frames[source] = frame
    return RingPlan(rank, world, sharding, local_len, frames, send_index)


def _tile_call(
    layout: BlockSparseLayout,
    distance: int,
    lo: int,
    hi: int,
    m: torch.Tensor,
    c: torch.Tensor,
    slices: torch.Tensor,
    len_q: torch.Tensor,
    len_k: torch.Tensor,
    local_len: int,
    frame_len: int,
    frame_positions: torch.Tensor,
) -> TileCall:
    """Tile call for block pairs at one global ``distance`` (each query block pairs with one key block)."""
    bq, bk = layout.block_size
    tiles, tile_of = torch.unique(m, return_inverse=True)
    n_tiles = int(tiles.numel())
    tile_c = torch.zeros(n_tiles, dtype=torch.int64)
    tile_c[tile_of] = c
    tile_lq = torch.zeros(n_tiles, dtype=torch.int64)
    tile_lq[tile_of] = len_q
    tile_lk = torch.zeros(n_tiles, dtype=torch.int64)
    tile_lk[tile_of] = len_k
    oq, ok, pitch = _choose_tile_offsets(distance, lo, hi, bq, bk)
    slot = torch.arange(n_tiles, dtype=torch.int64) * pitch
    rows = (slot[tile_of] + oq) // bq
    cols = (slot[tile_of] + ok) // bk
    total = n_tiles * pitch
    sub = _coo_layout(rows, cols, slices, layout, total, total)

    q_rows = _token_index(slot + oq, tile_lq)
    q_tokens = _token_index(tiles * bq, tile_lq)
    k_rows = _token_index(slot + ok, tile_lk)
    k_tokens = _token_index(tile_c * bk, tile_lk)
    q_index = torch.full((total,), local_len, dtype=torch.int64)
    q_index[q_rows] = q_tokens
    k_index = torch.full((total,), frame_len, dtype=torch.int64)
    k_index[k_rows] = k_tokens
    k_positions = torch.full((total,), _INF, dtype=torch.int64)
    k_positions[k_rows] = frame_positions[k_tokens]
    # local distance oq - ok stands for the global distance: shift the rule's bounds by it
    local_distance = oq - ok
    window_left = hi - distance + local_distance if hi < _INF else None
    window_right = distance - local_distance - lo if lo > -_INF else None
    return TileCall(sub, (window_left, window_right), q_index, k_index, q_rows, q_tokens, k_rows, k_tokens,
                    k_positions)


def describe_plan(plan: RingPlan) -> dict[str, Any]:
    """A small summary (frames, calls, pairs, tokens moved) for logs and tests."""
    return {
        "rank": plan.rank,
        "frames": {
            s: {"tokens": f.num_tokens, "pairs": f.pairs,
                "calls": [type(c).__name__ for c in f.calls]}
            for s, f in sorted(plan.frames.items())
        },
        "send_tokens": {d: plan.send_tokens(d) for d in sorted(plan.send_index)},
    }
