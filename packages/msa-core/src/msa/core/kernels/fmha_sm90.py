"""SM90 (Hopper) dense FMHA forward: a FlashAttention-3 style warp-specialized TMA + wgmma kernel.

Sources: ``msa/core/csrc/fmha_sm90`` (one tvm-ffi module per dtype x head dim x causal x paged variant, built by
:class:`msa.core.jit.JitSpec`). Split in two like every msa kernel:

* :func:`plan` (host, once per length set): the work list -- one item per (128-query tile, query head) --
  grouped so the KV heads in flight fit L2 and ordered longest first; persistent CTAs take items from it
  dynamically. :func:`run` builds it lazily from an :class:`msa.core.api.FmhaPlan` and caches it on the plan.
* :func:`run` (device): no host synchronisation, and no allocation when ``out`` (and ``lse``) are given.

Built so far: bf16 / fp16, head dim 128, ragged or paged K/V (page size 128), causal (bottom-right, per-request
``qo_offset``) or not, any GQA ratio, optional LSE. Other combinations raise :class:`NotImplementedError`.
SM100 is refused at plan time (the template set is SM90-only).
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = [
    "HEAD_DIMS",
    "DTYPES",
    "KernelPlan",
    "plan",
    "run",
    "jit_spec",
    "jit_specs",
    "available",
    "supports",
]

FAMILY = "fmha_sm90"
SOURCES = ("fmha_sm90_binding.cu.jinja",)
BLOCK_M = 128  # query rows per work item
BLOCK_N = 128  # keys per KV tile
PAGE_SIZE = 128  # the paged variant's page size (one page = one KV tile)
HEAD_DIMS = (128,)  # head dims built and validated so far (64 / 256 later)
DTYPES = {torch.bfloat16: "bfloat16", torch.float16: "float16"}
_PRESET_DTYPES = {"bf16": "bfloat16", "bfloat16": "bfloat16", "fp16": "float16", "float16": "float16"}
# K+V bytes that one section of the work list (a group of KV heads of one request) may touch: sections are
# consumed roughly one at a time by the persistent grid, so this keeps the K/V being read L2-resident.
L2_SECTION_BYTES = 32 << 20
WORK_FIELDS = 8  # int32 per work item, see WorkItem in fmha_sm90_traits.cuh
# Test/bench hook: a directory of prebuilt modules named <variant_tag>.so (e.g. carried to a GPU host that has
# no compiler); unset means build (or fetch from the msa-cache) through JitSpec.
PREBUILT_ENV = "MSA_FMHA_SM90_PREBUILT"


def variant_tag(dtype: str, head_dim: int, causal: bool, paged: bool) -> str:
    return f"fmha_sm90_{dtype}_d{head_dim}_causal{int(causal)}_paged{int(paged)}"


def jit_spec(dtype: str, head_dim: int, causal: bool, paged: bool, arch: str = "sm_90a"):
    from msa.core.jit import JitSpec

    if arch != "sm_90a":
        raise NotImplementedError(f"fmha_sm90: arch {arch!r} is not supported (the kernel uses sm_90a-only wgmma/TMA)")
    return JitSpec(
        family=FAMILY,
        sources=SOURCES,
        params={"dtype": dtype, "head_dim": int(head_dim), "causal": bool(causal), "paged": bool(paged)},
        arch=arch,
        use_cutlass=True,
    )


def jit_specs(preset: dict, arch: str) -> list:
    """Warmup generator hook (``msa.core.variants``): every variant a preset's dtypes x head dims need."""
    if arch != "sm_90a":
        return []  # SM100 has no variant of this family; fmha falls back (or refuses) at plan time
    dtypes = [_PRESET_DTYPES[d] for d in preset.get("dtypes", ["bf16"]) if d in _PRESET_DTYPES]
    dims = [d for d in preset.get("head_dim", list(HEAD_DIMS)) if d in HEAD_DIMS]
    return [
        jit_spec(dt, d, causal, paged, arch)
        for dt in dict.fromkeys(dtypes)
        for d in dims
        for causal in (True, False)
        for paged in (False, True)
    ]


