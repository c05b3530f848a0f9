"""The Store: look up, build (once, under a per-key lock) and publish (atomically) content-addressed entries.

Search order: read-only shared tiers (``MSA_CACHE_PATH``), tiers registered by ``msa-cache import``, then the
local writable tier (``MSA_CACHE_DIR`` or the platform user cache dir). Builds always go to the local tier (or,
with ``MSA_CACHE_ALLOW_TMP=1``, to a temp-dir tier when the local one cannot be written).
"""

from __future__ import annotations

import atexit
import errno
import json
import logging
import os
import platform
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path

from msa.cache import _fsutil, _publish
from msa.cache import stats as _stats
from msa.cache.entry import Entry, check_files
from msa.cache.errors import (
    CacheError,
    CacheMissError,
    CacheUnwritableError,
    LockTimeoutError,
    ToolchainUnavailableError,
)
from msa.cache.keys import SCHEMA_VERSION, CacheKey, KeyRef, make_key
from msa.cache.tiers import (
    Tier,
    default_local_dir,
    read_registered,
    split_path_list,
    tmp_fallback_dir,
    unwritable_error,
)

__all__ = ["Store", "StoreConfig", "get_store"]

log = logging.getLogger("msa.cache")

_VERIFY_MODES = ("first", "always", "never")
_PUBLISH_ERRNOS = _fsutil.FULL_ERRNOS | {errno.EACCES, errno.EPERM, errno.EROFS}
_TOOLCHAIN_HISTORY = 8
_LIVE_STORES: weakref.WeakSet = weakref.WeakSet()


