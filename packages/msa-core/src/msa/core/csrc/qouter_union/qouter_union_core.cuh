// Q-outer union tables (msa.cute.qouter.build_qouter_unions' contract): the per-item warp algorithm, shared by
// the CUDA kernel (qouter_union_kernel.cuh) and the host replay used by the CPU tests (qouter_union_emulate.cc).
// The warp primitives come from an Ops type (one object per lane): sync, min / max / inclusive-sum collectives,
// a broadcast of lane 31, atomic OR and the read-only load.
//
// An item is T consecutive tokens x one KV head; its entries are the T x topk selected block ids (token t of the
// item reads row clamp(token0 + t, 0, total_q - 1) of kv_block_indexes, like the torch builder). An entry is
// valid iff t < ntok, 0 <= id < item_kv_blocks (when given) and id < INT32_MAX / T (the torch builder's key
// bound). Per item:
//   1. warp min / max of the valid ids;
//   2. per window of kBitmapBits ids starting at the smallest id not yet covered (one window unless the item
//      spans more than kBitmapBits blocks; the next window starts at the next valid id, so empty stretches cost
//      nothing): set one shared-memory bit per valid id in the window (duplicates collapse), warp-scan the word
//      popcounts -> union position of every set bit (ascending ids, as the torch sort), then OR each entry's
//      token bit into the mask word of its id's position;
//   3. U > cap (= min(umax, route_max)) stops early: union_len = -1, union / mask rows all zero.
// Union and mask rows are staged in shared memory (kStaged) and written whole (zeros included); when
// umax * (1 + W) words do not fit the per-warp budget the rows are zeroed in global memory first and written in
// place (global atomic OR).
#pragma once
#include <stdint.h>

#include "../common/bits.cuh"

#ifdef __CUDACC__
#define MSA_QU_HD __device__ __forceinline__
#else
#define MSA_QU_HD inline
#endif

