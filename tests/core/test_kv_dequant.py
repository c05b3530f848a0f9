"""K/V dequantisation (``msa.cute.quant.dequantize_kv``; CUDA: msa-core's ``kv_dequant`` module).

- CPU: the reference equals the format references (``dequantize_fp8`` / ``dequantize_nvfp4``) plus an explicit
  gather (indices outside ``[0, N)`` -> zeros); the kernel's E2M1 bit formula, replayed in Python, equals the
  reference decoder on all 16 codes; argument errors name the argument.
- compile: the module builds for sm_90a and sm_100a.
- GPU (``-m gpu``): the kernel equals the reference **bit for bit** (same fp32 products, one rounding) for fp8 (no /
  scalar / per-head scale), NVFP4 (with / without global scale, NaN / inf-free random data), bf16 and fp16 outputs,
  gathers with invalid entries, poisoned outputs fully overwritten, CUDA-graph replay.
"""

from __future__ import annotations

import struct

import pytest
import torch
from msa.cute import quant as Q
from msa_core_testutil import built_module, need_kernel

FP8 = torch.float8_e4m3fn


def _fp8_data(gen, shape, amp=3.0):
    return (torch.randn(shape, generator=gen) * amp).to(FP8)


def _nvfp4_data(gen, shape, global_scale="auto"):
    return Q.quantize_nvfp4(torch.randn(shape, generator=gen) * 5.0, global_scale)


