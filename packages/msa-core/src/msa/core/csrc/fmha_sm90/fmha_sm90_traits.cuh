// Compile-time configuration of the SM90 dense FMHA forward: tile shapes, MMA atoms, shared-memory layouts,
// TMA copy types and the kernel parameter block. Device code lives in fmha_sm90_kernel.cuh.
#pragma once

#include <cstdint>

#include <cute/tensor.hpp>
#include <cute/atom/mma_atom.hpp>
#include <cute/atom/copy_atom.hpp>
#include <cute/arch/copy_sm90_tma.hpp>
#include <cute/atom/copy_traits_sm90_tma.hpp>
#include <cute/atom/mma_traits_sm90_gmma.hpp>
#include <cutlass/numeric_types.h>

namespace msa_fmha_sm90 {

using namespace cute;

// One unit of work = one 128-row query tile of one query head over the KV tiles [n_block_min, n_block_max).
// The host plan (kernels/fmha_sm90.py) writes these as int32[num_work, 12], longest first, in exactly this field
// order. An item that covers all its visible KV tiles has partial_slot = -1 and writes out / lse itself; a piece of
// a split item (split-KV: the last wave's tail, decode-shaped work) writes its normalised fp32 O and its LSE to
// partial slot partial_slot, and the combine kernel merges the pieces (see CombineItem).
struct WorkItem {
  int q_start;      // first token of the request in q / out / lse
  int qo_len;       // query tokens of the request
  int kv_start;     // ragged: first token of the request in k / v; paged: first slot in kv_indices
  int kv_len;       // key tokens of the request
  int m_block;      // which 128-row tile of the request's queries
  int head;         // query head
  int qo_offset;    // causal: query i sees keys j <= i + qo_offset
  int n_block_max;  // KV tiles [0, n_block_max) hold visible keys; 0 means the whole tile sees nothing
  int n_block_min;  // first KV tile of this item's range (0 unless the item is a split-KV piece)
  int partial_slot;  // -1: write out / lse; >= 0: write partial O / LSE to this workspace slot
  int item_end;      // the whole item's n_block_max (max_score: the piece with n_block_min 0 writes -inf beyond it)
  int reserved;
};
static_assert(sizeof(WorkItem) == 48, "WorkItem must match the host's int32[12] rows");

// One split item for the combine kernel: its pieces wrote slots [first_slot, first_slot + num_slots).
struct CombineItem {
  int q_start;
  int qo_len;
  int m_block;
  int head;
  int first_slot;
  int num_slots;
  int reserved0;
  int reserved1;
};
static_assert(sizeof(CombineItem) == 32, "CombineItem must match the host's int32[8] rows");

// What one launch computes. kModeO: O (+ LSE). kModeOMaxScore: O and max_score. kModeMaxScore: max_score only
// (no V loads, no softmax, no PV GEMM: the MSA index pass). kModeSparseQ: MSA sparse prefill, Q-outer -- an item
// is T = 128 / G consecutive query tokens x the G query heads of one KV head (query rows packed as row =
// g * T + t), run over the union of its tokens' selected KV blocks (device-built list, one block = one 128-key
// tile); a row whose token did not select a block gets no weight from it (per-token bit masks). O (+ LSE) only.
// kModeSparseQPair: sparse-Q with neighbouring items (token tiles 2j, 2j + 1 of one KV head) on a 2-CTA cluster that
// walks their unions in lockstep; when the two unions are equal, each K / V tile is read from L2 once for both CTAs
// (TMA multicast by CTA n % 2) -- half the L2 -> SM traffic. Results are bit-identical to kModeSparseQ's.
enum FmhaMode : int { kModeO = 0, kModeOMaxScore = 1, kModeMaxScore = 2, kModeSparseQ = 3, kModeSparseQPair = 4 };

// Named hardware barriers (0 is __syncthreads).
enum NamedBarrier : uint32_t {
  kBarQueryEmpty = 1,  // consumers -> producer warp: smem Q may be overwritten
  kBarSched0 = 2,      // ping-pong token of consumer warpgroup 0 (kBarSched0 + 1 for warpgroup 1)
  kBarEpilogue0 = 4,   // per-consumer-warpgroup epilogue barrier (kBarEpilogue0 + wg)
  kBarVZero = 6,       // paged: both consumer warpgroups have zeroed their share of a V tile's rows past kv_len
  // Three consumer warpgroups (MSA_FMHA_SM90_MMA_WG=3): ping-pong tokens 2-4, epilogue barriers 5-7 (traits
  // kBarEpilogueBase); such modules are ragged (no kBarVZero). Two warpgroups keep the ids above.
};

// Element_: bf16 / fp16, or cutlass::float_e4m3_t (FP8 mode: bf16 output, per-head scales, ragged O-only; V is
// read from a transposed, token-permuted copy made by fmha_sm90_vt_kernel, see kFp8 below).
// kHeadDim_ is the Q / K head dim (Dqk), kHeadDimV_ V's and O's (Dv; default Dqk, may differ in 16-bit mode O).
template <class Element_, int kHeadDim_, bool kCausal_, bool kPaged_, int kMode_ = kModeO, int kHeadDimV_ = kHeadDim_>
struct FmhaTraits {
  using Element = Element_;
  // FP8 e4m3: wgmma reads both operands K-major, so V (token-major in memory) must be transposed to [dim, token]
  // for the PV GEMM's B operand (done by a pre-pass, see fmha_sm90_vt_kernel). Output is bf16.
  static constexpr bool kFp8 = sizeof(Element_) == 1;
  using ElementOut = std::conditional_t<kFp8, cutlass::bfloat16_t, Element_>;
  // P = exp2(x - max + kLog2PScale) <= 2^kLog2PScale before its e4m3 conversion: scaled up so small
  // probabilities stay out of e4m3's subnormal range, and <= 256 < 448 (e4m3's largest finite value) by
  // construction -- the row max used is the running max including the current tile, so no P exceeds it.
  // The row sum carries the same factor, so the normalisation cancels it; only the LSE subtracts it.
  static constexpr int kLog2PScale = kFp8 ? 8 : 0;
  static constexpr int kMode = kMode_;
  static constexpr bool kOutputO = kMode_ != kModeMaxScore;
  static constexpr bool kMaxScore = kMode_ == kModeOMaxScore || kMode_ == kModeMaxScore;
  static constexpr bool kSparseQ = kMode_ == kModeSparseQ || kMode_ == kModeSparseQPair;
  static constexpr bool kPair = kMode_ == kModeSparseQPair;  // 2-CTA clusters sharing K / V tiles (see FmhaMode)
#if defined(MSA_FMHA_SM90_NO_FILL_WARPS)
  // A/B alternative: the consumers write max_score's -inf tail tiles after each item's last PV.
  static constexpr bool kFillWarps = false;
#else
  // Default (H100, session 2 A/B, same process): the producer warpgroup's three idle warps write max_score's
  // -inf tail tiles, off the consumers' critical path. O + max_score / O-only: B2 H32 S8K causal 1.107 -> 1.075,
  // GQA S16K 1.085 -> 1.063, S32K 1.065 -> 1.073, others within 0.5%; score-only 0.48-0.52 either way.
  // O-only modules are unaffected (kMaxScore false).
  static constexpr bool kFillWarps = kMaxScore;
#endif
  static constexpr int kHeadDim = kHeadDim_;    // Dqk
  static constexpr int kHeadDimV = kHeadDimV_;  // Dv
  static constexpr int kHeadDimMax = kHeadDim_ > kHeadDimV_ ? kHeadDim_ : kHeadDimV_;
  static constexpr bool kCausal = kCausal_;
  static constexpr bool kPaged = kPaged_;
  // fp8 P from its code (the default fp8 softmax of modes O / sparse-Q; jit param fp8_p = "code", which defines
  // MSA_FMHA_SM90_P_BITS; fp8_p = "exp2" is the exact one): P's e4m3 bits come from two FFMAs per score instead of
  // MUFU.EX2 + cvt. The e4m3 code 8 E + M of 2^t is taken linear in t (u = 8 t + 56: the mantissa 1 + M / 8 read as
  // 2^(M / 8), <= 8.6% off, +-4.2% after centring), clamped to [0, 126] by FFMA.SAT and rounded by the 1.5 * 2^23
  // add, whose low mantissa byte is then the code. The row sums of the P actually used come from the tensor core (P x
  // a ones tile, m64n8 per k32 slice, in the PV commit group; a fresh accumulator per tile added to an fp32 sum), so
  // O's normalisation matches its numerator. No FADD / MUFU / F2FP per score is left in the softmax. H200, session 12
  // runs 1-7 / F: B2 H32 S8K 1.23x -> 1.52x our bf16 (non-causal, 128-key tiles), 1.14x -> 1.45x (causal); O rel. L2
  // within ~1.2x of the exact path's; the LSE is that of the P used (within 0.13 of the exact one, measured <= 0.04).
#if defined(MSA_FMHA_SM90_P_BITS)
  static constexpr bool kPBits = kFp8 && (kMode_ == kModeO || kSparseQ);
#else
  static constexpr bool kPBits = false;
#endif

