"""The public block-sparse attention op: argument checks, autograd and fake kernels.

The three ops are declared once in C++ (``csrc/ops.cpp``, namespace ``dilated_sparse``) with CPU
and CUDA kernels. This module loads the extension, registers the fake (meta) kernels used by
``torch.compile`` and the autograd formula (``torch.library``; eager calls take the same formula
through a direct ``autograd.Function``), and exposes :func:`block_sparse_attention`, which checks
every argument before any kernel runs.
"""

from __future__ import annotations

import contextlib
import functools
import math
import weakref
from collections.abc import Sequence
from typing import Any

import torch

from .layout import BlockSparseLayout, csr_transpose

__all__ = [
    "attention_backward",
    "attention_forward",
    "attention_weights",
    "block_sparse_attention",
    "check_qkv",
    "extension_available",
    "weights_to_bsr",
    "weights_to_dense",
]

try:
    from ._extension import load_extension

    load_extension()
    _LOAD_ERROR: BaseException | None = None
except Exception as error:  # noqa: BLE001 - kept and re-raised, with its cause, on first use
    _LOAD_ERROR = error


def extension_available() -> bool:
    """Whether the compiled ops (wheel or JIT build) are loaded."""
    return _LOAD_ERROR is None


def _require_extension() -> None:
    if _LOAD_ERROR is not None:
        raise RuntimeError(
            "dilated_sparse: the C++/CUDA extension is not available (no compiled build was found "
            "and the JIT build failed). Install with `pip install --no-build-isolation .` or set "
            f"DILATED_SPARSE_JIT=1 with a working compiler. Cause: {_LOAD_ERROR!r}"
        ) from _LOAD_ERROR


_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _lse_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------------------- validation
def _check_tensor(name: str, t: Any) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")
    if t.dim() != 4:
        raise ValueError(f"{name} must be 4-D [batch, seq_len, heads, head_dim], got shape {tuple(t.shape)}")
    return t


def _normalize_window(window: Any) -> tuple[int, int]:
    """``window`` -> ``(left, right)`` with -1 for an unbounded side."""
    if window is None:
        return -1, -1
    if isinstance(window, int) and not isinstance(window, bool):
        window = (window, window)
    if not isinstance(window, Sequence) or len(window) != 2:
        raise TypeError(f"window must be None, an int or a pair (left, right), got {window!r}")
    sides = []
    for side_name, side in zip(("left", "right"), window):
        if side is None:
            sides.append(-1)
            continue
        if isinstance(side, bool) or not isinstance(side, int):
            raise TypeError(f"window {side_name} must be an int or None, got {side!r}")
        if side < 0:
            raise ValueError(f"window {side_name} must be >= 0 tokens (or None), got {side}")
        sides.append(side)
    return sides[0], sides[1]


_CUDA_HEAD_DIMS = (32, 64, 96, 128, 256)  # specialised kernels; other multiples of 8 pad up


@functools.cache
def _compiled_cuda_head_dims() -> tuple[int, ...]:
    from ._extension import extension_info

    return tuple(extension_info()["head_dims"])


def _check_cuda_kernel(dtype: torch.dtype, head_dim: int) -> None:
    """The CUDA kernels exist for this dtype and head dim (raised here, before any kernel runs)."""
    if dtype not in (torch.float16, torch.bfloat16):
        raise TypeError(f"q: the CUDA kernels take float16 or bfloat16, got {dtype} (float32/float64 run on the CPU)")
    if head_dim % 8 != 0 or head_dim > 256:
        raise ValueError(f"q: head_dim must be a multiple of 8 and at most 256 on CUDA, got {head_dim}")
    if torch.compiler.is_compiling():
        return
    padded = next(d for d in _CUDA_HEAD_DIMS if d >= head_dim)
    compiled = _compiled_cuda_head_dims()
    if padded not in compiled:
        raise RuntimeError(
            f"q: no CUDA kernel for head_dim {head_dim} (runs as {padded}) in this build, which has {list(compiled)}; "
            "it was left out by DILATED_SPARSE_CUDA_INSTANTIATIONS: rebuild with the full set"
        )


