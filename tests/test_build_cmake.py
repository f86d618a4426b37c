"""The CMake build: library + headers + package config, and the C++ example linked against the
installed package (examples/cpp), which runs the op on CPU tensors and checks it against a naive
loop. Skipped only when cmake is missing."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.utils

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.slow


def _cmake() -> str:
    exe = shutil.which("cmake") or (str(Path(sys.executable).parent / "cmake")
                                    if (Path(sys.executable).parent / "cmake").exists() else None)
    if exe is None:
        pytest.skip("cmake is not installed")
    return exe


def _generator_args() -> list[str]:
    ninja = shutil.which("ninja") or (str(Path(sys.executable).parent / "ninja")
                                      if (Path(sys.executable).parent / "ninja").exists() else None)
    return ["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja}"] if ninja else []


def _torch_cuda_args(env: dict[str, str]) -> list[str]:
    """A CUDA build of torch makes its CMake config look for the CUDA toolkit, even for a CPU-only
    library: point it at CUDA_HOME, give it an arch list (no GPU to probe) and, when the toolkit
    lacks libnvrtc, the one of the nvidia pip package that torch itself uses."""
    if not torch.version.cuda:
        return []
    env.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    args = []
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    args.append(f"-DCUDA_TOOLKIT_ROOT_DIR={home}")
    if not list(Path(home).glob("lib*/libnvrtc.so*")):
        site = Path(torch.__file__).resolve().parent.parent
        found = sorted(site.glob("nvidia/*/lib/libnvrtc.so*")) + sorted(site.glob("nvidia/cuda_nvrtc/lib/libnvrtc.so*"))
        if found:
            args.append(f"-DCUDA_nvrtc_LIBRARY={found[0]}")
    return args


def _run(cmd: list[str], env: dict[str, str], cwd: Path, timeout: int = 1800) -> str:
    proc = subprocess.run(cmd, check=False, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-6000:]}\n{proc.stderr[-6000:]}"
    return proc.stdout


def test_cmake_library_package_and_cpp_example(tmp_path):
    cmake = _cmake()
    env = dict(os.environ)
    jobs = env.get("MAX_JOBS", "2")
    cuda_args = _torch_cuda_args(env)
    torch_prefix = torch.utils.cmake_prefix_path
    build, install, example = tmp_path / "build", tmp_path / "install", tmp_path / "example"

    _run([cmake, "-S", str(ROOT), "-B", str(build), *_generator_args(), "-DCMAKE_BUILD_TYPE=Release",
          f"-DCMAKE_PREFIX_PATH={torch_prefix}", f"-DCMAKE_INSTALL_PREFIX={install}", *cuda_args], env, tmp_path)
    _run([cmake, "--build", str(build), "-j", jobs], env, tmp_path)
    _run([cmake, "--install", str(build)], env, tmp_path)

    libdirs = [d for d in ("lib", "lib64") if (install / d).is_dir()]
    assert libdirs, list(install.iterdir())
    libdir = install / libdirs[0]
    assert list(libdir.glob("libdilated_sparse.so*"))
    assert (install / "include" / "dilated_sparse" / "dilated_sparse.h").is_file()
    assert (install / "include" / "dilated_sparse" / "detail" / "checks.h").is_file()
    for name in ("dilated_sparseConfig.cmake", "dilated_sparseConfigVersion.cmake", "dilated_sparseTargets.cmake"):
        assert (libdir / "cmake" / "dilated_sparse" / name).is_file(), name

    # The example finds the installed package (and Torch through it) like any other project.
    _run([cmake, "-S", str(ROOT / "examples" / "cpp"), "-B", str(example), *_generator_args(),
          "-DCMAKE_BUILD_TYPE=Release", f"-DCMAKE_PREFIX_PATH={install};{torch_prefix}", *cuda_args], env, tmp_path)
    _run([cmake, "--build", str(example), "-j", jobs], env, tmp_path)
    out = _run([str(example / "dilated_sparse_example")], env, tmp_path, timeout=600)
    assert "dilated_sparse example: OK" in out, out
    assert out.count(" ok") >= 4, out
