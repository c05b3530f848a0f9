// "split" path of sparse_topk_select: few long rows (decode at 128K-1M context), one plain launch, no cluster,
// no CTA barrier after staging, no grid barrier (CUDA only).
//
// Why: the cluster path (topk_cluster_core.cuh) spends ~4.7 us of its 1M H4 decode time after the last load
// landed in two cluster barriers that wait for the slowest CTA of the cluster, a DSMEM round trip and a
// remote-atomic round trip, and its cluster launch costs ~1 us more than a plain one. Here the S slices of a row
// meet in global memory instead, and only the slice that arrives last waits, for lists that are already written.
//
// Grid (S, ceil(q / G), H); CTA = W >= G warps, G tokens of one head, slice s = blockIdx.x of L blocks:
//  1. staging (all threads): the union of the G rows' eligible ranges inside the slice is copied to shared memory
//     (NaN and ineligible -> -inf). vec > 0: 16-byte loads (4 fp32 / 8 bf16 tokens of one k-row), `vec` loads in
//     flight per thread, each thread stores its tokens' values transposed; vec == 0: the row path's scalar
//     stage_span (16 loads in flight). One CTA barrier: the last one in the kernel.
//  2. warp g (row t = t0 + g): lane 0 takes an arrival ticket for the row, atomicInc(arrivals[row], S - 1): the
//     old value says whether this slice is the row's last to arrive, and the counter wraps back to 0 after the S
//     arrivals (0 again for the next launch: no memset, CUDA-graph safe). Its result is only read after step 3.
//  3. the slice's exact top M, sorted best first, in a shared list of 32 R entries (R = 1 for M <= 32, 2 for
//     M <= 64; zero = empty): the row path's bound (the r-th largest of the 32 lane groups' maxima, or second
//     largest for M > 32, lower-bounds the slice's M-th best), candidate scan, rank by counting; > cap
//     candidates (heavy ties) -> M rounds of warp argmax below the previous pick (exact).
//  4. not last: the M entries go to lists[row][s][0..M) in global memory (relaxed 8-byte stores) and the warp
//     is done. Last: lane i loads entry i of every other slice's list (relaxed gpu-scope loads; an entry still
//     equal to kSplitEmpty is not written yet -> reloaded until it is), resets those entries to kSplitEmpty for
//     the next launch, and merges the S lists with a tree of bitonic merges (leaf s is read descending for even
//     s and ascending for odd s; max(desc, asc) elementwise = the top 32 R of the pair as a bitonic sequence,
//     then half-cleaner steps; node j of a level comes out descending for even j) -> the row's top M,
//     written in index order with the forced head / tail and the -1 tail.
// Waiting is deadlock-free without co-residency guarantees: the last arrival waits only for slices that have
// already taken their ticket (so they are running), and those never wait for anything after their ticket.
// An entry is its own "ready" flag (8-byte stores are single-copy atomic; kSplitEmpty is never a real
// composite: that would be score_key == 0xFFFFFFFF, i.e. a NaN, and NaN never becomes a candidate), so no fence
// is needed on either side. Exact: the row's top M lies in the union of the slices' top M.
// M = 0 (everything forced): no tickets, slice 0 writes the forced rows.
// Workspace (kernels/topk.py keeps one per device and stream): arrivals [H * q] u32 = 0 and lists
// [H * q * S * M] u64 = kSplitEmpty between launches; every launch leaves them so.
#pragma once

#include <float.h>

#include "topk_cluster_core.cuh"  // warp_rth_largest, warp_bitonic_clean
#include "topk_row_core.cuh"

