// Per-token block-sparse paged decode attention (MSA decode / MTP), sm_90a and sm_100a (mma.sync, cp.async).
//
// One CTA = one (query token t, KV head h, split s of the token's k selected blocks). The G = Hq / Hkv query
// heads of (t, h) share the block list, so they form the M dimension of m16n8k16 MMAs (rows >= G are zero).
// Each of the 4 warps owns a disjoint set of 16-key chunks (chunk c -> warp c % 4) and runs its own cp.async
// pipeline of kStages chunks (K and V, 8 KiB per chunk) and its own online softmax, so the steady state has
// no CTA barrier; the warps' (m, l, O) are merged through shared memory at the end. The split writes either
// the final output (one split) or a normalised fp32 partial O + base-2 LSE that the combine kernel merges.
//
// Keys j >= lim (the token's exclusive visible limit: min(kv_len, i + qo_offset + 1) causal, kv_len otherwise,
// computed at plan time) are zero-filled by cp.async (never read from memory) and masked to -inf, so garbage
// or NaN past a request's end never reaches the output. Blocks at or past lim are not loaded at all.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

namespace msa_sparse_decode {

constexpr int kHeadDim = 128;
constexpr int kBlock = 128;          // keys per block = page
constexpr int kChunk = 16;           // keys per warp step
constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kRows = 16;            // MMA M: query heads of one KV head (G <= 16)
constexpr int kMaxBlocksPerSplit = 64;
constexpr int kRowBytes = kHeadDim * 2;           // 256 B per key / query row
constexpr int kTileBytes = kChunk * kRowBytes;    // 4 KiB: 16 rows of K (or V)
constexpr int kStageBytes = 2 * kTileBytes;       // K + V of one chunk
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

struct Params {
  const void* q;             // [total_q, Hq, 128]
  const void* k;             // [pages, Hkv, 128, 128]
  const void* v;             // [pages, Hkv, 128, 128]
  const int32_t* kv_indices; // flat page table
  const int32_t* blocks;     // [total_q, Hkv, topk] logical blocks, ascending, -1 tail
  const int32_t* tok_info;   // [total_q, 2]: first page-table slot of the token's request, visible key limit
  void* out;                 // [total_q, Hq, 128]
  float* lse;                // [total_q, Hq] natural log, or nullptr
  float* part_o;             // [total_q, Hq, splits, 128] (splits > 1)
  float* part_lse;           // [total_q, Hq, splits] base 2 (splits > 1)
  int total_q, hq, hkv, group, topk, splits, blocks_per_split;
  float scale_log2;          // sm_scale * q_scale * k_scale * log2(e)
  float out_scale;           // v_scale * o_scale
};

template <typename T>
struct MmaType;
template <>
struct MmaType<__nv_bfloat16> {
  static __device__ __forceinline__ uint32_t pack(float a, float b) {
    __nv_bfloat162 h = __floats2bfloat162_rn(a, b);
    return *reinterpret_cast<uint32_t*>(&h);
  }
  static __device__ __forceinline__ void mma(float* c, const uint32_t* a, uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
  static __device__ __forceinline__ __nv_bfloat16 from_float(float x) { return __float2bfloat16_rn(x); }
};
template <>
struct MmaType<__half> {
  static __device__ __forceinline__ uint32_t pack(float a, float b) {
    __half2 h = __floats2half2_rn(a, b);
    return *reinterpret_cast<uint32_t*>(&h);
  }
  static __device__ __forceinline__ void mma(float* c, const uint32_t* a, uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
  static __device__ __forceinline__ __half from_float(float x) { return __float2half_rn(x); }
};

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte piece `piece` (0..15) of row `row` in a tile of 256-byte rows: XOR-swizzled so the 8 rows an
// ldmatrix phase reads (same piece, rows r..r+7) hit 8 different 16-byte bank groups.
__device__ __forceinline__ int swz(int row, int piece) { return row * kRowBytes + ((piece ^ (row & 7)) << 4); }

// cp.async 16 bytes; src_bytes = 0 zero-fills without reading global memory.
__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

__device__ __forceinline__ void ldsm_x4(uint32_t addr, uint32_t* r) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}
__device__ __forceinline__ void ldsm_x4_trans(uint32_t addr, uint32_t* r) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}
__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

template <int kStages>
constexpr int smem_bytes() {
  // pipeline (reused for the warp merge: 4 warps x 16 rows x 128 fp32 = 32 KiB) + Q tile + block list
  return (kWarps * kStages * kStageBytes > kWarps * kRows * kHeadDim * 4 ? kWarps * kStages * kStageBytes
                                                                         : kWarps * kRows * kHeadDim * 4) +
         kRows * kRowBytes + 2 * kMaxBlocksPerSplit * 4 + 2 * kWarps * kRows * 4 + 16;
}

template <typename T, int kStages>
__global__ void __launch_bounds__(kThreads, 2) sparse_decode_kernel(const Params p) {
  using M = MmaType<T>;
  extern __shared__ __align__(128) unsigned char smem[];
  unsigned char* pipe = smem;
  constexpr int kPipeBytes = kWarps * kStages * kStageBytes > kWarps * kRows * kHeadDim * 4
                                 ? kWarps * kStages * kStageBytes
                                 : kWarps * kRows * kHeadDim * 4;
  unsigned char* q_tile = smem + kPipeBytes;
  int* page_s = reinterpret_cast<int*>(q_tile + kRows * kRowBytes);
  int* key0_s = page_s + kMaxBlocksPerSplit;
  float* m_s = reinterpret_cast<float*>(key0_s + kMaxBlocksPerSplit);
  float* l_s = m_s + kWarps * kRows;
  unsigned* ballot_s = reinterpret_cast<unsigned*>(l_s + kWarps * kRows);

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const long long cta = blockIdx.x;
  const int split = static_cast<int>(cta % p.splits);
  const long long th = cta / p.splits;
  const int h = static_cast<int>(th % p.hkv);
  const int t = static_cast<int>(th / p.hkv);
  const int page_base = p.tok_info[2 * t];
  const int lim = p.tok_info[2 * t + 1];
  const int j0 = split * p.blocks_per_split;
  const int nj = min(p.topk - j0, p.blocks_per_split);
  const int head0 = h * p.group;

  // Q rows of this (token, KV head): G heads x 256 B, rows >= G zero-filled.
  {
    const unsigned char* qg = static_cast<const unsigned char*>(p.q) + (static_cast<long long>(t) * p.hq + head0) *
                                                                            kRowBytes;
    for (int i = tid; i < kRows * 16; i += kThreads) {
      const int row = i >> 4, piece = i & 15;
      const bool ok = row < p.group;
      cp_async16(smem_addr(q_tile + swz(row, piece)), qg + (ok ? row * kRowBytes + piece * 16 : 0), ok ? 16 : 0);
    }
    cp_async_commit();
  }
  // The split's visible blocks, compacted (valid input is already a prefix; compacting keeps any order safe).
  bool valid = false;
  int page = 0, key0 = 0;
  if (tid < kMaxBlocksPerSplit) {
    if (tid < nj) {
      const int blk = p.blocks[(static_cast<long long>(t) * p.hkv + h) * p.topk + j0 + tid];
      valid = blk >= 0 && static_cast<long long>(blk) * kBlock < lim;
      if (valid) {
        page = p.kv_indices[page_base + blk];
        key0 = blk * kBlock;
      }
    }
    const unsigned b = __ballot_sync(0xffffffffu, valid);
    if (lane == 0) ballot_s[warp] = b;
  }
  __syncthreads();
  if (tid < kMaxBlocksPerSplit && valid) {
    const unsigned below = ballot_s[warp] & ((1u << lane) - 1u);
    const int pos = __popc(below) + (warp == 1 ? __popc(ballot_s[0]) : 0);
    page_s[pos] = page;
    key0_s[pos] = key0;
  }
  const int n_blocks = __popc(ballot_s[0]) + (p.blocks_per_split > 32 ? __popc(ballot_s[1]) : 0);
  cp_async_wait<0>();
  __syncthreads();

  // Q fragments (A operand) for the 8 k-steps of D = 128.
  uint32_t qa[8][4];
  {
    const int mi = lane >> 3, r = (mi & 1) * 8 + (lane & 7);
#pragma unroll
    for (int ks = 0; ks < 8; ++ks) ldsm_x4(smem_addr(q_tile + swz(r, 2 * ks + (mi >> 1))), qa[ks]);
  }

  float o[16][4];
#pragma unroll
  for (int n = 0; n < 16; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.f;
  float m_a = -INFINITY, m_b = -INFINITY, l_a = 0.f, l_b = 0.f;  // rows lane/4 and lane/4 + 8

  const int n_chunks = n_blocks * (kBlock / kChunk);
  const int my_chunks = warp < n_chunks ? (n_chunks - warp + kWarps - 1) / kWarps : 0;
  unsigned char* my_pipe = pipe + warp * kStages * kStageBytes;
  const long long head_stride = static_cast<long long>(kBlock) * kHeadDim;  // elements per (page, head)

  auto chunk_keys = [&](int i, int& visible, long long& offset) {
    const int c = warp + i * kWarps;
    const int slot = c >> 3, sub = c & 7;
    const int first = key0_s[slot] + sub * kChunk;
    visible = min(kChunk, lim - first);
    offset = (static_cast<long long>(page_s[slot]) * p.hkv + h) * head_stride + sub * kChunk * kHeadDim;
  };
  auto issue = [&](int i) {
    if (i < my_chunks) {
      int visible;
      long long offset;
      chunk_keys(i, visible, offset);
      unsigned char* st = my_pipe + (i % kStages) * kStageBytes;
      const unsigned char* kg = static_cast<const unsigned char*>(p.k) + offset * 2;
      const unsigned char* vg = static_cast<const unsigned char*>(p.v) + offset * 2;
#pragma unroll
      for (int it = 0; it < 8; ++it) {
        const int id = lane + it * 32, row = id >> 4, piece = id & 15;
        const bool ok = row < visible;
        const int src = ok ? row * kRowBytes + piece * 16 : 0;
        cp_async16(smem_addr(st + swz(row, piece)), kg + src, ok ? 16 : 0);
        cp_async16(smem_addr(st + kTileBytes + swz(row, piece)), vg + src, ok ? 16 : 0);
      }
    }
    cp_async_commit();
  };

#pragma unroll
  for (int i = 0; i < kStages - 1; ++i) issue(i);
  for (int i = 0; i < my_chunks; ++i) {
    issue(i + kStages - 1);
    cp_async_wait<kStages - 1>();
    __syncwarp();
    int visible;
    long long offset;
    chunk_keys(i, visible, offset);
    if (visible > 0) {
      const unsigned char* st = my_pipe + (i % kStages) * kStageBytes;
      float s[2][4];
#pragma unroll
      for (int n = 0; n < 2; ++n) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.f;
      {
        const int mi = lane >> 3, r = (mi >> 1) * 8 + (lane & 7);
#pragma unroll
        for (int ks = 0; ks < 8; ++ks) {
          uint32_t b[4];
          ldsm_x4(smem_addr(st + swz(r, 2 * ks + (mi & 1))), b);
          M::mma(s[0], qa[ks], b[0], b[1]);
          M::mma(s[1], qa[ks], b[2], b[3]);
        }
      }
      float mx_a = -INFINITY, mx_b = -INFINITY;
#pragma unroll
      for (int n = 0; n < 2; ++n) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int col = n * 8 + 2 * (lane & 3) + (e & 1);
          const float x = col < visible ? s[n][e] * p.scale_log2 : -INFINITY;
          s[n][e] = x;
          if (e < 2) mx_a = fmaxf(mx_a, x); else mx_b = fmaxf(mx_b, x);
        }
      }
      mx_a = quad_max(mx_a);
      mx_b = quad_max(mx_b);
      const float new_a = fmaxf(m_a, mx_a), new_b = fmaxf(m_b, mx_b);  // finite: key 0 of the chunk is visible
      const float alpha_a = exp2f(m_a - new_a), alpha_b = exp2f(m_b - new_b);
      m_a = new_a;
      m_b = new_b;
      float sum_a = 0.f, sum_b = 0.f;
#pragma unroll
      for (int n = 0; n < 2; ++n) {
        s[n][0] = exp2f(s[n][0] - m_a);
        s[n][1] = exp2f(s[n][1] - m_a);
        s[n][2] = exp2f(s[n][2] - m_b);
        s[n][3] = exp2f(s[n][3] - m_b);
        sum_a += s[n][0] + s[n][1];
        sum_b += s[n][2] + s[n][3];
      }
      l_a = l_a * alpha_a + sum_a;
      l_b = l_b * alpha_b + sum_b;
#pragma unroll
      for (int n = 0; n < 16; ++n) {
        o[n][0] *= alpha_a;
        o[n][1] *= alpha_a;
        o[n][2] *= alpha_b;
        o[n][3] *= alpha_b;
      }
      uint32_t pa[4] = {M::pack(s[0][0], s[0][1]), M::pack(s[0][2], s[0][3]), M::pack(s[1][0], s[1][1]),
                        M::pack(s[1][2], s[1][3])};
      {
        const int mi = lane >> 3, r = (mi & 1) * 8 + (lane & 7);
        const unsigned char* vt = st + kTileBytes;
#pragma unroll
        for (int dp = 0; dp < 8; ++dp) {
          uint32_t b[4];
          ldsm_x4_trans(smem_addr(vt + swz(r, 2 * dp + (mi >> 1))), b);
          M::mma(o[2 * dp], pa, b[0], b[1]);
          M::mma(o[2 * dp + 1], pa, b[2], b[3]);
        }
      }
    }
    __syncwarp();
  }
  cp_async_wait<0>();
  l_a = quad_sum(l_a);
  l_b = quad_sum(l_b);

