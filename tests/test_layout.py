"""BlockSparseLayout: construction, validation errors, CSC transpose, interop round trips."""

from __future__ import annotations

import pytest
import torch
from _helpers import DEVICES

import dilated_sparse as ds
from dilated_sparse.layout import csr_transpose


def random_mask(*shape: int, p: float = 0.4, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(*shape, generator=g) < p


@pytest.mark.parametrize("shape", [(5, 7), (3, 5, 7), (2, 3, 5, 7)])
def test_dense_mask_round_trip(shape):
    mask = random_mask(*shape)
    layout = ds.BlockSparseLayout.from_dense_mask(mask, block_size=(16, 32), seq_len_q=70, seq_len_k=200)
    dense = layout.to_dense_mask()
    assert dense.shape[-2:] == (5, 7)
    assert torch.equal(dense.reshape(shape), mask)
    assert layout.nnz == int(mask.sum())
    assert layout.density == pytest.approx(mask.float().mean().item())
    assert layout.layout_shape == ((1,) * (4 - len(shape)) + shape[:-2])[-2:] if len(shape) > 2 else (1, 1)


def test_csc_matches_dense_transpose():
    mask = random_mask(2, 3, 6, 9, seed=3)
    layout = ds.BlockSparseLayout.from_dense_mask(mask, block_size=32, seq_len_q=6 * 32, seq_len_k=9 * 32 - 5)
    ccol, rows = layout.ccol_indices, layout.row_indices
    assert ccol.dtype == torch.int32 and rows.dtype == torch.int32
    flat = mask.reshape(6, 6, 9)
    for s in range(6):
        for kb in range(9):
            c = s * 9 + kb
            got = rows[ccol[c]: ccol[c + 1]].tolist()
            assert got == torch.nonzero(flat[s, :, kb]).view(-1).tolist()
    # cached: the same tensors come back
    assert layout.ccol_indices is ccol


def test_csr_transpose_is_pure_function_of_csr():
    mask = random_mask(4, 4, seed=1)
    layout = ds.BlockSparseLayout.from_dense_mask(mask, block_size=16, seq_len_q=64)
    ccol, rows = csr_transpose(layout.crow_indices, layout.col_indices, num_slices=1,
                               num_query_blocks=4, num_key_blocks=4)
    assert torch.equal(ccol, layout.ccol_indices) and torch.equal(rows, layout.row_indices)


def test_from_block_pairs_forms_agree():
    pairs = [(0, 0), (1, 0), (1, 1), (2, 2), (1, 1)]  # duplicate merged
    a = ds.BlockSparseLayout.from_block_pairs(pairs, block_size=64, seq_len_q=150)
    b = ds.BlockSparseLayout.from_block_pairs(([0, 1, 1, 2], [0, 0, 1, 2]), block_size=64, seq_len_q=150)
    c = ds.BlockSparseLayout.from_block_pairs(torch.tensor([[2, 2], [0, 0], [1, 1], [1, 0]]), block_size=64, seq_len_q=150)
    assert a.equal(b) and b.equal(c)
    assert a.crow_indices.tolist() == [0, 1, 3, 4] and a.col_indices.tolist() == [0, 0, 1, 2]


def test_flex_block_mask_round_trip():
    pytest.importorskip("torch.nn.attention.flex_attention")
    mask = random_mask(2, 3, 5, 4, seed=7)
    layout = ds.BlockSparseLayout.from_dense_mask(mask, block_size=(32, 64), seq_len_q=150, seq_len_k=250)
    block_mask = layout.to_flex_block_mask()
    assert tuple(block_mask.BLOCK_SIZE) == (32, 64)
    back = ds.BlockSparseLayout.from_flex_block_mask(block_mask)
    assert back.equal(layout)


@pytest.mark.parametrize("causal", [False, True])
def test_flex_block_mask_computes_the_layout(causal):
    """Uncompiled FlexAttention with our block mask attends exactly the tokens the reference does."""
    flex = pytest.importorskip("torch.nn.attention.flex_attention")
    import warnings

    g = torch.Generator().manual_seed(0)
    layout = ds.BlockSparseLayout.from_dense_mask(random_mask(2, 10, 5, p=0.4, seed=11), block_size=(16, 32),
                                                  seq_len_q=150, seq_len_k=150)
    q, k, v = (torch.randn(2, 150, 2, 8, generator=g, dtype=torch.float64) for _ in range(3))
    block_mask = layout.to_flex_block_mask(causal=causal)
    assert block_mask.kv_indices.shape[-1] == layout.num_key_blocks  # to_dense() needs full-width rows
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # uncompiled FlexAttention warns that it is slow
        out = flex.flex_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=block_mask)
    expected = ds.reference_attention(q, k, v, layout, causal=causal)
    rows_with_keys = expected.abs().sum(-1) > 0  # empty rows: flex and we differ in convention only
    torch.testing.assert_close(out.transpose(1, 2)[rows_with_keys], expected[rows_with_keys], atol=1e-9, rtol=1e-9)


