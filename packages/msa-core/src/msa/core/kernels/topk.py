"""CUDA glue for ``sparse_topk_select`` (csrc/topk): module build/load through JitSpec, launch configuration.

``run`` takes arguments already validated by :func:`msa.core.topk.sparse_topk_select`. Ten exact paths, picked by
:func:`plan` from the shapes only (never the data, never a host sync):

- ``block`` (``csrc/topk/topk_block_core.cuh``): a CTA owns G tokens of one head and P threads per token; each
  thread holds V scores of its row per chunk in registers (V = 16 with the next chunk prefetched, or 32 for
  rows that fit one chunk), a cheap lower bound (the M-th largest of the row's P local maxima) leaves ~M + a
  few candidates, and the exact best M are kept by ranking 64-bit (score, index) keys in shared memory.
  ``splits`` > 1 spreads K over CTAs and adds a merge launch of the same kernel.
- ``warp`` (``csrc/topk/topk_select_core.cuh``): a warp owns 32 tokens, one row per lane, each lane streaming
  its K slice into a per-row column compacted by a 4-bit radix select.
- ``row`` (``csrc/topk/topk_row_core.cuh``): a CTA stages G whole rows in shared memory (coalesced transpose),
  then one warp selects one row with shuffles and ballots only (no CTA barriers in the selection). For rows that
  fit shared memory (K up to a few thousand blocks) and M <= 64: the issue-light path at 128K context.
- ``cluster`` (``csrc/topk/topk_cluster_core.cuh``): few long rows (decode at 128K-1M context). A cluster of S <= 8
  CTAs splits K; each CTA stages its slice of G rows, the row's bound comes from the union of the S slices' group
  maxima (DSMEM), and each row's candidates are gathered in one owner CTA for the exact rank select. One launch,
  no workspace, and H * S * ceil(total_q / G) CTAs instead of H * ceil(total_q / G).
- ``reg`` (``csrc/topk/topk_reg_core.cuh``): rows of K <= 1024 blocks held in registers: a warp = 32 / P rows of P
  lanes x V values each (all loads issued up front, no shared-memory staging, no CTA barrier); per row a bound
  from 32 group values (segment sort / lane count), candidates in index order to a small shared list, exact rank.
  The default for short rows (K <= 256, any total_q: 8K-32K context) except where the net path applies;
  ``MSA_TOPK_REG=0`` restores the previous default plan (A/B).
- ``net`` (``csrc/topk/topk_net_core.cuh``): the reg path's layout (P lanes x V values per row, V = 16 / 32 / 64) with
  the row's M-th largest value found by compare-exchange networks (sorted top-16 lists per lane, merged in-lane and
  across the segment), then one mask per lane: no shared memory, no candidate list, no rank loop; M <= 16. The
  default for short prefill rows (K <= 64, >= 16 rows per SM: 8K context; P4 V16) and for decode-like shapes with
  256 < K <= 1024 (128K context; P32 V32) where the coop path is off; ``MSA_TOPK_NET=0`` = without it.
- ``coop`` (``csrc/topk/topk_coop_core.cuh``): decode-like rows of 256 < K <= 1024 blocks (128K context), M <= 16: the
  W = 8 or 16 warps of a CTA share G = 1, 2 or 4 rows, a few values per thread; the bound is the M-th largest of 32
  interleaved supergroup maxima (ballot ranks), candidates go to a shared list that the row's warp ranks (the net
  selection as the exact fallback for a row with more than 64 candidates). ``MSA_TOPK_COOP=0`` = the net plan there.
- ``tcoop`` (``csrc/topk/topk_tcoop_core.cuh``): coop's one-row CTAs of 8 warps with the loads of 8 consecutive tokens
  spread over a cluster of 8 CTAs (CTA c loads blocks [128 c, 128 c + 128) of all 8 rows: 128 line requests per SM
  instead of 1024) and sent to each row's CTA by st.async; then the coop selection. The default where coop would
  run one row per CTA (rows <= SMs / 2) with total_q >= 32 (128K decode of 32-66 tokens at H1);
  ``MSA_TOPK_TCOOP=0`` = coop there.
- ``ccoop`` (``csrc/topk/topk_ccoop_core.cuh``): the coop layout with K split over a cluster of ceil(K / 1024) <= 8
  CTAs (1024 < K <= 8192, M <= 16): supergroup maxima exchanged through DSMEM, candidates appended to the row's owner
  CTA, exact argmax-rounds fallback. The default for decode with few rows at 256K-1M context (``_ccoop_shape``);
  ``MSA_TOPK_CCOOP=0`` = without it; ``MSA_TOPK_PATH=ccoop`` with ``MSA_TOPK_G`` / ``MSA_TOPK_WARPS`` from
  ``CCOOP_SHAPES`` forces a shape.
- ``pool`` (``csrc/topk/topk_pool_core.cuh``): two launches for decode rows of 1024 < K <= 16384 blocks (256K-2M
  context), M <= 16. Launch 1 reads max_score like the read kernel (whole lines of 32 tokens, every SM) and writes
  per 16-block group a **record** (its 4 best blocks as packed keys; the default) or its maximum to a workspace; the
  select launch (programmatic-dependent) bounds each row from the 32 lane maxima and, in records form (a warp per
  row), ranks the record keys >= the bound, gathering from max_score only groups whose 4th key reaches it (exact: an
  fp32 bucket straddling the cut falls back to the warp form); with maxima it reads the ~20 candidate groups back
  from L2 (CTA form up to ``POOL_CTA_MAX_ROWS`` rows, else a warp per row) -- exact refinements, then argmax rounds,
  where ties defeat the caps. The default for decode with >= ``POOL_REC_MIN_ROWS`` rows (ahead of ccoop);
  ``MSA_TOPK_POOL=0`` = without it, ``MSA_TOPK_POOL_REC=0`` = the group-maxima forms (the session-20 plan: >=
  ``POOL_MIN_ROWS`` rows where ccoop does not apply), ``MSA_TOPK_POOL_CTA=0 / 1`` forces the warp / CTA form of those,
  ``MSA_TOPK_POOL_PDL=0 / 1`` the plain / dependent select launch.

The block and warp paths allocate at most one workspace (``2 * H * splits * M * ceil(total_q/32)*32`` int32 words, torch's caching
allocator) and only when ``splits > 1``; the pool path one of ``H * total_q * pool_row_groups(K)`` words (4x in
records form) when M > 0.

Environment overrides (benchmark sweeps): ``MSA_TOPK_PATH`` (block | warp | row), ``MSA_TOPK_SPLITS``, ``MSA_TOPK_G``
(tokens per CTA, block), ``MSA_TOPK_P`` (threads per token, block), ``MSA_TOPK_V`` (16 | 32, block),
``MSA_TOPK_WARPS`` (warp; row: warps per CTA), ``MSA_TOPK_MERGE_WARPS`` (warp); row:
``MSA_TOPK_G`` (tokens per CTA); cluster: ``MSA_TOPK_G``, ``MSA_TOPK_WARPS``, ``MSA_TOPK_SLICES`` (CTAs per cluster),
``MSA_TOPK_CLUSTER_FLAGS`` (A/B kernel variants, all exact; see ``CLUSTER_FLAG_BITS``); reg: ``MSA_TOPK_LANES`` (P lanes per
row: 4, 8, 16, 32), ``MSA_TOPK_V`` (values per lane), ``MSA_TOPK_WARPS`` (warps per CTA, 1..8), ``MSA_TOPK_CAP``
(candidate entries per row; small values exercise the exact fallback); ``MSA_TOPK_REG=0``: the default plan without
the reg path; net: ``MSA_TOPK_LANES`` (1, 2, 4, 8, 16, 32), ``MSA_TOPK_V`` (16, 32, 64), ``MSA_TOPK_WARPS`` (1..8);
``MSA_TOPK_NET=0``: the default plan without the net path (``MSA_TOPK_REG=0`` turns off both); coop: ``MSA_TOPK_G``
(rows per CTA) and ``MSA_TOPK_WARPS`` from ``COOP_SHAPES``; ``MSA_TOPK_COOP=0``: without the coop path (and tcoop);
``MSA_TOPK_TCOOP=0``: coop G1W8 where tcoop would run; ``MSA_TOPK_POOL=0``: the plan without the pool path.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch

from ._device import cuda_kernel_available, module_for_device
from ._device import sm_count as _sm_count

__all__ = ["run", "available", "plan", "TopkPlan", "jit_specs", "spec", "BATCH", "BLOCK_V", "load_module", "launch_noop",
           "launch_read"]

FAMILY = "topk"
SOURCES = ("topk_select.cu.jinja",)
BATCH = 16  # blocks per lane per step; must match topk_emulate.cc's U for the CPU replay tests
BLOCK_V = 16  # block path: values per thread per chunk with prefetch (2 * BLOCK_V without); as topk_block_emulate.cc
BLOCK_WIDE_MAX_THREADS = 256  # the V = 2 * BLOCK_V kernel's launch bound (registers for twice the values)
MAX_WARPS = 8
SMEM_LIMIT = 227 * 1024  # sm_90 / sm_100 opt-in shared memory per block


def spec(arch: str, timeline: bool = False):
    """The module for ``arch``; ``timeline`` (diagnostic) builds the variant whose cluster kernel records per-phase
    clock stamps into a trace tensor (a separate module: the default build carries no stamping code)."""
    from msa.core.jit import JitSpec

    params = {"batch": BATCH, "block_v": BLOCK_V}
    if timeline:
        params["timeline"] = 1
    return JitSpec(family=FAMILY, sources=SOURCES, params=params, arch=arch, use_cutlass=False)


def jit_specs(preset: dict, arch: str) -> list:
    """Warmup hook (msa.core.variants): one module per arch serves every dtype, topk and shape."""
    return [spec(arch)]


def load_module(device: torch.device, timeline: bool = False):
    return module_for_device(spec, device, timeline)


def available(device) -> tuple[bool, str]:
    """Cheap (no compilation): a CUDA device of a supported compute capability and tvm-ffi importable."""
    return cuda_kernel_available(device, "the top-k kernel")


@dataclass(frozen=True)
class TopkPlan:
    path: str  # "block", "warp", "row", "cluster", "reg", "net", "coop", "tcoop", "ccoop" or "pool"
    splits: int  # CTAs along K per (token group, head); > 1 adds the merge launch
    cap: int  # candidate entries per row (block: buffer; warp: column capacity)
    warps: int = 1  # warp path: warps per scan CTA, each a contiguous slice of the split
    merge_warps: int = 1
    log_g: int = 3  # block / row path: 2**log_g tokens per CTA
    threads_per_row: int = 32  # block path: P; reg path: P lanes per row
    values_per_thread: int = BLOCK_V  # block path: V per chunk (BLOCK_V prefetched, or 2 * BLOCK_V); reg: V per lane
    slices: int = 1  # cluster path: CTAs per cluster along K
    flags: int = 0  # cluster path: kernel variant bits (CLUSTER_FLAG_BITS), MSA_TOPK_CLUSTER_FLAGS overrides; pool: POOL_FLAG_*

    def workspace_words(self, n_heads: int, total_q: int, m: int, n_blocks: int = 0) -> int:
        if self.path == "pool":  # a word per group (its maximum) or four (its record)
            words = 4 if self.flags & POOL_FLAG_REC else 1
            return n_heads * total_q * pool_row_groups(n_blocks) * words if m > 0 else 0
        if self.splits <= 1 or m <= 0:
            return 0
        return 2 * n_heads * self.splits * m * (-(-total_q // 32) * 32)


def column_capacity(m: int) -> int:
    """Warp path: room for the best M, one batch, and max(32, M) more before a compaction (amortises its cost)."""
    return m + BATCH + max(32, m)


def block_capacity(m: int, threads_per_row: int) -> int:
    """Block path: >= M + P (an overflow round appends <= P), plus max(32, M) so a chunk rarely overflows."""
    return m + threads_per_row + max(32, m)


ROW_MAX_M = 64  # row path: c <= 2 group values per lane bound the M-th best (topk_row_core.cuh)
ROW_SMEM_BUDGET = 112 * 1024  # row path: staged rows per CTA (room for >= 2 CTAs per SM)
# Prefill rows at least this long keep 16 staged rows per CTA (one CTA per SM) rather than halving to 8 for two or
# three per SM. H200 session 22 runs 17-18, us at q4096, G16 W16 vs the G8 W8 it replaces: K 2048 H1 21.0 vs 27.3,
# H2 40.1 vs 47.9, H4 75.7 vs 88.3, H8 145.0 vs 159.5, q1024 H4 20.3 vs 26.3; K 1792 H1 / H2 / H4 19.5 / 36.4 / 70.3
# vs 24.5 / 42.1 / 77.9; K 1920 20.3 / 38.3 / 73.5 vs 25.5 / 44.3 / 80.5; but K 1664 H2 / H4 36.2 / 68.6 vs 33.0 /
# 59.4 and K 1536 H2 / H4 / H8 34.4 / 66.0 / 128.2 vs 31.0 / 56.0 / 101.8 (H1 about even).
ROW_ONE_CTA_MIN_BLOCKS = 1792


def row_capacity(m: int) -> int:
    """Row path: candidates kept per row (~20 pass the bound for M = 15 on iid scores; more -> exact fallback)."""
    return 128 if m <= 32 else 256


def row_stride(n_blocks: int, g: int) -> int:  # mirrors topk_row_core.cuh
    return -(-n_blocks // 32) * 32 + 32 // g


def row_smem_bytes(n_blocks: int, g: int, cap: int) -> int:  # mirrors topk_row_core.cuh
    return g * row_stride(n_blocks, g) * 4 + g * cap * 8 + g * 32 * 4 + 2 * g * 4


def smem_bytes(warps: int, cap: int) -> int:
    return warps * (cap * 32 * 8 + 17 * 32 * 4 + 32 * 4)  # column, histogram (16 bins + spare), count


def block_smem_bytes(g: int, p: int, cap: int) -> int:  # mirrors topk_block_core.cuh
    return 2 * cap * g * 8 + g * (p + 4) * 4 + g * 4 + 6 * g * 4 + 16




def _env_int(name: str) -> int | None:
    v = os.environ.get(name)
    return int(v) if v else None


def threads_per_row_for(m: int) -> int:
    """P >= ~1.5 M keeps the max-of-maxima bound tight (~P ln((P+1)/(P+1-M)) candidates per chunk)."""
    return 32 if m <= 20 else 64 if m <= 40 else 128


def _warp_plan(n_heads: int, n_blocks: int, total_q: int, m: int, sm_count: int) -> TopkPlan:
    cap = column_capacity(m)
    rows = -(-total_q // 32) * n_heads  # warps needed to cover every row once
    min_slice = 2 * cap
    target = 12 * sm_count  # warps in flight for ~full HBM bandwidth (16 loads of 128 B each, double-buffered)
    warps = 1  # first split K inside a CTA (one launch), then across CTAs (adds the merge launch)
    while warps < MAX_WARPS and rows * warps < target and n_blocks // (2 * warps) >= min_slice:
        warps *= 2
    while warps > 1 and smem_bytes(warps, cap) > SMEM_LIMIT:
        warps -= 1
    splits = 1
    while rows * warps * splits < target and n_blocks // (warps * splits * 2) >= min_slice and splits < 1024:
        splits *= 2
    return TopkPlan(path="warp", splits=splits, cap=cap, warps=warps, merge_warps=max(1, min(4, splits)))


def _block_plan(n_heads: int, n_blocks: int, total_q: int, m: int, sm_count: int) -> TopkPlan:
    """From the H100 sweeps (benchmarks/topk_notes.md), p = threads_per_row_for(m):
    - prefill (total_q >= 1024): 8 tokens per CTA (whole 32-byte sectors of a K-row), no split. Rows of one
      chunk: 2p threads x 16 values when the grid is <= 4 CTAs per SM (128K, H = 1: 19.3 us vs 20.2), else
      p x 32 values (128K, H = 4: 55.7 us vs 65.6); longer rows: p x 16 with the next chunk prefetched, or p x 32
      without it past 4 CTAs per SM (H200, 1M H4: 218 us vs 233).
    - decode: 2p threads x 16 values (latency: more threads, fewer loads each; 128K: 5.0 us vs 6.3 for p x 32),
      K split until a slice is one chunk, then tokens grouped until the grid is about one CTA per SM."""
    p = threads_per_row_for(m)
    wide = 2 * BLOCK_V
    if total_q >= 1024:
        log_g, splits = 3, 1
        groups = -(-total_q // 8) * n_heads
        if n_blocks <= p * BLOCK_V or (1 << log_g) * p > BLOCK_WIDE_MAX_THREADS:
            return TopkPlan(path="block", splits=1, cap=block_capacity(m, p), log_g=log_g, threads_per_row=p)
        if n_blocks <= 2 * p * BLOCK_V and groups <= 4 * sm_count and 8 * 2 * p <= 1024:
            return TopkPlan(path="block", splits=1, cap=block_capacity(m, 2 * p), log_g=log_g,
                            threads_per_row=2 * p)
        # Longer rows: p x 16 with the next chunk prefetched while the grid is <= 4 CTAs per SM, else p x 32 without
        # (three CTAs per SM). H200 session 22 run 17, us at q4096, V 32 vs 16: K 8192 H4 218.2 vs 233.5, H2 118.2
        # vs 123.6, q2048 H4 114.9 vs 123.7; K 4096 H4 124.1 vs 137.6, H2 68.4 vs 74.4; K 3072 H4 99.2 vs 110.2, H2
        # 52.5 vs 59.1; but K 8192 H1 (512 CTAs) 69.4 vs 67.3.
        v = wide if n_blocks <= p * wide or (groups > 4 * sm_count and (1 << log_g) * p <= BLOCK_WIDE_MAX_THREADS) \
            else BLOCK_V
        return TopkPlan(path="block", splits=splits, cap=block_capacity(m, p), log_g=log_g, threads_per_row=p,
                        values_per_thread=v)
    if n_blocks <= p * BLOCK_V // 2:  # short rows (a few values per thread): nothing to split or group
        return TopkPlan(path="block", splits=1, cap=block_capacity(m, p), log_g=0, threads_per_row=p)
    p = min(2 * p, 128)
    splits = 1
    while -(-n_blocks // splits) > p * BLOCK_V and splits < 64:
        splits *= 2
    log_g = 0
    while -(-total_q // (1 << log_g)) * n_heads * splits > sm_count and log_g < 3 and (2 << log_g) * p <= 1024:
        log_g += 1
    return TopkPlan(path="block", splits=splits, cap=block_capacity(m, p), log_g=log_g, threads_per_row=p)


def _use_warp_path(n_heads: int, n_blocks: int, total_q: int) -> bool:
    """Many short rows (8K context prefill, H >= 4): the warp path's one lane per row does less per row."""
    return n_blocks <= 128 and total_q * n_heads >= 8192


