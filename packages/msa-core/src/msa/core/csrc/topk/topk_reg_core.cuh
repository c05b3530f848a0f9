// "reg" path of sparse_topk_select: rows held in registers, no shared-memory staging, no CTA barriers (CUDA only).
//
// Why: the row path stages every row into shared memory (1.3-1.5 us of a ~3.3 us decode CTA at 128K) and then
// selects one row per warp (~300-700 warp instructions per row: issue-bound on 8K prefill, where 16K rows of 64
// blocks are selected). Here a row of K <= P * V blocks lives in the registers of P lanes of one warp (V values
// each, lane r of the row holds blocks r V .. r V + V - 1), so the loads are issued up front (all V of a lane
// in flight at once) and the selection is the work of P lanes with shuffles over their segment only.
//
// Warp = G = 32 / P rows (tokens t0 .. t0 + G - 1 of one head), row g in lanes [g P, g P + P). One load
// instruction j reads block r V + j of G consecutive tokens for each of the P lanes: G * 4 bytes of each of P
// K-rows (whole 32-byte sectors for G >= 8 in fp32). Every load is issued (blocks < K); NaN and blocks outside
// the row's eligible range [lo, hi) become -inf after the loads land (so a per-token nvp load never delays them).
// Selection per row (exact, ties toward the lower index; M = topk - fb - fe):
//  1. bound: Q = 32 / P groups per lane (consecutive values; min(Q, V) groups, the rest -inf) -> 32 group values
//     per row: group maxima (r = M) or, for M > 32, the groups' second largest (r = ceil(M / 2)). theta = the
//     r-th largest of the 32 (P = 32: each lane counts the lanes >= its value with 32 broadcasts and the largest
//     value counted >= r wins; P < 32: a bitonic sort of the 32 values over the segment's lanes x Q registers).
//     r groups hold >= c values >= theta each, so >= M values are >= theta: theta lower-bounds the row's M-th
//     best (an r-th largest of -inf: theta = -FLT_MAX, every finite value passes).
//  2. candidates (>= theta) are appended in index order (segment prefix sum of per-lane counts) to the row's
//     list in shared memory as 64-bit composites (score key << 32 | ~index: a strict total order).
//  3. n <= cap: rank of each candidate = number of greater candidates, rank < M is selected; the output
//     position = number of selected candidates before it in the (index-ordered) list (one ballot per P).
//     n > cap (heavy ties): M rounds of a segment argmax below the previous pick over the registers find the
//     M-th best composite T; one ordered pass writes every value with composite >= T.
// Output row: forced head [0, lo), the selected blocks ascending, forced tail [hi, nvp), then -1.
// CPU replay of this algorithm: topk_reg_emulate.cc.
#pragma once

#include <float.h>

#include "topk_lane_core.cuh"
#include "topk_row_core.cuh"

