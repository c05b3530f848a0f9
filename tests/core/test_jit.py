"""msa-core JIT stack: template -> nvcc -> ninja -> tvm-ffi module, staged through msa-cache."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from msa.core.jit import JitSpec, cutlass_include_dirs, cutlass_pin, cutlass_version
from msa.core.jit.spec import BuildError

HAVE_NVCC = Path(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc").exists() or shutil.which("nvcc")


@pytest.fixture()
def store_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("MSA_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("MSA_CACHE_PATH", raising=False)
    from msa.cache import get_store

    get_store(refresh=True)
    yield tmp_path / "cache"
    monkeypatch.undo()  # restore the environment BEFORE rebuilding the process-wide store (else it keeps tmp_path)
    get_store(refresh=True)


def _spec(arch="sm_90a", addend=1.5):
    return JitSpec(family="selftest", sources=["selftest.cu.jinja"], params={"addend": addend}, arch=arch)


def test_cutlass_headers_match_pin():
    dirs = cutlass_include_dirs()
    assert Path(dirs[0], "cute", "tensor.hpp").exists()
    assert cutlass_version() == cutlass_pin()["version"]


def test_cutlass_pin_agrees_with_msa_core_dependency():
    text = Path(__file__).resolve().parents[2].joinpath("packages/msa-core/pyproject.toml").read_text()
    assert f'"{cutlass_pin()["wheel"]}"' in text, "msa-core's nvidia-cutlass pin must equal cutlass/cutlass.toml"


def test_keys_change_with_every_ingredient(store_dir):
    base = [k.digest for k in _spec().keys()]
    other_param = [k.digest for k in _spec(addend=2.5).keys()]
    other_arch = [k.digest for k in _spec(arch="sm_100a").keys()]
    assert base[0] != other_param[0] and base[2] != other_param[2]
    assert base[0] == other_arch[0], "rendered sources do not depend on the arch"
    assert base[1] != other_arch[1] and base[2] != other_arch[2]
    flags = JitSpec(family="selftest", sources=["selftest.cu.jinja"], params={"addend": 1.5},
                    extra_cuda_cflags=("-DMSA_X=1",)).keys()
    assert flags[1].digest != base[1] and flags[0].digest == base[0]


def test_unknown_source_is_a_clear_error():
    with pytest.raises(BuildError, match="sources: 'nope.cu' not found"):
        JitSpec(family="selftest", sources=["nope.cu"])


def test_bad_arch_is_a_clear_error():
    with pytest.raises(ValueError, match="arch: expected one of"):
        _spec(arch="sm_75")


@pytest.mark.compile
@pytest.mark.skipif(not HAVE_NVCC, reason="nvcc not found")
def test_build_sm90a_and_sm100a_cubins(store_dir):
    cuobjdump = Path(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "cuobjdump")
    for arch in ("sm_90a", "sm_100a"):
        entry = _spec(arch=arch).build()
        so = entry.file("module.so")
        assert so.exists() and so.stat().st_size > 0
        if cuobjdump.exists():
            out = subprocess.run([str(cuobjdump), "--list-elf", str(so)], capture_output=True, text=True).stdout
            assert arch.replace("_", "").rstrip("a") in out.replace("_", ""), out
        # a second build is a cache hit returning the same entry
        assert _spec(arch=arch).build().path == entry.path


@pytest.mark.compile
@pytest.mark.skipif(not HAVE_NVCC, reason="nvcc not found")
def test_module_loads_without_gpu(store_dir):
    mod = _spec(addend=3.0).load()
    assert callable(mod.axpb)


@pytest.mark.gpu
def test_selftest_module_runs_on_gpu(store_dir):
    import torch
    from msa.core.jit import arch_for_device

    spec = _spec(arch=arch_for_device(), addend=0.25)
    mod = spec.load()
    x = torch.randn(10_000, device="cuda")
    y = torch.full_like(x, float("nan"))
    mod.axpb(x, y, 2.0)
    torch.testing.assert_close(y, 2.0 * x + 0.25)


def test_module_for_device_loads_each_spec_once_per_arch_and_args(monkeypatch):
    """The shared load path of the nvcc-built kernel families (kv_dequant, qouter_union, sparse_decode, topk):
    ``spec(arch, *args).load()`` once per (spec, arch, args), the arch from the device (``MSA_CUDA_ARCH`` here)."""
    import torch
    from msa.core.kernels import _device, kv_dequant, sparse_decode

    calls = []

    class Spec:
        def __init__(self, arch, *args):
            self.key = (arch, *args)

        def load(self):
            calls.append(self.key)
            return self.key

    def fake_spec(arch, *args):
        return Spec(arch, *args)

    monkeypatch.setenv("MSA_CUDA_ARCH", "sm_90a")
    dev = torch.device("cpu")
    assert _device.module_for_device(fake_spec, dev) == ("sm_90a",)
    assert _device.module_for_device(fake_spec, dev) == ("sm_90a",)
    assert _device.module_for_device(fake_spec, dev, 3) == ("sm_90a", 3)
    monkeypatch.setenv("MSA_CUDA_ARCH", "sm_100a")
    assert _device.module_for_device(fake_spec, dev, 3) == ("sm_100a", 3)
    assert calls == [("sm_90a",), ("sm_90a", 3), ("sm_100a", 3)]
    # the families' loaders hand their own spec function and arguments to it
    seen = []
    monkeypatch.setattr(kv_dequant, "module_for_device", lambda spec, device, *a: seen.append((spec, a)))
    monkeypatch.setattr(sparse_decode, "module_for_device", lambda spec, device, *a: seen.append((spec, a)))
    kv_dequant.load_module(dev)
    sparse_decode.load_module(dev, 5)
    assert seen == [(kv_dequant.spec, ()), (sparse_decode.spec, (5,))]
