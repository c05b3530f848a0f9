"""Kernel backend of ``msa.cute.sparse_decode_atten_func`` / ``SparseDecodePagedAttentionWrapper`` (sparse calls):
msa-core's per-token block-sparse paged decode kernel (``msa.core.kernels.sparse_decode``, CUDA C++ built through
msa-cache), adapted to this API's layout.

The adaptation is device work only, so ``run()`` stays CUDA-graph capturable and sees in-place updates of the
plan's ``page_table`` / ``seqused_k`` / ``q2k_indices`` between replays (the wrapper's contract):

* ``page_table [B, max_pages]`` is the kernel's flat page list (request ``b`` starts at slot ``b * max_pages``);
* ``q2k_indices [Hkv, total_q, topk]`` is copied into the kernel's ``[total_q, Hkv, topk]`` (plan-time buffer);
* per-token ``(first slot, visible key limit)`` is recomputed from the live ``seqused_k`` on every run.

Served: bf16 / fp16 Q = K = V, fp8 e4m3 K/V under a bf16 / fp16 Q, and fp8 Q = K = V (output bf16); head dim 128,
``blk_kv`` 128, Hq / Hkv <= 16, top-k <= 64 per split (any k), causal or not. Dense calls (no selection) stay on the
reference.
"""

from __future__ import annotations

import torch

__all__ = ["available", "supports", "run"]

BLOCK = 128


def _core():
    from msa.core.kernels import sparse_decode  # noqa: PLC0415 - loads lazily (JIT, CUDA)

    return sparse_decode


def available(device) -> tuple[bool, str]:
    return _core().available(device)


def supports(*, q_dtype=None, kv_dtype=None, head_dim=None, head_dim_v=None, qhead_per_kv=None, blk_kv=None,
             sparse=False, topk=None, **_ignored) -> tuple[bool, str]:
    core = _core()
    if not sparse:
        return False, "sparse_decode: serves calls with q2k_indices only (dense decode uses the reference)"
    if not ((q_dtype in core.DTYPES and kv_dtype in (q_dtype, core.FP8)) or q_dtype == kv_dtype == core.FP8):
        return False, (f"sparse_decode: q/kv dtypes {q_dtype}/{kv_dtype} not built (bf16 / fp16 Q over K/V of its "
                       "dtype or fp8 e4m3; fp8 Q = K = V)")
    if head_dim != core.HEAD_DIM or head_dim_v not in (None, core.HEAD_DIM):
        return False, f"sparse_decode: head dims {head_dim}/{head_dim_v} not built ({core.HEAD_DIM})"
    if blk_kv != core.PAGE_SIZE:
        return False, f"sparse_decode: blk_kv {blk_kv} not built ({core.PAGE_SIZE})"
    if qhead_per_kv is None or not 1 <= qhead_per_kv <= core.MAX_GROUP:
        return False, f"sparse_decode: Hq / Hkv = {qhead_per_kv} not built (1..{core.MAX_GROUP})"
    return True, "ok"


class _KernelState:
    """Per-plan buffers (shapes fixed by the plan): the kernel's block list and token table, and its plan."""

    def __init__(self, plan, hq: int, hkv: int, device: torch.device, kv_bytes: int = 2):
        core = _core()
        total_q, topk = plan.batch * plan.seqlen_q, plan.q2k.shape[-1]
        self.key = (hq, hkv, device, kv_bytes)
        self.blocks = torch.empty(total_q, hkv, topk, dtype=torch.int32, device=device)
        tok_info = torch.empty(total_q, 2, dtype=torch.int32, device=device)
        tb = plan.token_batch.to(device)
        self.token_batch = tb
        tok_info[:, 0].copy_(tb * plan.page_table.shape[1])
        # visible keys of query i of a request: seqused_k - (seqlen_q - 1 - i) when causal, else seqused_k
        self.lim_delta = (plan.token_pos.to(device) + 1 - plan.seqlen_q).to(torch.int32) if plan.causal \
            else torch.zeros(total_q, dtype=torch.int32, device=device)
        self.dp = core.plan_for_shape(total_q, hq, hkv, topk, tok_info, kv_bytes=kv_bytes)


def run(*, plan, q, k, v, softmax_scale, return_softmax_lse, out, lse):
    core = _core()
    hq, hkv = q.shape[1], k.shape[1]
    state = getattr(plan, "_kernel_state", None)
    if state is None or state.key != (hq, hkv, q.device, k.element_size()):
        state = _KernelState(plan, hq, hkv, q.device, k.element_size())
        plan._kernel_state = state
    state.blocks.copy_(plan.q2k.permute(1, 0, 2))
    used = torch.index_select(plan.seqused_k, 0, state.token_batch)
    state.dp.tok_info[:, 1].copy_((used + state.lim_delta).clamp_(min=0))
    pages = plan.page_table if plan.page_table.is_contiguous() else plan.page_table.contiguous()
    total_q, dv = q.shape[0], v.shape[-1]
    k = k if k.is_contiguous() else k.contiguous()
    v = v if v.is_contiguous() else v.contiguous()
    o = out if out is not None and out.is_contiguous() else \
        torch.empty(total_q, hq, dv, dtype=torch.bfloat16 if q.dtype == core.FP8 else q.dtype, device=q.device)
    want_lse = return_softmax_lse or lse is not None  # a given lse is filled either way (the reference does)
    m = lse if lse is not None and lse.is_contiguous() else \
        (torch.empty(total_q, hq, dtype=torch.float32, device=q.device) if want_lse else None)
    core.launch(q if q.is_contiguous() else q.contiguous(), k, v, pages.view(-1), state.blocks, state.dp, o, m,
                float(softmax_scale) * core._LOG2E, 1.0)
    if out is not None and o is not out:
        out.copy_(o)
        o = out
    if lse is not None and m is not lse:
        lse.copy_(m)
        m = lse
    return (o, m) if return_softmax_lse else o
