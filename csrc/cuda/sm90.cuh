// Hopper (sm_90a) primitives of the dilated_sparse kernels: warpgroup MMA (wgmma.mma_async) with
// shared-memory descriptors, and the 128-byte-swizzled shared tiles those descriptors read.
//
// Tile layout ("SW128"): a [rows][kD] tile of 16-bit values is kept as kD / 64 panels of
// [rows][64] (128 bytes a row); inside a panel the 16-byte chunk c of row r sits at chunk
// c ^ (r % 8). Panels start on 1024-byte boundaries. This is the canonical 128-byte swizzle of the
// wgmma descriptors: the same tile serves as a K-major operand (rows = M or N, columns = K: Q and K
// in S = Q K^T) and as an MN-major operand (rows = K, columns = N: V in O += P V), so no tile is
// ever transposed.
#pragma once

#include <cstdint>

#include "common.cuh"

namespace dilated_sparse::cuda::sm90 {

// Bytes of a SW128 tile.
template <int kRows, int kD>
constexpr int tile_bytes() {
  return kRows * kD * 2;
}

// Byte offset, in a SW128 tile of kRows rows, of the 16-byte chunk c of row r.
template <int kRows>
__device__ __forceinline__ uint32_t sw128_offset(int r, int c) {
  return (c / 8) * (kRows * 128) + r * 128 + (((c % 8) ^ (r % 8)) << 4);
}

// The address lane `lane` gives an x4 ldmatrix / stmatrix of the 16 x 16 block at rows [row0,
// row0 + 16), chunks 2 c2 and 2 c2 + 1 of a SW128 tile: row row0 + 8 (m % 2) + lane % 8, chunk
// 2 c2 + m / 2, m = lane / 8 (the order of an m16k16 A fragment). row0: a multiple of 8.
template <int kRows>
__device__ __forceinline__ uint32_t sw128_x4_addr(uint32_t tile, int row0, int c2, int lane) {
  const int m = lane / 8, j = lane % 8;  // j: the row's position in its 8 (row0 % 8 == 0)
  const int c = 2 * c2 + (m >> 1);
  return tile + (c / 8) * (kRows * 128) + (row0 + (m & 1) * 8 + j) * 128 + (((c % 8) ^ j) << 4);
}

// Copy rows [row0, row0 + kRows) x [0, kD) of a [seq][D] matrix into a SW128 tile (cp.async, 16
// bytes a copy); rows at or past `valid_rows` and columns at or past D are zero-filled. Each thread
// keeps one 16-byte column chunk and walks rows a pass apart; where a pass spans a multiple of 8
// rows the thread's swizzled offset is the same in every pass (few live registers), else (D256 with
// 128 threads: 4 rows a pass) each pass's offset is computed.
template <typename T, int kRows, int kD, int kThreads>
__device__ __forceinline__ void load_tile(uint32_t sbase, const T* gbase, int64_t row_stride, int row0,
                                          int valid_rows, int D, int tid) {
  static_assert(kD % 64 == 0, "SW128 tiles need a multiple of 64 columns");
  constexpr int kChunks = kD / 8;
  constexpr int kRowsPerPass = kThreads / kChunks;
  static_assert(kThreads % kChunks == 0 && kRowsPerPass > 0, "a pass must cover whole rows");
  const int ch = tid % kChunks;
  const int r0 = tid / kChunks;
  const uint32_t dst0 = sbase + sw128_offset<kRows>(r0, ch);
  const bool col_ok = ch * 8 < D;
  const T* src0 = gbase + static_cast<int64_t>(row0 + r0) * row_stride + ch * 8;
#pragma unroll
  for (int pass = 0; pass < (kRows + kRowsPerPass - 1) / kRowsPerPass; ++pass) {
    const int r = r0 + pass * kRowsPerPass;
    if (kRows % kRowsPerPass == 0 || r < kRows) {
      const bool pred = col_ok && row0 + r < valid_rows;
      const T* src = pred ? src0 + static_cast<int64_t>(pass * kRowsPerPass) * row_stride : gbase;
      const uint32_t dst = kRowsPerPass % 8 == 0 ? dst0 + pass * kRowsPerPass * 128 : sbase + sw128_offset<kRows>(r, ch);
      cp_async16(dst, src, pred);
    }
  }
}

// This thread's warpgroup, through a shuffle so that ptxas sees a warp-uniform value: what is
// derived from it (the descriptors of a warpgroup's rows) then lives in uniform registers, and a
// product's descriptor costs one uniform add instead of a register computation and two moves.
__device__ __forceinline__ int warpgroup_index() { return __shfl_sync(0xffffffffu, static_cast<int>(threadIdx.x) / 128, 0); }

// Shared-memory matrix descriptor of a SW128 operand (byte offsets; the fields hold them >> 4).
//   K-major (rows = M/N, 16 K-columns at `addr`): lbo unused (16), sbo = 1024 (next 8 rows).
//   MN-major (16 K-rows at `addr`, N columns across panels): lbo = panel stride (next 64 columns),
//   sbo = 1024 (next 8 K-rows).
// Built from the tile's address in 16-byte units plus the offset in the same units, added rather
// than or-ed: shared addresses are below 2^18, so the start field (14 bits) never carries into
// the next, and a k-step's descriptor is the tile's plus a constant: one add each (unrolled loops
// hoist the rest), where masking the final address cost five dependent instructions a product.
__device__ __forceinline__ uint64_t desc_units(uint32_t units, uint32_t lbo, uint32_t sbo) {
  return static_cast<uint64_t>(units + ((lbo >> 4) << 16)) | (static_cast<uint64_t>((sbo >> 4) | (1u << 30)) << 32);
}

// K-major descriptor of rows [row0, row0 + 64 or N) and K-columns [16 kk, 16 kk + 16) of a
// [kRows][kD] SW128 tile: panel kk / 4, 32 bytes per 16 columns inside the panel (the hardware
// applies the swizzle to the final address, so the offset composes with it).
template <int kRows>
__device__ __forceinline__ uint64_t desc_k(uint32_t tile, int row0, int kk) {
  return desc_units((tile >> 4) + row0 * 8 + ((kk / 4) * (kRows * 128) + (kk % 4) * 32) / 16, 16, 1024);
}

// MN-major descriptor of K-rows [16 kk, 16 kk + 16) of a [kRows][kD] SW128 tile, all kD columns.
template <int kRows>
__device__ __forceinline__ uint64_t desc_mn(uint32_t tile, int kk) {
  return desc_units((tile >> 4) + kk * 128, kRows * 128, 1024);
}

__device__ __forceinline__ void fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}

