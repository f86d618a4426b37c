"""Pattern generators against small brute-force definitions, written independently here.

Token-defined patterns are checked against the exact block cover of a token mask built with
broadcasting; block/grid-defined patterns against loops over blocks. Causal handling, target
densities, per-head/union/intersection, the registry, option errors and a 1M-token build
without any ``nqb x nkb`` allocation are covered too. None of this needs the compiled extension.
"""

from __future__ import annotations

import math
import time

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import dilated_sparse.patterns as P
from dilated_sparse.layout import BlockSparseLayout
from dilated_sparse.patterns import registry

# ------------------------------------------------------------------------------- helpers
GEOMETRIES = [  # (seq_len_q, seq_len_k, block_size): odd lengths, bq != bk, Sq != Sk, one block
    (300, 300, 16),
    (250, 333, (16, 32)),
    (333, 250, (32, 16)),
    (17, 40, 16),
]


def bs_pair(block_size):
    return (block_size, block_size) if isinstance(block_size, int) else tuple(block_size)


def nblocks(sq, sk, block_size):
    bq, bk = bs_pair(block_size)
    return -(-sq // bq), -(-sk // bk)


def mask_of(layout: BlockSparseLayout) -> torch.Tensor:
    """[nqb, nkb] bool for a shared layout."""
    assert layout.layout_shape == (1, 1)
    return layout.to_dense_mask()[0, 0]


def token_cover(rule, sq, sk, block_size) -> torch.Tensor:
    """Block (qb, kb) is active iff some token pair (i, j) inside it satisfies ``rule``."""
    bq, bk = bs_pair(block_size)
    nqb, nkb = nblocks(sq, sk, block_size)
    i = torch.arange(sq)[:, None]
    j = torch.arange(sk)[None, :]
    m = torch.as_tensor(rule(i, j)).expand(sq, sk)
    padded = torch.zeros(nqb * bq, nkb * bk, dtype=torch.bool)
    padded[:sq, :sk] = m
    return padded.view(nqb, bq, nkb, bk).any(dim=3).any(dim=1)


def causal_blocks(sq, sk, block_size) -> torch.Tensor:
    """Blocks whose first key token is <= the last query token of the block (loops)."""
    bq, bk = bs_pair(block_size)
    nqb, nkb = nblocks(sq, sk, block_size)
    return torch.tensor([[kb * bk <= min((qb + 1) * bq, sq) - 1 for kb in range(nkb)] for qb in range(nqb)])


def grid_blocks(sq, sk, block_size, cell_rule) -> torch.Tensor:
    """Block patterns on the grid of max(bq, bk)-token cells: loops over layout blocks."""
    bq, bk = bs_pair(block_size)
    unit = max(bq, bk)
    nqb, nkb = nblocks(sq, sk, block_size)
    nq_cells, nk_cells = -(-sq // unit), -(-sk // unit)
    return torch.tensor([[bool(cell_rule(qb * bq // unit, kb * bk // unit, nq_cells, nk_cells))
                          for kb in range(nkb)] for qb in range(nqb)])


def row_sets(layout: BlockSparseLayout, slice_index: int = 0) -> list[list[int]]:
    nqb = layout.num_query_blocks
    crow = layout.crow_indices.tolist()
    col = layout.col_indices.tolist()
    base = slice_index * nqb
    return [col[crow[base + r]: crow[base + r + 1]] for r in range(nqb)]


def check_even_fill(counts: list[int], caps: list[int]) -> None:
    """Counts spread as evenly as capacities allow: every row has min(cap, top - 1) or more."""
    top = max(counts)
    for k, cap in zip(counts, caps):
        assert k <= cap
        assert k >= min(cap, top - 1), (counts, caps)


def caps_of(sq, sk, block_size, causal):
    nqb, nkb = nblocks(sq, sk, block_size)
    if not causal:
        return [nkb] * nqb
    return causal_blocks(sq, sk, block_size).sum(dim=1).tolist()


# ------------------------------------------------------------------ token-defined patterns
@pytest.mark.parametrize("sq,sk,bs", GEOMETRIES)
@pytest.mark.parametrize("ws", [0, 1, 50, 100])
def test_local_window_matches_token_rule(sq, sk, bs, ws):
    lay = P.local_window(seq_len_q=sq, seq_len_k=sk, block_size=bs, window_size=ws)
    want = token_cover(lambda i, j: (i - j).abs() <= ws // 2, sq, sk, bs)
    assert torch.equal(mask_of(lay), want)
    assert (lay.seq_len_q, lay.seq_len_k, lay.block_size) == (sq, sk, bs_pair(bs))
    causal = P.local_window(seq_len_q=sq, seq_len_k=sk, block_size=bs, window_size=ws, causal=True)
    # for a window the causal block filter is the exact cover of the causal token rule
    exact = token_cover(lambda i, j: ((i - j).abs() <= ws // 2) & (j <= i), sq, sk, bs)
    assert torch.equal(mask_of(causal), want & causal_blocks(sq, sk, bs))
    assert torch.equal(mask_of(causal), exact)


@pytest.mark.parametrize("window", [(40, 0), (0, 40), (None, 10), (10, None), (None, None)])
def test_local_window_asymmetric(window):
    sq, sk, bs = 250, 333, (16, 32)
    lay = P.local_window(seq_len_q=sq, seq_len_k=sk, block_size=bs, window=window)
    left = math.inf if window[0] is None else window[0]
    right = math.inf if window[1] is None else window[1]
    want = token_cover(lambda i, j: (j - i >= -left) & (j - i <= right), sq, sk, bs)
    assert torch.equal(mask_of(lay), want)


def test_local_window_aliases_and_default():
    a = P.local_window(seq_len_q=2000, block_size=64, window_size=256)
    b = P.local_window(seq_len_q=2000, block_size=64, local_window_size=256)
    assert a.equal(b)
    default = P.local_window(seq_len_q=2000, block_size=64)
    assert default.equal(P.local_window(seq_len_q=2000, block_size=64, window_size=512))


@pytest.mark.parametrize("sq,sk,bs", GEOMETRIES)
@pytest.mark.parametrize("g,ws", [(0, 32), (20, 32), (70, 0)])
def test_global_local_matches_token_rule(sq, sk, bs, g, ws):
    want = token_cover(lambda i, j: (i < g) | (j < g) | ((i - j).abs() <= ws // 2), sq, sk, bs)
    for causal in (False, True):
        lay = P.global_local(seq_len_q=sq, seq_len_k=sk, block_size=bs, global_tokens=g, window_size=ws,
                             causal=causal)
        assert torch.equal(mask_of(lay), want & causal_blocks(sq, sk, bs) if causal else want)


@pytest.mark.parametrize("sq,sk,bs", GEOMETRIES[:3])
@pytest.mark.parametrize("causal", [False, True])
def test_longformer_matches_token_rule(sq, sk, bs, causal):
    extra = [5, 200]
    lay = P.longformer(seq_len_q=sq, seq_len_k=sk, block_size=bs, attention_window=48, global_tokens=1,
                       global_indices=extra, causal=causal)
    glob = torch.zeros(max(sq, sk), dtype=torch.bool)
    glob[0] = True
    glob[extra] = True

    def rule(i, j):
        return glob[i] | glob[j] | ((i - j).abs() <= 24)

    want = token_cover(rule, sq, sk, bs)
    if causal:
        want &= causal_blocks(sq, sk, bs)
    assert torch.equal(mask_of(lay), want)


@pytest.mark.parametrize("sq,sk,bs", GEOMETRIES)
@pytest.mark.parametrize("ctx", [1, 7, 40, 90])
def test_sparse_transformer_local_and_strided(sq, sk, bs, ctx):
    for causal in (False, True):
        local = P.make_layout("local", seq_len_q=sq, seq_len_k=sk, blocksize=bs, local_attn_ctx=ctx, causal=causal)
        strided = P.make_layout("strided", seq_len_q=sq, seq_len_k=sk, block_size=bs, local_attn_ctx=ctx,
                                causal=causal)

        def causal_rule(i, j, causal=causal):
            return (j <= i) if causal else torch.ones((), dtype=torch.bool)

        # the exact covers of the original token rules (causal: the OpenAI masks themselves)
        want_local = token_cover(lambda i, j: ((i - j).abs() < ctx) & causal_rule(i, j), sq, sk, bs)
        want_strided = token_cover(lambda i, j: ((i - j) % ctx == 0) & causal_rule(i, j), sq, sk, bs)
        assert torch.equal(mask_of(local), want_local)
        assert torch.equal(mask_of(strided), want_strided)


@pytest.mark.parametrize("sq,sk,bs,ctx", [(33, 33, 32, 32), (65, 70, (32, 16), 17), (47, 33, (16, 32), 31)])
def test_sparse_transformer_strided_corner_cases(sq, sk, bs, ctx):
    # partial last blocks where the only admissible offset i - j sits at an end of the range
    lay = P.sparse_transformer_strided(seq_len_q=sq, seq_len_k=sk, block_size=bs, local_attn_ctx=ctx)
    assert torch.equal(mask_of(lay), token_cover(lambda i, j: (i - j) % ctx == 0, sq, sk, bs))


def test_sparse_transformer_all_is_dense():
    for causal in (False, True):
        lay = P.make_layout("all", seq_len_q=250, seq_len_k=333, block_size=(32, 16), causal=causal)
        want = torch.ones(8, 21, dtype=torch.bool)
        if causal:
            want = token_cover(lambda i, j: j <= i, 250, 333, (32, 16))
        assert torch.equal(mask_of(lay), want)
        assert lay.equal(P.dense(seq_len_q=250, seq_len_k=333, block_size=(32, 16), causal=causal))


def test_sparse_transformer_blocksize_conflict():
    with pytest.raises(ValueError, match="block_size"):
        P.sparse_transformer_local(seq_len_q=64, block_size=16, blocksize=32, local_attn_ctx=4)


@pytest.mark.parametrize("sq,sk,bs", [(700, 700, 16), (600, 520, (32, 16)), (300, 410, (16, 64))])
@pytest.mark.parametrize("causal", [False, True])
def test_hierarchical_matches_definition(sq, sk, bs, causal):
    levels = [
        {"stride": 1, "window_size": 40, "block_size": 8},
        {"stride": 47, "window_size": 100, "block_size": 16},  # 47, 95, ... end 16-token blocks
        {"stride": 96, "window_size": 200, "block_size": 64},
        {"stride": 320, "window_size": -1, "block_size": 128},
    ]
    lay = P.hierarchical(seq_len_q=sq, seq_len_k=sk, block_size=bs, levels=levels, causal=causal)
    bq, _ = bs_pair(bs)
    nqb, nkb = nblocks(sq, sk, bs)
    want = torch.zeros(nqb, nkb, dtype=torch.bool)
    for level in levels:
        stride, w, g = level["stride"], level["window_size"], level["block_size"]
        # a query block takes part iff it holds a multiple of the stride
        part = torch.tensor([any(t % stride == 0 for t in range(qb * bq, min((qb + 1) * bq, sq)))
                             for qb in range(nqb)])
        if w < 0:
            cover = torch.ones(nqb, nkb, dtype=torch.bool)
        else:
            # key j is seen iff its g-aligned chunk meets [i - w//2, i + w//2]
            cover = token_cover(lambda i, j, w=w, g=g: ((i - w // 2) // g <= j // g) & (j // g <= (i + w // 2) // g),
                                sq, sk, bs)
        want |= cover & part[:, None]
    if causal:
        want &= causal_blocks(sq, sk, bs)
    assert torch.equal(mask_of(lay), want)
    assert lay.equal(P.hierarchical(seq_len_q=sq, seq_len_k=sk, block_size=bs, level_configs=levels, causal=causal))


def test_hierarchical_default_levels():
    lay = P.hierarchical(seq_len_q=4096, block_size=64)
    m = mask_of(lay)
    # default: every block sees +-128 tokens (stride 64), block rows at multiples of 1024 see all
    assert bool(m[16].all()) and bool(m[0].all())
    assert int(m[1].sum()) < 64
    assert lay.equal(P.hierarchical(seq_len_q=4096, block_size=64, levels=list(P.DEFAULT_HIERARCHICAL_LEVELS)))


# -------------------------------------------------------------------- grid/block patterns
@pytest.mark.parametrize("sq,sk,bs", GEOMETRIES)
@pytest.mark.parametrize("radius", [0, 1, 3])
def test_block_neighbour(sq, sk, bs, radius):
    lay = P.block_neighbour(seq_len_q=sq, seq_len_k=sk, block_size=bs, radius=radius)
    assert torch.equal(mask_of(lay), grid_blocks(sq, sk, bs, lambda p, q, nq, nk: abs(p - q) <= radius))
    causal = P.block_neighbour(seq_len_q=sq, seq_len_k=sk, block_size=bs, radius=radius, causal=True)
    assert torch.equal(mask_of(causal), mask_of(lay) & causal_blocks(sq, sk, bs))


def test_block_neighbour_is_i_minus_1_i_i_plus_1():
    m = mask_of(P.block_neighbour(seq_len_q=6 * 32, block_size=32))
    for i in range(6):
        assert torch.nonzero(m[i]).view(-1).tolist() == [j for j in (i - 1, i, i + 1) if 0 <= j < 6]


@pytest.mark.parametrize("sq,sk,bs", GEOMETRIES)
@pytest.mark.parametrize("size", [None, 1, 4])
def test_butterfly(sq, sk, bs, size):
    lay = P.butterfly(seq_len_q=sq, seq_len_k=sk, block_size=bs, butterfly_size=size)

    def rule(p, q, nq, nk):
        n = size if size is not None else 1 << (max(nq, nk) - 1).bit_length()  # next power of two
        x = p ^ q
        return x == 0 or (x & (x - 1) == 0 and x < n)  # i and i XOR 2**s, 2**s < n

    assert torch.equal(mask_of(lay), grid_blocks(sq, sk, bs, rule))


def test_butterfly_connects_in_log_hops():
    m = mask_of(P.butterfly(seq_len_q=16 * 16, block_size=16)).float()
    assert torch.equal(m.sum(dim=1), torch.full((16,), 5.0))  # 1 + log2(16)
    assert torch.equal(m, m.T)
    reach = torch.linalg.matrix_power(m, 4)
    assert bool((reach > 0).all())


def _bigbird_rule(ng, w):
    return lambda p, q, nq, nk: abs(p - q) <= w // 2 or p < ng or q < ng


@pytest.mark.parametrize("sq,sk,bs", GEOMETRIES)
@pytest.mark.parametrize("ng,w", [(1, 3), (2, 5), (0, 1)])
def test_bigbird_structure(sq, sk, bs, ng, w):
    lay = P.bigbird(seq_len_q=sq, seq_len_k=sk, block_size=bs, num_global_blocks=ng,
                    num_sliding_window_blocks=w, num_random_blocks=0)
    assert torch.equal(mask_of(lay), grid_blocks(sq, sk, bs, _bigbird_rule(ng, w)))


@pytest.mark.parametrize("causal", [False, True])
def test_bigbird_random_blocks(causal):
    sq, bs, nrand = 40 * 16, 16, 3
    kw = {"seq_len_q": sq, "block_size": bs, "num_global_blocks": 1, "num_sliding_window_blocks": 3, "causal": causal}
    base = mask_of(P.bigbird(num_random_blocks=0, **kw))
    lay = P.bigbird(num_random_blocks=nrand, seed=7, **kw)
    m = mask_of(lay)
    assert bool((m >= base).all())
    caps = causal_blocks(sq, sq, bs) if causal else torch.ones_like(m)
    assert not bool((m & ~caps).any())
    extra = (m & ~base).sum(dim=1)
    assert int(extra.max()) <= nrand and int(extra.sum()) > 0
    assert lay.equal(P.bigbird(num_random_blocks=nrand, seed=7, **kw))  # seeded
    assert not lay.equal(P.bigbird(num_random_blocks=nrand, seed=8, **kw))
    heads = P.bigbird(num_random_blocks=nrand, seed=7, num_heads=3, different_layout_per_head=True, **kw)
    assert heads.layout_shape == (1, 3)
    hm = heads.to_dense_mask()[0]
    for h in range(3):  # head h draws with seed + h
        assert torch.equal(hm[h], mask_of(P.bigbird(num_random_blocks=nrand, seed=7 + h, **kw)))
    assert not torch.equal(hm[0], hm[1])
    assert P.bigbird(attention="unidirectional", num_random_blocks=0, seq_len_q=sq, block_size=bs).equal(
        P.bigbird(causal=True, num_random_blocks=0, seq_len_q=sq, block_size=bs))


def _fixed_rule(nl, ng, horizontal, shift=0):
    def global_cells(n):
        first = nl - (1 + shift) * ng
        end = n - n % nl
        starts = list(range(first, end, nl))
        if end < n:
            starts.append(max(0, min(end + first, n - ng)))
        return {s + t for s in starts for t in range(ng) if s + t < n}

    def rule(p, q, nq, nk):
        if p // nl == q // nl:
            return True
        if q in global_cells(nk):
            return True
        return horizontal and p in global_cells(nq)

    return rule


@pytest.mark.parametrize("sq,sk,bs", GEOMETRIES + [(16 * 22, 16 * 22, 16)])
@pytest.mark.parametrize("nl,ng,horizontal", [(4, 1, False), (4, 2, True), (3, 1, True), (1, 1, False)])
def test_fixed(sq, sk, bs, nl, ng, horizontal):
    lay = P.fixed(seq_len_q=sq, seq_len_k=sk, block_size=bs, num_local_blocks=nl, num_global_blocks=ng,
                  horizontal_global_attention=horizontal)
    assert torch.equal(mask_of(lay), grid_blocks(sq, sk, bs, _fixed_rule(nl, ng, horizontal)))
    if not horizontal:
        uni = P.fixed(seq_len_q=sq, seq_len_k=sk, block_size=bs, num_local_blocks=nl, num_global_blocks=ng,
                      attention="unidirectional")
        assert torch.equal(mask_of(uni), mask_of(lay) & causal_blocks(sq, sk, bs))


def test_fixed_different_global_patterns_per_head():
    sq, bs = 16 * 24, 16
    lay = P.fixed(seq_len_q=sq, block_size=bs, num_local_blocks=6, num_global_blocks=2,
                  num_different_global_patterns=3, num_heads=4, different_layout_per_head=True)
    assert lay.layout_shape == (1, 4)
    masks = lay.to_dense_mask()[0]
    for h in range(4):
        assert torch.equal(masks[h], grid_blocks(sq, sq, bs, _fixed_rule(6, 2, False, shift=h % 3)))
    assert not torch.equal(masks[0], masks[1]) and torch.equal(masks[0], masks[3])


def _variable_rule(sizes, globals_, horizontal):
    def window(p):
        start = 0
        for s in sizes:
            if p < start + s:
                return start
            start += s
        last = sizes[-1]
        return start + (p - start) // last * last

    def rule(p, q, nq, nk):
        return window(p) == window(q) or q in globals_ or (horizontal and p in globals_)

    return rule


@pytest.mark.parametrize("sq,sk,bs", GEOMETRIES)
@pytest.mark.parametrize("horizontal", [False, True])
def test_variable(sq, sk, bs, horizontal):
    sizes, starts, ends = [1, 2, 3], [0, 5], [2, 7]
    lay = P.variable(seq_len_q=sq, seq_len_k=sk, block_size=bs, local_window_blocks=sizes,
                     global_block_indices=starts, global_block_end_indices=ends,
                     horizontal_global_attention=horizontal)
    globals_ = {0, 1, 5, 6}
    assert torch.equal(mask_of(lay), grid_blocks(sq, sk, bs, _variable_rule(sizes, globals_, horizontal)))


def test_variable_random_blocks():
    kw = {"seq_len_q": 30 * 16, "block_size": 16, "local_window_blocks": [4], "global_block_indices": [0]}
    base = mask_of(P.variable(**kw))
    m = mask_of(P.variable(num_random_blocks=2, seed=3, **kw))
    assert bool((m >= base).all())
    assert int((m & ~base).sum(dim=1).max()) <= 2 and int((m & ~base).sum()) > 0
    assert torch.equal(m, mask_of(P.variable(num_random_blocks=2, seed=3, **kw)))
    causal = mask_of(P.variable(num_random_blocks=2, seed=3, causal=True, **kw))
    assert not bool((causal & ~causal_blocks(30 * 16, 30 * 16, 16)).any())


def test_grid_patterns_expand_cells_for_unequal_blocks():
    """With bq != bk, a grid pattern is the bq == bk pattern at max(bq, bk) split into blocks."""
    specs = [
        ("block_neighbour", {"radius": 2}),
        ("butterfly", {}),
        ("fixed", {"num_local_blocks": 3}),
        ("variable", {"local_window_blocks": [2, 3]}),
        ("bigbird", {"num_random_blocks": 0, "num_global_blocks": 2}),
        ("dilated_sparse", {"segment_lengths": [128, 256], "dilation_rates": [1, 3]}),
    ]
    sq, sk = 700, 520
    for name, opts in specs:
        coarse = mask_of(P.make_layout(name, seq_len_q=sq, seq_len_k=sk, block_size=64, **opts))
        for bs in [(16, 64), (64, 32)]:
            fine = mask_of(P.make_layout(name, seq_len_q=sq, seq_len_k=sk, block_size=bs, **opts))
            bq, bk = bs
            for qb in range(fine.shape[0]):
                for kb in range(fine.shape[1]):
                    assert bool(fine[qb, kb]) == bool(coarse[qb * bq // 64, kb * bk // 64]), (name, bs, qb, kb)


# ----------------------------------------------------------------------------- LongNet
def _dilated_blocks(nq, nk, segs, rates, head=None):
    want = torch.zeros(nq, nk, dtype=torch.bool)
    for s, r in zip(segs, rates):
        for p in range(nq):
            a = p // s * s
            if head is not None and (p - a) % r != head % r:
                continue
            for q in range(a, min(a + s, nk)):
                if (q - p) % r == 0:
                    want[p, q] = True
    return want


@pytest.mark.parametrize("sq,sk", [(1000, 1000), (900, 1111), (1111, 900)])
@pytest.mark.parametrize("causal", [False, True])
def test_dilated_sparse_matches_longnet_blocks(sq, sk, causal):
    bs, segs_tok, rates = 32, [150, 256, 700], [1, 2, 4]  # segments need not be whole blocks
    lay = P.dilated_sparse(seq_len_q=sq, seq_len_k=sk, block_size=bs, segment_lengths=segs_tok,
                           dilation_rates=rates, causal=causal)
    nq, nk = nblocks(sq, sk, bs)
    want = _dilated_blocks(nq, nk, [s // bs for s in segs_tok], rates)
    if causal:
        want &= causal_blocks(sq, sk, bs)
    assert torch.equal(mask_of(lay), want)


def test_dilated_sparse_per_head_offsets():
    sq, bs, segs_tok, rates = 1024, 32, [256, 512], [2, 4]
    H = 4
    lay = P.dilated_sparse(seq_len_q=sq, block_size=bs, segment_lengths=segs_tok, dilation_rates=rates,
                           num_heads=H, different_layout_per_head=True)
    assert lay.layout_shape == (1, H)
    masks = lay.to_dense_mask()[0]
    segs = [s // bs for s in segs_tok]
    for h in range(H):
        assert torch.equal(masks[h], _dilated_blocks(32, 32, segs, rates, head=h))
    # the shared layout is the union over the heads' offsets
    shared = P.dilated_sparse(seq_len_q=sq, block_size=bs, segment_lengths=segs_tok, dilation_rates=rates)
    assert torch.equal(mask_of(shared), masks.any(dim=0))
    # num_heads alone keeps one shared layout
    assert P.dilated_sparse(seq_len_q=sq, block_size=bs, segment_lengths=segs_tok, dilation_rates=rates,
                            num_heads=H).equal(shared)


def test_dilated_sparse_defaults():
    lay = P.dilated_sparse(seq_len_q=64 * 64, block_size=64)
    segs = [min(64, 4 * r) for r in (1, 2, 4, 8)]
    assert torch.equal(mask_of(lay), _dilated_blocks(64, 64, segs, [1, 2, 4, 8]))
    assert lay.density < 0.25
    seg_only = P.dilated_sparse(seq_len_q=64 * 64, block_size=64, segment_lengths=[512, 1024])
    assert torch.equal(mask_of(seg_only), _dilated_blocks(64, 64, [8, 16], [1, 2]))
    # segments shorter than a block count as one block; lengths need not divide the sequence
    tiny = P.dilated_sparse(seq_len_q=100, block_size=16, segment_lengths=[8], dilation_rates=[1])
    assert torch.equal(mask_of(tiny), torch.eye(7, dtype=torch.bool))


@pytest.mark.parametrize("ratio", [0.05, 0.1, 0.25, 0.45])
@pytest.mark.parametrize("causal", [False, True])
def test_dilated_sparse_target(ratio, causal):
    sq, sk, bs, rates = 2000, 1800, 32, [1, 2, 4, 8]
    lay = P.dilated_sparse(seq_len_q=sq, seq_len_k=sk, block_size=bs, sparsity_ratio=ratio,
                           dilation_rates=rates, causal=causal)
    nq, nk = nblocks(sq, sk, bs)
    assert lay.nnz == round(ratio * nq * nk)
    assert lay.density == pytest.approx(ratio, abs=0.5 / (nq * nk))
    rows = row_sets(lay)
    check_even_fill([len(r) for r in rows], caps_of(sq, sk, bs, causal))
    allowed = causal_blocks(sq, sk, bs) if causal else torch.ones(nq, nk, dtype=torch.bool)
    # blocks at few dilation steps first: a row with room for them holds the diagonal and
    # its +-1, +-2, +-4, +-8 neighbours (those that exist and are allowed)
    for qb, cols in enumerate(rows):
        assert all(allowed[qb, c] for c in cols)
        first_ring = {qb + d for d in (0, 1, -1, 2, -2, 4, -4, 8, -8)}
        first_ring = {c for c in first_ring if 0 <= c < nk and allowed[qb, c]}
        if len(cols) >= len(first_ring):
            assert first_ring <= set(cols), (qb, cols)
    same = P.make_layout("dilated_sparse", seq_len_q=sq, seq_len_k=sk, block_size=bs, density=ratio,
                         dilation_rates=rates, causal=causal)
    assert lay.equal(same)


# -------------------------------------------------------------------------- target density
def _nearest(qb, k, sq, sk, bs, causal):
    """The k key blocks nearest query block qb by token gap, ties to the past, then by column."""
    bq, bk = bs_pair(bs)
    _, nk = nblocks(sq, sk, bs)
    qs, qe = qb * bq, min((qb + 1) * bq, sq) - 1
    limit = min(qe // bk, nk - 1) if causal else nk - 1

    def key(c):
        ks, ke = c * bk, min((c + 1) * bk, sk) - 1
        if ks > qe:
            return (ks - qe, 1, c)
        return (max(0, qs - ke), 0, c)

    return sorted(sorted(range(limit + 1), key=key)[:k])


@pytest.mark.parametrize("sq,sk,bs", GEOMETRIES[:3])
@pytest.mark.parametrize("ratio", [0.0, 0.07, 0.2, 0.4, 1.0])
@pytest.mark.parametrize("causal", [False, True])
def test_local_window_target(sq, sk, bs, ratio, causal):
    nq, nk = nblocks(sq, sk, bs)
    if causal and ratio > 0.45:
        with pytest.raises(ValueError, match="sparsity_ratio"):
            P.local_window(seq_len_q=sq, seq_len_k=sk, block_size=bs, sparsity_ratio=ratio, causal=causal)
        return
    lay = P.local_window(seq_len_q=sq, seq_len_k=sk, block_size=bs, sparsity_ratio=ratio, causal=causal)
    assert lay.nnz == round(ratio * nq * nk)
    rows = row_sets(lay)
    check_even_fill([len(r) for r in rows], caps_of(sq, sk, bs, causal))
    for qb, cols in enumerate(rows):  # the k blocks nearest the diagonal, ties to the past
        assert cols == _nearest(qb, len(cols), sq, sk, bs, causal)
    # a symmetric window given as well only orders the candidates (nearest first, ties to the
    # past), whether it holds more or fewer blocks than a row keeps: the same layout
    for ws in (40, 200):
        both = P.local_window(seq_len_q=sq, seq_len_k=sk, block_size=bs, sparsity_ratio=ratio, causal=causal,
                              window_size=ws)
        assert both.equal(lay)


def test_local_window_target_with_asymmetric_window_prefers_window():
    sq, bs = 64 * 16, 16
    lay = P.local_window(seq_len_q=sq, block_size=bs, window=(64, 0), sparsity_ratio=5 / 64)
    for qb, cols in enumerate(row_sets(lay)):
        assert len(cols) == 5
        if qb >= 4:
            assert cols == list(range(qb - 4, qb + 1))


@pytest.mark.parametrize("causal", [False, True])
def test_global_local_target(causal):
    sq, bs, g = 1500, 32, 40  # global tokens span 2 query/key blocks
    nq = nk = nblocks(sq, sq, bs)[0]
    lay = P.global_local(seq_len_q=sq, block_size=bs, global_tokens=g, sparsity_ratio=0.2, causal=causal)
    assert lay.nnz == round(0.2 * nq * nk)
    allowed = causal_blocks(sq, sq, bs) if causal else torch.ones(nq, nk, dtype=torch.bool)
    m = mask_of(lay)
    assert torch.equal(m[:2], allowed[:2])  # global rows stay whole
    for qb in range(2, nq):
        assert bool(m[qb, :2].all())  # global columns come first
    assert not bool((m & ~allowed).any())
    with pytest.raises(ValueError, match="global"):
        P.global_local(seq_len_q=sq, block_size=bs, global_tokens=600, sparsity_ratio=0.05)


@pytest.mark.parametrize("ratio", [0.01, 0.3, 0.9])
@pytest.mark.parametrize("causal", [False, True])
def test_random_pattern(ratio, causal):
    sq, sk, bs = 1000, 1300, (32, 16)
    nq, nk = nblocks(sq, sk, bs)
    if causal and ratio > 0.5:
        with pytest.raises(ValueError, match="sparsity_ratio"):
            P.random_pattern(seq_len_q=sq, seq_len_k=sk, block_size=bs, sparsity_ratio=ratio, causal=causal)
        return
    lay = P.random_pattern(seq_len_q=sq, seq_len_k=sk, block_size=bs, sparsity_ratio=ratio, causal=causal, seed=5)
    assert lay.nnz == round(ratio * nq * nk)
    counts = [len(r) for r in row_sets(lay)]
    check_even_fill(counts, caps_of(sq, sk, bs, causal))
    if causal:
        assert not bool((mask_of(lay) & ~causal_blocks(sq, sk, bs)).any())
    assert lay.equal(P.make_layout("random", seq_len_q=sq, seq_len_k=sk, block_size=bs, density=ratio,
                                   causal=causal, seed=5))
    other = P.random_pattern(seq_len_q=sq, seq_len_k=sk, block_size=bs, sparsity_ratio=ratio, causal=causal, seed=6)
    assert other.nnz == lay.nnz and not lay.equal(other)


def test_random_pattern_is_uniform_and_per_head():
    sq, bs = 64 * 16, 16
    draws = torch.stack([mask_of(P.random_pattern(seq_len_q=sq, block_size=bs, sparsity_ratio=0.25, seed=s))
                         for s in range(12)]).float()
    freq = draws.mean(dim=(0, 1))  # per key block; expectation 0.25 over 768 draws each
    assert float(freq.min()) > 0.17 and float(freq.max()) < 0.33
    heads = P.random_pattern(seq_len_q=sq, block_size=bs, sparsity_ratio=0.25, seed=3, num_heads=4,
                             different_layout_per_head=True)
    assert heads.layout_shape == (1, 4)
    assert heads.slice_nnz().tolist() == [round(0.25 * 64 * 64)] * 4
    for h in range(4):
        one = P.random_pattern(seq_len_q=sq, block_size=bs, sparsity_ratio=0.25, seed=3 + h)
        assert torch.equal(heads.to_dense_mask()[0, h], mask_of(one))


# ---------------------------------------------------------------------------- causal
CAUSAL_SPECS = [
    ("dense", {}),
    ("block_neighbour", {"radius": 2}),
    ("butterfly", {}),
    ("local_window", {"window_size": 96}),
    ("global_local", {"global_tokens": 40, "window_size": 64}),
    ("longformer", {"window_size": 64, "global_tokens": 2}),
    ("dilated_sparse", {"segment_lengths": [128, 512], "dilation_rates": [1, 4]}),
    ("hierarchical", {}),
    ("all", {}),
    ("local", {"local_attn_ctx": 50}),
    ("strided", {"local_attn_ctx": 50}),
    ("fixed", {}),
    ("variable", {"local_window_blocks": [2, 4]}),
    ("bigbird", {"num_random_blocks": 0}),
]


def test_causal_specs_cover_every_builtin_pattern():
    covered = {name for name, _ in CAUSAL_SPECS} | {"random", "per_head", "union", "intersection"}
    builtin = {n for n in P.available_patterns() if P.get_pattern(n).__module__.startswith("dilated_sparse.patterns")}
    assert covered == builtin


@pytest.mark.parametrize("name,opts", CAUSAL_SPECS)
@pytest.mark.parametrize("sq,sk,bs", [(700, 700, 32), (555, 701, (16, 32)), (577, 600, (64, 32))])
def test_causal_is_the_block_filter_of_the_bidirectional_pattern(name, opts, sq, sk, bs):
    full = P.make_layout(name, seq_len_q=sq, seq_len_k=sk, block_size=bs, **opts)
    causal = P.make_layout(name, seq_len_q=sq, seq_len_k=sk, block_size=bs, causal=True, **opts)
    want = mask_of(full) & causal_blocks(sq, sk, bs)
    assert torch.equal(mask_of(causal), want)
    assert causal.equal(P.causal_filter(full))
    # every causal row keeps a block when the bidirectional row had the diagonal
    assert causal.nnz <= full.nnz


# --------------------------------------------------------------------- combinations
def test_per_head_union_intersection():
    kw = {"seq_len_q": 600, "seq_len_k": 500, "block_size": (32, 16)}
    a = P.local_window(window_size=64, **kw)
    b = P.global_local(global_tokens=30, window_size=0, **kw)
    c = P.random_pattern(sparsity_ratio=0.2, seed=1, **kw)
    mixed = P.per_head([a, b, c])
    assert mixed.layout_shape == (1, 3)
    m = mixed.to_dense_mask()[0]
    for h, lay in enumerate([a, b, c]):
        assert torch.equal(m[h], mask_of(lay))
        assert mixed.slice_nnz()[h] == lay.nnz
    assert torch.equal(mask_of(P.union(a, b, c)), mask_of(a) | mask_of(b) | mask_of(c))
    assert torch.equal(mask_of(P.intersection(a, b)), mask_of(a) & mask_of(b))
    assert P.intersection(a, c).nnz == int((mask_of(a) & mask_of(c)).sum())
    # head groups: num_heads repeats each item for consecutive heads
    grouped = P.per_head([a, b], num_heads=6)
    gm = grouped.to_dense_mask()[0]
    for h in range(6):
        assert torch.equal(gm[h], mask_of(a if h < 3 else b))
    # union/intersection broadcast a shared layout against a per-head one
    u = P.union(mixed, a)
    assert u.layout_shape == (1, 3)
    assert torch.equal(u.to_dense_mask()[0], m | mask_of(a))
    i = P.intersection(mixed, b)
    assert torch.equal(i.to_dense_mask()[0], m & mask_of(b))


def test_per_head_from_specs_and_registry_forms():
    kw = {"seq_len_q": 512, "block_size": 32}
    specs = ["dense", {"pattern": "local_window", "window_size": 64}, ("random", {"sparsity_ratio": 0.3})]
    lay = P.per_head(specs, causal=True, seed=10, **kw)
    m = lay.to_dense_mask()[0]
    assert torch.equal(m[0], mask_of(P.dense(causal=True, **kw)))
    assert torch.equal(m[1], mask_of(P.local_window(window_size=64, causal=True, **kw)))
    assert torch.equal(m[2], mask_of(P.random_pattern(sparsity_ratio=0.3, causal=True, seed=12, **kw)))
    same = P.make_layout("per_head", patterns=specs, causal=True, seed=10, **kw)
    assert same.equal(lay)
    u = P.make_layout("union", patterns=specs[:2], **kw)
    assert u.equal(P.dense(**kw))
    x = P.make_layout("intersection", patterns=[specs[1], {"pattern": "block_neighbour"}], **kw)
    assert torch.equal(mask_of(x), mask_of(P.local_window(window_size=64, **kw))
                       & mask_of(P.block_neighbour(**kw)))
    # a per-head item contributes all its heads
    nested = P.per_head([lay, "dense"], **kw)
    assert nested.layout_shape == (1, 4)


def test_per_batch_and_broadcast():
    kw = {"seq_len_q": 300, "block_size": 16}
    a = P.local_window(window_size=32, **kw)
    heads = P.per_head([a, P.dense(**kw)])
    pb = P.per_batch([a, heads])
    assert pb.layout_shape == (2, 2)
    dm = pb.to_dense_mask()
    assert torch.equal(dm[0, 0], mask_of(a)) and torch.equal(dm[0, 1], mask_of(a))
    assert torch.equal(dm[1], heads.to_dense_mask()[0])
    bc = P.broadcast_layout(heads, layout_batch=3, layout_heads=2)
    assert torch.equal(bc.to_dense_mask(), heads.to_dense_mask().expand(3, 2, -1, -1))
    with pytest.raises(ValueError, match="broadcast"):
        P.broadcast_layout(heads, layout_batch=1, layout_heads=3)


def test_combination_errors():
    a = P.local_window(seq_len_q=300, block_size=16, window_size=32)
    b = P.local_window(seq_len_q=320, block_size=16, window_size=32)
    with pytest.raises(ValueError, match="seq_len_q"):
        P.union(a, b)
    with pytest.raises(ValueError, match="num_heads"):
        P.per_head([a, a], num_heads=3)
    with pytest.raises(ValueError, match="seq_len_q"):
        P.per_head(["dense"])
    with pytest.raises(TypeError):
        P.intersection()


# ---------------------------------------------------------------------------- registry
def test_available_patterns_and_aliases():
    names = set(P.available_patterns())
    expected = {"local_window", "dilated_sparse", "global_local", "all", "local", "strided", "bigbird",
                "longformer", "fixed", "variable", "hierarchical", "butterfly", "random", "block_neighbour",
                "dense", "per_head", "union", "intersection"}
    assert expected <= names
    assert P.available_patterns() == sorted(P.available_patterns())
    kw = {"seq_len_q": 300, "block_size": 16}
    assert P.make_layout("LongNet", **kw).equal(P.make_layout("dilated_sparse", **kw))
    assert P.make_layout("sliding-window", window_size=32, **kw).equal(P.local_window(window_size=32, **kw))
    assert P.get_pattern("big_bird") is P.bigbird
    assert "window_size" in P.pattern_options("local_window")
    assert "seq_len_q" not in P.pattern_options("local_window")


def test_make_layout_forms():
    kw = {"seq_len_q": 300, "seq_len_k": 260, "block_size": (16, 32)}
    want = P.local_window(window_size=48, **kw)
    assert P.make_layout("local_window", window_size=48, **kw).equal(want)
    assert P.make_layout({"pattern": "local_window", "window_size": 48}, **kw).equal(want)
    assert P.make_layout({"pattern_type": "local_window", "local_window_size": 48}, **kw).equal(want)
    assert P.make_layout(("local_window", {"window_size": 48}), **kw).equal(want)
    assert P.make_layout(P.local_window, window_size=48, **kw).equal(want)
    assert P.make_layout(want, **kw) is want
    assert P.make_layout(want, device="cpu", **kw) is want
    assert P.make_layout(want, causal=True, **kw).equal(P.local_window(window_size=48, causal=True, **kw))
    with pytest.raises(TypeError, match="window_size"):
        P.make_layout(want, window_size=48, **kw)
    with pytest.raises(ValueError, match="seq_len_q=300"):
        P.make_layout(want, seq_len_q=320, seq_len_k=260)
    with pytest.raises(ValueError, match="window_size"):
        P.make_layout({"pattern": "local_window", "window_size": 48}, window_size=64, **kw)
    with pytest.raises(TypeError, match="block_size"):
        P.make_layout("local_window", seq_len_q=300)


def test_unknown_pattern_lists_names():
    with pytest.raises(ValueError) as info:
        P.make_layout("no_such_pattern", seq_len_q=64, block_size=16)
    msg = str(info.value)
    assert "no_such_pattern" in msg
    for name in ("local_window", "dilated_sparse", "global_local", "bigbird", "hierarchical"):
        assert name in msg


def test_unknown_option_lists_valid_ones():
    with pytest.raises(TypeError) as info:
        P.make_layout("local_window", seq_len_q=64, block_size=16, windowsize=32)
    msg = str(info.value)
    assert "windowsize" in msg and "window_size" in msg and "local_window_size" in msg


@pytest.fixture
def clean_registry(monkeypatch):
    monkeypatch.setattr(registry, "_PATTERNS", dict(registry._PATTERNS))
    monkeypatch.setattr(registry, "_ALIASES", dict(registry._ALIASES))


def test_register_user_pattern(clean_registry):
    calls = []

    def diagonal(*, seq_len_q, seq_len_k=None, block_size, shift=0):
        calls.append(shift)
        lay = P.dense(seq_len_q=seq_len_q, seq_len_k=seq_len_k, block_size=block_size)
        rows = torch.arange(lay.num_query_blocks)
        cols = torch.clamp(rows + shift, 0, lay.num_key_blocks - 1)
        return BlockSparseLayout.from_coo(rows, cols, block_size=block_size, seq_len_q=seq_len_q,
                                          seq_len_k=seq_len_k)

    assert P.register_pattern("my-diag", diagonal, aliases=("md",)) is diagonal
    assert "my_diag" in P.available_patterns()
    lay = P.make_layout("My_Diag", seq_len_q=160, block_size=16, shift=2)
    assert [cols for cols in row_sets(lay)] == [[min(r + 2, 9)] for r in range(10)]
    assert P.make_layout("md", seq_len_q=160, block_size=16).nnz == 10
    assert P.pattern_options("my_diag") == ("shift",)
    with pytest.raises(TypeError, match="shift"):
        P.make_layout("my_diag", seq_len_q=160, block_size=16, shfit=1)
    with pytest.raises(ValueError, match="already registered"):
        P.register_pattern("my_diag", diagonal)
    P.register_pattern("my_diag", diagonal, overwrite=True)

    @P.register_pattern("everything")
    def everything(**kw):
        return P.dense(**kw)

    assert P.make_layout("everything", seq_len_q=64, block_size=16, causal=True).nnz == 10
    # user patterns take part in combinations; causal is applied to a generator without it
    mixed = P.per_head(["my_diag", "everything"], seq_len_q=160, block_size=16, causal=True)
    m = mixed.to_dense_mask()[0]
    assert torch.equal(m[0], torch.eye(10, dtype=torch.bool))  # shift 0 is already causal
    assert torch.equal(m[1], causal_blocks(160, 160, 16))
    shifted = P.per_head([("my_diag", {"shift": 1})], seq_len_q=160, block_size=16, causal=True)
    assert row_sets(shifted)[9] == [9] and shifted.nnz == 1  # only the clamped last block stays
    with pytest.raises(TypeError, match="seq_len_q"):
        P.register_pattern("bad", lambda *, block_size: None)
    P.register_pattern("returns_none", lambda **kw: None)
    with pytest.raises(TypeError, match="BlockSparseLayout"):
        P.make_layout("returns_none", seq_len_q=64, block_size=16)


# ------------------------------------------------------------------------- bad options
BAD_OPTIONS = [
    ("local_window", {"window_size": -1}, "window_size"),
    ("local_window", {"window_size": 32, "local_window_size": 64}, "window_size"),
    ("local_window", {"window_size": 32, "window": (8, 8)}, "window"),
    ("local_window", {"sparsity_ratio": 1.5}, "sparsity_ratio"),
    ("local_window", {"sparsity_ratio": 0.2, "density": 0.3}, "density"),
    ("local_window", {"window": (-1, 2)}, "window"),
    ("random", {}, "sparsity_ratio"),
    ("random", {"density": -0.1}, "density"),
    ("random", {"sparsity_ratio": 0.2, "different_layout_per_head": True}, "num_heads"),
    ("dilated_sparse", {"segment_lengths": [64, 128], "dilation_rates": [1]}, "segment_lengths"),
    ("dilated_sparse", {"dilation_rates": [0, 2]}, "dilation_rates"),
    ("dilated_sparse", {"segment_lengths": []}, "segment_lengths"),
    ("global_local", {"global_tokens": -3}, "global_tokens"),
    ("longformer", {"global_indices": [10_000]}, "global_indices"),
    ("longformer", {"window_size": 32, "attention_window": 64}, "attention_window"),
    ("butterfly", {"butterfly_size": 3}, "butterfly_size"),
    ("block_neighbour", {"radius": -1}, "radius"),
    ("fixed", {"num_local_blocks": 3, "num_global_blocks": 2}, "num_local_blocks"),
    ("fixed", {"attention": "sideways"}, "attention"),
    ("fixed", {"horizontal_global_attention": True, "causal": True}, "horizontal_global_attention"),
    ("fixed", {"num_different_global_patterns": 2}, "different_layout_per_head"),
    ("variable", {"global_block_indices": [2], "global_block_end_indices": [2]}, "end"),
    ("variable", {"local_window_blocks": [0]}, "local_window_blocks"),
    ("bigbird", {"num_random_blocks": -1}, "num_random_blocks"),
    ("hierarchical", {"levels": [{"stride": 1, "window_size": -2, "block_size": 16}]}, "window_size"),
    ("hierarchical", {"levels": [{"stride": 0, "window_size": 16}]}, "stride"),
    ("local", {"local_attn_ctx": 0}, "local_attn_ctx"),
    ("dense", {"block_size": 48}, "block_size"),
    ("dense", {"seq_len_q": 0}, "seq_len_q"),
]


@pytest.mark.parametrize("name,opts,needle", BAD_OPTIONS)
def test_bad_option_value_errors_name_the_option(name, opts, needle):
    kw = {"seq_len_q": 256, "block_size": 16, **opts}
    with pytest.raises(ValueError, match=needle):
        P.make_layout(name, **kw)


@pytest.mark.parametrize("name,opts,needle", [
    ("local_window", {"window_size": "big"}, "window_size"),
    ("local_window", {"causal": "yes"}, "causal"),
    ("random", {"sparsity_ratio": "0.1"}, "sparsity_ratio"),
    ("hierarchical", {"levels": [{"stride": 1, "window_size": 16, "blocks": 2}]}, "blocks"),
    ("dilated_sparse", {"dilation_rates": "124"}, "dilation_rates"),
])
def test_bad_option_types_name_the_option(name, opts, needle):
    with pytest.raises(TypeError, match=needle):
        P.make_layout(name, seq_len_q=256, block_size=16, **opts)


# ------------------------------------------------------------------- determinism/device
ALL_SPECS = CAUSAL_SPECS + [
    ("random", {"sparsity_ratio": 0.1}),
    ("bigbird", {"num_random_blocks": 2}),
    ("variable", {"num_random_blocks": 1}),
    ("local_window", {"sparsity_ratio": 0.1}),
    ("global_local", {"sparsity_ratio": 0.3, "global_tokens": 16}),
    ("dilated_sparse", {"sparsity_ratio": 0.1}),
]


@pytest.mark.parametrize("name,opts", ALL_SPECS)
def test_deterministic_and_device(name, opts):
    kw = dict(seq_len_q=900, seq_len_k=700, block_size=(32, 16), **opts)
    a = P.make_layout(name, **kw)
    b = P.make_layout(name, device="cpu", **kw)
    c = P.make_layout(name, device=torch.device("cpu"), **kw)
    assert a.equal(b) and a.equal(c)
    assert a.device == torch.device("cpu") and a.crow_indices.dtype == torch.int32
    assert a.nnz > 0 and a.density <= 1.0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name,opts", ALL_SPECS)
def test_built_on_cuda_equals_cpu(name, opts):
    kw = dict(seq_len_q=900, seq_len_k=700, block_size=(32, 16), **opts)
    gpu = P.make_layout(name, device="cuda", **kw)
    assert gpu.device.type == "cuda"
    assert gpu.equal(P.make_layout(name, **kw))


# -------------------------------------------------------------------- 1M tokens, O(nnz)
class _MaxNumel(TorchDispatchMode):
    """Records the largest tensor any aten op produces while active."""

    def __init__(self) -> None:
        super().__init__()
        self.max_numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.max_numel = max(self.max_numel, t.numel())
        return out


LARGE_SPECS = [  # (name, options, causal)
    ("local_window", {"window_size": 1024}, False),
    ("local_window", {"sparsity_ratio": 0.001}, True),
    ("global_local", {"global_tokens": 64, "window_size": 512}, True),
    ("longformer", {"window_size": 512, "global_indices": [500_000]}, False),
    ("dilated_sparse", {"segment_lengths": [2048, 8192, 32768], "dilation_rates": [1, 4, 16]}, True),
    ("dilated_sparse", {"sparsity_ratio": 0.001}, False),
    ("dilated_sparse", {"segment_lengths": [2048, 8192], "num_heads": 2, "different_layout_per_head": True}, False),
    ("hierarchical", {"levels": [{"stride": 128, "window_size": 1024, "block_size": 128},
                                 {"stride": 1 << 16, "window_size": -1, "block_size": 1024}]}, True),
    ("local", {"local_attn_ctx": 256}, True),
    ("strided", {"local_attn_ctx": 65536}, False),
    ("bigbird", {}, False),
    ("variable", {"num_random_blocks": 1}, True),
    ("butterfly", {}, False),
    ("block_neighbour", {}, True),
    ("random", {"sparsity_ratio": 0.001}, False),
]


@pytest.fixture(scope="module")
def warm_dispatch():
    with _MaxNumel():  # first use of a dispatch mode and of the large allocations costs extra
        P.local_window(seq_len_q=1 << 16, block_size=128, window_size=512)


@pytest.mark.parametrize("name,opts,causal", LARGE_SPECS)
def test_million_tokens_without_dense_allocation(name, opts, causal, warm_dispatch):
    seq, bs = 1 << 20, 128
    nqb = seq // bs
    mode = _MaxNumel()
    start = time.perf_counter()
    with mode:
        lay = P.make_layout(name, seq_len_q=seq, block_size=bs, causal=causal, **opts)
    elapsed = time.perf_counter() - start
    assert lay.num_query_blocks == nqb and lay.nnz > 0
    # nothing of nqb * nkb (67M) entries: a bounded multiple of nnz or of the block count (the
    # dilated target ranks a few candidates per branch and row)
    assert mode.max_numel <= 10 * lay.nnz + 8 * nqb, (mode.max_numel, lay.nnz)
    assert mode.max_numel < nqb * nqb // 32
    assert elapsed < 20.0  # typically well under a second; generous for loaded CI machines
