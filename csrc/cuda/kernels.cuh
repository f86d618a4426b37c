// Block-sparse attention kernels (forward, dQ, dK/dV) over tile lists derived from a CSR/CSC
// block layout. FlashAttention-2 style: mma.sync m16n8k16 with fp32 accumulation, ldmatrix from
// padded shared tiles, cp.async double buffering, online softmax in the log2 domain.
//
// Every warp owns 16 rows of the primary tile (queries for fwd/dQ, keys for dK/dV), so warps never
// exchange data; the CTA shares the streamed secondary tiles through shared memory.
// Token rules (causal, window, key_lengths, key_padding_mask, sequence ends, layout membership)
// are applied per element only on tile pairs that need them.
#pragma once

#include <cmath>

#include "common.cuh"
#include "params.h"

namespace dilated_sparse::cuda {

// ---------------------------------------------------------------------------------------------
// Work decoding and tile lists
// ---------------------------------------------------------------------------------------------

__device__ __forceinline__ int layout_slice(const Params& p, int b, int h) {
  return (p.Lb == 1 ? 0 : b) * p.Lh + (p.Lh == 1 ? 0 : h);
}

// (slice-tile, repeat index) -> (slice, primary tile, batch, head).
__device__ __forceinline__ void decode_st(const Params& p, int64_t st, int r, int& s, int& t, int& b,
                                          int& h) {
  const TileList& tl = p.tl;
  s = static_cast<int>(st / tl.ntiles);
  t = static_cast<int>(st % tl.ntiles);
  r += tl.rep_base;
  if (p.Lb == 1 && p.Lh == 1) {
    b = r / tl.hdec;
    h = r % tl.hdec;
  } else if (p.Lb == 1) {
    b = r;
    h = s;
  } else if (p.Lh == 1) {
    b = s;
    h = r;
  } else {
    b = s / p.Lh;
    h = s % p.Lh;
  }
}

// Work item -> (slice, primary tile, batch, head). Items come longest tile first; among tiles of
// equal length, all of one repeat (batch, head) before the next, so the CTAs running at one time
// share that head's keys and values in L2 (a split plan keeps the repeat innermost).
__device__ __forceinline__ void decode_item(const Params& p, int64_t item, int& s, int& t, int& b,
                                            int& h) {
  const TileList& tl = p.tl;
  if (tl.work != nullptr) {
    decode_st(p, tl.work[item / tl.rep].x, static_cast<int>(item % tl.rep), s, t, b, h);
    return;
  }
  const int2 run = tl.runs[item / tl.rep];
  const int64_t o = item - static_cast<int64_t>(run.x) * tl.rep;
  decode_st(p, tl.order[run.x + o % run.y], static_cast<int>(o / run.y), s, t, b, h);
}

// The secondary tiles walked by one primary tile.
struct Entries {
  const int* idx;
  const int* tile;
  const uint64_t* mask;
  int64_t base;
  int n;
  int kf;
  int direct;

  __device__ __forceinline__ void get(int it, int& tile_id, uint64_t& m) const {
    if (direct) {
      tile_id = idx[base + it / kf] * kf + it % kf;
      m = ~0ull;
    } else {
      tile_id = tile[base + it];
      m = mask[base + it];
    }
  }
};

// Entries [base, base + n) of a tile list.
__device__ __forceinline__ Entries entries_at(const TileList& tl, int64_t base, int n) {
  Entries e;
  e.idx = tl.idx;
  e.tile = tl.tile;
  e.mask = tl.mask;
  e.kf = tl.kf;
  e.direct = tl.direct;
  e.base = base;
  e.n = n;
  return e;
}

__device__ __forceinline__ Entries make_entries(const TileList& tl, int s, int t) {
  Entries e = entries_at(tl, 0, 0);
  if (tl.direct) {
    const int r = s * tl.npb + t / tl.fsplit;
    const int p0 = tl.ptr[r];
    e.base = p0;
    e.n = (tl.ptr[r + 1] - p0) * tl.kf;
  } else {
    const int64_t st = static_cast<int64_t>(s) * tl.ntiles + t;
    e.base = tl.start[st];
    e.n = tl.len[st];
  }
  return e;
}

// Token rules of one batch row.
struct Rules {
  int Sq;
  int klen;  // min(Sk, key_lengths[b])
  int causal;
  int wl;
  int wr;
  const bool* kpm;  // this batch's row of the padding mask, or null

  __device__ __forceinline__ bool ok(int i, int j) const {
    bool r = i < Sq && j < klen;
    if (causal) r = r && j <= i;
    if (wl >= 0) r = r && i - j <= wl;
    if (wr >= 0) r = r && j - i <= wr;
    if (kpm != nullptr) r = r && !kpm[j];
    return r;
  }
};

__device__ __forceinline__ Rules make_rules(const Params& p, int b) {
  Rules r;
  r.Sq = p.Sq;
  r.klen = p.Sk;
  if (p.key_lengths != nullptr) r.klen = min(r.klen, max(0, p.key_lengths[b]));
  r.causal = p.causal;
  r.wl = p.wl;
  r.wr = p.wr;
  r.kpm = p.kpm != nullptr ? p.kpm + static_cast<int64_t>(b) * p.Sk : nullptr;
  return r;
}

// 0: the tile pair has no allowed key (skip); 1: every pair allowed (no masking); 2: mask per element.
__device__ __forceinline__ int pair_state(const Rules& R, int m0, int bm, int n0, int bn,
                                          uint64_t mask, uint64_t full) {
  if (n0 >= R.klen || m0 >= R.Sq) return 0;
  const int m1 = min(m0 + bm, R.Sq) - 1;
  const int n1 = min(n0 + bn, R.klen) - 1;
  if (R.causal && n0 > m1) return 0;
  if (R.wl >= 0 && m0 - n1 > R.wl) return 0;
  if (R.wr >= 0 && n0 - m1 > R.wr) return 0;
  const bool need = (mask & full) != full || m0 + bm > R.Sq || n0 + bn > R.klen ||
                    R.kpm != nullptr || (R.causal && n0 + bn - 1 > m0) ||
                    (R.wl >= 0 && m1 - n0 > R.wl) || (R.wr >= 0 && n0 + bn - 1 - m0 > R.wr);
  return need ? 2 : 1;
}

// Whether 64-query half `half` of a 128-query tile pair with membership mask m (plan_kernel's bits:
// primary sub-row a of tl.prim_sub queries, secondary sub-block c, at a * nsub + c) holds a block of
// the layout (a direct plan's mask is all ones).
__device__ __forceinline__ bool half_in_layout(const TileList& tl, uint64_t m, int half) {
  if (tl.prim_sub >= 128) return m != 0;
  const int bits = 64 / tl.prim_sub * tl.nsub;  // the half's sub-rows
  const uint64_t sel = bits >= 64 ? ~0ull : (1ull << bits) - 1;
  return ((m >> (half * bits)) & sel) != 0;
}

__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}

__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

