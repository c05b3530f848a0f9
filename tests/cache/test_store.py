"""Store basics: build/publish/lookup, builder contract, offline mode, unwritable/full tiers, shared tiers."""

from __future__ import annotations

import errno
import json
import os
import shutil
import statistics
import subprocess
import threading
import time
from pathlib import Path

import pytest
from msa.cache import (
    CacheError,
    CacheMissError,
    CacheUnwritableError,
    Store,
    ToolchainUnavailableError,
    _fsutil,
    get_store,
)
from msa_cache_testutil import tree_snapshot


def test_get_or_build_publishes_and_looks_up(kit, isolated_cache):
    store = get_store()
    key = store.key(stage="module", name="topk_select[sm_90a,fp32]", ingredients=kit.ingredients())
    calls = []
    entry = store.get_or_build(key, lambda d: calls.append(1) or kit.fake_builder()(d))
    assert calls == [1]
    assert entry.path == isolated_cache / "entries" / key.digest[:2] / key.digest
    assert entry.file("kernel.so").read_bytes() == kit.PAYLOAD
    assert sorted(entry.files) == ["include/params.h", "kernel.so"]
    meta = json.loads((entry.path / "manifest.json").read_text())
    assert meta == entry.meta
    assert meta["digest"] == key.digest and meta["stage"] == "module" and meta["arch"] == "sm_90a"
    assert meta["files"]["kernel.so"]["size"] == len(kit.PAYLOAD)
    assert meta["extra"] == {"main": "kernel.so"}
    assert meta["compile_seconds"] >= 0 and meta["built_at"].endswith("Z")
    assert meta["key"]["ingredients"] == kit.ingredients()
    # second call: a hit, the builder is not called
    again = store.get_or_build(key, lambda d: calls.append(2))
    assert calls == [1] and again.path == entry.path
    # a fresh store (new process view) finds it too, after hashing it once
    fresh = Store.from_env()
    assert fresh.lookup(key).path == entry.path
    with pytest.raises(KeyError, match="has no file 'nope.so'; it has"):
        entry.file("nope.so")
    assert list((isolated_cache / "tmp").iterdir()) == []


def test_lookup_hit_is_cheap(kit):
    store = get_store()
    key = store.key(stage="module", name="k", ingredients=kit.ingredients())
    store.get_or_build(key, kit.fake_builder())
    samples = []
    for _ in range(2000):
        t = time.perf_counter()
        store.lookup(key)
        samples.append(time.perf_counter() - t)
    assert statistics.median(samples) < 1e-3, f"median hit {statistics.median(samples) * 1e6:.1f} us"


def test_builder_failure_leaves_nothing_and_adds_a_note(kit, isolated_cache):
    store = get_store()
    key = store.key(stage="module", name="broken[sm_90a]", ingredients=kit.ingredients())

    def builder(tmp: Path):
        (tmp / "half.o").write_bytes(b"partial")
        raise RuntimeError("nvcc: error: boom")

    with pytest.raises(RuntimeError, match="boom") as info:
        store.get_or_build(key, builder)
    assert any("broken[sm_90a]" in n for n in getattr(info.value, "__notes__", []))
    assert store.lookup(key) is None
    assert list((isolated_cache / "tmp").iterdir()) == []
    assert not (isolated_cache / "locks" / f"{key.digest}.holder").exists()


@pytest.mark.parametrize(
    "write, match",
    [
        (lambda d: None, "wrote no files"),
        (lambda d: (d / "manifest.json").write_text("{}") and None, "reserved"),
        (lambda d: os.symlink("/etc/passwd", d / "link.so"), "symlink"),
        (lambda d: (d / "a.so").write_bytes(b"x") and "not a dict", "must return None or a dict"),
    ],
)
def test_builder_contract_violations(kit, write, match):
    store = get_store()
    key = store.key(stage="module", name="bad", ingredients=kit.ingredients())
    with pytest.raises(CacheError, match=match):
        store.get_or_build(key, write)
    assert store.lookup(key) is None


def test_offline_miss_names_key_and_warmup_command(kit, monkeypatch):
    monkeypatch.setenv("MSA_JIT", "0")
    store = get_store(refresh=True)
    key = store.key(stage="module", name="topk_select[sm_90a,fp32]", ingredients=kit.ingredients())
    hint = "msa-cache warmup --preset smoke --arch sm_90a"
    called = []
    with pytest.raises(CacheMissError) as info:
        store.get_or_build(key, lambda d: called.append(1), warmup_hint=hint)
    msg = str(info.value)
    assert called == []
    assert "topk_select[sm_90a,fp32]" in msg and key.digest in msg and hint in msg and "MSA_JIT=0" in msg
    assert info.value.key is key and info.value.warmup_hint == hint


