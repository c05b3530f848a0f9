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
//  1'. records form (the default since session 21, pool_record_cta): per (row, group) the group's 4 best blocks as
//     packed keys instead of the maximum; the select launch is then pool_select_rec (a warp per row, below), which
//     gathers from max_score only groups whose 4th key reaches the bound. The rest of this comment: the maxima forms.
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

// Records (launch 1's records form): a group's four best blocks as packed keys -- the order-preserving key of the
// value (NaN as -inf, -0 as +0) with its low 4 bits replaced by (15 - offset in the group). Within a group the keys
// are distinct and order by value, then lower block first, up to the value's low 4 key bits; their "bucket" (the key
// with the low 4 bits cleared) orders exactly across groups: equal buckets are equal values for bf16 scores and
// values within 16 ulps for fp32. Keys below kPoolRecKeyMin are -inf.
constexpr uint32_t kPoolRecKeyMin = 0x00800000u;  // score_key(-FLT_MAX): the least key of a real value
MSA_TOPK_HD uint32_t pool_rec_key(float v, int j) { return (score_key(v) & ~15u) | static_cast<uint32_t>(15 - j); }
MSA_TOPK_HD uint32_t pool_rec_bucket(uint32_t k) { return k & ~15u; }
MSA_TOPK_HD int pool_rec_offset(uint32_t k) { return 15 - static_cast<int>(k & 15u); }
// The float of a record key's bucket: <= the value it records (-inf below kPoolRecKeyMin).
MSA_TOPK_HD float pool_rec_floor(uint32_t k) { return k >= kPoolRecKeyMin ? pool_key_value(k & ~15u) : -INFINITY; }

template <typename U>
MSA_TOPK_HD void rec_ce(U& a, U& b) {  // compare-exchange: a = the larger
  const U hi = a > b ? a : b, lo = a > b ? b : a;
  a = hi;
  b = lo;
}

// k[0 .. 4) = the 4 largest of the 16 distinct keys, descending: four sorted quads, then two rounds of bitonic top-4
// merges
// (~76 min / max, no branches: a data-dependent insertion loop diverges within the warp).
MSA_TOPK_HD void rec_top4(uint32_t (&k)[kPoolGroup]) {
#pragma unroll
  for (int q = 0; q < 16; q += 4) {
    rec_ce(k[q], k[q + 1]);
    rec_ce(k[q + 2], k[q + 3]);
    rec_ce(k[q], k[q + 2]);
    rec_ce(k[q + 1], k[q + 3]);
    rec_ce(k[q + 1], k[q + 2]);
  }
#pragma unroll
  for (int step = 4; step < 16; step *= 2) {
#pragma unroll
    for (int q = 0; q < 16; q += 2 * step) {  // quads q and q + step -> quad q
#pragma unroll
      for (int i = 0; i < 4; ++i) k[q + i] = k[q + i] > k[q + step + 3 - i] ? k[q + i] : k[q + step + 3 - i];
      rec_ce(k[q], k[q + 2]);  // bitonic -> descending
      rec_ce(k[q + 1], k[q + 3]);
      rec_ce(k[q], k[q + 1]);
      rec_ce(k[q + 2], k[q + 3]);
    }
  }
}

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

// Launch 2: the row range of token t < q (per-token nvp tensor or the scalar).
__device__ __forceinline__ RowRange pool_token_range(const NetParams& p, int64_t t) {
  return row_range(p.nvp != nullptr ? __ldg(p.nvp + t) : p.nvp_scalar, p.n_blocks, p.fb, p.fe);
}

// Launch 1, one CTA of W warps: groups gi0 + w of head h for tokens 32 y + lane (warp w, lane). Each lane loads its
// group's kPoolGroup scores (outside the row's range and NaN: -inf), summary(v) gives its Out, and through shared
// memory a token's W outputs are stored together to out[(h * q + t) * n_groups + group].
template <typename T, int W, typename Out, class Summary>
__device__ __forceinline__ void pool_group_cta(const PoolParams& pp, int gi0, int y, int h, Out (&tile)[32][W + 1],
                                               Out* out, const Summary& summary) {
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
  tile[lane][warp] = summary(v);
  __syncthreads();
  const int tt = threadIdx.x / W, w = threadIdx.x % W;  // token tt's output of group gi0 + w
  const int64_t to = static_cast<int64_t>(y) * 32 + tt;
  if (to < p.q && gi0 + w < pp.n_groups)
    out[(static_cast<int64_t>(h) * p.q + to) * pp.n_groups + gi0 + w] = tile[tt][w];
  if (pp.trigger == 2) pool_launch_dependents();
}

