"""``sparse_atten_func``: block-sparse prefill attention over a k2q CSR (KV-outer kernel contract).

Semantics (per query token ``t`` of request ``b``, position ``i`` in the request, KV head ``h = hq // G``):
the token attends to the keys of the batch-local blocks whose CSR rows list it; keys ``j >= kv_len_b`` are
masked, where ``kv_len_b = seqused_k[b]`` if given else ``cu_seqlens_k[b+1] - cu_seqlens_k[b]``; with
``causal=True`` also keys ``j > i + kv_len_b - q_len_b`` (bottom-right). ``logit = (q . k) * softmax_scale``,
softmax in fp32, natural-log LSE. A query that sees no key outputs 0 with LSE ``-inf``.
"""

from __future__ import annotations

import torch
from msa.core.dispatch import backend_mode, kernel_for
from msa.core.validation import check_int, check_tensor, dtype_name, validation_enabled

from . import _kernels
from ._common import (
    FP8_E4M3,
    cdiv,
    check_compute_device,
    check_cu_seqlens,
    check_head_ratio,
    check_positive_float,
    check_qkv_dtypes,
    out_dtype_for,
)
from .csr import K2qSchedule, packed_row_offsets, token_batch_index
from .quant import Nvfp4Tensor, check_nvfp4_tensor, stage_kv
from .reference import gather_block_attention, k2q_csr_to_q2k, ragged_to_blocks

__all__ = ["sparse_atten_func", "MAX_TOPK", "PARTIAL_DTYPES"]

OP = "sparse_atten_func"
KERNEL_MODULE = "msa.cute.kernels.sparse_prefill_sm90"
MAX_TOPK = 64
PARTIAL_DTYPES = (torch.float32, torch.bfloat16, torch.float16, FP8_E4M3)

_kernels.register_optional_kernel(OP, KERNEL_MODULE)


def _check_args(q, k, v, row_ptr, q_indices, topk, cu_q, cu_k, max_seqlen_q, max_seqlen_k, blk_kv, page_table,
                seqused_k, softmax_scale, lse_temperature_scale, return_temperature_lse, return_softmax_lse,
                partial_dtype, causal, schedule):
    check_tensor("q", q, ndim=3, last_dim_contiguous=True)
    check_compute_device("q", q)
    dev = q.device
    check_tensor("k", k, ndim=(3, 4), device=dev, last_dim_contiguous=True)
    check_tensor("v", v, ndim=k.dim(), device=dev, last_dim_contiguous=True)
    check_qkv_dtypes(q, k, v)
    total_q, hq, d = q.shape
    paged = k.dim() == 4
    blk_kv = check_int("blk_kv", blk_kv, min=1)
    topk = check_int("topk", topk, min=1, max=MAX_TOPK)
    hkv = k.shape[1]
    if k.shape[-1] != d:
        raise ValueError(f"k: expected head dim {d} (q.shape[-1]), got shape {list(k.shape)}")
    if v.shape[:-1] != k.shape[:-1]:
        raise ValueError(f"v: expected shape {list(k.shape[:-1])} + [Dv], got {list(v.shape)}")
    check_head_ratio(hq, hkv)
    batch = check_cu_seqlens("cu_seqlens_q", cu_q, device=dev)
    check_cu_seqlens("cu_seqlens_k", cu_k, device=dev, batch=batch)
    max_seqlen_q = check_int("max_seqlen_q", max_seqlen_q, min=0)
    max_seqlen_k = check_int("max_seqlen_k", max_seqlen_k, min=0)
    if paged:
        if page_table is None:
            raise ValueError(f"page_table: required with paged k of shape {list(k.shape)} ([pages, Hkv, page, D])")
        if k.shape[2] != blk_kv:
            raise ValueError(f"k: expected page size == blk_kv = {blk_kv} (k.shape[2]), got {k.shape[2]}")
        check_tensor("page_table", page_table, dtype=torch.int32, ndim=2, device=dev, last_dim_contiguous=True)
        if page_table.shape[0] != batch:
            raise ValueError(f"page_table: expected {batch} rows (one per request), got shape {list(page_table.shape)}")
        if page_table.shape[1] * blk_kv < max_seqlen_k:
            raise ValueError(
                f"page_table: expected at least ceil(max_seqlen_k/blk_kv) = {cdiv(max_seqlen_k, blk_kv)} columns, "
                f"got {page_table.shape[1]}"
            )
    elif page_table is not None:
        raise ValueError(f"page_table: only valid with paged k [pages, Hkv, page, D], got k of shape {list(k.shape)}")
    if seqused_k is not None:
        check_tensor("seqused_k", seqused_k, dtype=torch.int32, shape=[batch], device=dev, contiguous=True)
    check_tensor("k2q_row_ptr", row_ptr, dtype=torch.int32, ndim=2, device=dev, contiguous=True)
    if row_ptr.shape[0] != hkv or row_ptr.shape[1] < 1:
        raise ValueError(f"k2q_row_ptr: expected shape [{hkv}, total_rows+1], got {list(row_ptr.shape)}")
    check_tensor("k2q_q_indices", q_indices, dtype=torch.int32, ndim=2, device=dev, contiguous=True)
    if q_indices.shape[0] != hkv or q_indices.shape[1] < total_q * topk:
        raise ValueError(
            f"k2q_q_indices: expected shape [{hkv}, >= total_q*topk = {total_q * topk}], got {list(q_indices.shape)}"
        )
    scale = check_positive_float("softmax_scale", softmax_scale, allow_none=True)
    temp = check_positive_float("lse_temperature_scale", lse_temperature_scale)
    for name, flag in (("return_temperature_lse", return_temperature_lse), ("return_softmax_lse", return_softmax_lse),
                       ("causal", causal)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name}: expected a bool, got {type(flag).__name__}")
    if return_temperature_lse and not return_softmax_lse:
        raise ValueError("return_temperature_lse: requires return_softmax_lse=True")
    if partial_dtype not in PARTIAL_DTYPES:
        exp = " or ".join(dtype_name(x) for x in PARTIAL_DTYPES)
        raise TypeError(f"partial_dtype: expected {exp}, got {partial_dtype!r}")
    if schedule is not None and not isinstance(schedule, K2qSchedule):
        raise TypeError(f"schedule: expected msa.cute.K2qSchedule or None, got {type(schedule).__name__}")
    return batch, topk, scale if scale is not None else d ** -0.5, temp


