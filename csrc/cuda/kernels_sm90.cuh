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
  kSchedOverlap = 1,   // lockstep + the element-wise work of tile j+1 overlaps tile j's last product
  kSchedPingPong = 2,  // a producer warpgroup loads through mbarriers; two warpgroups take turns on
                       // the tensor cores, so one's softmax runs during the other's products (FA3);
                       // the producer gives registers to the consumers (setmaxnreg)
};

// Threads and mbarrier bytes of a schedule: kWG consumer warpgroups, plus the producer warpgroup
// and 2 x kStages mbarriers with ping-pong.
template <int kWG_, int kSched>
struct Sm90Threads {
  static constexpr int kWG = kWG_;
  static constexpr int kConsumers = 128 * kWG_;
  static constexpr bool kPing = kSched == kSchedPingPong;
  static constexpr int kThreads = kConsumers + (kPing ? 128 : 0);
  static constexpr int kBarBytes = kPing ? 64 : 0;
  static_assert(!kPing || kWG_ == 2, "ping-pong needs two consumer warpgroups");
};

// fwd / dQ: kWG warpgroups of 64 query rows, kBN keys per step. Shared memory (+ 1024 bytes of
// alignment slack): Q (and dO for dQ), kStages K and V tiles, the mbarriers.
template <int kD, int kWG_, int kBN_, int kSched = kSchedLockstep>
struct FwdSm90Cfg : Sm90Threads<kWG_, kSched> {
  static constexpr int kBM = 64 * kWG_;
  static constexpr int kBN = kBN_;
  static constexpr int kQBytes = kBM * kD * 2;
  static constexpr int kKVBytes = kBN * kD * 2;
  static constexpr int kStages = kSm90Stages;
  static constexpr int kSmem = kQBytes + 2 * kStages * kKVBytes + 1024 + Sm90Threads<kWG_, kSched>::kBarBytes;
};

template <int kD, int kWG_, int kBN_, int kSched = kSchedLockstep>
struct DqSm90Cfg : Sm90Threads<kWG_, kSched> {
  static constexpr int kBM = 64 * kWG_;
  static constexpr int kBN = kBN_;
  static constexpr int kQBytes = kBM * kD * 2;
  static constexpr int kKVBytes = kBN * kD * 2;
  // Ping-pong releases stages through mbarriers and runs with two when three do not fit (128 keys
  // at D128); the other schedules need three.
  static constexpr int kStages =
      kSched == kSchedPingPong && 2 * kQBytes + 2 * kSm90Stages * kKVBytes + 1088 > 232448 ? 2 : kSm90Stages;
  static constexpr int kSmem = 2 * kQBytes + 2 * kStages * kKVBytes + 1024 + Sm90Threads<kWG_, kSched>::kBarBytes;
  static_assert(kSmem <= 232448, "dQ tile does not fit in shared memory");
};

// dK/dV: kWG warpgroups of 64 keys, kBM queries per step. Shared memory: K, V, then kStages of
// {Q, dO, lse, Delta}, each rounded up so that every stage's tiles start on a 1024-byte boundary.
template <int kD, int kWG_, int kBM_, int kSched = kSchedLockstep>
struct DkvSm90Cfg : Sm90Threads<kWG_, kSched> {
  static constexpr int kBN = 64 * kWG_;
  static constexpr int kBM = kBM_;
  static constexpr int kKVBytes = kBN * kD * 2;
  static constexpr int kQBytes = kBM * kD * 2;
  static constexpr int kStageBytes = (2 * kQBytes + 2 * kBM * 4 + 1023) / 1024 * 1024;
  static constexpr int kStages = kSm90Stages;
  static constexpr int kSmem = 2 * kKVBytes + kStages * kStageBytes + 1024 + Sm90Threads<kWG_, kSched>::kBarBytes;
};

__device__ __forceinline__ uint32_t align1024(uint32_t a) { return (a + 1023u) & ~1023u; }

// ---------------------------------------------------------------------------------------------
// The tile loop of every kernel and schedule
// ---------------------------------------------------------------------------------------------

using Set0 = std::integral_constant<int, 0>;
using Set1 = std::integral_constant<int, 1>;

