// "cluster" path of sparse_topk_select: few long rows (decode at 128K-1M context), CUDA only (sm_90+).
//
// Why: with total_q = 64 and H = 1..4 there are only 64-256 rows, so one warp (or one CTA) per row leaves most
// SMs idle and walks 8192 blocks serially, and a CTA of G = 1..2 tokens reads 4-8 bytes of every 32-byte
// sector of a K-row. Here a cluster of S CTAs (S <= 8, portable) splits K: CTA s of cluster (token group,
// head) stages blocks [s L, (s + 1) L) of G rows (G tokens: 8 x 4 B = whole 32-byte sectors), so H * S *
// ceil(q / G) CTAs share the work and each row's selection is spread over S warps on S SMs.
//
// Per row (warp g of every CTA in the cluster does row g on its slice; no extra launch, no workspace):
//  1. like the row path, the slice's 32 group values (group maxima, or second largest for M > 32) sorted
//     descending across the warp, published in shared memory. Cluster barrier.
//  2. theta = the r-th largest of the union of the S published lists (r = M, or ceil(M / 2) for second
//     largest): lane i reads list s's i-th value (DSMEM), and S - 1 bitonic merges (elementwise max with the
//     reversed other list, then a 5-step half-cleaner) keep the top 32 of the union. r groups each hold c >= 1
//     (2) values >= theta, so >= M values of the row are >= theta: theta lower-bounds the row's M-th best over
//     the whole row (S * 32 groups: ~M + M^2 / (2 * 32 S) candidates for iid scores, ~16 for M = 15, S = 8).
//  3. the slice's candidates (>= theta) are appended to the row's owner CTA (rank g % S) through DSMEM: one
//     remote atomicAdd per 32 lines reserves a warp's run, each lane writes its own composites (score key << 32
//     | ~index: value desc, index asc). Cluster barrier.
//  4. owner warp: n <= cap -> exact rank select among the n candidates (shared with the row path), output in
//     index order. n > cap (heavy ties) -> M rounds of warp argmax below the previous pick over all S staged
//     slices (DSMEM reads; exact, slow, rare), then one ordered pass over the slices in index order.
//  5. forced head / tail / -1, and a final cluster barrier so no CTA's shared memory goes away while a
//     fallback may still read it.
// Exactness does not depend on the order of the remote appends: the owner ranks composite keys.
#pragma once

#include <cooperative_groups.h>

#include "topk_row_core.cuh"

