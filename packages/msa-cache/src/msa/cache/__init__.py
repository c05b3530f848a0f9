"""msa-cache: the one layer through which every msa kernel (nvcc or CuTe-DSL) is built, stored and found.

Content-addressed, staged (source -> object -> module), multi-tier (read-only shared tiers, then a local
writable tier), atomically published, lock-safe across processes, integrity-checked, size-capped, with offline
mode (MSA_JIT=0), warmup presets and bundles for compiler-less GPU nodes. No torch import anywhere.

    from msa.cache import get_store
    store = get_store()
    key = store.key(stage="module", name="topk_select[sm_90a,fp32]", ingredients={...})
    entry = store.get_or_build(key, builder, warmup_hint="msa-cache warmup --preset smoke --arch sm_90a")
"""

from __future__ import annotations

import importlib

from msa.cache.entry import Entry, Pin
from msa.cache.errors import (
    BundleError,
    CacheError,
    CacheMissError,
    CacheUnwritableError,
    LockTimeoutError,
    ToolchainUnavailableError,
)
from msa.cache.keys import SCHEMA_VERSION, STAGES, CacheKey, make_key
from msa.cache.loaders import TVM_FFI_MODULE, register_loader
from msa.cache.store import Store, get_store
from msa.cache.variant import Variant

__version__ = "0.1.0"

_LAZY = {
    "export_bundle": "msa.cache.bundle",
    "import_bundle": "msa.cache.bundle",
    "runtime_file": "msa.cache.bundle",
    "run_warmup": "msa.cache.warmup",
    "load_preset": "msa.cache.presets",
    "list_presets": "msa.cache.presets",
    "verify": "msa.cache.maintenance",
    "prune": "msa.cache.maintenance",
    "toolchain": None,
}

__all__ = [
    "BundleError",
    "CacheError",
    "CacheKey",
    "CacheMissError",
    "CacheUnwritableError",
    "Entry",
    "LockTimeoutError",
    "Pin",
    "SCHEMA_VERSION",
    "STAGES",
    "Store",
    "TVM_FFI_MODULE",
    "ToolchainUnavailableError",
    "Variant",
    "get_store",
    "make_key",
    "register_loader",
    *sorted(_LAZY),
]


def __getattr__(name: str):
    if name in _LAZY:
        module = _LAZY[name]
        if module is None:
            return importlib.import_module(f"msa.cache.{name}")
        return getattr(importlib.import_module(module), name)
    raise AttributeError(f"module 'msa.cache' has no attribute {name!r}")
