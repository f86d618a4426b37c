// CUDA backend of the dilated_sparse ops: argument preparation, tile-list planning, the Delta
// pre-pass, the weights kernel, dispatch to the per-(dtype, head dim) kernels through the registry,
// and the TORCH_LIBRARY_IMPL(dilated_sparse, CUDA) registration.
//
// Environment (all optional; for tuning and tests):
//   DILATED_SPARSE_{FWD,DQ,DKV}_VARIANT=<n>  force tile variant n (0-9) of a kernel where compiled (see
//                                            pick(); a dS-scratch variant picks that backward, any
//                                            other the recompute one, ds_entry()).
// Every switch is read on every call that uses it, and a value it does not take is an error naming it.
//   DILATED_SPARSE_PLAN_CACHE=0|1            rebuild the tile lists on every call / cache them (default).
//   DILATED_SPARSE_SPLIT=0|1                 never split heavy forward rows / split them (default;
//                                            split_setting(), make_split()).
//   DILATED_SPARSE_SPLIT_CHUNK=<entries>     split forward rows longer than this (1..2^31-1; tests).
//   DILATED_SPARSE_SPLIT_ON_DEVICE=0|1       read the split plan's counts on the host (default) / on
//                                            the device, as a call captured into a CUDA graph does
//                                            (tests; make_split()).
//   DILATED_SPARSE_BWD_STREAMS=1|2           dQ and dK/dV on the current stream / beside each other
//                                            on two (default; bwd_cuda).
//   DILATED_SPARSE_SM90_PAD=0|1              sm_90: a head dim without wgmma kernels runs the exact
//                                            size's mma.sync kernels / the next wgmma head dim's
//                                            (default; kernel_head_dim()).
//   DILATED_SPARSE_TMA=0|1                   sm_90 kernels: cp.async copies instead of TMA / TMA
//                                            required (unset: TMA where the driver encodes the
//                                            descriptors; see set_tma()).
//   DILATED_SPARSE_SPLIT_PRODUCER=0|1        sm_90 dQ-from-dS kernel with TMA: one producer loop /
//                                            a decoding warp beside the copying ones (run_items()).
//   DILATED_SPARSE_DECODE_AHEAD=0|1          sm_90 forward: the next work item decoded after the
//                                            current one's last tile / after its first (run_items()).
//   DILATED_SPARSE_POST_LOOKUP=0|1           sm_90 D64 forward: an item handed to the consumers
//                                            once decoded / once the producer has looked up its
//                                            first tile pair, which they then skip (run_items()).
//   DILATED_SPARSE_LEAN_PRODUCER=0|1         sm_90 D64 forward with TMA: the producer's item loop on four
//                                            warps / on warp 0 alone (run_items()).
//   DILATED_SPARSE_ITEM_CHUNK=1|2|4|8        sm_90 forward, dK/dV and recompute dQ: work items a claim
//                                            takes (all but the last two waves' worth); default 2 at
//                                            short rows, else 1 (item_chunk_shift()).
//   DILATED_SPARSE_PLAN_PREFETCH=0|1         sm_90 persistent kernels: no prefetch / their producers
//                                            prefetch the plan into L2 at entry (set_plan_prefetch()).
//   DILATED_SPARSE_BWD_SCRATCH_MB=<MiB>      largest dS scratch (scratch_limit_bytes()).
//   DILATED_SPARSE_BWD_SCRATCH_TILES=0|1     blocks below the 128 x 128 tiles: recompute / a dS scratch
//                                            slot per tile pair (default; bwd_cuda).
//   DILATED_SPARSE_BWD_SCRATCH_CHUNKS=auto|0|1  when the dS-scratch backward runs in chunks
//                                            (scratch_chunks_mode()).
#include <ATen/ATen.h>
#include <c10/cuda/CUDACachingAllocator.h>  // recordStream
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/macros/Macros.h>  // CUDA_KERNEL_ASSERT_MSG
#include <cudaTypedefs.h>  // PFN_cuTensorMapEncodeTiled
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstdlib>
#include <deque>
#include <functional>
#include <future>
#include <limits>
#include <map>
#include <mutex>
#include <optional>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#include "common.cuh"
#include "dilated_sparse/detail/checks.h"
#include "kernels.cuh"
#include "params.h"