  // Merge the 4 warps' (m, l, O) through shared memory (the pipeline buffers are free now).
  __syncthreads();
  float* o_s = reinterpret_cast<float*>(pipe);  // [warp][16 rows][128]
  {
    const int ra = lane >> 2, rb = ra + 8;
    if ((lane & 3) == 0) {
      m_s[warp * kRows + ra] = m_a;
      m_s[warp * kRows + rb] = m_b;
      l_s[warp * kRows + ra] = l_a;
      l_s[warp * kRows + rb] = l_b;
    }
    float* ow = o_s + warp * kRows * kHeadDim;
#pragma unroll
    for (int n = 0; n < 16; ++n) {
      const int col = n * 8 + 2 * (lane & 3);
      *reinterpret_cast<float2*>(ow + ra * kHeadDim + col) = make_float2(o[n][0], o[n][1]);
      *reinterpret_cast<float2*>(ow + rb * kHeadDim + col) = make_float2(o[n][2], o[n][3]);
    }
  }
  __syncthreads();
  const int row = tid >> 3, col0 = (tid & 7) * 16;
  if (row >= p.group) return;
  float mw[kWarps], m_all = -INFINITY;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) {
    mw[w] = m_s[w * kRows + row];
    m_all = fmaxf(m_all, mw[w]);
  }
  float acc[16];
