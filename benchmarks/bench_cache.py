"""msa-cache benchmark: (a) hit cost of store.lookup, (b) get_or_build -> tvm_ffi.load_module of a cached real
tvm-ffi module in a fresh process. Runs on a GPU-less host (loading a CUDA module needs no GPU).

    python benchmarks/bench_cache.py [--cache-dir DIR] [--runs 9] [--lookups 10000] [--json out.json]

The module (a trivial CUDA kernel exported with TVM_FFI_DLL_EXPORT_TYPED_FUNC) is built once with nvcc through
the store; without --cache-dir a temporary cache is used (so the first run includes one ~10 s nvcc build).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

NVCC = os.environ.get("MSA_BENCH_NVCC", "/usr/local/cuda/bin/nvcc")
HINT = "msa-cache warmup --preset smoke --arch sm_90a"
SOURCE = r"""
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/error.h>
#include <tvm/ffi/function.h>

__global__ void add_one_kernel(float* x, int64_t n) {
  int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i < n) x[i] += 1.0f;
}

void add_one(tvm::ffi::TensorView x) {
  TVM_FFI_ICHECK(x.ndim() == 1) << "x must be 1-D";
  int64_t n = x.size(0);
  add_one_kernel<<<static_cast<unsigned>((n + 255) / 256), 256>>>(static_cast<float*>(x.data_ptr()), n);
}

