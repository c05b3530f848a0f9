// SM90 (Hopper, sm_90a) dense FMHA forward, FlashAttention-3 style:
//   * one producer warp issues TMA loads (Q once per tile; K and V through a kStages mbarrier pipeline),
//   * two consumer warpgroups each own 64 rows of the 128-row query tile and run wgmma:
//     S = Q K^T (both operands in shared memory), O += P V (P from registers, V^T read MN-major),
//   * intra-warpgroup overlap: the QK^T of tile n and the PV of tile n+1 are in flight while the softmax of
//     tile n runs; the two warpgroups take turns issuing (named-barrier ping-pong) so one's softmax hides
//     under the other's GEMMs,
//   * online softmax in fp32 with exp2 and the log2(e)-folded scale,
//   * persistent CTAs take items of a host-sorted (longest first) work list dynamically: CTA c starts with item
//     c, then the producer warp fetches the next index from a global counter and hands it to the consumers.
// KV tiles are visited from the last visible one down to 0, so the masked tiles (causal diagonal, the ragged
// end of the keys) come first and the rest run unmasked.
#pragma once

#include <cstdint>

#include <cutlass/arch/barrier.h>
#include <cutlass/arch/reg_reconfig.h>
#include <cutlass/array.h>
#include <cutlass/numeric_conversion.h>
#include <cute/arch/cluster_sm90.hpp>
#include <cute/arch/mma_sm90_gmma.hpp>

#include "fmha_sm90_traits.cuh"

namespace msa_fmha_sm90 {

// ------------------------------------------------------------------------------------------------------------
// Small device helpers
// ------------------------------------------------------------------------------------------------------------

__device__ __forceinline__ void named_barrier_sync(uint32_t id, uint32_t num_threads) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(num_threads) : "memory");
}

__device__ __forceinline__ void named_barrier_arrive(uint32_t id, uint32_t num_threads) {
  asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "r"(num_threads) : "memory");
}

__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// 2^x on the FMA pipe (FA4's offload of part of the exp2s from MUFU): x = j + f with j = floor(x) (rounding add
// of 1.5 * 2^23 leaves j in the low mantissa bits), 2^f for f in [0, 1) by a degree-3 minimax polynomial
// (relative error <= 7.5e-5, continuous at integer x: p(1) = 2 p(0)), then j added to the exponent field.
// 8 instructions (FMNMX, 3 FADD, 3 FFMA, LEA) instead of one MUFU.EX2 (8 cycles of the SM sub-partition's MUFU
// unit per warp). Inputs below -126 give a value <= 2^-126 instead of 0 (the clamp keeps the exponent field
// >= 0: at -127, p(0) < 1 would borrow into the sign bit); only unmasked tiles use it (no -inf).
__device__ __forceinline__ float exp2_poly(float x) {
  x = fmaxf(x, -126.f);
  float const t = __fadd_rd(x, 12582912.f);  // 1.5 * 2^23 + floor(x)
  float const j = t - 12582912.f;
  float const f = x - j;
  float const p = fmaf(fmaf(fmaf(0.07802402973175049f, f, 0.22606706619262695f), f, 0.6958339810371399f), f,
                       0.9999251365661621f);
  // The float add of +0 (exact: the result is > 0) matters: when the value entering S / P comes straight from an
  // integer instruction, ptxas serialises every wgmma of the kernel (C7511, "insufficient register resources"; 60
  // WARPGROUP ops instead of 12 in the fp8 192-key module) -- found in session 8 by bisecting the ptxas remarks
  // (float-only variants and this one compile without it; the integer insert alone, as LEA or IMAD, triggers it).
  return __fadd_rn(__int_as_float(__float_as_int(p) + (__float_as_int(t) << 23)), 0.0f);
}

// The consumer thread index, re-read from %tid.x: a volatile read cannot be hoisted out of the persistent item loop,
// so the epilogue's ~40 thread-dependent addresses are recomputed per item instead of being held in registers
// through every KV loop (REG_DIET; the default consumers peak at R237 of 240 largely because of them).
__device__ __forceinline__ int fresh_consumer_tid() {
  uint32_t t;
  asm volatile("mov.u32 %0, %%tid.x;" : "=r"(t));
  return int(t) - 128;
}

__device__ __forceinline__ int floor_div(int a, int b) {  // b > 0
  return a >= 0 ? a / b : -((-a + b - 1) / b);
}

template <int kStages>
struct PipeState {
  int index = 0;
  uint32_t phase = 0;
  __device__ __forceinline__ void advance() {
    if (++index == kStages) {
      index = 0;
      phase ^= 1;
    }
  }
};

__device__ __forceinline__ void pin_before_wait(float* scratch, float v) {
  asm volatile("st.shared.f32 [%0], %1;" ::"r"(cute::cast_smem_ptr_to_uint(scratch)), "f"(v) : "memory");
}

// Per-step timeline (diagnostic build, -DMSA_FMHA_SM90_TIMELINE; off by default): lane 0 of warp 0 of each consumer
// warpgroup of CTAs [0, kTlCtas) stamps clock64() at kTlPoints points of each of the first kTlSteps unmasked-loop
// steps of its CTA's second work item (the first runs cold). Read back by the module's timeline() export.
constexpr int kTlCtas = 8, kTlSteps = 48, kTlPoints = 8;
#if defined(MSA_FMHA_SM90_TIMELINE)
__device__ long long g_fmha_timeline[kTlCtas][2][kTlSteps][kTlPoints];
#endif
// One recording thread's row of stamps (nullptr: this thread does not record); shared by both timelines.
struct TimelineRow {
#if defined(MSA_FMHA_SM90_TIMELINE)
  long long* row = nullptr;
  __device__ __forceinline__ void stamp(int point) {
    if (row != nullptr) {
      long long t;
      asm volatile("mov.u64 %0, %%clock64;" : "=l"(t)::"memory");
      row[point] = t;
    }
  }
  __device__ __forceinline__ void value(int point, long long v) {
    if (row != nullptr) { row[point] = v; }
  }
#else
  __device__ __forceinline__ void stamp(int) {}
  __device__ __forceinline__ void value(int, long long) {}
#endif
};
struct Timeline : TimelineRow {
#if defined(MSA_FMHA_SM90_TIMELINE)
  __device__ __forceinline__ void start(bool on, int wg, int item_no, int step) {
    row = (on && item_no == 1 && step < kTlSteps && blockIdx.x < kTlCtas) ? g_fmha_timeline[blockIdx.x][wg][step]
                                                                          : nullptr;
  }
#else
  __device__ __forceinline__ void start(bool, int, int, int) {}
#endif
};

// Per-item timeline (same diagnostic build): lane 0 of each consumer warpgroup of CTAs [0, kTlCtas) stamps clock64() at
// kItemPoints points of each of its first kTlItems items: 0 item start (loop head), 1 first tile's softmax done, 2 KV
// loop done, 3 epilogue done; point 4 holds the item's KV tile count (not a time); then 5 Q landed, 6 the first K
// landed, 7 the first S ready, 8 the last V landed (tail), 9 the last PV done, 10 finalize done (epilogue start).
constexpr int kTlItems = 64, kItemPoints = 11;
#if defined(MSA_FMHA_SM90_TIMELINE)
__device__ long long g_fmha_item_timeline[kTlCtas][2][kTlItems][kItemPoints];
#endif
struct ItemTimeline : TimelineRow {
#if defined(MSA_FMHA_SM90_TIMELINE)
  __device__ __forceinline__ void start(bool on, int wg, int item_no) {
    row = (on && item_no < kTlItems && blockIdx.x < kTlCtas) ? g_fmha_item_timeline[blockIdx.x][wg][item_no] : nullptr;
  }
#else
  __device__ __forceinline__ void start(bool, int, int) {}
#endif
};

using Mbar = cutlass::arch::ClusterBarrier;
using TxMbar = cutlass::arch::ClusterTransactionBarrier;

// mbarrier wait / arrive that also order ordinary shared-memory accesses for the compiler ("memory" clobber):
// used for the work-index ring, whose payload is a plain shared-memory int.
__device__ __forceinline__ void mbar_wait_mem(uint64_t* bar, uint32_t phase) {
  uint32_t const addr = cute::cast_smem_ptr_to_uint(bar);
  asm volatile(
      "{\n\t.reg .pred p;\n\t"
      "WAIT_%=:\n\t"
      "mbarrier.try_wait.parity.shared::cta.b64 p, [%0], %1;\n\t"
      "@!p bra WAIT_%=;\n\t}"
      ::"r"(addr), "r"(phase) : "memory");
}

__device__ __forceinline__ void mbar_arrive_mem(uint64_t* bar) {
  uint32_t const addr = cute::cast_smem_ptr_to_uint(bar);
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(addr) : "memory");
}

// Sparse-Q pairs: this CTA's rank in its 2-CTA cluster (which of the pair's two items it runs).
__device__ __forceinline__ int pair_rank() { return int(cute::block_rank_in_cluster()); }

// A consumer warp's release of a K / V stage. Pairs: the two CTAs use their stages in lockstep and a shared tile is
// written into both by one multicast, so a stage may be refilled only when both CTAs have released it: each CTA's
// empty barrier counts both CTAs' consumer warps (2 x kNumMmaThreads / 32 arrivals), lane 0 arriving on its own CTA's
// barrier and lane 1 on the peer's -- one predicated arrive, no branch (a branch between a wgmma issue and its wait
// makes ptxas serialise the kernel's wgmmas, C7518). Otherwise every consumer thread arrives locally.
// The lane's target is fixed for the kernel: each consumer thread makes one StageRelease and reuses it (the cluster
// rank and the lane test are then not re-derived at every release).
template <class T>
struct StageRelease {
  uint32_t cta = 0;     // pairs: the CTA whose barrier this lane arrives on (own for lane 0, the peer for lane 1)
  uint32_t signal = 0;  // pairs: 1 for lanes 0 and 1
  __device__ __forceinline__ StageRelease() {
    if constexpr (T::kPair) {
      uint32_t const lane = threadIdx.x & 31;
      cta = uint32_t(pair_rank()) ^ (lane & 1u);
      signal = lane < 2 ? 1u : 0u;
    }
  }
  __device__ __forceinline__ void operator()(uint64_t* bar) const {
    if constexpr (T::kPair) {
      asm volatile(
          "{\n\t.reg .pred p;\n\t.reg .b32 ra;\n\t"
          "setp.ne.u32 p, %1, 0;\n\t"
          "mapa.shared::cluster.u32 ra, %0, %2;\n\t"
          "@p mbarrier.arrive.shared::cluster.b64 _, [ra];\n\t}"
          ::"r"(cute::cast_smem_ptr_to_uint(bar)), "r"(signal), "r"(cta) : "memory");
    } else {
      Mbar::arrive(bar);
    }
  }
};

__device__ __forceinline__ WorkItem load_work(WorkItem const* work, int i) {
  int4 a = __ldg(reinterpret_cast<int4 const*>(work + i));
  int4 b = __ldg(reinterpret_cast<int4 const*>(work + i) + 1);
  int4 c = __ldg(reinterpret_cast<int4 const*>(work + i) + 2);
  return WorkItem{a.x, a.y, a.z, a.w, b.x, b.y, b.z, b.w, c.x, c.y, c.z, c.w};
}

// An item's descriptor; sparse-Q: n_block_max is the item's union length from the device-built list (-1: the item
// is not routed to this kernel and writes nothing; 0: its tokens selected nothing, O = 0 and LSE = -inf).
template <class T>
__device__ __forceinline__ WorkItem load_item(typename T::Params const& p, int item) {
  WorkItem w = load_work(p.work, item);
  if constexpr (T::kSparseQ) { w.n_block_max = __ldg(p.sq_union_len + item); }
  return w;
}

// Sparse-Q pairs: the two items a cluster runs (sq_pair_items row: token tiles 2j and 2j + 1 of one request and KV
// head; the second may be absent, -1), seen from this CTA (rank r runs entry r). Both CTAs walk L = max(own, peer, 0)
// positions in lockstep (they share every stage's barriers); position n of a CTA is entry n - (L - own) of its own
// union (ascending, so its tiles come first in the loop's high-to-low order) or, below that, a dummy tile that no row
// selected (P = 0: the result is bit-identical to the single-CTA kernel's). The descriptor's n_block_max is L (or,
// when L = 0, the own union length: -1 not routed, 0 nothing selected) and item_end holds the own union length (-1:
// not routed or no item -- this CTA then writes nothing).
struct PairView {
  int item;    // own work row and block list (the peer's when this CTA has no item)
  int peer;    // the peer's item, -1: none
  int own_u;   // own union length, -1: not routed / no item
  int peer_u;  // the peer's, -1 likewise
  int positions;  // L
};

template <class T>
__device__ __forceinline__ PairView pair_view(typename T::Params const& p, int pair) {
  int2 const it = __ldg(reinterpret_cast<int2 const*>(p.sq_pair_items) + pair);
  int const mine = pair_rank() == 0 ? it.x : it.y, peer = pair_rank() == 0 ? it.y : it.x;
  PairView v;
  v.own_u = mine >= 0 ? __ldg(p.sq_union_len + mine) : -1;
  v.peer_u = peer >= 0 ? __ldg(p.sq_union_len + peer) : -1;
  v.item = mine >= 0 ? mine : peer;
  v.peer = peer;
  v.positions = max(max(v.own_u, v.peer_u), 0);
  return v;
}

template <class T>
__device__ __forceinline__ WorkItem load_pair_item(typename T::Params const& p, PairView const& v) {
  WorkItem w = load_work(p.work, v.item);
  w.n_block_max = v.positions > 0 ? v.positions : v.own_u;
  w.item_end = v.own_u;
  return w;
}

