// Bodies of the tile kernels declared in kernels.h. Included only by kernels.cpp, which compiles
// them once per instruction set; everything here is force-inlined into those variants so that the
// loops are vectorised for the variant's target.
#pragma once

#include "kernels.h"

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#if defined(__GNUC__) || defined(__clang__)
#define DS_INLINE inline __attribute__((always_inline))
#define DS_UNROLL _Pragma("GCC unroll 16")
#else
#define DS_INLINE inline
#define DS_UNROLL
#endif

namespace dilated_sparse::cpu::impl {

template <typename T>
constexpr T neg_inf() {
  return -std::numeric_limits<T>::infinity();
}

template <bool kFma, typename T>
DS_INLINE T madd(T a, T b, T c) {
  if constexpr (kFma) {
    return std::fma(a, b, c);
  } else {
    return a * b + c;
  }
}

// exp for float without libm calls, so that loops over it vectorise: Cody-Waite range reduction
// and a degree-6 polynomial, about 1 ulp. Inputs below -87 return exactly 0 (this covers -inf).
template <bool kFma>
DS_INLINE float exp_approx(float x) {
  const float xc = std::min(std::max(x, -87.0f), 88.0f);
  float n = xc * 1.44269504088896341f;
  n = (n + 12582912.0f) - 12582912.0f;  // round to nearest integer
  float r = madd<kFma>(n, -0.693359375f, xc);
  r = madd<kFma>(n, 2.12194440e-4f, r);
  float y = 1.9875691500e-4f;
  y = madd<kFma>(y, r, 1.3981999507e-3f);
  y = madd<kFma>(y, r, 8.3334519073e-3f);
  y = madd<kFma>(y, r, 4.1665795894e-2f);
  y = madd<kFma>(y, r, 1.6666665459e-1f);
  y = madd<kFma>(y, r, 5.0000001201e-1f);
  y = madd<kFma>(y, r * r, r) + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  const float result = y * std::bit_cast<float>(bits);
  return x < -87.0f ? 0.0f : result;
}

template <bool kFma, typename T>
DS_INLINE T fast_exp(T x) {
  if constexpr (std::is_same_v<T, float>) {
    return exp_approx<kFma>(x);
  } else {
    return std::exp(x);  // float64 is the accuracy path (gradcheck): use libm
  }
}

// One MR x kColPad block of C.
template <bool kFma, typename T, int MR>
DS_INLINE void gemm_block(int64_t K, const T* A, int64_t lda, const T* B, int64_t ldb, T* C,
                          int64_t ldc, bool accumulate) {
  constexpr int NR = static_cast<int>(kColPad);
  T acc[MR][NR];
  DS_UNROLL for (int r = 0; r < MR; ++r) {
    DS_UNROLL for (int c = 0; c < NR; ++c) { acc[r][c] = accumulate ? C[r * ldc + c] : T(0); }
  }
  for (int64_t k = 0; k < K; ++k) {
    const T* b = B + k * ldb;
    DS_UNROLL for (int r = 0; r < MR; ++r) {
      const T a = A[r * lda + k];
      DS_UNROLL for (int c = 0; c < NR; ++c) { acc[r][c] = madd<kFma>(a, b[c], acc[r][c]); }
    }
  }
  DS_UNROLL for (int r = 0; r < MR; ++r) {
    DS_UNROLL for (int c = 0; c < NR; ++c) { C[r * ldc + c] = acc[r][c]; }
  }
}

// kWide: the variant has 32 vector registers of kColPad floats (AVX-512), so twice as many rows
// of accumulators fit, which hides the FMA latency better.
template <bool kFma, typename T, bool kWide = false>
DS_INLINE void gemm(int64_t M, int64_t N, int64_t K, const T* A, int64_t lda, const T* B,
                    int64_t ldb, T* C, int64_t ldc, bool accumulate) {
  constexpr int MR = (std::is_same_v<T, float> ? 4 : 2) * (kWide ? 2 : 1);
  for (int64_t n0 = 0; n0 < N; n0 += kColPad) {
    int64_t m0 = 0;
    for (; m0 + MR <= M; m0 += MR) {
      gemm_block<kFma, T, MR>(K, A + m0 * lda, lda, B + n0, ldb, C + m0 * ldc + n0, ldc,
                              accumulate);
    }
    for (; m0 < M; ++m0) {
      gemm_block<kFma, T, 1>(K, A + m0 * lda, lda, B + n0, ldb, C + m0 * ldc + n0, ldc,
                             accumulate);
    }
  }
}

// Row max and sum over a row whose length is a multiple of kColPad, with kColPad partial
// results so that the reductions vectorise without reassociation flags.
template <typename T>
DS_INLINE T row_max(const T* x, int64_t n) {
  constexpr int W = static_cast<int>(kColPad);
  T acc[W];
  DS_UNROLL for (int c = 0; c < W; ++c) { acc[c] = neg_inf<T>(); }
  for (int64_t j = 0; j < n; j += W) {
    DS_UNROLL for (int c = 0; c < W; ++c) { acc[c] = acc[c] < x[j + c] ? x[j + c] : acc[c]; }
  }
  T m = acc[0];
  for (int c = 1; c < W; ++c) { m = m < acc[c] ? acc[c] : m; }
  return m;
}

template <typename T>
DS_INLINE T row_sum(const T* x, int64_t n) {
  constexpr int W = static_cast<int>(kColPad);
  T acc[W];
  DS_UNROLL for (int c = 0; c < W; ++c) { acc[c] = T(0); }
  for (int64_t j = 0; j < n; j += W) {
    DS_UNROLL for (int c = 0; c < W; ++c) { acc[c] += x[j + c]; }
  }
  T sum = T(0);
  for (int c = 0; c < W; ++c) { sum += acc[c]; }
  return sum;
}

// s[j] := scale * s[j] + col_bias[j] for lo <= j < hi, -inf elsewhere.
template <bool kFma, typename T>
DS_INLINE void scale_and_mask(T* s, int64_t ncols, int32_t c_lo, int32_t c_hi, const T* col_bias,
                              T scale) {
  for (int32_t j = 0; j < static_cast<int32_t>(ncols); ++j) {
    const T x = madd<kFma>(s[j], scale, col_bias[j]);
    s[j] = (j >= c_lo && j < c_hi) ? x : neg_inf<T>();
  }
}

template <bool kFma, typename T>
DS_INLINE void exp_shifted(T* s, int64_t ncols, T shift) {
  for (int64_t j = 0; j < ncols; ++j) { s[j] = fast_exp<kFma>(s[j] - shift); }
}

template <bool kFma, typename T>
DS_INLINE void softmax_step(T* S, int64_t lds, int64_t rows, int64_t ncols, const int32_t* lo,
                            const int32_t* hi, const T* col_bias, T scale, T* row_max_io,
                            T* row_sum_io, T* alpha) {
  for (int64_t r = 0; r < rows; ++r) {
    T* s = S + r * lds;
    scale_and_mask<kFma, T>(s, ncols, lo[r], hi[r], col_bias, scale);
    const T m_old = row_max_io[r];
    const T m_new = std::max(m_old, row_max(s, ncols));
    if (m_new == neg_inf<T>()) {
      std::fill(s, s + ncols, T(0));
      alpha[r] = T(1);
      continue;
    }
    exp_shifted<kFma, T>(s, ncols, m_new);
    const T a = m_old == neg_inf<T>() ? T(0) : fast_exp<kFma>(m_old - m_new);
    alpha[r] = a;
    row_sum_io[r] = row_sum_io[r] * a + row_sum(s, ncols);
    row_max_io[r] = m_new;
  }
}

template <bool kFma, typename T>
DS_INLINE void probs(T* S, int64_t lds, int64_t rows, int64_t ncols, const int32_t* lo,
                     const int32_t* hi, const T* col_bias, T scale, const T* lse) {
  for (int64_t r = 0; r < rows; ++r) {
    T* s = S + r * lds;
    const T l = lse[r];
    if (l == neg_inf<T>()) {
      std::fill(s, s + ncols, T(0));
      continue;
    }
    scale_and_mask<kFma, T>(s, ncols, lo[r], hi[r], col_bias, scale);
    exp_shifted<kFma, T>(s, ncols, l);
  }
}

template <bool kFma, typename T>
DS_INLINE void dscores(const T* P, T* dP, int64_t ld, int64_t rows, int64_t ncols,
                       const T* delta, T scale) {
  constexpr int W = static_cast<int>(kColPad);
  for (int64_t r = 0; r < rows; ++r) {
    const T* p = P + r * ld;
    T* dp = dP + r * ld;
    const T dl = delta[r];
    for (int64_t j = 0; j < ncols; j += W) {
      DS_UNROLL for (int c = 0; c < W; ++c) { dp[j + c] = scale * p[j + c] * (dp[j + c] - dl); }
    }
  }
}

template <typename T>
DS_INLINE void scale_rows(T* C, int64_t ldc, int64_t rows, int64_t ncols, const T* alpha) {
  for (int64_t r = 0; r < rows; ++r) {
    T* c = C + r * ldc;
    const T a = alpha[r];
    if (a == T(1)) {
      continue;
    }
    for (int64_t j = 0; j < ncols; ++j) { c[j] *= a; }
  }
}

}  // namespace dilated_sparse::cpu::impl