// acc += P B for kMT m16 row tiles: P the kBN-column accumulator fragments S (probabilities, or
// dS) repacked as A operands, B the [kBN][kD] shared tile at `tile` (row stride kS), read
// transposed by ldmatrix. O += P V in the forward, dQ += dS K in the dQ kernel.
template <typename T, int kMT, int kBN, int kD, int kS>
__device__ __forceinline__ void mma_p_tile(float (&acc)[kMT][kD / 8][4], const float (&S)[kMT][kBN / 8][4],
                                           uint32_t tile, int lane) {
  using Mma = MmaOp<T>;
#pragma unroll
  for (int kk = 0; kk < kBN / 16; ++kk) {
    uint32_t a[kMT][4];
#pragma unroll
    for (int mt = 0; mt < kMT; ++mt) to_a_frag<T>(a[mt], S[mt], kk);
#pragma unroll
    for (int np = 0; np < kD / 16; ++np) {
      uint32_t bb[4];
      ldsm_x4_t(bb, ldsm_addr_a<kS>(tile, kk * 16, np * 16, lane));
#pragma unroll
      for (int mt = 0; mt < kMT; ++mt) {
        Mma::run(acc[mt][2 * np], a[mt], bb[0], bb[1]);
        Mma::run(acc[mt][2 * np + 1], a[mt], bb[2], bb[3]);
      }
    }
  }
}

// lse (natural) -> log2 domain; an empty row (-inf) gives +inf so that every probability is 0.
__device__ __forceinline__ float lse_to_log2(float lse) {
  return lse == -INFINITY ? INFINITY : lse * kLog2e;
}

template <typename T>
__device__ __forceinline__ void store2(T* dst, float x, float y) {
  const uint32_t v = MmaOp<T>::pack(x, y);
  *reinterpret_cast<uint32_t*>(dst) = v;
}

// A quad's four threads each hold a 32-bit pair (columns 2 t4, 2 t4 + 1) of four consecutive
// 8-column groups (w[c]: group c); a 4 x 4 transpose in two butterfly stages leaves each thread the
// 8 consecutive columns of group t4 (w[0..3]). Every lane must call it (shuffles).
__device__ __forceinline__ void quad_transpose(uint32_t (&w)[4], int t4) {
  const bool b0 = t4 & 1, b1 = t4 & 2;
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const uint32_t recv = __shfl_xor_sync(0xffffffffu, b0 ? w[2 * i] : w[2 * i + 1], 1);
    if (b0) {
      w[2 * i] = recv;
    } else {
      w[2 * i + 1] = recv;
    }
  }
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const uint32_t recv = __shfl_xor_sync(0xffffffffu, b1 ? w[i] : w[i + 2], 2);
    if (b1) {
      w[i] = recv;
    } else {
      w[i + 2] = recv;
    }
  }
}

// One row (r 0: g, 1: g + 8) of an accumulator fragment, times `scale`, columns col0.. below D.
// With groups of four 8-column tiles, as 16-byte stores (quad_transpose); otherwise 4 bytes a
// thread. Every lane must call it (shuffles); `ok` predicates the stores.
template <typename T, int kN>
__device__ __forceinline__ void store_row(T* row, const float (&acc)[kN][4], int r, float scale, int col0, int D,
                                          bool ok, int t4) {
  if constexpr (kN % 4 != 0) {
#pragma unroll
    for (int nt = 0; nt < kN; ++nt) {
      const int d = col0 + nt * 8 + 2 * t4;
      if (ok && d < D) store2(row + d, acc[nt][2 * r] * scale, acc[nt][2 * r + 1] * scale);
    }
  } else {
#pragma unroll
    for (int j = 0; j < kN / 4; ++j) {
      uint32_t w[4];
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        w[c] = MmaOp<T>::pack(acc[4 * j + c][2 * r] * scale, acc[4 * j + c][2 * r + 1] * scale);
      }
      quad_transpose(w, t4);
      const int d = col0 + (4 * j + t4) * 8;
      if (ok && d < D) *reinterpret_cast<uint4*>(row + d) = make_uint4(w[0], w[1], w[2], w[3]);
    }
  }
}

// A primary query tile of the forward / dQ kernels: where it is, its token rules and the entries
// it walks (only a piece of them for a split forward row, whose partial result goes to `slot`).
struct QueryTile {
  int s, t, b, h, hk, m0;
  Rules R;
  Entries E;
  int e0 = 0;
  int slot = -1;
  int64_t item = 0;
};

// A work item decoded from the tile lists: (slice, primary tile, batch, head), the slice row's
// entries [base, base + n) (n: the piece's end for a split forward row, which starts at e0 and
// writes partial slot `slot`). Decoding takes a chain of dependent global loads (run / order or
// work entry, then the row pointers); the ping-pong producer does it once per item and posts the
// result to the consumers through shared memory, so they start an item without those loads.
struct ItemInfo {
  int item, s, t, b, h, n, e0, slot;
  int64_t base;
};

// kParts > 1 (the sm_90 dK/dV with column parts, kDkvSplitCols): item kParts i + j is part j of
// work item i, and e0 holds j.
template <int kParts = 1>
__device__ __forceinline__ ItemInfo describe_item(const Params& p, int claimed) {
  ItemInfo d;
  d.item = claimed;
  const int item = kParts > 1 ? claimed / kParts : claimed;
  decode_item(p, item, d.s, d.t, d.b, d.h);
  const Entries E = make_entries(p.tl, d.s, d.t);
  d.base = E.base;
  d.n = E.n;
  d.e0 = 0;
  d.slot = -1;
  if (p.tl.work != nullptr) {
    const int4 piece = p.tl.work[item / p.tl.rep];
    d.e0 = piece.y;
    d.n = piece.z;
    d.slot = piece.w;
  }
  if constexpr (kParts > 1) d.e0 = claimed % kParts;
  return d;
}

__device__ __forceinline__ QueryTile make_query_tile(const Params& p, int bm, const ItemInfo& d) {
  QueryTile w;
  w.item = d.item;
  w.s = d.s;
  w.t = d.t;
  w.b = d.b;
  w.h = d.h;
  w.hk = w.h / p.G;
  w.m0 = w.t * bm;
  w.R = make_rules(p, w.b);
  w.E = entries_at(p.tl, d.base, d.n);
  w.e0 = d.e0;
  w.slot = d.slot;
  return w;
}

// The first entry at or after `from` whose (bm-row, bn-column) tile pair at rows m0 holds an
// allowed element: its secondary tile, membership mask and pair_state; E.n when none is left.
__device__ __forceinline__ int next_pair(const Entries& E, const Rules& R, uint64_t full, int from, int m0,
                                         int bm, int bn, int& kt, uint64_t& m, int& st) {
  for (int i = from; i < E.n; ++i) {
    E.get(i, kt, m);
    st = pair_state(R, m0, bm, kt * bn, bn, m, full);
    if (st != 0) return i;
  }
  return E.n;
}