// Pairs: whether the two items' unions are equal (same length, same blocks; then every tile is shared). Called by all
// lanes of the producer warp; both CTAs reach the same answer.
template <class T>
__device__ __forceinline__ bool pair_shared(typename T::Params const& p, PairView const& v, int lane) {
  if (v.own_u <= 0 || v.own_u != v.peer_u) { return false; }
  int const* a = p.sq_union + int64_t(v.item) * p.sq_umax;
  int const* b = p.sq_union + int64_t(v.peer) * p.sq_umax;
  bool eq = true;
  for (int i = lane; i < v.own_u; i += 32) { eq = eq && __ldg(a + i) == __ldg(b + i); }
  bool shared = __all_sync(0xffffffff, eq);
#if defined(MSA_FMHA_SM90_DIAG_PAIR_SHARED)  // diagnostic builds (A/B): 1 = shared whenever the lengths match (wrong
  shared = MSA_FMHA_SM90_DIAG_PAIR_SHARED == 1;  // results unless the unions are equal), 0 = never shared
#endif
  return shared;
}

// The index a ring slot carries: an item, or (pairs) a pair; the end of the work list stops the kernel.
template <class T>
__device__ __forceinline__ int work_end(typename T::Params const& p) {
  if constexpr (T::kPair) {
    return p.sq_num_pairs;
  } else {
    return p.num_work;
  }
}

// The consumers' (and fill warps') side of the producer's work-index ring: wait for the next published index,
// free its slot, and load the descriptor when it is real work (index >= num_work ends the kernel).
template <class T>
__device__ __forceinline__ void read_work_ring(typename T::Params const& p, typename T::SharedStorage& ss,
                                               PipeState<2>& rd, int& item, WorkItem& w) {
  mbar_wait_mem(&ss.sched_full[rd.index], rd.phase);
  item = ss.sched_item[rd.index];
  // Pairs: the producer also hands over this CTA's item, positions and own union length (PairView), so the consumers
  // load only the work row (no dependent loads of the pair table and union lengths before the epilogue).
  int const aux_item = ss.sched_aux[T::kPair ? rd.index : 0][0];
  int const aux_positions = ss.sched_aux[T::kPair ? rd.index : 0][1];
  int const aux_own = ss.sched_aux[T::kPair ? rd.index : 0][2];
  mbar_arrive_mem(&ss.sched_empty[rd.index]);
  rd.advance();
  if constexpr (T::kPair) {  // a pair index: this CTA's item (p.num_work: stop)
    if (item < p.sq_num_pairs) {
      w = load_work(p.work, aux_item);
      w.n_block_max = aux_positions;
      w.item_end = aux_own;
      item = aux_item;
    } else {
      item = p.num_work;
    }
  } else if (item < p.num_work) {
    w = load_item<T>(p, item);
  }
}


// SM90 accumulator fragment ((2,2,V), MMA_M, MMA_N) viewed as (rows=(2,MMA_M), cols=(2,V,MMA_N)).
template <class Layout>
__device__ __forceinline__ auto acc_rowcol(Layout l) {
  static_assert(decltype(rank<0>(l))::value == 3, "expected an SM90 accumulator layout");
  return make_layout(make_layout(get<0, 1>(l), get<1>(l)), make_layout(get<0, 0>(l), get<0, 2>(l), get<2>(l)));
}

// The same accumulator registers viewed as the A operand of a 16-bit RS wgmma:
// ((2,2,V), MMA_M, MMA_N) -> ((2,2,2), MMA_M, (V/2, MMA_N)). Every k16 slice of P is exactly the
// accumulator values of two neighbouring n8 column chunks, so no data moves.
template <class Layout>
__device__ __forceinline__ auto acc_as_a_operand(Layout l) {
  auto v = logical_divide(get<0, 2>(l), Tile<_2>{});  // ((2, V/2))
  return make_layout(make_layout(get<0, 0>(l), get<0, 1>(l), get<0, 0>(v)), get<1>(l),
                     coalesce(make_layout(get<0, 1>(v), get<2>(l))));
}

template <class TA, class TB>
__device__ __forceinline__ void convert_fragment(TA const& src, TB& dst) {
  using To = typename TB::value_type;
  static_assert(decltype(size(src))::value == decltype(size(dst))::value);
  static_assert(decltype(size(src))::value % 2 == 0);
  cutlass::NumericArrayConverter<To, float, 2> cvt;
  CUTE_UNROLL
  for (int i = 0; i < size(src); i += 2) {
    cutlass::Array<float, 2> in;
    in[0] = src(i);
    in[1] = src(i + 1);
    cutlass::Array<To, 2> out = cvt(in);
    dst(i) = out[0];
    dst(i + 1) = out[1];
  }
}

// FP8: the S accumulator (fp32) -> the e4m3 A operand of the PV wgmma, without moving data between threads.
// An e4m3 A fragment (k32 slice) holds, per thread, rows r and r+8 at columns 4t..4t+3 and 16+4t..16+4t+3;
// the accumulator holds columns 2t, 2t+1 of each 8-column chunk. Read as logical column l of the A fragment,
// this thread's accumulator value at physical key 8 * ((l % 4) / 2) + 2 * ((l % 16) / 4) + l % 2 of the same
// 16-key group -- the V pre-pass stores V^T with its keys in exactly this order, so P V is unchanged.
// a2acc: A fragment value i = k4 + 4 rh + 8 kh + 16 kb (k4 column, rh row half, kh k16 half, kb k32 block)
// -> accumulator value (k4 % 2) + 2 rh + 4 (4 kb + 2 kh + k4 / 2). Checked on the host against CuTe's layouts
// (tests/core/test_fmha_fp8.py::test_fp8_fragment_mapping).
template <int kBlockN>
using Fp8PLayout = Layout<Shape<Shape<_4, _2, _2>, _1, Int<kBlockN / 32>>>;
template <int kBlockN>
using Fp8PFromAcc = Layout<Shape<Shape<Shape<_2, _2>, _2, _2>, _1, Int<kBlockN / 32>>,
                           Stride<Stride<Stride<_1, _4>, _2, _8>, _0, _16>>;

// kCodes (kPBits): the accumulator holds 1.5 * 2^23 + code per score (OnlineSoftmax, kPBits), whose low byte is P's
// e4m3 bits: byte moves only (2 IMAD + 1 PRMT per 4 values) instead of the cvt.e4m3x2 pairs.
template <int kBlockN, bool kCodes = false, class TA, class TB>
__device__ __forceinline__ void convert_p_fp8(TA const& acc, TB& p) {
  static_assert(decltype(size(acc))::value == 2 * kBlockN / 4 && decltype(size(p))::value == 2 * kBlockN / 4);
  constexpr Fp8PFromAcc<kBlockN> from_acc{};
  uint32_t* dst = reinterpret_cast<uint32_t*>(raw_pointer_cast(p.data()));
  CUTE_UNROLL
  for (int i = 0; i < size(p); i += 4) {
    // Values i, i+1 (and i+2, i+3) are neighbouring accumulator registers.
    float const x0 = acc(from_acc(i)), x1 = acc(from_acc(i + 1)), x2 = acc(from_acc(i + 2)), x3 = acc(from_acc(i + 3));
    if constexpr (kCodes) {
      uint32_t lo, hi, d;
#if defined(MSA_FMHA_SM90_PACK_PRMT)
      // (A/B) all three on the ALU pipe (session 12 run 5: 1.49x / 1.38x our bf16 vs 1.52x / 1.45x with the IMADs)
      asm("prmt.b32 %0, %1, %2, 0x0040;" : "=r"(lo) : "r"(__float_as_uint(x0)), "r"(__float_as_uint(x1)));
      asm("prmt.b32 %0, %1, %2, 0x0040;" : "=r"(hi) : "r"(__float_as_uint(x2)), "r"(__float_as_uint(x3)));
#else
      // Pairs by an integer multiply-add, which runs on the FMA pipe (the ALU pipe carries the row max's FMNMX):
      // bits(x1) * 256 + bits(x0) = 0x8B400000 + c1 * 256 + c0 (mod 2^32), whose low half is c0 | c1 << 8 (c0 <= 126:
      // no carry); then one PRMT per 4 values.
      asm("mad.lo.u32 %0, %1, 256, %2;" : "=r"(lo) : "r"(__float_as_uint(x1)), "r"(__float_as_uint(x0)));
      asm("mad.lo.u32 %0, %1, 256, %2;" : "=r"(hi) : "r"(__float_as_uint(x3)), "r"(__float_as_uint(x2)));
#endif
      asm("prmt.b32 %0, %1, %2, 0x5410;" : "=r"(d) : "r"(lo), "r"(hi));
      dst[i / 4] = d;
    } else {  // one cvt.e4m3x2 per pair
      uint16_t lo, hi;
      asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;" : "=h"(lo) : "f"(x1), "f"(x0));
      asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;" : "=h"(hi) : "f"(x3), "f"(x2));
      dst[i / 4] = uint32_t(lo) | (uint32_t(hi) << 16);
    }
  }
}

// Issue one warpgroup GEMM (all K slices) as one wgmma commit group; wait for <= kWait groups if kWait >= 0.
template <bool kZeroInit, int kWait, class TiledMma, class TA, class TB, class TC>
__device__ __forceinline__ void wg_gemm(TiledMma& mma, TA const& a, TB const& b, TC& c) {
  constexpr bool kRegA = !cute::is_base_of<GMMA::DescriptorIterator, typename TiledMma::FrgTypeA>::value;
  if constexpr (kRegA) { warpgroup_fence_operand(const_cast<TA&>(a)); }
  warpgroup_fence_operand(c);
  warpgroup_arrive();
  if constexpr (kZeroInit) { mma.accumulate_ = GMMA::ScaleOut::Zero; }
  CUTE_UNROLL
  for (int k = 0; k < size<2>(a); ++k) {
    cute::gemm(mma, a(_, _, k), b(_, _, k), c);
    mma.accumulate_ = GMMA::ScaleOut::One;
  }
  warpgroup_commit_batch();
  if constexpr (kWait >= 0) { warpgroup_wait<kWait>(); }
  warpgroup_fence_operand(c);
  if constexpr (kRegA) { warpgroup_fence_operand(const_cast<TA&>(a)); }
}

// kPBits: O += P V and rs = P x ones (this tile's row sums of the P the PV GEMM uses) as one commit group, no wait.
// rs starts from zero every tile and is added to an fp32 running sum afterwards: H100 / H200 fp8 wgmma keeps only
// ~14 bits when it adds into its accumulator (DeepSeek-V3, section 3.3.2), so one accumulator carried over a 4K-key
// row lost ~7% of the sum (session 12 run 1: LSE off by 0.07, O rel. L2 0.05).
template <class MmaPV, class TA, class TB, class TC, class MmaRS, class TB2, class TC2>
__device__ __forceinline__ void wg_gemm_pv_rowsum(MmaPV& mma, TA const& a, TB const& b, TC& c, MmaRS& mma_rs,
                                                  TB2 const& ones, TC2& rs) {
  warpgroup_fence_operand(const_cast<TA&>(a));
  warpgroup_fence_operand(c);
  warpgroup_fence_operand(rs);
  warpgroup_arrive();
  mma.accumulate_ = GMMA::ScaleOut::One;
  mma_rs.accumulate_ = GMMA::ScaleOut::Zero;
  CUTE_UNROLL
  for (int k = 0; k < size<2>(a); ++k) { cute::gemm(mma, a(_, _, k), b(_, _, k), c); }
  CUTE_UNROLL
  for (int k = 0; k < size<2>(a); ++k) {
    cute::gemm(mma_rs, a(_, _, k), ones(_, _, k), rs);
    mma_rs.accumulate_ = GMMA::ScaleOut::One;
  }
  warpgroup_commit_batch();
  warpgroup_fence_operand(rs);
  warpgroup_fence_operand(c);
  warpgroup_fence_operand(const_cast<TA&>(a));
}

// ------------------------------------------------------------------------------------------------------------
// Online softmax over the rows a thread holds (2 rows of a 64x128 warpgroup tile; 4 threads share a row).
// row_sum stays a per-thread partial sum until finalize (the quad reduction is only needed once).
// ------------------------------------------------------------------------------------------------------------
// kExp2EmuEvery > 0: every kExp2EmuEvery-th column of an unmasked tile (kCheckInf false) uses exp2_poly.
// kRowPipe: row mi > 0 starts its max chain from a value that depends on row mi-1's first exp2 (see traits).
// kLazyMax: a row's running max moves only when the tile raises it by more than kMaxLag (log2 units of P), so most
// steps keep the factor exactly 1 and skip the O rescale (the warp votes on it). P is then <= 2^(kLog2PScale +
// kMaxLag): 2^8.75 = 431 < 448 for fp8 e4m3 (kLog2PScale 8), 2^8 for 16-bit P. The row sum and the LSE use the same
// (lagging) max, so the result is unchanged up to rounding.
// kPBits (fp8): instead of exp2 values, each score becomes 1.5 * 2^23 + (P's e4m3 code) (see traits kPBits); row_sum
// is only rescaled here, the tile sums come from the tensor core (add_tile_sums after the PV wait).
template <int kRows, int kLog2PScale = 0, int kExp2EmuEvery = 0, bool kRowPipe = false, bool kLazyMax = false,
          bool kPBits = false>
struct OnlineSoftmax {
  // Code centring: (1 + f) / 2^f lies in [1, 1.086] over the binade; -0.46 codes = a factor 2^(-0.46 / 8) = 0.961
  // puts it at [0.961, 1.044].
  static constexpr float kCodeOffset = 56.f - 0.46f;
  static constexpr float kMaxLag = kLog2PScale > 0 ? 0.75f : 8.f;
  float row_max[kRows];
  float row_sum[kRows];

