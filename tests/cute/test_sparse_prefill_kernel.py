"""SM90 KV-outer sparse prefill kernel (msa.cute.kernels.sparse_prefill_sm90).

CPU part (runs here): the host tables (slot ranks, per-token slot counts), the schedule and the kernel's exact
decomposition, emulated in fp64 item by item (gather -> masked block softmax -> per-slot partial with workspaces
poisoned with NaN -> LSE combine), must equal the sparse_atten_func reference; availability / feature gating;
the warmup specs. Compile part (marker ``compile``): the kernels build for sm_90a through msa-cache, their
exported signatures match exactly what ``run`` passes, and sm_100a is refused with a clear error.

GPU part (marker ``gpu``; on an H100/H200 with a bundle holding the smoke +
minimax-m3 variants): kernel vs the CPU reference over top-k x GQA x paged x causal x partial dtype with NaN-poisoned
outputs and workspaces, no host sync. Bounds: bf16 O within 2^-7 x max|V| (P is rounded to bf16 before P @ V and O
once more to bf16; with bf16 partials each slot is rounded too: 2^-6), LSE within 2e-3 absolute (fp32, exp2 fast
math); rows with nothing visible are exactly 0 / -inf.
"""

from __future__ import annotations

import importlib.util
import math
import os
import re

import pytest
import torch
from msa.cute import build_k2q_csr, sparse_atten_func
from msa.cute.kernels import sparse_prefill_sm90 as sp

BLOCK = 128
# Compiling needs cutlass-dsl; GPU nodes have none (they load bundles), so the compile tests skip there.
needs_dsl = pytest.mark.skipif(importlib.util.find_spec("cutlass") is None,
                               reason="nvidia-cutlass-dsl is not installed (compile tests run on build hosts)")


