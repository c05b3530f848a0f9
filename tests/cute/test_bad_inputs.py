"""Every public msa.cute op rejects bad metadata with TypeError/ValueError naming the argument, and bad values
with validate=True; empty batches and zero-length sequences are valid and give empty / zero / -inf results."""

from __future__ import annotations

import pytest
import torch
from msa.cute import (
    SparseDecodePagedAttentionWrapper,
    build_k2q_csr,
    sparse_atten_func,
    sparse_decode_atten_func,
)

BLK = 16


def cu(lens):
    c = [0]
    for n in lens:
        c.append(c[-1] + n)
    return torch.tensor(c, dtype=torch.int32)


@pytest.fixture
def prefill():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(6, 4, 16, generator=g).bfloat16()
    k = torch.randn(40, 2, 16, generator=g).bfloat16()
    v = torch.randn(40, 2, 16, generator=g).bfloat16()
    q2k = torch.tensor([[[0, 1], [1, -1], [0, 2], [2, -1], [0, -1], [1, 2]]] * 2, dtype=torch.int32)
    cq, ck = cu([6]), cu([40])
    rp, qi = build_k2q_csr(q2k, cq, ck, BLK, total_k=40)
    kw = dict(cu_seqlens_q=cq, cu_seqlens_k=ck, max_seqlen_q=6, max_seqlen_k=40, blk_kv=BLK)
    return q, k, v, q2k, rp, qi, kw


def call(prefill, **over):
    q, k, v, _, rp, qi, kw = prefill
    args = dict(q=q, k=k, v=v, k2q_row_ptr=rp, k2q_q_indices=qi, topk=2)
    args.update({key: val for key, val in over.items() if key in args})
    kw = {**kw, **{key: val for key, val in over.items() if key not in args}}
    return sparse_atten_func(args["q"], args["k"], args["v"], args["k2q_row_ptr"], args["k2q_q_indices"],
                             args["topk"], **kw)


@pytest.mark.parametrize("over,exc,msg", [
    (dict(q=lambda p: p[0].float()), TypeError, "q: expected dtype"),
    (dict(k=lambda p: p[1].half()), TypeError, "k: expected dtype"),
    (dict(v=lambda p: p[2].half()), TypeError, "v: expected dtype"),
    (dict(q=lambda p: p[0][0]), ValueError, "q: expected 3 dimensions"),
    (dict(q=lambda p: p[0].to("meta")), ValueError, "q: expected a tensor on cpu or cuda"),
    (dict(q=lambda p: torch.randn(6, 4, 32).bfloat16()[..., ::2]), ValueError, "q: expected the last dimension"),
    (dict(k=lambda p: torch.randn(40, 3, 16).bfloat16(), v=lambda p: torch.randn(40, 3, 16).bfloat16()), ValueError,
     "k: expected a KV head count"),
    (dict(k=lambda p: torch.randn(40, 2, 8).bfloat16()), ValueError, "k: expected head dim 16"),
    (dict(topk=lambda p: 0), ValueError, "topk: expected >= 1"),
    (dict(topk=lambda p: 65), ValueError, "topk: expected <= 64"),
    (dict(topk=lambda p: 2.0), TypeError, "topk: expected an int"),
    (dict(k2q_row_ptr=lambda p: p[4].long()), TypeError, "k2q_row_ptr: expected dtype int32"),
    (dict(k2q_row_ptr=lambda p: p[4][:1]), ValueError, "k2q_row_ptr: expected shape"),
    (dict(k2q_q_indices=lambda p: p[5][:, :3].contiguous()), ValueError, "k2q_q_indices: expected shape"),
    (dict(k2q_q_indices=lambda p: torch.zeros(2, 24, dtype=torch.int32)[:, ::2]), ValueError,
     "k2q_q_indices: expected a contiguous"),
    (dict(cu_seqlens_q=lambda p: cu([6]).long()), TypeError, "cu_seqlens_q: expected dtype int32"),
    (dict(cu_seqlens_k=lambda p: cu([20, 20])), ValueError, "cu_seqlens_k: expected shape \\[2\\]"),
    (dict(cu_seqlens_q=lambda p: torch.tensor([0, 0, 6, 6], dtype=torch.int32)[::2]), ValueError,
     "cu_seqlens_q: expected a contiguous"),
    (dict(softmax_scale=lambda p: -1.0), ValueError, "softmax_scale"),
    (dict(lse_temperature_scale=lambda p: 0.0), ValueError, "lse_temperature_scale"),
    (dict(return_temperature_lse=lambda p: True), ValueError, "return_temperature_lse: requires"),
    (dict(partial_dtype=lambda p: torch.int8), TypeError, "partial_dtype"),
    (dict(page_table=lambda p: torch.zeros(1, 3, dtype=torch.int32)), ValueError, "page_table: only valid"),
    (dict(seqused_k=lambda p: torch.ones(2, dtype=torch.int32)), ValueError, "seqused_k: expected shape"),
    (dict(max_seqlen_k=lambda p: -1), ValueError, "max_seqlen_k"),
    (dict(blk_kv=lambda p: 0), ValueError, "blk_kv"),
])
def test_sparse_atten_func_metadata_errors(prefill, over, exc, msg):
    resolved = {key: f(prefill) for key, f in over.items()}
    with pytest.raises(exc, match=msg):
        call(prefill, **resolved)