  // kTileMax: also return this tile's own row maxima (raw logits) in tile_max (max_score output).
  // kRowSel (sparse-Q): bit mi of row_sel clear = row mi takes no weight from this tile. Such a row keeps its running
  // max (its tile max is dropped) and its exp2 argument becomes -inf (m_scaled = +inf): P = 0 with two selects per
  // row instead of a select per element; needs kCheckInf (a row may have seen no selected key yet).
  template <bool kFirst, bool kCheckInf, bool kTileMax = false, bool kRowSel = false, class Frag>
  __device__ __forceinline__ void update(Frag& s, float scale_log2, float (&o_rescale)[kRows],
                                         float* tile_max = nullptr, uint32_t row_sel = 0) {
    static_assert(!kRowSel || (kCheckInf && !kTileMax), "row selection: check -inf rows, no tile max");
    Tensor sr = make_tensor(s.data(), acc_rowcol(s.layout()));
    static_assert(decltype(size<0>(sr))::value == kRows);
    constexpr int kCols = decltype(size<1>(sr))::value;
    static_assert(kCols % 4 == 0);
    CUTE_UNROLL
    for (int mi = 0; mi < kRows; ++mi) {
      // Four independent max chains (a single 64-long FMNMX chain is latency-bound on the critical path).
      float mx[4] = {(kFirst || kTileMax) ? -INFINITY : row_max[mi], -INFINITY, -INFINITY, -INFINITY};
      if constexpr (kRowPipe) {
        if (mi > 0) {
          // sr(mi - 1, 0) now holds an exp2 (>= 0 or NaN): e + inf is +inf or NaN, and fminf(x, +inf / NaN) = x,
          // so the value is unchanged -- but ptxas must schedule this row's max after the previous row's first
          // MUFU, i.e. inside that row's MUFU phase instead of ahead of it. (Applied to the running-max chain:
          // fminf(-inf, y) would fold to a constant on the first tile, which is outside the loop anyway.)
          mx[0] = fminf(mx[0], sr(mi - 1, 0) + INFINITY);
        }
      }
      CUTE_UNROLL
      for (int ni = 0; ni < kCols; ++ni) { mx[ni % 4] = fmaxf(mx[ni % 4], sr(mi, ni)); }
      float m = fmaxf(fmaxf(mx[0], mx[1]), fmaxf(mx[2], mx[3]));
      m = fmaxf(m, __shfl_xor_sync(0xffffffff, m, 1));
      m = fmaxf(m, __shfl_xor_sync(0xffffffff, m, 2));
      if constexpr (kTileMax) {
        tile_max[mi] = m;
        if constexpr (!kFirst) { m = fmaxf(m, row_max[mi]); }
      }
      bool const row_on = !kRowSel || ((row_sel >> mi) & 1u);
      if constexpr (kRowSel) {
        if (!row_on) { m = kFirst ? -INFINITY : row_max[mi]; }
      }
      if constexpr (kLazyMax && !kFirst) {
        // m >= row_max here (m includes it); -inf - -inf is NaN, so a row without keys keeps -inf.
        if ((m - row_max[mi]) * scale_log2 <= kMaxLag) { m = row_max[mi]; }
      }
      // A row that has seen only masked keys keeps max -inf; use 0 so exp2 gives 0 instead of NaN.
      float const m_safe = (kCheckInf && m == -INFINITY) ? 0.f : m;
      if constexpr (!kFirst) {
        o_rescale[mi] = fast_exp2((row_max[mi] - m_safe) * scale_log2);
        row_sum[mi] *= o_rescale[mi];
      }
      row_max[mi] = m;
      float m_scaled = m_safe * scale_log2 - float(kLog2PScale);  // P <= 2^kLog2PScale
      if constexpr (kRowSel) {
        if (!row_on) { m_scaled = INFINITY; }  // fmaf(s, scale, -inf) = -inf for finite or -inf s: P = 0
      }
      if constexpr (kPBits) {
        // u = 8 log2(P) + 56 - 0.46 = 8 (s scale_log2 - m_scaled) + kCodeOffset; v = sat(u / 126); code = rn(126 v).
        // A masked (-inf) score or an unselected row (m_scaled = +inf) gives u = -inf, v = 0: P = 0.
        float const a = scale_log2 * (8.f / 126.f);
        float const b = (kCodeOffset - 8.f * m_scaled) * (1.f / 126.f);
        CUTE_UNROLL
        for (int ni = 0; ni < kCols; ++ni) {
          float v;
          asm("fma.rn.sat.f32 %0, %1, %2, %3;" : "=f"(v) : "f"(sr(mi, ni)), "f"(a), "f"(b));
          sr(mi, ni) = fmaf(v, 126.f, 12582912.f);
        }
        continue;
      }
      float sum[4] = {0.f, 0.f, 0.f, 0.f};
      CUTE_UNROLL
      for (int ni = 0; ni < kCols; ++ni) {
        float const x = fmaf(sr(mi, ni), scale_log2, -m_scaled);
        float e;
        if constexpr (kExp2EmuEvery > 0 && !kCheckInf) {
          e = (ni % kExp2EmuEvery == kExp2EmuEvery - 1) ? exp2_poly(x) : fast_exp2(x);
        } else {
          e = fast_exp2(x);
        }
        sr(mi, ni) = e;
        sum[ni % 4] += e;
      }
      float const tile_sum = (sum[0] + sum[1]) + (sum[2] + sum[3]);
      row_sum[mi] = kFirst ? tile_sum : row_sum[mi] + tile_sum;
    }
  }

  // kPBits: a tile's row sums (one full row sum per row and thread), computed under the max before this step's
  // update, hence the factor (1 if the max did not move).
  __device__ __forceinline__ void add_tile_sums(float const (&tile_sums)[kRows], float const (&factor)[kRows]) {
    CUTE_UNROLL
    for (int mi = 0; mi < kRows; ++mi) { row_sum[mi] = fmaf(tile_sums[mi], factor[mi], row_sum[mi]); }
  }

  // Returns the factor that normalises O (0 for rows that saw no key) and the natural-log LSE (-inf there).
  // kPBits: row_sum already holds each row's full sum (no quad reduction), and a scale that is not > 0 (a non-positive
  // fp8 head scale) gives NaN, as the exp2 path does (FFMA.SAT would otherwise turn it into P = 0).
  __device__ __forceinline__ void finalize(float sm_scale, float (&o_norm)[kRows], float (&lse)[kRows]) {
    CUTE_UNROLL
    for (int mi = 0; mi < kRows; ++mi) {
      float s = row_sum[mi];
      if constexpr (!kPBits) {
        s += __shfl_xor_sync(0xffffffff, s, 1);
        s += __shfl_xor_sync(0xffffffff, s, 2);
      }
      bool const empty = !(s > 0.f);
      if constexpr (kPBits) {
        o_norm[mi] = !(sm_scale > 0.f) ? __int_as_float(0x7fc00000) : (empty ? 0.f : 1.f / s);
      } else {
        o_norm[mi] = empty ? 0.f : 1.f / s;
      }
      lse[mi] = empty ? -INFINITY : row_max[mi] * sm_scale + __logf(s) - float(kLog2PScale) * 0.69314718f;
    }
  }
};

// Row maxima of a tile (raw logits), reduced over the 4 threads sharing each row.
template <int kRows, class Frag>
__device__ __forceinline__ void tile_row_max(Frag const& s, float (&tile_max)[kRows]) {
  Tensor sr = make_tensor(s.data(), acc_rowcol(s.layout()));
  constexpr int kCols = decltype(size<1>(sr))::value;
  CUTE_UNROLL
  for (int mi = 0; mi < kRows; ++mi) {
    float mx[4] = {-INFINITY, -INFINITY, -INFINITY, -INFINITY};
    CUTE_UNROLL
    for (int ni = 0; ni < kCols; ++ni) { mx[ni % 4] = fmaxf(mx[ni % 4], sr(mi, ni)); }
    float m = fmaxf(fmaxf(mx[0], mx[1]), fmaxf(mx[2], mx[3]));
    m = fmaxf(m, __shfl_xor_sync(0xffffffff, m, 1));
    tile_max[mi] = fmaxf(m, __shfl_xor_sync(0xffffffff, m, 2));
  }
}

template <class Frag, int kRows>
__device__ __forceinline__ void rescale_rows(Frag& o, float const (&scale)[kRows]) {
  Tensor orc = make_tensor(o.data(), acc_rowcol(o.layout()));
  CUTE_UNROLL
  for (int mi = 0; mi < kRows; ++mi) {
    CUTE_UNROLL
    for (int ni = 0; ni < size<1>(orc); ++ni) { orc(mi, ni) *= scale[mi]; }
  }
}

// -inf for keys past kv_len and, when causal, for keys j > i + qo_offset.
template <bool kCausal, int kBlockM, int kBlockN, class Frag, class Coord>
__device__ __forceinline__ void apply_mask(Frag& s, Coord const& coords, WorkItem const& w, int n_block) {
  Tensor sr = make_tensor(s.data(), acc_rowcol(s.layout()));
  Tensor cr = make_tensor(coords.data(), acc_rowcol(coords.layout()));
  int const col0 = n_block * kBlockN;
  CUTE_UNROLL
  for (int mi = 0; mi < size<0>(sr); ++mi) {
    int limit = w.kv_len - col0;  // keep local columns < limit
    if constexpr (kCausal) {
      int const row = w.m_block * kBlockM + get<0>(cr(mi, 0));
      limit = min(limit, row + w.qo_offset + 1 - col0);
    }
    CUTE_UNROLL
    for (int ni = 0; ni < size<1>(sr); ++ni) {
      if (int(get<1>(cr(mi, ni))) >= limit) { sr(mi, ni) = -INFINITY; }
    }
  }
}

// Sparse-Q: -inf for keys past kv_len and, when causal, past each row's token position, in KV block blk. Row r holds
// token r % T of the item (rows are packed g * T + t; T a power of two).
template <bool kCausal, class Frag, class Coord>
__device__ __forceinline__ void apply_mask_sparse(Frag& s, Coord const& coords, WorkItem const& w, int blk, int tpt) {
  Tensor sr = make_tensor(s.data(), acc_rowcol(s.layout()));
  Tensor cr = make_tensor(coords.data(), acc_rowcol(coords.layout()));
  int const col0 = blk * 128;
  CUTE_UNROLL
  for (int mi = 0; mi < size<0>(sr); ++mi) {
    int limit = w.kv_len - col0;
    if constexpr (kCausal) {
      int const pos = w.m_block * tpt + (int(get<0>(cr(mi, 0))) & (tpt - 1));
      limit = min(limit, pos + w.qo_offset + 1 - col0);
    }
    CUTE_UNROLL
    for (int ni = 0; ni < size<1>(sr); ++ni) {
      if (int(get<1>(cr(mi, ni))) >= limit) { sr(mi, ni) = -INFINITY; }
    }
  }
}

