// CPU backward of block_sparse_attn_bwd, without atomics or locks:
//   1. Delta[b, h, i] = sum_d dout * out (- dlse[b, h, i])    (one task per (batch, query row))
//   2. dK, dV for one (batch, kv head, key block): walk the CSC column of the block for every
//      query head of the GQA group, summing into the tile's own accumulators.
//   3. dQ for one (batch, head, query block): walk the CSR row.
// P is recomputed from lse: P = exp(scale * q.k - lse).
#include "attention_cpu.h"
#include "attention_common.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

#include <vector>

namespace dilated_sparse::cpu {
namespace {

template <typename scalar_t>
struct BwdArgs {
  using T = acc_type<scalar_t>;
  const AttnDims& d;
  View4<scalar_t> q, k, v, dout;
  const T* lse;    // [B, H, Sq]
  const T* delta;  // [B, H, Sq]
  const MaskRules& rules;
  T scale;
};

template <typename scalar_t>
void compute_delta(const AttnDims& d, const View4<scalar_t>& dout, const View4<scalar_t>& out,
                   acc_type<scalar_t>* delta) {
  using T = acc_type<scalar_t>;
  const int64_t H = d.heads, S = d.seq_q, D = d.head_dim;
  at::parallel_for(0, d.batch * S, 64, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / S, i = row % S;
      for (int64_t h = 0; h < H; ++h) {
        const scalar_t* g = dout.at(b, i, h);
        const scalar_t* o = out.at(b, i, h);
        T acc = T(0);
        for (int64_t c = 0; c < D; ++c) {
          acc += static_cast<T>(g[c]) * static_cast<T>(o[c]);
        }
        delta[(b * H + h) * S + i] = acc;
      }
    }
  });
}

// dK and dV, one task per (batch, kv head, key block).
template <typename scalar_t>
void dkv_kernel(const BwdArgs<scalar_t>& a, const int32_t* ccol, const int32_t* row_idx,
                scalar_t* dk_p, scalar_t* dv_p) {
  using T = acc_type<scalar_t>;
  const AttnDims& d = a.d;
  const Kernels<T>& K = kernels<T>();
  const int64_t D = d.head_dim, Dp = round_up(D, kColPad);
  const int64_t bq = d.block_q, bk = d.block_k, bkp = round_up(bk, kColPad);
  const int64_t bqp = round_up(bq, kColPad);
  const int64_t Hkv = d.kv_heads, G = d.group_size(), nkb = d.num_k_blocks;

  at::parallel_for(0, d.batch * Hkv * nkb, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> kt(D * bkp), vt(D * bkp), qp(bq * Dp), dop(bq * Dp), s(bq * bkp),
        dp(bq * bkp), pt(bkp * bqp), dst(bkp * bqp), dk_acc(bk * Dp), dv_acc(bk * Dp), bias(bkp),
        lse(bq), delta(bq);
    std::vector<int32_t> lo(bq), hi(bq);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t kb = task % nkb;
      const int64_t hk = (task / nkb) % Hkv;
      const int64_t b = task / (nkb * Hkv);
      // Keys of the block that can be allowed at all (key length, end of sequence).
      const int64_t k0 = kb * bk;
      const int64_t k1 = std::min({k0 + bk, d.seq_k, a.rules.key_len[b]});
      if (k1 <= k0) {
        continue;  // dk, dv stay zero
      }
      const int64_t N = k1 - k0, Np = round_up(N, kColPad);
      pack_transposed(a.k.at(b, k0, hk), a.k.ss, N, D, kt.data(), Np);
      pack_transposed(a.v.at(b, k0, hk), a.v.ss, N, D, vt.data(), Np);
      std::fill(dk_acc.begin(), dk_acc.end(), T(0));
      std::fill(dv_acc.begin(), dv_acc.end(), T(0));
      bool any = false;

      for (int64_t h = hk * G; h < (hk + 1) * G; ++h) {
        const int64_t c = d.slice(b, h) * nkb + kb;
        for (int32_t p = ccol[c]; p < ccol[c + 1]; ++p) {
          const int64_t qb = row_idx[p];
          const int64_t q0 = qb * bq, M = std::min(bq, d.seq_q - q0);
          const Tile t = tile_bounds(a.rules, b, q0, q0 + M, kb, bk);
          if (t.empty) {
            continue;
          }
          any = true;
          pack_rows(a.q.at(b, q0, h), a.q.ss, M, D, qp.data(), Dp);
          pack_rows(a.dout.at(b, q0, h), a.dout.ss, M, D, dop.data(), Dp);
          const T* lse_row = a.lse + (b * d.heads + h) * d.seq_q + q0;
          const T* delta_row = a.delta + (b * d.heads + h) * d.seq_q + q0;
          std::copy(lse_row, lse_row + M, lse.begin());
          std::copy(delta_row, delta_row + M, delta.begin());

          K.gemm(M, Np, D, qp.data(), Dp, kt.data(), Np, s.data(), bkp, false);
          K.gemm(M, Np, D, dop.data(), Dp, vt.data(), Np, dp.data(), bkp, false);
          row_ranges(a.rules, t, q0, M, lo.data(), hi.data());
          column_bias(a.rules, b, t, Np, bias.data());
          K.probs(s.data(), bkp, M, Np, lo.data(), hi.data(), bias.data(), a.scale, lse.data());
          K.dscores(s.data(), dp.data(), bkp, M, Np, delta.data(), a.scale);
          transpose(s.data(), bkp, M, N, pt.data(), bqp);
          transpose(dp.data(), bkp, M, N, dst.data(), bqp);
          K.gemm(N, Dp, M, pt.data(), bqp, dop.data(), Dp, dv_acc.data(), Dp, true);
          K.gemm(N, Dp, M, dst.data(), bqp, qp.data(), Dp, dk_acc.data(), Dp, true);
        }
      }
      if (!any) {
        continue;
      }
      for (int64_t r = 0; r < N; ++r) {
        const int64_t off = ((b * d.seq_k + k0 + r) * Hkv + hk) * D;
        for (int64_t c2 = 0; c2 < D; ++c2) {
          dk_p[off + c2] = static_cast<scalar_t>(dk_acc[r * Dp + c2]);
          dv_p[off + c2] = static_cast<scalar_t>(dv_acc[r * Dp + c2]);
        }
      }
    }
  });
}

