"""Q-outer sparse prefill tables and oracle (msa.cute.qouter) + msa-core's SM90 Q-outer kernel (GPU part).

CPU part: ``qouter_items`` enumerates items request-major, tile, KV head; ``build_qouter_unions`` equals a plain
Python loop (sets, bit by bit) on random and correlated selections over ragged requests, short / empty lists,
T in {8, 16, 32, 64, 128}, with and without ``route_max`` / a small ``umax`` (unrouted items); ``qouter_reference``
over the unions of every item equals msa.cute's KV-outer reference (``sparse_atten_func`` on CPU) on the same
selections (both fp32, rounded once to bf16: within 2^-8 x max|V|; LSE 1e-4), and writes only routed rows.

GPU part (marker ``gpu``; needs ``msa.core.kernels.fmha_sm90_qouter``): the kernel against ``qouter_reference``
(fp32) with NaN-poisoned O / LSE: every routed row written, unrouted rows untouched (still NaN), O rel-L2 < 1.5e-2
(bf16; fp16 4e-3), LSE -inf exactly where a row sees no key and O 0 there, LSE within 2e-3 x max(1, |lse|);
the union build on the GPU equals the CPU build bit for bit, with no host synchronisation.
"""

from __future__ import annotations

import importlib

import pytest
import torch
from msa.core.kernels.qouter_union import ORDER_TILE_MIN_ITEMS, item_order
from msa.cute.qouter import (
    MASK_BITS,
    build_qouter_unions,
    default_umax,
    qouter_items,
    qouter_reference,
    qouter_tokens_per_item,
)

BLOCK = 128


# ---- selections --------------------------------------------------------------------------------------------------
def _finish(ids: list[int], topk: int) -> list[int]:
    ids = sorted(set(ids))[:topk]
    return ids + [-1] * (topk - len(ids))


