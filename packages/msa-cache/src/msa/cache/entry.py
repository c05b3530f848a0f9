"""Entry: one published artifact directory, its manifest, pins and loading."""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from msa.cache import _fsutil
from msa.cache.errors import CacheError

if TYPE_CHECKING:
    from msa.cache.tiers import Tier

log = logging.getLogger("msa.cache")

__all__ = ["Entry", "Pin", "check_files"]

# Pins held until the process exits (Entry.pin_for_process / Entry.load); closing the fd drops the flock.
_PROCESS_PINS: dict[str, Pin] = {}
_PROCESS_PINS_LOCK = threading.Lock()
_LOADED: dict[tuple[str, str], Any] = {}
_LOADED_LOCK = threading.Lock()
_WARNED_PIN_DIRS: set[str] = set()


class Entry:
    """A published entry. ``path`` is its directory; ``files`` maps manifest names to paths; ``meta`` is the
    manifest (name, stage, kind, arch, key document, file hashes, build time, compile seconds)."""

    __slots__ = ("path", "tier", "meta", "_files", "manifest_ino")

    def __init__(self, path: Path, tier: Tier, meta: dict, manifest_ino: int = 0):
        self.path = Path(path)
        self.tier = tier
        self.meta = meta
        self.manifest_ino = manifest_ino
        self._files: dict[str, Path] | None = None

    # --- descriptive properties --------------------------------------------------------------------------------
    @property
    def digest(self) -> str:
        return self.meta["digest"]

    @property
    def name(self) -> str:
        return self.meta.get("name", "?")

    @property
    def stage(self) -> str:
        return self.meta.get("stage", "?")

    @property
    def kind(self) -> str:
        return self.meta.get("kind", self.stage)

    @property
    def arch(self):
        return self.meta.get("arch")

    @property
    def size(self) -> int:
        return int(self.meta.get("total_bytes", 0))

    @property
    def read_only(self) -> bool:
        return not self.tier.writable

    @property
    def ingredients(self) -> dict:
        return self.meta.get("key", {}).get("ingredients", {})

    @property
    def files(self) -> dict[str, Path]:
        if self._files is None:
            self._files = {name: self.path / name for name in self.meta.get("files", {})}
        return self._files

    def file(self, name: str) -> Path:
        """Path of the artifact file ``name`` (as written by the builder, relative to its temp dir)."""
        try:
            return self.files[name]
        except KeyError:
            raise KeyError(
                f"entry {self.name!r} ({self.digest[:12]}) has no file {name!r}; it has: {sorted(self.files)}"
            ) from None

    def __repr__(self) -> str:
        return f"Entry({self.name!r}, stage={self.stage}, digest={self.digest[:12]}, path={str(self.path)!r})"

    # --- pinning -----------------------------------------------------------------------------------------------
    def pin(self) -> Pin:
        """Protect the entry from eviction while the returned pin is held (use as a context manager)."""
        return Pin(self)

    def pin_for_process(self) -> Pin:
        """Pin until this process exits (the flock vanishes with the process, so a crash leaves no pin)."""
        with _PROCESS_PINS_LOCK:
            pin = _PROCESS_PINS.get(str(self.path))
            if pin is None or not pin.held:
                pin = Pin(self)
                _PROCESS_PINS[str(self.path)] = pin
            return pin

    def load(self):
        """Load the entry with the loader registered for its kind (cached per process; pins the entry)."""
        from msa.cache.loaders import get_loader

        cache_key = (self.digest, str(self.path))
        with _LOADED_LOCK:
            if cache_key in _LOADED:
                return _LOADED[cache_key]
        loader = get_loader(self.kind)
        if loader is None:
            raise CacheError(
                f"no loader registered for kind {self.kind!r} (entry {self.name!r}, {self.digest[:12]}); register "
                "one with msa.cache.register_loader(kind, fn) or the 'msa.cache.loaders' entry-point group"
            )
        self.pin_for_process()
        obj = loader(self)
        with _LOADED_LOCK:
            _LOADED.setdefault(cache_key, obj)
            return _LOADED[cache_key]


class Pin:
    """A shared flock on ``<tier>/pins/<digest>.pin``. Eviction takes an exclusive, non-blocking flock on the same
    file, so a pinned entry is never evicted and a dead process's pins vanish with it. Pins on read-only tiers
    are no-ops (nothing ever evicts them)."""

    def __init__(self, entry: Entry):
        self.entry = entry
        self._fd: int | None = None
        tier = entry.tier
        if not tier.writable:
            return
        import fcntl

        pin_path = tier.pins_dir / f"{entry.digest}.pin"
        try:
            tier.pins_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(pin_path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            key = str(tier.pins_dir)
            if key not in _WARNED_PIN_DIRS:
                _WARNED_PIN_DIRS.add(key)
                log.warning("msa-cache: cannot create pin files in %s (%s); entries there are not pinned", key, e)
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)  # an evictor holds LOCK_EX only for one rename
            st = os.stat(entry.path / "manifest.json")
        except OSError:
            os.close(fd)
            raise CacheError(
                f"entry {entry.name!r} ({entry.digest[:12]}) was evicted or removed from {entry.path} before it "
                "could be pinned; look it up again (store.get_or_build rebuilds it)"
            ) from None
        if entry.manifest_ino and st.st_ino != entry.manifest_ino:
            os.close(fd)
            raise CacheError(
                f"entry {entry.name!r} ({entry.digest[:12]}) was replaced at {entry.path} before it could be "
                "pinned; look it up again"
            )
        self._fd = fd

    @property
    def held(self) -> bool:
        return self._fd is not None or self.entry.read_only

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)

    def __enter__(self) -> Entry:
        return self.entry

    def __exit__(self, *exc) -> None:
        self.release()

    def __del__(self):
        try:
            self.release()
        except Exception:
            pass


def check_files(path: Path, meta: dict) -> list[str]:
    """Integrity problems of an entry directory against its manifest (empty list = intact)."""
    problems = []
    files = meta.get("files")
    if not isinstance(files, dict) or not files:
        return ["manifest lists no files"]
    for name, info in sorted(files.items()):
        p = path / name
        try:
            sha, size = _fsutil.sha256_file(p)
        except FileNotFoundError:
            problems.append(f"{name}: missing")
            continue
        except OSError as e:
            problems.append(f"{name}: unreadable ({e})")
            continue
        if size != info.get("size"):
            problems.append(f"{name}: size {size} != recorded {info.get('size')}")
        elif sha != info.get("sha256"):
            problems.append(f"{name}: sha256 {sha[:16]}... != recorded {str(info.get('sha256'))[:16]}...")
    return problems