// Element offset of the dS scratch slot e (a layout block's CSR entry, or a dQ tile's slot: Params::
// ds_csr_entry) for batch b, query head h: the (b, h) pairs sharing a layout slice that this scratch
// holds (p.ds_rep of them, from p.ds_rep_base) take consecutive slots of ds_slot_elems.
__device__ __forceinline__ int64_t ds_offset(const Params& p, int e, int b, int h) {
  const int r = (p.Lb == 1 ? b : 0) * (p.Lh == 1 ? p.H : 1) + (p.Lh == 1 ? h : 0) - p.ds_rep_base;
  return (static_cast<int64_t>(e) * p.ds_rep + r) * p.ds_slot_elems;
}
// Inside a slot: panel (key sub-tile ks of 128 keys, query sub-tile qs of 64 queries), 128 keys x
// 64 queries of dS^T as 8 x 8 sub-matrices of 128 bytes (ds_sub): each dK/dV warp's four-byte
// store of a fragment register fills one of them, and the dQ kernel reads them back with
// ldmatrix.trans as the A fragments of dS; a key sub-tile's panels are consecutive, so two of them
// are 32 contiguous KB.
__device__ __forceinline__ int ds_panel(const Params& p, int ks, int qs) {
  return (ks * (p.ds_slot_q / 64) + qs) * (128 * 64);
}
// Element offset, inside a panel, of the 8 x 8 sub-matrix of keys 8 kb.. and queries 8 qb.. (its
// rows: keys, 16 bytes each).
__device__ __forceinline__ constexpr int ds_sub(int kb, int qb) { return (kb * 8 + qb) * 64; }

// A primary key tile of the dK/dV kernels: (slice, tile, batch, kv head). False for a work item a
// CTA skips: with a per-head layout items run over query heads and the group's first one does the
// work for its kv head.
__device__ __forceinline__ bool key_tile_head(const Params& p, int h, int& hk) {
  if (p.Lh == 1) {
    hk = h;  // decoded over the kv heads
    return true;
  }
  hk = h / p.G;
  return h % p.G == 0;
}
__device__ __forceinline__ bool decode_key_tile(const Params& p, int64_t item, int& s, int& t, int& b,
                                                int& hk) {
  int h;
  decode_item(p, item, s, t, b, h);
  return key_tile_head(p, h, hk);
}

// Advances the cursor (GQA group member gg, entry it, entries E of that member's layout row) of key
// tile t (keys from n0) to the first pair at or after it whose (bm-query, bn-key) tile pair holds an
// allowed element; gg == G when none is left.
__device__ __forceinline__ void next_group_pair(const Params& p, const Rules& R, int b, int hk, int t, int n0,
                                                int bm, int bn, int& gg, int& it, Entries& E, int& qt,
                                                uint64_t& m, int& st) {
  while (gg < p.G) {
    for (; it < E.n; ++it) {
      E.get(it, qt, m);
      st = pair_state(R, qt * bm, bm, n0, bn, m, p.tl.full);
      if (st != 0) return;
    }
    ++gg;
    it = 0;
    if (gg < p.G) E = make_entries(p.tl, layout_slice(p, b, hk * p.G + gg), t);
  }
}

// Per-element token rules and layout membership on one warp's 16 x (8 kN) accumulator fragment
// (mma.sync m16n8 or wgmma layout) whose rows are queries (kTransposed = false) or keys (true);
// elements not allowed become `fill`. This runs on every causal diagonal and layout-edge tile.
// Every rule leaves a row one interval of columns (a key padding mask, read per key, does so only
// for key rows), so a row's rules cost two compares an element. The thread's two rows (g, g + 8
// of a 16-row fragment) share a sub-block row (sub-blocks are powers of two >= 16 rows), and each
// of its eight-column groups a sub-block column, so membership is one bit a group. Element-wise
// rules and membership made a layout-edge tile of the block-64 forward cost about twice a full
// one: S16k D128 local 10% at block 64 went 545 -> 446 us (block 128: 451).
template <int kN, bool kTransposed>
__device__ __forceinline__ void mask_tile(float (&S)[kN][4], const Rules& R, const TileList& tl,
                                          uint64_t msk, int row_tile0, int row_local0, int col_tile0,
                                          int g, int t4, float fill) {
  const bool all_members = (msk & tl.full) == tl.full;
  const int prim_shift = __ffs(tl.prim_sub) - 1, sec_shift = __ffs(tl.sec_sub) - 1;
  const int rl0 = row_local0 + g;
  const uint64_t row_bits = all_members ? ~0ull : msk >> ((rl0 >> prim_shift) * tl.nsub);
  if (!kTransposed && R.kpm != nullptr) {  // query rows under a padding mask: per element
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int i = row_tile0 + rl0 + r * 8;
#pragma unroll
      for (int nt = 0; nt < kN; ++nt)
#pragma unroll
        for (int c = 0; c < 2; ++c) {
          const int cl = nt * 8 + 2 * t4 + c;
          if (!(R.ok(i, col_tile0 + cl) && ((row_bits >> (cl >> sec_shift)) & 1ull))) S[nt][2 * r + c] = fill;
        }
    }
    return;
  }
  int lo[2], hi[2];  // each row's allowed columns, as offsets from the thread's first column
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int x = row_tile0 + rl0 + r * 8;  // the row's query (key, kTransposed)
    int first = 0, last;
    if constexpr (!kTransposed) {  // keys j of query x: j < klen, j <= x, x - j <= wl, j - x <= wr
      last = R.klen - 1;
      if (R.causal) last = min(last, x);
      if (R.wl >= 0) first = max(first, x - R.wl);
      if (R.wr >= 0) last = min(last, x + R.wr);
      if (x >= R.Sq) last = -1;
    } else {  // queries i of key x: i < Sq, x <= i, i - x <= wl, x - i <= wr
      last = R.Sq - 1;
      if (R.causal) first = max(first, x);
      if (R.wl >= 0) last = min(last, x + R.wl);
      if (R.wr >= 0) first = max(first, x - R.wr);
      if (x >= R.klen || (R.kpm != nullptr && R.kpm[x])) last = -1;
    }
    lo[r] = first - col_tile0 - 2 * t4;
    hi[r] = last - col_tile0 - 2 * t4;
  }
#pragma unroll
  for (int nt = 0; nt < kN; ++nt) {
    const bool member_group = (row_bits >> ((nt * 8) >> sec_shift)) & 1ull;
#pragma unroll
    for (int r = 0; r < 2; ++r)
#pragma unroll
      for (int c = 0; c < 2; ++c) {
        const int x = nt * 8 + c;
        if (!(member_group && x >= lo[r] && x <= hi[r])) S[nt][2 * r + c] = fill;
      }
  }
}

