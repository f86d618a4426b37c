"""Single source of truth for what the C++/CUDA extension is built from.

Used by ``setup.py`` (wheel / editable build), by :mod:`dilated_sparse._extension` (JIT build) and by
``CMakeLists.txt`` (``python dilated_sparse/_sources.py --cmake ...``), so the three build paths
compile the same files with the same flags. This module imports nothing from the package and
nothing outside the standard library, so it can be loaded by file path before torch is set up.

Environment:
    DILATED_SPARSE_BUILD_CUDA: ``0`` builds the CPU kernels only even when nvcc is present; ``1``
        (or unset) builds the CUDA kernels too where nvcc is found. Any other value is an error.
    DILATED_SPARSE_CUDA_INSTANTIATIONS: comma-separated patterns selecting the files of
        ``csrc/cuda/instantiations/`` (one per op x head dim x dtype, e.g. ``fwd_hdim64_bf16.cu``).
        Each entry is an ``fnmatch`` pattern on the file stem; an entry without wildcards matches
        stems containing it (``hdim64_bf16`` selects the forward and both backward kernels of that
        case). Empty or ``all``: every file. An entry that matches no file is an error. Kernels
        left out raise a clear error when called.
    CUTLASS_INCLUDE_DIR: CUTLASS headers; otherwise those of the ``nvidia-cutlass`` package
        (``cutlass_library/source/include``) when installed.
"""

from __future__ import annotations

import fnmatch
import importlib.util
import os
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CXX_FLAGS = ["-O3", "-std=c++20", "-fno-math-errno", "-fno-trapping-math"]
NVCC_FLAGS = ["-O3", "-std=c++20", "--expt-relaxed-constexpr", "-lineinfo"]


def openmp_flags() -> list[str]:
    """``["-fopenmp"]`` when torch's ATen parallel backend is OpenMP, else ``[]``.

    ``at::parallel_for`` is inline OpenMP code in torch's headers (``ATen/ParallelOpenMP.h``):
    compiled without ``-fopenmp`` its ``#pragma omp parallel`` is ignored and every CPU kernel runs
    on one thread. Linking with ``-fopenmp`` records ``libgomp.so.1``, which resolves to the copy
    torch has already loaded. Imports torch lazily (this module stays importable without it).
    """
    if not sys.platform.startswith("linux"):
        return []
    try:
        import torch
    except ImportError:
        return []
    config = Path(torch.__file__).resolve().parent / "include" / "ATen" / "Config.h"
    try:
        text = config.read_text()
    except OSError:
        return []
    return ["-fopenmp"] if "#define AT_PARALLEL_OPENMP 1" in text else []


def _rel(paths: list[Path], root: Path) -> list[str]:
    return [str(p.relative_to(root)) for p in paths]


def cpp_sources(root: Path = ROOT) -> list[str]:
    """C++ sources (schema, C++ API and Python module; the shared argument checks; CPU kernels),
    relative to ``root``."""
    files = [root / "csrc" / "ops.cpp", root / "csrc" / "checks.cpp", *sorted((root / "csrc" / "cpu").rglob("*.cpp"))]
    return _rel(files, root)


def _instantiation_filter() -> list[tuple[str, str]]:
    """(entry as written, its fnmatch pattern) of each DILATED_SPARSE_CUDA_INSTANTIATIONS entry."""
    raw = os.environ.get("DILATED_SPARSE_CUDA_INSTANTIATIONS", "").strip()
    if raw in ("", "all", "*"):
        return []
    patterns = []
    for entry in (e.strip() for e in raw.split(",")):
        if entry:
            patterns.append((entry, entry if any(ch in entry for ch in "*?[") else f"*{entry}*"))
    return patterns


def cuda_sources(root: Path = ROOT) -> list[str]:
    """CUDA sources (``csrc/cuda/**``), relative to ``root``, honouring the instantiation filter."""
    cuda_dir = root / "csrc" / "cuda"
    if not cuda_dir.is_dir():
        return []
    patterns = _instantiation_filter()
    files = []
    matched: set[str] = set()
    for path in sorted(cuda_dir.rglob("*")):
        if path.suffix not in (".cu", ".cpp") or not path.is_file():
            continue
        if patterns and "instantiations" in path.relative_to(cuda_dir).parts:
            hits = {entry for entry, pattern in patterns if fnmatch.fnmatch(path.stem, pattern)}
            if not hits:
                continue
            matched |= hits
        files.append(path)
    # A typo (hdim46) would otherwise build without the kernels it meant, and fail only when called.
    unmatched = [entry for entry, _ in patterns if entry not in matched]
    if unmatched:
        raise ValueError(
            f"DILATED_SPARSE_CUDA_INSTANTIATIONS: {', '.join(unmatched)} matches no file of "
            f"{cuda_dir / 'instantiations'} (stems like fwd_hdim64_bf16, dq_sm90_hdim128_fp16)"
        )
    return _rel(files, root)