#pragma unroll
  for (int c = 0; c < 16; ++c) acc[c] = 0.f;
  float l_all = 0.f;
  if (m_all != -INFINITY) {
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
      const float wt = exp2f(mw[w] - m_all);  // 0 for a warp that saw nothing (m = -inf)
      l_all += l_s[w * kRows + row] * wt;
      const float* src = o_s + (w * kRows + row) * kHeadDim + col0;
#pragma unroll
      for (int c = 0; c < 16; c += 4) {
        const float4 x = *reinterpret_cast<const float4*>(src + c);
        acc[c] += x.x * wt;
        acc[c + 1] += x.y * wt;
        acc[c + 2] += x.z * wt;
        acc[c + 3] += x.w * wt;
      }
    }
  }
  const float inv = l_all > 0.f ? 1.f / l_all : 0.f;
  const float lse2 = l_all > 0.f ? m_all + log2f(l_all) : -INFINITY;
  const long long qrow = static_cast<long long>(t) * p.hq + head0 + row;
  if (p.splits == 1) {
    const float f = inv * p.out_scale;
    T* dst = static_cast<T*>(p.out) + qrow * kHeadDim + col0;
    alignas(16) T vals[16];
#pragma unroll
    for (int c = 0; c < 16; ++c) vals[c] = M::from_float(acc[c] * f);
    reinterpret_cast<uint4*>(dst)[0] = reinterpret_cast<const uint4*>(vals)[0];
    reinterpret_cast<uint4*>(dst)[1] = reinterpret_cast<const uint4*>(vals)[1];
    if (p.lse != nullptr && (tid & 7) == 0) p.lse[qrow] = lse2 * kLn2;
  } else {
    float* dst = p.part_o + (qrow * p.splits + split) * kHeadDim + col0;
#pragma unroll
    for (int c = 0; c < 16; c += 4)
      *reinterpret_cast<float4*>(dst + c) = make_float4(acc[c] * inv, acc[c + 1] * inv, acc[c + 2] * inv,
                                                        acc[c + 3] * inv);
    if ((tid & 7) == 0) p.part_lse[qrow * p.splits + split] = lse2;
  }
}

