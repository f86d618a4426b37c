"""CUDA kernels of the dilated_sparse ops against a float64 dense reference written here.

Skipped without a CUDA device or without the compiled CUDA kernels. The reference builds the
token mask from the dense block mask and the token rules, so it shares no code with the kernels
or with the package's layout / reference modules. Run `python tests/test_cuda_kernels.py --small`
for the tiny case used under compute-sanitizer.
"""

from __future__ import annotations

import math
import os
import random
import re
import sys

import pytest
import torch
from _helpers import random_pattern_mask

CUDA = torch.cuda.is_available()


def _ops():
    try:
        import dilated_sparse  # noqa: F401  (loads the extension, registering the ops)
    except Exception:  # noqa: BLE001, S110  (the standalone library below may provide the ops)
        pass
    lib = os.environ.get("DILATED_SPARSE_TEST_LIB")
    if lib and not hasattr(torch.ops.dilated_sparse, "block_sparse_attn_fwd"):
        torch.ops.load_library(lib)
    return torch.ops.dilated_sparse


def _has_cuda_kernels() -> bool:
    if not CUDA:
        return False
    try:
        ops = _ops()
        q = torch.randn(1, 16, 1, 64, device="cuda", dtype=torch.bfloat16)
        crow = torch.tensor([0, 1], dtype=torch.int32, device="cuda")
        col = torch.tensor([0], dtype=torch.int32, device="cuda")
        ops.block_sparse_attn_fwd(q, q, q, crow, col, 16, 16, 1, 1, 0.125, False, -1, -1, None, None)
        return True
    except Exception:  # noqa: BLE001
        return False


pytestmark = pytest.mark.skipif(not _has_cuda_kernels(), reason="needs CUDA and the CUDA kernels")

DEV = "cuda"


# ----------------------------------------------------------------------------- helpers
def band_mask(nb: int, radius: int) -> torch.Tensor:
    """Bool block mask [1, 1, nb, nb] (CPU): row i holds blocks i - radius .. i + radius."""
    idx = torch.arange(nb)
    return ((idx.view(-1, 1) - idx.view(1, -1)).abs() <= radius).view(1, 1, nb, nb)


