"""Moving a sharded sequence from one split to another (e.g. contiguous -> zig-zag), differentiably.

Each rank sends every peer the tokens it holds under the source split that the peer holds under
the target split, in one ``batch_isend_irecv`` round; the backward moves the gradient the other
way. Index sets are O(S) int64 vectors derived from the two splits with no communication.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from .ring import CommunicationLog, _account
from .sharding import SequenceSharding

__all__ = ["RedistributionPlan", "redistribute", "redistribution_plan"]

_TAG = 21


@dataclass(frozen=True)
class RedistributionPlan:
    """One rank's part of moving tokens from ``source`` to ``target`` split.

    ``send[p]``: local indices (in the source shard) of the tokens that go to rank ``p``, in global
    order; ``recv[p]``: where (in the target shard) the tokens from ``p`` land. ``p == rank`` is a
    local copy.
    """

    rank: int
    source: SequenceSharding
    target: SequenceSharding
    send: dict[int, torch.Tensor]
    recv: dict[int, torch.Tensor]

    @property
    def identity(self) -> bool:
        """Whether nothing moves (the two splits give this rank the same tokens in the same order)."""
        return self.source.segments == self.target.segments

    def inverse(self) -> RedistributionPlan:
        """The plan that moves tokens back (target -> source)."""
        return RedistributionPlan(self.rank, self.target, self.source, self.recv, self.send)


def _token_owners(sharding: SequenceSharding) -> tuple[torch.Tensor, torch.Tensor]:
    owner = torch.empty(sharding.seq_len, dtype=torch.int64)
    local = torch.empty(sharding.seq_len, dtype=torch.int64)
    for rank, segs in enumerate(sharding.segments):
        offset = 0
        for start, end in segs:
            owner[start:end] = rank
            local[start:end] = torch.arange(offset, offset + end - start)
            offset += end - start
    return owner, local


def redistribution_plan(source: SequenceSharding, target: SequenceSharding, rank: int) -> RedistributionPlan:
    """Build rank ``rank``'s :class:`RedistributionPlan` (CPU index tensors)."""
    if source.seq_len != target.seq_len or source.world_size != target.world_size:
        raise ValueError(
            f"cannot redistribute between splits of {source.seq_len} tokens / {source.world_size} ranks and "
            f"{target.seq_len} tokens / {target.world_size} ranks"
        )
    src_owner, src_local = _token_owners(source)
    dst_owner, dst_local = _token_owners(target)
    send: dict[int, torch.Tensor] = {}
    recv: dict[int, torch.Tensor] = {}
    mine_src = src_owner == rank
    mine_dst = dst_owner == rank
    for peer in range(source.world_size):
        out_sel = mine_src & (dst_owner == peer)
        if bool(out_sel.any()):
            send[peer] = src_local[out_sel]
        in_sel = mine_dst & (src_owner == peer)
        if bool(in_sel.any()):
            recv[peer] = dst_local[in_sel]
    return RedistributionPlan(rank, source, target, send, recv)


def _move(x: torch.Tensor, plan: RedistributionPlan, group: Any, log: Any) -> torch.Tensor:
    """``x`` (``[B, source_len, ...]``) in the target split (``[B, target_len, ...]``)."""
    length = plan.target.local_length(plan.rank)
    out = x.new_zeros((x.shape[0], length, *x.shape[2:]))
    ops, received = [], []
    for peer, index in plan.send.items():
        if peer == plan.rank:
            continue
        buf = x.index_select(1, index.to(x.device)).contiguous()
        ops.append(dist.P2POp(dist.isend, buf, group=group, group_peer=peer, tag=_TAG))
        _account("redistribution", buf.numel() * buf.element_size(), 0, 1, log)
    for peer, index in plan.recv.items():
        if peer == plan.rank:
            continue
        buf = x.new_empty((x.shape[0], int(index.numel()), *x.shape[2:]))
        ops.append(dist.P2POp(dist.irecv, buf, group=group, group_peer=peer, tag=_TAG))
        received.append((buf, index))
        _account("redistribution", 0, buf.numel() * buf.element_size(), 1, log)
    works = dist.batch_isend_irecv(ops) if ops else []
    if plan.rank in plan.send:
        out.index_copy_(1, plan.recv[plan.rank].to(x.device), x.index_select(1, plan.send[plan.rank].to(x.device)))
    for work in works:
        work.wait()
    for buf, index in received:
        out.index_copy_(1, index.to(x.device), buf)
    return out


class _Redistribute(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, plan: RedistributionPlan, group: Any, log: Any) -> torch.Tensor:
        ctx.plan, ctx.group, ctx.log = plan, group, log
        return _move(x, plan, group, log)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        return _move(grad.contiguous(), ctx.plan.inverse(), ctx.group, ctx.log), None, None, None


def redistribute(x: torch.Tensor, plan: RedistributionPlan, group: Any = None,
                 log: CommunicationLog | None = None) -> torch.Tensor:
    """Move ``x`` (``[B, S_r, ...]`` in ``plan.source``'s split) to ``plan.target``'s split.

    Differentiable: the gradient moves back along the inverse plan. Every rank of ``group`` must
    call it with its own plan of the same two splits. ``log`` (a
    :class:`~dilated_sparse.distributed.ring.CommunicationLog`) gets the bytes moved, as does any
    :func:`~dilated_sparse.distributed.ring.track_communication` block.
    """
    if x.shape[1] != plan.source.local_length(plan.rank):
        raise ValueError(
            f"redistribute: rank {plan.rank} holds {x.shape[1]} tokens, the source split gives it "
            f"{plan.source.local_length(plan.rank)}"
        )
    if plan.identity:
        return x
    if not x.requires_grad:
        return _move(x, plan, group, log)
    return _Redistribute.apply(x, plan, group, log)
