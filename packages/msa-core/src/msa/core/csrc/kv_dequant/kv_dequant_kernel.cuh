// K/V dequantisation to 16-bit (kv_dequant.cu.jinja binds it): fp8 e4m3 (optional scalar or per-head scale) and
// NVFP4 (packed e2m1 pairs, one e4m3 scale per 16 elements, optional fp32 global scale), with an optional gather of
// outer rows (a page table's pages, or tokens). It stages quantised K/V for the 16-bit attention kernels: one pass
// over the bytes the call reads, memory-bound (fp8: 1 B in / 2 B out per element; NVFP4: 0.5625 B in / 2 B out).
//
// Layout: x is [n_in, row] (row = the elements of one outer index: tokens -> H x D, pages -> H x 128 x D), bytes of
// consecutive outer rows x_stride apart; out is [n_out, row] contiguous. Output row r reads input row rows[r] (or r
// without a gather); a source index outside [0, n_in) yields zeros (page-table padding, unowned entries).
// One thread converts 16 consecutive elements (one NVFP4 scale block; 16 fp8 bytes = one 16-byte load) and writes
// 32 bytes. Arithmetic matches msa.cute.quant's references bit for bit: fp8 float(x) * s; NVFP4 (e2m1 * scale) *
// global, each product in fp32, rounded once to the output type.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <stdint.h>

namespace msa_kv_dequant {

enum Format : int { kFp8 = 0, kNvfp4 = 1 };

struct Params {
  const uint8_t* x;            // fp8 bytes or packed e2m1 pairs
  const uint8_t* block_scale;  // NVFP4: e4m3 bytes, [n_in, row / 16], bs_stride bytes between rows
  const float* scale;          // fp8: nullptr, [1] or [H] (per head: head = element / head_elems); NVFP4: global [1]
  const int32_t* rows;         // nullptr or [n_out]
  void* out;
  int64_t n_out, n_in;
  int64_t row;         // elements per outer row (a multiple of 16)
  int64_t x_stride;    // bytes between outer rows of x
  int64_t bs_stride;   // bytes between outer rows of block_scale
  int64_t head_elems;  // elements per head inside a row (per-head fp8 scales)
  int num_scales;      // 0, 1 or H
};

__device__ __forceinline__ float e4m3_to_float(uint8_t b) {
  __half_raw h = __nv_cvt_fp8_to_halfraw(static_cast<__nv_fp8_storage_t>(b), __NV_E4M3);
  return __half2float(__half(h));
}

// E2M1 code (bit 3 = sign, bits 2:1 exponent, bit 0 mantissa) -> its value: 0, 0.5 (subnormal), else
// 2^(e-1) * (1 + m/2) built directly as fp32 bits.
__device__ __forceinline__ float e2m1_to_float(uint32_t c) {
  const uint32_t mag = c & 7u;
  const float v = mag < 2u ? 0.5f * static_cast<float>(mag) : __uint_as_float((((mag >> 1) + 126u) << 23) | ((mag & 1u) << 22));
  return (c & 8u) ? -v : v;
}

template <typename Out>
__device__ __forceinline__ uint32_t pack2(float a, float b);

template <>
__device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float a, float b) {
  __nv_bfloat162 h = __floats2bfloat162_rn(a, b);
  return *reinterpret_cast<uint32_t*>(&h);
}

template <>
__device__ __forceinline__ uint32_t pack2<__half>(float a, float b) {
  __half2 h = __floats2half2_rn(a, b);
  return *reinterpret_cast<uint32_t*>(&h);
}

template <typename Out, int kFormat>
__global__ void __launch_bounds__(256) kv_dequant_kernel(const Params p) {
  const int64_t chunks_per_row = p.row / 16;
  const int64_t total = p.n_out * chunks_per_row;
  float global = 1.0f;
  if (kFormat == kNvfp4 && p.num_scales == 1) global = __ldg(p.scale);
  for (int64_t c = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; c < total; c += int64_t(gridDim.x) * blockDim.x) {
    const int64_t r = c / chunks_per_row;
    const int64_t e0 = (c - r * chunks_per_row) * 16;  // first element inside the row
    const int64_t src = p.rows != nullptr ? static_cast<int64_t>(__ldg(p.rows + r)) : r;
    float v[16];
    if (src < 0 || src >= p.n_in) {
#pragma unroll
      for (int i = 0; i < 16; ++i) v[i] = 0.0f;
    } else if (kFormat == kFp8) {
      const uint4 raw = __ldg(reinterpret_cast<const uint4*>(p.x + src * p.x_stride + e0));
      const uint8_t* b = reinterpret_cast<const uint8_t*>(&raw);
      float s = 1.0f;
      if (p.num_scales == 1) s = __ldg(p.scale);
      else if (p.num_scales > 1) s = __ldg(p.scale + e0 / p.head_elems);
#pragma unroll
      for (int i = 0; i < 16; ++i) v[i] = e4m3_to_float(b[i]) * s;
    } else {
      const uint2 raw = __ldg(reinterpret_cast<const uint2*>(p.x + src * p.x_stride + e0 / 2));
      const uint8_t* b = reinterpret_cast<const uint8_t*>(&raw);
      const float bs = e4m3_to_float(__ldg(p.block_scale + src * p.bs_stride + e0 / 16));
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        v[2 * i] = e2m1_to_float(b[i] & 0xFu) * bs * global;
        v[2 * i + 1] = e2m1_to_float(b[i] >> 4) * bs * global;
      }
    }
    uint4 o[2];
    uint32_t* w = reinterpret_cast<uint32_t*>(o);
#pragma unroll
    for (int i = 0; i < 8; ++i) w[i] = pack2<Out>(v[2 * i], v[2 * i + 1]);
    uint4* dst = reinterpret_cast<uint4*>(static_cast<Out*>(p.out) + r * p.row + e0);
    dst[0] = o[0];
    dst[1] = o[1];
  }
}

}  // namespace msa_kv_dequant
