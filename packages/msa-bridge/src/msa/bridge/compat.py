"""Upstream (MiniMax-AI/MSA ``fmha_sm100``) names mapped onto msa, where the semantics match.

For code written against ``fmha_sm100`` / ``fmha_sm100.sparse``: ``from msa.bridge import compat as fmha_sm100``.
Keyword spellings follow upstream (``-1`` for "unset", ``qo_segment_lens``, ``check_input_valid``, ``output``).
Performance hints msa does not need (``num_kv_splits``, ``usable_SM_count``, ``split_prefill_decode``,
``use_fp8_kvcache``, ``stream``) are accepted and ignored. Differences that change results raise instead of being
silently mis-served:

- ``fmha_sm100_plan`` returns an opaque plan (an msa ``FmhaPlan`` or ``SparseFmhaPlan``) rather than upstream's
  5-tuple; pass it unchanged to ``fmha_sm100`` exactly as upstream documents. Like upstream, ``kv_block_num > 0``
  with ``sparse_kernel_mode='prefill'`` (or ``'auto'`` and a query longer than 32) plans the sparse (CSR) path.
- ``q_offset_override`` is not supported (``NotImplementedError``).
- ``sparse_fmha`` applies ``q/k/v/o`` scales (upstream's adapter ignores them, which disagrees with its dense
  path); unscaled calls give identical results.
- ``build_k2q_csr`` packs rows batch-major (upstream: block-major across the batch); identical for one request.
  Use msa's builder with msa's ``sparse_atten_func`` - they agree with each other.
- ``fp4_indexer_block_scores`` takes the public (linear) scale layout only; ``scale_layout="preordered_mma"``
  (upstream's default) raises ``NotImplementedError``.
- ``sparse_topk_select`` accepts any ``topk`` in 1..64 (upstream: exactly 16).
"""

from __future__ import annotations

import torch
from msa.core import FmhaPlan, fmha, fmha_plan
from msa.core import sparse_topk_select as _topk
from msa.cute import (
    SparseDecodePagedAttentionWrapper,
    sparse_atten_func,
    sparse_decode_atten_func,
)
from msa.cute import build_k2q_csr as _build_k2q_csr
from msa.cute import (
    fp4_indexer_block_scores as _fp4_indexer,
)
from msa.cute.quant import (
    nvfp4_global_scale_from_amax,
)
from msa.cute.quant import (
    swizzle_nvfp4_scale_to_128x4 as _swizzle,
)

from .bridge import SparseFmhaPlan
from .bridge import sparse_fmha as _sparse_fmha
from .bridge import sparse_fmha_plan as _sparse_fmha_plan

__all__ = [
    "fmha_sm100_plan",
    "fmha_sm100",
    "sparse_topk_select",
    "sparse_fmha_plan",
    "sparse_fmha",
    "sparse_atten_func",
    "sparse_decode_atten_func",
    "SparseDecodePagedAttentionWrapper",
    "fp4_indexer_block_scores",
    "build_k2q_csr",
    "nvfp4_global_scale_from_amax",
    "swizzle_nvfp4_scale_to_128x4",
]

_IGNORED_HINTS = ("num_kv_splits", "usable_SM_count", "split_prefill_decode", "use_fp8_kvcache", "stream")
_SPARSE_PREFILL_MIN_Q = 32  # upstream routes sparse work with longer queries to the CuTe (CSR) path


def _unset(v):
    return None if v is None or (isinstance(v, int) and not isinstance(v, bool) and v < 0) else v


def _max_len(lens) -> int:
    if isinstance(lens, torch.Tensor):
        return int(lens.max()) if lens.numel() else 0
    return max(lens, default=0)