def _row_plan(n_heads: int, n_blocks: int, total_q: int, m: int, sm_count: int, itemsize: int) -> TopkPlan | None:
    """Row path shape, or None where it does not apply (M > 64, rows too long for shared memory).
    Prefill: G = 16 tokens per CTA (64 bytes per K-row in fp32, one 32-byte sector in bf16; ``itemsize`` is
    kept for shape rules that depend on it), one warp per row. Decode (few rows):
    fewer tokens per CTA and more loading warps, so enough CTAs and loads are in flight."""
    if m > ROW_MAX_M:
        return None
    cap = row_capacity(m)
    g = 16  # prefill: 16 tokens per CTA (H100, 128K H1: 13.6 us at G 16 vs 14.4 at G 8; H4 even)
    decode = total_q * n_heads < sm_count * g  # fewer CTAs than SMs at G rows each
    if decode:
        g = 2
        if n_blocks > ROW_MAX_BLOCKS and total_q * n_heads <= 128:
            g = 1  # long rows, few of them: one row per CTA (512K H1: 7.3 us at G 1 vs 7.4 at G 2)
    budget = ROW_SMEM_BUDGET
    if not decode and n_blocks >= ROW_ONE_CTA_MIN_BLOCKS and row_smem_bytes(n_blocks, g, cap) <= SMEM_LIMIT:
        budget = SMEM_LIMIT  # long prefill rows: 16 per CTA, one CTA per SM
    while g > 1 and row_smem_bytes(n_blocks, g, cap) > budget:
        g //= 2
    if row_smem_bytes(n_blocks, g, cap) > budget:
        return None
    warps = max(8, g) if decode else g
    if decode and n_blocks > ROW_MAX_BLOCKS:
        warps = 16  # long decode rows: more loads in flight per CTA
    return TopkPlan(path="row", splits=1, cap=cap, warps=warps, log_g=g.bit_length() - 1)


