"""``BlockSparseMultiheadAttention``: a drop-in for ``nn.MultiheadAttention`` over a sparse layout.

It *is* an ``nn.MultiheadAttention`` (subclass: same constructor, parameters, initialisation and
``state_dict`` keys, so one can be loaded from the other) whose ``forward`` computes the
attention through :func:`dilated_sparse.ops.block_sparse_attention` over a block layout. With
``pattern="all"`` the result equals ``nn.MultiheadAttention`` within floating-point rounding.

Differences, all explicit:

* ``attn_mask``: a causal mask (hinted by ``is_causal=True`` or recognised: bool
  ``triu(ones, 1)`` or float ``-inf`` above the diagonal) runs as ``causal``; an all-allowed mask
  is a no-op; any other token-level mask raises ``ValueError`` (express it as a layout/pattern,
  ``key_padding_mask`` or a window instead). ``is_causal=True`` alone is accepted.
* ``need_weights=True`` returns the sparse weights dict (DESIGN.md section 4), never a dense
  ``[B, H, S, S]`` tensor; ``average_attn_weights=True`` averages over the heads (``shape``
  becomes ``(B, 1, Sq, Sk)``; for per-head layouts over the union of the heads' blocks).
  :func:`dilated_sparse.weights_to_dense` turns it into the dense tensor.
  Unbatched inputs (``[S, E]``) give a dict with batch size 1 (not an ``[S, S]`` tensor).
* A query whose keys are all padded gets 0 (``nn.MultiheadAttention`` gives NaN).
* Dropout (training mode) is applied to the probabilities as the original does, on the
  block-sparse PyTorch path of :mod:`dilated_sparse.modules._dropout` (the op has no dropout).
* ``add_bias_kv`` / ``add_zero_attn`` append keys that every query must see; that is
  supported with ``pattern="all"`` and no causal mask, and refused otherwise.
* Inside ``nn.TransformerEncoderLayer`` the fused inference fast path (which would bypass this
  forward and compute dense attention) is disabled by a no-op forward pre-hook.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.weak import WeakIdKeyDictionary

from ..configs import SparsePatternConfig
from ..layout import BlockSparseLayout
from ._common import (
    LayoutCache,
    check_dropout,
    check_segments,
    check_segments_used,
    check_use_memory_pool,
    pattern_stats,
    resolve_mixed_precision,
)
from .block_sparse import attend

__all__ = [
    "BlockSparseMultiheadAttention",
    "BlockSparseRingMultiheadDilatedAttention",
    "BlockSparseRingMultiheadDilatedAttentionV2",
    "average_weights_over_heads",
]

_DEFAULT_BLOCK = 64


def _no_fast_path_hook(module: nn.Module, args: Any) -> None:
    """No-op forward pre-hook: its presence turns off ``nn.TransformerEncoderLayer``'s fused
    inference path, which would read ``in_proj_weight`` and compute dense attention itself."""
    return


def average_weights_over_heads(weights: dict[str, Any]) -> dict[str, Any]:
    """Average a weights dict over heads: ``block_values`` ``[B, 1, nnz', bq, bk]``, shape ``(B, 1, Sq, Sk)``.

    For a layout shared by the heads the blocks stay the same. For a per-head layout the result
    is over the union of the heads' blocks (per batch slice), each head contributing zeros where
    it has no block, so :func:`dilated_sparse.weights_to_dense` of the result is the mean of the
    heads' dense weights, as ``nn.MultiheadAttention(average_attn_weights=True)``.
    """
    bsz, heads, sq, sk = weights["shape"]
    values = weights["block_values"]
    out = dict(weights)
    out["shape"] = (bsz, 1, sq, sk)
    if "layout_shape" not in weights or weights["layout_shape"][1] == 1:
        out["block_values"] = values.mean(dim=1, keepdim=True)
        return out
    lb, lh = weights["layout_shape"]
    bq, bk = weights["block_size"]
    nqb, nkb = -(-sq // bq), -(-sk // bk)
    dev = values.device
    crow = weights["crow_indices"].to(dev, torch.int64)
    col = weights["col_indices"].to(dev, torch.int64)
    rows = torch.repeat_interleave(torch.arange(crow.numel() - 1, device=dev), crow[1:] - crow[:-1])
    slices = rows // nqb
    batch_slice = slices // lh
    keys = (batch_slice * nqb + rows % nqb) * nkb + col
    union = torch.unique(keys)  # sorted: the union over heads of each batch slice, in CSR order
    union_rows = union // nkb
    union_crow = torch.zeros(lb * nqb + 1, dtype=torch.int64, device=dev)
    union_crow[1:] = torch.cumsum(torch.bincount(union_rows, minlength=lb * nqb), 0)
    position = torch.searchsorted(union, keys) - union_crow[batch_slice * nqb]
    entry = torch.arange(keys.numel(), device=dev) - crow[slices * nqb]
    starts = union_crow[::nqb]
    width = int((starts[1:] - starts[:-1]).max().item()) if lb else 0
    averaged = values.new_zeros(bsz, width, bq, bk)
    head = slices % lh
    if lb == 1:  # every batch element sums its heads' blocks into the shared union
        averaged.index_add_(1, position, values[:, head, entry])
    else:  # batch slice b sums into its own union: flat (b, position) targets
        averaged.view(bsz * width, bq, bk).index_add_(0, batch_slice * width + position,
                                                      values[batch_slice, head, entry])
    out["block_values"] = (averaged / heads).unsqueeze(1)
    for key in ("crow_indices", "col_indices", "layout_shape", "block_indices"):
        out.pop(key, None)
    if lb == 1:
        out["block_indices"] = torch.stack([union_rows, union % nkb], dim=1)
    else:
        out["crow_indices"] = union_crow.to(torch.int32)
        out["col_indices"] = (union % nkb).to(torch.int32)
        out["layout_shape"] = (lb, 1)
    return out


def _is_causal_mask(mask: torch.Tensor, sq: int, sk: int) -> bool:
    """Whether ``mask`` ([Sq, Sk] or [N, Sq, Sk]) is the top-left aligned causal mask."""
    upper = torch.ones(sq, sk, dtype=torch.bool, device=mask.device).triu(1)
    if mask.dtype == torch.bool:
        return bool((mask == upper).all())
    if not mask.is_floating_point():
        return False
    blocked = torch.isneginf(mask)
    return bool((blocked == upper).all()) and bool((mask.masked_fill(blocked, 0.0) == 0).all())


def _is_no_op_mask(mask: torch.Tensor) -> bool:
    if mask.dtype == torch.bool:
        return not bool(mask.any())
    return mask.is_floating_point() and bool((mask == 0).all())


# attn_mask tensor -> (its version, sq, sk, kind): nn.Transformer passes the same causal mask on every
# call, so it is classified (an S x S comparison and a host sync) once, not on every forward.
_MASK_KINDS: WeakIdKeyDictionary = WeakIdKeyDictionary()


def _mask_kind(mask: torch.Tensor, sq: int, sk: int) -> str:
    """``"causal"``, ``"no-op"`` or ``"other"`` for an ``attn_mask`` (cached per tensor and version)."""
    cacheable = not (mask.is_inference() or torch.compiler.is_compiling())  # inference tensors have no version
    cached = _MASK_KINDS.get(mask) if cacheable else None
    if cached is not None and cached[:3] == (mask._version, sq, sk):
        return cached[3]
    kind = "causal" if _is_causal_mask(mask, sq, sk) else "no-op" if _is_no_op_mask(mask) else "other"
    if cacheable:
        _MASK_KINDS[mask] = (mask._version, sq, sk, kind)
    return kind


_MASK_HELP = (
    "dilated_sparse computes attention over a block layout and cannot apply an arbitrary token-level attn_mask "
    "(it would be silently approximated). Express the mask instead as: a layout/pattern (pattern=... names "
    "which key blocks each query block sees; a BlockSparseLayout or a callable also work), causality "
    "(is_causal=True), a sliding window (pattern='local_window' with window_size=...), or per-key padding "
    "(key_padding_mask, True = ignore). Recognised and supported masks: the causal mask "
    "(nn.Transformer.generate_square_subsequent_mask or a bool triu(ones, 1)) and an all-allowed mask."
)


class BlockSparseMultiheadAttention(nn.MultiheadAttention):
    """``nn.MultiheadAttention`` computed by the block-sparse op over a layout.

    Args:
        embed_dim, num_heads, dropout, bias, add_bias_kv, add_zero_attn, kdim, vdim,
            batch_first, device, dtype: as ``nn.MultiheadAttention``.
        pattern: ``"all"`` (dense: equal to ``nn.MultiheadAttention``), a registered pattern
            name (:func:`dilated_sparse.patterns.available_patterns`), a
            :class:`~dilated_sparse.configs.SparsePatternConfig`, a fixed
            :class:`~dilated_sparse.layout.BlockSparseLayout` (its lengths must match the
            inputs) or a callable ``f(seq_len_q=, seq_len_k=, block_size=) -> layout``.
        block_size: block edge in tokens (16, 32, 64, 128 or 256); default 64, or the config's.
        sparsity_ratio: fraction of blocks computed, for patterns that take a target.
        pattern_options: extra options of a named pattern (e.g. ``{"window_size": 256}``).
        segment_lengths, dilation_rates: for the ``dilated_sparse`` pattern.
        mixed_precision: compute the attention in bfloat16 (``True``) / the given half dtype.
        use_memory_pool: accepted for the guides (``True`` is what always happens).
        enable_caching: cache layouts per (lengths, device, causal).

    ``forward(query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
    average_attn_weights=True, is_causal=False)`` returns ``(attn_output, weights_dict or None)``.
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        dropout: float = 0.0,
        bias: bool = True,
        add_bias_kv: bool = False,
        add_zero_attn: bool = False,
        kdim: int | None = None,
        vdim: int | None = None,
        batch_first: bool = False,
        device: Any = None,
        dtype: torch.dtype | None = None,
        *,
        pattern: str | SparsePatternConfig | BlockSparseLayout | Callable[..., BlockSparseLayout] = "all",
        block_size: int | None = None,
        sparsity_ratio: float | None = None,
        pattern_options: dict[str, Any] | None = None,
        segment_lengths: Sequence[int] | None = None,
        dilation_rates: Sequence[int] | None = None,
        mixed_precision: Any = False,
        use_memory_pool: bool = True,
        enable_caching: bool = True,
        cache_size: int = 32,
    ) -> None:
        check_dropout(dropout)
        super().__init__(embed_dim, num_heads, dropout=dropout, bias=bias, add_bias_kv=add_bias_kv,
                         add_zero_attn=add_zero_attn, kdim=kdim, vdim=vdim, batch_first=batch_first,
                         device=device, dtype=dtype)
        self.compute_dtype = resolve_mixed_precision(mixed_precision)
        check_use_memory_pool(use_memory_pool)
        self._layout_cache = LayoutCache(cache_size, enabled=enable_caching)
        self.segment_lengths, self.dilation_rates = check_segments(segment_lengths, dilation_rates)
        self.fixed_layout: BlockSparseLayout | None = None
        self.pattern_fn: Callable[..., BlockSparseLayout] | None = None
        self.sparse_config: SparsePatternConfig | None = None
        overrides: dict[str, Any] = {}
        if block_size is not None:
            overrides["block_size"] = block_size
        if sparsity_ratio is not None:
            overrides["sparsity_ratio"] = sparsity_ratio
        if pattern_options is not None:
            overrides["pattern_options"] = dict(pattern_options)
        if isinstance(pattern, BlockSparseLayout):
            if overrides:
                raise ValueError(f"options {sorted(overrides)} cannot be applied to a ready BlockSparseLayout pattern")
            self.fixed_layout = pattern
        elif isinstance(pattern, SparsePatternConfig):
            self.sparse_config = pattern.replace(**overrides) if overrides else pattern
        elif isinstance(pattern, str):
            overrides.setdefault("block_size", _DEFAULT_BLOCK)
            self.sparse_config = SparsePatternConfig(pattern_type=pattern, **overrides)
        elif callable(pattern):
            if set(overrides) - {"block_size"}:
                raise ValueError(f"options {sorted(set(overrides) - {'block_size'})} cannot be applied to a callable "
                                 "pattern (it receives seq_len_q, seq_len_k and block_size only)")
            self.pattern_fn = pattern
            self._callable_block = overrides.get("block_size", _DEFAULT_BLOCK)
        else:
            raise TypeError(
                "pattern must be 'all', a pattern name, a SparsePatternConfig, a BlockSparseLayout or a callable, "
                f"got {type(pattern).__name__}"
            )
        if self.sparse_config is not None:
            check_segments_used(self.sparse_config.pattern_type, self.segment_lengths, self.dilation_rates)
        elif self.segment_lengths is not None or self.dilation_rates is not None:
            kind = "fixed layout" if self.fixed_layout is not None else "callable"
            raise ValueError(f"segment_lengths/dilation_rates were given but a {kind} pattern does not use them; "
                             "put them in the pattern itself, or use pattern='dilated_sparse'")
        if (add_bias_kv or add_zero_attn) and not self._is_dense_pattern():
            raise ValueError(
                "add_bias_kv/add_zero_attn append keys that every query must see; this is supported with "
                "pattern='all' only (a sparse layout would not reach them)"
            )
        self.register_forward_pre_hook(_no_fast_path_hook)

    # ------------------------------------------------------------------ layouts
    def _is_dense_pattern(self) -> bool:
        return self.sparse_config is not None and self.sparse_config.pattern_type in ("all", "dense", "full")

    @property
    def pattern_block_size(self) -> int | tuple[int, int]:
        """Block size of the layouts this module builds."""
        if self.fixed_layout is not None:
            return self.fixed_layout.block_size
        if self.sparse_config is not None:
            return self.sparse_config.block_size
        return self._callable_block

    def _layout_key(self) -> Hashable:
        if self.sparse_config is not None:
            return self.sparse_config.fingerprint()
        return ()

    def get_layout(
        self, seq_len_q: int, seq_len_k: int | None = None, *, causal: bool = False,
        device: torch.device | str | None = None,
    ) -> BlockSparseLayout:
        """The (cached) layout for these lengths."""
        seq_len_k = seq_len_q if seq_len_k is None else seq_len_k
        dev = torch.device("cpu") if device is None else torch.device(device)
        if self.fixed_layout is not None:
            lay = self.fixed_layout
            if (lay.seq_len_q, lay.seq_len_k) != (seq_len_q, seq_len_k):
                raise ValueError(
                    f"the pattern layout was built for seq_len_q={lay.seq_len_q}, seq_len_k={lay.seq_len_k} but the "
                    f"inputs have {seq_len_q} and {seq_len_k} tokens"
                )
            if lay.layout_heads not in (1, self.num_heads):
                raise ValueError(f"the pattern layout has layout_heads={lay.layout_heads}, expected 1 or {self.num_heads}")
            return lay.to(dev)
        key = (seq_len_q, seq_len_k, str(dev), bool(causal), self._layout_key())

        def build() -> BlockSparseLayout:
            if self.sparse_config is not None:
                return self.sparse_config.make_layout(
                    seq_len_q, seq_len_k, causal=causal, num_heads=self.num_heads, device=dev,
                    segment_lengths=self.segment_lengths, dilation_rates=self.dilation_rates,
                )
            from ..patterns import make_layout

            return make_layout(self.pattern_fn, seq_len_q=seq_len_q, seq_len_k=seq_len_k,
                               block_size=self._callable_block).to(dev)

        return self._layout_cache.get(key, build)

    def get_pattern_stats(
        self, seq_len: int, *, seq_len_k: int | None = None, causal: bool = False, batch_size: int = 1,
        dtype: torch.dtype = torch.float32,
    ) -> dict[str, Any]:
        """Layout statistics for ``seq_len`` (see :func:`~dilated_sparse.modules._common.pattern_stats`)."""
        layout = self.get_layout(seq_len, seq_len_k, causal=causal)
        return pattern_stats(layout, batch_size=batch_size, num_heads=self.num_heads, dtype=dtype)

    def clear_layout_cache(self) -> None:
        """Drop the cached layouts."""
        self._layout_cache.clear()

    # ------------------------------------------------------------------ masks
    def _canonical_kpm(self, mask: torch.Tensor | None, bsz: int, sk: int) -> torch.Tensor | None:
        if mask is None:
            return None
        if not isinstance(mask, torch.Tensor):
            raise TypeError(f"key_padding_mask must be a tensor, got {type(mask).__name__}")
        if mask.dim() == 1:
            mask = mask.unsqueeze(0)
        if tuple(mask.shape) != (bsz, sk):
            raise ValueError(f"key_padding_mask must have shape [batch, seq_len_k] = [{bsz}, {sk}], got "
                             f"{tuple(mask.shape)}")
        if mask.dtype == torch.bool:
            return mask
        if mask.is_floating_point():
            blocked = torch.isneginf(mask)
            if bool((mask.masked_fill(blocked, 0.0) == 0).all()):
                return blocked
            raise ValueError(
                "a float key_padding_mask is supported when it holds only 0 (keep) and -inf (ignore); additive "
                "biases on keys cannot be applied by the block-sparse op. Use a bool mask (True = ignore)."
            )
        raise TypeError(f"key_padding_mask must be bool or float, got {mask.dtype}")

    def _resolve_causal(self, attn_mask: torch.Tensor | None, is_causal: bool, sq: int, sk: int, bsz: int) -> bool:
        if not isinstance(is_causal, bool):
            raise TypeError(f"is_causal must be a bool, got {is_causal!r}")
        if attn_mask is None:
            return is_causal
        if not isinstance(attn_mask, torch.Tensor):
            raise TypeError(f"attn_mask must be a tensor, got {type(attn_mask).__name__}")
        shapes = ((sq, sk), (bsz * self.num_heads, sq, sk))
        if tuple(attn_mask.shape) not in shapes:
            raise ValueError(f"attn_mask must have shape {list(shapes[0])} or {list(shapes[1])}, got "
                             f"{tuple(attn_mask.shape)}")
        kind = _mask_kind(attn_mask, sq, sk)
        if kind == "causal":
            return True
        if is_causal:
            raise ValueError("is_causal=True was given with an attn_mask that is not the causal mask. " + _MASK_HELP)
        if kind == "no-op":
            return False
        raise ValueError("attn_mask is not supported. " + _MASK_HELP)

    # ------------------------------------------------------------------ forward
    def _project(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, ...]:
        e = self.embed_dim
        b = self.in_proj_bias
        bq, bk, bv = (None, None, None) if b is None else (b[:e], b[e:2 * e], b[2 * e:])
        if self._qkv_same_embed_dim:
            w = self.in_proj_weight
            if query is key and key is value:
                qkv = F.linear(query, w, b)
                return qkv[..., :e], qkv[..., e:2 * e], qkv[..., 2 * e:]
            return F.linear(query, w[:e], bq), F.linear(key, w[e:2 * e], bk), F.linear(value, w[2 * e:], bv)
        return (F.linear(query, self.q_proj_weight, bq), F.linear(key, self.k_proj_weight, bk),
                F.linear(value, self.v_proj_weight, bv))

    def forward(  # type: ignore[override]
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, dict[str, Any] | None]:
        """Same arguments and return as ``nn.MultiheadAttention.forward``; see the module docstring
        for the mask rules and the weights dict."""
        for name, t in (("query", query), ("key", key), ("value", value)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
            if t.is_nested:
                raise ValueError(f"{name} is a NestedTensor, which is not supported; pass padded tensors with "
                                 "key_padding_mask (for nn.TransformerEncoder: enable_nested_tensor=False)")
        batched = query.dim() == 3
        if query.dim() not in (2, 3) or key.dim() != query.dim() or value.dim() != query.dim():
            raise ValueError(f"query/key/value must all be [S, E] (unbatched) or 3-D, got {query.dim()}-D, "
                             f"{key.dim()}-D, {value.dim()}-D")
        self_attention = query is key and key is value
        if not batched:
            query = query.unsqueeze(0)
        elif not self.batch_first:
            query = query.transpose(0, 1)
        if self_attention:  # keep one tensor so the projection is one matmul
            key = value = query
        elif not batched:
            key, value = key.unsqueeze(0), value.unsqueeze(0)
        elif not self.batch_first:
            key, value = key.transpose(0, 1), value.transpose(0, 1)
        bsz, sq, _ = query.shape
        sk = key.shape[1]
        if query.shape[-1] != self.embed_dim:
            raise ValueError(f"query embed dim {query.shape[-1]} != embed_dim {self.embed_dim}")
        if key.shape[:2] != value.shape[:2]:
            raise ValueError(f"key and value must have the same batch and length, got {tuple(key.shape)} and "
                             f"{tuple(value.shape)}")
        kpm = self._canonical_kpm(key_padding_mask, bsz, sk)
        causal = self._resolve_causal(attn_mask, is_causal, sq, sk, bsz)
        q, k, v = self._project(query, key, value)
        if self.bias_k is not None or self.add_zero_attn:
            if causal:
                raise ValueError("add_bias_kv/add_zero_attn with a causal mask cannot be expressed by the op (the "
                                 "appended keys would be masked for early queries); drop one of them")
            extra = []
            if self.bias_k is not None:
                k = torch.cat([k, self.bias_k.expand(bsz, 1, -1).to(k.dtype)], dim=1)
                v = torch.cat([v, self.bias_v.expand(bsz, 1, -1).to(v.dtype)], dim=1)
                extra.append(1)
            if self.add_zero_attn:
                k = torch.cat([k, k.new_zeros(bsz, 1, k.shape[-1])], dim=1)
                v = torch.cat([v, v.new_zeros(bsz, 1, v.shape[-1])], dim=1)
                extra.append(1)
            if kpm is not None:
                kpm = F.pad(kpm, (0, len(extra)), value=False)
            sk = k.shape[1]
        heads, hd = self.num_heads, self.head_dim
        q = q.reshape(bsz, sq, heads, hd)
        k = k.reshape(bsz, sk, heads, hd)
        v = v.reshape(bsz, sk, heads, hd)
        layout = self.get_layout(sq, sk, causal=causal, device=q.device)
        result = attend(q, k, v, layout, training=self.training, dropout=self.dropout,
                        compute_dtype=self.compute_dtype, scale=None, causal=causal, key_padding_mask=kpm,
                        return_attention_weights=need_weights)
        out, weights = result if need_weights else (result, None)
        out = self.out_proj(out.reshape(bsz, sq, self.embed_dim))
        if weights is not None and average_attn_weights:
            weights = average_weights_over_heads(weights)
        if not batched:
            out = out.squeeze(0)
        elif not self.batch_first:
            out = out.transpose(0, 1)
        return out, weights


class BlockSparseRingMultiheadDilatedAttention(BlockSparseMultiheadAttention):
    """The guides' multi-head module: :class:`BlockSparseMultiheadAttention` with their arguments.

    Args:
        embed_dim, num_heads: as ``nn.MultiheadAttention``.
        segment_lengths, dilation_rates: LongNet segments for the ``dilated_sparse`` pattern.
        sparse_config: the pattern (default ``SparsePatternConfig()``, i.e. ``dilated_sparse``
            with ``sparsity_ratio=0.1``); ``sparsity_ratio``/``block_size`` override its fields.
        dropout, bias, batch_first (default True, as in the guides), add_bias_kv, add_zero_attn,
            kdim, vdim, device, dtype, mixed_precision, use_memory_pool, enable_caching: as
            :class:`BlockSparseMultiheadAttention`.
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        segment_lengths: Sequence[int] | None = None,
        dilation_rates: Sequence[int] | None = None,
        sparse_config: SparsePatternConfig | None = None,
        dropout: float = 0.0,
        bias: bool = True,
        batch_first: bool = True,
        *,
        sparsity_ratio: float | None = None,
        block_size: int | None = None,
        add_bias_kv: bool = False,
        add_zero_attn: bool = False,
        kdim: int | None = None,
        vdim: int | None = None,
        device: Any = None,
        dtype: torch.dtype | None = None,
        mixed_precision: Any = False,
        use_memory_pool: bool = True,
        enable_caching: bool = True,
    ) -> None:
        if sparse_config is None:
            sparse_config = SparsePatternConfig()
        super().__init__(
            embed_dim, num_heads, dropout=dropout, bias=bias, add_bias_kv=add_bias_kv, add_zero_attn=add_zero_attn,
            kdim=kdim, vdim=vdim, batch_first=batch_first, device=device, dtype=dtype, pattern=sparse_config,
            block_size=block_size, sparsity_ratio=sparsity_ratio, segment_lengths=segment_lengths,
            dilation_rates=dilation_rates, mixed_precision=mixed_precision, use_memory_pool=use_memory_pool,
            enable_caching=enable_caching,
        )


#: The guides' V2 name: the same module.
BlockSparseRingMultiheadDilatedAttentionV2 = BlockSparseRingMultiheadDilatedAttention
