"""MSA sparse prefill, Q-outer, on the SM90 FMHA kernel (module mode ``"sparse_q"``).

KV-outer sparse prefill (msa.cute.sparse_atten_func) never computes a block nobody selected, but it moves every
selected (token, head, block) through fp32 partials and a combine. When neighbouring tokens select nearly the
same blocks -- real MSA selections do -- a Q-outer item is cheaper: T = 128 / G consecutive query tokens of one
request x the G = Hq / Hkv query heads of one KV head fill the 128 MMA rows (packed as row = g * T + t); the item
runs the dense kernel's pipeline over the *union* U of its tokens' selected blocks, and a row whose token did
not select block u takes no weight from it (per-token bit masks). Q is read once, O and LSE written once.
Effective rate = dense rate x topk / |U|.

Split like every msa kernel:

* :func:`plan` (host, once per length set): one item per (T-token tile, KV head), request-major, then tile,
  then KV head -- the enumeration the union builder (``msa.cute.qouter.build_qouter_unions``) follows -- as
  the kernel's int32 work rows, plus the per-item tables the builder needs (``item_token0``, ``item_ntok``,
  ``item_kv_head``).
* ``plan(pair=True)`` (module mode ``"sparse_q2"``): the same items and union tables, run two by two -- items of
  token tiles ``2j`` and ``2j + 1`` of one request and KV head on a 2-CTA cluster (``pair_items``), which walks the
  two unions in lockstep. When they are equal (neighbouring tokens picked the same blocks, as per-128-token tile
  selections do), every K / V tile is read from L2 once and TMA-multicast into both CTAs: half the L2 -> SM traffic,
  which costs ~10% of a 16-bit call under the H200's power limit (benchmarks/RESULTS.md, session 14 run 13).
  Otherwise each CTA loads its own tiles (the shorter union padded with tiles no row selected). Results are
  bit-identical to ``plan(pair=False)``'s.
* :func:`run` (device, no host sync, no allocation when ``out`` / ``lse`` are given): one persistent launch over
  the builder's ``union [items, umax]``, ``union_len [items]`` (-1 = item not routed here: nothing written),
  ``mask [items, umax, ceil(T / 32)]`` and ``order [items]`` (longest union first).

Semantics per routed (token, query head): softmax over the keys of the blocks its token selected (for the head's
KV head), keys ``j >= kv_len`` masked, causal bottom-right (``j <= i + kv_len - qo_len``) when planned causal;
natural-log LSE; a token that selected nothing gets O = 0, LSE = -inf. bf16 / fp16 or fp8 e4m3 (ragged K/V; O in
bf16; ``sm_scale`` is the whole logit scale -- fold q / k scales into it -- and O comes out unscaled -- apply v / o
scales after; the module first writes V transposed into a per-plan workspace, as the dense fp8 module does), head
dim 128, ragged K/V or a paged cache with page = block = 128 (``plan(paged=True)``; ``run`` then takes
``kv_indices``, the flat page table with each request's pages at ``kv_page_indptr``: the union's logical blocks are
mapped to physical pages on the device, the kernel masks with the logical ids). Paged caches must hold finite values in the slots past each
request's kv_len in its last page (P is 0 there, but 0 * NaN = NaN in the PV GEMM), as for the dense paged kernel.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from . import fmha_sm90 as _k90
from ._device import sm_count as _num_sms

__all__ = ["QOuterPlan", "plan", "run", "available", "supports", "item_enumeration", "ITEM_ROWS", "MODE"]

ITEM_ROWS = 128  # MMA rows per item: T tokens x G heads
MODE = "sparse_q"
MODE_PAIR = "sparse_q2"
BLOCK = 128  # keys per KV block (= the kernel's KV tile)


@dataclass(eq=False)
class QOuterPlan:
    """Host plan of one Q-outer launch (device tables allocated once; see the module docstring)."""

    qo_lens: tuple[int, ...]
    kv_lens: tuple[int, ...]
    num_qo_heads: int
    num_kv_heads: int
    causal: bool
    group: int  # G = Hq / Hkv query heads per KV head
    T: int  # tokens per item = 128 / G
    num_items: int
    work: torch.Tensor  # int32 [num_items, 12] (WorkItem rows; n_block_max is replaced by union_len on device)
    item_token0: torch.Tensor  # int32 [num_items]: global index of the item's first token in q
    item_ntok: torch.Tensor  # int32 [num_items]: tokens in the item (1..T)
    item_kv_head: torch.Tensor  # int32 [num_items]
    item_page0: torch.Tensor  # int32 [num_items]: paged -- the request's first slot in kv_indices (ragged: 0)
    item_request: torch.Tensor  # int32 [num_items]: the item's request (row of a page_table)
    paged: bool
    workspace: torch.Tensor  # int32 [1]: the dynamic scheduler's counter (zeroed on the stream per launch)
    num_ctas: int
    lse_dummy: torch.Tensor
    # fp8 (built on first use): the V pre-pass's tile list [ceil(kv / 128) summed, 2] (token start, valid keys), its
    # transposed-V workspaces per (Hkv, D) and the [Hq, 2] scale tables per sm_scale.
    vt_tiles: torch.Tensor | None = None
    fp8_vt: dict | None = None
    fp8_head_scales: dict | None = None
    pair: bool = False  # items two by two on 2-CTA clusters (module mode "sparse_q2")
    pair_items: torch.Tensor | None = None  # int32 [num_pairs, 2]: items (tiles 2j, 2j + 1 of a request / head), -1

    @property
    def mode(self) -> str:
        return MODE_PAIR if self.pair else MODE

    @property
    def mask_words(self) -> int:
        return -(-self.T // 32)

    @property
    def total_q(self) -> int:
        return sum(self.qo_lens)


def available(device: torch.device) -> tuple[bool, str]:
    """Cheap dispatch check: an SM90 CUDA device (no compilation here)."""
    return _k90.available(device)


DTYPES = (torch.bfloat16, torch.float16, torch.float8_e4m3fn)  # q = k = v; fp8: ragged only, O in bf16


def supports(*, dtype=None, q_dtype=None, kv_dtype=None, head_dim=None, head_dim_v=None, group=None,
             qhead_per_kv=None, paged=None, **_ignored) -> tuple[bool, str]:
    """Whether the built sparse_q modules implement this call (``msa.core.dispatch`` feature gate); pair plans serve
    exactly the same calls."""
    dtype = dtype if dtype is not None else q_dtype
    group = group if group is not None else qhead_per_kv
    if dtype is not None and dtype not in DTYPES:
        return False, f"fmha_sm90_qouter: dtype {dtype} not built (bf16 / fp16 / float8_e4m3fn)"
    if dtype == torch.float8_e4m3fn and paged:
        return False, "fmha_sm90_qouter: fp8 with a paged cache is not built (ragged K/V only)"
    if kv_dtype is not None and dtype is not None and kv_dtype != dtype:
        return False, f"fmha_sm90_qouter: K/V dtype {kv_dtype} must equal Q's {dtype}"
    if head_dim is not None and (head_dim not in _k90.HEAD_DIMS_OTHER_MODES or head_dim_v not in (None, head_dim)):
        return False, f"fmha_sm90_qouter: head dims {head_dim}/{head_dim_v} not built (Dqk = Dv in {_k90.HEAD_DIMS_OTHER_MODES})"
    if group is not None and (group < 1 or group > ITEM_ROWS or ITEM_ROWS % group):
        return False, f"fmha_sm90_qouter: Hq/Hkv = {group} must be a power of two <= {ITEM_ROWS}"
    return True, "ok"


def _lens(name: str, v) -> tuple[int, ...]:
    if isinstance(v, torch.Tensor):
        v = v.tolist()
    try:
        out = tuple(int(x) for x in v)
    except TypeError:
        raise TypeError(f"{name}: expected a sequence of ints, got {type(v).__name__}") from None
    if not out:
        raise ValueError(f"{name}: expected at least one request, got an empty sequence")
    if min(out) < 0:
        raise ValueError(f"{name}: expected lengths >= 0, got {min(out)}")
    return out


def item_enumeration(qo_lens, num_kv_heads: int, tokens_per_item: int) -> dict:
    """The Q-outer item order (the one contract between this plan, ``msa.cute.qouter``'s union builder and the
    kernel): request-major, then token tile ``j`` of the request (``T = tokens_per_item`` tokens; a request's last
    tile may be shorter; requests with no query make none), then KV head. Host int64 tensors: per tile ``tile_request``,
    ``tile_j``, ``tile_token0`` (global first token), ``tile_ntok``; per item (``tile * Hkv + h``) ``item_tile``,
    ``item_kv_head``; per request ``cu_q`` ([B + 1]) and ``first_tile``."""
    q_len = torch.tensor([int(x) for x in qo_lens], dtype=torch.int64)
    hkv, t = int(num_kv_heads), int(tokens_per_item)
    n_tiles_b = torch.div(q_len + (t - 1), t, rounding_mode="floor")
    num_tiles = int(n_tiles_b.sum())
    cu_q = torch.zeros(len(q_len) + 1, dtype=torch.int64)
    torch.cumsum(q_len, 0, out=cu_q[1:])
    req = torch.repeat_interleave(torch.arange(len(q_len)), n_tiles_b)
    first_tile = torch.cumsum(n_tiles_b, 0) - n_tiles_b
    j = torch.arange(num_tiles) - first_tile[req]
    return dict(
        tile_request=req, tile_j=j, tile_token0=cu_q[req] + j * t,
        tile_ntok=torch.minimum(q_len[req] - j * t, torch.full_like(j, t)),
        item_tile=torch.arange(num_tiles).repeat_interleave(hkv), item_kv_head=torch.arange(hkv).repeat(num_tiles),
        cu_q=cu_q, first_tile=first_tile,
    )


def plan(qo_lens, kv_lens, num_qo_heads: int, num_kv_heads: int, *, causal: bool = True, paged: bool = False,
         device=None, pair: bool = False) -> QOuterPlan:
    """Work items of a Q-outer launch (``qo_lens[b]`` queries over ``kv_lens[b]`` keys); ``paged``: K/V in a
    page-128 cache whose flat page table holds request b's ``ceil(kv_lens[b] / 128)`` pages contiguously, in request
    order (``msa.core.fmha_plan``'s ``kv_indices`` layout). ``pair``: run neighbouring items on 2-CTA clusters that
    share their K / V tiles when their unions are equal (see the module docstring; same results)."""
    qo, kv = _lens("qo_lens", qo_lens), _lens("kv_lens", kv_lens)
    if len(qo) != len(kv):
        raise ValueError(f"kv_lens: expected {len(qo)} requests (len(qo_lens)), got {len(kv)}")
    hq, hkv = int(num_qo_heads), int(num_kv_heads)
    if hkv < 1 or hq < hkv or hq % hkv:
        raise ValueError(f"num_qo_heads: expected a multiple of num_kv_heads={hkv}, got {hq}")
    g = hq // hkv
    if g > ITEM_ROWS or ITEM_ROWS % g:
        raise ValueError(f"num_qo_heads / num_kv_heads: expected a power of two <= {ITEM_ROWS} (heads packed per "
                         f"128-row tile), got {g}")
    device = torch.device(device) if device is not None else torch.device("cuda")
    pair = bool(pair)
    t = ITEM_ROWS // g
    e = item_enumeration(qo, hkv, t)
    q_t, kv_t = torch.tensor(qo, dtype=torch.int64), torch.tensor(kv, dtype=torch.int64)
    cu_kv = torch.cumsum(kv_t, 0) - kv_t
    pages = torch.div(kv_t + (BLOCK - 1), BLOCK, rounding_mode="floor")
    page0 = torch.cumsum(pages, 0) - pages
    tile = e["item_tile"]
    item_request = e["tile_request"][tile]
    n = int(tile.shape[0])
    work = torch.zeros(n, 12, dtype=torch.int64)
    work[:, 0] = e["cu_q"][item_request]
    work[:, 1] = q_t[item_request]
    work[:, 2] = cu_kv[item_request]
    work[:, 3] = kv_t[item_request]
    work[:, 4] = e["tile_j"][tile]
    work[:, 5] = e["item_kv_head"] * g
    work[:, 6] = (work[:, 3] - work[:, 1]) if causal else 0
    work[:, 9] = -1  # partial_slot: write out / lse
    work[:, 11] = page0[item_request]  # fp8: the request's first 128-key tile in the transposed V copy
    item_page0 = page0[item_request]
    token0 = e["tile_token0"][tile]
    ntok = e["tile_ntok"][tile]
    kv_head = e["item_kv_head"]
    pair_items = None
    if pair:  # tiles 2j, 2j + 1 of each request, per KV head, request-major then j then head (the enumeration order)
        j, req = e["tile_j"], e["tile_request"]
        n_tiles = torch.bincount(req, minlength=len(qo))
        first = (j % 2 == 0).nonzero().flatten()  # tile index of each pair's first tile
        has_second = (j[first] + 1) < n_tiles[req[first]]
        base = (first * hkv).view(-1, 1) + torch.arange(hkv).view(1, -1)  # [pairs_per_head, hkv]
        second = torch.where(has_second.view(-1, 1), base + hkv, torch.full_like(base, -1))
        pair_items = torch.stack([base.reshape(-1), second.reshape(-1)], 1)
    num_pairs = 0 if pair_items is None else int(pair_items.shape[0])
    num_ctas = 2 if pair else 1
    if device.type == "cuda" and n:
        sms = _num_sms(device.index if device.index is not None else torch.cuda.current_device())
        # pairs: 2 CTAs per pair (the launch caps the clusters at those resident at once)
        num_ctas = 2 * max(1, min(sms // 2, num_pairs)) if pair else max(1, min(sms, n))

    def dev32(x):
        return x.to(torch.int32).contiguous().to(device)

    return QOuterPlan(
        qo_lens=qo, kv_lens=kv, num_qo_heads=hq, num_kv_heads=hkv, causal=bool(causal), group=g, T=t, num_items=n,
        work=dev32(work), item_token0=dev32(token0), item_ntok=dev32(ntok), item_kv_head=dev32(kv_head),
        item_page0=dev32(item_page0 if paged else torch.zeros_like(item_page0)), item_request=dev32(item_request),
        paged=bool(paged),
        workspace=torch.zeros(1, dtype=torch.int32, device=device), num_ctas=num_ctas,
        lse_dummy=torch.empty(1, 1, dtype=torch.float32, device=device), pair=pair,
        pair_items=None if pair_items is None else dev32(pair_items),
    )


def _check_i32(name: str, t, shape: tuple[int, ...], device) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dtype != torch.int32 or tuple(t.shape) != shape or t.device != device or not t.is_contiguous():
        raise ValueError(f"{name}: expected a contiguous int32 tensor of shape {list(shape)} on {device}, got "
                         f"{t.dtype} {list(t.shape)} on {t.device}" + ("" if t.is_contiguous() else " (strided)"))


def run(qplan: QOuterPlan, q, k, v, union, union_len, mask, order, *, out=None, lse=None, return_lse: bool = False,
        sm_scale: float | None = None, kv_indices: torch.Tensor | None = None,
        page_table: torch.Tensor | None = None):
    """Q-outer sparse attention of the routed items into ``out`` (rows of unrouted items are left untouched).

    ``q [total_q, Hq, 128]``, ``k`` / ``v`` bf16 or fp16: ragged ``[total_kv, Hkv, 128]`` or, for a paged plan,
    ``[pages, Hkv, 128, 128]`` with ``kv_indices`` (int32, the flat page table: request b's pages from its first slot,
    in block order) or ``page_table`` (int32 ``[B, >= max pages]``, row b = request b's pages in block order). Union
    tensors as described in the module docstring. Returns ``out`` (and ``lse [total_q, Hq]``
    fp32 when ``return_lse`` or ``lse`` is given).
    """
    if q.dtype not in DTYPES:
        raise TypeError(f"q: expected bfloat16, float16 or float8_e4m3fn, got {q.dtype}")
    fp8 = q.dtype == torch.float8_e4m3fn
    if fp8 and qplan.paged:
        raise NotImplementedError("q: fp8 with a paged cache is not built (ragged K/V only); use bf16 / fp16")
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise TypeError(f"{name}: expected {q.dtype} (q's dtype), got {t.dtype}")
        if qplan.paged and (t.dim() != 4 or t.shape[2] != BLOCK):
            raise ValueError(f"{name}: expected a paged cache [pages, Hkv, {BLOCK}, D] (the plan is paged), got shape "
                             f"{list(t.shape)}")
        if not qplan.paged and t.dim() != 3:
            raise ValueError(f"{name}: expected ragged [total_kv, Hkv, D], got shape {list(t.shape)}")
    total_q, hq, d = q.shape
    if d not in _k90.HEAD_DIMS_OTHER_MODES:
        raise ValueError(f"q: head dim {d} not built (expected one of {_k90.HEAD_DIMS_OTHER_MODES})")
    if total_q != qplan.total_q or hq != qplan.num_qo_heads or k.shape[1] != qplan.num_kv_heads:
        raise ValueError(f"q/k: expected total_q={qplan.total_q}, Hq={qplan.num_qo_heads}, Hkv={qplan.num_kv_heads} "
                         f"(the plan), got q {list(q.shape)}, k {list(k.shape)}")
    dev = q.device
    if qplan.paged:
        need = sum(-(-n // BLOCK) for n in qplan.kv_lens)
        if page_table is not None:
            width = max(-(-n // BLOCK) for n in qplan.kv_lens)
            if (not isinstance(page_table, torch.Tensor) or page_table.dtype != torch.int32 or page_table.dim() != 2
                    or page_table.shape[0] != len(qplan.kv_lens) or page_table.shape[1] < width
                    or page_table.device != dev):
                raise ValueError(f"page_table: expected int32 [{len(qplan.kv_lens)}, >= {width}] on {dev}, got "
                                 f"{getattr(page_table, 'dtype', None)} {list(getattr(page_table, 'shape', []))}")
        elif (not isinstance(kv_indices, torch.Tensor) or kv_indices.dtype != torch.int32 or kv_indices.dim() != 1
              or kv_indices.numel() < need or kv_indices.device != dev):
            raise ValueError(f"kv_indices: expected an int32 [>= {need}] page table on {dev} for the paged plan (or "
                             f"page_table), got {None if kv_indices is None else (kv_indices.dtype, list(kv_indices.shape))}")
    elif kv_indices is not None or page_table is not None:
        raise ValueError("kv_indices / page_table: given, but the plan is ragged (plan(paged=False))")
    elif k.shape[0] < sum(qplan.kv_lens):
        raise ValueError(f"k: expected at least {sum(qplan.kv_lens)} tokens (sum of kv_lens), got {k.shape[0]}")
    n = qplan.num_items
    umax = union.shape[1] if union.dim() == 2 else -1
    _check_i32("union", union, (n, umax), dev)
    _check_i32("union_len", union_len, (n,), dev)
    _check_i32("mask", mask, (n, umax, qplan.mask_words), dev)
    _check_i32("order", order, (n,), dev)
    out_dtype = torch.bfloat16 if fp8 else q.dtype
    if out is None:
        out = torch.empty(q.shape, dtype=out_dtype, device=dev)
    elif out.shape != q.shape or out.dtype != out_dtype or out.device != dev:
        raise ValueError(f"out: expected {out_dtype} {list(q.shape)} on {dev}, got {out.dtype} {list(out.shape)} on "
                         f"{out.device}")
    want_lse = return_lse or lse is not None
    if want_lse and lse is None:
        lse = torch.empty(total_q, hq, dtype=torch.float32, device=dev)
    if lse is not None and (lse.shape != (total_q, hq) or lse.dtype != torch.float32):
        raise ValueError(f"lse: expected float32 [{total_q}, {hq}], got {lse.dtype} {list(lse.shape)}")
    scale = float(sm_scale) if sm_scale is not None else d**-0.5
    if fp8 and not (scale > 0.0 and math.isfinite(scale)):
        raise ValueError(f"sm_scale: the fp8 kernel needs a finite logit scale > 0, got {scale}")
    pairs = (qplan.pair_items,) if qplan.pair else ()  # mode "sparse_q2" takes the pair table after order
    union_phys = union
    if qplan.paged and n:  # logical block -> physical page of the item's request (entries past U: any valid page)
        if page_table is not None:
            col = union.clamp(0, page_table.shape[1] - 1).long()
            union_phys = page_table[qplan.item_request.long().view(-1, 1), col].contiguous()
        else:
            slots = (qplan.item_page0.view(-1, 1) + union).clamp_(0, kv_indices.numel() - 1).long()
            union_phys = kv_indices[slots].to(torch.int32).contiguous()
    if n and fp8:
        vt, vt_tiles, head_scales = _fp8_tables(qplan, k.shape[1], d, scale, dev)
        vt_tiles = _vt_tiles_used(qplan, vt_tiles, union, union_len)
        mod = _k90._module(_k90.DTYPES[q.dtype], d, qplan.causal, False, qplan.mode, fp8_p=_k90.fp8_p_variant(want_lse))
        u8 = torch.uint8
        mod.fmha_fwd(q.view(u8), k.view(u8), v.view(u8), out, lse if want_lse else qplan.lse_dummy, qplan.work,
                     qplan.workspace, union, union_phys, union_len, mask, order, *pairs, vt, vt_tiles, head_scales,
                     qplan.num_ctas, scale, bool(want_lse))
    elif n:
        mod = _k90._module(_k90.DTYPES[q.dtype], d, qplan.causal, qplan.paged, qplan.mode)
        mod.fmha_fwd(q, k, v, out, lse if want_lse else qplan.lse_dummy, qplan.work, qplan.workspace, union,
                     union_phys, union_len, mask, order, *pairs, qplan.num_ctas, scale, bool(want_lse))
    return (out, lse) if want_lse else out


# Contexts of at least this many 128-key tiles transpose only the V tiles this call's unions read (below that the
# whole-V pre-pass is cheaper than marking). H200, session 11 run 7: at 1M keys the whole-V pre-pass took 694 us of a
# 1.55 ms fp8 call (an 8192-query chunk reads a few hundred of the 8192 tiles).
VT_SKIP_MIN_TILES = 512


def _vt_tiles_used(qplan: QOuterPlan, vt_tiles: torch.Tensor, union: torch.Tensor, union_len: torch.Tensor):
    """The fp8 V pre-pass's tile list for this call: tiles no routed item's union reads get valid = -1 (the pre-pass
    skips them; their V^T slots are never read). Device ops only (no host sync, CUDA-graph safe); the plan's list
    itself is left as it is."""
    t = vt_tiles.shape[0]
    if t < VT_SKIP_MIN_TILES or union.numel() == 0:
        return vt_tiles
    live = torch.arange(union.shape[1], device=union.device).view(1, -1) < union_len.view(-1, 1)
    tile = (qplan.work[:, 11].view(-1, 1) + union).clamp_(0, t)  # request's first tile + logical block
    idx = torch.where(live, tile, t).view(-1).long()  # dead entries -> the spare slot t
    used = torch.zeros(t + 1, dtype=torch.int32, device=union.device).scatter_(0, idx, 1)[:t]
    out = vt_tiles.clone()
    out[:, 1] = torch.where(used > 0, vt_tiles[:, 1], -1)
    return out


def _fp8_tables(qplan: QOuterPlan, hkv: int, d: int, scale: float, dev: torch.device):
    """The fp8 module's V pre-pass tile list, transposed-V workspace and ``[Hq, 2]`` scale table (logit scale, 1):
    built once per plan (per (Hkv, D) / per scale), so repeated calls allocate nothing."""
    if qplan.vt_tiles is None:
        starts = torch.cumsum(torch.tensor((0, *qplan.kv_lens[:-1]), dtype=torch.int64), 0).tolist()
        tiles, _ = _k90.fp8_vt_tiles(list(qplan.kv_lens), starts, BLOCK)
        qplan.vt_tiles = (tiles if tiles.numel() else torch.zeros(1, 2, dtype=torch.int32)).to(dev)
        qplan.fp8_vt, qplan.fp8_head_scales = {}, {}
    vt = qplan.fp8_vt.get((hkv, d))
    if vt is None:
        vt = qplan.fp8_vt[(hkv, d)] = torch.empty(hkv, d, BLOCK * qplan.vt_tiles.shape[0], dtype=torch.uint8,
                                                  device=dev)
    # the dense fp8 module's per-head table (sm_scale * q * k scales, v * o scales) with unit q / k / v / o scales
    hs = _k90.fp8_head_scales(qplan, qplan.num_qo_heads, qplan.num_kv_heads, scale, None, None, None, None, dev)
    return vt, qplan.vt_tiles, hs


_PRESET_DTYPES = {"bf16": "bfloat16", "bfloat16": "bfloat16", "fp16": "float16", "float16": "float16",
                  "fp8": "float8_e4m3fn", "float8_e4m3fn": "float8_e4m3fn"}


def jit_specs(preset: dict, arch: str) -> list:
    """Warmup generator hook (``msa.core.variants``): the sparse_q / sparse_q2 (pair) modules a preset's dtypes x head
    dims need (16-bit dtypes, causal and not, ragged and paged; fp8 ragged in both softmax builds; sm_90a only --
    SM100 has no variant of this family)."""
    if arch != "sm_90a":
        return []
    dtypes = [_PRESET_DTYPES[d] for d in preset.get("dtypes", ["bf16"]) if d in _PRESET_DTYPES]
    dims = [d for d in preset.get("head_dim", list(_k90.HEAD_DIMS_OTHER_MODES)) if d in _k90.HEAD_DIMS_OTHER_MODES]
    return [_k90.jit_spec(dt, d, c, paged, arch, mode=mode, fp8_p=fp8_p) for mode in (MODE, MODE_PAIR)
            for dt in dict.fromkeys(dtypes) for d in dims for c in (True, False) for paged in (False, True)
            if not (paged and dt == "float8_e4m3fn") for fp8_p in _k90.fp8_p_builds(dt)]
