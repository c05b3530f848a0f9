"""Size cap with LRU eviction: least recently used first, never an entry pinned by a live process."""

from __future__ import annotations

import os
import time

from msa.cache import get_store
from msa.cache.maintenance import is_pinned
from msa_cache_testutil import spawn_kit

SIZE = 1000  # + a 22-byte header per entry


def _build(store, kit, n):
    key = store.key(stage="module", name=f"e{n}", ingredients=kit.ingredients(n=n))
    return key, store.get_or_build(key, kit.fake_builder(size=SIZE))


def _age(entries_by_age):
    """Set last-use times: first argument oldest."""
    now = time.time()
    for i, e in enumerate(entries_by_age):
        os.utime(e.path, (now - 1000 + i * 10, now - 1000 + i * 10))


def test_lru_eviction_skips_pinned_entries(kit, tmp_path, monkeypatch):
    monkeypatch.setenv("MSA_CACHE_MAX_BYTES", str(3 * SIZE + 500))
    store = get_store(refresh=True)
    (ka, a), (kb, b), (kc, c) = (_build(store, kit, n) for n in (1, 2, 3))
    assert all(e.path.exists() for e in (a, b, c))
    _age([a, b, c])
    with a.pin():
        assert is_pinned(a.tier, a.digest)
        kd, d = _build(store, kit, 4)  # over the cap: evicts the oldest unpinned one (b), not a
        assert a.path.exists() and not b.path.exists() and c.path.exists() and d.path.exists()
    assert not is_pinned(a.tier, a.digest)
    assert store.lookup(kb) is None  # evicted means gone, and the hot cache knows

    # a pin held by another process protects the entry until that process dies
    marker = tmp_path / "pinned"
    child = spawn_kit("pin", {"name": "e3", "n": 3, "marker": str(marker)})
    try:
        deadline = time.monotonic() + 60
        while not marker.exists():
            assert child.poll() is None, child.communicate()[1]
            assert time.monotonic() < deadline
            time.sleep(0.01)
        _age([c, a, d])  # c is now the least recently used, but pinned by the child
        ke, e = _build(store, kit, 5)
        assert c.path.exists(), "evicted an entry pinned by a live process"
        assert not a.path.exists() and d.path.exists() and e.path.exists()
    finally:
        child.kill()
        child.wait()
    _age([c, d, e])
    kf, f = _build(store, kit, 6)  # the child's pin died with it: c is evictable again
    assert not c.path.exists() and d.path.exists() and e.path.exists() and f.path.exists()
    total = sum(x.size for x in store.iter_entries([store.local]))
    assert total <= 3 * SIZE + 500


def test_lookup_with_pin_holds_a_process_pin(kit):
    store = get_store()
    key, entry = _build(store, kit, 1)
    assert not is_pinned(entry.tier, entry.digest)
    assert store.lookup(key, pin=True) is not None
    assert is_pinned(entry.tier, entry.digest)


def test_prune_enforces_cap_and_clear_keeps_pinned(kit, tmp_path, monkeypatch):
    from msa.cache.maintenance import clear, prune

    store = get_store()
    entries = [_build(store, kit, n)[1] for n in range(4)]
    _age(entries)
    monkeypatch.setenv("MSA_CACHE_MAX_BYTES", str(2 * SIZE + 100))
    capped = get_store(refresh=True)
    report = prune(capped)
    assert sorted(report["evicted"]) == sorted(e.digest for e in entries[:2])
    with entries[3].pin():
        report = clear(capped)
        assert report["removed"] == [entries[2].digest]
        assert len(report["pinned"]) == 1 and entries[3].path.exists()
