"""``fp4_indexer_block_scores``: per-(head, 128-token block, query) max of FP4 index-Q . index-K dot products.

Public (linear) layouts: ``q_fp4 [total_q, Hq, D/2]`` packed E2M1 (uint8 / int8 / float4_e2m1fn_x2) with
``q_scale [total_q, Hq, G]``; paged ``k_fp4 [pages, Hk, 128, D/2]`` with ``k_scale [pages, Hk, 128, G]``;
``G = D/16`` E4M3 scales (``"nvfp4"``, float8_e4m3fn or its uint8 bits) or ``G = D/32`` E8M0 exponents
(``"mxfp4"``, uint8 or float8_e8m0fnu). Request ``b``'s pages are
``kv_indices[cu_page_offsets[b]:cu_page_offsets[b+1]]``; its ``kv_len = cu_seqlens_k[b+1] - cu_seqlens_k[b]``.

``scores[h, kb, t] = max_j dot(deq(q[t, h]), deq(k[j, h // (Hq/Hk)]))`` over the keys ``j`` of block ``kb`` that
exist (``j < kv_len``) and, with ``causal``, satisfy ``j <= i + qo_offset[b]`` (``qo_offset`` defaults to
``kv_len - q_len``). No softmax scale is applied. Everything else is ``-inf``. Output
``[Hq, ceil(max_seqlen_k/128), total_q]`` fp32. Top-k and CSR construction stay with the caller.

The reference never reads device offsets on the host: it loops over requests (the batch size is a shape) with
work padded to ``max_seqlen_q`` x ``ceil(max_seqlen_k/128)`` blocks, so it can run inside CUDA graph capture.
"""

from __future__ import annotations

import torch
from msa.core.validation import check_int, check_tensor, dtype_name, validation_enabled

from . import _kernels
from ._common import cdiv, check_compute_device, check_cu_seqlens
from .quant import MXFP4_BLOCK, NVFP4_BLOCK, dequantize_mxfp4, dequantize_nvfp4

__all__ = ["fp4_indexer_block_scores", "INDEX_BLOCK"]

OP = "fp4_indexer_block_scores"
KERNEL_MODULE = "msa.cute.kernels.fp4_indexer_sm90"
INDEX_BLOCK = 128
_FORMATS = ("mxfp4", "nvfp4")
_PACKED = tuple(d for d in (torch.uint8, torch.int8, getattr(torch, "float4_e2m1fn_x2", None)) if d is not None)
_kernels.register_optional_kernel(OP, KERNEL_MODULE)


def _scale_dtypes(fmt: str):
    if fmt == "nvfp4":
        return (torch.float8_e4m3fn, torch.uint8)
    return tuple(d for d in (torch.uint8, getattr(torch, "float8_e8m0fnu", None)) if d is not None)


