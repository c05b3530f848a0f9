"""Bundle export/import round trip into a fresh cache, a compiler-less offline node, tampering, unsafe archives."""

from __future__ import annotations

import io
import json
import tarfile
from importlib.metadata import EntryPoint

import pytest
from msa.cache import BundleError, CacheMissError, Store, export_bundle, get_store, import_bundle, plugins, runtime_file
from msa.cache.cli import main as cli_main

NVCC = {"tool": "nvcc", "version": "13.0.88", "build": "cuda_13.0.r13.0/compiler.36424714_0"}
RUNTIME_BYTES = b"\x7fELF fake libcute_dsl_runtime.so" * 100


@pytest.fixture
def fake_runtime(tmp_path, monkeypatch):
    lib = tmp_path / "runtime_src" / "libfake_dsl_runtime.so"
    lib.parent.mkdir()
    lib.write_bytes(RUNTIME_BYTES)
    monkeypatch.setenv("MSA_TEST_RUNTIME_FILE", str(lib))
    real = plugins.entry_points

    def fake_entry_points(group):
        if group == plugins.RUNTIME_FILES:
            return [EntryPoint("fake", "msa_cache_testkit:runtime_files", group)]
        return real(group)

    monkeypatch.setattr(plugins, "entry_points", fake_entry_points)
    return lib


def _node_key(store, kit, arch, stage="module", n=0):
    nvcc = store.toolchain("nvcc", probe=lambda: None)  # the node has no compiler
    return store.key(stage=stage, name=f"k[{arch},{n}]", ingredients=kit.ingredients(arch, compiler=nvcc, n=n))


def _build_host(kit, tmp_path):
    """Entries for two archs and three stages on a 'build host' cache; returns the host store."""
    host = Store(tmp_path / "host")
    nvcc = host.toolchain("nvcc", probe=lambda: NVCC)
    for arch in ("sm_90a", "sm_100a"):
        for stage in ("source", "object", "module"):
            for n in (0, 1):
                k = host.key(stage=stage, name=f"k[{arch},{n}]", ingredients=kit.ingredients(arch, compiler=nvcc, n=n))
                host.get_or_build(k, kit.fake_builder(payload=f"{arch}/{stage}/{n}".encode()))
    return host


def test_bundle_round_trip_to_offline_node(kit, tmp_path, monkeypatch, fake_runtime, isolated_cache):
    host = _build_host(kit, tmp_path)
    out = tmp_path / "msa-sm90.tar.gz"
    manifest = export_bundle(out, ["sm_90a"], store=host)
    assert manifest["archs"] == ["sm_90a"] and len(manifest["entries"]) == 4  # object+module x 2, no source
    assert {e["stage"] for e in manifest["entries"]} == {"object", "module"}
    assert [r["name"] for r in manifest["runtime_files"]] == ["libfake_dsl_runtime.so"]
    assert manifest["toolchains"] == {"nvcc": [NVCC]}
    assert "msa-cache" in manifest["versions"]["dists"]
    with tarfile.open(out) as tar:
        assert tar.getnames()[0] == "bundle.json"

    # the node: fresh local tier, no compiler, MSA_JIT=0
    monkeypatch.setenv("MSA_JIT", "0")
    node = get_store(refresh=True)
    assert runtime_file("libfake_dsl_runtime.so") is None
    result = import_bundle(out)
    assert result["bundle_id"] == manifest["bundle_id"] and not result["already_present"]
    tier_dir = isolated_cache / "tiers" / manifest["bundle_id"]
    assert result["path"] == str(tier_dir)
    node = get_store(refresh=True)
    assert [t.origin for t in node.tiers] == [f"imported:{manifest['bundle_id']}", "local"]
    for n in (0, 1):
        e = node.get_or_build(_node_key(node, kit, "sm_90a", n=n), lambda d: pytest.fail("node must not compile"))
        assert e.read_only and str(e.path).startswith(str(tier_dir))
        assert e.file("kernel.so").read_bytes() == f"sm_90a/module/{n}".encode()
    with pytest.raises(CacheMissError, match=r"(?s)k\[sm_100a,0\].*msa-cache warmup --preset smoke --arch sm_100a"):
        node.get_or_build(_node_key(node, kit, "sm_100a"), lambda d: None,
                          warmup_hint="msa-cache warmup --preset smoke --arch sm_100a")
    rt = runtime_file("libfake_dsl_runtime.so")
    assert rt is not None and rt.read_bytes() == RUNTIME_BYTES and rt.parent == tier_dir / "runtime"
    # importing again is idempotent (verified, not re-extracted)
    again = import_bundle(out)
    assert again["already_present"]
    assert len(json.loads((isolated_cache / "tiers.json").read_text())["tiers"]) == 1


