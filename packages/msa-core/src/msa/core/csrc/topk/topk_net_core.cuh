// "net" variant of the reg path (sparse_topk_select, M <= 16): rows in registers, the row's M-th largest value
// found by compare-exchange networks on floats, no shared memory, no candidate list, no rank loop.
//
// Why: the reg path's selection (32-value segment sort for the bound, candidates appended to a shared list,
// an n^2 rank loop over ~18 candidates, divergent per-row loops) issues ~900 warp instructions per warp of 4 rows
// at 8K prefill (P8 V8, SASS count): ~225 per row, 3.7M warp instructions for H4's 16384 rows -- the whole grid is
// one wave, so this comes after the loads instead of overlapping them (measured 10.2 us; read kernel 3.4).
// Here a lane keeps a sorted list of its best 16 values and lists are merged, so the instruction count per row is
// ~40-65 (P1 V64 .. P4 V16), all straight-line (no data-dependent loop except the output of the selected ones).
//
// Warp = G = 32 / P rows (tokens t0 .. t0 + G - 1 of one head), row g in lanes [g P, g P + P); lane r holds
// blocks r V .. r V + V - 1 (V = 16, 32 or 64; blocks >= K, NaN and blocks outside the eligible range [lo, hi)
// are -inf), loaded as in the reg path (P = 1: each load instruction reads 32 consecutive tokens of one K-row,
// 128 contiguous bytes).
// Per row (exact; ties toward the lower index; M = topk - fb - fe <= 16):
//  1. copies of the V values, sorted descending in groups of 16 (Batcher's odd-even merge sort, 63 compare-
//     exchanges each); lists merged pairwise to the top 16 of their union: c[i] = max(A[i], B[15 - i]) is bitonic
//     and holds the top 16 of A u B (A, B sorted descending), then 4 half-cleaner levels sort it (32 exchanges).
//     In-lane merges first, then log2(P) butterfly levels across the segment (16 shuffles + the same merge; both
//     partners end with the same sorted list). T = list[M - 1] = the row's M-th largest value (multiset).
//  2. T > -inf: ge mask (v >= T) per lane, segment prefix sum of the counts, GE = the row's total. GE == M (no
//     tie at T beyond the M-th): the selected set is the mask. GE > M (ties at T): values > T plus the first
//     M - #(> T) values equal to T in index order (lane order = index order): per-lane quota from a prefix sum of
//     (count > T, count == T). T == -inf (fewer than M finite eligible values): every value > -inf.
//  3. each lane writes its selected block indices in index order at its prefix offset (bit loop over the mask),
//     then the forced head [0, lo), forced tail [hi, nvp) and -1 padding after the lo + n selected.
// Float comparisons give the composite order exactly: -0 == +0 as score_key, NaN never reaches the network.
// CPU replay of this algorithm with the same network functions: topk_net_emulate.cc.
#pragma once

#include <float.h>

#include "topk_block_core.cuh"
#include "topk_lane_core.cuh"

