"""Loading of the compiled ops (``torch.ops.dilated_sparse.*``).

Two ways, never a silent fallback to Python:

* **wheel**: ``pip install --no-build-isolation .`` (or ``-e .``) compiles ``dilated_sparse._C``;
  importing it registers the ops.
* **JIT**: with ``DILATED_SPARSE_JIT=1``, or when no compiled module is installed (a source
  checkout), the same sources (:mod:`dilated_sparse._sources`) are built with
  :func:`torch.utils.cpp_extension.load` into a cache directory
  (``DILATED_SPARSE_JIT_CACHE``, default ``~/.cache/dilated_sparse/jit``), once per torch version and
  configuration. CUDA sources join the JIT build when nvcc is found and a GPU is visible (and
  ``DILATED_SPARSE_BUILD_CUDA`` is not ``0``).

If neither works, :func:`load_extension` raises :class:`ImportError` naming both causes.
"""

from __future__ import annotations

import hashlib
import importlib
import os
import threading
from pathlib import Path
from types import ModuleType
from typing import Any

from . import _sources

__all__ = ["extension_info", "jit_build", "load_extension"]

_LOCK = threading.Lock()
_MODULE: ModuleType | None = None
_MODE: str | None = None


def _env_flag(name: str) -> bool:
    """A yes / no environment switch: unset, ``0``, ``false``, ``no`` or ``off`` is no; ``1``, ``true``,
    ``yes`` or ``on`` is yes; anything else raises, so that a typo does not quietly pick the other
    build path."""
    value = os.environ.get(name, "").strip().lower()
    if value in ("", "0", "false", "no", "off"):
        return False
    if value in ("1", "true", "yes", "on"):
        return True
    raise ValueError(f"{name} must be 0 or 1 (or false / true, no / yes, off / on), got {os.environ[name]!r}")


def _jit_cache_dir(with_cuda: bool) -> Path:
    import torch

    base = Path(os.environ.get("DILATED_SPARSE_JIT_CACHE", Path.home() / ".cache" / "dilated_sparse" / "jit"))
    tag = f"torch{torch.__version__}-{'cuda' if with_cuda else 'cpu'}"
    return base / tag.replace("+", "_")


def jit_build(verbose: bool = False, with_cuda: bool | None = None) -> ModuleType:
    """Build (or reuse from the cache) and import the extension with torch's JIT loader.

    Args:
        verbose: print the compiler commands.
        with_cuda: include the CUDA sources; default: nvcc found, a GPU visible and
            ``DILATED_SPARSE_BUILD_CUDA`` not ``0``.

    Returns:
        The loaded extension module (its import registered the ops).
    """
    import logging

    import torch

    root = _sources.ROOT
    missing = [p for p in _sources.cpp_sources(root) if not (root / p).is_file()]
    if not (root / "csrc" / "ops.cpp").is_file() or missing:
        raise ImportError(f"dilated_sparse JIT build: C++ sources not found under {root / 'csrc'}")
    if with_cuda is None:
        with_cuda = _sources.want_cuda(root) and torch.cuda.is_available()
    # Importing cpp_extension on a machine without a CUDA runtime logs a CUDA_HOME guess; that is
    # only news for a CUDA build, so a CPU-only JIT build keeps it quiet.
    ext_logger = logging.getLogger("torch.utils.cpp_extension")
    level = ext_logger.level
    if not with_cuda:
        ext_logger.setLevel(logging.ERROR)
    try:
        from torch.utils import cpp_extension
    finally:
        ext_logger.setLevel(level)
    sources = _sources.cpp_sources(root) + (_sources.cuda_sources(root) if with_cuda else [])
    macros = [f"-D{k}" if v is None else f"-D{k}={v}" for k, v in _sources.define_macros(with_cuda)]
    openmp = _sources.openmp_flags()  # at::parallel_for needs it to use more than one thread
    # The module name carries a hash of the configuration, so that different configurations
    # (CPU-only vs CUDA, instantiation subsets) never overwrite each other in the cache.
    key = "|".join([*sources, *macros, *_sources.CXX_FLAGS, *openmp, *_sources.NVCC_FLAGS, str(with_cuda)])
    name = "dilated_sparse_jit_" + hashlib.sha1(key.encode()).hexdigest()[:10]
    build_dir = _jit_cache_dir(with_cuda) / name
    build_dir.mkdir(parents=True, exist_ok=True)
    return cpp_extension.load(
        name=name,
        sources=[str(root / s) for s in sources],
        extra_cflags=[*_sources.CXX_FLAGS, *openmp, *macros],
        extra_ldflags=openmp,
        extra_cuda_cflags=[*_sources.NVCC_FLAGS, *macros],
        extra_include_paths=_sources.include_dirs(root, with_cuda=with_cuda),
        build_directory=str(build_dir),
        with_cuda=with_cuda,
        is_python_module=True,
        verbose=verbose,
    )


def load_extension() -> ModuleType:
    """Load the compiled ops once per process and return the extension module.

    Raises:
        ImportError: neither a compiled ``dilated_sparse._C`` nor a JIT build is available.
        ValueError: ``DILATED_SPARSE_JIT`` or ``DILATED_SPARSE_JIT_VERBOSE`` holds a value that is not
            a yes / no switch.
    """
    global _MODULE, _MODE
    with _LOCK:
        if _MODULE is not None:
            return _MODULE
        force_jit = _env_flag("DILATED_SPARSE_JIT")  # a bad value raises here, not as a failed build
        verbose = _env_flag("DILATED_SPARSE_JIT_VERBOSE")
        wheel_error: BaseException | None = None
        if not force_jit:
            try:
                _MODULE = importlib.import_module("dilated_sparse._C")
                _MODE = "wheel"
                return _MODULE
            except ImportError as error:
                wheel_error = error
        try:
            _MODULE = jit_build(verbose=verbose)
            _MODE = "jit"
            return _MODULE
        except Exception as error:
            if wheel_error is None:
                reason = "DILATED_SPARSE_JIT=1 was set"
            else:
                reason = f"importing the compiled module failed ({wheel_error!r})"
            raise ImportError(
                f"dilated_sparse: cannot load the C++ ops: {reason} and the JIT build failed "
                f"({error!r}). Build with `pip install --no-build-isolation .` or fix the JIT build "
                "(needs a C++20 compiler and ninja; see README)."
            ) from error


def extension_info() -> dict[str, Any]:
    """Describe the loaded extension.

    Returns:
        ``dict(mode='wheel'|'jit', cuda=bool, archs=list[str], head_dims=list[int], cpu_isa=str,
        path=str)``.
    """
    module = load_extension()
    archs = [a for a in module.cuda_archs().split(",") if a]
    return {
        "mode": _MODE,
        "cuda": bool(module.compiled_with_cuda()),
        "archs": archs,
        "head_dims": list(module.cuda_head_dims()),
        "cpu_isa": module.cpu_isa(),
        "path": getattr(module, "__file__", None),
    }
