// Per-row streaming top-M selection: the lane-level algorithm of sparse_topk_select.
//
// One row = one (token, head) pair. On the GPU a warp owns 32 rows, one per lane; every function here is the
// work of ONE lane on ITS row, so the same code compiles for the host (tests/core/test_topk_kernel.py builds
// topk_emulate.cc against this header and replays the kernel's control flow on the CPU with random warp votes).
//
// Keys: an order-preserving map float -> uint32 (larger float -> larger key; -0 and +0 share a key; only
// values > -inf and not NaN ever get a key, so every real key is >= 0x00800000 and key 0 means "nothing").
// A row's candidates live in a per-lane column of (key, block index) entries, always in ascending block-index
// order (appends come in index order and compaction is stable), so "ties toward the lower index" is "earlier
// position wins" and the pair (key, position) is a strict total order.
//
// Stream invariant: after a compaction the column holds exactly the best M of everything this lane has seen,
// and thr_key is the key of the worst of them. Anything later (higher index) with key <= thr_key cannot enter
// the best M, so only key > thr_key is appended. Votes (warp any/all) only decide WHEN work happens, never
// what is kept: any extra compaction or checked load leaves the result unchanged.
#pragma once

#include <stdint.h>

#ifdef __CUDACC__
#define MSA_TOPK_HD __host__ __device__ __forceinline__
#else
#include <math.h>
#include <string.h>
#define MSA_TOPK_HD inline
#endif

