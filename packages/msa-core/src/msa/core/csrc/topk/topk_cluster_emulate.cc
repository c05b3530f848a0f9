// Host replay of the cluster path of sparse_topk_select (topk_cluster_core.cuh), for tests only.
//
// The kernel's warp code (shuffles, DSMEM) is CUDA-only, so this replays its ALGORITHM step by step on the host
// with the kernel's exact data layout and partitions: the slice / union-of-ranges staging (shared helpers
// row_range, union_of_ranges), the group maxima over groups kk & 31 (kk = the staging thread's k-row,
// per = threads / G k-rows apart), the second-largest-per-lane groups for M > 32, the bound (default: lane i =
// the maximum of group i's values over the slices, theta = the r-th largest of those 32 by rank counting;
// sorted_merge: the v4 warp bitonic sort and bitonic union-of-lists merge on 32-entry arrays, lane i = entry i,
// shuffles = array reads), theta, the
// candidate scan in the kernel's order (per 32 lines, float2 pairs or lines, lane-major) with reservations
// taken in a random slice order (the remote atomics' order is arbitrary), the capacity cut, the owner's rank
// select, the heavy-ties fallback over all slices, and the forced head / tail.
// flags & 8 (kClusterLocalMerge, M <= 32): per slice the exact local top M (local theta = the M-th largest of the
// slice's group keys, candidates, rank select; > cap -> M rounds of local argmax), stored as a 32-entry list in
// lane order by the slice's parity, then the kernel's 3-level bitonic merge tree (warp_merge8_desc) on arrays.
#include <float.h>
#include <stdint.h>

#include <algorithm>
#include <vector>

#include "topk_block_core.cuh"
#include "topk_emulate_rows.h"

using namespace msa_topk;

namespace {

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

// Bitonic sort of 32 keys, descending (the kernel's warp_sort_desc, lane i = a[i]).
void sort_desc32(uint32_t* a) {
  for (int kb = 2; kb <= 32; kb <<= 1)
    for (int jb = kb >> 1; jb > 0; jb >>= 1) {
      uint32_t b[32];
      for (int l = 0; l < 32; ++l) {
        const uint32_t o = a[l ^ jb];
        const bool take_max = ((l & jb) == 0) == ((l & kb) == 0);
        b[l] = take_max ? umax32(a[l], o) : umin32(a[l], o);
      }
      std::copy(b, b + 32, a);
    }
}

// top (descending) <- the top 32 of top U x (x descending): elementwise max with reversed x, then half-cleaners.
void merge_top32(uint32_t* top, const uint32_t* x) {
  for (int l = 0; l < 32; ++l) top[l] = umax32(top[l], x[31 - l]);
  for (int jb = 16; jb > 0; jb >>= 1) {
    uint32_t b[32];
    for (int l = 0; l < 32; ++l) {
      const uint32_t o = top[l ^ jb];
      b[l] = (l & jb) == 0 ? umax32(top[l], o) : umin32(top[l], o);
    }
    std::copy(b, b + 32, top);
  }
}

// The kernel's warp_rth_largest: lane i's rank = keys greater than a[i] + equal keys at lower lanes; the lane of
// rank r - 1 holds the answer.
uint32_t rth_largest32(const uint32_t* a, int r) {
  for (int i = 0; i < 32; ++i) {
    int rank = 0;
    for (int j = 0; j < 32; ++j) rank += (a[j] > a[i] || (a[j] == a[i] && j < i)) ? 1 : 0;
    if (rank == r - 1) return a[i];
  }
  return 0xFFFFFFFFu;  // unreachable: the ranks are a permutation of 0..31
}

// warp_bitonic_clean on an array (lane i = a[i]): half-cleaner steps, descending or ascending.
void bitonic_clean32(Comp* a, bool desc) {
  for (int jb = 16; jb > 0; jb >>= 1) {
    Comp b[32];
    for (int l = 0; l < 32; ++l) {
      const Comp o = a[l ^ jb];
      const bool take_max = ((l & jb) == 0) == desc;
      b[l] = take_max ? std::max(a[l], o) : std::min(a[l], o);
    }
    std::copy(b, b + 32, a);
  }
}

// warp_merge8_desc: lists[s][lane] (even s descending, odd ascending), -> top (the union's top 32, descending).
void merge8_desc(const Comp (*lists)[32], Comp* top) {
  Comp a[4][32], b[2][32];
  for (int i = 0; i < 4; ++i) {
    for (int l = 0; l < 32; ++l) a[i][l] = std::max(lists[2 * i][l], lists[2 * i + 1][l]);
    bitonic_clean32(a[i], (i & 1) == 0);
  }
  for (int i = 0; i < 2; ++i) {
    for (int l = 0; l < 32; ++l) b[i][l] = std::max(a[2 * i][l], a[2 * i + 1][l]);
    bitonic_clean32(b[i], (i & 1) == 0);
  }
  for (int l = 0; l < 32; ++l) top[l] = std::max(b[0][l], b[1][l]);
  bitonic_clean32(top, true);
}

}  // namespace

