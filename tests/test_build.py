"""The wheel and JIT build paths, and the shared source list (dilated_sparse/_sources.py).

* The loaded extension reports how it was built; CI sets ``DILATED_SPARSE_EXPECT_MODE=wheel``
  after ``pip install -e .``, so there the compiled module must be what is loaded.
* JIT: a fresh process with ``DILATED_SPARSE_JIT=1`` builds (or reuses from the cache) the same
  sources with ``torch.utils.cpp_extension.load`` and runs the op.
* Wheel: ``pip wheel --no-build-isolation`` of a copy of the tree (CPU-only), unpacked into a
  directory and imported from there in a process that cannot see the source tree.
  ``DILATED_SPARSE_SKIP_WHEEL_TEST=1`` skips it (it compiles the extension once more, ~1 min).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest
import torch

import dilated_sparse as ds
from dilated_sparse import _sources
from dilated_sparse._extension import extension_info

ROOT = Path(__file__).resolve().parent.parent

# A forward + backward of the op against the dense reference, run in a child process.
CHECK_SCRIPT = textwrap.dedent(
    """
    import json, torch, dilated_sparse as ds
    from dilated_sparse._extension import extension_info
    torch.manual_seed(0)
    mask = torch.tensor([[1, 0, 1], [0, 0, 0], [1, 1, 1]], dtype=torch.bool)
    layout = ds.BlockSparseLayout.from_dense_mask(mask, block_size=16, seq_len_q=40)
    q, k, v = (torch.randn(2, 40, 2, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    out = ds.block_sparse_attention(q, k, v, layout, causal=True)
    ref = ds.reference_attention(q, k, v, layout, causal=True)
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    ref_grads = torch.autograd.grad(ref.square().sum(), (q, k, v))
    err = max([(out - ref).abs().max().item()] + [(g - r).abs().max().item() for g, r in zip(grads, ref_grads)])
    print(json.dumps({"info": extension_info(), "err": err, "file": ds.__file__}))
    """
)


def _run_check(env: dict[str, str], cwd: Path, timeout: int = 1200) -> dict:
    import json

    proc = subprocess.run([sys.executable, "-c", CHECK_SCRIPT], check=False, env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, f"child failed:\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-4000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _child_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("DILATED_SPARSE_BUILD_CUDA", "0")
    env.setdefault("MAX_JOBS", "2")
    env.update(extra)
    return env


# ---------------------------------------------------------------------------- source list
def test_cpp_sources_are_ops_checks_and_every_cpu_file():
    sources = _sources.cpp_sources(ROOT)
    assert sources[:2] == ["csrc/ops.cpp", "csrc/checks.cpp"]
    cpu = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc" / "cpu").rglob("*.cpp"))
    assert sources[2:] == cpu and cpu
    assert all((ROOT / s).is_file() for s in sources)


def test_cuda_instantiation_filter(monkeypatch):
    inst = sorted((ROOT / "csrc" / "cuda" / "instantiations").glob("*.cu"))
    if not inst:
        pytest.skip("no CUDA instantiation files in this checkout")
    monkeypatch.delenv("DILATED_SPARSE_CUDA_INSTANTIATIONS", raising=False)
    everything = _sources.cuda_sources(ROOT)
    assert len([s for s in everything if "instantiations" in s]) == len(inst)
    monkeypatch.setenv("DILATED_SPARSE_CUDA_INSTANTIATIONS", "hdim64_bf16")
    subset = [s for s in _sources.cuda_sources(ROOT) if "instantiations" in s]
    assert subset and all("hdim64_bf16" in s for s in subset)
    assert len(subset) == len([p for p in inst if "hdim64_bf16" in p.stem])
    # files outside instantiations/ are always built
    assert [s for s in _sources.cuda_sources(ROOT) if "instantiations" not in s] == [
        s for s in everything if "instantiations" not in s
    ]
    monkeypatch.setenv("DILATED_SPARSE_CUDA_INSTANTIATIONS", "fwd_*_fp16")
    subset = [Path(s).stem for s in _sources.cuda_sources(ROOT) if "instantiations" in s]
    assert subset and all(s.startswith("fwd_") and s.endswith("_fp16") for s in subset)
    # An entry that selects nothing (a typo) is an error naming it, not a build without its kernels.
    monkeypatch.setenv("DILATED_SPARSE_CUDA_INSTANTIATIONS", "hdim64_bf16, hdim46,dq_*_fp8")
    with pytest.raises(ValueError, match=r"DILATED_SPARSE_CUDA_INSTANTIATIONS: hdim46, dq_\*_fp8 matches no file"):
        _sources.cuda_sources(ROOT)


@pytest.mark.parametrize("value,expected", [(None, True), ("", True), ("1", True), ("0", False), ("no", None),
                                            ("off", None), (" 2", None)])
def test_build_cuda_switch(value, expected, monkeypatch):
    """DILATED_SPARSE_BUILD_CUDA takes 0 or 1 (unset: 1); anything else raises, naming the variable,
    instead of quietly building (or not building) the CUDA kernels."""
    if value is None:
        monkeypatch.delenv("DILATED_SPARSE_BUILD_CUDA", raising=False)
    else:
        monkeypatch.setenv("DILATED_SPARSE_BUILD_CUDA", value)
    monkeypatch.setattr(_sources, "nvcc_path", lambda: "/usr/bin/nvcc")  # as if nvcc were found
    if expected is None:
        with pytest.raises(ValueError, match="DILATED_SPARSE_BUILD_CUDA must be 0 or 1"):
            _sources.want_cuda(ROOT)
    else:
        assert _sources.want_cuda(ROOT) is (expected and bool(_sources.cuda_sources(ROOT)))


@pytest.mark.parametrize("value,expected", [("", False), ("0", False), ("False", False), ("no", False),
                                            ("1", True), ("true", True), (" YES ", True), ("on", True),
                                            ("2", None), ("ture", None)])
def test_jit_switch_values(value, expected, monkeypatch):
    """The loader's yes / no switches (DILATED_SPARSE_JIT, DILATED_SPARSE_JIT_VERBOSE) take the usual
    spellings; a typo raises, naming the variable, instead of picking the other build path."""
    from dilated_sparse._extension import _env_flag

    monkeypatch.setenv("DILATED_SPARSE_JIT_VERBOSE", value)
    if expected is None:
        with pytest.raises(ValueError, match="DILATED_SPARSE_JIT_VERBOSE must be 0 or 1"):
            _env_flag("DILATED_SPARSE_JIT_VERBOSE")
    else:
        assert _env_flag("DILATED_SPARSE_JIT_VERBOSE") is expected


def test_instantiation_files_match_their_generator(tmp_path):
    """The committed instantiations/*.cu are exactly what tools/gen_instantiations.py writes (the
    variant tables and their flags live in the generator)."""
    committed = ROOT / "csrc" / "cuda" / "instantiations"
    if not committed.is_dir():
        pytest.skip("no CUDA instantiation files in this checkout")
    subprocess.run([sys.executable, str(ROOT / "csrc" / "cuda" / "tools" / "gen_instantiations.py"), "--out",
                    str(tmp_path)], check=True, capture_output=True, text=True, timeout=60)
    generated = {p.name: p.read_text() for p in tmp_path.glob("*.cu")}
    assert generated, "the generator wrote nothing"
    assert generated == {p.name: p.read_text() for p in committed.glob("*.cu")}


def test_item_trace_patch_applies():
    """csrc/cuda/tools/item_trace.patch (the per-item clock64 stamps that item_trace.py reads) still
    applies to the kernels as they are: a change to run_items or the items' lambdas must re-make it."""
    patch = ROOT / "csrc" / "cuda" / "tools" / "item_trace.patch"
    git = shutil.which("git")
    if git is None or not (ROOT / ".git").exists():
        pytest.skip("needs git and a git checkout")
    r = subprocess.run([git, "apply", "--check", str(patch)], check=False, cwd=ROOT, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr


def test_build_cuda_zero_forces_cpu_only(monkeypatch):
    monkeypatch.setenv("DILATED_SPARSE_BUILD_CUDA", "0")
    assert _sources.want_cuda(ROOT) is False
    assert _sources.define_macros(False) == []
    macros = dict(_sources.define_macros(True))
    assert "DILATED_SPARSE_WITH_CUDA" in macros and ";" not in (macros["DILATED_SPARSE_CUDA_ARCHS"] or "")


@pytest.mark.parametrize("archs,hopper", [("8.0;9.0a", True), ("9.0a+PTX", True), ("8.0 9.0", False), ("8.0", False)])
def test_sm90a_macro_follows_the_arch_list(monkeypatch, archs, hopper):
    """The Hopper kernels are registered only for builds with an sm_90a target (plain 9.0 lacks wgmma)."""
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", archs)
    macros = dict(_sources.define_macros(True))
    assert ("DILATED_SPARSE_SM90A" in macros) is hopper
    assert ";" not in macros["DILATED_SPARSE_CUDA_ARCHS"]


def test_default_arch_list_has_sm90a(monkeypatch):
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    assert "9.0a" in _sources.cuda_arch_list().split(";")
    assert "DILATED_SPARSE_SM90A" in dict(_sources.define_macros(True))


def test_sources_cmake_listing():
    proc = subprocess.run([sys.executable, str(ROOT / "dilated_sparse" / "_sources.py"), "--cmake", "cpp"],
                          capture_output=True, text=True, check=True)
    listed = proc.stdout.split(";")
    assert listed == [str(ROOT / s) for s in _sources.cpp_sources(ROOT)]


# ----------------------------------------------------------------------- loaded extension
def test_loaded_extension_reports_its_build():
    info = extension_info()
    assert info["mode"] in ("wheel", "jit")
    expected = os.environ.get("DILATED_SPARSE_EXPECT_MODE")
    if expected:
        assert info["mode"] == expected, info
    assert info["cpu_isa"] in ("default", "avx2", "avx512")
    assert isinstance(info["cuda"], bool)
    if not info["cuda"]:
        assert info["archs"] == [] and info["head_dims"] == []
    names = {"block_sparse_attn_fwd", "block_sparse_attn_bwd", "block_sparse_attn_weights"}
    for name in names:
        assert hasattr(torch.ops.dilated_sparse, name)
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"dilated_sparse::{name}", "CPU"), name
    assert ds.extension_available()


def test_loaded_extension_formats_numbers_in_its_errors():
    # An error message with numbers in it is formatted by libstdc++ code inlined into the extension.
    # A toolchain that gives the extension private copies of libstdc++'s locale facets (seen on a
    # GPU machine whose g++ wrapper pointed at another GCC's files) turns every such message into
    # a segfault. Run in a child, so that a crash fails this test with the reason.
    script = textwrap.dedent(
        """
        import torch, dilated_sparse as ds
        q = torch.zeros(1, 32, 2, 8)
        layout = ds.BlockSparseLayout.from_block_pairs([(0, 0), (1, 1)], block_size=16, seq_len_q=32)
        args = (q, q, q, layout.crow_indices, layout.col_indices, 16, 16, 1, 1, 0.3, False, -1, -1,
                None, torch.zeros(1, 31, dtype=torch.bool))
        try:
            torch.ops.dilated_sparse.block_sparse_attn_fwd(*args)
        except RuntimeError as error:
            print(str(error).splitlines()[0])
        """
    )
    result = subprocess.run([sys.executable, "-c", script], check=False, capture_output=True, text=True,
                            timeout=300)
    if result.returncode != 0:
        nm, so = shutil.which("nm"), extension_info()["path"]  # the loaded module, wheel or JIT
        private = 0
        if nm and so:
            listing = subprocess.run([nm, "-D", "--defined-only", so], check=False, capture_output=True, text=True)
            private = listing.stdout.count("num_put")
        pytest.fail(f"a bad-input error crashed the process (rc {result.returncode}; the extension defines "
                    f"{private} std::num_put symbols of its own): rebuild with the distribution's g++ "
                    f"(CXX=/usr/bin/g++, see BUILDING.md)\n{result.stderr[-2000:]}")
    assert "key_padding_mask must be [B=1, Sk=32], got [1, 31]" in result.stdout, result.stdout


# -------------------------------------------------------------------------------- JIT path
@pytest.mark.slow
def test_jit_build_loads_and_runs(tmp_path):
    """DILATED_SPARSE_JIT=1 builds with torch.utils.cpp_extension.load (cached) and runs the op."""
    if shutil.which("ninja") is None and not (Path(sys.executable).parent / "ninja").exists():
        pytest.skip("ninja is needed by torch.utils.cpp_extension.load")
    env = _child_env(DILATED_SPARSE_JIT="1", PYTHONPATH=str(ROOT))
    result = _run_check(env, cwd=tmp_path)
    assert result["info"]["mode"] == "jit"
    assert result["info"]["cuda"] is False
    assert result["err"] < 1e-9
    assert Path(result["file"]).resolve().parent == (ROOT / "dilated_sparse").resolve()


# ------------------------------------------------------------------------------ wheel path
def _copy_tree_for_build(dst: Path) -> None:
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, dst / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.so", "*.o", "build", "*.egg-info")
    shutil.copytree(ROOT / "csrc", dst / "csrc", ignore=ignore)
    shutil.copytree(ROOT / "dilated_sparse", dst / "dilated_sparse", ignore=ignore)


@pytest.mark.slow
def test_wheel_build_installs_and_runs(tmp_path):
    """``pip wheel --no-build-isolation`` of the tree: the wheel carries the compiled module."""
    if os.environ.get("DILATED_SPARSE_SKIP_WHEEL_TEST") == "1":
        pytest.skip("DILATED_SPARSE_SKIP_WHEEL_TEST=1")
    src = tmp_path / "src"
    src.mkdir()
    _copy_tree_for_build(src)
    wheels = tmp_path / "wheels"
    env = _child_env()
    env.pop("DILATED_SPARSE_JIT", None)
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "-w", str(wheels), str(src)],
        check=False, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=1800,
    )
    assert proc.returncode == 0, f"pip wheel failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    built = list(wheels.glob("dilated_sparse-*.whl"))
    assert len(built) == 1, list(wheels.iterdir())
    with zipfile.ZipFile(built[0]) as zf:
        names = zf.namelist()
        assert any(n.startswith("dilated_sparse/_C") and n.endswith(".so") for n in names), names
        for module in ("__init__.py", "layout.py", "ops.py", "reference.py", "_extension.py", "_sources.py"):
            assert f"dilated_sparse/{module}" in names
        site = tmp_path / "site"
        zf.extractall(site)
    env = _child_env(PYTHONPATH=str(site))
    env.pop("DILATED_SPARSE_JIT", None)
    result = _run_check(env, cwd=tmp_path)
    assert result["info"]["mode"] == "wheel"
    assert Path(result["file"]).resolve().parent == (site / "dilated_sparse").resolve()
    assert result["err"] < 1e-9


def _tool(name: str):
    """The module csrc/cuda/tools/<name>.py."""
    spec = importlib.util.spec_from_file_location(f"_{name}", ROOT / "csrc" / "cuda" / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_ab_env_pairs_rounds():
    """csrc/cuda/tools/ab_env.py reports each mode against the baseline's call of the same round:
    the median of the per-round ratios (not the ratio of medians) and the share of rounds it won."""
    ab_env = _tool("ab_env")
    # Round 2 is slow for both modes (a clock dip): paired, mode 1 is 5% faster in two rounds of three.
    base, other = [100.0, 200.0, 100.0], [95.0, 210.0, 95.0]
    assert ab_env.summarise([base, other]) == ["100.0", "0.950 (67%)"]
    assert ab_env.summarise([base, list(base)]) == ["100.0", "1.000 (0%)"]


def test_ab_points_pairs_rounds_and_counts_active_blocks():
    """csrc/cuda/tools/ab_points.py reports each point's TFLOP/s against the first point's in the
    same round, and counts the flops of the point's own block size."""
    ab_points = _tool("ab_points")
    # Round 2 runs every point at a lower clock: paired, the second point keeps 90% in both rounds.
    # Microseconds a round of three points of 1e9 flops each (2 us: 500 TFLOP/s).
    cells = ab_points.ratio_cells([[2.0, 2.5], [2.2222, 2.7778], [1.6667, 2.5]], [1e9] * 3)
    assert cells == [["450", ""], ["405", "0.900"], ["500", "1.100"]]
    mask = ab_points.pattern(1024 // 64, "local", 0.25)
    assert ab_points.point_flops("1x2x1024x32:local:0.25:64") == 4.0 * int(mask.sum()) * 64 * 64 * 32 * 2
    assert ab_points.point_flops("1x2x1024x32:local:0.25") == ab_points.point_flops("1x2x1024x32:local:0.25:128")


def test_ab_builds_alternates_and_summarises():
    """csrc/cuda/tools/ab_builds.py puts each build first in half of its pairs of processes and
    reports each build's median over its processes and their ratio."""
    ab_builds = _tool("ab_builds")
    assert ab_builds.order(3) == ["base", "new", "new", "base", "base", "new"]
    runs = {"base": [{"p": [100.0]}, {"p": [104.0]}, {"p": [102.0]}],
            "new": [{"p": [99.0]}, {"p": [97.0]}, {"p": [98.0]}]}
    assert ab_builds.summarise(runs, ["p"], fwd_only=True) == ["| p | fwd | 102.0 (100.0-104.0) | 98.0 (97.0-99.0) | 0.961 |"]


def test_energy_rows_are_power_times_time():
    """csrc/cuda/tools/energy.py reports a loop's energy a call as its median power times its time
    a call, and says so when the monitor had no samples."""
    energy = _tool("energy")
    window = {"sm_mhz": 1695.0, "sm_mhz_min": 1635.0, "power_w": 692.0, "throttle": ["0x4"], "samples": 120}
    assert energy.row("p", "ours", "fwd+bwd", 964.0, window) == "| p | ours | fwd+bwd | 964 | 1695 (1635) | 692 | 667 |"
    assert energy.row("p", "flex", "fwd", 368.0, {}) == "| p | flex | fwd | 368 | - | - | - |"
    bench_point = _tool("bench_point")
    assert bench_point.parse_point("1x16x16384x128:causal_local:0.05") == (1, 16, 16384, 128, "causal_local", 0.05)
    assert bench_point.split_block("1x16x16384x128:local:0.1:64", 128) == ("1x16x16384x128:local:0.1", 64)
    assert bench_point.split_block("1x16x16384x128:local:0.1", 128) == ("1x16x16384x128:local:0.1", 128)