  // Consumer warpgroups (64 query rows each). 2 by default; MSA_FMHA_SM90_MMA_WG=3 (A/B builds of ragged mode-O
  // modules): three 64-row warpgroups per 192-row tile, three softmax chains per SM sub-partition instead of two.
  // Registers then allow <= 160 per consumer thread, so the KV tile shrinks to 64 / 96 keys (O 64 + S 32 / 48 + P 8 /
  // 12 + ~30 others). Measured no faster on the H200 (session 11 runs 1-2: fp8 1.10-1.21x our bf16 vs the default's
  // 1.23x, with or without a round-robin token; bf16 0.91x): kept as an A/B switch only.
#if defined(MSA_FMHA_SM90_MMA_WG)
  static constexpr int kNumMmaWarpGroups = (kMode_ == kModeO && !kPaged_) ? MSA_FMHA_SM90_MMA_WG : 2;
#else
  static constexpr int kNumMmaWarpGroups = 2;
#endif
  static_assert(kNumMmaWarpGroups == 2 || kNumMmaWarpGroups == 3, "MSA_FMHA_SM90_MMA_WG: 2 or 3");
  static constexpr int kBlockM = 64 * kNumMmaWarpGroups;  // query rows per CTA tile (64 per consumer warpgroup)
  // Keys per KV tile: 128, or 64 at head dim 256 (Q 64 KiB + two stages of 64 x 256 K and V = 192 KiB of shared
  // memory, and a 64 x 256 fp32 O accumulator per warpgroup leaves registers for only a 64-key S tile). Paged K/V of
  // any page size fill a tile from one or more pages (see Params::page_size). MSA_FMHA_SM90_BLOCK_N (A/B builds,
  // issue 6/7) widens the tile of ragged O-mode modules only; max_score keeps 128-key tiles (API contract).
  // A wider tile spreads each step's fixed latency (ping-pong barrier, QK^T completion, row-max shuffles, vote,
  // P conversion start) over more keys; FA3 uses 128 x 176 for bf16 d128 non-causal and 128 x 224 for fp8 d128.
  // The host plan takes the tile size from the module (block_n()), so a plan always matches its module.
#if defined(MSA_FMHA_SM90_BLOCK_N)
  static constexpr int kBlockN = (kPaged_ || kMode_ != kModeO) ? 128 : MSA_FMHA_SM90_BLOCK_N;
#else
  // fp8 non-causal O: 192-key tiles (with kRegDiet and no ping-pong barrier, below). H100, session 6 runs 1-2,
  // B2 H32 S8K d128, interleaved: 1.13x -> 1.21x our bf16 (128 -> 192 keys alone 1.12x: L1 spills in the loop
  // without kRegDiet; 224 keys 1.19x; 160 keys 1.15x). Causal keeps 128 (192: 1.147x vs 1.143x, no gain).
  // fp8 P from its code (kPBits) runs fastest at 128 keys with the ping-pong barrier (session 12 run 2: 1.465x vs
  // 1.303x at 192); the 192-key tile stays the exact (exp2) path's.
  static constexpr bool kFp8Wide = kFp8 && !kPBits && !kCausal_ && !kPaged_ && kMode_ == kModeO && kHeadDimMax == 128;
  static constexpr int kBlockN = kHeadDimMax > 128 ? 64 : (kFp8Wide ? 192 : 128);
#endif
  static_assert(kBlockN % 16 == 0 && kBlockN <= 256, "KV tile: a multiple of 16 keys, at most 256");
  static_assert(!kFp8 || kBlockN % 32 == 0, "fp8 KV tile: a multiple of 32 keys (k32 wgmma slices of P)");
  // Every kExp2EmuEvery-th column of an unmasked tile's exp2s runs as an FMA-pipe polynomial instead of MUFU.EX2
  // (FA4's trick, MSA_FMHA_SM90_EXP2_EMU=k; 0 = all MUFU). See exp2_poly in fmha_sm90_kernel.cuh.
#if defined(MSA_FMHA_SM90_EXP2_EMU)
  static constexpr int kExp2EmuEvery = MSA_FMHA_SM90_EXP2_EMU;
#else
  static constexpr int kExp2EmuEvery = 0;
#endif
  // Epilogue and pipeline depth. Direct O: O goes straight from registers to global memory (4 lanes write each row's
  // 16 contiguous bytes per store), and the freed staging tile becomes a third K/V stage. Staged O: O through a padded
  // smem tile and coalesced 16-byte stores, 2 K/V stages.
  // Default: direct O + 3 stages for 16-bit modes that write O with 128-key tiles (O, O + max_score, sparse-Q); staged
  // O for fp8 (3 stages: its tiles are half the bytes); score-only keeps 2 K stages (not re-measured). O + max_score
  // follows O so that its cost ratio to O-only (issue 7: <= 1.10) compares like with like. H100 A/Bs, interleaved call by
  // call (session 4): sparse-Q +13-17% (run 5: 473 -> 541 eff TFLOP/s at 64/4 S32K correlated top-16; scattered blocks
  // need the deeper pipeline); dense bf16 (run 9, 20 reps, every bench_fmha case) non-causal 3.565 -> 3.548 ms (1.00 ->
  // 1.01x cuDNN), causal 1.889 -> 1.830 (1.01 -> 1.04x), S32K 13.408 -> 13.331, GQA S16K 6.966 -> 6.943, paged H32 2.007
  // -> 1.968, paged GQA 7.445 -> 7.354, decode-shaped equal. (Session 3 run 3 compared them in separately timed rows:
  // inconclusive under thermal drift.) A/B switches: MSA_FMHA_SM90_DIRECT_O forces direct O + 3 stages for every
  // mode, MSA_FMHA_SM90_STAGED_O the staged epilogue + 2 stages (3 for fp8) for every mode.
  // 16-bit tiles wider than 128 keys (MSA_FMHA_SM90_BLOCK_N): direct O with 2 stages (no room for a staging tile).
  // MSA_FMHA_SM90_STAGES=n overrides the K/V stage count of any of these (A/B builds; the smem static_assert below
  // refuses what does not fit): fp8 tiles are half the bytes, so fp8 modules have room for 4-5 stages.
#if defined(MSA_FMHA_SM90_DIRECT_O)
  static constexpr bool kStageO = false;
  static constexpr int kStagesDefault = 3;
#elif defined(MSA_FMHA_SM90_STAGED_O)
  static constexpr bool kStageO = kFp8 || kBlockN <= 128;
  static constexpr int kStagesDefault = kFp8 ? 3 : 2;
#else
  static constexpr bool kDirectO3 = !kFp8 && kBlockN == 128 && kHeadDimMax <= 128 &&
                                    (kMode_ == kModeO || kMode_ == kModeOMaxScore || kSparseQ);
  // Head dim 256: direct O and 2 stages (a 128 x 264 staging tile would not fit next to them).
  static constexpr bool kStageO = !kDirectO3 && kHeadDimMax <= 128 && (kFp8 || kBlockN <= 128);
  // fp8 sparse-Q: staged O + 5 stages (gathered, scattered 16 KiB blocks need the deeper pipeline; 5 x 32 KiB K + V^T
  // stages + Q + the O staging tile = 213 KiB). H200, session 10, queued A/Bs, every output identical to the default's:
  // run 1, 3 -> 4 stages: 64/4 S32K tile selection 618 -> 676 eff TFLOP/s, correlated 608 -> 669, 16/1 S128K
  // correlated 596 -> 660, 64/4 S128K tile 648 -> 669 (direct O + 3 stages +2-5%, direct O + 5 stages +1-7%); run 2,
  // 4 -> 5 stages: 632 -> 652, 647 -> 669, 608 -> 629 (+3.2-3.5%, each shape).
  static constexpr int kStagesDefault = (kFp8 && kSparseQ) ? 5 : ((kFp8 || kDirectO3) ? 3 : 2);
#endif
#if defined(MSA_FMHA_SM90_STAGES)
  static constexpr int kStages = MSA_FMHA_SM90_STAGES;
#else
  static constexpr int kStages = kStagesDefault;
#endif
  // Softmax / ping-pong A/B switches (issues 6 and 7, session 4; default = the measured design):
  //   MSA_FMHA_SM90_ROW_PIPE: row 1's max starts only after row 0's first exp2 (a no-op data dependency), so
  //     ptxas overlaps row 1's FMNMX / shuffle chain with row 0's MUFU phase instead of running both rows' maxima
  //     before the first exp2 (SASS: the MUFU unit idles ~200 cycles per step at the start of each softmax).
  //   MSA_FMHA_SM90_PINGPONG=0: no ping-pong barrier (each warpgroup issues its GEMMs when ready);
  //     =2: the partner warpgroup gets the token right after this warpgroup's QK^T issue (before the PV issue).
  //   Default since session 3 run 12 (H100, interleaved): ON for mode O (bf16 non-causal 3.498 -> 3.427 ms = 0.987 ->
  //   1.007x cuDNN; fp8 1.129 -> 1.162x and 1.138 -> 1.158x our bf16; bf16 causal SASS unchanged), off for the
  //   max-score modes (not measured with it). MSA_FMHA_SM90_NO_ROW_PIPE turns it off for A/B.
#if defined(MSA_FMHA_SM90_NO_ROW_PIPE)
  static constexpr bool kRowPipe = false;
#elif defined(MSA_FMHA_SM90_ROW_PIPE)
  static constexpr bool kRowPipe = true;
#else
  // fp8 P from its code (kPBits): off (session 12 run 4: non-causal 1.453 -> 1.491x our bf16, causal and sparse-Q
  // unchanged; its softmax has no MUFU phase for the next row's max chain to hide under).
  static constexpr bool kRowPipe = (kMode_ == kModeO || kSparseQ) && !kPBits;
#endif
  //   MSA_FMHA_SM90_REG_DIET: fewer registers live across the KV loop (no WorkItem copies held through it, the
  //     epilogue's thread-dependent addresses recomputed per item instead of hoisted out of the persistent loop); the
  //     default consumers peak at R237 of 240, so any extra live value (e.g. EXP2_EMU's polynomial) makes ptxas
  //     serialise the wgmmas (C7511) -- this is the headroom the exp2 offload needs.
#if defined(MSA_FMHA_SM90_REG_DIET)
  static constexpr bool kRegDiet = true;
#elif defined(MSA_FMHA_SM90_NO_REG_DIET)
  static constexpr bool kRegDiet = false;
#else
  // Wide fp8 tiles: no spills in the KV loop only with it. fp8 sparse-Q (128-key blocks): with it and without the
  // ping-pong barrier (below) +6-15% (H200, session 9 run 10: 64/4 S32K 591 -> 671 eff TFLOP/s, 16/1 S128K 582 -> 667,
  // 64/4 S128K 621 -> 657; the barrier alone accounts for about half).
  // fp8 causal with P from its code: +2% with it (session 12 run 2: 1.391x vs 1.363x our bf16; non-causal -2%).
  static constexpr bool kRegDiet = kFp8 && (kBlockN > 128 || kSparseQ || (kPBits && kCausal_));
#endif
  //   MSA_FMHA_SM90_PINGPONG=3 (session 6, not the default): the token orders the warpgroups' exp2 phases instead
  //     of their GEMM issue. Measured slower (fp8 128 keys 1.136 -> 1.094x bf16, 192 keys 1.206 -> 1.181x; bf16
  //     0.986x of the default): keeping the softmaxes apart costs more than their MUFU sharing.
  //   Wide fp8 tiles and fp8 sparse-Q run without the barrier (192 keys: ping-pong 1.194x, none 1.206-1.212x our
  //   bf16; sparse-Q: see kRegDiet). 16-bit sparse-Q keeps it (session 9 run 10: without, -6% at 64/4 S32K).
  //   Lazy row max (default; MSA_FMHA_SM90_LAZY_MAX=0 turns it off): the running row max lags the true max by up
  //     to 0.75 (fp8) / 8 (16-bit) log2 units, so the O rescale (64 FMUL per thread, after the PV wait, on the
  //     step's chain) runs only when the max jumps (OnlineSoftmax::kLazyMax). Before, some row of a warp moved its
  //     max in ~55% of steps (ncu: 0.43-0.55 FMUL per S element). H100, session 6 runs 5 + 7, interleaved A/B:
  //     bf16 B2 H32 S8K causal +3.9% (1.039x, both runs), non-causal +0.5-0.7%; fp8 non-causal 1.206 -> 1.228x bf16;
  //     sparse-Q 64/4 S32K 519 -> 535-544 eff TFLOP/s, 64/4 S128K 509 -> 521-525, 16/1 S128K 514 -> 534. Results
  //     differ from the eager max by rounding only (rel. L2 2.7e-3 of O in bf16, the tests' fp32 bounds hold).
#if defined(MSA_FMHA_SM90_LAZY_MAX)
  static constexpr bool kLazyMax = MSA_FMHA_SM90_LAZY_MAX != 0;
#else
  static constexpr bool kLazyMax = true;
#endif
#if defined(MSA_FMHA_SM90_PINGPONG)
  static constexpr int kPingPong = MSA_FMHA_SM90_PINGPONG;
#else
  // fp8 sparse-Q with P from its code keeps the barrier (session 12 run 5: suite 745 -> 793 eff TFLOP/s at 64/4 32K).
  static constexpr int kPingPong = (kFp8 && (kBlockN > 128 || (kSparseQ && !kPBits))) || kNumMmaWarpGroups == 3 ? 0 : 1;
#endif
  static_assert(kPingPong <= 1 || kNumMmaWarpGroups == 2, "ping-pong modes 2 / 3: two consumer warpgroups");
  static constexpr uint32_t kBarEpilogueBase = kNumMmaWarpGroups == 3 ? 5 : kBarEpilogue0;
  static_assert(kPingPong >= 0 && kPingPong <= 3, "MSA_FMHA_SM90_PINGPONG: 0, 1, 2 or 3");
  static constexpr int kNumMmaThreads = 128 * kNumMmaWarpGroups;
  static constexpr int kNumThreads = kNumMmaThreads + 128;  // + one producer warpgroup (one warp issues TMA)
  // setmaxnreg budgets: 128*24 + 256*240 = 64512 <= 65536 registers per SM (three warpgroups: 128*32 + 384*160).
  static constexpr int kProducerRegs = kNumMmaWarpGroups == 3 ? 32 : 24;
  static constexpr int kMmaRegs = kNumMmaWarpGroups == 3 ? 160 : 240;

