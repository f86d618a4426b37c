// Hopper (sm_90a) kernels: forward, dQ and dK/dV over the same tile lists, token rules and work
// decoding as the mma.sync kernels of kernels.cuh, with the matrix products on warpgroup MMA
// (wgmma.mma_async) reading 128-byte-swizzled shared tiles (sm90.cuh).
//
// Each consumer warpgroup (4 warps, 128 threads) owns 64 rows of the CTA's primary tile; a CTA has
// kWG of them. Secondary tiles stream through a cp.async ring of kSm90Stages tiles. Three schedules
// (Sm90Sched, used by all three kernels):
//  - lockstep: every thread loads; a CTA barrier per tile publishes the tile and frees the stage
//    after next; the product that consumes the probabilities (P V, dS K, P^T dO, dS^T Q) is left in
//    flight while the next tile's scores are issued.
//  - overlap: lockstep, plus the element-wise work of tile j+1 runs while tile j's last product is
//    on the tensor cores (FlashAttention-3's intra-warpgroup pipelining).
//  - ping-pong (the defaults): a producer warpgroup loads through full/empty mbarriers and hands its
//    registers to the consumers (setmaxnreg); the two consumer warpgroups take turns issuing
//    products (named barriers), so one's softmax runs during the other's products (FA3 ping-pong).
//
// Compiled to real code only for sm_90a (__CUDA_ARCH_FEAT_SM90_ALL); other targets get a stub that
// traps, and the host never picks these kernels there (attention.cu: pick()).
#pragma once

#include <type_traits>

#include "kernels.cuh"
#include "sm90.cuh"

namespace dilated_sparse::cuda {

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define DS_SM90_BODY 1
#else
#define DS_SM90_BODY 0
#endif

constexpr int kSm90Stages = 3;

// Schedules (see the top of this file).
enum Sm90Sched {
  kSchedLockstep = 0,  // every thread loads; one CTA barrier per key tile
  kSchedOverlap = 1,   // lockstep + the softmax of tile j+1 overlaps P_j V_j (FA3 intra-warpgroup)
  kSchedPingPong = 2,  // a producer warpgroup loads through mbarriers; two warpgroups take turns on
                       // the tensor cores, so one's softmax runs during the other's products (FA3);
                       // the producer gives registers to the consumers (setmaxnreg)
};

// fwd / dQ: kWG warpgroups of 64 query rows, kBN keys per step.
template <int kD, int kWG_, int kBN_, int kSched = kSchedLockstep>
struct FwdSm90Cfg {
  static constexpr int kWG = kWG_;
  static constexpr int kBM = 64 * kWG_;
  static constexpr int kBN = kBN_;
  static constexpr int kConsumers = 128 * kWG_;
  static constexpr int kThreads = kConsumers + (kSched == kSchedPingPong ? 128 : 0);
  static constexpr int kQBytes = kBM * kD * 2;
  static constexpr int kKVBytes = kBN * kD * 2;
  // + 1024 alignment slack (+ 64 bytes of mbarriers)
  static constexpr int kSmem = kQBytes + 2 * kSm90Stages * kKVBytes + 1024 + (kSched == kSchedPingPong ? 64 : 0);
};

template <int kD, int kWG_, int kBN_, int kSched = kSchedLockstep>
struct DqSm90Cfg {
  static constexpr int kWG = kWG_;
  static constexpr int kBM = 64 * kWG_;
  static constexpr int kBN = kBN_;
  static constexpr int kConsumers = 128 * kWG_;
  static constexpr int kThreads = kConsumers + (kSched == kSchedPingPong ? 128 : 0);
  static constexpr int kQBytes = kBM * kD * 2;
  static constexpr int kKVBytes = kBN * kD * 2;
  // Ping-pong releases stages through mbarriers and runs with two when three do not fit (128 keys
  // at D128); the other schedules need three.
  static constexpr int kStages =
      kSched == kSchedPingPong && 2 * kQBytes + 2 * kSm90Stages * kKVBytes + 1088 > 232448 ? 2 : kSm90Stages;
  static constexpr int kSmem = 2 * kQBytes + 2 * kStages * kKVBytes + 1024 + (kSched == kSchedPingPong ? 64 : 0);
  static_assert(kSmem <= 232448, "dQ tile does not fit in shared memory");
};

// dK/dV: kWG warpgroups of 64 keys, kBM queries per step.
template <int kD, int kWG_, int kBM_, int kSched = kSchedLockstep>
struct DkvSm90Cfg {
  static constexpr int kWG = kWG_;
  static constexpr int kBN = 64 * kWG_;
  static constexpr int kBM = kBM_;
  static constexpr int kConsumers = 128 * kWG_;
  static constexpr int kThreads = kConsumers + (kSched == kSchedPingPong ? 128 : 0);
  static constexpr int kKVBytes = kBN * kD * 2;
  static constexpr int kQBytes = kBM * kD * 2;
  // Q, dO, lse, Delta; rounded up so that every stage's tiles start on a 1024-byte boundary.
  static constexpr int kStageBytes = (2 * kQBytes + 2 * kBM * 4 + 1023) / 1024 * 1024;
  static constexpr int kSmem = 2 * kKVBytes + kSm90Stages * kStageBytes + 1024 + (kSched == kSchedPingPong ? 64 : 0);
};

__device__ __forceinline__ uint32_t align1024(uint32_t a) { return (a + 1023u) & ~1023u; }

// Per-element token rules and layout membership on one warp's 16 x (8 kN) accumulator tile whose
// rows are primary positions (queries: kTransposed = false) or keys (kTransposed = true).
template <int kN, bool kTransposed>
__device__ __forceinline__ void mask_tile(float (&S)[kN][4], const Rules& R, const TileList& tl,
                                          uint64_t msk, int row_tile0, int row_local0, int col_tile0,
                                          int g, int t4, float fill) {
#pragma unroll
  for (int nt = 0; nt < kN; ++nt)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int rl = row_local0 + g + (e >> 1) * 8;
      const int cl = nt * 8 + 2 * t4 + (e & 1);
      const bool ok = kTransposed ? R.ok(col_tile0 + cl, row_tile0 + rl) && member(msk, rl, cl, tl)
                                  : R.ok(row_tile0 + rl, col_tile0 + cl) && member(msk, rl, cl, tl);
      if (!ok) S[nt][e] = fill;
    }
}

// ---------------------------------------------------------------------------------------------
// Forward
// ---------------------------------------------------------------------------------------------

