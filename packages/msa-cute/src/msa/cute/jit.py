"""CuTe-DSL kernels built GPU-less through msa-cache, loaded on GPU nodes that have no DSL installed.

    kernel factory (Python, msa/cute/kernels)  --cute.compile + export_to_c-->  object (.o, one arch's cubin)
                                               --cc -shared-->                  module (.so, tvm-ffi ABI)

A :class:`CuteSpec` names a kernel factory (``"msa.cute.kernels.dsl.elementwise:axpby"``), its compile-time
parameters and the target arch. The factory returns a :class:`CuteCompile` (a ``@cute.jit`` function and the fake
arguments to trace it with); :meth:`CuteSpec.build` compiles it with ``--enable-tvm-ffi --gpu-arch <arch>``,
exports the object, checks that the object's cubin is for that arch, and links a shared library. Each stage is
an msa-cache entry.

Keys use only what a compiler-less GPU node can compute: the bytes of the DSL sources (``msa/cute/kernels/dsl``),
the parameters, the arch, the cutlass-dsl identity via ``store.toolchain`` (a node without the DSL reads the
identity its imported bundle recorded), the tvm-ffi version and msa-cute's version.

:meth:`CuteSpec.load` on a node without cutlass-dsl preloads ``libcute_dsl_runtime.so`` (``RTLD_GLOBAL``) from an
imported bundle or the installed wheel and opens the module with ``tvm_ffi.load_module``; nothing imports
``cutlass`` on that path.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import importlib
import json
import os
import shutil
import struct
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

# One arch vocabulary for both build routes (nvcc and CuTe-DSL).
from msa.core.jit.toolchain import SUPPORTED_ARCHS, arch_for_device, normalize_arch

__all__ = [
    "CuteSpec",
    "CuteCompile",
    "CuteBuildError",
    "SUPPORTED_ARCHS",
    "KERNELS_DIR",
    "arch_for_device",
    "normalize_arch",
    "cubin_archs",
    "kernel_sources_digest",
    "preload_runtime",
    "runtime_library",
]

KERNELS_DIR = Path(__file__).resolve().parent / "kernels" / "dsl"
FACTORY_PREFIX = "msa.cute.kernels.dsl."
# Every option that reaches cute.compile besides the arch; part of the object key.
BASE_COMPILE_OPTIONS = ("--enable-tvm-ffi",)
# Link of the exported object: the tvm-ffi entry point needs one symbol of the DSL runtime
# (CuteDSLRT_TVMFFISetRaisedCudaError), so the module depends on libcute_dsl_runtime.so and libtvm_ffi.so.
# The runpath finds the runtime next to an imported bundle's entries (<tier>/runtime); load() preloads it anyway.
LINK_FLAGS = ("-shared", "-Wl,--no-undefined", "-Wl,-rpath,$ORIGIN:$ORIGIN/../../../runtime")
RUNTIME_LIB = "libcute_dsl_runtime.so"
RUNTIME_ENV = "MSA_CUTE_DSL_RUNTIME"  # explicit path of the runtime library (e.g. a bundle made with runtime=False)
WARMUP_HINT = "msa-cache warmup --preset <a preset with these shapes: smoke, minimax-m3, ...> --arch {arch} --package msa-cute"
TOOLCHAIN = "cutlass_dsl"
OBJECT_FILE = "kernel.o"
MODULE_FILE = "kernel.so"

_COMPILE_LOCK = threading.RLock()  # the DSL's arch setting is process-global
_LOAD_LOCK = threading.Lock()
_LOADED: dict[str, Any] = {}
_PRELOADED: dict[str, ctypes.CDLL] = {}


class CuteBuildError(RuntimeError):
    """A CuTe-DSL kernel could not be compiled, exported, checked or linked."""


@dataclass
class CuteCompile:
    """What a kernel factory returns: ``fn`` (a ``@cute.jit`` function) traced with ``args`` (fake tensors,
    ``cute.sym_int`` sizes, a fake env stream, Python constants). ``options`` are extra ``cute.compile`` options."""

    fn: Callable
    args: tuple
    options: str = ""


@functools.lru_cache(maxsize=4)
def _digest_dir(root: str, mtimes: tuple) -> str:
    h = hashlib.sha256()
    base = Path(root)
    for rel, _ in mtimes:
        h.update(rel.encode())
        h.update(b"\0")
        h.update((base / rel).read_bytes())
        h.update(b"\0")
    return h.hexdigest()


def kernel_sources_digest(root: Path = KERNELS_DIR) -> str:
    """sha256 over the names and bytes of every ``*.py`` under ``msa/cute/kernels/dsl`` (the source ingredient).

    Every kernel's key covers all kernel files: shared helpers change code generation too, and a node must
    compute the same digest from the same installed files.
    """
    files = sorted(p for p in root.rglob("*.py") if "__pycache__" not in p.parts)
    stamp = tuple((p.relative_to(root).as_posix(), os.stat(p).st_mtime_ns) for p in files)
    return _digest_dir(str(root), stamp)


def _params_tag(params: Mapping[str, Any]) -> str:
    return ",".join(f"{k}={params[k]}" for k in sorted(params))


def _msa_cute_version() -> str:
    from msa.cute import __version__

    return __version__


def _tvm_ffi_version() -> str:
    from msa.cache.toolchain import dist_version

    v = dist_version("apache-tvm-ffi")
    if v is None:
        raise CuteBuildError("apache-tvm-ffi is not installed: it is needed to build and to load msa-cute kernels")
    return v


def _cutlass_identity(store) -> dict:
    from msa.cache.toolchain import probe_cutlass_dsl

    return store.toolchain(TOOLCHAIN, probe_cutlass_dsl)


# ---- cubin check ------------------------------------------------------------------------------------------------
_EM_CUDA = 190


def cubin_archs(path: Path) -> list[int]:
    """SM numbers (90, 100, ...) of the CUDA ELF images embedded in an object or shared library.

    CuTe-DSL embeds the cubin uncompressed; its ELF header's ``e_flags`` carries the SM (bits 8..15 for ELF ABI
    version >= 8, bits 0..7 before).
    """
    data = Path(path).read_bytes()
    out = []
    i = data.find(b"\x7fELF", 1)
    while i >= 0:
        if i + 52 <= len(data) and data[i + 4] == 2:  # 64-bit ELF
            (machine,) = struct.unpack_from("<H", data, i + 18)
            if machine == _EM_CUDA:
                (flags,) = struct.unpack_from("<I", data, i + 48)
                abi_version = data[i + 8]
                out.append((flags >> 8) & 0xFF if abi_version >= 8 else flags & 0xFF)
        i = data.find(b"\x7fELF", i + 4)
    return out


def _check_cubin(path: Path, arch: str, what: str) -> None:
    want = int(arch[3:-1])
    found = cubin_archs(path)
    if not found:
        raise CuteBuildError(f"{what}: the exported object {path.name} holds no CUDA cubin (expected one for {arch})")
    if any(sm != want for sm in found):
        raise CuteBuildError(
            f"{what}: the exported object holds cubins for sm_{found} but the target is {arch}; the DSL's arch "
            "setting was not applied (CUTE_DSL_ARCH latched before msa set it?)"
        )


# ---- DSL arch pinning -------------------------------------------------------------------------------------------
class _PinnedArch:
    """Point the DSL at ``arch`` for one compile and restore the previous setting afterwards.

    cutlass-dsl snapshots ``CUTE_DSL_ARCH`` when its env manager is first built, so setting the variable is not
    enough once ``cutlass`` is imported: the singleton's ``envar.arch`` is re-latched too (the DSL's supported
    override point), and ``--gpu-arch`` is passed to every compile.
    """

    def __init__(self, arch: str):
        self.arch = arch

    def __enter__(self):
        self._env = os.environ.get("CUTE_DSL_ARCH")
        os.environ["CUTE_DSL_ARCH"] = self.arch
        from cutlass.cutlass_dsl import CuTeDSL

        self._envar = CuTeDSL._get_dsl().envar
        self._envar.arch = self.arch
        return self

    def __exit__(self, *exc):
        if self._env is None:
            os.environ.pop("CUTE_DSL_ARCH", None)
        else:
            os.environ["CUTE_DSL_ARCH"] = self._env
        del self._envar.arch  # re-reads CUTE_DSL_ARCH (or detects on next use)
        return False


def _import_dsl(arch: str):
    """Import the DSL with ``arch`` latched from the start (first import in the process)."""
    if "cutlass" not in sys.modules:
        os.environ.setdefault("CUTE_DSL_ARCH", arch)
    try:
        import cutlass.cute as cute
    except ImportError as e:
        raise CuteBuildError(
            "nvidia-cutlass-dsl is not installed, so msa-cute kernels cannot be compiled here. On a GPU node, import "
            "a bundle built on a build host (`msa-cache warmup ... && msa-cache bundle` there, `msa-cache import` "
            f"here) and set MSA_JIT=0; or pip install 'nvidia-cutlass-dsl[cu13]'. ({e})"
        ) from e
    return cute


# ---- runtime library --------------------------------------------------------------------------------------------
def runtime_library(store=None) -> Path:
    """The ``libcute_dsl_runtime.so`` msa-cute modules load against.

    ``MSA_CUTE_DSL_RUNTIME`` (a file path) wins. Otherwise the same precedence as the toolchain identity of the
    keys: with JIT on, the installed wheel's (it built the local entries), else an imported bundle's; with
    ``MSA_JIT=0`` the bundle's first.
    """
    from msa.cache import get_store, runtime_file

    from .runtime import cute_dsl_runtime_library

    explicit = os.environ.get(RUNTIME_ENV)
    if explicit:
        if not Path(explicit).is_file():
            raise CuteBuildError(f"{RUNTIME_ENV}={explicit!r} is not a file (expected a path to {RUNTIME_LIB})")
        return Path(explicit)
    store = store or get_store()
    wheel = cute_dsl_runtime_library()
    bundle = runtime_file(RUNTIME_LIB, store=store)
    order = (wheel, bundle) if store.jit else (bundle, wheel)
    for p in order:
        if p is not None:
            return Path(p)
    raise CuteBuildError(
        f"{RUNTIME_LIB} not found: install nvidia-cutlass-dsl[cu13] or import an msa-cache bundle that carries it "
        "(`msa-cache bundle` ships it by default)"
    )


def preload_runtime(store=None) -> Path:
    """dlopen the DSL runtime with ``RTLD_GLOBAL`` (once per process) so modules resolve their one runtime symbol."""
    path = runtime_library(store)
    key = str(path)
    with _LOAD_LOCK:
        if key not in _PRELOADED:
            _PRELOADED[key] = ctypes.CDLL(key, mode=ctypes.RTLD_GLOBAL)
    return path


def _tvm_ffi_library() -> Path:
    import tvm_ffi.libinfo

    return Path(tvm_ffi.libinfo.find_libtvm_ffi())


def _linker() -> str:
    for cand in (os.environ.get("CC"), "cc", "gcc", "g++"):
        if cand and shutil.which(cand):
            return shutil.which(cand)
    raise CuteBuildError("no C compiler/linker found (set CC): needed to link msa-cute kernel modules")


# ---- the spec ---------------------------------------------------------------------------------------------------
def _resolve(target: str) -> Callable:
    module, sep, attr = target.partition(":")
    if not sep or not module or not attr:
        raise ValueError(f"factory: expected 'package.module:function', got {target!r}")
    fn = importlib.import_module(module)
    for part in attr.split("."):
        fn = getattr(fn, part)
    if not callable(fn):
        raise TypeError(f"factory: {target!r} is not callable")
    return fn


@dataclass(frozen=True)
class CuteSpec:
    """One compiled CuTe-DSL kernel variant.

    factory:  ``"msa.cute.kernels.dsl.<module>:<function>"``; ``function(**params) -> CuteCompile``, called with
              the DSL pointed at ``arch``. It must live in ``msa/cute/kernels/dsl`` (its bytes are the source key). A
              ``function.archs`` tuple, if set, lists the only archs it can target (others fail clearly).
    params:   compile-time parameters (JSON-able); part of every key.
    arch:     ``sm_90a`` / ``sm_100a`` / ``sm_103a``.
    function_name: the exported tvm-ffi symbol; defaults to the factory's function name.
    """

    factory: str
    params: Mapping[str, Any] = field(default_factory=dict)
    arch: str = "sm_90a"
    function_name: str | None = None

    def __post_init__(self):
        object.__setattr__(self, "arch", normalize_arch(self.arch))
        module, sep, attr = self.factory.partition(":")
        if not sep or not module.startswith(FACTORY_PREFIX) or not attr:
            raise ValueError(f"factory: expected '{FACTORY_PREFIX}<module>:<function>', got {self.factory!r}")
        if not isinstance(self.params, Mapping):
            raise TypeError(f"params: expected a mapping, got {type(self.params).__name__}")
        params = json.loads(json.dumps(dict(self.params), sort_keys=True))  # JSON-able, canonical, detached copy
        object.__setattr__(self, "params", params)
        name = self.function_name or attr.rsplit(".", 1)[-1]
        if not name.isidentifier():
            raise ValueError(f"function_name: expected an identifier, got {name!r}")
        object.__setattr__(self, "function_name", name)

    @property
    def kernel(self) -> str:
        """``<module tail>.<function>``, e.g. ``elementwise.axpby``."""
        module, _, attr = self.factory.partition(":")
        return f"{module[len(FACTORY_PREFIX):]}.{attr}"

    @property
    def name(self) -> str:
        tag = _params_tag(self.params)
        return f"cute.{self.kernel}[{self.arch}{',' + tag if tag else ''}]"

    @property
    def warmup_hint(self) -> str:
        return WARMUP_HINT.format(arch=self.arch)

    def keys(self, store=None):
        """(object, module) cache keys. Needs no DSL: a GPU node computes them from recorded identities."""
        from msa.cache import TVM_FFI_MODULE, get_store

        store = store or get_store()
        tvm_ffi = _tvm_ffi_version()
        obj = store.key(
            stage="object",
            name=self.name,
            kind="cute_dsl.object",
            ingredients={
                "factory": self.factory,
                "function_name": self.function_name,
                "params": dict(self.params),
                "arch": self.arch,
                "kernel_sources": kernel_sources_digest(),
                "options": list(BASE_COMPILE_OPTIONS),
                "cutlass_dsl": _cutlass_identity(store),
                "tvm_ffi": tvm_ffi,
                "msa_cute": _msa_cute_version(),
            },
        )
        mod = store.key(
            stage="module",
            name=self.name,
            kind=TVM_FFI_MODULE,
            ingredients={"object": obj.digest, "arch": self.arch, "link": list(LINK_FLAGS), "tvm_ffi": tvm_ffi},
        )
        return obj, mod

    # ---- stages -------------------------------------------------------------------------------------------------
    def compile_object(self, out: Path) -> dict:
        """Trace, compile and export into ``out/kernel.o`` (no GPU needed)."""
        cute = _import_dsl(self.arch)
        factory = _resolve(self.factory)
        archs = getattr(factory, "archs", None)
        if archs is not None and self.arch not in archs:
            raise CuteBuildError(f"{self.name}: {self.factory} targets {', '.join(archs)} only, not {self.arch}")
        with _COMPILE_LOCK, _PinnedArch(self.arch):
            request = factory(**self.params)
            if not isinstance(request, CuteCompile):
                raise CuteBuildError(f"{self.factory} returned {type(request).__name__}, expected msa.cute.jit.CuteCompile")
            options = " ".join([*BASE_COMPILE_OPTIONS, "--gpu-arch", self.arch, request.options]).strip()
            try:
                compiled = cute.compile(request.fn, *request.args, options=options)
                compiled.export_to_c(str(out / OBJECT_FILE), function_name=self.function_name,
                                     export_only_tvm_ffi_symbols=True)
            except CuteBuildError:
                raise
            except Exception as e:
                raise CuteBuildError(f"compiling {self.name} failed: {type(e).__name__}: {e}") from e
        _check_cubin(out / OBJECT_FILE, self.arch, self.name)
        return {"object": OBJECT_FILE, "function": self.function_name}

    def link_module(self, obj_entry, out: Path) -> dict:
        """Link the object with the DSL runtime and tvm-ffi into ``out/kernel.so``."""
        runtime = runtime_library()
        # Also search the build host's runtime directory, so `msa-cache verify` can test-load local entries in a
        # plain subprocess (the path is a search hint, not a key ingredient: it changes no code).
        cmd = [_linker(), *LINK_FLAGS[:2], "-o", str(out / MODULE_FILE), str(obj_entry.file(OBJECT_FILE)),
               str(runtime), str(_tvm_ffi_library()), f"{LINK_FLAGS[2]}:{runtime.parent}"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise CuteBuildError(f"linking {self.name} failed:\n$ {' '.join(cmd)}\n{(proc.stdout + proc.stderr)[-4000:]}")
        _check_cubin(out / MODULE_FILE, self.arch, self.name)
        return {"main": MODULE_FILE, "function": self.function_name}

    def object_entry(self, store=None):
        """Build (or find) the object stage only."""
        from msa.cache import get_store

        store = store or get_store()
        obj_key, _ = self.keys(store)
        return store.get_or_build(obj_key, self.compile_object, warmup_hint=self.warmup_hint)

    def build(self, store=None):
        """Compile + link if needed (no GPU, no load) and return the module's cache entry."""
        from msa.cache import get_store

        store = store or get_store()
        obj_key, mod_key = self.keys(store)
        hit = store.lookup(mod_key)
        if hit is not None:
            return hit
        obj = store.get_or_build(obj_key, self.compile_object, warmup_hint=self.warmup_hint)
        return store.get_or_build(mod_key, lambda out: self.link_module(obj, out), warmup_hint=self.warmup_hint,
                                  depends=[obj])

    def load(self):
        """The exported function (a ``tvm_ffi.Function``), building first if needed; memoised per process.

        Works without cutlass-dsl when the module is in a tier (e.g. an imported bundle with ``MSA_JIT=0``).
        """
        from msa.cache import get_store

        store = get_store()
        cache_id = f"{store.local.root}|{self.name}|{self.factory}"
        fn = _LOADED.get(cache_id)
        if fn is not None:
            return fn
        entry = self.build(store)
        entry.pin_for_process()  # LRU eviction never removes a module this process has loaded
        preload_runtime(store)
        import tvm_ffi

        main = entry.meta.get("extra", {}).get("main", MODULE_FILE)
        module = tvm_ffi.load_module(str(entry.file(main)))
        fn = module[self.function_name]
        with _LOAD_LOCK:
            _LOADED.setdefault(cache_id, fn)
            return _LOADED[cache_id]

    def to_params(self) -> dict:
        """JSON-able constructor arguments (for warmup Variants)."""
        return {"factory": self.factory, "params": dict(self.params), "arch": self.arch,
                "function_name": self.function_name}


def build_variant(until: str = "module", **spec_params) -> str:
    """Warmup worker target: build one spec (to ``until`` = object | module); returns the entry path."""
    spec = CuteSpec(**spec_params)
    entry = spec.object_entry() if until == "object" else spec.build()
    return str(entry.path)