// Consumer loop over the secondary tiles of one primary tile. The kernel supplies, as lambdas:
//   has()          the cursor is on a tile (uniform across the CTA)
//   next()         find the tile after it (kept aside); has_next() whether there is one
//   advance()      make that tile current and move `stage` to the next ring slot
//   load_next(st)  lockstep / overlap: start loading the next tile into slot st (every consumer)
//   scores()       issue and commit the score products of the current tile (slot `stage`)
//   compute(c)     once they retired: the element-wise work, into register set c (Set0 / Set1)
//   last(c, st)    issue and commit the products that consume set c, reading slot st
//   done()         once those retired (the forward rescales its output rows here)
// kTwoTurns (ping-pong): scores and last products take separate turns, each waited for, so set c
// never shares the register file with the next tile's scores.
template <int kSched, int kStages, bool kTwoTurns, class Has, class Next, class HasNext, class Advance,
          class LoadNext, class Scores, class Compute, class Last, class Done>
__device__ __forceinline__ void run_tiles(const int& stage, int wg, int consumers, uint32_t bar_full,
                                          uint32_t bar_empty, Has has, Next next, HasNext has_next,
                                          Advance advance, LoadNext load_next, Scores scores, Compute compute,
                                          Last last, Done done) {
  // lockstep / overlap: the current tile has landed for every thread, and the slot after it is
  // free (its last readers retired before this barrier): start the next tile there.
  auto publish_and_prefetch = [&]() {
    cp_async_wait<0>();
    sm90::fence_async_smem();
    __syncthreads();
    next();
    if (has_next()) load_next(stage + 1 == kStages ? 0 : stage + 1);
    cp_async_commit();
  };
  if constexpr (kSched == kSchedLockstep) {
    while (has()) {
      publish_and_prefetch();
      scores();
      sm90::wait<0>();  // also retires the previous tile's last products
      compute(Set0{});
      done();
      last(Set0{}, stage);
      advance();
    }
  } else if constexpr (kSched == kSchedOverlap) {
    if (!has()) return;
    publish_and_prefetch();
    scores();
    sm90::wait<0>();
    compute(Set0{});
    done();
    int last_stage = stage;
    advance();
    // Set c holds the previous tile's work; the current tile's goes to the other set.
    auto step = [&](auto c) -> bool {
      constexpr int kOther = 1 - decltype(c)::value;
      if (!has()) {
        last(c, last_stage);
        return false;
      }
      publish_and_prefetch();
      scores();
      last(c, last_stage);
      sm90::wait<1>();  // the scores; the last products may still run
      compute(std::integral_constant<int, kOther>{});
      sm90::wait<0>();
      done();
      last_stage = stage;
      advance();
      return true;
    };
    while (step(Set0{}) && step(Set1{})) {
    }
  } else {
    // Turns alternate between the two warpgroups through named barriers 1 + wg (one warpgroup
    // syncs, the other arrives); warpgroup 0 goes first. The producer refills a slot once both
    // released it (bar_empty); a slot is ready when its bar_full phase completes.
    const int other = 1 - wg;
    int j = 0, last_stage = 0;
    if (wg == 1 && has()) sm90::named_arrive(1, consumers);
    while (has()) {
      sm90::mbar_wait(bar_full + 8 * stage, (j / kStages) & 1);
      sm90::fence_async_smem();
      sm90::named_sync(1 + wg, consumers);
      if constexpr (!kTwoTurns) {
        if (j > 0) last(Set0{}, last_stage);
      }
      scores();
      sm90::named_arrive(1 + other, consumers);
      sm90::wait<0>();
      if constexpr (kTwoTurns) {
        compute(Set0{});
        next();
        sm90::named_sync(1 + wg, consumers);
        last(Set0{}, stage);
        if (wg == 0 || has_next()) sm90::named_arrive(1 + other, consumers);  // not after warpgroup 1's last turn
        sm90::wait<0>();
        done();
        sm90::mbar_arrive(bar_empty + 8 * stage);
      } else {
        if (j > 0) sm90::mbar_arrive(bar_empty + 8 * last_stage);  // no longer read
        compute(Set0{});
        done();
        last_stage = stage;
        next();
      }
      ++j;
      advance();
    }
    if constexpr (!kTwoTurns) {
      if (j > 0) {
        sm90::named_sync(1 + wg, consumers);
        last(Set0{}, last_stage);
        if (wg == 0) sm90::named_arrive(1 + other, consumers);  // warpgroup 1's last turn
      }
    }
  }
}

