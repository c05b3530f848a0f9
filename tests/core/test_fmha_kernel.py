"""SM90 dense FMHA kernel (msa.core.kernels.fmha_sm90).

CPU tests: the host work list (coverage, per-tile key counts, longest-first order, L2 sections), the split-KV
cost model and piece/slot bookkeeping, the feature gate, the warmup specs. ``compile``: the sm_90a module builds.
``gpu``: the kernel against an fp32 reference written here (independent of msa.core.reference) over ragged /
paged, causal / not, GQA, odd lengths, empty requests and rows that see no key, with and without split-KV (pieces
+ combine kernel); max_score modes against msa.core.reference. Outputs are poisoned with NaN first, so every
element must be written.

Error bounds (rel. L2 of O over the whole output): bf16 1.5e-2, fp16 4e-3 -- P is rounded to the input dtype
before the PV GEMM, as in every flash kernel. LSE: |err| <= 2e-3 * max(1, |lse|) (fp32 softmax, exp2.approx).
max_score (fp32 logits of bf16 inputs, fp32 accumulation either side): |err| <= 1e-3 + 1e-4 * |ref|, -inf exactly
where the reference has -inf.
"""

from __future__ import annotations

import math
import random

import pytest
import torch
from msa.core.kernels import fmha_sm90 as k90
from msa_core_testutil import check_fmha_output, paged_cache

BLOCK = 128


