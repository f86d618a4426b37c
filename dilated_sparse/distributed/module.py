"""``BlockSparseRingDistributedDilatedAttention``: the sequence-parallel block-sparse module.

Each rank passes its shard of ``q``, ``k``, ``v`` (``[B, S_r, H, D]``); the module builds (or
receives from rank 0) the global layout, picks the compute split, moves tokens to it when the
caller's split differs, runs :func:`~dilated_sparse.distributed.ring.ring_block_sparse_attention`
and returns this rank's output in the caller's split.
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..layout import BlockSparseLayout, normalize_block_size
from ..ops import _normalize_window, default_scale
from .config import DistributedSparseConfig
from .deepspeed_integration import deepspeed_sequence_parallel_group
from .redistribute import RedistributionPlan, redistribute, redistribution_plan
from .ring import CommunicationLog, ring_block_sparse_attention
from .sharding import SequenceSharding, balanced_sharding, contiguous_sharding, zigzag_sharding

__all__ = ["BlockSparseRingDistributedDilatedAttention", "broadcast_layout", "layout_checksum"]


def layout_checksum(layout: BlockSparseLayout) -> bytes:
    """A 16-byte digest of a layout's geometry and CSR indices (equal layouts, equal digests)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(repr((layout.seq_len_q, layout.seq_len_k, layout.block_size, layout.layout_shape)).encode())
    h.update(layout.crow_indices.cpu().to(torch.int32).numpy().tobytes())
    h.update(layout.col_indices.cpu().to(torch.int32).numpy().tobytes())
    return h.digest()


def _group_rank_world(group: Any) -> tuple[int, int]:
    if not (dist.is_available() and dist.is_initialized()):
        if group is not None:
            raise RuntimeError("a process group was given but torch.distributed is not initialised")
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def _comm_device(group: Any, fallback: torch.device) -> torch.device:
    """Device for small control tensors: CUDA for NCCL groups, else ``fallback``'s type (CPU for gloo)."""
    backend = str(dist.get_backend(group)).lower()
    if "nccl" in backend and "gloo" not in backend:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu") if "gloo" in backend else fallback


def broadcast_layout(layout: BlockSparseLayout | None, group: Any = None, device: torch.device | str = "cpu",
                     ) -> BlockSparseLayout:
    """Rank 0's ``layout`` on every rank of ``group`` (other ranks pass ``None``); returned on the CPU."""
    rank, world = _group_rank_world(group)
    if world == 1:
        assert layout is not None
        return layout.to("cpu")
    device = torch.device(device)
    header = torch.zeros(8, dtype=torch.int64, device=device)
    if rank == 0:
        if layout is None:
            raise ValueError("broadcast_layout: rank 0 must pass the layout")
        header = torch.tensor(
            [layout.seq_len_q, layout.seq_len_k, layout.block_q, layout.block_k, layout.layout_batch,
             layout.layout_heads, layout.crow_indices.numel(), layout.col_indices.numel()],
            dtype=torch.int64, device=device,
        )
    dist.broadcast(header, group=group, group_src=0)
    sq, sk, bq, bk, lb, lh, n_crow, nnz = (int(x) for x in header.tolist())
    if rank == 0:
        assert layout is not None
        indices = torch.cat([layout.crow_indices.to(device, torch.int64), layout.col_indices.to(device, torch.int64)])
    else:
        indices = torch.empty(n_crow + nnz, dtype=torch.int64, device=device)
    dist.broadcast(indices, group=group, group_src=0)
    if rank == 0:
        assert layout is not None
        return layout.to("cpu")
    indices = indices.cpu().to(torch.int32)
    return BlockSparseLayout(indices[:n_crow], indices[n_crow:], block_size=(bq, bk), seq_len_q=sq,
                             seq_len_k=sk, layout_batch=lb, layout_heads=lh)


