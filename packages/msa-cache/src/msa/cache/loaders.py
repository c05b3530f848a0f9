"""Loaders turn an entry into a usable object (e.g. a tvm-ffi module). Keyed by the entry's ``kind``.

Sources, in order: :func:`register_loader` calls in this process, the ``msa.cache.loaders`` entry-point group
(name = kind, value = ``module:callable(entry)``; these are what ``msa-cache verify`` can use in its test-load
subprocess), then the built-ins below. Loader modules are imported only when first needed (``tvm_ffi`` imports
torch, which ``import msa.cache`` must not).
"""

from __future__ import annotations

import threading
from typing import Any, Callable

from msa.cache.errors import CacheError

__all__ = ["register_loader", "get_loader", "TVM_FFI_MODULE"]

#: Kind of an entry whose main file is a shared library loadable with ``tvm_ffi.load_module``.
TVM_FFI_MODULE = "tvm_ffi.module"

_REGISTRY: dict[str, Callable[[Any], Any]] = {}
_LOCK = threading.Lock()


def register_loader(kind: str, loader: Callable[[Any], Any], *, replace: bool = True) -> None:
    """Register ``loader(entry) -> object`` for entries of ``kind``."""
    if not isinstance(kind, str) or not kind:
        raise ValueError(f"kind must be a non-empty string, got {kind!r}")
    if not callable(loader):
        raise TypeError(f"loader for kind {kind!r} must be callable, got {type(loader).__name__}")
    with _LOCK:
        if not replace and kind in _REGISTRY and _REGISTRY[kind] is not loader:
            raise ValueError(f"a loader for kind {kind!r} is already registered: {_REGISTRY[kind]!r}")
        _REGISTRY[kind] = loader


def main_shared_library(entry) -> str:
    """The .so to load: manifest extra["main"] if the builder set it, else the entry's only .so file."""
    main = entry.meta.get("extra", {}).get("main")
    if main:
        return main
    sos = [n for n in entry.files if n.endswith(".so")]
    if len(sos) != 1:
        raise CacheError(
            f"entry {entry.name!r} ({entry.digest[:12]}) has {len(sos)} .so files {sos}; the builder must return "
            '{"main": "<file>.so"} to say which one to load'
        )
    return sos[0]


def _load_tvm_ffi_module(entry):
    import tvm_ffi  # imports torch when present: only on use

    return tvm_ffi.load_module(str(entry.file(main_shared_library(entry))))


_BUILTIN = {TVM_FFI_MODULE: _load_tvm_ffi_module}


def get_loader(kind: str) -> Callable[[Any], Any] | None:
    with _LOCK:
        if kind in _REGISTRY:
            return _REGISTRY[kind]
    from msa.cache.plugins import entry_points

    for ep in entry_points("msa.cache.loaders"):
        if ep.name == kind:
            try:
                loader = ep.load()
            except Exception as e:
                raise CacheError(f"loader entry point {ep.name} = {ep.value} failed to import: {e!r}") from e
            register_loader(kind, loader)
            return loader
    return _BUILTIN.get(kind)
