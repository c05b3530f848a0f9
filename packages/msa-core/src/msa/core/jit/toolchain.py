"""nvcc / tvm-ffi toolchain discovery and target-architecture selection."""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
from pathlib import Path

__all__ = [
    "nvcc_path",
    "nvcc_version",
    "ninja_path",
    "tvm_ffi_paths",
    "tvm_ffi_version",
    "arch_for_device",
    "default_archs",
    "gencode_flags",
    "normalize_arch",
    "SUPPORTED_ARCHS",
    "ToolchainError",
]

SUPPORTED_ARCHS = ("sm_90a", "sm_100a", "sm_103a")


class ToolchainError(RuntimeError):
    pass


@functools.lru_cache(maxsize=1)
def nvcc_path() -> str:
    """CUDA_HOME/bin/nvcc, else /usr/local/cuda/bin/nvcc, else nvcc on PATH.

    The real binary is preferred over PATH because some hosts put a wrapper script first on PATH.
    """
    cands = []
    if os.environ.get("CUDA_HOME"):
        cands.append(Path(os.environ["CUDA_HOME"]) / "bin" / "nvcc")
    cands.append(Path("/usr/local/cuda/bin/nvcc"))
    for c in cands:
        if c.is_file() and os.access(c, os.X_OK):
            return str(c)
    w = shutil.which("nvcc")
    if w:
        return w
    raise ToolchainError("nvcc not found: set CUDA_HOME or install the CUDA toolkit (needed only to build kernels; "
                         "a host with an imported msa-cache bundle needs no compiler)")


@functools.lru_cache(maxsize=1)
def nvcc_version() -> str:
    out = subprocess.run([nvcc_path(), "--version"], capture_output=True, text=True, check=True).stdout
    m = re.search(r"Build (\S+)", out) or re.search(r"release (\S+)", out)
    return m.group(1) if m else out.strip().splitlines()[-1]


@functools.lru_cache(maxsize=1)
def ninja_path() -> str:
    try:
        import ninja  # pip package

        p = Path(ninja.BIN_DIR) / "ninja"
        if p.exists():
            return str(p)
    except Exception:
        pass
    w = shutil.which("ninja")
    if not w:
        raise ToolchainError("ninja not found: pip install ninja")
    return w


@functools.lru_cache(maxsize=1)
def tvm_ffi_paths() -> tuple[str, str]:
    """(include dir, lib dir) of the installed apache-tvm-ffi."""
    import tvm_ffi.libinfo as li

    return li.find_include_path(), str(Path(li.find_libtvm_ffi()).parent)


def tvm_ffi_version() -> str:
    import tvm_ffi

    return tvm_ffi.__version__


def arch_for_device(device=None) -> str:
    """The sm_XXa target for a CUDA device (``MSA_CUDA_ARCH`` overrides)."""
    env = os.environ.get("MSA_CUDA_ARCH")
    if env:
        return normalize_arch(env)
    import torch

    major, minor = torch.cuda.get_device_capability(device)
    return normalize_arch(f"sm_{major}{minor}a")


def default_archs() -> list[str]:
    """Archs to build when no device says: ``MSA_CUDA_ARCH_LIST`` (comma/space separated), default sm_90a."""
    env = os.environ.get("MSA_CUDA_ARCH_LIST", "sm_90a")
    return [normalize_arch(a) for a in re.split(r"[,\s]+", env.strip()) if a]


def normalize_arch(arch: str) -> str:
    """``"9.0a"``, ``"90"``, ``"sm_90"`` ... -> ``"sm_90a"``; anything not in SUPPORTED_ARCHS is a ValueError."""
    if not isinstance(arch, str):
        raise TypeError(f"arch: expected a string like 'sm_90a', got {type(arch).__name__}")
    a = arch.strip().lower().replace(".", "")
    if not a.startswith("sm_"):
        a = "sm_" + a
    if not a.endswith("a"):
        a += "a"
    if a not in SUPPORTED_ARCHS:
        raise ValueError(f"arch: expected one of {list(SUPPORTED_ARCHS)}, got {arch!r}")
    return a


def gencode_flags(arch: str) -> list[str]:
    num = normalize_arch(arch)[3:]  # "90a"
    return [f"-gencode=arch=compute_{num},code=sm_{num}"]
