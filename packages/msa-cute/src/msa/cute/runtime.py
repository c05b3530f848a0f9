"""msa-cache bundle entry point (``msa.cache.runtime_files``): shared libraries compiled CuTe-DSL artifacts need.

CuTe-DSL objects link against ``libcute_dsl_runtime.so`` from the installed ``nvidia-cutlass-dsl`` (cu13 build),
so a portable cache bundle ships it. Located without importing ``cutlass`` (no DSL start-up cost).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

__all__ = ["runtime_files", "cute_dsl_runtime_library"]

_LIB = "libcute_dsl_runtime.so"


def cute_dsl_runtime_library() -> Path | None:
    """Path of the cu13 ``libcute_dsl_runtime.so`` of the installed nvidia-cutlass-dsl, or None."""
    try:
        spec = importlib.util.find_spec("nvidia_cutlass_dsl")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for root in spec.submodule_search_locations:
        lib = Path(root) / "cu13" / "lib" / _LIB
        if lib.is_file():
            return lib
    return None


def runtime_files(archs: list[str] | None = None) -> list[Path]:
    """Files a bundle for ``archs`` must carry (the runtime library is arch independent)."""
    lib = cute_dsl_runtime_library()
    return [lib] if lib is not None else []
