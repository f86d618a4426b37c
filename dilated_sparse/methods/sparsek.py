"""SPARSEK attention: a scoring network plus a differentiable top-k mask over keys.

Lou, Jia, Zheng & Tu, "Sparser is Faster and Less is More: Efficient Sparse Attention for
Long-Range Transformers" (2024). A scoring network gives every key-value pair an importance
``u_j``; the SPARSEK operator ``m = argmin_{0 <= m <= 1, sum m = k} ||m - u||^2``, i.e.
``m_j = clip(u_j - tau, 0, 1)``, is a differentiable relaxation of the top-k indicator. Each query
attends, with a softmax, to the keys where ``m > 0``, and ``m`` weights the selected value vectors,
which is how the gradient reaches the scoring network. With ``causal`` every query selects among
its own prefix (budget ``min(k, i + 1)``).
"""

from __future__ import annotations

import torch
from torch import nn

from ._common import RowInfo, check_qkv, compute_dtype, full_precision, masked_softmax, rowwise_attention

__all__ = ["SparseK", "sparsek_attention", "sparsek_mask"]


def sparsek_mask(u: torch.Tensor, k: int, mask: torch.Tensor | None = None, n_iter: int = 60) -> torch.Tensor:
    """The SPARSEK operator (Lou et al., 2024) along the last dim: ``clip(u - tau, 0, 1)``.

    ``tau`` makes the entries sum to ``min(k, number of valid entries)``; entries where ``mask``
    is False are 0. ``tau`` is located by bisection, then recomputed in closed form from the
    entries strictly between 0 and 1 (``F``) and those at 1 (``U``):
    ``tau = (sum_F u + |U| - k) / |F|``, so the gradient is the exact one of the projection
    (``dm_F / du_F = I - 11^T / |F|``, zero elsewhere).
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    shape = u.shape if mask is None else torch.broadcast_shapes(u.shape, mask.shape)
    valid = torch.ones(shape, dtype=torch.bool, device=u.device) if mask is None else mask.expand(shape)
    work = (u.float() if u.dtype in (torch.float16, torch.bfloat16) else u).expand(shape)
    budget = valid.sum(-1, keepdim=True).clamp(max=k).to(work.dtype)
    with torch.no_grad():
        big = torch.finfo(work.dtype).max
        u_valid_max = torch.where(valid, work, torch.full_like(work, -big)).amax(-1, keepdim=True)
        u_valid_min = torch.where(valid, work, torch.full_like(work, big)).amin(-1, keepdim=True)
        empty = budget == 0
        hi = torch.where(empty, torch.zeros_like(u_valid_max), u_valid_max)
        lo = torch.where(empty, torch.zeros_like(u_valid_min), u_valid_min - 1)
        for _ in range(n_iter):
            mid = (lo + hi) / 2
            mass = (torch.clamp(work - mid, 0, 1) * valid).sum(-1, keepdim=True)
            above = mass >= budget
            lo = torch.where(above, mid, lo)
            hi = torch.where(above, hi, mid)
        tau0 = (lo + hi) / 2
        diff = work - tau0
        free = valid & (diff > 0) & (diff < 1)
        full = valid & (diff >= 1)
        n_free = free.sum(-1, keepdim=True).to(work.dtype)
        n_full = full.sum(-1, keepdim=True).to(work.dtype)
    tau = torch.where(
        n_free > 0,
        ((work * free).sum(-1, keepdim=True) + n_full - budget) / torch.where(n_free > 0, n_free, torch.ones_like(n_free)),
        tau0,
    )
    # The gradient flows through the free entries only (their tau-shifted values, clipped
    # straight-through against rounding); entries at 1 or 0 are constants. Clipping them with
    # torch.clamp instead would leak a gradient whenever bisection leaves an entry exactly at a
    # bound, where clamp's subgradient choice is torch's (it changed between 2.11 and 2.14).
    shifted = work - tau
    shifted = shifted + (shifted.clamp(0, 1) - shifted).detach()
    m = torch.where(free, shifted, full.to(work.dtype)) * valid
    return m.to(u.dtype)


def sparsek_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_scores: torch.Tensor,
    k_keep: int,
    *,
    causal: bool = False,
    scale: float | None = None,
    key_lengths: torch.Tensor | None = None,
    key_padding_mask: torch.Tensor | None = None,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """SPARSEK attention (Lou et al., 2024).

    ``m_i = SPARSEK(u restricted to the allowed keys of query i, k_keep)``;
    ``out_i = sum_{j: m_ij > 0} softmax_j(s_ij) m_ij v_j`` (softmax over the selected keys).
    Chunked over queries: memory ``O(chunk x Sk)``.

    Args:
        q: ``[B, Sq, H, D]``; k, v: ``[B, Sk, Hkv, D]``.
        key_scores: importance ``u`` ``[B, Sk, Hkv]`` (or ``[B, Sk, H]``) from a scoring network
            (see :class:`SparseK`); differentiable.
        k_keep: keys selected per query (the SPARSEK budget).
        causal, scale, key_lengths, key_padding_mask, chunk_size: as
            :func:`dilated_sparse.methods.topk_attention`.
    """
    bsz, _, sk, heads, kv_heads, _ = check_qkv(q, k, v)
    if key_scores.dim() != 3 or key_scores.shape[:2] != (bsz, sk) or key_scores.shape[2] not in (kv_heads, heads):
        raise ValueError(f"key_scores must be [B, Sk, Hkv or H] = [{bsz}, {sk}, {kv_heads} or {heads}], "
                         f"got {tuple(key_scores.shape)}")
    if isinstance(k_keep, bool) or not isinstance(k_keep, int) or k_keep < 1:
        raise ValueError(f"k_keep must be a positive int, got {k_keep!r}")
    u = key_scores.transpose(1, 2)  # [B, Hu, Sk]
    if u.shape[1] != heads:
        u = u.repeat_interleave(heads // u.shape[1], dim=1)

    def normalize(scores: torch.Tensor, mask: torch.Tensor, info: RowInfo) -> torch.Tensor:
        row_mask = mask if causal else mask[..., :1, :]  # rows only differ under causal
        m = sparsek_mask(u.to(scores.dtype).unsqueeze(2), k_keep, row_mask)
        selected = mask & (m > 0)
        return masked_softmax(scores, selected) * m

    return rowwise_attention(
        q, k, v, normalize, scale=scale, causal=causal, key_lengths=key_lengths,
        key_padding_mask=key_padding_mask, chunk_size=chunk_size,
    )


class SparseK(nn.Module):
    """SPARSEK attention (Lou et al., 2024) with a linear scoring network on the keys.

    ``u_j = w_h . k_j + b_h`` per kv head (the paper scores the layer input with one linear map;
    scoring the key vectors keeps this module's interface ``(q, k, v)``).

    Args:
        num_kv_heads: ``Hkv``.
        head_dim: ``D``.
        k_keep: keys selected per query.
    """

    def __init__(self, num_kv_heads: int, head_dim: int, k_keep: int) -> None:
        super().__init__()
        self.k_keep = k_keep
        self.weight = nn.Parameter(torch.randn(num_kv_heads, head_dim) / head_dim**0.5)
        self.bias = nn.Parameter(torch.zeros(num_kv_heads))

    def scores(self, k: torch.Tensor) -> torch.Tensor:
        """Importance ``u`` ``[B, Sk, Hkv]`` of the keys ``[B, Sk, Hkv, D]``.

        Float32 for half-precision keys (float64 for float64): ``u`` sets the SPARSEK threshold,
        so it is not rounded to bfloat16 on the way.
        """
        cdt = compute_dtype(k.dtype)
        with full_precision(k.device):
            return torch.einsum("bshd,hd->bsh", k.to(cdt), self.weight.to(cdt)) + self.bias.to(cdt)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **options: object) -> torch.Tensor:
        """:func:`sparsek_attention` with the scores of this module's network."""
        return sparsek_attention(q, k, v, self.scores(k), self.k_keep, **options)  # type: ignore[arg-type]