// kSched (Sm90Sched): lockstep: per key tile, S = Q K^T, wait, softmax, then P V left in flight.
// overlap: the scores of tile j+1 and P_j V_j are issued together and the softmax of tile j+1 runs
// while P_j V_j is on the tensor cores; the probabilities alternate between two register sets (the
// loop is unrolled by two). Ping-pong: see Sm90Sched.
template <typename T, int kD, int kWG, int kBN, int kSched>
__global__ void __launch_bounds__(FwdSm90Cfg<kD, kWG, kBN, kSched>::kThreads, 1)
    fwd_sm90_kernel(const __grid_constant__ Params p) {
#if DS_SM90_BODY
  using Cfg = FwdSm90Cfg<kD, kWG, kBN, kSched>;
  constexpr int kBM = Cfg::kBM, kNT = Cfg::kConsumers;
  static_assert(kSched != kSchedPingPong || kWG == 2, "ping-pong needs two warpgroups");
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const uint32_t sQ = align1024(smem_u32(smem_raw));
  const uint32_t sK0 = sQ + Cfg::kQBytes;
  const uint32_t sV0 = sK0 + kSm90Stages * Cfg::kKVBytes;
  const uint32_t bar_full = sV0 + kSm90Stages * Cfg::kKVBytes;  // [stages] mbarriers (kPingPong)
  const uint32_t bar_empty = bar_full + 8 * kSm90Stages;

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane / 4, t4 = lane % 4;
  const int wg = warp / 4;
  const int wrow = warp * 16;  // this warp's first row in the tile
  int s, t, b, h;
  decode_item(p, blockIdx.x, s, t, b, h);
  const int hk = h / p.G;
  const int m0 = t * kBM;
  const T* qg = static_cast<const T*>(p.q) + b * p.q_sb + h * p.q_sh;
  const T* kg = static_cast<const T*>(p.k) + b * p.k_sb + hk * p.k_sh;
  const T* vg = static_cast<const T*>(p.v) + b * p.v_sb + hk * p.v_sh;
  const Rules R = make_rules(p, b);
  Entries E = make_entries(p.tl, s, t);
  int e0 = 0, slot = -1;
  if (p.tl.work != nullptr) {  // a piece of a split row: entries [e0, e1), partial result to `slot`
    const int4 w = p.tl.work[blockIdx.x / p.tl.rep];
    e0 = w.y;
    E.n = w.z;
    slot = w.w;
  }
  const uint64_t full = p.tl.full;

  auto find = [&](int from, int& kt, uint64_t& m, int& st) -> int {
    for (int i = from; i < E.n; ++i) {
      E.get(i, kt, m);
      st = pair_state(R, m0, kBM, kt * kBN, kBN, m, full);
      if (st != 0) return i;
    }
    return E.n;
  };

  int kt = 0, state = 0, stage = 0;
  uint64_t msk = 0;
  int it = find(e0, kt, msk, state);
  if constexpr (kSched == kSchedPingPong) {
    if (tid == 0) {
      for (int i = 0; i < kSm90Stages; ++i) {
        sm90::mbar_init(bar_full + 8 * i, 128);
        sm90::mbar_init(bar_empty + 8 * i, kNT);
      }
    }
    __syncthreads();
    if (wg == kWG) {  // producer warpgroup: Q, then every key tile, kSm90Stages ahead at most
      sm90::regs_decrease<24>();
      const int ptid = tid - kNT;
      sm90::load_tile<T, kBM, kD, 128>(sQ, qg, p.q_ss, m0, p.Sq, p.D, ptid);
      for (int j = 0; it < E.n; ++j) {
        const int st = j % kSm90Stages;
        if (j >= kSm90Stages) sm90::mbar_wait(bar_empty + 8 * st, (j / kSm90Stages - 1) & 1);
        sm90::load_tile<T, kBN, kD, 128>(sK0 + st * Cfg::kKVBytes, kg, p.k_ss, kt * kBN, p.Sk, p.D, ptid);
        sm90::load_tile<T, kBN, kD, 128>(sV0 + st * Cfg::kKVBytes, vg, p.v_ss, kt * kBN, p.Sk, p.D, ptid);
        sm90::cp_async_arrive(bar_full + 8 * st);
        it = find(it + 1, kt, msk, state);
      }
      cp_async_wait<0>();
      return;
    }
    sm90::regs_increase<240>();
  } else {
    sm90::load_tile<T, kBM, kD, kNT>(sQ, qg, p.q_ss, m0, p.Sq, p.D, tid);
    if (it < E.n) {
      sm90::load_tile<T, kBN, kD, kNT>(sK0, kg, p.k_ss, kt * kBN, p.Sk, p.D, tid);
      sm90::load_tile<T, kBN, kD, kNT>(sV0, vg, p.v_ss, kt * kBN, p.Sk, p.D, tid);
    }
    cp_async_commit();
  }

  float acc[kD / 8][4], S[kBN / 8][4];
#pragma unroll
  for (int i = 0; i < kD / 8; ++i) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.f;
#pragma unroll
  for (int i = 0; i < kBN / 8; ++i) S[i][0] = S[i][1] = S[i][2] = S[i][3] = 0.f;
  float mrow[2] = {-INFINITY, -INFINITY}, lrow[2] = {0.f, 0.f};
  const float sl2 = p.scale_log2;
  uint32_t P[2][kBN / 16][4];

  // Tile `it` (in `stage`) has landed for every thread; the stage after it is free (its last
  // readers were retired before this barrier): fetch the next tile there and advance the cursor
  // fields *_n.
  int nx = E.n, kt_n = 0, state_n = 0;
  uint64_t msk_n = 0;
  auto wait_and_prefetch = [&]() {
    cp_async_wait<0>();
    sm90::fence_async_smem();
    __syncthreads();
    nx = find(it + 1, kt_n, msk_n, state_n);
    if (nx < E.n) {
      const int st = stage + 1 == kSm90Stages ? 0 : stage + 1;
      sm90::load_tile<T, kBN, kD, kNT>(sK0 + st * Cfg::kKVBytes, kg, p.k_ss, kt_n * kBN, p.Sk, p.D, tid);
      sm90::load_tile<T, kBN, kD, kNT>(sV0 + st * Cfg::kKVBytes, vg, p.v_ss, kt_n * kBN, p.Sk, p.D, tid);
    }
    cp_async_commit();
  };
  auto advance = [&]() {
    stage = stage + 1 == kSm90Stages ? 0 : stage + 1;
    it = nx;
    kt = kt_n;
    msk = msk_n;
    state = state_n;
  };
  // S = Q K^T of the tile in `stage` (this warpgroup's 64 rows x kBN keys).
  auto issue_s = [&]() {
    const uint32_t sK = sK0 + stage * Cfg::kKVBytes;
    sm90::fence_regs(S);
    sm90::fence();
#pragma unroll
    for (int kk = 0; kk < kD / 16; ++kk) {
      sm90::Wgmma<kBN, T>::template ss<0>(S, sm90::desc_k<kBM>(sQ, wg * 64, kk),
                                          sm90::desc_k<kBN>(sK, 0, kk), kk > 0 ? 1 : 0);
    }
    sm90::commit();
  };
  // O += P V with the V tile of stage `st`.
  auto issue_pv = [&](const uint32_t (&pa)[kBN / 16][4], int st) {
    const uint32_t sV = sV0 + st * Cfg::kKVBytes;
    sm90::fence_regs(acc);
    sm90::fence();
#pragma unroll
    for (int kk = 0; kk < kBN / 16; ++kk) {
      sm90::Wgmma<kD, T>::template rs<1>(acc, pa[kk], sm90::desc_mn<kBN>(sV, kk), 1);
    }
    sm90::commit();
  };
  // Online softmax of S (log2 domain): masks, updates the running max and sum, writes the
  // probabilities to pa and the factor the output rows must be rescaled by to corr.
  auto softmax = [&](uint32_t (&pa)[kBN / 16][4], float (&corr)[2]) {
    if (state == 2) mask_tile<kBN / 8, false>(S, R, p.tl, msk, m0, wrow, kt * kBN, g, t4, -INFINITY);
    float mx[2] = {mrow[0], mrow[1]};
#pragma unroll
    for (int nt = 0; nt < kBN / 8; ++nt) {
      mx[0] = fmaxf(mx[0], fmaxf(S[nt][0] * sl2, S[nt][1] * sl2));
      mx[1] = fmaxf(mx[1], fmaxf(S[nt][2] * sl2, S[nt][3] * sl2));
    }
    float base[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      mx[r] = quad_max(mx[r]);
      base[r] = mx[r] == -INFINITY ? 0.f : mx[r];
      corr[r] = fast_exp2(mrow[r] - base[r]);
      mrow[r] = mx[r];
      lrow[r] *= corr[r];
    }
#pragma unroll
    for (int nt = 0; nt < kBN / 8; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        S[nt][e] = fast_exp2(fmaf(S[nt][e], sl2, -base[e >> 1]));
        lrow[e >> 1] += S[nt][e];
      }
    }
#pragma unroll
    for (int kk = 0; kk < kBN / 16; ++kk) sm90::to_a_frag<T>(pa[kk], S, kk);
  };
  auto rescale = [&](const float (&corr)[2]) {
#pragma unroll
    for (int i = 0; i < kD / 8; ++i) {
      acc[i][0] *= corr[0];
      acc[i][1] *= corr[0];
      acc[i][2] *= corr[1];
      acc[i][3] *= corr[1];
    }
  };

  if constexpr (kSched == kSchedPingPong) {
    // Turns on the tensor cores alternate between the warpgroups through named barriers 1 + wg
    // (256 threads: one warpgroup syncs, the other arrives); warpgroup 0 goes first. A turn issues
    // the previous tile's P V and this tile's scores.
    const int other = 1 - wg;
    int j = 0, pv_stage = 0;
    if (wg == 1 && it < E.n) sm90::named_arrive(1, kNT);
    while (it < E.n) {
      sm90::mbar_wait(bar_full + 8 * stage, (j / kSm90Stages) & 1);
      sm90::fence_async_smem();
      sm90::named_sync(1 + wg, kNT);
      if (j > 0) issue_pv(P[0], pv_stage);
      issue_s();
      sm90::named_arrive(1 + other, kNT);
      sm90::wait<0>();
      sm90::fence_regs(S);
      sm90::fence_regs(acc);
      if (j > 0) sm90::mbar_arrive(bar_empty + 8 * pv_stage);  // its K and V are no longer read
      float corr[2];
      softmax(P[0], corr);
      rescale(corr);
      pv_stage = stage;
      ++j;
      stage = stage + 1 == kSm90Stages ? 0 : stage + 1;
      it = find(it + 1, kt, msk, state);
    }
    if (j > 0) {
      sm90::named_sync(1 + wg, kNT);
      issue_pv(P[0], pv_stage);
      if (wg == 0) sm90::named_arrive(1 + other, kNT);  // warpgroup 1's last turn
    }
  } else if constexpr (kSched == kSchedLockstep) {
    while (it < E.n) {
      wait_and_prefetch();
      issue_s();
      sm90::wait<0>();  // also retires the previous tile's P V
      sm90::fence_regs(S);
      sm90::fence_regs(acc);
      float corr[2];
      softmax(P[0], corr);
      rescale(corr);
      issue_pv(P[0], stage);
      advance();
    }
  } else if (it < E.n) {
    wait_and_prefetch();
    issue_s();
    sm90::wait<0>();
    sm90::fence_regs(S);
    float corr[2];
    softmax(P[0], corr);  // acc is still zero: no rescale
    int pv_stage = stage;
    advance();
    // One step: P[c] holds the probabilities of the tile in pv_stage; `it` is the next tile.
    auto step = [&](auto parity) -> bool {
      constexpr int c = decltype(parity)::value;
      if (it >= E.n) {
        issue_pv(P[c], pv_stage);
        return false;
      }
      wait_and_prefetch();
      issue_s();
      issue_pv(P[c], pv_stage);
      sm90::wait<1>();  // the scores; P V may still run
      sm90::fence_regs(S);
      float cr[2];
      softmax(P[1 - c], cr);
      sm90::wait<0>();
      sm90::fence_regs(acc);
      rescale(cr);
      pv_stage = stage;
      advance();
      return true;
    };
    while (step(std::integral_constant<int, 0>{}) && step(std::integral_constant<int, 1>{})) {
    }
  }
  sm90::wait<0>();
  sm90::fence_regs(acc);
  cp_async_wait<0>();

  if (slot >= 0) {  // split row: normalised partial output and its lse, merged by merge_kernel
    const int64_t ws = static_cast<int64_t>(slot) * p.tl.rep + static_cast<int>(blockIdx.x % p.tl.rep);
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const float l = quad_sum(lrow[r]);
      const float inv = l > 0.f ? 1.f / l : 0.f;
      const int il = wrow + g + r * 8;
      float* orow = p.opart + (ws * kBM + il) * p.D;
#pragma unroll
      for (int nt = 0; nt < kD / 8; ++nt) {
        const int d = nt * 8 + 2 * t4;
        if (d < p.D) *reinterpret_cast<float2*>(orow + d) = make_float2(acc[nt][2 * r] * inv, acc[nt][2 * r + 1] * inv);
      }
      if (t4 == 0) p.lpart[ws * kBM + il] = l > 0.f ? (mrow[r] + __log2f(l)) * kLn2 : -INFINITY;
    }
    return;
  }
  T* og = static_cast<T*>(p.out);
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const float l = quad_sum(lrow[r]);
    const float inv = l > 0.f ? 1.f / l : 0.f;
    const int i = m0 + wrow + g + r * 8;
    if (i < p.Sq) {
      T* orow = og + ((static_cast<int64_t>(b) * p.Sq + i) * p.H + h) * p.D;
#pragma unroll
      for (int nt = 0; nt < kD / 8; ++nt) {
        const int d = nt * 8 + 2 * t4;
        if (d < p.D) store2(orow + d, acc[nt][2 * r] * inv, acc[nt][2 * r + 1] * inv);
      }
      if (t4 == 0) {
        p.lse_out[(static_cast<int64_t>(b) * p.H + h) * p.Sq + i] =
            l > 0.f ? (mrow[r] + __log2f(l)) * kLn2 : -INFINITY;
      }
    }
  }
