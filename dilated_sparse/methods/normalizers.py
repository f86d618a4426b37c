"""Sparse normalisers (sparsemax, 1.5-entmax, alpha-entmax) and entmax attention.

* :func:`sparsemax` -- Martins & Astudillo, "From Softmax to Sparsemax: A Sparse Model of
  Attention and Multi-Label Classification" (ICML 2016): Euclidean projection onto the simplex.
* :func:`entmax15` -- Peters, Niculae & Martins, "Sparse Sequence-to-Sequence Models" (ACL 2019):
  exact sort-based 1.5-entmax.
* :func:`entmax_bisect` -- alpha-entmax by bisection, with the gradient in ``alpha`` of Correia,
  Niculae & Martins, "Adaptively Sparse Transformers" (EMNLP 2019).
* :func:`entmax_attention` / :func:`sparsemax_attention` -- attention with these normalisers,
  computed chunk by chunk (or over the active blocks of a layout): the threshold of each query row
  is found by bisection over that row's scores and the output follows, never materialising
  ``Sq x Sk`` (the blockwise scheme of Goncalves et al., "AdaSplash: Adaptive Sparse Flash
  Attention", ICML 2025, done with chunked PyTorch ops instead of a fused kernel).

All normalisers accept ``-inf`` entries (masked) and return all-zero rows, with zero gradients,
where every entry of a row is ``-inf``.
"""

from __future__ import annotations

from typing import Any

import torch

from ..layout import BlockSparseLayout
from ._common import RowInfo, masked_softmax, rowwise_attention

__all__ = [
    "entmax15",
    "entmax_attention",
    "entmax_bisect",
    "sparsemax",
    "sparsemax_attention",
]

_NEG_INF = float("-inf")


