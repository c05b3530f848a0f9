"""SM90 (Hopper) dense FMHA forward: a FlashAttention-3 style warp-specialized TMA + wgmma kernel.

Sources: ``msa/core/csrc/fmha_sm90`` (one tvm-ffi module per dtype x head dim x causal x paged variant, built by
:class:`msa.core.jit.JitSpec`). Split in two like every msa kernel:

* :func:`plan` (host, once per length set): the work list -- one item per (128-query tile, query head) --
  grouped so the KV heads in flight fit L2 and ordered longest first; persistent CTAs take items from it
  dynamically. A cost model (:func:`choose_split`) simulates that dynamic schedule and, where the last wave
  leaves SMs idle (e.g. 4096 equal tiles on 132 SMs) or there are fewer long items than SMs (decode-shaped
  work), splits the tail items along KV: each piece writes a normalised fp32 partial O + LSE to a plan-sized
  workspace and a small combine kernel, launched on the same stream, merges them (CUDA-graph safe).
  :func:`run` builds the plan lazily from an :class:`msa.core.api.FmhaPlan` and caches it on the plan.
* :func:`run` (device): no host synchronisation, and no allocation when ``out`` (and ``lse``) are given.

Built so far: bf16 / fp16, head dim 128 (and 64 and 256 for mode O, where Dqk and Dv may differ), ragged or paged K/V (any power-of-two page size
from 16 to 256: one module per (dtype, head dim, causal, mode), a KV tile filled from one or several pages), causal (bottom-right, per-request
``qo_offset``) or not, any GQA ratio, optional LSE; modes O, O + max_score, max_score only (``MODES``).
FP8 e4m3 (q, k, v all ``float8_e4m3fn``): ragged K/V, mode O (+ LSE), bf16 output, per-tensor or per-head
``q_scale`` / ``k_scale`` / ``v_scale`` / ``o_scale``; wgmma e4m3 for both GEMMs. Its V goes through a pre-pass
(launched by the module, same stream; the attention kernel follows it as a programmatic dependent launch) into a
plan-owned workspace ``[Hkv, D, 128 * tiles]``: V^T with each 16-key group permuted to the order in which the kernel's
P registers hold the keys. Other combinations raise
:class:`NotImplementedError`. SM100 is refused at plan time (the template set is SM90-only).

FP8 softmax (modes O and sparse-Q; :func:`fp8_p_variant`): two builds of each fp8 module. ``"code"`` (fast) writes
P's e4m3 bits straight from two FMAs per score (the code taken linear in log2 P) and sums the P it used on the tensor
core (8 extra columns of the PV GEMM against rows of ones): 1.55x / 1.51x our bf16 at B2 H32 S8K non-causal / causal
on an H200 (exact: 1.25x / 1.17x), O within ~1.2x the exact build's error, but its LSE is that of the P it used
(within 0.13 of the exact LSE where one key dominates a row, typically < 0.04). ``"exp2"`` (exact) computes P with
MUFU.EX2 and the row sums in fp32 (LSE within 2e-3). By default (``$MSA_FP8_SOFTMAX`` =
``auto``) a call that returns the LSE runs the exact build and one that does not runs the fast one; ``fast`` /
``exact`` force one.
"""

from __future__ import annotations

import functools
import heapq
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ._device import sm_count as _num_sms

__all__ = [
    "HEAD_DIMS",
    "DTYPES",
    "KernelPlan",
    "plan",
    "run",
    "jit_spec",
    "jit_specs",
    "available",
    "supports",
]

FAMILY = "fmha_sm90"
SOURCES = ("fmha_sm90_binding.cu.jinja",)
BLOCK_M = 128  # query rows per work item
BLOCK_N = 128  # keys per KV tile of the default build at head dim <= 128 (max-score modules always use 128)
BLOCK_N_D256 = 64  # ... and at head dim 256 (shared memory and registers; see fmha_sm90_traits.cuh)
BLOCK_N_FP8_WIDE = 192  # ... and for the exact (exp2) fp8 non-causal ragged O build at head dim 128 (traits kFp8Wide)
# A/B builds with wider KV tiles (-DMSA_FMHA_SM90_BLOCK_N, ragged O-mode only) report theirs through the module's
# block_n(); plans made through an FmhaPlan take it from there. A KernelPlan made directly by plan() uses
# block_n=, else this environment variable, else default_block_n(); run() refuses a plan whose tile differs from the module's.
BLOCK_N_ENV = "MSA_FMHA_SM90_BLOCK_N"
# Three-consumer-warpgroup A/B builds (-DMSA_FMHA_SM90_MMA_WG=3) run 192-row items; their module reports it through
# block_m(), and a KernelPlan made directly by plan() takes block_m=, else this variable, else 128.
BLOCK_M_ENV = "MSA_FMHA_SM90_BLOCK_M"
PAGE_SIZE = 128  # the default page size (paged sparse-Q needs page = block = 128)
PAGE_SIZES = (16, 32, 64, 128, 256)  # page sizes the paged modules read (a runtime argument of one module)
HEAD_DIMS = (64, 128, 256)  # head dims of the 16-bit O mode (ragged / paged)
HEAD_DIMS_OTHER_MODES = (128,)  # fp8, the max-score modes and sparse-Q: d128 only (GPU-tested there)
DTYPES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float8_e4m3fn: "float8_e4m3fn"}
FP8_DTYPE = torch.float8_e4m3fn  # ragged, mode O only (see the module docstring)
_PRESET_DTYPES = {
    "bf16": "bfloat16",
    "bfloat16": "bfloat16",
    "fp16": "float16",
    "float16": "float16",
    "fp8": "float8_e4m3fn",
    "e4m3": "float8_e4m3fn",
    "float8_e4m3fn": "float8_e4m3fn",
}
# K+V bytes that one section of the work list (a group of KV heads of one request) may touch: sections are
# consumed roughly one at a time by the persistent grid, so this keeps the K/V being read L2-resident.
L2_SECTION_BYTES = 32 << 20
WORK_FIELDS = 12  # int32 per work item, see WorkItem in fmha_sm90_traits.cuh
COMBINE_FIELDS = 8  # int32 per split item, see CombineItem
# fp8 softmax builds of modes O / sparse-Q (jit param fp8_p; see the module docstring and fp8_p_variant()).
FP8_SOFTMAX_ENV = "MSA_FP8_SOFTMAX"
FP8_SOFTMAX_CHOICES = ("auto", "fast", "exact")
FP8_P_VARIANTS = ("code", "exp2")  # fast, exact
FP8_P_MODES = ("o", "sparse_q", "sparse_q2")  # the modes built in both
# Kernel modes (FmhaMode in fmha_sm90_traits.cuh): O (+ LSE); O and max_score; max_score only.
# "sparse_q": MSA sparse prefill, Q-outer (kernels/fmha_sm90_qouter.py): 16-bit K/V, ragged or paged (page 128).
# "sparse_q2": the same items run two by two on 2-CTA clusters that share K / V tiles when their unions are equal.
MODES = {"o": 0, "o_maxscore": 1, "maxscore": 2, "sparse_q": 3, "sparse_q2": 4}
# Split-KV cost model, in units of one 128x128 KV tile of one work item (~1.6 us on H100 at d128):
SPLIT_ITEM_COST = 1.5  # per item / piece: Q load, first QK^T + softmax outside the ping-pong, epilogue
SPLIT_PIECE_COST = 0.5  # extra per piece: the fp32 partial O (64 KiB) written and read back by the combine
SPLIT_COMBINE_COST = 3.0  # the combine launch after the main kernel (launch gap + one pass over the partials)
SPLIT_MIN_GAIN = 0.015  # split only when the simulated makespan drops by more than this fraction
SPLIT_MAX_PIECES_PER_SM = 4
# Pieces shorter than this are not tried (unless the items themselves are shorter): on H100 (2026-11-27) cutting
# B2 H32 S8K's 4 leftover items into 8-tile pieces beat 2-tile pieces (3.590 vs 3.609 ms; unsplit 3.661): the
# CTAs do not finish their last full item in lockstep, which the simulation (equal finish times) cannot see.
SPLIT_MIN_PIECE_TILES = 8
# The max-score modes are served (supports() / run()) for the dtypes their GPU tests passed with on an H100
# (bf16, session 2; fp16, session 3 run 15: 12 + 12 cases); fp8 falls back to the reference.
# MSA_FMHA_SM90_MAX_SCORE=0 turns them off.
MAX_SCORE_ENABLED = os.environ.get("MSA_FMHA_SM90_MAX_SCORE", "1") == "1"
MAX_SCORE_DTYPES = (torch.bfloat16, torch.float16)
# Test/bench hook: a directory of prebuilt modules named <variant_tag>.so (e.g. carried to a GPU host that has
# no compiler); unset means build (or fetch from the msa-cache) through JitSpec.
PREBUILT_ENV = "MSA_FMHA_SM90_PREBUILT"


