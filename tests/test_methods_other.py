"""ReLA, SLA, LSH and GECO against direct float64 definitions."""

from __future__ import annotations

import math

import pytest
import torch
from _helpers import (
    F64,
    allowed_mask,
    assert_same_grads,
    attn_scores,
    expand_heads,
    grads_of,
    masked_softmax,
    random_qkv,
)

import dilated_sparse as ds
from dilated_sparse.methods import (
    GECO,
    SLA,
    ReLA,
    lsh_attention,
    lsh_buckets,
    lsh_rotations,
    rela_attention,
    sla_attention,
    sla_block_classes,
)

pytestmark = pytest.mark.usefixtures("single_thread")


# ----------------------------------------------------------------------------- ReLA
@pytest.mark.parametrize("causal", [False, True])
def test_rela_matches_definition(causal):
    b, s, h, d = 2, 21, 2, 8
    q, k, v = random_qkv(b, s, s, h, 1, d, seed=1)
    gain = (torch.rand(h, d, dtype=F64, generator=torch.Generator().manual_seed(2)) + 0.5).requires_grad_()
    kpm = torch.zeros(b, s, dtype=torch.bool)
    kpm[1] = True  # batch 1: every key padded -> zero rows, no NaN
    out = rela_attention(q, k, v, gain=gain, causal=causal, key_padding_mask=kpm, chunk_size=5)
    w = torch.relu(attn_scores(q, k)) * allowed_mask(b, h, s, s, causal=causal, key_padding_mask=kpm)
    x = (w @ expand_heads(v, h)).transpose(1, 2)
    ref = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * gain
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    assert_same_grads(out, ref, [q, k, v, gain])
    assert torch.isfinite(out).all() and (out[1] == 0).all()
    assert (w == 0).float().mean() > 0.3  # ReLU gives exact zeros


def test_rela_module():
    mod = ReLA(num_heads=2, head_dim=4)
    q, k, v = random_qkv(1, 9, 9, 2, 2, 4, dtype=torch.float32)
    mod(q, k, v).sum().backward()
    assert mod.gain.grad is not None


