// "row" path of sparse_topk_select: rows staged in shared memory, one warp selects one row (CUDA only).
//
// Why: the block path spends ~1-2K instructions per thread on cooperative selection (P threads per row, CTA
// barriers, shared atomics), so at 128K context and H = 1 (4096 rows of 1024 blocks, one wave of CTAs) it is
// issue-bound at ~2.7x the HBM floor. Here a row's selection is the work of one warp with shuffles / ballots
// only (~700 warp instructions for 1024 blocks), and the loads are a plain coalesced transpose.
//
// CTA = G tokens (rows) of one head, W >= G warps. Phase 1 (all warps): the union of the rows' eligible block
// ranges [ulo, uhi) is copied into shared memory, rows[g][k - ulo] (NaN and blocks outside the row's own range
// -> -inf). Thread tid loads row g = tid % G at k = tid / G + (T / G) * u: consecutive lanes read consecutive
// tokens, so each load instruction reads whole 32-byte sectors when G * sizeof(score) >= 32. Each thread also
// folds its values into group maxima gmax[g][k % 32] (shared atomicMax of order-preserving keys). Row padding
// (32 / G floats) makes the transposed stores conflict-free. Phase 2 (warp g < G, row g):
//  1. theta = the r-th largest of 32 group values: c = 1 (M <= 32: group maxima, r = M) or c = 2 (M <= 64: the
//     groups' second largest, recomputed by the warp, r = ceil(M / 2)). r groups hold c elements >= theta each,
//     so >= M elements are >= theta: theta lower-bounds the row's M-th best. With iid scores ~20 elements pass
//     for M = 15.
//  2. candidates (finite, >= theta) are appended lane by lane (warp prefix sum of per-lane counts) as 64-bit
//     composite keys (score key << 32 | ~index: value desc, index asc, a strict total order).
//  3. n <= cap: each candidate's rank = number of greater candidates; rank < M is selected; each selected
//     block's output position = the number of selected blocks with a smaller index.
//     n > cap (heavy ties): M rounds of a warp-wide argmax over the row (exact, slower) find the M-th best
//     composite T; one ordered pass writes every element with composite >= T.
// Output row: forced head [0, lo), the selected blocks ascending, forced tail [hi, nvp), then -1.
#pragma once

#include <float.h>

#include "topk_lane_core.cuh"

