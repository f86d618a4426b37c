"""SparseTransformerBlock: every method trains in a short CPU loop (the loss falls), plus the
SparseMethodAttention wrapper's checks."""

from __future__ import annotations

import pytest
import torch

import dilated_sparse as ds
from dilated_sparse.methods import SparseMethodAttention, SparseTransformerBlock, available_methods

pytestmark = pytest.mark.usefixtures("single_thread")


SEQ, D_MODEL, HEADS, STEPS = 48, 32, 2, 30
KERNEL_METHODS = {"block_topk", "sla", "bigbird", "block", "block_neighbour", "dilated", "local", "longformer",
                  "pattern"}
OPTIONS = {
    "dense": {},
    "topk": {"top_k": 8},
    "adaptive_topk": {"k_max": 16, "reg_weight": 0.01},
    "entmax": {"learn_alpha": True, "n_iter": 25},
    "sparsemax": {},
    "gumbel": {"initial_temperature": 1.0, "final_temperature": 0.3, "total_steps": STEPS},
    "gated": {"max_seq_len": SEQ, "block_size": 16, "l0_weight": 0.01},
    "rela": {},
    "sparsek": {"k_keep": 8},
    "sla": {"block_size": 16, "critical_fraction": 0.34},
    "lsh": {"n_buckets": 4, "chunk_size": 16},
    "block_topk": {"blocks_per_row": 2, "block_size": 16},
    "bigbird": {"block_size": 16},
    "block": {"block_size": 16},
    "block_neighbour": {"block_size": 16, "radius": 1},
    "dilated": {"block_size": 16, "dilation_rates": [1, 2]},
    "local": {"block_size": 16, "window_size": 32},
    "longformer": {"block_size": 16, "window_size": 32, "global_tokens": 1},
    "pattern": {"pattern": "butterfly", "block_size": 16},
}


def test_options_cover_every_method():
    assert set(OPTIONS) == set(available_methods())


def _task(seed: int = 0):
    """Predict, at each position, the previous token's features through a fixed linear map."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4, SEQ, D_MODEL, generator=g)
    w = torch.randn(D_MODEL, D_MODEL, generator=g) / D_MODEL**0.5
    target = torch.roll(x, 1, dims=1) @ w
    return x, target


@pytest.mark.parametrize("method", sorted(OPTIONS))
def test_every_method_trains_and_loss_falls(method):
    if method in KERNEL_METHODS and not ds.extension_available():
        pytest.skip("compiled extension not available")
    torch.manual_seed(0)
    causal = method in ("topk", "entmax", "block_topk", "gated", "local")
    block = SparseTransformerBlock(D_MODEL, HEADS, method, causal=causal, **OPTIONS[method])
    assert block.sparse_method == method
    opt = torch.optim.Adam(block.parameters(), lr=3e-3)
    x, target = _task()
    losses = []
    for _ in range(STEPS):
        opt.zero_grad()
        out = block(x)
        loss = torch.nn.functional.mse_loss(out, target)
        (loss + block.regularization()).backward()
        assert torch.isfinite(block.qkv.weight.grad).all()
        assert block.qkv.weight.grad[: 2 * D_MODEL].abs().sum() > 0  # gradients reach q and k
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-3:]) / 3 < 0.8 * losses[0], f"{method}: {losses[0]:.3f} -> {losses[-1]:.3f}"
    block.eval()
    with torch.no_grad():
        out = block(x)
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_block_with_key_padding_and_gqa_wrapper():
    torch.manual_seed(0)
    block = SparseTransformerBlock(D_MODEL, HEADS, "topk", top_k=4)
    x, _ = _task()
    kpm = torch.zeros(4, SEQ, dtype=torch.bool)
    kpm[0, 20:] = True
    out = block(x, key_padding_mask=kpm)
    x2 = x.clone()
    x2[0, 20:] = 100.0  # padded positions cannot influence the unpadded ones
    out2 = block(x2, key_padding_mask=kpm)
    torch.testing.assert_close(out[0, :20], out2[0, :20])
    attn = SparseMethodAttention("sparsek", num_heads=4, head_dim=8, num_kv_heads=2, k_keep=4)
    q = torch.randn(1, 12, 4, 8)
    kv = torch.randn(1, 12, 2, 8)
    assert attn(q, kv, kv, causal=True).shape == q.shape


def test_wrapper_rejects_bad_arguments():
    with pytest.raises(ValueError, match="unknown sparse method"):
        SparseMethodAttention("nope", 2, 8)
    with pytest.raises(TypeError, match="unknown options"):
        SparseMethodAttention("topk", 2, 8, top_kk=3)
    with pytest.raises(TypeError, match="pattern="):
        SparseMethodAttention("pattern", 2, 8)
    with pytest.raises(ValueError, match="multiple"):
        SparseTransformerBlock(30, 4)
    with pytest.raises(ValueError, match="x must be"):
        SparseTransformerBlock(32, 2)(torch.randn(2, 5, 16))
    assert SparseMethodAttention("bernoulli", 2, 8, max_seq_len=32, block_size=16).method == "gated"


def test_wrapper_lsh_checks_sizes_as_lsh_attention_does():
    with pytest.raises(ValueError, match="n_buckets"):
        SparseMethodAttention("lsh", 2, 16, n_buckets=7)
    with pytest.raises(ValueError, match="n_buckets"):
        ds.methods.lsh_attention(*(torch.randn(1, 8, 2, 16),) * 3, n_buckets=7)
    with pytest.raises(ValueError, match="n_hashes"):
        SparseMethodAttention("lsh", 2, 16, n_buckets=4, n_hashes=0)
    attn = SparseMethodAttention("lsh", 2, 16, n_buckets=6, n_hashes=2, chunk_size=8)
    assert tuple(attn.rotations.shape) == (2, 16, 3)
    q = torch.randn(1, 24, 2, 16)
    for training in (True, False):
        attn.train(training)
        assert attn(q, q, q).shape == q.shape
