"""The [B, S, H, D] modules against references: base, LongNet, hierarchical, Sparse Transformer,
multi-pattern; layout caching, pattern statistics, factory and presets."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import dilated_sparse as ds
from dilated_sparse.modules import block_sparse as block_sparse_module

pytestmark = [pytest.mark.needs_op, pytest.mark.usefixtures("single_thread")]


def qkv(b=2, s=100, h=4, d=8, hkv=None, seed=0, dtype=torch.float64, sk=None):
    g = torch.Generator().manual_seed(seed)
    sk = s if sk is None else sk
    hkv = h if hkv is None else hkv
    return (torch.randn(b, s, h, d, generator=g, dtype=dtype), torch.randn(b, sk, hkv, d, generator=g, dtype=dtype),
            torch.randn(b, sk, hkv, d, generator=g, dtype=dtype))


def dense_attention(q, k, v, token_mask, scale=None):
    """Softmax attention with a token mask [H or 1, Sq, Sk]; rows without keys give 0."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    heads = q.shape[2]
    kk = k.repeat_interleave(heads // k.shape[2], dim=2)
    vv = v.repeat_interleave(heads // v.shape[2], dim=2)
    scores = torch.einsum("bihd,bjhd->bhij", q, kk) * scale
    scores = scores.masked_fill(~token_mask.unsqueeze(0), float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    return torch.einsum("bhij,bjhd->bihd", probs, vv)


# --------------------------------------------------------------------------- base module
@pytest.mark.parametrize("pattern", ["local_window", "dilated_sparse", "global_local", "bigbird", "longformer"])
@pytest.mark.parametrize("causal", [False, True])
def test_base_module_equals_reference(pattern, causal):
    extra = {
        "local_window": {"local_window_size": 32},
        "dilated_sparse": {"sparsity_ratio": 0.4},
        "global_local": {"local_window_size": 32, "global_tokens": 16},
        "bigbird": {"pattern_options": {"num_random_blocks": 1}},
        "longformer": {"local_window_size": 32, "global_tokens": 3},
    }[pattern]
    config = ds.SparsePatternConfig(pattern_type=pattern, block_size=16, **extra)
    module = ds.BlockSparseRingDilatedAttention(
        segment_lengths=[32, 64] if pattern == "dilated_sparse" else None,
        dilation_rates=[1, 2] if pattern == "dilated_sparse" else None, sparse_config=config)
    q, k, v = qkv(s=100, hkv=2)  # GQA, length not a multiple of the block or the segments
    out, weights = module(q, k, v, is_causal=causal, return_attention_weights=True)
    layout = module.get_layout(100, causal=causal, num_heads=4)
    assert layout.density < 1.0
    expected, expected_w = ds.reference_attention(q, k, v, layout, causal=causal, return_attention_weights=True)
    torch.testing.assert_close(out, expected, atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(ds.weights_to_dense(weights), ds.weights_to_dense(expected_w), atol=1e-9, rtol=1e-9)


def test_base_module_gradients_and_padding():
    module = ds.BlockSparseRingDilatedAttentionV2(sparse_config=ds.SparsePatternConfig(
        pattern_type="local_window", block_size=16, local_window_size=48))
    q, k, v = (t.requires_grad_(True) for t in qkv(s=70))
    kpm = torch.zeros(2, 70, dtype=torch.bool)
    kpm[1, 50:] = True
    out = module(q, k, v, key_padding_mask=kpm)
    (out.square().sum()).backward()
    grads = [t.grad.clone() for t in (q, k, v)]
    q2, k2, v2 = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    layout = module.get_layout(70, num_heads=4)
    ds.reference_attention(q2, k2, v2, layout, key_padding_mask=kpm).square().sum().backward()
    for a, b in zip(grads, (q2.grad, k2.grad, v2.grad)):
        torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-9)


def test_layout_cache_per_length_device_and_config():
    module = ds.BlockSparseRingDilatedAttention(sparse_config=ds.SparsePatternConfig(
        pattern_type="dilated_sparse", block_size=16, sparsity_ratio=0.5))
    q, k, v = qkv(s=64, dtype=torch.float32)
    module(q, k, v)
    module(q, k, v)
    assert len(module._layout_cache) == 1 and module._layout_cache.hits >= 1
    lay = module.get_layout(64, num_heads=4)
    assert module.get_layout(64, num_heads=4) is lay
    module(*qkv(s=80, dtype=torch.float32))
    assert len(module._layout_cache) == 2
    module.sparse_config.sparsity_ratio = 0.25  # a config change is a new key
    lay2 = module.get_layout(64, num_heads=4)
    assert lay2 is not lay and lay2.nnz < lay.nnz
    uncached = ds.BlockSparseRingDilatedAttention(enable_caching=False, block_size=16)
    uncached(q, k, v)
    assert len(uncached._layout_cache) == 0


def test_pattern_stats():
    module = ds.BlockSparseRingDilatedAttention(pattern_type="local_window", block_size=32, local_window_size=64)
    stats = module.get_pattern_stats(1000, batch_size=2, num_heads=4)
    for key in ("sparsity", "density", "nnz_blocks", "blocks_per_row_min", "blocks_per_row_mean",
                "blocks_per_row_max", "layout_bytes", "weights_bytes"):
        assert key in stats
    layout = module.get_layout(1000, num_heads=4)
    assert stats["nnz_blocks"] == layout.nnz
    assert abs(stats["sparsity"] + stats["density"] - 1.0) < 1e-12
    assert stats["blocks_per_row_min"] <= stats["blocks_per_row_mean"] <= stats["blocks_per_row_max"] <= 32
    assert stats["weights_bytes"] == 2 * 4 * layout.nnz * 32 * 32 * 4
    assert stats["weights_bytes"] < stats["dense_weights_bytes"]


def test_base_module_option_errors():
    with pytest.raises(TypeError, match="valid options"):
        ds.BlockSparseRingDilatedAttention(sparsity=0.1)
    with pytest.raises(ValueError, match="only 'dilated_sparse'"):
        ds.BlockSparseRingDilatedAttention([64], [1], pattern_type="local_window")
    with pytest.raises(ValueError, match="use_memory_pool"):
        ds.BlockSparseRingDilatedAttention(use_memory_pool=False)
    with pytest.raises(ValueError, match="dropout"):
        ds.BlockSparseRingDilatedAttention(dropout=1.5)
    with pytest.raises(ValueError, match="4-D"):
        ds.BlockSparseRingDilatedAttention(block_size=16)(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2, 3))
    # is_causal="no" would otherwise read as True (a causal layout and mask).
    module = ds.BlockSparseRingDilatedAttention(pattern_type="local_window", block_size=16)
    q, k, v = qkv(s=50, dtype=torch.float32)
    with pytest.raises(TypeError, match="is_causal must be a bool, got str"):
        module(q, k, v, is_causal="no")
    with pytest.raises(TypeError, match="causal must be a bool"):
        module.get_layout(50, causal=None)


def test_mixed_precision_casts_and_returns_input_dtype():
    module = ds.BlockSparseRingDilatedAttention(pattern_type="local_window", block_size=16, mixed_precision=True)
    q, k, v = qkv(s=50, dtype=torch.float32)
    out = module(q, k, v)
    assert out.dtype == torch.float32
    exact = ds.reference_attention(q, k, v, module.get_layout(50, num_heads=4))
    assert (out - exact).abs().max() < 5e-2
    assert (out - exact).abs().max() > 0  # it really computed in bfloat16


# ------------------------------------------------------------------------------ LongNet
def longnet_block_mask(nqb, segments_blocks, rates, heads):
    """[H, nqb, nqb] LongNet rule with blocks for tokens (see modules/dilated.py)."""
    mask = torch.zeros(heads, nqb, nqb, dtype=torch.bool)
    for h in range(heads):
        for s, r in zip(segments_blocks, rates):
            for p in range(nqb):
                a = (p // s) * s
                if (p - a) % r != h % r:
                    continue
                for p2 in range(a, min(a + s, nqb)):
                    if (p2 - a) % r == h % r:
                        mask[h, p, p2] = True
    return mask


@pytest.mark.parametrize("causal", [False, True])
def test_longnet_equals_direct_reference(causal):
    bs, seq, heads = 16, 150, 4
    segs, rates = [32, 64, 128], [1, 2, 4]
    module = ds.DilatedAttention(segs, rates, block_size=bs)
    q, k, v = qkv(s=seq, h=heads)
    out = module(q, k, v, is_causal=causal)
    nqb = -(-seq // bs)
    block_mask = longnet_block_mask(nqb, [s // bs for s in segs], rates, heads)
    token = block_mask.repeat_interleave(bs, 1).repeat_interleave(bs, 2)[:, :seq, :seq]
    if causal:
        token = token & torch.ones(seq, seq, dtype=torch.bool).tril()
    torch.testing.assert_close(out, dense_attention(q, k, v, token), atol=1e-9, rtol=1e-9)
    assert module.get_layout(seq, causal=causal, num_heads=heads).layout_heads == heads


def test_multihead_dilated_attention():
    torch.manual_seed(0)
    mod = ds.MultiheadDilatedAttention(32, 4, dilation_rates=[1, 2], segment_lengths=[32, 64], block_size=16)
    x = torch.randn(2, 90, 32, requires_grad=True)
    out, weights = mod(x, x, x, is_causal=True, need_weights=True)
    assert out.shape == (2, 90, 32) and weights["layout_shape"] == (1, 4)
    q = mod.q_proj(x).view(2, 90, 4, 8)
    k = mod.k_proj(x).view(2, 90, 4, 8)
    v = mod.v_proj(x).view(2, 90, 4, 8)
    inner = mod.attention(q, k, v, is_causal=True)
    torch.testing.assert_close(out, mod.out_proj(mod.norm(inner.reshape(2, 90, 32))))
    out.sum().backward()
    assert x.grad is not None and mod.q_proj.weight.grad is not None
    seq_first = ds.MultiheadDilatedAttention(32, 4, [1], [64], batch_first=False, layer_norm=False, block_size=16)
    assert seq_first(x.transpose(0, 1), x.transpose(0, 1), x.transpose(0, 1))[0].shape == (90, 2, 32)
    with pytest.raises(ValueError, match="same length"):
        ds.DilatedAttention([64, 128], [1])


# -------------------------------------------------------------------------- hierarchical
def test_hierarchical_equals_reference_and_errors():
    config = ds.HierarchicalConfig(level_configs=[
        {"stride": 1, "window_size": 32, "block_size": 16},
        {"stride": 64, "window_size": -1, "block_size": 32},
    ])
    module = ds.BlockSparseHierarchical(hierarchical_config=config)
    assert module.block_size == 16
    q, k, v = qkv(s=200)
    out = module(q, k, v, is_causal=True)
    layout = module.get_layout(200, causal=True, num_heads=4)
    expected_layout = ds.patterns.hierarchical(seq_len_q=200, block_size=16, levels=config.level_configs, causal=True)
    assert layout.equal(expected_layout) and layout.density < 1.0
    torch.testing.assert_close(out, ds.reference_attention(q, k, v, layout, causal=True), atol=1e-9, rtol=1e-9)
    stats = module.get_pattern_stats(200)
    assert [lv["active_positions"] for lv in stats["levels"]] == [200, 4]
    assert stats["active_blocks"] == module.get_layout(200).nnz >= max(lv["active_blocks"] for lv in stats["levels"])
    with_dilated = ds.BlockSparseHierarchical([64], [2], hierarchical_config=config)
    union = ds.patterns.union(expected_layout, ds.patterns.dilated_sparse(
        seq_len_q=200, block_size=16, segment_lengths=[64], dilation_rates=[2], causal=True))
    assert with_dilated.get_layout(200, causal=True).equal(union)
    with pytest.raises(ValueError, match="same length"):
        ds.BlockSparseHierarchical([64, 128], [1], hierarchical_config=config)
    picture = module.visualize_pattern(200)
    assert picture.count("|") == 2 * 13 and "Sparsity" in picture
    assert set(ds.get_hierarchical_presets()) == {"standard", "fine_grained", "long_range", "ultra_sparse"}


# ---------------------------------------------------------------------- Sparse Transformer
def test_sparse_attention_local_is_token_exact():
    heads, ctx, seq = 2, 20, 90
    module = ds.SparseAttention(heads, attn_mode="local", local_attn_ctx=ctx, blocksize=16)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, seq, heads * 8, generator=g, dtype=torch.float64) for _ in range(3))
    out = module(q, k, v)
    i = torch.arange(seq).view(-1, 1)
    j = torch.arange(seq).view(1, -1)
    token = ((j <= i) & (i - j < ctx)).unsqueeze(0)
    split = [t.view(2, seq, heads, 8) for t in (q, k, v)]
    torch.testing.assert_close(out, dense_attention(*split, token).reshape(2, seq, heads * 8), atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("mode", ["all", "strided"])
def test_sparse_attention_modes_equal_layout_reference(mode):
    module = ds.SparseAttention(4, attn_mode=mode, local_attn_ctx=48, blocksize=16)
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 130, 32, generator=g, dtype=torch.float64) for _ in range(3))
    out = module(q, k, v)
    layout = module.get_layout(130, causal=True, num_heads=4)
    split = [t.view(1, 130, 4, 8) for t in (q, k, v)]
    torch.testing.assert_close(out, ds.reference_attention(*split, layout, causal=True).reshape(1, 130, 32),
                               atol=1e-9, rtol=1e-9)
    with pytest.raises(ValueError, match="attn_mode"):
        ds.SparseAttention(4, attn_mode="fixed")
    with pytest.raises(ValueError, match="local_attn_ctx"):
        ds.SparseAttention(4, attn_mode="local")


def test_multi_pattern_one_call_per_head_layout(monkeypatch):
    module = ds.MultiPatternAttention(["local_window", {"pattern": "dilated_sparse", "sparsity_ratio": 0.5}],
                                      block_size=16)
    calls = []
    original = block_sparse_module.block_sparse_attention

    def counting(*args, **kwargs):
        calls.append(args[3])
        return original(*args, **kwargs)

    monkeypatch.setattr(block_sparse_module, "block_sparse_attention", counting)
    q, k, v = qkv(s=96, h=4)
    out = module(q, k, v)
    assert len(calls) == 1 and calls[0].layout_heads == 4
    local = ds.SparsePatternConfig(pattern_type="local_window", block_size=16).make_layout(96)
    dil = ds.SparsePatternConfig(pattern_type="dilated_sparse", sparsity_ratio=0.5, block_size=16).make_layout(96)
    expected = torch.cat([ds.reference_attention(q[:, :, :2], k[:, :, :2], v[:, :, :2], local),
                          ds.reference_attention(q[:, :, 2:], k[:, :, 2:], v[:, :, 2:], dil)], dim=2)
    torch.testing.assert_close(out, expected, atol=1e-9, rtol=1e-9)
    with pytest.raises(ValueError, match="multiple"):
        module(*qkv(s=96, h=3))
    with pytest.raises(ValueError, match="block_size"):
        ds.MultiPatternAttention([ds.SparsePatternConfig(block_size=32)], block_size=16)


# --------------------------------------------------------------------- factory and presets
@pytest.mark.parametrize(
    ("kind", "options", "cls"),
    [
        ("base", {"sparsity_ratio": 0.25, "block_size": 16}, ds.BlockSparseRingDilatedAttention),
        ("hierarchical", {}, ds.BlockSparseHierarchical),
        ("adaptive", {"block_size": 16, "sparsity_ratio": 0.5}, ds.BlockSparseAdaptive),
        ("multihead", {"embed_dim": 32, "num_heads": 4, "block_size": 16}, ds.BlockSparseRingMultiheadDilatedAttention),
        ("auto", {"sparsity_ratio": 0.1, "block_size": 64}, ds.BlockSparseRingDilatedAttention),
        ("auto", {"embed_dim": 32, "num_heads": 4}, ds.BlockSparseMultiheadAttention),
        ("auto", {"hierarchical_config": ds.HierarchicalConfig()}, ds.BlockSparseHierarchical),
        ("auto", {"adaptive_config": ds.AdaptiveConfig(block_size=16)}, ds.BlockSparseAdaptive),
    ],
)
def test_factory_kinds(kind, options, cls):
    module = ds.create_block_sparse_attention(kind, **options)
    assert isinstance(module, cls)
    if kind == "adaptive":
        assert abs(module.config.base_sparsity - 0.5) < 1e-12
    if "sparsity_ratio" in options and kind in ("base", "auto"):
        assert module.sparse_config.sparsity_ratio == options["sparsity_ratio"]


def test_factory_errors():
    with pytest.raises(ValueError, match="valid kinds"):
        ds.create_block_sparse_attention("nope")
    with pytest.raises(TypeError, match="valid options") as info:
        ds.create_block_sparse_attention("base", sparsity=0.1)
    assert "sparsity_ratio" in str(info.value)
    with pytest.raises(TypeError, match="valid options"):
        ds.create_block_sparse_attention("hierarchical", sparsity_ratio=0.1)
    with pytest.raises(TypeError, match="embed_dim"):
        ds.create_block_sparse_attention("multihead", num_heads=4)
    with pytest.raises(ValueError, match="contradicts"):
        ds.create_block_sparse_attention("adaptive", sparsity_ratio=0.5,
                                         adaptive_config=ds.AdaptiveConfig(base_sparsity=0.9))
    with pytest.raises(ValueError, match="use_memory_pool"):
        ds.create_block_sparse_attention("base", use_memory_pool=False)


def test_factory_distributed_kind():
    module = ds.create_block_sparse_attention("distributed", sparsity_ratio=0.5, block_size=16,
                                              enable_deepspeed_integration=False)
    assert isinstance(module, ds.BlockSparseRingDistributedDilatedAttention)
    assert module.distributed_config.enable_deepspeed_integration is False


@pytest.mark.parametrize("name", ["ultra_sparse", "hierarchical_long", "hierarchical_fine", "global_local", "local",
                                  "dilated", "bigbird", "longformer", "adaptive"])
def test_presets_build_and_run(name):
    module = ds.get_block_sparse_preset(name)
    q, k, v = qkv(b=1, s=300, h=2, d=8, dtype=torch.float32)
    out = module(q, k, v, is_causal=True)
    assert out.shape == q.shape and torch.isfinite(out).all()
    if not isinstance(module, ds.BlockSparseAdaptive):
        assert 0.0 < module.get_pattern_stats(4096)["density"] <= 1.0


def test_preset_overrides_and_unknown():
    module = ds.get_block_sparse_preset("local", block_size=32)
    assert module.sparse_config.block_size == 32 and module.sparse_config.local_window_size == 512
    with pytest.raises(ValueError, match="valid presets"):
        ds.get_block_sparse_preset("nope")
    assert "bigbird" in ds.list_block_sparse_presets()


def test_modules_compose_in_nn_sequential():
    # the [B, S, H, D] modules are plain nn.Modules (parameters, state_dict, to(), repr)
    module = ds.BlockSparseRingDilatedAttention(block_size=16)
    assert isinstance(module, nn.Module) and "dilated_sparse" in repr(module)
    assert module.state_dict() == {}
