// CPU replay of the pool path (topk_pool_core.cuh), for tests only (never part of the JIT module).
//
// Per row, the two launches' decisions with the kernel's own helpers: group maxima of 16 blocks over the masked row
// (past K, NaN and outside [lo, hi) -> -inf; rows padded to pool_row_groups(K) groups); lane l of the select warp
// holds groups pool_lane_group(l, i); the bound from the 32 lane keys (pool_lane_key, rank m - 1, pool_key_floor);
// candidate groups (coop_is_candidate on the group maximum), > kPoolGroupCap -> theta = the exact M-th largest group
// maximum (the bit-by-bit search of warp_kth_key over pool_count_key); the candidate groups' values >= theta in the
// kernel's append order, > cap -> theta = their exact M-th largest; else rank by composite, rank < M kept, output by
// ascending block index; past both refinements -> the M rounds of ccoop_best_below over the raw row; forced head /
// tail. Checks on the way: >= M lanes hold a maximum >= the bound, every block >= theta lies in a candidate group,
// the candidate list is in ascending block order (the kernel writes a kept entry at its place in the list).
// stats[0..3): rows that refined the group bound, rows that refined the candidate bound, rows that took the rounds
// (warp form, or the CTA form's fallback to it).
// CTA form (cta_cap > 0: pool_select_cta with kPoolCtaCap = cta_cap, kPoolCtaRankCap = cta_cap / 4): the same bound,
// no group refinement; every candidate group's values >= theta (any order: the kernel appends by shared atomics); n <=
// cta_cap / 4 ranked; n <= cta_cap: those >= their exact M-th largest, ranked when <= cap; written by ascending block
// index; past either cap the row in the warp form (stats[3] counts those rows).
// Records form (records != 0, pool_record_cta + pool_select_rec): launch 1's records by rec_top4 over pool_rec_key
// (checked sorted, their first keys' floors <= the maxima), the bound from the 32 lane keys, record / whole groups in
// the kernel's listing order, past 4 whole groups the records' M-th largest key as the appends' bound, the entries
// as (bucket, block) -- every block with a packed key >= the bound among them --, past cap the exact M-th largest
// key, the rank, and (fp32: bf16 == 0) the straddled-bucket test; the fallback is the warp form over the first-key
// floors. stats[4..7): records rows that fell back, that gathered whole groups, that refined past cap.
// Returns 0, or < 0 on a broken invariant.
#include <algorithm>
#include <vector>

#include "topk_pool_core.cuh"
#include "topk_emulate_rows.h"

using namespace msa_topk;

namespace {

// warp_kth_key on the host: the largest c with #(keys >= c) >= k, bit by bit from the top (0: fewer than k nonzero).
uint32_t kth_key(const std::vector<uint32_t>& keys, int k) {
  uint32_t res = 0;
  for (int bit = 31; bit >= 0; --bit) {
    const uint32_t c = res | (1u << bit);
    int cnt = 0;
    for (uint32_t x : keys) cnt += x >= c ? 1 : 0;
    if (cnt >= k) res = c;
  }
  return res;
}

}  // namespace

