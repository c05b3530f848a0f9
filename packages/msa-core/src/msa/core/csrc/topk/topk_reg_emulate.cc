// CPU replay of the reg path's algorithm (topk_reg_core.cuh), for tests only (never part of the JIT module).
//
// Per row, the kernel's partition and decisions: lane r of P holds blocks r V .. r V + V - 1 (blocks >= K, NaN and
// blocks outside [lo, hi) are -inf); Q = 32 / P group values per lane (min(Q, V) groups of V / min(Q, V)
// consecutive values, the rest -inf): the group maxima (M <= 32, r = M) or the groups' second largest (M > 32,
// r = ceil(M / 2)); theta = the r-th largest of the row's 32 group values (-FLT_MAX when that is -inf: the kernel's
// bitonic sort / lane count both give exactly this order statistic); candidates (>= theta) in index order; n <= cap:
// rank by counting greater composites, selected ones written in list order; n > cap: M rounds of argmax below the
// previous pick, then one ordered pass over the lanes in order (composites >= the M-th best). Forced head / tail,
// -1 padding as the kernel writes them.
#include <float.h>
#include <stdint.h>

#include <algorithm>
#include <functional>
#include <vector>

#include "topk_block_core.cuh"
#include "topk_emulate_rows.h"

using namespace msa_topk;

extern "C" int msa_topk_reg_emulate(const float* scores, int n_heads, int n_blocks, int64_t q, int topk,
                                    const int32_t* nvp, int nvp_scalar, int fb, int fe, int lanes, int v, int cap,
                                    uint64_t /*seed*/, int32_t* out) {
  const int m = topk - fb - fe;
  const int P = lanes, V = v;
  if (m < 0 || m > 64 || !(P == 4 || P == 8 || P == 16 || P == 32) || !(V == 2 || V == 4 || V == 8 || V == 16 || V == 32) ||
      n_blocks > P * V || cap < std::max(m, 1))
    return -1;
  nvp_scalar = nvp != nullptr ? n_blocks : std::min(std::max(nvp_scalar, 0), n_blocks);
  const int Q = 32 / P, QG = std::min(Q, V), GS = V / QG;
  std::vector<float> x(static_cast<size_t>(P) * V);
  std::vector<Comp> cand;
  for (int h = 0; h < n_heads; ++h)
    for (int64_t t = 0; t < q; ++t) {
      const RowRange rr = row_range(nvp != nullptr ? nvp[t] : nvp_scalar, n_blocks, fb, fe);
      int32_t* orow = out + (t * n_heads + h) * topk;
      int nsel = 0;
      if (m > 0) {
        emulate_row_scores(scores, h, n_blocks, q, t, rr, P * V, x.data());
        const bool two = m > 32;
        std::vector<float> gv(32, -INFINITY);
        for (int r = 0; r < P; ++r)
          for (int i = 0; i < QG; ++i) {
            float a = -INFINITY, b = -INFINITY;
            for (int j = i * GS; j < (i == QG - 1 ? V : (i + 1) * GS); ++j) {
              const float y = x[r * V + j];
              b = std::max(b, std::min(a, y));
              a = std::max(a, y);
            }
            gv[r * Q + i] = two ? b : a;
          }
        const int rnk = two ? (m + 1) / 2 : m;
        std::sort(gv.begin(), gv.end(), std::greater<float>());
        const float theta = gv[rnk - 1] > -INFINITY ? gv[rnk - 1] : -FLT_MAX;
        cand.clear();
        for (int k = 0; k < P * V; ++k)
          if (x[k] >= theta) cand.push_back(make_comp(score_key(x[k]), static_cast<uint32_t>(k)));
        const int n = static_cast<int>(cand.size());
        if (n <= cap) {
          for (int e = 0; e < n; ++e) {
            int rank = 0;
            for (int f = 0; f < n; ++f) rank += cand[f] > cand[e] ? 1 : 0;
            if (rank < m) orow[rr.lo + nsel++] = static_cast<int32_t>(comp_idx(cand[e]));
          }
        } else {
          Comp prev = ~0ull;
          int found = 0;
          for (int i = 0; i < m; ++i) {
            Comp best = 0ull;
            for (const Comp c : cand) best = c < prev && c > best ? c : best;
            if (best == 0ull) break;
            prev = best;
            ++found;
          }
          if (found > 0)
            for (const Comp c : cand)
              if (c >= prev) orow[rr.lo + nsel++] = static_cast<int32_t>(comp_idx(c));
        }
      }
      emulate_write_forced(orow, rr, nsel, topk);
    }
  return 0;
}