// scores: float32 [H, K, Q] (bf16 inputs as their exact float values); nvp: int32 [Q] or null. slices, log_g,
// warps, cap as the binding (topk_cluster_select); flags: the kernel's kCluster* bits (4 = sorted_merge bound,
// the others do not change the algorithm); seed drives the append order. Returns 0, or -1 on bad arguments.
extern "C" int msa_topk_cluster_emulate(const float* scores, int n_heads, int n_blocks, int64_t q, int topk,
                                        const int32_t* nvp, int nvp_scalar, int fb, int fe, int log_g, int slices,
                                        int warps, int cap, int flags, uint64_t seed, int32_t* out) {
  const int m = topk - fb - fe;
  const int G = 1 << log_g, S = slices;
  if (m < 0 || m > 64 || log_g < 0 || log_g > 5 || S < 1 || S > 8 || warps < G || warps > 32 || cap < std::max(m, 1))
    return -1;
  const int L = std::max(64, (n_blocks + S - 1) / S + 31) / 32 * 32;  // as topk_cluster_select
  nvp_scalar = nvp != nullptr ? n_blocks : std::min(std::max(nvp_scalar, 0), n_blocks);
  const int per = warps * 32 / G;  // staging k-rows per pass
  Rng rng{seed * 0x9E3779B97F4A7C15ull + 12345};
  auto rrange = [&](int64_t t) { return row_range(nvp != nullptr ? nvp[t] : nvp_scalar, n_blocks, fb, fe); };
  const int64_t groups = (q + G - 1) / G;
  for (int h = 0; h < n_heads; ++h)
    for (int64_t grp = 0; grp < groups; ++grp) {
      const int64_t t0 = grp * G;
      // ---- phase 1 per slice: staged rows [G][nj * 32] from ulo, group keys [G][32]
      std::vector<std::vector<float>> staged(S * G);
      std::vector<int> ulo_of(S), nj_of(S);
      std::vector<uint32_t> gk(static_cast<size_t>(S) * G * 32, 0u);
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
        const int nj = (span + 31) / 32;
        ulo_of[s] = ulo;
        nj_of[s] = nj;
        for (int g = 0; g < G; ++g) {
          std::vector<float>& row = staged[s * G + g];
          row.assign(static_cast<size_t>(nj) * 32, -INFINITY);
          std::vector<float> mx(per, -INFINITY);  // per staging thread kk
          for (int k = 0; k < nj * 32; ++k) {
            float x = -INFINITY;
            if (k >= los[g] - ulo && k < his[g] - ulo) {
              x = scores[(static_cast<int64_t>(h) * n_blocks + ulo + k) * q + t0 + g];
              if (x != x) x = -INFINITY;
            }
            row[k] = x;
            mx[k % per] = std::max(mx[k % per], x);
          }
          for (int kk = 0; kk < per; ++kk)
            if (mx[kk] > -INFINITY) {
              uint32_t& slot = gk[(static_cast<size_t>(s) * G + g) * 32 + (kk & 31)];
              slot = umax32(slot, score_key(mx[kk]));
            }
        }
      }
      // ---- phase 2 per row: sorted group lists per slice, theta, candidates to the owner, owner selects
      for (int g = 0; g < G; ++g) {
        const int64_t t = t0 + g;
        if (t >= q) continue;
        const RowRange rr = rrange(t);
        int32_t* orow = out + (t * n_heads + h) * topk;
        int nsel = 0;
        if (m > 0) {
          int r = m <= 32 ? m : (m + 1) / 2;
          std::vector<uint32_t> lists(static_cast<size_t>(S) * 32);
          for (int s = 0; s < S; ++s) {
            uint32_t* a = &lists[static_cast<size_t>(s) * 32];
            const std::vector<float>& row = staged[s * G + g];
            for (int l = 0; l < 32; ++l) {
              if (m <= 32) {
                a[l] = gk[(static_cast<size_t>(s) * G + g) * 32 + l];
              } else {
                float a1 = -INFINITY, b1 = -INFINITY;
                for (int j = 0; j < nj_of[s]; ++j) {
                  const float x = row[j * 32 + l];
                  b1 = std::max(b1, std::min(a1, x));
                  a1 = std::max(a1, x);
                }
                a[l] = key_or_zero_host(b1);
              }
            }
            if (flags & 4) sort_desc32(a);
          }
          if ((flags & 8) && m <= 32) {  // local merge: per slice its exact top M, then the owner's merge tree
            Comp lanes[8][32] = {};
            for (int s = 0; s < S; ++s) {
              const std::vector<float>& row = staged[s * G + g];
              const uint32_t tk = rth_largest32(&lists[static_cast<size_t>(s) * 32], m);
              const float th = tk ? key_value(tk) : -FLT_MAX;
              std::vector<Comp> cs;
              for (int k = 0; k < nj_of[s] * 32; ++k)
                if (row[k] >= th) cs.push_back(make_comp(score_key(row[k]), static_cast<uint32_t>(ulo_of[s] + k)));
              Comp best[32] = {};
              const int n = static_cast<int>(cs.size());
              if (n <= cap) {  // rank select
                for (int e = 0; e < n; ++e) {
                  int rk = 0;
                  for (int f = 0; f < n; ++f) rk += cs[f] > cs[e] ? 1 : 0;
                  if (rk < m) best[rk] = cs[e];
                }
              } else {  // local fallback: M rounds of argmax below the previous pick (elements >= theta)
                Comp prev = ~0ull;
                for (int i = 0; i < m; ++i) {
                  Comp b = 0ull;
                  for (const Comp c : cs) b = c < prev && c > b ? c : b;
                  if (b == 0ull) break;
                  best[i] = b;
                  prev = b;
                }
              }
              for (int i = 0; i < 32; ++i) lanes[s][(s & 1) ? 31 - i : i] = best[i];
            }
            if (rr.lo < rr.hi) {
              Comp top[32];
              merge8_desc(lanes, top);
              std::vector<uint32_t> sel;
              for (int l = 0; l < m; ++l)
                if (top[l] != 0ull) sel.push_back(comp_idx(top[l]));
              std::sort(sel.begin(), sel.end());
              for (size_t e = 0; e < sel.size(); ++e) orow[rr.lo + e] = static_cast<int32_t>(sel[e]);
              nsel = static_cast<int>(sel.size());
            }
          } else {
          uint32_t theta_key;
          if (flags & 4) {  // v4: top 32 of the union of the sorted lists
            uint32_t top[32];
            std::copy(lists.begin(), lists.begin() + 32, top);
            for (int s = 1; s < S; ++s) merge_top32(top, &lists[static_cast<size_t>(s) * 32]);
            theta_key = top[r - 1];
          } else {  // lane i: the union group's value = the maximum over the slices
            uint32_t u[32];
            for (int l = 0; l < 32; ++l) {
              u[l] = 0u;
              for (int s = 0; s < S; ++s) u[l] = umax32(u[l], lists[static_cast<size_t>(s) * 32 + l]);
            }
            theta_key = rth_largest32(u, r);
          }
          const float theta = theta_key ? key_value(theta_key) : -FLT_MAX;
          // candidates: per slice, the kernel's scan order; reservations from the slices in a random order
          // per chunk round (any interleaving of the remote atomics is possible)
          std::vector<Comp> cand(cap, 0xDEADBEEFull);
          int cnt = 0;
          std::vector<std::vector<std::vector<Comp>>> runs(S);  // [slice][chunk] lane-major candidates
          size_t max_chunks = 0;
          for (int s = 0; s < S; ++s) {
            const std::vector<float>& row = staged[s * G + g];
            const int nj = nj_of[s];
            const bool pairs = ((L + 32 / G) & 1) == 0;
            for (int jc = 0; jc < nj; jc += 32) {
              const int jn = std::min(32, nj - jc);
              const bool paired = jn == 32 && pairs;
              std::vector<Comp> run;
              for (int l = 0; l < 32; ++l)
                for (int b = 0; b < 32; ++b) {  // this lane's bits in ascending order
                  int k;
                  if (paired) {
                    k = jc * 32 + (b >> 1) * 64 + 2 * l + (b & 1);
                  } else {
                    if (b >= jn) continue;
                    k = jc * 32 + b * 32 + l;
                  }
                  if (row[k] >= theta)
                    run.push_back(make_comp(score_key(row[k]), static_cast<uint32_t>(ulo_of[s] + k)));
                }
              runs[s].push_back(run);
            }
            max_chunks = std::max(max_chunks, runs[s].size());
          }
          std::vector<int> order(S);
          for (size_t c = 0; c < max_chunks; ++c) {
            for (int s = 0; s < S; ++s) order[s] = s;
            for (int s = S - 1; s > 0; --s) std::swap(order[s], order[rng.next() % (s + 1)]);
            for (int s : order) {
              if (c >= runs[s].size() || runs[s][c].empty()) continue;
              const int base = cnt;
              cnt += static_cast<int>(runs[s][c].size());
              for (size_t e = 0; e < runs[s][c].size(); ++e)
                if (base + static_cast<int>(e) < cap) cand[base + e] = runs[s][c][e];
            }
          }
          if (rr.lo < rr.hi) {
            if (cnt <= cap) {  // rank select, then index order
              std::vector<int> sel;
              for (int e = 0; e < cnt; ++e) {
                int rank = 0;
                for (int f = 0; f < cnt; ++f) rank += cand[f] > cand[e] ? 1 : 0;
                if (rank < m) sel.push_back(static_cast<int>(comp_idx(cand[e])));
              }
              nsel = static_cast<int>(sel.size());
              for (int e = 0; e < nsel; ++e) {
                int pos = 0;
                for (int f = 0; f < nsel; ++f) pos += sel[f] < sel[e] ? 1 : 0;
                orow[rr.lo + pos] = sel[e];
              }
            } else {  // fallback: M rounds of argmax below the previous pick over all slices, then index order
              Comp prev = ~0ull;
              int found = 0;
              for (int i = 0; i < m; ++i) {
                Comp best = 0ull;
                for (int s = 0; s < S; ++s)
                  for (int k = 0; k < nj_of[s] * 32; ++k) {
                    const float x = staged[s * G + g][k];
                    if (x > -INFINITY) {
                      const Comp cx = make_comp(score_key(x), static_cast<uint32_t>(ulo_of[s] + k));
                      best = cx < prev && cx > best ? cx : best;
                    }
                  }
                if (best == 0ull) break;
                prev = best;
                ++found;
              }
              for (int s = 0; s < S && found > 0; ++s)
                for (int k = 0; k < nj_of[s] * 32; ++k) {
                  const float x = staged[s * G + g][k];
                  if (x > -INFINITY && make_comp(score_key(x), static_cast<uint32_t>(ulo_of[s] + k)) >= prev)
                    orow[rr.lo + nsel++] = ulo_of[s] + k;
                }
            }
          }
          }  // default / sorted_merge bound
        }
        emulate_write_forced(orow, rr, nsel, topk);
      }
    }
  return 0;
}
