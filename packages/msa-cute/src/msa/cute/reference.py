"""Pure-PyTorch references for msa.cute: block-gather sparse attention and the CSR -> q2k inverse.

The attention reference is *query-outer*: each query token gathers the KV blocks it selected (ragged K/V by token
offset, paged K/V through ``page_table``), masks bottom-right causal / length, and runs an fp32 softmax. The kernel
computes the same thing KV-outer (per-block partials merged by LSE); keeping the oracle's loop order different from
the kernel's is deliberate. Work is chunked over tokens so the largest temporary stays near ``budget_bytes``.
"""

from __future__ import annotations

import torch

from .csr import packed_row_offsets

__all__ = ["k2q_csr_to_q2k", "gather_block_attention", "ragged_to_blocks", "default_chunk_budget"]

_NEG_INF = float("-inf")


def default_chunk_budget(device: torch.device) -> int:
    """Bytes of temporaries per token chunk: modest on CPU (cache friendly), larger on GPU (fewer launches)."""
    return (1 << 30) if device.type == "cuda" else (96 << 20)


def k2q_csr_to_q2k(
    row_ptr: torch.Tensor,
    q_indices: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    *,
    topk: int,
    total_q: int,
    block_size: int = 128,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of :func:`msa.cute.build_k2q_csr`.

    Returns ``(q2k [Hkv, total_q, topk] int32, overflow [Hkv, total_q] bool)``: ``q2k`` lists each token's blocks
    ascending with a ``-1`` tail; ``overflow`` marks tokens that appear in more than ``topk`` rows (their extra
    blocks are not in ``q2k``). Payload entries whose row or query index is out of range are ignored. Device ops
    only (no host sync).
    """
    hkv, n_rows_p1 = row_ptr.shape
    total_rows = n_rows_p1 - 1
    nnz_cap = q_indices.shape[1]
    dev = row_ptr.device
    q2k = torch.full((hkv * total_q * topk + 1,), -1, dtype=torch.int32, device=dev)
    overflow = torch.zeros(hkv, total_q, dtype=torch.bool, device=dev)
    batch = cu_seqlens_q.shape[0] - 1
    if hkv == 0 or total_q == 0 or nnz_cap == 0 or total_rows == 0 or batch == 0:
        return q2k[:-1].view(hkv, total_q, topk), overflow

    rp = row_ptr.to(torch.int64)
    pos = torch.arange(nnz_cap, device=dev, dtype=torch.int64).expand(hkv, nnz_cap).contiguous()
    live = pos < rp[:, -1:]
    row = (torch.searchsorted(rp.contiguous(), pos, right=True) - 1).clamp(0, total_rows - 1)
    cu_rows = packed_row_offsets(cu_seqlens_k, block_size)
    b = torch.searchsorted(cu_rows[1:], row, right=True)
    live &= b < batch
    b = b.clamp(max=batch - 1)
    block = row - cu_rows[b]
    cu_q = cu_seqlens_q.to(torch.int64)
    q_local = q_indices.to(torch.int64)
    q_len = cu_q[b + 1] - cu_q[b]
    live &= (q_local >= 0) & (q_local < q_len)
    q_glob = torch.where(live, cu_q[b] + q_local, torch.zeros_like(q_local))

    # Sort entries by (token, block) inside each head; a token's selections become a contiguous ascending run.
    n_blk_max = int(total_rows) + 1
    sentinel = total_q * n_blk_max
    key = torch.where(live, q_glob * n_blk_max + block, torch.full_like(q_glob, sentinel))
    key_sorted = torch.sort(key, dim=1).values
    live_s = key_sorted < sentinel
    tok_s = torch.div(key_sorted, n_blk_max, rounding_mode="floor").clamp(max=total_q - 1)
    blk_s = key_sorted - tok_s * n_blk_max
    per_tok = torch.zeros(hkv, total_q, dtype=torch.int64, device=dev)
    per_tok.scatter_add_(1, tok_s, live_s.to(torch.int64))
    first = torch.cumsum(per_tok, dim=1) - per_tok  # start of each token's run in the sorted order
    rank = pos - first.gather(1, tok_s)
    keep = live_s & (rank < topk)
    h_idx = torch.arange(hkv, device=dev, dtype=torch.int64).view(hkv, 1)
    flat = (h_idx * total_q + tok_s) * topk + rank
    flat = torch.where(keep, flat, torch.full_like(flat, hkv * total_q * topk))  # spare slot
    q2k.scatter_(0, flat.reshape(-1), blk_s.reshape(-1).to(torch.int32))
    overflow = per_tok > topk
    return q2k[:-1].view(hkv, total_q, topk), overflow


def ragged_to_blocks(x: torch.Tensor, cu_seqlens: torch.Tensor, total_rows: int, block_size: int) -> torch.Tensor:
    """Ragged ``[total, H, D]`` -> fp32 ``[total_rows, H, block_size, D]``: request b's block j is row
    ``cu_rows[b] + j`` (batch-major, as in the k2q CSR); positions past the request's end are zero."""
    from .csr import packed_row_offsets  # noqa: PLC0415

    total, heads, d = x.shape
    dev = x.device
    out = torch.zeros(total_rows, heads, block_size, d, dtype=torch.float32, device=dev)
    if total_rows == 0 or total == 0:
        return out
    cu_rows = packed_row_offsets(cu_seqlens, block_size)
    batch = cu_seqlens.shape[0] - 1
    row = torch.arange(total_rows, device=dev, dtype=torch.int64)
    b = torch.searchsorted(cu_rows[1:], row, right=True).clamp(max=batch - 1)
    start = cu_seqlens.to(torch.int64)[b] + (row - cu_rows[b]) * block_size  # [rows]
    end = cu_seqlens.to(torch.int64)[b + 1]
    tok = start.view(-1, 1) + torch.arange(block_size, device=dev, dtype=torch.int64)  # [rows, bs]
    live = tok < end.view(-1, 1)
    gathered = x[tok.clamp(0, total - 1).reshape(-1)].float().view(total_rows, block_size, heads, d)
    gathered.masked_fill_(~live.view(total_rows, block_size, 1, 1), 0.0)
    out.copy_(gathered.transpose(1, 2))
    return out


def _softmax_tail(logits: torch.Tensor, mask: torch.Tensor, temp: float | None):
    """In place on ``logits [n, G, K]`` (``mask`` broadcastable): returns ``(P unnormalised, denom, LSE, LSE_t)``."""
    logits.masked_fill_(~mask, _NEG_INF)
    lse_t = torch.logsumexp(logits / temp, dim=-1) if temp is not None else None
    m = logits.amax(dim=-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    p = torch.exp(logits.sub_(m))  # masked keys: exp(-inf) = 0
    denom = p.sum(dim=-1, keepdim=True)
    return p, denom, (m + torch.log(denom)).squeeze(-1), lse_t


def gather_block_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q2k: torch.Tensor,
    *,
    token_batch: torch.Tensor,
    token_pos: torch.Tensor,
    kv_len: torch.Tensor,
    softmax_scale: float,
    block_size: int,
    causal: bool,
    causal_offset: torch.Tensor | None = None,
    block_base: torch.Tensor | None = None,
    page_table: torch.Tensor | None = None,
    lse_temperature_scale: float | None = None,
    budget_bytes: int | None = None,
    union: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """fp32 attention of every query over the KV blocks it selected.

    Args:
        q: ``[T, Hq, D]`` (any float dtype; upcast to fp32).
        k, v: blocks ``[N, Hkv, block_size, D]`` (paged cache or :func:`ragged_to_blocks` output). Request b's
            logical block j is block ``page_table[b, j]`` when ``page_table`` is given, else ``block_base[b] + j``.
        q2k: ``[Hkv, T, W]`` batch-local block ids; negative = empty slot.
        token_batch / token_pos: ``[T]`` request id and 0-based position of every query (int64).
        kv_len: ``[B]`` visible key count per request (keys ``j >= kv_len[b]`` are masked).
        causal / causal_offset: when causal, query ``i`` sees keys ``j <= i + causal_offset[b]``.
        lse_temperature_scale: also return LSE of ``logits / lse_temperature_scale``.
        union: evaluate a group of neighbouring tokens as one GEMM over the union of their blocks (masked per
            token) when that union is small. Needs the union size on the host, so the default is on for CPU
            tensors only; the per-token gather path never synchronises.

    Returns ``(O [T, Hq, Dv] fp32, LSE [T, Hq] fp32, LSE_temp or None)``; a query with no visible key gets O = 0
    and LSE = -inf.
    """
    total_q, hq, d = q.shape
    hkv, _, width = q2k.shape
    dv = v.shape[-1]
    group = hq // hkv
    dev = q.device
    out = torch.zeros(total_q, hq, dv, dtype=torch.float32, device=dev)
    lse = torch.full((total_q, hq), _NEG_INF, dtype=torch.float32, device=dev)
    lse_t = torch.full_like(lse, _NEG_INF) if lse_temperature_scale is not None else None
    n_blocks = k.shape[0]
    if total_q == 0 or width == 0 or hq == 0 or n_blocks == 0:
        return out, lse, lse_t
    union = _union_default(dev) if union is None else union
    budget = budget_bytes or default_chunk_budget(dev)
    keys_per_tok = width * block_size
    per_tok_bytes = keys_per_tok * (4 * (d + dv) * 2 + 4 * 2 * group + 16)
    tok_chunk = max(1, min(total_q, budget // max(per_tok_bytes, 1)))
    max_union = _UNION_FACTOR * width
    union_chunk = max(1, min(_UNION_TOKENS, budget // max(1, group * max_union * block_size * 12)))
    step = union_chunk if union else tok_chunk
    offs = torch.arange(block_size, device=dev, dtype=torch.int64)

    def store(t0, t1, h, o, m, mt):
        sl = slice(h * group, (h + 1) * group)
        out[t0:t1, sl] = o
        lse[t0:t1, sl] = m
        if lse_t is not None:
            lse_t[t0:t1, sl] = mt

    for s0 in range(0, total_q, step):
        s1 = min(total_q, s0 + step)
        for h in range(hkv):
            blk_all = q2k[h, s0:s1].to(torch.int64)  # [n, W]
            page_all = _pages(blk_all, token_batch[s0:s1], page_table, block_base, n_blocks)
            if union:
                lim = _limit(token_batch[s0:s1], token_pos[s0:s1], kv_len, causal, causal_offset).view(-1, 1)
                live = (blk_all >= 0) & (blk_all * block_size < lim)  # slots with at least one visible key
                pairs = torch.unique(torch.stack([torch.arange(s1 - s0, device=dev).view(-1, 1).expand_as(live)[live],
                                                  page_all[live]]), dim=1)
                uniq = torch.unique(pairs[1])
                # One logical block per (token, page) is required to express visibility per union entry.
                if 0 < uniq.numel() <= max_union and pairs.shape[1] == int(live.sum()):
                    r = _union_chunk(q, k, v, s0, s1, h, group, blk_all, page_all, live, uniq, token_batch,
                                     token_pos, kv_len, causal, causal_offset, softmax_scale, block_size, offs,
                                     lse_temperature_scale)
                    store(s0, s1, h, *r)
                    continue
            for t0 in range(s0, s1, tok_chunk):
                t1 = min(s1, t0 + tok_chunk)
                n = t1 - t0
                blk = blk_all[t0 - s0:t1 - s0]
                flat = page_all[t0 - s0:t1 - s0].reshape(-1)
                limit = _limit(token_batch[t0:t1], token_pos[t0:t1], kv_len, causal, causal_offset)
                vis = (blk.unsqueeze(-1) >= 0) & (blk.unsqueeze(-1) * block_size + offs < limit)  # [n, W, bs]
                kk = k[:, h].index_select(0, flat).view(n, keys_per_tok, d).float()  # no-op cast for fp32 blocks
                vv = v[:, h].index_select(0, flat).view(n, keys_per_tok, dv).float()
                # Keys nobody may see (stale page tails, padding) can hold anything, NaN included: 0 * NaN would
                # poison the row, so they are zeroed rather than only given zero probability.
                vv = vv.masked_fill(~vis.view(n, keys_per_tok, 1), 0.0)
                qq = q[t0:t1, h * group:(h + 1) * group].float() * softmax_scale  # [n, G, D]
                logits = torch.bmm(qq, kk.transpose(1, 2))  # [n, G, keys]
                p, denom, m, mt = _softmax_tail(logits, vis.view(n, 1, keys_per_tok), lse_temperature_scale)
                o = torch.bmm(p, vv) / denom.clamp(min=_TINY)
                store(t0, t1, h, o, m, mt)
    return out, lse, lse_t


def _union_default(device: torch.device) -> bool:
    return device.type == "cpu"


_UNION_FACTOR = 4  # take the union path while the union has at most 4x the blocks of one token's selection
_UNION_TOKENS = 128
_TINY = torch.finfo(torch.float32).tiny


def _limit(b, pos, kv_len, causal, causal_offset):
    """``[n, 1, 1]`` exclusive upper bound of the visible key positions of each query."""
    limit = kv_len[b]
    if causal:
        limit = torch.minimum(limit, pos + causal_offset[b] + 1)
    return limit.view(-1, 1, 1)


def _pages(blk, b, page_table, block_base, n_blocks):
    """Physical block id of every (token, slot) selection (clamped into range; empty slots are masked later)."""
    if page_table is not None:
        cols = blk.clamp(0, page_table.shape[1] - 1)
        page = page_table[b.view(-1, 1), cols].to(torch.int64)
    else:
        page = block_base[b].view(-1, 1) + blk
    return page.clamp(0, n_blocks - 1)


def _union_chunk(q, k, v, t0, t1, h, group, blk, page, live, uniq, token_batch, token_pos, kv_len, causal,
                 causal_offset, scale, block_size, offs, temp):
    """Tokens ``[t0, t1)`` x the union of their selected blocks as one GEMM; per-token visibility as a mask."""
    n, width = blk.shape
    nu = uniq.numel()
    d, dv = q.shape[-1], v.shape[-1]
    # Logical block of each union entry as seen by each token (a physical page may back different logical
    # blocks in different requests, so it comes from the token's own slot), then key visibility from it.
    slot_pos = torch.searchsorted(uniq, page).clamp(max=nu - 1)  # [n, W]; exact for live slots
    logical = torch.full((n, nu), -1, dtype=torch.int64, device=q.device)
    rows = torch.arange(n, device=q.device).view(n, 1).expand(n, width)
    logical[rows[live], slot_pos[live]] = blk[live]
    limit = _limit(token_batch[t0:t1], token_pos[t0:t1], kv_len, causal, causal_offset)
    vis = (logical.unsqueeze(-1) >= 0) & (logical.unsqueeze(-1) * block_size + offs < limit)  # [n, U, bs]
    kk = k[:, h].index_select(0, uniq).reshape(nu * block_size, d).float()
    vv = v[:, h].index_select(0, uniq).reshape(nu * block_size, dv).float()
    vv = vv.masked_fill(~vis.any(dim=0).view(nu * block_size, 1), 0.0)  # keys no token sees: may hold NaN
    qq = q[t0:t1, h * group:(h + 1) * group].float().mul_(scale).reshape(n * group, d)
    logits = (qq @ kk.t()).view(n, group, nu * block_size)
    p, denom, m, mt = _softmax_tail(logits, vis.view(n, 1, nu * block_size), temp)
    o = (p.view(n * group, -1) @ vv).view(n, group, dv) / denom.clamp(min=_TINY)
    return o, m, mt