namespace msa_topk {

constexpr int kSplitMaxSlices = 16;      // M <= 32: 16 one-register lists in the merge tree
constexpr int kSplitMaxSlicesWide = 8;   // M > 32: 8 two-register lists
constexpr int kSplitMaxWarps = 16;
constexpr int kSplitListMax = 64;        // list entries per row in shared memory (32 R)
constexpr Comp kSplitEmpty = ~0ull;      // a workspace entry not yet published in this launch

struct SplitParams {
  const void* scores;       // max_score [H, K, Q] (fp32 or bf16)
  const int32_t* nvp;       // [Q] or nullptr -> nvp_scalar
  int32_t* out;             // [Q, H, topk]
  unsigned int* arrivals;   // [H * Q] (S > 1)
  Comp* lists;              // [H * Q][S][M] (S > 1)
  int64_t q;
  int n_blocks, n_heads, topk, fb, fe, m, nvp_scalar;
  int log_g;      // tokens per CTA = 1 << log_g (<= warps)
  int slices;     // S = gridDim.x
  int slice_len;  // L: blocks per slice, a multiple of 32
  int stride;     // floats per staged row: L + 32 / G
  int cap;        // local candidate entries per row
  unsigned long long* trace;  // diagnostic (nullptr = off): kSplitTraceSlots %globaltimer stamps per CTA
};

// Diagnostic trace, per CTA (CTA id = (blockIdx.z * gridDim.y + blockIdx.y) * gridDim.x + blockIdx.x): [0] entry,
// [1] staged (after the CTA barrier), [2] smid | slice << 16, [4 + 2 w] warp w's local list ready, [5 + 2 w] warp
// w done (published, or merged and written) | last << 63. %globaltimer ns; 0 where a warp has no row.
constexpr int kSplitTraceSlots = 4 + 2 * 32;

__host__ __device__ inline size_t split_smem_bytes(int slice_len, int g, int cap) {
  // rows [G][L + 32 / G] f32 (a multiple of 32 floats), candidates [G][cap] u64, lists [G][64] u64, ranges [2][G]
  return static_cast<size_t>(g) * (slice_len + 32 / g) * 4 + static_cast<size_t>(g) * cap * 8 +
         static_cast<size_t>(g) * kSplitListMax * 8 + 2 * static_cast<size_t>(g) * 4;
}

__device__ __forceinline__ Comp ld_relaxed_gpu(const Comp* p) {
  Comp v;
  asm volatile("ld.relaxed.gpu.global.b64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
  return v;
}

__device__ __forceinline__ void st_relaxed_gpu(Comp* p, Comp v) {
  asm volatile("st.relaxed.gpu.global.b64 [%0], %1;" ::"l"(p), "l"(v) : "memory");
}

__device__ __forceinline__ Comp cmax(Comp a, Comp b) { return a > b ? a : b; }
__device__ __forceinline__ Comp cmin(Comp a, Comp b) { return a < b ? a : b; }

// Half-cleaner steps of a bitonic sequence of 32 R composites (element i = register i / 32 of lane i % 32) ->
// sorted descending or ascending.
template <int R>
__device__ __forceinline__ void split_clean(Comp (&x)[R], bool desc, int lane) {
  if constexpr (R == 2) {  // stride 32: the two registers of one lane
    const Comp hi = cmax(x[0], x[1]), lo = cmin(x[0], x[1]);
    x[0] = desc ? hi : lo;
    x[1] = desc ? lo : hi;
  }
#pragma unroll
  for (int r = 0; r < R; ++r) x[r] = warp_bitonic_clean(x[r], desc, lane);
}

// Leaf orientation of the merge tree: lane's element (r, lane) of leaf s is list entry e (e >= M: empty).
template <int R>
__device__ __forceinline__ int split_leaf_entry(int s, int r, int lane) {
  const int i = r * 32 + lane;
  return (s & 1) ? 32 * R - 1 - i : i;
}

// The slice's exact top m (m <= 64), best first, into list[0 .. m) (0 = empty); one warp, row staged at row_base
// (nj lines of 32, block ulo + k at offset k, -inf where not eligible), cand = cap local candidate entries.
__device__ __forceinline__ void split_slice_top(const float* row_base, int nj, bool pairs, int ulo, int m, Comp* cand,
                                                int cap, Comp* list, int lane) {
  for (int e = lane; e < m; e += 32) list[e] = 0ull;
  __syncwarp();
  if (nj == 0) return;
  const float* row = row_base + lane;
  // this lane's group (lines lane + 32 j: a partition into 32 groups): its largest (m <= 32) or its second largest
  float a1 = -INFINITY, b1 = -INFINITY;
  if (m <= 32) {
#pragma unroll 8
    for (int j = 0; j < nj; ++j) a1 = fmaxf(a1, row[j << 5]);
  } else {
    for (int j = 0; j < nj; ++j) {
      const float x = row[j << 5];
      b1 = fmaxf(b1, fminf(a1, x));
      a1 = fmaxf(a1, x);
    }
  }
  // r groups holding c = 1 (2) values >= theta each: >= m values of the slice are >= theta
  const int r = m <= 32 ? m : (m + 1) >> 1;
  const uint32_t theta_key = warp_rth_largest(key_or_zero(m <= 32 ? a1 : b1), r, lane);
  const float theta = theta_key ? key_value(theta_key) : -FLT_MAX;  // -inf never passes
  int n = 0;
  scan_candidates(row_base, nj, pairs, theta, ulo, cand, cap, lane, [&](int total) {
    const int base = n;
    n += total;
    return base;
  });
  __syncwarp();
  if (n <= cap) {
    for (int e0 = 0; e0 < n; e0 += 32) {
      const int e = e0 + lane;
      const Comp x = e < n ? cand[e] : 0ull;
      int rk = 0;
#pragma unroll 4
      for (int f = 0; f < n; ++f) rk += cand[f] > x ? 1 : 0;
      if (e < n && rk < m) list[rk] = x;
    }
  } else {
    // heavy ties: m rounds of warp argmax below the previous pick over the slice (elements >= theta)
    Comp prev = ~0ull;
    for (int i = 0; i < m; ++i) {
      Comp best = 0ull;
      for (int j = 0; j < nj; ++j) {
        const float x = row[j << 5];
        if (x >= theta) {
          const Comp cx = make_comp(score_key(x), static_cast<uint32_t>(ulo + (j << 5) + lane));
          best = cx < prev && cx > best ? cx : best;
        }
      }
      best = warp_max_comp(best);
      if (best == 0ull) break;
      if (lane == 0) list[i] = best;
      prev = best;
    }
  }
  __syncwarp();
}

// Last arrival of a row: the S lists (own from shared memory, the others from the workspace, waited for and reset)
// -> the row's top M into orow (forced head / tail and -1 tail included). R = registers per lane per list,
// kSlots = leaves of the tree (>= S, a power of two).
template <int R, int kSlots>
__device__ __forceinline__ void split_merge_write(const SplitParams& p, const Comp* own, Comp* pub, int rank,
                                                  const RowRange& rr, int32_t* orow, int* scratch, int lane) {
  const int S = p.slices, m = p.m;
  Comp v[kSlots][R];
  bool pend = false;
#pragma unroll
  for (int s = 0; s < kSlots; ++s) {
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const int e = split_leaf_entry<R>(s, r, lane);
      Comp x = 0ull;
      if (s < S && e < m) {
        if (s == rank) {
          x = own[e];
        } else {
          x = ld_relaxed_gpu(pub + s * m + e);
          pend |= x == kSplitEmpty;
        }
      }
      v[s][r] = x;
    }
  }
  while (__any_sync(kRowFull, pend)) {  // a slice that took its ticket earlier is still storing its list
    __nanosleep(32);
    pend = false;
#pragma unroll
    for (int s = 0; s < kSlots; ++s) {
#pragma unroll
      for (int r = 0; r < R; ++r) {
        if (v[s][r] == kSplitEmpty) {
          v[s][r] = ld_relaxed_gpu(pub + s * m + split_leaf_entry<R>(s, r, lane));
          pend |= v[s][r] == kSplitEmpty;
        }
      }
    }
  }
  // every entry read: back to "not published" for the next launch (the own slot was never written)
#pragma unroll
  for (int s = 0; s < kSlots; ++s) {
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const int e = split_leaf_entry<R>(s, r, lane);
      if (s < S && s != rank && e < m) st_relaxed_gpu(pub + s * m + e, kSplitEmpty);
    }
  }
  // tree: after level l, node j sits in slot j << (l + 1); it comes out descending for even j
#pragma unroll
  for (int l = 0; (1 << l) < kSlots; ++l) {
#pragma unroll
    for (int j = 0; j < (kSlots >> (l + 1)); ++j) {
      const int left = (2 * j) << l, right = (2 * j + 1) << l;
      if (left >= S) continue;  // warp-uniform: empty subtree
      const bool desc = (j & 1) == 0;
      if (right >= S) {  // empty right subtree: the left node, in this node's direction
        if (!desc) split_clean<R>(v[left], false, lane);  // descending (bitonic) -> ascending
        continue;
      }
#pragma unroll
      for (int r = 0; r < R; ++r) v[left][r] = cmax(v[left][r], v[right][r]);
      split_clean<R>(v[left], desc, lane);
    }
  }
  // v[0]: the row's top 32 R descending; the first m nonzero are the selection
  int nsel = 0;
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const int i = r * 32 + lane;
    const bool sel = i < m && v[0][r] != 0ull;
    nsel += __popc(__ballot_sync(kRowFull, sel));
    if (sel) scratch[i] = static_cast<int>(comp_idx(v[0][r]));
  }
  __syncwarp();
  for (int e = lane; e < nsel; e += 32) {  // index order: position = selected blocks with a smaller index
    const int idx = scratch[e];
    int pos = 0;
#pragma unroll 4
    for (int f = 0; f < nsel; ++f) pos += scratch[f] < idx ? 1 : 0;
    orow[rr.lo + pos] = idx;
  }
  write_forced(orow, p.topk, rr, nsel, lane);
}

