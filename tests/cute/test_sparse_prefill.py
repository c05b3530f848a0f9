"""sparse_atten_func reference == fp64 loop oracle; paged == ragged; all blocks selected == dense attention.

Error bounds (output vs fp64 oracle): the reference computes in fp32 from the stored inputs and rounds O once
to the output dtype, so |O - O_ref| <= 2^-8 * max|V| per element for bf16 out (one bf16 rounding of a convex
combination of V), 2^-11 for fp16; LSE (fp32) within 1e-4 absolute.
"""

from __future__ import annotations

import pytest
import torch
from msa.cute import build_k2q_csr, sparse_atten_func

OUT_ATOL = {torch.bfloat16: 2**-8, torch.float16: 2**-11, torch.float8_e4m3fn: 2**-8}


def make_problem(helpers, gen, q_lens, kv_lens, hq, hkv, d, topk, block, dtype, mode="random", dv=None):
    dv = dv or d
    total_q, total_k = sum(q_lens), sum(kv_lens)
    q = torch.randn(total_q, hq, d, generator=gen)
    k = torch.randn(total_k, hkv, d, generator=gen)
    v = torch.randn(total_k, hkv, dv, generator=gen)
    q, k, v = (x.to(dtype) for x in (q, k, v))
    q2k = helpers.random_selection(gen, q_lens, kv_lens, hkv, topk, block, mode=mode)
    return q, k, v, q2k