def fmha_sm100_plan(qo_segment_lens, kv_segment_lens, *args, qo_offset=None, split_prefill_decode=True, **kwargs):
    """``fmha_sm100_plan(qo_lens, kv_lens, num_qo_heads[, num_kv_heads], **kw)`` -> an opaque msa plan."""
    del split_prefill_decode  # msa plans mixed batches as one (no decode/prefill split needed)
    names = ("num_qo_heads", "num_kv_heads")
    if len(args) > len(names):
        raise TypeError(f"fmha_sm100_plan: expected at most {len(names)} positional head counts, got {len(args)}")
    for n, a in zip(names, args):
        if n in kwargs:
            raise TypeError(f"{n}: given both positionally and by keyword")
        kwargs[n] = a
    for h in _IGNORED_HINTS:
        kwargs.pop(h, None)
    mode = kwargs.pop("sparse_kernel_mode", "auto")
    if mode not in ("auto", "prefill", "decode"):
        raise ValueError(f"sparse_kernel_mode: expected 'auto', 'prefill' or 'decode', got {mode!r}")
    hq = kwargs.pop("num_qo_heads", None)
    if hq is None:
        raise TypeError("num_qo_heads: required")
    hkv = _unset(kwargs.pop("num_kv_heads", None))
    page_size = _unset(kwargs.pop("page_size", None))
    kv_block_num = _unset(kwargs.pop("kv_block_num", None))
    causal = kwargs.pop("causal", True)
    output_maxscore = kwargs.pop("output_maxscore", False)
    device = kwargs.pop("device", None)
    if kwargs:
        raise TypeError(f"fmha_sm100_plan: unexpected arguments {sorted(kwargs)}")
    sparse_prefill = kv_block_num is not None and not output_maxscore and (
        mode == "prefill" or (mode == "auto" and _max_len(qo_segment_lens) > _SPARSE_PREFILL_MIN_Q)
    )
    if sparse_prefill:
        return _sparse_fmha_plan(qo_segment_lens, kv_segment_lens, hq, hkv, page_size=page_size,
                                 kv_block_num=kv_block_num, causal=causal, qo_offset=qo_offset, device=device)
    return fmha_plan(qo_segment_lens, kv_segment_lens, hq, hkv, page_size=page_size, causal=causal,
                     qo_offset=qo_offset, output_maxscore=output_maxscore, kv_block_num=kv_block_num, device=device)


def _scale_kwargs(kwargs: dict) -> dict:
    return {n: kwargs.pop(n, None) for n in ("sm_scale", "q_scale", "k_scale", "v_scale", "o_scale")}


def fmha_sm100(q, k, v, plan_info, kv_indices=None, kv_block_indexes=None, q_offset_override=None, out=None,
               max_score=None, page_table=None, **kwargs):
    """Returns ``(out, max_score)`` like upstream (either may be None)."""
    if q_offset_override is not None:
        raise NotImplementedError("q_offset_override: not supported by msa; plan with the wanted qo_offset instead")
    scales = _scale_kwargs(kwargs)
    validate = bool(kwargs.pop("check_input_valid", False)) or None
    output_o = kwargs.pop("output_o", True)
    if isinstance(plan_info, SparseFmhaPlan):
        kwargs.pop("output_maxscore", None)  # upstream's sparse adapter never produces max_score
        if kwargs:
            raise TypeError(f"fmha_sm100: unexpected arguments {sorted(kwargs)}")
        o, _ = _sparse_fmha(q, k, v, plan_info, kv_block_indexes=kv_block_indexes, kv_indices=kv_indices,
                            page_table=page_table, out=out, output_o=output_o, validate=validate, **scales)
        return o, None
    if not isinstance(plan_info, FmhaPlan):
        raise TypeError(f"plan_info: expected a plan from fmha_sm100_plan(), got {type(plan_info).__name__}")
    if page_table is not None:
        raise ValueError("page_table: only supported by sparse prefill plans")
    output_maxscore = kwargs.pop("output_maxscore", plan_info.output_maxscore) and plan_info.output_maxscore
    if kwargs:
        raise TypeError(f"fmha_sm100: unexpected arguments {sorted(kwargs)}")
    if not output_maxscore:
        output_o = True  # upstream forces O on when there is no max-score to produce
    return fmha(q, k, v, plan_info, kv_indices=kv_indices, kv_block_indexes=kv_block_indexes, out=out,
                max_score=max_score if output_maxscore else None, output_o=output_o,
                output_maxscore=output_maxscore, validate=validate, **scales)


