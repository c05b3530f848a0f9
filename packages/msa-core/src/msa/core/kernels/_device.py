"""Device checks shared by the msa-core CUDA kernels (cheap: no compilation, no module load)."""

from __future__ import annotations

import functools
import os

import torch

# Compute capabilities the nvcc-built kernels compile for (msa.core.jit.toolchain.SUPPORTED_ARCHS).
SUPPORTED_CC = {(9, 0): "sm_90a", (10, 0): "sm_100a", (10, 3): "sm_103a"}


def cuda_kernel_available(device, what: str) -> tuple[bool, str]:
    """A CUDA device of a supported compute capability (or ``MSA_CUDA_ARCH`` set) and tvm-ffi importable.
    ``what`` names the kernel in the reasons ("the top-k kernel", "sparse_decode")."""
    device = torch.device(device)
    if device.type != "cuda":
        return False, f"tensors are on {device}, {what} needs CUDA"
    if not torch.cuda.is_available():
        return False, "torch.cuda is not available"
    cc = torch.cuda.get_device_capability(device)
    if cc not in SUPPORTED_CC and not os.environ.get("MSA_CUDA_ARCH"):
        return False, f"compute capability {cc[0]}.{cc[1]} is not one of {sorted(SUPPORTED_CC)} (set MSA_CUDA_ARCH)"
    try:
        import tvm_ffi  # noqa: F401
    except Exception as e:  # pragma: no cover - install problem
        return False, f"apache-tvm-ffi is not importable: {e}"
    return True, "ok"


@functools.lru_cache(maxsize=32)
def _module_for(spec, arch: str, args: tuple):
    return spec(arch, *args).load()


def module_for_device(spec, device, *args):
    """The JIT module ``spec(arch, *args).load()`` for ``device``'s arch, built (or fetched from msa-cache) once per
    process: the load path every nvcc-built msa-core kernel family shares (``spec`` is the family's spec function)."""
    from msa.core.jit import arch_for_device

    return _module_for(spec, arch_for_device(device), tuple(args))


@functools.cache
def sm_count(index: int) -> int:
    """Streaming multiprocessors of CUDA device ``index`` (cached: plans read it on every call)."""
    return torch.cuda.get_device_properties(index).multi_processor_count
