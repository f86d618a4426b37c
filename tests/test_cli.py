"""The command line: ``info``, ``show`` (text and PNG), ``bench`` (table, JSON, plot), ``check`` and
the one-line / exit-status-2 rule for bad options. Runs in-process through ``cli.main`` (plus one
``python -m dilated_sparse`` subprocess)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import dilated_sparse as ds
from dilated_sparse import cli
from dilated_sparse.cli import show as show_mod
from dilated_sparse.patterns import make_layout

ROOT = Path(__file__).resolve().parents[1]


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv), prog="dilated-sparse")
    out, err = capsys.readouterr()
    return code, out, err


# ------------------------------------------------------------------------------ info
def test_info_text_and_json(capsys):
    code, out, err = run_cli(capsys, "info")
    assert code == 0, err
    assert f"dilated_sparse   {ds.__version__}" in out and torch.__version__ in out
    assert "devices" in out and "cpu" in out
    code, out, _ = run_cli(capsys, "info", "--json")
    assert code == 0
    facts = json.loads(out)
    assert facts["torch"] == torch.__version__
    assert facts["extension"]["available"] == ds.extension_available()
    if ds.extension_available():
        assert facts["extension"]["mode"] in ("wheel", "jit")
        assert isinstance(facts["extension"]["head_dims"], list)
    assert facts["devices"][0]["device"] == "cpu"
    assert "local_window" in facts["patterns"]


def test_version_and_no_command(capsys):
    code, out, _ = run_cli(capsys, "--version")
    assert code == 0 and ds.__version__ in out
    code, out, _ = run_cli(capsys)
    assert code == 2 and "info" in out and "bench" in out


def test_python_dash_m_entry_point():
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-m", "dilated_sparse", "show", "dense", "--seq-len", "-3"],
                          capture_output=True, text=True, env=env, timeout=300, cwd=ROOT, check=False)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if "error" in line]
    assert lines == ["python -m dilated_sparse show: error: argument --seq-len: must be a positive integer, got '-3'"]


# ----------------------------------------------------------------------------- show
def _pooled(mask: torch.Tensor, fr: int, fc: int) -> torch.Tensor:
    """Reference for block_grid: the active fraction of each fr x fc cell of a dense block mask."""
    nqb, nkb = mask.shape
    rows, cols = math.ceil(nqb / fr), math.ceil(nkb / fc)
    padded = torch.zeros(rows * fr, cols * fc, dtype=torch.float64)
    valid = torch.zeros_like(padded)
    padded[:nqb, :nkb] = mask.double()
    valid[:nqb, :nkb] = 1
    hits = padded.view(rows, fr, cols, fc).sum((1, 3))
    return hits / valid.view(rows, fr, cols, fc).sum((1, 3))


@pytest.mark.parametrize("max_cells", [100, 7, 3])
def test_block_grid_matches_the_dense_mask(max_cells):
    layout = make_layout("bigbird", seq_len_q=1000, seq_len_k=1300, block_size=(32, 64), num_heads=3,
                         different_layout_per_head=True, num_random_blocks=2)
    dense = layout.to_dense_mask()  # [Lb, Lh, nqb, nkb]: fine for a test-sized layout
    nqb, nkb = layout.num_query_blocks, layout.num_key_blocks
    fr, fc = math.ceil(nqb / max_cells), math.ceil(nkb / max_cells)
    for head in range(3):
        grid = show_mod.block_grid(layout, head, max_rows=max_cells, max_cols=max_cells)
        assert grid.shape == (math.ceil(nqb / fr), math.ceil(nkb / fc))
        torch.testing.assert_close(grid, _pooled(dense[0, head], fr, fc))
    with pytest.raises(ValueError, match="slice_index"):
        show_mod.block_grid(layout, 3)


def test_block_grid_of_a_million_tokens_is_picture_sized():
    layout = make_layout("dilated_sparse", seq_len_q=1 << 20, block_size=128,
                         segment_lengths=[4096, 65536, 1 << 20], dilation_rates=[1, 16, 256])
    grid = show_mod.block_grid(layout, max_rows=64, max_cols=64)
    assert grid.shape == (64, 64)
    cell = (layout.num_query_blocks // 64) * (layout.num_key_blocks // 64)
    assert round(float(grid.sum()) * cell) == layout.nnz
    stats = show_mod.layout_stats(layout)
    assert stats["nnz"] == layout.nnz and stats["blocks"] == (8192, 8192)


def test_show_ascii_exact_picture(capsys):
    code, out, err = run_cli(capsys, "show", "block_neighbour", "--seq-len", "80", "--block-size", "16", "--ascii")
    assert code == 0, err
    assert "active       13 blocks" in out and "0 empty rows" in out
    grid = show_mod.block_grid(make_layout("block_neighbour", seq_len_q=80, block_size=16))
    assert show_mod.render_ascii(grid, ".#").splitlines() == [
        "##...", "###..", ".###.", "..###", "...##",
    ]
    picture = out.split("key blocks across\n", 1)[1].splitlines()
    assert len(picture) == 5 and all(len(line) == 10 for line in picture)  # two characters per cell


def test_show_pattern_options_heads_and_rectangular(capsys):
    code, out, err = run_cli(capsys, "show", "local_window", "--seq-len", "500", "--seq-len-k", "700",
                             "--block-size", "32x64", "--window-size=96", "--causal")
    assert code == 0, err
    assert "local_window (window_size=96, causal=True)" in out
    assert "seq_len_q=500 seq_len_k=700 block_size=(32, 64) -> 16 x 11 blocks" in out
    code, out, err = run_cli(capsys, "show", "random", "--seq-len", "256", "--block-size", "32", "--heads", "3",
                             "--different-layout-per-head", "--density", "0.3", "--head", "2")
    assert code == 0, err
    assert "layout_heads = 1 x 3" in out and "head 2:" in out and "head 0:" not in out


def test_show_list(capsys):
    code, out, _ = run_cli(capsys, "show", "--list")
    assert code == 0
    line = next(line for line in out.splitlines() if line.startswith("local_window"))
    assert "--window-size" in line and "--device" not in line


def test_show_png_is_small_and_valid(capsys, tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "bigbird.png"
    code, out, err = run_cli(capsys, "show", "bigbird", "--seq-len", "2048", "--block-size", "64", "--heads", "4",
                             "--different-layout-per-head", "-o", str(path))
    assert code == 0, err
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and 2_000 < len(data) < 40_000
    assert f"wrote        {path}" in out
    big = tmp_path / "big.png"  # downsampled: 8192 x 8192 blocks in 128 x 128 cells
    code, _, err = run_cli(capsys, "show", "dilated_sparse", "--seq-len", str(1 << 20), "--block-size", "128",
                           "--segment-lengths", "4096,65536,1048576", "--dilation-rates", "1,16,256",
                           "--pixels", "128", "-o", str(big))
    assert code == 0, err
    assert big.stat().st_size < 40_000


# ----------------------------------------------------------------------- bad options
BAD = [
    (["show", "no_such", "--seq-len", "64"], "PATTERN"),
    (["show"], "PATTERN"),
    (["show", "local_window", "--seq-len", "-5"], "--seq-len"),
    (["show", "local_window", "--seq-len", "abc"], "--seq-len"),
    (["show", "local_window"], "--seq-len"),
    (["show", "local_window", "--seq-len", "64", "--block-size", "48"], "--block-size"),
    (["show", "local_window", "--seq-len", "64", "--window-sizes", "3"], "--window-sizes"),
    (["show", "local_window", "--seq-len", "64", "--window-size", "-3"], "--window-size"),
    (["show", "local_window", "--seq-len", "64", "--head", "4"], "--head"),
    (["show", "local_window", "--seq-len", "64", "--device", "cpu"], "--device"),
    (["show", "local_window", "--seq-len", "64", "stray"], "stray"),
    (["show", "local_window", "--seq-len", "64", "--heads", "2"], "--heads"),
    (["show", "union", "--seq-len", "64", "--patterns", "[{bad json"], "--patterns"),
    (["bench", "--dtype", "float8"], "--dtype"),
    (["bench", "--seq-len", "0"], "--seq-len"),
    (["bench", "--heads", "-2"], "--heads"),
    (["bench", "--heads", "6", "--kv-heads", "4"], "--kv-heads"),
    (["bench", "--patterns", "nope"], "--patterns"),
    (["bench", "--patterns", "local_window:bogus=1"], "--patterns"),
    (["bench", "--patterns", "local_window:window_size"], "--patterns"),
    (["bench", "--impls", "magic"], "--impls"),
    (["bench", "--device", "tpu"], "--device"),
    (["bench", "--dense-limit-gib", "-1"], "--dense-limit-gib"),
    (["check", "--device", "gpu"], "--device"),
    (["check", "--dtype", "int8"], "--dtype"),
    (["info", "--bogus"], "--bogus"),
    (["frobnicate"], "COMMAND"),
]
if not torch.cuda.is_available():
    BAD += [(["bench", "--device", "cuda"], "--device"), (["check", "--device", "cuda"], "--device")]


@pytest.mark.parametrize(("argv", "option"), BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_option_is_one_line_naming_it_with_status_2(capsys, argv, option):
    code, out, err = run_cli(capsys, *argv)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("dilated-sparse") and "error:" in lines[0] and option in lines[0]
    assert "Traceback" not in err + out


def test_runtime_failure_is_one_line_with_status_1(capsys, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setattr(show_mod, "layout_stats", broken)
    code, _, err = run_cli(capsys, "show", "dense", "--seq-len", "64")
    assert code == 1
    assert err.strip() == "dilated-sparse show: error: RuntimeError: boom second line"


# ----------------------------------------------------------------------------- bench
@pytest.mark.needs_op
def test_bench_table_json_and_plot(capsys, tmp_path):
    out_json, out_png = tmp_path / "bench.json", tmp_path / "bench.png"
    code, out, err = run_cli(
        capsys, "bench", "--device", "cpu", "--seq-len", "128", "200", "--heads", "4", "--kv-heads", "2",
        "--head-dim", "16", "--block-size", "32", "--patterns", "local_window:window_size=32", "dense",
        "--causal", "--backward", "--warmup", "0", "--repeats", "1", "--json", str(out_json), "--plot", str(out_png),
    )
    assert code == 0, err
    payload = json.loads(out_json.read_text())
    rows = payload["rows"]
    assert payload["config"]["causal"] and payload["config"]["kv_heads"] == 2
    flex_present = any(r["impl"] == "flex" for r in rows)
    assert len(rows) == 2 * (1 + 2 * (2 + flex_present))
    ours = [r for r in rows if r["impl"] == "ours"]
    assert len(ours) == 4 and all(r["status"] == "ok" and r["fwd_ms"] > 0 and r["fwdbwd_ms"] > 0 for r in ours)
    window = next(r for r in ours if r["pattern"] == "local_window:window_size=32" and r["seq_len"] == 200)
    causal_layout = make_layout("local_window", seq_len_q=200, block_size=32, window_size=32, causal=True)
    assert window["density"] == pytest.approx(causal_layout.density)  # --causal builds causal patterns
    compared = [r for r in rows if r["impl"] in ("reference", "flex") and r["fwd_ms"] is not None]
    assert compared and all(r["extra"]["max_abs_diff_vs_ours"] < 1e-4 for r in compared), [(r["impl"], r["pattern"], r["seq_len"], r["extra"]) for r in compared]
    assert "seq_len" in out and "local_window:window_size=32" in out and "sdpa" in out and "vs ours" in out
    assert out_png.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.needs_op
def test_bench_default_patterns_and_impl_choice(capsys):
    code, out, err = run_cli(capsys, "bench", "--seq-len", "256", "--heads", "1", "--head-dim", "8", "--impls", "ours",
                             "--warmup", "0", "--repeats", "1", "--no-progress")
    assert code == 0, err
    table = [line for line in out.splitlines() if line.strip().startswith("256")]
    assert [line.split()[1] for line in table] == ["local_window", "dilated_sparse", "bigbird"]
    assert all(line.split()[3] == "ours" for line in table)


def test_bench_progress_bar_goes_to_stderr(capsys, monkeypatch):
    pytest.importorskip("tqdm")
    code, out, err = run_cli(capsys, "bench", "--seq-len", "64", "--heads", "1", "--head-dim", "8", "--impls", "sdpa",
                             "--warmup", "0", "--repeats", "1")
    assert code == 0
    assert "bench" in err and "sdpa" in out


# ----------------------------------------------------------------------------- check
@pytest.mark.needs_op
def test_check_passes_per_op(capsys):
    code, out, err = run_cli(capsys, "check", "--device", "cpu")
    assert code == 0, out + err
    lines = [line for line in out.splitlines() if line.startswith("cpu")]
    ops = {line.split()[2] for line in lines}
    assert ops == {"block_sparse_attn_fwd", "block_sparse_attn_bwd", "block_sparse_attn_weights"}
    assert all(" PASS " in line for line in lines) and len(lines) == 12
    assert "12 passed, 0 failed" in out


@pytest.mark.needs_op
def test_check_reports_a_wrong_forward_as_fail(capsys, monkeypatch):
    real = ds.attention_forward

    def off_by_a_bit(*args, **kwargs):
        out, lse = real(*args, **kwargs)
        return out + 1e-2, lse

    monkeypatch.setattr(ds, "attention_forward", off_by_a_bit)
    code, out, _ = run_cli(capsys, "check", "--device", "cpu", "--dtype", "float32", "--dtype", "fp32")
    assert code == 1
    fwd = [line for line in out.splitlines() if "block_sparse_attn_fwd" in line]
    assert len(fwd) == 1 and "FAIL" in fwd[0]  # a repeated --dtype is checked once
    assert any("block_sparse_attn_weights" in line and "PASS" in line for line in out.splitlines())
