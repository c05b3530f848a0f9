"""Fleet maintenance: LRU eviction under a size cap, verify, prune, clear. Only writable tiers are modified."""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from msa.cache import _fsutil
from msa.cache import stats as _stats
from msa.cache.entry import Entry, check_files
from msa.cache.store import Store, quarantine
from msa.cache.tiers import Tier, read_registered, update_registered

log = logging.getLogger("msa.cache")

_DIGEST_RE = re.compile(r"^[0-9a-f]{64}$")
#: Temp dirs of processes on other hosts (shared local tier...) are only removed after this long.
FOREIGN_TMP_MAX_AGE_S = 24 * 3600


# --- eviction --------------------------------------------------------------------------------------------------


def _lock_nb(path: Path, create: bool = True) -> int | None:
    """Open ``path`` and take an exclusive non-blocking flock: the fd, or None if someone holds it."""
    flags = os.O_RDWR | (os.O_CREAT if create else 0)
    fd = os.open(path, flags, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def try_remove_entry(tier: Tier, digest: str) -> bool:
    """Remove an entry unless it is pinned (someone holds a shared flock on its pin file). True if removed."""
    entry_dir = tier.entry_dir(digest)
    tier.pins_dir.mkdir(parents=True, exist_ok=True)
    tier.tmp_dir.mkdir(parents=True, exist_ok=True)
    fd = _lock_nb(tier.pins_dir / f"{digest}.pin")
    if fd is None:
        return False
    target = tier.tmp_dir / _fsutil.unique_name(f"evict-{digest[:16]}")
    try:
        try:
            os.rename(entry_dir, target)  # atomic disappearance; pinners re-check existence after their flock
        except FileNotFoundError:
            return False
    finally:
        os.close(fd)
    _fsutil.remove_tree(target)
    return True


def enforce_cap(store: Store, tier: Tier, max_bytes: int, protect=()) -> list[str]:
    """Evict least-recently-used unpinned entries of ``tier`` until it holds at most ``max_bytes``."""
    rows = []
    for e in store.iter_entries([tier]):
        rows.append((_fsutil.dir_mtime(e.path), e))
    total = sum(e.size for _, e in rows)
    evicted: list[str] = []
    if total <= max_bytes:
        return evicted
    for _, e in sorted(rows, key=lambda r: r[0]):
        if total <= max_bytes:
            break
        if e.digest in protect:
            continue
        if try_remove_entry(tier, e.digest):
            total -= e.size
            evicted.append(e.digest)
            store._hot.pop(e.digest, None)
            store._stats.add("evicted")
            log.info("msa-cache: evicted %s (%d bytes, least recently used)", e.name, e.size)
    if total > max_bytes:
        log.warning(
            "msa-cache: tier %s holds %d bytes, above MSA_CACHE_MAX_BYTES=%d: the rest is pinned by running "
            "processes or was just built",
            tier.root, total, max_bytes,
        )
    return evicted


def is_pinned(tier: Tier, digest: str) -> bool:
    if not tier.writable:
        return False
    pin = tier.pins_dir / f"{digest}.pin"
    if not pin.exists():
        return False
    try:
        fd = _lock_nb(pin, create=False)
    except OSError:
        return False
    if fd is None:
        return True
    os.close(fd)
    return False


# --- listing -----------------------------------------------------------------------------------------------------


def entry_row(e: Entry) -> dict:
    return {
        "digest": e.digest,
        "name": e.meta.get("name"),
        "stage": e.meta.get("stage"),
        "kind": e.meta.get("kind"),
        "arch": e.meta.get("arch"),
        "bytes": e.size,
        "compile_seconds": e.meta.get("compile_seconds"),
        "built_at": e.meta.get("built_at"),
        "last_used": _fsutil.dir_mtime(e.path) if e.tier.writable else None,
        "tier": str(e.tier.root),
        "tier_origin": e.tier.origin,
        "path": str(e.path),
        "problems": e.meta.get("problems", []),
    }


# --- verify --------------------------------------------------------------------------------------------------------


def verify(store: Store, *, load: bool = True, tiers: list[Tier] | None = None) -> list[dict]:
    """Hash-check every entry (quarantining bad ones in writable tiers) and, where a loader is known for the
    entry's kind, test-load it in a subprocess (so a crashing loader or torch import cannot hurt the caller)."""
    results = []
    loadable: list[tuple[dict, Entry]] = []
    kinds = _loadable_kinds() if load else set()
    for e in store.iter_entries(tiers):
        row = {"digest": e.digest, "name": e.meta.get("name"), "tier": str(e.tier.root), "kind": e.meta.get("kind")}
        problems = list(e.meta.get("problems", [])) or check_files(e.path, e.meta)
        row["ok"] = not problems
        row["problems"] = problems
        row["load"] = "skipped"
        if problems:
            if e.tier.writable:
                try:
                    row["quarantined_to"] = str(quarantine(e.tier, e.digest, {"name": row["name"], "problems": problems}))
                    store._hot.pop(e.digest, None)
                    store._stats.add("quarantined")
                except OSError as exc:
                    row["problems"].append(f"could not quarantine: {exc}")
        elif e.meta.get("kind") in kinds:
            loadable.append((row, e))
        results.append(row)
    if loadable:
        for row, outcome in zip((r for r, _ in loadable), _test_load([e for _, e in loadable])):
            row["load"] = outcome
            if outcome != "ok":
                row["ok"] = False
    store.flush_stats()
    return results


def _loadable_kinds() -> set[str]:
    from msa.cache import loaders
    from msa.cache.plugins import LOADERS, entry_points

    return set(loaders._BUILTIN) | set(loaders._REGISTRY) | {ep.name for ep in entry_points(LOADERS)}


def _test_load(entries: list[Entry]) -> list[str]:
    """Outcome per entry ("ok" or an error line), via ``python -m msa.cache._loadcheck``; restarts after crashes."""
    outcomes: list[str] = []
    pending = list(entries)
    while pending:
        payload = "".join(
            json.dumps({"path": str(e.path), "tier": str(e.tier.root), "writable": e.tier.writable}) + "\n"
            for e in pending
        )
        proc = subprocess.run(
            [sys.executable, "-m", "msa.cache._loadcheck"], input=payload, capture_output=True, text=True
        )
        done = []
        for line in proc.stdout.splitlines():
            if line.startswith("{"):
                try:
                    done.append(json.loads(line)["outcome"])
                except (ValueError, KeyError):
                    continue
        outcomes.extend(done[: len(pending)])
        pending = pending[len(done) :]
        if pending:
            tail = proc.stderr.strip().splitlines()[-1:] or [f"exit status {proc.returncode}"]
            outcomes.append(f"loader process died ({tail[0]})")
            pending = pending[1:]
    return outcomes


# --- prune / clear -------------------------------------------------------------------------------------------------


def _writable_tiers(store: Store) -> list[Tier]:
    tiers = [store.local]
    if store.fallback is not None and store.fallback.root.is_dir():
        tiers.append(store.fallback)
    return [t for t in tiers if t.root.is_dir()]


def _prune_tmp(tier: Tier, dry_run: bool, report: dict, only_dead: bool = True) -> None:
    try:
        names = os.listdir(tier.tmp_dir)
    except OSError:
        return
    now = time.time()
    for name in names:
        path = tier.tmp_dir / name
        parsed = _fsutil.parse_unique_name(name)
        age = now - _fsutil.dir_mtime(path)
        remove = False
        why = ""
        if parsed and _DIGEST_RE.match(parsed[0]):
            lock = tier.locks_dir / f"{parsed[0]}.lock"
            fd = _lock_nb(lock, create=False) if lock.exists() else -1
            if fd is not None:
                remove, why = True, "its build lock is free (builder died)"
                if fd >= 0:
                    os.close(fd)
        elif parsed:
            _, host, pid = parsed
            if host == _fsutil.HOST and not _fsutil.pid_alive(pid):
                remove, why = True, f"pid {pid} is gone"
            elif host != _fsutil.HOST and age > FOREIGN_TMP_MAX_AGE_S:
                remove, why = True, f"left by host {host} {age / 3600:.0f} h ago"
        elif age > FOREIGN_TMP_MAX_AGE_S:
            remove, why = True, "unrecognized, older than a day"
        if remove:
            report["tmp"].append(f"{path} ({why})")
            if not dry_run:
                _fsutil.remove_tree(path)


def _prune_import_leftovers(tier: Tier, dry_run: bool, report: dict) -> None:
    """Staging dirs of imports that died (``tiers/.import-*``) and the import trash."""
    tiers_dir = tier.root / "tiers"
    try:
        names = os.listdir(tiers_dir)
    except OSError:
        return
    for name in names:
        path = tiers_dir / name
        parsed = _fsutil.parse_unique_name(name)
        dead = parsed is not None and parsed[1] == _fsutil.HOST and not _fsutil.pid_alive(parsed[2])
        if name == ".trash" or (name.startswith(".import-") and dead):
            report["tmp"].append(f"{path} (import leftovers)")
            if not dry_run:
                _fsutil.remove_tree(path)


def _prune_locks(tier: Tier, dry_run: bool, report: dict) -> None:
    # Unlinking an unheld lock file is safe for correctness even if a process opens the old inode meanwhile and
    # another creates a new one: both may then build, but publication is an atomic rename that the loser skips.
    try:
        names = os.listdir(tier.locks_dir)
    except OSError:
        return
    for name in names:
        path = tier.locks_dir / name
        if name.endswith(".lock"):
            fd = _lock_nb(path, create=False)
            if fd is None:
                continue  # held: a build is running
            try:
                holder = path.with_suffix(".holder")
                if holder.exists():
                    report["locks"].append(f"{holder} (holder record of a dead builder)")
                    if not dry_run:
                        holder.unlink(missing_ok=True)
                report["locks"].append(f"{path} (not held)")
                if not dry_run:
                    path.unlink(missing_ok=True)
            finally:
                os.close(fd)
        elif name.endswith(".holder") and not path.with_suffix(".lock").exists():
            report["locks"].append(f"{path} (holder record without lock)")
            if not dry_run:
                path.unlink(missing_ok=True)


def _prune_pins(tier: Tier, dry_run: bool, report: dict) -> None:
    try:
        names = os.listdir(tier.pins_dir)
    except OSError:
        return
    for name in names:
        digest = name.removesuffix(".pin")
        if tier.entry_dir(digest).exists():
            continue
        fd = _lock_nb(tier.pins_dir / name, create=False)
        if fd is None:
            continue
        try:
            report["pins"].append(str(tier.pins_dir / name))
            if not dry_run:
                (tier.pins_dir / name).unlink(missing_ok=True)
        finally:
            os.close(fd)


def prune(store: Store, *, dry_run: bool = False) -> dict:
    """Remove dead builders' temp dirs, unheld locks, pin files of gone entries, the quarantine, entries of other
    schema versions or with broken manifests (unless pinned), and enforce MSA_CACHE_MAX_BYTES."""
    report: dict[str, list] = {"tmp": [], "locks": [], "pins": [], "quarantine": [], "entries": [], "evicted": []}
    for tier in _writable_tiers(store):
        _prune_tmp(tier, dry_run, report)
        _prune_import_leftovers(tier, dry_run, report)
        try:
            for name in sorted(os.listdir(tier.quarantine_dir)):
                report["quarantine"].append(str(tier.quarantine_dir / name))
                if not dry_run:
                    _fsutil.remove_tree(tier.quarantine_dir / name)
        except OSError:
            pass
        for e in list(store.iter_entries([tier])):
            problems = e.meta.get("problems")
            if problems:
                if dry_run or try_remove_entry(tier, e.digest):
                    report["entries"].append(f"{e.path} ({'; '.join(problems)})")
        _prune_locks(tier, dry_run, report)
        _prune_pins(tier, dry_run, report)
        if store.max_bytes is not None and not dry_run:
            report["evicted"] = enforce_cap(store, tier, store.max_bytes)
    store._hot.clear()
    return report


def clear(store: Store, *, imported: bool = False) -> dict:
    """Remove every unpinned entry of the writable tiers, the quarantine, temp dirs of dead builders and the
    stats; with ``imported=True`` also every tier registered by ``msa-cache import`` (deleting only those
    extracted under the local tier; others are just unregistered)."""
    report: dict[str, list] = {"removed": [], "pinned": [], "imported": []}
    for tier in _writable_tiers(store):
        for e in list(store.iter_entries([tier])):
            if try_remove_entry(tier, e.digest):
                report["removed"].append(e.digest)
            else:
                report["pinned"].append(f"{e.meta.get('name')} ({e.digest[:12]})")
        _fsutil.remove_tree(tier.quarantine_dir)
        scratch = {"tmp": [], "locks": [], "pins": []}
        _prune_tmp(tier, False, scratch)
        _prune_locks(tier, False, scratch)
        _prune_pins(tier, False, scratch)
        for p in (tier.stats_path, tier.toolchains_path):
            p.unlink(missing_ok=True)
    if imported:
        local_real = os.path.realpath(store.local.root)
        records = read_registered(store.local.root)
        for rec in records:
            path = Path(rec["path"])
            if os.path.realpath(path).startswith(local_real + os.sep):
                _fsutil.remove_tree(path)
                report["imported"].append(f"{path} (deleted)")
            else:
                report["imported"].append(f"{path} (unregistered; not under the local tier, left on disk)")
        if records:
            update_registered(store.local.root, remove_ids={r.get("id") for r in records})
        store.reload_tiers()
    store._hot.clear()
    store._stats = _stats.Stats()
    return report
