// "coop" path of sparse_topk_select (M <= 16, decode-like rows of 256 < K <= 1024 blocks): the W warps of one CTA
// select G rows together; every value stays in the register of the thread that loaded it.
//
// Why: the net path gives a 1024-block row to one warp (P32 V32): one warp issues all 32 x 32-line loads (they land
// ~1.25 us after entry at 128K decode H1, H200 timeline) and then a ~1600-instruction network chain at ~4.3 cycles
// per instruction (~0.9 us, ncu). Here a row's 1024 values are spread over 32 W / G threads (V = 4 or 8 each): the
// loads land ~0.3 us earlier and the selection is a chain of CTA steps (~1.3 us after the loads vs ~1.45 for net,
// H200 timeline; every barrier phase costs ~250 ns there): 3.6 -> 3.0 us per call at 128K decode H1.
// Session 8 (H200, RESULTS session 8 runs 1-2): the candidate ranks by one warp instead of all warps (one CTA
// barrier and the partial-rank atomics fewer) measured the same per call (3.03-3.08 / 4.29); a mask-and-compact
// variant (candidate bits, one warp compacting in block order) was slower (3.23): the single-warp chain of
// dependent shared-memory steps costs what the barrier saved. The remaining time is mostly the loads (1024
// scattered 32-byte sectors per row, all on the row's SM: ~0.85 us until they land) -- see benchmarks/topk_notes.md.
//
// Layout: CTA = G consecutive tokens (rows) of one head, W warps; lane bits below log2(G) pick the row, so a warp
// load instruction reads 32 / G distinct K-rows with G consecutive tokens each. Thread i (0 .. R - 1, R = 32 W / G)
// of a row holds blocks i + R j (j < V = 1024 / R; past K, NaN and outside [lo, hi) -> -inf).
// Per row (exact; composite order = value descending, then block index ascending):
//  1. bound: 32 supergroups, supergroup e = the threads i = e (mod 32), i.e. the blocks b = e (mod 32) -- interleaved,
//     so a run of neighbouring good blocks (correlated scores) lands in many supergroups; theta = the M-th largest
//     of the 32 supergroup maxima (thread maxima through shared memory; each warp ranks 32 G / W of them by one
//     ballot each, the one of rank M - 1 is published: two CTA barriers, no atomics). M distinct blocks are
//     >= theta, so theta <= T, the row's M-th largest value. Candidates on iid / random-walk / ascending rows of
//     1024 blocks (M = 15): median 19 / 18 / 15 (contiguous supergroups: 19 / 135 / 449).
//  2. candidates: values >= theta (theta = -inf: values > -inf), appended as (score key, index) composites to the
//     row's list in shared memory in any order (one shared atomicAdd per thread with candidates; per warp when G = 1).
//  3. warp g alone finishes row g (one CTA barrier fewer than session 7's version, where all warps added partial
//     candidate ranks with shared atomics): every list entry is ranked by composite against the list (16-byte
//     broadcast loads, four in flight per trip), rank < M is kept (ballot positions into a kept list), each kept
//     index's output slot = the kept indices below it (shuffles), written after the forced head. n > kCoopCap
//     (heavy ties, adversarial periodic rows): that warp runs the net selection (net_select_warp P32 V32) on the
//     row instead -- exact, slower.
// CPU replay with the same helpers: topk_coop_emulate.cc.
#pragma once

#include "topk_net_core.cuh"

