// dilated_sparse op schemas (declared once), the C++ API that calls the ops through the
// dispatcher, and the small Python module `dilated_sparse._C`.
//
// Kernels live elsewhere: csrc/cpu registers `TORCH_LIBRARY_IMPL(dilated_sparse, CPU, m)`,
// csrc/cuda registers the CUDA ones. The argument checks every backend shares are in csrc/checks.cpp.
#include "dilated_sparse/dilated_sparse.h"
#include "dilated_sparse/detail/schema.h"
#include "cpu/kernels.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <cmath>
#include <string>
#include <vector>

#ifdef TORCH_EXTENSION_NAME
#include <torch/extension.h>
#endif

TORCH_LIBRARY(dilated_sparse, m) {
  m.def(dilated_sparse::detail::kFwdSchema);
  m.def(dilated_sparse::detail::kBwdSchema);
  m.def(dilated_sparse::detail::kWeightsSchema);
}

// The forward's autograd formula is registered from Python (dilated_sparse/ops.py,
// torch.library.register_autograd). The weights are an inspection result and the backward is not
// differentiable again (no double backward): both fall through the Autograd key, so their outputs
// never require grad, instead of going through the deprecated "autograd not implemented" fallback.
TORCH_LIBRARY_IMPL(dilated_sparse, Autograd, m) {
  m.impl("block_sparse_attn_bwd", torch::CppFunction::makeFallthrough());
  m.impl("block_sparse_attn_weights", torch::CppFunction::makeFallthrough());
}

namespace dilated_sparse {

// ------------------------------------------------------------------------------- C++ API
namespace {
double resolve_scale(std::optional<double> scale, const at::Tensor& q) {
  return scale.has_value() ? *scale : 1.0 / std::sqrt(static_cast<double>(q.size(-1)));
}
}  // namespace

std::tuple<at::Tensor, at::Tensor> block_sparse_attn_fwd(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& crow_indices,
    const at::Tensor& col_indices, int64_t block_q, int64_t block_k, int64_t layout_batch,
    int64_t layout_heads, std::optional<double> scale, bool causal, int64_t window_left,
    int64_t window_right, const std::optional<at::Tensor>& key_lengths,
    const std::optional<at::Tensor>& key_padding_mask) {
  static auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("dilated_sparse::block_sparse_attn_fwd", "")
          .typed<std::tuple<at::Tensor, at::Tensor>(
              const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
              const at::Tensor&, int64_t, int64_t, int64_t, int64_t, double, bool, int64_t,
              int64_t, const std::optional<at::Tensor>&, const std::optional<at::Tensor>&)>();
  return op.call(q, k, v, crow_indices, col_indices, block_q, block_k, layout_batch, layout_heads,
                 resolve_scale(scale, q), causal, window_left, window_right, key_lengths,
                 key_padding_mask);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> block_sparse_attn_bwd(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const at::Tensor& ccol_indices,
    const at::Tensor& row_indices, const at::Tensor& crow_indices, const at::Tensor& col_indices,
    int64_t block_q, int64_t block_k, int64_t layout_batch, int64_t layout_heads,
    std::optional<double> scale, bool causal, int64_t window_left, int64_t window_right,
    const std::optional<at::Tensor>& key_lengths,
    const std::optional<at::Tensor>& key_padding_mask, const std::optional<at::Tensor>& dlse) {
  static auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("dilated_sparse::block_sparse_attn_bwd", "")
          .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
              const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
              const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
              const at::Tensor&, const at::Tensor&, int64_t, int64_t, int64_t, int64_t, double,
              bool, int64_t, int64_t, const std::optional<at::Tensor>&,
              const std::optional<at::Tensor>&, const std::optional<at::Tensor>&)>();
  return op.call(dout, q, k, v, out, lse, ccol_indices, row_indices, crow_indices, col_indices,
                 block_q, block_k, layout_batch, layout_heads, resolve_scale(scale, q), causal,
                 window_left, window_right, key_lengths, key_padding_mask, dlse);
}

at::Tensor block_sparse_attn_weights(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& lse, const at::Tensor& crow_indices,
    const at::Tensor& col_indices, int64_t block_q, int64_t block_k, int64_t layout_batch,
    int64_t layout_heads, int64_t max_slice_nnz, std::optional<double> scale, bool causal,
    int64_t window_left, int64_t window_right, const std::optional<at::Tensor>& key_lengths,
    const std::optional<at::Tensor>& key_padding_mask) {
  static auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("dilated_sparse::block_sparse_attn_weights", "")
          .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                            const at::Tensor&, const at::Tensor&, int64_t, int64_t, int64_t,
                            int64_t, int64_t, double, bool, int64_t, int64_t,
                            const std::optional<at::Tensor>&, const std::optional<at::Tensor>&)>();
  return op.call(q, k, lse, crow_indices, col_indices, block_q, block_k, layout_batch,
                 layout_heads, max_slice_nnz, resolve_scale(scale, q), causal, window_left,
                 window_right, key_lengths, key_padding_mask);
}

bool compiled_with_cuda() {
#ifdef DILATED_SPARSE_WITH_CUDA
  return true;
#else
  return false;
#endif
}

// Head dims the CUDA kernels were instantiated for. csrc/cuda may define this (strong symbol);
// without it (CPU build, or not provided) the list is empty.
#if defined(__GNUC__) || defined(__clang__)
__attribute__((weak))
#endif
std::vector<int64_t>
cuda_head_dims();

}  // namespace dilated_sparse

// ------------------------------------------------------------------ Python module (_C)
#ifdef TORCH_EXTENSION_NAME
namespace {
#define DS_STRINGIFY_(...) #__VA_ARGS__
#define DS_STRINGIFY(...) DS_STRINGIFY_(__VA_ARGS__)

// DILATED_SPARSE_CUDA_ARCHS is a bare comma-separated list (8.0,9.0), see _sources.py.
std::string cuda_archs() {
#ifdef DILATED_SPARSE_CUDA_ARCHS
  return DS_STRINGIFY(DILATED_SPARSE_CUDA_ARCHS);
#else
  return "";
#endif
}

std::vector<int64_t> cuda_head_dims_or_empty() {
  if (&dilated_sparse::cuda_head_dims != nullptr) {
    return dilated_sparse::cuda_head_dims();
  }
  return {};
}
}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "dilated_sparse compiled ops; importing this module registers torch.ops.dilated_sparse";
  m.def("compiled_with_cuda", &dilated_sparse::compiled_with_cuda,
        "Whether this build carries the CUDA kernels.");
  m.def("cuda_archs", &cuda_archs, "CUDA architectures of this build (TORCH_CUDA_ARCH_LIST).");
  m.def("cuda_head_dims", &cuda_head_dims_or_empty,
        "Head dims the CUDA kernels were instantiated for (empty without CUDA).");
  m.def("cpu_isa", &dilated_sparse::cpu::cpu_isa,
        "Instruction-set variant of the CPU kernels in use (avx512, avx2 or default).");
}
#endif
