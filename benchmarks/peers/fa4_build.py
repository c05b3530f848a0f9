#!/usr/bin/env python3
"""Build FlashAttention-4 (flash-attn-4, CuTe DSL) SM90 forward kernels on a GPU-less host, for the benchmark's
``fa4`` peer on a GPU box that has no CuTe DSL.

Each variant is traced under ``FakeTensorMode`` with ``FLASH_ATTENTION_ARCH=sm_90 CUTE_DSL_ARCH=sm_90a
FLASH_ATTENTION_NUM_SMS=132``, compiled by FA4's own interface, exported as a TVM-FFI object file and linked into
a ``.so`` against ``libcute_dsl_runtime.so`` and ``libtvm_ffi.so``. The output directory (default ``.gpu/fa4``)
gets the ``.so`` files, ``libcute_dsl_runtime.so.gz`` (the kernels call into it; 44 MB, ~19 MB gzipped),
optionally the apache-tvm-ffi wheel for the GPU box's Python, and ``manifest.json``::

    {"flash_attn_version": ..., "runtime_library": "libcute_dsl_runtime.so.gz",
     "kernels": [{"so": ..., "function": "fa4_fwd", "dtype": "bf16", "head_dim": 128, "head_dim_v": 128,
                  "qhead_per_kvhead": 16, "causal": true, "layout": "bshd", "traced_shapes": [...],
                  "signature": [{"name": "mQ", "type": "Tensor([n0, n1, n2, n3], bfloat16)"}, ...]}]}

FA4 marks every tensor layout dynamic, so one kernel serves all batch sizes and sequence lengths with the same
(dtype, head dims, Hq/Hkv, causal); the manifest says which shapes were traced. ``signature`` is the exported
function's positional parameter list, read from the object file itself (it changes between FA4 betas).

Needs ``flash-attn-4`` (tested: 4.0.0b36), ``nvidia-cutlass-dsl`` with the cu13 libs, ``apache-tvm-ffi`` and
``gcc``; installs nothing. quack (an FA4 dependency) imports triton only for its autotuner, which the forward
does not use: without triton a stand-in ``quack.autotuner`` module is inserted (stated on stderr).

    python benchmarks/peers/fa4_build.py                     # default variants -> .gpu/fa4
    python benchmarks/peers/fa4_build.py --tvm-ffi-wheel-python 3.12   # also fetch the GPU box's tvm-ffi wheel
"""

from __future__ import annotations

import argparse
import gzip
import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import types

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEFAULT_OUT = os.path.join(REPO, ".gpu", "fa4")
TESTED_VERSION = "4.0.0b36"
FUNCTION = "fa4_fwd"

# (batch, seqlen, q heads, kv heads, head dim): the benchmark's prefill geometries (Hq/Hkv 64/4, 32/2, 16/1 all
# have 16 query heads per KV head) and the MHA shapes of the baseline file (B2 H16/H32 S8K)
DEFAULT_SHAPES = [(1, 8192, 64, 4, 128), (1, 8192, 32, 2, 128), (1, 8192, 16, 1, 128), (2, 8192, 16, 16, 128),
                  (2, 8192, 32, 32, 128)]


def log(msg: str) -> None:
    sys.stderr.write(f"fa4_build: {msg}\n")
    sys.stderr.flush()


def set_cross_compile_env(num_sms: int) -> None:
    os.environ["FLASH_ATTENTION_ARCH"] = "sm_90"
    os.environ["CUTE_DSL_ARCH"] = "sm_90a"
    os.environ["FLASH_ATTENTION_NUM_SMS"] = str(num_sms)
    os.environ["FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED"] = "1"
    # FA4's persistent cache is not what we ship (we export ourselves); keep it out of the user's /tmp/$USER
    os.environ.setdefault("FLASH_ATTENTION_CUTE_DSL_CACHE_DIR", tempfile.mkdtemp(prefix="fa4_build_cache_"))


def install_autotuner_standin() -> None:
    """quack's package import pulls ``quack.autotuner``, which imports triton; the FA4 forward never autotunes."""
    if importlib.util.find_spec("triton") is not None or "quack.autotuner" in sys.modules:
        return
    mod = types.ModuleType("quack.autotuner")

    class AutotuneConfig:
        def __init__(self, *args, **kwargs):
            self.args, self.kwargs = args, kwargs

    class Autotuner:
        def __init__(self, *args, **kwargs):
            raise RuntimeError("quack.autotuner stand-in (fa4_build.py): triton is not installed")

    def autotune(*args, **kwargs):
        return lambda fn: fn

    mod.AutotuneConfig, mod.Autotuner, mod.autotune = AutotuneConfig, Autotuner, autotune
    sys.modules["quack.autotuner"] = mod
    log("triton is not installed: using a stand-in quack.autotuner (the FA4 forward does not autotune)")


