// Fallback for device test runs only (never part of the package build: _sources.py picks .cu/.cpp):
// the op schemas of csrc/ops.cpp, so that the CUDA kernels can be built and tested as a standalone
// library (torch.ops.load_library) while the main build is broken. Keep in sync with csrc/ops.cpp.
#include <torch/library.h>

TORCH_LIBRARY(dilated_sparse, m) {
  m.def(
      "block_sparse_attn_fwd(Tensor q, Tensor k, Tensor v, Tensor crow_indices, "
      "Tensor col_indices, int block_q, int block_k, int layout_batch, int layout_heads, "
      "float scale, bool causal, int window_left, int window_right, Tensor? key_lengths, "
      "Tensor? key_padding_mask) -> (Tensor out, Tensor lse)");
  m.def(
      "block_sparse_attn_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
      "Tensor ccol_indices, Tensor row_indices, Tensor crow_indices, Tensor col_indices, "
      "int block_q, int block_k, int layout_batch, int layout_heads, float scale, bool causal, "
      "int window_left, int window_right, Tensor? key_lengths, Tensor? key_padding_mask) "
      "-> (Tensor dq, Tensor dk, Tensor dv)");
  m.def(
      "block_sparse_attn_weights(Tensor q, Tensor k, Tensor lse, Tensor crow_indices, "
      "Tensor col_indices, int block_q, int block_k, int layout_batch, int layout_heads, "
      "int max_slice_nnz, float scale, bool causal, int window_left, int window_right, "
      "Tensor? key_lengths, Tensor? key_padding_mask) -> Tensor");
}