def _dequant(fmt: str, data: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    data = data.view(torch.uint8) if data.dtype != torch.uint8 else data
    if fmt == "nvfp4":
        return dequantize_nvfp4(data, scale)
    return dequantize_mxfp4(data, scale)


def _check_args(q_fp4, k_fp4, q_scale, k_scale, cu_q, cu_k, cu_pages, max_seqlen_q, max_seqlen_k, kv_indices, fmt,
                causal, qo_offset):
    if fmt not in _FORMATS:
        raise ValueError(f"fp4_format: expected one of {list(_FORMATS)}, got {fmt!r}")
    check_tensor("q_fp4", q_fp4, dtype=_PACKED, ndim=3, last_dim_contiguous=True)
    check_compute_device("q_fp4", q_fp4)
    dev = q_fp4.device
    check_tensor("k_fp4", k_fp4, dtype=_PACKED, ndim=4, device=dev, last_dim_contiguous=True)
    total_q, hq, half_d = q_fp4.shape
    d = 2 * half_d
    block = NVFP4_BLOCK if fmt == "nvfp4" else MXFP4_BLOCK
    if d % block:
        raise ValueError(f"q_fp4: expected a head dim (2*q_fp4.shape[-1] = {d}) that is a multiple of {block} "
                         f"for {fmt}")
    groups = d // block
    _, hk, page, k_half_d = k_fp4.shape
    if page != INDEX_BLOCK:
        raise ValueError(f"k_fp4: expected page size {INDEX_BLOCK} (k_fp4.shape[2]), got {page}")
    if k_half_d != half_d:
        raise ValueError(f"k_fp4: expected last dim {half_d} (q_fp4.shape[-1]), got shape {list(k_fp4.shape)}")
    if hk <= 0 or hq % hk:
        raise ValueError(f"k_fp4: expected a head count dividing Hq = {hq}, got {hk}")
    sdt = _scale_dtypes(fmt)
    check_tensor("q_scale", q_scale, dtype=sdt, shape=[total_q, hq, groups], device=dev)
    check_tensor("k_scale", k_scale, dtype=sdt, shape=list(k_fp4.shape[:3]) + [groups], device=dev)
    batch = check_cu_seqlens("cu_seqlens_q", cu_q, device=dev)
    check_cu_seqlens("cu_seqlens_k", cu_k, device=dev, batch=batch)
    check_cu_seqlens("cu_page_offsets", cu_pages, device=dev, batch=batch)
    check_tensor("kv_indices", kv_indices, dtype=torch.int32, ndim=1, device=dev, contiguous=True)
    max_seqlen_q = check_int("max_seqlen_q", max_seqlen_q, min=0)
    max_seqlen_k = check_int("max_seqlen_k", max_seqlen_k, min=0)
    if not isinstance(causal, bool):
        raise TypeError(f"causal: expected a bool, got {type(causal).__name__}")
    if qo_offset is not None:
        if not causal:
            raise ValueError("qo_offset: only valid with causal=True")
        check_tensor("qo_offset", qo_offset, dtype=torch.int32, shape=[batch], device=dev)
    return batch, max_seqlen_q, max_seqlen_k


def fp4_indexer_block_scores(
    q_fp4: torch.Tensor,
    k_fp4: torch.Tensor,
    q_scale: torch.Tensor,
    k_scale: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    cu_page_offsets: torch.Tensor,
    *,
    max_seqlen_q: int,
    max_seqlen_k: int,
    kv_indices: torch.Tensor,
    fp4_format: str,
    causal: bool = False,
    qo_offset: torch.Tensor | None = None,
    validate: bool | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Block max-scores from FP4 index Q/K (see the module docstring). Returns ``[Hq, K, total_q]`` fp32."""
    batch, max_seqlen_q, max_seqlen_k = _check_args(
        q_fp4, k_fp4, q_scale, k_scale, cu_seqlens_q, cu_seqlens_k, cu_page_offsets, max_seqlen_q, max_seqlen_k,
        kv_indices, fp4_format, causal, qo_offset,
    )
    n_blocks = cdiv(max_seqlen_k, INDEX_BLOCK)
    if validation_enabled(validate):
        _validate_values(q_fp4, k_fp4, cu_seqlens_q, cu_seqlens_k, cu_page_offsets, kv_indices, max_seqlen_q,
                         max_seqlen_k)
    choice = _kernels.choose(
        OP, q_fp4.device, backend, fp4_format=fp4_format, head_dim=2 * q_fp4.shape[-1],
        qhead_per_kv=q_fp4.shape[1] // k_fp4.shape[1], causal=causal, max_seqlen_q=max_seqlen_q,
    )
    if choice != "reference":
        return _kernels.run_kernel(
            KERNEL_MODULE, q_fp4=q_fp4, k_fp4=k_fp4, q_scale=q_scale, k_scale=k_scale, cu_seqlens_q=cu_seqlens_q,
            cu_seqlens_k=cu_seqlens_k, cu_page_offsets=cu_page_offsets, max_seqlen_q=max_seqlen_q,
            max_seqlen_k=max_seqlen_k, kv_indices=kv_indices, fp4_format=fp4_format, causal=causal,
            qo_offset=qo_offset,
        )
    return _reference(q_fp4, k_fp4, q_scale, k_scale, cu_seqlens_q, cu_seqlens_k, cu_page_offsets, kv_indices,
                      fp4_format, causal, qo_offset, batch, max_seqlen_q, n_blocks)


def _reference(q_fp4, k_fp4, q_scale, k_scale, cu_q, cu_k, cu_p, kv_indices, fmt, causal, qo_offset, batch,
               max_seqlen_q, n_blocks):
    """Per request (host loop over the batch size), padded to the host bounds ``max_seqlen_q`` x ``n_blocks``;
    all offsets stay on the device, so nothing synchronises."""
    total_q, hq, _ = q_fp4.shape
    hk = k_fp4.shape[1]
    group = hq // hk
    dev = q_fp4.device
    # One spare query column absorbs the padded rows of every request.
    out = torch.full((hq, n_blocks, total_q + 1), float("-inf"), dtype=torch.float32, device=dev)
    if batch == 0 or total_q == 0 or n_blocks == 0 or k_fp4.shape[0] == 0 or kv_indices.numel() == 0:
        return out[:, :, :total_q].contiguous()
    q_deq = _dequant(fmt, q_fp4, q_scale)  # [T, Hq, D]
    d = q_deq.shape[-1]
    cu_q64, cu_k64, cu_p64 = (t.to(torch.int64) for t in (cu_q, cu_k, cu_p))
    q_len = cu_q64[1:] - cu_q64[:-1]
    kv_len = cu_k64[1:] - cu_k64[:-1]
    n_pages = cu_p64[1:] - cu_p64[:-1]
    offs = qo_offset.to(torch.int64) if qo_offset is not None else kv_len - q_len
    blocks = torch.arange(n_blocks, device=dev)
    keys = torch.arange(n_blocks * INDEX_BLOCK, device=dev)
    chunk = max(1, min(max(max_seqlen_q, 1), (64 << 20) // max(1, hq * n_blocks * INDEX_BLOCK * 4)))
    for b in range(batch):
        page_ok = blocks < n_pages[b]
        pid = kv_indices.to(torch.int64)[(cu_p64[b] + blocks).clamp(0, kv_indices.numel() - 1)]
        pid = torch.where(page_ok, pid, torch.zeros_like(pid)).clamp(0, k_fp4.shape[0] - 1)
        kd = _dequant(fmt, k_fp4[pid], k_scale[pid])  # [n_blocks, Hk, 128, D]
        kd = kd.permute(1, 0, 2, 3).reshape(hk, n_blocks * INDEX_BLOCK, d)
        key_ok = (keys < kv_len[b]) & page_ok.repeat_interleave(INDEX_BLOCK)
        for i0 in range(0, max_seqlen_q, chunk):
            i = torch.arange(i0, min(max_seqlen_q, i0 + chunk), device=dev)
            n = i.numel()
            tok_ok = i < q_len[b]
            tok = torch.where(tok_ok, cu_q64[b] + i, torch.full_like(i, total_q))
            qq = q_deq[tok.clamp(max=total_q - 1)].transpose(0, 1).reshape(hk, group * n, d)
            logits = torch.bmm(qq, kd.transpose(1, 2)).view(hq, n, n_blocks * INDEX_BLOCK)
            vis = key_ok.view(1, -1)
            if causal:
                vis = vis & (keys.view(1, -1) <= i.view(-1, 1) + offs[b])
            logits.masked_fill_(~vis.unsqueeze(0), float("-inf"))
            scores = logits.view(hq, n, n_blocks, INDEX_BLOCK).amax(-1).transpose(1, 2)  # [Hq, n_blocks, n]
            out.index_copy_(2, tok, scores.contiguous())
    return out[:, :, :total_q].contiguous()


def _validate_values(q_fp4, k_fp4, cu_q, cu_k, cu_p, kv_indices, max_seqlen_q, max_seqlen_k):
    cq, ck, cp = (t.cpu().to(torch.int64) for t in (cu_q, cu_k, cu_p))
    for name, c in (("cu_seqlens_q", cq), ("cu_seqlens_k", ck), ("cu_page_offsets", cp)):
        if int(c[0]) != 0 or bool((c[1:] < c[:-1]).any()):
            raise ValueError(f"{name}: expected non-decreasing prefix sums from 0, got {c.tolist()}")
    if int(cq[-1]) != q_fp4.shape[0]:
        raise ValueError(f"cu_seqlens_q: expected cu_seqlens_q[-1] == q_fp4.shape[0] = {q_fp4.shape[0]}, "
                         f"got {int(cq[-1])}")
    ql, kl, npg = cq[1:] - cq[:-1], ck[1:] - ck[:-1], cp[1:] - cp[:-1]
    if len(ql) and int(ql.max()) > max_seqlen_q:
        raise ValueError(f"max_seqlen_q: expected >= {int(ql.max())}, got {max_seqlen_q}")
    if len(kl) and int(kl.max()) > max_seqlen_k:
        raise ValueError(f"max_seqlen_k: expected >= {int(kl.max())}, got {max_seqlen_k}")
    need = torch.div(kl + INDEX_BLOCK - 1, INDEX_BLOCK, rounding_mode="floor")
    if bool((npg < need).any()):
        b = int((npg < need).nonzero()[0])
        raise ValueError(f"cu_page_offsets: request {b} has {int(npg[b])} pages but needs {int(need[b])}")
    if int(cp[-1]) > kv_indices.shape[0]:
        raise ValueError(f"kv_indices: expected >= {int(cp[-1])} entries (cu_page_offsets[-1]), "
                         f"got {kv_indices.shape[0]}")
    ki = kv_indices.cpu()
    if ki.numel() and bool(((ki < 0) | (ki >= k_fp4.shape[0])).any()):
        raise ValueError(f"kv_indices: expected page ids in [0, {k_fp4.shape[0]}), got min {int(ki.min())} "
                         f"max {int(ki.max())} ({dtype_name(ki.dtype)})")
