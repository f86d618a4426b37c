"""The public op against the reference: values, lse, gradients, weights, bad input, compile.

Runs on the CPU always and on CUDA when present (half-precision dtypes only there).
"""

from __future__ import annotations

import subprocess
import sys
import warnings

import pytest
import torch
from _helpers import DEVICES

import dilated_sparse as ds
from dilated_sparse.ops import attention_forward

TOL = {torch.float64: 1e-9, torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 5e-3}


def make_qkv(b, sq, sk, h, hkv, d, dtype, device, seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, sq, h, d, generator=g, dtype=torch.float64)
    k = torch.randn(b, sk, hkv, d, generator=g, dtype=torch.float64)
    v = torch.randn(b, sk, hkv, d, generator=g, dtype=torch.float64)
    return [t.to(device=device, dtype=dtype).requires_grad_(requires_grad) for t in (q, k, v)]


def random_layout(lb, lh, sq, sk, bq, bk, p=0.5, seed=0, empty_rows=True):
    g = torch.Generator().manual_seed(seed)
    nqb, nkb = -(-sq // bq), -(-sk // bk)
    mask = torch.rand(lb, lh, nqb, nkb, generator=g) < p
    if empty_rows and nqb > 1:
        mask[..., 1, :] = False  # an empty row
    return ds.BlockSparseLayout.from_dense_mask(mask, block_size=(bq, bk), seq_len_q=sq, seq_len_k=sk)


def assert_close(actual, expected, dtype, what):
    scale = expected.abs().max().clamp_min(1.0)
    err = (actual.double() - expected.double()).abs().max() / scale
    assert err <= TOL[dtype], f"{what}: relative error {err:.3g} > {TOL[dtype]:.1g}"


def device_dtypes(device):
    return [torch.float64, torch.float32, torch.bfloat16] if device == "cpu" else [torch.float16, torch.bfloat16]


CASES = {
    # name: (B, Sq, Sk, H, Hkv, D, bq, bk, Lb, Lh, kwargs)
    "square": (2, 128, 128, 2, 2, 32, 32, 32, 1, 1, {}),
    "odd_lengths_bq_ne_bk": (1, 100, 77, 2, 1, 24, 32, 16, 1, 1, {}),
    "gqa_causal": (2, 96, 96, 4, 2, 16, 16, 32, 1, 1, {"causal": True}),
    "mqa_window": (1, 90, 110, 3, 1, 8, 16, 16, 1, 1, {"window": (20, 5)}),
    "per_head": (2, 64, 80, 2, 2, 16, 16, 16, 1, 2, {}),
    "per_batch_head": (2, 64, 64, 2, 1, 16, 32, 16, 2, 2, {"causal": True, "window": (None, 3)}),
    "single_block": (1, 10, 10, 1, 1, 8, 16, 16, 1, 1, {}),
    "key_lengths": (3, 70, 70, 2, 2, 16, 16, 32, 1, 1, {"key_lengths": [70, 33, 0]}),
    "left_padding": (2, 50, 60, 2, 1, 16, 16, 16, 1, 1, {"left_pad": [7, 41]}),
}


def case_inputs(name, dtype, device, requires_grad=False):
    b, sq, sk, h, hkv, d, bq, bk, lb, lh, kw = CASES[name]
    q, k, v = make_qkv(b, sq, sk, h, hkv, d, dtype, device, requires_grad=requires_grad)
    layout = random_layout(lb, lh, sq, sk, bq, bk, p=0.6, seed=len(name))
    kwargs = dict(kw)
    if "key_lengths" in kwargs:
        kwargs["key_lengths"] = torch.tensor(kwargs["key_lengths"], dtype=torch.int32, device=device)
    if "left_pad" in kwargs:
        pad = kwargs.pop("left_pad")
        kwargs["key_padding_mask"] = torch.arange(sk, device=device).view(1, -1) < torch.tensor(pad, device=device).view(-1, 1)
    return q, k, v, layout, kwargs


def forward_and_reference(name, dtype, device):
    """A case's forward (inputs needing grad) and the float64 reference on the same inputs (CPU):
    ``(inputs, (out, lse), inputs64, (ref_out, ref_lse))``."""
    q, k, v, layout, kw = case_inputs(name, dtype, device, requires_grad=True)
    out, lse = attention_forward(q, k, v, layout, **kw)
    q64, k64, v64 = (t.detach().double().cpu().requires_grad_() for t in (q, k, v))
    kw64 = {key: (val.cpu() if isinstance(val, torch.Tensor) else val) for key, val in kw.items()}
    ref_out, ref_lse = ds.reference_attention(q64, k64, v64, layout, return_lse=True, **kw64)
    return (q, k, v), (out, lse), (q64, k64, v64), (ref_out, ref_lse)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", list(CASES))
def test_forward_lse_and_grads_match_reference(device, name):
    for dtype in device_dtypes(device):
        (q, k, v), (out, lse), (q64, k64, v64), (ref_out, ref_lse) = forward_and_reference(name, dtype, device)
        assert out.dtype == dtype and lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        assert not out.isnan().any() and not lse.isnan().any()
        assert_close(out.cpu(), ref_out, dtype, f"{name} {dtype} out")
        assert torch.equal(lse.isinf().cpu(), ref_lse.isinf()), "empty rows must have lse = -inf exactly"
        finite = ~ref_lse.isinf()
        assert_close(lse.cpu()[finite], ref_lse[finite], torch.float32 if dtype != torch.float64 else dtype, f"{name} lse")
        grad = torch.randn_like(ref_out)
        out.backward(grad.to(device=device, dtype=dtype))
        ref_out.backward(grad)
        for t, t64, label in ((q, q64, "dq"), (k, k64, "dk"), (v, v64, "dv")):
            assert not t.grad.isnan().any()
            assert_close(t.grad.cpu(), t64.grad, dtype, f"{name} {dtype} {label}")


# A loss that uses lse as well as out (merging partial results by lse does): the backward takes
# the gradient of lse too (Delta - dlse), also when only lse is used; rows without a key (lse -inf)
# take none. Against autograd through the float64 reference.
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["square", "gqa_causal", "key_lengths", "left_padding"])
@pytest.mark.parametrize("use_out", [True, False])
def test_grads_through_lse_match_reference(device, name, use_out):
    for dtype in device_dtypes(device):
        (q, k, v), (out, lse), (q64, k64, v64), (ref_out, ref_lse) = forward_and_reference(name, dtype, device)
        g = torch.Generator().manual_seed(3)
        grad_out = torch.randn(ref_out.shape, generator=g, dtype=torch.float64)
        grad_lse = torch.randn(ref_lse.shape, generator=g, dtype=torch.float64)

        def loss(o, lse_, grad_out=grad_out, grad_lse=grad_lse):
            finite = torch.isfinite(lse_)
            term = (torch.where(finite, lse_, torch.zeros_like(lse_)) * grad_lse.to(lse_)).sum()
            return term + ((o.double() * grad_out.to(o.device)).sum() if use_out else 0)

        loss(out, lse).backward()
        loss(ref_out, ref_lse).backward()
        for t, t64, label in ((q, q64, "dq"), (k, k64, "dk"), (v, v64, "dv")):
            want = t64.grad if t64.grad is not None else torch.zeros_like(t64)  # dv: lse alone has none
            assert not t.grad.isnan().any(), f"{name} {dtype} {label}: NaN"
            assert_close(t.grad.cpu(), want, dtype, f"{name} {dtype} {label} (use_out={use_out})")