def test_cli_bundle_and_import(kit, tmp_path, monkeypatch, fake_runtime, capsys):
    host = _build_host(kit, tmp_path)
    out = tmp_path / "b.tar"
    assert cli_main(["--cache-dir", str(host.local.root), "bundle", "-o", str(out), "--arch", "sm_90a,sm_100a"]) == 0
    assert "8 entries, 1 runtime files" in capsys.readouterr().out
    node_dir = tmp_path / "node"
    assert cli_main(["--cache-dir", str(node_dir), "import", str(out)]) == 0
    assert "imported and verified: 8 entries" in capsys.readouterr().out
    assert cli_main(["--cache-dir", str(node_dir), "ls"]) == 0
    listing = capsys.readouterr().out
    assert "8 entries" in listing and "imported:msa-" in listing
    # --dest puts the tier elsewhere and still registers it
    dest = tmp_path / "baked_image_tier"
    assert cli_main(["--cache-dir", str(tmp_path / "node2"), "import", str(out), "--dest", str(dest)]) == 0
    monkeypatch.setenv("MSA_CACHE_DIR", str(tmp_path / "node2"))
    assert get_store(refresh=True).imported[0].root == dest.resolve()
    # nothing for an arch that has no entries -> non-zero
    assert cli_main(["--cache-dir", str(host.local.root), "bundle", "-o", str(tmp_path / "e.tar"), "--arch", "sm_120a",
                     "--no-runtime"]) == 1


def _rewrite_tar(src, dst, edit):
    with tarfile.open(src) as tin, tarfile.open(dst, "w") as tout:
        for m in tin.getmembers():
            data = tin.extractfile(m).read() if m.isfile() else None
            m, data = edit(m, data)
            if m is not None:
                tout.addfile(m, io.BytesIO(data) if data is not None else None)


def test_tampered_bundle_is_rejected_and_not_registered(kit, tmp_path, fake_runtime, isolated_cache):
    host = _build_host(kit, tmp_path)
    good = tmp_path / "good.tar"
    export_bundle(good, ["sm_90a"], store=host)

    def flip_kernel(m, data):
        if m.name.endswith("kernel.so"):
            data = bytes([data[0] ^ 1]) + data[1:]
        return m, data

    def flip_runtime(m, data):
        if m.name.startswith("runtime/"):
            data = data[:-1] + b"!"
        return m, data

    for edit, what in ((flip_kernel, "sha256"), (flip_runtime, "runtime file")):
        bad = tmp_path / f"bad_{what[:3]}.tar"
        _rewrite_tar(good, bad, edit)
        with pytest.raises(BundleError, match=what):
            import_bundle(bad)
        assert not (isolated_cache / "tiers.json").exists()
        assert not any((isolated_cache / "tiers").glob("msa-*"))


def test_unsafe_members_are_rejected(kit, tmp_path, fake_runtime):
    host = _build_host(kit, tmp_path)
    good = tmp_path / "good.tar"
    export_bundle(good, ["sm_90a"], store=host)

    def traversal(m, data):
        if m.name.endswith("params.h"):
            m.name = "entries/../../evil.txt"
        return m, data

    def symlink(m, data):
        if m.name.endswith("params.h"):
            m.type, m.linkname, m.size = tarfile.SYMTYPE, "/etc/passwd", 0
            return m, None
        return m, data

    for edit, match in ((traversal, "outside the bundle layout"), (symlink, "not a regular file")):
        bad = tmp_path / f"{edit.__name__}.tar"
        _rewrite_tar(good, bad, edit)
        with pytest.raises(BundleError, match=match):
            import_bundle(bad)
    assert not (tmp_path / "evil.txt").exists()
    with pytest.raises(BundleError, match="not an msa-cache bundle"):
        notbundle = tmp_path / "x.tar"
        with tarfile.open(notbundle, "w") as t:
            t.addfile(tarfile.TarInfo("hello"), io.BytesIO(b""))
        import_bundle(notbundle)


