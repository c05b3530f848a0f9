"""Fake "compiler", generators, loaders and subprocess entry points for the msa-cache tests.

Importable by worker/child processes (tests/cache is put on sys.path and PYTHONPATH by conftest.py).
Run as a script for the multi-process tests: ``python msa_cache_testkit.py <mode> <json-args>``.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

from msa.cache import Variant, get_store

PAYLOAD = b"\x7fELF fake kernel object " + bytes(range(256)) * 8


def ingredients(arch: str = "sm_90a", **extra) -> dict:
    base = {
        "sources": {"kernel.cu": "3f1c" * 16},
        "template": {"head_dim": 128, "dtype": "bf16"},
        "compiler": {"tool": "fake-nvcc", "version": "13.0.88"},
        "flags": ["-O3", "--use_fast_math"],
        "arch": arch,
        "tvm_ffi": "0.1.15.post2",
        "msa": "0.1.0",
    }
    base.update(extra)
    return base


def fake_builder(log_path: str | None = None, sleep: float = 0.0, payload: bytes = PAYLOAD, size: int | None = None):
    """A builder that records each call (one line per build in ``log_path``), sleeps, writes two files."""

    def build(tmp: Path):
        if log_path:
            with open(log_path, "a") as f:
                f.write(f"{os.getpid()}\n")
        if sleep:
            time.sleep(sleep)
        data = payload if size is None else (payload * (size // len(payload) + 1))[:size]
        (tmp / "kernel.so").write_bytes(data)
        (tmp / "include").mkdir()
        (tmp / "include" / "params.h").write_text("#define HEAD_DIM 128\n")
        return {"main": "kernel.so"}

    return build


def count_builds(log_path) -> int:
    try:
        return len(Path(log_path).read_text().split())
    except FileNotFoundError:
        return 0


# --- warmup plugins ------------------------------------------------------------------------------------------------


def generate(preset: dict, archs: list[str]):
    for arch in archs:
        for n in preset.get("sizes", [1, 2]):
            yield Variant(
                package="fake",
                name=f"fake_kernel[{arch},n={n}]",
                arch=arch,
                build_target="msa_cache_testkit:build_variant",
                params={"arch": arch, "n": n, "fail": n in preset.get("fail", []),
                        "crash": n in preset.get("crash", []), "until": preset.get("until")},
            )


def build_variant(arch: str, n: int, fail: bool = False, crash: bool = False, until: str | None = None):
    if crash:
        os.kill(os.getpid(), signal.SIGKILL)
    if fail:
        raise RuntimeError(f"fake nvcc: error: n={n} is not supported")
    store = get_store()
    obj_key = store.key(stage="object", name=f"fake_kernel[{arch},n={n}]", ingredients=ingredients(arch, n=n))
    obj = store.get_or_build(obj_key, fake_builder(sleep=0.05))
    if until == "object":
        return obj
    mod_key = store.key(stage="module", name=f"fake_kernel[{arch},n={n}]", ingredients=ingredients(arch, n=n, link=1),
                        kind="fake.module")
    return store.get_or_build(mod_key, fake_builder(sleep=0.05), depends=[obj])


def runtime_files(archs):
    return [Path(os.environ["MSA_TEST_RUNTIME_FILE"])]


def load_fake(entry):
    data = entry.file("kernel.so").read_bytes()
    if data.startswith(b"CRASH"):
        os._exit(7)
    if data.startswith(b"BAD"):
        raise RuntimeError("fake loader: not a kernel")
    return len(data)


# --- subprocess modes ------------------------------------------------------------------------------------------------


def _wait_for(path: Path, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} did not appear")
        time.sleep(0.005)


def mode_race(args: dict) -> dict:
    """Wait for the start signal, then get_or_build the shared key; report what we got."""
    store = get_store()
    key = store.key(stage="module", name="race_kernel[sm_90a]", ingredients=ingredients())
    Path(args["ready_dir"], str(os.getpid())).touch()
    _wait_for(Path(args["go"]))
    entry = store.get_or_build(key, fake_builder(args["log"], sleep=args.get("sleep", 0.5)))
    data = entry.file("kernel.so").read_bytes()
    return {"ok": data == PAYLOAD, "path": str(entry.path), "builds": store.counters["builds"]}


def mode_killed_build(args: dict) -> dict:
    """Build and get SIGKILLed at a chosen point: during the builder, before the manifest, before the rename,
    or right after the commit (lock still held)."""
    from msa.cache import _publish

    point = args["point"]
    here = Path(args["marker"])

    def die():
        here.touch()
        time.sleep(60)  # the parent SIGKILLs us here

    if point == "before_manifest":
        orig = _publish.write_manifest
        _publish.write_manifest = lambda tmp, m: die() or orig(tmp, m)
    elif point == "before_rename":
        orig_commit = _publish.commit
        _publish.commit = lambda tmp, final: die() or orig_commit(tmp, final)
    elif point == "after_commit":
        orig_commit2 = _publish.commit

        def commit_then_die(tmp, final):
            ok = orig_commit2(tmp, final)
            die()
            return ok

        _publish.commit = commit_then_die
    store = get_store()
    key = store.key(stage="module", name="killed_kernel[sm_90a]", ingredients=ingredients())
    inner = fake_builder(args["log"])

    def builder(tmp: Path):
        if point == "in_builder":
            (tmp / "kernel.so").write_bytes(PAYLOAD[:100])  # a partial artifact
            die()
        return inner(tmp)

    store.get_or_build(key, builder)
    return {"finished": True}


def mode_hold_lock(args: dict) -> dict:
    from msa.cache.locks import KeyLock

    store = get_store()
    store.local.ensure_writable()
    key = store.key(stage="module", name="locked_kernel[sm_90a]", ingredients=ingredients())
    lock = KeyLock(store.local, key, 10)
    lock.acquire()
    Path(args["marker"]).touch()
    time.sleep(args.get("hold", 60))
    lock.release()
    return {}


def mode_pin(args: dict) -> dict:
    store = get_store()
    key = store.key(stage="module", name=args["name"], ingredients=ingredients(n=args["n"]))
    entry = store.lookup(key)
    assert entry is not None, "entry to pin is missing"
    entry.pin_for_process()
    Path(args["marker"]).touch()
    time.sleep(60)
    return {}


MODES = {"race": mode_race, "killed_build": mode_killed_build, "hold_lock": mode_hold_lock, "pin": mode_pin}

if __name__ == "__main__":
    result = MODES[sys.argv[1]](json.loads(sys.argv[2]))
    print(json.dumps(result), flush=True)
