// Bit helpers shared by kernels whose selection code also runs on the host (CPU replays: csrc/*/*_emulate.cc).
// Included by relative path ("../common/bits.cuh") so the emulators, built with -I csrc/<family> only, find it too.
#pragma once

#include <stdint.h>

#if defined(__CUDACC__)
#define MSA_BITS_HD __host__ __device__ __forceinline__
#else
#define MSA_BITS_HD inline
#endif

namespace msa_bits {

MSA_BITS_HD int popcount32(uint32_t x) {
#ifdef __CUDA_ARCH__
  return __popc(x);
#else
  return __builtin_popcount(x);
#endif
}

MSA_BITS_HD int lowest_bit32(uint32_t x) {  // index of the lowest set bit; x != 0
#ifdef __CUDA_ARCH__
  return __ffs(x) - 1;
#else
  return __builtin_ctz(x);
#endif
}

}  // namespace msa_bits