// A forward row's epilogue from its running max (log2 domain) and quad-reduced softmax sum l: the
// factor its output is divided by (0 for a row without an allowed key, so it stays 0) ...
// l >= 1 wherever it is > 0 (the row max's own term is exp2(0)), so the approximate reciprocal and
// log2 serve (fast_rcp, fast_log2): 1.f / l compiled to a division with a slow-path branch per
// row, on the item boundary's critical path.
__device__ __forceinline__ float row_inv_sum(float l) { return l > 0.f ? fast_rcp(l) : 0.f; }
// ... its log-sum-exp (natural log; -inf without an allowed key) ...
__device__ __forceinline__ float row_lse(float mrow, float l) {
  return l > 0.f ? (mrow + fast_log2(l)) * kLn2 : -INFINITY;
}
// ... and where that goes: query row i of batch b, head h.
__device__ __forceinline__ float& lse_at(const Params& p, int b, int h, int i) {
  return p.lse_out[(static_cast<int64_t>(b) * p.H + h) * p.Sq + i];
}

// Forward epilogue of 16 rows (tile rows row_local.. of an accumulator fragment): the normalised
// output and lse, or for a piece of a split row the fp32 partials merge_kernel combines.
template <typename T, int kD>
__device__ __forceinline__ void store_fwd_rows(const Params& p, const QueryTile& w, int bm,
                                               const float (&acc)[kD / 8][4], const float (&mrow)[2],
                                               const float (&lrow)[2], int row_local, int g, int t4) {
  if (w.slot >= 0) {
    const int64_t ws = static_cast<int64_t>(w.slot) * p.tl.rep + static_cast<int>(w.item % p.tl.rep);
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const float l = quad_sum(lrow[r]);
      const float inv = row_inv_sum(l);
      const int il = row_local + g + r * 8;
      float* orow = p.opart + (ws * bm + il) * p.D;
#pragma unroll
      for (int nt = 0; nt < kD / 8; ++nt) {
        const int d = nt * 8 + 2 * t4;
        if (d < p.D) *reinterpret_cast<float2*>(orow + d) = make_float2(acc[nt][2 * r] * inv, acc[nt][2 * r + 1] * inv);
      }
      if (t4 == 0) p.lpart[ws * bm + il] = row_lse(mrow[r], l);
    }
    return;
  }
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const float l = quad_sum(lrow[r]);
    const float inv = row_inv_sum(l);
    const int i = w.m0 + row_local + g + r * 8;
    T* orow = static_cast<T*>(p.out) + ((static_cast<int64_t>(w.b) * p.Sq + i) * p.H + w.h) * p.D;
    store_row<T, kD / 8>(orow, acc, r, inv, 0, p.D, i < p.Sq, t4);
    if (i >= p.Sq) continue;
    if (t4 == 0) lse_at(p, w.b, w.h, i) = row_lse(mrow[r], l);
  }
}

// 16 rows x kCols columns (from column col0) of an accumulator fragment, times `scale`, stored to
// rows row0 + g (+ 8) of a contiguous [B, seq, heads, D] tensor at (b, head).
template <typename T, int kCols>
__device__ __forceinline__ void store_rows(void* base, const float (&acc)[kCols / 8][4], int b, int seq, int heads,
                                           int head, int D, int row0, int col0, float scale, int g, int t4) {
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int i = row0 + g + r * 8;
    T* row = static_cast<T*>(base) + ((static_cast<int64_t>(b) * seq + i) * heads + head) * D;
    store_row<T, kCols / 8>(row, acc, r, scale, col0, D, i < seq, t4);
  }
}

// ---------------------------------------------------------------------------------------------
// Forward
// ---------------------------------------------------------------------------------------------

