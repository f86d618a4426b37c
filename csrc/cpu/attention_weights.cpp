// CPU block_sparse_attn_weights: the softmax probabilities of every active block, recomputed from
// lse, written to [B, H, max_slice_nnz, block_q, block_k]. One task per (batch, head, query block).
#include "attention_cpu.h"
#include "attention_common.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/zeros.h>

#include <vector>

namespace dilated_sparse::cpu {
namespace {

template <typename scalar_t>
void weights_kernel(const AttnDims& d, const at::Tensor& q, const at::Tensor& k,
                    const at::Tensor& lse_t, const at::Tensor& crow, const at::Tensor& col,
                    int64_t max_nnz, double scale_d, const MaskRules& rules, at::Tensor& w) {
  using T = acc_type<scalar_t>;
  const Kernels<T>& K = kernels<T>();
  const View4<scalar_t> qv(q), kv(k);
  const int32_t* crow_p = crow.const_data_ptr<int32_t>();
  const int32_t* col_p = col.const_data_ptr<int32_t>();
  const T* lse_p = lse_t.const_data_ptr<T>();
  scalar_t* w_p = w.data_ptr<scalar_t>();
  const T scale = static_cast<T>(scale_d);
  const int64_t D = d.head_dim, bq = d.block_q, bk = d.block_k, bkp = round_up(bk, kColPad);
  const int64_t H = d.heads, nqb = d.num_q_blocks;

  at::parallel_for(0, d.batch * H * nqb, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> qp(bq * D), kt(D * bkp), s(bq * bkp), bias(bkp);
    std::vector<int32_t> lo(bq), hi(bq);
    for (int64_t task = begin; task < end; ++task) {
      const QueryBlockTask t = query_block_task(d, task);
      const int64_t qb = t.qb, h = t.h, b = t.b, hk = t.kv_head, q0 = t.q0, M = t.rows, slice = t.slice,
                    row = t.row;
      const int64_t first = crow_p[slice * nqb];
      const T* lse_row = lse_p + (b * H + h) * d.seq_q + q0;
      bool packed = false;
      for (int32_t p = crow_p[row]; p < crow_p[row + 1]; ++p) {
        const int64_t e = p - first;
        const Tile t = tile_bounds(rules, b, q0, q0 + M, col_p[p], bk);
        if (t.empty || e >= max_nnz) {
          continue;  // stays zero
        }
        if (!packed) {
          pack_rows(qv.at(b, q0, h), qv.ss, M, D, qp.data(), D);
          packed = true;
        }
        const int64_t N = t.k1 - t.k0, Np = round_up(N, kColPad);
        pack_transposed(kv.at(b, t.k0, hk), kv.ss, N, D, kt.data(), Np);
        K.gemm(M, Np, D, qp.data(), D, kt.data(), Np, s.data(), bkp, false);
        row_ranges(rules, t, q0, M, lo.data(), hi.data());
        column_bias(rules, b, t, Np, bias.data());
        K.probs(s.data(), bkp, M, Np, lo.data(), hi.data(), bias.data(), scale, lse_row);
        scalar_t* dst = w_p + ((b * H + h) * max_nnz + e) * bq * bk;
        for (int64_t r = 0; r < M; ++r) {
          for (int64_t c = 0; c < N; ++c) {
            dst[r * bk + c] = static_cast<scalar_t>(s[r * bkp + c]);
          }
        }
      }
    }
  });
}

}  // namespace

at::Tensor block_sparse_attn_weights_cpu(
    const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& lse_in,
    const at::Tensor& crow_indices, const at::Tensor& col_indices, int64_t block_q,
    int64_t block_k, int64_t layout_batch, int64_t layout_heads, int64_t max_slice_nnz,
    double scale, bool causal, int64_t window_left, int64_t window_right,
    const std::optional<at::Tensor>& key_lengths,
    const std::optional<at::Tensor>& key_padding_mask) {
  const AttnDims d = detail::check_weights_args(
      q_in, k_in, lse_in, crow_indices, col_indices, block_q, block_k, layout_batch,
      layout_heads, max_slice_nnz, window_left, window_right, key_lengths, key_padding_mask);
  const at::Tensor q = last_dim_contiguous(q_in), k = last_dim_contiguous(k_in),
                   lse = lse_in.contiguous();
  const at::Tensor crow = crow_indices.contiguous(), col = col_indices.contiguous();
  const at::Tensor kpm = contiguous_kpm(key_padding_mask);
  const MaskRules rules(d, causal, window_left, window_right, key_lengths, kpm);
  at::Tensor w =
      at::zeros({d.batch, d.heads, max_slice_nnz, d.block_q, d.block_k}, q.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(),
                                  "block_sparse_attn_weights_cpu", [&] {
                                    weights_kernel<scalar_t>(d, q, k, lse, crow, col,
                                                             max_slice_nnz, scale, rules, w);
                                  });
  return w;
}

}  // namespace dilated_sparse::cpu
