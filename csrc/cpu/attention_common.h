// Shared pieces of the CPU attention kernels: the per-call view of the inputs, which keys of a
// (query block, key block) tile are allowed, and packing of tiles into float/double scratch.
#pragma once

#include "dilated_sparse/detail/checks.h"
#include "kernels.h"

#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <optional>
#include <type_traits>
#include <vector>

namespace dilated_sparse::cpu {

using detail::AttnDims;

// Accumulation type: float for fp16/bf16/fp32, double for fp64.
template <typename scalar_t>
using acc_type = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

// One work item of the row-parallel loops: (batch b, query head h, query block qb), flattened as
// task = (b * H + h) * nqb + qb so that neighbouring tasks share a head's K/V.
struct QueryBlockTask {
  int64_t b, h, kv_head, qb;
  int64_t q0;    // first query token of the block
  int64_t rows;  // tokens in the block (the last one may be partial)
  int64_t slice; // layout slice of (b, h)
  int64_t row;   // CSR row: slice * nqb + qb
};

inline QueryBlockTask query_block_task(const AttnDims& d, int64_t task) {
  QueryBlockTask t;
  const int64_t nqb = d.num_q_blocks;
  t.qb = task % nqb;
  t.h = (task / nqb) % d.heads;
  t.b = task / (nqb * d.heads);
  t.kv_head = t.h / d.group_size();
  t.q0 = t.qb * d.block_q;
  t.rows = std::min(d.block_q, d.seq_q - t.q0);
  t.slice = d.slice(t.b, t.h);
  t.row = t.slice * nqb + t.qb;
  return t;
}

// Token-level rules of one call (everything but the block layout).
struct MaskRules {
  bool causal = false;
  int64_t window_left = -1;   // -1: unbounded
  int64_t window_right = -1;  // -1: unbounded
  std::vector<int64_t> key_len;    // per batch, clamped to [0, Sk]
  const bool* kpm = nullptr;       // [B, Sk] contiguous, true = padding; null when absent
  int64_t seq_k = 0;

  MaskRules(const AttnDims& d, bool causal_, int64_t wl, int64_t wr,
            const std::optional<at::Tensor>& key_lengths, const at::Tensor& kpm_contig)
      : causal(causal_), window_left(wl), window_right(wr), seq_k(d.seq_k) {
    key_len.assign(static_cast<size_t>(d.batch), d.seq_k);
    if (key_lengths.has_value()) {
      const at::Tensor kl = key_lengths->contiguous();
      const int32_t* p = kl.data_ptr<int32_t>();
      for (int64_t b = 0; b < d.batch; ++b) {
        key_len[b] = std::clamp<int64_t>(p[b], 0, d.seq_k);
      }
    }
    if (kpm_contig.defined()) {
      kpm = kpm_contig.data_ptr<bool>();
    }
  }
};

// The part of a (query rows [q0, q1), key block) tile that can hold allowed keys.
struct Tile {
  int64_t k0 = 0;  // first key of the block
  int64_t k1 = 0;  // one past the last key that may be allowed (clipped to Sk and key length)
  bool empty = true;
};

inline Tile tile_bounds(const MaskRules& m, int64_t b, int64_t q0, int64_t q1, int64_t kb,
                        int64_t block_k) {
  Tile t;
  t.k0 = kb * block_k;
  t.k1 = std::min({t.k0 + block_k, m.seq_k, m.key_len[b]});
  if (t.k1 <= t.k0 || q1 <= q0) {
    return t;
  }
  const int64_t q_last = q1 - 1;
  if (m.causal && t.k0 > q_last) {
    return t;
  }
  if (m.window_left >= 0 && t.k1 - 1 < q0 - m.window_left) {
    return t;
  }
  if (m.window_right >= 0 && t.k0 > q_last + m.window_right) {
    return t;
  }
  t.empty = false;
  return t;
}

// Per-row allowed column range [lo, hi) (relative to t.k0) for query rows q0 .. q0+rows-1, from
// causal and window rules; the key-padding mask is applied separately as a column bias.
inline void row_ranges(const MaskRules& m, const Tile& t, int64_t q0, int64_t rows, int32_t* lo,
                       int32_t* hi) {
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t i = q0 + r;
    int64_t a = t.k0;
    int64_t e = t.k1;
    if (m.causal) {
      e = std::min(e, i + 1);
    }
    if (m.window_left >= 0) {
      a = std::max(a, i - m.window_left);
    }
    if (m.window_right >= 0) {
      e = std::min(e, i + m.window_right + 1);
    }
    if (e < a) {
      e = a;
    }
    lo[r] = static_cast<int32_t>(a - t.k0);
    hi[r] = static_cast<int32_t>(e - t.k0);
  }
}