def test_broken_runtime_provider_fails_the_bundle(kit, tmp_path, monkeypatch):
    host = _build_host(kit, tmp_path)
    monkeypatch.setattr(
        plugins, "entry_points",
        lambda group: [EntryPoint("broken", "msa_cache_no_such_module:runtime_files", group)]
        if group == plugins.RUNTIME_FILES else [],
    )
    with pytest.raises(BundleError, match=r"runtime-file provider broken \(msa_cache_no_such_module:runtime_files\)"):
        export_bundle(tmp_path / "x.tar", ["sm_90a"], store=host)


def test_arch_neutral_module_follows_its_object_into_the_bundle(kit, tmp_path):
    """msa-core keys a module by its object's digest (no arch ingredient): it must travel with that object."""
    host = Store(tmp_path / "host")
    objs = {}
    for arch in ("sm_90a", "sm_100a"):
        k = host.key(stage="object", name=f"o[{arch}]", ingredients=kit.ingredients(arch))
        objs[arch] = host.get_or_build(k, kit.fake_builder())
        mk = host.key(stage="module", name=f"m[{arch}]", ingredients={"object": objs[arch].digest, "link": ["-shared"]})
        host.get_or_build(mk, kit.fake_builder())
    lonely = host.key(stage="module", name="unrelated", ingredients={"x": 1})
    host.get_or_build(lonely, kit.fake_builder())
    manifest = export_bundle(tmp_path / "b.tar", ["sm_90a"], store=host, runtime=False)
    assert sorted(e["name"] for e in manifest["entries"]) == ["m[sm_90a]", "o[sm_90a]"]
    manifest = export_bundle(tmp_path / "n.tar", ["sm_90a"], store=host, runtime=False, include_arch_neutral=True)
    assert sorted(e["name"] for e in manifest["entries"]) == ["m[sm_90a]", "o[sm_90a]", "unrelated"]


def test_module_only_bundle_carries_the_compiler_of_its_objects(tmp_path, fake_runtime, isolated_cache):
    """A module's key names its object's digest, not the compiler; the bundle must still carry the compiler
    identity (found through the object), or a compiler-less node cannot compute the module's key (seen on the
    GPU box: a `--stage module` bundle of CuTe kernels had no cutlass_dsl record)."""
    host = Store(tmp_path / "host")
    dsl = {"tool": "cutlass-dsl", "dists": {"nvidia-cutlass-dsl": "4.8.1"}}
    ident = host.toolchain("cutlass_dsl", probe=lambda: dsl)
    obj_key = host.key(stage="object", name="k[sm_90a]", ingredients={"arch": "sm_90a", "dsl": ident, "src": "a"})
    obj = host.get_or_build(obj_key, lambda d: (d / "k.o").write_bytes(b"obj") and None)
    mod_key = host.key(stage="module", name="k[sm_90a]", ingredients={"arch": "sm_90a", "object": obj.digest})
    host.get_or_build(mod_key, lambda d: (d / "k.so").write_bytes(b"so") and None)
    first = export_bundle(tmp_path / "a.tar", ["sm_90a"], store=host, stages=["module"])
    assert [e["stage"] for e in first["entries"]] == ["module"]
    assert first["toolchains"] == {"cutlass_dsl": [dsl]}
    # the same entries without the record are a different bundle, so importing the fixed one is never skipped as
    # "already imported" on a node that holds the old one
    (tmp_path / "host" / "toolchains.json").unlink()
    second = export_bundle(tmp_path / "b.tar", ["sm_90a"], store=Store(tmp_path / "host"), stages=["module"])
    assert second["toolchains"] == {} and second["bundle_id"] != first["bundle_id"]
