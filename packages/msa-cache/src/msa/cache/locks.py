"""Per-key build locks: a filelock (flock; released by the kernel when the holder dies) plus a holder record.

The holder record ``locks/<digest>.holder`` (pid, host, start time, key name) is written after acquiring and
removed before releasing. Finding one when we acquire therefore means the previous holder died mid-build: we
say so in the log and remove its temp directories. On timeout the record names the process we waited for.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

from msa.cache import _fsutil
from msa.cache.errors import LockTimeoutError
from msa.cache.tiers import Tier, unwritable_error

log = logging.getLogger("msa.cache")

#: After this long waiting, say whom we are waiting for.
_ANNOUNCE_AFTER_S = 5.0


class KeyLock:
    def __init__(self, tier: Tier, key, timeout: float):
        self.tier = tier
        self.key = key
        self.timeout = timeout
        self.lock_path = tier.locks_dir / f"{key.digest}.lock"
        self.holder_path = tier.locks_dir / f"{key.digest}.holder"
        self._lock = None

    def read_holder(self) -> dict | None:
        try:
            data = json.loads(self.holder_path.read_text())
            return data if isinstance(data, dict) else None
        except (OSError, ValueError):
            return None

    def acquire(self) -> dict | None:
        """Block until held (or raise LockTimeoutError). Returns the dead previous holder's record, if any."""
        import filelock

        try:
            self.tier.locks_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise unwritable_error(self.tier, e, f"creating the lock directory for {self.key}") from e
        lock = filelock.FileLock(str(self.lock_path), thread_local=False)
        start = time.monotonic()
        deadline = None if self.timeout < 0 else start + self.timeout
        announced = False
        while True:
            if deadline is None:
                wait = -1.0 if announced else _ANNOUNCE_AFTER_S
            else:
                remaining = max(0.0, deadline - time.monotonic())
                wait = remaining if announced else min(_ANNOUNCE_AFTER_S, remaining)
            try:
                lock.acquire(timeout=wait)
                break
            except filelock.Timeout:
                if deadline is not None and time.monotonic() >= deadline:
                    raise LockTimeoutError(
                        self.key, self.lock_path, time.monotonic() - start, _fsutil.describe_holder(self.read_holder())
                    ) from None
                if not announced:
                    announced = True
                    log.info(
                        "msa-cache: waiting for %s, being built by %s",
                        self.key,
                        _fsutil.describe_holder(self.read_holder()),
                    )
            except OSError as e:
                raise unwritable_error(self.tier, e, f"locking {self.lock_path}") from e
        self._lock = lock
        previous = self.read_holder()
        if previous is not None:
            log.warning(
                "msa-cache: recovered the build lock of %s from %s, which stopped without releasing it "
                "(killed or crashed mid-build); removing its leftovers and building again",
                self.key,
                _fsutil.describe_holder(previous),
            )
        record = dict(_fsutil.process_identity(), name=self.key.name, digest=self.key.digest)
        try:
            _fsutil.atomic_write_json(self.holder_path, record, durable=False)
        except OSError as e:
            self.release()
            raise unwritable_error(self.tier, e, f"writing the lock holder record of {self.key}") from e
        return previous

    def release(self) -> None:
        lock, self._lock = self._lock, None
        if lock is None:
            return
        try:
            os.unlink(self.holder_path)
        except OSError:
            pass
        lock.release()

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()


def remove_orphan_temps(tier: Tier, digest: str) -> list[Path]:
    """Remove temp dirs of ``digest`` (call only while holding its key lock: nobody else can be using them)."""
    removed = []
    try:
        names = os.listdir(tier.tmp_dir)
    except OSError:
        return removed
    for name in names:
        if name.startswith(digest + "."):
            path = tier.tmp_dir / name
            _fsutil.remove_tree(path)
            removed.append(path)
    return removed