def test_to_device_is_cached():
    layout = ds.BlockSparseLayout.from_dense_mask(random_mask(3, 3), block_size=16, seq_len_q=48)
    assert layout.to("cpu") is layout
    if torch.cuda.is_available():
        moved = layout.to("cuda")
        assert moved is layout.to("cuda") and moved.device.type == "cuda"


def test_empty_layout_is_valid():
    layout = ds.BlockSparseLayout(torch.zeros(4, dtype=torch.int32), torch.zeros(0, dtype=torch.int32),
                                  block_size=16, seq_len_q=40)
    assert layout.nnz == 0 and layout.density == 0.0 and layout.max_slice_nnz == 0
    assert layout.ccol_indices.tolist() == [0, 0, 0, 0]


@pytest.mark.parametrize(
    "crow, col, match",
    [
        ([0, 1, 2], [0, 1], "entries"),  # 3 blocks -> needs 4 offsets
        ([1, 1, 2, 2], [0, 1], "start at 0"),
        ([0, 1, 2, 3], [0, 1], "end at nnz"),
        ([0, 2, 1, 3], [0, 1, 2], "non-decreasing"),
        ([0, 2, 2, 2], [1, 0], "strictly increasing"),
        ([0, 2, 2, 2], [1, 1], "strictly increasing"),
        ([0, 1, 1, 1], [3], "out of range"),
        ([0, 1, 1, 1], [-1], "out of range"),
        ([0, 1, 3, 3], [1, 2, 0], r"col_indices\[1\] = 2, col_indices\[2\] = 0"),  # inside row 1
        ([0, 0, 0, 2], [2, 1], r"col_indices\[0\] = 2, col_indices\[1\] = 1"),  # after empty rows
    ],
)
@pytest.mark.parametrize("device", DEVICES)
def test_bad_csr_rejected(crow, col, match, device):
    with pytest.raises(ValueError, match=match):
        ds.BlockSparseLayout(torch.tensor(crow, device=device), torch.tensor(col, device=device),
                             block_size=16, seq_len_q=48)


@pytest.mark.parametrize("device", DEVICES)
def test_rows_may_restart_their_ids_after_empty_rows(device):
    """A row's first id may be smaller than the last id of the previous non-empty row, with empty
    rows between them and at the end (their offsets equal the next row's start, or nnz)."""
    layout = ds.BlockSparseLayout(torch.tensor([0, 2, 2, 3, 3], device=device), torch.tensor([1, 2, 0], device=device),
                                  block_size=16, seq_len_q=64)
    assert layout.nnz == 3 and layout.max_slice_nnz == 3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_validating_a_cuda_layout_synchronises_once():
    """The checks are reduced on the GPU and read back in one copy (torch's sync debug mode warns
    once per synchronising call), with the largest slice's count among them."""
    import warnings

    mask = random_mask(2, 8, 8)
    host = ds.BlockSparseLayout.from_dense_mask(mask, block_size=16, seq_len_q=128, validate=False)
    crow, col = host.crow_indices.cuda(), host.col_indices.cuda()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            layout = ds.BlockSparseLayout(crow, col, block_size=16, seq_len_q=128, layout_heads=2)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    assert len(syncs) == 1, [f"{w.filename}:{w.lineno}" for w in syncs]
    assert layout.max_slice_nnz == int(mask.reshape(2, -1).sum(1).max())