  static_assert(kHeadDim == 64 || kHeadDim == 128 || kHeadDim == 256, "Dqk must be 64, 128 or 256");
  static_assert(kHeadDimV == 64 || kHeadDimV == 128 || kHeadDimV == 256, "Dv must be 64, 128 or 256");
  static_assert(kHeadDimMax <= 128 || (kMode == kModeO && !kFp8), "head dim 256: 16-bit mode O only");
  static_assert(kHeadDimV == kHeadDim || (kMode == kModeO && !kFp8), "Dqk != Dv: 16-bit mode O only");
  static_assert(sizeof(Element) == 2 || cute::is_same_v<Element, cutlass::float_e4m3_t>, "bf16, fp16 or e4m3");
  static_assert(!kFp8 || (!kPaged && (kMode == kModeO || kSparseQ || kMode == kModeMaxScore)),
                "fp8: ragged K/V, O (+ LSE), sparse-Q and score-only (the MSA index pass) only");
  static_assert(!kSparseQ || (kBlockN == 128 && kHeadDim % 64 == 0), "sparse-Q: 128-key blocks (= pages when paged)");

  using TileQK = Shape<Int<kBlockM>, Int<kBlockN>, Int<kHeadDim>>;  // S = Q K^T : (M, N, K=D)
  // kPBits: the row sums ride in the PV GEMM itself -- each V^T stage has 8 extra rows of e4m3 1.0 (written once), so
  // O's accumulator has 8 extra columns that each hold the tile's row sum (read, added to the fp32 sum and zeroed after
  // each PV wait: a fresh sum per tile, fp8 wgmma accumulates with ~14 bits) -- one m64n136k32 per k32 slice instead of
  // an m64n128k32 plus an m64n8k32 that reads the same P registers again. H200, session 13 run 10: B2 H32 S8K causal
  // 1.495 / 1.497 -> 1.514 / 1.511x our bf16, non-causal 1.549 -> 1.553 / 1.550x. MSA_FMHA_SM90_PV_ROWSUM=0 (A/B)
  // gives session 12's separate row-sum GEMMs (TiledMmaRowSum).
#if defined(MSA_FMHA_SM90_PV_ROWSUM)
  static constexpr bool kPvRowSum = kPBits && MSA_FMHA_SM90_PV_ROWSUM != 0;
#else
  static constexpr bool kPvRowSum = kPBits;
#endif
  static constexpr int kPVN = kPvRowSum ? kHeadDimV + 8 : kHeadDimV;  // PV GEMM N: Dv (+ 8 row-sum columns)
  using TilePV = Shape<Int<kBlockM>, Int<kPVN>, Int<kBlockN>>;  // O = P V   : (M, N=Dv (+8), K=BlockN)
  using MmaWarpGroups = Layout<Shape<Int<kNumMmaWarpGroups>, _1, _1>>;  // each warpgroup owns 64 rows