def cutlass_include_dir() -> str | None:
    """CUTLASS include directory, or None when neither the env var nor the package provides one."""
    env = os.environ.get("CUTLASS_INCLUDE_DIR")
    if env:
        return env
    spec = importlib.util.find_spec("cutlass_library")
    if spec is not None and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            candidate = Path(location) / "source" / "include"
            if (candidate / "cutlass").is_dir():
                return str(candidate)
    return None


def include_dirs(root: Path = ROOT, with_cuda: bool = False) -> list[str]:
    """Absolute include directories."""
    dirs = [str(root / "csrc" / "include"), str(root / "csrc")]
    if with_cuda:
        cutlass = cutlass_include_dir()
        if cutlass:
            dirs.append(cutlass)
    return dirs


def nvcc_path() -> str | None:
    """nvcc of CUDA_HOME / CUDA_PATH, /usr/local/cuda or PATH, if any."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home and (Path(home) / "bin" / "nvcc").is_file():
            return str(Path(home) / "bin" / "nvcc")
    if Path("/usr/local/cuda/bin/nvcc").is_file():
        return "/usr/local/cuda/bin/nvcc"
    return shutil.which("nvcc")


def want_cuda(root: Path = ROOT) -> bool:
    """Whether to build the CUDA kernels: nvcc found, CUDA sources present, not disabled by env."""
    flag = os.environ.get("DILATED_SPARSE_BUILD_CUDA", "").strip()
    if flag not in ("", "0", "1"):
        raise ValueError(f"DILATED_SPARSE_BUILD_CUDA must be 0 or 1 (unset: 1), got {flag!r}")
    if flag == "0":
        return False
    return nvcc_path() is not None and bool(cuda_sources(root))


# sm_90a (not plain 9.0): the Hopper kernels (wgmma) exist only in an sm_90a cubin.
DEFAULT_CUDA_ARCHS = "8.0;9.0a"


def cuda_arch_list() -> str:
    """Architectures of the CUDA build: TORCH_CUDA_ARCH_LIST, else ``DEFAULT_CUDA_ARCHS``."""
    return os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip() or DEFAULT_CUDA_ARCHS


def define_macros(with_cuda: bool) -> list[tuple[str, str | None]]:
    """Preprocessor macros of the build.

    The arch list travels as a comma-separated token list (``8.0,9.0``) that ``csrc/ops.cpp``
    stringifies: no quotes or semicolons, which the shell of a ninja build would mangle.
    ``DILATED_SPARSE_SM90A`` marks a build with an sm_90a target: the host code then registers the
    Hopper (wgmma) kernels (csrc/cuda/kernels_sm90.cuh), which are picked on compute capability 9.0.
    """
    macros: list[tuple[str, str | None]] = []
    if with_cuda:
        arch_list = [a for a in cuda_arch_list().replace(";", " ").replace(",", " ").split() if a]
        macros.append(("DILATED_SPARSE_WITH_CUDA", None))
        macros.append(("DILATED_SPARSE_CUDA_ARCHS", ",".join(arch_list)))
        if any(a.split("+")[0].lower() in ("9.0a", "90a") for a in arch_list):
            macros.append(("DILATED_SPARSE_SM90A", None))
    return macros


def _cmake_main(argv: list[str]) -> int:
    """``--cmake {cpp,cuda,include}``: print ;-separated absolute paths for CMakeLists.txt."""
    if len(argv) != 2 or argv[0] != "--cmake" or argv[1] not in ("cpp", "cuda", "include"):
        print("usage: _sources.py --cmake {cpp,cuda,include}", file=sys.stderr)
        return 2
    if argv[1] == "include":
        items = include_dirs(ROOT, with_cuda=True)
    else:
        rel = cpp_sources(ROOT) if argv[1] == "cpp" else cuda_sources(ROOT)
        items = [str(ROOT / p) for p in rel]
    print(";".join(items), end="")
    return 0


if __name__ == "__main__":
    sys.exit(_cmake_main(sys.argv[1:]))