// cp.async writes through the generic proxy, wgmma reads through the async proxy: each writer
// fences its own writes before the barrier that publishes them.
__device__ __forceinline__ void fence_async_smem() {
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}

// 16 zero bytes at shared address `at` (16-byte aligned).
__device__ __forceinline__ void st_shared_zero16(uint32_t at) {
  asm volatile("st.shared.v4.u32 [%0], {%1, %1, %1, %1};\n" ::"r"(at), "r"(0) : "memory");
}

// A 32-bit word at shared address `at`, written / read in program order with the other shared
// accesses (a flag handed over through an mbarrier, whose arrive / wait order it).
__device__ __forceinline__ void st_shared_u32(uint32_t at, uint32_t v) {
  asm volatile("st.shared.u32 [%0], %1;\n" ::"r"(at), "r"(v) : "memory");
}
__device__ __forceinline__ uint32_t ld_shared_u32(uint32_t at) {
  uint32_t v;
  asm volatile("ld.shared.u32 %0, [%1];\n" : "=r"(v) : "r"(at) : "memory");
  return v;
}

// Keeps the compiler from moving accumulator reads/writes across wgmma issue and wait.
template <int N>
__device__ __forceinline__ void fence_regs(float (&d)[N][4]) {
#pragma unroll
  for (int i = 0; i < N; ++i)
#pragma unroll
    for (int e = 0; e < 4; ++e) asm volatile("" : "+f"(d[i][e])::"memory");
}