def sparse_topk_select(max_score, topk, num_valid_pages=None, output=None, force_begin_blocks=0, force_end_blocks=0):
    return _topk(max_score, topk, num_valid_pages=num_valid_pages, force_begin_blocks=force_begin_blocks,
                 force_end_blocks=force_end_blocks, out=output)


def sparse_fmha_plan(qo_segment_lens, kv_segment_lens, num_qo_heads, num_kv_heads=-1, qo_offset=None,
                     num_kv_splits=-1, page_size=-1, output_maxscore=False, kv_block_num=-1, causal=True,
                     usable_SM_count=-1, use_fp8_kvcache=False, device=None):
    del num_kv_splits, usable_SM_count, use_fp8_kvcache
    kbn = _unset(kv_block_num)
    if kbn is None:
        raise ValueError(f"kv_block_num: required (> 0) for the sparse path, got {kv_block_num}")
    return _sparse_fmha_plan(qo_segment_lens, kv_segment_lens, num_qo_heads, _unset(num_kv_heads),
                             page_size=_unset(page_size), kv_block_num=kbn, causal=causal, qo_offset=qo_offset,
                             output_maxscore=output_maxscore, device=device)


def sparse_fmha(q, k, v, plan_info, out=None, max_score=None, sm_scale=None, q_scale=None, k_scale=None,
                v_scale=None, o_scale=None, kv_indices=None, output_maxscore=True, output_o=True,
                kv_block_indexes=None, q_offset_override=None, check_input_valid=False, page_table=None):
    """Upstream's adapter signature; returns ``(out, None)``."""
    del output_maxscore  # upstream's default is True but the adapter never produces max_score
    if max_score is not None:
        raise ValueError("max_score: not produced by the sparse path")
    if q_offset_override is not None:
        raise NotImplementedError("q_offset_override: not supported by msa; plan with the wanted qo_offset instead")
    o, _ = _sparse_fmha(q, k, v, plan_info, kv_block_indexes=kv_block_indexes, kv_indices=kv_indices,
                        page_table=page_table, out=out, sm_scale=sm_scale, q_scale=q_scale, k_scale=k_scale,
                        v_scale=v_scale, o_scale=o_scale, output_o=output_o, validate=bool(check_input_valid) or None)
    return o, None


def build_k2q_csr(q2k_indices, cu_seqlens_q, cu_seqlens_k, kv_block_size, *, total_k=None, max_seqlen_k=None,
                  max_seqlen_q=None, total_rows=None, qhead_per_kv=1, return_schedule=False):
    return _build_k2q_csr(q2k_indices, cu_seqlens_q, cu_seqlens_k, kv_block_size, total_k=total_k,
                          total_rows=total_rows, max_seqlen_k=max_seqlen_k, max_seqlen_q=max_seqlen_q,
                          qhead_per_kv=qhead_per_kv, return_schedule=return_schedule)


def fp4_indexer_block_scores(q_fp4, k_fp4, q_scale, k_scale, cu_seqlens_q, cu_seqlens_k, cu_page_offsets, *,
                             max_seqlen_q, max_seqlen_k, kv_indices, fp4_format, causal=False, qo_offset=None,
                             scale_layout="public"):
    if scale_layout not in ("public", "linear"):
        raise NotImplementedError(f"scale_layout: only the public (linear) layout is supported, got {scale_layout!r}")
    return _fp4_indexer(q_fp4, k_fp4, q_scale, k_scale, cu_seqlens_q, cu_seqlens_k, cu_page_offsets,
                        max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k, kv_indices=kv_indices,
                        fp4_format=fp4_format, causal=causal, qo_offset=qo_offset)


def swizzle_nvfp4_scale_to_128x4(scale: torch.Tensor, *, rows: int, cols: int) -> torch.Tensor:
    """Upstream signature: the leading ``[rows, cols]`` of a 2-D logical scale -> padded 128x4 tiled layout."""
    if scale.dim() != 2:
        raise ValueError(f"scale: expected a 2-D tensor, got shape {list(scale.shape)}")
    if scale.shape[0] < rows or scale.shape[1] < cols:
        raise ValueError(f"scale: expected at least [{rows}, {cols}], got {list(scale.shape)}")
    return _swizzle(scale[:rows, :cols].contiguous())