  using TiledMmaQK = decltype(make_tiled_mma(
      SM90::GMMA::ss_op_selector<Element, Element, float, TileQK>(), MmaWarpGroups{}));
  // P comes from registers (RS). 16-bit: V^T is read MN-major straight from the TMA'd [token, dim] tile.
  // FP8: V^T is K-major (the pre-pass wrote [dim, token]).
  using TiledMmaPV = decltype(make_tiled_mma(
      SM90::GMMA::rs_op_selector<Element, Element, float, TilePV, GMMA::Major::K,
                                 kFp8 ? GMMA::Major::K : GMMA::Major::MN>(),
      MmaWarpGroups{}));

  // kPBits without kPvRowSum (A/B): the row sum as a GEMM, P (the PV GEMM's A fragment) x a K-major ones tile (8 x
  // kBlockN, e4m3 1.0).
  using TiledMmaRowSum = decltype(make_tiled_mma(
      SM90::GMMA::rs_op_selector<Element, Element, float, Shape<Int<kBlockM>, _8, Int<kBlockN>>, GMMA::Major::K,
                                 GMMA::Major::K>(),
      MmaWarpGroups{}));
  using SmemLayoutOnes = decltype(tile_to_shape(GMMA::Layout_K_INTER_Atom<Element>{}, Shape<_8, Int<kBlockN>>{}));

