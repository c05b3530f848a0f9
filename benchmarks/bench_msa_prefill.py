"""One MSA attention layer's prefill, end to end, against dense attention (GPU; the project's headline number).

    python3 benchmarks/bench_msa_prefill.py [--seqlen 32768,131072,1048576] [--chunk 8192] [--json out.json]

Per query chunk ``[s, e)`` against keys ``[0, e)`` (chunked prefill, as a serving engine runs it):

1. index pass: ``msa.core.fmha`` score-only, index Q ``[n, H_idx, 128]`` x one shared index-K head
   -> ``max_score [H_idx, tiles, n]`` (dense over the visible keys, H_idx = 4 heads instead of Hq = 64);
2. top-k: ``msa.core.sparse_topk_select`` (k blocks, the local block forced, ``num_valid_pages`` = own block + 1);
3. sparse attention: ``msa.bridge.sparse_fmha`` (k2q CSR + ``msa.cute.sparse_atten_func``), index head r -> KV
   head r (H_idx = Hkv);
4. dense attention (the comparison): ``msa.core.fmha`` on the same chunk. Contexts above ``--dense-max`` time the
   dense kernel on the LAST chunk only and extrapolate (causal cost of chunk i is proportional to its visible key
   pairs, counted exactly), printed as "est.".

``--inputs random`` (default): random index Q/K (no trained index), so the selections are close to uniformly random
among the visible blocks -- the worst case for locality (the sparse step runs KV-outer). ``--inputs smooth``: the
index queries vary smoothly with the position (linear interpolation between random anchors every ``--corr-len``
tokens), as a trained indexer's do, so neighbouring tokens select nearly the same blocks (the sparse step's default
"auto" schedule then runs them Q-outer). Q/K/V of the attention itself stay random in both modes. Times are CUDA-event device times per stage, summed over chunks (median of --reps).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

BLOCK = 128
D = 128


def _event_time(fn, reps: int) -> tuple[float, object]:
    """Median device time (ms) of ``fn`` over ``reps`` calls after one untimed call, and its last result (host timer
    off CUDA). The untimed call takes the one-time costs out of the medians: module loads (a JIT build on a host
    without a warmed store) and each plan's lazily built kernel-side tables."""
    out = fn()
    times = []
    for _ in range(reps):
        if torch.cuda.is_available():
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            out = fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
        else:
            t0 = time.perf_counter()
            out = fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), out


def _pairs(s: int, e: int) -> int:
    """Causally visible (query, key) pairs of queries [s, e) against keys [0, e) (bottom-right = top-left here)."""
    n = e - s
    return n * s + n * (n + 1) // 2


def _index_queries(s, e, hidx, gen, anchors, corr_len):
    """Index queries of tokens [s, e): random, or (anchors given) interpolated between per-corr_len anchors."""
    if anchors is None:
        return None
    pos = torch.arange(s, e, device=anchors.device)
    a = pos // corr_len
    f = ((pos % corr_len).to(torch.float32) / corr_len).view(-1, 1, 1)
    return (anchors[a] * (1 - f) + anchors[a + 1] * f).to(torch.bfloat16)


