"""Quantisation formats used by msa: FP8 E4M3 (per tensor / per head), NVFP4 and MXFP4 (pure PyTorch).

Conventions (``x`` is the real value):

- **FP8 E4M3**: ``x ~= float(x_fp8) * scale``, ``scale = amax / 448`` (per tensor, or per head along ``head_dim``).
  The scale is what ``msa.core.fmha`` takes as ``q_scale`` / ``k_scale`` / ``v_scale``.
- **NVFP4**: E2M1 values ``{0, 0.5, 1, 1.5, 2, 3, 4, 6}`` with sign, two per byte (element ``2i`` in the low
  nibble, ``2i+1`` in the high nibble; bit 3 of a nibble is the sign), one E4M3 scale per 16 consecutive elements
  of the last dim, optional fp32 global scale: ``x ~= e2m1 * scale_e4m3 * global``. Block scale =
  ``block_amax / (6 * global)`` rounded to E4M3, so a block's largest magnitude maps to ~6.
- **MXFP4** (OCP MX): E2M1 values as above, one E8M0 scale per 32 elements stored as the biased exponent byte
  ``e`` (``scale = 2^(e-127)``). The exponent is ``ceil(log2(block_amax / 6))`` so no element saturates.

Error bounds (tested): for NVFP4 and MXFP4 every element satisfies ``|x - deq(quant(x))| <= 0.25 * block_amax``
(E2M1's coarsest step is 2 units at magnitude 4..6, i.e. <= 1/6 of the block max, plus E4M3 scale rounding of
<= 2^-4 relative); values already on the grid (``e2m1 * representable scale`` with the block max at +-6)
round-trip exactly. FP8: relative error <= 2^-4 for normal values (3 mantissa bits, round to nearest even).

Swizzled scales: cuBLAS / cuDNN block-scaled GEMMs read NVFP4 scales in 128x4 tiles: a ``[rows, cols]`` scale
matrix is padded to ``(ceil(rows/128)*128, ceil(cols/4)*4)``, tiles are stored row-tile-major, and inside a tile
element ``(r, c)`` sits at byte ``(r % 32) * 16 + (r // 32) * 4 + c``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from msa.core.validation import check_int, check_tensor, dtype_name

__all__ = [
    "FP8_MAX",
    "E2M1_VALUES",
    "fp8_scale_from_amax",
    "quantize_fp8",
    "dequantize_fp8",
    "Nvfp4Tensor",
    "Mxfp4Tensor",
    "nvfp4_global_scale_from_amax",
    "quantize_nvfp4",
    "dequantize_nvfp4",
    "quantize_mxfp4",
    "dequantize_mxfp4",
    "pack_e2m1",
    "unpack_e2m1",
    "swizzle_nvfp4_scale_to_128x4",
    "unswizzle_nvfp4_scale_from_128x4",
    "NVFP4_BLOCK",
    "MXFP4_BLOCK",
    "dequantize_kv",
    "stage_kv",
    "check_nvfp4_tensor",
    "is_quantized_kv",
]

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
E2M1_MAX = 6.0
NVFP4_BLOCK = 16
MXFP4_BLOCK = 32
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
# Midpoints between neighbouring magnitudes; ties go to the even code (round-to-nearest-even on the code).
_E2M1_MIDS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)
_TIE_UP = (0.75, 1.75, 3.5)  # ties whose upper neighbour has the even code
_FP32_TINY = torch.finfo(torch.float32).tiny


_DEQUANT_OP = "dequantize_kv"


def _check_float_tensor(name: str, x) -> None:
    check_tensor(name, x)
    if not x.is_floating_point() or x.dtype in (FP8, torch.float8_e5m2):
        raise TypeError(f"{name}: expected a float32/bf16/fp16 tensor, got dtype {dtype_name(x.dtype)}")


# ----------------------------------------------------------------------------------------------------- FP8 E4M3


def fp8_scale_from_amax(amax: torch.Tensor) -> torch.Tensor:
    """Dequantisation scale ``amax / 448`` (fp32); an all-zero slice gets scale 1."""
    amax = amax.float()
    return torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))


def quantize_fp8(x: torch.Tensor, scale: torch.Tensor | float | None = None, *, per_head: bool = False,
                 head_dim: int = -2) -> tuple[torch.Tensor, torch.Tensor]:
    """``x -> (x_fp8, scale)`` with ``x ~= x_fp8.float() * scale``.

    ``per_head=False``: one fp32 scale (0-d tensor). ``per_head=True``: one scale per index of ``head_dim``
    (default -2, i.e. ``H`` of ``[..., H, D]``), returned as ``[H]``. ``scale`` may be given (then only the cast
    happens); values are clamped to +-448 before the cast (E4M3 has no infinity).
    """
    _check_float_tensor("x", x)
    if isinstance(scale, (int, float)) and (isinstance(scale, bool) or not scale > 0):
        raise ValueError(f"scale: expected a positive number, got {scale!r}")
    xf = x.float()
    if per_head:
        if x.dim() < 1:
            raise ValueError("x: expected at least one dimension for per_head=True")
        hd = head_dim % x.dim()
        if scale is None:
            dims = [i for i in range(x.dim()) if i != hd]
            amax = xf.abs().amax(dim=dims) if dims else xf.abs()
            scale = fp8_scale_from_amax(amax)
        scale_t = torch.as_tensor(scale, dtype=torch.float32, device=x.device)
        if scale_t.shape != (x.shape[hd],):
            raise ValueError(f"scale: expected shape [{x.shape[hd]}] (per head), got {list(scale_t.shape)}")
        shape = [1] * x.dim()
        shape[hd] = x.shape[hd]
        div = scale_t.view(shape)
    else:
        if scale is None:
            scale = fp8_scale_from_amax(xf.abs().amax() if xf.numel() else torch.zeros((), device=x.device))
        scale_t = torch.as_tensor(scale, dtype=torch.float32, device=x.device)
        if scale_t.numel() != 1:
            raise ValueError(f"scale: expected a scalar for per_head=False, got shape {list(scale_t.shape)}")
        scale_t = scale_t.reshape(())
        div = scale_t
    q = (xf / div).clamp_(-FP8_MAX, FP8_MAX).to(FP8)
    return q, scale_t


def dequantize_fp8(x_fp8: torch.Tensor, scale: torch.Tensor | float, *, head_dim: int = -2,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    check_tensor("x_fp8", x_fp8, dtype=FP8)
    s = torch.as_tensor(scale, dtype=torch.float32, device=x_fp8.device)
    if s.numel() > 1 or s.dim() == 1:
        hd = head_dim % x_fp8.dim()
        if s.shape != (x_fp8.shape[hd],):
            raise ValueError(f"scale: expected a scalar or shape [{x_fp8.shape[hd]}], got {list(s.shape)}")
        shape = [1] * x_fp8.dim()
        shape[hd] = x_fp8.shape[hd]
        s = s.view(shape)
    return (x_fp8.float() * s).to(dtype)


# --------------------------------------------------------------------------------------------------------- E2M1


def _e2m1_codes(y: torch.Tensor) -> torch.Tensor:
    """Nearest E2M1 code (sign in bit 3) of ``y`` (already divided by its scale), saturating at +-6."""
    a = y.abs()
    mids = torch.tensor(_E2M1_MIDS, dtype=torch.float32, device=y.device)
    code = torch.bucketize(a, mids, right=False)  # a value equal to a midpoint goes down ...
    for t in _TIE_UP:  # ... unless the upper neighbour is the even code
        code = torch.where(a == t, code + 1, code)
    code = torch.where(torch.isnan(a), torch.zeros_like(code), code)
    sign = (y < 0) & (code > 0)
    return (code | (sign.to(code.dtype) << 3)).to(torch.uint8)


def _e2m1_values(codes: torch.Tensor) -> torch.Tensor:
    """Decode 4-bit E2M1 codes arithmetically (no lookup table: building one on a GPU is a host->device copy,
    which would make every dequantisation synchronise with the host)."""
    c = codes.to(torch.int32)
    mag = c & 7
    e, m = mag >> 1, (mag & 1).to(torch.float32)
    normal = torch.ldexp(1.0 + 0.5 * m, (e - 1).clamp(min=0))  # 2^(e-1) * (1 + m/2) for e >= 1
    val = torch.where(e == 0, 0.5 * m, normal)  # subnormal: 0 or 0.5
    return torch.where((c & 8) != 0, -val, val)


def pack_e2m1(codes: torch.Tensor) -> torch.Tensor:
    """``[..., 2n]`` 4-bit codes -> ``[..., n]`` uint8 (element 2i low nibble, 2i+1 high nibble)."""
    if codes.shape[-1] % 2:
        raise ValueError(f"codes: expected an even last dimension, got {codes.shape[-1]}")
    c = codes.to(torch.uint8)
    return c[..., 0::2] | (c[..., 1::2] << 4)


def unpack_e2m1(packed: torch.Tensor) -> torch.Tensor:
    """``[..., n]`` uint8 -> ``[..., 2n]`` 4-bit codes."""
    p = _as_uint8("packed", packed)
    return torch.stack([p & 0xF, p >> 4], dim=-1).reshape(*p.shape[:-1], p.shape[-1] * 2)


def _as_uint8(name: str, t: torch.Tensor) -> torch.Tensor:
    check_tensor(name, t)
    if t.dtype == torch.uint8:
        return t
    if t.dtype == torch.int8 or t.dtype == getattr(torch, "float4_e2m1fn_x2", None):
        return t.view(torch.uint8)
    raise TypeError(f"{name}: expected packed FP4 bytes (uint8, int8 or float4_e2m1fn_x2), got {dtype_name(t.dtype)}")


# -------------------------------------------------------------------------------------------------------- NVFP4


@dataclass
class Nvfp4Tensor:
    """``data [..., D/2]`` uint8 packed E2M1, ``scale [..., D/16]`` float8_e4m3fn, ``global_scale`` fp32 0-d or
    None. ``x ~= e2m1 * scale * global_scale``."""

    data: torch.Tensor
    scale: torch.Tensor
    global_scale: torch.Tensor | None = None

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_nvfp4(self.data, self.scale, self.global_scale, dtype=dtype)


def nvfp4_global_scale_from_amax(amax: torch.Tensor | float) -> torch.Tensor:
    """Global (decode) scale ``amax / (448 * 6)``: the tensor's largest block scale lands on E4M3's max."""
    a = torch.as_tensor(amax, dtype=torch.float32)
    return torch.where(a > 0, a / (FP8_MAX * E2M1_MAX), torch.ones_like(a))


def _blocks(x: torch.Tensor, block: int, name: str) -> torch.Tensor:
    if x.dim() < 1 or x.shape[-1] % block:
        raise ValueError(f"{name}: expected the last dimension to be a multiple of {block}, got shape {list(x.shape)}")
    return x.float().reshape(*x.shape[:-1], x.shape[-1] // block, block)


def quantize_nvfp4(x: torch.Tensor, global_scale: torch.Tensor | float | str | None = None) -> Nvfp4Tensor:
    """Quantise along the last dim (a multiple of 16). ``global_scale``: None (block scales alone, amax up to
    448*6 per block), a value, or ``"auto"`` (= :func:`nvfp4_global_scale_from_amax` of ``x``)."""
    _check_float_tensor("x", x)
    xb = _blocks(x, NVFP4_BLOCK, "x")
    if isinstance(global_scale, str):
        if global_scale != "auto":
            raise ValueError(f"global_scale: expected None, a float, a tensor or 'auto', got {global_scale!r}")
        global_scale = nvfp4_global_scale_from_amax(xb.abs().amax() if xb.numel() else 0.0).to(x.device)
    g = None if global_scale is None else torch.as_tensor(global_scale, dtype=torch.float32, device=x.device)
    if g is not None and g.numel() != 1:
        raise ValueError(f"global_scale: expected a scalar, got shape {list(g.shape)}")
    g = None if g is None else g.reshape(())
    amax = xb.abs().amax(dim=-1)
    s = amax / E2M1_MAX if g is None else amax / (E2M1_MAX * g)
    s8 = s.clamp(max=FP8_MAX).to(FP8)
    sf = s8.float() if g is None else s8.float() * g
    y = torch.where(sf.unsqueeze(-1) > 0, xb / sf.unsqueeze(-1).clamp(min=_FP32_TINY), torch.zeros_like(xb))
    codes = _e2m1_codes(y).reshape(x.shape)
    return Nvfp4Tensor(pack_e2m1(codes), s8, g)


def dequantize_nvfp4(data: torch.Tensor, scale: torch.Tensor, global_scale: torch.Tensor | float | None = None, *,
                     dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``data [..., D/2]`` packed + ``scale [..., D/16]`` (float8_e4m3fn or its uint8 bits) -> ``[..., D]``."""
    vals = _e2m1_values(unpack_e2m1(data))
    sc = _e4m3_scale(scale)
    d = vals.shape[-1]
    if sc.shape[:-1] != vals.shape[:-1] or sc.shape[-1] * NVFP4_BLOCK != d:
        raise ValueError(f"scale: expected shape {list(vals.shape[:-1]) + [d // NVFP4_BLOCK]} for data of shape "
                         f"{list(data.shape)}, got {list(scale.shape)}")
    out = (vals.reshape(*vals.shape[:-1], -1, NVFP4_BLOCK) * sc.unsqueeze(-1)).reshape(vals.shape)
    if global_scale is not None:
        out = out * torch.as_tensor(global_scale, dtype=torch.float32, device=out.device)
    return out.to(dtype)