// bias[c] = -inf for padded keys of batch b, else 0, for c < ncols (columns past the tile are 0:
// they are excluded by the row ranges).
template <typename T>
void column_bias(const MaskRules& m, int64_t b, const Tile& t, int64_t ncols, T* bias) {
  std::fill(bias, bias + ncols, T(0));
  if (m.kpm == nullptr) {
    return;
  }
  const bool* row = m.kpm + b * m.seq_k;
  for (int64_t c = 0; c < t.k1 - t.k0; ++c) {
    if (row[t.k0 + c]) {
      bias[c] = -std::numeric_limits<T>::infinity();
    }
  }
}

// dst[r * ldd + c] = src[r * src_stride + c] for r < rows, c < cols; columns cols..ldd-1 zeroed.
template <typename scalar_t, typename T>
void pack_rows(const scalar_t* src, int64_t src_stride, int64_t rows, int64_t cols, T* dst,
               int64_t ldd) {
  for (int64_t r = 0; r < rows; ++r) {
    const scalar_t* s = src + r * src_stride;
    T* d = dst + r * ldd;
    for (int64_t c = 0; c < cols; ++c) {
      d[c] = static_cast<T>(s[c]);
    }
    std::fill(d + cols, d + ldd, T(0));
  }
}

// dst[c * ldd + r] = src[r * src_stride + c] (a transpose) for r < rows, c < cols; entries
// rows..ldd-1 of each dst row zeroed.
template <typename scalar_t, typename T>
void pack_transposed(const scalar_t* src, int64_t src_stride, int64_t rows, int64_t cols, T* dst,
                     int64_t ldd) {
  for (int64_t c = 0; c < cols; ++c) {
    std::fill(dst + c * ldd + rows, dst + (c + 1) * ldd, T(0));
  }
  constexpr int64_t kChunk = 16;  // keep the written lines hot
  for (int64_t c0 = 0; c0 < cols; c0 += kChunk) {
    const int64_t c1 = std::min(cols, c0 + kChunk);
    for (int64_t r = 0; r < rows; ++r) {
      const scalar_t* s = src + r * src_stride;
      for (int64_t c = c0; c < c1; ++c) {
        dst[c * ldd + r] = static_cast<T>(s[c]);
      }
    }
  }
}

// dst[c * ldd + r] = src[r * lds + c] for r < rows, c < cols (scratch-to-scratch transpose).
template <typename T>
void transpose(const T* src, int64_t lds, int64_t rows, int64_t cols, T* dst, int64_t ldd) {
  for (int64_t r = 0; r < rows; ++r) {
    const T* s = src + r * lds;
    for (int64_t c = 0; c < cols; ++c) {
      dst[c * ldd + r] = s[c];
    }
  }
}

// Returns t itself when its last dim is contiguous, else a contiguous copy.
inline at::Tensor last_dim_contiguous(const at::Tensor& t) {
  return (t.size(-1) == 1 || t.stride(-1) == 1) ? t : t.contiguous();
}

inline at::Tensor contiguous_kpm(const std::optional<at::Tensor>& kpm) {
  return kpm.has_value() ? kpm->contiguous() : at::Tensor();
}

// Strided 4-D view [B, S, H, D] of a tensor with a contiguous last dim.
template <typename scalar_t>
struct View4 {
  const scalar_t* data;
  int64_t sb, ss, sh;
  explicit View4(const at::Tensor& t)
      : data(t.const_data_ptr<scalar_t>()), sb(t.stride(0)), ss(t.stride(1)), sh(t.stride(2)) {}
  const scalar_t* at(int64_t b, int64_t s, int64_t h) const {
    return data + b * sb + s * ss + h * sh;
  }
};

}  // namespace dilated_sparse::cpu