#else
  __trap();
#endif
}

// ---------------------------------------------------------------------------------------------
// Backward: dQ over the CSR rows
// ---------------------------------------------------------------------------------------------

// kSched (Sm90Sched): overlap: the scores of tile j+1 are issued before dS_j K, and the element-wise
// work of tile j+1 runs while dS_j K is on the tensor cores (two register sets for dS, loop unrolled by
// two). Ping-pong: a producer warpgroup loads; a turn issues dS_{j-1} K and tile j's two products.
template <typename T, int kD, int kWG, int kBN, int kSched>
__global__ void __launch_bounds__(DqSm90Cfg<kD, kWG, kBN, kSched>::kThreads, 1)
    dq_sm90_kernel(const __grid_constant__ Params p) {
#if DS_SM90_BODY
  using Cfg = DqSm90Cfg<kD, kWG, kBN, kSched>;
  constexpr int kBM = Cfg::kBM, kNT = Cfg::kConsumers;
  constexpr bool kOverlap = kSched == kSchedOverlap;
  static_assert(kSched != kSchedPingPong || kWG == 2, "ping-pong needs two warpgroups");
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const uint32_t sQ = align1024(smem_u32(smem_raw));
  const uint32_t sdO = sQ + Cfg::kQBytes;
  const uint32_t sK0 = sdO + Cfg::kQBytes;
  const uint32_t sV0 = sK0 + Cfg::kStages * Cfg::kKVBytes;
  const uint32_t bar_full = sV0 + Cfg::kStages * Cfg::kKVBytes;  // [stages] mbarriers (ping-pong)
  const uint32_t bar_empty = bar_full + 8 * Cfg::kStages;

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane / 4, t4 = lane % 4;
  const int wg = warp / 4;
  const int wrow = warp * 16;
  int s, t, b, h;
  decode_item(p, blockIdx.x, s, t, b, h);
  const int hk = h / p.G;
  const int m0 = t * kBM;
  const T* qg = static_cast<const T*>(p.q) + b * p.q_sb + h * p.q_sh;
  const T* dog = static_cast<const T*>(p.dout) + b * p.do_sb + h * p.do_sh;
  const T* kg = static_cast<const T*>(p.k) + b * p.k_sb + hk * p.k_sh;
  const T* vg = static_cast<const T*>(p.v) + b * p.v_sb + hk * p.v_sh;
  const Rules R = make_rules(p, b);
  const Entries E = make_entries(p.tl, s, t);
  const uint64_t full = p.tl.full;

  auto find = [&](int from, int& kt, uint64_t& m, int& st) -> int {
    for (int i = from; i < E.n; ++i) {
      E.get(i, kt, m);
      st = pair_state(R, m0, kBM, kt * kBN, kBN, m, full);
      if (st != 0) return i;
    }
    return E.n;
  };

  int kt = 0, state = 0, stage = 0;
  uint64_t msk = 0;
  int it = find(0, kt, msk, state);
  if constexpr (kSched == kSchedPingPong) {
    if (tid == 0) {
      for (int i = 0; i < Cfg::kStages; ++i) {
        sm90::mbar_init(bar_full + 8 * i, 128);
        sm90::mbar_init(bar_empty + 8 * i, kNT);
      }
    }
    __syncthreads();
    if (wg == kWG) {  // producer warpgroup: Q and dO, then every key tile, kStages ahead at most
      sm90::regs_decrease<24>();
      const int ptid = tid - kNT;
      sm90::load_tile<T, kBM, kD, 128>(sQ, qg, p.q_ss, m0, p.Sq, p.D, ptid);
      sm90::load_tile<T, kBM, kD, 128>(sdO, dog, p.do_ss, m0, p.Sq, p.D, ptid);
      for (int j = 0; it < E.n; ++j) {
        const int st = j % Cfg::kStages;
        if (j >= Cfg::kStages) sm90::mbar_wait(bar_empty + 8 * st, (j / Cfg::kStages - 1) & 1);
        sm90::load_tile<T, kBN, kD, 128>(sK0 + st * Cfg::kKVBytes, kg, p.k_ss, kt * kBN, p.Sk, p.D, ptid);
        sm90::load_tile<T, kBN, kD, 128>(sV0 + st * Cfg::kKVBytes, vg, p.v_ss, kt * kBN, p.Sk, p.D, ptid);
        sm90::cp_async_arrive(bar_full + 8 * st);
        it = find(it + 1, kt, msk, state);
      }
      cp_async_wait<0>();
      return;
    }
    sm90::regs_increase<240>();
  } else {
    sm90::load_tile<T, kBM, kD, kNT>(sQ, qg, p.q_ss, m0, p.Sq, p.D, tid);
    sm90::load_tile<T, kBM, kD, kNT>(sdO, dog, p.do_ss, m0, p.Sq, p.D, tid);
    if (it < E.n) {
      sm90::load_tile<T, kBN, kD, kNT>(sK0, kg, p.k_ss, kt * kBN, p.Sk, p.D, tid);
      sm90::load_tile<T, kBN, kD, kNT>(sV0, vg, p.v_ss, kt * kBN, p.Sk, p.D, tid);
    }
    cp_async_commit();
  }

  const int64_t rowbase = (static_cast<int64_t>(b) * p.H + h) * p.Sq;
  float lse2[2], dl[2] = {0.f, 0.f};
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int i = m0 + wrow + g + r * 8;
    lse2[r] = i < p.Sq ? lse_to_log2(p.lse[rowbase + i]) : INFINITY;
  }
  // Delta = rowsum(dO * O) of this warp's 16 rows, fused here (each (b, h, query tile) has exactly
  // one dQ CTA) and published for the dK/dV kernel that runs next on the stream.
  {
    const T* og = static_cast<const T*>(p.o) + b * p.o_sb + h * p.o_sh;
#pragma unroll
    for (int rr = 0; rr < 16; ++rr) {
      const int i = m0 + wrow + rr;
      float sum = 0.f;
#pragma unroll
      for (int c = 0; c < kD / 64; ++c) {
        const int d = 2 * lane + 64 * c;
        if (i < p.Sq && d < p.D) {
          const uint32_t ov = *reinterpret_cast<const uint32_t*>(og + static_cast<int64_t>(i) * p.o_ss + d);
          const uint32_t dv = *reinterpret_cast<const uint32_t*>(dog + static_cast<int64_t>(i) * p.do_ss + d);
          const T* oe = reinterpret_cast<const T*>(&ov);
          const T* de = reinterpret_cast<const T*>(&dv);
          sum += to_float(oe[0]) * to_float(de[0]) + to_float(oe[1]) * to_float(de[1]);
        }
      }
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, off);
      if (rr == g) dl[0] = sum;
      if (rr == g + 8) dl[1] = sum;
      if (lane == 0 && i < p.Sq) p.delta[rowbase + i] = sum;
    }
  }
  float acc[kD / 8][4], S[kBN / 8][4], dP[kBN / 8][4];