// One warp per (token, query head): merge the splits' normalised partials by their base-2 LSE.
template <typename T>
__global__ void __launch_bounds__(128) sparse_decode_combine_kernel(const Params p) {
  using M = MmaType<T>;
  const long long qrow = static_cast<long long>(blockIdx.x) * 4 + (threadIdx.x >> 5);
  const int lane = threadIdx.x & 31;
  if (qrow >= static_cast<long long>(p.total_q) * p.hq) return;
  const float* lse_in = p.part_lse + qrow * p.splits;
  float m = -INFINITY;
  for (int s = 0; s < p.splits; ++s) m = fmaxf(m, lse_in[s]);
  float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
  float total = 0.f;
  if (m != -INFINITY) {
    for (int s = 0; s < p.splits; ++s) {
      const float w = exp2f(lse_in[s] - m);
      if (w == 0.f) continue;  // an empty split's partial O is never read
      total += w;
      const float4 x = reinterpret_cast<const float4*>(p.part_o + (qrow * p.splits + s) * kHeadDim)[lane];
      acc.x += w * x.x;
      acc.y += w * x.y;
      acc.z += w * x.z;
      acc.w += w * x.w;
    }
  }
  const float f = total > 0.f ? p.out_scale / total : 0.f;
  alignas(8) T vals[4] = {M::from_float(acc.x * f), M::from_float(acc.y * f), M::from_float(acc.z * f),
                          M::from_float(acc.w * f)};
  reinterpret_cast<uint2*>(static_cast<T*>(p.out) + qrow * kHeadDim)[lane] = *reinterpret_cast<const uint2*>(vals);
  if (p.lse != nullptr && lane == 0) p.lse[qrow] = total > 0.f ? (m + log2f(total)) * kLn2 : -INFINITY;
}

}  // namespace msa_sparse_decode