def csr_from_mask(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(crow, col, ccol, row) int32 of a bool block mask [Lb, Lh, nqb, nkb]."""
    lb, lh, nqb, nkb = mask.shape
    flat = mask.reshape(lb * lh * nqb, nkb)
    crow = torch.zeros(flat.shape[0] + 1, dtype=torch.int64, device=mask.device)
    crow[1:] = flat.sum(1).cumsum(0)
    col = torch.nonzero(flat)[:, 1]
    flat_t = mask.transpose(2, 3).reshape(lb * lh * nkb, nqb)
    ccol = torch.zeros(flat_t.shape[0] + 1, dtype=torch.int64, device=mask.device)
    ccol[1:] = flat_t.sum(1).cumsum(0)
    row = torch.nonzero(flat_t)[:, 1]
    return tuple(t.to(torch.int32).contiguous() for t in (crow, col, ccol, row))


def token_mask(mask, B, H, Sq, Sk, bq, bk, causal, wl, wr, klen, kpm):
    """Bool [B, H, Sq, Sk] of allowed (query, key) pairs."""
    lb, lh = mask.shape[:2]
    tok = mask.repeat_interleave(bq, 2)[:, :, :Sq].repeat_interleave(bk, 3)[:, :, :, :Sk]
    tok = tok.expand(B if lb == 1 else lb, H if lh == 1 else lh, Sq, Sk)
    i = torch.arange(Sq, device=mask.device).view(-1, 1)
    j = torch.arange(Sk, device=mask.device).view(1, -1)
    ok = torch.ones(Sq, Sk, dtype=torch.bool, device=mask.device)
    if causal:
        ok &= j <= i
    if wl >= 0:
        ok &= i - j <= wl
    if wr >= 0:
        ok &= j - i <= wr
    ok = tok & ok
    valid = torch.ones(B, Sk, dtype=torch.bool, device=mask.device)
    if klen is not None:
        valid &= j < klen.view(-1, 1).long()
    if kpm is not None:
        valid &= ~kpm
    return ok & valid.view(B, 1, 1, Sk)


def reference(q, k, v, allowed, scale):
    """float64 out [B,Sq,H,D], lse [B,H,Sq], probs [B,H,Sq,Sk] (autograd-able)."""
    H, Hkv = q.shape[2], k.shape[2]
    qh = q.double().transpose(1, 2)
    kh = k.double().transpose(1, 2).repeat_interleave(H // Hkv, 1)
    vh = v.double().transpose(1, 2).repeat_interleave(H // Hkv, 1)
    s = (qh @ kh.transpose(-1, -2)) * scale
    s = s.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(s, -1)
    p = torch.where(allowed, torch.exp(s - lse.clamp_min(-1e30).unsqueeze(-1)), torch.zeros_like(s))
    return (p @ vh).transpose(1, 2), lse, p


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-6)).item()


def forced_variant() -> bool:
    """Whether the caller forces a tile variant (DILATED_SPARSE_{FWD,DQ,DKV}_VARIANT, as
    device_run.sh's VARIANTS loop does): the sm_90 persistent kernels, and the switches only they
    read, may then not run."""
    return any(os.environ.get(f"DILATED_SPARSE_{op}_VARIANT") for op in ("FWD", "DQ", "DKV"))


def default_split_switches(monkeypatch) -> None:
    """The forward's split switches at their defaults, whatever the caller set: the automatic chunk,
    its counts read on the host, with the plan cache on (a captured call looks up the eager call's plan)."""
    for var in ("DILATED_SPARSE_SPLIT_CHUNK", "DILATED_SPARSE_SPLIT", "DILATED_SPARSE_SPLIT_ON_DEVICE",
                "DILATED_SPARSE_PLAN_CACHE"):
        monkeypatch.delenv(var, raising=False)


def default_backward_variants(monkeypatch) -> None:
    """The backward's kernels as the defaults pick them, whatever the caller forces: a forced DQ or DKV
    variant picks the recompute backward (test_forced_variant_picks_the_backward), so tests of the
    dS-scratch backward clear them (a forced forward variant stays)."""
    for op in ("DQ", "DKV"):
        monkeypatch.delenv(f"DILATED_SPARSE_{op}_VARIANT", raising=False)


def poison():
    """Fill freed allocator memory with NaN so that unwritten outputs show."""
    x = torch.empty(64 * 1024 * 1024, device=DEV, dtype=torch.float32)
    x.fill_(float("nan"))
    del x


def bwd_again(r: dict) -> tuple:
    """The backward op once more on a run_case result's inputs, forward outputs and arguments."""
    return _ops().block_sparse_attn_bwd(r["do"], r["q"], r["k"], r["v"], r["out"], r["lse"], r["ccol"], r["rowi"],
                                        r["crow"], r["col"], *r["args"])


def bwd_peak(r: dict) -> tuple[tuple, int]:
    """bwd_again with outputs poisoned, and the peak bytes it requested above what was live before
    (requested, not the allocator's rounded blocks, which depend on what its pools hold)."""
    poison()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_stats()["requested_bytes.all.current"]
    grads = bwd_again(r)
    torch.cuda.synchronize()
    return grads, torch.cuda.memory_stats()["requested_bytes.all.peak"] - base


def ds_repeats(r: dict) -> tuple[int, int, int]:
    """A run_case result's dS scratch as the CUDA backward counts it: bytes of one (b, h) repeat's
    dS, the query repeats ((b, h) pairs sharing a layout slice) and the dK/dV repeats ((b, kv head)
    pairs; batches with a per-head layout). Blocks that are multiples of the 128 x 128 tiles take a
    slot each (bq x bk); smaller ones a slot (128 x 128) per tile pair holding one of them."""
    B, H, Hkv = r["q"].shape[0], r["q"].shape[2], r["k"].shape[2]
    bq, bk, Lb, Lh = r["args"][:4]
    batches = B if Lb == 1 else 1
    if bq % 128 == 0 and bk % 128 == 0:
        slots, slot = r["col"].numel(), bq * bk
    else:
        crow, col = r["crow"].cpu().long(), r["col"].cpu().long()
        rows = torch.repeat_interleave(torch.arange(crow.numel() - 1), crow.diff())
        nqb = math.ceil(r["q"].shape[1] / bq)
        slice_, row = rows // nqb, rows % nqb
        pairs = torch.stack([slice_, row * bq // 128, col * bk // 128], 1)
        slots, slot = torch.unique(pairs, dim=0).shape[0], 128 * 128
    rep_bytes = slots * slot * r["q"].element_size()
    return rep_bytes, batches * (H if Lh == 1 else 1), batches * (Hkv if Lh == 1 else 1)


def run_case(*, B=1, H=2, Hkv=None, Sq=200, Sk=None, D=64, bq=32, bk=64, dtype=torch.bfloat16,
             density=0.5, lb=1, lh=1, causal=False, wl=-1, wr=-1, use_klen=False, use_kpm=False,
             empty_rows=0.0, bwd=True, seed=0, mask=None, strided=False, check_weights=False,
             q=None, k=None, v=None, scale=None):
    g = torch.Generator(device="cpu").manual_seed(seed)
    Hkv = Hkv or H
    Sk = Sk or Sq
    nqb, nkb = math.ceil(Sq / bq), math.ceil(Sk / bk)
    Lb, Lh = (B if lb != 1 else 1), (H if lh != 1 else 1)
    if mask is None:
        mask = torch.rand(Lb, Lh, nqb, nkb, generator=g) < density
        if empty_rows > 0:
            mask &= (torch.rand(Lb, Lh, nqb, 1, generator=g) >= empty_rows)
    mask = mask.to(DEV)
    crow, col, ccol, rowi = csr_from_mask(mask)
    if q is None:
        if strided:  # views of one packed projection [B, S, H + 2 Hkv, D]
            assert Sq == Sk
            qkv = torch.randn(B, Sq, H + 2 * Hkv, D, generator=g).to(DEV, dtype)
            q, k, v = qkv[:, :, :H], qkv[:, :, H:H + Hkv], qkv[:, :, H + Hkv:]
        else:
            q = torch.randn(B, Sq, H, D, generator=g).to(DEV, dtype)
            k = torch.randn(B, Sk, Hkv, D, generator=g).to(DEV, dtype)
            v = torch.randn(B, Sk, Hkv, D, generator=g).to(DEV, dtype)
    klen = torch.randint(0, Sk + 1, (B,), generator=g).to(DEV, torch.int32) if use_klen else None
    kpm = (torch.rand(B, Sk, generator=g) < 0.3).to(DEV) if use_kpm else None
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    ops = _ops()
    poison()
    out, lse = ops.block_sparse_attn_fwd(q, k, v, crow, col, bq, bk, Lb, Lh, scale, causal, wl, wr, klen, kpm)
    torch.cuda.synchronize()
    allowed = token_mask(mask, B, H, Sq, Sk, bq, bk, causal, wl, wr, klen, kpm)
    qd, kd, vd = (t.detach().double().requires_grad_(bwd) for t in (q, k, v))
    ro, rl, rp = reference(qd, kd, vd, allowed, scale)
    tol = 2e-2 if dtype == torch.bfloat16 else 5e-3
    assert torch.isfinite(out).all(), "NaN/inf in out"
    assert not torch.isnan(lse).any(), "NaN in lse"
    assert torch.equal(torch.isinf(lse), torch.isinf(rl)), "empty-row (-inf lse) pattern differs"
    fin = torch.isfinite(rl)
    if fin.any():
        assert (lse[fin].double() - rl[fin]).abs().max().item() < 2e-2
    assert rel(out, ro) < tol, f"out rel err {rel(out, ro)}"
    empty = ~allowed.any(-1)  # [B, H, Sq]
    assert (out.transpose(1, 2)[empty] == 0).all()
    res = {"out": out, "lse": lse}
    if bwd:
        do = torch.randn(B, Sq, H, D, generator=g).to(DEV, dtype)
        ro.backward(do.double())
        poison()
        dq, dk, dv = ops.block_sparse_attn_bwd(do, q, k, v, out, lse, ccol, rowi, crow, col, bq, bk, Lb, Lh,
                                               scale, causal, wl, wr, klen, kpm)
        torch.cuda.synchronize()
        for name, got, ref in (("dq", dq, qd.grad), ("dk", dk, kd.grad), ("dv", dv, vd.grad)):
            assert got.shape == ref.shape and got.dtype == dtype
            assert torch.isfinite(got).all(), f"NaN/inf in {name}"
            if ref.norm() > 0:
                assert rel(got, ref) < 2 * tol, f"{name} rel err {rel(got, ref)}"
            else:
                assert (got == 0).all()
        assert (dq.transpose(1, 2)[empty] == 0).all()
        res.update(dq=dq, dk=dk, dv=dv, do=do, crow=crow, col=col, ccol=ccol, rowi=rowi, q=q, k=k, v=v,
                   args=(bq, bk, Lb, Lh, scale, causal, wl, wr, klen, kpm))
    if check_weights:
        msn = int((crow[nqb::nqb] - crow[:-1:nqb]).max().item()) if crow.numel() > 1 else 0
        poison()
        w = ops.block_sparse_attn_weights(q, k, lse, crow, col, bq, bk, Lb, Lh, msn, scale, causal, wl, wr,
                                          klen, kpm)
        assert torch.isfinite(w).all()
        # Rebuild dense probabilities from the blocks and compare.
        pad = torch.zeros(B, H, nqb * bq, nkb * bk, device=DEV, dtype=torch.float64)
        crow_l = crow.tolist()
        col_l = col.tolist()
        for b in range(B):
            for h in range(H):
                s = (0 if Lb == 1 else b) * Lh + (0 if Lh == 1 else h)
                base = crow_l[s * nqb]
                for qb in range(nqb):
                    for p in range(crow_l[s * nqb + qb], crow_l[s * nqb + qb + 1]):
                        kb = col_l[p]
                        pad[b, h, qb * bq:(qb + 1) * bq, kb * bk:(kb + 1) * bk] = w[b, h, p - base].double()
                assert (w[b, h, crow_l[(s + 1) * nqb] - base:] == 0).all()
        assert (pad[:, :, Sq:] == 0).all() and (pad[:, :, :, Sk:] == 0).all()
        assert (pad[:, :, :Sq, :Sk] - rp.detach()).abs().max().item() < (2e-2 if dtype == torch.bfloat16 else 4e-3)
    return res


# ----------------------------------------------------------------------------- tests
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("D", [32, 64, 96, 128, 256, 40, 200])
def test_head_dims(dtype, D):
    run_case(D=D, dtype=dtype, Sq=333, Sk=301, bq=64, bk=32, causal=D % 64 == 0, seed=D)


def kernels_run(fn) -> set[tuple[str, int, int]]:
    """(kernel, tile width, schedule) of each dilated_sparse kernel that fn() launches, from
    torch.profiler's kernel names (``dilated_sparse::cuda::fwd_sm90_kernel<__nv_bfloat16, 128, 2, 128,
    6338>``: ``("fwd_sm90", 128, 6338)``; -1 for a kernel without a schedule argument)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    found = set()
    for event in prof.events():
        m = re.search(r"dilated_sparse::cuda::(\w+?)_kernel<[^,<>]+, (\d+)((?:, \d+)*)>", event.name)
        if m:
            rest = m.group(3).split(", ")[1:]
            sched = int(rest[-1]) if len(rest) == 3 and m.group(1).endswith("_sm90") else -1
            found.add((m.group(1), int(m.group(2)), sched))
    return found


# kernels_sm90.cuh's modifiers of the narrowed head dims: the score products over the served columns
# (kHalfScoreK: D32 in the D64 tiles, kThreeQuarterScoreK: D96 in the D128 tiles) and the output
# products too (kNarrowOut).
NARROW_BITS = {32: 256 | 2048, 96: 4096 | 2048}
NARROW_MASK = NARROW_BITS[32] | NARROW_BITS[96]


@pytest.mark.skipif(not CUDA or torch.cuda.get_device_capability() != (9, 0), reason="the sm_90 dispatch")
@pytest.mark.parametrize("pad", ["1", "0"])
@pytest.mark.parametrize("D", [24, 32, 72, 96, 200, 256])
def test_sm90_head_dim_dispatch(monkeypatch, D, pad):
    """On sm_90 every specialised head dim has wgmma kernels in the full build, so the padding
    switch (DILATED_SPARSE_SM90_PAD, for reduced builds) changes nothing: D <= 32 runs the D64
    tiles and 64 < D <= 96 the D128 tiles, their products narrowed to the first 32 or 96 columns
    (kHalfScoreK / kThreeQuarterScoreK with kNarrowOut), and D > 128 the D256 kernels (dK/dV in two
    column halves a key tile). The results match the reference: odd lengths, GQA, causal, key
    padding, several items a CTA."""
    if forced_variant():
        pytest.skip("a forced tile variant picks the kernels itself")
    from dilated_sparse.ops import _CUDA_HEAD_DIMS, _compiled_cuda_head_dims

    if set(_compiled_cuda_head_dims()) != set(_CUDA_HEAD_DIMS):
        pytest.skip("needs the full CUDA build")
    monkeypatch.setenv("DILATED_SPARSE_SM90_PAD", pad)
    exact = next(d for d in _CUDA_HEAD_DIMS if d >= D)
    wgmma = 64 if D <= 64 else 128 if D <= 128 else 256  # the wgmma kernels' tile width
    fwd = ("fwd_sm90", wgmma)
    if wgmma == 256:
        bwd = {("dq_sm90", 256), ("dkv_sm90", 256)}
    else:
        bwd = {("dq_ds_sm90", wgmma), ("dkv_sm90", wgmma)} if wgmma == 128 else {("dq_sm90", 64), ("dkv_sm90", 64)}
    kw = {"B": 2, "H": 8, "Hkv": 2, "Sq": 1500, "Sk": 1400, "D": D, "bq": 128, "bk": 128, "density": 0.4,
          "causal": True, "use_kpm": True, "seed": D}
    ran = kernels_run(lambda: run_case(**kw))
    names = {(name, d) for name, d, _ in ran}
    assert {fwd} | bwd <= names, f"expected {fwd} and {bwd}, ran {sorted(ran)}"
    attention = {(name, d) for name, d in names if name in ("fwd", "fwd_sm90", "dq", "dkv", "dq_sm90", "dkv_sm90", "dq_ds_sm90")}
    assert attention == {fwd} | bwd, f"other kernels ran too: {sorted(attention)}"
    bits = NARROW_BITS.get(exact, 0)
    for name, _, sched in ran:
        if sched >= 0:  # the narrowed head dims' modifiers, and only theirs
            assert sched & NARROW_MASK == bits, f"{name} schedule {sched} for D{D}"


@pytest.mark.parametrize("bq", [16, 32, 64, 128, 256])
@pytest.mark.parametrize("bk", [16, 32, 64, 128, 256])
def test_block_sizes(bq, bk):
    run_case(bq=bq, bk=bk, Sq=600, Sk=555, density=0.3, D=64, seed=bq * 7 + bk, use_kpm=bq == bk)


@pytest.mark.parametrize("bq,bk,D", [(128, 128, 128), (64, 64, 128), (16, 128, 64), (256, 16, 128)])
def test_block_sizes_hd(bq, bk, D):
    run_case(bq=bq, bk=bk, Sq=700, Sk=700, density=0.3, D=D, seed=bq + bk + D, causal=True)


@pytest.mark.parametrize(
    "kw",
    [
        {"causal": True},
        {"wl": 37, "wr": -1},
        {"wl": -1, "wr": 21},
        {"wl": 50, "wr": 50, "causal": True},
        {"use_klen": True, "B": 3},
        {"use_kpm": True, "B": 2},
        {"use_klen": True, "use_kpm": True, "causal": True, "B": 2, "wl": 100},
        {"H": 6, "Hkv": 2, "causal": True},
        {"H": 4, "Hkv": 1, "use_kpm": True},
        {"lh": 0, "H": 3},
        {"lb": 0, "B": 2, "H": 2},
        {"lb": 0, "lh": 0, "B": 2, "H": 4, "Hkv": 2},
        {"empty_rows": 0.4, "H": 4, "Hkv": 2, "lh": 0},
        {"strided": True, "H": 4, "Hkv": 2, "Sq": 257, "Sk": 257},
        {"Sq": 1, "Sk": 1000, "bq": 16, "bk": 128},
        {"Sq": 1000, "Sk": 17, "bq": 256, "bk": 16},
        {"density": 1.0, "causal": True, "Sq": 1024, "bq": 128, "bk": 128, "D": 128},
    ],
)
def test_rules(kw):
    run_case(**kw)


# Every tile variant of each kernel, forced through DILATED_SPARSE_{FWD,DQ,DKV}_VARIANT: 0-3 are the
# mma.sync kernels, 4-9 the sm_90a (wgmma) ones. A variant that is not compiled for this head dim, or
# an sm_90a one on another GPU, is ignored by the host (the default runs instead); a forced dS-scratch
# variant picks that backward (9 here: dQ from dS, its dK/dV the first scratch one), any other forced
# DQ or DKV variant the recompute backward (test_forced_variant_picks_the_backward).
@pytest.mark.parametrize("variant", range(10))
@pytest.mark.parametrize("D,dtype", [(64, torch.float16), (128, torch.bfloat16)])
@pytest.mark.parametrize(
    "kw",
    [
        {"Sq": 700, "Sk": 650, "bq": 128, "bk": 128, "density": 0.4, "causal": True, "H": 4, "Hkv": 2},
        {"Sq": 333, "Sk": 301, "bq": 64, "bk": 32, "density": 0.5, "use_kpm": True, "empty_rows": 0.3},
        {"Sq": 520, "Sk": 520, "bq": 256, "bk": 64, "density": 0.5, "wl": 90, "lh": 0, "H": 3},
    ],
)
def test_forced_variants(variant, D, dtype, kw, monkeypatch):
    for op in ("FWD", "DQ", "DKV"):
        monkeypatch.setenv(f"DILATED_SPARSE_{op}_VARIANT", str(variant))
    run_case(D=D, dtype=dtype, seed=variant * 13 + D, **kw)


@pytest.mark.skipif(not CUDA or torch.cuda.get_device_capability() != (9, 0), reason="the sm_90 backwards")
@pytest.mark.parametrize(
    "forced,scratch",
    [({}, True), ({"DKV": "8"}, True), ({"DQ": "9"}, True), ({"DKV": "4"}, False), ({"DQ": "5"}, False),
     ({"DQ": "0", "DKV": "0"}, False), ({"DKV": "8", "DQ": "4"}, False)],
)
def test_forced_variant_picks_the_backward(forced, scratch, monkeypatch):
    """At D128 block 128 the default backward is the dS-scratch one. A forced DQ or DKV variant that
    is a scratch kernel keeps it; any other compiled variant asks for the recompute backward, so the
    scratch is off (no dq_ds kernel runs), and the gradients still match the reference."""
    if forced_variant():
        pytest.skip("the caller forces variants itself")
    for op, variant in forced.items():
        monkeypatch.setenv(f"DILATED_SPARSE_{op}_VARIANT", variant)
    kw = {"B": 1, "H": 4, "Hkv": 2, "Sq": 700, "Sk": 650, "D": 128, "dtype": torch.bfloat16, "bq": 128, "bk": 128,
          "density": 0.5, "causal": True, "seed": 5}
    ran = {name for name, _, _ in kernels_run(lambda: run_case(**kw))}
    assert ("dq_ds_sm90" in ran) == scratch, f"{forced}: ran {sorted(ran)}"


@pytest.mark.parametrize(
    "name,value",
    [("DILATED_SPARSE_FWD_VARIANT", "x"), ("DILATED_SPARSE_DQ_VARIANT", "10"), ("DILATED_SPARSE_DKV_VARIANT", "-1"),
     ("DILATED_SPARSE_FWD_VARIANT", "4 "), ("DILATED_SPARSE_BWD_SCRATCH_MB", "1e3"),
     ("DILATED_SPARSE_BWD_SCRATCH_MB", "-5"), ("DILATED_SPARSE_SPLIT_CHUNK", "0"),
     ("DILATED_SPARSE_SPLIT_CHUNK", "2k"), ("DILATED_SPARSE_SPLIT", "no"), ("DILATED_SPARSE_PLAN_CACHE", "off"),
     ("DILATED_SPARSE_BWD_STREAMS", "3"), ("DILATED_SPARSE_BWD_STREAMS", "0"), ("DILATED_SPARSE_TMA", "yes"),
     ("DILATED_SPARSE_BWD_SCRATCH_TILES", "on"), ("DILATED_SPARSE_SPLIT_ON_DEVICE", "2")],
)
def test_bad_tuning_switch_is_an_error(name, value, monkeypatch):
    """A tuning switch's value that is not one it takes raises, naming the variable, instead of timing
    or testing the default under the forced variant's name."""
    if name == "DILATED_SPARSE_TMA" and (torch.cuda.get_device_capability() != (9, 0) or forced_variant()):
        pytest.skip("read only where the sm_90 persistent kernels run (a forced variant may be mma.sync)")
    monkeypatch.setenv(name, value)
    with pytest.raises(RuntimeError, match=name):
        run_case(B=1, H=2, Sq=300, Sk=300, D=64, dtype=torch.float16, bq=128, bk=128, density=0.6, seed=1)


# Scales that are not positive (legal, if odd) or large: the forward's softmax takes the row max of
# the raw scores for a positive scale and scales first otherwise; masked scores must stay out of the
# max either way (causal, padding and an empty row here). Default variant (at D128 with the lazy
# rescale), the mma.sync kernel (0) and the overlapped ping-pong (8).
@pytest.mark.parametrize("scale", [-0.3, 0.0, 0.9])
@pytest.mark.parametrize("variant", [None, "0", "8"])
@pytest.mark.parametrize("D,dtype", [(64, torch.float16), (128, torch.bfloat16)])
def test_scales(scale, variant, D, dtype, monkeypatch):
    if variant is not None:
        monkeypatch.setenv("DILATED_SPARSE_FWD_VARIANT", variant)
    run_case(D=D, dtype=dtype, Sq=300, Sk=280, bq=128, bk=64, density=0.6, causal=True, use_kpm=True, B=2,
             empty_rows=0.3, scale=scale, seed=int(10 * scale) + D)


# Scores that grow along the row (keys scaled up token by token): the D128 forward keeps a row's
# running max while a tile's stays within its headroom (probabilities above 1; kFwdLazyRescale)
# and raises it, rescaling the output, when a tile's exceeds it; both happen here, on the default
# variants, against the reference.
@pytest.mark.parametrize("D,dtype", [(64, torch.float16), (128, torch.bfloat16), (128, torch.float16)])
def test_growing_scores(D, dtype):
    g = torch.Generator().manual_seed(D)
    S, H = 640, 2
    ramp = torch.linspace(0.2, 3.0, S).view(1, S, 1, 1)
    q = torch.randn(1, S, H, D, generator=g).to(DEV, dtype)
    k = (torch.randn(1, S, H, D, generator=g) * ramp).to(DEV, dtype)
    v = torch.randn(1, S, H, D, generator=g).to(DEV, dtype)
    run_case(H=H, Sq=S, D=D, dtype=dtype, bq=128, bk=128, density=1.0, q=q, k=k, v=v, scale=0.3, seed=D)


# The backward's gradient through lse (dlse: Delta - dlse), both sm_90 backwards (the dS scratch and
# the recompute one), D96's narrowed kernels, and the mma.sync kernels (forced variant 0 of each op,
# which turns the scratch off: the backward is theirs too), GQA and
# causal; a row of every query block keeps its diagonal block so that no row is empty (the
# reference's lse has no gradient there).
@pytest.mark.parametrize("D,dtype,variant", [(64, torch.float16, None), (128, torch.bfloat16, None),
                                             (96, torch.bfloat16, None), (96, torch.bfloat16, "0")])
@pytest.mark.parametrize("scratch_mb", ["0", "1024"])
def test_lse_gradient(D, dtype, variant, scratch_mb, monkeypatch):
    monkeypatch.setenv("DILATED_SPARSE_BWD_SCRATCH_MB", scratch_mb)
    if variant is not None:
        for op in ("FWD", "DQ", "DKV"):
            monkeypatch.setenv(f"DILATED_SPARSE_{op}_VARIANT", variant)
    g = torch.Generator().manual_seed(D)
    B, H, Hkv, S, bs = 2, 4, 2, 520, 128
    nb = math.ceil(S / bs)
    mask = (torch.rand(1, 1, nb, nb, generator=g) < 0.6) | torch.eye(nb, dtype=torch.bool).view(1, 1, nb, nb)
    mask = mask.to(DEV)
    crow, col, ccol, rowi = csr_from_mask(mask)
    q, k, v, do = (torch.randn(B, S, h, D, generator=g).to(DEV, dtype) for h in (H, Hkv, Hkv, H))
    dl = torch.randn(B, H, S, generator=g).to(DEV)
    scale = 1.0 / math.sqrt(D)
    ops = _ops()
    args = (crow, col, bs, bs, 1, 1, scale, True, -1, -1, None, None)
    out, lse = ops.block_sparse_attn_fwd(q, k, v, *args)
    poison()
    dq, dk, dv = ops.block_sparse_attn_bwd(do, q, k, v, out, lse, ccol, rowi, *args, dl)
    torch.cuda.synchronize()
    allowed = token_mask(mask, B, H, S, S, bs, bs, True, -1, -1, None, None)
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    ro, rl, _ = reference(qd, kd, vd, allowed, scale)
    ((ro * do.double()).sum() + (rl * dl.double()).sum()).backward()
    tol = 2e-2 if dtype == torch.bfloat16 else 5e-3
    for name, got, ref in (("dq", dq, qd.grad), ("dk", dk, kd.grad), ("dv", dv, vd.grad)):
        assert torch.isfinite(got).all(), f"NaN/inf in {name}"
        assert rel(got, ref) < 2 * tol, f"{name} rel err {rel(got, ref)}"
    # dlse = 0 is the backward without it, bit for bit
    plain = ops.block_sparse_attn_bwd(do, q, k, v, out, lse, ccol, rowi, *args)
    zero = ops.block_sparse_attn_bwd(do, q, k, v, out, lse, ccol, rowi, *args, torch.zeros_like(dl))
    assert all(torch.equal(a, b) for a, b in zip(plain, zero))


# The dS-scratch backward (dK/dV writes dS, dQ = dS K reads it; sm_90, D128 and D96; a slot per block where
# blocks are multiples of 128, else per 128 x 128 tile pair; scratch within
# DILATED_SPARSE_BWD_SCRATCH_MB): GQA, causal, padding, empty rows,
# windows, per-head (also with GQA) and per-batch layouts, blocks spanning several tiles, lengths
# not a multiple of the block. Against the reference (run_case), run to run, against the recompute
# backward (bit for bit: the same products in the same order), and its scratch measured.
@pytest.mark.parametrize(
    "kw",
    [
        {"Sq": 1000, "Sk": 900, "bq": 128, "bk": 128, "density": 0.4, "causal": True, "H": 4, "Hkv": 2},
        {"Sq": 777, "Sk": 777, "bq": 256, "bk": 128, "density": 0.5, "use_kpm": True, "empty_rows": 0.3, "B": 2},
        {"Sq": 640, "Sk": 700, "bq": 128, "bk": 256, "density": 0.6, "wl": 90, "lh": 0, "H": 3},
        {"Sq": 520, "Sk": 600, "bq": 256, "bk": 256, "density": 0.7, "use_klen": True, "lb": 0, "B": 2, "H": 2},
        {"Sq": 128, "Sk": 128, "bq": 128, "bk": 128, "density": 1.0, "causal": True, "H": 6, "Hkv": 1},
        {"Sq": 450, "Sk": 500, "bq": 128, "bk": 128, "density": 0.6, "causal": True, "lh": 0, "H": 4, "Hkv": 2},
        # blocks below the tiles: a slot per 128 x 128 tile pair
        {"Sq": 700, "Sk": 650, "bq": 64, "bk": 64, "density": 0.3, "causal": True, "H": 4, "Hkv": 2},
        {"Sq": 500, "Sk": 520, "bq": 64, "bk": 128, "density": 0.4, "use_kpm": True, "B": 2},
        {"Sq": 520, "Sk": 500, "bq": 128, "bk": 64, "density": 0.4, "wl": 100, "lh": 0, "H": 3},
        {"Sq": 300, "Sk": 333, "bq": 32, "bk": 16, "density": 0.3, "empty_rows": 0.3, "lb": 0, "B": 2, "H": 2},
        {"Sq": 600, "Sk": 640, "bq": 64, "bk": 64, "density": 0.35, "lh": 0, "H": 4, "Hkv": 2, "wr": 200},
        # D96 runs the D128 kernels (its surplus columns zero), with both kinds of slots
        {"Sq": 400, "Sk": 390, "bq": 128, "bk": 128, "density": 0.6, "causal": True, "D": 96},
        {"Sq": 410, "Sk": 430, "bq": 64, "bk": 32, "density": 0.4, "H": 4, "Hkv": 2, "D": 96},
    ],
)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_ds_scratch_backward(kw, dtype, monkeypatch):
    default_backward_variants(monkeypatch)
    monkeypatch.setenv("DILATED_SPARSE_BWD_SCRATCH_MB", "1024")
    r = run_case(**{"D": 128, **kw}, dtype=dtype, seed=kw["Sq"] + kw["bq"])

    again, peak_scratch = bwd_peak(r)
    monkeypatch.setenv("DILATED_SPARSE_BWD_SCRATCH_MB", "0")
    recompute, peak_recompute = bwd_peak(r)
    for name, first, second, other in zip(("dq", "dk", "dv"), (r["dq"], r["dk"], r["dv"]), again, recompute):
        assert torch.equal(first, second), f"{name} differs run to run"
        assert torch.equal(first, other), f"{name}: scratch and recompute backward differ"
    if torch.cuda.get_device_capability() == (9, 0):
        rep_bytes, q_reps, _ = ds_repeats(r)
        scratch = rep_bytes * q_reps
        # (two chunk buffers may hold up to 4 / 3 of it: odd repeat counts)
        assert 0.9 * scratch <= peak_scratch - peak_recompute <= 1.5 * scratch + (1 << 20), (
            peak_scratch, peak_recompute, scratch)


@pytest.mark.skipif(not CUDA or torch.cuda.get_device_capability() != (9, 0), reason="the sm_90 dS scratch")
def test_ds_tile_slots_follow_the_query_tiles(monkeypatch):
    """The tile slots' map is cached with the dK/dV plan, which is keyed by the CSC tensors. The same
    CSC (and col) also serve a CSR with trailing empty query rows in each slice, whose dQ plan has
    more tiles a slice: the map must follow (per-head layouts, block 64, D128). The call that reuses
    the first call's CSC tensors equals, bit for bit, one with fresh index tensors, and runs the
    scratch backward."""
    default_backward_variants(monkeypatch)
    monkeypatch.delenv("DILATED_SPARSE_PLAN_CACHE", raising=False)
    monkeypatch.delenv("DILATED_SPARSE_BWD_SCRATCH_TILES", raising=False)
    monkeypatch.setenv("DILATED_SPARSE_BWD_SCRATCH_MB", "1024")
    H, D, bs, nkb = 2, 128, 64, 8
    g = torch.Generator(device="cpu").manual_seed(21)
    short = torch.rand(1, H, 8, nkb, generator=g) < 0.5  # per-head layouts: two slices
    short[:, :, :, 0] = True
    crow1, col1, ccol1, rowi1 = csr_from_mask(short.to(DEV))
    longer = torch.cat([short, torch.zeros(1, H, 8, nkb, dtype=torch.bool)], dim=2)  # 8 empty rows a slice
    crow2, col2, ccol2, rowi2 = csr_from_mask(longer.to(DEV))
    assert torch.equal(ccol1, ccol2) and torch.equal(rowi1, rowi2) and torch.equal(col1, col2)
    ops = _ops()
    k, v = (torch.randn(1, nkb * bs, H, D, generator=g).to(DEV, torch.bfloat16) for _ in range(2))
    rules = (1, H, D ** -0.5, False, -1, -1, None, None)

    def backward(Sq, crow, col, ccol, rowi):
        gen = torch.Generator().manual_seed(Sq)
        q, do = (torch.randn(1, Sq, H, D, generator=gen).to(DEV, torch.bfloat16) for _ in range(2))
        out, lse = ops.block_sparse_attn_fwd(q, k, v, crow, col, bs, bs, *rules)
        return ops.block_sparse_attn_bwd(do, q, k, v, out, lse, ccol, rowi, crow, col, bs, bs, *rules)

    backward(8 * bs, crow1, col1, ccol1, rowi1)  # caches the dK/dV plan of ccol1 / rowi1, with its map
    reused = []
    ran = {name for name, _, _ in kernels_run(lambda: reused.extend(backward(16 * bs, crow2, col1, ccol1, rowi1)))}
    assert "dq_ds_sm90" in ran, ran
    fresh = backward(16 * bs, crow2.clone(), col2.clone(), ccol2.clone(), rowi2.clone())
    for name, a, b in zip(("dq", "dk", "dv"), reused, fresh):
        assert torch.equal(a, b), name


# The dS-scratch backward in chunks of repeats (the (b, h) pairs sharing a layout slice), where the
# whole scratch exceeds DILATED_SPARSE_BWD_SCRATCH_MB but one dK/dV repeat fits: GQA (a chunk holds
# whole query-head groups), chunks that cross a batch boundary and end uneven, batches as the
# repeats of per-head layouts, heads as the repeats of per-batch layouts; one chunk buffer (cases 1
# and 3: two chunks do not fit) and two, the chunks alternating between two streams (cases 2 and 4).
# Forced (DILATED_SPARSE_BWD_SCRATCH_CHUNKS=1): bit for bit against the whole scratch and the
# recompute backward, and the scratch measured (at least one repeat's, at most the limit). Each
# measured call follows the same call with another dout: the caching allocator hands it the same
# workspace blocks back, so rows (Delta) that a chunk left unwritten would hold the other dout's
# values, not the right ones. By default (auto) chunks this small do not pay and the recompute
# backward runs (no scratch); 0 never chunks.
@pytest.mark.parametrize(
    "kw, limit_mb",
    [
        ({"Sq": 1024, "bq": 128, "bk": 128, "density": 1.0, "causal": True, "H": 6, "Hkv": 2}, 7),
        ({"Sq": 700, "Sk": 900, "bq": 128, "bk": 128, "density": 0.6, "empty_rows": 0.3, "B": 2, "H": 4}, 2),
        ({"Sq": 1024, "bq": 256, "bk": 256, "density": 0.8, "use_kpm": True, "lh": 0, "B": 3, "H": 2}, 4),
        ({"Sq": 800, "bq": 128, "bk": 128, "density": 0.7, "lb": 0, "B": 2, "H": 8, "Hkv": 4}, 9),
    ],
)
def test_ds_scratch_chunks(kw, limit_mb, monkeypatch):
    default_backward_variants(monkeypatch)
    monkeypatch.setenv("DILATED_SPARSE_BWD_SCRATCH_MB", "1024")
    r = run_case(D=128, dtype=torch.bfloat16, seed=kw["Sq"] + kw.get("B", 1), **kw)
    q_rep_bytes, q_reps, reps = ds_repeats(r)
    rep_bytes = q_rep_bytes * (q_reps // reps)  # one dK/dV repeat's dS
    limit = limit_mb << 20
    assert rep_bytes <= limit and reps * rep_bytes > limit + (1 << 20), "the case must need several chunks"
    other_dout = dict(r, do=-2 * r["do"])

    def bwd(limit_env: str, chunks: str):
        monkeypatch.setenv("DILATED_SPARSE_BWD_SCRATCH_MB", limit_env)
        monkeypatch.setenv("DILATED_SPARSE_BWD_SCRATCH_CHUNKS", chunks)
        bwd_again(other_dout)
        return bwd_peak(r)

    # every path once first, so that each measured call finds its tile plans cached
    for limit_env, chunks in (("0", "auto"), (str(limit_mb), "1"), (str(limit_mb), "auto")):
        bwd(limit_env, chunks)
    recompute, peak_recompute = bwd("0", "auto")
    chunked, peak_chunked = bwd(str(limit_mb), "1")
    auto, peak_auto = bwd(str(limit_mb), "auto")
    never, peak_never = bwd(str(limit_mb), "0")
    for name, first, *others in zip(("dq", "dk", "dv"), (r["dq"], r["dk"], r["dv"]), chunked, auto, never, recompute):
        for how, other in zip(("chunked", "auto", "unchunked", "recompute"), others):
            assert torch.equal(first, other), f"{name}: whole scratch and {how} backward differ"
    if torch.cuda.get_device_capability() == (9, 0):
        # the chunk's scratch (and the plans' few KB beside it)
        assert 0.9 * rep_bytes <= peak_chunked - peak_recompute <= limit + (1 << 20), (peak_chunked, rep_bytes)
        for how, peak in (("auto", peak_auto), ("0", peak_never)):
            assert peak - peak_recompute < 0.5 * rep_bytes, f"CHUNKS={how} allocated a scratch: {peak}"
    monkeypatch.setenv("DILATED_SPARSE_BWD_SCRATCH_MB", str(limit_mb))
    monkeypatch.setenv("DILATED_SPARSE_BWD_SCRATCH_CHUNKS", "sometimes")
    with pytest.raises(RuntimeError, match="DILATED_SPARSE_BWD_SCRATCH_CHUNKS"):
        bwd_again(r)


# The sm_90 kernels' producers copy tiles with TMA where the host could encode tensor maps (forced
# here: DILATED_SPARSE_TMA=1), else with cp.async (DILATED_SPARSE_TMA=0); with TMA the forward
# kernels that have a staging tile (D64) also write their output rows with TMA stores, which must
# clip at the sequence end and at D. Packed-projection views, GQA, per-batch layouts, lengths that
# end inside a tile (TMA zero-fills past the tensor), D below the kernel's (zero columns), both
# backwards. Same tiles, same products: the results must agree bit for bit (and, through
# run_case, with the reference). With TMA the dQ-from-dS kernel's producer also splits (a warp
# decodes the next item while three copy: run_items); DILATED_SPARSE_SPLIT_PRODUCER=0 keeps one
# producer loop, which must give the same gradients bit for bit. So must the producers' single loop
# with DILATED_SPARSE_DECODE_AHEAD=0 (each item decoded after the previous one's copies), and the
# D64 forward's consumers looking up an item's first tile pair themselves with
# DILATED_SPARSE_POST_LOOKUP=0, and every kernel without the plan's L2 prefetch at entry
# (DILATED_SPARSE_PLAN_PREFETCH=0: a hint, which must not change a bit).
@pytest.mark.parametrize(
    "kw",
    [
        {"Sq": 700, "bq": 128, "bk": 128, "density": 0.4, "causal": True, "H": 4, "Hkv": 2, "strided": True, "D": 128},
        {"Sq": 700, "bq": 128, "bk": 128, "density": 0.4, "causal": True, "H": 4, "Hkv": 2, "strided": True, "D": 64},
        {"Sq": 333, "Sk": 301, "bq": 64, "bk": 64, "density": 0.5, "use_kpm": True, "empty_rows": 0.3, "B": 2,
         "lb": 0, "D": 128},
        {"Sq": 333, "Sk": 301, "bq": 64, "bk": 64, "density": 0.5, "use_klen": True, "B": 2, "D": 64},
        {"Sq": 1000, "Sk": 900, "bq": 128, "bk": 128, "density": 0.5, "wl": 200, "H": 3, "D": 120},
        {"Sq": 700, "Sk": 650, "bq": 128, "bk": 128, "density": 0.4, "H": 4, "Hkv": 1, "D": 56},
    ],
)
def test_tma_matches_cp_async(kw, monkeypatch):
    monkeypatch.setenv("DILATED_SPARSE_BWD_SCRATCH_MB", "1024")
    monkeypatch.setenv("DILATED_SPARSE_TMA", "1")  # an error where a map does not encode (sm_90)
    r = run_case(dtype=torch.bfloat16, seed=kw["Sq"] + kw["D"], **kw)
    ops = _ops()

    def same_again(what: str) -> None:  # forward and backward once more, into poisoned memory
        poison()
        out, lse = ops.block_sparse_attn_fwd(r["q"], r["k"], r["v"], r["crow"], r["col"], *r["args"])
        poison()
        grads = bwd_again(r)
        torch.cuda.synchronize()
        for name, got in zip(("out", "lse", "dq", "dk", "dv"), (out, lse, *grads)):
            assert torch.equal(r[name], got), f"{name}: {what} differ"

    for switches, what in [
        ({"DILATED_SPARSE_TMA": "0"}, "TMA and cp.async copies"),
        ({"DILATED_SPARSE_SPLIT_PRODUCER": "0"}, "split and single producer loops"),
        ({"DILATED_SPARSE_DECODE_AHEAD": "0"}, "decoding ahead and after an item's copies"),
        ({"DILATED_SPARSE_DECODE_AHEAD": "0", "DILATED_SPARSE_POST_LOOKUP": "0"},
         "the producer's and the consumers' lookups of an item's first tile"),
        ({"DILATED_SPARSE_POST_LOOKUP": "0"}, "the consumers' lookups, decoding ahead"),
        ({"DILATED_SPARSE_PLAN_PREFETCH": "0"}, "with and without the plan prefetched into L2"),
        ({"DILATED_SPARSE_LEAN_PRODUCER": "0"}, "the forward's producer on one warp and on four"),
    ]:
        with monkeypatch.context() as m:  # each against the defaults (TMA required, as above)
            for var, value in switches.items():
                m.setenv(var, value)
            same_again(what)
    if kw["D"] in (64, 128) and torch.cuda.get_device_capability() == (9, 0) and not forced_variant():
        # read where set_tma runs (the sm_90 kernels)
        for var in ("DILATED_SPARSE_SPLIT_PRODUCER", "DILATED_SPARSE_DECODE_AHEAD", "DILATED_SPARSE_POST_LOOKUP",
                    "DILATED_SPARSE_PLAN_PREFETCH", "DILATED_SPARSE_LEAN_PRODUCER"):
            monkeypatch.setenv(var, "yes")
            with pytest.raises(RuntimeError, match=var):
                bwd_again(r)
            monkeypatch.setenv(var, "1")


# Block 64 with the default 128-row tiles (two layout rows a tile, merged key tiles with membership
# masks; edge tiles masked per row interval and eight-column group): ~3400 key tokens a row (on sm_90
# the default takes every block size since the forty-eighth session: small_tile_max_tokens).
@pytest.mark.parametrize("D", [64, 128])
def test_small_blocks_long_rows(D):
    run_case(D=D, Sq=4000, Sk=4000, bq=64, bk=64, density=0.9, H=2, empty_rows=0.05, seed=D + 5)


def test_empty_everything():
    B, H = 2, 2
    mask = torch.zeros(1, 1, 4, 4, dtype=torch.bool)
    mask[0, 0, 1, 2] = True
    r = run_case(B=B, H=H, Sq=256, Sk=256, bq=64, bk=64, mask=mask, use_klen=False)
    assert torch.isinf(r["lse"][:, :, :64]).all() and (r["out"][:, :64] == 0).all()
    assert (r["dq"][:, :64] == 0).all()


def test_weights():
    run_case(check_weights=True, Sq=200, Sk=170, bq=32, bk=64, H=3, causal=True, use_kpm=True, B=2)
    run_case(check_weights=True, Sq=130, Sk=130, bq=16, bk=16, H=2, Hkv=1, lh=0, bwd=False)
    run_case(check_weights=True, Sq=300, Sk=260, bq=128, bk=256, dtype=torch.float16, bwd=False, wl=40)


def test_caches_release_a_dropped_layouts_memory():
    """The plan and checked-index caches hold their index tensors weakly: once a layout's tensors are
    dropped, the next call frees its plan, and the device memory returns to what it was before the
    layout (an index tensor of 4 MB and its plan). With strong references the cache kept them."""
    ops = _ops()
    rules = (0.125, False, -1, -1, None, None)
    small = [torch.tensor(t, dtype=torch.int32, device=DEV) for t in ([0, 1], [0])]
    q1 = torch.randn(1, 16, 1, 64, device=DEV, dtype=torch.bfloat16)
    ops.block_sparse_attn_fwd(q1, q1, q1, *small, 16, 16, 1, 1, *rules)  # work counter, plan of `small`
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    H, nb = 64, 128  # per-head layouts, every block: nnz = 64 x 128 x 128 (a 4 MB col_indices)
    mask = torch.ones(1, H, nb, nb, dtype=torch.bool, device=DEV)
    crow, col = csr_from_mask(mask)[:2]
    q = torch.randn(1, nb * 16, H, 64, device=DEV, dtype=torch.bfloat16)
    out, lse = ops.block_sparse_attn_fwd(q, q, q, crow, col, 16, 16, 1, H, *rules)
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() > before + 4 * 2**20
    del crow, col, q, out, lse, mask
    for _ in range(2):  # the first drops the dead layout's entries; frees wait for the stream's events
        ops.block_sparse_attn_fwd(q1, q1, q1, *small, 16, 16, 1, 1, *rules)
        torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() <= before + 64 * 1024, (before, torch.cuda.memory_allocated())


def test_sizes_past_int32_are_refused():
    """The kernels hold B, S and H as int: a dim of 2^31 (a stride-0 view, no memory) is an error
    naming the sizes, before any kernel runs, not a wrapped size."""
    ops = _ops()
    one = torch.zeros(1, 1, 1, 64, device=DEV, dtype=torch.bfloat16)
    crow, col = (torch.tensor(t, dtype=torch.int32, device=DEV) for t in ([0, 1], [0]))
    big = one.expand(2**31, 1, 1, 64)
    with pytest.raises(RuntimeError, match="must each be below 2.31"):
        ops.block_sparse_attn_fwd(big, big, big, crow, col, 16, 16, 1, 1, 0.125, False, -1, -1, None, None)


def test_weights_of_more_than_65535_head_pairs():
    """The weights kernel takes (batch, head) pairs in launches of at most 65535 (the grid's y limit):
    B * H = 2 x 32800 pairs give, for heads in the first and the second launch, the weights of the
    same heads computed alone (the layout is per-batch, so both batches' slices differ)."""
    ops = _ops()
    B, H, S, D = 2, 32800, 32, 32
    g = torch.Generator(device="cpu").manual_seed(11)
    q, k = (torch.randn(B, S, H, D, generator=g).to(DEV, torch.bfloat16) for _ in range(2))
    lse = (torch.rand(B, H, S, generator=g) * 4 + 2).to(DEV)
    mask = torch.tensor([[[[1, 0], [1, 1]]], [[[0, 1], [1, 0]]]], dtype=torch.bool)
    crow, col = csr_from_mask(mask.to(DEV))[:2]
    rules = (0.2, False, -1, -1, None, None)
    w = ops.block_sparse_attn_weights(q, k, lse, crow, col, 16, 16, B, 1, 3, *rules)
    assert torch.isfinite(w).all() and w.abs().sum() > 0
    # pair b * H + h: (1, 32735) is the first of the second launch, (1, 32734) the last of the first
    for h0, h1 in ((0, 3), (32730, 32740), (H - 3, H)):
        part = ops.block_sparse_attn_weights(q[:, :, h0:h1].contiguous(), k[:, :, h0:h1].contiguous(),
                                             lse[:, h0:h1].contiguous(), crow, col, 16, 16, B, 1, 3, *rules)
        assert torch.equal(w[:, h0:h1], part), (h0, h1)


def test_plan_order_past_the_small_sort():
    """Plans of more than 4096 slice-tiles order them with at::sort (smaller ones with one kernel,
    small_order_kernel): per-head layouts over 2100 heads of two 128-token tiles each (4200 slice-tiles
    in the forward, dQ and dK/dV plans), against the reference."""
    run_case(H=2100, Hkv=700, Sq=200, Sk=190, D=64, bq=64, bk=32, lh=0, density=0.5, causal=True, seed=4)


def test_determinism():
    B, H, S = 1, 4, 1024
    nb = S // 64
    mask = band_mask(nb, 2)
    mask[0, 0, 0, :] = True
    mask[0, 0, :, 0] = True
    r = run_case(B=B, H=H, Hkv=2, Sq=S, bq=64, bk=64, mask=mask, D=128)
    ops = _ops()
    args = (r["do"],)
    q = torch.randn(B, S, H, 128, device=DEV, dtype=torch.bfloat16)
    k = torch.randn(B, S, 2, 128, device=DEV, dtype=torch.bfloat16)
    v = torch.randn_like(k)
    out, lse = ops.block_sparse_attn_fwd(q, k, v, r["crow"], r["col"], 64, 64, 1, 1, 0.1, False, -1, -1, None, None)
    g1 = ops.block_sparse_attn_bwd(args[0], q, k, v, out, lse, r["ccol"], r["rowi"], r["crow"], r["col"], 64, 64,
                                   1, 1, 0.1, False, -1, -1, None, None)
    g2 = ops.block_sparse_attn_bwd(args[0], q, k, v, out, lse, r["ccol"], r["rowi"], r["crow"], r["col"], 64, 64,
                                   1, 1, 0.1, False, -1, -1, None, None)
    for a, b in zip(g1, g2):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    "kw",
    [
        {"B": 2, "H": 2, "Sq": 1000, "bq": 64, "bk": 64, "D": 128},
        {"B": 1, "H": 4, "Hkv": 2, "Sq": 700, "Sk": 650, "bq": 32, "bk": 128, "causal": True, "use_kpm": True},
        {"B": 2, "H": 3, "Sq": 500, "bq": 128, "bk": 16, "lh": 0, "empty_rows": 0.3, "wl": 90, "dtype": torch.float16},
    ],
)
@pytest.mark.parametrize("on_device", ["0", "1"])
def test_split_rows(kw, on_device, monkeypatch):
    """Heavy rows cut into pieces merged by lse (forced with a tiny chunk): the reference's results,
    run to run bit for bit; with the plan's counts left on the device (as in a captured call: the work
    list padded to its bound) the eager plan's results bit for bit (the same pieces, merged in the
    same order)."""
    monkeypatch.setenv("DILATED_SPARSE_SPLIT_CHUNK", "2")
    monkeypatch.setenv("DILATED_SPARSE_SPLIT_ON_DEVICE", on_device)
    Sq, Sk = kw["Sq"], kw.get("Sk", kw["Sq"])
    nqb, nkb = math.ceil(Sq / kw["bq"]), math.ceil(Sk / kw["bk"])
    lh = kw["H"] if kw.get("lh", 1) != 1 else 1
    g = torch.Generator(device="cpu").manual_seed(3)
    mask = torch.rand(1, lh, nqb, nkb, generator=g) < 0.2
    mask[:, :, 0, :] = True  # a global row and column
    mask[:, :, :, 0] = True
    r1 = run_case(mask=mask, **kw)
    r2 = run_case(mask=mask, **kw)
    assert torch.equal(r1["out"], r2["out"]) and torch.equal(r1["lse"], r2["lse"])
    if on_device == "1":
        monkeypatch.setenv("DILATED_SPARSE_SPLIT_ON_DEVICE", "0")
        r3 = run_case(mask=mask, **{**kw, "bwd": False})
        assert torch.equal(r1["out"], r3["out"]) and torch.equal(r1["lse"], r3["lse"])


def test_split_switches_read_every_call(monkeypatch):
    """The forward's split switches are read on every call and key the plan cache: the same layout
    tensors, planned unsplit first (a global row of 8 blocks is within the automatic chunk), are split
    once DILATED_SPARSE_SPLIT_CHUNK asks for it (the merge kernel runs), planned on the device with
    DILATED_SPARSE_SPLIT_ON_DEVICE=1 (the same output bit for bit), and not with
    DILATED_SPARSE_SPLIT=0, with the same results each time (within fp32 merging's rounding)."""
    from torch.profiler import ProfilerActivity, profile

    # The automatic chunk is counted in the default kernel's tiles (a forced variant's may be smaller).
    monkeypatch.delenv("DILATED_SPARSE_FWD_VARIANT", raising=False)
    nb, bs, D = 8, 128, 128
    mask = band_mask(nb, 1)
    mask[0, 0, 0, :] = True
    crow, col, _, _ = csr_from_mask(mask.to(DEV))
    g = torch.Generator(device="cpu").manual_seed(8)
    q, k, v = (torch.randn(1, nb * bs - 5, 2, D, generator=g).to(DEV, torch.bfloat16) for _ in range(3))
    ops = _ops()

    def forward() -> tuple[torch.Tensor, bool]:
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            out, _ = ops.block_sparse_attn_fwd(q, k, v, crow, col, bs, bs, 1, 1, D ** -0.5, False, -1, -1, None, None)
            torch.cuda.synchronize()
        return out, any("merge_kernel" in e.name for e in prof.events())

    default_split_switches(monkeypatch)
    out0, merged0 = forward()
    monkeypatch.setenv("DILATED_SPARSE_SPLIT_CHUNK", "2")
    out1, merged1 = forward()
    monkeypatch.setenv("DILATED_SPARSE_SPLIT_ON_DEVICE", "1")
    out3, _ = forward()
    monkeypatch.setenv("DILATED_SPARSE_SPLIT", "0")
    out2, merged2 = forward()
    assert (merged0, merged1, merged2) == (False, True, False)  # (a device plan always launches the merge)
    assert torch.equal(out0, out2) and torch.equal(out1, out3)
    torch.testing.assert_close(out1, out0, atol=1e-2, rtol=1e-2)


@pytest.mark.skipif(not CUDA or torch.cuda.get_device_capability() != (9, 0), reason="the sm_90 kernels' rule")
def test_heavy_rows_split_automatically_where_they_would_outlast_the_grid(monkeypatch):
    """The automatic split (sm_90 kernels: one CTA an SM) cuts a row longer than the average work an
    SM, 8 entries and an eighth of the longest row, and leaves it whole otherwise: one global row of
    128 blocks is split at one head (into 8 pieces of 16: the outputs equal, bit for bit, those of
    DILATED_SPARSE_SPLIT_CHUNK=16) and not at 64 heads, where each SM has more than 128 entries of
    work anyway (the same layout tensors: the automatic split's plans are cached per head count);
    the same outputs as with DILATED_SPARSE_SPLIT=0 (within fp32 merging's rounding)."""
    from torch.profiler import ProfilerActivity, profile

    if forced_variant():
        pytest.skip("the chunk is counted in the default kernel's tiles (128 x 128: one a layout block)")
    nb, bs, D = 128, 128, 64
    mask = band_mask(nb, 1)
    mask[0, 0, 0, :] = True
    crow, col, _, _ = csr_from_mask(mask.to(DEV))
    entries, sms = col.numel(), torch.cuda.get_device_properties(0).multi_processor_count
    ops = _ops()
    default_split_switches(monkeypatch)  # (a device plan always launches the merge)
    for heads in (1, 64):
        chunk = max(8, -(-entries * heads // sms), -(-nb // 8))
        g = torch.Generator(device="cpu").manual_seed(heads)
        q, k, v = (torch.randn(1, nb * bs, heads, D, generator=g).to(DEV, torch.bfloat16) for _ in range(3))
        outs, merged = [], []
        for split in ("1", "0"):
            monkeypatch.setenv("DILATED_SPARSE_SPLIT", split)
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                out = ops.block_sparse_attn_fwd(q, k, v, crow, col, bs, bs, 1, 1, D ** -0.5, False, -1, -1, None, None)
                torch.cuda.synchronize()
            outs.append(out)
            merged.append(any("merge_kernel" in e.name for e in prof.events()))
        assert merged == [nb > chunk, False], (heads, chunk)
        torch.testing.assert_close(outs[0][0], outs[1][0], atol=1e-2, rtol=1e-2)
        if heads == 1:
            assert chunk == nb // 8  # the piece count's term, not the floor or the average
            monkeypatch.setenv("DILATED_SPARSE_SPLIT", "1")
            monkeypatch.setenv("DILATED_SPARSE_SPLIT_CHUNK", str(chunk))
            forced = ops.block_sparse_attn_fwd(q, k, v, crow, col, bs, bs, 1, 1, D ** -0.5, False, -1, -1, None, None)
            monkeypatch.delenv("DILATED_SPARSE_SPLIT_CHUNK")
            assert torch.equal(forced[0], outs[0][0]) and torch.equal(forced[1], outs[0][1])


@pytest.mark.skipif(not CUDA or torch.cuda.get_device_capability() != (9, 0), reason="the sm_90 kernels' rule")
def test_captured_forward_splits_heavy_rows(monkeypatch):
    """A forward captured into a CUDA graph cannot read its split plan's counts on the host, so its
    kernels read them on the device. One global row of 64 blocks at one head (longer than the automatic chunk,
    test_heavy_rows_split_automatically_where_they_would_outlast_the_grid) is split in the graph: the
    replay equals the eager split call bit for bit, whose lse differs from the unsplit call's. After
    the layout is edited in place (the global row moved to another row, the same entry count) the
    next replay plans the new rows' pieces and equals an eager call on the edited layout. Where an
    eager call on the same index tensors found no row to split, the captured call plans no split:
    its capture allocates less than one of index tensors no eager call has planned."""
    default_split_switches(monkeypatch)
    nb, bs, D = 64, 128, 64
    masks = []
    for heavy, extra in ((0, None), (5, (10, 40))):  # row 0's band holds one block fewer than row 5's
        mask = band_mask(nb, 1)
        mask[0, 0, heavy, :] = True
        if extra is not None:
            mask[0, 0, extra[0], extra[1]] = True  # so that both layouts hold as many entries
        masks.append(mask)
    layouts = [csr_from_mask(m.to(DEV))[:2] for m in masks]
    assert layouts[0][1].numel() == layouts[1][1].numel()
    crow, col = (t.clone() for t in layouts[0])
    g = torch.Generator(device="cpu").manual_seed(11)
    q, k, v = (torch.randn(1, nb * bs - 3, 1, D, generator=g).to(DEV, torch.bfloat16) for _ in range(3))
    ops = _ops()

    def fwd(c, i):
        return ops.block_sparse_attn_fwd(q, k, v, c, i, bs, bs, 1, 1, D ** -0.5, False, -1, -1, None, None)

    eager = [fwd(*layouts[0]), fwd(*layouts[1])]
    monkeypatch.setenv("DILATED_SPARSE_SPLIT", "0")
    unsplit = fwd(*layouts[0])
    monkeypatch.delenv("DILATED_SPARSE_SPLIT")
    assert not torch.equal(unsplit[1], eager[0][1])  # so that equal bits below show a split
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = fwd(crow, col)
    for which in (0, 1):
        crow.copy_(layouts[which][0])
        col.copy_(layouts[which][1])
        for t in captured:
            t.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(captured[0], eager[which][0]) and torch.equal(captured[1], eager[which][1]), which

    def capture_peak(eager_first: bool) -> tuple[int, tuple[torch.Tensor, torch.Tensor], torch.cuda.CUDAGraph]:
        band = csr_from_mask(band_mask(nb, 1).to(DEV))[:2]  # fresh index tensors, nothing to split
        if eager_first:
            fwd(*band)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.max_memory_allocated()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = fwd(*band)
        return torch.cuda.max_memory_allocated() - before, out, graph

    reference = fwd(*csr_from_mask(band_mask(nb, 1).to(DEV))[:2])
    peaks = []
    for eager_first in (False, True):
        peak, out, graph = capture_peak(eager_first)
        peaks.append(peak)
        for t in out:
            t.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out[0], reference[0]) and torch.equal(out[1], reference[1]), eager_first
    assert peaks[1] < peaks[0], peaks


def test_captured_forward_zeroes_its_work_counter_in_every_replay():
    """A captured forward's work-counter pair is memory of the graph's pool, zeroed by its plan kernel
    on every replay (no fill node of its own). Here the pool's small blocks hold large values that
    an earlier graph of the same pool wrote: a pair left unzeroed would leave every item past the
    first wave untaken (160 items), and its outputs NaN. The replays match the eager call bit for bit,
    outputs poisoned before each."""
    ops = _ops()
    H, nb, D = 8, 20, 128
    g = torch.Generator(device="cpu").manual_seed(4)
    q, k, v = (torch.randn(1, nb * 128 - 5, H, D, generator=g).to(DEV, torch.bfloat16) for _ in range(3))
    crow, col = csr_from_mask(band_mask(nb, 1).to(DEV))[:2]

    def fwd():
        return ops.block_sparse_attn_fwd(q, k, v, crow, col, 128, 128, 1, 1, 0.125, False, -1, -1, None, None)

    eager = fwd()
    dirty = torch.cuda.CUDAGraph()
    with torch.cuda.graph(dirty):  # two blocks of just under 1 MiB: the pool's small-block segment
        junk = [torch.full(((1 << 18) - 256,), 1 << 30, dtype=torch.int32, device=DEV) for _ in range(2)]
    del junk  # free within the pool: the next capture's small allocations reuse them
    dirty.replay()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=dirty.pool()):
        captured = fwd()
    for _ in range(2):
        for t in captured:
            t.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(captured[0], eager[0]) and torch.equal(captured[1], eager[1])


@pytest.mark.parametrize("bs,D", [(64, 64), (128, 128)])
def test_cuda_graph_capture(bs, D):
    """fwd + bwd captured into a CUDA graph (the backward forks dK/dV onto a side stream and joins it
    back, or at D128 block 128 on sm_90 allocates and fills the dS scratch; plans are built during
    the capture) replay bitwise to the eager results, with the graph's outputs poisoned before the
    replay. (Where the eager forward splits rows, the captured one splits them alike, planned on the
    device.)"""
    nb, H = 8, 2
    mask = band_mask(nb, 1)
    mask[0, 0, 0, :] = True
    crow, col, ccol, row = csr_from_mask(mask.to(DEV))
    g = torch.Generator(device="cpu").manual_seed(5)
    q, k, v, do = (torch.randn(1, nb * bs - 17, H, D, generator=g).to(DEV, torch.bfloat16) for _ in range(4))
    ops = _ops()
    args = (bs, bs, 1, 1, 0.125, False, -1, -1, None, None)

    def step():
        out, lse = ops.block_sparse_attn_fwd(q, k, v, crow, col, *args)
        return (out, lse, *ops.block_sparse_attn_bwd(do, q, k, v, out, lse, ccol, row, crow, col, *args))

    eager = step()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    for t in captured:
        t.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), captured, eager):
        assert torch.isfinite(a).all(), name
        assert torch.equal(a, b), name


def test_forward_work_counter_resets_itself():
    """The persistent forward takes its items from a per-stream counter that its last CTA zeroes (no fill
    kernel before it). Launches of different grids back to back on one stream, on two streams at once,
    and a captured graph replayed on a side stream beside eager calls all reproduce the eager outputs
    bit for bit, with outputs poisoned before each; the
    eager ones match the reference."""
    ops = _ops()
    g = torch.Generator(device="cpu").manual_seed(3)
    args = (128, 128, 1, 1, 0.125, False, -1, -1, None, None)
    cases = []  # (q, k, v, crow, col): 160 items (more than an H100 / H200 has SMs), 3, 320
    for H, nb, D in ((8, 20, 128), (1, 3, 64), (16, 20, 64)):
        mask = band_mask(nb, 1).to(DEV)
        q, k, v = (torch.randn(1, nb * 128 - 5, H, D, generator=g).to(DEV, torch.bfloat16) for _ in range(3))
        cases.append((q, k, v, *csr_from_mask(mask)[:2]))
        if len(cases) < 3:
            allowed = token_mask(mask, 1, H, q.shape[1], q.shape[1], 128, 128, False, -1, -1, None, None)
            ro, rl, _ = reference(q, k, v, allowed, 0.125)
            out, lse = ops.block_sparse_attn_fwd(*cases[-1], *args)
            assert rel(out, ro) < 2e-2 and (lse.double() - rl).abs().max().item() < 2e-2
            del ro, rl, allowed

    def fwd(i):
        return ops.block_sparse_attn_fwd(*cases[i], *args)

    poison()
    eager = [fwd(i) for i in range(3)]
    torch.cuda.synchronize()

    def same(got, i):
        assert torch.equal(got[0], eager[i][0]) and torch.equal(got[1], eager[i][1]), f"case {i}"

    for order in ((0, 1, 0, 2, 1, 2), (2, 2, 1, 1, 0, 0)):  # one stream, grids of every size in turn
        for i in order:
            poison()
            same(fwd(i), i)
    s1, s2 = torch.cuda.Stream(), torch.cuda.Stream()
    poison()
    torch.cuda.synchronize()
    got = {}
    for rnd in range(3):  # two streams at once, each its own counter
        with torch.cuda.stream(s1):
            got[(rnd, 1)] = (fwd(0), fwd(1))
        with torch.cuda.stream(s2):
            got[(rnd, 2)] = (fwd(2), fwd(0))
    torch.cuda.synchronize()
    for rnd in range(3):
        for stream, cases_run in ((1, (0, 1)), (2, (2, 0))):
            for res, i in zip(got[(rnd, stream)], cases_run):
                same(res, i)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = fwd(2)
    for t in captured:
        t.fill_(float("nan"))
    torch.cuda.synchronize()
    s1.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s1):
        graph.replay()  # beside the eager calls below, which use the default stream's counter
    beside = [fwd(2), fwd(0)]
    torch.cuda.synchronize()
    for res, i in ((beside[0], 2), (beside[1], 0)):
        same(res, i)
    same(captured, 2)


@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("split", [False, True])
def test_item_chunks(D, split, monkeypatch):
    """DILATED_SPARSE_ITEM_CHUNK=2|4|8 (and the default, two at rows of at most three key blocks): each claim
    but the last two waves' of the sm_90 forward, dK/dV and recompute dQ kernels takes that many consecutive
    work items (neighbouring rows or columns of one head; with split rows, one piece's heads). Every item
    must still run exactly once: out, lse, dq, dk, dv, poisoned before each call, equal the unchunked
    results bit for bit, with the settings back to back on one stream (the forward's counter resets
    itself), and the unchunked ones match the reference (two heads of sixteen). 640 items a kernel, so
    that most claims are chunks."""
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the persistent sm_90a kernels only")
    if split:
        monkeypatch.setenv("DILATED_SPARSE_SPLIT_CHUNK", "2")
    ops = _ops()
    g = torch.Generator(device="cpu").manual_seed(D + split)
    nb, H = 40, 16
    mask = band_mask(nb, 1)
    if split:
        mask[0, 0, 0, :] = True  # a global row, cut into pieces
        mask[0, 0, 5, 20:] = True
    mask = mask.to(DEV)
    crow, col, ccol, rowi = csr_from_mask(mask)
    S = nb * 128 - 5
    q, k, v, do = (torch.randn(1, S, H, D, generator=g).to(DEV, torch.bfloat16) for _ in range(4))
    args = (128, 128, 1, 1, 0.125, False, -1, -1, None, None)

    def run(chunk: str | None) -> tuple[torch.Tensor, ...]:
        if chunk is None:  # the default: two at the band's rows of three blocks
            monkeypatch.delenv("DILATED_SPARSE_ITEM_CHUNK", raising=False)
        else:
            monkeypatch.setenv("DILATED_SPARSE_ITEM_CHUNK", chunk)
        poison()
        out, lse = ops.block_sparse_attn_fwd(q, k, v, crow, col, *args)
        poison()
        grads = ops.block_sparse_attn_bwd(do, q, k, v, out, lse, ccol, rowi, crow, col, *args)
        torch.cuda.synchronize()
        return out, lse, *grads

    first = run("1")
    heads = [0, H - 1]
    allowed = token_mask(mask, 1, 2, S, S, 128, 128, False, -1, -1, None, None)
    qd, kd, vd = (t[:, :, heads].double().requires_grad_() for t in (q, k, v))
    ro, rl, _ = reference(qd, kd, vd, allowed, 0.125)
    ro.backward(do[:, :, heads].double())
    assert rel(first[0][:, :, heads], ro) < 2e-2 and (first[1][:, heads].double() - rl).abs().max().item() < 2e-2
    for name, got, ref in zip(("dq", "dk", "dv"), first[2:], (qd.grad, kd.grad, vd.grad)):
        assert rel(got[:, :, heads], ref) < 4e-2, name
    del ro, rl, allowed, qd, kd, vd
    for chunk in ("2", "4", "8", "1", None, "8", "2"):
        for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), run(chunk), first):
            assert torch.equal(a, b), f"{name}, DILATED_SPARSE_ITEM_CHUNK={chunk}"
    if forced_variant():  # the value is read where a persistent sm_90 kernel runs
        return
    monkeypatch.setenv("DILATED_SPARSE_ITEM_CHUNK", "3")
    with pytest.raises(RuntimeError, match="DILATED_SPARSE_ITEM_CHUNK"):
        ops.block_sparse_attn_fwd(q, k, v, crow, col, *args)


