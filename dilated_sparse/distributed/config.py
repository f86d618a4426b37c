"""``DistributedSparseConfig``: how :class:`BlockSparseRingDistributedDilatedAttention` runs the ring.

Every field changes what the module does; none is a placeholder. Unknown keywords raise a
``TypeError`` listing the valid ones, and each field is checked when the config is built and
when it is set later (the same mechanism as :mod:`dilated_sparse.configs`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from ..configs import _strict, _ValidatedConfig

__all__ = ["INPUT_SHARDINGS", "SHARDINGS", "DistributedSparseConfig"]

SHARDINGS = ("contiguous", "zigzag", "balanced")
INPUT_SHARDINGS = ("contiguous", "compute")


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"DistributedSparseConfig.{name} must be one of {list(choices)}, got {value!r}")


def _check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"DistributedSparseConfig.{name} must be a bool, got {value!r}")


def _check_interval(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"DistributedSparseConfig.{name} must be an int, got {value!r}")
    if value < 0:
        raise ValueError(f"DistributedSparseConfig.{name} must be >= 0 (0 = off), got {value}")


@_strict()
@dataclass
class DistributedSparseConfig(_ValidatedConfig):
    """Options of the distributed (sequence-parallel) block-sparse ring.

    Args:
        sharding: how the ring splits the sequence over the ranks for compute:
            ``"contiguous"`` (rank ``r`` holds one range), ``"zigzag"`` (rank ``r`` holds chunks
            ``r`` and ``2W-1-r`` of ``2W``; balances causal layouts) or ``"balanced"`` (a
            contiguous split whose boundaries equalise the active (query block, key block) pairs
            of the layout, after the causal / window rules).
        input_sharding: how the tensors handed to ``forward`` are split. ``"contiguous"``
            (default): each rank passes its contiguous range; when ``sharding`` differs the module
            moves tokens to the compute split (one point-to-point exchange of q, k, v and one of
            the output back, differentiable) and returns the output in the contiguous split.
            ``"compute"``: the caller already holds the compute split (see
            ``module.current_sharding(seq_len)``); nothing is moved.
        load_balance_interval: with ``sharding="balanced"``, re-split the shards by the
            active-block counts of the layout in use every this many forward calls (counted per
            sequence length); between re-splits the previous split is kept (still exact, maybe
            less balanced) so a layout that changes often does not re-plan the split every step.
            ``0``: split once per sequence length. Must be 0 for the other shardings.
        pattern_update_interval: for a callable pattern (an adaptive / learned / random layout
            source), every this many forward calls rank 0 calls it again and broadcasts the new
            layout to the group, so all ranks use one global layout even when the callable is not
            deterministic. ``0``: build once per sequence length (still on rank 0, broadcast).
            Named patterns, ``sparse_config`` patterns and fixed layouts are deterministic: each
            rank builds them itself, again whenever the config changes (e.g. a
            ``ProgressiveSparsityScheduler`` setting ``sparsity_ratio``).
        keep_remote_kv: keep the key/value blocks received in the forward for the backward
            instead of fetching them again (less traffic, more memory).
        enable_deepspeed_integration: when DeepSpeed is imported, ``torch.distributed`` is
            initialised and DeepSpeed holds a sequence-parallel group (``deepspeed.utils.groups``:
            the ``mpu`` given to ``deepspeed.initialize`` or its ``sequence_parallel_size`` mesh),
            run the ring over that group instead of the module's ``group``; otherwise fall back to
            ``group`` (a ``RuntimeWarning`` says so once). DeepSpeed is never imported by this.
        check_layout_consistency: on each new layout, compare a checksum of it across the group
            (one small all-gather) and raise if the ranks disagree.
        record_communication: add the bytes every forward / backward sends and receives to
            ``module.communication`` (a :class:`~dilated_sparse.distributed.ring.CommunicationLog`).
    """

    sharding: str = "contiguous"
    input_sharding: str = "contiguous"
    load_balance_interval: int = 0
    pattern_update_interval: int = 0
    keep_remote_kv: bool = False
    enable_deepspeed_integration: bool = False
    check_layout_consistency: bool = False
    record_communication: bool = False

    def __post_init__(self) -> None:
        _check_choice("sharding", self.sharding, SHARDINGS)
        _check_choice("input_sharding", self.input_sharding, INPUT_SHARDINGS)
        _check_interval("load_balance_interval", self.load_balance_interval)
        _check_interval("pattern_update_interval", self.pattern_update_interval)
        if self.load_balance_interval and self.sharding != "balanced":
            raise ValueError(
                "DistributedSparseConfig.load_balance_interval re-splits a 'balanced' sharding; it must be 0 "
                f"with sharding={self.sharding!r}"
            )
        for name in ("keep_remote_kv", "enable_deepspeed_integration", "check_layout_consistency",
                     "record_communication"):
            _check_bool(name, getattr(self, name))

    def replace(self, **changes: Any) -> DistributedSparseConfig:
        """A validated copy with some fields changed."""
        return dataclasses.replace(self, **changes)
