"""Attention sparsity metrics: direct definitions on dense rows, and the sparse weights dict path
(no densifying) agreeing with the dense path."""

from __future__ import annotations

import math

import pytest
import torch

import dilated_sparse as ds
from dilated_sparse.methods import (
    attention_metrics,
    attention_rows,
    binary_sparsity,
    block_topk_layout,
    gini,
    normalized_entropy,
    row_quantiles,
)

pytestmark = pytest.mark.usefixtures("single_thread")


F64 = torch.float64


def _rows():
    n = 8
    rows = torch.zeros(5, n, dtype=F64)
    rows[0, 3] = 1.0  # one-hot
    rows[1] = 1.0 / n  # uniform
    rows[2, :4] = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=F64)
    # row 3: empty (all zero); row 4: NaN (a naive softmax over a fully masked row)
    rows[4] = float("nan")
    return rows


def test_metrics_direct_definitions_per_row():
    rows = _rows()
    sp = binary_sparsity(rows, reduce="none")
    torch.testing.assert_close(sp, torch.tensor([7 / 8, 0.0, 0.5, 0.0, 0.0], dtype=F64))
    ent = normalized_entropy(rows, reduce="none")
    h2 = -sum(p * math.log(p) for p in (0.1, 0.2, 0.3, 0.4)) / math.log(8)
    torch.testing.assert_close(ent, torch.tensor([0.0, 1.0, h2, 0.0, 0.0], dtype=F64))
    g = gini(rows, reduce="none")
    x = rows[2]
    mad = (x.view(-1, 1) - x.view(1, -1)).abs().sum() / (2 * 8 * 8 * x.mean())  # mean-difference form
    torch.testing.assert_close(g, torch.tensor([7 / 8, 0.0, float(mad), 0.0, 0.0], dtype=F64))
    qs = row_quantiles(rows, (0.0, 0.3, 0.5, 0.9, 1.0), reduce="none")
    expected = torch.quantile(rows[:3], torch.tensor([0.0, 0.3, 0.5, 0.9, 1.0], dtype=F64), dim=-1).T
    torch.testing.assert_close(qs[:3], expected)
    assert (qs[3:] == 0).all()
    for value in (sp, ent, g, qs):
        assert torch.isfinite(value).all()


def test_metrics_means_skip_empty_rows_and_num_keys():
    rows = _rows()
    assert binary_sparsity(rows).item() == pytest.approx((7 / 8 + 0 + 0.5) / 3)
    assert gini(rows).item() == pytest.approx(float(gini(rows[:3], reduce="none").mean()))
    summary = attention_metrics(rows, quantiles=(0.5,))
    assert summary["rows"] == 5 and summary["empty_rows"] == 2
    assert set(summary) == {"sparsity", "entropy", "gini", "quantiles", "rows", "empty_rows"}
    assert all(math.isfinite(v) for v in (summary["sparsity"], summary["entropy"], summary["gini"]))
    # all rows empty: means are 0, not NaN
    assert normalized_entropy(torch.zeros(2, 4)).item() == 0.0
    # causal rows: n_i = i + 1
    causal = torch.tril(torch.ones(4, 4, dtype=F64))
    causal = causal / causal.sum(-1, keepdim=True)
    n = torch.arange(1, 5, dtype=F64)
    torch.testing.assert_close(normalized_entropy(causal, num_keys=n, reduce="none"), torch.tensor([0.0, 1, 1, 1], dtype=F64))
    torch.testing.assert_close(gini(causal, num_keys=n, reduce="none"), torch.zeros(4, dtype=F64), atol=1e-12, rtol=0)
    torch.testing.assert_close(binary_sparsity(causal, num_keys=n, reduce="none"), torch.zeros(4, dtype=F64))
    with pytest.raises(ValueError, match="quantiles"):
        row_quantiles(rows, (1.5,))
    with pytest.raises(TypeError):
        gini([1.0, 2.0])


def _check_dict_matches_dense(weights):
    dense = ds.weights_to_dense(weights)  # test-only densification of the reference side
    rows = attention_rows(weights)
    assert rows.entries.shape[-1] < dense.shape[-1]  # the dict path stayed sparse
    for fn in (binary_sparsity, normalized_entropy, gini):
        torch.testing.assert_close(fn(weights, reduce="none"), fn(dense, reduce="none"), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(row_quantiles(weights, (0.5, 0.95, 0.999), reduce="none"),
                               row_quantiles(dense, (0.5, 0.95, 0.999), reduce="none"), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(row_quantiles(dense, (0.5, 0.95), reduce="none")[rows.valid],
                               torch.quantile(dense[rows.valid], torch.tensor([0.5, 0.95]), dim=-1).T,
                               rtol=1e-5, atol=1e-6)
    a, b = attention_metrics(weights), attention_metrics(dense)
    for key in ("sparsity", "entropy", "gini"):
        assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6)
    assert a["empty_rows"] == b["empty_rows"]


@pytest.mark.needs_op
def test_metrics_on_shared_layout_weights_dict_with_empty_rows():
    b, s, h, d = 2, 150, 2, 16
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(b, s, h, d, generator=g) for _ in range(3))
    layout = ds.patterns.block_neighbour(seq_len_q=s, block_size=32, radius=1)
    kpm = torch.zeros(b, s, dtype=torch.bool)
    kpm[1, :96] = True  # batch 1, query block 0 (keys 0..63): every key padded -> empty rows
    _, weights = ds.block_sparse_attention(q, k, v, layout, causal=True, key_padding_mask=kpm,
                                           return_attention_weights=True)
    rows = attention_rows(weights)
    assert (~rows.valid[1, :, :32]).all() and rows.valid[0].all()
    _check_dict_matches_dense(weights)


@pytest.mark.needs_op
def test_metrics_on_per_head_layout_weights_dict():
    b, s, h, d = 2, 100, 2, 16
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(b, s, h, d, generator=g) for _ in range(3))
    layout = block_topk_layout(q, k, 2, 16)
    assert layout.num_slices == b * h
    _, weights = ds.block_sparse_attention(q, k, v, layout, return_attention_weights=True)
    _check_dict_matches_dense(weights)
