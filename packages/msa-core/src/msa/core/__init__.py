"""msa-core: dense FMHA (index pass, max-score, per-token block-sparse), top-k block select, PyTorch references.

Public names are imported lazily so ``import msa.core`` stays cheap (no JIT, no CUDA init).
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_LAZY = {
    "fmha_plan": "msa.core.api",
    "fmha": "msa.core.api",
    "FmhaPlan": "msa.core.api",
    "sparse_topk_select": "msa.core.topk",
    "KernelUnavailableError": "msa.core.dispatch",
}

__all__ = sorted(_LAZY) + ["reference", "validation", "dispatch"]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    if name in ("reference", "validation", "dispatch", "jit"):
        return importlib.import_module(f"msa.core.{name}")
    raise AttributeError(f"module 'msa.core' has no attribute {name!r}")
