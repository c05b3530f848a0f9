"""Quantisation round trips within the stated format error; exact for values on the grid; swizzle layout."""

from __future__ import annotations

import pytest
import torch
from msa.cute import quant

E2M1 = torch.tensor(quant.E2M1_VALUES)


def randn(*shape, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g) * scale


@pytest.mark.parametrize("per_head", [False, True])
def test_fp8_round_trip(per_head):
    x = randn(64, 8, 32, seed=1) * torch.linspace(0.01, 30, 8).view(1, 8, 1)  # very different head ranges
    q, s = quant.quantize_fp8(x, per_head=per_head)
    assert q.dtype == torch.float8_e4m3fn and s.dtype == torch.float32
    assert s.shape == ((8,) if per_head else ())
    y = quant.dequantize_fp8(q, s)
    # E4M3: 3 mantissa bits -> relative error <= 2^-4 for values in the normal range; absolute floor below it.
    amax = x.abs().amax(dim=(0, 2), keepdim=True) if per_head else x.abs().amax()
    floor = amax / 448 * 2**-6  # smallest normal step at that scale
    assert ((y - x).abs() <= 2**-4 * x.abs() + floor).all()
    assert (q.float().abs().amax() == 448) if not per_head else (q.float().abs().amax(dim=(0, 2)) == 448).all()
    if per_head:  # a shared scale would crush the small head; per-head keeps it accurate
        qt, st = quant.quantize_fp8(x, per_head=False)
        err_head0 = (quant.dequantize_fp8(qt, st) - x)[:, 0].abs().max()
        assert (y - x)[:, 0].abs().max() < err_head0


def _block_err_ok(x, y, block, bound=0.25):
    xb = x.reshape(*x.shape[:-1], -1, block)
    yb = y.reshape(*y.shape[:-1], -1, block)
    amax = xb.abs().amax(-1, keepdim=True)
    return ((xb - yb).abs() <= bound * amax + 1e-30).all()


@pytest.mark.parametrize("global_scale", [None, "auto"])
def test_nvfp4_round_trip_error_bound(global_scale):
    x = randn(33, 4, 64, seed=2, scale=3.0)
    t = quant.quantize_nvfp4(x, global_scale)
    assert t.data.shape == (33, 4, 32) and t.data.dtype == torch.uint8
    assert t.scale.shape == (33, 4, 4) and t.scale.dtype == torch.float8_e4m3fn
    y = t.dequantize()
    assert _block_err_ok(x, y, 16)
    # Mean error is far below the worst case (a broken nibble order or scale would blow this up).
    assert (y - x).abs().mean() < 0.06 * x.abs().mean() * 6 / 2
    rel = (y - x).norm() / x.norm()
    assert rel < 0.12, rel


def test_nvfp4_exact_on_grid():
    g = torch.Generator().manual_seed(4)
    codes = torch.randint(0, 16, (10, 64), generator=g, dtype=torch.uint8)
    codes[:, ::16] = 7  # every 16-block holds +6 so its scale is reproduced exactly
    vals = E2M1[(codes & 7).long()] * torch.where(codes >= 8, -1.0, 1.0)
    scales = torch.tensor([0.125, 0.5, 1.0, 3.5, 20.0, 0.0390625, 448 / 6, 7.0])
    sc = scales[torch.randint(0, len(scales), (10, 4), generator=g)].to(torch.float8_e4m3fn)
    x = (vals.view(10, 4, 16) * sc.float().unsqueeze(-1)).view(10, 64)
    for gs in (None, 0.25):
        xin = x * gs if gs else x
        t = quant.quantize_nvfp4(xin, gs)
        assert torch.equal(t.dequantize(), xin)
        assert torch.equal(t.scale.view(torch.uint8), sc.view(torch.uint8))
    # nibble order: element 0 low nibble, element 1 high nibble; -0 is canonicalised to +0
    canon = torch.where((codes & 7) == 0, torch.zeros_like(codes), codes)
    assert torch.equal(quant.quantize_nvfp4(x).data, canon[:, 0::2] | (canon[:, 1::2] << 4))


