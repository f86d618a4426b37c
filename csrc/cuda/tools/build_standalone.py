"""Device-run fallback: build the CUDA kernels + the op schemas + the shared argument checks
(csrc/checks.cpp, which the CUDA ops call) as a standalone library.

Prints the path of the built shared library (for DILATED_SPARSE_TEST_LIB). Used by device_run.sh
only when the package build fails, so kernel tests do not depend on the rest of the tree.
"""

import glob
import os
import sys

from torch.utils import cpp_extension

root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
sys.path.insert(0, os.path.join(root, "dilated_sparse"))
import _sources

srcs = [os.path.join(root, "csrc/cuda/tools/schema_only.cc"), os.path.join(root, "csrc/checks.cpp")] + [os.path.join(root, s) for s in _sources.cuda_sources()]
build = os.path.join(os.environ.get("TMPDIR", "/tmp"), "ds_standalone")
os.makedirs(build, exist_ok=True)
macros = [f"-D{k}" if v is None else f"-D{k}={v}" for k, v in _sources.define_macros(True)]
cpp_extension.load(name="ds_standalone", sources=srcs, extra_cflags=["-O3", "-std=c++20", *macros],
                   extra_cuda_cflags=[*_sources.NVCC_FLAGS, *macros], extra_include_paths=[os.path.join(root, "csrc"), os.path.join(root, "csrc", "include")],
                   build_directory=build, is_python_module=False, verbose=False)
print(glob.glob(os.path.join(build, "ds_standalone*.so"))[0])