// Ping-pong producer: every tile of the cursor into the ring, at most kStages ahead of the
// consumers. load(st) issues the copies of the current tile into slot st; step() moves the cursor.
template <int kStages, class Has, class Load, class Step>
__device__ __forceinline__ void produce(uint32_t bar_full, uint32_t bar_empty, Has has, Load load, Step step) {
  for (int j = 0; has(); ++j) {
    const int st = j % kStages;
    if (j >= kStages) sm90::mbar_wait(bar_empty + 8 * st, (j / kStages - 1) & 1);
    load(st);
    sm90::cp_async_arrive(bar_full + 8 * st);
    step();
  }
  cp_async_wait<0>();
}

// ---------------------------------------------------------------------------------------------
// Forward
// ---------------------------------------------------------------------------------------------

template <typename T, int kD, int kWG, int kBN, int kSched>
__global__ void __launch_bounds__(FwdSm90Cfg<kD, kWG, kBN, kSched>::kThreads, 1)
    fwd_sm90_kernel(const __grid_constant__ Params p) {
#if DS_SM90_BODY
  using Cfg = FwdSm90Cfg<kD, kWG, kBN, kSched>;
  constexpr int kBM = Cfg::kBM, kNT = Cfg::kConsumers, kStages = Cfg::kStages;
  constexpr int kLoaders = Cfg::kPing ? 128 : kNT;  // the threads that issue the copies
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const uint32_t sQ = align1024(smem_u32(smem_raw));
  const uint32_t sK0 = sQ + Cfg::kQBytes;
  const uint32_t sV0 = sK0 + kStages * Cfg::kKVBytes;
  const uint32_t bar_full = sV0 + kStages * Cfg::kKVBytes;  // [stages] mbarriers (ping-pong)
  const uint32_t bar_empty = bar_full + 8 * kStages;

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane / 4, t4 = lane % 4;
  const int wg = warp / 4;
  const int wrow = warp * 16;  // this warp's first row in the tile
  const int ltid = Cfg::kPing ? tid - kNT : tid;
  const QueryTile W = make_query_tile(p, kBM);
  const T* qg = static_cast<const T*>(p.q) + W.b * p.q_sb + W.h * p.q_sh;
  const T* kg = static_cast<const T*>(p.k) + W.b * p.k_sb + W.hk * p.k_sh;
  const T* vg = static_cast<const T*>(p.v) + W.b * p.v_sb + W.hk * p.v_sh;

  // Cursor over the key tiles that hold an allowed element: current and next (_n).
  int kt = 0, state = 0, stage = 0, kt_n = 0, state_n = 0, nx = W.E.n;
  uint64_t msk = 0, msk_n = 0;
  int it = next_pair(W.E, W.R, p.tl.full, W.e0, W.m0, kBM, kBN, kt, msk, state);
  auto has = [&]() { return it < W.E.n; };
  auto next = [&]() { nx = next_pair(W.E, W.R, p.tl.full, it + 1, W.m0, kBM, kBN, kt_n, msk_n, state_n); };
  auto has_next = [&]() { return nx < W.E.n; };
  auto advance = [&]() {
    stage = stage + 1 == kStages ? 0 : stage + 1;
    it = nx;
    kt = kt_n;
    msk = msk_n;
    state = state_n;
  };
  auto load_kv = [&](int st, int tile) {
    sm90::load_tile<T, kBN, kD, kLoaders>(sK0 + st * Cfg::kKVBytes, kg, p.k_ss, tile * kBN, p.Sk, p.D, ltid);
    sm90::load_tile<T, kBN, kD, kLoaders>(sV0 + st * Cfg::kKVBytes, vg, p.v_ss, tile * kBN, p.Sk, p.D, ltid);
  };

  if constexpr (Cfg::kPing) {
    sm90::init_ring(bar_full, bar_empty, kStages, kNT);
    if (wg == kWG) {
      sm90::regs_decrease<24>();
      sm90::load_tile<T, kBM, kD, kLoaders>(sQ, qg, p.q_ss, W.m0, p.Sq, p.D, ltid);
      produce<kStages>(bar_full, bar_empty, has, [&](int st) { load_kv(st, kt); }, [&]() {
        next();
        advance();
      });
      return;
    }
    sm90::regs_increase<240>();
  } else {
    sm90::load_tile<T, kBM, kD, kLoaders>(sQ, qg, p.q_ss, W.m0, p.Sq, p.D, ltid);
    if (has()) load_kv(0, kt);
    cp_async_commit();
  }

  float acc[kD / 8][4], S[kBN / 8][4];
#pragma unroll
  for (int i = 0; i < kD / 8; ++i) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.f;
#pragma unroll
  for (int i = 0; i < kBN / 8; ++i) S[i][0] = S[i][1] = S[i][2] = S[i][3] = 0.f;
  float mrow[2] = {-INFINITY, -INFINITY}, lrow[2] = {0.f, 0.f}, corr[2] = {1.f, 1.f};
  const float sl2 = p.scale_log2;
  uint32_t P[2][kBN / 16][4];

  // S = Q K^T of the current tile (this warpgroup's 64 rows x kBN keys).
  auto scores = [&]() {
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
  // Online softmax (log2 domain): masks, updates the running max and sum, writes the
  // probabilities to P[c] and the factor the output rows must be rescaled by to corr.
  auto softmax = [&](auto c) {
    sm90::fence_regs(S);
    if (state == 2) mask_tile<kBN / 8, false>(S, W.R, p.tl, msk, W.m0, wrow, kt * kBN, g, t4, -INFINITY);
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
    for (int kk = 0; kk < kBN / 16; ++kk) sm90::to_a_frag<T>(P[c][kk], S, kk);
  };
  // O += P[c] V with the V tile of slot st.
  auto pv = [&](auto c, int st) {
    const uint32_t sV = sV0 + st * Cfg::kKVBytes;
    sm90::fence_regs(acc);
    sm90::fence();
#pragma unroll
    for (int kk = 0; kk < kBN / 16; ++kk) {
      sm90::Wgmma<kD, T>::template rs<1>(acc, P[c][kk], sm90::desc_mn<kBN>(sV, kk), 1);
    }
    sm90::commit();
  };
  auto rescale = [&]() {
#pragma unroll
    for (int i = 0; i < kD / 8; ++i) {
      acc[i][0] *= corr[0];
      acc[i][1] *= corr[0];
      acc[i][2] *= corr[1];
      acc[i][3] *= corr[1];
    }
  };
  run_tiles<kSched, kStages, false>(stage, wg, kNT, bar_full, bar_empty, has, next, has_next, advance,
                                    [&](int st) { load_kv(st, kt_n); }, scores, softmax, pv, rescale);
  sm90::wait<0>();
  sm90::fence_regs(acc);
  cp_async_wait<0>();
  store_fwd_rows<T, kD>(p, W, kBM, acc, mrow, lrow, wrow, g, t4);
#else
  __trap();
#endif
}

// ---------------------------------------------------------------------------------------------
// Backward: dQ over the CSR rows
// ---------------------------------------------------------------------------------------------

template <typename T, int kD, int kWG, int kBN, int kSched>
__global__ void __launch_bounds__(DqSm90Cfg<kD, kWG, kBN, kSched>::kThreads, 1)
    dq_sm90_kernel(const __grid_constant__ Params p) {
#if DS_SM90_BODY
  using Cfg = DqSm90Cfg<kD, kWG, kBN, kSched>;
  constexpr int kBM = Cfg::kBM, kNT = Cfg::kConsumers, kStages = Cfg::kStages;
  constexpr int kLoaders = Cfg::kPing ? 128 : kNT;
  // At D128, 128-key scores leave no room for the previous tile's dS next to them.
  constexpr bool kTwoTurns = Cfg::kPing && kBN >= 128 && kD >= 128;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const uint32_t sQ = align1024(smem_u32(smem_raw));
  const uint32_t sdO = sQ + Cfg::kQBytes;
  const uint32_t sK0 = sdO + Cfg::kQBytes;
  const uint32_t sV0 = sK0 + kStages * Cfg::kKVBytes;
  const uint32_t bar_full = sV0 + kStages * Cfg::kKVBytes;  // [stages] mbarriers (ping-pong)
  const uint32_t bar_empty = bar_full + 8 * kStages;

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane / 4, t4 = lane % 4;
  const int wg = warp / 4;
  const int wrow = warp * 16;
  const int ltid = Cfg::kPing ? tid - kNT : tid;
  const QueryTile W = make_query_tile(p, kBM);
  const int b = W.b, h = W.h, m0 = W.m0;
  const T* qg = static_cast<const T*>(p.q) + b * p.q_sb + h * p.q_sh;
  const T* dog = static_cast<const T*>(p.dout) + b * p.do_sb + h * p.do_sh;
  const T* kg = static_cast<const T*>(p.k) + b * p.k_sb + W.hk * p.k_sh;
  const T* vg = static_cast<const T*>(p.v) + b * p.v_sb + W.hk * p.v_sh;

  int kt = 0, state = 0, stage = 0, kt_n = 0, state_n = 0, nx = W.E.n;
  uint64_t msk = 0, msk_n = 0;
  int it = next_pair(W.E, W.R, p.tl.full, 0, m0, kBM, kBN, kt, msk, state);
  auto has = [&]() { return it < W.E.n; };
  auto next = [&]() { nx = next_pair(W.E, W.R, p.tl.full, it + 1, m0, kBM, kBN, kt_n, msk_n, state_n); };
  auto has_next = [&]() { return nx < W.E.n; };
  auto advance = [&]() {
    stage = stage + 1 == kStages ? 0 : stage + 1;
    it = nx;
    kt = kt_n;
    msk = msk_n;
    state = state_n;
  };
  auto load_kv = [&](int st, int tile) {
    sm90::load_tile<T, kBN, kD, kLoaders>(sK0 + st * Cfg::kKVBytes, kg, p.k_ss, tile * kBN, p.Sk, p.D, ltid);
    sm90::load_tile<T, kBN, kD, kLoaders>(sV0 + st * Cfg::kKVBytes, vg, p.v_ss, tile * kBN, p.Sk, p.D, ltid);
  };
  auto load_q_do = [&]() {
    sm90::load_tile<T, kBM, kD, kLoaders>(sQ, qg, p.q_ss, m0, p.Sq, p.D, ltid);
    sm90::load_tile<T, kBM, kD, kLoaders>(sdO, dog, p.do_ss, m0, p.Sq, p.D, ltid);
  };

  if constexpr (Cfg::kPing) {
    sm90::init_ring(bar_full, bar_empty, kStages, kNT);
    if (wg == kWG) {
      sm90::regs_decrease<24>();
      load_q_do();
      produce<kStages>(bar_full, bar_empty, has, [&](int st) { load_kv(st, kt); }, [&]() {
        next();
        advance();
      });
      return;
    }
    sm90::regs_increase<240>();
  } else {
    load_q_do();
    if (has()) load_kv(0, kt);
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
  uint32_t sa[2][kBN / 16][4];

  // S = Q K^T, dP = dO V^T of the current tile.
  auto scores = [&]() {
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
  // dS = P (dP - Delta) with P recomputed from lse, as A fragments in set c.
  auto make_ds = [&](auto c) {
    sm90::fence_regs(S);
    sm90::fence_regs(dP);
#pragma unroll
    for (int nt = 0; nt < kBN / 8; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) S[nt][e] = fast_exp2(fmaf(S[nt][e], sl2, -lse2[e >> 1]));
    if (state == 2) mask_tile<kBN / 8, false>(S, W.R, p.tl, msk, m0, wrow, kt * kBN, g, t4, 0.f);
#pragma unroll
    for (int nt = 0; nt < kBN / 8; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) S[nt][e] *= dP[nt][e] - dl[e >> 1];
#pragma unroll
    for (int kk = 0; kk < kBN / 16; ++kk) sm90::to_a_frag<T>(sa[c][kk], S, kk);
  };
  // dQ += dS K with the K tile of slot st.
  auto ds_k = [&](auto c, int st) {
    const uint32_t sK = sK0 + st * Cfg::kKVBytes;
    sm90::fence_regs(acc);
    sm90::fence();
#pragma unroll
    for (int kk = 0; kk < kBN / 16; ++kk) {
      sm90::Wgmma<kD, T>::template rs<1>(acc, sa[c][kk], sm90::desc_mn<kBN>(sK, kk), 1);
    }
    sm90::commit();
  };
  run_tiles<kSched, kStages, kTwoTurns>(stage, wg, kNT, bar_full, bar_empty, has, next, has_next, advance,
                                        [&](int st) { load_kv(st, kt_n); }, scores, make_ds, ds_k,
                                        [&]() { sm90::fence_regs(acc); });
  sm90::wait<0>();
  sm90::fence_regs(acc);
  cp_async_wait<0>();
  store_rows<T, kD>(p.dq, acc, b, p.Sq, p.H, h, p.D, m0 + wrow, 0, p.scale, g, t4);
#else
  __trap();
#endif
}

// ---------------------------------------------------------------------------------------------
// Backward: dK, dV over the CSC columns, reduced over the GQA group in registers
// ---------------------------------------------------------------------------------------------

template <typename T, int kD, int kWG, int kBM, int kSched>
__global__ void __launch_bounds__(DkvSm90Cfg<kD, kWG, kBM, kSched>::kThreads, 1)
    dkv_sm90_kernel(const __grid_constant__ Params p) {
#if DS_SM90_BODY
  using Cfg = DkvSm90Cfg<kD, kWG, kBM, kSched>;
  constexpr int kBN = Cfg::kBN, kNT = Cfg::kConsumers, kStages = Cfg::kStages;
  constexpr int kLoaders = Cfg::kPing ? 128 : kNT;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const uint32_t sK = align1024(smem_u32(smem_raw));
  const uint32_t sV = sK + Cfg::kKVBytes;
  const uint32_t sStage0 = sV + Cfg::kKVBytes;  // [stages] {Q, dO, lse, Delta}
  const uint32_t bar_full = sStage0 + kStages * Cfg::kStageBytes;  // [stages] mbarriers (ping-pong)
  const uint32_t bar_empty = bar_full + 8 * kStages;
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
  const int ltid = Cfg::kPing ? tid - kNT : tid;
  int s, t, b, hk;
  if (!decode_key_tile(p, s, t, b, hk)) return;
  const int n0 = t * kBN;
  const T* kg = static_cast<const T*>(p.k) + b * p.k_sb + hk * p.k_sh;
  const T* vg = static_cast<const T*>(p.v) + b * p.v_sb + hk * p.v_sh;
  const Rules R = make_rules(p, b);

  // Cursor over (GQA group member gg, entry it): current and next (_n).
  int gg = 0, it = 0, qt = 0, state = 0, stage = 0, gg_n = 0, it_n = 0, qt_n = 0, state_n = 0;
  uint64_t msk = 0, msk_n = 0;
  Entries E = make_entries(p.tl, layout_slice(p, b, hk * p.G), t);
  next_group_pair(p, R, b, hk, t, n0, kBM, kBN, gg, it, E, qt, msk, state);
  Entries E_n = E;
  auto has = [&]() { return gg < p.G; };
  auto next = [&]() {
    gg_n = gg;
    it_n = it + 1;
    E_n = E;
    next_group_pair(p, R, b, hk, t, n0, kBM, kBN, gg_n, it_n, E_n, qt_n, msk_n, state_n);
  };
  auto has_next = [&]() { return gg_n < p.G; };
  auto advance = [&]() {
    stage = stage + 1 == kStages ? 0 : stage + 1;
    gg = gg_n;
    it = it_n;
    E = E_n;
    qt = qt_n;
    msk = msk_n;
    state = state_n;
  };
  auto load_q = [&](int st, int member, int tile) {
    const int hq = hk * p.G + member;
    const T* qg = static_cast<const T*>(p.q) + b * p.q_sb + hq * p.q_sh;
    const T* dog = static_cast<const T*>(p.dout) + b * p.do_sb + hq * p.do_sh;
    sm90::load_tile<T, kBM, kD, kLoaders>(stage_q(st), qg, p.q_ss, tile * kBM, p.Sq, p.D, ltid);
    sm90::load_tile<T, kBM, kD, kLoaders>(stage_do(st), dog, p.do_ss, tile * kBM, p.Sq, p.D, ltid);
    const int64_t rowbase = (static_cast<int64_t>(b) * p.H + hq) * p.Sq;
    const uint32_t sl = stage_do(st) + Cfg::kQBytes;
    for (int i = ltid; i < kBM; i += kLoaders) {
      const int qi = tile * kBM + i;
      const bool pred = qi < p.Sq;
      cp_async4(sl + 4 * i, pred ? p.lse + rowbase + qi : p.lse, pred);
      cp_async4(sl + 4 * (kBM + i), pred ? p.delta + rowbase + qi : p.delta, pred);
    }
  };
  auto load_kv = [&]() {
    sm90::load_tile<T, kBN, kD, kLoaders>(sK, kg, p.k_ss, n0, p.Sk, p.D, ltid);
    sm90::load_tile<T, kBN, kD, kLoaders>(sV, vg, p.v_ss, n0, p.Sk, p.D, ltid);
  };

  if constexpr (Cfg::kPing) {
    sm90::init_ring(bar_full, bar_empty, kStages, kNT);
    if (wg == kWG) {
      sm90::regs_decrease<24>();
      load_kv();
      produce<kStages>(bar_full, bar_empty, has, [&](int st) { load_q(st, gg, qt); }, [&]() {
        next();
        advance();
      });
      return;
    }
    sm90::regs_increase<240>();
  } else {
    load_kv();
    if (has()) load_q(0, gg, qt);
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
  uint32_t pa[2][kBM / 16][4], sa[2][kBM / 16][4];

  // S^T = K Q^T, dP^T = V dO^T (this warpgroup's 64 keys x kBM queries of the current tile).
  auto scores = [&]() {
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
  // P^T and dS^T = P^T (dP^T - Delta) as A fragments in set c.
  auto make_p_ds = [&](auto c) {
    sm90::fence_regs(S);
    sm90::fence_regs(dP);
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
    for (int kk = 0; kk < kBM / 16; ++kk) sm90::to_a_frag<T>(pa[c][kk], S, kk);
#pragma unroll
    for (int nt = 0; nt < kBM / 8; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) S[nt][e] *= dP[nt][e] - drow[nt * 8 + 2 * t4 + (e & 1)];
#pragma unroll
    for (int kk = 0; kk < kBM / 16; ++kk) sm90::to_a_frag<T>(sa[c][kk], S, kk);
  };
  // dV += P^T dO, dK += dS^T Q with the query tile of slot st.
  auto dv_dk = [&](auto c, int st) {
    sm90::fence_regs(dK);
    sm90::fence_regs(dV);
    sm90::fence();
#pragma unroll
    for (int kk = 0; kk < kBM / 16; ++kk) {
      sm90::Wgmma<kD, T>::template rs<1>(dV, pa[c][kk], sm90::desc_mn<kBM>(stage_do(st), kk), 1);
    }
#pragma unroll
    for (int kk = 0; kk < kBM / 16; ++kk) {
      sm90::Wgmma<kD, T>::template rs<1>(dK, sa[c][kk], sm90::desc_mn<kBM>(stage_q(st), kk), 1);
    }
    sm90::commit();
  };
  // Ping-pong takes two turns a tile: the dK and dV accumulators leave no room for the
  // probabilities next to the next tile's scores.
  run_tiles<kSched, kStages, Cfg::kPing>(stage, wg, kNT, bar_full, bar_empty, has, next, has_next, advance,
                                         [&](int st) { load_q(st, gg_n, qt_n); }, scores, make_p_ds, dv_dk,
                                         [&]() {
                                           sm90::fence_regs(dK);
                                           sm90::fence_regs(dV);
                                         });
  sm90::wait<0>();
  sm90::fence_regs(dK);
  sm90::fence_regs(dV);
  cp_async_wait<0>();
  store_rows<T, kD>(p.dk, dK, b, p.Sk, p.Hkv, hk, p.D, n0 + wrow, 0, p.scale, g, t4);
  store_rows<T, kD>(p.dv, dV, b, p.Sk, p.Hkv, hk, p.D, n0 + wrow, 0, 1.f, g, t4);
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
  launch_kernel<&fwd_sm90_kernel<T, kD, kWG, kBN, kSched>, Cfg::kThreads, Cfg::kSmem>(p, items, stream);
}

template <typename T, int kD, int kWG, int kBN, int kSched>
void launch_dq_sm90(const Params& p, int64_t items, cudaStream_t stream) {
  using Cfg = DqSm90Cfg<kD, kWG, kBN, kSched>;
  launch_kernel<&dq_sm90_kernel<T, kD, kWG, kBN, kSched>, Cfg::kThreads, Cfg::kSmem>(p, items, stream);
}

template <typename T, int kD, int kWG, int kBM, int kSched>
void launch_dkv_sm90(const Params& p, int64_t items, cudaStream_t stream) {
  using Cfg = DkvSm90Cfg<kD, kWG, kBM, kSched>;
  launch_kernel<&dkv_sm90_kernel<T, kD, kWG, kBM, kSched>, Cfg::kThreads, Cfg::kSmem>(p, items, stream);
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
