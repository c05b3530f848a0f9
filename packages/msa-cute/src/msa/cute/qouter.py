"""Q-outer sparse prefill tables: per work item, the union of its tokens' selected KV blocks + a per-token bit mask.

A Q-outer work item is ``T = 128 // G`` consecutive query tokens of one request x the ``G = Hq / Hkv`` query heads of
one KV head (128 MMA rows). The kernel runs flash attention over the *union* of the item's tokens' selected blocks;
a row whose token did not select union block ``u`` gets ``-inf`` for that block's keys (plus bottom-right causal /
key length on the partial blocks). No partials, no combine. This pays off when neighbouring tokens select nearly
the same blocks (real MSA selections): the cost is ``U`` blocks per item instead of ``topk`` per token (see
benchmarks/sparse_prefill_notes.md, section 4).

Item enumeration (the contract between :func:`qouter_items`, :func:`build_qouter_unions` and the SM90 kernel):
request-major, then token tile ``j`` of the request (``T`` tokens each; a request's last tile may be shorter;
requests with no query make no item), then KV head ``h``. So item ``i`` = ``tile * Hkv + h`` where ``tile`` counts
the (request, j) tiles in order. Per item: ``item_token0`` (global index of its first token in q), ``item_ntok``
(``1..T``), ``item_kv_head``.

Tables made by :func:`build_qouter_unions` (device-side, no host synchronisation; every size comes from host ints,
so it is CUDA-graph safe for fixed shapes):

- ``union [num_items, umax]`` int32: ascending distinct block ids of the union (first ``U`` entries), rest 0;
- ``union_len [num_items]`` int32: ``U`` when the item is routed to Q-outer (``U <= min(umax, route_max)``),
  else ``-1`` (the kernel skips the item and writes nothing; its ``union`` / ``mask`` rows are all 0);
- ``mask [num_items, umax, W]`` int32, ``W = ceil(T / 32)``: bit ``t % 32`` of word ``t // 32`` of ``[i, u]`` is
  set iff token ``t`` of item ``i`` selected ``union[i, u]`` (bit 31 makes the int32 negative);
- ``order [num_items]`` int32: the sequence the kernel's persistent CTAs take items in
  (``msa.core.kernels.qouter_union.item_order``: enumeration order for many items -- L2 reuse of the blocks
  neighbouring tokens share, one shared read-only tensor per (count, device) -- else ``union_len`` descending,
  stable).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import NamedTuple

import torch
from msa.core.kernels.fmha_sm90_qouter import item_enumeration
from msa.core.kernels.qouter_union import check_item_tables, item_order
from msa.core.validation import check_int, check_tensor

from ._common import cdiv, check_compute_device

__all__ = [
    "QOUTER_ROWS",
    "MASK_BITS",
    "QouterItems",
    "QouterUnions",
    "qouter_tokens_per_item",
    "qouter_items",
    "default_umax",
    "build_qouter_unions",
    "qouter_reference",
]

QOUTER_ROWS = 128  # MMA rows of one item: T tokens x G query heads
MASK_BITS = 32  # bits per mask word
BLOCK = 128
_INT32_MAX = 2**31 - 1
_NEG_INF = float("-inf")


def qouter_tokens_per_item(qhead_per_kv: int) -> int:
    """``T = 128 // G`` tokens per item (``G`` must divide 128 so that ``T * G`` fills the 128 MMA rows)."""
    g = check_int("qhead_per_kv", qhead_per_kv, min=1, max=QOUTER_ROWS)
    if QOUTER_ROWS % g:
        raise ValueError(f"qhead_per_kv: expected a divisor of {QOUTER_ROWS} (Hq/Hkv) for the Q-outer tile, got {g}")
    return QOUTER_ROWS // g