  // 128-byte swizzled shared-memory tiles, the layouts wgmma descriptors and TMA both understand.
  using SmemLayoutQ = decltype(tile_to_shape(GMMA::Layout_K_SW128_Atom<Element>{},
                                             Shape<Int<kBlockM>, Int<kHeadDim>>{}));
  using SmemLayoutK = decltype(tile_to_shape(GMMA::Layout_K_SW128_Atom<Element>{},
                                             Shape<Int<kBlockN>, Int<kHeadDim>, Int<kStages>>{}));
  // V^T view (dim, token, stage). 16-bit: same bytes as a K-major [token, dim] tile, read as an MN-major
  // operand. FP8: a K-major [dim, token] tile of the transposed copy.
  // FP8 V^T is K-major along the keys: the widest swizzle whose atom (128 / 64 / 32 keys) divides the tile.
  using Fp8VtAtom = std::conditional_t<
      kBlockN % 128 == 0, GMMA::Layout_K_SW128_Atom<Element>,
      std::conditional_t<kBlockN % 64 == 0, GMMA::Layout_K_SW64_Atom<Element>, GMMA::Layout_K_SW32_Atom<Element>>>;
  using SmemLayoutVt = std::conditional_t<
      kFp8,
      decltype(tile_to_shape(Fp8VtAtom{},
                             Shape<Int<kPVN>, Int<kBlockN>, Int<kStages>>{})),
      decltype(tile_to_shape(GMMA::Layout_MN_SW128_Atom<Element>{},
                             Shape<Int<kHeadDimV>, Int<kBlockN>, Int<kStages>>{}, Step<_2, _1, _3>{}))>;
  // One stage's V^T as TMA writes it (the first Dv rows of a kPVN-row stage; same swizzle, 1024-byte aligned stages).
  using SmemLayoutVtTma = std::conditional_t<
      kFp8, decltype(tile_to_shape(Fp8VtAtom{}, Shape<Int<kHeadDimV>, Int<kBlockN>>{})),
      decltype(take<0, 2>(SmemLayoutVt{}))>;
  static constexpr int kVtStageElems = kPVN * kBlockN;
  // Output staging tile, row-major, padded by 16 bytes per row so the fragment stores are conflict-free.
  static constexpr int kSmemORowStride = kHeadDimV + 8;