#pragma unroll
  for (int i = 0; i < kD / 8; ++i) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.f;
#pragma unroll
  for (int i = 0; i < kBN / 8; ++i) {
    S[i][0] = S[i][1] = S[i][2] = S[i][3] = 0.f;
    dP[i][0] = dP[i][1] = dP[i][2] = dP[i][3] = 0.f;
  }
  const float sl2 = p.scale_log2;
  uint32_t sa[kOverlap ? 2 : 1][kBN / 16][4];

  int nx = E.n, kt_n = 0, state_n = 0;
  uint64_t msk_n = 0;
  auto wait_and_prefetch = [&]() {
    cp_async_wait<0>();
    sm90::fence_async_smem();
    __syncthreads();
    nx = find(it + 1, kt_n, msk_n, state_n);
    if (nx < E.n) {
      const int st = stage + 1 == Cfg::kStages ? 0 : stage + 1;
      sm90::load_tile<T, kBN, kD, kNT>(sK0 + st * Cfg::kKVBytes, kg, p.k_ss, kt_n * kBN, p.Sk, p.D, tid);
      sm90::load_tile<T, kBN, kD, kNT>(sV0 + st * Cfg::kKVBytes, vg, p.v_ss, kt_n * kBN, p.Sk, p.D, tid);
    }
    cp_async_commit();
  };
  auto advance = [&]() {
    stage = stage + 1 == Cfg::kStages ? 0 : stage + 1;
    it = nx;
    kt = kt_n;
    msk = msk_n;
    state = state_n;
  };
  // S = Q K^T, dP = dO V^T of the tile in `stage`.
  auto issue_s = [&]() {
    const uint32_t sK = sK0 + stage * Cfg::kKVBytes, sV = sV0 + stage * Cfg::kKVBytes;
    sm90::fence_regs(S);
    sm90::fence_regs(dP);
    sm90::fence();
#pragma unroll
    for (int kk = 0; kk < kD / 16; ++kk) {
      sm90::Wgmma<kBN, T>::template ss<0>(S, sm90::desc_k<kBM>(sQ, wg * 64, kk),
                                          sm90::desc_k<kBN>(sK, 0, kk), kk > 0 ? 1 : 0);
    }
#pragma unroll
    for (int kk = 0; kk < kD / 16; ++kk) {
      sm90::Wgmma<kBN, T>::template ss<0>(dP, sm90::desc_k<kBM>(sdO, wg * 64, kk),
                                          sm90::desc_k<kBN>(sV, 0, kk), kk > 0 ? 1 : 0);
    }
    sm90::commit();
  };
  // dS = P (dP - Delta) with P recomputed from lse, as A fragments.
  auto make_ds = [&](uint32_t (&a)[kBN / 16][4]) {
#pragma unroll
    for (int nt = 0; nt < kBN / 8; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) S[nt][e] = fast_exp2(fmaf(S[nt][e], sl2, -lse2[e >> 1]));
    if (state == 2) mask_tile<kBN / 8, false>(S, R, p.tl, msk, m0, wrow, kt * kBN, g, t4, 0.f);
#pragma unroll
    for (int nt = 0; nt < kBN / 8; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) S[nt][e] *= dP[nt][e] - dl[e >> 1];
#pragma unroll
    for (int kk = 0; kk < kBN / 16; ++kk) sm90::to_a_frag<T>(a[kk], S, kk);
  };
  // dQ += dS K with the K tile of stage `st`.
  auto issue_dq = [&](const uint32_t (&a)[kBN / 16][4], int st) {
    const uint32_t sK = sK0 + st * Cfg::kKVBytes;
    sm90::fence_regs(acc);
    sm90::fence();
#pragma unroll
    for (int kk = 0; kk < kBN / 16; ++kk) {
      sm90::Wgmma<kD, T>::template rs<1>(acc, a[kk], sm90::desc_mn<kBN>(sK, kk), 1);
    }
    sm90::commit();
  };

  if constexpr (kSched == kSchedPingPong && kBN >= 128 && kD >= 128) {
    // Two turns per key tile (as in dkv_sm90_kernel): at D128, 128-key scores leave no room for the
    // previous tile's dS next to them.
    const int other = 1 - wg;
    int j = 0;
    if (wg == 1 && it < E.n) sm90::named_arrive(1, kNT);
    while (it < E.n) {
      sm90::mbar_wait(bar_full + 8 * stage, (j / Cfg::kStages) & 1);
      sm90::fence_async_smem();
      sm90::named_sync(1 + wg, kNT);
      issue_s();
      sm90::named_arrive(1 + other, kNT);
      sm90::wait<0>();
      sm90::fence_regs(S);
      sm90::fence_regs(dP);
      make_ds(sa[0]);
      const int nxt = find(it + 1, kt_n, msk_n, state_n);
      sm90::named_sync(1 + wg, kNT);
      issue_dq(sa[0], stage);
      if (wg == 0 || nxt < E.n) sm90::named_arrive(1 + other, kNT);  // not after warpgroup 1's last turn
      sm90::wait<0>();
      sm90::fence_regs(acc);
      sm90::mbar_arrive(bar_empty + 8 * stage);  // its K and V are no longer read
      ++j;
      stage = stage + 1 == Cfg::kStages ? 0 : stage + 1;
      it = nxt;
      kt = kt_n;
      msk = msk_n;
      state = state_n;
    }
  } else if constexpr (kSched == kSchedPingPong) {
    const int other = 1 - wg;
    int j = 0, dq_stage = 0;
    if (wg == 1 && it < E.n) sm90::named_arrive(1, kNT);
    while (it < E.n) {
      sm90::mbar_wait(bar_full + 8 * stage, (j / Cfg::kStages) & 1);
      sm90::fence_async_smem();
      sm90::named_sync(1 + wg, kNT);
      if (j > 0) issue_dq(sa[0], dq_stage);
      issue_s();
      sm90::named_arrive(1 + other, kNT);
      sm90::wait<0>();
      sm90::fence_regs(S);
      sm90::fence_regs(dP);
      if (j > 0) sm90::mbar_arrive(bar_empty + 8 * dq_stage);  // its K and V are no longer read
      make_ds(sa[0]);
      dq_stage = stage;
      ++j;
      stage = stage + 1 == Cfg::kStages ? 0 : stage + 1;
      it = find(it + 1, kt, msk, state);
    }
    if (j > 0) {
      sm90::named_sync(1 + wg, kNT);
      issue_dq(sa[0], dq_stage);
      if (wg == 0) sm90::named_arrive(1 + other, kNT);  // warpgroup 1's last turn
    }
  } else if constexpr (!kOverlap) {
    while (it < E.n) {
      wait_and_prefetch();
      issue_s();
      sm90::wait<0>();  // also retires the previous tile's dS K
      sm90::fence_regs(S);
      sm90::fence_regs(dP);
      make_ds(sa[0]);
      issue_dq(sa[0], stage);
      advance();
    }
  } else if (it < E.n) {
    wait_and_prefetch();
    issue_s();
    sm90::wait<0>();
    sm90::fence_regs(S);
    sm90::fence_regs(dP);
    make_ds(sa[0]);
    int dq_stage = stage;
    advance();
    auto step = [&](auto parity) -> bool {
      constexpr int c = decltype(parity)::value;
      if (it >= E.n) {
        issue_dq(sa[c], dq_stage);
        return false;
      }
      wait_and_prefetch();
      issue_s();
      issue_dq(sa[c], dq_stage);
      sm90::wait<1>();  // the scores; dS K may still run
      sm90::fence_regs(S);
      sm90::fence_regs(dP);
      make_ds(sa[1 - c]);
      sm90::wait<0>();  // its K stage is refilled after the next barrier
      dq_stage = stage;
      advance();
      return true;
    };
    while (step(std::integral_constant<int, 0>{}) && step(std::integral_constant<int, 1>{})) {
    }
  }
  sm90::wait<0>();
  sm90::fence_regs(acc);
  cp_async_wait<0>();

  T* dqg = static_cast<T*>(p.dq);
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int i = m0 + wrow + g + r * 8;
    if (i < p.Sq) {
      T* row = dqg + ((static_cast<int64_t>(b) * p.Sq + i) * p.H + h) * p.D;
#pragma unroll
      for (int nt = 0; nt < kD / 8; ++nt) {
        const int d = nt * 8 + 2 * t4;
        if (d < p.D) store2(row + d, acc[nt][2 * r] * p.scale, acc[nt][2 * r + 1] * p.scale);
      }
    }
  }
