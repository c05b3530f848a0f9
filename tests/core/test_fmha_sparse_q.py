"""msa-core SM90 FMHA, mode "sparse_q" (MSA sparse prefill, Q-outer): plan tables on the CPU, the kernel on a GPU.

The GPU tests build the per-item unions with a plain loop builder here (small shapes) and compare the kernel with
an fp32 reference that attends every (token, query head) to the keys of exactly the blocks its token selected.
"""

from __future__ import annotations

import math

import pytest
import torch
from msa.core.kernels import fmha_sm90 as k90
from msa.core.kernels import fmha_sm90_qouter as qo
from msa_core_testutil import FP8_FAST_LSE_ABS, check_fmha_output, need_kernel, paged_cache

BLOCK = 128


def _visible_blocks(i, qlen, klen, causal):
    lim = min(klen, i + klen - qlen + 1) if causal else klen
    return max(0, -(-lim // BLOCK))


def make_selection(qo_lens, kv_lens, hkv, topk, causal, kind, seed=0):
    """kv_block_indexes [total_q, Hkv, topk]: ascending, -1 tail. kind: random | correlated | empty-some."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for qlen, klen in zip(qo_lens, kv_lens):
        base = None
        for i in range(qlen):
            nb = _visible_blocks(i, qlen, klen, causal)
            per_head = []
            for h in range(hkv):
                if nb == 0 or (kind == "empty-some" and (i + h) % 5 == 0):
                    ids = []
                elif kind == "correlated":
                    if base is None or i % 16 == 0:
                        base = torch.randperm(10**6, generator=g)[: 4 * topk].tolist()
                    pool = sorted({b % nb for b in base[h : h + topk]} | {nb - 1})
                    ids = pool[-topk:]
                else:
                    ids = torch.randperm(nb, generator=g)[:topk].tolist()
                    if nb - 1 not in ids and len(ids) == topk:
                        ids[-1] = nb - 1  # the forced local block
                    ids = sorted(set(ids) | {nb - 1})[-topk:] if len(ids) < topk else sorted(ids)
                ids = sorted(ids)
                per_head.append(ids + [-1] * (topk - len(ids)))
            rows.append(per_head)
    return torch.tensor(rows, dtype=torch.int32).reshape(-1, hkv, topk)


def loop_unions(qplan, sel, routed=None):
    """The builder contract, by plain loops (small shapes): union, union_len, mask, order (int32, CPU)."""
    n, w = qplan.num_items, qplan.mask_words
    items = list(zip(qplan.item_token0.tolist(), qplan.item_ntok.tolist(), qplan.item_kv_head.tolist()))
    lists = []
    for tok0, ntok, h in items:
        ids = sorted({int(b) for tok in range(tok0, tok0 + ntok) for b in sel[tok, h].tolist() if b >= 0})
        lists.append(ids)
    umax = max(1, max(len(x) for x in lists)) if lists else 1
    union = torch.zeros(n, umax, dtype=torch.int32)
    union_len = torch.zeros(n, dtype=torch.int32)
    mask = torch.zeros(n, umax, w, dtype=torch.int64)
    for i, ids in enumerate(lists):
        union[i, : len(ids)] = torch.tensor(ids, dtype=torch.int32)
        union_len[i] = len(ids) if routed is None or routed[i] else -1
        tok0, ntok, h = items[i]
        for tt in range(ntok):
            for b in sel[tok0 + tt, h].tolist():
                if b >= 0:
                    mask[i, ids.index(b), tt // 32] |= 1 << (tt % 32)
    mask = torch.where(mask >= 2**31, mask - 2**32, mask).to(torch.int32)
    order = torch.argsort(union_len.to(torch.int64), descending=True, stable=True).to(torch.int32)
    return union, union_len, mask, order


def reference(q, k, v, qo_lens, kv_lens, sel, causal, sm_scale):
    """fp32 O / LSE: each (token, query head) over the keys of the blocks its token selected for its KV head."""
    hq, hkv = q.shape[1], k.shape[1]
    g = hq // hkv
    out = torch.zeros(q.shape, dtype=torch.float32)
    lse = torch.full(q.shape[:2], -math.inf)
    qs = ks = 0
    for qlen, klen in zip(qo_lens, kv_lens):
        qf, kf, vf = q[qs : qs + qlen].float(), k[ks : ks + klen].float(), v[ks : ks + klen].float()
        keypos = torch.arange(klen)
        for i in range(qlen):
            for h in range(hkv):
                blocks = sel[qs + i, h]
                allowed = torch.zeros(klen, dtype=torch.bool)
                for b in blocks.tolist():
                    if b >= 0:
                        allowed |= (keypos // BLOCK) == b
                if causal:
                    allowed &= keypos <= i + klen - qlen
                if not allowed.any():
                    continue
                s = (qf[i, h * g : (h + 1) * g] @ kf[allowed, h].T) * sm_scale  # [g, keys]
                m = s.max(dim=-1, keepdim=True).values
                p = torch.exp(s - m)
                den = p.sum(-1, keepdim=True)
                out[qs + i, h * g : (h + 1) * g] = (p / den) @ vf[allowed, h]
                lse[qs + i, h * g : (h + 1) * g] = (m + den.log()).squeeze(-1)
        qs += qlen
        ks += klen
    return out, lse


# ---------------------------------------------------------------------------------------------------- CPU: plan
@pytest.mark.parametrize("hq,hkv", [(64, 4), (8, 2), (4, 4), (32, 1)])
def test_plan_items_tile_every_token_once_per_kv_head(hq, hkv):
    qo_lens, kv_lens = [1, 300, 0, 129], [128, 1000, 5, 129]
    p = qo.plan(qo_lens, kv_lens, hq, hkv, causal=True, device="cpu")
    g = hq // hkv
    assert p.group == g and p.T == 128 // g
    seen = torch.zeros(sum(qo_lens), hkv, dtype=torch.int64)
    for i in range(p.num_items):
        tok0, ntok, h = int(p.item_token0[i]), int(p.item_ntok[i]), int(p.item_kv_head[i])
        assert 1 <= ntok <= p.T
        seen[tok0 : tok0 + ntok, h] += 1
        row = p.work[i].tolist()
        assert row[5] == h * g and row[9] == -1
        assert row[0] + row[4] * p.T == tok0  # q_start + m_block * T
        assert row[6] == row[3] - row[1]  # causal bottom-right offset
    assert (seen == 1).all()
    # request-major, then tile, then KV head (the union builder's enumeration)
    keys = [(int(p.item_token0[i]), int(p.item_kv_head[i])) for i in range(p.num_items)]
    assert keys == sorted(keys)


@pytest.mark.parametrize("hq,hkv", [(64, 4), (8, 2), (2, 2)])
def test_pair_plan_pairs_neighbouring_tiles(hq, hkv):
    """plan(pair=True): the single plan's items and work rows, plus pair_items -- every item exactly once, the first
    of a pair an even token tile j of its request, the second tile j + 1 of the same request and KV head (or -1)."""
    qo_lens, kv_lens = [1, 300, 0, 129, 17], [128, 1000, 5, 129, 40]
    p = qo.plan(qo_lens, kv_lens, hq, hkv, causal=True, device="cpu", pair=True)
    single = qo.plan(qo_lens, kv_lens, hq, hkv, causal=True, device="cpu")
    assert p.pair and p.mode == "sparse_q2" and not single.pair and single.mode == "sparse_q"
    assert p.T == single.T and torch.equal(p.work, single.work) and p.num_ctas % 2 == 0
    pairs = p.pair_items.tolist()
    seen = [i for row in pairs for i in row if i >= 0]
    assert sorted(seen) == list(range(p.num_items))
    for a, b in pairs:
        ra, rb = p.work[a].tolist(), (p.work[b].tolist() if b >= 0 else None)
        assert ra[4] % 2 == 0  # m_block: even tile of its request
        if rb is None:
            n_tiles = -(-ra[1] // p.T)
            assert ra[4] + 1 == n_tiles  # only a request's odd last tile has no partner
        else:
            assert rb[0] == ra[0] and rb[5] == ra[5] and rb[4] == ra[4] + 1  # same request and head, next tile
    assert [a for a, _ in pairs] == sorted(a for a, _ in pairs)  # enumeration order


def test_plan_rejects_bad_head_ratios_and_lengths():
    with pytest.raises(ValueError, match="num_qo_heads"):
        qo.plan([8], [8], 6, 4, device="cpu")
    with pytest.raises(ValueError, match="power of two"):
        qo.plan([8], [8], 12, 1, device="cpu")
    with pytest.raises(ValueError, match="kv_lens"):
        qo.plan([8, 8], [8], 4, 1, device="cpu")
    with pytest.raises(ValueError, match="qo_lens"):
        qo.plan([-1], [8], 4, 1, device="cpu")


def test_jit_specs_follow_the_preset_and_skip_sm100():
    specs = qo.jit_specs({"dtypes": ["bf16", "fp8", "fp16"], "head_dim": [64, 128]}, "sm_90a")
    names = sorted(s.name for s in specs)
    assert len(names) == 24 and all("head_dim=128" in n for n in names)
    assert sum("mode=3" in n for n in names) == sum("mode=4" in n for n in names) == 12  # single-CTA and pairs
    assert sum("dtype=float16" in n for n in names) == 8  # causal x paged x mode
    fp8 = [n for n in names if "dtype=float8_e4m3fn" in n]
    assert len(fp8) == 8 and sum("fp8_p=exp2" in n for n in fp8) == 4  # causal x softmax build x mode, ragged only
    assert sum("paged=True" in n for n in names) == 8
    assert qo.jit_specs({"dtypes": ["bf16"], "head_dim": [128]}, "sm_100a") == []
    with pytest.raises(NotImplementedError, match="ragged"):
        k90.jit_spec("float8_e4m3fn", 128, True, True, mode="sparse_q")


def test_registered_for_warmup():
    """`msa-cache warmup --preset ...` (and so an exported bundle for offline GPU hosts) builds the sparse_q modules."""
    from msa.core import variants

    specs = [s for s in variants.specs_for({"dtypes": ["bf16"], "head_dim": [128]}, ["sm_90a", "sm_100a"])
             if s.family == "fmha_sm90" and s.params.get("mode") in (3, 4)]
    assert sorted((s.params["mode"], s.params["causal"], s.params["paged"]) for s in specs) == [
        (m, c, pg) for m in (3, 4) for c in (False, True) for pg in (False, True)]
    assert all(s.arch == "sm_90a" for s in specs)


def test_supports_names_what_is_missing():
    assert qo.supports(q_dtype=torch.bfloat16, kv_dtype=torch.bfloat16, head_dim=128, head_dim_v=128,
                       qhead_per_kv=16)[0]
    assert qo.supports(q_dtype=torch.float8_e4m3fn, kv_dtype=torch.float8_e4m3fn, head_dim=128, qhead_per_kv=16)[0]
    for kw, why in ((dict(q_dtype=torch.float32), "dtype"), (dict(q_dtype=torch.float8_e4m3fn, paged=True), "paged"),
                    (dict(head_dim=64), "head dims"),
                    (dict(qhead_per_kv=12), "power of two"),
                    (dict(q_dtype=torch.float16, kv_dtype=torch.bfloat16), "K/V dtype")):
        ok, msg = qo.supports(**kw)
        assert not ok and why in msg, (kw, msg)


def test_loop_builder_masks_match_selections():
    qo_lens, kv_lens = [40, 7], [700, 300]
    p = qo.plan(qo_lens, kv_lens, 16, 4, causal=True, device="cpu")
    sel = make_selection(qo_lens, kv_lens, 4, 4, True, "random", seed=3)
    union, union_len, mask, order = loop_unions(p, sel)
    for i in range(p.num_items):
        tok0, ntok, h = int(p.item_token0[i]), int(p.item_ntok[i]), int(p.item_kv_head[i])
        u = union[i, : union_len[i]].tolist()
        assert u == sorted(set(u))
        for tt in range(ntok):
            picked = {union[i, j].item() for j in range(union_len[i]) if (int(mask[i, j, tt // 32]) >> (tt % 32)) & 1}
            assert picked == {b for b in sel[tok0 + tt, h].tolist() if b >= 0}
    assert (union_len[order.long()][:-1] >= union_len[order.long()][1:]).all()


# ---------------------------------------------------------------------------------------------------- GPU: kernel
CASES = [
    # name, qo_lens, kv_lens, hq, hkv, topk, causal, selection, dtype
    ("g16-correlated", [300], [1000], 64, 4, 16, True, "correlated", torch.bfloat16),
    ("g16-random-ragged", [1, 200, 77], [128, 900, 77], 32, 2, 8, True, "random", torch.bfloat16),
    ("g4-random", [150, 64], [700, 512], 8, 2, 4, True, "random", torch.bfloat16),
    ("g1-correlated-long", [260], [1300], 2, 2, 16, True, "correlated", torch.bfloat16),
    ("g8-noncausal", [90, 33], [600, 257], 8, 1, 6, False, "random", torch.bfloat16),
    ("g16-empty-some", [40, 9], [500, 200], 16, 1, 4, True, "empty-some", torch.bfloat16),
    ("g2-fp16", [130], [640], 4, 2, 5, True, "random", torch.float16),
    ("g16-topk1", [64], [256], 16, 1, 1, True, "random", torch.bfloat16),
    # paged K/V (page = block = 128, shuffled pages; 10th field)
    ("g16-correlated-paged", [300], [1000], 64, 4, 16, True, "correlated", torch.bfloat16, True),
    ("g4-random-ragged-paged", [150, 1, 64], [700, 300, 512], 8, 2, 4, True, "random", torch.bfloat16, True),
    # fp8 e4m3 Q / K / V (ragged; O in bf16)
    ("g16-correlated-fp8", [300], [1000], 64, 4, 16, True, "correlated", torch.float8_e4m3fn),
    ("g16-random-ragged-fp8", [1, 200, 77], [128, 900, 77], 32, 2, 8, True, "random", torch.float8_e4m3fn),
    ("g8-noncausal-fp8", [90, 33], [600, 257], 8, 1, 6, False, "random", torch.float8_e4m3fn),
    ("g16-empty-some-fp8", [40, 9], [500, 200], 16, 1, 4, True, "empty-some", torch.float8_e4m3fn),
]
# O rel. L2 bounds per dtype: bf16 / fp16 P and O rounding; fp8 P is rounded to e4m3 (3 mantissa bits) as in the
# dense fp8 module (tests/core/test_fmha_fp8.py O_BOUND).
O_BOUNDS = {torch.bfloat16: 1.5e-2, torch.float16: 4e-3, torch.float8_e4m3fn: 5e-2}


def _gpu_or_skip():
    need_kernel(k90)


def _paged(k, v, kv_lens, seed):
    """K/V in a shuffled page-128 cache + its flat page table. Unowned slots hold random finite garbage: like the dense
    paged kernel, the sparse-Q kernel needs finite values there (P = 0 there, but 0 * NaN = NaN in the PV GEMM)."""
    return paged_cache(k, v, kv_lens, page=BLOCK, seed=seed + 7)


def _run(case, routed_every=None, seed=0, pair=False):
    _, qo_lens, kv_lens, hq, hkv, topk, causal, kind, dtype, *rest = case
    paged = bool(rest and rest[0])
    dev = torch.device("cuda")
    torch.manual_seed(seed)
    tq, tk = sum(qo_lens), sum(kv_lens)
    # fp8: e4m3 inputs (the reference computes in fp32 from the same rounded values); sm_scale below folds nothing
    q = torch.randn(tq, hq, 128).to(dtype)
    k = torch.randn(tk, hkv, 128).to(dtype)
    v = torch.randn(tk, hkv, 128).to(dtype)
    sel = make_selection(qo_lens, kv_lens, hkv, topk, causal, kind, seed=seed)
    p = qo.plan(qo_lens, kv_lens, hq, hkv, causal=causal, paged=paged, device=dev, pair=pair)
    kk, vv, extra = k, v, {}
    if paged:
        kk, vv, table = _paged(k, v, kv_lens, seed)
        extra = {"kv_indices": table.to(dev)}
        if len(kv_lens) > 1:  # the [B, max pages] page-table form instead of the flat list
            n_pages = [-(-n // BLOCK) for n in kv_lens]
            pt = torch.zeros(len(kv_lens), max(n_pages), dtype=torch.int32)
            for b, (s0, n) in enumerate(zip([sum(n_pages[:i]) for i in range(len(n_pages))], n_pages)):
                pt[b, :n] = table[s0 : s0 + n]
            extra = {"page_table": pt.to(dev)}
    routed = None if routed_every is None else [i % routed_every != 0 for i in range(p.num_items)]
    tabs = [t.to(dev) for t in loop_unions(p, sel, routed)]
    out_dtype = torch.bfloat16 if dtype == torch.float8_e4m3fn else dtype
    out = torch.full((tq, hq, 128), math.nan, dtype=out_dtype, device=dev)
    lse = torch.full((tq, hq), math.nan, dtype=torch.float32, device=dev)
    sm = 128**-0.5
    qo.run(p, q.to(dev), kk.to(dev), vv.to(dev), *tabs, out=out, lse=lse, sm_scale=sm, **extra)
    torch.cuda.synchronize()
    ref_o, ref_lse = reference(q, k, v, qo_lens, kv_lens, sel, causal, sm)
    return p, routed, out.cpu(), lse.cpu(), ref_o, ref_lse


@pytest.mark.gpu
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_sparse_q_matches_fp32_reference(case):
    _gpu_or_skip()
    _, _, out, lse, ref_o, ref_lse = _run(case)
    check_fmha_output(out, lse, ref_o, ref_lse, O_BOUNDS[case[8]])


def _check_only_routed_rows_written(case, p, routed, out, lse, ref_o, ref_lse):
    """Rows of unrouted items keep their NaN poison; the routed items' rows match the fp32 reference."""
    g = p.group
    written = torch.zeros(out.shape[:2], dtype=torch.bool)
    for i in range(p.num_items):
        if routed[i]:
            tok0, ntok, h = int(p.item_token0[i]), int(p.item_ntok[i]), int(p.item_kv_head[i])
            written[tok0 : tok0 + ntok, h * g : (h + 1) * g] = True
    assert torch.isnan(out[~written]).all() and torch.isnan(lse[~written]).all(), "unrouted rows were written"
    check_fmha_output(out[written], lse[written], ref_o[written], ref_lse[written], O_BOUNDS[case[8]])


PAIR_CASES = CASES


@pytest.mark.gpu
@pytest.mark.parametrize("case", PAIR_CASES, ids=[c[0] for c in PAIR_CASES])
def test_sparse_q_pair_matches_fp32_reference_and_single_cta_bitwise(case):
    """Pair plans (neighbouring items on a 2-CTA cluster: shared K / V tiles where their unions are equal, own tiles
    + padding otherwise): every case (G 1..32, requests with an odd last tile, empty selections, paged, fp8) within
    the fp32 reference's bounds and bit-identical to the single-CTA kernel."""
    _gpu_or_skip()
    p, _, out, lse, ref_o, ref_lse = _run(case, pair=True)
    assert p.pair
    check_fmha_output(out, lse, ref_o, ref_lse, O_BOUNDS[case[8]])
    _, _, out1, lse1, _, _ = _run(case)
    assert torch.equal(out, out1) and torch.equal(lse, lse1)


@pytest.mark.gpu
def test_sparse_q_pair_leaves_unrouted_items_untouched_and_is_deterministic():
    _gpu_or_skip()
    case = CASES[1]
    p, routed, out, lse, ref_o, ref_lse = _run(case, routed_every=3, pair=True)
    _check_only_routed_rows_written(case, p, routed, out, lse, ref_o, ref_lse)
    again = _run(case, routed_every=3, pair=True)  # NaN poison in the unrouted rows: compare with equal_nan
    torch.testing.assert_close(out, again[2], rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(lse, again[3], rtol=0, atol=0, equal_nan=True)


@pytest.mark.gpu
def test_sparse_q_pair_equals_single_cta_items_on_tile_selections():
    """Selections shared by 16-token runs (the pairs take the shared, multicast path) and requests of odd tile counts:
    bit-identical O and LSE to the single-CTA kernel."""
    _gpu_or_skip()
    dev = torch.device("cuda")
    torch.manual_seed(5)
    qo_lens, kv_lens, hq, hkv, topk = [1000, 333], [1500, 333], 64, 4, 8
    tq, tk = sum(qo_lens), sum(kv_lens)
    q = torch.randn(tq, hq, 128, dtype=torch.bfloat16)
    k = torch.randn(tk, hkv, 128, dtype=torch.bfloat16)
    v = torch.randn(tk, hkv, 128, dtype=torch.bfloat16)
    rows = []
    for qlen, klen in zip(qo_lens, kv_lens):
        for i in range(qlen):
            nb = _visible_blocks(i, qlen, klen, True)
            per_head = []
            for h in range(hkv):  # the same draw for all 16 tokens of a pair: seed by (pair, head)
                gg = torch.Generator().manual_seed(1000 * (i // 16) + h + 7 * qlen)
                ids = sorted(set(torch.randint(0, max(nb, 1), (topk - 1,), generator=gg).tolist()) | {nb - 1})
                ids = [b for b in ids if b < nb][-topk:]
                per_head.append(ids + [-1] * (topk - len(ids)))
            rows.append(per_head)
    sel = torch.tensor(rows, dtype=torch.int32)
    res = []
    for pair in (False, True):
        p = qo.plan(qo_lens, kv_lens, hq, hkv, causal=True, device=dev, pair=pair)
        tabs = [t.to(dev) for t in loop_unions(p, sel)]
        out = torch.full((tq, hq, 128), math.nan, dtype=torch.bfloat16, device=dev)
        lse = torch.full((tq, hq), math.nan, dtype=torch.float32, device=dev)
        qo.run(p, q.to(dev), k.to(dev), v.to(dev), *tabs, out=out, lse=lse, sm_scale=128**-0.5)
        res.append((out.cpu(), lse.cpu()))
    assert not torch.isnan(res[0][0]).any()
    assert torch.equal(res[0][0], res[1][0]) and torch.equal(res[0][1], res[1][1])


@pytest.mark.gpu
@pytest.mark.parametrize("case", [c for c in CASES if c[8] == torch.float8_e4m3fn], ids=lambda c: c[0])
def test_sparse_q_fp8_fast_softmax_matches_fp32_reference(case, monkeypatch):
    """The fast fp8 build (P's code from two FMAs; forced, as these calls return the LSE): O bound as the exact build,
    LSE within FP8_FAST_LSE_ABS (its LSE is that of the P it used)."""
    _gpu_or_skip()
    monkeypatch.setenv(k90.FP8_SOFTMAX_ENV, "fast")
    _, _, out, lse, ref_o, ref_lse = _run(case)
    check_fmha_output(out, lse, ref_o, ref_lse, O_BOUNDS[case[8]], lse_abs=FP8_FAST_LSE_ABS)


@pytest.mark.gpu
@pytest.mark.parametrize("which", [1, -3], ids=["bf16", "fp8"])
def test_sparse_q_leaves_unrouted_items_untouched(which):
    """Rows of unrouted items keep their (NaN) poison; fp8: the transposed-V pre-pass and the staged epilogue write
    nothing for them either."""
    _gpu_or_skip()
    case = CASES[which]
    p, routed, out, lse, ref_o, ref_lse = _run(case, routed_every=3)
    _check_only_routed_rows_written(case, p, routed, out, lse, ref_o, ref_lse)


@pytest.mark.gpu
@pytest.mark.parametrize("which", [0, -4], ids=["bf16", "fp8"])
def test_sparse_q_is_deterministic(which):
    _gpu_or_skip()
    a = _run(CASES[which], seed=1)
    b = _run(CASES[which], seed=1)
    assert torch.equal(a[2], b[2]) and torch.equal(a[3], b[3])


def test_sparse_q_fp8_refusals():
    p = qo.plan([8], [128], 16, 1, causal=True, paged=True, device="cpu")
    q = torch.zeros(8, 16, 128).to(torch.float8_e4m3fn)
    kv = torch.zeros(1, 1, 128, 128).to(torch.float8_e4m3fn)
    with pytest.raises(NotImplementedError, match="paged"):
        qo.run(p, q, kv, kv, None, None, None, None)
    p = qo.plan([8], [128], 16, 1, causal=True, device="cpu")
    kv = torch.zeros(128, 1, 128).to(torch.float8_e4m3fn)
    tabs = (torch.zeros(p.num_items, 1, dtype=torch.int32), torch.zeros(p.num_items, dtype=torch.int32),
            torch.zeros(p.num_items, 1, 1, dtype=torch.int32), torch.zeros(p.num_items, dtype=torch.int32))
    with pytest.raises(ValueError, match="out: expected torch.bfloat16"):
        qo.run(p, q, kv, kv, *tabs, out=torch.empty(8, 16, 128, dtype=torch.float16))
    with pytest.raises(ValueError, match="sm_scale"):
        qo.run(p, q, kv, kv, *tabs, sm_scale=-1.0)


def _built_sm90a_module(dtype: str, mode: str, module_arch_check) -> bytes:
    """Build one causal ragged d128 module for sm_90a (skips without nvcc), check its cubin arch, return its bytes."""
    from pathlib import Path

    from msa.core.jit import toolchain

    try:
        toolchain.nvcc_path()
    except toolchain.ToolchainError as e:
        pytest.skip(str(e))
    so = k90.jit_spec(dtype, 128, True, False, mode=mode).build().file("module.so")
    module_arch_check(so, "sm_90a", 90)
    return Path(so).read_bytes()


@pytest.mark.compile
@pytest.mark.slow
def test_fp8_sparse_q_module_builds_for_sm90a(module_arch_check):
    """The fp8 sparse-Q module (packed e4m3 Q boxes, V^T pre-pass, staged bf16 epilogue) compiles for sm_90a."""
    blob = _built_sm90a_module("float8_e4m3fn", "sparse_q", module_arch_check)
    assert b"fmha_fwd" in blob and b"fmha_sm90_vt_kernel" in blob and b"fmha_sm90_kernel" in blob


@pytest.mark.compile
@pytest.mark.slow
def test_pair_sparse_q_module_builds_for_sm90a(module_arch_check):
    """The pair module (2-CTA clusters, multicast K / V, cross-CTA stage release) compiles for sm_90a and takes the pair
    table (its binding checks sq_pairs)."""
    blob = _built_sm90a_module("bfloat16", "sparse_q2", module_arch_check)
    assert b"fmha_fwd" in blob and b"fmha_sm90_kernel" in blob and b"sq_pairs" in blob


def test_vt_tiles_used_marks_only_the_tiles_the_unions_read(monkeypatch):
    """The per-call fp8 pre-pass list: a tile keeps its valid count iff a routed item's union reads it (the item's
    request's first tile + logical block); entries past union_len and unrouted items (-1) mark nothing; short contexts
    keep the plan's list object untouched."""
    from types import SimpleNamespace

    tiles = torch.tensor([[128 * i, 128] for i in range(10)], dtype=torch.int32)
    work = torch.zeros(3, 12, dtype=torch.int32)
    work[:, 11] = torch.tensor([0, 0, 6])  # items 0, 1: request 0 (tiles 0-5); item 2: request 1 (tiles 6-9)
    union = torch.tensor([[0, 2, 5], [1, 3, 4], [1, 9, 9]], dtype=torch.int32)
    union_len = torch.tensor([2, -1, 1], dtype=torch.int32)  # item 0 reads blocks 0, 2; item 1 unrouted; item 2: 1
    plan = SimpleNamespace(work=work)
    monkeypatch.setattr(qo, "VT_SKIP_MIN_TILES", 4)
    out = qo._vt_tiles_used(plan, tiles, union, union_len)
    assert out[:, 0].tolist() == tiles[:, 0].tolist()
    assert [i for i in range(10) if out[i, 1] >= 0] == [0, 2, 7]
    assert (out[[1, 3, 4, 5, 6, 8, 9], 1] == -1).all() and tiles[:, 1].eq(128).all()  # the plan's list unchanged
    monkeypatch.setattr(qo, "VT_SKIP_MIN_TILES", 11)
    assert qo._vt_tiles_used(plan, tiles, union, union_len) is tiles


@pytest.mark.gpu
def test_fp8_pre_pass_transposes_only_the_tiles_the_unions_read(monkeypatch):
    """fp8 Q-outer over a long context read by few tokens: with the pre-pass restricted to the tiles the unions read
    (threshold forced to 0) and the V^T workspace poisoned with e4m3 NaN before every call, O and LSE are bitwise
    those of the whole-V pre-pass (so every tile read was transposed) and some tiles were skipped."""
    _gpu_or_skip()
    case = ("fp8-long-few", [16, 24], [8000, 3000], 32, 2, 4, True, "correlated", torch.float8_e4m3fn)
    _, _, out_all, lse_all, ref_o, ref_lse = _run(case)
    check_fmha_output(out_all, lse_all, ref_o, ref_lse, O_BOUNDS[torch.float8_e4m3fn])
    monkeypatch.setattr(qo, "VT_SKIP_MIN_TILES", 0)
    orig_tables, orig_used = qo._fp8_tables, qo._vt_tiles_used
    skipped = []

    def poisoned_tables(*a, **kw):
        vt, tiles, hs = orig_tables(*a, **kw)
        vt.fill_(0x7F)  # e4m3 NaN in every slot the pre-pass does not write
        return vt, tiles, hs

    def counting_used(*a, **kw):
        t = orig_used(*a, **kw)
        skipped.append(int((t[:, 1] < 0).sum()))
        return t

    monkeypatch.setattr(qo, "_fp8_tables", poisoned_tables)
    monkeypatch.setattr(qo, "_vt_tiles_used", counting_used)
    _, _, out, lse, _, _ = _run(case)
    assert skipped and skipped[0] > 0, "nothing was skipped: the case does not exercise the restriction"
    assert torch.equal(out, out_all) and torch.equal(lse, lse_all)
