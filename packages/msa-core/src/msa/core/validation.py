"""Cheap argument validation shared by every public msa op.

Every check raises ``TypeError`` (wrong type / dtype) or ``ValueError`` (wrong shape, device, layout, value)
with a message that names the argument and gives the expected and the actual value. Checks here never read
tensor *values* (no host synchronisation); value checks (sorted indices, ranges) live next to each op and
run only when :func:`validation_enabled` is true (``validate=True`` or ``MSA_VALIDATE=1``).
"""

from __future__ import annotations

import math
import numbers
import os
from typing import Iterable, Sequence

import torch

__all__ = [
    "validation_enabled",
    "check_tensor",
    "check_same_device",
    "check_int",
    "check_divisible",
    "dtype_name",
    "check_bool",
    "check_float",
    "check_scale",
    "host_int_list",
]


def validation_enabled(validate: bool | None = None) -> bool:
    """Data (value) checks run when ``validate`` is True, or when it is None and ``MSA_VALIDATE=1``."""
    if validate is not None:
        return bool(validate)
    return os.environ.get("MSA_VALIDATE", "0").strip().lower() in ("1", "true", "yes", "on")


def dtype_name(dt: torch.dtype | None) -> str:
    return "None" if dt is None else str(dt).replace("torch.", "")


def _fmt_shape(shape: Sequence) -> str:
    return "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"


def check_tensor(
    name: str,
    t,
    *,
    dtype: torch.dtype | Iterable[torch.dtype] | None = None,
    ndim: int | Iterable[int] | None = None,
    shape: Sequence[int | None] | None = None,
    device: torch.device | str | None = None,
    contiguous: bool = False,
    last_dim_contiguous: bool = False,
    allow_none: bool = False,
) -> None:
    """Validate a tensor argument's metadata; ``None`` entries in ``shape`` are wildcards."""
    if t is None:
        if allow_none:
            return
        raise TypeError(f"{name}: expected a torch.Tensor, got None")
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if dtype is not None:
        allowed = (dtype,) if isinstance(dtype, torch.dtype) else tuple(dtype)
        if t.dtype not in allowed:
            exp = " or ".join(dtype_name(d) for d in allowed)
            raise TypeError(f"{name}: expected dtype {exp}, got {dtype_name(t.dtype)}")
    if ndim is not None:
        allowed_nd = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if t.dim() not in allowed_nd:
            exp = " or ".join(str(n) for n in allowed_nd)
            raise ValueError(f"{name}: expected {exp} dimensions, got {t.dim()} (shape {list(t.shape)})")
    if shape is not None:
        if t.dim() != len(shape) or any(s is not None and s != a for s, a in zip(shape, t.shape)):
            raise ValueError(f"{name}: expected shape {_fmt_shape(shape)}, got {list(t.shape)}")
    if device is not None:
        dev = torch.device(device)
        if t.device.type != dev.type or (dev.index is not None and t.device.index != dev.index):
            raise ValueError(f"{name}: expected a tensor on {dev}, got one on {t.device}")
    if contiguous and not t.is_contiguous():
        raise ValueError(f"{name}: expected a contiguous tensor, got strides {list(t.stride())} for shape {list(t.shape)}")
    if last_dim_contiguous and t.dim() > 0 and t.stride(-1) != 1:
        raise ValueError(f"{name}: expected the last dimension to be contiguous (stride 1), got stride {t.stride(-1)}")


def check_same_device(**tensors) -> torch.device:
    """All non-None tensors must live on one device; returns it."""
    dev = None
    first = None
    for name, t in tensors.items():
        if t is None:
            continue
        if dev is None:
            dev, first = t.device, name
        elif t.device != dev:
            raise ValueError(f"{name}: expected a tensor on {dev} (the device of {first}), got one on {t.device}")
    if dev is None:
        raise ValueError("no tensor given")
    return dev


def check_int(name: str, v, *, min: int | None = None, max: int | None = None, choices: Iterable[int] | None = None) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        try:
            import numpy as np  # noqa: PLC0415

            if isinstance(v, np.integer):
                v = int(v)
            else:
                raise TypeError
        except TypeError:
            raise TypeError(f"{name}: expected an int, got {type(v).__name__} ({v!r})") from None
    if choices is not None:
        ch = tuple(choices)
        if v not in ch:
            raise ValueError(f"{name}: expected one of {list(ch)}, got {v}")
    if min is not None and v < min:
        raise ValueError(f"{name}: expected >= {min}, got {v}")
    if max is not None and v > max:
        raise ValueError(f"{name}: expected <= {max}, got {v}")
    return v


def check_divisible(name: str, v: int, by: int, what: str = "") -> None:
    if v % by != 0:
        extra = f" ({what})" if what else ""
        raise ValueError(f"{name}: expected a multiple of {by}{extra}, got {v}")


def check_bool(name: str, v) -> bool:
    if not isinstance(v, bool):
        raise TypeError(f"{name}: expected a bool, got {type(v).__name__} ({v!r})")
    return v


def check_float(name: str, v, *, allow_none: bool = False, positive: bool = False) -> float | None:
    """A finite real Python number (int or float; bool is rejected). Returns it as ``float``."""
    if v is None:
        if allow_none:
            return None
        raise TypeError(f"{name}: expected a float, got None")
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise TypeError(f"{name}: expected a float, got {type(v).__name__} ({v!r})")
    f = float(v)
    if not math.isfinite(f):
        raise ValueError(f"{name}: expected a finite float, got {f}")
    if positive and f <= 0:
        raise ValueError(f"{name}: expected > 0, got {f}")
    return f


def check_scale(name: str, s, *, heads: int, device: torch.device | None = None, what: str = "heads") -> None:
    """A quantisation scale: ``None``, a finite Python number (per tensor) or a floating ``[heads]`` tensor."""
    if s is None:
        return
    if isinstance(s, torch.Tensor):
        if not s.is_floating_point():
            raise TypeError(f"{name}: expected a floating-point tensor, got dtype {dtype_name(s.dtype)}")
        if s.dim() != 1 or s.shape[0] != heads:
            raise ValueError(
                f"{name}: expected a float or a per-head tensor of shape [{heads}] ({what}), got shape {list(s.shape)}"
            )
        check_tensor(name, s, device=device, contiguous=True)
        return
    check_float(name, s)


def host_int_list(name: str, v, *, min: int | None = None) -> list[int]:
    """A 1-D sequence of ints (list, tuple or integer tensor on any device) as a host list.

    A CUDA tensor is copied to the host here (one synchronisation); plans call this, ops never do.
    """
    if isinstance(v, torch.Tensor):
        if v.is_floating_point() or v.is_complex() or v.dtype == torch.bool:
            raise TypeError(f"{name}: expected an integer tensor, got dtype {dtype_name(v.dtype)}")
        if v.dim() != 1:
            raise ValueError(f"{name}: expected a 1-D tensor, got shape {list(v.shape)}")
        out = [int(x) for x in v.tolist()]
    elif isinstance(v, (list, tuple)):
        out = [check_int(f"{name}[{i}]", x) for i, x in enumerate(v)]
    else:
        raise TypeError(f"{name}: expected a list, tuple or 1-D integer tensor, got {type(v).__name__}")
    if min is not None:
        for i, x in enumerate(out):
            if x < min:
                raise ValueError(f"{name}[{i}]: expected >= {min}, got {x}")
    return out
