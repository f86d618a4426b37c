// CPU forward of block_sparse_attn_fwd: one task per (batch, head, query block), online softmax
// over the active key blocks of the block's CSR row, tiles multiplied by the kernels of kernels.h.
#include "attention_cpu.h"
#include "attention_common.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

#include <cmath>
#include <limits>
#include <vector>

namespace dilated_sparse::cpu {
namespace {

template <typename scalar_t>
void fwd_kernel(const AttnDims& d, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                const at::Tensor& crow, const at::Tensor& col, double scale_d,
                const MaskRules& rules, at::Tensor& out, at::Tensor& lse) {
  using T = acc_type<scalar_t>;
  constexpr bool kDirect = std::is_same_v<scalar_t, T>;  // q can be read in place
  const Kernels<T>& K = kernels<T>();
  const View4<scalar_t> qv(q), kv(k), vv(v);
  const int32_t* crow_p = crow.const_data_ptr<int32_t>();
  const int32_t* col_p = col.const_data_ptr<int32_t>();
  scalar_t* out_p = out.data_ptr<scalar_t>();
  T* lse_p = lse.data_ptr<T>();
  const T scale = static_cast<T>(scale_d);
  const int64_t D = d.head_dim, Dp = round_up(D, kColPad);
  const int64_t bq = d.block_q, bk = d.block_k, bkp = round_up(bk, kColPad);
  const int64_t H = d.heads, nqb = d.num_q_blocks;

  at::parallel_for(0, d.batch * H * nqb, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> q_buf(kDirect ? 0 : bq * D), kt_buf(D * bkp), v_buf(bk * Dp), s_buf(bq * bkp),
        o_buf(bq * Dp), bias(bkp), row_max(bq), row_sum(bq), alpha(bq);
    std::vector<int32_t> lo(bq), hi(bq);
    for (int64_t task = begin; task < end; ++task) {
      const QueryBlockTask t = query_block_task(d, task);
      const int64_t qb = t.qb, h = t.h, b = t.b, hk = t.kv_head, q0 = t.q0, M = t.rows, row = t.row;

      const T* qa;
      int64_t lda;
      if constexpr (kDirect) {
        qa = qv.at(b, q0, h);
        lda = qv.ss;
      } else {
        pack_rows(qv.at(b, q0, h), qv.ss, M, D, q_buf.data(), D);
        qa = q_buf.data();
        lda = D;
      }
      std::fill(row_max.begin(), row_max.end(), -std::numeric_limits<T>::infinity());
      std::fill(row_sum.begin(), row_sum.end(), T(0));
      std::fill(o_buf.begin(), o_buf.end(), T(0));

      for (int32_t p = crow_p[row]; p < crow_p[row + 1]; ++p) {
        const Tile t = tile_bounds(rules, b, q0, q0 + M, col_p[p], bk);
        if (t.empty) {
          continue;
        }
        const int64_t N = t.k1 - t.k0, Np = round_up(N, kColPad);
        pack_transposed(kv.at(b, t.k0, hk), kv.ss, N, D, kt_buf.data(), Np);
        pack_rows(vv.at(b, t.k0, hk), vv.ss, N, D, v_buf.data(), Dp);
        K.gemm(M, Np, D, qa, lda, kt_buf.data(), Np, s_buf.data(), bkp, false);
        row_ranges(rules, t, q0, M, lo.data(), hi.data());
        column_bias(rules, b, t, Np, bias.data());
        K.softmax_step(s_buf.data(), bkp, M, Np, lo.data(), hi.data(), bias.data(), scale,
                       row_max.data(), row_sum.data(), alpha.data());
        K.scale_rows(o_buf.data(), Dp, M, Dp, alpha.data());
        K.gemm(M, Dp, N, s_buf.data(), bkp, v_buf.data(), Dp, o_buf.data(), Dp, true);
      }

      for (int64_t r = 0; r < M; ++r) {
        scalar_t* o = out_p + ((b * d.seq_q + q0 + r) * H + h) * D;
        T* l = lse_p + (b * H + h) * d.seq_q + q0 + r;
        if (row_sum[r] > T(0)) {
          const T inv = T(1) / row_sum[r];
          for (int64_t c = 0; c < D; ++c) {
            o[c] = static_cast<scalar_t>(o_buf[r * Dp + c] * inv);
          }
          *l = row_max[r] + std::log(row_sum[r]);
        } else {
          for (int64_t c = 0; c < D; ++c) {
            o[c] = scalar_t(0);
          }
          *l = -std::numeric_limits<T>::infinity();
        }
      }
    }
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> block_sparse_attn_fwd_cpu(
    const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const at::Tensor& crow_indices, const at::Tensor& col_indices, int64_t block_q,
    int64_t block_k, int64_t layout_batch, int64_t layout_heads, double scale, bool causal,
    int64_t window_left, int64_t window_right, const std::optional<at::Tensor>& key_lengths,
    const std::optional<at::Tensor>& key_padding_mask) {
  const AttnDims d = detail::check_fwd_args(q_in, k_in, v_in, crow_indices, col_indices, block_q,
                                            block_k, layout_batch, layout_heads, window_left,
                                            window_right, key_lengths, key_padding_mask);
  const at::Tensor q = last_dim_contiguous(q_in), k = last_dim_contiguous(k_in),
                   v = last_dim_contiguous(v_in);
  const at::Tensor crow = crow_indices.contiguous(), col = col_indices.contiguous();
  const at::Tensor kpm = contiguous_kpm(key_padding_mask);
  const MaskRules rules(d, causal, window_left, window_right, key_lengths, kpm);
  const auto lse_dtype = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor out = at::empty({d.batch, d.seq_q, d.heads, d.head_dim}, q.options());
  at::Tensor lse = at::empty({d.batch, d.heads, d.seq_q}, q.options().dtype(lse_dtype));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(),
                                  "block_sparse_attn_fwd_cpu", [&] {
                                    fwd_kernel<scalar_t>(d, q, k, v, crow, col, scale, rules, out,
                                                         lse);
                                  });
  return {out, lse};
}

}  // namespace dilated_sparse::cpu
