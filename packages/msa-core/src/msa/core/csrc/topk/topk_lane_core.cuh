// Pieces shared by the register-resident top-k paths (reg: topk_reg_core.cuh, net: topk_net_core.cuh): a row sits
// in a segment of P lanes of one warp, V values per lane (lane r of the segment holds blocks [r V, r V + V)).
// Device only (the CPU replays model these steps with plain loops).
#pragma once

#include "topk_block_core.cuh"

#ifdef __CUDACC__
namespace msa_topk {

// The P lanes of this lane's segment.
template <int P>
__device__ __forceinline__ unsigned lane_seg_mask(int lane) {
  if constexpr (P == 32) {
    return 0xFFFFFFFFu;
  } else {
    return ((1u << P) - 1u) << (lane & ~(P - 1));
  }
}

// Inclusive prefix sum over the segment's lanes (lane r of P).
template <int P>
__device__ __forceinline__ int lane_seg_scan(int c, int r, unsigned smask) {
  int incl = c;
#pragma unroll
  for (int o = 1; o < P; o <<= 1) {
    const int y = __shfl_up_sync(smask, incl, o, P);
    incl += r >= o ? y : 0;
  }
  return incl;
}

// This lane's V scores of row (head h, token t) of max_score [H, K, Q], every load issued before any is used;
// blocks past K (or an invalid token) read as -inf.
template <typename T, int V>
__device__ __forceinline__ void lane_load_scores(const void* scores, int n_blocks, int64_t q, int h, int64_t t,
                                                 bool valid, int k0, float (&v)[V]) {
  const T* src = static_cast<const T*>(scores) + (static_cast<int64_t>(h) * n_blocks + k0) * q + (valid ? t : 0);
  if (valid && k0 + V <= n_blocks) {
#pragma unroll
    for (int j = 0; j < V; ++j) v[j] = ScoreLoad<T>::load(src + j * q);
  } else {
#pragma unroll
    for (int j = 0; j < V; ++j) v[j] = valid && k0 + j < n_blocks ? ScoreLoad<T>::load(src + j * q) : -INFINITY;
  }
}

// Blocks outside the row's selectable range [lo, hi) (forced or past num_valid_pages) and NaN become -inf (fmaxf
// returns the non-NaN operand).
template <int V>
__device__ __forceinline__ void lane_mask_scores(float (&v)[V], int k0, const RowRange& rr) {
  if (!(k0 >= rr.lo && k0 + V <= rr.hi)) {
#pragma unroll
    for (int j = 0; j < V; ++j) v[j] = k0 + j >= rr.lo && k0 + j < rr.hi ? v[j] : -INFINITY;
  }
#pragma unroll
  for (int j = 0; j < V; ++j) v[j] = fmaxf(v[j], -INFINITY);
}

// The rest of an output row once nsel selected blocks sit at [lo, lo + nsel): forced head [0, lo), forced tail
// [hi, nvp), then -1; the segment's P lanes share the writes.
template <int P>
__device__ __forceinline__ void lane_write_forced(int32_t* orow, const RowRange& rr, int nsel, int topk, int r) {
  for (int qq = r; qq < rr.lo; qq += P) orow[qq] = qq;
  const int tail = rr.nvp - rr.hi;
  for (int qq = rr.lo + nsel + r; qq < topk; qq += P) {
    const int u = qq - rr.lo - nsel;
    orow[qq] = u < tail ? rr.hi + u : -1;
  }
}

}  // namespace msa_topk
#endif
