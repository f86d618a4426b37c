"""BlockSparseMultiheadAttention as a drop-in for nn.MultiheadAttention (values, grads, masks)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import dilated_sparse as ds
from dilated_sparse.modules._dropout import dropout_block_sparse_attention

pytestmark = [pytest.mark.needs_op, pytest.mark.usefixtures("single_thread")]


E, H = 32, 4


def close(a, b, tol=2e-5):
    scale = b.abs().max().clamp_min(1.0)
    err = ((a.double() - b.double()).abs().max() / scale).item()
    assert err <= tol, f"relative error {err:.3g}"


def pair(seed=0, **kwargs):
    torch.manual_seed(seed)
    ref = nn.MultiheadAttention(E, H, **kwargs)
    mine = ds.BlockSparseMultiheadAttention(E, H, block_size=16, **kwargs)
    mine.load_state_dict(ref.state_dict())
    return ref, mine


def inputs(bsz, sq, sk, batch_first, seed=1, kdim=E, vdim=E):
    g = torch.Generator().manual_seed(seed)
    shape = (lambda s, e: (bsz, s, e)) if batch_first else (lambda s, e: (s, bsz, e))
    q = torch.randn(*shape(sq, E), generator=g)
    k = torch.randn(*shape(sk, kdim), generator=g)
    v = torch.randn(*shape(sk, vdim), generator=g)
    return q, k, v


def padding(bsz, sk, kind):
    if kind is None:
        return None
    mask = torch.zeros(bsz, sk, dtype=torch.bool)
    if kind == "right":
        mask[0, -7:] = True
    elif kind == "left":
        mask[1, :5] = True
    else:  # scattered positions, not at the start (so causal rows keep a key)
        mask[0, 3::4] = True
        mask[1, 1::3] = True
    return mask


def compare(ref, mine, q, k, v, *, kpm=None, causal=False, need_weights=False, average=True, mask_for_ref=True):
    sq, sk = (q.shape[1], k.shape[1]) if ref.batch_first else (q.shape[0], k.shape[0])
    qs = [t.clone().requires_grad_(True) for t in (q, k, v)]
    qm = [t.clone().requires_grad_(True) for t in (q, k, v)]
    attn_mask = None
    if causal:  # float mask (as nn.Transformer makes it) unless a bool padding mask is given
        attn_mask = (torch.ones(sq, sk, dtype=torch.bool).triu(1) if kpm is not None
                     else nn.Transformer.generate_square_subsequent_mask(sq))
    o1, w1 = ref(*qs, key_padding_mask=kpm, need_weights=need_weights, attn_mask=attn_mask,
                 average_attn_weights=average, is_causal=causal)
    if mask_for_ref:
        o2, w2 = mine(*qm, key_padding_mask=kpm, need_weights=need_weights, average_attn_weights=average,
                      is_causal=causal)
    else:
        o2, w2 = mine(*qm, key_padding_mask=kpm, need_weights=need_weights, attn_mask=attn_mask,
                      average_attn_weights=average)
    close(o2, o1)
    g = torch.randn_like(o1)
    (o1 * g).sum().backward()
    (o2 * g).sum().backward()
    for a, b in zip(qm, qs):
        close(a.grad, b.grad)
    for (name, p1), (_, p2) in zip(ref.named_parameters(), mine.named_parameters()):
        assert p2.grad is not None, name
        close(p2.grad, p1.grad)
    if need_weights:
        dense = ds.weights_to_dense(w2)
        expected = w1.unsqueeze(1) if average else w1
        close(dense, expected)
    else:
        assert w2 is None


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("kpm", [None, "right", "left", "scattered"])
def test_equals_nn_multihead(batch_first, causal, kpm):
    ref, mine = pair(batch_first=batch_first)
    q, k, v = inputs(2, 37, 37, batch_first)
    compare(ref, mine, q, k, v, kpm=padding(2, 37, kpm), causal=causal)


@pytest.mark.parametrize("average", [True, False])
@pytest.mark.parametrize("causal", [False, True])
def test_need_weights(average, causal):
    ref, mine = pair(batch_first=True)
    q, k, v = inputs(2, 29, 29, True)
    compare(ref, mine, q, k, v, kpm=padding(2, 29, "scattered"), causal=causal, need_weights=True, average=average)


def test_self_attention_same_tensor_and_cross_attention_kdim_vdim():
    ref, mine = pair(batch_first=True)
    x = torch.randn(2, 33, E)
    compare(ref, mine, x, x, x)
    ref, mine = pair(batch_first=False, kdim=24, vdim=40, bias=False)
    assert set(ref.state_dict()) == set(mine.state_dict())
    q, k, v = inputs(3, 21, 45, False, kdim=24, vdim=40)
    compare(ref, mine, q, k, v, kpm=padding(3, 45, "right"), need_weights=True)


def test_bias_kv_and_zero_attn():
    ref, mine = pair(batch_first=True, add_bias_kv=True, add_zero_attn=True)
    q, k, v = inputs(2, 19, 19, True)
    compare(ref, mine, q, k, v, kpm=padding(2, 19, "left"), need_weights=True)
    with pytest.raises(ValueError, match="causal"):
        mine(q, k, v, is_causal=True)
    with pytest.raises(ValueError, match="pattern='all'"):
        ds.BlockSparseMultiheadAttention(E, H, add_bias_kv=True, pattern="local_window")


def test_unbatched_input():
    ref, mine = pair()
    x = torch.randn(23, E)
    o1, _ = ref(x, x, x, need_weights=False)
    o2, _ = mine(x, x, x, need_weights=False)
    assert o2.shape == (23, E)
    close(o2, o1)


def test_masks_recognised_and_refused():
    ref, mine = pair(batch_first=True)
    q, k, v = inputs(2, 20, 20, True)
    compare(ref, mine, q, k, v, causal=True, mask_for_ref=False)  # float causal mask passed as attn_mask
    bool_causal = torch.ones(20, 20, dtype=torch.bool).triu(1)
    o1, _ = mine(q, k, v, attn_mask=bool_causal, need_weights=False)
    o2, _ = mine(q, k, v, is_causal=True, need_weights=False)
    torch.testing.assert_close(o1, o2)
    o3, _ = mine(q, k, v, attn_mask=torch.zeros(20, 20), need_weights=False)
    o4, _ = mine(q, k, v, need_weights=False)
    torch.testing.assert_close(o3, o4)
    banded = torch.ones(20, 20, dtype=torch.bool).triu(3)
    with pytest.raises(ValueError, match="key_padding_mask") as info:
        mine(q, k, v, attn_mask=banded)
    assert "pattern" in str(info.value) and "is_causal" in str(info.value)
    with pytest.raises(ValueError, match="not the causal mask"):
        mine(q, k, v, attn_mask=banded, is_causal=True)
    with pytest.raises(ValueError, match="shape"):
        mine(q, k, v, attn_mask=torch.zeros(5, 5))


def test_float_key_padding_mask():
    _ref, mine = pair(batch_first=True)
    q, k, v = inputs(2, 20, 20, True)
    kpm = padding(2, 20, "right")
    fmask = torch.zeros(2, 20).masked_fill(kpm, float("-inf"))
    o1, _ = mine(q, k, v, key_padding_mask=kpm, need_weights=False)
    o2, _ = mine(q, k, v, key_padding_mask=fmask, need_weights=False)
    torch.testing.assert_close(o1, o2)
    with pytest.raises(ValueError, match="only 0"):
        mine(q, k, v, key_padding_mask=torch.randn(2, 20))


def test_fully_padded_rows_give_zero_not_nan():
    _, mine = pair(batch_first=True)
    q, k, v = inputs(1, 16, 16, True)
    kpm = torch.ones(1, 16, dtype=torch.bool)
    out, _ = mine(q, k, v, key_padding_mask=kpm, need_weights=False)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, mine.out_proj.bias.expand_as(out))


def test_state_dict_round_trip_and_isinstance():
    ref, mine = pair(batch_first=True, add_bias_kv=True)
    assert isinstance(mine, nn.MultiheadAttention)
    assert list(ref.state_dict()) == list(mine.state_dict())
    back = nn.MultiheadAttention(E, H, batch_first=True, add_bias_kv=True)
    back.load_state_dict(mine.state_dict())


def test_sparse_pattern_equals_reference():
    torch.manual_seed(0)
    mine = ds.BlockSparseMultiheadAttention(E, H, batch_first=True, pattern="local_window", block_size=16,
                                            pattern_options={"window_size": 32})
    x = torch.randn(2, 70, E)
    kpm = padding(2, 70, "scattered")
    out, weights = mine(x, x, x, key_padding_mask=kpm, is_causal=True, average_attn_weights=False)
    q, k, v = (t.reshape(2, 70, H, E // H) for t in mine._project(x, x, x))
    layout = mine.get_layout(70, causal=True)
    assert layout.density < 1.0
    expected = ds.reference_attention(q, k, v, layout, causal=True, key_padding_mask=kpm)
    close(out, mine.out_proj(expected.reshape(2, 70, E)))
    ref_w = ds.reference_attention(q, k, v, layout, causal=True, key_padding_mask=kpm,
                                   return_attention_weights=True)[1]
    close(ds.weights_to_dense(weights), ds.weights_to_dense(ref_w))
    assert mine.get_layout(70, causal=True) is layout  # cached
    stats = mine.get_pattern_stats(70, causal=True)
    assert stats["nnz_blocks"] == layout.nnz and stats["weights_bytes"] > 0


def test_pattern_kinds():
    x = torch.randn(1, 40, E)
    lay = ds.patterns.local_window(seq_len_q=40, block_size=16, window_size=16)
    m = ds.BlockSparseMultiheadAttention(E, H, batch_first=True, pattern=lay)
    m(x, x, x)
    with pytest.raises(ValueError, match="seq_len_q=40"):
        m(x[:, :30], x[:, :30], x[:, :30])
    cfg = ds.SparsePatternConfig(pattern_type="global_local", global_tokens=16, local_window_size=32, block_size=16)
    ds.BlockSparseMultiheadAttention(E, H, batch_first=True, pattern=cfg)(x, x, x)
    ds.BlockSparseMultiheadAttention(E, H, batch_first=True, pattern=ds.patterns.block_neighbour, block_size=16)(x, x, x)
    with pytest.raises(TypeError, match="pattern must be"):
        ds.BlockSparseMultiheadAttention(E, H, pattern=3)
    with pytest.raises(ValueError, match="unknown pattern"):
        ds.BlockSparseMultiheadAttention(E, H, pattern="nope")
    # Segments a fixed layout or a callable would not use are refused, not dropped.
    for pattern, kind in ((lay, "fixed layout"), (ds.patterns.block_neighbour, "callable")):
        with pytest.raises(ValueError, match=f"a {kind} pattern does not use them"):
            ds.BlockSparseMultiheadAttention(E, H, pattern=pattern, segment_lengths=[32], dilation_rates=[1])


def test_dropout_training_mode():
    torch.manual_seed(0)
    ref, mine = pair(batch_first=True, dropout=0.3)
    q, k, v = inputs(2, 24, 24, True)
    mine.eval()
    ref.eval()
    eval_out, _eval_w = mine(q, k, v)
    o_ref, _ = ref(q, k, v)
    close(eval_out, o_ref)  # dropout off in eval
    mine.train()
    a, _ = mine(q, k, v, need_weights=False)
    b, _ = mine(q, k, v, need_weights=False)
    assert not torch.allclose(a, b)
    runs = torch.stack([mine(q, k, v, need_weights=False)[0] for _ in range(100)])
    assert (runs.mean(0) - eval_out).abs().mean() < 0.15 * eval_out.abs().mean()  # unbiased: E[train] = eval
    assert (runs.mean(0) - eval_out).abs().mean() < 0.5 * (runs[0] - eval_out).abs().mean()
    _, w = mine(q, k, v, average_attn_weights=False)
    dense = ds.weights_to_dense(w)
    kept = dense[dense > 0]
    eval_dense = ds.weights_to_dense(mine.eval()(q, k, v, average_attn_weights=False)[1])
    zero_fraction = 1 - kept.numel() / (eval_dense > 0).sum()
    assert 0.2 < zero_fraction < 0.4
    mine.train()
    out, _ = mine(q, k, v, need_weights=False)
    out.sum().backward()
    assert mine.in_proj_weight.grad is not None


def test_dropout_path_without_dropout_equals_op():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 45, 4, 8, generator=g, dtype=torch.float64) for _ in range(3))
    k, v = k[:, :, :2], v[:, :, :2]  # GQA
    lay = ds.patterns.make_layout("bigbird", seq_len_q=45, block_size=16, num_heads=4,
                                  different_layout_per_head=True)
    kpm = padding(2, 45, "scattered")
    for causal in (False, True):
        a, wa = dropout_block_sparse_attention(q, k, v, lay, dropout_p=0.0, causal=causal, key_padding_mask=kpm,
                                               return_attention_weights=True)
        b, wb = ds.block_sparse_attention(q, k, v, lay, causal=causal, key_padding_mask=kpm,
                                          return_attention_weights=True)
        torch.testing.assert_close(a, b)
        torch.testing.assert_close(ds.weights_to_dense(wa), ds.weights_to_dense(wb))


def test_transformer_encoder_layer_uses_this_forward():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(E, H, dim_feedforward=64, batch_first=True, dropout=0.0)
    sparse = ds.BlockSparseMultiheadAttention(E, H, batch_first=True, pattern="local_window", block_size=16,
                                              pattern_options={"window_size": 16})
    sparse.load_state_dict(layer.self_attn.state_dict())
    dense_layer = nn.TransformerEncoderLayer(E, H, dim_feedforward=64, batch_first=True, dropout=0.0)
    dense_layer.load_state_dict(layer.state_dict())
    layer.self_attn = sparse
    layer.eval()
    dense_layer.eval()
    x = torch.randn(2, 64, E)
    with torch.no_grad():
        y_sparse = layer(x)
        y_dense = dense_layer(x)
        manual = x + sparse(x, x, x, need_weights=False)[0]
        manual = layer.norm1(manual)
        manual = layer.norm2(manual + layer.linear2(layer.activation(layer.linear1(manual))))
    assert not torch.allclose(y_sparse, y_dense, atol=1e-3)
    close(y_sparse, manual)


def test_mixed_precision_and_options():
    x = torch.randn(2, 40, E)
    m = ds.BlockSparseMultiheadAttention(E, H, batch_first=True, mixed_precision=True)
    ref = nn.MultiheadAttention(E, H, batch_first=True)
    ref.load_state_dict(m.state_dict())
    out, _ = m(x, x, x, need_weights=False)
    assert out.dtype == torch.float32
    close(out, ref(x, x, x)[0], tol=3e-2)
    with pytest.raises(ValueError, match="use_memory_pool"):
        ds.BlockSparseMultiheadAttention(E, H, use_memory_pool=False)
    with pytest.raises(ValueError, match="mixed_precision"):
        ds.BlockSparseMultiheadAttention(E, H, mixed_precision="fp8")


@pytest.mark.parametrize("per_batch", [False, True])
def test_average_weights_over_heads_with_per_head_layouts(per_batch):
    from dilated_sparse.modules.multihead import average_weights_over_heads

    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, 50, 4, 8, generator=g, dtype=torch.float64) for _ in range(3))
    mask = torch.rand(2 if per_batch else 1, 4, 4, 4, generator=g) < 0.5
    mask |= torch.eye(4, dtype=torch.bool)
    layout = ds.BlockSparseLayout.from_dense_mask(mask, block_size=16, seq_len_q=50)
    _, weights = ds.block_sparse_attention(q, k, v, layout, return_attention_weights=True)
    averaged = average_weights_over_heads(weights)
    torch.testing.assert_close(ds.weights_to_dense(averaged), ds.weights_to_dense(weights).mean(1, keepdim=True))
    m = ds.BlockSparseMultiheadAttention(E, H, batch_first=True, pattern=ds.SparsePatternConfig(
        pattern_type="bigbird", block_size=16, pattern_options={"num_heads": H, "different_layout_per_head": True}))
    x = torch.randn(2, 64, E)
    _, w_avg = m(x, x, x)
    _, w_all = m(x, x, x, average_attn_weights=False)
    torch.testing.assert_close(ds.weights_to_dense(w_avg), ds.weights_to_dense(w_all).mean(1, keepdim=True))