class BlockSparseRingDistributedDilatedAttention(nn.Module):
    """Block-sparse attention over a sequence sharded across a process group (ring / context parallel).

    Args:
        segment_lengths, dilation_rates: LongNet segments and dilations of the default
            ``dilated_sparse`` pattern (also the defaults handed to ``sparse_config`` and to a
            named ``pattern`` that takes them). Giving them with a pattern that does not use them
            (a named pattern or config other than ``dilated_sparse``, a fixed layout, a spec or a
            callable) raises ``ValueError``, as the single-process modules do.
        sparse_config: a :class:`~dilated_sparse.configs.SparsePatternConfig` naming the pattern
            (built with its ``make_layout``).
        distributed_config: a :class:`~dilated_sparse.distributed.config.DistributedSparseConfig`
            (default: contiguous split, no redistribution).
        pattern: instead of ``sparse_config``: a pattern name, a spec for
            :func:`dilated_sparse.patterns.make_layout`, a fixed :class:`BlockSparseLayout`, or a
            callable ``fn(seq_len_q=, seq_len_k=, block_size=, **pattern_options)`` returning one
            (called on rank 0 and broadcast; see ``pattern_update_interval``).
        block_size: block edge (default: ``sparse_config.block_size``, else 64). With
            ``sparse_config`` the layout's block is the config's: a different ``block_size``
            raises ``ValueError`` (and ``module.block_size`` follows the config).
        window: optional token-level sliding window ``(left, right)`` (or an int for both).
        scale: softmax scale, a finite real number (default ``1/sqrt(head_dim)``).
        group: the process group (default: the world; DeepSpeed's sequence-parallel group when
            ``enable_deepspeed_integration`` and DeepSpeed has one).
        **pattern_options: options for a named / callable ``pattern``.

    ``forward(q, k, v, is_causal=False, *, key_padding_mask=None, key_lengths=None, seq_len=None)``
    takes this rank's shard ``[B, S_r, H, D]`` (``k``/``v`` may have fewer heads, GQA) in the split
    named by ``distributed_config.input_sharding`` and returns this rank's ``[B, S_r, H, D]``
    output; it equals the single-process op on the whole sequence restricted to this rank's tokens.
    Without ``seq_len`` the global length is found with one small all-reduce.
    """

    def __init__(
        self,
        segment_lengths: Sequence[int] | None = None,
        dilation_rates: Sequence[int] | None = None,
        sparse_config: Any = None,
        distributed_config: DistributedSparseConfig | None = None,
        *,
        pattern: Any = None,
        block_size: int | None = None,
        window: Any = None,
        scale: float | None = None,
        group: Any = None,
        **pattern_options: Any,
    ) -> None:
        super().__init__()
        if distributed_config is None:
            distributed_config = DistributedSparseConfig()
        if not isinstance(distributed_config, DistributedSparseConfig):
            raise TypeError(
                f"distributed_config must be a DistributedSparseConfig, got {type(distributed_config).__name__}"
            )
        if sparse_config is not None and pattern is not None:
            raise ValueError("give either sparse_config or pattern, not both")
        if sparse_config is not None and not callable(getattr(sparse_config, "make_layout", None)):
            raise TypeError("sparse_config must be a SparsePatternConfig (an object with make_layout)")
        if pattern_options and (pattern is None or isinstance(pattern, BlockSparseLayout)):
            raise TypeError(
                f"options {sorted(pattern_options)} are only accepted with a named or callable pattern=; "
                "use sparse_config for the configured patterns"
            )
        from ..modules._common import check_segments

        config_block = getattr(sparse_config, "block_size", None)
        if block_size is not None and config_block is not None and (
                normalize_block_size(block_size) != normalize_block_size(config_block)):
            raise ValueError(
                f"block_size={block_size!r} disagrees with sparse_config.block_size={config_block!r} (the layout "
                "is built with the config's); give it in one place"
            )
        if block_size is None:
            block_size = config_block
            if block_size is None:
                block_size = pattern.block_size[0] if isinstance(pattern, BlockSparseLayout) else 64
        if isinstance(pattern, BlockSparseLayout):
            if pattern.seq_len_q != pattern.seq_len_k:
                raise ValueError("pattern: the ring needs a square layout (seq_len_q == seq_len_k)")
            if normalize_block_size(block_size) != pattern.block_size:
                raise ValueError(f"block_size {block_size} differs from the layout's {pattern.block_size}")
        self._block_size = normalize_block_size(block_size)
        self.segment_lengths, self.dilation_rates = check_segments(segment_lengths, dilation_rates)
        self.sparse_config = sparse_config
        self.distributed_config = distributed_config
        self.pattern = pattern
        self.pattern_options = dict(pattern_options)
        self._check_segments_used()
        left, right = _normalize_window(window)
        self.window: tuple[int | None, int | None] | None = (
            None if (left, right) == (-1, -1) else (left if left >= 0 else None, right if right >= 0 else None)
        )
        self.scale = None if scale is None else default_scale(scale, 1)  # the op's check of scale
        self.group = group
        self.communication = CommunicationLog()
        self._layouts: dict[tuple[int, int], tuple[BlockSparseLayout, int, Any]] = {}
        self._shardings: dict[tuple[Any, ...], tuple[SequenceSharding, int]] = {}
        self._redistribution: dict[tuple[Any, ...], RedistributionPlan] = {}
        self._calls: dict[int, int] = {}
        self._warned_deepspeed = False

    @property
    def block_size(self) -> tuple[int, int]:
        """The layout's block ``(bq, bk)``: ``sparse_config.block_size`` when there is a config."""
        config_block = getattr(self.sparse_config, "block_size", None)
        return self._block_size if config_block is None else normalize_block_size(config_block)

    def _check_segments_used(self) -> None:
        """``ValueError`` when ``segment_lengths``/``dilation_rates`` were given but the pattern ignores them."""
        from ..modules._common import check_segments_used

        if self.segment_lengths is None and self.dilation_rates is None:
            return
        if self.sparse_config is not None:
            check_segments_used(self.sparse_config.pattern_type, self.segment_lengths, self.dilation_rates)
        elif isinstance(self.pattern, str):
            check_segments_used(self.pattern, self.segment_lengths, self.dilation_rates)
        elif self.pattern is not None:
            kind = "fixed layout" if isinstance(self.pattern, BlockSparseLayout) else (
                "callable" if self._pattern_is_dynamic() else "spec")
            raise ValueError(
                f"segment_lengths/dilation_rates were given but a {kind} pattern does not use them; put them in "
                "the pattern itself, or use pattern='dilated_sparse' or a sparse_config"
            )

    # ------------------------------------------------------------------ group and layout
    def process_group(self) -> Any:
        """The group the ring runs over (DeepSpeed's sequence-parallel group when enabled and present)."""
        if self.distributed_config.enable_deepspeed_integration:
            ds_group = deepspeed_sequence_parallel_group()
            if ds_group is not None:
                return ds_group
            if not self._warned_deepspeed:
                warnings.warn(
                    "enable_deepspeed_integration=True but DeepSpeed is not imported/initialised or has no "
                    "sequence-parallel group; using the module's group", RuntimeWarning, stacklevel=3,
                )
                self._warned_deepspeed = True
        return self.group

    def _source_key(self) -> Any:
        """What the layout is built from, so a changed ``sparse_config`` (e.g. by a scheduler) rebuilds it."""
        fingerprint = getattr(self.sparse_config, "fingerprint", None)
        config_key = fingerprint() if callable(fingerprint) else id(self.sparse_config)
        pattern_key = self.pattern if isinstance(self.pattern, str) else id(self.pattern)
        return (config_key, pattern_key, repr(sorted(self.pattern_options.items())),
                tuple(self.segment_lengths or ()), tuple(self.dilation_rates or ()), self.block_size)

    def _pattern_is_dynamic(self) -> bool:
        return callable(self.pattern) and not isinstance(self.pattern, (str, BlockSparseLayout, dict, tuple))

    def _build_layout(self, seq_len: int, num_heads: int) -> BlockSparseLayout:
        from ..patterns import make_layout

        if isinstance(self.pattern, BlockSparseLayout):
            if self.pattern.seq_len_q != seq_len:
                raise ValueError(
                    f"the fixed layout covers {self.pattern.seq_len_q} tokens but the sequence has {seq_len}"
                )
            return self.pattern
        self._check_segments_used()  # a sparse_config's pattern_type may have changed since construction
        if self.pattern is not None:
            options = dict(self.pattern_options)
            if isinstance(self.pattern, str):  # a named pattern that takes them (checked above)
                for name, value in (("segment_lengths", self.segment_lengths),
                                    ("dilation_rates", self.dilation_rates)):
                    if value is not None:
                        options[name] = value
            return make_layout(self.pattern, seq_len_q=seq_len, block_size=self.block_size, **options)
        if self.sparse_config is not None:
            return self.sparse_config.make_layout(
                seq_len, num_heads=num_heads, segment_lengths=self.segment_lengths,
                dilation_rates=self.dilation_rates,
            )
        options: dict[str, Any] = {}
        if self.segment_lengths is not None:
            options["segment_lengths"] = self.segment_lengths
        if self.dilation_rates is not None:
            options["dilation_rates"] = self.dilation_rates
        return make_layout("dilated_sparse", seq_len_q=seq_len, block_size=self.block_size, **options)

    def _check_consistent(self, layout: BlockSparseLayout, group: Any, device: torch.device) -> None:
        digest = torch.tensor(list(layout_checksum(layout)), dtype=torch.int64, device=device)
        world = dist.get_world_size(group)
        gathered = [torch.empty_like(digest) for _ in range(world)]
        dist.all_gather(gathered, digest, group=group)
        bad = [r for r, g in enumerate(gathered) if not torch.equal(g, gathered[0])]
        if bad:
            raise RuntimeError(f"the ranks {bad} of the group built a different layout than rank 0")

    def current_layout(self, seq_len: int, num_heads: int = 1) -> BlockSparseLayout | None:
        """The layout in use for ``seq_len`` (``None`` before the first call at that length)."""
        entry = self._layouts.get((seq_len, num_heads))
        return None if entry is None else entry[0]

    def _layout_for(self, seq_len: int, num_heads: int, step: int, group: Any, world: int,
                    device: torch.device) -> BlockSparseLayout:
        key = (seq_len, num_heads)
        entry = self._layouts.get(key)
        interval = self.distributed_config.pattern_update_interval
        dynamic = self._pattern_is_dynamic()
        source = self._source_key()
        if (entry is not None and entry[2] == source and getattr(self.sparse_config, "enable_caching", True)
                and not (dynamic and interval and step - entry[1] >= interval)):
            return entry[0]
        if dynamic and world > 1:
            rank = dist.get_rank(group)
            built = self._build_layout(seq_len, num_heads) if rank == 0 else None
            layout = broadcast_layout(built, group, _comm_device(group, device))
        else:
            layout = self._build_layout(seq_len, num_heads)
        if layout.seq_len_q != seq_len or layout.seq_len_k != seq_len:
            raise ValueError(f"the pattern built a layout for {layout.seq_len_q}x{layout.seq_len_k} tokens, "
                             f"not the sequence's {seq_len}")
        if self.distributed_config.check_layout_consistency and world > 1:
            self._check_consistent(layout, group, _comm_device(group, device))
        self._layouts[key] = (layout, step, source)
        return layout

    def current_sharding(self, seq_len: int, num_heads: int = 1, causal: bool = False) -> SequenceSharding:
        """The compute split of ``seq_len`` tokens: the one in use, or the one the next call will use.

        For ``input_sharding="compute"`` callers, who must hand ``forward`` their shard of this
        split. It builds the layout when there is none yet (for a callable pattern that is a
        broadcast from rank 0: call it on every rank).
        """
        group = self.process_group()
        rank, world = _group_rank_world(group)
        del rank
        step = self._calls.get(seq_len, 0)
        layout = self._layout_for(seq_len, num_heads, step, group, world, torch.device("cpu"))
        return self._compute_sharding(layout, world, causal, step, num_heads)

    def _compute_sharding(self, layout: BlockSparseLayout, world: int, causal: bool, step: int,
                          num_heads: int) -> SequenceSharding:
        cfg = self.distributed_config
        seq_len = layout.seq_len_q
        if cfg.sharding == "contiguous":
            return contiguous_sharding(seq_len, world, layout.block_size)
        if cfg.sharding == "zigzag":
            return zigzag_sharding(seq_len, world, layout.block_size)
        key = (seq_len, num_heads, world, bool(causal))
        entry = self._shardings.get(key)
        due = entry is None or (cfg.load_balance_interval and step - entry[1] >= cfg.load_balance_interval)
        if not due and entry is not None and entry[0].unit % max(layout.block_size) == 0:
            return entry[0]
        sharding = balanced_sharding(layout, world, causal=causal, window=_normalize_window(self.window))
        self._shardings[key] = (sharding, step)
        return sharding

    def _plan(self, source: SequenceSharding, target: SequenceSharding, rank: int) -> RedistributionPlan:
        key = (source, target, rank)
        plan = self._redistribution.get(key)
        if plan is None:
            if len(self._redistribution) > 32:
                self._redistribution.clear()
            plan = self._redistribution[key] = redistribution_plan(source, target, rank)
        return plan

    # ------------------------------------------------------------------------- forward
    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        is_causal: bool = False,
        return_attention_weights: bool = False,
        *,
        key_padding_mask: torch.Tensor | None = None,
        key_lengths: torch.Tensor | None = None,
        seq_len: int | None = None,
    ) -> torch.Tensor:
        """This rank's attention output ``[B, S_r, H, D]`` (see the class docstring)."""
        if return_attention_weights:
            raise ValueError(
                "return_attention_weights is not available on the distributed ring (each rank would hold "
                "only its rows); use the single-process modules or dilated_sparse.attention_weights"
            )
        for name, t in (("q", q), ("k", k), ("v", v)):
            if not isinstance(t, torch.Tensor) or t.dim() != 4:
                raise ValueError(f"{name} must be a 4-D tensor [batch, local_seq_len, heads, head_dim]")
        group = self.process_group()
        rank, world = _group_rank_world(group)
        local = q.shape[1]
        if seq_len is None:
            if world > 1:
                total = torch.tensor([local], dtype=torch.int64, device=_comm_device(group, q.device))
                dist.all_reduce(total, group=group)
                seq_len = int(total.item())
            else:
                seq_len = local
        if seq_len <= 0:
            raise ValueError(f"the sequence is empty (seq_len={seq_len})")
        step = self._calls.get(seq_len, 0)
        heads = q.shape[2]
        layout = self._layout_for(seq_len, heads, step, group, world, q.device)
        compute = self._compute_sharding(layout, world, is_causal, step, heads)
        cfg = self.distributed_config
        source = contiguous_sharding(seq_len, world, layout.block_size) if cfg.input_sharding == "contiguous" \
            else compute
        if local != source.local_length(rank):
            raise ValueError(
                f"rank {rank}: q holds {local} tokens but the {source.name} split of {seq_len} tokens over {world} "
                f"ranks gives it {source.local_length(rank)} (segments {list(source.segments[rank])})"
            )
        log = self.communication if cfg.record_communication else None
        plan = self._plan(source, compute, rank)
        if not plan.identity:
            q, k, v = (redistribute(t, plan, group, log=log) for t in (q, k, v))
            if key_padding_mask is not None:
                key_padding_mask = redistribute(key_padding_mask.to(torch.uint8), plan, group, log=log).bool()
        out = ring_block_sparse_attention(
            q, k, v, layout, causal=is_causal, window=self.window, key_lengths=key_lengths,
            key_padding_mask=key_padding_mask, scale=self.scale, group=group, sharding=compute,
            keep_remote_kv=cfg.keep_remote_kv, communication_log=log,
        )
        if not plan.identity:
            out = redistribute(out, plan.inverse(), group, log=log)
        self._calls[seq_len] = step + 1
        return out

    def extra_repr(self) -> str:
        cfg = self.distributed_config
        if self.pattern is None:
            what = getattr(self.sparse_config, "pattern_type", "dilated_sparse")
        elif isinstance(self.pattern, BlockSparseLayout):
            what = "fixed layout"
        else:
            what = self.pattern if isinstance(self.pattern, str) else "callable"
        return f"pattern={what}, block_size={self.block_size}, sharding={cfg.sharding}, input={cfg.input_sharding}"
