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
//
// fp8 e4m3 K/V (kKv = kKvFp8: Q bf16 / fp16; kKvFp8Q: Q fp8 too, output bf16): the chunks stream at half the bytes
// (128-byte rows) and are converted to f16 in registers right before each MMA (cvt e4m3x2 -> f16x2: exact), so the
// MMAs run in f16 (Q converted once per CTA: exact for fp8 Q and for bf16 magnitudes in f16's normal range, P in f16
// carries 3 more mantissa bits than bf16). No ldmatrix (it moves 16-bit elements): each lane loads its fragment
// bytes directly, which needs the fragments' k and n orders permuted -- free, since QK^T sums over the head dim
// and PV's output dims are un-permuted at the warp merge:
//   QK^T k-step ks = 4g + j: lane (r = lane / 4, q = lane % 4) holds head dims d0 = 64g + 16q + 4j .. d0 + 3 of
//     K row (key) r and Q rows r, r + 8 (the fragment's k columns 2q, 2q+1 -> d0, d0+1 and 2q+8, 2q+9 -> d0+2,
//     d0+3): one 16-byte load per (key row, g) serves four k-steps;
//   PV n-tile t = 4u + w: fragment column r is output dim 32u + 4r + w, so a lane's four n-tiles of one u read
//     one 4-byte word (dims 32u + 4r .. +3) from each of its fragment's four V rows (keys 2q, 2q+1, 2q+8, 2q+9),
//     then byte permutes build the four (b0, b1) pairs.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include <type_traits>

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
// K/V (and Q) element formats of a kernel instance.
constexpr int kKv16 = 0;     // Q, K, V in T (bf16 / fp16)
constexpr int kKvFp8 = 1;    // Q in T, K / V fp8 e4m3
constexpr int kKvFp8Q = 2;   // Q, K, V fp8 e4m3; output T = bf16
constexpr int kRowBytes8 = kHeadDim;               // 128 B per fp8 key / query row
constexpr int kTileBytes8 = kChunk * kRowBytes8;   // 2 KiB: 16 rows of fp8 K (or V)

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
  const float* row_scale;    // nullptr, or [Hq, 2] per query head: (scale_log2, out_scale) -- per-head scales
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

// 16-byte piece `piece` of row `row` in a tile of kRowB-byte rows (256: 16-bit rows, 128: fp8 rows): XOR-swizzled
// so the 8 rows an ldmatrix phase or an fp8 fragment load reads (same piece, rows r..r+7) hit 8 different 16-byte
// bank groups.
template <int kRowB = kRowBytes>
__device__ __forceinline__ int swz(int row, int piece) { return row * kRowB + ((piece ^ (row & 7)) << 4); }
__device__ __forceinline__ int swz8(int row, int piece) { return swz<kRowBytes8>(row, piece); }

// Two e4m3 bytes (low byte = first element) -> f16x2 (exact).
__device__ __forceinline__ uint32_t e4m3x2_to_f16x2(uint32_t two_bytes) {
  const __half2_raw h = __nv_cvt_fp8x2_to_halfraw2(static_cast<__nv_fp8x2_storage_t>(two_bytes & 0xffffu), __NV_E4M3);
  return static_cast<uint32_t>(h.x) | (static_cast<uint32_t>(h.y) << 16);
}
// Two 16-bit T values -> f16x2 (identity for fp16; bf16 rounds to f16).
template <typename T>
__device__ __forceinline__ uint32_t to_f16x2(uint32_t w);
template <>
__device__ __forceinline__ uint32_t to_f16x2<__half>(uint32_t w) { return w; }
template <>
__device__ __forceinline__ uint32_t to_f16x2<__nv_bfloat16>(uint32_t w) {
  const __nv_bfloat162 b = *reinterpret_cast<const __nv_bfloat162*>(&w);
  const __half2 h = __float22half2_rn(__bfloat1622float2(b));
  return *reinterpret_cast<const uint32_t*>(&h);
}

// cp.async 16 bytes; src_bytes = 0 zero-fills without reading global memory.
__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

