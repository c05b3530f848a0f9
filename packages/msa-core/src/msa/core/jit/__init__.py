"""msa-core JIT: Jinja templates -> nvcc -> ninja -> tvm-ffi module, every stage cached through msa-cache."""

from msa.core.jit.cutlass import CutlassNotFoundError, cutlass_include_dirs, cutlass_pin, cutlass_version
from msa.core.jit.spec import CSRC_DIR, BuildError, JitSpec
from msa.core.jit.toolchain import (
    SUPPORTED_ARCHS,
    ToolchainError,
    arch_for_device,
    default_archs,
    gencode_flags,
    nvcc_path,
    nvcc_version,
)

__all__ = [
    "JitSpec",
    "BuildError",
    "CSRC_DIR",
    "CutlassNotFoundError",
    "cutlass_include_dirs",
    "cutlass_pin",
    "cutlass_version",
    "SUPPORTED_ARCHS",
    "ToolchainError",
    "arch_for_device",
    "default_archs",
    "gencode_flags",
    "nvcc_path",
    "nvcc_version",
]
