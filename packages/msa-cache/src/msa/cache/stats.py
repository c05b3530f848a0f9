"""Usage counters, accumulated in memory and merged into <tier>/stats.json now and then.

Hits only bump an in-memory counter (the hot path stays a dict lookup); the file is updated after each build,
at most every FLUSH_INTERVAL_S on hits, and at process exit, under a flock, by read-add-replace.
"""

from __future__ import annotations

import fcntl
import os
import threading
import time
from pathlib import Path

from msa.cache import _fsutil

FIELDS = (
    "hits",  # lookups answered by the local tier
    "shared_hits",  # lookups answered by a read-only tier (MSA_CACHE_PATH or imported bundles)
    "misses",
    "builds",
    "build_failures",
    "compile_seconds",
    "quarantined",
    "evicted",
)
FLUSH_INTERVAL_S = 30.0


class Stats:
    def __init__(self):
        self._pending: dict[str, float] = {}
        self._lock = threading.Lock()
        self._last_flush = time.monotonic()

    def add(self, field: str, amount: float = 1) -> None:
        with self._lock:
            self._pending[field] = self._pending.get(field, 0) + amount

    def due(self) -> bool:
        return time.monotonic() - self._last_flush > FLUSH_INTERVAL_S

    def flush(self, stats_path: Path) -> bool:
        with self._lock:
            pending, self._pending = self._pending, {}
            self._last_flush = time.monotonic()
        if not pending:
            return True
        try:
            merge_into(stats_path, pending)
            return True
        except OSError:
            with self._lock:  # keep the counts for a later attempt
                for k, v in pending.items():
                    self._pending[k] = self._pending.get(k, 0) + v
            return False


def read(stats_path: Path) -> dict:
    try:
        data = _fsutil.read_json(stats_path)
    except (OSError, ValueError):
        data = {}
    out = {f: data.get(f, 0) for f in FIELDS}
    out["since"] = data.get("since")
    out["updated"] = data.get("updated")
    return out


def merge_into(stats_path: Path, deltas: dict) -> None:
    stats_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(stats_path.with_name("stats.lock"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            data = _fsutil.read_json(stats_path)
            if not isinstance(data, dict):
                data = {}
        except (OSError, ValueError):
            data = {}
        for k, v in deltas.items():
            data[k] = data.get(k, 0) + v
        if isinstance(data.get("compile_seconds"), float):
            data["compile_seconds"] = round(data["compile_seconds"], 3)
        now = time.time()
        data.setdefault("since", now)
        data["updated"] = now
        _fsutil.atomic_write_json(stats_path, data, durable=False)
    finally:
        os.close(fd)
