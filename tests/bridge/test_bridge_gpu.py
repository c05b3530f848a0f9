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
