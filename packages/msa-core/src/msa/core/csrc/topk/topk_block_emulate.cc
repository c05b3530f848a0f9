// Host replay of the block path of sparse_topk_select (topk_block_core.cuh), for tests only.
//
// One std::thread per CUDA thread of a CTA runs the same block_select code; __syncthreads(_or) is a real
// barrier, shared-memory atomics are real atomics, and random yields before each atomic shuffle the append
// order (the result must not depend on it). CTAs run one after another on the same threads; shared memory is
// refilled with garbage before each CTA (the kernel must not read what it did not write). The launch
// derivation (splits, split length, q_pad) mirrors topk_block_select() in topk_select.cu.jinja.
#include <stdint.h>

#include <algorithm>
#include <condition_variable>
#include <mutex>
#include <thread>
#include <vector>

#include "topk_block_core.cuh"

using namespace msa_topk;

namespace {

class Barrier {
 public:
  explicit Barrier(int n) : n_(n) {}
  int arrive(int x) {  // returns the OR over all arrivals of this generation
    std::unique_lock<std::mutex> lock(mu_);
    acc_ |= x != 0;
    const uint64_t gen = gen_;
    if (++waiting_ == n_) {
      result_ = acc_;
      acc_ = 0;
      waiting_ = 0;
      ++gen_;
      cv_.notify_all();
      return result_;
    }
    cv_.wait(lock, [&] { return gen_ != gen; });
    return result_;  // the next generation cannot complete before this thread arrives again
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  int n_, waiting_ = 0, acc_ = 0, result_ = 0;
  uint64_t gen_ = 0;
};

struct HostOps {
  Barrier* barrier;
  uint64_t rng;
  bool shuffle;
  void sync() { barrier->arrive(0); }
  int sync_or(int x) { return barrier->arrive(x); }
  void maybe_yield() {
    if (shuffle) {
      rng ^= rng << 13;
      rng ^= rng >> 7;
      rng ^= rng << 17;
      if (rng % 3 == 0) std::this_thread::yield();
    }
  }
  int atomic_add(int* a, int v) {
    maybe_yield();
    return __atomic_fetch_add(a, v, __ATOMIC_SEQ_CST);
  }
  void atomic_max(uint32_t* a, uint32_t v) {
    maybe_yield();
    uint32_t old = __atomic_load_n(a, __ATOMIC_SEQ_CST);
    while (old < v && !__atomic_compare_exchange_n(a, &old, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST)) {
    }
  }
};

struct ScanSrc {
  const float* scores;
  const int32_t* nvp_ptr;
  int n_blocks;
  int64_t q;
  float score(int h, int k, int64_t t) const { return scores[(int64_t(h) * n_blocks + k) * q + t]; }
  int nvp(int64_t t) const { return nvp_ptr[t]; }
  Cand entry(int, int, int, int64_t) const { return make_cand(0u, 0u); }
};

struct MergeSrc {
  const Cand* ws;
  const int32_t* nvp_ptr;
  int splits, m;
  int64_t q_pad;
  float score(int, int, int64_t) const { return -INFINITY; }
  int nvp(int64_t t) const { return nvp_ptr[t]; }
  Cand entry(int h, int s, int e, int64_t t) const {
    return ws[((int64_t(h) * splits + s) * m + e) * q_pad + t];
  }
};

template <int V, bool kMerge, class Src>
void run_grid(const BlockParams& p, const Src& src, int grid_x, int grid_z, uint64_t seed) {
  const int n_threads = (1 << p.log_g) * p.p;
  const size_t smem_bytes = block_smem_bytes(1 << p.log_g, p.p, p.cap);
  std::vector<uint64_t> smem((smem_bytes + 7) / 8 + 2);
  unsigned char* raw = reinterpret_cast<unsigned char*>(smem.data());
  const BlockSmem sm = carve_block_smem(raw, 1 << p.log_g, p.p, p.cap);
  Barrier barrier(n_threads);
  std::vector<std::thread> threads;
  for (int tid = 0; tid < n_threads; ++tid) {
    threads.emplace_back([&, tid] {
      HostOps ops{&barrier, (seed + 1) * 0x9E3779B97F4A7C15ull + uint64_t(tid) * 7919 + 1, seed != 0};
      uint64_t fill = seed * 31 + 17;
      for (int h = 0; h < p.n_heads; ++h)
        for (int z = 0; z < grid_z; ++z)
          for (int x = 0; x < grid_x; ++x) {
            ops.sync();  // the previous CTA is done with shared memory
            if (tid == 0) {
              for (auto& w : smem) {
                fill = fill * 6364136223846793005ull + 1442695040888963407ull;
                w = fill;
              }
            }
            ops.sync();
            block_select<V, kMerge>(p, sm, ops, src, x, h, z, tid);
          }
    });
  }
  for (auto& th : threads) th.join();
}

}  // namespace

// scores: float32 [H, K, Q] (bf16 inputs as their exact float values); nvp: int32 [Q] or null; values_per_thread
// 16 or 32 (the kernel's scan instantiations; the merge always uses 16). Returns 0, or -1 on bad arguments.
extern "C" int msa_topk_block_emulate(const float* scores, int n_heads, int n_blocks, int64_t q, int topk,
                                      const int32_t* nvp, int nvp_scalar, int fb, int fe, int splits, int log_g,
                                      int threads_per_row, int cap, int values_per_thread, uint64_t seed,
                                      int32_t* out) {
  const int m = topk - fb - fe;
  if (m < 0 || splits < 1 || log_g < 0 || log_g > 5 || threads_per_row < 4 || threads_per_row % 4 != 0 ||
      cap < m + threads_per_row || (1 << log_g) * threads_per_row > 1024 ||
      (values_per_thread != 16 && values_per_thread != 32))
    return -1;
  BlockParams p{};
  p.nvp = nvp;
  p.out = out;
  p.q = q;
  p.q_pad = (q + 31) / 32 * 32;
  p.n_blocks = n_blocks;
  p.n_heads = n_heads;
  p.topk = topk;
  p.fb = fb;
  p.fe = fe;
  p.m = m;
  p.nvp_scalar = nvp != nullptr ? n_blocks : std::min(std::max(nvp_scalar, 0), n_blocks);
  p.log_g = log_g;
  p.p = threads_per_row;
  p.cap = cap;
  p.splits = m > 0 ? splits : 1;
  p.split_len = (n_blocks + p.splits - 1) / p.splits;
  const int grid_x = static_cast<int>((q + (1 << log_g) - 1) >> log_g);
  std::vector<Cand> ws(p.splits > 1 ? size_t(n_heads) * p.splits * m * p.q_pad : 0, make_cand(0xDEADu, 0xBEEFu));
  p.ws_out = ws.data();
  if (values_per_thread == 16) {
    run_grid<16, false>(p, ScanSrc{scores, nvp, n_blocks, q}, grid_x, p.splits, seed);
  } else {
    run_grid<32, false>(p, ScanSrc{scores, nvp, n_blocks, q}, grid_x, p.splits, seed);
  }
  if (p.splits > 1) {
    p.ws_in = ws.data();
    run_grid<16, true>(p, MergeSrc{ws.data(), nvp, p.splits, m, p.q_pad}, grid_x, 1, seed + 1);
  }
  return 0;
}