namespace msa_topk {

struct RowParams {
  const void* scores;  // max_score [H, K, Q] (fp32 or bf16)
  const int32_t* nvp;  // [Q] or nullptr -> nvp_scalar
  int32_t* out;        // [Q, H, topk]
  int64_t q;
  int n_blocks, n_heads, topk, fb, fe, m, nvp_scalar;
  int log_g;   // tokens per CTA = 1 << log_g (<= 32, <= warps)
  int stride;  // floats per staged row (row_stride)
  int cap;     // candidate entries per row (multiple of 32)
  unsigned long long* trace;  // diagnostic (nullptr = off): per CTA %globaltimer at start / staged / warp 0 done
};

constexpr int kRowMaxM = 64;       // c <= 2 group values per lane
constexpr unsigned kRowFull = 0xFFFFFFFFu;

// Staged row length: K rounded up to 32, plus 32 / G floats so the G rows of one transposed store hit
// different banks (row g starts at bank 32 / G * g).
__host__ __device__ inline int row_stride(int n_blocks, int g) { return (n_blocks + 31) / 32 * 32 + 32 / g; }

__host__ __device__ inline size_t row_smem_bytes(int n_blocks, int g, int cap) {
  // rows [G][stride] f32 (G * stride is a multiple of 32: the 8-byte candidates stay aligned), candidates
  // [G][cap] u64, group maxima [G][32] u32, ranges [2][G] i32
  return static_cast<size_t>(g) * row_stride(n_blocks, g) * 4 + static_cast<size_t>(g) * cap * 8 +
         static_cast<size_t>(g) * 32 * 4 + 2 * static_cast<size_t>(g) * 4;
}

__device__ __forceinline__ uint32_t lanemask_lt() {
  uint32_t m;
  asm("mov.u32 %0, %%lanemask_lt;" : "=r"(m));
  return m;
}

__device__ __forceinline__ unsigned long long global_ns() {
  unsigned long long t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

// Row range of token t (per-token nvp tensor or the scalar).
__device__ __forceinline__ RowRange token_row_range(const RowParams& p, int64_t t) {
  return row_range(p.nvp != nullptr ? __ldg(p.nvp + t) : p.nvp_scalar, p.n_blocks, p.fb, p.fe);
}

__device__ __forceinline__ uint32_t key_or_zero(float v) { return v > -INFINITY ? score_key(v) : 0u; }

// Warp max of a 64-bit composite (two 32-bit reductions; every lane gets the result).
__device__ __forceinline__ Comp warp_max_comp(Comp x) {
  const uint32_t hi = __reduce_max_sync(kRowFull, static_cast<uint32_t>(x >> 32));
  const uint32_t lo = __reduce_max_sync(kRowFull, static_cast<uint32_t>(x >> 32) == hi ? static_cast<uint32_t>(x) : 0u);
  return (static_cast<Comp>(hi) << 32) | lo;
}

// Exact top m of n candidate composites (one warp; n small): rank = number of greater candidates, rank < m is
// selected; the selected block indices go to sel_idx (scratch of >= m ints), then each one is written at its
// position among them in index order: orow_sel[pos]. Returns the number selected (min(m, n)).
__device__ __forceinline__ int rank_select_write(const Comp* cand, int n, int m, int* sel_idx, int32_t* orow_sel,
                                                 int lane) {
  const uint32_t lt = lanemask_lt();
  int nsel = 0;
  for (int e0 = 0; e0 < n; e0 += 32) {
    const int e = e0 + lane;
    const Comp x = e < n ? cand[e] : 0ull;
    int rank = 0;
#pragma unroll 4
    for (int f = 0; f < n; ++f) rank += cand[f] > x ? 1 : 0;
    const bool sel = e < n && rank < m;
    const uint32_t bal = __ballot_sync(kRowFull, sel);
    if (sel) sel_idx[nsel + __popc(bal & lt)] = static_cast<int>(comp_idx(x));
    nsel += __popc(bal);
  }
  __syncwarp();
  for (int e = lane; e < nsel; e += 32) {
    const int idx = sel_idx[e];
    int pos = 0;
#pragma unroll 4
    for (int f = 0; f < nsel; ++f) pos += sel_idx[f] < idx ? 1 : 0;
    orow_sel[pos] = idx;
  }
  return nsel;
}

// Forced head, forced tail, -1 padding of an output row (one warp), around the nsel selected blocks already
// written at [lo, lo + nsel).
__device__ __forceinline__ void write_forced(int32_t* orow, int topk, const RowRange& rr, int nsel, int lane) {
  const int tail = rr.nvp - rr.hi;
  for (int q = lane; q < topk; q += 32) {
    if (q < rr.lo) {
      orow[q] = q;
    } else if (q >= rr.lo + nsel) {
      const int u = q - rr.lo - nsel;
      orow[q] = u < tail ? rr.hi + u : -1;
    }
  }
}

// This lane's group value for the theta bound of a row with m to select (row = the staged row + lane, nj lines):
// m <= 32: gkey (the lane's group maximum, r = m); m <= 64: the second largest of offsets lane + 32 j (r =
// ceil(m / 2)). r groups holding c = m <= 32 ? 1 : 2 values >= theta each give >= m values >= theta.
__device__ __forceinline__ uint32_t theta_group_key(const float* row, uint32_t gkey, int nj, int m, int* r) {
  if (m <= 32) {
    *r = m;
    return gkey;
  }
  float a1 = -INFINITY, b1 = -INFINITY;  // this lane's two largest
  for (int j = 0; j < nj; ++j) {
    const float x = fmaxf(row[j << 5], -INFINITY);  // NaN (the row path stages it as is) -> -inf
    b1 = fmaxf(b1, fminf(a1, x));
    a1 = fmaxf(a1, x);
  }
  *r = (m + 1) >> 1;
  return key_or_zero(b1);
}

// Bitonic sort of one key per lane across the warp: lane i ends with the i-th largest.
__device__ __forceinline__ uint32_t warp_sort_desc(uint32_t key, int lane) {
#pragma unroll
  for (int kb = 2; kb <= 32; kb <<= 1) {
#pragma unroll
    for (int jb = kb >> 1; jb > 0; jb >>= 1) {
      const uint32_t o = __shfl_xor_sync(kRowFull, key, jb);
      const bool take_max = ((lane & jb) == 0) == ((lane & kb) == 0);  // descending overall
      key = take_max ? umax32(key, o) : umin32(key, o);
    }
  }
  return key;
}

// Candidates of a staged row (offsets k < 32 nj, block ulo + k): every value >= theta becomes a composite
// appended to cand (a local or a cluster-remote buffer of cap entries; positions >= cap are counted, not
// written). Per 32 lines: a per-lane bit mask, a warp prefix sum of the counts, and reserve(total) -> the
// chunk's base position (warp-uniform), then each lane appends its own (lane-major order: ~1 per lane).
template <class Reserve>
__device__ __forceinline__ void scan_candidates(const float* row_base, int nj, bool pairs, float theta, int ulo,
                                                Comp* cand, int cap, int lane, Reserve&& reserve) {
  const float* row = row_base + lane;
  for (int jc = 0; jc < nj; jc += 32) {
    const int jn = imin32(32, nj - jc);
    // bit b of this chunk (32 lines = 1024 offsets): offset (jc << 5) + chunk_offset(b)
    uint32_t mask = 0u;
    if (jn == 32 && pairs) {
      // 8-byte reads: lane holds offsets 64 i + 2 lane + {0, 1} (bits 2 i, 2 i + 1); half the load instructions
      const float2* r2 = reinterpret_cast<const float2*>(row_base + (jc << 5)) + lane;
#pragma unroll
      for (int i = 0; i < 16; ++i) {
        const float2 x = r2[i << 5];
        mask |= (x.x >= theta ? 1u << (2 * i) : 0u) | (x.y >= theta ? 2u << (2 * i) : 0u);
      }
    } else if (jn == 32) {
#pragma unroll
      for (int j = 0; j < 32; ++j) mask |= row[(jc + j) << 5] >= theta ? 1u << j : 0u;
    } else {
      for (int j = 0; j < jn; ++j) mask |= row[(jc + j) << 5] >= theta ? 1u << j : 0u;
    }
    const bool paired = jn == 32 && pairs;
    const int c = __popc(mask);
    const int incl = lane_seg_scan<32>(c, lane, kRowFull);
    const int total = __shfl_sync(kRowFull, incl, 31);
    if (total == 0) continue;  // warp-uniform
    int pos = reserve(total) + incl - c;
    while (mask) {
      const int b = __ffs(mask) - 1;
      mask &= mask - 1u;
      const int k = (jc << 5) + (paired ? ((b >> 1) << 6) + 2 * lane + (b & 1) : (b << 5) + lane);
      if (pos < cap) cand[pos] = make_comp(score_key(row_base[k]), static_cast<uint32_t>(ulo + k));
      ++pos;
    }
  }
}

// Phase 2 for one row (one warp): row_base = the staged row (block ulo + k at offset k, -inf where not
// eligible, nj lines of 32), cand = its candidate buffer, gmax_row = its 32 group-maxima keys (reset here),
// has = the row has eligible blocks, orow = its output row.
__device__ __forceinline__ void row_select_warp(const RowParams& p, float* row_base, Comp* cand, uint32_t* gmax_row,
                                                int ulo, int nj, bool has, const RowRange& rr, int32_t* orow,
                                                int lane) {
  const float* row = row_base + lane;  // this lane's offsets lane + 32 j
  const bool pairs = (p.stride & 1) == 0;  // rows 8-byte aligned: the candidate scan reads float2
  const uint32_t gkey = gmax_row[lane];
  const int m = p.m;
  const uint32_t lt = lanemask_lt();
  int nsel = 0;
  if (m > 0 && has) {
    // 1. theta: the r-th largest of the 32 group values (bitonic sort of their keys across the warp)
    int r;
    const uint32_t key = warp_sort_desc(theta_group_key(row, gkey, nj, m, &r), lane);
    const uint32_t theta_key = __shfl_sync(kRowFull, key, r - 1);
    // -inf never passes: with fewer than r group values every finite element is a candidate
    const float theta = theta_key ? key_value(theta_key) : -FLT_MAX;

    // 2. candidates: appended lane-major at offsets from a running count
    int n = 0;
    scan_candidates(row_base, nj, pairs, theta, ulo, cand, p.cap, lane, [&](int total) {
      const int base = n;
      n += total;
      return base;
    });
    __syncwarp();
    if (n <= p.cap) {
      // 3. exact rank among n candidates (the staging area is no longer read: scratch for the selected indices)
      nsel = rank_select_write(cand, n, m, reinterpret_cast<int*>(row_base), orow + rr.lo, lane);
    } else {
      // heavy ties: M rounds of warp argmax below the previous pick find the M-th best composite
      Comp prev = ~0ull;
      int found = 0;
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
        prev = best;
        ++found;
      }
      for (int j = 0; j < nj && found > 0; ++j) {
        const float x = row[j << 5];
        const int k = (j << 5) + lane;
        const bool sel = x >= theta && make_comp(score_key(x), static_cast<uint32_t>(ulo + k)) >= prev;
        const uint32_t bal = __ballot_sync(kRowFull, sel);
        if (sel) orow[rr.lo + nsel + __popc(bal & lt)] = ulo + k;
        nsel += __popc(bal);
      }
    }
  }
  write_forced(orow, p.topk, rr, nsel, lane);
}

// Phase-1 copy of one thread's share of a staged row: offsets k = kk + per * i < span_pad, read from src (the
// score at offset kk; offset k + 1 is q elements further) and stored at dst[k - kk] (dst = the staged row + kk);
// loads only offsets in [a, b) (-inf elsewhere), kRowUnroll loads in flight. Returns the maximum (NaN dropped).
// kSquashNaN: NaN is stored as -inf; else as is -- the row path's readers all test x >= theta or x > -inf, which
// NaN fails, or squash it themselves (theta_group_key), so its staging saves one FMNMX per value (H200, session 16
// run 4: 128K prefill H4 38.76 -> 38.04 us, H1 11.91 -> 11.84).
template <typename T, int kRowUnroll, bool kSquashNaN = true>
__device__ __forceinline__ float stage_span(const T* src, int64_t q, int per, int kk, int a, int b, int span_pad,
                                            float* dst) {
  const int64_t step = static_cast<int64_t>(per) * q;
  float mx = -INFINITY;
  for (int k0 = kk; k0 < span_pad; k0 += per * kRowUnroll) {
    float v[kRowUnroll];
    if (k0 >= a && k0 + per * (kRowUnroll - 1) < b) {  // whole chunk inside the row: no per-element checks
#pragma unroll
      for (int u = 0; u < kRowUnroll; ++u) v[u] = ScoreLoad<T>::load(src + u * step);
#pragma unroll
      for (int u = 0; u < kRowUnroll; ++u) {
        const float x = kSquashNaN ? fmaxf(v[u], -INFINITY) : v[u];  // NaN -> -inf (fmaxf: the non-NaN operand)
        mx = fmaxf(mx, x);
        dst[u * per] = x;
      }
    } else {
#pragma unroll
      for (int u = 0; u < kRowUnroll; ++u) {
        const int k = k0 + per * u;
        v[u] = k >= a && k < b ? ScoreLoad<T>::load(src + u * step) : -INFINITY;
      }
#pragma unroll
      for (int u = 0; u < kRowUnroll; ++u) {
        const float x = kSquashNaN ? fmaxf(v[u], -INFINITY) : v[u];
        mx = fmaxf(mx, x);
        if (k0 + per * u < span_pad) dst[u * per] = x;
      }
    }
    src += kRowUnroll * step;
    dst += kRowUnroll * per;
  }
  return mx;
}

// kRowUnroll: loads in flight per thread in phase 1.
template <typename T, int kRowUnroll>
__device__ __forceinline__ void row_select_cta(const RowParams& p) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int G = 1 << p.log_g;
  const int n_threads = blockDim.x, tid = threadIdx.x, h = blockIdx.y;
  float* rows = reinterpret_cast<float*>(smem_raw);
  Comp* cands = reinterpret_cast<Comp*>(rows + static_cast<size_t>(G) * p.stride);
  uint32_t* gmax = reinterpret_cast<uint32_t*>(cands + static_cast<size_t>(G) * p.cap);
  int* range = reinterpret_cast<int*>(gmax + G * 32);
  const int64_t t0 = static_cast<int64_t>(blockIdx.x) * G;
  unsigned long long* trace =
      p.trace != nullptr ? p.trace + 3 * (static_cast<size_t>(blockIdx.y) * gridDim.x + blockIdx.x) : nullptr;
  if (trace != nullptr && threadIdx.x == 0) trace[0] = global_ns();

