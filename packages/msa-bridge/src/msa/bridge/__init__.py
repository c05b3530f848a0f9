"""msa-bridge: the dense call site served by the sparse backend, upstream-name aliases, and the ``msa`` CLI.

Public names are imported lazily (``import msa.bridge`` loads no kernels).
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_LAZY = {
    "sparse_fmha_plan": "msa.bridge.bridge",
    "sparse_fmha": "msa.bridge.bridge",
    "SparseFmhaPlan": "msa.bridge.bridge",
    "page_table_from_kv_indices": "msa.bridge.bridge",
    "QouterSchedule": "msa.bridge.bridge",
}
_SUBMODULES = ("bridge", "compat", "cli", "demo")

__all__ = sorted(_LAZY) + list(_SUBMODULES)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    if name in _SUBMODULES:
        return importlib.import_module(f"msa.bridge.{name}")
    raise AttributeError(f"module 'msa.bridge' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
