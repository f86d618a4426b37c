// Argument checks shared by every backend of the dilated_sparse ops (declared in
// dilated_sparse/detail/checks.h): dtypes, ranks, devices and sizes of every argument, and the
// index values of a layout on the host. The CPU ops check the values on each call; the CUDA ops
// through a cache of validated index tensors (csrc/cuda/attention.cu, check_index_values_cached).
#include "dilated_sparse/detail/checks.h"

#include <cstdint>
#include <utility>
#include <vector>

namespace dilated_sparse {
namespace detail {
namespace {

bool is_float_dtype(at::ScalarType t) {
  return t == at::kHalf || t == at::kBFloat16 || t == at::kFloat || t == at::kDouble;
}

void check_qkv(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  TORCH_CHECK(q.dim() == 4, "dilated_sparse: q must be [B, Sq, H, D], got ", q.sizes());
  TORCH_CHECK(k.dim() == 4, "dilated_sparse: k must be [B, Sk, Hkv, D], got ", k.sizes());
  TORCH_CHECK(v.dim() == 4, "dilated_sparse: v must be [B, Sk, Hkv, D], got ", v.sizes());
  TORCH_CHECK(is_float_dtype(q.scalar_type()),
              "dilated_sparse: q must be float16, bfloat16, float32 or float64, got ",
              q.scalar_type());
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(),
              "dilated_sparse: q, k, v must share a dtype, got ", q.scalar_type(), ", ",
              k.scalar_type(), ", ", v.scalar_type());
  TORCH_CHECK(k.device() == q.device() && v.device() == q.device(),
              "dilated_sparse: q, k, v must be on one device");
  TORCH_CHECK(k.sizes() == v.sizes(), "dilated_sparse: k and v shapes differ: ", k.sizes(),
              " vs ", v.sizes());
  TORCH_CHECK(k.size(0) == q.size(0), "dilated_sparse: batch of k (", k.size(0),
              ") differs from q (", q.size(0), ")");
  TORCH_CHECK(k.size(3) == q.size(3), "dilated_sparse: head dim of k (", k.size(3),
              ") differs from q (", q.size(3), ")");
  TORCH_CHECK(q.size(3) > 0, "dilated_sparse: head dim must be positive");
  TORCH_CHECK(k.size(2) > 0 && q.size(2) % k.size(2) == 0, "dilated_sparse: query heads (",
              q.size(2), ") must be a multiple of kv heads (", k.size(2), ")");
  for (const at::Tensor* t : {&q, &k, &v}) {
    TORCH_CHECK(t->size(3) == 1 || t->stride(3) == 1,
                "dilated_sparse: the last dim of q, k, v must be contiguous (stride 1)");
  }
}

AttnDims make_dims(const at::Tensor& q, const at::Tensor& k, int64_t block_q, int64_t block_k,
                   int64_t layout_batch, int64_t layout_heads) {
  TORCH_CHECK(block_q > 0 && block_k > 0, "dilated_sparse: block sizes must be positive, got (",
              block_q, ", ", block_k, ")");
  AttnDims d;
  d.batch = q.size(0);
  d.seq_q = q.size(1);
  d.heads = q.size(2);
  d.head_dim = q.size(3);
  d.seq_k = k.size(1);
  d.kv_heads = k.size(2);
  d.block_q = block_q;
  d.block_k = block_k;
  d.num_q_blocks = (d.seq_q + block_q - 1) / block_q;
  d.num_k_blocks = (d.seq_k + block_k - 1) / block_k;
  TORCH_CHECK(layout_batch == 1 || layout_batch == d.batch,
              "dilated_sparse: layout_batch must be 1 or B=", d.batch, ", got ", layout_batch);
  TORCH_CHECK(layout_heads == 1 || layout_heads == d.heads,
              "dilated_sparse: layout_heads must be 1 or H=", d.heads, ", got ", layout_heads);
  d.layout_batch = layout_batch;
  d.layout_heads = layout_heads;
  return d;
}

void check_index(const at::Tensor& t, const char* name, const at::Tensor& q) {
  TORCH_CHECK(t.scalar_type() == at::kInt, "dilated_sparse: ", name, " must be int32, got ",
              t.scalar_type());
  TORCH_CHECK(t.dim() == 1, "dilated_sparse: ", name, " must be 1-D, got ", t.sizes());
  TORCH_CHECK(t.device() == q.device(), "dilated_sparse: ", name, " must be on ", q.device(),
              ", got ", t.device());
}

// The values of a compressed index pair (host tensors; the kernels read K/V rows and write outputs
// at the ids they hold): offsets from 0 to nnz, non-decreasing; ids in [0, n_ids), strictly
// increasing within each of the `lines` rows (CSR) or columns (CSC). O(nnz), no copy.
void check_compressed_values(const at::Tensor& offsets, const at::Tensor& ids, int64_t n_ids,
                             const char* offsets_name, const char* ids_name) {
  const at::Tensor off_c = offsets.contiguous(), ids_c = ids.contiguous();
  const int32_t* off = off_c.data_ptr<int32_t>();
  const int32_t* id = ids_c.data_ptr<int32_t>();
  const int64_t lines = off_c.numel() - 1, nnz = ids_c.numel();
  TORCH_CHECK(off[0] == 0, "dilated_sparse: ", offsets_name, " must start at 0, got ", off[0]);
  TORCH_CHECK(off[lines] == nnz, "dilated_sparse: ", offsets_name, " must end at nnz = ", nnz, " (",
              ids_name, "), got ", off[lines]);
  for (int64_t r = 0; r < lines; ++r) {
    TORCH_CHECK(off[r] <= off[r + 1], "dilated_sparse: ", offsets_name, " must be non-decreasing (",
                off[r], " > ", off[r + 1], " at entry ", r, ")");
  }
  for (int64_t r = 0; r < lines; ++r) {
    for (int64_t e = off[r]; e < off[r + 1]; ++e) {
      TORCH_CHECK(id[e] >= 0 && id[e] < n_ids, "dilated_sparse: ", ids_name, "[", e, "] = ", id[e],
                  " is out of range [0, ", n_ids, ")");
      TORCH_CHECK(e == off[r] || id[e - 1] < id[e], "dilated_sparse: ", ids_name,
                  " must be strictly increasing within each line (", id[e - 1], " then ", id[e],
                  " at entries ", e - 1, ", ", e, ")");
    }
  }
}

void check_csr(const AttnDims& d, const at::Tensor& crow, const at::Tensor& col,
               const at::Tensor& q) {
  check_index(crow, "crow_indices", q);
  check_index(col, "col_indices", q);
  TORCH_CHECK(crow.numel() == d.num_slices() * d.num_q_blocks + 1,
              "dilated_sparse: crow_indices must have L*nqb+1 = ",
              d.num_slices() * d.num_q_blocks + 1, " entries, got ", crow.numel());
}

void check_csc(const AttnDims& d, const at::Tensor& ccol, const at::Tensor& row,
               const at::Tensor& col, const at::Tensor& q) {
  check_index(ccol, "ccol_indices", q);
  check_index(row, "row_indices", q);
  TORCH_CHECK(ccol.numel() == d.num_slices() * d.num_k_blocks + 1,
              "dilated_sparse: ccol_indices must have L*nkb+1 = ",
              d.num_slices() * d.num_k_blocks + 1, " entries, got ", ccol.numel());
  TORCH_CHECK(row.numel() == col.numel(), "dilated_sparse: row_indices (", row.numel(),
              ") and col_indices (", col.numel(), ") must have the same nnz");
}

// The CSC pair is the CSR pair's transpose (host tensors; dK/dV walk the CSC, dQ the CSR: another
// CSC would give gradients of other blocks without an error). Both pairs' values are checked first
// (check_compressed_values). Walking the CSR rows in order visits each column's entries in
// increasing row order, as the CSC lists them.
void check_csc_is_transpose(const AttnDims& d, const at::Tensor& crow, const at::Tensor& col,
                            const at::Tensor& ccol, const at::Tensor& row) {
  const at::Tensor crow_c = crow.contiguous(), col_c = col.contiguous();
  const at::Tensor ccol_c = ccol.contiguous(), row_c = row.contiguous();
  const int32_t *rp = crow_c.data_ptr<int32_t>(), *ci = col_c.data_ptr<int32_t>();
  const int32_t *cp = ccol_c.data_ptr<int32_t>(), *ri = row_c.data_ptr<int32_t>();
  std::vector<int64_t> cursor(cp, cp + ccol_c.numel() - 1);
  for (int64_t s = 0; s < d.num_slices(); ++s) {
    for (int64_t r = 0; r < d.num_q_blocks; ++r) {
      const int64_t line = s * d.num_q_blocks + r;
      for (int64_t e = rp[line]; e < rp[line + 1]; ++e) {
        const int64_t c = s * d.num_k_blocks + ci[e];
        const int64_t at = cursor[c]++;
        TORCH_CHECK(at < cp[c + 1] && ri[at] == r, "dilated_sparse: ccol_indices / row_indices are not the ",
                    "transpose of crow_indices / col_indices (slice ", s, ", block (", r, ", ", ci[e], "))");
      }
    }
  }
}

void check_masks(const AttnDims& d, int64_t window_left, int64_t window_right,
                 const std::optional<at::Tensor>& key_lengths,
                 const std::optional<at::Tensor>& key_padding_mask, const at::Tensor& q) {
  TORCH_CHECK(window_left >= -1 && window_right >= -1,
              "dilated_sparse: window_left/window_right must be >= 0 or -1 (unbounded), got (",
              window_left, ", ", window_right, ")");
  if (key_lengths.has_value()) {
    const at::Tensor& kl = *key_lengths;
    TORCH_CHECK(kl.scalar_type() == at::kInt, "dilated_sparse: key_lengths must be int32, got ",
                kl.scalar_type());
    TORCH_CHECK(kl.dim() == 1 && kl.size(0) == d.batch,
                "dilated_sparse: key_lengths must be [B=", d.batch, "], got ", kl.sizes());
    TORCH_CHECK(kl.device() == q.device(), "dilated_sparse: key_lengths must be on ",
                q.device());
  }
  if (key_padding_mask.has_value()) {
    const at::Tensor& m = *key_padding_mask;
    TORCH_CHECK(m.scalar_type() == at::kBool,
                "dilated_sparse: key_padding_mask must be bool, got ", m.scalar_type());
    TORCH_CHECK(m.dim() == 2 && m.size(0) == d.batch && m.size(1) == d.seq_k,
                "dilated_sparse: key_padding_mask must be [B=", d.batch, ", Sk=", d.seq_k,
                "], got ", m.sizes());
    TORCH_CHECK(m.device() == q.device(), "dilated_sparse: key_padding_mask must be on ",
                q.device());
  }
}

void check_lse(const AttnDims& d, const at::Tensor& lse, const at::Tensor& q) {
  const auto want = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(lse.scalar_type() == want, "dilated_sparse: lse must be ", want, ", got ",
              lse.scalar_type());
  TORCH_CHECK(lse.dim() == 3 && lse.size(0) == d.batch && lse.size(1) == d.heads &&
                  lse.size(2) == d.seq_q,
              "dilated_sparse: lse must be [B, H, Sq] = [", d.batch, ", ", d.heads, ", ",
              d.seq_q, "], got ", lse.sizes());
  TORCH_CHECK(lse.device() == q.device(), "dilated_sparse: lse must be on ", q.device());
}

}  // namespace

// The index values (host tensors): see checks.h.
void check_index_values(const AttnDims& d, const at::Tensor& crow_indices, const at::Tensor& col_indices,
                        const at::Tensor* ccol_indices, const at::Tensor* row_indices, int64_t max_slice_nnz) {
  check_compressed_values(crow_indices, col_indices, d.num_k_blocks, "crow_indices", "col_indices");
  if (ccol_indices != nullptr) {
    check_compressed_values(*ccol_indices, *row_indices, d.num_q_blocks, "ccol_indices", "row_indices");
    check_csc_is_transpose(d, crow_indices, col_indices, *ccol_indices, *row_indices);
  }
  if (max_slice_nnz >= 0) {  // the weights are written at [.., entry - slice start, ..]
    const at::Tensor crow = crow_indices.contiguous();
    const int32_t* off = crow.data_ptr<int32_t>();
    for (int64_t s = 0; s < d.num_slices(); ++s) {
      const int64_t n = off[(s + 1) * d.num_q_blocks] - off[s * d.num_q_blocks];
      TORCH_CHECK(n <= max_slice_nnz, "dilated_sparse: max_slice_nnz (", max_slice_nnz,
                  ") is smaller than slice ", s, "'s ", n, " active blocks");
    }
  }
}

AttnDims check_fwd_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                        const at::Tensor& crow_indices, const at::Tensor& col_indices,
                        int64_t block_q, int64_t block_k, int64_t layout_batch,
                        int64_t layout_heads, int64_t window_left, int64_t window_right,
                        const std::optional<at::Tensor>& key_lengths,
                        const std::optional<at::Tensor>& key_padding_mask) {
  check_qkv(q, k, v);
  AttnDims d = make_dims(q, k, block_q, block_k, layout_batch, layout_heads);
  check_csr(d, crow_indices, col_indices, q);
  check_masks(d, window_left, window_right, key_lengths, key_padding_mask, q);
  if (crow_indices.device().is_cpu()) check_index_values(d, crow_indices, col_indices);
  return d;
}

