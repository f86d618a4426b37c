// Device primitives shared by the dilated_sparse CUDA kernels: mma.sync m16n8k16, ldmatrix,
// cp.async, and the tiles' shared-memory addressing. sm_80 and newer.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

namespace dilated_sparse::cuda {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte global -> shared copy; zero-fills the destination when pred is false.
__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src, bool pred) {
  const int sz = pred ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(sz));
}

// 4-byte global -> shared copy; zero-fills the destination when pred is false.
__device__ __forceinline__ void cp_async4(uint32_t dst, const void* src, bool pred) {
  const int sz = pred ? 4 : 0;
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(dst), "l"(src), "r"(sz));
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }

template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

__device__ __forceinline__ void ldsm_x4_t(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

template <typename T>
struct MmaOp;

template <>
struct MmaOp<__nv_bfloat16> {
  __device__ __forceinline__ static void run(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                             uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
        "{%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
  __device__ __forceinline__ static uint32_t pack(float x, float y) {
    __nv_bfloat162 v = __floats2bfloat162_rn(x, y);
    return *reinterpret_cast<uint32_t*>(&v);
  }
};

template <>
struct MmaOp<__half> {
  __device__ __forceinline__ static void run(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                             uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
        "{%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
  __device__ __forceinline__ static uint32_t pack(float x, float y) {
    __half2 v = __floats2half2_rn(x, y);
    return *reinterpret_cast<uint32_t*>(&v);
  }
};

// The A fragment (16-bit, registers) of k-step kk of an fp32 accumulator fragment with N 8-column
// tiles (mma.sync m16n8 or a warp's share of a wgmma m64 tile: the same per-warp layout), so that
// probabilities or dS feed the next product without shared memory.
template <typename T, int N>
__device__ __forceinline__ void to_a_frag(uint32_t (&a)[4], const float (&s)[N][4], int kk) {
  a[0] = MmaOp<T>::pack(s[2 * kk][0], s[2 * kk][1]);
  a[1] = MmaOp<T>::pack(s[2 * kk][2], s[2 * kk][3]);
  a[2] = MmaOp<T>::pack(s[2 * kk + 1][0], s[2 * kk + 1][1]);
  a[3] = MmaOp<T>::pack(s[2 * kk + 1][2], s[2 * kk + 1][3]);
}

// Explicit conversions (torch builds with __CUDA_NO_HALF_CONVERSIONS__ and friends).
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_float(float x) { return x; }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }

// The MUFU approximations (flush-to-zero, no denormal paths; lg2 within 2^-22 absolute, rcp within
// 1 ulp).
__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}
__device__ __forceinline__ float fast_log2(float x) {
  float y;
  asm("lg2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}
__device__ __forceinline__ float fast_rcp(float x) {
  float y;
  asm("rcp.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

// Shared-memory tiles are row-major [rows][kD + 8] (16 bytes of padding a row: ldmatrix's eight
// row addresses then fall in distinct banks for every specialised head dim).
//
// Byte address of this lane's row for an ldmatrix.x4 that yields an A fragment (16x16 at
// (row0, col0), non-transposed) or, with .trans, the B fragments of two n8 tiles (k rows at row0,
// n columns at col0) of a row-major [k][n] tile.
template <int kStride>
__device__ __forceinline__ uint32_t ldsm_addr_a(uint32_t base, int row0, int col0, int lane) {
  return base + 2u * ((row0 + (lane & 7) + ((lane >> 3) & 1) * 8) * kStride + col0 + (lane >> 4) * 8);
}

// Byte address for an ldmatrix.x4 (non-transposed) yielding the B fragments of two n8 tiles
// (n rows n0..n0+15, k columns k0..k0+15) of a tile stored [n][k] (B = tile^T).
template <int kStride>
__device__ __forceinline__ uint32_t ldsm_addr_bn(uint32_t base, int n0, int k0, int lane) {
  return base + 2u * ((n0 + (lane & 7) + (lane >> 4) * 8) * kStride + k0 + ((lane >> 3) & 1) * 8);
}

// Copy rows [row0, row0 + kRows) x [0, kD) of a [seq][D] matrix (row stride in elements) into a
// padded shared tile with cp.async; rows at or past `valid_rows` and columns at or past D are
// zero-filled.
template <typename T, int kRows, int kD, int kThreads>
__device__ __forceinline__ void load_tile(T* tile, const T* gbase, int64_t row_stride, int row0,
                                          int valid_rows, int D, int tid) {
  constexpr int kChunks = kD / 8;
  constexpr int kTotal = kRows * kChunks;
  const uint32_t sbase = smem_u32(tile);
#pragma unroll
  for (int c0 = 0; c0 < kTotal; c0 += kThreads) {
    const int c = c0 + tid;
    if (kTotal % kThreads == 0 || c < kTotal) {
      const int r = c / kChunks;
      const int ch = c % kChunks;
      const bool pred = (row0 + r) < valid_rows && ch * 8 < D;
      const T* src = pred ? gbase + static_cast<int64_t>(row0 + r) * row_stride + ch * 8 : gbase;
      cp_async16(sbase + 2u * (r * (kD + 8) + ch * 8), src, pred);
    }
  }
}

}  // namespace dilated_sparse::cuda
