// Host replay of the Q-outer union kernel (qouter_union_core.cuh), for the CPU tests only (never in the module).
//
// One std::thread per lane runs the same build_item code; __syncwarp is a real 32-thread barrier, the warp
// collectives exchange values through a slot array between two barriers, atomic ORs are real atomics with random
// yields in front (the result must not depend on their order). Items run one after another on the same 32
// threads; the warp's shared memory is refilled with garbage before each item (the code must not read what it
// did not write). The caller picks the staged or in-place row path and the window size (bitmap words).
#include <stdint.h>

#include <condition_variable>
#include <mutex>
#include <thread>
#include <vector>

#include "qouter_union_core.cuh"

using namespace msa_qouter_union;

namespace {

class Barrier {
 public:
  explicit Barrier(int n) : n_(n) {}
  void wait() {
    std::unique_lock<std::mutex> lock(mu_);
    const uint64_t gen = gen_;
    if (++arrived_ == n_) {
      arrived_ = 0;
      ++gen_;
      cv_.notify_all();
      return;
    }
    cv_.wait(lock, [&] { return gen_ != gen; });
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  int n_, arrived_ = 0;
  uint64_t gen_ = 0;
};

struct Warp {
  Barrier barrier{kWarpSize};
  int slots[kWarpSize];
};

struct HostOps {
  Warp* warp;
  int lane;
  uint64_t rng;

  void sync() { warp->barrier.wait(); }
  template <class F>
  int collective(int v, F combine) {
    warp->slots[lane] = v;
    sync();
    const int out = combine(warp->slots);
    sync();  // nobody overwrites a slot before every lane has read them all
    return out;
  }
  int reduce_min(int v) {
    return collective(v, [](const int* s) {
      int m = s[0];
      for (int i = 1; i < kWarpSize; ++i) m = s[i] < m ? s[i] : m;
      return m;
    });
  }
  int reduce_max(int v) {
    return collective(v, [](const int* s) {
      int m = s[0];
      for (int i = 1; i < kWarpSize; ++i) m = s[i] > m ? s[i] : m;
      return m;
    });
  }
  int inclusive_sum(int v) {
    const int me = lane;
    return collective(v, [me](const int* s) {
      int acc = 0;
      for (int i = 0; i <= me; ++i) acc += s[i];
      return acc;
    });
  }
  int last_lane(int v) {
    return collective(v, [](const int* s) { return s[kWarpSize - 1]; });
  }
  void atomic_or(uint32_t* a, uint32_t v) {
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    if (rng % 3 == 0) std::this_thread::yield();
    __atomic_fetch_or(a, v, __ATOMIC_SEQ_CST);
  }
  int load(const int32_t* a) { return *a; }
  void store(int32_t* a, int v) { *a = v; }
};

template <int kBitmapWords, bool kStaged>
void run_items(const Params& p, uint64_t seed) {
  Warp warp;
  std::vector<uint32_t> smem(static_cast<size_t>(warp_smem_words(kBitmapWords, p.stage_words)));
  std::vector<std::thread> lanes;
  for (int lane = 0; lane < kWarpSize; ++lane) {
    lanes.emplace_back([&, lane] {
      HostOps ops{&warp, lane, seed * 0x9E3779B97F4A7C15ull + static_cast<uint64_t>(lane) * 7919 + 1};
      for (long long item = 0; item < p.num_items; ++item) {
        if (lane == 0) {
          uint64_t g = seed ^ static_cast<uint64_t>(item) * 0x2545F4914F6CDD1Dull;
          for (auto& w : smem) {
            g ^= g << 13;
            g ^= g >> 7;
            g ^= g << 17;
            w = static_cast<uint32_t>(g);
          }
        }
        ops.sync();
        build_item<kBitmapWords, kStaged>(p, item, lane, smem.data(), ops);
        ops.sync();
      }
    });
  }
  for (auto& t : lanes) t.join();
}

}  // namespace

// sel: int32 with element strides s0 / s1 / s2; tables [n]; kv_blocks may be null; outputs as the kernel's.
// bitmap_words: 256 (the module's) or 2 (64-id windows, to exercise the multi-window path on small ids).
// Returns 0, or -1 for arguments the replay does not take.
extern "C" int msa_qouter_union_emulate(const int32_t* sel, long long s0, long long s1, long long s2, int total_q,
                                        int hkv, int topk, const int32_t* token0, const int32_t* ntok,
                                        const int32_t* kv_head, const int32_t* kv_blocks, int32_t* union_ids,
                                        int32_t* union_len, int32_t* mask, long long num_items, int T, int umax,
                                        int cap, int staged, int bitmap_words, unsigned long long seed) {
  if (T < 1 || umax < 0 || cap < 0 || cap > umax || total_q < 1 || topk < 1 || hkv < 1) return -1;
  Params p{};
  p.sel = sel;
  p.sel_s0 = s0;
  p.sel_s1 = s1;
  p.sel_s2 = s2;
  p.token0 = token0;
  p.ntok = ntok;
  p.kv_head = kv_head;
  p.kv_blocks = kv_blocks;
  p.union_ids = union_ids;
  p.union_len = union_len;
  p.mask = mask;
  p.total_q = total_q;
  p.hkv = hkv;
  p.topk = topk;
  p.T = T;
  p.words = (T + 31) / 32;
  p.umax = umax;
  p.cap = cap;
  p.id_bound = 0x7fffffff / T;
  p.num_items = num_items;
  p.warps_per_cta = 1;
  p.stage_words = staged ? static_cast<int>(staged_row_words(umax, p.words)) : 0;
  if (bitmap_words == 256) {
    staged ? run_items<256, true>(p, seed) : run_items<256, false>(p, seed);
  } else if (bitmap_words == 2) {
    staged ? run_items<2, true>(p, seed) : run_items<2, false>(p, seed);
  } else {
    return -1;
  }
  return 0;
}