  // Global tensors as TMA sees them. Ragged q/k: (token, dim, head); v^T: (dim, token, head).
  // Paged k: (slot, dim, head, page); v^T: (dim, slot, head, page).
  using ShapeQ = Shape<int32_t, int32_t, int32_t>;
  using StrideQ = Stride<int64_t, _1, int64_t>;
  using ShapeK = std::conditional_t<kPaged, Shape<int32_t, int32_t, int32_t, int32_t>, Shape<int32_t, int32_t, int32_t>>;
  using StrideK = std::conditional_t<kPaged, Stride<int64_t, _1, int64_t, int64_t>, Stride<int64_t, _1, int64_t>>;
  // FP8 v^T is the transposed copy [Hkv, D, padded tokens]: (dim, token, head) with the token stride 1.
  using StrideVt = std::conditional_t<
      kPaged, Stride<_1, int64_t, int64_t, int64_t>,
      std::conditional_t<kFp8, Stride<int64_t, _1, int64_t>, Stride<_1, int64_t, int64_t>>>;

  using TmaQ = decltype(make_tma_copy(SM90_TMA_LOAD{},
                                      make_tensor(make_gmem_ptr(static_cast<Element const*>(nullptr)), ShapeQ{}, StrideQ{}),
                                      SmemLayoutQ{}));
  // Pairs: K / V through the multicast op (same descriptor and box; the owner CTA's copy lands in both CTAs).
  using TmaKVOp = std::conditional_t<kPair, SM90_TMA_LOAD_MULTICAST, SM90_TMA_LOAD>;
  using TmaK = decltype(make_tma_copy(TmaKVOp{},
                                      make_tensor(make_gmem_ptr(static_cast<Element const*>(nullptr)), ShapeK{}, StrideK{}),
                                      take<0, 2>(SmemLayoutK{})));
  using TmaV = decltype(make_tma_copy(TmaKVOp{},
                                      make_tensor(make_gmem_ptr(static_cast<Element const*>(nullptr)), ShapeK{}, StrideVt{}),
                                      SmemLayoutVtTma{}));

