"""Small filesystem helpers: fsync, atomic JSON writes, hashing, process identity, robust removal."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import secrets
import shutil
import socket
import stat
import sys
import time
from pathlib import Path

HOST = socket.gethostname()
#: Errors that mean "this directory cannot take writes" rather than a bug.
UNWRITABLE_ERRNOS = frozenset({errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR, errno.EEXIST, errno.ENOENT})
FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
_CHUNK = 1 << 20


def sha256_file(path: Path) -> tuple[str, int]:
    """(sha256 hex, size) of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb", buffering=0) as f:
        while True:
            chunk = f.read(_CHUNK)
            if not chunk:
                break
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    """Make a rename/create inside ``path`` durable; a no-op where directories cannot be fsynced."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_bytes_durable(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` (a fresh file name) and fsync it."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_json(path: Path, value, *, durable: bool = True) -> None:
    """Replace ``path`` with the JSON of ``value`` so that readers see the old or the new file, never a mix."""
    tmp = path.with_name(f".{path.name}.{HOST}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    data = (json.dumps(value, indent=1, sort_keys=True) + "\n").encode("utf-8")
    try:
        if durable:
            write_bytes_durable(tmp, data)
        else:
            tmp.write_bytes(data)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    if durable:
        fsync_dir(path.parent)


def read_json(path: Path):
    with open(path, "rb") as f:
        return json.loads(f.read())


def pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def process_identity() -> dict:
    return {"pid": os.getpid(), "host": HOST, "started": time.time()}


def describe_holder(info: dict | None) -> str:
    """Human text for a holder record: pid, host, since when, and whether it still runs (same host only)."""
    if not info:
        return "an unknown process (no holder record; it may be on another host or an older msa-cache)"
    pid = info.get("pid")
    host = info.get("host", "?")
    since = info.get("started")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(since)) if isinstance(since, (int, float)) else "?"
    state = ""
    if host == HOST and isinstance(pid, int):
        state = ", running" if pid_alive(pid) else ", no longer running"
    return f"pid {pid} on host {host} (since {when}{state})"


def unique_name(prefix: str) -> str:
    """``prefix.host.pid.random``: lets cleanup tell whose leftover a temp path is."""
    return f"{prefix}.{HOST}.{os.getpid()}.{secrets.token_hex(4)}"


def parse_unique_name(name: str) -> tuple[str, str, int] | None:
    """Inverse of :func:`unique_name` -> (prefix, host, pid) or None. Host names may contain dots."""
    parts = name.lstrip(".").split(".")
    if len(parts) < 4:
        return None
    try:
        pid = int(parts[-2])
    except ValueError:
        return None
    return parts[0], ".".join(parts[1:-2]), pid


def _make_writable_and_retry(func, path, _exc):
    try:
        parent = os.path.dirname(path)
        os.chmod(parent, os.stat(parent).st_mode | stat.S_IWUSR | stat.S_IXUSR)
        if os.path.isdir(path) and not os.path.islink(path):
            os.chmod(path, os.stat(path).st_mode | stat.S_IWUSR | stat.S_IXUSR)
        func(path)
    except FileNotFoundError:
        pass


def remove_tree(path: Path) -> None:
    """rmtree that also removes read-only trees (imported tiers) and tolerates concurrent removal."""
    try:
        if sys.version_info >= (3, 12):
            shutil.rmtree(path, onexc=_make_writable_and_retry)
        else:
            shutil.rmtree(path, onerror=_make_writable_and_retry)
    except FileNotFoundError:
        pass


def discard_tree(path: Path, trash_dir: Path) -> None:
    """Make ``path`` vanish atomically (rename into ``trash_dir``), then delete it at leisure."""
    trash_dir.mkdir(parents=True, exist_ok=True)
    target = trash_dir / unique_name("discard")
    try:
        os.rename(path, target)
    except FileNotFoundError:
        return
    remove_tree(target)


def dir_mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0
