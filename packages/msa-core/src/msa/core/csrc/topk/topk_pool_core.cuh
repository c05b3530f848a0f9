// "pool" path of sparse_topk_select: two launches for decode rows of 1024 < K <= 16384 blocks (256K-2M context),
// M <= 16.
//
// Why: the one-launch decode paths hold a row on one SM (coop / tcoop) or on one cluster of <= 8 SMs (ccoop,
// cluster), so at 1M context (8192 blocks) each SM requests its 1024 x 8-token slices as scattered 32-byte sectors
// and the selection waits on cluster exchanges: 1M q64 H4 (cluster path) 10.5 us per call against 4.2 us for one
// read of the tensor (H200, session 19). Here the read is the read kernel's (whole 128-byte lines of 32 tokens,
// every SM busy) and the selection then reads ~20 groups of 16 blocks per row from L2.
//  1. max-pool launch (pool_max_cta): a warp = 32 consecutive tokens (lane = token) x one group of kPoolGroup
//     consecutive blocks of one head; each load instruction reads one contiguous line of a K-row. The group maximum
//     (outside [lo, hi) and NaN are -inf) goes to gmax[h * q + t][group], through shared memory so that a token's W
//     group maxima are stored together (one 32-byte sector at W = 8; 32 scattered 4-byte stores per warp measured
//     +1 us at 1M q64 H4). Rows are padded to 32 J groups (-inf past K), J a power of two.
//  2. select launch. Up to 256 rows: the CTA form (pool_select_cta, below: the same bound and candidates, one group
//     per thread, a row per CTA), a programmatic dependent launch that launch 1 signals at entry (its CTAs resident
//     and waiting in griddepcontrol.wait when launch 1 ends). More rows: the warp form (pool_select_warp), a warp per
//     row, plain launch (early-resident CTAs cost there: 1M q128 H4 11.9 -> 12.5 us with 4 rows per CTA):
//     - the row's group maxima, lane l holding groups l + 32 i (interleaved, so a run of good neighbouring groups --
//       correlated scores, the recent blocks -- spreads over lanes, as coop's supergroups);
//     - bound: theta = the M-th largest of the 32 lane maxima (keys floored to 32 ulps, so ties by lane are free):
//       M lanes hold a block >= theta, so theta <= T, the row's M-th largest value;
//     - candidate groups: group maximum >= theta (every block >= theta lies in one). More than kPoolGroupCap:
//       theta = the exact M-th largest group maximum (warp_kth_key; still <= T), so only ties exceed the cap;
//     - lane c reads candidate group c whole from max_score (16 sectors, L2-resident after launch 1); its values
//       >= theta are appended (pool_append); more than kPoolCap: theta = their exact M-th largest (= T);
//     - the <= kPoolCap candidates are ranked (coop_rank_emit) and written after the forced head: the list is in
//       block order (candidate groups compacted in ascending order, each group's values ascending), so a kept
//       entry's output slot is its place among the kept ones in the list (one ballot; no ordering step);
//     - ties that defeat both refinements (dozens of equal group maxima or candidates): M rounds of the warp's
//       composite maximum below the previous pick over the whole row (warp_rounds_select; exact, slow).
// CPU replay with the same helpers (both forms): topk_pool_emulate.cc.
#pragma once

#include "topk_ccoop_core.cuh"