def test_e2m1_rounding_ties_to_even():
    s = 1.0
    x = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 5.5, -5.0, -0.2] + [6.0] * 6) * s
    y = quant.quantize_nvfp4(x.view(1, 16)).dequantize().view(-1)
    assert y[:10].tolist() == [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 6.0, -4.0, -0.0]


def test_mxfp4_round_trip_and_exact_grid():
    x = randn(17, 3, 64, seed=5, scale=10.0)
    t = quant.quantize_mxfp4(x)
    assert t.scale.dtype == torch.uint8 and t.scale.shape == (17, 3, 2)
    y = t.dequantize()
    assert _block_err_ok(x, y, 32, bound=0.25)
    # power-of-two scales and no saturation: every block max lands in (3, 6]
    sc = quant.e8m0_to_float(t.scale)
    ratio = x.reshape(17, 3, 2, 32).abs().amax(-1) / sc
    assert ((ratio > 3) & (ratio <= 6)).all()
    g = torch.Generator().manual_seed(6)
    codes = torch.randint(0, 16, (4, 64), generator=g)
    codes[:, ::32] = 15  # -6 in every block
    exps = torch.randint(120, 135, (4, 2), generator=g)
    vals = E2M1[(codes & 7)] * torch.where(codes >= 8, -1.0, 1.0)
    xg = (vals.view(4, 2, 32) * torch.exp2(exps.float() - 127).unsqueeze(-1)).view(4, 64)
    tg = quant.quantize_mxfp4(xg)
    assert torch.equal(tg.dequantize(), xg) and torch.equal(tg.scale.long(), exps)


def test_swizzle_128x4_layout_and_inverse():
    rows, cols = 200, 6
    g = torch.Generator().manual_seed(7)
    lin = torch.randint(1, 255, (rows, cols), generator=g, dtype=torch.uint8)
    sw = quant.swizzle_nvfp4_scale_to_128x4(lin)
    assert sw.shape == (256, 8)
    flat = sw.reshape(-1)
    for r, c in [(0, 0), (1, 0), (31, 3), (32, 0), (127, 5), (128, 0), (199, 5), (64, 2)]:
        tile = (r // 128) * 2 + c // 4
        off = tile * 512 + (r % 128 % 32) * 16 + (r % 128 // 32) * 4 + c % 4
        assert flat[off] == lin[r, c], (r, c)
    assert int((flat == 0).sum()) == 256 * 8 - rows * cols  # padding is zero, nothing else is
    assert torch.equal(quant.unswizzle_nvfp4_scale_from_128x4(sw, rows, cols), lin)
    e4 = lin.view(torch.float8_e4m3fn)
    sw8 = quant.swizzle_nvfp4_scale_to_128x4(e4)
    assert sw8.dtype == torch.float8_e4m3fn
    assert torch.equal(quant.unswizzle_nvfp4_scale_from_128x4(sw8, rows, cols).view(torch.uint8), lin)


def test_quant_bad_inputs():
    with pytest.raises(ValueError, match="x: .*multiple of 16"):
        quant.quantize_nvfp4(torch.randn(3, 20))
    with pytest.raises(TypeError, match="x: expected a float32/bf16/fp16"):
        quant.quantize_mxfp4(torch.ones(2, 32, dtype=torch.int32))
    with pytest.raises(TypeError, match="scale: expected float8_e4m3fn"):
        quant.dequantize_nvfp4(torch.zeros(2, 8, dtype=torch.uint8) + 3, torch.ones(2, 1))
    with pytest.raises(ValueError, match="scale: expected shape"):
        quant.dequantize_nvfp4(torch.ones(2, 8, dtype=torch.uint8), torch.ones(2, 2).to(torch.float8_e4m3fn))
    with pytest.raises(ValueError, match="scale: expected shape \\[8\\]"):
        quant.quantize_fp8(torch.randn(4, 8, 16), torch.ones(3), per_head=True)
    with pytest.raises(ValueError, match="swizzled: expected 1024 elements"):
        quant.unswizzle_nvfp4_scale_from_128x4(torch.ones(128, 4, dtype=torch.uint8), 129, 4)