def test_bad_dlse_is_rejected():
    q, k, v = make_qkv(1, 32, 32, 2, 2, 8, torch.float32, "cpu")
    layout = random_layout(1, 1, 32, 32, 16, 16, seed=3)
    out, lse = attention_forward(q, k, v, layout)
    dout = torch.randn_like(out)
    with pytest.raises(ValueError, match=r"dlse must have shape \[B, H, Sq\]"):
        ds.attention_backward(dout, q, k, v, out, lse, layout, dlse=lse[:, :1])
    # Another device (meta here) is named, for every lse-shaped and q-shaped input alike.
    for name in ("dout", "out", "lse", "dlse"):
        given = {"dout": dout, "out": out, "lse": lse, "dlse": torch.zeros_like(lse)}
        given[name] = given[name].to("meta")
        with pytest.raises(ValueError, match=f"^{name} must be on q's device cpu, got meta"):
            ds.attention_backward(given["dout"], q, k, v, given["out"], given["lse"], layout, dlse=given["dlse"])
    args = (dout, q, k, v, out, lse, layout.ccol_indices, layout.row_indices, layout.crow_indices,
            layout.col_indices, 16, 16, 1, 1, 0.3, False, -1, -1, None, None)
    with pytest.raises(RuntimeError, match="dlse must have lse's dtype"):
        torch.ops.dilated_sparse.block_sparse_attn_bwd(*args, lse.double())
    with pytest.raises(RuntimeError, match="dlse must have lse's shape"):
        torch.ops.dilated_sparse.block_sparse_attn_bwd(*args, lse[0])
    # An integer lse / dlse would be truncated log-sums if cast; a non-bool causal would read as True.
    for name in ("lse", "dlse"):
        given = {"lse": lse, "dlse": torch.zeros_like(lse)}
        given[name] = given[name].long()
        with pytest.raises(TypeError, match=f"^{name} must be a floating-point tensor"):
            ds.attention_backward(dout, q, k, v, out, given["lse"], layout, dlse=given["dlse"])
    with pytest.raises(TypeError, match="lse must be a floating-point tensor"):
        ds.attention_weights(q, k, lse.long(), layout)
    with pytest.raises(ValueError, match="lse must have shape"):
        ds.attention_weights(q, k, lse[:, :1], layout)
    for call in (lambda: ds.attention_backward(dout, q, k, v, out, lse, layout, causal=1),
                 lambda: ds.attention_weights(q, k, lse, layout, causal="yes")):
        with pytest.raises(TypeError, match="causal must be a bool"):
            call()
    zero = ds.attention_backward(dout, q, k, v, out, lse, layout, dlse=torch.zeros_like(lse))
    assert all(map(torch.equal, zero, ds.attention_backward(dout, q, k, v, out, lse, layout)))
    # An empty row's lse is -inf, a constant: what its gradient holds (NaN here) is ignored, also
    # inside a block the kernels compute (rows 0-7: causal, and keys 0-7 are padding).
    layout = ds.BlockSparseLayout.from_block_pairs([(0, 0), (1, 0), (1, 1)], block_size=16, seq_len_q=32)
    kw = {"causal": True, "key_padding_mask": torch.arange(32).view(1, 32) < 8}
    out, lse = attention_forward(q, k, v, layout, **kw)
    assert lse[:, :, :8].isneginf().all() and lse[:, :, 8:].isfinite().all()
    plain = ds.attention_backward(dout, q, k, v, out, lse, layout, **kw)
    nan_on_empty = torch.where(lse.isneginf(), float("nan"), 0.0)
    got = ds.attention_backward(dout, q, k, v, out, lse, layout, dlse=nan_on_empty, **kw)
    assert all(map(torch.equal, plain, got))