template <typename T, int kD, int kBM, int kBN, int kMT>
__global__ void __launch_bounds__(FwdCfg<kD, kBM, kBN, kMT>::kWarps * 32, 1)
    fwd_kernel(const __grid_constant__ Params p) {
  using Cfg = FwdCfg<kD, kBM, kBN, kMT>;
  using Mma = MmaOp<T>;
  constexpr int kNT = Cfg::kWarps * 32, kS = kD + 8;
  constexpr bool kQReg = Cfg::kQinRegs;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sQ = reinterpret_cast<T*>(smem_raw);
  T* sK = sQ + kBM * kS;
  T* sV = sK + 2 * kBN * kS;

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane / 4, t4 = lane % 4;
  const int wrow = warp * 16 * kMT;  // this warp's first row in the tile
  const QueryTile W = make_query_tile(p, kBM, describe_item(p, blockIdx.x));
  const int m0 = W.m0;
  const T* qg = static_cast<const T*>(p.q) + W.b * p.q_sb + W.h * p.q_sh;
  const T* kg = static_cast<const T*>(p.k) + W.b * p.k_sb + W.hk * p.k_sh;
  const T* vg = static_cast<const T*>(p.v) + W.b * p.v_sb + W.hk * p.v_sh;
  const Entries& E = W.E;

  load_tile<T, kBM, kD, kNT>(sQ, qg, p.q_ss, m0, p.Sq, p.D, tid);
  cp_async_commit();

  auto find = [&](int from, int& kt, uint64_t& m, int& st) {
    return next_pair(E, W.R, p.tl.full, from, m0, kBM, kBN, kt, m, st);
  };

  int kt = 0, state = 0;
  uint64_t msk = 0;
  int it = find(W.e0, kt, msk, state);
  if (it < E.n) {
    load_tile<T, kBN, kD, kNT>(sK, kg, p.k_ss, kt * kBN, p.Sk, p.D, tid);
    load_tile<T, kBN, kD, kNT>(sV, vg, p.v_ss, kt * kBN, p.Sk, p.D, tid);
  }
  cp_async_commit();

  float acc[kMT][kD / 8][4];
  float mrow[kMT][2], lrow[kMT][2];
#pragma unroll
  for (int mt = 0; mt < kMT; ++mt) {
#pragma unroll
    for (int i = 0; i < kD / 8; ++i) acc[mt][i][0] = acc[mt][i][1] = acc[mt][i][2] = acc[mt][i][3] = 0.f;
    mrow[mt][0] = mrow[mt][1] = -INFINITY;
    lrow[mt][0] = lrow[mt][1] = 0.f;
  }
  const float sl2 = p.scale_log2;
  const uint32_t qbase = smem_u32(sQ);

  uint32_t qf[kQReg ? kMT : 1][kQReg ? kD / 16 : 1][4];
  if constexpr (kQReg) {
    cp_async_wait<1>();
    __syncthreads();
#pragma unroll
    for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
      for (int kk = 0; kk < kD / 16; ++kk)
        ldsm_x4(qf[mt][kk], ldsm_addr_a<kS>(qbase, wrow + mt * 16, kk * 16, lane));
  }

  int buf = 0;
  while (it < E.n) {
    int kt_n = 0, state_n = 0;
    uint64_t msk_n = 0;
    const int nx = find(it + 1, kt_n, msk_n, state_n);
    if (nx < E.n) {
      load_tile<T, kBN, kD, kNT>(sK + (buf ^ 1) * kBN * kS, kg, p.k_ss, kt_n * kBN, p.Sk, p.D, tid);
      load_tile<T, kBN, kD, kNT>(sV + (buf ^ 1) * kBN * kS, vg, p.v_ss, kt_n * kBN, p.Sk, p.D, tid);
    }
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();

    const uint32_t kb = smem_u32(sK + buf * kBN * kS);
    const uint32_t vb = smem_u32(sV + buf * kBN * kS);
    float S[kMT][kBN / 8][4];
#pragma unroll
    for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
      for (int i = 0; i < kBN / 8; ++i) S[mt][i][0] = S[mt][i][1] = S[mt][i][2] = S[mt][i][3] = 0.f;
#pragma unroll
    for (int kk = 0; kk < kD / 16; ++kk) {
      uint32_t a[kMT][4];
#pragma unroll
      for (int mt = 0; mt < kMT; ++mt) {
        if constexpr (kQReg) {
          a[mt][0] = qf[mt][kk][0]; a[mt][1] = qf[mt][kk][1]; a[mt][2] = qf[mt][kk][2]; a[mt][3] = qf[mt][kk][3];
        } else {
          ldsm_x4(a[mt], ldsm_addr_a<kS>(qbase, wrow + mt * 16, kk * 16, lane));
        }
      }
#pragma unroll
      for (int np = 0; np < kBN / 16; ++np) {
        uint32_t bb[4];
        ldsm_x4(bb, ldsm_addr_bn<kS>(kb, np * 16, kk * 16, lane));
#pragma unroll
        for (int mt = 0; mt < kMT; ++mt) {
          Mma::run(S[mt][2 * np], a[mt], bb[0], bb[1]);
          Mma::run(S[mt][2 * np + 1], a[mt], bb[2], bb[3]);
        }
      }
    }
    // A scale <= 0 (legal, if odd) scales the scores before the masks, so that masked ones are
    // -inf after scaling either way (a positive one scales inside the max and the exponent).
    const float exp_scale = sl2 > 0.f ? sl2 : 1.f;
    if (!(sl2 > 0.f)) {
#pragma unroll
      for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
        for (int nt = 0; nt < kBN / 8; ++nt)
#pragma unroll
          for (int e = 0; e < 4; ++e) S[mt][nt][e] *= sl2;
    }
    if (state == 2) {
#pragma unroll
      for (int mt = 0; mt < kMT; ++mt)
        mask_tile<kBN / 8, false>(S[mt], W.R, p.tl, msk, m0, wrow + mt * 16, kt * kBN, g, t4, -INFINITY);
    }
    // Online softmax (log2 domain).
#pragma unroll
    for (int mt = 0; mt < kMT; ++mt) {
      float mx[2] = {mrow[mt][0], mrow[mt][1]};
#pragma unroll
      for (int nt = 0; nt < kBN / 8; ++nt) {
        mx[0] = fmaxf(mx[0], fmaxf(S[mt][nt][0] * exp_scale, S[mt][nt][1] * exp_scale));
        mx[1] = fmaxf(mx[1], fmaxf(S[mt][nt][2] * exp_scale, S[mt][nt][3] * exp_scale));
      }
      float base[2];
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        mx[r] = quad_max(mx[r]);
        base[r] = mx[r] == -INFINITY ? 0.f : mx[r];
        const float corr = fast_exp2(mrow[mt][r] - base[r]);
        mrow[mt][r] = mx[r];
        lrow[mt][r] *= corr;
#pragma unroll
        for (int i = 0; i < kD / 8; ++i) {
          acc[mt][i][2 * r] *= corr;
          acc[mt][i][2 * r + 1] *= corr;
        }
      }
#pragma unroll
      for (int nt = 0; nt < kBN / 8; ++nt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          S[mt][nt][e] = fast_exp2(fmaf(S[mt][nt][e], exp_scale, -base[e >> 1]));
          lrow[mt][e >> 1] += S[mt][nt][e];
        }
      }
    }
    // O += P V
    mma_p_tile<T, kMT, kBN, kD, kS>(acc, S, vb, lane);
    __syncthreads();
    buf ^= 1;
    it = nx;
    kt = kt_n;
    msk = msk_n;
    state = state_n;
  }
  cp_async_wait<0>();

#pragma unroll
  for (int mt = 0; mt < kMT; ++mt) store_fwd_rows<T, kD>(p, W, kBM, acc[mt], mrow[mt], lrow[mt], wrow + mt * 16, g, t4);
}

// ---------------------------------------------------------------------------------------------
// Backward: dQ over the CSR rows
// ---------------------------------------------------------------------------------------------

template <typename T, int kD, int kBM, int kBN, int kMT>
__global__ void __launch_bounds__(DqCfg<kD, kBM, kBN, kMT>::kWarps * 32, 1)
    dq_kernel(const __grid_constant__ Params p) {
  using Cfg = DqCfg<kD, kBM, kBN, kMT>;
  using Mma = MmaOp<T>;
  constexpr int kNT = Cfg::kWarps * 32, kS = kD + 8;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sQ = reinterpret_cast<T*>(smem_raw);
  T* sdO = sQ + kBM * kS;
  T* sK = sdO + kBM * kS;
  T* sV = sK + 2 * kBN * kS;

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane / 4, t4 = lane % 4;
  const int wrow = warp * 16 * kMT;
  const QueryTile W = make_query_tile(p, kBM, describe_item(p, blockIdx.x));
  const int m0 = W.m0, b = W.b, h = W.h;
  const T* qg = static_cast<const T*>(p.q) + b * p.q_sb + h * p.q_sh;
  const T* dog = static_cast<const T*>(p.dout) + b * p.do_sb + h * p.do_sh;
  const T* kg = static_cast<const T*>(p.k) + b * p.k_sb + W.hk * p.k_sh;
  const T* vg = static_cast<const T*>(p.v) + b * p.v_sb + W.hk * p.v_sh;
  const Entries& E = W.E;

  load_tile<T, kBM, kD, kNT>(sQ, qg, p.q_ss, m0, p.Sq, p.D, tid);
  load_tile<T, kBM, kD, kNT>(sdO, dog, p.do_ss, m0, p.Sq, p.D, tid);
  cp_async_commit();

  auto find = [&](int from, int& kt, uint64_t& m, int& st) {
    return next_pair(E, W.R, p.tl.full, from, m0, kBM, kBN, kt, m, st);
  };
  int kt = 0, state = 0;
  uint64_t msk = 0;
  int it = find(0, kt, msk, state);
  if (it < E.n) {
    load_tile<T, kBN, kD, kNT>(sK, kg, p.k_ss, kt * kBN, p.Sk, p.D, tid);
    load_tile<T, kBN, kD, kNT>(sV, vg, p.v_ss, kt * kBN, p.Sk, p.D, tid);
  }
  cp_async_commit();

  const int64_t rowbase = (static_cast<int64_t>(b) * p.H + h) * p.Sq;
  float lse2[kMT][2], dl[kMT][2];
#pragma unroll
  for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int i = m0 + wrow + mt * 16 + g + r * 8;
      lse2[mt][r] = i < p.Sq ? p.lse_log2[rowbase + i] : INFINITY;
      dl[mt][r] = i < p.Sq ? p.delta[rowbase + i] : 0.f;
    }
  float acc[kMT][kD / 8][4];
