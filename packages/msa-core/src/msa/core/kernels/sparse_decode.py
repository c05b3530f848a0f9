"""Per-token block-sparse paged decode attention (``csrc/sparse_decode``): plan, build and launch.

Serves ``msa.core.fmha`` calls with ``kv_block_indexes`` (issue 7's per-token block-sparse mode): bf16 / fp16, or
fp8 e4m3 Q = K = V (output bf16; ``msa.cute``'s decode API also sends fp8 K/V under a bf16 / fp16 Q; the fp8 chunks
stream at half the bytes and are converted to f16 in registers for f16 MMAs),
head dim 128 (Dqk = Dv), page size 128, Hq / Hkv <= 16, causal or not, optional LSE, scales as numbers or
per-head tensors (a per-query-head [Hq, 2] table the kernel reads). Any q_len and
any k work (each token is independent; k is cut into splits of <= 64 blocks); the kernel is tuned for decode /
MTP (q_len 1..32, k <= 64). Everything else is refused by :func:`supports` and falls back to the reference.

* :func:`plan` (host, once per length set; cached on the ``FmhaPlan``): per-token ``(first page-table slot,
  visible key limit)`` as one int32 device tensor, the split count from a small wave model
  (:func:`choose_splits`), and the fp32 partial-O / LSE workspace when splits > 1.
* :func:`run` (device): no host synchronisation, no allocation when ``out`` (and ``lse``) are given; one launch,
  plus a combine launch when splits > 1, both on the current stream (CUDA-graph safe).

``MSA_SPARSE_DECODE_SPLITS`` overrides the split count and ``MSA_SPARSE_DECODE_STAGES`` (2 | 3 | 4) the
pipeline depth (benchmark sweeps; read at plan time).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch

from ._device import cuda_kernel_available, module_for_device
from ._device import sm_count as _sm_count

__all__ = ["DecodePlan", "plan", "plan_for_shape", "launch", "run", "spec", "jit_specs", "available", "supports", "choose_splits", "STAGES"]

FAMILY = "sparse_decode"
SOURCES = ("sparse_decode.cu.jinja",)
HEAD_DIM = 128
PAGE_SIZE = 128
MAX_GROUP = 16  # query heads per KV head packed into one m16 MMA tile
MAX_BLOCKS_PER_SPLIT = 64
STAGES = 3  # 16-key K+V chunks in flight per warp (8 KiB each): 96 KiB per CTA, 2 CTAs per SM
STAGE_CHOICES = (2, 3, 4)  # MSA_SPARSE_DECODE_STAGES (experiments): 2 -> 64 KiB, 3 CTAs per SM; 4 -> 1 per SM
SMEM_PER_SM = 228 * 1024
DTYPES = (torch.bfloat16, torch.float16)
FP8 = torch.float8_e4m3fn
Q_DTYPES = DTYPES + (FP8,)  # fp8 q needs fp8 k / v (output bf16)
_PRESET_DTYPES = {"bf16", "bfloat16", "fp16", "float16", "fp8", "float8_e4m3fn"}
_LOG2E = 1.4426950408889634
# Wave model (units: one 128-key K+V block streamed by one CTA slot): per CTA fixed cost (Q load, block list,
# warp merge, output), per split the fp32 partial O written and read back (16 rows x 512 B x 2 = 1/4 block at
# G = 16), and the combine launch.
CTA_FIXED_COST = 0.5
PARTIAL_COST_PER_ROW = 0.25 / 16
COMBINE_COST = 0.6


def stages() -> int:
    forced = os.environ.get("MSA_SPARSE_DECODE_STAGES")
    n = int(forced) if forced else STAGES
    if n not in STAGE_CHOICES:
        raise ValueError(f"MSA_SPARSE_DECODE_STAGES: expected one of {STAGE_CHOICES}, got {forced!r}")
    return n


def smem_bytes(n_stages: int) -> int:
    """Mirrors smem_bytes<kStages>() in sparse_decode_kernel.cuh."""
    return max(4 * n_stages * 8192, 4 * 16 * 128 * 4) + 16 * 256 + 2 * 64 * 4 + 2 * 4 * 16 * 4 + 16


def ctas_per_sm(n_stages: int) -> int:
    """Resident CTAs per SM (occupancy; the split model no longer uses it: bandwidth is per SM, not per CTA)."""
    return max(1, min(3, SMEM_PER_SM // (smem_bytes(n_stages) + 1024)))  # 3: the register bound (146 x 128)


def spec(arch: str, n_stages: int = STAGES):
    from msa.core.jit import JitSpec

    return JitSpec(family=FAMILY, sources=SOURCES, params={"stages": n_stages}, arch=arch, use_cutlass=False)


def jit_specs(preset: dict, arch: str) -> list:
    """Warmup hook (msa.core.variants): one module per arch serves bf16 and fp16, causal or not."""
    dtypes = preset.get("dtypes", ["bf16"])
    dims = preset.get("head_dim", [HEAD_DIM])
    if not any(d in _PRESET_DTYPES for d in dtypes) or HEAD_DIM not in dims:
        return []
    return [spec(arch)]


def load_module(device: torch.device, n_stages: int = STAGES):
    return module_for_device(spec, device, n_stages)


def available(device) -> tuple[bool, str]:
    """Cheap (no compilation): a CUDA device of a supported compute capability and tvm-ffi importable."""
    return cuda_kernel_available(device, "sparse_decode")


def supports(
    *,
    dtype=None,
    head_dim_qk=None,
    head_dim_v=None,
    page_size=None,
    output_o=True,
    output_maxscore=False,
    sparse=False,
    gqa_ratio=None,
    kv_dtype=None,
    **_ignored,
) -> tuple[bool, str]:
    """Dispatch feature gate: only per-token sparse calls this kernel implements."""
    if not sparse:
        return False, "sparse_decode: serves per-token block-sparse calls (kv_block_indexes) only"
    if dtype is not None and dtype not in Q_DTYPES:
        return False, f"sparse_decode: dtype {dtype} not built (bf16 / fp16 / fp8 e4m3)"
    if kv_dtype is not None and kv_dtype != dtype and not (kv_dtype == FP8 and dtype in DTYPES):
        return False, f"sparse_decode: K/V dtype {kv_dtype} under a {dtype} q not built (q's dtype, or fp8 e4m3)"
    if head_dim_qk is not None and (head_dim_qk != HEAD_DIM or head_dim_v not in (None, HEAD_DIM)):
        return False, f"sparse_decode: head dims {head_dim_qk}/{head_dim_v} not built (Dqk = Dv = {HEAD_DIM})"
    if page_size != PAGE_SIZE:
        return False, f"sparse_decode: page_size {page_size} not built (paged K/V, page {PAGE_SIZE})"
    if not output_o or output_maxscore:
        return False, "sparse_decode: max_score output / output_o=False not implemented"
    if gqa_ratio is not None and not 1 <= gqa_ratio <= MAX_GROUP:
        return False, f"sparse_decode: Hq / Hkv = {gqa_ratio} > {MAX_GROUP} not built"
    return True, "ok"


def choose_splits(pairs: int, topk: int, group: int, sm_count: int, cta_per_sm: int = 1,
                  block_cost: float = 1.0) -> int:
    """Splits of each (token, KV head)'s k blocks minimising the modelled makespan: ceil(CTAs / slots) waves of
    (blocks per split + fixed + partial cost) plus the combine launch when split; slots = cta_per_sm per SM.
    The unit is an SM's share of HBM bandwidth, so one slot per SM (H100 sweep, run 2: batch 32 / 64 q_len 1
    stream at 86-87% / 92% of copy bandwidth unsplit vs 80% / 85% at 2 splits -- two CTAs on one SM do not
    read faster than one)."""
    slots = max(1, cta_per_sm * sm_count)
    lo = -(-topk // MAX_BLOCKS_PER_SPLIT)
    best, best_cost = lo, math.inf
    for s in range(lo, max(lo, topk) + 1):
        bps = -(-topk // s)
        if (s - 1) * bps >= topk:  # same blocks per split as a smaller s, with an empty split
            continue
        cost = -(-pairs * s // slots) * (bps * block_cost + CTA_FIXED_COST)
        if s > 1:
            cost += -(-pairs * s // slots) * PARTIAL_COST_PER_ROW * group + COMBINE_COST
        if cost < best_cost - 1e-9:
            best, best_cost = s, cost
    return best


@dataclass(eq=False)
class DecodePlan:
    tok_info: torch.Tensor  # int32 [total_q, 2]: first page-table slot of the request, visible key limit
    splits: int
    blocks_per_split: int
    stages: int
    part_o: torch.Tensor  # fp32 [total_q * Hq * splits * 128] (empty when splits == 1)
    part_lse: torch.Tensor  # fp32 [total_q * Hq * splits]
    lse_dummy: torch.Tensor
    kv_bytes: int = 2  # K/V element size the split count was chosen for


def token_info(fplan) -> list[int]:
    """Flat [total_q, 2] host list: (kv_page_indptr[b], exclusive visible key limit) per query token."""
    info: list[int] = []
    for b, (ql, kl) in enumerate(zip(fplan.qo_lens, fplan.kv_lens)):
        base = fplan.kv_page_indptr_host[b]
        for i in range(ql):
            lim = min(kl, i + fplan.qo_offset_host[b] + 1) if fplan.causal else kl
            info += [base, max(lim, 0)]
    return info


def plan(fplan, sm_count: int | None = None, kv_bytes: int = 2) -> DecodePlan:
    """Kernel plan for an ``msa.core.api.FmhaPlan`` made with ``page_size=128`` and ``kv_block_num``."""
    if fplan.page_size != PAGE_SIZE:
        raise NotImplementedError(f"sparse_decode: page_size {fplan.page_size} is not built (page {PAGE_SIZE})")
    if fplan.kv_block_num is None:
        raise ValueError("plan: made without kv_block_num (not a per-token sparse plan)")
    tok = torch.tensor(token_info(fplan), dtype=torch.int32).view(-1, 2).to(fplan.device)
    return plan_for_shape(fplan.total_q, fplan.num_qo_heads, fplan.num_kv_heads, fplan.kv_block_num, tok,
                          sm_count=sm_count, kv_bytes=kv_bytes)


def plan_for_shape(total_q: int, hq: int, hkv: int, topk: int, tok_info: torch.Tensor,
                   sm_count: int | None = None, kv_bytes: int = 2) -> DecodePlan:
    """Kernel plan from the shapes alone (split count, workspaces) around a caller-owned ``tok_info`` int32
    ``[total_q, 2]`` device tensor; callers that update ``tok_info`` in place (CUDA-graph replays with new
    lengths) reuse the plan. ``kv_bytes``: 1 for fp8 K/V (a block streams in half the time of a 16-bit one, so the
    fixed per-CTA costs weigh twice: H200 session 10 run 5, batch 16 q_len 1: 27.0 us unsplit, 19.1 at 2 splits,
    18.3 at 4; batch 32: 28.6 / 27.9 / 36.6; batch 64-128: unsplit best)."""
    if hq % hkv or hq // hkv > MAX_GROUP:
        raise NotImplementedError(f"sparse_decode: Hq / Hkv = {hq}/{hkv} is not built (a divisor, ratio <= "
                                  f"{MAX_GROUP})")
    if tuple(tok_info.shape) != (total_q, 2) or tok_info.dtype != torch.int32:
        raise ValueError(f"tok_info: expected int32 [{total_q}, 2], got {tok_info.dtype} {list(tok_info.shape)}")
    device = tok_info.device
    if sm_count is None:
        sm_count = _sm_count(device.index if device.index is not None else torch.cuda.current_device()) \
            if device.type == "cuda" else 132
    n_stages = stages()
    forced = os.environ.get("MSA_SPARSE_DECODE_SPLITS")
    splits = int(forced) if forced else choose_splits(total_q * hkv, topk, hq // hkv, sm_count,
                                                      block_cost=kv_bytes / 2)
    splits = max(-(-topk // MAX_BLOCKS_PER_SPLIT), min(splits, topk))
    bps = -(-topk // splits)
    splits = -(-topk // bps)  # no empty trailing split
    n = total_q * hq * splits if splits > 1 else 0
    f32 = dict(dtype=torch.float32, device=device)
    return DecodePlan(tok_info=tok_info, splits=splits, blocks_per_split=bps, stages=n_stages,
                      part_o=torch.empty(n * HEAD_DIM, **f32), part_lse=torch.empty(n, **f32),
                      lse_dummy=torch.empty(0, **f32), kv_bytes=kv_bytes)


def launch(q, k, v, kv_indices, kv_block_indexes, dp: DecodePlan, out, lse, scale_log2: float,
           out_scale: float, row_scale: torch.Tensor | None = None) -> None:
    """One kernel launch (+ combine when split) on the current stream; arguments already validated. fp8 tensors
    go in as their bytes (uint8 views). ``row_scale`` fp32 ``[Hq, 2]`` (per query head: logit scale in log2 units,
    output scale) replaces the two scalars."""
    if q.shape[0]:
        q, k, v = (t.view(torch.uint8) if t.dtype == FP8 else t for t in (q, k, v))
        load_module(q.device, dp.stages).sparse_decode(
            q, k, v, kv_indices, kv_block_indexes, dp.tok_info, out, dp.lse_dummy if lse is None else lse,
            dp.part_o, dp.part_lse, dp.lse_dummy if row_scale is None else row_scale, dp.splits,
            dp.blocks_per_split, scale_log2, out_scale, lse is not None, row_scale is not None,
        )


def _scalar(name: str, s) -> float:
    if s is None:
        return 1.0
    if isinstance(s, torch.Tensor):
        raise NotImplementedError(f"sparse_decode: {name} as a tensor goes through row_scales()")
    return float(s)


def row_scales(hq: int, hkv: int, sm_scale: float, q_scale=None, k_scale=None, v_scale=None, o_scale=None, *,
               device) -> torch.Tensor:
    """fp32 ``[Hq, 2]``: per query head ``h`` the logit scale ``sm_scale * q_scale[h] * k_scale[h // G] * log2(e)``
    and the output scale ``v_scale[h // G] * o_scale[h]`` (each scale a number, a 1-element tensor or per head;
    device ops only: no host synchronisation)."""
    g = hq // hkv

    def per_q(s, heads, rep):
        if s is None:
            return torch.ones(hq, dtype=torch.float32, device=device)
        if not isinstance(s, torch.Tensor):
            return torch.full((hq,), float(s), dtype=torch.float32, device=device)
        s = s.to(device=device, dtype=torch.float32)
        return s.reshape(1).expand(hq) if s.numel() == 1 else s.reshape(heads).repeat_interleave(rep)

    logit = per_q(q_scale, hq, 1) * per_q(k_scale, hkv, g) * (sm_scale * _LOG2E)
    out = per_q(v_scale, hkv, g) * per_q(o_scale, hq, 1)
    return torch.stack([logit, out], dim=1).contiguous()


def run(q, k, v, fplan, *, kv_indices, kv_block_indexes, out=None, sm_scale=None, q_scale=None, k_scale=None,
        v_scale=None, o_scale=None, return_lse=False, lse=None, output_o=True, output_maxscore=False,
        max_score=None):
    """Launch on arguments ``msa.core.fmha`` validated; returns ``(out, None)`` or ``(out, None, lse)``."""
    if output_maxscore or max_score is not None or not output_o:
        raise NotImplementedError("sparse_decode: max_score output / output_o=False is not implemented")
    if q.dtype not in Q_DTYPES or (k.dtype != q.dtype and not (k.dtype == FP8 and q.dtype in DTYPES)):
        raise NotImplementedError(f"sparse_decode: q / k dtypes {q.dtype} / {k.dtype} are not built (bf16 / fp16 Q "
                                  "over K / V of its dtype or fp8 e4m3; fp8 Q = K = V)")
    if q.shape[-1] != HEAD_DIM or v.shape[-1] != HEAD_DIM:
        raise NotImplementedError(f"sparse_decode: head dims {q.shape[-1]}/{v.shape[-1]} not built ({HEAD_DIM})")
    kv_bytes = k.element_size()
    dp = fplan.kernel.get("sparse_decode")
    if dp is None or dp.kv_bytes != kv_bytes:  # a plan serving both an fp8 and a 16-bit cache re-plans on a switch
        dp = fplan.kernel["sparse_decode"] = plan(fplan, kv_bytes=kv_bytes)
    sm = 1.0 / math.sqrt(HEAD_DIM) if sm_scale is None else float(sm_scale)
    tensors = any(isinstance(s, torch.Tensor) for s in (q_scale, k_scale, v_scale, o_scale))
    rows = row_scales(q.shape[1], k.shape[1], sm, q_scale, k_scale, v_scale, o_scale, device=q.device) \
        if tensors else None
    scale = 1.0 if tensors else sm * _scalar("q_scale", q_scale) * _scalar("k_scale", k_scale)
    out_scale = 1.0 if tensors else _scalar("v_scale", v_scale) * _scalar("o_scale", o_scale)
    if out is None:
        out = torch.empty(q.shape[0], q.shape[1], HEAD_DIM, dtype=torch.bfloat16 if q.dtype == FP8 else q.dtype,
                          device=q.device)
    if return_lse and lse is None:
        lse = torch.empty(q.shape[0], q.shape[1], dtype=torch.float32, device=q.device)
    launch(q, k, v, kv_indices, kv_block_indexes, dp, out, lse if return_lse else None, scale * _LOG2E, out_scale,
           rows)
    return (out, None, lse) if return_lse else (out, None)