namespace msa_topk {

struct RegParams {
  const void* scores;  // max_score [H, K, Q] (fp32 or bf16)
  const int32_t* nvp;  // [Q] or nullptr -> nvp_scalar
  int32_t* out;        // [Q, H, topk]
  int64_t q;
  int n_blocks, n_heads, topk, fb, fe, m, nvp_scalar;
  int cap;     // candidate entries per row
  int stride;  // entries per row's list (cap + 1: an odd stride keeps the G rows' broadcasts in different banks)
};

constexpr int kRegMaxM = 64;

// Bitonic sort, descending, of the 32 values of a segment of P lanes x Q = 32 / P registers (element e = r Q + i
// of lane r, register i): element e ends with the e-th largest.
template <int P>
__device__ __forceinline__ void reg_seg_sort_desc(float (&x)[32 / P], int r, unsigned smask) {
  constexpr int Q = 32 / P;
#pragma unroll
  for (int k = 2; k <= 32; k <<= 1) {
#pragma unroll
    for (int j = k >> 1; j > 0; j >>= 1) {
      if (j < Q) {  // both elements in this lane
#pragma unroll
        for (int i = 0; i < Q; ++i) {
          if ((i & j) == 0) {
            const bool desc = ((r * Q + i) & k) == 0;
            const float a = x[i], b = x[i ^ j];
            const float mx = fmaxf(a, b), mn = fminf(a, b);
            x[i] = desc ? mx : mn;
            x[i ^ j] = desc ? mn : mx;
          }
        }
      } else {  // partner lane r ^ (j / Q), same register
        const int lj = j / Q;
        const bool lower = (r & lj) == 0;
#pragma unroll
        for (int i = 0; i < Q; ++i) {
          const bool desc = ((r * Q + i) & k) == 0;
          const float y = __shfl_xor_sync(smask, x[i], lj);
          x[i] = lower == desc ? fmaxf(x[i], y) : fminf(x[i], y);
        }
      }
    }
  }
}

// Segment max of a 64-bit composite (every lane of the segment gets it).
__device__ __forceinline__ Comp reg_seg_max_comp(Comp x, unsigned smask) {
  const uint32_t hi = __reduce_max_sync(smask, static_cast<uint32_t>(x >> 32));
  const uint32_t lo = __reduce_max_sync(smask, static_cast<uint32_t>(x >> 32) == hi ? static_cast<uint32_t>(x) : 0u);
  return (static_cast<Comp>(hi) << 32) | lo;
}

// theta: the rr-th largest (rr in 1..32) of the segment's 32 group values gv (-inf allowed; no NaN), as the
// candidate test's threshold (-FLT_MAX where it is -inf, so -inf never passes).
template <int P>
__device__ __forceinline__ float reg_theta(float (&gv)[32 / P], int rr, int r, unsigned smask) {
  if constexpr (P == 32) {
    const uint32_t key = key_or_zero(gv[0]);
    int cnt = 0;
#pragma unroll
    for (int s = 0; s < 32; ++s) cnt += __shfl_sync(0xFFFFFFFFu, key, s) >= key ? 1 : 0;
    const uint32_t tk = __reduce_max_sync(0xFFFFFFFFu, cnt >= rr ? key : 0u);
    return tk ? key_value(tk) : -FLT_MAX;
  } else {
    constexpr int Q = 32 / P;
    reg_seg_sort_desc<P>(gv, r, smask);
    const int pos = rr - 1;
    float s = gv[0];
#pragma unroll
    for (int i = 1; i < Q; ++i) s = (pos % Q) == i ? gv[i] : s;
    const float t = __shfl_sync(smask, s, pos / Q, P);
    return t > -INFINITY ? t : -FLT_MAX;
  }
}

// One warp: G = 32 / P rows (tokens t0 + g of head blockIdx.y), P lanes x V registers each. cand_warp: G lists of
// p.stride composites in shared memory.
template <typename T, int P, int V>
__device__ __forceinline__ void reg_select_warp(const RegParams& p, Comp* cand_warp, int64_t t0) {
  constexpr int Q = 32 / P;                 // group values per lane (32 per row)
  constexpr int QG = Q < V ? Q : V;         // real groups per lane (the other group values are -inf)
  constexpr int GS = V / QG;                // values per group (V, QG powers of two: QG * GS == V)
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

  float v[V];
  if (m > 0) lane_load_scores<T, V>(p.scores, p.n_blocks, p.q, h, t, valid, k0, v);
  const RowRange rr = row_range(nvp, p.n_blocks, p.fb, p.fe);
  int32_t* orow = p.out + (t * p.n_heads + h) * p.topk;
  int nsel = 0;
  if (m > 0) {
    lane_mask_scores<V>(v, k0, rr);

    // 1. theta
    float gv[Q];
    const bool two = m > 32;
#pragma unroll
    for (int i = 0; i < Q; ++i) gv[i] = -INFINITY;
    if (!two) {
#pragma unroll
      for (int j = 0; j < V; ++j) gv[j / GS] = fmaxf(gv[j / GS], v[j]);  // one flat unrolled loop: constant indices
    } else {
      float a[QG];
#pragma unroll
      for (int i = 0; i < QG; ++i) a[i] = -INFINITY;
#pragma unroll
      for (int j = 0; j < V; ++j) {
        gv[j / GS] = fmaxf(gv[j / GS], fminf(a[j / GS], v[j]));
        a[j / GS] = fmaxf(a[j / GS], v[j]);
      }
    }
    const float theta = reg_theta<P>(gv, two ? (m + 1) >> 1 : m, r, smask);

    // 2. candidates in index order
    int c = 0;
#pragma unroll
    for (int j = 0; j < V; ++j) c += v[j] >= theta ? 1 : 0;
    const int incl = lane_seg_scan<P>(c, r, smask);
    const int n = __shfl_sync(smask, incl, P - 1, P);
    Comp* cand = cand_warp + g * p.stride;
    const uint32_t lt = (1u << r) - 1u;
    const int seg_base = lane & ~(P - 1);
    if (n <= p.cap) {
      int pos = incl - c;
#pragma unroll
      for (int j = 0; j < V; ++j) {
        if (v[j] >= theta) {
          cand[pos] = make_comp(score_key(v[j]), static_cast<uint32_t>(k0 + j));
          ++pos;
        }
      }
      __syncwarp(smask);
      // 3. exact rank; positions in index order
      for (int e0 = 0; e0 < n; e0 += P) {
        const int e = e0 + r;
        const Comp x = e < n ? cand[e] : 0ull;
        int rank = 0;
#pragma unroll 4
        for (int f = 0; f < n; ++f) rank += cand[f] > x ? 1 : 0;
        const bool sel = e < n && rank < m;
        const uint32_t bal = __ballot_sync(smask, sel) >> seg_base;
        if (sel) orow[rr.lo + nsel + __popc(bal & lt)] = static_cast<int32_t>(comp_idx(x));
        nsel += __popc(bal);
      }
    } else {
      // heavy ties: M rounds of a segment argmax below the previous pick -> the M-th best composite
      Comp prev = ~0ull;
      int found = 0;
      for (int i = 0; i < m; ++i) {
        Comp best = 0ull;
#pragma unroll
        for (int j = 0; j < V; ++j) {
          if (v[j] >= theta) {
            const Comp cx = make_comp(score_key(v[j]), static_cast<uint32_t>(k0 + j));
            best = cx < prev && cx > best ? cx : best;
          }
        }
        best = reg_seg_max_comp(best, smask);
        if (best == 0ull) break;  // segment-uniform
        prev = best;
        ++found;
      }
      if (found > 0) {
        uint32_t sm = 0u;
#pragma unroll
        for (int j = 0; j < V; ++j) {
          const bool s = v[j] >= theta && make_comp(score_key(v[j]), static_cast<uint32_t>(k0 + j)) >= prev;
          sm |= s ? 1u << j : 0u;
        }
        const int cs = __popc(sm);
        const int inc2 = lane_seg_scan<P>(cs, r, smask);
        int pos = rr.lo + inc2 - cs;
#pragma unroll
        for (int j = 0; j < V; ++j) {
          if ((sm >> j) & 1u) orow[pos++] = k0 + j;
        }
        nsel = __shfl_sync(smask, inc2, P - 1, P);
      }
    }
  }
  if (valid) lane_write_forced<P>(orow, rr, nsel, p.topk, r);
}

}  // namespace msa_topk
