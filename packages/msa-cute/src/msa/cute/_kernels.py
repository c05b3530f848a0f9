"""Optional kernel modules for msa.cute ops, found lazily and registered with ``msa.core.dispatch``.

Convention for a kernel module ``msa.cute.kernels.<name>``: it exposes ``available(device) -> (ok, reason)``
(cheap: no compilation), optionally ``supports(**features) -> (ok, reason)`` (does it implement this call: dtypes,
head dim, top-k, GQA ratio, ...; the features each op passes are listed at its ``choose`` call), and
``run(**kwargs)`` taking the public op's already-validated arguments. Nothing is imported until a CUDA call asks
for it, so ``import msa.cute`` never loads the CuTe DSL.
"""

from __future__ import annotations

import importlib
import importlib.util

import torch
from msa.core.dispatch import register_kernel, select_backend

__all__ = ["register_optional_kernel", "choose", "run_kernel"]


def _module_present(modname: str) -> bool:
    try:
        return importlib.util.find_spec(modname) is not None
    except (ModuleNotFoundError, ValueError):
        return False


def register_optional_kernel(op: str, modname: str) -> None:
    """Register ``modname`` for ``op`` when the module is installed; its availability check runs on first use."""
    if not _module_present(modname):
        return
    short = modname.rsplit(".", 1)[-1]

    def available(device: torch.device) -> tuple[bool, str]:
        try:
            mod = importlib.import_module(modname)
        except Exception as e:  # a broken kernel install must not break the reference path
            return False, f"import failed: {type(e).__name__}: {e}"
        return mod.available(device)

    def supports(**features) -> tuple[bool, str]:
        mod = importlib.import_module(modname)
        fn = getattr(mod, "supports", None)
        return (True, "") if fn is None else fn(**features)

    register_kernel(op, short, available, supports)


def choose(op: str, device: torch.device, backend: str | None, **features) -> str:
    """``"reference"`` or the name of the kernel that serves this call (``msa.core.dispatch.select_backend``)."""
    return select_backend(op, device, backend, **features)


def run_kernel(modname: str, **kwargs):
    return importlib.import_module(modname).run(**kwargs)
