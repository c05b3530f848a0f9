"""Tiers: directories that hold entries. Read-only shared tiers are searched first, the local tier last.

Layout of a tier root::

    entries/<dd>/<digest>/{<artifact files>, manifest.json}   # manifest.json = commit marker, written last
    tmp/        builds in progress and things being deleted (<digest>.<host>.<pid>.<rand>)
    locks/      <digest>.lock (flock) and <digest>.holder (pid, host, start of the current builder)
    pins/       <digest>.pin (shared flocks of processes using the entry; eviction needs an exclusive one)
    quarantine/ entries that failed their integrity check, with reason.json
    runtime/    runtime libraries shipped by a bundle (imported tiers only)
    stats.json  hits / misses / builds / compile seconds (local tier)
    tiers.json  tiers registered by ``msa-cache import`` (local tier)
    toolchains.json  toolchain identities used by builds here (lets a compiler-less node compute keys)
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from msa.cache import _fsutil
from msa.cache.errors import CacheUnwritableError

log = logging.getLogger("msa.cache")

_CACHEDIR_TAG = (
    "Signature: 8a477f597d28d172789f06886806bc55\n"
    "# This directory is a cache made by msa-cache (https://bford.info/cachedir/).\n"
)


@dataclass(eq=False)
class Tier:
    root: Path
    writable: bool
    origin: str  # "local", "MSA_CACHE_PATH", "imported:<bundle-id>", "tmp-fallback"

    def __post_init__(self):
        self.root = Path(self.root)
        self.entries_dir = self.root / "entries"
        self.tmp_dir = self.root / "tmp"
        self.locks_dir = self.root / "locks"
        self.pins_dir = self.root / "pins"
        self.quarantine_dir = self.root / "quarantine"
        self.runtime_dir = self.root / "runtime"
        self.stats_path = self.root / "stats.json"
        self.tiers_path = self.root / "tiers.json"
        self.toolchains_path = self.root / "toolchains.json"
        self._ready = False

    def entry_dir(self, digest: str) -> Path:
        return self.entries_dir / digest[:2] / digest

    def manifest_path(self, digest: str) -> Path:
        return self.entries_dir / digest[:2] / digest / "manifest.json"

    def __repr__(self) -> str:
        return f"Tier({str(self.root)!r}, {'rw' if self.writable else 'ro'}, {self.origin})"

    def ensure_writable(self) -> None:
        """Create the tier's directories and prove a file can be written; raise CacheUnwritableError if not."""
        if self._ready:
            return
        if not self.writable:
            raise CacheUnwritableError(f"msa-cache: tier {self.root} ({self.origin}) is read-only by design")
        try:
            for d in (self.entries_dir, self.tmp_dir, self.locks_dir, self.pins_dir):
                d.mkdir(parents=True, exist_ok=True)
            probe = self.tmp_dir / _fsutil.unique_name("probe")
            with open(probe, "wb") as f:
                f.write(b"msa-cache write probe\n")
            os.unlink(probe)
            tag = self.root / "CACHEDIR.TAG"
            if not tag.exists():
                tag.write_text(_CACHEDIR_TAG)
        except OSError as e:
            raise unwritable_error(self, e, "preparing the local tier") from e
        self._ready = True


def unwritable_error(tier: Tier, exc: OSError, doing: str) -> CacheUnwritableError:
    full = exc.errno in _fsutil.FULL_ERRNOS
    what = "is full" if full else "cannot be written"
    err = CacheUnwritableError(
        f"msa-cache: the local cache tier {tier.root} {what} ({exc.strerror or exc}; errno {exc.errno}) while "
        f"{doing}. Fix: {'free space or set MSA_CACHE_MAX_BYTES, ' if full else ''}point MSA_CACHE_DIR at a "
        "writable directory on local disk, or set MSA_CACHE_ALLOW_TMP=1 to fall back to a temporary directory."
    )
    err.errno = exc.errno
    err.full = full
    err.tier = tier
    return err


def default_local_dir() -> Path:
    import platformdirs

    return Path(platformdirs.user_cache_dir("msa", appauthor=False))


def tmp_fallback_dir() -> Path:
    import tempfile

    uid = os.getuid() if hasattr(os, "getuid") else 0
    return Path(tempfile.gettempdir()) / f"msa-cache-{uid}"


# --- tiers registered by `msa-cache import` -------------------------------------------------------------------


def read_registered(local_root: Path) -> list[dict]:
    """Tier records from <local>/tiers.json (most recently imported first); [] if none or unreadable."""
    try:
        data = _fsutil.read_json(Path(local_root) / "tiers.json")
    except FileNotFoundError:
        return []
    except (OSError, ValueError) as e:
        log.warning("msa-cache: ignoring unreadable tier registry %s: %s", Path(local_root) / "tiers.json", e)
        return []
    tiers = data.get("tiers", []) if isinstance(data, dict) else []
    return [t for t in tiers if isinstance(t, dict) and isinstance(t.get("path"), str)]


def _registry_lock(local_root: Path):
    import fcntl

    local_root.mkdir(parents=True, exist_ok=True)
    fd = os.open(local_root / "tiers.lock", os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX)
    return fd


def update_registered(local_root: Path, *, add: dict | None = None, remove_ids: set[str] | None = None) -> list[dict]:
    """Add (or move to the front) / remove tier records, atomically and under a lock."""
    local_root = Path(local_root)
    try:
        fd = _registry_lock(local_root)
    except OSError as e:
        raise unwritable_error(Tier(local_root, True, "local"), e, "registering an imported tier") from e
    try:
        records = read_registered(local_root)
        if remove_ids:
            records = [r for r in records if r.get("id") not in remove_ids]
        if add is not None:
            records = [r for r in records if r.get("path") != add["path"] and r.get("id") != add.get("id")]
            records.insert(0, dict(add, registered_at=time.time()))
        try:
            _fsutil.atomic_write_json(local_root / "tiers.json", {"tiers": records})
        except OSError as e:
            raise unwritable_error(Tier(local_root, True, "local"), e, "writing the tier registry") from e
        return records
    finally:
        os.close(fd)


def split_path_list(value: str | None) -> list[Path]:
    if not value:
        return []
    return [Path(p).expanduser() for p in value.split(os.pathsep) if p.strip()]
