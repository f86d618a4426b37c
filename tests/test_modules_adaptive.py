"""Adaptive layouts (gates, gradients, training), temperature annealing, progressive sparsity."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import nn

import dilated_sparse as ds
from dilated_sparse.modules.adaptive import gated_block_sparse_attention

pytestmark = [pytest.mark.needs_op, pytest.mark.usefixtures("single_thread")]


def qkv(b=2, s=80, h=2, d=8, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, s, h, d, generator=g, dtype=dtype) for _ in range(3)]


@pytest.mark.parametrize("causal", [False, True])
def test_gate_gradient_equals_dense_definition(causal):
    """dL/dgate equals the derivative of attention whose block exp-scores are scaled by the gate."""
    bsz, seq, heads, dim, bs = 2, 70, 2, 8, 16
    q, k, v = qkv(bsz, seq, heads, dim)
    g = torch.Generator().manual_seed(3)
    nqb = -(-seq // bs)
    mask = torch.rand(bsz, heads, nqb, nqb, generator=g) < 0.5
    mask |= torch.eye(nqb, dtype=torch.bool)
    layout = ds.BlockSparseLayout.from_dense_mask(mask, block_size=bs, seq_len_q=seq)
    gate = torch.ones(bsz, heads, layout.max_slice_nnz, dtype=torch.float64, requires_grad=True)
    dout = torch.randn(bsz, seq, heads, dim, generator=g, dtype=torch.float64)
    out = gated_block_sparse_attention(q, k, v, gate, layout, causal=causal)
    (out * dout).sum().backward()
    # dense definition: log(gate) added to the scores of each block (gate = 1 -> unchanged output)
    log_gate = torch.zeros(bsz, heads, nqb, nqb, dtype=torch.float64, requires_grad=True)
    scores = torch.einsum("bihd,bjhd->bhij", q, k) / math.sqrt(dim)
    bias = log_gate.repeat_interleave(bs, 2).repeat_interleave(bs, 3)[:, :, :seq, :seq]
    token = mask.repeat_interleave(bs, 2).repeat_interleave(bs, 3)[:, :, :seq, :seq]
    if causal:
        token = token & torch.ones(seq, seq, dtype=torch.bool).tril()
    probs = torch.softmax((scores + bias).masked_fill(~token, float("-inf")), dim=-1)
    dense_out = torch.einsum("bhij,bjhd->bihd", probs, v)
    torch.testing.assert_close(out, dense_out, atol=1e-9, rtol=1e-9)
    (dense_out * dout).sum().backward()
    crow = layout.crow_indices.to(torch.int64)
    col = layout.col_indices.to(torch.int64)
    for b in range(bsz):
        for h in range(heads):
            s = b * heads + h
            start = int(crow[s * nqb])
            for qb in range(nqb):
                lo, hi = int(crow[s * nqb + qb]), int(crow[s * nqb + qb + 1])
                expected = log_gate.grad[b, h, qb, col[lo:hi]]
                torch.testing.assert_close(gate.grad[b, h, lo - start:hi - start], expected, atol=1e-9, rtol=1e-9)


def test_adaptive_layout_and_output():
    config = ds.AdaptiveConfig(base_sparsity=0.5, block_size=16, hidden_dim=16)
    module = ds.BlockSparseAdaptive(num_heads=2, head_dim=8, adaptive_config=config).double()
    q, k, v = qkv()
    module.eval()
    out, weights, info = module(q, k, v, is_causal=True, return_attention_weights=True, return_pattern=True)
    layout = info["layout"]
    assert layout.layout_shape == (2, 2)  # content-dependent: per batch element and head
    nqb = 5
    counts = layout.row_counts().view(2, 2, nqb)
    assert (counts >= 1).all() and (counts <= info["keep_per_row"]).all()
    assert int(counts.max()) == round(0.5 * nqb)
    torch.testing.assert_close(out, ds.reference_attention(q, k, v, layout, causal=True), atol=1e-9, rtol=1e-9)
    stats = module.get_pattern_stats(80, causal=True, batch_size=2)
    assert stats["nnz_blocks"] == layout.nnz and stats["layout_shape"] == (2, 2)
    assert stats["blocks_per_row_max"] == info["keep_per_row"]
    assert ds.weights_to_dense(weights).shape == (2, 2, 80, 80)
    shared = ds.BlockSparseAdaptive(adaptive_config=ds.AdaptiveConfig(block_size=16, share_across_heads=True))
    _, info = shared(*qkv(dtype=torch.float32), return_pattern=True)
    assert info["layout"].layout_heads == 1 and shared.head_dim is None  # head_dim inferred lazily
    with pytest.raises(ValueError, match="num_heads"):
        module(*qkv(h=3))


def test_candidates_from_dilated_structure():
    module = ds.BlockSparseAdaptive([32, 64], [1, 2], adaptive_config=ds.AdaptiveConfig(block_size=16,
                                                                                        base_sparsity=0.0))
    q, k, v = qkv(dtype=torch.float32)
    module.eval()
    _, info = module(q, k, v, return_pattern=True)
    candidates = ds.patterns.dilated_sparse(seq_len_q=80, block_size=16, segment_lengths=[32, 64],
                                            dilation_rates=[1, 2]).to_dense_mask()[0, 0]
    assert (info["patterns"] <= candidates).all()
    assert torch.equal(info["patterns"].any(dim=(0, 1)), candidates)


def test_adaptive_trains_and_gradients_reach_importance_net():
    torch.manual_seed(0)
    bsz, seq, heads, dim, bs = 8, 64, 2, 8, 16
    config = ds.AdaptiveConfig(base_sparsity=0.5, block_size=bs, hidden_dim=16, temperature=1.0)
    attn = ds.BlockSparseAdaptive(num_heads=heads, head_dim=dim, adaptive_config=config)
    proj = nn.Linear(heads * dim, 3 * heads * dim)
    model = nn.ModuleDict({"attn": attn, "proj": proj})
    trainer = ds.AdaptiveSparsityTrainer(model, initial_temperature=1.0, final_temperature=0.1, annealing_steps=40)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(bsz, seq, heads * dim, generator=g)
    # target: every token needs the first block's mean (far away for late blocks)
    target = x[:, :bs].mean(dim=1, keepdim=True).expand(bsz, seq, heads * dim)
    losses = []
    for step in range(40):
        q, k, v = proj(x).view(bsz, seq, 3, heads, dim).unbind(2)
        out = attn(q, k, v)
        loss = (out.reshape(bsz, seq, heads * dim) - target).square().mean()
        opt.zero_grad()
        loss.backward()
        if step == 0:
            tower_grads = [p.grad for p in attn.query_tower.parameters()] + [attn.log_temperature_scale.grad]
            assert all(t is not None and t.abs().sum() > 0 for t in tower_grads)
        opt.step()
        trainer.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5
    assert abs(float(attn.temperature) - 0.1) < 1e-6 and trainer.temperature == pytest.approx(0.1)
    assert attn.get_sparsity_loss().item() >= 0.0


def test_temperature_schedules():
    module = ds.BlockSparseAdaptive(adaptive_config=ds.AdaptiveConfig(block_size=16, min_temperature=0.2))
    for schedule in ("exponential", "linear", "cosine"):
        trainer = ds.AdaptiveSparsityTrainer(module, 1.0, 0.1, annealing_steps=10, schedule=schedule)
        temps = [trainer.step() for _ in range(12)]
        assert all(a >= b for a, b in itertools.pairwise(temps)) and temps[-1] == pytest.approx(0.1)
    assert module.effective_temperature().item() == pytest.approx(0.2)  # floored at min_temperature
    with pytest.raises(ValueError, match="no BlockSparseAdaptive"):
        ds.AdaptiveSparsityTrainer(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="schedule"):
        ds.AdaptiveSparsityTrainer(module, schedule="step")


def test_progressive_scheduler_changes_the_layout_used():
    module = ds.BlockSparseRingDilatedAttention(pattern_type="dilated_sparse", block_size=16)
    scheduler = ds.ProgressiveSparsityScheduler(module, initial_sparsity=0.5, final_sparsity=0.9, total_steps=4)
    q, k, v = qkv(s=256, dtype=torch.float32)
    densities = []
    for _ in range(5):
        module(q, k, v)
        densities.append(module.get_layout(256, num_heads=2).density)
        scheduler.step()
    assert densities[0] == pytest.approx(0.5, abs=0.01) and densities[-1] == pytest.approx(0.1, abs=0.01)
    assert all(a > b for a, b in itertools.pairwise(densities))
    adaptive = ds.BlockSparseAdaptive(adaptive_config=ds.AdaptiveConfig(block_size=16))
    ds.ProgressiveSparsityScheduler(adaptive, 0.2, 0.8, total_steps=2).step()
    assert adaptive.config.base_sparsity == pytest.approx(0.5)
    with pytest.raises(ValueError, match="no target density"):
        ds.ProgressiveSparsityScheduler(ds.BlockSparseMultiheadAttention(16, 2, pattern="all"))
    with pytest.raises(ValueError, match="no block-sparse module"):
        ds.ProgressiveSparsityScheduler(nn.Linear(2, 2))


def test_dropout_path_gates_match_the_op_gates():
    """The dropout path's block gates give the same gradients as the op's straight-through gates."""
    from dilated_sparse.modules._dropout import dropout_block_sparse_attention
    from dilated_sparse.modules.adaptive import _slice_tables

    bsz, seq, heads, dim, bs = 2, 50, 2, 8, 16
    q, k, v = qkv(bsz, seq, heads, dim)
    nqb = -(-seq // bs)
    mask = torch.rand(bsz, heads, nqb, nqb, generator=torch.Generator().manual_seed(5)) < 0.6
    mask |= torch.eye(nqb, dtype=torch.bool)
    layout = ds.BlockSparseLayout.from_dense_mask(mask, block_size=bs, seq_len_q=seq)
    grid = torch.ones(bsz, heads, nqb, nqb, dtype=torch.float64, requires_grad=True)
    out = dropout_block_sparse_attention(q, k, v, layout, dropout_p=0.0, causal=True, block_gate=grid)
    out.square().sum().backward()
    qb, kb, valid = _slice_tables(layout, bsz, heads)
    gate = torch.ones(bsz, heads, qb.shape[-1], dtype=torch.float64, requires_grad=True)
    out2 = gated_block_sparse_attention(q, k, v, gate, layout, causal=True)
    out2.square().sum().backward()
    torch.testing.assert_close(out, out2, atol=1e-9, rtol=1e-9)
    b_i = torch.arange(bsz).view(-1, 1, 1)
    h_i = torch.arange(heads).view(1, -1, 1)
    torch.testing.assert_close(grid.grad[b_i, h_i, qb, kb] * valid, gate.grad, atol=1e-9, rtol=1e-9)


def test_adaptive_with_dropout_still_trains_the_importance_net():
    module = ds.BlockSparseAdaptive(num_heads=2, head_dim=8, dropout=0.2,
                                    adaptive_config=ds.AdaptiveConfig(block_size=16, base_sparsity=0.5))
    q, k, v = qkv(dtype=torch.float32)
    module(q, k, v).square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in module.key_tower.parameters())


def test_config_changed_on_the_module_is_validated():
    module = ds.BlockSparseAdaptive(num_heads=2, head_dim=8, adaptive_config=ds.AdaptiveConfig(block_size=16)).eval()
    q, k, v = qkv(b=1, s=64)
    with pytest.raises(ValueError, match="base_sparsity"):
        module.config.base_sparsity = 1.7
    with pytest.raises(ValueError, match="block_size"):
        module.config.block_size = 48
    assert module.config.base_sparsity == 0.9 and module.block_size == 16
    module.config.base_sparsity = 0.5  # valid: 2 of the 4 key blocks of each row
    _, pattern = module(q, k, v, return_pattern=True)
    assert pattern["keep_per_row"] == 2
    assert module.get_pattern_stats(64)["keep_per_row"] == 2
    module.config.base_sparsity = 0.0
    assert module(q, k, v, return_pattern=True)[1]["keep_per_row"] == 4