AttnDims check_bwd_args(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
                        const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                        const at::Tensor& ccol_indices, const at::Tensor& row_indices,
                        const at::Tensor& crow_indices, const at::Tensor& col_indices,
                        int64_t block_q, int64_t block_k, int64_t layout_batch,
                        int64_t layout_heads, int64_t window_left, int64_t window_right,
                        const std::optional<at::Tensor>& key_lengths,
                        const std::optional<at::Tensor>& key_padding_mask,
                        const std::optional<at::Tensor>& dlse) {
  check_qkv(q, k, v);
  AttnDims d = make_dims(q, k, block_q, block_k, layout_batch, layout_heads);
  for (const auto& [t, name] : {std::pair<const at::Tensor*, const char*>{&dout, "dout"},
                                std::pair<const at::Tensor*, const char*>{&out, "out"}}) {
    TORCH_CHECK(t->sizes() == q.sizes(), "dilated_sparse: ", name, " must have q's shape ",
                q.sizes(), ", got ", t->sizes());
    TORCH_CHECK(t->scalar_type() == q.scalar_type(), "dilated_sparse: ", name,
                " must have q's dtype ", q.scalar_type(), ", got ", t->scalar_type());
    TORCH_CHECK(t->device() == q.device(), "dilated_sparse: ", name, " must be on ",
                q.device());
  }
  check_lse(d, lse, q);
  if (dlse.has_value()) check_dlse(*dlse, lse);
  check_csr(d, crow_indices, col_indices, q);
  check_csc(d, ccol_indices, row_indices, col_indices, q);
  check_masks(d, window_left, window_right, key_lengths, key_padding_mask, q);
  if (crow_indices.device().is_cpu()) {
    check_index_values(d, crow_indices, col_indices, &ccol_indices, &row_indices);
  }
  return d;
}

AttnDims check_weights_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& lse,
                            const at::Tensor& crow_indices, const at::Tensor& col_indices,
                            int64_t block_q, int64_t block_k, int64_t layout_batch,
                            int64_t layout_heads, int64_t max_slice_nnz, int64_t window_left,
                            int64_t window_right, const std::optional<at::Tensor>& key_lengths,
                            const std::optional<at::Tensor>& key_padding_mask) {
  check_qkv(q, k, k);
  AttnDims d = make_dims(q, k, block_q, block_k, layout_batch, layout_heads);
  check_lse(d, lse, q);
  check_csr(d, crow_indices, col_indices, q);
  TORCH_CHECK(max_slice_nnz >= 0, "dilated_sparse: max_slice_nnz must be >= 0, got ",
              max_slice_nnz);
  if (crow_indices.device().is_cpu()) check_index_values(d, crow_indices, col_indices, nullptr, nullptr, max_slice_nnz);
  check_masks(d, window_left, window_right, key_lengths, key_padding_mask, q);
  return d;
}

}  // namespace detail

}  // namespace dilated_sparse
