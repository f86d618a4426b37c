// Small dense kernels on block tiles used by the CPU attention ops.
//
// Every hot loop of the CPU backend lives here: a register-blocked GEMM on tiles, the online-softmax
// step of the forward, the probability / dS recomputation of the backward and row scaling. They are
// written once as plain C++ templates (kernels_impl.h) that the compiler vectorises, and compiled
// several times for different instruction sets (kernels.cpp); the best one the CPU supports is
// chosen at run time, so the binary stays portable. DILATED_SPARSE_CPU_ISA=default|avx2|avx512
// forces a variant (tests use it to cover the portable one).
#pragma once

#include <cstdint>
#include <string>

namespace dilated_sparse::cpu {

// Tile columns handed to the GEMM as its B operand (and S tiles) are padded to a multiple of this.
constexpr int64_t kColPad = 16;

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

template <typename T>
struct Kernels {
  // C[M x N] = (accumulate ? C : 0) + A[M x K] * B[K x N]; all row-major with leading dims
  // lda/ldb/ldc. N must be a multiple of kColPad.
  void (*gemm)(int64_t M, int64_t N, int64_t K, const T* A, int64_t lda, const T* B, int64_t ldb,
               T* C, int64_t ldc, bool accumulate);

  // Forward online-softmax step on an S tile [rows x ncols] (ncols multiple of kColPad) holding
  // raw scores q.k. Column c of row r is allowed when lo[r] <= c < hi[r] (and col_bias[c] is not
  // -inf); x = scale * s + col_bias[c]. Replaces S by p = exp(x - m_new) (0 where not allowed),
  // updates row_max / row_sum and writes the factor by which the running output must be scaled.
  void (*softmax_step)(T* S, int64_t lds, int64_t rows, int64_t ncols, const int32_t* lo,
                       const int32_t* hi, const T* col_bias, T scale, T* row_max, T* row_sum,
                       T* alpha);

  // Backward / weights: S := P = exp(scale * s + col_bias[c] - lse[r]) where allowed, else 0;
  // rows with lse == -inf become 0.
  void (*probs)(T* S, int64_t lds, int64_t rows, int64_t ncols, const int32_t* lo,
                const int32_t* hi, const T* col_bias, T scale, const T* lse);

  // dP := scale * P * (dP - delta[r]) (the gradient of the scores, scaled for dQ / dK).
  void (*dscores)(const T* P, T* dP, int64_t ld, int64_t rows, int64_t ncols, const T* delta,
                  T scale);

  // C[r, :ncols] *= alpha[r].
  void (*scale_rows)(T* C, int64_t ldc, int64_t rows, int64_t ncols, const T* alpha);

  const char* isa;
};

const Kernels<float>& kernels_f32();
const Kernels<double>& kernels_f64();

template <typename T>
const Kernels<T>& kernels();
template <>
inline const Kernels<float>& kernels<float>() { return kernels_f32(); }
template <>
inline const Kernels<double>& kernels<double>() { return kernels_f64(); }

// Name of the instruction-set variant in use ("avx512", "avx2" or "default").
std::string cpu_isa();

}  // namespace dilated_sparse::cpu