def test_sparse_atten_func_paged_errors(prefill):
    q, _, _, _, rp, qi, kw = prefill
    kp = torch.randn(4, 2, BLK, 16).bfloat16()
    with pytest.raises(ValueError, match="page_table: required"):
        sparse_atten_func(q, kp, kp, rp, qi, 2, **kw)
    with pytest.raises(ValueError, match="k: expected page size == blk_kv"):
        sparse_atten_func(q, torch.randn(4, 2, 8, 16).bfloat16(), torch.randn(4, 2, 8, 16).bfloat16(), rp, qi, 2,
                          page_table=torch.zeros(1, 3, dtype=torch.int32), **kw)
    with pytest.raises(ValueError, match="page_table: expected at least"):
        sparse_atten_func(q, kp, kp, rp, qi, 2, page_table=torch.zeros(1, 2, dtype=torch.int32), **kw)
    with pytest.raises(ValueError, match="page_table: entry \\[0, 1\\] = 9"):
        sparse_atten_func(q, kp, kp, rp, qi, 2, page_table=torch.tensor([[0, 9, 1]], dtype=torch.int32),
                          validate=True, **kw)


def test_sparse_atten_func_value_errors(prefill):
    q, k, v, _, rp, qi, kw = prefill
    bad_rp = rp.clone()
    bad_rp[0, 1] = bad_rp[0, 2] + 1  # decreasing offsets
    with pytest.raises(ValueError, match="k2q_row_ptr: expected non-decreasing"):
        sparse_atten_func(q, k, v, bad_rp, qi, 2, validate=True, **kw)
    bad_qi = qi.clone()
    bad_qi[0, 0] = 9  # q index past the request
    with pytest.raises(ValueError, match="k2q_q_indices: row 0 of head 0 .* outside"):
        sparse_atten_func(q, k, v, rp, bad_qi, 2, validate=True, **kw)
    unsorted = qi.clone()
    unsorted[0, :2] = unsorted[0, :2].flip(0)
    with pytest.raises(ValueError, match="not strictly ascending"):
        sparse_atten_func(q, k, v, rp, unsorted, 2, validate=True, **kw)
    with pytest.raises(ValueError, match="cu_seqlens_q: expected cu_seqlens_q\\[-1\\] == q.shape\\[0\\]"):
        sparse_atten_func(q, k, v, rp, qi, 2, validate=True, **{**kw, "cu_seqlens_q": cu([5])})
    with pytest.raises(ValueError, match="max_seqlen_k: expected >= the longest"):
        sparse_atten_func(q, k, v, rp, qi, 2, validate=True, **{**kw, "max_seqlen_k": 39})


