"""Pure-PyTorch references for msa-core: dense/paged/per-token-sparse FMHA, max-score, top-k block select.

These are the test oracle and the CPU path. They follow ``docs/API.md`` exactly:

- logits ``= (q . k) * sm_scale * q_scale[h] * k_scale[h // G]`` (natural log base), ``G = Hq // Hkv``;
- bottom-right causal: query ``i`` (0-based in its request) sees keys ``j <= i + qo_offset``, ``qo_offset``
  defaulting to ``kv_len - qo_len``; non-causal sees all ``kv_len`` keys;
- ``kv_block_indexes [total_q, Hkv, k]``: the token attends only to keys in its listed 128-token logical blocks
  (still causal); ``-1`` (and any other negative id) never matches a block;
- ``out = softmax(logits) @ (v * v_scale) * o_scale``; a query that sees no key gets 0 and LSE ``-inf``;
- ``max_score [Hq, max_k_tiles, total_q]``: the max over the keys the token actually attends to in each
  128-token KV tile, ``-inf`` where it attends to none (padding tiles included).

Memory is bounded: :func:`fmha_reference` walks each request in query chunks x key chunks with an online softmax,
so no ``S x S`` matrix is ever materialised (the largest temporary is about ``chunk_elems`` elements).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

from .validation import check_int, check_tensor, dtype_name, host_int_list

__all__ = [
    "BLOCK_SIZE",
    "default_max_k_tiles",
    "fmha_reference",
    "max_score_reference",
    "sparse_topk_select_reference",
    "dense_attention_reference",
]

BLOCK_SIZE = 128  # KV tile of max_score and logical block of kv_block_indexes / top-k
_NEG_INF = float("-inf")
_FP8_DTYPES = tuple(
    getattr(torch, n)
    for n in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz")
    if hasattr(torch, n)
)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def default_max_k_tiles(max_kv_len: int) -> int:
    """Upstream's max-score width: the 128-token tile count rounded up to a multiple of 128."""
    return _cdiv(_cdiv(max_kv_len, BLOCK_SIZE), 128) * 128


def _indptr(lens: Sequence[int]) -> list[int]:
    out = [0]
    for n in lens:
        out.append(out[-1] + n)
    return out


def _resolve_qo_offset(qo_lens, kv_lens, qo_offset) -> list[int]:
    if qo_offset is None:
        return [kl - ql for ql, kl in zip(qo_lens, kv_lens)]
    if isinstance(qo_offset, torch.Tensor) and qo_offset.dim() == 0:
        qo_offset = int(qo_offset.item())
    if isinstance(qo_offset, int) and not isinstance(qo_offset, bool):
        return [qo_offset] * len(qo_lens)
    offs = host_int_list("qo_offset", qo_offset)
    if len(offs) != len(qo_lens):
        raise ValueError(f"qo_offset: expected {len(qo_lens)} entries (one per request), got {len(offs)}")
    return offs


def _scale_vector(name: str, s, heads: int, device, dtype) -> torch.Tensor:
    """Per-head scale as a ``[heads]`` tensor in ``dtype``; ``None`` means 1."""
    if s is None:
        return torch.ones(heads, device=device, dtype=dtype)
    if isinstance(s, torch.Tensor):
        if s.numel() == 1 and s.dim() <= 1:
            return s.reshape(1).to(device=device, dtype=dtype).expand(heads).contiguous()
        if s.dim() != 1 or s.shape[0] != heads:
            raise ValueError(f"{name}: expected a float or a tensor of shape [{heads}], got shape {list(s.shape)}")
        return s.to(device=device, dtype=dtype)
    return torch.full((heads,), float(s), device=device, dtype=dtype)


def _default_out_dtype(q_dtype: torch.dtype) -> torch.dtype:
    return torch.bfloat16 if q_dtype in _FP8_DTYPES else q_dtype


