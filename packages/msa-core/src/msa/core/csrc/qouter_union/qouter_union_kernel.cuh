// Q-outer union tables: the CUDA kernel, one warp per work item (algorithm in qouter_union_core.cuh).
// No block-level barrier: a warp whose item is past num_items just exits.
#pragma once
#include <cuda_runtime.h>
#include <stdint.h>

#include "qouter_union_core.cuh"

namespace msa_qouter_union {

constexpr unsigned kFullMask = 0xffffffffu;

struct DeviceOps {
  __device__ __forceinline__ void sync() { __syncwarp(); }
  __device__ __forceinline__ int reduce_min(int v) { return __reduce_min_sync(kFullMask, v); }
  __device__ __forceinline__ int reduce_max(int v) { return __reduce_max_sync(kFullMask, v); }
  __device__ __forceinline__ int inclusive_sum(int v) {
    const int lane = threadIdx.x % kWarpSize;
#pragma unroll
    for (int d = 1; d < kWarpSize; d <<= 1) {
      const int o = __shfl_up_sync(kFullMask, v, d);
      if (lane >= d) v += o;
    }
    return v;
  }
  __device__ __forceinline__ int last_lane(int v) { return __shfl_sync(kFullMask, v, kWarpSize - 1); }
  __device__ __forceinline__ void atomic_or(uint32_t* a, uint32_t v) { atomicOr(a, v); }
  __device__ __forceinline__ int load(const int32_t* a) { return __ldg(a); }
  __device__ __forceinline__ void store(int32_t* a, int v) { *a = v; }
};

template <int kBitmapWords, bool kStaged>
__global__ void __launch_bounds__(256, 4) qouter_union_kernel(const Params p) {
  extern __shared__ __align__(16) uint32_t smem[];
  const int warp = threadIdx.x / kWarpSize;
  const long long item = static_cast<long long>(blockIdx.x) * p.warps_per_cta + warp;
  if (item >= p.num_items) return;
  DeviceOps ops;
  build_item<kBitmapWords, kStaged>(p, item, threadIdx.x % kWarpSize,
                                    smem + static_cast<size_t>(warp) * warp_smem_words(kBitmapWords, p.stage_words),
                                    ops);
}

}  // namespace msa_qouter_union
