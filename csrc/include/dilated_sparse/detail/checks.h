// Argument checks shared by every backend of the dilated_sparse ops.
//
// The Python layer validates layouts and arguments with ValueError/TypeError before any kernel
// runs; these checks are the C++ safety net (dtypes, ranks, devices, sizes, index values) that also
// guards direct torch.ops and LibTorch callers. Each backend calls the matching check_*_args once at
// its boundary and then trusts the returned dimensions. They check the index values of host
// tensors themselves; a device backend copies its index tensors to the host and calls
// check_index_values (the CUDA ops once per index tensor version, csrc/cuda/attention.cu).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>

namespace dilated_sparse::detail {

// Sizes of one attention call, filled by the checks below.
struct AttnDims {
  int64_t batch = 0;         // B
  int64_t seq_q = 0;         // Sq
  int64_t seq_k = 0;         // Sk
  int64_t heads = 0;         // H (query heads)
  int64_t kv_heads = 0;      // Hkv
  int64_t head_dim = 0;      // D
  int64_t block_q = 0;
  int64_t block_k = 0;
  int64_t num_q_blocks = 0;  // nqb = ceil(Sq / block_q)
  int64_t num_k_blocks = 0;  // nkb = ceil(Sk / block_k)
  int64_t layout_batch = 1;  // 1 or B
  int64_t layout_heads = 1;  // 1 or H

  // Layout slice used by (batch b, query head h).
  int64_t slice(int64_t b, int64_t h) const {
    return (layout_batch == 1 ? 0 : b) * layout_heads + (layout_heads == 1 ? 0 : h);
  }
  int64_t num_slices() const { return layout_batch * layout_heads; }
  int64_t group_size() const { return heads / kv_heads; }
};

AttnDims check_fwd_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                        const at::Tensor& crow_indices, const at::Tensor& col_indices,
                        int64_t block_q, int64_t block_k, int64_t layout_batch,
                        int64_t layout_heads, int64_t window_left, int64_t window_right,
                        const std::optional<at::Tensor>& key_lengths,
                        const std::optional<at::Tensor>& key_padding_mask);

AttnDims check_bwd_args(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
                        const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                        const at::Tensor& ccol_indices, const at::Tensor& row_indices,
                        const at::Tensor& crow_indices, const at::Tensor& col_indices,
                        int64_t block_q, int64_t block_k, int64_t layout_batch,
                        int64_t layout_heads, int64_t window_left, int64_t window_right,
                        const std::optional<at::Tensor>& key_lengths,
                        const std::optional<at::Tensor>& key_padding_mask,
                        const std::optional<at::Tensor>& dlse);

AttnDims check_weights_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& lse,
                            const at::Tensor& crow_indices, const at::Tensor& col_indices,
                            int64_t block_q, int64_t block_k, int64_t layout_batch,
                            int64_t layout_heads, int64_t max_slice_nnz, int64_t window_left,
                            int64_t window_right, const std::optional<at::Tensor>& key_lengths,
                            const std::optional<at::Tensor>& key_padding_mask);

// The values of a layout's index tensors, on the host (CPU tensors; the shapes already checked by
// check_*_args): crow_indices from 0 to nnz, non-decreasing, col_indices in [0, nkb) and strictly
// increasing per row; with ccol_indices / row_indices (the backward) the same per column and the
// CSC the CSR's transpose; with max_slice_nnz >= 0 (the weights) no slice holding more blocks.
// Throws naming the tensor and the first bad entry.
void check_index_values(const AttnDims& d, const at::Tensor& crow_indices, const at::Tensor& col_indices,
                        const at::Tensor* ccol_indices = nullptr, const at::Tensor* row_indices = nullptr,
                        int64_t max_slice_nnz = -1);

// The backward's optional gradient of lse: lse's shape, dtype and device (check_bwd_args calls it).
inline void check_dlse(const at::Tensor& dlse, const at::Tensor& lse) {
  TORCH_CHECK(dlse.sizes() == lse.sizes(), "dilated_sparse: dlse must have lse's shape ", lse.sizes(),
              ", got ", dlse.sizes());
  TORCH_CHECK(dlse.scalar_type() == lse.scalar_type(), "dilated_sparse: dlse must have lse's dtype ",
              lse.scalar_type(), ", got ", dlse.scalar_type());
  TORCH_CHECK(dlse.device() == lse.device(), "dilated_sparse: dlse must be on ", lse.device());
}

}  // namespace dilated_sparse::detail