def check_qkv(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, v_head_dim_may_differ: bool = False
) -> tuple[int, int, int, int, int, int]:
    """Check ``q [B,Sq,H,D]`` and ``k, v [B,Sk,Hkv,D]`` (GQA: ``H % Hkv == 0``).

    Shared by the op and every method that takes q/k/v. ``v_head_dim_may_differ`` lets ``v``
    have its own head dim (methods computing ``P @ V`` themselves).

    Returns:
        ``(B, Sq, Sk, H, Hkv, D)``.

    Raises:
        TypeError: not tensors, not floating point, or mixed dtypes.
        ValueError: wrong ranks, mismatched sizes or devices, ``H % Hkv != 0``, empty inputs.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        _check_tensor(name, t)
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k and v must have the same dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k and v must be on the same device, got {q.device}, {k.device}, {v.device}")
    bsz, sq, heads, dim = q.shape
    if (k.shape[:3] != v.shape[:3]) if v_head_dim_may_differ else (k.shape != v.shape):
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if k.shape[0] != bsz:
        raise ValueError(f"k/v batch size {k.shape[0]} does not match q batch size {bsz}")
    if k.shape[3] != dim:
        raise ValueError(f"k head_dim {k.shape[3]} does not match q head_dim {dim}")
    kv_heads = k.shape[2]
    if kv_heads == 0 or heads % kv_heads != 0:
        raise ValueError(f"q heads ({heads}) must be a multiple of k/v heads ({kv_heads}) (GQA/MQA)")
    if min(bsz, sq, k.shape[1], dim) == 0:
        raise ValueError(f"empty inputs are not supported: q {tuple(q.shape)}, k {tuple(k.shape)}")
    return bsz, sq, k.shape[1], heads, kv_heads, dim


def default_scale(scale: Any, dim: int) -> float:
    """``scale`` (a finite real number) as a float, or ``1 / sqrt(dim)`` for None.

    Raises:
        TypeError: anything else (a string, a bool, a tensor, NaN or infinity).
    """
    if scale is None:
        return 1.0 / math.sqrt(dim)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise TypeError(f"scale must be a finite float or None, got {scale!r}")
    return float(scale)


def check_key_lengths(key_lengths: Any, batch: int, seq_len_k: int, *, check_values: bool = True) -> None:
    """Check ``key_lengths``: an integer (not bool) tensor ``[batch]``, each value in ``[0, seq_len_k]``
    (the value check reads the tensor, so callers skip it while tracing).

    Raises:
        TypeError: not a tensor, or a floating, complex or bool dtype.
        ValueError: another shape, or a value outside ``[0, seq_len_k]``.
    """
    if (not isinstance(key_lengths, torch.Tensor) or key_lengths.dtype.is_floating_point
            or key_lengths.dtype.is_complex or key_lengths.dtype == torch.bool):
        kind = f"dtype {key_lengths.dtype}" if isinstance(key_lengths, torch.Tensor) else type(key_lengths).__name__
        raise TypeError(f"key_lengths must be an integer tensor of shape [batch], got {kind}")
    if key_lengths.shape != (batch,):
        raise ValueError(f"key_lengths must have shape [batch] = [{batch}], got {tuple(key_lengths.shape)}")
    if check_values and bool(((key_lengths < 0) | (key_lengths > seq_len_k)).any()):
        raise ValueError(f"key_lengths must lie in [0, seq_len_k={seq_len_k}], got {key_lengths.tolist()}")


def check_key_padding_mask(key_padding_mask: Any, batch: int, seq_len_k: int) -> None:
    """Check ``key_padding_mask``: a bool tensor ``[batch, seq_len_k]`` (True = padding).

    Raises:
        TypeError: not a bool tensor.
        ValueError: another shape.
    """
    if not isinstance(key_padding_mask, torch.Tensor) or key_padding_mask.dtype != torch.bool:
        raise TypeError("key_padding_mask must be a bool tensor [batch, seq_len_k] (True = padding)")
    if key_padding_mask.shape != (batch, seq_len_k):
        raise ValueError(
            f"key_padding_mask must have shape [batch, seq_len_k] = [{batch}, {seq_len_k}], "
            f"got {tuple(key_padding_mask.shape)}"
        )


def _check_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: BlockSparseLayout,
    scale: float | None,
    window: Any,
    key_lengths: torch.Tensor | None,
    key_padding_mask: torch.Tensor | None,
) -> tuple[BlockSparseLayout, float, int, int, torch.Tensor | None, torch.Tensor | None]:
    """Check every argument once; returns the normalised layout, scale, window and masks."""
    bsz, sq, sk, heads, _, dim = check_qkv(q, k, v)
    if q.device.type == "cuda":
        _check_cuda_kernel(q.dtype, dim)
    if not isinstance(layout, BlockSparseLayout):
        raise TypeError(f"layout must be a BlockSparseLayout, got {type(layout).__name__}")
    if layout.seq_len_q != sq or layout.seq_len_k != sk:
        raise ValueError(
            f"layout was built for seq_len_q={layout.seq_len_q}, seq_len_k={layout.seq_len_k} but "
            f"q has {sq} and k has {sk} tokens"
        )
    if layout.layout_batch not in (1, bsz):
        raise ValueError(f"layout has layout_batch={layout.layout_batch}; expected 1 or the batch size {bsz}")
    if layout.layout_heads not in (1, heads):
        raise ValueError(f"layout has layout_heads={layout.layout_heads}; expected 1 or the number of query heads {heads}")
    scale = default_scale(scale, dim)
    window_left, window_right = _normalize_window(window)
    checking_values = not torch.compiler.is_compiling()
    if key_lengths is not None:
        check_key_lengths(key_lengths, bsz, sk, check_values=checking_values)
        key_lengths = key_lengths.to(device=q.device, dtype=torch.int32).contiguous()
    if key_padding_mask is not None:
        check_key_padding_mask(key_padding_mask, bsz, sk)
        key_padding_mask = key_padding_mask.to(q.device).contiguous()
    layout = layout.to(q.device)
    _remember(layout)
    return layout, float(scale), window_left, window_right, key_lengths, key_padding_mask


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


# --------------------------------------------------------- CSC lookup for the backward
# The forward op takes the CSR only; its backward needs the CSC, which the layout caches.
# Layouts that went through block_sparse_attention are remembered (weakly) by their
# col_indices tensor so the backward reuses the cached transpose; a direct torch.ops call or a
# traced graph recomputes it (csr_transpose, O(nnz log nnz), no host sync).
_LAYOUTS_BY_COL: dict[int, weakref.ref[BlockSparseLayout]] = {}


def _remember(layout: BlockSparseLayout) -> None:
    key = id(layout.col_indices)
    if key not in _LAYOUTS_BY_COL:
        _LAYOUTS_BY_COL[key] = weakref.ref(layout, lambda _ref, key=key: _LAYOUTS_BY_COL.pop(key, None))


def _cached_csc(col_indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    ref = _LAYOUTS_BY_COL.get(id(col_indices))
    layout = ref() if ref is not None else None
    if layout is None or layout.col_indices is not col_indices:
        return None
    return layout.ccol_indices, layout.row_indices


# ----------------------------------------------------------------- fake + autograd
def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[torch.Tensor, torch.Tensor]) -> None:
    """Saves what the backward of the forward op needs (both autograd paths)."""
    (q, k, v, crow, col, block_q, block_k, layout_batch, layout_heads, scale, causal,
     window_left, window_right, key_lengths, key_padding_mask) = inputs
    out, lse = output
    # An output the loss does not use arrives as None (dout: only lse was used; dlse: the usual case).
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(q, k, v, out, lse, crow, col, key_lengths, key_padding_mask)
    ctx.scalars = (block_q, block_k, layout_batch, layout_heads, scale, causal, window_left, window_right)
    ctx.csc = _cached_csc(col)


def _backward(ctx: Any, dout: torch.Tensor | None, dlse: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
    """Gradients of the forward op's inputs through ``out`` and ``lse``."""
    q, k, v, out, lse, crow, col, key_lengths, key_padding_mask = ctx.saved_tensors
    if dout is None and dlse is None:
        return (None,) * 15
    dout = torch.zeros_like(out) if dout is None else dout.contiguous()
    block_q, block_k, layout_batch, layout_heads, scale, causal, window_left, window_right = ctx.scalars
    csc = ctx.csc
    if csc is None:
        nqb = -(-q.shape[1] // block_q)
        nkb = -(-k.shape[1] // block_k)
        csc = csr_transpose(crow, col, num_slices=layout_batch * layout_heads,
                            num_query_blocks=nqb, num_key_blocks=nkb)
    dq, dk, dv = torch.ops.dilated_sparse.block_sparse_attn_bwd(
        dout, q, k, v, out, lse, csc[0], csc[1], crow, col, block_q, block_k,
        layout_batch, layout_heads, scale, causal, window_left, window_right, key_lengths,
        key_padding_mask, None if dlse is None else dlse.contiguous(),
    )
    return (dq, dk, dv) + (None,) * 12


# Dispatches an op call past its autograd kernel (what torch.library's own formula does around the
# op); without it (an older or newer torch) the registered kernel takes its no-grad branch instead.
_below_autograd = getattr(torch._C, "_AutoDispatchBelowAutograd", contextlib.nullcontext)


class _ForwardFunction(torch.autograd.Function):
    """Eager autograd of the forward op, the formula :func:`_register` registers for it.

    ``torch.library``'s generic autograd layer costs about as much host time as the op itself at
    small sizes (``fill_defaults`` and a Python redispatch on every call); eager calls that need a
    gradient come here instead, with the same context and backward, and the op goes straight to its
    kernel. Traced code (``torch.compile``) keeps the registered formula.
    The context is set inside ``forward``: a separate ``setup_context`` would admit functorch
    transforms (which the registered formula does not support either) but costs ~20 us a call in
    argument binding.
    """

    @staticmethod
    def forward(ctx: Any, *inputs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        with _below_autograd():
            output = torch.ops.dilated_sparse.block_sparse_attn_fwd(*inputs)
        _setup_context(ctx, inputs, output)
        return output

    @staticmethod
    def backward(ctx: Any, dout: torch.Tensor | None, dlse: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        return _backward(ctx, dout, dlse)


def _register() -> None:
    @torch.library.register_fake("dilated_sparse::block_sparse_attn_fwd")
    def _fwd_fake(q, k, v, crow_indices, col_indices, block_q, block_k, layout_batch, layout_heads,
                  scale, causal, window_left, window_right, key_lengths, key_padding_mask):
        bsz, sq, heads, dim = q.shape
        out = q.new_empty((bsz, sq, heads, dim))
        lse = q.new_empty((bsz, heads, sq), dtype=_lse_dtype(q.dtype))
        return out, lse

    @torch.library.register_fake("dilated_sparse::block_sparse_attn_bwd")
    def _bwd_fake(dout, q, k, v, out, lse, ccol_indices, row_indices, crow_indices, col_indices,
                  block_q, block_k, layout_batch, layout_heads, scale, causal, window_left,
                  window_right, key_lengths, key_padding_mask, dlse=None):
        return (q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape))

    @torch.library.register_fake("dilated_sparse::block_sparse_attn_weights")
    def _weights_fake(q, k, lse, crow_indices, col_indices, block_q, block_k, layout_batch,
                      layout_heads, max_slice_nnz, scale, causal, window_left, window_right,
                      key_lengths, key_padding_mask):
        return q.new_empty((q.shape[0], q.shape[2], max_slice_nnz, block_q, block_k))

    torch.library.register_autograd(
        "dilated_sparse::block_sparse_attn_fwd", _backward, setup_context=_setup_context
    )


if _LOAD_ERROR is None:
    _register()


# ------------------------------------------------------------------- public functions
def attention_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: BlockSparseLayout,
    *,
    scale: float | None = None,
    causal: bool = False,
    window: Any = None,
    key_lengths: torch.Tensor | None = None,
    key_padding_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Checked forward returning ``(out, lse)``; differentiable through both.

    ``lse`` (``[B, H, Sq]``, float32, float64 for float64 inputs) is what partial results are
    merged by (see :mod:`dilated_sparse.distributed`).
    """
    _require_extension()
    checked = _check_inputs(q, k, v, layout, scale, window, key_lengths, key_padding_mask)
    return _forward_op(q, k, v, causal, *checked)


def _check_causal(causal: Any, name: str = "causal") -> bool:
    """``causal`` as the op takes it: a bool (a string such as ``"no"`` would otherwise read as True)."""
    if not isinstance(causal, bool):
        raise TypeError(f"{name} must be a bool, got {type(causal).__name__} {causal!r}")
    return causal


def _check_lse(name: str, t: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """A user-supplied ``lse`` / ``dlse``: a floating tensor ``[B, H, Sq]`` on ``q``'s device, returned
    contiguous in the forward's lse dtype (an integer one would be silently truncated log-sums)."""
    expected = (q.shape[0], q.shape[2], q.shape[1])
    if not isinstance(t, torch.Tensor) or not t.dtype.is_floating_point:
        kind = f"dtype {t.dtype}" if isinstance(t, torch.Tensor) else type(t).__name__
        raise TypeError(f"{name} must be a floating-point tensor [B, H, Sq], got {kind}")
    if tuple(t.shape) != expected:
        raise ValueError(f"{name} must have shape [B, H, Sq] = {list(expected)}, got {tuple(t.shape)}")
    if t.device != q.device:
        raise ValueError(f"{name} must be on q's device {q.device}, got {t.device}")
    return t.to(_lse_dtype(q.dtype)).contiguous()


def _forward_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, layout: BlockSparseLayout,
                scale: float, wl: int, wr: int, key_lengths: torch.Tensor | None,
                key_padding_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The forward op on arguments already normalised by :func:`_check_inputs`.

    Eager calls that need a gradient take :class:`_ForwardFunction` (the same formula, less host
    time), eager calls without one go straight to the kernel, traced ones call the op.
    """
    inputs = (
        _last_dim_contiguous(q), _last_dim_contiguous(k), _last_dim_contiguous(v),
        layout.crow_indices, layout.col_indices, layout.block_q, layout.block_k,
        layout.layout_batch, layout.layout_heads, scale, _check_causal(causal), wl, wr,
        key_lengths, key_padding_mask,
    )
    if torch.compiler.is_compiling():
        return torch.ops.dilated_sparse.block_sparse_attn_fwd(*inputs)
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return _ForwardFunction.apply(*inputs)
    with _below_autograd():
        return torch.ops.dilated_sparse.block_sparse_attn_fwd(*inputs)


def attention_backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    layout: BlockSparseLayout,
    *,
    scale: float | None = None,
    causal: bool = False,
    window: Any = None,
    key_lengths: torch.Tensor | None = None,
    key_padding_mask: torch.Tensor | None = None,
    dlse: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Checked backward ``(dq, dk, dv)`` given the forward's ``out`` and ``lse``.

    For code that runs its own autograd (e.g. the distributed ring, which merges partial
    results by ``lse`` and passes the merged ``out``/``lse`` here). ``dlse`` (``[B, H, Sq]``):
    the loss's gradient with respect to ``lse``, when ``lse`` fed it too. ``dout``, ``out``,
    ``lse`` and ``dlse`` must be on ``q``'s device; ``lse`` and ``dlse`` are taken in the
    forward's lse dtype (float32, float64 for float64 inputs).

    Raises:
        ValueError: a shape other than ``q``'s (``dout``, ``out``) or ``[B, H, Sq]`` (``lse``,
            ``dlse``), or a tensor on another device; and whatever the forward's checks raise.
        TypeError: ``lse`` or ``dlse`` not floating point, ``causal`` not a bool.
    """
    _require_extension()
    layout, scale, wl, wr, key_lengths, key_padding_mask = _check_inputs(
        q, k, v, layout, scale, window, key_lengths, key_padding_mask
    )
    if dout.shape != q.shape or out.shape != q.shape:
        raise ValueError(f"dout and out must have q's shape {tuple(q.shape)}")
    for name, t in (("dout", dout), ("out", out)):
        if t.device != q.device:
            raise ValueError(f"{name} must be on q's device {q.device}, got {t.device}")
    # lse and dlse in the forward's lse dtype (float32; float64 for float64 inputs).
    lse = _check_lse("lse", lse, q)
    if dlse is not None:
        dlse = _check_lse("dlse", dlse, q)
    return torch.ops.dilated_sparse.block_sparse_attn_bwd(
        dout.contiguous(), _last_dim_contiguous(q), _last_dim_contiguous(k), _last_dim_contiguous(v),
        out.contiguous(), lse, layout.ccol_indices, layout.row_indices,
        layout.crow_indices, layout.col_indices, layout.block_q, layout.block_k, layout.layout_batch,
        layout.layout_heads, scale, _check_causal(causal), wl, wr, key_lengths, key_padding_mask, dlse,
    )


def attention_weights(
    q: torch.Tensor,
    k: torch.Tensor,
    lse: torch.Tensor,
    layout: BlockSparseLayout,
    *,
    scale: float | None = None,
    causal: bool = False,
    window: Any = None,
    key_lengths: torch.Tensor | None = None,
    key_padding_mask: torch.Tensor | None = None,
) -> dict[str, Any]:
    """The sparse attention-weights dict (DESIGN.md section 4) from the forward's ``lse``.

    O(nnz) memory: ``block_values`` is ``[B, H, max_slice_nnz, block_q, block_k]``. For a shared
    layout (``L == 1``) ``max_slice_nnz == nnz`` and ``block_indices`` lists (q_block, k_block)
    in CSR order. For ``L > 1`` slice ``s`` fills entries ``0 .. nnz(s) - 1`` in its CSR order
    (the rest are 0) and the dict carries ``crow_indices``, ``col_indices`` and
    ``layout_shape``. The weights are not differentiable (a detached inspection result).
    """
    _require_extension()
    checked = _check_inputs(q, k, k, layout, scale, window, key_lengths, key_padding_mask)
    return _weights_op(q, k, _check_lse("lse", lse, q), causal, *checked)


def _weights_op(q: torch.Tensor, k: torch.Tensor, lse: torch.Tensor, causal: bool, layout: BlockSparseLayout,
                scale: float, wl: int, wr: int, key_lengths: torch.Tensor | None,
                key_padding_mask: torch.Tensor | None) -> dict[str, Any]:
    """The weights op on arguments already normalised by :func:`_check_inputs`."""
    values = torch.ops.dilated_sparse.block_sparse_attn_weights(
        _last_dim_contiguous(q.detach()), _last_dim_contiguous(k.detach()),
        lse.detach().to(_lse_dtype(q.dtype)).contiguous(), layout.crow_indices, layout.col_indices,
        layout.block_q, layout.block_k, layout.layout_batch, layout.layout_heads,
        layout.max_slice_nnz, scale, _check_causal(causal), wl, wr, key_lengths, key_padding_mask,
    )
    bsz, sq, heads, _ = q.shape
    return layout.weights_dict(values, (bsz, heads, sq, k.shape[1]))


def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: BlockSparseLayout,
    *,
    scale: float | None = None,
    causal: bool = False,
    window: Any = None,
    key_lengths: torch.Tensor | None = None,
    key_padding_mask: torch.Tensor | None = None,
    return_attention_weights: bool = False,
) -> Any:
    """Block-sparse attention over the active blocks of ``layout``.

    Args:
        q: ``[B, Sq, H, D]``; k, v: ``[B, Sk, Hkv, D]`` with ``H % Hkv == 0``. Same dtype
            (float16, bfloat16, float32; float64 on CPU) and device; the last dim should be
            contiguous (other strides are free, e.g. views of a packed qkv projection).
        layout: which (query block, key block) pairs are computed; moved to ``q``'s device once
            and cached.
        scale: score scale, default ``1 / sqrt(D)``.
        causal: key position <= query position (top-left aligned, as SDPA's ``is_causal``).
        window: ``(left, right)`` tokens of a sliding window (either side may be None for
            unbounded), or an int for a symmetric window.
        key_lengths: int ``[B]``: keys at or past ``key_lengths[b]`` are padding.
        key_padding_mask: bool ``[B, Sk]``: True marks a padding key (any positions).
        return_attention_weights: also return the sparse weights dict (see
            :func:`attention_weights`).

    Returns:
        ``out`` ``[B, Sq, H, D]`` in ``q``'s dtype, or ``(out, weights)``. A query with no
        allowed key gets zeros (and zero gradients), never NaN.
    """
    _require_extension()
    checked = _check_inputs(q, k, v, layout, scale, window, key_lengths, key_padding_mask)  # once for both ops
    out, lse = _forward_op(q, k, v, causal, *checked)
    if not return_attention_weights:
        return out
    return out, _weights_op(q, k, lse, causal, *checked)


# ------------------------------------------------------------------- weights helpers
def _weights_slices(weights: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """``(crow, col, Lb, Lh)`` of a weights dict, for both the shared and the stacked form."""
    sq = weights["shape"][2]
    bq = weights["block_size"][0]
    if "crow_indices" in weights:
        lb, lh = weights["layout_shape"]
        return weights["crow_indices"], weights["col_indices"], lb, lh
    pairs = weights["block_indices"]
    nqb = -(-sq // bq)
    counts = torch.zeros(nqb, dtype=torch.int64, device=pairs.device)
    counts.index_add_(0, pairs[:, 0], torch.ones_like(pairs[:, 0]))
    crow = torch.zeros(nqb + 1, dtype=torch.int64, device=pairs.device)
    crow[1:] = torch.cumsum(counts, 0)
    return crow, pairs[:, 1], 1, 1


def weights_to_dense(weights: dict[str, Any]) -> torch.Tensor:
    """Dense ``[B, H, Sq, Sk]`` probabilities from a weights dict (tests and small inspection)."""
    bsz, heads, sq, sk = weights["shape"]
    bq, bk = weights["block_size"]
    values = weights["block_values"]
    nqb, nkb = -(-sq // bq), -(-sk // bk)
    crow, col, lb, lh = _weights_slices(weights)
    crow = crow.to(values.device, torch.int64)
    col = col.to(values.device, torch.int64)
    counts = crow[1:] - crow[:-1]
    stacked_rows = torch.repeat_interleave(torch.arange(counts.numel(), device=values.device), counts)
    slices = stacked_rows // nqb
    starts = crow[:-1:nqb][slices]
    position = torch.arange(col.numel(), device=values.device) - starts
    tiles = values.new_zeros(bsz, heads, nqb, nkb, bq, bk)
    b_idx = torch.arange(bsz, device=values.device)
    h_idx = torch.arange(heads, device=values.device)
    for s in range(lb * lh):
        sel = slices == s
        bs = b_idx if lb == 1 else b_idx[s // lh : s // lh + 1]
        hs = h_idx if lh == 1 else h_idx[s % lh : s % lh + 1]
        block_rows = (stacked_rows[sel] - s * nqb)
        vals = values[bs][:, hs][:, :, position[sel]]
        tiles[bs.view(-1, 1, 1), hs.view(1, -1, 1), block_rows.view(1, 1, -1), col[sel].view(1, 1, -1)] = vals
    dense = tiles.permute(0, 1, 2, 4, 3, 5).reshape(bsz, heads, nqb * bq, nkb * bk)
    return dense[:, :, :sq, :sk]


def weights_to_bsr(weights: dict[str, Any], batch: int = 0, head: int = 0) -> torch.Tensor:
    """One (batch, head) of a weights dict as a ``torch.sparse_bsr_tensor`` of ``[Sq', Sk']``.

    ``Sq'``/``Sk'`` are the lengths rounded up to whole blocks (BSR needs whole blocks); the
    padding entries are 0.
    """
    bsz, heads, sq, sk = weights["shape"]
    if not (0 <= batch < bsz and 0 <= head < heads):
        raise IndexError(f"batch {batch} / head {head} out of range for weights of shape {tuple(weights['shape'])}")
    bq, bk = weights["block_size"]
    nqb, nkb = -(-sq // bq), -(-sk // bk)
    crow, col, lb, lh = _weights_slices(weights)
    s = (0 if lb == 1 else batch) * lh + (0 if lh == 1 else head)
    crow = crow.to(torch.int64)
    row_crow = crow[s * nqb : (s + 1) * nqb + 1]
    start = int(row_crow[0])
    nnz = int(row_crow[-1]) - start
    return torch.sparse_bsr_tensor(
        row_crow - start, col[start : start + nnz].to(torch.int64),
        weights["block_values"][batch, head, :nnz], size=(nqb * bq, nkb * bk),
        # torch's global setting, passed explicitly (left implicit, torch warns that its checks are off)
        check_invariants=torch.sparse.check_sparse_tensor_invariants.is_enabled(),
    )
