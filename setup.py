"""Build of dilated_sparse with its compiled extension ``dilated_sparse._C``.

    pip install --no-build-isolation .        # or -e . for a development checkout

CPU kernels always; the CUDA kernels join when nvcc is found (CUDA_HOME), torch is a CUDA build and
DILATED_SPARSE_BUILD_CUDA is not 0. DILATED_SPARSE_CUDA_INSTANTIATIONS selects a subset of the CUDA
instantiation files, TORCH_CUDA_ARCH_LIST the architectures (default 8.0;9.0a), MAX_JOBS the
parallel compile jobs. The file list and flags come from dilated_sparse/_sources.py, shared with the
JIT and CMake builds.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).resolve().parent


def _load_sources_module():
    # By file path: importing the package would import torch-dependent modules and the extension.
    spec = importlib.util.spec_from_file_location("_ds_sources", ROOT / "dilated_sparse" / "_sources.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _extensions():
    import torch
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    src = _load_sources_module()
    # CUDA needs nvcc (and DILATED_SPARSE_BUILD_CUDA != 0) and a CUDA build of torch to link against.
    with_cuda = src.want_cuda(ROOT) and torch.version.cuda is not None
    if with_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", src.cuda_arch_list())
        nvcc = src.nvcc_path()
        os.environ.setdefault("CUDA_HOME", str(Path(nvcc).resolve().parent.parent))
    sources = src.cpp_sources(ROOT) + (src.cuda_sources(ROOT) if with_cuda else [])
    kwargs = {
        "name": "dilated_sparse._C",
        "sources": sources,
        "include_dirs": src.include_dirs(ROOT, with_cuda=with_cuda),
        "define_macros": src.define_macros(with_cuda),
        "extra_compile_args": {"cxx": [*src.CXX_FLAGS, *src.openmp_flags()], "nvcc": list(src.NVCC_FLAGS)},
        "extra_link_args": src.openmp_flags(),
    }
    print(f"dilated_sparse: building {'CPU+CUDA' if with_cuda else 'CPU-only'} extension, {len(sources)} sources")
    return [CUDAExtension(**kwargs) if with_cuda else CppExtension(**kwargs)]


def _cmdclass():
    from torch.utils.cpp_extension import BuildExtension

    return {"build_ext": BuildExtension.with_options(use_ninja=True)}


setup(
    packages=find_packages(include=["dilated_sparse", "dilated_sparse.*"]),
    ext_modules=_extensions(),
    cmdclass=_cmdclass(),
)
