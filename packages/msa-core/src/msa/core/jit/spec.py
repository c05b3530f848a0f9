"""JitSpec: one kernel module variant, built in three cached stages through msa-cache.

    rendered sources  --(nvcc -c, per arch)-->  object  --(nvcc -shared + tvm-ffi)-->  module (.so)

Each stage is its own msa-cache entry, keyed by everything that changes its bytes, so a warmup can stop at
objects, a node can link later, and nothing stale is ever returned. Loading goes through ``tvm_ffi.load_module``.
"""

from __future__ import annotations

import functools
import hashlib
import json
import subprocess
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from msa.cache import TVM_FFI_MODULE
from msa.core.jit import toolchain
from msa.core.jit.cutlass import cutlass_include_dirs, cutlass_pin

__all__ = ["JitSpec", "CSRC_DIR", "BuildError"]

CSRC_DIR = Path(__file__).resolve().parent.parent / "csrc"
MSA_CORE_VERSION = "0.1.0"
WARMUP_HINT = "msa-cache warmup --preset smoke --arch {arch}"

# Flags that change code generation; part of the object key. -std=c++17 is what CUTLASS 4.x needs.
BASE_CUDA_FLAGS = (
    "-O3",
    "-std=c++17",
    "--expt-relaxed-constexpr",
    "--expt-extended-lambda",
    "-Xcompiler=-fPIC",
    "-DNDEBUG",
    "-lineinfo",
)
CUTLASS_FLAGS = ("-DCUTE_SM90_EXTENDED_MMA_SHAPES_ENABLED", "-DCUTLASS_ENABLE_GDC_FOR_SM90")
LINK_FLAGS = ("-shared", "--cudart=static")

# Files whose bytes reach the compiler; notes and docs next to the sources do not change the binary.
_SOURCE_SUFFIXES = {".cu", ".cuh", ".h", ".hpp", ".inc", ".jinja", ".cc", ".cpp"}
_LOADED: dict[str, Any] = {}
_LOAD_LOCK = threading.Lock()


class BuildError(RuntimeError):
    pass


@functools.cache
def _dir_digest(family: str) -> str:
    """sha256 over every file of csrc/<family> and csrc/common (names + bytes): the source ingredient."""
    h = hashlib.sha256()
    for sub in (family, "common"):
        root = CSRC_DIR / sub
        if not root.is_dir():
            continue
        for p in sorted(root.rglob("*")):
            if p.is_file() and p.suffix in _SOURCE_SUFFIXES:
                h.update(str(p.relative_to(CSRC_DIR)).encode())
                h.update(b"\0")
                h.update(p.read_bytes())
    return h.hexdigest()


def _render(template_path: Path, params: Mapping[str, Any]) -> str:
    import jinja2

    env = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    return env.from_string(template_path.read_text()).render(**params)


def _params_tag(params: Mapping[str, Any]) -> str:
    return ",".join(f"{k}={params[k]}" for k in sorted(params))


