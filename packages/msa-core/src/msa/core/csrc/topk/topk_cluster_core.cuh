// "cluster" path of sparse_topk_select: few long rows (decode at 128K-1M context), CUDA only (sm_90+).
//
// Why: with total_q = 64 and H = 1..4 there are only 64-256 rows, so one warp (or one CTA) per row leaves most
// SMs idle and walks 8192 blocks serially, and a CTA of G = 1..2 tokens reads 4-8 bytes of every 32-byte
// sector of a K-row. Here a cluster of S CTAs (S <= 8, portable) splits K: CTA s of cluster (token group,
// head) stages blocks [s L, (s + 1) L) of G rows (G tokens: 8 x 4 B = whole 32-byte sectors), so H * S *
// ceil(q / G) CTAs share the work and each row's selection is spread over S warps on S SMs.
//
// Per row (warp g of every CTA in the cluster does row g on its slice; no extra launch, no workspace):
//  1. like the row path, the slice's 32 group values (group maxima, or second largest for M > 32), published
//     unsorted in shared memory. Cluster barrier.
//  2. theta (default): lane i reads group i's value from all S slices at once (S independent DSMEM loads, one
//     latency) and keeps their maximum: the value of the union group i (a partition of the whole row into 32
//     groups; for M > 32 the maximum of the slices' second largest still has >= 2 elements >= it in the union
//     group). theta = the r-th largest of the 32 union values (r = M, or ceil(M / 2)) by rank counting (32
//     independent broadcasts, no dependent shuffle chain). r disjoint groups each hold c >= 1 (2) values >=
//     theta, so >= M values of the row are >= theta (~M + M^2 / 64 candidates for iid scores, ~18 for M = 15).
//     flag kClusterSortedMerge (A/B): the v4 bound -- every slice sorts its list (bitonic), and S - 1 bitonic
//     merges keep the top 32 of the union of S * 32 groups (~16 candidates, a 6-shuffle chain per slice).
//  3. the slice's candidates (>= theta) are appended to the row's owner CTA (rank g % S) through DSMEM: one
//     remote atomicAdd per 32 lines reserves a warp's run, each lane writes its own composites (score key << 32
//     | ~index: value desc, index asc). Cluster barrier.
//  4. owner warp: n <= cap -> exact rank select among the n candidates (shared with the row path), output in
//     index order. n > cap (heavy ties) -> M rounds of warp argmax below the previous pick over all S staged
//     slices (DSMEM reads; exact, slow, rare), then one ordered pass over the slices in index order.
//  5. forced head / tail / -1. A final cluster barrier (so no CTA's shared memory goes away while a fallback
//     may still read it) only where a row of the cluster overflowed: the appender whose reservation passes cap
//     sets a flag in every CTA of the cluster before barrier 2, so the decision is cluster-uniform (flag
//     kClusterAlwaysExitSync: always, as v4).
//
// Timeline (compile-time MSA_TOPK_TIMELINE, a Jinja parameter of the module): lane 0 of warp (rank < G ? rank :
// 0) -- the owner warp of row `rank` -- records %globaltimer / clock64 stamps per phase into p.trace
// (kTimelineSlots u64 per CTA, slots below); .gpu/topk/cluster_timeline.py prints them per phase.
// Exactness does not depend on the order of the remote appends: the owner ranks composite keys.
//
// Local-merge variant (template kLocal, A/B flag kClusterLocalMerge, M <= 32; session 3 after run 5): one cluster
// barrier on the critical path instead of two, no DSMEM round trip (no remote loads, no remote atomics):
//  0. every thread arrives (relaxed) on the cluster barrier at entry and waits on it after staging: by then every
//     CTA of the cluster has long started, so the first remote store is legal and the wait costs ~nothing.
//  1. staging and the slice's group maxima as above; each row warp selects its slice's exact top M on its own
//     (the row path: local theta = the M-th largest of the slice's 32 group maxima, candidate scan into a local
//     buffer, rank count; > cap candidates (heavy ties) -> M rounds of local warp argmax: exact, no DSMEM).
//  2. the slice's best M, as a list of 32 composites (0 = empty), is stored into the owner CTA's list table
//     lists[own][slice] through DSMEM: one 8-byte remote store per lane, in descending order for even slices
//     and ascending for odd ones (so two neighbouring lists form a bitonic sequence). Cluster barrier.
//  3. owner warp: lane i holds entry i of each of the S <= 8 lists (8 local loads in flight), a 3-level tree of
//     bitonic merges (elementwise max of a descending and an ascending list = the top 32 of their union as a
//     bitonic sequence, then 5 half-cleaner steps, alternating the output direction) leaves the row's top 32 in
//     lane order; lanes < M with a nonzero composite are selected, output position = selected with a smaller
//     index (shuffles). No remote read after the barrier: no exit guard.
// The top M of the row is in the union of the slices' top M, so this is exact; DSMEM traffic per row = S * 256 B
// of stores (vs group keys + candidates + an atomic per chunk), the owner's merge ~15 dependent shuffle steps.
#pragma once