#pragma unroll
  for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
    for (int i = 0; i < kD / 8; ++i) acc[mt][i][0] = acc[mt][i][1] = acc[mt][i][2] = acc[mt][i][3] = 0.f;
  const float sl2 = p.scale_log2;
  const uint32_t qbase = smem_u32(sQ), dobase = smem_u32(sdO);

  int buf = 0;
  while (it < E.n) {
    int kt_n = 0, state_n = 0;
    uint64_t msk_n = 0;
    const int nx = find(it + 1, kt_n, msk_n, state_n);
    if (nx < E.n) {
      load_tile<T, kBN, kD, kNT>(sK + (buf ^ 1) * kBN * kS, kg, p.k_ss, kt_n * kBN, p.Sk, p.D, tid);
      load_tile<T, kBN, kD, kNT>(sV + (buf ^ 1) * kBN * kS, vg, p.v_ss, kt_n * kBN, p.Sk, p.D, tid);
    }
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();

    const uint32_t kb = smem_u32(sK + buf * kBN * kS);
    const uint32_t vb = smem_u32(sV + buf * kBN * kS);
    float S[kMT][kBN / 8][4], dP[kMT][kBN / 8][4];
#pragma unroll
    for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
      for (int i = 0; i < kBN / 8; ++i) {
        S[mt][i][0] = S[mt][i][1] = S[mt][i][2] = S[mt][i][3] = 0.f;
        dP[mt][i][0] = dP[mt][i][1] = dP[mt][i][2] = dP[mt][i][3] = 0.f;
      }
#pragma unroll
    for (int kk = 0; kk < kD / 16; ++kk) {
      uint32_t a[kMT][4], c[kMT][4];
#pragma unroll
      for (int mt = 0; mt < kMT; ++mt) {
        ldsm_x4(a[mt], ldsm_addr_a<kS>(qbase, wrow + mt * 16, kk * 16, lane));
        ldsm_x4(c[mt], ldsm_addr_a<kS>(dobase, wrow + mt * 16, kk * 16, lane));
      }
#pragma unroll
      for (int np = 0; np < kBN / 16; ++np) {
        uint32_t bb[4], vv[4];
        ldsm_x4(bb, ldsm_addr_bn<kS>(kb, np * 16, kk * 16, lane));
        ldsm_x4(vv, ldsm_addr_bn<kS>(vb, np * 16, kk * 16, lane));
#pragma unroll
        for (int mt = 0; mt < kMT; ++mt) {
          Mma::run(S[mt][2 * np], a[mt], bb[0], bb[1]);
          Mma::run(S[mt][2 * np + 1], a[mt], bb[2], bb[3]);
          Mma::run(dP[mt][2 * np], c[mt], vv[0], vv[1]);
          Mma::run(dP[mt][2 * np + 1], c[mt], vv[2], vv[3]);
        }
      }
    }
#pragma unroll
    for (int mt = 0; mt < kMT; ++mt) {
#pragma unroll
      for (int nt = 0; nt < kBN / 8; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) S[mt][nt][e] = fast_exp2(fmaf(S[mt][nt][e], sl2, -lse2[mt][e >> 1]));
      if (state == 2) mask_tile<kBN / 8, false>(S[mt], W.R, p.tl, msk, m0, wrow + mt * 16, kt * kBN, g, t4, 0.f);
#pragma unroll
      for (int nt = 0; nt < kBN / 8; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) S[mt][nt][e] *= dP[mt][nt][e] - dl[mt][e >> 1];  // dS
    }
    mma_p_tile<T, kMT, kBN, kD, kS>(acc, S, kb, lane);
    __syncthreads();
    buf ^= 1;
    it = nx;
    kt = kt_n;
    msk = msk_n;
    state = state_n;
  }
  cp_async_wait<0>();

#pragma unroll
  for (int mt = 0; mt < kMT; ++mt)
    store_rows<T, kD>(p.dq, acc[mt], b, p.Sq, p.H, h, p.D, m0 + wrow + mt * 16, 0, p.scale, g, t4);
}

// ---------------------------------------------------------------------------------------------
// Backward: dK, dV over the CSC columns, reduced over the GQA group in registers
// ---------------------------------------------------------------------------------------------