// ------------------------------------------------------------------------------------------------------------
// Producer: one warp; one elected lane issues every TMA and pipeline operation.
// ------------------------------------------------------------------------------------------------------------
template <class T>
__device__ void producer_warp(typename T::Params const& p, typename T::SharedStorage& ss) {
  using Element = typename T::Element;
  constexpr int kBlockM = T::kBlockM, kBlockN = T::kBlockN, kD = T::kHeadDim, kDV = T::kHeadDimV;
  bool const leader = (threadIdx.x % 32) == 0;  // issues every TMA / pipeline op; lane 0 broadcasts
  int const rank = T::kPair ? pair_rank() : 0;
  constexpr uint16_t kPairMask = 0b11;  // pairs, shared tiles: both CTAs of the cluster receive them

  Tensor sQ = make_tensor(make_smem_ptr(ss.smem_q), typename T::SmemLayoutQ{});
  Tensor sK = make_tensor(make_smem_ptr(ss.smem_k), typename T::SmemLayoutK{});
  Tensor sVt = make_tensor(make_smem_ptr(ss.smem_v), typename T::SmemLayoutVt{});
  auto tma_q = p.tma_q.get_slice(0);
  auto tma_k = p.tma_k.get_slice(0);
  auto tma_v = p.tma_v.get_slice(0);
  Tensor tQsQ = tma_q.partition_D(sQ);
  Tensor tKsK = tma_k.partition_D(sK);    // (TMA, 1, 1, stage)
  // (TMA, 1, 1, stage); kPvRowSum: a stage has 8 more rows than the TMA box, so each stage is addressed in load_v.
  auto tVsV = [&] {
    if constexpr (T::kPvRowSum) {
      return 0;
    } else {
      return tma_v.partition_D(sVt);
    }
  }();
  Tensor mQ = p.tma_q.get_tma_tensor(p.shape_q);
  Tensor mK = p.tma_k.get_tma_tensor(p.shape_k);
  Tensor mVt = p.tma_v.get_tma_tensor(p.shape_vt);

  PipeState<T::kStages> wr;
  wr.phase = 1;  // the first pass over the stages finds them empty
  PipeState<2> sched_wr;
  sched_wr.phase = 1;
  // Hand the next work index to the consumers (index >= num_work: stop); pairs: with this CTA's side of the pair.
  auto publish = [&](int idx, PairView const& v) {
    if (leader) {
      mbar_wait_mem(&ss.sched_empty[sched_wr.index], sched_wr.phase);
      ss.sched_item[sched_wr.index] = idx;
      if constexpr (T::kPair) {
        ss.sched_aux[sched_wr.index][0] = v.item;
        ss.sched_aux[sched_wr.index][1] = v.positions > 0 ? v.positions : v.own_u;
        ss.sched_aux[sched_wr.index][2] = v.own_u;
      }
      mbar_arrive_mem(&ss.sched_full[sched_wr.index]);
    }
    sched_wr.advance();
  };

  // Sparse-Q takes items in the device-built order (longest union first); the index published to the consumers is
  // the item's own (num_work: stop). Pairs: pairs in the plan's order (token tile major); the index published is the
  // pair's (sq_num_pairs: stop).
  int const end = work_end<T>(p);
  auto item_at = [&](int seq) {
    if constexpr (T::kPair) {
      return seq < end ? seq : end;
    } else if constexpr (T::kSparseQ) {
      return seq < p.num_work ? __ldg(p.sq_order + seq) : p.num_work;
    } else {
      return seq;
    }
  };
  // Pairs: both CTAs of a cluster must run the same pairs in the same order (they share every K / V stage), so
  // cluster c takes sequence positions c, c + clusters, ... (static round robin) instead of the dynamic counter.
  int seq = T::kPair ? int(blockIdx.x) / 2 : int(blockIdx.x);
  int idx = item_at(seq);  // the grid never exceeds the work (pairs: 2 x the pairs)
  bool vt_visible = false;          // fp8: griddepcontrol.wait done (the V^T pre-pass grid has completed)
  int const lane = int(threadIdx.x % 32);
  // Pairs: a pair's view and union test are made while the previous item drains (next_probe, after its last load),
  // so their dependent loads do not delay the pair's first K, and the consumers get the pair's side with the index.
  PairView pv{};
  bool shared = false;
  if constexpr (T::kPair) {
    if (idx < end) {
      pv = pair_view<T>(p, idx);
      shared = pair_shared<T>(p, pv, lane);
    }
  }
  publish(idx, pv);
  while (idx < end) {
    int item = idx;
    WorkItem w;
    if constexpr (T::kPair) {
      w = load_pair_item<T>(p, pv);
      item = pv.item;
    } else {
      w = load_item<T>(p, item);
    }
    int next = 0;
    if constexpr (T::kPair) {
      seq += int(gridDim.x) / 2;
      next = item_at(seq);
    } else {
      if (leader) { next = atomicAdd(p.work_counter, 1) + int(gridDim.x); }
      next = item_at(__shfl_sync(0xffffffff, next, 0));
    }
    PairView pv_next{};
    bool shared_next = false;
    auto next_probe = [&] {
      if constexpr (T::kPair) {
        if (next < end) {
          pv_next = pair_view<T>(p, next);
          shared_next = pair_shared<T>(p, pv_next, lane);
        }
      }
    };
    if (w.n_block_max <= 0) {  // consumers write zeros without any load
      next_probe();
      publish(next, pv_next);
      idx = next;
      pv = pv_next;
      shared = shared_next;
      continue;
    }
    int const kv_head = w.head / p.q_heads_per_kv_head;

    Tensor gQ = local_tile(domain_offset(make_coord(w.q_start, _0{}), mQ(_, _, w.head)),
                           Shape<Int<kBlockM>, Int<kD>>{}, make_coord(w.m_block, _0{}));
    Tensor tQgQ = tma_q.partition_S(gQ);
    // (TMA, 1, 1, tile): tile is the request's KV tile (ragged). Paged K/V go through raw 4-D descriptors instead
    // (load_page_boxes below), so one module serves every page size.
    auto tKgK = [&] {
      if constexpr (T::kPaged) {
        return 0;
      } else {
        return tma_k.partition_S(local_tile(domain_offset(make_coord(w.kv_start, _0{}), mK(_, _, kv_head)),
                                            Shape<Int<kBlockN>, Int<kD>>{}, make_coord(_, _0{})));
      }
    }();
    auto tVgV = [&] {
      if constexpr (T::kPaged) {
        return 0;
      } else if constexpr (T::kFp8) {
        return tma_v.partition_S(local_tile(mVt(_, _, kv_head), Shape<Int<kD>, Int<kBlockN>>{}, make_coord(_0{}, _)));
      } else {
        return tma_v.partition_S(local_tile(domain_offset(make_coord(_0{}, w.kv_start), mVt(_, _, kv_head)),
                                            Shape<Int<kDV>, Int<kBlockN>>{}, make_coord(_0{}, _)));
      }
    }();
    // Page ids (paged) and union entries (sparse-Q) are read in 32-entry windows: each lane holds one id of the
    // window, fetched once per window and shuffled to where it is needed, so an id's global load is not on the path
    // of every TMA issue. Called by all lanes; the window index must be the same in every lane.
    //   Sparse-Q: tile n of the item = KV block union[n] (paged: its physical page, from the union's page-id twin --
    //   the consumers mask with the logical id); every lane gets entry n.
    //   Paged (dense): tile n (kBlockN keys) of a request with page size P covers pages n / (kBlockN / P) .. (P <
    //   kBlockN: kBlockN / P pages, one per lane) or part of page n / (P / kBlockN) (P >= kBlockN: slots from
    //   (n % (P / kBlockN)) * kBlockN); lane j < page_subs gets the physical page of its box. Pages past the request's
    //   last one (a short last tile) repeat the last page: those keys are masked and their V rows zeroed.
    int id_window = -1, id_of_lane = 0;
    // Pairs: equal unions (same length, same blocks) -> shared: position n is entry n of both, loaded once by CTA n % 2
    // into the same stage of both CTAs (multicast). Otherwise each CTA loads its own position's tile (its own entry,
    // or a dummy: entry 0 of its union, or of the peer's when it has none) into its own stage only.
    uint16_t const mcast = shared ? kPairMask : uint16_t(1u << rank);
    auto tile_of = [&](int n) {
      if constexpr (T::kPair) {  // see PairView: own entries at positions >= L - own, dummies below
        int const off = w.n_block_max - pv.own_u;
        bool const real = pv.own_u > 0 && n >= off;
        int const src = pv.own_u > 0 ? pv.item : pv.peer;
        return __ldg((T::kPaged ? p.sq_union_phys : p.sq_union) + int64_t(src) * p.sq_umax + (real ? n - off : 0));
      } else if constexpr (T::kPaged || T::kSparseQ) {
        int q = n, bound = w.n_block_max;
        int const* ids = nullptr;
        if constexpr (T::kSparseQ) {
          ids = (T::kPaged ? p.sq_union_phys : p.sq_union) + int64_t(item) * p.sq_umax;
        } else {
          bound = (w.kv_len + p.page_size - 1) >> p.page_shift;  // powers of two: shifts, not divisions
          q = p.page_subs == 1 ? n >> p.tiles_per_page_shift
                               : min(n * p.page_subs + min(lane, p.page_subs - 1), bound - 1);
          ids = p.kv_indices + w.kv_start;
        }
        int const window = q >> 5;
        if (window != id_window) {
          id_window = window;
          int const t = (window << 5) + lane;
          id_of_lane = t < bound ? __ldg(ids + t) : 0;
        }
        return __shfl_sync(0xffffffff, id_of_lane, q & 31);
      } else {
        return n;
      }
    };
    // Pairs: each CTA's producer waits for its own empty barrier (which counts both CTAs' consumers) and arms its own
    // full barrier with the whole tile's bytes -- a shared tile's bytes from the peer may land before the arm, which
    // the open phase allows. Shared: CTA n % 2 issues tile n for both.
    auto owns = [&](int n) { return !T::kPair || !shared || (n & 1) == rank; };
    // Paged: the boxes of KV tile n (this lane's page `page`, from tile_of) into one smem stage: box j (lane j) holds
    // page_rows slots at rows j * page_rows of the stage, one box per 64 dims (the stage is 64-dim slabs of kBlockN
    // 128-byte swizzled rows, K and V^T alike; every box starts on a 1024-byte swizzle period since page_rows >= 16).
    auto load_page_boxes = [&](auto dims, cute::TmaDescriptor const* desc, uint64_t* bar, Element* stage, int page,
                               int n) {
      if (lane < p.page_subs && owns(n)) {
        int const slot0 = (n & (p.tiles_per_page - 1)) * kBlockN;
        Element* dst = stage + lane * p.page_rows * 64;
        CUTE_UNROLL
        for (int c = 0; c < decltype(dims)::value / 64; ++c) {
          if constexpr (T::kPair) {
            SM90_TMA_LOAD_MULTICAST_4D::copy(desc, bar, mcast, static_cast<uint64_t>(TMA::CacheHintSm90::EVICT_NORMAL),
                                             dst + c * kBlockN * 64, c * 64, slot0, kv_head, page);
          } else {
            SM90_TMA_LOAD_4D::copy(desc, bar, static_cast<uint64_t>(TMA::CacheHintSm90::EVICT_NORMAL),
                                   dst + c * kBlockN * 64, c * 64, slot0, kv_head, page);
          }
        }
      }
    };
    // Called by all lanes (paged: several lanes issue boxes, after the leader's expect_tx).
    // Diagnostic build only (-DMSA_FMHA_SM90_DIAG_NO_KV_RELOAD, wrong results): an item loads K / V for its first
    // tile only and reuses whatever the stages hold for the rest -- the same compute without the L2 -> SM traffic.
#if defined(MSA_FMHA_SM90_DIAG_NO_KV_RELOAD)
    auto diag_skip = [&](int n) { return n < w.n_block_max - 1; };
#else
    auto diag_skip = [&](int) { return false; };
#endif
    auto load_k = [&](int tile, int n, PipeState<T::kStages> const& s) {
      if (leader) {
        Mbar::wait(&ss.empty_k[s.index], s.phase);
        if (diag_skip(n)) {
          Mbar::arrive(&ss.full_k[s.index]);
          return;
        }
        TxMbar::arrive_and_expect_tx(&ss.full_k[s.index], T::kTmaBytesK);
      }
      if constexpr (T::kPaged) {
        __syncwarp();
        load_page_boxes(Int<kD>{}, &p.tma_k_page, &ss.full_k[s.index], ss.smem_k + s.index * (kBlockN * kD), tile, n);
      } else if (leader && owns(n)) {  // (the plain TMA op's with() ignores the multicast mask)
        copy(p.tma_k.with(ss.full_k[s.index], mcast), tKgK(_, _, _, tile), tKsK(_, _, _, s.index));
      }
    };
    auto load_v = [&](int tile, int n, PipeState<T::kStages> const& s) {
      if constexpr (T::kFp8) {
        // V^T comes from the pre-pass grid this kernel may overlap (programmatic dependent launch): wait for it once.
        if (!vt_visible) {
          asm volatile("griddepcontrol.wait;" ::: "memory");
          vt_visible = true;
        }
      }
      if (leader) {
        Mbar::wait(&ss.empty_v[s.index], s.phase);
        if (diag_skip(n)) {
          Mbar::arrive(&ss.full_v[s.index]);
          return;
        }
        TxMbar::arrive_and_expect_tx(&ss.full_v[s.index], T::kTmaBytesV);
      }
      if constexpr (T::kPaged) {
        __syncwarp();
        load_page_boxes(Int<kDV>{}, &p.tma_v_page, &ss.full_v[s.index], ss.smem_v + s.index * (kBlockN * kDV), tile,
                        n);
      } else if (leader && owns(n)) {
        // FP8: the transposed copy holds the request's tiles from tile w.reserved on (128-token padded).
        int const v_tile = T::kFp8 ? w.reserved + tile : tile;
        if constexpr (T::kPvRowSum) {
          Tensor sVs = make_tensor(make_smem_ptr(ss.smem_v + s.index * T::kVtStageElems), typename T::SmemLayoutVtTma{});
          copy(p.tma_v.with(ss.full_v[s.index], mcast), tVgV(_, _, _, v_tile), tma_v.partition_D(sVs));
        } else {
          copy(p.tma_v.with(ss.full_v[s.index], mcast), tVgV(_, _, _, v_tile), tVsV(_, _, _, s.index));
        }
      }
    };

    int n = w.n_block_max - 1;
    int const n_min = w.n_block_min;
    int tile = tile_of(n);
    load_k(tile, n, wr);
    // Q of the previous tile must be fully consumed (its last QK^T done) before it is overwritten.
    named_barrier_sync(kBarQueryEmpty, T::kNumMmaThreads + 32);
    if (leader) {
      TxMbar::arrive_and_expect_tx(&ss.bar_q, T::kTmaBytesQ);
      if constexpr (T::kSparseQ) {
        // (128-byte dims, T tokens, G heads) per box: smem rows g * T + t, one 128-row x 128-byte swizzled slab per
        // box (64 dims of 16-bit Q, 128 of fp8).
        constexpr int kBoxDims = 128 / int(sizeof(Element));
        int const tok0 = w.q_start + w.m_block * p.sq_tokens_per_tile;
        CUTE_UNROLL
        for (int c = 0; c < kD / kBoxDims; ++c) {
          SM90_TMA_LOAD_3D::copy(&p.tma_q_packed, &ss.bar_q, static_cast<uint64_t>(TMA::CacheHintSm90::EVICT_NORMAL),
                                 ss.smem_q + c * kBlockM * kBoxDims, c * kBoxDims, tok0, w.head);
        }
      } else {
        copy(p.tma_q.with(ss.bar_q), tQgQ, tQsQ);
      }
    }
    if constexpr (T::kOutputO) {
      // K runs one tile ahead of V: the consumers need K(n) for QK^T while they still use V(n+1).
      for (--n; n >= n_min; --n) {
        PipeState<T::kStages> const wr_v = wr;
        wr.advance();
        int const prev = tile;
        tile = tile_of(n);
        load_k(tile, n, wr);
        load_v(prev, n + 1, wr_v);
      }
      load_v(tile, n + 1, wr);
    } else {  // score-only: K tiles alone
      for (--n; n >= n_min; --n) {
        wr.advance();
        tile = tile_of(n);
        load_k(tile, n, wr);
      }
    }
    wr.advance();
    next_probe();  // after this item's last load: the consumers need the next index only ~2 tiles later
    publish(next, pv_next);
    idx = next;
    pv = pv_next;
    shared = shared_next;
  }
}

