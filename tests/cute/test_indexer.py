"""fp4_indexer_block_scores == explicit dequantised logits max-pooled per 128-token block (fp64 oracle).

Bound: the op dequantises exactly (E2M1 x E4M3/E8M0 products are exact in fp32) and accumulates D products in
fp32: |score - oracle| <= 1e-5 * sum|q||k| per entry.
"""

from __future__ import annotations

import pytest
import torch
from msa.cute import fp4_indexer_block_scores, quant


def build(gen, fmt, q_lens, kv_lens, hq, hk, d):
    qq = torch.randn(sum(q_lens), hq, d, generator=gen) * 2
    n_pages_req = [-(-n // 128) for n in kv_lens]
    n_pages = sum(n_pages_req) + 1
    kk = torch.randn(n_pages, hk, 128, d, generator=gen)
    qt = quant.quantize_nvfp4(qq) if fmt == "nvfp4" else quant.quantize_mxfp4(qq)
    kt = quant.quantize_nvfp4(kk) if fmt == "nvfp4" else quant.quantize_mxfp4(kk)
    perm = torch.randperm(n_pages, generator=gen)[: sum(n_pages_req)].to(torch.int32)
    cu_p = torch.tensor([0] + torch.tensor(n_pages_req).cumsum(0).tolist(), dtype=torch.int32)
    return qt, kt, perm, cu_p


def oracle(qd, kd, kv_indices, q_lens, kv_lens, cu_p, n_blocks, causal, offs):
    hq = qd.shape[1]
    hk = kd.shape[1]
    out = torch.full((hq, n_blocks, qd.shape[0]), float("-inf"), dtype=torch.float64)
    t = 0
    for b, (ql, kl) in enumerate(zip(q_lens, kv_lens)):
        pages = kv_indices[int(cu_p[b]):int(cu_p[b + 1])].long()
        keys = kd[pages].permute(1, 0, 2, 3).reshape(hk, -1, kd.shape[-1])[:, :kl].double()
        for i in range(ql):
            for h in range(hq):
                s = keys[h // (hq // hk)] @ qd[t, h].double()
                for j in range(kl):
                    if causal and j > i + offs[b]:
                        continue
                    out[h, j // 128, t] = max(out[h, j // 128, t], s[j])
            t += 1
    return out


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
@pytest.mark.parametrize("causal", [False, True])
def test_fp4_indexer_matches_dequantised_oracle(fmt, causal):
    gen = torch.Generator().manual_seed(12)
    q_lens, kv_lens, hq, hk, d = [3, 0, 5], [200, 50, 300], 4, 2, 64
    qt, kt, kv_idx, cu_p = build(gen, fmt, q_lens, kv_lens, hq, hk, d)
    cu_q = torch.tensor([0, 3, 3, 8], dtype=torch.int32)
    cu_k = torch.tensor([0, 200, 250, 550], dtype=torch.int32)
    offs = torch.tensor([197, 10, 100], dtype=torch.int32) if causal else None
    got = fp4_indexer_block_scores(qt.data, kt.data, qt.scale, kt.scale, cu_q, cu_k, cu_p, max_seqlen_q=5,
                                   max_seqlen_k=300, kv_indices=kv_idx, fp4_format=fmt, causal=causal,
                                   qo_offset=offs, validate=True)
    assert got.shape == (hq, 3, 8) and got.dtype == torch.float32
    ref = oracle(qt.dequantize(), kt.dequantize(), kv_idx, q_lens, kv_lens, cu_p, 3, causal,
                 offs.tolist() if causal else [0] * 3)
    assert torch.equal(torch.isinf(got), torch.isinf(ref))
    fin = torch.isfinite(ref)
    assert fin.sum() > 20
    assert (got[fin].double() - ref[fin]).abs().max() <= 1e-5 * 6 * 6 * d * 16


def test_fp4_indexer_bad_inputs():
    gen = torch.Generator().manual_seed(1)
    qt, kt, kv_idx, cu_p = build(gen, "nvfp4", [2], [128], 2, 1, 32)
    cu_q = torch.tensor([0, 2], dtype=torch.int32)
    cu_k = torch.tensor([0, 128], dtype=torch.int32)
    kw = dict(max_seqlen_q=2, max_seqlen_k=128, kv_indices=kv_idx, fp4_format="nvfp4")
    with pytest.raises(ValueError, match="fp4_format"):
        fp4_indexer_block_scores(qt.data, kt.data, qt.scale, kt.scale, cu_q, cu_k, cu_p,
                                 **{**kw, "fp4_format": "fp4"})
    with pytest.raises(ValueError, match="q_scale: expected shape"):
        fp4_indexer_block_scores(qt.data, kt.data, qt.scale[..., :1], kt.scale, cu_q, cu_k, cu_p, **kw)
    with pytest.raises(TypeError, match="k_scale: expected dtype"):
        fp4_indexer_block_scores(qt.data, kt.data, qt.scale, kt.scale.float(), cu_q, cu_k, cu_p, **kw)
    with pytest.raises(ValueError, match="qo_offset: only valid with causal"):
        fp4_indexer_block_scores(qt.data, kt.data, qt.scale, kt.scale, cu_q, cu_k, cu_p,
                                 qo_offset=torch.zeros(1, dtype=torch.int32), **kw)
    with pytest.raises(ValueError, match="kv_indices: expected page ids"):
        fp4_indexer_block_scores(qt.data, kt.data, qt.scale, kt.scale, cu_q, cu_k, cu_p, validate=True,
                                 **{**kw, "kv_indices": kv_idx + 50})
    with pytest.raises(ValueError, match="q_fp4: expected a tensor on cpu or cuda"):
        fp4_indexer_block_scores(qt.data.to("meta"), kt.data, qt.scale, kt.scale, cu_q, cu_k, cu_p, **kw)