@dataclass(eq=False)
class QouterItems:
    """Item tables (see the module docstring). Device tensors, int32, ``[num_items]``; ``token_tile [total_q]``
    int32 is each token's tile index (its item for KV head ``h`` is ``token_tile * Hkv + h``). ``item_kv_blocks``
    (blocks of the item's request, ``ceil(kv_len / 128)``) is set when ``kv_lens`` was given; ``max_blocks`` is
    then the largest of them (``None`` otherwise)."""

    T: int
    num_items: int
    num_tiles: int
    num_kv_heads: int
    item_token0: torch.Tensor
    item_ntok: torch.Tensor
    item_kv_head: torch.Tensor
    token_tile: torch.Tensor
    item_kv_blocks: torch.Tensor | None = None
    max_blocks: int | None = None

    @property
    def mask_words(self) -> int:
        return cdiv(self.T, MASK_BITS)


def _host_lens(name: str, lens) -> list[int]:
    if isinstance(lens, torch.Tensor):
        lens = lens.detach().cpu().tolist()
    try:
        out = [int(x) for x in lens]
    except TypeError:
        raise TypeError(f"{name}: expected a sequence of ints or a 1-D int tensor, got {type(lens).__name__}") from None
    for b, n in enumerate(out):
        if n < 0:
            raise ValueError(f"{name}[{b}]: expected >= 0, got {n}")
    return out


def qouter_items(qo_lens, hkv: int, qhead_per_kv: int, *, kv_lens=None, device=None,
                 tokens_per_item: int | None = None) -> QouterItems:
    """Host helper (plan time): the item tables for requests of ``qo_lens`` query tokens, ``hkv`` KV heads and
    ``qhead_per_kv`` = Hq/Hkv. ``tokens_per_item`` overrides ``T = 128 // qhead_per_kv`` (must not exceed it).
    ``qo_lens`` / ``kv_lens``: lists or tensors (a CUDA tensor is read back once, here)."""
    lens = _host_lens("qo_lens", qo_lens)
    hkv = check_int("hkv", hkv, min=1)
    t_max = qouter_tokens_per_item(qhead_per_kv)
    T = t_max if tokens_per_item is None else check_int("tokens_per_item", tokens_per_item, min=1, max=t_max)
    kvl = None
    if kv_lens is not None:
        kvl = _host_lens("kv_lens", kv_lens)
        if len(kvl) != len(lens):
            raise ValueError(f"kv_lens: expected {len(lens)} entries (one per request of qo_lens), got {len(kvl)}")
    dev = torch.device(device) if device is not None else torch.device("cpu")
    e = item_enumeration(lens, hkv, T)  # msa-core's enumeration: the kernel's plan uses the same one
    req, cu_q, first_tile = e["tile_request"], e["cu_q"], e["first_tile"]
    num_tiles = int(req.shape[0])
    tok = torch.arange(int(cu_q[-1]))
    tok_req = torch.searchsorted(cu_q[1:], tok, right=True)
    token_tile = first_tile[tok_req] + torch.div(tok - cu_q[tok_req], T, rounding_mode="floor")

    def items_of(per_tile):  # tile-major, KV head minor
        return per_tile[e["item_tile"]].to(torch.int32).to(dev)

    item_kv_blocks = max_blocks = None
    if kvl is not None:
        nblk = torch.tensor([cdiv(n, BLOCK) for n in kvl], dtype=torch.int64)
        item_kv_blocks = items_of(nblk[req])
        max_blocks = max((cdiv(n, BLOCK) for n in kvl), default=0)
    return QouterItems(
        T=T, num_items=num_tiles * hkv, num_tiles=num_tiles, num_kv_heads=hkv,
        item_token0=items_of(e["tile_token0"]), item_ntok=items_of(e["tile_ntok"]),
        item_kv_head=e["item_kv_head"].to(torch.int32).to(dev),
        token_tile=token_tile.to(torch.int32).to(dev), item_kv_blocks=item_kv_blocks, max_blocks=max_blocks,
    )


