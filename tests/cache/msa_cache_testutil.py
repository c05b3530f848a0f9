"""Helpers shared by the msa-cache tests (a plain module: test files must not import conftest)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def spawn_kit(mode: str, args: dict, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(HERE / "msa_cache_testkit.py"), mode, json.dumps(args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=dict(os.environ, **(env or {})),
    )


def finish(proc: subprocess.Popen, timeout: float = 120) -> dict:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, f"child failed (rc {proc.returncode}):\n{err}"
    return json.loads(out.strip().splitlines()[-1])


def tree_snapshot(root: Path) -> dict:
    """{relative path: (mode, size, mtime_ns, sha256)} of everything under root (dirs: mode only)."""
    snap = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = p.lstat()
            rel = str(p.relative_to(root))
            if p.is_file():
                snap[rel] = (st.st_mode, st.st_size, st.st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
            else:
                snap[rel] = (st.st_mode, st.st_mtime_ns)
    return snap
