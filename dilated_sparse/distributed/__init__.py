"""Sequence-parallel (context-parallel) block-sparse attention over ``torch.distributed``.

* :func:`ring_block_sparse_attention`: the functional op; each rank passes its shard and the
  global layout, fetches only the key/value blocks its rows name (``batch_isend_irecv``,
  overlapped with compute), merges partial results by lse; custom autograd sends dK/dV home.
* :class:`BlockSparseRingDistributedDilatedAttention` + :class:`DistributedSparseConfig`: the
  module (layouts built or broadcast, compute split, token redistribution, DeepSpeed group).
* Splits: :func:`contiguous_sharding`, :func:`zigzag_sharding`, :func:`balanced_sharding`.
* Accounting: :func:`track_communication`, :meth:`RingPlan.communication` (bytes vs a full ring).
"""

from __future__ import annotations

from .config import DistributedSparseConfig
from .deepspeed_integration import deepspeed_available, deepspeed_sequence_parallel_group
from .module import BlockSparseRingDistributedDilatedAttention, broadcast_layout, layout_checksum
from .plan import RingPlan, build_plan, describe_plan
from .redistribute import RedistributionPlan, redistribute, redistribution_plan
from .ring import (
    CommunicationLog,
    get_ring_plan,
    merge_partials,
    ring_block_sparse_attention,
    track_communication,
)
from .sharding import (
    SequenceSharding,
    balanced_sharding,
    block_work,
    contiguous_sharding,
    make_sharding,
    zigzag_sharding,
)

__all__ = [
    "BlockSparseRingDistributedDilatedAttention",
    "CommunicationLog",
    "DistributedSparseConfig",
    "RedistributionPlan",
    "RingPlan",
    "SequenceSharding",
    "balanced_sharding",
    "block_work",
    "broadcast_layout",
    "build_plan",
    "contiguous_sharding",
    "deepspeed_available",
    "deepspeed_sequence_parallel_group",
    "describe_plan",
    "get_ring_plan",
    "layout_checksum",
    "make_sharding",
    "merge_partials",
    "redistribute",
    "redistribution_plan",
    "ring_block_sparse_attention",
    "track_communication",
    "zigzag_sharding",
]