def _validate_values(q, k, row_ptr, q_indices, topk, cu_q, cu_k, max_seqlen_q, max_seqlen_k, blk_kv, page_table,
                     seqused_k):
    """Host-side data checks (validate=True / MSA_VALIDATE=1)."""
    cu_q_h = cu_q.cpu().to(torch.int64)
    cu_k_h = cu_k.cpu().to(torch.int64)
    total_q = q.shape[0]
    for name, cu in (("cu_seqlens_q", cu_q_h), ("cu_seqlens_k", cu_k_h)):
        if int(cu[0]) != 0 or bool((cu[1:] < cu[:-1]).any()):
            raise ValueError(f"{name}: expected non-decreasing prefix sums from 0, got {cu.tolist()}")
    if int(cu_q_h[-1]) != total_q:
        raise ValueError(f"cu_seqlens_q: expected cu_seqlens_q[-1] == q.shape[0] = {total_q}, got {int(cu_q_h[-1])}")
    q_lens = cu_q_h[1:] - cu_q_h[:-1]
    k_lens = cu_k_h[1:] - cu_k_h[:-1]
    if len(q_lens) and int(q_lens.max()) > max_seqlen_q:
        raise ValueError(f"max_seqlen_q: expected >= the longest query length {int(q_lens.max())}, got {max_seqlen_q}")
    if len(k_lens) and int(k_lens.max()) > max_seqlen_k:
        raise ValueError(f"max_seqlen_k: expected >= the longest key length {int(k_lens.max())}, got {max_seqlen_k}")
    if k.dim() == 3 and int(cu_k_h[-1]) > k.shape[0]:
        raise ValueError(f"cu_seqlens_k: expected cu_seqlens_k[-1] <= k.shape[0] = {k.shape[0]}, got {int(cu_k_h[-1])}")
    if seqused_k is not None:
        su = seqused_k.cpu().to(torch.int64)
        bad = (su < 0) | (su > k_lens)
        if bool(bad.any()):
            b = int(bad.nonzero()[0])
            raise ValueError(f"seqused_k: expected 0 <= seqused_k[b] <= k_len[b]; request {b} has {int(su[b])} "
                             f"with k_len {int(k_lens[b])}")
    nblk = torch.div(k_lens + blk_kv - 1, blk_kv, rounding_mode="floor")
    if page_table is not None:
        pt = page_table.cpu().to(torch.int64)
        cols = torch.arange(pt.shape[1]).view(1, -1)
        used = cols < nblk.view(-1, 1)
        bad = used & ((pt < 0) | (pt >= k.shape[0]))
        if bool(bad.any()):
            b, j = bad.nonzero()[0].tolist()
            raise ValueError(f"page_table: entry [{b}, {j}] = {int(pt[b, j])} is not a page id in [0, {k.shape[0]})")
    rp = row_ptr.cpu().to(torch.int64)
    rows_needed = int(nblk.sum())
    total_rows = rp.shape[1] - 1
    if total_rows < rows_needed:
        raise ValueError(f"k2q_row_ptr: expected >= {rows_needed + 1} columns (total_rows+1), got {rp.shape[1]}")
    if bool((rp[:, 0] != 0).any()) or bool((rp[:, 1:] < rp[:, :-1]).any()):
        raise ValueError("k2q_row_ptr: expected non-decreasing row offsets starting at 0 in every head")
    if bool((rp[:, -1] > q_indices.shape[1]).any()):
        raise ValueError(f"k2q_row_ptr: last offset exceeds k2q_q_indices.shape[1] = {q_indices.shape[1]}")
    if bool((rp[:, rows_needed:] != rp[:, rows_needed:rows_needed + 1]).any()):
        raise ValueError(f"k2q_row_ptr: rows beyond the {rows_needed} packed KV-block rows must be empty")
    qi = q_indices.cpu().to(torch.int64)
    cu_rows = torch.zeros(len(nblk) + 1, dtype=torch.int64)
    cu_rows[1:] = torch.cumsum(nblk, 0)
    row_b = torch.searchsorted(cu_rows[1:], torch.arange(rows_needed), right=True)
    per_tok = torch.zeros(rp.shape[0], total_q, dtype=torch.int64)
    for h in range(rp.shape[0]):
        for r in range(rows_needed):
            s, e = int(rp[h, r]), int(rp[h, r + 1])
            if e == s:
                continue
            payload = qi[h, s:e]
            b = int(row_b[r])
            ql = int(q_lens[b])
            if bool(((payload < 0) | (payload >= ql)).any()):
                raise ValueError(f"k2q_q_indices: row {r} of head {h} (request {b}) holds a q index outside [0, {ql})")
            if bool((payload[1:] <= payload[:-1]).any()):
                raise ValueError(f"k2q_q_indices: row {r} of head {h} is not strictly ascending")
            per_tok[h].index_add_(0, payload + int(cu_q_h[b]), torch.ones_like(payload))
    if bool((per_tok > topk).any()):
        h, t = (per_tok > topk).nonzero()[0].tolist()
        raise ValueError(f"k2q_q_indices: token {t} of head {h} is selected by {int(per_tok[h, t])} rows > topk={topk}")


