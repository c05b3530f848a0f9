// Row pieces shared by the CPU replays of the register / cluster paths (tests only, never part of the JIT module):
// the masked row every kernel sees and the forced head / tail / -1 part of an output row.
#pragma once

#include <math.h>
#include <stdint.h>

#include "topk_select_core.cuh"

namespace msa_topk {

// x[k] for k < width: score (h, k, t) of max_score [H, K, Q], -inf past K, for NaN and outside [lo, hi).
inline void emulate_row_scores(const float* scores, int h, int n_blocks, int64_t q, int64_t t, const RowRange& rr,
                               int width, float* x) {
  for (int k = 0; k < width; ++k) {
    float s = k < n_blocks ? scores[(static_cast<int64_t>(h) * n_blocks + k) * q + t] : -INFINITY;
    if (s != s || k < rr.lo || k >= rr.hi) s = -INFINITY;
    x[k] = s;
  }
}

// Forced head [0, lo), forced tail [hi, nvp), then -1, around the nsel selected blocks at [lo, lo + nsel).
inline void emulate_write_forced(int32_t* orow, const RowRange& rr, int nsel, int topk) {
  for (int j = 0; j < rr.lo; ++j) orow[j] = j;
  const int tail = rr.nvp - rr.hi;
  for (int j = rr.lo + nsel; j < topk; ++j) {
    const int u = j - rr.lo - nsel;
    orow[j] = u < tail ? rr.hi + u : -1;
  }
}

}  // namespace msa_topk