def default_umax(T: int, topk: int, max_blocks: int | None = None, route_max: int | None = None) -> int:
    """Union capacity: ``min(T * topk, max_blocks, route_max)`` (the terms given). Unrouted items need no room, so
    a ``route_max`` caps it too."""
    cap = T * topk
    for bound in (max_blocks, route_max):
        if bound is not None:
            cap = min(cap, bound)
    return max(cap, 0)


class QouterUnions(NamedTuple):
    union: torch.Tensor
    union_len: torch.Tensor
    mask: torch.Tensor
    order: torch.Tensor


def _qouter_union_kernel():
    from msa.core.kernels import qouter_union  # noqa: PLC0415 - JIT module, loaded on first CUDA call

    return qouter_union


def _use_cuda_builder(kv_block_indexes: torch.Tensor, T: int) -> bool:
    """``MSA_QOUTER_UNION``: ``auto`` (default: the CUDA kernel for CUDA tensors when it is available), ``torch``
    (always the torch ops below, the kernel's oracle) or ``cuda`` (the kernel or an error)."""
    mode = os.environ.get("MSA_QOUTER_UNION", "auto").strip().lower() or "auto"
    if mode not in ("auto", "torch", "cuda"):
        raise ValueError(f"MSA_QOUTER_UNION: expected auto, torch or cuda, got {mode!r}")
    if mode == "torch" or (mode == "auto" and kv_block_indexes.device.type != "cuda"):
        return False
    qu = _qouter_union_kernel()
    ok, why = qu.available(kv_block_indexes.device)
    if ok and T > qu.MAX_T:
        ok, why = False, f"T = {T} > {qu.MAX_T}"
    if not ok and mode == "cuda":
        raise RuntimeError(f"MSA_QOUTER_UNION=cuda: the CUDA union builder is not available ({why})")
    return ok