// Async copy of kRows_ rows of kRowB bytes (16-byte pieces, swizzled as swz) from each src[t] into tile t at
// dst + t * kRows_ * kRowB (K and V of a chunk: their pieces interleaved), the pieces spread over kThreads_ threads
// starting at `first`; rows >= `valid` are zero-filled without a global read.
template <int kRowB, int kRows_, int kThreads_, int kTiles>
__device__ __forceinline__ void copy_rows_async(unsigned char* dst, const unsigned char* const (&src)[kTiles],
                                                int valid, int first) {
  constexpr int kPieces = kRowB / 16;
  static_assert(kRows_ * kPieces % kThreads_ == 0, "every thread copies the same number of pieces");
#pragma unroll
  for (int it = 0; it < kRows_ * kPieces / kThreads_; ++it) {
    const int id = first + it * kThreads_, row = id / kPieces, piece = id % kPieces;
    const bool ok = row < valid;
    const int off = ok ? row * kRowB + piece * 16 : 0;
#pragma unroll
    for (int t = 0; t < kTiles; ++t)
      cp_async16(smem_addr(dst + t * kRows_ * kRowB + swz<kRowB>(row, piece)), src[t] + off, ok ? 16 : 0);
  }
}

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

template <typename T, int kStages, int kKv>
__global__ void __launch_bounds__(kThreads, 2) sparse_decode_kernel(const Params p) {
  constexpr bool kFp8 = kKv != kKv16;
  using M = MmaType<typename std::conditional<kFp8, __half, T>::type>;  // the MMA / P type
  using Out = MmaType<T>;
  constexpr int kElemBytes = kFp8 ? 1 : 2;  // K / V bytes per element
  // fp8 chunks are half the bytes and use half of each stage slot. Doubling their depth in the same buffer was
  // measured no faster (H200, session 10 runs 3-4, batch 32 / 64 / 128 q_len 1 at 128K: 28.6 / 41.5 / 79.7 us at
  // this depth, 29.0 / 44.4 / 84.2 doubled): the fp8 step is bound by its per-warp instruction chain, not by bytes
  // in flight.
  constexpr int kDepth = kStages;
  constexpr int kSlotBytes = kStageBytes;
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

  // Q rows of this (token, KV head): G heads x 256 B (fp8 Q: 128 B), rows >= G zero-filled.
  {
    constexpr int kQRowBytes = kKv == kKvFp8Q ? kRowBytes8 : kRowBytes;
    const unsigned char* const qg[1] = {static_cast<const unsigned char*>(p.q) +
                                         (static_cast<long long>(t) * p.hq + head0) * kQRowBytes};
    copy_rows_async<kQRowBytes, kRows, kThreads>(q_tile, qg, p.group, tid);
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

  // Q fragments (A operand) for the 8 k-steps of D = 128 (fp8 K/V: f16, in the permuted k order of the header).
  uint32_t qa[8][4];
  if constexpr (!kFp8) {
    const int mi = lane >> 3, r = (mi & 1) * 8 + (lane & 7);
#pragma unroll
    for (int ks = 0; ks < 8; ++ks) ldsm_x4(smem_addr(q_tile + swz(r, 2 * ks + (mi >> 1))), qa[ks]);
  } else {
    const int r = lane >> 2, q4 = lane & 3;
#pragma unroll
    for (int g = 0; g < 2; ++g) {
#pragma unroll
      for (int half = 0; half < 2; ++half) {  // query rows r and r + 8: fragment registers 0 / 2 and 1 / 3
        const int row = r + 8 * half;
        uint32_t w[8];  // head dims 64g + 16q .. +15 as f16 pairs
        if constexpr (kKv == kKvFp8Q) {
          const uint4 x = *reinterpret_cast<const uint4*>(q_tile + swz8(row, 4 * g + q4));
          const uint32_t b[4] = {x.x, x.y, x.z, x.w};
#pragma unroll
          for (int j = 0; j < 4; ++j) {
            w[2 * j] = e4m3x2_to_f16x2(b[j]);
            w[2 * j + 1] = e4m3x2_to_f16x2(b[j] >> 16);
          }
        } else {
          const uint4 x0 = *reinterpret_cast<const uint4*>(q_tile + swz(row, 8 * g + 2 * q4));
          const uint4 x1 = *reinterpret_cast<const uint4*>(q_tile + swz(row, 8 * g + 2 * q4 + 1));
          const uint32_t b[8] = {x0.x, x0.y, x0.z, x0.w, x1.x, x1.y, x1.z, x1.w};
#pragma unroll
          for (int i = 0; i < 8; ++i) w[i] = to_f16x2<T>(b[i]);
        }
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          qa[4 * g + j][half] = w[2 * j];          // dims d0, d0 + 1
          qa[4 * g + j][2 + half] = w[2 * j + 1];  // dims d0 + 2, d0 + 3
        }
      }
    }
  }

  float o[16][4];
#pragma unroll
  for (int n = 0; n < 16; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.f;
  float m_a = -INFINITY, m_b = -INFINITY, l_a = 0.f, l_b = 0.f;  // rows lane/4 and lane/4 + 8
  float sc_a = p.scale_log2, sc_b = p.scale_log2;                // their logit scales (log2 units)
  if (p.row_scale != nullptr) {
    const int ra = lane >> 2, rb = ra + 8;
    if (ra < p.group) sc_a = p.row_scale[2 * (head0 + ra)];
    if (rb < p.group) sc_b = p.row_scale[2 * (head0 + rb)];
  }

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
      unsigned char* st = my_pipe + (i % kDepth) * kSlotBytes;
      const unsigned char* kg = static_cast<const unsigned char*>(p.k) + offset * kElemBytes;
      const unsigned char* vg = static_cast<const unsigned char*>(p.v) + offset * kElemBytes;
      const unsigned char* const kv[2] = {kg, vg};
      copy_rows_async<kFp8 ? kRowBytes8 : kRowBytes, kChunk, 32>(st, kv, visible, lane);  // K tile, then V tile
    }
    cp_async_commit();
  };

