// Instruction-set variants of the tile kernels and the run-time choice between them.
#include "kernels.h"
#include "kernels_impl.h"

#include <cstdlib>
#include <stdexcept>
#include <string>

namespace dilated_sparse::cpu {
namespace {

// Defines the five kernels of one variant for one type, with `ATTR` (a target attribute or
// nothing), `FMA` (whether fused multiply-add is available) and `WIDE` (32 vector registers:
// taller GEMM register blocks), plus a Kernels table `NAME`.
#define DS_DEFINE_VARIANT(NAME, T, ATTR, FMA, WIDE, ISA)                                            \
  ATTR void NAME##_gemm(int64_t M, int64_t N, int64_t K, const T* A, int64_t lda, const T* B,   \
                        int64_t ldb, T* C, int64_t ldc, bool accumulate) {                      \
    impl::gemm<FMA, T, WIDE>(M, N, K, A, lda, B, ldb, C, ldc, accumulate);                      \
  }                                                                                             \
  ATTR void NAME##_softmax_step(T* S, int64_t lds, int64_t rows, int64_t ncols,                 \
                                const int32_t* lo, const int32_t* hi, const T* col_bias,         \
                                T scale, T* row_max, T* row_sum, T* alpha) {                     \
    impl::softmax_step<FMA, T>(S, lds, rows, ncols, lo, hi, col_bias, scale, row_max, row_sum,  \
                               alpha);                                                          \
  }                                                                                             \
  ATTR void NAME##_probs(T* S, int64_t lds, int64_t rows, int64_t ncols, const int32_t* lo,     \
                         const int32_t* hi, const T* col_bias, T scale, const T* lse) {         \
    impl::probs<FMA, T>(S, lds, rows, ncols, lo, hi, col_bias, scale, lse);                     \
  }                                                                                             \
  ATTR void NAME##_dscores(const T* P, T* dP, int64_t ld, int64_t rows, int64_t ncols,          \
                           const T* delta, T scale) {                                           \
    impl::dscores<FMA, T>(P, dP, ld, rows, ncols, delta, scale);                                \
  }                                                                                             \
  ATTR void NAME##_scale_rows(T* C, int64_t ldc, int64_t rows, int64_t ncols, const T* alpha) { \
    impl::scale_rows<T>(C, ldc, rows, ncols, alpha);                                            \
  }                                                                                             \
  const Kernels<T> NAME = {&NAME##_gemm,    &NAME##_softmax_step, &NAME##_probs,               \
                           &NAME##_dscores, &NAME##_scale_rows,   ISA};

DS_DEFINE_VARIANT(default_f32, float, , false, false, "default")
DS_DEFINE_VARIANT(default_f64, double, , false, false, "default")

#if (defined(__GNUC__) || defined(__clang__)) && (defined(__x86_64__) || defined(_M_X64))
#define DS_HAVE_X86_VARIANTS 1
#define DS_AVX2 __attribute__((target("avx2,fma")))
#define DS_AVX512 __attribute__((target("avx512f,avx512vl,avx512dq,avx512bw,avx2,fma")))
DS_DEFINE_VARIANT(avx2_f32, float, DS_AVX2, true, false, "avx2")
DS_DEFINE_VARIANT(avx2_f64, double, DS_AVX2, true, false, "avx2")
DS_DEFINE_VARIANT(avx512_f32, float, DS_AVX512, true, true, "avx512")
DS_DEFINE_VARIANT(avx512_f64, double, DS_AVX512, true, true, "avx512")
#endif

#undef DS_DEFINE_VARIANT

// 0 = default, 1 = avx2, 2 = avx512.
int choose_isa() {
  int best = 0;
#ifdef DS_HAVE_X86_VARIANTS
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
    best = 1;
  }
  if (best == 1 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
      __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512bw")) {
    best = 2;
  }
#endif
  const char* env = std::getenv("DILATED_SPARSE_CPU_ISA");
  if (env != nullptr && *env != '\0') {
    const std::string want(env);
    if (want != "avx512" && want != "avx2" && want != "default") {
      // Thrown from isa_level()'s static initialiser, so every call raises until the value is fixed.
      throw std::invalid_argument("dilated_sparse: DILATED_SPARSE_CPU_ISA must be default, avx2 or avx512, got '" +
                                  want + "'");
    }
    const int asked = want == "avx512" ? 2 : want == "avx2" ? 1 : 0;
    best = std::min(best, asked);  // never pick a variant the CPU cannot run
  }
  return best;
}

int isa_level() {
  static const int level = choose_isa();
  return level;
}

}  // namespace

const Kernels<float>& kernels_f32() {
#ifdef DS_HAVE_X86_VARIANTS
  switch (isa_level()) {
    case 2:
      return avx512_f32;
    case 1:
      return avx2_f32;
    default:
      break;
  }
#endif
  return default_f32;
}

const Kernels<double>& kernels_f64() {
#ifdef DS_HAVE_X86_VARIANTS
  switch (isa_level()) {
    case 2:
      return avx512_f64;
    case 1:
      return avx2_f64;
    default:
      break;
  }
#endif
  return default_f64;
}

std::string cpu_isa() { return kernels_f32().isa; }

}  // namespace dilated_sparse::cpu