namespace msa_topk {

constexpr int kClusterMaxSlices = 8;  // portable cluster size

struct ClusterParams {
  const void* scores;  // max_score [H, K, Q] (fp32 or bf16)
  const int32_t* nvp;  // [Q] or nullptr -> nvp_scalar
  int32_t* out;        // [Q, H, topk]
  int64_t q;
  int n_blocks, n_heads, topk, fb, fe, m, nvp_scalar;
  int log_g;      // tokens per CTA = 1 << log_g (<= warps)
  int slices;     // S = CTAs per cluster (gridDim.x)
  int slice_len;  // L: blocks per slice, a multiple of 32
  int stride;     // floats per staged row: L + 32 / G
  int cap;        // candidate entries per owned row
};

__host__ __device__ inline int cluster_owned_rows(int g, int slices) { return (g + slices - 1) / slices; }

__host__ __device__ inline size_t cluster_smem_bytes(int slice_len, int g, int slices, int cap) {
  // rows [G][L + 32 / G] f32 (a multiple of 32 floats), owned candidates [ceil(G / S)][cap] u64, sorted group
  // keys [G][32] u32, owned counters [ceil(G / S)], ranges [2][G], staged window (ulo, lines) [2]
  const size_t own = cluster_owned_rows(g, slices);
  return static_cast<size_t>(g) * (slice_len + 32 / g) * 4 + own * cap * 8 + static_cast<size_t>(g) * 32 * 4 +
         own * 4 + 2 * static_cast<size_t>(g) * 4 + 2 * 4;
}

__device__ __forceinline__ RowRange cluster_row_range(const ClusterParams& p, int64_t t) {
  return row_range(p.nvp != nullptr ? __ldg(p.nvp + t) : p.nvp_scalar, p.n_blocks, p.fb, p.fe);
}

template <typename T, int kUnroll>
__device__ __forceinline__ void cluster_select_cta(const ClusterParams& p) {
  namespace cg = cooperative_groups;
  cg::cluster_group cluster = cg::this_cluster();
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int G = 1 << p.log_g, S = p.slices;
  const int rank = static_cast<int>(cluster.block_rank());  // == blockIdx.x: cluster dims (S, 1, 1), grid.x == S
  const int n_threads = blockDim.x, tid = threadIdx.x, h = blockIdx.z;
  const int n_own = cluster_owned_rows(G, S);
  float* rows = reinterpret_cast<float*>(smem_raw);
  Comp* cands = reinterpret_cast<Comp*>(rows + static_cast<size_t>(G) * p.stride);
  uint32_t* gkeys = reinterpret_cast<uint32_t*>(cands + static_cast<size_t>(n_own) * p.cap);
  int* counts = reinterpret_cast<int*>(gkeys + G * 32);
  int* range = counts + n_own;
  int* window = range + 2 * G;
  const int64_t t0 = static_cast<int64_t>(blockIdx.y) * G;

  // ---- phase 1: stage this slice's part of every row's eligible range
  const int ks = rank * p.slice_len, ke = imin32(ks + p.slice_len, p.n_blocks);
  const int gl = tid & (G - 1);
  const int64_t tl = t0 + gl;
  int elo = 0, ehi = 0;
  if (tl < p.q && p.m > 0) {
    const RowRange rl = cluster_row_range(p, tl);
    elo = imax32(rl.lo, ks);
    ehi = imin32(rl.hi, ke);
    if (elo >= ehi) elo = ehi = 0;
  }
  for (int i = tid; i < G * 32; i += n_threads) gkeys[i] = 0u;
  if (tid < n_own) counts[tid] = 0;
  if (tid < G) {
    range[tid] = elo;
    range[G + tid] = ehi;
  }
  __syncthreads();
  int ulo, uhi;
  union_of_ranges(range, range + G, G, &ulo, &uhi);
  const int span = ulo < uhi ? uhi - ulo : 0;
  if (span == 0) ulo = 0;
  const int span_pad = (span + 31) & ~31;
  const int nj = span_pad >> 5;
  if (tid == 0) {
    window[0] = ulo;
    window[1] = nj;
  }
  const int per = n_threads >> p.log_g;
  const int kk = tid >> p.log_g;
  const T* src = static_cast<const T*>(p.scores) + (static_cast<int64_t>(h) * p.n_blocks + ulo) * p.q +
                 (tl < p.q ? tl : 0) + kk * p.q;
  const float mx = stage_span<T, kUnroll>(src, p.q, per, kk, elo - ulo, ehi - ulo, span_pad,
                                          rows + static_cast<size_t>(gl) * p.stride + kk);
  // groups = kk mod 32 (any partition of the slice into 32 groups serves the bound)
  if (mx > -INFINITY) atomicMax(gkeys + gl * 32 + (kk & 31), score_key(mx));
  __syncthreads();

  // ---- phase 2: warp g works on row g
  const int warp = tid >> 5, lane = tid & 31;
  const int64_t t = t0 + warp;
  const bool row_warp = warp < G && t < p.q && p.m > 0;  // warp-uniform
  float* row_base = rows + static_cast<size_t>(imin32(warp, G - 1)) * p.stride;
  int r = 1;
  if (warp < G) {
    uint32_t key = 0u;
    if (row_warp) key = theta_group_key(row_base + lane, gkeys[warp * 32 + lane], nj, p.m, &r);
    gkeys[warp * 32 + lane] = warp_sort_desc(key, lane);  // this warp alone reads / writes row warp's keys
  }
  cluster.sync();  // every slice's sorted group keys are visible

  const int owner = warp % S, own_slot = warp / S;
  if (row_warp) {
    // theta over the whole row: top 32 of the union of the S sorted lists
    uint32_t top = *cluster.map_shared_rank(gkeys + warp * 32 + lane, 0);
    for (int s = 1; s < S; ++s) {
      const uint32_t x = *cluster.map_shared_rank(gkeys + warp * 32 + lane, s);
      top = umax32(top, __shfl_sync(kRowFull, x, 31 - lane));  // bitonic: the union's top 32
#pragma unroll
      for (int jb = 16; jb > 0; jb >>= 1) {
        const uint32_t o = __shfl_xor_sync(kRowFull, top, jb);
        top = (lane & jb) == 0 ? umax32(top, o) : umin32(top, o);
      }
    }
    const uint32_t theta_key = __shfl_sync(kRowFull, top, r - 1);
    const float theta = theta_key ? key_value(theta_key) : -FLT_MAX;  // -inf never passes
    Comp* dst = cluster.map_shared_rank(cands + static_cast<size_t>(own_slot) * p.cap, owner);
    int* cnt = cluster.map_shared_rank(counts + own_slot, owner);
    scan_candidates(row_base, nj, (p.stride & 1) == 0, theta, ulo, dst, p.cap, lane, [&](int total) {
      int base = 0;
      if (lane == 0) base = atomicAdd(cnt, total);
      return __shfl_sync(kRowFull, base, 0);
    });
  }
  cluster.sync();  // every candidate is in its owner's buffer

  if (warp < G && owner == rank && t < p.q) {
    const RowRange rr = cluster_row_range(p, t);
    int32_t* orow = p.out + (t * p.n_heads + h) * p.topk;
    int nsel = 0;
    if (p.m > 0 && rr.lo < rr.hi) {
      const int n = counts[own_slot];
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
  cluster.sync();  // no CTA exits while a fallback may read its shared memory
}

}  // namespace msa_topk
