"""``BlockSparseAdaptive``: a learned, content-dependent layout.

A small importance network scores every (query block, key block) pair from mean-pooled block
summaries of q and k; each query-block row keeps its top ``k`` candidates (``k`` from
``AdaptiveConfig.base_sparsity``); the kept pairs form a per-batch (and per-head, unless
``share_across_heads``) :class:`~dilated_sparse.layout.BlockSparseLayout` and attention runs
through the op.

Gradients reach the importance network by a straight-through gate: every kept block ``b`` has
a gate ``g_b = 1 + s_b - stopgrad(s_b)`` (value 1, so the output is exactly the op's) where
``s`` is the relaxed selection ``k * softmax((scores + Gumbel noise) / temperature)`` over the
row's candidates. The output depends on the gates as if the exponentiated scores of block ``b``
were multiplied by ``g_b``; its gradient ``dL/dg_b = sum_i dout_i . (C_ib - m_ib out_i)``
(``C_ib``: block ``b``'s part of ``out_i``, ``m_ib``: its probability mass) is computed in the
backward from the op's sparse attention weights (memory ``O(nnz * block^2)``). So the task loss
trains the importance network and the temperature; blocks that were not kept get gradient only
through the softmax normalisation of ``s``. In eval mode (or with ``hard_sparsity=True``) the
selection is plain top-k without noise and no gate is built.

The temperature is ``temperature`` (a buffer, annealed by
:class:`~dilated_sparse.modules.AdaptiveSparsityTrainer`) times ``exp(log_temperature_scale)``
(a parameter when ``learnable_temperature``), never below ``min_temperature``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Hashable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..configs import AdaptiveConfig
from ..layout import BlockSparseLayout
from ..ops import attention_backward, attention_forward, attention_weights
from ._common import check_segments, derived
from ._dropout import _to_blocks, dropout_block_sparse_attention, entry_tables
from .block_sparse import BlockSparseAttentionBase, _check_qkv

__all__ = ["BlockSparseAdaptive", "gated_block_sparse_attention"]


def _slice_tables(layout: BlockSparseLayout, bsz: int, heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(q_block, k_block, valid)`` ``[B, H, max_slice_nnz]`` of every weights-dict entry."""
    qb, kb, _, valid = entry_tables(layout)
    return qb.expand(bsz, heads, -1), kb.expand(bsz, heads, -1), valid.expand(bsz, heads, -1)


