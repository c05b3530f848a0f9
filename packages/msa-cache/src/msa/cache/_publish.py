"""Atomic publication of a build: hash + fsync the builder's files, write manifest.json last, rename the whole
directory into place. A reader sees either no entry or a complete one (the rename is the commit; an entry
directory is only valid with its manifest, which is the last file written before the rename)."""

from __future__ import annotations

import errno
import json
import os
import stat
from pathlib import Path

from msa.cache import _fsutil
from msa.cache.errors import CacheError

MANIFEST = "manifest.json"


def stage_files(tmp: Path) -> dict[str, dict]:
    """Hash and fsync every file the builder wrote; make them read-only. Returns {name: {sha256, size}}."""
    files: dict[str, dict] = {}
    for dirpath, dirnames, filenames in os.walk(tmp, followlinks=False):
        for name in list(dirnames) + list(filenames):
            path = Path(dirpath) / name
            rel = path.relative_to(tmp).as_posix()
            mode = os.lstat(path).st_mode
            if stat.S_ISDIR(mode):
                continue
            if not stat.S_ISREG(mode):
                what = "a symlink" if stat.S_ISLNK(mode) else "not a regular file"
                raise CacheError(f"builder output {rel!r} is {what}; only regular files can be cached")
            if rel == MANIFEST:
                raise CacheError(f"builder output may not be named {MANIFEST!r} (reserved for the entry manifest)")
            sha, size = _fsutil.sha256_file(path)
            _fsutil.fsync_file(path)
            os.chmod(path, mode & 0o555 | 0o444)
            files[rel] = {"sha256": sha, "size": size}
        _fsutil.fsync_dir(Path(dirpath))
    if not files:
        raise CacheError(f"builder wrote no files into {tmp}")
    return files


def write_manifest(tmp: Path, manifest: dict) -> None:
    data = (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode("utf-8")
    _fsutil.write_bytes_durable(tmp / MANIFEST, data)
    os.chmod(tmp / MANIFEST, 0o444)
    _fsutil.fsync_dir(tmp)


def commit(tmp: Path, final: Path) -> bool:
    """Rename ``tmp`` to ``final``. False if a complete entry is already there (someone else published it)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.rename(tmp, final)
    except OSError as e:
        if e.errno in (errno.EEXIST, errno.ENOTEMPTY):
            return False
        raise
    _fsutil.fsync_dir(final.parent)
    return True
