"""Backend selection of the msa.cute ops goes through msa.core.dispatch (no kernels registered yet)."""

from __future__ import annotations

import pytest
import torch
from msa.core.dispatch import KernelUnavailableError, registered_kernels
from msa.cute import build_k2q_csr, sparse_atten_func, sparse_decode_atten_func


def test_kernel_mode_without_a_usable_kernel_raises():
    assert registered_kernels("sparse_atten_func") == ["sparse_prefill_sm90"]
    q = torch.randn(4, 2, 16).bfloat16()
    k = torch.randn(32, 1, 16).bfloat16()
    cq = torch.tensor([0, 4], dtype=torch.int32)
    ck = torch.tensor([0, 32], dtype=torch.int32)
    rp, qi = build_k2q_csr(torch.zeros(1, 4, 1, dtype=torch.int32), cq, ck, 16, total_k=32)
    kw = dict(cu_seqlens_q=cq, cu_seqlens_k=ck, max_seqlen_q=4, max_seqlen_k=32, blk_kv=16)
    with pytest.raises(KernelUnavailableError, match="sparse_atten_func.*no kernel can run this call"):
        sparse_atten_func(q, k, k, rp, qi, 1, backend="kernel", **kw)
    assert sparse_atten_func(q, k, k, rp, qi, 1, backend="reference", **kw).shape == (4, 2, 16)
    with pytest.raises(ValueError, match="backend: expected one of"):
        sparse_atten_func(q, k, k, rp, qi, 1, backend="fast", **kw)
    kp = k.view(2, 16, 1, 16).transpose(1, 2).contiguous()
    with pytest.raises(KernelUnavailableError, match="sparse_decode_atten_func"):
        sparse_decode_atten_func(q[:1], kp, kp, page_table=torch.tensor([[0, 1]], dtype=torch.int32),
                                 seqused_k=torch.tensor([32], dtype=torch.int32), seqlen_q=1, max_seqlen_k=32,
                                 blk_kv=16, backend="kernel")
