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

Schedules (``sparse_fmha_plan(schedule=...)``): ``"kv_outer"`` = the k2q CSR path above for every token;
``"q_outer"`` = every Q-outer item (``128 // G`` consecutive tokens x the G query heads of one KV head) runs
flash attention over the union of its tokens' blocks (msa.cute.qouter tables; msa-core's SM90 Q-outer kernel);
``"auto"`` (default) = items whose union has at most ``route_max`` blocks go Q-outer, the others KV-outer: their
selections are kept for the KV-outer call and the routed items' (token, KV head) selections are set to -1 there
(those rows come out 0 / -inf), then the Q-outer kernel overwrites exactly the routed rows of the same O / LSE.
Eager "auto" calls on CUDA read one count from the device (a sync): every item routed -> Q-outer alone; under half
routed -> KV-outer alone (the hybrid's extra passes cost more than a few routed tiles save); else the hybrid. Under
CUDA-graph capture, or with ``MSA_BRIDGE_AUTO_SYNC=0``, the hybrid always runs (no sync).
On the SM90 kernel, neighbouring Q-outer items run two by two on 2-CTA clusters that share their K / V tiles when
their unions are equal (``sparse_fmha_plan(pair=...)``, default ``$MSA_QOUTER_PAIR`` = 1; results are identical).
Q-outer needs ragged bf16/fp16 K/V, ``Hq/Hkv`` dividing 128 and (causal) the default ``qo_offset``; where it
does not apply, ``"auto"`` is the KV-outer path and ``"q_outer"`` raises.

``route_max`` default = ``ROUTE_FACTOR * topk`` with ROUTE_FACTOR = 2, from the cost model of
benchmarks/sparse_prefill_notes.md: per item (128 rows) KV-outer moves ~776 B per selected (token, head, block),
i.e. ``776 * 128 * topk`` B -> ``topk * 33`` ns at its 3.0 TB/s floor (``topk * 54`` ns at the measured ~155
effective TFLOP/s), while Q-outer computes ``U`` whole blocks of ``4 * 128 * 128 * 128`` FLOP -> ``U * 14`` ns at
a dense ~600 TFLOP/s. Break-even ``U / topk`` = 2.4 (KV-outer at its floor) to 3.9 (as measured); 2 keeps a margin
for the Q-outer kernel running below the dense rate (masked rows, gathered K/V blocks).
"""

from __future__ import annotations

import importlib
import math
import os
import threading
from dataclasses import dataclass, field

import torch
from msa.core import FmhaPlan, fmha_plan
from msa.core.dispatch import backend_mode, kernel_for, register_kernel, select_backend
from msa.core.validation import check_int, check_tensor, validation_enabled
from msa.cute import build_k2q_csr, sparse_atten_func
from msa.cute._common import is_capturing
from msa.cute.csr import check_selection_values
from msa.cute.qouter import (
    QOUTER_ROWS,
    QouterItems,
    build_qouter_unions,
    default_umax,
    qouter_items,
    qouter_reference,
)
from msa.cute.quant import Nvfp4Tensor, check_nvfp4_tensor, stage_kv

__all__ = [
    "SparseFmhaPlan",
    "QouterSchedule",
    "sparse_fmha_plan",
    "sparse_fmha",
    "page_table_from_kv_indices",
    "BLOCK",
    "SCHEDULES",
    "ROUTE_FACTOR",
    "qouter_unions_for",
]

BLOCK = 128
SCHEDULES = ("auto", "kv_outer", "q_outer")
# Eager "auto" calls may read one count from the device to skip the KV-outer pass when every item went Q-outer.
AUTO_SKIP_SYNC = os.environ.get("MSA_BRIDGE_AUTO_SYNC", "1") != "0"
AUTO_MIN_ROUTED = 0.5  # eager "auto": below this routed share, every item runs KV-outer
# Eager "auto" launches the Q-outer pass before reading the routed count while the last such call routed every item
# (correlated selections: the common case, and the read would leave the GPU idle); after a call that did not, it reads
# first. Consecutive calls (chunks, layers) see similar selections, so the last outcome predicts the next.
_auto_state = {"expect_all_routed": True}
ROUTE_FACTOR = 2  # auto: an item goes Q-outer iff U <= ROUTE_FACTOR * topk (module docstring: the cost model)
QOUTER_OP = "sparse_fmha_qouter"
KV_OUTER_OP = "sparse_atten_func"  # msa.cute.sparse_prefill.OP: the KV-outer kernel's dispatch name
QOUTER_KERNEL_MODULE = "msa.core.kernels.fmha_sm90_qouter"  # msa-core's SM90 Q-outer kernel (plan / run)
QOUTER_DTYPES = (torch.bfloat16, torch.float16, torch.float8_e4m3fn)  # Q = K = V (fp8: O in bf16)
QOUTER_HEAD_DIM = 128  # what the kernel is built for (used when its module has no supports())
# The SM90 Q-outer kernel's 2-CTA clusters (msa.core.kernels.fmha_sm90_qouter, plan(pair=True)): neighbouring items
# (token tiles 2j, 2j + 1 of one KV head) run on one cluster, which reads each K / V tile from L2 once for both when
# their unions are equal. Same results either way. Read at plan time: "1" on (default), "0" off. H200, session 15
# runs 5 and 7 (bf16, interleaved A/B in the bridge call): +1.8 to +2.9% on per-128-token tile selections (the
# suite's), -2 to +1% when neighbouring 8-token items pick different blocks (--selection group8).
QOUTER_PAIR_ENV = "MSA_QOUTER_PAIR"


def _qouter_pair_default() -> bool:
    v = os.environ.get(QOUTER_PAIR_ENV, "1").strip() or "1"
    if v not in ("0", "1"):
        raise ValueError(f"{QOUTER_PAIR_ENV}: expected 0 or 1, got {v!r}")
    return v == "1"


def _qouter_module():
    """The Q-outer kernel module, or ``(None, why)`` when it cannot be imported (CPU-only installs, older msa-core)."""
    try:
        return importlib.import_module(QOUTER_KERNEL_MODULE), ""
    except Exception as e:  # a missing or broken kernel install must leave the reference / KV-outer paths working
        return None, f"{QOUTER_KERNEL_MODULE} is not importable ({type(e).__name__}: {e})"


def _qouter_available(device: torch.device) -> tuple[bool, str]:
    mod, why = _qouter_module()
    if mod is None:
        return False, why
    fn = getattr(mod, "available", None)
    if fn is not None:
        return fn(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return False, "the Q-outer kernel needs CUDA"
    cc = torch.cuda.get_device_capability(device)
    return (True, "ok") if cc == (9, 0) else (False, f"compute capability {cc[0]}.{cc[1]}: SM90 only")


def _qouter_supports(**features) -> tuple[bool, str]:
    mod, why = _qouter_module()
    if mod is None:
        return False, why
    fn = getattr(mod, "supports", None)
    if fn is not None:
        return fn(**features)
    if features.get("head_dim") != QOUTER_HEAD_DIM or features.get("head_dim_v") != QOUTER_HEAD_DIM:
        return False, (f"head dims {features.get('head_dim')}/{features.get('head_dim_v')}: the Q-outer kernel is "
                       f"built for {QOUTER_HEAD_DIM}")
    return True, "ok"


register_kernel(QOUTER_OP, "fmha_sm90_qouter", _qouter_available, _qouter_supports)


@dataclass(eq=False)
class QouterSchedule:
    """Q-outer part of a plan: the item tables (:func:`msa.cute.qouter.qouter_items`), the union capacity
    ``umax``, ``route_max`` (None: every item routed) and the kernel's plan (built on first kernel use)."""

    items: QouterItems
    umax: int
    route_max: int | None
    kernel_plan: object = field(default=None, repr=False)
    pair: bool = False  # the SM90 kernel runs neighbouring items on 2-CTA clusters (QOUTER_PAIR_ENV)


@dataclass(eq=False)
class SparseFmhaPlan:
    """``base``: the dense plan (host lists, device indptrs). Sparse-path extras: ``topk``, ``total_rows``
    (packed 128-token KV rows), ``seqused_k [B]`` int32 on the device (None when non-causal), and
    ``max_pages`` (paged: the page-table width). ``schedule``: the effective schedule ("kv_outer", "q_outer" or
    "auto"; an "auto" request the plan cannot serve Q-outer becomes "kv_outer", ``schedule_note`` says why);
    ``qouter``: the Q-outer tables (None for "kv_outer")."""

    base: FmhaPlan
    topk: int
    total_rows: int
    seqused_k: torch.Tensor | None = field(repr=False)
    max_pages: int
    schedule: str = "kv_outer"
    qouter: QouterSchedule | None = None
    schedule_note: str = ""
    # Paged plans: the same plan over ragged K/V and the token -> (request, block, offset) gather index (built on
    # first use by calls that gather an fp8 page cache into ragged fp8 K/V for the fp8 Q-outer kernel).
    ragged_twin: object = field(default=None, repr=False)
    page_gather: object = field(default=None, repr=False)

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
    schedule: str = "auto",
    route_max: int | None = None,
    pair: bool | None = None,
) -> SparseFmhaPlan:
    """Plan a sparse call (host work only). Same arguments as ``msa.core.fmha_plan``; ``kv_block_num`` (top-k,
    1..64) is required, ``page_size`` must be None (ragged) or 128, ``output_maxscore`` must be False (the sparse
    path produces no max-score).

    ``schedule``: "auto" (default), "kv_outer" or "q_outer" (module docstring). ``route_max`` ("auto" only): route
    an item to Q-outer iff its union has at most this many blocks (default ``ROUTE_FACTOR * kv_block_num``).
    ``pair``: the SM90 Q-outer kernel runs neighbouring items (token tiles 2j, 2j + 1 of one KV head) on a 2-CTA
    cluster that reads each K / V tile from L2 once for both CTAs when their unions are equal (the same results;
    default: ``$MSA_QOUTER_PAIR``, see ``QOUTER_PAIR_ENV``)."""
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
    sched, qouter, note = _plan_schedule(base, topk, schedule, route_max, pair)
    return SparseFmhaPlan(base=base, topk=topk, total_rows=total_rows, seqused_k=seqused, max_pages=max_pages,
                          schedule=sched, qouter=qouter, schedule_note=note)


