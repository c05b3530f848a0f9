"""msa.cute.jit: CuTe-DSL kernels compiled GPU-less through msa-cache (object -> module), loaded with tvm-ffi.

The compile tests build the elementwise route kernel for sm_90a and sm_100a in one process (the DSL latches its
arch once, so this checks msa's re-latch: the exported cubin's ELF header must name the requested SM), load the
module here without a GPU (a call with CPU tensors must fail on the device check, which proves the exported
function and its signature are live), and in a subprocess that cannot import cutlass, load it from an imported
bundle with MSA_JIT=0: the GPU-node route. The GPU test runs the kernel and compares with torch.
"""

from __future__ import annotations

import importlib.util
import json
import os
import struct
import subprocess
import sys
import textwrap

import pytest
from msa.cute import jit, variants
from msa.cute.jit import CuteSpec, cubin_archs

AXPBY = "msa.cute.kernels.dsl.elementwise:axpby"
# Compiling needs cutlass-dsl; GPU nodes have none (they load bundles), so the compile tests skip there.
needs_dsl = pytest.mark.skipif(importlib.util.find_spec("cutlass") is None,
                               reason="nvidia-cutlass-dsl is not installed (compile tests run on build hosts)")


@pytest.fixture()
def store(tmp_path, monkeypatch):
    monkeypatch.setenv("MSA_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("MSA_CACHE_PATH", raising=False)
    monkeypatch.delenv("MSA_JIT", raising=False)
    from msa.cache import get_store

    s = get_store(refresh=True)
    yield s
    monkeypatch.undo()  # restore the environment BEFORE rebuilding the process-wide store (else it keeps tmp_path)
    get_store(refresh=True)


def _elf_blob(machine: int, flags: int, abi_version: int = 8) -> bytes:
    ident = b"\x7fELF" + bytes([2, 1, 1, 0x41, abi_version]) + bytes(7)
    header = ident + struct.pack("<HHIQQQIHHHHHH", 2, machine, 1, 0, 0, 0, flags, 64, 0, 0, 64, 0, 0)
    return header + bytes(16)


def test_cubin_archs_reads_embedded_cuda_elf_headers(tmp_path):
    host = _elf_blob(62, 0)  # x86-64 host object header, ignored
    f = tmp_path / "x.o"
    f.write_bytes(host + b"pad" + _elf_blob(190, 0x6005A04) + b"pad" + _elf_blob(190, 0x6006402))
    assert cubin_archs(f) == [90, 100]
    f.write_bytes(host + _elf_blob(190, 0x5A, abi_version=7))
    assert cubin_archs(f) == [90]
    f.write_bytes(host)
    assert cubin_archs(f) == []
    with pytest.raises(jit.CuteBuildError, match="holds no CUDA cubin"):
        jit._check_cubin(f, "sm_90a", "k")
    f.write_bytes(host + _elf_blob(190, 0x6006402))
    with pytest.raises(jit.CuteBuildError, match=r"cubins for sm_\[100\] but the target is sm_90a"):
        jit._check_cubin(f, "sm_90a", "k")


def test_spec_arguments_are_checked():
    with pytest.raises(ValueError, match="arch: expected one of"):
        CuteSpec(AXPBY, {}, "sm_75")
    with pytest.raises(ValueError, match="factory: expected 'msa.cute.kernels.dsl.<module>:<function>'"):
        CuteSpec("os.path:join", {}, "sm_90a")
    with pytest.raises(TypeError):
        CuteSpec(AXPBY, {"dtype": object()}, "sm_90a")
    with pytest.raises(ValueError, match="function_name: expected an identifier"):
        CuteSpec(AXPBY, {}, "sm_90a", function_name="a-b")
    s = CuteSpec(AXPBY, {"dtype": "float32"}, "90")
    assert s.arch == "sm_90a" and s.function_name == "axpby"
    assert s.name == "cute.elementwise.axpby[sm_90a,dtype=float32]"
    assert CuteSpec(**s.to_params()) == s


@needs_dsl  # a fresh store on a DSL-less node has no recorded cutlass identity
def test_keys_differ_per_arch_param_and_sources(store, monkeypatch, tmp_path):
    base = CuteSpec(AXPBY, {"dtype": "float32"}, "sm_90a")
    o90, m90 = base.keys(store)
    o100, m100 = CuteSpec(AXPBY, {"dtype": "float32"}, "sm_100a").keys(store)
    obf, mbf = CuteSpec(AXPBY, {"dtype": "bfloat16"}, "sm_90a").keys(store)
    assert len({o90.digest, o100.digest, obf.digest}) == 3 and len({m90.digest, m100.digest, mbf.digest}) == 3
    assert m90.kind == "tvm_ffi.module" and m90.stage == "module" and o90.stage == "object"
    assert m90.ingredients["object"] == o90.digest and o90.arch == "sm_90a"
    ing = o90.ingredients
    assert ing["cutlass_dsl"]["tool"] == "cutlass-dsl" and ing["cutlass_dsl"]["dists"]["nvidia-cutlass-dsl"]
    assert ing["tvm_ffi"] and ing["msa_cute"] and len(ing["kernel_sources"]) == 64
    assert base.keys(store)[0].digest == o90.digest, "keys are deterministic"
    # Any kernel source byte changes every key (helpers shared by kernels change code generation too).
    fake = tmp_path / "kernels"
    fake.mkdir()
    (fake / "a.py").write_text("x = 1\n")
    d1 = jit.kernel_sources_digest(fake)
    (fake / "a.py").write_text("x = 2\n")
    os.utime(fake / "a.py", ns=(1, 1))
    assert jit.kernel_sources_digest(fake) != d1
    monkeypatch.setattr(jit, "kernel_sources_digest", lambda root=None: "0" * 64)
    assert base.keys(store)[0].digest != o90.digest


@needs_dsl  # a fresh store on a DSL-less node has no recorded cutlass identity
def test_keys_need_no_dsl():
    code = textwrap.dedent("""
        import sys
        from msa.cute.jit import CuteSpec
        CuteSpec("msa.cute.kernels.dsl.elementwise:axpby", {"dtype": "float32"}, "sm_90a").keys()
        import msa.cute.variants as v
        v.generate({"name": "smoke"}, ["sm_90a"])
        bad = [m for m in sys.modules if m.split(".")[0] in ("cutlass", "quack", "flash_attn")]
        assert not bad, bad
    """)
    env = dict(os.environ, MSA_CACHE_DIR=os.path.join(os.environ.get("TMPDIR", "/tmp"), f"msa-kd-{os.getpid()}"))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0, r.stdout + r.stderr


def test_runtime_library_precedence(store, monkeypatch, tmp_path):
    from msa.cute.runtime import cute_dsl_runtime_library

    monkeypatch.delenv(jit.RUNTIME_ENV, raising=False)
    wheel = cute_dsl_runtime_library()
    if wheel is not None:
        assert jit.runtime_library(store) == wheel  # JIT on, no bundle: the installed wheel's
    lib = tmp_path / "libcute_dsl_runtime.so"
    lib.write_bytes(b"x")
    monkeypatch.setenv(jit.RUNTIME_ENV, str(lib))
    assert jit.runtime_library(store) == lib
    monkeypatch.setenv(jit.RUNTIME_ENV, str(tmp_path / "missing.so"))
    with pytest.raises(jit.CuteBuildError, match="MSA_CUTE_DSL_RUNTIME=.*is not a file"):
        jit.runtime_library(store)


def test_generate_lists_route_kernel_per_arch():
    vs = variants.generate({"name": "smoke"}, ["sm_90a", "sm_100a"])
    names = [v.name for v in vs]
    assert "cute.elementwise.axpby[sm_90a,dtype=float32]" in names
    assert "cute.elementwise.axpby[sm_100a,dtype=float32]" in names
    for v in vs:
        assert v.package == "msa-cute" and v.build_target == "msa.cute.jit:build_variant"
        assert v.params["arch"] == v.arch and v.params["until"] == "module"
        assert CuteSpec(**{k: x for k, x in v.params.items() if k != "until"}).name == v.name
    assert {v.params["until"] for v in variants.generate({"until": "object"}, ["sm_90a"])} == {"object"}
    with pytest.raises(TypeError, match="preset"):
        variants.generate("m3", ["sm_90a"])
    with pytest.raises(TypeError, match="archs"):
        variants.generate({}, "sm_90a")


@pytest.mark.compile
@needs_dsl
def test_build_both_archs_in_one_process_then_hit_and_load(store):
    import torch
    from cutlass.cutlass_dsl import CuTeDSL

    before = os.environ.get("CUTE_DSL_ARCH")
    entries = {}
    for arch in ("sm_100a", "sm_90a"):  # non-default arch second: the re-latch must win over the first compile
        spec = CuteSpec(AXPBY, {"dtype": "float32"}, arch)
        builds = store.counters["builds"]
        entry = spec.build(store)
        assert store.counters["builds"] == builds + 2, "object + module built"
        obj = store.lookup(spec.keys(store)[0])
        assert cubin_archs(obj.file("kernel.o")) == [int(arch[3:-1])]
        assert cubin_archs(entry.file("kernel.so")) == [int(arch[3:-1])]
        assert entry.kind == "tvm_ffi.module" and entry.meta["extra"] == {"main": "kernel.so", "function": "axpby"}
        entries[arch] = entry
        again = spec.build(store)
        assert again.path == entry.path and store.counters["builds"] == builds + 2, "second build is a cache hit"
    assert os.environ.get("CUTE_DSL_ARCH") == before, "the process's CUTE_DSL_ARCH is restored"
    assert CuTeDSL._get_dsl().envar.arch == (before or CuTeDSL._get_dsl().envar.arch)
    # The module loads here (no GPU, no libcuda) and its entry point checks arguments before any launch.
    fn = CuteSpec(AXPBY, {"dtype": "float32"}, "sm_90a").load()
    x = torch.randn(10)
    with pytest.raises(ValueError, match=r"axpby\(.*Tensor\(\[n0\], float32\).*expected device_type=cuda"):
        fn(x, x, x, 1.0, 2.0)
    # The object stage alone (warmup --until object) is its own entry, shared with the module.
    assert jit.build_variant(until="object", **CuteSpec(AXPBY, {"dtype": "float32"}, "sm_90a").to_params()) == str(
        store.lookup(CuteSpec(AXPBY, {"dtype": "float32"}, "sm_90a").keys(store)[0]).path)


_NODE = textwrap.dedent("""
    # A GPU node: no cutlass-dsl (any import of it fails), MSA_JIT=0, kernels only from an imported bundle.
    import importlib.abc, json, sys

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("cutlass", "nvidia_cutlass_dsl", "quack", "flash_attn"):
                raise ImportError(f"blocked on this node: {name}")
            return None

    # This host has the DSL installed; its .pth imported nvidia_cutlass_dsl at start-up: undo that first.
    sys.modules.pop("nvidia_cutlass_dsl", None)
    sys.path[:] = [p for p in sys.path if "nvidia_cutlass_dsl" not in p]
    sys.meta_path.insert(0, Block())
    from msa.cache import get_store, import_bundle
    info = import_bundle(sys.argv[1])
    from msa.cute import jit
    from msa.cute.jit import CuteSpec
    import torch
    assert jit.runtime_library().parent.name == "runtime", jit.runtime_library()  # the bundle's copy
    fn = CuteSpec("msa.cute.kernels.dsl.elementwise:axpby", {"dtype": "float32"}, "sm_90a").load()
    try:
        fn(torch.ones(4), torch.ones(4), torch.ones(4), 1.0, 1.0)
        raise SystemExit("expected a device error for CPU tensors")
    except ValueError as e:
        assert "expected device_type=cuda" in str(e), e
    bad = [m for m in sys.modules if m.split(".")[0] in ("cutlass", "nvidia_cutlass_dsl", "quack", "flash_attn")]
    print(json.dumps({"bad": bad, "stats": get_store().counters, "entries": info["entries"]}))
""")


@pytest.mark.compile
@needs_dsl
def test_bundle_loads_on_a_node_without_the_dsl(store, tmp_path):
    from msa.cache import export_bundle

    CuteSpec(AXPBY, {"dtype": "float32"}, "sm_90a").build(store)
    bundle = tmp_path / "b.tar"
    export_bundle(bundle, ["sm_90a"], store=store)
    script = tmp_path / "node.py"
    script.write_text(_NODE)
    env = dict(os.environ, MSA_CACHE_DIR=str(tmp_path / "node-cache"), MSA_JIT="0", CUDA_VISIBLE_DEVICES="")
    env.pop("MSA_CACHE_PATH", None)
    r = subprocess.run([sys.executable, str(script), str(bundle)], capture_output=True, text=True, timeout=300,
                       env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["bad"] == [] and out["stats"]["builds"] == 0 and out["stats"]["hits"] >= 1


@pytest.mark.gpu
def test_axpby_runs_on_the_gpu():
    import torch
    from msa.cache import ToolchainUnavailableError

    try:
        fn = CuteSpec(AXPBY, {"dtype": "float32"}, jit.arch_for_device()).load()
    except ToolchainUnavailableError as e:
        pytest.skip(f"needs nvidia-cutlass-dsl on this host or an imported bundle with CuTe artifacts: {e}")
    g = torch.Generator(device="cuda").manual_seed(0)
    for n in (1, 127, 128, 1000, 1 << 20):
        x = torch.randn(n, device="cuda", generator=g)
        y = torch.randn(n, device="cuda", generator=g)
        out = torch.full_like(x, float("nan"))
        fn(x, y, out, 0.5, -2.0)
        torch.cuda.synchronize()
        torch.testing.assert_close(out, 0.5 * x - 2.0 * y, rtol=1e-6, atol=1e-6)
