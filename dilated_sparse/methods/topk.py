"""Top-k attention: keep the ``k`` largest scores of each query, softmax over them.

* :func:`topk_attention` -- Zhao et al., "Explicit Sparse Transformer: Concentrated Attention
  Through Explicit Selection" (2019) and Gupta et al., "Memory-efficient Transformers via Top-k
  Attention" (2021, query chunking for ``O(S x chunk)`` memory).
* :func:`adaptive_topk_attention` / :class:`AdaptiveTopK` -- a learned, per-head ``k`` in
  ``[k_min, k_max]``: the rank-``r`` score is weighted by the soft ramp mask of Sukhbaatar et al.,
  "Adaptive Attention Span in Transformers" (ACL 2019), applied to ranks instead of distances,
  so the gradient reaches ``k``.
"""

from __future__ import annotations

import torch
from torch import nn

from ..layout import BlockSparseLayout
from ._common import RowInfo, masked_softmax, rowwise_attention

__all__ = ["topk_attention", "adaptive_topk_attention", "adaptive_topk", "AdaptiveTopK"]


def _check_k(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def topk_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    top_k: int,
    causal: bool = False,
    *,
    layout: BlockSparseLayout | None = None,
    scale: float | None = None,
    key_lengths: torch.Tensor | None = None,
    key_padding_mask: torch.Tensor | None = None,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Top-k attention (Zhao et al., 2019; chunked as Gupta et al., 2021).

    Each query keeps its ``top_k`` largest allowed scores (fewer when it has fewer allowed keys)
    and takes a softmax over them; gradients flow through the kept scores. Queries are processed
    in chunks (activations recomputed in the backward), so memory is ``O(chunk x Sk)``, never
    ``Sq x Sk``. With ``layout`` only the keys of the active blocks compete.

    Args:
        q: ``[B, Sq, H, D]``; k, v: ``[B, Sk, Hkv, D]``.
        top_k: keys kept per query.
        causal: key position <= query position.
        layout, scale, key_lengths, key_padding_mask, chunk_size: see
            :func:`dilated_sparse.methods.entmax_attention`.

    Returns:
        ``[B, Sq, H, D]``; rows without an allowed key are 0.
    """
    top_k = _check_k("top_k", top_k)

    def normalize(scores: torch.Tensor, mask: torch.Tensor, info: RowInfo) -> torch.Tensor:
        kk = min(top_k, scores.shape[-1])
        values, index = torch.topk(scores, kk, dim=-1)
        probs = masked_softmax(values, values > float("-inf"))
        return torch.zeros_like(scores).scatter(-1, index, probs)

    return rowwise_attention(
        q, k, v, normalize, layout=layout, scale=scale, causal=causal, key_lengths=key_lengths,
        key_padding_mask=key_padding_mask, chunk_size=chunk_size,
    )


def adaptive_topk_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_per_head: torch.Tensor,
    k_max: int,
    *,
    ramp: float = 4.0,
    causal: bool = False,
    layout: BlockSparseLayout | None = None,
    scale: float | None = None,
    key_lengths: torch.Tensor | None = None,
    key_padding_mask: torch.Tensor | None = None,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Top-k attention with a soft, differentiable ``k`` per head (adaptive span over ranks).

    The ``k_max`` best keys of each query are ranked ``r = 0, 1, ...`` and weighted by the ramp
    ``m_r = clamp((ramp + k_h - 1 - r) / ramp, 0, 1)`` of Sukhbaatar et al. (ACL 2019):
    ``p_r = m_r exp(s_r) / sum_t m_t exp(s_t)``. Ranks below ``k_h`` count fully, ranks past
    ``k_h - 1 + ramp`` not at all, and ``d out / d k_h`` is defined.

    Args:
        k_per_head: float ``[H]`` (may require grad), each in ``[1, k_max]``.
        k_max: largest number of keys looked at per query.
        ramp: width of the soft ramp in ranks (> 0).
        causal, layout, scale, key_lengths, key_padding_mask, chunk_size: as
            :func:`topk_attention`.
    """
    k_max = _check_k("k_max", k_max)
    if not isinstance(k_per_head, torch.Tensor) or k_per_head.dim() != 1:
        raise TypeError("k_per_head must be a 1-D float tensor [heads]")
    if k_per_head.numel() != q.shape[2]:
        raise ValueError(f"k_per_head has {k_per_head.numel()} entries; q has {q.shape[2]} heads")
    if not ramp > 0:
        raise ValueError(f"ramp must be > 0, got {ramp!r}")

    def normalize(scores: torch.Tensor, mask: torch.Tensor, info: RowInfo) -> torch.Tensor:
        kk = min(k_max, scores.shape[-1])
        values, index = torch.topk(scores, kk, dim=-1)
        ranks = torch.arange(kk, device=scores.device, dtype=scores.dtype)
        kh = k_per_head.to(scores.dtype).reshape((1, -1) + (1,) * (scores.dim() - 2))
        ramp_mask = torch.clamp((ramp + kh - 1 - ranks) / ramp, 0.0, 1.0)
        probs = masked_softmax(values, values > float("-inf")) * ramp_mask
        total = probs.sum(-1, keepdim=True)
        probs = probs / torch.where(total > 0, total, torch.ones_like(total))
        return torch.zeros_like(scores).scatter(-1, index, probs)

    return rowwise_attention(
        q, k, v, normalize, layout=layout, scale=scale, causal=causal, key_lengths=key_lengths,
        key_padding_mask=key_padding_mask, chunk_size=chunk_size,
    )


adaptive_topk = adaptive_topk_attention


class AdaptiveTopK(nn.Module):
    """Top-k attention with a learned ``k`` per head in ``[k_min, k_max]`` (adaptive span on ranks).

    ``k_h = k_min + sigmoid(theta_h) * (k_max - k_min)``; the forward is
    :func:`adaptive_topk_attention`. Add ``regularization()`` (mean ``k_h / k_max``) times a
    coefficient to the loss to push ``k`` down, as Sukhbaatar et al. (ACL 2019) do for spans.

    Args:
        num_heads: query heads.
        k_min, k_max: range of ``k`` (``1 <= k_min <= k_max``).
        init: initial position of ``k`` in the range, in ``(0, 1)``.
        ramp: width of the soft ramp in ranks.
    """

    def __init__(self, num_heads: int, k_min: int, k_max: int, *, init: float = 0.5, ramp: float = 4.0) -> None:
        super().__init__()
        _check_k("num_heads", num_heads)
        _check_k("k_min", k_min)
        _check_k("k_max", k_max)
        if k_min > k_max:
            raise ValueError(f"k_min ({k_min}) must be <= k_max ({k_max})")
        if not 0 < init < 1:
            raise ValueError(f"init must be in (0, 1), got {init}")
        self.k_min, self.k_max, self.ramp = k_min, k_max, float(ramp)
        logit = torch.logit(torch.tensor(float(init)))
        self.theta = nn.Parameter(torch.full((num_heads,), float(logit)))

    @property
    def k_values(self) -> torch.Tensor:
        """Current ``k`` per head (float ``[H]``, differentiable)."""
        return self.k_min + torch.sigmoid(self.theta) * (self.k_max - self.k_min)

    def regularization(self) -> torch.Tensor:
        """Mean of ``k_h / k_max`` (a scalar to add to the loss, scaled, to favour small ``k``)."""
        return (self.k_values / self.k_max).mean()

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **options: object) -> torch.Tensor:
        """:func:`adaptive_topk_attention` with this module's ``k`` per head."""
        return adaptive_topk_attention(q, k, v, self.k_values, self.k_max, ramp=self.ramp, **options)  # type: ignore[arg-type]