def test_empty_batch_and_zero_length(prefill):
    q, k, v, _, _, _, _ = prefill
    # empty batch: nothing to do, empty outputs
    e = torch.empty(0, 4, 16, dtype=torch.bfloat16)
    rp, qi = build_k2q_csr(torch.empty(2, 0, 2, dtype=torch.int32), cu([]), cu([]), BLK, total_k=0)
    o, lse = sparse_atten_func(e, torch.empty(0, 2, 16, dtype=torch.bfloat16), torch.empty(0, 2, 16,
                               dtype=torch.bfloat16), rp, qi, 2, cu_seqlens_q=cu([]), cu_seqlens_k=cu([]),
                               max_seqlen_q=0, max_seqlen_k=0, blk_kv=BLK, return_softmax_lse=True, validate=True)
    assert o.shape == (0, 4, 16) and lse.shape == (0, 4)
    # zero-length KV: the request's queries see nothing -> O = 0, LSE = -inf
    q2k = torch.full((2, 6, 2), -1, dtype=torch.int32)
    rp, qi = build_k2q_csr(q2k, cu([6, 0]), cu([0, 40]), BLK, total_k=40)
    o, lse = sparse_atten_func(q, k, v, rp, qi, 2, cu_seqlens_q=cu([6, 0]), cu_seqlens_k=cu([0, 40]),
                               max_seqlen_q=6, max_seqlen_k=40, blk_kv=BLK, return_softmax_lse=True, validate=True)
    assert (o == 0).all() and torch.isinf(lse).all() and (lse < 0).all()


@pytest.mark.parametrize("q2k,msg", [
    (torch.tensor([[[0, -1, 1]]], dtype=torch.int32), "-1 padding must be at the tail"),
    (torch.tensor([[[1, 0, -1]]], dtype=torch.int32), "strictly ascending"),
    (torch.tensor([[[0, 0, -1]]], dtype=torch.int32), "strictly ascending"),
    (torch.tensor([[[0, 3, -1]]], dtype=torch.int32), "out of range"),
    (torch.tensor([[[-2, -1, -1]]], dtype=torch.int32), "expected block ids >= 0 or -1"),
])
def test_build_k2q_csr_value_errors(q2k, msg):
    with pytest.raises(ValueError, match="q2k_indices: .*" + msg):
        build_k2q_csr(q2k, cu([1]), cu([40]), BLK, total_k=40, validate=True)


@pytest.mark.parametrize("call_,exc,msg", [
    (lambda: build_k2q_csr(torch.zeros(1, 1, 2), cu([1]), cu([40]), BLK, total_k=40), TypeError,
     "q2k_indices: expected dtype int32"),
    (lambda: build_k2q_csr(torch.zeros(1, 2, dtype=torch.int32), cu([1]), cu([40]), BLK, total_k=40), ValueError,
     "q2k_indices: expected 3 dimensions"),
    (lambda: build_k2q_csr(torch.zeros(1, 1, 2, dtype=torch.int32, device="meta"), cu([1]), cu([40]), total_k=1),
     ValueError, "q2k_indices: expected a tensor on cpu or cuda"),
    (lambda: build_k2q_csr(torch.zeros(1, 1, 4, dtype=torch.int32)[..., ::2], cu([1]), cu([40]), total_k=40),
     ValueError, "q2k_indices: expected the last dimension to be contiguous"),
    (lambda: build_k2q_csr(torch.zeros(1, 1, 2, dtype=torch.int32), cu([1]), cu([40]), BLK, total_k=None),
     ValueError, "total_k: required"),
    (lambda: build_k2q_csr(torch.zeros(1, 1, 2, dtype=torch.int32), cu([1]), cu([40, 1]), BLK, total_k=41),
     ValueError, "cu_seqlens_k: expected shape"),
    (lambda: build_k2q_csr(torch.zeros(1, 1, 2, dtype=torch.int32), cu([1]), cu([40]), 0, total_k=40), ValueError,
     "block_size: expected >= 1"),
    (lambda: build_k2q_csr(torch.zeros(1, 1, 2, dtype=torch.int32), cu([1]), cu([40]), BLK, total_k=40,
                           total_rows=1, validate=True), ValueError, "total_rows: expected >= "),
    (lambda: build_k2q_csr(torch.zeros(1, 1, 2, dtype=torch.int32), cu([1]), cu([40]), BLK, total_k=39,
                           validate=True), ValueError, "total_k: expected cu_seqlens_k\\[-1\\]"),
])
def test_build_k2q_csr_metadata_errors(call_, exc, msg):
    with pytest.raises(exc, match=msg):
        call_()


