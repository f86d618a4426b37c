"""CPU kernels beyond tests/test_ops.py: every instruction-set variant, float16, head dims and
block sizes of every kind, thread-count independence, empty layouts, SDPA as a second oracle, and
the C++ argument checks that guard direct ``torch.ops`` calls."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from _helpers import random_pattern_mask

import dilated_sparse as ds
from dilated_sparse.ops import attention_forward

ROOT = Path(__file__).resolve().parent.parent
TOL = {torch.float64: 1e-9, torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 5e-3}


def qkv(b, sq, sk, h, hkv, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    tensors = [torch.randn(b, s, n, d, generator=g, dtype=torch.float64) for s, n in ((sq, h), (sk, hkv), (sk, hkv))]
    return [t.to(dtype).requires_grad_() for t in tensors]


def random_layout(sq, sk, bq, bk, p=0.5, seed=0, lh=1):
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(1, lh, -(-sq // bq), -(-sk // bk), generator=g) < p
    return ds.BlockSparseLayout.from_dense_mask(mask, block_size=(bq, bk), seq_len_q=sq, seq_len_k=sk)


def rel_err(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1.0)).item()


def check_against_reference(q, k, v, layout, tol, **kw):
    out, lse = attention_forward(q, k, v, layout, **kw)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref, ref_lse = ds.reference_attention(q64, k64, v64, layout, return_lse=True, **kw)
    assert rel_err(out, ref) <= tol, ("out", rel_err(out, ref))
    assert torch.equal(lse.isinf(), ref_lse.isinf())
    finite = ~ref_lse.isinf()
    if finite.any():  # (a layout, or rules, may leave every row empty)
        assert rel_err(lse[finite], ref_lse[finite]) <= max(tol, 2e-5)
    grad = torch.randn_like(ref)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), grad.to(out.dtype))
    rq, rk, rv = torch.autograd.grad(ref, (q64, k64, v64), grad)
    for name, a, b in (("dq", dq, rq), ("dk", dk, rk), ("dv", dv, rv)):
        assert a.dtype == q.dtype and a.shape == b.shape
        assert rel_err(a, b) <= tol, (name, rel_err(a, b))


# ------------------------------------------------------------------ instruction-set variants
ISA_SCRIPT = textwrap.dedent(
    """
    import json, torch, dilated_sparse as ds
    from dilated_sparse._extension import extension_info
    g = torch.Generator().manual_seed(3)
    mask = torch.rand(6, 5, generator=g) < 0.6
    layout = ds.BlockSparseLayout.from_dense_mask(mask, block_size=(16, 32), seq_len_q=90, seq_len_k=150)
    errs = []
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        q, k, v = (torch.randn(2, s, n, 40, generator=g, dtype=torch.float64) for s, n in ((90, 4), (150, 2), (150, 2)))
        q, k, v = (t.to(dtype).requires_grad_() for t in (q, k, v))
        out = ds.block_sparse_attention(q, k, v, layout, causal=True, window=(70, None))
        q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
        ref = ds.reference_attention(q64, k64, v64, layout, causal=True, window=(70, None))
        gr = torch.autograd.grad(out.double().square().sum(), (q, k, v))
        rr = torch.autograd.grad(ref.square().sum(), (q64, k64, v64))
        scale = lambda t: t.abs().max().clamp_min(1.0).item()
        err = max([(out.double() - ref).abs().max().item() / scale(ref)]
                  + [(a.double() - b).abs().max().item() / scale(b) for a, b in zip(gr, rr)])
        errs.append(err)
    print(json.dumps({"isa": extension_info()["cpu_isa"], "errs": errs}))
    """
)


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


@pytest.mark.parametrize("isa", ["default", "avx2", "avx512"])
def test_every_instruction_set_variant_matches_reference(isa):
    flags = _cpu_flags()
    if isa == "avx2" and not {"avx2", "fma"} <= flags:
        pytest.skip("CPU without AVX2/FMA")
    if isa == "avx512" and not {"avx512f", "avx512vl", "avx512dq", "avx512bw"} <= flags:
        pytest.skip("CPU without AVX-512")
    env = dict(os.environ, DILATED_SPARSE_CPU_ISA=isa, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", ISA_SCRIPT], check=False, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["isa"] == isa
    fp32, fp64, bf16 = result["errs"]
    assert fp32 < 2e-5 and fp64 < 1e-9 and bf16 < 3e-2, result


def test_unknown_instruction_set_is_an_error():
    """DILATED_SPARSE_CPU_ISA names a variant or is an error naming the variable (a typo must not run
    the best variant under the asked one's name)."""
    script = textwrap.dedent(
        """
        import torch, dilated_sparse as ds
        layout = ds.BlockSparseLayout.from_dense_mask(torch.ones(2, 2, dtype=torch.bool), block_size=16, seq_len_q=32, seq_len_k=32)
        q = torch.randn(1, 32, 1, 8)
        try:
            ds.block_sparse_attention(q, q, q, layout)
        except Exception as e:
            print(type(e).__name__, e)
        """
    )
    env = dict(os.environ, DILATED_SPARSE_CPU_ISA="avx-512",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", script], check=False, env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "DILATED_SPARSE_CPU_ISA must be default, avx2 or avx512, got 'avx-512'" in proc.stdout, proc.stdout


# ------------------------------------------------------------------------ shapes and dtypes
def test_float16_forward_and_backward():
    q, k, v = qkv(2, 75, 75, 2, 1, 32, torch.float16)
    layout = random_layout(75, 75, 16, 16, seed=1)
    check_against_reference(q, k, v, layout, 1e-2, causal=True)


@pytest.mark.parametrize(
    "d,bq,bk",
    [(1, 16, 16), (7, 32, 16), (64, 64, 64), (100, 128, 32), (256, 16, 256), (48, 256, 128)],
)
def test_head_dims_and_block_sizes(d, bq, bk):
    sq, sk = 300, 270  # not multiples of any block
    q, k, v = qkv(1, sq, sk, 2, 2, d, torch.float32, seed=d)
    layout = random_layout(sq, sk, bq, bk, p=0.6, seed=d)
    check_against_reference(q, k, v, layout, 5e-5, window=(100, 40))


def test_fully_dense_layout_matches_sdpa():
    """A second oracle: every block active + causal is exactly SDPA with is_causal."""
    q, k, v = qkv(2, 130, 130, 4, 2, 32, torch.float32)
    nb = -(-130 // 32)
    layout = ds.BlockSparseLayout.from_dense_mask(torch.ones(nb, nb, dtype=torch.bool), block_size=32, seq_len_q=130)
    out = ds.block_sparse_attention(q, k, v, layout, causal=True)
    kk, vv = (t.repeat_interleave(2, dim=2) for t in (k, v))
    ref = F.scaled_dot_product_attention(q.transpose(1, 2), kk.transpose(1, 2), vv.transpose(1, 2), is_causal=True)
    assert rel_err(out, ref.transpose(1, 2)) < 2e-5
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    ref_grads = torch.autograd.grad(ref.sum(), (q, k, v))
    for a, b in zip(grads, ref_grads):
        assert rel_err(a, b) < 5e-5


def test_empty_layout_gives_zeros_and_minus_inf():
    q, k, v = qkv(1, 40, 40, 2, 2, 8, torch.float32)
    layout = ds.BlockSparseLayout.from_dense_mask(torch.zeros(3, 3, dtype=torch.bool), block_size=16, seq_len_q=40)
    assert layout.nnz == 0
    out, lse = attention_forward(q, k, v, layout)
    assert torch.all(out == 0) and torch.all(lse == float("-inf"))
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    assert all(torch.all(g == 0) for g in grads)
    _, weights = ds.block_sparse_attention(q, k, v, layout, return_attention_weights=True)
    assert weights["block_values"].shape == (1, 2, 0, 16, 16)


def test_per_head_layout_with_gqa_and_all_rules():
    q, k, v = qkv(2, 64, 96, 4, 2, 16, torch.float64)
    layout = random_layout(64, 96, 16, 32, p=0.7, seed=9, lh=4)
    kpm = torch.zeros(2, 96, dtype=torch.bool)
    kpm[0, :5] = True
    kpm[1, 50:60] = True
    check_against_reference(q, k, v, layout, 1e-9, causal=True, window=(30, 10),
                            key_lengths=torch.tensor([96, 70], dtype=torch.int32), key_padding_mask=kpm)


def test_pattern_fuzz_matches_reference():
    """Layouts of the package's pattern generators (per-head where they make them, per-batch by
    dropping blocks from the second batch) with random shapes, GQA, block sizes, head dims, dtypes
    and token rules, against the float64 reference: out, lse and the three gradients, and in every
    third case the weights dict's block values.
    DILATED_SPARSE_CPU_FUZZ sets the number of cases (default 100)."""
    rng = random.Random(2024)
    n, refused = int(os.environ.get("DILATED_SPARSE_CPU_FUZZ", "100")), 0
    for case in range(n):
        B, H = rng.choice([1, 2]), rng.choice([1, 2, 4])
        Hkv = rng.choice([h for h in (1, 2, 4) if H % h == 0])
        Sq = rng.randint(20, 300)
        Sk = Sq if rng.random() < 0.6 else rng.randint(20, 300)
        drawn = random_pattern_mask(rng, batch=B, heads=H, seq_q=Sq, seq_k=Sk, blocks=(16, 32, 64, 128), scale=0.1,
                                    seed=case)
        if drawn is None:
            refused += 1
            continue
        name, options, (bq, bk), mask = drawn
        layout = ds.BlockSparseLayout.from_dense_mask(mask, block_size=(bq, bk), seq_len_q=Sq, seq_len_k=Sk)
        dtype = rng.choice([torch.float32, torch.float32, torch.float64, torch.bfloat16, torch.float16])
        q, k, v = qkv(B, Sq, Sk, H, Hkv, rng.choice([8, 16, 24, 40, 64]), dtype, seed=case)
        kw = {"causal": rng.random() < 0.3}
        if rng.random() < 0.3:
            kw["window"] = (rng.choice([None, rng.randint(0, 150)]), rng.choice([None, rng.randint(0, 150)]))
        if rng.random() < 0.2:
            kw["key_lengths"] = torch.tensor([rng.randint(0, Sk) for _ in range(B)], dtype=torch.int32)
        if rng.random() < 0.2:
            kw["key_padding_mask"] = torch.rand(B, Sk, generator=torch.Generator().manual_seed(case)) < 0.3
        tol = {torch.float64: 1e-9, torch.float32: 5e-5, torch.bfloat16: 3e-2, torch.float16: 1e-2}[dtype]
        try:
            check_against_reference(q, k, v, layout, tol, **kw)
            if case % 3 == 0:  # the weights op: block values against the reference's
                _, weights = ds.block_sparse_attention(q, k, v, layout, return_attention_weights=True, **kw)
                _, ref_w = ds.reference_attention(*(t.detach().double() for t in (q, k, v)), layout,
                                                  return_attention_weights=True, **kw)
                assert weights["block_values"].shape == ref_w["block_values"].shape, "weights shape"
                if ref_w["block_values"].numel() > 0:
                    assert rel_err(weights["block_values"], ref_w["block_values"]) <= tol, "weights"
        except AssertionError as e:
            rules = {key: (f"tensor {list(val.shape)}" if isinstance(val, torch.Tensor) else val) for key, val in kw.items()}
            raise AssertionError(f"case {case}: {name} {options} B{B} H{H}/{Hkv} {Sq}x{Sk} blocks {bq}x{bk} "
                                 f"{dtype} {rules}: {e}") from e
    assert refused <= n // 10, f"the generators refused {refused} of {n} requests"


# --------------------------------------------------------------------------- determinism
def test_results_do_not_depend_on_the_thread_count():
    q, k, v = qkv(2, 200, 200, 3, 3, 24, torch.float32)
    layout = random_layout(200, 200, 32, 16, seed=4)
    results = []
    threads = torch.get_num_threads()
    try:
        for n in (1, max(2, threads)):
            torch.set_num_threads(n)
            out = ds.block_sparse_attention(q, k, v, layout, causal=True)
            results.append((out, *torch.autograd.grad(out.square().sum(), (q, k, v))))
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*results):
        assert torch.equal(a, b)


