// CPU replay of topk_select.cu.jinja's kernels, for tests only (never part of the JIT module).
//
// Every lane of every warp runs the same topk_select_core.cuh code as on the GPU, one after another. Warp votes
// are replaced by a per-lane random policy that is always at least as permissive as the lane's own predicate
// (any(x) = x or coin, all(x) = x and coin): the GPU's votes lie in that space, so a correct result here for
// many seeds says the selection never depends on when a vote fires. seed 0 = votes equal the own predicate.
// The host-side parameter derivation (splits, slice lengths, merge assignment) mirrors topk_select().
#include <stdint.h>

#include <algorithm>
#include <climits>
#include <vector>

#include "topk_select_core.cuh"

using namespace msa_topk;

namespace {

struct RandomVote {
  uint64_t s;
  bool random;
  uint32_t next() {
    s ^= s << 13;
    s ^= s >> 7;
    s ^= s << 17;
    return static_cast<uint32_t>(s >> 11);
  }
  bool any(bool x) { return x || (random && next() % 4 == 0); }
  bool all(bool x) { return x && (!random || next() % 4 != 0); }
};

struct Cta {
  int n_warps, cap;
  std::vector<Cand> bufs;
  std::vector<uint32_t> hists;
  std::vector<int> counts;
  std::vector<LaneState> st;
  Cta(int w, int c) : n_warps(w), cap(c), bufs(size_t(w) * c * kLanes), hists(size_t(w) * kHistRows * kLanes),
                      counts(size_t(w) * kLanes), st(size_t(w) * kLanes, initial_state()) {}
  Cand* col(int w, int lane) { return bufs.data() + size_t(w) * cap * kLanes + lane; }
  uint32_t* hist(int w, int lane) { return hists.data() + size_t(w) * kHistRows * kLanes + lane; }
};

struct Setup {
  int64_t q, q_pad;
  int n_blocks, n_heads, topk, fb, fe, m, cap, nvp_scalar, splits, split_len, warp_len, merge_per_warp, mw;
  const int32_t* nvp;
};

RowRange lane_range(const Setup& p, int64_t t) {
  int nvp = p.nvp_scalar;
  if (p.nvp != nullptr && t < p.q) nvp = p.nvp[t];
  return row_range(nvp, p.n_blocks, p.fb, p.fe);
}

void cta_finish(const Setup& p, Cta& c, std::vector<RandomVote>& votes, int g, int h, int32_t* out,
                std::vector<Cand>& ws, bool write_final, int split) {
  for (int w = 0; w < c.n_warps; ++w)
    for (int lane = 0; lane < kLanes; ++lane) {
      LaneState& st = c.st[w * kLanes + lane];
      select_top(c.col(w, lane), c.hist(w, lane), st, p.m, p.m);
      c.counts[w * kLanes + lane] = st.cnt;
    }
  for (int r = 1; r < c.n_warps; r *= 2) {  // pairwise tree merge, as the kernel
    for (int dst = 0; dst + r < c.n_warps; dst += 2 * r) {
      const int w = dst + r;
      int n = 0;
      for (int lane = 0; lane < kLanes; ++lane) n = std::max(n, c.counts[w * kLanes + lane]);
      for (int lane = 0; lane < kLanes; ++lane) {
        const int cw = c.counts[w * kLanes + lane];
        const Cand* src = c.col(w, lane);
        LaneState& st = c.st[dst * kLanes + lane];
        stream_cands<16>(
            st, c.col(dst, lane), c.hist(dst, lane), p.m, p.cap, n,
            [&](int e) { return e < cw ? src[e * kLanes] : make_cand(0u, 0u); }, votes[lane]);
        select_top(c.col(dst, lane), c.hist(dst, lane), st, p.m, p.m);
        c.counts[dst * kLanes + lane] = st.cnt;
      }
    }
  }
  for (int lane = 0; lane < kLanes; ++lane) {
    LaneState& st = c.st[lane];
    select_top(c.col(0, lane), c.hist(0, lane), st, p.m, p.m);
    const int64_t t = int64_t(g) * kLanes + lane;
    if (write_final) {
      if (t < p.q) write_row(out + (t * p.n_heads + h) * p.topk, p.topk, lane_range(p, t), c.col(0, lane), st.cnt);
    } else {
      Cand* dst = ws.data() + (int64_t(h) * p.splits + split) * p.m * p.q_pad + t;
      for (int e = 0; e < p.m; ++e) dst[e * p.q_pad] = e < st.cnt ? c.col(0, lane)[e * kLanes] : make_cand(0u, 0u);
    }
  }
}

}  // namespace

