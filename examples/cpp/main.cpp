// dilated_sparse from C++: runs the block-sparse attention forward (and backward) on CPU tensors
// through the C++ API (which calls the registered op via the PyTorch dispatcher) and checks the
// output and the log-sum-exp against a naive loop over the allowed keys. Exits 0 and prints
// "dilated_sparse example: OK" when every case matches.
#include <dilated_sparse/dilated_sparse.h>

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <limits>
#include <optional>
#include <vector>

namespace {

struct Case {
  const char* name;
  int64_t batch, seq_q, seq_k, heads, kv_heads, dim, block_q, block_k, layout_batch, layout_heads;
  bool causal;
  int64_t window_left, window_right;
  std::vector<int32_t> key_lengths;  // empty: none
  int64_t left_pad;                  // > 0: key_padding_mask marks the first keys of batch 1
};

// A deterministic layout: each row keeps the key blocks kb with (kb + row + slice) % 3 != 1, and
// row 1 of every slice is empty.
void make_layout(const Case& c, std::vector<int32_t>& crow, std::vector<int32_t>& col) {
  const int64_t nqb = (c.seq_q + c.block_q - 1) / c.block_q;
  const int64_t nkb = (c.seq_k + c.block_k - 1) / c.block_k;
  crow.assign(1, 0);
  col.clear();
  for (int64_t s = 0; s < c.layout_batch * c.layout_heads; ++s) {
    for (int64_t qb = 0; qb < nqb; ++qb) {
      for (int64_t kb = 0; kb < nkb; ++kb) {
        if (qb != 1 && (kb + qb + s) % 3 != 1) {
          col.push_back(static_cast<int32_t>(kb));
        }
      }
      crow.push_back(static_cast<int32_t>(col.size()));
    }
  }
}

// Naive attention in double over the allowed keys; returns the largest |difference| of out and
// of lse (finite entries; infinite ones must match exactly, else +inf is returned).
std::pair<double, double> naive_check(const Case& c, const at::Tensor& q, const at::Tensor& k,
                                      const at::Tensor& v, const std::vector<int32_t>& crow,
                                      const std::vector<int32_t>& col, const at::Tensor& kpm,
                                      const at::Tensor& out, const at::Tensor& lse) {
  const at::Tensor q64 = q.to(at::kDouble), k64 = k.to(at::kDouble), v64 = v.to(at::kDouble),
                   out64 = out.to(at::kDouble), lse64 = lse.to(at::kDouble);
  const auto qa = q64.accessor<double, 4>();
  const auto ka = k64.accessor<double, 4>();
  const auto va = v64.accessor<double, 4>();
  const auto oa = out64.accessor<double, 4>();
  const auto la = lse64.accessor<double, 3>();
  const int64_t nqb = (c.seq_q + c.block_q - 1) / c.block_q;
  const double scale = 1.0 / std::sqrt(static_cast<double>(c.dim));
  double err_out = 0.0, err_lse = 0.0;
  for (int64_t b = 0; b < c.batch; ++b) {
    for (int64_t h = 0; h < c.heads; ++h) {
      const int64_t s = (c.layout_batch == 1 ? 0 : b) * c.layout_heads + (c.layout_heads == 1 ? 0 : h);
      const int64_t hk = h / (c.heads / c.kv_heads);
      for (int64_t i = 0; i < c.seq_q; ++i) {
        const int64_t row = s * nqb + i / c.block_q;
        std::vector<int64_t> keys;
        for (int32_t p = crow[row]; p < crow[row + 1]; ++p) {
          for (int64_t j = col[p] * c.block_k; j < std::min((col[p] + 1) * c.block_k, c.seq_k); ++j) {
            const bool ok = (!c.causal || j <= i) && (c.window_left < 0 || j >= i - c.window_left) &&
                            (c.window_right < 0 || j <= i + c.window_right) &&
                            (c.key_lengths.empty() || j < c.key_lengths[b]) &&
                            (!kpm.defined() || !kpm[b][j].item<bool>());
            if (ok) keys.push_back(j);
          }
        }
        std::vector<double> score(keys.size());
        double m = -std::numeric_limits<double>::infinity();
        for (size_t t = 0; t < keys.size(); ++t) {
          double acc = 0.0;
          for (int64_t d = 0; d < c.dim; ++d) acc += qa[b][i][h][d] * ka[b][keys[t]][hk][d];
          score[t] = acc * scale;
          m = std::max(m, score[t]);
        }
        double sum = 0.0;
        for (double& x : score) sum += (x = std::exp(x - m));
        for (int64_t d = 0; d < c.dim; ++d) {
          double o = 0.0;
          for (size_t t = 0; t < keys.size(); ++t) o += score[t] * va[b][keys[t]][hk][d];
          o = keys.empty() ? 0.0 : o / sum;
          err_out = std::max(err_out, std::abs(o - oa[b][i][h][d]));
        }
        if (keys.empty()) {
          if (la[b][h][i] != -std::numeric_limits<double>::infinity()) err_lse = INFINITY;
        } else {
          err_lse = std::max(err_lse, std::abs(m + std::log(sum) - la[b][h][i]));
        }
      }
    }
  }
  return {err_out, err_lse};
}

bool run_case(const Case& c) {
  at::manual_seed(0);
  const at::Tensor q = at::randn({c.batch, c.seq_q, c.heads, c.dim});
  const at::Tensor k = at::randn({c.batch, c.seq_k, c.kv_heads, c.dim});
  const at::Tensor v = at::randn({c.batch, c.seq_k, c.kv_heads, c.dim});
  std::vector<int32_t> crow, col;
  make_layout(c, crow, col);
  const at::Tensor crow_t = at::tensor(crow, at::kInt);
  const at::Tensor col_t = at::tensor(col, at::kInt);
  std::optional<at::Tensor> key_lengths;
  if (!c.key_lengths.empty()) key_lengths = at::tensor(c.key_lengths, at::kInt);
  at::Tensor kpm;
  if (c.left_pad > 0) {
    kpm = at::zeros({c.batch, c.seq_k}, at::kBool);
    kpm[std::min<int64_t>(1, c.batch - 1)].narrow(0, 0, c.left_pad).fill_(true);
  }
  const std::optional<at::Tensor> kpm_opt = kpm.defined() ? std::optional<at::Tensor>(kpm) : std::nullopt;

  auto [out, lse] = dilated_sparse::block_sparse_attn_fwd(
      q, k, v, crow_t, col_t, c.block_q, c.block_k, c.layout_batch, c.layout_heads, std::nullopt,
      c.causal, c.window_left, c.window_right, key_lengths, kpm_opt);
  const auto [err_out, err_lse] = naive_check(c, q, k, v, crow, col, kpm, out, lse);
  const bool ok = err_out < 1e-4 && err_lse < 1e-4 && !out.isnan().any().item<bool>();
  std::printf("%-24s out max|err| %.2e  lse max|err| %.2e  %s\n", c.name, err_out, err_lse,
              ok ? "ok" : "MISMATCH");
  return ok;
}

}  // namespace