class _GatedAttention(torch.autograd.Function):
    """Block-sparse attention whose blocks carry multiplicative gates (value 1 in the forward)."""

    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gate: torch.Tensor,
                layout: BlockSparseLayout, scale: float | None, causal: bool,
                key_padding_mask: torch.Tensor | None) -> torch.Tensor:
        out, lse = attention_forward(q, k, v, layout, scale=scale, causal=causal, key_padding_mask=key_padding_mask)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.layout, ctx.scale, ctx.causal, ctx.kpm = layout, scale, causal, key_padding_mask
        return out

    @staticmethod
    def backward(ctx: Any, dout: torch.Tensor) -> tuple[Any, ...]:
        q, k, v, out, lse = ctx.saved_tensors
        layout = ctx.layout
        dq, dk, dv = attention_backward(dout.contiguous(), q, k, v, out, lse, layout, scale=ctx.scale,
                                        causal=ctx.causal, key_padding_mask=ctx.kpm)
        dgate = None
        if ctx.needs_input_grad[3]:
            bsz, _, heads, _ = q.shape
            probs = attention_weights(q, k, lse, layout, scale=ctx.scale, causal=ctx.causal,
                                      key_padding_mask=ctx.kpm)["block_values"]  # [B, H, nnz, bq, bk]
            bq, bk = layout.block_size
            cdt = probs.dtype if probs.dtype == torch.float64 else torch.float32
            probs = probs.to(cdt)
            vv = v if v.shape[2] == heads else v.repeat_interleave(heads // v.shape[2], dim=2)
            vb = _to_blocks(vv.to(cdt), bk, layout.num_key_blocks)
            ob = _to_blocks(out.to(cdt), bq, layout.num_query_blocks)
            gb = _to_blocks(dout.to(cdt), bq, layout.num_query_blocks)
            qbi, kbi, valid = _slice_tables(layout, bsz, heads)
            width = qbi.shape[-1]
            b_i = torch.arange(bsz, device=q.device).view(-1, 1, 1)
            h_i = torch.arange(heads, device=q.device).view(1, -1, 1)
            probs = probs[:, :, :width] if probs.shape[2] >= width else F.pad(probs, (0, 0, 0, 0, 0, width - probs.shape[2]))
            contrib = torch.einsum("bhnij,bhnjd->bhnid", probs, vb[b_i, h_i, kbi])  # [B, H, nnz, bq, D]
            mass = probs.sum(dim=-1, keepdim=True)
            o_rows, g_rows = ob[b_i, h_i, qbi], gb[b_i, h_i, qbi]
            dgate = (g_rows * (contrib - mass * o_rows)).sum(dim=(-1, -2)) * valid
        return dq, dk, dv, dgate, None, None, None, None


def gated_block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    gate: torch.Tensor,
    layout: BlockSparseLayout,
    *,
    scale: float | None = None,
    causal: bool = False,
    key_padding_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """The op's output, with a straight-through gradient for per-block gates.

    Args:
        gate: ``[B, H, max_slice_nnz]`` gates of the layout's blocks (entry ``e`` of slice
            ``s(b, h)`` in CSR order, as the weights dict). The forward treats every gate as 1
            (it must hold ones, possibly carrying a gradient path); the backward returns
            ``dL/dgate`` for attention whose exponentiated scores of block ``e`` are multiplied
            by ``gate[e]``.
    """
    return _GatedAttention.apply(q, k, v, gate, layout, scale, causal, key_padding_mask)


class _Tower(nn.Module):
    def __init__(self, in_dim: int | None, hidden: int, layers: int) -> None:
        super().__init__()
        mods: list[nn.Module] = [nn.LazyLinear(hidden) if in_dim is None else nn.Linear(in_dim, hidden)]
        for _ in range(layers - 1):
            mods += [nn.GELU(), nn.Linear(hidden, hidden)]
        self.net = nn.Sequential(*mods)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class BlockSparseAdaptive(BlockSparseAttentionBase):
    """Adaptive (learned) block-sparse attention over ``[B, S, H, D]`` inputs.

    Args:
        segment_lengths, dilation_rates: optional: restrict the candidate block pairs to the
            LongNet dilated structure (:func:`dilated_sparse.patterns.dilated_sparse`); default
            every block pair is a candidate.
        num_heads: heads of the inputs (checked at forward when given).
        head_dim: head dim of the inputs (the importance network's input width; inferred at the
            first forward when None).
        adaptive_config: :class:`~dilated_sparse.configs.AdaptiveConfig` (default one).
        block_size: overrides ``adaptive_config.block_size``.
        dropout, softmax_scale, mixed_precision, enable_caching: see the base class
            (``enable_caching`` caches the candidate layouts; learned layouts change every call).

    ``forward(q, k, v, is_causal=False, return_attention_weights=False, key_padding_mask=None,
    return_pattern=False)`` returns ``out``, plus the weights dict and/or
    ``{"layout": BlockSparseLayout, "scores": [B, H', nqb, nkb], "keep_per_row": int}`` when asked.
    """

    def __init__(
        self,
        segment_lengths: Sequence[int] | None = None,
        dilation_rates: Sequence[int] | None = None,
        num_heads: int | None = None,
        head_dim: int | None = None,
        adaptive_config: AdaptiveConfig | None = None,
        *,
        block_size: int | None = None,
        dropout: float = 0.0,
        softmax_scale: float | None = None,
        mixed_precision: Any = False,
        enable_caching: bool = True,
    ) -> None:
        super().__init__(dropout=dropout, softmax_scale=softmax_scale, mixed_precision=mixed_precision,
                         enable_caching=enable_caching)
        if adaptive_config is None:
            adaptive_config = AdaptiveConfig()
        elif not isinstance(adaptive_config, AdaptiveConfig):
            raise TypeError(f"adaptive_config must be an AdaptiveConfig, got {type(adaptive_config).__name__}")
        if block_size is not None:
            adaptive_config = dataclasses.replace(adaptive_config, block_size=block_size)
        self.config = adaptive_config
        for name, value in (("num_heads", num_heads), ("head_dim", head_dim)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive int or None, got {value!r}")
        self.num_heads, self.head_dim = num_heads, head_dim
        self.segment_lengths, self.dilation_rates = check_segments(segment_lengths, dilation_rates)
        hidden = adaptive_config.hidden_dim
        self.query_tower = _Tower(head_dim, hidden, adaptive_config.num_layers)
        self.key_tower = _Tower(head_dim, hidden, adaptive_config.num_layers)
        self.register_buffer("temperature", torch.tensor(float(adaptive_config.temperature)))
        if adaptive_config.learnable_temperature:
            self.log_temperature_scale = nn.Parameter(torch.zeros(()))
        else:
            self.register_buffer("log_temperature_scale", torch.zeros(()))
        self._last_soft: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def adaptive_config(self) -> AdaptiveConfig:
        """The module's :class:`~dilated_sparse.configs.AdaptiveConfig` (alias of ``config``)."""
        return self.config

    @property
    def block_size(self) -> int:
        """Block edge in tokens (the config's ``block_size``)."""
        return self.config.block_size

    # ------------------------------------------------------------- selection
    @property
    def keep_fraction(self) -> float:
        """Fraction of each row's candidate blocks kept (``1 - base_sparsity``)."""
        return 1.0 - self.config.base_sparsity

    def keep_per_row(self, num_key_blocks: int, max_candidates: int) -> int:
        """Blocks each query-block row keeps: ``round(keep_fraction * num_key_blocks)``, at least
        one (as ``AdaptiveConfig`` documents) and at most ``max_candidates`` (the widest row of
        candidates). ``base_sparsity`` is validated to lie in ``[0, 1)`` whenever it is set, so
        ``keep_fraction`` is in ``(0, 1]`` here."""
        return max(1, min(max_candidates, round(self.keep_fraction * num_key_blocks)))

    def effective_temperature(self) -> torch.Tensor:
        """``max(temperature * exp(log_temperature_scale), min_temperature)``."""
        return torch.clamp(self.temperature * torch.exp(self.log_temperature_scale), min=self.config.min_temperature)

    def _layout_key(self) -> Hashable:
        return ("candidates", tuple(self.segment_lengths or ()), tuple(self.dilation_rates or ()), self.block_size)

    def _build_layout(
        self, seq_len_q: int, seq_len_k: int, *, causal: bool, num_heads: int, device: torch.device
    ) -> BlockSparseLayout:
        """The candidate layout (dilated structure or every block), causal-filtered."""
        from ..patterns import dense, dilated_sparse

        if self.segment_lengths is not None or self.dilation_rates is not None:
            return dilated_sparse(seq_len_q=seq_len_q, seq_len_k=seq_len_k, block_size=self.block_size,
                                  segment_lengths=self.segment_lengths, dilation_rates=self.dilation_rates,
                                  causal=causal, device=device)
        return dense(seq_len_q=seq_len_q, seq_len_k=seq_len_k, block_size=self.block_size, causal=causal,
                     device=device)

    def get_pattern_stats(
        self,
        seq_len: int,
        *,
        seq_len_k: int | None = None,
        causal: bool = False,
        batch_size: int = 1,
        num_heads: int | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> dict[str, Any]:
        """Statistics of the learned layouts for ``seq_len`` (they change with the content, but
        their size does not): each query-block row keeps ``min(k, candidates)`` blocks. Keys as
        :func:`~dilated_sparse.modules._common.pattern_stats`, for one slice per batch element
        and head (one per batch element when shared across heads), plus ``keep_per_row`` and
        ``candidate_density``."""
        heads = num_heads or self.num_heads or 1
        candidates = self.get_layout(seq_len, seq_len_k, causal=causal)
        nqb, nkb = candidates.num_query_blocks, candidates.num_key_blocks
        keep = self.keep_per_row(nkb, derived(candidates, "max_row", _max_row))
        rows = torch.clamp(candidates.row_counts(), max=keep).to(torch.float64)
        slices = batch_size * (1 if self.config.share_across_heads else heads)
        nnz = int(rows.sum().item())
        bq, bk = candidates.block_size
        element = torch.empty((), dtype=dtype).element_size()
        return {
            "sparsity": 1.0 - nnz / (nqb * nkb),
            "density": nnz / (nqb * nkb),
            "nnz_blocks": nnz * slices,
            "active_blocks": nnz * slices,
            "total_blocks": nqb * nkb * slices,
            "blocks_per_row_min": int(rows.min().item()),
            "blocks_per_row_mean": float(rows.mean().item()),
            "blocks_per_row_max": int(rows.max().item()),
            "num_query_blocks": nqb,
            "num_key_blocks": nkb,
            "block_size": candidates.block_size,
            "layout_shape": (batch_size, 1 if self.config.share_across_heads else heads),
            "layout_bytes": 4 * (slices * (nqb + nkb) + 2 + 2 * nnz * slices),
            "weights_bytes": batch_size * heads * nnz * bq * bk * element,
            "dense_weights_bytes": batch_size * heads * seq_len * (seq_len_k or seq_len) * element,
            "keep_per_row": keep,
            "candidate_density": candidates.density,
        }

    def importance_scores(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """Block-pair scores ``[B, H, nqb, nkb]`` (``H = 1`` when shared across heads)."""
        bs = self.block_size
        _, sq, heads, _ = q.shape
        nqb, nkb = -(-sq // bs), -(-k.shape[1] // bs)
        kk = k if k.shape[2] == heads else k.repeat_interleave(heads // k.shape[2], dim=2)
        qs = _to_blocks(q, bs, nqb).sum(dim=3) / _counts(sq, bs, nqb, q)  # [B, H, nqb, D] block means
        ks = _to_blocks(kk, bs, nkb).sum(dim=3) / _counts(k.shape[1], bs, nkb, q)
        tower_dtype = qs.dtype if _is_lazy(self.query_tower) else next(self.query_tower.parameters()).dtype
        qe = self.query_tower(qs.to(tower_dtype))
        ke = self.key_tower(ks.to(tower_dtype))
        scores = torch.einsum("bhqe,bhke->bhqk", qe, ke) / math.sqrt(qe.shape[-1])
        if self.config.share_across_heads:
            scores = scores.mean(dim=1, keepdim=True)
        return scores

    def _select(self, scores: torch.Tensor, candidates: torch.Tensor,
                max_cand: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        """``(hard, soft, k)``: top-k mask per row among candidates and its relaxation.

        ``max_cand`` is the largest number of candidates of a row (known from the cached layout).
        """
        n_cand = candidates.sum(dim=-1, keepdim=True)  # [1, 1, nqb, 1]
        keep = self.keep_per_row(scores.shape[-1], max_cand)
        perturbed = scores
        if self.training and self.config.gumbel_noise:
            u = torch.rand_like(scores).clamp_(1e-9, 1 - 1e-9)
            perturbed = scores - torch.log(-torch.log(u))
        masked = perturbed.masked_fill(~candidates, float("-inf"))
        top = masked.topk(keep, dim=-1).indices
        hard = torch.zeros_like(candidates.expand_as(scores)).scatter_(-1, top, True) & candidates
        relaxed = (perturbed / self.effective_temperature()).masked_fill(~candidates, float("-inf"))
        soft = torch.softmax(relaxed, dim=-1) * torch.clamp(n_cand, max=keep)
        return hard, soft, keep

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        is_causal: bool = False,
        return_attention_weights: bool = False,
        key_padding_mask: torch.Tensor | None = None,
        return_pattern: bool = False,
    ) -> Any:
        """Attention over the learned layout (see the module docstring)."""
        _check_qkv(q, k, v)
        bsz, sq, heads, dim = q.shape
        if self.num_heads is not None and heads != self.num_heads:
            raise ValueError(f"q has {heads} heads but the module was built with num_heads={self.num_heads}")
        if self.head_dim is not None and dim != self.head_dim:
            raise ValueError(f"q has head_dim {dim} but the module was built with head_dim={self.head_dim}")
        candidates_layout = self.get_layout(sq, k.shape[1], causal=is_causal, device=q.device)
        # the candidate layout is cached, so its dense block mask and widest row are too (no per-call sync)
        candidates = derived(candidates_layout, "dense_mask", BlockSparseLayout.to_dense_mask)  # [1, 1, nqb, nkb]
        max_cand = derived(candidates_layout, "max_row", _max_row)
        scores = self.importance_scores(q, k)
        hard, soft, keep = self._select(scores, candidates, max_cand)
        self._last_soft = (soft, hard)
        layout = BlockSparseLayout.from_dense_mask(hard, block_size=self.block_size, seq_len_q=sq, seq_len_k=k.shape[1],
                                                   validate=False)  # a fresh mask per call: well formed by construction
        use_gate = self.training and not self.config.hard_sparsity and torch.is_grad_enabled()
        out_dtype = q.dtype
        qc, kc, vc = q, k, v
        if self.compute_dtype is not None and q.dtype == torch.float32:
            qc, kc, vc = (t.to(self.compute_dtype) for t in (q, k, v))
        if use_gate and self.dropout > 0.0:
            # dropout path (PyTorch over the active blocks): the gates enter its softmax directly
            gate_grid = 1.0 + soft - soft.detach()
            result = dropout_block_sparse_attention(
                qc, kc, vc, layout, dropout_p=self.dropout, scale=self.softmax_scale, causal=is_causal,
                key_padding_mask=key_padding_mask, return_attention_weights=return_attention_weights,
                block_gate=gate_grid)
            out, weights = result if return_attention_weights else (result, None)
            out = out.to(out_dtype)
        elif use_gate:
            gate = self._gates(soft, hard, layout, bsz, heads)
            out = gated_block_sparse_attention(qc, kc, vc, gate, layout, scale=self.softmax_scale, causal=is_causal,
                                               key_padding_mask=key_padding_mask).to(out_dtype)
            weights = None
            if return_attention_weights:
                _, weights = self._attend(qc, kc, vc, layout, causal=is_causal, key_padding_mask=key_padding_mask,
                                          return_attention_weights=True)
        else:
            result = self._attend(qc, kc, vc, layout, causal=is_causal, key_padding_mask=key_padding_mask,
                                  return_attention_weights=return_attention_weights)
            out, weights = result if return_attention_weights else (result, None)
            out = out.to(out_dtype)
        extras: list[Any] = [out]
        if return_attention_weights:
            extras.append(weights)
        if return_pattern:
            extras.append({"layout": layout, "scores": scores.detach(), "keep_per_row": keep,
                           "patterns": hard.detach()})
        return extras[0] if len(extras) == 1 else tuple(extras)

    def _gates(self, soft: torch.Tensor, hard: torch.Tensor, layout: BlockSparseLayout, bsz: int,
               heads: int) -> torch.Tensor:
        """Straight-through gates ``[B, H, max_slice_nnz]`` (value 1) in the layout's entry order."""
        qbi, kbi, valid = _slice_tables(layout, bsz, heads)
        b_i = torch.arange(bsz, device=soft.device).view(-1, 1, 1)
        h_i = torch.arange(heads, device=soft.device).view(1, -1, 1) if soft.shape[1] > 1 else 0
        picked = soft[b_i, h_i, qbi, kbi]  # [B, H, width]
        return torch.where(valid, 1.0 + picked - picked.detach(), torch.zeros_like(picked))

    def get_sparsity_loss(self) -> torch.Tensor:
        """Commitment penalty: how far the last forward's relaxed selection is from its top-k.

        ``mean((soft - hard)^2)`` over the candidate block pairs of the last training forward
        (0 before any): adding it to the loss sharpens the importance scores so the relaxation
        the gradients come from matches the layout actually used at the target sparsity.
        """
        if self._last_soft is None:
            return torch.zeros(())
        soft, hard = self._last_soft
        return ((soft - hard.to(soft.dtype)) ** 2).mean()


def _max_row(layout: BlockSparseLayout) -> int:
    """The most active key blocks of a query-block row (0 for an empty layout)."""
    counts = layout.row_counts()
    return int(counts.max().item()) if counts.numel() else 0


def _counts(seq_len: int, block: int, num_blocks: int, like: torch.Tensor) -> torch.Tensor:
    """Tokens per block ``[1, 1, nb, 1]`` (the last block may be partial)."""
    sizes = torch.full((num_blocks,), block, dtype=like.dtype, device=like.device)
    sizes[-1] = seq_len - (num_blocks - 1) * block
    return sizes.view(1, 1, -1, 1)


def _is_lazy(module: nn.Module) -> bool:
    return any(isinstance(p, nn.parameter.UninitializedParameter) for p in module.parameters())