def _e4m3_scale(scale: torch.Tensor) -> torch.Tensor:
    check_tensor("scale", scale)
    if scale.dtype == FP8:
        return scale.float()
    if scale.dtype == torch.uint8:
        return scale.view(FP8).float()
    raise TypeError(f"scale: expected float8_e4m3fn (or its uint8 bits) for NVFP4, got {dtype_name(scale.dtype)}")


# -------------------------------------------------------------------------------------------------------- MXFP4


@dataclass
class Mxfp4Tensor:
    """``data [..., D/2]`` uint8 packed E2M1, ``scale [..., D/32]`` uint8 E8M0 exponents (``2^(e-127)``)."""

    data: torch.Tensor
    scale: torch.Tensor

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_mxfp4(self.data, self.scale, dtype=dtype)


def quantize_mxfp4(x: torch.Tensor) -> Mxfp4Tensor:
    """Quantise along the last dim (a multiple of 32) with power-of-two block scales."""
    _check_float_tensor("x", x)
    xb = _blocks(x, MXFP4_BLOCK, "x")
    amax = xb.abs().amax(dim=-1)
    exp = torch.ceil(torch.log2(torch.where(amax > 0, amax / E2M1_MAX, torch.ones_like(amax))))
    exp = torch.where(amax > 0, exp, torch.full_like(exp, -127.0)).clamp(-127, 127)
    sf = torch.exp2(exp)
    codes = _e2m1_codes(xb / sf.unsqueeze(-1)).reshape(x.shape)
    return Mxfp4Tensor(pack_e2m1(codes), (exp + 127).to(torch.uint8))


