"""Integrity: truncated / bit-flipped / missing artifacts and broken manifests are quarantined and rebuilt."""

from __future__ import annotations

import json
import os

import pytest
from msa.cache import Store, get_store
from msa.cache.cli import main as cli_main
from msa.cache.maintenance import verify


def _writable(path):
    os.chmod(path, 0o644)
    return path


def _truncate(entry):
    p = _writable(entry.file("kernel.so"))
    st = p.stat()
    p.write_bytes(p.read_bytes()[:100])
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))


def _bitflip(entry):
    p = _writable(entry.file("kernel.so"))
    st = p.stat()
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0x01
    p.write_bytes(bytes(data))
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))  # same size, same mtime: only the hash can tell


def _delete_file(entry):
    entry.file("include/params.h").unlink()


def _garbage_manifest(entry):
    m = _writable(entry.path / "manifest.json")
    m.write_text('{"schema": 1, "digest": "trunc')


def _wrong_digest_manifest(entry):
    m = _writable(entry.path / "manifest.json")
    meta = json.loads(m.read_text())
    meta["digest"] = "0" * 64
    m.write_text(json.dumps(meta))


@pytest.mark.parametrize("damage", [_truncate, _bitflip, _delete_file, _garbage_manifest, _wrong_digest_manifest])
def test_damaged_entry_is_quarantined_and_rebuilt(kit, tmp_path, isolated_cache, damage, caplog):
    store = get_store()
    key = store.key(stage="module", name="k[sm_90a]", ingredients=kit.ingredients())
    entry = store.get_or_build(key, kit.fake_builder())
    damage(entry)
    fresh = Store.from_env()  # another process: checks hashes on first use
    assert fresh.lookup(key) is None
    assert "failed its integrity check" in caplog.text and "k[sm_90a]" in caplog.text
    quarantined = list((isolated_cache / "quarantine").iterdir())
    assert len(quarantined) == 1 and quarantined[0].name.startswith(key.digest)
    reason = json.loads((quarantined[0] / "reason.json").read_text())
    assert reason["digest"] == key.digest and reason["problems"]
    log = tmp_path / "builds.log"
    rebuilt = fresh.get_or_build(key, kit.fake_builder(str(log)))
    assert kit.count_builds(log) == 1
    assert rebuilt.file("kernel.so").read_bytes() == kit.PAYLOAD
    assert Store.from_env().lookup(key) is not None


def test_hash_checked_once_per_process_unless_always(kit, monkeypatch):
    store = get_store()
    key = store.key(stage="module", name="k", ingredients=kit.ingredients())
    entry = store.get_or_build(key, kit.fake_builder())
    _bitflip(entry)
    # within the same process the first verification is cached (keeps hits cheap) ...
    assert store.lookup(key) is not None
    # ... `verify` (or MSA_CACHE_VERIFY=always) re-hashes
    monkeypatch.setenv("MSA_CACHE_VERIFY", "always")
    assert get_store(refresh=True).lookup(key) is None


def test_verify_reports_quarantines_and_test_loads(kit, fake_plugin_site, isolated_cache, capsys):
    store = get_store()
    good = store.key(stage="module", name="good", ingredients=kit.ingredients(n=1), kind="fake.module")
    bad_load = store.key(stage="module", name="bad_load", ingredients=kit.ingredients(n=2), kind="fake.module")
    crash = store.key(stage="module", name="crash_load", ingredients=kit.ingredients(n=3), kind="fake.module")
    corrupt = store.key(stage="module", name="corrupt", ingredients=kit.ingredients(n=4), kind="fake.module")
    plain = store.key(stage="object", name="plain", ingredients=kit.ingredients(n=5))
    store.get_or_build(good, kit.fake_builder())
    store.get_or_build(bad_load, kit.fake_builder(payload=b"BAD kernel"))
    store.get_or_build(crash, kit.fake_builder(payload=b"CRASH kernel"))
    _bitflip(store.get_or_build(corrupt, kit.fake_builder()))
    store.get_or_build(plain, kit.fake_builder())
    results = {r["name"]: r for r in verify(Store.from_env())}
    assert results["good"]["ok"] and results["good"]["load"] == "ok"
    assert not results["bad_load"]["ok"] and "fake loader: not a kernel" in results["bad_load"]["load"]
    assert not results["crash_load"]["ok"] and "loader process died" in results["crash_load"]["load"]
    assert not results["corrupt"]["ok"] and "sha256" in results["corrupt"]["problems"][0]
    assert results["corrupt"]["quarantined_to"].startswith(str(isolated_cache / "quarantine"))
    assert results["plain"]["ok"] and results["plain"]["load"] == "skipped"  # no loader for kind "object"
    # the CLI exits non-zero while anything is bad, zero once clean
    assert cli_main(["verify"]) == 1
    out = capsys.readouterr().out
    assert "bad_load" in out and "verified 4 entries" in out
    assert cli_main(["verify", "--no-load"]) == 0
