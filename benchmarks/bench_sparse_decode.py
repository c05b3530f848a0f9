"""Per-token block-sparse paged decode (msa.core.fmha with kv_block_indexes): bandwidth on the selected K/V.

Bytes counted = every (token, KV head)'s selected K + V pages read once (k x 2 x 128 x 128 x 2 B = 64 KiB per
block), i.e. no reuse between tokens: each token's blocks are drawn independently from a page pool much larger
than L2 (the worst case for MTP, whose tokens share most blocks in practice). Contexts beyond the pool map their
logical pages onto it at random (the page table is what a 1M context looks like; the bytes read are the same).
Times are CUDA-graph replays (20 calls per graph) with CUDA events; the reference is a device-to-device copy
(read + write bytes / time). Prints one line per shape: us/call, GB/s, fraction of the copy bandwidth.

    python benchmarks/bench_sparse_decode.py           # the issue-7 bar shapes (Hq 64, Hkv 4, d128, k 16)
    python benchmarks/bench_sparse_decode.py --quick   # small shapes only
    python benchmarks/bench_sparse_decode.py --dtypes bf16,fp8   # also fp8 e4m3 Q = K = V (half the bytes), same shapes
"""

from __future__ import annotations

import argparse
import os

import msa.core as core
import torch

HQ, HKV, D, BLOCK = 64, 4, 128, 128


def copy_bandwidth(nbytes: int = 2 << 30) -> float:
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device="cuda").normal_()
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        dst.copy_(src)
    end.record()
    torch.cuda.synchronize()
    return 2 * nbytes * 10 / (start.elapsed_time(end) * 1e-3)


def graph_time(fn, calls: int = 20, reps: int = 5) -> float:
    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(calls):
            fn()
    g.replay()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        g.replay()
        end.record()
        torch.cuda.synchronize()
        best = min(best, start.elapsed_time(end) * 1e-3 / calls)
    return best


def run_shape(batch, q_len, context, topk, k, v, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    pool_pages = k.shape[0]
    n_blk = context // BLOCK
    plan = core.fmha_plan([q_len] * batch, [context] * batch, HQ, HKV, page_size=BLOCK, kv_block_num=topk,
                          device="cuda")
    kv_indices = torch.randint(0, pool_pages, (plan.num_pages,), generator=gen, device="cuda", dtype=torch.int32)
    total_q = plan.total_q
    # k distinct random blocks per (token, head), the local (last) block always in, ascending
    r = torch.rand(total_q * HKV, n_blk - 1, generator=gen, device="cuda")
    pick = r.topk(topk - 1, dim=1).indices if topk > 1 else r[:, :0].long()
    last = torch.full((total_q * HKV, 1), n_blk - 1, device="cuda", dtype=torch.long)
    blocks = torch.cat([pick, last], 1).sort(dim=1).values.to(torch.int32).view(total_q, HKV, topk).contiguous()
    q = torch.randn(total_q, HQ, D, generator=gen, device="cuda").to(k.dtype)
    out = torch.empty(q.shape, dtype=torch.bfloat16 if q.dtype == torch.float8_e4m3fn else q.dtype, device="cuda")

    def call():
        core.fmha(q, k, v, plan, kv_indices=kv_indices, kv_block_indexes=blocks, out=out, backend="kernel")

    t = graph_time(call)
    nbytes = total_q * HKV * topk * 2 * BLOCK * D * q.element_size()
    # distinct (pool page, head) pairs actually read: tokens of one request share their local block
    base = plan.kv_page_indptr[:-1].repeat_interleave(q_len).view(-1, 1, 1).long()
    pages = kv_indices.long()[base + blocks.long()]
    heads = torch.arange(HKV, device="cuda").view(1, -1, 1)
    unique = int(torch.unique(pages * HKV + heads).numel()) * 2 * BLOCK * D * q.element_size()
    return t, nbytes, unique, plan.kernel["sparse_decode"].splits


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--sweep", action="store_true", help="also sweep the split count for batch 32 / 64, q_len 1")
    ap.add_argument("--pool-gib", type=float, default=24.0, help="K + V page pool size (bf16; fp8 uses half)")
    ap.add_argument("--dtypes", default="bf16", help="comma list of bf16, fp8 (fp8 e4m3 Q = K = V, output bf16)")
    args = ap.parse_args()
    name = torch.cuda.get_device_name()
    bw = copy_bandwidth()
    print(f"# {name}; device copy bandwidth {bw / 1e9:.0f} GB/s (read + write); Hq {HQ} Hkv {HKV} d {D}")
    page_bytes = 2 * HKV * BLOCK * D * 2
    pool = int(args.pool_gib * (1 << 30) // page_bytes)
    dtypes = {"bf16": torch.bfloat16, "fp8": torch.float8_e4m3fn}
    pools = {}
    for dn in args.dtypes.split(","):
        if dn not in dtypes:
            raise SystemExit(f"--dtypes: expected bf16 / fp8, got {dn!r}")
        kv = []
        for _ in range(2):  # K, V filled in slices (an fp32 randn of the whole pool would need 4x the memory)
            t = torch.empty(pool, HKV, BLOCK, D, device="cuda", dtype=dtypes[dn])
            for i in range(0, pool, 4096):
                t[i:i + 4096] = torch.randn(t[i:i + 4096].shape, device="cuda").to(t.dtype)
            kv.append(t)
        pools[dn] = kv
    shapes = [(4, 1, 8192, 16, None, None), (8, 4, 16384, 16, None, None)] if args.quick else [
        (b, ql, ctx, 16, None, None) for ctx in (131072, 1048576) for ql in (1, 8) for b in (32, 64, 128)
    ]
    if args.sweep:
        shapes += [(b, 1, ctx, 16, s, None) for ctx in (131072, 1048576) for b in (32, 64) for s in (1, 2, 4, 8)]
        shapes += [(b, ql, ctx, 16, s, st) for st in (2, 4) for ctx in (131072, 1048576) for ql, b in
                   ((1, 32), (1, 64), (1, 128), (8, 32)) for s in ((None, 4) if b == 32 and ql == 1 else (None,))]
    print(f"# pool {pool} pages ({args.pool_gib:.0f} GiB K+V); 'uniq' = GB/s on distinct (page, head) bytes")
    print(f"{'dtype':>5} {'batch':>5} {'q_len':>5} {'context':>8} {'k':>3} {'splits':>6} {'us':>9} {'GB':>7} "
          f"{'GB/s':>7} {'of copy':>7} {'uniq':>6} stages  vs bf16")
    for b, ql, ctx, topk, splits, stages in shapes:
        for var, val in (("MSA_SPARSE_DECODE_SPLITS", splits), ("MSA_SPARSE_DECODE_STAGES", stages)):
            if val is None:
                os.environ.pop(var, None)
            else:
                os.environ[var] = str(val)
        times = {}
        for dn, (k, v) in pools.items():
            t, nbytes, unique, used = run_shape(b, ql, ctx, topk, k, v)
            times[dn] = t
            ratio = f"{times['bf16'] / t:.2f}x" if "bf16" in times and dn != "bf16" else ""
            print(f"{dn:>5} {b:>5} {ql:>5} {ctx:>8} {topk:>3} {used:>6} {t * 1e6:>9.1f} {nbytes / 1e9:>7.3f} "
                  f"{nbytes / t / 1e9:>7.0f} {nbytes / t / bw:>7.1%} {unique / t / 1e9:>6.0f} {stages or '-':>6}  "
                  f"{ratio}", flush=True)

if __name__ == "__main__":
    main()