def test_env_values_are_validated(monkeypatch):
    monkeypatch.setenv("MSA_JIT", "maybe")
    with pytest.raises(ValueError, match="MSA_JIT must be 0 or 1.*'maybe'"):
        get_store(refresh=True)
    monkeypatch.setenv("MSA_JIT", "1")
    monkeypatch.setenv("MSA_CACHE_MAX_BYTES", "lots")
    with pytest.raises(ValueError, match="MSA_CACHE_MAX_BYTES must be a size"):
        get_store(refresh=True)
    monkeypatch.setenv("MSA_CACHE_MAX_BYTES", "1.5G")
    assert get_store(refresh=True).max_bytes == int(1.5 * (1 << 30))
    monkeypatch.setenv("MSA_CACHE_VERIFY", "sometimes")
    with pytest.raises(ValueError, match="MSA_CACHE_VERIFY"):
        get_store(refresh=True)


def test_threads_race_one_build(kit, tmp_path):
    store = get_store()
    key = store.key(stage="module", name="threaded", ingredients=kit.ingredients())
    log = tmp_path / "builds.log"
    results, errors = [], []

    def worker():
        try:
            results.append(store.get_or_build(key, kit.fake_builder(str(log), sleep=0.3)).file("kernel.so").read_bytes())
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert kit.count_builds(log) == 1
    assert results == [kit.PAYLOAD] * 8


# --- unwritable / full local tier -------------------------------------------------------------------------------


def test_unwritable_local_tier_is_a_clear_error(kit, tmp_path, monkeypatch):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("MSA_CACHE_DIR", str(blocker / "cache"))
    store = get_store(refresh=True)
    key = store.key(stage="module", name="k", ingredients=kit.ingredients())
    assert store.lookup(key) is None  # lookups never crash on a bad local tier
    with pytest.raises(CacheUnwritableError) as info:
        store.get_or_build(key, kit.fake_builder())
    msg = str(info.value)
    assert str(blocker / "cache") in msg and "MSA_CACHE_DIR" in msg and "MSA_CACHE_ALLOW_TMP=1" in msg


def test_unwritable_local_tier_falls_back_to_tmp_when_allowed(kit, tmp_path, monkeypatch, caplog):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    monkeypatch.setenv("MSA_CACHE_DIR", str(blocker / "cache"))
    monkeypatch.setenv("MSA_CACHE_ALLOW_TMP", "1")
    store = get_store(refresh=True)
    key = store.key(stage="module", name="k", ingredients=kit.ingredients())
    entry = store.get_or_build(key, kit.fake_builder())
    assert str(entry.path).startswith(str(tmp_path / "systmp"))
    assert "building into" in caplog.text
    # a new process with the same settings finds the fallback entry
    assert Store.from_env().lookup(key).path == entry.path


def test_full_disk_during_build_is_a_clear_error_or_tmp_fallback(kit, monkeypatch):
    store = get_store()
    key = store.key(stage="module", name="k", ingredients=kit.ingredients())

    def full_builder(tmp: Path):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp / "kernel.so"))

    with pytest.raises(CacheUnwritableError, match="is full .*No space left on device") as info:
        store.get_or_build(key, full_builder)
    assert info.value.full
    monkeypatch.setenv("MSA_CACHE_ALLOW_TMP", "1")
    store = get_store(refresh=True)
    attempts = []

    def first_full_then_ok(tmp: Path):
        attempts.append(tmp)
        if len(attempts) == 1:
            full_builder(tmp)
        return kit.fake_builder()(tmp)

    entry = store.get_or_build(key, first_full_then_ok)
    assert len(attempts) == 2 and entry.tier.origin == "tmp-fallback"


def test_full_disk_while_publishing_is_a_clear_error(kit, monkeypatch):
    store = get_store()
    key = store.key(stage="module", name="k", ingredients=kit.ingredients())

    def no_space(path, data):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(_fsutil, "write_bytes_durable", no_space)
    with pytest.raises(CacheUnwritableError, match="is full"):
        store.get_or_build(key, kit.fake_builder())
    assert list((store.local.tmp_dir).iterdir()) == []


def _can_mount_tmpfs(path: Path) -> bool:
    if os.geteuid() != 0 or not shutil.which("mount"):
        return False
    path.mkdir(parents=True, exist_ok=True)
    ok = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(path)], capture_output=True).returncode == 0
    return ok


def test_really_full_filesystem(kit, tmp_path, monkeypatch):
    mnt = tmp_path / "tiny"
    if not _can_mount_tmpfs(mnt):
        pytest.skip("needs root and tmpfs mounts to fill a real filesystem (the simulated ENOSPC tests still ran)")
    try:
        monkeypatch.setenv("MSA_CACHE_DIR", str(mnt / "cache"))
        store = get_store(refresh=True)
        key = store.key(stage="module", name="k", ingredients=kit.ingredients())
        with pytest.raises(CacheUnwritableError, match="is full"):
            store.get_or_build(key, kit.fake_builder(size=1 << 20))
        assert store.lookup(key) is None
        monkeypatch.setenv("MSA_CACHE_ALLOW_TMP", "1")
        entry = get_store(refresh=True).get_or_build(key, kit.fake_builder(size=1 << 20))
        assert entry.tier.origin == "tmp-fallback" and entry.file("kernel.so").stat().st_size == 1 << 20
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


