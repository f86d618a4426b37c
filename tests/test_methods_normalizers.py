"""Sparse normalisers against the `entmax` package, and entmax/sparsemax attention against a dense float64 definition."""

from __future__ import annotations

import pytest
import torch
from _helpers import F64, allowed_mask, attn_scores, expand_heads, grads_of, random_qkv

import dilated_sparse as ds
from dilated_sparse.methods import entmax15, entmax_attention, entmax_bisect, sparsemax, sparsemax_attention

pytestmark = pytest.mark.usefixtures("single_thread")


entmax = pytest.importorskip("entmax")


def _dense_attention(q, k, v, allowed, normalize):
    """out = normalize(scores over allowed keys) @ v, from the definition (float64, S x S)."""
    vh = expand_heads(v, q.shape[2])
    scores = attn_scores(q, k)
    weights = torch.zeros_like(scores)
    rows = allowed.any(-1)
    for idx in rows.nonzero().tolist():  # row by row: the plainest definition
        b, hh, i = idx
        sel = allowed[b, hh, i]
        w = normalize(scores[b, hh, i][sel], hh)
        weights = weights.index_put((torch.tensor(b), torch.tensor(hh), torch.tensor(i), sel.nonzero()[:, 0]), w)
    return (weights @ vh).transpose(1, 2)


# ----------------------------------------------------------------------------- normalisers
@pytest.mark.parametrize("dim", [-1, 0, 1])
@pytest.mark.parametrize("ours,theirs", [(sparsemax, "sparsemax"), (entmax15, "entmax15")])
def test_exact_normalizers_match_entmax_package(ours, theirs, dim):
    x = torch.randn(4, 9, 5, dtype=F64, generator=torch.Generator().manual_seed(3)).requires_grad_()
    a = ours(x, dim=dim)
    b = getattr(entmax, theirs)(x, dim=dim)
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grads_of(a, [x])[0], grads_of(b, [x])[0], rtol=1e-12, atol=1e-12)
    assert (a == 0).any()  # actually sparse


@pytest.mark.parametrize("alpha", [1.25, 1.5, 2.0, 3.0])
def test_entmax_bisect_matches_entmax_package(alpha):
    x = torch.randn(6, 11, dtype=F64, generator=torch.Generator().manual_seed(4)).requires_grad_()
    a = entmax_bisect(x, alpha, dim=-1)
    b = entmax.entmax_bisect(x, alpha, dim=-1)
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(grads_of(a, [x])[0], grads_of(b, [x])[0], rtol=1e-9, atol=1e-9)


def test_entmax_bisect_alpha_gradient_matches_package_and_gradcheck():
    x = torch.randn(5, 7, dtype=F64, generator=torch.Generator().manual_seed(5)).requires_grad_()
    alpha = torch.tensor([[1.3], [1.5], [1.7], [2.0], [2.5]], dtype=F64, requires_grad=True)
    a = entmax_bisect(x, alpha, dim=-1)
    b = entmax.entmax_bisect(x, alpha, dim=-1)
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    for ga, gb in zip(grads_of(a, [x, alpha]), grads_of(b, [x, alpha])):
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
    (g,) = grads_of(p, [x])
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
    q, k, v = random_qkv(b, sq, sk, h, hkv, 8, seed=sq)
    kpm = None
    if case["pad"]:
        kpm = torch.zeros(b, sk, dtype=torch.bool)
        kpm[0, -5:] = True
        kpm[-1, :3] = True
    allowed = allowed_mask(b, h, sq, sk, causal=case["causal"], key_padding_mask=kpm)
    ref = _dense_attention(q, k, v, allowed, lambda s, hh: entmax.entmax_bisect(s, alpha, dim=-1, n_iter=60))
    out = entmax_attention(q, k, v, alpha, causal=case["causal"], key_padding_mask=kpm, chunk_size=7, n_iter=60)
    torch.testing.assert_close(out, ref, rtol=1e-8, atol=1e-9)
    for a, r in zip(grads_of(out, [q, k, v]), grads_of(ref, [q, k, v])):
        torch.testing.assert_close(a, r, rtol=1e-7, atol=1e-8)