def sparse_atten_func(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k2q_row_ptr: torch.Tensor,
    k2q_q_indices: torch.Tensor,
    topk: int,
    *,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    blk_kv: int = 128,
    causal: bool = False,
    softmax_scale: float | None = None,
    lse_temperature_scale: float = 1.0,
    return_temperature_lse: bool = False,
    partial_dtype: torch.dtype = torch.bfloat16,
    return_softmax_lse: bool = False,
    page_table: torch.Tensor | None = None,
    seqused_k: torch.Tensor | None = None,
    schedule: K2qSchedule | None = None,
    validate: bool | None = None,
    backend: str | None = None,
):
    """Block-sparse attention (forward) over a k2q CSR built by :func:`msa.cute.build_k2q_csr`.

    Args:
        q: ``[total_q, Hq, D]`` bf16 / fp16 / fp8-e4m3 (kernels need D = 128; the reference takes any D).
        k, v: ragged ``[total_k, Hkv, D]`` or paged ``[pages, Hkv, blk_kv, D]`` (then ``page_table [B, max_pages]``
            int32 maps request b's logical block j to page ``page_table[b, j]``). Same dtype as q, fp8-e4m3 under a
            bf16/fp16 q, or :class:`msa.cute.quant.Nvfp4Tensor` (both k and v; ``data [..., D/2]``, ``scale
            [..., D/16]``, optional global scale) under a bf16/fp16 q. ``Hq % Hkv == 0``. No fp8 scales are
            applied (fold them into ``softmax_scale`` / the output); NVFP4 scales are part of the format.
            Quantised K/V reach the 16-bit kernel staged: :func:`msa.cute.quant.dequantize_kv` converts the K/V the
            call reads (paged: the pages its requests use) to bf16/fp16 first (one memory-bound pass; an fp8 q is
            cast exactly), so results are those of the 16-bit kernel on the dequantised values.
        k2q_row_ptr / k2q_q_indices: the CSR (``[Hkv, total_rows+1]``, ``[Hkv, >= total_q*topk]`` int32).
        topk: per-token selection bound, 1..64 (the SM90 kernel takes any of them). A token listed in more than
            ``topk`` rows is a contract violation: ``validate=True`` raises, otherwise its output row and LSEs are
            NaN (never silently truncated).
        cu_seqlens_q / cu_seqlens_k: ``[B+1]`` int32; ``max_seqlen_q/k`` host bounds.
        causal: bottom-right causal mask; ``seqused_k [B]`` int32 overrides the visible key count per request.
        softmax_scale: default ``D ** -0.5``. ``lse_temperature_scale`` > 0: the temperature LSE is the LSE of
            ``logits / lse_temperature_scale`` (needs ``return_softmax_lse``).
        partial_dtype: the kernel's per-slot partial-O storage (fp32/bf16/fp16/fp8); the reference is exact fp32.
        schedule: optional :class:`K2qSchedule` from ``build_k2q_csr(..., return_schedule=True)`` (kernel hint).

    Returns:
        ``O [total_q, Hq, Dv]`` (bf16 for fp8 q, else q.dtype), plus ``LSE [total_q, Hq]`` fp32 and the
        temperature LSE when asked: ``O | (O, LSE) | (O, LSE, LSE_temp)``.
    """
    nvfp4 = isinstance(k, Nvfp4Tensor) or isinstance(v, Nvfp4Tensor)
    kq, vq = k, v
    if nvfp4:  # checked on 16-bit stand-ins of the dequantised shapes (one row of memory each)
        k, v = _nvfp4_stand_ins(q, k, v)
    batch, topk, scale, temp = _check_args(
        q, k, v, k2q_row_ptr, k2q_q_indices, topk, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, blk_kv,
        page_table, seqused_k, softmax_scale, lse_temperature_scale, return_temperature_lse, return_softmax_lse,
        partial_dtype, causal, schedule,
    )
    if validation_enabled(validate):
        _validate_values(q, k, k2q_row_ptr, k2q_q_indices, topk, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                         max_seqlen_k, blk_kv, page_table, seqused_k)
    features = dict(head_dim=q.shape[-1], head_dim_v=v.shape[-1], topk=topk, qhead_per_kv=q.shape[1] // k.shape[1],
                    paged=page_table is not None, blk_kv=blk_kv, causal=causal, partial_dtype=partial_dtype,
                    temperature_lse=return_temperature_lse and temp != 1.0)
    stage = _staging_dtype(q, k, nvfp4, features, backend)
    if stage is not None:  # quantised K/V (and an fp8 Q with them) -> 16 bits, then the 16-bit kernels
        q, k, v, page_table = stage_kv(q, kq, vq, stage, page_table=page_table, cu_seqlens_k=cu_seqlens_k,
                                       block=blk_kv, backend=backend)
    choice = _kernels.choose(OP, q.device, backend, q_dtype=q.dtype, kv_dtype=k.dtype, **features)
    if choice != "reference":
        return _kernels.run_kernel(
            KERNEL_MODULE, q=q, k=k, v=v, k2q_row_ptr=k2q_row_ptr, k2q_q_indices=k2q_q_indices, topk=topk,
            cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, max_seqlen_q=max_seqlen_q,
            max_seqlen_k=max_seqlen_k, blk_kv=blk_kv, causal=causal, softmax_scale=scale,
            lse_temperature_scale=temp, return_temperature_lse=return_temperature_lse, partial_dtype=partial_dtype,
            return_softmax_lse=return_softmax_lse, page_table=page_table, seqused_k=seqused_k, schedule=schedule,
        )
    return _reference(q, k, v, k2q_row_ptr, k2q_q_indices, topk, cu_seqlens_q, cu_seqlens_k, blk_kv, causal, scale,
                      temp, return_temperature_lse, return_softmax_lse, page_table, seqused_k, batch)