// scores: float32 [H, K, Q] (bf16 inputs are passed as their exact float values); nvp: int32 [Q] or null.
// batch is fixed at 16 here; the kernel's default. Returns 0, or -1 on bad arguments.
extern "C" int msa_topk_emulate(const float* scores, int n_heads, int n_blocks, int64_t q, int topk,
                                const int32_t* nvp, int nvp_scalar, int fb, int fe, int splits, int warps,
                                int merge_warps, int cap, uint64_t seed, int32_t* out) {
  constexpr int U = 16;
  const int m = topk - fb - fe;
  if (m < 0 || cap < m + U + 1 || splits < 1 || warps < 1 || merge_warps < 1) return -1;
  Setup p;
  p.q = q;
  const int64_t groups = (q + kLanes - 1) / kLanes;
  p.q_pad = groups * kLanes;
  p.n_blocks = n_blocks;
  p.n_heads = n_heads;
  p.topk = topk;
  p.fb = fb;
  p.fe = fe;
  p.m = m;
  p.cap = cap;
  p.nvp = nvp;
  p.nvp_scalar = nvp != nullptr ? n_blocks : std::min(std::max(nvp_scalar, 0), n_blocks);
  p.splits = m > 0 ? splits : 1;
  p.split_len = (n_blocks + p.splits - 1) / p.splits;
  p.warp_len = (p.split_len + warps - 1) / warps;
  p.merge_per_warp = (p.splits + merge_warps - 1) / merge_warps;
  p.mw = std::min(merge_warps, p.splits);
  std::vector<Cand> ws(p.splits > 1 ? size_t(n_heads) * p.splits * m * p.q_pad : 0);
  uint64_t stream = seed * 0x9E3779B97F4A7C15ull + 1;

  auto make_votes = [&]() {
    std::vector<RandomVote> v(kLanes);
    for (auto& x : v) {
      stream = stream * 6364136223846793005ull + 1442695040888963407ull;
      x.s = stream | 1;
      x.random = seed != 0;
    }
    return v;
  };

  for (int h = 0; h < n_heads; ++h)
    for (int64_t g = 0; g < groups; ++g)
      for (int s = 0; s < p.splits; ++s) {
        Cta c(warps, cap);
        auto votes = make_votes();
        for (int w = 0; w < warps; ++w) {
          int elo[kLanes], ehi[kLanes];
          bool empty[kLanes];
          int wlo = INT_MAX, whi = INT_MIN;
          const int kb = s * p.split_len + w * p.warp_len;
          const int ke = std::min(std::min(kb + p.warp_len, (s + 1) * p.split_len), n_blocks);
          for (int lane = 0; lane < kLanes; ++lane) {
            const int64_t t = g * kLanes + lane;
            const RowRange rr = lane_range(p, t);
            elo[lane] = std::max(rr.lo, kb);
            ehi[lane] = std::min(rr.hi, ke);
            empty[lane] = !(t < q && m > 0) || elo[lane] >= ehi[lane];
            if (!empty[lane]) {
              wlo = std::min(wlo, elo[lane]);
              whi = std::max(whi, ehi[lane]);
            }
          }
          for (int lane = 0; lane < kLanes; ++lane) {
            const int64_t t = g * kLanes + lane;
            const float* base = scores + int64_t(h) * n_blocks * q + (t < q ? t : 0);
            scan_scores<U>(
                c.st[w * kLanes + lane], c.col(w, lane), c.hist(w, lane), m, cap, wlo, whi,
                empty[lane] ? 0 : elo[lane], empty[lane] ? 0 : ehi[lane],
                [&](int k) { return base[int64_t(k) * q]; }, votes[lane]);
          }
        }
        cta_finish(p, c, votes, static_cast<int>(g), h, out, ws, p.splits == 1, s);
      }

  if (p.splits > 1) {
    for (int h = 0; h < n_heads; ++h)
      for (int64_t g = 0; g < groups; ++g) {
        Cta c(p.mw, cap);
        auto votes = make_votes();
        for (int w = 0; w < p.mw; ++w) {
          const int s_end = std::min(p.splits, (w + 1) * p.merge_per_warp);
          for (int s = w * p.merge_per_warp; s < s_end; ++s)
            for (int lane = 0; lane < kLanes; ++lane) {
              const int64_t t = g * kLanes + lane;
              const Cand* src = ws.data() + (int64_t(h) * p.splits + s) * m * p.q_pad + t;
              stream_cands<U>(
                  c.st[w * kLanes + lane], c.col(w, lane), c.hist(w, lane), m, cap, m,
                  [&](int e) { return src[e * p.q_pad]; }, votes[lane]);
            }
        }
        cta_finish(p, c, votes, static_cast<int>(g), h, out, ws, true, 0);
      }
  }
  return 0;
}
