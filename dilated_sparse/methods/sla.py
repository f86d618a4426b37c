"""SLA: sparse-linear attention (exact attention on critical blocks, linear attention on the rest).

Zhang et al., "SLA: Beyond Sparsity in Diffusion Transformers via Fine-Tunable Sparse-Linear
Attention" (2025). Block pairs are ranked by the pooled scores ``pool(Q) pool(K)^T`` of each query
block row: the top ``critical_fraction`` are *critical* and get exact softmax attention (here
through the block-sparse kernel), the bottom ``negligible_fraction`` are *negligible* and are
skipped, and the rest are *marginal* and get linear attention ``phi(Q) (sum phi(K)^T V) /
(phi(Q) sum phi(K)^T)`` over their keys. The output is ``O = O_sparse + Proj(O_linear)`` with a
learnable projection (:class:`SLA` starts it at zero, so fine-tuning starts from pure sparse
attention).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from ..layout import normalize_block_size
from ..ops import block_sparse_attention
from ._common import check_qkv, compute_dtype, default_scale, expand_kv, full_precision, key_valid_mask
from .block_topk import block_scores, fixed_row_layout

__all__ = ["FEATURE_MAPS", "SLA", "sla_attention", "sla_block_classes"]


def _softmax_features(x: torch.Tensor) -> torch.Tensor:
    return torch.softmax(x, dim=-1)


def _elu_features(x: torch.Tensor) -> torch.Tensor:
    return F.elu(x) + 1


FEATURE_MAPS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "softmax": _softmax_features,
    "elu": _elu_features,
    "relu": torch.relu,
}


def _count(fraction: float, n: int, at_least: int) -> int:
    if not 0 <= fraction <= 1:
        raise ValueError(f"fractions must lie in [0, 1], got {fraction}")
    return max(at_least, min(n, round(fraction * n)))


def sla_block_classes(
    q: torch.Tensor,
    k: torch.Tensor,
    block_size: int | Sequence[int] = 64,
    *,
    critical_fraction: float = 0.05,
    negligible_fraction: float = 0.1,
    causal: bool = False,
    key_valid: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(critical_cols, marginal)`` of SLA's block classification.

    ``critical_cols``: int64 ``[B, H, nqb, n_crit]`` key blocks (``n_crit =
    max(1, round(critical_fraction * nkb))``; with ``causal`` the query block's own block is
    always one of them). ``marginal``: bool ``[B, H, nqb, nkb]``: blocks ranked neither critical
    nor among the ``round(negligible_fraction * n_allowed)`` lowest of their row; with ``causal``
    only blocks wholly before the query block can be marginal (partly future blocks that are not
    critical are dropped). ``key_valid`` (bool ``[B, Sk]``): key blocks with no valid key are
    never marginal (see :func:`~dilated_sparse.methods.block_topk.block_scores`).
    """
    bq, bk = normalize_block_size(block_size)
    if not 0 <= negligible_fraction <= 1:
        raise ValueError(f"negligible_fraction must lie in [0, 1], got {negligible_fraction}")
    with torch.no_grad():
        scores = block_scores(q.detach(), k.detach(), (bq, bk), causal=causal, key_valid=key_valid)
        nqb, nkb = scores.shape[-2:]
        n_crit = _count(critical_fraction, nkb, 1)
        order = torch.argsort(scores, dim=-1, descending=True)
        rank = torch.empty_like(order).scatter_(-1, order, torch.arange(nkb, device=q.device).expand_as(order))
        allowed = scores > float("-inf")
        n_allowed = allowed.sum(-1, keepdim=True)
        n_negl = torch.round(negligible_fraction * n_allowed.to(torch.float64)).to(n_allowed.dtype)
        marginal = allowed & (rank >= n_crit) & (rank < n_allowed - n_negl)
        if causal:
            first_q = torch.arange(nqb, device=q.device).view(-1, 1) * bq
            last_k = (torch.arange(nkb, device=q.device).view(1, -1) + 1) * bk - 1
            marginal = marginal & (last_k <= first_q)
        critical_cols = order[..., :n_crit]
    return critical_cols, marginal


def _linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    marginal: torch.Tensor,
    bq: int,
    bk: int,
    phi: Callable[[torch.Tensor], torch.Tensor],
    key_valid: torch.Tensor | None,
) -> torch.Tensor:
    """Linear attention of every query over the keys of its row's marginal blocks."""
    bsz, sq, heads, dim = q.shape
    sk = k.shape[1]
    cdt = compute_dtype(q.dtype)
    nqb, nkb = marginal.shape[-2:]
    fq = phi(q.transpose(1, 2).to(cdt))  # [B, H, Sq, F]
    fk = phi(expand_kv(k, heads, cdt))  # [B, H, Sk, F]
    vh = expand_kv(v, heads, cdt)
    if key_valid is not None:
        fk = fk * key_valid.view(bsz, 1, sk, 1).to(cdt)
    pad_k = nkb * bk - sk
    if pad_k:
        fk = torch.cat([fk, fk.new_zeros(bsz, heads, pad_k, fk.shape[-1])], dim=2)
        vh = torch.cat([vh, vh.new_zeros(bsz, heads, pad_k, dim)], dim=2)
    fk_blocks = fk.view(bsz, heads, nkb, bk, -1)
    kv = torch.einsum("bhnjf,bhnjd->bhnfd", fk_blocks, vh.view(bsz, heads, nkb, bk, dim))
    z = fk_blocks.sum(dim=3)  # [B, H, nkb, F]
    sel = marginal.to(cdt)
    kv_row = torch.einsum("bhqn,bhnfd->bhqfd", sel, kv)  # [B, H, nqb, F, D]
    z_row = torch.einsum("bhqn,bhnf->bhqf", sel, z)
    pad_q = nqb * bq - sq
    if pad_q:
        fq = torch.cat([fq, fq.new_zeros(bsz, heads, pad_q, fq.shape[-1])], dim=2)
    fq_blocks = fq.view(bsz, heads, nqb, bq, -1)
    num = torch.einsum("bhqif,bhqfd->bhqid", fq_blocks, kv_row)
    den = torch.einsum("bhqif,bhqf->bhqi", fq_blocks, z_row).unsqueeze(-1)
    out = num / torch.where(den > 0, den, torch.ones_like(den))
    return out.reshape(bsz, heads, nqb * bq, dim)[:, :, :sq].transpose(1, 2)