#else
  __trap();
#endif
}

// ---------------------------------------------------------------------------------------------
// Backward: dK, dV over the CSC columns, reduced over the GQA group in registers
// ---------------------------------------------------------------------------------------------

// kSched (Sm90Sched): overlap: as dq_sm90_kernel, with P^T dO and dS^T Q in flight during the next
// tile's element-wise work. Ping-pong: a producer warpgroup loads; a turn issues the previous tile's
// dV and dK products and this tile's two score products.
template <typename T, int kD, int kWG, int kBM, int kSched>
__global__ void __launch_bounds__(DkvSm90Cfg<kD, kWG, kBM, kSched>::kThreads, 1)
    dkv_sm90_kernel(const __grid_constant__ Params p) {
#if DS_SM90_BODY
  using Cfg = DkvSm90Cfg<kD, kWG, kBM, kSched>;
  constexpr int kBN = Cfg::kBN, kNT = Cfg::kConsumers;
  constexpr bool kOverlap = kSched == kSchedOverlap;
  constexpr bool kPing = kSched == kSchedPingPong;
  static_assert(!kPing || kWG == 2, "ping-pong needs two warpgroups");
  // Threads that issue the loads: the producer warpgroup (ping-pong) or every consumer.
  constexpr int kLoaders = kPing ? 128 : kNT;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const uint32_t sK = align1024(smem_u32(smem_raw));
  const uint32_t sV = sK + Cfg::kKVBytes;
  const uint32_t sStage0 = sV + Cfg::kKVBytes;  // [stages] {Q, dO, lse, Delta}
  const uint32_t bar_full = sStage0 + kSm90Stages * Cfg::kStageBytes;  // [stages] mbarriers (ping-pong)
  const uint32_t bar_empty = bar_full + 8 * kSm90Stages;
  // Generic pointer to the same (aligned) shared bytes, for the lse / Delta rows.
  unsigned char* const sgen = smem_raw + (sK - smem_u32(smem_raw));
  auto stage_q = [&](int st) { return sStage0 + st * Cfg::kStageBytes; };
  auto stage_do = [&](int st) { return sStage0 + st * Cfg::kStageBytes + Cfg::kQBytes; };
  auto stage_l = [&](int st) {
    return reinterpret_cast<const float*>(sgen + 2 * Cfg::kKVBytes + st * Cfg::kStageBytes + 2 * Cfg::kQBytes);
  };

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane / 4, t4 = lane % 4;
  const int wg = warp / 4;
  const int wrow = warp * 16;  // this warp's first key in the tile
  int s, t, b, h;
  decode_item(p, blockIdx.x, s, t, b, h);
  int hk;
  if (p.Lh == 1) {
    hk = h;  // decoded over the kv heads
  } else {
    if (h % p.G != 0) return;  // the group's first query head does the work
    hk = h / p.G;
  }
  const int n0 = t * kBN;
  const T* kg = static_cast<const T*>(p.k) + b * p.k_sb + hk * p.k_sh;
  const T* vg = static_cast<const T*>(p.v) + b * p.v_sb + hk * p.v_sh;
  const Rules R = make_rules(p, b);
  const uint64_t full = p.tl.full;

  const int ltid = kPing ? tid - kNT : tid;  // index among the loading threads

  // Cursor over (group member gg, entry it).
  auto find = [&](int& gg, int& it, Entries& E, int& qt, uint64_t& m, int& st) {
    while (gg < p.G) {
      for (; it < E.n; ++it) {
        E.get(it, qt, m);
        st = pair_state(R, qt * kBM, kBM, n0, kBN, m, full);
        if (st != 0) return;
      }
      ++gg;
      it = 0;
      if (gg < p.G) E = make_entries(p.tl, layout_slice(p, b, hk * p.G + gg), t);
    }
  };
  auto load_q = [&](int st, int gg, int qt) {
    const int hq = hk * p.G + gg;
    const T* qg = static_cast<const T*>(p.q) + b * p.q_sb + hq * p.q_sh;
    const T* dog = static_cast<const T*>(p.dout) + b * p.do_sb + hq * p.do_sh;
    sm90::load_tile<T, kBM, kD, kLoaders>(stage_q(st), qg, p.q_ss, qt * kBM, p.Sq, p.D, ltid);
    sm90::load_tile<T, kBM, kD, kLoaders>(stage_do(st), dog, p.do_ss, qt * kBM, p.Sq, p.D, ltid);
    const int64_t rowbase = (static_cast<int64_t>(b) * p.H + hq) * p.Sq;
    const uint32_t sl = stage_do(st) + Cfg::kQBytes;
    for (int i = ltid; i < kBM; i += kLoaders) {
      const int qi = qt * kBM + i;
      const bool pred = qi < p.Sq;
      cp_async4(sl + 4 * i, pred ? p.lse + rowbase + qi : p.lse, pred);
      cp_async4(sl + 4 * (kBM + i), pred ? p.delta + rowbase + qi : p.delta, pred);
    }
  };

  int gg = 0, it = 0, qt = 0, state = 0, stage = 0;
  uint64_t msk = 0;
  Entries E = make_entries(p.tl, layout_slice(p, b, hk * p.G), t);
  find(gg, it, E, qt, msk, state);
  if constexpr (kPing) {
    if (tid == 0) {
      for (int i = 0; i < kSm90Stages; ++i) {
        sm90::mbar_init(bar_full + 8 * i, 128);
        sm90::mbar_init(bar_empty + 8 * i, kNT);
      }
    }
    __syncthreads();
    if (wg == kWG) {  // producer warpgroup: K and V, then every query tile, kSm90Stages ahead at most
      sm90::regs_decrease<24>();
      sm90::load_tile<T, kBN, kD, 128>(sK, kg, p.k_ss, n0, p.Sk, p.D, ltid);
      sm90::load_tile<T, kBN, kD, 128>(sV, vg, p.v_ss, n0, p.Sk, p.D, ltid);
      for (int j = 0; gg < p.G; ++j) {
        const int st = j % kSm90Stages;
        if (j >= kSm90Stages) sm90::mbar_wait(bar_empty + 8 * st, (j / kSm90Stages - 1) & 1);
        load_q(st, gg, qt);
        sm90::cp_async_arrive(bar_full + 8 * st);
        ++it;
        find(gg, it, E, qt, msk, state);
      }
      cp_async_wait<0>();
      return;
    }
    sm90::regs_increase<240>();
  } else {
    sm90::load_tile<T, kBN, kD, kNT>(sK, kg, p.k_ss, n0, p.Sk, p.D, tid);
    sm90::load_tile<T, kBN, kD, kNT>(sV, vg, p.v_ss, n0, p.Sk, p.D, tid);
    if (gg < p.G) load_q(0, gg, qt);
    cp_async_commit();
  }

  float dK[kD / 8][4], dV[kD / 8][4], S[kBM / 8][4], dP[kBM / 8][4];
#pragma unroll
  for (int i = 0; i < kD / 8; ++i) {
    dK[i][0] = dK[i][1] = dK[i][2] = dK[i][3] = 0.f;
    dV[i][0] = dV[i][1] = dV[i][2] = dV[i][3] = 0.f;
  }
#pragma unroll
  for (int i = 0; i < kBM / 8; ++i) {
    S[i][0] = S[i][1] = S[i][2] = S[i][3] = 0.f;
    dP[i][0] = dP[i][1] = dP[i][2] = dP[i][3] = 0.f;
  }
  const float sl2 = p.scale_log2;
  constexpr int kBufs = kOverlap ? 2 : 1;
  uint32_t pa[kBufs][kBM / 16][4], sa[kBufs][kBM / 16][4];

  int gg_n = 0, it_n = 0, qt_n = 0, state_n = 0;
  uint64_t msk_n = 0;
  Entries E_n = E;
  auto wait_and_prefetch = [&]() {
    cp_async_wait<0>();
    sm90::fence_async_smem();
    __syncthreads();
    gg_n = gg;
    it_n = it + 1;
    E_n = E;
    find(gg_n, it_n, E_n, qt_n, msk_n, state_n);
    if (gg_n < p.G) load_q(stage + 1 == kSm90Stages ? 0 : stage + 1, gg_n, qt_n);
    cp_async_commit();
  };
  auto advance = [&]() {
    stage = stage + 1 == kSm90Stages ? 0 : stage + 1;
    gg = gg_n;
    it = it_n;
    E = E_n;
    qt = qt_n;
    msk = msk_n;
    state = state_n;
  };
  // S^T = K Q^T, dP^T = V dO^T (this warpgroup's 64 keys x kBM queries of the tile in `stage`).
  auto issue_s = [&]() {
    const uint32_t sQ = stage_q(stage), sdO = stage_do(stage);
    sm90::fence_regs(S);
    sm90::fence_regs(dP);
    sm90::fence();
#pragma unroll
    for (int kk = 0; kk < kD / 16; ++kk) {
      sm90::Wgmma<kBM, T>::template ss<0>(S, sm90::desc_k<kBN>(sK, wg * 64, kk),
                                          sm90::desc_k<kBM>(sQ, 0, kk), kk > 0 ? 1 : 0);
    }
#pragma unroll
    for (int kk = 0; kk < kD / 16; ++kk) {
      sm90::Wgmma<kBM, T>::template ss<0>(dP, sm90::desc_k<kBN>(sV, wg * 64, kk),
                                          sm90::desc_k<kBM>(sdO, 0, kk), kk > 0 ? 1 : 0);
    }
    sm90::commit();
  };
  // P^T and dS^T = P^T (dP^T - Delta) as A fragments.
  auto make_p_ds = [&](uint32_t (&ap)[kBM / 16][4], uint32_t (&as)[kBM / 16][4]) {
    const float* lrow = stage_l(stage);
    const float* drow = lrow + kBM;
#pragma unroll
    for (int nt = 0; nt < kBM / 8; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int il = nt * 8 + 2 * t4 + (e & 1);  // query (column)
        S[nt][e] = fast_exp2(fmaf(S[nt][e], sl2, -lse_to_log2(lrow[il])));
      }
    if (state == 2) mask_tile<kBM / 8, true>(S, R, p.tl, msk, n0, wrow, qt * kBM, g, t4, 0.f);
#pragma unroll
    for (int kk = 0; kk < kBM / 16; ++kk) sm90::to_a_frag<T>(ap[kk], S, kk);
#pragma unroll
    for (int nt = 0; nt < kBM / 8; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) S[nt][e] *= dP[nt][e] - drow[nt * 8 + 2 * t4 + (e & 1)];
#pragma unroll
    for (int kk = 0; kk < kBM / 16; ++kk) sm90::to_a_frag<T>(as[kk], S, kk);
  };
  // dV += P^T dO, dK += dS^T Q with the query tile of stage `st`.
  auto issue_dkv = [&](const uint32_t (&ap)[kBM / 16][4], const uint32_t (&as)[kBM / 16][4], int st) {
    sm90::fence_regs(dK);
    sm90::fence_regs(dV);
    sm90::fence();
#pragma unroll
    for (int kk = 0; kk < kBM / 16; ++kk) {
      sm90::Wgmma<kD, T>::template rs<1>(dV, ap[kk], sm90::desc_mn<kBM>(stage_do(st), kk), 1);
    }
#pragma unroll
    for (int kk = 0; kk < kBM / 16; ++kk) {
      sm90::Wgmma<kD, T>::template rs<1>(dK, as[kk], sm90::desc_mn<kBM>(stage_q(st), kk), 1);
    }
    sm90::commit();
  };

  if constexpr (kPing) {
    // Two turns per query tile (scores, then the dV / dK products), each waited for before the
    // next: the probabilities never share the register file with the next tile's scores, which
    // the dK and dV accumulators leave no room for. The other warpgroup fills the tensor cores.
    const int other = 1 - wg;
    int j = 0;
    if (wg == 1 && gg < p.G) sm90::named_arrive(1, kNT);
    while (gg < p.G) {
      sm90::mbar_wait(bar_full + 8 * stage, (j / kSm90Stages) & 1);
      sm90::fence_async_smem();
      sm90::named_sync(1 + wg, kNT);
      issue_s();
      sm90::named_arrive(1 + other, kNT);
      sm90::wait<0>();
      sm90::fence_regs(S);
      sm90::fence_regs(dP);
      make_p_ds(pa[0], sa[0]);
      ++it;
      find(gg, it, E, qt, msk, state);
      sm90::named_sync(1 + wg, kNT);
      issue_dkv(pa[0], sa[0], stage);
      if (wg == 0 || gg < p.G) sm90::named_arrive(1 + other, kNT);  // not after warpgroup 1's last turn
      sm90::wait<0>();
      sm90::fence_regs(dK);
      sm90::fence_regs(dV);
      sm90::mbar_arrive(bar_empty + 8 * stage);  // its Q, dO, lse, Delta are no longer read
      ++j;
      stage = stage + 1 == kSm90Stages ? 0 : stage + 1;
    }
  } else if constexpr (!kOverlap) {
    while (gg < p.G) {
      wait_and_prefetch();
      issue_s();
      sm90::wait<0>();  // also retires the previous tile's dV and dK products
      sm90::fence_regs(S);
      sm90::fence_regs(dP);
      make_p_ds(pa[0], sa[0]);
      issue_dkv(pa[0], sa[0], stage);
      advance();
    }
  } else if (gg < p.G) {
    wait_and_prefetch();
    issue_s();
    sm90::wait<0>();
    sm90::fence_regs(S);
    sm90::fence_regs(dP);
    make_p_ds(pa[0], sa[0]);
    int dkv_stage = stage;
    advance();
    auto step = [&](auto parity) -> bool {
      constexpr int c = decltype(parity)::value;
      if (gg >= p.G) {
        issue_dkv(pa[c], sa[c], dkv_stage);
        return false;
      }
      wait_and_prefetch();
      issue_s();
      issue_dkv(pa[c], sa[c], dkv_stage);
      sm90::wait<1>();  // the scores; the dV / dK products may still run
      sm90::fence_regs(S);
      sm90::fence_regs(dP);
      make_p_ds(pa[1 - c], sa[1 - c]);
      sm90::wait<0>();  // their Q / dO stage is refilled after the next barrier
      dkv_stage = stage;
      advance();
      return true;
    };
    while (step(std::integral_constant<int, 0>{}) && step(std::integral_constant<int, 1>{})) {
    }
  }
  sm90::wait<0>();
  sm90::fence_regs(dK);
  sm90::fence_regs(dV);
  cp_async_wait<0>();

  T* dkg = static_cast<T*>(p.dk);
  T* dvg = static_cast<T*>(p.dv);
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int j = n0 + wrow + g + r * 8;
    if (j < p.Sk) {
      const int64_t off = ((static_cast<int64_t>(b) * p.Sk + j) * p.Hkv + hk) * p.D;
#pragma unroll
      for (int nt = 0; nt < kD / 8; ++nt) {
        const int d = nt * 8 + 2 * t4;
        if (d < p.D) {
          store2(dkg + off + d, dK[nt][2 * r] * p.scale, dK[nt][2 * r + 1] * p.scale);
          store2(dvg + off + d, dV[nt][2 * r], dV[nt][2 * r + 1]);
        }
      }
    }
  }
