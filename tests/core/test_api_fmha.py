"""Public msa.core.fmha_plan / fmha: results, plan contents, and a bad-input test for every argument class.

CPU tests run the reference backend; ``@pytest.mark.gpu`` tests run the same checks on CUDA through the public API
(the kernel when one is registered, else the reference) against an fp64 CPU reference.
Bounds: bf16 output vs fp64 reference rtol/atol 1e-2; fp32 max_score/lse: rtol/atol 1e-5 (reference backend),
2e-3 (kernel: bf16 tensor-core products with fp32 accumulation, different summation order).
"""

from __future__ import annotations

import math

import pytest
import torch
from msa.core import KernelUnavailableError, fmha, fmha_plan
from msa.core.api import FmhaPlan
from msa.core.reference import fmha_reference

BF16 = dict(rtol=1e-2, atol=1e-2)
F32 = dict(rtol=1e-5, atol=1e-5)
KERNEL_F32 = dict(rtol=2e-3, atol=2e-3)


def make_inputs(qo_lens, kv_lens, hq, hkv, d, d_v=None, *, dtype=torch.bfloat16, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    d_v = d_v or d
    q = torch.randn(sum(qo_lens), hq, d, generator=g)
    k = torch.randn(sum(kv_lens), hkv, d, generator=g)
    v = torch.randn(sum(kv_lens), hkv, d_v, generator=g)
    return tuple(t.to(dtype).to(device) for t in (q, k, v))


def to_paged(t, kv_lens, page_size, *, seed=0):
    g = torch.Generator().manual_seed(seed + 1)
    n_pages = [math.ceil(n / page_size) for n in kv_lens]
    total = sum(n_pages) + 2
    perm = torch.randperm(total, generator=g)[: sum(n_pages)]
    pool = torch.randn(total, t.shape[1], page_size, t.shape[2], generator=g).to(t.dtype).to(t.device)
    start, p = 0, 0
    for n, np_ in zip(kv_lens, n_pages):
        for i in range(np_):
            chunk = t[start + i * page_size : start + min(n, (i + 1) * page_size)]
            pool[int(perm[p]), :, : chunk.shape[0]] = chunk.transpose(0, 1)
            p += 1
        start += n
    return pool, perm.to(torch.int32).to(t.device)


def random_block_indexes(qo, kv, hkv, width, *, seed):
    g = torch.Generator().manual_seed(seed)
    rows = []
    for ql, kl in zip(qo, kv):
        nb = math.ceil(kl / 128)
        for _ in range(ql * hkv):
            n = int(torch.randint(0, min(nb, width) + 1, (1,), generator=g))
            rows.append(torch.randperm(nb, generator=g)[:n].sort().values.tolist() + [-1] * (width - n))
    return torch.tensor(rows, dtype=torch.int32).view(sum(qo), hkv, width)


def assert_same(a, b, **tol):
    a64, b64 = a.double().cpu(), b.double().cpu()
    assert a64.shape == b64.shape
    assert torch.equal(torch.isneginf(a64), torch.isneginf(b64)), "-inf positions differ"
    fin = torch.isfinite(b64)
    assert torch.isfinite(a64[fin]).all()
    torch.testing.assert_close(a64[fin], b64[fin], **tol)


def reference64(q, k, v, plan, **kw):
    """fp64 CPU reference for the same call (inputs already rounded to their dtype)."""
    cpu = lambda t: None if t is None else t.cpu()  # noqa: E731
    return fmha_reference(
        cpu(q),
        cpu(k),
        cpu(v),
        qo_lens=plan.qo_lens,
        kv_lens=plan.kv_lens,
        page_size=plan.page_size,
        causal=plan.causal,
        qo_offset=plan.qo_offset_host if plan.causal else None,
        compute_dtype=torch.float64,
        max_k_tiles=plan.max_k_tiles,
        **{n: (cpu(x) if isinstance(x, torch.Tensor) else x) for n, x in kw.items()},
    )


# ----------------------------------------------------------------------------------------------- plan


def test_plan_contents():
    plan = fmha_plan([3, 0, 200], torch.tensor([10, 5, 300]), 8, 2, page_size=64, output_maxscore=True)
    assert isinstance(plan, FmhaPlan)
    assert (plan.batch, plan.total_q, plan.total_kv, plan.max_qo_len, plan.max_kv_len) == (3, 203, 315, 200, 300)
    assert plan.qo_offset_host == [7, 5, 100]
    assert plan.num_pages == 1 + 1 + 5 and plan.max_k_tiles == 128
    assert plan.qo_indptr.tolist() == [0, 3, 3, 203] and plan.kv_indptr.tolist() == [0, 10, 15, 315]
    assert plan.kv_page_indptr.tolist() == [0, 1, 2, 7] and plan.qo_offset.tolist() == [7, 5, 100]
    for t in (plan.qo_indptr, plan.kv_indptr, plan.kv_page_indptr, plan.qo_offset):
        assert t.dtype == torch.int32 and t.device == plan.device
    assert plan.kernel == {}
    ragged = fmha_plan([4], [4], 4, causal=False)
    assert ragged.num_kv_heads == 4 and ragged.kv_page_indptr is None and ragged.qo_offset_host == [4]
    assert fmha_plan([4, 2], [9, 9], 2, qo_offset=1).qo_offset_host == [1, 1]
    assert fmha_plan([], [], 2).max_k_tiles == 0
    assert fmha_plan([1], [128 * 128 + 1], 2).max_k_tiles == 256


@pytest.mark.parametrize(
    "args,kwargs,exc,match",
    [
        (([1, -2], [3, 3], 4), {}, ValueError, r"^qo_lens\[1\]"),
        (([1, 2], [3], 4), {}, ValueError, "^kv_lens"),
        (([1], [3.5], 4), {}, TypeError, r"^kv_lens\[0\]"),
        ((torch.tensor([1.0]), [3], 4), {}, TypeError, "^qo_lens"),
        ((torch.tensor([[1]]), [3], 4), {}, ValueError, "^qo_lens"),
        (("12", [3], 4), {}, TypeError, "^qo_lens"),
        (([1], [3], 0), {}, ValueError, "^num_qo_heads"),
        (([1], [3], 8, 3), {}, ValueError, "^num_kv_heads"),
        (([1], [3], 8, 2.0), {}, TypeError, "^num_kv_heads"),
        (([1], [3], 8), dict(page_size=48), ValueError, "^page_size"),
        (([1], [3], 8), dict(page_size=512), ValueError, "^page_size"),
        (([1], [3], 8), dict(causal=1), TypeError, "^causal"),
        (([1], [3], 8), dict(output_maxscore="yes"), TypeError, "^output_maxscore"),
        (([1], [3], 8), dict(kv_block_num=0), ValueError, "^kv_block_num"),
        (([2], [3], 8), dict(qo_offset=4), ValueError, r"^qo_offset\[0\]"),
        (([2], [3], 8), dict(qo_offset=-3), ValueError, r"^qo_offset\[0\]"),
        (([2, 1], [3, 3], 8), dict(qo_offset=[1]), ValueError, "^qo_offset"),
        (([2], [3], 8), dict(qo_offset=1, causal=False), ValueError, "^qo_offset"),
        (([2], [3], 8), dict(device=3.0), TypeError, "^device"),
    ],
)
def test_plan_rejects_bad_arguments(args, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        fmha_plan(*args, **kwargs)


# -------------------------------------------------------------------------------------------- results


@pytest.mark.parametrize("hq,hkv", [(4, 4), (8, 2), (16, 1)])
@pytest.mark.parametrize("causal", [True, False])
def test_ragged_matches_reference(hq, hkv, causal):
    qo, kv = [20, 1, 0, 140], [300, 129, 3, 140]
    q, k, v = make_inputs(qo, kv, hq, hkv, 32, 16, seed=hq)
    plan = fmha_plan(qo, kv, hq, hkv, causal=causal, output_maxscore=True)
    out, ms, lse = fmha(q, k, v, plan, output_maxscore=True, return_lse=True)
    o_r, ms_r, lse_r = reference64(q, k, v, plan, output_maxscore=True, return_lse=True)
    assert out.dtype == torch.bfloat16 and ms.dtype == torch.float32 and lse.dtype == torch.float32
    assert_same(out, o_r, **BF16)
    assert_same(ms, ms_r, **F32)
    assert_same(lse, lse_r, **F32)
    two = fmha(q, k, v, plan)
    assert len(two) == 2 and two[1] is None
    assert torch.equal(two[0], out)


@pytest.mark.parametrize("page_size", [16, 128, 256])
def test_paged_equals_ragged(page_size):
    qo, kv = [9, 130], [400, 130]
    q, k, v = make_inputs(qo, kv, 8, 2, 32, seed=page_size)
    kp, idx = to_paged(k, kv, page_size, seed=page_size)
    vp, _ = to_paged(v, kv, page_size, seed=page_size)
    ragged = fmha(q, k, v, fmha_plan(qo, kv, 8, 2, output_maxscore=True), output_maxscore=True, return_lse=True)
    plan = fmha_plan(qo, kv, 8, 2, page_size=page_size, output_maxscore=True)
    paged = fmha(q, kp, vp, plan, kv_indices=idx, output_maxscore=True, return_lse=True, validate=True)
    assert_same(paged[0], ragged[0], rtol=0, atol=8e-3)  # at most one bf16 ulp apart at |x| < 2
    assert_same(paged[1], ragged[1], **F32)
    assert_same(paged[2], ragged[2], **F32)


def test_sparse_and_offsets_match_reference():
    qo, kv = [30, 4], [700, 260]
    q, k, v = make_inputs(qo, kv, 8, 2, 32, seed=5)
    idx = random_block_indexes(qo, kv, 2, 4, seed=5)
    plan = fmha_plan(qo, kv, 8, 2, qo_offset=[600, 100], kv_block_num=4, output_maxscore=True)
    out, ms, lse = fmha(q, k, v, plan, kv_block_indexes=idx, output_maxscore=True, return_lse=True, validate=True)
    o_r, ms_r, lse_r = reference64(q, k, v, plan, kv_block_indexes=idx, output_maxscore=True, return_lse=True)
    assert_same(out, o_r, **BF16)
    assert_same(ms, ms_r, **F32)
    assert_same(lse, lse_r, **F32)


def test_fp8_and_per_head_scales():
    qo, kv = [12], [300]
    q, k, v = make_inputs(qo, kv, 8, 2, 32, dtype=torch.float8_e4m3fn, seed=7)
    g = torch.Generator().manual_seed(1)
    scales = dict(
        q_scale=torch.rand(8, generator=g) + 0.5,
        k_scale=torch.rand(2, generator=g) + 0.5,
        v_scale=0.5,
        o_scale=torch.rand(8, generator=g) + 0.5,
        sm_scale=0.1,
    )
    plan = fmha_plan(qo, kv, 8, 2)
    out, _, lse = fmha(q, k, v, plan, return_lse=True, **scales)
    assert out.dtype == torch.bfloat16
    o_r, _, lse_r = reference64(q, k, v, plan, return_lse=True, **scales)
    assert_same(out, o_r, **BF16)
    assert_same(lse, lse_r, **F32)


def test_score_only_pass_without_v():
    qo, kv = [5, 40], [5, 300]
    q, k, _ = make_inputs(qo, kv, 4, 1, 16, dtype=torch.float16)
    plan = fmha_plan(qo, kv, 4, 1, output_maxscore=True)
    out, ms = fmha(q, k, None, plan, output_o=False, output_maxscore=True)
    assert out is None and ms.shape == (4, 128, 45)
    _, ms_r, _ = reference64(q, k, None, plan, output_o=False, output_maxscore=True)
    assert_same(ms, ms_r, **F32)


def test_writes_into_given_buffers_and_max_score_implies_output():
    qo, kv = [7, 0, 3], [200, 9, 0]
    q, k, v = make_inputs(qo, kv, 4, 2, 16, seed=3)
    plan = fmha_plan(qo, kv, 4, 2, output_maxscore=True)
    out = torch.full((10, 4, 16), float("nan"), dtype=torch.bfloat16)
    ms = torch.full((4, 128, 10), float("nan"))
    o, m = fmha(q, k, v, plan, out=out, max_score=ms)
    assert o is out and m is ms
    assert not out.isnan().any() and not ms.isnan().any()
    assert torch.equal(out[7:], torch.zeros_like(out[7:])) and torch.isneginf(ms[:, :, 7:]).all()
    o2, m2 = fmha(q, k, v, plan, output_maxscore=True)
    assert torch.equal(o2, out) and torch.equal(m2, ms)


def test_empty_batch_and_zero_length_sequences():
    q, k, v = make_inputs([], [], 4, 2, 16)
    plan = fmha_plan([], [], 4, 2, output_maxscore=True)
    out, ms, lse = fmha(q, k, v, plan, output_maxscore=True, return_lse=True, validate=True)
    assert out.shape == (0, 4, 16) and ms.shape == (4, 0, 0) and lse.shape == (0, 4)
    plan = fmha_plan([0, 0], [0, 0], 4, 2, page_size=128, kv_block_num=2)
    kp = torch.randn(1, 2, 128, 16).bfloat16()
    out, _ = fmha(
        q,
        kp,
        kp,
        plan,
        kv_indices=torch.empty(0, dtype=torch.int32),
        kv_block_indexes=torch.empty(0, 2, 2, dtype=torch.int32),
        validate=True,
    )
    assert out.shape == (0, 4, 16)
    q, k, v = make_inputs([3, 0], [0, 5], 4, 2, 16)
    out, _, lse = fmha(q, k, v, fmha_plan([3, 0], [0, 5], 4, 2), return_lse=True, validate=True)
    assert torch.equal(out, torch.zeros_like(out)) and torch.isneginf(lse).all()


def test_backend_selection_on_cpu(monkeypatch):
    q, k, v = make_inputs([2], [2], 2, 2, 8)
    plan = fmha_plan([2], [2], 2)
    with pytest.raises(KernelUnavailableError):
        fmha(q, k, v, plan, backend="kernel")
    with pytest.raises(ValueError, match="^backend"):
        fmha(q, k, v, plan, backend="fast")
    monkeypatch.setenv("MSA_BACKEND", "kernel")
    with pytest.raises(KernelUnavailableError):
        fmha(q, k, v, plan)
    assert fmha(q, k, v, plan, backend="reference")[0].shape == (2, 2, 8)


# ----------------------------------------------------------------------------------------- bad inputs


def _base(paged=False, sparse=False):
    qo, kv = [3, 5], [130, 5]
    q, k, v = make_inputs(qo, kv, 4, 2, 16, seed=9)
    args = dict(q=q, k=k, v=v)
    kw = {}
    if paged:
        args["k"], kw["kv_indices"] = to_paged(k, kv, 64)
        args["v"], _ = to_paged(v, kv, 64)
    if sparse:
        rows = [[0, 1]] * 3 + [[0, -1]] * 5  # request 0: 2 blocks (130 keys), request 1: 1 block
        kw["kv_block_indexes"] = torch.tensor(rows, dtype=torch.int32).view(8, 1, 2).expand(8, 2, 2).contiguous()
    plan = fmha_plan(
        qo, kv, 4, 2, page_size=64 if paged else None, kv_block_num=2 if sparse else None, output_maxscore=True
    )
    return args, plan, kw


def _call(args, plan, kw, **override):
    a = dict(args)
    k2 = dict(kw)
    for n, x in override.items():
        (a if n in a else k2)[n] = x
    return fmha(a.pop("q"), a.pop("k"), a.pop("v"), plan, **k2)


def test_base_calls_are_valid():
    for paged in (False, True):
        for sparse in (False, True):
            args, plan, kw = _base(paged, sparse)
            out, _ = _call(args, plan, kw, validate=True)
            assert out.shape == (8, 4, 16) and torch.isfinite(out.float()).all()


META = torch.device("meta")


@pytest.mark.parametrize(
    "paged,sparse,override,exc,match",
    [
        # q
        (False, False, lambda a: dict(q=a["q"].float()), TypeError, "^q:.*dtype"),
        (False, False, lambda a: dict(q=a["q"][:7]), ValueError, r"^q:.*shape \[8, 4, \*\]"),
        (False, False, lambda a: dict(q=a["q"].repeat(1, 2, 1)), ValueError, "^q:.*shape"),
        (
            False,
            False,
            lambda a: dict(q=a["q"].transpose(0, 1).contiguous().transpose(0, 1)),
            ValueError,
            "^q:.*contiguous",
        ),
        (False, False, lambda a: dict(q=a["q"].to(META)), ValueError, "^q:.*meta"),
        (False, False, lambda a: dict(q=3), TypeError, "^q:"),
        # k
        (False, False, lambda a: dict(k=a["k"].half()), TypeError, "^k:.*dtype"),
        (False, False, lambda a: dict(k=a["k"][:-1]), ValueError, "^k:.*ragged"),
        (False, False, lambda a: dict(k=a["k"][..., :8].contiguous()), ValueError, "^k:"),
        (False, False, lambda a: dict(k=a["k"].to(META)), ValueError, "^k:.*meta"),
        (
            False,
            False,
            lambda a: dict(k=a["k"].transpose(0, 1).contiguous().transpose(0, 1)),
            ValueError,
            "^k:.*contiguous",
        ),
        (True, False, lambda a: dict(k=a["k"][:, :, :32].contiguous()), ValueError, "^k:.*paged"),
        (True, False, lambda a: dict(k=a["k"][:, 0]), ValueError, "^k:.*paged"),
        # v
        (False, False, lambda a: dict(v=a["v"].half()), TypeError, "^v:.*dtype"),
        (False, False, lambda a: dict(v=a["v"][:-1]), ValueError, "^v:"),
        (False, False, lambda a: dict(v=None), TypeError, "^v:"),
        (False, False, lambda a: dict(v=a["v"].to(META)), ValueError, "^v:.*meta"),
        (True, False, lambda a: dict(v=a["v"][:-1]), ValueError, "^v:"),
        # kv_indices
        (True, False, lambda a: dict(kv_indices=None), TypeError, "^kv_indices"),
        (True, False, lambda a: dict(kv_indices=a["kv_indices"].long()), TypeError, "^kv_indices.*dtype"),
        (True, False, lambda a: dict(kv_indices=a["kv_indices"][:-1]), ValueError, "^kv_indices.*shape"),
        (True, False, lambda a: dict(kv_indices=a["kv_indices"].to(META)), ValueError, "^kv_indices.*meta"),
        (False, False, lambda a: dict(kv_indices=torch.zeros(3, dtype=torch.int32)), ValueError, "^kv_indices.*ragged"),
        (
            True,
            False,
            lambda a: dict(kv_indices=a["kv_indices"] + 100, validate=True),
            ValueError,
            r"^kv_indices\[0\].*page id",
        ),
        (True, False, lambda a: dict(kv_indices=a["kv_indices"] - 100, validate=True), ValueError, r"^kv_indices\[0\]"),
        # kv_block_indexes
        (
            False,
            False,
            lambda a: dict(kv_block_indexes=torch.zeros(8, 2, 2, dtype=torch.int32)),
            ValueError,
            "^kv_block_indexes.*kv_block_num",
        ),
        (False, True, lambda a: dict(kv_block_indexes=None), TypeError, "^kv_block_indexes"),
        (
            False,
            True,
            lambda a: dict(kv_block_indexes=a["kv_block_indexes"].long()),
            TypeError,
            "^kv_block_indexes.*dtype",
        ),
        (
            False,
            True,
            lambda a: dict(kv_block_indexes=a["kv_block_indexes"][:, :1].contiguous()),
            ValueError,
            "^kv_block_indexes.*shape",
        ),
        (
            False,
            True,
            lambda a: dict(kv_block_indexes=a["kv_block_indexes"].to(META)),
            ValueError,
            "^kv_block_indexes.*meta",
        ),
        (
            False,
            True,
            lambda a: dict(kv_block_indexes=a["kv_block_indexes"].flip(-1).contiguous(), validate=True),
            ValueError,
            "^kv_block_indexes.*(ascending|tail)",
        ),
        (
            False,
            True,
            lambda a: dict(kv_block_indexes=_edit(a["kv_block_indexes"], (0, 0), [1, 0]), validate=True),
            ValueError,
            r"^kv_block_indexes\[0, 0, 1\].*ascending",
        ),
        (
            False,
            True,
            lambda a: dict(kv_block_indexes=_edit(a["kv_block_indexes"], (0, 1), [1, 1]), validate=True),
            ValueError,
            r"^kv_block_indexes\[0, 1, 1\].*ascending",
        ),
        (
            False,
            True,
            lambda a: dict(kv_block_indexes=_edit(a["kv_block_indexes"], (2, 0), [-1, 1]), validate=True),
            ValueError,
            r"^kv_block_indexes\[2, 0, 1\].*tail",
        ),
        (
            False,
            True,
            lambda a: dict(kv_block_indexes=_edit(a["kv_block_indexes"], (4, 0), [0, 1]), validate=True),
            ValueError,
            r"^kv_block_indexes\[4, 0, 1\].*ceil\(kv_len/128\)",
        ),
        (
            False,
            True,
            lambda a: dict(kv_block_indexes=_edit(a["kv_block_indexes"], (1, 1), [0, 2]), validate=True),
            ValueError,
            r"^kv_block_indexes\[1, 1, 1\].*ceil",
        ),
        (
            False,
            True,
            lambda a: dict(kv_block_indexes=_edit(a["kv_block_indexes"], (0, 0), [-2, -1]), validate=True),
            ValueError,
            r"^kv_block_indexes\[0, 0, 0\].*>= 0",
        ),
        # out
        (False, False, lambda a: dict(out=torch.empty(8, 4, 16)), TypeError, "^out:.*dtype"),
        (False, False, lambda a: dict(out=torch.empty(8, 4, 8, dtype=torch.bfloat16)), ValueError, "^out:.*shape"),
        (
            False,
            False,
            lambda a: dict(out=torch.empty(8, 16, 4, dtype=torch.bfloat16).transpose(1, 2)),
            ValueError,
            "^out:.*contiguous",
        ),
        (
            False,
            False,
            lambda a: dict(out=torch.empty(8, 4, 16, dtype=torch.bfloat16, device=META)),
            ValueError,
            "^out:.*meta",
        ),
        (
            False,
            False,
            lambda a: dict(out=torch.empty(8, 4, 16, dtype=torch.bfloat16), output_o=False, output_maxscore=True),
            ValueError,
            "^out:.*output_o",
        ),
        # max_score
        (
            False,
            False,
            lambda a: dict(max_score=torch.empty(4, 128, 8, dtype=torch.bfloat16)),
            TypeError,
            "^max_score:.*dtype",
        ),
        (False, False, lambda a: dict(max_score=torch.empty(4, 2, 8)), ValueError, r"^max_score:.*\[4, 128, 8\]"),
        (False, False, lambda a: dict(max_score=torch.empty(4, 128, 8, device=META)), ValueError, "^max_score:.*meta"),
        # scales
        (False, False, lambda a: dict(q_scale=torch.ones(2)), ValueError, r"^q_scale:.*\[4\]"),
        (False, False, lambda a: dict(k_scale=torch.ones(4)), ValueError, r"^k_scale:.*\[2\]"),
        (False, False, lambda a: dict(v_scale=torch.ones(2, dtype=torch.int32)), TypeError, "^v_scale:.*floating"),
        (False, False, lambda a: dict(o_scale=torch.ones(4, device=META)), ValueError, "^o_scale:.*meta"),
        (False, False, lambda a: dict(o_scale=torch.ones(())), ValueError, "^o_scale:"),
        (False, False, lambda a: dict(q_scale=float("nan")), ValueError, "^q_scale:.*finite"),
        (False, False, lambda a: dict(k_scale="2"), TypeError, "^k_scale:"),
        (False, False, lambda a: dict(sm_scale=float("inf")), ValueError, "^sm_scale"),
        (False, False, lambda a: dict(sm_scale=torch.tensor(0.1)), TypeError, "^sm_scale"),
        # flags and plan
        (False, False, lambda a: dict(output_o=0), TypeError, "^output_o"),
        (False, False, lambda a: dict(output_o=False), ValueError, "^output_o"),
        (
            False,
            False,
            lambda a: dict(return_lse=True, output_o=False, output_maxscore=True),
            ValueError,
            "^return_lse",
        ),
        (False, False, lambda a: dict(return_lse="y"), TypeError, "^return_lse"),
        (False, False, lambda a: dict(backend="gpu"), ValueError, "^backend"),
    ],
)
def test_fmha_rejects_bad_arguments(paged, sparse, override, exc, match):
    args, plan, kw = _base(paged, sparse)
    with pytest.raises(exc, match=match):
        _call(args, plan, kw, **override({**args, **kw}))


def _edit(idx, where, values):
    idx = idx.clone()
    idx[where] = torch.tensor(values, dtype=idx.dtype)
    return idx


def test_fmha_rejects_bad_plan():
    args, plan, kw = _base()
    with pytest.raises(TypeError, match="^plan"):
        fmha(args["q"], args["k"], args["v"], {"plan": 1})
    plain = fmha_plan(plan.qo_lens, plan.kv_lens, 4, 2)
    with pytest.raises(ValueError, match="^output_maxscore"):
        fmha(args["q"], args["k"], args["v"], plain, output_maxscore=True)
    with pytest.raises(ValueError, match="^q:.*meta"):
        fmha(args["q"], args["k"], args["v"], fmha_plan(plan.qo_lens, plan.kv_lens, 4, 2, device="meta"))


def test_value_checks_follow_validate_flag(monkeypatch):
    args, plan, kw = _base(sparse=True)
    bad = _edit(kw["kv_block_indexes"], (0, 0), [1, 0])
    _call(args, plan, kw, kv_block_indexes=bad)  # default: no value checks (no host sync)
    with pytest.raises(ValueError, match="^kv_block_indexes"):
        _call(args, plan, kw, kv_block_indexes=bad, validate=True)
    monkeypatch.setenv("MSA_VALIDATE", "1")
    with pytest.raises(ValueError, match="^kv_block_indexes"):
        _call(args, plan, kw, kv_block_indexes=bad)
    _call(args, plan, kw, kv_block_indexes=bad, validate=False)


# ------------------------------------------------------------------------------------------------ GPU

GPU_CASES = [
    # qo_lens, kv_lens, hq, hkv, page_size
    ([1, 7, 300], [1000, 7, 300], 16, 16, None),
    ([1, 64, 513], [4097, 64, 513], 16, 4, 128),
    ([2, 1, 1000], [2000, 129, 1000], 16, 1, 128),
]


@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_CASES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float8_e4m3fn])
def test_gpu_fmha_matches_cpu_reference(case, dtype):
    qo, kv, hq, hkv, ps = case
    q, k, v = make_inputs(qo, kv, hq, hkv, 128, dtype=dtype, seed=hq + hkv, device="cuda")
    kw = {}
    if ps:
        k, kw["kv_indices"] = to_paged(k, kv, ps)
        v, _ = to_paged(v, kv, ps)
    scales = dict(q_scale=0.5, k_scale=1.5, v_scale=0.75, o_scale=2.0) if dtype != torch.bfloat16 else {}
    plan = fmha_plan(qo, kv, hq, hkv, page_size=ps, output_maxscore=True, device="cuda")
    out, ms, lse = fmha(q, k, v, plan, output_maxscore=True, return_lse=True, validate=True, **kw, **scales)
    o_r, ms_r, lse_r = reference64(q, k, v, plan, output_maxscore=True, return_lse=True, **kw, **scales)
    assert out.device.type == "cuda"
    assert_same(out, o_r, **BF16)
    assert_same(ms, ms_r, **KERNEL_F32)
    assert_same(lse, lse_r, **KERNEL_F32)
    out2, ms2 = fmha(q, k, None, plan, output_o=False, output_maxscore=True, **kw, **scales)
    assert out2 is None
    assert_same(ms2, ms_r, **KERNEL_F32)