def _upcast(x: torch.Tensor) -> torch.Tensor:
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _fill_masked(x: torch.Tensor, gap: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Shift rows (last dim) so their max is 0 and replace ``-inf`` by ``-gap``.

    Entries at ``-gap`` lie below every threshold the normaliser can choose, so they stay out of
    the support: the result is exact. Returns ``(shifted, finite_mask, empty_rows)``.
    """
    finite = x > _NEG_INF
    row_max = x.amax(dim=-1, keepdim=True)
    empty = ~torch.isfinite(row_max)
    base = torch.where(empty, torch.zeros_like(row_max), row_max)
    shifted = torch.where(finite, x - base, torch.full_like(x, -gap))
    return shifted, finite, empty


def _safe_div(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    return num / torch.where(den > 0, den, torch.ones_like(den))


class _SparsemaxFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:  # x: rows along the last dim
        z, _, empty = _fill_masked(x, gap=2.0)
        z_sorted = torch.sort(z, dim=-1, descending=True).values
        cumulative = z_sorted.cumsum(dim=-1) - 1
        ranks = torch.arange(1, z.shape[-1] + 1, device=z.device, dtype=z.dtype)
        support = (ranks * z_sorted > cumulative).sum(dim=-1, keepdim=True)
        tau = cumulative.gather(-1, support - 1) / support.to(z.dtype)
        p = torch.clamp(z - tau, min=0).masked_fill(empty, 0.0)
        ctx.save_for_backward(p)
        return p

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        (p,) = ctx.saved_tensors
        support = (p > 0).to(grad.dtype)
        mean = _safe_div((grad * support).sum(-1, keepdim=True), support.sum(-1, keepdim=True))
        return support * (grad - mean)


class _Entmax15Function(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        z, _, empty = _fill_masked(x, gap=3.0)
        z = z / 2
        z_sorted = torch.sort(z, dim=-1, descending=True).values
        ranks = torch.arange(1, z.shape[-1] + 1, device=z.device, dtype=z.dtype)
        mean = z_sorted.cumsum(-1) / ranks
        mean_sq = (z_sorted * z_sorted).cumsum(-1) / ranks
        delta = (1 - ranks * (mean_sq - mean * mean)) / ranks
        tau = mean - torch.sqrt(torch.clamp(delta, min=0))
        support = (tau <= z_sorted).sum(dim=-1, keepdim=True)
        tau_star = tau.gather(-1, support - 1)
        p = torch.clamp(z - tau_star, min=0).pow(2).masked_fill(empty, 0.0)
        ctx.save_for_backward(p)
        return p

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        (p,) = ctx.saved_tensors
        g = p.sqrt()
        gx = grad * g
        return gx - g * _safe_div(gx.sum(-1, keepdim=True), g.sum(-1, keepdim=True))


class _EntmaxBisectFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, alpha: torch.Tensor, n_iter: int) -> torch.Tensor:
        # p_i = [(alpha - 1) x_i - tau]_+ ** (1 / (alpha - 1)), tau such that sum_i p_i = 1.
        finite = x > _NEG_INF
        n_valid = finite.sum(dim=-1, keepdim=True)
        empty = n_valid == 0
        row_max = torch.where(empty, torch.zeros_like(x[..., :1]), x.amax(dim=-1, keepdim=True))
        am1 = alpha - 1
        power = 1 / am1
        xs = torch.where(finite, (x - row_max) * am1, torch.full_like(x, _NEG_INF))
        # f(tau) = sum p(tau) - 1 decreases in tau; f(-1) >= 0 and f(-(1/n)^(alpha-1)) <= 0.
        lo = torch.full_like(row_max, -1.0)
        hi = -torch.pow(1.0 / n_valid.clamp_min(1).to(x.dtype), am1)
        width = hi - lo
        for _ in range(n_iter):
            width = width / 2
            mid = lo + width
            mass = torch.clamp(xs - mid, min=0).pow(power).sum(-1, keepdim=True)
            lo = torch.where(mass >= 1, mid, lo)
        p = torch.clamp(xs - lo, min=0).pow(power)
        p = _safe_div(p, p.sum(-1, keepdim=True)).masked_fill(empty, 0.0)
        ctx.save_for_backward(p, alpha)
        return p

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, None]:
        p, alpha = ctx.saved_tensors
        positive = p > 0
        g = torch.where(positive, p.pow(2 - alpha), torch.zeros_like(p))
        g_sum = g.sum(-1, keepdim=True)
        gx = grad * g
        dx = gx - g * _safe_div(gx.sum(-1, keepdim=True), g_sum)
        d_alpha = None
        if ctx.needs_input_grad[1]:
            # dp_i/dalpha = (p_i - g_i / sum g) / (alpha-1)^2
            #               - (p_i log p_i - (g_i / sum g) sum_j p_j log p_j) / (alpha-1)
            am1 = alpha - 1
            p_log_p = torch.where(positive, p * torch.log(torch.where(positive, p, torch.ones_like(p))), 0.0)
            skewed = _safe_div(g, g_sum)
            dp = (p - skewed) / (am1 * am1) - (p_log_p - skewed * p_log_p.sum(-1, keepdim=True)) / am1
            d_alpha = (grad * dp).sum(-1, keepdim=True)
        return dx, d_alpha, None


def _apply_lastdim(fn: Any, x: torch.Tensor, dim: int, *args: Any) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or not x.dtype.is_floating_point:
        raise TypeError("input must be a floating-point tensor")
    moved = _upcast(x).movedim(dim, -1)
    out = fn(moved, *args)
    return out.movedim(-1, dim).to(x.dtype)


def sparsemax(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Sparsemax along ``dim`` (Martins & Astudillo, ICML 2016), exact by sorting.

    ``argmin_p ||p - x||^2`` over the probability simplex. Differentiable (the Jacobian is the
    projection onto the support). ``-inf`` entries get 0; an all ``-inf`` slice gives zeros.
    """
    return _apply_lastdim(_SparsemaxFunction.apply, x, dim)


def entmax15(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """1.5-entmax along ``dim`` (Peters, Niculae & Martins, ACL 2019), exact by sorting.

    ``p_i = [x_i / 2 - tau]_+^2`` with ``tau`` making ``p`` sum to 1. ``-inf`` entries get 0; an
    all ``-inf`` slice gives zeros.
    """
    return _apply_lastdim(_Entmax15Function.apply, x, dim)


def entmax_bisect(
    x: torch.Tensor, alpha: float | torch.Tensor = 1.5, dim: int = -1, n_iter: int = 50
) -> torch.Tensor:
    """alpha-entmax along ``dim`` by bisection (Correia, Niculae & Martins, EMNLP 2019).

    ``p_i = [(alpha - 1) x_i - tau]_+^{1 / (alpha - 1)}``, ``tau`` found by ``n_iter`` bisection
    steps (then ``p`` is renormalised). ``alpha`` (> 1) is a float or a tensor broadcastable to
    ``x`` with size 1 along ``dim`` (e.g. one ``alpha`` per head); a tensor ``alpha`` that
    requires grad gets its gradient (Correia et al., Proposition 1). ``alpha == 1`` falls back to
    softmax. ``-inf`` entries get 0; an all ``-inf`` slice gives zeros.
    """
    if not isinstance(x, torch.Tensor) or not x.dtype.is_floating_point:
        raise TypeError("x must be a floating-point tensor")
    if isinstance(n_iter, bool) or not isinstance(n_iter, int) or n_iter < 1:
        raise ValueError(f"n_iter must be a positive int, got {n_iter!r}")
    work = _upcast(x)
    if not isinstance(alpha, torch.Tensor):
        alpha = float(alpha)
        if alpha < 1:
            raise ValueError(f"alpha must be >= 1, got {alpha}")
        if alpha == 1:
            return masked_softmax(work, work > _NEG_INF, dim=dim).to(x.dtype)
        alpha = torch.tensor(alpha, dtype=work.dtype, device=work.device)
    shape = list(work.shape)
    shape[dim] = 1
    alpha_full = alpha.to(work.dtype).expand(shape).movedim(dim, -1)
    out = _EntmaxBisectFunction.apply(work.movedim(dim, -1), alpha_full, n_iter)
    return out.movedim(-1, dim).to(x.dtype)


def _per_head(alpha: float | torch.Tensor, scores: torch.Tensor) -> float | torch.Tensor:
    if not isinstance(alpha, torch.Tensor) or alpha.dim() == 0:
        return alpha
    heads = scores.shape[1]
    if alpha.numel() != heads:
        raise ValueError(f"alpha must be a float, a scalar or one value per head ({heads}), got {tuple(alpha.shape)}")
    return alpha.reshape((1, heads) + (1,) * (scores.dim() - 2))


def entmax_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    alpha: float | torch.Tensor = 1.5,
    layout: BlockSparseLayout | None = None,
    *,
    scale: float | None = None,
    causal: bool = False,
    key_lengths: torch.Tensor | None = None,
    key_padding_mask: torch.Tensor | None = None,
    n_iter: int = 50,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """alpha-entmax attention (Correia et al., EMNLP 2019; blockwise as AdaSplash, ICML 2025).

    ``out_i = sum_j entmax_alpha(scale * q_i . k_j)_j v_j`` over the allowed keys of query ``i``.
    Computed per chunk of queries (or per group of query-block rows of ``layout``, touching only
    the keys of its active blocks): pass 1 finds each row's threshold by bisection over its scores,
    pass 2 forms the output. Memory ``O(chunk x keys)``, also in the backward pass (chunks are
    recomputed). ``alpha``: float > 1, a scalar tensor, or a tensor with one value per query head
    (learnable, as in adaptively sparse transformers). ``alpha == 2`` is sparsemax.

    Args:
        q: ``[B, Sq, H, D]``; k: ``[B, Sk, Hkv, D]``; v: ``[B, Sk, Hkv, Dv]`` (``Dv`` may differ
            from ``D``).
        layout: optional :class:`~dilated_sparse.BlockSparseLayout` restricting the keys.
        scale, causal, key_lengths, key_padding_mask: as in
            :func:`dilated_sparse.block_sparse_attention`.
        n_iter: bisection steps.
        chunk_size: queries (or block rows with a layout) per chunk.

    Returns:
        ``[B, Sq, H, Dv]``; rows without an allowed key are 0.
    """

    def normalize(scores: torch.Tensor, mask: torch.Tensor, info: RowInfo) -> torch.Tensor:
        return entmax_bisect(scores, _per_head(alpha, scores), dim=-1, n_iter=n_iter)

    return rowwise_attention(
        q, k, v, normalize, layout=layout, scale=scale, causal=causal, key_lengths=key_lengths,
        key_padding_mask=key_padding_mask, chunk_size=chunk_size,
    )


def sparsemax_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: BlockSparseLayout | None = None,
    *,
    scale: float | None = None,
    causal: bool = False,
    key_lengths: torch.Tensor | None = None,
    key_padding_mask: torch.Tensor | None = None,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Sparsemax attention (Martins & Astudillo, ICML 2016), chunked like :func:`entmax_attention`.

    Uses the exact sort-based sparsemax on each chunk's rows; memory ``O(chunk x keys)``.
    """

    def normalize(scores: torch.Tensor, mask: torch.Tensor, info: RowInfo) -> torch.Tensor:
        return sparsemax(scores, dim=-1)

    return rowwise_attention(
        q, k, v, normalize, layout=layout, scale=scale, causal=causal, key_lengths=key_lengths,
        key_padding_mask=key_padding_mask, chunk_size=chunk_size,
    )
