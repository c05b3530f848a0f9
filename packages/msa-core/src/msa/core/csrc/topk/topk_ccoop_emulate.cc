// CPU replay of the ccoop path (topk_ccoop_core.cuh), for tests only (never part of the JIT module).
//
// Per row, the kernel's partition and decisions with the kernel's own helpers: S = ceil(K / 1024) slices, R =
// 32 W / G threads per row and slice, V = 1024 / R values each (thread i of slice s: blocks ccoop_block(s, i, j, R);
// past K, NaN and outside [lo, hi) -> -inf); supergroup of thread i = coop_group(i) (= block mod 32), its maximum
// over every slice; theta = the supergroup maximum of rank M - 1 (coop_rank_of); candidates (coop_is_candidate)
// appended slice by slice and thread by thread in a random order (the kernel's remote atomics); n > cap -> the
// fallback's M rounds of ccoop_best_below over the raw row (what the owner warp's 32 lanes reduce); else every
// candidate ranked by its composite key, rank < M kept, output by ascending block index; forced head / tail.
// Returns the number of rows that took the fallback (>= 0), or < 0 on a broken invariant.
#include <algorithm>
#include <random>
#include <utility>
#include <vector>

#include "topk_ccoop_core.cuh"
#include "topk_emulate_rows.h"

using namespace msa_topk;

extern "C" int msa_topk_ccoop_emulate(const float* scores, int n_heads, int n_blocks, int64_t q, int topk,
                                      const int32_t* nvp, int nvp_scalar, int fb, int fe, int tokens, int warps,
                                      int cap, uint64_t seed, int32_t* out) {
  const int m = topk - fb - fe;
  const int G = tokens, W = warps;
  if (m < 0 || m > kCoopMaxM || G < 1 || W < G || 32 % G != 0 || W % G != 0 || cap < 1 || cap > kCcoopCap)
    return -1;
  const int R = 32 * W / G, V = kCoopRowBlocks / R;
  const int S = (n_blocks + kCoopRowBlocks - 1) / kCoopRowBlocks;
  if (R % kCoopGroups != 0 || R * V != kCoopRowBlocks || S < 2 || S > kCcoopMaxSlices || G > S) return -1;
  nvp_scalar = nvp != nullptr ? n_blocks : std::min(std::max(nvp_scalar, 0), n_blocks);
  std::mt19937_64 rng(seed);
  const int width = S * kCoopRowBlocks;
  std::vector<float> x(width);
  std::vector<Comp> cand;
  std::vector<std::pair<int, int>> order;  // (slice, thread)
  for (int s = 0; s < S; ++s)
    for (int i = 0; i < R; ++i) order.emplace_back(s, i);
  std::vector<int> kept;
  int fallbacks = 0;
  for (int h = 0; h < n_heads; ++h)
    for (int64_t t = 0; t < q; ++t) {
      const int nvp_t = nvp != nullptr ? nvp[t] : nvp_scalar;
      const RowRange rr = row_range(nvp_t, n_blocks, fb, fe);
      int32_t* orow = out + (t * n_heads + h) * topk;
      int nsel = 0;
      if (m > 0) {
        emulate_row_scores(scores, h, n_blocks, q, t, rr, width, x.data());
        float sg[kCoopGroups];
        for (int e = 0; e < kCoopGroups; ++e) sg[e] = -INFINITY;
        for (const auto& [s, i] : order)
          for (int j = 0; j < V; ++j) {
            const int b = ccoop_block(s, i, j, R);
            if (coop_group(i) != b % kCoopGroups) return -6;  // supergroups interleave across slices
            sg[coop_group(i)] = std::max(sg[coop_group(i)], x[b]);
          }
        const int owner = coop_bound_owner(sg, m);
        if (owner < 0) return -2;  // ranks must be a permutation
        const float theta = sg[owner];
        std::shuffle(order.begin(), order.end(), rng);
        cand.clear();
        for (const auto& [s, i] : order)
          for (int j = 0; j < V; ++j) {
            const int b = ccoop_block(s, i, j, R);
            if (coop_is_candidate(x[b], theta)) cand.push_back(make_comp(score_key(x[b]), static_cast<uint32_t>(b)));
          }
        const int n = static_cast<int>(cand.size());
        kept.assign(kCoopMaxM, -1);
        if (n > cap) {  // the owner warp's exact fallback: M rounds of the best composite below the previous pick
          ++fallbacks;
          const float* row = scores + static_cast<int64_t>(h) * n_blocks * q + t;
          const auto score = [&](int b) { return row[static_cast<int64_t>(b) * q]; };
          nsel = replay_rounds_below(score, rr.lo, rr.hi, m, kept.data());
        } else {
          nsel = replay_rank_kept(cand.data(), n, m, kept.data());
          if (nsel < 0) return -3;  // distinct composites
        }
        kept.resize(nsel);
        std::sort(kept.begin(), kept.end());
        for (int l = 0; l < nsel; ++l) {
          if (l > 0 && kept[l] == kept[l - 1]) return -4;
          orow[rr.lo + l] = kept[l];
        }
      }
      emulate_write_forced(orow, rr, nsel, topk);
    }
  return fallbacks;
}
