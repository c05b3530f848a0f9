"""Benchmark of the SM90 sparse prefill kernel, stage by stage (GPU; run with MSA_CUTE_EXPERIMENTAL=1).

    python -m msa.cute.kernels.bench_sparse_prefill --hq 64 --hkv 4 --seqlen 32768,131072 --topk 16 [--paged]

Selection: per (token, KV head) the local (diagonal) block plus ``topk - 1`` distinct random visible blocks (causal,
bottom-right; fewer when fewer are visible), like MSA's forced-local top-k. Reported per case: the k2q CSR build
(untimed in the public op's contract: it is the plan), the slot tables + schedule, the partial kernel, the combine,
and the whole ``sparse_atten_func`` call, with

    effective TFLOP/s = 2 * (Dqk + Dv) * Hq/Hkv * selected / time,

``selected`` = causally visible keys of the selected blocks summed over tokens and KV heads (the same count as
benchmarks/_harness/flops.py:sparse_selected_pairs). The project's bar: >= 550 at Hq/Hkv 64/4, S 32K and 128K.
"""

from __future__ import annotations

import argparse
import statistics

import torch
from msa.cute.kernels import sparse_prefill_sm90 as sp

BLOCK = 128
D = 128


def forced_local_selection(total: int, hkv: int, topk: int, device, seed: int = 0, chunk: int = 4096):
    """q2k ``[Hkv, total, topk]`` for one causal request with q_len == kv_len == total (ascending, -1 tail)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    nblk = -(-total // BLOCK)
    out = torch.full((hkv, total, topk), -1, dtype=torch.int32, device=device)
    blocks = torch.arange(nblk, device=device)
    for s in range(0, total, chunk):
        pos = torch.arange(s, min(total, s + chunk), device=device)
        local = pos // BLOCK
        score = torch.rand(hkv, len(pos), nblk, generator=gen, device=device)
        score = torch.where(blocks.view(1, 1, -1) < local.view(1, -1, 1), score, -1.0)  # earlier visible blocks
        score.scatter_(2, local.view(1, -1, 1).expand(hkv, -1, 1), 2.0)  # the local block always wins
        top = torch.topk(score, min(topk, nblk), dim=-1)
        ids = torch.where(top.values >= 0, top.indices, nblk)  # invisible -> sentinel, sorts last
        ids = torch.sort(ids, dim=-1).values
        ids = torch.where(ids == nblk, -1, ids).to(torch.int32)
        out[:, s:s + len(pos), :ids.shape[-1]] = ids
    return out


def selected_keys(q2k: torch.Tensor, total: int) -> int:
    ids = q2k.to(torch.int64)
    pos = torch.arange(total, device=q2k.device).view(1, -1, 1)
    start = ids.clamp(min=0) * BLOCK
    end = torch.minimum(torch.minimum(start + BLOCK, torch.full_like(start, total)), pos + 1)
    return int(((end - start).clamp(min=0) * (ids >= 0)).sum().item())


def _time(fn, reps: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def bench_case(seqlen: int, hq: int, hkv: int, topk: int, paged: bool, partial_dtype: torch.dtype, reps: int):
    from msa.cute import build_k2q_csr, sparse_atten_func

    dev = torch.device("cuda")
    g = hq // hkv
    q = torch.randn(seqlen, hq, D, device=dev, dtype=torch.bfloat16)
    k = torch.randn(seqlen, hkv, D, device=dev, dtype=torch.bfloat16)
    v = torch.randn(seqlen, hkv, D, device=dev, dtype=torch.bfloat16)
    cu = torch.tensor([0, seqlen], dtype=torch.int32, device=dev)
    q2k = forced_local_selection(seqlen, hkv, topk, dev)
    nblk = -(-seqlen // BLOCK)
    extra = {}
    if paged:
        if seqlen % BLOCK:
            raise SystemExit(f"--paged needs a sequence length that is a multiple of {BLOCK}, got {seqlen}")
        k = k.view(nblk, BLOCK, hkv, D).transpose(1, 2).contiguous()
        v = v.view(nblk, BLOCK, hkv, D).transpose(1, 2).contiguous()
        perm = torch.randperm(nblk, device=dev)  # physical page i holds logical block perm[i]
        k, v = k[perm].contiguous(), v[perm].contiguous()
        inv = torch.empty_like(perm)
        inv[perm] = torch.arange(nblk, device=dev)
        extra["page_table"] = inv.view(1, -1).to(torch.int32)
    rp, qi = build_k2q_csr(q2k, cu, cu, BLOCK, total_k=seqlen, total_rows=nblk, qhead_per_kv=g)
    csr_ms = _time(lambda: build_k2q_csr(q2k, cu, cu, BLOCK, total_k=seqlen, total_rows=nblk, qhead_per_kv=g), reps)
    tables_ms = _time(lambda: (sp._schedule(None, rp, cu, qi.shape[1], g), sp.slot_tables(rp, qi, cu, cu, seqlen)),
                      reps)

    def call():
        return sparse_atten_func(q, k, v, rp, qi, topk, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=seqlen,
                                 max_seqlen_k=seqlen, causal=True, partial_dtype=partial_dtype, backend="kernel",
                                 **extra)

    total_ms = _time(call, reps)
    # stage split: time the two kernels alone on prepared inputs
    sched = sp._schedule(None, rp, cu, qi.shape[1], g)
    q_slot, n_slots = sp.slot_tables(rp, qi, cu, cu, seqlen)
    part_fn, comb_fn = sp._kernels(g, paged, sp.PARTIAL_DTYPES[partial_dtype])
    o_part = torch.empty(topk, seqlen, hq, D, dtype=partial_dtype, device=dev)
    lse_part = torch.empty(topk, seqlen, hq, dtype=torch.float32, device=dev)
    kv_len = (cu[1:] - cu[:-1]).contiguous()
    pt = extra.get("page_table", torch.zeros(1, 1, dtype=torch.int32, device=dev))
    ctas = min(sched.capacity, sp.CTAS_PER_SM * sp._num_sms(dev.index or 0))
    partial_ms = _time(lambda: part_fn(q, k, v, sched.work, sched.work_count, q_slot, cu, cu, kv_len, pt, o_part,
                                       lse_part, D ** -0.5 * sp.LOG2_E, 1, topk, ctas), reps)
    o = torch.empty(seqlen, hq, D, dtype=torch.bfloat16, device=dev)
    lse = torch.empty(seqlen, hq, dtype=torch.float32, device=dev)
    combine_ms = _time(lambda: comb_fn(o_part, lse_part, n_slots, o, lse, topk), reps)
    flops = 2 * (D + D) * g * selected_keys(q2k, seqlen)
    return {
        "seqlen": seqlen, "heads": f"{hq}/{hkv}", "topk": topk, "paged": paged, "partial": str(partial_dtype),
        "csr_ms": csr_ms, "tables_ms": tables_ms, "partial_ms": partial_ms, "combine_ms": combine_ms,
        "total_ms": total_ms, "tflops": flops / (total_ms * 1e-3) / 1e12,
        "tflops_partial": flops / (partial_ms * 1e-3) / 1e12, "items": int(sched.work_count.item()),
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--hq", type=int, default=64)
    p.add_argument("--hkv", type=int, default=4)
    p.add_argument("--seqlen", default="32768,131072")
    p.add_argument("--topk", type=int, default=16)
    p.add_argument("--paged", action="store_true")
    p.add_argument("--partial", choices=["bf16", "fp32"], default="bf16")
    p.add_argument("--reps", type=int, default=10)
    a = p.parse_args(argv)
    ok, why = sp.available(torch.device("cuda"))
    if not ok:
        raise SystemExit(f"sparse_prefill_sm90 unavailable: {why}")
    pdt = torch.bfloat16 if a.partial == "bf16" else torch.float32
    print(f"{torch.cuda.get_device_name()}  Hq/Hkv {a.hq}/{a.hkv}  topk {a.topk}  paged {a.paged}  partial {a.partial}")
    print(f"{'S':>7} {'items':>8} {'csr':>7} {'tables':>7} {'partial':>8} {'combine':>8} {'total':>8} "
          f"{'TFLOP/s':>8} {'(partial)':>9}")
    for s in (int(x) for x in a.seqlen.split(",")):
        r = bench_case(s, a.hq, a.hkv, a.topk, a.paged, pdt, a.reps)
        print(f"{s:>7} {r['items']:>8} {r['csr_ms']:>7.3f} {r['tables_ms']:>7.3f} {r['partial_ms']:>8.3f} "
              f"{r['combine_ms']:>8.3f} {r['total_ms']:>8.3f} {r['tflops']:>8.1f} {r['tflops_partial']:>9.1f}",
              flush=True)


if __name__ == "__main__":
    main()
