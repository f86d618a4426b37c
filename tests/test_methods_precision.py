"""bfloat16 accuracy of the methods: float32 inside, one rounding at the end, autocast-proof.

Each method runs in bfloat16 and in float64 on the *same* bf16-rounded inputs (and the same bf16
upstream gradient), so the only difference left is the arithmetic. A method that computes its
scores, thresholds, normalisers and sums in float32 and rounds once gives, element by element,
the float64 result rounded to bfloat16: ``|bf16 - f64| <= 2^-8 |f64|`` (half an ulp) up to
float32 noise. That is checked for outputs and for dq, dk, dv (with GQA, so dk/dv sum a head
group), besides the looser ``2e-2 * max|f64|`` bound. Comparing with float64 on the *unrounded*
inputs is not a precision test: rounding q/k to bf16 moves scores across the sparsemax threshold
or the top-k cut, and those methods' gradients jump there (a key leaving a sparsemax support of
two makes that row's dq exactly 0), which is what a dq error of 17 against a float64 run on the
original inputs measured.
"""

from __future__ import annotations

import math

import pytest
import torch
from _helpers import F64, attn_scores

import dilated_sparse as ds
from dilated_sparse import methods as M

pytestmark = pytest.mark.usefixtures("single_thread")

BF16 = torch.bfloat16
B, S, H, HKV, D = 1, 256, 2, 1, 64
HALF_ULP = 2.0**-8  # bf16 keeps 8 significant bits: rounding error <= 2^-8 of the value


