"""Dispatch module of the SM90 KV-outer sparse prefill (``msa.cute.sparse_atten_func`` kernel backend).

DSL-free: a GPU node imports this and loads the prebuilt kernels through :mod:`msa.cute.jit` (msa-cache bundle);
only building them needs cutlass-dsl. Pipeline of :func:`run`:

1. schedule: the caller's :class:`msa.cute.K2qSchedule` or one built from the CSR (work items of at most
   ``128 // G`` queries of one KV block row, longest rows first);
2. slot table (torch, no host sync): ``q_slot[h, e] = q_local | slot << 24`` for every CSR entry, where ``slot`` is
   the entry's rank among its token's entries (= the block's position in the token's ascending block list), and
   ``n_slots[t, h]``; taken from the schedule when ``build_k2q_csr(return_schedule=True)`` made it (free there:
   the CSR sort's permutation), else derived here with a second sort (:func:`slot_tables`);
3. partial kernel (``sparse_prefill_partial_sm90``): per work item, per-slot normalised O + LSE; two builds with
   the same arguments and results: "serial" (2 CTAs per SM, every phase in turn) and "ws" (warp-specialised: a
   producer warpgroup gathers Q into a 4-stage ring and TMA-loads K/V ahead of two consumer warpgroups; 1 CTA per
   SM). ``MSA_CUTE_SPARSE_PREFILL_PARTIAL=serial|ws`` picks one (default :data:`DEFAULT_VARIANT`);
4. combine kernel (``sparse_prefill_combine``): LSE-weighted merge of each token's slots -> O (bf16), LSE.

On by default on SM90 (validated by tests/cute/test_sparse_prefill_kernel.py's GPU part); ``MSA_CUTE_SPARSE_PREFILL=0``
turns it off (the op then runs the PyTorch reference), e.g. to A/B or to rule the kernel out.
"""

from __future__ import annotations

import functools
import math
import os

import torch
from msa.cute.csr import MAX_SLOT, Q_SLOT_BITS  # q_slot packing, shared with the CSR build
from msa.cute.jit import CuteSpec

__all__ = [
    "available",
    "supports",
    "run",
    "slot_tables",
    "schedule_slot_tables",
    "kernel_specs",
    "cute_specs",
    "PARTIAL",
    "COMBINE",
    "DISABLE_ENV",
    "VARIANT_ENV",
    "VARIANTS",
    "DEFAULT_VARIANT",
    "partial_variant",
]

PARTIAL = "msa.cute.kernels.dsl.sparse_prefill_partial_sm90:partial"
COMBINE = "msa.cute.kernels.dsl.sparse_prefill_combine:combine"
DISABLE_ENV = "MSA_CUTE_SPARSE_PREFILL"  # "0": opt out (the op falls back to the reference)
HEAD_DIM = 128
BLOCK = 128
TILE_M = 128
CTAS_PER_SM = 2  # serial variant (96 KiB smem per CTA)
VARIANT_ENV = "MSA_CUTE_SPARSE_PREFILL_PARTIAL"  # partial kernel build: "serial" or "ws"
VARIANTS = ("serial", "ws")
DEFAULT_VARIANT = "ws"  # warp-specialised; H100 session 3 run 10: all GPU tests pass, partial 10.3 vs 11.8 ms (64/4 S32K)
CTAS_PER_SM_OF = {"serial": 2, "ws": 1}  # ws: 192 KiB smem (4 Q stages + K/V), 384 threads
PARTIAL_DTYPES = {torch.bfloat16: "bfloat16", torch.float32: "float32"}
LOG2_E = 1.4426950408889634


def available(device) -> tuple[bool, str]:
    """Cheap: no compilation. On by default on SM90; ``MSA_CUTE_SPARSE_PREFILL=0`` opts out."""
    if os.environ.get(DISABLE_ENV, "1") == "0":
        return False, f"disabled by {DISABLE_ENV}=0"
    device = torch.device(device)
    if device.type != "cuda":
        return False, f"tensors are on {device}, the SM90 sparse prefill kernel needs CUDA"
    if not torch.cuda.is_available():
        return False, "torch.cuda is not available"
    cc = torch.cuda.get_device_capability(device)
    if cc != (9, 0):
        return False, f"compute capability {cc[0]}.{cc[1]}: this kernel is SM90 (Hopper) only"
    try:
        import tvm_ffi  # noqa: F401
    except Exception as e:  # pragma: no cover - install problem
        return False, f"apache-tvm-ffi is not importable: {e}"
    return True, "ok"


