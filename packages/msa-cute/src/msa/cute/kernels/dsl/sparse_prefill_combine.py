"""Combine of the KV-outer sparse prefill: merge each token's per-slot partial outputs by their LSEs.

Inputs (written by the partial kernel): ``o_part [topk, total_q, Hq, D]`` (normalised per slot, fp32 or bf16) and
``lse_part [topk, total_q, Hq]`` fp32 (natural log), and ``n_slots [total_q, Hkv]`` int32 = how many slots the
token filled for that KV head (slots ``0..n-1``; slots past ``n`` are never read, so the workspaces need no
initialisation). Output: ``o [total_q, Hq, D]`` bf16 and ``lse [total_q, Hq]`` fp32 with

    lse = log(sum_s exp(lse_s)),   o = sum_s exp(lse_s - lse) * o_s

A row with no slot, or whose slots all saw no key (every ``lse_s = -inf``), gets ``o = 0, lse = -inf``. A token
whose count exceeds ``topk`` (a CSR that breaks the top-k contract) gets NaN, never a truncated result.

One warp per (token, query head); lane ``l`` owns head-dim elements ``4l .. 4l+3`` (D = 128).
"""

from __future__ import annotations

import cutlass.cute as cute
from msa.cute.jit import CuteCompile
from msa.cute.kernels.dsl.common import DTYPES, LN_2, LOG2_E, fake_row_major, sym

import cutlass
from cutlass import Float32, Int32

HEAD_DIM = 128
WARPS = 8
ELEMS_PER_LANE = HEAD_DIM // 32


class SparsePrefillCombine:
    def __init__(self, partial_dtype: str):
        self.partial_dtype = DTYPES[partial_dtype]

    @cute.jit
    def __call__(self, o_part: cute.Tensor, lse_part: cute.Tensor, n_slots: cute.Tensor, o: cute.Tensor,
                 lse: cute.Tensor, topk: Int32, stream):
        rows = cute.size(o, mode=[0]) * cute.size(o, mode=[1])
        grid = cute.ceil_div(rows, WARPS)
        self.kernel(o_part, lse_part, n_slots, o, lse, topk).launch(grid=[grid, 1, 1], block=[WARPS * 32, 1, 1],
                                                              stream=stream)

    @cute.kernel
    def kernel(self, o_part: cute.Tensor, lse_part: cute.Tensor, n_slots: cute.Tensor, o: cute.Tensor,
               lse: cute.Tensor, topk: Int32):
        tidx, _, _ = cute.arch.thread_idx()
        bidx, _, _ = cute.arch.block_idx()
        lane = tidx % 32
        warp = tidx // 32
        num_heads = cute.size(o, mode=[1])
        total_q = cute.size(o, mode=[0])
        row = bidx * WARPS + warp
        if row < total_q * num_heads:
            t = row // num_heads
            hq = row - t * num_heads
            group = num_heads // cute.size(n_slots, mode=[1])
            n = n_slots[t, hq // group]
            m = -Float32.inf
            for s in cutlass.range(n, unroll=4):  # several loads in flight per warp
                m = cute.arch.fmax(m, lse_part[s, t, hq])
            acc = cute.make_rmem_tensor((ELEMS_PER_LANE,), Float32)
            acc.fill(0.0)
            total = Float32(0.0)
            if m != -Float32.inf:
                for s in cutlass.range(n, unroll=4):  # several loads in flight per warp
                    w = cute.math.exp2((lse_part[s, t, hq] - m) * LOG2_E, fastmath=True)
                    src = cute.local_tile(o_part[s, t, hq, None], (ELEMS_PER_LANE,), (lane,))
                    vals = src.load().to(Float32)
                    acc.store(acc.load() + vals * w)
                    total += w
            out = cute.make_rmem_tensor((ELEMS_PER_LANE,), o.element_type)
            row_lse = -Float32.inf
            if n > topk:
                out.fill(Float32.nan)
                row_lse = Float32.nan
            elif total > 0.0:
                inv = cute.arch.rcp_approx(total)
                out.store((acc.load() * inv).to(o.element_type))
                row_lse = m + cute.math.log2(total, fastmath=True) * LN_2
            else:
                out.fill(0.0)
            dst = cute.local_tile(o[t, hq, None], (ELEMS_PER_LANE,), (lane,))
            dst.store(out.load())
            if lane == 0:
                lse[t, hq] = row_lse


def combine(partial_dtype: str = "bfloat16", out_dtype: str = "bfloat16"):
    """Factory: ``combine(o_part, lse_part, n_slots, o, lse)`` for D = 128 (see the module docstring)."""
    if partial_dtype not in ("bfloat16", "float32"):
        raise ValueError(f"partial_dtype: expected bfloat16 or float32, got {partial_dtype!r}")
    if out_dtype != "bfloat16":
        raise ValueError(f"out_dtype: expected bfloat16, got {out_dtype!r}")
    kslots, total_q, hq, hkv = sym(), sym(), sym(), sym()
    part = DTYPES[partial_dtype]
    args = (
        fake_row_major(part, (kslots, total_q, hq, HEAD_DIM)),
        fake_row_major(Float32, (kslots, total_q, hq), align=4),
        fake_row_major(Int32, (total_q, hkv), align=4),
        fake_row_major(cutlass.BFloat16, (total_q, hq, HEAD_DIM)),
        fake_row_major(Float32, (total_q, hq), align=4),
        Int32(16),  # topk
        cute.runtime.make_fake_stream(use_tvm_ffi_env_stream=True),
    )
    return CuteCompile(SparsePrefillCombine(partial_dtype), args)