def _chunk(s, e, k, v, ik, hq, hkv, topk, reps, gen, with_dense, iq=None, schedule="auto") -> dict:
    """Stage times (ms) of one query chunk [s, e) against keys [0, e). Inputs in k's dtype (bf16, or fp8 e4m3 for the
    index pass, the sparse step and the dense comparison alike; unit scales)."""
    from msa.bridge import sparse_fmha, sparse_fmha_plan
    from msa.core import fmha, fmha_plan, sparse_topk_select

    dev, bf, n, hidx = k.device, torch.bfloat16, e - s, hkv
    q = torch.randn(n, hq, D, device=dev, dtype=bf, generator=gen).to(k.dtype)
    if iq is None:
        iq = torch.randn(n, hidx, D, device=dev, dtype=bf, generator=gen)
    iq = iq.to(ik.dtype)
    iplan = fmha_plan([n], [e], hidx, 1, output_maxscore=True, device=dev)
    out = {}
    scores = [None]  # the index pass's max_score, dropped right after the top-k (1 GB per 8K-query chunk at 1M)
    out["index"], (_, scores[0]) = _event_time(
        lambda: fmha(iq, ik[:e], None, iplan, output_o=False, output_maxscore=True), reps)
    own = (torch.arange(s, e, device=dev) // BLOCK + 1).to(torch.int32)
    out["topk"], sel = _event_time(
        lambda: sparse_topk_select(scores[0], topk, num_valid_pages=own, force_end_blocks=1), reps)
    scores[0] = None
    splan = sparse_fmha_plan([n], [e], hq, hkv, kv_block_num=topk, device=dev, schedule=schedule)
    out["sparse"], _ = _event_time(lambda: sparse_fmha(q, k[:e], v[:e], splan, kv_block_indexes=sel), reps)
    if with_dense:
        dplan = fmha_plan([n], [e], hq, hkv, device=dev)
        out["dense"], _ = _event_time(lambda: fmha(q, k[:e], v[:e], dplan), reps)
    return out


def bench_context(seqlen: int, hq: int, hkv: int, topk: int, chunk: int, dense_max: int, reps: int,
                  seed: int = 0, device: str = "cuda", inputs: str = "random", corr_len: int = 512,
                  schedule: str = "auto", dtype: str = "bf16") -> dict:
    dev = torch.device(device)
    gen = torch.Generator(device=dev).manual_seed(seed)
    hidx, bf = hkv, torch.bfloat16
    dt = {"bf16": bf, "fp8": torch.float8_e4m3fn}[dtype]
    k = torch.randn(seqlen, hkv, D, device=dev, dtype=bf, generator=gen).to(dt)
    v = torch.randn(seqlen, hkv, D, device=dev, dtype=bf, generator=gen).to(dt)
    ik = torch.randn(seqlen, 1, D, device=dev, dtype=bf, generator=gen).to(dt)
    anchors = None
    if inputs == "smooth":
        anchors = torch.randn(seqlen // corr_len + 2, hidx, D, device=dev, dtype=torch.float32, generator=gen)
    chunks = [(s, min(seqlen, s + chunk)) for s in range(0, seqlen, chunk)]
    t = dict(index=0.0, topk=0.0, sparse=0.0, dense=0.0)
    dense_estimated = seqlen > dense_max
    for ci, (s, e) in enumerate(chunks):
        with_dense = not dense_estimated or ci == len(chunks) - 1
        times = _chunk(s, e, k, v, ik, hq, hkv, topk, reps, gen, with_dense,
                       _index_queries(s, e, hidx, gen, anchors, corr_len), schedule)
        for name, ms in times.items():
            if name == "dense" and dense_estimated:  # the last chunk, scaled by the exact pair count of the prefill
                ms *= _pairs(0, seqlen) / _pairs(s, e)
            t[name] += ms
    msa_ms = t["index"] + t["topk"] + t["sparse"]
    dense_flops = 4 * D * hq * _pairs(0, seqlen)
    return {
        "seqlen": seqlen, "hq": hq, "hkv": hkv, "index_heads": hidx, "topk": topk, "chunk": chunk, "inputs": inputs,
        "schedule": schedule, "dtype": dtype,
        "index_ms": t["index"], "topk_ms": t["topk"], "sparse_ms": t["sparse"], "msa_ms": msa_ms,
        "dense_ms": t["dense"], "dense_estimated": dense_estimated, "speedup": t["dense"] / msa_ms,
        "dense_tflops": dense_flops / (t["dense"] * 1e-3) / 1e12,
    }


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seqlen", default="32768,131072")
    p.add_argument("--hq", type=int, default=64)
    p.add_argument("--hkv", type=int, default=4)
    p.add_argument("--topk", type=int, default=16)
    p.add_argument("--chunk", type=int, default=8192)
    p.add_argument("--dense-max", type=int, default=131072, help="longest context timed densely in full")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--json", default=None)
    p.add_argument("--inputs", default="random", help="comma list: random, smooth (see the module docstring)")
    p.add_argument("--corr-len", type=int, default=512, help="smooth inputs: anchor spacing of the index queries")
    p.add_argument("--schedule", default="auto", help="comma list of msa.bridge sparse schedules: auto, kv_outer, q_outer")
    p.add_argument("--dtype", default="bf16",
                   help="comma list: bf16, fp8 (e4m3 index Q/K, attention Q/K/V and dense comparison; O in bf16)")
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_msa_prefill: needs a CUDA device")
    from msa.core.dispatch import registered_kernels

    print(f"{torch.cuda.get_device_name()}  Hq/Hkv/index {a.hq}/{a.hkv}/{a.hkv}  topk {a.topk}  chunk {a.chunk}  "
          f"kernels: fmha {registered_kernels('fmha')}, sparse {registered_kernels('sparse_atten_func')}")
    rows = []
    print(f"{'inputs':>7} {'S':>8} {'index':>9} {'top-k':>8} {'sparse':>9} {'MSA':>9} {'dense':>10} {'dense/MSA':>9}"
          "  (ms)")
    for dtype in a.dtype.split(","):
        if dtype not in ("bf16", "fp8"):
            raise SystemExit(f"--dtype: expected bf16 and/or fp8, got {dtype!r}")
        for inputs in a.inputs.split(","):
            if inputs not in ("random", "smooth"):
                raise SystemExit(f"--inputs: expected random and/or smooth, got {inputs!r}")
            for sched in a.schedule.split(","):
                for s in [int(x) for x in a.seqlen.split(",")]:
                    r = bench_context(s, a.hq, a.hkv, a.topk, a.chunk, a.dense_max, a.reps, inputs=inputs,
                                      corr_len=a.corr_len, schedule=sched, dtype=dtype)
                    rows.append(r)
                    est = " est." if r["dense_estimated"] else ""
                    tag = inputs if sched == "auto" else f"{inputs}/{sched}"
                    tag = tag if dtype == "bf16" else f"{tag}/fp8"
                    print(f"{tag:>7} {s:>8} {r['index_ms']:9.2f} {r['topk_ms']:8.2f} {r['sparse_ms']:9.2f} "
                          f"{r['msa_ms']:9.2f} {r['dense_ms']:10.1f}{est} {r['speedup']:8.1f}x", flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
