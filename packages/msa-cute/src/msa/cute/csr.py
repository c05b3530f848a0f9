"""q2k -> k2q CSR inversion for KV-outer sparse attention (torch ops; runs on CPU or GPU without host sync).

Each query token ``t`` (per KV head ``h``) selects up to ``topk`` batch-local KV blocks ``q2k[h, t, :]``
(``-1`` tail). The sparse prefill kernel iterates over KV blocks instead, so the selection is inverted into a
CSR keyed by *packed rows*: request ``b``'s block ``j`` is row ``cu_rows[b] + j`` with
``cu_rows = [0, cumsum(ceil(k_len_b / block_size))]`` (batch-major packing). Row ``r`` of head ``h`` holds the
ascending batch-local query indices ``q_indices[h, row_ptr[h, r]:row_ptr[h, r+1]]``; the unused tail of
``q_indices[h]`` is ``-1``.

Note: upstream's (MiniMax fmha_sm100) packed rows are ordered block-major across the batch (block 0 of every
request, then block 1, ...). The two orders agree for a single request; msa uses batch-major everywhere, and its
schedule carries ``(batch, block)`` per work item so a kernel never has to invert the row order.

The build is one stable sort of small int32 keys ``h * (R+1) + row`` over q2k's flat (head, token, position)
order (a token-ordered stable sort by row is the CSR order); ``row_ptr`` is a searchsorted of the row starts in
the sorted keys, the slot tables come out of the same permutation, and the schedule sorts only the ``Hkv * R``
row lengths. ~40 torch calls in all (the plan is launch / dispatch bound below ~10M selections). All sizes come
from arguments (``total_rows``, tensor shapes), never from ``.item()``, so a CUDA build never waits on the host.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from msa.core.validation import check_int, check_tensor, validation_enabled

from ._common import cdiv, check_compute_device, check_cu_seqlens

__all__ = [
    "K2qSchedule",
    "build_k2q_csr",
    "check_selection_values",
    "schedule_q_tile",
    "packed_row_offsets",
    "token_batch_index",
]

# Work-list columns of K2qSchedule.work.
SCHED_KV_HEAD, SCHED_ROW, SCHED_BATCH, SCHED_BLOCK, SCHED_Q_START, SCHED_Q_COUNT = range(6)
Q_SLOT_BITS = 24  # q_slot packs q_local | slot << 24
MAX_SLOT = 127  # slot << 24 stays a positive int32


@dataclass
class K2qSchedule:
    """Load-balanced work list for a KV-outer kernel.

    ``work [capacity, 6]`` int32 rows ``(kv_head, row, batch, block, q_start, q_count)``: the item covers
    ``q_indices[kv_head, q_start : q_start + q_count]`` (``q_start`` is absolute in the head's payload) of packed
    row ``row`` = request ``batch``'s block ``block``. ``q_count <= q_tile`` where ``q_tile * qhead_per_kv <= 128``
    so one item fills one 128-row MMA tile (GQA heads of a KV group packed along M). Items are ordered longest row
    first (ties: lower ``(kv_head, row)`` first); rows ``>= work_count`` are ``-1``. ``work_count [1]`` int32
    stays on the device (read it only when you may synchronise).

    Built by :func:`build_k2q_csr` it also carries the sparse prefill kernel's slot tables (``None`` otherwise;
    the kernel path then derives them from the CSR with an extra sort): ``q_slot [Hkv, nnz_cap]`` int32 =
    ``q_local | slot << 24`` per CSR entry, ``slot`` = the block's rank among the token's selected blocks (its
    position in the token's ascending list, clamped to 127), and ``n_slots [total_q, Hkv]`` int32 = blocks per
    token. They come out of the CSR sort for free (its permutation names each entry's (token, list position)).
    """

    work: torch.Tensor
    work_count: torch.Tensor
    q_tile: int
    q_slot: torch.Tensor | None = None
    n_slots: torch.Tensor | None = None

    @property
    def capacity(self) -> int:
        return self.work.shape[0]


def schedule_q_tile(qhead_per_kv: int) -> int:
    """Queries per work item: the 128-row MMA tile holds ``q_tile`` tokens x ``qhead_per_kv`` heads."""
    return max(1, 128 // qhead_per_kv)


def packed_row_offsets(cu_seqlens_k: torch.Tensor, block_size: int) -> torch.Tensor:
    """``cu_rows [B+1]`` int64: request ``b``'s KV blocks are packed rows ``cu_rows[b] .. cu_rows[b+1]-1``."""
    k_lens = (cu_seqlens_k[1:] - cu_seqlens_k[:-1]).to(torch.int64)
    nblk = torch.div(k_lens.clamp(min=0) + (block_size - 1), block_size, rounding_mode="floor")
    cu_rows = torch.zeros(cu_seqlens_k.shape[0], dtype=torch.int64, device=cu_seqlens_k.device)
    torch.cumsum(nblk, 0, out=cu_rows[1:])
    return cu_rows


def token_batch_index(cu_seqlens_q: torch.Tensor, total_q: int) -> torch.Tensor:
    """``[total_q]`` int64 request id of every query token (tokens past ``cu_seqlens_q[-1]`` map to ``B``)."""
    tok = torch.arange(total_q, device=cu_seqlens_q.device, dtype=torch.int64)
    return torch.searchsorted(cu_seqlens_q[1:].to(torch.int64), tok, right=True)


def _validate_q2k_values(q2k: torch.Tensor, cu_q: torch.Tensor, cu_k: torch.Tensor, block_size: int, total_k: int,
                         total_rows: int) -> None:
    """Host-side value checks (MSA_VALIDATE / validate=True only): lengths, -1 tail, ascending, range."""
    cu_q_h = cu_q.cpu().to(torch.int64)
    cu_k_h = cu_k.cpu().to(torch.int64)
    for name, cu in (("cu_seqlens_q", cu_q_h), ("cu_seqlens_k", cu_k_h)):
        if cu[0] != 0:
            raise ValueError(f"{name}: expected cu[0] == 0, got {int(cu[0])}")
        if bool((cu[1:] < cu[:-1]).any()):
            raise ValueError(f"{name}: expected non-decreasing prefix sums, got {cu.tolist()}")
    total_q = q2k.shape[1]
    if int(cu_q_h[-1]) != total_q:
        raise ValueError(f"cu_seqlens_q: expected cu_seqlens_q[-1] == q2k_indices.shape[1] = {total_q}, "
                         f"got {int(cu_q_h[-1])}")
    if int(cu_k_h[-1]) != total_k:
        raise ValueError(f"total_k: expected cu_seqlens_k[-1] = {int(cu_k_h[-1])}, got {total_k}")
    nblk = torch.div(cu_k_h[1:] - cu_k_h[:-1] + block_size - 1, block_size, rounding_mode="floor")
    need_rows = int(nblk.sum())
    if total_rows < need_rows:
        raise ValueError(f"total_rows: expected >= sum(ceil(k_len/{block_size})) = {need_rows}, got {total_rows}")
    check_selection_values("q2k_indices", q2k.cpu().to(torch.int64), cu_q_h, nblk)


def check_selection_values(name: str, sel: torch.Tensor, cu_q: torch.Tensor, nblk: torch.Tensor) -> None:
    """``sel [H, total_q, k]``: per (head, token) strictly ascending block ids, ``-1`` only as a tail, in range."""
    if sel.numel() == 0:
        return
    neg = sel < 0
    if bool((sel < -1).any()):
        bad = (sel < -1).nonzero()[0].tolist()
        raise ValueError(f"{name}: expected block ids >= 0 or -1 padding, got {int(sel[tuple(bad)])} at "
                         f"[head, token, slot] = {bad}")
    # -1 only at the tail: once a slot is -1 every later slot must be -1.
    seen_pad = torch.cummax(neg.to(torch.int8), dim=-1).values.bool()
    mid = seen_pad & ~neg
    if bool(mid.any()):
        bad = mid.nonzero()[0].tolist()
        raise ValueError(f"{name}: -1 padding must be at the tail of each row; found a block id after -1 at "
                         f"[head, token, slot] = {bad}")
    both = ~neg[..., 1:] & ~neg[..., :-1]
    desc = both & (sel[..., 1:] <= sel[..., :-1])
    if bool(desc.any()):
        bad = desc.nonzero()[0].tolist()
        raise ValueError(f"{name}: block ids must be strictly ascending per token; violated at "
                         f"[head, token, slot] = {bad}")
    total_q = sel.shape[1]
    tb = torch.searchsorted(cu_q[1:], torch.arange(total_q), right=True).clamp(max=max(len(nblk) - 1, 0))
    if len(nblk) == 0:
        return
    limit = nblk[tb].view(1, total_q, 1)
    oob = ~neg & (sel >= limit)
    if bool(oob.any()):
        h, t, s = oob.nonzero()[0].tolist()
        raise ValueError(
            f"{name}: block id {int(sel[h, t, s])} at [head {h}, token {t}, slot {s}] is out of range for request "
            f"{int(tb[t])} which has {int(nblk[tb[t]])} blocks"
        )


def build_k2q_csr(
    q2k_indices: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    block_size: int = 128,
    *,
    total_k: int,
    total_rows: int | None = None,
    max_seqlen_k: int | None = None,
    max_seqlen_q: int | None = None,
    qhead_per_kv: int = 1,
    return_schedule: bool = False,
    validate: bool | None = None,
):
    """Invert per-token block selections into the k2q CSR (see the module docstring for the layout).

    Args:
        q2k_indices: ``[Hkv, total_q, topk]`` int32, batch-local block ids, ``-1`` tail (last dim contiguous).
        cu_seqlens_q / cu_seqlens_k: ``[B+1]`` int32 prefix sums on the same device.
        block_size: KV tokens per block (128 for the kernels).
        total_k: total KV tokens (``k.shape[0]`` ragged, ``sum(kv_lens)`` paged); required so that no size is
            read back from the device.
        total_rows: packed row count; ``None`` = exact when ``cu_seqlens_k`` is on the CPU, else the bound
            ``(total_k + B*(block_size-1)) // block_size`` (extra rows stay empty).
        max_seqlen_k / max_seqlen_q: accepted for API parity (bounds a kernel may use); checked if given.
        qhead_per_kv: query heads per KV head; sets the schedule tile (``q_tile = 128 // qhead_per_kv``).
        return_schedule: also return a :class:`K2qSchedule`.
        validate: value checks (host sync); default from ``MSA_VALIDATE``.

    Selections outside ``[0, ceil(k_len/block_size))`` are dropped (``validate=True`` raises instead).

    Returns:
        ``(row_ptr [Hkv, total_rows+1] int32, q_indices [Hkv, total_q*topk] int32[, schedule])``.
    """
    check_tensor("q2k_indices", q2k_indices, dtype=torch.int32, ndim=3, last_dim_contiguous=True)
    check_compute_device("q2k_indices", q2k_indices)
    dev = q2k_indices.device
    batch = check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, device=dev)
    check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, device=dev, batch=batch)
    block_size = check_int("block_size", block_size, min=1)
    if total_k is None:
        raise ValueError("total_k: required (k.shape[0] for ragged K, sum(kv_lens) for paged K); got None")
    total_k = check_int("total_k", total_k, min=0)
    qhead_per_kv = check_int("qhead_per_kv", qhead_per_kv, min=1)
    if max_seqlen_k is not None:
        check_int("max_seqlen_k", max_seqlen_k, min=0)
    if max_seqlen_q is not None:
        check_int("max_seqlen_q", max_seqlen_q, min=0)
    if not isinstance(return_schedule, bool):
        raise TypeError(f"return_schedule: expected a bool, got {type(return_schedule).__name__}")
    if total_rows is None:
        if cu_seqlens_k.device.type == "cpu":
            total_rows = int(packed_row_offsets(cu_seqlens_k, block_size)[-1])
        else:
            total_rows = (total_k + batch * (block_size - 1)) // block_size
    total_rows = check_int("total_rows", total_rows, min=0)

    hkv, total_q, topk = q2k_indices.shape
    if validation_enabled(validate):
        _validate_q2k_values(q2k_indices, cu_seqlens_q, cu_seqlens_k, block_size, total_k, total_rows)

    nnz_cap = total_q * topk
    if nnz_cap == 0 or hkv == 0 or batch == 0:
        row_ptr = torch.zeros(hkv, total_rows + 1, dtype=torch.int32, device=dev)
        q_indices = torch.full((hkv, nnz_cap), -1, dtype=torch.int32, device=dev)
        q_slot = torch.zeros(hkv, nnz_cap, dtype=torch.int32, device=dev)
        n_slots = torch.zeros(total_q, hkv, dtype=torch.int32, device=dev)
        req = None
    else:
        req = _request_tables(cu_seqlens_q, cu_seqlens_k, block_size, total_rows)
        row_ptr, q_indices, q_slot, n_slots = _invert(q2k_indices, cu_seqlens_q, req, total_rows,
                                                      with_slots=return_schedule)
    if not return_schedule:
        return row_ptr, q_indices
    schedule = _build_schedule(row_ptr, cu_seqlens_k, block_size, nnz_cap, schedule_q_tile(qhead_per_kv),
                               request_tables=req)
    schedule.q_slot, schedule.n_slots = q_slot, n_slots
    return row_ptr, q_indices, schedule