namespace msa_topk {

constexpr int kNetList = 16;  // list length (M <= 16)
constexpr int kNetMaxM = 16;

MSA_TOPK_HD void net_cx(float& a, float& b) {  // a >= b afterwards
  const float hi = fmaxf(a, b), lo = fminf(a, b);
  a = hi;
  b = lo;
}

// Batcher's odd-even merge sort, descending, of a[0 .. 16): the 63 compare-exchanges written out (generated; the
// 0-1 principle checked over all 2^16 inputs), so every index is a constant and a[] stays in registers.
MSA_TOPK_HD void net_sort16_desc(float (&a)[kNetList]) {
#define MSA_NET_X(i, j) net_cx(a[i], a[j]);
  MSA_NET_X(0, 1) MSA_NET_X(2, 3) MSA_NET_X(4, 5) MSA_NET_X(6, 7) MSA_NET_X(8, 9) MSA_NET_X(10, 11) MSA_NET_X(12, 13)
  MSA_NET_X(14, 15) MSA_NET_X(0, 2) MSA_NET_X(1, 3) MSA_NET_X(4, 6) MSA_NET_X(5, 7) MSA_NET_X(8, 10) MSA_NET_X(9, 11)
  MSA_NET_X(12, 14) MSA_NET_X(13, 15) MSA_NET_X(1, 2) MSA_NET_X(5, 6) MSA_NET_X(9, 10) MSA_NET_X(13, 14)
  MSA_NET_X(0, 4) MSA_NET_X(1, 5) MSA_NET_X(2, 6) MSA_NET_X(3, 7) MSA_NET_X(8, 12) MSA_NET_X(9, 13) MSA_NET_X(10, 14)
  MSA_NET_X(11, 15) MSA_NET_X(2, 4) MSA_NET_X(3, 5) MSA_NET_X(10, 12) MSA_NET_X(11, 13) MSA_NET_X(1, 2) MSA_NET_X(3, 4)
  MSA_NET_X(5, 6) MSA_NET_X(9, 10) MSA_NET_X(11, 12) MSA_NET_X(13, 14) MSA_NET_X(0, 8) MSA_NET_X(1, 9) MSA_NET_X(2, 10)
  MSA_NET_X(3, 11) MSA_NET_X(4, 12) MSA_NET_X(5, 13) MSA_NET_X(6, 14) MSA_NET_X(7, 15) MSA_NET_X(4, 8) MSA_NET_X(5, 9)
  MSA_NET_X(6, 10) MSA_NET_X(7, 11) MSA_NET_X(2, 4) MSA_NET_X(3, 5) MSA_NET_X(6, 8) MSA_NET_X(7, 9) MSA_NET_X(10, 12)
  MSA_NET_X(11, 13) MSA_NET_X(1, 2) MSA_NET_X(3, 4) MSA_NET_X(5, 6) MSA_NET_X(7, 8) MSA_NET_X(9, 10) MSA_NET_X(11, 12)
  MSA_NET_X(13, 14)
#undef MSA_NET_X
}

// a := the top kNetList of a u b, sorted descending (a, b sorted descending).
MSA_TOPK_HD void net_merge_top(float (&a)[kNetList], const float (&b)[kNetList]) {
#pragma unroll
  for (int i = 0; i < kNetList; ++i) a[i] = fmaxf(a[i], b[kNetList - 1 - i]);  // bitonic
#pragma unroll
  for (int j = kNetList / 2; j > 0; j >>= 1) {
#pragma unroll
    for (int i = 0; i < kNetList; ++i) {
      if ((i & j) == 0) net_cx(a[i], a[i + j]);
    }
  }
}

// In-lane part: w[NG][16] (NG = V / 16 groups of copies) -> w[0] = the lane's top 16, sorted descending.
template <int NG>
MSA_TOPK_HD void net_lane_top(float (&w)[NG][kNetList]) {
  static_assert(NG == 1 || NG == 2 || NG == 4, "V: 16, 32 or 64");
  net_sort16_desc(w[0]);
  if constexpr (NG >= 2) net_sort16_desc(w[1]);
  if constexpr (NG == 4) {
    net_sort16_desc(w[2]);
    net_sort16_desc(w[3]);
    net_merge_top(w[2], w[3]);
  }
  if constexpr (NG >= 2) net_merge_top(w[0], w[1]);
  if constexpr (NG == 4) net_merge_top(w[0], w[2]);
}

// l[m - 1] (m in 1..16) of a list sorted descending, as the minimum of its first m entries (a select chain on
// i == m - 1 is turned into a local-memory array index by the compiler).
MSA_TOPK_HD float net_pick(const float (&l)[kNetList], int m) {
  float t = l[0];
#pragma unroll
  for (int i = 1; i < kNetList; ++i) t = i < m ? fminf(t, l[i]) : t;
  return t;
}

#ifdef __CUDACC__
struct NetParams {
  const void* scores;  // max_score [H, K, Q] (fp32 or bf16)
  const int32_t* nvp;  // [Q] or nullptr -> nvp_scalar
  int32_t* out;        // [Q, H, topk]
  int64_t q;
  int n_blocks, n_heads, topk, fb, fe, m, nvp_scalar;
  unsigned long long* trace;  // MSA_TOPK_TIMELINE builds: kNetTimelineSlots per CTA, or nullptr
};

// Timeline (diagnostic, MSA_TOPK_TIMELINE builds of the module): thread 0 of each CTA records %globaltimer at
// entry, when its loads have landed, after the bound / network, after the candidates / masks, after its output.
// coop only: after its candidate partial ranks, after the rank barrier, after ordering the kept indices.
enum NetTimelineSlot : int {
  kNtEntry = 0,
  kNtLanded = 1,
  kNtBound = 2,
  kNtCandidates = 3,
  kNtOut = 4,
  kNtSm = 5,
  kNtRanked = 6,
  kNtRanksIn = 7,
  kNtOrdered = 8
};
constexpr int kNetTimelineSlots = 9;

// Stamp `slot` once `dep` (a value computed from the phase's results) exists.
__device__ __forceinline__ void net_stamp(const NetParams& p, int slot, float dep) {
#ifdef MSA_TOPK_TIMELINE
  asm volatile("" ::"f"(dep));
  if (p.trace != nullptr && threadIdx.x == 0) {
    unsigned long long t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    unsigned long long* tl = p.trace + (static_cast<int64_t>(blockIdx.y) * gridDim.x + blockIdx.x) * kNetTimelineSlots;
    tl[slot] = t;
    if (slot == kNtEntry) {
      unsigned sm;
      asm volatile("mov.u32 %0, %%smid;" : "=r"(sm));
      tl[kNtSm] = sm;
    }
  }
#endif
}

template <int V>
__device__ __forceinline__ float net_sum(const float (&v)[V]) {
  float s = 0.f;
#ifdef MSA_TOPK_TIMELINE
#pragma unroll
  for (int j = 0; j < V; ++j) s += v[j];
#endif
  return s;
}

template <int V>
struct NetMask {
  using type = uint32_t;
};
template <>
struct NetMask<64> {
  using type = unsigned long long;
};

template <typename T, int P, int V>
__device__ __forceinline__ void net_select_warp(const NetParams& p, int64_t t0) {
  static_assert(V % kNetList == 0 && V <= 64, "V: 16, 32 or 64");
  constexpr int NG = V / kNetList;
  using Mask = typename NetMask<V>::type;
  const int lane = threadIdx.x & 31;
  const int g = lane / P, r = lane % P;
  const unsigned smask = lane_seg_mask<P>(lane);
  const int h = blockIdx.y;
  const int64_t t = t0 + g;
  const bool valid = t < p.q;
  const int m = p.m;
  int nvp = valid ? p.nvp_scalar : 0;
  if (p.nvp != nullptr && valid) nvp = __ldg(p.nvp + t);
  const int k0 = r * V;
  net_stamp(p, kNtEntry, 0.f);

  float v[V];
  if (m > 0) lane_load_scores<T, V>(p.scores, p.n_blocks, p.q, h, t, valid, k0, v);
  const RowRange rr = row_range(nvp, p.n_blocks, p.fb, p.fe);
  int32_t* orow = p.out + (t * p.n_heads + h) * p.topk;
  int nsel = 0;
  if (m > 0) {
    lane_mask_scores<V>(v, k0, rr);
    net_stamp(p, kNtLanded, net_sum(v));
    float w[NG][kNetList];
#pragma unroll
    for (int j = 0; j < V; ++j) w[j / kNetList][j % kNetList] = v[j];
    net_lane_top<NG>(w);
#pragma unroll
    for (int o = 1; o < P; o <<= 1) {
      float y[kNetList];
#pragma unroll
      for (int i = 0; i < kNetList; ++i) y[i] = __shfl_xor_sync(smask, w[0][i], o);
      net_merge_top(w[0], y);
    }
    const float tv = net_pick(w[0], m);
    net_stamp(p, kNtBound, tv);
    const float thr = tv > -INFINITY ? tv : -FLT_MAX;  // -inf: every finite value (fewer than M of them)
    Mask mk = 0;
#pragma unroll
    for (int j = 0; j < V; ++j) mk |= v[j] >= thr ? Mask(1) << j : Mask(0);
    const int c = __popcll(static_cast<unsigned long long>(mk));
    int incl = c, ge = c;
    if constexpr (P > 1) {
      incl = lane_seg_scan<P>(c, r, smask);
      ge = __shfl_sync(smask, incl, P - 1, P);
    }
    int start = incl - c;
    net_stamp(p, kNtCandidates, static_cast<float>(ge));
    nsel = ge;
    if (ge > m) {  // ties at tv (> -inf) beyond the M-th: segment-uniform, rare for continuous scores
      Mask em = 0;
#pragma unroll
      for (int j = 0; j < V; ++j) em |= v[j] == tv ? Mask(1) << j : Mask(0);
      const int ceq = __popcll(static_cast<unsigned long long>(em));
      const int cgt = c - ceq;
      int incl2 = cgt | (ceq << 16), tot = incl2;
      if constexpr (P > 1) {
        incl2 = lane_seg_scan<P>(incl2, r, smask);
        tot = __shfl_sync(smask, incl2, P - 1, P);
      }
      const int gt_excl = (incl2 & 0xFFFF) - cgt, eq_excl = (incl2 >> 16) - ceq;
      const int quota = m - (tot & 0xFFFF);  // equal values to take, lowest indices first
      int take = quota - eq_excl;
      take = take < 0 ? 0 : take > ceq ? ceq : take;
      Mask keep = 0;
      for (int i = 0; i < take; ++i) {
        const Mask b = em & (~em + 1);
        keep |= b;
        em ^= b;
      }
      mk = (mk & ~(em | keep)) | keep;  // values > tv, and the kept equal ones
      start = gt_excl + (eq_excl < quota ? eq_excl : quota);
      nsel = m;
    }
    int32_t* dst = orow + rr.lo + start;
    while (mk) {
      const int j = __ffsll(static_cast<long long>(mk)) - 1;
      *dst++ = k0 + j;
      mk &= mk - 1;
    }
  }
  if (valid) lane_write_forced<P>(orow, rr, nsel, p.topk, r);
  net_stamp(p, kNtOut, static_cast<float>(nsel));
}
#endif

}  // namespace msa_topk