def sla_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    block_size: int | Sequence[int] = 64,
    critical_fraction: float = 0.05,
    negligible_fraction: float = 0.1,
    causal: bool = False,
    scale: float | None = None,
    feature_map: str | Callable[[torch.Tensor], torch.Tensor] = "softmax",
    proj: Callable[[torch.Tensor], torch.Tensor] | None = None,
    key_lengths: torch.Tensor | None = None,
    key_padding_mask: torch.Tensor | None = None,
    return_parts: bool = False,
) -> Any:
    """SLA sparse-linear attention (Zhang et al., 2025): ``O_sparse + proj(O_linear)``.

    Args:
        q: ``[B, Sq, H, D]``; k, v: ``[B, Sk, Hkv, D]``.
        block_size: ``block`` or ``(block_q, block_k)``.
        critical_fraction: share of key blocks per row computed exactly (``k_h``).
        negligible_fraction: share of allowed key blocks per row skipped (``k_l``).
        causal, scale, key_lengths, key_padding_mask: as
            :func:`dilated_sparse.block_sparse_attention`.
        feature_map: ``phi`` of the linear branch: ``"softmax"`` (over the head dim, the paper's
            default), ``"elu"`` (elu + 1), ``"relu"`` or a callable.
        proj: the learnable projection applied to ``O_linear`` (``[B, Sq, H, D]`` -> same), e.g.
            an ``nn.Linear(D, D)``; None means identity.
        return_parts: return ``(out, parts)`` with ``parts`` holding ``"sparse"``, ``"linear"``,
            ``"layout"`` (critical blocks) and ``"marginal"`` (bool block mask).

    Returns:
        ``[B, Sq, H, D]`` in ``q``'s dtype (or ``(out, parts)``).
    """
    bq, bk = normalize_block_size(block_size)
    bsz, sq, sk, _heads, _, dim = check_qkv(q, k, v)
    phi = FEATURE_MAPS.get(feature_map) if isinstance(feature_map, str) else feature_map
    if phi is None:
        raise ValueError(f"feature_map must be one of {sorted(FEATURE_MAPS)} or a callable, got {feature_map!r}")
    key_valid = key_valid_mask(bsz, sk, key_lengths, key_padding_mask, q.device)
    critical_cols, marginal = sla_block_classes(
        q, k, (bq, bk), critical_fraction=critical_fraction, negligible_fraction=negligible_fraction,
        causal=causal, key_valid=key_valid,
    )
    layout = fixed_row_layout(critical_cols, (bq, bk), seq_len_q=sq, seq_len_k=sk)
    sparse = block_sparse_attention(
        q, k, v, layout, scale=default_scale(scale, dim), causal=causal, key_lengths=key_lengths,
        key_padding_mask=key_padding_mask,
    )
    with full_precision(q.device):  # linear branch and the sum in float32, rounded once
        linear = _linear_attention(q, k, v, marginal, bq, bk, phi, key_valid)
    projected = linear if proj is None else proj(linear)
    out = (sparse.to(projected.dtype) + projected).to(q.dtype)
    if return_parts:
        return out, {"sparse": sparse, "linear": linear, "layout": layout, "marginal": marginal}
    return out


class SLA(nn.Module):
    """SLA sparse-linear attention (Zhang et al., 2025) with its learnable output projection.

    ``Proj`` is an ``nn.Linear(head_dim, head_dim)`` shared by the heads, initialised to zero so
    the module starts as block-sparse attention and fine-tuning learns how much of the linear
    branch to add.

    Args:
        head_dim: ``D``.
        block_size, critical_fraction, negligible_fraction, feature_map: see :func:`sla_attention`.
    """

    def __init__(self, head_dim: int, *, block_size: int | Sequence[int] = 64, critical_fraction: float = 0.05,
                 negligible_fraction: float = 0.1, feature_map: str = "softmax") -> None:
        super().__init__()
        self.proj = nn.Linear(head_dim, head_dim)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)
        self.block_size = normalize_block_size(block_size)
        self.critical_fraction = critical_fraction
        self.negligible_fraction = negligible_fraction
        self.feature_map = feature_map

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **options: Any) -> torch.Tensor:
        """:func:`sla_attention` with this module's projection."""
        return sla_attention(
            q, k, v, block_size=self.block_size, critical_fraction=self.critical_fraction,
            negligible_fraction=self.negligible_fraction, feature_map=self.feature_map,
            proj=lambda x: self.proj(x.to(self.proj.weight.dtype)), **options,
        )