def fp8_p_variant(want_lse: bool = False) -> str:
    """The fp8 softmax build a mode-O / sparse-Q call runs: ``"code"`` (fast) or ``"exp2"`` (exact); from
    ``$MSA_FP8_SOFTMAX`` (``auto``: exact when the call returns the LSE, else fast; ``fast``; ``exact``)."""
    choice = os.environ.get(FP8_SOFTMAX_ENV, "auto").strip().lower() or "auto"
    if choice not in FP8_SOFTMAX_CHOICES:
        raise ValueError(f"{FP8_SOFTMAX_ENV}: expected one of {FP8_SOFTMAX_CHOICES}, got {choice!r}")
    if choice == "auto":
        return "exp2" if want_lse else "code"
    return "code" if choice == "fast" else "exp2"


def _fp8_p(dtype: str, mode: str, fp8_p: str | None) -> str | None:
    """The fp8_p param of a module: None where there is one build (not fp8, or a mode without a softmax)."""
    if dtype != DTYPES[FP8_DTYPE] or mode not in FP8_P_MODES:
        return None
    fp8_p = fp8_p or FP8_P_VARIANTS[0]
    if fp8_p not in FP8_P_VARIANTS:
        raise ValueError(f"fp8_p: expected one of {FP8_P_VARIANTS}, got {fp8_p!r}")
    return fp8_p


def fp8_p_builds(dtype: str) -> tuple:
    """The fp8_p values a preset builds for ``dtype``: both softmax builds for fp8, (None,) otherwise."""
    return FP8_P_VARIANTS if dtype == DTYPES[FP8_DTYPE] else (None,)


def variant_tag(dtype: str, head_dim: int, causal: bool, paged: bool, mode: str = "o",
                head_dim_v: int | None = None, fp8_p: str | None = None) -> str:
    """Module name; the exact fp8 softmax build of modes O / sparse-Q ends in ``_exp2``."""
    suffix = "" if mode == "o" else f"_{mode}"
    if _fp8_p(dtype, mode, fp8_p) == "exp2":
        suffix += "_exp2"
    dv = "" if head_dim_v in (None, head_dim) else f"v{head_dim_v}"
    return f"fmha_sm90_{dtype}_d{head_dim}{dv}_causal{int(causal)}_paged{int(paged)}{suffix}"


def jit_spec(dtype: str, head_dim: int, causal: bool, paged: bool, arch: str = "sm_90a", mode: str = "o",
             head_dim_v: int | None = None, fp8_p: str | None = None):
    """One module: ``head_dim`` is Dqk (q, k), ``head_dim_v`` Dv (v, out; default Dqk; a different Dv is built for
    16-bit mode O only). ``fp8_p``: the fp8 softmax build of modes O / sparse-Q (``"code"``, the default, or
    ``"exp2"``; see :func:`fp8_p_variant`); ignored elsewhere."""
    from msa.core.jit import JitSpec

    if arch != "sm_90a":
        raise NotImplementedError(f"fmha_sm90: arch {arch!r} is not supported (the kernel uses sm_90a-only wgmma/TMA)")
    if mode not in MODES:
        raise ValueError(f"mode: expected one of {sorted(MODES)}, got {mode!r}")
    fp8_modes = (*FP8_P_MODES, "maxscore")
    if dtype == DTYPES[FP8_DTYPE] and (paged or mode not in fp8_modes):
        raise NotImplementedError(
            f"fmha_sm90: fp8 is built for ragged K/V and modes {' / '.join(map(repr, fp8_modes))} only, got "
            f"paged={paged}, mode={mode!r}"
        )
    params = {"dtype": dtype, "head_dim": int(head_dim), "causal": bool(causal), "paged": bool(paged),
              "mode": MODES[mode]}
    p_variant = _fp8_p(dtype, mode, fp8_p)
    if p_variant is not None:  # only fp8 O / sparse-Q specs carry it: every other module keeps its key
        params["fp8_p"] = p_variant
    if head_dim_v not in (None, head_dim):  # only then: equal-dim specs keep their names and keys
        if dtype == DTYPES[FP8_DTYPE] or mode != "o":
            raise NotImplementedError(f"fmha_sm90: Dqk != Dv is built for 16-bit mode 'o' only, got {dtype} {mode!r}")
        if head_dim_v not in HEAD_DIMS:
            raise ValueError(f"head_dim_v: expected one of {HEAD_DIMS}, got {head_dim_v}")
        params["head_dim_v"] = int(head_dim_v)
    return JitSpec(
        family=FAMILY,
        sources=SOURCES,
        params=params,
        arch=arch,
        use_cutlass=True,
    )


