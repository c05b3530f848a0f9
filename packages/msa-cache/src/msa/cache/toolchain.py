"""Toolchain identities for key ingredients, and helpers to hash sources.

An identity is a small dict that changes whenever the tool's output can change (version + build string; never
an install path, so two hosts with the same nvcc agree). A GPU node without a compiler still needs the same
identity to compute the key a build host used: :meth:`msa.cache.Store.toolchain` falls back to identities
recorded by the tiers (bundles carry them), see there.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
from functools import lru_cache
from importlib import metadata
from pathlib import Path

__all__ = ["find_nvcc", "probe_nvcc", "probe_cutlass_dsl", "dist_version", "sha256_text", "hash_files"]


def find_nvcc() -> str | None:
    """``$CUDA_HOME/bin/nvcc``, then ``/usr/local/cuda/bin/nvcc``, then ``nvcc`` on PATH."""
    candidates = []
    for env in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(env):
            candidates.append(Path(os.environ[env]) / "bin" / "nvcc")
    candidates.append(Path("/usr/local/cuda/bin/nvcc"))
    for c in candidates:
        if c.is_file() and os.access(c, os.X_OK):
            return str(c)
    return shutil.which("nvcc")


@lru_cache(maxsize=16)
def _nvcc_version_output(path: str, mtime_ns: int, size: int) -> str:
    return subprocess.run([path, "--version"], capture_output=True, text=True, timeout=60, check=True).stdout


def probe_nvcc(nvcc: str | None = None) -> dict | None:
    """``{"tool": "nvcc", "version": "13.0.88", "build": "cuda_13.0.r13.0/compiler.36424714_0"}`` or None."""
    path = nvcc or find_nvcc()
    if not path:
        return None
    try:
        st = os.stat(path)
        out = _nvcc_version_output(os.path.realpath(path), st.st_mtime_ns, st.st_size)
    except (OSError, subprocess.SubprocessError):
        return None
    version = re.search(r"release [\d.]+, V([\d.]+)", out)
    build = re.search(r"^Build (\S+)", out, re.MULTILINE)
    if not version:
        return None
    return {"tool": "nvcc", "version": version.group(1), "build": build.group(1) if build else None}


def dist_version(name: str) -> str | None:
    """Installed version of a distribution (``apache-tvm-ffi``, ``msa-core``, ...) or None."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def probe_cutlass_dsl() -> dict | None:
    """Versions of every installed ``nvidia-cutlass-dsl*`` distribution (the DSL and its libs) or None."""
    dists = {}
    for dist in metadata.distributions():
        name = (dist.metadata.get("Name") or "").lower().replace("_", "-")
        if name.startswith("nvidia-cutlass-dsl"):
            dists[name] = dist.version
    if "nvidia-cutlass-dsl" not in dists:
        return None
    return {"tool": "cutlass-dsl", "dists": dict(sorted(dists.items()))}


def sha256_text(text: str | bytes) -> str:
    data = text.encode("utf-8") if isinstance(text, str) else text
    return hashlib.sha256(data).hexdigest()


def hash_files(paths, root: Path | None = None) -> dict[str, str]:
    """{name: sha256} for source files (names relative to ``root`` when given) — a key ingredient."""
    out = {}
    for p in paths:
        p = Path(p)
        name = p.relative_to(root).as_posix() if root is not None else p.name
        out[name] = hashlib.sha256(p.read_bytes()).hexdigest()
    return dict(sorted(out.items()))
