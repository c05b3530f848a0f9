// CPU replay of the net variant (topk_net_core.cuh), for tests only (never part of the JIT module).
//
// Per row, the kernel's partition and decisions with the kernel's own network functions: lane r of P holds
// blocks r V .. r V + V - 1 (blocks >= K, NaN and blocks outside [lo, hi) are -inf); per lane net_lane_top over
// V / 16 groups; the butterfly across the P lanes (level o: every lane merges its list with lane r ^ o's list of
// the previous level, net_merge_top); T = net_pick(list, M); per-lane ge masks, prefix offsets, the tie quota
// (values > T, then the lowest-index values == T) exactly as the kernel computes them; forced head / tail, -1.
#include <float.h>
#include <stdint.h>

#include <algorithm>
#include <vector>

#include "topk_emulate_rows.h"
#include "topk_net_core.cuh"

using namespace msa_topk;

namespace {

template <int V>
void lane_list(const float* x, float (&out)[kNetList]) {
  constexpr int NG = V / kNetList;
  float w[NG][kNetList];
  for (int j = 0; j < V; ++j) w[j / kNetList][j % kNetList] = x[j];
  net_lane_top<NG>(w);
  for (int i = 0; i < kNetList; ++i) out[i] = w[0][i];
}

}  // namespace

extern "C" int msa_topk_net_emulate(const float* scores, int n_heads, int n_blocks, int64_t q, int topk,
                                    const int32_t* nvp, int nvp_scalar, int fb, int fe, int lanes, int v,
                                    uint64_t /*seed*/, int32_t* out) {
  const int m = topk - fb - fe;
  const int P = lanes, V = v;
  if (m < 0 || m > kNetMaxM || !(P == 1 || P == 2 || P == 4 || P == 8 || P == 16 || P == 32) ||
      !(V == 16 || V == 32 || V == 64) || n_blocks > P * V)
    return -1;
  nvp_scalar = nvp != nullptr ? n_blocks : std::min(std::max(nvp_scalar, 0), n_blocks);
  std::vector<float> x(static_cast<size_t>(P) * V);
  std::vector<float> lists(static_cast<size_t>(P) * kNetList), prev(lists.size());
  std::vector<int> cge(P), ceq(P);
  for (int h = 0; h < n_heads; ++h)
    for (int64_t t = 0; t < q; ++t) {
      const RowRange rr = row_range(nvp != nullptr ? nvp[t] : nvp_scalar, n_blocks, fb, fe);
      int32_t* orow = out + (t * n_heads + h) * topk;
      int nsel = 0;
      if (m > 0) {
        emulate_row_scores(scores, h, n_blocks, q, t, rr, P * V, x.data());
        for (int r = 0; r < P; ++r) {
          float l[kNetList];
          if (V == 16) lane_list<16>(&x[r * V], l);
          else if (V == 32) lane_list<32>(&x[r * V], l);
          else lane_list<64>(&x[r * V], l);
          std::copy(l, l + kNetList, &lists[r * kNetList]);
        }
        for (int o = 1; o < P; o <<= 1) {
          prev = lists;
          for (int r = 0; r < P; ++r) {
            float a[kNetList], b[kNetList];
            std::copy(&prev[r * kNetList], &prev[r * kNetList] + kNetList, a);
            std::copy(&prev[(r ^ o) * kNetList], &prev[(r ^ o) * kNetList] + kNetList, b);
            net_merge_top(a, b);
            std::copy(a, a + kNetList, &lists[r * kNetList]);
          }
        }
        for (int r = 1; r < P; ++r)  // every lane of the segment must end with the same list
          if (!std::equal(&lists[0], &lists[kNetList], &lists[r * kNetList])) return -2;
        float l0[kNetList];
        std::copy(&lists[0], &lists[kNetList], l0);
        const float tv = net_pick(l0, m);
        const float thr = tv > -INFINITY ? tv : -FLT_MAX;
        int ge = 0;
        for (int r = 0; r < P; ++r) {
          cge[r] = ceq[r] = 0;
          for (int j = 0; j < V; ++j) {
            cge[r] += x[r * V + j] >= thr ? 1 : 0;
            ceq[r] += x[r * V + j] == tv ? 1 : 0;
          }
          ge += cge[r];
        }
        if (ge <= m) {  // the ge masks are the selection
          for (int k = 0; k < P * V; ++k)
            if (x[k] >= thr) orow[rr.lo + nsel++] = k;
          if (nsel != ge) return -3;
        } else {
          int gt_tot = 0;
          for (int r = 0; r < P; ++r) gt_tot += cge[r] - ceq[r];
          const int quota = m - gt_tot;
          int eq_excl = 0, gt_excl = 0;
          for (int r = 0; r < P; ++r) {
            int take = std::min(std::max(quota - eq_excl, 0), ceq[r]);
            int pos = rr.lo + gt_excl + std::min(eq_excl, quota);
            if (pos != rr.lo + nsel) return -4;  // the lane's prefix offset
            for (int j = 0; j < V; ++j) {
              const float y = x[r * V + j];
              if (y > tv || (y == tv && take-- > 0)) orow[rr.lo + nsel++] = r * V + j;
            }
            eq_excl += ceq[r];
            gt_excl += cge[r] - ceq[r];
          }
          if (nsel != m) return -5;
        }
      }
      emulate_write_forced(orow, rr, nsel, topk);
    }
  return 0;
}
