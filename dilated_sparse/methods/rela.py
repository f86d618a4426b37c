"""ReLA: rectified linear attention with RMSNorm on the output.

Zhang, Titov & Sennrich, "Sparse Attention with Linear Units" (EMNLP 2021): the softmax is
replaced by a ReLU of the scores, so weights are exactly zero below 0 and need not sum to one; the
output of each head is stabilised by an RMSNorm (with a learnable gain).
"""

from __future__ import annotations

import torch
from torch import nn

from ..layout import BlockSparseLayout
from ._common import RowInfo, compute_dtype, full_precision, rms_norm, rowwise_attention

__all__ = ["ReLA", "rela_attention"]


def rela_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    gain: torch.Tensor | None = None,
    eps: float = 1e-6,
    causal: bool = False,
    layout: BlockSparseLayout | None = None,
    scale: float | None = None,
    key_lengths: torch.Tensor | None = None,
    key_padding_mask: torch.Tensor | None = None,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """ReLA (Zhang, Titov & Sennrich, EMNLP 2021): ``RMSNorm(sum_j relu(s_ij) v_j) * gain``.

    Scores ``s_ij = scale * q_i . k_j`` over the allowed keys; chunked over queries (memory
    ``O(chunk x Sk)``). ``gain`` is ``[D]`` or ``[H, D]`` (None: 1). A query with no allowed key
    (or all scores <= 0) gets 0, without NaN.
    """

    def normalize(scores: torch.Tensor, mask: torch.Tensor, info: RowInfo) -> torch.Tensor:
        return torch.relu(scores.masked_fill(~mask, 0.0))

    cdt = compute_dtype(q.dtype)
    # the attention output stays in float32 for the RMSNorm: one rounding to q's dtype, at the end
    work = rowwise_attention(
        q, k, v, normalize, layout=layout, scale=scale, causal=causal, key_lengths=key_lengths,
        key_padding_mask=key_padding_mask, chunk_size=chunk_size, out_dtype=cdt,
    )
    weight = None if gain is None else gain.to(cdt)
    if weight is not None and weight.dim() == 2:
        weight = weight.unsqueeze(0).unsqueeze(0)  # [1, 1, H, D]
    with full_precision(q.device):
        return rms_norm(work, weight, eps).to(q.dtype)


class ReLA(nn.Module):
    """ReLA attention (Zhang, Titov & Sennrich, EMNLP 2021) with a learnable RMSNorm gain per head.

    Args:
        num_heads: query heads.
        head_dim: ``D``.
        eps: RMSNorm epsilon.
    """

    def __init__(self, num_heads: int, head_dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.ones(num_heads, head_dim))
        self.eps = eps

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **options: object) -> torch.Tensor:
        """:func:`rela_attention` with this module's gain."""
        return rela_attention(q, k, v, gain=self.gain, eps=self.eps, **options)  # type: ignore[arg-type]
