"""Work counting shared by every row of a case, so TFLOP/s and GB/s compare across implementations.

FLOPs follow upstream MSA: attention does ``2 * (Dqk + Dv)`` FLOPs per (query head, visible (q, k) pair): one
multiply-add per element for QK^T and one for PV. Dense causal work counts the visible pairs exactly with
bottom-right alignment (query ``i`` of a request sees keys ``j <= i + kv_len - q_len``); sparse work counts the
selected elements (pairs inside the selected 128-token blocks that are also causally visible). The score-only
index pass does ``2 * Dqk`` per pair.

Bytes are the minimum traffic: every input read once, every output written once. For sparse attention only the
K/V blocks that some query selected count (their union per request and KV head).
"""

from __future__ import annotations

import torch

BLOCK = 128


def _sum_clamped_run(first: int, count: int, hi: int) -> int:
    """sum_{t=first}^{first+count-1} min(max(t, 0), hi), exactly, in O(1)."""
    if count <= 0:
        return 0
    last = first + count - 1
    lo = max(first, 1)
    mid_end = min(last, hi)
    total = 0
    if mid_end >= lo:
        total += (lo + mid_end) * (mid_end - lo + 1) // 2
    sat_start = max(lo, hi + 1)
    if last >= sat_start:
        total += hi * (last - sat_start + 1)
    return total


def visible_pairs(q_len: int, kv_len: int, causal: bool, qo_offset: int | None = None) -> int:
    """Number of (query, key) pairs one head of one request computes (bottom-right causal by default)."""
    if q_len < 0 or kv_len < 0:
        raise ValueError(f"q_len/kv_len: expected >= 0, got {q_len}/{kv_len}")
    if not causal:
        return q_len * kv_len
    offset = kv_len - q_len if qo_offset is None else qo_offset
    # query i sees clamp(i + offset + 1, 0, kv_len) keys
    return _sum_clamped_run(offset + 1, q_len, kv_len)


def attention_flops(pairs_per_head: int, q_heads: int, d_qk: int, d_v: int) -> float:
    return 2.0 * (d_qk + d_v) * q_heads * pairs_per_head


def index_pass_flops(pairs_per_head: int, q_heads: int, d_qk: int) -> float:
    return 2.0 * d_qk * q_heads * pairs_per_head


def dense_flops(batch: int, q_len: int, kv_len: int, q_heads: int, d_qk: int, d_v: int, causal: bool) -> float:
    return attention_flops(batch * visible_pairs(q_len, kv_len, causal), q_heads, d_qk, d_v)


def dense_bytes(
    batch: int, q_len: int, kv_len: int, q_heads: int, kv_heads: int, d_qk: int, d_v: int, in_bytes: int, out_bytes: int
) -> float:
    q = batch * q_len * q_heads * d_qk * in_bytes
    kv = batch * kv_len * kv_heads * (d_qk + d_v) * in_bytes
    o = batch * q_len * q_heads * d_v * out_bytes
    return float(q + kv + o)


def max_score_bytes(batch: int, q_len: int, kv_len: int, q_heads: int) -> float:
    """fp32 max-score output, meaningful tiles only ([Hq, ceil(kv/128), total_q])."""
    return float(q_heads * -(-kv_len // BLOCK) * batch * q_len * 4)


def topk_bytes(heads: int, num_blocks: int, total_q: int, topk: int) -> float:
    """fp32 scores read once, int32 indices written once, int32 num_valid_pages read once."""
    return float(heads * num_blocks * total_q * 4 + total_q * heads * topk * 4 + total_q * 4)


def sparse_selected_pairs(
    block_ids: torch.Tensor, q_positions: torch.Tensor, kv_len: int, causal: bool
) -> int:
    """Selected elements summed over tokens and KV heads.

    ``block_ids [total_q, Hkv, k]`` int (``-1`` tail) are the token's selected 128-token blocks; ``q_positions
    [total_q]`` the token's key-space position (``i + qo_offset``): with ``causal`` it sees keys ``<= pos``.
    """
    ids = block_ids.to(torch.int64)
    valid = ids >= 0
    start = ids.clamp(min=0) * BLOCK
    end = torch.minimum(start + BLOCK, torch.full_like(start, kv_len))
    if causal:
        end = torch.minimum(end, q_positions.to(torch.int64).view(-1, 1, 1) + 1)
    count = (end - start).clamp(min=0) * valid
    return int(count.sum().item())


def sparse_kv_bytes(block_ids: torch.Tensor, batch: int, kv_len: int, kv_heads: int, d_qk: int, d_v: int,
                    in_bytes: int) -> float:
    """K+V bytes of the union of selected blocks per (request, KV head).

    ``block_ids [batch, q_len, Hkv, k]`` (request-major view of the per-token selection).
    """
    nblk = -(-kv_len // BLOCK)
    ids = block_ids.to(torch.int64)
    used = torch.zeros(batch, kv_heads, nblk + 1, dtype=torch.bool, device=ids.device)
    flat = torch.where(ids >= 0, ids, torch.full_like(ids, nblk))  # -1 -> sentinel column
    flat = flat.permute(0, 2, 1, 3).reshape(batch, kv_heads, -1)
    used.scatter_(2, flat, True)
    used = used[:, :, :nblk]
    # the last block of a request may be partial
    tokens_per_block = torch.full((nblk,), BLOCK, dtype=torch.int64, device=ids.device)
    tokens_per_block[-1] = kv_len - (nblk - 1) * BLOCK
    tokens = int((used.to(torch.int64) * tokens_per_block).sum().item())
    return float(tokens * (d_qk + d_v) * in_bytes)
