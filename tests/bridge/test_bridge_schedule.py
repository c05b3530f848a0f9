"""msa.bridge.sparse_fmha ``schedule`` ("kv_outer" / "q_outer" / "auto") on CPU: every schedule equals
msa.core.fmha(kv_block_indexes=...) (both fp32 references rounded once to bf16: within 2^-8 x max|V|, LSE 1e-4);
"auto" hands the KV-outer call the unrouted items' selections only (routed (token, KV head) lists all -1) and the
Q-outer pass the rest; plans and calls the Q-outer path cannot serve fall back ("auto") or raise ("q_outer")."""

from __future__ import annotations

import pytest
import torch
from msa.bridge import bridge as br
from msa.bridge import sparse_fmha, sparse_fmha_plan
from msa.core import fmha, fmha_plan


def _selections(gen, q_lens, kv_lens, hkv, topk, causal=True, correlated=False):
    """Ascending, -1 tail; correlated: the tokens of a 16-token run share their picks (+ the local block)."""
    out = torch.full((sum(q_lens), hkv, topk), -1, dtype=torch.int32)
    t = 0
    for ql, kl in zip(q_lens, kv_lens):
        nblk = -(-kl // 128)
        shared = {}
        for i in range(ql):
            vis = min(nblk, (i + kl - ql) // 128 + 1) if causal else nblk
            for h in range(hkv):
                if vis <= 0:
                    continue
                if correlated:
                    key = (i // 16, h)
                    if key not in shared:
                        shared[key] = torch.randperm(vis, generator=gen)[:topk].tolist()
                    pick = sorted(set([b for b in shared[key] if b < vis][: topk - 1] + [vis - 1]))
                else:
                    pick = sorted(torch.randperm(vis, generator=gen)[:topk].tolist())
                if i % 5 == 2:
                    pick = pick[:-1]  # short lists
                out[t, h, : len(pick)] = torch.tensor(pick, dtype=torch.int32)
            t += 1
    return out


def _problem(seed, q_lens, kv_lens, hq, hkv, topk, d=32, causal=True, correlated=False):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(sum(q_lens), hq, d, generator=gen).bfloat16()
    k = torch.randn(sum(kv_lens), hkv, d, generator=gen).bfloat16()
    v = torch.randn(sum(kv_lens), hkv, d, generator=gen).bfloat16()
    return q, k, v, _selections(gen, q_lens, kv_lens, hkv, topk, causal, correlated)


def _close(o, lse, o_ref, lse_ref, v):
    assert (o.float() - o_ref.float()).abs().max() <= 2**-8 * v.float().abs().max()
    fin = torch.isfinite(lse_ref)
    assert torch.equal(fin, torch.isfinite(lse))
    assert (lse[fin] - lse_ref[fin]).abs().max() < 1e-4


CASES = [
    # q_lens, kv_lens, hq, hkv, topk, causal, correlated
    ([1, 70, 45], [1, 900, 400], 8, 2, 3, True, True),  # G 4 (T 32), a 1-token request
    ([130, 20], [1200, 300], 4, 4, 2, False, False),  # G 1 (T 128), non-causal
    ([40], [2000], 16, 1, 4, True, True),  # G 16 (T 8)
]


@pytest.mark.parametrize("schedule,route_max", [("kv_outer", None), ("q_outer", None), ("auto", None), ("auto", 0),
                                                ("auto", 5)])
@pytest.mark.parametrize("q_lens,kv_lens,hq,hkv,topk,causal,correlated", CASES)
def test_schedules_equal_core(schedule, route_max, q_lens, kv_lens, hq, hkv, topk, causal, correlated):
    q, k, v, sel = _problem(sum(q_lens) + topk, q_lens, kv_lens, hq, hkv, topk, causal=causal, correlated=correlated)
    dp = fmha_plan(q_lens, kv_lens, hq, hkv, causal=causal, kv_block_num=topk)
    o_ref, _, lse_ref = fmha(q, k, v, dp, kv_block_indexes=sel, return_lse=True, validate=True)
    sp = sparse_fmha_plan(q_lens, kv_lens, hq, hkv, causal=causal, kv_block_num=topk, schedule=schedule,
                          route_max=route_max)
    assert sp.schedule == schedule and (sp.qouter is None) == (schedule == "kv_outer")
    out = torch.full_like(o_ref, float("nan"))
    o, _, lse = sparse_fmha(q, k, v, sp, kv_block_indexes=sel, out=out, return_lse=True, validate=True)
    assert o is out
    _close(o, lse, o_ref, lse_ref, v)


@pytest.mark.parametrize("schedule,route_max", [("q_outer", None), ("auto", 5)])
@pytest.mark.parametrize("q_lens,kv_lens,hq,hkv,topk,causal,correlated", CASES)
def test_pair_plans_equal_core(monkeypatch, schedule, route_max, q_lens, kv_lens, hq, hkv, topk, causal, correlated):
    """MSA_QOUTER_PAIR=1 at plan time (the SM90 kernel's 2-CTA clusters): the same items and results; on CPU the
    reference runs them."""
    monkeypatch.setenv(br.QOUTER_PAIR_ENV, "1")
    q, k, v, sel = _problem(sum(q_lens) + topk, q_lens, kv_lens, hq, hkv, topk, causal=causal, correlated=correlated)
    dp = fmha_plan(q_lens, kv_lens, hq, hkv, causal=causal, kv_block_num=topk)
    o_ref, _, lse_ref = fmha(q, k, v, dp, kv_block_indexes=sel, return_lse=True, validate=True)
    sp = sparse_fmha_plan(q_lens, kv_lens, hq, hkv, causal=causal, kv_block_num=topk, schedule=schedule,
                          route_max=route_max)
    assert sp.qouter.pair and sp.qouter.items.T == 128 // (hq // hkv)
    assert not sparse_fmha_plan(q_lens, kv_lens, hq, hkv, causal=causal, kv_block_num=topk, pair=False).qouter.pair
    o, _, lse = sparse_fmha(q, k, v, sp, kv_block_indexes=sel, return_lse=True, validate=True)
    _close(o, lse, o_ref, lse_ref, v)


def test_pair_env_is_checked(monkeypatch):
    monkeypatch.setenv(br.QOUTER_PAIR_ENV, "yes")
    with pytest.raises(ValueError, match="MSA_QOUTER_PAIR"):
        sparse_fmha_plan([4], [200], 2, 1, kv_block_num=2, schedule="q_outer")


def _paged_cache(k, v, kv_lens, seed):
    """Shuffled page-128 cache [pages, Hkv, 128, D] of ragged K/V + the flat kv_indices (request-major)."""
    gen = torch.Generator().manual_seed(seed)
    n_pages = [-(-n // 128) for n in kv_lens]
    perm = torch.randperm(sum(n_pages), generator=gen)
    kp = torch.full((sum(n_pages), k.shape[1], 128, k.shape[2]), float("nan"), dtype=k.dtype)
    vp = torch.full_like(kp, float("nan"))
    slot = tok = 0
    for n, pages in zip(kv_lens, n_pages):
        for j in range(pages):
            rows = min(128, n - 128 * j)
            kp[perm[slot], :, :rows] = k[tok + 128 * j : tok + 128 * j + rows].transpose(0, 1)
            vp[perm[slot], :, :rows] = v[tok + 128 * j : tok + 128 * j + rows].transpose(0, 1)
            slot += 1
        tok += n
    return kp, vp, perm.to(torch.int32)


@pytest.mark.parametrize("schedule,route_max", [("q_outer", None), ("auto", None), ("auto", 5)])
def test_paged_schedules_equal_core(schedule, route_max):
    q_lens, kv_lens, hq, hkv, topk = [1, 70, 45], [1, 900, 400], 8, 2, 3
    q, k, v, sel = _problem(17, q_lens, kv_lens, hq, hkv, topk, correlated=True)
    dp = fmha_plan(q_lens, kv_lens, hq, hkv, kv_block_num=topk)
    o_ref, _, lse_ref = fmha(q, k, v, dp, kv_block_indexes=sel, return_lse=True, validate=True)
    kp, vp, kv_indices = _paged_cache(k, v, kv_lens, 3)
    sp = sparse_fmha_plan(q_lens, kv_lens, hq, hkv, page_size=128, kv_block_num=topk, schedule=schedule,
                          route_max=route_max)
    assert sp.schedule == schedule and sp.qouter is not None  # paged plans run Q-outer under "auto" too
    o, _, lse = sparse_fmha(q, kp, vp, sp, kv_block_indexes=sel, kv_indices=kv_indices, return_lse=True,
                            validate=True)
    _close(o, lse, o_ref, lse_ref, v)


def test_auto_routes_by_union_size_and_masks_the_kv_outer_selections(monkeypatch):
    q_lens, kv_lens, hq, hkv, topk = [64, 96], [600, 5000], 8, 2, 3  # request 0: <= 5 blocks, request 1: 40 blocks
    q, k, v, sel = _problem(9, q_lens, kv_lens, hq, hkv, topk)
    sp = sparse_fmha_plan(q_lens, kv_lens, hq, hkv, kv_block_num=topk)  # default: auto, route_max 2 * topk
    assert sp.schedule == "auto" and sp.qouter.route_max == br.ROUTE_FACTOR * topk
    un = br.qouter_unions_for(sp, sel)
    it = sp.qouter.items
    assert sp.qouter.umax == min(it.T * topk, it.max_blocks, 2 * topk)
    routed = (un.union_len >= 0).view(it.num_tiles, hkv)[it.token_tile.long()]
    assert bool(routed.any()) and bool((~routed).any()), "the case must mix both paths"
    seen = {}
    real_kv, real_ref = br._kv_outer, br.qouter_reference

    def spy_kv(q_, k_, v_, sel_kv, *a, **kw):
        seen["sel_kv"] = sel_kv.clone()
        return real_kv(q_, k_, v_, sel_kv, *a, **kw)

    def spy_q(*a, **kw):
        seen["union_len"] = a[4].clone()
        return real_ref(*a, **kw)

    monkeypatch.setattr(br, "_kv_outer", spy_kv)
    monkeypatch.setattr(br, "qouter_reference", spy_q)
    o, _, lse = sparse_fmha(q, k, v, sp, kv_block_indexes=sel, return_lse=True)
    r3 = routed.unsqueeze(-1).expand_as(sel)
    assert (seen["sel_kv"][r3] == -1).all() and torch.equal(seen["sel_kv"][~r3], sel[~r3])
    assert torch.equal(seen["union_len"], un.union_len)
    dp = fmha_plan(q_lens, kv_lens, hq, hkv, kv_block_num=topk)
    o_ref, _, lse_ref = fmha(q, k, v, dp, kv_block_indexes=sel, return_lse=True)
    _close(o, lse, o_ref, lse_ref, v)


def test_q_outer_makes_no_kv_outer_call(monkeypatch):
    q, k, v, sel = _problem(2, [50], [700], 4, 2, 2)
    sp = sparse_fmha_plan([50], [700], 4, 2, kv_block_num=2, schedule="q_outer")
    assert sp.qouter.route_max is None and sp.qouter.umax == min(sp.qouter.items.T * 2, 6)
    monkeypatch.setattr(br, "_kv_outer", lambda *a, **kw: pytest.fail("q_outer must not run the KV-outer path"))
    o, _ = sparse_fmha(q, k, v, sp, kv_block_indexes=sel)
    dp = fmha_plan([50], [700], 4, 2, kv_block_num=2)
    o_ref, _ = fmha(q, k, v, dp, kv_block_indexes=sel)
    assert (o.float() - o_ref.float()).abs().max() <= 2**-8 * v.float().abs().max()


@pytest.mark.parametrize("schedule", ["q_outer", "auto"])
def test_schedules_with_scales_and_hq_shaped_selections(schedule):
    q_lens, kv_lens, hq, hkv, topk = [40], [300], 4, 2, 2
    q, k, v, sel = _problem(4, q_lens, kv_lens, hq, hkv, topk, d=16)
    scales = dict(sm_scale=0.2, q_scale=torch.tensor([1.0, 0.5, 2.0, 1.5]), k_scale=0.7,
                  v_scale=torch.tensor([2.0, 0.25]), o_scale=0.5)
    dp = fmha_plan(q_lens, kv_lens, hq, hkv, kv_block_num=topk)
    o_ref, _ = fmha(q, k, v, dp, kv_block_indexes=sel, **scales)
    sp = sparse_fmha_plan(q_lens, kv_lens, hq, hkv, kv_block_num=topk, schedule=schedule)
    sel_q = sel.repeat_interleave(hq // hkv, dim=1).clone()
    sel_q[:, 1::2] = -1  # only the first head of each GQA group is read
    o, _ = sparse_fmha(q, k, v, sp, kv_block_indexes=sel_q, **scales)
    assert (o.float() - o_ref.float()).abs().max() <= 2**-6 * o_ref.float().abs().max()


def test_schedule_resolution_and_errors():
    kw = dict(kv_block_num=2)
    with pytest.raises(ValueError, match="schedule: expected one of"):
        sparse_fmha_plan([4], [200], 2, 1, schedule="dense", **kw)
    with pytest.raises(ValueError, match="route_max: only meaningful with schedule='auto'"):
        sparse_fmha_plan([4], [200], 2, 1, schedule="q_outer", route_max=3, **kw)
    with pytest.raises(ValueError, match="route_max"):
        sparse_fmha_plan([4], [200], 2, 1, route_max=-1, **kw)
    with pytest.raises(ValueError, match=r"'q_outer' cannot serve this plan: qo_offset\[0\]"):
        sparse_fmha_plan([4], [200], 2, 1, qo_offset=[100], schedule="q_outer", **kw)
    with pytest.raises(ValueError, match="'q_outer' cannot serve this plan: Hq/Hkv = 3"):
        sparse_fmha_plan([4], [200], 6, 2, schedule="q_outer", **kw)
    p = sparse_fmha_plan([4], [200], 2, 1, page_size=128, **kw)  # paged (page 128): auto keeps the Q-outer part
    assert p.schedule == "auto" and p.qouter is not None and p.schedule_note == ""
    assert sparse_fmha_plan([4], [200], 2, 1, page_size=128, schedule="q_outer", **kw).schedule == "q_outer"
    p = sparse_fmha_plan([4], [200], 2, 1, qo_offset=[100], **kw)
    assert p.schedule == "kv_outer" and "qo_offset" in p.schedule_note
    p = sparse_fmha_plan([4], [200], 2, 1, causal=False, schedule="q_outer", **kw)
    assert p.schedule == "q_outer"


def test_fp8_routing_q_outer_for_fp8_qkv_kv_outer_for_mixed(monkeypatch):
    """fp8 Q = K = V takes the Q-outer part (its kernel exists); a bf16 Q over an fp8 KV cache (what per-head q scales
    fold into) goes KV-outer under auto and is refused under q_outer. Both against the fp32 oracle of the selection."""
    q, k, v, sel = _problem(6, [20], [300], 2, 1, 2, d=16)
    q8, k8, v8 = (x.to(torch.float8_e4m3fn) for x in (q, k, v))
    qouter = []
    real_q = br._with_qouter
    monkeypatch.setattr(br, "_with_qouter", lambda *a, **kw: qouter.append(1) or real_q(*a, **kw))
    want, _ = sparse_fmha(q8.float().to(torch.bfloat16), k8.float().to(torch.bfloat16),
                          v8.float().to(torch.bfloat16), sparse_fmha_plan([20], [300], 2, 1, kv_block_num=2,
                                                                          schedule="kv_outer"), kv_block_indexes=sel)
    assert not qouter
    for schedule in ("auto", "q_outer"):
        sp = sparse_fmha_plan([20], [300], 2, 1, kv_block_num=2, schedule=schedule)
        o, _ = sparse_fmha(q8, k8, v8, sp, kv_block_indexes=sel)
        assert qouter and o.dtype == torch.bfloat16, schedule
        assert ((o.float() - want.float()).norm() / want.float().norm()).item() < 2e-2, schedule
        qouter.clear()
    qb = q8.float().to(torch.bfloat16)
    o, _ = sparse_fmha(qb, k8, v8, sparse_fmha_plan([20], [300], 2, 1, kv_block_num=2), kv_block_indexes=sel)
    assert not qouter and o.dtype == torch.bfloat16
    assert ((o.float() - want.float()).norm() / want.float().norm()).item() < 2e-2
    sp = sparse_fmha_plan([20], [300], 2, 1, kv_block_num=2, schedule="q_outer")
    with pytest.raises(ValueError, match="'q_outer' needs bf16 / fp16 / fp8 Q = K = V"):
        sparse_fmha(qb, k8, v8, sp, kv_block_indexes=sel)


def _stub_qouter_kernel(monkeypatch) -> list:
    """Install a stand-in for msa-core's Q-outer kernel module on the bridge: msa-core's real ``plan`` (its item
    enumeration must be msa.cute's) and a ``run`` that checks its arguments as the kernel's contract states, then
    computes with the oracle. Returns the list each run appends its routed item count to."""
    import types

    from msa.cute.qouter import qouter_reference

    qo = pytest.importorskip(br.QOUTER_KERNEL_MODULE)
    runs = []

    def run(kp, q, k, v, union, union_len, mask, order, *, out=None, lse=None, sm_scale=None):
        n = kp.num_items
        for name, t, shape in (("union", union, (n, union.shape[1])), ("union_len", union_len, (n,)),
                               ("mask", mask, (n, union.shape[1], kp.mask_words)), ("order", order, (n,))):
            assert t.dtype == torch.int32 and tuple(t.shape) == shape and t.is_contiguous(), name
        assert out.shape == q.shape and out.dtype == q.dtype and lse.shape == q.shape[:2]
        runs.append(int((union_len >= 0).sum()))
        cu_q = torch.tensor([0, *torch.tensor(kp.qo_lens).cumsum(0).tolist()], dtype=torch.int32)
        cu_k = torch.tensor([0, *torch.tensor(kp.kv_lens).cumsum(0).tolist()], dtype=torch.int32)
        qouter_reference(q, k, v, union, union_len, mask, item_token0=kp.item_token0, item_ntok=kp.item_ntok,
                         item_kv_head=kp.item_kv_head, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, causal=kp.causal,
                         T=kp.T, sm_scale=sm_scale, out=out, lse=lse)
        return out, lse

    stub = types.SimpleNamespace(plan=lambda *a, **kw: qo.plan(*a, **{**kw, "device": "cpu"}), run=run)
    monkeypatch.setattr(br, "_qouter_module", lambda: (stub, ""))
    monkeypatch.setattr(br, "_qouter_path", lambda plan, *a: "kernel" if plan.qouter is not None else None)
    # as on a GPU host whose KV-outer kernel takes these tensors (CPU tensors have none: the bridge would route all)
    monkeypatch.setattr(br, "_kv_outer_kernel_serves", lambda *a: True)
    return runs


@pytest.mark.parametrize("kv_kernel", [True, False])
def test_auto_routes_every_item_q_outer_without_a_kv_outer_kernel(monkeypatch, kv_kernel):
    """"auto" with route_max=0 (no item would be routed): KV-outer alone while its kernel takes the tensors; every item
    Q-outer (one pass, the "q_outer" union capacity) when it does not (fp8 Q = K = V today) -- never the PyTorch
    reference for the bulk of the work. Same output either way."""
    runs, kv_calls = _stub_qouter_kernel(monkeypatch), []
    monkeypatch.setattr(br, "_kv_outer_kernel_serves", lambda *a: kv_kernel)
    real_kv_outer = br._kv_outer
    monkeypatch.setattr(br, "_kv_outer", lambda *a, **kw: kv_calls.append(1) or real_kv_outer(*a, **kw))
    monkeypatch.setattr(br, "AUTO_SKIP_SYNC", True)
    q_lens, kv_lens, hq, hkv, topk = [1, 70, 45], [1, 900, 400], 8, 2, 3
    q, k, v, sel = _problem(5, q_lens, kv_lens, hq, hkv, topk)
    sp = sparse_fmha_plan(q_lens, kv_lens, hq, hkv, kv_block_num=topk, schedule="auto", route_max=0)
    o, _, lse = sparse_fmha(q, k, v, sp, kv_block_indexes=sel, return_lse=True)
    if kv_kernel:
        assert kv_calls and runs in ([], [0])
    else:
        assert not kv_calls and runs == [sp.qouter.items.num_items]
    dp = fmha_plan(q_lens, kv_lens, hq, hkv, kv_block_num=topk)
    o_ref, _, lse_ref = fmha(q, k, v, dp, kv_block_indexes=sel, return_lse=True)
    _close(o, lse, o_ref, lse_ref, v)


def test_kernel_for_is_a_quiet_query():
    """msa.core.dispatch.kernel_for: None on CPU tensors or when no kernel supports the call, no warning either way."""
    import warnings

    from msa.core.dispatch import kernel_for

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert kernel_for(br.KV_OUTER_OP, torch.device("cpu"), q_dtype=torch.bfloat16) is None
        assert kernel_for("no such op", torch.device("cpu")) is None


@pytest.mark.parametrize("schedule", ["q_outer", "auto"])
def test_kernel_branch_wiring_with_a_stub_kernel(monkeypatch, schedule):
    """The bridge's kernel branch on CPU: msa-core's real ``plan`` (its item enumeration must be msa.cute's) and a
    stub ``run`` that checks the arguments as the kernel's contract states, then computes with the oracle."""
    runs = _stub_qouter_kernel(monkeypatch)
    q_lens, kv_lens, hq, hkv, topk = [1, 70, 45], [1, 900, 400], 8, 2, 3
    q, k, v, sel = _problem(3, q_lens, kv_lens, hq, hkv, topk, correlated=True)
    sp = sparse_fmha_plan(q_lens, kv_lens, hq, hkv, kv_block_num=topk, schedule=schedule)
    o, _, lse = sparse_fmha(q, k, v, sp, kv_block_indexes=sel, return_lse=True)
    assert len(runs) == 1 and runs[0] > 0 and sp.qouter.kernel_plan is not None
    for name in ("item_token0", "item_ntok", "item_kv_head"):  # one item enumeration for the builder and the kernel
        assert torch.equal(getattr(sp.qouter.kernel_plan, name), getattr(sp.qouter.items, name)), name
    dp = fmha_plan(q_lens, kv_lens, hq, hkv, kv_block_num=topk)
    o_ref, _, lse_ref = fmha(q, k, v, dp, kv_block_indexes=sel, return_lse=True)
    _close(o, lse, o_ref, lse_ref, v)


@pytest.mark.parametrize("route_max", [None, 0, 2, 3])  # all / none / 3 of 12 / 7 of 12 items routed
def test_eager_auto_branches_with_a_stub_kernel(monkeypatch, route_max):
    """Eager "auto" launches the Q-outer pass before it reads the routed item count (while the last call routed every
    item), then: every item routed -> done (one pass); fewer than AUTO_MIN_ROUTED -> KV-outer alone (it overwrites
    every row); else the hybrid (KV-outer, then the Q-outer pass again). After a call that did not route every item
    the next reads the count first (no wasted pass). Whatever the branch, the output equals msa.core.fmha's."""
    runs, kv_calls = _stub_qouter_kernel(monkeypatch), []
    real_kv_outer = br._kv_outer
    monkeypatch.setattr(br, "_kv_outer", lambda *a, **kw: kv_calls.append(1) or real_kv_outer(*a, **kw))
    monkeypatch.setattr(br, "AUTO_SKIP_SYNC", True)
    monkeypatch.setitem(br._auto_state, "expect_all_routed", True)
    q_lens, kv_lens, hq, hkv, topk = [1, 70, 45], [1, 900, 400], 8, 2, 3
    q, k, v, sel = _problem(11, q_lens, kv_lens, hq, hkv, topk, correlated=True)
    sp = sparse_fmha_plan(q_lens, kv_lens, hq, hkv, kv_block_num=topk, schedule="auto", route_max=route_max)
    routed = int((br.qouter_unions_for(sp, sel).union_len >= 0).sum())
    items = sp.qouter.items.num_items
    dp = fmha_plan(q_lens, kv_lens, hq, hkv, kv_block_num=topk)
    o_ref, _, lse_ref = fmha(q, k, v, dp, kv_block_indexes=sel, return_lse=True)
    # First call: optimistic (Q-outer launched before the count is read). Second call: read-first when the first did
    # not route every item.
    for call in (0, 1):
        runs.clear(), kv_calls.clear()
        o, _, lse = sparse_fmha(q, k, v, sp, kv_block_indexes=sel, return_lse=True)
        optimistic = call == 0 or routed == items
        if routed == items:
            assert (len(runs), len(kv_calls)) == (1, 0)
        elif routed < br.AUTO_MIN_ROUTED * items:
            assert (len(runs), len(kv_calls)) == ((1, 1) if optimistic else (0, 1))
        else:
            assert (len(runs), len(kv_calls)) == ((2, 1) if optimistic else (1, 1))
        assert br._auto_state["expect_all_routed"] == (routed == items)
        _close(o, lse, o_ref, lse_ref, v)


@pytest.mark.gpu
def test_routed_count_read_waits_for_the_current_stream_and_reuses_its_buffer():
    """The eager "auto" count read copies ``union_len`` on a side stream that waits for the current stream: a count
    written by a kernel queued behind a long one is read correctly, and back-to-back reads of different sizes (one
    reused pinned buffer, grown when needed) give their own counts."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device on this host (GPU tests run on the GPU box: scripts/gpu_env.sh)")
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(3)
    for n in (5, 3000, 70000, 17):
        vals = torch.randint(-1, 40, (n,), device=dev, dtype=torch.int32, generator=g)
        want = int((vals >= 0).sum())
        union_len = torch.full((n,), -1, dtype=torch.int32, device=dev)
        torch.cuda._sleep(20_000_000)  # ~10 ms of GPU time ahead of the write
        union_len.copy_(vals)
        assert br._routed_count_later(union_len)() == want, n
    cpu = torch.tensor([3, -1, 0, -1, 7], dtype=torch.int32)
    assert br._routed_count_later(cpu)() == 3