// Phase-1 copy with 16-byte vector loads: thread (c = tid % NV, kk = tid / NV) loads the VT = 16 / sizeof(T)
// tokens c VT .. c VT + VT - 1 of k-rows k = kk + per u (per = threads / NV), kVecU loads in flight, and stores
// each token's value transposed into its staged row; only offsets in the token's own [a, b) keep their value
// (-inf elsewhere; NaN -> -inf). Needs G >= VT, q a multiple of VT and a 16-byte aligned tensor (the binding
// checks), so a vector's tokens are all < q or all >= q.
// Ranges: shared_range -> [common_lo, common_hi) for every token, else the CTA's table range[g], range[G + g].
template <typename T, int kVecU>
__device__ __forceinline__ void split_stage_vec(const SplitParams& p, float* rows, const int* range, bool shared_range,
                                                int common_lo, int common_hi, int ulo, int span, int span_pad,
                                                int64_t t0) {
  constexpr int VT = 16 / sizeof(T);
  const int G = 1 << p.log_g;
  const int nv = G / VT;
  const int tid = threadIdx.x, c = tid % nv, kk = tid / nv, per = blockDim.x / nv;
  const int64_t tv = t0 + c * VT;
  const bool valid = tv < p.q;
  int a[VT], b[VT];
#pragma unroll
  for (int j = 0; j < VT; ++j) {
    const int g = c * VT + j;
    a[j] = (shared_range ? common_lo : range[g]) - ulo;
    b[j] = (shared_range ? common_hi : range[G + g]) - ulo;
    if (!valid) a[j] = b[j] = 0;
  }
  const int64_t step = static_cast<int64_t>(per) * p.q / VT;  // uint4 per pass
  const uint4* src = reinterpret_cast<const uint4*>(static_cast<const T*>(p.scores) +
                                                    (static_cast<int64_t>(blockIdx.z) * p.n_blocks + ulo + kk) * p.q +
                                                    (valid ? tv : 0));
  float* dst = rows + static_cast<size_t>(c * VT) * p.stride + kk;
  for (int k0 = kk; k0 < span_pad; k0 += per * kVecU) {
    uint4 v[kVecU];
#pragma unroll
    for (int u = 0; u < kVecU; ++u) {
      const int k = k0 + per * u;
      v[u] = valid && k < span ? __ldg(src + u * step) : make_uint4(0u, 0u, 0u, 0u);
    }
#pragma unroll
    for (int u = 0; u < kVecU; ++u) {
      const int k = k0 + per * u;
      if (k < span_pad) {
        const uint32_t w[4] = {v[u].x, v[u].y, v[u].z, v[u].w};
        auto token = [&](int j) {  // bf16 pairs: token 2 i in the low half of word i
          return VT == 4 ? __uint_as_float(w[j & 3])
                         : __uint_as_float((j & 1) ? (w[j >> 1] & 0xFFFF0000u) : (w[j >> 1] << 16));
        };
        if (shared_range) {  // one range for every token: one test per vector
          const bool in = k >= a[0] && k < b[0];
#pragma unroll
          for (int j = 0; j < VT; ++j) dst[j * p.stride + per * u] = in ? fmaxf(token(j), -INFINITY) : -INFINITY;
        } else {
#pragma unroll
          for (int j = 0; j < VT; ++j) {
            dst[j * p.stride + per * u] = k >= a[j] && k < b[j] ? fmaxf(token(j), -INFINITY) : -INFINITY;
          }
        }
      }
    }
    src += kVecU * step;
    dst += kVecU * per;
  }
}

