"""Multi-process races, SIGKILLed builders (mid-compile and mid-publish), stale locks, lock timeouts."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
from msa.cache import LockTimeoutError, Store, get_store
from msa.cache.entry import check_files
from msa_cache_testutil import finish, spawn_kit


def test_eight_processes_race_one_cold_key(kit, tmp_path, isolated_cache):
    log = tmp_path / "builds.log"
    ready = tmp_path / "ready"
    ready.mkdir()
    go = tmp_path / "go"
    n = 8
    procs = [spawn_kit("race", {"log": str(log), "ready_dir": str(ready), "go": str(go), "sleep": 0.5}) for _ in range(n)]
    deadline = time.monotonic() + 60
    while len(list(ready.iterdir())) < n:
        assert time.monotonic() < deadline, "children did not start"
        assert all(p.poll() is None for p in procs), "a child died before the start signal"
        time.sleep(0.01)
    go.touch()
    results = [finish(p) for p in procs]
    assert kit.count_builds(log) == 1, "the same key was compiled more than once"
    assert all(r["ok"] for r in results), results
    assert len({r["path"] for r in results}) == 1
    assert sum(r["builds"] for r in results) == 1
    assert list((isolated_cache / "tmp").iterdir()) == []


class _Watcher(threading.Thread):
    """Polls an entry path and records any moment it is visible but incomplete."""

    def __init__(self, entry_dir: Path):
        super().__init__(daemon=True)
        self.entry_dir = entry_dir
        self.violations: list[str] = []
        self.seen_complete = 0
        self.stop = threading.Event()

    def run(self):
        while not self.stop.is_set():
            if self.entry_dir.exists():
                try:
                    meta = json.loads((self.entry_dir / "manifest.json").read_text())
                    problems = check_files(self.entry_dir, meta)
                except (OSError, ValueError) as e:
                    problems = [f"manifest: {e}"]
                if problems and self.entry_dir.exists():
                    self.violations.append("; ".join(problems))
                elif not problems:
                    self.seen_complete += 1
            time.sleep(0.001)


@pytest.mark.parametrize("point", ["in_builder", "before_manifest", "before_rename", "after_commit"])
def test_sigkilled_builder_leaves_no_partial_entry(kit, tmp_path, isolated_cache, point, caplog):
    store = get_store()
    key = store.key(stage="module", name="killed_kernel[sm_90a]", ingredients=kit.ingredients())
    entry_dir = isolated_cache / "entries" / key.digest[:2] / key.digest
    watcher = _Watcher(entry_dir)
    watcher.start()
    marker = tmp_path / "inside"
    log = tmp_path / "builds.log"
    child = spawn_kit("killed_build", {"point": point, "marker": str(marker), "log": str(log)})
    deadline = time.monotonic() + 60
    while not marker.exists():
        assert child.poll() is None, child.communicate()[1]
        assert time.monotonic() < deadline
        time.sleep(0.005)
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    holder = isolated_cache / "locks" / f"{key.digest}.holder"
    assert holder.exists(), "the dead builder's holder record should be left behind (to name it later)"
    assert json.loads(holder.read_text())["pid"] == child.pid

    fresh = Store.from_env()
    if point == "after_commit":
        # the rename is the commit: a complete entry is visible and nobody needs to rebuild it
        assert fresh.lookup(key) is not None
    else:
        assert fresh.lookup(key) is None, "a partial build became visible"
        assert any(p.name.startswith(key.digest) for p in (isolated_cache / "tmp").iterdir()), "expected leftovers"
    # next caller: takes the lock (flock died with the child), says whom it recovered it from, cleans up
    builds_before = kit.count_builds(log)
    entry = fresh.get_or_build(key, kit.fake_builder(str(log)))
    watcher.stop.set()
    watcher.join()
    assert watcher.violations == [], watcher.violations
    assert entry.file("kernel.so").read_bytes() == kit.PAYLOAD
    assert check_files(entry.path, entry.meta) == []
    if point == "after_commit":
        assert kit.count_builds(log) == builds_before
        # a hit takes no lock, so the dead builder's holder record stays until prune (the flock itself is free)
        from msa.cache.maintenance import prune

        report = prune(fresh)
        assert any(str(holder) in item for item in report["locks"]), report
    else:
        assert kit.count_builds(log) == builds_before + 1
        assert f"pid {child.pid}" in caplog.text and "recovered the build lock" in caplog.text
        assert list((isolated_cache / "tmp").iterdir()) == [], "leftover temp dirs were not removed"
    assert not holder.exists()


def test_lock_timeout_names_key_and_holder(kit, tmp_path, monkeypatch):
    marker = tmp_path / "locked"
    child = spawn_kit("hold_lock", {"marker": str(marker), "hold": 30})
    try:
        deadline = time.monotonic() + 60
        while not marker.exists():
            assert child.poll() is None, child.communicate()[1]
            assert time.monotonic() < deadline
            time.sleep(0.01)
        monkeypatch.setenv("MSA_CACHE_LOCK_TIMEOUT", "0.5")
        store = get_store(refresh=True)
        key = store.key(stage="module", name="locked_kernel[sm_90a]", ingredients=kit.ingredients())
        t0 = time.monotonic()
        with pytest.raises(LockTimeoutError) as info:
            store.get_or_build(key, kit.fake_builder())
        assert 0.4 < time.monotonic() - t0 < 10
        msg = str(info.value)
        assert "locked_kernel[sm_90a]" in msg and key.digest in msg
        assert f"pid {child.pid}" in msg and "running" in msg and "MSA_CACHE_LOCK_TIMEOUT" in msg
    finally:
        child.kill()
        child.wait()
    # once the holder is gone the lock is free again
    assert get_store(refresh=True).get_or_build(key, kit.fake_builder()).file("kernel.so").exists()
