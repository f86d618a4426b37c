// Hopper (sm_90a) kernels: forward, dQ and dK/dV over the same tile lists, token rules and work
// decoding as the mma.sync kernels of kernels.cuh, with the matrix products on warpgroup MMA
// (wgmma.mma_async) reading 128-byte-swizzled shared tiles (sm90.cuh).
//
// Each consumer warpgroup (4 warps, 128 threads) owns 64 rows of the CTA's primary tile; a CTA has
// kWG of them. Secondary tiles stream through a ring of kSm90Stages tiles. The schedules
// (Sm90Sched, used by all three kernels; the enum below lists the ping-pong refinements):
//  - lockstep: every thread loads; a CTA barrier per tile publishes the tile and frees the stage
//    after next; the product that consumes the probabilities (P V, dS K, P^T dO, dS^T Q) is left in
//    flight while the next tile's scores are issued.
//  - overlap: lockstep, plus the element-wise work of tile j+1 runs while tile j's last product is
//    on the tensor cores (FlashAttention-3's intra-warpgroup pipelining).
//  - ping-pong (the defaults): a producer warpgroup loads through full/empty mbarriers (one thread
//    issuing TMA copies where the host encoded tensor maps, else all 128 with cp.async:
//    produce_tile) and hands its registers to the consumers (setmaxnreg); the two consumer
//    warpgroups take turns issuing products (named barriers), so one's softmax runs during the
//    other's products (FA3 ping-pong).
//    These kernels are persistent: one CTA per SM (two in the D32 / D64 forward: kFwdTwoItems,
//    whose one consumer warpgroup walks a CTA's item) takes work items from a global counter (longest
//    first, as planned); the producer decodes each item, posts it to the consumers through shared
//    memory (ItemInfo) and loads the next item's first tiles while they finish the current one, so
//    short rows do not pay a cold start each. The producer also walks the tile lists for the
//    consumers: a TileRecord per ring slot, published by the slot's full barrier. In the
//    dQ-from-dS kernel (with TMA) one producer warp decodes the next item while the other three
//    copy (run_items).
//
// The dS-scratch backward (attention.cu: bwd_cuda): a dK/dV variant (kSchedWriteDs) also writes
// each tile pair's dS^T, in 8 x 8 sub-matrices (kernels.cuh: ds_panel), to a scratch buffer; then
// dq_ds_sm90_kernel computes dQ = dS K from it with one bulk copy a tile (dS through ldmatrix.trans
// into registers), instead of recomputing the scores and dP in a dQ kernel (5 products instead of
// 7).
//
// Compiled to real code only for sm_90a (__CUDA_ARCH_FEAT_SM90_ALL); other targets get a stub that
// traps, and the host never picks these kernels there (attention.cu: pick()).
#pragma once

#include <algorithm>
#include <stdexcept>
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
constexpr int kMaxSmem = 232448;  // dynamic shared memory a CTA may use on sm_90
// Ping-pong register split (setmaxnreg): the launch gives each of the 384 threads 168 registers;
// what the producer warpgroup returns is all the consumers can take (240 needs the producer at 24;
// the producer spills some addresses to L1 then, the consumers do not).
constexpr int kProducerRegs = 24, kConsumerRegs = 240;
// Split producer (run_items): warp 1 of the producer warpgroup decodes, warps 0, 2 and 3 copy.
constexpr int kCopyThreads = 96;
static_assert(128 * kProducerRegs + 256 * kConsumerRegs <= 384 * 168, "register split exceeds the launch's");

// Schedules (see the top of this file).
enum Sm90Sched {
  kSchedLockstep = 0,  // every thread loads; one CTA barrier per key tile
  kSchedOverlap = 1,   // lockstep + the element-wise work of tile j+1 overlaps tile j's last product
  kSchedPingPong = 2,  // a producer warpgroup loads through mbarriers; two warpgroups take turns on
                       // the tensor cores, so one's softmax runs during the other's products (FA3);
                       // the producer gives registers to the consumers (setmaxnreg)
  kSchedPingPong2 = 3, // ping-pong with two buffers of primary tiles: the next item's load in full
                       // while the current one runs (two ring stages where three do not fit)
  kSchedPingPongOverlap = 4,  // ping-pong, and inside each turn the element-wise work of tile j runs
                              // while the warpgroup's own product of tile j - 1 does (both FA3
                              // schedules at once); one turn a tile, two register sets
  kSchedPingPongSplit = 5,  // forward: ping-pong with two primary buffers, and K and V in rings of
                            // their own (three K slots, two V slots: V_j is read one turn after
                            // K_j, so two slots give it the same lead), which fits two Q buffers
                            // next to three K slots at D128
};
// dK/dV modifier (or-ed into its schedule): also write each tile pair's dS^T to the dS scratch
// (Params::ds), which dq_ds_sm90_kernel reads back (the dS-scratch backward, attention.cu).
constexpr int kSchedWriteDs = 32;
constexpr int kSchedMask = kSchedWriteDs - 1;  // a schedule without its modifiers (this and below)
// dK/dV modifier (ping-pong): issue dV += P^T dO as soon as P^T is in registers, outside the turns,
// so that it runs while the warpgroup computes dS^T; the turn after issues dK alone. The same
// products in the same order (the same results, bit for bit). The ping-pong defaults take it
// (measured in gen_instantiations.py).
constexpr int kDkvEarlyDv = 64;
// Modifier of all three kernels (or-ed into the schedule): the score products (S and dP) contract
// over the first kD / 2 columns only, for a head dim of at most kD / 2 run in kD-column tiles, whose
// other columns are zeros (the copies zero-fill them). Registered under the half head dim (D32 in
// the D64 tiles: SW128 tiles hold 64-column panels); the products that make outputs (P V, dS K,
// P^T dO, dS^T Q) run over kD columns, of which the stores write D, unless kNarrowOut narrows them too.
constexpr int kHalfScoreK = 256;
// The same modifier for three quarters of the columns: registered under D96, in the D128 tiles (six
// k-steps of the score products instead of eight).
constexpr int kThreeQuarterScoreK = 4096;
// The columns a kernel of tile width kD and schedule `sched` (modifiers included) contracts its score
// products over: the head dim it serves, and registers under.
constexpr int score_cols(int kD, int sched) {
  return (sched & kHalfScoreK) != 0 ? kD / 2 : (sched & kThreeQuarterScoreK) != 0 ? 3 * kD / 4 : kD;
}
// Modifier of all three kernels: the products that make outputs (P V, dS K, P^T dO, dS^T Q) run over
// the columns the score products serve (score_cols; without kHalfScoreK or kThreeQuarterScoreK a
// no-op), wgmma of N = 32 or 96 reading the first columns of the tiles' 64-column panels, with fewer
// accumulators; the stores write those columns only (the forward's staging tile keeps stale ones
// past them, which its TMA store clips at D). The same results bit for bit (the other columns were
// zeros). H200, thirty-fourth session, S16k: D32 forward 0.955-0.961 and backward 0.935-0.963 of the
// time; D96 (bf16) forward 0.939-0.973, fwd+bwd 0.929-0.965 (RESULTS.md).
constexpr int kNarrowOut = 2048;
constexpr int out_cols(int kD, int sched) { return (sched & kNarrowOut) != 0 ? score_cols(kD, sched) : kD; }
// dK/dV modifier (head dims whose dK and dV rows do not fit the registers next to each other: D256):
// each work item computes dK and dV for half of the head dim's columns, so a key tile is two items
// (launch_dkv_sm90 counts them, run_items' kParts decodes them: the part rides in ItemInfo::e0,
// which dK/dV does not use otherwise); each part recomputes the tile pairs' scores over all columns.
// The mma.sync D256 dK/dV splits its columns the same way (kDO).
constexpr int kDkvSplitCols = 128;
// Forward modifier: a row keeps its running max until a tile's exceeds it by more than
// kLazyHeadroom (log2 units), so the probabilities stay <= 2^8 (exact in fp32, within fp16 and bf16
// range; the final normalisation and lse use the same max) and most tiles skip the output
// rescale, tested per warp (FA4's conditional rescale). A warp none of whose threads holds a
// partial row max beyond its row's headroom also skips the quad reduction of the maxima (the
// reduced max would not raise any row either: the same result, bit for bit). H200, sixteenth
// session: D128 forward 0.4-1.7% faster at every S16k / S64k point with the rescale test, 2-4%
// more with the vote; D64 (the overlapped schedule) -1..+1% with the first.
constexpr int kFwdLazyRescale = 64;
constexpr float kLazyHeadroom = 8.f;
// Forward modifier (the one-buffer ping-pong schedules): each consumer warpgroup copies its 64 Q
// rows into registers (wgmma A fragments, kD / 4 registers a thread; ldmatrix) when its item starts
// and releases the Q buffer there, so the producer loads the next item's Q during this item instead
// of after its last scores, and the score products read only K from shared memory. H200,
// seventeenth session (the same result bit for bit): 1-3.4% faster at long rows (D64 and D128),
// equal at 1-3 key blocks a row, so the next Q was not what short items waited for.
constexpr int kFwdQRegs = 128;
// Forward modifier (D64; one consumer warpgroup, kSchedPingPong2): two items in flight an SM. Each
// CTA is one consumer warpgroup and the producer, two CTAs an SM; the warpgroup walks a whole 128-row
// query tile as two 64-row halves on each key tile (the scores of one half on the tensor cores while
// the other half's softmax runs), so that one CTA's item boundary (epilogue, take, first tile) runs
// under the other CTA's products, and each key tile still serves 128 query rows. Two ring stages and
// two Q buffers a CTA (half the SM's shared memory each), 232 registers for the consumers. H200,
// forty-eighth session: the D64 forward 9-14% faster than the ping-pong-overlap default at S16k and
// S64k, D32 15-21% (gen_instantiations.py); the per-item and per-tile costs both fell, so the
// share of a short row's time at its boundaries did not (RESULTS.md).
constexpr int kFwdTwoItems = 8192;
// Shared memory of a CTA that shares its SM with another: half the SM's 228 KB, less the 1 KB the
// system reserves for each CTA.
constexpr int kHalfSmSmem = (233472 - 2 * 1024) / 2;

// Byte offset of the mailbox's item_full barriers in the PingSync of a ring of `stages` (after full[]
// and empty[] of each stage and res_full[2], res_empty[2], as make_ping_sync lays them out): a kernel
// that keeps words at a fixed distance from them (FwdSm90Cfg::kOpenAt) counts from it.
constexpr int mailbox_at(int stages) { return 16 * stages + 32; }

// Threads, primary-tile buffers and mbarrier bytes of a schedule: kWG consumer warpgroups, plus
// the producer warpgroup and the PingSync barriers with ping-pong.
template <int kWG_, int kSched>
struct Sm90Threads {
  static constexpr int kWG = kWG_;
  static constexpr int kConsumers = 128 * kWG_;
  static constexpr bool kPing = kSched >= kSchedPingPong;
  static constexpr int kResBufs = kSched == kSchedPingPong2 || kSched == kSchedPingPongSplit ? 2 : 1;
  static constexpr int kVStages = kSched == kSchedPingPongSplit ? 2 : 0;  // separate V ring (slots)
  static constexpr int kThreads = kConsumers + (kPing ? 128 : 0);
  static constexpr int kBarBytes = kPing ? 192 + 16 * kVStages : 0;  // PingSync
  static_assert(16 * kSm90Stages + 64 + 2 * sizeof(ItemInfo) <= 192, "PingSync exceeds its bytes");
  static_assert(!kPing || kWG_ == 2 || kWG_ == 1, "ping-pong: one or two consumer warpgroups");

  // Ring stages: three, or two where ping-pong (which releases slots through mbarriers) cannot fit
  // three next to its primary tiles. Shared memory = primary + stages x (stage tiles + side rows)
  // + alignment slack; the side rows (dK/dV: lse, Delta) sit after all the stages' tiles, so the
  // tiles stay 1024-byte aligned without padding each stage.
  static constexpr int smem(int res_bytes, int stage_bytes, int stages, int side_bytes = 0) {
    return kResBufs * res_bytes + stages * (stage_bytes + side_bytes) + 1024 + kBarBytes;
  }
  static constexpr int stages(int res_bytes, int stage_bytes, int side_bytes = 0) {
    return kPing && smem(res_bytes, stage_bytes, kSm90Stages, side_bytes) > kMaxSmem ? 2 : kSm90Stages;
  }
};

// A ping-pong kernel's record of a ring slot's secondary tile (forward and dQ: key tile; dK/dV:
// query tile), written by producer thread 0 with the tile's copies and published by that slot's
// full barrier (one more arrival, with release semantics): the consumers read it instead of walking
// the tile lists themselves (in the forward ~130 lines of SASS between a turn and its wait, on the
// path to the softmax; RESULTS.md, thirteenth and fourteenth sessions).
struct alignas(16) TileRecord {
  int tile;   // secondary tile
  int state;  // pair_state (2: mask per element)
  uint32_t msk_lo, msk_hi;  // membership mask
  int last;   // the item's last tile
  int member;  // dK/dV: the GQA group member whose query tile it is
};

// Producer thread 0: slot record r (kMember: with its GQA member, dK/dV), then the extra arrival on
// the slot's full barrier `full` (release: the record goes out with the slot's tiles).
template <bool kMember = false>
__device__ __forceinline__ void publish_record(volatile TileRecord& r, uint32_t full, int tile, int state, uint64_t msk,
                                               bool last, int member = 0) {
  r.tile = tile;
  r.state = state;
  r.msk_lo = static_cast<uint32_t>(msk);
  r.msk_hi = static_cast<uint32_t>(msk >> 32);
  r.last = last ? 1 : 0;
  if constexpr (kMember) r.member = member;
  sm90::mbar_arrive(full);
}
// Consumers, once the slot is full: the record's tile, state and mask; returns its `last`.
__device__ __forceinline__ int read_record(const volatile TileRecord& r, int& tile, int& state, uint64_t& msk) {
  tile = r.tile;
  state = r.state;
  msk = r.msk_lo | static_cast<uint64_t>(r.msk_hi) << 32;
  return r.last;
}

