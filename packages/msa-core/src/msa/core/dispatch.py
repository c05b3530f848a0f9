"""Backend dispatch: reference (pure PyTorch) or kernel.

Rules (same for every op):
- ``MSA_BACKEND=reference`` forces the reference everywhere.
- ``MSA_BACKEND=kernel`` requires a kernel: if none is registered/available for the op on that device, a
  :class:`KernelUnavailableError` is raised (never a silent fallback).
- ``MSA_BACKEND=auto`` (default): CPU tensors -> reference; CUDA tensors -> kernel when one is available,
  otherwise the reference on the GPU with a one-time warning naming the op and why.

Kernel packages register with :func:`register_kernel`; ``available(device)`` returns ``(ok, reason)`` and
must be cheap (no compilation). An optional ``supports(**features)`` says whether the kernel implements this
particular call (dtype, head dim, mode, ...); an unsupported call is served by the next kernel or, in ``auto``,
by the reference with a one-time warning that names the missing feature. msa-core's own kernels register when
:mod:`msa.core.kernels` is first imported (done here lazily, so ``import msa.core`` stays cheap).
"""

from __future__ import annotations

import os
import threading
import warnings
from dataclasses import dataclass
from typing import Callable

import torch

__all__ = ["KernelUnavailableError", "register_kernel", "select_backend", "backend_mode", "registered_kernels",
           "kernel_for"]


class KernelUnavailableError(RuntimeError):
    """MSA_BACKEND=kernel (or backend='kernel') was asked for, but no kernel can serve the call."""


@dataclass
class _KernelEntry:
    name: str
    available: Callable[[torch.device], tuple[bool, str]]
    supports: Callable[..., tuple[bool, str]] | None = None


_KERNELS: dict[str, list[_KernelEntry]] = {}
_WARNED: set[str] = set()
_LOCK = threading.Lock()
_VALID = ("auto", "reference", "kernel")


def register_kernel(
    op: str,
    name: str,
    available: Callable[[torch.device], tuple[bool, str]],
    supports: Callable[..., tuple[bool, str]] | None = None,
) -> None:
    with _LOCK:
        _KERNELS.setdefault(op, [])
        _KERNELS[op] = [e for e in _KERNELS[op] if e.name != name] + [_KernelEntry(name, available, supports)]


_BUILTINS_LOADED = False


def _load_builtin_kernels() -> None:
    global _BUILTINS_LOADED
    if not _BUILTINS_LOADED:
        _BUILTINS_LOADED = True
        import msa.core.kernels  # noqa: F401  (registers msa-core's kernels)


def registered_kernels(op: str) -> list[str]:
    return [e.name for e in _KERNELS.get(op, [])]


def backend_mode(backend: str | None = None) -> str:
    mode = (backend or os.environ.get("MSA_BACKEND", "auto")).strip().lower()
    if mode not in _VALID:
        raise ValueError(f"backend: expected one of {list(_VALID)} (argument or MSA_BACKEND), got {mode!r}")
    return mode


def _find_kernel(op: str, device: torch.device, features: dict) -> tuple[str | None, list[str]]:
    """The first registered kernel that is available on ``device`` and supports ``features`` (or None), and why each
    one before it could not serve."""
    _load_builtin_kernels()
    if device.type != "cuda":
        return None, [f"tensors are on {device}, kernels need CUDA"]
    reasons = []
    for e in _KERNELS.get(op, []):
        ok, why = e.available(device)
        if ok and e.supports is not None:
            ok, why = e.supports(**features)
        if ok:
            return e.name, reasons
        reasons.append(f"{e.name}: {why}")
    return None, reasons


def kernel_for(op: str, device: torch.device, **features) -> str | None:
    """The registered kernel that would serve ``op`` on ``device`` for these features, or None -- a query: no
    warning, no error, ``MSA_BACKEND`` not consulted (callers that plan around a missing kernel use it)."""
    return _find_kernel(op, device, features)[0]


def select_backend(op: str, device: torch.device, backend: str | None = None, **features) -> str:
    """Return ``"reference"`` or the name of the kernel that serves ``op`` on ``device`` for this call."""
    mode = backend_mode(backend)
    if mode == "reference":
        return "reference"
    name, reasons = _find_kernel(op, device, features)
    if name is not None:
        return name
    if not _KERNELS.get(op):
        reasons.append("no kernel is registered for this op yet")
    why = "; ".join(reasons)
    if mode == "kernel":
        raise KernelUnavailableError(f"{op}: MSA_BACKEND=kernel but no kernel can run this call ({why})")
    if device.type == "cuda":
        key = f"{op}@{device}:{why}"
        if key not in _WARNED:
            _WARNED.add(key)
            warnings.warn(
                f"msa: {op} is running the PyTorch reference on {device} ({why}); this is slow. "
                "Set MSA_BACKEND=reference to silence, or MSA_BACKEND=kernel to make this an error.",
                RuntimeWarning,
                stacklevel=3,
            )
    return "reference"