def jit_specs(preset: dict, arch: str) -> list:
    """Warmup generator hook (``msa.core.variants``): every variant a preset's dtypes x head dims need."""
    if arch != "sm_90a":
        return []  # SM100 has no variant of this family; fmha falls back (or refuses) at plan time
    dtypes = [_PRESET_DTYPES[d] for d in preset.get("dtypes", ["bf16"]) if d in _PRESET_DTYPES]
    dims = [d for d in preset.get("head_dim", list(HEAD_DIMS)) if d in HEAD_DIMS]
    mode_o = [
        jit_spec(dt, d, causal, paged, arch, fp8_p=fp8_p)
        for dt in dict.fromkeys(dtypes)
        for d in dims
        for causal in (True, False)
        for paged in (False, True)
        for fp8_p in fp8_p_builds(dt)
        if not (paged and dt == DTYPES[FP8_DTYPE]) and (d in HEAD_DIMS_OTHER_MODES or dt != DTYPES[FP8_DTYPE])
    ]
    # The MSA index pass (score-only, ragged index K, d128): a warmed store for an offline host must hold it too.
    index_pass = [
        jit_spec(dt, d, causal, False, arch, mode="maxscore")
        for dt in dict.fromkeys(dtypes)
        for d in dims
        for causal in (True, False)
        if d in HEAD_DIMS_OTHER_MODES
    ]
    return mode_o + index_pass


def _module(dtype: str, head_dim: int, causal: bool, paged: bool, mode: str = "o", head_dim_v: int | None = None,
            fp8_p: str | None = None):
    return _load_module(dtype, head_dim, causal, paged, mode, head_dim_v, _fp8_p(dtype, mode, fp8_p))


@functools.cache
def _load_module(dtype: str, head_dim: int, causal: bool, paged: bool, mode: str, head_dim_v: int | None,
                 fp8_p: str | None):
    prebuilt = os.environ.get(PREBUILT_ENV)
    if prebuilt:
        import tvm_ffi

        path = Path(prebuilt) / f"{variant_tag(dtype, head_dim, causal, paged, mode, head_dim_v, fp8_p)}.so"
        if not path.is_file():
            raise FileNotFoundError(f"{PREBUILT_ENV}={prebuilt}: no prebuilt module {path.name}")
        return tvm_ffi.load_module(str(path))
    return jit_spec(dtype, head_dim, causal, paged, mode=mode, head_dim_v=head_dim_v, fp8_p=fp8_p).load()


def available(device: torch.device) -> tuple[bool, str]:
    """Cheap check for dispatch: an SM90 CUDA device (no compilation here)."""
    if device.type != "cuda":
        return False, f"tensors are on {device}"
    major, minor = torch.cuda.get_device_capability(device)
    if major != 9:
        return False, f"fmha_sm90 needs an SM90 (Hopper) GPU, device {device} is sm_{major}{minor}"
    return True, ""


def supports(
    *,
    dtype=None,
    head_dim_qk=None,
    head_dim_v=None,
    page_size=None,
    output_o=True,
    output_maxscore=False,
    sparse=False,
    per_head_scales=False,
    kv_dtype=None,
    **_ignored,
) -> tuple[bool, str]:
    """Whether this call is one the built kernels implement (``msa.core.dispatch`` feature gate)."""
    if dtype is not None and dtype not in DTYPES:
        return False, f"fmha_sm90: dtype {dtype} not built (bf16 / fp16 / float8_e4m3fn)"
    if kv_dtype is not None and kv_dtype != dtype:
        return False, f"fmha_sm90: K/V dtype {kv_dtype} under a {dtype} q not built (Q, K, V share one dtype)"
    if dtype == FP8_DTYPE:
        if page_size is not None:
            return False, "fmha_sm90: fp8 with paged K/V not built (ragged only)"
        if output_maxscore and output_o:
            return False, "fmha_sm90: fp8 O + max_score not built (fp8: O + LSE, or score-only)"
        if output_o:
            per_head_scales = False  # the fp8 O module reads per-head scales
        elif per_head_scales:
            return False, "fmha_sm90: fp8 score-only with per-head scale tensors not built (float scales only)"
    mode_o16 = dtype != FP8_DTYPE and output_o and not output_maxscore
    dims = HEAD_DIMS if mode_o16 else HEAD_DIMS_OTHER_MODES
    if head_dim_qk is not None and (
        head_dim_qk not in dims or head_dim_v not in (None, head_dim_qk, *(dims if mode_o16 else ()))
    ):
        why = "Dqk, Dv" if mode_o16 else "Dqk = Dv"
        return False, f"fmha_sm90: head dim {head_dim_qk}/{head_dim_v} not built for this mode ({why} in {dims})"
    if page_size is not None and page_size not in PAGE_SIZES:
        return False, f"fmha_sm90: page_size {page_size} not built (ragged or one of {PAGE_SIZES})"
    if (output_maxscore or not output_o) and not (
        MAX_SCORE_ENABLED and dtype in (None, *MAX_SCORE_DTYPES, FP8_DTYPE)
    ):
        return False, f"fmha_sm90: max_score / output_o=False not enabled for dtype {dtype} (bf16 / fp16 only)"
    if sparse:
        return False, "fmha_sm90: per-token sparse (kv_block_indexes) not implemented yet"
    if per_head_scales:
        return False, "fmha_sm90: per-head scale tensors not implemented yet"
    return True, "ok"