// fwd / dQ: kWG warpgroups of 64 query rows, kBN keys per step. Shared memory (+ 1024 bytes of
// alignment slack): Q (and dO for dQ) per primary buffer, kStages K and V tiles, the mbarriers.
template <int kD, int kWG_, int kBN_, int kSchedM = kSchedLockstep>
struct FwdSm90Cfg : Sm90Threads<kWG_, kSchedM & kSchedMask> {
  using Base = Sm90Threads<kWG_, kSchedM & kSchedMask>;
  static constexpr int kSched = kSchedM & kSchedMask;
  static constexpr bool kLazy = (kSchedM & kFwdLazyRescale) != 0;
  static constexpr bool kQRegs = (kSchedM & kFwdQRegs) != 0;
  static constexpr int kScoreK = score_cols(kD, kSchedM);
  static constexpr int kOutCols = out_cols(kD, kSchedM);  // output columns computed
  static_assert(!kQRegs || kSched == kSchedPingPong || kSched == kSchedPingPongOverlap,
                "Q in registers: the one-buffer ping-pong schedules only");
  static constexpr bool kTwoItems = (kSchedM & kFwdTwoItems) != 0;
  static_assert(kTwoItems ? kWG_ == 1 && kSched == kSchedPingPong2 && !kQRegs : !Base::kPing || kWG_ == 2,
                "two items an SM: one consumer warpgroup, kSchedPingPong2; other ping-pong: two");
  static constexpr int kHalves = kTwoItems ? 2 : 1;      // 64-row halves a consumer warpgroup walks
  static constexpr int kCtasPerSm = kTwoItems ? 2 : 1;   // persistent CTAs an SM
  // Two items an SM: no alignment slack (the kernel checks that its shared memory starts 1024-aligned).
  static constexpr int kSlack = kTwoItems ? 1024 : 0;
  static constexpr int kSmemCap = kTwoItems ? kHalfSmSmem : kMaxSmem;
  static constexpr int kBM = 64 * kWG_ * kHalves;
  // The consumers' registers after the producer's hand-over (setmaxnreg): the CTA's share of the
  // register file (the launch's, kThreads x 65536 / (kThreads x kCtasPerSm)) less the producer's
  // (one CTA of two warpgroups: the namespace's kConsumerRegs, 240).
  static constexpr int kConsumerRegs = (65536 / kCtasPerSm - 128 * kProducerRegs) / (128 * kWG_) / 8 * 8;
  static_assert(kTwoItems || !Base::kPing || kConsumerRegs == dilated_sparse::cuda::kConsumerRegs,
                "one CTA of two consumer warpgroups: the namespace's split");
  static constexpr int kBN = kBN_;
  static constexpr int kQBytes = kBM * kD * 2;
  static constexpr int kKVBytes = kBN * kD * 2;
  static constexpr int kResBytes = kQBytes;
  // K ring slots; the V ring has as many unless the schedule splits them (Base::kVStages).
  static constexpr int kStages =
      kTwoItems ? 2 : Base::kVStages > 0 ? kSm90Stages : Base::stages(kResBytes, 2 * kKVBytes);
  static constexpr int kVSlots = Base::kVStages > 0 ? Base::kVStages : kStages;
  // Ping-pong: a tile that stages the output rows for TMA stores, where it fits after the ring
  // (D64; D128 with two primary buffers and two stages), else none (stores from registers).
  static constexpr int kOBytes =
      Base::kPing && Base::smem(kResBytes, kKVBytes, kStages + kVSlots) - kSlack + kBM * kD * 2 <= kSmemCap
          ? kBM * kD * 2
          : 0;
  // The rows of tma_o's boxes: each warp stores its own 16 rows in the two-items kernel, else one
  // thread a warpgroup its 64 (attention.cu: set_tma).
  static constexpr int kOutBoxRows = kTwoItems ? 16 : 64;
  // Ping-pong: the producer's record of each ring slot's tile (TileRecord), after the barriers.
  static constexpr int kRecBytes = Base::kPing ? kStages * static_cast<int>(sizeof(TileRecord)) : 0;
  // Ping-pong at D64: the producer posts its lookup of each item's first tile pair (run_items,
  // kOpenAt) in two 32-bit words after the records, kOpenAt bytes after the item_full barriers.
  static constexpr bool kPostLookup = Base::kPing && kD <= 64;
  static constexpr int kPostBytes = kPostLookup ? 16 : 0;
  static constexpr int kOpenAt = kPostLookup ? Base::kBarBytes + kRecBytes - mailbox_at(kStages) : 0;
  static constexpr int kSmem =
      Base::smem(kResBytes, kKVBytes, kStages + kVSlots) - kSlack + kOBytes + kRecBytes + kPostBytes;
  static_assert(kSmem <= kSmemCap, "forward tile does not fit in shared memory");
  // Ping-pong at D64: with TMA the producer's item loop runs on warp 0 alone (run_items' kLean).
  // H200, twenty-eighth session: the D64 forward 0.990-0.992 of the time at local 2.5% and 10%;
  // the D128 forward 1.002-1.014 (slower at short rows), so not there.
  static constexpr bool kLeanProducer = Base::kPing && kD <= 64;
};

template <int kD, int kWG_, int kBN_, int kSchedM = kSchedLockstep>
struct DqSm90Cfg : Sm90Threads<kWG_, kSchedM & kSchedMask> {
  using Base = Sm90Threads<kWG_, kSchedM & kSchedMask>;
  static constexpr int kSched = kSchedM & kSchedMask;
  static constexpr int kScoreK = score_cols(kD, kSchedM);
  static constexpr int kOutCols = out_cols(kD, kSchedM);  // dQ columns computed
  static constexpr int kBM = 64 * kWG_;
  static constexpr int kBN = kBN_;
  static constexpr int kQBytes = kBM * kD * 2;
  static constexpr int kKVBytes = kBN * kD * 2;
  static constexpr int kResBytes = 2 * kQBytes;  // Q, dO
  // Ping-pong: the producer's record of each ring slot's tile (TileRecord), after the barriers
  // (counted here as side bytes of each stage).
  static constexpr int kRecSide = Base::kPing ? static_cast<int>(sizeof(TileRecord)) : 0;
  static constexpr int kStages = Base::stages(kResBytes, 2 * kKVBytes, kRecSide);
  static constexpr int kSmem = Base::smem(kResBytes, 2 * kKVBytes, kStages, kRecSide);
  static_assert(kSmem <= kMaxSmem, "dQ tile does not fit in shared memory");
  static_assert(!Base::kPing || kWG_ == 2, "ping-pong needs two consumer warpgroups");
};

// dK/dV: kWG warpgroups of 64 keys, kBM queries per step. Shared memory: K, V per primary buffer,
// then kStages of {Q, dO} tiles, then kStages of {lse, Delta} rows. (Padding each stage's rows to
// the next tile boundary instead cost the third stage at D128 with two primary buffers.)
template <int kD, int kWG_, int kBM_, int kSchedM = kSchedLockstep>
struct DkvSm90Cfg : Sm90Threads<kWG_, kSchedM & kSchedMask> {
  static constexpr int kSched = kSchedM & kSchedMask;
  static constexpr bool kWriteDs = (kSchedM & kSchedWriteDs) != 0;
  static constexpr bool kEarlyDv = (kSchedM & kDkvEarlyDv) != 0;
  static constexpr int kParts = (kSchedM & kDkvSplitCols) != 0 ? 2 : 1;  // items a key tile
  static constexpr int kDO = out_cols(kD, kSchedM) / kParts;  // dK / dV columns an item computes
  static constexpr int kScoreK = score_cols(kD, kSchedM);
  using Base = Sm90Threads<kWG_, kSched>;
  static constexpr int kBN = 64 * kWG_;
  static constexpr int kBM = kBM_;
  static constexpr int kKVBytes = kBN * kD * 2;
  static constexpr int kQBytes = kBM * kD * 2;
  static constexpr int kResBytes = 2 * kKVBytes;  // K, V
  static constexpr int kStageBytes = 2 * kQBytes;  // Q, dO
  // lse, Delta (, CSR entry) (, ping-pong: the slot's TileRecord)
  static constexpr int kRecOffset = 2 * kBM * 4 + (kWriteDs ? 16 : 0);
  static constexpr int kSideBytes = kRecOffset + (Base::kPing ? static_cast<int>(sizeof(TileRecord)) : 0);
  static_assert(!kWriteDs || Base::kPing, "dS is written by the ping-pong schedule only");
  static_assert(!kEarlyDv || (Base::kPing && kSched != kSchedPingPongOverlap),
                "dV is issued early by the two-turn ping-pong schedules only");
  static_assert(kStageBytes % 1024 == 0 && kResBytes % 1024 == 0, "swizzled tiles need 1024-byte alignment");
  static_assert((kParts == 1 || kDO % 64 == 0) && !(kParts > 1 && kWriteDs),
                "column parts: whole 64-column panels, no dS scratch");
  static constexpr int kStages = Base::stages(kResBytes, kStageBytes, kSideBytes);
  static constexpr int kSmem = Base::smem(kResBytes, kStageBytes, kStages, kSideBytes);
  static_assert(kSmem <= kMaxSmem, "dK/dV tile does not fit in shared memory");
  static_assert(!Base::kPing || kWG_ == 2, "ping-pong needs two consumer warpgroups");
};

__device__ __forceinline__ uint32_t align1024(uint32_t a) { return (a + 1023u) & ~1023u; }

// ---------------------------------------------------------------------------------------------
// The tile loop of every kernel and schedule
// ---------------------------------------------------------------------------------------------

using Set0 = std::integral_constant<int, 0>;
using Set1 = std::integral_constant<int, 1>;

// Synchronisation of the ping-pong schedule, in the kBarBytes after the tiles (mbarriers):
//   full[s] / empty[s]       ring slot s landed (the producer's 128 threads' copies) / released
//   res_full[b] / res_empty[b]  primary-tile buffer b (Q [+ dO], or K and V) landed / no longer
//                            read (after its item's last score products; the forward's Q with
//                            kFwdQRegs once copied into registers)
//   item_full / item_empty   [2] each, with two ItemInfo slots: the mailbox through which the
//                            producer posts work items, decoded, to the consumers
//   vfull[v] / vempty[v]     kSchedPingPongSplit: V ring slot v (full / empty above are the K ring)
struct PingSync {
  uint32_t full, empty, res_full, res_empty, item_full, item_empty, vfull, vempty;
  volatile ItemInfo* slot;
};

// `at`: shared address of the barrier bytes (8-byte aligned), `gen`: generic pointer to them.
// Initialises the barriers when kInit (ping-pong), then syncs the CTA. full_extra: arrivals on a
// ring slot's full barrier besides the copying threads' (the slot's TileRecord). split: the
// producer warpgroup is split (run_items): kCopyThreads, not 128, copy and arrive on the slot and
// primary-tile barriers, and they take each item from the mailbox beside the consumers. lean: only
// the producer's warp 0 runs the item loop (run_items' kLean with TMA), so 32 threads arrive.
template <bool kInit>
__device__ __forceinline__ PingSync make_ping_sync(uint32_t at, unsigned char* gen, int stages, int consumers,
                                                  int vstages = 0, int full_extra = 0, bool split = false,
                                                  bool lean = false) {
  const int copiers = split ? kCopyThreads : lean ? 32 : 128;
  PingSync s;
  s.full = at;
  s.empty = at + 8 * stages;
  s.res_full = at + 16 * stages;
  s.res_empty = s.res_full + 16;
  s.item_full = s.res_empty + 16;  // at + mailbox_at(stages)
  s.item_empty = s.item_full + 16;
  s.slot = reinterpret_cast<volatile ItemInfo*>(gen + (s.item_empty + 16 - at));  // 8-byte aligned
  s.vfull = s.item_empty + 16 + 2 * static_cast<uint32_t>(sizeof(ItemInfo));
  s.vempty = s.vfull + 8 * vstages;
  if constexpr (kInit) {
    if (threadIdx.x == 0) {
      for (int i = 0; i < stages; ++i) {
        sm90::mbar_init(s.full + 8 * i, copiers + full_extra);
        sm90::mbar_init(s.empty + 8 * i, consumers);
      }
      for (int i = 0; i < vstages; ++i) {
        sm90::mbar_init(s.vfull + 8 * i, copiers);
        sm90::mbar_init(s.vempty + 8 * i, consumers);
      }
      for (int i = 0; i < 2; ++i) {
        sm90::mbar_init(s.res_full + 8 * i, copiers);
        sm90::mbar_init(s.res_empty + 8 * i, consumers);
        sm90::mbar_init(s.item_full + 8 * i, 1);
        sm90::mbar_init(s.item_empty + 8 * i, consumers + (split ? kCopyThreads : 0));
      }
    }
    __syncthreads();
  }
  return s;
}

// The primary-tile buffer of a CTA's nres-th item with tiles, and how many times it was used before.
template <int kResBufs>
__device__ __forceinline__ int res_buf(int nres) {
  return kResBufs == 2 ? nres & 1 : 0;
}
template <int kResBufs>
__device__ __forceinline__ int res_round(int nres) {
  return kResBufs == 2 ? nres >> 1 : nres;
}

// Claims in chunks (run_items' kChunks; Params::chunk_shift, chunk_claims and the bounds launch_sm90
// derives from them): claim k < chunk_claims takes the 1 << chunk_shift consecutive items from
// k << chunk_shift, a later claim one item. With chunk_claims 0 a claim is its item.
__device__ __forceinline__ int claim_first(const Params& p, int k) {
  return k < p.chunk_claims ? k << p.chunk_shift : k + p.chunk_extra;
}
// Whether item i is the last of its claim's items.
__device__ __forceinline__ bool claim_last(const Params& p, int i) {
  return i >= p.chunk_last || ((i + 1) & p.chunk_mask) == 0;
}

// What the claim after item `item`'s takes (kAhead): the counter's next value, or with kChunks, where
// item is not the last of its claim's items, the next item, as ~(item + 1) (negative; claim_item).
template <bool kChunks>
__device__ __forceinline__ void reserve(const Params& p, int item, int& pending) {
  if (kChunks && !claim_last(p, item)) {
    pending = ~(item + 1);
  } else {
    pending = atomicAdd(p.work_counter, 1);
  }
}

// Producer side of the mailbox, by the one thread that fetches: waits until slot n & 1 is free
// (its item n - 2 taken), takes the CTA's n-th work item (blockIdx.x, then the global counter's; -1
// once `items` are taken) and writes its index to the slot. kAhead: the counter's next value is
// taken one item early (`pending`), so the atomic's round trip overlaps the current item's loads
// instead of delaying the next item's first tile; else it is taken now (the split producer's
// decoding warp, which is off that path). kReserve false (with kAhead): the caller takes that next
// value itself, later (reserve_item).
template <bool kAhead, bool kReserve = true, bool kChunks = false>
__device__ __forceinline__ int claim_item(const PingSync& s, const Params& p, int n, int& pending) {
  const int b = n & 1;
  if (n >= 2) sm90::mbar_wait(s.item_empty + 8 * b, ((n >> 1) - 1) & 1);
  int64_t item;
  if (kChunks && kAhead && n > 0 && pending < 0) {
    item = ~pending;  // the rest of item n - 1's claim (reserve()): no counter read
  } else {
    const int64_t k = n == 0 ? static_cast<int64_t>(blockIdx.x)
                             : gridDim.x + static_cast<int64_t>(kAhead ? pending : atomicAdd(p.work_counter, 1));
    item = kChunks ? claim_first(p, static_cast<int>(k)) : k;  // k < items + grid < 2^31
  }
  // A split planned on the device: the launch's `items` is a bound, its plan's count the end.
  const int64_t items = p.tl.work_count != nullptr ? static_cast<int64_t>(__ldg(p.tl.work_count)) * p.tl.rep : p.items;
  if (kAhead && kReserve && item < items) reserve<kChunks>(p, static_cast<int>(item), pending);
  const int index = item < items ? static_cast<int>(item) : -1;
  s.slot[b].item = index;
  return index;
}
// The counter's next value, for the claim after item n's (whose index is in its slot).
template <bool kChunks = false>
__device__ __forceinline__ void reserve_item(const PingSync& s, const Params& p, int n, int& pending) {
  const int item = s.slot[n & 1].item;
  if (item >= 0) reserve<kChunks>(p, item, pending);
}

// Whether a kernel compiled with run_items' kLean runs its producer lean at this call (TMA copies and
// p.lean_producer): one condition for the kernel's PingSync (32 copiers) and run_items' loop.
template <bool kLean>
__device__ __forceinline__ bool producer_lean(const Params& p) {
  return kLean && p.tma != 0 && p.lean_producer != 0;
}

