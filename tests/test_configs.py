"""Configs: validation errors name the field, unknown options list the valid ones, layouts."""

from __future__ import annotations

import pytest

import dilated_sparse as ds
from dilated_sparse.configs import AdaptiveConfig, HierarchicalConfig, SparsePatternConfig, config_fields


def test_defaults_and_alias():
    c = SparsePatternConfig(pattern_type="local_window", window_size=128, block_size=32)
    assert c.local_window_size == 128 and c.window_size == 128
    c.window_size = 64
    assert c.local_window_size == 64 and c.is_explicit("local_window_size")
    assert "window_size" in config_fields(SparsePatternConfig)
    assert SparsePatternConfig().pattern_type == "dilated_sparse"
    assert SparsePatternConfig().sparsity_ratio == 0.1


@pytest.mark.parametrize(
    ("kwargs", "error", "words"),
    [
        ({"sparsity_ratio": 0.0}, ValueError, "sparsity_ratio"),
        ({"sparsity_ratio": 1.5}, ValueError, "sparsity_ratio"),
        ({"sparsity_ratio": "x"}, TypeError, "sparsity_ratio"),
        ({"block_size": 48}, ValueError, "block_size"),
        ({"local_window_size": 0}, ValueError, "local_window_size"),
        ({"global_tokens": -1}, ValueError, "global_tokens"),
        ({"dilation_rates": [1, 0]}, ValueError, "dilation_rates"),
        ({"segment_lengths": [64, 128], "dilation_rates": [1]}, ValueError, "same length"),
        ({"pattern_type": "nope"}, ValueError, "valid patterns"),
        ({"sparsity": 0.1}, TypeError, "valid options"),
        ({"window_size": 64, "local_window_size": 32}, ValueError, "alias"),
        ({"min_sparsity": 0.5, "sparsity_ratio": 0.1}, ValueError, "min_sparsity"),
        ({"enable_caching": 1}, TypeError, "enable_caching"),
    ],
)
def test_sparse_config_errors(kwargs, error, words):
    with pytest.raises(error, match=words):
        SparsePatternConfig(**kwargs)


def test_setting_a_field_is_validated_and_kept_on_error():
    c = SparsePatternConfig(sparsity_ratio=0.2)
    with pytest.raises(ValueError, match="sparsity_ratio"):
        c.sparsity_ratio = 2.0
    assert c.sparsity_ratio == 0.2
    c.sparsity_ratio = 0.3
    assert c.sparsity_ratio == 0.3


def test_replace_keeps_explicit_fields():
    c = SparsePatternConfig(pattern_type="global_local", window_size=256)
    d = c.replace(block_size=32)
    assert d.block_size == 32 and d.is_explicit("local_window_size") and d.is_explicit("block_size")
    assert not d.is_explicit("sparsity_ratio")
    assert c.fingerprint() != d.fingerprint()


def test_make_layout_rules():
    seq = 1000
    window = SparsePatternConfig(pattern_type="local_window", local_window_size=128, block_size=32).make_layout(seq)
    assert window.equal(ds.patterns.local_window(seq_len_q=seq, block_size=32, window_size=128))
    target = SparsePatternConfig(pattern_type="local_window", sparsity_ratio=0.25, block_size=32).make_layout(seq)
    assert abs(target.density - 0.25) < 0.01
    both = SparsePatternConfig(pattern_type="local_window", sparsity_ratio=0.05, local_window_size=512,
                               block_size=32).make_layout(seq)
    assert both.nnz <= min(target.nnz, ds.patterns.local_window(seq_len_q=seq, block_size=32, window_size=512).nnz)
    dil = SparsePatternConfig(pattern_type="dilated_sparse", sparsity_ratio=0.3, block_size=16).make_layout(
        333, segment_lengths=[64, 128], dilation_rates=[1, 2])
    assert abs(dil.density - 0.3) < 0.01
    causal = SparsePatternConfig(pattern_type="local_window", block_size=32).make_layout(seq, causal=True)
    mask = causal.to_dense_mask()[0, 0]
    assert not mask.triu(1).any()


def test_make_layout_refuses_options_the_pattern_does_not_take():
    with pytest.raises(ValueError, match="does not take"):
        SparsePatternConfig(pattern_type="all", sparsity_ratio=0.5).make_layout(64)
    with pytest.raises(ValueError, match="does not take"):
        SparsePatternConfig(pattern_type="local_window", dilation_rates=[1, 2]).make_layout(64)
    with pytest.raises(TypeError, match="valid options"):
        SparsePatternConfig(pattern_type="bigbird", pattern_options={"bogus": 1}).make_layout(256)
    lay = SparsePatternConfig(pattern_type="bigbird", block_size=16,
                              pattern_options={"num_random_blocks": 0}).make_layout(256)
    assert lay.nnz > 0


@pytest.mark.parametrize(
    ("levels", "words"),
    [
        ([], "at least one"),
        ([{"stride": 1, "window_size": 128}], "exactly the keys"),
        ([{"stride": 0, "window_size": 128, "block_size": 32}], "stride"),
        ([{"stride": 1, "window_size": 0, "block_size": 32}], "window_size"),
        ([{"stride": 1, "window_size": -2, "block_size": 32}], "window_size"),
        ([{"stride": 1, "window_size": 64, "block_size": 48}], "block_size"),
        ({"stride": 1}, "list of dicts"),
    ],
)
def test_hierarchical_config_errors(levels, words):
    with pytest.raises((ValueError, TypeError), match=words):
        HierarchicalConfig(level_configs=levels)


def test_hierarchical_config_default():
    assert HierarchicalConfig().num_levels == 3
    with pytest.raises(TypeError, match="valid options"):
        HierarchicalConfig(levels=[])


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"base_sparsity": 1.0}, "base_sparsity"),
        ({"base_sparsity": -0.1}, "base_sparsity"),
        ({"temperature": 0}, "temperature"),
        ({"temperature": 0.5, "min_temperature": 1.0}, "min_temperature"),
        ({"hidden_dim": 0}, "hidden_dim"),
        ({"num_layers": 0}, "num_layers"),
        ({"share_across_heads": "yes"}, "share_across_heads"),
        ({"block_size": 100}, "block_size"),
        ({"temprature": 1.0}, "valid options"),
    ],
)
def test_adaptive_config_errors(kwargs, words):
    with pytest.raises((ValueError, TypeError), match=words):
        AdaptiveConfig(**kwargs)


def test_distributed_config_is_reexported():
    from dilated_sparse import configs

    assert configs.DistributedSparseConfig is ds.DistributedSparseConfig


def test_tiny_target_keeps_a_block_per_row():
    for causal in (False, True):
        lay = SparsePatternConfig(sparsity_ratio=0.01, block_size=16).make_layout(160, causal=causal)
        assert (lay.row_counts() >= 1).all() and lay.nnz == 10
