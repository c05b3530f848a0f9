// "ccoop" path of sparse_topk_select (cluster coop; EXPERIMENTAL: opt-in with MSA_TOPK_PATH=ccoop, not in the
// default plan): the coop layout (topk_coop_core.cuh) with each row's K split over a thread-block cluster, for the
// decode rows of 1024 < K <= 8192 blocks (1M context) that the cluster path serves today at 2.3-2.7x the read
// kernel (session 8). M <= 16.
//
// Why: at 128K decode the coop CTA of 4 rows x 1024 blocks (G4W16) costs ~3.5 us per call on the H200, while the
// cluster path needs 6.6 us for 1M H1 (8 rows x 1024 blocks staged per CTA, a warp per row). Here a cluster of S =
// ceil(K / 1024) CTAs holds G rows: CTA s (cluster rank) the blocks [1024 s, 1024 s + 1024) of each, values in the
// registers of the thread that loaded them (thread i of a row: blocks 1024 s + i + R j, R = 32 W / G threads per row
// and CTA, V = 1024 / R values each), so each CTA does a coop CTA's work plus two cluster exchanges:
//  1. thread maxima -> this slice's 32 supergroup maxima per row (supergroup e = the blocks b = e mod 32, as coop),
//     stored into every CTA of the cluster (DSMEM); cluster barrier. Every CTA then has the row's 32 supergroup
//     maxima (maximum over the slices) and computes the same theta = the M-th largest of them (ballot ranks, as
//     coop): theta <= T, the row's M-th largest value.
//  2. candidates (value >= theta) are appended to the row's owner CTA (cluster rank g for row g: G <= S) with a
//     remote atomicAdd and remote stores of (score key, block) composites; cluster barrier.
//  3. the owner's warp 0 ranks the n <= kCcoopCap candidates (coop_rank_kept) and writes them in block order after
//     the forced head; n > kCcoopCap (heavy ties, adversarial periodic rows): M rounds of the warp's composite
//     maximum below the previous pick over the whole row, read again from global memory (exact, slow, rare).
// No CTA touches another's shared memory after the last cluster barrier, so CTAs exit freely.
// CPU replay with the same helpers: topk_ccoop_emulate.cc.
#pragma once

#include "topk_coop_core.cuh"

#ifdef __CUDACC__
#include <cooperative_groups.h>
#endif

