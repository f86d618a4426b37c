"""A tiny 2-layer transformer trained with each module on the CPU, and the guides' snippets
(from the block-sparse guides, with the import renamed to ``dilated_sparse``)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import dilated_sparse as ds
from dilated_sparse import (
    AdaptiveConfig,
    AdaptiveSparsityTrainer,
    BlockSparseAdaptive,
    BlockSparseRingDilatedAttentionV2,
    BlockSparseRingMultiheadDilatedAttentionV2,
    HierarchicalConfig,
    SparsePatternConfig,
    create_block_sparse_attention,
    get_block_sparse_preset,
)

pytestmark = [pytest.mark.needs_op, pytest.mark.usefixtures("single_thread")]


E, H, S = 32, 4, 48


class HeadsAttention(nn.Module):
    """Projections around a [B, S, H, D] module (base, hierarchical, adaptive, LongNet, multi-pattern)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.qkv = nn.Linear(E, 3 * E)
        self.out = nn.Linear(E, E)
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, H, E // H).unbind(2)
        return self.out(self.inner(q, k, v, is_causal=True).reshape(b, s, E))


class MergedAttention(nn.Module):
    """Projections around a merged-head module (SparseAttention)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.qkv = nn.Linear(E, 3 * E)
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(*self.qkv(x).chunk(3, dim=-1))


class MHAAttention(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x, x, x, is_causal=True, need_weights=False)[0]


class Block(nn.Module):
    def __init__(self, attention: nn.Module) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(E), nn.LayerNorm(E)
        self.attention = attention
        self.mlp = nn.Sequential(nn.Linear(E, 2 * E), nn.GELU(), nn.Linear(2 * E, E))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def make_attention(kind: str) -> nn.Module:
    if kind == "base":
        return HeadsAttention(ds.BlockSparseRingDilatedAttention(pattern_type="local_window", block_size=16,
                                                                 local_window_size=32, dropout=0.1))
    if kind == "hierarchical":
        return HeadsAttention(ds.BlockSparseHierarchical(hierarchical_config=HierarchicalConfig(
            level_configs=[{"stride": 1, "window_size": 16, "block_size": 16},
                           {"stride": 32, "window_size": -1, "block_size": 16}])))
    if kind == "adaptive":
        return HeadsAttention(ds.BlockSparseAdaptive(num_heads=H, head_dim=E // H, adaptive_config=AdaptiveConfig(
            base_sparsity=0.5, block_size=16, hidden_dim=8)))
    if kind == "longnet":
        return HeadsAttention(ds.DilatedAttention([16, 48], [1, 2], block_size=16))
    if kind == "multi_pattern":
        return HeadsAttention(ds.MultiPatternAttention(["local_window", "dense"], block_size=16))
    if kind == "sparse_transformer":
        return MergedAttention(ds.SparseAttention(H, attn_mode="local", local_attn_ctx=16, blocksize=16))
    if kind == "multihead":
        return MHAAttention(ds.BlockSparseMultiheadAttention(E, H, dropout=0.1, batch_first=True,
                                                             pattern="local_window", block_size=16,
                                                             pattern_options={"window_size": 32}))
    if kind == "multihead_dilated":
        return MHAAttention(ds.MultiheadDilatedAttention(E, H, [1, 2], [16, 48], block_size=16))
    raise AssertionError(kind)


KINDS = ["base", "hierarchical", "adaptive", "longnet", "multi_pattern", "sparse_transformer", "multihead",
         "multihead_dilated"]


@pytest.mark.parametrize("kind", KINDS)
def test_tiny_transformer_trains(kind):
    torch.manual_seed(0)
    vocab = 11
    model = nn.Sequential(nn.Embedding(vocab, E), Block(make_attention(kind)), Block(make_attention(kind)),
                          nn.Linear(E, vocab))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, vocab, (4, S + 1), generator=g)
    losses = []
    for _ in range(12):
        logits = model(tokens[:, :-1])
        loss = nn.functional.cross_entropy(logits.reshape(-1, vocab), tokens[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]


# ------------------------------------------------------------------------ guide snippets
def test_guide_quick_start():
    attention = create_block_sparse_attention("auto", sparsity_ratio=0.1, block_size=64)
    assert attention.sparse_config.sparsity_ratio == 0.1
    attention = create_block_sparse_attention("hierarchical")
    attention = get_block_sparse_preset("ultra_sparse")
    q = k = v = torch.randn(1, 1024, 2, 16)
    assert attention(q, k, v).shape == q.shape


def test_guide_base():
    attention = create_block_sparse_attention("base",
        sparse_config=SparsePatternConfig(
            pattern_type="dilated_sparse",  # or "local_window", "global_local"
            sparsity_ratio=0.1,             # 90% sparse
            block_size=64,
            dilation_rates=[1, 2, 4, 8],    # For dilated pattern
        )
    )
    attention = create_block_sparse_attention("base",
        sparsity_ratio=0.05  # 95% sparse
    )
    q = k = v = torch.randn(1, 2048, 2, 16)
    attention(q, k, v)
    assert attention.get_pattern_stats(2048)["density"] == pytest.approx(0.05, abs=0.01)


def test_guide_hierarchical():
    attention = create_block_sparse_attention("hierarchical")
    config = HierarchicalConfig(
        level_configs=[
            {"stride": 1, "window_size": 128, "block_size": 32},    # Fine
            {"stride": 4, "window_size": 512, "block_size": 64},    # Medium
            {"stride": 16, "window_size": -1, "block_size": 128},   # Coarse (-1 = global)
        ]
    )
    attention = create_block_sparse_attention("hierarchical",
        hierarchical_config=config
    )
    attention = get_block_sparse_preset("hierarchical_long")  # Long-range dependencies
    attention = get_block_sparse_preset("hierarchical_fine")  # Fine-grained patterns
    q = k = v = torch.randn(1, 600, 2, 16)
    assert attention(q, k, v).shape == q.shape


def test_guide_adaptive():
    attention = create_block_sparse_attention("adaptive")
    config = AdaptiveConfig(
        base_sparsity=0.9,          # Start with 90% sparsity
        temperature=1.0,            # Gumbel-softmax temperature
        learnable_temperature=True,  # Anneal during training
        hidden_dim=128,             # Importance network size
        share_across_heads=False,   # Per-head patterns
    )
    attention = create_block_sparse_attention("adaptive",
        adaptive_config=config
    )
    trainer = AdaptiveSparsityTrainer(
        model=attention,
        initial_temperature=1.0,
        final_temperature=0.1,
        annealing_steps=10000,
    )
    q, k, v = (torch.randn(1, 640, 2, 16, requires_grad=True) for _ in range(3))
    attention(q, k, v)  # materialise the lazily sized importance network
    optimizer = torch.optim.SGD(attention.parameters(), lr=0.1)
    for _ in range(2):
        output = attention(q, k, v)
        loss = output.square().mean()
        loss.backward()
        optimizer.step()
        trainer.step()
    assert float(attention.temperature) < 1.0


def test_guide_adaptive_patterns_guide():
    attention = ds.create_adaptive_block_sparse(
        embed_dim=128,
        num_heads=4,
        segment_lengths=[256, 512],
        dilation_rates=[1, 2],
    )
    query = key = value = torch.randn(1, 512, 4, 32)
    attention(query, key, value)
    _output, pattern_info = attention(query, key, value, return_pattern=True)
    assert pattern_info["patterns"].shape[-2:] == (8, 8)
    config = AdaptiveConfig(base_sparsity=0.9, temperature=1.0, learnable_temperature=True, min_temperature=0.1,
                            hidden_dim=128, num_layers=2, share_across_heads=False, hard_sparsity=False)
    attention = BlockSparseAdaptive(segment_lengths=[256, 512], dilation_rates=[1, 2], num_heads=4, head_dim=32,
                                    adaptive_config=config)
    attention(query, key, value)
    sparsity_loss = attention.get_sparsity_loss()
    assert sparsity_loss.dim() == 0


def test_guide_multihead():
    attention = create_block_sparse_attention("multihead",
        embed_dim=768,
        num_heads=12,
        sparsity_ratio=0.1,
        dropout=0.1,
        batch_first=True,
    )
    query = key = value = torch.randn(2, 256, 768)
    padding_mask = torch.zeros(2, 256, dtype=torch.bool)
    padding_mask[1, 200:] = True
    output = attention(query, key, value, is_causal=True)
    output, attn_weights = attention(
        query, key, value,
        need_weights=True,
        key_padding_mask=padding_mask,
    )
    assert output.shape == query.shape and attn_weights["shape"] == (2, 1, 256, 256)


def test_guide_distributed():
    config = ds.DistributedSparseConfig(pattern_update_interval=100)
    attention = create_block_sparse_attention("distributed",
        distributed_config=config,
        enable_deepspeed_integration=True,
    )
    assert attention.distributed_config.enable_deepspeed_integration


def test_guide_common_patterns():
    attention = get_block_sparse_preset("ultra_sparse")
    attention = create_block_sparse_attention("base",
        sparsity_ratio=0.001,  # 99.9% sparse
        block_size=256,        # Larger blocks for efficiency
        segment_lengths=[8192, 16384, 32768],
        dilation_rates=[1, 8, 64],
    )
    attention = get_block_sparse_preset("global_local")
    config = SparsePatternConfig(
        pattern_type="global_local",
        global_tokens=128,    # First 128 tokens are global
        window_size=512,      # Local window size
        sparsity_ratio=0.05,
    )
    attention = create_block_sparse_attention("base", sparse_config=config)
    stats = attention.get_pattern_stats(8192)
    assert stats["density"] <= 0.05 + 1e-3
    attention = create_block_sparse_attention("base",
        sparsity_ratio=0.01,      # More sparse
        block_size=128,           # Larger blocks
        use_memory_pool=True,     # Enable memory pooling
        mixed_precision=True,     # Use fp16
    )
    q = k = v = torch.randn(1, 1024, 2, 16)
    assert attention(q, k, v).dtype == torch.float32


def test_guide_progressive_sparsity():
    model = create_block_sparse_attention("base", sparsity_ratio=0.5, block_size=16)
    scheduler = ds.ProgressiveSparsityScheduler(model, initial_sparsity=0.5, final_sparsity=0.95, total_steps=10)
    before = model.get_pattern_stats(512)["density"]
    for _ in range(10):
        scheduler.step()
    assert model.sparse_config.sparsity_ratio == pytest.approx(0.05)
    assert model.get_pattern_stats(512)["density"] < before


def test_guide_v2():
    sparse_config = SparsePatternConfig(
        pattern_type="dilated_sparse",  # or 'local_window', 'global_local'
        sparsity_ratio=0.1,             # Keep only 10% of blocks
        block_size=128,                 # Size of each block
    )
    attention = BlockSparseRingDilatedAttentionV2(
        segment_lengths=[2048, 4096, 8192],
        dilation_rates=[1, 2, 4],
        sparse_config=sparse_config,
    )
    q = k = v = torch.randn(1, 1280, 2, 16)
    output = attention(q, k, v)
    output, weights = attention(q, k, v, return_attention_weights=True)
    assert set(weights) >= {"block_indices", "block_values", "shape", "block_size"}
    multihead_attention = BlockSparseRingMultiheadDilatedAttentionV2(
        embed_dim=64,
        num_heads=4,
        segment_lengths=[2048, 4096],
        dilation_rates=[1, 2],
        sparse_config=sparse_config,
    )
    query = torch.randn(1, 1280, 64)
    output = multihead_attention(query, query, query)
    assert output[0].shape == query.shape
    for cfg in (SparsePatternConfig(pattern_type="local_window", local_window_size=512, block_size=128),
                SparsePatternConfig(pattern_type="global_local", global_tokens=128, local_window_size=512,
                                    block_size=128)):
        BlockSparseRingDilatedAttentionV2(sparse_config=cfg)(q, k, v)


def test_guide_transformers_style_replacement():
    encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(64, 4, batch_first=True), num_layers=2,
                                    enable_nested_tensor=False)
    for layer in encoder.layers:
        layer.self_attn = create_block_sparse_attention("multihead", embed_dim=64, num_heads=4, sparsity_ratio=0.5,
                                                        block_size=16)
    x = torch.randn(2, 100, 64)
    assert encoder(x).shape == x.shape


def test_guide_custom_pattern_subclass():
    class CustomPatternBlockSparse(ds.BlockSparseRingDilatedAttention):
        def _get_sparse_block_indices(self, num_blocks, num_heads, device):
            # Your custom pattern logic
            row_indices = []
            col_indices = []

            # Example: Butterfly pattern
            for i in range(num_blocks):
                # Local connections
                row_indices.append(i)
                col_indices.append(i)

                # Butterfly connections
                stride = 1
                while stride < num_blocks:
                    if i + stride < num_blocks:
                        row_indices.append(i)
                        col_indices.append(i + stride)
                    stride *= 2

            return torch.tensor(row_indices), torch.tensor(col_indices)

    attention = CustomPatternBlockSparse(block_size=16)
    q, k, v = (torch.randn(1, 100, 2, 8, dtype=torch.float64) for _ in range(3))
    out = attention(q, k, v)
    layout = attention.get_layout(100, num_heads=2)
    assert layout.nnz == sum(1 + sum(1 for s in (1, 2, 4) if i + s < 7) for i in range(7))
    torch.testing.assert_close(out, ds.reference_attention(q, k, v, layout))
    base = ds.BlockSparseRingDilatedAttention(pattern_type="local_window", block_size=16)
    rows, cols = base._get_sparse_block_indices(7, 2, "cpu")
    assert ds.BlockSparseLayout.from_coo(rows, cols, block_size=16, seq_len_q=112).equal(base.get_layout(112))


def test_guide_hierarchical_patterns():
    custom_config = HierarchicalConfig(
        level_configs=[
            # Very fine local attention
            {"stride": 32, "window_size": 128, "block_size": 32},
            # Regional attention
            {"stride": 128, "window_size": 512, "block_size": 64},
            # Semi-global attention
            {"stride": 512, "window_size": 2048, "block_size": 128},
            # Full global attention
            {"stride": 2048, "window_size": -1, "block_size": 256},
        ]
    )
    presets = ds.get_hierarchical_presets()
    attention = ds.BlockSparseHierarchical(
        segment_lengths=[2048, 4096, 8192],
        dilation_rates=[1, 2, 4],
        hierarchical_config=presets["long_range"],
    )
    attention = ds.BlockSparseHierarchical(
        segment_lengths=[2048, 4096, 8192],
        dilation_rates=[1, 2, 4],
        hierarchical_config=custom_config,
    )
    model = ds.BlockSparseHierarchical(segment_lengths=[2048], dilation_rates=[1])
    assert "Sparsity" in model.visualize_pattern(seq_len=512)
    stats = attention.get_pattern_stats(seq_len=4096)
    assert stats["active_blocks"] <= stats["total_blocks"] and len(stats["levels"]) == 4


def test_progressive_scheduler_sets_valid_adaptive_sparsity_through_the_validated_config():
    module = BlockSparseAdaptive(adaptive_config=AdaptiveConfig(block_size=16))
    scheduler = ds.ProgressiveSparsityScheduler(module, initial_sparsity=0.0, final_sparsity=0.99, total_steps=3)
    seen = [module.config.base_sparsity]
    for _ in range(4):
        scheduler.step()
        seen.append(module.config.base_sparsity)
    assert seen[0] == 0.0 and seen[-1] == pytest.approx(0.99) and module.config.is_explicit("base_sparsity")
    with pytest.raises(ValueError, match="base_sparsity"):
        module.config.base_sparsity = 1.0
    assert module.config.base_sparsity == pytest.approx(0.99)