namespace dilated_sparse::cuda {

Registry& registry() {
  static Registry r;
  return r;
}

namespace {

// ---------------------------------------------------------------------------------------------
// Index values
// ---------------------------------------------------------------------------------------------
// The kernels read K / V rows and write outputs at the ids the index tensors hold, so the values
// are checked before any kernel runs, with the CPU ops' checks and messages
// (detail::check_index_values on a host copy). The copy synchronises the host, so it is made once
// per index tensor version: checked tensors are remembered with their version counters (an in-place
// edit bumps the version and is checked again), as the plans are. Inference tensors have no version
// counter and are checked on every call.
//
// While the stream is being captured into a CUDA graph there is no host copy, and a replay reads
// whatever the index tensors hold then: the same checks run as a device kernel, captured with the
// call and run on every replay before anything else of it. A bad value prints the tensor and entry
// and fails the replay with a device-side assert (the CUDA context is lost, as with PyTorch's own
// device-side index checks), never a read outside K or V. A captured forward runs its CSR checks in
// its plan kernel (plan_kernel: each row checked by the threads that read it, before they read it),
// one graph node fewer; the backward and the weights launch the kernel below.

// The device-side checks, one kernel (a captured call's replay pays one node for them): one thread
// per line, CSR rows first, then (the backward) CSC columns. A line's own offsets and ids first; a
// CSC column's entries must then be entries of their CSR rows (the CSC's entries are distinct, so
// with equal nnz, checked on the host, the map is a bijection: the transpose); the first row of each
// slice checks the weights' max_slice_nnz. The later checks read the CSR through offsets other
// threads check, so each reads only inside the tensors and leaves a bad offset to its own line's
// thread; a bad CSR can then print more than one line, the first check's among them.
struct DeviceIndexCheck {
  const int* crow;
  const int* col;
  const int* ccol = nullptr;  // the CSC pair: the backward's
  const int* row = nullptr;
  int64_t csr_nnz = 0, csc_nnz = 0;
  int slices = 0, nqb = 0, nkb = 0;
  int64_t max_slice_nnz = -1;  // the weights'; -1: none
};

// Line r's offsets and ids. `report`: a bad line prints what is wrong and asserts; else (another
// thread reading the same line reports it) it only returns false.
__device__ bool compressed_line_ok(const int* __restrict__ off, const int* __restrict__ ids, int64_t lines,
                                   int64_t r, int64_t nnz, int n_ids, bool csc, bool report = true) {
  const char* off_name = csc ? "ccol_indices" : "crow_indices";
  const char* ids_name = csc ? "row_indices" : "col_indices";
  const int a = off[r], b = off[r + 1];
  if ((r == 0 && a != 0) || (r == lines - 1 && b != nnz) || a < 0 || a > b || b > nnz) {
    if (!report) return false;
    printf("dilated_sparse: %s must run from 0 to nnz = %lld, non-decreasing (entries %lld, %lld: %d, %d)\n",
           off_name, static_cast<long long>(nnz), static_cast<long long>(r), static_cast<long long>(r + 1), a, b);
    CUDA_KERNEL_ASSERT_MSG(false, "dilated_sparse: bad index offsets (the line above names them)");
    return false;
  }
  for (int e = a; e < b; ++e) {
    const int id = ids[e];
    if (id < 0 || id >= n_ids || (e > a && ids[e - 1] >= id)) {
      if (!report) return false;
      printf("dilated_sparse: %s[%d] = %d is out of range [0, %d) or not strictly increasing within its line\n",
             ids_name, e, id, n_ids);
      CUDA_KERNEL_ASSERT_MSG(false, "dilated_sparse: bad index ids (the line above names them)");
      return false;
    }
  }
  return true;
}

// kCsc: the backward's instance. The weights' (and an empty forward's) leave out the CSC code: with
// one instance for all, the forward's graph replays, which then ran this kernel, measured 0.4-1.7 us
// slower than with the old CSR-only kernel (RESULTS.md, forty-second session); without it, level.
template <bool kCsc>
__global__ void check_index_values_kernel(const DeviceIndexCheck c) {
  const int64_t line = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  const int64_t rows = static_cast<int64_t>(c.slices) * c.nqb, cols = static_cast<int64_t>(c.slices) * c.nkb;
  if (line < rows) {
    if (!compressed_line_ok(c.crow, c.col, rows, line, c.csr_nnz, c.nkb, false)) return;
    if (c.max_slice_nnz < 0 || line % c.nqb != 0) return;
    const int a = c.crow[line], b = c.crow[line + c.nqb];
    if (a >= 0 && b <= c.csr_nnz && b - a > c.max_slice_nnz) {
      printf("dilated_sparse: max_slice_nnz (%lld) is smaller than slice %lld's %d active blocks\n",
             static_cast<long long>(c.max_slice_nnz), static_cast<long long>(line / c.nqb), b - a);
      CUDA_KERNEL_ASSERT_MSG(false, "dilated_sparse: max_slice_nnz too small (the line above says where)");
    }
    return;
  }
  if (!kCsc || line >= rows + cols) return;
  const int64_t col_line = line - rows;
  if (!compressed_line_ok(c.ccol, c.row, cols, col_line, c.csc_nnz, c.nqb, true)) return;
  const int64_t s = col_line / c.nkb;
  const int k = static_cast<int>(col_line % c.nkb);
  for (int e = c.ccol[col_line]; e < c.ccol[col_line + 1]; ++e) {
    const int r = c.row[e];
    const int first = c.crow[s * c.nqb + r], end = c.crow[s * c.nqb + r + 1];
    if (first < 0 || first > end || end > c.csr_nnz) return;  // that row's thread reports it
    int lo = first, hi = end;
    while (lo < hi) {  // first entry >= k
      const int mid = (lo + hi) / 2;
      if (c.col[mid] < k) lo = mid + 1; else hi = mid;
    }
    if (lo == end || c.col[lo] != k) {
      printf("dilated_sparse: ccol_indices / row_indices are not the transpose of crow_indices / col_indices "
             "(slice %lld, block (%d, %d))\n", static_cast<long long>(s), r, k);
      CUDA_KERNEL_ASSERT_MSG(false, "dilated_sparse: the CSC is not the CSR's transpose (the line above says where)");
      return;
    }
  }
}

// The checks above on `stream` (contiguous int32 tensors, shapes already checked).
void check_index_values_on_device(const dilated_sparse::detail::AttnDims& d, const at::Tensor& crow, const at::Tensor& col,
                                  const at::Tensor& ccol, const at::Tensor& row, int64_t max_slice_nnz,
                                  cudaStream_t stream) {
  DeviceIndexCheck c{crow.data_ptr<int>(), col.numel() > 0 ? col.data_ptr<int>() : nullptr};
  c.csr_nnz = col.numel();
  c.slices = static_cast<int>(d.num_slices());
  c.nqb = static_cast<int>(d.num_q_blocks);
  c.nkb = static_cast<int>(d.num_k_blocks);
  c.max_slice_nnz = max_slice_nnz;
  int64_t lines = static_cast<int64_t>(c.slices) * c.nqb;
  if (ccol.defined()) {
    c.ccol = ccol.data_ptr<int>();
    c.row = row.numel() > 0 ? row.data_ptr<int>() : nullptr;
    c.csc_nnz = row.numel();
    lines += static_cast<int64_t>(c.slices) * c.nkb;
  }
  constexpr int kThreads = 128;
  const auto blocks = static_cast<unsigned>(std::max<int64_t>(1, (lines + kThreads - 1) / kThreads));
  if (ccol.defined()) {
    check_index_values_kernel<true><<<blocks, kThreads, 0, stream>>>(c);
  } else {
    check_index_values_kernel<false><<<blocks, kThreads, 0, stream>>>(c);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// ---------------------------------------------------------------------------------------------
// Tile-list planning
// ---------------------------------------------------------------------------------------------

// What a captured forward's plan kernel does besides planning (fwd_cuda), each in place of a graph
// node of its own: check the CSR's rows (check_nnz >= 0: its nnz; check_ids: its key blocks), each
// by the threads that read it, before they read it ("Index values" above); zero the forward's
// work-counter pair (forward_work_counter).
struct PlanExtras {
  int64_t check_nnz = -1;
  int check_ids = 0;
  int* zero_pair = nullptr;
  bool any() const { return check_nnz >= 0 || zero_pair != nullptr; }
};

// One thread per slice-tile. Direct mode only counts. Plan mode merges the sorted block lists of
// the layout rows covered by the tile into sorted secondary-tile ids with membership masks.
__global__ void plan_kernel(const int* __restrict__ ptr, const int* __restrict__ idx, int L, int npb,
                            int ntiles, int PT, int pb, int ST, int sb, int direct, int* len,
                            int64_t* start, int* otile, uint64_t* omask, const PlanExtras extras) {
  const int64_t st = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (st >= static_cast<int64_t>(L) * ntiles) return;
  if (st == 0 && extras.zero_pair != nullptr) extras.zero_pair[0] = extras.zero_pair[1] = 0;
  const int s = static_cast<int>(st / ntiles);
  const int t = static_cast<int>(st % ntiles);
  const int kf = sb >= ST ? sb / ST : 1;
  const int64_t rows = static_cast<int64_t>(L) * npb;
  if (pb >= PT) {
    const int f = pb / PT;
    const int r = s * npb + t / f;
    const int sub = t % f;
    // A row's f threads each check it; its first reports a bad one.
    if (extras.check_nnz >= 0 &&
        !compressed_line_ok(ptr, idx, rows, r, extras.check_nnz, extras.check_ids, false, sub == 0)) {
      return;
    }
    const int64_t p0 = ptr[r], p1 = ptr[r + 1];
    const int64_t cnt = p1 - p0;
    if (direct) {
      len[st] = static_cast<int>(cnt * kf);
      return;
    }
    const int64_t base = (p0 * f + sub * cnt) * kf;
    start[st] = base;
    int n = 0;
    for (int64_t q = p0; q < p1;) {
      const int64_t blk = idx[q];
      if (kf > 1) {
        for (int u = 0; u < kf; ++u) {
          otile[base + n] = static_cast<int>(blk * kf + u);
          omask[base + n] = 1ull;
          ++n;
        }
        ++q;
        continue;
      }
      const int64_t tile = blk * sb / ST;
      uint64_t m = 0;
      while (q < p1 && static_cast<int64_t>(idx[q]) * sb / ST == tile) {
        m |= 1ull << ((static_cast<int64_t>(idx[q]) * sb - tile * ST) / sb);
        ++q;
      }
      otile[base + n] = static_cast<int>(tile);
      omask[base + n] = m;
      ++n;
    }
    len[st] = n;
    return;
  }
  // Several layout rows per tile: k-way merge.
  constexpr int kMaxR = 16;
  const int R = PT / pb;
  const int r0 = s * npb + t * R;
  const int rend = min(r0 + R, (s + 1) * npb);
  const int nr = rend - r0;
  for (int r = r0; extras.check_nnz >= 0 && r < rend; ++r) {
    if (!compressed_line_ok(ptr, idx, rows, r, extras.check_nnz, extras.check_ids, false)) return;
  }
  const int nsub = ST > sb ? ST / sb : 1;
  const int64_t base = static_cast<int64_t>(ptr[r0]) * kf;
  start[st] = base;
  int64_t cur[kMaxR], end[kMaxR];
  int u[kMaxR];
  for (int a = 0; a < kMaxR; ++a) {
    cur[a] = a < nr ? ptr[r0 + a] : 0;
    end[a] = a < nr ? ptr[r0 + a + 1] : 0;
    u[a] = 0;
  }
  int n = 0;
  while (true) {
    int64_t best = INT64_MAX;
    for (int a = 0; a < nr; ++a) {
      if (cur[a] < end[a]) {
        const int64_t v = static_cast<int64_t>(idx[cur[a]]) * sb / ST + u[a];
        best = v < best ? v : best;
      }
    }
    if (best == INT64_MAX) break;
    uint64_t m = 0;
    for (int a = 0; a < nr; ++a) {
      while (cur[a] < end[a]) {
        const int64_t blk = idx[cur[a]];
        const int64_t v = blk * sb / ST + u[a];
        if (v != best) break;
        const int c = kf > 1 ? 0 : static_cast<int>((blk * sb - best * ST) / sb);
        m |= 1ull << (a * nsub + c);
        if (kf > 1) {
          if (++u[a] == kf) {
            u[a] = 0;
            ++cur[a];
          }
        } else {
          ++cur[a];
        }
      }
    }
    otile[base + n] = static_cast<int>(best);
    omask[base + n] = m;
    ++n;
  }
  len[st] = n;
}

// A 0 / 1 switch from the environment, `fallback` where it is unset; any other value is an error
// naming the variable.
bool env_switch(const char* name, bool fallback) {
  const char* e = std::getenv(name);
  if (e == nullptr) return fallback;
  const std::string value = e;
  TORCH_CHECK(value == "0" || value == "1", "dilated_sparse CUDA: ", name, " must be 0 or 1, got '", value, "'");
  return value == "1";
}

// An integer in min..max from the environment, `fallback` where it is unset or empty; anything else
// (signs, spaces, exponents, values out of range) is an error naming the variable, so that a typo
// does not silently run (or time) the default.
int64_t env_count(const char* name, int64_t fallback, int64_t max, int64_t min = 0) {
  const char* e = std::getenv(name);
  if (e == nullptr || *e == '\0') return fallback;
  const std::string value = e;
  const bool digits = value.size() <= 12 && std::all_of(value.begin(), value.end(), [](char c) { return c >= '0' && c <= '9'; });
  TORCH_CHECK(digits && std::stoll(value) >= min && std::stoll(value) <= max, "dilated_sparse CUDA: ", name,
              " must be an integer in ", min, "..", max, ", got '", value, "'");
  return std::stoll(value);
}

struct PlanBufs {
  at::Tensor len, start, tile, mask, order, runs;
  at::Tensor sorted_len;   // `len` in `order` (the split planned on the device starts from it)
  at::Tensor work, split;  // split plan (fwd), see make_split
  at::Tensor work_count;   // {work entries, split rows} in use, where the counts stay on the device
  // dK/dV plan of the dS-scratch backward (DsSlotMap): each of its entries' scratch slot, a CSR entry
  // (block slots) or a tile pair of the dQ plan (tile slots, with each dQ slice-tile's first slot)
  at::Tensor csr_entry, ds_slot_start;
  bool ds_tile_slots = false;  // which of the two csr_entry holds
  int ds_q_tiles = -1;         // tile slots: the dQ plan's tiles a slice (ds_slot_start's layout)
  int64_t nwork = 0, nsplit = 0, nslots = 0;
  bool split_counted = false;  // an eager call's split plan, its counts read on the host (make_split)
  at::Tensor len_host;     // `len` copied to the host (len_stats), with its sum and maximum;
  int64_t len_total = -1;  // -1 until asked for
  int len_max = -1;
};

// Whether `stream` is being captured into a CUDA graph (true also if the query fails: the callers then
// take the path that is safe under capture). Each op asks once, at its start, and hands the answer
// (`captured`) to the helpers below, so a call makes one query, not one per helper.
bool capturing(cudaStream_t stream) {
  cudaStreamCaptureStatus cap = cudaStreamCaptureStatusNone;
  return cudaStreamIsCapturing(stream, &cap) != cudaSuccess || cap != cudaStreamCaptureStatusNone;
}

void stream_wait(cudaStream_t waiter, cudaStream_t signaller);  // below, with the backward's streams

// A cache's reference to a tensor it was given (index tensors: the plans' and the checked values'
// keys). Weak, so a cache never keeps a caller's memory alive (a caller may own a pool whose live
// blocks must all be its own, as torch.compile's CUDA graph trees check), yet it pins the
// TensorImpl's address (a weak reference keeps the object, not its storage), so another tensor
// never matches it. The version counter catches in-place edits. Not for inference tensors (no
// version counter): their callers do not cache.
struct TensorKey {
  std::optional<c10::weak_intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl>> impl;
  int64_t version = 0;

  TensorKey() = default;
  explicit TensorKey(const at::Tensor& t) {
    if (!t.defined()) return;
    impl.emplace(t.getIntrusivePtr());
    version = t._version();
  }
  bool matches(const at::Tensor& t) const {
    if (!impl.has_value() || !t.defined()) return !impl.has_value() && !t.defined();
    return !impl->expired() && impl->_unsafe_get_target() == t.unsafeGetTensorImpl() && t._version() == version;
  }
  bool expired() const { return impl.has_value() && impl->expired(); }
};

// The calls' small caches (plans, checked index values): the most recently used entries first, at
// most 16. An entry whose TensorKeys expired (its layout was dropped) goes at the next lookup, so the
// cache holds nothing of it longer than that. Entry: `bool expired() const`. Never destroyed (its
// users keep it in a leaked static, because of the order of destruction at exit).
template <class Entry>
class RecentEntries {
 public:
  std::mutex& mutex() { return mu_; }
  // The first entry for which match(entry) holds, moved to the front; nullptr if none. Hold mutex().
  template <class Match>
  Entry* find(Match&& match) {
    entries_.erase(std::remove_if(entries_.begin(), entries_.end(), [](const Entry& e) { return e.expired(); }),
                   entries_.end());
    for (auto it = entries_.begin(); it != entries_.end(); ++it) {
      if (!match(*it)) continue;
      if (it != entries_.begin()) {
        Entry e = std::move(*it);
        entries_.erase(it);
        entries_.push_front(std::move(e));
      }
      return &entries_.front();
    }
    return nullptr;
  }
  // Adds `e` at the front, dropping the least recently used past the cap. Hold mutex().
  void add(Entry e) {
    entries_.push_front(std::move(e));
    while (entries_.size() > kCapacity) entries_.pop_back();
  }

 private:
  static constexpr size_t kCapacity = 16;
  std::mutex mu_;
  std::deque<Entry> entries_;
};

// State a call caches for later calls (plans, the forward's work counters) must not come from a pool
// the caller owns: torch.compile's CUDA graph trees route allocations to a graph's private pool in
// their eager warm-up runs too, not only while capturing, and then require every live block of that
// pool to be one of their outputs (a cached plan failed that check: "tensors in the cudagraph pool
// not tracked as outputs"). Torch routes by thread (torch 2.11 does) or, in older releases, by stream, so an eager
// call builds what it caches on a helper thread whose current stream is one of our own (one a
// device, never a caller's), after what the caller's stream has queued, and the caller's stream
// waits for it. Tensors that a cache may later drop are recorded on the caller's stream (see
// plan_tiles), so that their memory waits for the caller's work on them.
c10::cuda::CUDAStream own_stream(c10::DeviceIndex device) {
  static std::mutex mu;
  static auto* streams = new std::map<int, cudaStream_t>();  // never destroyed (exit order)
  std::lock_guard<std::mutex> lock(mu);
  cudaStream_t& s = (*streams)[device];
  if (s == nullptr) {
    c10::cuda::CUDAGuard guard(device);
    C10_CUDA_CHECK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
  }
  return c10::cuda::getStreamFromExternal(s, device);
}
// fn(stream) on the helper thread and stream above; returns its result (rethrows its exception).
template <class Fn>
auto build_for_cache(const c10::cuda::CUDAStream& caller, Fn&& fn) {
  const c10::cuda::CUDAStream own = own_stream(caller.device_index());
  stream_wait(own.stream(), caller.stream());
  auto result = std::async(std::launch::async, [&]() {
                  c10::cuda::CUDAGuard device(caller.device_index());
                  c10::cuda::CUDAStreamGuard current(own);
                  return fn(own.stream());
                }).get();
  stream_wait(caller.stream(), own.stream());
  return result;
}

// The index values' host-side checks, once per index tensor version (see "Index values" above).

// Index tensors whose values passed, with the version counters and sizes they passed at.
struct CheckedIndices {
  std::array<TensorKey, 4> t;      // crow, col, ccol, row (the last two: the backward)
  std::array<int64_t, 4> dims{};   // slices, nqb, nkb, max_slice_nnz (-1: not the weights)

  bool matches(const std::array<const at::Tensor*, 4>& given, const std::array<int64_t, 4>& given_dims) const {
    for (int i = 0; i < 4; ++i) {
      if (!t[i].matches(*given[i])) return false;
    }
    return dims == given_dims;
  }
  bool expired() const {
    return std::any_of(t.begin(), t.end(), [](const TensorKey& k) { return k.expired(); });
  }
};

// Checks the index values (see above). ccol / row: undefined except in the backward;
// max_slice_nnz: -1 except in the weights.
void check_index_values_cached(const dilated_sparse::detail::AttnDims& d, const at::Tensor& crow, const at::Tensor& col,
                               const at::Tensor& ccol, const at::Tensor& row, int64_t max_slice_nnz,
                               cudaStream_t stream, bool captured) {
  static auto* checked = new RecentEntries<CheckedIndices>();  // never freed (exit order)
  const std::array<const at::Tensor*, 4> given = {&crow, &col, &ccol, &row};
  const std::array<int64_t, 4> dims = {d.num_slices(), d.num_q_blocks, d.num_k_blocks, max_slice_nnz};
  const bool versioned =
      std::none_of(given.begin(), given.end(), [](const at::Tensor* t) { return t->defined() && t->is_inference(); });
  if (captured) {  // checked on every replay of the graph
    check_index_values_on_device(d, crow.contiguous(), col.contiguous(), ccol.defined() ? ccol.contiguous() : ccol,
                                 row.defined() ? row.contiguous() : row, max_slice_nnz, stream);
    return;
  }
  if (versioned) {
    std::lock_guard<std::mutex> lock(checked->mutex());
    if (checked->find([&](const CheckedIndices& c) { return c.matches(given, dims); }) != nullptr) return;
  }
  // One device->host copy (one host synchronisation) for all of them: concatenated on the device.
  std::vector<at::Tensor> flat;
  for (const at::Tensor* t : given) {
    if (t->defined()) flat.push_back(t->reshape({-1}));
  }
  const at::Tensor host = at::cat(flat).to(at::kCPU);
  std::array<at::Tensor, 4> h;
  int64_t offset = 0;
  for (int i = 0; i < 4; ++i) {
    if (!given[i]->defined()) continue;
    h[i] = host.narrow(0, offset, given[i]->numel()).view(given[i]->sizes());
    offset += given[i]->numel();
  }
  dilated_sparse::detail::check_index_values(d, h[0], h[1], ccol.defined() ? &h[2] : nullptr,
                                             ccol.defined() ? &h[3] : nullptr, max_slice_nnz);
  if (!versioned) return;
  CheckedIndices passed;
  for (int i = 0; i < 4; ++i) passed.t[i] = TensorKey(*given[i]);
  passed.dims = dims;
  std::lock_guard<std::mutex> lock(checked->mutex());
  checked->add(std::move(passed));
}

// Copies a plan's entries per primary tile to the host once, with their sum and maximum, into
// `keep` (plans are cached per layout, so once per layout). False while the stream is being
// captured into a graph (no device->host copy then).
bool len_stats(PlanBufs& keep, bool captured) {
  if (keep.len_max >= 0) return true;
  if (captured) return false;
  keep.len_host = keep.len.to(at::kCPU);
  const int* len = keep.len_host.data_ptr<int>();
  keep.len_total = 0;
  keep.len_max = 0;
  for (int64_t i = 0; i < keep.len_host.numel(); ++i) {
    keep.len_total += len[i];
    keep.len_max = std::max(keep.len_max, len[i]);
  }
  return true;
}

// Load balance for heavy rows (a global row walks every key block): rows longer than a chunk C are
// cut into pieces that run as separate CTAs and are merged by lse (merge_kernel). C is the average
// work per CTA slot, so a heavy row never outlasts the rest of the grid by much, but at least a
// floor, and at least the longest row / a piece count: a piece costs more than its tiles (fp32
// partials, the merge, an item's boundaries).
//  - kSplitAuto (the sm_90 kernels: one persistent CTA an SM): slots = SMs, floor 8 entries, at
//    most 8 pieces a row. Measured call by call on the H200 at global_local (RESULTS.md,
//    thirty-eighth and thirty-ninth sessions). Where the average sets C (S16k with 4-16 heads,
//    S64k) it was the best C measured or within 0.6% of it (and C 16 6-12% slower with the merge
//    of the thirty-ninth session). Where the average is small (one to four heads, S8k-S32k) the
//    best C measured cut the global row into about 8 pieces (13 at S32k, 7% faster than 8 there),
//    and the floor of 32 before was 26-54% slower. The D32 / D64 forward runs two CTAs an SM since
//    the forty-eighth session (kFwdTwoItems) and keeps this rule, not re-measured there (its
//    global_local forward at S16k / S64k kept 97% / 97% of its local 10% throughput).
//  - kSplitAutoTwoCtas (the other kernels, two CTAs an SM; not re-measured): slots = 2 SMs, floor 8.
// `setting` (split_setting()): kSplitNever, an auto rule or a forced C in entries (tests).
// The plan is a work list of pieces and whole rows, longest first (the repeat innermost), built on the
// device (split_plan_kernel) in buffers sized for a bound. An eager call then copies its two counts to
// the host (plans are cached per layout, so once per layout): no split row drops the plan, else the
// kernels run its exact count. While the stream is being captured into a graph (no host copy then),
// or with DILATED_SPARSE_SPLIT_ON_DEVICE=1, the kernels read the counts on the device.
constexpr int kSplitNever = -1, kSplitAuto = 0, kSplitAutoTwoCtas = -2;
// The forward's split setting, read on every call (so that a bad value always raises, and a cached
// plan is reused only under the setting it was made with: it is part of the cache key):
// DILATED_SPARSE_SPLIT=0 never splits; DILATED_SPARSE_SPLIT_CHUNK=<entries> (1..2^31-1) forces C.
int split_setting() {
  const int64_t chunk = env_count("DILATED_SPARSE_SPLIT_CHUNK", kSplitAuto, INT32_MAX, 1);
  return env_switch("DILATED_SPARSE_SPLIT", true) ? static_cast<int>(chunk) : kSplitNever;
}
// The chunk rule of a setting: its CTA slots (0: a forced chunk, `floor_entries`), floor and pieces a
// row at most (0: any).
struct SplitRule {
  int64_t slots = 0, floor_entries = 1, max_pieces = 0;
};
SplitRule split_rule(int setting) {
  if (setting == kSplitAuto) return {sm_count(), 8, 8};
  if (setting == kSplitAutoTwoCtas) return {2 * int64_t{sm_count()}, 8, 0};
  return {0, setting, 0};
}
// The chunk C for rows of `len_total` entries in all, the longest `len_max`, each served `rep` times
// (split_plan_kernel).
__device__ inline int64_t split_chunk(const SplitRule& rule, int64_t len_total, int64_t len_max, int rep) {
  if (rule.slots == 0) return rule.floor_entries;
  const int64_t average = (len_total * rep + rule.slots - 1) / rule.slots;
  int64_t chunk = average > rule.floor_entries ? average : rule.floor_entries;
  if (rule.max_pieces > 0) {
    const int64_t longest = (len_max + rule.max_pieces - 1) / rule.max_pieces;
    chunk = longest > chunk ? longest : chunk;
  }
  return chunk;
}

// Exclusive sum over the CTA (1024 threads); `total` gets the CTA's sum.
__device__ __forceinline__ int block_exclusive_sum(int v, int& total) {
  __shared__ int warp_sums[32];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  int incl = v;
#pragma unroll
  for (int o = 1; o < 32; o *= 2) {
    const int x = __shfl_up_sync(0xffffffffu, incl, o);
    if (lane >= o) incl += x;
  }
  if (lane == 31) warp_sums[warp] = incl;
  __syncthreads();
  int before = 0;
  total = 0;
  for (int w = 0; w < 32; ++w) {
    before += w < warp ? warp_sums[w] : 0;
    total += warp_sums[w];
  }
  __syncthreads();  // warp_sums is reused by the next call
  return before + incl - v;
}

// The split plan, one CTA of 1024 threads, from the plan's slice-tiles sorted longest first
// (sorted_len, order: build_tiles). The rows longer than the chunk are a prefix of that order; their
// pieces (at most a chunk long) come first in the work list (each piece's slot is its position), then
// the other rows (at most a chunk) in their order. Entries past the count (counts[0]) pad `work` to
// its bound `work_cap` as empty pieces of the spare slot `spare_slot`, which no merge reads: the
// persistent kernels stop at the count (claim_item), a kernel launched a CTA an item runs them as
// empty items. counts[1]: the split rows.
__global__ void __launch_bounds__(1024) split_plan_kernel(const int* __restrict__ sorted_len,
                                                          const int64_t* __restrict__ order, int64_t nst, int rep,
                                                          SplitRule rule, int64_t work_cap,
                                                          int64_t split_cap, int spare_slot, int4* work, int4* split,
                                                          int* counts) {
  __shared__ long long total_shared;
  if (threadIdx.x == 0) total_shared = 0;
  __syncthreads();
  long long mine = 0;
  for (int64_t i = threadIdx.x; i < nst; i += blockDim.x) mine += sorted_len[i];
  for (int o = 16; o > 0; o /= 2) mine += __shfl_xor_sync(0xffffffffu, mine, o);
  if (threadIdx.x % 32 == 0) atomicAdd(reinterpret_cast<unsigned long long*>(&total_shared),
                                       static_cast<unsigned long long>(mine));
  __syncthreads();
  const long long len_total = total_shared;
  const long long chunk = split_chunk(rule, len_total, nst > 0 ? sorted_len[0] : 0, rep);
  int longer = 0;  // the split rows: a prefix of the sorted order
  for (int64_t i = threadIdx.x; i < nst; i += blockDim.x) longer += sorted_len[i] > chunk ? 1 : 0;
  int longer_total;
  block_exclusive_sum(longer, longer_total);
  const int nsplit = static_cast<int>(min(static_cast<int64_t>(longer_total), split_cap));
  int pieces_before = 0;  // pieces of the split rows before this chunk of them
  for (int i0 = 0; i0 < nsplit; i0 += blockDim.x) {
    const int i = i0 + static_cast<int>(threadIdx.x);
    const int n = i < nsplit ? sorted_len[i] : 0;
    const int pieces = i < nsplit ? static_cast<int>((n + chunk - 1) / chunk) : 0;
    int chunk_total;
    const int at = pieces_before + block_exclusive_sum(pieces, chunk_total);
    if (i < nsplit) {
      const int st = static_cast<int>(order[i]);
      const int step = (n + pieces - 1) / pieces;
      for (int q = 0; q < pieces && at + q < spare_slot; ++q) {  // slots below the spare one (the bound)
        work[at + q] = make_int4(st, min(n, q * step), min(n, (q + 1) * step), at + q);
      }
      split[i] = make_int4(st, at, pieces, 0);
    }
    pieces_before += chunk_total;
  }
  const int64_t whole_at = pieces_before - nsplit;  // row i >= nsplit goes to whole_at + i
  for (int64_t i = nsplit + threadIdx.x; i < nst; i += blockDim.x) {
    if (whole_at + i < work_cap) work[whole_at + i] = make_int4(static_cast<int>(order[i]), 0, sorted_len[i], -1);
  }
  for (int64_t i = whole_at + nst + threadIdx.x; i < work_cap; i += blockDim.x) work[i] = make_int4(0, 0, 0, spare_slot);
  if (threadIdx.x == 0) {
    counts[0] = static_cast<int>(min(whole_at + nst, work_cap));
    counts[1] = nsplit;
  }
}

// The split plan built on the device (split_plan_kernel), with no host copy (capturable), sized for
// bounds that hold whatever the lengths: with T the entries in all rows (at most `entries_bound`) and C the
// chunk, a split row holds more than C entries and its pieces number at most its length / C + 1, so
// split rows < T / C and slots < 2 T / C; the automatic rule's C >= T rep / S (S slots) makes those
// S / rep and 2 S / rep whatever T is. Rows are never split when rep >= S under that rule (C >= T).
// The work list is padded to its bound (split_plan_kernel); merge_kernel stops at the split rows'
// count.
void make_split_on_device(PlanBufs& keep, int rep, cudaStream_t stream, int setting, int64_t entries_bound) {
  const SplitRule rule = split_rule(setting);
  const int64_t slots = rule.slots, floor_entries = rule.floor_entries;
  const int64_t nst = keep.len.numel();
  if ((slots > 0 && rep >= slots) || nst == 0) return;
  const int64_t by_entries = entries_bound / floor_entries + 1;
  const int64_t split_cap = std::min(nst, slots > 0 ? std::min(by_entries, (slots + rep - 1) / rep) : by_entries);
  const int64_t slot_cap = std::min(entries_bound, slots > 0 ? std::min(2 * by_entries, (2 * slots + rep - 1) / rep)
                                                             : 2 * by_entries);
  const int64_t work_cap = nst + slot_cap;
  TORCH_CHECK(work_cap < INT32_MAX / 4, "dilated_sparse CUDA: a forward plan of ", work_cap,
              " work entries is too large to split on the device; set DILATED_SPARSE_SPLIT=0");
  auto iopt = keep.len.options().dtype(at::kInt);
  keep.work = at::empty({work_cap, 4}, iopt);
  keep.split = at::empty({std::max<int64_t>(1, split_cap), 4}, iopt);
  keep.work_count = at::empty({2}, iopt);
  split_plan_kernel<<<1, 1024, 0, stream>>>(keep.sorted_len.data_ptr<int>(), keep.order.data_ptr<int64_t>(), nst, rep,
                                            rule, work_cap, split_cap, static_cast<int>(slot_cap),
                                            reinterpret_cast<int4*>(keep.work.data_ptr<int>()),
                                            reinterpret_cast<int4*>(keep.split.data_ptr<int>()),
                                            keep.work_count.data_ptr<int>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  keep.nwork = work_cap;
  keep.nsplit = split_cap;
  keep.nslots = slot_cap + 1;  // and the padding's spare slot
}

// DILATED_SPARSE_SPLIT_ON_DEVICE=1: eager calls leave the split's counts on the device too, as a
// captured call does (tests). Read on every call; part of the plan cache's key.
bool split_on_device_setting() { return env_switch("DILATED_SPARSE_SPLIT_ON_DEVICE", false); }

void make_split(PlanBufs& keep, TileList& tl, int rep, cudaStream_t stream, bool captured, int setting,
                bool on_device, int64_t entries_bound) {
  if (setting == kSplitNever) return;
  make_split_on_device(keep, rep, stream, setting, entries_bound);
  if (!on_device && !captured) {
    // Eager: the counts on the host (one copy), so a plan with no split row is dropped (the unsplit
    // order, which short rows prefer) and the kernels run the exact count (no padding).
    keep.split_counted = true;
    if (keep.work.defined()) {
      const at::Tensor counts = keep.work_count.to(at::kCPU);
      const int nwork = counts.data_ptr<int>()[0], nsplit = counts.data_ptr<int>()[1];
      if (nsplit == 0) {
        keep.work = keep.split = at::Tensor();
        keep.nwork = keep.nsplit = keep.nslots = 0;
      } else {
        keep.nwork = nwork;
        keep.nsplit = nsplit;
        keep.nslots = nwork - (keep.len.numel() - nsplit);  // the pieces (the rest are whole rows)
      }
      keep.work_count = at::Tensor();
    }
  }
  if (keep.work.defined()) {
    tl.work = reinterpret_cast<const int4*>(keep.work.data_ptr<int>());
    tl.work_count = keep.work_count.defined() ? keep.work_count.data_ptr<int>() : nullptr;
  }
}

// The run of equal ranks holding index i of a vector whose rank(j) ascends with j: {first index,
// length}, by two binary searches.
template <typename Rank>
__device__ __forceinline__ int2 equal_rank_run(Rank rank, int64_t n, int64_t i) {
  const unsigned r = rank(i);
  int64_t lo = 0, hi = i;  // first index of rank r
  while (lo < hi) {
    const int64_t mid = (lo + hi) / 2;
    if (rank(mid) < r) lo = mid + 1; else hi = mid;
  }
  const int64_t first = lo;
  lo = i + 1;
  hi = n;  // past the run
  while (lo < hi) {
    const int64_t mid = (lo + hi) / 2;
    if (rank(mid) <= r) lo = mid + 1; else hi = mid;
  }
  return make_int2(static_cast<int>(first), static_cast<int>(lo - first));
}

// Runs of equal values in a length vector sorted in descending order: runs[i] = {first index, length}
// of the run holding index i. One kernel: the run's ends are two binary searches in the sorted
// vector. (It replaced ~15 small tensor ops, which a CUDA graph replay paid as nodes, ~2 us each,
// since a captured call rebuilds its plans; RESULTS.md, thirty-seventh session.)
__global__ void equal_length_runs_kernel(const int* __restrict__ sorted, int64_t n, int2* __restrict__ runs) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= n) return;
  // Lengths are >= 0, so ~length ascends where the lengths descend.
  runs[i] = equal_rank_run([&](int64_t j) { return ~static_cast<unsigned>(sorted[j]); }, n, i);
}

at::Tensor equal_length_runs(const at::Tensor& sorted_len, cudaStream_t stream) {
  const int64_t n = sorted_len.numel();
  at::Tensor runs = at::empty({n, 2}, sorted_len.options().dtype(at::kInt));
  if (n > 0) {
    equal_length_runs_kernel<<<static_cast<unsigned>((n + 255) / 256), 256, 0, stream>>>(
        sorted_len.data_ptr<int>(), n, reinterpret_cast<int2*>(runs.data_ptr<int>()));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return runs;
}

// A plan's order for at most kSmallOrderMax slice-tiles, in one kernel (one CTA): the order of a
// stable descending sort of the lengths (longest first, ties by index), the sorted lengths and their
// equal-length runs (as equal_length_runs_kernel). A bitonic sort of unique (length, index) keys in
// shared memory. It stands in for at::sort (three graph nodes: a copy, the indices, the sort) and the
// runs kernel, which a captured call's every replay paid (~2 us a node).
constexpr int kSmallOrderMax = 4096;
__global__ void __launch_bounds__(1024) small_order_kernel(const int* __restrict__ len, int n, int* sorted_len,
                                                           int64_t* order, int2* runs) {
  __shared__ unsigned long long keys[kSmallOrderMax];  // (~length) << 32 | index: ascending = the order
  int size = 1;
  while (size < n) size *= 2;
  for (int i = threadIdx.x; i < size; i += blockDim.x) {
    keys[i] = i < n ? static_cast<unsigned long long>(~static_cast<unsigned>(len[i])) << 32 | static_cast<unsigned>(i)
                    : ~0ull;
  }
  for (int k = 2; k <= size; k *= 2) {
    for (int j = k / 2; j > 0; j /= 2) {
      __syncthreads();
      for (int i = threadIdx.x; i < size; i += blockDim.x) {
        const int partner = i ^ j;
        if (partner > i) {
          const unsigned long long a = keys[i], b = keys[partner];
          if ((a > b) == ((i & k) == 0)) {
            keys[i] = b;
            keys[partner] = a;
          }
        }
      }
    }
  }
  __syncthreads();
  for (int i = threadIdx.x; i < n; i += blockDim.x) {
    const unsigned long long key = keys[i];
    sorted_len[i] = static_cast<int>(~static_cast<unsigned>(key >> 32));
    order[i] = static_cast<int64_t>(key & 0xffffffffull);
    runs[i] = equal_rank_run([&](int64_t j) { return static_cast<unsigned>(keys[j] >> 32); }, n, i);
  }
}

TileList build_tiles(const at::Tensor& ptr, const at::Tensor& idx, int L, int npb, int prim_tokens,
                     int PT, int pb, int ST, int sb, int rep, int hdec, PlanBufs& keep,
                     cudaStream_t stream, const PlanExtras& extras = {}) {
  TileList tl;
  tl.ntiles = (prim_tokens + PT - 1) / PT;
  tl.prim_sub = pb < PT ? pb : PT;
  tl.sec_sub = sb < ST ? sb : ST;
  tl.nsub = ST > sb ? ST / sb : 1;
  const int R = PT > pb ? PT / pb : 1;
  const int nbits = R * tl.nsub;
  tl.full = nbits >= 64 ? ~0ull : ((1ull << nbits) - 1);
  tl.direct = (pb >= PT && sb >= ST) ? 1 : 0;
  tl.fsplit = pb >= PT ? pb / PT : 1;
  tl.kf = sb >= ST ? sb / ST : 1;
  tl.ptr = ptr.data_ptr<int>();
  tl.idx = idx.numel() > 0 ? idx.data_ptr<int>() : nullptr;
  tl.npb = npb;
  tl.rep = rep;
  tl.hdec = hdec;
  const int64_t nst = static_cast<int64_t>(L) * tl.ntiles;
  auto iopt = ptr.options().dtype(at::kInt);
  keep.len = at::empty({nst}, iopt);
  int64_t* startp = nullptr;
  int* tilep = nullptr;
  uint64_t* maskp = nullptr;
  if (!tl.direct) {
    const int64_t ub = std::max<int64_t>(1, idx.numel() * tl.fsplit * tl.kf);
    keep.start = at::empty({nst}, iopt.dtype(at::kLong));
    keep.tile = at::empty({ub}, iopt);
    keep.mask = at::empty({ub}, iopt.dtype(at::kLong));
    startp = keep.start.data_ptr<int64_t>();
    tilep = keep.tile.data_ptr<int>();
    maskp = reinterpret_cast<uint64_t*>(keep.mask.data_ptr<int64_t>());
  }
  if (nst > 0) {
    const int threads = 128;
    const int64_t blocks = (nst + threads - 1) / threads;
    plan_kernel<<<static_cast<unsigned>(blocks), threads, 0, stream>>>(
        tl.ptr, tl.idx, L, npb, tl.ntiles, PT, pb, ST, sb, tl.direct, keep.len.data_ptr<int>(),
        startp, tilep, maskp, extras);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (nst <= kSmallOrderMax) {
      keep.sorted_len = at::empty({nst}, iopt);
      keep.order = at::empty({nst}, iopt.dtype(at::kLong));
      keep.runs = at::empty({nst, 2}, iopt);
      small_order_kernel<<<1, 1024, 0, stream>>>(keep.len.data_ptr<int>(), static_cast<int>(nst),
                                                 keep.sorted_len.data_ptr<int>(), keep.order.data_ptr<int64_t>(),
                                                 reinterpret_cast<int2*>(keep.runs.data_ptr<int>()));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    } else {
      auto [sorted_len, order] = at::sort(keep.len, /*stable=*/true, /*dim=*/0, /*descending=*/true);
      keep.order = order;
      keep.sorted_len = sorted_len.contiguous();
      keep.runs = equal_length_runs(keep.sorted_len, stream);
    }
  } else {
    keep.order = at::empty({0}, iopt.dtype(at::kLong));
    keep.runs = at::empty({0, 2}, iopt);
  }
  tl.len = keep.len.data_ptr<int>();
  tl.start = startp;
  tl.tile = tilep;
  tl.mask = maskp;
  tl.order = keep.order.data_ptr<int64_t>();
  tl.runs = reinterpret_cast<const int2*>(keep.runs.data_ptr<int>());
  return tl;
}

// Tile lists are pure functions of the index tensors and the tile parameters, and a layout is
// reused across calls (every training step, forward and backward): cache the last few plans, keyed
// by the index tensors (TensorKey: weak, with their version counters, so in-place edits are caught
// and a dropped layout's entry goes at the next lookup), the parameters and the stream. Set
// DILATED_SPARSE_PLAN_CACHE=0 to disable. Inference tensors (no version counter) are never cached.
// Plans are built for the cache outside the caller's pools (build_for_cache); a call being captured
// into a CUDA graph neither uses nor fills the cache (below).
struct PlanCacheEntry {
  TensorKey ptr, idx;
  int params[10] = {};
  cudaStream_t stream = nullptr;
  PlanBufs bufs;
  TileList tl;
  bool expired() const { return ptr.expired() || idx.expired(); }
};

// The dS scratch's slot map of a dK/dV plan (bwd_cuda): `build` fills PlanBufs::csr_entry (and
// ds_slot_start) from the plan's tile list on the stream it is given.
struct DsSlotMap {
  bool tiles;   // tile slots (else block slots)
  int q_tiles;  // tile slots: the dQ plan's tiles a slice
  std::function<void(PlanBufs&, const TileList&, cudaStream_t)> build;
  // Whether `bufs` already holds this map (its kind and, for tile slots, the dQ tile count it was
  // built for).
  bool held_by(const PlanBufs& bufs) const {
    return bufs.csr_entry.defined() && bufs.ds_tile_slots == tiles && (!tiles || bufs.ds_q_tiles == q_tiles);
  }
  // Builds it into `bufs` and records what was built.
  void build_into(PlanBufs& bufs, const TileList& dkv, cudaStream_t stream) const {
    build(bufs, dkv, stream);
    bufs.ds_tile_slots = tiles;
    bufs.ds_q_tiles = q_tiles;
  }
};

// Whether plan_tiles caches the plans of these index tensors (outside a graph capture): the cache on
// (DILATED_SPARSE_PLAN_CACHE, read on every call: a bad value raises) and tensors with version
// counters (not inference tensors).
bool plans_cached(const at::Tensor& ptr, const at::Tensor& idx) {
  return env_switch("DILATED_SPARSE_PLAN_CACHE", true) && !ptr.is_inference() && !idx.is_inference();
}

// slot_map (dK/dV plans of the dS-scratch backward): built once per cached plan, kind and dQ tile
// count (a consistent CSC determines its CSR up to trailing empty rows, and so the CSR's plans up to
// their tile count: the CSC's key and that count cover it).
// want_len_stats: fills the len_* fields (len_stats), once per cached plan. captured: whether `stream`
// is being captured into a graph (the op's capturing()). extras: only then (the plan is then built by
// every replay).
TileList plan_tiles(const at::Tensor& ptr, const at::Tensor& idx, int L, int npb, int prim_tokens,
                    int PT, int pb, int ST, int sb, int rep, int hdec, PlanBufs& keep,
                    cudaStream_t stream, bool captured, int split = kSplitNever, const DsSlotMap* slot_map = nullptr,
                    bool want_len_stats = false, bool split_on_device = false, const PlanExtras& extras = {}) {
  static auto* cache = new RecentEntries<PlanCacheEntry>();  // never freed (exit order)
  const bool uncached = !plans_cached(ptr, idx);
  TORCH_INTERNAL_ASSERT(!extras.any() || captured, "plan_tiles: plan extras outside a graph capture");
  // `s`: the caller's stream, or the cache's own (used only outside a capture, so `captured` holds
  // for both).
  auto build = [&](PlanBufs& bufs, cudaStream_t s) {
    TileList built = build_tiles(ptr, idx, L, npb, prim_tokens, PT, pb, ST, sb, rep, hdec, bufs, s, extras);
    make_split(bufs, built, rep, s, captured, split, split_on_device,
               std::max<int64_t>(1, idx.numel() * built.fsplit * built.kf));  // the entries' bound
    if (slot_map != nullptr) slot_map->build_into(bufs, built, s);
    if (want_len_stats) len_stats(bufs, captured);
    return built;
  };
  // Not cached (freed with the call): with the cache off, for inference tensors, and while the stream
  // is captured. A captured call's plan is the graph's own, rebuilt by every replay from what the index
  // tensors hold then; a cached plan would have to outlive every graph that uses it, and a graph
  // pool's memory must not stay referenced outside the graph (torch.compile's CUDA graph trees).
  // The automatic split's chunk grows with the repeats (make_split), so its plans are kept per repeat
  // count; every other plan serves any (TileList::rep is set below).
  const bool auto_split = split == kSplitAuto || split == kSplitAutoTwoCtas;
  int params[10] = {L, npb, prim_tokens, PT, pb, ST, sb, split, auto_split ? rep : 0,
                    split != kSplitNever && split_on_device};
  auto same_plan = [&](const PlanCacheEntry& e) {
    return e.ptr.matches(ptr) && e.idx.matches(idx) && std::equal(params, params + 10, e.params);
  };
  if (uncached || captured) {
    // A captured call cannot read the row lengths, so its split is planned on the device (make_split),
    // which costs a plan kernel a replay and, where nothing is split, a work list in place of the
    // unsplit order (the repeat innermost: up to 10% slower at short rows, RESULTS.md, thirtieth
    // session). So where an eager call planned these index tensors (on any stream) and found no row to
    // split, the captured call does not split either.
    if (!uncached && split != kSplitNever && !split_on_device) {
      std::lock_guard<std::mutex> lock(cache->mutex());
      const PlanCacheEntry* eager = cache->find(same_plan);
      if (eager != nullptr && eager->bufs.split_counted && !eager->bufs.work.defined()) split = kSplitNever;
    }
    return build(keep, stream);
  }
  const c10::cuda::CUDAStream caller = c10::cuda::getCurrentCUDAStream();
  TORCH_INTERNAL_ASSERT(caller.stream() == stream, "plan_tiles: plans are built for the current stream");
  auto cached_build = [&](auto&& fn) { return build_for_cache(caller, fn); };
  auto record_on_caller = [&](const PlanBufs& b) {
    for (const at::Tensor* t : {&b.len, &b.start, &b.tile, &b.mask, &b.order, &b.runs, &b.sorted_len, &b.work, &b.split, &b.work_count, &b.csr_entry, &b.ds_slot_start}) {
      if (t->defined() && t->is_cuda()) c10::cuda::CUDACachingAllocator::recordStream(t->storage().data_ptr(), caller);
    }
  };
  std::lock_guard<std::mutex> lock(cache->mutex());
  PlanCacheEntry* hit = cache->find([&](const PlanCacheEntry& e) { return e.stream == stream && same_plan(e); });
  if (hit != nullptr) {
    if (slot_map != nullptr && !slot_map->held_by(hit->bufs)) {
      cached_build([&](cudaStream_t s) {
        slot_map->build_into(hit->bufs, hit->tl, s);
        return true;
      });
      record_on_caller(hit->bufs);
    }
    if (want_len_stats) len_stats(hit->bufs, captured);
    keep = hit->bufs;
    TileList tl = hit->tl;
    tl.rep = rep;
    tl.hdec = hdec;
    return tl;
  }
  TileList tl = cached_build([&](cudaStream_t s) { return build(keep, s); });
  record_on_caller(keep);
  PlanCacheEntry e;
  e.ptr = TensorKey(ptr);
  e.idx = TensorKey(idx);
  std::copy(params, params + 10, e.params);
  e.stream = stream;
  e.bufs = keep;
  e.tl = tl;
  cache->add(std::move(e));
  return tl;
}

// ---------------------------------------------------------------------------------------------
// Delta = rowsum(dout * out) (- dlse: a gradient through lse adds dlse_i * P_ij to dS_ij), fp32,
// [B, H, Sq]
// ---------------------------------------------------------------------------------------------

// kTPR threads per row (16 bytes each, a power of two covering D), kRows rows a thread: a CTA
// reads 256 / kTPR * kRows consecutive rows of the [B, S, H] row order (contiguous memory), and
// every thread issues its loads before it reduces them. Two rows a thread measured 2-7% faster than
// one; four or more were slower (fewer CTAs in flight). A row's (b, i, h) is decoded once, with
// 32-bit divisions when the row count fits (Idx = uint32_t): the 64-bit ones, twice a row, made the
// kernel issue-bound (55 us at S16k H16 D128, against 34 us for Flex's Delta).
// It also zeroes the backward's work counters (`counters`, n_counters of them; the persistent
// kernels after it take their items from them), which saves a fill kernel launch before them.
template <typename T, int kTPR, int kRows, typename Idx>
__global__ void __launch_bounds__(256) delta_kernel(const T* __restrict__ o, const T* __restrict__ dout, float* delta,
                                                    const float* __restrict__ lse, const float* __restrict__ dlse,
                                                    float* lse_log2,
                                                    int64_t o_sb, int64_t o_ss, int64_t o_sh, int64_t d_sb,
                                                    int64_t d_ss, int64_t d_sh, int B, int Sq, int H, int D,
                                                    int* counters, int n_counters) {
  if (blockIdx.x == 0) {
    for (int i = threadIdx.x; i < n_counters; i += blockDim.x) counters[i] = 0;
  }
  constexpr int kLanes = 256 / kTPR;  // rows a CTA reads at once
  const Idx rows = static_cast<Idx>(B) * static_cast<Idx>(Sq) * static_cast<Idx>(H);
  const Idx row0 = static_cast<Idx>(blockIdx.x) * (kLanes * kRows) + threadIdx.x / kTPR;
  const int d = (threadIdx.x % kTPR) * 8;
  uint4 ov[kRows], dv[kRows];
  float lv[kRows], gv[kRows];  // lse, and dlse (0 without it)
  int64_t dst[kRows];  // where the row's Delta (and log2 lse) goes ([B, H, Sq]); -1: past the end
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    const Idx row = row0 + r * kLanes;  // row = (b * Sq + i) * H + h
    ov[r] = dv[r] = make_uint4(0, 0, 0, 0);
    lv[r] = gv[r] = 0.f;
    dst[r] = -1;
    if (row < rows) {
      const Idx bi = row / static_cast<Idx>(H), h = row - bi * static_cast<Idx>(H);
      const Idx b = bi / static_cast<Idx>(Sq), i = bi - b * static_cast<Idx>(Sq);
      dst[r] = (static_cast<int64_t>(b) * H + static_cast<int64_t>(h)) * Sq + static_cast<int64_t>(i);
      if (d == 0) {
        lv[r] = lse[dst[r]];
        // An empty row's lse (-inf) is a constant: its gradient, whatever it holds (merging two
        // empty partials by logaddexp gives NaN), must not reach dS = P (dP - Delta) as 0 * NaN.
        if (dlse != nullptr && lv[r] != -INFINITY) gv[r] = dlse[dst[r]];
      }
      if (d < D) {
        const int64_t bl = static_cast<int64_t>(b), il = static_cast<int64_t>(i), hl = static_cast<int64_t>(h);
        ov[r] = *reinterpret_cast<const uint4*>(o + bl * o_sb + il * o_ss + hl * o_sh + d);
        dv[r] = *reinterpret_cast<const uint4*>(dout + bl * d_sb + il * d_ss + hl * d_sh + d);
      }
    }
  }
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    const T* oe = reinterpret_cast<const T*>(&ov[r]);
    const T* de = reinterpret_cast<const T*>(&dv[r]);
    float acc = 0.f;
#pragma unroll
    for (int e = 0; e < 8; ++e) acc += to_float(oe[e]) * to_float(de[e]);
#pragma unroll
    for (int off = kTPR / 2; off > 0; off >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, off);
    if (dst[r] >= 0 && d == 0) {
      delta[dst[r]] = acc - gv[r];  // a gradient through lse: Delta - dlse (RESULTS.md, sixteenth session)
      lse_log2[dst[r]] = lse_to_log2(lv[r]);
    }
  }
}

// The dS scratch's tile slots (blocks of at most a tile, bwd_cuda): each entry of the dK/dV plan (key
// tile t, a 64-query step) -> the slot of the dQ plan's 128 x 128 tile pair that holds it: that query
// tile's first slot (slot_start: the dQ plan's entries before it) plus t's position in its tile list
// (ascending, plan_kernel), found by bisection. `steps`: dK/dV query steps a dQ tile.
__global__ void ds_tile_slots_kernel(const TileList dkv, const TileList dq, int L, const int64_t* slot_start, int steps,
                                     int* slot_of) {
  const int64_t st = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (st >= static_cast<int64_t>(L) * dkv.ntiles) return;
  const int s = static_cast<int>(st / dkv.ntiles), t = static_cast<int>(st % dkv.ntiles);
  const Entries E = make_entries(dkv, s, t);
  for (int j = 0; j < E.n; ++j) {
    int step;
    uint64_t m;
    E.get(j, step, m);
    const int qt = step / steps;
    const Entries Q = make_entries(dq, s, qt);
    int lo = 0, hi = Q.n - 1;
    while (lo < hi) {
      const int mid = (lo + hi) / 2;
      if (Q.tile[Q.base + mid] < t) {
        lo = mid + 1;
      } else {
        hi = mid;
      }
    }
    slot_of[E.base + j] = static_cast<int>(slot_start[static_cast<int64_t>(s) * dq.ntiles + qt] + lo);
  }
}

// DILATED_SPARSE_BWD_SCRATCH_TILES=0: blocks below the kernels' tiles never use the dS scratch
// (recompute). Read on every call.
bool ds_tile_slots_setting() { return env_switch("DILATED_SPARSE_BWD_SCRATCH_TILES", true); }

// CSC entry -> CSR entry of the same layout block (the dS scratch is addressed by CSR entry): the
// entry's column by bisection over the column pointers, then its column inside its CSR row.
__global__ void csc_to_csr_kernel(const int* ccol, const int* rowi, const int* crow, const int* col, int ncols,
                                  int nkb, int nqb, int64_t nnz, int* csr_entry) {
  const int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e >= nnz) return;
  int lo = 0, hi = ncols - 1;  // the last column starting at or before e
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (ccol[mid] <= e) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  const int c = lo % nkb;
  int a = crow[(lo / nkb) * nqb + rowi[e]], z = crow[(lo / nkb) * nqb + rowi[e] + 1];
  while (a < z) {
    const int mid = (a + z) / 2;
    if (col[mid] < c) {
      a = mid + 1;
    } else {
      z = mid;
    }
  }
  csr_entry[e] = a;
}

// counters: n_counters work counters to zero (delta_kernel).
template <typename T>
void launch_delta(const Params& p, int* counters, int n_counters, cudaStream_t stream) {
  const int64_t rows = static_cast<int64_t>(p.B) * p.Sq * p.H;
  constexpr int kRows = 2;
  // A power of two of 16-byte lanes covering D (max head dim 256: one load a lane); 32-bit row
  // decoding while the last CTA's rows stay below 2^32.
  auto run = [&](auto tpr) {
    constexpr int kTPR = decltype(tpr)::value;
    constexpr int64_t kCtaRows = 256 / kTPR * kRows;
    const auto grid = static_cast<unsigned>((rows + kCtaRows - 1) / kCtaRows);
    auto launch = [&](auto idx) {
      delta_kernel<T, kTPR, kRows, decltype(idx)><<<grid, 256, 0, stream>>>(
          static_cast<const T*>(p.o), static_cast<const T*>(p.dout), p.delta, p.lse, p.dlse, p.lse_log2,
          p.o_sb, p.o_ss, p.o_sh, p.do_sb, p.do_ss, p.do_sh, p.B, p.Sq, p.H, p.D, counters, n_counters);
    };
    if (rows + kCtaRows < (int64_t{1} << 32)) {
      launch(uint32_t{});
    } else {
      launch(uint64_t{});
    }
  };
  if (p.D <= 32) {
    run(std::integral_constant<int, 4>{});
  } else if (p.D <= 64) {
    run(std::integral_constant<int, 8>{});
  } else if (p.D <= 128) {
    run(std::integral_constant<int, 16>{});
  } else {
    run(std::integral_constant<int, 32>{});
  }
}

// ---------------------------------------------------------------------------------------------
// Weights: P of every active block, [B, H, max_slice_nnz, bq, bk] (SIMT, fp32 dot products)
// ---------------------------------------------------------------------------------------------

template <typename T>
__global__ void __launch_bounds__(256) weights_kernel(Params p, const int* __restrict__ crow,
                                                      const int* __restrict__ col, T* w,
                                                      int64_t msn, int bh0) {
  __shared__ float sq[32][33];
  __shared__ float sk[32][33];
  const int tid = threadIdx.x;
  const int bh = bh0 + static_cast<int>(blockIdx.y);  // launches of at most 65535 (b, h) pairs each
  const int b = bh / p.H, h = bh % p.H;
  const int hk = h / p.G;
  const int s = (p.Lb == 1 ? 0 : b) * p.Lh + (p.Lh == 1 ? 0 : h);
  const int64_t e = blockIdx.x;
  const int rbeg = s * p.nqb;
  const int64_t base = crow[rbeg];
  const int64_t cnt = crow[rbeg + p.nqb] - base;
  const int64_t blk = static_cast<int64_t>(p.bq) * p.bk;
  T* wout = w + (static_cast<int64_t>(bh) * msn + e) * blk;
  if (e >= cnt) {
    for (int64_t x = tid; x < blk; x += blockDim.x) wout[x] = from_float<T>(0.f);
    return;
  }
  const int64_t pos = base + e;
  int lo = rbeg, hi = rbeg + p.nqb - 1;  // last row r with crow[r] <= pos
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (crow[mid] <= pos) lo = mid; else hi = mid - 1;
  }
  const int qb = lo - rbeg;
  const int kb = col[pos];
  const T* qg = static_cast<const T*>(p.q) + b * p.q_sb + h * p.q_sh;
  const T* kg = static_cast<const T*>(p.k) + b * p.k_sb + hk * p.k_sh;
  int klen = p.Sk;
  if (p.key_lengths != nullptr) klen = min(klen, max(0, p.key_lengths[b]));
  const bool* kpm = p.kpm != nullptr ? p.kpm + static_cast<int64_t>(b) * p.Sk : nullptr;
  const float* lse = p.lse + (static_cast<int64_t>(b) * p.H + h) * p.Sq;
  const int ty = tid / 16, tx = tid % 16;
  for (int i0 = 0; i0 < p.bq; i0 += 32) {
    for (int j0 = 0; j0 < p.bk; j0 += 32) {
      float acc[2][2] = {{0.f, 0.f}, {0.f, 0.f}};
      for (int d0 = 0; d0 < p.D; d0 += 32) {
        for (int x = tid; x < 32 * 32; x += 256) {
          const int r = x / 32, c = x % 32;
          const int i = qb * p.bq + i0 + r, j = kb * p.bk + j0 + r, d = d0 + c;
          sq[r][c] = (i0 + r < p.bq && i < p.Sq && d < p.D)
                         ? to_float(qg[static_cast<int64_t>(i) * p.q_ss + d]) : 0.f;
          sk[r][c] = (j0 + r < p.bk && j < p.Sk && d < p.D)
                         ? to_float(kg[static_cast<int64_t>(j) * p.k_ss + d]) : 0.f;
        }
        __syncthreads();
#pragma unroll 8
        for (int c = 0; c < 32; ++c) {
#pragma unroll
          for (int a = 0; a < 2; ++a)
#pragma unroll
            for (int bb = 0; bb < 2; ++bb) acc[a][bb] += sq[ty * 2 + a][c] * sk[tx * 2 + bb][c];
        }
        __syncthreads();
      }
#pragma unroll
      for (int a = 0; a < 2; ++a) {
#pragma unroll
        for (int bb = 0; bb < 2; ++bb) {
          const int ri = i0 + ty * 2 + a, cj = j0 + tx * 2 + bb;
          if (ri >= p.bq || cj >= p.bk) continue;
          const int i = qb * p.bq + ri, j = kb * p.bk + cj;
          bool ok = i < p.Sq && j < klen;
          if (p.causal) ok = ok && j <= i;
          if (p.wl >= 0) ok = ok && i - j <= p.wl;
          if (p.wr >= 0) ok = ok && j - i <= p.wr;
          if (ok && kpm != nullptr) ok = !kpm[j];
          float val = 0.f;
          if (ok) {
            const float l = lse[i];
            val = l == -INFINITY ? 0.f : expf(acc[a][bb] * p.scale - l);
          }
          wout[static_cast<int64_t>(ri) * p.bk + cj] = from_float<T>(val);
        }
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Host helpers
// ---------------------------------------------------------------------------------------------

// The smallest specialised head dim (kHeadDims) >= D, or 0.
int padded_head_dim(int64_t D) {
  for (const int kD : kHeadDims) {
    if (D <= kD) return kD;
  }
  return 0;
}

// Last dim contiguous, 16-byte aligned rows (cp.async / vector loads); else a contiguous copy.
at::Tensor prep(const at::Tensor& t) {
  bool ok = t.stride(-1) == 1 || t.size(-1) == 1;
  ok = ok && reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
  for (int64_t d = 0; d + 1 < t.dim(); ++d) {
    if (t.size(d) > 1 && t.stride(d) % 8 != 0) ok = false;
  }
  return ok ? t : t.clone(at::MemoryFormat::Contiguous);
}

int dtype_index(const at::Tensor& t) {
  if (t.scalar_type() == at::kHalf) return 0;
  if (t.scalar_type() == at::kBFloat16) return 1;
  return -1;
}

// A reduced build (DILATED_SPARSE_CUDA_INSTANTIATIONS) lacks some kernels. Raised from its own
// frame with a prebuilt message: the TORCH_CHECK formatting this inline in pick() crashed the
// process on the H200 (segfault instead of the error), seen 2026-11-29.
[[noreturn]] __attribute__((noinline)) void fail_not_compiled(int dtype_index, int kD) {
  const std::string msg = std::string("dilated_sparse CUDA: no ") + (dtype_index == 0 ? "float16" : "bfloat16") +
                          " kernel for head dim " + std::to_string(kD) +
                          " in this build (left out by DILATED_SPARSE_CUDA_INSTANTIATIONS; rebuild with the full set)";
  TORCH_CHECK(false, msg);
}

// Whether the current device runs the sm_90a (wgmma) kernels: compute capability 9.0 exactly (an
// sm_90a cubin loads on no other device). Cached per device.
bool device_is_sm90() {
  static int cache[64] = {};  // 0 unknown, 1 yes, 2 no
  int dev = 0;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  int& c = cache[dev & 63];
  if (c == 0) {
    int major = 0, minor = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev));
    c = (major == 9 && minor == 0) ? 1 : 2;
  }
  return c == 1;
}

// DILATED_SPARSE_{FWD,DQ,DKV}_VARIANT of `op`, or -1 where unset or empty (env_count).
int forced_variant(Op op) {
  static const char* const kEnv[kNumOps] = {"DILATED_SPARSE_FWD_VARIANT", "DILATED_SPARSE_DQ_VARIANT",
                                            "DILATED_SPARSE_DKV_VARIANT"};
  return static_cast<int>(env_count(kEnv[op], -1, kMaxVariants - 1));
}

// The kernel variant of one call. Usable variants: compiled, and for arch-90 (wgmma) variants a
// compute capability 9.0 device. DILATED_SPARSE_{FWD,DQ,DKV}_VARIANT=<n> forces variant n when
// usable. Otherwise the default is the first usable wgmma variant (4..7) on sm_90, else variant 0;
// when the layout's primary block (block_q for fwd/dQ, block_k for dK/dV) is smaller than the
// default's tile, the variant of the default's family (wgmma or mma.sync) marked `small` with the
// largest tile <= the block is taken, if any and if rows are short enough (small_tile_max_tokens;
// fewer wasted rows per tile; marked where measured faster, gen_instantiations.py).
// Rows at most this many secondary tokens long on average (four 128-key tiles) take a "short
// rows" variant where one exists (sm_90, D128: dQ with two primary buffers and two-slot K/V ring
// stages). H200, S16k, same process: at ~384 tokens a row the backward 4% faster than the
// default; at ~870 dQ equal.
constexpr double kShortRowTokens = 512.0;
// The forward's threshold (D128: the two-buffer, two-stage kernel). With TMA producers it is 8-9%
// faster than the default (three ring stages) at 128 and 256 tokens a row and 10% slower at 384
// (H200, S16k H16 bands of 1-3 blocks, ninth session; gen_instantiations.py); against the default
// with Q in registers 11% and 7% faster, 8% slower (seventeenth session).
constexpr double kShortRowTokensFwd = 320.0;
// Rows longer than this take a "wide" variant where one exists (D128 dQ with 128-key steps) and the
// secondary block is a multiple of its step. H200, S16k block 128, whole backward, D128 dQ 128 vs
// 64 keys a step (seventh session): causal_local 5% (~850 tokens a row) 3% slower, dilated (~1500)
// equal, global_local (~1130 on average) 2% and local 10% (~1640) 2% faster; S64k causal_local and
// dilated (~3300 / ~6100) 3% faster. At block 64 the wide steps were 16% slower (fifth session).
constexpr double kWideRowTokens = 1024.0;
// A primary block smaller than the default's tile takes the `small` variant only while rows are at
// most this many secondary tokens long; longer rows keep the default, whose tile spans several
// layout rows (merged key tiles with membership masks). Since mask_tile tests each row's rules as
// one interval and membership per eight-column group (tenth session), the default's edge tiles cost
// little more than full ones, and on sm_90 the default now wins everywhere (below).
// H200, S16k, block 64, local 2.5 / 5 / 10% and causal_local 5% (448 / 832 / 1600 / ~830 tokens a
// row), bf16, each op's variants forced in turn (.whl/abvar.py, three interleaved rounds, medians):
//   D128 forward: default 28% faster at 448 (196 vs 272 us), 41-47% at 832 and 1600;
//   D64 forward: small 4% faster at 448 (293 vs 304 us), default 20% faster at 832, 27% at 1600;
//   D64 dQ (whole backward): equal at 448-832, default 16% faster at 1600;
//   D64 dK/dV (whole backward): default 7% faster at 448, 16-18% at 832-1600.
// Since the D64 forward's default is the two-items kernel (kernels_sm90.cuh: kFwdTwoItems), it is
// also 10% faster than the small tile at 448 (H200, forty-eighth session, ab_env.py, 80 rounds), so
// no sm_90 case takes a small variant; the mma.sync family keeps the small tiles (not measured).
double small_tile_max_tokens(Op, int, int arch) {
  return arch != 90 ? std::numeric_limits<double>::infinity() : 0.0;
}

// Average secondary tokens a primary row (of `rows` in all slices) walks: nnz blocks x secondary block
// x the GQA group a dK/dV column covers.
double tokens_per_row(const at::Tensor& index, int64_t rows, int64_t sec_block, int64_t group) {
  return rows > 0 ? static_cast<double>(index.numel()) * sec_block * group / rows : 0.0;
}

// sec_block: the layout's secondary block size; sec_per_row: secondary tokens an average primary
// row walks (its active blocks x block size).
const KernelEntry& pick(Op op, const at::Tensor& q, int kD, int prim_block, int sec_block, double sec_per_row) {
  const int di = dtype_index(q);
  TORCH_CHECK(di >= 0, "dilated_sparse CUDA: q must be float16 or bfloat16, got ", q.scalar_type());
  const int hi = head_dim_index(kD);
  TORCH_CHECK(hi >= 0, "dilated_sparse CUDA: head dim ", q.size(3),
              " unsupported (multiple of 8, at most 256)");
  const KernelEntry* arr = registry().e[op][di][hi];
  if (arr[0].fn == nullptr) fail_not_compiled(di, kD);
  const bool sm90 = device_is_sm90();
  auto usable = [&](int v) { return arr[v].fn != nullptr && (arr[v].arch == 0 || sm90) && arr[v].ds == 0; };
  const int forced = forced_variant(op);
  if (forced >= 0 && usable(forced)) return arr[forced];
  int def = 0;
  for (int v = 0; v < kMaxVariants; ++v) {
    if (arr[v].arch == 90 && usable(v)) {
      def = v;
      break;
    }
  }
  if (prim_block >= arr[def].pm) {
    // A variant of the default's family and primary tile that `want` accepts, else the default.
    auto sibling = [&](auto want) -> const KernelEntry& {
      for (int v = 0; v < kMaxVariants; ++v) {
        if (usable(v) && arr[v].arch == arr[def].arch && arr[v].pm == arr[def].pm && want(arr[v])) return arr[v];
      }
      return arr[def];
    };
    if (sec_per_row <= (op == kOpFwd ? kShortRowTokensFwd : kShortRowTokens)) {
      return sibling([](const KernelEntry& e) { return e.short_rows != 0; });
    }
    // A wider step (D128 dQ: 128 keys, two ring stages instead of three) pays on long rows whose
    // blocks no step straddles (kWideRowTokens).
    if (sec_per_row > kWideRowTokens) {
      return sibling([&](const KernelEntry& e) { return e.wide != 0 && sec_block % e.sn == 0; });
    }
    return arr[def];
  }
  if (sec_per_row > small_tile_max_tokens(op, kD, arr[def].arch)) return arr[def];
  int best = def;
  for (int v = 0; v < kMaxVariants; ++v) {
    // Same kernel family as the default: on sm_90 a wgmma tile with a partly used primary tile
    // still beats the mma.sync small tiles (measured at block 64, D128 dQ: 0.90 vs 1.51 ms).
    if (!usable(v) || !arr[v].small || arr[v].pm > prim_block || arr[v].arch != arr[def].arch) continue;
    if (arr[best].pm > prim_block || arr[v].pm > arr[best].pm) best = v;
  }
  return arr[best];
}

// Whether (op, dtype di, head dim kD) has an sm_90a (wgmma) kernel that pick() may take.
bool has_sm90_kernel(Op op, int di, int kD) {
  const int hi = head_dim_index(kD);
  if (di < 0 || hi < 0) return false;
  const KernelEntry* arr = registry().e[op][di][hi];
  for (int v = 0; v < kMaxVariants; ++v) {
    if (arr[v].fn != nullptr && arr[v].arch == 90 && arr[v].ds == 0) return true;
  }
  return false;
}

// The specialised head dim whose kernels run `op` for head dim D: padded_head_dim(D), except on an
// sm_90 device where that head dim has no wgmma kernel and a larger one has (in a build without the
// D32 or D96 wgmma kernels: D <= 32 -> 64, 64 < D <= 96 -> 128): the wgmma kernel, its surplus
// columns zero-filled (the copies zero every column at or past D and the stores skip them, as for
// D = 40 or 120), beats the mma.sync kernel of the exact size (H200, thirty-second session: D96 at
// S16k 2.35-2.42x Flex forward and 1.55-1.88x fwd+bwd, against 1.07-1.17x and 0.71-0.80x;
// RESULTS.md). A full build has wgmma kernels for every specialised head dim.
// DILATED_SPARSE_SM90_PAD=0 keeps padded_head_dim(D) (comparisons, tests); a forced variant
// (DILATED_SPARSE_{FWD,DQ,DKV}_VARIANT) that the exact head dim has also keeps it.
int kernel_head_dim(Op op, const at::Tensor& q, int64_t D) {
  const int kD = padded_head_dim(D);
  if (kD == 0 || !device_is_sm90() || !env_switch("DILATED_SPARSE_SM90_PAD", true)) return kD;
  const int di = dtype_index(q);
  if (has_sm90_kernel(op, di, kD)) return kD;
  const int forced = forced_variant(op);
  if (forced >= 0 && di >= 0 && registry().e[op][di][head_dim_index(kD)][forced].fn != nullptr) return kD;
  for (const int wider : kHeadDims) {
    if (wider > kD && has_sm90_kernel(op, di, wider)) return wider;
  }
  return kD;
}

// Bytes the dS-scratch backward may allocate: DILATED_SPARSE_BWD_SCRATCH_MB (MiB; 0 turns it off),
// default 1024 MiB (every block-128 S16k point of the benchmark matrix at D128 fits; S64k does not).
int64_t scratch_limit_bytes() {
  return env_count("DILATED_SPARSE_BWD_SCRATCH_MB", 1024, int64_t{1} << 30) << 20;
}

// Whether the dS-scratch backward runs its repeats in chunks (bwd_cuda):
// DILATED_SPARSE_BWD_SCRATCH_CHUNKS=auto (default: where chunks_pay says so), 1 (whenever a chunk
// fits: two buffers on two streams where two fit, else one), 0 (never: the whole scratch or the
// recompute backward).
int scratch_chunks_mode() {
  const char* e = std::getenv("DILATED_SPARSE_BWD_SCRATCH_CHUNKS");
  if (e == nullptr || *e == '\0' || std::string(e) == "auto") return -1;
  TORCH_CHECK(std::string(e) == "0" || std::string(e) == "1",
              "dilated_sparse: DILATED_SPARSE_BWD_SCRATCH_CHUNKS must be auto, 0 or 1, got '", e, "'");
  return std::atoi(e);
}

// Whether the scratch backward in chunks (dK/dV then dQ per chunk of nk dK/dV repeats) pays, from
// the two plans' entries per tile. Each launch ends in a tail (its last items), so a chunk must
// hold, per SM, at least kMinChunkSteps dK/dV steps and the longest item of either kernel (a
// global row or column would otherwise run alone at the end of every chunk). Measured (twentieth
// session, H200, S16k / S64k D128 H16, one buffer, benchmarks/RESULTS.md): chunks of ~350-400
// steps an SM were 1-7% faster than the recompute backward at S64k and ~100 steps about even at
// S16k; 23 steps lost 9%, and a global column longer than a chunk's steps an SM made S64k
// global_local 3x slower.
constexpr int kMinChunkSteps = 128;
bool chunks_pay(const PlanBufs& dq_plan, const PlanBufs& dkv_plan, int nk, int q_per_k) {
  const double sms = sm_count();
  const double dkv_steps = static_cast<double>(dkv_plan.len_total) * nk / sms;
  const double dq_steps = static_cast<double>(dq_plan.len_total) * nk * q_per_k / sms;
  return dkv_steps >= std::max<double>(kMinChunkSteps, dkv_plan.len_max) && dq_steps >= dq_plan.len_max;
}

// The kernel of the dS-scratch backward registered for `op` (a dK/dV that writes dS, a dQ that reads
// it): the forced variant if that is one, else the first; or null. A forced variant that pick() would
// run (compiled, usable here) and that is not a scratch one asks for the recompute backward, so it
// turns the scratch off (null); a forced variant not compiled for this head dim is ignored, as in pick().
const KernelEntry* ds_entry(Op op, const at::Tensor& q, int kD) {
  const int di = dtype_index(q), hi = head_dim_index(kD);
  if (di < 0 || hi < 0 || !device_is_sm90()) return nullptr;
  const KernelEntry* arr = registry().e[op][di][hi];
  const int forced = forced_variant(op);
  if (forced >= 0 && arr[forced].fn != nullptr) return arr[forced].ds != 0 ? &arr[forced] : nullptr;
  for (int v = 0; v < kMaxVariants; ++v) {
    if (arr[v].fn != nullptr && arr[v].ds != 0) return &arr[v];
  }
  return nullptr;
}

// What the CUDA kernels add to the shared checks (detail::check_*_args, which run first): CUDA
// tensors, the dtypes the kernels take (float32 too for the weights), head dims they tile,
// power-of-two blocks.
void check_cuda_limits(const at::Tensor& q, const at::Tensor& k, int64_t block_q, int64_t block_k,
                       bool weights = false) {
  TORCH_CHECK(q.is_cuda(), "dilated_sparse CUDA: tensors must be on CUDA");
  const at::ScalarType t = q.scalar_type();
  TORCH_CHECK(t == at::kHalf || t == at::kBFloat16 || (weights && t == at::kFloat), "dilated_sparse CUDA: q must be ",
              weights ? "float16, bfloat16 or float32" : "float16 or bfloat16", ", got ", t);
  TORCH_CHECK(q.size(3) % 8 == 0 && q.size(3) <= 256 && q.size(3) > 0,
              "dilated_sparse CUDA: head dim must be a multiple of 8 up to 256");
  auto pow2 = [](int64_t x) { return x >= 16 && x <= 256 && (x & (x - 1)) == 0; };
  TORCH_CHECK(pow2(block_q) && pow2(block_k), "dilated_sparse: block sizes must be 16, 32, 64, 128 or 256");
  for (int d = 0; d < 3; ++d) {  // the kernels' Params hold them as int (offsets are 64-bit)
    TORCH_CHECK(q.size(d) <= INT32_MAX && k.size(d) <= INT32_MAX, "dilated_sparse CUDA: B, Sq, Sk, H and Hkv must ",
                "each be below 2^31, got q ", q.sizes(), ", k ", k.sizes());
  }
}

Params base_params(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t block_q,
                   int64_t block_k, int64_t lb, int64_t lh, double scale, bool causal, int64_t wl,
                   int64_t wr, const at::Tensor& klen, const at::Tensor& kpm) {
  Params p;
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.q_sb = q.stride(0); p.q_ss = q.stride(1); p.q_sh = q.stride(2);
  p.k_sb = k.stride(0); p.k_ss = k.stride(1); p.k_sh = k.stride(2);
  p.v_sb = v.stride(0); p.v_ss = v.stride(1); p.v_sh = v.stride(2);
  p.B = static_cast<int>(q.size(0));
  p.Sq = static_cast<int>(q.size(1));
  p.H = static_cast<int>(q.size(2));
  p.D = static_cast<int>(q.size(3));
  p.Sk = static_cast<int>(k.size(1));
  p.Hkv = static_cast<int>(k.size(2));
  p.G = p.H / p.Hkv;
  p.bq = static_cast<int>(block_q);
  p.bk = static_cast<int>(block_k);
  p.Lb = static_cast<int>(lb);
  p.Lh = static_cast<int>(lh);
  p.nqb = static_cast<int>((q.size(1) + block_q - 1) / block_q);
  p.nkb = static_cast<int>((k.size(1) + block_k - 1) / block_k);
  p.scale = static_cast<float>(scale);
  p.scale_log2 = static_cast<float>(scale * 1.4426950408889634);
  p.causal = causal ? 1 : 0;
  // Windows beyond the sequence are unbounded; clamp to keep the int arithmetic in range.
  const int64_t big = std::max<int64_t>(q.size(1), k.size(1)) + 1;
  p.wl = wl < 0 ? -1 : static_cast<int>(std::min<int64_t>(wl, big));
  p.wr = wr < 0 ? -1 : static_cast<int>(std::min<int64_t>(wr, big));
  p.key_lengths = klen.defined() ? klen.data_ptr<int>() : nullptr;
  p.kpm = kpm.defined() ? kpm.data_ptr<bool>() : nullptr;
  return p;
}

// The driver's tensor-map encoder, looked up once through the runtime (no link against libcuda);
// null where the driver lacks it.
PFN_cuTensorMapEncodeTiled_v12000 tensor_map_encoder() {
  static const PFN_cuTensorMapEncodeTiled_v12000 fn = [] {
    void* f = nullptr;
    cudaDriverEntryPointQueryResult found{};
#if CUDART_VERSION >= 12050
    const cudaError_t err = cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &f, 12000, cudaEnableDefault,
                                                             &found);
#else  // toolkits before 12.5 lack the versioned lookup
    const cudaError_t err = cudaGetDriverEntryPoint("cuTensorMapEncodeTiled", &f, cudaEnableDefault, &found);
#endif
    if (err != cudaSuccess || found != cudaDriverEntryPointSuccess) {
      (void)cudaGetLastError();
      f = nullptr;
    }
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(f);
  }();
  return fn;
}

// A TMA descriptor of t ([B, S, H, D] as prep() leaves it: 16-byte aligned, strides multiples of 8
// elements) over (D, S, H, B), boxes of 64 columns x `rows` rows, 128-byte swizzle (the SW128
// tiles of kernels_sm90.cuh); elements outside t read as zeros. False if the driver refuses it.
bool encode_tma(CUtensorMap* map, const at::Tensor& t, int rows) {
  const auto encode = tensor_map_encoder();
  if (encode == nullptr) return false;
  const cuuint64_t dims[4] = {static_cast<cuuint64_t>(t.size(3)), static_cast<cuuint64_t>(t.size(1)),
                              static_cast<cuuint64_t>(t.size(2)), static_cast<cuuint64_t>(t.size(0))};
  // Byte strides of S, H, B; a dimension of extent 1 is never stepped, so any legal stride does.
  cuuint64_t strides[3];
  const int64_t dim_of[3] = {1, 2, 0};
  for (int i = 0; i < 3; ++i) {
    const int64_t d = dim_of[i];
    strides[i] = static_cast<cuuint64_t>(t.size(d) > 1 ? t.stride(d) : 8) * t.element_size();
  }
  const cuuint32_t box[4] = {64, static_cast<cuuint32_t>(rows), 1, 1};
  const cuuint32_t elem_strides[4] = {1, 1, 1, 1};
  const CUtensorMapDataType type =
      t.scalar_type() == at::kHalf ? CU_TENSOR_MAP_DATA_TYPE_FLOAT16 : CU_TENSOR_MAP_DATA_TYPE_BFLOAT16;
  return encode(map, type, 4, t.data_ptr(), dims, strides, box, elem_strides, CU_TENSOR_MAP_INTERLEAVE_NONE,
                CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_128B,
                CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS;
}

// Fills p.tma_{q,k,v} (and tma_do when dout is given, tma_o with `out_rows`-row boxes when out is) for
// an sm_90 kernel whose Q (and dO) tiles have `q_rows` rows and K/V tiles `kv_rows`, and sets p.tma
// when every map encodes; the kernel copies with cp.async otherwise (same tiles, same results) and
// stores its output from registers. DILATED_SPARSE_TMA=0 never uses TMA, =1 requires it (an error
// if a map does not encode; tests). The maps hold the pointers, so they are made per call (a
// host-side encode, no launch).
void set_tma(Params& p, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& dout,
             int q_rows, int kv_rows, const at::Tensor& out = at::Tensor(), int out_rows = 64) {
  p.tma = 0;
  const char* e = std::getenv("DILATED_SPARSE_TMA");
  // Set: 0 copies with cp.async, 1 requires TMA; unset: TMA where the driver encodes the descriptors.
  const bool required = e != nullptr && *e != '\0';
  if (required && !env_switch("DILATED_SPARSE_TMA", true)) return;
  const bool ok = encode_tma(&p.tma_q, q, q_rows) && encode_tma(&p.tma_k, k, kv_rows) &&
                  encode_tma(&p.tma_v, v, kv_rows) && (!dout.defined() || encode_tma(&p.tma_do, dout, q_rows)) &&
                  (!out.defined() || encode_tma(&p.tma_o, out, out_rows));
  TORCH_CHECK(ok || !required, "dilated_sparse CUDA: DILATED_SPARSE_TMA=1 but the driver did not encode a TMA "
              "descriptor for q, k, v, dout or out (shape ", q.sizes(), ", strides ", q.strides(), ")");
  p.tma = ok ? 1 : 0;
  p.split_producer = env_switch("DILATED_SPARSE_SPLIT_PRODUCER", true) && p.tma;  // checked even without TMA
  p.decode_ahead = env_switch("DILATED_SPARSE_DECODE_AHEAD", true) ? 1 : 0;
  p.post_lookup = env_switch("DILATED_SPARSE_POST_LOOKUP", true) ? 1 : 0;
  p.lean_producer = env_switch("DILATED_SPARSE_LEAN_PRODUCER", true) ? 1 : 0;
}

// log2 of the work items a persistent kernel's claim takes (Params::chunk_shift): two where the
// layout's rows (columns for dK/dV) average at most kChunkMaxTokens secondary tokens (three 128-token
// blocks), else one. A CTA then runs neighbouring rows back to back, and the second row's key tiles
// are mostly ones it has just loaded (the trace in RESULTS.md: that row's tiles take ~12% fewer
// cycles). H200, twenty-ninth session (RESULTS.md), against main's build (ab_builds.py, do_bench
// medians over 4 processes): S16k D128 local 2.5% (three blocks a row) 0.975-0.989 forward, one block
// a row 0.978-0.990, D64 local 2.5% 0.978-0.988 forward and 0.990 fwd+bwd; call by call (ab_env.py,
// against chunks of one) 0.950-0.983 at one to three blocks, but 1.006-1.019 at four to seven and
// chunks of four or eight slower still at long rows (up to 1.18).
// DILATED_SPARSE_ITEM_CHUNK=1|2|4|8 forces it.
constexpr double kChunkMaxTokens = 3.0 * 128;
int item_chunk_shift(double tokens_per_row) {
  const char* e = std::getenv("DILATED_SPARSE_ITEM_CHUNK");
  if (e == nullptr) return tokens_per_row <= kChunkMaxTokens ? 1 : 0;
  const std::string value = e;
  for (int shift = 0; shift < 4; ++shift) {
    if (value == std::to_string(1 << shift)) return shift;
  }
  TORCH_CHECK(false, "dilated_sparse CUDA: DILATED_SPARSE_ITEM_CHUNK must be 1, 2, 4 or 8, got '", value, "'");
  return 0;
}

// Params::prefetch_at / prefetch_lines for a persistent kernel walking tile list tl (planned from
// ptr / idx into keep): the arrays its items' decode reads, in the order it reads them, and
// key_lengths. Each range is capped at 4 MiB (a plan that large is not read in one chain). Nothing
// with DILATED_SPARSE_PLAN_PREFETCH=0.
void set_plan_prefetch(Params& p, const TileList& tl, const at::Tensor& ptr, const at::Tensor& idx,
                       const PlanBufs& keep) {
  std::fill_n(p.prefetch_lines, Params::kPrefetchRanges, 0);
  if (!env_switch("DILATED_SPARSE_PLAN_PREFETCH", true)) return;
  int n = 0;
  auto add = [&](const void* at, int64_t bytes) {
    if (at == nullptr || bytes <= 0 || n == Params::kPrefetchRanges) return;
    const uintptr_t first = reinterpret_cast<uintptr_t>(at) & ~uintptr_t{127};
    const int64_t end = static_cast<int64_t>(reinterpret_cast<uintptr_t>(at) - first) + bytes;
    p.prefetch_at[n] = reinterpret_cast<const char*>(first);
    p.prefetch_lines[n] = static_cast<int>(std::min<int64_t>((end + 127) / 128, (int64_t{4} << 20) / 128));
    ++n;
  };
  // The tensors tl's pointers were taken from (build_tiles, make_split).
  auto add_tensor = [&](const at::Tensor& t) {
    if (t.defined() && t.numel() > 0) add(t.data_ptr(), t.numel() * t.element_size());
  };
  if (tl.work != nullptr) {
    add_tensor(keep.work);
  } else {
    add_tensor(keep.runs);
    add_tensor(keep.order);
  }
  if (tl.direct) {
    add_tensor(ptr);
    add_tensor(idx);
  } else {
    for (const at::Tensor* t : {&keep.start, &keep.len, &keep.tile, &keep.mask}) add_tensor(*t);
  }
  add(p.key_lengths, int64_t{p.B} * static_cast<int64_t>(sizeof(int)));
}

// `waiter` runs its later work after what `signaller` has queued so far (an event; capture-safe).
void stream_wait(cudaStream_t waiter, cudaStream_t signaller) {
  cudaEvent_t ev;
  C10_CUDA_CHECK(cudaEventCreateWithFlags(&ev, cudaEventDisableTiming));
  C10_CUDA_CHECK(cudaEventRecord(ev, signaller));
  C10_CUDA_CHECK(cudaStreamWaitEvent(waiter, ev, 0));
  C10_CUDA_CHECK(cudaEventDestroy(ev));  // released once the wait no longer needs it
}

// The forward's work counter and its count of CTAs done (Params::work_counter): one pair per (device,
// stream), zeroed once, that each forward's last CTA zeroes again (release_work_counter), so a
// forward launches no fill kernel before it (RESULTS.md, twenty-seventh session: the fill and its
// launch gap were ~2-5 us a call). Launches on one stream run in order, so they never share a
// pair at the same time. While `stream` is captured into a graph, a fresh pair (memory of the
// graph's pool: a graph may be replayed on any stream, beside eager calls) that the caller's plan
// kernel zeroes on every replay (PlanExtras::zero_pair; a fill node of its own cost ~1 us a replay).
// The pairs are never freed (8 bytes each, a few streams a process; no teardown-order question).
int* forward_work_counter(const at::Tensor& like, cudaStream_t stream, bool captured, at::Tensor& keep) {
  if (captured) {
    keep = at::empty({2}, like.options().dtype(at::kInt));
    return keep.data_ptr<int>();
  }
  static std::mutex mu;
  static auto* pairs = new std::map<std::pair<int, cudaStream_t>, at::Tensor>();
  std::lock_guard<std::mutex> lock(mu);
  at::Tensor& pair = (*pairs)[{static_cast<int>(like.get_device()), stream}];
  if (!pair.defined()) {  // kept, so made outside the caller's pools (build_for_cache); zeroed before the first use
    pair = build_for_cache(c10::cuda::getCurrentCUDAStream(),
                           [&](cudaStream_t) { return at::zeros({2}, like.options().dtype(at::kInt)); });
  }
  return pair.data_ptr<int>();
}

at::Tensor opt_contig(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->contiguous() : at::Tensor();
}

// ---------------------------------------------------------------------------------------------
// Ops
// ---------------------------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor> fwd_cuda(
    const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const at::Tensor& crow, const at::Tensor& col, int64_t block_q, int64_t block_k,
    int64_t layout_batch, int64_t layout_heads, double scale, bool causal, int64_t window_left,
    int64_t window_right, const std::optional<at::Tensor>& key_lengths,
    const std::optional<at::Tensor>& key_padding_mask) {
  const auto dims = dilated_sparse::detail::check_fwd_args(q_in, k_in, v_in, crow, col, block_q, block_k, layout_batch,
                                                           layout_heads, window_left, window_right, key_lengths,
                                                           key_padding_mask);
  check_cuda_limits(q_in, k_in, block_q, block_k);
  c10::cuda::CUDAGuard guard(q_in.device());
  auto stream = c10::cuda::getCurrentCUDAStream();
  // A captured forward checks its index values in its plan kernel (PlanExtras); an empty one plans
  // nothing, so it launches the check kernel.
  const bool captured = capturing(stream);
  if (!captured || q_in.numel() == 0) {
    check_index_values_cached(dims, crow, col, at::Tensor(), at::Tensor(), -1, stream, captured);
  }
  const at::Tensor q = prep(q_in), k = prep(k_in), v = prep(v_in);
  const int64_t B = q.size(0), Sq = q.size(1), H = q.size(2), D = q.size(3);
  auto out = at::empty({B, Sq, H, D}, q.options());
  auto lse = at::empty({B, H, Sq}, q.options().dtype(at::kFloat));
  if (out.numel() == 0) return {out, lse};
  const int kD = kernel_head_dim(kOpFwd, q, D);
  const at::Tensor klen = opt_contig(key_lengths), kpm = opt_contig(key_padding_mask);
  const at::Tensor crow_c = crow.contiguous(), col_c = col.contiguous();
  Params p = base_params(q, k, v, block_q, block_k, layout_batch, layout_heads, scale, causal,
                         window_left, window_right, klen, kpm);
  p.out = out.data_ptr();
  p.lse_out = lse.data_ptr<float>();
  const int L = p.Lb * p.Lh;
  const double key_tokens = tokens_per_row(col, int64_t{L} * p.nqb, p.bk, 1);
  const KernelEntry& kf = pick(kOpFwd, q, kD, p.bq, p.bk, key_tokens);
  const int rep = static_cast<int>(B * H / L);
  at::Tensor counter_keep;
  if (kf.arch == 90) p.work_counter = forward_work_counter(q, stream, captured, counter_keep);
  PlanExtras extras;
  if (captured) extras = {col_c.numel(), p.nkb, kf.arch == 90 ? p.work_counter : nullptr};
  PlanBufs keep;
  int split = split_setting();
  if (split == kSplitAuto && kf.arch != 90) split = kSplitAutoTwoCtas;
  p.tl = plan_tiles(crow_c, col_c, L, p.nqb, p.Sq, kf.pm, p.bq, kf.sn, p.bk, rep, p.H, keep, stream, captured, split,
                    nullptr, false, split_on_device_setting(), extras);
  at::Tensor opart, lpart;
  if (p.tl.work != nullptr) {
    opart = at::empty({keep.nslots * rep * kf.pm * D}, q.options().dtype(at::kFloat));
    lpart = at::empty({keep.nslots * rep * kf.pm}, q.options().dtype(at::kFloat));
    p.opart = opart.data_ptr<float>();
    p.lpart = lpart.data_ptr<float>();
  }
  const int64_t units = p.tl.work != nullptr ? keep.nwork : static_cast<int64_t>(L) * p.tl.ntiles;
  if (kf.arch == 90) {
    set_tma(p, q, k, v, at::Tensor(), kf.pm, kf.sn, kf.tma_out ? out : at::Tensor(), kf.tma_out);
    set_plan_prefetch(p, p.tl, crow_c, col_c, keep);
    p.chunk_shift = item_chunk_shift(key_tokens);
  }
  kf.fn(p, units * rep, stream);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (p.tl.work != nullptr && keep.nsplit > 0) {
    const auto* split = reinterpret_cast<const int4*>(keep.split.data_ptr<int>());
    const int* split_count = p.tl.work_count != nullptr ? p.tl.work_count + 1 : nullptr;  // planned on the device
    const int64_t merge_ctas = keep.nsplit * rep * ((kf.pm + kMergeRows - 1) / kMergeRows);
    TORCH_CHECK(merge_ctas <= INT32_MAX, "dilated_sparse CUDA: ", merge_ctas,
                " blocks to merge split rows exceed a launch; set DILATED_SPARSE_SPLIT=0");
    const unsigned grid = static_cast<unsigned>(merge_ctas);
    if (q.scalar_type() == at::kHalf) {
      merge_kernel<__half><<<grid, kMergeThreads, 0, stream>>>(p, split, split_count, kf.pm);
    } else {
      merge_kernel<__nv_bfloat16><<<grid, kMergeThreads, 0, stream>>>(p, split, split_count, kf.pm);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bwd_cuda(
    const at::Tensor& dout_in, const at::Tensor& q_in, const at::Tensor& k_in,
    const at::Tensor& v_in, const at::Tensor& out_in, const at::Tensor& lse_in,
    const at::Tensor& ccol, const at::Tensor& rowi, const at::Tensor& crow, const at::Tensor& col,
    int64_t block_q, int64_t block_k, int64_t layout_batch, int64_t layout_heads, double scale,
    bool causal, int64_t window_left, int64_t window_right,
    const std::optional<at::Tensor>& key_lengths,
    const std::optional<at::Tensor>& key_padding_mask, const std::optional<at::Tensor>& dlse_in) {
  const auto dims = dilated_sparse::detail::check_bwd_args(
      dout_in, q_in, k_in, v_in, out_in, lse_in, ccol, rowi, crow, col, block_q, block_k, layout_batch, layout_heads,
      window_left, window_right, key_lengths, key_padding_mask, dlse_in);
  check_cuda_limits(q_in, k_in, block_q, block_k);
  c10::cuda::CUDAGuard guard(q_in.device());
  auto stream = c10::cuda::getCurrentCUDAStream();
  const bool captured = capturing(stream);
  check_index_values_cached(dims, crow, col, ccol, rowi, -1, stream, captured);
  const at::Tensor q = prep(q_in), k = prep(k_in), v = prep(v_in);
  const at::Tensor dout = prep(dout_in), out = prep(out_in);
  const at::Tensor lse = lse_in.contiguous();
  const at::Tensor dlse = dlse_in.has_value() ? dlse_in->contiguous() : at::Tensor();
  const int64_t B = q.size(0), Sq = q.size(1), H = q.size(2), D = q.size(3);
  const int64_t Sk = k.size(1), Hkv = k.size(2);
  auto dq = at::empty({B, Sq, H, D}, q.options());
  auto dk = at::empty({B, Sk, Hkv, D}, q.options());
  auto dv = at::empty({B, Sk, Hkv, D}, q.options());
  if (B == 0 || H == 0) return {dq, dk, dv};
  if (Sq == 0 || Sk == 0) {
    dq.zero_();
    dk.zero_();
    dv.zero_();
    return {dq, dk, dv};
  }
  const int kD_dq = kernel_head_dim(kOpDq, q, D), kD_dkv = kernel_head_dim(kOpDkv, q, D);
  const at::Tensor klen = opt_contig(key_lengths), kpm = opt_contig(key_padding_mask);
  const at::Tensor crow_c = crow.contiguous(), col_c = col.contiguous();
  const at::Tensor ccol_c = ccol.contiguous(), rowi_c = rowi.contiguous();
  Params p = base_params(q, k, v, block_q, block_k, layout_batch, layout_heads, scale, causal,
                         window_left, window_right, klen, kpm);
  const int L = p.Lb * p.Lh;
  // The dS-scratch backward (sm_90 "ds" kernels: D128 and D96; a slot per block where blocks are
  // multiples of 128, else per 128 x 128 tile pair holding a block): dK/dV
  // writes each active block's dS (bq x bk in q's dtype, per (b, h) pair sharing the block), then
  // dQ = dS K reads it back instead of recomputing the scores and dP (5 products instead of 7).
  // Its scratch grows with nnz times the repeats (the (b, h) pairs sharing a layout slice), within
  // scratch_limit_bytes(). The repeats may run in chunks of dK/dV repeats, as equal as the count
  // allows, each chunk dK/dV then dQ. By default (scratch_chunks_mode), in this order of preference:
  //  - two buffers of a chunk each, the chunks alternating between two streams (a chunk's kernels
  //    fill the other's tails), where two chunks fit and chunks of that size pay (chunks_pay);
  //    this also splits a scratch that would fit whole (1-5% faster, twentieth session);
  //  - the whole scratch, where it fits;
  //  - one buffer, the chunks one after the other, where one chunk fits and chunks pay;
  //  - else (or where the allocation fails) the recompute backward.
  // Every way gives the same dq, dk, dv (the same products, summed in the same order).
  const int rep_q = static_cast<int>(B * H / L);  // the (b, h) pairs sharing a layout slice
  // dK/dV items: (b, kv head) pairs with a shared layout, else batches (per-head layouts: each
  // query head's slice is walked on its own, its group's dK/dV summed by the kernel's G loop).
  const int rep_k = p.Lh == 1 ? static_cast<int>((p.Lb == 1 ? B : 1) * Hkv) : static_cast<int>(p.Lb == 1 ? B : 1);
  const int q_per_k = rep_q / rep_k;  // query repeats a dK/dV repeat covers (G with a shared layout)
  const int hdec = p.Lh == 1 ? p.Hkv : p.H;
  // dQ and dK/dV are independent once Delta is written: dK/dV runs on a side stream, so its CTAs
  // take the SMs that dQ's last items leave idle (and the other way round) instead of each kernel
  // ending in its own tail. Every output still has one writer (deterministic). The side stream
  // joins back before anything else on `stream` runs, so the tensors used there (all allocated on
  // `stream`) are not reused early. DILATED_SPARSE_BWD_STREAMS=1 runs both on `stream`.
  const bool one_stream = env_count("DILATED_SPARSE_BWD_STREAMS", 2, 2, 1) == 1;  // every call
  const KernelEntry *ds_dq = ds_entry(kOpDq, q, kD_dq), *ds_dkv = ds_entry(kOpDkv, q, kD_dkv);
  const int64_t limit = scratch_limit_bytes();  // read on every call, so that a bad value always raises
  at::Tensor ds;
  int chunk_k = 0;   // dK/dV repeats a chunk of the scratch backward
  int ds_bufs = 1;   // 2: chunks alternate between two streams and two scratch buffers
  // Slots of the scratch: a layout block each where blocks are multiples of the kernels' tiles, else
  // (blocks of at most a tile, ds_tile_slots) one per tile pair of the dQ plan, 128 x 128, which
  // needs that plan's entry count on the host (one copy per layout; not while capturing a graph).
  const bool ds_kernels = ds_dq != nullptr && ds_dkv != nullptr && col.numel() > 0;
  const bool block_slots = ds_kernels && p.bq % ds_dq->pm == 0 && p.bk % ds_dq->sn == 0 &&
                           p.bk % ds_dkv->pm == 0 && p.bq % ds_dkv->sn == 0;
  const bool tiles_allowed = ds_tile_slots_setting();  // every call, so that a bad value always raises
  // Only where the slot count is worth a host copy: a cached plan (the copy once per layout), and a
  // scratch that could fit (at least nnz bq bk / 128^2 slots of one repeat within the limit).
  const bool tile_slots = ds_kernels && !block_slots && tiles_allowed && p.bq <= ds_dq->pm &&
                          p.bk <= ds_dq->sn && ds_dkv->pm == ds_dq->sn && 2 * ds_dkv->sn == ds_dq->pm &&
                          !captured && plans_cached(crow_c, col_c) &&
                          (col.numel() * p.bq * p.bk + ds_dq->pm * ds_dq->sn - 1) / (ds_dq->pm * ds_dq->sn) *
                                  q_per_k * ds_dq->pm * ds_dq->sn * q.element_size() <= limit;
  // The dQ-from-dS plan with its lengths on the host (cached), for tile slots' count and chunks_pay.
  PlanBufs dq_plan;
  auto dq_plan_stats = [&]() {
    if (dq_plan.len_max < 0) {
      plan_tiles(crow_c, col_c, L, p.nqb, p.Sq, ds_dq->pm, p.bq, ds_dq->sn, p.bk, rep_q, p.H, dq_plan, stream,
                 captured, kSplitNever, nullptr, /*want_len_stats=*/true);
    }
  };
  if (tile_slots) dq_plan_stats();
  if ((block_slots || (tile_slots && dq_plan.len_total > 0))) {
    const int64_t slots = block_slots ? col.numel() : dq_plan.len_total;
    const int64_t slot_elems = block_slots ? int64_t{p.bq} * p.bk : int64_t{ds_dq->pm} * ds_dq->sn;
    const int64_t rep_elems = slots * q_per_k * slot_elems;  // one dK/dV repeat's dS
    const int64_t rep_bytes = rep_elems * q.element_size();
    // Chunks as equal as the count allows, of at most `fit` repeats.
    auto balanced = [&](int64_t fit) {
      const int64_t n = (rep_k + fit - 1) / fit;
      return static_cast<int>((rep_k + n - 1) / n);
    };
    const int64_t fit1 = std::min<int64_t>(rep_k, limit / rep_bytes);
    const int64_t fit2 = std::min<int64_t>((rep_k + 1) / 2, limit / (2 * rep_bytes));
    const bool two_ok = !one_stream && rep_k >= 2 && fit2 > 0;  // two chunks' buffers fit
    const int mode = scratch_chunks_mode();
    if (mode == 0) {
      chunk_k = fit1 == rep_k ? rep_k : 0;
    } else if (mode == 1) {
      if (two_ok) {
        chunk_k = balanced(fit2);
        ds_bufs = 2;
      } else {
        chunk_k = fit1 > 0 ? balanced(fit1) : 0;
      }
    } else if (fit1 == rep_k && !two_ok) {
      chunk_k = rep_k;  // auto, nothing to weigh: the whole scratch (no host copy of the lengths)
    } else if (fit1 > 0) {  // auto: the plans the scratch kernels will walk (cached), their lengths
      PlanBufs dkv_plan;
      dq_plan_stats();
      plan_tiles(ccol_c, rowi_c, L, p.nkb, p.Sk, ds_dkv->pm, p.bk, ds_dkv->sn, p.bq, rep_k, hdec, dkv_plan,
                 stream, captured, kSplitNever, nullptr, /*want_len_stats=*/true);
      const bool stats = dq_plan.len_max >= 0 && dkv_plan.len_max >= 0;  // not while capturing a graph
      if (stats && two_ok && chunks_pay(dq_plan, dkv_plan, balanced(fit2), q_per_k)) {
        chunk_k = balanced(fit2);
        ds_bufs = 2;
      } else if (fit1 == rep_k) {
        chunk_k = rep_k;
      } else if (stats && chunks_pay(dq_plan, dkv_plan, balanced(fit1), q_per_k)) {
        chunk_k = balanced(fit1);
      }
    }
    if (chunk_k > 0) {
      try {
        ds = at::empty({ds_bufs * chunk_k * rep_elems}, q.options());
      } catch (const c10::OutOfMemoryError&) {
        ds = at::Tensor();  // the recompute backward needs no scratch
      }
    }
  }
  const bool ds_mode = ds.defined();
  const double key_tokens = tokens_per_row(col, int64_t{L} * p.nqb, p.bk, 1);
  const double query_tokens = tokens_per_row(rowi, int64_t{L} * p.nkb, p.bq, p.G);
  const KernelEntry& kdq = ds_mode ? *ds_dq : pick(kOpDq, q, kD_dq, p.bq, p.bk, key_tokens);
  const KernelEntry& kdkv = ds_mode ? *ds_dkv : pick(kOpDkv, q, kD_dkv, p.bk, p.bq, query_tokens);
  p.o = out.data_ptr();
  p.dout = dout.data_ptr();
  p.o_sb = out.stride(0); p.o_ss = out.stride(1); p.o_sh = out.stride(2);
  p.do_sb = dout.stride(0); p.do_ss = dout.stride(1); p.do_sh = dout.stride(2);
  p.lse = lse.data_ptr<float>();
  p.dlse = dlse.defined() ? dlse.data_ptr<float>() : nullptr;
  auto delta = at::empty({B, H, Sq}, q.options().dtype(at::kFloat));
  auto lse_log2 = at::empty({B, H, Sq}, q.options().dtype(at::kFloat));
  p.delta = delta.data_ptr<float>();
  p.lse_log2 = lse_log2.data_ptr<float>();
  p.dq = dq.data_ptr();
  p.dk = dk.data_ptr();
  p.dv = dv.data_ptr();
  // The persistent kernels' work counters, zeroed by the Delta kernel (it runs before them on
  // `stream`; the side stream waits for it below).
  const int chunks = ds_mode ? (rep_k + chunk_k - 1) / chunk_k : 1;
  const int n_counters = ((kdq.arch == 90) + (kdkv.arch == 90)) * chunks;
  const at::Tensor counters = n_counters > 0 ? at::empty({n_counters}, q.options().dtype(at::kInt)) : at::Tensor();
  int* next_counter = counters.defined() ? counters.data_ptr<int>() : nullptr;
  if (q.scalar_type() == at::kHalf) {
    launch_delta<__half>(p, next_counter, n_counters, stream);
  } else {
    launch_delta<__nv_bfloat16>(p, next_counter, n_counters, stream);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  PlanBufs keep_q, keep_k;
  Params pq = p, pk = p;
  pq.tl = plan_tiles(crow_c, col_c, L, p.nqb, p.Sq, kdq.pm, p.bq, kdq.sn, p.bk, rep_q, p.H, keep_q, stream, captured);
  if (kdq.arch == 90) {
    pq.work_counter = next_counter++;
    set_plan_prefetch(pq, pq.tl, crow_c, col_c, keep_q);
    pq.chunk_shift = ds_mode ? 0 : item_chunk_shift(key_tokens);  // the dQ-from-dS kernel claims singly
  }
  // The dS scratch's slots, kept with the dK/dV plan: block slots, the CSC -> CSR entry map
  // (csc_to_csr_kernel); tile slots, each dQ slice-tile's first slot (the dQ plan's entries before it)
  // and each dK/dV entry's tile pair (ds_tile_slots_kernel).
  DsSlotMap slot_map{tile_slots, pq.tl.ntiles, [&](PlanBufs& bufs, const TileList& dkv, cudaStream_t s) {
    bufs.ds_slot_start = at::Tensor();
    if (!tile_slots) {
      bufs.csr_entry = at::empty({std::max<int64_t>(1, rowi.numel())}, q.options().dtype(at::kInt));
      if (rowi.numel() > 0) {
        csc_to_csr_kernel<<<static_cast<unsigned>((rowi.numel() + 255) / 256), 256, 0, s>>>(
            ccol_c.data_ptr<int>(), rowi_c.data_ptr<int>(), crow_c.data_ptr<int>(), col_c.data_ptr<int>(),
            L * p.nkb, p.nkb, p.nqb, rowi.numel(), bufs.csr_entry.data_ptr<int>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
      return;
    }
    const at::Tensor len64 = keep_q.len.to(at::kLong);
    bufs.ds_slot_start = at::cumsum(len64, 0) - len64;
    bufs.csr_entry = at::empty({std::max<int64_t>(1, rowi.numel() * dkv.fsplit * dkv.kf)}, q.options().dtype(at::kInt));
    const int64_t nst = int64_t{L} * dkv.ntiles;
    ds_tile_slots_kernel<<<static_cast<unsigned>((nst + 127) / 128), 128, 0, s>>>(
        dkv, pq.tl, L, bufs.ds_slot_start.data_ptr<int64_t>(), ds_dq->pm / ds_dkv->sn, bufs.csr_entry.data_ptr<int>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }};
  pk.tl = plan_tiles(ccol_c, rowi_c, L, p.nkb, p.Sk, kdkv.pm, p.bk, kdkv.sn, p.bq, rep_k, hdec, keep_k, stream,
                     captured, kSplitNever, ds_mode ? &slot_map : nullptr);
  if (kdkv.arch == 90) {
    pk.work_counter = next_counter++;
    set_plan_prefetch(pk, pk.tl, ccol_c, rowi_c, keep_k);
    pk.chunk_shift = item_chunk_shift(query_tokens);
  }
  if (ds_mode) {  // a slot per dQ-plan tile pair (128 x 128), else per layout block (bq x bk)
    pk.ds_csr_entry = keep_k.csr_entry.data_ptr<int>();
    if (tile_slots) pq.ds_slot_start = pk.ds_slot_start = keep_k.ds_slot_start.data_ptr<int64_t>();
    pq.ds_slot_q = pk.ds_slot_q = tile_slots ? ds_dq->pm : p.bq;
    pq.ds_slot_elems = pk.ds_slot_elems = int64_t{pk.ds_slot_q} * (tile_slots ? ds_dq->sn : p.bk);
  }
  // The scratch backward runs dK/dV, then dQ on one stream (dQ reads what dK/dV wrote); with two
  // buffers, odd chunks on the side stream: a chunk's kernels fill the other chunk's tails, and
  // chunk c reuses the buffer of chunk c - 2, which ran before it on the same stream.
  const bool side_stream = ds_mode ? ds_bufs == 2 : !one_stream;
  cudaStream_t dkv_stream = stream;
  if (side_stream) {
    dkv_stream = c10::cuda::getStreamFromPool(/*isHighPriority=*/false, q.get_device()).stream();
    stream_wait(dkv_stream, stream);
  }
  // dQ tiles: pm query rows, sn keys a step; dK/dV tiles: pm keys, sn queries a step.
  // (The dQ-from-dS kernel reads only the K map; its dS panels are plain bulk copies.)
  if (kdq.arch == 90) set_tma(pq, q, k, v, dout, kdq.pm, kdq.sn);
  if (kdkv.arch == 90) set_tma(pk, q, k, v, dout, kdkv.sn, kdkv.pm);
  if (ds_mode) {
    for (int rk0 = 0, c = 0; rk0 < rep_k; rk0 += chunk_k, ++c) {
      const int nk = std::min(chunk_k, rep_k - rk0);
      Params ck = pk, cq = pq;
      ck.ds = cq.ds = static_cast<char*>(ds.data_ptr()) + (c % ds_bufs) * (ds.nbytes() / ds_bufs);
      cudaStream_t cs = c % 2 == 1 && ds_bufs == 2 ? dkv_stream : stream;
      ck.tl.rep = nk;
      ck.tl.rep_base = rk0;
      cq.tl.rep = ck.ds_rep = cq.ds_rep = nk * q_per_k;
      cq.tl.rep_base = ck.ds_rep_base = cq.ds_rep_base = rk0 * q_per_k;
      if (rk0 > 0) {  // each launch takes its items from a fresh counter
        ck.work_counter = next_counter++;
        cq.work_counter = next_counter++;
      }
      kdkv.fn(ck, static_cast<int64_t>(L) * ck.tl.ntiles * nk, cs);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      kdq.fn(cq, static_cast<int64_t>(L) * cq.tl.ntiles * cq.tl.rep, cs);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    if (side_stream) stream_wait(stream, dkv_stream);
    return {dq, dk, dv};
  }
  kdkv.fn(pk, static_cast<int64_t>(L) * pk.tl.ntiles * rep_k, dkv_stream);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  kdq.fn(pq, static_cast<int64_t>(L) * pq.tl.ntiles * rep_q, stream);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (side_stream) stream_wait(stream, dkv_stream);
  return {dq, dk, dv};
}

at::Tensor weights_cuda(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& lse_in,
                        const at::Tensor& crow, const at::Tensor& col, int64_t block_q,
                        int64_t block_k, int64_t layout_batch, int64_t layout_heads,
                        int64_t max_slice_nnz, double scale, bool causal, int64_t window_left,
                        int64_t window_right, const std::optional<at::Tensor>& key_lengths,
                        const std::optional<at::Tensor>& key_padding_mask) {
  const auto dims = dilated_sparse::detail::check_weights_args(
      q_in, k_in, lse_in, crow, col, block_q, block_k, layout_batch, layout_heads, max_slice_nnz, window_left,
      window_right, key_lengths, key_padding_mask);
  check_cuda_limits(q_in, k_in, block_q, block_k, /*weights=*/true);
  c10::cuda::CUDAGuard guard(q_in.device());
  auto stream = c10::cuda::getCurrentCUDAStream();
  check_index_values_cached(dims, crow, col, at::Tensor(), at::Tensor(), max_slice_nnz, stream, capturing(stream));
  const at::Tensor q = q_in.stride(-1) == 1 ? q_in : q_in.contiguous();
  const at::Tensor k = k_in.stride(-1) == 1 ? k_in : k_in.contiguous();
  const at::Tensor lse = lse_in.contiguous();
  const int64_t B = q.size(0), H = q.size(2);
  auto w = at::empty({B, H, max_slice_nnz, block_q, block_k}, q.options());
  if (w.numel() == 0) return w;
  const at::Tensor klen = opt_contig(key_lengths), kpm = opt_contig(key_padding_mask);
  const at::Tensor crow_c = crow.contiguous(), col_c = col.contiguous();
  Params p = base_params(q, k, k, block_q, block_k, layout_batch, layout_heads, scale, causal,
                         window_left, window_right, klen, kpm);
  p.lse = lse.data_ptr<float>();
  const int* colp = col_c.numel() > 0 ? col_c.data_ptr<int>() : nullptr;
  constexpr int64_t kMaxGridY = 65535;  // (b, h) pairs a launch (gridDim.y)
  auto launch = [&](auto tag) {
    using T = decltype(tag);
    for (int64_t bh0 = 0; bh0 < B * H; bh0 += kMaxGridY) {
      const dim3 grid(static_cast<unsigned>(max_slice_nnz), static_cast<unsigned>(std::min(kMaxGridY, B * H - bh0)));
      weights_kernel<T><<<grid, 256, 0, stream>>>(p, crow_c.data_ptr<int>(), colp, reinterpret_cast<T*>(w.data_ptr()),
                                                  max_slice_nnz, static_cast<int>(bh0));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  };
  if (q.scalar_type() == at::kHalf) {
    launch(__half());
  } else if (q.scalar_type() == at::kBFloat16) {
    launch(__nv_bfloat16());
  } else {
    launch(float());
  }
  return w;
}

}  // namespace

}  // namespace dilated_sparse::cuda

namespace dilated_sparse {

// Head dims with a compiled forward kernel (either dtype); overrides the weak default of ops.cpp.
std::vector<int64_t> cuda_head_dims() {
  std::vector<int64_t> dims;
  for (int i = 0; i < cuda::kNumHeadDims; ++i) {
    if (cuda::registry().e[cuda::kOpFwd][0][i][0].fn != nullptr ||
        cuda::registry().e[cuda::kOpFwd][1][i][0].fn != nullptr) {
      dims.push_back(cuda::kHeadDims[i]);
    }
  }
  return dims;
}

}  // namespace dilated_sparse

TORCH_LIBRARY_IMPL(dilated_sparse, CUDA, m) {
  m.impl("block_sparse_attn_fwd", &dilated_sparse::cuda::fwd_cuda);
  m.impl("block_sparse_attn_bwd", &dilated_sparse::cuda::bwd_cuda);
  m.impl("block_sparse_attn_weights", &dilated_sparse::cuda::weights_cuda);
}