def build_qouter_unions(
    kv_block_indexes: torch.Tensor,
    item_token0: torch.Tensor,
    item_ntok: torch.Tensor,
    item_kv_head: torch.Tensor,
    *,
    T: int,
    num_items: int,
    umax: int | None = None,
    route_max: int | None = None,
    item_kv_blocks: torch.Tensor | None = None,
    validate: bool | None = None,
) -> QouterUnions:
    """Union tables of the Q-outer items (layout in the module docstring); no host synchronisation.

    Args:
        kv_block_indexes: ``[total_q, Hkv, topk]`` int32 logical block ids per (token, KV head), ascending with a
            ``-1`` tail (``msa.core.sparse_topk_select``'s output). Negative ids are ignored.
        item_token0 / item_ntok / item_kv_head: ``[num_items]`` int32 item tables (:func:`qouter_items`).
        T: tokens per item (mask rows; ``W = ceil(T / 32)`` words per union entry).
        num_items: item count (host int: sizes every output).
        umax: union capacity; an item whose union has more than ``umax`` blocks is not routed. None: ``T * topk``
            (plans pass :func:`default_umax` with the longest request's block count and ``route_max``).
        route_max: route an item iff ``U <= route_max`` (None: every item that fits ``umax``).
        item_kv_blocks: optional ``[num_items]`` int32 block count of each item's request; ids ``>=`` it are
            ignored like ``-1`` (the KV-outer CSR build drops such ids too), so a malformed list can never make
            the kernel read past the request's keys.
        validate: host-side checks of the item tables (default ``MSA_VALIDATE``).

    CUDA tensors go to the CUDA builder (``msa.core.kernels.qouter_union``, bit-for-bit the same tables) unless
    ``MSA_QOUTER_UNION=torch``; the torch ops here are the CPU path and its test oracle.

    Returns :class:`QouterUnions` ``(union, union_len, mask, order)``.
    """
    check_tensor("kv_block_indexes", kv_block_indexes, dtype=torch.int32, ndim=3)
    check_compute_device("kv_block_indexes", kv_block_indexes)
    dev = kv_block_indexes.device
    T = check_int("T", T, min=1)
    num_items = check_int("num_items", num_items, min=0)
    umax = T * kv_block_indexes.shape[2] if umax is None else check_int("umax", umax, min=0)
    if route_max is not None:
        route_max = check_int("route_max", route_max, min=0)
    check_item_tables(kv_block_indexes, item_token0, item_ntok, item_kv_head, item_kv_blocks, num_items=num_items,
                      T=T, validate=validate)
    if _use_cuda_builder(kv_block_indexes, T):
        return QouterUnions(*_qouter_union_kernel().build(
            kv_block_indexes, item_token0, item_ntok, item_kv_head, T=T, num_items=num_items, umax=umax,
            route_max=route_max, item_kv_blocks=item_kv_blocks, validate=False))
    total_q, _, topk = kv_block_indexes.shape
    words = cdiv(T, MASK_BITS)
    cap = umax if route_max is None else min(umax, route_max)
    if num_items == 0 or total_q == 0 or topk == 0:
        union_len = torch.zeros(num_items, dtype=torch.int32, device=dev)  # U = 0 fits any capacity: routed
        return QouterUnions(torch.zeros(num_items, umax, dtype=torch.int32, device=dev), union_len,
                            torch.zeros(num_items, umax, words, dtype=torch.int32, device=dev),
                            torch.arange(num_items, dtype=torch.int32, device=dev))

    # Gather the item's T x topk selections (tokens past item_ntok -> -1).
    t_pos = torch.arange(T, dtype=torch.int64, device=dev)
    live_tok = t_pos.view(1, T) < item_ntok.view(num_items, 1)
    tok = (item_token0.to(torch.int64).view(num_items, 1) + t_pos).clamp_(0, total_q - 1)
    head = item_kv_head.to(torch.int64).view(num_items, 1)
    sel = kv_block_indexes[tok, head]  # [n, T, topk]
    valid = live_tok.unsqueeze(-1) & (sel >= 0)
    if item_kv_blocks is not None:
        valid &= sel < item_kv_blocks.view(num_items, 1, 1)

    # One sort per item row of keys id * T + token (invalid entries sort last): a block's entries are contiguous
    # and token-ordered, so a run's first entry is a union member (its rank = the union position) and a repeated
    # key is a duplicate id in one token's list (malformed input), dropped so that every mask bit is added once.
    valid &= sel < _INT32_MAX // T  # keys stay int32 (2^24 blocks at T = 128: far past any request)
    key = torch.where(valid, sel * T + t_pos.view(1, T, 1).to(torch.int32), _INT32_MAX).view(num_items, T * topk)
    skey = torch.sort(key, dim=1).values
    s_valid = skey != _INT32_MAX
    blk = torch.div(skey, T, rounding_mode="floor")
    t_of = (skey - blk * T).to(torch.int64)  # token of every sorted entry
    first = s_valid.clone()
    first[:, 1:] &= blk[:, 1:] != blk[:, :-1]
    new_pair = s_valid.clone()
    new_pair[:, 1:] &= skey[:, 1:] != skey[:, :-1]
    pos = torch.cumsum(first, dim=1, dtype=torch.int32) - 1  # union position of every valid sorted entry
    u = first.sum(dim=1, dtype=torch.int32)
    routed = u <= cap
    union_len = torch.where(routed, u, -1)

    # Scatter into buffers with one spare column (index umax) that soaks up everything not stored.
    spare = umax
    keep = new_pair & routed.view(num_items, 1) & (pos < umax)
    head_of_run = keep & first
    col = torch.where(head_of_run, pos, spare).to(torch.int64)
    union = torch.zeros(num_items, umax + 1, dtype=torch.int32, device=dev)
    union.scatter_(1, col, torch.where(head_of_run, blk, 0))
    union = union[:, :umax].contiguous()

    # Bits in int64 math, wrapped to int32 (bit 31 -> -2^31) before the adds: a word's partial sums of distinct
    # bits stay in [-2^31, 2^31) whatever the order, so the int32 scatter_add is exact and equals the OR.
    bit = torch.bitwise_left_shift(torch.ones_like(t_of), t_of % MASK_BITS)
    bit = torch.where(keep, torch.where(bit >= 2**31, bit - 2**32, bit), 0).to(torch.int32)
    word_col = torch.where(keep, pos, spare).to(torch.int64) * words + torch.div(t_of, MASK_BITS,
                                                                                 rounding_mode="floor")
    mask = torch.zeros(num_items, (umax + 1) * words, dtype=torch.int32, device=dev)
    mask.scatter_add_(1, word_col, bit)  # one entry per (token, block) after the dedup: sum == OR
    mask = mask.view(num_items, umax + 1, words)[:, :umax].contiguous()

    return QouterUnions(union, union_len, mask, item_order(union_len))


