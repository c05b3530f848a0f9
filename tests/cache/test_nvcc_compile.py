"""One real compile: a small CUDA C++ file -> sm_90a cubin with nvcc, through the store (no GPU needed)."""

from __future__ import annotations

import os
import struct
import subprocess
from pathlib import Path

import pytest
from msa.cache import Store, get_store
from msa.cache.toolchain import probe_nvcc, sha256_text

NVCC = "/usr/local/cuda/bin/nvcc"
SOURCE = """
extern "C" __global__ void scale_add(float* __restrict__ y, const float* __restrict__ x, float a, int n) {
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) y[i] = a * x[i] + y[i];
}
"""
EM_CUDA = 190


@pytest.mark.compile
@pytest.mark.skipif(not os.path.exists(NVCC), reason=f"{NVCC} not installed")
def test_nvcc_cubin_for_sm90a_through_the_store():
    store = get_store()
    flags = ["-gencode=arch=compute_90a,code=sm_90a", "-cubin", "-O3"]
    key = store.key(
        stage="object",
        name="scale_add[sm_90a]",
        ingredients={
            "sources": {"scale_add.cu": sha256_text(SOURCE)},
            "compiler": store.toolchain("nvcc", probe=lambda: probe_nvcc(NVCC)),
            "flags": flags,
            "arch": "sm_90a",
        },
    )

    def build(tmp: Path):
        src = tmp / "scale_add.cu"
        src.write_text(SOURCE)
        env = dict(os.environ, CUDA_HOME="/usr/local/cuda")
        subprocess.run([NVCC, *flags, "-o", str(tmp / "scale_add.cubin"), str(src)], check=True, env=env,
                       capture_output=True, text=True, timeout=300)
        return {"main": "scale_add.cubin"}

    entry = store.get_or_build(key, build, warmup_hint="msa-cache warmup --preset smoke --arch sm_90a")
    cubin = entry.file("scale_add.cubin").read_bytes()
    assert cubin[:4] == b"\x7fELF"
    assert struct.unpack_from("<H", cubin, 18)[0] == EM_CUDA
    assert (struct.unpack_from("<I", cubin, 48)[0] >> 8) & 0xFF == 90, "cubin is not for SM 90"
    assert b"scale_add" in cubin
    assert entry.meta["compile_seconds"] > 0.05
    assert entry.meta["key"]["ingredients"]["compiler"]["tool"] == "nvcc"
    # another process finds it without compiling
    fresh = Store.from_env()
    assert fresh.get_or_build(key, lambda d: pytest.fail("recompiled")).path == entry.path
    assert fresh.counters["builds"] == 0