def test_plan_cache_sees_inplace_edits():
    """Tile plans are cached per index tensor; an in-place edit of col must not reuse a stale plan."""
    nb, bs = 6, 64
    mask = torch.zeros(1, 1, nb, nb, dtype=torch.bool)
    mask[0, 0, torch.arange(nb), torch.arange(nb)] = True
    crow, col = csr_from_mask(mask.to(DEV))[:2]
    mask2 = torch.zeros_like(mask)
    mask2[0, 0, torch.arange(nb), (torch.arange(nb) + 1) % nb] = True
    col.copy_(csr_from_mask(mask2.to(DEV))[1])  # same crow, shifted columns
    g = torch.Generator(device="cpu").manual_seed(0)
    q, k, v = (torch.randn(1, nb * bs, 2, 64, generator=g).to(DEV, torch.bfloat16) for _ in range(3))
    ops = _ops()
    args = (bs, bs, 1, 1, 0.125, False, -1, -1, None, None)
    crow0, col0 = csr_from_mask(mask.to(DEV))[:2]
    ops.block_sparse_attn_fwd(q, k, v, crow0, col0, *args)  # plan for the diagonal cached on col0
    out1, _ = ops.block_sparse_attn_fwd(q, k, v, crow, col, *args)
    col0.copy_(col)  # now col0 holds the shifted layout too: its cached plan must be dropped
    out2, _ = ops.block_sparse_attn_fwd(q, k, v, crow0, col0, *args)
    allowed = token_mask(mask2.to(DEV), 1, 2, nb * bs, nb * bs, bs, bs, False, -1, -1, None, None)
    ro, _, _ = reference(q, k, v, allowed, 0.125)
    assert rel(out1, ro) < 2e-2 and rel(out2, ro) < 2e-2