  static constexpr uint32_t kTmaBytesQ = kBlockM * kHeadDim * sizeof(Element);
  static constexpr uint32_t kTmaBytesK = kBlockN * kHeadDim * sizeof(Element);
  static constexpr uint32_t kTmaBytesV = kBlockN * kHeadDimV * sizeof(Element);

  struct alignas(1024) SharedStorage {
    alignas(1024) Element smem_q[cosize_v<SmemLayoutQ>];
    alignas(1024) Element smem_k[cosize_v<SmemLayoutK>];
    alignas(1024) Element smem_v[cosize_v<SmemLayoutVt>];
    alignas(128) ElementOut smem_o[kStageO ? kBlockM * kSmemORowStride : 8];
    alignas(128) Element smem_ones[(kPBits && !kPvRowSum) ? 8 * kBlockN : 16];  // e4m3 1.0 (0x38) everywhere
    alignas(8) uint64_t bar_q;
    alignas(8) uint64_t full_k[kStages];
    alignas(8) uint64_t empty_k[kStages];
    alignas(8) uint64_t full_v[kStages];
    alignas(8) uint64_t empty_v[kStages];
    // Work-index ring: the producer warp fetches the next work item and hands it to the consumers.
    alignas(8) uint64_t sched_full[2];
    alignas(8) uint64_t sched_empty[2];
    int sched_item[2];
    float pin_scratch[kNumMmaThreads];  // write-only sink that orders the softmax before the PV wait
    // Pairs: per ring slot, this CTA's item, positions (or own union length when 0) and own union length (PairView).
    int sched_aux[kPair ? 2 : 1][4];
  };
  // + 1024 so the kernel can round the dynamic shared-memory base up to the 1024-byte swizzle alignment.
  static constexpr int kSmemBytes = int(sizeof(SharedStorage)) + 1024;
  static_assert(kSmemBytes <= 227 * 1024, "shared memory budget of one SM90 CTA exceeded");

