"""Argument checks shared by the msa.cute ops (metadata only: nothing here reads tensor values)."""

from __future__ import annotations

import math
import numbers

import torch
from msa.core.validation import check_int, check_tensor, dtype_name

__all__ = [
    "FP8_E4M3",
    "ATTN_DTYPES",
    "cdiv",
    "check_compute_device",
    "check_cu_seqlens",
    "check_positive_float",
    "check_qkv_dtypes",
    "out_dtype_for",
    "is_capturing",
]

FP8_E4M3 = torch.float8_e4m3fn
ATTN_DTYPES = (torch.bfloat16, torch.float16, FP8_E4M3)


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def check_compute_device(name: str, t: torch.Tensor) -> None:
    """Reject devices that cannot run anything (``meta``, ...): ops run on CPU (reference) or CUDA."""
    if t.device.type not in ("cpu", "cuda"):
        raise ValueError(f"{name}: expected a tensor on cpu or cuda, got one on {t.device}")


def check_cu_seqlens(name: str, t, *, device: torch.device, batch: int | None = None) -> int:
    """``[B+1]`` int32 contiguous prefix sums on ``device``; returns ``B``."""
    check_tensor(name, t, dtype=torch.int32, ndim=1, device=device, contiguous=True)
    if t.shape[0] < 1:
        raise ValueError(f"{name}: expected shape [batch+1] with at least one element, got {list(t.shape)}")
    if batch is not None and t.shape[0] != batch + 1:
        raise ValueError(f"{name}: expected shape [{batch + 1}] (batch+1), got {list(t.shape)}")
    return t.shape[0] - 1


def check_positive_float(name: str, v, *, allow_none: bool = False) -> float | None:
    if v is None and allow_none:
        return None
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise TypeError(f"{name}: expected a float, got {type(v).__name__} ({v!r})")
    f = float(v)
    if not math.isfinite(f) or f <= 0:
        raise ValueError(f"{name}: expected a finite float > 0, got {f}")
    return f


def check_qkv_dtypes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """q bf16/fp16/fp8-e4m3; K/V share one dtype: q's, or fp8-e4m3 under a bf16/fp16 q (fp8 KV cache)."""
    check_tensor("q", q, dtype=ATTN_DTYPES)
    check_tensor("k", k, dtype=ATTN_DTYPES)
    if k.dtype != q.dtype and not (k.dtype == FP8_E4M3 and q.dtype in (torch.bfloat16, torch.float16)):
        raise TypeError(
            f"k: expected dtype {dtype_name(q.dtype)} (the dtype of q) or float8_e4m3fn with a bf16/fp16 q, "
            f"got {dtype_name(k.dtype)}"
        )
    if v.dtype != k.dtype:
        raise TypeError(f"v: expected dtype {dtype_name(k.dtype)} (the dtype of k), got {dtype_name(v.dtype)}")


def out_dtype_for(q_dtype: torch.dtype) -> torch.dtype:
    """Output dtype: bf16 for fp8 queries, else the query dtype (same rule as msa.core.fmha)."""
    return torch.bfloat16 if q_dtype == FP8_E4M3 else q_dtype


def is_capturing(device: torch.device | None = None) -> bool:
    """True while the current CUDA stream is being captured into a graph (never touches CUDA without it)."""
    if not torch.cuda.is_available():
        return False
    try:
        return bool(torch.cuda.is_current_stream_capturing())
    except RuntimeError:
        return False


def check_head_ratio(hq: int, hkv: int) -> int:
    if hkv <= 0 or hq % hkv != 0:
        raise ValueError(f"k: expected a KV head count dividing the query head count {hq}, got {hkv}")
    return hq // hkv


def check_int_arg(name: str, v, **kw) -> int:
    return check_int(name, v, **kw)