def test_flex_agreement():
    """Same block mask through FlexAttention (eager) and through our kernels: outputs and grads agree."""
    flex_mod = pytest.importorskip("torch.nn.attention.flex_attention")
    B, H, S, D, bs = 1, 2, 512, 64, 128
    nb = S // bs
    g = torch.Generator(device="cpu").manual_seed(7)
    lay = (torch.rand(nb, nb, generator=g) < 0.5) | torch.eye(nb, dtype=torch.bool)
    lay_dev = lay.to(DEV)

    def mask_mod(b, h, qi, ki):
        return lay_dev[qi // bs, ki // bs]

    bm = flex_mod.create_block_mask(mask_mod, None, None, S, S, device=DEV, BLOCK_SIZE=bs)
    q, k, v = (torch.randn(B, S, H, D, generator=g).to(DEV, torch.bfloat16).requires_grad_() for _ in range(3))
    ref = flex_mod.flex_attention(*(t.transpose(1, 2) for t in (q, k, v)), block_mask=bm).transpose(1, 2)
    do = torch.randn_like(ref)
    gref = torch.autograd.grad(ref, (q, k, v), do)
    crow, col, ccol, rowi = csr_from_mask(lay.view(1, 1, nb, nb).to(DEV))
    ops = _ops()
    a = (bs, bs, 1, 1, 1.0 / math.sqrt(D), False, -1, -1, None, None)
    out, lse = ops.block_sparse_attn_fwd(q.detach(), k.detach(), v.detach(), crow, col, *a)
    grads = ops.block_sparse_attn_bwd(do, q.detach(), k.detach(), v.detach(), out, lse, ccol, rowi, crow, col, *a)
    assert rel(out, ref.detach()) < 2e-2
    for got, exp in zip(grads, gref):
        assert rel(got, exp) < 4e-2


def test_fuzz():
    rng = random.Random(1234)
    n = int(os.environ.get("DILATED_SPARSE_FUZZ", "500"))
    sizes = [16, 32, 64, 128, 256]
    for case in range(n):
        bq, bk = rng.choice(sizes), rng.choice(sizes)
        H = rng.choice([1, 2, 4])
        kw = {
            "B": rng.choice([1, 2]), "H": H, "Hkv": rng.choice([h for h in (1, 2, 4) if H % h == 0]),
            "Sq": rng.randint(1, 400), "Sk": rng.randint(1, 400), "D": rng.choice([32, 64, 64, 128]),
            "bq": bq, "bk": bk, "dtype": rng.choice([torch.float16, torch.bfloat16]),
            "density": rng.random(), "lb": rng.choice([1, 1, 0]), "lh": rng.choice([1, 1, 0]),
            "causal": rng.random() < 0.3, "wl": rng.choice([-1, -1, rng.randint(0, 200)]),
            "wr": rng.choice([-1, -1, rng.randint(0, 200)]), "use_klen": rng.random() < 0.2,
            "use_kpm": rng.random() < 0.2, "empty_rows": rng.choice([0.0, 0.3]), "bwd": case % 2 == 0, "seed": case,
        }
        try:
            run_case(**kw)
        except AssertionError as e:
            raise AssertionError(f"fuzz case {case}: {kw}: {e}") from e


# Run-time switches of the CUDA backend that must not change a result (README: "Runtime switches").
_FUZZ_SWITCHES = {
    "DILATED_SPARSE_ITEM_CHUNK": ("1", "2", "4", "8"),
    "DILATED_SPARSE_SPLIT_CHUNK": ("1", "2", "3", "5", "8"),
    "DILATED_SPARSE_SPLIT_ON_DEVICE": ("1",),
    "DILATED_SPARSE_BWD_SCRATCH_MB": ("0", "1", "8", "64"),
    "DILATED_SPARSE_BWD_SCRATCH_CHUNKS": ("0", "1"),
    "DILATED_SPARSE_BWD_SCRATCH_TILES": ("0",),
    "DILATED_SPARSE_TMA": ("0",),
    "DILATED_SPARSE_DECODE_AHEAD": ("0",),
    "DILATED_SPARSE_POST_LOOKUP": ("0",),
    "DILATED_SPARSE_LEAN_PRODUCER": ("0",),
    "DILATED_SPARSE_SPLIT_PRODUCER": ("0",),
    "DILATED_SPARSE_PLAN_PREFETCH": ("0",),
    "DILATED_SPARSE_SM90_PAD": ("0",),
    "DILATED_SPARSE_SPLIT": ("0",),
    "DILATED_SPARSE_PLAN_CACHE": ("0",),
    "DILATED_SPARSE_BWD_STREAMS": ("1", "2"),
}


def test_fuzz_patterns(monkeypatch):
    """Layouts of the package's pattern generators, at sizes where the persistent sm_90 kernels take
    several work items a CTA (B * H * ceil(Sq / 128) forward items: ~20 to ~700, more than the ~132
    CTAs in half the cases), so that chunked claims, the next item's decode, row splits and the
    chunked dS scratch all run. Each case draws token rules, per-head / per-batch layouts, GQA and
    run-time switches, none of which may change the result beyond the dtype's tolerance.
    DILATED_SPARSE_FUZZ_PATTERNS sets the number of cases (default 100)."""
    pytest.importorskip("dilated_sparse.patterns")  # the generators random_pattern_mask draws from
    rng = random.Random(4321)
    n = int(os.environ.get("DILATED_SPARSE_FUZZ_PATTERNS", "100"))
    outer = {var: os.environ.get(var) for var in _FUZZ_SWITCHES}
    refused = 0
    for case in range(n):
        B, H = rng.choice([1, 2]), rng.choice([4, 8, 16])
        Sq = rng.randint(500, 3000)
        Sk = Sq if rng.random() < 0.7 else rng.randint(500, 3000)
        while B * H * Sq * Sk > 2.5e8:  # the fp64 reference is dense (~2 GB a [B, H, Sq, Sk] tensor)
            H //= 2
        drawn = random_pattern_mask(rng, batch=B, heads=H, seq_q=Sq, seq_k=Sk, blocks=(32, 64, 128, 128, 256),
                                    seed=case)
        if drawn is None:
            refused += 1
            continue
        name, options, (bq, bk), mask = drawn
        switches = {var: rng.choice(values) for var, values in _FUZZ_SWITCHES.items() if rng.random() < 0.3}
        for var in _FUZZ_SWITCHES:  # this case's draw, else what the caller set
            value = switches.get(var, outer[var])
            if value is None:
                monkeypatch.delenv(var, raising=False)
            else:
                monkeypatch.setenv(var, value)
        kw = {
            "B": B, "H": H, "Hkv": rng.choice([h for h in (1, 2, 4, H) if H % h == 0]), "Sq": Sq, "Sk": Sk,
            "D": rng.choice([64, 128, 64, 128, 96, 32, 256]), "bq": bq, "bk": bk,
            "dtype": rng.choice([torch.float16, torch.bfloat16]), "mask": mask,
            "lb": 1 if mask.shape[0] == 1 else 0, "lh": 1 if mask.shape[1] == 1 else 0,
            "causal": rng.random() < 0.3, "wl": rng.choice([-1, -1, rng.randint(0, 1500)]),
            "wr": rng.choice([-1, -1, rng.randint(0, 1500)]), "use_klen": rng.random() < 0.2,
            "use_kpm": rng.random() < 0.2, "bwd": case % 4 != 3, "seed": case,
        }
        try:
            run_case(**kw)
        except (AssertionError, RuntimeError) as e:  # a wrong result, or an error the case should not raise
            kw.pop("mask")
            raise AssertionError(f"pattern fuzz case {case}: {name} {options} {kw} {switches}: {e}") from e
    assert refused <= n // 10, f"the generators refused {refused} of {n} requests"


@pytest.mark.skipif(os.environ.get("DILATED_SPARSE_TEST_LARGE") != "1", reason="set DILATED_SPARSE_TEST_LARGE=1")
@pytest.mark.parametrize("D", [64, 128])
def test_64bit_offsets(D):
    """q/k/v/out of 2**31 elements (~32 GiB in all with the gradients): a diagonal layout, rows near
    the end checked against the reference. On sm_90 at D128 the backward is the dS-scratch one, in
    chunks (4 GiB of dS against the 1 GiB limit)."""
    B, H, S, bs = 1, 2048 // D, 1 << 20, 128
    nb = S // bs
    crow = torch.arange(nb + 1, dtype=torch.int32, device=DEV)
    col = torch.arange(nb, dtype=torch.int32, device=DEV)
    q = torch.randn(B, S, H, D, device=DEV, dtype=torch.bfloat16)
    k = torch.randn_like(q)
    v = torch.randn_like(q)
    ops = _ops()
    out, lse = ops.block_sparse_attn_fwd(q, k, v, crow, col, bs, bs, 1, 1, 0.1, False, -1, -1, None, None)
    do = torch.randn_like(q)
    dq, dk, dv = ops.block_sparse_attn_bwd(do, q, k, v, out, lse, crow, col, crow, col, bs, bs, 1, 1, 0.1, False,
                                           -1, -1, None, None)
    sl = slice(S - bs, S)
    qs, ks, vs = (t[:, sl].detach().double().requires_grad_() for t in (q, k, v))
    allowed = torch.ones(B, H, bs, bs, dtype=torch.bool, device=DEV)
    ro, _rl, _ = reference(qs, ks, vs, allowed, 0.1)
    ro.backward(do[:, sl].double())
    assert rel(out[:, sl], ro) < 2e-2
    assert rel(dq[:, sl], qs.grad) < 4e-2 and rel(dk[:, sl], ks.grad) < 4e-2 and rel(dv[:, sl], vs.grad) < 4e-2


if __name__ == "__main__":
    if "--small" in sys.argv:  # tiny case for compute-sanitizer
        run_case(B=2, H=4, Hkv=2, Sq=150, Sk=140, D=64, bq=32, bk=64, causal=True, use_kpm=True, check_weights=True)
        run_case(B=1, H=2, Sq=100, Sk=90, D=128, bq=64, bk=16, lh=0, wl=20)
        # head dims below their kernels' tile width: on sm_90 D200 takes the D256 wgmma kernels
        # (dK/dV in column halves), D96 the D128 ones, D24 the D32 ones (the D64 tiles, scores and
        # outputs over 32 columns), their surplus columns zero-filled
        run_case(B=1, H=2, Hkv=1, Sq=200, Sk=190, D=200, bq=128, bk=64, causal=True, use_kpm=True)
        run_case(B=1, H=2, Sq=200, Sk=190, D=96, bq=128, bk=128, causal=True)
        run_case(B=1, H=2, Sq=130, Sk=150, D=24, bq=64, bk=32, wl=40)
        # the dS-scratch backward on sm_90 (D128, block 128)
        run_case(B=1, H=4, Hkv=2, Sq=300, Sk=280, D=128, bq=128, bk=128, causal=True, use_kpm=True, density=0.7)
        # ... and for blocks below its 128 x 128 tiles (a scratch slot per dQ-plan tile pair)
        run_case(B=1, H=4, Hkv=2, Sq=300, Sk=280, D=128, bq=64, bk=64, causal=True, use_kpm=True, density=0.7)
        run_case(B=1, H=2, Sq=260, Sk=250, D=128, bq=32, bk=64, density=0.6)
        # ... in chunks: two buffers on two streams, then (one repeat's 1 MiB fills the limit) one buffer
        os.environ["DILATED_SPARSE_BWD_SCRATCH_CHUNKS"] = "1"
        run_case(B=1, H=4, Hkv=2, Sq=300, Sk=280, D=128, bq=128, bk=128, causal=True, use_kpm=True, density=0.7)
        os.environ["DILATED_SPARSE_BWD_SCRATCH_MB"] = "1"
        run_case(B=1, H=4, Hkv=2, Sq=512, D=128, bq=128, bk=128, causal=True, density=1.0)
        print("small cases ok")