namespace msa_topk {

constexpr int kCoopGroups = 32;  // supergroups per row (the bound)
constexpr int kCoopCap = 64;     // candidates kept per row (2 per lane of the ranking warp); more -> net fallback
constexpr int kCoopMaxM = 16;
constexpr int kCoopRowBlocks = 1024;  // R threads x V values per row

// Composite order of the bound: (a, ia) ranks before (b, ib).
MSA_TOPK_HD bool coop_before(float a, int ia, float b, int ib) { return a > b || (a == b && ia < ib); }

// The rank of supergroup e among the 32 supergroup maxima sg[0 .. 32) (CPU replay; the kernel ranks by shuffles).
MSA_TOPK_HD int coop_rank_of(const float* sg, int e) {
  int r = 0;
  for (int j = 0; j < kCoopGroups; ++j) r += coop_before(sg[j], j, sg[e], e) ? 1 : 0;
  return r;
}

// The supergroup of rank m - 1 (its maximum is the bound), or -1 when no or several supergroups have that rank: the
// CPU replays' check that the ranks are a permutation (the kernel's ballot ranks publish exactly one theta).
MSA_TOPK_HD int coop_bound_owner(const float* sg, int m) {
  int owner = -1;
  for (int e = 0; e < kCoopGroups; ++e) {
    if (coop_rank_of(sg, e) == m - 1) {
      if (owner >= 0) return -1;
      owner = e;
    }
  }
  return owner;
}

// Candidate test against the bound.
MSA_TOPK_HD bool coop_is_candidate(float x, float theta) { return theta > -INFINITY ? x >= theta : x > -INFINITY; }

// Block held as value j by thread i of a row of R threads, and the supergroup of thread i.
MSA_TOPK_HD int coop_block(int i, int j, int threads_per_row) { return i + threads_per_row * j; }
MSA_TOPK_HD int coop_group(int i) { return i % kCoopGroups; }

// tcoop layout (topk_tcoop_core.cuh; G = 1, R = 256, clusters of kTcoopRows CTAs = that many consecutive tokens):
// the thread of (row r, supergroup e) in cluster rank c loads value j = block tcoop_load_block(c, e, j) of row r and
// stores it into row r's CTA as thread tcoop_owner_thread(c, e)'s value j; so that thread holds tcoop_block(i, j).
constexpr int kTcoopRows = 8;                             // CTAs (= rows, consecutive tokens) per cluster
constexpr int kTcoopSlice = kCoopRowBlocks / kTcoopRows;  // blocks each CTA loads for all the cluster's rows
MSA_TOPK_HD int tcoop_load_block(int c, int e, int j) { return kTcoopSlice * c + e + kCoopGroups * j; }
MSA_TOPK_HD int tcoop_owner_thread(int c, int e) { return kCoopGroups * c + e; }
static_assert(kCoopGroups == 32, "tcoop_block: thread i = 32 c + e");
MSA_TOPK_HD int tcoop_block(int i, int j) { return tcoop_load_block(i >> 5, i & 31, j); }

#ifdef __CUDACC__
// Warp `warp` ranks the supergroups e = warp / G + (W / G) k (k < 32 G / W) of row warp % G, whose maxima over the row
// its lanes hold in sj (lane j: supergroup j): the rank of e is the popcount of the lanes ordered before it, and the
// one (row, e) of rank m - 1 writes the row's bound to *theta. No atomics (session 7's shared-atomic partial ranks,
// W adds per address, took ~0.6 us at G2W16 on the H200 timeline).
template <int G, int W>
__device__ __forceinline__ void coop_rank_bound(float sj, int warp, int lane, int m, float* theta) {
  constexpr int EW = kCoopGroups * G / W;  // supergroups ranked per warp
  static_assert(EW >= 1 && (kCoopGroups * G) % W == 0 && W % G == 0, "coop bound split");
#pragma unroll
  for (int k = 0; k < EW; ++k) {
    const int e = warp / G + (W / G) * k;
    const float y = __shfl_sync(0xFFFFFFFFu, sj, e);
    const unsigned before = __ballot_sync(0xFFFFFFFFu, coop_before(sj, lane, y, e));
    if (lane == 0 && __popc(before) == m - 1) *theta = y;
  }
}

template <int G, int R>
struct CoopSmem {
  float tmax[G][R];             // thread maxima
  float theta[G];               // the rows' bounds
  alignas(16) Comp cand[G][kCoopCap];  // candidates: make_comp(score_key(value), block); read in pairs
  int kept[G][kCoopMaxM];       // kept block indices (list order)
  int cnt[G];
};

// Ranks of a warp's entries x0 = list[lane] and x1 = list[lane + 32] among list[0, n), 32 < n <= 64: the number of
// greater entries, read two at a time (16-byte broadcast loads), four pairs per trip so that a trip's loads are in
// flight together, with four independent counts per rank (one running count is a chain of dependent adds). Entries
// past n are read (list has room for 64) and masked.
__device__ __forceinline__ void warp_pair_ranks(const Comp* list, int n, Comp x0, Comp x1, int* r0, int* r1) {
  const ulonglong2* pairs = reinterpret_cast<const ulonglong2*>(list);
  int c0[4] = {0, 0, 0, 0}, c1[4] = {0, 0, 0, 0};
  for (int j = 0; j < n; j += 8) {
    ulonglong2 y[4];
#pragma unroll
    for (int k = 0; k < 4; ++k) y[k] = pairs[j / 2 + k];
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const bool l0 = j + 2 * k < n, l1 = j + 2 * k + 1 < n;
      c0[k] += (l0 && y[k].x > x0 ? 1 : 0) + (l1 && y[k].y > x0 ? 1 : 0);
      c1[k] += (l0 && y[k].x > x1 ? 1 : 0) + (l1 && y[k].y > x1 ? 1 : 0);
    }
  }
  *r0 = (c0[0] + c0[1]) + (c0[2] + c0[3]);
  *r1 = (c1[0] + c1[1]) + (c1[2] + c1[3]);
}