class _KvLayout:
    """Token ranges of one request's K/V, ragged or paged, gathered in the input dtype."""

    def __init__(self, k, page_size, kv_indices, kv_indptr, page_indptr):
        self.paged = page_size is not None
        self.page_size = page_size
        self.kv_indices = kv_indices
        self.kv_indptr = kv_indptr
        self.page_indptr = page_indptr

    def tokens(self, t: torch.Tensor, b: int, j0: int, j1: int) -> torch.Tensor:
        """Keys/values ``j0..j1-1`` of request ``b`` as ``[j1 - j0, H, D]``."""
        if not self.paged:
            base = self.kv_indptr[b]
            return t[base + j0 : base + j1]
        ps = self.page_size
        p0, p1 = j0 // ps, _cdiv(j1, ps)
        base = self.page_indptr[b]
        pages = t[self.kv_indices[base + p0 : base + p1]]  # [np, H, ps, D]
        flat = pages.transpose(1, 2).reshape(-1, t.shape[1], t.shape[3])
        return flat[j0 - p0 * ps : j1 - p0 * ps]


def _check_reference_inputs(q, k, v, qo_lens, kv_lens, page_size, kv_indices, output_o, kv_block_indexes):
    check_tensor("q", q, ndim=3)
    if not q.is_floating_point():
        raise TypeError(f"q: expected a floating-point dtype, got {dtype_name(q.dtype)}")
    total_q, hq, d_qk = q.shape
    if sum(qo_lens) != total_q:
        raise ValueError(f"q: expected shape[0] == sum(qo_lens) = {sum(qo_lens)}, got {total_q}")
    check_tensor("k", k, ndim=4 if page_size is not None else 3, device=q.device)
    hkv = k.shape[1]
    if hkv == 0 or hq % hkv != 0:
        raise ValueError(f"k: expected the KV head count (shape[1]) to divide Hq = {hq}, got {hkv}")
    if k.shape[-1] != d_qk:
        raise ValueError(f"k: expected head dim {d_qk} (q's), got {k.shape[-1]}")
    if page_size is not None:
        if k.shape[2] != page_size:
            raise ValueError(f"k: expected shape[2] == page_size = {page_size}, got {k.shape[2]}")
        n_pages = sum(_cdiv(n, page_size) for n in kv_lens)
        check_tensor("kv_indices", kv_indices, ndim=1, shape=[n_pages], device=q.device)
        if kv_indices.is_floating_point():
            raise TypeError(f"kv_indices: expected an integer dtype, got {dtype_name(kv_indices.dtype)}")
    elif k.shape[0] != sum(kv_lens):
        raise ValueError(f"k: expected shape[0] == sum(kv_lens) = {sum(kv_lens)}, got {k.shape[0]}")
    if output_o:
        check_tensor("v", v, ndim=k.dim(), device=q.device)
        if v.shape[:-1] != k.shape[:-1]:
            raise ValueError(f"v: expected shape {list(k.shape[:-1]) + ['Dv']} (k's leading dims), got {list(v.shape)}")
    if kv_block_indexes is not None:
        check_tensor("kv_block_indexes", kv_block_indexes, ndim=3, shape=[total_q, hkv, None], device=q.device)
    return total_q, hq, hkv, d_qk


