// Host replay of the split path of sparse_topk_select (topk_split_core.cuh), for tests only.
//
// The kernel's warp code (shuffles, relaxed gpu-scope loads / stores) is CUDA-only, so this replays its ALGORITHM
// with the kernel's layout and partitions: the slice / union-of-ranges staging (row_range, union_of_ranges), per
// row and slice the local bound (lane l's group = staged offsets l + 32 j: its maximum, or its second largest for
// M > 32; theta = the r-th largest of the 32 by the kernel's rank counting), candidates >= theta, rank select or
// (n > cap) M rounds of argmax below the previous pick, the list of M entries best first; the arrival tickets in a
// random slice order per row (atomicInc wrapping at S - 1), the non-last slices' lists written to a workspace
// that must hold kSplitEmpty there, the last one's wait-free read of the others (an entry still kSplitEmpty would
// be a protocol bug -> error), their reset, the kernel's merge tree on arrays (leaf s read descending for even s,
// ascending for odd s; node j of a level descending for even j; empty subtrees skipped, an empty right subtree
// leaves the left node turned to this node's direction), the selection in index order and the forced head / tail.
// After the call every counter must be 0 and every workspace entry kSplitEmpty again (the launch-to-launch
// invariant the kernel relies on): else -2.
#include <float.h>
#include <stdint.h>

#include <algorithm>
#include <vector>

#include "topk_block_core.cuh"

using namespace msa_topk;

namespace {

constexpr Comp kEmpty = ~0ull;

struct Rng {
  uint64_t s;
  uint32_t next() {
    s ^= s << 13;
    s ^= s >> 7;
    s ^= s << 17;
    return static_cast<uint32_t>(s >> 11);
  }
};

uint32_t key_or_zero_host(float v) { return v > -INFINITY ? score_key(v) : 0u; }

// warp_rth_largest: lane i's rank = keys greater than a[i] + equal keys at lower lanes.
uint32_t rth_largest32(const uint32_t* a, int r) {
  for (int i = 0; i < 32; ++i) {
    int rank = 0;
    for (int j = 0; j < 32; ++j) rank += (a[j] > a[i] || (a[j] == a[i] && j < i)) ? 1 : 0;
    if (rank == r - 1) return a[i];
  }
  return 0xFFFFFFFFu;  // unreachable
}

// split_clean on an array of n = 32 R elements: the stride-32 step (R = 2), then half-cleaners 16..1 per half.
void clean(Comp* x, int n, bool desc) {
  for (int jb = n / 2; jb > 0; jb >>= 1) {
    std::vector<Comp> b(n);
    for (int i = 0; i < n; ++i) {
      const Comp o = x[i ^ jb];
      const bool take_max = ((i & jb) == 0) == desc;
      b[i] = take_max ? std::max(x[i], o) : std::min(x[i], o);
    }
    std::copy(b.begin(), b.end(), x);
  }
}

// split_slice_top on a staged row (nj lines of 32, -inf where not eligible): list[0 .. m) best first, 0 = empty.
void slice_top(const std::vector<float>& row, int nj, int ulo, int m, int cap, Comp* list) {
  std::fill(list, list + m, 0ull);
  if (nj == 0) return;
  uint32_t keys[32];
  for (int l = 0; l < 32; ++l) {
    float a1 = -INFINITY, b1 = -INFINITY;
    for (int j = 0; j < nj; ++j) {
      const float x = row[j * 32 + l];
      b1 = std::max(b1, std::min(a1, x));
      a1 = std::max(a1, x);
    }
    keys[l] = key_or_zero_host(m <= 32 ? a1 : b1);
  }
  const int r = m <= 32 ? m : (m + 1) / 2;
  const uint32_t tk = rth_largest32(keys, r);
  const float theta = tk ? key_value(tk) : -FLT_MAX;
  std::vector<Comp> cs;
  for (int k = 0; k < nj * 32; ++k)
    if (row[k] >= theta) cs.push_back(make_comp(score_key(row[k]), static_cast<uint32_t>(ulo + k)));
  const int n = static_cast<int>(cs.size());
  if (n <= cap) {
    for (int e = 0; e < n; ++e) {
      int rk = 0;
      for (int f = 0; f < n; ++f) rk += cs[f] > cs[e] ? 1 : 0;
      if (rk < m) list[rk] = cs[e];
    }
  } else {
    Comp prev = ~0ull;
    for (int i = 0; i < m; ++i) {
      Comp b = 0ull;
      for (const Comp c : cs) b = c < prev && c > b ? c : b;
      if (b == 0ull) break;
      list[i] = b;
      prev = b;
    }
  }
}

}  // namespace