#include <cooperative_groups.h>

#include "topk_row_core.cuh"

namespace msa_topk {

constexpr int kClusterMaxSlices = 8;  // portable cluster size

// p.flags bits (MSA_TOPK_CLUSTER_FLAGS; A/B variants, every one exact)
constexpr int kClusterAlwaysExitSync = 1;  // final cluster barrier even when no row overflowed (v4)
constexpr int kClusterAttrForOne = 2;      // S == 1: launch with the cluster attribute (default: a plain launch)
constexpr int kClusterSortedMerge = 4;     // the v4 bound: sorted lists + S - 1 bitonic union merges
constexpr int kClusterLocalMerge = 8;      // local exact top M per slice + one barrier + owner bitonic tree (M <= 32)
constexpr int kClusterOneBatch = 16;       // every staging load of a thread in one batch (32 in flight, W <= 8)
constexpr int kClusterFlagsEnd = 32;       // flags < this
constexpr int kClusterLocalMaxM = 32;      // local merge: one 32-entry list per slice and row

// Timeline slots (u64 per CTA; MSA_TOPK_TIMELINE builds only)
constexpr int kTimelineSlots = 16;
enum TimelineSlot {
  kTlStartNs = 0,   // %globaltimer at entry
  kTlStart = 1,     // clock64 at entry (pairs with slot 0)
  kTlRanges = 2,    // row ranges known, loads about to be issued
  kTlStaged = 3,    // every load landed and stored (after the CTA barrier)
  kTlGroups = 4,    // group values published (before cluster barrier 1)
  kTlSync1 = 5,     // after cluster barrier 1
  kTlTheta = 6,     // theta known (remote group values read)
  kTlAppended = 7,  // candidates appended to the owner (remote atomics + stores issued)
  kTlSync2 = 8,     // after cluster barrier 2
  kTlRanked = 9,    // owner: rank select + output written
  kTlExit = 10,     // after the exit barrier (or its skip)
  kTlEndNs = 11,    // %globaltimer at exit
  kTlMeta = 12,     // smid | rank << 16 | exit barrier taken << 24 | candidates of the stamped row << 32
  kTlEnd = 13,      // clock64 at exit (pairs with slot 11)
};

struct ClusterParams {
  const void* scores;  // max_score [H, K, Q] (fp32 or bf16)
  const int32_t* nvp;  // [Q] or nullptr -> nvp_scalar
  int32_t* out;        // [Q, H, topk]
  unsigned long long* trace;  // MSA_TOPK_TIMELINE builds: kTimelineSlots per CTA, or nullptr
  int64_t q;
  int n_blocks, n_heads, topk, fb, fe, m, nvp_scalar;
  int log_g;      // tokens per CTA = 1 << log_g (<= warps)
  int slices;     // S = CTAs per cluster (gridDim.x)
  int slice_len;  // L: blocks per slice, a multiple of 32
  int stride;     // floats per staged row: L + 32 / G
  int cap;        // candidate entries per owned row
  int flags;      // kCluster* bits
};

__host__ __device__ inline int cluster_owned_rows(int g, int slices) { return (g + slices - 1) / slices; }

__host__ __device__ inline size_t cluster_smem_bytes(int slice_len, int g, int slices, int cap) {
  // rows [G][L + 32 / G] f32 (a multiple of 32 floats), owned candidates [ceil(G / S)][cap] u64, group keys
  // [G][32] u32, owned counters [ceil(G / S)], ranges [2][G], staged window (ulo, lines) [2], overflow flag
  // (+ 1 pad word)
  const size_t own = cluster_owned_rows(g, slices);
  return static_cast<size_t>(g) * (slice_len + 32 / g) * 4 + own * cap * 8 + static_cast<size_t>(g) * 32 * 4 +
         own * 4 + 2 * static_cast<size_t>(g) * 4 + 2 * 4 + 2 * 4;
}

// Local-merge variant: rows + local candidates [G][cap] u64 + owner lists [ceil(G / S)][S][32] u64 + group keys
// [G][32] u32 + ranges [2][G] + window [2] + overflow (+ pad).
__host__ __device__ inline size_t cluster_local_smem_bytes(int slice_len, int g, int slices, int cap) {
  const size_t own = cluster_owned_rows(g, slices);
  return static_cast<size_t>(g) * (slice_len + 32 / g) * 4 + static_cast<size_t>(g) * cap * 8 +
         own * slices * 32 * 8 + static_cast<size_t>(g) * 32 * 4 + 2 * static_cast<size_t>(g) * 4 + 2 * 4 + 2 * 4;
}

__device__ __forceinline__ RowRange cluster_row_range(const ClusterParams& p, int64_t t) {
  return row_range(p.nvp != nullptr ? __ldg(p.nvp + t) : p.nvp_scalar, p.n_blocks, p.fb, p.fe);
}

// The r-th largest (1 <= r <= 32) of one key per lane, every lane gets it: lane i's rank = number of keys
// greater than its own, ties broken by lane (a permutation of 0..31), by 32 independent broadcasts.
__device__ __forceinline__ uint32_t warp_rth_largest(uint32_t key, int r, int lane) {
  int rank = 0;
#pragma unroll
  for (int j = 0; j < 32; ++j) {
    const uint32_t o = __shfl_sync(kRowFull, key, j);
    rank += (o > key || (o == key && j < lane)) ? 1 : 0;
  }
  const uint32_t hit = __ballot_sync(kRowFull, rank == r - 1);
  return __shfl_sync(kRowFull, key, __ffs(hit) - 1);
}

// Exit guard: keeps this CTA's shared memory alive until every CTA of the cluster is past its remote reads.
// Relaxed arrive: the guard orders nothing (the remote loads it waits for have been consumed before arriving),
// so it does not wait for this CTA's output stores to be acknowledged as a release would.
__device__ __forceinline__ void cluster_exit_guard() {
  asm volatile("barrier.cluster.arrive.relaxed.aligned;\n\tbarrier.cluster.wait.aligned;" ::: "memory");
}

// Half-cleaner steps of a bitonic sequence of 32 composites (one per lane) -> sorted, descending or ascending.
__device__ __forceinline__ Comp warp_bitonic_clean(Comp x, bool desc, int lane) {
#pragma unroll
  for (int jb = 16; jb > 0; jb >>= 1) {
    const Comp o = __shfl_xor_sync(kRowFull, x, jb);
    const bool take_max = ((lane & jb) == 0) == desc;
    x = take_max ? (o > x ? o : x) : (o < x ? o : x);
  }
  return x;
}

// Local merge: lane i of list s is entry (s odd ? 31 - i : i) of the slice's best-first list, so that lists
// 2j (descending) and 2j + 1 (ascending) form a bitonic pair.
__device__ __forceinline__ int local_list_pos(int slice, int i) { return (slice & 1) ? 31 - i : i; }

// The top 32 of the union of 8 lists (l[s] = lane's entry of list s; even s descending, odd s ascending across
// the lanes; missing lists all 0), descending across the lanes: a 3-level tree of bitonic merges.
__device__ __forceinline__ Comp warp_merge8_desc(const Comp (&l)[kClusterMaxSlices], int lane) {
  Comp a[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {  // max(desc, asc) = the pair's top 32 (bitonic); outputs desc, asc, desc, asc
    const Comp x = l[2 * i] > l[2 * i + 1] ? l[2 * i] : l[2 * i + 1];
    a[i] = warp_bitonic_clean(x, (i & 1) == 0, lane);
  }
  Comp b[2];
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const Comp x = a[2 * i] > a[2 * i + 1] ? a[2 * i] : a[2 * i + 1];
    b[i] = warp_bitonic_clean(x, (i & 1) == 0, lane);
  }
  return warp_bitonic_clean(b[0] > b[1] ? b[0] : b[1], true, lane);
}

#ifdef MSA_TOPK_TIMELINE
#define MSA_TOPK_TL(slot)                                    \
  do {                                                       \
    if (tl != nullptr) tl[slot] = clock64();                 \
  } while (0)
#else
#define MSA_TOPK_TL(slot) \
  do {                    \
  } while (0)
#endif

#ifdef MSA_TOPK_TIMELINE
// Timeline builds: the exit stamps and the CTA's metadata word (smid | rank << 16 | exit barrier taken << 24 |
// candidates of the stamped row << 32), written by both finishing paths.
__device__ __forceinline__ void timeline_exit(unsigned long long* tl, int rank, bool guard, int n_stamped) {
  if (tl == nullptr) return;
  tl[kTlExit] = clock64();
  tl[kTlEnd] = clock64();
  tl[kTlEndNs] = global_ns();
  unsigned smid;
  asm volatile("mov.u32 %0, %%smid;" : "=r"(smid));
  tl[kTlMeta] = smid | (static_cast<unsigned long long>(rank) << 16) | (guard ? 1ull << 24 : 0ull) |
                (static_cast<unsigned long long>(n_stamped) << 32);
}
#endif

// Local-merge variant after staging (kLocal): per row warp the slice's exact top M -> the owner's list table
// through DSMEM, one cluster barrier, owner warp merges the S lists and writes the row. Every thread of the CTA
// calls it (it holds the cluster barrier's second wait and its second phase).
__device__ __forceinline__ void cluster_local_finish(const ClusterParams& p, cooperative_groups::cluster_group& cluster,
                                                     float* rows, Comp* cands, Comp* lists, const uint32_t* gkeys,
                                                     int ulo, int nj, int64_t t0, int rank
#ifdef MSA_TOPK_TIMELINE
                                                     , unsigned long long* tl
#endif
) {
  const int G = 1 << p.log_g, S = p.slices, h = blockIdx.z;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t t = t0 + warp;
  const bool row_warp = warp < G && t < p.q && p.m > 0;  // warp-uniform, the same in every CTA of the cluster
  float* row_base = rows + static_cast<size_t>(imin32(warp, G - 1)) * p.stride;
  const int owner = warp % S, own_slot = warp / S;
  MSA_TOPK_TL(kTlGroups);
  asm volatile("barrier.cluster.wait.aligned;" ::: "memory");  // phase 0 (arrived at entry)
  MSA_TOPK_TL(kTlSync1);
  int n_stamped = 0;
  if (row_warp) {
    // 1. the slice's exact top M (row path: local theta, local candidates, rank count)
    int r;
    const uint32_t key = theta_group_key(row_base + lane, gkeys[warp * 32 + lane], nj, p.m, &r);
    const uint32_t theta_key = warp_rth_largest(key, r, lane);
    const float theta = theta_key ? key_value(theta_key) : -FLT_MAX;  // -inf never passes
    MSA_TOPK_TL(kTlTheta);
    Comp* cand = cands + static_cast<size_t>(warp) * p.cap;
    int n = 0;
    scan_candidates(row_base, nj, (p.stride & 1) == 0, theta, ulo, cand, p.cap, lane, [&](int total) {
      const int base = n;
      n += total;
      return base;
    });
    __syncwarp();
    n_stamped = n;
    // 2. the list (best first, 0 = empty) into the owner's table at this slice's slot, lane order by parity
    Comp* dst = cluster.map_shared_rank(lists + (static_cast<size_t>(own_slot) * S + rank) * 32, owner);
    if (n <= p.cap) {
      for (int e0 = 0; e0 < n; e0 += 32) {
        const int e = e0 + lane;
        const Comp x = e < n ? cand[e] : 0ull;
        int rk = 0;
#pragma unroll 4
        for (int f = 0; f < n; ++f) rk += cand[f] > x ? 1 : 0;
        if (e < n && rk < p.m) dst[local_list_pos(rank, rk)] = x;
      }
      if (lane >= imin32(n, p.m)) dst[local_list_pos(rank, lane)] = 0ull;
    } else {
      // heavy ties: M rounds of warp argmax below the previous pick over the local slice (exact, no DSMEM)
      const float* row = row_base + lane;
      Comp prev = ~0ull, mine = 0ull;
      for (int i = 0; i < p.m; ++i) {
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
        if (lane == i) mine = best;
        prev = best;
      }
      dst[local_list_pos(rank, lane)] = mine;
    }
    MSA_TOPK_TL(kTlAppended);
  }
  cluster.sync();  // every slice's list is in its owner's table
  MSA_TOPK_TL(kTlSync2);

  if (warp < G && owner == rank && t < p.q) {
    const RowRange rr = cluster_row_range(p, t);
    int32_t* orow = p.out + (t * p.n_heads + h) * p.topk;
    int nsel = 0;
    if (p.m > 0 && rr.lo < rr.hi) {
      // 3. the top 32 of the union of the S lists (missing slices: empty lists), then index order
      const Comp* lst = lists + static_cast<size_t>(own_slot) * S * 32 + lane;
      Comp l[kClusterMaxSlices];
#pragma unroll
      for (int s = 0; s < kClusterMaxSlices; ++s) l[s] = s < S ? lst[s * 32] : 0ull;
      const Comp top = warp_merge8_desc(l, lane);
      const bool sel = lane < p.m && top != 0ull;
      const uint32_t bal = __ballot_sync(kRowFull, sel);
      nsel = __popc(bal);
      const uint32_t idx = comp_idx(top);
      int pos = 0;
#pragma unroll
      for (int j = 0; j < 32; ++j) {
        const uint32_t o = __shfl_sync(kRowFull, idx, j);
        pos += ((bal >> j) & 1u) != 0u && o < idx ? 1 : 0;
      }
      if (sel) orow[rr.lo + pos] = static_cast<int32_t>(idx);
    }
    write_forced(orow, p.topk, rr, nsel, lane);
  }
  MSA_TOPK_TL(kTlRanked);
  // no remote access after the barrier: no exit guard
#ifdef MSA_TOPK_TIMELINE
  timeline_exit(tl, rank, false, n_stamped);
#else
  (void)n_stamped;
#endif
}

// kLocal: the local-merge variant (kClusterLocalMerge; M <= 32, see the header comment).
template <typename T, int kUnroll, bool kLocal>
__device__ __forceinline__ void cluster_select_cta(const ClusterParams& p) {
  namespace cg = cooperative_groups;
  cg::cluster_group cluster = cg::this_cluster();
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int G = 1 << p.log_g, S = p.slices;
  const int rank = static_cast<int>(cluster.block_rank());  // == blockIdx.x: cluster dims (S, 1, 1), grid.x == S
  const int n_threads = blockDim.x, tid = threadIdx.x, h = blockIdx.z;
  const int n_own = cluster_owned_rows(G, S);
  float* rows = reinterpret_cast<float*>(smem_raw);
  // candidates: [ceil(G / S)][cap] owned rows (default) or [G][cap] local rows (kLocal, then the owner lists)
  Comp* cands = reinterpret_cast<Comp*>(rows + static_cast<size_t>(G) * p.stride);
  Comp* lists = cands + static_cast<size_t>(kLocal ? G : n_own) * p.cap;  // kLocal: [ceil(G / S)][S][32]
  uint32_t* gkeys = reinterpret_cast<uint32_t*>(kLocal ? lists + static_cast<size_t>(n_own) * S * 32 : lists);
  int* counts = reinterpret_cast<int*>(gkeys + G * 32);  // default only
  int* range = counts + (kLocal ? 0 : n_own);
  int* window = range + 2 * G;
  int* overflow = window + 2;  // set remotely by an appender whose reservation passed cap
  const int64_t t0 = static_cast<int64_t>(blockIdx.y) * G;
#ifdef MSA_TOPK_TIMELINE
  const int stamp_warp = rank < G ? rank : 0;  // the owner warp of row `rank`
  unsigned long long* tl = nullptr;
  if (p.trace != nullptr && tid == stamp_warp * 32) {
    tl = p.trace + kTimelineSlots * ((static_cast<size_t>(blockIdx.z) * gridDim.y + blockIdx.y) * gridDim.x +
                                     blockIdx.x);
    tl[kTlStartNs] = global_ns();
    tl[kTlStart] = clock64();
  }
#endif
  if constexpr (kLocal) {
    // phase 0 of the cluster barrier: waited on after staging, before the first remote store (every CTA of the
    // cluster has started by then); relaxed: it orders nothing
    asm volatile("barrier.cluster.arrive.relaxed.aligned;" ::: "memory");
  }

  // ---- phase 1: stage this slice's part of every row's eligible range
  const int ks = rank * p.slice_len, ke = imin32(ks + p.slice_len, p.n_blocks);
  const int gl = tid & (G - 1);
  const int64_t tl_tok = t0 + gl;
  const int per = n_threads >> p.log_g;
  const int kk = tid >> p.log_g;
  // one thread per (row, group) when per == 32: group values are plain stores, nothing to zero first
  const bool own_groups = per == 32;
  int elo = 0, ehi = 0;
  if (tl_tok < p.q && p.m > 0) {
    const RowRange rl = cluster_row_range(p, tl_tok);
    elo = imax32(rl.lo, ks);
    ehi = imin32(rl.hi, ke);
    if (elo >= ehi) elo = ehi = 0;
  }
  if (!kLocal && tid < n_own) counts[tid] = 0;  // read / written remotely only after cluster barrier 1
  if (tid == 0) *overflow = 0;
  int ulo = INT32_MAX, uhi = INT32_MIN;
  if (p.nvp == nullptr && own_groups) {
    // one scalar nvp: every row with a token has the same range; no range table, no barrier before staging
    const RowRange rs = row_range(p.nvp_scalar, p.n_blocks, p.fb, p.fe);
    if (p.m > 0 && imax32(rs.lo, ks) < imin32(rs.hi, ke)) {
      ulo = imax32(rs.lo, ks);
      uhi = imin32(rs.hi, ke);
    }
  } else {
    for (int i = tid; i < G * 32; i += n_threads) gkeys[i] = 0u;
    if (tid < G) {
      range[tid] = elo;
      range[G + tid] = ehi;
    }
    __syncthreads();
    union_of_ranges(range, range + G, G, &ulo, &uhi);
  }
  const int span = ulo < uhi ? uhi - ulo : 0;
  if (span == 0) ulo = 0;
  const int span_pad = (span + 31) & ~31;
  const int nj = span_pad >> 5;
  if (tid == 0) {
    window[0] = ulo;
    window[1] = nj;
  }
  MSA_TOPK_TL(kTlRanges);
  const T* src = static_cast<const T*>(p.scores) + (static_cast<int64_t>(h) * p.n_blocks + ulo) * p.q +
                 (tl_tok < p.q ? tl_tok : 0) + kk * p.q;
  const float mx = stage_span<T, kUnroll>(src, p.q, per, kk, elo - ulo, ehi - ulo, span_pad,
                                          rows + static_cast<size_t>(gl) * p.stride + kk);
  // groups = kk mod 32 (any partition of the slice into 32 groups serves the bound)
  if (own_groups) {
    gkeys[gl * 32 + kk] = key_or_zero(mx);
  } else if (mx > -INFINITY) {
    atomicMax(gkeys + gl * 32 + (kk & 31), score_key(mx));
  }
  __syncthreads();
  MSA_TOPK_TL(kTlStaged);
  if constexpr (kLocal) {
    cluster_local_finish(p, cluster, rows, cands, lists, gkeys, ulo, nj, t0, rank
#ifdef MSA_TOPK_TIMELINE
                         , tl
#endif
    );
    return;
  }

  // ---- phase 2: warp g works on row g
  const int warp = tid >> 5, lane = tid & 31;
  const int64_t t = t0 + warp;
  const bool row_warp = warp < G && t < p.q && p.m > 0;  // warp-uniform, and the same in every CTA of the cluster
  const bool sorted_merge = (p.flags & kClusterSortedMerge) != 0;
  float* row_base = rows + static_cast<size_t>(imin32(warp, G - 1)) * p.stride;
  int r = 1;
  if (warp < G) {
    uint32_t key = 0u;
    if (row_warp) key = theta_group_key(row_base + lane, gkeys[warp * 32 + lane], nj, p.m, &r);
    // this warp alone reads / writes row warp's keys
    gkeys[warp * 32 + lane] = sorted_merge ? warp_sort_desc(key, lane) : key;
  }
  MSA_TOPK_TL(kTlGroups);
  cluster.sync();  // every slice's group keys are visible
  MSA_TOPK_TL(kTlSync1);

  const int owner = warp % S, own_slot = warp / S;
  if (row_warp) {
    // lane i: group i's value in every slice, all loads in flight at once (slots past S re-read this CTA's)
    uint32_t gv[kClusterMaxSlices];
#pragma unroll
    for (int s = 0; s < kClusterMaxSlices; ++s) gv[s] = *cluster.map_shared_rank(gkeys + warp * 32 + lane, s < S ? s : rank);
    uint32_t theta_key;
    if (!sorted_merge) {
      uint32_t u = gv[0];
#pragma unroll
      for (int s = 1; s < kClusterMaxSlices; ++s) u = umax32(u, gv[s]);  // re-read own slots change nothing
      theta_key = warp_rth_largest(u, r, lane);
    } else {
      uint32_t top = gv[0];  // v4: top 32 of the union of the S sorted lists
#pragma unroll
      for (int s = 1; s < kClusterMaxSlices; ++s) {
        if (s >= S) break;
        top = umax32(top, __shfl_sync(kRowFull, gv[s], 31 - lane));  // bitonic: the union's top 32
#pragma unroll
        for (int jb = 16; jb > 0; jb >>= 1) {
          const uint32_t o = __shfl_xor_sync(kRowFull, top, jb);
          top = (lane & jb) == 0 ? umax32(top, o) : umin32(top, o);
        }
      }
      theta_key = __shfl_sync(kRowFull, top, r - 1);
    }
    const float theta = theta_key ? key_value(theta_key) : -FLT_MAX;  // -inf never passes
    MSA_TOPK_TL(kTlTheta);
    Comp* dst = cluster.map_shared_rank(cands + static_cast<size_t>(own_slot) * p.cap, owner);
    int* cnt = cluster.map_shared_rank(counts + own_slot, owner);
    scan_candidates(row_base, nj, (p.stride & 1) == 0, theta, ulo, dst, p.cap, lane, [&](int total) {
      int base = 0;
      if (lane == 0) {
        base = atomicAdd(cnt, total);
        if (base + total > p.cap) {  // this row goes to the fallback: every CTA keeps its slice until the end
          for (int s = 0; s < S; ++s) *cluster.map_shared_rank(overflow, s) = 1;
        }
      }
      return __shfl_sync(kRowFull, base, 0);
    });
    MSA_TOPK_TL(kTlAppended);
  }
  cluster.sync();  // every candidate is in its owner's buffer, every overflow flag is set
  MSA_TOPK_TL(kTlSync2);

  int n_stamped = 0;
  if (warp < G && owner == rank && t < p.q) {
    const RowRange rr = cluster_row_range(p, t);
    int32_t* orow = p.out + (t * p.n_heads + h) * p.topk;
    int nsel = 0;
    if (p.m > 0 && rr.lo < rr.hi) {
      const int n = counts[own_slot];
      n_stamped = n;
      // the staged row of this CTA is read by no other CTA (only row warp's own owner reads row warp): scratch
      if (n <= p.cap) {
        nsel = rank_select_write(cands + static_cast<size_t>(own_slot) * p.cap, n, p.m,
                                 reinterpret_cast<int*>(row_base), orow + rr.lo, lane);
      } else {
        // heavy ties: the M-th best composite by M rounds of warp argmax over all slices, theta-free (exact)
        const uint32_t lt = lanemask_lt();
        Comp prev = ~0ull;
        int found = 0;
        for (int i = 0; i < p.m; ++i) {
          Comp best = 0ull;
          for (int s = 0; s < S; ++s) {
            const float* srow = cluster.map_shared_rank(rows + static_cast<size_t>(warp) * p.stride, s);
            const int* sw = cluster.map_shared_rank(window, s);
            const int slo = sw[0], snj = sw[1];
            for (int j = 0; j < snj; ++j) {
              const float x = srow[(j << 5) + lane];
              if (x > -INFINITY) {
                const Comp cx = make_comp(score_key(x), static_cast<uint32_t>(slo + (j << 5) + lane));
                best = cx < prev && cx > best ? cx : best;
              }
            }
          }
          best = warp_max_comp(best);
          if (best == 0ull) break;
          prev = best;
          ++found;
        }
        for (int s = 0; s < S && found > 0; ++s) {  // slices in index order, lines in index order
          const float* srow = cluster.map_shared_rank(rows + static_cast<size_t>(warp) * p.stride, s);
          const int* sw = cluster.map_shared_rank(window, s);
          const int slo = sw[0], snj = sw[1];
          for (int j = 0; j < snj; ++j) {
            const float x = srow[(j << 5) + lane];
            const int k = slo + (j << 5) + lane;
            const bool sel = x > -INFINITY && make_comp(score_key(x), static_cast<uint32_t>(k)) >= prev;
            const uint32_t bal = __ballot_sync(kRowFull, sel);
            if (sel) orow[rr.lo + nsel + __popc(bal & lt)] = k;
            nsel += __popc(bal);
          }
        }
      }
    }
    write_forced(orow, p.topk, rr, nsel, lane);
  }
  MSA_TOPK_TL(kTlRanked);
  // cluster-uniform: the flags are the same in every CTA, *overflow was written before barrier 2 in all of them
  const bool guard = (p.flags & kClusterAlwaysExitSync) != 0 || *overflow != 0;
  if (guard) cluster_exit_guard();  // no CTA exits while a fallback may read its shared memory
#ifdef MSA_TOPK_TIMELINE
  timeline_exit(tl, rank, guard, n_stamped);
#else
  (void)n_stamped;
#endif
}

#undef MSA_TOPK_TL

}  // namespace msa_topk