template <typename T, int kD, int kBN, int kBM, int kDO>
__global__ void __launch_bounds__(DkvCfg<kD, kBN, kBM, kDO>::kWarps * 32, 1)
    dkv_kernel(const __grid_constant__ Params p) {
  using Cfg = DkvCfg<kD, kBN, kBM, kDO>;
  using Mma = MmaOp<T>;
  constexpr int kNT = Cfg::kWarps * 32;
  constexpr int kS = kD + 8;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sK = reinterpret_cast<T*>(smem_raw);
  T* sV = sK + kBN * kS;
  T* sQ = sV + kBN * kS;          // [2][kBM][kS]
  T* sdO = sQ + 2 * kBM * kS;     // [2][kBM][kS]
  float* sL = reinterpret_cast<float*>(sdO + 2 * kBM * kS);  // [2][kBM]
  float* sDl = sL + 2 * kBM;                                 // [2][kBM]

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane / 4, t4 = lane % 4;
  int s, t, b, hk;
  if (!decode_key_tile(p, blockIdx.x, s, t, b, hk)) return;
  const int dcol0 = blockIdx.y * kDO;
  const int n0 = t * kBN;
  const T* kg = static_cast<const T*>(p.k) + b * p.k_sb + hk * p.k_sh;
  const T* vg = static_cast<const T*>(p.v) + b * p.v_sb + hk * p.v_sh;
  const Rules R = make_rules(p, b);

  load_tile<T, kBN, kD, kNT>(sK, kg, p.k_ss, n0, p.Sk, p.D, tid);
  load_tile<T, kBN, kD, kNT>(sV, vg, p.v_ss, n0, p.Sk, p.D, tid);
  cp_async_commit();

  // Cursor over (group member gg, entry it).
  auto find = [&](int& gg, int& it, Entries& E, int& qt, uint64_t& m, int& st) {
    next_group_pair(p, R, b, hk, t, n0, kBM, kBN, gg, it, E, qt, m, st);
  };
  auto load_q = [&](int bufi, int gg, int qt) {
    const int hq = hk * p.G + gg;
    const T* qg = static_cast<const T*>(p.q) + b * p.q_sb + hq * p.q_sh;
    const T* dog = static_cast<const T*>(p.dout) + b * p.do_sb + hq * p.do_sh;
    load_tile<T, kBM, kD, kNT>(sQ + bufi * kBM * kS, qg, p.q_ss, qt * kBM, p.Sq, p.D, tid);
    load_tile<T, kBM, kD, kNT>(sdO + bufi * kBM * kS, dog, p.do_ss, qt * kBM, p.Sq, p.D, tid);
    const int64_t rowbase = (static_cast<int64_t>(b) * p.H + hq) * p.Sq;
    for (int i = tid; i < kBM; i += kNT) {
      const int qi = qt * kBM + i;
      const bool pred = qi < p.Sq;
      cp_async4(smem_u32(sL + bufi * kBM + i), pred ? p.lse_log2 + rowbase + qi : p.lse_log2, pred);
      cp_async4(smem_u32(sDl + bufi * kBM + i), pred ? p.delta + rowbase + qi : p.delta, pred);
    }
  };

  int gg = 0, it = 0, qt = 0, state = 0;
  uint64_t msk = 0;
  Entries E = make_entries(p.tl, layout_slice(p, b, hk * p.G), t);
  find(gg, it, E, qt, msk, state);
  if (gg < p.G) load_q(0, gg, qt);
  cp_async_commit();

  float dK[kDO / 8][4], dV[kDO / 8][4];
#pragma unroll
  for (int i = 0; i < kDO / 8; ++i) {
    dK[i][0] = dK[i][1] = dK[i][2] = dK[i][3] = 0.f;
    dV[i][0] = dV[i][1] = dV[i][2] = dV[i][3] = 0.f;
  }
  const float sl2 = p.scale_log2;
  const uint32_t kbase = smem_u32(sK), vbase = smem_u32(sV);

  int buf = 0;
  while (gg < p.G) {
    int gg_n = gg, it_n = it + 1, qt_n = 0, state_n = 0;
    uint64_t msk_n = 0;
    Entries E_n = E;
    find(gg_n, it_n, E_n, qt_n, msk_n, state_n);
    if (gg_n < p.G) load_q(buf ^ 1, gg_n, qt_n);
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();

    const uint32_t qb = smem_u32(sQ + buf * kBM * kS);
    const uint32_t dob = smem_u32(sdO + buf * kBM * kS);
    const float* lrow = sL + buf * kBM;
    const float* drow = sDl + buf * kBM;
    const int m0 = qt * kBM;
    // S^T = K Q^T (this warp's 16 keys x kBM queries)
    float S[kBM / 8][4];
#pragma unroll
    for (int i = 0; i < kBM / 8; ++i) S[i][0] = S[i][1] = S[i][2] = S[i][3] = 0.f;
#pragma unroll
    for (int kk = 0; kk < kD / 16; ++kk) {
      uint32_t a[4];
      ldsm_x4(a, ldsm_addr_a<kS>(kbase, warp * 16, kk * 16, lane));
#pragma unroll
      for (int np = 0; np < kBM / 16; ++np) {
        uint32_t bb[4];
        ldsm_x4(bb, ldsm_addr_bn<kS>(qb, np * 16, kk * 16, lane));
        Mma::run(S[2 * np], a, bb[0], bb[1]);
        Mma::run(S[2 * np + 1], a, bb[2], bb[3]);
      }
    }
    // P^T
#pragma unroll
    for (int nt = 0; nt < kBM / 8; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) S[nt][e] = fast_exp2(fmaf(S[nt][e], sl2, -lrow[nt * 8 + 2 * t4 + (e & 1)]));
    if (state == 2) mask_tile<kBM / 8, true>(S, R, p.tl, msk, n0, warp * 16, m0, g, t4, 0.f);
    // dV += P^T dO
#pragma unroll
    for (int kk = 0; kk < kBM / 16; ++kk) {
      uint32_t a[4];
      to_a_frag<T>(a, S, kk);
#pragma unroll
      for (int np = 0; np < kDO / 16; ++np) {
        uint32_t bb[4];
        ldsm_x4_t(bb, ldsm_addr_a<kS>(dob, kk * 16, dcol0 + np * 16, lane));
        Mma::run(dV[2 * np], a, bb[0], bb[1]);
        Mma::run(dV[2 * np + 1], a, bb[2], bb[3]);
      }
    }
    // dP^T = V dO^T
    float dP[kBM / 8][4];
#pragma unroll
    for (int i = 0; i < kBM / 8; ++i) dP[i][0] = dP[i][1] = dP[i][2] = dP[i][3] = 0.f;
#pragma unroll
    for (int kk = 0; kk < kD / 16; ++kk) {
      uint32_t a[4];
      ldsm_x4(a, ldsm_addr_a<kS>(vbase, warp * 16, kk * 16, lane));
#pragma unroll
      for (int np = 0; np < kBM / 16; ++np) {
        uint32_t bb[4];
        ldsm_x4(bb, ldsm_addr_bn<kS>(dob, np * 16, kk * 16, lane));
        Mma::run(dP[2 * np], a, bb[0], bb[1]);
        Mma::run(dP[2 * np + 1], a, bb[2], bb[3]);
      }
    }
    // dS^T = P^T (dP^T - Delta)
#pragma unroll
    for (int nt = 0; nt < kBM / 8; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int il = nt * 8 + 2 * t4 + (e & 1);
        S[nt][e] = S[nt][e] * (dP[nt][e] - drow[il]);
      }
    }
    // dK += dS^T Q
#pragma unroll
    for (int kk = 0; kk < kBM / 16; ++kk) {
      uint32_t a[4];
      to_a_frag<T>(a, S, kk);
#pragma unroll
      for (int np = 0; np < kDO / 16; ++np) {
        uint32_t bb[4];
        ldsm_x4_t(bb, ldsm_addr_a<kS>(qb, kk * 16, dcol0 + np * 16, lane));
        Mma::run(dK[2 * np], a, bb[0], bb[1]);
        Mma::run(dK[2 * np + 1], a, bb[2], bb[3]);
      }
    }
    __syncthreads();
    buf ^= 1;
    gg = gg_n;
    it = it_n;
    E = E_n;
    qt = qt_n;
    msk = msk_n;
    state = state_n;
  }
  cp_async_wait<0>();

  store_rows<T, kDO>(p.dk, dK, b, p.Sk, p.Hkv, hk, p.D, n0 + warp * 16, dcol0, p.scale, g, t4);
  store_rows<T, kDO>(p.dv, dV, b, p.Sk, p.Hkv, hk, p.D, n0 + warp * 16, dcol0, 1.f, g, t4);
}

// ---------------------------------------------------------------------------------------------
// Launchers (instantiated per dtype and head dim in instantiations/*.cu)
// ---------------------------------------------------------------------------------------------

// ---------------------------------------------------------------------------------------------
// Merge of split forward rows: out = sum_p exp(lse_p - lse) O_p, lse = logsumexp_p lse_p, pieces in
// a fixed order (deterministic). A CTA per (split tile, repeat, kMergeRows rows), a warp per row,
// four columns a lane (float4 reads of the fp32 partials). A piece's reads do not wait for the
// previous piece's, so a row's pieces overlap their latencies. (The form before, one CTA per tile and
// a lane per column, read them one short dependent chain after another, and the heaviest row's merge
// ran alone after the forward: at one head, ~20 us a piece; RESULTS.md, thirty-eighth session.)
// ---------------------------------------------------------------------------------------------

constexpr int kMergeRows = 16;    // rows a CTA
constexpr int kMergeThreads = 128;  // a warp a row at a time