// scores: float32 [H, K, Q] (bf16 inputs as their exact float values); nvp: int32 [Q] or null. log_g, slices, cap
// as the binding (topk_split_select); seed drives the arrival order. Returns 0, -1 on bad arguments, -2 when the
// workspace protocol breaks (an entry read before it was written, written twice, or not reset).
extern "C" int msa_topk_split_emulate(const float* scores, int n_heads, int n_blocks, int64_t q, int topk,
                                      const int32_t* nvp, int nvp_scalar, int fb, int fe, int log_g, int slices,
                                      int cap, uint64_t seed, int32_t* out) {
  const int m = topk - fb - fe;
  const int G = 1 << log_g, S = slices;
  if (m < 0 || m > 64 || log_g < 0 || log_g > 5 || S < 1 || S > (m > 32 ? 8 : 16) || cap < std::max(m, 1)) return -1;
  const int R = m > 32 ? 2 : 1;
  const int n_slots = R == 2 ? 8 : (S > 8 ? 16 : 8);  // as split_kernel_for
  const int W = 32 * R;
  const int L = std::max(64, (n_blocks + S - 1) / S + 31) / 32 * 32;  // as topk_split_select
  nvp_scalar = nvp != nullptr ? n_blocks : std::min(std::max(nvp_scalar, 0), n_blocks);
  Rng rng{seed * 0x9E3779B97F4A7C15ull + 777};
  auto rrange = [&](int64_t t) { return row_range(nvp != nullptr ? nvp[t] : nvp_scalar, n_blocks, fb, fe); };
  const int64_t rows = static_cast<int64_t>(n_heads) * q;
  std::vector<uint32_t> arrivals(rows, 0u);
  std::vector<Comp> ws(static_cast<size_t>(rows) * S * std::max(m, 1), kEmpty);
  const int64_t groups = (q + G - 1) / G;
  for (int h = 0; h < n_heads; ++h)
    for (int64_t grp = 0; grp < groups; ++grp) {
      const int64_t t0 = grp * G;
      // ---- phase 1 per slice: staged rows [G][nj * 32] from ulo
      std::vector<std::vector<float>> staged(S * G);
      std::vector<int> ulo_of(S), nj_of(S);
      for (int s = 0; s < S; ++s) {
        const int ks = s * L, ke = std::min(ks + L, n_blocks);
        std::vector<int> los(G), his(G);
        for (int g = 0; g < G; ++g) {
          int elo = 0, ehi = 0;
          if (t0 + g < q && m > 0) {
            const RowRange rl = rrange(t0 + g);
            elo = std::max(rl.lo, ks);
            ehi = std::min(rl.hi, ke);
            if (elo >= ehi) elo = ehi = 0;
          }
          los[g] = elo;
          his[g] = ehi;
        }
        int ulo, uhi;
        union_of_ranges(los.data(), his.data(), G, &ulo, &uhi);
        const int span = ulo < uhi ? uhi - ulo : 0;
        if (span == 0) ulo = 0;
        ulo_of[s] = ulo;
        nj_of[s] = (span + 31) / 32;
        for (int g = 0; g < G; ++g) {
          std::vector<float>& row = staged[s * G + g];
          row.assign(static_cast<size_t>(nj_of[s]) * 32, -INFINITY);
          for (int k = los[g]; k < his[g]; ++k) {
            const float x = scores[(static_cast<int64_t>(h) * n_blocks + k) * q + t0 + g];
            row[k - ulo] = x != x ? -INFINITY : x;
          }
        }
      }
      // ---- phase 2 per row: tickets in a random slice order, lists, the last slice merges
      for (int g = 0; g < G; ++g) {
        const int64_t t = t0 + g;
        if (t >= q) continue;
        const RowRange rr = rrange(t);
        int32_t* orow = out + (t * n_heads + h) * topk;
        int nsel = 0;
        if (m > 0) {
          const int64_t row_id = static_cast<int64_t>(h) * q + t;
          std::vector<int> order(S);
          for (int s = 0; s < S; ++s) order[s] = s;
          for (int s = S - 1; s > 0; --s) std::swap(order[s], order[rng.next() % (s + 1)]);
          std::vector<std::vector<Comp>> lists(S, std::vector<Comp>(m));
          for (int s = 0; s < S; ++s) slice_top(staged[s * G + g], nj_of[s], ulo_of[s], m, cap, lists[s].data());
          Comp* pub = ws.data() + row_id * S * m;
          int last = -1;
          for (int s : order) {  // tickets: atomicInc(arrivals, S - 1)
            uint32_t& c = arrivals[row_id];
            const uint32_t ticket = S > 1 ? c : 0u;
            if (S > 1) c = c >= static_cast<uint32_t>(S - 1) ? 0u : c + 1u;
            if (S == 1 || ticket == static_cast<uint32_t>(S - 1)) {
              last = s;
            } else {
              for (int e = 0; e < m; ++e) {
                if (pub[s * m + e] != kEmpty) return -2;  // written twice or never reset
                pub[s * m + e] = lists[s][e];
              }
            }
          }
          if (last < 0) return -2;
          // merge: leaves oriented by parity, the kernel's tree
          std::vector<std::vector<Comp>> v(n_slots, std::vector<Comp>(W, 0ull));
          for (int s = 0; s < n_slots; ++s)
            for (int i = 0; i < W; ++i) {
              const int e = (s & 1) ? W - 1 - i : i;
              if (s < S && e < m) {
                Comp x;
                if (s == last) {
                  x = lists[s][e];
                } else {
                  x = pub[s * m + e];
                  if (x == kEmpty) return -2;  // read before it was written
                  pub[s * m + e] = kEmpty;
                }
                v[s][i] = x;
              }
            }
          for (int l = 0; (1 << l) < n_slots; ++l)
            for (int j = 0; j < (n_slots >> (l + 1)); ++j) {
              const int left = (2 * j) << l, right = (2 * j + 1) << l;
              if (left >= S) continue;
              const bool desc = (j & 1) == 0;
              if (right >= S) {
                if (!desc) clean(v[left].data(), W, false);
                continue;
              }
              for (int i = 0; i < W; ++i) v[left][i] = std::max(v[left][i], v[right][i]);
              clean(v[left].data(), W, desc);
            }
          std::vector<int> sel;
          for (int i = 0; i < m; ++i)
            if (v[0][i] != 0ull) sel.push_back(static_cast<int>(comp_idx(v[0][i])));
          nsel = static_cast<int>(sel.size());
          for (int e = 0; e < nsel; ++e) {
            int pos = 0;
            for (int f = 0; f < nsel; ++f) pos += sel[f] < sel[e] ? 1 : 0;
            orow[rr.lo + pos] = sel[e];
          }
        }
        const int tail = rr.nvp - rr.hi;
        for (int j = 0; j < topk; ++j) {
          if (j < rr.lo) {
            orow[j] = j;
          } else if (j >= rr.lo + nsel) {
            const int u = j - rr.lo - nsel;
            orow[j] = u < tail ? rr.hi + u : -1;
          }
        }
      }
    }
  for (const uint32_t c : arrivals)
    if (c != 0u) return -2;
  for (const Comp x : ws)
    if (x != kEmpty) return -2;
  return 0;
}
