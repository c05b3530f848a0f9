"""CUDA glue for ``sparse_topk_select`` (csrc/topk): module build/load through JitSpec, launch configuration.

``run`` takes arguments already validated by :func:`msa.core.topk.sparse_topk_select`. Design (see
``csrc/topk/topk_select.cu.jinja``): a warp owns 32 consecutive tokens of one head, one row per lane, and
streams its K slice with coalesced 128-byte loads, keeping a per-row candidate column in shared memory that is
compacted to the exact best M by a 4-bit radix select whenever it fills. A CTA = ``warps`` warps splitting K;
``splits`` > 1 spreads K over CTAs too (short or decode-shaped inputs) and adds a merge launch that reads a
workspace of ``2 * H * splits * M * ceil(total_q/32)*32`` int32 words, allocated per call through torch's
caching allocator (the only allocation; ``splits == 1`` allocates nothing).

Environment overrides (benchmark sweeps): ``MSA_TOPK_SPLITS``, ``MSA_TOPK_WARPS``, ``MSA_TOPK_MERGE_WARPS``.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch

__all__ = ["run", "available", "plan", "TopkPlan", "jit_specs", "spec", "BATCH", "load_module"]

FAMILY = "topk"
SOURCES = ("topk_select.cu.jinja",)
BATCH = 16  # blocks per lane per step; must match topk_emulate.cc's U for the CPU replay tests
MAX_WARPS = 8
SMEM_LIMIT = 227 * 1024  # sm_90 / sm_100 opt-in shared memory per block
_SUPPORTED_CC = {(9, 0): "sm_90a", (10, 0): "sm_100a", (10, 3): "sm_103a"}


def spec(arch: str):
    from msa.core.jit import JitSpec

    return JitSpec(family=FAMILY, sources=SOURCES, params={"batch": BATCH}, arch=arch, use_cutlass=False)


def jit_specs(preset: dict, arch: str) -> list:
    """Warmup hook (msa.core.variants): one module per arch serves every dtype, topk and shape."""
    return [spec(arch)]


@functools.lru_cache(maxsize=8)
def _module_for_arch(arch: str):
    return spec(arch).load()


def load_module(device: torch.device):
    from msa.core.jit import arch_for_device

    return _module_for_arch(arch_for_device(device))


def available(device) -> tuple[bool, str]:
    """Cheap (no compilation): a CUDA device of a supported compute capability and tvm-ffi importable."""
    device = torch.device(device)
    if device.type != "cuda":
        return False, f"tensors are on {device}, the top-k kernel needs CUDA"
    if not torch.cuda.is_available():
        return False, "torch.cuda is not available"
    cc = torch.cuda.get_device_capability(device)
    if cc not in _SUPPORTED_CC and not os.environ.get("MSA_CUDA_ARCH"):
        return False, f"compute capability {cc[0]}.{cc[1]} is not one of {sorted(_SUPPORTED_CC)} (set MSA_CUDA_ARCH)"
    try:
        import tvm_ffi  # noqa: F401
    except Exception as e:  # pragma: no cover - install problem
        return False, f"apache-tvm-ffi is not importable: {e}"
    return True, "ok"


@dataclass(frozen=True)
class TopkPlan:
    splits: int  # CTAs along K per (token group, head); > 1 adds the merge launch
    warps: int  # warps per scan CTA, each a contiguous slice of the split
    merge_warps: int
    cap: int  # candidate column capacity per row (entries)

    def workspace_words(self, n_heads: int, total_q: int, m: int) -> int:
        if self.splits <= 1 or m <= 0:
            return 0
        return 2 * n_heads * self.splits * m * (-(-total_q // 32) * 32)


def column_capacity(m: int) -> int:
    """Room for the best M, one batch, and max(32, M) more before a compaction (amortises its cost)."""
    return m + BATCH + max(32, m)


def smem_bytes(warps: int, cap: int) -> int:
    return warps * (cap * 32 * 8 + 17 * 32 * 4 + 32 * 4)  # column, histogram (16 bins + spare), count


@functools.lru_cache(maxsize=16)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _env_int(name: str) -> int | None:
    v = os.environ.get(name)
    return int(v) if v else None


def plan(n_heads: int, n_blocks: int, total_q: int, m: int, sm_count: int) -> TopkPlan:
    """Launch shape from the problem shape only (no data): enough warps in flight to pull HBM bandwidth, K
    slices long enough that the stream (not the fill of the first column) dominates."""
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
    warps = _env_int("MSA_TOPK_WARPS") or warps
    splits = _env_int("MSA_TOPK_SPLITS") or splits
    merge_warps = _env_int("MSA_TOPK_MERGE_WARPS") or max(1, min(4, splits))
    if m <= 0:
        splits = 1
    return TopkPlan(splits=splits, warps=min(warps, MAX_WARPS), merge_warps=min(merge_warps, MAX_WARPS), cap=cap)


@functools.lru_cache(maxsize=16)
def _empty_i32(device: torch.device) -> torch.Tensor:
    return torch.empty(0, dtype=torch.int32, device=device)


def run(max_score, topk, num_valid_pages, force_begin_blocks, force_end_blocks, out):
    """Launch on validated arguments (see module doc); returns ``out`` ([total_q, H, topk] int32)."""
    n_heads, n_blocks, total_q = max_score.shape
    device = max_score.device
    if out is None:
        out = torch.empty((total_q, n_heads, topk), dtype=torch.int32, device=device)
    if total_q == 0 or n_heads == 0:
        return out
    m = topk - force_begin_blocks - force_end_blocks
    index = device.index if device.index is not None else torch.cuda.current_device()
    p = plan(n_heads, n_blocks, total_q, m, _sm_count(index))
    if isinstance(num_valid_pages, torch.Tensor):
        nvp, nvp_scalar = num_valid_pages, 0
    else:
        nvp, nvp_scalar = _empty_i32(device), n_blocks if num_valid_pages is None else int(num_valid_pages)
    words = p.workspace_words(n_heads, total_q, m)
    ws = torch.empty(words, dtype=torch.int32, device=device) if words else _empty_i32(device)
    load_module(device).topk_select(
        max_score, topk, nvp, nvp_scalar, force_begin_blocks, force_end_blocks, out, ws, p.splits, p.warps,
        p.merge_warps, p.cap,
    )
    return out
