"""Diagnostic launch of the SM90 sparse prefill partial kernel (msa.cute) on a small problem, for hangs.

usage (GPU host, after `source scripts/gpu_env.sh` with a bundle holding the variant):
    python3 scripts/debug_sparse_prefill.py PAGED DEBUG CTAS [WORK_ITEMS]
PAGED 0/1; DEBUG = the partial kernel's diagnostic bit mask (0 = the product kernel; see
SparsePrefillPartialSm90.__init__); CTAS = persistent CTAs; WORK_ITEMS = override the work count (-1 = all).
Prints host-side timestamps around load / launch / synchronize: a launch that returns but never synchronizes
is a device hang. Run each invocation under `timeout`.
"""
import sys
import time

import torch
from msa.cute import build_k2q_csr
from msa.cute.jit import CuteSpec
from msa.cute.kernels import sparse_prefill_sm90 as sp

paged, debug, ctas = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
n_work = int(sys.argv[4]) if len(sys.argv) > 4 else -1
T0 = time.time()


def say(*a):
    print(f"[{time.time() - T0:6.2f}s]", *a, flush=True)
gen = torch.Generator().manual_seed(8)
q_lens, kv_lens, hkv, group, topk = [8, 130], [128, 700], 1, 4, 3
hq = hkv * group
total_q, total_k = sum(q_lens), sum(kv_lens)
q = torch.randn(total_q, hq, 128, generator=gen).bfloat16()
k = torch.randn(total_k, hkv, 128, generator=gen).bfloat16()
v = torch.randn(total_k, hkv, 128, generator=gen).bfloat16()
cq = torch.tensor([0, 8, 138], dtype=torch.int32)
ck = torch.tensor([0, 128, 828], dtype=torch.int32)
# every token picks its first min(topk, visible) blocks (causal)
q2k = torch.full((hkv, total_q, topk), -1, dtype=torch.int32)
for b in range(2):
    for i in range(q_lens[b]):
        t = cq[b] + i
        vis = (i + kv_lens[b] - q_lens[b]) // 128 + 1
        sel = list(range(min(topk, vis)))
        q2k[0, t, : len(sel)] = torch.tensor(sel, dtype=torch.int32)
rp, qi = build_k2q_csr(q2k, cq, ck, 128, total_k=total_k)
dev = torch.device("cuda")
g = [x.to(dev) for x in (q, k, v, rp, qi, cq, ck)]
table = torch.zeros(1, 1, dtype=torch.int32, device=dev)
if paged:
    pages = []
    kp = torch.zeros(16, hkv, 128, 128, dtype=torch.bfloat16)
    vp = torch.zeros_like(kp)
    table = torch.zeros(2, 6, dtype=torch.int32)
    n = 0
    for b in range(2):
        for j in range(-(-kv_lens[b] // 128)):
            lo, hi = ck[b] + 128 * j, min(ck[b] + 128 * (j + 1), ck[b + 1])
            kp[n, :, : hi - lo] = k[lo:hi].transpose(0, 1)
            vp[n, :, : hi - lo] = v[lo:hi].transpose(0, 1)
            table[b, j] = n
            n += 1
    g[1], g[2], table = kp.to(dev), vp.to(dev), table.to(dev)
sched = sp._schedule(None, g[3], g[6], qi.shape[1], group)
q_slot, n_slots = sp.slot_tables(g[3], g[4], g[5], g[6], total_q)
print("work_count", sched.work_count.item(), "work", sched.work[: sched.work_count.item()].tolist()[:12], flush=True)
spec = CuteSpec(sp.PARTIAL, {"qhead_per_kv": group, "paged": bool(paged), "partial_dtype": "float32",
                             **({"debug": debug} if debug else {})}, "sm_90a")
say("loading")
fn = spec.load()
say("loaded")
if n_work >= 0:
    sched.work_count.fill_(n_work)
torch.cuda.synchronize()
op = torch.full((topk, total_q, hq, 128), float("nan"), dtype=torch.float32, device=dev)
lp = torch.full((topk, total_q, hq), float("nan"), dtype=torch.float32, device=dev)
kv_len = (g[6][1:] - g[6][:-1]).contiguous()
fn(g[0], g[1], g[2], sched.work, sched.work_count, q_slot, g[5], g[6], kv_len, table, op, lp, 0.09 * sp.LOG2_E, 1,
   topk, ctas)
say("launched (async)")
torch.cuda.synchronize()
say("synchronized")
print("finished; lse written:", int((~torch.isnan(lp)).sum()), "finite:", int(torch.isfinite(lp).sum()), flush=True)