extern "C" int msa_topk_pool_emulate(const float* scores, int n_heads, int n_blocks, int64_t q, int topk,
                                     const int32_t* nvp, int nvp_scalar, int fb, int fe, int cap, int group_cap,
                                     int cta_cap, int records, int bf16, int32_t* out, int32_t* stats) {
  const int m = topk - fb - fe;
  if (m < 0 || m > kCoopMaxM || n_blocks < 1 || n_blocks > kPoolMaxLaneGroups * 32 * kPoolGroup || cap < 1 ||
      cap > kPoolCap || group_cap < 1 || group_cap > kPoolGroupCap || cta_cap < 0 || cta_cap > kPoolCtaCap ||
      (records != 0 && cta_cap != 0))
    return -1;
  nvp_scalar = nvp != nullptr ? n_blocks : std::min(std::max(nvp_scalar, 0), n_blocks);
  const int J = pool_lane_groups(n_blocks);
  const int ngroups = pool_row_groups(n_blocks);
  if (ngroups != 32 * J || ngroups < pool_groups(n_blocks)) return -1;
  const int width = ngroups * kPoolGroup;
  std::vector<float> x(width), gm(ngroups);
  std::vector<uint32_t> rec(4 * static_cast<size_t>(ngroups));
  std::vector<Comp> cand;
  std::vector<uint32_t> keys;
  std::vector<int> groups, kept;
  for (int i = 0; i < 7; ++i) stats[i] = 0;
  for (int h = 0; h < n_heads; ++h)
    for (int64_t t = 0; t < q; ++t) {
      const int nvp_t = nvp != nullptr ? nvp[t] : nvp_scalar;
      const RowRange rr = row_range(nvp_t, n_blocks, fb, fe);
      int32_t* orow = out + (t * n_heads + h) * topk;
      int nsel = 0;
      if (m > 0) {
        emulate_row_scores(scores, h, n_blocks, q, t, rr, width, x.data());
        for (int g = 0; g < ngroups; ++g) {  // launch 1
          float mx = x[g * kPoolGroup];
          for (int j = 1; j < kPoolGroup; ++j) mx = std::max(mx, x[g * kPoolGroup + j]);
          gm[g] = mx;
          if (records) {  // pool_record_cta: the four best packed keys; the select's fallback reads first-key floors
            uint32_t k[kPoolGroup];
            for (int j = 0; j < kPoolGroup; ++j) k[j] = pool_rec_key(x[g * kPoolGroup + j], j);
            rec_top4(k);
            for (int j = 0; j < 4; ++j) rec[4 * g + j] = k[j];
            if (k[0] < k[1] || k[1] < k[2] || k[2] < k[3]) return -7;
            if (pool_rec_floor(k[0]) > mx || (mx > -INFINITY) != (k[0] >= kPoolRecKeyMin)) return -7;
            gm[g] = pool_rec_floor(k[0]);
          }
        }
        float lane_mx[32];
        uint32_t lane_key[32];
        for (int l = 0; l < 32; ++l) {
          lane_mx[l] = -INFINITY;
          for (int i = 0; i < J; ++i) lane_mx[l] = std::max(lane_mx[l], gm[pool_lane_group(l, i)]);
          lane_key[l] = pool_lane_key(lane_mx[l], l);
        }
        int owner = -1;
        for (int l = 0; l < 32; ++l) {
          int r = 0;
          for (int o = 0; o < 32; ++o) r += lane_key[o] > lane_key[l] ? 1 : 0;
          if (r == m - 1) {
            if (owner >= 0) return -2;  // lane keys must be distinct
            owner = l;
          }
        }
        if (owner < 0) return -2;
        float theta = pool_key_floor(lane_key[owner], lane_mx[owner]);
        if (theta > -INFINITY) {
          int at_least = 0;
          for (int l = 0; l < 32; ++l) at_least += lane_mx[l] >= theta ? 1 : 0;
          if (at_least < m) return -3;  // the bound: M lanes hold a block >= theta
        }
        const auto candidate_groups = [&]() {
          groups.clear();
          for (int i = 0; i < J; ++i)  // the kernel's order: ballot i, then lane
            for (int l = 0; l < 32; ++l)
              if (coop_is_candidate(gm[pool_lane_group(l, i)], theta)) groups.push_back(pool_lane_group(l, i));
        };
        const auto covered = [&]() {  // every block >= theta lies in a candidate group
          for (int b = rr.lo; b < rr.hi; ++b)
            if (coop_is_candidate(x[b], theta) &&
                std::find(groups.begin(), groups.end(), b / kPoolGroup) == groups.end())
              return false;
          return true;
        };
        const auto append = [&]() {  // the candidate groups' values >= theta: groups in order, each in block order
          cand.clear();
          for (int g : groups)
            for (int j = 0; j < kPoolGroup; ++j) {
              const int b = g * kPoolGroup + j;
              if (coop_is_candidate(x[b], theta)) cand.push_back(make_comp(score_key(x[b]), static_cast<uint32_t>(b)));
            }
        };
        const auto rank_cand = [&]() {  // kept[0 .. nsel) = the ranked candidates' best M, or -5
          kept.assign(kCoopMaxM, -1);
          const int ns = replay_rank_kept(cand.data(), static_cast<int>(cand.size()), m, kept.data());
          return ns < 0 ? -5 : ns;
        };
        const auto warp_form = [&]() {  // nsel, or < 0 on a broken invariant
          if (static_cast<int>(groups.size()) > group_cap) {
            ++stats[0];
            keys.clear();
            for (int g = 0; g < ngroups; ++g) keys.push_back(pool_count_key(gm[g]));
            theta = pool_theta_of_key(kth_key(keys, m));
            candidate_groups();
          }
          if (!covered()) return -4;
          bool direct = static_cast<int>(groups.size()) <= group_cap;
          if (direct) {  // lane c = candidate group c
            append();
            if (static_cast<int>(cand.size()) > cap) {
              ++stats[1];
              keys.clear();
              for (Comp c : cand) keys.push_back(comp_key(c));
              theta = pool_theta_of_key(kth_key(keys, m));
              append();
            }
            direct = static_cast<int>(cand.size()) <= cap;
          }
          if (direct) {
            for (size_t i = 1; i < cand.size(); ++i)  // the kernel writes kept entries at their place in the list
              if (comp_idx(cand[i - 1]) >= comp_idx(cand[i])) return -6;
            return rank_cand();
          }
          ++stats[2];
          kept.assign(kCoopMaxM, -1);
          const auto score = [&](int b) { return scores[(static_cast<int64_t>(h) * n_blocks + b) * q + t]; };
          return replay_rounds_below(score, rr.lo, rr.hi, m, kept.data());
        };
        const auto records_form = [&]() {  // pool_select_rec: nsel, or -100 for its fallback, or < 0 broken
          uint32_t lk[32];
          for (int l = 0; l < 32; ++l) {
            uint32_t mk = 0;
            for (int i = 0; i < J; ++i) mk = std::max(mk, rec[4 * pool_lane_group(l, i)]);
            lk[l] = (mk & ~31u) | static_cast<uint32_t>(31 - l);
          }
          uint32_t th = 0;
          for (int l = 0; l < 32; ++l) {
            int r = 0;
            for (int o = 0; o < 32; ++o) r += lk[o] > lk[l] ? 1 : 0;
            if (r == m - 1) th = lk[l] & ~31u;
          }
          th = std::max(th, kPoolRecKeyMin);
          int at_least = 0;
          for (int l = 0; l < 32; ++l) at_least += lk[l] >= th ? 1 : 0;
          if (th > kPoolRecKeyMin && at_least < m) return -3;
          std::vector<int> rgroups, wgroups;  // the kernel's listing order: group i, then lane
          for (int i = 0; i < J; ++i)
            for (int l = 0; l < 32; ++l) {
              const int g = pool_lane_group(l, i);
              if (rec[4 * g + 3] >= th) wgroups.push_back(g);
              else if (rec[4 * g] >= th) rgroups.push_back(g);
            }
          if (rgroups.size() + wgroups.size() > static_cast<size_t>(kPoolGroupCap)) return -100;
          if (!wgroups.empty()) ++stats[5];
          uint32_t th_w = th;  // the appends' bound: past kPoolCap gatherable values, the M-th largest record key
          if (static_cast<int>(wgroups.size()) * kPoolGroup > kPoolCap) {
            keys.clear();
            for (int g : rgroups)
              for (int j = 0; j < 3; ++j)
                if (rec[4 * g + j] >= th) keys.push_back(pool_rec_bucket(rec[4 * g + j]));
            for (int g : wgroups)
              for (int j = 0; j < 4; ++j)
                if (pool_rec_bucket(rec[4 * g + j]) >= th) keys.push_back(pool_rec_bucket(rec[4 * g + j]));
            th_w = std::max(th, kth_key(keys, m));
          }
          struct Entry {
            uint32_t key;
            int block;
          };
          std::vector<Entry> ent;
          for (int g : rgroups)
            for (int j = 0; j < 3; ++j) {
              const uint32_t k = rec[4 * g + j];
              if (k >= th && pool_rec_bucket(k) >= th_w)
                ent.push_back({pool_rec_bucket(k), g * kPoolGroup + pool_rec_offset(k)});
            }
          for (int g : wgroups)
            for (int j = 0; j < kPoolGroup; ++j) {
              const float v = x[g * kPoolGroup + j];
              const uint32_t k = v > -INFINITY ? pool_rec_bucket(score_key(v)) : 0u;
              if (k != 0u && k >= th_w) ent.push_back({k, g * kPoolGroup + j});
            }
          for (int b = rr.lo; b < rr.hi; ++b) {  // every block with a packed key >= th (bucket >= th_w) is an entry
            const uint32_t pk = pool_rec_key(x[b], b % kPoolGroup);
            if (pk < th || pool_rec_bucket(pk) < th_w) continue;
            bool found = false;
            for (const Entry& e : ent) found = found || e.block == b;
            if (!found) return -4;
          }
          cand.clear();
          for (const Entry& e : ent) cand.push_back(make_comp(e.key, static_cast<uint32_t>(e.block)));
          const auto keep_from = [&](uint32_t kth) {
            std::vector<Comp> top;
            for (Comp c : cand)
              if (comp_key(c) >= kth) top.push_back(c);
            cand = top;
          };
          if (static_cast<int>(cand.size()) > cap) {  // the exact M-th largest key
            ++stats[6];
            keys.clear();
            for (Comp c : cand) keys.push_back(comp_key(c));
            keep_from(kth_key(keys, m));
            if (static_cast<int>(cand.size()) > cap) return -100;
          }
          const int n = static_cast<int>(cand.size());
          if (!bf16 && n > m) {  // fp32: the cut must not split a bucket
            std::vector<Comp> sorted(cand);
            std::sort(sorted.begin(), sorted.end(), [](Comp a, Comp b) { return a > b; });
            if (comp_key(sorted[m - 1]) == comp_key(sorted[m])) return -100;
          }
          return rank_cand();
        };
        candidate_groups();
        if (records) {
          nsel = records_form();
          if (nsel == -100) {  // the warp form over the first-key floors (gm: its bound and candidate groups above)
            ++stats[4];
            nsel = warp_form();
          }
        } else if (cta_cap > 0) {  // CTA form: every candidate group's values, then rank; or the warp form
          if (!covered()) return -4;
          append();
          std::reverse(cand.begin(), cand.end());  // any order (the kernel's is the atomics')
          const int n = static_cast<int>(cand.size());
          if (n > cta_cap / 4 && n <= cta_cap) {  // those >= the exact M-th largest key
            keys.clear();
            for (Comp c : cand) keys.push_back(comp_key(c));
            const uint32_t kth = kth_key(keys, m);
            std::vector<Comp> top;
            for (Comp c : cand)
              if (comp_key(c) >= kth) top.push_back(c);
            cand = top;
          }
          if (n <= cta_cap && static_cast<int>(cand.size()) <= (n > cta_cap / 4 ? cap : n)) {
            nsel = rank_cand();
          } else {
            ++stats[3];
            nsel = warp_form();
          }
        } else {
          nsel = warp_form();
        }
        if (nsel < 0) return nsel;
        kept.resize(nsel);
        std::sort(kept.begin(), kept.end());
        for (int i = 0; i < nsel; ++i) orow[rr.lo + i] = kept[i];
      }
      emulate_write_forced(orow, rr, nsel, topk);
    }
  return 0;
}