@dataclass(eq=False)
class KernelPlan:
    """What one launch needs besides the tensors (device tensors allocated once, reused every run).

    The scheduler counter in ``workspace`` is zeroed on the launching stream before each launch, so launches
    that share one plan must be stream-ordered (the usual case: one stream, or a CUDA graph). Concurrent launches
    on different streams need a plan (or at least a workspace) each.
    """

    work: torch.Tensor  # int32 [num_work, 12], longest-first sections, split-KV pieces last
    workspace: torch.Tensor  # int32 [1]: the dynamic scheduler's counter (zeroed on the stream per launch)
    num_work: int
    num_ctas: int
    any_keys: bool  # False when no query sees any key (then run writes zeros / -inf without a launch)
    lse_dummy: torch.Tensor  # passed when LSE is not requested
    index_dummy: torch.Tensor  # passed as kv_indices when K/V are ragged
    combine: torch.Tensor | None = None  # int32 [num_split_items, 8] (0 rows: no split)
    # FP8 plans (elem_size 1): per KV tile (block_n tokens) of the transposed V copy, (first source token, valid
    # tokens); work[:, 11] holds each item's first tile. vt_len = block_n * tiles. The copy itself (uint8 [Hkv, D, vt_len])
    # is allocated on first use per (Hkv, D) in fp8_vt; fp8_head_scales caches the float-scale table.
    vt_tiles: torch.Tensor | None = None
    vt_len: int = 0
    fp8_vt: dict | None = None
    fp8_head_scales: dict | None = None
    partial_o: torch.Tensor | None = None  # fp32 [slots, 128, D]: split pieces' normalised O
    partial_lse: torch.Tensor | None = None  # fp32 [slots, 128]: split pieces' LSE
    split: tuple[int, int] = (0, 1)  # (tail items split, pieces per item) chosen by choose_split
    block_n: int = BLOCK_N  # keys per KV tile (must equal the module's block_n())
    block_m: int = BLOCK_M  # query rows per work item (must equal the module's block_m(): 64 per consumer warpgroup)
    page_size: int | None = None  # paged plans: the page size kv_start counts pages of (must equal k.shape[2])


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def build_work_list(
    qo_lens: list[int],
    kv_lens: list[int],
    qo_offsets: list[int],
    kv_starts: list[int],
    num_qo_heads: int,
    num_kv_heads: int,
    causal: bool,
    head_dim: int,
    elem_size: int,
    v_tile_starts: list[int] | None = None,
    block_n: int = BLOCK_N,
    block_m: int = BLOCK_M,
) -> torch.Tensor:
    """Host work list, int32 [num_work, 8] on the CPU (fields of ``WorkItem``).

    Items of one request are grouped in sections of consecutive KV heads whose K+V fit ``L2_SECTION_BYTES``;
    inside a section the query tiles run longest first (heads innermost, so the CTAs in flight share K/V);
    sections run longest first. Items whose tile sees no key (cost 0) sort last but still write O = 0 and
    LSE = -inf. ``v_tile_starts`` (FP8): each request's first tile in the transposed V copy, stored in field 11.
    ``block_n``: keys per KV tile (the module's; n_block_max etc. count these tiles). ``block_m``: query rows per item.
    """
    hpk = num_qo_heads // num_kv_heads
    q_start = 0
    sections: list[tuple[int, int, torch.Tensor]] = []  # (-max cost, order, rows)
    if v_tile_starts is None:
        v_tile_starts = [0] * len(qo_lens)
    for qo, kv, off, kv_start, v_tile0 in zip(qo_lens, kv_lens, qo_offsets, kv_starts, v_tile_starts):
        if qo == 0:
            continue
        m_blocks = torch.arange(_cdiv(qo, block_m), dtype=torch.int64)
        kv_blocks = _cdiv(kv, block_n)
        if causal:
            last_row = torch.clamp((m_blocks + 1) * block_m, max=qo) - 1
            limit = last_row + off  # the tile's last row sees keys j <= limit
            n_max = torch.where(limit < 0, torch.zeros_like(limit), torch.clamp(limit // block_n + 1, max=kv_blocks))
        else:
            n_max = torch.full_like(m_blocks, kv_blocks)
        order = torch.argsort(n_max, descending=True, stable=True)
        m_sorted, n_sorted = m_blocks[order], n_max[order]
        kv_bytes_per_head = max(1, kv * head_dim * 2 * elem_size)
        group = max(1, min(num_kv_heads, L2_SECTION_BYTES // kv_bytes_per_head))
        for g0 in range(0, num_kv_heads, group):
            heads = torch.arange(g0 * hpk, min(num_kv_heads, g0 + group) * hpk, dtype=torch.int64)
            mm = m_sorted.repeat_interleave(heads.numel())
            nn = n_sorted.repeat_interleave(heads.numel())
            hh = heads.repeat(m_sorted.numel())
            rows = torch.stack(
                [
                    torch.full_like(mm, q_start),
                    torch.full_like(mm, qo),
                    torch.full_like(mm, kv_start),
                    torch.full_like(mm, kv),
                    mm,
                    hh,
                    torch.full_like(mm, off),
                    nn,
                    torch.zeros_like(mm),  # n_block_min
                    torch.full_like(mm, -1),  # partial_slot: none
                    nn,  # item_end
                    torch.full_like(mm, v_tile0),  # FP8: first tile of the transposed V copy
                ],
                dim=1,
            )
            sections.append((-int(n_sorted[0]), len(sections), rows))
        q_start += qo
    if not sections:
        return torch.zeros((0, WORK_FIELDS), dtype=torch.int32)
    sections.sort(key=lambda s: (s[0], s[1]))
    return torch.cat([s[2] for s in sections]).to(torch.int32)


def _list_schedule(costs, num_sms: int, heap: list[float] | None = None) -> list[float]:
    """Finish times of ``num_sms`` CTAs taking ``costs`` in order, each the next item when it gets free (what the
    kernel's dynamic work counter does); continues from ``heap`` when given."""
    heap = [0.0] * num_sms if heap is None else list(heap)
    for c in costs:
        heapq.heappushpop(heap, heap[0] + c)
    return heap


def _piece_bounds(n: int, s: int) -> list[tuple[int, int]]:
    """[lo, hi) KV tile ranges of an item of n tiles cut into min(s, n) near-equal pieces, highest first."""
    s = max(1, min(s, n))
    cuts = [n * i // s for i in range(s + 1)]
    return [(cuts[i], cuts[i + 1]) for i in reversed(range(s))]


def choose_split(n_tiles: list[int], num_sms: int) -> tuple[int, int, float, float]:
    """Split-KV cost model: which tail of the work list to cut along KV, and into how many pieces.

    ``n_tiles``: KV tiles per item, in work-list order. The dynamic schedule is simulated with the per-tile and
    per-item costs above; candidates cut the last ``k`` items (the partial last wave ``N mod SMs``, plus one or two
    full waves, or all items for decode-shaped work) into ``s`` pieces each, pieces appended longest first.
    Returns ``(k, s, makespan, makespan_unsplit)``; ``(0, 1, ...)`` means no split pays off.
    """
    n = len(n_tiles)
    costs = [t + SPLIT_ITEM_COST if t > 0 else 0.5 for t in n_tiles]
    base = max(_list_schedule(costs, num_sms)) if n else 0.0
    best = (base, 0, 1)
    if n == 0 or max(n_tiles) < 2:
        return 0, 1, base, base
    ks = sorted({k for k in (n % num_sms, n % num_sms + num_sms, n % num_sms + 2 * num_sms, n) if 0 < k <= n})
    for k in ks:
        head = _list_schedule(costs[: n - k], num_sms)
        tail = n_tiles[n - k :]
        splittable = sum(1 for t in tail if t >= 2)
        if splittable == 0:
            continue
        cands = {2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64}
        cands |= {-(-j * num_sms // splittable) for j in (1, 2, 3, 4)}
        for s in sorted(cands):
            if s < 2 or s > max(tail) or splittable * s > SPLIT_MAX_PIECES_PER_SM * num_sms + splittable:
                continue
            if max(tail) // s < SPLIT_MIN_PIECE_TILES and s > 2:
                continue
            pieces = []
            for t in tail:
                if t >= 2:
                    pieces += [hi - lo + SPLIT_ITEM_COST + SPLIT_PIECE_COST for lo, hi in _piece_bounds(t, s)]
                else:
                    pieces.append(t + SPLIT_ITEM_COST if t > 0 else 0.5)
            pieces.sort(reverse=True)
            span = max(_list_schedule(pieces, num_sms, head)) + SPLIT_COMBINE_COST
            if span < best[0]:
                best = (span, k, s)
    if best[1] and best[0] < base * (1.0 - SPLIT_MIN_GAIN):
        return best[1], best[2], best[0], base
    return 0, 1, base, base


def split_work(work: torch.Tensor, k: int, s: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Cut the last ``k`` items of ``work`` (int32 [N, 12]) with >= 2 KV tiles into ``s`` pieces each.

    Pieces get consecutive partial slots per item and go to the end of the list, longest first. Returns
    ``(work, combine int32 [split items, 8], slots)``.
    """
    n = int(work.shape[0])
    if k <= 0 or s <= 1:
        return work, torch.zeros((0, COMBINE_FIELDS), dtype=torch.int32), 0
    head_rows, tail_rows = work[: n - k], work[n - k :].tolist()
    whole, pieces, combine = [], [], []
    slot = 0
    for order, row in enumerate(tail_rows):
        n_max = row[7]
        if n_max < 2:
            whole.append(row)
            continue
        bounds = _piece_bounds(n_max, s)
        combine.append([row[0], row[1], row[4], row[5], slot, len(bounds), 0, 0])
        for j, (lo, hi) in enumerate(bounds):
            piece = list(row)
            piece[7], piece[8], piece[9], piece[10] = hi, lo, slot + j, n_max
            pieces.append((-(hi - lo), j, order, piece))
        slot += len(bounds)
    pieces.sort(key=lambda p: p[:3])
    rows = whole + [p[3] for p in pieces]
    # whole (short) tail items keep their place before the pieces only if they are longer than the pieces
    rows.sort(key=lambda r: -(r[7] - r[8]))
    tail = torch.tensor(rows, dtype=torch.int32).view(-1, WORK_FIELDS)
    return (
        torch.cat([head_rows, tail]),
        torch.tensor(combine, dtype=torch.int32).view(-1, COMBINE_FIELDS),
        slot,
    )


def plan(
    qo_lens: list[int],
    kv_lens: list[int],
    num_qo_heads: int,
    num_kv_heads: int,
    *,
    causal: bool,
    qo_offset: list[int] | None = None,
    paged: bool = False,
    page_size: int = PAGE_SIZE,
    head_dim: int = 128,
    head_dim_v: int | None = None,
    elem_size: int = 2,
    device: torch.device | str = "cuda",
    split_kv: str | tuple[int, int] | None = "auto",
    num_sms: int | None = None,
    block_n: int | None = None,
    block_m: int | None = None,
) -> KernelPlan:
    """Host planning for :func:`run` from plain lengths (``msa.core.fmha_plan`` plans call this lazily).

    ``qo_offset`` (causal) defaults to ``kv_len - qo_len`` per request. For paged K/V the item's ``kv_start``
    is the request's first slot in the flat ``kv_indices`` (``sum ceil(kv_len / page_size)`` of earlier requests).
    ``split_kv``: ``"auto"`` (the cost model, :func:`choose_split`), ``None`` (never split) or ``(k, s)`` (cut
    the last ``k`` items into ``s`` pieces each; tests). ``num_sms`` overrides the device's SM count.
    ``block_n``: keys per KV tile of the module this plan is for (default: ``$MSA_FMHA_SM90_BLOCK_N`` (ragged) or
    :func:`default_block_n` of the head dims). ``page_size``: paged plans only, any of ``PAGE_SIZES``.
    ``head_dim_v``: Dv (default ``head_dim``); sizes the split-KV partial O. ``block_m``: query rows per work item of
    the module (its block_m(); default ``$MSA_FMHA_SM90_BLOCK_M`` or 128; 192 for three-consumer-warpgroup A/B builds).
    """
    device = torch.device(device)
    if block_n is None:
        env = os.environ.get(BLOCK_N_ENV)
        block_n = int(env) if env and not paged else default_block_n(head_dim, head_dim_v, fp8=elem_size == 1,
                                                                     causal=causal, paged=paged)
    if paged and page_size not in PAGE_SIZES:
        raise ValueError(f"page_size: expected one of {PAGE_SIZES}, got {page_size}")
    if block_n % 16 or not 0 < block_n <= 256:  # wgmma N (QK^T) and bf16 PV K step: 16; fp8 modules use 32s
        raise ValueError(f"block_n: expected a multiple of 16 in [16, 256], got {block_n}")
    if block_m is None:
        block_m = int(os.environ.get(BLOCK_M_ENV) or BLOCK_M)
    if block_m not in (128, 192):
        raise ValueError(f"block_m: expected 128 or 192 (64 query rows per consumer warpgroup), got {block_m}")
    if device.type == "cuda":
        ok, why = available(device)
        if not ok:
            raise NotImplementedError(why)
    qo_lens, kv_lens = [int(x) for x in qo_lens], [int(x) for x in kv_lens]
    if len(qo_lens) != len(kv_lens):
        raise ValueError(f"kv_lens: expected {len(qo_lens)} entries (as qo_lens), got {len(kv_lens)}")
    if num_qo_heads % num_kv_heads:
        raise ValueError(f"num_kv_heads: expected a divisor of num_qo_heads = {num_qo_heads}, got {num_kv_heads}")
    if qo_offset is None:
        qo_offset = [k - q for q, k in zip(qo_lens, kv_lens)]
    starts, acc = [], 0
    for n in kv_lens:
        starts.append(acc)
        acc += _cdiv(n, page_size) if paged else n
    fp8 = elem_size == 1
    vt_tiles, v_tile_starts = None, None
    if fp8:
        if paged:
            raise NotImplementedError("fmha_sm90: fp8 with paged K/V is not built (ragged only)")
        vt_tiles, v_tile_starts = fp8_vt_tiles(kv_lens, starts, block_n)
    work = build_work_list(
        qo_lens, kv_lens, list(qo_offset), starts, num_qo_heads, num_kv_heads, causal, head_dim, elem_size,
        v_tile_starts,
        block_n,
        block_m,
    )
    any_keys = bool(work.shape[0] and int(work[:, 7].max()) > 0)
    if num_sms is None:
        num_sms = 1
        if device.type == "cuda":
            num_sms = _num_sms(device.index if device.index is not None else torch.cuda.current_device())
    if split_kv == "auto":
        k, s, _, _ = choose_split(work[:, 7].tolist(), num_sms)
    elif split_kv is None:
        k, s = 0, 1
    else:
        k, s = (int(x) for x in split_kv)
        k = max(0, min(k, int(work.shape[0])))
    work, combine, slots = split_work(work, k, s)
    num_work = int(work.shape[0])
    return KernelPlan(
        work=work.to(device),
        workspace=torch.zeros(1, dtype=torch.int32, device=device),
        num_work=num_work,
        num_ctas=max(1, min(num_sms, num_work)),
        any_keys=any_keys,
        lse_dummy=torch.empty((1, 1), dtype=torch.float32, device=device),
        index_dummy=torch.zeros(1, dtype=torch.int32, device=device),
        combine=combine.to(device),
        partial_o=torch.empty((max(slots, 1), block_m, head_dim_v or head_dim), dtype=torch.float32, device=device),
        partial_lse=torch.empty((max(slots, 1), block_m), dtype=torch.float32, device=device),
        split=(k, s) if slots else (0, 1),
        vt_tiles=vt_tiles.to(device) if fp8 else None,
        vt_len=block_n * int(vt_tiles.shape[0]) if fp8 else 0,
        fp8_vt={} if fp8 else None,
        fp8_head_scales={} if fp8 else None,
        block_n=block_n,
        block_m=block_m,
        page_size=page_size if paged else None,
    )


def fp8_vt_tiles(kv_lens: list[int], kv_starts: list[int], block_n: int) -> tuple[torch.Tensor, list[int]]:
    """The fp8 V pre-pass's tile list (CPU int32 ``[tiles, 2]``: first key, valid keys of each ``block_n``-key tile of
    every request, request-major) and each request's first tile in it (the transposed copy's layout)."""
    v_tile_starts, parts, tile0 = [], [], 0
    for kv, start in zip(kv_lens, kv_starts):  # one arange per request (1M keys: 8192 tiles, no Python loop over them)
        v_tile_starts.append(tile0)
        n = _cdiv(kv, block_n)
        first = torch.arange(n, dtype=torch.int64) * block_n
        parts.append(torch.stack([start + first, torch.clamp(kv - first, max=block_n)], dim=1))
        tile0 += n
    tiles = torch.cat(parts) if parts else torch.zeros((0, 2), dtype=torch.int64)
    return tiles.to(torch.int32).view(-1, 2), v_tile_starts


def default_block_n(head_dim: int, head_dim_v: int | None = None, *, fp8: bool = False, causal: bool = True,
                    paged: bool = False, fp8_p: str = "code") -> int:
    """Keys per KV tile of the default build for Dqk ``head_dim`` and Dv ``head_dim_v`` (default Dqk): what the
    module's block_n() reports. The exact (``fp8_p="exp2"``) fp8 non-causal ragged modules at head dim 128 use 192-key
    tiles (traits kFp8Wide); plans made through an FmhaPlan follow whichever module runs."""
    dmax = max(head_dim, head_dim_v or head_dim)
    if dmax > 128:
        return BLOCK_N_D256
    if fp8 and not causal and not paged and dmax == 128 and fp8_p == "exp2":
        return BLOCK_N_FP8_WIDE
    return BLOCK_N


def _module_int(mod, name: str, default: int) -> int:
    """An int the module exports as ``name()``; ``default`` for modules built before that export existed."""
    if hasattr(mod, "implements_function") and not mod.implements_function(name):
        return default
    fn = getattr(mod, name, None)
    return default if fn is None else int(fn())


def module_block_n(mod) -> int:
    """Keys per KV tile of a loaded module (modules built before block_n() existed: 128)."""
    return _module_int(mod, "block_n", BLOCK_N)


def module_block_m(mod) -> int:
    """Query rows per work item of a loaded module (modules built before block_m() existed: 128)."""
    return _module_int(mod, "block_m", BLOCK_M)


def _kernel_plan(fplan, head_dim: int, elem_size: int, device: torch.device, block_n: int = BLOCK_N,
                 head_dim_v: int | None = None, block_m: int = BLOCK_M) -> KernelPlan:
    """The KernelPlan of an ``msa.core.api.FmhaPlan``, built on first use and cached in ``fplan.kernel``.
    A KernelPlan passed in must have been made for ``block_n``-key tiles and ``block_m``-row items (the module's)."""
    if isinstance(fplan, KernelPlan):
        if fplan.block_n != block_n:
            raise ValueError(
                f"plan: made for {fplan.block_n}-key KV tiles, but the loaded module uses {block_n} "
                f"(pass block_n={block_n} to plan() or set {BLOCK_N_ENV})"
            )
        if fplan.block_m != block_m:
            raise ValueError(
                f"plan: made for {fplan.block_m}-row query tiles, but the loaded module uses {block_m} "
                f"(pass block_m={block_m} to plan())"
            )
        return fplan
    key = (FAMILY, head_dim, head_dim_v or head_dim, elem_size, str(device), block_n, block_m)
    kp = fplan.kernel.get(key)
    if kp is None:
        kp = plan(
            fplan.qo_lens,
            fplan.kv_lens,
            fplan.num_qo_heads,
            fplan.num_kv_heads,
            causal=fplan.causal,
            qo_offset=fplan.qo_offset_host,
            paged=fplan.page_size is not None,
            page_size=fplan.page_size or PAGE_SIZE,
            head_dim=head_dim,
            head_dim_v=head_dim_v,
            elem_size=elem_size,
            device=device,
            block_n=block_n,
            block_m=block_m,
        )
        fplan.kernel[key] = kp
    return kp


def _scalar_scale(name: str, value) -> float:
    if value is None:
        return 1.0
    if isinstance(value, torch.Tensor):
        raise NotImplementedError(f"fmha_sm90: per-head tensor {name} is not supported yet (pass a float)")
    return float(value)


def _head_values(name: str, value, heads: int, device: torch.device) -> torch.Tensor | float:
    """A scale as a float, or as an fp32 ``[heads]`` tensor on ``device`` (shape checked by the caller)."""
    if value is None:
        return 1.0
    if isinstance(value, torch.Tensor):
        if value.shape != (heads,):
            raise ValueError(f"{name}: expected a [{heads}] tensor, got shape {tuple(value.shape)}")
        return value.to(device=device, dtype=torch.float32)
    return float(value)


def fp8_head_scales(kp: KernelPlan, num_qo_heads: int, num_kv_heads: int, sm_scale: float, q_scale, k_scale,
                    v_scale, o_scale, device: torch.device) -> torch.Tensor:
    """fp32 ``[Hq, 2]``: per query head h, (sm_scale * q_scale[h] * k_scale[h // g], v_scale[h // g] * o_scale[h]).

    Float scales: built once per value tuple and cached on the plan (no per-call work). Tensor scales: computed
    on the device each call (no host synchronisation). A head whose softmax scale is not > 0 gets NaN (the kernel
    tracks the row max of the raw logits, which is only right for a positive scale): its output is NaN, never a
    silently wrong value; float scales are refused on the host instead.
    """
    scales = (q_scale, k_scale, v_scale, o_scale)
    if not any(isinstance(x, torch.Tensor) for x in scales):
        key = (float(sm_scale), *(1.0 if x is None else float(x) for x in scales))
        table = kp.fp8_head_scales.get(key)
        if table is None:
            qk = key[0] * key[1] * key[2]
            if not (qk > 0.0 and math.isfinite(qk)):
                raise NotImplementedError(f"fmha_sm90: the softmax scale sm_scale*q_scale*k_scale must be > 0, got {qk}")
            table = torch.tensor([[qk, key[3] * key[4]]] * num_qo_heads, dtype=torch.float32, device=device)
            kp.fp8_head_scales[key] = table
        return table
    group = num_qo_heads // num_kv_heads
    per_q = torch.arange(num_qo_heads, device=device) // group
    qs = _head_values("q_scale", q_scale, num_qo_heads, device)
    ks = _head_values("k_scale", k_scale, num_kv_heads, device)
    vs = _head_values("v_scale", v_scale, num_kv_heads, device)
    os_ = _head_values("o_scale", o_scale, num_qo_heads, device)
    ones = torch.ones(num_qo_heads, dtype=torch.float32, device=device)
    ks = ks[per_q] if isinstance(ks, torch.Tensor) else ks
    vs = vs[per_q] if isinstance(vs, torch.Tensor) else vs
    qk = ones * float(sm_scale) * qs * ks
    qk = torch.where(qk > 0, qk, torch.full_like(qk, math.nan))
    return torch.stack([qk, ones * vs * os_], dim=1).contiguous()


def _run_fp8(mod, q, k, v, kp: KernelPlan, out, lse, return_lse, head_scales):
    """Launch the fp8 module (V pre-pass + attention + combine) into ``out`` (bf16) / ``lse``."""
    hkv, d = k.shape[1], v.shape[-1]
    vt = kp.fp8_vt.get((hkv, d))
    if vt is None:
        vt = torch.empty(hkv, d, max(kp.vt_len, kp.block_n), dtype=torch.uint8, device=q.device)
        kp.fp8_vt[(hkv, d)] = vt
    mod.fmha_fwd(
        q.view(torch.uint8),
        k.view(torch.uint8),
        v.view(torch.uint8),
        out,
        lse if return_lse else kp.lse_dummy,
        kp.work,
        kp.workspace,
        kp.combine,
        kp.partial_o,
        kp.partial_lse,
        vt,
        kp.vt_tiles,
        head_scales,
        kp.num_ctas,
        bool(return_lse),
    )


def run(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    plan,
    *,
    kv_indices: torch.Tensor | None = None,
    kv_block_indexes: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    max_score: torch.Tensor | None = None,
    sm_scale: float | None = None,
    q_scale=None,
    k_scale=None,
    v_scale=None,
    o_scale=None,
    output_o: bool = True,
    output_maxscore: bool = False,
    return_lse: bool = False,
    lse: torch.Tensor | None = None,
    causal: bool | None = None,
):
    """Run the kernel; returns ``(out, max_score)`` or ``(out, max_score, lse)`` like :func:`msa.core.fmha`.

    ``plan`` is an ``msa.core.api.FmhaPlan`` (its KernelPlan is built on first use and cached on it) or a
    :class:`KernelPlan` from :func:`plan` (then pass ``causal``). Metadata checks are the caller's
    (``msa.core.fmha``); this only refuses what the kernel does not implement. ``max_score`` is
    ``[Hq, max_k_tiles, total_q]`` fp32 (allocated with the plan's ``max_k_tiles`` when not given).
    """
    output_maxscore = bool(output_maxscore or max_score is not None)
    if output_maxscore and not (MAX_SCORE_ENABLED and (q.dtype in MAX_SCORE_DTYPES or q.dtype == FP8_DTYPE)):
        raise NotImplementedError(f"fmha_sm90: max_score output is not enabled for {q.dtype} (bf16 / fp16 only)")
    if output_maxscore and output_o and q.dtype == FP8_DTYPE:
        raise NotImplementedError("fmha_sm90: fp8 O + max_score is not built (fp8: O, or score-only output_o=False)")
    if kv_block_indexes is not None:
        raise NotImplementedError("fmha_sm90: per-token block-sparse attention is not implemented yet (issue 7)")
    if not output_o and not output_maxscore:
        raise ValueError("output_o: nothing to compute (output_o=False and output_maxscore=False)")
    if return_lse and not output_o:
        raise ValueError("return_lse: needs output_o=True")
    mode = "o" if not output_maxscore else ("o_maxscore" if output_o else "maxscore")
    if q.dtype not in DTYPES:
        raise NotImplementedError(f"fmha_sm90: q dtype {q.dtype} is not supported yet (bf16 / fp16 / float8_e4m3fn)")
    fp8 = q.dtype == FP8_DTYPE
    if fp8:
        for name, t in (("k", k), ("v", v if output_o else k)):
            if t is None or t.dtype != FP8_DTYPE:
                raise TypeError(f"{name}: expected float8_e4m3fn like q, got {None if t is None else t.dtype}")
        if k.dim() != 3:
            raise NotImplementedError("fmha_sm90: fp8 with paged K/V is not built (ragged only)")
    if v is None:
        if output_o:
            raise ValueError("v: required with output_o=True")
        v = k
    head_dim, head_dim_v = q.shape[-1], v.shape[-1]
    mode_o16 = not fp8 and output_o and not output_maxscore
    dims = HEAD_DIMS if mode_o16 else HEAD_DIMS_OTHER_MODES
    if head_dim not in dims or k.shape[-1] != head_dim or head_dim_v not in (head_dim, *(dims if mode_o16 else ())):
        raise NotImplementedError(
            f"fmha_sm90: head dims (Dqk={head_dim}, Dv={head_dim_v}) are not built for this mode; built: "
            + (f"Dqk, Dv in {dims}" if mode_o16 else f"Dqk = Dv in {dims}")
        )
    paged = k.dim() == 4
    if paged and k.shape[2] not in PAGE_SIZES:
        raise NotImplementedError(f"fmha_sm90: page_size {k.shape[2]} is not built (one of {PAGE_SIZES})")
    if paged and kv_indices is None:
        raise ValueError("kv_indices: required with paged K/V")
    if isinstance(plan, KernelPlan):
        if causal is None:
            raise ValueError("causal: required when plan is a KernelPlan")
    else:
        causal = plan.causal
    if sm_scale is None:
        sm_scale = 1.0 / math.sqrt(head_dim)
    if fp8 and output_o:
        mod = _module(DTYPES[FP8_DTYPE], head_dim, bool(causal), False, "o",
                      fp8_p=fp8_p_variant(return_lse or lse is not None))
        kp = _kernel_plan(plan, head_dim, 1, q.device, module_block_n(mod), block_m=module_block_m(mod))
        if kp.vt_tiles is None:
            raise ValueError("plan: a KernelPlan for fp8 inputs must be made with elem_size=1")
        hs = fp8_head_scales(
            kp, q.shape[1], k.shape[1], float(sm_scale), q_scale, k_scale, v_scale, o_scale, q.device
        )
        if out is None:
            out = torch.empty(q.shape[0], q.shape[1], v.shape[-1], dtype=torch.bfloat16, device=q.device)
        elif out.dtype != torch.bfloat16:
            raise TypeError(f"out: expected bfloat16 for fp8 inputs, got {out.dtype}")
        if return_lse and lse is None:
            lse = torch.empty(q.shape[0], q.shape[1], dtype=torch.float32, device=q.device)
        if not kp.any_keys:
            out.zero_()
            if return_lse:
                lse.fill_(-math.inf)
        elif kp.num_work:
            _run_fp8(mod, q, k, v, kp, out, lse, return_lse, hs)
        return (out, None, lse) if return_lse else (out, None)
    scale = float(sm_scale) * _scalar_scale("q_scale", q_scale) * _scalar_scale("k_scale", k_scale)
    if not scale > 0.0:
        raise NotImplementedError(f"fmha_sm90: the softmax scale must be > 0, got {scale}")
    out_scale = _scalar_scale("v_scale", v_scale) * _scalar_scale("o_scale", o_scale)

    dv = None if head_dim_v == head_dim else head_dim_v
    mod = _module(DTYPES[q.dtype], head_dim, bool(causal), paged, mode, dv)
    # fp8 score-only reads no V: planned like a 16-bit score-only call (same work list, no V^T tile map to build).
    plan_elem = 2 if fp8 else q.element_size()
    kp = _kernel_plan(plan, head_dim, plan_elem, q.device, module_block_n(mod), dv, module_block_m(mod))
    if kp.partial_o.shape[-1] != head_dim_v:
        raise ValueError(f"plan: a KernelPlan for Dv = {head_dim_v} must be made with head_dim_v={head_dim_v}")
    if paged and kp.page_size not in (None, k.shape[2]):
        raise ValueError(f"k: plan counts pages of {kp.page_size} slots, got k with page_size {k.shape[2]}")
    if output_o and out is None:
        out = torch.empty(q.shape[0], q.shape[1], v.shape[-1], dtype=q.dtype, device=q.device)
    if return_lse and lse is None:
        lse = torch.empty(q.shape[0], q.shape[1], dtype=torch.float32, device=q.device)
    if output_maxscore and max_score is None:
        if isinstance(plan, KernelPlan):
            raise ValueError("max_score: required when plan is a KernelPlan (its max_k_tiles is not known)")
        max_score = torch.empty(q.shape[1], plan.max_k_tiles, q.shape[0], dtype=torch.float32, device=q.device)

    if not kp.any_keys:  # nothing visible anywhere (also covers empty K/V, which TMA cannot describe)
        if output_o:
            out.zero_()
        if return_lse:
            lse.fill_(-math.inf)
        if output_maxscore:
            max_score.fill_(-math.inf)
    elif kp.num_work:
        if fp8:  # score-only fp8 (the index pass): the module reads e4m3 bytes as uint8 views; no V, no O
            q, k, v = q.view(torch.uint8), k.view(torch.uint8), k.view(torch.uint8)
        mod.fmha_fwd(
            q,
            k,
            v,
            out if output_o else q,
            lse if return_lse else kp.lse_dummy,
            kp.work,
            kp.workspace,
            kv_indices if paged else kp.index_dummy,
            kp.combine if output_o else kp.combine[:0],
            kp.partial_o,
            kp.partial_lse,
            max_score if output_maxscore else kp.lse_dummy,
            kp.num_ctas,
            scale,
            out_scale,
            bool(return_lse),
        )
    o = out if output_o else None
    ms = max_score if output_maxscore else None
    return (o, ms, lse) if return_lse else (o, ms)
