"""Upstream-name aliases (msa.bridge.compat) produce msa's results with upstream call shapes."""

from __future__ import annotations

import pytest
import torch
from msa.bridge import compat
from msa.bridge.bridge import SparseFmhaPlan
from msa.core import FmhaPlan, fmha, fmha_plan, sparse_topk_select
from msa.cute import quant


def _data(t=200, hq=4, hkv=2, d=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(t, hq, d, generator=g).bfloat16(), torch.randn(t, hkv, d, generator=g).bfloat16(),
            torch.randn(t, hkv, d, generator=g).bfloat16())


def _sel(t, hkv, topk):
    sel = torch.full((t, hkv, topk), -1, dtype=torch.int32)
    for i in range(t):
        sel[i, :, 0] = i // 128  # own block
        if i >= 128:
            sel[i, :, 0], sel[i, :, 1] = 0, i // 128
    return sel


def test_plan_routing_and_dense_call():
    q, k, v = _data()
    dense = compat.fmha_sm100_plan(torch.tensor([200]), torch.tensor([200]), 4, 2, num_kv_splits=4)
    assert isinstance(dense, FmhaPlan)
    o, ms = compat.fmha_sm100(q, k, v, dense)
    o_ref, _ = fmha(q, k, v, fmha_plan([200], [200], 4, 2))
    assert ms is None and torch.equal(o, o_ref)
    # kv_block_num with long queries -> sparse (CSR) plan, like upstream's router; short queries stay dense
    sp = compat.fmha_sm100_plan([200], [200], 4, 2, kv_block_num=2, usable_SM_count=100)
    assert isinstance(sp, SparseFmhaPlan)
    assert isinstance(compat.fmha_sm100_plan([16], [200], 4, 2, kv_block_num=2), FmhaPlan)
    sel = _sel(200, 2, 2)
    o_sp, none = compat.fmha_sm100(q, k, v, sp, kv_block_indexes=sel, check_input_valid=True)
    o_dn, _ = fmha(q, k, v, fmha_plan([200], [200], 4, 2, kv_block_num=2), kv_block_indexes=sel)
    assert none is None
    assert (o_sp.float() - o_dn.float()).abs().max() <= 2**-8 * v.float().abs().max()


def test_maxscore_and_topk_aliases():
    q, k, _ = _data()
    plan = compat.fmha_sm100_plan([200], [200], 4, 2, output_maxscore=True)
    o, ms = compat.fmha_sm100(q, k, k, plan, output_o=False)
    assert o is None and ms.shape == (4, 128, 200)
    out = torch.empty(200, 4, 16, dtype=torch.int32)
    got = compat.sparse_topk_select(ms, 16, 2, out, 0, 1)
    assert got is out or torch.equal(got, out)
    assert torch.equal(got, sparse_topk_select(ms, 16, num_valid_pages=2, force_end_blocks=1))


def test_upstream_sparse_adapter_signature():
    q, k, v = _data()
    plan = compat.sparse_fmha_plan(torch.tensor([200]), torch.tensor([200]), 4, 2, kv_block_num=2)
    o, none = compat.sparse_fmha(q, k, v, plan, kv_block_indexes=_sel(200, 2, 2))
    assert none is None and o.shape == (200, 4, 32)
    with pytest.raises(NotImplementedError, match="q_offset_override"):
        compat.sparse_fmha(q, k, v, plan, kv_block_indexes=_sel(200, 2, 2), q_offset_override=3)
    with pytest.raises(ValueError, match="kv_block_num: required"):
        compat.sparse_fmha_plan([200], [200], 4, 2)


def test_quant_and_indexer_aliases():
    x = torch.randn(100, 3).abs() + 0.1
    lin = quant.quantize_nvfp4(torch.randn(100, 48)).scale.view(torch.uint8)
    sw = compat.swizzle_nvfp4_scale_to_128x4(lin, rows=100, cols=3)
    assert torch.equal(sw, quant.swizzle_nvfp4_scale_to_128x4(lin))
    assert torch.allclose(compat.nvfp4_global_scale_from_amax(x.amax()), x.amax() / 2688)
    with pytest.raises(NotImplementedError, match="scale_layout"):
        compat.fp4_indexer_block_scores(None, None, None, None, None, None, None, max_seqlen_q=1, max_seqlen_k=1,
                                        kv_indices=None, fp4_format="nvfp4", scale_layout="preordered_mma")