// mbarrier (shared memory, 8 bytes) and named-barrier helpers.
__device__ __forceinline__ void mbar_init(uint32_t bar, int count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}
__device__ __forceinline__ void mbar_wait(uint32_t bar, int parity) {
  asm volatile(
      "{\n.reg .pred p;\nLAB_WAIT:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 p, [%0], %1;\n"
      "@!p bra LAB_WAIT;\n}\n" ::"r"(bar),
      "r"(parity)
      : "memory");
}
__device__ __forceinline__ void mbar_arrive(uint32_t bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}
// Arrives on `bar` once every cp.async this thread issued so far has landed (the barrier's count
// includes this arrival).
__device__ __forceinline__ void cp_async_arrive(uint32_t bar) {
  asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];\n" ::"r"(bar) : "memory");
}
// The barrier's current phase also waits for `bytes` more of asynchronous copies (no arrival).
__device__ __forceinline__ void mbar_expect_tx(uint32_t bar, uint32_t bytes) {
  asm volatile("mbarrier.expect_tx.relaxed.cta.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(bytes) : "memory");
}
// One bulk copy of `bytes` contiguous bytes (multiple of 16, 16-byte aligned) global -> shared,
// completing that many bytes of `bar`'s transaction count.
__device__ __forceinline__ void bulk_load(uint32_t dst, const void* src, uint32_t bytes, uint32_t bar) {
  asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n" ::"r"(dst),
               "l"(src), "r"(bytes), "r"(bar)
               : "memory");
}
// TMA: the box at coordinates (c0, c1, c2, c3), innermost first, of the 4-D tensor map at `map`
// (a __grid_constant__ parameter's address) into shared memory at dst, completing its bytes on bar.
__device__ __forceinline__ void tma_load_4d(uint32_t dst, const void* map, int c0, int c1, int c2, int c3,
                                            uint32_t bar) {
  asm volatile(
      "cp.async.bulk.tensor.4d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4, "
      "%5}], [%6];\n" ::"r"(dst),
      "l"(map), "r"(c0), "r"(c1), "r"(c2), "r"(c3), "r"(bar)
      : "memory");
}
// The [kRows][kD] SW128 tile that load_tile writes, rows row0.. of head h, batch b, from a tensor
// map over (D, S, H, B) with boxes of 64 columns x kRows rows and the 128-byte swizzle: one box
// per 64-column panel. Rows and columns outside the tensor arrive as zeros; the barrier is told
// to expect all kRows x kD x 2 bytes first.
template <int kRows, int kD>
__device__ __forceinline__ void tma_tile(uint32_t dst, const void* map, int row0, int h, int b, uint32_t bar) {
  static_assert(kD % 64 == 0 && kRows <= 256, "TMA boxes: 64-column panels of at most 256 rows");
  mbar_expect_tx(bar, kRows * kD * 2);
#pragma unroll
  for (int panel = 0; panel < kD / 64; ++panel) tma_load_4d(dst + panel * (kRows * 128), map, panel * 64, row0, h, b, bar);
}
// TMA store: the [kRows][kD] SW128 tile at `src` to rows row0.. of head h, batch b of the tensor
// map's tensor (boxes of 64 columns x kRows rows); rows and columns outside the tensor are not
// written. Committed as one bulk group of the issuing thread (bulk_wait_read / bulk_wait).
// kPanelRows: the rows of the staging tile `src` lies in (its 64-column panels are that far apart),
// when the box is a slice of it (src 1024-byte aligned, so the slice keeps the swizzle's phase).
template <int kRows, int kD, int kPanelRows = kRows>
__device__ __forceinline__ void tma_store_tile(uint32_t src, const void* map, int row0, int h, int b) {
  static_assert(kD % 64 == 0 && kRows <= 256 && kRows % 8 == 0, "TMA boxes: 64-column panels of at most 256 rows");
#pragma unroll
  for (int panel = 0; panel < kD / 64; ++panel) {
    asm volatile("cp.async.bulk.tensor.4d.global.shared::cta.bulk_group [%0, {%1, %2, %3, %4}], [%5];\n" ::"l"(map),
                 "r"(panel * 64), "r"(row0), "r"(h), "r"(b), "r"(src + panel * (kPanelRows * 128))
                 : "memory");
  }
  asm volatile("cp.async.bulk.commit_group;\n" ::: "memory");
}
// Hints: the line at `at` into L2; a TMA descriptor (a __grid_constant__ parameter's generic address)
// into the descriptor cache, so that the first copy through it does not fetch it.
__device__ __forceinline__ void prefetch_l2(const void* at) { asm volatile("prefetch.global.L2 [%0];\n" ::"l"(at)); }
__device__ __forceinline__ void prefetch_tensormap(const void* map) {
  asm volatile("prefetch.tensormap [%0];\n" ::"l"(map) : "memory");
}
// The issuing thread's bulk groups have finished reading shared memory / have completed.
__device__ __forceinline__ void bulk_wait_read() { asm volatile("cp.async.bulk.wait_group.read 0;\n" ::: "memory"); }
__device__ __forceinline__ void bulk_wait() { asm volatile("cp.async.bulk.wait_group 0;\n" ::: "memory"); }
// The lane and the thread index read from their special registers here (volatile: not hoisted), so
// that what is derived from them is recomputed where it is used rather than kept live across a
// persistent kernel's item loop, where ptxas may spill it (the two-items forward's staging
// addresses were reloaded from local memory in every epilogue).
__device__ __forceinline__ int lane_here() {
  int v;
  asm volatile("mov.u32 %0, %%laneid;\n" : "=r"(v));
  return v;
}
__device__ __forceinline__ int tid_here() {
  int v;
  asm volatile("mov.u32 %0, %%tid.x;\n" : "=r"(v));
  return v;
}
// Four 8 x 8 matrices of 16-bit values from the mma fragments r0..r3 (lane l: row l / 4, columns
// 2 (l % 4) and 2 (l % 4) + 1 of each) to shared memory; lane l gives the address of row l % 8 of
// matrix l / 8.
__device__ __forceinline__ void stmatrix_x4(uint32_t at, uint32_t r0, uint32_t r1, uint32_t r2, uint32_t r3) {
  asm volatile("stmatrix.sync.aligned.m8n8.x4.shared.b16 [%0], {%1, %2, %3, %4};\n" ::"r"(at), "r"(r0), "r"(r1),
               "r"(r2), "r"(r3)
               : "memory");
}
__device__ __forceinline__ void named_sync(int id, int threads) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}
__device__ __forceinline__ void named_arrive(int id, int threads) {
  asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}

// Re-balances the register file between warpgroups (all warps of a warpgroup execute it).
template <int N>
__device__ __forceinline__ void regs_increase() {
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(N));
}
template <int N>
__device__ __forceinline__ void regs_decrease() {
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(N));
}

template <int N, typename T>
struct Wgmma;

#include "wgmma.inc"

}  // namespace dilated_sparse::cuda::sm90