def _request_tables(cu_q, cu_k, block_size, total_rows):
    """Per request ``b``: ``(table [B+1, 3] int32, first_row [B] int32, row_end [B] int32)``.

    ``table[b] = (first packed row, usable blocks, first token)``; usable = ``min(nblk_b, total_rows - first
    row)`` (a too small ``total_rows`` drops the rows past it; a negative count selects nothing). The extra entry ``b = B`` (zeros:
    no usable blocks) serves tokens past ``cu_seqlens_q[-1]``, so no per-token validity mask is needed.
    """
    k_lens = torch.diff(cu_k).clamp_(min=0)
    nblk = torch.div(k_lens + (block_size - 1), block_size, rounding_mode="floor")
    row_end = torch.cumsum(nblk, 0, dtype=torch.int32)
    first_row = row_end - nblk
    usable = row_end.clamp(max=total_rows) - first_row  # < 0 past total_rows: selects nothing either
    table = torch.nn.functional.pad(torch.stack([first_row, usable, cu_q[:-1]], 1), (0, 0, 0, 1))
    return table, first_row, row_end


def _invert(q2k, cu_q, req, total_rows, with_slots=False):
    """One stable sort of small integer keys; the rest are elementwise ops, one gather and one searchsorted.

    key = ``h * (R+1) + row`` (invalid selections: ``h * (R+1) + R``, after the head's valid rows), sorted as
    one flat array: q2k's flat order is (head, token, list position), so the stable sort leaves every row's
    tokens ascending (the CSR order) and heads in their own contiguous ranges of ``T * topk`` entries.
    ``row_ptr`` = searchsorted of the row starts in the sorted keys (no histogram). The slot of an entry is its
    rank among its token's valid selections (a per-token cumsum; = the list position for a well-formed
    ascending, -1-tailed list), packed with ``q_local`` into one int32 payload before the gather.
    """
    hkv, total_q, topk = q2k.shape
    dev = q2k.device
    n = total_q * topk
    table, _, _ = req
    stride = total_rows + 1
    key_dtype = torch.int32 if hkv * stride < 2**31 else torch.int64
    tok = torch.arange(total_q, dtype=torch.int32, device=dev)
    per_tok = table[torch.searchsorted(cu_q[1:], tok, right=True)]  # [T, 3]: tokens past cu_q[-1] -> zeros row
    head_first = torch.arange(0, hkv * stride, stride, dtype=key_dtype, device=dev).view(hkv, 1, 1)  # row 0 key
    sentinel = head_first + total_rows  # [Hkv, 1, 1] key of the head's invalid selections
    valid = (q2k >= 0) & (q2k < per_tok[:, 1:2])  # [T, 1] columns broadcast over (head, list position)
    key = torch.where(valid, q2k + (head_first + per_tok[:, 0:1]), sentinel)
    sorted_key, src = torch.sort(key.view(-1), stable=True)
    sorted_key = sorted_key.view(hkv, n)
    row_starts = head_first.view(hkv, 1) + torch.arange(stride, dtype=key_dtype, device=dev)
    row_ptr = torch.searchsorted(sorted_key, row_starts, out_int32=True)
    in_csr = sorted_key < sentinel.view(hkv, 1)
    q_local_tok = tok.view(total_q, 1) - per_tok[:, 2:3]  # [T, 1]
    q_local = q_slot = n_slots = None
    if with_slots:
        rank1 = torch.cumsum(valid, dim=2, dtype=torch.int32)  # 1-based rank among the token's valid selections
        n_slots = rank1[:, :, -1].t().contiguous()
        if topk <= MAX_SLOT:  # rank - 1 <= 126: no clamp; (rank1 << 24) + (q_local - 2**24) folds the "- 1"
            payload = (rank1 << Q_SLOT_BITS) + (q_local_tok - (1 << Q_SLOT_BITS))
        else:
            payload = ((rank1.clamp(max=MAX_SLOT + 1) - 1) << Q_SLOT_BITS) + q_local_tok
        packed = payload.view(-1)[src].view(hkv, n)
        q_slot = torch.where(in_csr, packed, 0)
        if total_q <= 1 << Q_SLOT_BITS:  # every q_local fits the low 24 bits
            q_local = packed & ((1 << Q_SLOT_BITS) - 1)
    if q_local is None:
        q_local = q_local_tok.expand(hkv, total_q, topk).reshape(-1)[src].view(hkv, n)
    q_indices = torch.where(in_csr, q_local, -1)
    return row_ptr, q_indices, q_slot, n_slots


