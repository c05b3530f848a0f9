"""Paged decode attention: ``sparse_decode_atten_func`` and the plan/run ``SparseDecodePagedAttentionWrapper``.

Every request has the same ``seqlen_q`` queries (decode: 1, MTP: a few); ``q [B*seqlen_q, Hq, D]``. Paged
``k/v [pages, Hkv, blk_kv, D]``, ``page_table [B, max_pages]`` int32, ``seqused_k [B]`` int32 = keys in the cache.
Query ``i`` of request ``b`` sees key ``j`` iff ``j < seqused_k[b]`` and (causal) ``j <= seqused_k[b] - seqlen_q
+ i``. With ``q2k_indices [Hkv, B*seqlen_q, topk]`` (batch-local block ids, ``-1`` tail) a query only sees keys of
its selected blocks (sparse); without, all its keys (dense). bf16 / fp16 / fp8-e4m3 Q/K/V (fp8 K/V may sit under
a bf16/fp16 Q), any GQA ratio. Output bf16 for fp8 Q else Q's dtype; LSE ``[B*seqlen_q, Hq]`` fp32.

Generalises upstream's paged FP8 decode (fp8 only, G=16, dense only; its sparse path raises NotImplementedError).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from msa.core.validation import check_int, check_tensor, validation_enabled

from . import _kernels
from ._common import (
    cdiv,
    check_compute_device,
    check_head_ratio,
    check_positive_float,
    check_qkv_dtypes,
    is_capturing,
    out_dtype_for,
)
from .csr import check_selection_values
from .reference import gather_block_attention

__all__ = ["sparse_decode_atten_func", "SparseDecodePagedAttentionWrapper"]

OP = "sparse_decode_atten_func"
KERNEL_MODULE = "msa.cute.kernels.sparse_decode_sm90"
_kernels.register_optional_kernel(OP, KERNEL_MODULE)


@dataclass
class _DecodePlan:
    batch: int
    seqlen_q: int
    max_seqlen_k: int
    blk_kv: int
    causal: bool
    num_qo_heads: int | None
    num_kv_heads: int | None
    head_dim: int | None
    page_table: torch.Tensor
    seqused_k: torch.Tensor
    q2k: torch.Tensor  # [Hkv or 1, total_q, W]: the given selection, or every block (dense)
    sparse: bool
    token_batch: torch.Tensor
    token_pos: torch.Tensor
    causal_offset: torch.Tensor


def _make_plan(*, page_table, seqused_k, seqlen_q, max_seqlen_k, q2k_indices, num_qo_heads, num_kv_heads, head_dim,
               blk_kv, causal, validate) -> _DecodePlan:
    check_tensor("page_table", page_table, dtype=torch.int32, ndim=2, last_dim_contiguous=True)
    check_compute_device("page_table", page_table)
    dev = page_table.device
    batch = page_table.shape[0]
    check_tensor("seqused_k", seqused_k, dtype=torch.int32, shape=[batch], device=dev, contiguous=True)
    seqlen_q = check_int("seqlen_q", seqlen_q, min=1)
    max_seqlen_k = check_int("max_seqlen_k", max_seqlen_k, min=0)
    blk_kv = check_int("blk_kv", blk_kv, min=1)
    if not isinstance(causal, bool):
        raise TypeError(f"causal: expected a bool, got {type(causal).__name__}")
    if page_table.shape[1] * blk_kv < max_seqlen_k:
        raise ValueError(f"page_table: expected at least ceil(max_seqlen_k/blk_kv) = {cdiv(max_seqlen_k, blk_kv)} "
                         f"columns, got {page_table.shape[1]}")
    for name, val in (("num_qo_heads", num_qo_heads), ("num_kv_heads", num_kv_heads), ("head_dim", head_dim)):
        if val is not None:
            check_int(name, val, min=1)
    if num_qo_heads is not None and num_kv_heads is not None and num_qo_heads % num_kv_heads:
        raise ValueError(f"num_kv_heads: expected a divisor of num_qo_heads={num_qo_heads}, got {num_kv_heads}")
    total_q = batch * seqlen_q
    if q2k_indices is not None:
        check_tensor("q2k_indices", q2k_indices, dtype=torch.int32, ndim=3, device=dev, last_dim_contiguous=True)
        if q2k_indices.shape[1] != total_q:
            raise ValueError(f"q2k_indices: expected shape [Hkv, batch*seqlen_q = {total_q}, topk], "
                             f"got {list(q2k_indices.shape)}")
        if num_kv_heads is not None and q2k_indices.shape[0] != num_kv_heads:
            raise ValueError(f"q2k_indices: expected {num_kv_heads} heads (num_kv_heads) in dim 0, "
                             f"got {list(q2k_indices.shape)}")
        check_int("q2k_indices.shape[2] (topk)", q2k_indices.shape[2], min=1, max=64)
    if validation_enabled(validate):
        su = seqused_k.cpu().to(torch.int64)
        if bool(((su < 0) | (su > max_seqlen_k)).any()):
            raise ValueError(f"seqused_k: expected values in [0, max_seqlen_k={max_seqlen_k}], got {su.tolist()}")
        nblk = torch.div(su + blk_kv - 1, blk_kv, rounding_mode="floor")
        pt = page_table.cpu().to(torch.int64)
        used = torch.arange(pt.shape[1]).view(1, -1) < nblk.view(-1, 1)
        if bool((used & (pt < 0)).any()):
            b, j = (used & (pt < 0)).nonzero()[0].tolist()
            raise ValueError(f"page_table: entry [{b}, {j}] = {int(pt[b, j])} is negative but holds live keys")
        if q2k_indices is not None:
            cu_q = torch.arange(batch + 1, dtype=torch.int64) * seqlen_q
            check_selection_values("q2k_indices", q2k_indices.cpu().to(torch.int64), cu_q, nblk)

    tok = torch.arange(total_q, device=dev, dtype=torch.int64)
    token_batch = torch.div(tok, seqlen_q, rounding_mode="floor")
    token_pos = tok - token_batch * seqlen_q
    if q2k_indices is None:
        width = cdiv(max_seqlen_k, blk_kv)
        q2k = torch.arange(width, device=dev, dtype=torch.int32).view(1, 1, width).expand(1, total_q, width)
    else:
        q2k = q2k_indices
    return _DecodePlan(
        batch=batch, seqlen_q=seqlen_q, max_seqlen_k=max_seqlen_k, blk_kv=blk_kv, causal=causal,
        num_qo_heads=num_qo_heads, num_kv_heads=num_kv_heads, head_dim=head_dim, page_table=page_table,
        seqused_k=seqused_k, q2k=q2k, sparse=q2k_indices is not None, token_batch=token_batch, token_pos=token_pos,
        causal_offset=seqused_k.to(torch.int64) - seqlen_q,
    )


def _check_run_args(plan: _DecodePlan, q, k, v, softmax_scale, out, lse):
    check_tensor("q", q, ndim=3, device=plan.page_table.device, last_dim_contiguous=True)
    check_tensor("k", k, ndim=4, device=q.device, last_dim_contiguous=True)
    check_tensor("v", v, ndim=4, device=q.device, last_dim_contiguous=True)
    check_qkv_dtypes(q, k, v)
    total_q, hq, d = q.shape
    if total_q != plan.batch * plan.seqlen_q:
        raise ValueError(f"q: expected {plan.batch * plan.seqlen_q} rows (batch*seqlen_q of the plan), "
                         f"got shape {list(q.shape)}")
    if plan.num_qo_heads is not None and hq != plan.num_qo_heads:
        raise ValueError(f"q: expected {plan.num_qo_heads} heads (num_qo_heads of the plan), got {hq}")
    if plan.head_dim is not None and d != plan.head_dim:
        raise ValueError(f"q: expected head dim {plan.head_dim} (head_dim of the plan), got {d}")
    hkv = k.shape[1]
    check_head_ratio(hq, hkv)
    if plan.num_kv_heads is not None and hkv != plan.num_kv_heads:
        raise ValueError(f"k: expected {plan.num_kv_heads} heads (num_kv_heads of the plan), got {hkv}")
    if plan.sparse and plan.q2k.shape[0] != hkv:
        raise ValueError(f"k: expected {plan.q2k.shape[0]} KV heads (q2k_indices.shape[0]), got {hkv}")
    if k.shape[2] != plan.blk_kv or k.shape[3] != d:
        raise ValueError(f"k: expected shape [pages, Hkv, blk_kv={plan.blk_kv}, {d}], got {list(k.shape)}")
    if v.shape[:3] != k.shape[:3]:
        raise ValueError(f"v: expected shape {list(k.shape[:3])} + [Dv], got {list(v.shape)}")
    scale = check_positive_float("softmax_scale", softmax_scale, allow_none=True)
    dv = v.shape[-1]
    if out is not None:
        check_tensor("out", out, dtype=out_dtype_for(q.dtype), shape=[total_q, hq, dv], device=q.device)
    if lse is not None:
        check_tensor("lse", lse, dtype=torch.float32, shape=[total_q, hq], device=q.device)
    return scale if scale is not None else d ** -0.5


def _run(plan: _DecodePlan, q, k, v, scale, return_lse, out, lse, backend):
    choice = _kernels.choose(
        OP, q.device, backend, q_dtype=q.dtype, kv_dtype=k.dtype, head_dim=q.shape[-1], head_dim_v=v.shape[-1],
        qhead_per_kv=q.shape[1] // k.shape[1], seqlen_q=plan.seqlen_q, blk_kv=plan.blk_kv, causal=plan.causal,
        sparse=plan.sparse, topk=plan.q2k.shape[-1] if plan.sparse else None,
    )
    if choice != "reference":
        return _kernels.run_kernel(KERNEL_MODULE, plan=plan, q=q, k=k, v=v, softmax_scale=scale,
                                   return_softmax_lse=return_lse, out=out, lse=lse)
    hkv = k.shape[1]
    q2k = plan.q2k if plan.sparse else plan.q2k.expand(hkv, -1, -1)
    o, m, _ = gather_block_attention(
        q, k, v, q2k, token_batch=plan.token_batch, token_pos=plan.token_pos, kv_len=plan.seqused_k.to(torch.int64),
        softmax_scale=scale, block_size=plan.blk_kv, causal=plan.causal, causal_offset=plan.causal_offset,
        page_table=plan.page_table,
    )
    o = o.to(out_dtype_for(q.dtype))
    if out is not None:
        out.copy_(o)
        o = out
    if lse is not None:
        lse.copy_(m)
        m = lse
    return (o, m) if return_lse else o


class SparseDecodePagedAttentionWrapper:
    """Plan once per decode step's metadata, run per layer.

    ``plan()`` does the host-side work (argument checks, optional value checks, metadata tensors) and must not be
    called while a CUDA graph is being captured; ``run()`` only checks shapes and launches device work, so it can
    be captured. The plan keeps references (not copies) to ``page_table``, ``seqused_k`` and ``q2k_indices``:
    updating them in place between replays is seen by ``run()``, but their shapes are fixed by the plan.
    """

    def __init__(self, *, blk_kv: int = 128, causal: bool = True, backend: str | None = None):
        self.blk_kv = check_int("blk_kv", blk_kv, min=1)
        if not isinstance(causal, bool):
            raise TypeError(f"causal: expected a bool, got {type(causal).__name__}")
        self.causal = causal
        self.backend = backend
        self._plan: _DecodePlan | None = None

    @property
    def is_planned(self) -> bool:
        return self._plan is not None

    def plan(self, *, page_table: torch.Tensor, seqused_k: torch.Tensor, seqlen_q: int, max_seqlen_k: int,
             q2k_indices: torch.Tensor | None = None, num_qo_heads: int | None = None,
             num_kv_heads: int | None = None, head_dim: int | None = 128, enable_cuda_graph: bool = False,
             max_grid_size: int | None = None, fixed_split_size: int | None = None, disable_split_kv: bool = False,
             validate: bool | None = None) -> None:
        """Record the step's metadata. ``enable_cuda_graph``, ``max_grid_size``, ``fixed_split_size`` and
        ``disable_split_kv`` are kernel scheduling hints (accepted for upstream parity; the reference ignores them).
        """
        if is_capturing():
            raise RuntimeError(
                "SparseDecodePagedAttentionWrapper.plan: called during CUDA graph capture; plan() does host work "
                "(checks, metadata allocation) - call it before capture and capture only run()"
            )
        self._plan = _make_plan(
            page_table=page_table, seqused_k=seqused_k, seqlen_q=seqlen_q, max_seqlen_k=max_seqlen_k,
            q2k_indices=q2k_indices, num_qo_heads=num_qo_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
            blk_kv=self.blk_kv, causal=self.causal, validate=validate,
        )

    def run(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, softmax_scale: float | None = None,
            return_softmax_lse: bool = False, out: torch.Tensor | None = None, lse: torch.Tensor | None = None):
        """Attention for the planned step: ``O`` or ``(O, LSE)``; writes into ``out`` / ``lse`` when given."""
        if self._plan is None:
            raise RuntimeError("SparseDecodePagedAttentionWrapper.run: called before plan()")
        scale = _check_run_args(self._plan, q, k, v, softmax_scale, out, lse)
        return _run(self._plan, q, k, v, scale, return_softmax_lse, out, lse, self.backend)


def sparse_decode_atten_func(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q2k_indices: torch.Tensor | None = None,
    *,
    page_table: torch.Tensor,
    seqused_k: torch.Tensor,
    seqlen_q: int,
    max_seqlen_k: int,
    blk_kv: int = 128,
    causal: bool = True,
    softmax_scale: float | None = None,
    return_softmax_lse: bool = False,
    validate: bool | None = None,
    backend: str | None = None,
):
    """One-shot paged decode attention (see the module docstring): ``O`` or ``(O, LSE)``."""
    check_tensor("q", q, ndim=3)
    check_compute_device("q", q)
    check_tensor("k", k, ndim=4)
    plan = _make_plan(
        page_table=page_table, seqused_k=seqused_k, seqlen_q=seqlen_q, max_seqlen_k=max_seqlen_k,
        q2k_indices=q2k_indices, num_qo_heads=q.shape[1], num_kv_heads=k.shape[1], head_dim=q.shape[2],
        blk_kv=blk_kv, causal=causal, validate=validate,
    )
    scale = _check_run_args(plan, q, k, v, softmax_scale, None, None)
    return _run(plan, q, k, v, scale, return_softmax_lse, None, None, backend)
