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


@pytest.mark.parametrize(
    ("kwargs", "field", "option"),
    [
        ({"pattern_type": "local_window", "local_window_size": 1024, "pattern_options": {"window_size": 64}},
         "local_window_size", "window_size"),
        ({"pattern_type": "global_local", "global_tokens": 256, "pattern_options": {"global_tokens": 0}},
         "global_tokens", "global_tokens"),
        ({"sparsity_ratio": 0.5, "pattern_options": {"density": 0.05}}, "sparsity_ratio", "density"),
        ({"sparsity_ratio": 0.5, "pattern_options": {"sparsity_ratio": 0.05}}, "sparsity_ratio", "sparsity_ratio"),
        # given at its default value still counts as given
        ({"pattern_type": "local_window", "local_window_size": 256, "pattern_options": {"window_size": 64}},
         "local_window_size", "window_size"),
        ({"segment_lengths": [64, 128], "dilation_rates": [1, 2], "pattern_options": {"dilation_rates": [1, 4]}},
         "dilation_rates", "dilation_rates"),
    ],
)
def test_pattern_options_conflicting_with_a_given_field_raise(kwargs, field, option):
    with pytest.raises(ValueError, match=rf"{field}=.*pattern_options\['{option}'\]"):
        SparsePatternConfig(block_size=64, **kwargs)


def test_pattern_options_fill_fields_that_were_not_given():
    c = SparsePatternConfig(pattern_type="local_window", block_size=64, pattern_options={"window_size": 64})
    assert c.make_layout(2048).equal(ds.patterns.local_window(seq_len_q=2048, block_size=64, window_size=64))
    # the same value in both places is no conflict
    same = SparsePatternConfig(pattern_type="local_window", block_size=64, local_window_size=64,
                               pattern_options={"window_size": 64})
    assert same.make_layout(2048).equal(c.make_layout(2048))
    # replace keeps the unset field unset (no false conflict), and the changed field counts as given
    assert c.replace(block_size=32).make_layout(512).equal(
        ds.patterns.local_window(seq_len_q=512, block_size=32, window_size=64))
    with pytest.raises(ValueError, match="local_window_size=.*pattern_options"):
        c.replace(local_window_size=128)
    # setting the field later is a conflict too; the old value is kept
    with pytest.raises(ValueError, match="local_window_size=.*pattern_options"):
        c.local_window_size = 128
    assert c.local_window_size == 256 and not c.is_explicit("local_window_size")
    given = SparsePatternConfig(pattern_type="local_window", local_window_size=128)
    with pytest.raises(ValueError, match="local_window_size=.*pattern_options"):
        given.pattern_options = {"window_size": 64}
    assert given.pattern_options == {}


def test_pattern_options_conflicting_with_the_modules_segments_raise():
    c = SparsePatternConfig(block_size=16, pattern_options={"segment_lengths": [64, 128]})
    with pytest.raises(ValueError, match=r"segment_lengths=\[32, 64\].*pattern_options\['segment_lengths'\]"):
        c.make_layout(256, segment_lengths=[32, 64], dilation_rates=[1, 2])
    assert c.make_layout(256, segment_lengths=[64, 128], dilation_rates=[1, 2]).nnz > 0


@pytest.mark.parametrize("key", ["block_size", "seq_len_q", "seq_len_k", "causal", "device"])
def test_pattern_options_cannot_set_the_geometry(key):
    with pytest.raises(ValueError, match=rf"pattern_options must not set '{key}'"):
        SparsePatternConfig(pattern_options={key: 32})


@pytest.mark.parametrize(
    ("name", "value", "error"),
    [
        ("base_sparsity", 1.7, ValueError),
        ("base_sparsity", -0.1, ValueError),
        ("temperature", -1.0, ValueError),
        ("temperature", float("inf"), ValueError),
        ("min_temperature", 5.0, ValueError),  # above temperature
        ("block_size", 48, ValueError),
        ("hidden_dim", 0, ValueError),
        ("num_layers", 1.5, TypeError),
        ("hard_sparsity", "no", TypeError),
    ],
)
def test_adaptive_config_fields_set_later_are_validated(name, value, error):
    a = AdaptiveConfig()
    old = getattr(a, name)
    with pytest.raises(error, match=name):
        setattr(a, name, value)
    assert getattr(a, name) == old
    a.base_sparsity = 0.5  # valid values still go through
    assert a.base_sparsity == 0.5 and a.is_explicit("base_sparsity")


def test_hierarchical_config_set_later_is_validated():
    h = HierarchicalConfig()
    old = h.level_configs
    with pytest.raises(ValueError, match=r"level_configs\[0\]\['stride'\]"):
        h.level_configs = [{"stride": 0, "window_size": 64, "block_size": 32}]
    with pytest.raises(TypeError, match="level_configs"):
        h.level_configs = {"stride": 1}
    assert h.level_configs == old
    h.level_configs = [{"stride": 16, "window_size": 64, "block_size": 32}]
    assert h.num_levels == 1


def test_distributed_config_set_later_is_validated():
    cfg = ds.DistributedSparseConfig()
    with pytest.raises(ValueError, match="sharding"):
        cfg.sharding = "ring"
    with pytest.raises(ValueError, match="load_balance_interval"):
        cfg.load_balance_interval = 3  # needs sharding='balanced'
    assert cfg.sharding == "contiguous" and cfg.load_balance_interval == 0
    cfg.sharding = "zigzag"
    assert cfg.sharding == "zigzag"