def e8m0_to_float(scale: torch.Tensor) -> torch.Tensor:
    check_tensor("scale", scale)
    e8 = getattr(torch, "float8_e8m0fnu", None)
    if scale.dtype == e8:
        scale = scale.view(torch.uint8)
    if scale.dtype != torch.uint8:
        raise TypeError(f"scale: expected uint8 E8M0 exponents (or float8_e8m0fnu) for MXFP4, got "
                        f"{dtype_name(scale.dtype)}")
    e = scale.to(torch.float32)
    return torch.where(scale == 255, torch.full_like(e, float("nan")), torch.exp2(e - 127.0))


def dequantize_mxfp4(data: torch.Tensor, scale: torch.Tensor, *, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    vals = _e2m1_values(unpack_e2m1(data))
    sc = e8m0_to_float(scale)
    d = vals.shape[-1]
    if sc.shape[:-1] != vals.shape[:-1] or sc.shape[-1] * MXFP4_BLOCK != d:
        raise ValueError(f"scale: expected shape {list(vals.shape[:-1]) + [d // MXFP4_BLOCK]} for data of shape "
                         f"{list(data.shape)}, got {list(scale.shape)}")
    return (vals.reshape(*vals.shape[:-1], -1, MXFP4_BLOCK) * sc.unsqueeze(-1)).reshape(vals.shape).to(dtype)


# ------------------------------------------------------------------------------------------- 128x4 scale swizzle


def swizzle_nvfp4_scale_to_128x4(scale: torch.Tensor) -> torch.Tensor:
    """Linear ``[..., cols]`` scales (rows = product of leading dims) -> ``[pad_rows, pad_cols]`` whose storage is
    the cuBLAS 128x4 tiled order (see the module docstring). Padding is zero. Dtype is kept."""
    check_tensor("scale", scale)
    if scale.dim() < 1:
        raise ValueError("scale: expected at least one dimension")
    cols = scale.shape[-1]
    s2 = scale.reshape(-1, cols)
    rows = s2.shape[0]
    pr, pc = -(-rows // 128) * 128, -(-cols // 4) * 4
    raw = s2.view(torch.uint8) if s2.element_size() == 1 else s2
    padded = torch.zeros(pr, pc, dtype=raw.dtype, device=scale.device)
    padded[:rows, :cols] = raw
    tiles = padded.view(pr // 128, 4, 32, pc // 4, 4).permute(0, 3, 2, 1, 4).contiguous()
    out = tiles.view(pr, pc)
    return out.view(scale.dtype) if s2.element_size() == 1 else out


def unswizzle_nvfp4_scale_from_128x4(swizzled: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Inverse of :func:`swizzle_nvfp4_scale_to_128x4`: ``[pad_rows, pad_cols]`` -> linear ``[rows, cols]``."""
    check_tensor("swizzled", swizzled)
    rows = check_int("rows", rows, min=0)
    cols = check_int("cols", cols, min=0)
    pr, pc = -(-rows // 128) * 128, -(-cols // 4) * 4
    if swizzled.numel() != pr * pc:
        raise ValueError(f"swizzled: expected {pr * pc} elements ({pr}x{pc} padded), got shape {list(swizzled.shape)}")
    raw = swizzled.reshape(-1).view(torch.uint8) if swizzled.element_size() == 1 else swizzled.reshape(-1)
    lin = raw.view(pr // 128, pc // 4, 32, 4, 4).permute(0, 3, 2, 1, 4).reshape(pr, pc)[:rows, :cols].contiguous()
    return lin.view(swizzled.dtype) if swizzled.element_size() == 1 else lin


# ------------------------------------------------------------------------------------------ K/V staging (GPU)


def check_nvfp4_tensor(name: str, t, *, device=None) -> list[int]:
    """Validate an :class:`Nvfp4Tensor` argument; returns the shape of its dequantised tensor (``[..., D]``)."""
    if not isinstance(t, Nvfp4Tensor):
        raise TypeError(f"{name}: expected an Nvfp4Tensor, got {type(t).__name__}")
    check_tensor(f"{name}.data", t.data, device=device)
    _as_uint8(f"{name}.data", t.data)
    if t.data.dim() < 1:
        raise ValueError(f"{name}.data: expected at least one dimension")
    d = t.data.shape[-1] * 2
    check_tensor(f"{name}.scale", t.scale, device=t.data.device)
    if t.scale.dtype not in (FP8, torch.uint8):
        raise TypeError(f"{name}.scale: expected float8_e4m3fn (or its uint8 bits), got {dtype_name(t.scale.dtype)}")
    want = list(t.data.shape[:-1]) + [d // NVFP4_BLOCK]
    if d % NVFP4_BLOCK or list(t.scale.shape) != want:
        raise ValueError(f"{name}.scale: expected shape {want} (one scale per {NVFP4_BLOCK} of the {d} elements of "
                         f"{name}.data's rows), got {list(t.scale.shape)}")
    g = t.global_scale
    if g is not None and not isinstance(g, (int, float)):
        check_tensor(f"{name}.global_scale", g, dtype=torch.float32, device=t.data.device)
        if g.numel() != 1:
            raise ValueError(f"{name}.global_scale: expected a scalar, got shape {list(g.shape)}")
    return list(t.data.shape[:-1]) + [d]


def is_quantized_kv(t) -> bool:
    """An fp8 e4m3 tensor or an :class:`Nvfp4Tensor` (what :func:`dequantize_kv` takes)."""
    return isinstance(t, Nvfp4Tensor) or (isinstance(t, torch.Tensor) and t.dtype == FP8)


def _scale_vector(scale, heads: int, device, name: str) -> torch.Tensor | None:
    """fp32 ``[1]`` or ``[heads]`` on ``device`` (no host -> device copy for Python numbers), or None."""
    if scale is None:
        return None
    if isinstance(scale, bool) or (isinstance(scale, (int, float)) and not scale > 0):
        raise ValueError(f"{name}: expected a positive number or a tensor, got {scale!r}")
    if isinstance(scale, (int, float)):
        return torch.full((1,), float(scale), dtype=torch.float32, device=device)
    check_tensor(name, scale, device=device)
    if scale.numel() == 1:
        return scale.reshape(1).float()
    if scale.shape != (heads,):
        raise ValueError(f"{name}: expected a scalar or shape [{heads}] (one per head), got {list(scale.shape)}")
    return scale.float().contiguous()


def dequantize_kv(x, *, dtype: torch.dtype = torch.bfloat16, scale=None, rows: torch.Tensor | None = None,
                  backend: str | None = None) -> torch.Tensor:
    """Quantised K or V -> ``dtype`` (bf16 / fp16), optionally gathering outer rows: the staging step that lets the
    16-bit attention kernels serve fp8 and NVFP4 K/V.

    Args:
        x: ragged ``[N, H, D]`` or paged ``[pages, H, block, D]``: an fp8 e4m3 tensor (``float(x) * scale``) or an
            :class:`Nvfp4Tensor` (``(e2m1 * block scale) * global_scale``; ``scale`` must be None).
        scale: fp8 only: None, a positive number, a 1-element tensor, or ``[H]`` per head (``H = x.shape[1]``).
        rows: int32 ``[n_out]``: output index ``r`` is input index ``rows[r]`` along dim 0 (e.g. a flattened page
            table: only the pages a call reads are converted); an index outside ``[0, N)`` gives zeros.

    Returns ``[N or n_out, *x.shape[1:-1], D]`` in ``dtype``. CUDA: one msa-core kernel launch (``kv_dequant``; no host
    synchronisation); CPU or ``MSA_BACKEND=reference``: PyTorch, the kernel's bit-exact oracle.
    """
    from msa.core.dispatch import select_backend  # noqa: PLC0415

    nvfp4 = isinstance(x, Nvfp4Tensor)
    if nvfp4:
        shape = check_nvfp4_tensor("x", x)
        dev = x.data.device
        if scale is not None:
            raise ValueError("scale: not used for NVFP4 (its scales are x.scale and x.global_scale)")
    else:
        check_tensor("x", x, dtype=FP8)
        shape, dev = list(x.shape), x.device
    if len(shape) < 3:
        raise ValueError(f"x: expected [N, H, D] or [pages, H, block, D], got shape {shape}")
    if dtype not in (torch.bfloat16, torch.float16):
        raise TypeError(f"dtype: expected torch.bfloat16 or torch.float16, got {dtype_name(dtype)}")
    heads = shape[1]
    sv = _scale_vector(scale, heads, dev, "scale")
    if rows is not None:
        check_tensor("rows", rows, dtype=torch.int32, ndim=1, device=dev)
    n_out = shape[0] if rows is None else rows.shape[0]
    out_shape = [n_out] + shape[1:]
    row = 1
    for s_ in shape[1:]:
        row *= s_
    fmt = "nvfp4" if nvfp4 else "fp8"
    choice = select_backend(_DEQUANT_OP, dev, backend, fmt=fmt, out_dtype=dtype, row=row)
    if choice != "reference":
        from msa.core.kernels import kv_dequant  # noqa: PLC0415

        out = torch.empty(out_shape, dtype=dtype, device=dev)
        if n_out == 0 or row == 0:
            return out
        if nvfp4:
            g = x.global_scale
            gv = None if g is None else _scale_vector(g, 1, dev, "x.global_scale")
            kv_dequant.launch(x.data.reshape(shape[0], -1), out.view(n_out, -1), fmt="nvfp4",
                              block_scale=x.scale.reshape(shape[0], -1), scale=gv, rows=rows.contiguous()
                              if rows is not None else None)
        else:
            kv_dequant.launch(x.reshape(shape[0], -1), out.view(n_out, -1), fmt="fp8", scale=sv,
                              rows=rows.contiguous() if rows is not None else None, head_elems=row // heads)
        return out
    return _dequantize_kv_reference(x, dtype, sv, rows, shape)


def _dequantize_kv_reference(x, dtype, sv, rows, shape):
    n = shape[0]
    valid = None
    if rows is not None:
        r = rows.to(torch.int64)
        valid = (r >= 0) & (r < n)
        idx = r.clamp(0, max(n - 1, 0))
        if n == 0:  # nothing to gather from: every output row is zero
            return torch.zeros([rows.shape[0]] + shape[1:], dtype=dtype, device=rows.device)
        x = Nvfp4Tensor(x.data[idx], x.scale[idx], x.global_scale) if isinstance(x, Nvfp4Tensor) else x[idx]
    if isinstance(x, Nvfp4Tensor):
        out = dequantize_nvfp4(x.data, x.scale, x.global_scale, dtype=dtype)
    else:
        s = 1.0 if sv is None else (sv.reshape(()) if sv.numel() == 1 else sv.view([1, -1] + [1] * (x.dim() - 2)))
        out = (x.float() * s).to(dtype)
    if valid is not None:
        out = torch.where(valid.view([-1] + [1] * (out.dim() - 1)), out, torch.zeros((), dtype=dtype,
                                                                                       device=out.device))
    return out


def stage_kv(q: torch.Tensor, k, v, dtype: torch.dtype, *, page_table: torch.Tensor | None = None,
             cu_seqlens_k: torch.Tensor | None = None, block: int = 128, backend: str | None = None):
    """Quantised K/V (fp8 or :class:`Nvfp4Tensor`) -> ``dtype`` for a 16-bit attention kernel, through
    :func:`dequantize_kv` (no host sync); an fp8 ``q`` is cast (exactly) to ``dtype``. Paged (``page_table [B, W]``
    int32 with ``cu_seqlens_k [B+1]``): only the entries a request uses (its first ceil(k_len / block)) are
    converted, into a compact page pool addressed by the returned ``arange`` table; the others read nothing and come
    out zero. Returns ``(q, k, v, page_table)``."""
    if q.dtype == FP8:
        q = q.to(dtype)
    rows = None
    if page_table is not None:
        batch, width = page_table.shape
        k_lens = (cu_seqlens_k[1:] - cu_seqlens_k[:-1]).to(torch.int64)
        used = torch.arange(width, device=q.device).view(1, width) < ((k_lens + block - 1) // block).view(batch, 1)
        rows = torch.where(used, page_table, -1).to(torch.int32).reshape(-1).contiguous()
        page_table = torch.arange(batch * width, dtype=torch.int32, device=q.device).view(batch, width)
    k = dequantize_kv(k, dtype=dtype, rows=rows, backend=backend)
    v = dequantize_kv(v, dtype=dtype, rows=rows, backend=backend)
    return q, k, v, page_table