#pragma unroll
  for (int i = 0; i < kDepth - 1; ++i) issue(i);
  for (int i = 0; i < my_chunks; ++i) {
    issue(i + kDepth - 1);
    cp_async_wait<kDepth - 1>();
    __syncwarp();
    int visible;
    long long offset;
    chunk_keys(i, visible, offset);
    if (visible > 0) {
      const unsigned char* st = my_pipe + (i % kDepth) * kSlotBytes;
      float s[2][4];
#pragma unroll
      for (int n = 0; n < 2; ++n) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.f;
      if constexpr (!kFp8) {
        const int mi = lane >> 3, r = (mi >> 1) * 8 + (lane & 7);
#pragma unroll
        for (int ks = 0; ks < 8; ++ks) {
          uint32_t b[4];
          ldsm_x4(smem_addr(st + swz(r, 2 * ks + (mi & 1))), b);
          M::mma(s[0], qa[ks], b[0], b[1]);
          M::mma(s[1], qa[ks], b[2], b[3]);
        }
      } else {
        const int r = lane >> 2, q4 = lane & 3;
#pragma unroll
        for (int nt = 0; nt < 2; ++nt) {  // keys nt * 8 + r
#pragma unroll
          for (int g = 0; g < 2; ++g) {
            const uint4 x = *reinterpret_cast<const uint4*>(st + swz8(nt * 8 + r, 4 * g + q4));
            const uint32_t b[4] = {x.x, x.y, x.z, x.w};
#pragma unroll
            for (int j = 0; j < 4; ++j)
              M::mma(s[nt], qa[4 * g + j], e4m3x2_to_f16x2(b[j]), e4m3x2_to_f16x2(b[j] >> 16));
          }
        }
      }
      float mx_a = -INFINITY, mx_b = -INFINITY;
#pragma unroll
      for (int n = 0; n < 2; ++n) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int col = n * 8 + 2 * (lane & 3) + (e & 1);
          const float x = col < visible ? s[n][e] * (e < 2 ? sc_a : sc_b) : -INFINITY;
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
      if constexpr (!kFp8) {
        const int mi = lane >> 3, r = (mi & 1) * 8 + (lane & 7);
        const unsigned char* vt = st + kTileBytes;
#pragma unroll
        for (int dp = 0; dp < 8; ++dp) {
          uint32_t b[4];
          ldsm_x4_trans(smem_addr(vt + swz(r, 2 * dp + (mi >> 1))), b);
          M::mma(o[2 * dp], pa, b[0], b[1]);
          M::mma(o[2 * dp + 1], pa, b[2], b[3]);
        }
      } else {
        const int r = lane >> 2, q4 = lane & 3;
        const unsigned char* vt = st + kTileBytes8;
        const int within = (r & 3) * 4;
#pragma unroll
        for (int u = 0; u < 4; ++u) {  // output dims 32u .. 32u + 31: n-tiles 4u .. 4u + 3
          const int piece = 2 * u + (r >> 2);
          const uint32_t a = *reinterpret_cast<const uint32_t*>(vt + swz8(2 * q4, piece) + within);
          const uint32_t b = *reinterpret_cast<const uint32_t*>(vt + swz8(2 * q4 + 1, piece) + within);
          const uint32_t c = *reinterpret_cast<const uint32_t*>(vt + swz8(2 * q4 + 8, piece) + within);
          const uint32_t d = *reinterpret_cast<const uint32_t*>(vt + swz8(2 * q4 + 9, piece) + within);
          const uint32_t ab_lo = __byte_perm(a, b, 0x5140), ab_hi = __byte_perm(a, b, 0x7362);  // (a_w, b_w) pairs
          const uint32_t cd_lo = __byte_perm(c, d, 0x5140), cd_hi = __byte_perm(c, d, 0x7362);
          M::mma(o[4 * u + 0], pa, e4m3x2_to_f16x2(ab_lo), e4m3x2_to_f16x2(cd_lo));
          M::mma(o[4 * u + 1], pa, e4m3x2_to_f16x2(ab_lo >> 16), e4m3x2_to_f16x2(cd_lo >> 16));
          M::mma(o[4 * u + 2], pa, e4m3x2_to_f16x2(ab_hi), e4m3x2_to_f16x2(cd_hi));
          M::mma(o[4 * u + 3], pa, e4m3x2_to_f16x2(ab_hi >> 16), e4m3x2_to_f16x2(cd_hi >> 16));
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
      if constexpr (!kFp8) {
        const int col = n * 8 + 2 * (lane & 3);
        *reinterpret_cast<float2*>(ow + ra * kHeadDim + col) = make_float2(o[n][0], o[n][1]);
        *reinterpret_cast<float2*>(ow + rb * kHeadDim + col) = make_float2(o[n][2], o[n][3]);
      } else {  // n-tile n = 4u + w, fragment column c -> output dim 32u + 4c + w
        const int col = (n >> 2) * 32 + 8 * (lane & 3) + (n & 3);
        ow[ra * kHeadDim + col] = o[n][0];
        ow[ra * kHeadDim + col + 4] = o[n][1];
        ow[rb * kHeadDim + col] = o[n][2];
        ow[rb * kHeadDim + col + 4] = o[n][3];
      }
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
    const float f = inv * (p.row_scale != nullptr ? p.row_scale[2 * (head0 + row) + 1] : p.out_scale);
    T* dst = static_cast<T*>(p.out) + qrow * kHeadDim + col0;
    alignas(16) T vals[16];
#pragma unroll
    for (int c = 0; c < 16; ++c) vals[c] = Out::from_float(acc[c] * f);
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
  const float out_scale = p.row_scale != nullptr ? p.row_scale[2 * (qrow % p.hq) + 1] : p.out_scale;
  const float f = total > 0.f ? out_scale / total : 0.f;
  alignas(8) T vals[4] = {M::from_float(acc.x * f), M::from_float(acc.y * f), M::from_float(acc.z * f),
                          M::from_float(acc.w * f)};
  reinterpret_cast<uint2*>(static_cast<T*>(p.out) + qrow * kHeadDim)[lane] = *reinterpret_cast<const uint2*>(vals);
  if (p.lse != nullptr && lane == 0) p.lse[qrow] = total > 0.f ? (m + log2f(total)) * kLn2 : -INFINITY;
}

}  // namespace msa_sparse_decode