def _gather_loop(full: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    out = torch.zeros((rows.shape[0],) + tuple(full.shape[1:]), dtype=full.dtype)
    for i, r in enumerate(rows.tolist()):
        if 0 <= r < full.shape[0]:
            out[i] = full[r]
    return out


# ---- CPU ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("scale", [None, 0.37, "tensor1", "per_head"])
def test_fp8_reference_matches_format_reference(dtype, scale):
    gen = torch.Generator().manual_seed(3)
    x = _fp8_data(gen, (9, 3, 4, 32))  # paged-like [pages, H, block, D]
    s = {"tensor1": torch.tensor([0.5]), "per_head": torch.rand(3, generator=gen) + 0.1}.get(scale, scale)
    got = Q.dequantize_kv(x, dtype=dtype, scale=s)
    if isinstance(s, torch.Tensor) and s.numel() == 3:
        want = (x.float() * s.view(1, 3, 1, 1)).to(dtype)
    else:
        want = (x.float() * (1.0 if s is None else float(s))).to(dtype)
    assert got.dtype == dtype and torch.equal(got, want)
    rows = torch.tensor([8, -1, 0, 9, 3, 3, -7], dtype=torch.int32)
    assert torch.equal(Q.dequantize_kv(x, dtype=dtype, scale=s, rows=rows), _gather_loop(want, rows))


@pytest.mark.parametrize("global_scale", [None, "auto"])
def test_nvfp4_reference_matches_format_reference(global_scale):
    gen = torch.Generator().manual_seed(4)
    x = _nvfp4_data(gen, (11, 2, 64), global_scale)  # ragged-like [N, H, D]
    want = x.dequantize(torch.bfloat16)
    assert torch.equal(Q.dequantize_kv(x), want)
    rows = torch.tensor([10, 11, 2, -1, 0], dtype=torch.int32)
    got = Q.dequantize_kv(x, rows=rows, dtype=torch.float16)
    assert torch.equal(got, _gather_loop(x.dequantize(torch.float16), rows))
    assert (got[1] == 0).all() and (got[3] == 0).all()


def test_gather_from_empty_source_gives_zeros():
    x = torch.zeros(0, 2, 16).to(FP8)
    got = Q.dequantize_kv(x, rows=torch.tensor([0, -1], dtype=torch.int32))
    assert got.shape == (2, 2, 16) and (got == 0).all()


def _e2m1_kernel_formula(c: int) -> float:
    """kv_dequant_kernel.cuh's e2m1_to_float, step by step in Python (fp32 bit construction)."""
    mag = c & 7
    if mag < 2:
        v = 0.5 * mag
    else:
        bits = (((mag >> 1) + 126) << 23) | ((mag & 1) << 22)
        v = struct.unpack("<f", struct.pack("<I", bits))[0]
    return -v if c & 8 else v


def test_kernel_e2m1_formula_equals_reference_decoder():
    codes = torch.arange(16, dtype=torch.uint8)
    ref = Q._e2m1_values(codes).tolist()
    assert [_e2m1_kernel_formula(c) for c in range(16)] == ref


def test_dequantize_kv_bad_arguments():
    gen = torch.Generator().manual_seed(5)
    x = _fp8_data(gen, (4, 2, 16))
    with pytest.raises(TypeError, match="x: expected dtype"):
        Q.dequantize_kv(x.float())
    with pytest.raises(ValueError, match=r"x: expected \[N, H, D\]"):
        Q.dequantize_kv(x[0])
    with pytest.raises(TypeError, match="dtype: expected torch.bfloat16 or torch.float16"):
        Q.dequantize_kv(x, dtype=torch.float32)
    with pytest.raises(ValueError, match=r"scale: expected a scalar or shape \[2\]"):
        Q.dequantize_kv(x, scale=torch.ones(3))
    with pytest.raises(ValueError, match="scale: expected a positive number"):
        Q.dequantize_kv(x, scale=-1.0)
    with pytest.raises(TypeError, match="rows: expected dtype"):
        Q.dequantize_kv(x, rows=torch.tensor([0]))
    f4 = _nvfp4_data(gen, (4, 2, 32))
    with pytest.raises(ValueError, match="scale: not used for NVFP4"):
        Q.dequantize_kv(f4, scale=2.0)
    with pytest.raises(ValueError, match=r"x.scale: expected shape \[4, 2, 2\]"):
        Q.dequantize_kv(Q.Nvfp4Tensor(f4.data, f4.scale[..., :1]))
    with pytest.raises(ValueError, match="x.global_scale: expected a scalar"):
        Q.dequantize_kv(Q.Nvfp4Tensor(f4.data, f4.scale, torch.ones(2)))


# ---- compile -----------------------------------------------------------------------------------------------------
@pytest.mark.compile
@pytest.mark.parametrize("arch,sm", [("sm_90a", 90), ("sm_100a", 100)])
def test_module_builds_for_arch(arch, sm, module_arch_check):
    from msa.core.kernels import kv_dequant

    module_arch_check(built_module(kv_dequant.spec, arch), arch, sm)


# ---- GPU ---------------------------------------------------------------------------------------------------------
def _need_kernel():
    from msa.core.kernels import kv_dequant

    need_kernel(kv_dequant)


def _poisoned_kernel_call(monkeypatch, x, **kw):
    """The kernel's output with its allocation pre-filled with NaN (every element must be written)."""
    real = torch.empty

    def poisoned(*a, **k):
        t = real(*a, **k)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", poisoned)
    try:
        return Q.dequantize_kv(x, backend="kernel", **kw)
    finally:
        monkeypatch.setattr(torch, "empty", real)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("scale", [None, 0.37, "per_head"])
@pytest.mark.parametrize("gather", [False, True])
def test_gpu_fp8_bit_exact(monkeypatch, dtype, scale, gather):
    _need_kernel()
    gen = torch.Generator().manual_seed(7)
    x = _fp8_data(gen, (37, 4, 128, 128)).cuda()  # page-128 cache [pages, Hkv, 128, d128]
    s = (torch.rand(4, generator=gen) + 0.1).cuda() if scale == "per_head" else scale
    rows = torch.tensor([36, -1, 0, 37, 5, 5, 1000, 2], dtype=torch.int32).cuda() if gather else None
    got = _poisoned_kernel_call(monkeypatch, x, dtype=dtype, scale=s, rows=rows)
    want = Q.dequantize_kv(x, dtype=dtype, scale=s, rows=rows, backend="reference")
    assert got.shape == want.shape and not torch.isnan(got).any()
    assert torch.equal(got.view(torch.int16), want.view(torch.int16))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("global_scale", [None, "auto"])
@pytest.mark.parametrize("gather", [False, True])
def test_gpu_nvfp4_bit_exact(monkeypatch, dtype, global_scale, gather):
    _need_kernel()
    gen = torch.Generator().manual_seed(8)
    x = _nvfp4_data(gen, (3000, 4, 128), global_scale)  # ragged [tokens, Hkv, d128]
    x = Q.Nvfp4Tensor(x.data.cuda(), x.scale.cuda(), None if x.global_scale is None else x.global_scale.cuda())
    rows = torch.randint(-5, 3005, (777,), generator=gen, dtype=torch.int32).cuda() if gather else None
    got = _poisoned_kernel_call(monkeypatch, x, dtype=dtype, rows=rows)
    want = Q.dequantize_kv(x, dtype=dtype, rows=rows, backend="reference")
    assert got.shape == want.shape and not torch.isnan(got).any()
    # -0.0 (code 8) is written as -0.0 by both: compare the bits
    assert torch.equal(got.view(torch.int16), want.view(torch.int16))


@pytest.mark.gpu
def test_gpu_strided_source_and_binding_errors():
    _need_kernel()
    from msa.core.kernels import kv_dequant

    gen = torch.Generator().manual_seed(9)
    big = _fp8_data(gen, (50, 2, 2, 64)).cuda()
    x = big[:, 1]  # outer stride 256 B, rows of 128 elements: a strided view the launcher reads in place
    got = Q.dequantize_kv(x, backend="kernel")
    assert torch.equal(got, Q.dequantize_kv(x.contiguous(), backend="reference"))
    dev = torch.device("cuda")
    out = torch.empty(50, 128, dtype=torch.bfloat16, device=dev)
    with pytest.raises(Exception, match="rows"):
        kv_dequant.launch(x.reshape(50, -1), out, fmt="fp8", rows=torch.zeros(3, dtype=torch.int32, device=dev))
    with pytest.raises(Exception, match="x: expected"):
        kv_dequant.launch(x.reshape(50, -1)[:, :64], out, fmt="fp8")
    with pytest.raises(Exception, match="head_elems"):
        kv_dequant.launch(x.reshape(50, -1), out, fmt="fp8", scale=torch.ones(3, device=dev), head_elems=48)


@pytest.mark.gpu
def test_gpu_cuda_graph_replay():
    """Captured once (gather + per-head scale), replayed after the source and the page list change in place."""
    _need_kernel()
    gen = torch.Generator().manual_seed(10)
    x = _fp8_data(gen, (64, 2, 128, 128)).cuda()
    s = (torch.rand(2, generator=gen) + 0.5).cuda()
    rows = torch.randint(-1, 64, (40,), generator=gen, dtype=torch.int32).cuda()
    Q.dequantize_kv(x, scale=s, rows=rows, backend="kernel")  # JIT + warm-up
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = Q.dequantize_kv(x, scale=s, rows=rows, backend="kernel")
    for seed in (11, 12):
        g2 = torch.Generator().manual_seed(seed)
        x.copy_(_fp8_data(g2, tuple(x.shape)).cuda())
        rows.copy_(torch.randint(-1, 64, (40,), generator=g2, dtype=torch.int32).cuda())
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, Q.dequantize_kv(x, scale=s, rows=rows, backend="reference"))
