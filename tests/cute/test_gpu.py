"""GPU variants of the key checks (skipped without CUDA): device results == CPU reference, no host sync on the
default path, decode run() capturable in a CUDA graph. With a kernel registered these compare kernel vs CPU
reference at the production shape (D=128, block 128, top-k 16, GQA 16); bf16 bound 2^-7 x max|V| (the kernel
may round P to bf16 before PV), LSE 2e-3."""

from __future__ import annotations

import contextlib

import pytest
import torch
from msa.cute import (
    SparseDecodePagedAttentionWrapper,
    build_k2q_csr,
    fp4_indexer_block_scores,
    quant,
    sparse_atten_func,
)

pytestmark = pytest.mark.gpu


@contextlib.contextmanager
def no_host_sync():
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


def problem(q_lens, kv_lens, hq, hkv, d, topk, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(sum(q_lens), hq, d, generator=g).bfloat16()
    k = torch.randn(sum(kv_lens), hkv, d, generator=g).bfloat16()
    v = torch.randn(sum(kv_lens), hkv, d, generator=g).bfloat16()
    q2k = torch.full((hkv, sum(q_lens), topk), -1, dtype=torch.int32)
    t = 0
    for ql, kl in zip(q_lens, kv_lens):
        nb = -(-kl // 128)
        for i in range(ql):
            vis = min(nb, (i + kl - ql) // 128 + 1)
            for h in range(hkv):
                sel = torch.sort(torch.randperm(vis, generator=g)[: min(topk, vis)]).values
                q2k[h, t, : len(sel)] = sel.int()
            t += 1
    cq = torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), dtype=torch.int32)
    ck = torch.tensor([0] + torch.tensor(kv_lens).cumsum(0).tolist(), dtype=torch.int32)
    return q, k, v, q2k, cq, ck


def test_csr_gpu_equals_cpu_without_sync():
    q, k, v, q2k, cq, ck = problem([700, 300], [3000, 1200], 16, 2, 128, 16)
    rp, qi, sched = build_k2q_csr(q2k, cq, ck, 128, total_k=4200, return_schedule=True, qhead_per_kv=8)
    d = [x.cuda() for x in (q2k, cq, ck)]
    with no_host_sync():
        rp_g, qi_g, sched_g = build_k2q_csr(*d, 128, total_k=4200, total_rows=int(rp.shape[1] - 1),
                                            return_schedule=True, qhead_per_kv=8)
    assert torch.equal(rp_g.cpu(), rp) and torch.equal(qi_g.cpu(), qi)
    assert torch.equal(sched_g.work.cpu(), sched.work) and int(sched_g.work_count) == int(sched.work_count)


@pytest.mark.parametrize("paged", [False, True])
def test_sparse_atten_func_gpu_matches_cpu(paged):
    q_lens, kv_lens = [512, 256], [2048, 1024]
    q, k, v, q2k, cq, ck = problem(q_lens, kv_lens, 32, 2, 128, 16, seed=1)
    rp, qi = build_k2q_csr(q2k, cq, ck, 128, total_k=3072)
    kw = dict(cu_seqlens_q=cq, cu_seqlens_k=ck, max_seqlen_q=512, max_seqlen_k=2048, causal=True,
              return_softmax_lse=True)
    o_cpu, lse_cpu = sparse_atten_func(q, k, v, rp, qi, 16, **kw)
    kg, vg, extra = k.cuda(), v.cuda(), {}
    if paged:
        kg = k.view(24, 128, 2, 128).transpose(1, 2).contiguous().cuda()
        vg = v.view(24, 128, 2, 128).transpose(1, 2).contiguous().cuda()
        extra["page_table"] = torch.tensor([list(range(16)), list(range(16, 24)) + [0] * 8], dtype=torch.int32).cuda()
    kwg = {n: (x.cuda() if isinstance(x, torch.Tensor) else x) for n, x in kw.items()}
    args = [x.cuda() for x in (q,)] + [kg, vg, rp.cuda(), qi.cuda()]
    sparse_atten_func(*args, 16, **kwg, **extra)  # warm-up (one-time warnings, lazy kernel load)
    with no_host_sync():
        o, lse = sparse_atten_func(*args, 16, **kwg, **extra)
    assert (o.float().cpu() - o_cpu.float()).abs().max() <= 2**-7 * v.float().abs().max()
    fin = torch.isfinite(lse_cpu)
    assert torch.equal(fin, torch.isfinite(lse.cpu()))
    assert (lse.cpu()[fin] - lse_cpu[fin]).abs().max() < 2e-3


def test_decode_wrapper_gpu_graph_capture():
    g = torch.Generator().manual_seed(2)
    batch, hq, hkv, d = 4, 64, 4, 128
    su = torch.tensor([300, 1000, 129, 1280], dtype=torch.int32)
    pages = torch.randperm(64, generator=g)[:40].view(4, 10).int()
    q = torch.randn(batch, hq, d, generator=g).bfloat16()
    k = torch.randn(64, hkv, 128, d, generator=g).to(torch.float8_e4m3fn)
    v = torch.randn(64, hkv, 128, d, generator=g).to(torch.float8_e4m3fn)
    q8 = q.to(torch.float8_e4m3fn)
    w_cpu = SparseDecodePagedAttentionWrapper()
    w_cpu.plan(page_table=pages, seqused_k=su, seqlen_q=1, max_seqlen_k=1280)
    ref = w_cpu.run(q8, k, v)
    w = SparseDecodePagedAttentionWrapper()
    w.plan(page_table=pages.cuda(), seqused_k=su.cuda(), seqlen_q=1, max_seqlen_k=1280)
    qg, kg, vg = q8.cuda(), k.cuda(), v.cuda()
    out = torch.empty(batch, hq, d, dtype=torch.bfloat16, device="cuda")
    w.run(qg, kg, vg, out=out)  # warm-up outside capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        w.run(qg, kg, vg, out=out)
    out.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    assert (out.float().cpu() - ref.float()).abs().max() <= 2**-7 * v.float().abs().max()


def test_fp4_indexer_gpu_matches_cpu():
    g = torch.Generator().manual_seed(3)
    qq = torch.randn(300, 4, 128, generator=g)
    kk = torch.randn(12, 1, 128, 128, generator=g)
    for fmt, qf in (("nvfp4", quant.quantize_nvfp4), ("mxfp4", quant.quantize_mxfp4)):
        qt, kt = qf(qq), qf(kk)
        args = (qt.data, kt.data, qt.scale, kt.scale, torch.tensor([0, 300], dtype=torch.int32),
                torch.tensor([0, 1500], dtype=torch.int32), torch.tensor([0, 12], dtype=torch.int32))
        kw = dict(max_seqlen_q=300, max_seqlen_k=1500, kv_indices=torch.randperm(12, generator=g).int(),
                  fp4_format=fmt, causal=True)
        ref = fp4_indexer_block_scores(*args, **kw)
        gargs = [a.cuda() for a in args]
        gkw = {n: (x.cuda() if isinstance(x, torch.Tensor) else x) for n, x in kw.items()}
        fp4_indexer_block_scores(*gargs, **gkw)  # warm-up
        with no_host_sync():
            got = fp4_indexer_block_scores(*gargs, **gkw)
        fin = torch.isfinite(ref)
        assert torch.equal(fin, torch.isfinite(got.cpu()))
        assert (got.cpu()[fin] - ref[fin]).abs().max() <= 1e-4 * ref[fin].abs().max()


FP8 = torch.float8_e4m3fn


@pytest.mark.parametrize("seqlen_q,causal,dtype,kv_dtype", [
    (1, True, torch.bfloat16, torch.bfloat16), (4, True, torch.bfloat16, torch.bfloat16),
    (3, False, torch.float16, torch.float16),
    (1, True, torch.bfloat16, FP8), (4, False, torch.float16, FP8), (2, True, FP8, FP8),  # fp8 K/V cache
])
def test_sparse_decode_kernel_graph_replay_sees_updated_metadata(seqlen_q, causal, dtype, kv_dtype):
    """Sparse decode through the wrapper (the msa-core sparse_decode kernel on SM90) vs the CPU reference, captured
    once and replayed after seqused_k / q2k_indices were updated in place (the wrapper's contract); LSE too. fp8 K/V
    (under a 16-bit or an fp8 Q) run the kernel's fp8 path: the reference reads the same fp8 values."""
    from msa.core.dispatch import select_backend

    g = torch.Generator().manual_seed(11 + seqlen_q)
    batch, hq, hkv, d, topk, n_pages = 5, 64, 4, 128, 16, 160
    pages = torch.randperm(n_pages, generator=g)[: batch * 30].view(batch, 30).int()
    q = torch.randn(batch * seqlen_q, hq, d, generator=g).to(dtype)
    k = (torch.randn(n_pages, hkv, 128, d, generator=g) * 2).to(kv_dtype)
    v = (torch.randn(n_pages, hkv, 128, d, generator=g) * 2).to(kv_dtype)
    out_dtype = torch.bfloat16 if dtype == FP8 else dtype

    def selection(su):
        q2k = torch.full((hkv, batch * seqlen_q, topk), -1, dtype=torch.int32)
        for t in range(batch * seqlen_q):
            b, i = divmod(t, seqlen_q)
            vis = -(-(int(su[b]) - (seqlen_q - 1 - i if causal else 0)) // 128)
            for h in range(hkv):
                sel = torch.sort(torch.randperm(vis, generator=g)[: min(topk, vis)]).values
                q2k[h, t, : len(sel)] = sel.int()
        return q2k

    lens = [torch.tensor([3000, 129, 3840, 700, 1999], dtype=torch.int32),
            torch.tensor([3001, 200, 3500, 1700, 64], dtype=torch.int32)]
    sels = [selection(lens[0]), selection(lens[1])]
    refs = []
    for su, q2k in zip(lens, sels):
        w = SparseDecodePagedAttentionWrapper(causal=causal)
        w.plan(page_table=pages, seqused_k=su, seqlen_q=seqlen_q, max_seqlen_k=3840, q2k_indices=q2k)
        refs.append(w.run(q, k, v, return_softmax_lse=True))
    assert select_backend("sparse_decode_atten_func", torch.device("cuda"), None, q_dtype=dtype, kv_dtype=kv_dtype,
                          head_dim=d, head_dim_v=d, qhead_per_kv=hq // hkv, seqlen_q=seqlen_q, blk_kv=128,
                          causal=causal, sparse=True, topk=topk) == "sparse_decode_sm90"
    su_g, q2k_g, pages_g = lens[0].cuda(), sels[0].cuda(), pages.cuda()
    w = SparseDecodePagedAttentionWrapper(causal=causal)
    w.plan(page_table=pages_g, seqused_k=su_g, seqlen_q=seqlen_q, max_seqlen_k=3840, q2k_indices=q2k_g)
    qg, kg, vg = q.cuda(), k.cuda(), v.cuda()
    out = torch.empty(batch * seqlen_q, hq, d, dtype=out_dtype, device="cuda")
    lse = torch.empty(batch * seqlen_q, hq, dtype=torch.float32, device="cuda")
    w.run(qg, kg, vg, out=out, lse=lse, return_softmax_lse=True)  # warm-up outside capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        w.run(qg, kg, vg, out=out, lse=lse, return_softmax_lse=True)
    for step, (su, q2k) in enumerate(zip(lens, sels)):
        su_g.copy_(su)
        q2k_g.copy_(q2k)
        out.fill_(float("nan"))
        lse.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        o_ref, lse_ref = refs[step]
        err = (out.float().cpu() - o_ref.float()).abs().max()
        assert err <= 2**-7 * v.float().abs().max(), f"step {step}: max |O - ref| = {err}"
        assert (lse.cpu() - lse_ref).abs().max() < 2e-3, f"step {step}"