// ------------------------------------------------------------------------------------------------------------
// Epilogue of one consumer warpgroup: O * norm -> bf16/fp16 -> the request's valid rows of out; LSE from the
// thread holding column 0 of each row. Staged (default): through a padded smem tile, then 16-byte coalesced
// stores. Direct (MSA_FMHA_SM90_DIRECT_O): 4 lanes write each row's 16 contiguous bytes per store.
// ------------------------------------------------------------------------------------------------------------
template <class T, class FragO>
__device__ __forceinline__ void store_tile(typename T::Params const& p, typename T::SharedStorage& ss, FragO& o,
                                           float const (&o_norm)[2], float const (&lse)[2], WorkItem const& w,
                                           int tid, float out_scale) {
  if constexpr (T::kRegDiet) { tid = fresh_consumer_tid(); }
  using Element = typename T::ElementOut;
  constexpr int kD = T::kHeadDimV, kStride = T::kSmemORowStride;
  int const wg = tid / 128, wg_tid = tid % 128;
  typename T::TiledMmaPV mma_pv;
  auto thr = mma_pv.get_thread_slice(tid);
  Tensor cO = thr.partition_C(make_identity_tensor(Shape<Int<T::kBlockM>, Int<T::kPVN>>{}));  // kPvRowSum: + 8 cols
  Tensor orc = make_tensor(o.data(), acc_rowcol(o.layout()));
  Tensor crc = make_tensor(cO.data(), acc_rowcol(cO.layout()));
  constexpr int kOCols = 2 * (kD / 8);  // rowcol columns of O proper (the row-sum columns follow)
  cutlass::NumericArrayConverter<Element, float, 2> cvt;
  int const row_base = w.m_block * T::kBlockM;
  // Tile row r -> (token index in the request, query head); the token is valid iff < qo_len. Dense: row_base + r of
  // head w.head. Sparse-Q: rows are packed g * T + t (token m_block * T + t of head w.head + g).
  auto row_token = [&](int r) {
    if constexpr (T::kSparseQ) {
      return w.m_block * p.sq_tokens_per_tile + (r & (p.sq_tokens_per_tile - 1));
    } else {
      return row_base + r;
    }
  };
  auto row_head = [&](int r) {
    if constexpr (T::kSparseQ) {
      return w.head + (r >> (__ffs(p.sq_tokens_per_tile) - 1));  // a power of two: no integer division
    } else {
      return w.head;
    }
  };
  auto out_row = [&](int r) {
    return p.out + int64_t(w.q_start + row_token(r)) * p.out_stride_token + int64_t(row_head(r)) * p.out_stride_head;
  };
  auto packed_pair = [&](int mi, int ni) {  // columns ni, ni+1 of a row are adjacent
    float const f = o_norm[mi] * out_scale;
    cutlass::Array<float, 2> in;
    in[0] = orc(mi, ni) * f;
    in[1] = orc(mi, ni + 1) * f;
    return cvt(in);
  };

  // Direct O in 16-byte stores: the 4 lanes of a quad hold each row's 8-column chunks as one 32-bit word each (columns
  // 8c + 2q, + 1); a 4 x 4 transpose by two xor shuffles per group of 4 chunks gives lane q all 4 words of chunk
  // 4g + q, written with one 16-byte store (4x fewer store wavefronts than 4-byte stores). H200, session 13 run 13:
  // bf16 sparse-Q suite +1.4-2.1% (539 / 540 / 530 / 541 -> 546 / 548 / 541 / 548 eff TFLOP/s), dense bf16 B2 H32 S8K
  // non-causal +1.9%, causal within noise. MSA_FMHA_SM90_O_QUAD_STORE=0 (A/B) gives the 4-byte stores.
#if defined(MSA_FMHA_SM90_O_QUAD_STORE)
  constexpr bool kQuadStore = MSA_FMHA_SM90_O_QUAD_STORE != 0 && sizeof(Element) == 2 && kD % 32 == 0;
#else
  constexpr bool kQuadStore = sizeof(Element) == 2 && kD % 32 == 0;
#endif
#if defined(MSA_FMHA_SM90_O_BATCH)
  constexpr bool kBatch = MSA_FMHA_SM90_O_BATCH != 0;
#else
  // Sparse-Q only: dense bf16 B2 H32 S8K moved within noise (run 3: non-causal -0.9%, causal +1.9%), and its modules
  // are the denominator of the verified fp8 bar, so they keep the interleaved form.
  constexpr bool kBatch = T::kSparseQ;
#endif
  int const q = int(threadIdx.x) & 3;
  // kQuadStore: the quad's 4 x 4 transpose of 32-bit words for chunk group g of row mi. quad_words gives lane q the
  // words of chunk 4 g + q as (own, from q ^ 2, from q ^ 1, from q ^ 3); quad_chunk orders them into its 16 bytes.
  struct QuadWords {
    uint32_t own, p2, u0, u1;
  };
  auto quad_words = [&](int mi, int g) {
    bool const b1 = (q & 2) != 0, b0 = (q & 1) != 0;
    uint32_t a[4];
    CUTE_UNROLL
    for (int j = 0; j < 4; ++j) {
      auto const pr = packed_pair(mi, 2 * (4 * g + j));
      a[j] = reinterpret_cast<uint32_t const&>(pr);
    }
    // Stage 1 (lanes q, q ^ 2): keep chunks 2 b1, 2 b1 + 1 of this row, receive them from row q ^ 2.
    uint32_t const k0 = b1 ? a[2] : a[0], k1 = b1 ? a[3] : a[1];
    uint32_t const r0 = __shfl_xor_sync(0xffffffffu, b1 ? a[0] : a[2], 2);
    uint32_t const r1 = __shfl_xor_sync(0xffffffffu, b1 ? a[1] : a[3], 2);
    // Stage 2 (lanes q, q ^ 1): keep chunk q (rows q, q ^ 2), receive it from rows q ^ 1, q ^ 3.
    return QuadWords{b0 ? k1 : k0, b0 ? r1 : r0, __shfl_xor_sync(0xffffffffu, b0 ? k0 : k1, 1),
                     __shfl_xor_sync(0xffffffffu, b0 ? r0 : r1, 1)};
  };
  auto quad_chunk = [&](QuadWords const& t) {
    auto row_word = [&](int x) { return (x & 2) ? ((x & 1) ? t.u1 : t.p2) : ((x & 1) ? t.u0 : t.own); };  // x = j ^ q
    return make_uint4(row_word(q), row_word(q ^ 1), row_word(q ^ 2), row_word(q ^ 3));
  };
  if constexpr (!T::kStageO && kQuadStore && kBatch) {
    // All transposes first, then the stores, one branch per row: with a store between the shuffles of consecutive
    // chunk groups each group sat in its own divergent region (BRA.DIV / BSSY), so the groups' shuffle latencies
    // serialised. H200 (session 14, bf16 sparse-Q 64/4 S32K): this epilogue 2205 -> 1283 cycles per item, item
    // overhead 1.51 -> 1.22 loop steps; issue-8 shapes +1.5-2.5% eff TFLOP/s per clock (run 6).
    constexpr int kRows = decltype(size<0>(orc))::value, kGroups = kD / 32;
    uint4 vals[kRows][kGroups];
    CUTE_UNROLL
    for (int mi = 0; mi < kRows; ++mi) {
      CUTE_UNROLL
      for (int g = 0; g < kGroups; ++g) { vals[mi][g] = quad_chunk(quad_words(mi, g)); }
    }
    CUTE_UNROLL
    for (int mi = 0; mi < kRows; ++mi) {
      int const r = int(get<0>(crc(mi, 0)));
      if (row_token(r) < w.qo_len) {
        uint4* dst = reinterpret_cast<uint4*>(out_row(r)) + q;
        CUTE_UNROLL
        for (int g = 0; g < kGroups; ++g) { dst[4 * g] = vals[mi][g]; }
      }
    }
  } else if constexpr (!T::kStageO && kQuadStore) {
    CUTE_UNROLL
    for (int mi = 0; mi < size<0>(orc); ++mi) {
      int const r = int(get<0>(crc(mi, 0)));
      bool const valid = row_token(r) < w.qo_len;
      Element* dst = out_row(r);
      CUTE_UNROLL
      for (int g = 0; g < kD / 32; ++g) {
        QuadWords const t = quad_words(mi, g);
        if (valid) { *reinterpret_cast<uint4*>(dst + 8 * (4 * g + q)) = quad_chunk(t); }
      }
    }
  } else if constexpr (!T::kStageO) {
    CUTE_UNROLL
    for (int mi = 0; mi < size<0>(orc); ++mi) {
      int const r = int(get<0>(crc(mi, 0)));
      if (row_token(r) < w.qo_len) {
        Element* dst = out_row(r);
        CUTE_UNROLL
        for (int ni = 0; ni < kOCols; ni += 2) {
          *reinterpret_cast<cutlass::Array<Element, 2>*>(dst + int(get<1>(crc(mi, ni)))) = packed_pair(mi, ni);
        }
      }
    }
  } else {
    named_barrier_sync(T::kBarEpilogueBase + wg, 128);  // this warpgroup's previous tile has left smem_o
    CUTE_UNROLL
    for (int mi = 0; mi < size<0>(orc); ++mi) {
      CUTE_UNROLL
      for (int ni = 0; ni < kOCols; ni += 2) {
        int const row = get<0>(crc(mi, ni)), col = get<1>(crc(mi, ni));
        *reinterpret_cast<cutlass::Array<Element, 2>*>(&ss.smem_o[row * kStride + col]) = packed_pair(mi, ni);
      }
    }
    named_barrier_sync(T::kBarEpilogueBase + wg, 128);
    constexpr int kVecPerRow = kD * int(sizeof(Element)) / 16;
    CUTE_UNROLL
    for (int v = wg_tid; v < 64 * kVecPerRow; v += 128) {
      int const r = wg * 64 + v / kVecPerRow;
      int const c = (v % kVecPerRow) * (16 / int(sizeof(Element)));
      if (row_token(r) < w.qo_len) {
        *reinterpret_cast<uint4*>(out_row(r) + c) = *reinterpret_cast<uint4 const*>(&ss.smem_o[r * kStride + c]);
      }
    }
  }
  if (p.lse != nullptr) {
    CUTE_UNROLL
    for (int mi = 0; mi < size<0>(crc); ++mi) {
      int const r = int(get<0>(crc(mi, 0)));
      if (int(get<1>(crc(mi, 0))) == 0 && row_token(r) < w.qo_len) {
        p.lse[int64_t(w.q_start + row_token(r)) * p.lse_stride_token + row_head(r)] = lse[mi];
      }
    }
  }
}

// Epilogue of a split-KV piece: normalised fp32 O straight from registers (each quad of lanes writes a row's 32
// contiguous bytes per store; the combine kernel reads it back from L2) and the natural-log LSE of every row.
template <class T, class FragO>
__device__ __forceinline__ void store_partial(typename T::Params const& p, FragO& o, float const (&o_norm)[2],
                                              float const (&lse)[2], WorkItem const& w, int tid) {
  if constexpr (T::kRegDiet) { tid = fresh_consumer_tid(); }
  constexpr int kD = T::kHeadDimV, kBlockM = T::kBlockM;
  typename T::TiledMmaPV mma_pv;
  auto thr = mma_pv.get_thread_slice(tid);
  Tensor cO = thr.partition_C(make_identity_tensor(Shape<Int<kBlockM>, Int<T::kPVN>>{}));  // kPvRowSum: + 8 cols
  Tensor orc = make_tensor(o.data(), acc_rowcol(o.layout()));
  Tensor crc = make_tensor(cO.data(), acc_rowcol(cO.layout()));
  constexpr int kOCols = 2 * (kD / 8);  // rowcol columns of O proper (the row-sum columns follow)
  float* base = p.partial_o + int64_t(w.partial_slot) * kBlockM * kD;
  CUTE_UNROLL
  for (int mi = 0; mi < size<0>(orc); ++mi) {
    int const row = get<0>(crc(mi, 0));
    CUTE_UNROLL
    for (int ni = 0; ni < kOCols; ni += 2) {
      float2 const v = make_float2(orc(mi, ni) * o_norm[mi], orc(mi, ni + 1) * o_norm[mi]);
      *reinterpret_cast<float2*>(base + row * kD + int(get<1>(crc(mi, ni)))) = v;
    }
    if (int(get<1>(crc(mi, 0))) == 0) { p.partial_lse[int64_t(w.partial_slot) * kBlockM + row] = lse[mi]; }
  }
}

// max_score[head, n_block, q] = tile_max * sm_scale for the rows a thread holds (one lane per quad writes).
template <class T, class Coord>
__device__ __forceinline__ void store_max_score(typename T::Params const& p, Coord const& coords, WorkItem const& w,
                                                int n_block, float const (&tile_max)[2]) {
  Tensor cr = make_tensor(coords.data(), acc_rowcol(coords.layout()));
  if ((threadIdx.x & 3) != 0) { return; }
  float* dst = p.max_score + int64_t(w.head) * p.max_score_stride_head + int64_t(n_block) * p.max_score_stride_tile;
  CUTE_UNROLL
  for (int mi = 0; mi < 2; ++mi) {
    int const q_row = w.m_block * T::kBlockM + int(get<0>(cr(mi, 0)));
    if (q_row < w.qo_len) { dst[w.q_start + q_row] = tile_max[mi] * p.sm_scale; }
  }
}

