// Fallback for device test runs only (never part of the package build: _sources.py picks .cu/.cpp):
// the op schemas of csrc/ops.cpp, so that the CUDA kernels can be built and tested as a standalone
// library (torch.ops.load_library) while the main build is broken. build_standalone.py compiles it
// with csrc/checks.cpp, whose argument checks the CUDA ops call. The schemas come from
// dilated_sparse/detail/schema.h, as in csrc/ops.cpp.
#include <torch/library.h>

#include "dilated_sparse/detail/schema.h"

TORCH_LIBRARY(dilated_sparse, m) {
  m.def(dilated_sparse::detail::kFwdSchema);
  m.def(dilated_sparse::detail::kBwdSchema);
  m.def(dilated_sparse::detail::kWeightsSchema);
}