#else
  __trap();
#endif
}

// ---------------------------------------------------------------------------------------------
// Launchers
// ---------------------------------------------------------------------------------------------

template <typename T, int kD, int kWG, int kBN, int kSched>
void launch_fwd_sm90(const Params& p, int64_t items, cudaStream_t stream) {
  using Cfg = FwdSm90Cfg<kD, kWG, kBN, kSched>;
  auto kern = &fwd_sm90_kernel<T, kD, kWG, kBN, kSched>;
  static bool done[64] = {};
  set_smem_once(done, kern, Cfg::kSmem);
  kern<<<dim3(static_cast<unsigned>(items)), Cfg::kThreads, Cfg::kSmem, stream>>>(p);
}

template <typename T, int kD, int kWG, int kBN, int kSched>
void launch_dq_sm90(const Params& p, int64_t items, cudaStream_t stream) {
  using Cfg = DqSm90Cfg<kD, kWG, kBN, kSched>;
  auto kern = &dq_sm90_kernel<T, kD, kWG, kBN, kSched>;
  static bool done[64] = {};
  set_smem_once(done, kern, Cfg::kSmem);
  kern<<<dim3(static_cast<unsigned>(items)), Cfg::kThreads, Cfg::kSmem, stream>>>(p);
}

template <typename T, int kD, int kWG, int kBM, int kSched>
void launch_dkv_sm90(const Params& p, int64_t items, cudaStream_t stream) {
  using Cfg = DkvSm90Cfg<kD, kWG, kBM, kSched>;
  auto kern = &dkv_sm90_kernel<T, kD, kWG, kBM, kSched>;
  static bool done[64] = {};
  set_smem_once(done, kern, Cfg::kSmem);
  kern<<<dim3(static_cast<unsigned>(items), 1), Cfg::kThreads, Cfg::kSmem, stream>>>(p);
}