# --- read-only shared tiers -------------------------------------------------------------------------------------


def _make_readonly_tier(kit, root: Path, names, payload=None) -> dict:
    builder_store = Store(root)
    keys = {}
    for n in names:
        k = builder_store.key(stage="module", name=n, ingredients=kit.ingredients(name=n))
        builder_store.get_or_build(k, kit.fake_builder(payload=payload or kit.PAYLOAD))
        keys[n] = k
    builder_store.flush_stats()
    subprocess.run(["chmod", "-R", "a-w", str(root)], check=True)
    return keys


def test_shared_readonly_tier_is_used_in_place_and_never_written(kit, tmp_path, monkeypatch, isolated_cache):
    shared = tmp_path / "shared"
    keys = _make_readonly_tier(kit, shared, ["a", "b"])
    before = tree_snapshot(shared)
    monkeypatch.setenv("MSA_CACHE_PATH", os.pathsep.join([str(tmp_path / "missing_tier"), str(shared)]))
    store = get_store(refresh=True)
    for k in keys.values():
        e = store.get_or_build(k, lambda d: pytest.fail("must not rebuild an entry a shared tier has"))
        assert e.read_only and e.path == shared / "entries" / k.digest[:2] / k.digest
        with e.pin():  # a no-op on read-only tiers
            assert e.file("kernel.so").read_bytes() == kit.PAYLOAD
        e.pin_for_process()
    # a miss builds into the local tier, not the shared one
    other = store.key(stage="module", name="c", ingredients=kit.ingredients(name="c"))
    assert store.get_or_build(other, kit.fake_builder()).tier.root == isolated_cache
    store.flush_stats()
    stats = json.loads((isolated_cache / "stats.json").read_text())
    assert stats["shared_hits"] >= 2
    assert tree_snapshot(shared) == before, "the shared tier was modified"
    subprocess.run(["chmod", "-R", "u+w", str(shared)], check=True)


def test_corrupt_entry_in_readonly_tier_is_ignored_not_modified(kit, tmp_path, monkeypatch, caplog):
    shared = tmp_path / "shared"
    keys = _make_readonly_tier(kit, shared, ["a"])
    k = keys["a"]
    so = shared / "entries" / k.digest[:2] / k.digest / "kernel.so"
    os.chmod(so, 0o644)
    data = bytearray(so.read_bytes())
    data[10] ^= 0x40
    so.write_bytes(bytes(data))
    os.chmod(so, 0o444)
    before = tree_snapshot(shared)
    monkeypatch.setenv("MSA_CACHE_PATH", str(shared))
    store = get_store(refresh=True)
    e = store.get_or_build(k, kit.fake_builder())
    assert not e.read_only, "the corrupt shared copy must not be used"
    assert "read-only tier" in caplog.text and "failed its integrity check" in caplog.text
    assert tree_snapshot(shared) == before
    subprocess.run(["chmod", "-R", "u+w", str(shared)], check=True)


# --- toolchain identities -----------------------------------------------------------------------------------------


def test_toolchain_probe_recorded_then_used_by_a_compilerless_offline_store(tmp_path, monkeypatch, isolated_cache):
    ident = {"tool": "nvcc", "version": "13.0.88", "build": "cuda_13.0.r13.0/compiler.36424714_0"}
    store = get_store()
    assert store.toolchain("nvcc", probe=lambda: ident) == ident
    recorded = json.loads((isolated_cache / "toolchains.json").read_text())
    assert recorded["nvcc"][0] == ident
    monkeypatch.setenv("MSA_JIT", "0")
    node = get_store(refresh=True)
    assert node.toolchain("nvcc", probe=lambda: None) == ident
    # offline mode prefers the recorded identity even if another compiler is installed here
    node2 = get_store(refresh=True)
    assert node2.toolchain("nvcc", probe=lambda: dict(ident, version="12.8.93")) == ident
    monkeypatch.setenv("MSA_CACHE_DIR", str(tmp_path / "empty"))
    with pytest.raises(ToolchainUnavailableError, match="'nvcc' is not installed here"):
        get_store(refresh=True).toolchain("nvcc", probe=lambda: None)


def test_probe_nvcc_parses_version():
    from msa.cache.toolchain import find_nvcc, probe_nvcc

    if find_nvcc() is None:
        pytest.skip("no nvcc on this host")
    ident = probe_nvcc()
    assert ident["tool"] == "nvcc" and ident["version"].count(".") == 2
    assert "path" not in ident, "an install path in the identity would make hosts disagree on keys"
