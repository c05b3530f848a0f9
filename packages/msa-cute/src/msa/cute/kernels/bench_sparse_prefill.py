"""Benchmark of the SM90 sparse prefill kernel, stage by stage (GPU).

    python -m msa.cute.kernels.bench_sparse_prefill --hq 64 --hkv 4 --seqlen 32768,131072 --topk 16 [--paged]
        [--variants serial,ws] [--selection random,correlated] [--corr-len 512]
        [--schedules kv_outer,q_outer,auto] [--route-factor 2]

Selections (``--selection``), per (token, KV head) the local (diagonal) block plus ``topk - 1`` visible blocks
(causal, bottom-right; fewer when fewer are visible), like MSA's forced-local top-k:

- ``random``: the ``topk - 1`` others uniformly at random, independently per token (the KV-outer design's best
  case, a Q-outer tile's worst);
- ``correlated``: the top ``topk - 1`` of smooth random index scores. Per (KV head, block) the score is value noise
  in the token position: i.i.d. uniform values at anchors every ``corr_len`` tokens, linearly interpolated between
  them, so a token's scores are a convex mix of two anchor rows and tokens closer than ``corr_len`` share most of
  their blocks (the selection changes only where two blocks' interpolated scores cross). It models what makes real
  MSA selections correlated: the indexer's scores are a smooth function of the query position (neighbouring
  queries have similar index-query vectors) and the forced local block is shared by a whole 128-token block.

For each selection the benchmark prints the measured union ``U`` of selected blocks per Q-outer tile (``128 // G``
consecutive tokens x the G heads of one KV head; mean and 90th percentile of ``U / topk`` over tiles): the quantity
that decides the Q-outer path's efficiency (``topk / U``, see benchmarks/sparse_prefill_notes.md section 4).

Reported per case: the k2q CSR build
with its schedule and slot tables (untimed in the public op's contract: it is the plan), the partial kernel, the
combine, and the whole ``sparse_atten_func`` call given that plan, with

    effective TFLOP/s = 2 * (Dqk + Dv) * Hq/Hkv * selected / time,

``selected`` = causally visible keys of the selected blocks summed over tokens and KV heads (the same count as
benchmarks/_harness/flops.py:sparse_selected_pairs). The project's bar: >= 550 at Hq/Hkv 64/4, S 32K and 128K.

Bandwidth floor of the KV-outer design (see benchmarks/sparse_prefill_notes.md): per selected (token, query head,
block) the partial kernel gathers one Q row (D x 2 B) and writes one partial O row (D x p B, p = 2 bf16 / 4 fp32)
plus its LSE (4 B), which the combine reads back; the combine writes O (D x 2 B) + LSE once per (token, head);
K/V are counted once per selected (KV head, block) (chunks of a row reuse them through L2 / smem). Each stage's
floor is its bytes over the copy bandwidth measured here (read + write of a 2 GiB device copy); "of floor" =
floor / measured time. The CSR build (plan, incl. schedule and slot tables) is reported apart, as in the op's
contract; its bytes are not modelled.

Schedules (``--schedules``, default all three when msa-core's Q-outer kernel module imports, else kv_outer):
``kv_outer`` = the table above; ``q_outer`` = every Q-outer item (128/G tokens x G heads of one KV head) through
msa-core's SM90 Q-outer kernel (``msa.core.kernels.fmha_sm90_qouter``) over the union of its tokens' blocks;
``auto`` = items with ``U <= route_factor * topk`` Q-outer, the rest KV-outer (their selections only; routed
tokens' lists set to -1), as ``msa.bridge.sparse_fmha(schedule="auto")`` does. Reported per Q-outer row: ``build``
(the union tables; for auto also the routing mask and the KV-outer CSR), ``q-outer`` (the Q-outer kernel alone),
``kv-outer`` (auto: the KV-outer call on the unrouted selections), ``total`` = kernels (as the KV-outer table's
total, plan excluded), TFLOP/s on it, TF+build = including the build (the per-call cost: tables depend on the
selection), ``routed`` = share of items on Q-outer. Effective FLOPs are counted on selected blocks as above.
Ragged K/V only (``--paged`` skips the Q-outer rows).
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics

import torch
from msa.cute.kernels import sparse_prefill_sm90 as sp

BLOCK = 128
D = 128
SCHEDULES = ("kv_outer", "q_outer", "auto")
QOUTER_MODULE = "msa.core.kernels.fmha_sm90_qouter"


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


def correlated_selection(total: int, hkv: int, topk: int, device, seed: int = 0, corr_len: int = 512,
                         chunk: int = 4096):
    """Like :func:`forced_local_selection`, but the ``topk - 1`` non-local blocks are the top scores of smooth value
    noise in the token position (see the module docstring; correlation length ``corr_len`` tokens)."""
    gen = torch.Generator(device=device).manual_seed(seed + 1)
    nblk = -(-total // BLOCK)
    n_anchor = total // corr_len + 2
    anchors = torch.rand(hkv, n_anchor, nblk, generator=gen, device=device)
    out = torch.full((hkv, total, topk), -1, dtype=torch.int32, device=device)
    blocks = torch.arange(nblk, device=device)
    for s in range(0, total, chunk):
        pos = torch.arange(s, min(total, s + chunk), device=device)
        local = pos // BLOCK
        a = pos // corr_len
        frac = ((pos % corr_len).to(torch.float32) / corr_len).view(1, -1, 1)
        score = anchors[:, a] * (1 - frac) + anchors[:, a + 1] * frac
        score = torch.where(blocks.view(1, 1, -1) < local.view(1, -1, 1), score, -1.0)
        score.scatter_(2, local.view(1, -1, 1).expand(hkv, -1, 1), 2.0)
        top = torch.topk(score, min(topk, nblk), dim=-1)
        ids = torch.where(top.values >= 0, top.indices, nblk)
        ids = torch.sort(ids, dim=-1).values
        ids = torch.where(ids == nblk, -1, ids).to(torch.int32)
        out[:, s:s + len(pos), :ids.shape[-1]] = ids
    return out


def tile_union(q2k: torch.Tensor, tile: int) -> torch.Tensor:
    """Distinct selected blocks per (KV head, tile of ``tile`` consecutive tokens) -> ``[Hkv * n_tiles]`` int64
    (one request; the Q-outer path's per-tile block list length U)."""
    hkv, total, _ = q2k.shape
    n_tiles = -(-total // tile)
    nblk = int(q2k.max().item()) + 1
    ids = q2k.to(torch.int64)
    tile_id = (torch.arange(total, device=q2k.device) // tile).view(1, -1, 1)
    key = (torch.arange(hkv, device=q2k.device).view(-1, 1, 1) * n_tiles + tile_id) * nblk + ids
    uniq = torch.unique(key[ids >= 0])
    return torch.bincount(uniq // nblk, minlength=hkv * n_tiles)


def selected_keys(q2k: torch.Tensor, total: int) -> int:
    ids = q2k.to(torch.int64)
    pos = torch.arange(total, device=q2k.device).view(1, -1, 1)
    start = ids.clamp(min=0) * BLOCK
    end = torch.minimum(torch.minimum(start + BLOCK, torch.full_like(start, total)), pos + 1)
    return int(((end - start).clamp(min=0) * (ids >= 0)).sum().item())


def copy_bandwidth(reps: int = 5) -> float:
    """Device copy bandwidth, bytes/s (read + write) over a 2 GiB copy."""
    bufs = [torch.ones(1 << 30, dtype=torch.int16, device="cuda"), torch.empty(1 << 30, dtype=torch.int16,
                                                                                device="cuda")]
    ms = _time(lambda: bufs[1].copy_(bufs[0]), reps)
    bufs.clear()
    torch.cuda.empty_cache()
    return 2 * (1 << 30) * 2 / (ms * 1e-3)


def stage_bytes(q2k: torch.Tensor, total_q: int, hq: int, part_bytes: int) -> dict:
    """Bytes each stage must move at least (the design's floor; see the module docstring)."""
    hkv = q2k.shape[0]
    g = hq // hkv
    triples = int((q2k >= 0).sum().item()) * g  # selected (token, query head, block)
    pair = q2k.to(torch.int64) * hkv + torch.arange(hkv, device=q2k.device).view(-1, 1, 1)
    kv_blocks = int(torch.unique(pair[q2k >= 0]).numel())  # distinct selected (KV head, block)
    partial = triples * (D * 2 + D * part_bytes + 4) + kv_blocks * 2 * BLOCK * D * 2
    combine = triples * (D * part_bytes + 4) + total_q * hq * (D * 2 + 4)
    return {"partial": partial, "combine": combine, "total": partial + combine, "triples": triples}


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


def bench_case(seqlen: int, hq: int, hkv: int, topk: int, paged: bool, partial_dtype: torch.dtype, reps: int,
               bandwidth: float, variants=(sp.DEFAULT_VARIANT,), selection: str = "random", corr_len: int = 512,
               schedules=("kv_outer",), route_factor: int = 2):
    from msa.cute import build_k2q_csr, sparse_atten_func

    dev = torch.device("cuda")
    g = hq // hkv
    q = torch.randn(seqlen, hq, D, device=dev, dtype=torch.bfloat16)
    k = torch.randn(seqlen, hkv, D, device=dev, dtype=torch.bfloat16)
    v = torch.randn(seqlen, hkv, D, device=dev, dtype=torch.bfloat16)
    cu = torch.tensor([0, seqlen], dtype=torch.int32, device=dev)
    if selection == "random":
        q2k = forced_local_selection(seqlen, hkv, topk, dev)
    else:
        q2k = correlated_selection(seqlen, hkv, topk, dev, corr_len=corr_len)
    union = tile_union(q2k, max(1, 128 // g)).to(torch.float64) / topk
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
    def plan():
        return build_k2q_csr(q2k, cu, cu, BLOCK, total_k=seqlen, total_rows=nblk, qhead_per_kv=g,
                             return_schedule=True)

    rp, qi, sched = plan()
    csr_ms = _time(plan, reps)  # CSR + schedule + slot tables (the plan; built once per selection)

    def call():
        return sparse_atten_func(q, k, v, rp, qi, topk, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=seqlen,
                                 max_seqlen_k=seqlen, causal=True, partial_dtype=partial_dtype, backend="kernel",
                                 schedule=sched, **extra)

    q_slot, n_slots = sched.q_slot, sched.n_slots
    o_part = torch.empty(topk, seqlen, hq, D, dtype=partial_dtype, device=dev)
    lse_part = torch.empty(topk, seqlen, hq, dtype=torch.float32, device=dev)
    kv_len = (cu[1:] - cu[:-1]).contiguous()
    pt = extra.get("page_table", torch.zeros(1, 1, dtype=torch.int32, device=dev))
    o = torch.empty(seqlen, hq, D, dtype=torch.bfloat16, device=dev)
    lse = torch.empty(seqlen, hq, dtype=torch.float32, device=dev)
    flops = 2 * (D + D) * g * selected_keys(q2k, seqlen)
    nbytes = stage_bytes(q2k, seqlen, hq, partial_dtype.itemsize)
    floor = {key: nbytes[key] / bandwidth * 1e3 for key in ("partial", "combine", "total")}
    rows = []
    common = {"seqlen": seqlen, "heads": f"{hq}/{hkv}", "topk": topk, "selection": selection,
              "union_mean": float(union.mean()), "union_p90": float(torch.quantile(union, 0.9))}
    for schedule in schedules:
        if schedule != "kv_outer" and not paged:
            rows.append({**common, **qouter_case(schedule, q, k, v, q2k, cu, topk, flops, reps, partial_dtype,
                                                 route_factor)})
    if "kv_outer" not in schedules:
        return rows
    for variant in variants:  # A/B on the same inputs and plan, same process
        saved = os.environ.get(sp.VARIANT_ENV)
        os.environ[sp.VARIANT_ENV] = variant
        try:
            total_ms = _time(call, reps)
        finally:
            if saved is None:
                os.environ.pop(sp.VARIANT_ENV, None)
            else:
                os.environ[sp.VARIANT_ENV] = saved
        # stage split: time the two kernels alone on prepared inputs
        part_fn, comb_fn = sp._kernels(g, paged, sp.PARTIAL_DTYPES[partial_dtype], "sm_90a", variant)
        ctas = sp.partial_ctas(sp._num_sms(dev.index or 0), sched.capacity, variant)
        partial_ms = _time(functools.partial(part_fn, q, k, v, sched.work, sched.work_count, q_slot, cu, cu, kv_len,
                                             pt, o_part, lse_part, D ** -0.5 * sp.LOG2_E, 1, topk, ctas), reps)
        combine_ms = _time(functools.partial(comb_fn, o_part, lse_part, n_slots, o, lse, topk), reps)
        rows.append({
            "schedule": "kv_outer",
            "seqlen": seqlen, "heads": f"{hq}/{hkv}", "topk": topk, "paged": paged, "partial": str(partial_dtype),
            "variant": variant, "selection": selection,
            "union_mean": float(union.mean()), "union_p90": float(torch.quantile(union, 0.9)),
            "csr_ms": csr_ms, "partial_ms": partial_ms, "combine_ms": combine_ms,
            "total_ms": total_ms, "tflops": flops / (total_ms * 1e-3) / 1e12,
            "tflops_partial": flops / (partial_ms * 1e-3) / 1e12, "items": int(sched.work_count.item()),
            "gbytes": nbytes["total"] / 1e9, "floor_ms": floor["total"],
            "frac_partial": floor["partial"] / partial_ms, "frac_combine": floor["combine"] / combine_ms,
            "frac_total": floor["total"] / total_ms, "tflops_floor": flops / (floor["total"] * 1e-3) / 1e12,
            "csr_share": (csr_ms + combine_ms) / (csr_ms + total_ms),
        })
    return rows


def qouter_case(schedule: str, q, k, v, q2k, cu, topk: int, flops: float, reps: int, partial_dtype,
                route_factor: int) -> dict:
    """Time one Q-outer schedule ("q_outer" or "auto", see the module docstring) on the given inputs."""
    import importlib

    from msa.cute import build_k2q_csr, sparse_atten_func
    from msa.cute.qouter import build_qouter_unions, default_umax, qouter_items

    qk = importlib.import_module(QOUTER_MODULE)
    seqlen, hq, _ = q.shape
    hkv = k.shape[1]
    g = hq // hkv
    dev = q.device
    kp = qk.plan([seqlen], [seqlen], hq, hkv, causal=True, device=dev)
    items = qouter_items([seqlen], hkv, g, kv_lens=[seqlen], device=dev)
    if (kp.T, kp.num_items) != (items.T, items.num_items):
        raise SystemExit(f"{QOUTER_MODULE}.plan: T {kp.T} / {kp.num_items} items, msa.cute.qouter_items: T {items.T} "
                         f"/ {items.num_items} (item enumeration contract broken)")
    route_max = None if schedule == "q_outer" else route_factor * topk
    umax = default_umax(items.T, topk, items.max_blocks, route_max)
    sel = q2k.transpose(0, 1)  # [total_q, Hkv, topk] view
    nblk = -(-seqlen // BLOCK)
    o = torch.empty_like(q)
    lse = torch.empty(seqlen, hq, dtype=torch.float32, device=dev)

    def unions():
        return build_qouter_unions(sel, items.item_token0, items.item_ntok, items.item_kv_head, T=items.T,
                                   num_items=items.num_items, umax=umax, route_max=route_max,
                                   item_kv_blocks=items.item_kv_blocks)

    def kv_plan(un):
        routed = (un.union_len >= 0).view(items.num_tiles, hkv)[items.token_tile.long()]
        q2k_kv = torch.where(routed.t().unsqueeze(-1), -1, q2k).contiguous()
        return build_k2q_csr(q2k_kv, cu, cu, BLOCK, total_k=seqlen, total_rows=nblk, qhead_per_kv=g,
                             return_schedule=True)

    def build():
        un = unions()
        return un, (kv_plan(un) if route_max is not None else None)

    un, csr = build()
    build_ms = _time(build, reps)
    qouter_ms = _time(lambda: qk.run(kp, q, k, v, un.union, un.union_len, un.mask, un.order, out=o, lse=lse,
                                     sm_scale=D ** -0.5), reps)
    kv_ms = 0.0
    if csr is not None:
        rp, qi, sched = csr
        kv_ms = _time(lambda: sparse_atten_func(q, k, v, rp, qi, topk, cu_seqlens_q=cu, cu_seqlens_k=cu,
                                                max_seqlen_q=seqlen, max_seqlen_k=seqlen, causal=True,
                                                partial_dtype=partial_dtype, backend="kernel", schedule=sched,
                                                return_softmax_lse=True), reps)

    def whole():  # what one call costs: tables + KV-outer on the unrouted part + Q-outer over the same O / LSE
        un_, csr_ = build()
        out, lse_ = o, lse
        if csr_ is not None:
            out, lse_ = sparse_atten_func(q, k, v, csr_[0], csr_[1], topk, cu_seqlens_q=cu, cu_seqlens_k=cu,
                                          max_seqlen_q=seqlen, max_seqlen_k=seqlen, causal=True,
                                          partial_dtype=partial_dtype, backend="kernel", schedule=csr_[2],
                                          return_softmax_lse=True)
        qk.run(kp, q, k, v, un_.union, un_.union_len, un_.mask, un_.order, out=out, lse=lse_, sm_scale=D ** -0.5)

    whole_ms = _time(whole, reps)
    routed = float((un.union_len >= 0).float().mean())
    total_ms = qouter_ms + kv_ms
    return {"schedule": schedule, "routed": routed, "umax": umax, "build_ms": build_ms, "qouter_ms": qouter_ms,
            "kv_ms": kv_ms, "total_ms": total_ms, "whole_ms": whole_ms, "tflops": flops / (total_ms * 1e-3) / 1e12,
            "tflops_build": flops / (whole_ms * 1e-3) / 1e12, "items": items.num_items}


def _qouter_importable() -> bool:
    import importlib

    try:
        importlib.import_module(QOUTER_MODULE)
    except Exception:
        return False
    return True


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--hq", type=int, default=64)
    p.add_argument("--hkv", type=int, default=4)
    p.add_argument("--seqlen", default="32768,131072")
    p.add_argument("--topk", type=int, default=16)
    p.add_argument("--paged", action="store_true")
    p.add_argument("--partial", choices=["bf16", "fp32"], default="bf16")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--variants", default=None,
                   help=f"partial kernel builds to A/B, comma separated: {sp.VARIANTS} (default: the op's default)")
    p.add_argument("--selection", default="random", help="comma separated: random, correlated")
    p.add_argument("--corr-len", type=int, default=512, help="correlated selection: score correlation length, tokens")
    p.add_argument("--schedules", default=None,
                   help="comma separated: kv_outer, q_outer, auto (default: all three when the Q-outer kernel "
                        "module imports, else kv_outer)")
    p.add_argument("--route-factor", type=int, default=2, help="auto: Q-outer iff U <= route_factor * topk")
    a = p.parse_args(argv)
    if a.schedules is None:
        schedules = SCHEDULES if _qouter_importable() else ("kv_outer",)
    else:
        schedules = tuple(a.schedules.split(","))
    for sc in schedules:
        if sc not in SCHEDULES:
            raise SystemExit(f"--schedules: expected a subset of {SCHEDULES}, got {sc!r}")
    if any(sc != "kv_outer" for sc in schedules) and not _qouter_importable():
        raise SystemExit(f"--schedules {','.join(schedules)}: {QOUTER_MODULE} does not import")
    variants = tuple(sp.partial_variant(x) for x in a.variants.split(",")) if a.variants else (sp.partial_variant(),)
    selections = a.selection.split(",")
    for sel in selections:
        if sel not in ("random", "correlated"):
            raise SystemExit(f"--selection: expected random or correlated, got {sel!r}")
    ok, why = sp.available(torch.device("cuda"))
    if not ok:
        raise SystemExit(f"sparse_prefill_sm90 unavailable: {why}")
    pdt = torch.bfloat16 if a.partial == "bf16" else torch.float32
    bw = copy_bandwidth()
    print(f"{torch.cuda.get_device_name()}  Hq/Hkv {a.hq}/{a.hkv}  topk {a.topk}  paged {a.paged}  partial {a.partial}"
          f"  copy bandwidth {bw / 1e9:.0f} GB/s")
    print(f"{'sel':>10} {'U/k':>5} {'U90/k':>5} {'S':>7} {'variant':>7} {'items':>8} {'csr':>7} {'partial':>8} "
          f"{'combine':>8} {'total':>8} {'TFLOP/s':>8} {'(partial)':>9} {'GB':>6} {'floor':>7} {'of floor':>8} "
          f"{'part':>5} {'comb':>5} {'TF@floor':>8} {'csr+comb':>8}")
    q_header = (f"{'sel':>10} {'U/k':>5} {'U90/k':>5} {'S':>7} {'schedule':>8} {'routed':>6} {'umax':>5} {'build':>7} "
                f"{'q-outer':>8} {'kv-outer':>8} {'total':>8} {'TFLOP/s':>8} {'call':>8} {'TF+build':>8}")
    for sel in selections:
        for s in (int(x) for x in a.seqlen.split(",")):
            for r in bench_case(s, a.hq, a.hkv, a.topk, a.paged, pdt, a.reps, bw, variants, sel, a.corr_len,
                                schedules, a.route_factor):
                if r["schedule"] != "kv_outer":  # Q-outer rows: own columns, printed as they come
                    print(f"{q_header}\n{sel:>10} {r['union_mean']:>5.2f} {r['union_p90']:>5.2f} {s:>7} "
                          f"{r['schedule']:>8} {r['routed']:>6.2f} {r['umax']:>5} {r['build_ms']:>7.3f} "
                          f"{r['qouter_ms']:>8.3f} {r['kv_ms']:>8.3f} {r['total_ms']:>8.3f} {r['tflops']:>8.1f} "
                          f"{r['whole_ms']:>8.3f} {r['tflops_build']:>8.1f}", flush=True)
                    continue
                print(f"{sel:>10} {r['union_mean']:>5.2f} {r['union_p90']:>5.2f} {s:>7} {r['variant']:>7} "
                      f"{r['items']:>8} {r['csr_ms']:>7.3f} {r['partial_ms']:>8.3f} {r['combine_ms']:>8.3f} "
                      f"{r['total_ms']:>8.3f} {r['tflops']:>8.1f} {r['tflops_partial']:>9.1f} {r['gbytes']:>6.2f} "
                      f"{r['floor_ms']:>7.3f} {r['frac_total']:>8.2f} {r['frac_partial']:>5.2f} "
                      f"{r['frac_combine']:>5.2f} {r['tflops_floor']:>8.1f} {r['csr_share']:>8.2f}", flush=True)
    if any(sc != "kv_outer" for sc in schedules):
        print("Q-outer rows: build = union tables (+ routing mask + KV-outer CSR for auto); total = q-outer + kv-outer "
              "kernels (plan excluded, as the KV-outer table); call = one whole call timed (build + kernels); "
              "TF+build = effective TFLOP/s of the whole call; routed = share of items on Q-outer")
    print("times in ms; U/k, U90/k = union of selected blocks per Q-outer tile (128/G tokens x G heads) over top-k, "
          "mean and 90th percentile; floor = modelled bytes / copy bandwidth; 'of floor' = floor / time (1.0 = at "
          "the floor); TF@floor = effective TFLOP/s if the whole call ran at the floor; csr+comb = (csr + combine) / "
          "(csr + total), the issue's <= 0.15 bar")


if __name__ == "__main__":
    main()
