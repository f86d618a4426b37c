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
def _rela_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gain: torch.Tensor,
                    allowed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ReLA from its definition: ReLU scores on the allowed entries, then the RMS-normalised output
    times the gain; returns ``(weights [B, H, Sq, Sk], out [B, Sq, H, Dv])``."""
    w = torch.relu(attn_scores(q, k)) * allowed
    x = (w @ expand_heads(v, q.shape[2])).transpose(1, 2)
    return w, x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * gain


@pytest.mark.parametrize("causal", [False, True])
def test_rela_matches_definition(causal):
    b, s, h, d = 2, 21, 2, 8
    q, k, v = random_qkv(b, s, s, h, 1, d, seed=1)
    gain = (torch.rand(h, d, dtype=F64, generator=torch.Generator().manual_seed(2)) + 0.5).requires_grad_()
    kpm = torch.zeros(b, s, dtype=torch.bool)
    kpm[1] = True  # batch 1: every key padded -> zero rows, no NaN
    out = rela_attention(q, k, v, gain=gain, causal=causal, key_padding_mask=kpm, chunk_size=5)
    w, ref = _rela_reference(q, k, v, gain, allowed_mask(b, h, s, s, causal=causal, key_padding_mask=kpm))
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
    out, (bq, _) = lsh_attention(q, k, v, n_buckets=4, n_hashes=3, chunk_size=8, rotations=rot,
                                 return_buckets=True)
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


# ----------------------------------------------------------------------------- v with its own head dim
def _qkv_wide_v(seed: int, b: int = 2, s: int = 40, h: int = 2, hkv: int = 1, d: int = 16, dv: int = 24):
    q, k, _ = random_qkv(b, s, s, h, hkv, d, seed=seed)
    v = torch.randn(b, s, hkv, dv, generator=torch.Generator().manual_seed(seed + 100), dtype=F64)
    return q, k, v.requires_grad_()


def _sparse_layout(s: int = 40) -> ds.BlockSparseLayout:
    """Blocks of 16 over 40 tokens: block row 1 is empty (a chunk without keys), rows differ in width."""
    mask = torch.tensor([[True, False, True], [False, False, False], [True, True, True]])
    return ds.BlockSparseLayout.from_dense_mask(mask, block_size=16, seq_len_q=s)


def _methods_linear_in_v():
    """Methods whose weights do not depend on v, so each value channel is attended independently."""
    from dilated_sparse import methods as M

    lay = _sparse_layout()
    rot = lsh_rotations(16, 4, 2, generator=torch.Generator().manual_seed(3), dtype=F64)
    k_per_head = torch.tensor([2.5, 4.0], dtype=F64)
    return {
        "sparsemax_layout": lambda q, k, v: M.sparsemax_attention(q, k, v, layout=lay, chunk_size=1),
        "entmax_layout": lambda q, k, v: M.entmax_attention(q, k, v, 1.5, layout=lay, causal=True),
        "topk_dense": lambda q, k, v: M.topk_attention(q, k, v, 4, causal=True, chunk_size=7),
        "topk_layout": lambda q, k, v: M.topk_attention(q, k, v, 4, layout=lay),
        "adaptive_topk_dense": lambda q, k, v: M.adaptive_topk(q, k, v, k_per_head, 6, chunk_size=9),
        "adaptive_topk_layout": lambda q, k, v: M.adaptive_topk(q, k, v, k_per_head, 6, layout=lay),
        "lsh": lambda q, k, v: M.lsh_attention(q, k, v, n_buckets=4, n_hashes=2, chunk_size=8, rotations=rot),
    }


@pytest.mark.parametrize("name", sorted(_methods_linear_in_v()))
def test_value_head_dim_of_its_own_matches_per_channel_reference(name):
    fn = _methods_linear_in_v()[name]
    q, k, v = _qkv_wide_v(seed=21)
    out = fn(q, k, v)
    assert out.shape == (*q.shape[:3], v.shape[-1])
    # the same method on two value slices with v's head dim equal to q's (the well-trodden path)
    ref = torch.cat([fn(q, k, v[..., :16]), fn(q, k, v[..., 8:])[..., 8:]], dim=-1)
    assert ref[..., 16:].abs().sum() > 0  # the channels past q's head dim carry something to compare
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    assert_same_grads(out, ref, [q, k, v])


@pytest.mark.parametrize("method", ["sparsemax", "entmax", "rela", "topk"])
def test_value_head_dim_of_its_own_dense_layout_equals_no_layout(method):
    from dilated_sparse import methods as M

    fns = {
        "sparsemax": lambda q, k, v, **kw: M.sparsemax_attention(q, k, v, **kw),
        "entmax": lambda q, k, v, **kw: M.entmax_attention(q, k, v, 1.5, **kw),
        "rela": lambda q, k, v, **kw: M.rela_attention(q, k, v, **kw),
        "topk": lambda q, k, v, **kw: M.topk_attention(q, k, v, 5, **kw),
    }
    q, k, v = _qkv_wide_v(seed=22, s=32)
    dense = ds.patterns.dense(seq_len_q=32, block_size=16)
    out = fns[method](q, k, v, layout=dense)
    ref = fns[method](q, k, v)
    assert out.shape == ref.shape == (*q.shape[:3], 24)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)


def test_rela_value_head_dim_of_its_own_with_layout_matches_definition():
    b, s, h = 2, 40, 2
    q, k, v = _qkv_wide_v(seed=23, b=b, s=s, h=h)
    lay = _sparse_layout(s)
    gain = (torch.rand(h, 24, dtype=F64, generator=torch.Generator().manual_seed(4)) + 0.5).requires_grad_()
    out = rela_attention(q, k, v, gain=gain, layout=lay, causal=True, chunk_size=1)
    _, ref = _rela_reference(q, k, v, gain, allowed_mask(b, h, s, s, causal=True, layout=lay))
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    assert_same_grads(out, ref, [q, k, v, gain])
    assert (out[:, 16:32] == 0).all()  # the empty block row


# ----------------------------------------------------------------------------- key_lengths checks
def _key_length_methods():
    from dilated_sparse import methods as M

    rot = lsh_rotations(8, 2, 1, generator=torch.Generator().manual_seed(7), dtype=F64)  # same hashing each call
    fns = {
        "sparsemax": lambda q, k, v, **kw: M.sparsemax_attention(q, k, v, **kw),
        "sparsemax_layout": lambda q, k, v, **kw: M.sparsemax_attention(q, k, v, layout=_sparse_layout(), **kw),
        "topk": lambda q, k, v, **kw: M.topk_attention(q, k, v, 4, **kw),
        "lsh": lambda q, k, v, **kw: M.lsh_attention(q, k, v, n_buckets=2, chunk_size=16, rotations=rot, **kw),
    }
    if ds.extension_available():
        fns.update({
            "block_topk": lambda q, k, v, **kw: M.block_topk_attention(q, k, v, 2, 16, **kw),
            "sla": lambda q, k, v, **kw: M.sla_attention(q, k, v, block_size=16, **kw),
        })
    return fns


@pytest.mark.parametrize("name", sorted(_key_length_methods()))
def test_methods_check_key_lengths_as_the_op_does(name):
    fn = _key_length_methods()[name]
    q, k, v = random_qkv(2, 40, 40, 2, 2, 8, seed=24)
    for bad, error in (
        (torch.tensor([40, 100]), ValueError),  # past seq_len_k
        (torch.tensor([-5, 10]), ValueError),  # negative
        (torch.tensor([41, 40], dtype=torch.int32), ValueError),
        (torch.tensor([True, False]), TypeError),  # bool is not a length
        (torch.tensor([10.0, 20.0]), TypeError),
        (torch.tensor([10]), ValueError),  # not [batch]
        ([10, 20], TypeError),  # not a tensor
    ):
        with pytest.raises(error, match="key_lengths"):
            fn(q, k, v, key_lengths=bad)
    # lengths in [0, seq_len_k], both ends included, mean the same as the matching padding mask
    lengths = torch.tensor([40, 23])
    kpm = torch.arange(40).view(1, -1) >= lengths.view(-1, 1)
    torch.testing.assert_close(fn(q, k, v, key_lengths=lengths), fn(q, k, v, key_padding_mask=kpm),
                               rtol=1e-12, atol=1e-12)
    if name in ("sparsemax", "sparsemax_layout", "topk", "lsh"):  # an all-padded batch entry gives zeros
        out = fn(q, k, v, key_lengths=torch.tensor([40, 0]))
        assert (out[1] == 0).all() and out[0].abs().sum() > 0


# ----------------------------------------------------------------------------- LSH rotations vs sizes
def test_lsh_rotations_must_match_n_buckets_and_n_hashes():
    q, k, v = random_qkv(1, 32, 32, 2, 2, 16, seed=25, requires_grad=False)
    rot = lsh_rotations(16, 8, 1, generator=torch.Generator().manual_seed(5), dtype=F64)
    for kwargs in ({"n_buckets": 32, "n_hashes": 4}, {"n_buckets": 8, "n_hashes": 2}, {"n_buckets": 16}):
        with pytest.raises(ValueError, match="rotations"):
            lsh_attention(q, k, v, rotations=rot, return_buckets=True, **kwargs)
    with pytest.raises(ValueError, match="rotations"):  # head dim
        lsh_attention(q, k, v, n_buckets=8, rotations=lsh_rotations(8, 8, 1, dtype=F64))
    with pytest.raises(TypeError, match="rotations"):
        lsh_attention(q, k, v, n_buckets=8, rotations=torch.ones(1, 16, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match="n_buckets"):
        lsh_attention(q, k, v, n_buckets=7, rotations=rot)
    with pytest.raises(ValueError, match="n_hashes"):
        lsh_attention(q, k, v, n_hashes=0)
    with pytest.raises(ValueError, match="n_hashes"):
        lsh_rotations(16, 8, 0)
    # matching sizes: one round of 8 buckets, as the rotations say
    _, (bq, bk) = lsh_attention(q, k, v, n_buckets=8, n_hashes=1, rotations=rot, return_buckets=True)
    assert bq.shape == bk.shape == (1, 1, 2, 32) and int(bq.max()) < 8
    rot3 = lsh_rotations(16, 6, 3, generator=torch.Generator().manual_seed(6), dtype=F64)
    _, (bq, _) = lsh_attention(q, k, v, n_buckets=6, n_hashes=3, rotations=rot3, return_buckets=True)
    assert bq.shape == (3, 1, 2, 32) and int(bq.max()) < 6
