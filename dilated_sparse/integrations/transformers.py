"""Hugging Face transformers integration: block-sparse attention as ``attn_implementation="dilated_sparse"``.

Usage::

    from dilated_sparse.integrations.transformers import apply_dilated_sparse, register

    register()  # once; then any model can be loaded with attn_implementation="dilated_sparse"
    model = AutoModelForCausalLM.from_config(config, attn_implementation="dilated_sparse")

    # or swap it into an existing model with a chosen pattern:
    apply_dilated_sparse(model, "local_window", block_size=64, window_size=256)

How the attention function finds its pattern (first match wins):

1. ``module._dilated_sparse_spec`` on the attention module (a manual per-module override);
2. ``config.dilated_sparse`` on the module's config, a dict ``{"pattern": name, "block_size": B,
   **options}`` with an optional ``"layers": [layer_idx, ...]`` (other layers use ``dense``); it is
   saved with ``save_pretrained``, so a reloaded model keeps its pattern;
3. otherwise the ``dense`` pattern (every block), which gives the same result as ``eager``/``sdpa``.

Layouts are built through :func:`dilated_sparse.patterns.make_layout` once per (pattern, lengths,
device) and cached. Causal models (``module.is_causal``, e.g. Llama) get ``causal=True`` both in the
kernel (token-level rule) and in the pattern when it takes the option (blocks wholly above the
diagonal are dropped). Grouped-query attention is passed straight to the kernel (no repeat of k/v).

Masks: a 2-D padding mask (the tokenizer's ``attention_mask``) becomes the kernel's
``key_padding_mask``; no ``[B, 1, S, S]`` mask is ever built (the module registers its own mask
function in ``AttentionMaskInterface``). A ``sliding_window`` passed by the model (Mistral, Qwen2,
...) becomes the kernel's left window. Generation with a cache works: queries that sit at the end of
a longer key sequence use the rows of the full-length layout that hold them (pattern positions are
counted over the keys the cache holds, so with a sliding-window cache that drops old keys a sparse
pattern is positioned relative to the kept keys).

Not supported (clear error or one warning): attention dropout (warned once, not applied: the fused
kernel has no dropout), soft-capping, attention sinks, position biases (T5), custom 4-D masks and
packed sequences (several sequences in one row separated by ``position_ids``).
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from ..layout import BlockSparseLayout, normalize_block_size
from ..modules._common import LayoutCache

__all__ = [
    "ATTN_IMPLEMENTATION",
    "DEFAULT_BLOCK_SIZE",
    "apply_dilated_sparse",
    "attention_modules",
    "dilated_sparse_attention_forward",
    "dilated_sparse_mask",
    "layout_for",
    "register",
]

#: The name under which the attention is registered (``attn_implementation=...``).
ATTN_IMPLEMENTATION = "dilated_sparse"
#: Block size used when a spec does not give one.
DEFAULT_BLOCK_SIZE = 64

_LAYOUT_CACHE = LayoutCache(max_entries=64)
# Layouts derived from a cached one for generation steps (query rows of the full layout), per layout.
_DERIVED: weakref.WeakKeyDictionary[BlockSparseLayout, dict[tuple[str, int, int], BlockSparseLayout]] = (
    weakref.WeakKeyDictionary()
)
_DENSE_SPEC: dict[str, Any] = {"pattern": "dense"}
_warned: set[str] = set()


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, stacklevel=3)


# ------------------------------------------------------------------------------ specs
def _normalize_spec(pattern: Any, block_size: Any = None, options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """``{"pattern": name, "block_size": (bq, bk) as a list, **options}``, checked against the registry."""
    from ..patterns import get_pattern, pattern_options

    if isinstance(pattern, Mapping):
        spec = {k: v for k, v in pattern.items() if k != "layers"}
        if "pattern" not in spec:
            raise ValueError(f"a dilated_sparse spec dict needs a 'pattern' key, got keys {sorted(spec)}")
        name = spec.pop("pattern")
        if block_size is None:
            block_size = spec.pop("block_size", None)
        else:
            spec.pop("block_size", None)
        spec.update(options or {})
    else:
        name, spec = pattern, dict(options or {})
    if not isinstance(name, str):
        raise TypeError(f"pattern must be a registered pattern name (str), got {type(name).__name__}")
    get_pattern(name)  # ValueError listing the valid names
    valid = pattern_options(name)
    unknown = sorted(set(spec) - set(valid))
    if unknown:
        raise TypeError(f"pattern {name!r} got unknown option(s) {', '.join(unknown)}; valid options: {', '.join(valid)}")
    if "device" in spec:
        raise TypeError("a dilated_sparse spec must not set 'device' (layouts follow the inputs' device)")
    bq, bk = normalize_block_size(DEFAULT_BLOCK_SIZE if block_size is None else block_size)
    return {"pattern": name, "block_size": [bq, bk], **spec}


def _freeze(value: Any) -> Any:
    if isinstance(value, Mapping):
        return tuple(sorted((k, _freeze(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    return value


def _spec_of(module: torch.nn.Module) -> dict[str, Any]:
    spec = getattr(module, "_dilated_sparse_spec", None)
    if spec is None:
        config = getattr(module, "config", None)
        spec = getattr(config, "dilated_sparse", None) if config is not None else None
    if spec is None:
        return _DENSE_SPEC
    layers = spec.get("layers")
    if layers is not None:
        if getattr(module, "layer_idx", None) not in layers:
            return {"pattern": "dense", "block_size": spec.get("block_size", DEFAULT_BLOCK_SIZE)}
        spec = {k: v for k, v in spec.items() if k != "layers"}
    return spec


def layout_for(spec: Mapping[str, Any], seq_len_q: int, seq_len_k: int, device: torch.device | str,
               *, causal: bool = False) -> BlockSparseLayout:
    """The (cached) layout of ``spec`` for ``seq_len_q x seq_len_k`` tokens on ``device``.

    Args:
        spec: ``{"pattern": name, "block_size": B or [bq, bk], **options}``.
        causal: pass ``causal=True`` to patterns that take it (unless the spec sets it), so blocks
            wholly above the diagonal are not computed.
    """
    from ..patterns import make_layout, pattern_options

    options = {k: v for k, v in spec.items() if k not in ("pattern", "block_size", "layers")}
    name = spec["pattern"]
    block = normalize_block_size(spec.get("block_size") or DEFAULT_BLOCK_SIZE)
    if causal and "causal" not in options and "causal" in pattern_options(name):
        options["causal"] = True
    device = torch.device(device)
    key = (name, block, _freeze(options), seq_len_q, seq_len_k, str(device))
    return _LAYOUT_CACHE.get(key, lambda: make_layout(name, seq_len_q=seq_len_q, seq_len_k=seq_len_k,
                                                      block_size=block, **options).to(device))


def _query_rows(layout: BlockSparseLayout, first_block: int, seq_len_q: int) -> BlockSparseLayout:
    """The query-block rows ``first_block ..`` of every slice of ``layout`` as a layout of
    ``seq_len_q`` query tokens (O(nnz) index arithmetic, no dense matrix)."""
    nqb = layout.num_query_blocks
    rows_kept = -(-seq_len_q // layout.block_q)
    if first_block + rows_kept != nqb:
        raise ValueError(f"rows {first_block}+{rows_kept} do not end at the layout's last row {nqb}")
    crow = layout.crow_indices.to(torch.int64)
    device = crow.device
    rows = (torch.arange(layout.num_slices, device=device).view(-1, 1) * nqb
            + torch.arange(first_block, nqb, device=device).view(1, -1)).reshape(-1)
    counts = crow[rows + 1] - crow[rows]
    new_crow = torch.zeros(rows.numel() + 1, dtype=torch.int64, device=device)
    new_crow[1:] = torch.cumsum(counts, 0)
    nnz = int(new_crow[-1])
    shift = torch.repeat_interleave(crow[rows] - new_crow[:-1], counts, output_size=nnz)
    new_col = layout.col_indices[torch.arange(nnz, device=device) + shift]
    return BlockSparseLayout(
        new_crow, new_col, block_size=layout.block_size, seq_len_q=seq_len_q, seq_len_k=layout.seq_len_k,
        layout_batch=layout.layout_batch, layout_heads=layout.layout_heads, validate=False,
    )


def _empty_rows_before(layout: BlockSparseLayout, first_block: int) -> BlockSparseLayout:
    """``layout`` with the query-block rows before ``first_block`` emptied in every slice."""
    nqb = layout.num_query_blocks
    counts = layout.row_counts()
    device = counts.device
    rows = torch.arange(counts.numel(), device=device)
    kept_rows = (rows % nqb) >= first_block
    entry_rows = torch.repeat_interleave(rows, counts, output_size=layout.nnz)
    new_crow = torch.zeros(counts.numel() + 1, dtype=torch.int64, device=device)
    new_crow[1:] = torch.cumsum(counts * kept_rows, 0)
    return BlockSparseLayout(
        new_crow, layout.col_indices[kept_rows[entry_rows]], block_size=layout.block_size,
        seq_len_q=layout.seq_len_q, seq_len_k=layout.seq_len_k, layout_batch=layout.layout_batch,
        layout_heads=layout.layout_heads, validate=False,
    )


# --------------------------------------------------------------------------- masks
def dilated_sparse_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int = 0,
    kv_offset: int = 0,
    mask_function: Any = None,
    attention_mask: torch.Tensor | None = None,
    **kwargs: Any,
) -> torch.Tensor | None:
    """Mask function for ``AttentionMaskInterface``: the 2-D bool keep-mask ``[B, kv_length]``
    (True = attend) or ``None`` when nothing is padded. Never a 4-D mask: the pattern, the causal
    rule and the sliding window are applied inside the kernel."""
    if attention_mask is None:
        return None
    mask = attention_mask[:, -kv_length:].to(torch.bool)
    if mask.shape[1] == kv_length and bool(mask.all()):
        return None
    return mask


def _key_padding_mask(attention_mask: torch.Tensor | None, batch: int, kv_length: int,
                      device: torch.device) -> torch.Tensor | None:
    if attention_mask is None:
        return None
    if attention_mask.dim() != 2:
        raise ValueError(
            "dilated_sparse attention takes a 2-D padding mask [batch, kv_length] (or None); got a "
            f"{attention_mask.dim()}-D mask of shape {tuple(attention_mask.shape)}. Custom 4-D masks would need a "
            "dense S x S tensor: express the structure as a pattern instead."
        )
    if attention_mask.shape[0] != batch or attention_mask.shape[1] < kv_length:
        raise ValueError(
            f"attention_mask has shape {tuple(attention_mask.shape)}; expected [batch={batch}, >= kv_length={kv_length}]"
        )
    keep = attention_mask[:, -kv_length:]
    keep = keep if keep.dtype == torch.bool else keep != 0
    # No `padding.any()` check: it would sync on every layer; an all-False mask gives the same result.
    return ~keep.to(device)


# ------------------------------------------------------------------------ attention
def dilated_sparse_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """The function registered in transformers' ``AttentionInterface``.

    Args:
        module: the calling attention module (its ``is_causal``, ``config`` and
            ``_dilated_sparse_spec`` are read).
        query: ``[B, H, Sq, D]``; key, value: ``[B, Hkv, Sk, D]`` (transformers' layout).
        attention_mask: ``None`` or a 2-D keep-mask ``[B, >= Sk]`` (1/True = attend).
        dropout: attention dropout; not supported by the kernel (warned once, not applied).
        scaling: score scale (default ``1 / sqrt(D)``).
        is_causal: overrides ``module.is_causal``.
        **kwargs: ``sliding_window`` (tokens, as transformers: keys ``> q - sliding_window``) is
            applied; ``softcap``, ``s_aux`` and ``position_bias`` raise; the rest is ignored.

    Returns:
        ``(out [B, Sq, H, D], None)``: attention weights are never materialised.
    """
    from ..ops import block_sparse_attention

    if kwargs.get("softcap") is not None:
        raise ValueError("dilated_sparse attention does not support `softcap`; use eager or flex_attention")
    if kwargs.get("s_aux") is not None:
        raise ValueError("dilated_sparse attention does not support attention sinks (`s_aux`)")
    if kwargs.get("position_bias") is not None:
        raise ValueError("dilated_sparse attention does not support additive position biases (`position_bias`)")
    if dropout and dropout > 0.0:
        _warn_once("dropout", f"dilated_sparse attention ignores attention dropout (p={dropout}): the fused kernel "
                   "has none. Set the config's attention dropout to 0 to silence this warning.")
    if kwargs.get("output_attentions"):
        _warn_once("weights", "dilated_sparse attention does not return dense attention weights (None is returned)")
    if is_causal is None:
        is_causal = bool(getattr(module, "is_causal", True))
    batch, heads, q_len, _ = query.shape
    kv_len = key.shape[2]
    causal = bool(is_causal)
    left = -1
    sliding = kwargs.get("sliding_window")
    if sliding is not None:
        left = int(sliding) - 1
    spec = _spec_of(module)
    kpm = _key_padding_mask(attention_mask, batch, kv_len, query.device)
    q = query.transpose(1, 2)
    k = key.transpose(1, 2)
    v = value.transpose(1, 2)
    offset = kv_len - q_len if causal else 0
    if offset < 0:
        raise ValueError(f"causal attention with more queries ({q_len}) than keys ({kv_len}) is not supported")
    if offset == 0:
        layout = layout_for(spec, q_len, kv_len, query.device, causal=causal)
        window = None if left < 0 else (left, None)
        out = block_sparse_attention(q, k, v, layout, scale=scaling, causal=causal, window=window,
                                     key_padding_mask=kpm)
        return out, None
    # Queries are the last q_len of kv_len positions (generation with a cache).
    full = layout_for(spec, kv_len, kv_len, query.device, causal=True)
    first_block = offset // full.block_q
    # The row layouts below are cached on `full` (itself cached): every layer of a decoding step
    # asks for the same one, so it is built (with its host syncs) once per step, not once per layer.
    derived = _DERIVED.setdefault(full, {})
    if left < 0:
        # Take the rows of the full square layout that hold the queries, pad the queries on the
        # left to that block boundary and express causality as a right window counted from it.
        start = first_block * full.block_q
        pad = offset - start
        key = ("rows", first_block, pad + q_len)
        if key not in derived:
            derived[key] = _query_rows(full, first_block, pad + q_len)
        window = (None, start)
        causal_in_kernel = False
    else:
        # A left window bound needs query and key positions to coincide: pad the queries by the
        # whole offset and empty the rows before them (the kernel skips empty rows).
        pad = offset
        key = ("empty_before", first_block, 0)
        if key not in derived:
            derived[key] = _empty_rows_before(full, first_block)
        window = (left, None)
        causal_in_kernel = True
    layout = derived[key]
    if pad:
        q = torch.cat([q.new_zeros(batch, pad, heads, q.shape[-1]), q], dim=1)
    out = block_sparse_attention(q, k, v, layout, scale=scaling, causal=causal_in_kernel, window=window,
                                 key_padding_mask=kpm)
    return out[:, pad:], None


def register() -> None:
    """Register ``"dilated_sparse"`` in transformers' ``AttentionInterface`` and its mask function in
    ``AttentionMaskInterface`` (idempotent). Afterwards ``attn_implementation="dilated_sparse"``
    works in ``from_pretrained`` / ``from_config`` / ``set_attn_implementation``."""
    try:
        from transformers import AttentionInterface
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError("dilated_sparse.integrations.transformers needs transformers (pip install transformers)") from error
    AttentionInterface.register(ATTN_IMPLEMENTATION, dilated_sparse_attention_forward)
    try:
        from transformers import AttentionMaskInterface
    except ImportError:  # older transformers: the mask path passes the 2-D mask through unchanged
        return
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, dilated_sparse_mask)


def attention_modules(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """``(name, module)`` of the modules that call the attention interface (they carry a
    ``layer_idx`` and a ``config`` and their class name contains ``Attention``/``Attn``), in order."""
    found = []
    for name, module in model.named_modules():
        cls = type(module).__name__.lower()
        if ("attention" in cls or "attn" in cls) and hasattr(module, "config") and hasattr(module, "layer_idx"):
            found.append((name, module))
    return found


def apply_dilated_sparse(
    model: torch.nn.Module,
    pattern: str | Mapping[str, Any] = "local_window",
    *,
    block_size: int | tuple[int, int] | None = None,
    layers: Iterable[int] | None = None,
    **options: Any,
) -> torch.nn.Module:
    """Swap block-sparse attention with ``pattern`` into an existing transformers model (in place).

    Args:
        model: a ``PreTrainedModel`` whose attention goes through ``AttentionInterface`` (BERT,
            RoBERTa, Llama, Mistral, Qwen2, GPT-NeoX, ... in recent transformers).
        pattern: a registered pattern name (see ``dilated_sparse.patterns.available_patterns()``)
            or a spec dict ``{"pattern": name, "block_size": B, **options}``.
        block_size: ``B`` or ``(block_q, block_k)`` (default 64).
        layers: indices (``layer_idx``) of the layers that get ``pattern``; the other layers use
            the ``dense`` pattern (still through this kernel). Default: every layer.
        **options: the pattern's options (e.g. ``window_size=256``).

    Returns:
        ``model`` (its config now carries ``dilated_sparse = spec`` and
        ``_attn_implementation == "dilated_sparse"``).

    Raises:
        ValueError / TypeError: unknown pattern or option (before anything is changed).
    """
    spec = _normalize_spec(pattern, block_size, options)
    register()
    modules = attention_modules(model)
    if not modules:
        raise ValueError(f"{type(model).__name__}: found no attention module using transformers' AttentionInterface")
    if layers is not None:
        chosen = sorted({int(i) for i in layers})
        known = {m.layer_idx for _, m in modules}
        missing = [i for i in chosen if i not in known]
        if missing:
            raise ValueError(f"layers {missing} do not exist; the model has layers {sorted(known)}")
        spec["layers"] = chosen
    configs = {id(c): c for c in [getattr(model, "config", None)] + [getattr(m, "config", None) for _, m in modules]}
    for config in configs.values():
        if config is not None:
            config.dilated_sparse = spec
    for _, module in modules:  # a spec set directly on a module would take precedence
        module.__dict__.pop("_dilated_sparse_spec", None)
    setter = getattr(model, "set_attn_implementation", None)
    if setter is not None:
        setter(ATTN_IMPLEMENTATION)
    else:  # pragma: no cover - transformers without set_attn_implementation
        for config in configs.values():
            if config is not None:
                config._attn_implementation = ATTN_IMPLEMENTATION
    return model