// kVecU > 0: 16-byte vector staging with kVecU loads in flight per thread; 0: scalar staging (stage_span, 16).
// R = 2: M in 33..64 (two-register lists); R = 1: M <= 32. kSlots: merge-tree leaves (>= S). Separate
// instantiations so the common case (R = 1, S <= 8) keeps its register budget.
template <typename T, int kVecU, int R, int kSlots>
__device__ __forceinline__ void split_select_cta(const SplitParams& p) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int G = 1 << p.log_g, S = p.slices, rank = blockIdx.x, h = blockIdx.z;
  const int tid = threadIdx.x, n_threads = blockDim.x;
  float* rows = reinterpret_cast<float*>(smem_raw);
  Comp* cands = reinterpret_cast<Comp*>(rows + static_cast<size_t>(G) * p.stride);
  Comp* lists = cands + static_cast<size_t>(G) * p.cap;
  int* range = reinterpret_cast<int*>(lists + static_cast<size_t>(G) * kSplitListMax);
  const int64_t t0 = static_cast<int64_t>(blockIdx.y) * G;
  const int ks = rank * p.slice_len, ke = imin32(ks + p.slice_len, p.n_blocks);
  unsigned long long* trace =
      p.trace == nullptr ? nullptr
                         : p.trace + kSplitTraceSlots * ((static_cast<size_t>(blockIdx.z) * gridDim.y + blockIdx.y) *
                                                             gridDim.x + blockIdx.x);
  if (trace != nullptr && tid == 0) {
    trace[0] = global_ns();
    unsigned smid;
    asm volatile("mov.u32 %0, %%smid;" : "=r"(smid));
    trace[2] = smid | static_cast<unsigned long long>(rank) << 16;
  }

  // ---- phase 1: the union [ulo, uhi) of the rows' eligible ranges inside the slice, staged
  int ulo = INT32_MAX, uhi = INT32_MIN;
  const bool shared_range = p.nvp == nullptr;  // one scalar nvp: every row with a token has the same range
  int common_lo = 0, common_hi = 0;
  if (shared_range) {
    const RowRange rs = row_range(p.nvp_scalar, p.n_blocks, p.fb, p.fe);
    if (p.m > 0 && imax32(rs.lo, ks) < imin32(rs.hi, ke)) {
      ulo = common_lo = imax32(rs.lo, ks);
      uhi = common_hi = imin32(rs.hi, ke);
    }
  } else {
    if (tid < G) {
      int elo = 0, ehi = 0;
      if (t0 + tid < p.q && p.m > 0) {
        const RowRange rl = row_range(__ldg(p.nvp + t0 + tid), p.n_blocks, p.fb, p.fe);
        elo = imax32(rl.lo, ks);
        ehi = imin32(rl.hi, ke);
        if (elo >= ehi) elo = ehi = 0;
      }
      range[tid] = elo;
      range[G + tid] = ehi;
    }
    __syncthreads();
    union_of_ranges(range, range + G, G, &ulo, &uhi);
  }
  const int span = ulo < uhi ? uhi - ulo : 0;
  if (span == 0) ulo = 0;
  const int span_pad = (span + 31) & ~31;
  if constexpr (kVecU > 0) {
    split_stage_vec<T, kVecU>(p, rows, range, shared_range, common_lo, common_hi, ulo, span, span_pad, t0);
  } else {
    const int gl = tid & (G - 1), per = n_threads >> p.log_g, kk = tid >> p.log_g;
    const int64_t tl = t0 + gl;
    int a = 0, b = 0;  // this thread's row: offsets [a, b) of the staged window hold values
    if (tl < p.q) {
      a = (shared_range ? common_lo : range[gl]) - ulo;
      b = (shared_range ? common_hi : range[G + gl]) - ulo;
    }
    const T* src = static_cast<const T*>(p.scores) + (static_cast<int64_t>(h) * p.n_blocks + ulo + kk) * p.q +
                   (tl < p.q ? tl : 0);
    stage_span<T, 16>(src, p.q, per, kk, a, b, span_pad, rows + static_cast<size_t>(gl) * p.stride + kk);
  }
  __syncthreads();  // the last CTA barrier: nothing below waits for another warp of this CTA
  if (trace != nullptr && tid == 0) trace[1] = global_ns();

  // ---- phase 2: warp g, row t0 + g
  const int warp = tid >> 5, lane = tid & 31;
  const int64_t t = t0 + warp;
  if (warp >= G || t >= p.q) return;
  const RowRange rr = row_range(p.nvp != nullptr ? __ldg(p.nvp + t) : p.nvp_scalar, p.n_blocks, p.fb, p.fe);
  int32_t* orow = p.out + (t * p.n_heads + h) * p.topk;
  if (p.m == 0) {  // nothing to select: slice 0 writes the forced blocks
    if (rank == 0) write_forced(orow, p.topk, rr, 0, lane);
    return;
  }
  const int64_t row_id = static_cast<int64_t>(h) * p.q + t;
  unsigned int ticket = 0u;
  if (S > 1 && lane == 0) ticket = atomicInc(p.arrivals + row_id, static_cast<unsigned int>(S - 1));
  float* row_base = rows + static_cast<size_t>(warp) * p.stride;
  Comp* list = lists + static_cast<size_t>(warp) * kSplitListMax;
  split_slice_top(row_base, span_pad >> 5, (p.stride & 1) == 0, ulo, p.m, cands + static_cast<size_t>(warp) * p.cap,
                  p.cap, list, lane);
  const bool last = S == 1 || __shfl_sync(kRowFull, ticket, 0) == static_cast<unsigned int>(S - 1);
  if (trace != nullptr && lane == 0) trace[4 + 2 * warp] = global_ns();
  Comp* pub = p.lists + row_id * S * p.m;  // this row's S lists
  if (!last) {
    for (int e = lane; e < p.m; e += 32) st_relaxed_gpu(pub + rank * p.m + e, list[e]);
  } else {
    int* scratch = reinterpret_cast<int*>(row_base);  // the staged row is no longer read
    split_merge_write<R, kSlots>(p, list, pub, rank, rr, orow, scratch, lane);
  }
  if (trace != nullptr && lane == 0) trace[5 + 2 * warp] = global_ns() | (last ? 1ull << 63 : 0ull);
}

}  // namespace msa_topk
