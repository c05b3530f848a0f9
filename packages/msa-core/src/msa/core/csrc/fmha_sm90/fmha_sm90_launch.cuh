// Host side of the SM90 FMHA forward: TMA descriptors from raw pointers/strides, then one persistent launch.
// No allocation and no synchronisation: everything the kernel reads is passed in (work list from the plan).
#pragma once

#include <cstdint>
#include <cstdio>

#include <cuda_runtime.h>

#include "fmha_sm90_kernel.cuh"

namespace msa_fmha_sm90 {

// Strides are in elements; the last (head-dim) stride of every tensor is 1.
struct FwdArgs {
  void const* q;
  int64_t q_stride_token, q_stride_head;
  int total_q, num_q_heads;
  void const* k;
  void const* v;
  // ragged: [total_kv, Hkv, D] strides (token, head); paged: [pages, Hkv, page_size, D] (page, head, slot)
  int64_t k_stride_0, k_stride_1, k_stride_2;
  int64_t v_stride_0, v_stride_1, v_stride_2;
  int kv_dim0;  // total_kv (ragged) or number of pages (paged)
  int page_size;  // paged: slots per page (a power of two in [16, 256]); ragged: unused
  int num_kv_heads;
  void* out;
  int64_t out_stride_token, out_stride_head;
  float* lse;  // nullptr: not written
  int64_t lse_stride_token;
  WorkItem const* work;
  int num_work;
  int* work_counter;  // one int32 of workspace; zeroed here (stream-ordered) before the launch
  int const* kv_indices;
  int num_ctas;
  float sm_scale;
  float out_scale;
  // Split-KV: pieces write partial O / LSE; the combine kernel (launched right after, same stream) merges them.
  CombineItem const* combine;
  int num_combine;
  float* partial_o;
  float* partial_lse;
  // max_score [Hq, max_k_tiles, total_q] fp32 (max-score modes only)
  float* max_score;
  int max_k_tiles;
  // FP8: the transposed V workspace [Hkv, D, vt_len] (written here by the pre-pass), its tile map (int2 per
  // 128-token tile: first source token, valid tokens) and the per-query-head scales (float2 [Hq]).
  void* vt;
  int64_t vt_len;
  int2 const* vt_tiles;
  int num_vt_tiles;
  float2 const* head_scales;
  // Sparse-Q (kModeSparseQ): the union builder's device tensors (see Params) and its plan-time sizes.
  int const* sq_union;
  int const* sq_union_phys;
  int const* sq_union_len;
  int const* sq_mask;
  int const* sq_order;
  int sq_umax;
  int sq_mask_words;
  int const* sq_pair_items;  // pairs: [sq_num_pairs, 2]
  int sq_num_pairs;
};

// Sparse-Q pairs: the launch attribute of their 2-CTA clusters.
inline cudaLaunchAttribute pair_cluster_attr() {
  cudaLaunchAttribute a{};
  a.id = cudaLaunchAttributeClusterDimension;
  a.val.clusterDim.x = 2;
  a.val.clusterDim.y = 1;
  a.val.clusterDim.z = 1;
  return a;
}

// Sparse-Q pairs: how many 2-CTA clusters of this kernel are resident at once on the current device (66 on a
// 132-SM H200), asked once per module and device.
template <class T>
int max_pair_clusters() {
  static int cached[64] = {};
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= 64) { return 0; }
  if (cached[dev] > 0) { return cached[dev]; }
  auto kernel = fmha_sm90_kernel<T>;
  if (cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, T::kSmemBytes) != cudaSuccess) {
    return 0;
  }
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(2);
  cfg.blockDim = dim3(T::kNumThreads);
  cfg.dynamicSmemBytes = T::kSmemBytes;
  cudaLaunchAttribute attr[1] = {pair_cluster_attr()};
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  int n = 0;
  if (cudaOccupancyMaxActiveClusters(&n, kernel, &cfg) != cudaSuccess) { return 0; }
  cached[dev] = n;
  return n;
}

