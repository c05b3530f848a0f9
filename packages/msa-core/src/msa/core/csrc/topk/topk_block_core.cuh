// CTA-cooperative exact top-M ("block" path of sparse_topk_select): the CTA body, shared by the CUDA kernel
// (topk_select.cu.jinja) and the host replay (topk_block_emulate.cc, one std::thread per CUDA thread).
//
// A CTA owns G consecutive tokens of one head (G rows) and one K range; P threads per row, T = G * P.
// Thread tid is row g = tid % G (consecutive lanes = consecutive tokens: every load instruction reads whole
// 32-byte sectors of a K-row for G = 8), part r = tid / G. The row's slots are walked in chunks of P * V: in
// chunk c0 thread r holds slots c0 + r + P * j, j < V, in registers (the next chunk's loads are in flight while
// this one is processed).
//
// Per chunk (every barrier is CTA-uniform):
//  1. theta (only while some row's best list is not full): each thread's local max; theta = the M-th largest
//     of the row's P local maxima (the largest local max that at least M local maxima reach: one compare per
//     maximum and a shared atomicMax of order-preserving keys). M distinct elements are >= theta, so every
//     element of the chunk's own top M, hence every chunk element of the row's final top M, is >= theta. With
//     iid scores only about P * ln((P+1)/(P+1-M)) elements pass (20 for P = 32, M = 15).
//  2. append: elements >= theta that beat the worst of the row's best list B (|B| = M) are appended after B
//     as 64-bit composite keys (score key << 32 | ~index: a strict total order = value desc, index asc), at an
//     offset from a shared counter. No candidate anywhere in the CTA -> next chunk (one barrier).
//  3. select: rank of each entry among the n entries of the row (count of greater keys); ranks < M go to the
//     other buffer at their rank, so B stays sorted best-first and B[M-1] is the threshold for what follows.
//  Overflow (n > cap, e.g. many equal scores): the chunk is redone one value per thread per round
//  (<= P appends per round; cap >= M + P), which is always exact.
// Exactness does not depend on the order of the atomic offsets: selection only compares composite keys.
#pragma once

#include "../common/bits.cuh"
#include "topk_select_core.cuh"