// A row's owner warp, n <= kCoopCap candidates in list (any order): ranks by composite (value descending, then
// block ascending) against the whole list -- lane l holds entry l (n <= 32, the usual case: the loop unrolled) or
// entries l and l + 32; the partners are read two at a time (16-byte broadcast loads), four pairs per trip, so the
// loads of a trip are in flight together (a one-entry loop was ~16 ns per entry, H200 timeline). Entries are
// distinct, so exactly min(n, M) have rank < M: emit(i, block) for each, i = its place among them in list order
// (by ballot). Returns nsel.
template <class Emit>
__device__ __forceinline__ int coop_rank_emit(const Comp* list, int n, int m, const Emit& emit, int lane) {
  const unsigned full = 0xFFFFFFFFu;
  const ulonglong2* pairs = reinterpret_cast<const ulonglong2*>(list);
  const unsigned below = (1u << lane) - 1u;
  if (n <= 32) {  // the usual case (~19 candidates at M = 15): one entry per lane, half the compares, unrolled
    const Comp x0 = lane < n ? list[lane] : 0;
    int r0 = 0;
#pragma unroll
    for (int j = 0; j < 32; j += 8) {
      if (j < n) {
        ulonglong2 y[4];
#pragma unroll
        for (int k = 0; k < 4; ++k) y[k] = pairs[j / 2 + k];  // entries past n: stale or unset, masked below
#pragma unroll
        for (int k = 0; k < 4; ++k)
          r0 += (j + 2 * k < n && y[k].x > x0 ? 1 : 0) + (j + 2 * k + 1 < n && y[k].y > x0 ? 1 : 0);
      }
    }
    const bool k0 = lane < n && r0 < m;
    const unsigned b0 = __ballot_sync(full, k0);
    if (k0) emit(__popc(b0 & below), static_cast<int>(comp_idx(x0)));
    return n < m ? n : m;
  }
  const Comp x0 = lane < n ? list[lane] : 0, x1 = lane + 32 < n ? list[lane + 32] : 0;
  int r0, r1;
  warp_pair_ranks(list, n, x0, x1, &r0, &r1);
  const bool k0 = lane < n && r0 < m, k1 = lane + 32 < n && r1 < m;
  const unsigned b0 = __ballot_sync(full, k0), b1 = __ballot_sync(full, k1);
  if (k0) emit(__popc(b0 & below), static_cast<int>(comp_idx(x0)));
  if (k1) emit(__popc(b0) + __popc(b1 & below), static_cast<int>(comp_idx(x1)));
  return n < m ? n : m;
}

// coop_rank_emit into kept[0 .. nsel) (list order).
__device__ __forceinline__ int coop_rank_kept(const Comp* list, int n, int m, int* kept, int lane) {
  const int nsel = coop_rank_emit(list, n, m, [&](int i, int b) { kept[i] = b; }, lane);
  __syncwarp();
  return nsel;
}

