"""``SparseAttention`` (OpenAI Sparse Transformer modes) and ``MultiPatternAttention``.

* :class:`SparseAttention` takes the original's arguments (``heads``, ``attn_mode``,
  ``local_attn_ctx``, ``blocksize``) and merged-head inputs ``[B, S, heads * D]``.
* :class:`MultiPatternAttention` gives each head group its own pattern and runs them in **one**
  call of the op with a per-head layout (:func:`dilated_sparse.patterns.per_head`).
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Any

import torch

from ..configs import SparsePatternConfig
from ..layout import BlockSparseLayout
from ._common import check_segments
from .block_sparse import BlockSparseAttentionBase

__all__ = ["MultiPatternAttention", "SparseAttention"]

_MODES = ("all", "local", "strided")


class SparseAttention(BlockSparseAttentionBase):
    """OpenAI Sparse Transformer attention (Child et al., 2019).

    Args:
        heads: number of heads the merged inputs are split into.
        attn_mode: ``'all'`` (dense), ``'local'`` (keys within ``local_attn_ctx`` positions:
            exact, the layout covers the band and the op's ``window`` masks inside the blocks) or
            ``'strided'`` (keys a multiple of ``local_attn_ctx`` away: the layout is the block cover
            of that rule, :mod:`dilated_sparse.patterns.sparse_transformer`, so inside a kept
            block every key is attended; the stride is not applied token by token).
        local_attn_ctx: the context / stride in tokens (needed by ``local`` and ``strided``).
        blocksize: block edge in tokens (16, 32, 64, 128, 256).
        causal: the original masks are causal, so the default is True; ``False`` gives the
            bidirectional variant.
        dropout, softmax_scale, mixed_precision, enable_caching: see
            :class:`~dilated_sparse.modules.block_sparse.BlockSparseAttentionBase`.

    ``forward(q, k, v)`` with ``[B, S, heads * D]`` inputs returns ``[B, S, heads * D]``.
    """

    def __init__(
        self,
        heads: int,
        attn_mode: str = "all",
        local_attn_ctx: int | None = None,
        blocksize: int = 32,
        *,
        causal: bool = True,
        dropout: float = 0.0,
        softmax_scale: float | None = None,
        mixed_precision: Any = False,
        enable_caching: bool = True,
    ) -> None:
        super().__init__(dropout=dropout, softmax_scale=softmax_scale, mixed_precision=mixed_precision,
                         enable_caching=enable_caching)
        if isinstance(heads, bool) or not isinstance(heads, int) or heads < 1:
            raise ValueError(f"heads must be a positive int, got {heads!r}")
        if attn_mode not in _MODES:
            raise ValueError(f"attn_mode must be one of {_MODES}, got {attn_mode!r}")
        if attn_mode != "all" and local_attn_ctx is None:
            raise ValueError(f"attn_mode={attn_mode!r} needs local_attn_ctx (tokens)")
        if not isinstance(causal, bool):
            raise TypeError(f"causal must be a bool, got {causal!r}")
        self.heads, self.attn_mode, self.local_attn_ctx = heads, attn_mode, local_attn_ctx
        self.blocksize, self.causal = blocksize, causal
        self.get_layout(blocksize, causal=causal)  # validates blocksize / local_attn_ctx now

    def _layout_key(self) -> Hashable:
        return (self.attn_mode, self.local_attn_ctx, self.blocksize)

    def _build_layout(
        self, seq_len_q: int, seq_len_k: int, *, causal: bool, num_heads: int, device: torch.device
    ) -> BlockSparseLayout:
        from ..patterns import make_layout

        options: dict[str, Any] = {"causal": causal, "device": device}
        if self.local_attn_ctx is not None:
            options["local_attn_ctx"] = self.local_attn_ctx
        return make_layout(self.attn_mode, seq_len_q=seq_len_q, seq_len_k=seq_len_k, block_size=self.blocksize,
                           **options)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        """``[B, S, heads * D]`` inputs -> ``[B, S, heads * D]``."""
        for name, t in (("q", q), ("k", k), ("v", v)):
            if not isinstance(t, torch.Tensor) or t.dim() != 3:
                raise ValueError(f"{name} must be a 3-D tensor [batch, seq_len, heads * head_dim]")
            if t.shape[-1] % self.heads:
                raise ValueError(f"{name}'s last dim {t.shape[-1]} is not divisible by heads={self.heads}")
        bsz, sq, _ = q.shape
        split = [t.reshape(t.shape[0], t.shape[1], self.heads, t.shape[2] // self.heads) for t in (q, k, v)]
        layout = self.get_layout(sq, k.shape[1], causal=self.causal, num_heads=self.heads, device=q.device)
        window = None
        if self.attn_mode == "local":  # the exact token rule |i - j| < local_attn_ctx, inside the blocks too
            window = (self.local_attn_ctx - 1, 0 if self.causal else self.local_attn_ctx - 1)
        out = self._attend(*split, layout, causal=self.causal, window=window)
        return out.reshape(bsz, sq, out.shape[2] * out.shape[3])


class MultiPatternAttention(BlockSparseAttentionBase):
    """A different pattern per head group, in one op call with a per-head layout.

    Args:
        patterns: one entry per head group: a pattern name, a
            :class:`~dilated_sparse.configs.SparsePatternConfig` or a ``{"pattern": name, ...}``
            dict. With ``G`` entries and ``H`` heads, group ``g`` is heads
            ``g * H / G .. (g + 1) * H / G - 1`` (``H`` must be a multiple of ``G``).
        block_size: block edge for the names and dicts (configs keep their own, which must
            equal it).
        segment_lengths, dilation_rates: defaults for ``dilated_sparse`` entries.
        dropout, softmax_scale, mixed_precision, enable_caching: see the base class.

    ``forward(q, k, v, is_causal=False, return_attention_weights=False, key_padding_mask=None)``
    with ``[B, S, H, D]`` inputs.
    """

    def __init__(
        self,
        patterns: Sequence[str | SparsePatternConfig | dict[str, Any]] = ("local_window", "dilated_sparse"),
        *,
        block_size: int = 64,
        segment_lengths: Sequence[int] | None = None,
        dilation_rates: Sequence[int] | None = None,
        dropout: float = 0.0,
        softmax_scale: float | None = None,
        mixed_precision: Any = False,
        enable_caching: bool = True,
    ) -> None:
        super().__init__(dropout=dropout, softmax_scale=softmax_scale, mixed_precision=mixed_precision,
                         enable_caching=enable_caching)
        if isinstance(patterns, (str, dict, SparsePatternConfig)) or not patterns:
            raise TypeError("patterns must be a non-empty list (one entry per head group)")
        configs = []
        for i, item in enumerate(patterns):
            if isinstance(item, str):
                item = SparsePatternConfig(pattern_type=item, block_size=block_size)
            elif isinstance(item, dict):
                spec = dict(item)
                name = spec.pop("pattern", spec.pop("pattern_type", None))
                if name is None:
                    raise ValueError(f"patterns[{i}] dict needs a 'pattern' key")
                known = {"sparsity_ratio", "local_window_size", "window_size", "global_tokens", "dilation_rates",
                         "segment_lengths"}
                fields = {key: spec.pop(key) for key in list(spec) if key in known}
                item = SparsePatternConfig(pattern_type=name, block_size=block_size, pattern_options=spec, **fields)
            elif not isinstance(item, SparsePatternConfig):
                raise TypeError(f"patterns[{i}] must be a name, a dict or a SparsePatternConfig, got "
                                f"{type(item).__name__}")
            if item.block_size != block_size:
                raise ValueError(f"patterns[{i}] has block_size={item.block_size}; every group must use the module's "
                                 f"block_size={block_size} (one layout)")
            configs.append(item)
        self.pattern_configs = configs
        self.block_size = block_size
        self.segment_lengths, self.dilation_rates = check_segments(segment_lengths, dilation_rates)

    def _layout_key(self) -> Hashable:
        return tuple(c.fingerprint() for c in self.pattern_configs)

    def _build_layout(
        self, seq_len_q: int, seq_len_k: int, *, causal: bool, num_heads: int, device: torch.device
    ) -> BlockSparseLayout:
        from ..patterns import per_head

        groups = len(self.pattern_configs)
        if num_heads % groups:
            raise ValueError(f"the number of heads ({num_heads}) must be a multiple of the number of patterns ({groups})")
        layouts = [
            c.make_layout(seq_len_q, seq_len_k, causal=causal, device=device, num_heads=num_heads // groups,
                          segment_lengths=self.segment_lengths, dilation_rates=self.dilation_rates)
            for c in self.pattern_configs
        ]
        if any(lay.layout_heads != 1 for lay in layouts):
            per_group = [lay if lay.layout_heads == num_heads // groups else
                         _repeat_heads(lay, num_heads // groups) for lay in layouts]
            return per_head(per_group)
        return per_head(layouts, num_heads=num_heads)


def _repeat_heads(layout: BlockSparseLayout, heads: int) -> BlockSparseLayout:
    from ..patterns import broadcast_layout

    return broadcast_layout(layout, layout_batch=1, layout_heads=heads)