def _visible(i, ql, kl, causal):
    nblk = -(-kl // BLOCK)
    if not causal:
        return nblk
    lim = i + kl - ql
    return 0 if lim < 0 else min(nblk, lim // BLOCK + 1)


def random_sel(gen, q_lens, kv_lens, hkv, topk, causal=True):
    """``[total_q, Hkv, topk]``: each token its own random visible blocks; ~1/3 short lists, some all -1."""
    rows = []
    for ql, kl in zip(q_lens, kv_lens):
        for i in range(ql):
            per_h = []
            for _ in range(hkv):
                vis = _visible(i, ql, kl, causal)
                n = min(topk, vis)
                r = int(torch.randint(0, 6, (1,), generator=gen))
                n = 0 if r == 0 else (max(0, n - 1 - int(torch.randint(0, max(n, 1), (1,), generator=gen)))
                                      if r <= 2 else n)
                per_h.append(_finish(torch.randperm(vis, generator=gen)[:n].tolist() if vis else [], topk))
            rows.append(per_h)
    return torch.tensor(rows, dtype=torch.int32).view(sum(q_lens), hkv, topk)


def correlated_sel(gen, q_lens, kv_lens, hkv, topk, causal=True, corr_len=48):
    """Top ``topk - 1`` of smooth value-noise scores in the token position + the local (last visible) block, like the
    benchmark's ``correlated`` selection; every 7th token drops its last pick (short lists)."""
    rows = []
    for ql, kl in zip(q_lens, kv_lens):
        nblk = -(-kl // BLOCK)
        anchors = torch.rand(hkv, ql // corr_len + 2, max(nblk, 1), generator=gen)
        for i in range(ql):
            vis = _visible(i, ql, kl, causal)
            a, frac = i // corr_len, (i % corr_len) / corr_len
            score = anchors[:, a] * (1 - frac) + anchors[:, a + 1] * frac
            per_h = []
            for h in range(hkv):
                if vis == 0:
                    per_h.append([-1] * topk)
                    continue
                s = score[h, :vis].clone()
                s[vis - 1] = 2.0  # the local block always wins
                ids = torch.topk(s, min(topk, vis)).indices.tolist()
                if i % 7 == 3 and len(ids) > 1:
                    ids = sorted(ids)[:-1]
                per_h.append(_finish(ids, topk))
            rows.append(per_h)
    return torch.tensor(rows, dtype=torch.int32).view(sum(q_lens), hkv, topk)


SELECTIONS = {"random": random_sel, "correlated": correlated_sel}


# ---- plain-Python oracle of the union tables ---------------------------------------------------------------------
def py_unions(sel, items, umax, route_max):
    """Loop version of the contract (module docstring of msa.cute.qouter)."""
    n, T = items.num_items, items.T
    words = -(-T // MASK_BITS)
    cap = umax if route_max is None else min(umax, route_max)
    t0s, nts, hs = items.item_token0.tolist(), items.item_ntok.tolist(), items.item_kv_head.tolist()
    union = [[0] * umax for _ in range(n)]
    ulen = [0] * n
    mask = [[[0] * words for _ in range(umax)] for _ in range(n)]
    for i in range(n):
        lists = [[b for b in sel[t0s[i] + t, hs[i]].tolist() if b >= 0] for t in range(nts[i])]
        uni = sorted(set(b for lst in lists for b in lst))
        if len(uni) > cap:
            ulen[i] = -1
            continue
        ulen[i] = len(uni)
        for u, blk in enumerate(uni):
            union[i][u] = blk
            for t, lst in enumerate(lists):
                if blk in lst:
                    w = mask[i][u][t // MASK_BITS] | (1 << (t % MASK_BITS))
                    mask[i][u][t // MASK_BITS] = w
    to32 = [[[w - (1 << 32) if w >= 1 << 31 else w for w in row] for row in it] for it in mask]
    order = sorted(range(n), key=lambda i: -ulen[i])  # Python's sort is stable: item_order's "lpt"
    if n >= ORDER_TILE_MIN_ITEMS:  # item_order's "auto" for many items: the enumeration order
        order = list(range(n))
    return (torch.tensor(union, dtype=torch.int32).view(n, umax), torch.tensor(ulen, dtype=torch.int32),
            torch.tensor(to32, dtype=torch.int32).view(n, umax, words), torch.tensor(order, dtype=torch.int32))


def build(sel, items, umax, route_max=None, **kw):
    return build_qouter_unions(sel, items.item_token0, items.item_ntok, items.item_kv_head, T=items.T,
                               num_items=items.num_items, umax=umax, route_max=route_max, **kw)


# ---- item tables -------------------------------------------------------------------------------------------------
def test_items_enumeration_request_major_tile_then_head():
    it = qouter_items([5, 0, 17, 8], hkv=2, qhead_per_kv=16)  # T = 8
    assert (it.T, it.num_tiles, it.num_items) == (8, 1 + 3 + 1, 10)
    assert it.item_token0.tolist() == [0, 0, 5, 5, 13, 13, 21, 21, 22, 22]
    assert it.item_ntok.tolist() == [5, 5, 8, 8, 8, 8, 1, 1, 8, 8]
    assert it.item_kv_head.tolist() == [0, 1] * 5
    assert it.token_tile.tolist() == [0] * 5 + [1] * 8 + [2] * 8 + [3] + [4] * 8
    assert all(t.dtype == torch.int32 for t in (it.item_token0, it.item_ntok, it.item_kv_head, it.token_tile))
    assert it.item_kv_blocks is None and it.max_blocks is None and it.mask_words == 1


def test_items_kv_blocks_and_tokens_per_item():
    it = qouter_items(torch.tensor([130, 1]), hkv=1, qhead_per_kv=1, kv_lens=[300, 1])
    assert it.T == 128 and it.item_ntok.tolist() == [128, 2, 1] and it.item_kv_blocks.tolist() == [3, 3, 1]
    assert it.max_blocks == 3 and it.mask_words == 4
    assert qouter_items([130], 1, 1, tokens_per_item=64).item_ntok.tolist() == [64, 64, 2]
    assert [qouter_tokens_per_item(g) for g in (16, 8, 4, 2, 1)] == [8, 16, 32, 64, 128]


def test_items_bad_arguments():
    with pytest.raises(ValueError, match="qhead_per_kv: expected a divisor of 128"):
        qouter_items([4], 1, 3)
    with pytest.raises(ValueError, match=r"qo_lens\[1\]: expected >= 0"):
        qouter_items([4, -1], 1, 1)
    with pytest.raises(ValueError, match="kv_lens: expected 2 entries"):
        qouter_items([4, 1], 1, 1, kv_lens=[4])
    with pytest.raises(ValueError, match="tokens_per_item"):
        qouter_items([4], 1, 4, tokens_per_item=33)


# ---- union builder vs the Python loop ----------------------------------------------------------------------------
BUILD_CASES = [
    # G, hkv, topk, q_lens, kv_lens
    (16, 2, 4, [1, 37, 19], [700, 1000, 19]),  # T = 8
    (8, 2, 3, [50, 0, 33], [900, 10, 300]),  # T = 16, an empty request
    (4, 1, 5, [70, 3], [1500, 600]),  # T = 32: bit 31 (negative words)
    (2, 2, 2, [130, 1], [1200, 1]),  # T = 64: two words per entry
    (1, 1, 4, [200, 64], [2000, 700]),  # T = 128: four words
]


@pytest.mark.parametrize("selection", ["random", "correlated"])
@pytest.mark.parametrize("g,hkv,topk,q_lens,kv_lens", BUILD_CASES)
def test_builder_matches_python_loop(selection, g, hkv, topk, q_lens, kv_lens):
    gen = torch.Generator().manual_seed(g * 31 + topk)
    sel = SELECTIONS[selection](gen, q_lens, kv_lens, hkv, topk)
    it = qouter_items(q_lens, hkv, g, kv_lens=kv_lens)
    full = default_umax(it.T, topk, it.max_blocks)
    for umax, route_max in ((full, None), (full, topk + 1), (max(1, topk // 2), None), (0, None)):
        got = build(sel, it, umax, route_max)
        want = py_unions(sel, it, umax, route_max)
        for name, a, b in zip(("union", "union_len", "mask", "order"), got, want):
            assert a.dtype == torch.int32, name
            assert torch.equal(a, b), f"{name} differs (umax {umax}, route_max {route_max})"
    assert bool((got.union_len == 0).any() | (got.union_len == -1).any())


def test_builder_all_routed_covers_every_selection_and_bit31():
    q_lens, kv_lens, hkv, topk = [64], [64 * 128], 1, 2
    sel = torch.full((64, hkv, topk), -1, dtype=torch.int32)
    for t in range(63):
        sel[t, 0, 0] = t  # token t alone picks block t ...
        sel[t, 0, 1] = 63  # ... and everyone picks block 63
    sel[63, 0, 0] = 63
    it = qouter_items(q_lens, hkv, 2, kv_lens=kv_lens)  # T = 64: one item
    un = build(sel, it, default_umax(it.T, topk, it.max_blocks))
    assert un.union_len.tolist() == [64]
    assert un.union[0].tolist() == list(range(64)) + [0] * (un.union.shape[1] - 64)
    m = un.mask[0].to(torch.int64) & 0xFFFFFFFF
    for u in range(63):
        expect = 1 << (u % 32)
        assert m[u, u // 32] == expect and m[u, 1 - u // 32] == 0
    assert m[63].tolist() == [0xFFFFFFFF, 0xFFFFFFFF]
    assert un.mask[0, 31, 0] < 0 and un.mask[0, 63, 1] == -1  # bit 31 set = negative int32


def test_builder_duplicate_ids_in_one_list_count_once():
    """Malformed (unvalidated) lists with a repeated id: the bit is set once, never carried into the next token."""
    sel = torch.tensor([[[2, 2, 2]], [[2, 5, 5]], [[-1, -1, -1]]], dtype=torch.int32)
    it = qouter_items([3], 1, 16)
    un = build(sel, it, 4)
    assert un.union_len.tolist() == [2] and un.union[0].tolist() == [2, 5, 0, 0]
    assert un.mask[0, :, 0].tolist() == [0b11, 0b10, 0, 0]


def test_builder_ignores_out_of_range_ids_with_item_kv_blocks():
    sel = torch.tensor([[[0, 5, -1]], [[1, 2, 9]]], dtype=torch.int32)  # ids 5 and 9 are past request 0's 3 blocks
    it = qouter_items([2], 1, 16, kv_lens=[300])
    un = build(sel, it, 6, item_kv_blocks=it.item_kv_blocks)
    assert un.union_len.tolist() == [3] and un.union[0, :3].tolist() == [0, 1, 2]
    assert un.mask[0, :3, 0].tolist() == [1, 2, 2]


def test_builder_arguments_checked():
    sel = torch.zeros(4, 1, 2, dtype=torch.int32)
    it = qouter_items([4], 1, 16)
    with pytest.raises(TypeError, match="kv_block_indexes: expected dtype int32"):
        build(sel.long(), it, 4)
    with pytest.raises(ValueError, match="item_ntok: expected shape"):
        build_qouter_unions(sel, it.item_token0, it.item_ntok[:0], it.item_kv_head, T=8, num_items=1, umax=4)
    with pytest.raises(ValueError, match="umax"):
        build(sel, it, -1)
    bad = torch.tensor([3], dtype=torch.int32)
    with pytest.raises(ValueError, match="item_token0: expected values"):
        build_qouter_unions(sel, bad, it.item_ntok, it.item_kv_head, T=8, num_items=1, umax=4, validate=True)
    with pytest.raises(ValueError, match="item_kv_head: expected values"):
        build_qouter_unions(sel, it.item_token0, it.item_ntok, bad, T=8, num_items=1, umax=4, validate=True)


def test_builder_default_umax_is_t_times_topk():
    sel = torch.tensor([[[0, 3]], [[1, 3]], [[2, 4]]], dtype=torch.int32)
    it = qouter_items([3], 1, 16)
    un = build_qouter_unions(sel, it.item_token0, it.item_ntok, it.item_kv_head, T=it.T, num_items=it.num_items)
    assert un.union.shape == (1, 16) and un.union_len.tolist() == [5] and un.union[0, :6].tolist() == [0, 1, 2, 3, 4, 0]


def test_builder_empty():
    it = qouter_items([0, 0], 2, 4)
    un = build(torch.zeros(0, 2, 3, dtype=torch.int32), it, 5)
    assert un.union.shape == (0, 5) and un.mask.shape == (0, 5, 1) and un.order.shape == (0,)


# ---- the attention oracle ----------------------------------------------------------------------------------------
def _attn_problem(seed, q_lens, kv_lens, hq, hkv, d, topk, causal, selection, dtype=torch.bfloat16):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(sum(q_lens), hq, d, generator=gen).to(dtype)
    k = torch.randn(sum(kv_lens), hkv, d, generator=gen).to(dtype)
    v = torch.randn(sum(kv_lens), hkv, d, generator=gen).to(dtype)
    sel = SELECTIONS[selection](gen, q_lens, kv_lens, hkv, topk, causal)
    return q, k, v, sel


def _cu(lens):
    out = [0]
    for n in lens:
        out.append(out[-1] + n)
    return torch.tensor(out, dtype=torch.int32)


def _kv_outer_reference(q, k, v, sel, q_lens, kv_lens, topk, causal, scale):
    from msa.cute import build_k2q_csr, sparse_atten_func

    cq, ck = _cu(q_lens), _cu(kv_lens)
    q2k = sel.transpose(0, 1).contiguous()
    rp, qi = build_k2q_csr(q2k, cq, ck, BLOCK, total_k=sum(kv_lens))
    return sparse_atten_func(q, k, v, rp, qi, topk, cu_seqlens_q=cq, cu_seqlens_k=ck, max_seqlen_q=max(q_lens),
                             max_seqlen_k=max(kv_lens), causal=causal, softmax_scale=scale, return_softmax_lse=True,
                             backend="reference")


def _qouter(q, k, v, sel, q_lens, kv_lens, g, causal, scale, umax=None, route_max=None, out=None, lse=None):
    hkv, topk = k.shape[1], sel.shape[2]
    it = qouter_items(q_lens, hkv, g, kv_lens=kv_lens)
    umax = default_umax(it.T, topk, it.max_blocks) if umax is None else umax
    un = build(sel, it, umax, route_max)
    o, lse = qouter_reference(q, k, v, un.union, un.union_len, un.mask, item_token0=it.item_token0,
                              item_ntok=it.item_ntok, item_kv_head=it.item_kv_head, cu_seqlens_q=_cu(q_lens),
                              cu_seqlens_k=_cu(kv_lens), causal=causal, T=it.T, sm_scale=scale, out=out, lse=lse)
    return o, lse, it, un


ATTN_CASES = [
    # q_lens, kv_lens, hq, hkv, topk, causal
    ([1, 45, 130], [1, 300, 400], 8, 2, 3, True),  # G 4 (T 32), a 1-token request, ragged
    ([70, 20], [260, 500], 4, 4, 2, False),  # G 1 (T 128), non-causal
    ([33], [600], 16, 1, 4, True),  # G 16 (T 8)
]


@pytest.mark.parametrize("selection", ["random", "correlated"])
@pytest.mark.parametrize("q_lens,kv_lens,hq,hkv,topk,causal", ATTN_CASES)
def test_reference_equals_kv_outer_reference(selection, q_lens, kv_lens, hq, hkv, topk, causal):
    d, scale = 32, 0.3
    q, k, v, sel = _attn_problem(len(q_lens) * 7 + topk, q_lens, kv_lens, hq, hkv, d, topk, causal, selection)
    o_ref, lse_ref = _kv_outer_reference(q, k, v, sel, q_lens, kv_lens, topk, causal, scale)
    out = torch.full_like(o_ref, float("nan"))
    lse = torch.full_like(lse_ref, float("nan"))
    o, lse2, _, un = _qouter(q, k, v, sel, q_lens, kv_lens, hq // hkv, causal, scale, out=out, lse=lse)
    assert o is out and lse2 is lse and bool((un.union_len >= 0).all())
    assert not torch.isnan(o).any() and not torch.isnan(lse).any(), "every row of a routed item is written"
    assert (o.float() - o_ref.float()).abs().max() <= 2**-8 * v.float().abs().max()
    fin = torch.isfinite(lse_ref)
    assert torch.equal(fin, torch.isfinite(lse))
    assert (lse[fin] - lse_ref[fin]).abs().max() < 1e-4
    assert (o[~fin] == 0).all()


def test_reference_writes_only_routed_rows():
    q_lens, kv_lens, hq, hkv, topk = [40, 90], [300, 4000], 8, 2, 4  # request 0: 3 blocks (routed), 1: 32
    q, k, v, sel = _attn_problem(5, q_lens, kv_lens, hq, hkv, 16, topk, True, "random")
    out = torch.full((sum(q_lens), hq, 16), float("nan"), dtype=torch.bfloat16)
    lse = torch.full((sum(q_lens), hq), float("nan"))
    o, lse, it, un = _qouter(q, k, v, sel, q_lens, kv_lens, hq // hkv, True, 0.25, route_max=2 * topk, out=out,
                             lse=lse)
    routed = (un.union_len >= 0).view(it.num_tiles, hkv)[it.token_tile.long()]  # [total_q, Hkv]
    assert bool(routed.any()) and bool((~routed).any()), "the case must mix routed and unrouted items"
    rows = routed.repeat_interleave(hq // hkv, dim=1)
    assert not torch.isnan(o[rows]).any() and torch.isnan(o[~rows]).all()
    assert not torch.isnan(lse[rows]).any() and torch.isnan(lse[~rows]).all()
    o_ref, lse_ref = _kv_outer_reference(q, k, v, sel, q_lens, kv_lens, topk, True, 0.25)
    assert (o[rows].float() - o_ref[rows].float()).abs().max() <= 2**-8 * v.float().abs().max()


def test_reference_against_fp64_loop(helpers):
    """Independent of msa.cute's gather reference: the fp64 loop oracle of tests/cute/conftest.py."""
    q_lens, kv_lens, hq, hkv, topk = [9, 20], [150, 260], 4, 2, 2
    q, k, v, sel = _attn_problem(11, q_lens, kv_lens, hq, hkv, 8, topk, True, "correlated")
    o, lse, _, _ = _qouter(q, k, v, sel, q_lens, kv_lens, hq // hkv, True, 0.5)
    ck = _cu(kv_lens)
    ks = [k[ck[b]:ck[b + 1]] for b in range(2)]
    vs = [v[ck[b]:ck[b + 1]] for b in range(2)]
    allowed = lambda h, t, j: (j // BLOCK) in sel[t, h].tolist()  # noqa: E731
    o_ref, lse_ref, _ = helpers.naive_attention(q, ks, vs, q_lens, kv_lens, allowed, scale=0.5, causal=True)
    assert (o.double() - o_ref).abs().max() <= 2**-8 * v.float().abs().max()
    fin = torch.isfinite(lse_ref)
    assert torch.equal(fin, torch.isfinite(lse)) and (lse.double()[fin] - lse_ref[fin]).abs().max() < 1e-4


# ---- GPU: the SM90 kernel ----------------------------------------------------------------------------------------
KERNEL = "msa.core.kernels.fmha_sm90_qouter"


def _kernel_module():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device on this host")
    try:
        mod = importlib.import_module(KERNEL)
    except ImportError as e:
        pytest.skip(f"{KERNEL} is not importable ({e})")
    fn = getattr(mod, "available", None)
    if fn is not None:
        ok, why = fn(torch.device("cuda"))
        if not ok:
            pytest.skip(f"{KERNEL} unavailable: {why}")
    return mod


def _check_kernel(o, lse, o_ref, lse_ref, rows, bound):
    """Routed rows against the reference (the check_fmha_output rules), unrouted rows still NaN."""
    assert torch.isnan(o[~rows]).all() and torch.isnan(lse[~rows]).all(), "the kernel wrote an unrouted row"
    o, lse, o_ref, lse_ref = o[rows], lse[rows], o_ref[rows].float(), lse_ref[rows]
    assert not torch.isnan(o).any() and not torch.isnan(lse).any(), "unwritten (NaN-poisoned) routed rows"
    if o.numel():
        rel = ((o.float() - o_ref).norm() / o_ref.norm().clamp_min(1e-6)).item()
        assert rel < bound, f"rel L2 error {rel:.3e} >= {bound}"
    dead = torch.isinf(lse_ref)
    assert torch.equal(torch.isinf(lse) & (lse < 0), dead), "LSE must be -inf exactly where a row sees no key"
    assert (o[dead] == 0).all(), "rows that see no key must output 0"
    live = ~dead
    if live.any():
        err = (lse[live] - lse_ref[live]).abs()
        assert (err <= 2e-3 * lse_ref[live].abs().clamp_min(1.0)).all(), f"LSE max err {err.max().item():.3e}"


GPU_CASES = [
    # q_lens, kv_lens, hq, hkv, topk, causal, route_factor (None: all routed)
    ([1, 333, 200], [1, 2000, 4100], 64, 4, 16, True, None),  # G 16
    ([300, 77], [3000, 77], 16, 4, 8, True, 2),  # G 4, mixed routing
    ([129, 1, 500], [900, 640, 1500], 8, 8, 4, False, None),  # G 1
    ([450], [5000], 16, 1, 16, True, 2),  # G 16, one KV head
]


@pytest.mark.gpu
@pytest.mark.parametrize("selection", ["random", "correlated"])
@pytest.mark.parametrize("q_lens,kv_lens,hq,hkv,topk,causal,route_factor", GPU_CASES)
def test_gpu_kernel_matches_reference(selection, q_lens, kv_lens, hq, hkv, topk, causal, route_factor):
    mod = _kernel_module()
    d, scale = 128, 128 ** -0.5
    q, k, v, sel = _attn_problem(sum(q_lens) + topk, q_lens, kv_lens, hq, hkv, d, topk, causal, selection)
    g = hq // hkv
    dev = torch.device("cuda")
    qd, kd, vd, seld = (x.to(dev) for x in (q, k, v, sel))
    kp = mod.plan(q_lens, kv_lens, hq, hkv, causal=causal, device=dev)
    it = qouter_items(q_lens, hkv, g, kv_lens=kv_lens, device=dev)
    assert (kp.T, kp.num_items) == (it.T, it.num_items)
    for name in ("item_token0", "item_ntok", "item_kv_head"):
        assert torch.equal(getattr(kp, name).cpu(), getattr(it, name).cpu()), f"{name}: item enumeration differs"
    route_max = None if route_factor is None else route_factor * topk
    umax = default_umax(it.T, topk, it.max_blocks, route_max)
    un = build(seld, it, umax, route_max)
    out = torch.full((sum(q_lens), hq, d), float("nan"), dtype=q.dtype, device=dev)
    lse = torch.full((sum(q_lens), hq), float("nan"), device=dev)
    mod.run(kp, qd, kd, vd, un.union, un.union_len, un.mask, un.order, out=out, lse=lse, sm_scale=scale)
    torch.cuda.synchronize()
    it_cpu = qouter_items(q_lens, hkv, g, kv_lens=kv_lens)
    un_cpu = build(sel, it_cpu, umax, route_max)
    for name, a, b in zip(("union", "union_len", "mask", "order"), un, un_cpu):
        assert torch.equal(a.cpu(), b), f"GPU {name} differs from the CPU build"
    o_ref, lse_ref = qouter_reference(qd, kd, vd, un.union, un.union_len, un.mask, item_token0=it.item_token0,
                                      item_ntok=it.item_ntok, item_kv_head=it.item_kv_head,
                                      cu_seqlens_q=_cu(q_lens).to(dev), cu_seqlens_k=_cu(kv_lens).to(dev),
                                      causal=causal, T=it.T, sm_scale=scale,
                                      out=torch.full_like(out, float("nan")), lse=torch.full_like(lse, float("nan")))
    routed = (un.union_len >= 0).view(it.num_tiles, hkv)[it.token_tile.long()].repeat_interleave(g, dim=1)
    if route_factor is None:
        assert bool(routed.all())
    _check_kernel(out, lse, o_ref, lse_ref, routed, 1.5e-2)


def _gpu_problem(mod, q_lens, kv_lens, hq, hkv, topk, dtype, seed):
    q, k, v, sel = _attn_problem(seed, q_lens, kv_lens, hq, hkv, 128, topk, True, "correlated", dtype)
    dev = torch.device("cuda")
    qd, kd, vd, seld = (x.to(dev) for x in (q, k, v, sel))
    kp = mod.plan(q_lens, kv_lens, hq, hkv, causal=True, device=dev)
    it = qouter_items(q_lens, hkv, hq // hkv, kv_lens=kv_lens, device=dev)
    return qd, kd, vd, seld, kp, it


@pytest.mark.gpu
def test_gpu_build_and_kernel_without_host_sync_deterministic():
    """Union build + kernel launch with torch's sync debug mode on "error"; two runs bitwise equal."""
    mod = _kernel_module()
    q_lens, kv_lens, hq, hkv, topk = [300, 61], [4000, 900], 64, 4, 16
    qd, kd, vd, seld, kp, it = _gpu_problem(mod, q_lens, kv_lens, hq, hkv, topk, torch.bfloat16, 21)
    umax = default_umax(it.T, topk, it.max_blocks, 2 * topk)
    un = build(seld, it, umax, 2 * topk)
    warm = torch.empty_like(qd)
    mod.run(kp, qd, kd, vd, un.union, un.union_len, un.mask, un.order, out=warm, sm_scale=0.1)  # loads the module
    torch.cuda.synchronize()
    outs = []
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(2):
            un = build(seld, it, umax, 2 * topk)
            out = torch.full_like(qd, float("nan"))
            lse = torch.full(qd.shape[:2], float("nan"), device=qd.device)
            mod.run(kp, qd, kd, vd, un.union, un.union_len, un.mask, un.order, out=out, lse=lse, sm_scale=0.1)
            outs.append((out, lse))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1]), "not bitwise deterministic"
    assert bool((un.union_len >= 0).any()), "the case must route some items"


@pytest.mark.gpu
def test_gpu_kernel_fp16():
    mod = _kernel_module()
    q_lens, kv_lens, hq, hkv, topk = [200, 61], [1800, 900], 32, 8, 8
    fn = getattr(mod, "supports", None)
    if fn is not None:
        ok, why = fn(q_dtype=torch.float16, kv_dtype=torch.float16, head_dim=128, head_dim_v=128, qhead_per_kv=4,
                     causal=True, paged=False)
        if not ok:
            pytest.skip(f"fp16: {why}")
    qd, kd, vd, seld, kp, it = _gpu_problem(mod, q_lens, kv_lens, hq, hkv, topk, torch.float16, 8)
    un = build(seld, it, default_umax(it.T, topk, it.max_blocks))
    out = torch.full_like(qd, float("nan"))
    lse = torch.full(qd.shape[:2], float("nan"), device=qd.device)
    from msa.cache.errors import CacheError

    try:
        mod.run(kp, qd, kd, vd, un.union, un.union_len, un.mask, un.order, out=out, lse=lse, sm_scale=0.1)
    except (CacheError, FileNotFoundError) as e:  # the fp16 variant may be missing from the node's bundle
        pytest.skip(f"fp16 Q-outer module not loadable here: {type(e).__name__}: {e}")
    o_ref, lse_ref = qouter_reference(qd, kd, vd, un.union, un.union_len, un.mask, item_token0=it.item_token0,
                                      item_ntok=it.item_ntok, item_kv_head=it.item_kv_head,
                                      cu_seqlens_q=_cu(q_lens).cuda(), cu_seqlens_k=_cu(kv_lens).cuda(),
                                      causal=True, T=it.T, sm_scale=0.1)
    rows = torch.ones(sum(q_lens), hq, dtype=torch.bool, device=qd.device)
    _check_kernel(out, lse, o_ref, lse_ref, rows, 4e-3)


def test_item_order_policies(monkeypatch):
    """lpt: union_len descending, stable (unrouted -1 last); tile: enumeration order; auto: tile from
    ORDER_TILE_MIN_ITEMS items on; the environment variable picks the default; a bad name is refused."""
    g = torch.Generator().manual_seed(3)
    small = torch.randint(-1, 40, (300,), generator=g, dtype=torch.int32)
    lpt = item_order(small, "lpt")
    assert lpt.dtype == torch.int32 and sorted(lpt.tolist()) == list(range(300))
    vals = small[lpt.long()]
    assert (vals[:-1] >= vals[1:]).all()
    for a, b in zip(lpt[:-1].tolist(), lpt[1:].tolist()):  # stable among equal lengths
        if small[a] == small[b]:
            assert a < b
    assert item_order(small, "tile").tolist() == list(range(300))
    assert torch.equal(item_order(small, "auto"), lpt)
    big = torch.randint(0, 40, (ORDER_TILE_MIN_ITEMS,), generator=g, dtype=torch.int32)
    assert item_order(big).tolist() == list(range(ORDER_TILE_MIN_ITEMS))
    monkeypatch.setenv("MSA_QOUTER_ORDER", "lpt")
    assert torch.equal(item_order(big), item_order(big, "lpt"))
    with pytest.raises(ValueError, match="MSA_QOUTER_ORDER"):
        item_order(big, "random")