def _qouter_plan_blocker(base: FmhaPlan) -> str:
    """Why this plan cannot run Q-outer ("" when it can)."""
    g = base.num_qo_heads // base.num_kv_heads
    if QOUTER_ROWS % g:
        return f"Hq/Hkv = {g} does not divide {QOUTER_ROWS} (the Q-outer tile is 128 // G tokens x G heads)"
    if base.causal:
        for b, (ql, kl, off) in enumerate(zip(base.qo_lens, base.kv_lens, base.qo_offset_host)):
            if off != kl - ql:
                return (f"qo_offset[{b}] = {off} differs from kv_len - qo_len = {kl - ql} (the Q-outer kernel is "
                        "bottom-right causal against the whole KV)")
    return ""


def _plan_schedule(base: FmhaPlan, topk: int, schedule, route_max, pair=None):
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule: expected one of {list(SCHEDULES)}, got {schedule!r}")
    if route_max is not None:
        route_max = check_int("route_max", route_max, min=0)
        if schedule != "auto":
            raise ValueError(f"route_max: only meaningful with schedule='auto', got schedule={schedule!r}")
    if schedule == "kv_outer":
        return "kv_outer", None, ""
    why = _qouter_plan_blocker(base)
    if why:
        if schedule == "q_outer":
            raise ValueError(f"schedule: 'q_outer' cannot serve this plan: {why}; use 'auto' or 'kv_outer'")
        return "kv_outer", None, f"auto -> kv_outer: {why}"
    g = base.num_qo_heads // base.num_kv_heads
    pair = _qouter_pair_default() if pair is None else bool(pair)
    items = qouter_items(base.qo_lens, base.num_kv_heads, g, kv_lens=base.kv_lens, device=base.device)
    if schedule == "q_outer":
        umax = default_umax(items.T, topk, items.max_blocks)
    else:
        route_max = ROUTE_FACTOR * topk if route_max is None else route_max
        umax = default_umax(items.T, topk, items.max_blocks, route_max)
    return schedule, QouterSchedule(items=items, umax=umax, route_max=None if schedule == "q_outer" else route_max,
                                    pair=pair), ""


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