  struct Params {
    TmaQ tma_q;
    TmaK tma_k;
    TmaV tma_v;
    ShapeQ shape_q;   // (total_q, D, Hq)
    ShapeK shape_k;   // (total_kv, D, Hkv) or (page_size, D, Hkv, pages)
    ShapeK shape_vt;  // (D, total_kv, Hkv) or (D, page_size, Hkv, pages)
    ElementOut* out;
    int64_t out_stride_token;
    int64_t out_stride_head;
    float* lse;  // nullptr: not requested
    int64_t lse_stride_token;
    WorkItem const* work;
    int num_work;
    int* work_counter;  // zeroed before each launch; CTAs take items gridDim.x, gridDim.x + 1, ... from it
    int const* kv_indices;  // paged: flat page table
    int q_heads_per_kv_head;
    float scale_log2;  // sm_scale * log2(e): softmax runs on exp2
    float sm_scale;    // natural-log scale, for the LSE
    float out_scale;   // applied to O after normalisation (v_scale * o_scale)
    // Split-KV pieces: normalised fp32 O [slot, kBlockM, kHeadDimV] and natural-log LSE [slot, kBlockM].
    float* partial_o;
    float* partial_lse;
    // max_score [Hq, max_k_tiles, total_q] fp32 (modes kModeOMaxScore / kModeMaxScore).
    float* max_score;
    int64_t max_score_stride_head;  // max_k_tiles * total_q
    int64_t max_score_stride_tile;  // total_q
    int max_k_tiles;
    // FP8: per query head (natural-log softmax scale sm_scale * q_scale * k_scale, out scale v_scale * o_scale);
    // replaces sm_scale / scale_log2 / out_scale.
    float2 const* head_scales;
    // Sparse-Q (kModeSparseQ): Q of an item is loaded as one (64 dims, T tokens, G heads) box per 64 dims through
    // this descriptor over q viewed as (D, total_q, Hq); the item's block list, its length and the token masks
    // come from the union builder (int32, device): union [items, umax] ascending (logical) block ids, union_len [items]
    // (-1: item not routed here, nothing written), mask [items, umax, mask_words] (bit t % 32 of word t / 32:
    // token t selected the block), order [items] (the sequence the persistent CTAs take items in).
    alignas(64) cute::TmaDescriptor tma_q_packed;
    int const* sq_union;
    int const* sq_union_phys;  // paged: the union's physical page ids (same layout); the TMA reads these pages
    int const* sq_union_len;
    int const* sq_mask;
    int const* sq_order;
    int sq_tokens_per_tile;  // T = kBlockM / G
    int sq_umax;
    int sq_mask_words;
    // Pairs (kModeSparseQPair): [sq_num_pairs, 2] items per 2-CTA cluster (token tiles 2j, 2j + 1 of one request and
    // KV head; the second -1 when the request has no tile 2j + 1), taken in this order; sq_order is unused.
    int const* sq_pair_items;
    int sq_num_pairs;
    // Paged K/V (any power-of-two page size P in [16, 256]): k and v viewed as (D, P, Hkv, pages), read in boxes of
    // (64 dims, page_rows slots). A kBlockN-key tile is page_subs boxes from consecutive pages (P < kBlockN) or one
    // box from slot (n % tiles_per_page) * kBlockN of one page (P >= kBlockN). tma_k / tma_v above are unused there.
    alignas(64) cute::TmaDescriptor tma_k_page;
    alignas(64) cute::TmaDescriptor tma_v_page;
    int page_size;       // P
    int page_rows;       // min(P, kBlockN)
    int page_subs;       // kBlockN / page_rows
    int tiles_per_page;  // max(1, P / kBlockN)
    int page_shift;            // log2(P)
    int tiles_per_page_shift;  // log2(tiles_per_page)
  };

  struct CombineParams {
    CombineItem const* items;
    float const* partial_o;
    float const* partial_lse;
    ElementOut* out;
    int64_t out_stride_token;
    int64_t out_stride_head;
    float* lse;  // nullptr: not requested
    int64_t lse_stride_token;
    float out_scale;
    float2 const* head_scales;  // FP8: per-head out scale (.y) instead of out_scale
  };

  // FP8 V pre-pass: v [total_kv, Hkv, D] -> vt [Hkv, D, vt_len], one CTA per (128-token tile, KV head).
  struct VtParams {
    uint8_t const* v;
    int64_t v_stride_token;
    int64_t v_stride_head;
    uint8_t* vt;
    int64_t vt_len;       // padded tokens per (head, dim) row: 128 * number of tiles
    int2 const* tiles;    // per tile: (first source token, valid tokens 0..128; < 0: skip the tile)
  };
};

}  // namespace msa_fmha_sm90