template <class T>
cudaError_t launch_fwd(FwdArgs const& a, cudaStream_t stream) {
  using Element = typename T::Element;
  constexpr int kD = T::kHeadDim, kDV = T::kHeadDimV;
  if (a.num_work == 0) { return cudaSuccess; }
  // CTA c starts on item c; pairs: cluster c (CTAs 2c, 2c + 1) on pair c, at most as many clusters as fit at once
  // (their static round robin assumes every cluster is resident).
  int num_ctas = a.num_ctas < a.num_work ? a.num_ctas : a.num_work;
  if constexpr (T::kPair) {
    if (a.sq_num_pairs == 0) { return cudaSuccess; }
    int clusters = a.num_ctas / 2 < a.sq_num_pairs ? a.num_ctas / 2 : a.sq_num_pairs;
    int const fit = max_pair_clusters<T>();
    if (fit <= 0) { return cudaErrorInvalidConfiguration; }
    clusters = clusters < fit ? clusters : fit;
    num_ctas = 2 * (clusters > 0 ? clusters : 1);
  }

  auto gQ = make_tensor(make_gmem_ptr(static_cast<Element const*>(a.q)),
                        make_shape(int32_t(a.total_q), int32_t(kD), int32_t(a.num_q_heads)),
                        make_stride(a.q_stride_token, _1{}, a.q_stride_head));
  auto tma_q = make_tma_copy(SM90_TMA_LOAD{}, gQ, typename T::SmemLayoutQ{});

  typename T::ShapeK shape_k, shape_vt;
  auto make_kv = [&](auto& tma_k, auto& tma_v) {
    if constexpr (T::kPaged) {
      // Unused by the kernel (it reads pages through tma_k_page / tma_v_page, below); encoded over one tile-sized
      // view so that the parameter block stays well formed for every page size.
      shape_k = make_shape(int32_t(T::kBlockN), int32_t(kD), int32_t(1), int32_t(1));
      shape_vt = make_shape(int32_t(kDV), int32_t(T::kBlockN), int32_t(1), int32_t(1));
      int64_t const tile = int64_t(T::kBlockN) * kD, tile_v = int64_t(T::kBlockN) * kDV;
      auto gK = make_tensor(make_gmem_ptr(static_cast<Element const*>(a.k)), shape_k,
                            make_stride(int64_t(kD), _1{}, tile, tile));
      auto gVt = make_tensor(make_gmem_ptr(static_cast<Element const*>(a.v)), shape_vt,
                             make_stride(_1{}, int64_t(kDV), tile_v, tile_v));
      tma_k = make_tma_copy(typename T::TmaKVOp{}, gK, take<0, 2>(typename T::SmemLayoutK{}));
      tma_v = make_tma_copy(typename T::TmaKVOp{}, gVt, typename T::SmemLayoutVtTma{});
    } else if constexpr (T::kFp8 && !T::kOutputO) {
      // fp8 score-only (the index pass): no V. tma_v is encoded over one tile-sized view of k so that the parameter
      // block stays well formed; the kernel never issues it.
      shape_k = make_shape(int32_t(a.kv_dim0), int32_t(kD), int32_t(a.num_kv_heads));
      shape_vt = make_shape(int32_t(kD), int32_t(T::kBlockN), int32_t(1));
      auto gK = make_tensor(make_gmem_ptr(static_cast<Element const*>(a.k)), shape_k,
                            make_stride(a.k_stride_0, _1{}, a.k_stride_1));
      auto gVt = make_tensor(make_gmem_ptr(static_cast<Element const*>(a.k)), shape_vt,
                             make_stride(int64_t(T::kBlockN), _1{}, int64_t(kD) * T::kBlockN));
      tma_k = make_tma_copy(typename T::TmaKVOp{}, gK, take<0, 2>(typename T::SmemLayoutK{}));
      tma_v = make_tma_copy(typename T::TmaKVOp{}, gVt, typename T::SmemLayoutVtTma{});
    } else if constexpr (T::kFp8) {
      shape_k = make_shape(int32_t(a.kv_dim0), int32_t(kD), int32_t(a.num_kv_heads));
      shape_vt = make_shape(int32_t(kD), int32_t(a.vt_len), int32_t(a.num_kv_heads));
      auto gK = make_tensor(make_gmem_ptr(static_cast<Element const*>(a.k)), shape_k,
                            make_stride(a.k_stride_0, _1{}, a.k_stride_1));
      auto gVt = make_tensor(make_gmem_ptr(static_cast<Element const*>(a.vt)), shape_vt,
                             make_stride(a.vt_len, _1{}, int64_t(kD) * a.vt_len));
      tma_k = make_tma_copy(typename T::TmaKVOp{}, gK, take<0, 2>(typename T::SmemLayoutK{}));
      tma_v = make_tma_copy(typename T::TmaKVOp{}, gVt, typename T::SmemLayoutVtTma{});
    } else {
      shape_k = make_shape(int32_t(a.kv_dim0), int32_t(kD), int32_t(a.num_kv_heads));
      shape_vt = make_shape(int32_t(kDV), int32_t(a.kv_dim0), int32_t(a.num_kv_heads));
      auto gK = make_tensor(make_gmem_ptr(static_cast<Element const*>(a.k)), shape_k,
                            make_stride(a.k_stride_0, _1{}, a.k_stride_1));
      auto gVt = make_tensor(make_gmem_ptr(static_cast<Element const*>(a.v)), shape_vt,
                             make_stride(_1{}, a.v_stride_0, a.v_stride_1));
      tma_k = make_tma_copy(typename T::TmaKVOp{}, gK, take<0, 2>(typename T::SmemLayoutK{}));
      tma_v = make_tma_copy(typename T::TmaKVOp{}, gVt, typename T::SmemLayoutVtTma{});
    }
  };
  typename T::TmaK tma_k;
  typename T::TmaV tma_v;
  make_kv(tma_k, tma_v);

  typename T::Params params{
      tma_q,
      tma_k,
      tma_v,
      make_shape(int32_t(a.total_q), int32_t(kD), int32_t(a.num_q_heads)),
      shape_k,
      shape_vt,
      static_cast<typename T::ElementOut*>(a.out),
      a.out_stride_token,
      a.out_stride_head,
      a.lse,
      a.lse_stride_token,
      a.work,
      a.num_work,
      a.work_counter,
      a.kv_indices,
      a.num_q_heads / a.num_kv_heads,
      float(double(a.sm_scale) * 1.4426950408889634),
      a.sm_scale,
      a.out_scale,
      a.partial_o,
      a.partial_lse,
      a.max_score,
      int64_t(a.max_k_tiles) * a.total_q,
      int64_t(a.total_q),
      a.max_k_tiles,
      a.head_scales,
      cute::TmaDescriptor{},  // sparse-Q fields: filled below for that mode
      nullptr,
      nullptr,
      nullptr,
      nullptr,
      nullptr,
      0,
      0,
      0,
      nullptr,
      0,
      cute::TmaDescriptor{},  // paged fields: filled below for paged K/V
      cute::TmaDescriptor{},
      0,
      0,
      0,
      0,
      0,
      0,
  };
  if constexpr (T::kSparseQ) {
    // q viewed as (D, total_q, Hq) -- token and head strides in bytes -- read in (128 bytes of dims, T, G) boxes: one
    // box = the item's 128 packed rows x 64 (16-bit) or 128 (fp8) dims, 128-byte swizzled like the dense Q tile.
    int const group = a.num_q_heads / a.num_kv_heads;
    int const tpt = T::kBlockM / group;
    uint64_t dims[3] = {uint64_t(kD), uint64_t(a.total_q), uint64_t(a.num_q_heads)};
    uint64_t strides[2] = {uint64_t(a.q_stride_token) * sizeof(Element), uint64_t(a.q_stride_head) * sizeof(Element)};
    uint32_t box[3] = {uint32_t(128 / sizeof(Element)), uint32_t(tpt), uint32_t(group)};
    uint32_t elem_strides[3] = {1u, 1u, 1u};
    CUresult res = CUTLASS_CUDA_DRIVER_WRAPPER_CALL(cuTensorMapEncodeTiled)(
        &params.tma_q_packed, TMA::to_CUtensorMapDataType<Element>(), 3, const_cast<void*>(a.q), dims, strides, box,
        elem_strides, CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_128B,
        CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
    if (res != CUDA_SUCCESS) { return cudaErrorInvalidValue; }
    params.sq_union = a.sq_union;
    params.sq_union_phys = a.sq_union_phys;
    params.sq_union_len = a.sq_union_len;
    params.sq_mask = a.sq_mask;
    params.sq_order = a.sq_order;
    params.sq_tokens_per_tile = tpt;
    params.sq_umax = a.sq_umax;
    params.sq_mask_words = a.sq_mask_words;
    params.sq_pair_items = a.sq_pair_items;
    params.sq_num_pairs = a.sq_num_pairs;
  }

  if constexpr (T::kPaged) {
    // k / v [pages, Hkv, P, D] viewed as (D, P, Hkv, pages); boxes of (64 dims, min(P, kBlockN) slots), 128-byte
    // swizzled like the tiles they land in.
    int const ps = a.page_size;
    if (ps < 16 || ps > 256 || (ps & (ps - 1)) != 0) { return cudaErrorInvalidValue; }
    int const rows = ps < T::kBlockN ? ps : T::kBlockN;
    auto encode = [&](cute::TmaDescriptor* desc, void const* base, int dim, int64_t s0, int64_t s1, int64_t s2) {
      uint64_t dims[4] = {uint64_t(dim), uint64_t(ps), uint64_t(a.num_kv_heads), uint64_t(a.kv_dim0)};
      uint64_t strides[3] = {uint64_t(s2) * sizeof(Element), uint64_t(s1) * sizeof(Element),
                             uint64_t(s0) * sizeof(Element)};
      uint32_t box[4] = {64u, uint32_t(rows), 1u, 1u};
      uint32_t elem_strides[4] = {1u, 1u, 1u, 1u};
      return CUTLASS_CUDA_DRIVER_WRAPPER_CALL(cuTensorMapEncodeTiled)(
          desc, TMA::to_CUtensorMapDataType<Element>(), 4, const_cast<void*>(base), dims, strides, box, elem_strides,
          CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_128B,
          CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
    };
    if (encode(&params.tma_k_page, a.k, kD, a.k_stride_0, a.k_stride_1, a.k_stride_2) != CUDA_SUCCESS ||
        encode(&params.tma_v_page, a.v, kDV, a.v_stride_0, a.v_stride_1, a.v_stride_2) != CUDA_SUCCESS) {
      return cudaErrorInvalidValue;
    }
    params.page_size = ps;
    params.page_rows = rows;
    params.page_subs = T::kBlockN / rows;
    params.tiles_per_page = ps > T::kBlockN ? ps / T::kBlockN : 1;
    params.page_shift = __builtin_ctz(unsigned(ps));
    params.tiles_per_page_shift = __builtin_ctz(unsigned(params.tiles_per_page));
  }

  auto kernel = fmha_sm90_kernel<T>;
  cudaError_t err = cudaSuccess;
  if constexpr (!T::kPair) {  // pairs take a static schedule: no counter, so no memset on the stream
    err = cudaMemsetAsync(a.work_counter, 0, sizeof(int), stream);
    if (err != cudaSuccess) { return err; }
  }
  if constexpr (T::kFp8 && T::kOutputO) {  // V -> the transposed, key-permuted copy the PV GEMM reads (same stream, first)
    typename T::VtParams vp{static_cast<uint8_t const*>(a.v), a.v_stride_0, a.v_stride_1,
                            static_cast<uint8_t*>(a.vt), a.vt_len, a.vt_tiles};
    fmha_sm90_vt_kernel<T><<<dim3(a.num_vt_tiles, a.num_kv_heads), dim3(256), 0, stream>>>(vp);
    err = cudaGetLastError();
    if (err != cudaSuccess) { return err; }
  }
  err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, T::kSmemBytes);
  if (err != cudaSuccess) { return err; }
  if constexpr ((T::kFp8 && T::kOutputO) || T::kPair) {
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = dim3(num_ctas);
    cfg.blockDim = dim3(T::kNumThreads);
    cfg.dynamicSmemBytes = T::kSmemBytes;
    cfg.stream = stream;
    cudaLaunchAttribute attr[2];
    unsigned n_attr = 0;
    if constexpr (T::kFp8 && T::kOutputO) {
      // After the V^T pre-pass: programmatic dependent launch, so this grid's CTAs start (Q / K loads, the first
      // QK^T and softmax) while the pre-pass drains; the producer waits for the pre-pass grid before its first V^T
      // load. H200, session 13 run 6: B2 H32 S8K fp8 causal 1.495 -> 1.500x our bf16 (two runs: 1.499 -> 1.504).
      attr[n_attr].id = cudaLaunchAttributeProgrammaticStreamSerialization;
      attr[n_attr++].val.programmaticStreamSerializationAllowed = 1;
    }
    if constexpr (T::kPair) { attr[n_attr++] = pair_cluster_attr(); }  // sparse-Q pairs: 2-CTA clusters
    cfg.attrs = attr;
    cfg.numAttrs = n_attr;
    err = cudaLaunchKernelEx(&cfg, kernel, params);
  } else {
    kernel<<<dim3(num_ctas), dim3(T::kNumThreads), T::kSmemBytes, stream>>>(params);
    err = cudaGetLastError();
  }
  if (err != cudaSuccess || a.num_combine == 0 || !T::kOutputO) { return err; }
  typename T::CombineParams cp{a.combine,          a.partial_o,        a.partial_lse,
                               static_cast<typename T::ElementOut*>(a.out),
                               a.out_stride_token, a.out_stride_head, a.lse,
                               a.lse_stride_token, a.out_scale,       a.head_scales};
  fmha_sm90_combine_kernel<T><<<dim3(a.num_combine, T::kBlockM / kCombineRows), dim3(128), 0, stream>>>(cp);
  return cudaGetLastError();
}

}  // namespace msa_fmha_sm90