// Launch 1, maxima form: per (row, group) the group maximum.
template <typename T, int W>
__device__ __forceinline__ void pool_max_cta(const PoolParams& pp, int gi0, int y, int h, float (&tile)[32][W + 1]) {
  pool_group_cta<T, W>(pp, gi0, y, h, tile, pp.gmax, [](const float (&v)[kPoolGroup]) {
    float mx = v[0];
#pragma unroll
    for (int j = 1; j < kPoolGroup; ++j) mx = fmaxf(mx, v[j]);
    return mx;
  });
}

// Launch 1, records form: per (row, group) the record uint4 {k1 > k2 > k3 > k4} (pool_rec_key of the group's four
// best blocks) instead of the maximum, so the select launch needs no gather unless a group's fourth record reaches the
// bound. A token's W records are stored together (a 128-byte line at W = 8).
template <typename T, int W>
__device__ __forceinline__ void pool_record_cta(const PoolParams& pp, int gi0, int y, int h, uint4 (&tile)[32][W + 1]) {
  pool_group_cta<T, W>(pp, gi0, y, h, tile, reinterpret_cast<uint4*>(pp.gmax), [](const float (&v)[kPoolGroup]) {
    uint32_t k[kPoolGroup];
#pragma unroll
    for (int j = 0; j < kPoolGroup; ++j) k[j] = pool_rec_key(v[j], j);
    rec_top4(k);
    return make_uint4(k[0], k[1], k[2], k[3]);
  });
}

struct PoolWarpSmem {
  int groups[kPoolGroupCap];
  alignas(16) Comp cand[kPoolCap];
  int kept[kCoopMaxM];
};

// The number of the warp's 32 keys greater than this lane's: four independent counts, so that the 32 compares are
// not one dependent chain (the compiler turns `r += c ? 1 : 0` into two dependent instructions per step).
__device__ __forceinline__ int warp_rank_of_key(uint32_t key) {
  int r[4] = {0, 0, 0, 0};
#pragma unroll
  for (int o = 0; o < 32; ++o) r[o & 3] += __shfl_sync(0xFFFFFFFFu, key, o) > key ? 1 : 0;
  return (r[0] + r[1]) + (r[2] + r[3]);
}

// The bound from the 32 lane maxima mx (one per lane, never NaN): the key of rank m - 1 among the distinct lane keys,
// floored -- M lanes hold a block >= it (m <= 32: exactly one lane has that rank).
__device__ __forceinline__ float pool_lane_bound(float mx, int m, int lane) {
  const unsigned full = 0xFFFFFFFFu;
  const uint32_t key = pool_lane_key(mx, lane);
  const int rank = warp_rank_of_key(key);
  const int owner = __ffs(__ballot_sync(full, rank == m - 1)) - 1;
  return pool_key_floor(__shfl_sync(full, key, owner), __shfl_sync(full, mx, owner));
}