def qouter_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    union: torch.Tensor,
    union_len: torch.Tensor,
    mask: torch.Tensor,
    *,
    item_token0: torch.Tensor,
    item_ntok: torch.Tensor,
    item_kv_head: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    causal: bool,
    T: int | None = None,
    sm_scale: float | None = None,
    seqused_k: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    lse: torch.Tensor | None = None,
    compute_dtype: torch.dtype = torch.float32,
    budget_bytes: int = 64 << 20,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pure-torch Q-outer attention: the kernel's oracle. Writes exactly the rows of routed items.

    Per routed item (``union_len >= 0``), for each live token ``t`` (request ``b``, position ``i``) and query head
    ``h * G + g``: keys = the ``union_len`` union blocks' tokens, visible iff the token's mask bit for that block is
    set, key position ``< kv_len_b`` (``seqused_k[b]`` if given, else from ``cu_seqlens_k``) and, when causal,
    ``<= i + kv_len_b - q_len_b``; ``logit = (q . k) * sm_scale`` (default ``D ** -0.5``), softmax in
    ``compute_dtype``, natural-log LSE. A row with no visible key gets O = 0, LSE = -inf.

    ``T``: tokens per item (default ``32 * mask.shape[-1]``, an upper bound: tokens past ``item_ntok`` are dead).
    ``q [total_q, Hq, D]``, ragged ``k [total_k, Hkv, D]``, ``v [total_k, Hkv, Dv]``. ``out [total_q, Hq, Dv]``
    (default zeros, q's dtype; bf16 for fp8) and ``lse [total_q, Hq]`` fp32 (default -inf) are written in place
    and returned; rows of unrouted items keep what they held.
    """
    total_q, hq, d = q.shape
    hkv, dv = k.shape[1], v.shape[-1]
    g = hq // hkv
    dev = q.device
    num_items, umax = union.shape
    words = mask.shape[-1]
    T = words * MASK_BITS if T is None else check_int("T", T, min=1, max=words * MASK_BITS)
    if out is None:
        out = torch.zeros(total_q, hq, dv, dtype=torch.bfloat16 if q.dtype == torch.float8_e4m3fn else q.dtype,
                          device=dev)
    if lse is None:
        lse = torch.full((total_q, hq), _NEG_INF, dtype=torch.float32, device=dev)
    if num_items == 0 or total_q == 0:
        return out, lse
    scale = float(sm_scale) if sm_scale is not None else d ** -0.5
    cu_q = cu_seqlens_q.to(device=dev, dtype=torch.int64)
    cu_k = cu_seqlens_k.to(device=dev, dtype=torch.int64)
    batch = cu_q.shape[0] - 1
    kv_len = seqused_k.to(device=dev, dtype=torch.int64) if seqused_k is not None else cu_k[1:] - cu_k[:-1]
    q_len = cu_q[1:] - cu_q[:-1]
    total_k = k.shape[0]
    offs = torch.arange(BLOCK, device=dev, dtype=torch.int64)
    per_item = max(1, umax * BLOCK * (d + dv + 4 * T * g) * 4)
    chunk = max(1, budget_bytes // per_item)
    routed_all = (union_len >= 0).nonzero().view(-1)
    for c0 in range(0, routed_all.numel(), chunk):
        items = routed_all[c0:c0 + chunk]
        n = items.numel()
        t0 = item_token0[items].to(torch.int64)
        nt = item_ntok[items].to(torch.int64)
        h = item_kv_head[items].to(torch.int64)
        ulen = union_len[items].to(torch.int64)
        b = torch.searchsorted(cu_q[1:], t0, right=True).clamp(max=batch - 1)
        t_pos = torch.arange(T, device=dev, dtype=torch.int64)
        live = t_pos.view(1, T) < nt.view(n, 1)  # [n, T]
        tok = (t0.view(n, 1) + t_pos).clamp(max=total_q - 1)
        i_pos = tok - cu_q[b].view(n, 1)  # position in the request
        blk = union[items].to(torch.int64)  # [n, U]
        in_union = torch.arange(umax, device=dev).view(1, umax) < ulen.view(n, 1)
        key_pos = blk.view(n, umax, 1) * BLOCK + offs  # [n, U, 128] position in the request
        words_t = mask[items].to(torch.int64) & 0xFFFFFFFF  # [n, U, W] as unsigned 32-bit
        w_of_t = torch.div(t_pos, MASK_BITS, rounding_mode="floor")
        picked = (words_t[:, :, w_of_t] >> (t_pos % MASK_BITS)) & 1  # [n, U, T]
        picked = picked.bool().transpose(1, 2) & in_union.view(n, 1, umax) & live.view(n, T, 1)  # [n, T, U]
        limit = kv_len[b].view(n, 1, 1).expand(n, T, 1)
        if causal:
            limit = torch.minimum(limit, (i_pos + (kv_len[b] - q_len[b]).view(n, 1)).view(n, T, 1) + 1)
        vis = picked.unsqueeze(-1) & (key_pos.view(n, 1, umax, BLOCK) < limit.view(n, T, 1, 1))  # [n,T,U,128]
        vis = vis.reshape(n, T, umax * BLOCK)
        kidx = (cu_k[b].view(n, 1, 1) + key_pos).clamp(0, max(total_k - 1, 0)).view(n, umax * BLOCK)
        kk = k[kidx, h.view(n, 1)].to(compute_dtype)  # [n, U*128, D]
        vv = v[kidx, h.view(n, 1)].to(compute_dtype)
        vv = vv.masked_fill(~vis.any(dim=1).unsqueeze(-1), 0.0)  # keys no row sees may hold anything (NaN)
        heads = h.view(n, 1) * g + torch.arange(g, device=dev)  # [n, G]
        qq = q[tok.view(n, T, 1), heads.view(n, 1, g)].to(compute_dtype) * scale  # [n, T, G, D]
        logits = torch.einsum("ntgd,nkd->ntgk", qq, kk)
        logits = logits.masked_fill(~vis.view(n, T, 1, -1), _NEG_INF)
        m = logits.amax(dim=-1, keepdim=True)
        m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
        p = torch.exp(logits - m)
        denom = p.sum(dim=-1, keepdim=True)
        o = torch.einsum("ntgk,nkd->ntgd", p, vv) / denom.clamp(min=torch.finfo(compute_dtype).tiny)
        row_lse = (m + torch.log(denom)).squeeze(-1)  # -inf where nothing is visible
        sel_t = live.view(-1)
        rows_t = tok.view(-1)[sel_t]
        rows_h = heads.view(n, 1, g).expand(n, T, g).reshape(n * T, g)[sel_t]
        out[rows_t.view(-1, 1), rows_h] = o.reshape(n * T, g, dv)[sel_t].to(out.dtype)
        lse[rows_t.view(-1, 1), rows_h] = row_lse.reshape(n * T, g)[sel_t].to(lse.dtype)
    return out, lse

