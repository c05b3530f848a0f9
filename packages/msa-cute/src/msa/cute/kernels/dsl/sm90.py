"""Hopper (SM90) building blocks for msa-cute kernels: smem layouts, warpgroup GEMMs, accumulator views.

Written for the KV-outer sparse prefill; the conventions follow CuTe's wgmma partitioning: an m64nNk16 accumulator
fragment has per-thread shape ``((2, 2, N/8), MMA_M, MMA_N)`` where mode 0 is (column pair, row +0/+8, column
group of 8).
"""

from __future__ import annotations

import cutlass.cute as cute
import cutlass.utils.hopper_helpers as hopper
from cutlass.cute.nvgpu import warpgroup
from cutlass.utils import LayoutEnum

import cutlass
from cutlass import Float32


def smem_layout_rows(dtype, rows: int, cols: int, stages: int = 0):
    """Swizzled smem layout for a ``rows x cols`` tile whose ``cols`` are contiguous (K-major wgmma operand);
    ``stages > 0``: a ring of them, ``(rows, cols, stages)`` with one whole tile per stage."""
    atom = warpgroup.make_smem_layout_atom(hopper.get_smem_layout_atom(LayoutEnum.ROW_MAJOR, dtype, cols), dtype)
    if stages:
        return cute.tile_to_shape(atom, (rows, cols, stages), order=(0, 1, 2))
    return cute.tile_to_shape(atom, (rows, cols), order=(0, 1))


def transpose_view(t: cute.Tensor) -> cute.Tensor:
    """The same smem bytes seen as ``(cols, rows)``: V stored ``[key, d]`` becomes the MN-major B operand of P @ V."""
    shape = (t.shape[1], t.shape[0])
    return cute.composition(t, cute.make_ordered_layout(shape, order=(1, 0)))


def acc_rows_view(acc: cute.Tensor) -> cute.Tensor:
    """Accumulator ``((2, 2, V), M, N)`` viewed as ``((2, M), (2, V, N))``: mode 0 = this thread's rows, mode 1 =
    its columns of each row, so per-row reductions are loops over mode 1."""
    compact = cute.make_layout(acc.layout.shape)
    s, d = compact.shape, compact.stride
    rows_cols = cute.make_layout(
        ((s[0][1], s[1]), (s[0][0], s[0][2], s[2])),
        stride=((d[0][1], d[1]), (d[0][0], d[0][2], d[2])),
    )
    return cute.make_tensor(acc.iterator, cute.composition(acc.layout, rows_cols))


@cute.jit
def warpgroup_gemm(tiled_mma: cute.TiledMma, acc: cute.Tensor, frag_a: cute.Tensor, frag_b: cute.Tensor,
                   zero_init: cutlass.Constexpr[bool]):
    """acc (+)= A @ B over every k-block of the fragments, issued as one wgmma group and waited for."""
    warpgroup.fence()
    atom = cute.make_mma_atom(tiled_mma.op)
    atom.set(warpgroup.Field.ACCUMULATE, not zero_init)
    for kb in cutlass.range_constexpr(cute.size(frag_a.shape[2])):
        cute.gemm(atom, acc, frag_a[None, None, kb], frag_b[None, None, kb], acc)
        atom.set(warpgroup.Field.ACCUMULATE, True)
    warpgroup.commit_group()
    warpgroup.wait_group(0)


@cute.jit
def quad_max(x: Float32) -> Float32:
    """Max over the 4 threads that share an accumulator row (lanes differing in bits 0 and 1)."""
    x = cute.arch.fmax(x, cute.arch.shuffle_sync_bfly(x, offset=1))
    return cute.arch.fmax(x, cute.arch.shuffle_sync_bfly(x, offset=2))


@cute.jit
def quad_sum(x: Float32) -> Float32:
    x = x + cute.arch.shuffle_sync_bfly(x, offset=1)
    return x + cute.arch.shuffle_sync_bfly(x, offset=2)