// The CTA's n-th work item (claim_item by thread 0), returned to every producer thread (named
// barrier 3 over the nprod threads that run the producer's loop).
template <bool kReserve = true, bool kChunks = false>
__device__ __forceinline__ int fetch_item(const PingSync& s, const Params& p, int n, int ltid, int& pending,
                                          int nprod = 128) {
  if (ltid == 0) claim_item<true, kReserve, kChunks>(s, p, n, pending);
  sm90::named_sync(3, nprod);
  return s.slot[n & 1].item;
}

// A persistent kernel's producer thread 0, after its last claim, with a self-resetting counter (the
// forward's: p.work_counter[1] counts the CTAs done): the CTA counts itself done, and the last CTA to
// do so zeroes the counter and the count for the next launch on the stream, which then needs no fill
// kernel before it. Every CTA's claims come before its count (fence), so none can follow the reset.
__device__ __forceinline__ void release_work_counter(const Params& p) {
  __threadfence();
  if (atomicAdd(p.work_counter + 1, 1) == static_cast<int>(gridDim.x) - 1) {
    p.work_counter[0] = 0;
    p.work_counter[1] = 0;
  }
}

// A persistent kernel's producer warpgroup at entry: this CTA's share of the plan's 128-byte lines
// (Params::prefetch_at; line l goes to CTA l % gridDim.x, so a small array spreads over many SMs)
// into L2, and thread 0 the q / k / v TMA descriptors. The first items' decode is a chain of
// dependent loads (the order, the row pointers, the first entries) that every CTA starts at once;
// after an L2 turnover each step would wait for DRAM.
__device__ __forceinline__ void prefetch_plan(const Params& p, int ltid) {
  const int first = ltid * static_cast<int>(gridDim.x) + static_cast<int>(blockIdx.x);
  const int step = 128 * static_cast<int>(gridDim.x);  // lines per range: at most 32768 (the host's cap)
#pragma unroll 1
  for (int r = 0; r < Params::kPrefetchRanges; ++r) {
#pragma unroll 1
    for (int l = first; l < p.prefetch_lines[r]; l += step) sm90::prefetch_l2(p.prefetch_at[r] + 128 * l);
  }
  if (p.tma && ltid == 0) {
    sm90::prefetch_tensormap(&p.tma_q);
    sm90::prefetch_tensormap(&p.tma_k);
    sm90::prefetch_tensormap(&p.tma_v);
  }
}

// The fields of an ItemInfo after `item`, between a register copy and the mailbox slot (volatile).
template <class Dst, class Src>
__device__ __forceinline__ void copy_item_fields(Dst& d, const Src& v) {
  d.s = v.s;
  d.t = v.t;
  d.b = v.b;
  d.h = v.h;
  d.n = v.n;
  d.e0 = v.e0;
  d.slot = v.slot;
  d.base = v.base;
}

// Posts the n-th item, decoded (d; d.item -1: none left; fetch_item wrote the index), to the consumers.
__device__ __forceinline__ void post_item(const PingSync& s, int n, int ltid, const ItemInfo& d) {
  if (ltid != 0) return;
  copy_item_fields(s.slot[n & 1], d);
  sm90::mbar_arrive(s.item_full + 8 * (n & 1));  // release: the slot writes are visible to the waiters
}
// A kernel whose producer opens its items (run_items, kOpenAt > 0) writes the n-th item to its slot
// (write_item) and later opens it with its own lookup's result: `any` (1 / 0: the item has / has no
// tile pair with an allowed element; -1: not looked up, the consumers look themselves, as for every
// item when p.post_lookup is 0) goes to word n & 1 of two 32-bit words kOpenAt bytes after
// the item_full barriers (the kernel's own shared memory), which keeps the mailbox's layout that of
// every other kernel, and their address a constant offset (the producer runs on 24 registers).
__device__ __forceinline__ void write_item(const PingSync& s, int n, int ltid, const ItemInfo& d) {
  if (ltid == 0) copy_item_fields(s.slot[n & 1], d);
}
template <int kOpenAt>
__device__ __forceinline__ void open_item(const PingSync& s, int n, int ltid, int any) {
  if (ltid != 0) return;
  sm90::st_shared_u32(s.item_full + kOpenAt + 4 * (n & 1), static_cast<uint32_t>(any));
  sm90::mbar_arrive(s.item_full + 8 * (n & 1));  // release, as post_item's
}
struct NoOpen {
  __device__ __forceinline__ void operator()(bool) const {}
};
// Item n (d) to its slot, and to the consumers now unless producer_item opens it (kOpenAt and `late`:
// run_items); opened now, a kOpenAt kernel's item says it was not looked up (the word is rewritten
// for every item: a stale 0 / 1 would make the consumers skip or expect the item's tiles).
template <int kOpenAt>
__device__ __forceinline__ void post_or_write(const PingSync& s, int n, int ltid, const ItemInfo& d, bool late) {
  if constexpr (kOpenAt > 0) {
    write_item(s, n, ltid, d);
    if (!late || d.item < 0) open_item<kOpenAt>(s, n, ltid, -1);
  } else {
    post_item(s, n, ltid, d);
  }
}

// The n-th item as posted in its slot: the consumers' take_item, and the producer threads reading
// back the item decoded ahead (after a barrier with the thread that posted it).
__device__ __forceinline__ ItemInfo read_item(const PingSync& s, int n) {
  ItemInfo d;
  d.item = s.slot[n & 1].item;
  copy_item_fields(d, s.slot[n & 1]);
  return d;
}

// Consumer side: the n-th item posted (item -1: none left); with kOpenAt > 0 also its `any`
// (open_item), else any is left alone.
template <int kOpenAt = 0>
__device__ __forceinline__ ItemInfo take_item(const PingSync& s, int n, int* any = nullptr) {
  const int b = n & 1;
  sm90::mbar_wait(s.item_full + 8 * b, (n >> 1) & 1);
  const ItemInfo d = read_item(s, n);
  if constexpr (kOpenAt > 0) *any = static_cast<int>(sm90::ld_shared_u32(s.item_full + kOpenAt + 4 * b));  // before the release
  sm90::mbar_arrive(s.item_empty + 8 * b);
  return d;
}

// Consumer loop over the secondary tiles of one primary tile. The kernel supplies, as lambdas:
//   has()          the cursor is on a tile (uniform across the CTA)
//   next()         find the tile after it (kept aside); has_next() whether there is one
//   advance()      make that tile current and move `stage` to the next ring slot
//   load_next(st)  lockstep / overlap: start loading the next tile into slot st (every consumer)
//   scores()       issue and commit the score products of the current tile (slot `stage`)
//   compute(c)     once they retired: the element-wise work, into register set c (Set0 / Set1)
//   last(c, st)    issue and commit the products that consume set c, reading slot st
//   done()         once those retired (the forward rescales its output rows here)
//   release()      ping-pong: the primary tiles are no longer read (after the last scores)
//   landed()       ping-pong: the current tile's slot is full (the kernel reads the producer's
//                  record of the tile here: TileRecord)
// Ping-pong: `ring` counts the ring tiles this CTA consumed over all its items (slot and phase);
// kTwoTurns: scores and last products take separate turns, each waited for, so set c never
// shares the register file with the next tile's scores.
struct NoHook {
  __device__ __forceinline__ void operator()() const {}
};
template <int kSched, int kStages, bool kTwoTurns, class Has, class Next, class HasNext, class Advance,
          class LoadNext, class Scores, class Compute, class Last, class Done, class Release, class Landed = NoHook>
__device__ __forceinline__ void run_tiles(const int& stage, int& ring, int wg, int consumers, const PingSync& sy,
                                          Has has, Next next, HasNext has_next, Advance advance,
                                          LoadNext load_next, Scores scores, Compute compute, Last last,
                                          Done done, Release release, Landed landed = {}) {
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
  } else if constexpr (kSched == kSchedPingPongOverlap) {
    static_assert(!kTwoTurns, "the overlapped ping-pong takes one turn a tile");
    // The turns of the ping-pong below; within a turn the scores of tile j are issued before the
    // last products of tile j - 1 (set c), so they retire first (wait<1>) and tile j's element-wise
    // work, into the other set, runs while those products still do. The first tile is peeled off
    // so that every wait retires a statically known group (ptxas serialises otherwise).
    const int other = 1 - wg;
    if (!has()) return;
    auto begin_turn = [&]() {
      sm90::mbar_wait(sy.full + 8 * stage, (ring / kStages) & 1);
      landed();
      sm90::fence_async_smem();
      sm90::named_sync(1 + wg, consumers);
    };
    begin_turn();
    scores();
    sm90::named_arrive(1 + other, consumers);
    next();
    sm90::wait<0>();
    if (!has_next()) release();
    compute(Set0{});
    done();
    int last_stage = stage;
    ++ring;
    advance();
    // Set c holds the previous tile's work.
    auto step = [&](auto c) -> bool {
      constexpr int kOther = 1 - decltype(c)::value;
      if (!has()) {
        sm90::named_sync(1 + wg, consumers);
        last(c, last_stage);
        sm90::named_arrive(1 + other, consumers);  // warpgroup 1's: the next item's first turn
        sm90::wait<0>();
        sm90::mbar_arrive(sy.empty + 8 * last_stage);
        return false;
      }
      begin_turn();
      scores();
      last(c, last_stage);
      sm90::named_arrive(1 + other, consumers);
      next();
      sm90::wait<1>();  // the scores; the last products may still run
      if (!has_next()) release();
      compute(std::integral_constant<int, kOther>{});
      sm90::wait<0>();
      sm90::mbar_arrive(sy.empty + 8 * last_stage);  // no longer read
      done();
      last_stage = stage;
      ++ring;
      advance();
      return true;
    };
    while (step(Set0{}) && step(Set1{})) {
    }
  } else {
    // Turns alternate between the two warpgroups through named barriers 1 + wg (one warpgroup
    // syncs, the other arrives); warpgroup 0 goes first: warpgroup 1's arrival that opens it was
    // made at the end of its previous item (or by run_items before the first). The producer
    // refills a slot once both released it (empty); a slot is ready when its full phase completes.
    // With a separate V ring (kVStages, one turn a tile): the turn of tile j waits for K_j and
    // V_{j-1}, releases K_j once its scores retired and V_{j-1} once P V did; last() gets V slots.
    constexpr int kVStages = Sm90Threads<2, kSched>::kVStages;
    static_assert(kVStages == 0 || !kTwoTurns, "a separate V ring takes one turn a tile");
    const int other = 1 - wg;
    bool first = true;
    int last_stage = 0;  // the previous tile's slot (its V slot with a V ring)
    auto wait_v = [&]() {  // V of the previous tile, ring index ring - 1
      if constexpr (kVStages > 0) sm90::mbar_wait(sy.vfull + 8 * last_stage, ((ring - 1) / kVStages) & 1);
    };
    const uint32_t last_empty = kVStages > 0 ? sy.vempty : sy.empty;
    while (has()) {
      sm90::mbar_wait(sy.full + 8 * stage, (ring / kStages) & 1);
      landed();
      if (!first) wait_v();
      sm90::fence_async_smem();
      sm90::named_sync(1 + wg, consumers);
      if constexpr (!kTwoTurns) {
        if (!first) last(Set0{}, last_stage);
      }
      scores();
      sm90::named_arrive(1 + other, consumers);
      next();
      sm90::wait<0>();
      if (!has_next()) release();
      if constexpr (kTwoTurns) {
        compute(Set0{});
        sm90::named_sync(1 + wg, consumers);
        last(Set0{}, stage);
        sm90::named_arrive(1 + other, consumers);
        sm90::wait<0>();
        done();
        sm90::mbar_arrive(sy.empty + 8 * stage);
      } else {
        if constexpr (kVStages > 0) sm90::mbar_arrive(sy.empty + 8 * stage);  // K_j no longer read
        if (!first) sm90::mbar_arrive(last_empty + 8 * last_stage);  // no longer read
        compute(Set0{});
        done();
        last_stage = kVStages > 0 ? ring % kVStages : stage;
      }
      first = false;
      ++ring;
      advance();
    }
    if constexpr (!kTwoTurns) {
      if (!first) {
        if constexpr (kVStages > 0) {
          wait_v();
          sm90::fence_async_smem();
        }
        sm90::named_sync(1 + wg, consumers);
        last(Set0{}, last_stage);
        sm90::named_arrive(1 + other, consumers);  // warpgroup 1's: the next item's first turn
        sm90::wait<0>();
        sm90::mbar_arrive(last_empty + 8 * last_stage);
      }
    }
  }
}

// Ping-pong producer of one work item: its tiles into the ring (running count `ring` over the
// CTA's items), at most kStages ahead of the consumers. load(st) issues the copies of the current
// tile into slot st (with a separate V ring, kVStages > 0: its K, and load_v(v) its V into V slot
// v); step() moves the cursor. The primary tiles (load_res(bar): into buffer res_buf(nres) once
// the consumers released it, counted on that buffer's barrier bar): with one buffer after the
// first ring tile, so that tile loads while the consumers finish the previous item; with two,
// first; with none (kResBufs 0: the dQ-from-dS kernel reads both operands from the ring), never.
// ahead(): called once, after the first tile's copies (and the primary tiles' with one buffer).
template <int kStages, int kResBufs, int kVStages = 0, class Has, class Load, class LoadRes, class Step, class Ahead,
          class LoadV = int>
__device__ __forceinline__ void produce(const PingSync& sy, int& ring, int nres, Has has, Load load, LoadRes load_res,
                                        Step step, Ahead ahead, LoadV load_v = 0) {
  const uint32_t full = sy.res_full + 8 * res_buf<kResBufs>(nres), empty = sy.res_empty + 8 * res_buf<kResBufs>(nres);
  const int round = res_round<kResBufs>(nres);
  auto primary = [&]() {
    if (round > 0) sm90::mbar_wait(empty, (round - 1) & 1);
    load_res(full);
    sm90::cp_async_arrive(full);
  };
  if constexpr (kResBufs == 2) primary();
  bool first = true;
  while (has()) {
    const int st = ring % kStages;
    if (ring >= kStages) sm90::mbar_wait(sy.empty + 8 * st, (ring / kStages - 1) & 1);
    load(st);
    sm90::cp_async_arrive(sy.full + 8 * st);
    if constexpr (kVStages > 0) {  // separate V ring: load_v(v) copies the tile's V into V slot v
      const int vs = ring % kVStages;
      if (ring >= kVStages) sm90::mbar_wait(sy.vempty + 8 * vs, (ring / kVStages - 1) & 1);
      load_v(vs);
      sm90::cp_async_arrive(sy.vfull + 8 * vs);
    }
    if (kResBufs == 1 && first) primary();
    if (first) ahead();  // run_items: the next item, decoded while this one's copies go on
    first = false;
    ++ring;
    step();
  }
}

// Consumer side: wait for the primary tiles of the nres-th item with tiles; release() frees them.
template <int kResBufs>
__device__ __forceinline__ void wait_primary(const PingSync& sy, int nres) {
  sm90::mbar_wait(sy.res_full + 8 * res_buf<kResBufs>(nres), res_round<kResBufs>(nres) & 1);
}
template <int kResBufs>
__device__ __forceinline__ void release_primary(const PingSync& sy, int nres) {
  sm90::mbar_arrive(sy.res_empty + 8 * res_buf<kResBufs>(nres));
}