def _rounded_inputs(seed: int = 0) -> tuple[list[torch.Tensor], torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    qkv = [torch.randn(B, S, h, D, generator=g).to(BF16) for h in (H, HKV, HKV)]
    dout = torch.randn(B, S, H, D, generator=g).to(BF16)
    return qkv, dout


def _run(fn, qkv: list[torch.Tensor], dout: torch.Tensor, dtype: torch.dtype) -> list[torch.Tensor]:
    inputs = [t.to(dtype).requires_grad_() for t in qkv]
    out = fn(*inputs)
    assert out.dtype == dtype
    grads = torch.autograd.grad(out, inputs, dout.to(dtype))
    return [out.detach(), *grads]


def _rotations() -> torch.Tensor:
    return M.lsh_rotations(D, 8, generator=torch.Generator().manual_seed(1))


def _key_scores(k: torch.Tensor) -> torch.Tensor:
    return k.detach()[..., 0].to(torch.bfloat16).to(k.dtype)  # the same (rounded) u in both runs


def _gates(q: torch.Tensor) -> torch.Tensor:
    g = torch.rand(1, S // 32, S // 32, generator=torch.Generator().manual_seed(2))
    return g.to(BF16).to(q.dtype)


# name -> method; all of them round once (pure PyTorch, float32 inside)
ONE_ROUNDING = {
    "sparsemax": lambda q, k, v: M.sparsemax_attention(q, k, v),
    "sparsemax_causal": lambda q, k, v: M.sparsemax_attention(q, k, v, causal=True),
    "entmax15": lambda q, k, v: M.entmax_attention(q, k, v, 1.5),
    "entmax_bisect_layout": lambda q, k, v: M.entmax_attention(
        q, k, v, 1.3, ds.patterns.block_neighbour(seq_len_q=S, block_size=32), causal=True),
    "rela": lambda q, k, v: M.rela_attention(q, k, v, causal=True),
    "topk": lambda q, k, v: M.topk_attention(q, k, v, 8),
    "adaptive_topk": lambda q, k, v: M.adaptive_topk(q, k, v, torch.tensor([2.5, 5.0]), 8),
    "gumbel_soft": lambda q, k, v: M.gumbel_softmax_attention(q, k, v, 0.5, hard=False, noise=False),
    "gated": lambda q, k, v: M.block_gated_attention(q, k, v, _gates(q), 32),
    "sparsek": lambda q, k, v: M.sparsek_attention(q, k, v, _key_scores(k), 12, causal=True),
    "lsh": lambda q, k, v: M.lsh_attention(q, k, v, n_buckets=8, chunk_size=32, rotations=_rotations()),
    "dense_block": M.SparseMethodAttention("dense", H, D, num_kv_heads=HKV),
}


def _topk_gaps(qkv: list[torch.Tensor], top_k: int) -> torch.Tensor:
    """Gap between the top_k-th and (top_k+1)-th score of every query (float64, test-only S x S)."""
    q, k, _ = (t.to(F64) for t in qkv)
    values = attn_scores(q, k).topk(top_k + 1, dim=-1).values
    return values[..., top_k - 1] - values[..., top_k]


def test_topk_inputs_have_no_near_ties():
    """Precondition of the top-k cases: every query's top-8 cut is well separated, i.e. its gap is
    far larger than the float32-vs-float64 difference of the scores (so both runs keep the same keys)."""
    qkv, _ = _rounded_inputs()
    q, k, _ = qkv
    noise = (attn_scores(q.float(), k.float()).to(F64) - attn_scores(q.to(F64), k.to(F64))).abs().max()
    assert _topk_gaps(qkv, 8).min() > 10 * noise


@pytest.mark.parametrize("name", sorted(ONE_ROUNDING))
def test_bf16_equals_float64_rounded_once(name):
    qkv, dout = _rounded_inputs()
    fn = ONE_ROUNDING[name]
    ref = _run(fn, qkv, dout, F64)
    got = _run(fn, qkv, dout, BF16)
    for what, a, r in zip(("out", "dq", "dk", "dv"), got, ref):
        a = a.to(F64)
        scale = r.abs().max()
        assert scale > 0
        err = (a - r).abs()
        assert err.max() <= 2e-2 * scale, f"{name} {what}: max error {err.max():.3g} vs max |ref| {scale:.3g}"
        # one rounding of a float32 result: within half a bf16 ulp of the float64 value, element-wise
        bound = HALF_ULP * r.abs() * (1 + 1e-3) + 1e-5 * scale
        worst = (err / bound).max()
        assert worst <= 1, f"{name} {what}: {worst:.2f} x the one-rounding bound (low-precision arithmetic inside?)"


@pytest.mark.needs_op
def test_sla_bf16_close_to_float64():
    """SLA: the kernel's sparse branch is rounded to bf16 once, the linear branch and the sum stay in
    float32 until the final rounding; gradients within 2e-2 of the largest."""
    qkv, dout = _rounded_inputs()

    def fn(q, k, v):
        return M.sla_attention(q, k, v, block_size=32, critical_fraction=0.25, negligible_fraction=0.25)

    ref = _run(fn, qkv, dout, F64)
    got = _run(fn, qkv, dout, BF16)
    for what, a, r in zip(("out", "dq", "dk", "dv"), got, ref):
        assert (a.to(F64) - r).abs().max() <= 2e-2 * r.abs().max(), what
    out64, parts64 = M.sla_attention(*(t.to(F64) for t in qkv), block_size=32, critical_fraction=0.25,
                                     negligible_fraction=0.25, return_parts=True)
    out16, parts16 = M.sla_attention(*qkv, block_size=32, critical_fraction=0.25, negligible_fraction=0.25,
                                     return_parts=True)
    assert parts16["layout"].equal(parts64["layout"]) and torch.equal(parts16["marginal"], parts64["marginal"])
    assert parts16["linear"].dtype == torch.float32  # the linear branch is not rounded to bf16
    torch.testing.assert_close(parts16["linear"].to(F64), parts64["linear"], rtol=1e-5, atol=1e-6)
    atol = 1e-5 * out64.abs().max()
    sparse_err = (parts16["sparse"].to(F64) - parts64["sparse"]).abs()
    assert (sparse_err <= HALF_ULP * parts64["sparse"].abs() * (1 + 1e-3) + atol).all()
    out_err = (out16.to(F64) - out64).abs()
    assert (out_err <= HALF_ULP * (parts64["sparse"].abs() + out64.abs()) * (1 + 1e-3) + atol).all()


def test_sparsemax_gradient_jumps_with_the_support_not_with_precision():
    """Why bf16 vs float64 must use the same rounded inputs: rounding q/k alone changes dq a lot."""
    g = torch.Generator().manual_seed(3)
    raw = [torch.randn(1, 64, 2, 32, generator=g, dtype=F64) for _ in range(3)]
    rounded = [t.to(BF16).to(F64) for t in raw]
    dout = torch.randn(1, 64, 2, 32, generator=g, dtype=F64)
    dq_raw = _run(M.sparsemax_attention, raw, dout, F64)[1]
    dq_rounded = _run(M.sparsemax_attention, rounded, dout, F64)[1]
    dq_bf16 = _run(M.sparsemax_attention, [t.to(BF16) for t in rounded], dout.to(BF16), BF16)[1].to(F64)
    scale = dq_rounded.abs().max()
    assert (dq_raw - dq_rounded).abs().max() > 0.05 * scale  # float64 both times: input rounding alone
    assert (dq_bf16 - dq_rounded).abs().max() < 1e-2 * scale  # same inputs: only rounding of dq


# ----------------------------------------------------------------------------- autocast
def _autocast_cases() -> dict:
    cases = {
        "sparsemax": lambda q, k, v: M.sparsemax_attention(q, k, v, causal=True),
        "entmax15": lambda q, k, v: M.entmax_attention(q, k, v, 1.5),
        "topk": lambda q, k, v: M.topk_attention(q, k, v, 8, causal=True),
        "rela": lambda q, k, v: M.rela_attention(q, k, v),
        "lsh": lambda q, k, v: M.lsh_attention(q, k, v, n_buckets=8, chunk_size=32, rotations=_rotations()),
        "dense_block": M.SparseMethodAttention("dense", H, D, num_kv_heads=HKV),
        "sparsek_module": M.SparseK(HKV, D, 12),
    }
    if ds.extension_available():
        cases["sla"] = lambda q, k, v: M.sla_attention(q, k, v, block_size=32, critical_fraction=0.25)
        cases["block_topk"] = lambda q, k, v: M.block_topk_attention(q, k, v, 2, 32)
    return cases


@pytest.mark.parametrize("name", sorted(_autocast_cases()))
def test_autocast_does_not_lower_internal_precision(name):
    """Under ``torch.autocast(bfloat16)`` the methods still compute in float32: same result as without."""
    fn = _autocast_cases()[name]
    qkv, dout = _rounded_inputs(seed=5)
    plain = _run(fn, qkv, dout, BF16)
    inputs = [t.requires_grad_() for t in (x.clone() for x in qkv)]
    with torch.autocast("cpu", dtype=BF16):  # forward under autocast, backward outside (as recommended)
        out = fn(*inputs)
    inside = [out.detach(), *torch.autograd.grad(out, inputs, dout)]
    for what, a, b in zip(("out", "dq", "dk", "dv"), inside, plain):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=lambda m, what=what: f"{name} {what}: {m}")


def test_one_rounding_bound_is_tight_enough_to_catch_bf16_arithmetic():
    """The element-wise bound of the tests above fails for a bf16 computation of the same thing."""
    qkv, _ = _rounded_inputs()
    q, k, v = qkv
    ref = M.sparsemax_attention(*(t.to(F64) for t in qkv))
    scores = (q.transpose(1, 2) @ k.transpose(1, 2).transpose(-1, -2)) / math.sqrt(D)  # bf16 matmul
    weights = M.sparsemax(scores.float()).to(BF16)
    low = (weights @ v.transpose(1, 2)).transpose(1, 2).to(F64)
    bound = HALF_ULP * ref.abs() * (1 + 1e-3) + 1e-5 * ref.abs().max()
    assert ((low - ref).abs() > bound).any()
