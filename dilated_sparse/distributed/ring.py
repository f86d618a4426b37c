"""Block-sparse ring attention over ``torch.distributed`` (sequence / context parallelism).

Each rank holds a shard of the sequence (see :mod:`.sharding`) and the global layout. The forward
walks ``W - 1`` steps; at step ``t`` a rank receives from ``rank - t`` only the key/value blocks
its query blocks' CSR rows name, and sends ``rank + t`` the blocks that rank needs, with
``torch.distributed.batch_isend_irecv`` (NCCL on GPUs, gloo on CPUs). The transfer of step
``t + 1`` is posted before the blocks of step ``t`` are computed, so communication overlaps
compute, and at most two frames are held at once. Partial results merge by their lse.

The backward (custom autograd) recomputes with the merged ``out`` and ``lse`` — the op's backward
is exact per frame given the global ``lse`` and ``Delta = rowsum(dout * out)`` — accumulating dQ
locally and sending each frame's dK/dV partials home to the rank that owns those keys.
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from ..layout import BlockSparseLayout
from ..ops import _normalize_window, attention_backward, attention_forward, check_key_lengths, default_scale
from .plan import DirectCall, Frame, RingPlan, TileCall, build_plan
from .sharding import SequenceSharding, make_sharding

__all__ = [
    "CommunicationLog",
    "get_ring_plan",
    "merge_partials",
    "ring_block_sparse_attention",
    "track_communication",
]

_KV_TAG, _MASK_TAG, _GRAD_TAG = 11, 12, 13


# ----------------------------------------------------------------------- byte accounting
@dataclass(eq=False)
class CommunicationLog:
    """Bytes this process posted to send and receive while the log was active, by phase.

    ``forward_*`` / ``backward_*``: the ring's key/value (and key padding mask) blocks and, in the
    backward, the dK/dV partials sent home; ``redistribution_*``: tokens moved between splits by
    :func:`~dilated_sparse.distributed.redistribute.redistribute` (the module's input/output).
    """

    forward_sent: int = 0
    forward_received: int = 0
    backward_sent: int = 0
    backward_received: int = 0
    redistribution_sent: int = 0
    redistribution_received: int = 0
    messages: int = 0

    @property
    def total(self) -> int:
        """All bytes sent and received (ring and redistribution)."""
        return (self.forward_sent + self.forward_received + self.backward_sent + self.backward_received
                + self.redistribution_sent + self.redistribution_received)

    def add(self, other: CommunicationLog) -> None:
        """Add ``other``'s counts to this log."""
        for name in ("forward_sent", "forward_received", "backward_sent", "backward_received",
                     "redistribution_sent", "redistribution_received", "messages"):
            setattr(self, name, getattr(self, name) + getattr(other, name))


# Process-wide, not thread-local: autograd runs CUDA backwards on its own device threads.
_LOGS: list[CommunicationLog] = []
_LOGS_LOCK = threading.Lock()


@contextlib.contextmanager
def track_communication() -> Iterator[CommunicationLog]:
    """Count the bytes the ring sends and receives on this process inside the ``with`` block.

    Example::

        with track_communication() as log:
            out = ring_block_sparse_attention(q, k, v, layout)
            out.sum().backward()
        print(log.forward_received, log.backward_sent)
    """
    log = CommunicationLog()
    with _LOGS_LOCK:
        _LOGS.append(log)
    try:
        yield log
    finally:
        with _LOGS_LOCK:
            _LOGS.remove(log)


def _account(phase: str, sent: int, received: int, messages: int, log: CommunicationLog | None = None) -> None:
    with _LOGS_LOCK:
        logs = list(_LOGS)
    if log is not None and log not in logs:
        logs.append(log)
    for entry in logs:
        setattr(entry, f"{phase}_sent", getattr(entry, f"{phase}_sent") + sent)
        setattr(entry, f"{phase}_received", getattr(entry, f"{phase}_received") + received)
        entry.messages += messages


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


# -------------------------------------------------------------------------- p2p transport
class _Transfer:
    """Posted sends and receives of one step; :meth:`wait` returns the received tensors."""

    def __init__(self, sends: list[tuple[torch.Tensor, int, int]], recvs: list[tuple[torch.Tensor, int, int]],
                 group: Any, phase: str, log: CommunicationLog | None = None) -> None:
        self.received = [t for t, _, _ in recvs]
        self._keep = [t for t, _, _ in sends]
        ops = [dist.P2POp(dist.isend, t, group=group, group_peer=peer, tag=tag) for t, peer, tag in sends]
        ops += [dist.P2POp(dist.irecv, t, group=group, group_peer=peer, tag=tag) for t, peer, tag in recvs]
        self._works = dist.batch_isend_irecv(ops) if ops else []
        _account(phase, sum(_nbytes(t) for t in self._keep), sum(_nbytes(t) for t in self.received), len(ops), log)

    def wait(self) -> list[torch.Tensor]:
        for work in self._works:
            work.wait()
        self._works = []
        self._keep = []
        return self.received


_WARMED: set[tuple[int, str]] = set()


def _warm_up(group: Any, device: torch.device) -> None:
    """One small collective per (group, device type) before the first p2p call.

    NCCL wants the first operation on a communicator to involve every rank; a rank with nothing
    to exchange would otherwise leave its peers' first batch_isend_irecv undefined.
    """
    key = (id(group), device.type)
    if key in _WARMED:
        return
    probe = torch.zeros(1, device=device)
    dist.all_reduce(probe, group=group)
    _WARMED.add(key)


# -------------------------------------------------------------------------------- merging
def merge_partials(
    out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge two partial attention results over disjoint key sets by their log-sum-exp.

    ``out_*``: ``[B, S, H, D]``, ``lse_*``: ``[B, H, S]``. Returns ``(out, lse)`` in
    ``out_a``'s dtype; rows empty in both stay ``out = 0``, ``lse = -inf``.
    """
    lse = torch.logaddexp(lse_a, lse_b)
    safe = torch.where(torch.isneginf(lse), torch.zeros_like(lse), lse)
    weight_a = torch.exp(lse_a - safe).transpose(1, 2).unsqueeze(-1).to(out_a.dtype)
    weight_b = torch.exp(lse_b - safe).transpose(1, 2).unsqueeze(-1).to(out_a.dtype)
    return out_a * weight_a + out_b.to(out_a.dtype) * weight_b, lse


class _Accumulator:
    """Running (out, lse) of one rank's queries in fp32 (fp64 for fp64 inputs)."""

    def __init__(self, q: torch.Tensor, lse_dtype: torch.dtype) -> None:
        self.q = q
        self.dtype = lse_dtype
        self.out: torch.Tensor | None = None
        self.lse: torch.Tensor | None = None

    def _init(self) -> None:
        b, s, h, d = self.q.shape
        self.out = torch.zeros(b, s, h, d, dtype=self.dtype, device=self.q.device)
        self.lse = torch.full((b, h, s), float("-inf"), dtype=self.dtype, device=self.q.device)

    def add(self, out: torch.Tensor, lse: torch.Tensor) -> None:
        if self.out is None:
            self.out, self.lse = out.to(self.dtype), lse.to(self.dtype)
            return
        self.out, self.lse = merge_partials(self.out, self.lse, out, lse)

    def add_rows(self, rows: torch.Tensor, out: torch.Tensor, lse: torch.Tensor) -> None:
        if self.out is None:
            self._init()
        assert self.out is not None and self.lse is not None
        merged_out, merged_lse = merge_partials(self.out[:, rows], self.lse[:, :, rows], out, lse)
        self.out[:, rows] = merged_out
        self.lse[:, :, rows] = merged_lse

    def result(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        if self.out is None:
            self._init()
        assert self.out is not None and self.lse is not None
        return self.out.to(dtype), self.lse


# ----------------------------------------------------------------------- frame compute
@dataclass
class _FrameInputs:
    """A frame's keys/values and its masks in frame-local form."""

    k: torch.Tensor
    v: torch.Tensor
    key_lengths: torch.Tensor | None
    key_padding_mask: torch.Tensor | None


def _with_sentinel(x: torch.Tensor, dim: int, value: float | bool = 0) -> torch.Tensor:
    """``x`` with one extra entry appended along ``dim`` filled with ``value`` (the sentinel row)."""
    shape = list(x.shape)
    shape[dim] = 1
    return torch.cat([x, torch.full(shape, value, dtype=x.dtype, device=x.device)], dim=dim)


def _tile_key_mask(call: TileCall, frame: _FrameInputs, key_lengths: torch.Tensor | None, batch: int) -> torch.Tensor:
    """bool ``[B, tile keys]``: padding of the tile slots, key_lengths and key_padding_mask."""
    if frame.key_padding_mask is not None:
        mask = _with_sentinel(frame.key_padding_mask, 1, True)[:, call.k_index]
    else:
        padding = call.k_index == frame.k.shape[1]
        mask = padding.unsqueeze(0).expand(batch, -1)
    if key_lengths is not None:
        mask = mask | (call.k_positions.unsqueeze(0) >= key_lengths.to(torch.int64).unsqueeze(1))
    return mask.contiguous()


class _Ring:
    """The per-call state shared by forward and backward: plan, group, inputs."""

    def __init__(self, plan: RingPlan, group: Any, scale: float, key_lengths: torch.Tensor | None,
                 key_padding_mask: torch.Tensor | None, log: CommunicationLog | None = None) -> None:
        self.log = log
        self.plan = plan
        self.group = group
        self.scale = scale
        self.key_lengths = key_lengths
        self.key_padding_mask = key_padding_mask

    # ---- frames
    def local_frame(self, k: torch.Tensor, v: torch.Tensor) -> _FrameInputs:
        return self._frame_inputs(self.plan.rank, k, v, self.key_padding_mask)

    def _frame_inputs(self, source: int, k: torch.Tensor, v: torch.Tensor,
                      kpm: torch.Tensor | None) -> _FrameInputs:
        lengths = None
        if self.key_lengths is not None:
            positions = self.plan.frames[source].positions
            lengths = torch.searchsorted(positions, self.key_lengths.to(torch.int64)).to(torch.int32)
        return _FrameInputs(k, v, lengths, kpm)

    def post_kv(self, step: int, k: torch.Tensor, v: torch.Tensor, phase: str) -> _Transfer:
        """Post step ``step``'s K/V (and key padding mask) exchange."""
        plan = self.plan
        source, dest = (plan.rank - step) % plan.world_size, (plan.rank + step) % plan.world_size
        sends, recvs = [], []
        if plan.send_tokens(dest):
            index = plan.send_index[dest]
            sends.append((torch.stack([k.index_select(1, index), v.index_select(1, index)]), dest, _KV_TAG))
            if self.key_padding_mask is not None:
                sends.append((self.key_padding_mask.index_select(1, index).to(torch.uint8), dest, _MASK_TAG))
        n = plan.recv_tokens(source)
        if n:
            b, _, hkv, d = k.shape
            recvs.append((torch.empty(2, b, n, hkv, d, dtype=k.dtype, device=k.device), source, _KV_TAG))
            if self.key_padding_mask is not None:
                recvs.append((torch.empty(b, n, dtype=torch.uint8, device=k.device), source, _MASK_TAG))
        return _Transfer(sends, recvs, self.group, phase, self.log)

    def received_frame(self, step: int, received: list[torch.Tensor]) -> _FrameInputs | None:
        source = (self.plan.rank - step) % self.plan.world_size
        if not received:
            return None
        kv = received[0]
        kpm = received[1].bool() if len(received) > 1 else None
        return self._frame_inputs(source, kv[0], kv[1], kpm)

    # ---- compute
    def forward_frame(self, acc: _Accumulator, q: torch.Tensor, frame: Frame, inputs: _FrameInputs) -> None:
        for call in frame.calls:
            if isinstance(call, DirectCall):
                out, lse = attention_forward(
                    q, inputs.k, inputs.v, call.layout, scale=self.scale, causal=call.causal,
                    window=call.window, key_lengths=inputs.key_lengths,
                    key_padding_mask=inputs.key_padding_mask,
                )
                acc.add(out, lse)
            else:
                qt = _with_sentinel(q, 1)[:, call.q_index]
                kt = _with_sentinel(inputs.k, 1)[:, call.k_index]
                vt = _with_sentinel(inputs.v, 1)[:, call.k_index]
                out, lse = attention_forward(
                    qt, kt, vt, call.layout, scale=self.scale, window=call.window,
                    key_padding_mask=_tile_key_mask(call, inputs, self.key_lengths, q.shape[0]),
                )
                acc.add_rows(call.q_tokens, out[:, call.q_rows], lse[:, :, call.q_rows])

    def backward_frame(self, grads: dict[str, torch.Tensor], dout: torch.Tensor, q: torch.Tensor,
                       out: torch.Tensor, lse: torch.Tensor, frame: Frame,
                       inputs: _FrameInputs) -> tuple[torch.Tensor, torch.Tensor]:
        """Add this frame's dQ into ``grads['dq']``; return the frame's dK, dV partials."""
        dk_frame: torch.Tensor | None = None
        dv_frame: torch.Tensor | None = None
        for call in frame.calls:
            if isinstance(call, DirectCall):
                dq, dk, dv = attention_backward(
                    dout, q, inputs.k, inputs.v, out, lse, call.layout, scale=self.scale,
                    causal=call.causal, window=call.window, key_lengths=inputs.key_lengths,
                    key_padding_mask=inputs.key_padding_mask,
                )
                grads["dq"] += dq
                if dk_frame is None and len(frame.calls) == 1:
                    return dk, dv
                if dk_frame is None:
                    dk_frame = torch.zeros_like(inputs.k, dtype=grads["dq"].dtype)
                    dv_frame = torch.zeros_like(inputs.v, dtype=grads["dq"].dtype)
                dk_frame += dk
                dv_frame += dv
            else:
                lse_t = _with_sentinel(lse, 2, float("inf"))[:, :, call.q_index]
                dq, dk, dv = attention_backward(
                    _with_sentinel(dout, 1)[:, call.q_index], _with_sentinel(q, 1)[:, call.q_index],
                    _with_sentinel(inputs.k, 1)[:, call.k_index], _with_sentinel(inputs.v, 1)[:, call.k_index],
                    _with_sentinel(out, 1)[:, call.q_index], lse_t, call.layout, scale=self.scale,
                    window=call.window,
                    key_padding_mask=_tile_key_mask(call, inputs, self.key_lengths, q.shape[0]),
                )
                grads["dq"].index_add_(1, call.q_tokens, dq[:, call.q_rows].to(grads["dq"].dtype))
                if dk_frame is None:
                    dk_frame = torch.zeros_like(inputs.k, dtype=grads["dq"].dtype)
                    dv_frame = torch.zeros_like(inputs.v, dtype=grads["dq"].dtype)
                dk_frame.index_add_(1, call.k_tokens, dk[:, call.k_rows].to(dk_frame.dtype))
                dv_frame.index_add_(1, call.k_tokens, dv[:, call.k_rows].to(dk_frame.dtype))
        assert dk_frame is not None and dv_frame is not None
        return dk_frame, dv_frame


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


class _RingAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ring: _Ring,
                keep_remote_kv: bool) -> tuple[torch.Tensor, torch.Tensor]:
        plan = ring.plan
        acc = _Accumulator(q, _acc_dtype(q.dtype))
        kept: dict[int, _FrameInputs] = {}
        pending = ring.post_kv(1, k, v, "forward") if plan.world_size > 1 else None
        if plan.rank in plan.frames:
            ring.forward_frame(acc, q, plan.frames[plan.rank], ring.local_frame(k, v))
        for step, source, _ in plan.schedule():
            assert pending is not None
            received = pending.wait()
            pending = ring.post_kv(step + 1, k, v, "forward") if step + 1 < plan.world_size else None
            inputs = ring.received_frame(step, received)
            if inputs is not None:
                ring.forward_frame(acc, q, plan.frames[source], inputs)
                if keep_remote_kv:
                    kept[step] = inputs
        out, lse = acc.result(q.dtype)
        ctx.ring = ring
        ctx.kept = kept if keep_remote_kv else None
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx: Any, dout: torch.Tensor, _dlse: torch.Tensor | None) -> tuple[Any, ...]:
        q, k, v, out, lse = ctx.saved_tensors
        ring: _Ring = ctx.ring
        plan = ring.plan
        acc = _acc_dtype(q.dtype)
        grads = {"dq": torch.zeros(q.shape, dtype=acc, device=q.device)}
        dk = torch.zeros(k.shape, dtype=acc, device=k.device)
        dv = torch.zeros(v.shape, dtype=acc, device=v.device)
        dout = dout.contiguous()
        kept: dict[int, _FrameInputs] | None = ctx.kept
        pending = None
        if plan.world_size > 1 and kept is None:
            pending = ring.post_kv(1, k, v, "backward")
        if plan.rank in plan.frames:
            dk_self, dv_self = ring.backward_frame(grads, dout, q, out, lse, plan.frames[plan.rank],
                                                   ring.local_frame(k, v))
            dk += dk_self
            dv += dv_self
        grad_transfer: tuple[_Transfer, int] | None = None
        for step, source, dest in plan.schedule():
            if kept is not None:
                inputs = kept.get(step)
            else:
                assert pending is not None
                received = pending.wait()
                pending = ring.post_kv(step + 1, k, v, "backward") if step + 1 < plan.world_size else None
                inputs = ring.received_frame(step, received)
            sends, recvs = [], []
            if inputs is not None:
                dk_frame, dv_frame = ring.backward_frame(grads, dout, q, out, lse, plan.frames[source], inputs)
                sends.append((torch.stack([dk_frame, dv_frame]).to(k.dtype), source, _GRAD_TAG))
            n = plan.send_tokens(dest)
            if n:
                b, _, hkv, d = k.shape
                recvs.append((torch.empty(2, b, n, hkv, d, dtype=k.dtype, device=k.device), dest, _GRAD_TAG))
            if grad_transfer is not None:
                _add_grads(dk, dv, plan, *grad_transfer)
            grad_transfer = (_Transfer(sends, recvs, ring.group, "backward", ring.log), dest)
        if grad_transfer is not None:
            _add_grads(dk, dv, plan, *grad_transfer)
        ctx.kept = None
        return grads["dq"].to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None


def _add_grads(dk: torch.Tensor, dv: torch.Tensor, plan: RingPlan, transfer: _Transfer, dest: int) -> None:
    received = transfer.wait()
    if received:
        index = plan.send_index[dest]
        dk.index_add_(1, index, received[0][0].to(dk.dtype))
        dv.index_add_(1, index, received[0][1].to(dv.dtype))


# ------------------------------------------------------------------------------ plan cache
_PLANS: weakref.WeakKeyDictionary[BlockSparseLayout, dict[tuple, RingPlan]] = weakref.WeakKeyDictionary()
_PLANS_PER_LAYOUT = 16


def get_ring_plan(
    layout: BlockSparseLayout,
    sharding: SequenceSharding,
    rank: int,
    *,
    causal: bool = False,
    window: tuple[int, int] = (-1, -1),
    device: torch.device | str = "cpu",
) -> RingPlan:
    """The cached :class:`~dilated_sparse.distributed.plan.RingPlan` of ``rank`` on ``device``."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    per_layout = _PLANS.setdefault(layout, {})
    key = (sharding, rank, bool(causal), tuple(window), device)
    plan = per_layout.get(key)
    if plan is None:
        cpu_key = (sharding, rank, bool(causal), tuple(window), torch.device("cpu"))
        cpu_plan = per_layout.get(cpu_key) or build_plan(layout, sharding, rank, causal=causal, window=window)
        plan = cpu_plan.to(device)
        if len(per_layout) >= _PLANS_PER_LAYOUT:
            per_layout.pop(next(iter(per_layout)))
        per_layout[key] = plan
    return plan


# ------------------------------------------------------------------------------ public op
def _group_info(group: Any) -> tuple[int, int]:
    if not (dist.is_available() and dist.is_initialized()):
        if group is not None:
            raise RuntimeError("group was given but torch.distributed is not initialised")
        return 0, 1
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError("this process is not a member of the given process group")
    return rank, dist.get_world_size(group)


def ring_block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: BlockSparseLayout,
    *,
    causal: bool = False,
    window: Any = None,
    key_lengths: torch.Tensor | None = None,
    key_padding_mask: torch.Tensor | None = None,
    scale: float | None = None,
    group: Any = None,
    sharding: str | SequenceSharding = "contiguous",
    keep_remote_kv: bool = False,
    return_lse: bool = False,
    communication_log: CommunicationLog | None = None,
) -> Any:
    """Block-sparse attention over a sequence sharded across the ranks of ``group``.

    Every rank passes its shard and the same global ``layout``; the result on each rank equals
    ``block_sparse_attention`` of the whole sequence restricted to that rank's query tokens, in
    values and in gradients of ``q``, ``k``, ``v`` (the backward sends dK/dV partials home).

    Args:
        q: ``[B, S_r, H, D]``, this rank's query tokens; ``k``, ``v``: ``[B, S_r, Hkv, D]``, the
            same tokens' keys and values (GQA/MQA as in the op).
        layout: the global layout (``seq_len_q == seq_len_k == S``), identical on every rank.
        causal, window, scale: as :func:`dilated_sparse.block_sparse_attention`, in global token
            positions.
        key_lengths: int ``[B]``, global key lengths (the same on every rank).
        key_padding_mask: bool ``[B, S_r]``, this rank's shard of the padding mask (give it on
            every rank or on none).
        group: process group (default: the world, or a single process when torch.distributed is
            not initialised).
        sharding: how the sequence is split: ``"contiguous"`` (default), ``"zigzag"``,
            ``"balanced"`` or a :class:`~dilated_sparse.distributed.sharding.SequenceSharding`;
            ``S_r`` must be rank ``r``'s length under it. With ``"contiguous"`` and ``S / W`` a
            multiple of the block, every rank holds ``S / W`` tokens; otherwise the block units
            are dealt out evenly, the first ranks holding one more and the last non-empty rank
            the partial tail, and ranks past the end hold empty shards (``S_r = 0``), which still
            take part (they return empty outputs).
        keep_remote_kv: keep the received K/V blocks for the backward instead of fetching them
            again (less traffic, more memory).
        return_lse: also return the ``lse`` ``[B, H, S_r]`` of this rank's queries.
        communication_log: a :class:`CommunicationLog` that this call's forward and backward
            traffic is added to (besides any :func:`track_communication` block).

    Returns:
        ``out`` ``[B, S_r, H, D]`` (and ``lse`` when asked).
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{name} must be a 4-D tensor [batch, local_seq_len, heads, head_dim]")
    if not isinstance(layout, BlockSparseLayout):
        raise TypeError(f"layout must be a BlockSparseLayout, got {type(layout).__name__}")
    if k.shape != v.shape or k.shape[1] != q.shape[1] or k.shape[0] != q.shape[0]:
        raise ValueError(f"k and v must be [B, S_r, Hkv, D] with q's B and S_r; got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise TypeError(f"q must be float16, bfloat16, float32 or float64, got {q.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k and v must have the same dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k and v must be on the same device, got {q.device}, {k.device}, {v.device}")
    if k.shape[3] != q.shape[3] or k.shape[2] == 0 or q.shape[2] % k.shape[2]:
        raise ValueError(f"k/v must be [B, S_r, Hkv, D] with q's head_dim and Hkv dividing q's heads; got "
                         f"q {tuple(q.shape)}, k {tuple(k.shape)}")
    rank, world = _group_info(group)
    window_left, window_right = _normalize_window(window)
    shard = make_sharding(sharding, layout, world, causal=causal, window=(window_left, window_right))
    if q.shape[1] != shard.local_length(rank):
        raise ValueError(
            f"rank {rank}: q holds {q.shape[1]} tokens but the {shard.name} sharding of {shard.seq_len} tokens "
            f"over {world} ranks gives it {shard.local_length(rank)} (segments {list(shard.segments[rank])})"
        )
    bsz, _, heads, dim = q.shape
    if layout.layout_batch not in (1, bsz) or layout.layout_heads not in (1, heads):
        raise ValueError(f"layout shape {layout.layout_shape} does not fit batch {bsz} and heads {heads}")
    scale = default_scale(scale, dim)  # the op's check: a finite real number or None
    if key_lengths is not None:
        check_key_lengths(key_lengths, bsz, layout.seq_len_k)  # global lengths, as the op's
        key_lengths = key_lengths.to(q.device)
    if key_padding_mask is not None and (key_padding_mask.dtype != torch.bool
                                         or key_padding_mask.shape != (bsz, q.shape[1])):
        raise ValueError(f"key_padding_mask must be bool [batch, local_seq_len] = [{bsz}, {q.shape[1]}]")
    if key_padding_mask is not None:
        key_padding_mask = key_padding_mask.to(q.device)

    plan = get_ring_plan(layout, shard, rank, causal=causal, window=(window_left, window_right), device=q.device)
    if world > 1:
        _warm_up(group if group is not None else dist.group.WORLD, q.device)
    ring = _Ring(plan, group, float(scale), key_lengths, key_padding_mask, communication_log)
    out, lse = _RingAttentionFunction.apply(q, k, v, ring, bool(keep_remote_kv))
    return (out, lse) if return_lse else out
