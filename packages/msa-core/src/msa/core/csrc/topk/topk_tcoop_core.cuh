// "tcoop" path of sparse_topk_select (transposed-load coop): the coop G1W8 selection (topk_coop_core.cuh) for decode
// rows of K <= 1024 blocks, with each row's loads spread over a cluster of 8 CTAs that hold 8 consecutive tokens.
//
// Why: max_score [H, K, Q] keeps tokens contiguous, so one row's 1024 values sit in 1024 different 128-byte lines
// (stride Q * 4 bytes); a coop CTA requests all 1024 of them, one L1 tag lookup each, and that is the largest part
// of a 128K decode call (H200 ablation, session 17: loads +1.10 us over a 0.88 us launch; the read kernel's whole
// call 1.39). Here CTA c of a cluster loads the blocks [128 c, 128 c + 128) of all 8 rows -- each request is one
// 32-byte sector shared by the 8 tokens -- so 128 lines per SM instead of 1024 (session 18: loads +0.70 us). Each
// thread stores its four values (16 bytes) straight from registers into the row's CTA with st.async, completing
// transaction bytes on that CTA's mbarrier (+0.26 us, including the wait for the slowest of the 8 loaders), laid out
// as coop's thread i holds them (tcoop_block: thread i's blocks in supergroup i % 32), and the coop selection runs
// unchanged from there. Measured and dropped (session 18): a shared-memory transpose + one bulk copy per row
// (0.15 us slower); sending masked values and thread maxima too so the selection starts at the bound, with one
// candidate atomic per warp (0.05 us slower: twice the remote stores).
//
// Order: thread 0 initialises the mbarrier (expecting the row's 4096 bytes) and fences the init at cluster scope; a
// cluster barrier (arrive + wait while the loads are in flight) keeps every remote store behind every destination's
// init. A CTA leaves only after all its bytes arrived (nobody writes into it later); st.async reads registers only.
#pragma once

#include "topk_coop_core.cuh"

namespace msa_topk {

#ifdef __CUDACC__
struct TcoopSmem {
  CoopSmem<1, 256> coop;
  alignas(16) float vals[kCoopRowBlocks];  // thread i's four values at [4 i, 4 i + 4) (tcoop_block order)
  alignas(8) unsigned long long full;      // mbarrier: vals complete
};

__device__ __forceinline__ uint32_t tcoop_smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// The shared::cluster address of `addr` (this CTA's shared memory) in cluster rank `rank`.
__device__ __forceinline__ uint32_t tcoop_remote(uint32_t addr, uint32_t rank) {
  uint32_t r;
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(r) : "r"(addr), "r"(rank));
  return r;
}

__device__ __forceinline__ void tcoop_wait_full(uint32_t full_addr) {
  uint32_t done = 0;
  while (!done) {
    asm volatile(
        "{\n\t.reg .pred p;\n\tmbarrier.try_wait.parity.shared::cta.b64 p, [%1], 0;\n\tselp.u32 %0, 1, 0, p;\n\t}"
        : "=r"(done)
        : "r"(full_addr)
        : "memory");
  }
}

template <typename T>
__device__ __forceinline__ void tcoop_select_cta(const NetParams& p, TcoopSmem& sm) {
  constexpr int V = 4;
  const int tid = threadIdx.x;
  uint32_t rank;
  asm volatile("mov.u32 %0, %%cluster_ctarank;" : "=r"(rank));
  const int h = blockIdx.y;
  const int64_t t = blockIdx.x;  // this CTA's row (token)
  const uint32_t full_addr = tcoop_smem_addr(&sm.full);
  // Thread (row r = tid % 8, supergroup e = tid / 8) loads the blocks 128 rank + e + 32 j of row r: a warp load
  // instruction reads 4 blocks x 8 tokens (4 sectors). Row r's CTA keeps them as its thread 32 rank + e's values.
  static_assert(kTcoopRows == 8 && kTcoopRows * kCoopGroups == 256, "tcoop: 8 rows x 32 supergroups = 256 threads");
  const int lr = tid & 7, e = tid >> 3;
  const int64_t tl = t - rank + lr;
  float x[V];
  {
    const bool lvalid = tl < p.q;
    const T* src = static_cast<const T*>(p.scores) + static_cast<int64_t>(h) * p.n_blocks * p.q + (lvalid ? tl : 0);
#pragma unroll
    for (int j = 0; j < V; ++j) {
      const int b = tcoop_load_block(static_cast<int>(rank), e, j);
      x[j] = lvalid && b < p.n_blocks ? ScoreLoad<T>::load(src + static_cast<int64_t>(b) * p.q) : -INFINITY;
    }
  }
  if (tid == 0) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" ::"r"(full_addr));
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(full_addr),
                 "r"(static_cast<uint32_t>(kCoopRowBlocks * sizeof(float))));
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  const bool valid = t < p.q;
  int nvp = valid ? p.nvp_scalar : 0;
  if (p.nvp != nullptr && valid) nvp = __ldg(p.nvp + t);
  asm volatile("barrier.cluster.arrive.relaxed.aligned;\n\tbarrier.cluster.wait.aligned;" ::: "memory");
  asm volatile("st.async.shared::cluster.mbarrier::complete_tx::bytes.v4.f32 [%0], {%1, %2, %3, %4}, [%5];" ::"r"(
                   tcoop_remote(tcoop_smem_addr(&sm.vals[4 * tcoop_owner_thread(static_cast<int>(rank), e)]), lr)),
               "f"(x[0]), "f"(x[1]), "f"(x[2]), "f"(x[3]), "r"(tcoop_remote(full_addr, lr))
               : "memory");
  tcoop_wait_full(full_addr);
  const float4 w = reinterpret_cast<const float4*>(sm.vals)[tid];
  float v[V] = {w.x, w.y, w.z, w.w};
  coop_select_loaded<T, 1, 8, true>(p, sm.coop, v, nvp);
}
#endif

}  // namespace msa_topk