# Two disjoint halves of a layout's key blocks, each attended on its own and merged by lse
# (distributed.merge_partials), equal the whole layout: values and gradients.
@pytest.mark.parametrize("device", DEVICES)
def test_merged_partials_are_differentiable(device):
    dtype = torch.float64 if device == "cpu" else torch.bfloat16
    q, k, v = make_qkv(2, 96, 96, 4, 2, 16, dtype, device, seed=5, requires_grad=True)
    full = random_layout(1, 1, 96, 96, 16, 16, p=0.6, seed=6)
    mask = full.to_dense_mask()
    halves = torch.rand(mask.shape, generator=torch.Generator().manual_seed(7)) < 0.5
    parts = [ds.BlockSparseLayout.from_dense_mask(mask & side, block_size=16, seq_len_q=96)
             for side in (halves, ~halves)]
    grad = torch.randn(q.shape, generator=torch.Generator().manual_seed(8), dtype=torch.float64).to(device, dtype)
    outs = [attention_forward(q, k, v, part, causal=True) for part in parts]
    merged, _ = ds.distributed.merge_partials(outs[0][0], outs[0][1], outs[1][0], outs[1][1])
    got = torch.autograd.grad((merged * grad).sum(), (q, k, v))
    whole = ds.block_sparse_attention(q, k, v, full, causal=True)
    want = torch.autograd.grad((whole * grad).sum(), (q, k, v))
    assert_close(merged.detach(), whole.detach(), dtype, "merged out")
    for a, b, label in zip(got, want, ("dq", "dk", "dv")):
        assert_close(a, b, dtype, f"merged {label}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["odd_lengths_bq_ne_bk", "gqa_causal", "per_batch_head", "key_lengths"])
def test_weights_dict_matches_reference(device, name):
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    q, k, v, layout, kw = case_inputs(name, dtype, device)
    out, weights = ds.block_sparse_attention(q, k, v, layout, return_attention_weights=True, **kw)
    kw_cpu = {key: (val.cpu() if isinstance(val, torch.Tensor) else val) for key, val in kw.items()}
    ref_out, ref_w = ds.reference_attention(q.double().cpu(), k.double().cpu(), v.double().cpu(), layout,
                                            return_attention_weights=True, **kw_cpu)
    assert_close(out.cpu(), ref_out, dtype, "out with weights")
    assert weights["block_values"].shape == ref_w["block_values"].shape
    assert weights["shape"] == ref_w["shape"] and weights["block_size"] == layout.block_size
    assert_close(weights["block_values"].cpu(), ref_w["block_values"], dtype, "block_values")
    dense = ds.weights_to_dense(weights)
    assert_close(dense.cpu(), ds.weights_to_dense(ref_w), dtype, "dense weights")
    # rows sum to one where some key is allowed, zero where none is
    sums = dense.double().sum(-1)
    assert torch.all((sums - 1).abs().lt(3e-2) | sums.abs().lt(1e-6))
    if layout.num_slices == 1:
        assert torch.equal(weights["block_indices"].cpu(), ref_w["block_indices"].cpu())
        bsr = ds.weights_to_bsr(weights, batch=0, head=1)
        assert torch.allclose(bsr.to_dense()[: q.shape[1], : k.shape[1]].cpu().double(), dense[0, 1].cpu().double(), atol=1e-6)
        with pytest.raises(IndexError, match=f"head {q.shape[2]}"):
            ds.weights_to_bsr(weights, batch=0, head=q.shape[2])


def test_weights_to_bsr_passes_torchs_invariant_setting():
    # Left implicit, torch warns that its BSR checks are off; passed explicitly, a caller who turned
    # them on gets them: out-of-range block columns then raise instead of building a bad tensor.
    q, k, v = make_qkv(1, 64, 64, 2, 2, 16, torch.float32, "cpu")
    layout = ds.BlockSparseLayout.from_dense_mask(torch.tril(torch.ones(4, 4, dtype=torch.bool)), block_size=16,
                                                  seq_len_q=64)
    _, weights = ds.block_sparse_attention(q, k, v, layout, return_attention_weights=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds.weights_to_bsr(weights, batch=0, head=1)
    assert not [w for w in caught if "invariant" in str(w.message)]
    bad = dict(weights, block_indices=weights["block_indices"].clone())
    bad["block_indices"][-1, 1] = 9  # column block 9 of 4
    with torch.sparse.check_sparse_tensor_invariants(), pytest.raises(RuntimeError):
        ds.weights_to_bsr(bad, batch=0, head=1)


@pytest.mark.parametrize("device", DEVICES)
def test_fully_masked_rows_are_zero_not_nan(device):
    dtype = torch.float32 if device == "cpu" else torch.float16
    q, k, v = make_qkv(2, 64, 64, 2, 2, 16, dtype, device, requires_grad=True)
    layout = ds.BlockSparseLayout.from_dense_mask(torch.ones(4, 4, dtype=torch.bool), block_size=16, seq_len_q=64)
    kpm = torch.zeros(2, 64, dtype=torch.bool, device=device)
    kpm[1] = True  # every key of batch 1 is padding
    out, lse = attention_forward(q, k, v, layout, key_padding_mask=kpm, window=(0, 0))
    assert torch.all(out[1] == 0) and torch.all(lse[1] == float("-inf"))
    out.sum().backward()
    assert torch.all(q.grad[1] == 0) and torch.all(k.grad[1] == 0) and torch.all(v.grad[1] == 0)
    assert not any(t.grad.isnan().any() for t in (q, k, v))


@pytest.mark.parametrize("device", DEVICES)
def test_strided_views_of_packed_qkv(device):
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    qkv = torch.randn(2, 72, 3, 4, 16, dtype=dtype, device=device)
    q, k, v = qkv.unbind(2)
    assert not q.is_contiguous()
    layout = random_layout(1, 1, 72, 72, 16, 16, seed=5)
    out = ds.block_sparse_attention(q, k, v, layout, causal=True)
    ref = ds.reference_attention(q.double().cpu(), k.double().cpu(), v.double().cpu(), layout, causal=True)
    assert_close(out.cpu(), ref, dtype, "strided out")


def test_gradcheck_float64():
    q, k, v = make_qkv(1, 20, 24, 2, 1, 4, torch.float64, "cpu", requires_grad=True)
    layout = random_layout(1, 1, 20, 24, 16, 16, p=0.8, seed=1, empty_rows=False)

    def fn(q, k, v):
        return ds.block_sparse_attention(q, k, v, layout, causal=True, window=(None, 6))

    assert torch.autograd.gradcheck(fn, (q, k, v))


def test_opcheck():
    q, k, v = make_qkv(2, 40, 40, 2, 1, 8, torch.float32, "cpu", requires_grad=True)
    layout = random_layout(1, 1, 40, 40, 16, 16, seed=2)
    args = (q, k, v, layout.crow_indices, layout.col_indices, 16, 16, 1, 1, 0.3, True, -1, -1, None, None)
    torch.library.opcheck(torch.ops.dilated_sparse.block_sparse_attn_fwd.default, args)
    out, lse = torch.ops.dilated_sparse.block_sparse_attn_fwd(*args)
    wargs = (q.detach(), k.detach(), lse, layout.crow_indices, layout.col_indices, 16, 16, 1, 1,
             layout.max_slice_nnz, 0.3, True, -1, -1, None, None)
    torch.library.opcheck(torch.ops.dilated_sparse.block_sparse_attn_weights.default, wargs)
    bargs = (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out.detach(), lse,
             layout.ccol_indices, layout.row_indices, layout.crow_indices, layout.col_indices,
             16, 16, 1, 1, 0.3, True, -1, -1, None, None)
    torch.library.opcheck(torch.ops.dilated_sparse.block_sparse_attn_bwd.default, bargs)
    torch.library.opcheck(torch.ops.dilated_sparse.block_sparse_attn_bwd.default, (*bargs, torch.randn_like(lse)))


@pytest.mark.parametrize("with_lse", [False, True])
def test_torch_compile_fullgraph_forward_backward(with_lse):
    q, k, v = make_qkv(1, 48, 48, 2, 2, 8, torch.float32, "cpu", requires_grad=True)
    layout = random_layout(1, 1, 48, 48, 16, 16, seed=4, empty_rows=False)

    def fn(q, k, v):
        out, lse = attention_forward(q, k, v, layout, causal=True)
        return out.square().sum() + (0.7 * lse.sum() if with_lse else 0)

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    loss = compiled(q, k, v)
    grads = torch.autograd.grad(loss, (q, k, v))
    eager_loss = fn(q, k, v)
    eager_grads = torch.autograd.grad(eager_loss, (q, k, v))
    assert torch.allclose(loss, eager_loss)
    for g, e in zip(grads, eager_grads):
        assert torch.allclose(g, e, atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_torch_compile_cuda_graphs_forward_backward():
    """torch.compile's "reduce-overhead" mode (inductor, CUDA graphs: warm-up runs, then a captured
    graph replayed, with the index values checked by captured device kernels): out and the gradients
    of three steps on fresh inputs match the eager ones."""
    layout = random_layout(1, 1, 200, 200, 64, 64, seed=5, empty_rows=True).to("cuda")

    def fn(q, k, v):
        return ds.block_sparse_attention(q, k, v, layout, causal=True).float().square().sum()

    compiled = torch.compile(fn, mode="reduce-overhead")
    for step in range(3):
        q, k, v = make_qkv(1, 200, 200, 4, 2, 64, torch.bfloat16, "cuda", seed=step, requires_grad=True)
        loss = compiled(q, k, v)
        grads = torch.autograd.grad(loss, (q, k, v))
        eager_loss = fn(q, k, v)
        eager_grads = torch.autograd.grad(eager_loss, (q, k, v))
        torch.testing.assert_close(loss, eager_loss, rtol=2e-2, atol=1e-3)
        for g, e, name in zip(grads, eager_grads, "qkv"):
            assert torch.isfinite(g).all(), (step, name)
            torch.testing.assert_close(g.float(), e.float(), rtol=2e-2, atol=2e-2, msg=f"step {step} d{name}")


def test_backward_is_deterministic():
    q, k, v = make_qkv(2, 64, 64, 4, 2, 16, torch.float32, "cpu", requires_grad=True)
    layout = random_layout(1, 1, 64, 64, 16, 16, seed=8)
    grads = []
    for _ in range(2):
        out = ds.block_sparse_attention(q, k, v, layout)
        grads.append(torch.autograd.grad(out.sum(), (q, k, v)))
    for a, b in zip(*grads):
        assert torch.equal(a, b)


def test_eager_autograd_matches_the_registered_formula():
    """Eager calls that need a gradient skip torch.library's autograd layer (ops._ForwardFunction):
    their gradients must be the registered formula's bit for bit; direct op calls keep the latter."""
    q, k, v = make_qkv(2, 70, 60, 4, 2, 16, torch.float32, "cpu", requires_grad=True)
    layout = random_layout(1, 1, 70, 60, 16, 32, seed=9)
    out = ds.block_sparse_attention(q, k, v, layout, causal=True, window=(30, None))
    assert type(out.grad_fn).__name__ == "_ForwardFunctionBackward"
    grad = torch.randn_like(out)
    eager = torch.autograd.grad(out, (q, k, v), grad)
    args = (q, k, v, layout.crow_indices, layout.col_indices, 16, 32, 1, 1, 0.25, True, 30, -1, None, None)
    op_out, _ = torch.ops.dilated_sparse.block_sparse_attn_fwd(*args)
    assert type(op_out.grad_fn).__name__.startswith("GeneratedBackwardFor_dilated_sparse")
    assert torch.equal(op_out, out)
    registered = torch.autograd.grad(op_out, (q, k, v), grad)
    for a, b in zip(eager, registered):
        assert torch.equal(a, b)
    # Only v needs a gradient: the eager path still; none (no_grad): no graph at all.
    out_v = ds.block_sparse_attention(q.detach(), k.detach(), v, layout)
    assert type(out_v.grad_fn).__name__ == "_ForwardFunctionBackward"
    with torch.no_grad():
        assert ds.block_sparse_attention(q, k, v, layout).grad_fn is None


def test_layout_moves_to_the_inputs_device_once():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    layout = random_layout(1, 1, 64, 64, 16, 16)
    q, k, v = make_qkv(1, 64, 64, 2, 2, 16, torch.float16, "cuda")
    ds.block_sparse_attention(q, k, v, layout)
    assert layout.to("cuda") is layout.to("cuda")


# ---------------------------------------------------------------------------- bad input
def _good():
    q, k, v = make_qkv(2, 40, 40, 4, 2, 8, torch.float32, "cpu")
    return q, k, v, random_layout(1, 1, 40, 40, 16, 16)


BAD = {
    "dtype_mismatch": (lambda q, k, v, L: ((q, k.double(), v, L), {}), TypeError, "same dtype"),
    "int_dtype": (lambda q, k, v, L: ((q.long(), k, v, L), {}), TypeError, "q must be float"),
    "rank": (lambda q, k, v, L: ((q[0], k, v, L), {}), ValueError, "q must be 4-D"),
    "heads_not_multiple": (lambda q, k, v, L: ((q[:, :, :3], k, v, L), {}), ValueError, "multiple of k/v heads"),
    "head_dim": (lambda q, k, v, L: ((q, k[..., :4], v[..., :4], L), {}), ValueError, "head_dim"),
    "batch": (lambda q, k, v, L: ((q, k[:1], v[:1], L), {}), ValueError, "batch size"),
    "kv_shape": (lambda q, k, v, L: ((q, k, v[:, :30], L), {}), ValueError, "k and v must have the same shape"),
    "layout_len": (lambda q, k, v, L: ((q[:, :30], k, v, L), {}), ValueError, "layout was built for"),
    "layout_type": (lambda q, k, v, L: ((q, k, v, "local"), {}), TypeError, "BlockSparseLayout"),
    "key_lengths_len": (lambda q, k, v, L: ((q, k, v, L), {"key_lengths": torch.tensor([1, 2, 3])}), ValueError, "key_lengths"),
    "key_lengths_range": (lambda q, k, v, L: ((q, k, v, L), {"key_lengths": torch.tensor([1, 41])}), ValueError, r"key_lengths must lie"),
    "key_lengths_dtype": (lambda q, k, v, L: ((q, k, v, L), {"key_lengths": torch.tensor([1.0, 2.0])}), TypeError, "key_lengths"),
    "kpm_shape": (lambda q, k, v, L: ((q, k, v, L), {"key_padding_mask": torch.zeros(2, 39, dtype=torch.bool)}), ValueError, "key_padding_mask"),
    "kpm_dtype": (lambda q, k, v, L: ((q, k, v, L), {"key_padding_mask": torch.zeros(2, 40)}), TypeError, "key_padding_mask"),
    "window_negative": (lambda q, k, v, L: ((q, k, v, L), {"window": (-1, 3)}), ValueError, "window left"),
    "window_type": (lambda q, k, v, L: ((q, k, v, L), {"window": (1, 2, 3)}), TypeError, "window"),
    "scale": (lambda q, k, v, L: ((q, k, v, L), {"scale": float("nan")}), TypeError, "scale"),
    "causal_str": (lambda q, k, v, L: ((q, k, v, L), {"causal": "no"}), TypeError, "causal must be a bool"),
    "causal_tensor": (lambda q, k, v, L: ((q, k, v, L), {"causal": torch.tensor(True)}), TypeError, "causal must be a bool"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_input_is_rejected_with_a_named_argument(name):
    build, error, match = BAD[name]
    args, kwargs = build(*_good())
    with pytest.raises(error, match=match):
        ds.block_sparse_attention(*args, **kwargs)


def test_layout_for_other_heads_or_batch_rejected():
    q, k, v, _ = _good()
    per_head = random_layout(1, 3, 40, 40, 16, 16)
    with pytest.raises(ValueError, match="layout_heads=3"):
        ds.block_sparse_attention(q, k, v, per_head)
    per_batch = random_layout(3, 1, 40, 40, 16, 16)
    with pytest.raises(ValueError, match="layout_batch=3"):
        ds.block_sparse_attention(q, k, v, per_batch)


def test_cuda_kernel_guard_names_dtype_and_missing_head_dims(monkeypatch):
    """On CUDA, a dtype or head dim the build lacks is refused in Python before any kernel runs
    (a reduced build, DILATED_SPARSE_CUDA_INSTANTIATIONS, compiles some head dims only)."""
    from dilated_sparse import ops

    monkeypatch.setattr(ops, "_compiled_cuda_head_dims", lambda: (32, 128))
    ops._check_cuda_kernel(torch.bfloat16, 24)  # pads to 32: compiled
    ops._check_cuda_kernel(torch.float16, 128)
    with pytest.raises(TypeError, match="float16 or bfloat16"):
        ops._check_cuda_kernel(torch.float32, 32)
    with pytest.raises(RuntimeError, match="head_dim 64 .*DILATED_SPARSE_CUDA_INSTANTIATIONS"):
        ops._check_cuda_kernel(torch.bfloat16, 64)
    with pytest.raises(RuntimeError, match="head_dim 200 \\(runs as 256\\)"):
        ops._check_cuda_kernel(torch.float16, 200)
    with pytest.raises(ValueError, match="multiple of 8"):
        ops._check_cuda_kernel(torch.float16, 12)


# ------------------------------------------------------------------ C++ argument checks
# Direct torch.ops calls skip the Python layer's validation (as LibTorch callers do): every backend
# checks its arguments in C++ (csrc/checks.cpp) before any kernel runs, with the same messages.
def _raw_dtype(device: str) -> torch.dtype:
    return torch.float32 if device == "cpu" else torch.bfloat16


def _raw_args(device: str) -> list:
    q, k, v = make_qkv(1, 40, 40, 2, 2, 64, _raw_dtype(device), device)
    layout = random_layout(1, 1, 40, 40, 16, 16, seed=2)
    crow, col = (t.to(device) for t in (layout.crow_indices, layout.col_indices))
    return [q, k, v, crow, col, 16, 16, 1, 1, 0.3, False, -1, -1, None, None]


RAW_BAD = [  # (argument index, its replacement (device, dtype) -> value, message)
    (3, lambda dev, dt: torch.zeros(3, dtype=torch.int32, device=dev), "crow_indices must have"),
    (3, lambda dev, dt: torch.zeros(4, dtype=torch.int64, device=dev), "crow_indices must be int32"),
    (4, lambda dev, dt: torch.zeros(2, 3, dtype=torch.int32, device=dev), "col_indices must be 1-D"),
    (0, lambda dev, dt: torch.zeros(1, 40, 2, 64, dtype=torch.int32, device=dev), "q must be float16"),
    (1, lambda dev, dt: torch.zeros(1, 40, 3, 64, dtype=dt, device=dev), "multiple of kv heads"),
    (1, lambda dev, dt: torch.zeros(1, 40, 2, 128, dtype=dt, device=dev)[..., ::2], "last dim of q, k, v must be contiguous"),
    (8, lambda dev, dt: 3, "layout_heads must be 1 or H"),
    (11, lambda dev, dt: -2, "window_left/window_right"),
    (13, lambda dev, dt: torch.tensor([1, 2], dtype=torch.int32, device=dev), "key_lengths must be"),
    (14, lambda dev, dt: torch.zeros(1, 39, dtype=torch.bool, device=dev), "key_padding_mask must be"),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", range(len(RAW_BAD)))
def test_direct_op_calls_are_checked_in_cpp(device, case):
    index, make, match = RAW_BAD[case]
    args = _raw_args(device)
    args[index] = make(device, _raw_dtype(device))
    if index == 1:
        args[2] = args[1]
    with pytest.raises(RuntimeError, match=match):
        torch.ops.dilated_sparse.block_sparse_attn_fwd(*args)


def _three_block_layout(device: str):
    """q, k, v (40 tokens, blocks of 16: 3 blocks) and a layout of two blocks a row, its CSR
    [0, 2, 4, 6] / [0, 1, 1, 2, 0, 2] and CSC [0, 2, 4, 6] / [0, 2, 0, 1, 1, 2], on `device`."""
    q, k, v = make_qkv(1, 40, 40, 2, 2, 64, _raw_dtype(device), device)
    mask = torch.tensor([[1, 1, 0], [0, 1, 1], [1, 0, 1]], dtype=torch.bool)
    layout = ds.BlockSparseLayout.from_dense_mask(mask, block_size=16, seq_len_q=40)
    index = [t.to(device) for t in (layout.crow_indices, layout.col_indices, layout.ccol_indices, layout.row_indices)]
    return q, k, v, *index


BAD_CSR = [  # (crow or None (the layout's), col or None, message)
    (None, [0, 1, 1, 3, 0, 2], r"col_indices\[3\] = 3 is out of range \[0, 3\)"),
    (None, [0, 1, 1, 2, -1, 2], r"col_indices\[4\] = -1 is out of range"),
    (None, [1, 0, 1, 2, 0, 2], "col_indices must be strictly increasing"),
    (None, [0, 0, 1, 2, 0, 2], "col_indices must be strictly increasing"),
    ([1, 2, 4, 6], None, "crow_indices must start at 0"),
    ([0, 2, 4, 5], None, "crow_indices must end at nnz = 6"),
    ([0, 4, 2, 6], None, "crow_indices must be non-decreasing"),
]
BAD_CSC = [  # (ccol or None, row, message)
    (None, [0, 2, 0, 1, 1, 3], r"row_indices\[5\] = 3 is out of range"),
    (None, [2, 0, 0, 1, 1, 2], "row_indices must be strictly increasing"),
    (None, [0, 2, 0, 2, 1, 2], "not the transpose"),
    ([0, 3, 4, 6], [0, 1, 2, 1, 1, 2], "not the transpose"),
]


@pytest.mark.parametrize("device", DEVICES)
def test_direct_op_calls_check_index_values(device):
    """Each op checks the index values itself, on the CPU on every call and on CUDA once per index
    tensor version (a host copy): ids out of range or unsorted, offsets that do not run from 0 to
    nnz, a CSC that is not the CSR's transpose, a max_slice_nnz below a slice's blocks. Each would
    read or write outside the tensors, or give another layout's gradients, without an error."""
    q, k, v, crow, col, ccol, row = _three_block_layout(device)
    rules = (16, 16, 1, 1, 0.3, False, -1, -1, None, None)
    i32 = lambda xs: torch.tensor(xs, dtype=torch.int32, device=device)

    def fwd(crow_, col_):
        return torch.ops.dilated_sparse.block_sparse_attn_fwd(q, k, v, crow_, col_, *rules)

    for crow_, col_, match in BAD_CSR:
        with pytest.raises(RuntimeError, match=match):
            fwd(crow if crow_ is None else i32(crow_), col if col_ is None else i32(col_))
    out, lse = fwd(crow, col)
    dout = torch.randn_like(out)

    def bwd(ccol_, row_):
        return torch.ops.dilated_sparse.block_sparse_attn_bwd(dout, q, k, v, out, lse, ccol_, row_, crow, col,
                                                               *rules, None)

    bwd(ccol, row)  # the layout's own transpose
    assert row.tolist() == [0, 2, 0, 1, 1, 2]
    for ccol_, row_, match in BAD_CSC:
        with pytest.raises(RuntimeError, match=match):
            bwd(ccol if ccol_ is None else i32(ccol_), i32(row_))
    weights = torch.ops.dilated_sparse.block_sparse_attn_weights
    weights(q, k, lse, crow, col, 16, 16, 1, 1, 6, 0.3, False, -1, -1, None, None)
    with pytest.raises(RuntimeError, match=r"max_slice_nnz \(5\) is smaller than slice 0's 6"):
        weights(q, k, lse, crow, col, 16, 16, 1, 1, 5, 0.3, False, -1, -1, None, None)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_index_checks_follow_edits_sizes_and_inference_tensors():
    """The CUDA ops remember index tensors that passed, by version counter and with the sizes they
    passed at: an in-place edit, or the same tensors under a shorter key sequence (fewer key blocks),
    is checked again; inference tensors (no version counter) are checked on every call."""
    q, k, v, crow, col, *_ = _three_block_layout("cuda")
    rules = (16, 16, 1, 1, 0.3, False, -1, -1, None, None)
    fwd = torch.ops.dilated_sparse.block_sparse_attn_fwd
    good, _ = fwd(q, k, v, crow, col, *rules)
    col[3] = 3  # out of range; bumps col's version
    with pytest.raises(RuntimeError, match=r"col_indices\[3\] = 3 is out of range"):
        fwd(q, k, v, crow, col, *rules)
    col[3] = 2
    assert torch.equal(fwd(q, k, v, crow, col, *rules)[0], good)
    with pytest.raises(RuntimeError, match=r"col_indices\[3\] = 2 is out of range \[0, 2\)"):
        fwd(q, k[:, :32], v[:, :32], crow, col, *rules)  # two key blocks now
    with torch.inference_mode():
        crow_i, col_i = crow.clone(), col.clone()
        assert torch.equal(fwd(q, k, v, crow_i, col_i, *rules)[0], good)
        col_i[3] = 5
        with pytest.raises(RuntimeError, match=r"col_indices\[3\] = 5 is out of range"):
            fwd(q, k, v, crow_i, col_i, *rules)


CAPTURE_SCRIPT = """
import torch
import dilated_sparse  # noqa: F401
ops = torch.ops.dilated_sparse
i32 = lambda xs: torch.tensor(xs, dtype=torch.int32, device="cuda")
q, k, v = (torch.randn(BATCH, SEQ, 2, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))  # 3 blocks
rules = (BLOCK, BLOCK, 1, 1, 0.3, False, -1, -1, None, None)
ops.block_sparse_attn_fwd(q, k, v, i32([0, 1, 2, 3]), i32([0, 1, 2]), *rules)  # an eager call first, other tensors
if "OP" != "weights":  # one layout of 3 x 3 blocks (and its transpose)
    crow, col, ccol, row = i32([0, 2, 4, 6]), i32([0, 1, 1, 2, 0, 2]), i32([0, 2, 4, 6]), i32([0, 2, 0, 1, 1, 2])
else:  # two per-head layouts (diagonals), at most 3 blocks a slice
    crow, col = i32([0, 1, 2, 3, 4, 5, 6]), i32([0, 1, 2, 0, 1, 2])
    rules = (16, 16, 1, 2, *rules[4:])
if "OP" == "fwd":
    call = lambda: ops.block_sparse_attn_fwd(q, k, v, crow, col, *rules)
elif "OP" == "bwd":
    out, lse = ops.block_sparse_attn_fwd(q, k, v, crow, col, *rules)
    dout = torch.randn_like(out)
    call = lambda: ops.block_sparse_attn_bwd(dout, q, k, v, out, lse, ccol, row, crow, col, *rules, None)
else:
    out, lse = ops.block_sparse_attn_fwd(q, k, v, crow, col, *rules)
    call = lambda: ops.block_sparse_attn_weights(q, k, lse, crow, col, *rules[:4], 3, *rules[4:])
if "SEEN" == "1":
    call()  # checked on the host
torch.cuda.synchronize()
graph = torch.cuda.CUDAGraph()
with torch.cuda.graph(graph):
    call()
print("captured", flush=True)
graph.replay()
torch.cuda.synchronize()
print("replayed", flush=True)
EDIT  # an edit between replays
graph.replay()
torch.cuda.synchronize()
print("replayed after the edit", flush=True)
"""


def check_capture_replays(op: str, seen: int, edit: str, message: str | None, block: int = 16,
                          batch: int = 1) -> None:
    """CAPTURE_SCRIPT in a child process (a device-side assert loses the CUDA context): `op`'s call
    captured and replayed, `edit` made, replayed again; a layout of 3 x 3 blocks of `block` tokens
    (the last one partial), `batch` sequences. The first replay must run; the one after the edit
    must run too where `message` is None, else fail with `message` in the output."""
    script = (CAPTURE_SCRIPT.replace("OP", op).replace("SEEN", str(seen)).replace("EDIT", edit)
              .replace("BLOCK", str(block)).replace("SEQ", str(2 * block + block // 2))
              .replace("BATCH", str(batch)))
    proc = subprocess.run([sys.executable, "-c", script], check=False, capture_output=True, text=True, timeout=600)
    text = proc.stdout + proc.stderr
    assert "captured" in proc.stdout and "replayed\n" in proc.stdout, text
    if message is None:
        assert proc.returncode == 0 and "replayed after the edit" in proc.stdout, text
    else:
        assert proc.returncode != 0 and "replayed after the edit" not in proc.stdout, text
        assert message in text, text


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("seen", [0, 1])
@pytest.mark.parametrize("bad", [2, 3])
def test_cuda_graph_replays_check_index_values_on_the_device(bad, seen):
    """A captured call checks its index values on the device on every replay (a replay reads
    whatever the tensors hold then), whether or not an eager call checked them on the host before.
    Good values replay; a bad one (col 3 of 3 blocks) written between replays fails the replay with a
    device-side assert naming the tensor and entry, instead of reading outside K and V."""
    check_capture_replays("fwd", seen, f"col[3] = {bad}", None if bad == 2 else "col_indices[3] = 3 is out of range [0, 3)")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("block", [16, 256])  # eight layout rows a plan thread; a row over two of them
@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ("col[3] = 2", None),
        ("col[4] = 3", "col_indices[4] = 3 is out of range [0, 3)"),
        ("col[0:2] = i32([1, 0])", "col_indices[1] = 0 is out of range [0, 3) or not strictly increasing"),
        ("crow[2] = 7", "crow_indices must run from 0 to nnz = 6, non-decreasing"),
        ("crow[3] = 5", "crow_indices must run from 0 to nnz = 6, non-decreasing (entries 2, 3: 4, 5)"),
    ],
)
def test_cuda_graph_replays_of_the_forward_check_every_row_in_its_plan(block, edit, message):
    """The captured forward checks its CSR in its plan kernel, each row by the threads that read it
    before they read it: several rows a thread at block 16, a row over two threads at block 256 (the
    128-query tiles). Each kind of bad value, in any row, fails the replay naming it; a good edit
    replays."""
    check_capture_replays("fwd", 1, edit, message, block)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_replays_of_an_empty_forward_check_index_values():
    """A captured forward with no queries (batch 0) plans nothing, so it keeps the check kernel: a
    bad value written between replays still fails the replay naming it."""
    check_capture_replays("fwd", 1, "col[3] = 3", "col_indices[3] = 3 is out of range [0, 3)", batch=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize(
    ("op", "edit", "message"),
    [
        ("bwd", "row[5] = 3", "row_indices[5] = 3 is out of range [0, 3)"),
        # column 1's rows become (0, 2), and CSR row 2 has no block in column 1
        ("bwd", "row[3] = 2", "not the transpose of crow_indices / col_indices (slice 0, block (2, 1))"),
        # slice 0 takes a fourth block (row 2: columns 1, 2) from slice 1 (row 0: none)
        ("weights", "crow[3] = 4; col[2:5] = i32([1, 2, 1])",
         "max_slice_nnz (3) is smaller than slice 0's 4 active blocks"),
    ],
)
def test_cuda_graph_replays_check_the_backward_and_weights_index_values(op, edit, message):
    """The captured backward checks its CSC pair (ids, and that it is the CSR's transpose) and the
    captured weights their max_slice_nnz on every replay, as the forward checks its CSR pair: a bad
    value written between replays fails the replay with a device-side assert naming it."""
    check_capture_replays(op, 1, edit, message)