@pytest.mark.gpu
def test_gpu_sparse_per_token_blocks():
    qo, kv = [1, 4, 600], [5000, 300, 2000]
    q, k, v = make_inputs(qo, kv, 16, 1, 128, seed=3, device="cuda")
    kp, idx = to_paged(k, kv, 128)
    vp, _ = to_paged(v, kv, 128)
    blocks = random_block_indexes(qo, kv, 1, 16, seed=3).cuda()
    plan = fmha_plan(qo, kv, 16, 1, page_size=128, kv_block_num=16, device="cuda")
    out, _, lse = fmha(q, kp, vp, plan, kv_indices=idx, kv_block_indexes=blocks, return_lse=True, validate=True)
    o_r, _, lse_r = reference64(q, kp, vp, plan, kv_indices=idx, kv_block_indexes=blocks, return_lse=True)
    assert_same(out, o_r, **BF16)
    assert_same(lse, lse_r, **KERNEL_F32)


@pytest.mark.gpu
@pytest.mark.slow
def test_gpu_reference_128k_tokens():
    """The reference itself must handle a 128K-token causal prefill on one GPU (memory-bounded chunking)."""
    s, hq, hkv, d = 131072, 8, 1, 128
    q, k, v = make_inputs([s], [s], hq, hkv, d, seed=1, device="cuda")
    out, ms, lse = fmha_reference(q, k, v, qo_lens=[s], kv_lens=[s], output_maxscore=True, return_lse=True)
    for i in (0, 77777, s - 1):
        logits = (k[: i + 1, 0].double() @ q[i, 3].double()) / math.sqrt(d)
        torch.testing.assert_close(out[i, 3].double(), torch.softmax(logits, 0) @ v[: i + 1, 0].double(), **BF16)
        torch.testing.assert_close(lse[i, 3].double(), torch.logsumexp(logits, 0), **F32)
        torch.testing.assert_close(ms[3, i // 128, i].double(), logits[(i // 128) * 128 :].max(), **F32)