// The nsel <= kCoopMaxM kept block indices (kept[0 .. nsel), any order) written ascending at orow[lo ..): each
// index's slot = the kept indices below it (shuffles).
__device__ __forceinline__ void coop_write_kept(const int* kept, int nsel, int32_t* orow_lo, int lane) {
  const int mine = lane < nsel ? kept[lane] : INT32_MAX;
  int pos[4] = {0, 0, 0, 0};  // four independent counts: the compares are not one dependent chain
#pragma unroll
  for (int j = 0; j < kCoopMaxM; ++j) pos[j & 3] += __shfl_sync(0xFFFFFFFFu, mine, j) < mine ? 1 : 0;
  if (lane < nsel) orow_lo[(pos[0] + pos[1]) + (pos[2] + pos[3])] = mine;
}

// The selection once a thread holds its V values: v[j] = the raw value (NaN allowed; past K or token past q: -inf)
// of block coop_block(i, j, R), or tcoop_block(i, j) with kTLayout -- either way thread i's blocks lie in
// supergroup i % 32; nvp = the row's valid block count (0 for a token past q). T: the net fallback re-reads the row.
template <typename T, int G, int W, bool kTLayout = false>
__device__ __forceinline__ void coop_select_loaded(const NetParams& p, CoopSmem<G, 32 * W / G>& sm,
                                                   float (&v)[kCoopRowBlocks / (32 * W / G)], int nvp) {
  constexpr int R = 32 * W / G;           // threads per row
  constexpr int V = kCoopRowBlocks / R;   // values per thread
  constexpr int S = R / kCoopGroups;      // threads per supergroup
  constexpr int U = 32 / G;               // lanes of a row in one warp
  static_assert(G >= 1 && G <= W && 32 % G == 0 && S >= 1 && R * V == kCoopRowBlocks, "coop layout");
  static_assert(!kTLayout || (G == 1 && R == 256), "tcoop layout: one row of 256 threads");
  const unsigned full = 0xFFFFFFFFu;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int g = lane % G, u = lane / G;
  const int i = warp * U + u;
  const int h = blockIdx.y;
  const int m = p.m;
  const auto block_of = [&](int j) { return kTLayout ? tcoop_block(i, j) : coop_block(i, j, R); };  // value j's block
  if (tid < G) sm.cnt[tid] = 0;
  float theta = -INFINITY;
  if (m > 0) {
    const RowRange rr = row_range(nvp, p.n_blocks, p.fb, p.fe);
    float mx = -INFINITY;
#pragma unroll
    for (int j = 0; j < V; ++j) {
      const int b = block_of(j);
      v[j] = b >= rr.lo && b < rr.hi ? fmaxf(v[j], -INFINITY) : -INFINITY;  // NaN -> -inf
      mx = fmaxf(mx, v[j]);
    }
    net_stamp(p, kNtLanded, mx);
    sm.tmax[g][i] = mx;
    __syncthreads();
    // The bound: row rw = warp % G's supergroup maxima (lane j: supergroup j, over its S thread maxima), ranked.
    {
      const int rw = warp % G;
      float sj = sm.tmax[rw][lane];
#pragma unroll
      for (int s2 = 1; s2 < S; ++s2) sj = fmaxf(sj, sm.tmax[rw][lane + kCoopGroups * s2]);
      coop_rank_bound<G, W>(sj, warp, lane, m, &sm.theta[rw]);
    }
    __syncthreads();
    theta = sm.theta[g];
    net_stamp(p, kNtBound, theta);
    if constexpr (G == 1) {  // one shared atomic per warp with candidates, slots by ballots (session 18: 1% faster)
      unsigned bj[V];
      int total = 0;
#pragma unroll
      for (int j = 0; j < V; ++j) {
        bj[j] = __ballot_sync(full, coop_is_candidate(v[j], theta));
        total += __popc(bj[j]);
      }
      if (total > 0) {
        int base = 0;
        if (lane == 0) base = atomicAdd(&sm.cnt[0], total);
        base = __shfl_sync(full, base, 0);
        const unsigned below = (1u << lane) - 1u;
#pragma unroll
        for (int j = 0; j < V; ++j) {
          const int pos = base + __popc(bj[j] & below);
          if (((bj[j] >> lane) & 1u) && pos < kCoopCap)
            sm.cand[0][pos] = make_comp(score_key(v[j]), static_cast<uint32_t>(block_of(j)));
          base += __popc(bj[j]);
        }
      }
    } else {  // one shared atomic per thread with candidates
      int c = 0;
#pragma unroll
      for (int j = 0; j < V; ++j) c += coop_is_candidate(v[j], theta) ? 1 : 0;
      if (c > 0) {
        int pos = atomicAdd(&sm.cnt[g], c);
#pragma unroll
        for (int j = 0; j < V; ++j) {
          if (coop_is_candidate(v[j], theta)) {
            if (pos < kCoopCap) sm.cand[g][pos] = make_comp(score_key(v[j]), static_cast<uint32_t>(block_of(j)));
            ++pos;
          }
        }
      }
    }
  }
  __syncthreads();
  net_stamp(p, kNtCandidates, 0.f);
  if (warp >= G) return;
  // Warp `warp` finishes row `warp` (token tw) alone: no further CTA phase. Lane `warp` holds that row's nvp.
  const int64_t tw = static_cast<int64_t>(blockIdx.x) * G + warp;
  const int nvp_w = __shfl_sync(full, nvp, warp);
  if (tw >= p.q) return;
  const RowRange rr = row_range(nvp_w, p.n_blocks, p.fb, p.fe);
  int32_t* orow = p.out + (tw * p.n_heads + h) * p.topk;
  int nsel = 0;
  if (m > 0) {
    const int n = sm.cnt[warp];
    if (n > kCoopCap) {  // heavy ties / adversarial rows: the exact net selection writes the whole row
#ifdef MSA_TOPK_TIMELINE
      NetParams pf = p;
      pf.trace = nullptr;  // the fallback's own stamps would overwrite this CTA's coop stamps (timeline builds)
      net_select_warp<T, 32, 32>(pf, tw);
#else
      net_select_warp<T, 32, 32>(p, tw);
#endif
      return;
    }
    nsel = coop_rank_kept(sm.cand[warp], n, m, sm.kept[warp], lane);
    net_stamp(p, kNtRanked, static_cast<float>(nsel));
    coop_write_kept(sm.kept[warp], nsel, orow + rr.lo, lane);
    net_stamp(p, kNtOrdered, 0.f);
  }
  lane_write_forced<32>(orow, rr, nsel, p.topk, lane);
  net_stamp(p, kNtOut, static_cast<float>(nsel));
}

