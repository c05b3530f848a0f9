"""A tiny elementwise kernel (``out = alpha * x + beta * y``) that exercises the whole CuTe-DSL route.

It is what the route tests build for sm_90a and sm_100a, and what a GPU node runs first to prove that a bundle's
modules load and launch there (``tests/cute/test_cute_jit.py``, GPU part). Not an attention kernel.
"""

from __future__ import annotations

import cutlass.cute as cute
from cutlass.cute.runtime import make_fake_compact_tensor, make_fake_stream
from msa.cute.jit import CuteCompile

import cutlass

THREADS = 128
DTYPES = {"float32": cutlass.Float32, "bfloat16": cutlass.BFloat16, "float16": cutlass.Float16}


@cute.kernel
def _axpby_kernel(x: cute.Tensor, y: cute.Tensor, out: cute.Tensor, alpha: cutlass.Float32, beta: cutlass.Float32,
                  n: cutlass.Int32):
    tidx, _, _ = cute.arch.thread_idx()
    bidx, _, _ = cute.arch.block_idx()
    i = bidx * THREADS + tidx
    if i < n:
        acc = alpha * x[i].to(cutlass.Float32) + beta * y[i].to(cutlass.Float32)
        out[i] = acc.to(out.element_type)


@cute.jit
def _axpby(x: cute.Tensor, y: cute.Tensor, out: cute.Tensor, alpha: cutlass.Float32, beta: cutlass.Float32,
           stream):
    n = cute.size(x, mode=[0])
    _axpby_kernel(x, y, out, alpha, beta, n).launch(grid=[(n + THREADS - 1) // THREADS, 1, 1],
                                                   block=[THREADS, 1, 1], stream=stream)


def axpby(dtype: str = "float32") -> CuteCompile:
    """Factory: ``axpby(x, y, out, alpha, beta)`` over 1-D contiguous ``dtype`` tensors of any length."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype: expected one of {sorted(DTYPES)}, got {dtype!r}")
    el = DTYPES[dtype]
    n = cute.sym_int()
    tensors = [make_fake_compact_tensor(el, (n,)) for _ in range(3)]
    return CuteCompile(_axpby, (*tensors, cutlass.Float32(1.0), cutlass.Float32(1.0),
                                make_fake_stream(use_tvm_ffi_env_stream=True)))