TVM_FFI_DLL_EXPORT_TYPED_FUNC(add_one, add_one);
"""


def _toolchain_ingredients(store) -> dict:
    from msa.cache.toolchain import dist_version, probe_nvcc, sha256_text

    return {
        "sources": {"add_one.cu": sha256_text(SOURCE)},
        "compiler": store.toolchain("nvcc", probe=lambda: probe_nvcc(NVCC)),
        "flags": ["-gencode=arch=compute_90a,code=sm_90a", "-O3", "-std=c++17", "--cudart", "static", "-Xcompiler",
                  "-fPIC", "-shared", "-ltvm_ffi"],
        "arch": "sm_90a",
        "tvm_ffi": dist_version("apache-tvm-ffi"),
        "bench": "msa-cache/bench_cache.py",
    }


def module_key(store):
    from msa.cache import TVM_FFI_MODULE

    return store.key(stage="module", name="bench_add_one[sm_90a]", ingredients=_toolchain_ingredients(store),
                     kind=TVM_FFI_MODULE)


def build_module(tmp: Path) -> dict:
    import tvm_ffi.libinfo as li

    (tmp / "add_one.cu").write_text(SOURCE)
    libdir = str(Path(li.find_libtvm_ffi()).parent)
    cmd = [NVCC, "-gencode=arch=compute_90a,code=sm_90a", "-O3", "-std=c++17", f"-I{li.find_include_path()}",
           "--cudart", "static", "-Xcompiler", "-fPIC", "-shared", str(tmp / "add_one.cu"), f"-L{libdir}", "-ltvm_ffi",
           "-o", str(tmp / "add_one.so")]
    env = dict(os.environ, CUDA_HOME=os.environ.get("CUDA_HOME", "/usr/local/cuda"))
    subprocess.run(cmd, check=True, env=env, capture_output=True, text=True)
    (tmp / "add_one.cu").unlink()  # the module entry holds only the loadable artifact
    return {"main": "add_one.so"}


def child() -> None:
    """One fresh process: import, then time get_or_build (first use: manifest + hash check) and load_module."""
    t0 = time.perf_counter()
    from msa.cache import get_store

    t1 = time.perf_counter()
    import tvm_ffi

    t2 = time.perf_counter()
    store = get_store()
    key = module_key(store)
    t3 = time.perf_counter()
    entry = store.get_or_build(key, lambda d: (_ for _ in ()).throw(RuntimeError("bench child must not build")),
                               warmup_hint=HINT)
    t4 = time.perf_counter()
    mod = tvm_ffi.load_module(str(entry.file(entry.meta["extra"]["main"])))
    t5 = time.perf_counter()
    assert mod["add_one"] is not None
    print(json.dumps({"import_msa_cache": t1 - t0, "import_tvm_ffi": t2 - t1, "key": t3 - t2,
                      "get_or_build": t4 - t3, "load_module": t5 - t4, "get_or_build_load": t5 - t3}))


def _fmt(seconds: float) -> str:
    if seconds < 1e-3:
        return f"{seconds * 1e6:.1f} us"
    if seconds < 1:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds:.2f} s"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache-dir", help="local tier to use (default: a fresh temporary directory)")
    ap.add_argument("--runs", type=int, default=9, help="fresh processes for the load benchmark")
    ap.add_argument("--lookups", type=int, default=10000)
    ap.add_argument("--json", help="write the numbers here too")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child()
        return 0
    if not os.path.exists(NVCC):
        print(f"nvcc not found at {NVCC} (set MSA_BENCH_NVCC)", file=sys.stderr)
        return 2
    tmp = None
    if args.cache_dir:
        os.environ["MSA_CACHE_DIR"] = args.cache_dir
    else:
        tmp = tempfile.TemporaryDirectory(prefix="msa-bench-cache-")
        os.environ["MSA_CACHE_DIR"] = tmp.name
    os.environ.pop("MSA_CACHE_PATH", None)
    os.environ["MSA_JIT"] = "1"
    from msa.cache import get_store

    store = get_store(refresh=True)
    key = module_key(store)
    built = store.lookup(key) is None
    entry = store.get_or_build(key, build_module, warmup_hint=HINT)
    rows = []
    if built:
        rows.append(("nvcc build of the tvm-ffi module (cold, once)", entry.meta["compile_seconds"], None, 1, ""))

    # (a) hit cost in a warm process
    store.lookup(key)
    samples = []
    for _ in range(args.lookups):
        t = time.perf_counter()
        store.lookup(key)
        samples.append(time.perf_counter() - t)
    hit_median = statistics.median(samples)
    rows.append(("store.lookup hit (warm process)", hit_median, statistics.quantiles(samples, n=10)[-1],
                 len(samples), "< 1 ms"))

    # (b) fresh processes: get_or_build (first use incl. hash check) -> tvm_ffi.load_module
    runs = []
    for _ in range(args.runs):
        proc = subprocess.run([sys.executable, __file__, "--child"], capture_output=True, text=True,
                              env=dict(os.environ, MSA_JIT="0"))
        if proc.returncode != 0:
            print(proc.stderr, file=sys.stderr)
            return 1
        runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))

    def col(name):
        values = [r[name] for r in runs]
        return statistics.median(values), max(values)

    load_median, load_max = col("get_or_build_load")
    rows += [
        ("get_or_build -> tvm_ffi.load_module (fresh process)", load_median, load_max, len(runs), "< 50 ms"),
        ("  of which get_or_build (first use: manifest + sha256)", *col("get_or_build"), len(runs), ""),
        ("  of which tvm_ffi.load_module", *col("load_module"), len(runs), ""),
        ("import msa.cache (fresh process)", *col("import_msa_cache"), len(runs), ""),
        ("import tvm_ffi (fresh process; pulls in torch)", *col("import_tvm_ffi"), len(runs), ""),
    ]
    size = entry.size
    print(f"msa-cache benchmark  (module {size / 1024:.0f} KiB at {entry.path})")
    print(f"{'measurement':<58} {'median':>10} {'p90/max':>10} {'n':>6}  limit")
    for name, med, hi, n, limit in rows:
        print(f"{name:<58} {_fmt(med):>10} {(_fmt(hi) if hi is not None else '-'):>10} {n:>6}  {limit}")
    ok = hit_median < 1e-3 and load_median < 50e-3
    print("PASS" if ok else "FAIL", f"(hit {_fmt(hit_median)} < 1 ms, get_or_build+load {_fmt(load_median)} < 50 ms)")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "hit_median_s": hit_median, "get_or_build_load_median_s": load_median, "runs": runs,
            "module_bytes": size, "rows": [{"name": r[0], "median_s": r[1], "p90_or_max_s": r[2], "n": r[3]} for r in rows],
        }, indent=1))
    if tmp is not None:
        tmp.cleanup()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