namespace msa_qouter_union {

constexpr int kWarpSize = 32;
constexpr int kIntMax = 0x7fffffff;

struct Params {
  const int32_t* sel;        // kv_block_indexes, element strides sel_s0 / s1 / s2 ([total_q, Hkv, topk])
  long long sel_s0, sel_s1, sel_s2;
  const int32_t* token0;     // [num_items]
  const int32_t* ntok;       // [num_items]
  const int32_t* kv_head;    // [num_items]
  const int32_t* kv_blocks;  // [num_items] or nullptr
  int32_t* union_ids;        // [num_items, umax]
  int32_t* union_len;        // [num_items]
  int32_t* mask;             // [num_items, umax, words]
  int total_q, hkv, topk, T, words, umax, cap;
  int id_bound;              // INT32_MAX / T: ids at or past it are ignored (the torch builder's int32 key bound)
  long long num_items;
  int warps_per_cta;
  int stage_words;           // per-warp staging words (kStaged): round4(umax) + round4(umax * words), else 0
};

using msa_bits::lowest_bit32;
using msa_bits::popcount32;

// Per-warp shared memory words: bitmap | word prefix | (kStaged) union row | mask row.
MSA_QU_HD int warp_smem_words(int bitmap_words, int stage_words) { return 2 * bitmap_words + stage_words; }

// Host: the staging words one warp needs for an umax x words mask (union row and mask row, each padded to 16 B).
inline long long staged_row_words(long long umax, long long words) {
  return ((umax + 3) & ~3ll) + ((umax * words + 3) & ~3ll);
}

// dst[0, n) = src[0, n) (src == nullptr: zeros); 16-byte stores on the device when the pointers and n allow.
template <class Ops>
MSA_QU_HD void warp_store_row(Ops& ops, int32_t* dst, const int32_t* src, int n, int lane) {
#ifdef __CUDA_ARCH__
  const bool vec = (n % 4) == 0 && (reinterpret_cast<uintptr_t>(dst) % 16) == 0 &&
                   (src == nullptr || (reinterpret_cast<uintptr_t>(src) % 16) == 0);
  if (vec) {
    int4* d4 = reinterpret_cast<int4*>(dst);
    const int4* s4 = reinterpret_cast<const int4*>(src);
    for (int i = lane; i < n / 4; i += kWarpSize) d4[i] = src ? s4[i] : make_int4(0, 0, 0, 0);
    return;
  }
#endif
  for (int i = lane; i < n; i += kWarpSize) ops.store(dst + i, src ? src[i] : 0);
}

template <int kBitmapWords, bool kStaged, class Ops>
MSA_QU_HD void build_item(const Params& p, long long item, int lane, uint32_t* warp_smem, Ops& ops) {
  constexpr int kBitmapBits = kBitmapWords * 32;
  uint32_t* bitmap = warp_smem;
  int* prefix = reinterpret_cast<int*>(bitmap + kBitmapWords);
  const int row_words = p.umax * p.words;
  int32_t* g_union = p.union_ids + item * p.umax;
  int32_t* g_mask = p.mask + item * row_words;
  int32_t* u_row = kStaged ? reinterpret_cast<int32_t*>(prefix + kBitmapWords) : g_union;
  int32_t* m_row = kStaged ? u_row + ((p.umax + 3) & ~3) : g_mask;  // 16-byte aligned staging rows

  const int token0 = ops.load(p.token0 + item);
  const int head = ops.load(p.kv_head + item);
  const bool head_ok = head >= 0 && head < p.hkv;  // malformed table (validation off): no selection, no bad read
  int nt = ops.load(p.ntok + item);
  nt = nt < 0 ? 0 : (nt > p.T ? p.T : nt);
  if (!head_ok) nt = 0;
  int bound = p.id_bound;
  if (p.kv_blocks != nullptr) {
    const int kvb = ops.load(p.kv_blocks + item);
    bound = kvb < bound ? kvb : bound;
  }
  const int n_entries = nt * p.topk;
  const int32_t* sel_h = p.sel + (head_ok ? static_cast<long long>(head) * p.sel_s1 : 0ll);

  // Entry e -> (token t, id); id = -1 when the entry is not valid.
  auto entry = [&](int e, int& t) -> int {
    t = e / p.topk;
    const int k = e - t * p.topk;
    long long row = static_cast<long long>(token0) + t;
    row = row < 0 ? 0 : (row >= p.total_q ? p.total_q - 1 : row);
    const int id = ops.load(sel_h + row * p.sel_s0 + k * p.sel_s2);
    return (id >= 0 && id < bound) ? id : -1;
  };

  int lo = kIntMax, hi = -1;
  for (int e = lane; e < n_entries; e += kWarpSize) {
    int t;
    const int id = entry(e, t);
    if (id >= 0) {
      lo = id < lo ? id : lo;
      hi = id > hi ? id : hi;
    }
  }
  lo = ops.reduce_min(lo);
  hi = ops.reduce_max(hi);

  // Rows start zeroed: shared staging (written out whole at the end) or the global rows themselves.
  if (kStaged) {
    for (int i = lane; i < row_words; i += kWarpSize) m_row[i] = 0;
  } else {
    warp_store_row(ops, g_union, nullptr, p.umax, lane);
    warp_store_row(ops, g_mask, nullptr, row_words, lane);
  }

  int total = 0;  // union blocks found so far (U once the loop ends)
  while (lo != kIntMax && total <= p.cap) {
    const uint32_t span = static_cast<uint32_t>(hi) - static_cast<uint32_t>(lo);  // hi >= lo
    const int nw = span >= static_cast<uint32_t>(kBitmapBits) ? kBitmapWords : static_cast<int>(span / 32) + 1;
    for (int w = lane; w < nw; w += kWarpSize) bitmap[w] = 0;
    ops.sync();
    int next_lo = kIntMax;
    for (int e = lane; e < n_entries; e += kWarpSize) {
      int t;
      const int id = entry(e, t);
      if (id < lo) continue;  // invalid (-1) or covered by an earlier window
      const uint32_t d = static_cast<uint32_t>(id) - static_cast<uint32_t>(lo);
      if (d < static_cast<uint32_t>(kBitmapBits)) {
        ops.atomic_or(bitmap + (d >> 5), 1u << (d & 31));
      } else {
        next_lo = id < next_lo ? id : next_lo;
      }
    }
    next_lo = ops.reduce_min(next_lo);
    ops.sync();

    // Union positions: exclusive prefix of the word popcounts, in id order.
    for (int w0 = 0; w0 < nw; w0 += kWarpSize) {
      const int w = w0 + lane;
      const uint32_t bits = w < nw ? bitmap[w] : 0u;
      const int c = popcount32(bits);
      const int incl = ops.inclusive_sum(c);
      const int first = total + incl - c;
      if (w < nw) prefix[w] = first;
      uint32_t rest = bits;
      for (int pos = first; rest != 0 && pos < p.umax; ++pos) {
        const int b = lowest_bit32(rest);
        rest &= rest - 1;
        ops.store(u_row + pos, lo + w * 32 + b);
      }
      total += ops.last_lane(incl);
    }
    if (total > p.cap) break;  // not routed: the mask is not needed
    ops.sync();

    for (int e = lane; e < n_entries; e += kWarpSize) {
      int t;
      const int id = entry(e, t);
      if (id < lo) continue;
      const uint32_t d = static_cast<uint32_t>(id) - static_cast<uint32_t>(lo);
      if (d >= static_cast<uint32_t>(kBitmapBits)) continue;
      const int w = static_cast<int>(d >> 5);
      const int pos = prefix[w] + popcount32(bitmap[w] & ((1u << (d & 31)) - 1u));
      ops.atomic_or(reinterpret_cast<uint32_t*>(m_row + pos * p.words + (t >> 5)), 1u << (t & 31));
    }
    ops.sync();  // the bitmap / prefix are rewritten by the next window; the mask is read below
    lo = next_lo;
  }

  const bool routed = total <= p.cap;
  ops.sync();
  if (lane == 0) ops.store(p.union_len + item, routed ? total : -1);
  if (kStaged) {
    if (routed) {
      for (int u = lane + total; u < p.umax; u += kWarpSize) u_row[u] = 0;
      ops.sync();
      warp_store_row(ops, g_union, u_row, p.umax, lane);
      warp_store_row(ops, g_mask, m_row, row_words, lane);
    } else {
      warp_store_row(ops, g_union, nullptr, p.umax, lane);
      warp_store_row(ops, g_mask, nullptr, row_words, lane);
    }
  } else if (!routed) {  // partial rows were written in place: clear them again
    warp_store_row(ops, g_union, nullptr, p.umax, lane);
    warp_store_row(ops, g_mask, nullptr, row_words, lane);
  }
}

}  // namespace msa_qouter_union
