"""Bundles: one tar(.gz) with the entries for some archs plus the runtime libraries a node needs to load them.

Layout inside the archive (``bundle.json`` first, so an importer reads it before anything else)::

    bundle.json         format, bundle_id, archs, creation time, versions, entries[], runtime_files[], toolchains
    toolchains.json     toolchain identities used by the entries (a compiler-less node computes the same keys)
    entries/<dd>/<digest>/...   entries exactly as in a tier (manifest.json included)
    runtime/<name>      files from the ``msa.cache.runtime_files`` entry points (e.g. libcute_dsl_runtime.so)

``import`` extracts into ``<local tier>/tiers/<bundle_id>/`` (or ``--dest``), verifies every hash, and registers
the directory as a read-only tier in ``<local tier>/tiers.json``.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import platform
import re
import stat
import sys
import tarfile
import time
from pathlib import Path, PurePosixPath

from msa.cache import _fsutil, plugins
from msa.cache.entry import Entry, check_files
from msa.cache.errors import BundleError, CacheUnwritableError
from msa.cache.keys import SCHEMA_VERSION, canonical_json
from msa.cache.store import Store, _read_toolchains, get_store
from msa.cache.tiers import update_registered

__all__ = ["export_bundle", "import_bundle", "runtime_file", "collect_runtime_files"]

log = logging.getLogger("msa.cache")

BUNDLE_FORMAT = 1
_BUNDLE_ID_RE = re.compile(r"^msa-[0-9a-f]{16}$")
_TOP_LEVEL = {"bundle.json", "toolchains.json", "entries", "runtime"}


def _entry_archs(meta: dict) -> list[str]:
    arch = meta.get("arch")
    if arch is None:
        return []
    return [arch] if isinstance(arch, str) else list(arch)


def _strings(value):
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)


def _contains(haystack, needle) -> bool:
    if haystack == needle:
        return True
    if isinstance(haystack, dict):
        return any(_contains(v, needle) for v in haystack.values())
    if isinstance(haystack, list):
        return any(_contains(v, needle) for v in haystack)
    return False


def collect_runtime_files(archs: list[str]) -> list[tuple[str, Path, str]]:
    """(name, path, provider) from every ``msa.cache.runtime_files`` entry point; a broken provider is an error
    (a bundle without its runtime would fail on the node, far from here)."""
    out: dict[str, tuple[str, Path, str]] = {}
    for ep in plugins.entry_points(plugins.RUNTIME_FILES):
        where = plugins.describe(ep)
        try:
            provider = ep.load()
            paths = list(provider(list(archs)))
        except Exception as e:
            raise BundleError(f"runtime-file provider {where} failed: {type(e).__name__}: {e}") from e
        for p in paths:
            p = Path(p)
            if not p.is_file():
                raise BundleError(f"runtime-file provider {where} returned {p}, which is not a file")
            if p.name in out and _fsutil.sha256_file(out[p.name][1]) != _fsutil.sha256_file(p):
                raise BundleError(
                    f"runtime file name {p.name!r} comes from two providers with different contents: "
                    f"{out[p.name][2]} ({out[p.name][1]}) and {where} ({p})"
                )
            out.setdefault(p.name, (p.name, p, where))
    return sorted(out.values())


def _versions() -> dict:
    from importlib import metadata

    dists = {}
    for dist in metadata.distributions():
        name = (dist.metadata.get("Name") or "").lower().replace("_", "-")
        if name.startswith(("msa-", "apache-tvm-ffi", "nvidia-cutlass")):
            dists[name] = dist.version
    return {"python": platform.python_version(), "platform": f"{sys.platform}-{platform.machine()}",
            "dists": dict(sorted(dists.items()))}


def export_bundle(
    output: str | os.PathLike,
    archs: list[str],
    *,
    store: Store | None = None,
    stages: tuple[str, ...] = ("object", "module"),
    include_arch_neutral: bool = False,
    gzip: bool | None = None,
    runtime: bool = True,
) -> dict:
    """Write a self-contained bundle of every intact entry built for any of ``archs`` (of the given stages) from
    all tiers, plus runtime files. Returns the bundle manifest. ``gzip=None`` compresses for .gz/.tgz names."""
    store = store or get_store()
    output = Path(output)
    if not archs:
        raise BundleError("bundle needs at least one --arch")
    wanted = set(archs)
    everything: dict[str, Entry] = {}
    for e in store.iter_entries():
        everything.setdefault(e.digest, e)
    archs_of = {d: set(_entry_archs(e.meta)) for d, e in everything.items()}
    # An arch-neutral entry built from an arch-specific one (e.g. a module keyed by its object's digest) has that
    # entry's arch: inherit through key references and `depends`, transitively.
    refs = {
        d: (set(e.meta.get("depends") or []) | set(_strings(e.meta.get("key", {})))) & everything.keys()
        for d, e in everything.items()
        if not archs_of[d]
    }
    grew = True
    while grew:
        grew = False
        for d, targets in refs.items():
            inherited = set().union(*(archs_of[t] for t in targets)) if targets else set()
            if not inherited <= archs_of[d]:
                archs_of[d] |= inherited
                grew = True
    chosen: dict[str, Entry] = {}
    for d, e in everything.items():
        if e.meta.get("stage") not in stages:
            continue
        if archs_of[d] & wanted or (not archs_of[d] and include_arch_neutral):
            chosen[d] = e
    bad = []
    for e in chosen.values():
        problems = e.meta.get("problems") or check_files(e.path, e.meta)
        if problems:
            bad.append(f"{e.meta.get('name')} ({e.digest[:12]}) in {e.tier.root}: {'; '.join(problems)}")
    if bad:
        raise BundleError("refusing to bundle corrupt entries (run `msa-cache verify`):\n  " + "\n  ".join(bad))
    runtime_files = collect_runtime_files(list(archs)) if runtime else []
    runtime_rows = []
    for name, path, provider in runtime_files:
        sha, size = _fsutil.sha256_file(path)
        runtime_rows.append({"name": name, "sha256": sha, "size": size, "provider": provider})
    toolchains: dict[str, list] = {}
    # A module's key names its object's digest, not the compiler: follow referenced digests (module -> object ->
    # source) through the tiers so the identities that built the exported entries are found and carried, even
    # when only the module stage is exported.
    docs = [e.meta.get("key", {}) for e in chosen.values()]
    seen = set(chosen)
    others = {e.digest: e for e in store.iter_entries() if e.digest not in seen}
    frontier = json.dumps(docs, sort_keys=True, default=str)
    while frontier:
        found = [e for d, e in others.items() if d in frontier]
        for e in found:
            others.pop(e.digest)
        docs.extend(e.meta.get("key", {}) for e in found)
        frontier = json.dumps([e.meta.get("key", {}) for e in found], sort_keys=True, default=str) if found else ""
    for tier in store.tiers:
        for tool, history in _read_toolchains(tier.toolchains_path).items():
            for identity in history if isinstance(history, list) else []:
                if identity not in toolchains.get(tool, []) and any(_contains(d, identity) for d in docs):
                    toolchains.setdefault(tool, []).append(identity)
    entries = [
        {"digest": e.digest, "name": e.meta.get("name"), "stage": e.meta.get("stage"), "kind": e.meta.get("kind"),
         "arch": e.meta.get("arch"), "bytes": e.size}
        for e in sorted(chosen.values(), key=lambda e: e.digest)
    ]
    identity = canonical_json({"entries": [r["digest"] for r in entries],
                               "runtime": [[r["name"], r["sha256"]] for r in runtime_rows],
                               "toolchains": toolchains})  # same entries, new records: a new bundle
    bundle_id = "msa-" + hashlib.sha256(identity.encode()).hexdigest()[:16]
    created = time.time()
    manifest = {
        "format": BUNDLE_FORMAT,
        "bundle_id": bundle_id,
        "schema": SCHEMA_VERSION,
        "archs": sorted(wanted),
        "stages": list(stages),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(created)),
        "created_unix": created,
        "created_on": _fsutil.HOST,
        "versions": _versions(),
        "entries": entries,
        "runtime_files": runtime_rows,
        "toolchains": toolchains,
    }
    compress = gzip if gzip is not None else output.name.endswith((".gz", ".tgz"))
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f".{output.name}.{_fsutil.unique_name('part')}")
    try:
        with tarfile.open(tmp, "w:gz" if compress else "w", format=tarfile.PAX_FORMAT) as tar:
            _add_bytes(tar, "bundle.json", json.dumps(manifest, indent=1, sort_keys=True).encode(), created)
            _add_bytes(tar, "toolchains.json", json.dumps(toolchains, indent=1, sort_keys=True).encode(), created)
            for e in sorted(chosen.values(), key=lambda e: e.digest):
                base = f"entries/{e.digest[:2]}/{e.digest}"
                for name in sorted([*e.meta["files"], "manifest.json"]):
                    _add_file(tar, f"{base}/{name}", e.path / name, created)
            for name, path, _ in runtime_files:
                _add_file(tar, f"runtime/{name}", path, created)
        _fsutil.fsync_file(tmp)
        os.replace(tmp, output)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    log.info("msa-cache: wrote bundle %s (%d entries, %d runtime files) to %s", bundle_id, len(entries),
             len(runtime_rows), output)
    return manifest


def _tarinfo(name: str, size: int, mtime: float, mode: int = 0o644) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = int(mtime)
    info.mode = mode
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes, mtime: float) -> None:
    tar.addfile(_tarinfo(name, len(data), mtime), io.BytesIO(data))


def _add_file(tar: tarfile.TarFile, name: str, path: Path, mtime: float) -> None:
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        tar.addfile(_tarinfo(name, size, mtime), f)


def _safe_member_path(name: str) -> PurePosixPath:
    p = PurePosixPath(name)
    if p.is_absolute() or ".." in p.parts or not p.parts or p.parts[0] not in _TOP_LEVEL or "\\" in name:
        raise BundleError(f"bundle member {name!r} is outside the bundle layout; refusing to import it")
    return p


def _read_bundle_manifest(tar: tarfile.TarFile, source: Path) -> dict:
    try:
        member = tar.getmember("bundle.json")
        data = tar.extractfile(member).read()
        manifest = json.loads(data)
    except (KeyError, AttributeError, ValueError) as e:
        raise BundleError(f"{source} is not an msa-cache bundle (no readable bundle.json: {e})") from e
    if manifest.get("format") != BUNDLE_FORMAT:
        raise BundleError(f"{source}: bundle format {manifest.get('format')!r} is not supported (need {BUNDLE_FORMAT})")
    if not _BUNDLE_ID_RE.match(str(manifest.get("bundle_id", ""))):
        raise BundleError(f"{source}: malformed bundle_id {manifest.get('bundle_id')!r}")
    return manifest


def _verify_tree(root: Path, manifest: dict, source) -> None:
    problems = []
    for row in manifest.get("entries", []):
        digest = str(row.get("digest"))
        entry_dir = root / "entries" / digest[:2] / digest
        try:
            meta = _fsutil.read_json(entry_dir / "manifest.json")
        except (OSError, ValueError) as e:
            problems.append(f"entry {row.get('name')} ({digest[:12]}): manifest unreadable ({e})")
            continue
        if meta.get("digest") != digest or meta.get("schema") != SCHEMA_VERSION:
            problems.append(f"entry {row.get('name')} ({digest[:12]}): manifest does not match (digest/schema)")
            continue
        problems += [f"entry {row.get('name')} ({digest[:12]}): {p}" for p in check_files(entry_dir, meta)]
    for row in manifest.get("runtime_files", []):
        path = root / "runtime" / str(row.get("name"))
        try:
            sha, size = _fsutil.sha256_file(path)
        except OSError as e:
            problems.append(f"runtime file {row.get('name')}: {e}")
            continue
        if (sha, size) != (row.get("sha256"), row.get("size")):
            problems.append(f"runtime file {row.get('name')}: sha256/size do not match bundle.json")
    if problems:
        raise BundleError(f"bundle {source} failed verification:\n  " + "\n  ".join(problems))


def import_bundle(
    path: str | os.PathLike,
    *,
    dest: str | os.PathLike | None = None,
    store: Store | None = None,
    force: bool = False,
) -> dict:
    """Extract a bundle, verify every hash, register it as a read-only tier. Idempotent for the same bundle.
    Returns ``{"bundle_id", "path", "entries", "runtime_files", "already_present"}``."""
    store = store or get_store()
    source = Path(path)
    try:
        tar = tarfile.open(source, "r:*")
    except (OSError, tarfile.TarError) as e:
        raise BundleError(f"cannot open bundle {source}: {e}") from e
    with tar:
        manifest = _read_bundle_manifest(tar, source)
        bundle_id = manifest["bundle_id"]
        target = Path(dest) if dest else store.local.root / "tiers" / bundle_id
        result = {"bundle_id": bundle_id, "path": str(target), "entries": len(manifest.get("entries", [])),
                  "runtime_files": [r["name"] for r in manifest.get("runtime_files", [])], "already_present": False}
        existing = None
        try:
            existing = _fsutil.read_json(target / "bundle.json")
        except (OSError, ValueError):
            pass
        if existing is not None and existing.get("bundle_id") == bundle_id and not force:
            _verify_tree(target, existing, target)
            result["already_present"] = True
        else:
            if target.exists() and not force:
                raise BundleError(f"{target} already exists and is not bundle {bundle_id}; pass --force to replace it")
            _extract_verified(tar, manifest, source, target)
    _register(store, bundle_id, target, manifest, source)
    return result


def _extract_verified(tar: tarfile.TarFile, manifest: dict, source: Path, target: Path) -> None:
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = target.parent / _fsutil.unique_name(f".import-{manifest['bundle_id']}")
        staging.mkdir()
    except OSError as e:
        raise CacheUnwritableError(f"msa-cache: cannot create {target.parent} to import {source}: {e}") from e
    try:
        for member in tar:
            rel = _safe_member_path(member.name)
            out = staging.joinpath(*rel.parts)
            if member.isdir():
                out.mkdir(parents=True, exist_ok=True)
                continue
            if not member.isfile():
                raise BundleError(f"bundle member {member.name!r} is not a regular file (links are not allowed)")
            out.parent.mkdir(parents=True, exist_ok=True)
            src = tar.extractfile(member)
            with open(out, "xb") as f:
                while chunk := src.read(1 << 20):
                    f.write(chunk)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(out, 0o444)
        _verify_tree(staging, manifest, source)
        for dirpath, _, _ in os.walk(staging):
            _fsutil.fsync_dir(Path(dirpath))
        if target.exists():
            _fsutil.discard_tree(target, target.parent / ".trash")
        os.rename(staging, target)
        _fsutil.fsync_dir(target.parent)
    except BaseException:
        _fsutil.remove_tree(staging)
        raise


def _register(store: Store, bundle_id: str, target: Path, manifest: dict, source: Path) -> None:
    record = {"id": bundle_id, "path": str(target.resolve()), "archs": manifest.get("archs", []),
              "created": manifest.get("created"), "source": str(source)}
    try:
        update_registered(store.local.root, add=record)
    except CacheUnwritableError as e:
        raise BundleError(
            f"bundle {bundle_id} was extracted to {target} but cannot be registered in {store.local.root}/tiers.json "
            f"({e}); add {target} to MSA_CACHE_PATH instead"
        ) from e
    store.reload_tiers()
    from msa.cache import store as store_module

    if store_module._STORE is not None and store_module._STORE is not store:
        store_module._STORE.reload_tiers()


def runtime_file(name: str, *, store: Store | None = None) -> Path | None:
    """Path of a runtime library shipped by an imported bundle (or a MSA_CACHE_PATH tier), else None."""
    store = store or get_store()
    for tier in store.tiers:
        candidate = tier.runtime_dir / name
        try:
            if stat.S_ISREG(os.stat(candidate).st_mode):
                return candidate
        except OSError:
            continue
    return None
