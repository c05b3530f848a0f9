"""msa.bridge.sparse_fmha == msa.core.fmha(kv_block_indexes=...) (the dense per-token-sparse reference).

Both sides are fp32 references rounded once to the output dtype, so outputs agree within one output ulp:
bf16 2^-8 and fp16 2^-11 relative to max|V| (x the output scales); LSE within 1e-4. Per-head q/k scales are
folded into a bf16/fp16 Q on the sparse side: bound 2^-6 relative there.
"""

from __future__ import annotations

import pytest
import torch
from msa.bridge import page_table_from_kv_indices, sparse_fmha, sparse_fmha_plan
from msa.core import fmha, fmha_plan


def selections(gen, q_lens, kv_lens, heads, topk, qo_offset=None):
    out = torch.full((sum(q_lens), heads, topk), -1, dtype=torch.int32)
    t = 0
    for b, (ql, kl) in enumerate(zip(q_lens, kv_lens)):
        nblk = -(-kl // 128)
        off = (kl - ql) if qo_offset is None else qo_offset[b]
        for i in range(ql):
            vis = min(nblk, max(0, (i + off) // 128 + 1)) if i + off >= 0 else 0
            for h in range(heads):
                n = min(topk, vis)
                pick = sorted(torch.randperm(vis, generator=gen)[:n].tolist()) if vis else []
                if pick and i % 3 == 0:
                    pick = pick[:-1]  # some tokens use fewer than topk slots
                out[t, h, : len(pick)] = torch.tensor(pick, dtype=torch.int32)
            t += 1
    return out


def paged(gen, k, kv_lens):
    """Ragged [total_kv, H, D] -> shuffled pages [P, H, 128, D] + flat kv_indices."""
    n_req = [-(-n // 128) for n in kv_lens]
    n_pages = sum(n_req) + 2
    perm = torch.randperm(n_pages, generator=gen)
    kp = torch.randn(n_pages, k.shape[1], 128, k.shape[2], generator=gen).to(k.dtype)
    idx = []
    start = 0
    p = 0
    for b, kl in enumerate(kv_lens):
        for j in range(n_req[b]):
            pid = int(perm[p])
            p += 1
            idx.append(pid)
            seg = k[start + j * 128: start + min((j + 1) * 128, kl)]
            kp[pid, :, : seg.shape[0]] = seg.transpose(0, 1)
        start += kl
    return kp, torch.tensor(idx, dtype=torch.int32)


def at_pages(x, kv_idx, kv_lens, like):
    """Ragged ``x [total_kv, H, D]`` written at the page ids ``kv_idx`` (another tensor's layout, e.g. k's from
    :func:`paged`) into a cache shaped like ``like`` whose other slots hold random values."""
    out = torch.randn_like(like)
    start = 0
    for b, kl in enumerate(kv_lens):
        pages = kv_idx[sum(-(-n // 128) for n in kv_lens[:b]):][: -(-kl // 128)]
        for j, pid in enumerate(pages.tolist()):
            seg = x[start + j * 128: start + min((j + 1) * 128, kl)]
            out[pid, :, : seg.shape[0]] = seg.transpose(0, 1)
        start += kl
    return out


CASES = [
    # q_lens, kv_lens, hq, hkv, topk, paged, qo_offset, sel_heads
    ([50, 130], [300, 130], 8, 2, 2, False, None, "kv"),
    ([64], [512], 4, 1, 3, True, None, "kv"),
    ([10, 40], [200, 400], 8, 2, 2, True, [100, 20], "q"),  # shorter qo_offset; Hq-shaped selections
    ([33], [33], 2, 2, 1, False, None, "kv"),
]


@pytest.mark.parametrize("q_lens,kv_lens,hq,hkv,topk,is_paged,qo_offset,sel_heads", CASES)
def test_sparse_fmha_equals_core_fmha(q_lens, kv_lens, hq, hkv, topk, is_paged, qo_offset, sel_heads):
    gen = torch.Generator().manual_seed(sum(q_lens) + topk)
    d = 32
    q = torch.randn(sum(q_lens), hq, d, generator=gen).bfloat16()
    k = torch.randn(sum(kv_lens), hkv, d, generator=gen).bfloat16()
    v = torch.randn(sum(kv_lens), hkv, d, generator=gen).bfloat16()
    sel = selections(gen, q_lens, kv_lens, hkv, topk, qo_offset)
    page_size = 128 if is_paged else None
    kw = {}
    if is_paged:
        k, kv_idx = paged(gen, k, kv_lens)
        v = at_pages(v, kv_idx, kv_lens, like=k)  # same page ids for v
        kw["kv_indices"] = kv_idx
    dense_plan = fmha_plan(q_lens, kv_lens, hq, hkv, page_size=page_size, qo_offset=qo_offset, kv_block_num=topk)
    o_ref, _, lse_ref = fmha(q, k, v, dense_plan, kv_block_indexes=sel, return_lse=True, validate=True, **kw)
    plan = sparse_fmha_plan(q_lens, kv_lens, hq, hkv, page_size=page_size, qo_offset=qo_offset, kv_block_num=topk)
    sel_in = sel.repeat_interleave(hq // hkv, dim=1) if sel_heads == "q" else sel
    if sel_heads == "q":  # other heads of the group hold garbage: only the group's first head is read
        sel_in = sel_in.clone()
        for h in range(hq):
            if h % (hq // hkv):
                sel_in[:, h] = -1
    o, ms, lse = sparse_fmha(q, k, v, plan, kv_block_indexes=sel_in, return_lse=True, validate=True, **kw)
    assert ms is None
    vmax = v.float().abs().max()
    assert (o.float() - o_ref.float()).abs().max() <= 2**-8 * vmax
    fin = torch.isfinite(lse_ref)
    assert torch.equal(fin, torch.isfinite(lse))
    assert (lse[fin] - lse_ref[fin]).abs().max() < 1e-4


def _scale_problem():
    gen = torch.Generator().manual_seed(4)
    q_lens, kv_lens, hq, hkv, d, topk = [40], [300], 4, 2, 16, 2
    q = torch.randn(40, hq, d, generator=gen).bfloat16()
    k = torch.randn(300, hkv, d, generator=gen).bfloat16()
    v = torch.randn(300, hkv, d, generator=gen).bfloat16()
    sel = selections(gen, q_lens, kv_lens, hkv, topk)
    dp = fmha_plan(q_lens, kv_lens, hq, hkv, kv_block_num=topk)
    sp = sparse_fmha_plan(q_lens, kv_lens, hq, hkv, kv_block_num=topk)
    return q, k, v, sel, dp, sp


PER_HEAD = dict(q_scale=torch.tensor([1.0, 0.5, 2.0, 1.5]), k_scale=torch.tensor([0.8, 1.2]),
                v_scale=torch.tensor([2.0, 0.25]), o_scale=torch.tensor([1.0, 3.0, 0.5, 1.0]))


def test_sparse_fmha_scalar_scales_match_core():
    q, k, v, sel, dp, sp = _scale_problem()
    scales = dict(sm_scale=0.2, q_scale=1.5, k_scale=0.7, v_scale=2.0, o_scale=0.5)
    o_ref, _ = fmha(q, k, v, dp, kv_block_indexes=sel, **scales)
    out = torch.full_like(o_ref, float("nan"))
    o, _ = sparse_fmha(q, k, v, sp, kv_block_indexes=sel, out=out, **scales)
    assert o is out
    assert (o.float() - o_ref.float()).abs().max() <= 2**-8 * v.float().abs().max()


def test_sparse_fmha_per_head_scales_semantics():
    """Independent of msa.core: q_scale[h] * k_scale[h // G] scales head h's logits, v_scale[h // G] and
    o_scale[h] scale head h's output (docs/API.md)."""
    q, k, v, sel, _, sp = _scale_problem()
    g = 2
    qk = PER_HEAD["q_scale"] * PER_HEAD["k_scale"].repeat_interleave(g)
    q_folded = (q.float() * qk.view(1, -1, 1)).bfloat16()
    base, _ = sparse_fmha(q_folded, k, v, sp, kv_block_indexes=sel)
    o, _ = sparse_fmha(q, k, v, sp, kv_block_indexes=sel, **PER_HEAD)
    mult = PER_HEAD["v_scale"].repeat_interleave(g) * PER_HEAD["o_scale"]
    expect = base.float() * mult.view(1, -1, 1)
    assert (o.float() - expect).abs().max() <= 2**-7 * expect.abs().max()


def test_sparse_fmha_per_head_scales_match_core():
    q, k, v, sel, dp, sp = _scale_problem()
    o_ref, _ = fmha(q, k, v, dp, kv_block_indexes=sel, **PER_HEAD)
    o, _ = sparse_fmha(q, k, v, sp, kv_block_indexes=sel, **PER_HEAD)
    # per-head q/k scales are folded into a bf16 Q on the sparse side: 2^-6 relative to the output scale
    assert (o.float() - o_ref.float()).abs().max() <= 2**-6 * o_ref.float().abs().max()


def test_page_table_from_kv_indices():
    kv_idx = torch.tensor([5, 2, 7, 1, 0, 3], dtype=torch.int32)
    indptr = torch.tensor([0, 2, 2, 6], dtype=torch.int32)
    pt = page_table_from_kv_indices(kv_idx, indptr, 4)
    assert pt.tolist() == [[5, 2, 0, 0], [0, 0, 0, 0], [7, 1, 0, 3]]


def test_bridge_bad_inputs():
    with pytest.raises(ValueError, match="page_size"):
        sparse_fmha_plan([4], [200], 2, 1, page_size=64, kv_block_num=2)
    with pytest.raises(ValueError, match="kv_block_num"):
        sparse_fmha_plan([4], [200], 2, 1, kv_block_num=65)
    with pytest.raises(ValueError, match=r"qo_offset\[0\]"):
        sparse_fmha_plan([4], [200], 2, 1, kv_block_num=2, qo_offset=[199])
    with pytest.raises(ValueError, match="output_maxscore"):
        sparse_fmha_plan([4], [200], 2, 1, kv_block_num=2, output_maxscore=True)
    plan = sparse_fmha_plan([4], [200], 2, 1, kv_block_num=2)
    q = torch.randn(4, 2, 16).bfloat16()
    k = torch.randn(200, 1, 16).bfloat16()
    sel = torch.tensor([[[0, -1]]] * 4, dtype=torch.int32)
    with pytest.raises(ValueError, match="kv_block_indexes: required"):
        sparse_fmha(q, k, k, plan, kv_block_indexes=None)
    with pytest.raises(ValueError, match="kv_block_indexes: expected shape"):
        sparse_fmha(q, k, k, plan, kv_block_indexes=sel[:, :, :1].contiguous())
    with pytest.raises(TypeError, match="kv_block_indexes: expected dtype int32"):
        sparse_fmha(q, k, k, plan, kv_block_indexes=sel.long())
    with pytest.raises(ValueError, match="q: expected shape"):
        sparse_fmha(q[:3], k, k, plan, kv_block_indexes=sel)
    with pytest.raises(ValueError, match="kv_block_indexes.*strictly ascending"):
        sparse_fmha(q, k, k, plan, kv_block_indexes=torch.tensor([[[1, 0]]] * 4, dtype=torch.int32), validate=True)
    with pytest.raises(TypeError, match="plan: expected a SparseFmhaPlan"):
        sparse_fmha(q, k, k, fmha_plan([4], [200], 2, 1, kv_block_num=2), kv_block_indexes=sel)


def test_sparse_fmha_non_causal_equals_core():
    gen = torch.Generator().manual_seed(1)
    q_lens, kv_lens, hq, hkv, topk = [30, 70], [200, 300], 4, 2, 2
    q = torch.randn(100, hq, 32, generator=gen).bfloat16()
    k = torch.randn(500, hkv, 32, generator=gen).bfloat16()
    v = torch.randn(500, hkv, 32, generator=gen).bfloat16()
    sel = selections(gen, q_lens, kv_lens, hkv, topk, qo_offset=kv_lens)  # any block of the request
    dp = fmha_plan(q_lens, kv_lens, hq, hkv, causal=False, kv_block_num=topk)
    o_ref, _, lse_ref = fmha(q, k, v, dp, kv_block_indexes=sel, return_lse=True, validate=True)
    sp = sparse_fmha_plan(q_lens, kv_lens, hq, hkv, causal=False, kv_block_num=topk)
    assert sp.seqused_k is None
    o, _, lse = sparse_fmha(q, k, v, sp, kv_block_indexes=sel, return_lse=True, validate=True)
    assert (o.float() - o_ref.float()).abs().max() <= 2**-8 * v.float().abs().max()
    assert (lse - lse_ref).abs().max() < 1e-4


@pytest.mark.parametrize("is_paged", [False, True])
def test_sparse_fmha_nvfp4_kv_equals_core_on_dequantised(is_paged):
    """NVFP4 K/V (Nvfp4Tensor with a global scale) == msa.core.fmha on the dequantised bf16 K/V, ragged and paged
    (shuffled pages, spare pages nobody owns); scalar scales still apply on top."""
    from msa.cute.quant import quantize_nvfp4

    gen = torch.Generator().manual_seed(31)
    q_lens, kv_lens, hq, hkv, d, topk = [40, 70], [300, 140], 4, 2, 32, 2
    q = torch.randn(sum(q_lens), hq, d, generator=gen).bfloat16()
    k = torch.randn(sum(kv_lens), hkv, d, generator=gen) * 2
    v = torch.randn(sum(kv_lens), hkv, d, generator=gen) * 2
    sel = selections(gen, q_lens, kv_lens, hkv, topk)
    kw = {}
    if is_paged:
        kp, kv_idx = paged(gen, k, kv_lens)
        k, v = kp, at_pages(v, kv_idx, kv_lens, like=kp)
        kw["kv_indices"] = kv_idx
    kf, vf = quantize_nvfp4(k, "auto"), quantize_nvfp4(v, "auto")
    kd, vd = kf.dequantize(torch.bfloat16), vf.dequantize(torch.bfloat16)
    page_size = 128 if is_paged else None
    dp = fmha_plan(q_lens, kv_lens, hq, hkv, page_size=page_size, kv_block_num=topk)
    sp = sparse_fmha_plan(q_lens, kv_lens, hq, hkv, page_size=page_size, kv_block_num=topk)
    o_ref, _, lse_ref = fmha(q, kd, vd, dp, kv_block_indexes=sel, return_lse=True, sm_scale=0.3, v_scale=1.5, **kw)
    o, _, lse = sparse_fmha(q, kf, vf, sp, kv_block_indexes=sel, return_lse=True, validate=True, sm_scale=0.3,
                            v_scale=1.5, **kw)
    assert o.dtype == torch.bfloat16
    # two roundings on the sparse side (O, then O * v_scale): 2^-7 of the output bound
    assert (o.float() - o_ref.float()).abs().max() <= 2**-7 * 1.5 * vd.float().abs().max()
    fin = torch.isfinite(lse_ref)
    assert torch.equal(fin, torch.isfinite(lse)) and (lse[fin] - lse_ref[fin]).abs().max() < 1e-4
    if is_paged:  # a page id outside the cache: validate names kv_indices (staging would read zeros instead)
        bad = kw["kv_indices"].clone()
        bad[1] = k.shape[0] + 3
        with pytest.raises(ValueError, match="kv_indices: request 0's page 1"):
            sparse_fmha(q, kf, vf, sp, kv_block_indexes=sel, validate=True, kv_indices=bad)
        # a page table passed directly may hold anything past a request's pages (here -1 padding and a wider table)
        table = page_table_from_kv_indices(kw["kv_indices"], sp.kv_page_indptr, sp.max_pages)
        wide = torch.full((table.shape[0], table.shape[1] + 2), -1, dtype=torch.int32)
        live = page_table_from_kv_indices(torch.ones_like(kw["kv_indices"]), sp.kv_page_indptr, sp.max_pages) != 0
        wide[:, : table.shape[1]] = torch.where(live, table, -1)
        o_t, _ = sparse_fmha(q, kf, vf, sp, kv_block_indexes=sel, validate=True, page_table=wide, sm_scale=0.3,
                             v_scale=1.5)
        assert torch.equal(o_t, o)
        wide[1, 0] = k.shape[0]
        with pytest.raises(ValueError, match="page_table: request 1's page 0"):
            sparse_fmha(q, kf, vf, sp, kv_block_indexes=sel, validate=True, page_table=wide)


def test_sparse_fmha_nvfp4_bad_inputs():
    from msa.cute.quant import quantize_nvfp4

    q, k, v, sel, _, sp = _scale_problem()
    kf, vf = quantize_nvfp4(k.float()), quantize_nvfp4(v.float())
    with pytest.raises(TypeError, match="v: expected an Nvfp4Tensor like k"):
        sparse_fmha(q, kf, v, sp, kv_block_indexes=sel)
    with pytest.raises(TypeError, match="v: expected a tensor like k"):
        sparse_fmha(q, k, vf, sp, kv_block_indexes=sel)
    short = quantize_nvfp4(k.float()[:200])
    with pytest.raises(ValueError, match=r"k: expected dequantised shape \[300, 2, 16\], got \[200, 2, 16\]"):
        sparse_fmha(q, short, vf, sp, kv_block_indexes=sel)


def test_page_gather_and_ragged_twin():
    """The fp8 paged -> ragged path's pieces on CPU: the cached token gather returns the ragged K the pages hold, and the
    twin plan is the same plan over ragged K/V (same schedule and route_max)."""
    from msa.bridge import bridge as br

    gen = torch.Generator().manual_seed(12)
    kv_lens = [300, 1, 260]
    k = torch.randn(sum(kv_lens), 2, 32, generator=gen)
    kp, kv_idx = paged(gen, k, kv_lens)
    plan = sparse_fmha_plan([5, 1, 7], kv_lens, 4, 2, page_size=128, kv_block_num=3, route_max=4)
    table = page_table_from_kv_indices(kv_idx, plan.kv_page_indptr, plan.max_pages)
    got = br._gather_pages(kp, table, plan)
    assert torch.equal(got, k)
    k8 = kp.to(torch.float8_e4m3fn)  # fp8 moves as bytes
    assert torch.equal(br._gather_pages(k8, table, plan).view(torch.uint8), k.to(torch.float8_e4m3fn).view(torch.uint8))
    twin = br._ragged_twin(plan)
    assert twin is br._ragged_twin(plan) and not twin.paged and twin.kv_lens == plan.kv_lens
    assert twin.schedule == plan.schedule and twin.qouter.route_max == plan.qouter.route_max == 4
    assert twin.topk == plan.topk and twin.causal == plan.causal