namespace msa_topk {

constexpr int kCcoopMaxSlices = 8;  // portable cluster size: K <= 8 x 1024 blocks
constexpr int kCcoopCap = kCoopCap;

// Block held as value j by thread i (R threads per row and CTA) of slice s.
MSA_TOPK_HD int ccoop_block(int s, int i, int j, int threads_per_row) {
  return s * kCoopRowBlocks + coop_block(i, j, threads_per_row);
}

// The fallback's pick: the largest composite below `prev` among the row's selectable blocks (0: none). Host replay
// and kernel share it through score(b) (the row's value of block b, NaN allowed).
template <class Score>
MSA_TOPK_HD Comp ccoop_best_below(const Score& score, int lo, int hi, int first, int step, Comp prev) {
  Comp best = 0;
  for (int b = lo + first; b < hi; b += step) {
    const float x = score(b);
    if (x > -INFINITY) {  // NaN compares false: NaN is -inf, never selected
      const Comp c = make_comp(score_key(x), static_cast<uint32_t>(b));
      if (c < prev && c > best) best = c;
    }
  }
  return best;
}

// CPU replays (ccoop, pool): the blocks of the list entries of rank < m by composite, in list order, to kept[0 .. m);
// returns their count, or -1 when that is not min(n, m) (the composites must be distinct).
MSA_TOPK_HD int replay_rank_kept(const Comp* list, int n, int m, int* kept) {
  int nsel = 0;
  for (int c = 0; c < n; ++c) {
    int r = 0;
    for (int j = 0; j < n; ++j) r += list[j] > list[c] ? 1 : 0;
    if (r < m) {
      if (nsel < m) kept[nsel] = static_cast<int>(comp_idx(list[c]));  // kept has room for m
      ++nsel;
    }
  }
  return nsel == (n < m ? n : m) ? nsel : -1;
}

// CPU replays (ccoop, pool): the exact fallback, m rounds of ccoop_best_below over the row's blocks [lo, hi) (what the
// warp's 32 lanes reduce), kept[] in pick order; returns the count.
template <class Score>
MSA_TOPK_HD int replay_rounds_below(const Score& score, int lo, int hi, int m, int* kept) {
  Comp prev = ~Comp(0);
  int nsel = 0;
  for (; nsel < m; ++nsel) {
    const Comp best = ccoop_best_below(score, lo, hi, 0, 1, prev);
    if (best == 0) break;
    kept[nsel] = static_cast<int>(comp_idx(best));
    prev = best;
  }
  return nsel;
}

#ifdef __CUDACC__
// ccoop_best_below(score, lo, hi, lane, 32, prev) on the device, eight loads in flight per lane (one at a time, every
// round of the fallback was a chain of K / 32 dependent load latencies: ~350 us for one row at K = 8192, H200).
template <typename T>
__device__ __forceinline__ Comp warp_best_below(const T* row, int64_t q, int lo, int hi, int lane, Comp prev) {
  constexpr int kU = 8;
  Comp best = 0;
  for (int b0 = lo + lane; b0 < hi; b0 += 32 * kU) {
    float x[kU];
#pragma unroll
    for (int u = 0; u < kU; ++u) {
      const int b = b0 + 32 * u;
      x[u] = b < hi ? ScoreLoad<T>::load(row + static_cast<int64_t>(b) * q) : -INFINITY;
    }
#pragma unroll
    for (int u = 0; u < kU; ++u) {
      if (x[u] > -INFINITY) {  // NaN compares false: NaN is -inf, never selected
        const Comp c = make_comp(score_key(x[u]), static_cast<uint32_t>(b0 + 32 * u));
        if (c < prev && c > best) best = c;
      }
    }
  }
  return best;
}

// The exact fallback of ccoop and pool (heavy ties, adversarial rows): M rounds of the warp's best composite below the
// previous pick over row (h, t) of max_score, read from global memory; kept[0 .. nsel) in pick order. Returns nsel.
template <typename T>
__device__ __forceinline__ int warp_rounds_select(const NetParams& p, int h, int64_t t, const RowRange& rr, int* kept,
                                                  int lane) {
  const T* row = static_cast<const T*>(p.scores) + static_cast<int64_t>(h) * p.n_blocks * p.q + t;
  Comp prev = ~Comp(0);
  int nsel = 0;
  for (; nsel < p.m; ++nsel) {
    Comp best = warp_best_below<T>(row, p.q, rr.lo, rr.hi, lane, prev);
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      const Comp y = __shfl_xor_sync(0xFFFFFFFFu, best, o);
      best = y > best ? y : best;
    }
    if (best == 0) break;  // fewer than M selectable blocks
    if (lane == 0) kept[nsel] = static_cast<int>(comp_idx(best));
    prev = best;
  }
  __syncwarp();
  return nsel;
}

template <int G, int R>
struct CcoopSmem {
  float tmax[G][R];                              // thread maxima
  float sgx[kCcoopMaxSlices][G][kCoopGroups];    // slice d's supergroup maxima of row g (stored by slice d)
  float theta[G];                                // the rows' bounds
  alignas(16) Comp cand[G][kCcoopCap];           // row g's candidates, in its owner (cluster rank g)
  int kept[G][kCoopMaxM];
  int cnt[G];
};

