"""Combine of the KV-outer sparse prefill: merge each token's per-slot partial outputs by their LSEs.

Inputs (written by the partial kernel): ``o_part [topk, total_q, Hq, D]`` (normalised per slot, fp32 or bf16) and
``lse_part [topk, total_q, Hq]`` fp32 (natural log), and ``n_slots [total_q, Hkv]`` int32 = how many slots the
token filled for that KV head (slots ``0..n-1``; slots past ``n`` are never read, so the workspaces need no
initialisation). Output: ``o [total_q, Hq, D]`` bf16 and ``lse [total_q, Hq]`` fp32 with

    lse = log(sum_s exp(lse_s)),   o = sum_s exp(lse_s - lse) * o_s

A row with no slot, or whose slots all saw no key (every ``lse_s = -inf``), gets ``o = 0, lse = -inf``. A token
whose count exceeds ``topk`` (a CSR that breaks the top-k contract) gets NaN, never a truncated result.

16 threads per (token, query head) row, each owning 8 consecutive head-dim elements (one 16-byte load per slot
for bf16 partials); a CTA of 256 threads covers 16 consecutive rows, i.e. 4 KiB contiguous of each slot's plane
(bandwidth-bound: every slot load of the unrolled loop is independent, so several are in flight per thread).
"""

from __future__ import annotations

import cutlass.cute as cute
from msa.cute.jit import CuteCompile
from msa.cute.kernels.dsl.common import DTYPES, LN_2, LOG2_E, fake_row_major, sym

import cutlass
from cutlass import Float32, Int32

HEAD_DIM = 128
THREADS = 256
ELEMS_PER_THREAD = 8  # 16 bytes of bf16
THREADS_PER_ROW = HEAD_DIM // ELEMS_PER_THREAD
ROWS_PER_CTA = THREADS // THREADS_PER_ROW
SLOTS_IN_FLIGHT = 4


class SparsePrefillCombine:
    def __init__(self, partial_dtype: str):
        self.partial_dtype = DTYPES[partial_dtype]

    @cute.jit
    def __call__(self, o_part: cute.Tensor, lse_part: cute.Tensor, n_slots: cute.Tensor, o: cute.Tensor,
                 lse: cute.Tensor, topk: Int32, stream):
        rows = cute.size(o, mode=[0]) * cute.size(o, mode=[1])
        grid = cute.ceil_div(rows, ROWS_PER_CTA)
        self.kernel(o_part, lse_part, n_slots, o, lse, topk).launch(grid=[grid, 1, 1], block=[THREADS, 1, 1],
                                                              stream=stream)

    @cute.kernel
    def kernel(self, o_part: cute.Tensor, lse_part: cute.Tensor, n_slots: cute.Tensor, o: cute.Tensor,
               lse: cute.Tensor, topk: Int32):
        tidx, _, _ = cute.arch.thread_idx()
        bidx, _, _ = cute.arch.block_idx()
        chunk = tidx % THREADS_PER_ROW
        num_heads = cute.size(o, mode=[1])
        total_q = cute.size(o, mode=[0])
        row = bidx * ROWS_PER_CTA + tidx // THREADS_PER_ROW
        if row < total_q * num_heads:
            t = row // num_heads
            hq = row - t * num_heads
            group = num_heads // cute.size(n_slots, mode=[1])
            n = n_slots[t, hq // group]
            m = -Float32.inf
            for s in cutlass.range(n, unroll=8):  # independent loads: several in flight per thread
                m = cute.arch.fmax(m, lse_part[s, t, hq])
            acc = cute.make_rmem_tensor((ELEMS_PER_THREAD,), Float32)
            acc.fill(0.0)
            total = Float32(0.0)
            if m != -Float32.inf:
                # SLOTS_IN_FLIGHT slots per step, all loads issued before any math (a plain unrolled loop kept only
                # two 16-byte loads in flight); slots past n re-read slot n-1 (written) with weight 0.
                parts = cute.make_rmem_tensor((SLOTS_IN_FLIGHT, ELEMS_PER_THREAD), o_part.element_type)
                lses = cute.make_rmem_tensor((SLOTS_IN_FLIGHT,), Float32)
                for s0 in cutlass.range(0, n, SLOTS_IN_FLIGHT, unroll=1):
                    for j in cutlass.range_constexpr(SLOTS_IN_FLIGHT):
                        s = cutlass.min(s0 + j, n - 1)
                        lses[j] = lse_part[s, t, hq]
                        src = cute.local_tile(o_part[s, t, hq, None], (ELEMS_PER_THREAD,), (chunk,))
                        parts[j, None].store(src.load())
                    for j in cutlass.range_constexpr(SLOTS_IN_FLIGHT):
                        w = cute.math.exp2((lses[j] - m) * LOG2_E, fastmath=True)
                        if s0 + j >= n:
                            w = Float32(0.0)
                        acc.store(acc.load() + parts[j, None].load().to(Float32) * w)
                        total += w
            out = cute.make_rmem_tensor((ELEMS_PER_THREAD,), o.element_type)
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
            dst = cute.local_tile(o[t, hq, None], (ELEMS_PER_THREAD,), (chunk,))
            dst.store(out.load())
            if chunk == 0:
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