def _nvfp4_stand_ins(q, k, v):
    """Validate NVFP4 K/V (both :class:`Nvfp4Tensor`, a bf16 / fp16 q on the same device) and return 16-bit
    stand-ins of the dequantised shapes (stride 0 outside the last dim: no memory) for the shape checks."""
    for name, t in (("k", k), ("v", v)):
        if not isinstance(t, Nvfp4Tensor):
            raise TypeError(f"{name}: expected an Nvfp4Tensor (k and v are quantised together), got "
                            f"{type(t).__name__}")
    check_tensor("q", q)
    if q.dtype not in (torch.bfloat16, torch.float16):
        raise TypeError(f"q: expected bf16 or fp16 with NVFP4 k / v, got {dtype_name(q.dtype)}")
    out = []
    for name, t in (("k", k), ("v", v)):
        shape = check_nvfp4_tensor(name, t, device=q.device)
        out.append(torch.zeros(shape[-1], dtype=q.dtype, device=q.device).expand(shape))
    return out


def _staging_dtype(q, k, nvfp4: bool, features: dict, backend) -> torch.dtype | None:
    """The 16-bit dtype K/V (and an fp8 q) are staged in before the call, or None (run on the tensors as given).
    NVFP4: always (the kernels and the reference both read dequantised values). fp8 K/V: when the staged call has a
    kernel and the dequantiser too (else the reference reads the fp8 tensors directly, as before)."""
    target = torch.bfloat16 if q.dtype == FP8_E4M3 else q.dtype
    if nvfp4:
        return target
    if k.dtype != FP8_E4M3 or q.device.type != "cuda" or backend_mode(backend) == "reference":
        return None
    if kernel_for(OP, q.device, q_dtype=target, kv_dtype=target, **features) is None:
        return None
    if kernel_for("dequantize_kv", q.device, fmt="fp8", out_dtype=target, row=k.shape[-1]) is None:
        return None
    return target


