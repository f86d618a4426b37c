"""Selection-based methods against direct float64 definitions: top-k, adaptive top-k, dynamic block
top-k (through the kernel), SPARSEK, Gumbel straight-through, learnable Bernoulli block masks, and
block-neighbour / BigBird / LongNet through the kernel."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.utils._python_dispatch
from _helpers import (
    F64,
    allowed_mask,
    apply_weights,
    assert_same_grads,
    attn_scores,
    grads_of,
    masked_softmax,
    random_qkv,
)

import dilated_sparse as ds
from dilated_sparse.methods import (
    AdaptiveTopK,
    GumbelTemperatureSchedule,
    LearnableBlockMask,
    SparseK,
    adaptive_topk,
    bigbird_attention,
    block_gated_attention,
    block_neighbour_attention,
    block_topk_attention,
    block_topk_layout,
    dilated_attention,
    gumbel_softmax_attention,
    pattern_attention,
    sla_attention,
    sparsek_attention,
    sparsek_mask,
    topk_attention,
)
from dilated_sparse.methods.gumbel import _gumbel_noise

pytestmark = pytest.mark.usefixtures("single_thread")


# ----------------------------------------------------------------------------- top-k
def _topk_reference(q, k, v, top_k, allowed):
    """Row by row: softmax over the top_k allowed scores (a direct reading of the definition)."""
    s = attn_scores(q, k)
    w = torch.zeros_like(s)
    for b, h, i in allowed.any(-1).nonzero().tolist():
        idx = allowed[b, h, i].nonzero()[:, 0]
        vals, sel = torch.topk(s[b, h, i, idx], min(top_k, idx.numel()))
        w = w.index_put((torch.tensor(b), torch.tensor(h), torch.tensor(i), idx[sel]), torch.softmax(vals, -1))
    return apply_weights(w, v, q.shape[2])


@pytest.mark.parametrize("causal,pad,hkv", [(False, False, 2), (True, False, 1), (False, True, 2), (True, True, 2)])
def test_topk_matches_definition(causal, pad, hkv):
    b, s, h = 2, 23, 2
    q, k, v = random_qkv(b, s, s, h, hkv, 8, seed=3)
    kpm = None
    if pad:
        kpm = torch.zeros(b, s, dtype=torch.bool)
        kpm[1, 10:] = True
    allowed = allowed_mask(b, h, s, s, causal=causal, key_padding_mask=kpm)
    ref = _topk_reference(q, k, v, 5, allowed)
    out = topk_attention(q, k, v, 5, causal, key_padding_mask=kpm, chunk_size=4)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    assert_same_grads(out, ref, [q, k, v])


def test_topk_with_layout_and_all_masked_rows():
    b, s, h = 1, 40, 2
    layout = ds.patterns.block_neighbour(seq_len_q=s, block_size=16, radius=0)
    q, k, v = random_qkv(b, s, s, h, h, 8, seed=4)
    kpm = torch.zeros(b, s, dtype=torch.bool)
    kpm[0, 16:32] = True  # query block 1 sees only its own (padded) block: empty rows
    allowed = allowed_mask(b, h, s, s, key_padding_mask=kpm)
    blocks = layout.to_dense_mask()[0, 0].repeat_interleave(16, 0).repeat_interleave(16, 1)[:s, :s]
    allowed &= blocks
    ref = _topk_reference(q, k, v, 3, allowed)
    out = topk_attention(q, k, v, 3, layout=layout, key_padding_mask=kpm)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    assert (out[0, 16:32] == 0).all()
    grads = grads_of(out, [q, k, v])
    assert all(torch.isfinite(g).all() for g in grads) and (grads[0][0, 16:32] == 0).all()


def test_topk_large_k_is_full_softmax_and_bad_k():
    q, k, v = random_qkv(1, 10, 10, 1, 1, 4)
    full = apply_weights(masked_softmax(attn_scores(q, k), allowed_mask(1, 1, 10, 10)), v, 1)
    torch.testing.assert_close(topk_attention(q, k, v, 64), full)
    with pytest.raises(ValueError, match="top_k"):
        topk_attention(q, k, v, 0)


def test_adaptive_topk_matches_definition_and_k_gradient():
    b, s, h, k_max, ramp = 1, 17, 2, 8, 2.0
    q, k, v = random_qkv(b, s, s, h, h, 8, seed=5)
    k_per_head = torch.tensor([2.5, 6.0], dtype=F64, requires_grad=True)
    out = adaptive_topk(q, k, v, k_per_head, k_max, ramp=ramp, causal=True, chunk_size=5)
    sc = attn_scores(q, k)
    allowed = allowed_mask(b, h, s, s, causal=True)
    w = torch.zeros_like(sc)
    for bb, hh, i in allowed.any(-1).nonzero().tolist():
        idx = allowed[bb, hh, i].nonzero()[:, 0]
        vals, sel = torch.topk(sc[bb, hh, i, idx], min(k_max, idx.numel()))
        r = torch.arange(vals.numel(), dtype=F64)
        m = torch.clamp((ramp + k_per_head[hh] - 1 - r) / ramp, 0, 1)
        p = m * torch.exp(vals - vals.max())
        w = w.index_put((torch.tensor(bb), torch.tensor(hh), torch.tensor(i), idx[sel]), p / p.sum())
    ref = apply_weights(w, v, h)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    grads, ref_grads = grads_of(out, [q, k, v, k_per_head]), grads_of(ref, [q, k, v, k_per_head])
    for a, r in zip(grads, ref_grads):
        torch.testing.assert_close(a, r, rtol=1e-9, atol=1e-10)
    assert grads[3].abs().sum() > 0


def test_adaptive_topk_module_range_and_regularizer():
    mod = AdaptiveTopK(num_heads=3, k_min=2, k_max=10)
    kv = mod.k_values
    assert ((kv >= 2) & (kv <= 10)).all()
    mod.regularization().backward()
    assert mod.theta.grad is not None and (mod.theta.grad > 0).all()
    q, k, v = random_qkv(1, 12, 12, 3, 3, 4, dtype=torch.float32)
    assert mod(q, k, v).shape == q.shape
    with pytest.raises(ValueError, match="k_min"):
        AdaptiveTopK(2, 5, 3)


# ----------------------------------------------------------------------------- block top-k
def _pool(x, block):  # [B, S, H, D] -> [B, H, n, D], mean over each block's real tokens
    n = -(-x.shape[1] // block)
    return torch.stack([x[:, i * block:(i + 1) * block].mean(dim=1) for i in range(n)], dim=1).transpose(1, 2)


def _block_topk_reference(q, k, v, per_row, bq, bk, causal):
    b, sq, h, _ = q.shape
    sk = k.shape[1]
    qp = _pool(q.detach(), bq)
    kp = _pool(k.detach(), bk).repeat_interleave(h // k.shape[2], dim=1)
    sc = qp @ kp.transpose(-1, -2)
    nqb, nkb = sc.shape[-2:]
    chosen = torch.zeros(b, h, nqb, nkb, dtype=torch.bool)
    for bb in range(b):
        for hh in range(h):
            for r in range(nqb):
                row = sc[bb, hh, r].clone()
                first, last = r * bq, min(r * bq + bq - 1, sq - 1)
                if causal:
                    row[torch.arange(nkb) * bk > last] = float("-inf")
                    row[min(last, sk - 1) // bk] = 1e300
                    row[min(first, sk - 1) // bk] = float("inf")
                keep = torch.topk(row, min(per_row, nkb)).indices
                keep = keep[row[keep] > float("-inf")]
                chosen[bb, hh, r, keep] = True
    tok = chosen.repeat_interleave(bq, 2).repeat_interleave(bk, 3)[:, :, :sq, :sk]
    allowed = tok & allowed_mask(b, h, sq, sk, causal=causal)
    return apply_weights(masked_softmax(attn_scores(q, k), allowed), v, h), chosen


@pytest.mark.needs_op
@pytest.mark.parametrize("causal,bq,bk,hkv", [(False, 16, 16, 2), (True, 16, 16, 1), (True, 32, 16, 2)])
def test_block_topk_matches_definition(causal, bq, bk, hkv):
    b, s, h = 2, 75, 2
    q, k, v = random_qkv(b, s, s, h, hkv, 8, seed=6)
    out, layout = block_topk_attention(q, k, v, 2, (bq, bk), causal=causal, return_layout=True)
    ref, chosen = _block_topk_reference(q, k, v, 2, bq, bk, causal)
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-10)
    assert_same_grads(out, ref, [q, k, v], rtol=1e-8, atol=1e-9)
    assert layout.layout_shape == (b, h)
    got = layout.to_dense_mask()
    assert (got >= chosen).all()  # every chosen block is in the layout (extra ones are causal-masked)
    assert torch.isfinite(out).all()
    if causal:  # the first query of every block sees its own key block: no empty row
        assert (out.abs().sum(-1) > 0).all()


@pytest.mark.needs_op
def test_block_topk_layout_is_valid_and_device_built():
    q, k, _ = random_qkv(2, 100, 100, 4, 2, 8, dtype=torch.float32)
    layout = block_topk_layout(q, k, 3, 32)
    nqb = layout.num_query_blocks
    assert torch.equal(layout.crow_indices, torch.arange(2 * 4 * nqb + 1, dtype=torch.int32) * 3)
    # the indices built without validation pass full validation
    ds.BlockSparseLayout(layout.crow_indices, layout.col_indices, block_size=32, seq_len_q=100,
                         layout_batch=2, layout_heads=4)
    assert layout.max_slice_nnz == nqb * 3


@pytest.mark.needs_op
def test_block_topk_skips_padding_blocks():
    q, k, v = random_qkv(1, 64, 64, 1, 1, 8, seed=9)
    kpm = torch.zeros(1, 64, dtype=torch.bool)
    kpm[0, 32:] = True
    out, layout = block_topk_attention(q, k, v, 2, 16, key_padding_mask=kpm, return_layout=True)
    assert (layout.col_indices < 2).all()  # the two padded key blocks are never chosen
    allowed = allowed_mask(1, 1, 64, 64, key_padding_mask=kpm)
    ref = apply_weights(masked_softmax(attn_scores(q, k), allowed), v, 1)
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-10)


# ----------------------------------------------------------------------------- SPARSEK
def _sparsek_exact(u: list[float], k: float) -> list[float]:
    """Solve sum clip(u - tau, 0, 1) = k exactly from the breakpoints of the piecewise-linear sum."""
    points = sorted(set(u) | {x - 1 for x in u})

    def f(t: float) -> float:
        return sum(min(max(x - t, 0.0), 1.0) for x in u)

    for lo, hi in itertools.pairwise(points):
        f_lo, f_hi = f(lo), f(hi)
        if f_hi <= k <= f_lo and f_lo > f_hi:
            tau = lo + (f_lo - k) * (hi - lo) / (f_lo - f_hi)
            return [min(max(x - tau, 0.0), 1.0) for x in u]
    return [1.0] * len(u) if k >= len(u) else [0.0] * len(u)


def test_sparsek_mask_exact_and_gradcheck():
    u = torch.randn(4, 13, dtype=F64, generator=torch.Generator().manual_seed(1)) * 2
    for kk in (1, 3, 6):
        m = sparsek_mask(u, kk)
        ref = torch.tensor([_sparsek_exact(row, kk) for row in u.tolist()], dtype=F64)
        torch.testing.assert_close(m, ref, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(m.sum(-1), torch.full((4,), float(kk), dtype=F64))
    mask = torch.rand(4, 13, generator=torch.Generator().manual_seed(2)) > 0.3
    m = sparsek_mask(u, 20, mask)  # budget larger than the valid count: all valid entries are 1
    torch.testing.assert_close(m, mask.to(F64))
    assert torch.autograd.gradcheck(lambda x: sparsek_mask(x, 3), (u.clone().requires_grad_(),))


def test_sparsek_mask_entries_at_one_have_no_gradient():
    # A row whose valid entries all sit at 1 (k >= their count) is constant in u. Bisection can
    # leave u - tau exactly at the clip bound; the gradient must not depend on which side torch's
    # clamp takes there (on torch 2.11 it leaked 1 into such entries, on 2.14 not).
    u = (torch.randn(256, 3, dtype=F64, generator=torch.Generator().manual_seed(0)) * 3).requires_grad_()
    valid = torch.ones(256, 3, dtype=torch.bool)
    valid[:128, 1:] = False
    weights = torch.tensor([-1.0, 0.5, 2.0], dtype=F64)
    for kk, rows in ((1, slice(0, 128)), (3, slice(128, 256))):
        m = sparsek_mask(u[rows], kk, valid[rows])
        torch.testing.assert_close(m, valid[rows].to(F64), rtol=0, atol=1e-12)
        (grad,) = torch.autograd.grad((m * weights).sum(), [u])
        assert torch.count_nonzero(grad) == 0, f"k={kk}: {torch.count_nonzero(grad)} entries leak a gradient"


@pytest.mark.parametrize("causal", [False, True])
def test_sparsek_attention_matches_definition(causal):
    b, s, h, hkv, kk = 2, 19, 2, 1, 4
    q, k, v = random_qkv(b, s, s, h, hkv, 8, seed=10)
    u = torch.randn(b, s, hkv, dtype=F64, generator=torch.Generator().manual_seed(3)).requires_grad_()
    kpm = torch.zeros(b, s, dtype=torch.bool)
    kpm[1, -4:] = True
    out = sparsek_attention(q, k, v, u, kk, causal=causal, key_padding_mask=kpm, chunk_size=6)
    sc = attn_scores(q, k)
    allowed = allowed_mask(b, h, s, s, causal=causal, key_padding_mask=kpm)
    w = torch.zeros_like(sc)
    for bb, hh, i in allowed.any(-1).nonzero().tolist():
        idx = allowed[bb, hh, i].nonzero()[:, 0]
        m = torch.tensor(_sparsek_exact(u[bb, idx, hh // (h // hkv)].tolist(), min(kk, idx.numel())), dtype=F64)
        sel = m > 0
        uu = u[bb, idx, hh // (h // hkv)]
        # the same m, differentiable in u: recomputed on its support from tau
        free = sel & (m < 1)
        tau = (uu[free].sum() + (m >= 1).sum() - min(kk, idx.numel())) / free.sum() if free.any() else 0.0
        md = torch.where(free, uu - tau, m)
        p = torch.softmax(sc[bb, hh, i, idx[sel]], -1) * md[sel]
        w = w.index_put((torch.tensor(bb), torch.tensor(hh), torch.tensor(i), idx[sel]), p)
    ref = apply_weights(w, v, h)
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-10)
    assert_same_grads(out, ref, [q, k, v, u], rtol=1e-7, atol=1e-9)


def test_sparsek_module_trains_scores():
    mod = SparseK(num_kv_heads=1, head_dim=8, k_keep=3).double()
    q, k, v = random_qkv(1, 16, 16, 2, 1, 8, seed=11)
    out = mod(q, k, v, causal=True)
    out.square().sum().backward()
    assert mod.weight.grad is not None and mod.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="key_scores"):
        sparsek_attention(q, k, v, torch.zeros(1, 15, 1, dtype=F64), 3)


# ----------------------------------------------------------------------------- Gumbel
def test_gumbel_softmax_without_noise_is_straight_through_argmax():
    b, s, h, t = 1, 14, 2, 0.7
    q, k, v = random_qkv(b, s, s, h, h, 8, seed=12)
    out = gumbel_softmax_attention(q, k, v, t, hard=True, noise=False, causal=True, chunk_size=4)
    allowed = allowed_mask(b, h, s, s, causal=True)
    soft = masked_softmax(attn_scores(q, k) / t, allowed)
    hard = torch.nn.functional.one_hot(soft.argmax(-1), s).to(F64)
    ref = apply_weights(hard - soft.detach() + soft, v, h)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    assert_same_grads(out, ref, [q, k, v])
    soft_out = gumbel_softmax_attention(q, k, v, t, hard=False, noise=False, causal=True)
    torch.testing.assert_close(soft_out, apply_weights(soft, v, h), rtol=1e-10, atol=1e-12)


def test_gumbel_noise_is_reused_in_backward():
    b, s, h, t = 1, 11, 1, 0.5
    q, k, v = random_qkv(b, s, s, h, h, 4, seed=13)
    out = gumbel_softmax_attention(q, k, v, t, hard=True, generator=torch.Generator().manual_seed(7))
    seed = int(torch.randint(0, 2**62, (1,), generator=torch.Generator().manual_seed(7)).item())
    sc = attn_scores(q, k)
    soft = torch.softmax((sc + _gumbel_noise(sc.shape, seed, sc)) / t, -1)
    hard = torch.nn.functional.one_hot(soft.argmax(-1), s).to(F64)
    ref = apply_weights(hard - soft.detach() + soft, v, h)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    assert_same_grads(out, ref, [q, k, v])
    # each query reads exactly one value row
    vh = v.transpose(1, 2)[0, 0]
    assert all(any(torch.allclose(out[0, i, 0], vh[j]) for j in range(s)) for i in range(s))


def test_gumbel_fully_masked_rows_and_schedule():
    q, k, v = random_qkv(2, 6, 6, 1, 1, 4)
    kpm = torch.zeros(2, 6, dtype=torch.bool)
    kpm[1] = True
    out = gumbel_softmax_attention(q, k, v, 1.0, key_padding_mask=kpm)
    assert torch.isfinite(out).all() and (out[1] == 0).all()
    assert all(torch.isfinite(g).all() for g in grads_of(out, [q, k, v]))
    for mode in ("exponential", "linear", "cosine"):
        sched = GumbelTemperatureSchedule(2.0, 0.1, total_steps=10, mode=mode)
        values = [sched.temperature] + [sched.step() for _ in range(12)]
        assert values[0] == pytest.approx(2.0) and values[10] == pytest.approx(0.1) and values[-1] == pytest.approx(0.1)
        assert all(a >= b for a, b in itertools.pairwise(values))
    sched = GumbelTemperatureSchedule(1.0, 0.25, total_steps=2)
    assert sched.value(1) == pytest.approx(0.5)  # geometric midpoint
    state = sched.state_dict()
    sched.step()
    sched.load_state_dict(state)
    assert sched.current_step == 0
    with pytest.raises(ValueError, match="mode"):
        GumbelTemperatureSchedule(mode="step")


# ----------------------------------------------------------------------------- Bernoulli block masks
def test_block_gated_attention_matches_definition_with_gate_gradients():
    b, s, h, bs = 1, 40, 2, 16
    q, k, v = random_qkv(b, s, s, h, h, 8, seed=14)
    gates = torch.rand(h, 3, 3, dtype=F64, generator=torch.Generator().manual_seed(4))
    gates[0, 1, :] = 0  # head 0, block row 1: every gate closed -> zero output
    gates.requires_grad_()
    out = block_gated_attention(q, k, v, gates, bs, causal=True, chunk_size=7)
    tok = gates.repeat_interleave(bs, 1).repeat_interleave(bs, 2)[:, :s, :s].unsqueeze(0)
    p = masked_softmax(attn_scores(q, k), allowed_mask(b, h, s, s, causal=True)) * tok
    total = p.sum(-1, keepdim=True)
    ref = apply_weights(p / torch.where(total > 0, total, torch.ones_like(total)), v, h)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    assert_same_grads(out, ref, [q, k, v, gates])
    assert (out[0, 16:32, 0] == 0).all()


@pytest.mark.needs_op
def test_learnable_block_mask_eval_equals_kernel_on_its_layout():
    torch.manual_seed(0)
    mask = LearnableBlockMask(num_heads=2, max_seq_len=64, block_size=16, init_keep=0.5).double()
    with torch.no_grad():
        mask.logits.copy_(torch.randn(mask.logits.shape, dtype=F64))
        mask.logits[:, torch.arange(4), torch.arange(4)] = 1.0  # diagonal open: no empty rows
    mask.eval()
    q, k, v = random_qkv(1, 50, 50, 2, 2, 8, seed=15)
    out = mask(q, k, v)
    layout = mask.to_layout(50)
    assert layout.layout_shape == (1, 2)
    ref = ds.block_sparse_attention(q, k, v, layout)
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-10)
    assert mask.density() == pytest.approx(float((mask.logits > 0).double().mean()))


def test_learnable_block_mask_training_hard_gates_and_l0():
    torch.manual_seed(0)
    mask = LearnableBlockMask(num_heads=2, max_seq_len=48, block_size=16, init_keep=0.6)
    gates = mask.gates(3, 3, generator=torch.Generator().manual_seed(1))
    assert set(gates.detach().unique().tolist()) <= {0.0, 1.0}  # true 0/1 gates in the forward
    q, k, v = random_qkv(1, 48, 48, 2, 2, 8, dtype=torch.float32)
    out = mask(q, k, v)
    (out.square().sum() + mask.l0_loss()).backward()
    assert mask.logits.grad is not None and mask.logits.grad.abs().sum() > 0
    l0 = mask.l0_loss()
    assert l0.item() == pytest.approx(torch.sigmoid(mask.logits).mean().item())
    assert 0.5 < l0.item() < 0.7
    with pytest.raises(ValueError, match="max_seq_len"):
        mask.gates(4, 3)


# ----------------------------------------------------------------------------- fixed patterns
@pytest.mark.needs_op
@pytest.mark.parametrize("causal", [False, True])
def test_block_neighbour_attention_matches_token_definition(causal):
    b, s, h, bs = 1, 70, 2, 16
    q, k, v = random_qkv(b, s, s, h, 1, 8, seed=16)
    out = block_neighbour_attention(q, k, v, block_size=bs, causal=causal)
    pos = torch.arange(s)
    near = ((pos.view(-1, 1) // bs) - (pos.view(1, -1) // bs)).abs() <= 1
    allowed = allowed_mask(b, h, s, s, causal=causal) & near
    ref = apply_weights(masked_softmax(attn_scores(q, k), allowed), v, h)
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-10)
    assert_same_grads(out, ref, [q, k, v], rtol=1e-8, atol=1e-9)


@pytest.mark.needs_op
def test_bigbird_and_dilated_through_the_kernel_match_reference():
    b, s, h = 1, 100, 2
    q, k, v = random_qkv(b, s, s, h, h, 8, seed=17)
    out, layout = bigbird_attention(q, k, v, block_size=16, num_random_blocks=1, seed=3, return_layout=True)
    expected = ds.patterns.bigbird(seq_len_q=s, block_size=16, num_random_blocks=1, seed=3)
    assert layout.equal(expected)
    dense = layout.to_dense_mask()[0, 0]
    assert dense[0].all() and dense[:, 0].all()  # the global block
    torch.testing.assert_close(out, ds.reference_attention(q, k, v, layout), rtol=1e-9, atol=1e-10)
    out, layout = dilated_attention(q, k, v, block_size=16, segment_lengths=[32, 64], dilation_rates=[1, 2],
                                    causal=True, return_layout=True)
    torch.testing.assert_close(out, ds.reference_attention(q, k, v, layout, causal=True), rtol=1e-9, atol=1e-10)
    out = pattern_attention(q, k, v, layout, causal=True)
    torch.testing.assert_close(out, ds.reference_attention(q, k, v, layout, causal=True), rtol=1e-9, atol=1e-10)
    with pytest.raises(TypeError):
        pattern_attention(q, k, v, layout, radius=2)


class _HostSyncs(torch.utils._python_dispatch.TorchDispatchMode):
    """Records ops that need the tensor values on the host (a device->host sync on CUDA)."""

    SYNCING = ("_local_scalar_dense", "nonzero", "unique", "masked_select", "equal", "is_nonzero")

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__.split(".")[0]
        if any(name.startswith((s, "_" + s)) for s in self.SYNCING):
            self.seen.append(func.__name__)
        return func(*args, **(kwargs or {}))


@pytest.mark.needs_op
@pytest.mark.parametrize("causal", [False, True])
def test_block_topk_and_sla_build_layouts_without_host_sync(causal):
    q, k, v = random_qkv(2, 96, 96, 2, 1, 8, dtype=torch.float32)
    kpm = torch.zeros(2, 96, dtype=torch.bool)
    kpm[1, 70:] = True
    with _HostSyncs() as mode:
        layout = block_topk_layout(q, k, 2, 32, causal=causal, key_padding_mask=kpm)
        out = block_topk_attention(q, k, v, 2, 32, causal=causal, key_padding_mask=kpm)
        sla = sla_attention(q, k, v, block_size=32, critical_fraction=0.34, causal=causal, key_padding_mask=kpm)
    assert mode.seen == [], mode.seen
    assert torch.isfinite(sla).all()
    assert layout.nnz == 2 * 2 * 3 * 2 and torch.isfinite(out).all()
    with _HostSyncs() as mode:  # control: the mode does see a sync
        bool(q.sum() > 0)
    assert mode.seen


@pytest.mark.parametrize("name", ["topk", "adaptive", "sparsek", "block_topk"])
def test_bfloat16_inputs_match_float64_at_bf16_tolerance(name):
    if name == "block_topk" and not ds.extension_available():
        pytest.skip("compiled extension not available")
    q, k, v = (t.detach() for t in random_qkv(2, 70, 70, 4, 2, 16, seed=21))
    u = torch.randn(2, 70, 2, generator=torch.Generator().manual_seed(5)).to(torch.bfloat16)
    fns = {
        "topk": lambda q, k, v: topk_attention(q, k, v, 12, True),
        "adaptive": lambda q, k, v: adaptive_topk(q, k, v, torch.tensor([3.0, 5.0, 8.0, 2.0]), 10),
        "sparsek": lambda q, k, v: sparsek_attention(q, k, v, u.to(q.dtype), 6, causal=True),
        # the block choice is made on bf16-rounded inputs in both runs, so it is the same
        "block_topk": lambda q, k, v: block_topk_attention(q, k, v, 2, 16, causal=True),
    }
    qb, kb, vb = (t.to(torch.bfloat16) for t in (q, k, v))
    out = fns[name](qb, kb, vb)
    assert out.dtype == torch.bfloat16
    ref = fns[name](qb.double(), kb.double(), vb.double())
    torch.testing.assert_close(out.double(), ref, rtol=2e-2, atol=2e-2)


def test_adaptive_topk_rejects_k_per_head_outside_its_range():
    q, k, v = random_qkv(1, 20, 20, 2, 2, 8, seed=12, requires_grad=False)
    k_max = 6
    for bad in ([-10.0, 2.0], [0.5, 2.0], [2.0, 100.0], [2.0, k_max + 0.01], [float("nan"), 2.0]):
        with pytest.raises(ValueError, match="k_per_head"):
            adaptive_topk(q, k, v, torch.tensor(bad, dtype=F64), k_max)
    # both ends of [1, k_max] are accepted; k_per_head == k_max keeps every one of the k_max ranks fully
    adaptive_topk(q, k, v, torch.tensor([1.0, 1.0], dtype=F64), k_max)
    out = adaptive_topk(q, k, v, torch.tensor([k_max, k_max], dtype=F64), k_max, causal=True)
    torch.testing.assert_close(out, topk_attention(q, k, v, k_max, causal=True), rtol=1e-12, atol=1e-12)
