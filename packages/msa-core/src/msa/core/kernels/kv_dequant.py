"""K/V dequantisation on the GPU (``csrc/kv_dequant``): fp8 e4m3 or NVFP4 -> bf16 / fp16, with an optional gather of
outer rows (pages of a cache, tokens of a ragged tensor).

The CUDA twin of ``msa.cute.quant.dequantize_kv``'s reference, bit for bit. It stages quantised K/V for the 16-bit
attention kernels (sparse prefill: ``msa.cute.sparse_atten_func`` and ``msa.bridge.sparse_fmha``): the call's K/V
are read once and written once in 16 bits, then attended at the 16-bit kernels' speed. One launch, no host
synchronisation, no allocation (CUDA-graph safe with preallocated outputs). Importing this module compiles nothing;
the module is JIT-built on first use (one module per arch serves every shape). Tests: tests/core/test_kv_dequant.py.
"""

from __future__ import annotations

import functools

import torch
from msa.core.validation import check_int, check_tensor, dtype_name

from ._device import cuda_kernel_available, module_for_device

__all__ = ["launch", "available", "supports", "spec", "jit_specs", "load_module", "FORMATS", "OUT_DTYPES"]

FAMILY = "kv_dequant"
SOURCES = ("kv_dequant.cu.jinja",)
MAX_CTAS = 65535
FORMATS = {"fp8": 0, "nvfp4": 1}
OUT_DTYPES = (torch.bfloat16, torch.float16)


def spec(arch: str):
    from msa.core.jit import JitSpec

    return JitSpec(family=FAMILY, sources=SOURCES, params={"max_ctas": MAX_CTAS}, arch=arch, use_cutlass=False)


def jit_specs(preset: dict, arch: str) -> list:
    """Warmup hook (msa.core.variants): one small module per arch."""
    return [spec(arch)]


def load_module(device: torch.device):
    return module_for_device(spec, device)


def available(device) -> tuple[bool, str]:
    """Cheap (no compilation): a CUDA device of a supported compute capability and tvm-ffi importable."""
    return cuda_kernel_available(device, "the K/V dequantiser")


def supports(*, fmt=None, out_dtype=None, row=None, **_) -> tuple[bool, str]:
    if fmt not in FORMATS:
        return False, f"format {fmt!r} is not one of {list(FORMATS)}"
    if out_dtype not in OUT_DTYPES:
        return False, f"output dtype {dtype_name(out_dtype)} is not bf16 / fp16"
    if row is not None and row % 16:
        return False, f"row length {row} is not a multiple of 16"
    return True, "ok"


@functools.lru_cache(maxsize=16)
def _placeholders(device: torch.device):
    """Stand-ins for the binding's unused tensor arguments (allocated once per device, never read)."""
    return (torch.zeros(1, 16, dtype=torch.uint8, device=device), torch.zeros(1, dtype=torch.float32, device=device),
            torch.zeros(1, dtype=torch.int32, device=device))


def _aligned(t: torch.Tensor, align: int) -> torch.Tensor:
    """``t`` with unit inner stride and base / row stride multiples of ``align`` bytes (copied only when not)."""
    if t.stride(-1) != 1 or t.data_ptr() % align or (t.shape[0] > 1 and t.stride(0) % align):
        t = t.contiguous()
        if t.data_ptr() % align:
            t = t.clone()
    return t


def launch(x: torch.Tensor, out: torch.Tensor, *, fmt: str, block_scale: torch.Tensor | None = None,
           scale: torch.Tensor | None = None, rows: torch.Tensor | None = None, head_elems: int = 0) -> torch.Tensor:
    """Dequantise ``x`` into ``out [n_out, row]`` (bf16 / fp16, contiguous) on the current stream; returns ``out``.

    ``x``: ``[n_in, row]`` fp8 e4m3 (or its uint8 bits) for ``fmt="fp8"``; ``[n_in, row / 2]`` packed e2m1 bytes for
    ``"nvfp4"`` with ``block_scale [n_in, row / 16]`` e4m3 (or uint8 bits). ``scale``: fp32, ``[1]`` (fp8 scalar /
    NVFP4 global) or ``[H]`` (fp8 per head; ``head_elems = row / H``). ``rows [n_out]`` int32: output row r reads
    input row ``rows[r]`` (outside ``[0, n_in)`` -> zeros); without it ``n_out == n_in``."""
    if fmt not in FORMATS:
        raise ValueError(f"fmt: expected one of {list(FORMATS)}, got {fmt!r}")
    check_tensor("out", out, ndim=2, contiguous=True)
    if out.dtype not in OUT_DTYPES:
        raise TypeError(f"out: expected bf16 or fp16, got {dtype_name(out.dtype)}")
    dev = out.device
    check_tensor("x", x, ndim=2, device=dev)
    xb = _aligned(x.view(torch.uint8), 8 if fmt == "nvfp4" else 16)
    bs, sc, rr = _placeholders(dev)
    if fmt == "nvfp4":
        if block_scale is None:
            raise ValueError("block_scale: required for fmt='nvfp4'")
        check_tensor("block_scale", block_scale, ndim=2, device=dev)
        bs = _aligned(block_scale.view(torch.uint8), 1)
    num_scales = 0
    if scale is not None:
        check_tensor("scale", scale, dtype=torch.float32, ndim=1, device=dev, contiguous=True)
        sc, num_scales = scale, scale.shape[0]
    head_elems = check_int("head_elems", head_elems, min=0)
    if rows is not None:
        check_tensor("rows", rows, dtype=torch.int32, ndim=1, device=dev, contiguous=True)
        rr = rows
    load_module(dev).kv_dequant(xb, bs, sc, rr, out, FORMATS[fmt], num_scales, head_elems, rows is not None)
    return out