namespace msa_topk {

constexpr int kPoolGroup = 16;        // blocks per group (one maximum)
constexpr int kPoolGroupCap = 32;     // candidate groups per row (one per lane of the select warp)
constexpr int kPoolCap = kCoopCap;    // candidates ranked per row (coop_rank_kept: <= 64)
constexpr int kPoolMaxLaneGroups = 32;  // groups per lane: K <= 32 * 32 * kPoolGroup = 16384 blocks
constexpr int kPoolSpecGroups = 2;      // CTA form: groups per warp whose loads are speculated
constexpr int kPoolCtaRankCap = 256;    // CTA form: candidates ranked by every thread (more: by their M-th largest)
constexpr int kPoolCtaCap = 1024;       // CTA form: candidates per row (more: the warp form)

MSA_TOPK_HD int pool_groups(int n_blocks) { return (n_blocks + kPoolGroup - 1) / kPoolGroup; }
// Group maxima per lane of the select warp (a power of two >= 4) and per row (32 J: groups past K are -inf, so the
// select warp loads without bounds checks).
MSA_TOPK_HD int pool_lane_groups(int n_blocks) {
  int j = 4;
  while (32 * j < pool_groups(n_blocks)) j *= 2;
  return j;
}
MSA_TOPK_HD int pool_row_groups(int n_blocks) { return 32 * pool_lane_groups(n_blocks); }

// Group held as value i by lane l of the select warp.
MSA_TOPK_HD int pool_lane_group(int lane, int i) { return lane + 32 * i; }

// The bound's key of a lane maximum x (never NaN): the order-preserving key of x with its low 5 bits replaced by the
// lane's (31 - lane), so the 32 keys are distinct and order by value, then lane ascending, up to the low key bits.
MSA_TOPK_HD uint32_t pool_lane_key(float x, int lane) {
  return (score_key(x) & ~31u) | static_cast<uint32_t>(31 - lane);
}

// The float of an order-preserving key (score_key's inverse).
MSA_TOPK_HD float pool_key_value(uint32_t k) { return bits_float(k & 0x80000000u ? k ^ 0x80000000u : ~k); }

// The float of a bound key with its low 5 bits cleared: <= the value of every key >= it. The owner's maximum x caps
// it (a key at or below -inf's decodes to a NaN pattern, and fminf returns the other operand then).
MSA_TOPK_HD float pool_key_floor(uint32_t key, float x) { return fminf(pool_key_value(key & ~31u), x); }

// Key for the exact k-th largest searches: 0 for -inf (never counted), score_key otherwise.
MSA_TOPK_HD uint32_t pool_count_key(float x) { return x > -INFINITY ? score_key(x) : 0u; }

// theta from an exact k-th largest key (0: fewer than k values > -inf).
MSA_TOPK_HD float pool_theta_of_key(uint32_t k) { return k != 0u ? pool_key_value(k) : -INFINITY; }

#ifdef __CUDACC__
struct PoolParams {
  NetParams p;
  float* gmax;   // [H * q, n_groups] group maxima (workspace): row h * q + t
  int n_groups;  // pool_row_groups(K): groups per row, the last ones past K (-inf)
  int trigger;   // programmatic dependent launch of the select launch: 0 none, 1 launch 1 signals at entry, 2 after
                 // its stores
};

__device__ __forceinline__ void pool_launch_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

// Launch 2's wait for launch 1 (a no-op when it was not launched as a programmatic dependent).
__device__ __forceinline__ void pool_wait_primary() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

// Launch 1, one CTA of W warps: groups gi0 + w of head h for tokens 32 y + lane (warp w, lane).
template <typename T, int W>
__device__ __forceinline__ void pool_max_cta(const PoolParams& pp, int gi0, int y, int h, float (&tile)[32][W + 1]) {
  const NetParams& p = pp.p;
  if (pp.trigger == 1) pool_launch_dependents();
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t t = static_cast<int64_t>(y) * 32 + lane;
  const int gi = gi0 + warp;
  const bool valid = t < p.q && gi < pp.n_groups;
  const int b0 = gi * kPoolGroup;
  float v[kPoolGroup];
  lane_load_scores<T, kPoolGroup>(p.scores, p.n_blocks, p.q, h, t, valid, b0, v);
  int nvp = p.nvp_scalar;
  if (p.nvp != nullptr && valid) nvp = __ldg(p.nvp + t);
  lane_mask_scores<kPoolGroup>(v, b0, row_range(nvp, p.n_blocks, p.fb, p.fe));
  float mx = v[0];
#pragma unroll
  for (int j = 1; j < kPoolGroup; ++j) mx = fmaxf(mx, v[j]);
  tile[lane][warp] = mx;
  __syncthreads();
  const int tt = threadIdx.x / W, w = threadIdx.x % W;  // token tt's maximum of group gi0 + w
  const int64_t to = static_cast<int64_t>(y) * 32 + tt;
  if (to < p.q && gi0 + w < pp.n_groups) pp.gmax[(static_cast<int64_t>(h) * p.q + to) * pp.n_groups + gi0 + w] = tile[tt][w];
  if (pp.trigger == 2) pool_launch_dependents();
}

struct PoolWarpSmem {
  int groups[kPoolGroupCap];
  alignas(16) Comp cand[kPoolCap];
  int kept[kCoopMaxM];
};

// The bound from the 32 lane maxima mx (one per lane, never NaN): the key of rank m - 1 among the distinct lane keys,
// floored -- M lanes hold a block >= it (m <= 32: exactly one lane has that rank).
__device__ __forceinline__ float pool_lane_bound(float mx, int m, int lane) {
  const unsigned full = 0xFFFFFFFFu;
  const uint32_t key = pool_lane_key(mx, lane);
  int rank = 0;
#pragma unroll
  for (int o = 0; o < 32; ++o) rank += __shfl_sync(full, key, o) > key ? 1 : 0;
  const int owner = __ffs(__ballot_sync(full, rank == m - 1)) - 1;
  return pool_key_floor(__shfl_sync(full, key, owner), __shfl_sync(full, mx, owner));
}

// The k-th largest of the warp's keys (N per lane, 0 = none, counted with multiplicity): the largest c with
// #(keys >= c) >= k, bit by bit from the top; 0 when fewer than k keys are nonzero.
template <int N>
__device__ __forceinline__ uint32_t warp_kth_key(const uint32_t (&key)[N], int k) {
  uint32_t res = 0;
#pragma unroll 1
  for (int bit = 31; bit >= 0; --bit) {
    const uint32_t c = res | (1u << bit);
    int cnt = 0;
#pragma unroll
    for (int i = 0; i < N; ++i) cnt += key[i] >= c ? 1 : 0;
    if (static_cast<int>(__reduce_add_sync(0xFFFFFFFFu, static_cast<unsigned>(cnt))) >= k) res = c;
  }
  return res;
}

// Appends this lane's values >= theta among v[0 .. N) (blocks b0 + j) to sm.cand at warp-scanned positions (entries
// past kPoolCap are not stored); returns the warp's total.
template <int N>
__device__ __forceinline__ int pool_append(const float (&v)[N], int b0, float theta, PoolWarpSmem& sm, int lane) {
  const unsigned full = 0xFFFFFFFFu;
  unsigned cmask = 0;
#pragma unroll
  for (int j = 0; j < N; ++j) cmask |= coop_is_candidate(v[j], theta) ? 1u << j : 0u;
  const int cnt = __popc(cmask);
  const int incl = lane_seg_scan<32>(cnt, lane, full);
  int pos = incl - cnt;
#pragma unroll
  for (int j = 0; j < N; ++j) {
    if ((cmask >> j) & 1u) {
      if (pos < kPoolCap) sm.cand[pos] = make_comp(score_key(v[j]), static_cast<uint32_t>(b0 + j));
      ++pos;
    }
  }
  __syncwarp();
  return __shfl_sync(full, incl, 31);
}

// Candidates from this lane's values v (blocks b0 + j; every value >= the current theta is among the warp's): appended,
// and when more than kPoolCap, theta = their exact M-th largest and appended again. Returns the count (> kPoolCap:
// ties).
template <int N>
__device__ __forceinline__ int pool_candidates(const float (&v)[N], int b0, float theta, int m, PoolWarpSmem& sm,
                                               int lane) {
  int n = pool_append<N>(v, b0, theta, sm, lane);
  if (n > kPoolCap) {
    uint32_t key[N];
#pragma unroll
    for (int j = 0; j < N; ++j) key[j] = coop_is_candidate(v[j], theta) ? pool_count_key(v[j]) : 0u;
    n = pool_append<N>(v, b0, pool_theta_of_key(warp_kth_key<N>(key, m)), sm, lane);
  }
  return n;
}

// Launch 2, one warp: row (token t, head h). J group maxima per lane (pp.n_groups == 32 J).
template <typename T, int J>
__device__ __forceinline__ void pool_select_warp(const PoolParams& pp, int64_t t, int h, PoolWarpSmem& sm) {
  const NetParams& p = pp.p;
  const unsigned full = 0xFFFFFFFFu;
  const int lane = threadIdx.x & 31;
  const unsigned below = (1u << lane) - 1u;
  int nvp = p.nvp_scalar;
  if (p.nvp != nullptr) nvp = __ldg(p.nvp + t);
  const RowRange rr = row_range(nvp, p.n_blocks, p.fb, p.fe);
  int32_t* orow = p.out + (t * p.n_heads + h) * p.topk;
  const int m = p.m;
  int nsel = 0;
  if (m > 0) {
    pool_wait_primary();
    const float* grow = pp.gmax + (static_cast<int64_t>(h) * p.q + t) * (32 * J) + lane;
    float gm[J];
#pragma unroll
    for (int i = 0; i < J; ++i) gm[i] = __ldcg(grow + 32 * i);  // group pool_lane_group(lane, i)
    float mx = gm[0];
#pragma unroll
    for (int i = 1; i < J; ++i) mx = fmaxf(mx, gm[i]);
    float theta = pool_lane_bound(mx, m, lane);  // M lanes hold a block >= theta
    unsigned bg[J];  // bit l of bg[i]: group pool_lane_group(l, i) is a candidate group
    int ng = 0;
#pragma unroll
    for (int i = 0; i < J; ++i) {
      bg[i] = __ballot_sync(full, coop_is_candidate(gm[i], theta));
      ng += __popc(bg[i]);
    }
    if (ng > kPoolGroupCap) {  // theta = the exact M-th largest group maximum: M groups (+ ties) pass
      uint32_t gk[J];
#pragma unroll
      for (int i = 0; i < J; ++i) gk[i] = pool_count_key(gm[i]);
      theta = pool_theta_of_key(warp_kth_key<J>(gk, m));
      ng = 0;
#pragma unroll
      for (int i = 0; i < J; ++i) {
        bg[i] = __ballot_sync(full, coop_is_candidate(gm[i], theta));
        ng += __popc(bg[i]);
      }
    }
    int n = kPoolCap + 1;  // > kPoolCap: the rounds fallback
    if (ng <= kPoolGroupCap) {  // lane c reads candidate group c whole
      int base = 0;
#pragma unroll
      for (int i = 0; i < J; ++i) {
        if ((bg[i] >> lane) & 1u) sm.groups[base + __popc(bg[i] & below)] = pool_lane_group(lane, i);
        base += __popc(bg[i]);
      }
      __syncwarp();
      const int b0 = lane < ng ? sm.groups[lane] * kPoolGroup : 0;
      float v[kPoolGroup];
      lane_load_scores<T, kPoolGroup>(p.scores, p.n_blocks, p.q, h, t, lane < ng, b0, v);
      lane_mask_scores<kPoolGroup>(v, b0, rr);
      n = pool_candidates<kPoolGroup>(v, b0, theta, m, sm, lane);
    }
    if (n <= kPoolCap) {  // the list is in block order (groups ascending, then blocks): kept i goes to slot lo + i
      int32_t* orow_lo = orow + rr.lo;
      nsel = coop_rank_emit(sm.cand, n, m, [&](int i, int b) { orow_lo[i] = b; }, lane);
    } else {
      nsel = warp_rounds_select<T>(p, h, t, rr, sm.kept, lane);
      coop_write_kept(sm.kept, nsel, orow + rr.lo, lane);
    }
  }
  lane_write_forced<32>(orow, rr, nsel, p.topk, lane);
}

// Launch 2, CTA form (<= 256 rows, K > 2048): one row per CTA of 32 J threads, thread i holding group i = lane + 32
// warp -- the warp form's lane l holds the same groups, so the bound and the candidate groups are the same, but each
// step is one value per thread instead of a loop over J per lane. H200 session 20 run 10, us per call against the
// warp form (4 rows per CTA, both dependent): 1M q64 H4 8.88 -> 8.25, H2 6.94 -> 6.23, q32 H4 6.83 -> 6.15; 512K q64
// H4 6.90 -> 6.43; 1M q64 H4 with 40 / 100 good recent blocks 9.47 -> 8.60 / 13.21 -> 8.85; 2M q64 H1 7.30 -> 7.25;
// but smooth rows (a random walk of small steps) 13.1 -> 14.1.
//   - speculative gather: first each warp starts loading its kPoolSpecGroups best groups (a group's 16 blocks over
//     16 lanes), in flight across the barrier and the bound; a warp's candidate groups are its best ones, so the
//     loads are wasted only where a group is below theta. Four speculated groups were slower (a load of 32 scattered
//     sectors costs the SM's L1 32 wavefronts: 8.42 -> 8.98 us at 1M q64 H4);
//   - the 32 lane maxima through shared memory (one barrier); every warp ranks them itself (no second barrier). No
//     group refinement: the warp form's, done by every warp, cost 0.5 us at 1M q64 H4 and 1.6 us at 2M H1 (J more
//     registers past the 64 of a 512-thread CTA);
//   - the other candidate groups are listed (one shared atomic per warp, one barrier) and gathered two per warp and
//     round by all warps: a run of good neighbouring groups sits in one warp, whose rounds in turn cost an L2 round
//     trip each (smooth rows 17.0 us before). Groups w + J l instead (neighbours in different warps) were slower on
//     every row: uncoalesced group-maximum loads, 8.46 -> 9.42 us;
//   - values >= theta appended through one shared atomic per warp and round (any order); by their count n: <=
//     kPoolCap ranked by warp 0 (coop_rank_kept); <= kPoolCtaRankCap (a run of good neighbouring blocks) ranked by
//     every thread (one more barrier); <= kPoolCtaCap theta = their exact M-th largest (warp_kth_key in warp 0) and
//     those >= it ranked; written ascending (coop_write_kept);
//   - past that (ties) warp 0 reruns the row in the warp form, with its exact refinements and rounds.
// Many rows lose (1M q128 H4, 512 rows: 11.9 -> 14.3 us), and J = 4 (256K q64 H4: 6.06 -> 6.76): the plan keeps
// the warp form there.
template <int J>
struct PoolCtaSmem {
  float pmax[J][32];
  int groups[32 * J];  // candidate groups past the speculated ones
  int ngroups;
  alignas(16) Comp cand[kPoolCtaCap];
  alignas(16) Comp top[kPoolCap];
  int kept[kCoopMaxM];
  int n;
  PoolWarpSmem warp;
};

// The CTA form's append: this warp's lanes with c set store (v, block b) at positions from one shared atomic on *n
// (entries past kPoolCtaCap are counted, not stored).
__device__ __forceinline__ void pool_cta_append(bool c, float v, int b, Comp* cand, int* n, int lane) {
  const unsigned bal = __ballot_sync(0xFFFFFFFFu, c);
  int base = 0;
  if (lane == 0 && bal != 0u) base = atomicAdd(n, __popc(bal));
  base = __shfl_sync(0xFFFFFFFFu, base, 0);
  if (c) {
    const int pos = base + __popc(bal & ((1u << lane) - 1u));
    if (pos < kPoolCtaCap) cand[pos] = make_comp(score_key(v), static_cast<uint32_t>(b));
  }
}

template <typename T, int J>
__device__ __forceinline__ void pool_select_cta(const PoolParams& pp, int64_t t, int h, PoolCtaSmem<J>& sm) {
  const NetParams& p = pp.p;
  const unsigned full = 0xFFFFFFFFu;
  const int tid = static_cast<int>(threadIdx.x), lane = tid & 31, warp = tid >> 5;
  int nvp = p.nvp_scalar;
  if (p.nvp != nullptr) nvp = __ldg(p.nvp + t);
  const RowRange rr = row_range(nvp, p.n_blocks, p.fb, p.fe);
  int32_t* orow = p.out + (t * p.n_heads + h) * p.topk;
  const int m = p.m;
  if (m <= 0) {
    if (warp == 0) lane_write_forced<32>(orow, rr, 0, p.topk, lane);
    return;
  }
  if (tid == 0) {
    sm.n = 0;
    sm.ngroups = 0;
  }
  pool_wait_primary();
  const float g = __ldcg(pp.gmax + (static_cast<int64_t>(h) * p.q + t) * (32 * J) + tid);  // group tid
  const int half = lane >> 4, sub = lane & 15;
  const T* col = static_cast<const T*>(p.scores) + static_cast<int64_t>(h) * p.n_blocks * p.q + t;
  // Speculative gather: the warp's kPoolSpecGroups best groups, SL lanes x SV blocks each.
  constexpr int NS = kPoolSpecGroups, SL = 32 / NS, SV = kPoolGroup / SL;
  const uint32_t gkey = pool_count_key(g);
  unsigned taken = 0u;
  int ls = -1;
#pragma unroll
  for (int s = 0; s < NS; ++s) {
    const bool free_lane = ((taken >> lane) & 1u) == 0u;
    const uint32_t k = __reduce_max_sync(full, free_lane ? gkey : 0u);
    const unsigned mk = __ballot_sync(full, k != 0u && free_lane && gkey == k);
    const int l = mk != 0u ? __ffs(mk) - 1 : -1;
    if (l >= 0) taken |= 1u << l;
    if (lane / SL == s) ls = l;
  }
  const int sb0 = (ls >= 0 ? (ls + 32 * warp) * kPoolGroup : 0) + lane % SL;
  float vs[SV];
#pragma unroll
  for (int j = 0; j < SV; ++j) {
    const int b = sb0 + SL * j;
    vs[j] = ls >= 0 && b < p.n_blocks ? ScoreLoad<T>::load(col + static_cast<int64_t>(b) * p.q) : -INFINITY;
  }
  sm.pmax[warp][lane] = g;
  __syncthreads();
  float mx = sm.pmax[0][lane];  // lane l's maximum over groups l + 32 i, as in the warp form
#pragma unroll
  for (int w = 1; w < J; ++w) mx = fmaxf(mx, sm.pmax[w][lane]);
  const float theta = pool_lane_bound(mx, m, lane);
  unsigned cg = __ballot_sync(full, coop_is_candidate(g, theta));
  {  // the speculated groups that are candidates
    const bool use = ls >= 0 && ((cg >> ls) & 1u);
#pragma unroll
    for (int j = 0; j < SV; ++j) {
      const int b = sb0 + SL * j;
      const float v = b >= rr.lo && b < rr.hi ? fmaxf(vs[j], -INFINITY) : -INFINITY;
      pool_cta_append(use && coop_is_candidate(v, theta), v, b, sm.cand, &sm.n, lane);
    }
    cg &= ~taken;
  }
  {  // the other candidate groups: listed, then gathered by all warps (a run of good neighbouring groups sits in one
     // warp: its rounds in turn cost an L2 round trip each)
    int base = 0;
    if (lane == 0 && cg != 0u) base = atomicAdd(&sm.ngroups, __popc(cg));
    base = __shfl_sync(full, base, 0);
    if ((cg >> lane) & 1u) sm.groups[base + __popc(cg & ((1u << lane) - 1u))] = lane + 32 * warp;
  }
  __syncthreads();
  const int ngl = sm.ngroups;
  for (int i = 2 * warp; i < ngl; i += 2 * J) {  // warp-uniform: two listed groups per round
    const int gl = i + half < ngl ? sm.groups[i + half] : -1;
    const int b = (gl >= 0 ? gl * kPoolGroup : 0) + sub;
    float v = gl >= 0 && b < p.n_blocks ? ScoreLoad<T>::load(col + static_cast<int64_t>(b) * p.q) : -INFINITY;
    v = b >= rr.lo && b < rr.hi ? fmaxf(v, -INFINITY) : -INFINITY;
    pool_cta_append(gl >= 0 && coop_is_candidate(v, theta), v, b, sm.cand, &sm.n, lane);
  }
  __syncthreads();
  const int n = sm.n;
  if (n > kPoolCap && n <= kPoolCtaRankCap) {  // a run of good neighbouring blocks: every thread ranks some
    for (int i = tid; i < n; i += 32 * J) {
      const Comp x = sm.cand[i];
      int r = 0;
      for (int j = 0; j < n; ++j) r += sm.cand[j] > x ? 1 : 0;
      if (r < m) sm.kept[r] = static_cast<int>(comp_idx(x));  // composites are distinct: one entry per rank
    }
    __syncthreads();
  }
  if (warp != 0) return;
  int nsel = -1;
  if (n <= kPoolCap) {
    nsel = coop_rank_kept(sm.cand, n, m, sm.kept, lane);
  } else if (n <= kPoolCtaRankCap) {
    nsel = m;
  } else if (n <= kPoolCtaCap) {  // smooth rows: theta = the candidates' exact M-th largest, then rank those >= it
    constexpr int N = kPoolCtaCap / 32;
    uint32_t ck[N];
#pragma unroll
    for (int i = 0; i < N; ++i) ck[i] = lane + 32 * i < n ? comp_key(sm.cand[lane + 32 * i]) : 0u;
    const uint32_t kth = warp_kth_key<N>(ck, m);
    int n2 = 0;
#pragma unroll
    for (int i = 0; i < N; ++i) {
      const bool keep = ck[i] != 0u && ck[i] >= kth;
      const unsigned bal = __ballot_sync(full, keep);
      const int pos = n2 + __popc(bal & ((1u << lane) - 1u));
      if (keep && pos < kPoolCap) sm.top[pos] = sm.cand[lane + 32 * i];
      n2 += __popc(bal);
    }
    __syncwarp();
    if (n2 <= kPoolCap) nsel = coop_rank_kept(sm.top, n2, m, sm.kept, lane);
  }
  if (nsel >= 0) {
    coop_write_kept(sm.kept, nsel, orow + rr.lo, lane);
    lane_write_forced<32>(orow, rr, nsel, p.topk, lane);
  } else {
    pool_select_warp<T, J>(pp, t, h, sm.warp);
  }
}
#endif

}  // namespace msa_topk