def _reference(q, k, v, row_ptr, q_indices, topk, cu_q, cu_k, blk_kv, causal, scale, temp, return_temp, return_lse,
               page_table, seqused_k, batch):
    total_q, hq, _ = q.shape
    hkv = k.shape[1]
    group = hq // hkv
    out_dtype = out_dtype_for(q.dtype)
    if batch == 0 or total_q == 0:
        o = torch.zeros(total_q, hq, v.shape[-1], dtype=out_dtype, device=q.device)
        lse = torch.full((total_q, hq), float("-inf"), dtype=torch.float32, device=q.device)
        return _pack(o, lse, lse.clone(), return_lse, return_temp)
    tok_b = token_batch_index(cu_q, total_q).clamp(max=batch - 1)
    cu_q64 = cu_q.to(torch.int64)
    cu_k64 = cu_k.to(torch.int64)
    tok_pos = torch.arange(total_q, device=q.device, dtype=torch.int64) - cu_q64[tok_b]
    q_len = cu_q64[1:] - cu_q64[:-1]
    kv_len = seqused_k.to(torch.int64) if seqused_k is not None else cu_k64[1:] - cu_k64[:-1]
    q2k, overflow = k2q_csr_to_q2k(row_ptr, q_indices, cu_q, cu_k, topk=topk, total_q=total_q, block_size=blk_kv)
    block_base = None
    if page_table is None:  # ragged K/V: re-block once (fp32), then every path gathers whole blocks
        total_rows = row_ptr.shape[1] - 1
        k = ragged_to_blocks(k, cu_k, total_rows, blk_kv)
        v = ragged_to_blocks(v, cu_k, total_rows, blk_kv)
        block_base = packed_row_offsets(cu_k, blk_kv)[:-1]
    o, lse, lse_t = gather_block_attention(
        q, k, v, q2k, token_batch=tok_b, token_pos=tok_pos, kv_len=kv_len, softmax_scale=scale, block_size=blk_kv,
        causal=causal, causal_offset=kv_len - q_len, block_base=block_base, page_table=page_table,
        lse_temperature_scale=temp if return_temp else None,
    )
    # A token listed in more rows than topk breaks the kernel's slot layout: poison it instead of truncating.
    bad = overflow.t().repeat_interleave(group, dim=1)  # [T, Hq]
    o = torch.where(bad.unsqueeze(-1), torch.full_like(o, float("nan")), o)
    lse = lse.masked_fill(bad, float("nan"))  # the kernel's combine poisons the LSEs of such tokens too
    if lse_t is not None:
        lse_t = lse_t.masked_fill(bad, float("nan"))
    return _pack(o.to(out_dtype), lse, lse_t, return_lse, return_temp)


def _pack(o, lse, lse_t, return_lse, return_temp):
    if return_temp:
        return o, lse, lse_t
    if return_lse:
        return o, lse
    return o

