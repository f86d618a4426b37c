// Plain parameter struct of the dilated_sparse CUDA kernels, the tile shapes chosen per head dim,
// and the registry through which the per-(dtype, head dim) instantiation files publish their
// launchers (so a reduced build simply lacks some entries).
#pragma once

#include <cuda.h>  // CUtensorMap
#include <cuda_runtime.h>

#include <cstdint>

namespace dilated_sparse::cuda {

// Work list of one kernel: "primary" tiles (query tiles for the forward and dQ, key tiles for
// dK/dV) each walk a list of "secondary" tiles (key tiles, resp. query tiles). A tile never
// depends on the layout's block size: a tile covering several layout rows walks the union of
// their blocks with a 64-bit membership mask (bit a * nsub + c: primary sub-block a, secondary
// sub-block c); a layout block spanning several tiles is cut into them.
struct TileList {
  int direct = 0;               // 1: read straight from the CSR/CSC (block >= tile on both sides)
  const int* ptr = nullptr;     // CSR crow / CSC ccol (direct mode)
  const int* idx = nullptr;     // CSR col / CSC row (direct mode)
  int npb = 0;                  // primary blocks per slice (nqb or nkb)
  int fsplit = 1;               // primary tiles per primary block (block >= tile)
  int kf = 1;                   // secondary tiles per secondary block (block >= tile)
  const int* len = nullptr;     // [L * ntiles] entries per primary tile
  const int64_t* start = nullptr;  // [L * ntiles] offset into tile/mask (plan mode)
  const int* tile = nullptr;    // secondary tile ids (plan mode)
  const uint64_t* mask = nullptr;  // membership masks (plan mode)
  const int64_t* order = nullptr;  // slice-tiles, longest first
  const int2* runs = nullptr;      // per position of `order`: {first position, length} of its run of
                                   // equal-length slice-tiles (items run repeat-major inside a run)
  int ntiles = 0;               // primary tiles per slice
  int prim_sub = 0;             // min(primary block, primary tile)
  int sec_sub = 0;              // min(secondary block, secondary tile)
  int nsub = 1;                 // secondary sub-blocks per secondary tile
  uint64_t full = ~0ull;        // mask of a fully active tile pair
  const int4* work = nullptr;   // split plan (fwd): {slice-tile, entry begin, entry end, slot or -1},
                                // longest first (the repeat innermost); replaces `order` / `runs` when set
  const int* work_count = nullptr;  // where the split's counts stay on the device (a captured call):
                                    // the entries of `work` in use (the rest pad it to its bound;
                                    // attention.cu: make_split)
  int rep = 1;                  // work items per slice-tile (the (b, h) pairs sharing a slice)
  int rep_base = 0;             // first repeat of this launch (the dS-scratch backward runs the
                                // repeats in chunks, attention.cu: bwd_cuda); items decode to
                                // repeats rep_base .. rep_base + rep - 1
  int hdec = 0;                 // heads decoded from a work item (H, or Hkv for dK/dV with Lh == 1)
};

struct Params {
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  const void* o = nullptr;     // bwd: forward output
  const void* dout = nullptr;  // bwd
  void* out = nullptr;         // fwd output, contiguous [B, Sq, H, D]
  float* lse_out = nullptr;    // fwd, [B, H, Sq]
  const float* lse = nullptr;  // bwd / weights input, [B, H, Sq]
  const float* dlse = nullptr;  // bwd input, optional: the gradient of lse, [B, H, Sq]
  float* delta = nullptr;      // bwd workspace, [B, H, Sq]
  // bwd workspace, [B, H, Sq]: lse in the log2 domain (lse_to_log2: +inf for an empty row), written
  // with Delta, so the backward's exponentials take it as it is.
  float* lse_log2 = nullptr;
  float* opart = nullptr;      // fwd split rows: partial outputs [slots * rep, kBM, D] fp32
  float* lpart = nullptr;      // fwd split rows: partial lse [slots * rep, kBM]
  void* dq = nullptr;
  void* dk = nullptr;
  void* dv = nullptr;
  int64_t q_sb = 0, q_ss = 0, q_sh = 0;
  int64_t k_sb = 0, k_ss = 0, k_sh = 0;
  int64_t v_sb = 0, v_ss = 0, v_sh = 0;
  int64_t o_sb = 0, o_ss = 0, o_sh = 0;
  int64_t do_sb = 0, do_ss = 0, do_sh = 0;
  int B = 0, H = 0, Hkv = 0, G = 1, Sq = 0, Sk = 0, D = 0;
  int bq = 0, bk = 0, Lb = 1, Lh = 1, nqb = 0, nkb = 0;
  float scale = 1.f, scale_log2 = 1.f;
  int causal = 0, wl = -1, wr = -1;
  const int* key_lengths = nullptr;  // [B]
  const bool* kpm = nullptr;         // [B, Sk] contiguous, true = padding
  TileList tl;
  // Persistent kernels (sm_90a ping-pong): a CTA's first work item is blockIdx.x, later ones come
  // from this counter (zero at the launch) until `items` are taken. The forward's is the first word
  // of a pair whose second counts the CTAs done (attention.cu: forward_work_counter); its last CTA
  // zeroes both again (kernels_sm90.cuh: release_work_counter).
  int* work_counter = nullptr;
  int64_t items = 0;
  // Backward through a dS scratch (attention.cu: ds_mode): dK/dV writes dS^T into slots (a layout
  // block's, or a 128 x 128 tile pair's; ds_offset), and dQ = dS K reads it back.
  void* ds = nullptr;
  // The dK/dV producer's slot of its pair: ds_csr_entry[E.base + it / (ds_slot_start ? 1 : tl.kf)].
  // Blocks that are multiples of the 128 x 128 tiles: a slot per layout block (CSC entry -> CSR
  // entry, kf tiles each); smaller blocks (ds_slot_start set): a slot per entry of the dQ plan's tile
  // list, 128 x 128 (the dK/dV tile-list entry -> that slot; attention.cu: ds_tile_slots_kernel).
  const int* ds_csr_entry = nullptr;  // (cached with the dK/dV plan)
  const int64_t* ds_slot_start = nullptr;  // per-tile slots: the dQ plan's slice-tile -> its first slot
  int64_t ds_slot_elems = 0;     // elements of a slot: bq x bk, or 128 x 128 per tile
  int ds_slot_q = 0;             // queries of a slot (its 64-query panels per 128-key sub-tile)
  int ds_rep = 1;                // query repeats the scratch holds (a chunk of the (b, h) pairs
                                 // sharing a layout slice)
  int ds_rep_base = 0;           // the first of them
  // sm_90a ping-pong kernels: TMA descriptors of q, k, v (and dout for the backward) over
  // (D, S, H, B), boxes of 64 columns x the kernel's tile rows with the 128-byte swizzle of its
  // shared tiles (attention.cu: set_tma). tma = 1: one producer thread issues each tile as TMA
  // copies; 0: the producer's 128 threads copy it with cp.async (DILATED_SPARSE_TMA=0, or the
  // driver could not encode the maps). The forward also stores its output rows with TMA (tma_o:
  // `out`, boxes of 64 columns x 64 rows, one warpgroup's rows; 16 rows, one warp's, in the
  // two-items forward: KernelEntry::tma_out).
  CUtensorMap tma_q, tma_k, tma_v, tma_do, tma_o;
  int tma = 0;
  // With TMA, the producers of the kernels that compile it in (the dQ-from-dS kernel) split: one warp
  // decodes the next work item while the other three copy (kernels_sm90.cuh: run_items).
  // DILATED_SPARSE_SPLIT_PRODUCER=0 keeps one producer loop.
  int split_producer = 0;
  // The ping-pong producers' single loop decodes and posts item n + 1 right after item n's first
  // tile (kernels_sm90.cuh: run_items); 0: after item n's last. DILATED_SPARSE_DECODE_AHEAD=0.
  int decode_ahead = 1;
  // The ping-pong D64 forward's producer hands each item to the consumers once it has looked up its
  // first tile pair, with the result, so the consumers skip that lookup (kernels_sm90.cuh:
  // run_items, kOpen); 0: as soon as it is decoded. DILATED_SPARSE_POST_LOOKUP=0.
  int post_lookup = 1;
  // With TMA, the D64 forward's producer runs its item loop on warp 0 alone (thread 0 issues every
  // copy; kernels_sm90.cuh: run_items' kLean). DILATED_SPARSE_LEAN_PRODUCER=0: the whole warpgroup.
  int lean_producer = 1;
  // Byte ranges of the plan (tile lists, work order, key_lengths) that the persistent kernels'
  // producers prefetch into L2 at entry, each CTA its share of the 128-byte lines
  // (kernels_sm90.cuh: prefetch_plan), so that the first items' decode, a chain of dependent loads,
  // does not wait for DRAM at each step after the L2 has turned over. Unused ranges have 0 lines.
  // DILATED_SPARSE_PLAN_PREFETCH=0: none (attention.cu: set_plan_prefetch).
  static constexpr int kPrefetchRanges = 8;
  const char* prefetch_at[kPrefetchRanges] = {};
  int prefetch_lines[kPrefetchRanges] = {};
  // Claims of the persistent forward, dK/dV and recompute dQ kernels (kernels_sm90.cuh: claim_item,
  // run_items' kChunks): each of the first chunk_claims claims takes 1 << chunk_shift consecutive work
  // items, so a CTA runs neighbouring rows of one head back to back (sharing key tiles, with one
  // counter read); the rest take one item each. The host sets chunk_shift
  // (attention.cu: item_chunk_shift), launch_sm90 the rest.
  int chunk_shift = 0;
  int chunk_claims = 0;
  int chunk_extra = 0;  // (chunk_claims << chunk_shift) - chunk_claims: claim k >= chunk_claims's item - k
  int chunk_last = -1;  // (chunk_claims << chunk_shift) - 1: the last chunked item; from it on each ends its claim
  int chunk_mask = 0;   // (1 << chunk_shift) - 1
};

// Tile shapes. Every kernel is a template over its tile; the instantiation files register a few
// variants per (op, dtype, head dim) and the host picks one per call (see attention.cu).
//  fwd / dQ: kBM query rows per CTA, kBN keys per step, kMT m16 tiles per warp (1 or 2: with 2, each
//            K/V fragment loaded from shared memory feeds two MMAs).
//  dK/dV:    kBN keys per CTA (16 per warp), kBM queries per step, kDO output columns per CTA
//            (grid.y splits the head dim when kDO < kD).
template <int kD, int kBM_, int kBN_, int kMT_>
struct FwdCfg {
  static constexpr int kBM = kBM_;
  static constexpr int kBN = kBN_;
  static constexpr int kMT = kMT_;
  static constexpr int kWarps = kBM / (16 * kMT);
  static constexpr bool kQinRegs = kMT * kD <= 128;
  static constexpr int kSmem = (kBM + 4 * kBN) * (kD + 8) * 2;
};

template <int kD, int kBM_, int kBN_, int kMT_>
struct DqCfg {
  static constexpr int kBM = kBM_;
  static constexpr int kBN = kBN_;
  static constexpr int kMT = kMT_;
  static constexpr int kWarps = kBM / (16 * kMT);
  static constexpr int kSmem = (2 * kBM + 4 * kBN) * (kD + 8) * 2;
};

template <int kD, int kBN_, int kBM_, int kDO_>
struct DkvCfg {
  static constexpr int kBN = kBN_;
  static constexpr int kBM = kBM_;
  static constexpr int kDO = kDO_;
  static constexpr int kWarps = kBN / 16;
  static constexpr int kSmem = (2 * kBN + 4 * kBM) * (kD + 8) * 2 + 4 * kBM * 4;
};

using LaunchFn = void (*)(const Params&, int64_t /*num_items*/, cudaStream_t);

enum Op { kOpFwd = 0, kOpDq = 1, kOpDkv = 2, kNumOps = 3 };
constexpr int kNumHeadDims = 5;
constexpr int kHeadDims[kNumHeadDims] = {32, 64, 96, 128, 256};  // the specialised head dims, ascending
constexpr int kMaxVariants = 10;  // 0-3: mma.sync (sm_80+), 4-9: wgmma (sm_90a)

inline int head_dim_index(int kD) {
  for (int i = 0; i < kNumHeadDims; ++i) {
    if (kHeadDims[i] == kD) return i;
  }
  return -1;
}

// One compiled kernel: its launcher and tile (pm: primary rows per CTA, sn: secondary rows per step).
struct KernelEntry {
  LaunchFn fn = nullptr;
  int pm = 0;
  int sn = 0;
  int small = 0;       // may be picked automatically for blocks smaller than the default tile
  int short_rows = 0;  // preferred when primary tiles walk few secondary rows (attention.cu: pick())
  int wide = 0;        // preferred when the secondary block is a multiple of sn (attention.cu: pick())
  int arch = 0;        // 90: sm_90a kernel (wgmma), used on compute capability 9.0 only; 0: any
  int ds = 0;          // a kernel of the dS-scratch backward: never picked, taken by ds_mode only
  int tma_out = 0;     // stages its output rows for TMA stores of boxes of this many rows (set_tma: tma_o)
};

// Registration flags of a variant.
// kFlagTmaOut: TMA output stores of 64-row boxes; kFlagTmaOutWarp: of 16-row boxes (one a warp).
enum VariantFlags { kFlagSmall = 1, kFlagShortRows = 2, kFlagWide = 4, kFlagDs = 8, kFlagTmaOut = 16, kFlagTmaOutWarp = 32 };

// dtype index: 0 = fp16, 1 = bf16. The default of each (op, dtype, head dim) is its first sm_90a
// variant on a compute capability 9.0 device, else variant 0 (attention.cu: pick()).
struct Registry {
  KernelEntry e[kNumOps][2][kNumHeadDims][kMaxVariants] = {};
};

Registry& registry();

struct Registrar {
  Registrar(Op op, int dtype, int kD, int variant, LaunchFn f, int pm, int sn, int flags, int arch = 0) {
    KernelEntry& k = registry().e[op][dtype][head_dim_index(kD)][variant];
    k.fn = f;
    k.pm = pm;
    k.sn = sn;
    k.small = (flags & kFlagSmall) != 0;
    k.short_rows = (flags & kFlagShortRows) != 0;
    k.wide = (flags & kFlagWide) != 0;
    k.ds = (flags & kFlagDs) != 0;
    k.tma_out = (flags & kFlagTmaOutWarp) != 0 ? 16 : (flags & kFlagTmaOut) != 0 ? 64 : 0;
    k.arch = arch;
  }
};

}  // namespace dilated_sparse::cuda