// The work-item loops of a kernel. Ping-pong: the producer warpgroup fetches items, decodes and
// posts them, and loads them (producer_item(d, ring, nres, ahead, open) returns whether the item had
// tiles; it hands `ahead` to produce(), and calls open(any) if kOpen), the consumers take them
// (consumer_item(d, ring, nres, any), same result; any: kOpen's, else -1); otherwise the CTA runs
// item blockIdx.x.
// kDecodeAhead (compiled) and p.decode_ahead (at run time): the single producer loop decodes and
// posts item n + 1 right after item n's first tile (ahead()) instead of after its last one, so
// that the decode (the plan's order, the CSR row: dependent global loads, ~2700 cycles, and the
// claim's ~1400) no longer sits between item n's last copies and item n + 1's first. Item n + 1's
// index was reserved at item n's claim (claim_item's `pending`), and the counter's next value is
// still taken after item n's copies, where item n + 1's claim took it before, so a CTA holds no
// more items ahead than before. Measured (RESULTS.md, twenty-second session): the forward's
// consumers wait ~1200 cycles less for each item's Q, and the forward is 1-4.5% faster. Compiled
// into the forward only: in dK/dV it raised the producer's spills (112 -> 246 bytes of stores) and
// the backward's A/B showed no gain (1.000-1.039, within that A/B's spread).
// kSelfReset (the forward, whose counter is a pair): the producer's thread 0 ends with
// release_work_counter.
// kLean (compiled; the D64 forward, FwdSm90Cfg::kLeanProducer) with TMA and p.lean_producer: warps
// 1-3 of the producer warpgroup exit once they have handed over their registers, and the item loop
// runs on warp 0 alone (its thread 0 issues every copy anyway); the kernel's PingSync counts 32
// copiers and barrier 3 32 threads. They had run the whole loop beside warp 0 (decodes, lookups,
// barrier arrivals), in issue slots the consumers' softmax shares. They leave through an inline
// `exit`: a C++ return or a branch around the loop there made ptxas spill ~1.4 KB in the forwards.
// kChunks (compiled into the forward, dK/dV and the recompute dQ kernel) with Params::chunk_shift > 0:
// a claim may take several consecutive items (claim_item: neighbouring rows of one head, or one split
// row's heads), which the producer then runs without a counter read. H200, twenty-ninth session:
// chunks of two take 1-2.5% off a forward of one to three blocks a row and ~1% off the D64 backward
// there (attention.cu: item_chunk_shift). The trace puts the gain in the second item's tiles, most of
// which the CTA has just loaded, not in its decode (RESULTS.md).
// kRebalance: the producer hands registers to the consumers (setmaxnreg); a kernel whose consumers
// need few keeps the launch's split.
// kSplit (compiled) and p.split_producer (at run time; the kernel's PingSync made with it): the
// producer warpgroup splits so that decoding an item (the counter, the plan's order, the CSR row:
// a chain of dependent global loads, ~4500 cycles under load) no longer sits between one item's
// last copies and the next item's first. Warp 1 fetches and decodes each item while warps 0, 2 and
// 3 copy the previous one's tiles, and posts it to the mailbox, from which the copying warps take
// it as the consumers do. It decodes one item ahead of them (named barrier 3: the copying warps'
// warp 0 arrives once it took an item), and takes each item from the counter only then, so a CTA
// holds no more items ahead than one producer loop does. Measured (RESULTS.md, twenty-first
// session): the dQ-from-dS consumers had waited ~3000 cycles for each item's first tile, and the
// kernel is 3-8% faster at S16k, 2-3% slower at S64k (13 tiles an item, one head a launch). Compiled
// into that kernel only, which keeps the launch's registers (kRebalance false): in the kernels that
// hand the consumers 240 registers ptxas spilled the 24-register producer (480-900 bytes of spill
// stores against 30-110), and dK/dV ran 1.5-1.9x slower, the recompute dQ at D128 (block 64's
// backward) ~10% slower; the forward gained nothing.
// kOpenAt (compiled; > 0: open_item's offset) and p.post_lookup (at run time): the producer hands
// each item to the consumers only once its producer_item has looked up the item's first tile pair
// (open(any), which such a producer_item calls on every path), with the result (open_item), so the
// consumers skip that lookup, 650-980 cycles of dependent global loads a warpgroup at an item's
// start (RESULTS.md, twenty-second session); the ring slots' records tell them the rest. Measured
// against the build without it (RESULTS.md, twenty-fourth session): the D64 forward 1.5-2.3%
// faster. Compiled into the D64 forward only (FwdSm90Cfg::kPostLookup): in the D128 forward this
// form measured 0.998-1.005 of the time without it (a first form, which changed every kernel's
// mailbox, left it 2.5% slower at S16k local 2.5%: twenty-third session), and dK/dV gained
// nothing (fwd+bwd 0.997-1.002).
template <bool kPing, int kWG, bool kRebalance = true, bool kSplit = false, bool kDecodeAhead = false,
          int kOpenAt = 0, bool kSelfReset = false, bool kLean = false, bool kChunks = false, int kParts = 1,
          int kRegs = kConsumerRegs, class ProducerItem, class ConsumerItem>
__device__ __forceinline__ void run_items(const Params& p, const PingSync& sy, int wg, int ltid,
                                          ProducerItem producer_item, ConsumerItem consumer_item) {
  constexpr bool kOpen = kOpenAt > 0;
  static_assert(!(kOpen && kSplit), "the split producer's decoding warp posts its items itself");
  static_assert(!(kSelfReset && kSplit), "the split producer's claims are not followed by a reset");
  static_assert(!(kLean && kSplit), "a lean producer is one warp, a split one four");
  int ring = 0, nres = 0;
  if constexpr (kPing) {
    if (wg == kWG) prefetch_plan(p, ltid);  // before the producer's registers go to the consumers
    if (kSplit && wg == kWG && p.split_producer) {
      if constexpr (kRebalance) sm90::regs_decrease<kProducerRegs>();
      if (ltid / 32 == 1) {
        int unused = 0;
        for (int n = 0;; ++n) {
          if (n >= 1) sm90::named_sync(3, 64);  // the copying warps took item n - 1
          int item = -1;
          if (ltid == 32) item = claim_item<false>(sy, p, n, unused);
          item = __shfl_sync(0xffffffffu, item, 0);
          ItemInfo d{};
          d.item = item;
          if (item >= 0) d = describe_item<kParts>(p, item);
          if (ltid == 32) post_item(sy, n, 0, d);
          if (item < 0) break;
        }
        return;
      }
      for (int n = 0;; ++n) {
        const ItemInfo d = take_item(sy, n);
        if (d.item < 0) break;
        if (ltid < 32) sm90::named_arrive(3, 64);
        if (producer_item(d, ring, nres, NoHook{}, NoOpen{})) ++nres;
      }
      cp_async_wait<0>();
      return;
    }
    if (wg == kWG) {
      if constexpr (kRebalance) sm90::regs_decrease<kProducerRegs>();
      // The threads that run the loop: 32 when lean (kLean above). Read from the parameters at each
      // use: a register held across the loop spilled the D64 producer.
      auto nprod = [&p]() { return producer_lean<kLean>(p) ? 32 : 128; };
      int pending = 0;
      const bool late = kOpen && p.post_lookup;  // producer_item opens each item
      auto opener = [&](int n) {
        if constexpr (kOpen) {
          return [&sy, ltid, late, n](bool any) {
            if (late) open_item<kOpenAt>(sy, n, ltid, any ? 1 : 0);
          };
        } else {
          return NoOpen{};
        }
      };
      if (nprod() == 32 && ltid >= 32) asm volatile("exit;");  // warps 1-3 of a lean producer
      if (kDecodeAhead && p.decode_ahead) {
        ItemInfo d{};
        d.item = fetch_item<false, kChunks>(sy, p, 0, ltid, pending, nprod());
        if (d.item >= 0) d = describe_item<kParts>(p, d.item);
        post_or_write<kOpenAt>(sy, 0, ltid, d, late);
        if (ltid == 0) reserve_item<kChunks>(sy, p, 0, pending);
        for (int n = 0; d.item >= 0; ++n) {
          bool posted = false;
          auto ahead = [&]() {  // item n + 1 (its index reserved already), decoded and posted
            if (posted) return;
            posted = true;
            ItemInfo dn{};
            dn.item = fetch_item<false, kChunks>(sy, p, n + 1, ltid, pending, nprod());
            if (dn.item >= 0) dn = describe_item<kParts>(p, dn.item);
            post_or_write<kOpenAt>(sy, n + 1, ltid, dn, late);
          };
          if (producer_item(d, ring, nres, ahead, opener(n))) ++nres;
          ahead();  // an item without tiles
          if (ltid == 0) reserve_item<kChunks>(sy, p, n + 1, pending);  // where the old claim of item n + 1 took it
          sm90::named_sync(3, nprod());  // thread 0's post of item n + 1, to every producer thread
          d = read_item(sy, n + 1);
        }
      } else {
        for (int n = 0;; ++n) {
          const int item = fetch_item<true, kChunks>(sy, p, n, ltid, pending, nprod());
          ItemInfo d{};
          d.item = item;
          if (item >= 0) d = describe_item<kParts>(p, item);
          post_or_write<kOpenAt>(sy, n, ltid, d, late);
          if (item < 0) break;
          if (producer_item(d, ring, nres, NoHook{}, opener(n))) ++nres;
        }
      }
      if (kSelfReset && ltid == 0) release_work_counter(p);
      cp_async_wait<0>();
      return;
    }
    if constexpr (kRebalance) sm90::regs_increase<kRegs>();
    // Warpgroup 0's first turn of an item is opened by warpgroup 1 ahead of time: here for the
    // first item, then by warpgroup 1's last turn of each item (run_tiles), so warpgroup 0 starts
    // the next item while 1 still finishes and stores the last one. The arrival left open after the
    // last item is taken here, before the CTA exits.
    if (kWG == 2 && wg == 1) sm90::named_arrive(1, 128 * kWG);
    for (int n = 0;; ++n) {
      int any = -1;  // kOpen: the producer's lookup (take_item)
      const ItemInfo d = take_item<kOpenAt>(sy, n, &any);
      if (d.item < 0) break;
      if (consumer_item(d, ring, nres, any)) ++nres;
    }
    if (kWG == 2 && wg == 0) sm90::named_sync(1, 128 * kWG);
  } else {
    consumer_item(describe_item<kParts>(p, static_cast<int>(blockIdx.x)), ring, nres, -1);
  }
}

// A ping-pong producer's copy of a [kRows][kD] tile, rows row0.. of head h, batch b of a [B][S][H][D]
// tensor (g: its (b, h) rows, `map` its TMA descriptor), into `dst`, counted on `bar`: with the
// host's tensor maps (p.tma) producer thread 0 issues it as TMA boxes, else the 128 producer
// threads copy it with cp.async; either way every producer thread arrives on bar afterwards.
// TMA keeps the per-tile address arithmetic of the copies (in cp.async form ~30% of the forward
// consumers' instruction count at short rows) off the issue slots the consumers' softmax needs.
template <typename T, int kRows, int kD>
__device__ __forceinline__ void produce_tile(const Params& p, const CUtensorMap& map, uint32_t dst, const T* g,
                                             int64_t row_stride, int row0, int valid_rows, int h, int b,
                                             uint32_t bar, int ltid) {
  if (p.tma == 0) return sm90::load_tile<T, kRows, kD, 128>(dst, g, row_stride, row0, valid_rows, p.D, ltid);
  if (ltid == 0) sm90::tma_tile<kRows, kD>(dst, &map, row0, h, b, bar);
}

// A forward / dQ work item: its query tile, the q / k / v rows it reads, and the cursor over the
// key tiles that hold an allowed element: current and next (_n); `stage` is the ring slot of the
// current one. `pieces`: the item may be a piece of a split row (forward), which starts at its
// first entry.
// Ping-pong consumers do not walk: consume<true> follows the producer's records (publish()), land()
// reads the current tile's once its slot is full; `more`: the item has a current tile (the first
// one from start(), or from the producer's lookup: start_posted(), run_items' kOpen), `last`:
// it is the item's last. consume<false> walks the tile lists itself.
template <typename T, int kBM, int kBN, int kStages, bool kPieces>
struct QueryItem {
  QueryTile W;
  const T *q = nullptr, *k = nullptr, *v = nullptr;
  int it = 0, kt = 0, state = 0, stage = 0, kt_n = 0, state_n = 0, nx = 0, last = 0;
  uint64_t msk = 0, msk_n = 0;
  bool more = false;

  __device__ __forceinline__ void start(const Params& p, const ItemInfo& d) {
    W = make_query_tile(p, kBM, d);
    q = static_cast<const T*>(p.q) + W.b * p.q_sb + W.h * p.q_sh;
    k = static_cast<const T*>(p.k) + W.b * p.k_sb + W.hk * p.k_sh;
    v = static_cast<const T*>(p.v) + W.b * p.v_sb + W.hk * p.v_sh;
    it = next_pair(W.E, W.R, p.tl.full, kPieces ? W.e0 : 0, W.m0, kBM, kBN, kt, msk, state);
    nx = W.E.n;
    more = has();
  }
  // A ping-pong consumer's start with the producer's lookup (run_items, kOpen; any -1: none posted).
  __device__ __forceinline__ void start_posted(const Params& p, const ItemInfo& d, int any) {
    if (any < 0) return start(p, d);
    W = make_query_tile(p, kBM, d);
    more = any != 0;
  }
  __device__ __forceinline__ bool has() const { return it < W.E.n; }
  __device__ __forceinline__ void next(const Params& p) {
    nx = next_pair(W.E, W.R, p.tl.full, it + 1, W.m0, kBM, kBN, kt_n, msk_n, state_n);
  }
  __device__ __forceinline__ bool has_next() const { return nx < W.E.n; }
  __device__ __forceinline__ void advance() {
    stage = stage + 1 == kStages ? 0 : stage + 1;
    it = nx;
    kt = kt_n;
    msk = msk_n;
    state = state_n;
  }
  // Producer thread 0: the current tile's record (has_next(): the lookahead made before its slot
  // was free).
  __device__ __forceinline__ void publish(volatile TileRecord& r, uint32_t full) const {
    publish_record(r, full, kt, state, msk, !has_next());
  }
  __device__ __forceinline__ void land(const volatile TileRecord& r) { last = read_record(r, kt, state, msk); }
  // The consumers' loop over this item's tiles (run_tiles), following the producer's records in
  // `rec` (kRecords: ping-pong) or walking; load_next(st, tile) as run_tiles' load_next, the other
  // callables as run_tiles'.
  template <int kSched, bool kTwoTurns, bool kRecords, class LoadNext, class Scores, class Compute, class Last,
            class Done, class Release>
  __device__ __forceinline__ void consume(const Params& p, int& ring, int wg, int consumers, const PingSync& sy,
                                          const volatile TileRecord* rec, LoadNext load_next, Scores scores,
                                          Compute compute, Last last_products, Done done, Release release) {
    run_tiles<kSched, kStages, kTwoTurns>(
        stage, ring, wg, consumers, sy, [&]() { return kRecords ? more : has(); },
        [&]() {
          if constexpr (!kRecords) next(p);
        },
        [&]() { return kRecords ? last == 0 : has_next(); },
        [&]() {
          if constexpr (kRecords) {
            stage = stage + 1 == kStages ? 0 : stage + 1;
            more = last == 0;
          } else {
            advance();
          }
        },
        [&](int st) { load_next(st, kt_n); }, scores, compute, last_products, done, release,
        [&]() { land(rec[stage]); });
  }
  // The current tile's K (V) into slot st of the ring at s0, counted on bar (produce_tile).
  template <int kD, int kKVBytes>
  __device__ __forceinline__ void produce_k(const Params& p, uint32_t s0, int st, uint32_t bar, int ltid) const {
    produce_tile<T, kBN, kD>(p, p.tma_k, s0 + st * kKVBytes, k, p.k_ss, kt * kBN, p.Sk, W.hk, W.b, bar, ltid);
  }
  template <int kD, int kKVBytes>
  __device__ __forceinline__ void produce_v(const Params& p, uint32_t s0, int st, uint32_t bar, int ltid) const {
    produce_tile<T, kBN, kD>(p, p.tma_v, s0 + st * kKVBytes, v, p.v_ss, kt * kBN, p.Sk, W.hk, W.b, bar, ltid);
  }
  // K and V rows of key tile `tile` into ring slot st (tiles kKVBytes apart from sK0 / sV0), copied
  // by kLoaders threads (lockstep schedules).
  template <int kD, int kLoaders, int kKVBytes>
  __device__ __forceinline__ void load_kv(const Params& p, uint32_t sK0, uint32_t sV0, int st, int tile,
                                          int ltid) const {
    sm90::load_tile<T, kBN, kD, kLoaders>(sK0 + st * kKVBytes, k, p.k_ss, tile * kBN, p.Sk, p.D, ltid);
    sm90::load_tile<T, kBN, kD, kLoaders>(sV0 + st * kKVBytes, v, p.v_ss, tile * kBN, p.Sk, p.D, ltid);
  }
};

