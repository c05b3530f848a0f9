"""GPU: msa.bridge.sparse_fmha == msa.core.fmha(kv_block_indexes) on CUDA at the MiniMax-M3 head shape."""

from __future__ import annotations

import pytest
import torch
from msa.bridge import sparse_fmha, sparse_fmha_plan
from msa.core import fmha, fmha_plan, sparse_topk_select

pytestmark = pytest.mark.gpu


def test_pipeline_gpu_sparse_equals_core():
    g = torch.Generator(device="cuda").manual_seed(0)
    t, hq, hkv, d, topk = 4096, 64, 4, 128, 16
    q = torch.randn(t, hq, d, device="cuda", generator=g).bfloat16()
    k = torch.randn(t, hkv, d, device="cuda", generator=g).bfloat16()
    v = torch.randn(t, hkv, d, device="cuda", generator=g).bfloat16()
    iq = torch.randn(t, hkv, d, device="cuda", generator=g).bfloat16()
    ik = torch.randn(t, 1, d, device="cuda", generator=g).bfloat16()
    iplan = fmha_plan([t], [t], hkv, 1, output_maxscore=True, device="cuda")
    _, ms = fmha(iq, ik, None, iplan, output_o=False, output_maxscore=True)
    own = (torch.arange(t, device="cuda") // 128 + 1).int()
    sel = sparse_topk_select(ms, topk, num_valid_pages=own, force_end_blocks=1)
    dplan = fmha_plan([t], [t], hq, hkv, kv_block_num=topk, device="cuda")
    o_ref, _ = fmha(q, k, v, dplan, kv_block_indexes=sel)
    splan = sparse_fmha_plan([t], [t], hq, hkv, kv_block_num=topk, device="cuda")
    o, _ = sparse_fmha(q, k, v, splan, kv_block_indexes=sel)
    assert (o.float() - o_ref.float()).abs().max() <= 2**-7 * v.float().abs().max()


@pytest.mark.parametrize("schedule", ["kv_outer", "q_outer", "auto"])
@pytest.mark.parametrize("hq,hkv", [(64, 4), (16, 1), (8, 2)])  # GQA ratios of the minimax-m3 / smoke bundles
def test_gpu_schedules_equal_core(schedule, hq, hkv):
    """Every schedule on CUDA (KV-outer kernel, msa-core's Q-outer kernel, both) == msa.core.fmha on a correlated
    selection (16-token runs share their blocks; the local block forced) over ragged requests, one of 1 token."""
    g = torch.Generator(device="cuda").manual_seed(1)
    q_lens, kv_lens, d, topk = [1, 1000, 2100], [1, 3000, 2100], 128, 16
    tq, tk = sum(q_lens), sum(kv_lens)
    q = torch.randn(tq, hq, d, device="cuda", generator=g).bfloat16()
    k = torch.randn(tk, hkv, d, device="cuda", generator=g).bfloat16()
    v = torch.randn(tk, hkv, d, device="cuda", generator=g).bfloat16()
    sel = torch.full((tq, hkv, topk), -1, dtype=torch.int32)
    t = 0
    for ql, kl in zip(q_lens, kv_lens):
        for i in range(ql):
            vis = (i + kl - ql) // 128 + 1
            for h in range(hkv):
                base = torch.randperm(vis, generator=torch.Generator().manual_seed(i // 16 * 97 + h))[:topk - 1]
                pick = sorted(set(base.tolist()) | {vis - 1})[:topk]
                if i % 9 == 4:
                    pick = pick[:-1]
                sel[t, h, :len(pick)] = torch.tensor(pick, dtype=torch.int32)
            t += 1
    sel = sel.cuda()
    dplan = fmha_plan(q_lens, kv_lens, hq, hkv, kv_block_num=topk, device="cuda")
    o_ref, _, lse_ref = fmha(q, k, v, dplan, kv_block_indexes=sel, return_lse=True)
    splan = sparse_fmha_plan(q_lens, kv_lens, hq, hkv, kv_block_num=topk, device="cuda", schedule=schedule)
    out = torch.full_like(o_ref, float("nan"))
    o, _, lse = sparse_fmha(q, k, v, splan, kv_block_indexes=sel, out=out, return_lse=True, backend="kernel")
    torch.cuda.synchronize()
    assert not torch.isnan(o).any() and not torch.isnan(lse).any()
    assert (o.float() - o_ref.float()).abs().max() <= 2**-7 * v.float().abs().max()
    fin = torch.isfinite(lse_ref)
    assert torch.equal(fin, torch.isfinite(lse))
    assert ((lse[fin] - lse_ref[fin]).abs() <= 2e-3 * lse_ref[fin].abs().clamp_min(1.0)).all()


@pytest.mark.parametrize("schedule", ["q_outer", "auto"])
def test_gpu_fp8_sparse_fmha_q_outer_kernel(schedule):
    """fp8 e4m3 Q / K / V with scalar q / k / v scales through the Q-outer fp8 kernel (O in bf16) == the bf16 path on
    the dequantized values, within fp8's P rounding (rel. L2 < 5e-2, as the dense fp8 module's bound)."""
    from msa.bridge import bridge as br

    g = torch.Generator(device="cuda").manual_seed(2)
    t, hq, hkv, d, topk = 3000, 64, 4, 128, 16
    q8, k8, v8 = (torch.randn(t, h, d, device="cuda", generator=g).to(torch.float8_e4m3fn) for h in (hq, hkv, hkv))
    own = torch.arange(t, device="cuda") // 128 + 1
    scores = torch.randn(t, hkv, (t + 127) // 128, device="cuda", generator=g)
    scores = torch.where(torch.arange(scores.shape[-1], device="cuda") < own.view(-1, 1, 1), scores, -torch.inf)
    sel = torch.sort(torch.topk(scores, topk, dim=-1).indices.int(), dim=-1).values
    sel = torch.where(torch.gather(scores, -1, sel.long()) > -torch.inf, sel, -1)
    sel = torch.sort(torch.where(sel < 0, 1 << 30, sel), dim=-1).values
    sel = torch.where(sel == 1 << 30, -1, sel).int().contiguous()
    qs, ks, vs = 0.5, 0.25, 2.0
    splan = sparse_fmha_plan([t], [t], hq, hkv, kv_block_num=topk, device="cuda", schedule=schedule)
    seen, kv_calls = [], []
    real, real_kv = br._qouter_path, br._kv_outer
    try:
        br._qouter_path = lambda *a, **kw: seen.append(real(*a, **kw)) or seen[-1]
        br._kv_outer = lambda *a, **kw: kv_calls.append(1) or real_kv(*a, **kw)
        out = torch.full((t, hq, d), float("nan"), dtype=torch.bfloat16, device="cuda")
        # auto: the KV-outer kernel takes no fp8, so every item goes Q-outer (no KV-outer part in the reference)
        o, _ = sparse_fmha(q8, k8, v8, splan, kv_block_indexes=sel, out=out, q_scale=qs, k_scale=ks, v_scale=vs,
                           backend="kernel")
    finally:
        br._qouter_path, br._kv_outer = real, real_kv
    assert seen == ["kernel"] and not kv_calls, (seen, kv_calls)
    ref_plan = sparse_fmha_plan([t], [t], hq, hkv, kv_block_num=topk, device="cuda", schedule="q_outer")
    deq = [(x.float() * s).bfloat16() for x, s in ((q8, qs), (k8, ks), (v8, vs))]
    o_ref, _ = sparse_fmha(*deq, ref_plan, kv_block_indexes=sel, backend="kernel")
    torch.cuda.synchronize()
    assert o.dtype == torch.bfloat16 and not torch.isnan(o).any()
    rel = ((o.float() - o_ref.float()).norm() / o_ref.float().norm()).item()
    assert rel < 5e-2, rel


def _correlated_sel(q_lens, kv_lens, hkv, topk, seed):
    """16-token runs share their blocks, the local block forced (what a trained indexer gives: mostly Q-outer)."""
    sel = torch.full((sum(q_lens), hkv, topk), -1, dtype=torch.int32)
    t = 0
    for ql, kl in zip(q_lens, kv_lens):
        for i in range(ql):
            vis = (i + kl - ql) // 128 + 1
            for h in range(hkv):
                base = torch.randperm(vis, generator=torch.Generator().manual_seed(seed + i // 16 * 97 + h))
                pick = sorted(set(base[:topk - 1].tolist()) | {vis - 1})[:topk]
                sel[t, h, :len(pick)] = torch.tensor(pick, dtype=torch.int32)
            t += 1
    return sel.cuda()


def _paged_cache(x, kv_lens, gen, spare=3):
    """Ragged [T, H, D] -> shuffled page-128 cache (unowned pages: garbage) + flat kv_indices."""
    n_req = [-(-n // 128) for n in kv_lens]
    n_pages = sum(n_req) + spare
    perm = torch.randperm(n_pages, generator=gen).tolist()
    cache = torch.randn(n_pages, x.shape[1], 128, x.shape[2], generator=gen, device="cpu").to(x.device) * 50
    idx, start, p = [], 0, 0
    for b, kl in enumerate(kv_lens):
        for j in range(n_req[b]):
            pid = perm[p]
            p += 1
            idx.append(pid)
            seg = x[start + j * 128: start + min((j + 1) * 128, kl)]
            cache[pid, :, : seg.shape[0]] = seg.transpose(0, 1).float()
        start += kl
    return cache, torch.tensor(idx, dtype=torch.int32, device=x.device)


@pytest.mark.parametrize("fmt", ["fp8_kv", "fp8_qkv", "nvfp4_kv"])
@pytest.mark.parametrize("paged", [False, True])
def test_gpu_quantized_kv_staged_equals_bf16_on_dequantised(fmt, paged):
    """Quantised K/V through sparse_fmha (schedule auto, backend="kernel": no reference anywhere) == the same call on
    the dequantised bf16 K/V (and the fp8 Q cast to bf16): staging is exact, so ragged results are bit-identical;
    paged ones (a compact staged pool vs the shuffled cache) within 2^-7 x max|V|. And == msa.core.fmha on the
    dequantised values within 2^-7 x max|V|. fp8 Q = K = V ragged is the fp8 Q-outer kernel's (not staged: other test);
    fp8 Q = K = V paged gathers the pages into ragged fp8 for that kernel: bit-identical to the ragged fp8 call, and
    within fp8's P rounding of msa.core.fmha (rel. L2 < 5e-2)."""
    from msa.cute import quant as Q

    if fmt == "fp8_qkv" and not paged:
        pytest.skip("fp8 Q = K = V ragged runs the fp8 Q-outer kernel unstaged (test_gpu_fp8_sparse_fmha_q_outer_kernel)")
    g = torch.Generator(device="cuda").manual_seed(5)
    q_lens, kv_lens, hq, hkv, d, topk = [700, 1, 1500], [3000, 300, 1500], 64, 4, 128, 16
    q = torch.randn(sum(q_lens), hq, d, device="cuda", generator=g).bfloat16()
    k = torch.randn(sum(kv_lens), hkv, d, device="cuda", generator=g) * 2
    v = torch.randn(sum(kv_lens), hkv, d, device="cuda", generator=g) * 2
    sel = _correlated_sel(q_lens, kv_lens, hkv, topk, 3)
    k_rag, v_rag = k, v
    kw = {}
    if paged:
        cg = torch.Generator().manual_seed(6)
        k, kv_idx = _paged_cache(k, kv_lens, cg)
        v, _ = _paged_cache(v, kv_lens, torch.Generator().manual_seed(6))  # same permutation: same page ids
        kw["kv_indices"] = kv_idx
    if fmt == "nvfp4_kv":
        kq, vq = Q.quantize_nvfp4(k, "auto"), Q.quantize_nvfp4(v, "auto")
        kd, vd = kq.dequantize(torch.bfloat16), vq.dequantize(torch.bfloat16)
    else:
        kq, vq = k.clamp(-448, 448).to(torch.float8_e4m3fn), v.clamp(-448, 448).to(torch.float8_e4m3fn)
        kd, vd = kq.bfloat16(), vq.bfloat16()
    qq = q.to(torch.float8_e4m3fn) if fmt == "fp8_qkv" else q
    qd = qq.bfloat16()
    page_size = 128 if paged else None
    splan = sparse_fmha_plan(q_lens, kv_lens, hq, hkv, page_size=page_size, kv_block_num=topk, device="cuda")
    out = torch.full((sum(q_lens), hq, d), float("nan"), dtype=torch.bfloat16, device="cuda")
    o, _, lse = sparse_fmha(qq, kq, vq, splan, kv_block_indexes=sel, out=out, return_lse=True, backend="kernel",
                            validate=True, **kw)
    o16, _, lse16 = sparse_fmha(qd, kd, vd, splan, kv_block_indexes=sel, return_lse=True, backend="kernel", **kw)
    torch.cuda.synchronize()
    assert o is out and not torch.isnan(o).any()
    vmax = vd.float().abs().max()
    dplan = fmha_plan(q_lens, kv_lens, hq, hkv, page_size=page_size, kv_block_num=topk, device="cuda")
    if fmt == "fp8_qkv":  # paged: gathered into ragged fp8 for the fp8 Q-outer kernel
        rplan = sparse_fmha_plan(q_lens, kv_lens, hq, hkv, kv_block_num=topk, device="cuda")
        k8r, v8r = (x.clamp(-448, 448).to(torch.float8_e4m3fn) for x in (k_rag, v_rag))
        o_r, _, lse_r = sparse_fmha(qq, k8r, v8r, rplan, kv_block_indexes=sel, return_lse=True, backend="kernel")
        o_ref, _ = fmha(qd, kd, vd, dplan, kv_block_indexes=sel, **kw)
        torch.cuda.synchronize()
        assert torch.equal(o, o_r) and torch.equal(lse, lse_r)
        rel = ((o.float() - o_ref.float()).norm() / o_ref.float().norm()).item()
        assert rel < 5e-2, rel
        return
    if paged:
        assert (o.float() - o16.float()).abs().max() <= 2**-7 * vmax
    else:
        assert torch.equal(o, o16) and torch.equal(lse, lse16)
    o_ref, _, lse_ref = fmha(qd, kd, vd, dplan, kv_block_indexes=sel, return_lse=True, **kw)
    torch.cuda.synchronize()
    assert (o.float() - o_ref.float()).abs().max() <= 2**-7 * vmax
    fin = torch.isfinite(lse_ref)
    assert torch.equal(fin, torch.isfinite(lse))
    assert ((lse[fin] - lse_ref[fin]).abs() <= 2e-3 * lse_ref[fin].abs().clamp_min(1.0)).all()


@pytest.mark.parametrize("hq,hkv", [(64, 4), (16, 1)])
def test_gpu_pair_plan_equals_single_cta_plan(monkeypatch, hq, hkv):
    """MSA_QOUTER_PAIR=1 (2-CTA clusters): bit-identical to the single-CTA plan on a per-128-token tile selection (the
    pairs share every K / V tile) and on per-token subsets of it (pairs with different unions load their own)."""
    from msa.bridge import bridge as br

    g = torch.Generator(device="cuda").manual_seed(4)
    t, d, topk = 3000, 128, 16
    q, k, v = (torch.randn(t, h, d, device="cuda", generator=g).bfloat16() for h in (hq, hkv, hkv))
    tiles = (t + 127) // 128
    own = torch.arange(t, device="cuda") // 128
    scores = torch.randn(tiles, hkv, tiles, device="cuda", generator=g)[own]  # one draw per 128-token tile
    scores = torch.where(torch.arange(tiles, device="cuda") <= own.view(-1, 1, 1), scores, -torch.inf)
    scores[torch.arange(t, device="cuda"), :, own] = torch.inf  # the local block
    sel = torch.topk(scores, topk, dim=-1)
    ids = torch.where(sel.values > -torch.inf, sel.indices, 1 << 30).int()
    ids = torch.sort(ids, dim=-1).values
    tile_sel = torch.where(ids == 1 << 30, -1, ids).int().contiguous()
    # per-token subsets: each token drops ~30% of its tile's blocks (never the local one)
    keep = (torch.rand(t, hkv, topk, device="cuda", generator=g) >= 0.3) | (tile_sel == own.view(-1, 1, 1))
    token_sel = torch.where(keep & (tile_sel >= 0), tile_sel, 1 << 30)
    token_sel = torch.sort(token_sel, dim=-1).values
    token_sel = torch.where(token_sel == 1 << 30, -1, token_sel).int().contiguous()
    outs = {}
    for pair in ("0", "1"):
        monkeypatch.setenv(br.QOUTER_PAIR_ENV, pair)
        splan = sparse_fmha_plan([t], [t], hq, hkv, kv_block_num=topk, device="cuda", schedule="q_outer")
        assert splan.qouter.pair == (pair == "1")
        for name, s in (("tile", tile_sel), ("token", token_sel)):
            o, _, lse = sparse_fmha(q, k, v, splan, kv_block_indexes=s, return_lse=True, backend="kernel")
            outs[pair, name] = (o, lse)
    torch.cuda.synchronize()
    assert torch.equal(outs["0", "tile"][0], outs["1", "tile"][0])
    assert torch.equal(outs["0", "tile"][1], outs["1", "tile"][1])
    assert not torch.isnan(outs["1", "token"][0]).any()
    assert torch.equal(outs["0", "token"][0], outs["1", "token"][0])
    assert torch.equal(outs["0", "token"][1], outs["1", "token"][1])


@pytest.mark.parametrize("schedule", ["q_outer", "auto", "kv_outer"])
def test_gpu_sparse_fmha_replays_in_a_cuda_graph(schedule):
    """The whole bridge call captured in a CUDA graph (no host sync inside: "auto" records the hybrid) and replayed on
    new inputs copied into the captured tensors: bit-identical to eager calls on those inputs (q_outer: the 2-CTA
    pair kernel and the union builder; auto: KV-outer then Q-outer over the routed rows; kv_outer: CSR + combine)."""
    q_lens, kv_lens, hq, hkv, d, topk = [700, 1300], [900, 1300], 16, 1, 128, 16  # G 16: in the CuTe bundle
    tq, tk = sum(q_lens), sum(kv_lens)

    def draw(seed):
        gg = torch.Generator(device="cuda").manual_seed(seed)
        q = torch.randn(tq, hq, d, device="cuda", generator=gg).bfloat16()
        k = torch.randn(tk, hkv, d, device="cuda", generator=gg).bfloat16()
        v = torch.randn(tk, hkv, d, device="cuda", generator=gg).bfloat16()
        return q, k, v, _correlated_sel(q_lens, kv_lens, hkv, topk, seed)

    splan = sparse_fmha_plan(q_lens, kv_lens, hq, hkv, kv_block_num=topk, device="cuda", schedule=schedule)
    static = [x.clone() for x in draw(1)]
    out = torch.empty(tq, hq, d, dtype=torch.bfloat16, device="cuda")

    def call():
        return sparse_fmha(*static[:3], splan, kv_block_indexes=static[3], out=out, return_lse=True,
                           backend="kernel")

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            call()  # warm-up outside capture: module loads, plan-time tables, cached orders
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        _, _, lse_g = call()
    for seed in (2, 3):
        new = draw(seed)
        for dst, src in zip(static, new):
            dst.copy_(src)
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        o_eager, _, lse_eager = sparse_fmha(*new[:3], splan, kv_block_indexes=new[3], return_lse=True,
                                            backend="kernel")
        torch.cuda.synchronize()
        assert not torch.isnan(out).any()
        if schedule == "auto":  # eager "auto" may take another branch (Q-outer alone): same math, other rounding
            assert (out.float() - o_eager.float()).abs().max() <= 2**-7 * new[2].float().abs().max()
            fin = torch.isfinite(lse_eager)
            assert torch.equal(fin, torch.isfinite(lse_g))
            assert ((lse_g[fin] - lse_eager[fin]).abs() <= 2e-3 * lse_eager[fin].abs().clamp_min(1.0)).all()
        else:
            assert torch.equal(out, o_eager) and torch.equal(lse_g, lse_eager)
