"""Paged decode: wrapper == function; sparse decode == sparse prefill on the same selection; dense == oracle.

Bound: bf16 output vs fp64 oracle within 2^-8 * max|V| (one output rounding); fp8 inputs are compared against
the oracle run on the dequantised fp8 values, so the same bound applies.
"""

from __future__ import annotations

import pytest
import torch
from msa.cute import SparseDecodePagedAttentionWrapper, build_k2q_csr, sparse_atten_func, sparse_decode_atten_func


def paged_problem(gen, batch, seqlen_q, kv_used, hq, hkv, d, block, dtype):
    n_req_pages = [-(-n // block) for n in kv_used]
    n_pages = sum(n_req_pages) + 2
    perm = torch.randperm(n_pages, generator=gen)
    max_pages = max(n_req_pages) + 1
    page_table = torch.full((batch, max_pages), -7, dtype=torch.int32)  # poison the unused columns
    p = 0
    for b in range(batch):
        for j in range(n_req_pages[b]):
            page_table[b, j] = int(perm[p])
            p += 1
    q = torch.randn(batch * seqlen_q, hq, d, generator=gen).to(dtype)
    k = torch.randn(n_pages, hkv, block, d, generator=gen).to(dtype)
    v = torch.randn(n_pages, hkv, block, d, generator=gen).to(dtype)
    return q, k, v, page_table, torch.tensor(kv_used, dtype=torch.int32)


def decode_oracle(q, k, v, page_table, kv_used, seqlen_q, block, sel, causal):
    """fp64 loop: sel(h_kv, t) -> set of allowed blocks or None (dense)."""
    total_q, hq, d = q.shape
    hkv = k.shape[1]
    g = hq // hkv
    o = torch.zeros(total_q, hq, v.shape[-1], dtype=torch.float64)
    lse = torch.full((total_q, hq), float("-inf"), dtype=torch.float64)
    for t in range(total_q):
        b, i = divmod(t, seqlen_q)
        n = int(kv_used[b])
        for h in range(hq):
            allowed = sel(h // g, t)
            js = [j for j in range(n) if (allowed is None or j // block in allowed)
                  and (not causal or j <= n - seqlen_q + i)]
            if not js:
                continue
            kk = torch.stack([k[int(page_table[b, j // block]), h // g, j % block].double() for j in js])
            vv = torch.stack([v[int(page_table[b, j // block]), h // g, j % block].double() for j in js])
            logits = kk @ q[t, h].double() * d ** -0.5
            o[t, h] = torch.softmax(logits, 0) @ vv
            lse[t, h] = torch.logsumexp(logits, 0)
    return o, lse


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float8_e4m3fn])
@pytest.mark.parametrize("sparse", [False, True])
def test_decode_matches_oracle_and_wrapper(dtype, sparse, attn_path):
    gen = torch.Generator().manual_seed(3)
    batch, seqlen_q, block, hq, hkv, d = 3, 2, 16, 8, 2, 16
    kv_used = [37, 2, 64]  # request 1: fewer keys than... still >= seqlen_q
    q, k, v, pt, su = paged_problem(gen, batch, seqlen_q, kv_used, hq, hkv, d, block, dtype)
    q2k = None
    if sparse:
        q2k = torch.full((hkv, batch * seqlen_q, 2), -1, dtype=torch.int32)
        for t in range(batch * seqlen_q):
            nb = -(-kv_used[t // seqlen_q] // block)
            for h in range(hkv):
                pick = sorted(torch.randperm(nb, generator=gen)[: min(2, nb)].tolist())
                q2k[h, t, : len(pick)] = torch.tensor(pick, dtype=torch.int32)
    o, lse = sparse_decode_atten_func(q, k, v, q2k, page_table=pt, seqused_k=su, seqlen_q=seqlen_q,
                                      max_seqlen_k=64, blk_kv=block, return_softmax_lse=True, validate=True)
    sel = (lambda h, t: None) if q2k is None else (lambda h, t: set(q2k[h, t].tolist()) - {-1})
    o_ref, lse_ref = decode_oracle(q.float(), k.float(), v.float(), pt, su, seqlen_q, block, sel, True)
    assert o.dtype == torch.bfloat16
    assert (o.double() - o_ref).abs().max() <= 2**-8 * v.float().abs().max()
    fin = torch.isfinite(lse_ref)
    assert torch.equal(fin, torch.isfinite(lse))
    assert (lse[fin].double() - lse_ref[fin]).abs().max() < 1e-4

    w = SparseDecodePagedAttentionWrapper(blk_kv=block)
    w.plan(page_table=pt, seqused_k=su, seqlen_q=seqlen_q, max_seqlen_k=64, q2k_indices=q2k, num_qo_heads=hq,
           num_kv_heads=hkv, head_dim=d)
    out = torch.full_like(o, float("nan"))
    lse_buf = torch.full_like(lse, float("nan"))
    r = w.run(q, k, v, return_softmax_lse=True, out=out, lse=lse_buf)
    assert r[0] is out and r[1] is lse_buf
    assert torch.equal(out, o) and torch.equal(lse_buf, lse)


def test_sparse_decode_equals_sparse_prefill(attn_path):
    gen = torch.Generator().manual_seed(8)
    batch, seqlen_q, block, hq, hkv, d = 2, 4, 16, 4, 1, 32
    kv_used = [70, 33]
    q, k, v, pt, su = paged_problem(gen, batch, seqlen_q, kv_used, hq, hkv, d, block, torch.bfloat16)
    q2k = torch.full((hkv, 8, 3), -1, dtype=torch.int32)
    q2k[0, :4, :3] = torch.tensor([0, 2, 4], dtype=torch.int32)
    q2k[0, 4:, :2] = torch.tensor([1, 2], dtype=torch.int32)
    o_dec = sparse_decode_atten_func(q, k, v, q2k, page_table=pt, seqused_k=su, seqlen_q=seqlen_q, max_seqlen_k=70,
                                     blk_kv=block)
    cq = torch.tensor([0, 4, 8], dtype=torch.int32)
    ck = torch.tensor([0, 70, 103], dtype=torch.int32)
    rp, qi = build_k2q_csr(q2k, cq, ck, block, total_k=103)
    o_pre = sparse_atten_func(q, k, v, rp, qi, 3, cu_seqlens_q=cq, cu_seqlens_k=ck, max_seqlen_q=4, max_seqlen_k=70,
                              blk_kv=block, causal=True, page_table=pt)
    assert (o_dec.float() - o_pre.float()).abs().max() <= 2**-8 * v.float().abs().max()


def test_wrapper_lifecycle_errors():
    w = SparseDecodePagedAttentionWrapper(blk_kv=16)
    q = torch.randn(2, 4, 16).bfloat16()
    k = torch.randn(3, 1, 16, 16).bfloat16()
    with pytest.raises(RuntimeError, match="before plan"):
        w.run(q, k, k)
    pt = torch.tensor([[0, 1], [2, 0]], dtype=torch.int32)
    su = torch.tensor([20, 9], dtype=torch.int32)
    w.plan(page_table=pt, seqused_k=su, seqlen_q=1, max_seqlen_k=32, num_qo_heads=4, num_kv_heads=1, head_dim=16)
    with pytest.raises(ValueError, match="q: expected 8 heads|q: expected 4 heads"):
        w.run(torch.randn(2, 8, 16).bfloat16(), k, k)
    with pytest.raises(ValueError, match="q: expected 2 rows"):
        w.run(torch.randn(3, 4, 16).bfloat16(), k, k)
    with pytest.raises(ValueError, match="out: expected shape"):
        w.run(q, k, k, out=torch.empty(2, 4, 8, dtype=torch.bfloat16))
    assert w.run(q, k, k).shape == (2, 4, 16)


def test_plan_rejects_graph_capture(monkeypatch):
    import msa.cute.decode as dec

    monkeypatch.setattr(dec, "is_capturing", lambda: True)
    w = SparseDecodePagedAttentionWrapper()
    with pytest.raises(RuntimeError, match="CUDA graph capture"):
        w.plan(page_table=torch.zeros(1, 1, dtype=torch.int32), seqused_k=torch.ones(1, dtype=torch.int32),
               seqlen_q=1, max_seqlen_k=1)


@pytest.mark.gpu
def test_plan_rejects_real_graph_capture():
    pt = torch.zeros(1, 1, dtype=torch.int32, device="cuda")
    su = torch.ones(1, dtype=torch.int32, device="cuda")
    w = SparseDecodePagedAttentionWrapper()
    g = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        with pytest.raises(RuntimeError, match="CUDA graph capture"):
            with torch.cuda.graph(g, stream=s):
                w.plan(page_table=pt, seqused_k=su, seqlen_q=1, max_seqlen_k=1)


@pytest.mark.parametrize("causal", [True, False])
def test_sparse_decode_kernel_adapter_metadata(monkeypatch, causal):
    """The SM90 adapter's device-side metadata (launch stubbed; CPU): flat page list, [total_q, Hkv, k] blocks,
    per-token (first slot, visible key limit) recomputed from the live seqused_k on every run."""
    from msa.core.kernels import sparse_decode as core
    from msa.cute.decode import _make_plan
    from msa.cute.kernels import sparse_decode_sm90 as adapter

    seen = {}

    def fake_launch(q, k, v, kv_indices, blocks, dp, out, lse, scale_log2, out_scale):
        seen.update(kv_indices=kv_indices.clone(), blocks=blocks.clone(), tok=dp.tok_info.clone(), lse=lse)

    monkeypatch.setattr(core, "launch", fake_launch)
    gen = torch.Generator().manual_seed(5)
    batch, seqlen_q, hkv = 3, 2, 2
    pages = torch.randperm(40, generator=gen)[:30].view(batch, 10).int()
    su = torch.tensor([1000, 300, 129], dtype=torch.int32)
    q2k = torch.tensor([0, 1, -1, -1], dtype=torch.int32).repeat(hkv, batch * seqlen_q, 1)
    q2k[0, 0] = torch.tensor([0, 2, -1, -1])
    plan = _make_plan(page_table=pages, seqused_k=su, seqlen_q=seqlen_q, max_seqlen_k=1280, q2k_indices=q2k,
                      num_qo_heads=8, num_kv_heads=hkv, head_dim=128, blk_kv=128, causal=causal, validate=True)
    q = torch.randn(batch * seqlen_q, 8, 128).bfloat16()
    kv = torch.randn(40, hkv, 128, 128).bfloat16()
    for step in range(2):
        adapter.run(plan=plan, q=q, k=kv, v=kv, softmax_scale=0.1, return_softmax_lse=True, out=None, lse=None)
        assert torch.equal(seen["kv_indices"], pages.reshape(-1))
        assert torch.equal(seen["blocks"], q2k.permute(1, 0, 2))
        assert seen["lse"] is not None
        for t in range(batch * seqlen_q):
            b, i = divmod(t, seqlen_q)
            lim = int(su[b]) - (seqlen_q - 1 - i) if causal else int(su[b])
            assert seen["tok"][t].tolist() == [b * 10, lim], (step, t)
        su.sub_(7)  # in-place update between runs (graph replays) must be seen
        q2k[1, 2] = torch.tensor([1, -1, -1, -1])
