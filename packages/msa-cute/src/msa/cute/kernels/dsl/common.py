"""Small CuTe-DSL helpers shared by msa-cute kernels (imported only where the DSL is installed)."""

from __future__ import annotations

import cutlass.cute as cute
from cutlass.cute.runtime import make_fake_compact_tensor

import cutlass

DTYPES = {
    "bfloat16": cutlass.BFloat16,
    "float16": cutlass.Float16,
    "float32": cutlass.Float32,
    "int32": cutlass.Int32,
}
LOG2_E = 1.4426950408889634
LN_2 = 0.6931471805599453


def fake_row_major(dtype, shape, align: int = 16):
    """A fake compact tensor laid out like a contiguous torch tensor (last mode stride 1)."""
    order = tuple(reversed(range(len(shape))))
    return make_fake_compact_tensor(dtype, tuple(shape), stride_order=order, assumed_align=align)


def sym():
    return cute.sym_int()