__device__ __forceinline__ float warp_max_all(float x) {
#pragma unroll
  for (int o = 16; o > 0; o /= 2) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
  return x;
}
// Lane 0's butterfly sum on every lane (lanes' own sums may differ in the last bit).
__device__ __forceinline__ float warp_sum_all(float x) {
#pragma unroll
  for (int o = 16; o > 0; o /= 2) x += __shfl_xor_sync(0xffffffffu, x, o);
  return __shfl_sync(0xffffffffu, x, 0);
}

template <typename T>
__global__ void __launch_bounds__(kMergeThreads) merge_kernel(const __grid_constant__ Params p, const int4* split,
                                                              const int* split_count, int bm) {
  const int rep = p.tl.rep;
  const int groups = (bm + kMergeRows - 1) / kMergeRows;
  const int64_t tile_rep = blockIdx.x / groups;
  if (split_count != nullptr && tile_rep / rep >= *split_count) return;  // planned on the device: a bound
  const int4 sp = split[tile_rep / rep];
  const int r = static_cast<int>(tile_rep % rep);
  int s, t, b, h;
  decode_st(p, sp.x, r, s, t, b, h);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int il0 = static_cast<int>(blockIdx.x % groups) * kMergeRows;
  const int il_end = min(il0 + kMergeRows, bm);
  for (int il = il0 + warp; il < il_end; il += kMergeThreads / 32) {
    const int i = t * bm + il;
    if (i >= p.Sq) break;
    // Partial q of this row: its slot's rows (the layout store_fwd_rows writes).
    auto at = [&](int q) { return (static_cast<int64_t>(sp.y + q) * rep + r) * bm + il; };
    float mx = -INFINITY;
    for (int q = lane; q < sp.z; q += 32) mx = fmaxf(mx, p.lpart[at(q)]);
    mx = warp_max_all(mx);
    float sum = 0.f;
    if (mx != -INFINITY) {
      for (int q = lane; q < sp.z; q += 32) sum += expf(p.lpart[at(q)] - mx);
    }
    sum = warp_sum_all(sum);
    const float lse = mx == -INFINITY ? -INFINITY : mx + logf(sum);
    T* orow = static_cast<T*>(p.out) + ((static_cast<int64_t>(b) * p.Sq + i) * p.H + h) * p.D;
    for (int d = lane * 4; d < p.D; d += 128) {  // D is a multiple of 8: four columns stay inside it
      float4 o = make_float4(0.f, 0.f, 0.f, 0.f);
      if (mx != -INFINITY) {
#pragma unroll 4
        for (int q = 0; q < sp.z; ++q) {
          const int64_t ws = at(q);
          const float lp = p.lpart[ws];
          const float w = lp != -INFINITY ? expf(lp - lse) : 0.f;
          const float4 v = *reinterpret_cast<const float4*>(p.opart + ws * p.D + d);
          o.x += w * v.x;
          o.y += w * v.y;
          o.z += w * v.z;
          o.w += w * v.w;
        }
      }
      orow[d] = from_float<T>(o.x);
      orow[d + 1] = from_float<T>(o.y);
      orow[d + 2] = from_float<T>(o.z);
      orow[d + 3] = from_float<T>(o.w);
    }
    if (lane == 0) p.lse_out[(static_cast<int64_t>(b) * p.H + h) * p.Sq + i] = lse;
  }
}

// Streaming multiprocessors of the current device, looked up once per device (the persistent
// kernels' grid, and the host's work-per-SM estimates in attention.cu).
inline int sm_count() {
  static int sms[64] = {};
  int dev = 0;
  cudaGetDevice(&dev);
  int& n = sms[dev & 63];
  if (n == 0) cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev);
  return n > 0 ? n : 1;
}

// Launch of one kernel instantiation; its dynamic shared-memory limit is raised once per device
// (kMaxCarveout: and the whole of the SM's shared memory asked for, so that several CTAs of it fit).
template <auto kKernel, int kThreads, int kSmem, int kGridY = 1, bool kMaxCarveout = false>
void launch_kernel(const Params& p, int64_t items, cudaStream_t stream) {
  static bool done[64] = {};
  int dev = 0;
  cudaGetDevice(&dev);
  if (!done[dev & 63]) {
    cudaFuncSetAttribute(kKernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmem);
    if constexpr (kMaxCarveout) cudaFuncSetAttribute(kKernel, cudaFuncAttributePreferredSharedMemoryCarveout, 100);
    done[dev & 63] = true;
  }
  kKernel<<<dim3(static_cast<unsigned>(items), kGridY), kThreads, kSmem, stream>>>(p);
}

template <typename T, int kD, int kBM, int kBN, int kMT>
void launch_fwd(const Params& p, int64_t items, cudaStream_t stream) {
  using Cfg = FwdCfg<kD, kBM, kBN, kMT>;
  launch_kernel<&fwd_kernel<T, kD, kBM, kBN, kMT>, Cfg::kWarps * 32, Cfg::kSmem>(p, items, stream);
}

template <typename T, int kD, int kBM, int kBN, int kMT>
void launch_dq(const Params& p, int64_t items, cudaStream_t stream) {
  using Cfg = DqCfg<kD, kBM, kBN, kMT>;
  launch_kernel<&dq_kernel<T, kD, kBM, kBN, kMT>, Cfg::kWarps * 32, Cfg::kSmem>(p, items, stream);
}

template <typename T, int kD, int kBN, int kBM, int kDO>
void launch_dkv(const Params& p, int64_t items, cudaStream_t stream) {
  using Cfg = DkvCfg<kD, kBN, kBM, kDO>;
  launch_kernel<&dkv_kernel<T, kD, kBN, kBM, kDO>, Cfg::kWarps * 32, Cfg::kSmem, kD / kDO>(p, items, stream);
}

// Registration helpers used by the instantiation files.
#define DS_REGISTER_FWD(T, DT, D, V, BM, BN, MT, AUTO)                                             \
  template void launch_fwd<T, D, BM, BN, MT>(const Params&, int64_t, cudaStream_t);              \
  static const Registrar kRegFwd##V(kOpFwd, DT, D, V, &launch_fwd<T, D, BM, BN, MT>, BM, BN, AUTO);
#define DS_REGISTER_DQ(T, DT, D, V, BM, BN, MT, AUTO)                                              \
  template void launch_dq<T, D, BM, BN, MT>(const Params&, int64_t, cudaStream_t);               \
  static const Registrar kRegDq##V(kOpDq, DT, D, V, &launch_dq<T, D, BM, BN, MT>, BM, BN, AUTO);
#define DS_REGISTER_DKV(T, DT, D, V, BN, BM, DO, AUTO)                                             \
  template void launch_dkv<T, D, BN, BM, DO>(const Params&, int64_t, cudaStream_t);              \
  static const Registrar kRegDkv##V(kOpDkv, DT, D, V, &launch_dkv<T, D, BN, BM, DO>, BN, BM, AUTO);

}  // namespace dilated_sparse::cuda