@dataclass(frozen=True)
class JitSpec:
    """A kernel module variant.

    family:   directory under ``msa/core/csrc`` holding the sources (``*.jinja`` are rendered with ``params``)
    sources:  file names in that directory compiled as translation units (``x.cu.jinja`` renders to ``x.cu``)
    params:   template parameters (JSON-able); part of every key
    arch:     ``sm_90a`` / ``sm_100a`` / ``sm_103a``
    """

    family: str
    sources: tuple[str, ...]
    params: Mapping[str, Any] = field(default_factory=dict)
    arch: str = "sm_90a"
    use_cutlass: bool = False
    extra_cuda_cflags: tuple[str, ...] = ()

    def __post_init__(self):
        object.__setattr__(self, "sources", tuple(self.sources))
        object.__setattr__(self, "extra_cuda_cflags", tuple(self.extra_cuda_cflags))
        object.__setattr__(self, "arch", toolchain.normalize_arch(self.arch))
        for s in self.sources:
            if not (CSRC_DIR / self.family / s).is_file():
                raise BuildError(f"sources: {s!r} not found in {CSRC_DIR / self.family}")

    # ---- names and keys -------------------------------------------------------------------------------------
    @property
    def name(self) -> str:
        tag = _params_tag(self.params)
        return f"{self.family}[{self.arch}{',' + tag if tag else ''}]"

    def _source_ingredients(self) -> dict:
        return {
            "msa_core": MSA_CORE_VERSION,
            "family": self.family,
            "sources": list(self.sources),
            "params": json.loads(json.dumps(dict(self.params), sort_keys=True, default=str)),
            "csrc_sha256": _dir_digest(self.family),
        }

    def _object_ingredients(self, source_digest: str, store) -> dict:
        from msa.cache.toolchain import probe_nvcc

        ing = {
            "source": source_digest,
            # the store probes nvcc here, or (MSA_JIT=0 / no compiler) uses the identity a bundle recorded,
            # so a compiler-less node computes the same key as the host that built its bundle
            "nvcc": store.toolchain("nvcc", probe_nvcc),
            "arch": self.arch,
            "flags": list(self._cuda_flags(include_paths=False)),
            "tvm_ffi": toolchain.tvm_ffi_version(),  # headers compiled in
        }
        if self.use_cutlass:
            # The pinned version, not the headers': a node with no headers (bundle only) must compute the same
            # key. Builds verify that the headers found match the pin (cutlass_include_dirs), so they agree.
            ing["cutlass"] = cutlass_pin()["version"]
        return ing

    def _cuda_flags(self, include_paths: bool = True) -> list[str]:
        flags = list(BASE_CUDA_FLAGS) + toolchain.gencode_flags(self.arch)
        if self.use_cutlass:
            flags += CUTLASS_FLAGS
        flags += list(self.extra_cuda_cflags)
        if include_paths:
            inc, _ = toolchain.tvm_ffi_paths()
            dirs = [str(CSRC_DIR), str(CSRC_DIR / self.family), inc]
            if self.use_cutlass:
                dirs += list(cutlass_include_dirs())
            flags += [f"-I{d}" for d in dirs]
        return flags

    def keys(self, store=None):
        """(source, object, module) cache keys; cheap after the first call in a process."""
        from msa.cache import get_store

        store = store or get_store()
        tag = _params_tag(self.params)
        src_name = f"{self.family}[{tag}]" if tag else self.family  # sources are arch-independent: shared
        src = store.key(stage="source", name=src_name, ingredients=self._source_ingredients())
        obj = store.key(stage="object", name=self.name, ingredients=self._object_ingredients(src.digest, store))
        mod = store.key(
            stage="module",
            name=self.name,
            kind=TVM_FFI_MODULE,  # lets `msa-cache verify` test-load it and entry.load() work
            ingredients={
                "object": obj.digest,
                "arch": self.arch,
                "link": list(LINK_FLAGS),
                "tvm_ffi": toolchain.tvm_ffi_version(),
            },
        )
        return src, obj, mod

    # ---- stages -----------------------------------------------------------------------------------------------
    def _build_sources(self, out: Path) -> None:
        for s in self.sources:
            p = CSRC_DIR / self.family / s
            if s.endswith(".jinja"):
                (out / s[: -len(".jinja")]).write_text(_render(p, self.params))
            else:
                (out / s).write_bytes(p.read_bytes())

    def _build_object(self, src_entry, out: Path) -> None:
        tus = [src_entry.path / (s[: -len(".jinja")] if s.endswith(".jinja") else s) for s in self.sources]
        flags = " ".join(self._cuda_flags())
        lines = [
            "ninja_required_version = 1.3",
            f"nvcc = {toolchain.nvcc_path()}",
            f"cuda_flags = {flags}",
            "rule nvcc_compile",
            "  command = $nvcc $cuda_flags -MD -MF $out.d -c $in -o $out",
            "  depfile = $out.d",
            "  deps = gcc",
            "  description = nvcc $out",
        ]
        for i, tu in enumerate(tus):
            lines.append(f"build tu{i}.o: nvcc_compile {tu}")
        _run_ninja(out, lines, self.name)
        for p in out.iterdir():  # keep only the objects
            if not p.name.endswith(".o"):
                p.unlink() if p.is_file() else None

    def _build_module(self, obj_entry, out: Path) -> None:
        _, libdir = toolchain.tvm_ffi_paths()
        objs = " ".join(str(obj_entry.path / f"tu{i}.o") for i in range(len(self.sources)))
        lines = [
            "ninja_required_version = 1.3",
            f"nvcc = {toolchain.nvcc_path()}",
            "rule nvcc_link",
            f"  command = $nvcc {' '.join(LINK_FLAGS)} {' '.join(toolchain.gencode_flags(self.arch))} $in -o $out "
            f"-L{libdir} -ltvm_ffi",
            "  description = link $out",
            f"build module.so: nvcc_link {objs}",
        ]
        _run_ninja(out, lines, self.name)
        for p in out.iterdir():
            if p.name != "module.so" and p.is_file():
                p.unlink()
        return {"main": "module.so"}

    def build(self, store=None):
        """Compile (no load, no GPU needed) and return the module's cache entry."""
        from msa.cache import get_store

        store = store or get_store()
        hint = WARMUP_HINT.format(arch=self.arch)
        src_key, obj_key, mod_key = self.keys(store)
        hit = store.lookup(mod_key)
        if hit is not None:
            return hit
        src = store.get_or_build(src_key, self._build_sources, warmup_hint=hint)
        obj = store.get_or_build(obj_key, lambda out: self._build_object(src, out), warmup_hint=hint)
        return store.get_or_build(mod_key, lambda out: self._build_module(obj, out), warmup_hint=hint)

    def object_entry(self, store=None):
        """Compile to objects only (what a warmup without a linker-capable node needs)."""
        from msa.cache import get_store

        store = store or get_store()
        hint = WARMUP_HINT.format(arch=self.arch)
        src_key, obj_key, _ = self.keys(store)
        src = store.get_or_build(src_key, self._build_sources, warmup_hint=hint)
        return store.get_or_build(obj_key, lambda out: self._build_object(src, out), warmup_hint=hint)

    def load(self):
        """Build if needed (or fail in offline mode), then load the module with tvm-ffi; memoised per process."""
        mod = _LOADED.get(self.name)
        if mod is not None:
            return mod
        with _LOAD_LOCK:
            mod = _LOADED.get(self.name)
            if mod is None:
                import tvm_ffi

                entry = self.build()
                entry.pin_for_process()  # LRU eviction never removes a loaded module
                mod = tvm_ffi.load_module(str(entry.file("module.so")))
                _LOADED[self.name] = mod
        return mod


def _run_ninja(workdir: Path, lines: list[str], what: str) -> None:
    (workdir / "build.ninja").write_text("\n".join(lines) + "\n")
    proc = subprocess.run([toolchain.ninja_path(), "-C", str(workdir)], capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stdout + proc.stderr)[-6000:]
        raise BuildError(f"building {what} failed:\n{tail}")