def test_entmax_attention_per_head_learnable_alpha():
    q, k, v = random_qkv(1, 19, 19, 3, 3, 8, seed=2)
    alpha = torch.tensor([1.2, 1.5, 2.0], dtype=F64, requires_grad=True)
    out = entmax_attention(q, k, v, alpha, chunk_size=5, n_iter=60)
    allowed = allowed_mask(1, 3, 19, 19)
    ref = _dense_attention(q, k, v, allowed, lambda s, hh: entmax.entmax_bisect(s, alpha[hh], dim=-1, n_iter=60))
    torch.testing.assert_close(out, ref, rtol=1e-8, atol=1e-9)
    for a, r in zip(grads_of(out, [q, alpha]), grads_of(ref, [q, alpha])):
        torch.testing.assert_close(a, r, rtol=1e-7, atol=1e-8)


def test_sparsemax_attention_matches_dense_definition_with_layout():
    b, s, h = 2, 45, 2
    layout = ds.patterns.block_neighbour(seq_len_q=s, block_size=16)
    q, k, v = random_qkv(b, s, s, h, h, 8, seed=7)
    allowed = allowed_mask(b, h, s, s, causal=True, layout=layout)
    ref = _dense_attention(q, k, v, allowed, lambda x, hh: entmax.sparsemax(x, dim=-1))
    out = sparsemax_attention(q, k, v, layout, causal=True, chunk_size=1)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    for a, r in zip(grads_of(out, [q, k, v]), grads_of(ref, [q, k, v])):
        torch.testing.assert_close(a, r, rtol=1e-9, atol=1e-10)


def test_entmax_attention_per_head_layout_and_empty_rows():
    b, s, h = 1, 40, 2
    mask = torch.zeros(1, h, 3, 3, dtype=torch.bool)
    mask[0, 0] = torch.eye(3, dtype=torch.bool)
    mask[0, 1, 0, :] = True  # head 1: block rows 1, 2 empty
    layout = ds.BlockSparseLayout.from_dense_mask(mask, block_size=16, seq_len_q=s)
    q, k, v = random_qkv(b, s, s, h, h, 8, seed=8)
    allowed = allowed_mask(b, h, s, s, layout=layout)
    ref = _dense_attention(q, k, v, allowed, lambda x, hh: entmax.entmax15(x, dim=-1))
    out = entmax_attention(q, k, v, 1.5, layout, n_iter=60)
    torch.testing.assert_close(out, ref, rtol=1e-8, atol=1e-9)
    assert (out[0, 16:, 1] == 0).all()
    grads = grads_of(out, [q, k, v])
    assert all(torch.isfinite(g).all() for g in grads)
    assert (grads[0][0, 16:, 1] == 0).all()


def test_entmax_attention_fully_masked_rows_no_nan():
    q, k, v = random_qkv(2, 12, 12, 2, 2, 8)
    kpm = torch.zeros(2, 12, dtype=torch.bool)
    kpm[1] = True  # every key of batch 1 is padding
    for fn in (lambda: entmax_attention(q, k, v, 1.5, key_padding_mask=kpm),
               lambda: sparsemax_attention(q, k, v, key_padding_mask=kpm)):
        out = fn()
        assert torch.isfinite(out).all() and (out[1] == 0).all()
        grads = grads_of(out, [q, k, v])
        assert all(torch.isfinite(g).all() for g in grads)
        assert (grads[0][1] == 0).all()


def test_entmax_attention_float32_and_chunking_invariance():
    q, k, v = random_qkv(1, 50, 50, 2, 2, 16, dtype=torch.float32)
    a = entmax_attention(q, k, v, 1.5, chunk_size=3)
    b = entmax_attention(q, k, v, 1.5, chunk_size=50)
    assert a.dtype == torch.float32
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    ref = entmax_attention(*(t.detach().double() for t in (q, k, v)), 1.5)
    torch.testing.assert_close(a.double(), ref, rtol=1e-4, atol=1e-5)


def test_entmax_and_sparsemax_attention_bfloat16():
    q, k, v = (t.detach().to(torch.bfloat16) for t in random_qkv(1, 40, 40, 2, 1, 16, seed=4))
    for fn in (lambda *a: entmax_attention(*a, alpha=1.5, causal=True), lambda *a: sparsemax_attention(*a)):
        out = fn(q, k, v)
        assert out.dtype == torch.bfloat16
        torch.testing.assert_close(out.double(), fn(q.double(), k.double(), v.double()), rtol=2e-2, atol=2e-2)