// dQ, one task per (batch, head, query block).
template <typename scalar_t>
void dq_kernel(const BwdArgs<scalar_t>& a, const int32_t* crow, const int32_t* col,
               scalar_t* dq_p) {
  using T = acc_type<scalar_t>;
  const AttnDims& d = a.d;
  const Kernels<T>& K = kernels<T>();
  const int64_t D = d.head_dim, Dp = round_up(D, kColPad);
  const int64_t bq = d.block_q, bk = d.block_k, bkp = round_up(bk, kColPad);
  const int64_t H = d.heads, nqb = d.num_q_blocks;

  at::parallel_for(0, d.batch * H * nqb, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> qp(bq * D), dop(bq * D), kt(D * bkp), vt(D * bkp), kp(bk * Dp), s(bq * bkp),
        dp(bq * bkp), dq_acc(bq * Dp), bias(bkp);
    std::vector<int32_t> lo(bq), hi(bq);
    for (int64_t task = begin; task < end; ++task) {
      const QueryBlockTask t = query_block_task(d, task);
      const int64_t qb = t.qb, h = t.h, b = t.b, hk = t.kv_head, q0 = t.q0, M = t.rows, row = t.row;
      const T* lse_row = a.lse + (b * H + h) * d.seq_q + q0;
      const T* delta_row = a.delta + (b * H + h) * d.seq_q + q0;
      bool packed = false, any = false;
      std::fill(dq_acc.begin(), dq_acc.end(), T(0));

      for (int32_t p = crow[row]; p < crow[row + 1]; ++p) {
        const Tile t = tile_bounds(a.rules, b, q0, q0 + M, col[p], bk);
        if (t.empty) {
          continue;
        }
        if (!packed) {
          pack_rows(a.q.at(b, q0, h), a.q.ss, M, D, qp.data(), D);
          pack_rows(a.dout.at(b, q0, h), a.dout.ss, M, D, dop.data(), D);
          packed = true;
        }
        any = true;
        const int64_t N = t.k1 - t.k0, Np = round_up(N, kColPad);
        pack_transposed(a.k.at(b, t.k0, hk), a.k.ss, N, D, kt.data(), Np);
        pack_transposed(a.v.at(b, t.k0, hk), a.v.ss, N, D, vt.data(), Np);
        pack_rows(a.k.at(b, t.k0, hk), a.k.ss, N, D, kp.data(), Dp);

        K.gemm(M, Np, D, qp.data(), D, kt.data(), Np, s.data(), bkp, false);
        K.gemm(M, Np, D, dop.data(), D, vt.data(), Np, dp.data(), bkp, false);
        row_ranges(a.rules, t, q0, M, lo.data(), hi.data());
        column_bias(a.rules, b, t, Np, bias.data());
        K.probs(s.data(), bkp, M, Np, lo.data(), hi.data(), bias.data(), a.scale, lse_row);
        K.dscores(s.data(), dp.data(), bkp, M, Np, delta_row, a.scale);
        K.gemm(M, Dp, N, dp.data(), bkp, kp.data(), Dp, dq_acc.data(), Dp, true);
      }
      if (!any) {
        continue;
      }
      for (int64_t r = 0; r < M; ++r) {
        scalar_t* g = dq_p + ((b * d.seq_q + q0 + r) * H + h) * D;
        for (int64_t c = 0; c < D; ++c) {
          g[c] = static_cast<scalar_t>(dq_acc[r * Dp + c]);
        }
      }
    }
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> block_sparse_attn_bwd_cpu(
    const at::Tensor& dout_in, const at::Tensor& q_in, const at::Tensor& k_in,
    const at::Tensor& v_in, const at::Tensor& out_in, const at::Tensor& lse_in,
    const at::Tensor& ccol_indices, const at::Tensor& row_indices, const at::Tensor& crow_indices,
    const at::Tensor& col_indices, int64_t block_q, int64_t block_k, int64_t layout_batch,
    int64_t layout_heads, double scale, bool causal, int64_t window_left, int64_t window_right,
    const std::optional<at::Tensor>& key_lengths,
    const std::optional<at::Tensor>& key_padding_mask, const std::optional<at::Tensor>& dlse) {
  const AttnDims d = detail::check_bwd_args(
      dout_in, q_in, k_in, v_in, out_in, lse_in, ccol_indices, row_indices, crow_indices,
      col_indices, block_q, block_k, layout_batch, layout_heads, window_left, window_right,
      key_lengths, key_padding_mask, dlse);
  const at::Tensor q = last_dim_contiguous(q_in), k = last_dim_contiguous(k_in),
                   v = last_dim_contiguous(v_in), dout = last_dim_contiguous(dout_in),
                   out = last_dim_contiguous(out_in), lse = lse_in.contiguous();
  const at::Tensor crow = crow_indices.contiguous(), col = col_indices.contiguous(),
                   ccol = ccol_indices.contiguous(), row_idx = row_indices.contiguous();
  const at::Tensor kpm = contiguous_kpm(key_padding_mask);
  const MaskRules rules(d, causal, window_left, window_right, key_lengths, kpm);
  at::Tensor dq = at::zeros(q.sizes(), q.options());
  at::Tensor dk = at::zeros(k.sizes(), k.options());
  at::Tensor dv = at::zeros(v.sizes(), v.options());
  at::Tensor delta = at::empty(lse.sizes(), lse.options());

  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, q.scalar_type(), "block_sparse_attn_bwd_cpu", [&] {
        using T = acc_type<scalar_t>;
        const View4<scalar_t> dout_v(dout), out_v(out);
        compute_delta<scalar_t>(d, dout_v, out_v, delta.data_ptr<T>());
        // A gradient through lse adds dlse_i * P_ij to dS_ij = P_ij (dP_ij - Delta_i): the same
        // backward with Delta_i - dlse_i (d lse_i / d s_ij = P_ij). An empty row's lse (-inf) is a
        // constant, and whatever its gradient holds (NaN, from merging two empty partials by
        // logaddexp) must not reach its dS as 0 * NaN.
        if (dlse.has_value()) delta.sub_(dlse->masked_fill(lse.isneginf(), 0));
        const BwdArgs<scalar_t> args{d,
                                     View4<scalar_t>(q),
                                     View4<scalar_t>(k),
                                     View4<scalar_t>(v),
                                     dout_v,
                                     lse.const_data_ptr<T>(),
                                     delta.const_data_ptr<T>(),
                                     rules,
                                     static_cast<T>(scale)};
        dkv_kernel<scalar_t>(args, ccol.const_data_ptr<int32_t>(),
                             row_idx.const_data_ptr<int32_t>(), dk.data_ptr<scalar_t>(),
                             dv.data_ptr<scalar_t>());
        dq_kernel<scalar_t>(args, crow.const_data_ptr<int32_t>(), col.const_data_ptr<int32_t>(),
                            dq.data_ptr<scalar_t>());
      });
  return {dq, dk, dv};
}

}  // namespace dilated_sparse::cpu