// Registration (instantiations/*_sm90_*.cu). Host code registers the kernels only when the build
// targets sm_90a (DILATED_SPARSE_SM90A, set by _sources.py from the arch list); the entries carry
// arch 90 so pick() uses them on compute capability 9.0 devices only.
#if defined(DILATED_SPARSE_SM90A)
#define DS_SM90_REGISTRAR(OP, DT, D, V, FN, PM, SN, AUTO) \
  static const Registrar kReg##OP##V(OP, DT, D, V, FN, PM, SN, AUTO, 90);
#else
#define DS_SM90_REGISTRAR(OP, DT, D, V, FN, PM, SN, AUTO)
#endif
#define DS_REGISTER_FWD_SM90(T, DT, D, V, WG, BN, SCHED, AUTO)                                   \
  template void launch_fwd_sm90<T, D, WG, BN, SCHED>(const Params&, int64_t, cudaStream_t);     \
  DS_SM90_REGISTRAR(kOpFwd, DT, D, V, (&launch_fwd_sm90<T, D, WG, BN, SCHED>), 64 * WG, BN, AUTO)
#define DS_REGISTER_DQ_SM90(T, DT, D, V, WG, BN, SCHED, AUTO)                                  \
  template void launch_dq_sm90<T, D, WG, BN, SCHED>(const Params&, int64_t, cudaStream_t);     \
  DS_SM90_REGISTRAR(kOpDq, DT, D, V, (&launch_dq_sm90<T, D, WG, BN, SCHED>), 64 * WG, BN, AUTO)
#define DS_REGISTER_DKV_SM90(T, DT, D, V, WG, BM, SCHED, AUTO)                                 \
  template void launch_dkv_sm90<T, D, WG, BM, SCHED>(const Params&, int64_t, cudaStream_t);    \
  DS_SM90_REGISTRAR(kOpDkv, DT, D, V, (&launch_dkv_sm90<T, D, WG, BM, SCHED>), 64 * WG, BM, AUTO)

}  // namespace dilated_sparse::cuda