// ---------------------------------------------------------------------------------------------
// Forward
// ---------------------------------------------------------------------------------------------

// A warpgroup's 64 output rows, divided by their softmax sums l (quad-reduced), into the [64][kD]
// SW128 tile at sO (stmatrix; what tma_store_tile sends). w4: the warp in the warpgroup.
template <typename T, int kD>
__device__ __forceinline__ void stage_fwd_rows(uint32_t sO, const float (&acc)[kD / 8][4], const float (&l)[2],
                                               int w4, int lane) {
  const float inv[2] = {row_inv_sum(l[0]), row_inv_sum(l[1])};
#pragma unroll
  for (int c2 = 0; c2 < kD / 16; ++c2) {
    const float(&a)[4] = acc[2 * c2];
    const float(&b)[4] = acc[2 * c2 + 1];
    sm90::stmatrix_x4(sm90::sw128_x4_addr<64>(sO, w4 * 16, c2, lane), MmaOp<T>::pack(a[0] * inv[0], a[1] * inv[0]),
                      MmaOp<T>::pack(a[2] * inv[1], a[3] * inv[1]), MmaOp<T>::pack(b[0] * inv[0], b[1] * inv[0]),
                      MmaOp<T>::pack(b[2] * inv[1], b[3] * inv[1]));
  }
}

// Online softmax (log2 domain) of S, the scores of 16 rows a warp (from row `row` of the query tile
// at m0) against kBN keys from `col`: masks them (state 2: per element, with the rules R and the
// membership mask msk), updates the rows' running max mrow and sum lrow, writes the probabilities
// to Pc (A fragments) and the factor the output rows must be rescaled by to corr. The row max
// is taken over the raw scores and scaled once a row (a positive scale keeps the order), so each
// score meets the scale once, inside the exponent (RESULTS.md, fifteenth session: +1-8% at long
// rows); partial maxima and sums shorten the dependency chains. A scale <= 0 (legal, if odd)
// scales the scores before the masks, so that masked ones are -inf after scaling either way.
template <typename T, int kBN, bool kLazy>
__device__ __forceinline__ void fwd_softmax(float (&S)[kBN / 8][4], uint32_t (&Pc)[kBN / 16][4], float (&mrow)[2],
                                            float (&lrow)[2], float (&corr)[2], float sl2, int state, const Rules& R,
                                            const TileList& tl, uint64_t msk, int m0, int row, int col, int g, int t4) {
  sm90::fence_regs(S);
  const bool positive = sl2 > 0.f;
  if (!positive) {
#pragma unroll
    for (int nt = 0; nt < kBN / 8; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) S[nt][e] *= sl2;
  }
  if (state == 2) mask_tile<kBN / 8, false>(S, R, tl, msk, m0, row, col, g, t4, -INFINITY);
  const float exp_scale = positive ? sl2 : 1.f;
  float part[4] = {-INFINITY, -INFINITY, -INFINITY, -INFINITY};
#pragma unroll
  for (int nt = 0; nt < kBN / 8; ++nt)
#pragma unroll
    for (int e = 0; e < 4; ++e) part[e] = fmaxf(part[e], S[nt][e]);
  float mx[2], base[2];
  bool reduce = true;  // the quad reduction of the row maxima
  if constexpr (kLazy) {
    bool mine = false;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const float pm = fmaxf(part[2 * r], part[2 * r + 1]);
      mine |= pm != -INFINITY && pm * exp_scale > mrow[r] + kLazyHeadroom;
    }
    reduce = __any_sync(0xffffffffu, mine);
    if (!reduce) {  // every row of the warp keeps its max
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        corr[r] = 1.f;
        base[r] = mrow[r] == -INFINITY ? 0.f : mrow[r];
      }
    }
  }
#pragma unroll
  for (int r = 0; r < 2 && reduce; ++r) {
    mx[r] = quad_max(fmaxf(part[2 * r], part[2 * r + 1]));
    const float tile_max = mx[r] == -INFINITY ? -INFINITY : mx[r] * exp_scale;
    if constexpr (kLazy) {
      const bool raise = tile_max > mrow[r] + kLazyHeadroom;  // always for the first finite max
      corr[r] = raise ? fast_exp2(mrow[r] - tile_max) : 1.f;
      mrow[r] = raise ? tile_max : mrow[r];
      base[r] = mrow[r] == -INFINITY ? 0.f : mrow[r];
    } else {
      mx[r] = fmaxf(mrow[r], tile_max);
      base[r] = mx[r] == -INFINITY ? 0.f : mx[r];
      corr[r] = fast_exp2(mrow[r] - base[r]);
      mrow[r] = mx[r];
    }
  }
  float sum[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
  for (int nt = 0; nt < kBN / 8; ++nt) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      S[nt][e] = fast_exp2(fmaf(S[nt][e], exp_scale, -base[e >> 1]));
      sum[e] += S[nt][e];
    }
  }
  lrow[0] = lrow[0] * corr[0] + (sum[0] + sum[1]);
  lrow[1] = lrow[1] * corr[1] + (sum[2] + sum[3]);
#pragma unroll
  for (int kk = 0; kk < kBN / 16; ++kk) to_a_frag<T>(Pc[kk], S, kk);
}

// O += P V: a warpgroup's 64 output rows (acc, kOut columns) from its probabilities P (A fragments)
// and the [kBN][kD] V tile at sV; issued and committed, not waited for.
template <typename T, int kBN, int kOut>
__device__ __forceinline__ void fwd_pv(float (&acc)[kOut / 8][4], const uint32_t (&P)[kBN / 16][4], uint32_t sV) {
  sm90::fence_regs(acc);
  sm90::fence();
#pragma unroll
  for (int kk = 0; kk < kBN / 16; ++kk) sm90::Wgmma<kOut, T>::template rs<1>(acc, P[kk], sm90::desc_mn<kBN>(sV, kk), 1);
  sm90::commit();
}
// The output rows times the softmax's corr (kLazy: skipped where no row of the warp moved).
template <bool kLazy, int kOut>
__device__ __forceinline__ void fwd_rescale(float (&acc)[kOut / 8][4], const float (&corr)[2]) {
  if constexpr (kLazy) {
    if (!__any_sync(0xffffffffu, corr[0] != 1.f || corr[1] != 1.f)) return;
  }
#pragma unroll
  for (int i = 0; i < kOut / 8; ++i) {
    acc[i][0] *= corr[0];
    acc[i][1] *= corr[0];
    acc[i][2] *= corr[1];
    acc[i][3] *= corr[1];
  }
}
// The lse of this thread's two rows (row + g and + 8 of the query tile), written by each quad's first
// thread; l: the rows' quad-reduced sums.
__device__ __forceinline__ void store_fwd_lse(const Params& p, const QueryTile& W, int row, const float (&mrow)[2],
                                              const float (&l)[2], int g, int t4) {
  if (t4 != 0) return;
  float* at = &lse_at(p, W.b, W.h, 0);  // the head's row 0, computed once for both rows
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int i = W.m0 + row + g + r * 8;
    if (i < p.Sq) at[i] = row_lse(mrow[r], l[r]);
  }
}