// max_score = -inf for the KV tiles [from, max_k_tiles) of this warpgroup's 64 rows (tiles no key of the item
// is visible in, and the padding tiles); written by the piece that starts at KV tile 0.
template <class T>
__device__ __forceinline__ void fill_max_score_tail(typename T::Params const& p, WorkItem const& w, int from, int tid) {
  int const wg = tid / 128, wg_tid = tid % 128;
  int64_t const stride_tile = p.max_score_stride_tile;
  float* dst = p.max_score + int64_t(w.head) * p.max_score_stride_head + w.q_start;
  int const row0 = w.m_block * T::kBlockM + wg * 64;
  int const n_tiles = p.max_k_tiles - from;
  for (int i = wg_tid; i < n_tiles * 64; i += 128) {
    int const q_row = row0 + (i & 63);
    if (q_row < w.qo_len) { dst[int64_t(from + (i >> 6)) * stride_tile + q_row] = -INFINITY; }
  }
}

// Ping-pong token: each barrier pairs the waiting warpgroup (128 threads) with the one handing it the token (128).
constexpr int kPingPongThreads = 2 * 128;
// The warpgroup that takes the token after wg: the partner of two; round robin over three (MSA_FMHA_SM90_MMA_WG=3).
template <class T>
__device__ __forceinline__ int pingpong_next(int wg) {
  if constexpr (T::kNumMmaWarpGroups == 2) {
    return 1 - wg;
  } else {
    return wg == T::kNumMmaWarpGroups - 1 ? 0 : wg + 1;
  }
}

// ------------------------------------------------------------------------------------------------------------
// Consumers: two warpgroups, tid in [0, 256); warpgroup wg owns query rows [64 wg, 64 wg + 64) of each tile.
// ------------------------------------------------------------------------------------------------------------
template <class T>
__device__ void consumer_warpgroups(typename T::Params const& p, typename T::SharedStorage& ss, int tid) {
  using Element = typename T::Element;
  using Softmax = OnlineSoftmax<2, T::kLog2PScale, T::kExp2EmuEvery, T::kRowPipe, T::kLazyMax, T::kPBits>;
  constexpr int kBlockM = T::kBlockM, kBlockN = T::kBlockN;
  using TileQK = typename T::TileQK;
  using TilePV = typename T::TilePV;
  int const wg = tid / 128;

  typename T::TiledMmaQK mma_qk;
  typename T::TiledMmaPV mma_pv;
  auto thr_qk = mma_qk.get_thread_slice(tid);
  auto thr_pv = mma_pv.get_thread_slice(tid);

  Tensor sQ = make_tensor(make_smem_ptr(ss.smem_q), typename T::SmemLayoutQ{});
  Tensor sK = make_tensor(make_smem_ptr(ss.smem_k), typename T::SmemLayoutK{});
  Tensor sVt = make_tensor(make_smem_ptr(ss.smem_v), typename T::SmemLayoutVt{});
  Tensor tSrQ = thr_qk.partition_fragment_A(sQ);   // (MMA, MMA_M, MMA_K) descriptors
  Tensor tSrK = thr_qk.partition_fragment_B(sK);   // (MMA, MMA_N, MMA_K, stage)
  Tensor tOrV = thr_pv.partition_fragment_B(sVt);  // (MMA, MMA_N, MMA_K, stage)
  Tensor tScS = thr_qk.partition_C(make_identity_tensor(select<0, 1>(TileQK{})));  // (row, col) of S values
  // kPBits: the row-sum GEMM's ones tile (written once here) and its B descriptors.
  typename T::TiledMmaRowSum mma_rs;
  auto thr_rs = mma_rs.get_thread_slice(tid);
  Tensor tRSrOnes = thr_rs.partition_fragment_B(make_tensor(make_smem_ptr(ss.smem_ones), typename T::SmemLayoutOnes{}));
  if constexpr (T::kPBits) {
    if constexpr (T::kPvRowSum) {  // rows Dv .. Dv + 7 of every V^T stage (TMA writes only rows 0 .. Dv - 1)
      constexpr int kOnesWords = 8 * kBlockN / 4;
      for (int i = tid; i < T::kStages * kOnesWords; i += T::kNumMmaThreads) {
        uint32_t* stage = reinterpret_cast<uint32_t*>(ss.smem_v + (i / kOnesWords) * T::kVtStageElems);
        stage[T::kHeadDimV * kBlockN / 4 + i % kOnesWords] = 0x38383838u;  // e4m3 1.0
      }
    } else {
      uint32_t* ones = reinterpret_cast<uint32_t*>(ss.smem_ones);
      for (int i = tid; i < int(sizeof(ss.smem_ones) / 4); i += T::kNumMmaThreads) { ones[i] = 0x38383838u; }
    }
    cutlass::arch::fence_view_async_shared();  // generic-proxy stores -> visible to wgmma's async proxy
    named_barrier_sync(kBarVZero, T::kNumMmaThreads);
  }

  // Q starts out free; warpgroup 0 holds the first issue token of the ping-pong.
  named_barrier_arrive(kBarQueryEmpty, T::kNumMmaThreads + 32);
  if (T::kPingPong != 0 && wg == 0) { named_barrier_arrive(kBarSched0, kPingPongThreads); }

  PipeState<T::kStages> rd;
  PipeState<2> sched_rd;
  int q_phase = 0;
  StageRelease<T> const release_stage;

  // The next work item is read from the producer's ring before the current tile's epilogue, so the load of
  // its descriptor overlaps the epilogue instead of stalling the next tile's start.
  auto next_work = [&](int& item, WorkItem& w) { read_work_ring<T>(p, ss, sched_rd, item, w); };
  int item = 0;
  WorkItem w{};
  next_work(item, w);
  Timeline tl;
  ItemTimeline itl;
  int item_no = 0;  // items this warpgroup has processed (timeline build only)
  bool const tl_on = (tid % 128) == 0;

  while (item < p.num_work) {
    itl.start(tl_on, wg, item_no);
    itl.stamp(0);
    itl.value(4, w.n_block_max);
    int next_item = 0;
    // kRegDiet: next_w starts empty (it is only read when next_work loaded it), so no second WorkItem copy is
    // live across the KV loop.
    WorkItem next_w = T::kRegDiet ? WorkItem{} : w;
    if constexpr (T::kSparseQ) {
      if (w.n_block_max < 0) {  // routed to another kernel: nothing to write (the producer loaded nothing either)
        next_work(next_item, next_w);
        item = next_item;
        w = next_w;
        continue;
      }
    }
    Tensor tOrO = partition_fragment_C(mma_pv, select<0, 1>(TilePV{}));
    Tensor tRSacc = partition_fragment_C(mma_rs, Shape<Int<kBlockM>, _8>{});  // kPBits: row sums (cols all equal)
    float o_norm[2], lse[2];
    // Softmax (natural log) and output scales of this item's head: per head in FP8 mode.
    float sm_scale = p.sm_scale, scale_log2 = p.scale_log2, out_scale = p.out_scale;
    if constexpr (T::kFp8) {
      float2 const hs = __ldg(p.head_scales + w.head);
      sm_scale = hs.x;
      scale_log2 = hs.x * 1.4426950408889634f;
      out_scale = hs.y;
    }
    if (w.n_block_max <= 0) {  // no query row of this tile sees a key: O = 0, LSE = -inf
      next_work(next_item, next_w);
      clear(tOrO);
      o_norm[0] = o_norm[1] = 0.f;
      lse[0] = lse[1] = -INFINITY;
      store_tile<T>(p, ss, tOrO, o_norm, lse, w, tid, out_scale);
      if constexpr (T::kMaxScore && !T::kFillWarps) { fill_max_score_tail<T>(p, w, 0, tid); }
      item = next_item;
      w = next_w;
      continue;
    }

    Tensor tSrS = partition_fragment_C(mma_qk, select<0, 1>(TileQK{}));
    Tensor tOrP = [&] {
      if constexpr (T::kFp8) {
        return make_tensor<Element>(Fp8PLayout<kBlockN>{});
      } else {
        return make_tensor<Element>(acc_as_a_operand(tSrS.layout()));
      }
    }();
    auto convert_p = [&] {
      if constexpr (T::kFp8) {
        convert_p_fp8<kBlockN, T::kPBits>(tSrS, tOrP);
      } else {
        convert_fragment(tSrS, tOrP);
      }
    };
    // PV of the converted P (and, kPBits, its row sums) as one commit group, no wait.
    auto issue_pv = [&](int stage) {
      if constexpr (T::kPBits && !T::kPvRowSum) {
        wg_gemm_pv_rowsum(mma_pv, tOrP, tOrV(_, _, _, stage), tOrO, mma_rs, tRSrOnes, tRSacc);
      } else {
        wg_gemm<false, -1>(mma_pv, tOrP, tOrV(_, _, _, stage), tOrO);
      }
    };
    Softmax softmax{{-INFINITY, -INFINITY}, {0.f, 0.f}};
    float o_rescale[2] = {1.f, 1.f};
    float tile_max[2];
    // kPBits, after a PV wait: add that PV's row sums to the fp32 sums (factor: the max change since that PV).
    // kPvRowSum: they are O's columns Dv .. Dv + 7 (every column of a row the same), zeroed for the next PV, which
    // accumulates O on top; otherwise the separate row-sum accumulator (zeroed by its own GEMM).
    auto take_tile_sums = [&](float const (&factor)[2]) {
      if constexpr (T::kPvRowSum) {
        Tensor orc = make_tensor(tOrO.data(), acc_rowcol(tOrO.layout()));
        constexpr int kRsCol = 2 * (T::kHeadDimV / 8);  // rowcol column of the first extra column (pairs x chunks)
        softmax.add_tile_sums({orc(0, kRsCol), orc(1, kRsCol)}, factor);
        CUTE_UNROLL
        for (int mi = 0; mi < 2; ++mi) {
          CUTE_UNROLL
          // x * 0 (finite sums) rather than a plain 0: an accumulator register set by a move (an integer instruction)
          // makes ptxas serialise every wgmma of the kernel (C7511, session 8's lesson).
          for (int c = kRsCol; c < int(size<1>(orc)); ++c) { orc(mi, c) = __fmul_rn(orc(mi, c), 0.f); }
        }
      } else {
        warpgroup_fence_operand(tRSacc);
        Tensor rs = make_tensor(tRSacc.data(), acc_rowcol(tRSacc.layout()));
        softmax.add_tile_sums({rs(0, 0), rs(1, 0)}, factor);
      }
    };

    // Sparse-Q: offsets of this item's block list and of this thread's mask word (both rows' tokens share it: they
    // differ by 8 within a 16-aligned group), the two rows' bit positions (bits 0-4 and 8-12) and the exclusive key
    // limit of the item's first token: a block ending past it needs the causal / length mask.
    int sq_list = 0, sq_word = 0, sq_bits = 0, sq_lim0 = 0;
    if constexpr (T::kSparseQ) {
      int const tpt = p.sq_tokens_per_tile;
      Tensor cr = make_tensor(tScS.data(), acc_rowcol(tScS.layout()));
      int const t0 = int(get<0>(cr(0, 0))) & (tpt - 1), t1 = int(get<0>(cr(1, 0))) & (tpt - 1);
      sq_list = item * p.sq_umax;
      sq_word = sq_list * p.sq_mask_words + (t0 >> 5);
      sq_bits = (t0 & 31) | ((t1 & 31) << 8);
      sq_lim0 = T::kCausal ? min(w.kv_len, w.m_block * tpt + w.qo_offset + 1) : w.kv_len;
    }
    // Tile n of a sparse-Q item: its KV block and the selection bits of this thread's two rows (bit mi: row mi).
    // Pairs: position n is own entry n - sq_off (sq_off = L - own union length; >= L when this CTA has no routed item):
    // the list / mask offsets are shifted by sq_off so the loop's real steps read entry n - sq_off at n at no extra
    // cost; below sq_off are dummy positions (a tile no row selected: sel 0), run by their own steps after the real
    // ones. sq_tile_any (the item's first tile, which may be a dummy) clamps instead.
    int const sq_off = T::kPair ? w.n_block_max - w.item_end : 0;
    if constexpr (T::kPair) {
      sq_list -= sq_off;
      sq_word -= sq_off * p.sq_mask_words;
    }
    auto sq_tile = [&](int n, int& blk, uint32_t& sel) {
      blk = __ldg(p.sq_union + sq_list + n);
      uint32_t const word = uint32_t(__ldg(p.sq_mask + sq_word + n * p.sq_mask_words));
      sel = ((word >> (sq_bits & 31)) & 1u) | (((word >> (sq_bits >> 8)) & 1u) << 1);
    };
    auto sq_tile_any = [&](int n, int& blk, uint32_t& sel) {
      if constexpr (T::kPair) {
        int const e = max(n, sq_off);  // a dummy reads the own row's entry 0 (in bounds) and drops its bits
        sq_tile(e, blk, sel);
        sel = n >= sq_off ? sel : 0u;
      } else {
        sq_tile(n, blk, sel);
      }
    };

    // Paged: a request's last page holds whatever the cache holds past kv_len (possibly NaN / Inf). P is 0 there, but
    // 0 * NaN = NaN in the PV GEMM, so before a PV GEMM reads such a V tile both warpgroups zero its rows past kv_len
    // in shared memory. Only an item's first tile can be partial (tiles run from the highest down, and a sparse-Q
    // union is ascending, so the request's last block comes first), so this runs once, before the KV loop: the loop
    // itself carries no paged-only work (a per-step check cost ~3% in session 5 run 3).
    auto zero_v_tail = [&](int stage, uint32_t phase, int valid) {
      Mbar::wait(&ss.full_v[stage], phase);
      Tensor sV = make_tensor(make_smem_ptr(ss.smem_v), typename T::SmemLayoutVt{});  // (dim, key, stage)
      constexpr int kD = T::kHeadDimV;
      int const n = (kBlockN - valid) * kD;
      for (int i = tid; i < n; i += T::kNumMmaThreads) { sV(i % kD, valid + i / kD, stage) = Element(0); }
      cutlass::arch::fence_view_async_shared();  // generic-proxy stores -> visible to wgmma's async proxy
      named_barrier_sync(kBarVZero, T::kNumMmaThreads);
    };

    Mbar::wait(&ss.bar_q, q_phase);
    q_phase ^= 1;
    itl.stamp(5);

    // Last visible KV tile first (it carries the masks).
    int n = w.n_block_max - 1;
    int blk_first = 0;
    uint32_t sel_first = 0;
    if constexpr (T::kSparseQ) { sq_tile_any(n, blk_first, sel_first); }
    Mbar::wait(&ss.full_k[rd.index], rd.phase);
    itl.stamp(6);
    wg_gemm<true, 0>(mma_qk, tSrQ, tSrK(_, _, _, rd.index), tSrS);
    itl.stamp(7);
    release_stage(&ss.empty_k[rd.index]);
    if constexpr (T::kSparseQ) {
      if ((blk_first + 1) * kBlockN > sq_lim0) {
        apply_mask_sparse<T::kCausal>(tSrS, tScS, w, blk_first, p.sq_tokens_per_tile);
      }
      softmax.template update<true, true, false, true>(tSrS, scale_log2, o_rescale, nullptr, sel_first);
    } else {
      apply_mask<T::kCausal, kBlockM, kBlockN>(tSrS, tScS, w, n);
      softmax.template update<true, true, T::kMaxScore>(tSrS, scale_log2, o_rescale, tile_max);
    }
    if constexpr (T::kMaxScore) { store_max_score<T>(p, tScS, w, n, tile_max); }
    convert_p();
    clear(tOrO);
    if constexpr (T::kPaged) {  // the first tile's V (the first PV GEMM reads it): zero its rows past kv_len
      int const valid = w.kv_len - (T::kSparseQ ? blk_first : n) * kBlockN;
      if (valid < kBlockN) { zero_v_tail(rd.index, rd.phase, max(valid, 0)); }
    }

    itl.stamp(1);
    // Tiles n >= n_mask_min need a mask: the ragged key end, and (causal) every tile reaching past the
    // diagonal of the tile's first query row.
    int n_mask_min = w.kv_len / kBlockN;
    if constexpr (T::kCausal) {
      n_mask_min = min(n_mask_min, max(0, floor_div(w.m_block * kBlockM + w.qo_offset + 1, kBlockN)));
    }

    int tl_step = 0;
    // dummy (pairs): a padding position of this CTA -- no block of its own, nothing selected.
    auto step = [&](int n_block, auto masked, auto dummy) {
      constexpr bool kMasked = decltype(masked)::value;
      tl.start(tl_on && !kMasked, wg, item_no, kMasked ? kTlSteps : tl_step++);  // unmasked steps only
      tl.stamp(0);  // step start
      PipeState<T::kStages> const rd_v = rd;  // V of the previous (higher) tile
      rd.advance();                           // K of this tile
      int sq_blk = 0;
      uint32_t sq_sel = 0;
      if constexpr (T::kSparseQ && !decltype(dummy)::value) {
        sq_tile(n_block, sq_blk, sq_sel);  // L1-resident; needed after the QK^T
      }
      Mbar::wait(&ss.full_k[rd.index], rd.phase);
      tl.stamp(1);  // K(n) landed
      if constexpr (T::kPingPong == 1 || T::kPingPong == 2) { named_barrier_sync(kBarSched0 + wg, kPingPongThreads); }
      tl.stamp(2);  // issue token held
      wg_gemm<true, -1>(mma_qk, tSrQ, tSrK(_, _, _, rd.index), tSrS);
      if constexpr (T::kPingPong == 2) { named_barrier_arrive(kBarSched0 + pingpong_next<T>(wg), kPingPongThreads); }
      Mbar::wait(&ss.full_v[rd_v.index], rd_v.phase);
      issue_pv(rd_v.index);
      if constexpr (T::kPingPong == 1) { named_barrier_arrive(kBarSched0 + pingpong_next<T>(wg), kPingPongThreads); }
      tl.stamp(3);  // both GEMMs issued
      warpgroup_wait<1>();  // S of this tile is ready; PV still running
      // kPingPong 3: the token orders the two warpgroups' exp2 phases instead of their GEMM issue (both share each
      // sub-partition's MUFU unit; with short fp8 GEMMs the two softmaxes otherwise run at the same time).
      float step_scale_log2 = scale_log2;
      if constexpr (T::kPingPong == 3) {
        named_barrier_sync(kBarSched0 + wg, kPingPongThreads);
        // A register-only MUFU phase could be scheduled above the barrier: route the scale through an asm
        // statement after it, so every exp2 argument depends on the token.
        asm volatile("mov.b32 %0, %0;" : "+f"(step_scale_log2));
      }
      tl.stamp(4);  // S ready
      warpgroup_fence_operand(tSrS);
      release_stage(&ss.empty_k[rd.index]);
      if constexpr (T::kSparseQ) {
        if ((sq_blk + 1) * kBlockN > sq_lim0) {
          apply_mask_sparse<T::kCausal>(tSrS, tScS, w, sq_blk, p.sq_tokens_per_tile);
        }
        softmax.template update<false, true, false, true>(tSrS, step_scale_log2, o_rescale, nullptr, sq_sel);
      } else {
        if constexpr (kMasked) { apply_mask<T::kCausal, kBlockM, kBlockN>(tSrS, tScS, w, n_block); }
        softmax.template update<false, kMasked, T::kMaxScore>(tSrS, step_scale_log2, o_rescale, tile_max);
      }
      if constexpr (T::kMaxScore) { store_max_score<T>(p, tScS, w, n_block, tile_max); }
      // ptxas hoists a bare wgmma wait above independent ALU work, which would serialise this softmax
      // behind the warpgroup's own PV GEMM. A shared-memory store of the row sums (which depend on every
      // exp2) right before the wait keeps the exp2s ahead of it.
      if constexpr (T::kPBits) {  // the last code of each row (row sums are not kept in registers)
        pin_before_wait(&ss.pin_scratch[tid], tSrS(size(tSrS) - 1) + tSrS(size(tSrS) / 2 - 1));
      } else {
        pin_before_wait(&ss.pin_scratch[tid], softmax.row_sum[0] + softmax.row_sum[1]);
      }
      // The row-sum store above depends on every exp2, so the partner's token follows the last MUFU.
      if constexpr (T::kPingPong == 3) { named_barrier_arrive(kBarSched0 + pingpong_next<T>(wg), kPingPongThreads); }
      tl.stamp(5);  // softmax done (row sums stored)
      warpgroup_wait<0>();
      tl.stamp(6);  // PV done
      warpgroup_fence_operand(tOrO);
      if constexpr (T::kPBits) { take_tile_sums(o_rescale); }  // the previous tile's, under the max before this step
      release_stage(&ss.empty_v[rd_v.index]);
      convert_p();
      // Once a row's max has settled the factor is exactly 1 (exp2(0)); most tiles then skip the 64 FMULs.
      if (__any_sync(0xffffffff, o_rescale[0] != 1.f || o_rescale[1] != 1.f)) { rescale_rows(tOrO, o_rescale); }
      tl.stamp(7);  // P converted, O rescaled
    };

    // A split-KV piece covers [n_block_min, n_block_max) only.
    int const n_min = w.n_block_min;
    int const n_mask_lo = max(n_mask_min, n_min);
    --n;
    if constexpr (T::kSparseQ) {  // one step kind: the mask is a per-block runtime choice, row selection always
      int const n_real = T::kPair ? max(sq_off, 0) : 0;
      CUTE_NO_UNROLL
      for (; n >= n_real; --n) { step(n, cute::false_type{}, cute::false_type{}); }
      if constexpr (T::kPair) {  // padding positions (this CTA's union is shorter than its peer's)
        CUTE_NO_UNROLL
        for (; n >= 0; --n) { step(n, cute::false_type{}, cute::true_type{}); }
      }
    } else {
      CUTE_NO_UNROLL
      for (; n >= n_mask_lo; --n) { step(n, cute::true_type{}, cute::false_type{}); }
      CUTE_NO_UNROLL
      for (; n >= n_min; --n) { step(n, cute::false_type{}, cute::false_type{}); }
    }

    itl.stamp(2);
    // Every QK^T of this tile has completed: the producer may load the next Q.
    named_barrier_arrive(kBarQueryEmpty, T::kNumMmaThreads + 32);
    // kRegDiet: the epilogue re-reads the item (48 B, L1/L2-resident) instead of keeping its fields in registers
    // through the KV loop, which only needs kv_len / m_block / qo_offset (masked steps).
    if constexpr (T::kRegDiet) {
      int const own_u = w.item_end;  // pairs: the own union length (the work row's field is unused in sparse-Q)
      w = load_item<T>(p, item);
      if constexpr (T::kPair) { w.item_end = own_u; }
    }

    Mbar::wait(&ss.full_v[rd.index], rd.phase);
    itl.stamp(8);
    issue_pv(rd.index);
    next_work(next_item, next_w);
    if constexpr (!T::kPBits) { softmax.finalize(sm_scale, o_norm, lse); }
    warpgroup_wait<0>();
    itl.stamp(9);
    warpgroup_fence_operand(tOrO);
    if constexpr (T::kPBits) {
      float const one[2] = {1.f, 1.f};
      take_tile_sums(one);
      softmax.finalize(sm_scale, o_norm, lse);
    }
    itl.stamp(10);
    release_stage(&ss.empty_v[rd.index]);
    rd.advance();

    if (T::kPair && w.item_end < 0) {
      // pairs: this CTA walked its peer's positions without an item of its own (none, or not routed here)
    } else if (w.partial_slot >= 0) {
      store_partial<T>(p, tOrO, o_norm, lse, w, tid);
    } else {
      store_tile<T>(p, ss, tOrO, o_norm, lse, w, tid, out_scale);
    }
    if constexpr (T::kMaxScore && !T::kFillWarps) {
      if (w.n_block_min == 0) { fill_max_score_tail<T>(p, w, w.item_end, tid); }
    }
    itl.stamp(3);
    item = next_item;
    w = next_w;
    ++item_no;
  }
}