  // ---- phase 1: stage [ulo, uhi) of every row
  const int gl = tid & (G - 1);  // this thread's row (n_threads is a multiple of G)
  const int64_t tl = t0 + gl;
  int elo = 0, ehi = 0;
  if (tl < p.q && p.m > 0) {
    const RowRange rl = token_row_range(p, tl);
    elo = rl.lo;
    ehi = rl.hi;
  }
  // one thread per (row, group) when W == G: group maxima are plain stores, nothing to zero first
  const bool own_groups = n_threads == 32 * G;
  int ulo = INT32_MAX, uhi = INT32_MIN;
  if (p.nvp == nullptr && own_groups) {
    // one scalar nvp: every row with tokens has the same range; no shared table, no barrier before staging
    const RowRange rs = row_range(p.nvp_scalar, p.n_blocks, p.fb, p.fe);
    if (p.m > 0 && rs.lo < rs.hi) {
      ulo = rs.lo;
      uhi = rs.hi;
    }
  } else {
    if (tid < G * 32) gmax[tid] = 0u;
    if (tid < G) {  // (the first G threads are rows 0..G-1)
      range[tid] = elo;
      range[G + tid] = ehi;
    }
    __syncthreads();
    union_of_ranges(range, range + G, G, &ulo, &uhi);
  }
  const int span = ulo < uhi ? uhi - ulo : 0;
  const int span_pad = (span + 31) & ~31;  // staged length: [span, span_pad) is -inf, so warps read whole lines
  const int per = n_threads >> p.log_g;    // k-rows per pass
  const int kk = tid >> p.log_g;
  const int a = elo - ulo, b = ehi - ulo;   // this thread's row: loads only for offsets in [a, b)
  const T* src = static_cast<const T*>(p.scores) + (static_cast<int64_t>(h) * p.n_blocks + (span ? ulo : 0)) * p.q +
                 (tl < p.q ? tl : 0) + kk * p.q;
  const float mx = stage_span<T, kRowUnroll, false>(src, p.q, per, kk, a, b, span_pad,
                                             rows + static_cast<size_t>(gl) * p.stride + kk);
  // group maxima, groups = block offset mod 32 (any partition of the row works for the theta bound)
  if (own_groups) {
    gmax[gl * 32 + kk] = key_or_zero(mx);
  } else if (mx > -INFINITY) {
    atomicMax(gmax + gl * 32 + (kk & 31), score_key(mx));
  }
  __syncthreads();
  if (trace != nullptr && threadIdx.x == 0) trace[1] = global_ns();

  // ---- phase 2: warp g selects row g
  const int g = tid >> 5, lane = tid & 31;
  if (g >= G) return;  // no barrier below
  const int64_t t = t0 + g;
  if (t >= p.q) return;
  const RowRange rr = token_row_range(p, t);
  row_select_warp(p, rows + static_cast<size_t>(g) * p.stride, cands + static_cast<size_t>(g) * p.cap, gmax + g * 32,
                  ulo, span_pad >> 5, rr.lo < rr.hi, rr, p.out + (t * p.n_heads + h) * p.topk, lane);
  if (trace != nullptr && threadIdx.x == 0) trace[2] = global_ns();
}


}  // namespace msa_topk