def test_bad_arguments_rejected():
    crow, col = torch.tensor([0, 1]), torch.tensor([0])
    with pytest.raises(ValueError, match="block_q=48"):
        ds.BlockSparseLayout(crow, col, block_size=48, seq_len_q=48)
    with pytest.raises(ValueError, match="seq_len_q"):
        ds.BlockSparseLayout(crow, col, block_size=16, seq_len_q=0)
    with pytest.raises(TypeError, match="integers"):
        ds.BlockSparseLayout(crow.float(), col, block_size=16, seq_len_q=16)
    with pytest.raises(ValueError, match="block shape"):
        ds.BlockSparseLayout.from_dense_mask(random_mask(3, 3), block_size=16, seq_len_q=64)
    with pytest.raises(TypeError, match="bool"):
        ds.BlockSparseLayout.from_dense_mask(torch.ones(3, 3), block_size=16, seq_len_q=48)
    with pytest.raises(ValueError, match="out of range"):
        ds.BlockSparseLayout.from_block_pairs([(0, 5)], block_size=16, seq_len_q=48)


def test_indices_are_checked_before_their_int32_cast():
    """int64 indices past int32 are out of range, not wrapped (2**32 + 1 would become block 1), and
    index lists of floats are refused, not truncated (0.7 would become block 0)."""
    big = 2**32 + 1
    with pytest.raises(ValueError, match=rf"col_indices\[1\] = {big} is out of range"):
        ds.BlockSparseLayout(torch.tensor([0, 1, 2]), torch.tensor([0, big]), block_size=16, seq_len_q=32)
    with pytest.raises(ValueError, match="crow_indices must end at nnz"):
        ds.BlockSparseLayout(torch.tensor([0, 1, big]), torch.tensor([0, 1]), block_size=16, seq_len_q=32)
    with pytest.raises(TypeError, match="col_indices must hold integers"):
        ds.BlockSparseLayout([0, 1], [0.7], block_size=16, seq_len_q=16)
    with pytest.raises(TypeError, match="crow_indices must hold integers"):
        ds.BlockSparseLayout([False, True], [0], block_size=16, seq_len_q=16)
    with pytest.raises(TypeError, match="pairs must hold integer block indices"):
        ds.BlockSparseLayout.from_block_pairs([(0.9, 1.9)], block_size=16, seq_len_q=32)
    # Integer scalars of other kinds still count as indices.
    layout = ds.BlockSparseLayout.from_block_pairs([(torch.tensor(1), 0)], block_size=16, seq_len_q=32)
    assert layout.crow_indices.tolist() == [0, 0, 1] and layout.col_indices.tolist() == [0]
    assert ds.BlockSparseLayout([0, 0], [], block_size=16, seq_len_q=16).nnz == 0


def test_block_pairs_tuple_of_two_pairs_is_ambiguous():
    """((0, 0), (1, 1)) reads as two pairs or as rows (0, 0) and columns (1, 1): refused, where a
    list of pairs and a longer (rows, cols) tuple stay unambiguous."""
    with pytest.raises(ValueError, match="ambiguous"):
        ds.BlockSparseLayout.from_block_pairs(((0, 0), (1, 1)), block_size=16, seq_len_q=32)
    diagonal = ds.BlockSparseLayout.from_block_pairs([(0, 0), (1, 1)], block_size=16, seq_len_q=32)
    assert diagonal.to_dense_mask()[0, 0].tolist() == [[True, False], [False, True]]
    rows_cols = ds.BlockSparseLayout.from_block_pairs(([0, 1, 1], [0, 0, 1]), block_size=16, seq_len_q=32)
    assert rows_cols.to_dense_mask()[0, 0].tolist() == [[True, False], [True, True]]


def peak_rss_mib_of(code: str) -> float:
    """Peak resident memory (MiB) a fresh interpreter reaches running ``code`` after importing."""
    import subprocess
    import sys

    script = (
        "import resource, torch, dilated_sparse as ds\n"
        "base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        + code
        + "\nprint((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024)\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def test_large_layout_is_linear_in_nnz():
    # 1M tokens with block 16: 65536 x 65536 blocks (a dense bool mask would be 4 GiB); a band of
    # 3 blocks per row, its transpose included, must stay far below that.
    growth = peak_rss_mib_of(
        "nqb = (1 << 20) // 16\n"
        "rows = torch.arange(nqb).repeat_interleave(3)\n"
        "cols = (rows + torch.tensor([-1, 0, 1]).repeat(nqb)).clamp(0, nqb - 1)\n"
        "layout = ds.BlockSparseLayout.from_coo(rows, cols, block_size=16, seq_len_q=1 << 20)\n"
        "assert layout.nnz == 3 * nqb - 2\n"
        "assert layout.ccol_indices.numel() == nqb + 1\n"
    )
    assert growth < 256, f"layout construction grew RSS by {growth:.0f} MiB"
