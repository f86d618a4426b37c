// The op schemas of the dilated_sparse library, in one place: csrc/ops.cpp defines the ops with
// them, and csrc/cuda/tools/schema_only.cc (a device-test fallback) defines the same ops.
#pragma once

namespace dilated_sparse::detail {

inline constexpr const char* kFwdSchema =
    "block_sparse_attn_fwd(Tensor q, Tensor k, Tensor v, Tensor crow_indices, "
    "Tensor col_indices, int block_q, int block_k, int layout_batch, int layout_heads, "
    "float scale, bool causal, int window_left, int window_right, Tensor? key_lengths, "
    "Tensor? key_padding_mask) -> (Tensor out, Tensor lse)";

inline constexpr const char* kBwdSchema =
    "block_sparse_attn_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
    "Tensor ccol_indices, Tensor row_indices, Tensor crow_indices, Tensor col_indices, "
    "int block_q, int block_k, int layout_batch, int layout_heads, float scale, bool causal, "
    "int window_left, int window_right, Tensor? key_lengths, Tensor? key_padding_mask, "
    "Tensor? dlse=None) -> (Tensor dq, Tensor dk, Tensor dv)";

inline constexpr const char* kWeightsSchema =
    "block_sparse_attn_weights(Tensor q, Tensor k, Tensor lse, Tensor crow_indices, "
    "Tensor col_indices, int block_q, int block_k, int layout_batch, int layout_heads, "
    "int max_slice_nnz, float scale, bool causal, int window_left, int window_right, "
    "Tensor? key_lengths, Tensor? key_padding_mask) -> Tensor";

}  // namespace dilated_sparse::detail