// Fill warps (kFillWarps): warps 1-3 of the producer warpgroup follow the work-index ring like the consumers and
// write max_score = -inf for each item's tiles past its last visible one (all tiles when it sees no key).
// ftid in [0, 96). Disjoint from what the consumers write (tiles below item_end).
template <class T>
__device__ void fill_warps(typename T::Params const& p, typename T::SharedStorage& ss, int ftid) {
  constexpr int kBlockM = T::kBlockM;
  PipeState<2> sched_rd;
  while (true) {
    int item = 0;
    WorkItem w{};
    read_work_ring<T>(p, ss, sched_rd, item, w);
    if (item >= p.num_work) { break; }
    int const from = w.n_block_max <= 0 ? 0 : (w.n_block_min == 0 ? w.item_end : p.max_k_tiles);
    int const row0 = w.m_block * kBlockM;
    int const rows = min(kBlockM, w.qo_len - row0);
    float* dst = p.max_score + int64_t(w.head) * p.max_score_stride_head + w.q_start + row0;
    int const n = (p.max_k_tiles - from) * kBlockM;
    for (int i = ftid; i < n; i += 96) {
      int const r = i % kBlockM;
      if (r < rows) { dst[int64_t(from + i / kBlockM) * p.max_score_stride_tile + r] = -INFINITY; }
    }
  }
}

// ------------------------------------------------------------------------------------------------------------
// Score-only consumers (kModeMaxScore, the MSA index pass): QK^T, mask, row max per KV tile -> max_score. No V,
// no softmax, no PV GEMM. The two warpgroups run unsynchronised, so one's row maxima hide under the other's GEMM.
// ------------------------------------------------------------------------------------------------------------
template <class T>
__device__ void consumer_score_only(typename T::Params const& p, typename T::SharedStorage& ss, int tid) {
  constexpr int kBlockM = T::kBlockM, kBlockN = T::kBlockN;
  using TileQK = typename T::TileQK;
  typename T::TiledMmaQK mma_qk;
  auto thr_qk = mma_qk.get_thread_slice(tid);
  Tensor sQ = make_tensor(make_smem_ptr(ss.smem_q), typename T::SmemLayoutQ{});
  Tensor sK = make_tensor(make_smem_ptr(ss.smem_k), typename T::SmemLayoutK{});
  Tensor tSrQ = thr_qk.partition_fragment_A(sQ);
  Tensor tSrK = thr_qk.partition_fragment_B(sK);
  Tensor tScS = thr_qk.partition_C(make_identity_tensor(select<0, 1>(TileQK{})));

  named_barrier_arrive(kBarQueryEmpty, T::kNumMmaThreads + 32);
  PipeState<T::kStages> rd;
  PipeState<2> sched_rd;
  int q_phase = 0;
  auto next_work = [&](int& item, WorkItem& w) { read_work_ring<T>(p, ss, sched_rd, item, w); };
  int item = 0;
  WorkItem w{};
  next_work(item, w);
  while (item < p.num_work) {
    int next_item = 0;
    WorkItem next_w = w;
    if (w.n_block_max <= 0) {
      next_work(next_item, next_w);
      if constexpr (!T::kFillWarps) { fill_max_score_tail<T>(p, w, 0, tid); }
      item = next_item;
      w = next_w;
      continue;
    }
    Tensor tSrS = partition_fragment_C(mma_qk, select<0, 1>(TileQK{}));
    float tile_max[2];
    Mbar::wait(&ss.bar_q, q_phase);
    q_phase ^= 1;
    int n_mask_min = w.kv_len / kBlockN;
    if constexpr (T::kCausal) {
      n_mask_min = min(n_mask_min, max(0, floor_div(w.m_block * kBlockM + w.qo_offset + 1, kBlockN)));
    }
    CUTE_NO_UNROLL
    for (int n = w.n_block_max - 1; n >= w.n_block_min; --n) {
      Mbar::wait(&ss.full_k[rd.index], rd.phase);
      wg_gemm<true, 0>(mma_qk, tSrQ, tSrK(_, _, _, rd.index), tSrS);
      Mbar::arrive(&ss.empty_k[rd.index]);
      rd.advance();
      if (n >= n_mask_min) { apply_mask<T::kCausal, kBlockM, kBlockN>(tSrS, tScS, w, n); }
      tile_row_max(tSrS, tile_max);
      store_max_score<T>(p, tScS, w, n, tile_max);
    }
    named_barrier_arrive(kBarQueryEmpty, T::kNumMmaThreads + 32);
    next_work(next_item, next_w);
    if constexpr (!T::kFillWarps) {
      if (w.n_block_min == 0) { fill_max_score_tail<T>(p, w, w.item_end, tid); }
    }
    item = next_item;
    w = next_w;
  }
}