namespace msa_topk {

constexpr int kLanes = 32;  // column stride (entries of one lane are kLanes apart: conflict-free per warp)
constexpr int kBins = 16;   // radix digits per selection pass (4 bits)
constexpr int kHistRows = kBins + 1;  // + a spare bin for keys outside the window
constexpr int kGroup = 4;   // entries per load group in select_top

#ifdef __CUDACC__
using Cand = uint2;  // .x = key, .y = block index; 8-byte aligned so loads/stores are 64-bit
#else
struct Cand {
  uint32_t x, y;
};
#endif

#ifdef __CUDACC__
// One score of max_score as fp32 (every CUDA path loads through this; the host replays read arrays). Non-coherent
// loads that do not allocate in L1: each score is read once, so an L1 copy would only evict other lines (session 17
// run 6, H200, interleaved A/B against __ldg, all exact: 128K decode H4 4.01 -> 3.87
// us, 1M decode H1 6.16 -> 5.96, H4 10.90 -> 10.68, 128K prefill H4 38.8 -> 38.5, 1M prefill H1 68.9 -> 68.6; 128K
// decode H1 unchanged; ld.global.cg and ld.global.cs were no better).
template <typename T>
struct ScoreLoad;
template <>
struct ScoreLoad<float> {
  static __device__ __forceinline__ float load(const float* p) {
    float x;
    asm volatile("ld.global.nc.L1::no_allocate.f32 %0, [%1];" : "=f"(x) : "l"(p));
    return x;
  }
};
template <>
struct ScoreLoad<uint16_t> {  // bf16 bits: the float with the same top 16 bits is the exact value
  static __device__ __forceinline__ float load(const uint16_t* p) {
    unsigned short x;
    asm volatile("ld.global.nc.L1::no_allocate.u16 %0, [%1];" : "=h"(x) : "l"(p));
    return __uint_as_float(static_cast<uint32_t>(x) << 16);
  }
};
#endif

MSA_TOPK_HD Cand make_cand(uint32_t key, uint32_t idx) {
  Cand c;
  c.x = key;
  c.y = idx;
  return c;
}

MSA_TOPK_HD uint32_t umin32(uint32_t a, uint32_t b) { return a < b ? a : b; }
MSA_TOPK_HD uint32_t umax32(uint32_t a, uint32_t b) { return a > b ? a : b; }
MSA_TOPK_HD int imin32(int a, int b) { return a < b ? a : b; }
MSA_TOPK_HD int imax32(int a, int b) { return a > b ? a : b; }

MSA_TOPK_HD uint32_t float_bits(float v) {
#ifdef __CUDA_ARCH__
  return __float_as_uint(v);
#else
  uint32_t b;
  memcpy(&b, &v, 4);
  return b;
#endif
}

MSA_TOPK_HD float bits_float(uint32_t b) {
#ifdef __CUDA_ARCH__
  return __uint_as_float(b);
#else
  float v;
  memcpy(&v, &b, 4);
  return v;
#endif
}

MSA_TOPK_HD int count_leading_zeros(uint32_t x) {  // x != 0
#ifdef __CUDA_ARCH__
  return __clz(static_cast<int>(x));
#else
  return __builtin_clz(x);
#endif
}

// Key of a score that is > -inf and not NaN (callers only key values that passed `v > thr_val`).
MSA_TOPK_HD uint32_t score_key(float v) {
  // v + 0 turns -0 into +0 (round-to-nearest): -0 ties with +0, as float comparison and the reference's sort say
#ifdef __CUDA_ARCH__
  const uint32_t b = float_bits(__fadd_rn(v, 0.0f));
#else
  const uint32_t b = float_bits(v + 0.0f);  // not folded without -ffast-math (it changes -0)
#endif
  return b ^ (static_cast<uint32_t>(static_cast<int32_t>(b) >> 31) | 0x80000000u);
}

// Inverse of score_key for keys >= 0x00800000; key 0 ("accept everything real") maps to -inf.
MSA_TOPK_HD float key_value(uint32_t key) {
  if (key == 0u) return -INFINITY;
  return bits_float((key & 0x80000000u) ? (key ^ 0x80000000u) : ~key);
}

struct LaneState {
  uint32_t thr_key;  // append only key > thr_key
  float thr_val;     // key_value(thr_key): the same test on raw scores (NaN compares false)
  int cnt;           // entries in the column
};

MSA_TOPK_HD LaneState initial_state() {
  LaneState s;
  s.thr_key = 0u;
  s.thr_val = -INFINITY;
  s.cnt = 0;
  return s;
}

MSA_TOPK_HD void hist_increment(uint32_t* bin) {
#ifdef __CUDA_ARCH__
  atomicAdd(bin, 1u);  // result unused -> fire-and-forget RED: no load-use chain between entries
#else
  *bin += 1u;
#endif
}

// Shrink the column to at most max_keep (>= m) entries that include the best m (stable: survivors stay in
// index order) and raise the threshold to the worst survivor; max_keep == m keeps exactly the best m (needed
// before any output). No-op when cnt <= max_keep. MSB-first radix select over the keys actually present: each
// pass splits the current key window [lo, hi] into 16 equal bins (its top 4 significant bits), cutting the window
// 16x; it stops once keeping the whole boundary bin stays within max_keep, or the bin is a single key value.
// Keeping more than m is safe for the stream: the survivors are >= m entries at or above the new threshold, all
// with lower indices than anything still to come, so rejecting key <= thr_key never drops a top-m block.
// col: entry e at col[e * kLanes]; hist: bin b at hist[b * kLanes] (lane-private scratch).
MSA_TOPK_HD void select_top(Cand* col, uint32_t* hist, LaneState& st, int m, int max_keep) {
  const int n = st.cnt;
  if (n <= max_keep) return;
  if (m <= 0) {
    st.cnt = 0;
    return;
  }
  // Every loop below works on groups of kGroup entries: all loads of a group issue before any shared-memory
  // write of that group, so their latencies overlap (the compiler may not move a load above an earlier atomic
  // or store to the same array). Positions past n read key 0 / are skipped.
  uint32_t lo = 0xFFFFFFFFu, hi = 0u;
  for (int e0 = 0; e0 < n; e0 += kGroup) {
    uint32_t k[kGroup];
#pragma unroll
    for (int j = 0; j < kGroup; ++j) k[j] = e0 + j < n ? col[(e0 + j) * kLanes].x : 0u;
#pragma unroll
    for (int j = 0; j < kGroup; ++j) {
      lo = e0 + j < n ? umin32(lo, k[j]) : lo;
      hi = umax32(hi, k[j]);
    }
  }
  int need = m;  // how many to take from the window [lo, hi]; everything above hi is already taken
  uint32_t bound;
  int ties;  // keep key > bound, plus the first `ties` entries with key == bound
  for (;;) {
    if (lo == hi) {
      bound = lo;
      ties = need;
      break;
    }
    const uint32_t range = hi - lo;
    const int shift = imax32(0, 28 - count_leading_zeros(range));  // (range >> shift) <= 15
#pragma unroll
    for (int b = 0; b < kBins; ++b) hist[b * kLanes] = 0u;
    for (int e0 = 0; e0 < n; e0 += kGroup) {
      uint32_t d[kGroup];
#pragma unroll
      for (int j = 0; j < kGroup; ++j) d[j] = (e0 + j < n ? col[(e0 + j) * kLanes].x : 0u) - lo;  // key < lo wraps
#pragma unroll
      for (int j = 0; j < kGroup; ++j) {
        // out-of-window keys count in a spare bin (index kBins): no branch around the atomic
        const uint32_t bin = d[j] <= range ? (d[j] >> shift) : static_cast<uint32_t>(kBins);
        hist_increment(hist + bin * kLanes);
      }
    }
    int above = 0, sel_bin = 0, sel_cnt = 0, sel_above = 0;
    bool found = false;
#pragma unroll
    for (int b = kBins - 1; b >= 0; --b) {
      const int c = static_cast<int>(hist[b * kLanes]);
      const bool hit = !found && above + c >= need;
      sel_bin = hit ? b : sel_bin;
      sel_cnt = hit ? c : sel_cnt;
      sel_above = hit ? above : sel_above;
      found = found || hit;
      above += c;
    }
    need -= sel_above;  // >= 1
    const uint32_t nlo = lo + (static_cast<uint32_t>(sel_bin) << shift);
    const uint32_t width_m1 = (1u << shift) - 1u;
    const uint32_t nhi = (hi - nlo <= width_m1) ? hi : nlo + width_m1;
    if (m - need + sel_cnt <= max_keep) {  // keep the whole boundary bin: key >= nlo (nlo > 0: real keys are large)
      bound = nlo - 1u;
      ties = 0;
      break;
    }
    lo = nlo;
    hi = nhi;
  }
  int w = 0, eq = 0;
  uint32_t kmin = 0xFFFFFFFFu;
  for (int e0 = 0; e0 < n; e0 += kGroup) {
    Cand c[kGroup];
#pragma unroll
    for (int j = 0; j < kGroup; ++j) c[j] = e0 + j < n ? col[(e0 + j) * kLanes] : make_cand(0u, 0u);
#pragma unroll
    for (int j = 0; j < kGroup; ++j) {  // key 0 (past n) is below any bound: never kept
      const bool is_eq = c[j].x == bound;
      const bool keep = c[j].x > bound || (is_eq && eq < ties);
      eq += is_eq ? 1 : 0;
      col[w * kLanes] = c[j];  // slot w (<= e) is consumed: a dropped entry there is overwritten or past cnt
      w += keep ? 1 : 0;
      kmin = keep ? umin32(kmin, c[j].x) : kmin;
    }
  }
  st.cnt = w;  // in [m, max_keep]
  st.thr_key = kmin;
  st.thr_val = key_value(kmin);
}

// Survivors allowed by an in-stream compaction: half of the free room past m, so the next fill is still long.
MSA_TOPK_HD int stream_keep(int m, int cap, int batch) { return m + (cap - batch - m) / 2; }

// Stream raw scores of block indices [wlo, whi) (warp-uniform bounds) in batches of U; this lane takes only
// [elo, ehi). load(k) returns the score of block k as float. `cap` = column capacity; a batch appends at most
// U, so the column is compacted once any lane passes cap - U.
template <int U, class Vote, class Load>
MSA_TOPK_HD void scan_scores(LaneState& st, Cand* col, uint32_t* hist, int m, int cap, int wlo, int whi, int elo,
                             int ehi, const Load& load, Vote& vote) {
  if (wlo >= whi) return;
  float va[U], vb[U];
  auto fetch = [&](int k0, float(&v)[U]) {
    if (vote.all(elo <= k0 && k0 + U <= ehi)) {  // every lane takes the whole batch: no per-element checks
#pragma unroll
      for (int u = 0; u < U; ++u) v[u] = load(k0 + u);
    } else {
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int k = k0 + u;
        v[u] = (k >= elo && k < ehi) ? load(k) : -INFINITY;
      }
    }
  };
  int k0 = wlo;
  fetch(k0, va);
  for (;;) {
    const int k1 = k0 + U;
    const bool more = k1 < whi;
    if (more) fetch(k1, vb);  // next batch in flight while this one is filtered
    float mx = va[0];
#pragma unroll
    for (int u = 1; u < U; ++u) mx = fmaxf(mx, va[u]);  // fmaxf drops NaN
    if (vote.any(mx > st.thr_val)) {
      // Branch-free append: always write the next free slot, advance only on a hit (cnt <= cap - U on entry,
      // so the scratch write stays inside the column).
      const float thr = st.thr_val;
      int c = st.cnt;
#pragma unroll
      for (int u = 0; u < U; ++u) {
        col[c * kLanes] = make_cand(score_key(va[u]), static_cast<uint32_t>(k0 + u));
        c += va[u] > thr ? 1 : 0;
      }
      st.cnt = c;
      if (vote.any(st.cnt > cap - U)) select_top(col, hist, st, m, stream_keep(m, cap, U));
    }
    if (!more) break;
    k0 = k1;
#pragma unroll
    for (int u = 0; u < U; ++u) va[u] = vb[u];
  }
}

