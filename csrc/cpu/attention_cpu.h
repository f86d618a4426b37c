// CPU implementations of the dilated_sparse ops (registered in register.cpp).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>
#include <tuple>

namespace dilated_sparse::cpu {

std::tuple<at::Tensor, at::Tensor> block_sparse_attn_fwd_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& crow_indices,
    const at::Tensor& col_indices, int64_t block_q, int64_t block_k, int64_t layout_batch,
    int64_t layout_heads, double scale, bool causal, int64_t window_left, int64_t window_right,
    const std::optional<at::Tensor>& key_lengths,
    const std::optional<at::Tensor>& key_padding_mask);

std::tuple<at::Tensor, at::Tensor, at::Tensor> block_sparse_attn_bwd_cpu(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const at::Tensor& ccol_indices,
    const at::Tensor& row_indices, const at::Tensor& crow_indices, const at::Tensor& col_indices,
    int64_t block_q, int64_t block_k, int64_t layout_batch, int64_t layout_heads, double scale,
    bool causal, int64_t window_left, int64_t window_right,
    const std::optional<at::Tensor>& key_lengths,
    const std::optional<at::Tensor>& key_padding_mask, const std::optional<at::Tensor>& dlse);

at::Tensor block_sparse_attn_weights_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& lse, const at::Tensor& crow_indices,
    const at::Tensor& col_indices, int64_t block_q, int64_t block_k, int64_t layout_batch,
    int64_t layout_heads, int64_t max_slice_nnz, double scale, bool causal, int64_t window_left,
    int64_t window_right, const std::optional<at::Tensor>& key_lengths,
    const std::optional<at::Tensor>& key_padding_mask);

}  // namespace dilated_sparse::cpu