// ------------------------------------------------------------------------------------------------------------
// Split-KV combine: out = sum_i exp(lse_i - m) O_i / sum_i exp(lse_i - m), lse = m + log(sum). One warp per query
// row, each lane 4 dims per 128; grid (split items, kBlockM / kCombineRows).
// ------------------------------------------------------------------------------------------------------------
constexpr int kCombineRows = 16;  // rows per CTA (4 warps x 4 rows)

template <class T>
__global__ void __launch_bounds__(128) fmha_sm90_combine_kernel(CUTE_GRID_CONSTANT typename T::CombineParams const p) {
  using Element = typename T::ElementOut;
  constexpr int kD = T::kHeadDimV, kBlockM = T::kBlockM;
  CombineItem const c = p.items[blockIdx.x];
  float const out_scale = T::kFp8 ? p.head_scales[c.head].y : p.out_scale;
  int const lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  for (int r = blockIdx.y * kCombineRows + warp; r < (blockIdx.y + 1) * kCombineRows; r += 4) {
    int const q_row = c.m_block * kBlockM + r;
    if (q_row >= c.qo_len) { break; }
    float m = -INFINITY;
    for (int i = 0; i < c.num_slots; ++i) { m = fmaxf(m, p.partial_lse[int64_t(c.first_slot + i) * kBlockM + r]); }
    float sum = 0.f;
    // Lane l holds dims 128 j + 4 l .. + 3 of chunk j (head dims that are a multiple of 64: lanes past the end of a
    // 64-dim tail chunk idle).
    constexpr int kChunks = (kD + 127) / 128;
    auto in_dims = [&](int j) { return kD % 128 == 0 || j * 128 + lane * 4 < kD; };
    float4 acc[kChunks];
    CUTE_UNROLL
    for (int j = 0; j < kChunks; ++j) { acc[j] = make_float4(0.f, 0.f, 0.f, 0.f); }
    if (m != -INFINITY) {
      for (int i = 0; i < c.num_slots; ++i) {
        int64_t const slot = c.first_slot + i;
        float const wgt = __expf(p.partial_lse[slot * kBlockM + r] - m);
        sum += wgt;
        float const* src = p.partial_o + (slot * kBlockM + r) * kD;
        CUTE_UNROLL
        for (int j = 0; j < kChunks; ++j) {
          if (!in_dims(j)) { continue; }
          float4 const o = *reinterpret_cast<float4 const*>(src + j * 128 + lane * 4);
          acc[j].x += wgt * o.x;
          acc[j].y += wgt * o.y;
          acc[j].z += wgt * o.z;
          acc[j].w += wgt * o.w;
        }
      }
    }
    float const f = sum > 0.f ? out_scale / sum : 0.f;
    Element* dst = p.out + int64_t(c.q_start + q_row) * p.out_stride_token + int64_t(c.head) * p.out_stride_head;
    CUTE_UNROLL
    for (int j = 0; j < kChunks; ++j) {
      if (!in_dims(j)) { continue; }
      cutlass::Array<Element, 4> v;
      v[0] = Element(acc[j].x * f);
      v[1] = Element(acc[j].y * f);
      v[2] = Element(acc[j].z * f);
      v[3] = Element(acc[j].w * f);
      *reinterpret_cast<cutlass::Array<Element, 4>*>(dst + j * 128 + lane * 4) = v;
    }
    if (p.lse != nullptr && lane == 0) {
      p.lse[int64_t(c.q_start + q_row) * p.lse_stride_token + c.head] = sum > 0.f ? m + __logf(sum) : -INFINITY;
    }
  }
}

// ------------------------------------------------------------------------------------------------------------
// FP8 V pre-pass: vt[head, d, kBlockN * tile + 16 g + l] = v[src + 16 g + perm(l), head, d] for l in [0, 16), zero
// past the tile's valid tokens, with perm(l) = 8 * ((l % 4) / 2) + 2 * (l / 4) + l % 2 (the key order in which
// convert_p_fp8 leaves P). One CTA of 256 threads per (tile, KV head): the tile's kBlockN x D bytes are staged in
// shared memory by 16-byte rows; then thread (g, d4) reads 4-byte words (4 dims) of the 16 keys of group g, transposes
// them with byte permutes and writes 4 dims x 16 bytes.
// Layout choices (H200, session 13 runs 2-3: B2 H32 S8K 70 -> 33 us = 3.9 TB/s; it was 6% of the fp8 causal call):
//   * consecutive threads take consecutive key groups g of the same 4 dims, so a warp's store covers whole 128-byte
//     lines of 4 V^T rows (the first version had each lane write 16 bytes of a different row: 32 lines per store);
//   * staged word w of key k sits at column w ^ (4 (k / 16) mod kWordsPerRow) (an XOR of whole 16-byte chunks), so the
//     32 lanes' word reads (8 groups x 4 dims for one key offset) fall in 32 distinct banks.
// ------------------------------------------------------------------------------------------------------------
template <class T>
__global__ void __launch_bounds__(256) fmha_sm90_vt_kernel(CUTE_GRID_CONSTANT typename T::VtParams const p) {
  constexpr int kD = T::kHeadDim, kBlockN = T::kBlockN;
  constexpr int kWordsPerRow = kD / 4, kGroups = kBlockN / 16;
  static_assert(kBlockN % 16 == 0, "whole 16-key groups per tile");
  static_assert(kWordsPerRow % 4 == 0 && (kWordsPerRow & (kWordsPerRow - 1)) == 0, "power-of-two rows of chunks");
  __shared__ alignas(16) uint32_t tile[kBlockN * kWordsPerRow];
  auto swz = [](int key) { return (4 * (key >> 4)) & (kWordsPerRow - 4); };  // XOR on whole 16-byte chunks
  // Programmatic dependent launch: the attention kernel (launched with programmatic stream serialisation) may start
  // its CTAs as this grid drains; it waits for this grid's results (griddepcontrol.wait) before its first V^T load.
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
  int2 const t = p.tiles[blockIdx.x];
  if (t.y < 0) { return; }  // a tile no item reads this call (sparse-Q marks them; its V^T slot is never read)
  int const head = blockIdx.y;
  uint8_t const* src = p.v + int64_t(t.x) * p.v_stride_token + int64_t(head) * p.v_stride_head;
  constexpr int kVecPerRow = kD / 16;
  CUTE_UNROLL
  for (int i = threadIdx.x; i < kBlockN * kVecPerRow; i += 256) {
    int const row = i / kVecPerRow, c = i % kVecPerRow;
    uint4 v = make_uint4(0, 0, 0, 0);
    if (row < t.y) { v = __ldg(reinterpret_cast<uint4 const*>(src + int64_t(row) * p.v_stride_token) + c); }
    *reinterpret_cast<uint4*>(tile + row * kWordsPerRow + ((4 * c) ^ swz(row))) = v;
  }
  __syncthreads();
  uint8_t* dst_tile = p.vt + int64_t(head) * kD * p.vt_len + int64_t(blockIdx.x) * kBlockN;
  CUTE_UNROLL
  for (int i = threadIdx.x; i < kWordsPerRow * kGroups; i += 256) {
    int const g = i % kGroups, d4 = i / kGroups;
    // Word d4 of key 16 g + k: all 16 keys of the group share the swizzle (k < 16).
    uint32_t const* w = tile + g * 16 * kWordsPerRow + (d4 ^ swz(16 * g));
    uint32_t out[4][4];  // [dim byte][output word]
    CUTE_UNROLL
    for (int j = 0; j < 4; ++j) {
      // Output word j of a dim row holds keys 2j, 2j+1, 8+2j, 9+2j of the group, in that byte order.
      uint32_t const a = w[(2 * j) * kWordsPerRow], b = w[(2 * j + 1) * kWordsPerRow];
      uint32_t const c = w[(8 + 2 * j) * kWordsPerRow], d = w[(9 + 2 * j) * kWordsPerRow];
      uint32_t const ab_lo = __byte_perm(a, b, 0x5140), ab_hi = __byte_perm(a, b, 0x7362);
      uint32_t const cd_lo = __byte_perm(c, d, 0x5140), cd_hi = __byte_perm(c, d, 0x7362);
      out[0][j] = __byte_perm(ab_lo, cd_lo, 0x5410);
      out[1][j] = __byte_perm(ab_lo, cd_lo, 0x7632);
      out[2][j] = __byte_perm(ab_hi, cd_hi, 0x5410);
      out[3][j] = __byte_perm(ab_hi, cd_hi, 0x7632);
    }
    CUTE_UNROLL
    for (int b = 0; b < 4; ++b) {
      *reinterpret_cast<uint4*>(dst_tile + int64_t(4 * d4 + b) * p.vt_len + 16 * g) =
          make_uint4(out[b][0], out[b][1], out[b][2], out[b][3]);
    }
  }
}

template <class T>
__global__ void __launch_bounds__(T::kNumThreads, 1) fmha_sm90_kernel(CUTE_GRID_CONSTANT typename T::Params const p) {
#if defined(__CUDA_ARCH__) && !defined(__CUDA_ARCH_FEAT_SM90_ALL)
  // Built for another architecture (e.g. sm_100a): this kernel uses sm_90a-only instructions.
  if (threadIdx.x == 0 && blockIdx.x == 0) { printf("msa fmha_sm90: kernel needs an sm_90a device\n"); }
  __trap();
#else
  extern __shared__ char smem_raw[];
  uintptr_t const base = reinterpret_cast<uintptr_t>(smem_raw);
  auto& ss = *reinterpret_cast<typename T::SharedStorage*>((base + 1023) & ~uintptr_t(1023));

  int const warp = __shfl_sync(0xffffffff, int(threadIdx.x) / 32, 0);
  // A stage's empty barrier: every consumer thread arrives, or (pairs) one lane per consumer warp of each CTA.
  constexpr int kEmptyCount = T::kPair ? 2 * (T::kNumMmaThreads / 32) : T::kNumMmaThreads;
  if (threadIdx.x == 0) {
    cute::prefetch_tma_descriptor(p.tma_q.get_tma_descriptor());
    if constexpr (T::kSparseQ) { cute::prefetch_tma_descriptor(&p.tma_q_packed); }
    if constexpr (T::kPaged) {
      cute::prefetch_tma_descriptor(&p.tma_k_page);
      cute::prefetch_tma_descriptor(&p.tma_v_page);
    } else {
      cute::prefetch_tma_descriptor(p.tma_k.get_tma_descriptor());
      cute::prefetch_tma_descriptor(p.tma_v.get_tma_descriptor());
    }
    Mbar::init(&ss.bar_q, 1);
    CUTE_UNROLL
    for (int s = 0; s < T::kStages; ++s) {
      Mbar::init(&ss.full_k[s], 1);
      Mbar::init(&ss.full_v[s], 1);
      Mbar::init(&ss.empty_k[s], kEmptyCount);
      Mbar::init(&ss.empty_v[s], kEmptyCount);
    }
    CUTE_UNROLL
    for (int s = 0; s < 2; ++s) {
      Mbar::init(&ss.sched_full[s], 1);
      Mbar::init(&ss.sched_empty[s], T::kNumMmaThreads + (T::kFillWarps ? 96 : 0));
    }
    cutlass::arch::fence_barrier_init();
  }
  if constexpr (T::kPair) {
    cute::cluster_sync();  // the peer multicasts into / arrives on this CTA's barriers only once they exist
  } else {
    __syncthreads();
  }

  if (warp < 4) {
    cutlass::arch::warpgroup_reg_dealloc<T::kProducerRegs>();
    if (warp == 0) {
      producer_warp<T>(p, ss);
    } else if constexpr (T::kFillWarps) {
      fill_warps<T>(p, ss, int(threadIdx.x) - 32);
    }
  } else {
    cutlass::arch::warpgroup_reg_alloc<T::kMmaRegs>();
    if constexpr (T::kOutputO) {
      consumer_warpgroups<T>(p, ss, int(threadIdx.x) - 128);
    } else {
      consumer_score_only<T>(p, ss, int(threadIdx.x) - 128);
    }
  }
  // Pairs: neither CTA exits while its peer may still multicast into it or arrive on its barriers.
  if constexpr (T::kPair) { cute::cluster_sync(); }
#endif
}

}  // namespace msa_fmha_sm90