def fmha_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor | None = None,
    *,
    qo_lens,
    kv_lens,
    num_kv_heads: int | None = None,
    page_size: int | None = None,
    kv_indices: torch.Tensor | None = None,
    kv_page_indptr=None,
    causal: bool = True,
    qo_offset=None,
    kv_block_indexes: torch.Tensor | None = None,
    sm_scale: float | None = None,
    q_scale=None,
    k_scale=None,
    v_scale=None,
    o_scale=None,
    output_o: bool = True,
    output_maxscore: bool = False,
    max_k_tiles: int | None = None,
    return_lse: bool = False,
    out_dtype: torch.dtype | None = None,
    compute_dtype: torch.dtype = torch.float32,
    out: torch.Tensor | None = None,
    max_score: torch.Tensor | None = None,
    q_chunk: int | None = None,
    kv_chunk: int | None = None,
    chunk_elems: int | None = None,
):
    """Reference FMHA (see module docstring). Returns ``(out | None, max_score | None, lse | None)``.

    ``q [total_q, Hq, Dqk]``; ragged ``k [total_kv, Hkv, Dqk]``, ``v [total_kv, Hkv, Dv]``, or paged
    ``k [pages, Hkv, page_size, Dqk]`` / ``v [pages, Hkv, page_size, Dv]`` with flat ``kv_indices``
    (request ``b``'s pages are ``kv_indices[kv_page_indptr[b]:kv_page_indptr[b+1]]``; ``kv_page_indptr``
    defaults to the prefix sum of ``ceil(kv_len / page_size)`` and must equal it when given).
    Any floating input dtype works (fp8 is upcast). Math runs in ``compute_dtype`` (fp32; fp64 for tests);
    ``max_score`` and ``lse`` are fp32 (``compute_dtype`` when that is float64). ``out``/``max_score`` may be
    pre-allocated; they are fully overwritten. ``q_chunk``/``kv_chunk``/``chunk_elems`` tune the tiling (the
    result does not depend on them beyond rounding); ``kv_chunk`` must be a multiple of 128 and of page_size.
    """
    qo_lens = host_int_list("qo_lens", qo_lens, min=0)
    kv_lens = host_int_list("kv_lens", kv_lens, min=0)
    if len(qo_lens) != len(kv_lens):
        raise ValueError(f"kv_lens: expected {len(qo_lens)} entries (as qo_lens), got {len(kv_lens)}")
    if not output_o and not output_maxscore:
        raise ValueError("output_o: at least one of output_o / output_maxscore must be True")
    if return_lse and not output_o:
        raise ValueError("return_lse: needs output_o=True (the score-only pass computes no softmax)")
    total_q, hq, hkv, d_qk = _check_reference_inputs(
        q, k, v, qo_lens, kv_lens, page_size, kv_indices, output_o, kv_block_indexes
    )
    if num_kv_heads is not None and num_kv_heads != hkv:
        raise ValueError(f"num_kv_heads: expected {hkv} (k.shape[1]), got {num_kv_heads}")
    group = hq // hkv
    device = q.device
    cd = compute_dtype
    stats_dtype = torch.float64 if cd == torch.float64 else torch.float32
    batch = len(qo_lens)
    qo_indptr, kv_indptr = _indptr(qo_lens), _indptr(kv_lens)
    offsets = _resolve_qo_offset(qo_lens, kv_lens, qo_offset)
    max_kv = max(kv_lens, default=0)

    page_indptr = None
    if page_size is not None:
        page_indptr = _indptr([_cdiv(n, page_size) for n in kv_lens])
        if kv_page_indptr is not None:
            given = host_int_list("kv_page_indptr", kv_page_indptr)
            if given != page_indptr:
                raise ValueError(
                    f"kv_page_indptr: expected {page_indptr} (prefix sum of ceil(kv_len/page)), got {given}"
                )
    layout = _KvLayout(k, page_size, kv_indices, kv_indptr, page_indptr)

    sm = 1.0 / math.sqrt(d_qk) if sm_scale is None else float(sm_scale)
    # sm_scale * q_scale folded into q, k_scale into k, v_scale into v, o_scale into the output.
    qk_scale = _scale_vector("q_scale", q_scale, hq, device, cd) * sm
    k_sc = _scale_vector("k_scale", k_scale, hkv, device, cd)
    v_sc = _scale_vector("v_scale", v_scale, hkv, device, cd) if output_o else None
    o_sc = _scale_vector("o_scale", o_scale, hq, device, cd).view(hkv, group, 1, 1) if output_o else None

    d_v = v.shape[-1] if output_o else 0
    if output_o:
        odt = out_dtype or _default_out_dtype(q.dtype)
        if out is None:
            out = torch.empty((total_q, hq, d_v), device=device, dtype=odt)
        else:
            check_tensor("out", out, shape=[total_q, hq, d_v], device=device)
    else:
        out = None
    lse = torch.empty((total_q, hq), device=device, dtype=stats_dtype) if return_lse else None
    if output_maxscore:
        n_tiles_needed = _cdiv(max_kv, BLOCK_SIZE)
        if max_k_tiles is None:
            max_k_tiles = max_score.shape[1] if max_score is not None else default_max_k_tiles(max_kv)
        if max_k_tiles < n_tiles_needed:
            raise ValueError(f"max_k_tiles: expected >= ceil(max_kv_len/128) = {n_tiles_needed}, got {max_k_tiles}")
        if max_score is None:
            max_score = torch.empty((hq, max_k_tiles, total_q), device=device, dtype=stats_dtype)
        else:
            check_tensor("max_score", max_score, shape=[hq, max_k_tiles, total_q], device=device)
        max_score.fill_(_NEG_INF)
    else:
        max_score = None

    align = max(BLOCK_SIZE, page_size or 1)
    if kv_chunk is None:
        kv_chunk = min(max(_cdiv(max_kv, 256) * 256, 256), 16384 if device.type == "cuda" else 4096)
        kv_chunk = _cdiv(kv_chunk, align) * align
    elif kv_chunk <= 0 or kv_chunk % align:
        raise ValueError(f"kv_chunk: expected a positive multiple of {align} (128 and page_size), got {kv_chunk}")
    if chunk_elems is None:
        chunk_elems = (1 << 26) if device.type == "cuda" else (1 << 23)
    if q_chunk is None:
        q_chunk = max(1, min(1024, chunk_elems // max(1, hq * kv_chunk)))

    sparse_blocks = None
    for b in range(batch):
        ql, kl, off = qo_lens[b], kv_lens[b], offsets[b]
        if ql == 0:
            continue
        q_base = qo_indptr[b]
        for qs in range(0, ql, q_chunk):
            qe = min(ql, qs + q_chunk)
            n_q = qe - qs
            rows = slice(q_base + qs, q_base + qe)
            # Keys beyond the last query's causal limit are invisible to the whole chunk: skip them.
            kv_end = min(kl, qe - 1 + off + 1) if causal else kl
            q_c = q[rows].to(cd) * qk_scale.view(1, hq, 1)
            q_c = q_c.view(n_q, hkv, group, d_qk).permute(1, 2, 0, 3).reshape(hkv, group * n_q, d_qk)
            q_pos = torch.arange(qs, qe, device=device) + off  # last visible key per query
            if kv_block_indexes is not None:
                sparse_blocks = kv_block_indexes[rows].to(torch.int64)  # [n_q, Hkv, k]
            if output_o:
                m = torch.full((hkv, group * n_q), _NEG_INF, device=device, dtype=cd)
                denom = torch.zeros((hkv, group * n_q), device=device, dtype=cd)
                acc = torch.zeros((hkv, group * n_q, d_v), device=device, dtype=cd)
            for j0 in range(0, max(kv_end, 0), kv_chunk):
                j1 = min(kv_end, j0 + kv_chunk)
                n_k = j1 - j0
                k_c = layout.tokens(k, b, j0, j1).to(cd) * k_sc.view(1, hkv, 1)
                s = torch.bmm(q_c, k_c.permute(1, 2, 0)).view(hkv, group, n_q, n_k)
                mask = None
                if causal and j1 - 1 > qs + off:  # some key of the chunk is hidden from some query
                    key_pos = torch.arange(j0, j1, device=device)
                    mask = (key_pos.view(1, n_k) <= q_pos.view(n_q, 1)).view(1, 1, n_q, n_k)
                if sparse_blocks is not None:
                    n_b = _cdiv(n_k, BLOCK_SIZE)
                    blk = torch.arange(j0 // BLOCK_SIZE, j0 // BLOCK_SIZE + n_b, device=device)
                    chosen = (sparse_blocks.unsqueeze(-1) == blk).any(dim=2)  # [n_q, Hkv, n_b]
                    chosen = chosen.repeat_interleave(BLOCK_SIZE, dim=-1)[..., :n_k]
                    chosen = chosen.permute(1, 0, 2).unsqueeze(1)  # [Hkv, 1, n_q, n_k]
                    mask = chosen if mask is None else (mask & chosen)
                if mask is not None:
                    s = s.masked_fill(~mask, _NEG_INF)
                if max_score is not None:
                    n_b = _cdiv(n_k, BLOCK_SIZE)
                    padded = F.pad(s.reshape(hq, n_q, n_k), (0, n_b * BLOCK_SIZE - n_k), value=_NEG_INF)
                    tile_max = padded.view(hq, n_q, n_b, BLOCK_SIZE).amax(dim=-1)
                    t0 = j0 // BLOCK_SIZE
                    max_score[:, t0 : t0 + n_b, rows] = tile_max.transpose(1, 2).to(max_score.dtype)
                if output_o:
                    s = s.reshape(hkv, group * n_q, n_k)
                    m_new = torch.maximum(m, s.amax(dim=-1))
                    m_safe = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)
                    p = (s - m_safe.unsqueeze(-1)).exp_()
                    alpha = torch.exp(m - m_safe)
                    denom = denom * alpha + p.sum(dim=-1)
                    v_c = layout.tokens(v, b, j0, j1).to(cd) * v_sc.view(1, hkv, 1)
                    acc = acc * alpha.unsqueeze(-1) + torch.bmm(p, v_c.permute(1, 0, 2))
                    m = m_new
            if output_o:
                seen = denom > 0
                o = acc / torch.where(seen, denom, torch.ones_like(denom)).unsqueeze(-1)
                o = o.view(hkv, group, n_q, d_v) * o_sc
                out[rows] = o.permute(2, 0, 1, 3).reshape(n_q, hq, d_v).to(out.dtype)
                if lse is not None:
                    safe = torch.where(seen, denom, torch.ones_like(denom))
                    lse_c = torch.where(seen, m + torch.log(safe), torch.full_like(m, _NEG_INF))
                    lse[rows] = lse_c.view(hkv, group, n_q).permute(2, 0, 1).reshape(n_q, hq).to(lse.dtype)
    return out, max_score, lse


def max_score_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    qo_lens,
    kv_lens,
    page_size: int | None = None,
    kv_indices: torch.Tensor | None = None,
    kv_page_indptr=None,
    causal: bool = True,
    qo_offset=None,
    kv_block_indexes: torch.Tensor | None = None,
    sm_scale: float | None = None,
    q_scale=None,
    k_scale=None,
    max_k_tiles: int | None = None,
    compute_dtype: torch.dtype = torch.float32,
    max_score: torch.Tensor | None = None,
) -> torch.Tensor:
    """Score-only index pass: ``max_score [Hq, max_k_tiles, total_q]`` (see :func:`fmha_reference`)."""
    _, ms, _ = fmha_reference(
        q,
        k,
        None,
        qo_lens=qo_lens,
        kv_lens=kv_lens,
        page_size=page_size,
        kv_indices=kv_indices,
        kv_page_indptr=kv_page_indptr,
        causal=causal,
        qo_offset=qo_offset,
        kv_block_indexes=kv_block_indexes,
        sm_scale=sm_scale,
        q_scale=q_scale,
        k_scale=k_scale,
        output_o=False,
        output_maxscore=True,
        max_k_tiles=max_k_tiles,
        compute_dtype=compute_dtype,
        max_score=max_score,
    )
    return ms


def sparse_topk_select_reference(
    max_score: torch.Tensor,
    topk: int,
    *,
    num_valid_pages=None,
    force_begin_blocks: int = 0,
    force_end_blocks: int = 0,
    out: torch.Tensor | None = None,
    token_chunk: int | None = None,
) -> torch.Tensor:
    """Top-k block select per (token, head) -> ``[total_q, H, topk]`` int32, ascending, ``-1`` tail.

    ``max_score [H, K, total_q]``. Per row with ``nvp`` valid blocks (``num_valid_pages``: None = K, an int, or
    a ``[total_q]`` tensor; values are clamped to ``[0, K]``): forced blocks ``0..fb-1`` and ``nvp-fe..nvp-1``
    (clipped to ``[0, nvp)``) are always chosen; the remaining slots go to the best-scoring blocks ``b < nvp``
    with score ``> -inf`` (NaN counts as ``-inf``), ties toward the lower index.
    """
    check_tensor("max_score", max_score, ndim=3)
    topk = check_int("topk", topk, min=1)
    fb = check_int("force_begin_blocks", force_begin_blocks, min=0)
    fe = check_int("force_end_blocks", force_end_blocks, min=0)
    n_heads, n_blocks, total_q = max_score.shape
    device = max_score.device
    if out is None:
        out = torch.empty((total_q, n_heads, topk), device=device, dtype=torch.int32)
    else:
        check_tensor("out", out, shape=[total_q, n_heads, topk], device=device)
    if total_q == 0 or n_heads == 0:
        return out
    if num_valid_pages is None:
        num_valid_pages = n_blocks
    if isinstance(num_valid_pages, torch.Tensor):
        check_tensor("num_valid_pages", num_valid_pages, ndim=1, shape=[total_q], device=device)
        nvp_all = num_valid_pages.to(torch.int64).clamp(0, n_blocks)
    else:
        nvp_all = torch.full((total_q,), min(max(int(num_valid_pages), 0), n_blocks), device=device, dtype=torch.int64)

    width = max(n_blocks, topk)  # pad so that a row always has topk slots to take
    blk = torch.arange(width, device=device)
    if token_chunk is None:
        token_chunk = max(1, (1 << 22) // max(1, n_heads * width))
    for t0 in range(0, total_q, token_chunk):
        t1 = min(total_q, t0 + token_chunk)
        scores = max_score[:, :, t0:t1].permute(2, 0, 1).to(torch.float32)  # [T, H, K]
        if width > n_blocks:
            scores = F.pad(scores, (0, width - n_blocks), value=_NEG_INF)
        nvp = nvp_all[t0:t1].view(-1, 1, 1)
        valid = blk < nvp
        scores = torch.where(valid & ~torch.isnan(scores), scores, torch.full_like(scores, _NEG_INF))
        forced = valid & ((blk < fb) | (blk >= nvp - fe))
        forced = forced.expand_as(scores)
        # Order: forced first, then score descending, then index ascending (two stable sorts, least key first).
        by_score = torch.sort(scores, dim=-1, descending=True, stable=True).indices
        forced_in_order = forced.gather(-1, by_score).to(torch.int8)
        by_forced = torch.sort(forced_in_order, dim=-1, descending=True, stable=True).indices
        pick = by_score.gather(-1, by_forced)[..., :topk]
        keep = forced.gather(-1, pick) | (scores.gather(-1, pick) > _NEG_INF)
        ids = torch.where(keep, pick, torch.full_like(pick, width))
        ids = torch.sort(ids, dim=-1).values
        out[t0:t1] = torch.where(ids == width, torch.full_like(ids, -1), ids).to(torch.int32)
    return out


def dense_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    qo_lens,
    kv_lens,
    causal: bool = True,
    qo_offset=None,
    kv_block_indexes: torch.Tensor | None = None,
    sm_scale: float | None = None,
    q_scale=None,
    k_scale=None,
    v_scale=None,
    o_scale=None,
    max_k_tiles: int | None = None,
    compute_dtype: torch.dtype = torch.float64,
):
    """Tiny unchunked oracle for tests: full per-request, per-head logit matrices (ragged K/V only).

    Returns ``(out, max_score, lse)`` in ``compute_dtype``; ``max_score`` has ``max_k_tiles`` tiles
    (default :func:`default_max_k_tiles`). Written independently of :func:`fmha_reference`'s chunking.
    """
    qo_lens = host_int_list("qo_lens", qo_lens, min=0)
    kv_lens = host_int_list("kv_lens", kv_lens, min=0)
    offsets = _resolve_qo_offset(qo_lens, kv_lens, qo_offset)
    cd = compute_dtype
    total_q, hq, d_qk = q.shape
    hkv, d_v = k.shape[1], v.shape[-1]
    group = hq // hkv
    sm = 1.0 / math.sqrt(d_qk) if sm_scale is None else float(sm_scale)
    qs_ = _scale_vector("q_scale", q_scale, hq, q.device, cd)
    ks_ = _scale_vector("k_scale", k_scale, hkv, q.device, cd)
    vs_ = _scale_vector("v_scale", v_scale, hkv, q.device, cd)
    os_ = _scale_vector("o_scale", o_scale, hq, q.device, cd)
    if max_k_tiles is None:
        max_k_tiles = default_max_k_tiles(max(kv_lens, default=0))
    out = torch.zeros((total_q, hq, d_v), dtype=cd, device=q.device)
    lse = torch.full((total_q, hq), _NEG_INF, dtype=cd, device=q.device)
    ms = torch.full((hq, max_k_tiles, total_q), _NEG_INF, dtype=cd, device=q.device)
    qo_indptr, kv_indptr = _indptr(qo_lens), _indptr(kv_lens)
    for b, (ql, kl, off) in enumerate(zip(qo_lens, kv_lens, offsets)):
        if ql == 0:
            continue
        q0, k0 = qo_indptr[b], kv_indptr[b]
        i = torch.arange(ql, device=q.device).view(ql, 1)
        j = torch.arange(kl, device=q.device).view(1, kl)
        visible = (j <= i + off) if causal else torch.ones((ql, kl), dtype=torch.bool, device=q.device)
        for h in range(hq):
            kvh = h // group
            mask = visible
            if kv_block_indexes is not None:
                sel = kv_block_indexes[q0 : q0 + ql, kvh].to(torch.int64)  # [ql, k]
                in_sel = ((j // BLOCK_SIZE).view(1, kl, 1) == sel.view(ql, 1, -1)).any(dim=-1)
                mask = mask & in_sel
            qh = q[q0 : q0 + ql, h].to(cd)
            kh = k[k0 : k0 + kl, kvh].to(cd)
            vh = v[k0 : k0 + kl, kvh].to(cd) * vs_[kvh]
            logits = (qh @ kh.T) * (sm * qs_[h] * ks_[kvh])
            logits = logits.masked_fill(~mask, _NEG_INF)
            row_lse = (
                torch.logsumexp(logits, dim=-1) if kl > 0 else torch.full((ql,), _NEG_INF, dtype=cd, device=q.device)
            )
            seen = torch.isfinite(row_lse)
            probs = torch.exp(logits - torch.where(seen, row_lse, torch.zeros_like(row_lse)).view(ql, 1))
            out[q0 : q0 + ql, h] = (probs @ vh) * os_[h]
            lse[q0 : q0 + ql, h] = row_lse
            for t in range(_cdiv(kl, BLOCK_SIZE)):
                ms[h, t, q0 : q0 + ql] = logits[:, t * BLOCK_SIZE : (t + 1) * BLOCK_SIZE].amax(dim=-1)
    return out, ms, lse