def parse_signature(obj_path: str) -> list[dict]:
    """Positional parameters of the exported ``__call__``, from the error-message string embedded in the object."""
    data = open(obj_path, "rb").read()
    m = re.search(rb"Expects (\d+) parameters[\s\x00]*when calling: `__call__\((.*?)\)`", data, re.S)
    if not m:
        raise RuntimeError(f"{obj_path}: no '__call__(...)' signature string found; cannot build the manifest")
    count, body = int(m.group(1)), m.group(2).decode()
    params, depth, cur = [], 0, ""
    for ch in body:  # split on top-level commas (types contain brackets)
        if ch in "([":
            depth += 1
        elif ch in ")]":
            depth -= 1
        if ch == "," and depth == 0:
            params.append(cur.strip())
            cur = ""
        else:
            cur += ch
    if cur.strip():
        params.append(cur.strip())
    out = []
    for p in params:
        name, _, typ = p.partition(":")
        out.append({"name": name.strip(), "type": typ.strip()})
    if len(out) != count:
        raise RuntimeError(f"{obj_path}: parsed {len(out)} parameters, the object says {count}: {body}")
    return out


def link(obj: str, so: str, libs: list[str]) -> None:
    cmd = ["gcc", "-shared", "-o", so, obj, *libs, "-Wl,-rpath,$ORIGIN", "-Wl,--no-undefined"]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode:
        raise RuntimeError(f"link failed ({' '.join(cmd)}):\n{res.stderr}")


class RecordingCache:
    """Stands in for FA4's compile cache: keeps compiled kernels in memory and remembers which key each call used."""

    def __init__(self):
        self.store: dict = {}
        self.last_key = None

    def __contains__(self, key) -> bool:
        self.last_key = key
        return key in self.store

    def __getitem__(self, key):
        self.last_key = key
        return self.store[key]

    def __setitem__(self, key, fn) -> None:
        self.last_key = key
        self.store[key] = fn

    def clear(self) -> None:
        self.store.clear()