// Stream candidate entries 0..n-1 (n warp-uniform, in ascending index order); load(e) returns this lane's
// entry e, or key 0 when the lane has none there.
template <int U, class Vote, class Load>
MSA_TOPK_HD void stream_cands(LaneState& st, Cand* col, uint32_t* hist, int m, int cap, int n, const Load& load,
                              Vote& vote) {
  for (int e0 = 0; e0 < n; e0 += U) {
    Cand c[U];
    uint32_t mx = 0u;
#pragma unroll
    for (int u = 0; u < U; ++u) {
      c[u] = (e0 + u < n) ? load(e0 + u) : make_cand(0u, 0u);
      mx = umax32(mx, c[u].x);
    }
    if (!vote.any(mx > st.thr_key)) continue;
    const uint32_t thr = st.thr_key;
    int cnt = st.cnt;
#pragma unroll
    for (int u = 0; u < U; ++u) {
      col[cnt * kLanes] = c[u];
      cnt += c[u].x > thr ? 1 : 0;
    }
    st.cnt = cnt;
    if (vote.any(st.cnt > cap - U)) select_top(col, hist, st, m, stream_keep(m, cap, U));
  }
}

// Blocks a row may hold: forced [0, lo) and [hi, nvp); candidates [lo, hi).
struct RowRange {
  int nvp, lo, hi;
};

