"""Dense call site, sparse backend: ``sparse_fmha_plan`` / ``sparse_fmha`` take ``fmha_plan`` / ``fmha``
arguments and run per-token block-sparse attention through the KV-outer path (k2q CSR + ``sparse_atten_func``).

Result = ``msa.core.fmha(q, k, v, fmha_plan(..., kv_block_num=k), kv_block_indexes=...)``: each token attends to
the keys of its selected 128-token blocks, bottom-right causal with ``qo_offset``, logits scaled by
``sm_scale * q_scale * k_scale``, output ``* v_scale * o_scale``.

How the dense arguments map onto the sparse kernel contract:

- selections ``[total_q, Hkv, k]`` (or ``[total_q, Hq, k]``: every ``Hq/Hkv``-th head is taken, the GQA group's
  first query head) become ``q2k [Hkv, total_q, k]``;
- a causal ``qo_offset`` becomes ``seqused_k = qo_len + qo_offset`` (bottom-right against a shortened KV), which
  needs ``qo_offset <= kv_len - qo_len`` (checked in the plan; larger offsets raise);
- paged K/V: the flat ``kv_indices`` page list becomes ``page_table [B, max_pages]`` (device ops, no sync);
- scalar scales fold into ``softmax_scale`` and an output multiplier; per-head ``q_scale`` / ``k_scale`` are
  folded into Q (rounded to bf16, ~2^-9 relative), per-head ``v_scale`` / ``o_scale`` multiply output heads.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from msa.core import FmhaPlan, fmha_plan
from msa.core.validation import check_int, check_tensor, validation_enabled
from msa.cute import build_k2q_csr, sparse_atten_func
from msa.cute.csr import check_selection_values

__all__ = ["SparseFmhaPlan", "sparse_fmha_plan", "sparse_fmha", "page_table_from_kv_indices", "BLOCK"]

BLOCK = 128


@dataclass(eq=False)
class SparseFmhaPlan:
    """``base``: the dense plan (host lists, device indptrs). Sparse-path extras: ``topk``, ``total_rows``
    (packed 128-token KV rows), ``seqused_k [B]`` int32 on the device (None when non-causal), and
    ``max_pages`` (paged: the page-table width)."""

    base: FmhaPlan
    topk: int
    total_rows: int
    seqused_k: torch.Tensor | None = field(repr=False)
    max_pages: int

    def __getattr__(self, name):  # read-through to the dense plan (qo_lens, total_q, num_qo_heads, ...)
        if name == "base":
            raise AttributeError(name)
        return getattr(self.base, name)


def sparse_fmha_plan(
    qo_lens,
    kv_lens,
    num_qo_heads: int,
    num_kv_heads: int | None = None,
    *,
    page_size: int | None = None,
    kv_block_num: int,
    causal: bool = True,
    qo_offset=None,
    output_maxscore: bool = False,
    device=None,
) -> SparseFmhaPlan:
    """Plan a sparse call (host work only). Same arguments as ``msa.core.fmha_plan``; ``kv_block_num`` (top-k,
    1..64) is required, ``page_size`` must be None (ragged) or 128, ``output_maxscore`` must be False (the sparse
    path produces no max-score)."""
    topk = check_int("kv_block_num", kv_block_num, min=1, max=64)
    if page_size is not None and page_size != BLOCK:
        raise ValueError(f"page_size: expected None (ragged) or {BLOCK} (= the sparse block size), got {page_size}")
    if output_maxscore:
        raise ValueError("output_maxscore: not available on the sparse path (run the dense index pass for scores)")
    base = fmha_plan(qo_lens, kv_lens, num_qo_heads, num_kv_heads, page_size=page_size, causal=causal,
                     qo_offset=qo_offset, output_maxscore=False, kv_block_num=topk, device=device)
    seqused = None
    if base.causal:
        used = []
        for b, (ql, kl, off) in enumerate(zip(base.qo_lens, base.kv_lens, base.qo_offset_host)):
            if off > kl - ql:
                raise ValueError(
                    f"qo_offset[{b}]: the sparse path supports qo_offset <= kv_len - qo_len = {kl - ql}, got {off} "
                    "(use msa.core.fmha with kv_block_indexes for queries positioned past the end of their KV)"
                )
            used.append(max(0, ql + off))
        seqused = torch.tensor(used, dtype=torch.int32).to(base.device)
    total_rows = sum(-(-n // BLOCK) for n in base.kv_lens)
    max_pages = max((-(-n // BLOCK) for n in base.kv_lens), default=0)
    return SparseFmhaPlan(base=base, topk=topk, total_rows=total_rows, seqused_k=seqused, max_pages=max_pages)


def page_table_from_kv_indices(kv_indices: torch.Tensor, kv_page_indptr: torch.Tensor, max_pages: int) -> torch.Tensor:
    """Flat page list + ``[B+1]`` indptr -> ``[B, max(max_pages, 1)]`` int32 page table (unused slots 0).

    Device ops only; the width comes from the plan, so nothing is read back from the device."""
    batch = kv_page_indptr.shape[0] - 1
    width = max(max_pages, 1)
    dev = kv_indices.device
    start = kv_page_indptr[:-1].to(torch.int64).view(batch, 1)
    count = (kv_page_indptr[1:] - kv_page_indptr[:-1]).to(torch.int64).view(batch, 1)
    col = torch.arange(width, device=dev, dtype=torch.int64).view(1, width)
    live = col < count
    if kv_indices.numel() == 0:
        return torch.zeros(batch, width, dtype=torch.int32, device=dev)
    idx = (start + col).clamp(0, kv_indices.numel() - 1)
    return torch.where(live, kv_indices.to(torch.int64)[idx], torch.zeros_like(idx)).to(torch.int32)


def _selections_to_q2k(sel: torch.Tensor, plan: SparseFmhaPlan) -> torch.Tensor:
    hq, hkv = plan.num_qo_heads, plan.num_kv_heads
    check_tensor("kv_block_indexes", sel, dtype=torch.int32, ndim=3, device=plan.device)
    if sel.shape[0] != plan.total_q or sel.shape[2] != plan.topk or sel.shape[1] not in (hkv, hq):
        heads = f"{hkv}" if hkv == hq else f"{hkv} or {hq}"
        raise ValueError(f"kv_block_indexes: expected shape [{plan.total_q}, {heads}, {plan.topk}] "
                         f"([total_q, Hkv or Hq, kv_block_num]), got {list(sel.shape)}")
    if sel.shape[1] != hkv:
        sel = sel[:, :: hq // hkv]  # the first query head of every GQA group
    return sel.transpose(0, 1).contiguous()


def _fold_scales(q, plan, sm_scale, q_scale, k_scale, v_scale, o_scale):
    """Returns (q, softmax_scale, out_mult [Hq] tensor or float)."""
    from msa.core.validation import check_scale  # noqa: PLC0415

    hq, hkv = plan.num_qo_heads, plan.num_kv_heads
    g = hq // hkv
    for name, s, heads, what in (("q_scale", q_scale, hq, "query heads"), ("k_scale", k_scale, hkv, "KV heads"),
                                 ("v_scale", v_scale, hkv, "KV heads"), ("o_scale", o_scale, hq, "query heads")):
        check_scale(name, s, heads=heads, device=q.device, what=what)
    if sm_scale is None:
        sm_scale = 1.0 / math.sqrt(q.shape[-1])
    scale = float(sm_scale)
    qk_head = None
    for s, rep in ((q_scale, 1), (k_scale, g)):
        if s is None:
            continue
        if isinstance(s, torch.Tensor):
            per_q = s.float().repeat_interleave(rep)
            qk_head = per_q if qk_head is None else qk_head * per_q
        else:
            scale *= float(s)
    if qk_head is not None:  # per-head logit scale: fold into Q (an fp8 Q becomes bf16 over the fp8 KV cache)
        q = (q.float() * qk_head.view(1, hq, 1)).to(torch.bfloat16 if q.dtype == torch.float8_e4m3fn else q.dtype)
    out_mult = 1.0
    for s, rep in ((v_scale, g), (o_scale, 1)):
        if s is None:
            continue
        out_mult = out_mult * (s.float().repeat_interleave(rep) if isinstance(s, torch.Tensor) else float(s))
    return q, scale, out_mult


def sparse_fmha(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    plan: SparseFmhaPlan,
    *,
    kv_block_indexes: torch.Tensor,
    kv_indices: torch.Tensor | None = None,
    page_table: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    max_score: torch.Tensor | None = None,
    sm_scale: float | None = None,
    q_scale=None,
    k_scale=None,
    v_scale=None,
    o_scale=None,
    output_o: bool = True,
    output_maxscore: bool = False,
    return_lse: bool = False,
    validate: bool | None = None,
    backend: str | None = None,
):
    """Sparse attention with ``msa.core.fmha``'s call shape: returns ``(out, None)`` or ``(out, None, lse)``.

    ``kv_block_indexes [total_q, Hkv or Hq, kv_block_num]`` int32 is required (ascending, ``-1`` tail, as from
    ``sparse_topk_select``). Paged K/V take the flat ``kv_indices`` (or a ready ``page_table [B, max_pages]``).
    """
    if not isinstance(plan, SparseFmhaPlan):
        raise TypeError(f"plan: expected a SparseFmhaPlan from sparse_fmha_plan(), got {type(plan).__name__}")
    if kv_block_indexes is None:
        raise ValueError("kv_block_indexes: required by the sparse path (e.g. the output of sparse_topk_select)")
    if not output_o:
        raise ValueError("output_o: the sparse path always computes O (output_o=False is the dense index pass)")
    if output_maxscore or max_score is not None:
        raise ValueError("output_maxscore: not available on the sparse path (max_score must be None)")
    check_tensor("q", q, ndim=3, shape=[plan.total_q, plan.num_qo_heads, None], device=plan.device)
    hkv = plan.num_kv_heads
    if plan.paged:
        check_tensor("k", k, ndim=4, shape=[None, hkv, BLOCK, q.shape[-1]], device=q.device)
        if page_table is None:
            if kv_indices is None:
                raise ValueError("kv_indices: required for a paged plan (or pass page_table)")
            check_tensor("kv_indices", kv_indices, dtype=torch.int32, ndim=1, shape=[plan.num_pages],
                         device=q.device, contiguous=True)
            page_table = page_table_from_kv_indices(kv_indices, plan.kv_page_indptr, plan.max_pages)
    else:
        check_tensor("k", k, ndim=3, shape=[plan.total_kv, hkv, q.shape[-1]], device=q.device)
        if kv_indices is not None or page_table is not None:
            raise ValueError("kv_indices: given, but the plan is ragged (page_size=None)")
    out_dtype = torch.bfloat16 if q.dtype == torch.float8_e4m3fn else q.dtype
    if out is not None:
        check_tensor("out", out, dtype=out_dtype, shape=[plan.total_q, plan.num_qo_heads, v.shape[-1]],
                     device=q.device)
    q2k = _selections_to_q2k(kv_block_indexes, plan)
    if validation_enabled(validate):
        nblk = torch.tensor([-(-n // BLOCK) for n in plan.kv_lens], dtype=torch.int64)
        cu_q = torch.tensor(plan.qo_indptr_host, dtype=torch.int64)
        check_selection_values("kv_block_indexes", q2k.cpu().to(torch.int64), cu_q, nblk)
    q_eff, scale, out_mult = _fold_scales(q, plan, sm_scale, q_scale, k_scale, v_scale, o_scale)
    want_schedule = q.device.type == "cuda"
    csr = build_k2q_csr(q2k, plan.qo_indptr, plan.kv_indptr, BLOCK, total_k=plan.total_kv, total_rows=plan.total_rows,
                        max_seqlen_k=plan.max_kv_len, max_seqlen_q=plan.max_qo_len,
                        qhead_per_kv=plan.num_qo_heads // hkv, return_schedule=want_schedule, validate=validate)
    res = sparse_atten_func(
        q_eff, k, v, csr[0], csr[1], plan.topk, cu_seqlens_q=plan.qo_indptr, cu_seqlens_k=plan.kv_indptr,
        max_seqlen_q=plan.max_qo_len, max_seqlen_k=plan.max_kv_len, blk_kv=BLOCK, causal=plan.causal,
        softmax_scale=scale, return_softmax_lse=return_lse, page_table=page_table, seqused_k=plan.seqused_k,
        schedule=csr[2] if want_schedule else None, validate=validate, backend=backend,
    )
    o, lse = (res if return_lse else (res, None))
    if isinstance(out_mult, torch.Tensor):
        o = (o.float() * out_mult.view(1, -1, 1)).to(out_dtype)
    elif out_mult != 1.0:
        o = (o.float() * out_mult).to(out_dtype)
    else:
        o = o.to(out_dtype)
    if out is not None:
        out.copy_(o)
        o = out
    return (o, None, lse) if return_lse else (o, None)
