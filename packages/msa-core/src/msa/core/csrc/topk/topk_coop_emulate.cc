// CPU replay of the coop path (topk_coop_core.cuh), for tests only (never part of the JIT module).
//
// Per row, the kernel's partition and decisions with the kernel's own helpers: R = 32 W / G threads of V = 1024 / R
// values (thread i: blocks coop_block(i, j, R); past K, NaN and outside [lo, hi) -> -inf); supergroup of thread i =
// coop_group(i); theta = the supergroup maximum of rank M - 1 (coop_rank_of); candidates (coop_is_candidate)
// appended thread by thread in a random order (the kernel's shared atomics); n > cap -> the net selection on the
// row (the kernel's fallback warp: the net replay, P32 V32); else every candidate ranked by its composite key
// (make_comp(score_key(value), block)), rank < M kept, output by ascending block index (the kernel: kept in list
// order, slot = kept indices below); forced head / tail.
// tokens = 0: the tcoop layout (one row per CTA of 8 warps, thread i: blocks tcoop_block(i, j)), after checking that
// the cluster's loads (tcoop_load_block / tcoop_owner_thread) deliver exactly that layout and cover every block once.
// Returns the number of rows that took the fallback (>= 0), or < 0 on a broken invariant.
#include "topk_net_emulate.cc"  // msa_topk_net_emulate: the fallback rows (one translation unit)

#include <random>

#include "topk_coop_core.cuh"
#include "topk_emulate_rows.h"

extern "C" int msa_topk_coop_emulate(const float* scores, int n_heads, int n_blocks, int64_t q, int topk,
                                     const int32_t* nvp, int nvp_scalar, int fb, int fe, int tokens, int warps,
                                     int cap, uint64_t seed, int32_t* out) {
  const int m = topk - fb - fe;
  const bool tlayout = tokens == 0;
  if (tlayout && warps != 8) return -1;
  const int G = tlayout ? 1 : tokens, W = warps;
  if (m < 0 || m > kCoopMaxM || G < 1 || W < G || 32 % G != 0 || cap < 1 || cap > kCoopCap) return -1;
  const int R = 32 * W / G, V = kCoopRowBlocks / R;
  if (R % kCoopGroups != 0 || R * V != kCoopRowBlocks || n_blocks > kCoopRowBlocks) return -1;
  auto block_of = [&](int i, int j) { return tlayout ? tcoop_block(i, j) : coop_block(i, j, R); };
  if (tlayout) {  // the 8 CTAs x 32 supergroups x 4 loads of a cluster land where the selection expects them
    std::vector<int> seen(kCoopRowBlocks, 0);
    for (int c = 0; c < 8; ++c)
      for (int e = 0; e < kCoopGroups; ++e)
        for (int j = 0; j < V; ++j) {
          const int b = tcoop_load_block(c, e, j), i = tcoop_owner_thread(c, e);
          if (b < 0 || b >= kCoopRowBlocks || i < 0 || i >= R || block_of(i, j) != b || coop_group(i) != b % 32)
            return -5;
          ++seen[b];
        }
    for (int b = 0; b < kCoopRowBlocks; ++b)
      if (seen[b] != 1) return -5;
  }
  nvp_scalar = nvp != nullptr ? n_blocks : std::min(std::max(nvp_scalar, 0), n_blocks);
  std::mt19937_64 rng(seed);
  std::vector<float> x(kCoopRowBlocks), row(n_blocks);
  std::vector<Comp> cand;
  std::vector<int> order(R), sel;
  int fallbacks = 0;
  for (int h = 0; h < n_heads; ++h)
    for (int64_t t = 0; t < q; ++t) {
      const int nvp_t = nvp != nullptr ? nvp[t] : nvp_scalar;
      const RowRange rr = row_range(nvp_t, n_blocks, fb, fe);
      int32_t* orow = out + (t * n_heads + h) * topk;
      int nsel = 0;
      if (m > 0) {
        emulate_row_scores(scores, h, n_blocks, q, t, rr, kCoopRowBlocks, x.data());
        float sg[kCoopGroups];
        for (int e = 0; e < kCoopGroups; ++e) sg[e] = -INFINITY;
        for (int i = 0; i < R; ++i)
          for (int j = 0; j < V; ++j) sg[coop_group(i)] = std::max(sg[coop_group(i)], x[block_of(i, j)]);
        const int owner = coop_bound_owner(sg, m);
        if (owner < 0) return -2;  // ranks must be a permutation
        const float theta = sg[owner];
        for (int i = 0; i < R; ++i) order[i] = i;
        std::shuffle(order.begin(), order.end(), rng);
        cand.clear();
        for (int i : order)
          for (int j = 0; j < V; ++j) {
            const int b = block_of(i, j);
            if (coop_is_candidate(x[b], theta)) cand.push_back(make_comp(score_key(x[b]), static_cast<uint32_t>(b)));
          }
        const int n = static_cast<int>(cand.size());
        if (n > cap) {  // the kernel's fallback warp: the net selection writes the whole row
          ++fallbacks;
          for (int k = 0; k < n_blocks; ++k) row[k] = scores[(static_cast<int64_t>(h) * n_blocks + k) * q + t];
          const int rc = msa_topk_net_emulate(row.data(), 1, n_blocks, 1, topk, nullptr, nvp_t, fb, fe, 32, 32, 0, orow);
          if (rc != 0) return -10 + rc;
          continue;
        }
        nsel = std::min(n, m);
        sel.assign(nsel, -1);
        for (int c = 0; c < n; ++c) {
          int r = 0;
          for (int j = 0; j < n; ++j) r += cand[j] > cand[c] ? 1 : 0;
          if (r < m) {
            if (sel[r] != -1) return -3;  // two candidates of one rank
            sel[r] = static_cast<int>(comp_idx(cand[c]));
          }
        }
        for (int l = 0; l < nsel; ++l) {
          if (sel[l] < 0) return -4;
          int pos = 0;
          for (int j = 0; j < nsel; ++j) pos += sel[j] < sel[l] ? 1 : 0;
          orow[rr.lo + pos] = sel[l];
        }
      }
      emulate_write_forced(orow, rr, nsel, topk);
    }
  return fallbacks;
}