def supports(*, q_dtype=None, kv_dtype=None, head_dim=None, head_dim_v=None, topk=None, qhead_per_kv=None,
             paged=None, blk_kv=None, causal=None, partial_dtype=None, temperature_lse=False, **_) -> tuple[bool, str]:
    """Does this kernel implement the call? (features passed by ``sparse_atten_func``)."""
    if q_dtype is not torch.bfloat16 or kv_dtype is not torch.bfloat16:
        return False, f"bf16 Q/K/V only (got q {q_dtype}, k/v {kv_dtype})"
    if head_dim != HEAD_DIM or head_dim_v != HEAD_DIM:
        return False, f"head dim {HEAD_DIM} only (got {head_dim}/{head_dim_v})"
    if blk_kv != BLOCK:
        return False, f"blk_kv {BLOCK} only (got {blk_kv})"
    if qhead_per_kv is None or qhead_per_kv < 1 or TILE_M % qhead_per_kv:
        return False, f"Hq/Hkv must divide {TILE_M} (got {qhead_per_kv})"
    if topk is None or not 1 <= topk <= MAX_SLOT:
        return False, f"topk must be in [1, {MAX_SLOT}] (got {topk})"
    if partial_dtype not in PARTIAL_DTYPES:
        return False, f"partial_dtype must be bf16 or fp32 (got {partial_dtype})"
    if temperature_lse:
        return False, "the temperature LSE (lse_temperature_scale != 1) is not implemented in the kernel"
    return True, "ok"


def partial_variant(variant: str | None = None) -> str:
    """The partial kernel build to run: ``variant`` if given, else ``$MSA_CUTE_SPARSE_PREFILL_PARTIAL``, else
    :data:`DEFAULT_VARIANT`."""
    name = variant if variant is not None else os.environ.get(VARIANT_ENV, DEFAULT_VARIANT)
    if name not in VARIANTS:
        src = "variant" if variant is not None else VARIANT_ENV
        raise ValueError(f"{src}: expected one of {VARIANTS}, got {name!r}")
    return name


# ---- specs (what warmup builds, what run loads) -----------------------------------------------------------------
def kernel_specs(qhead_per_kv: int, paged: bool, partial_dtype: str, arch: str = "sm_90a",
                 variant: str = "serial") -> tuple[CuteSpec, CuteSpec]:
    """(partial, combine) specs. The serial variant's name carries no variant parameter (its cache entries predate
    the ws variant)."""
    params = {"qhead_per_kv": qhead_per_kv, "paged": paged, "partial_dtype": partial_dtype}
    if partial_variant(variant) != "serial":
        params["variant"] = variant
    partial = CuteSpec(PARTIAL, params, arch)
    combine = CuteSpec(COMBINE, {"partial_dtype": partial_dtype}, arch)
    return partial, combine