def _parse_bool(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{name} must be 0 or 1 (or true/false), got {raw!r}")


def _parse_seconds(env: Mapping[str, str], name: str, default: float) -> float:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        return float(raw)
    except ValueError:
        raise ValueError(f"{name} must be a number of seconds (negative = wait forever), got {raw!r}") from None


_SIZE_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(raw: str | None, name: str = "MSA_CACHE_MAX_BYTES") -> int | None:
    """'0'/'' -> None (no cap); '500000', '800M', '10G', '1.5GiB' -> bytes."""
    if raw is None or raw.strip() in ("", "0"):
        return None
    text = raw.strip().upper().removesuffix("IB").removesuffix("B")
    unit = text[-1] if text and text[-1] in _SIZE_UNITS else ""
    number = text[: -len(unit)] if unit else text
    try:
        value = int(float(number) * _SIZE_UNITS[unit])
    except ValueError:
        raise ValueError(f"{name} must be a size like 500000, 800M or 10G, got {raw!r}") from None
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {raw!r}")
    return value


class StoreConfig:
    """Settings read from the environment (see the README's table)."""

    def __init__(self, env: Mapping[str, str] | None = None):
        env = os.environ if env is None else env
        local = env.get("MSA_CACHE_DIR")
        self.local_dir = Path(local).expanduser() if local else default_local_dir()
        self.shared_dirs = split_path_list(env.get("MSA_CACHE_PATH"))
        self.jit = _parse_bool(env, "MSA_JIT", True)
        self.lock_timeout = _parse_seconds(env, "MSA_CACHE_LOCK_TIMEOUT", 600.0)
        self.max_bytes = parse_size(env.get("MSA_CACHE_MAX_BYTES"))
        self.allow_tmp = _parse_bool(env, "MSA_CACHE_ALLOW_TMP", False)
        self.verify = (env.get("MSA_CACHE_VERIFY") or "first").strip().lower()
        if self.verify not in _VERIFY_MODES:
            raise ValueError(f"MSA_CACHE_VERIFY must be one of {', '.join(_VERIFY_MODES)}, got {self.verify!r}")


class Store:
    """See the module docstring. Thread-safe; one per process via :func:`get_store`."""

    def __init__(
        self,
        local_dir: str | os.PathLike | None = None,
        shared_dirs: Iterable[str | os.PathLike] = (),
        *,
        jit: bool = True,
        lock_timeout: float = 600.0,
        max_bytes: int | None = None,
        allow_tmp: bool = False,
        verify: str = "first",
        use_registered_tiers: bool = True,
    ):
        if verify not in _VERIFY_MODES:
            raise ValueError(f"verify must be one of {', '.join(_VERIFY_MODES)}, got {verify!r}")
        self.local = Tier(Path(local_dir) if local_dir else default_local_dir(), True, "local")
        local_real = os.path.realpath(self.local.root)
        self.shared = [
            Tier(Path(p), False, "MSA_CACHE_PATH") for p in shared_dirs if os.path.realpath(p) != local_real
        ]
        self.jit = jit
        self.lock_timeout = lock_timeout
        self.max_bytes = max_bytes
        self.allow_tmp = allow_tmp
        self.verify = verify
        self.use_registered_tiers = use_registered_tiers
        self.fallback = Tier(tmp_fallback_dir(), True, "tmp-fallback") if allow_tmp else None
        self._fallback_active = False
        self.imported: list[Tier] = []
        self._hot: dict[str, tuple[Entry, str]] = {}
        self._verified: set[tuple[str, int, int]] = set()
        self._bad_readonly: set[tuple[str, str]] = set()
        self._warned: set[str] = set()
        self._toolchains: dict[str, dict] = {}
        self._lock = threading.RLock()
        self._stats = _stats.Stats()
        #: This process's counters (warmup uses deltas to tell "built" from "already present").
        self.counters = {"hits": 0, "misses": 0, "builds": 0, "compile_seconds": 0.0}
        self.reload_tiers()
        _LIVE_STORES.add(self)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Store:
        cfg = StoreConfig(env)
        return cls(
            cfg.local_dir,
            cfg.shared_dirs,
            jit=cfg.jit,
            lock_timeout=cfg.lock_timeout,
            max_bytes=cfg.max_bytes,
            allow_tmp=cfg.allow_tmp,
            verify=cfg.verify,
        )

    def __repr__(self) -> str:
        return f"Store(local={str(self.local.root)!r}, tiers={len(self.tiers)}, jit={self.jit})"

    # --- tiers -------------------------------------------------------------------------------------------------
    def reload_tiers(self) -> None:
        """Re-read the tiers registered by ``msa-cache import`` (<local>/tiers.json)."""
        imported = []
        if self.use_registered_tiers:
            seen = {os.path.realpath(t.root) for t in self.shared} | {os.path.realpath(self.local.root)}
            for rec in read_registered(self.local.root):
                path = Path(rec["path"])
                real = os.path.realpath(path)
                if real in seen:
                    continue
                seen.add(real)
                if not (path / "entries").is_dir() and not (path / "runtime").is_dir():
                    log.debug("msa-cache: registered tier %s is gone; skipping it", path)
                    continue
                imported.append(Tier(path, False, f"imported:{rec.get('id', '?')}"))
        with self._lock:
            self.imported = imported
            self._hot.clear()

    @property
    def tiers(self) -> list[Tier]:
        """Search order: MSA_CACHE_PATH tiers, imported tiers, local tier, temp fallback (if enabled and present)."""
        out = [*self.shared, *self.imported, self.local]
        if self.fallback is not None and (self._fallback_active or self.fallback.entries_dir.is_dir()):
            out.append(self.fallback)
        return out

    @property
    def writable_tier(self) -> Tier:
        return self.fallback if self._fallback_active and self.fallback is not None else self.local

    # --- keys --------------------------------------------------------------------------------------------------
    def key(
        self,
        *,
        stage: str,
        name: str,
        ingredients: dict,
        python_abi_specific: bool = False,
        kind: str | None = None,
        host: str | None | bool = True,
    ) -> CacheKey:
        """Content address of an artifact; see :func:`msa.cache.keys.make_key`."""
        return make_key(
            stage=stage, name=name, ingredients=ingredients, python_abi_specific=python_abi_specific, kind=kind,
            host=host,
        )

    # --- lookup ------------------------------------------------------------------------------------------------
    def lookup(self, key: CacheKey, *, pin: bool = False) -> Entry | None:
        """The entry for ``key`` from the first tier that has an intact copy, or None. After an entry's first
        (hash-checked) use in this process a hit costs one ``stat``."""
        digest = key.digest
        hot = self._hot.get(digest)
        if hot is not None and self.verify != "always":
            entry, manifest_path = hot
            try:
                ino = os.stat(manifest_path).st_ino
            except OSError:
                ino = -1
            if ino == entry.manifest_ino and (not pin or self._try_pin(entry)):
                self._count_hit(entry)
                return entry
            self._hot.pop(digest, None)
        for _attempt in range(2):
            entry = self._search(digest, key=key)
            if entry is None:
                break
            if not pin or self._try_pin(entry):
                self._count_hit(entry)
                return entry
        self.counters["misses"] += 1
        self._stats.add("misses")
        return None

    def _try_pin(self, entry: Entry) -> bool:
        try:
            entry.pin_for_process()
            return True
        except CacheError:
            self._hot.pop(entry.digest, None)
            return False

    def _count_hit(self, entry: Entry) -> None:
        self.counters["hits"] += 1
        self._stats.add("shared_hits" if entry.read_only else "hits")
        if self._stats.due():
            self.flush_stats()

    def _search(self, digest: str, *, locked: bool = False, key: CacheKey | None = None) -> Entry | None:
        for tier in self.tiers:
            entry = self._open(tier, digest, locked=locked, key=key)
            if entry is not None:
                self._hot[digest] = (entry, str(tier.manifest_path(digest)))
                return entry
        return None

    def _open(
        self, tier: Tier, digest: str, *, locked: bool = False, check: bool = True, key: CacheKey | None = None
    ) -> Entry | None:
        if (str(tier.root), digest) in self._bad_readonly:
            return None
        manifest_path = tier.manifest_path(digest)
        try:
            fd = os.open(manifest_path, os.O_RDONLY)
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as e:
            self._warn_once(f"open:{tier.root}", f"msa-cache: cannot read tier {tier.root} ({e}); skipping it")
            return None
        try:
            st = os.fstat(fd)
            raw = b""
            while chunk := os.read(fd, 1 << 16):
                raw += chunk
        finally:
            os.close(fd)
        meta, problems = _parse_manifest(raw, digest)
        entry = Entry(tier.entry_dir(digest), tier, meta, st.st_ino)
        if not problems and check and self.verify != "never":
            stamp = (str(manifest_path), st.st_ino, st.st_mtime_ns)
            if self.verify == "always" or stamp not in self._verified:
                problems = check_files(entry.path, meta)
                if not problems:
                    self._verified.add(stamp)
        if problems:
            self._handle_corrupt(entry, problems, locked=locked, key=key)
            return None
        if tier.writable:
            try:
                os.utime(entry.path)  # directory mtime = last use, for LRU eviction
            except OSError:
                pass
        return entry

    # --- integrity ---------------------------------------------------------------------------------------------
    def _handle_corrupt(self, entry: Entry, problems: list[str], *, locked: bool, key: CacheKey | None) -> None:
        tier, digest = entry.tier, entry.digest
        name = key.name if key is not None else entry.meta.get("name", "?")
        summary = "; ".join(problems[:4]) + (f"; ... ({len(problems)} problems)" if len(problems) > 4 else "")
        if not tier.writable:
            self._bad_readonly.add((str(tier.root), digest))
            log.warning(
                "msa-cache: entry %r (%s) in read-only tier %s failed its integrity check (%s); ignoring that copy "
                "(read-only tiers are never modified; re-import the bundle or repair the tier, `msa-cache verify` "
                "lists every such entry)",
                name, digest[:12], tier.root, summary,
            )
            return
        ref = key if key is not None else KeyRef(digest, name, entry.meta.get("stage", "?"))
        from msa.cache.locks import KeyLock

        lock = None
        if not locked:
            lock = KeyLock(tier, ref, self.lock_timeout)
            try:
                lock.acquire()
            except (LockTimeoutError, CacheUnwritableError) as e:
                log.warning("msa-cache: entry %s is corrupt (%s) but cannot be quarantined: %s", ref, summary, e)
                return
        try:
            try:
                current = os.stat(tier.manifest_path(digest)).st_ino
            except OSError:
                current = None
            if entry.manifest_ino and current is not None and current != entry.manifest_ino:
                return  # replaced by a fresh publication meanwhile; the next lookup checks that one
            if current is None and not entry.path.exists():
                return  # already quarantined by someone else
            target = quarantine(tier, digest, {"name": name, "problems": problems})
            self._stats.add("quarantined")
            log.warning(
                "msa-cache: entry %s in %s failed its integrity check (%s); moved it to %s; it will be rebuilt",
                ref, tier.root, summary, target,
            )
        except OSError as e:
            log.warning("msa-cache: entry %s is corrupt (%s) and could not be quarantined: %s", ref, summary, e)
        finally:
            if lock is not None:
                lock.release()

    # --- build -------------------------------------------------------------------------------------------------
    def get_or_build(
        self,
        key: CacheKey,
        builder: Callable[[Path], dict | None],
        *,
        warmup_hint: str | None = None,
        pin: bool = False,
        depends: Iterable[Entry | CacheKey | str] = (),
    ) -> Entry:
        """Return the entry for ``key``, building it with ``builder(tmpdir)`` if no tier has it.

        Double-checked under a per-key file lock, so concurrent callers (threads, processes, ranks) build once.
        ``builder`` writes the artifact files into ``tmpdir`` and may return a JSON-able dict stored as
        ``meta["extra"]`` (e.g. ``{"main": "x.so"}``). With ``MSA_JIT=0`` a miss raises :class:`CacheMissError`
        naming the key and ``warmup_hint``. ``pin=True`` pins the entry for the rest of the process.
        """
        entry = self.lookup(key, pin=pin)
        if entry is not None:
            return entry
        if not self.jit:
            raise CacheMissError(key, warmup_hint, [t.root for t in self.tiers])
        tier = self._build_tier()
        try:
            return self._build(tier, key, builder, pin=pin, depends=depends)
        except CacheUnwritableError as e:
            if self.fallback is None or tier is self.fallback:
                raise
            log.warning("msa-cache: %s\nMSA_CACHE_ALLOW_TMP=1: building into %s instead", e, self.fallback.root)
            return self._build(self._activate_fallback(), key, builder, pin=pin, depends=depends)

    def _build_tier(self) -> Tier:
        if self._fallback_active and self.fallback is not None:
            return self.fallback
        try:
            self.local.ensure_writable()
            return self.local
        except CacheUnwritableError as e:
            if self.fallback is None:
                raise
            log.warning("msa-cache: %s\nMSA_CACHE_ALLOW_TMP=1: building into %s instead", e, self.fallback.root)
            return self._activate_fallback()

    def _activate_fallback(self) -> Tier:
        assert self.fallback is not None
        self.fallback.ensure_writable()
        self._fallback_active = True
        return self.fallback

    def _build(self, tier: Tier, key: CacheKey, builder, *, pin: bool, depends) -> Entry:
        from msa.cache.locks import KeyLock, remove_orphan_temps

        tier.ensure_writable()
        lock = KeyLock(tier, key, self.lock_timeout)
        previous = lock.acquire()
        try:
            removed = remove_orphan_temps(tier, key.digest)
            if removed and previous is None:
                log.info("msa-cache: removed %d leftover temp dir(s) of %s", len(removed), key)
            entry = self._search(key.digest, locked=True, key=key)
            if entry is None:
                entry = self._build_locked(tier, key, builder, depends)
            if pin:
                entry.pin_for_process()
        finally:
            lock.release()
        self.flush_stats()
        if self.max_bytes is not None and tier.writable:
            from msa.cache.maintenance import enforce_cap

            enforce_cap(self, tier, self.max_bytes, protect={key.digest})
        return entry

    def _build_locked(self, tier: Tier, key: CacheKey, builder, depends) -> Entry:
        tmp = tier.tmp_dir / _fsutil.unique_name(key.digest)
        try:
            os.mkdir(tmp)
        except OSError as e:
            raise unwritable_error(tier, e, f"creating a build directory for {key}") from e
        started = time.time()
        t0 = time.perf_counter()
        final = tier.entry_dir(key.digest)
        try:
            try:
                extra = builder(tmp)
            except OSError as e:
                if e.errno in _fsutil.FULL_ERRNOS:
                    raise unwritable_error(tier, e, f"building {key}") from e
                raise
            compile_seconds = time.perf_counter() - t0
            if extra is not None and not isinstance(extra, dict):
                raise CacheError(f"builder of {key} must return None or a dict, got {type(extra).__name__}")
            try:
                files = _publish.stage_files(tmp)
                manifest = {
                    "schema": SCHEMA_VERSION,
                    "digest": key.digest,
                    "name": key.name,
                    "stage": key.stage,
                    "kind": key.kind,
                    "arch": key.arch,
                    "key": key.document,
                    "files": files,
                    "total_bytes": sum(f["size"] for f in files.values()),
                    "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
                    "built_at_unix": started,
                    "compile_seconds": round(compile_seconds, 6),
                    "built_by": {
                        "host": _fsutil.HOST,
                        "pid": os.getpid(),
                        "python": platform.python_version(),
                        "msa_cache": _version(),
                    },
                    "depends": [_digest_of(d) for d in depends],
                    "extra": json.loads(json.dumps(extra or {})),
                }
                _publish.write_manifest(tmp, manifest)
                committed = _publish.commit(tmp, final)
                if not committed:
                    existing = self._search(key.digest, locked=True, key=key)
                    if existing is not None:
                        _fsutil.remove_tree(tmp)
                        return existing
                    # A directory without a valid manifest squats on the entry path: move it aside, retry once.
                    quarantine(tier, key.digest, {"name": key.name, "problems": ["entry directory without manifest"]})
                    if not _publish.commit(tmp, final):
                        raise CacheError(f"could not publish {key} at {final}: the path keeps reappearing")
            except OSError as e:
                if e.errno in _PUBLISH_ERRNOS:
                    raise unwritable_error(tier, e, f"publishing {key}") from e
                raise
        except BaseException as e:
            _fsutil.remove_tree(tmp)
            self._stats.add("build_failures")
            if isinstance(e, Exception) and not isinstance(e, CacheError) and hasattr(e, "add_note"):
                e.add_note(f"msa-cache: raised by the builder of {key}")
            raise
        st = os.stat(final / _publish.MANIFEST)
        self._verified.add((str(tier.manifest_path(key.digest)), st.st_ino, st.st_mtime_ns))
        self.counters["builds"] += 1
        self.counters["compile_seconds"] += compile_seconds
        self._stats.add("builds")
        self._stats.add("compile_seconds", compile_seconds)
        entry = self._open(tier, key.digest, locked=True, key=key)
        if entry is None:  # pragma: no cover - only if someone deletes it between commit and here
            raise CacheError(f"entry {key} vanished right after it was published at {final}")
        self._hot[key.digest] = (entry, str(tier.manifest_path(key.digest)))
        log.info("msa-cache: built %s in %.2f s -> %s", key, compile_seconds, final)
        return entry

    # --- listing -----------------------------------------------------------------------------------------------
    def iter_entries(self, tiers: Iterable[Tier] | None = None) -> Iterator[Entry]:
        """Every entry of the given tiers (default: all), manifests parsed but not hash-checked. Entries whose
        manifest is unreadable are yielded with ``meta["problems"]`` set."""
        for tier in self.tiers if tiers is None else tiers:
            try:
                buckets = sorted(os.listdir(tier.entries_dir))
            except OSError:
                continue
            for bucket in buckets:
                try:
                    names = sorted(os.listdir(tier.entries_dir / bucket))
                except OSError:
                    continue
                for digest in names:
                    path = tier.entries_dir / bucket / digest
                    try:
                        st = os.stat(path / _publish.MANIFEST)
                        raw = (path / _publish.MANIFEST).read_bytes()
                    except OSError as e:
                        meta = {"digest": digest, "problems": [f"manifest.json unreadable: {e.strerror or e}"]}
                        yield Entry(path, tier, meta, 0)
                        continue
                    meta, problems = _parse_manifest(raw, digest)
                    if problems:
                        meta = dict(meta, problems=problems)
                    yield Entry(path, tier, meta, st.st_ino)

    def find(self, query: str) -> list[Entry]:
        """Entries whose digest starts with ``query`` or whose name equals it (``msa-cache info``)."""
        q = query.strip()
        out = []
        seen = set()
        for e in self.iter_entries():
            if (len(q) >= 4 and e.digest.startswith(q.lower())) or e.meta.get("name") == q:
                if (e.digest, str(e.tier.root)) not in seen:
                    seen.add((e.digest, str(e.tier.root)))
                    out.append(e)
        return out

    # --- toolchains ----------------------------------------------------------------------------------------------
    def toolchain(self, name: str, probe: Callable[[], dict | None] | None = None) -> dict:
        """Identity of toolchain ``name`` (e.g. ``"nvcc"``) to put into key ingredients.

        With MSA_JIT on: ``probe()`` (the tool installed here, recorded in the local tier so bundles can carry
        it), else the identity recorded by a tier. With MSA_JIT=0: the recorded identity first (a compiler-less
        node computes the same keys as the host that built its bundle), else ``probe()``.
        Raises :class:`ToolchainUnavailableError` if neither exists. Cached per process.
        """
        with self._lock:
            if name in self._toolchains:
                return self._toolchains[name]
        order = ("probe", "recorded") if self.jit else ("recorded", "probe")
        identity = None
        for source in order:
            if source == "probe" and probe is not None:
                identity = probe()
                if identity is not None:
                    self._record_toolchain(name, identity)
            elif source == "recorded":
                identity = self.recorded_toolchain(name)
            if identity is not None:
                break
        if identity is None:
            raise ToolchainUnavailableError(
                f"msa-cache: toolchain {name!r} is not installed here and no cache tier records which {name} built "
                f"its entries; install {name}, or import a bundle made with `msa-cache bundle` on the build host"
            )
        with self._lock:
            self._toolchains[name] = identity
        return identity

    def recorded_toolchain(self, name: str) -> dict | None:
        for tier in self.tiers:
            records = _read_toolchains(tier.toolchains_path)
            history = records.get(name)
            if isinstance(history, list) and history and isinstance(history[0], dict):
                return history[0]
        return None

    def _record_toolchain(self, name: str, identity: dict) -> None:
        tier = self.writable_tier
        records = _read_toolchains(tier.toolchains_path)
        history = records.get(name) if isinstance(records.get(name), list) else []
        if history and history[0] == identity:
            return
        try:
            import fcntl

            tier.root.mkdir(parents=True, exist_ok=True)
            fd = os.open(tier.root / "toolchains.lock", os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                records = _read_toolchains(tier.toolchains_path)
                history = [h for h in records.get(name, []) if h != identity] if isinstance(records.get(name), list) else []
                records[name] = [identity, *history][:_TOOLCHAIN_HISTORY]
                _fsutil.atomic_write_json(tier.toolchains_path, records, durable=False)
            finally:
                os.close(fd)
        except OSError as e:
            self._warn_once(f"toolchain:{tier.root}", f"msa-cache: cannot record toolchain {name} in {tier.root}: {e}")

    # --- stats -------------------------------------------------------------------------------------------------
    def flush_stats(self) -> None:
        self._stats.flush(self.writable_tier.stats_path)

    def _warn_once(self, token: str, message: str) -> None:
        if token not in self._warned:
            self._warned.add(token)
            log.warning("%s", message)


# --- module helpers ------------------------------------------------------------------------------------------


def _parse_manifest(raw: bytes, digest: str) -> tuple[dict, list[str]]:
    try:
        meta = json.loads(raw)
    except ValueError as e:
        return {"digest": digest}, [f"manifest.json is not valid JSON ({e})"]
    if not isinstance(meta, dict):
        return {"digest": digest}, ["manifest.json is not an object"]
    problems = []
    if meta.get("digest") != digest:
        problems.append(f"manifest digest {str(meta.get('digest'))[:12]} != directory {digest[:12]}")
    if meta.get("schema") != SCHEMA_VERSION:
        problems.append(f"manifest schema {meta.get('schema')!r} != {SCHEMA_VERSION}")
    files = meta.get("files")
    if not isinstance(files, dict) or not files:
        problems.append("manifest lists no files")
    else:
        for name in files:
            if not isinstance(name, str) or name.startswith("/") or ".." in name.split("/"):
                problems.append(f"manifest file name {name!r} is not a safe relative path")
    if problems:  # describe the entry by where it lives, not by what its damaged manifest claims
        meta = dict(meta, digest=digest)
    return meta, problems


def quarantine(tier: Tier, digest: str, reason: dict) -> Path:
    """Move an entry directory to <tier>/quarantine/ (atomic rename) with a reason.json; returns the new path."""
    tier.quarantine_dir.mkdir(parents=True, exist_ok=True)
    target = tier.quarantine_dir / _fsutil.unique_name(digest)
    os.rename(tier.entry_dir(digest), target)
    try:
        os.chmod(target, 0o755)
        (target / "reason.json").write_text(json.dumps(dict(reason, digest=digest, when=time.time()), indent=1))
    except OSError:
        pass
    return target


def _read_toolchains(path: Path) -> dict:
    try:
        data = _fsutil.read_json(path)
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _digest_of(dep) -> str:
    if isinstance(dep, str):
        return dep
    return dep.digest


def _version() -> str:
    from msa.cache import __version__

    return __version__


# --- process-wide store ----------------------------------------------------------------------------------------

_STORE: Store | None = None
_STORE_LOCK = threading.Lock()


def get_store(refresh: bool = False) -> Store:
    """The process-wide :class:`Store` built from the environment; ``refresh=True`` re-reads the environment."""
    global _STORE
    store = _STORE
    if store is not None and not refresh:
        return store
    with _STORE_LOCK:
        if _STORE is None or refresh:
            if _STORE is not None:
                _STORE.flush_stats()
            _STORE = Store.from_env()
        return _STORE


@atexit.register
def _flush_all_stats() -> None:
    for store in list(_LIVE_STORES):
        try:
            store.flush_stats()
        except Exception:
            pass