# ----------------------------------------------------------------------------- SLA
def _pool(x, block):
    n = -(-x.shape[1] // block)
    return torch.stack([x[:, i * block:(i + 1) * block].mean(dim=1) for i in range(n)], dim=1).transpose(1, 2)


def _sla_reference(q, k, v, bs, crit, negl, causal, phi, proj):
    b, s, h, _d = q.shape
    nb = -(-s // bs)
    qp = _pool(q.detach(), bs)
    kp = _pool(k.detach(), bs).repeat_interleave(h // k.shape[2], dim=1)
    sc = qp @ kp.transpose(-1, -2)
    n_crit = max(1, min(nb, round(crit * nb)))
    critical = torch.zeros(b, h, nb, nb, dtype=torch.bool)
    marginal = torch.zeros_like(critical)
    for bb in range(b):
        for hh in range(h):
            for r in range(nb):
                row = sc[bb, hh, r].clone()
                if causal:
                    row[torch.arange(nb) * bs > min(r * bs + bs - 1, s - 1)] = float("-inf")
                    row[r] = float("inf")
                order = torch.argsort(row, descending=True)
                n_allowed = int((row > float("-inf")).sum())
                n_negl = round(negl * n_allowed)
                critical[bb, hh, r, order[:n_crit]] = True
                for rank, c in enumerate(order.tolist()):
                    if n_crit <= rank < n_allowed - n_negl and (not causal or (c + 1) * bs - 1 <= r * bs):
                        marginal[bb, hh, r, c] = True
    tok = lambda m: m.repeat_interleave(bs, 2).repeat_interleave(bs, 3)[:, :, :s, :s]
    sparse = masked_softmax(attn_scores(q, k), tok(critical) & allowed_mask(b, h, s, s, causal=causal)) @ expand_heads(v, h)
    fq, fk = phi(q.transpose(1, 2)), phi(expand_heads(k, h))
    a = (fq @ fk.transpose(-1, -2)) * tok(marginal)  # phi(q_i) . phi(k_j) over the marginal keys
    den = a.sum(-1, keepdim=True)
    linear = (a @ expand_heads(v, h)) / torch.where(den > 0, den, torch.ones_like(den))
    linear = linear.transpose(1, 2)
    return sparse.transpose(1, 2) + proj(linear), critical, marginal


@pytest.mark.needs_op
@pytest.mark.parametrize("causal,feature_map", [(False, "softmax"), (True, "elu")])
def test_sla_matches_definition(causal, feature_map):
    b, s, h, bs = 1, 90, 2, 16
    q, k, v = random_qkv(b, s, s, h, 1, 8, seed=3)
    w = torch.randn(8, 8, dtype=F64, generator=torch.Generator().manual_seed(4)).requires_grad_()
    phi = {"softmax": lambda x: torch.softmax(x, -1), "elu": lambda x: torch.nn.functional.elu(x) + 1}[feature_map]
    out, parts = sla_attention(q, k, v, block_size=bs, critical_fraction=0.34, negligible_fraction=0.2,
                               causal=causal, feature_map=feature_map, proj=lambda x: x @ w, return_parts=True)
    ref, critical, marginal = _sla_reference(q, k, v, bs, 0.34, 0.2, causal, phi, lambda x: x @ w)
    assert torch.equal(parts["marginal"], marginal)
    assert torch.equal(parts["layout"].to_dense_mask(), critical)
    assert marginal.any() and not (marginal & critical).any()
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-10)
    assert_same_grads(out, ref, [q, k, v, w], rtol=1e-8, atol=1e-9)


@pytest.mark.needs_op
def test_sla_module_starts_as_sparse_attention_and_classes_checks():
    mod = SLA(8, block_size=16, critical_fraction=0.25).double()
    q, k, v = random_qkv(2, 64, 64, 2, 2, 8, seed=5)
    out = mod(q, k, v)
    sparse = sla_attention(q, k, v, block_size=16, critical_fraction=0.25, proj=lambda x: 0 * x)
    torch.testing.assert_close(out, sparse)
    out.sum().backward()
    assert mod.proj.weight.grad is not None and mod.proj.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="negligible_fraction"):
        sla_block_classes(q, k, 16, negligible_fraction=1.5)
    with pytest.raises(ValueError, match="feature_map"):
        sla_attention(q, k, v, block_size=16, feature_map="nope")


# ----------------------------------------------------------------------------- LSH
def _lsh_round_reference(q, k, v, rot, chunk, causal, shared_qk, kpm=None):
    """Direct definition of one round: buckets, sort by (bucket, position), chunk, attend within
    the same and the previous chunk to keys of the same bucket. Returns (out, lse)."""
    b, s, h, d = q.shape
    qh = q.transpose(1, 2)
    kh = torch.nn.functional.normalize(qh, dim=-1) if shared_qk else expand_heads(k, h)
    vh = expand_heads(v, h)

    def bucket(x):
        proj = torch.nn.functional.normalize(x.detach(), dim=-1) @ rot
        return torch.cat([proj, -proj], -1).argmax(-1)

    bq, bk = bucket(qh), bucket(kh)
    pos = torch.arange(s)
    chunk_of = lambda bkt: torch.argsort(torch.argsort(bkt * s + pos, dim=-1), dim=-1) // chunk
    cq, ck = chunk_of(bq), chunk_of(bk)
    allowed = (bq.unsqueeze(-1) == bk.unsqueeze(-2)) & (
        (ck.unsqueeze(-2) == cq.unsqueeze(-1)) | (ck.unsqueeze(-2) == cq.unsqueeze(-1) - 1))
    allowed &= allowed_mask(b, h, s, s, causal=causal, key_padding_mask=kpm)
    scores = qh @ kh.transpose(-1, -2) / math.sqrt(d)
    if shared_qk:
        scores = torch.where(torch.eye(s, dtype=torch.bool), torch.full_like(scores, -1e5), scores)
    masked = scores.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(masked, -1)
    out = masked_softmax(scores, allowed) @ vh
    return out, lse, allowed


@pytest.mark.parametrize("causal,shared_qk", [(False, False), (True, False), (False, True)])
def test_lsh_one_round_equals_direct_reference(causal, shared_qk):
    b, s, h, d = 2, 45, 2, 8
    q, k, v = random_qkv(b, s, s, h, 1, d, seed=6)
    rot = lsh_rotations(d, 4, 1, generator=torch.Generator().manual_seed(1), dtype=F64)
    kpm = torch.zeros(b, s, dtype=torch.bool)
    kpm[1, -7:] = True
    out = lsh_attention(q, k, v, n_buckets=4, chunk_size=8, causal=causal, shared_qk=shared_qk, rotations=rot,
                        key_padding_mask=kpm)
    ref, _, allowed = _lsh_round_reference(q, k, v, rot[0], 8, causal, shared_qk, kpm)
    ref = ref.transpose(1, 2)
    assert allowed.float().mean() < 0.5  # the hashing really prunes
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    assert_same_grads(out, ref, [q, k, v] if not shared_qk else [q, v])


def test_lsh_rounds_combine_by_lse_and_buckets():
    b, s, h, d = 1, 40, 1, 8
    q, k, v = random_qkv(b, s, s, h, h, d, seed=7)
    rot = lsh_rotations(d, 4, 3, generator=torch.Generator().manual_seed(2), dtype=F64)
    out, (bq, _) = lsh_attention(q, k, v, n_buckets=4, chunk_size=8, rotations=rot, return_buckets=True)
    outs, lses = zip(*[_lsh_round_reference(q, k, v, rot[r], 8, False, False)[:2] for r in range(3)])
    weights = torch.softmax(torch.stack(lses), dim=0).unsqueeze(-1)
    ref = (torch.stack(outs) * weights).sum(0).transpose(1, 2)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    assert_same_grads(out, ref, [q, k, v])
    assert bq.shape == (3, b, h, s) and int(bq.max()) < 4
    torch.testing.assert_close(lsh_buckets(q.transpose(1, 2).detach(), rot), bq)
    with pytest.raises(ValueError, match="n_buckets"):
        lsh_rotations(8, 3)
    with pytest.raises(ValueError, match="same length"):
        lsh_attention(q, k[:, :20], v[:, :20])


# ----------------------------------------------------------------------------- GECO
def test_geco_multiplier_and_gradients():
    geco = GECO(tolerance=1.0, ema=0.5, lambda_init=1.0, lambda_lr=0.5)
    task = torch.tensor(3.0, requires_grad=True)
    sparsity = torch.tensor(0.7, requires_grad=True)
    loss = geco(task, sparsity)
    loss.backward()
    assert task.grad.item() == pytest.approx(1.0)  # lambda before the update
    assert sparsity.grad.item() == pytest.approx(1.0)
    assert loss.item() == pytest.approx(0.7 + 1.0 * 2.0)
    assert geco.lagrange_multiplier.item() == pytest.approx(math.exp(0.5 * 2.0))  # constraint violated: grows
    assert not geco.satisfied()
    for _ in range(20):
        geco(torch.tensor(0.2), torch.tensor(0.1))  # well inside the tolerance: shrinks
    assert geco.satisfied()
    assert geco.lagrange_multiplier.item() < 1.0
    geco.eval()
    before = geco.lagrange_multiplier.clone()
    geco(torch.tensor(5.0), torch.tensor(0.0))
    assert torch.equal(before, geco.lagrange_multiplier)
    with pytest.raises(ValueError, match="ema"):
        GECO(1.0, ema=1.0)


# ----------------------------------------------------------------------------- fully masked rows
def _all_methods():
    from dilated_sparse import methods as M

    u = torch.randn(2, 40, 2, dtype=F64)
    fns = {
        "topk": lambda q, k, v, m: M.topk_attention(q, k, v, 4, key_padding_mask=m),
        "adaptive_topk": lambda q, k, v, m: M.adaptive_topk(q, k, v, torch.tensor([2.0, 3.0], dtype=F64), 6,
                                                            key_padding_mask=m),
        "entmax": lambda q, k, v, m: M.entmax_attention(q, k, v, 1.5, key_padding_mask=m),
        "sparsemax": lambda q, k, v, m: M.sparsemax_attention(q, k, v, key_padding_mask=m),
        "gumbel": lambda q, k, v, m: M.gumbel_softmax_attention(q, k, v, 0.5, key_padding_mask=m),
        "gated": lambda q, k, v, m: M.block_gated_attention(q, k, v, torch.ones(1, 3, 3, dtype=F64), 16,
                                                            key_padding_mask=m),
        "rela": lambda q, k, v, m: M.rela_attention(q, k, v, key_padding_mask=m),
        "sparsek": lambda q, k, v, m: M.sparsek_attention(q, k, v, u, 4, causal=True, key_padding_mask=m),
        "lsh": lambda q, k, v, m: M.lsh_attention(q, k, v, n_buckets=2, chunk_size=16, key_padding_mask=m),
    }
    if ds.extension_available():
        fns.update({
            "block_topk": lambda q, k, v, m: M.block_topk_attention(q, k, v, 2, 16, key_padding_mask=m),
            "sla": lambda q, k, v, m: M.sla_attention(q, k, v, block_size=16, critical_fraction=0.34,
                                                      key_padding_mask=m),
            "bigbird": lambda q, k, v, m: M.bigbird_attention(q, k, v, block_size=16, key_padding_mask=m),
        })
    return fns


@pytest.mark.parametrize("name", sorted(_all_methods()))
def test_fully_masked_rows_give_zeros_without_nan(name):
    q, k, v = random_qkv(2, 40, 40, 2, 2, 8, seed=9)
    kpm = torch.zeros(2, 40, dtype=torch.bool)
    kpm[1] = True  # every key of batch 1 is padding
    out = _all_methods()[name](q, k, v, kpm)
    assert torch.isfinite(out).all() and (out[1] == 0).all()
    assert out[0].abs().sum() > 0
    grads = grads_of(out, [q, k, v])
    assert all(torch.isfinite(g).all() for g in grads)
    assert (grads[0][1] == 0).all() and (grads[2][1] == 0).all()
