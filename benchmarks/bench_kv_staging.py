"""Quantised K/V in sparse prefill: what staging costs.

fp8 and NVFP4 K/V reach the 16-bit sparse prefill kernels through ``msa.cute.quant.dequantize_kv`` (one
memory-bound pass over the K/V a call reads). Two numbers per shape, in one process on one GPU:

1. ``dequantize_kv`` alone: GB/s over its bytes (fp8 1 B + 2 B per element; NVFP4 0.5 + 1/16 + 2 B) vs a bf16 device
   copy (2 + 2 B per element) -- the floor is that copy's bandwidth.
2. the whole ``msa.bridge.sparse_fmha`` call (causal, top-16 blocks of 128, d128, schedule auto) with bf16 K/V, with
   fp8 K/V under a bf16 Q, and with NVFP4 K/V: ms and the ratio to bf16 (staging share = the difference). Selections:
   ``correlated`` (a trained indexer's: mostly Q-outer) or ``random`` (KV-outer). Queued timing: ``--calls`` calls
   between two events, median of ``--reps``.

    python3 benchmarks/bench_kv_staging.py --seqs 32768,131072 --heads 64:4,16:1 --selection correlated
"""

from __future__ import annotations

import argparse
import statistics
from functools import partial

import torch
from _harness.timing import per_call_ms


def _time(fn, reps: int, calls: int) -> float:
    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    dev = torch.device("cuda")
    return statistics.median(per_call_ms(fn, calls, dev) for _ in range(reps))


def main(argv=None) -> None:
    from msa.bridge import sparse_fmha, sparse_fmha_plan
    from msa.cute import quant as Q
    from msa.cute.kernels.bench_sparse_prefill import correlated_selection, selected_keys

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seqs", default="32768,131072")
    p.add_argument("--heads", default="64:4,16:1", help="Hq:Hkv list")
    p.add_argument("--selection", default="correlated", choices=["correlated", "random"])
    p.add_argument("--topk", type=int, default=16)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--calls", type=int, default=3)
    a = p.parse_args(argv)
    dev = torch.device("cuda")
    d = 128
    print(f"device: {torch.cuda.get_device_name(dev)}")
    rows = []
    for s in (int(x) for x in a.seqs.split(",")):
        for hq, hkv in (tuple(int(y) for y in x.split(":")) for x in a.heads.split(",")):
            g = torch.Generator(device=dev).manual_seed(0)
            q = torch.randn(s, hq, d, device=dev, generator=g).bfloat16()
            k = torch.randn(s, hkv, d, device=dev, generator=g) * 2
            v = torch.randn(s, hkv, d, device=dev, generator=g) * 2
            if a.selection == "correlated":
                q2k = correlated_selection(s, hkv, a.topk, dev)
            else:
                nb = -(-s // 128)
                own = torch.arange(s, device=dev) // 128 + 1
                sc = torch.rand(hkv, s, nb, device=dev, generator=g)
                sc = torch.where(torch.arange(nb, device=dev) < own.view(1, -1, 1), sc, -1.0)
                sc[:, torch.arange(s, device=dev), own - 1] = 2.0  # the local block
                q2k = torch.sort(torch.topk(sc, min(a.topk, nb), dim=-1).indices, dim=-1).values.int()
                q2k = torch.where(torch.gather(sc, -1, q2k.long()) >= 0, q2k, -1)
                q2k = torch.sort(torch.where(q2k < 0, 1 << 30, q2k), -1).values
                q2k = torch.where(q2k == 1 << 30, -1, q2k).int()
            sel = q2k.permute(1, 0, 2).contiguous()
            flops = 2 * (d + d) * (hq // hkv) * selected_keys(q2k, s)
            plan = sparse_fmha_plan([s], [s], hq, hkv, kv_block_num=a.topk, device=dev)
            kb, vb = k.bfloat16(), v.bfloat16()
            k8, v8 = k.to(torch.float8_e4m3fn), v.to(torch.float8_e4m3fn)
            k4, v4 = Q.quantize_nvfp4(k, "auto"), Q.quantize_nvfp4(v, "auto")
            del k, v
            out = torch.empty(s, hq, d, dtype=torch.bfloat16, device=dev)
            calls = {  # partials, not closures: each binds this iteration's tensors
                "bf16": partial(sparse_fmha, q, kb, vb, plan, kv_block_indexes=sel, out=out),
                "fp8-kv": partial(sparse_fmha, q, k8, v8, plan, kv_block_indexes=sel, out=out),
                "nvfp4-kv": partial(sparse_fmha, q, k4, v4, plan, kv_block_indexes=sel, out=out),
            }
            ms = {n: _time(fn, a.reps, a.calls) for n, fn in calls.items()}
            n_el = s * hkv * d
            deq = {
                "fp8": (partial(Q.dequantize_kv, k8), n_el * 3),
                "nvfp4": (partial(Q.dequantize_kv, k4), n_el * (0.5 + 1 / 16 + 2)),
                "bf16 copy": (kb.clone, n_el * 4),
            }
            deq_ms = {n: _time(fn, a.reps, 10) for n, (fn, _) in deq.items()}
            for n, t in ms.items():
                stage = 2 * deq_ms[n.split("-")[0]] if n != "bf16" else 0.0
                rows.append((s, f"{hq}/{hkv}", n, t, flops / t / 1e9, t / ms["bf16"], stage))
            for n, (_, by) in deq.items():
                print(f"S{s // 1024}K {hq}/{hkv} dequantize {n:9s} {deq_ms[n] * 1e3:8.1f} us {by / deq_ms[n] / 1e6:7.0f} GB/s")
            del calls, deq, kb, vb, k8, v8, k4, v4, q, out
            torch.cuda.empty_cache()
    print(f"\n| S | Hq/Hkv | K/V | ms | eff TFLOP/s | vs bf16 | K+V staging ms (alone) |  ({a.selection} selection)")
    print("|---|---|---|---|---|---|---|")
    for s, h, n, t, tf, r, st in rows:
        print(f"| {s // 1024}K | {h} | {n} | {t:.3f} | {tf:.0f} | {r:.3f} | {st:.3f} |")


if __name__ == "__main__":
    main()
