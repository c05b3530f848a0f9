"""msa.core.reference.fmha_reference against independent oracles (CPU, fp64 unless stated).

Error bounds (stated per dtype, relative to O(1) random data):
- fp64 compute vs the fp64 unchunked oracle: rtol 1e-10, atol 1e-10 (only summation order differs);
- fp32 compute vs fp64: rtol 1e-5, atol 1e-5;
- bf16 output vs fp64 on the same (bf16-rounded) inputs: rtol 1e-2, atol 1e-2 (one bf16 rounding of O(1) values).
"""

from __future__ import annotations

import math

import pytest
import torch
from msa.core.reference import (
    dense_attention_reference,
    fmha_reference,
    max_score_reference,
)

F64 = dict(rtol=1e-10, atol=1e-10)
F32 = dict(rtol=1e-5, atol=1e-5)
BF16 = dict(rtol=1e-2, atol=1e-2)


def make_inputs(qo_lens, kv_lens, hq, hkv, d_qk, d_v=None, *, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    d_v = d_v or d_qk
    q = torch.randn(sum(qo_lens), hq, d_qk, generator=g, dtype=torch.float64)
    k = torch.randn(sum(kv_lens), hkv, d_qk, generator=g, dtype=torch.float64)
    v = torch.randn(sum(kv_lens), hkv, d_v, generator=g, dtype=torch.float64)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def to_paged(t, kv_lens, page_size, *, seed=0, spare_pages=3):
    """Scatter ragged ``[total_kv, H, D]`` into a shuffled page pool; unused slots hold random junk."""
    g = torch.Generator().manual_seed(seed + 1)
    n_pages = [math.ceil(n / page_size) for n in kv_lens]
    total = sum(n_pages) + spare_pages
    perm = torch.randperm(total, generator=g)[: sum(n_pages)]  # drawn first: same table for k and v
    pool = torch.randn(total, t.shape[1], page_size, t.shape[2], generator=g, dtype=torch.float64).to(t.dtype)
    start, p = 0, 0
    for n, np_ in zip(kv_lens, n_pages):
        for i in range(np_):
            chunk = t[start + i * page_size : start + min(n, (i + 1) * page_size)]
            pool[perm[p], :, : chunk.shape[0]] = chunk.transpose(0, 1)
            p += 1
        start += n
    return pool, perm.to(torch.int32)


def assert_same(a, b, **tol):
    """Allclose that also demands identical -inf positions (max_score / lse)."""
    assert a.shape == b.shape
    a64, b64 = a.double(), b.double()
    assert torch.equal(torch.isneginf(a64), torch.isneginf(b64)), "-inf positions differ"
    fin = torch.isfinite(b64)
    assert torch.isfinite(a64[fin]).all()
    torch.testing.assert_close(a64[fin], b64[fin], **tol)


def run_both(q, k, v, qo, kv, **kw):
    got = fmha_reference(
        q, k, v, qo_lens=qo, kv_lens=kv, output_maxscore=True, return_lse=True, compute_dtype=torch.float64, **kw
    )
    ref = dense_attention_reference(
        q, k, v, qo_lens=qo, kv_lens=kv, **{n: x for n, x in kw.items() if n not in ("q_chunk", "kv_chunk")}
    )
    return got, ref


CASES = [  # qo_lens, kv_lens: prefill, chunked prefill, decode, zero-length, qo > kv
    ([37, 1, 0, 150], [300, 129, 5, 150]),
    ([3, 200], [0, 260]),
]


@pytest.mark.parametrize("hq,hkv", [(4, 4), (8, 2), (16, 1)])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("case", CASES)
def test_matches_dense_oracle_gqa(hq, hkv, causal, case):
    qo, kv = case
    q, k, v = make_inputs(qo, kv, hq, hkv, 16, 24, seed=hq + causal)
    (o, ms, lse), (o_r, ms_r, lse_r) = run_both(q, k, v, qo, kv, causal=causal, q_chunk=13, kv_chunk=128)
    assert_same(o, o_r, **F64)
    assert_same(ms, ms_r, **F64)
    assert_same(lse, lse_r, **F64)
    assert ms.shape == (hq, 128, sum(qo))  # ceil(ceil(300/128)/128)*128


def test_chunking_does_not_change_result():
    qo, kv = [70, 513], [900, 513]
    q, k, v = make_inputs(qo, kv, 8, 2, 32, seed=3)
    base = fmha_reference(
        q, k, v, qo_lens=qo, kv_lens=kv, output_maxscore=True, return_lse=True, compute_dtype=torch.float64
    )
    for q_chunk, kv_chunk in [(1, 128), (7, 256), (64, 384), (1024, 1024)]:
        got = fmha_reference(
            q,
            k,
            v,
            qo_lens=qo,
            kv_lens=kv,
            output_maxscore=True,
            return_lse=True,
            compute_dtype=torch.float64,
            q_chunk=q_chunk,
            kv_chunk=kv_chunk,
        )
        for a, b in zip(got, base):
            assert_same(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("page_size", [16, 64, 128, 256])
def test_paged_equals_ragged_with_shuffled_pages(page_size):
    qo, kv = [20, 0, 130], [333, 7, 130]
    q, k, v = make_inputs(qo, kv, 8, 2, 32, 16, seed=page_size)
    kp, idx = to_paged(k, kv, page_size, seed=page_size)
    vp, idx_v = to_paged(v, kv, page_size, seed=page_size)
    assert torch.equal(idx, idx_v)
    ragged = fmha_reference(
        q, k, v, qo_lens=qo, kv_lens=kv, output_maxscore=True, return_lse=True, compute_dtype=torch.float64
    )
    paged = fmha_reference(
        q,
        kp,
        vp,
        qo_lens=qo,
        kv_lens=kv,
        page_size=page_size,
        kv_indices=idx,
        output_maxscore=True,
        return_lse=True,
        compute_dtype=torch.float64,
    )
    for a, b in zip(paged, ragged):
        assert_same(a, b, rtol=1e-13, atol=1e-13)


def test_causal_offsets_and_rows_that_see_nothing():
    qo, kv = [6, 5, 4], [10, 3, 200]
    offsets = [-3, 0, 150]  # first 3 queries of request 0 see nothing; request 2 sees a partial window
    q, k, v = make_inputs(qo, kv, 4, 2, 8, seed=11)
    (o, ms, lse), (o_r, ms_r, lse_r) = run_both(q, k, v, qo, kv, qo_offset=offsets)
    assert_same(o, o_r, **F64)
    assert_same(ms, ms_r, **F64)
    assert_same(lse, lse_r, **F64)
    assert torch.equal(o[:3], torch.zeros_like(o[:3]))
    assert torch.isneginf(lse[:3]).all() and torch.isneginf(ms[:, :, :3]).all()
    assert torch.isfinite(lse[3:]).all()
    # request 2, query i sees keys 0..150+i: tile 1 (keys 128..255) is partially visible, tile 2 hidden
    r2 = slice(11, 15)
    assert torch.isfinite(ms[:, 1, r2]).all() and torch.isneginf(ms[:, 2:, r2]).all()


def test_qo_longer_than_kv_default_offset():
    qo, kv = [9], [4]  # default offset -5: queries 0..4 see nothing
    q, k, v = make_inputs(qo, kv, 2, 1, 8, seed=2)
    (o, ms, lse), (o_r, ms_r, lse_r) = run_both(q, k, v, qo, kv)
    assert_same(o, o_r, **F64)
    assert_same(lse, lse_r, **F64)
    assert torch.isneginf(lse[:5]).all() and torch.isfinite(lse[5:]).all()
    assert torch.equal(o[:5], torch.zeros_like(o[:5]))


def test_zero_kv_and_empty_batch():
    q, k, v = make_inputs([3], [0], 4, 2, 8)
    o, ms, lse = fmha_reference(q, k, v, qo_lens=[3], kv_lens=[0], output_maxscore=True, return_lse=True)
    assert torch.equal(o, torch.zeros_like(o)) and torch.isneginf(lse).all() and ms.shape == (4, 0, 3)
    q, k, v = make_inputs([], [], 4, 2, 8)
    o, ms, lse = fmha_reference(q, k, v, qo_lens=[], kv_lens=[], output_maxscore=True, return_lse=True)
    assert o.shape == (0, 4, 8) and ms.shape == (4, 0, 0) and lse.shape == (0, 4)


def test_head_dims_differ():
    qo, kv = [17, 40], [17, 300]
    q, k, v = make_inputs(qo, kv, 4, 1, 48, 80, seed=5)
    (o, ms, lse), (o_r, ms_r, lse_r) = run_both(q, k, v, qo, kv)
    assert o.shape == (57, 4, 80)
    assert_same(o, o_r, **F64)


def test_per_head_scales_equal_prescaled_inputs():
    """Scales folded by hand into q/k/v/out must give the same answer (independent of the oracle's scaling)."""
    qo, kv = [30, 9], [200, 9]
    hq, hkv = 8, 2
    q, k, v = make_inputs(qo, kv, hq, hkv, 16, seed=7)
    g = torch.Generator().manual_seed(9)
    qs, os_ = (
        torch.rand(hq, generator=g, dtype=torch.float64) + 0.5,
        torch.rand(hq, generator=g, dtype=torch.float64) + 0.5,
    )
    ks, vs = (
        torch.rand(hkv, generator=g, dtype=torch.float64) + 0.5,
        torch.rand(hkv, generator=g, dtype=torch.float64) + 0.5,
    )
    sm = 0.37
    kw = dict(qo_lens=qo, kv_lens=kv, output_maxscore=True, return_lse=True, compute_dtype=torch.float64)
    o, ms, lse = fmha_reference(q, k, v, sm_scale=sm, q_scale=qs, k_scale=ks, v_scale=vs, o_scale=os_, **kw)
    o2, ms2, lse2 = fmha_reference(
        q * qs.view(1, hq, 1) * sm, k * ks.view(1, hkv, 1), v * vs.view(1, hkv, 1), sm_scale=1.0, **kw
    )
    assert_same(o, o2 * os_.view(1, hq, 1), **F64)
    assert_same(ms, ms2, **F64)
    assert_same(lse, lse2, **F64)
    (o3, _, _), (o_r, _, _) = run_both(q, k, v, qo, kv, sm_scale=sm, q_scale=qs, k_scale=ks, v_scale=vs, o_scale=os_)
    assert_same(o3, o_r, **F64)
    # per-tensor float scales broadcast like a constant per-head tensor
    o4, _, _ = fmha_reference(q, k, v, q_scale=1.5, k_scale=0.75, **kw)
    o5, _, _ = fmha_reference(
        q,
        k,
        v,
        q_scale=torch.full((hq,), 1.5, dtype=torch.float64),
        k_scale=torch.full((hkv,), 0.75, dtype=torch.float64),
        **kw,
    )
    assert_same(o4, o5, **F64)


def test_max_score_matches_explicit_python_logits():
    """Tiny case: every max_score entry recomputed with Python loops over dot products."""
    qo, kv = [3, 2], [260, 2]
    hq, hkv, d = 4, 2, 4
    q, k, _ = make_inputs(qo, kv, hq, hkv, d, seed=13)
    sm = 0.5
    offsets = [257, 0]
    ms = max_score_reference(q, k, qo_lens=qo, kv_lens=kv, sm_scale=sm, qo_offset=offsets, compute_dtype=torch.float64)
    assert ms.shape == (hq, 128, 5)
    expect = torch.full_like(ms, float("-inf"))
    q_base, k_base = 0, 0
    for ql, kl, off in zip(qo, kv, offsets):
        for i in range(ql):
            for h in range(hq):
                for j in range(min(kl, i + off + 1)):
                    logit = sum(float(q[q_base + i, h, c]) * float(k[k_base + j, h // 2, c]) for c in range(d)) * sm
                    t = j // 128
                    expect[h, t, q_base + i] = max(float(expect[h, t, q_base + i]), logit)
        q_base += ql
        k_base += kl
    assert_same(ms, expect, **F64)


def test_sparse_with_every_block_equals_dense():
    qo, kv = [50, 3], [500, 260]
    hq, hkv = 8, 2
    q, k, v = make_inputs(qo, kv, hq, hkv, 16, seed=17)
    n_blocks = [math.ceil(n / 128) for n in kv]
    width = max(n_blocks) + 2  # -1 tail padding
    idx = torch.full((sum(qo), hkv, width), -1, dtype=torch.int32)
    row = 0
    for ql, nb in zip(qo, n_blocks):
        idx[row : row + ql, :, :nb] = torch.arange(nb, dtype=torch.int32)
        row += ql
    kw = dict(qo_lens=qo, kv_lens=kv, output_maxscore=True, return_lse=True, compute_dtype=torch.float64)
    dense = fmha_reference(q, k, v, **kw)
    sparse = fmha_reference(q, k, v, kv_block_indexes=idx, kv_chunk=256, **kw)
    for a, b in zip(sparse, dense):
        assert_same(a, b, **F64)


def random_block_indexes(qo, kv, hkv, width, *, seed, drop_all_for_first=False):
    g = torch.Generator().manual_seed(seed)
    rows = []
    for ql, kl in zip(qo, kv):
        nb = math.ceil(kl / 128)
        for _ in range(ql):
            for _h in range(hkv):
                n = int(torch.randint(0, min(nb, width) + 1, (1,), generator=g))
                chosen = torch.randperm(nb, generator=g)[:n].sort().values.tolist()
                rows.append(chosen + [-1] * (width - n))
    idx = torch.tensor(rows, dtype=torch.int32).view(sum(qo), hkv, width)
    if drop_all_for_first:
        idx[0] = -1
    return idx


@pytest.mark.parametrize("causal", [True, False])
def test_sparse_subset_matches_oracle(causal):
    qo, kv = [40, 5], [700, 300]
    hq, hkv = 8, 2
    q, k, v = make_inputs(qo, kv, hq, hkv, 16, 8, seed=19)
    idx = random_block_indexes(qo, kv, hkv, 4, seed=19, drop_all_for_first=True)
    (o, ms, lse), (o_r, ms_r, lse_r) = run_both(
        q, k, v, qo, kv, causal=causal, kv_block_indexes=idx, q_chunk=9, kv_chunk=256
    )
    assert_same(o, o_r, **F64)
    assert_same(ms, ms_r, **F64)
    assert_same(lse, lse_r, **F64)
    assert torch.equal(o[0], torch.zeros_like(o[0])) and torch.isneginf(lse[0]).all()


def test_sparse_token_attends_only_to_its_blocks():
    """Independent check: a token's sparse output equals dense attention over the gathered selected keys."""
    qo, kv = [1], [600]
    q, k, v = make_inputs(qo, kv, 2, 1, 16, seed=23)
    idx = torch.tensor([[[0, 2, 4, -1]]], dtype=torch.int32)
    o, _, lse = fmha_reference(
        q, k, v, qo_lens=qo, kv_lens=kv, kv_block_indexes=idx, return_lse=True, compute_dtype=torch.float64
    )
    keys = torch.cat([torch.arange(0, 128), torch.arange(256, 384), torch.arange(512, 600)])
    o2, _, lse2 = fmha_reference(
        q, k[keys], v[keys], qo_lens=qo, kv_lens=[len(keys)], causal=False, return_lse=True, compute_dtype=torch.float64
    )
    assert_same(o, o2, **F64)
    assert_same(lse, lse2, **F64)


def test_fp32_compute_within_bound_of_fp64():
    qo, kv = [64, 200], [1000, 200]
    q, k, v = make_inputs(qo, kv, 8, 2, 64, seed=29)
    kw = dict(qo_lens=qo, kv_lens=kv, output_maxscore=True, return_lse=True)
    o32 = fmha_reference(q.float(), k.float(), v.float(), **kw)
    o64 = fmha_reference(q, k, v, compute_dtype=torch.float64, **kw)
    assert o32[0].dtype == torch.float32 and o32[1].dtype == torch.float32 and o32[2].dtype == torch.float32
    for a, b in zip(o32, o64):
        assert_same(a, b, **F32)


def test_bf16_inputs_give_bf16_output_within_bound():
    qo, kv = [33, 128], [400, 128]
    q, k, v = make_inputs(qo, kv, 4, 4, 32, dtype=torch.bfloat16, seed=31)
    o, ms, lse = fmha_reference(q, k, v, qo_lens=qo, kv_lens=kv, output_maxscore=True, return_lse=True)
    assert o.dtype == torch.bfloat16
    o_r, ms_r, lse_r = dense_attention_reference(q, k, v, qo_lens=qo, kv_lens=kv)
    assert_same(o, o_r, **BF16)
    assert_same(ms, ms_r, **F32)
    assert_same(lse, lse_r, **F32)


def test_fp8_inputs_are_upcast_and_output_bf16():
    qo, kv = [20], [300]
    q, k, v = make_inputs(qo, kv, 4, 2, 32, seed=37)
    q8, k8, v8 = (t.to(torch.float8_e4m3fn) for t in (q, k, v))
    o, ms, lse = fmha_reference(
        q8,
        k8,
        v8,
        qo_lens=qo,
        kv_lens=kv,
        q_scale=0.5,
        k_scale=2.0,
        v_scale=0.25,
        output_maxscore=True,
        return_lse=True,
    )
    assert o.dtype == torch.bfloat16
    o_r, ms_r, lse_r = dense_attention_reference(
        q8.double(), k8.double(), v8.double(), qo_lens=qo, kv_lens=kv, q_scale=0.5, k_scale=2.0, v_scale=0.25
    )
    assert_same(o, o_r, **BF16)
    assert_same(ms, ms_r, **F32)
    assert_same(lse, lse_r, **F32)


def test_score_only_pass_equals_full_pass_max_score():
    qo, kv = [25, 130], [900, 130]
    q, k, v = make_inputs(qo, kv, 4, 1, 16, seed=41)
    _, ms_full, _ = fmha_reference(q, k, v, qo_lens=qo, kv_lens=kv, output_maxscore=True, compute_dtype=torch.float64)
    ms = max_score_reference(q, k, qo_lens=qo, kv_lens=kv, compute_dtype=torch.float64)
    assert torch.equal(ms, ms_full)
    out, ms2, lse = fmha_reference(q, k, None, qo_lens=qo, kv_lens=kv, output_o=False, output_maxscore=True)
    assert out is None and lse is None and ms2.shape == ms.shape


def test_writes_into_preallocated_poisoned_buffers():
    qo, kv = [10, 0, 7], [300, 4, 0]
    q, k, v = make_inputs(qo, kv, 4, 2, 16, dtype=torch.float32, seed=43)
    out = torch.full((17, 4, 16), float("nan"))
    ms = torch.full((4, 128, 17), float("nan"))
    o, m, _ = fmha_reference(q, k, v, qo_lens=qo, kv_lens=kv, output_maxscore=True, out=out, max_score=ms)
    assert o is out and m is ms
    assert not torch.isnan(out).any() and not torch.isnan(ms).any()
    o2, m2, _ = fmha_reference(q, k, v, qo_lens=qo, kv_lens=kv, output_maxscore=True)
    assert torch.equal(out, o2) and torch.equal(ms, m2)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(output_o=False), "^output_o"),
        (dict(return_lse=True, output_o=False, output_maxscore=True), "^return_lse"),
        (dict(kv_chunk=100), "^kv_chunk"),
        (dict(num_kv_heads=3), "^num_kv_heads"),
        (dict(max_k_tiles=1, output_maxscore=True), "^max_k_tiles"),
    ],
)
def test_reference_rejects_bad_options(kwargs, match):
    q, k, v = make_inputs([4], [200], 4, 2, 8)
    with pytest.raises(ValueError, match=match):
        fmha_reference(q, k, v, qo_lens=[4], kv_lens=[200], **kwargs)


def test_reference_rejects_inconsistent_lengths():
    q, k, v = make_inputs([4], [20], 4, 2, 8)
    with pytest.raises(ValueError, match="^q:"):
        fmha_reference(q, k, v, qo_lens=[5], kv_lens=[20])
    with pytest.raises(ValueError, match="^k:"):
        fmha_reference(q, k, v, qo_lens=[4], kv_lens=[21])
    with pytest.raises(ValueError, match=r"^qo_lens\[0\]"):
        fmha_reference(q, k, v, qo_lens=[-4], kv_lens=[20])
    kp, idx = to_paged(k, [20], 16)
    with pytest.raises(ValueError, match="^kv_page_indptr"):
        fmha_reference(
            q,
            kp,
            to_paged(v, [20], 16)[0],
            qo_lens=[4],
            kv_lens=[20],
            page_size=16,
            kv_indices=idx,
            kv_page_indptr=[0, 1],
        )


def test_16k_tokens_memory_bounded_spot_check():
    """16K-token causal prefill on the CPU; a few rows checked against a direct per-row softmax."""
    s, hq, hkv, d = 16384, 4, 1, 64
    q, k, v = make_inputs([s], [s], hq, hkv, d, dtype=torch.bfloat16, seed=47)
    o, ms, lse = fmha_reference(q, k, v, qo_lens=[s], kv_lens=[s], output_maxscore=True, return_lse=True)
    for i in (0, 4097, s - 1):
        for h in (0, hq - 1):
            logits = (k[: i + 1, 0].double() @ q[i, h].double()) / math.sqrt(d)
            p = torch.softmax(logits, 0)
            torch.testing.assert_close(o[i, h].double(), p @ v[: i + 1, 0].double(), **BF16)
            torch.testing.assert_close(lse[i, h].double(), torch.logsumexp(logits, 0), **F32)
            torch.testing.assert_close(ms[h, i // 128, i].double(), logits[(i // 128) * 128 :].max(), **F32)