def cute_specs(preset: dict, arch: str) -> list[CuteSpec]:
    """Warmup: every (GQA ratio, ragged/paged, partial dtype, partial variant) the preset's bf16 / d128 / block-128
    shapes need. SM90 only (other archs get nothing: the kernel is Hopper-specific)."""
    if arch != "sm_90a":
        return []
    if "bf16" not in preset.get("dtypes", ["bf16"]) or HEAD_DIM not in preset.get("head_dim", [HEAD_DIM]):
        return []
    if BLOCK not in preset.get("block_size", [BLOCK]):
        return []
    groups = sorted({h["hq"] // h["hkv"] for h in preset.get("heads", []) if h["hq"] % h["hkv"] == 0})
    out = {}
    for group in groups:
        if TILE_M % group:
            continue
        for partial_dtype in ("bfloat16", "float32"):
            for paged in (False, True):
                for variant in VARIANTS:
                    for spec in kernel_specs(group, paged, partial_dtype, arch, variant):
                        out.setdefault(spec.name, spec)
    return list(out.values())


@functools.lru_cache(maxsize=64)
def _kernels(group: int, paged: bool, partial_dtype: str, arch: str = "sm_90a", variant: str = "serial"):
    """(partial, combine) tvm-ffi functions, built or fetched from the cache once per process."""
    partial, combine = kernel_specs(group, paged, partial_dtype, arch, variant)
    return partial.load(), combine.load()


def partial_ctas(num_sms: int, capacity: int, variant: str) -> int:
    """Persistent grid of the partial kernel: its CTAs per SM times the SMs, at most one per work item."""
    return max(1, min(capacity, CTAS_PER_SM_OF[variant] * num_sms))


@functools.lru_cache(maxsize=16)
def _num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


# ---- host-side tables (torch, no host synchronisation) ----------------------------------------------------------
def slot_tables(row_ptr: torch.Tensor, q_indices: torch.Tensor, cu_seqlens_q: torch.Tensor,
                cu_seqlens_k: torch.Tensor, total_q: int, block: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q_slot [Hkv, cap] int32, n_slots [total_q, Hkv] int32)`` for a k2q CSR (see the module docstring).

    Entries past ``row_ptr[h, -1]`` get 0 and are never read. Within a token, CSR order is ascending block order
    (rows are batch-major, each request's blocks ascending), so a stable sort by token keeps it and the rank is the
    block's position in the token's list. Ranks above :data:`MAX_SLOT` are clamped (such a token is already
    beyond any top-k; the combine turns it into NaN).
    """
    from msa.cute.csr import packed_row_offsets

    hkv, cap = q_indices.shape
    dev = q_indices.device
    batch = cu_seqlens_q.shape[0] - 1
    if hkv == 0 or cap == 0 or batch == 0 or total_q == 0:
        return (torch.zeros(hkv, cap, dtype=torch.int32, device=dev),
                torch.zeros(total_q, hkv, dtype=torch.int32, device=dev))
    pos = torch.arange(cap, device=dev, dtype=torch.int64).expand(hkv, cap).contiguous()
    rp = row_ptr.to(torch.int64)
    valid = pos < rp[:, -1:]
    row = torch.searchsorted(rp[:, 1:].contiguous(), pos, right=True)
    cu_rows = packed_row_offsets(cu_seqlens_k, block)
    b = torch.searchsorted(cu_rows[1:].contiguous(), row, right=True).clamp(max=batch - 1)
    q_local = q_indices.to(torch.int64).clamp(min=0)
    tok = torch.where(valid, q_local + cu_seqlens_q.to(torch.int64)[b], torch.full_like(q_local, total_q))
    tok = tok.clamp(max=total_q)
    order = torch.argsort(tok, dim=1, stable=True)
    sorted_tok = torch.gather(tok, 1, order)
    first = torch.searchsorted(sorted_tok, sorted_tok, right=False)
    rank = (pos - first).clamp(max=MAX_SLOT)
    slot = torch.empty_like(rank).scatter_(1, order, rank)
    q_slot = torch.where(valid, q_local | (slot << Q_SLOT_BITS), torch.zeros_like(q_local)).to(torch.int32)
    counts = torch.zeros(hkv, total_q + 1, dtype=torch.int32, device=dev)
    counts.scatter_add_(1, tok, valid.to(torch.int32))
    n_slots = counts[:, :total_q].t().contiguous()
    return q_slot, n_slots


def schedule_slot_tables(sched, row_ptr, q_indices, cu_seqlens_q, cu_seqlens_k, total_q):
    """The schedule's slot tables when ``build_k2q_csr(return_schedule=True)`` made them, else :func:`slot_tables`."""
    hkv, cap = q_indices.shape
    if (sched.q_slot is not None and sched.n_slots is not None and tuple(sched.q_slot.shape) == (hkv, cap)
            and tuple(sched.n_slots.shape) == (total_q, hkv)):
        return sched.q_slot, sched.n_slots
    return slot_tables(row_ptr, q_indices, cu_seqlens_q, cu_seqlens_k, total_q)


def _schedule(schedule, row_ptr, cu_seqlens_k, nnz_cap: int, group: int):
    from msa.cute.csr import _build_schedule, schedule_q_tile

    q_tile = schedule_q_tile(group)
    if schedule is not None:
        if schedule.q_tile != q_tile:
            raise ValueError(f"schedule: built for q_tile {schedule.q_tile} but Hq/Hkv = {group} needs q_tile "
                             f"{q_tile} (pass qhead_per_kv={group} to build_k2q_csr)")
        return schedule
    return _build_schedule(row_ptr, cu_seqlens_k, BLOCK, nnz_cap, q_tile)


def run(*, q, k, v, k2q_row_ptr, k2q_q_indices, topk, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
        blk_kv, causal, softmax_scale, lse_temperature_scale, return_temperature_lse, partial_dtype,
        return_softmax_lse, page_table, seqused_k, schedule):
    """Kernel path of ``sparse_atten_func`` (arguments already validated by the public op)."""
    del max_seqlen_q, max_seqlen_k, lse_temperature_scale  # bounds only; temperature != 1 is not routed here
    ok, why = supports(q_dtype=q.dtype, kv_dtype=k.dtype, head_dim=q.shape[-1], head_dim_v=v.shape[-1], topk=topk,
                       qhead_per_kv=q.shape[1] // k.shape[1], blk_kv=blk_kv, partial_dtype=partial_dtype)
    if not ok:
        raise ValueError(f"sparse_atten_func kernel: {why}")
    total_q, hq, d = q.shape
    hkv = k.shape[1]
    group = hq // hkv
    dev = q.device
    paged = page_table is not None
    o = _empty(total_q, hq, d, dtype=torch.bfloat16, device=dev)
    lse = _empty(total_q, hq, dtype=torch.float32, device=dev)
    nnz_cap = k2q_q_indices.shape[1]
    sched = _schedule(schedule, k2q_row_ptr, cu_seqlens_k, nnz_cap, group)
    if total_q == 0 or cu_seqlens_q.shape[0] < 2 or sched.capacity == 0:
        o.zero_()
        lse.fill_(-math.inf)
        return _pack(o, lse, return_softmax_lse, return_temperature_lse)

    q_slot, n_slots = schedule_slot_tables(sched, k2q_row_ptr, k2q_q_indices, cu_seqlens_q, cu_seqlens_k, total_q)
    if seqused_k is not None:
        kv_len = seqused_k.to(torch.int32).contiguous()
    else:
        kv_len = (cu_seqlens_k[1:] - cu_seqlens_k[:-1]).to(torch.int32).contiguous()
    part_name = PARTIAL_DTYPES[partial_dtype]
    o_part = _empty(topk, total_q, hq, d, dtype=partial_dtype, device=dev)  # slots past n_slots are never read
    lse_part = _empty(topk, total_q, hq, dtype=torch.float32, device=dev)
    pt = page_table.contiguous() if paged else torch.zeros(1, 1, dtype=torch.int32, device=dev)
    variant = partial_variant()
    num_ctas = partial_ctas(_num_sms(dev.index if dev.index is not None else 0), sched.capacity, variant)
    partial_fn, combine_fn = _kernels(group, paged, part_name, "sm_90a", variant)
    partial_fn(_dense(q), _dense(k), _dense(v), sched.work, sched.work_count, q_slot, cu_seqlens_q.contiguous(),
               cu_seqlens_k.contiguous(), kv_len, pt, o_part, lse_part, float(softmax_scale) * LOG2_E,
               int(bool(causal)), int(topk), int(num_ctas))
    combine_fn(o_part, lse_part, n_slots, o, lse, int(topk))
    return _pack(o, lse, return_softmax_lse, return_temperature_lse)


def _dense(t: torch.Tensor) -> torch.Tensor:
    """Contiguous with a 16-byte aligned base (cp.async / TMA need it); copies only when it is not."""
    t = t.contiguous()
    return t if t.data_ptr() % 16 == 0 else t.clone()


def _empty(*shape, dtype, device):
    """Allocation point of every output and workspace (tests poison it with NaN)."""
    return torch.empty(*shape, dtype=dtype, device=device)


def _pack(o, lse, return_lse, return_temp):
    if return_temp:
        return o, lse, lse.clone()  # temperature 1: the temperature LSE is the LSE
    if return_lse:
        return o, lse
    return o