@functools.cache
def _module(dtype: str, head_dim: int, causal: bool, paged: bool):
    prebuilt = os.environ.get(PREBUILT_ENV)
    if prebuilt:
        import tvm_ffi

        path = Path(prebuilt) / f"{variant_tag(dtype, head_dim, causal, paged)}.so"
        if not path.is_file():
            raise FileNotFoundError(f"{PREBUILT_ENV}={prebuilt}: no prebuilt module {path.name}")
        return tvm_ffi.load_module(str(path))
    return jit_spec(dtype, head_dim, causal, paged).load()


def available(device: torch.device) -> tuple[bool, str]:
    """Cheap check for dispatch: an SM90 CUDA device (no compilation here)."""
    if device.type != "cuda":
        return False, f"tensors are on {device}"
    major, minor = torch.cuda.get_device_capability(device)
    if major != 9:
        return False, f"fmha_sm90 needs an SM90 (Hopper) GPU, device {device} is sm_{major}{minor}"
    return True, ""


def supports(
    *,
    dtype=None,
    head_dim_qk=None,
    head_dim_v=None,
    page_size=None,
    output_o=True,
    output_maxscore=False,
    sparse=False,
    per_head_scales=False,
    **_ignored,
) -> tuple[bool, str]:
    """Whether this call is one the built kernels implement (``msa.core.dispatch`` feature gate)."""
    if dtype is not None and dtype not in DTYPES:
        return False, f"fmha_sm90: dtype {dtype} not built (bf16 / fp16)"
    if head_dim_qk is not None and (head_dim_qk not in HEAD_DIMS or (head_dim_v not in (None, head_dim_qk))):
        return False, f"fmha_sm90: head dim {head_dim_qk}/{head_dim_v} not built (Dqk = Dv in {HEAD_DIMS})"
    if page_size is not None and page_size != PAGE_SIZE:
        return False, f"fmha_sm90: page_size {page_size} not built (ragged or {PAGE_SIZE})"
    if output_maxscore:
        return False, "fmha_sm90: max_score output not implemented yet"
    if not output_o:
        return False, "fmha_sm90: output_o=False (score-only pass) not implemented yet"
    if sparse:
        return False, "fmha_sm90: per-token sparse (kv_block_indexes) not implemented yet"
    if per_head_scales:
        return False, "fmha_sm90: per-head scale tensors not implemented yet"
    return True, "ok"


@functools.cache
def _num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