template <typename T, int G, int W>
__device__ __forceinline__ void ccoop_select_cta(const NetParams& p, CcoopSmem<G, 32 * W / G>& sm) {
  namespace cg = cooperative_groups;
  cg::cluster_group cluster = cg::this_cluster();
  constexpr int R = 32 * W / G;          // threads per row and CTA
  constexpr int V = kCoopRowBlocks / R;  // values per thread
  constexpr int ST = R / kCoopGroups;    // threads per supergroup and CTA
  constexpr int U = 32 / G;              // lanes of a row in one warp
  constexpr int EW = kCoopGroups * G / W;  // supergroups ranked per warp
  static_assert(G >= 1 && G <= W && 32 % G == 0 && W % G == 0 && ST >= 1 && R * V == kCoopRowBlocks &&
                    EW >= 1 && (kCoopGroups * G) % W == 0,
                "ccoop layout");
  const unsigned full = 0xFFFFFFFFu;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int g = lane % G, u = lane / G;
  const int i = warp * U + u;
  const int s = static_cast<int>(cluster.block_rank());  // == blockIdx.x: cluster dims (S, 1, 1), grid.x == S
  const int S = static_cast<int>(cluster.num_blocks());
  const int h = blockIdx.z;
  const int64_t t = static_cast<int64_t>(blockIdx.y) * G + g;
  const bool valid = t < p.q;
  const int m = p.m;
  int nvp = valid ? p.nvp_scalar : 0;
  if (p.nvp != nullptr && valid) nvp = __ldg(p.nvp + t);
  // Phase 0 of the cluster barrier: arrived now, waited on before the first remote store (every CTA of the
  // cluster has started by then; relaxed: it orders nothing).
  asm volatile("barrier.cluster.arrive.relaxed.aligned;" ::: "memory");
  float v[V];
  if (m > 0) {  // every load issued before any is used
    const T* src = static_cast<const T*>(p.scores) +
                   (static_cast<int64_t>(h) * p.n_blocks + ccoop_block(s, i, 0, R)) * p.q + (valid ? t : 0);
#pragma unroll
    for (int j = 0; j < V; ++j)
      v[j] = valid && ccoop_block(s, i, j, R) < p.n_blocks
                 ? ScoreLoad<T>::load(src + static_cast<int64_t>(R) * j * p.q)
                 : -INFINITY;
  }
  if (tid < G) sm.cnt[tid] = 0;  // before barrier 1: remote appends come after it
  if (m > 0) {
    const RowRange rr = row_range(nvp, p.n_blocks, p.fb, p.fe);
    float mx = -INFINITY;
#pragma unroll
    for (int j = 0; j < V; ++j) {
      const int b = ccoop_block(s, i, j, R);
      v[j] = b >= rr.lo && b < rr.hi ? fmaxf(v[j], -INFINITY) : -INFINITY;  // NaN -> -inf
      mx = fmaxf(mx, v[j]);
    }
    sm.tmax[g][i] = mx;
    __syncthreads();
  }
  asm volatile("barrier.cluster.wait.aligned;" ::: "memory");  // phase 0
  if (m > 0 && warp < G) {
    // Warp w: row w's supergroup maxima over this slice (lane j: supergroup j), into every CTA's sgx[s][w].
    float sj = sm.tmax[warp][lane];
#pragma unroll
    for (int s2 = 1; s2 < ST; ++s2) sj = fmaxf(sj, sm.tmax[warp][lane + kCoopGroups * s2]);
    for (int d = 0; d < S; ++d) *cluster.map_shared_rank(&sm.sgx[s][warp][lane], d) = sj;
  }
  cluster.sync();  // phase 1: every slice's supergroup maxima are in every CTA
  if (m > 0) {
    {
      // The bound of row rw = warp % G over every slice's supergroup maxima, ranked as in coop.
      const int rw = warp % G;
      float sj = sm.sgx[0][rw][lane];
      for (int d = 1; d < S; ++d) sj = fmaxf(sj, sm.sgx[d][rw][lane]);
      coop_rank_bound<G, W>(sj, warp, lane, m, &sm.theta[rw]);
    }
    __syncthreads();
    const float theta = sm.theta[g];
    int c = 0;
#pragma unroll
    for (int j = 0; j < V; ++j) c += coop_is_candidate(v[j], theta) ? 1 : 0;
    if (c > 0) {  // append to the row's owner (cluster rank g)
      int pos = atomicAdd(cluster.map_shared_rank(&sm.cnt[g], g), c);
      Comp* dst = cluster.map_shared_rank(&sm.cand[g][0], g);
#pragma unroll
      for (int j = 0; j < V; ++j) {
        if (coop_is_candidate(v[j], theta)) {
          if (pos < kCcoopCap) dst[pos] = make_comp(score_key(v[j]), static_cast<uint32_t>(ccoop_block(s, i, j, R)));
          ++pos;
        }
      }
    }
  }
  cluster.sync();  // phase 2: every candidate is in its owner; nothing remote after this
  if (s >= G || warp != 0) return;
  // Warp 0 of cluster rank s finishes row s (token tw); lane s holds that row's nvp (g = lane % G).
  const int64_t tw = static_cast<int64_t>(blockIdx.y) * G + s;
  const int nvp_w = __shfl_sync(full, nvp, s);
  if (tw >= p.q) return;
  const RowRange rr = row_range(nvp_w, p.n_blocks, p.fb, p.fe);
  int32_t* orow = p.out + (tw * p.n_heads + h) * p.topk;
  int nsel = 0;
  if (m > 0) {
    const int n = sm.cnt[s];
    if (n <= kCcoopCap) {
      nsel = coop_rank_kept(sm.cand[s], n, m, sm.kept[s], lane);
    } else {  // exact fallback: M rounds of the warp's best composite below the previous pick
      nsel = warp_rounds_select<T>(p, h, tw, rr, sm.kept[s], lane);
    }
    coop_write_kept(sm.kept[s], nsel, orow + rr.lo, lane);
  }
  lane_write_forced<32>(orow, rr, nsel, p.topk, lane);
}
#endif

}  // namespace msa_topk