int main() {
  const std::vector<Case> cases = {
      // name, B, Sq, Sk, H, Hkv, D, bq, bk, Lb, Lh, causal, wl, wr, key_lengths, left_pad
      {"shared_gqa_key_lengths", 2, 100, 90, 4, 2, 24, 32, 16, 1, 1, false, -1, -1, {90, 37}, 0},
      {"per_head_causal_window", 1, 70, 70, 3, 1, 16, 16, 16, 1, 3, true, 20, -1, {}, 0},
      {"per_batch_left_padding", 2, 64, 80, 2, 2, 8, 16, 32, 2, 2, false, -1, 5, {}, 11},
  };
  bool all_ok = true;
  for (const Case& c : cases) all_ok = run_case(c) && all_ok;

  // The backward through the same API: gradients have the inputs' shapes and are finite.
  {
    const Case& c = cases[0];
    at::manual_seed(1);
    const at::Tensor q = at::randn({c.batch, c.seq_q, c.heads, c.dim});
    const at::Tensor k = at::randn({c.batch, c.seq_k, c.kv_heads, c.dim});
    const at::Tensor v = at::randn({c.batch, c.seq_k, c.kv_heads, c.dim});
    // A dense layout (every block) in CSR and its CSC transpose.
    const int64_t nqb = (c.seq_q + c.block_q - 1) / c.block_q, nkb = (c.seq_k + c.block_k - 1) / c.block_k;
    const at::Tensor crow = at::arange(0, (nqb + 1) * nkb, nkb, at::kInt);
    const at::Tensor col = at::arange(nkb, at::kInt).repeat({nqb});
    const at::Tensor ccol = at::arange(0, (nkb + 1) * nqb, nqb, at::kInt);
    const at::Tensor row = at::arange(nqb, at::kInt).repeat({nkb});
    auto [out, lse] = dilated_sparse::block_sparse_attn_fwd(q, k, v, crow, col, c.block_q, c.block_k);
    auto [dq, dk, dv] = dilated_sparse::block_sparse_attn_bwd(at::ones_like(out), q, k, v, out, lse, ccol,
                                                              row, crow, col, c.block_q, c.block_k);
    const bool ok = dq.sizes() == q.sizes() && dk.sizes() == k.sizes() && dv.sizes() == v.sizes() &&
                    dq.isfinite().all().item<bool>() && dk.isfinite().all().item<bool>() &&
                    dv.isfinite().all().item<bool>();
    // With dout = 1 everywhere, dV of a key is the total probability mass it receives.
    const double mass = dv.sum().item<double>() / static_cast<double>(c.dim);
    const double expected = static_cast<double>(c.batch * c.seq_q * c.heads);
    const bool mass_ok = std::abs(mass - expected) < 1e-3 * expected;
    std::printf("%-24s dq/dk/dv shapes %s, sum of dV / D = %.4f (expected %.0f)  %s\n", "backward_dense",
                ok ? "ok" : "WRONG", mass, expected, ok && mass_ok ? "ok" : "MISMATCH");
    all_ok = all_ok && ok && mass_ok;
  }

  std::printf("dilated_sparse example: %s (CUDA kernels compiled: %s)\n", all_ok ? "OK" : "FAILED",
              dilated_sparse::compiled_with_cuda() ? "yes" : "no");
  return all_ok ? 0 : 1;
}
