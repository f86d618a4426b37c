"""Sparse normalisers against the `entmax` package, and entmax/sparsemax attention against a dense float64 definition."""

from __future__ import annotations

import math

import pytest
import torch

import dilated_sparse as ds
from dilated_sparse.methods import entmax15, entmax_attention, entmax_bisect, sparsemax, sparsemax_attention


@pytest.fixture(autouse=True)
def _single_thread():
    """Tiny tensors: one intra-op thread is as fast and immune to oversubscribed CI cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


entmax = pytest.importorskip("entmax")

F64 = torch.float64


def _qkv(b: int, sq: int, sk: int, h: int, hkv: int, d: int, *, seed: int = 0, dtype: torch.dtype = F64):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, sq, h, d, generator=g, dtype=dtype)
    k = torch.randn(b, sk, hkv, d, generator=g, dtype=dtype)
    v = torch.randn(b, sk, hkv, d, generator=g, dtype=dtype)
    return q.requires_grad_(), k.requires_grad_(), v.requires_grad_()


def _allowed(b: int, h: int, sq: int, sk: int, *, causal: bool = False, key_padding_mask=None, layout=None):
    allowed = torch.ones(b, h, sq, sk, dtype=torch.bool)
    if causal:
        allowed &= torch.arange(sk).view(1, -1) <= torch.arange(sq).view(-1, 1)
    if key_padding_mask is not None:
        allowed &= ~key_padding_mask.view(b, 1, 1, sk)
    if layout is not None:  # token mask from the block mask (test-only dense expansion)
        bq, bk = layout.block_size
        blocks = layout.to_dense_mask()  # [Lb, Lh, nqb, nkb]
        tok = blocks.repeat_interleave(bq, dim=2).repeat_interleave(bk, dim=3)[:, :, :sq, :sk]
        allowed &= tok.expand(b, h, sq, sk)
    return allowed


def _dense_attention(q, k, v, allowed, normalize):
    """out = normalize(scores over allowed keys) @ v, from the definition (float64, S x S)."""
    h = q.shape[2]
    qh = q.transpose(1, 2)
    kh = k.transpose(1, 2).repeat_interleave(h // k.shape[2], dim=1)
    vh = v.transpose(1, 2).repeat_interleave(h // v.shape[2], dim=1)
    scores = qh @ kh.transpose(-1, -2) / math.sqrt(q.shape[-1])
    weights = torch.zeros_like(scores)
    rows = allowed.any(-1)
    for idx in rows.nonzero().tolist():  # row by row: the plainest definition
        b, hh, i = idx
        sel = allowed[b, hh, i]
        w = normalize(scores[b, hh, i][sel], hh)
        weights = weights.index_put((torch.tensor(b), torch.tensor(hh), torch.tensor(i), sel.nonzero()[:, 0]), w)
    return (weights @ vh).transpose(1, 2)


def _grads(out, inputs, seed=1):
    g = torch.Generator().manual_seed(seed)
    dout = torch.randn(out.shape, generator=g, dtype=out.dtype)
    return torch.autograd.grad((out * dout).sum(), inputs)


# ----------------------------------------------------------------------------- normalisers
@pytest.mark.parametrize("dim", [-1, 0, 1])
@pytest.mark.parametrize("ours,theirs", [(sparsemax, "sparsemax"), (entmax15, "entmax15")])
def test_exact_normalizers_match_entmax_package(ours, theirs, dim):
    x = torch.randn(4, 9, 5, dtype=F64, generator=torch.Generator().manual_seed(3)).requires_grad_()
    a = ours(x, dim=dim)
    b = getattr(entmax, theirs)(x, dim=dim)
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(_grads(a, [x])[0], _grads(b, [x])[0], rtol=1e-12, atol=1e-12)
    assert (a == 0).any()  # actually sparse


@pytest.mark.parametrize("alpha", [1.25, 1.5, 2.0, 3.0])
def test_entmax_bisect_matches_entmax_package(alpha):
    x = torch.randn(6, 11, dtype=F64, generator=torch.Generator().manual_seed(4)).requires_grad_()
    a = entmax_bisect(x, alpha, dim=-1)
    b = entmax.entmax_bisect(x, alpha, dim=-1)
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(_grads(a, [x])[0], _grads(b, [x])[0], rtol=1e-9, atol=1e-9)


def test_entmax_bisect_alpha_gradient_matches_package_and_gradcheck():
    x = torch.randn(5, 7, dtype=F64, generator=torch.Generator().manual_seed(5)).requires_grad_()
    alpha = torch.tensor([[1.3], [1.5], [1.7], [2.0], [2.5]], dtype=F64, requires_grad=True)
    a = entmax_bisect(x, alpha, dim=-1)
    b = entmax.entmax_bisect(x, alpha, dim=-1)
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    for ga, gb in zip(_grads(a, [x, alpha]), _grads(b, [x, alpha])):
        torch.testing.assert_close(ga, gb, rtol=1e-8, atol=1e-8)
    assert torch.autograd.gradcheck(lambda x, al: entmax_bisect(x, al, dim=-1, n_iter=80), (x, alpha))


def test_entmax_bisect_alpha_one_is_softmax():
    x = torch.randn(3, 8, dtype=F64)
    torch.testing.assert_close(entmax_bisect(x, 1.0), torch.softmax(x, -1))


@pytest.mark.parametrize("fn", [sparsemax, entmax15, lambda x, dim=-1: entmax_bisect(x, 1.7, dim=dim)])
def test_normalizers_masked_and_empty_rows(fn):
    x = torch.randn(3, 6, dtype=F64).requires_grad_()
    mask = torch.tensor([[True] * 6, [True, False, True, False, False, True], [False] * 6])
    xm = x.masked_fill(~mask, float("-inf"))
    p = fn(xm, dim=-1)
    assert torch.isfinite(p).all()
    assert (p[~mask] == 0).all() and (p[2] == 0).all()
    torch.testing.assert_close(p[:2].sum(-1), torch.ones(2, dtype=F64))
    # the masked row equals the normaliser over its allowed entries only
    torch.testing.assert_close(p[1, mask[1]], fn(x[1, mask[1]].unsqueeze(0), dim=-1)[0])
    (g,) = _grads(p, [x])
    assert torch.isfinite(g).all() and (g[2] == 0).all() and (g[~mask] == 0).all()


def test_normalizers_low_precision_inputs():
    x = torch.randn(4, 16)
    for fn, ref in ((sparsemax, entmax.sparsemax), (entmax15, entmax.entmax15)):
        out = fn(x.to(torch.bfloat16))
        assert out.dtype == torch.bfloat16
        torch.testing.assert_close(out.float(), ref(x.to(torch.bfloat16).float()), rtol=1e-2, atol=1e-2)


def test_normalizer_bad_arguments():
    with pytest.raises(ValueError, match="alpha"):
        entmax_bisect(torch.randn(3), 0.5)
    with pytest.raises(ValueError, match="n_iter"):
        entmax_bisect(torch.randn(3), 1.5, n_iter=0)
    with pytest.raises(TypeError):
        sparsemax(torch.arange(3))


# ----------------------------------------------------------------------------- attention
CASES = [
    {"b": 1, "sq": 37, "sk": 37, "h": 2, "hkv": 2, "causal": False, "pad": False},
    {"b": 2, "sq": 29, "sk": 41, "h": 4, "hkv": 2, "causal": False, "pad": True},  # GQA + padding
    {"b": 2, "sq": 33, "sk": 33, "h": 2, "hkv": 1, "causal": True, "pad": True},  # MQA + causal
]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("alpha", [1.5, 2.0, 1.3])
def test_entmax_attention_matches_dense_definition(case, alpha):
    b, sq, sk, h, hkv = case["b"], case["sq"], case["sk"], case["h"], case["hkv"]
    q, k, v = _qkv(b, sq, sk, h, hkv, 8, seed=sq)
    kpm = None
    if case["pad"]:
        kpm = torch.zeros(b, sk, dtype=torch.bool)
        kpm[0, -5:] = True
        kpm[-1, :3] = True
    allowed = _allowed(b, h, sq, sk, causal=case["causal"], key_padding_mask=kpm)
    ref = _dense_attention(q, k, v, allowed, lambda s, hh: entmax.entmax_bisect(s, alpha, dim=-1, n_iter=60))
    out = entmax_attention(q, k, v, alpha, causal=case["causal"], key_padding_mask=kpm, chunk_size=7, n_iter=60)
    torch.testing.assert_close(out, ref, rtol=1e-8, atol=1e-9)
    for a, r in zip(_grads(out, [q, k, v]), _grads(ref, [q, k, v])):
        torch.testing.assert_close(a, r, rtol=1e-7, atol=1e-8)


def test_entmax_attention_per_head_learnable_alpha():
    q, k, v = _qkv(1, 19, 19, 3, 3, 8, seed=2)
    alpha = torch.tensor([1.2, 1.5, 2.0], dtype=F64, requires_grad=True)
    out = entmax_attention(q, k, v, alpha, chunk_size=5, n_iter=60)
    allowed = _allowed(1, 3, 19, 19)
    ref = _dense_attention(q, k, v, allowed, lambda s, hh: entmax.entmax_bisect(s, alpha[hh], dim=-1, n_iter=60))
    torch.testing.assert_close(out, ref, rtol=1e-8, atol=1e-9)
    for a, r in zip(_grads(out, [q, alpha]), _grads(ref, [q, alpha])):
        torch.testing.assert_close(a, r, rtol=1e-7, atol=1e-8)


def test_sparsemax_attention_matches_dense_definition_with_layout():
    b, s, h = 2, 45, 2
    layout = ds.patterns.block_neighbour(seq_len_q=s, block_size=16)
    q, k, v = _qkv(b, s, s, h, h, 8, seed=7)
    allowed = _allowed(b, h, s, s, causal=True, layout=layout)
    ref = _dense_attention(q, k, v, allowed, lambda x, hh: entmax.sparsemax(x, dim=-1))
    out = sparsemax_attention(q, k, v, layout, causal=True, chunk_size=1)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    for a, r in zip(_grads(out, [q, k, v]), _grads(ref, [q, k, v])):
        torch.testing.assert_close(a, r, rtol=1e-9, atol=1e-10)


def test_entmax_attention_per_head_layout_and_empty_rows():
    b, s, h = 1, 40, 2
    mask = torch.zeros(1, h, 3, 3, dtype=torch.bool)
    mask[0, 0] = torch.eye(3, dtype=torch.bool)
    mask[0, 1, 0, :] = True  # head 1: block rows 1, 2 empty
    layout = ds.BlockSparseLayout.from_dense_mask(mask, block_size=16, seq_len_q=s)
    q, k, v = _qkv(b, s, s, h, h, 8, seed=8)
    allowed = _allowed(b, h, s, s, layout=layout)
    ref = _dense_attention(q, k, v, allowed, lambda x, hh: entmax.entmax15(x, dim=-1))
    out = entmax_attention(q, k, v, 1.5, layout, n_iter=60)
    torch.testing.assert_close(out, ref, rtol=1e-8, atol=1e-9)
    assert (out[0, 16:, 1] == 0).all()
    grads = _grads(out, [q, k, v])
    assert all(torch.isfinite(g).all() for g in grads)
    assert (grads[0][0, 16:, 1] == 0).all()


def test_entmax_attention_fully_masked_rows_no_nan():
    q, k, v = _qkv(2, 12, 12, 2, 2, 8)
    kpm = torch.zeros(2, 12, dtype=torch.bool)
    kpm[1] = True  # every key of batch 1 is padding
    for fn in (lambda: entmax_attention(q, k, v, 1.5, key_padding_mask=kpm),
               lambda: sparsemax_attention(q, k, v, key_padding_mask=kpm)):
        out = fn()
        assert torch.isfinite(out).all() and (out[1] == 0).all()
        grads = _grads(out, [q, k, v])
        assert all(torch.isfinite(g).all() for g in grads)
        assert (grads[0][1] == 0).all()


def test_entmax_attention_float32_and_chunking_invariance():
    q, k, v = _qkv(1, 50, 50, 2, 2, 16, dtype=torch.float32)
    a = entmax_attention(q, k, v, 1.5, chunk_size=3)
    b = entmax_attention(q, k, v, 1.5, chunk_size=50)
    assert a.dtype == torch.float32
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    ref = entmax_attention(*(t.detach().double() for t in (q, k, v)), 1.5)
    torch.testing.assert_close(a.double(), ref, rtol=1e-4, atol=1e-5)


def test_entmax_and_sparsemax_attention_bfloat16():
    q, k, v = (t.detach().to(torch.bfloat16) for t in _qkv(1, 40, 40, 2, 1, 16, seed=4))
    for fn in (lambda *a: entmax_attention(*a, alpha=1.5, causal=True), lambda *a: sparsemax_attention(*a)):
        out = fn(q, k, v)
        assert out.dtype == torch.bfloat16
        torch.testing.assert_close(out.double(), fn(q.double(), k.double(), v.double()), rtol=2e-2, atol=2e-2)