CLUSTER_MAX_SLICES = 8  # portable cluster size (topk_cluster_core.cuh)
CLUSTER_LOCAL_MAX_M = 32  # the local-merge variant's lists (topk_cluster_core.cuh, kLocal)
# decode rows at least this long take the cluster path: 1M context. H100 (session 3 run 2): 1M H1 / H4 9.54 /
# 13.11 us vs row 11.88 / 15.43; 128K H1 / H4 7.82 / 9.47 vs row 4.35 / 5.35 (row kept there); 512K unmeasured
CLUSTER_MIN_BLOCKS = 8192
CLUSTER_MAX_ROWS = 512  # ... when there are at most this many rows (total_q * H)


def cluster_slice_len(n_blocks: int, slices: int) -> int:  # mirrors topk_cluster_select
    return max(64, (-(-n_blocks // slices) + 31) // 32 * 32)


def cluster_smem_bytes(n_blocks: int, g: int, slices: int, cap: int) -> int:  # mirrors topk_cluster_core.cuh
    own = -(-g // slices)
    return g * (cluster_slice_len(n_blocks, slices) + 32 // g) * 4 + own * cap * 8 + g * 32 * 4 + own * 4 + 2 * g * 4 + 16


def _cluster_plan(n_heads: int, n_blocks: int, total_q: int, m: int, sm_count: int) -> TopkPlan | None:
    """Cluster path shape, or None where it does not apply (M > 64, slices too long for shared memory).
    S = 8 slices (fewer for short rows: >= 128 blocks each); G = 8 tokens per CTA (whole 32-byte sectors of a K-row
    in fp32), halved while fewer than half the SMs would get a CTA or the slice does not fit; W = max(G, 8) warps.
    Where G = 8 leaves more than half the SMs idle (1M decode H1 q64) and M <= 32: G = 8, W = 8 with the
    local-merge + one-batch kernel instead of halving G (flags; H200: 6.63 vs 7.36 us).
    M = 0 (every output forced or -1) is valid when the path is forced: the kernel then stages and selects nothing
    and writes the forced blocks only (the default plan never sends M = 0 here)."""
    if not 0 <= m <= ROW_MAX_M:
        return None
    cap = row_capacity(m)
    slices = CLUSTER_MAX_SLICES
    while slices > 1 and n_blocks < 128 * slices:
        slices //= 2
    g = 8
    if (-(-total_q // g) * n_heads * slices * 2 <= sm_count and 0 < m <= CLUSTER_LOCAL_MAX_M
            and cluster_smem_bytes(n_blocks, g, slices, cap) <= ROW_SMEM_BUDGET):
        # Few rows (1M decode H1 q64: 64 CTAs): whole sectors, one load batch, per-slice exact top M merged at
        # the owner (H200, session 8 run 5: 6.63 us vs 7.36 for G4 with the default kernel).
        return TopkPlan(path="cluster", splits=1, cap=cap, warps=8, log_g=3, slices=slices,
                        flags=CLUSTER_FLAG_BITS["local_merge"] + CLUSTER_FLAG_BITS["one_batch"])
    while g > 1 and (-(-total_q // g) * n_heads * slices * 2 <= sm_count
                     or cluster_smem_bytes(n_blocks, g, slices, cap) > ROW_SMEM_BUDGET):
        g //= 2
    if cluster_smem_bytes(n_blocks, g, slices, cap) > ROW_SMEM_BUDGET:
        return None
    return TopkPlan(path="cluster", splits=1, cap=cap, warps=max(8, g), log_g=g.bit_length() - 1, slices=slices)


def _use_cluster_path(n_heads: int, n_blocks: int, total_q: int, m: int) -> bool:
    """Few long rows: decode at >= 1M context, where it measured faster than the row path (see _cluster_plan and
    benchmarks/topk_notes.md)."""
    return 0 < m <= ROW_MAX_M and n_blocks >= CLUSTER_MIN_BLOCKS and total_q * n_heads <= CLUSTER_MAX_ROWS


ROW_MAX_BLOCKS = 2048  # prefill rows staged whole (256K context); longer rows stream (block path)
ROW_MAX_BLOCKS_DECODE = 8192  # decode: a few long rows per CTA still fit (1M context at G <= 2)


def _use_row_path(n_heads: int, n_blocks: int, total_q: int, m: int, sm_count: int = 132) -> bool:
    """Rows that fit shared memory: up to 2048 blocks, or 8192 for decode-like shapes (fewer rows than 16 per SM;
    H100, session 2: 512K decode 7.3 / 9.7 us vs 10.1 / 12.3 split + merge, 1M H4 14.8 vs 16.4, 1M H1 even)."""
    if not 0 < m <= ROW_MAX_M:
        return False
    decode = total_q * n_heads < 16 * sm_count
    return n_blocks <= (ROW_MAX_BLOCKS_DECODE if decode else ROW_MAX_BLOCKS)


REG_MAX_BLOCKS = 1024  # reg path: K <= 32 lanes x 32 values
REG_SHORT_BLOCKS = 256  # ... the default for every total_q up to here (8K-32K context); forced: up to 1024
REG_LANES = (4, 8, 16, 32)
REG_VALUES = (2, 4, 8, 16, 32)


def reg_smem_bytes(warps: int, lanes: int, cap: int) -> int:  # mirrors topk_reg_select
    return warps * (32 // lanes) * (cap + 1) * 8


def _pow2_at_least(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


def _reg_values(n_blocks: int, lanes: int) -> int:
    """Reg path: V values per lane for P = lanes (the smallest power of two >= K / P, at least 2)."""
    return max(2, _pow2_at_least(-(-n_blocks // lanes)))


def _reg_plan(n_heads: int, n_blocks: int, total_q: int, m: int, sm_count: int) -> TopkPlan | None:
    """Reg path shape, or None where it does not apply (M > 64, K > 1024).
    P lanes per row: decode-like shapes (fewer than 16 rows per SM) one warp per row (P = 32: shortest selection
    chain, the bound by a lane count instead of a sort); prefill the smallest P (fewest instructions per row, G =
    32 / P tokens per load instruction) that still gives >= 6 warps per SM. V = K / P rounded up to a power of two
    (>= 2). Warps per CTA: doubled while >= 2 CTAs per SM remain. cap: every candidate of a row (K) for K <= 256
    (no fallback), else row_capacity(m) (more candidates -> the exact argmax-rounds fallback)."""
    if not 0 <= m <= ROW_MAX_M or not 1 <= n_blocks <= REG_MAX_BLOCKS:
        return None
    rows = total_q * n_heads
    lanes_ok = [p for p in REG_LANES if p * 32 >= n_blocks]
    if rows < 16 * sm_count:
        lanes = 32
    else:  # H100 (8K prefill, session 5): H4 P8 10.15 us (P4 11.3, P16 11.3), H1 P16 5.34 (P8 6.2, P4 8.4)
        lanes = min(16, next((p for p in lanes_ok if rows * p // 32 >= 16 * sm_count), lanes_ok[-1]))
    lanes = max(lanes, lanes_ok[0])
    v = _reg_values(n_blocks, lanes)
    n_warps = -(-total_q // (32 // lanes)) * n_heads
    warps = 1
    while warps < 8 and n_warps // (2 * warps) >= 2 * sm_count:
        warps *= 2
    cap = max(n_blocks, m, 1) if n_blocks <= REG_SHORT_BLOCKS else row_capacity(m)
    return TopkPlan(path="reg", splits=1, cap=cap, warps=warps, log_g=(32 // lanes).bit_length() - 1,
                    threads_per_row=lanes, values_per_thread=v)


def _use_reg_path(n_heads: int, n_blocks: int, total_q: int, m: int, sm_count: int = 132) -> bool:
    """Short rows (K <= 256) at any total_q (the net path takes K <= 64 prefill with M <= 16 first).
    ``MSA_TOPK_REG=0`` turns it off (the previous default plan, for A/B)."""
    if os.environ.get("MSA_TOPK_REG", "1") == "0" or not 0 < m <= ROW_MAX_M:
        return False
    # K <= 256 only: at 128K decode (K = 1024) one warp per row with 32 uncoalesced loads per lane lost to the row
    # path's coalesced staging on the H100 (H1 4.67 vs 4.36 us, H4 5.81-6.34 vs 5.41); forced, it still runs there
    return n_blocks <= REG_SHORT_BLOCKS


NET_MAX_M = 16  # net path: sorted lists of 16 (topk_net_core.cuh)
NET_LANES = (1, 2, 4, 8, 16, 32)
NET_VALUES = (16, 32, 64)
NET_MAX_BLOCKS = 64  # default plan: 8K context prefill (longer rows: the reg / row paths)


def _net_lanes_values(n_blocks: int) -> tuple[int, int]:
    """P lanes per row and V values per lane: as many lanes as give V >= 16 (the shortest per-lane chains, the most
    warps; H100 session 6: 8K prefill P4 V16 3.72 / 6.07 us vs P2 V32 4.06 / 7.61 vs P1 V64 5.04 / 9.61; 128K decode
    P32 V32 3.52 / 5.17 vs P16 V64 4.46 / 5.52), at most 32 lanes."""
    lanes = min(NET_LANES[-1], _pow2_at_least(-(-n_blocks // NET_VALUES[0])))
    return lanes, _net_values(n_blocks, lanes)


def _net_values(n_blocks: int, lanes: int) -> int:
    """Net path: V values per lane for P = lanes (the smallest of NET_VALUES covering K / P, at most 64)."""
    return min(NET_VALUES[-1], max(NET_VALUES[0], _pow2_at_least(-(-n_blocks // lanes))))


def _net_plan(n_heads: int, n_blocks: int, total_q: int, m: int, sm_count: int) -> TopkPlan | None:
    """Net path shape, or None where it does not apply (M > 16, K > 32 x 64). P, V: _net_lanes_values (8K: P4 V16,
    128K: P32 V32). Warps per CTA: 1 (measured best at 8K prefill and 128K decode; no shared memory, so up to 32
    one-warp CTAs per SM), doubled only while more than 16 warps per SM would remain."""
    if not 0 <= m <= NET_MAX_M or not 1 <= n_blocks <= NET_LANES[-1] * NET_VALUES[-1]:
        return None
    lanes, v = _net_lanes_values(n_blocks)
    n_warps = -(-total_q // (32 // lanes)) * n_heads
    warps = 1
    while warps < 8 and n_warps // warps > 16 * sm_count:
        warps *= 2
    return TopkPlan(path="net", splits=1, cap=max(m, 1), warps=warps, log_g=(32 // lanes).bit_length() - 1,
                    threads_per_row=lanes, values_per_thread=v)


NET_DECODE_MAX_BLOCKS = 1024  # decode-like shapes: net for REG_SHORT_BLOCKS < K <= this (128K context)


def _use_net_path(n_heads: int, n_blocks: int, total_q: int, m: int, sm_count: int = 132) -> bool:
    """M <= 16 and either short prefill rows (K <= 64, >= 16 rows per SM: 8K context) or decode-like shapes (< 16
    rows per SM) with 256 < K <= 1024 (128K context: P32 V32 measured 3.52 / 5.17 us vs row 4.35 / 5.43, H100).
    ``MSA_TOPK_NET=0`` turns it off (A/B: the reg / row paths' plan); ``MSA_TOPK_REG=0`` too (the plan before both)."""
    if "0" in (os.environ.get("MSA_TOPK_NET", "1"), os.environ.get("MSA_TOPK_REG", "1")) or not 0 < m <= NET_MAX_M:
        return False
    rows = total_q * n_heads
    if rows >= 16 * sm_count:
        return n_blocks <= NET_MAX_BLOCKS
    return REG_SHORT_BLOCKS < n_blocks <= NET_DECODE_MAX_BLOCKS


COOP_MAX_M = 16  # coop path (topk_coop_core.cuh, kCoopMaxM)
COOP_CAP = 64  # candidates per row before the net fallback (kCoopCap)
COOP_SHAPES = ((1, 8), (2, 8), (4, 8), (2, 16), (4, 16), (8, 16))  # (G tokens, W warps) per CTA; V = 32 G / W
COOP_ROW_BLOCKS = 1024  # coop / ccoop: blocks per CTA and row (topk_coop_core.cuh, kCoopRowBlocks)
# ccoop: a cluster of ceil(K / 1024) <= 8 CTAs per G rows
CCOOP_MAX_SLICES = 8
CCOOP_SHAPES = ((2, 8), (4, 8), (4, 16), (8, 16))  # (G tokens per cluster, W warps per CTA); G <= slices


def _use_coop_path(n_heads: int, n_blocks: int, total_q: int, m: int, sm_count: int = 132) -> bool:
    """Decode-like shapes (< 16 rows per SM) with 256 < K <= 1024 (128K context) and M <= 16: the coop path instead
    of net P32 V32 (one warp per row). ``MSA_TOPK_COOP=0`` turns it off (A/B: the net plan); so do ``MSA_TOPK_NET=0``
    and ``MSA_TOPK_REG=0`` (the older plans)."""
    if "0" in (os.environ.get("MSA_TOPK_COOP", "1"), os.environ.get("MSA_TOPK_NET", "1"),
               os.environ.get("MSA_TOPK_REG", "1")) or not 0 < m <= COOP_MAX_M:
        return False
    return total_q * n_heads < 16 * sm_count and REG_SHORT_BLOCKS < n_blocks <= NET_DECODE_MAX_BLOCKS


TCOOP_MIN_TOKENS = 32  # tcoop: total_q from which its clusters (8 tokens of one head each) beat coop's one-row CTAs


def _use_tcoop(n_heads: int, n_blocks: int, total_q: int, m: int, sm_count: int) -> bool:
    """Where the coop path applies with one row per CTA (rows <= SMs / 2) and total_q >= TCOOP_MIN_TOKENS: tcoop
    instead. H200, session 18 (us per call, tcoop vs coop): 128K q64 H1 2.73-2.77 vs 3.04-3.13, q32 2.68 vs 2.95-2.97,
    64K q64 2.73 vs 2.78, 96K q64 2.75 vs 2.92, 128K q32 H2 2.80 vs 3.12 (runs 5-6). Few tokens lose: q16 2.64 vs
    2.66, q8 2.58 vs 2.52, q4 2.55 vs 2.40, q1 2.51 vs 2.26 (run 6) -- coop's cost is the machine's total line
    requests (rows x 1024), small there, while tcoop still pays the exchange. More rows keep coop's two- and four-row
    CTAs (run 1: 128K q64 H2 3.50 vs 3.46, H4 4.02 vs 3.93, q128 H1 3.56 vs 3.44). ``MSA_TOPK_TCOOP=0``: off (A/B)."""
    if os.environ.get("MSA_TOPK_TCOOP", "1") == "0" or not _use_coop_path(n_heads, n_blocks, total_q, m, sm_count):
        return False
    return total_q >= TCOOP_MIN_TOKENS and 2 * total_q * n_heads <= sm_count


def _ccoop_shape(n_heads: int, n_blocks: int, total_q: int, m: int, sm_count: int) -> tuple[int, int] | None:
    """(G rows per cluster, W warps per CTA) where the ccoop path is the default, else None. It applies to decode-like
    rows (< 16 per SM) of 1024 < K <= 8192 blocks (256K-1M context), M <= 16, and wins where few clusters carry the
    rows: the smallest G whose grid (ceil(K / 1024) CTAs x ceil(rows / G) clusters) fills at most half the SMs.
    H200, session 9 run 1 (us per call; the default before in brackets): 1M H1 q64 G8W16 6.04 (cluster 6.59), 1M H1
    q32 G4W8 5.2 (cluster 6.4), 256K H1 q64 G2W8 4.75 (row 6.33); more rows stay where they were: 1M H2 q64 (G8W16
    8.46 vs cluster 8.33), 1M H4 q64 (12.8-13.2 vs cluster 10.85). ``MSA_TOPK_CCOOP=0`` turns it off (A/B)."""
    if os.environ.get("MSA_TOPK_CCOOP", "1") == "0" or not 0 < m <= COOP_MAX_M:
        return None
    rows = total_q * n_heads
    if not (rows < 16 * sm_count and COOP_ROW_BLOCKS < n_blocks <= CCOOP_MAX_SLICES * COOP_ROW_BLOCKS):
        return None
    slices = -(-n_blocks // COOP_ROW_BLOCKS)
    for g in (2, 4, 8):
        if g <= slices and slices * -(-rows // g) <= sm_count // 2:
            return g, 16 if g == 8 else 8
    return None


POOL_GROUP = 16  # pool path: blocks per group (topk_pool_core.cuh, kPoolGroup)
POOL_MAX_BLOCKS = 16384  # K <= 32 lanes x 32 groups x 16 blocks (kPoolMaxLaneGroups)
POOL_MIN_ROWS = 64  # the default from this many rows (total_q * H): its fixed select chain loses with fewer rows
POOL_MAX_WARPS = 8  # max-pool CTA: 8 warps (a token's 8 group maxima one sector)
POOL_CTA_MAX_ROWS = 256  # up to this many rows: the select launch programmatic-dependent, in CTA form where K > 2048
POOL_CTA_MIN_GROUPS = 256  # CTA form from J = 8 warps (K > 2048; 256K q64 H4, J = 4: warp form 5.98 vs CTA 6.40 us)
POOL_FLAG_PDL = 16  # topk_pool_select flags bit 4: launch 1 signals the select launch at entry
POOL_FLAG_CTA = 64  # topk_pool_select flags bit 6: the select launch in CTA form (a row per CTA of 32 J threads)
POOL_FLAG_REC = 128  # topk_pool_select flags bit 7: records (launch 1: each group's 4 best blocks; a warp per row)
POOL_REC_MIN_ROWS = 32  # records form: the default from this many rows (1M H1 q16: 4.14 vs ccoop 4.16, q32 4.25 vs 4.96)


def pool_row_groups(n_blocks: int) -> int:
    """Group maxima per row in the pool workspace (mirrors pool_row_groups: 32 J, J a power of two >= 4)."""
    j = 4
    while 32 * j < -(-n_blocks // POOL_GROUP):
        j *= 2
    return 32 * j


def _pool_records() -> bool:
    """The pool path's records form unless ``MSA_TOPK_POOL_REC=0`` or ``MSA_TOPK_POOL_CTA=1`` asks for another."""
    return os.environ.get("MSA_TOPK_POOL_REC", "1") != "0" and os.environ.get("MSA_TOPK_POOL_CTA") != "1"


def _use_pool_records(n_heads: int, n_blocks: int, total_q: int, m: int, sm_count: int) -> bool:
    """The pool path in records form (launch 1 writes each group's four best blocks, a warp per row ranks them, no
    gather in the usual row), ahead of ccoop, for decode-like rows (>= POOL_REC_MIN_ROWS, < 16 per SM) of 1024 < K <=
    16384 blocks, M <= 16. H200 session 21 runs 11-12 (us per call; the previous default -> records; the read kernel):
    1M q64 H1 ccoop 5.80 -> 4.81 (read 2.49), H4 CTA form 8.30 -> 7.10 (4.29), H2 6.08 -> 5.61, q32 H1 ccoop 4.96 ->
    4.25, q128 H4 11.86 -> 10.34, q256 H4 19.26 -> 16.83; 512K q64 H1 ccoop 4.91 -> 4.08, H4 6.50 -> 5.30; 256K q64 H1
    ccoop 4.42 -> 3.83, H4 6.02 -> 4.75; 2M q64 H1 7.31 -> 5.91, H4 15.14 -> 10.77; bf16 1M q64 H1 ccoop 6.62 -> 4.60.
    Below 32 rows ccoop stays (1M H1 q1 3.59 vs 3.69, q16 4.16 vs 4.14)."""
    if os.environ.get("MSA_TOPK_POOL", "1") == "0" or not _pool_records() or not 0 < m <= COOP_MAX_M:
        return False
    rows = total_q * n_heads
    return POOL_REC_MIN_ROWS <= rows < 16 * sm_count and COOP_ROW_BLOCKS < n_blocks <= POOL_MAX_BLOCKS


def _use_pool(n_heads: int, n_blocks: int, total_q: int, m: int, sm_count: int) -> bool:
    """Decode-like rows (< 16 per SM) of 1024 < K <= 16384 blocks, M <= 16, >= POOL_MIN_ROWS rows, where ccoop does not
    apply. H200, session 19 (us per call, pool vs the previous default; runs 8-10): 1M q64 H4 8.60 vs cluster 10.44, H2
    7.34 vs 8.18, q128 H4 11.86 vs 17.64, q32 H4 7.33 vs 8.05; 512K q64 H4 7.35 vs row 9.34, H2 6.27 vs 8.48; 256K q64 H4
    6.41 vs row 6.84; 2M q64 H1 8.10 vs cluster 8.40. Where ccoop applies (few rows) it stays: 1M q64 H1 ccoop 5.78 vs
    pool 6.08-6.44, 512K 4.95 vs 5.62, 256K 4.37 vs 5.19. ``MSA_TOPK_POOL=0`` turns it off (A/B)."""
    if os.environ.get("MSA_TOPK_POOL", "1") == "0" or not 0 < m <= COOP_MAX_M:
        return False
    rows = total_q * n_heads
    return (POOL_MIN_ROWS <= rows < 16 * sm_count and COOP_ROW_BLOCKS < n_blocks <= POOL_MAX_BLOCKS
            and _ccoop_shape(n_heads, n_blocks, total_q, m, sm_count) is None)


def _coop_plan(n_heads: int, n_blocks: int, total_q: int, m: int, sm_count: int) -> TopkPlan | None:
    """Coop path shape, or None where it does not apply (M > 16, K > 1024). H200 (session 8 run 7, us per call at
    128K decode, the ballot-ranked bound): rows <= SMs / 2 -> one row per CTA of 8 warps (H1 q64: G1W8 3.04 vs G2W16
    3.13); two-row CTAs <= SMs -> two rows per CTA of 16 warps (H2 q64: 3.45 vs G1W8 3.59; H4 q64: 4.02 vs G2W8 4.20);
    four-row CTAs <= SMs -> four rows per CTA of 16 warps (H4 q128: G4W16 4.56 vs G2W8 5.15, G2W16 6.92); more rows
    -> two rows per CTA of 8 warps (unmeasured since the bound change)."""
    if not 0 <= m <= COOP_MAX_M or not 1 <= n_blocks <= NET_DECODE_MAX_BLOCKS:
        return None
    rows = total_q * n_heads
    if 2 * rows <= sm_count:
        g, w = 1, 8
    elif -(-rows // 2) <= sm_count:
        g, w = 2, 16
    elif -(-rows // 4) <= sm_count:
        g, w = 4, 16
    else:
        g, w = 2, 8
    return TopkPlan(path="coop", splits=1, cap=COOP_CAP, warps=w, log_g=g.bit_length() - 1)


def plan(n_heads: int, n_blocks: int, total_q: int, m: int, sm_count: int, itemsize: int = 4) -> TopkPlan:
    """Launch shape from the problem shape only (no data). ``itemsize``: bytes per score (4 fp32, 2 bf16)."""
    path = os.environ.get("MSA_TOPK_PATH")
    if not path:
        if _use_tcoop(n_heads, n_blocks, total_q, m, sm_count):
            path = "tcoop"
        elif _use_coop_path(n_heads, n_blocks, total_q, m, sm_count):
            path = "coop"
        elif _use_pool_records(n_heads, n_blocks, total_q, m, sm_count):
            path = "pool"
        elif _ccoop_shape(n_heads, n_blocks, total_q, m, sm_count):
            path = "ccoop"
        elif _use_pool(n_heads, n_blocks, total_q, m, sm_count):
            path = "pool"
        elif _use_net_path(n_heads, n_blocks, total_q, m, sm_count):
            path = "net"
        elif _use_reg_path(n_heads, n_blocks, total_q, m, sm_count):
            path = "reg"
        elif _use_warp_path(n_heads, n_blocks, total_q):
            path = "warp"
        elif _use_cluster_path(n_heads, n_blocks, total_q, m) and _cluster_plan(n_heads, n_blocks, total_q, m,
                                                                                sm_count):
            path = "cluster"
        elif _use_row_path(n_heads, n_blocks, total_q, m, sm_count) and _row_plan(n_heads, n_blocks, total_q, m,
                                                                                  sm_count, itemsize):
            path = "row"
        else:
            path = "block"
    if path not in ("block", "warp", "row", "cluster", "reg", "net", "coop", "ccoop", "tcoop", "pool"):
        raise ValueError(f"MSA_TOPK_PATH: expected 'block', 'warp', 'row', 'cluster', 'reg', 'net', 'coop', 'ccoop', "
                         f"'tcoop' or 'pool', got {path!r}")
    if path == "pool":
        if not 0 <= m <= COOP_MAX_M or not 1 <= n_blocks <= POOL_MAX_BLOCKS:
            raise ValueError(f"MSA_TOPK_PATH=pool: not applicable (M = {m} not in 0..{COOP_MAX_M} or K = {n_blocks} > "
                             f"{POOL_MAX_BLOCKS})")
        # Few rows: the select launch in CTA form (one row per CTA, a group per thread, speculative gather; K > 2048) as
        # a programmatic dependent launch of the max-pool launch (its CTAs resident and waiting). H200 session 20 run
        # 10, us per call (warp form, 4 rows per CTA, dependent -> CTA form, dependent): 1M q64 H4 8.88 -> 8.25, H2
        # 6.94 -> 6.23, q32 H4 6.83 -> 6.15; 512K q64 H4 6.90 -> 6.43; 2M q64 H1 7.30 -> 7.25; 1M q64 H4 with 40 /
        # 100 good recent blocks 9.47 -> 8.60 / 13.21 -> 8.85; smooth rows (a random walk of small steps) 13.12 ->
        # 14.12. 256K (J = 4) and many rows lose (1M q128 H4, 512 rows: plain warp form 11.89 vs CTA form 14.28): a
        # warp per row there, dependent with 4 rows per CTA up to 256 rows, plain above (the dependent launch lost at
        # 512 rows, session 19 run 16). MSA_TOPK_POOL_CTA=0 / 1 and MSA_TOPK_POOL_PDL=0 / 1 override.
        pdl = os.environ.get("MSA_TOPK_POOL_PDL")
        if m > 0 and _pool_records():
            # Records form (the default): a warp per row, one row per CTA (J = 32 stages 16 KB of records per warp),
            # programmatic-dependent at every row count once both launches prefer the same shared-memory split (1M
            # q64 H1 5.44 plain -> 4.81; q256 H4 17.44 -> 16.83; session 21 runs 11-12).
            return TopkPlan(path="pool", splits=1, cap=COOP_CAP, warps=1, log_g=0,
                            flags=POOL_FLAG_REC | (POOL_FLAG_PDL if pdl != "0" else 0))
        few = m > 0 and total_q * n_heads <= POOL_CTA_MAX_ROWS
        cta = os.environ.get("MSA_TOPK_POOL_CTA")
        cta = m > 0 and (few and pool_row_groups(n_blocks) >= POOL_CTA_MIN_GROUPS if cta is None else cta != "0")
        pdl = m > 0 and (few if pdl is None else pdl != "0")
        flags = (POOL_FLAG_PDL if pdl else 0) | (POOL_FLAG_CTA if cta else 0)
        warps = pool_row_groups(n_blocks) // 32 if cta else 4 if pdl else 1
        return TopkPlan(path="pool", splits=1, cap=COOP_CAP, warps=warps, log_g=0, flags=flags)
    if path == "tcoop":
        if not 0 <= m <= COOP_MAX_M or not 1 <= n_blocks <= COOP_ROW_BLOCKS:
            raise ValueError(f"MSA_TOPK_PATH=tcoop: not applicable (M = {m} not in 0..{COOP_MAX_M} or K = {n_blocks} > "
                             f"{COOP_ROW_BLOCKS})")
        return TopkPlan(path="tcoop", splits=1, cap=COOP_CAP, warps=8, log_g=0)
    if path == "ccoop":
        if not 0 <= m <= COOP_MAX_M or not COOP_ROW_BLOCKS < n_blocks <= CCOOP_MAX_SLICES * COOP_ROW_BLOCKS:
            raise ValueError(f"MSA_TOPK_PATH=ccoop: not applicable (M = {m} not in 0..{COOP_MAX_M} or K = {n_blocks} "
                             f"not in {COOP_ROW_BLOCKS + 1}..{CCOOP_MAX_SLICES * COOP_ROW_BLOCKS})")
        slices = -(-n_blocks // COOP_ROW_BLOCKS)
        g0, w0 = _ccoop_shape(n_heads, n_blocks, total_q, m, sm_count) or ((4, 16) if slices >= 4 else (2, 8))
        g = _env_int("MSA_TOPK_G") or g0
        warps = _env_int("MSA_TOPK_WARPS") or w0
        if (g, warps) not in CCOOP_SHAPES or g > slices:
            raise ValueError(f"MSA_TOPK_G / MSA_TOPK_WARPS: expected (tokens, warps) in {CCOOP_SHAPES} with tokens <= "
                             f"ceil(K / {COOP_ROW_BLOCKS}) = {slices} for the ccoop path, got ({g}, {warps})")
        return TopkPlan(path="ccoop", splits=1, cap=COOP_CAP, warps=warps, log_g=g.bit_length() - 1, slices=slices)
    if path == "coop":
        pl = _coop_plan(n_heads, n_blocks, total_q, m, sm_count)
        if pl is None:
            raise ValueError(f"MSA_TOPK_PATH=coop: not applicable (M = {m} not in 0..{COOP_MAX_M} or K = {n_blocks} > "
                             f"{NET_DECODE_MAX_BLOCKS})")
        g = _env_int("MSA_TOPK_G") or 1 << pl.log_g
        warps = _env_int("MSA_TOPK_WARPS") or pl.warps
        if (g, warps) not in COOP_SHAPES:
            raise ValueError(f"MSA_TOPK_G / MSA_TOPK_WARPS: expected (tokens, warps) in {COOP_SHAPES} for the coop path, "
                             f"got ({g}, {warps})")
        return TopkPlan(path="coop", splits=1, cap=pl.cap, warps=warps, log_g=g.bit_length() - 1)
    if path == "net":
        pl = _net_plan(n_heads, n_blocks, total_q, m, sm_count)
        if pl is None:
            raise ValueError(f"MSA_TOPK_PATH=net: not applicable (M = {m} not in 0..{NET_MAX_M} or K = {n_blocks} > "
                             f"{NET_LANES[-1] * NET_VALUES[-1]})")
        lanes = _env_int("MSA_TOPK_LANES") or pl.threads_per_row
        if lanes not in NET_LANES or lanes * NET_VALUES[-1] < n_blocks:
            raise ValueError(f"MSA_TOPK_LANES: expected one of {NET_LANES} with 64 * lanes >= K = {n_blocks}, got {lanes}")
        v = _env_int("MSA_TOPK_V") or _net_values(n_blocks, lanes)
        if v not in NET_VALUES or lanes * v < n_blocks:
            raise ValueError(f"MSA_TOPK_V: expected one of {NET_VALUES} with lanes * v >= K = {n_blocks}, got {v}")
        warps = _env_int("MSA_TOPK_WARPS") or pl.warps
        if not 1 <= warps <= 8:
            raise ValueError(f"MSA_TOPK_WARPS: expected 1..8 for the net path, got {warps}")
        return TopkPlan(path="net", splits=1, cap=pl.cap, warps=warps, log_g=(32 // lanes).bit_length() - 1,
                        threads_per_row=lanes, values_per_thread=v)
    if path == "reg":
        pl = _reg_plan(n_heads, n_blocks, total_q, m, sm_count)
        if pl is None:
            raise ValueError(f"MSA_TOPK_PATH=reg: not applicable (M = {m} not in 0..{ROW_MAX_M} or K = {n_blocks} > "
                             f"{REG_MAX_BLOCKS})")
        lanes = _env_int("MSA_TOPK_LANES") or pl.threads_per_row
        if lanes not in REG_LANES or lanes * 32 < n_blocks:
            raise ValueError(f"MSA_TOPK_LANES: expected one of {REG_LANES} with 32 * lanes >= K = {n_blocks}, got {lanes}")
        v = _env_int("MSA_TOPK_V") or _reg_values(n_blocks, lanes)
        if v not in REG_VALUES or lanes * v < n_blocks:
            raise ValueError(f"MSA_TOPK_V: expected one of {REG_VALUES} with lanes * v >= K = {n_blocks}, got {v}")
        warps = _env_int("MSA_TOPK_WARPS") or pl.warps
        if not 1 <= warps <= 8:
            raise ValueError(f"MSA_TOPK_WARPS: expected 1..8 for the reg path, got {warps}")
        cap = _env_int("MSA_TOPK_CAP") or (max(n_blocks, m, 1) if n_blocks <= REG_SHORT_BLOCKS else row_capacity(m))
        if cap < max(m, 1) or reg_smem_bytes(warps, lanes, cap) > SMEM_LIMIT:
            raise ValueError(f"MSA_TOPK_CAP: expected >= {max(m, 1)} and within shared memory, got {cap}")
        return TopkPlan(path="reg", splits=1, cap=cap, warps=warps, log_g=(32 // lanes).bit_length() - 1,
                        threads_per_row=lanes, values_per_thread=v)
    if path == "cluster":
        pl = _cluster_plan(n_heads, n_blocks, total_q, m, sm_count)
        if pl is None:
            raise ValueError(f"MSA_TOPK_PATH=cluster: not applicable (M = {m} not in 0..{ROW_MAX_M} or K = {n_blocks} "
                             "slices do not fit shared memory)")
        g = _env_int("MSA_TOPK_G")
        log_g = pl.log_g if g is None else g.bit_length() - 1
        if g is not None and (g < 1 or g != 1 << log_g or g > 32):
            raise ValueError(f"MSA_TOPK_G: expected a power of two in 1..32, got {g}")
        slices = _env_int("MSA_TOPK_SLICES") or pl.slices
        if not 1 <= slices <= CLUSTER_MAX_SLICES:
            raise ValueError(f"MSA_TOPK_SLICES: expected 1..{CLUSTER_MAX_SLICES}, got {slices}")
        warps = _env_int("MSA_TOPK_WARPS") or max(pl.warps, 1 << log_g)
        if warps < (1 << log_g) or warps > 32:
            raise ValueError(f"MSA_TOPK_WARPS: expected {1 << log_g}..32 for the cluster path with G = {1 << log_g}, "
                             f"got {warps}")
        return TopkPlan(path="cluster", splits=1, cap=pl.cap, warps=warps, log_g=log_g, slices=slices,
                        flags=pl.flags if warps <= 8 else 0)
    if path == "row":
        pl = _row_plan(n_heads, n_blocks, total_q, m, sm_count, itemsize)
        if pl is None:
            raise ValueError(f"MSA_TOPK_PATH=row: not applicable (M = {m} > {ROW_MAX_M} or K = {n_blocks} rows do "
                             "not fit shared memory)")
        g = _env_int("MSA_TOPK_G")
        log_g = pl.log_g if g is None else g.bit_length() - 1
        if g is not None and (g < 1 or g != 1 << log_g or g > 32):
            raise ValueError(f"MSA_TOPK_G: expected a power of two in 1..32, got {g}")
        warps = _env_int("MSA_TOPK_WARPS") or max(pl.warps, 1 << log_g)
        if warps < (1 << log_g) or warps > 32:
            raise ValueError(f"MSA_TOPK_WARPS: expected {1 << log_g}..32 for the row path with G = {1 << log_g}, "
                             f"got {warps}")
        return TopkPlan(path="row", splits=1, cap=pl.cap, warps=warps, log_g=log_g)
    if path == "warp":
        pl = _warp_plan(n_heads, n_blocks, total_q, m, sm_count)
        warps = min(_env_int("MSA_TOPK_WARPS") or pl.warps, MAX_WARPS)
        splits = _env_int("MSA_TOPK_SPLITS") or pl.splits
        merge_warps = min(_env_int("MSA_TOPK_MERGE_WARPS") or max(1, min(4, splits)), MAX_WARPS)
        return TopkPlan(path="warp", splits=1 if m <= 0 else splits, cap=pl.cap, warps=warps, merge_warps=merge_warps)
    pl = _block_plan(n_heads, n_blocks, total_q, m, sm_count)
    g = _env_int("MSA_TOPK_G")
    log_g = pl.log_g if g is None else g.bit_length() - 1
    if g is not None and (g < 1 or g != 1 << log_g or g > 32):
        raise ValueError(f"MSA_TOPK_G: expected a power of two in 1..32, got {g}")
    p = _env_int("MSA_TOPK_P") or pl.threads_per_row
    splits = _env_int("MSA_TOPK_SPLITS") or pl.splits
    v = _env_int("MSA_TOPK_V") or (pl.values_per_thread if (1 << log_g) * p <= BLOCK_WIDE_MAX_THREADS else BLOCK_V)
    if v not in (BLOCK_V, 2 * BLOCK_V):
        raise ValueError(f"MSA_TOPK_V: expected {BLOCK_V} or {2 * BLOCK_V}, got {v}")
    return TopkPlan(path="block", splits=1 if m <= 0 else splits, cap=block_capacity(m, p), log_g=log_g,
                    threads_per_row=p, values_per_thread=v)


@functools.lru_cache(maxsize=16)
def _empty(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A cached 0-element tensor: the binding's "not given" for optional tensor arguments."""
    return torch.empty(0, dtype=dtype, device=device)


NET_TIMELINE_SLOTS = 9  # u64 stamps per CTA, net / coop timeline builds (topk_net_core.cuh, kNetTimelineSlots)
CLUSTER_TIMELINE_SLOTS = 16  # u64 stamps per CTA in a timeline build (topk_cluster_core.cuh, kTimelineSlots)
# kCluster* (A/B variants, topk_cluster_core.cuh): local_merge = per-slice exact top M -> owner lists, one cluster
# barrier, bitonic merge tree (M <= 32; larger M runs the default algorithm); one_batch = 32 staging loads in
# flight per thread (warps <= 8)
CLUSTER_FLAG_BITS = {"always_exit_sync": 1, "attr_for_one": 2, "sorted_merge": 4, "local_merge": 8, "one_batch": 16}
CLUSTER_FLAGS_END = 32


def cluster_flags(default: int = 0) -> int:
    """Cluster-path A/B variant bits from ``MSA_TOPK_CLUSTER_FLAGS`` (an int, or names from CLUSTER_FLAG_BITS
    joined by ``+``); unset: ``default`` (the plan's flags; 0 = the default kernel). Every variant is exact."""
    v = os.environ.get("MSA_TOPK_CLUSTER_FLAGS", "").strip()
    if not v:
        return default
    if v.isdigit():
        flags = int(v)
    else:
        try:
            flags = sum(CLUSTER_FLAG_BITS[name] for name in v.split("+"))
        except KeyError as e:
            raise ValueError(f"MSA_TOPK_CLUSTER_FLAGS: unknown name {e.args[0]!r}, expected an int or names from "
                             f"{sorted(CLUSTER_FLAG_BITS)} joined by '+'") from None
    if not 0 <= flags < CLUSTER_FLAGS_END:
        raise ValueError(f"MSA_TOPK_CLUSTER_FLAGS: expected 0..{CLUSTER_FLAGS_END - 1}, got {flags}")
    return flags


def run(max_score, topk, num_valid_pages, force_begin_blocks, force_end_blocks, out, trace=None):
    """Launch on validated arguments (see module doc); returns ``out`` ([total_q, H, topk] int32).
    ``trace`` (diagnostic): row path: int64 tensor of >= 3 * CTAs for each CTA's %globaltimer stamps (start, rows
    staged, warp 0 done); cluster path: int64 tensor of >= CLUSTER_TIMELINE_SLOTS * CTAs (zeroed by the caller)
    for the per-phase stamps, recorded by the timeline build of the module (loaded for such a call); net / coop
    paths: int64 tensor of >= NET_TIMELINE_SLOTS * CTAs (the same build; topk_net_core.cuh, NetTimelineSlot)."""
    n_heads, n_blocks, total_q = max_score.shape
    device = max_score.device
    if out is None:
        out = torch.empty((total_q, n_heads, topk), dtype=torch.int32, device=device)
    if total_q == 0 or n_heads == 0:
        return out
    m = topk - force_begin_blocks - force_end_blocks
    index = device.index if device.index is not None else torch.cuda.current_device()
    p = plan(n_heads, n_blocks, total_q, m, _sm_count(index), max_score.element_size())
    if trace is not None and p.path in ("tcoop", "pool"):
        raise ValueError(f"trace: the {p.path} path records no timeline (the coop, net, row and cluster paths do: "
                         "MSA_TOPK_TCOOP=0 / MSA_TOPK_POOL=0 for those shapes)")
    if isinstance(num_valid_pages, torch.Tensor):
        nvp, nvp_scalar = num_valid_pages, 0
    else:
        nvp, nvp_scalar = _empty(device, torch.int32), n_blocks if num_valid_pages is None else int(num_valid_pages)
    words = p.workspace_words(n_heads, total_q, m, n_blocks)
    ws = torch.empty(words, dtype=torch.int32, device=device) if words else _empty(device, torch.int32)
    module = load_module(device, timeline=trace is not None and p.path in ("cluster", "net", "coop"))
    if p.path == "pool":
        module.topk_pool_select(max_score, topk, nvp, nvp_scalar, force_begin_blocks, force_end_blocks, out, ws,
                                POOL_MAX_WARPS, p.warps, p.flags)
    elif p.path == "tcoop":
        module.topk_tcoop_select(max_score, topk, nvp, nvp_scalar, force_begin_blocks, force_end_blocks, out)
    elif p.path == "ccoop":
        module.topk_ccoop_select(max_score, topk, nvp, nvp_scalar, force_begin_blocks, force_end_blocks, out,
                                 1 << p.log_g, p.warps)
    elif p.path == "coop":
        module.topk_coop_select(max_score, topk, nvp, nvp_scalar, force_begin_blocks, force_end_blocks, out,
                                1 << p.log_g, p.warps, _empty(device, torch.int64) if trace is None else trace)
    elif p.path == "net":
        module.topk_net_select(max_score, topk, nvp, nvp_scalar, force_begin_blocks, force_end_blocks, out,
                               p.threads_per_row, p.values_per_thread, p.warps,
                               _empty(device, torch.int64) if trace is None else trace)
    elif p.path == "reg":
        module.topk_reg_select(max_score, topk, nvp, nvp_scalar, force_begin_blocks, force_end_blocks, out,
                               p.threads_per_row, p.values_per_thread, p.warps, p.cap)
    elif p.path == "row":
        module.topk_row_select(max_score, topk, nvp, nvp_scalar, force_begin_blocks, force_end_blocks, out, p.log_g,
                               p.warps, p.cap, _empty(device, torch.int64) if trace is None else trace)
    elif p.path == "cluster":
        module.topk_cluster_select(max_score, topk, nvp, nvp_scalar, force_begin_blocks, force_end_blocks, out,
                                   p.log_g, p.slices, p.warps, p.cap, cluster_flags(p.flags),
                                   _empty(device, torch.int64) if trace is None else trace)
    elif p.path == "block":
        module.topk_block_select(
            max_score, topk, nvp, nvp_scalar, force_begin_blocks, force_end_blocks, out, ws, p.splits, p.log_g,
            p.threads_per_row, p.cap, p.values_per_thread,
        )
    else:
        module.topk_select(
            max_score, topk, nvp, nvp_scalar, force_begin_blocks, force_end_blocks, out, ws, p.splits, p.warps,
            p.merge_warps, p.cap,
        )
    return out


def launch_read(x: torch.Tensor, sink: torch.Tensor, ctas: int = 0) -> None:
    """Read every byte of ``x`` once at full parallelism (the benchmarks' measured-read floor); ``sink``: float32 of
    >= the CTA count (``ctas`` <= 0: one CTA per 256 16-byte vectors, at most 8 per SM)."""
    load_module(x.device).topk_read(x, sink, ctas)


def launch_noop(like: torch.Tensor) -> None:
    """One empty kernel on ``like``'s device and current stream (the launch floor, for benchmarks)."""
    load_module(like.device).topk_noop(like)