template <typename T, int kD, int kWG, int kBN, int kSchedM>
__global__ void __launch_bounds__(FwdSm90Cfg<kD, kWG, kBN, kSchedM>::kThreads,
                                  FwdSm90Cfg<kD, kWG, kBN, kSchedM>::kCtasPerSm) fwd_sm90_kernel(const __grid_constant__ Params p) {
#if DS_SM90_BODY
  using Cfg = FwdSm90Cfg<kD, kWG, kBN, kSchedM>;
  constexpr int kSched = Cfg::kSched;
  constexpr int kBM = Cfg::kBM, kNT = Cfg::kConsumers, kStages = Cfg::kStages;
  constexpr int kLoaders = Cfg::kPing ? 128 : kNT;  // the threads that issue the copies
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const uint32_t sRes0 = align1024(smem_u32(smem_raw));  // [kResBufs] Q
  const uint32_t sK0 = sRes0 + Cfg::kResBufs * Cfg::kResBytes;
  uint32_t sQ = sRes0;  // the current item's
  const uint32_t sV0 = sK0 + kStages * Cfg::kKVBytes;
  const uint32_t sO0 = sV0 + Cfg::kVSlots * Cfg::kKVBytes;  // [kBM][kD] output staging (kOBytes)
  const uint32_t sbar = sO0 + Cfg::kOBytes;
  const PingSync sy = make_ping_sync<Cfg::kPing>(sbar, smem_raw + (sbar - smem_u32(smem_raw)), kStages, kNT,
                                                 Cfg::Base::kVStages, Cfg::kPing ? 1 : 0, false,
                                                 producer_lean<Cfg::kLeanProducer>(p));
  // [kStages] TileRecord (ping-pong)
  volatile TileRecord* rec = reinterpret_cast<volatile TileRecord*>(smem_raw + (sbar + Cfg::kBarBytes - smem_u32(smem_raw)));
  // Then, with Cfg::kPostLookup, [2] 32-bit words: the producer's lookups (run_items, kOpenAt).

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane / 4, t4 = lane % 4;
  const int wg = sm90::warpgroup_index();
  const int wrow = warp * 16;  // this warp's first row in the tile
  const int ltid = Cfg::kPing ? tid - kNT : tid;

  // The current work item and its cursor (QueryItem).
  QueryItem<T, kBM, kBN, kStages, true> C;
  const QueryTile& W = C.W;
  // With a staging tile and TMA, an unsplit item's output rows go out as TMA stores (one thread of
  // each warpgroup issues its 64 rows'): no quad transposes or per-store addresses in the epilogue,
  // which is on the item boundary's critical path (RESULTS.md, eleventh session: 2-3% at D64).
  // kFwdTwoItems: each consumer warp stores its own rows (16-row boxes), so each warp's lane 0.
  const bool o_issuer = lane == 0 && (Cfg::kTwoItems || warp % 4 == 0);
  constexpr int kBarO = 4;  // + wg: a consumer warpgroup's own barrier
  auto has = [&]() { return C.has(); };
  auto next = [&]() { C.next(p); };
  auto advance = [&]() { C.advance(); };
  auto load_q = [&]() { sm90::load_tile<T, kBM, kD, kLoaders>(sQ, C.q, p.q_ss, W.m0, p.Sq, p.D, ltid); };
  auto load_kv = [&](int st, int tile) { C.template load_kv<kD, kLoaders, Cfg::kKVBytes>(p, sK0, sV0, st, tile, ltid); };

  auto use_buffer = [&](int nres) { sQ = sRes0 + res_buf<Cfg::kResBufs>(nres) * Cfg::kResBytes; };
  auto producer_item = [&](const ItemInfo& d, int& ring, int nres, auto ahead, auto open) {
    use_buffer(nres);
    C.start(p, d);
    open(has());
    if (!has()) return false;
    // The producer looks one tile ahead (next() after each step, while it waits for a free slot),
    // so a slot's record, `last` included, goes out with its copies.
    next();
    // Ring slot st takes the tile's K and V, or only K with a separate V ring (slot vs).
    produce<kStages, Cfg::kResBufs, Cfg::Base::kVStages>(
        sy, ring, nres, has,
        [&](int st) {
          C.template produce_k<kD, Cfg::kKVBytes>(p, sK0, st, sy.full + 8 * st, ltid);
          if constexpr (Cfg::Base::kVStages == 0) C.template produce_v<kD, Cfg::kKVBytes>(p, sV0, st, sy.full + 8 * st, ltid);
          if (ltid == 0) C.publish(rec[st], sy.full + 8 * st);
        },
        [&](uint32_t bar) { produce_tile<T, kBM, kD>(p, p.tma_q, sQ, C.q, p.q_ss, W.m0, p.Sq, W.h, W.b, bar, ltid); },
        [&]() {
          advance();
          if (has()) next();
        },
        ahead, [&](int vs) { C.template produce_v<kD, Cfg::kKVBytes>(p, sV0, vs, sy.vfull + 8 * vs, ltid); });
    return true;
  };

  auto consumer_item = [&](const ItemInfo& d, int& ring, int nres, int posted_any) {
    use_buffer(nres);
    bool any;
    // start_posted(-1) is start(), but calling it in every forward changed the D128 kernel's SASS.
    if constexpr (Cfg::kPostLookup) {
      C.start_posted(p, d, posted_any);
      any = C.more;
    } else {
      C.start(p, d);
      any = has();
    }
    uint32_t QA[Cfg::kQRegs ? Cfg::kScoreK / 16 : 1][4];  // kQRegs: this warpgroup's Q rows, A fragments
    if constexpr (Cfg::kPing) {
      if (any) wait_primary<Cfg::kResBufs>(sy, nres);
      if constexpr (Cfg::kQRegs) {
        if (any) {
#pragma unroll
          for (int kk = 0; kk < Cfg::kScoreK / 16; ++kk) ldsm_x4(QA[kk], sm90::sw128_x4_addr<kBM>(sQ, wrow, kk, lane));
          release_primary<Cfg::kResBufs>(sy, nres);
        }
      }
    } else {
      load_q();
      if (any) load_kv(0, C.kt);
      cp_async_commit();
    }
    constexpr int kOut = Cfg::kOutCols;
    float acc[kOut / 8][4], S[kBN / 8][4];
#pragma unroll
    for (int i = 0; i < kOut / 8; ++i) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.f;
#pragma unroll
    for (int i = 0; i < kBN / 8; ++i) S[i][0] = S[i][1] = S[i][2] = S[i][3] = 0.f;
    float mrow[2] = {-INFINITY, -INFINITY}, lrow[2] = {0.f, 0.f}, corr[2] = {1.f, 1.f};
    const float sl2 = p.scale_log2;
    uint32_t P[2][kBN / 16][4];

    // S = Q K^T of the current tile (this warpgroup's 64 rows x kBN keys).
    auto scores = [&]() {
      const uint32_t sK = sK0 + C.stage * Cfg::kKVBytes;
      sm90::fence_regs(S);
      sm90::fence();
#pragma unroll
      for (int kk = 0; kk < Cfg::kScoreK / 16; ++kk) {
        if constexpr (Cfg::kQRegs) {
          sm90::Wgmma<kBN, T>::template rs<0>(S, QA[kk], sm90::desc_k<kBN>(sK, 0, kk), kk > 0 ? 1 : 0);
        } else {
          sm90::Wgmma<kBN, T>::template ss<0>(S, sm90::desc_k<kBM>(sQ, wg * 64, kk),
                                              sm90::desc_k<kBN>(sK, 0, kk), kk > 0 ? 1 : 0);
        }
      }
      sm90::commit();
    };
    auto softmax = [&](auto c) {
      fwd_softmax<T, kBN, Cfg::kLazy>(S, P[c], mrow, lrow, corr, sl2, C.state, W.R, p.tl, C.msk, W.m0, wrow,
                                      C.kt * kBN, g, t4);
    };
    // O += P[c] V with the V tile of slot st.
    auto pv = [&](auto c, int st) { fwd_pv<T, kBN, kOut>(acc, P[c], sV0 + st * Cfg::kKVBytes); };
    auto rescale = [&]() { fwd_rescale<Cfg::kLazy, kOut>(acc, corr); };
    // Ping-pong: the walk follows the producer's records; otherwise every consumer walks.
    // The Q buffer is released after the item's last scores, or at its start with Q in registers.
    C.template consume<kSched, false, Cfg::kPing>(p, ring, wg, kNT, sy, rec, load_kv, scores, softmax, pv, rescale, [&]() {
      if constexpr (!Cfg::kQRegs) release_primary<Cfg::kResBufs>(sy, nres);
    });
    sm90::wait<0>();
    sm90::fence_regs(acc);
    if constexpr (!Cfg::kPing) cp_async_wait<0>();
    if (Cfg::kOBytes > 0 && p.tma != 0 && W.slot < 0) {
      const uint32_t sO = sO0 + wg * (64 * kD * 2);
      const float l[2] = {quad_sum(lrow[0]), quad_sum(lrow[1])};
      if (o_issuer) sm90::bulk_wait_read();  // the previous item's store has read the tile
      sm90::named_sync(kBarO + wg, 128);
      // kNarrowOut: the first kOut columns of the staging tile; the TMA store clips the rest (past D).
      stage_fwd_rows<T, kOut>(sO, acc, l, warp % 4, lane);
      sm90::fence_async_smem();  // the writes, before the async proxy reads them
      sm90::named_sync(kBarO + wg, 128);
      if (o_issuer) sm90::tma_store_tile<64, kD>(sO, &p.tma_o, W.m0 + wg * 64, W.h, W.b);
      // The lse after the fence and the store: written before them, the D64 forward gained nothing.
      store_fwd_lse(p, W, wrow, mrow, l, g, t4);
    } else {
      store_fwd_rows<T, kOut>(p, W, kBM, acc, mrow, lrow, wrow, g, t4);
    }
    return any;
  };
  // kFwdTwoItems: the one consumer warpgroup walks the item's two 64-row halves on each key tile j:
  // S = Q_0 K_j^T, then (j > 0) O_1 += P_1 V_{j-1}; half 0's softmax under that product; S = Q_1
  // K_j^T and O_0 += P_0 V_j; half 1's softmax under P_0 V_j. Slot j - 1 is released once P_1
  // V_{j-1} retired, the Q buffer after the last tile's S = Q_1 K^T.
  auto consumer_two = [&](const ItemInfo& d, int& ring, int nres, int posted_any) {
    use_buffer(nres);
    C.start_posted(p, d, posted_any);
    const bool any = C.more;
    if (any) wait_primary<Cfg::kResBufs>(sy, nres);
    constexpr int kOut = Cfg::kOutCols;
    float acc[2][kOut / 8][4], S[kBN / 8][4];
#pragma unroll
    for (int h = 0; h < 2; ++h)
#pragma unroll
      for (int i = 0; i < kOut / 8; ++i) acc[h][i][0] = acc[h][i][1] = acc[h][i][2] = acc[h][i][3] = 0.f;
#pragma unroll
    for (int i = 0; i < kBN / 8; ++i) S[i][0] = S[i][1] = S[i][2] = S[i][3] = 0.f;
    float mrow[2][2] = {{-INFINITY, -INFINITY}, {-INFINITY, -INFINITY}}, lrow[2][2] = {{0.f, 0.f}, {0.f, 0.f}};
    float corr[2][2] = {{1.f, 1.f}, {1.f, 1.f}};
    uint32_t P[2][kBN / 16][4];
    auto scores = [&](auto h) {
      const uint32_t sK = sK0 + C.stage * Cfg::kKVBytes;
      sm90::fence_regs(S);
      sm90::fence();
#pragma unroll
      for (int kk = 0; kk < Cfg::kScoreK / 16; ++kk)
        sm90::Wgmma<kBN, T>::template ss<0>(S, sm90::desc_k<kBM>(sQ, decltype(h)::value * 64, kk),
                                            sm90::desc_k<kBN>(sK, 0, kk), kk > 0 ? 1 : 0);
      sm90::commit();
    };
    auto pv = [&](auto h, int st) {
      fwd_pv<T, kBN, kOut>(acc[decltype(h)::value], P[decltype(h)::value], sV0 + st * Cfg::kKVBytes);
    };
    auto rescale = [&](auto h) { fwd_rescale<Cfg::kLazy, kOut>(acc[decltype(h)::value], corr[decltype(h)::value]); };
    if (any) {
      bool first = true;
      int last_stage = 0;
      while (C.more) {
        sm90::mbar_wait(sy.full + 8 * C.stage, (ring / kStages) & 1);
        C.land(rec[C.stage]);
        sm90::fence_async_smem();
        scores(Set0{});
        if (first) {
          sm90::wait<0>();
        } else {
          pv(Set1{}, last_stage);
          sm90::wait<1>();  // S of half 0; P_1 V_{j-1} may still run
        }
        fwd_softmax<T, kBN, Cfg::kLazy>(S, P[0], mrow[0], lrow[0], corr[0], p.scale_log2, C.state, W.R, p.tl, C.msk,
                                        W.m0, wrow, C.kt * kBN, g, t4);
        if (!first) {
          sm90::wait<0>();
          sm90::mbar_arrive(sy.empty + 8 * last_stage);  // slot j - 1 no longer read
        }
        rescale(Set0{});
        scores(Set1{});
        pv(Set0{}, C.stage);
        sm90::wait<1>();  // S of half 1; P_0 V_j may still run
        if (C.last != 0) release_primary<Cfg::kResBufs>(sy, nres);
        fwd_softmax<T, kBN, Cfg::kLazy>(S, P[1], mrow[1], lrow[1], corr[1], p.scale_log2, C.state, W.R, p.tl, C.msk,
                                        W.m0, 64 + wrow, C.kt * kBN, g, t4);
        sm90::wait<0>();
        rescale(Set1{});
        first = false;
        last_stage = C.stage;
        ++ring;
        C.stage = C.stage + 1 == kStages ? 0 : C.stage + 1;
        C.more = C.last == 0;
      }
      pv(Set1{}, last_stage);
      sm90::wait<0>();
      sm90::mbar_arrive(sy.empty + 8 * last_stage);
    }
    sm90::fence_regs(acc[0]);
    sm90::fence_regs(acc[1]);
    if (Cfg::kOBytes > 0 && p.tma != 0 && W.slot < 0) {
      // Each warp stages its 16 rows of each half and stores them itself (tma_o has 16-row boxes
      // for this kernel): no warpgroup barrier on the item boundary. The lane and warp are re-read
      // so that the staging addresses are computed here, not spilled (sm90::lane_here).
      const int ln = sm90::lane_here(), w4 = sm90::tid_here() / 32 % 4;
      const float l[2][2] = {{quad_sum(lrow[0][0]), quad_sum(lrow[0][1])}, {quad_sum(lrow[1][0]), quad_sum(lrow[1][1])}};
      if (ln == 0) sm90::bulk_wait_read();  // this warp's previous stores have read its rows
      __syncwarp();
      stage_fwd_rows<T, kOut>(sO0, acc[0], l[0], w4, ln);
      stage_fwd_rows<T, kOut>(sO0 + 64 * kD * 2, acc[1], l[1], w4, ln);
      sm90::fence_async_smem();
      __syncwarp();
      if (ln == 0) {
        sm90::tma_store_tile<16, kD, 64>(sO0 + w4 * (16 * 128), &p.tma_o, W.m0 + w4 * 16, W.h, W.b);
        sm90::tma_store_tile<16, kD, 64>(sO0 + 64 * kD * 2 + w4 * (16 * 128), &p.tma_o, W.m0 + 64 + w4 * 16, W.h, W.b);
      }
      store_fwd_lse(p, W, wrow, mrow[0], l[0], g, t4);
      store_fwd_lse(p, W, 64 + wrow, mrow[1], l[1], g, t4);
    } else {
      store_fwd_rows<T, kOut>(p, W, kBM, acc[0], mrow[0], lrow[0], wrow, g, t4);
      store_fwd_rows<T, kOut>(p, W, kBM, acc[1], mrow[1], lrow[1], 64 + wrow, g, t4);
    }
    return any;
  };
  if constexpr (Cfg::kTwoItems) {
    if ((smem_u32(smem_raw) & 1023u) != 0) __trap();  // Cfg::kSlack: no room to align the tiles
    run_items<Cfg::kPing, kWG, true, false, true, Cfg::kOpenAt, true, Cfg::kLeanProducer, true, 1,
              Cfg::kConsumerRegs>(p, sy, wg, ltid, producer_item, consumer_two);
  } else {
    run_items<Cfg::kPing, kWG, true, false, true, Cfg::kOpenAt, true, Cfg::kLeanProducer, true, 1,
              Cfg::kConsumerRegs>(p, sy, wg, ltid, producer_item, consumer_item);
  }
  if (Cfg::kOBytes > 0 && wg < kWG && o_issuer) sm90::bulk_wait();  // before the CTA's memory goes
#else
  __trap();
#endif
}

// ---------------------------------------------------------------------------------------------
// Backward: dQ over the CSR rows
// ---------------------------------------------------------------------------------------------

