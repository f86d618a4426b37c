"""A pre-norm transformer block whose attention is any method of :mod:`dilated_sparse.methods`.

:class:`SparseMethodAttention` wraps one method behind ``forward(q, k, v, *, causal, key_padding_mask)``
(holding its learnable parts, layout caches and schedules); :class:`SparseTransformerBlock` is the
usual pre-norm block ``x + Attn(LN(x))``, ``x + MLP(LN(x))`` around it, so every method can be
trained and compared on the same footing. Methods that carry a regulariser (the L0 penalty of the
learnable block mask, the ``k`` penalty of adaptive top-k) report it by :meth:`regularization`;
add it to the task loss.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from ..layout import BlockSparseLayout
from ..ops import block_sparse_attention
from ..patterns import make_layout
from ._common import compute_dtype, full_precision
from .block_topk import block_topk_attention
from .gumbel import GumbelTemperatureSchedule, LearnableBlockMask, gumbel_softmax_attention
from .lsh import _check_lsh_sizes, lsh_attention
from .normalizers import entmax_attention, sparsemax_attention
from .rela import ReLA
from .sla import SLA
from .sparsek import SparseK
from .topk import AdaptiveTopK, topk_attention

__all__ = ["SparseMethodAttention", "SparseTransformerBlock", "available_methods"]

# method name -> the pattern name it runs through the block-sparse kernel (fixed layouts)
_PATTERN_METHODS = {
    "bigbird": "bigbird",
    "block": "block_neighbour",
    "block_neighbour": "block_neighbour",
    "dilated": "dilated_sparse",
    "local": "local_window",
    "longformer": "longformer",
}
_ALIASES = {"bernoulli": "gated", "block_mask": "gated", "adaptive": "adaptive_topk", "reformer": "lsh",
            "entmax15": "entmax", "block_neighbor": "block_neighbour", "moba": "block_topk"}
_METHODS = (
    "dense", "topk", "adaptive_topk", "entmax", "sparsemax", "gumbel", "gated", "rela", "sparsek", "sla",
    "lsh", "block_topk", "pattern", *_PATTERN_METHODS,
)


def available_methods() -> list[str]:
    """Names accepted by :class:`SparseMethodAttention` and :class:`SparseTransformerBlock`."""
    return sorted(set(_METHODS))


def _pop(options: dict[str, Any], name: str, default: Any) -> Any:
    return options.pop(name, default)


class SparseMethodAttention(nn.Module):
    """One sparse-attention method as a module: ``forward(q, k, v, *, causal, key_padding_mask)``.

    Args:
        method: one of :func:`available_methods` (aliases: ``"bernoulli"`` for ``"gated"``,
            ``"reformer"`` for ``"lsh"``, ``"moba"`` for ``"block_topk"``, ...).
        num_heads: query heads ``H``.
        head_dim: ``D``.
        num_kv_heads: ``Hkv`` (default ``H``).
        **options: the method's options. ``dense``: none. ``topk``: ``top_k`` (32).
            ``adaptive_topk``: ``k_min`` (1), ``k_max`` (32), ``ramp``, ``reg_weight`` (0).
            ``entmax``: ``alpha`` (1.5), ``learn_alpha`` (False: one alpha per head in
            ``(1, 2]``), ``n_iter``. ``sparsemax``: none. ``gumbel``: ``hard`` (True),
            ``temperature`` (1.0) or a schedule (``initial_temperature``, ``final_temperature``,
            ``total_steps``, ``schedule``; the schedule steps once per training forward).
            ``gated``: ``max_seq_len`` (1024), ``block_size`` (64), ``temperature``, ``init_keep``,
            ``l0_weight`` (0). ``rela``: none. ``sparsek``: ``k_keep`` (32). ``sla``:
            ``block_size``, ``critical_fraction``, ``negligible_fraction``, ``feature_map``.
            ``lsh``: ``n_buckets`` (8), ``n_hashes`` (1), ``chunk_size`` (64), ``seed``.
            ``block_topk``: ``blocks_per_row`` (4), ``block_size`` (64). ``bigbird``, ``block``,
            ``dilated``, ``local``, ``longformer``: ``block_size`` (64) plus the pattern's options;
            ``pattern``: ``pattern`` (a name or spec) plus its options. Chunked methods also take
            ``chunk_size``.
    """

    def __init__(self, method: str, num_heads: int, head_dim: int, *, num_kv_heads: int | None = None,
                 **options: Any) -> None:
        super().__init__()
        if not isinstance(method, str):
            raise TypeError(f"method must be a str, got {type(method).__name__}")
        name = _ALIASES.get(method.lower(), method.lower())
        if name not in _METHODS:
            raise ValueError(f"unknown sparse method {method!r}; choose one of {available_methods()}")
        self.method = name
        self.num_heads, self.head_dim = num_heads, head_dim
        self.num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        opts = dict(options)
        self.scale: float | None = _pop(opts, "scale", None)
        self.reg_weight = 0.0
        self._layouts: dict[tuple[int, int, str, bool], BlockSparseLayout] = {}  # (Sq, Sk, device, causal)
        self._run: Callable[..., torch.Tensor] = getattr(self, f"_build_{name}", self._build_pattern)(opts)
        if opts:
            raise TypeError(f"unknown options for sparse method {name!r}: {sorted(opts)}")

    # ------------------------------------------------------------------ builders
    def _build_dense(self, opts: dict[str, Any]) -> Callable[..., torch.Tensor]:
        def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, kpm: torch.Tensor | None) -> torch.Tensor:
            with full_precision(q.device):  # scores and softmax in float32 (float64), rounded once
                return dense(q, k, v, causal, kpm).to(q.dtype)

        def dense(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, kpm: torch.Tensor | None) -> torch.Tensor:
            group = q.shape[2] // k.shape[2]
            cdt = compute_dtype(q.dtype)
            qh, kh, vh = (t.transpose(1, 2).to(cdt) for t in (q, k, v))
            if group > 1:
                kh, vh = kh.repeat_interleave(group, dim=1), vh.repeat_interleave(group, dim=1)
            mask = None
            if kpm is not None or causal:
                sq, sk = q.shape[1], k.shape[1]
                mask = torch.ones(sq, sk, dtype=torch.bool, device=q.device)
                if causal:
                    mask = torch.tril(mask)
                mask = mask.view(1, 1, sq, sk)
                if kpm is not None:
                    mask = mask & ~kpm.view(kpm.shape[0], 1, 1, sk)
            scale = self.scale if self.scale is not None else 1 / math.sqrt(q.shape[-1])
            scores = torch.matmul(qh, kh.transpose(-1, -2)) * scale
            if mask is not None:
                scores = scores.masked_fill(~mask, float("-inf"))
            probs = torch.softmax(scores, dim=-1)
            if mask is not None:
                probs = torch.nan_to_num(probs, nan=0.0)
            return torch.matmul(probs, vh).transpose(1, 2)

        return run

    def _build_topk(self, opts: dict[str, Any]) -> Callable[..., torch.Tensor]:
        top_k = _pop(opts, "top_k", 32)
        chunk = _pop(opts, "chunk_size", None)
        return lambda q, k, v, causal, kpm: topk_attention(
            q, k, v, top_k, causal, scale=self.scale, key_padding_mask=kpm, chunk_size=chunk)

    def _build_adaptive_topk(self, opts: dict[str, Any]) -> Callable[..., torch.Tensor]:
        self.adaptive = AdaptiveTopK(self.num_heads, _pop(opts, "k_min", 1), _pop(opts, "k_max", 32),
                                     ramp=_pop(opts, "ramp", 4.0))
        self.reg_weight = float(_pop(opts, "reg_weight", 0.0))
        chunk = _pop(opts, "chunk_size", None)
        return lambda q, k, v, causal, kpm: self.adaptive(
            q, k, v, causal=causal, scale=self.scale, key_padding_mask=kpm, chunk_size=chunk)

    def _build_entmax(self, opts: dict[str, Any]) -> Callable[..., torch.Tensor]:
        alpha = float(_pop(opts, "alpha", 1.5))
        learn = bool(_pop(opts, "learn_alpha", False))
        n_iter = _pop(opts, "n_iter", 30)
        chunk = _pop(opts, "chunk_size", None)
        if not 1 < alpha <= 2:
            raise ValueError(f"alpha must lie in (1, 2], got {alpha}")
        if learn:  # alpha_h = 1 + sigmoid(theta_h), in (1, 2), as adaptively sparse transformers
            self.alpha_logit = nn.Parameter(torch.full((self.num_heads,), math.log((alpha - 1) / max(2 - alpha, 1e-3))))

        def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, kpm: torch.Tensor | None) -> torch.Tensor:
            a: float | torch.Tensor = 1 + torch.sigmoid(self.alpha_logit) if learn else alpha
            return entmax_attention(q, k, v, a, scale=self.scale, causal=causal, key_padding_mask=kpm,
                                    n_iter=n_iter, chunk_size=chunk)

        return run

    def _build_sparsemax(self, opts: dict[str, Any]) -> Callable[..., torch.Tensor]:
        chunk = _pop(opts, "chunk_size", None)
        return lambda q, k, v, causal, kpm: sparsemax_attention(
            q, k, v, scale=self.scale, causal=causal, key_padding_mask=kpm, chunk_size=chunk)

    def _build_gumbel(self, opts: dict[str, Any]) -> Callable[..., torch.Tensor]:
        hard = bool(_pop(opts, "hard", True))
        chunk = _pop(opts, "chunk_size", None)
        fixed = _pop(opts, "temperature", None)
        self.schedule = GumbelTemperatureSchedule(
            _pop(opts, "initial_temperature", 1.0 if fixed is None else fixed),
            _pop(opts, "final_temperature", 0.1 if fixed is None else fixed),
            _pop(opts, "total_steps", 1000), _pop(opts, "schedule", "exponential"),
        )

        def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, kpm: torch.Tensor | None) -> torch.Tensor:
            temperature = self.schedule.temperature
            if self.training:
                self.schedule.step()
            return gumbel_softmax_attention(q, k, v, temperature, hard, noise=self.training, causal=causal,
                                            scale=self.scale, key_padding_mask=kpm, chunk_size=chunk)

        return run

    def _build_gated(self, opts: dict[str, Any]) -> Callable[..., torch.Tensor]:
        self.mask = LearnableBlockMask(
            self.num_heads, _pop(opts, "max_seq_len", 1024), _pop(opts, "block_size", 64),
            temperature=_pop(opts, "temperature", 0.5), init_keep=_pop(opts, "init_keep", 0.9),
            hard=_pop(opts, "hard", True),
        )
        self.reg_weight = float(_pop(opts, "l0_weight", 0.0))
        chunk = _pop(opts, "chunk_size", None)
        return lambda q, k, v, causal, kpm: self.mask(
            q, k, v, causal=causal, scale=self.scale, key_padding_mask=kpm, chunk_size=chunk)

    def _build_rela(self, opts: dict[str, Any]) -> Callable[..., torch.Tensor]:
        self.rela = ReLA(self.num_heads, self.head_dim, eps=_pop(opts, "eps", 1e-6))
        chunk = _pop(opts, "chunk_size", None)
        return lambda q, k, v, causal, kpm: self.rela(
            q, k, v, causal=causal, scale=self.scale, key_padding_mask=kpm, chunk_size=chunk)

    def _build_sparsek(self, opts: dict[str, Any]) -> Callable[..., torch.Tensor]:
        self.sparsek = SparseK(self.num_kv_heads, self.head_dim, _pop(opts, "k_keep", 32))
        chunk = _pop(opts, "chunk_size", None)
        return lambda q, k, v, causal, kpm: self.sparsek(
            q, k, v, causal=causal, scale=self.scale, key_padding_mask=kpm, chunk_size=chunk)

    def _build_sla(self, opts: dict[str, Any]) -> Callable[..., torch.Tensor]:
        self.sla = SLA(
            self.head_dim, block_size=_pop(opts, "block_size", 64),
            critical_fraction=_pop(opts, "critical_fraction", 0.05),
            negligible_fraction=_pop(opts, "negligible_fraction", 0.1),
            feature_map=_pop(opts, "feature_map", "softmax"),
        )
        return lambda q, k, v, causal, kpm: self.sla(q, k, v, causal=causal, scale=self.scale, key_padding_mask=kpm)

    def _build_lsh(self, opts: dict[str, Any]) -> Callable[..., torch.Tensor]:
        n_buckets, n_hashes = _check_lsh_sizes(_pop(opts, "n_buckets", 8), _pop(opts, "n_hashes", 1))
        chunk = _pop(opts, "chunk_size", 64)
        seed = _pop(opts, "seed", 0)
        generator = torch.Generator().manual_seed(seed)
        # fresh random rotations each training step (as Reformer), fixed ones in eval mode
        self.register_buffer("rotations", torch.randn(n_hashes, self.head_dim, n_buckets // 2, generator=generator))
        self._lsh_generator = generator

        def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, kpm: torch.Tensor | None) -> torch.Tensor:
            rotations = self.rotations
            if self.training:
                rotations = torch.randn(rotations.shape, generator=self._lsh_generator).to(rotations.device)
            return lsh_attention(q, k, v, n_buckets=n_buckets, n_hashes=n_hashes, chunk_size=chunk, causal=causal,
                                 rotations=rotations, scale=self.scale, key_padding_mask=kpm)

        return run

    def _build_block_topk(self, opts: dict[str, Any]) -> Callable[..., torch.Tensor]:
        per_row = _pop(opts, "blocks_per_row", 4)
        block_size = _pop(opts, "block_size", 64)
        return lambda q, k, v, causal, kpm: block_topk_attention(
            q, k, v, per_row, block_size, causal=causal, scale=self.scale, key_padding_mask=kpm)

    def _build_pattern(self, opts: dict[str, Any]) -> Callable[..., torch.Tensor]:
        pattern = _PATTERN_METHODS[self.method] if self.method != "pattern" else _pop(opts, "pattern", None)
        if pattern is None:
            raise TypeError("sparse method 'pattern' needs pattern= (a pattern name, spec or layout)")
        block_size: int | Sequence[int] = _pop(opts, "block_size", 64)
        pattern_options = dict(opts)
        opts.clear()

        def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, kpm: torch.Tensor | None) -> torch.Tensor:
            key = (q.shape[1], k.shape[1], str(q.device), bool(causal))
            layout = self._layouts.get(key)
            if layout is None:
                if isinstance(pattern, BlockSparseLayout):
                    layout = make_layout(pattern, seq_len_q=q.shape[1], seq_len_k=k.shape[1])
                else:
                    layout = make_layout(pattern, seq_len_q=q.shape[1], seq_len_k=k.shape[1], block_size=block_size,
                                         causal=causal, device=q.device, **pattern_options)
                self._layouts[key] = layout
            return block_sparse_attention(q, k, v, layout, scale=self.scale, causal=causal, key_padding_mask=kpm)

        return run

    # ------------------------------------------------------------------ API
    def regularization(self) -> torch.Tensor:
        """The method's penalty times its weight (``l0_weight`` / ``reg_weight``); 0 otherwise."""
        if self.method == "gated" and self.reg_weight:
            return self.reg_weight * self.mask.l0_loss()
        if self.method == "adaptive_topk" and self.reg_weight:
            return self.reg_weight * self.adaptive.regularization()
        return torch.zeros(())

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
                key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``q [B, Sq, H, D]``, ``k, v [B, Sk, Hkv, D]`` -> ``[B, Sq, H, D]``."""
        return self._run(q, k, v, bool(causal), key_padding_mask)

    def extra_repr(self) -> str:
        return f"method={self.method!r}, num_heads={self.num_heads}, head_dim={self.head_dim}"


class SparseTransformerBlock(nn.Module):
    """Pre-norm transformer block with a sparse-attention method and an MLP.

    ``x = x + Dropout(W_o Attn(LN(x)))``; ``x = x + Dropout(MLP(LN(x)))`` with a GELU MLP.

    Args:
        d_model: model width ``E`` (a multiple of ``n_heads``).
        n_heads: attention heads.
        sparse_method: a name from :func:`available_methods` (``'topk'``, ``'entmax'``,
            ``'sparsemax'``, ``'gumbel'``, ``'bigbird'``, ``'block'``, ``'dilated'``, ...).
        mlp_ratio: hidden width of the MLP over ``d_model``.
        dropout: dropout on the two residual branches.
        causal: causal self-attention.
        **method_options: passed to :class:`SparseMethodAttention`.

    Input ``x`` is ``[B, S, E]``; ``key_padding_mask`` (bool ``[B, S]``, True = padding) is
    optional.
    """

    def __init__(self, d_model: int, n_heads: int, sparse_method: str = "topk", *, mlp_ratio: float = 4.0,
                 dropout: float = 0.0, causal: bool = False, **method_options: Any) -> None:
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model ({d_model}) must be a multiple of n_heads ({n_heads})")
        self.d_model, self.n_heads, self.causal = d_model, n_heads, causal
        self.head_dim = d_model // n_heads
        self.norm1 = nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.out_proj = nn.Linear(d_model, d_model)
        self.attention = SparseMethodAttention(sparse_method, n_heads, self.head_dim, **method_options)
        self.norm2 = nn.LayerNorm(d_model)
        hidden = round(mlp_ratio * d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, hidden), nn.GELU(), nn.Linear(hidden, d_model))
        self.dropout = nn.Dropout(dropout)

    @property
    def sparse_method(self) -> str:
        """The attention method's canonical name."""
        return self.attention.method

    def regularization(self) -> torch.Tensor:
        """The attention method's penalty (see :meth:`SparseMethodAttention.regularization`)."""
        return self.attention.regularization()

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``[B, S, E]`` -> ``[B, S, E]``."""
        if x.dim() != 3 or x.shape[-1] != self.d_model:
            raise ValueError(f"x must be [batch, seq_len, {self.d_model}], got {tuple(x.shape)}")
        bsz, seq, _ = x.shape
        qkv = self.qkv(self.norm1(x)).view(bsz, seq, 3, self.n_heads, self.head_dim)
        q, k, v = qkv.unbind(dim=2)
        attn = self.attention(q, k, v, causal=self.causal, key_padding_mask=key_padding_mask)
        x = x + self.dropout(self.out_proj(attn.reshape(bsz, seq, self.d_model)))
        return x + self.dropout(self.mlp(self.norm2(x)))
