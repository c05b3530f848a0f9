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

The build is sort based: every valid selection becomes the int64 key ``row * total_q + t`` and one sort per head
yields the whole payload in CSR order; ``row_ptr`` is a ``scatter_add`` histogram + ``cumsum``. All sizes come
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
    row_ptr = torch.zeros(hkv, total_rows + 1, dtype=torch.int32, device=dev)
    if nnz_cap == 0 or hkv == 0 or batch == 0:
        q_indices = torch.full((hkv, nnz_cap), -1, dtype=torch.int32, device=dev)
        counts = torch.zeros(hkv, total_rows, dtype=torch.int64, device=dev)
        q_slot = torch.zeros(hkv, nnz_cap, dtype=torch.int32, device=dev)
        n_slots = torch.zeros(total_q, hkv, dtype=torch.int32, device=dev)
    else:
        q_indices, counts, q_slot, n_slots = _invert(q2k_indices, cu_seqlens_q, cu_seqlens_k, block_size, total_rows,
                                                     row_ptr, with_slots=return_schedule)
    if not return_schedule:
        return row_ptr, q_indices
    schedule = _build_schedule(row_ptr, counts, cu_seqlens_k, block_size, nnz_cap, schedule_q_tile(qhead_per_kv))
    schedule.q_slot, schedule.n_slots = q_slot, n_slots
    return row_ptr, q_indices, schedule


def _invert(q2k, cu_q, cu_k, block_size, total_rows, row_ptr, with_slots=False):
    hkv, total_q, topk = q2k.shape
    dev = q2k.device
    cu_q64 = cu_q.to(torch.int64)
    batch = cu_q.shape[0] - 1
    cu_rows = packed_row_offsets(cu_k, block_size)
    nblk = cu_rows[1:] - cu_rows[:-1]
    tok_b = token_batch_index(cu_q, total_q)  # [T]
    tok_ok = tok_b < batch
    tok_b_safe = tok_b.clamp(max=batch - 1)

    blk = q2k.to(torch.int64)
    row = cu_rows[tok_b_safe].view(1, total_q, 1) + blk
    valid = (blk >= 0) & (blk < nblk[tok_b_safe].view(1, total_q, 1)) & tok_ok.view(1, total_q, 1)
    valid &= row < total_rows
    tok = torch.arange(total_q, device=dev, dtype=torch.int64).view(1, total_q, 1)
    sentinel = total_rows * total_q
    key = torch.where(valid, row * total_q + tok, torch.full_like(row, sentinel)).reshape(hkv, total_q * topk)
    if with_slots:
        # The sort's permutation names each entry's source (token, list position); the slot is the position
        # among the token's valid selections (= the position itself for a well-formed ascending, -1-tailed list).
        sorted_key, src = torch.sort(key, dim=1, stable=True)
    else:
        sorted_key, src = torch.sort(key, dim=1).values, None

    # Histogram of rows (invalid selections land in the spare bucket total_rows).
    row_or_spare = torch.where(valid, row, torch.full_like(row, total_rows)).reshape(hkv, -1)
    counts = torch.zeros(hkv, total_rows + 1, dtype=torch.int64, device=dev)
    counts.scatter_add_(1, row_or_spare, torch.ones_like(row_or_spare))
    counts = counts[:, :total_rows]
    row_ptr[:, 1:] = torch.cumsum(counts, dim=1).to(torch.int32)

    is_valid = sorted_key < sentinel
    q_glob = torch.remainder(sorted_key, total_q)
    q_local = q_glob - cu_q64[tok_b_safe[q_glob]]
    q_indices = torch.where(is_valid, q_local, torch.full_like(q_local, -1)).to(torch.int32)
    if src is None:
        return q_indices, counts, None, None
    valid_flat = valid.reshape(hkv, total_q * topk)
    rank = (torch.cumsum(valid.to(torch.int32), dim=-1) - 1).clamp(min=0, max=MAX_SLOT).reshape(hkv, -1)
    slot = torch.gather(rank, 1, src).to(torch.int64)
    q_slot = torch.where(is_valid, q_local | (slot << Q_SLOT_BITS), torch.zeros_like(q_local)).to(torch.int32)
    n_slots = valid_flat.view(hkv, total_q, topk).sum(-1, dtype=torch.int32).t().contiguous()
    return q_indices, counts, q_slot, n_slots


def _build_schedule(row_ptr, counts, cu_k, block_size, nnz_cap, q_tile) -> K2qSchedule:
    hkv, total_rows = counts.shape
    dev = row_ptr.device
    n_items = hkv * total_rows
    nnz_bound = hkv * nnz_cap
    capacity = nnz_bound // q_tile + min(n_items, nnz_bound)
    work = torch.full((capacity, 6), -1, dtype=torch.int32, device=dev)
    work_count = torch.zeros(1, dtype=torch.int32, device=dev)
    if capacity == 0 or n_items == 0:
        return K2qSchedule(work, work_count, q_tile)
    flat_counts = counts.reshape(-1)
    order = torch.argsort(-flat_counts, stable=True)  # longest rows first
    chunks = torch.div(flat_counts[order] + (q_tile - 1), q_tile, rounding_mode="floor")
    cum = torch.cumsum(chunks, 0)
    w = torch.arange(capacity, device=dev, dtype=torch.int64)
    item_pos = torch.searchsorted(cum, w, right=True).clamp(max=n_items - 1)
    live = w < cum[-1]
    item = order[item_pos]
    h = torch.div(item, total_rows, rounding_mode="floor")
    r = item - h * total_rows
    chunk = w - (cum[item_pos] - chunks[item_pos])
    q_start = row_ptr.to(torch.int64)[h, r] + chunk * q_tile
    q_count = torch.clamp(flat_counts[item] - chunk * q_tile, max=q_tile)
    cu_rows = packed_row_offsets(cu_k, block_size)
    b = torch.searchsorted(cu_rows[1:], r, right=True).clamp(max=cu_rows.shape[0] - 2)
    block = r - cu_rows[b]
    cols = torch.stack([h, r, b, block, q_start, q_count], dim=1)
    work.copy_(torch.where(live.view(-1, 1), cols, torch.full_like(cols, -1)).to(torch.int32))
    work_count.copy_(cum[-1:].to(torch.int32))
    return K2qSchedule(work, work_count, q_tile)


def csr_capacity(total_q: int, topk: int) -> int:
    return total_q * topk


def rows_for(kv_lens: list[int], block_size: int = 128) -> int:
    """Host helper: exact packed row count for known KV lengths."""
    return sum(cdiv(n, block_size) for n in kv_lens)