template <typename T, int kD, int kWG, int kBN, int kSchedM>
__global__ void __launch_bounds__(DqSm90Cfg<kD, kWG, kBN, kSchedM>::kThreads, 1)
    dq_sm90_kernel(const __grid_constant__ Params p) {
#if DS_SM90_BODY
  using Cfg = DqSm90Cfg<kD, kWG, kBN, kSchedM>;
  constexpr int kSched = Cfg::kSched;
  constexpr int kBM = Cfg::kBM, kNT = Cfg::kConsumers, kStages = Cfg::kStages;
  constexpr int kLoaders = Cfg::kPing ? 128 : kNT;
  // At D128, 128-key scores leave no room for the previous tile's dS next to them.
  constexpr bool kTwoTurns = Cfg::kPing && kBN >= 128 && kD >= 128;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const uint32_t sRes0 = align1024(smem_u32(smem_raw));  // [kResBufs] {Q, dO}
  const uint32_t sK0 = sRes0 + Cfg::kResBufs * Cfg::kResBytes;
  uint32_t sQ = sRes0, sdO = sRes0 + Cfg::kQBytes;  // the current item's
  const uint32_t sV0 = sK0 + kStages * Cfg::kKVBytes;
  const uint32_t sbar = sV0 + kStages * Cfg::kKVBytes;
  const PingSync sy = make_ping_sync<Cfg::kPing>(sbar, smem_raw + (sbar - smem_u32(smem_raw)), kStages, kNT, 0,
                                                 Cfg::kPing ? 1 : 0);
  // [kStages] TileRecord (ping-pong)
  volatile TileRecord* rec = reinterpret_cast<volatile TileRecord*>(smem_raw + (sbar + Cfg::kBarBytes - smem_u32(smem_raw)));

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane / 4, t4 = lane % 4;
  const int wg = sm90::warpgroup_index();
  const int wrow = warp * 16;
  const int ltid = Cfg::kPing ? tid - kNT : tid;

  QueryItem<T, kBM, kBN, kStages, false> C;
  const QueryTile& W = C.W;
  const T* dog = nullptr;
  auto has = [&]() { return C.has(); };
  auto next = [&]() { C.next(p); };
  auto advance = [&]() { C.advance(); };
  auto start = [&](const ItemInfo& d) {
    C.start(p, d);
    dog = static_cast<const T*>(p.dout) + W.b * p.do_sb + W.h * p.do_sh;
  };
  auto load_kv = [&](int st, int tile) { C.template load_kv<kD, kLoaders, Cfg::kKVBytes>(p, sK0, sV0, st, tile, ltid); };
  auto load_q_do = [&]() {
    sm90::load_tile<T, kBM, kD, kLoaders>(sQ, C.q, p.q_ss, W.m0, p.Sq, p.D, ltid);
    sm90::load_tile<T, kBM, kD, kLoaders>(sdO, dog, p.do_ss, W.m0, p.Sq, p.D, ltid);
  };

  auto use_buffer = [&](int nres) {
    sQ = sRes0 + res_buf<Cfg::kResBufs>(nres) * Cfg::kResBytes;
    sdO = sQ + Cfg::kQBytes;
  };
  auto producer_item = [&](const ItemInfo& d, int& ring, int nres, auto ahead, auto open) {
    use_buffer(nres);
    start(d);
    if (!has()) return false;
    next();  // one tile ahead, for the records (as the forward's producer)
    produce<kStages, Cfg::kResBufs>(
        sy, ring, nres, has,
        [&](int st) {
          C.template produce_k<kD, Cfg::kKVBytes>(p, sK0, st, sy.full + 8 * st, ltid);
          C.template produce_v<kD, Cfg::kKVBytes>(p, sV0, st, sy.full + 8 * st, ltid);
          if (ltid == 0) C.publish(rec[st], sy.full + 8 * st);
        },
        [&](uint32_t bar) {
          produce_tile<T, kBM, kD>(p, p.tma_q, sQ, C.q, p.q_ss, W.m0, p.Sq, W.h, W.b, bar, ltid);
          produce_tile<T, kBM, kD>(p, p.tma_do, sdO, dog, p.do_ss, W.m0, p.Sq, W.h, W.b, bar, ltid);
        },
        [&]() {
          advance();
          if (has()) next();
        },
        ahead);
    return true;
  };

  auto consumer_item = [&](const ItemInfo& d, int& ring, int nres, int) {
    use_buffer(nres);
    start(d);
    const bool any = has();
    // lse and Delta (delta_kernel) of this thread's two rows.
    const int64_t rowbase = (static_cast<int64_t>(W.b) * p.H + W.h) * p.Sq;
    float lse2[2], dl[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int i = W.m0 + wrow + g + r * 8;
      lse2[r] = i < p.Sq ? p.lse_log2[rowbase + i] : INFINITY;
      dl[r] = i < p.Sq ? p.delta[rowbase + i] : 0.f;
    }
    if constexpr (Cfg::kPing) {
      if (any) wait_primary<Cfg::kResBufs>(sy, nres);
    } else {
      load_q_do();
      if (any) load_kv(0, C.kt);
      cp_async_commit();
    }
    constexpr int kOut = Cfg::kOutCols;
    float acc[kOut / 8][4], S[kBN / 8][4], dP[kBN / 8][4];
#pragma unroll
    for (int i = 0; i < kOut / 8; ++i) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.f;
#pragma unroll
    for (int i = 0; i < kBN / 8; ++i) {
      S[i][0] = S[i][1] = S[i][2] = S[i][3] = 0.f;
      dP[i][0] = dP[i][1] = dP[i][2] = dP[i][3] = 0.f;
    }
    const float sl2 = p.scale_log2;
    uint32_t sa[2][kBN / 16][4];

    // S = Q K^T, dP = dO V^T of the current tile.
    auto scores = [&]() {
      const uint32_t sK = sK0 + C.stage * Cfg::kKVBytes, sV = sV0 + C.stage * Cfg::kKVBytes;
      sm90::fence_regs(S);
      sm90::fence_regs(dP);
      sm90::fence();
#pragma unroll
      for (int kk = 0; kk < Cfg::kScoreK / 16; ++kk) {
        sm90::Wgmma<kBN, T>::template ss<0>(S, sm90::desc_k<kBM>(sQ, wg * 64, kk),
                                            sm90::desc_k<kBN>(sK, 0, kk), kk > 0 ? 1 : 0);
      }
#pragma unroll
      for (int kk = 0; kk < Cfg::kScoreK / 16; ++kk) {
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
      if (C.state == 2) mask_tile<kBN / 8, false>(S, W.R, p.tl, C.msk, W.m0, wrow, C.kt * kBN, g, t4, 0.f);
#pragma unroll
      for (int nt = 0; nt < kBN / 8; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) S[nt][e] *= dP[nt][e] - dl[e >> 1];
#pragma unroll
      for (int kk = 0; kk < kBN / 16; ++kk) to_a_frag<T>(sa[c][kk], S, kk);
    };
    // dQ += dS K with the K tile of slot st.
    auto ds_k = [&](auto c, int st) {
      const uint32_t sK = sK0 + st * Cfg::kKVBytes;
      sm90::fence_regs(acc);
      sm90::fence();
#pragma unroll
      for (int kk = 0; kk < kBN / 16; ++kk) {
        sm90::Wgmma<kOut, T>::template rs<1>(acc, sa[c][kk], sm90::desc_mn<kBN>(sK, kk), 1);
      }
      sm90::commit();
    };
    // Ping-pong: the walk follows the producer's records; otherwise every consumer walks.
    C.template consume<kSched, kTwoTurns, Cfg::kPing>(p, ring, wg, kNT, sy, rec, load_kv, scores, make_ds, ds_k,
                                                      [&]() { sm90::fence_regs(acc); },
                                                      [&]() { release_primary<Cfg::kResBufs>(sy, nres); });
    sm90::wait<0>();
    sm90::fence_regs(acc);
    if constexpr (!Cfg::kPing) cp_async_wait<0>();
    store_rows<T, kOut>(p.dq, acc, W.b, p.Sq, p.H, W.h, p.D, W.m0 + wrow, 0, p.scale, g, t4);
    return any;
  };
  run_items<Cfg::kPing, kWG, true, false, false, 0, false, false, true>(p, sy, wg, ltid, producer_item, consumer_item);
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
  const uint32_t sRes0 = align1024(smem_u32(smem_raw));  // [kResBufs] {K, V}
  const uint32_t sStage0 = sRes0 + Cfg::kResBufs * Cfg::kResBytes;  // [stages] {Q, dO}
  uint32_t sK = sRes0, sV = sRes0 + Cfg::kKVBytes;  // the current item's
  const uint32_t sSide0 = sStage0 + kStages * Cfg::kStageBytes;  // [stages] {lse, Delta}
  const uint32_t sbar = sSide0 + kStages * Cfg::kSideBytes;
  const PingSync sy = make_ping_sync<Cfg::kPing>(sbar, smem_raw + (sbar - smem_u32(smem_raw)), kStages, kNT, 0,
                                                 Cfg::kPing ? 1 : 0);
  // Generic pointer to the side rows, for the lse / Delta reads.
  unsigned char* const sgen = smem_raw + (sSide0 - smem_u32(smem_raw));
  auto record = [&](int st) -> volatile TileRecord& {
    return *reinterpret_cast<volatile TileRecord*>(sgen + st * Cfg::kSideBytes + Cfg::kRecOffset);
  };
  auto stage_q = [&](int st) { return sStage0 + st * Cfg::kStageBytes; };
  auto stage_do = [&](int st) { return sStage0 + st * Cfg::kStageBytes + Cfg::kQBytes; };
  auto stage_side = [&](int st) { return sSide0 + st * Cfg::kSideBytes; };
  auto stage_l = [&](int st) { return reinterpret_cast<const float*>(sgen + st * Cfg::kSideBytes); };

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane / 4, t4 = lane % 4;
  const int wg = sm90::warpgroup_index();
  const int wrow = warp * 16;  // this warp's first key in the tile
  const int ltid = Cfg::kPing ? tid - kNT : tid;

  // The current work item (key tile t of kv head hk) and its cursor over (GQA group member gg,
  // entry it): current and next (_n).
  int t = 0, b = 0, hk = 0, n0 = 0, t_sub = 0;  // t_sub: t's key sub-tile in its block (the dS panel)
  int part = 0;  // kDkvSplitCols: the item's half of the columns (its dK / dV columns part * kDO ..)
  const T *kg = nullptr, *vg = nullptr;
  Rules R;
  int gg = 0, it = 0, qt = 0, state = 0, stage = 0, gg_n = 0, it_n = 0, qt_n = 0, state_n = 0;
  uint64_t msk = 0, msk_n = 0;
  Entries E, E_n;
  // False for an item no CTA works on (see decode_key_tile).
  auto start = [&](const ItemInfo& d) {
    if (!key_tile_head(p, d.h, hk)) return false;
    t = d.t;
    b = d.b;
    n0 = t * kBN;
    if constexpr (Cfg::kParts > 1) part = d.e0;
    if constexpr (Cfg::kWriteDs) t_sub = t % p.tl.fsplit;
    kg = static_cast<const T*>(p.k) + b * p.k_sb + hk * p.k_sh;
    vg = static_cast<const T*>(p.v) + b * p.v_sb + hk * p.v_sh;
    R = make_rules(p, b);
    gg = 0;
    it = 0;
    E = entries_at(p.tl, d.base, d.n);  // slice d.s = layout_slice(p, b, hk * p.G): the group's first head
    next_group_pair(p, R, b, hk, t, n0, kBM, kBN, gg, it, E, qt, msk, state);
    E_n = E;
    return true;
  };
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
    if constexpr (Cfg::kPing) {  // the producer: counted on the slot's barrier
      const uint32_t bar = sy.full + 8 * st;
      produce_tile<T, kBM, kD>(p, p.tma_q, stage_q(st), qg, p.q_ss, tile * kBM, p.Sq, hq, b, bar, ltid);
      produce_tile<T, kBM, kD>(p, p.tma_do, stage_do(st), dog, p.do_ss, tile * kBM, p.Sq, hq, b, bar, ltid);
    } else {
      sm90::load_tile<T, kBM, kD, kLoaders>(stage_q(st), qg, p.q_ss, tile * kBM, p.Sq, p.D, ltid);
      sm90::load_tile<T, kBM, kD, kLoaders>(stage_do(st), dog, p.do_ss, tile * kBM, p.Sq, p.D, ltid);
    }
    const int64_t rowbase = (static_cast<int64_t>(b) * p.H + hq) * p.Sq;
    const uint32_t sl = stage_side(st);
    for (int i = ltid; i < kBM; i += kLoaders) {
      const int qi = tile * kBM + i;
      const bool pred = qi < p.Sq;
      cp_async4(sl + 4 * i, pred ? p.lse_log2 + rowbase + qi : p.lse_log2, pred);
      cp_async4(sl + 4 * (kBM + i), pred ? p.delta + rowbase + qi : p.delta, pred);
    }
  };
  auto load_kv = [&]() {
    sm90::load_tile<T, kBN, kD, kLoaders>(sK, kg, p.k_ss, n0, p.Sk, p.D, ltid);
    sm90::load_tile<T, kBN, kD, kLoaders>(sV, vg, p.v_ss, n0, p.Sk, p.D, ltid);
  };

  auto use_buffer = [&](int nres) {
    sK = sRes0 + res_buf<Cfg::kResBufs>(nres) * Cfg::kResBytes;
    sV = sK + Cfg::kKVBytes;
  };
  auto producer_item = [&](const ItemInfo& d, int& ring, int nres, auto ahead, auto open) {
    use_buffer(nres);
    if (!start(d) || !has()) return false;
    next();  // one tile ahead, for the records (as the forward's producer)
    produce<kStages, Cfg::kResBufs>(sy, ring, nres, has, [&](int st) {
      load_q(st, gg, qt);
      if constexpr (Cfg::kWriteDs) {  // the pair's scratch slot, next to its lse and Delta rows
        const int64_t entry = E.base + (p.ds_slot_start != nullptr ? it : it / p.tl.kf);
        if (ltid == 0) cp_async4(stage_side(st) + 8 * kBM, p.ds_csr_entry + entry, true);
      }
      if (ltid == 0) publish_record<true>(record(st), sy.full + 8 * st, qt, state, msk, !has_next(), gg);
    }, [&](uint32_t bar) {
      produce_tile<T, kBN, kD>(p, p.tma_k, sK, kg, p.k_ss, n0, p.Sk, hk, b, bar, ltid);
      produce_tile<T, kBN, kD>(p, p.tma_v, sV, vg, p.v_ss, n0, p.Sk, hk, b, bar, ltid);
    }, [&]() {
      advance();
      if (has()) next();
    }, ahead);
    return true;
  };

  auto consumer_item = [&](const ItemInfo& d, int& ring, int nres, int) {
    use_buffer(nres);
    if (!start(d)) return false;
    const bool any = has();
    if constexpr (Cfg::kPing) {
      if (any) wait_primary<Cfg::kResBufs>(sy, nres);
    } else {
      load_kv();
      if (any) load_q(0, gg, qt);
      cp_async_commit();
    }
    constexpr int kDO = Cfg::kDO;
    // The part's first column in a SW128 tile of kBM rows: whole 64-column panels of kBM rows.
    const uint32_t col_off = static_cast<uint32_t>(part * (kDO / 64) * kBM * 128);
    float dK[kDO / 8][4], dV[kDO / 8][4], S[kBM / 8][4], dP[kBM / 8][4];
#pragma unroll
    for (int i = 0; i < kDO / 8; ++i) {
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
      for (int kk = 0; kk < Cfg::kScoreK / 16; ++kk) {
        sm90::Wgmma<kBM, T>::template ss<0>(S, sm90::desc_k<kBN>(sK, wg * 64, kk),
                                            sm90::desc_k<kBM>(sQ, 0, kk), kk > 0 ? 1 : 0);
      }
#pragma unroll
      for (int kk = 0; kk < Cfg::kScoreK / 16; ++kk) {
        sm90::Wgmma<kBM, T>::template ss<0>(dP, sm90::desc_k<kBN>(sV, wg * 64, kk),
                                            sm90::desc_k<kBM>(sdO, 0, kk), kk > 0 ? 1 : 0);
      }
      sm90::commit();
    };
    // dV += P^T dO with set c and the dO tile of slot st (after the caller's fence; not committed).
    auto issue_dv = [&](auto c, int st) {
#pragma unroll
      for (int kk = 0; kk < kBM / 16; ++kk) {
        sm90::Wgmma<kDO, T>::template rs<1>(dV, pa[c][kk], sm90::desc_mn<kBM>(stage_do(st) + col_off, kk), 1);
      }
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
          S[nt][e] = fast_exp2(fmaf(S[nt][e], sl2, -lrow[il]));
        }
      if (state == 2) mask_tile<kBM / 8, true>(S, R, p.tl, msk, n0, wrow, qt * kBM, g, t4, 0.f);
#pragma unroll
      for (int kk = 0; kk < kBM / 16; ++kk) to_a_frag<T>(pa[c][kk], S, kk);
      if constexpr (Cfg::kEarlyDv) {
        sm90::fence_regs(dV);
        sm90::fence();
        issue_dv(c, stage);
        sm90::commit();
      }
#pragma unroll
      for (int nt = 0; nt < kBM / 8; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) S[nt][e] *= dP[nt][e] - drow[nt * 8 + 2 * t4 + (e & 1)];
#pragma unroll
      for (int kk = 0; kk < kBM / 16; ++kk) to_a_frag<T>(sa[c][kk], S, kk);
      if constexpr (Cfg::kWriteDs) {
        // The pair's panel (ds_panel) in the slot of the block's CSR entry (which the producer put
        // after the stage's Delta row; direct tile lists: a key tile and a query tile each lie
        // inside one block), from the packed fragments as they are: register e of k-step kk holds
        // keys wrow + g (+ 8 for odd e), queries 16 kk + 8 (e / 2) + 2 t4, so each of the warp's
        // four-byte stores fills one 128-byte sub-matrix (ds_sub).
        static_assert(kBM == 64, "a dS panel holds 64 queries");
        const int e = *reinterpret_cast<const int*>(drow + kBM);
        T* dsg = static_cast<T*>(p.ds) + ds_offset(p, e, b, hk * p.G + gg) + ds_panel(p, t_sub, qt % (p.ds_slot_q / kBM)) +
                 g * 8 + t4 * 2;
#pragma unroll
        for (int kk = 0; kk < kBM / 16; ++kk)
#pragma unroll
          for (int r = 0; r < 4; ++r) {
            *reinterpret_cast<uint32_t*>(dsg + ds_sub(wrow / 8 + (r & 1), 2 * kk + (r >> 1))) = sa[c][kk][r];
          }
      }
    };
    // dV += P^T dO (unless issued early: kEarlyDv), dK += dS^T Q with the query tile of slot st.
    auto dv_dk = [&](auto c, int st) {
      sm90::fence_regs(dK);
      if constexpr (!Cfg::kEarlyDv) sm90::fence_regs(dV);
      sm90::fence();
      if constexpr (!Cfg::kEarlyDv) issue_dv(c, st);
#pragma unroll
      for (int kk = 0; kk < kBM / 16; ++kk) {
        sm90::Wgmma<kDO, T>::template rs<1>(dK, sa[c][kk], sm90::desc_mn<kBM>(stage_q(st) + col_off, kk), 1);
      }
      sm90::commit();
    };
    // Ping-pong: the walk follows the producer's records (the item's first tile is known from
    // start()); otherwise every consumer walks the tile lists.
    bool more = any;
    int last = 0;
    auto c_has = [&]() { return Cfg::kPing ? more : has(); };
    auto c_next = [&]() {
      if constexpr (!Cfg::kPing) next();
    };
    auto c_has_next = [&]() { return Cfg::kPing ? last == 0 : has_next(); };
    auto c_advance = [&]() {
      if constexpr (Cfg::kPing) {
        stage = stage + 1 == kStages ? 0 : stage + 1;
        more = last == 0;
      } else {
        advance();
      }
    };
    auto landed = [&]() {
      last = read_record(record(stage), qt, state, msk);
      gg = record(stage).member;
    };
    // Ping-pong takes two turns a tile: the dK and dV accumulators leave no room for the
    // probabilities next to the next tile's scores.
    run_tiles<Cfg::kSched, kStages, Cfg::kPing>(stage, ring, wg, kNT, sy, c_has, c_next, c_has_next, c_advance,
                                           [&](int st) { load_q(st, gg_n, qt_n); }, scores, make_p_ds, dv_dk,
                                           [&]() {
                                             sm90::fence_regs(dK);
                                             sm90::fence_regs(dV);
                                           },
                                           [&]() { release_primary<Cfg::kResBufs>(sy, nres); }, landed);
    sm90::wait<0>();
    sm90::fence_regs(dK);
    sm90::fence_regs(dV);
    if constexpr (!Cfg::kPing) cp_async_wait<0>();
    store_rows<T, kDO>(p.dk, dK, b, p.Sk, p.Hkv, hk, p.D, n0 + wrow, part * kDO, p.scale, g, t4);
    store_rows<T, kDO>(p.dv, dV, b, p.Sk, p.Hkv, hk, p.D, n0 + wrow, part * kDO, 1.f, g, t4);
    return any;
  };
  run_items<Cfg::kPing, kWG, true, false, false, 0, false, false, true, Cfg::kParts>(p, sy, wg, ltid, producer_item,
                                                                                   consumer_item);