namespace msa_topk {

using Comp = unsigned long long;
using msa_bits::popcount32;

MSA_TOPK_HD Comp make_comp(uint32_t key, uint32_t idx) {
  return (static_cast<Comp>(key) << 32) | static_cast<Comp>(~idx);
}
MSA_TOPK_HD uint32_t comp_key(Comp c) { return static_cast<uint32_t>(c >> 32); }
MSA_TOPK_HD uint32_t comp_idx(Comp c) { return ~static_cast<uint32_t>(c); }

constexpr int kMaxPad = 4;  // row padding of the maxima table (16 B: conflict-free 16-byte reads across rows)

struct BlockParams {
  const void* scores;     // scan: max_score [H, K, Q] (fp32 or bf16)
  const Cand* ws_in;      // merge: [H, S, M, q_pad] (key, index); key 0 = nothing
  Cand* ws_out;           // scan with S > 1
  const int32_t* nvp;     // [Q] or nullptr -> nvp_scalar
  int32_t* out;           // [Q, H, topk]
  int64_t q, q_pad;
  int n_blocks, n_heads, topk, fb, fe, m, nvp_scalar;
  int log_g, p, cap;      // tokens per CTA = 1 << log_g, threads per row, buffer entries per row
  int splits, split_len;  // scan: K range of split s = [s * split_len, (s + 1) * split_len)
};

struct BlockSmem {  // (two named buffers, not an array: a run-time index would put the struct in local memory)
  Comp* buf0;      // [cap][G] each: B then appended candidates; the select writes the other one
  Comp* buf1;
  float* maxima;   // [G][P + kMaxPad]
  uint32_t* theta;  // [G] score key of the chunk bound (0 = none: -inf)
  int* ncand;      // [2][G] append counters, alternating per chunk
  int* fcnt;       // [2][G] append counters of the overflow rounds, alternating per round
  int* range;      // [2][G] each row's slot range in this CTA (lo, hi)
  int* flag;       // [1] overflow
};

MSA_TOPK_HD size_t block_smem_bytes(int g, int p, int cap) {
  return 2 * static_cast<size_t>(cap) * g * sizeof(Comp) + static_cast<size_t>(g) * (p + kMaxPad) * sizeof(float) +
         static_cast<size_t>(g) * sizeof(float) + 6 * static_cast<size_t>(g) * sizeof(int) + 4 * sizeof(int);
}

MSA_TOPK_HD BlockSmem carve_block_smem(unsigned char* raw, int g, int p, int cap) {
  BlockSmem s;
  s.buf0 = reinterpret_cast<Comp*>(raw);
  s.buf1 = s.buf0 + static_cast<size_t>(cap) * g;
  s.maxima = reinterpret_cast<float*>(s.buf1 + static_cast<size_t>(cap) * g);
  s.theta = reinterpret_cast<uint32_t*>(s.maxima + static_cast<size_t>(g) * (p + kMaxPad));
  s.ncand = reinterpret_cast<int*>(s.theta + g);
  s.fcnt = s.ncand + 2 * g;
  s.range = s.fcnt + 2 * g;
  s.flag = s.range + 2 * g;
  return s;
}

// Number of row maxima >= x over one padded row (p a multiple of 4; 16-byte reads on the GPU).
MSA_TOPK_HD int count_ge(const float* row, int p, float x) {
  int ge = 0;
  for (int s = 0; s < p; s += 4) {
#ifdef __CUDA_ARCH__
    const float4 q = *reinterpret_cast<const float4*>(row + s);
    const float y[4] = {q.x, q.y, q.z, q.w};
#else
    const float y[4] = {row[s], row[s + 1], row[s + 2], row[s + 3]};
#endif
#pragma unroll
    for (int i = 0; i < 4; ++i) ge += y[i] >= x ? 1 : 0;
  }
  return ge;
}

MSA_TOPK_HD int ceil_div_pos(int a, int b) {  // ceil(a / b) for b > 0 and any sign of a
  return a >= 0 ? (a + b - 1) / b : -((-a) / b);
}

// Entries 0..n-1 of the row (column g of a [cap][G] buffer): entries 0..nb-1 are the kept list B, sorted best
// first; nb..n-1 were appended since. Rank each by the number of greater keys (keys are unique) and store ranks
// < m at their rank in dst (best first). B's entry e is greater than exactly e others of B, so it is compared with
// the appended entries only; an appended entry with all n. (A full n x n count, session 7: ~43% of the 1M
// prefill kernel's instructions (ncu, H200), although most chunks append 0-3 entries to a row: 16 x 16 compares
// re-ranked an unchanged B.)
MSA_TOPK_HD void rank_select(const Comp* src, Comp* dst, int nb, int n, int m, int g, int G, int r, int P) {
  for (int e = r; e < n; e += P) {
    const Comp x = src[e * G + g];
    int rank = e < nb ? e : 0;
    for (int f = e < nb ? nb : 0; f < n; ++f) rank += src[f * G + g] > x ? 1 : 0;
    if (rank < m) dst[rank * G + g] = x;
  }
}

// Ops: sync(), sync_or(int) -> int, atomic_add(int*, int) -> old, atomic_max(uint32_t*, uint32_t). Src (scan): score(h, k, t) -> float,
// nvp(t) -> int; (merge): entry(h, s, e, t) -> Cand, nvp(t). bx, h, split: the CTA's coordinates.
template <int V, bool kMerge, class Ops, class Src>
MSA_TOPK_HD void block_select(const BlockParams& p, const BlockSmem& sm, Ops& ops, const Src& src, int bx, int h,
                              int split, int tid) {
  static_assert(V % 2 == 0 && V <= 32, "V: even (the overflow rounds alternate two counters), <= 32 (bit masks)");
  const int G = 1 << p.log_g, P = p.p, m = p.m;
  const int g = tid & (G - 1), r = tid >> p.log_g;
  const int64_t t = static_cast<int64_t>(bx) * G + g;
  const bool live = t < p.q;
  int nvp = p.nvp_scalar;
  if (p.nvp != nullptr && live) nvp = src.nvp(t);
  const RowRange rr = row_range(nvp, p.n_blocks, p.fb, p.fe);
  // this row's slots here: block indices [elo, ehi) (scan) or candidate entries [0, S * M) (merge)
  int elo = 0, ehi = 0;
  if (kMerge) {
    ehi = p.splits * m;
  } else {
    const int kb = split * p.split_len;
    const int ke = imin32(kb + p.split_len, p.n_blocks);
    elo = imax32(rr.lo, kb);
    ehi = imin32(rr.hi, ke);
  }
  if (!live || m <= 0 || elo >= ehi) elo = ehi = 0;
  if (r == 0) {
    sm.range[g] = elo;
    sm.range[G + g] = ehi;
    sm.ncand[g] = sm.ncand[G + g] = 0;
    sm.fcnt[g] = sm.fcnt[G + g] = 0;
  }
  if (tid == 0) *sm.flag = 0;
  ops.sync();
  int ulo, uhi;  // the CTA's union of row ranges: the chunk loop is CTA-uniform
  union_of_ranges(sm.range, sm.range + G, G, &ulo, &uhi);

  const int span = P * V;
  float va[V], vb[V];
  uint32_t ia[V], ib[V];  // merge: the entries' block indices (scan: computed from the slot)
  auto fetch = [&](int c0, float (&v)[V], uint32_t (&ix)[V]) {
    if (!kMerge && c0 + r >= elo && c0 + r + P * (V - 1) < ehi) {  // whole chunk inside the row: no checks
#pragma unroll
      for (int j = 0; j < V; ++j) v[j] = src.score(h, c0 + r + P * j, t);
    } else {
      // slot c0 + r + P * j is in [elo, ehi) iff jlo <= j < jhi (the divisions only at a row's edges: measured
      // ~7% on 16-chunk rows when they ran for every chunk)
      const int jlo = imax32(0, ceil_div_pos(elo - c0 - r, P));
      const int jhi = imin32(V, ceil_div_pos(ehi - c0 - r, P));
#pragma unroll
      for (int j = 0; j < V; ++j) {
        const int k = c0 + r + P * j;
        v[j] = -INFINITY;
        ix[j] = 0u;
        if (j >= jlo && j < jhi) {
          if (kMerge) {
            const int s = k / m;
            const Cand c = src.entry(h, s, k - s * m, t);
            v[j] = key_value(c.x);
            ix[j] = c.y;
          } else {
            v[j] = src.score(h, k, t);
          }
        }
      }
    }
  };
  // candidate test against theta and the row's worst kept (thr_v, thr_i). Scan: every slot of a later chunk
  // or round has a higher block index than anything kept, so an equal score loses (strict >).
  auto beats = [&](float v, uint32_t idx, float th, float thr_v, uint32_t thr_i) {
    const bool over_thr = kMerge ? (v > thr_v || (v == thr_v && idx < thr_i)) : v > thr_v;
    return v >= th && over_thr;
  };

  int nb = 0;          // this row's kept entries (B), sorted best first in buf[par][0..nb)
  int par = 0;         // CTA-uniform
  int need_theta = 1;  // CTA-uniform: some row's B holds fewer than M entries
  int chunk_no = 0;

  auto process = [&](int c0, const float (&v)[V], const uint32_t (&ix)[V]) {
    auto idx_of = [&](int j) { return kMerge ? ix[j] : static_cast<uint32_t>(c0 + r + P * j); };
    float th = -INFINITY;
    if (need_theta) {
      float mx = -INFINITY;
#pragma unroll
      for (int j = 0; j < V; ++j) mx = fmaxf(mx, v[j]);  // fmaxf drops NaN
      if (r == 0) sm.theta[g] = 0u;
      float* row = sm.maxima + g * (P + kMaxPad);
      row[r] = mx;
      ops.sync();
      // theta = max{mx_r : at least M maxima >= mx_r} = the M-th largest maximum
      if (mx > -INFINITY && count_ge(row, P, mx) >= m) ops.atomic_max(sm.theta + g, score_key(mx));
      ops.sync();
      th = key_value(sm.theta[g]);
    }
    Comp* cur = (par ? sm.buf1 : sm.buf0);
    Comp* nxt = (par ? sm.buf0 : sm.buf1);
    int* cnt = sm.ncand + (chunk_no & 1) * G;
    if (r == 0) sm.ncand[((chunk_no + 1) & 1) * G + g] = 0;  // the next chunk's counter (last read 2 chunks ago)
    float thr_v = -INFINITY;
    uint32_t thr_i = 0u;
    if (nb == m) {
      const Comp w = cur[(m - 1) * G + g];
      thr_v = key_value(comp_key(w));
      thr_i = comp_idx(w);
    }
    // Steady state of a scan (theta off: th = -inf), beats(v) is v > thr_v: one compare per value instead of two
    // (H200, session 16 run 3: 1M prefill 70.2 -> 66.2 us at H1, 246.7 -> 232.7 at H4; a per-thread max prefilter
    // on top was slower: a warp's 8 rows x 4 parts rarely all skip, so the max is paid on top of the compares).
    uint32_t mask = 0u;
    if (!kMerge && !need_theta) {
#pragma unroll
      for (int j = 0; j < V; ++j) mask |= v[j] > thr_v ? 1u << j : 0u;
    } else {
#pragma unroll
      for (int j = 0; j < V; ++j) mask |= beats(v[j], idx_of(j), th, thr_v, thr_i) ? 1u << j : 0u;
    }
    const int c = popcount32(mask);
    if (c > 0) {
      int pos = nb + ops.atomic_add(cnt + g, c);
      if (pos + c <= p.cap) {
#pragma unroll
        for (int j = 0; j < V; ++j) {
          if (mask & (1u << j)) cur[pos++ * G + g] = make_comp(score_key(v[j]), idx_of(j));
        }
      } else {
        *sm.flag = 1;  // the overflow rounds redo this chunk; what was appended past nb is dropped
      }
    }
    if (!ops.sync_or(c > 0)) return;  // nothing new anywhere in the CTA
    if (*sm.flag == 0) {
      const int n = nb + cnt[g];
      rank_select(cur, nxt, nb, n, m, g, G, r, P);
      nb = imin32(n, m);
      par ^= 1;
      need_theta = ops.sync_or(nb < m && elo < ehi);
      return;
    }
    // Overflow: B = cur[0..nb) is intact (appends went past it); redo the chunk one value per thread per round.
    for (int j = 0; j < V; ++j) {
      float x = v[0];
      uint32_t xi = idx_of(0);
#pragma unroll
      for (int jj = 1; jj < V; ++jj) {  // register select: no run-time indexing of v
        x = jj == j ? v[jj] : x;
        xi = jj == j ? idx_of(jj) : xi;
      }
      Comp* rcur = (par ? sm.buf1 : sm.buf0);
      Comp* rnxt = (par ? sm.buf0 : sm.buf1);
      float tv = -INFINITY;
      uint32_t ti = 0u;
      if (nb == m) {
        const Comp w = rcur[(m - 1) * G + g];
        tv = key_value(comp_key(w));
        ti = comp_idx(w);
      }
      int* fc = sm.fcnt + (j & 1) * G;
      if (r == 0) sm.fcnt[((j + 1) & 1) * G + g] = 0;
      const bool cd = beats(x, xi, th, tv, ti);
      if (cd) rcur[(nb + ops.atomic_add(fc + g, 1)) * G + g] = make_comp(score_key(x), xi);  // nb + P <= cap
      const int any = ops.sync_or(cd ? 1 : 0);
      if (j == 0 && tid == 0) *sm.flag = 0;  // every thread read the flag before this barrier
      if (!any) continue;
      const int n = nb + fc[g];
      rank_select(rcur, rnxt, nb, n, m, g, G, r, P);
      nb = imin32(n, m);
      par ^= 1;
      ops.sync();
    }
    need_theta = ops.sync_or(nb < m && elo < ehi);
  };

  // Scan with V <= 16: the next chunk's loads are in flight while this one is processed. V = 32 (rows that fit
  // in one chunk) and merge (usually one chunk, twice the registers per value): no prefetch.
  constexpr bool kPrefetch = !kMerge && V <= 16;
  if (ulo < uhi) {
    if (kPrefetch) fetch(ulo, va, ia);
    for (int c0 = ulo;; c0 += span) {
      const bool more = c0 + span < uhi;
      if (!kPrefetch) {
        fetch(c0, va, ia);
      } else if (more) {
        fetch(c0 + span, vb, ib);
      }
      process(c0, va, ia);
      ++chunk_no;
      if (!more) break;
      if (kPrefetch) {
#pragma unroll
        for (int j = 0; j < V; ++j) {
          va[j] = vb[j];
          ia[j] = ib[j];
        }
      }
    }
  }

  if (!live) return;  // no barrier below
  const Comp* best = (par ? sm.buf1 : sm.buf0);
  if (kMerge || p.splits == 1) {
    int32_t* row = p.out + (t * p.n_heads + h) * p.topk;
    for (int e = r; e < nb; e += P) {  // selected blocks in ascending index order
      const uint32_t xi = comp_idx(best[e * G + g]);
      int pos = 0;
      for (int f = 0; f < nb; ++f) pos += comp_idx(best[f * G + g]) < xi ? 1 : 0;
      row[rr.lo + pos] = static_cast<int32_t>(xi);
    }
    const int tail = rr.nvp - rr.hi;
    for (int q = r; q < p.topk; q += P) {
      if (q < rr.lo) {
        row[q] = q;
      } else if (q >= rr.lo + nb) {
        const int u = q - rr.lo - nb;
        row[q] = u < tail ? rr.hi + u : -1;
      }
    }
  } else {
    Cand* dst = p.ws_out + (static_cast<int64_t>(h) * p.splits + split) * m * p.q_pad + t;
    for (int e = r; e < m; e += P) {
      const Comp x = e < nb ? best[e * G + g] : 0ull;
      dst[e * p.q_pad] = make_cand(e < nb ? comp_key(x) : 0u, e < nb ? comp_idx(x) : 0u);
    }
  }
}

}  // namespace msa_topk
