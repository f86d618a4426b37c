// dilated_sparse: block-sparse attention over CSR block lists, C++ API for LibTorch users.
//
// Each function calls the op registered as `dilated_sparse::<name>` through the PyTorch dispatcher,
// so it runs the CPU or CUDA kernel matching the inputs' device. Link the `dilated_sparse` library
// (CMake: `find_package(dilated_sparse)` then `target_link_libraries(app dilated_sparse::dilated_sparse)`);
// linking it registers the ops.
//
// Tensors: q [B, Sq, H, D]; k, v [B, Sk, Hkv, D] with H % Hkv == 0 and the last dim contiguous.
// Layout: CSR over the stacked rows r = s * nqb + q_block of L = layout_batch * layout_heads slices
// (crow_indices int32 [L * nqb + 1], col_indices int32 [nnz] local key-block ids, sorted per row);
// the backward also takes the transpose (CSC: ccol_indices int32 [L * nkb + 1], row_indices int32
// [nnz]). scale defaults to 1/sqrt(D). window_left / window_right: -1 means unbounded. key_lengths: int32 [B];
// key_padding_mask: bool [B, Sk], true = padding. See DESIGN.md for the full semantics.
// Index values: each op checks them before any kernel runs (offsets from 0 to nnz, ids in range and
// strictly increasing per row / column, the CSC the CSR's transpose, the weights' max_slice_nnz) and
// throws naming the tensor. On CUDA the check copies the index tensors to the host once per tensor
// version (later calls with the same, unedited tensors reuse it); a call captured into a CUDA graph
// checks them with device kernels on every replay, whose device-side assert fails a bad replay.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>
#include <tuple>

namespace dilated_sparse {

// Forward. Returns (out [B, Sq, H, D] in q's dtype, lse [B, H, Sq] float32, float64 for float64 q).
std::tuple<at::Tensor, at::Tensor> block_sparse_attn_fwd(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& crow_indices,
    const at::Tensor& col_indices, int64_t block_q, int64_t block_k, int64_t layout_batch = 1,
    int64_t layout_heads = 1, std::optional<double> scale = std::nullopt, bool causal = false, int64_t window_left = -1,
    int64_t window_right = -1, const std::optional<at::Tensor>& key_lengths = std::nullopt,
    const std::optional<at::Tensor>& key_padding_mask = std::nullopt);

// Backward. Returns (dq, dk, dv), contiguous, with the shapes and dtypes of q, k, v. dlse: the
// gradient of the loss with respect to lse (lse's shape and dtype), when lse fed the loss too.
std::tuple<at::Tensor, at::Tensor, at::Tensor> block_sparse_attn_bwd(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const at::Tensor& ccol_indices,
    const at::Tensor& row_indices, const at::Tensor& crow_indices, const at::Tensor& col_indices,
    int64_t block_q, int64_t block_k, int64_t layout_batch = 1, int64_t layout_heads = 1,
    std::optional<double> scale = std::nullopt, bool causal = false, int64_t window_left = -1, int64_t window_right = -1,
    const std::optional<at::Tensor>& key_lengths = std::nullopt,
    const std::optional<at::Tensor>& key_padding_mask = std::nullopt,
    const std::optional<at::Tensor>& dlse = std::nullopt);

// Attention probabilities of the active blocks: [B, H, max_slice_nnz, block_q, block_k].
at::Tensor block_sparse_attn_weights(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& lse, const at::Tensor& crow_indices,
    const at::Tensor& col_indices, int64_t block_q, int64_t block_k, int64_t layout_batch,
    int64_t layout_heads, int64_t max_slice_nnz, std::optional<double> scale = std::nullopt, bool causal = false,
    int64_t window_left = -1, int64_t window_right = -1,
    const std::optional<at::Tensor>& key_lengths = std::nullopt,
    const std::optional<at::Tensor>& key_padding_mask = std::nullopt);

// Whether this build carries the CUDA kernels.
bool compiled_with_cuda();

}  // namespace dilated_sparse