def _selections(sel: torch.Tensor, plan: SparseFmhaPlan) -> torch.Tensor:
    """``[total_q, Hkv, topk]`` (a view: the first query head of every GQA group for Hq-shaped selections)."""
    hq, hkv = plan.num_qo_heads, plan.num_kv_heads
    check_tensor("kv_block_indexes", sel, dtype=torch.int32, ndim=3, device=plan.device)
    if sel.shape[0] != plan.total_q or sel.shape[2] != plan.topk or sel.shape[1] not in (hkv, hq):
        heads = f"{hkv}" if hkv == hq else f"{hkv} or {hq}"
        raise ValueError(f"kv_block_indexes: expected shape [{plan.total_q}, {heads}, {plan.topk}] "
                         f"([total_q, Hkv or Hq, kv_block_num]), got {list(sel.shape)}")
    if sel.shape[1] != hkv:
        sel = sel[:, :: hq // hkv]  # the first query head of every GQA group
    return sel


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
    Any value in a cache slot no request owns (NaN included) stays out of the output: the kernels mask those keys
    and zero those V rows before the PV GEMM.
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
        _check_kv("k", k, q, ndim=4, shape=[None, hkv, BLOCK, q.shape[-1]])
        if page_table is None:
            if kv_indices is None:
                raise ValueError("kv_indices: required for a paged plan (or pass page_table)")
            check_tensor("kv_indices", kv_indices, dtype=torch.int32, ndim=1, shape=[plan.num_pages],
                         device=q.device, contiguous=True)
            page_table = page_table_from_kv_indices(kv_indices, plan.kv_page_indptr, plan.max_pages)
    else:
        _check_kv("k", k, q, ndim=3, shape=[plan.total_kv, hkv, q.shape[-1]])
        if kv_indices is not None or page_table is not None:
            raise ValueError("kv_indices: given, but the plan is ragged (page_size=None)")
    if isinstance(k, Nvfp4Tensor) != isinstance(v, Nvfp4Tensor):
        raise TypeError(f"v: expected {'an Nvfp4Tensor' if isinstance(k, Nvfp4Tensor) else 'a tensor'} like k, got "
                        f"{type(v).__name__}")
    v_shape = check_nvfp4_tensor("v", v, device=q.device) if isinstance(v, Nvfp4Tensor) else list(v.shape)
    if _fp8_pages_to_ragged(q, k, v, plan, backend):
        if validation_enabled(validate):
            _check_page_ids(page_table, kv_indices, plan, k.shape[0])
        k, v = _gather_pages(k, page_table, plan), _gather_pages(v, page_table, plan)
        plan, page_table, kv_indices = _ragged_twin(plan), None, None
    out_dtype = torch.bfloat16 if q.dtype == torch.float8_e4m3fn else q.dtype
    if out is not None:
        check_tensor("out", out, dtype=out_dtype, shape=[plan.total_q, plan.num_qo_heads, v_shape[-1]],
                     device=q.device)
    sel = _selections(kv_block_indexes, plan)
    if validation_enabled(validate):
        nblk = torch.tensor([-(-n // BLOCK) for n in plan.kv_lens], dtype=torch.int64)
        cu_q = torch.tensor(plan.qo_indptr_host, dtype=torch.int64)
        check_selection_values("kv_block_indexes", sel.transpose(0, 1).cpu().to(torch.int64), cu_q, nblk)
    q_eff, scale, out_mult = _fold_scales(q, plan, sm_scale, q_scale, k_scale, v_scale, o_scale)
    q_eff, k, v, page_table = _stage_kv(q_eff, k, v, plan, page_table, kv_indices, backend, validate)
    qpath = _qouter_path(plan, q_eff, k, v, backend)
    if qpath is None:
        o, lse = _kv_outer(q_eff, k, v, sel, plan, scale, return_lse, page_table, validate, backend)
    else:
        direct = out if (out is not None and isinstance(out_mult, float) and out_mult == 1.0) else None
        o, lse = _with_qouter(qpath, q_eff, k, v, sel, plan, scale, direct, out_dtype, validate, backend,
                              page_table, want_lse=return_lse)
    if isinstance(out_mult, torch.Tensor):
        o = (o.float() * out_mult.view(1, -1, 1)).to(out_dtype)
    elif out_mult != 1.0:
        o = (o.float() * out_mult).to(out_dtype)
    else:
        o = o.to(out_dtype)
    if out is not None:
        if o is not out:
            out.copy_(o)
        o = out
    return (o, None, lse) if return_lse else (o, None)


def _check_kv(name, t, q, *, ndim, shape):
    """``k`` (a tensor or an :class:`Nvfp4Tensor`, checked on its dequantised shape) on q's device."""
    if isinstance(t, Nvfp4Tensor):
        got = check_nvfp4_tensor(name, t, device=q.device)
        if len(got) != ndim or any(w is not None and w != g for w, g in zip(shape, got)):
            want = ["*" if w is None else w for w in shape]
            raise ValueError(f"{name}: expected dequantised shape {want}, got {got} (Nvfp4Tensor data "
                             f"{list(t.data.shape)})")
        return
    check_tensor(name, t, ndim=ndim, shape=shape, device=q.device)


def _stage_kv(q, k, v, plan: SparseFmhaPlan, page_table, kv_indices, backend, validate):
    """Quantised K/V -> the 16-bit kernels: K/V dequantised (``msa.cute.quant.dequantize_kv``, one memory-bound pass
    over the pages / tokens this call reads, no host sync) to bf16 (fp16 under an fp16 q), an fp8 q cast exactly.

    Staged: NVFP4 K/V (always: every path reads dequantised values); fp8 K/V under a 16-bit q; fp8 Q = K = V with
    paged K/V (the fp8 Q-outer kernel is ragged-only). Not staged: fp8 Q = K = V ragged (the fp8 Q-outer kernel), and
    fp8 K/V where no kernel would run (CPU, ``MSA_BACKEND=reference``): the references read fp8 directly.
    Paged: the pages each request uses are gathered into a compact pool (``msa.cute.quant.stage_kv``, shared with
    ``sparse_atten_func``) and ``page_table`` is rewritten to address it."""
    fp8 = torch.float8_e4m3fn
    nvfp4 = isinstance(k, Nvfp4Tensor)
    target = torch.bfloat16 if q.dtype == fp8 else q.dtype
    if not nvfp4:
        if k.dtype != fp8 or (q.dtype == fp8 and not plan.paged):
            return q, k, v, page_table
        if q.device.type != "cuda" or backend_mode(backend) == "reference":
            return q, k, v, page_table
        if kernel_for("dequantize_kv", q.device, fmt="fp8", out_dtype=target, row=k.shape[-1]) is None:
            return q, k, v, page_table
    if plan.paged and validation_enabled(validate):  # before the gather, which zero-fills an invalid id
        _check_page_ids(page_table, kv_indices, plan, (k.data if nvfp4 else k).shape[0])
    return stage_kv(q, k, v, target, page_table=page_table if plan.paged else None, cu_seqlens_k=plan.kv_indptr,
                    block=BLOCK, backend=backend)


def _check_page_ids(page_table, kv_indices, plan: SparseFmhaPlan, n_pages: int) -> None:
    """validate=True: every page a request uses (its first ceil(kv_len / 128) entries; the rest of a given table may
    hold anything) is a page of the cache -- checked before a gather reads it (or zero-fills an invalid id)."""
    ones = torch.ones(plan.num_pages, dtype=torch.int32, device=page_table.device)
    live = page_table_from_kv_indices(ones, plan.kv_page_indptr, plan.max_pages) != 0
    table = page_table[:, : live.shape[1]]
    bad = live & ((table < 0) | (table >= n_pages))
    if bool(bad.any()):
        b, j = bad.nonzero()[0].tolist()
        name = "kv_indices" if kv_indices is not None else "page_table"
        raise ValueError(f"{name}: request {b}'s page {j} is {int(table[b, j])}, not a page id in [0, {n_pages})")


def _fp8_pages_to_ragged(q, k, v, plan: SparseFmhaPlan, backend) -> bool:
    """fp8 Q = K = V over the page-128 cache on CUDA with the Q-outer kernel in play: gather the pages into ragged fp8
    K/V (1 B per element each way) and run the fp8 Q-outer kernel, instead of staging all three to bf16 (H200,
    session 10 run 6: the bf16-staged paged fp8 call ran 4.42 ms vs 3.08 for ragged fp8 at 64/4 S32K)."""
    fp8 = torch.float8_e4m3fn
    if not plan.paged or plan.qouter is None or q.device.type != "cuda" or backend_mode(backend) == "reference":
        return False
    if q.dtype != fp8 or not isinstance(k, torch.Tensor) or k.dtype != fp8 or v.dtype != fp8:
        return False
    return _qouter_available(q.device)[0]


def _ragged_twin(plan: SparseFmhaPlan) -> SparseFmhaPlan:
    """The same plan over ragged K/V (same lengths, offsets, schedule and route_max), built once."""
    if plan.ragged_twin is None:
        route_max = plan.qouter.route_max if plan.schedule == "auto" and plan.qouter is not None else None
        plan.ragged_twin = sparse_fmha_plan(
            plan.qo_lens, plan.kv_lens, plan.num_qo_heads, plan.num_kv_heads, page_size=None, kv_block_num=plan.topk,
            causal=plan.causal, qo_offset=plan.qo_offset_host, device=plan.device, schedule=plan.schedule,
            route_max=route_max)
    return plan.ragged_twin


def _gather_pages(t: torch.Tensor, page_table: torch.Tensor, plan: SparseFmhaPlan) -> torch.Tensor:
    """Page-128 cache ``[pages, Hkv, 128, D]`` -> ragged ``[total_kv, Hkv, D]`` through the plan's cached token index
    (device ops only; fp8 moves as bytes). Serves the fp8 ragged gather and the Q-outer reference path."""
    if plan.page_gather is None:
        lens = torch.tensor(plan.kv_lens, dtype=torch.int64)
        req = torch.repeat_interleave(torch.arange(len(plan.kv_lens)), lens)
        tok = torch.arange(int(lens.sum())) - (torch.cumsum(lens, 0) - lens)[req]
        plan.page_gather = tuple(x.to(plan.device) for x in (req, tok // BLOCK, tok % BLOCK))
    req, blk, off = plan.page_gather
    page = page_table.long()[req, blk]
    raw = t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t
    out = raw[page, :, off]
    return out.view(t.dtype)


def _kv_outer(q, k, v, sel, plan, scale, return_lse, page_table, validate, backend):
    """KV-outer path: k2q CSR + ``msa.cute.sparse_atten_func`` -> ``(O, LSE or None)``."""
    q2k = sel.transpose(0, 1).contiguous()
    want_schedule = q.device.type == "cuda"
    csr = build_k2q_csr(q2k, plan.qo_indptr, plan.kv_indptr, BLOCK, total_k=plan.total_kv, total_rows=plan.total_rows,
                        max_seqlen_k=plan.max_kv_len, max_seqlen_q=plan.max_qo_len,
                        qhead_per_kv=plan.num_qo_heads // plan.num_kv_heads, return_schedule=want_schedule,
                        validate=validate)
    res = sparse_atten_func(
        q, k, v, csr[0], csr[1], plan.topk, cu_seqlens_q=plan.qo_indptr, cu_seqlens_k=plan.kv_indptr,
        max_seqlen_q=plan.max_qo_len, max_seqlen_k=plan.max_kv_len, blk_kv=BLOCK, causal=plan.causal,
        softmax_scale=scale, return_softmax_lse=return_lse, page_table=page_table, seqused_k=plan.seqused_k,
        schedule=csr[2] if want_schedule else None, validate=validate, backend=backend,
    )
    return res if return_lse else (res, None)


def _qouter_path(plan: SparseFmhaPlan, q, k, v, backend) -> str | None:
    """How the Q-outer part runs: "kernel", "reference", or None (no Q-outer part: everything KV-outer).

    "q_outer" follows msa.core.dispatch (MSA_BACKEND / ``backend``: CPU -> reference; CUDA without the kernel ->
    reference with a one-time warning, or KernelUnavailableError under backend="kernel"). "auto" never falls back
    to the slow reference on CUDA: without the kernel the call is all KV-outer."""
    if plan.qouter is None:
        return None
    if q.dtype not in QOUTER_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        if plan.schedule == "q_outer":
            raise ValueError(f"schedule: 'q_outer' needs bf16 / fp16 / fp8 Q = K = V (after scale folding), got q "
                             f"{q.dtype}, k {k.dtype}, v {v.dtype}; use 'auto' or 'kv_outer'")
        return None
    features = dict(q_dtype=q.dtype, kv_dtype=k.dtype, head_dim=q.shape[-1], head_dim_v=v.shape[-1],
                    qhead_per_kv=plan.num_qo_heads // plan.num_kv_heads, causal=plan.causal, paged=plan.paged)
    if plan.schedule == "q_outer":
        return "reference" if select_backend(QOUTER_OP, q.device, backend, **features) == "reference" else "kernel"
    if q.device.type != "cuda" or backend_mode(backend) == "reference":
        return "reference"
    ok, _ = _qouter_available(q.device)
    if ok:
        ok, _ = _qouter_supports(**features)
    return "kernel" if ok else None


def _qouter_kernel_plan(plan: SparseFmhaPlan):
    """msa-core's Q-outer plan for this sparse plan (built once; its item enumeration must be ours)."""
    qs = plan.qouter
    if qs.kernel_plan is None:
        mod, why = _qouter_module()
        if mod is None:
            raise RuntimeError(f"Q-outer kernel: {why}")
        kp = mod.plan(plan.qo_lens, plan.kv_lens, plan.num_qo_heads, plan.num_kv_heads, causal=plan.causal,
                      paged=plan.paged, device=plan.device, pair=qs.pair)
        if int(kp.T) != qs.items.T or int(kp.num_items) != qs.items.num_items:
            raise RuntimeError(f"Q-outer kernel plan: T {kp.T} / {kp.num_items} items, but msa.cute.qouter_items "
                               f"made T {qs.items.T} / {qs.items.num_items} items (item enumeration contract broken)")
        qs.kernel_plan = kp
    return qs.kernel_plan


def qouter_unions_for(plan: SparseFmhaPlan, sel: torch.Tensor, validate: bool | None = None, route_all: bool = False):
    """The Q-outer tables of ``sel [total_q, Hkv, topk]`` under ``plan`` (:class:`msa.cute.qouter.QouterUnions`).
    ``route_all``: every item routed (the "q_outer" capacity), whatever the plan's ``route_max``."""
    qs = plan.qouter
    it = qs.items
    umax, route_max = qs.umax, qs.route_max
    if route_all:
        umax, route_max = default_umax(it.T, plan.topk, it.max_blocks), None
    return build_qouter_unions(sel, it.item_token0, it.item_ntok, it.item_kv_head, T=it.T, num_items=it.num_items,
                               umax=umax, route_max=route_max, item_kv_blocks=it.item_kv_blocks,
                               validate=validate)


def _kv_outer_kernel_serves(q, k, v, plan: SparseFmhaPlan) -> bool:
    """Whether msa.cute's KV-outer kernel takes these tensors (else a KV-outer part would run the PyTorch reference)."""
    return kernel_for(KV_OUTER_OP, q.device, q_dtype=q.dtype, kv_dtype=k.dtype, head_dim=q.shape[-1],
                      head_dim_v=v.shape[-1], topk=plan.topk, qhead_per_kv=plan.num_qo_heads // plan.num_kv_heads,
                      paged=plan.paged, blk_kv=BLOCK, causal=plan.causal, partial_dtype=torch.bfloat16,
                      temperature_lse=False) is not None


_PINNED = threading.local()


def _pinned_i32(n: int) -> torch.Tensor:
    """A pinned int32 host buffer of at least ``n`` entries per thread, grown (doubling) and then reused."""
    buf = getattr(_PINNED, "i32", None)
    if buf is None or buf.numel() < n:
        buf = _PINNED.i32 = torch.empty(max(n, 2 * (0 if buf is None else buf.numel()), 1024), dtype=torch.int32,
                                        pin_memory=True)
    return buf


_COPY_STREAMS: dict = {}


def _copy_stream(device: torch.device):
    """One side stream per device for the routed-count read (created once)."""
    key = device.index if device.index is not None else torch.cuda.current_device()
    s = _COPY_STREAMS.get(key)
    if s is None:
        s = _COPY_STREAMS[key] = torch.cuda.Stream(device=key)
    return s


def _routed_count_later(union_len: torch.Tensor):
    """Start reading how many items are routed (``union_len >= 0``) without blocking; returns a function that waits
    and gives the count. CUDA: ``union_len`` (int32 ``[num_items]``) is copied whole to a reused pinned buffer on a
    side stream that waits for the current stream's work so far, and counted on the host -- no reduction kernels and
    no device-to-host copy on the current stream, so the Q-outer kernel queued next starts right after the union
    build (H200, session 16 run 1, interleaved A/B: +1.9% raw, +2.4% per clock at 16/1 S32K). The buffer is reused,
    so one read is in flight per thread at a time (the caller waits before its next read); ``union_len`` stays alive
    until then. Eager calls only (under capture the hybrid runs and nothing is read)."""
    n = int(union_len.shape[0])
    if union_len.device.type != "cuda":
        value = int((union_len >= 0).sum())
        return lambda: value
    host = _pinned_i32(n)[:n]
    side = _copy_stream(union_len.device)
    side.wait_stream(torch.cuda.current_stream(union_len.device))
    with torch.cuda.stream(side):
        host.copy_(union_len, non_blocking=True)
        ready = torch.cuda.Event()
        ready.record(side)

    def wait():
        ready.synchronize()
        return int((host >= 0).sum())

    return wait


def _with_qouter(path, q, k, v, sel, plan, scale, direct_out, out_dtype, validate, backend, page_table=None,
                 want_lse=True):
    """Schedule "q_outer": the Q-outer pass writes every row. "auto": KV-outer over the unrouted items' selections
    (routed (token, KV head) selections set to -1: those rows come out 0 / -inf), then the Q-outer pass overwrites
    exactly the routed rows of the same O / LSE. ``want_lse`` False: the caller returns no LSE, so the Q-outer kernel
    writes none (and fp8 then runs its fast softmax build, msa.core.kernels.fmha_sm90.fp8_p_variant); the LSE
    returned is then undefined."""
    qs = plan.qouter
    it = qs.items
    total_q, hq = q.shape[0], q.shape[1]
    kp = _qouter_kernel_plan(plan) if path == "kernel" else None
    # "auto" where the KV-outer kernel cannot take these tensors (fp8 Q = K = V today): every item Q-outer -- its
    # kernel over a larger union beats a KV-outer part in the PyTorch reference by far.
    route_all = qs.route_max is not None and path == "kernel" and not _kv_outer_kernel_serves(q, k, v, plan)
    un = qouter_unions_for(plan, sel, validate, route_all=route_all)

    def new_out():
        o = direct_out if direct_out is not None else torch.empty(total_q, hq, v.shape[-1], dtype=out_dtype,
                                                                  device=q.device)
        return o, torch.empty(total_q, hq, dtype=torch.float32, device=q.device)

    def qouter_pass(o, lse):  # writes exactly the routed items' rows
        if path == "kernel":
            mod, _ = _qouter_module()
            paged = {"page_table": page_table} if plan.paged else {}
            mod.run(kp, q, k, v, un.union, un.union_len, un.mask, un.order, out=o, lse=lse if want_lse else None,
                    sm_scale=scale, **paged)
        else:
            kk, vv = k, v
            if plan.paged:
                kk, vv = _gather_pages(k, page_table, plan), _gather_pages(v, page_table, plan)
            qouter_reference(q, kk, vv, un.union, un.union_len, un.mask, item_token0=it.item_token0,
                             item_ntok=it.item_ntok, item_kv_head=it.item_kv_head, cu_seqlens_q=plan.qo_indptr,
                             cu_seqlens_k=plan.kv_indptr, causal=plan.causal, T=it.T, sm_scale=scale,
                             seqused_k=plan.seqused_k, out=o, lse=lse)

    def hybrid():  # KV-outer writes every row (routed ones 0 / -inf), then Q-outer overwrites the routed rows
        routed = (un.union_len >= 0).view(it.num_tiles, plan.num_kv_heads)[it.token_tile.long()]  # [total_q, Hkv]
        o, lse = _kv_outer(q, k, v, torch.where(routed.unsqueeze(-1), -1, sel), plan, scale, True, page_table,
                           validate, backend)
        qouter_pass(o, lse)
        return o, lse

    def qouter_alone():
        o, lse = new_out()
        qouter_pass(o, lse)
        return o, lse

    if qs.route_max is None or route_all:  # "q_outer" (or no KV-outer kernel): every item routed (U <= umax)
        return qouter_alone()
    if path == "kernel" and AUTO_SKIP_SYNC and not is_capturing(q.device):
        # Eager "auto": the routed item count (read once from the device) picks the cheapest of three -- every item
        # routed -> Q-outer alone (no k2q CSR, no combine: ~2 ms saved at 64/4 S32K, H100); fewer than
        # AUTO_MIN_ROUTED of them -> KV-outer alone on the original selections (the hybrid's extra passes cost more
        # than the few routed tiles save: random selections at 32K, 3-13% routed, ran 29.9 ms hybrid vs 25.2 KV-outer
        # alone, session 4 run 9); else the hybrid. While the last eager call routed every item, the Q-outer pass is
        # launched *before* the count is read (it only writes routed rows), so the host waits while the GPU runs it:
        # the read costs no idle GPU time (~0.15 ms per call at 64/4 S32K when it sat between the union build and the
        # kernel, session 5 run 1). After a call that did not, the count is read first, so no Q-outer pass is spent on
        # rows that are then overwritten (0.5-0.6 ms per call at 64/4 S8K-32K with random selections, session 5 run
        # 7). Under CUDA-graph capture the hybrid is recorded (no sync); MSA_BRIDGE_AUTO_SYNC=0 never syncs.
        optimistic = _auto_state["expect_all_routed"]
        routed_count = _routed_count_later(un.union_len)
        if optimistic:
            o, lse = qouter_alone()
        routed = routed_count()
        _auto_state["expect_all_routed"] = routed == it.num_items
        if routed == it.num_items:
            return (o, lse) if optimistic else qouter_alone()
        if routed < AUTO_MIN_ROUTED * it.num_items:
            return _kv_outer(q, k, v, sel, plan, scale, True, page_table, validate, backend)
        return hybrid()  # (an optimistic pass is redone after the KV-outer part)
    return hybrid()
