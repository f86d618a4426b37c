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

from collections.abc import Callable

import torch
from torch import nn

from ..layout import BlockSparseLayout
from ._common import (
    RowInfo,
    auto_rows,
    check_qkv,
    compute_dtype,
    default_scale,
    expand_kv,
    full_precision,
    key_valid_mask,
    masked_softmax,
    maybe_checkpoint,
    rowwise_attention,
)

__all__ = ["AdaptiveTopK", "adaptive_topk", "adaptive_topk_attention", "topk_attention"]


def _check_k(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def _select_then_gather(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kk: int,
    weights_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    *,
    scale: float | None,
    causal: bool,
    key_lengths: torch.Tensor | None,
    key_padding_mask: torch.Tensor | None,
    chunk_size: int | None,
) -> torch.Tensor:
    """Dense-path top-k: per query chunk, pick the ``kk`` best allowed keys without autograd, then
    recompute the selected scores from the gathered keys and attend over them.

    Only the selection pass touches ``chunk x Sk`` scores (no graph); the differentiable part
    works on ``[B, H, chunk, kk, D]`` gathers and is recomputed in the backward pass, so memory
    stays ``O(chunk x Sk)`` and the backward costs ``O(S x kk x D)`` instead of two more
    ``S x Sk`` products. ``weights_fn(selected_scores, valid) -> weights`` (ranks along the last
    dim, best first; invalid slots must get weight 0).
    """
    bsz, sq, sk, heads, _, dim = check_qkv(q, k, v)
    scale = default_scale(scale, dim)
    with full_precision(q.device):  # selection scores and softmax in float32 even under autocast
        return _select_then_gather_impl(q, k, v, kk, weights_fn, bsz, sq, sk, heads, dim, scale, causal,
                                        key_lengths, key_padding_mask, chunk_size)


def _select_then_gather_impl(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kk: int,
    weights_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    bsz: int, sq: int, sk: int, heads: int, dim: int, scale: float, causal: bool,
    key_lengths: torch.Tensor | None, key_padding_mask: torch.Tensor | None, chunk_size: int | None,
) -> torch.Tensor:
    cdt = compute_dtype(q.dtype)
    qh = q.transpose(1, 2).to(cdt)
    kh = expand_kv(k, heads, cdt)
    vh = expand_kv(v, heads, cdt)
    key_valid = key_valid_mask(bsz, sk, key_lengths, key_padding_mask, q.device)
    dim_v = vh.shape[-1]  # v may have its own head dim
    kk = min(kk, sk)
    rows = auto_rows(chunk_size, bsz * heads * sk, sq)
    k_pos = torch.arange(sk, device=q.device)

    def attend(qc: torch.Tensor, kf: torch.Tensor, vf: torch.Tensor, index: torch.Tensor,
               valid: torch.Tensor) -> torch.Tensor:
        n = index.shape[2]
        flat = index.reshape(bsz, heads, n * kk, 1)
        ks = torch.gather(kf, 2, flat.expand(-1, -1, -1, dim)).view(bsz, heads, n, kk, dim)
        vs = torch.gather(vf, 2, flat.expand(-1, -1, -1, dim_v)).view(bsz, heads, n, kk, dim_v)
        selected = torch.matmul(ks, qc.unsqueeze(-1)).squeeze(-1) * scale  # [B, H, n, kk]
        weights = weights_fn(selected.masked_fill(~valid, float("-inf")), valid)
        return torch.matmul(weights.unsqueeze(-2).to(vs.dtype), vs).squeeze(-2)

    outs = []
    for q0 in range(0, sq, rows):
        q1 = min(sq, q0 + rows)
        qc = qh[:, :, q0:q1]
        with torch.no_grad():
            scores = torch.matmul(qc.detach(), kh.detach().transpose(-1, -2))
            if scale < 0:  # ranking by scale * q.k
                scores.neg_()
            if causal:
                future = k_pos.view(1, -1) > torch.arange(q0, q1, device=q.device).view(-1, 1)
                scores.masked_fill_(future, float("-inf"))
            if key_valid is not None:
                scores.masked_fill_(~key_valid.view(bsz, 1, 1, sk), float("-inf"))
            values, index = torch.topk(scores, kk, dim=-1)
            valid = values > float("-inf")
            del scores, values
        outs.append(maybe_checkpoint(attend, True, qc, kh, vh, index, valid))
    return torch.cat(outs, dim=2).transpose(1, 2).to(q.dtype)


def _topk_rows(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    top_k: int,
    weights: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    *,
    layout: BlockSparseLayout | None,
    scale: float | None,
    causal: bool,
    key_lengths: torch.Tensor | None,
    key_padding_mask: torch.Tensor | None,
    chunk_size: int | None,
) -> torch.Tensor:
    """Each query's ``top_k`` best allowed scores, weighted by ``weights(values, valid)``.

    Without a layout: select-then-gather over dense chunks; with one: the row-wise driver over
    the layout's blocks, the weights scattered back to the selected keys.
    """
    if layout is None:
        return _select_then_gather(
            q, k, v, top_k, weights, scale=scale, causal=causal, key_lengths=key_lengths,
            key_padding_mask=key_padding_mask, chunk_size=chunk_size,
        )

    def normalize(scores: torch.Tensor, mask: torch.Tensor, info: RowInfo) -> torch.Tensor:
        values, index = torch.topk(scores, min(top_k, scores.shape[-1]), dim=-1)
        return torch.zeros_like(scores).scatter(-1, index, weights(values, values > float("-inf")))

    return rowwise_attention(
        q, k, v, normalize, layout=layout, scale=scale, causal=causal, key_lengths=key_lengths,
        key_padding_mask=key_padding_mask, chunk_size=chunk_size,
    )


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
    in chunks: a no-grad pass scores ``chunk x Sk`` and picks the keys, then the kept scores are
    recomputed from the gathered keys (and again in the backward), so memory is
    ``O(chunk x Sk)``, never ``Sq x Sk``, and the backward costs ``O(S x top_k x D)``. With
    ``layout`` only the keys of the active blocks compete (scored over the gathered block keys).

    Args:
        q: ``[B, Sq, H, D]``; k: ``[B, Sk, Hkv, D]``; v: ``[B, Sk, Hkv, Dv]`` (``Dv`` may differ
            from ``D``).
        top_k: keys kept per query.
        causal: key position <= query position.
        layout, scale, key_lengths, key_padding_mask, chunk_size: see
            :func:`dilated_sparse.methods.entmax_attention`.

    Returns:
        ``[B, Sq, H, Dv]``; rows without an allowed key are 0.
    """
    top_k = _check_k("top_k", top_k)
    return _topk_rows(q, k, v, top_k, masked_softmax, layout=layout, scale=scale, causal=causal,
                      key_lengths=key_lengths, key_padding_mask=key_padding_mask, chunk_size=chunk_size)


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

    Raises:
        TypeError: ``k_per_head`` not a 1-D tensor.
        ValueError: ``k_per_head`` without one entry per query head, or with an entry outside
            ``[1, k_max]`` (NaN included); ``k_max`` not a positive int; ``ramp <= 0``.
    """
    k_max = _check_k("k_max", k_max)
    if not isinstance(k_per_head, torch.Tensor) or k_per_head.dim() != 1:
        raise TypeError("k_per_head must be a 1-D float tensor [heads]")
    if k_per_head.numel() != q.shape[2]:
        raise ValueError(f"k_per_head has {k_per_head.numel()} entries; q has {q.shape[2]} heads")
    if not torch.compiler.is_compiling():  # value checks sync; skipped while tracing, as the op's are
        kd = k_per_head.detach()
        if not bool(((kd >= 1) & (kd <= k_max)).all()):  # written so that NaN fails too
            raise ValueError(f"k_per_head must lie in [1, k_max={k_max}], got {kd.tolist()}")
    if not ramp > 0:
        raise ValueError(f"ramp must be > 0, got {ramp!r}")

    def ranked_weights(values: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        ranks = torch.arange(values.shape[-1], device=values.device, dtype=values.dtype)
        kh = k_per_head.to(values.dtype).reshape((1, -1) + (1,) * (values.dim() - 2))
        ramp_mask = torch.clamp((ramp + kh - 1 - ranks) / ramp, 0.0, 1.0)
        probs = masked_softmax(values, valid) * ramp_mask
        total = probs.sum(-1, keepdim=True)
        return probs / torch.where(total > 0, total, torch.ones_like(total))

    return _topk_rows(q, k, v, k_max, ranked_weights, layout=layout, scale=scale, causal=causal,
                      key_lengths=key_lengths, key_padding_mask=key_padding_mask, chunk_size=chunk_size)


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