@dataclass(eq=False)
class KernelPlan:
    """What one launch needs besides the tensors (device tensors allocated once, reused every run).

    The scheduler counter in ``workspace`` is zeroed on the launching stream before each launch, so launches
    that share one plan must be stream-ordered (the usual case: one stream, or a CUDA graph). Concurrent launches
    on different streams need a plan (or at least a workspace) each.
    """

    work: torch.Tensor  # int32 [num_work, 8], longest-first sections
    workspace: torch.Tensor  # int32 [1]: the dynamic scheduler's counter (zeroed on the stream per launch)
    num_work: int
    num_ctas: int
    any_keys: bool  # False when no query sees any key (then run writes zeros / -inf without a launch)
    lse_dummy: torch.Tensor  # passed when LSE is not requested
    index_dummy: torch.Tensor  # passed as kv_indices when K/V are ragged


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def build_work_list(
    qo_lens: list[int],
    kv_lens: list[int],
    qo_offsets: list[int],
    kv_starts: list[int],
    num_qo_heads: int,
    num_kv_heads: int,
    causal: bool,
    head_dim: int,
    elem_size: int,
) -> torch.Tensor:
    """Host work list, int32 [num_work, 8] on the CPU (fields of ``WorkItem``).

    Items of one request are grouped in sections of consecutive KV heads whose K+V fit ``L2_SECTION_BYTES``;
    inside a section the query tiles run longest first (heads innermost, so the CTAs in flight share K/V);
    sections run longest first. Items whose tile sees no key (cost 0) sort last but still write O = 0 and
    LSE = -inf.
    """
    hpk = num_qo_heads // num_kv_heads
    q_start = 0
    sections: list[tuple[int, int, torch.Tensor]] = []  # (-max cost, order, rows)
    for qo, kv, off, kv_start in zip(qo_lens, kv_lens, qo_offsets, kv_starts):
        if qo == 0:
            continue
        m_blocks = torch.arange(_cdiv(qo, BLOCK_M), dtype=torch.int64)
        kv_blocks = _cdiv(kv, BLOCK_N)
        if causal:
            last_row = torch.clamp((m_blocks + 1) * BLOCK_M, max=qo) - 1
            limit = last_row + off  # the tile's last row sees keys j <= limit
            n_max = torch.where(limit < 0, torch.zeros_like(limit), torch.clamp(limit // BLOCK_N + 1, max=kv_blocks))
        else:
            n_max = torch.full_like(m_blocks, kv_blocks)
        order = torch.argsort(n_max, descending=True, stable=True)
        m_sorted, n_sorted = m_blocks[order], n_max[order]
        kv_bytes_per_head = max(1, kv * head_dim * 2 * elem_size)
        group = max(1, min(num_kv_heads, L2_SECTION_BYTES // kv_bytes_per_head))
        for g0 in range(0, num_kv_heads, group):
            heads = torch.arange(g0 * hpk, min(num_kv_heads, g0 + group) * hpk, dtype=torch.int64)
            mm = m_sorted.repeat_interleave(heads.numel())
            nn = n_sorted.repeat_interleave(heads.numel())
            hh = heads.repeat(m_sorted.numel())
            rows = torch.stack(
                [
                    torch.full_like(mm, q_start),
                    torch.full_like(mm, qo),
                    torch.full_like(mm, kv_start),
                    torch.full_like(mm, kv),
                    mm,
                    hh,
                    torch.full_like(mm, off),
                    nn,
                ],
                dim=1,
            )
            sections.append((-int(n_sorted[0]), len(sections), rows))
        q_start += qo
    if not sections:
        return torch.zeros((0, WORK_FIELDS), dtype=torch.int32)
    sections.sort(key=lambda s: (s[0], s[1]))
    return torch.cat([s[2] for s in sections]).to(torch.int32)


def plan(
    qo_lens: list[int],
    kv_lens: list[int],
    num_qo_heads: int,
    num_kv_heads: int,
    *,
    causal: bool,
    qo_offset: list[int] | None = None,
    paged: bool = False,
    head_dim: int = 128,
    elem_size: int = 2,
    device: torch.device | str = "cuda",
) -> KernelPlan:
    """Host planning for :func:`run` from plain lengths (``msa.core.fmha_plan`` plans call this lazily).

    ``qo_offset`` (causal) defaults to ``kv_len - qo_len`` per request. For paged K/V the item's ``kv_start``
    is the request's first slot in the flat ``kv_indices`` (``sum ceil(kv_len / 128)`` of earlier requests).
    """
    device = torch.device(device)
    if device.type == "cuda":
        ok, why = available(device)
        if not ok:
            raise NotImplementedError(why)
    qo_lens, kv_lens = [int(x) for x in qo_lens], [int(x) for x in kv_lens]
    if len(qo_lens) != len(kv_lens):
        raise ValueError(f"kv_lens: expected {len(qo_lens)} entries (as qo_lens), got {len(kv_lens)}")
    if num_qo_heads % num_kv_heads:
        raise ValueError(f"num_kv_heads: expected a divisor of num_qo_heads = {num_qo_heads}, got {num_kv_heads}")
    if qo_offset is None:
        qo_offset = [k - q for q, k in zip(qo_lens, kv_lens)]
    starts, acc = [], 0
    for n in kv_lens:
        starts.append(acc)
        acc += _cdiv(n, PAGE_SIZE) if paged else n
    work = build_work_list(
        qo_lens, kv_lens, list(qo_offset), starts, num_qo_heads, num_kv_heads, causal, head_dim, elem_size
    )
    num_work = int(work.shape[0])
    any_keys = bool(num_work and int(work[:, 7].max()) > 0)
    num_sms = _num_sms(device.index if device.index is not None else torch.cuda.current_device()) if device.type == "cuda" else 1
    return KernelPlan(
        work=work.to(device),
        workspace=torch.zeros(1, dtype=torch.int32, device=device),
        num_work=num_work,
        num_ctas=max(1, min(num_sms, num_work)),
        any_keys=any_keys,
        lse_dummy=torch.empty((1, 1), dtype=torch.float32, device=device),
        index_dummy=torch.zeros(1, dtype=torch.int32, device=device),
    )


def _kernel_plan(fplan, head_dim: int, elem_size: int, device: torch.device) -> KernelPlan:
    """The KernelPlan of an ``msa.core.api.FmhaPlan``, built on first use and cached in ``fplan.kernel``."""
    if isinstance(fplan, KernelPlan):
        return fplan
    key = (FAMILY, head_dim, elem_size, str(device))
    kp = fplan.kernel.get(key)
    if kp is None:
        kp = plan(
            fplan.qo_lens,
            fplan.kv_lens,
            fplan.num_qo_heads,
            fplan.num_kv_heads,
            causal=fplan.causal,
            qo_offset=fplan.qo_offset_host,
            paged=fplan.page_size is not None,
            head_dim=head_dim,
            elem_size=elem_size,
            device=device,
        )
        fplan.kernel[key] = kp
    return kp


def _scalar_scale(name: str, value) -> float:
    if value is None:
        return 1.0
    if isinstance(value, torch.Tensor):
        raise NotImplementedError(f"fmha_sm90: per-head tensor {name} is not supported yet (pass a float)")
    return float(value)


def run(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    plan,
    *,
    kv_indices: torch.Tensor | None = None,
    kv_block_indexes: torch.Tensor | None = None,
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
    lse: torch.Tensor | None = None,
    causal: bool | None = None,
):
    """Run the kernel; returns ``(out, None)`` or ``(out, None, lse)`` like :func:`msa.core.fmha`.

    ``plan`` is an ``msa.core.api.FmhaPlan`` (its KernelPlan is built on first use and cached on it) or a
    :class:`KernelPlan` from :func:`plan` (then pass ``causal``). Metadata checks are the caller's
    (``msa.core.fmha``); this only refuses what the kernel does not implement.
    """
    if output_maxscore or max_score is not None:
        raise NotImplementedError("fmha_sm90: max_score output is not implemented yet (issue 7)")
    if kv_block_indexes is not None:
        raise NotImplementedError("fmha_sm90: per-token block-sparse attention is not implemented yet (issue 7)")
    if not output_o:
        raise NotImplementedError("fmha_sm90: output_o=False (score-only pass) is not implemented yet (issue 7)")
    if q.dtype not in DTYPES:
        raise NotImplementedError(f"fmha_sm90: q dtype {q.dtype} is not supported yet (bf16 / fp16)")
    head_dim = q.shape[-1]
    if head_dim not in HEAD_DIMS or k.shape[-1] != head_dim or v.shape[-1] != head_dim:
        raise NotImplementedError(
            f"fmha_sm90: head dims (Dqk={head_dim}, Dv={v.shape[-1]}) are not built; built: Dqk = Dv in {HEAD_DIMS}"
        )
    paged = k.dim() == 4
    if paged and k.shape[2] != PAGE_SIZE:
        raise NotImplementedError(f"fmha_sm90: page_size {k.shape[2]} is not built (page_size {PAGE_SIZE} only)")
    if paged and kv_indices is None:
        raise ValueError("kv_indices: required with paged K/V")
    if isinstance(plan, KernelPlan):
        if causal is None:
            raise ValueError("causal: required when plan is a KernelPlan")
    else:
        causal = plan.causal
    if sm_scale is None:
        sm_scale = 1.0 / math.sqrt(head_dim)
    scale = float(sm_scale) * _scalar_scale("q_scale", q_scale) * _scalar_scale("k_scale", k_scale)
    if not scale > 0.0:
        raise NotImplementedError(f"fmha_sm90: the softmax scale must be > 0, got {scale}")
    out_scale = _scalar_scale("v_scale", v_scale) * _scalar_scale("o_scale", o_scale)

    kp = _kernel_plan(plan, head_dim, q.element_size(), q.device)
    if out is None:
        out = torch.empty(q.shape[0], q.shape[1], v.shape[-1], dtype=q.dtype, device=q.device)
    if return_lse and lse is None:
        lse = torch.empty(q.shape[0], q.shape[1], dtype=torch.float32, device=q.device)

    if not kp.any_keys:  # nothing visible anywhere (also covers empty K/V, which TMA cannot describe)
        out.zero_()
        if return_lse:
            lse.fill_(-math.inf)
    elif kp.num_work:
        mod = _module(DTYPES[q.dtype], head_dim, bool(causal), paged)
        mod.fmha_fwd(
            q,
            k,
            v,
            out,
            lse if return_lse else kp.lse_dummy,
            kp.work,
            kp.workspace,
            kv_indices if paged else kp.index_dummy,
            kp.num_ctas,
            scale,
            out_scale,
            bool(return_lse),
        )
    return (out, None, lse) if return_lse else (out, None)