MSA_TOPK_HD RowRange row_range(int nvp, int n_blocks, int fb, int fe) {
  RowRange r;
  r.nvp = imin32(imax32(nvp, 0), n_blocks);
  r.lo = imin32(fb, r.nvp);
  r.hi = imax32(r.lo, r.nvp - fe);
  return r;
}

// Union [*lo, *hi) of the non-empty row ranges in a CTA's table (los[i], his[i]), i < n; empty: lo > hi.
MSA_TOPK_HD void union_of_ranges(const int* los, const int* his, int n, int* lo, int* hi) {
  int ulo = INT32_MAX, uhi = INT32_MIN;
  for (int i = 0; i < n; ++i) {
    const int a = los[i], b = his[i];
    ulo = a < b ? imin32(ulo, a) : ulo;
    uhi = a < b ? imax32(uhi, b) : uhi;
  }
  *lo = ulo;
  *hi = uhi;
}

// Final row: forced head, selected (already ascending), forced tail, -1 padding.
MSA_TOPK_HD void write_row(int32_t* row, int topk, const RowRange& r, const Cand* col, int cnt) {
  int e = 0;
  for (int b = 0; b < r.lo; ++b) row[e++] = b;
  for (int i = 0; i < cnt; ++i) row[e++] = static_cast<int32_t>(col[i * kLanes].y);
  for (int b = r.hi; b < r.nvp; ++b) row[e++] = b;
  for (; e < topk; ++e) row[e] = -1;
}

}  // namespace msa_topk
