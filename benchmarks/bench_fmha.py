"""Dense FMHA forward on one GPU: msa's SM90 kernel vs torch SDPA (cuDNN and flash backends), same process.

FLOPs: 4 * D * H * (visible (q, k) pairs), bottom-right causal pairs counted exactly. TFLOP/s are also given as a
fraction of a bf16 8192^3 matmul measured in the same process. Timing: CUDA events around each call, median of
``--reps`` after ``--warmup`` calls, the implementations of a case interleaved call by call (round-robin,
rotating who goes first) so clock and thermal drift hits them alike. Inputs are far larger than L2, so no input
rotation is needed.

    python benchmarks/bench_fmha.py [--cases default|quick] [--json out.json] [--compare DIR] [--maxscore]

Where the split-KV cost model cuts a case's tail, a "msa (no split)" row times the same kernel on a plan that
never splits (same process, interleaved): the A/B of split-KV. ``--maxscore`` adds the issue-7 modes on ragged
cases (O + max_score, max_score only) with their time relative to O only.
    python benchmarks/bench_fmha.py --prebuild DIR   # no GPU: build every variant, copy the modules to DIR
    python benchmarks/bench_fmha.py --fp8            # FP8 e4m3 cases: msa fp8 vs msa bf16 vs SDPA (bf16 / fp8)

``--fp8`` times, per case and interleaved: the fp8 kernel (its V transpose pre-pass included), the bf16 kernel on
the same shapes, SDPA cuDNN on bf16 and SDPA cuDNN on the fp8 tensors -- the last is reported as refused (with
torch's message) where the installed torch has no fp8 SDPA. ``--candidates "fp8:n192=DIR,bf16:n176=DIR"`` adds,
to the same interleaved rotation, one row per alternative build (``msa fp8 n192`` ...): the module of the case is
loaded from DIR (cases whose module DIR lacks are skipped), and its plan is made for the module's KV tile size
(``block_n()``), so wide-tile builds run with matching plans.

A GPU host without a compiler loads prebuilt modules with ``MSA_FMHA_SM90_PREBUILT=DIR`` (tests and this bench).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys

import torch

BLOCK = 128


def visible_pairs(q_len: int, kv_len: int, causal: bool) -> int:
    if not causal:
        return q_len * kv_len
    off = kv_len - q_len
    # sum over i of min(kv_len, max(0, i + off + 1))
    return sum(min(kv_len, max(0, i + off + 1)) for i in range(q_len))


def time_ms(fn, warmup: int, reps: int) -> tuple[float, float]:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for s, e in zip(starts, ends):
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize()
    t = [s.elapsed_time(e) for s, e in zip(starts, ends)]
    return statistics.median(t), (max(t) - min(t))


def time_interleaved(fns: dict, warmup: int, reps: int) -> dict:
    """Median ms (and max - min) per callable, timed round-robin so clock / thermal drift hits all alike."""
    labels = list(fns)
    for _ in range(warmup):
        for label in labels:
            fns[label]()
    torch.cuda.synchronize()
    events = {label: [] for label in labels}
    for r in range(reps):
        order = labels[r % len(labels) :] + labels[: r % len(labels)]  # rotate who goes first
        for label in order:
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            fns[label]()
            e.record()
            events[label].append((s, e))
    torch.cuda.synchronize()
    out = {}
    for label, pairs in events.items():
        t = [s.elapsed_time(e) for s, e in pairs]
        out[label] = (statistics.median(t), max(t) - min(t))
    return out


def matmul_tflops(warmup: int, reps: int) -> float:
    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    ms, _ = time_ms(lambda: a @ b, warmup, reps)
    return 2 * n**3 / ms / 1e9


CASES = {
    # name: (batch, hq, hkv, seqlen, causal, paged[, qo_len[, head_dim]]): paged is False, True (page 128) or a page
    # size; qo_len (default seqlen) < seqlen is a decode- / chunk-shaped case (non-causal only: SDPA's is_causal
    # aligns top-left when the lengths differ); head_dim defaults to 128
    "default": [
        ("B2 H32 S8K noncausal", 2, 32, 32, 8192, False, False),
        ("B2 H32 S8K causal", 2, 32, 32, 8192, True, False),
        ("B2 H32 S8K causal paged", 2, 32, 32, 8192, True, True),
        ("B1 H32 S32K causal", 1, 32, 32, 32768, True, False),
        ("B1 Hq64/Hkv4 S16K causal", 1, 64, 4, 16384, True, False),
        ("B1 Hq64/Hkv4 S16K causal paged", 1, 64, 4, 16384, True, True),
        ("B1 H8 q128 kv128K noncausal", 1, 8, 8, 131072, False, False, 128),
    ],
    "quick": [
        ("B2 H32 S8K causal", 2, 32, 32, 8192, True, False),
    ],
    # the two B2 H32 S8K parity shapes alone (A/B of builds with --compare)
    "parity": [
        ("B2 H32 S8K noncausal", 2, 32, 32, 8192, False, False),
        ("B2 H32 S8K causal", 2, 32, 32, 8192, True, False),
    ],
    # the "paged within 5% of ragged" bar alone (each paged case also times ragged K/V interleaved)
    "paged": [
        ("B2 H32 S8K causal paged", 2, 32, 32, 8192, True, True),
        ("B1 Hq64/Hkv4 S16K causal paged", 1, 64, 4, 16384, True, True),
    ],
    # page sizes other than 128 (one module; each case also times ragged K/V interleaved)
    "pagesizes": [
        (f"B2 H32 S8K causal paged{ps}", 2, 32, 32, 8192, True, ps) for ps in (16, 32, 64, 128, 256)
    ],
    # head dim 256 (64-key tiles): vs cuDNN / FA2 SDPA, and paged
    "d256": [
        ("B2 H16 S8K d256 noncausal", 2, 16, 16, 8192, False, False, None, 256),
        ("B2 H16 S8K d256 causal", 2, 16, 16, 8192, True, False, None, 256),
        ("B2 H16 S8K d256 causal paged", 2, 16, 16, 8192, True, True, None, 256),
    ],
}


def bench_case(
    name,
    batch,
    hq,
    hkv,
    seqlen,
    causal,
    paged,
    d,
    dtype,
    warmup,
    reps,
    peers=True,
    compare=None,
    maxscore=False,
    qo_len=None,
    split_ab=(),
    compare_maxscore=None,
):
    import msa.core as mc
    from msa.core.kernels import fmha_sm90 as k90

    dev = torch.device("cuda")
    torch.manual_seed(0)
    qo = seqlen if qo_len is None else qo_len
    tq, tk = batch * qo, batch * seqlen
    q = torch.randn(tq, hq, d, device=dev, dtype=dtype)
    k = torch.randn(tk, hkv, d, device=dev, dtype=dtype)
    v = torch.randn(tk, hkv, d, device=dev, dtype=dtype)
    qlens, lens = [qo] * batch, [seqlen] * batch
    page = (128 if paged is True else int(paged)) if paged else None
    plan = mc.fmha_plan(qlens, lens, hq, hkv, causal=causal, page_size=page, device=dev)
    kv_indices = None
    kk, vv = k, v
    if paged:
        pages = batch * seqlen // page
        perm = torch.randperm(pages, device=dev).to(torch.int32)
        # page perm[p] holds logical page p: [pages, Hkv, page, D]
        kk = torch.empty(pages, hkv, page, d, device=dev, dtype=dtype)
        vv = torch.empty_like(kk)
        kk[perm.long()] = k.view(pages, page, hkv, d).transpose(1, 2)
        vv[perm.long()] = v.view(pages, page, hkv, d).transpose(1, 2)
        kv_indices = perm
    out = torch.empty_like(q)
    rows = []
    flops = 4 * d * hq * batch * visible_pairs(qo, seqlen, causal)

    def ours():
        k90.run(q, kk, vv, plan, kv_indices=kv_indices, out=out)

    impls = {"msa fmha_sm90": ours}
    if paged:
        # The same kernel on ragged K/V, timed call by call with the paged one: the "paged within 5% of ragged"
        # ratio must not carry the thermal drift between two separately timed cases (runs 13: 0.94x / 1.08x).
        plan_ragged = mc.fmha_plan(qlens, lens, hq, hkv, causal=causal, page_size=None, device=dev)
        out_ragged = torch.empty_like(q)

        def ours_ragged():
            k90.run(q, k, v, plan_ragged, out=out_ragged)

        impls["msa ragged (same run)"] = ours_ragged
    failed = []
    kp = k90._kernel_plan(plan, d, q.element_size(), dev, k90.default_block_n(d))
    if kp.split != (0, 1):
        print(f"  {name}: split-KV tail {kp.split} ({kp.combine.shape[0]} items cut)", flush=True)
        kp_whole = k90.plan(qlens, lens, hq, hkv, causal=causal, paged=bool(paged), page_size=page or 128,
                            split_kv=None, head_dim=d, device=dev)

        def ours_no_split():
            k90.run(q, kk, vv, kp_whole, kv_indices=kv_indices, out=out, causal=causal)

        impls["msa (no split)"] = ours_no_split
        for ks in split_ab:  # other split choices on the same case: calibrates the cost model
            kp_alt = k90.plan(qlens, lens, hq, hkv, causal=causal, paged=bool(paged), page_size=page or 128,
                              split_kv=ks, head_dim=d, device=dev)

            def ours_alt_split(kp_alt=kp_alt):
                k90.run(q, kk, vv, kp_alt, kv_indices=kv_indices, out=out, causal=causal)

            impls[f"msa split {ks[0]},{ks[1]}"] = ours_alt_split
    if maxscore and not paged:
        k90.MAX_SCORE_ENABLED = True
        ms = torch.empty(hq, plan.max_k_tiles, tq, device=dev, dtype=torch.float32)

        def ours_o_ms():
            k90.run(q, kk, vv, plan, out=out, max_score=ms, output_maxscore=True)

        def ours_ms_only():
            k90.run(q, kk, None, plan, max_score=ms, output_o=False, output_maxscore=True)

        impls["msa o+maxscore"] = ours_o_ms
        impls["msa maxscore"] = ours_ms_only
        if compare_maxscore:  # alternative builds of the max-score modes (A/B rows)
            from pathlib import Path

            import tvm_ffi

            for mode, label, fn in (
                ("o_maxscore", "msa o+maxscore alt", ours_o_ms),
                ("maxscore", "msa maxscore alt", ours_ms_only),
            ):
                path = Path(compare_maxscore) / f"{k90.variant_tag(k90.DTYPES[dtype], d, causal, bool(paged), mode)}.so"
                if not path.is_file():
                    continue
                alt_mod = tvm_ffi.load_module(str(path))

                def ours_alt(alt_mod=alt_mod, fn=fn):
                    current = k90._module
                    k90._module = lambda *a: alt_mod
                    try:
                        fn()
                    finally:
                        k90._module = current

                impls[label] = ours_alt
    if compare:  # A/B: the same call served by an alternative build of the same variant
        from pathlib import Path

        import tvm_ffi

        tag = k90.variant_tag(k90.DTYPES[dtype], d, causal, bool(paged))
        path = Path(compare) / f"{tag}.so"
        if path.is_file():
            alt = tvm_ffi.load_module(str(path))

            def ours_alt():
                current = k90._module
                k90._module = lambda *a: alt
                try:
                    ours()
                finally:
                    k90._module = current

            impls["msa (compare)"] = ours_alt
    if peers and not paged:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        qs = q.view(batch, qo, hq, d).transpose(1, 2)
        ks = k.view(batch, seqlen, hkv, d).transpose(1, 2)
        vs = v.view(batch, seqlen, hkv, d).transpose(1, 2)
        for label, backend in (("sdpa cudnn", SDPBackend.CUDNN_ATTENTION), ("sdpa flash", SDPBackend.FLASH_ATTENTION)):

            def sdpa(backend=backend):
                with sdpa_kernel(backend):
                    return torch.nn.functional.scaled_dot_product_attention(
                        qs, ks, vs, is_causal=causal, enable_gqa=hq != hkv
                    )

            try:
                sdpa()
                impls[label] = sdpa
            except Exception as e:  # a backend that refuses this shape is reported, not fatal
                failed.append((label, float("nan"), f"{type(e).__name__}: {str(e)[:80]}"))
    times = time_interleaved(impls, warmup, reps)
    rows = [(label, *times[label]) for label in impls] + failed
    return [(name, impl, ms, spread, flops / ms / 1e9 if ms == ms else float("nan")) for impl, ms, spread in rows]


FP8_CASES = [
    ("B2 H32 S8K noncausal", 2, 32, 32, 8192, False),
    ("B2 H32 S8K causal", 2, 32, 32, 8192, True),
]


def parse_candidates(spec: str) -> list:
    """``"fp8:label=DIR,bf16:label=DIR"`` -> [(kind, label, DIR)]."""
    out = []
    for item in filter(None, (x.strip() for x in spec.split(","))):
        kind, _, rest = item.partition(":")
        label, _, directory = rest.partition("=")
        if kind not in ("fp8", "bf16") or not label or not directory:
            raise ValueError(f"--candidates: expected KIND:LABEL=DIR with KIND fp8 or bf16, got {item!r}")
        out.append((kind, label, directory))
    return out


def bench_fp8(warmup: int, reps: int, peers: bool = True, candidates=()) -> list:
    """Rows (case, impl, ms, spread, TFLOP/s) of the fp8 cases; see the module docstring."""
    results = []
    for case in FP8_CASES:
        results += _bench_fp8_case(*case, warmup, reps, peers, candidates)
        torch.cuda.empty_cache()
    return results


def _candidate_impl(k90, path, lens, hq, hkv, causal, elem_size, call):
    """A timed call served by the module at ``path`` with a plan for its KV tile size."""
    from pathlib import Path

    import tvm_ffi

    if not Path(path).is_file():
        return None
    mod = tvm_ffi.load_module(str(path))
    kp = k90.plan(
        lens, lens, hq, hkv, causal=causal, elem_size=elem_size, device="cuda", block_n=k90.module_block_n(mod),
        block_m=k90.module_block_m(mod),
    )

    def fn():
        current = k90._module
        k90._module = lambda *a, **kw: mod
        try:
            return call(kp)
        finally:
            k90._module = current

    return fn


def _bench_fp8_case(name, batch, hq, hkv, seqlen, causal, warmup, reps, peers, candidates=()) -> list:
    import msa.core as mc
    from msa.core.kernels import fmha_sm90 as k90

    dev = torch.device("cuda")
    d = 128
    results = []
    torch.manual_seed(0)
    tq = tk = batch * seqlen
    q16 = torch.randn(tq, hq, d, device=dev, dtype=torch.bfloat16)
    k16 = torch.randn(tk, hkv, d, device=dev, dtype=torch.bfloat16)
    v16 = torch.randn(tk, hkv, d, device=dev, dtype=torch.bfloat16)
    q8, k8, v8 = (x.to(torch.float8_e4m3fn) for x in (q16, k16, v16))
    lens = [seqlen] * batch
    plan = mc.fmha_plan(lens, lens, hq, hkv, causal=causal, device=dev)
    out = torch.empty_like(q16)
    flops = 4 * d * hq * batch * visible_pairs(seqlen, seqlen, causal)
    def fp8_exact():  # the exact (exp2) softmax build, which calls returning the LSE run (fmha_sm90.fp8_p_variant)
        import os
        from unittest import mock

        with mock.patch.dict(os.environ, {k90.FP8_SOFTMAX_ENV: "exact"}):
            return k90.run(q8, k8, v8, plan, out=out, q_scale=0.5, k_scale=0.5, v_scale=0.5)

    impls = {
        "msa fp8": lambda: k90.run(q8, k8, v8, plan, out=out, q_scale=0.5, k_scale=0.5, v_scale=0.5),
        "msa bf16": lambda: k90.run(q16, k16, v16, plan, out=out),
        "msa fp8 exact": fp8_exact,
    }
    for kind, label, directory in candidates:
        fp8 = kind == "fp8"
        tag = k90.variant_tag(k90.DTYPES[torch.float8_e4m3fn if fp8 else torch.bfloat16], d, causal, False)
        if fp8:
            call = lambda kp: k90.run(q8, k8, v8, kp, out=out, causal=causal, q_scale=0.5, k_scale=0.5, v_scale=0.5)  # noqa: E731
        else:
            call = lambda kp: k90.run(q16, k16, v16, kp, out=out, causal=causal)  # noqa: E731
        fn = _candidate_impl(k90, f"{directory}/{tag}.so", lens, hq, hkv, causal, 1 if fp8 else 2, call)
        if fn is not None:
            impls[f"msa {kind} {label}"] = fn
    failed = []
    if peers:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        def bhsd(x, h):
            return x.view(batch, seqlen, h, d).transpose(1, 2)

        for label, (qq, kk, vv) in (("sdpa cudnn bf16", (q16, k16, v16)), ("sdpa cudnn fp8", (q8, k8, v8))):

            def sdpa(qq=qq, kk=kk, vv=vv):
                with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                    return torch.nn.functional.scaled_dot_product_attention(
                        bhsd(qq, hq), bhsd(kk, hkv), bhsd(vv, hkv), is_causal=causal, enable_gqa=hq != hkv
                    )

            try:
                sdpa()
                torch.cuda.synchronize()
                impls[label] = sdpa
            except Exception as e:  # torch without fp8 SDPA: reported, not fatal
                failed.append((label, float("nan"), f"refused: {type(e).__name__}: {str(e)[:100]}"))
    times = time_interleaved(impls, warmup, reps)
    for label in impls:
        ms, spread = times[label]
        results.append((name, label, ms, spread, flops / ms / 1e9))
    for label, ms, why in failed:
        results.append((name, label, ms, why, float("nan")))
    return results


def print_fp8(results: list) -> None:
    print(f"{'case':24s} {'impl':16s} {'ms':>9s} {'TFLOP/s':>8s} {'fp8 / this':>10s}")
    by_case = {}
    for r in results:
        by_case.setdefault(r[0], {})[r[1]] = r
    for name, impls in by_case.items():
        fp8 = impls.get("msa fp8")
        for impl, r in impls.items():
            speedup = r[2] / fp8[2] if fp8 and r[2] == r[2] else float("nan")
            note = f"  {r[3]}" if isinstance(r[3], str) else ""
            print(f"{name:24s} {impl:16s} {r[2]:9.3f} {r[4]:8.0f} {speedup:10.2f}{note}")
    print("fp8 / this = this impl's time / msa fp8 time (bar: >= 1.5 vs msa bf16, >= 0.9 vs sdpa cudnn fp8)")
    bf16 = {name: impls.get("msa bf16") for name, impls in by_case.items()}
    cands = [(name, impl, r) for name, impls in by_case.items() for impl, r in impls.items() if impl.startswith("msa")]
    if any(i not in ("msa fp8", "msa bf16", "msa fp8 exact") for _, i, _ in cands):
        print("\n==== candidates vs msa bf16 (default build) of the same case ====")
        print(f"{'case':24s} {'impl':22s} {'ms':>9s} {'TFLOP/s':>8s} {'bf16 / this':>11s}")
        for name, impl, r in cands:
            base = bf16.get(name)
            ratio = base[2] / r[2] if base and r[2] == r[2] else float("nan")
            print(f"{name:24s} {impl:22s} {r[2]:9.3f} {r[4]:8.0f} {ratio:11.3f}")


def prebuild_variants() -> list:
    """(dtype, head_dim, causal, paged, mode, head_dim_v, fp8_p) of every module the GPU tests and this bench load:
    16-bit mode O at head dims 64 / 128 / 256 and the Dqk != Dv pairs the tests use, the 16-bit max-score and sparse-Q
    modes (single-CTA and pair) at d128, fp8 O / sparse-Q / sparse-Q pairs (both softmax builds) and the fp8 index
    pass (74 modules)."""
    out = []
    for dt in ("bfloat16", "float16"):
        out += [(dt, d, c, pg, "o", None, None) for d in (64, 128, 256) for c in (True, False) for pg in (False, True)]
        out += [(dt, 128, c, pg, m, None, None) for m in ("o_maxscore", "maxscore", "sparse_q", "sparse_q2")
                for c in (True, False) for pg in (False, True)]
    out += [("bfloat16", 128, True, False, "o", 64, None), ("float16", 64, False, True, "o", 128, None),
            ("bfloat16", 256, True, False, "o", 128, None), ("bfloat16", 128, True, True, "o", 256, None)]
    for c in (True, False):
        out += [("float8_e4m3fn", 128, c, False, m, None, p8) for m in ("o", "sparse_q", "sparse_q2")
                for p8 in ("code", "exp2")]
        out.append(("float8_e4m3fn", 128, c, False, "maxscore", None, None))
    return out


def prebuild(directory: str, jobs: int = 2) -> int:
    """Build every module of :func:`prebuild_variants` (no GPU needed) and copy each to DIR/<variant_tag>.so: the
    directory a GPU host without the CUTLASS headers loads with ``MSA_FMHA_SM90_PREBUILT=DIR`` (tar it: ~25 MB)."""
    import shutil
    from concurrent.futures import ThreadPoolExecutor
    from pathlib import Path

    from msa.core.kernels import fmha_sm90 as k90

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)

    def build(v):
        dt, hd, causal, paged, mode, dv, fp8_p = v
        entry = k90.jit_spec(dt, hd, causal, paged, mode=mode, head_dim_v=dv, fp8_p=fp8_p).build()
        tag = k90.variant_tag(dt, hd, causal, paged, mode, dv, fp8_p)
        shutil.copy(entry.file("module.so"), out / f"{tag}.so")
        return tag

    variants = prebuild_variants()
    with ThreadPoolExecutor(jobs) as ex:
        for i, tag in enumerate(ex.map(build, variants), 1):
            print(f"[{i}/{len(variants)}] built {tag}", flush=True)
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default="default", choices=sorted(CASES))
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp16"])
    ap.add_argument("--no-peers", action="store_true")
    ap.add_argument("--json", default=None)
    ap.add_argument("--compare", default=None, help="directory of alternative prebuilt modules: adds an A/B row")
    ap.add_argument("--prebuild", default=None, metavar="DIR", help="build all variants into DIR (no GPU) and exit")
    ap.add_argument("--maxscore", action="store_true", help="also time O + max_score and max_score-only (ragged)")
    ap.add_argument("--fp8", action="store_true", help="only the fp8 e4m3 cases (see the module docstring)")
    ap.add_argument("--candidates", default="", help='with --fp8: "fp8:LABEL=DIR,bf16:LABEL=DIR" alternative builds')
    ap.add_argument("--split-ab", default="", help='extra split-KV choices "k,s;k,s" timed where the plan splits')
    ap.add_argument(
        "--compare-maxscore", default=None, metavar="DIR", help="alternative max-score-mode modules (A/B rows)"
    )
    args = ap.parse_args(argv)
    if args.prebuild:
        return prebuild(args.prebuild)
    if not torch.cuda.is_available():
        print("bench_fmha: needs a CUDA device", file=sys.stderr)
        return 2
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float16
    props = torch.cuda.get_device_properties(0)
    mm = matmul_tflops(args.warmup, args.reps)
    print(
        f"device: {props.name} ({props.multi_processor_count} SMs), torch {torch.__version__}, "
        f"cudnn {torch.backends.cudnn.version()}"
    )
    print(f"bf16 matmul 8192^3: {mm:.0f} TFLOP/s")
    if args.fp8:
        fp8_rows = bench_fp8(args.warmup, args.reps, not args.no_peers, parse_candidates(args.candidates))
        print_fp8(fp8_rows)
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"device": props.name, "matmul_tflops": mm, "rows": [list(map(str, r)) for r in fp8_rows]}, f)
        return 0
    results = []
    for case in CASES[args.cases]:
        name, b, hq, hkv, s, causal, paged = case[:7]
        try:
            rows = bench_case(
                name,
                b,
                hq,
                hkv,
                s,
                causal,
                paged,
                case[8] if len(case) > 8 else 128,
                dtype,
                args.warmup,
                args.reps,
                not args.no_peers,
                args.compare,
                args.maxscore,
                case[7] if len(case) > 7 else None,
                [tuple(int(x) for x in ks.split(",")) for ks in args.split_ab.split(";") if ks],
                args.compare_maxscore,
            )
        except Exception as e:  # one failing case must not cost the rest of the run
            import traceback

            traceback.print_exc()
            print(f"  {name}: FAILED {type(e).__name__}: {e}", flush=True)
            continue
        results.extend(rows)
        torch.cuda.empty_cache()
        for r in rows:
            print(f"  {r[0]:34s} {r[1]:14s} {r[2]:9.3f} ms  {r[4]:6.0f} TFLOP/s", flush=True)
    print()
    # speed-up columns: cuDNN time / this time; paged rows compare with the same kernel on ragged K/V
    print(
        f"{'case':34s} {'impl':14s} {'ms':>9s} {'TFLOP/s':>8s} {'%mm':>5s} {'vs cudnn':>8s} {'vs ragged':>9s} {'/ msa O':>7s}"
    )
    by_case = {}
    for r in results:
        by_case.setdefault(r[0], {})[r[1]] = r
    for name, impls in by_case.items():
        cud = impls.get("sdpa cudnn")
        # the same-run ragged row when the case has one (interleaved with the paged calls), else the ragged case
        ragged = impls.get("msa ragged (same run)") or (
            by_case.get(name.replace(" paged", ""), {}).get("msa fmha_sm90") if name.endswith(" paged") else None
        )
        ours_o = impls.get("msa fmha_sm90")
        for impl, r in impls.items():
            ratio = cud[2] / r[2] if cud and cud[2] == cud[2] and r[2] == r[2] else float("nan")
            vs_ragged = ragged[2] / r[2] if ragged and impl == "msa fmha_sm90" else float("nan")
            rel_o = r[2] / ours_o[2] if ours_o and impl.startswith("msa") else float("nan")
            print(
                f"{name:34s} {impl:14s} {r[2]:9.3f} {r[4]:8.0f} {100 * r[4] / mm:5.0f} {ratio:8.2f} {vs_ragged:9.2f}"
                f" {rel_o:7.3f}"
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": props.name, "matmul_tflops": mm, "rows": [list(map(str, r)) for r in results]}, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