def build(out_dir: str, shapes: list[tuple[int, int, int, int, int]], causal_modes: list[bool], num_sms: int,
          runtime: str) -> dict:
    set_cross_compile_env(num_sms)
    install_autotuner_standin()
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    t0 = time.perf_counter()
    import cutlass.cute as cute
    import flash_attn.cute.interface as fa

    log(f"imported flash_attn.cute in {time.perf_counter() - t0:.1f} s")
    version = importlib.metadata.version("flash-attn-4")
    if version != TESTED_VERSION:
        log(f"WARNING: flash-attn-4 {version} is installed; this script was checked against {TESTED_VERSION}")
    cache = RecordingCache()
    fa._flash_attn_fwd.compile_cache = cache
    runtime_libs = [p for p in cute.runtime.find_runtime_libraries(enable_tvm_ffi=True) if os.path.exists(p)]
    cute_rt = [p for p in runtime_libs if os.path.basename(p).startswith("libcute_dsl_runtime")]
    if not cute_rt:
        raise RuntimeError(f"libcute_dsl_runtime.so not found among {runtime_libs} (install nvidia-cutlass-dsl[cu13])")

    os.makedirs(out_dir, exist_ok=True)
    kernels: dict = {}
    for causal in causal_modes:
        for b, s, hq, hkv, d in shapes:
            if hq % hkv:
                raise ValueError(f"shape {(b, s, hq, hkv, d)}: q heads must be a multiple of kv heads")
            t1 = time.perf_counter()
            with FakeTensorMode(allow_non_fake_inputs=True):
                q = torch.empty(b, s, hq, d, dtype=torch.bfloat16, device="cuda")
                k = torch.empty(b, s, hkv, d, dtype=torch.bfloat16, device="cuda")
                v = torch.empty(b, s, hkv, d, dtype=torch.bfloat16, device="cuda")
                fa.flash_attn_func(q, k, v, causal=causal)
            key = cache.last_key
            shape = {"batch": b, "seqlen": s, "q_heads": hq, "kv_heads": hkv, "head_dim": d}
            if key in kernels:
                kernels[key]["traced_shapes"].append(shape)
                log(f"B{b} S{s} H{hq}/{hkv} d{d} causal={causal}: same kernel as {kernels[key]['so']}")
                continue
            tag = f"fa4_sm90_fwd_bf16_d{d}_g{hq // hkv}_{'causal' if causal else 'full'}"
            obj = os.path.join(out_dir, tag + ".o")
            so = os.path.join(out_dir, tag + ".so")
            cache.store[key].export_to_c(object_file_path=obj, function_name=FUNCTION)
            link(obj, so, runtime_libs)
            signature = parse_signature(obj)
            os.remove(obj)
            kernels[key] = {"so": os.path.basename(so), "function": FUNCTION, "dtype": "bf16", "head_dim": d,
                            "head_dim_v": d, "qhead_per_kvhead": hq // hkv, "causal": causal, "layout": "bshd",
                            "arch": "sm_90a", "num_sms": num_sms, "traced_shapes": [shape], "signature": signature}
            log(f"B{b} S{s} H{hq}/{hkv} d{d} causal={causal}: {os.path.basename(so)} "
                f"({os.path.getsize(so) // 1024} KiB, {len(signature)} args) in {time.perf_counter() - t1:.1f} s")
    runtime_name = None
    if runtime == "copy":
        runtime_name = os.path.basename(cute_rt[0])
        shutil.copy2(cute_rt[0], os.path.join(out_dir, runtime_name))
    elif runtime == "gzip":  # 44 MB -> ~19 MB: the GPU box takes at most 64 MiB per transfer
        runtime_name = os.path.basename(cute_rt[0]) + ".gz"
        with open(cute_rt[0], "rb") as src, gzip.open(os.path.join(out_dir, runtime_name), "wb", compresslevel=6) as dst:
            shutil.copyfileobj(src, dst)
    manifest = {
        "flash_attn_version": version,
        "built": time.strftime("%Y-%m-%d %H:%M:%S"),
        "runtime_library": runtime_name or cute_rt[0],
        "tvm_ffi_version": importlib.metadata.version("apache-tvm-ffi"),
        "cutlass_dsl_version": importlib.metadata.version("nvidia-cutlass-dsl"),
        "kernels": list(kernels.values()),
    }
    with open(os.path.join(out_dir, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)
    return manifest


def download_tvm_ffi_wheel(out_dir: str, python: str) -> None:
    version = importlib.metadata.version("apache-tvm-ffi")
    cmd = [sys.executable, "-m", "pip", "download", f"apache-tvm-ffi=={version}", "--no-deps", "--only-binary=:all:",
           "--python-version", python, "--platform", "manylinux_2_28_x86_64", "-d", out_dir]
    log("downloading the tvm-ffi wheel for the GPU box: " + " ".join(cmd))
    subprocess.run(cmd, check=True)


def parse_shapes(text: str) -> list[tuple[int, int, int, int, int]]:
    """``B:S:Hq:Hkv:D`` comma list."""
    shapes = []
    for item in text.split(","):
        parts = item.strip().split(":")
        if len(parts) != 5:
            raise argparse.ArgumentTypeError(f"--shapes: expected B:S:Hq:Hkv:D items, got {item!r}")
        shapes.append(tuple(int(x) for x in parts))
    return shapes


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("-o", "--out", default=DEFAULT_OUT, help=f"output directory (default {DEFAULT_OUT})")
    p.add_argument("--shapes", type=parse_shapes, default=DEFAULT_SHAPES,
                   help="B:S:Hq:Hkv:D comma list to trace (default: the benchmark's prefill geometries)")
    p.add_argument("--causal", choices=["both", "on", "off"], default="both")
    p.add_argument("--num-sms", type=int, default=132, help="SM count FA4 plans for (H100 SXM / H200: 132)")
    p.add_argument("--runtime", choices=["gzip", "copy", "none"], default="gzip",
                   help="put libcute_dsl_runtime.so (44 MB) into the output directory gzipped (~19 MB, default; the "
                        "harness unpacks it to a temp dir), as is, or not at all (the manifest then names this "
                        "host's path)")
    p.add_argument("--tvm-ffi-wheel-python", default=None, metavar="X.Y",
                   help="also download this host's apache-tvm-ffi version as a wheel for Python X.Y")
    args = p.parse_args(argv)
    missing = [m for m in ("flash_attn.cute", "cutlass", "tvm_ffi") if _missing(m)]
    if missing:
        log(f"cannot build: {missing} not importable (pip install flash-attn-4=={TESTED_VERSION} quack-kernels "
            "'nvidia-cutlass-dsl[cu13]' apache-tvm-ffi)")
        return 2
    if shutil.which("gcc") is None:
        log("cannot build: gcc not found")
        return 2
    causal = {"both": [True, False], "on": [True], "off": [False]}[args.causal]
    manifest = build(args.out, args.shapes, causal, args.num_sms, args.runtime)
    if args.tvm_ffi_wheel_python:
        download_tvm_ffi_wheel(args.out, args.tvm_ffi_wheel_python)
    total = sum(os.path.getsize(os.path.join(args.out, f)) for f in os.listdir(args.out))
    log(f"{len(manifest['kernels'])} kernels, {total / 2**20:.1f} MiB in {args.out}")
    return 0


def _missing(module: str) -> bool:
    try:
        return importlib.util.find_spec(module.split(".")[0]) is None
    except (ImportError, ValueError):
        return True


if __name__ == "__main__":
    sys.exit(main())
