"""The CUDA sources compile (and link into a shared object) on a machine without a GPU.

CI has no GPU, so the kernels themselves are tested on a GPU machine (tests/test_cuda_kernels.py,
csrc/cuda/tools/device_run.sh). This test proves that `csrc/cuda` still compiles with the flags
of the real build: the host/dispatch file and a reduced instantiation set (one file per op, head dim
64, bf16, as `DILATED_SPARSE_CUDA_INSTANTIATIONS` would select) for sm_80, and the Hopper (wgmma)
files of the same set for sm_90a, with the wgmma wrappers checked against their generator. Skipped without nvcc.
Symbols of libtorch_cuda stay unresolved in the link (a CPU-only torch has none); they are resolved
when the full extension is built on a CUDA machine.
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("_ds_sources_test", ROOT / "dilated_sparse" / "_sources.py")
_sources = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_sources)

NVCC = _sources.nvcc_path()


def _torch_has_cuda_headers() -> bool:
    # A CPU-only torch wheel ships no c10/cuda headers; the CUDA sources cannot compile against it.
    import torch

    return torch.version.cuda is not None


pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(NVCC is None, reason="needs nvcc (CUDA toolkit)"),
    pytest.mark.skipif(not _torch_has_cuda_headers(), reason="needs a CUDA build of torch (its c10/cuda headers)"),
]

# Torch's own nvcc defines (its headers are compiled with these in every CUDA extension).
TORCH_NVCC_DEFINES = ["-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
                      "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__"]
REDUCED = ["fwd_hdim64_bf16", "dq_hdim64_bf16", "dkv_hdim64_bf16"]
# D128 dQ / dK/dV hold the dS-scratch backward's kernels (dq_ds_sm90_kernel, dK/dV with kSchedWriteDs).
REDUCED_SM90 = ["fwd_sm90_hdim64_bf16", "dq_sm90_hdim64_bf16", "dkv_sm90_hdim64_bf16", "dq_sm90_hdim128_bf16",
                "dkv_sm90_hdim128_bf16"]
SM80 = ["-gencode=arch=compute_80,code=sm_80"]
SM90A = ["-gencode=arch=compute_90a,code=sm_90a", "-DDILATED_SPARSE_SM90A"]


def _compile(src: Path, obj: Path, includes: list[str], arch: list[str] = SM80) -> subprocess.CompletedProcess:
    cmd = [NVCC, *_sources.NVCC_FLAGS, *TORCH_NVCC_DEFINES, *arch,
           "-Xcompiler", "-fPIC", "-DTORCH_EXTENSION_NAME=ds_build_test", *(f"-I{i}" for i in includes),
           "-c", str(src), "-o", str(obj)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=900, check=False)


def test_cuda_sources_compile_and_link(tmp_path):
    torch_ext = pytest.importorskip("torch.utils.cpp_extension")
    includes = [*_sources.include_dirs(ROOT), *torch_ext.include_paths()]
    cuda_dir = ROOT / "csrc" / "cuda"
    jobs = [(cuda_dir / "attention.cu", SM80), *((cuda_dir / "instantiations" / f"{n}.cu", SM80) for n in REDUCED),
            *((cuda_dir / "instantiations" / f"{n}.cu", SM90A) for n in REDUCED_SM90)]
    for s, _ in jobs:
        assert s.is_file(), s
    objs = [tmp_path / (s.stem + ".o") for s, _ in jobs]
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(lambda job: _compile(job[0][0], job[1], includes, job[0][1]), zip(jobs, objs)))
    for (s, _), r in zip(jobs, results):
        assert r.returncode == 0, f"{s.name} failed to compile:\n{r.stderr[-4000:]}"
    # ptxas serialises wgmma (its notes C751x / C752x, printed without -v) when registers run out,
    # a pipeline stage is broken or a wgmma sits on a divergent path: allowed in tuning variants,
    # never in the ping-pong kernels (schedules 2-4, 2 and 3 the defaults; 34-36 with the dS write)
    # nor in the dQ-from-dS kernel (whose C7520 an earlier "C751" filter missed).
    serialised = [line for _, r in zip(jobs, results) for line in r.stderr.splitlines()
                  if "wgmma.mma_async instructions are serialized" in line]
    pingpong = r"_sm90_kernel\w*ELi(?:[234]|3[456])EEEv|dq_ds_sm90_kernel"
    assert not [line for line in serialised if re.search(pingpong, line)], serialised
    lib = tmp_path / "libds_cuda_test.so"
    r = subprocess.run([NVCC, "-shared", *map(str, objs), "-o", str(lib)], capture_output=True, text=True, check=False,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-4000:]
    assert lib.stat().st_size > 0


def test_wgmma_wrappers_match_generator(tmp_path, monkeypatch):
    """csrc/cuda/wgmma.inc is what tools/gen_wgmma.py writes (no hand edits, no stale copy)."""
    spec = importlib.util.spec_from_file_location("_gen_wgmma", ROOT / "csrc" / "cuda" / "tools" / "gen_wgmma.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    text = (ROOT / "csrc" / "cuda" / "wgmma.inc").read_text()
    for n in gen.SHAPES:
        for ctype, ptx in gen.DTYPES:
            assert gen.wrapper(n, ctype, ptx) in text
    assert text.count("struct Wgmma<") == len(gen.SHAPES) * len(gen.DTYPES)