template <typename T, int G, int W>
__device__ __forceinline__ void coop_select_cta(const NetParams& p, CoopSmem<G, 32 * W / G>& sm) {
  constexpr int R = 32 * W / G;
  constexpr int V = kCoopRowBlocks / R;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane % G;
  const int i = warp * (32 / G) + lane / G;
  const int h = blockIdx.y;
  const int64_t t = static_cast<int64_t>(blockIdx.x) * G + g;
  const bool valid = t < p.q;
  int nvp = valid ? p.nvp_scalar : 0;
  if (p.nvp != nullptr && valid) nvp = __ldg(p.nvp + t);
  net_stamp(p, kNtEntry, 0.f);
  float v[V];
  if (p.m > 0) {  // every load issued before any is used
    const T* src = static_cast<const T*>(p.scores) + (static_cast<int64_t>(h) * p.n_blocks + i) * p.q + (valid ? t : 0);
#pragma unroll
    for (int j = 0; j < V; ++j)
      v[j] = valid && coop_block(i, j, R) < p.n_blocks ? ScoreLoad<T>::load(src + static_cast<int64_t>(R) * j * p.q)
                                                       : -INFINITY;
  }
  coop_select_loaded<T, G, W>(p, sm, v, nvp);
}
#endif

}  // namespace msa_topk
