"""Paged caches: the unused tail of a request's last page (and unused pages) may hold anything, NaN included.

Every reference must ignore it: masked keys get zero probability and their values must not reach the output
(0 * NaN is NaN). Kernels are checked against these references, so this pins the contract for them too.
"""

import torch
from msa.core import fmha, fmha_plan
from msa.cute import build_k2q_csr, sparse_atten_func


def _paged(kv_len, hkv, d, page, seed):
    g = torch.Generator().manual_seed(seed)
    n_pages = -(-kv_len // page)
    k = torch.randn(n_pages, hkv, page, d, generator=g).bfloat16()
    v = torch.randn(n_pages, hkv, page, d, generator=g).bfloat16()
    tail = n_pages * page - kv_len
    poisoned_k, poisoned_v = k.clone(), v.clone()
    if tail:
        poisoned_k[-1, :, page - tail :] = float("nan")
        poisoned_v[-1, :, page - tail :] = float("nan")
    return k, v, poisoned_k, poisoned_v


def test_core_fmha_ignores_nan_page_tails():
    kv_len, q_len, hq, hkv, d, page = 300, 40, 4, 2, 64, 128
    k, v, pk, pv = _paged(kv_len, hkv, d, page, 0)
    q = torch.randn(q_len, hq, d).bfloat16()
    plan = fmha_plan([q_len], [kv_len], hq, hkv, page_size=page)
    idx = torch.arange(k.shape[0], dtype=torch.int32)
    clean, _ = fmha(q, k, v, plan, kv_indices=idx)
    dirty, _ = fmha(q, pk, pv, plan, kv_indices=idx)
    assert torch.isfinite(dirty.float()).all()
    assert torch.equal(clean, dirty)


def test_sparse_atten_ignores_nan_page_tails():
    kv_len, q_len, hq, hkv, d, page = 300, 40, 4, 2, 128, 128
    k, v, pk, pv = _paged(kv_len, hkv, d, page, 1)
    q = torch.randn(q_len, hq, d).bfloat16()
    n_blk = k.shape[0]
    q2k = torch.arange(n_blk, dtype=torch.int32).view(1, 1, n_blk).expand(hkv, q_len, n_blk).contiguous()
    cq = torch.tensor([0, q_len], dtype=torch.int32)
    ck = torch.tensor([0, kv_len], dtype=torch.int32)
    rp, qi = build_k2q_csr(q2k, cq, ck, page, total_k=kv_len)
    pt = torch.arange(n_blk, dtype=torch.int32).view(1, n_blk)
    kw = dict(cu_seqlens_q=cq, cu_seqlens_k=ck, max_seqlen_q=q_len, max_seqlen_k=kv_len, blk_kv=page,
              causal=True, page_table=pt)
    clean = sparse_atten_func(q, k, v, rp, qi, n_blk, **kw)
    dirty = sparse_atten_func(q, pk, pv, rp, qi, n_blk, **kw)
    assert torch.isfinite(dirty.float()).all()
    assert torch.equal(clean, dirty)
