"""Sparsity metrics of attention rows: binary sparsity, normalised entropy, Gini, quantiles.

Each metric takes either a dense probability tensor ``[..., Sq, Sk]`` or the sparse weights dict
returned by ``block_sparse_attention(..., return_attention_weights=True)`` (DESIGN.md section 4).
The dict is never densified: each query row is packed from the blocks of its CSR row
(``[B, H, Sq, row_blocks * block_k]``, zero-padded to the longest row), and the keys outside the
active blocks are counted as exact zeros analytically. So memory is ``O(B x H x Sq x keys of the
longest row)``, not ``Sq x Sk``.

Definitions, per row ``x`` of ``n`` keys (``n = Sk`` unless ``num_keys`` says otherwise, e.g.
``i + 1`` for causal rows), with ``p = x / sum(x)``:

* binary sparsity: the fraction of the ``n`` entries ``<= threshold`` (default: exact zeros);
* normalised entropy: ``-sum p log p / log n`` (0 when ``n == 1``), in ``[0, 1]``;
* Gini coefficient (Hurley & Rickard, "Comparing Measures of Sparsity", 2009):
  ``2 sum_i i x_(i) / (n sum x) - (n + 1) / n`` over the ascending order ``x_(1) <= ...``;
  0 for a uniform row, ``(n - 1) / n`` for a one-hot row;
* quantiles: the ``q``-quantiles of the entries, linearly interpolated like :func:`torch.quantile`.

Empty rows (all zero, e.g. fully masked queries, or rows holding NaN as a naive softmax gives
them) are NaN-safe: their per-row values are 0 and they are left out of the means.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

__all__ = [
    "AttentionRows",
    "attention_metrics",
    "attention_rows",
    "binary_sparsity",
    "gini",
    "normalized_entropy",
    "row_quantiles",
]


@dataclass
class AttentionRows:
    """Attention rows in a compact form: the metrics' common input.

    Attributes:
        entries: ``[..., R, W]`` the explicitly stored entries of each row (float, NaN replaced
            by 0); the ``n - W`` (or more) entries not stored are exact zeros.
        num_keys: ``[..., R]`` float: ``n``, the number of keys each row is spread over.
        valid: bool ``[..., R]``: rows with positive, finite mass.
    """

    entries: torch.Tensor
    num_keys: torch.Tensor
    valid: torch.Tensor


def _dict_entries(weights: dict[str, Any]) -> torch.Tensor:
    """Pack a weights dict into ``[B, H, Sq, W]`` row entries without densifying."""
    for key in ("block_values", "shape", "block_size"):
        if key not in weights:
            raise ValueError(f"weights dict lacks {key!r} (expected the dict of return_attention_weights=True)")
    values = weights["block_values"]
    bsz, heads, sq, _ = weights["shape"]
    bq, bk = weights["block_size"]
    nqb = -(-sq // bq)
    device = values.device
    if "crow_indices" in weights:
        crow = weights["crow_indices"].to(device, torch.int64)
        lb, lh = weights["layout_shape"]
    else:
        rows = weights["block_indices"][:, 0].to(device, torch.int64)
        crow = torch.zeros(nqb + 1, dtype=torch.int64, device=device)
        crow[1:] = torch.cumsum(torch.bincount(rows, minlength=nqb), 0)
        lb, lh = 1, 1
    counts = crow[1:] - crow[:-1]  # [L * nqb]
    width = int(counts.max()) if counts.numel() else 0
    if width == 0:
        return values.new_zeros(bsz, heads, sq, 1)
    total = int(crow[-1])
    stacked_rows = torch.repeat_interleave(torch.arange(counts.numel(), device=device), counts)
    entry = torch.arange(total, device=device)
    slice_of = stacked_rows // nqb
    local_row = stacked_rows % nqb
    pos_in_row = entry - crow[stacked_rows]
    pos_in_slice = entry - crow[::nqb][slice_of]
    packed = values.new_zeros(bsz, heads, nqb, width, bq, bk)
    b_all = torch.arange(bsz, device=device)
    h_all = torch.arange(heads, device=device)
    for s in range(lb * lh):
        sel = slice_of == s
        bs = b_all if lb == 1 else b_all[s // lh : s // lh + 1]
        hs = h_all if lh == 1 else h_all[s % lh : s % lh + 1]
        vals = values[bs][:, hs][:, :, pos_in_slice[sel]]
        packed[bs.view(-1, 1, 1), hs.view(1, -1, 1), local_row[sel].view(1, 1, -1), pos_in_row[sel].view(1, 1, -1)] = vals
    rows = packed.permute(0, 1, 2, 4, 3, 5).reshape(bsz, heads, nqb * bq, width * bk)
    return rows[:, :, :sq]


def attention_rows(attn: torch.Tensor | dict[str, Any], num_keys: int | torch.Tensor | None = None) -> AttentionRows:
    """The :class:`AttentionRows` of a dense ``[..., Sq, Sk]`` tensor or a sparse weights dict.

    Args:
        attn: probabilities (any non-negative weights) or the weights dict.
        num_keys: keys per row (int, or a tensor broadcastable to the rows ``[..., Sq]``);
            default ``Sk``.
    """
    if isinstance(attn, dict):
        entries = _dict_entries(attn)
        seq_len_k = attn["shape"][3]
    elif isinstance(attn, torch.Tensor):
        if attn.dim() < 2 or not attn.dtype.is_floating_point:
            raise ValueError(f"attn must be a floating-point tensor [..., Sq, Sk], got {attn.dtype} {tuple(attn.shape)}")
        entries = attn
        seq_len_k = attn.shape[-1]
    else:
        raise TypeError(f"attn must be a tensor or a weights dict, got {type(attn).__name__}")
    if entries.dtype in (torch.float16, torch.bfloat16):
        entries = entries.float()
    finite_row = torch.isfinite(entries).all(dim=-1)
    entries = torch.where(torch.isfinite(entries), entries, torch.zeros_like(entries))
    mass = entries.sum(dim=-1)
    valid = finite_row & (mass > 0)
    entries = entries * valid.unsqueeze(-1)
    if num_keys is None:
        n = torch.full(valid.shape, float(seq_len_k), dtype=entries.dtype, device=entries.device)
    else:
        n = torch.as_tensor(num_keys, dtype=entries.dtype, device=entries.device).expand(valid.shape)
        if bool((n < 1).any()):
            raise ValueError("num_keys must be >= 1")
    return AttentionRows(entries=entries, num_keys=n, valid=valid)


def _rows(attn: Any, num_keys: int | torch.Tensor | None) -> AttentionRows:
    return attn if isinstance(attn, AttentionRows) else attention_rows(attn, num_keys)


def _reduce(values: torch.Tensor, valid: torch.Tensor, reduce: str) -> torch.Tensor:
    values = torch.where(valid, values, torch.zeros_like(values))
    if reduce == "none":
        return values
    if reduce != "mean":
        raise ValueError(f"reduce must be 'mean' or 'none', got {reduce!r}")
    count = valid.sum()
    return values.sum() / count.clamp_min(1)


def binary_sparsity(
    attn: Any, threshold: float = 0.0, *, num_keys: int | torch.Tensor | None = None, reduce: str = "mean"
) -> torch.Tensor:
    """Fraction of the ``n`` entries of each row that are ``<= threshold`` (mean over valid rows).

    ``reduce="none"`` gives the per-row values ``[..., Sq]`` (0 for empty rows).
    """
    rows = _rows(attn, num_keys)
    nonzero = (rows.entries > threshold).sum(dim=-1).to(rows.entries.dtype)
    return _reduce(1 - nonzero / rows.num_keys, rows.valid, reduce)


def normalized_entropy(
    attn: Any, *, num_keys: int | torch.Tensor | None = None, reduce: str = "mean"
) -> torch.Tensor:
    """``-sum p log p / log n`` of each row (``p`` the row normalised to sum 1); 0 when ``n == 1``."""
    rows = _rows(attn, num_keys)
    x = rows.entries
    mass = x.sum(dim=-1, keepdim=True)
    p = x / torch.where(mass > 0, mass, torch.ones_like(mass))
    plogp = torch.where(p > 0, p * torch.log(torch.where(p > 0, p, torch.ones_like(p))), torch.zeros_like(p))
    entropy = -plogp.sum(dim=-1)
    log_n = torch.log(rows.num_keys)
    value = torch.where(log_n > 0, entropy / torch.where(log_n > 0, log_n, torch.ones_like(log_n)), torch.zeros_like(entropy))
    return _reduce(value, rows.valid, reduce)


def gini(attn: Any, *, num_keys: int | torch.Tensor | None = None, reduce: str = "mean") -> torch.Tensor:
    """Gini coefficient of each row over its ``n`` entries (0 uniform, ``(n-1)/n`` one-hot)."""
    rows = _rows(attn, num_keys)
    x = torch.sort(rows.entries, dim=-1).values  # ascending; the unstored zeros come first
    width = x.shape[-1]
    n = rows.num_keys.unsqueeze(-1)
    rank = n - (width - 1 - torch.arange(width, device=x.device, dtype=x.dtype))  # 1-based rank among n
    mass = x.sum(dim=-1)
    safe_mass = torch.where(mass > 0, mass, torch.ones_like(mass))
    nn_ = rows.num_keys
    value = 2 * (rank * x).sum(dim=-1) / (nn_ * safe_mass) - (nn_ + 1) / nn_
    return _reduce(value, rows.valid, reduce)


def row_quantiles(
    attn: Any,
    quantiles: Sequence[float] | torch.Tensor = (0.5, 0.9, 0.99),
    *,
    num_keys: int | torch.Tensor | None = None,
    reduce: str = "mean",
) -> torch.Tensor:
    """Quantiles of the entries of each row (linear interpolation, as :func:`torch.quantile`).

    Returns ``[len(quantiles)]`` (mean over valid rows) or, with ``reduce="none"``,
    ``[..., Sq, len(quantiles)]`` (0 for empty rows).
    """
    rows = _rows(attn, num_keys)
    qs = torch.as_tensor(quantiles, dtype=rows.entries.dtype, device=rows.entries.device).reshape(-1)
    if bool(((qs < 0) | (qs > 1)).any()):
        raise ValueError(f"quantiles must lie in [0, 1], got {qs.tolist()}")
    x = torch.sort(rows.entries, dim=-1).values
    width = x.shape[-1]
    n = rows.num_keys.unsqueeze(-1)  # [..., R, 1]
    pos = qs * (n - 1)  # [..., R, Q]: position in the full ascending order of n entries
    lo = torch.floor(pos)
    frac = pos - lo
    hi = torch.clamp(lo + 1, max=n - 1)

    def value_at(i: torch.Tensor) -> torch.Tensor:
        j = (i - (n - width)).to(torch.int64)  # index among the stored (largest) entries
        got = torch.gather(x, -1, j.clamp(0, width - 1))
        return torch.where(j >= 0, got, torch.zeros_like(got))

    value = value_at(lo) * (1 - frac) + value_at(hi) * frac
    valid = rows.valid.unsqueeze(-1)
    value = torch.where(valid, value, torch.zeros_like(value))
    if reduce == "none":
        return value
    if reduce != "mean":
        raise ValueError(f"reduce must be 'mean' or 'none', got {reduce!r}")
    flat = value.reshape(-1, qs.numel())
    count = valid.reshape(-1, 1).sum()
    return flat.sum(dim=0) / count.clamp_min(1)


def attention_metrics(
    attn: Any,
    *,
    threshold: float = 0.0,
    quantiles: Sequence[float] = (0.5, 0.9, 0.99),
    num_keys: int | torch.Tensor | None = None,
) -> dict[str, Any]:
    """All metrics at once (means over non-empty rows) as floats, plus ``"rows"`` and ``"empty_rows"``."""
    rows = attention_rows(attn, num_keys)
    q = row_quantiles(rows, quantiles)
    return {
        "sparsity": float(binary_sparsity(rows, threshold)),
        "entropy": float(normalized_entropy(rows)),
        "gini": float(gini(rows)),
        "quantiles": {float(a): float(b) for a, b in zip(quantiles, q.tolist())},
        "rows": int(rows.valid.numel()),
        "empty_rows": int((~rows.valid).sum()),
    }