def _build_schedule(row_ptr, cu_k, block_size, nnz_cap, q_tile, request_tables=None) -> K2qSchedule:
    """Work list from ``row_ptr`` (see :class:`K2qSchedule`): rows sorted longest first (a stable sort of the
    ``Hkv * R`` negated lengths: small), then every work row finds its item by one searchsorted over the
    items' cumulative chunk counts and reads a per-item table ``(h, r, batch, block, q_start - w*q_tile,
    q_end - w*q_tile)`` with one gather (``w*q_tile`` added back per work row)."""
    hkv, total_rows = row_ptr.shape[0], row_ptr.shape[1] - 1
    dev = row_ptr.device
    n_items = hkv * total_rows
    nnz_bound = hkv * nnz_cap
    capacity = nnz_bound // q_tile + min(n_items, nnz_bound)
    batch = cu_k.shape[0] - 1
    if capacity == 0 or n_items == 0 or batch == 0:
        return K2qSchedule(torch.full((capacity, 6), -1, dtype=torch.int32, device=dev),
                           torch.zeros(1, dtype=torch.int32, device=dev), q_tile)
    if request_tables is None:
        request_tables = _request_tables(cu_k, cu_k, block_size, total_rows)  # cu_q unused by the schedule
    _, first_row, row_end = request_tables
    neg_len, order = torch.sort(torch.diff(row_ptr, dim=1).view(-1).neg(), stable=True)  # ties: lower (h, r)
    chunks = torch.div((q_tile - 1) - neg_len, q_tile, rounding_mode="floor")  # ceil(len / q_tile)
    cum = torch.cumsum(chunks, 0, dtype=torch.int64)
    begin_q = (cum - chunks) * q_tile  # first query of the item's first work row, relative to the row start
    h = torch.div(order, total_rows, rounding_mode="floor")
    r = order - h * total_rows
    b = torch.searchsorted(row_end, r.to(torch.int32), right=True).clamp_(max=batch - 1)
    block = r - first_row[b]
    row_q0 = row_ptr.reshape(-1)[order + h]  # row_ptr[h, r]
    items = torch.stack([h, r, b, block, row_q0 - begin_q, begin_q - neg_len], 1)
    wq = torch.arange(0, capacity * q_tile, q_tile, dtype=torch.int64, device=dev)
    cum_q = cum * q_tile
    work = items[torch.searchsorted(cum_q, wq, right=True).clamp_(max=n_items - 1)]
    work[:, 4].add_(wq)
    q_count = work[:, 5:6]
    q_count.sub_(wq.view(-1, 1)).clamp_(max=q_tile)  # <= 0 exactly on the rows past the last chunk
    work = torch.where(q_count > 0, work, -1).to(torch.int32)
    return K2qSchedule(work, cum[-1:].to(torch.int32), q_tile)


def csr_capacity(total_q: int, topk: int) -> int:
    return total_q * topk


def rows_for(kv_lens: list[int], block_size: int = 128) -> int:
    """Host helper: exact packed row count for known KV lengths."""
    return sum(cdiv(n, block_size) for n in kv_lens)