#else
  __trap();
#endif
}

// ---------------------------------------------------------------------------------------------
// Backward through the dS scratch: dQ = dS K over the CSR rows
// ---------------------------------------------------------------------------------------------

// 128 query rows (two consumer warpgroups of 64) and 128 keys a step, the dK/dV kernel's key tile,
// so a warpgroup's 64 rows x 128 keys are exactly one dK/dV tile pair; the ring holds K and dS
// tiles (no primary tiles: nothing is recomputed, the products read both operands from the ring).
template <int kD>
struct DqDsSm90Cfg : Sm90Threads<2, kSchedPingPong> {
  using Base = Sm90Threads<2, kSchedPingPong>;
  static constexpr int kBM = 128, kBN = 128;
  static constexpr int kKBytes = kBN * kD * 2;
  static constexpr int kDsBytes = kBN * kBM * 2;
  static constexpr int kZeroBytes = kBN * 128;  // one warpgroup's dS panel of zeros
  static constexpr int kRecSide = static_cast<int>(sizeof(TileRecord));  // each slot's record
  static constexpr int kStages = Base::stages(kZeroBytes, kKBytes + kDsBytes, kRecSide);
  static constexpr int kSmem = Base::smem(kZeroBytes, kKBytes + kDsBytes, kStages, kRecSide);
  static_assert(kSmem <= kMaxSmem, "dQ-from-dS tiles do not fit in shared memory");
};

template <typename T, int kD>
__global__ void __launch_bounds__(DqDsSm90Cfg<kD>::kThreads, 1) dq_ds_sm90_kernel(const __grid_constant__ Params p) {
#if DS_SM90_BODY
  using Cfg = DqDsSm90Cfg<kD>;
  constexpr int kBM = Cfg::kBM, kBN = Cfg::kBN, kNT = Cfg::kConsumers, kStages = Cfg::kStages;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const uint32_t sK0 = align1024(smem_u32(smem_raw));
  const uint32_t sDs0 = sK0 + kStages * Cfg::kKBytes;  // [stages] dS: [kBN keys][kBM queries]
  const uint32_t sZero = sDs0 + kStages * Cfg::kDsBytes;  // a panel of zeros (below)
  const uint32_t sbar = sZero + Cfg::kZeroBytes;
  for (int i = threadIdx.x; i < Cfg::kZeroBytes / 16; i += Cfg::kThreads) sm90::st_shared_zero16(sZero + 16 * i);
  sm90::fence_async_smem();  // the zeros are read by wgmma (async proxy); make_ping_sync syncs the CTA
  // [kStages] TileRecord after the barriers: state = which warpgroups' dS panels dK/dV wrote (bit
  // wg), or kEmptyItem for the one record of an item without tiles (nothing loaded).
  volatile TileRecord* rec = reinterpret_cast<volatile TileRecord*>(smem_raw + (sbar + Cfg::kBarBytes - smem_u32(smem_raw)));
  const PingSync sy = make_ping_sync<true>(sbar, smem_raw + (sbar - smem_u32(smem_raw)), kStages, kNT, 0, 1,
                                           p.split_producer != 0);
  constexpr int kEmptyItem = -1;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane / 4, t4 = lane % 4;
  const int wg = sm90::warpgroup_index(), wrow = warp * 16, ltid = tid - kNT;

  QueryItem<T, kBM, kBN, kStages, false> C;
  const QueryTile& W = C.W;
  // The current pair's dS: two consecutive panels (64 queries each) of its block's slot (ds_panel;
  // direct tile lists: entry it / kf, key sub-tile it % kf), 32 contiguous KB.
  // Per-tile slots (Params::ds_slot_start): the item's first slot, then one a tile (kf 1, one 128-query
  // slot: key sub-tile 0, panel 0).
  auto ds_tile = [&]() {
    const int e = p.ds_slot_start != nullptr
                      ? static_cast<int>(p.ds_slot_start[static_cast<int64_t>(W.s) * p.tl.ntiles + W.t] + C.it)
                      : static_cast<int>(W.E.base + C.it / p.tl.kf);
    return static_cast<const T*>(p.ds) + ds_offset(p, e, W.b, W.h) +
           ds_panel(p, C.it % p.tl.kf, (W.m0 % p.ds_slot_q) / 64);
  };
  // Only the producer walks the tile list (one tile ahead: next() after each step, while it waits
  // for a free slot); the consumers follow its records, so no dependent global load of the tile
  // list sits on their path at an item's start.
  auto producer_item = [&](const ItemInfo& d, int& ring, int nres, auto ahead, auto open) {
    C.start(p, d);
    bool empty_record = !C.has();  // the consumers still take one record, and write zero rows
    if (C.has()) C.next(p);
    produce<kStages, 0>(
        sy, ring, nres, [&]() { return C.has() || empty_record; },
        [&](int st) {
          if (empty_record) {
            if (ltid == 0) publish_record(rec[st], sy.full + 8 * st, 0, kEmptyItem, 0, true);
            return;
          }
          C.template produce_k<kD, Cfg::kKBytes>(p, sK0, st, sy.full + 8 * st, ltid);
          if (ltid == 0) {  // the dS panels are stored as they are read: one bulk copy, counted in bytes
            sm90::mbar_expect_tx(sy.full + 8 * st, Cfg::kDsBytes);
            sm90::bulk_load(sDs0 + st * Cfg::kDsBytes, ds_tile(), Cfg::kDsBytes, sy.full + 8 * st);
            // dK/dV skipped a 64-query half without an allowed element and left its dS unwritten.
            // With blocks below the tile, a half none of whose blocks is in the layout too.
            int written = 0;
#pragma unroll
            for (int half = 0; half < 2; ++half)
              written |= (pair_state(W.R, W.m0 + 64 * half, 64, C.kt * kBN, kBN, 0, 0) != 0 &&
                          half_in_layout(p.tl, C.msk, half)) << half;
            publish_record(rec[st], sy.full + 8 * st, C.kt, written, 0, !C.has_next());
          }
        },
        [](uint32_t) {},
        [&]() {
          if (empty_record) {
            empty_record = false;
            return;
          }
          C.advance();
          if (C.has()) C.next(p);
        },
        ahead);
    return true;
  };
  auto consumer_item = [&](const ItemInfo& d, int& ring, int, int) {
    const QueryTile Wc = make_query_tile(p, kBM, d);
    float acc[kD / 8][4];
#pragma unroll
    for (int i = 0; i < kD / 8; ++i) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.f;
    int st = ring % kStages;
    sm90::mbar_wait(sy.full + 8 * st, (ring / kStages) & 1);
    int state = rec[st].state, last = rec[st].last;
    const bool any = state != kEmptyItem;
    if (!any) {
      sm90::mbar_arrive(sy.empty + 8 * st);
      ++ring;
    }
    while (any) {
      // A half dK/dV left unwritten: the products read the zero panel instead. (Skipping them in
      // a branch made ptxas serialize every wgmma of the kernel, C7520: 16% of its warps' samples
      // waited on each product in turn. Keeping one tile's products in flight across the loop does
      // the same.)
      const uint32_t sDs = (state >> wg) & 1 ? sDs0 + st * Cfg::kDsBytes + wg * (kBN * 128) : sZero;
      // dS (this warp's 16 queries x 128 keys) as A fragments: ldmatrix.x4.trans, lane l addressing
      // key row l % 8 of sub-matrix (keys 16 kk + 8 (m / 2), queries of the warp + 8 (m % 2)),
      // m = l / 8: the order of an m16k16 A fragment.
      uint32_t dsa[kBN / 16][4];
      {
        const int m = lane / 8;
        const uint32_t at = sDs + 2 * ds_sub(m >> 1, 2 * (warp % 4) + (m & 1)) + (lane % 8) * 16;
#pragma unroll
        for (int kk = 0; kk < kBN / 16; ++kk) ldsm_x4_t(dsa[kk], at + 2 * ds_sub(2 * kk, 0));
      }
      // K copied by cp.async (no tensor maps) was written through the generic proxy; TMA's
      // copies and the dS bulk copy are async-proxy writes already.
      if (!p.tma) sm90::fence_async_smem();
      sm90::fence_regs(acc);
      sm90::fence();
#pragma unroll
      for (int kk = 0; kk < kBN / 16; ++kk) {
        sm90::Wgmma<kD, T>::template rs<1>(acc, dsa[kk], sm90::desc_mn<kBN>(sK0 + st * Cfg::kKBytes, kk), 1);
      }
      sm90::commit();
      sm90::wait<0>();
      sm90::mbar_arrive(sy.empty + 8 * st);  // released as soon as read
      ++ring;
      if (last) break;
      st = ring % kStages;
      sm90::mbar_wait(sy.full + 8 * st, (ring / kStages) & 1);
      state = rec[st].state;
      last = rec[st].last;
    }
    sm90::fence_regs(acc);
    store_rows<T, kD>(p.dq, acc, Wc.b, p.Sq, p.H, Wc.h, p.D, Wc.m0 + wrow, 0, p.scale, g, t4);
    return any;
  };
  run_items<true, 2, false, true>(p, sy, wg, ltid, producer_item, consumer_item);
#else
  __trap();
#endif
}

// ---------------------------------------------------------------------------------------------
// Launchers
// ---------------------------------------------------------------------------------------------

// Ping-pong kernels are persistent: one CTA per SM (they fill it; kCtasPerSm for kFwdTwoItems), taking items from
// p.work_counter, which is zero at the launch (the forward's resets itself, the backward's are
// zeroed by its Delta kernel); the other schedules run a CTA per item.
template <auto kKernel, int kThreads, int kSmem, bool kPersistent, int kCtasPerSm = 1>
void launch_sm90(const Params& p, int64_t items, cudaStream_t stream) {
  if constexpr (!kPersistent) {
    launch_kernel<kKernel, kThreads, kSmem>(p, items, stream);
  } else {
    if (p.work_counter == nullptr) throw std::runtime_error("dilated_sparse: persistent kernel launched without a work counter");
    Params q = p;
    q.items = items;
    // Claims in chunks (Params::chunk_shift): the last two waves' worth of items one a claim, so the
    // launch's tail stays as balanced as without chunks; the bounds precomputed, so that a claim costs
    // the 24-register producer few instructions.
    const int64_t grid = std::min<int64_t>(items, int64_t{kCtasPerSm} * sm_count());
    q.chunk_claims = q.chunk_shift > 0 ? static_cast<int>(std::max<int64_t>(0, (items - 2 * grid) >> q.chunk_shift)) : 0;
    q.chunk_extra = (q.chunk_claims << q.chunk_shift) - q.chunk_claims;
    q.chunk_last = (q.chunk_claims << q.chunk_shift) - 1;
    q.chunk_mask = (1 << q.chunk_shift) - 1;
    launch_kernel<kKernel, kThreads, kSmem, 1, (kCtasPerSm > 1)>(q, grid, stream);
  }
}

template <typename T, int kD, int kWG, int kBN, int kSched>
void launch_fwd_sm90(const Params& p, int64_t items, cudaStream_t stream) {
  using Cfg = FwdSm90Cfg<kD, kWG, kBN, kSched>;
  launch_sm90<&fwd_sm90_kernel<T, kD, kWG, kBN, kSched>, Cfg::kThreads, Cfg::kSmem, Cfg::kPing, Cfg::kCtasPerSm>(
      p, items, stream);
}

template <typename T, int kD, int kWG, int kBN, int kSched>
void launch_dq_sm90(const Params& p, int64_t items, cudaStream_t stream) {
  using Cfg = DqSm90Cfg<kD, kWG, kBN, kSched>;
  launch_sm90<&dq_sm90_kernel<T, kD, kWG, kBN, kSched>, Cfg::kThreads, Cfg::kSmem, Cfg::kPing>(p, items, stream);
}

template <typename T, int kD>
void launch_dq_ds_sm90(const Params& p, int64_t items, cudaStream_t stream) {
  using Cfg = DqDsSm90Cfg<kD>;
  launch_sm90<&dq_ds_sm90_kernel<T, kD>, Cfg::kThreads, Cfg::kSmem, true>(p, items, stream);
}

template <typename T, int kD, int kWG, int kBM, int kSched>
void launch_dkv_sm90(const Params& p, int64_t items, cudaStream_t stream) {
  using Cfg = DkvSm90Cfg<kD, kWG, kBM, kSched>;
  // kDkvSplitCols: each key tile's items, one a column part
  launch_sm90<&dkv_sm90_kernel<T, kD, kWG, kBM, kSched>, Cfg::kThreads, Cfg::kSmem, Cfg::kPing>(p, items * Cfg::kParts,
                                                                                             stream);
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
  DS_SM90_REGISTRAR(kOpFwd, DT, score_cols(D, SCHED), V, (&launch_fwd_sm90<T, D, WG, BN, SCHED>), \
                    (FwdSm90Cfg<D, WG, BN, SCHED>::kBM), BN,                                                      \
                    (AUTO) | (FwdSm90Cfg<D, WG, BN, SCHED>::kOBytes == 0          ? 0                \
                               : FwdSm90Cfg<D, WG, BN, SCHED>::kOutBoxRows == 16 ? kFlagTmaOutWarp \
                                                                                 : kFlagTmaOut))
#define DS_REGISTER_DQ_SM90(T, DT, D, V, WG, BN, SCHED, AUTO)                                  \
  template void launch_dq_sm90<T, D, WG, BN, SCHED>(const Params&, int64_t, cudaStream_t);     \
  DS_SM90_REGISTRAR(kOpDq, DT, score_cols(D, SCHED), V, (&launch_dq_sm90<T, D, WG, BN, SCHED>), 64 * WG, BN, AUTO)
// The dQ-from-dS kernel of tile width D registered for head dim SERVED (D96: the D128 kernel). Only the
// D-served registration instantiates it explicitly, so that one translation unit does.
#define DS_REGISTER_DQ_DS_SM90_AS(T, DT, D, SERVED, V) \
  DS_SM90_REGISTRAR(kOpDq, DT, SERVED, V, (&launch_dq_ds_sm90<T, D>), 128, 128, kFlagDs)
#define DS_REGISTER_DQ_DS_SM90(T, DT, D, V)                                    \
  template void launch_dq_ds_sm90<T, D>(const Params&, int64_t, cudaStream_t); \
  DS_REGISTER_DQ_DS_SM90_AS(T, DT, D, D, V)
#define DS_REGISTER_DKV_SM90(T, DT, D, V, WG, BM, SCHED, AUTO)                                 \
  template void launch_dkv_sm90<T, D, WG, BM, SCHED>(const Params&, int64_t, cudaStream_t);    \
  DS_SM90_REGISTRAR(kOpDkv, DT, score_cols(D, SCHED), V, (&launch_dkv_sm90<T, D, WG, BM, SCHED>), 64 * WG, BM, AUTO)

}  // namespace dilated_sparse::cuda