# ---- problem builders ---------------------------------------------------------------------------------------------
def _problem(helpers, seed, q_lens, kv_lens, hq, hkv, d, topk, causal, dtype=torch.bfloat16, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(sum(q_lens), hq, d, generator=gen).to(dtype)
    k = torch.randn(sum(kv_lens), hkv, d, generator=gen).to(dtype)
    v = torch.randn(sum(kv_lens), hkv, d, generator=gen).to(dtype)
    q2k = helpers.random_selection(gen, q_lens, kv_lens, hkv, topk, BLOCK, mode="causal" if causal else "random")
    cq, ck = helpers.cu(q_lens), helpers.cu(kv_lens)
    dev = torch.device(device)
    return [x.to(dev) for x in (q, k, v, q2k, cq, ck)]


def _paged(k, v, kv_lens, seed, fill=float("nan"), spare=3):
    """Scatter ragged K/V into shuffled pages; unowned pages and page tails hold ``fill`` (NaN: what an
    uninitialised cache may hold; the kernel must not let it leak into any row)."""
    gen = torch.Generator().manual_seed(seed)
    hkv, d = k.shape[1], k.shape[2]
    n_req = [-(-n // BLOCK) for n in kv_lens]
    n_pages = sum(n_req) + spare
    perm = torch.randperm(n_pages, generator=gen)
    kp = torch.full((n_pages, hkv, BLOCK, d), fill, dtype=k.dtype)
    vp = torch.full((n_pages, hkv, BLOCK, d), fill, dtype=v.dtype)
    table = torch.zeros(len(kv_lens), max(n_req + [1]) + 1, dtype=torch.int32)
    start, used = 0, 0
    for b, n in enumerate(kv_lens):
        for j in range(n_req[b]):
            page = int(perm[used])
            used += 1
            table[b, j] = page
            rows = min(BLOCK, n - j * BLOCK)
            kp[page, :, :rows] = k[start + j * BLOCK:start + j * BLOCK + rows].transpose(0, 1)
            vp[page, :, :rows] = v[start + j * BLOCK:start + j * BLOCK + rows].transpose(0, 1)
        start += n
    return kp, vp, table


# ---- fp64 emulation of the kernel's decomposition ----------------------------------------------------------------
def emulate(q, k, v, row_ptr, q_indices, topk, cu_q, cu_k, *, causal, scale, page_table=None, seqused_k=None,
            schedule=None, partial_dtype=torch.float32, stages=False):
    """What partial + combine compute, item by item, with the module's own schedule and slot tables.

    ``stages=True`` also returns the per-slot partials (NaN where never written) to check each kernel alone."""
    total_q, hq, d = q.shape
    hkv = k.shape[1]
    group = hq // hkv
    sched = sp._schedule(schedule, row_ptr, cu_k, q_indices.shape[1], group)
    q_slot, n_slots = sp.schedule_slot_tables(sched, row_ptr, q_indices, cu_q, cu_k, total_q)
    kv_len = seqused_k if seqused_k is not None else cu_k[1:] - cu_k[:-1]
    o_part = torch.full((topk, total_q, hq, d), float("nan"), dtype=torch.float64)  # poisoned: never initialised
    lse_part = torch.full((topk, total_q, hq), float("nan"), dtype=torch.float64)
    mask = (1 << sp.Q_SLOT_BITS) - 1
    for item in range(int(sched.work_count)):
        h, _row, b, blk, q_start, q_count = (int(x) for x in sched.work[item])
        assert 1 <= q_count <= sp.TILE_M // group
        key0 = blk * BLOCK
        if page_table is None:  # TMA box: rows past total_k read as zeros
            rows = torch.arange(BLOCK) + int(cu_k[b]) + key0
            kb = torch.zeros(BLOCK, d, dtype=torch.float64)
            vb = torch.zeros(BLOCK, d, dtype=torch.float64)
            ok = rows < k.shape[0]
            kb[ok] = k[rows[ok], h].double()
            vb[ok] = v[rows[ok], h].double()
        else:
            page = int(page_table[b, blk])
            kb, vb = k[page, h].double(), v[page, h].double()
        n_keys = int(kv_len[b]) - key0
        vb[max(n_keys, 0):] = 0.0  # the kernel zeroes V rows past the request's keys
        entries = q_slot[h, q_start:q_start + q_count].to(torch.int64)
        q_local, slot = entries & mask, entries >> sp.Q_SLOT_BITS
        tok = int(cu_q[b]) + q_local
        q_len = int(cu_q[b + 1] - cu_q[b])
        qr = q[tok, h * group:(h + 1) * group].double()  # [n, G, d]
        s = torch.einsum("ngd,kd->ngk", qr, kb)
        limit = torch.full((q_count,), n_keys, dtype=torch.int64)
        if causal:
            limit = torch.minimum(limit, q_local + int(kv_len[b]) - q_len - key0 + 1)
        cols = torch.arange(BLOCK)
        s = torch.where(cols.view(1, 1, -1) >= limit.view(-1, 1, 1), torch.full_like(s, -math.inf), s)
        m = s.amax(-1, keepdim=True)
        m_safe = torch.where(torch.isinf(m), torch.zeros_like(m), m)
        p = torch.exp((s - m_safe) * scale)
        total = p.sum(-1, keepdim=True)
        o = torch.where(total > 0, (p @ vb) / total.clamp(min=1e-300), torch.zeros(1, dtype=torch.float64))
        lse = torch.where(total.squeeze(-1) > 0, m_safe.squeeze(-1) * scale + torch.log(total.squeeze(-1)),
                          torch.full_like(total.squeeze(-1), -math.inf))
        for n in range(q_count):
            if slot[n] < topk:
                heads = slice(h * group, (h + 1) * group)
                o_part[slot[n], tok[n], heads] = o[n].to(partial_dtype).double()
                lse_part[slot[n], tok[n], heads] = lse[n]
    n = n_slots.to(torch.int64).repeat_interleave(group, dim=1)  # [T, Hq]
    use = torch.arange(topk).view(-1, 1, 1) < n.clamp(max=topk).unsqueeze(0)  # slots the combine reads
    assert not torch.isnan(lse_part[use]).any(), "combine would read a slot the partial kernel never wrote"
    ls = torch.where(use, lse_part, torch.full_like(lse_part, -math.inf))
    mx = ls.amax(0)
    live = torch.isfinite(mx)
    w = torch.where(use & live.unsqueeze(0), torch.exp(ls - torch.where(live, mx, 0.0).unsqueeze(0)), 0.0)
    total = w.sum(0)
    acc = (w.unsqueeze(-1) * torch.where(use.unsqueeze(-1), o_part, 0.0)).sum(0)
    out = torch.where(live.unsqueeze(-1), acc / total.clamp(min=1e-300).unsqueeze(-1), 0.0)
    out_lse = torch.where(live, mx + torch.log(total.clamp(min=1e-300)), -math.inf)
    over = n > topk  # a token past its top-k: NaN, never a truncated sum
    out[over] = float("nan")
    out_lse[over] = float("nan")
    if stages:
        return out, out_lse, o_part, lse_part
    return out, out_lse


def _reference(q, k, v, rp, qi, topk, cq, ck, q_lens, kv_lens, causal, scale, **kw):
    return sparse_atten_func(q, k, v, rp, qi, topk, cu_seqlens_q=cq, cu_seqlens_k=ck, max_seqlen_q=max(q_lens),
                             max_seqlen_k=max(kv_lens), causal=causal, softmax_scale=scale, return_softmax_lse=True,
                             backend="reference", **kw)


def _where(mask: torch.Tensor, limit: int = 5) -> str:
    """First few [token, head] positions of a mask and how many there are (failure diagnostics)."""
    idx = mask.nonzero()
    return f"{idx.shape[0]} rows, first {idx[:limit].tolist()}"


def _assert_close(o, lse, o_ref, lse_ref, v, o_tol, lse_tol=1e-4):
    o, lse, o_ref, lse_ref = (x.double().cpu() for x in (o, lse, o_ref, lse_ref))
    nan_diff = torch.isnan(lse) != torch.isnan(lse_ref)
    assert not nan_diff.any(), f"NaN LSE rows (top-k overflow) differ: {_where(nan_diff)}"
    inf_diff = torch.isinf(lse) != torch.isinf(lse_ref)
    assert not inf_diff.any(), f"rows with nothing visible (-inf LSE) differ: {_where(inf_diff)}"
    fin = torch.isfinite(lse_ref)
    if fin.any():
        lse_err = torch.where(fin, (lse - lse_ref).abs(), torch.zeros_like(lse))
        worst = divmod(int(lse_err.argmax()), lse.shape[1])
        assert lse_err.max() <= lse_tol, (f"max |LSE - LSE_ref| = {lse_err.max():.3g} > {lse_tol:.3g} at [token, "
                                          f"head] {list(worst)} ({lse[worst]:.6g} vs {lse_ref[worst]:.6g}); "
                                          f"{_where(lse_err > lse_tol)} over")
        vmax = v.float().abs().nan_to_num(0).max().item()
        row_err = torch.where(fin.unsqueeze(-1), (o - o_ref).abs(), torch.zeros_like(o)).nan_to_num(math.inf).amax(-1)
        err = row_err.max().item()
        worst = divmod(int(row_err.argmax()), o.shape[1])
        assert err <= o_tol * vmax, (f"max |O - O_ref| = {err:.3g} > {o_tol:.3g} * {vmax:.3g} at [token, head] "
                                     f"{list(worst)}; {_where(row_err > o_tol * vmax)} over (NaN counts as inf)")
    empty = torch.isinf(lse_ref)
    bad = empty & (o != 0).any(-1)
    assert not bad.any(), f"rows with nothing visible must be exactly 0: {_where(bad)}"
    nan_rows = torch.isnan(lse_ref)
    bad = nan_rows & ~torch.isnan(o).all(-1)
    assert not bad.any(), f"top-k overflow rows must be all NaN: {_where(bad)}"


# ---- CPU: host tables and the emulated decomposition -------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 1])
def test_slot_tables_rank_blocks_in_token_order(helpers, seed):
    q_lens, kv_lens, hkv, topk = [40, 0, 75], [700, 128, 1000], 3, 5
    gen = torch.Generator().manual_seed(seed)
    q2k = helpers.random_selection(gen, q_lens, kv_lens, hkv, topk, BLOCK)
    cq, ck = helpers.cu(q_lens), helpers.cu(kv_lens)
    rp, qi = build_k2q_csr(q2k, cq, ck, BLOCK, total_k=sum(kv_lens))
    q_slot, n_slots = sp.slot_tables(rp, qi, cq, ck, sum(q_lens))
    assert q_slot.dtype == torch.int32 and n_slots.shape == (sum(q_lens), hkv)
    assert torch.equal(n_slots.t(), (q2k >= 0).sum(-1).to(torch.int32))
    cu_rows = [0]
    for n in kv_lens:
        cu_rows.append(cu_rows[-1] + -(-n // BLOCK))
    mask = (1 << sp.Q_SLOT_BITS) - 1
    seen = torch.zeros_like(q2k, dtype=torch.bool)
    for h in range(hkv):
        for r in range(cu_rows[-1]):
            b = max(i for i in range(len(q_lens)) if cu_rows[i] <= r)
            for e in range(int(rp[h, r]), int(rp[h, r + 1])):
                ent = int(q_slot[h, e])
                t = int(cq[b]) + (ent & mask)
                slot = ent >> sp.Q_SLOT_BITS
                assert int(q2k[h, t, slot]) == r - cu_rows[b], "slot must be the block's position in the token list"
                assert not seen[h, t, slot]
                seen[h, t, slot] = True
        assert int(q_slot[h, int(rp[h, -1]):].abs().sum()) == 0
    assert torch.equal(seen, q2k >= 0)


@pytest.mark.parametrize("seed", [0, 3])
def test_csr_build_slot_tables_equal_slot_tables(helpers, seed):
    """build_k2q_csr(return_schedule=True) derives q_slot / n_slots from its sort's permutation; they must equal
    the second-sort derivation (slot_tables) that run() falls back to for a schedule without them."""
    q_lens, kv_lens, hkv, topk = [40, 0, 75, 130], [700, 128, 1000, 260], 3, 6
    gen = torch.Generator().manual_seed(seed)
    q2k = helpers.random_selection(gen, q_lens, kv_lens, hkv, topk, BLOCK)
    q2k[0, 3, 2:] = -1  # short lists too
    cq, ck = helpers.cu(q_lens), helpers.cu(kv_lens)
    rp, qi, sched = build_k2q_csr(q2k, cq, ck, BLOCK, total_k=sum(kv_lens), qhead_per_kv=4, return_schedule=True)
    q_slot, n_slots = sp.slot_tables(rp, qi, cq, ck, sum(q_lens))
    assert sched.q_slot is not None and sched.n_slots is not None
    assert torch.equal(sched.q_slot, q_slot), (sched.q_slot != q_slot).nonzero()[:5].tolist()
    assert torch.equal(sched.n_slots, n_slots)
    got = sp.schedule_slot_tables(sched, rp, qi, cq, ck, sum(q_lens))
    assert got[0] is sched.q_slot and got[1] is sched.n_slots
    bare = type(sched)(sched.work, sched.work_count, sched.q_tile)
    assert torch.equal(sp.schedule_slot_tables(bare, rp, qi, cq, ck, sum(q_lens))[0], q_slot)


@pytest.mark.parametrize("topk,group,paged,causal", [
    (1, 1, False, True), (4, 4, False, False), (4, 4, True, True), (16, 16, False, True), (16, 16, True, False),
    (8, 2, True, True),
])
def test_emulated_kernel_matches_reference(helpers, topk, group, paged, causal):
    hkv = 2
    hq = hkv * group
    q_lens, kv_lens = [37, 0, 150, 9], [300, 64, 1100, 900]  # chunked prefill (q < kv), partial blocks, empty
    q, k, v, q2k, cq, ck = _problem(helpers, topk * 10 + group, q_lens, kv_lens, hq, hkv, 16, topk, causal)
    rp, qi = build_k2q_csr(q2k, cq, ck, BLOCK, total_k=k.shape[0])
    extra, ke, ve, kc, vc = {}, k, v, k, v
    if paged:
        ke, ve, table = _paged(k, v, kv_lens, 3)  # NaN page tails for the kernel ...
        kc, vc, _ = _paged(k, v, kv_lens, 3, fill=0.0)  # ... zero tails for the reference (it multiplies 0 * V)
        extra["page_table"] = table
    o, lse = emulate(q, ke, ve, rp, qi, topk, cq, ck, causal=causal, scale=0.2, **extra)
    o_ref, lse_ref = _reference(q, kc, vc, rp, qi, topk, cq, ck, q_lens, kv_lens, causal, 0.2, **extra)
    _assert_close(o, lse, o_ref, lse_ref, v, o_tol=2**-8)


def test_emulated_kernel_seqused_and_own_schedule(helpers):
    q_lens, kv_lens, hkv, group, topk = [20, 50], [500, 700], 2, 4, 4
    q, k, v, q2k, cq, ck = _problem(helpers, 5, q_lens, kv_lens, hkv * group, hkv, 16, topk, True)
    kp, vp, table = _paged(k, v, kv_lens, 1, fill=1e4)  # finite garbage: the reference masks it exactly
    seqused = torch.tensor([430, 700], dtype=torch.int32)  # request 0 uses less than its pages hold
    vp[table[0, 3], :, 430 - 3 * BLOCK:] = float("nan")  # stale keys past seqused: must not leak (kernel side)
    vc = vp.clone()
    vc[table[0, 3], :, 430 - 3 * BLOCK:] = 0.0
    rp, qi, sched = build_k2q_csr(q2k, cq, ck, BLOCK, total_k=k.shape[0], qhead_per_kv=group, return_schedule=True)
    o, lse = emulate(q, kp, vp, rp, qi, topk, cq, ck, causal=True, scale=0.3, page_table=table, seqused_k=seqused,
                     schedule=sched)
    o_ref, lse_ref = _reference(q, kp, vc, rp, qi, topk, cq, ck, q_lens, kv_lens, True, 0.3, page_table=table,
                                seqused_k=seqused)
    _assert_close(o, lse, o_ref, lse_ref, v, o_tol=2**-8)
    bad = build_k2q_csr(q2k, cq, ck, BLOCK, total_k=k.shape[0], qhead_per_kv=1, return_schedule=True)[2]
    with pytest.raises(ValueError, match="schedule: built for q_tile 128 but Hq/Hkv = 4 needs q_tile 32"):
        emulate(q, kp, vp, rp, qi, topk, cq, ck, causal=True, scale=0.3, page_table=table, schedule=bad)


def test_emulated_kernel_poisons_topk_overflow(helpers):
    q_lens, kv_lens, hkv, group = [30], [900], 1, 2
    q, k, v, q2k, cq, ck = _problem(helpers, 9, q_lens, kv_lens, hkv * group, hkv, 16, 6, False)
    rp, qi = build_k2q_csr(q2k, cq, ck, BLOCK, total_k=k.shape[0])
    topk = 3  # the CSR was built for 6: tokens with more than 3 blocks break the contract
    o, lse = emulate(q, k, v, rp, qi, topk, cq, ck, causal=False, scale=0.25)
    o_ref, lse_ref = _reference(q, k, v, rp, qi, topk, cq, ck, q_lens, kv_lens, False, 0.25)
    over = (q2k[0] >= 0).sum(-1) > topk
    assert over.any() and (~over).any()
    assert torch.isnan(o[over]).all() and torch.isfinite(o[~over]).all()
    assert torch.isnan(o_ref[over].float()).all()
    fin = ~over
    assert (o[fin] - o_ref[fin].double()).abs().max() <= 2**-8 * v.float().abs().max()


# ---- CPU: gating and warmup specs ---------------------------------------------------------------------------------
def test_available_by_default_with_an_opt_out(monkeypatch):
    monkeypatch.delenv(sp.DISABLE_ENV, raising=False)
    ok, why = sp.available(torch.device("cpu"))
    assert not ok and "needs CUDA" in why  # on by default: only the device refuses here
    monkeypatch.setenv(sp.DISABLE_ENV, "0")
    ok, why = sp.available(torch.device("cpu"))
    assert not ok and why == f"disabled by {sp.DISABLE_ENV}=0"


def test_supports_matrix():
    base = dict(q_dtype=torch.bfloat16, kv_dtype=torch.bfloat16, head_dim=128, head_dim_v=128, topk=16,
                qhead_per_kv=16, paged=True, blk_kv=128, causal=True, partial_dtype=torch.bfloat16,
                temperature_lse=False)
    assert sp.supports(**base) == (True, "ok")
    assert sp.supports(**{**base, "partial_dtype": torch.float32})[0]
    for change, msg in [({"q_dtype": torch.float16}, "bf16"), ({"kv_dtype": torch.float8_e4m3fn}, "bf16"),
                        ({"head_dim": 64}, "head dim"), ({"blk_kv": 64}, "blk_kv"), ({"qhead_per_kv": 3}, "divide"),
                        ({"topk": 200}, "topk"), ({"partial_dtype": torch.float16}, "partial_dtype"),
                        ({"temperature_lse": True}, "temperature")]:
        ok, why = sp.supports(**{**base, **change})
        assert not ok and msg in why, (change, why)


def test_dispatch_reports_the_gate(monkeypatch):
    from msa.core.dispatch import registered_kernels

    monkeypatch.delenv(sp.DISABLE_ENV, raising=False)
    import msa.cute.sparse_prefill  # noqa: F401  (registers the kernel module)

    assert "sparse_prefill_sm90" in registered_kernels("sparse_atten_func")


def test_cute_specs_per_preset():
    from msa.cache import load_preset

    smoke = sp.cute_specs(load_preset("smoke"), "sm_90a")
    names = {s.name for s in smoke}
    assert len(smoke) == 10 and all(s.arch == "sm_90a" for s in smoke)  # 2 x 4 partials (serial, ws) + 2 combines
    assert "cute.sparse_prefill_partial_sm90.partial[sm_90a,paged=True,partial_dtype=bfloat16,qhead_per_kv=4]" in names
    assert ("cute.sparse_prefill_partial_sm90.partial[sm_90a,paged=True,partial_dtype=bfloat16,qhead_per_kv=4,"
            "variant=ws]") in names
    assert "cute.sparse_prefill_combine.combine[sm_90a,partial_dtype=float32]" in names
    m3 = {s.name for s in sp.cute_specs(load_preset("minimax-m3"), "sm_90a")}
    assert "cute.sparse_prefill_partial_sm90.partial[sm_90a,paged=False,partial_dtype=bfloat16,qhead_per_kv=16]" in m3
    assert sp.cute_specs(load_preset("smoke"), "sm_100a") == []
    assert sp.cute_specs({"dtypes": ["fp8"], "heads": [{"hq": 8, "hkv": 1}]}, "sm_90a") == []


def test_partial_variant_selection(monkeypatch):
    monkeypatch.delenv(sp.VARIANT_ENV, raising=False)
    assert sp.partial_variant() == sp.DEFAULT_VARIANT
    monkeypatch.setenv(sp.VARIANT_ENV, "ws")
    assert sp.partial_variant() == "ws" and sp.partial_variant("serial") == "serial"
    monkeypatch.setenv(sp.VARIANT_ENV, "fast")
    with pytest.raises(ValueError, match=r"MSA_CUTE_SPARSE_PREFILL_PARTIAL: expected one of \('serial', 'ws'\), "
                                         r"got 'fast'"):
        sp.partial_variant()
    with pytest.raises(ValueError, match="variant: expected one of"):
        sp.kernel_specs(4, False, "bfloat16", variant="pipelined")
    assert sp.partial_ctas(132, 10**6, "serial") == 264 and sp.partial_ctas(132, 10**6, "ws") == 132
    assert sp.partial_ctas(132, 7, "ws") == 7 and sp.partial_ctas(132, 0, "ws") == 1


# ---- compile: the real kernels, GPU-less ----------------------------------------------------------------------------
_SIG = re.compile(r"(\w+): (Tensor\(\[([^\]]*)\], (\w+)\)|\w+)")
_TORCH_NAME = {torch.bfloat16: "bfloat16", torch.float32: "float32", torch.int32: "int32"}


def _signature(fn) -> list[tuple[str, str, list[str] | None]]:
    with pytest.raises(TypeError) as info:
        fn()
    text = re.search(r"`__call__\((.*)\)`", str(info.value)).group(1)
    out = []
    for name, full, dims, dtype in _SIG.findall(text):
        out.append((name, dtype or full, [x.strip() for x in dims.split(",")] if dims else None))
    return out


def _check_call(sig, args):
    """Every argument run() passes has the dtype, rank and static extents the exported function declares, and
    dimensions sharing a symbol agree."""
    assert len(sig) == len(args), (len(sig), len(args))
    bound = {}
    for (name, dtype, dims), arg in zip(sig, args):
        if dims is None:
            assert isinstance(arg, (int, float)) and not isinstance(arg, bool), name
            assert (dtype == "float32") == isinstance(arg, float), (name, dtype, arg)
            continue
        assert isinstance(arg, torch.Tensor) and arg.is_contiguous(), name
        assert _TORCH_NAME[arg.dtype] == dtype, (name, arg.dtype, dtype)
        assert len(dims) == arg.dim(), (name, dims, list(arg.shape))
        for sym, size in zip(dims, arg.shape):
            if sym.isdigit():
                assert int(sym) == size, (name, dims, list(arg.shape))
            else:
                assert bound.setdefault(sym, size) == size, (name, sym, bound[sym], size)


@pytest.fixture()
def store(tmp_path, monkeypatch):
    monkeypatch.setenv("MSA_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("MSA_CACHE_PATH", raising=False)
    from msa.cache import get_store

    yield get_store(refresh=True)
    monkeypatch.undo()  # restore the environment BEFORE rebuilding the process-wide store (else it keeps tmp_path)
    get_store(refresh=True)


@pytest.mark.compile
@needs_dsl
@pytest.mark.parametrize("paged,partial_dtype,variant", [(False, torch.bfloat16, "serial"),
                                                         (True, torch.float32, "serial"),
                                                         (False, torch.bfloat16, "ws"), (True, torch.float32, "ws")])
def test_kernels_build_for_sm90_and_take_runs_arguments(helpers, store, monkeypatch, paged, partial_dtype, variant):
    from msa.cute.jit import cubin_archs

    q_lens, kv_lens, hkv, group, topk = [20, 50], [300, 260], 2, 4, 4
    q, k, v, q2k, cq, ck = _problem(helpers, 2, q_lens, kv_lens, hkv * group, hkv, 128, topk, True)
    rp, qi = build_k2q_csr(q2k, cq, ck, BLOCK, total_k=k.shape[0])
    table = None
    if paged:
        k, v, table = _paged(k, v, kv_lens, 0)
    part, comb = sp.kernel_specs(group, paged, sp.PARTIAL_DTYPES[partial_dtype], variant=variant)
    for spec in (part, comb):
        entry = spec.build(store)
        assert cubin_archs(entry.file("kernel.so")) == [90]
    calls = []
    monkeypatch.setenv(sp.VARIANT_ENV, variant)
    monkeypatch.setattr(sp, "_kernels", lambda *key: (calls.append(("key", key)) or (
        lambda *a: calls.append(("partial", a)), lambda *a: calls.append(("combine", a)))))
    monkeypatch.setattr(sp, "_num_sms", lambda index: 132)
    sp.run(q=q, k=k, v=v, k2q_row_ptr=rp, k2q_q_indices=qi, topk=topk, cu_seqlens_q=cq, cu_seqlens_k=ck,
           max_seqlen_q=50, max_seqlen_k=300, blk_kv=128, causal=True, softmax_scale=0.1, lse_temperature_scale=1.0,
           return_temperature_lse=False, partial_dtype=partial_dtype, return_softmax_lse=True, page_table=table,
           seqused_k=None, schedule=None)
    assert [c[0] for c in calls] == ["key", "partial", "combine"]
    assert calls[0][1] == (group, paged, sp.PARTIAL_DTYPES[partial_dtype], "sm_90a", variant)
    capacity = sp._schedule(None, rp, ck, qi.shape[1], group).capacity
    assert calls[1][1][-1] == sp.partial_ctas(132, capacity, variant)  # the variant's persistent grid
    _check_call(_signature(part.load()), calls[1][1])
    _check_call(_signature(comb.load()), calls[2][1])


@pytest.mark.compile
@needs_dsl
def test_partial_kernel_refuses_sm100(store):
    from msa.cute.jit import CuteBuildError

    part, comb = sp.kernel_specs(16, False, "bfloat16", arch="sm_100a")
    with pytest.raises(CuteBuildError, match="targets sm_90a only, not sm_100a"):
        part.build(store)


# ---- GPU ---------------------------------------------------------------------------------------------------------
def _gpu_ready():
    if os.environ.get(sp.DISABLE_ENV) == "0":
        pytest.skip(f"{sp.DISABLE_ENV}=0: the sparse prefill kernel is switched off")
    ok, why = sp.available(torch.device("cuda"))
    if not ok:
        pytest.skip(why)


@pytest.fixture()
def poisoned_workspaces(monkeypatch):
    """Every buffer run() allocates starts as NaN, so a read of anything the kernels did not write shows up."""
    real = torch.empty

    def nan_empty(*shape, dtype=None, device=None, **kw):
        t = real(*shape, dtype=dtype, device=device, **kw)
        if t.is_floating_point():
            t.fill_(float("nan"))
        return t

    monkeypatch.setattr(sp, "_empty", nan_empty)


@pytest.mark.gpu
@pytest.mark.parametrize("variant", sp.VARIANTS)
@pytest.mark.parametrize("partial_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("paged", [False, True])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("topk,group", [(16, 16), (16, 4), (4, 4), (1, 16)])
def test_gpu_kernel_matches_reference(helpers, poisoned_workspaces, monkeypatch, topk, group, causal, paged,
                                      partial_dtype, variant):
    _gpu_ready()
    monkeypatch.setenv(sp.VARIANT_ENV, variant)
    hkv = 2
    q_lens, kv_lens = [300, 1, 0, 700], [2000, 129, 256, 700]
    q, k, v, q2k, cq, ck = _problem(helpers, topk + group, q_lens, kv_lens, hkv * group, hkv, 128, topk, causal)
    rp, qi = build_k2q_csr(q2k, cq, ck, BLOCK, total_k=k.shape[0])
    extra, ke, ve, kc, vc = {}, k, v, k, v
    if paged:
        ke, ve, table = _paged(k, v, kv_lens, 4)
        kc, vc, _ = _paged(k, v, kv_lens, 4, fill=0.0)
        extra["page_table"] = table
    o_ref, lse_ref = _reference(q, kc, vc, rp, qi, topk, cq, ck, q_lens, kv_lens, causal, 0.088, **extra)
    g = {n: x.cuda() for n, x in extra.items()}
    o, lse = sparse_atten_func(q.cuda(), ke.cuda(), ve.cuda(), rp.cuda(), qi.cuda(), topk, cu_seqlens_q=cq.cuda(),
                               cu_seqlens_k=ck.cuda(), max_seqlen_q=max(q_lens), max_seqlen_k=max(kv_lens),
                               causal=causal, softmax_scale=0.088, return_softmax_lse=True,
                               partial_dtype=partial_dtype, backend="kernel", **g)
    torch.cuda.synchronize()
    tol = 2**-7 if partial_dtype == torch.float32 else 2**-6
    _assert_close(o, lse, o_ref, lse_ref, v, o_tol=tol, lse_tol=2e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("variant", sp.VARIANTS)
@pytest.mark.parametrize("ctas", [1, 3])
@pytest.mark.parametrize("partial_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("paged", [False, True])
def test_gpu_each_stage_matches_the_emulation(helpers, paged, partial_dtype, ctas, variant):
    """partial alone (every written slot) and combine alone (fed the emulated partials): localises a failure.
    Few CTAs, so each runs a long contiguous item range: K/V kept in smem across a row's chunks, reloaded at each
    block change (G 16 -> 8 queries per item: rows of up to ~130 tokens are several items)."""
    _gpu_ready()
    q_lens, kv_lens, hkv, group, topk = [8, 130], [128, 700], 2, 16, 3
    q, k, v, q2k, cq, ck = _problem(helpers, 8, q_lens, kv_lens, hkv * group, hkv, 128, topk, True)
    rp, qi = build_k2q_csr(q2k, cq, ck, BLOCK, total_k=k.shape[0])
    table = None
    if paged:
        k, v, table = _paged(k, v, kv_lens, 6)
    out, out_lse, o_part, lse_part = emulate(q, k, v, rp, qi, topk, cq, ck, causal=True, scale=0.09,
                                             page_table=table, stages=True, partial_dtype=partial_dtype)
    dev = torch.device("cuda")
    g = [x.to(dev) for x in (q, k, v, rp, qi, cq, ck)]
    sched = sp._schedule(None, g[3], g[6], qi.shape[1], group)
    q_slot, n_slots = sp.slot_tables(g[3], g[4], g[5], g[6], q.shape[0])
    part_fn, comb_fn = sp._kernels(group, paged, sp.PARTIAL_DTYPES[partial_dtype], "sm_90a", variant)
    op = torch.full(o_part.shape, float("nan"), dtype=partial_dtype, device=dev)
    lp = torch.full(lse_part.shape, float("nan"), dtype=torch.float32, device=dev)
    kv_len = (g[6][1:] - g[6][:-1]).contiguous()
    pt = table.to(dev) if paged else torch.zeros(1, 1, dtype=torch.int32, device=dev)
    part_fn(g[0], g[1], g[2], sched.work, sched.work_count, q_slot, g[5], g[6], kv_len, pt, op, lp,
            0.09 * sp.LOG2_E, 1, topk, ctas)
    torch.cuda.synchronize()
    written = ~torch.isnan(lse_part)
    got_written = ~torch.isnan(lp.cpu())
    assert torch.equal(got_written, written), f"the kernel wrote other slots than the emulation: " \
                                              f"{_where(got_written != written)} ([slot, token, head])"
    fin = written & torch.isfinite(lse_part)
    assert torch.equal(torch.isinf(lp.cpu()[written]), torch.isinf(lse_part[written])), "-inf slot LSEs differ"
    lse_err = (lp.cpu()[fin].double() - lse_part[fin]).abs()
    assert lse_err.max() < 2e-3, f"partial LSE max err {lse_err.max():.3g}; {_where(fin & (lp.cpu().double() - lse_part).abs().gt(2e-3))}"
    o_err = (op.cpu()[fin].double() - o_part[fin]).abs().amax(-1)
    vmax = v.float().abs().nan_to_num(0).max()
    bound = (2**-7 if partial_dtype == torch.float32 else 2**-6) * vmax
    assert o_err.max() < bound, (f"partial O max err {o_err.max():.3g} >= {bound:.3g}; worst slot/token/head "
                                 f"{fin.nonzero()[int(o_err.argmax())].tolist()}")
    o = torch.full(out.shape, float("nan"), dtype=torch.bfloat16, device=dev)
    lse = torch.full(out_lse.shape, float("nan"), dtype=torch.float32, device=dev)
    comb_fn(o_part.to(partial_dtype).to(dev), lse_part.float().to(dev), n_slots, o, lse, topk)
    torch.cuda.synchronize()
    _assert_close(o, lse, out, out_lse, v, o_tol=2**-8, lse_tol=1e-4)


@pytest.mark.gpu
def test_gpu_combine_alone_matches_the_emulation(helpers):
    """The slot combine fed emulated partials, without launching the partial kernel (which hung on its first H100
    run): tells a combine bug from a partial-kernel bug."""
    _gpu_ready()
    q_lens, kv_lens, hkv, group, topk = [8, 130], [128, 700], 1, 4, 3
    q, k, v, q2k, cq, ck = _problem(helpers, 9, q_lens, kv_lens, hkv * group, hkv, 128, topk, True)
    rp, qi = build_k2q_csr(q2k, cq, ck, BLOCK, total_k=k.shape[0])
    out, out_lse, o_part, lse_part = emulate(q, k, v, rp, qi, topk, cq, ck, causal=True, scale=0.09, stages=True)
    dev = torch.device("cuda")
    _, n_slots = sp.slot_tables(rp.to(dev), qi.to(dev), cq.to(dev), ck.to(dev), q.shape[0])
    _, comb_fn = sp._kernels(group, False, "float32")
    o = torch.full(out.shape, float("nan"), dtype=torch.bfloat16, device=dev)
    lse = torch.full(out_lse.shape, float("nan"), dtype=torch.float32, device=dev)
    comb_fn(o_part.float().to(dev), lse_part.float().to(dev), n_slots, o, lse, topk)
    torch.cuda.synchronize()
    _assert_close(o, lse, out, out_lse, v, o_tol=2**-8, lse_tol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("variant", sp.VARIANTS)
def test_gpu_kernel_seqused_topk_overflow_and_no_host_sync(helpers, poisoned_workspaces, monkeypatch, variant):
    _gpu_ready()
    monkeypatch.setenv(sp.VARIANT_ENV, variant)
    q_lens, kv_lens, hkv, group = [90, 200], [1000, 1300], 4, 16
    q, k, v, q2k, cq, ck = _problem(helpers, 21, q_lens, kv_lens, hkv * group, hkv, 128, 8, True)
    kp, vp, table = _paged(k, v, kv_lens, 2)
    kc, vc, _ = _paged(k, v, kv_lens, 2, fill=0.0)
    seqused = torch.tensor([777, 1300], dtype=torch.int32)
    rp, qi, sched = build_k2q_csr(q2k, cq, ck, BLOCK, total_k=k.shape[0], qhead_per_kv=group, return_schedule=True)
    topk = 6  # selections of 8 against top-k 6: overflowing tokens are NaN, like the reference
    kw = dict(cu_seqlens_q=cq, cu_seqlens_k=ck, max_seqlen_q=200, max_seqlen_k=1300, causal=True, softmax_scale=0.1,
              return_softmax_lse=True, page_table=table, seqused_k=seqused)
    o_ref, lse_ref = sparse_atten_func(q, kc, vc, rp, qi, topk, backend="reference", **kw)
    dev = {n: (x.cuda() if isinstance(x, torch.Tensor) else x) for n, x in kw.items()}
    args = [x.cuda() for x in (q, kp, vp, rp, qi)]
    sched_g = type(sched)(sched.work.cuda(), sched.work_count.cuda(), sched.q_tile)
    sparse_atten_func(*args, topk, schedule=sched_g, backend="kernel", **dev)  # warm-up: loads the modules
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        o, lse = sparse_atten_func(*args, topk, schedule=sched_g, backend="kernel", **dev)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    _assert_close(o, lse, o_ref, lse_ref, v, o_tol=2**-6, lse_tol=2e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("kv_format", ["fp8", "fp8_q", "nvfp4"])
@pytest.mark.parametrize("paged", [False, True])
def test_gpu_quantized_kv_staged_through_the_kernel(helpers, poisoned_workspaces, monkeypatch, kv_format, paged):
    """bf16 Q over fp8 K/V, fp8 Q = K = V and NVFP4 K/V (global scale) run the bf16 kernel on K/V staged by
    msa.cute.quant.dequantize_kv (backend="kernel" proves no reference fallback): vs the fp32 reference on the
    dequantised values, bf16 bound 2^-7 x max|V|. Paged: NaN in unowned pages and page tails (fp8 / NVFP4 encode no
    NaN in e2m1, so NVFP4 pages use garbage values instead)."""
    from msa.cute import quant as Q

    _gpu_ready()
    topk, group, hkv, causal = 16, 4, 2, True  # G 4 and 16: the GQA ratios of the smoke / minimax-m3 bundles
    q_lens, kv_lens = [300, 1, 640], [2000, 129, 900]
    q, k, v, q2k, cq, ck = _problem(helpers, 77, q_lens, kv_lens, hkv * group, hkv, 128, topk, causal)
    rp, qi = build_k2q_csr(q2k, cq, ck, BLOCK, total_k=k.shape[0])
    extra = {}
    if paged:
        fill = 7.0 if kv_format == "nvfp4" else float("nan")
        k, v, table = _paged(k, v, kv_lens, 5, fill=fill)
        extra["page_table"] = table
    if kv_format == "nvfp4":
        kq, vq = (Q.quantize_nvfp4(x.float(), "auto") for x in (k, v))
        kd, vd = kq.dequantize(torch.bfloat16), vq.dequantize(torch.bfloat16)
        to_dev = lambda t: Q.Nvfp4Tensor(t.data.cuda(), t.scale.cuda(), t.global_scale.cuda())  # noqa: E731
        kg, vg = to_dev(kq), to_dev(vq)
    else:
        kq, vq = k.to(torch.float8_e4m3fn), v.to(torch.float8_e4m3fn)
        kd, vd = kq, vq
        kg, vg = kq.cuda(), vq.cuda()
    qq = q.to(torch.float8_e4m3fn) if kv_format == "fp8_q" else q
    ref_kw = dict(extra)
    if paged:  # the reference reads the same pages with zeros where the kernel must mask (NaN x 0 would poison it)
        kd, vd = kd.float().nan_to_num(0.0).to(kd.dtype), vd.float().nan_to_num(0.0).to(vd.dtype)
    o_ref, lse_ref = _reference(qq, kd, vd, rp, qi, topk, cq, ck, q_lens, kv_lens, causal, 0.088, **ref_kw)
    g = {n: x.cuda() for n, x in extra.items()}
    o, lse = sparse_atten_func(qq.cuda(), kg, vg, rp.cuda(), qi.cuda(), topk, cu_seqlens_q=cq.cuda(),
                               cu_seqlens_k=ck.cuda(), max_seqlen_q=max(q_lens), max_seqlen_k=max(kv_lens),
                               causal=causal, softmax_scale=0.088, return_softmax_lse=True, backend="kernel", **g)
    torch.cuda.synchronize()
    assert o.dtype == torch.bfloat16
    _assert_close(o, lse, o_ref, lse_ref, vd.float().nan_to_num(0.0), o_tol=2**-7, lse_tol=2e-3)