def test_decode_errors():
    q = torch.randn(2, 4, 16).bfloat16()
    k = torch.randn(3, 2, BLK, 16).bfloat16()
    pt = torch.tensor([[0, 1], [2, 0]], dtype=torch.int32)
    su = torch.tensor([20, 9], dtype=torch.int32)
    kw = dict(page_table=pt, seqused_k=su, seqlen_q=1, max_seqlen_k=32, blk_kv=BLK)
    with pytest.raises(TypeError, match="q: expected dtype"):
        sparse_decode_atten_func(q.float(), k, k, **kw)
    with pytest.raises(ValueError, match="k: expected 4 dimensions"):
        sparse_decode_atten_func(q, k[0], k[0], **kw)
    with pytest.raises(ValueError, match="page_table: expected at least"):
        sparse_decode_atten_func(q, k, k, **{**kw, "max_seqlen_k": 33})
    with pytest.raises(ValueError, match="seqused_k: expected shape"):
        sparse_decode_atten_func(q, k, k, **{**kw, "seqused_k": su[:1]})
    with pytest.raises(TypeError, match="seqused_k: expected dtype int32"):
        sparse_decode_atten_func(q, k, k, **{**kw, "seqused_k": su.long()})
    with pytest.raises(ValueError, match="q: expected 4 rows"):
        sparse_decode_atten_func(q, k, k, **{**kw, "seqlen_q": 2})
    with pytest.raises(ValueError, match="q2k_indices: expected shape"):
        sparse_decode_atten_func(q, k, k, torch.zeros(2, 3, 1, dtype=torch.int32), **kw)
    with pytest.raises(ValueError, match="q2k_indices: expected 2 heads"):
        sparse_decode_atten_func(q, k, k, torch.zeros(1, 2, 1, dtype=torch.int32), **kw)
    with pytest.raises(ValueError, match="q2k_indices: -1 padding must be at the tail"):
        sparse_decode_atten_func(q, k, k, torch.tensor([[[-1, 0]], [[0, -1]]] * 1, dtype=torch.int32)
                                 .expand(2, 2, 2).contiguous(), validate=True, **kw)
    with pytest.raises(ValueError, match="q2k_indices: block id 1 .* out of range"):
        sparse_decode_atten_func(q, k, k, torch.tensor([[[0], [1]]] * 2, dtype=torch.int32), validate=True, **kw)
    with pytest.raises(ValueError, match="seqused_k: expected values in"):
        sparse_decode_atten_func(q, k, k, validate=True, **{**kw, "seqused_k": torch.tensor([40, 9],
                                                                                          dtype=torch.int32)})
    with pytest.raises(ValueError, match="page_table: expected a tensor on cpu or cuda"):
        sparse_decode_atten_func(q, k, k, **{**kw, "page_table": pt.to("meta")})
    w = SparseDecodePagedAttentionWrapper(blk_kv=BLK)
    w.plan(page_table=pt, seqused_k=su, seqlen_q=1, max_seqlen_k=32)  # head_dim defaults to 128 (upstream)
    with pytest.raises(ValueError, match="q: expected head dim 128"):
        w.run(q, k, k)
    w.plan(page_table=pt, seqused_k=su, seqlen_q=1, max_seqlen_k=32, head_dim=16)
    with pytest.raises(ValueError, match="q: expected a tensor on cpu"):
        w.run(q.to("meta"), k, k)
    with pytest.raises(ValueError, match="k: expected shape \\[pages, Hkv, blk_kv=16, 16\\]"):
        w.run(q, k[:, :, :8], k[:, :, :8])