def oracle(helpers, q, k, v, q2k, q_lens, kv_lens, block, scale, causal, kv_used=None, temp=None):
    cu_k = helpers.cu(kv_lens).tolist()
    ks = [k[cu_k[b]:cu_k[b + 1]].float() for b in range(len(kv_lens))]
    vs = [v[cu_k[b]:cu_k[b + 1]].float() for b in range(len(kv_lens))]
    used = kv_used or kv_lens
    q_start = helpers.cu(q_lens).tolist()
    tok_b = [b for b, n in enumerate(q_lens) for _ in range(n)]
    sel = q2k.tolist()

    def allowed(h, t, j):
        return (j // block) in sel[h][t] and j < used[tok_b[t]]

    off = [u - ql for u, ql in zip(used, q_lens)]
    del q_start
    return helpers.naive_attention(q.float(), ks, vs, q_lens, kv_lens, allowed, scale=scale, causal=causal,
                                   qo_offset=off, temp=temp)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("causal", [True, False])
def test_ragged_matches_oracle(helpers, dtype, causal, attn_path):
    gen = torch.Generator().manual_seed(11)
    q_lens, kv_lens, hq, hkv, d, topk, block = [9, 0, 21], [40, 12, 70], 4, 2, 16, 3, 16
    q, k, v, q2k = make_problem(helpers, gen, q_lens, kv_lens, hq, hkv, d, topk, block, dtype,
                                mode="causal" if causal else "random")
    cq, ck = helpers.cu(q_lens), helpers.cu(kv_lens)
    rp, qi = build_k2q_csr(q2k, cq, ck, block, total_k=k.shape[0])
    o, lse, lse_t = sparse_atten_func(q, k, v, rp, qi, topk, cu_seqlens_q=cq, cu_seqlens_k=ck, max_seqlen_q=21,
                                      max_seqlen_k=70, blk_kv=block, causal=causal, softmax_scale=0.3,
                                      lse_temperature_scale=2.5, return_softmax_lse=True,
                                      return_temperature_lse=True, validate=True)
    o_ref, lse_ref, lse_t_ref = oracle(helpers, q, k, v, q2k, q_lens, kv_lens, block, 0.3, causal, temp=2.5)
    assert o.dtype == dtype and lse.dtype == torch.float32
    vmax = v.float().abs().max()
    assert (o.double() - o_ref).abs().max() <= OUT_ATOL[dtype] * vmax
    assert torch.equal(torch.isinf(lse), torch.isinf(lse_ref))  # tokens with nothing visible: -inf
    fin = torch.isfinite(lse_ref)
    assert (lse[fin].double() - lse_ref[fin]).abs().max() < 1e-4
    assert (lse_t[fin].double() - lse_t_ref[fin]).abs().max() < 1e-4
    assert (o[~fin] == 0).all()


def test_paged_equals_ragged_with_shuffled_pages(helpers, attn_path):
    gen = torch.Generator().manual_seed(5)
    q_lens, kv_lens, hq, hkv, d, topk, block = [12, 30], [50, 96], 8, 2, 32, 4, 16
    q, k, v, q2k = make_problem(helpers, gen, q_lens, kv_lens, hq, hkv, d, topk, block, torch.bfloat16)
    cq, ck = helpers.cu(q_lens), helpers.cu(kv_lens)
    n_pages_req = [-(-n // block) for n in kv_lens]
    n_pages = sum(n_pages_req) + 3  # spare pages that nobody owns
    perm = torch.randperm(n_pages, generator=gen)
    kp = torch.randn(n_pages, hkv, block, d, generator=gen).to(torch.bfloat16)  # garbage everywhere
    vp = torch.randn(n_pages, hkv, block, d, generator=gen).to(torch.bfloat16)
    page_table = torch.zeros(2, max(n_pages_req) + 1, dtype=torch.int32)
    cuk = ck.tolist()
    p = 0
    for b in range(2):
        for j in range(n_pages_req[b]):
            pid = int(perm[p])
            p += 1
            page_table[b, j] = pid
            seg = k[cuk[b] + j * block: min(cuk[b] + (j + 1) * block, cuk[b + 1])]
            kp[pid, :, : seg.shape[0]] = seg.transpose(0, 1)
            vp[pid, :, : seg.shape[0]] = v[cuk[b] + j * block: cuk[b] + j * block + seg.shape[0]].transpose(0, 1)
    rp, qi = build_k2q_csr(q2k, cq, ck, block, total_k=sum(kv_lens))
    kw = dict(cu_seqlens_q=cq, cu_seqlens_k=ck, max_seqlen_q=30, max_seqlen_k=96, blk_kv=block, causal=True,
              return_softmax_lse=True, validate=True)
    o_r, l_r = sparse_atten_func(q, k, v, rp, qi, topk, **kw)
    o_p, l_p = sparse_atten_func(q, kp, vp, rp, qi, topk, page_table=page_table, **kw)
    # same math, different gather order (physical pages are shuffled): equal up to fp32 summation order
    assert (o_r.float() - o_p.float()).abs().max() <= 2**-8 * v.float().abs().max()
    fin = torch.isfinite(l_r)
    assert torch.equal(fin, torch.isfinite(l_p)) and (l_r[fin] - l_p[fin]).abs().max() < 1e-5
    # seqused_k shortens the visible prefix exactly like a shorter KV.
    su = torch.tensor([40, 96], dtype=torch.int32)
    o_s, l_s = sparse_atten_func(q, kp, vp, rp, qi, topk, page_table=page_table, seqused_k=su, **kw)
    o_ref, lse_ref, _ = oracle(helpers, q, k, v, q2k, q_lens, kv_lens, block, d ** -0.5, True, kv_used=[40, 96])
    assert (o_s.double() - o_ref).abs().max() <= 2**-8 * v.float().abs().max()
    fin = torch.isfinite(lse_ref)
    assert torch.equal(fin, torch.isfinite(l_s))
    assert (l_s[fin].double() - lse_ref[fin]).abs().max() < 1e-4


def test_all_blocks_selected_equals_dense(helpers, attn_path):
    gen = torch.Generator().manual_seed(9)
    q_lens, kv_lens, hq, hkv, d, block = [17, 33], [80, 33], 6, 3, 16, 16
    nblk = max(-(-n // block) for n in kv_lens)
    q, k, v, _ = make_problem(helpers, gen, q_lens, kv_lens, hq, hkv, d, 1, block, torch.bfloat16)
    q2k = torch.full((hkv, sum(q_lens), nblk), -1, dtype=torch.int32)
    t = 0
    for ql, kl in zip(q_lens, kv_lens):
        q2k[:, t:t + ql, : -(-kl // block)] = torch.arange(-(-kl // block), dtype=torch.int32)
        t += ql
    cq, ck = helpers.cu(q_lens), helpers.cu(kv_lens)
    rp, qi = build_k2q_csr(q2k, cq, ck, block, total_k=sum(kv_lens))
    o, lse = sparse_atten_func(q, k, v, rp, qi, nblk, cu_seqlens_q=cq, cu_seqlens_k=ck, max_seqlen_q=33,
                               max_seqlen_k=80, blk_kv=block, causal=True, return_softmax_lse=True)
    # dense causal attention, fp64, per request with torch SDPA-free math
    cuq, cuk = cq.tolist(), ck.tolist()
    g = hq // hkv
    for b, (ql, kl) in enumerate(zip(q_lens, kv_lens)):
        qq = q[cuq[b]:cuq[b + 1]].double().transpose(0, 1)  # [Hq, ql, d]
        kk = k[cuk[b]:cuk[b + 1]].double().repeat_interleave(g, 1).transpose(0, 1)
        vv = v[cuk[b]:cuk[b + 1]].double().repeat_interleave(g, 1).transpose(0, 1)
        logits = qq @ kk.transpose(1, 2) * d ** -0.5
        mask = torch.arange(kl).view(1, -1) <= torch.arange(ql).view(-1, 1) + (kl - ql)
        logits = logits.masked_fill(~mask, float("-inf"))
        ref = (torch.softmax(logits, -1) @ vv).transpose(0, 1)
        assert (o[cuq[b]:cuq[b + 1]].double() - ref).abs().max() <= 2**-8 * v.float().abs().max()
        assert (lse[cuq[b]:cuq[b + 1]].double() - torch.logsumexp(logits, -1).t()).abs().max() < 1e-4


def test_fp8_kv_and_fp8_q(helpers, attn_path):
    gen = torch.Generator().manual_seed(21)
    q_lens, kv_lens, hq, hkv, d, topk, block = [14], [64], 4, 1, 16, 2, 16
    q, k, v, q2k = make_problem(helpers, gen, q_lens, kv_lens, hq, hkv, d, topk, block, torch.bfloat16)
    cq, ck = helpers.cu(q_lens), helpers.cu(kv_lens)
    rp, qi = build_k2q_csr(q2k, cq, ck, block, total_k=64)
    kw = dict(cu_seqlens_q=cq, cu_seqlens_k=ck, max_seqlen_q=14, max_seqlen_k=64, blk_kv=block, causal=False)
    k8, v8 = k.to(torch.float8_e4m3fn), v.to(torch.float8_e4m3fn)
    for qq in (q, q.to(torch.float8_e4m3fn)):
        o = sparse_atten_func(qq, k8, v8, rp, qi, topk, **kw)
        assert o.dtype == torch.bfloat16
        o_ref, _, _ = oracle(helpers, qq.float(), k8.float(), v8.float(), q2k, q_lens, kv_lens, block, d ** -0.5,
                             False)
        assert (o.double() - o_ref).abs().max() <= 2**-8 * v8.float().abs().max()


def test_overflowing_token_is_poisoned_not_truncated(helpers):
    # Token 0 listed in 3 rows but topk=2: validate raises, otherwise its output is NaN.
    cq, ck = helpers.cu([2]), helpers.cu([48])
    q2k = torch.tensor([[[0, 1, 2], [1, -1, -1]]], dtype=torch.int32)
    rp, qi = build_k2q_csr(q2k, cq, ck, 16, total_k=48)
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(2, 2, 8, generator=gen).bfloat16()
    k = torch.randn(48, 1, 8, generator=gen).bfloat16()
    kw = dict(cu_seqlens_q=cq, cu_seqlens_k=ck, max_seqlen_q=2, max_seqlen_k=48, blk_kv=16)
    o = sparse_atten_func(q, k, k, rp, qi, 2, **kw)
    assert torch.isnan(o[0]).all() and torch.isfinite(o[1]).all()
    o, lse, lse_t = sparse_atten_func(q, k, k, rp, qi, 2, return_softmax_lse=True, return_temperature_lse=True,
                                      lse_temperature_scale=2.0, **kw)
    assert torch.isnan(lse[0]).all() and torch.isnan(lse_t[0]).all()  # its LSEs too (the kernel's combine does)
    assert torch.isfinite(lse[1]).all() and torch.isfinite(lse_t[1]).all()
    with pytest.raises(ValueError, match="k2q_q_indices.*topk=2"):
        sparse_atten_func(q, k, k, rp, qi, 2, validate=True, **kw)


def test_shared_and_repeated_pages(helpers, attn_path):
    """Prefix sharing (two requests map their first blocks to the same pages) and one page used at two logical
    positions of a request: results equal the ragged layout holding the same keys."""
    gen = torch.Generator().manual_seed(17)
    block, hq, hkv, d, topk = 16, 4, 1, 16, 3
    pages_k = torch.randn(12, hkv, block, d, generator=gen).bfloat16()
    pages_v = torch.randn(12, hkv, block, d, generator=gen).bfloat16()
    table = torch.tensor([list(range(10)), [0, 1, 10] + [0] * 7, [11, 11, 0] + [0] * 7], dtype=torch.int32)
    kv_lens, q_lens = [160, 40, 48], [130, 9, 16]  # request 1 shares request 0's first pages; page 11 twice
    ks = torch.cat([pages_k[table[b, : -(-n // block)].long()].transpose(1, 2).reshape(-1, hkv, d)[:n]
                    for b, n in enumerate(kv_lens)])
    vs = torch.cat([pages_v[table[b, : -(-n // block)].long()].transpose(1, 2).reshape(-1, hkv, d)[:n]
                    for b, n in enumerate(kv_lens)])
    q = torch.randn(sum(q_lens), hq, d, generator=gen).bfloat16()
    q2k = helpers.random_selection(gen, q_lens, kv_lens, hkv, topk, block, mode="causal")
    cq, ck = helpers.cu(q_lens), helpers.cu(kv_lens)
    rp, qi = build_k2q_csr(q2k, cq, ck, block, total_k=sum(kv_lens))
    kw = dict(cu_seqlens_q=cq, cu_seqlens_k=ck, max_seqlen_q=130, max_seqlen_k=160, blk_kv=block, causal=True,
              return_softmax_lse=True)
    o_p, l_p = sparse_atten_func(q, pages_k, pages_v, rp, qi, topk, page_table=table, **kw)
    o_ref, lse_ref, _ = oracle(helpers, q, ks, vs, q2k, q_lens, kv_lens, block, d ** -0.5, True)
    assert (o_p.double() - o_ref).abs().max() <= 2**-8 * vs.float().abs().max()
    fin = torch.isfinite(lse_ref)
    assert torch.equal(fin, torch.isfinite(l_p)) and (l_p[fin].double() - lse_ref[fin]).abs().max() < 1e-4


@pytest.mark.parametrize("paged", [False, True])
def test_nvfp4_kv_matches_oracle_on_dequantised_values(helpers, paged, attn_path):
    """NVFP4 K/V (Nvfp4Tensor, global scale) == the oracle on the dequantised values (rounded to q's dtype, as the
    staging does); paged: shuffled pages, a spare page full of NaN that no request owns, table padding of -1."""
    from msa.cute.quant import quantize_nvfp4

    gen = torch.Generator().manual_seed(23)
    q_lens, kv_lens, hq, hkv, d, topk, block = [10, 19], [45, 64], 4, 2, 32, 3, 16
    q, k, v, q2k = make_problem(helpers, gen, q_lens, kv_lens, hq, hkv, d, topk, block, torch.bfloat16,
                                mode="causal")
    kf, vf = (quantize_nvfp4(x.float() * 3.0, "auto") for x in (k, v))
    kd, vd = (x.dequantize().bfloat16() for x in (kf, vf))
    cq, ck = helpers.cu(q_lens), helpers.cu(kv_lens)
    rp, qi = build_k2q_csr(q2k, cq, ck, block, total_k=sum(kv_lens))
    kw = dict(cu_seqlens_q=cq, cu_seqlens_k=ck, max_seqlen_q=19, max_seqlen_k=64, blk_kv=block, causal=True,
              return_softmax_lse=True, validate=True)
    if not paged:
        o, lse = sparse_atten_func(q, kf, vf, rp, qi, topk, **kw)
    else:
        npg = [-(-n // block) for n in kv_lens]
        n_pages = sum(npg) + 1
        perm = torch.randperm(n_pages, generator=gen)
        table = torch.full((2, max(npg) + 2), -1, dtype=torch.int32)
        kp = torch.full((n_pages, hkv, block, d), float("nan"))
        vp = torch.full((n_pages, hkv, block, d), float("nan"))
        cuk, p = ck.tolist(), 0
        for b in range(2):
            for j in range(npg[b]):
                pid = int(perm[p])
                p += 1
                table[b, j] = pid
                lo, hi = cuk[b] + j * block, min(cuk[b] + (j + 1) * block, cuk[b + 1])
                kp[pid] = 0.0
                vp[pid] = 0.0
                kp[pid, :, : hi - lo] = k[lo:hi].float().transpose(0, 1) * 3.0
                vp[pid, :, : hi - lo] = v[lo:hi].float().transpose(0, 1) * 3.0
        g = kf.global_scale
        kpf, vpf = quantize_nvfp4(kp.nan_to_num(0.0), g), quantize_nvfp4(vp.nan_to_num(0.0), vf.global_scale)
        spare = int(perm[-1])
        kpf.data[spare] = 0x77  # +6 in every nibble: a garbage page the call must not read
        o, lse = sparse_atten_func(q, kpf, vpf, rp, qi, topk, page_table=table, **kw)
    o_ref, lse_ref, _ = oracle(helpers, q, kd, vd, q2k, q_lens, kv_lens, block, d ** -0.5, True)
    assert o.dtype == torch.bfloat16
    assert (o.double() - o_ref).abs().max() <= 2**-8 * vd.float().abs().max()
    fin = torch.isfinite(lse_ref)
    assert torch.equal(fin, torch.isfinite(lse)) and (lse[fin].double() - lse_ref[fin]).abs().max() < 1e-4


def test_nvfp4_kv_bad_arguments(helpers):
    from msa.cute.quant import quantize_nvfp4

    gen = torch.Generator().manual_seed(2)
    q_lens, kv_lens, hq, hkv, d, topk, block = [4], [32], 2, 1, 32, 2, 16
    q, k, v, q2k = make_problem(helpers, gen, q_lens, kv_lens, hq, hkv, d, topk, block, torch.bfloat16)
    cq, ck = helpers.cu(q_lens), helpers.cu(kv_lens)
    rp, qi = build_k2q_csr(q2k, cq, ck, block, total_k=32)
    kw = dict(cu_seqlens_q=cq, cu_seqlens_k=ck, max_seqlen_q=4, max_seqlen_k=32, blk_kv=block)
    kf, vf = quantize_nvfp4(k.float()), quantize_nvfp4(v.float())
    with pytest.raises(TypeError, match="v: expected an Nvfp4Tensor"):
        sparse_atten_func(q, kf, v, rp, qi, topk, **kw)
    with pytest.raises(TypeError, match="q: expected bf16 or fp16 with NVFP4"):
        sparse_atten_func(q.to(torch.float8_e4m3fn), kf, vf, rp, qi, topk, **kw)
    bad = type(kf)(kf.data, kf.scale[..., :1], None)
    with pytest.raises(ValueError, match=r"k.scale: expected shape \[32, 1, 2\]"):
        sparse_atten_func(q, bad, vf, rp, qi, topk, **kw)
    short = type(kf)(kf.data[..., :8], kf.scale[..., :1], None)  # D = 16 != q's 32
    with pytest.raises(ValueError, match="k: expected head dim 32"):
        sparse_atten_func(q, short, short, rp, qi, topk, **kw)