def _cdiv(a, b):
    return -(-a // b)


# ---------------------------------------------------------------------------------------------------------
# Host work list
# ---------------------------------------------------------------------------------------------------------


def _expected_n_max(qo, kv, off, m, causal):
    kv_blocks = _cdiv(kv, BLOCK)
    if not causal:
        return kv_blocks
    last = min((m + 1) * BLOCK, qo) - 1
    lim = last + off
    if lim < 0:
        return 0
    # brute force: the largest visible key of any row of the tile
    return min(kv_blocks, lim // BLOCK + 1)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_work_list_covers_every_tile_once(causal, seed):
    rng = random.Random(seed)
    batch = rng.randint(1, 6)
    qo = [rng.choice([0, 1, 5, 127, 128, 129, 300, 1000]) for _ in range(batch)]
    kv = [rng.choice([0, 1, 128, 200, 1000, 5000]) for _ in range(batch)]
    if causal:
        offs = [rng.randint(-q, k) for q, k in zip(qo, kv)]
    else:
        offs = list(kv)
    hkv = rng.choice([1, 2, 4])
    hq = hkv * rng.choice([1, 4, 8])
    starts = [sum(kv[:b]) for b in range(batch)]
    work = k90.build_work_list(qo, kv, offs, starts, hq, hkv, causal, head_dim=128, elem_size=2)
    assert work.dtype == torch.int32 and work.shape[1] == k90.WORK_FIELDS

    q_starts = [sum(qo[:b]) for b in range(batch)]
    expected = {}
    for b in range(batch):
        for m in range(_cdiv(qo[b], BLOCK)):
            for h in range(hq):
                n_max = _expected_n_max(qo[b], kv[b], offs[b], m, causal)
                expected[(q_starts[b], m, h)] = (qo[b], starts[b], kv[b], offs[b], n_max)
    got = {}
    for row in work.tolist():
        key = (row[0], row[4], row[5])
        assert key not in got, f"work item {key} listed twice"
        got[key] = (row[1], row[2], row[3], row[6], row[7])
    assert got == expected


def test_work_list_is_longest_first_inside_sections_and_groups_kv_heads():
    # one request, 8 KV heads of 64K keys each (32 MiB of K+V per head at d128 bf16 -> one head per section)
    qo, kv = [1024], [65536]
    work = k90.build_work_list(qo, kv, [kv[0] - qo[0]], [0], 32, 8, True, head_dim=128, elem_size=2)
    heads_per_kv = 4
    n_max = work[:, 7].tolist()
    kv_head = (work[:, 5] // heads_per_kv).tolist()
    # sections are contiguous runs of one KV head, each sorted by descending cost
    runs = []
    for i, h in enumerate(kv_head):
        if not runs or runs[-1][0] != h:
            runs.append((h, i))
    assert len(runs) == 8, "each KV head (32 MiB of K+V) should be its own L2 section"
    bounds = [r[1] for r in runs] + [len(kv_head)]
    for s, e in zip(bounds, bounds[1:]):
        seg = n_max[s:e]
        assert seg == sorted(seg, reverse=True)
    # small K/V: all KV heads in one section, heads innermost
    work = k90.build_work_list([512], [512], [0], [0], 8, 2, True, head_dim=128, elem_size=2)
    assert work[:8, 5].tolist() == list(range(8))
    assert work[:, 7].tolist() == sorted(work[:, 7].tolist(), reverse=True)


def test_work_list_puts_tiles_without_keys_last():
    # qo_offset = -qo_len: the first query sees nothing... only rows i >= 128 + ... see keys
    work = k90.build_work_list([300], [300], [-200], [0], 2, 1, True, head_dim=128, elem_size=2)
    costs = work[:, 7].tolist()
    assert costs == sorted(costs, reverse=True)
    assert costs[-1] == 0 and costs[0] > 0


# ---------------------------------------------------------------------------------------------------------
# Split-KV: cost model and piece / slot bookkeeping
# ---------------------------------------------------------------------------------------------------------


def _check_split(work, split, combine, slots):
    """Every item of ``work`` is either unchanged in ``split`` or cut into pieces that partition its KV range,
    with consecutive partial slots listed once in ``combine``."""
    assert split.shape[1] == k90.WORK_FIELDS and combine.shape[1] == k90.COMBINE_FIELDS
    orig = {(r[0], r[4], r[5]): r for r in work.tolist()}
    pieces = {}
    for r in split.tolist():
        pieces.setdefault((r[0], r[4], r[5]), []).append(r)
    assert pieces.keys() == orig.keys()
    by_item = {(c[0], c[2], c[3]): c for c in combine.tolist()}
    used = []
    for key, rows in pieces.items():
        o = orig[key]
        if len(rows) == 1 and rows[0][9] == -1:
            assert rows[0] == o and key not in by_item
            continue
        assert key in by_item, f"split item {key} has no combine entry"
        c = by_item[key]
        rows.sort(key=lambda r: r[8])
        assert [r[8] for r in rows][0] == 0 and rows[-1][7] == o[7], "pieces must cover [0, n_block_max)"
        assert all(a[7] == b[8] for a, b in zip(rows, rows[1:])), "pieces must be contiguous, no overlap"
        assert all(r[7] > r[8] for r in rows), "empty piece"
        assert all(r[10] == o[7] and r[:7] == o[:7] for r in rows)
        assert sorted(r[9] for r in rows) == list(range(c[4], c[4] + c[5])) and c[5] == len(rows)
        assert c[1] == o[1]
        used += [r[9] for r in rows]
    assert sorted(used) == list(range(slots))


@pytest.mark.parametrize("k,s", [(0, 4), (3, 2), (5, 7), (100, 3), (1000, 64)])
def test_split_work_partitions_items_into_pieces_with_slots(k, s):
    work = k90.build_work_list(
        [300, 129, 1000, 5], [900, 129, 1000, 5000], [600, 0, 0, 4995], [0, 900, 1029, 2029], 8, 2, True, 128, 2
    )
    split, combine, slots = k90.split_work(work, k, s)
    _check_split(work, split, combine, slots)
    if s > 1 and any(n >= 2 for n in work[work.shape[0] - min(k, work.shape[0]) :, 7].tolist()) and k:
        assert slots > 0
        tail = split[split.shape[0] - slots :]
        sizes = (tail[:, 7] - tail[:, 8]).tolist()
        assert sizes == sorted(sizes, reverse=True), "pieces go last, longest first"


def test_choose_split_cuts_only_the_partial_last_wave():
    sms = 132
    # 4096 equal non-causal tiles of 64 KV tiles (B2 H32 S8K): 31.03 waves -> the 4 leftover items are cut
    k, s, span, base = k90.choose_split([64] * 4096, sms)
    assert k == 4096 % sms and s >= 8
    assert span < base * 0.98
    # causal longest-first lists are balanced by the dynamic schedule already: no split
    costs = sorted([n for n in range(1, 65) for _ in range(64)], reverse=True)
    assert k90.choose_split(costs, sms)[:2] == (0, 1)
    # a multiple of the SM count: nothing to gain
    assert k90.choose_split([64] * (sms * 8), sms)[:2] == (0, 1)


def test_choose_split_spreads_decode_shaped_work_over_the_sms():
    k, s, span, base = k90.choose_split([1000] * 8, 132)
    assert k == 8 and 8 * s >= 100, (k, s)
    assert span < base / 8


def test_plan_sizes_the_split_workspace():
    kp = k90.plan([100, 3], [20000, 9000], 8, 2, causal=False, device="cpu", num_sms=132)
    k, s = kp.split
    assert k > 0 and s > 1
    slots = int(kp.combine[:, 5].sum())
    assert kp.partial_o.shape == (slots, 128, 128) and kp.partial_lse.shape == (slots, 128)
    assert kp.num_work == int(kp.work.shape[0]) and kp.num_ctas == min(132, kp.num_work)
    none = k90.plan([100, 3], [20000, 9000], 8, 2, causal=False, device="cpu", num_sms=132, split_kv=None)
    assert none.split == (0, 1) and none.combine.shape[0] == 0 and none.num_work == 16


@pytest.mark.parametrize("page", [16, 32, 64, 128, 256])
def test_paged_plan_counts_pages_of_its_page_size(page):
    """kv_start of a paged item = the request's first entry in the flat page table: sum ceil(kv_len / P) before it;
    the tiles (n_block_max) stay 128-key tiles whatever the page size."""
    kv = [129, 300, 1500, 1]
    kp = k90.plan([1, 190, 700, 1], kv, 8, 1, causal=True, paged=True, page_size=page, device="cpu", split_kv=None)
    assert kp.page_size == page and kp.block_n == 128
    starts = [sum(-(-n // page) for n in kv[:i]) for i in range(len(kv))]
    for row in kp.work.tolist():
        req = next(i for i, n in enumerate(kv) if n == row[3])
        assert row[2] == starts[req]
        assert row[7] <= -(-kv[req] // 128)
    ragged = k90.plan([1, 190, 700, 1], kv, 8, 1, causal=True, device="cpu", split_kv=None)
    assert ragged.page_size is None
    assert sorted(map(tuple, kp.work[:, [0, 3, 4, 5, 7]].tolist())) == sorted(
        map(tuple, ragged.work[:, [0, 3, 4, 5, 7]].tolist())
    )
    with pytest.raises(ValueError, match="page_size"):
        k90.plan([1], [1], 1, 1, causal=True, paged=True, page_size=48, device="cpu")


def test_head_dim_256_plans_64_key_tiles():
    kp = k90.plan([300], [1000], 4, 1, causal=True, head_dim=256, device="cpu", split_kv=None)
    assert kp.block_n == k90.default_block_n(256) == 64
    assert int(kp.work[:, 7].max()) == -(-1000 // 64)
    assert k90.default_block_n(128) == k90.default_block_n(64) == 128
    assert k90.default_block_n(128, 256) == k90.default_block_n(256, 64) == 64 and k90.default_block_n(64, 128) == 128
    assert k90.default_block_n(128, fp8=True, causal=False) == 128 == k90.default_block_n(128, fp8=True)
    assert k90.default_block_n(128, fp8=True, causal=False, fp8_p="exp2") == 192  # the exact build's wide tile
    assert k90.default_block_n(64, fp8=True, causal=False) == 128 == k90.default_block_n(128, fp8=True, causal=False, paged=True)
    kp = k90.plan([100, 3], [20000, 9000], 8, 2, causal=False, device="cpu", num_sms=132, head_dim=128, head_dim_v=64)
    assert kp.block_n == 128 and kp.partial_o.shape[1:] == (128, 64)  # split-KV partials at Dv


def test_dqk_dv_variants_have_their_own_module_names():
    assert k90.variant_tag("bfloat16", 128, True, False) == k90.variant_tag("bfloat16", 128, True, False, "o", 128)
    assert k90.variant_tag("bfloat16", 128, True, False, "o", 64) == "fmha_sm90_bfloat16_d128v64_causal1_paged0"
    same = k90.jit_spec("bfloat16", 128, True, False)
    assert k90.jit_spec("bfloat16", 128, True, False, head_dim_v=128).name == same.name
    assert "head_dim_v=64" in k90.jit_spec("bfloat16", 128, True, False, head_dim_v=64).name
    with pytest.raises(NotImplementedError, match="Dqk != Dv"):
        k90.jit_spec("bfloat16", 128, True, False, mode="o_maxscore", head_dim_v=64)
    with pytest.raises(ValueError, match="head_dim_v"):
        k90.jit_spec("bfloat16", 128, True, False, head_dim_v=96)


# ---------------------------------------------------------------------------------------------------------
# Feature gate and warmup specs
# ---------------------------------------------------------------------------------------------------------


def test_supports_names_what_is_missing():
    ok, _ = k90.supports(dtype=torch.bfloat16, head_dim_qk=128, head_dim_v=128, page_size=None)
    assert ok
    for dqk, dv, ps in ((256, 256, 16), (128, 64, 256), (64, 256, 32)):  # mode O: any pair of built dims, any page
        ok, why = k90.supports(dtype=torch.float16, head_dim_qk=dqk, head_dim_v=dv, page_size=ps)
        assert ok, why
    for o, ms in ((True, True), (False, True)):  # the max-score modes: GPU-tested with bf16 and fp16
        for dt in (torch.bfloat16, torch.float16):
            ok, why = k90.supports(dtype=dt, head_dim_qk=128, head_dim_v=128, output_o=o, output_maxscore=ms)
            assert ok == k90.MAX_SCORE_ENABLED, why
    for kwargs, word in [
        ({"dtype": torch.float32}, "dtype"),
        ({"dtype": torch.float8_e4m3fn, "page_size": 128}, "paged"),  # fp8: ragged only (test_fmha_fp8.py)
        ({"head_dim_qk": 256, "head_dim_v": 256, "output_maxscore": True}, "head dim"),  # d256: mode O only
        ({"head_dim_qk": 256, "head_dim_v": 128, "output_maxscore": True}, "head dim"),  # Dqk != Dv: mode O only
        ({"head_dim_qk": 128, "head_dim_v": 64, "dtype": torch.float8_e4m3fn}, "head dim"),
        ({"head_dim_qk": 128, "head_dim_v": 192}, "head dim"),
        ({"head_dim_qk": 192, "head_dim_v": 192}, "head dim"),
        ({"head_dim_qk": 64, "head_dim_v": 64, "output_maxscore": True}, "head dim"),  # d64: mode O only
        ({"head_dim_qk": 64, "head_dim_v": 64, "dtype": torch.float8_e4m3fn}, "head dim"),
        ({"page_size": 8}, "page_size"),
        ({"page_size": 512}, "page_size"),
        ({"output_maxscore": True, "dtype": torch.float8_e4m3fn}, "max_score"),
        ({"output_o": False, "dtype": torch.float8_e4m3fn, "per_head_scales": True}, "per-head"),  # fp8 index pass
        ({"output_o": False, "dtype": torch.float8_e4m3fn, "page_size": 128}, "paged"),
        ({"sparse": True}, "sparse"),
        ({"per_head_scales": True}, "per-head"),
    ]:
        base = {"dtype": torch.bfloat16, "head_dim_qk": 128, "head_dim_v": 128, "page_size": None}
        base.update(kwargs)
        ok, why = k90.supports(**base)
        assert not ok and word in why, (kwargs, why)


def test_run_refuses_unimplemented_modes_before_touching_the_device():
    q = torch.zeros(4, 2, 128, dtype=torch.bfloat16)
    k = torch.zeros(4, 1, 128, dtype=torch.bfloat16)
    kp = k90.KernelPlan(q, q, 0, 1, False, q, q)
    with pytest.raises(NotImplementedError, match="max_score"):
        k90.run(q.to(torch.float8_e4m3fn), k.to(torch.float8_e4m3fn), k.to(torch.float8_e4m3fn), kp, causal=True,
                output_maxscore=True)
    with pytest.raises(NotImplementedError, match="dtype"):
        k90.run(q.float(), k.float(), k.float(), kp, causal=True)
    with pytest.raises(NotImplementedError, match="head dims"):
        k90.run(q[..., :64], k[..., :64], k[..., :64], kp, causal=True, output_maxscore=True)
    q256 = torch.zeros(4, 2, 256, dtype=torch.bfloat16)
    with pytest.raises(NotImplementedError, match="head dims"):
        k90.run(q256, q256[:, :1], q256[:, :1], kp, causal=True, output_maxscore=True)
    q192 = torch.zeros(4, 2, 192, dtype=torch.bfloat16)
    with pytest.raises(NotImplementedError, match="head dims"):
        k90.run(q192, q192[:, :1], q192[:, :1], kp, causal=True)
    with pytest.raises(NotImplementedError, match="per-head"):
        k90.run(q, k, k, kp, causal=True, q_scale=torch.ones(2))


@pytest.mark.parametrize("output_o", [True, False])
def test_run_hands_each_mode_its_module_and_buffers(output_o, monkeypatch):
    """Host side of run() for the max-score modes, with a stand-in module (no GPU): which variant is loaded,
    which tensors it gets (score-only: no combine rows, q stands in for out, k for v)."""
    calls = []

    class FakeModule:
        def fmha_fwd(self, *args):
            calls.append(args)

    monkeypatch.setattr(k90, "MAX_SCORE_ENABLED", True)
    monkeypatch.setattr(k90, "_module", lambda *key: calls.append(key) or FakeModule())
    q = torch.randn(300, 4, 128).to(torch.bfloat16)
    k = torch.randn(900, 2, 128).to(torch.bfloat16)
    kp = k90.plan([300], [900], 4, 2, causal=True, device="cpu", num_sms=132, split_kv=(10**6, 2))
    ms = torch.empty(4, 128, 300)
    out, got_ms = k90.run(
        q, k, k if output_o else None, kp, max_score=ms, output_o=output_o, output_maxscore=True, causal=True
    )
    key, args = calls
    assert key == ("bfloat16", 128, True, False, "o_maxscore" if output_o else "maxscore", None)
    assert got_ms is ms and args[11] is ms
    if output_o:
        assert out is not None and args[3] is out and args[8].shape[0] == kp.combine.shape[0] > 0
    else:
        assert out is None and args[3] is q and args[2] is k and args[8].shape[0] == 0
    with pytest.raises(ValueError, match="v: required"):
        k90.run(q, k, None, kp, causal=True)
    with pytest.raises(ValueError, match="max_score: required"):
        k90.run(q, k, None, kp, output_o=False, output_maxscore=True, causal=True)


def test_jit_specs_cover_the_preset_and_refuse_sm100():
    specs = k90.jit_specs({"dtypes": ["bf16", "fp8"], "head_dim": [64, 128, 192, 256]}, "sm_90a")
    index = [s.name for s in specs if s.params["mode"] == k90.MODES["maxscore"]]
    names = sorted(s.name for s in specs if s.params["mode"] == k90.MODES["o"])
    assert len(names) == 16 and not any("head_dim=192" in n for n in names)
    for d in (64, 128, 256):  # causal x paged (one paged module serves every page size)
        assert sum("dtype=bfloat16" in n and f"head_dim={d}," in n for n in names) == 4
    fp8 = [n for n in names if "dtype=float8_e4m3fn" in n]
    assert len(fp8) == 4 and all("paged=False" in n and "head_dim=128" in n for n in fp8)  # fp8: ragged d128 only
    assert sum("fp8_p=code" in n for n in fp8) == 2 == sum("fp8_p=exp2" in n for n in fp8)  # fast + exact softmax
    # the index pass (score-only, ragged, d128): causal and not, per dtype
    assert len(index) == 4 == len(specs) - 16 and all("paged=False" in n and "head_dim=128" in n for n in index)
    assert k90.jit_specs({"dtypes": ["bf16"], "head_dim": [128]}, "sm_100a") == []
    with pytest.raises(NotImplementedError, match="sm_90a"):
        k90.jit_spec("bfloat16", 128, True, False, arch="sm_100a")


@pytest.mark.compile
@pytest.mark.slow
def test_builds_sm90a_module():
    from msa.core.jit import toolchain

    try:
        toolchain.nvcc_path()
    except toolchain.ToolchainError as e:
        pytest.skip(str(e))
    entry = k90.jit_spec("bfloat16", 128, True, False).build()
    blob = entry.file("module.so").read_bytes()
    assert b"fmha_fwd" in blob  # the tvm-ffi export
    assert b"fmha_sm90_kernel" in blob  # the kernel's (mangled) name in the embedded cubin
    assert b"sm_90a" in blob  # the embedded cubin's target


# ---------------------------------------------------------------------------------------------------------
# GPU correctness
# ---------------------------------------------------------------------------------------------------------


def reference(q, k, v, qo_lens, kv_lens, qo_offsets, causal, sm_scale):
    """fp32 attention per request (K/V already gathered to ragged [total_kv, Hkv, D])."""
    hq, hkv = q.shape[1], k.shape[1]
    g = hq // hkv
    out = torch.zeros(*q.shape[:2], v.shape[-1], dtype=torch.float32, device=q.device)
    lse = torch.full(q.shape[:2], -math.inf, dtype=torch.float32, device=q.device)
    qs = ks = 0
    for qo, kv, off in zip(qo_lens, kv_lens, qo_offsets):
        if qo and kv:
            qb = q[qs : qs + qo].float().transpose(0, 1)  # [Hq, qo, D]
            kb = k[ks : ks + kv].float().transpose(0, 1).repeat_interleave(g, 0)
            vb = v[ks : ks + kv].float().transpose(0, 1).repeat_interleave(g, 0)
            s = torch.matmul(qb, kb.transpose(1, 2)) * sm_scale
            if causal:
                i = torch.arange(qo, device=q.device)[:, None]
                j = torch.arange(kv, device=q.device)[None, :]
                s = s.masked_fill(j > i + off, -math.inf)
            lb = torch.logsumexp(s, dim=-1)  # [Hq, qo]
            p = torch.exp(s - lb[..., None]).nan_to_num(0.0)
            out[qs : qs + qo] = torch.matmul(p, vb).transpose(0, 1)
            lse[qs : qs + qo] = lb.transpose(0, 1)
        qs += qo
        ks += kv
    return out, lse


def _paged_copy(k, v, kv_lens, page=128, seed=0):
    """Scatter ragged K/V into a shuffled page pool with a few pages nobody uses; (k_pages, v_pages, kv_indices)."""
    return paged_cache(k, v, kv_lens, page=page, seed=seed, spare_pages=3)


CASES = [
    # name, qo_lens, kv_lens, hq, hkv, causal, paged (False, True = page 128, or a page size), dtype, qo_offset
    # (None: kv - qo)
    ("single-odd", [77], [77], 4, 4, True, False, torch.bfloat16, None),
    ("prefill-multi", [1, 129, 256, 1000], [1, 129, 300, 1000], 8, 2, True, False, torch.bfloat16, None),
    ("noncausal-ragged", [33, 500, 128], [700, 1, 257], 8, 8, False, False, torch.bfloat16, None),
    ("gqa16-chunked", [200, 64], [2000, 4100], 16, 1, True, False, torch.bfloat16, None),
    ("gqa4-empty-requests", [0, 300, 5, 0], [50, 0, 1000, 0], 8, 2, True, False, torch.bfloat16, None),
    ("offset-unseen-rows", [300, 260], [300, 500], 4, 1, True, False, torch.bfloat16, [-200, 17]),
    ("paged-causal", [1, 190, 700], [129, 300, 1500], 8, 1, True, True, torch.bfloat16, None),
    ("paged-noncausal", [64, 400], [5, 1000], 8, 8, False, True, torch.bfloat16, None),
    ("fp16-causal", [256, 1000], [600, 1000], 8, 2, True, False, torch.float16, None),
    ("fp16-paged-noncausal", [100, 300], [1000, 128], 4, 4, False, True, torch.float16, None),
    ("long-gqa8", [2048], [4096], 16, 2, True, False, torch.bfloat16, None),
    # head dim 64 (10th field; default 128)
    ("d64-causal-gqa", [1, 300, 1000], [129, 900, 1000], 8, 2, True, False, torch.bfloat16, None, 64),
    ("d64-fp16-paged-noncausal", [64, 400], [5, 1000], 8, 8, False, True, torch.float16, None, 64),
    # page sizes other than 128: a 128-key tile from 128 / P pages (P < 128, the last tile's missing pages repeat the
    # last page), or part of a page (P = 256); lengths that end mid-page and mid-tile
    ("paged16-causal", [1, 190, 700], [129, 300, 1500], 8, 1, True, 16, torch.bfloat16, None),
    ("paged32-noncausal", [64, 400], [5, 1000], 8, 8, False, 32, torch.bfloat16, None),
    ("paged64-fp16-causal-gqa", [300, 100], [700, 333], 8, 2, True, 64, torch.float16, None),
    ("paged256-causal", [1, 190, 700], [129, 300, 1500], 8, 1, True, 256, torch.bfloat16, None),
    ("paged256-noncausal", [64, 400], [5, 1000], 8, 8, False, 256, torch.bfloat16, None),
    ("d64-fp16-paged16-noncausal", [64, 400], [5, 1000], 8, 8, False, 16, torch.float16, None, 64),
    # head dim 256 (64-key tiles)
    ("d256-causal-gqa", [1, 300, 1000], [129, 900, 1000], 8, 2, True, False, torch.bfloat16, None, 256),
    ("d256-fp16-noncausal-ragged", [33, 500, 128], [700, 1, 257], 4, 4, False, False, torch.float16, None, 256),
    ("d256-offset-unseen-rows", [300, 260], [300, 500], 4, 1, True, False, torch.bfloat16, [-200, 17], 256),
    ("d256-paged-causal", [1, 190, 700], [129, 300, 1500], 8, 1, True, True, torch.bfloat16, None, 256),
    ("d256-paged16-noncausal", [64, 400], [5, 1000], 8, 8, False, 16, torch.bfloat16, None, 256),
    ("d256-paged256-causal", [300, 100], [700, 333], 8, 2, True, 256, torch.bfloat16, None, 256),
    # Dqk != Dv (10th field (Dqk, Dv)): O, split-KV partials and the combine run at Dv
    ("dqk128-dv64-causal-gqa", [1, 300, 1000], [129, 900, 1000], 8, 2, True, False, torch.bfloat16, None, (128, 64)),
    ("dqk64-dv128-paged32-noncausal", [64, 400], [5, 1000], 8, 8, False, 32, torch.float16, None, (64, 128)),
    ("dqk256-dv128-causal", [300, 260], [300, 500], 4, 1, True, False, torch.bfloat16, [-200, 17], (256, 128)),
    ("dqk128-dv256-paged-causal", [1, 190, 700], [129, 300, 1500], 8, 1, True, True, torch.bfloat16, None, (128, 256)),
]


def _run_case(qo_lens, kv_lens, hq, hkv, causal, paged, dtype, qo_offset, d=128, seed=0, via_api=True,
              split_kv="auto"):
    import msa.core as mc

    dev = torch.device("cuda")
    torch.manual_seed(seed)
    d, dv = d if isinstance(d, tuple) else (d, d)
    tq, tk = sum(qo_lens), sum(kv_lens)
    q = torch.randn(tq, hq, d, device=dev, dtype=dtype)
    k = torch.randn(tk, hkv, d, device=dev, dtype=dtype)
    v = torch.randn(tk, hkv, dv, device=dev, dtype=dtype)
    offs = [kv - qo for qo, kv in zip(qo_lens, kv_lens)] if qo_offset is None else qo_offset
    page = (128 if paged is True else int(paged)) if paged else None
    plan = mc.fmha_plan(
        qo_lens,
        kv_lens,
        hq,
        hkv,
        page_size=page,
        causal=causal,
        qo_offset=qo_offset if causal else None,
        device=dev,
    )
    kk, vv, idx = (k, v, None)
    if paged:
        kk, vv, idx = _paged_copy(k, v, kv_lens, page=page, seed=seed)
    out = torch.full((tq, hq, dv), float("nan"), device=dev, dtype=dtype)
    lse = torch.full((tq, hq), float("nan"), device=dev, dtype=torch.float32)
    sm = 1.0 / math.sqrt(d)
    if split_kv != "auto":  # a KernelPlan with a forced split-KV choice
        kp = k90.plan(
            qo_lens, kv_lens, hq, hkv, causal=causal, qo_offset=offs, paged=bool(paged), page_size=page or 128,
            split_kv=split_kv, head_dim=d, head_dim_v=dv, device=dev
        )
        assert split_kv is None or kp.combine.shape[0] > 0, "the forced split did not cut any item"
        k90.run(q, kk, vv, kp, kv_indices=idx, out=out, lse=lse, return_lse=True, causal=causal)
    elif via_api:
        res = mc.fmha(q, kk, vv, plan, kv_indices=idx, out=out, return_lse=True, backend="kernel")
        assert res[0] is out
        lse = res[2]
    else:
        k90.run(q, kk, vv, plan, kv_indices=idx, out=out, lse=lse, return_lse=True)
    torch.cuda.synchronize()
    ref_o, ref_lse = reference(q, k, v, qo_lens, kv_lens, offs, causal, sm)
    return out, lse, ref_o, ref_lse


def _check_against_reference(out, lse, ref_o, ref_lse, dtype):
    check_fmha_output(out, lse, ref_o, ref_lse, 1.5e-2 if dtype == torch.bfloat16 else 4e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_matches_fp32_reference(case):
    _, qo_lens, kv_lens, hq, hkv, causal, paged, dtype, qo_offset, *d = case
    ok, why = k90.available(torch.device("cuda"))
    if not ok:
        pytest.skip(why)
    out, lse, ref_o, ref_lse = _run_case(qo_lens, kv_lens, hq, hkv, causal, paged, dtype, qo_offset, *d)
    _check_against_reference(out, lse, ref_o, ref_lse, dtype)


# (case, split): cut the last k items into s pieces each; k = 10**6 means every item.
SPLIT_CASES = [
    ("gqa4-empty-requests", (10**6, 3)),
    ("prefill-multi", (10**6, 2)),
    ("noncausal-ragged", (10**6, 5)),
    ("gqa16-chunked", (7, 4)),
    ("offset-unseen-rows", (10**6, 3)),
    ("paged-causal", (10**6, 3)),
    ("paged-noncausal", (10**6, 64)),  # more pieces than tiles: one tile per piece
    ("fp16-causal", (10**6, 2)),
    ("fp16-paged-noncausal", (10**6, 4)),
    ("long-gqa8", (40, 7)),
    ("d64-causal-gqa", (10**6, 3)),  # the combine kernel's 64-dim tail chunk
    ("paged16-causal", (10**6, 3)),
    ("paged256-noncausal", (10**6, 5)),
    ("d256-causal-gqa", (10**6, 3)),  # two 128-dim chunks per row in the combine
    ("d256-paged16-noncausal", (10**6, 4)),
    ("dqk128-dv64-causal-gqa", (10**6, 3)),  # partial O and the combine at Dv = 64
    ("dqk128-dv256-paged-causal", (10**6, 2)),
]


@pytest.mark.gpu
@pytest.mark.parametrize("name,split", SPLIT_CASES, ids=[c[0] for c in SPLIT_CASES])
def test_split_kv_matches_fp32_reference(name, split):
    """Pieces write partial O / LSE, the combine kernel merges them (rows that see no key in some piece, or in
    all of them, included)."""
    ok, why = k90.available(torch.device("cuda"))
    if not ok:
        pytest.skip(why)
    _, qo_lens, kv_lens, hq, hkv, causal, paged, dtype, qo_offset, *d = next(c for c in CASES if c[0] == name)
    out, lse, ref_o, ref_lse = _run_case(qo_lens, kv_lens, hq, hkv, causal, paged, dtype, qo_offset, *d,
                                         split_kv=split)
    _check_against_reference(out, lse, ref_o, ref_lse, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [True, False])
def test_auto_split_on_decode_shaped_work(causal):
    ok, why = k90.available(torch.device("cuda"))
    if not ok:
        pytest.skip(why)
    qo, kv = [100, 3], [20000, 9000]
    kp = k90.plan(qo, kv, 8, 2, causal=causal, device="cuda")
    assert kp.split[0] > 0, "the cost model should split 16 long items over the SMs"
    out, lse, ref_o, ref_lse = _run_case(qo, kv, 8, 2, causal, False, torch.bfloat16, None)
    _check_against_reference(out, lse, ref_o, ref_lse, torch.bfloat16)


@pytest.mark.gpu
def test_split_kv_replays_in_a_cuda_graph():
    """Plan-sized workspace, no host sync, no allocation: the split launch + combine captures and replays."""
    ok, why = k90.available(torch.device("cuda"))
    if not ok:
        pytest.skip(why)
    dev = torch.device("cuda")
    torch.manual_seed(7)
    qo, kv, hq, hkv = [100, 3], [20000, 9000], 8, 2
    q = torch.randn(sum(qo), hq, 128, device=dev, dtype=torch.bfloat16)
    k = torch.randn(sum(kv), hkv, 128, device=dev, dtype=torch.bfloat16)
    v = torch.randn(sum(kv), hkv, 128, device=dev, dtype=torch.bfloat16)
    kp = k90.plan(qo, kv, hq, hkv, causal=True, device=dev)
    assert kp.split[0] > 0
    out = torch.full_like(q, float("nan"))
    lse = torch.full(q.shape[:2], float("nan"), device=dev)
    k90.run(q, k, v, kp, out=out, lse=lse, return_lse=True, causal=True)  # warm-up (module load) outside capture
    eager_o, eager_lse = out.clone(), lse.clone()
    out.fill_(float("nan"))
    lse.fill_(float("nan"))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        k90.run(q, k, v, kp, out=out, lse=lse, return_lse=True, causal=True)
    graph.replay()
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, eager_o) and torch.equal(lse, eager_lse)
    ref_o, ref_lse = reference(q, k, v, qo, kv, [b - a for a, b in zip(qo, kv)], True, 1.0 / math.sqrt(128))
    _check_against_reference(out, lse, ref_o, ref_lse, torch.bfloat16)


MAX_SCORE_CASES = [
    # name, qo_lens, kv_lens, hq, hkv, causal, paged, qo_offset, split
    ("causal-ragged", [1, 190, 700], [129, 300, 1500], 8, 2, True, False, None, "auto"),
    ("noncausal-ragged", [33, 500], [700, 257], 4, 4, False, False, None, "auto"),
    ("offset-unseen", [300, 260], [300, 500], 4, 1, True, False, [-200, 17], "auto"),
    ("causal-paged", [64, 400], [129, 1000], 8, 1, True, True, None, "auto"),
    ("noncausal-paged-split", [100, 300], [1000, 128], 4, 4, False, True, None, (10**6, 3)),
    ("causal-ragged-split", [256, 1000], [600, 1000], 8, 2, True, False, None, (10**6, 4)),
    ("causal-paged32", [1, 190, 700], [129, 300, 1500], 8, 2, True, 32, None, "auto"),
    ("noncausal-paged256-split", [64, 400], [5, 1000], 4, 4, False, 256, None, (10**6, 3)),
]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("output_o", [True, False], ids=["o+max_score", "max_score-only"])
@pytest.mark.parametrize("case", MAX_SCORE_CASES, ids=[c[0] for c in MAX_SCORE_CASES])
def test_max_score_matches_reference(case, output_o, dtype, monkeypatch):
    """max_score (fp32 logits, fp32 accumulation either side): |err| <= 1e-3 + 1e-4 |ref| for bf16 and fp16 inputs;
    O rel-L2 < 1.5e-2 (bf16) / 4e-3 (fp16: P rounded to fp16 before PV)."""
    from msa.core.reference import default_max_k_tiles, fmha_reference

    ok, why = k90.available(torch.device("cuda"))
    if not ok:
        pytest.skip(why)
    monkeypatch.setattr(k90, "MAX_SCORE_ENABLED", True)
    monkeypatch.setattr(k90, "MAX_SCORE_DTYPES", (torch.bfloat16, torch.float16))  # the kernel, whatever the default
    _, qo_lens, kv_lens, hq, hkv, causal, paged, qo_offset, split = case
    dev = torch.device("cuda")
    torch.manual_seed(5)
    d = 128
    tq, tk = sum(qo_lens), sum(kv_lens)
    q = torch.randn(tq, hq, d, device=dev, dtype=dtype)
    k = torch.randn(tk, hkv, d, device=dev, dtype=dtype)
    v = torch.randn(tk, hkv, d, device=dev, dtype=dtype)
    offs = [b - a for a, b in zip(qo_lens, kv_lens)] if qo_offset is None else qo_offset
    kk, vv, idx = (k, v, None)
    page = (128 if paged is True else int(paged)) if paged else 128
    if paged:
        kk, vv, idx = _paged_copy(k, v, kv_lens, page=page, seed=5)
    kp = k90.plan(qo_lens, kv_lens, hq, hkv, causal=causal, qo_offset=offs, paged=bool(paged), page_size=page,
                  split_kv=split, device=dev)
    tiles = default_max_k_tiles(max(kv_lens))
    ms = torch.full((hq, tiles, tq), float("nan"), device=dev, dtype=torch.float32)
    out = torch.full((tq, hq, d), float("nan"), device=dev, dtype=dtype) if output_o else None
    sm = 1.0 / math.sqrt(d)
    res = k90.run(
        q,
        kk,
        vv if output_o else None,
        kp,
        kv_indices=idx,
        out=out,
        max_score=ms,
        output_o=output_o,
        output_maxscore=True,
        causal=causal,
    )
    assert res[1] is ms and (res[0] is out)
    torch.cuda.synchronize()
    ref_o, ref_ms, _ = fmha_reference(
        q,
        k,
        v,
        qo_lens=qo_lens,
        kv_lens=kv_lens,
        causal=causal,
        qo_offset=offs,
        sm_scale=sm,
        output_o=True,
        output_maxscore=True,
        max_k_tiles=tiles,
    )
    assert not torch.isnan(ms).any(), "unwritten (NaN-poisoned) max_score elements"
    assert torch.equal(torch.isneginf(ms), torch.isneginf(ref_ms)), "-inf exactly where no key is visible"
    fin = torch.isfinite(ref_ms)
    err = (ms[fin] - ref_ms[fin]).abs()
    assert (err <= 1e-3 + 1e-4 * ref_ms[fin].abs()).all(), f"max_score max err {err.max().item():.3e}"
    if output_o:
        assert not torch.isnan(out).any()
        rel = ((out.float() - ref_o.float()).norm() / ref_o.float().norm().clamp_min(1e-6)).item()
        assert rel < (1.5e-2 if dtype == torch.bfloat16 else 4e-3), f"rel L2 error {rel:.3e}"


@pytest.mark.gpu
def test_direct_run_is_deterministic_and_reuses_the_plan():
    ok, why = k90.available(torch.device("cuda"))
    if not ok:
        pytest.skip(why)
    a = _run_case([700, 300], [900, 300], 8, 2, True, False, torch.bfloat16, None, seed=3, via_api=False)
    b = _run_case([700, 300], [900, 300], 8, 2, True, False, torch.bfloat16, None, seed=3, via_api=False)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