// The k-th largest of the warp's keys (N per lane, 0 = none, counted with multiplicity): the largest c with
// #(keys >= c) >= k, bit by bit from the top; 0 when fewer than k keys are nonzero. The answer lies between the least
// and the greatest nonzero key, so the search starts below their common prefix (a row's keys >= a bound share their
// top ~8 bits); each round's count is four independent sums (one long chain of compares otherwise: ~350 cycles per
// round in one warp, H200 session 21 run 6).
template <int N>
__device__ __forceinline__ uint32_t warp_kth_key(const uint32_t (&key)[N], int k) {
  const unsigned full = 0xFFFFFFFFu;
  uint32_t hi = 0u, lo = 0xFFFFFFFFu;
  int nz = 0;
#pragma unroll
  for (int i = 0; i < N; ++i) {
    hi = key[i] > hi ? key[i] : hi;
    lo = key[i] != 0u && key[i] < lo ? key[i] : lo;
    nz += key[i] != 0u ? 1 : 0;
  }
  hi = __reduce_max_sync(full, hi);
  lo = __reduce_min_sync(full, lo);
  if (static_cast<int>(__reduce_add_sync(full, static_cast<unsigned>(nz))) < k) return 0u;
  if (hi == lo) return hi;
  const int top = 31 - __clz(static_cast<int>(hi ^ lo));  // the highest bit where the nonzero keys differ
  uint32_t res = top == 31 ? 0u : hi & ~((2u << top) - 1u);
#pragma unroll 1
  for (int bit = top; bit >= 0; --bit) {
    const uint32_t c = res | (1u << bit);
    int cnt[4] = {0, 0, 0, 0};
#pragma unroll
    for (int i = 0; i < N; ++i) cnt[i & 3] += key[i] >= c ? 1 : 0;
    const unsigned total = static_cast<unsigned>((cnt[0] + cnt[1]) + (cnt[2] + cnt[3]));
    if (static_cast<int>(__reduce_add_sync(full, total)) >= k) res = c;
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
// kRec: the workspace holds records (pool_record_cta); their first keys' floors serve as the group maxima (every
// bound is a bucket floor, so a group whose maximum reaches it has a floor that does).
template <typename T, int J, bool kRec = false>
__device__ __forceinline__ void pool_select_warp(const PoolParams& pp, int64_t t, int h, PoolWarpSmem& sm) {
  const NetParams& p = pp.p;
  const unsigned full = 0xFFFFFFFFu;
  const int lane = threadIdx.x & 31;
  const unsigned below = (1u << lane) - 1u;
  const RowRange rr = pool_token_range(p, t);
  int32_t* orow = p.out + (t * p.n_heads + h) * p.topk;
  const int m = p.m;
  int nsel = 0;
  if (m > 0) {
    pool_wait_primary();
    const float* grow = pp.gmax + (static_cast<int64_t>(h) * p.q + t) * (32 * J) + lane;
    float gm[J];
    if constexpr (kRec) {
      const uint32_t* rrow =
          reinterpret_cast<const uint32_t*>(pp.gmax) + ((static_cast<int64_t>(h) * p.q + t) * (32 * J) + lane) * 4;
#pragma unroll
      for (int i = 0; i < J; ++i) gm[i] = pool_rec_floor(__ldcg(rrow + 128 * i));
    } else {
#pragma unroll
      for (int i = 0; i < J; ++i) gm[i] = __ldcg(grow + 32 * i);  // group pool_lane_group(lane, i)
    }
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

// Launch 2, records form: a warp per row reads its J records per lane (groups pool_lane_group(lane, i), as the warp
// form) -- each group's four best blocks already in hand, so the usual row gathers nothing from max_score. One warp
// per row is latency-bound (H200 session 21 run 6, clock64 per phase, 1M q64 H1: ~4400 cycles after the wait, each
// shuffle / vote / shared access a full round trip), so the steps are chosen for few dependent shared-memory rounds:
//   - bound th: the M-th largest of the 32 lane maxima (first keys), floored to 32 (M lanes hold a record >= th); the
//     lane keys are compared through shared memory (8 broadcast loads instead of 32 shuffles);
//   - a group is a candidate when its first key reaches th; "whole" when its fourth does (it may hide more blocks
//     >= th: a run of good neighbouring blocks);
//   - no whole group (the usual row): every lane appends the keys >= th of its own candidate groups (usually 0-2),
//     read back from its staged records, at positions from one scan of its counts;
//   - else (or more than kPoolCap keys >= th): candidate groups listed by ballots; lane c takes listed record group c
//     (three keys) or, past those, a whole group gathered from max_score (one L2 round trip; with more than 4 whole
//     groups their values are bounded by the records' M-th largest key, found while the gather is in flight); the
//     keys >= the bound appended as (bucket, block) -- a gathered value bucketed like a record -- with the exact
//     refinement of the warp form past kPoolCap (the M-th largest key);
//   - rank by (bucket, then lower block): exact for bf16 scores; for fp32 exact unless the best bucket left out is the
//     worst bucket kept (values within 16 ulps straddling the cut). A block a non-whole group hides has a key below
//     its fourth record, so below th (32-aligned): a lower bucket than every candidate's;
//   - fallback (more than kPoolGroupCap candidate groups, ties past the refinement, a straddled fp32 bucket): the warp
//     form over the records' first-key floors (pool_select_warp<T, J, true>: gathers, exact refinements, rounds).
template <int J>
struct PoolRecSmem {
  uint4 recs[J][32];                    // the row's records as the lanes hold them
  uint32_t lk[32];                      // lane keys
  uint4 crec[kPoolGroupCap + 1];        // listed record groups: keys 1-3, group index; the last slot: discarded stores
  int wgroups[kPoolGroupCap + 1];       // listed whole groups; the same
  alignas(16) Comp cand[kPoolCap + 2];  // candidates; slot kPoolCap: discarded stores
  int kept[kCoopMaxM];
  PoolWarpSmem w;  // the fallback's
};

template <typename T, int J>
__device__ __forceinline__ void pool_select_rec(const PoolParams& pp, int64_t t, int h, PoolRecSmem<J>& sm) {
  const NetParams& p = pp.p;
  const unsigned full = 0xFFFFFFFFu;
  const int lane = threadIdx.x & 31;
  const unsigned below = (1u << lane) - 1u;
  const RowRange rr = pool_token_range(p, t);
  int32_t* orow = p.out + (t * p.n_heads + h) * p.topk;
  const int m = p.m;
  // Before the wait (off the critical path; launch 1 writes neither): the forced head / tail for the usual nsel (M,
  // or the selectable range when shorter; redone below when fewer blocks are real), and zeros in the rank's first 32
  // slots (a zero composite ranks below every entry, so the rank needs no bounds test).
  const int nsel_guess = imin32(m, rr.hi - rr.lo);
  lane_write_forced<32>(orow, rr, imax32(nsel_guess, 0), p.topk, lane);
  if (m <= 0) return;
  sm.cand[lane] = 0;
  pool_wait_primary();
  const uint4* rrow = reinterpret_cast<const uint4*>(pp.gmax) + (static_cast<int64_t>(h) * p.q + t) * (32 * J) + lane;
  uint4 rec[J];
#pragma unroll
  for (int i = 0; i < J; ++i) rec[i] = __ldcg(rrow + 32 * i);  // group pool_lane_group(lane, i)
#pragma unroll
  for (int i = 0; i < J; ++i) sm.recs[i][lane] = rec[i];
  uint32_t mk = rec[0].x;
#pragma unroll
  for (int i = 1; i < J; ++i) mk = mk > rec[i].x ? mk : rec[i].x;
  const uint32_t lk = (mk & ~31u) | static_cast<uint32_t>(31 - lane);  // distinct lane keys
  sm.lk[lane] = lk;
  __syncwarp();
  int lr[4] = {0, 0, 0, 0};  // lanes with a greater key: four independent counts
#pragma unroll
  for (int o = 0; o < 32; o += 4) {
    const uint4 k = *reinterpret_cast<const uint4*>(sm.lk + o);
    lr[0] += k.x > lk ? 1 : 0;
    lr[1] += k.y > lk ? 1 : 0;
    lr[2] += k.z > lk ? 1 : 0;
    lr[3] += k.w > lk ? 1 : 0;
  }
  const int owner = __ffs(__ballot_sync(full, (lr[0] + lr[1]) + (lr[2] + lr[3]) == m - 1)) - 1;
  uint32_t th = sm.lk[owner] & ~31u;
  th = th > kPoolRecKeyMin ? th : kPoolRecKeyMin;
  bool whole = false;
#pragma unroll
  for (int i = 0; i < J; ++i) whole = whole || rec[i].w >= th;
  const bool any_whole = __any_sync(full, whole);
  int n = kPoolCap + 1;  // > kPoolCap: the fallback
  bool direct = !any_whole;
  if (direct) {  // each lane appends its own candidate groups' keys >= th
    unsigned xm = 0u;
    int c4[4] = {0, 0, 0, 0};
#pragma unroll
    for (int i = 0; i < J; ++i) {
      xm |= rec[i].x >= th ? 1u << i : 0u;
      c4[i & 3] += (rec[i].x >= th ? 1 : 0) + (rec[i].y >= th ? 1 : 0) + (rec[i].z >= th ? 1 : 0);
    }
    const int cnt = (c4[0] + c4[1]) + (c4[2] + c4[3]);
    int incl;
    if (__any_sync(full, cnt > 3)) {
      incl = lane_seg_scan<32>(cnt, lane, full);
    } else {  // the usual row (<= 3 entries per lane): the prefix from two ballots of the count's bits
      const unsigned b0 = __ballot_sync(full, cnt & 1), b1 = __ballot_sync(full, cnt & 2);
      incl = __popc(b0 & (below | (1u << lane))) + 2 * __popc(b1 & (below | (1u << lane)));
    }
    n = __shfl_sync(full, incl, 31);
    direct = n <= kPoolCap;
    if (direct) {
      int pos = incl - cnt;
      for (unsigned cm = xm; cm != 0u; cm &= cm - 1u) {  // usually 0-2 groups per lane
        const int i = __ffs(cm) - 1;
        const uint4 r = sm.recs[i][lane];
        const int b0 = pool_lane_group(lane, i) * kPoolGroup;
        const uint32_t k3[3] = {r.x, r.y, r.z};
#pragma unroll
        for (int j = 0; j < 3; ++j)
          if (k3[j] >= th)
            sm.cand[pos++] = make_comp(pool_rec_bucket(k3[j]), static_cast<uint32_t>(b0 + pool_rec_offset(k3[j])));
      }
    }
  }
  if (!direct) {
    // Candidate groups listed by ballots: record groups (in crec) first, whole groups (in wgroups) after. Every lane
    // stores (to the discard slot when it has nothing): no divergent branch per group.
    int nrec = 0, nwh = 0;
#pragma unroll
    for (int i = 0; i < J; ++i) {
      const bool wh = rec[i].w >= th, rc = !wh && rec[i].x >= th;
      const unsigned bw = __ballot_sync(full, wh), bc = __ballot_sync(full, rc);
      const int pc = rc ? imin32(nrec + __popc(bc & below), kPoolGroupCap) : kPoolGroupCap;
      const int pw = wh ? imin32(nwh + __popc(bw & below), kPoolGroupCap) : kPoolGroupCap;
      sm.crec[pc] = make_uint4(rec[i].x, rec[i].y, rec[i].z, static_cast<uint32_t>(pool_lane_group(lane, i)));
      sm.wgroups[pw] = pool_lane_group(lane, i);
      nrec += __popc(bc);
      nwh += __popc(bw);
    }
    n = kPoolCap + 1;
    if (nrec + nwh <= kPoolGroupCap) {
      __syncwarp();
      uint32_t key[kPoolGroup];  // this lane's entries >= th: bucket keys (0: none); blocks rb[j] (record) or b0 + j
      int rb[3];
      const bool rec_lane = lane < nrec;
      {
        const uint4 r = sm.crec[rec_lane ? lane : kPoolGroupCap];
        const uint32_t k3[3] = {r.x, r.y, r.z};
#pragma unroll
        for (int j = 0; j < 3; ++j) {
          key[j] = rec_lane && k3[j] >= th ? pool_rec_bucket(k3[j]) : 0u;
          rb[j] = static_cast<int>(r.w) * kPoolGroup + pool_rec_offset(k3[j]);
        }
      }
#pragma unroll
      for (int j = 3; j < kPoolGroup; ++j) key[j] = 0u;
      int b0 = 0;
      uint32_t th_w = th;  // the appends' bound
      if (nwh > 0) {  // warp-uniform: lanes nrec .. nrec + nwh gather their whole group from max_score
        const bool gl = lane >= nrec && lane < nrec + nwh;
        const int g = gl ? sm.wgroups[lane - nrec] : 0;
        b0 = g * kPoolGroup;
        float v[kPoolGroup];
        lane_load_scores<T, kPoolGroup>(p.scores, p.n_blocks, p.q, h, t, gl, b0, v);
        if (nwh * kPoolGroup > kPoolCap) {
          // A run of good groups whose values could pass kPoolCap: while the gather is in flight, th_w = the M-th
          // largest record key >= th (3 per record group, 4 per whole group; real blocks, so <= the cut's bucket).
          // 1M q64 H1 with 100 good recent blocks (7 whole groups): 8.5 -> 7.3 us; with 40 (3 whole groups) this
          // costs more than the refinement it saves (6.3 -> 7.3), hence only past kPoolCap (session 21 runs 14-15).
          const uint4 r = sm.recs[g >> 5][g & 31];
          const uint32_t w4[4] = {r.x, r.y, r.z, r.w};
          uint32_t rk[4];
#pragma unroll
          for (int j = 0; j < 4; ++j) {
            const uint32_t k = gl ? pool_rec_bucket(w4[j]) : j < 3 ? key[j] : 0u;
            rk[j] = k >= th ? k : 0u;
          }
          const uint32_t k2 = warp_kth_key<4>(rk, m);
          th_w = k2 > th ? k2 : th;
        }
        lane_mask_scores<kPoolGroup>(v, b0, rr);
#pragma unroll
        for (int j = 0; j < kPoolGroup; ++j) {
          const uint32_t k = v[j] > -INFINITY ? pool_rec_bucket(score_key(v[j])) : 0u;
          key[j] = gl ? (k >= th_w ? k : 0u) : (key[j] >= th_w ? key[j] : 0u);
        }
      }
      // Append the keys >= kth (th; the exact M-th largest when more than kPoolCap); returns the count. Stores past
      // kPoolCap and of lanes without an entry go to the discard slot.
      auto append = [&](uint32_t kth) {
        auto take = [&](int j) { return key[j] != 0u && key[j] >= kth; };
        auto block = [&](int j) { return rec_lane ? rb[j < 3 ? j : 0] : b0 + j; };
        int cnt = (take(0) ? 1 : 0) + (take(1) ? 1 : 0) + (take(2) ? 1 : 0);
        if (nwh > 0) {
#pragma unroll
          for (int j = 3; j < kPoolGroup; ++j) cnt += take(j) ? 1 : 0;
        }
        const int incl = lane_seg_scan<32>(cnt, lane, full);
        int pos = incl - cnt;
#pragma unroll
        for (int j = 0; j < 3; ++j) {
          sm.cand[take(j) ? imin32(pos, kPoolCap) : kPoolCap] = make_comp(key[j], static_cast<uint32_t>(block(j)));
          pos += take(j) ? 1 : 0;
        }
        if (nwh > 0) {
#pragma unroll
          for (int j = 3; j < kPoolGroup; ++j) {
            sm.cand[take(j) ? imin32(pos, kPoolCap) : kPoolCap] = make_comp(key[j], static_cast<uint32_t>(block(j)));
            pos += take(j) ? 1 : 0;
          }
        }
        return __shfl_sync(full, incl, 31);
      };
      n = append(th_w);
      if (n > kPoolCap) {  // the exact M-th largest key
        __syncwarp();
        sm.cand[lane] = 0;  // the rank's zero slots past the new count
        n = append(warp_kth_key<kPoolGroup>(key, m));
      }
    }
  }
  if (n <= kPoolCap) {
    const int nsel = n < m ? n : m;
    if (nsel != nsel_guess) lane_write_forced<32>(orow, rr, nsel, p.topk, lane);  // fewer real blocks than guessed
    __syncwarp();
    // Rank by composite: entries past n are zero (n <= 32) or masked.
    const ulonglong2* pairs = reinterpret_cast<const ulonglong2*>(sm.cand);
    const Comp x0 = lane < n ? sm.cand[lane] : 0, x1 = lane + 32 < n ? sm.cand[lane + 32] : 0;
    int r0, r1 = 0;
    if (n <= 32) {  // the usual row: all 16 pair loads issued at once (a loop of 8-entry trips waits on each trip)
      ulonglong2 y[16];
#pragma unroll
      for (int k = 0; k < 16; ++k) y[k] = pairs[k];
      int c0[4] = {0, 0, 0, 0};
#pragma unroll
      for (int k = 0; k < 16; ++k) c0[k & 3] += (y[k].x > x0 ? 1 : 0) + (y[k].y > x0 ? 1 : 0);
      r0 = (c0[0] + c0[1]) + (c0[2] + c0[3]);
    } else {
      warp_pair_ranks(sm.cand, n, x0, x1, &r0, &r1);
    }
    const bool k0 = lane < n && r0 < m, k1 = lane + 32 < n && r1 < m;
    bool straddle = false;
    if (sizeof(T) == 4 && n > m) {  // fp32 scores: the best bucket left out must be below the worst bucket kept
      const uint32_t kx0 = comp_key(x0), kx1 = comp_key(x1);
      const uint32_t kept_min = __reduce_min_sync(full, umin32(k0 ? kx0 : 0xFFFFFFFFu, k1 ? kx1 : 0xFFFFFFFFu));
      const uint32_t out_max =
          __reduce_max_sync(full, umax32(lane < n && !k0 ? kx0 : 0u, lane + 32 < n && !k1 ? kx1 : 0u));
      straddle = out_max == kept_min;
    }
    if (!straddle) {
      const unsigned b0k = __ballot_sync(full, k0), b1k = __ballot_sync(full, k1);
      if (k0) sm.kept[__popc(b0k & below)] = static_cast<int>(comp_idx(x0));
      if (k1) sm.kept[__popc(b0k) + __popc(b1k & below)] = static_cast<int>(comp_idx(x1));
      __syncwarp();
      coop_write_kept(sm.kept, nsel, orow + rr.lo, lane);
      return;
    }
  }
  __syncwarp();
  pool_select_warp<T, J, true>(pp, t, h, sm.w);
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
  const RowRange rr = pool_token_range(p, t);
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
