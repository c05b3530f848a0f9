"""build_k2q_csr == a slow loop oracle; schedule covers every CSR entry exactly once."""

from __future__ import annotations

import pytest
import torch
from msa.cute import build_k2q_csr
from msa.cute.reference import k2q_csr_to_q2k


def loop_oracle(q2k, q_lens, kv_lens, block):
    """Batch-major packed rows; each row lists ascending batch-local q indices."""
    hkv, total_q, topk = q2k.shape
    rows = []
    for b, kl in enumerate(kv_lens):
        for j in range(-(-kl // block)):
            rows.append((b, j))
    q_start = [0]
    for n in q_lens:
        q_start.append(q_start[-1] + n)
    row_ptr = torch.zeros(hkv, len(rows) + 1, dtype=torch.int32)
    q_idx = torch.full((hkv, total_q * topk), -1, dtype=torch.int32)
    for h in range(hkv):
        payload = []
        for r, (b, j) in enumerate(rows):
            qs = [t - q_start[b] for t in range(q_start[b], q_start[b + 1]) if j in q2k[h, t].tolist()]
            payload += qs
            row_ptr[h, r + 1] = row_ptr[h, r] + len(qs)
        q_idx[h, : len(payload)] = torch.tensor(payload, dtype=torch.int32)
    return row_ptr, q_idx


CASES = [
    # q_lens, kv_lens, hkv, topk, block, mode
    ([37], [300], 2, 4, 32, "random"),
    ([5, 0, 19, 40], [70, 16, 129, 200], 3, 3, 16, "random"),
    ([24, 17], [96, 64], 2, 4, 16, "all_same"),
    ([33, 12], [160, 240], 1, 2, 16, "disjoint"),
    ([64, 9], [64, 300], 2, 5, 16, "causal"),  # early tokens see fewer than topk blocks
]


@pytest.mark.parametrize("q_lens,kv_lens,hkv,topk,block,mode", CASES)
def test_csr_matches_loop_oracle(helpers, q_lens, kv_lens, hkv, topk, block, mode):
    gen = torch.Generator().manual_seed(hash((tuple(q_lens), mode)) % 2**31)
    q2k = helpers.random_selection(gen, q_lens, kv_lens, hkv, topk, block, mode=mode)
    if mode == "all_same":
        assert (q2k >= 0).sum() == hkv * sum(q_lens) * topk  # heavy overlap really is full
    rp, qi = build_k2q_csr(q2k, helpers.cu(q_lens), helpers.cu(kv_lens), block, total_k=sum(kv_lens), validate=True)
    rp_o, qi_o = loop_oracle(q2k, q_lens, kv_lens, block)
    assert torch.equal(rp, rp_o)
    assert torch.equal(qi, qi_o)
    # And the inverse recovers the selection exactly.
    back, overflow = k2q_csr_to_q2k(rp, qi, helpers.cu(q_lens), helpers.cu(kv_lens), topk=topk,
                                    total_q=sum(q_lens), block_size=block)
    assert torch.equal(back, q2k)
    assert not overflow.any()


def test_total_rows_upper_bound_leaves_trailing_rows_empty(helpers):
    q_lens, kv_lens, block = [20, 11], [50, 33], 16
    gen = torch.Generator().manual_seed(3)
    q2k = helpers.random_selection(gen, q_lens, kv_lens, 2, 3, block)
    exact = build_k2q_csr(q2k, helpers.cu(q_lens), helpers.cu(kv_lens), block, total_k=83)
    bound = build_k2q_csr(q2k, helpers.cu(q_lens), helpers.cu(kv_lens), block, total_k=83, total_rows=12)
    n = exact[0].shape[1]
    assert bound[0].shape == (2, 13)
    assert torch.equal(bound[0][:, :n], exact[0])
    assert (bound[0][:, n:] == exact[0][:, -1:]).all()
    assert torch.equal(bound[1], exact[1])


def test_out_of_range_selection_dropped_without_validate_raises_with(helpers):
    q2k = torch.tensor([[[0, 1, 5], [1, -1, -1]]], dtype=torch.int32)  # block 5 does not exist (2 blocks)
    cq, ck = helpers.cu([2]), helpers.cu([20])
    rp, qi = build_k2q_csr(q2k, cq, ck, 16, total_k=20)
    assert rp.tolist() == [[0, 1, 3]] and qi[0, :3].tolist() == [0, 0, 1] and (qi[0, 3:] == -1).all()
    with pytest.raises(ValueError, match="q2k_indices.*out of range"):
        build_k2q_csr(q2k, cq, ck, 16, total_k=20, validate=True)


@pytest.mark.parametrize("qhead_per_kv", [1, 4, 16])
def test_schedule_covers_csr(helpers, qhead_per_kv):
    q_lens, kv_lens, block, topk = [300, 7, 150], [600, 100, 256], 128, 4
    gen = torch.Generator().manual_seed(qhead_per_kv)
    q2k = helpers.random_selection(gen, q_lens, kv_lens, 2, topk, block, mode="all_same")
    q2k[:, 5:9] = helpers.random_selection(gen, [4], [600], 2, topk, block)
    rp, qi, sched = build_k2q_csr(q2k, helpers.cu(q_lens), helpers.cu(kv_lens), block, total_k=956,
                                  qhead_per_kv=qhead_per_kv, return_schedule=True)
    n = int(sched.work_count)
    assert sched.q_tile == max(1, 128 // qhead_per_kv)
    work = sched.work[:n]
    assert (sched.work[n:] == -1).all()
    assert (work[:, 5] >= 1).all() and (work[:, 5] <= sched.q_tile).all()
    cover = torch.zeros_like(qi, dtype=torch.int64)
    rows = [(b, j) for b, kl in enumerate(kv_lens) for j in range(-(-kl // block))]
    lengths = []
    for h, r, b, j, s, c in work.tolist():
        assert rows[r] == (b, j)
        assert rp[h, r] <= s and s + c <= rp[h, r + 1]
        cover[h, s:s + c] += 1
        lengths.append(int(rp[h, r + 1] - rp[h, r]))
    nnz = rp[:, -1]
    for h in range(2):
        assert (cover[h, : nnz[h]] == 1).all() and (cover[h, nnz[h]:] == 0).all()
    assert lengths == sorted(lengths, reverse=True)  # longest rows first


def test_empty_inputs(helpers):
    rp, qi = build_k2q_csr(torch.empty(2, 0, 4, dtype=torch.int32), helpers.cu([]), helpers.cu([]), total_k=0)
    assert rp.shape == (2, 1) and qi.shape == (2, 0)
    rp, qi, s = build_k2q_csr(torch.full((1, 3, 2), -1, dtype=torch.int32), helpers.cu([3, 0]), helpers.cu([0, 10]),
                              16, total_k=10, return_schedule=True)
    assert rp.tolist() == [[0, 0]] and (qi == -1).all() and int(s.work_count) == 0


# ---- the session-3 sort-based build (int64 keys, one sort per head, histogram; schedule by argsort): the oracle
# the cheaper build must reproduce bit for bit, including the -1 / 0 tails and malformed (unvalidated) inputs.
def legacy_plan(q2k, cu_q, cu_k, block, total_rows, q_tile):
    from msa.cute.csr import MAX_SLOT, Q_SLOT_BITS, packed_row_offsets, token_batch_index

    hkv, total_q, topk = q2k.shape
    batch = cu_q.shape[0] - 1
    row_ptr = torch.zeros(hkv, total_rows + 1, dtype=torch.int32)
    cu_rows = packed_row_offsets(cu_k, block)
    nblk = cu_rows[1:] - cu_rows[:-1]
    tok_b = token_batch_index(cu_q, total_q)
    tok_ok = tok_b < batch
    tok_b_safe = tok_b.clamp(max=batch - 1)
    blk = q2k.to(torch.int64)
    row = cu_rows[tok_b_safe].view(1, total_q, 1) + blk
    valid = (blk >= 0) & (blk < nblk[tok_b_safe].view(1, total_q, 1)) & tok_ok.view(1, total_q, 1)
    valid &= row < total_rows
    tok = torch.arange(total_q, dtype=torch.int64).view(1, total_q, 1)
    sentinel = total_rows * total_q
    key = torch.where(valid, row * total_q + tok, torch.full_like(row, sentinel)).reshape(hkv, total_q * topk)
    sorted_key, src = torch.sort(key, dim=1, stable=True)
    row_or_spare = torch.where(valid, row, torch.full_like(row, total_rows)).reshape(hkv, -1)
    counts = torch.zeros(hkv, total_rows + 1, dtype=torch.int64)
    counts.scatter_add_(1, row_or_spare, torch.ones_like(row_or_spare))
    counts = counts[:, :total_rows]
    row_ptr[:, 1:] = torch.cumsum(counts, dim=1).to(torch.int32)
    is_valid = sorted_key < sentinel
    q_glob = torch.remainder(sorted_key, total_q)
    q_local = q_glob - cu_q.to(torch.int64)[tok_b_safe[q_glob]]
    q_indices = torch.where(is_valid, q_local, torch.full_like(q_local, -1)).to(torch.int32)
    rank = (torch.cumsum(valid.to(torch.int32), dim=-1) - 1).clamp(min=0, max=MAX_SLOT).reshape(hkv, -1)
    slot = torch.gather(rank, 1, src).to(torch.int64)
    q_slot = torch.where(is_valid, q_local | (slot << Q_SLOT_BITS), torch.zeros_like(q_local)).to(torch.int32)
    n_slots = valid.sum(-1, dtype=torch.int32).t().contiguous()

    n_items = hkv * total_rows
    nnz_bound = hkv * total_q * topk
    capacity = nnz_bound // q_tile + min(n_items, nnz_bound)
    work = torch.full((capacity, 6), -1, dtype=torch.int32)
    flat_counts = counts.reshape(-1)
    order = torch.argsort(-flat_counts, stable=True)
    chunks = torch.div(flat_counts[order] + (q_tile - 1), q_tile, rounding_mode="floor")
    cum = torch.cumsum(chunks, 0)
    w = torch.arange(capacity, dtype=torch.int64)
    item_pos = torch.searchsorted(cum, w, right=True).clamp(max=n_items - 1)
    live = w < cum[-1]
    item = order[item_pos]
    h = torch.div(item, total_rows, rounding_mode="floor")
    r = item - h * total_rows
    chunk = w - (cum[item_pos] - chunks[item_pos])
    q_start = row_ptr.to(torch.int64)[h, r] + chunk * q_tile
    q_count = torch.clamp(flat_counts[item] - chunk * q_tile, max=q_tile)
    b = torch.searchsorted(cu_rows[1:], r, right=True).clamp(max=cu_rows.shape[0] - 2)
    cols = torch.stack([h, r, b, r - cu_rows[b], q_start, q_count], dim=1)
    work.copy_(torch.where(live.view(-1, 1), cols, torch.full_like(cols, -1)).to(torch.int32))
    return row_ptr, q_indices, q_slot, n_slots, work, cum[-1:].to(torch.int32)


def _plan_case(gen, q_lens, kv_lens, hkv, topk, block, malformed):
    total_q = sum(q_lens)
    q2k = torch.full((hkv, total_q, topk), -1, dtype=torch.int32)
    t = 0
    for ql, kl in zip(q_lens, kv_lens):
        nblk = -(-kl // block)
        for _ in range(ql):
            for h in range(hkv):
                n = int(torch.randint(0, min(topk, nblk) + 1, (1,), generator=gen)) if nblk else 0
                q2k[h, t, :n] = torch.randperm(nblk, generator=gen)[:n].sort().values.to(torch.int32)
            t += 1
    if malformed and total_q:
        # unvalidated inputs the build must still treat exactly like before: out-of-range ids (past the
        # request's blocks), a -1 in the middle, unsorted lists, duplicates.
        m = torch.rand(q2k.shape, generator=gen)
        q2k = torch.where(m < 0.05, torch.randint(-1, 40, q2k.shape, generator=gen, dtype=torch.int32), q2k)
        q2k[:, 0] = q2k[:, 0].flip(-1)
    return q2k


PLAN_CASES = [
    # q_lens, kv_lens, hkv, topk, block, group, total_rows (None = exact, +n = exact + n spare, -n = too few), bad
    ([37], [300], 2, 4, 32, 1, None, False),
    ([5, 0, 19, 40], [70, 16, 129, 200], 3, 3, 16, 4, None, False),
    ([5, 0, 19, 40], [70, 16, 129, 200], 3, 3, 16, 3, 7, False),
    ([64, 9, 1], [64, 300, 0], 4, 16, 16, 16, None, False),
    ([64, 9, 1], [64, 300, 0], 4, 16, 16, 16, -5, True),
    ([130, 20], [2000, 160], 1, 130, 8, 1, None, False),  # topk > 127: clamped slots
    ([50, 31], [900, 512], 2, 8, 64, 2, 3, True),
    ([200], [4096], 4, 16, 128, 16, None, False),
]


@pytest.mark.parametrize("case", range(len(PLAN_CASES)))
def test_plan_equals_legacy_sort_build(helpers, case):
    """CSR, slot tables and schedule equal the old int64-key build bit for bit (tails, ties, malformed input)."""
    from msa.cute.csr import rows_for

    q_lens, kv_lens, hkv, topk, block, group, extra, malformed = PLAN_CASES[case]
    gen = torch.Generator().manual_seed(100 + case)
    q2k = _plan_case(gen, q_lens, kv_lens, hkv, topk, block, malformed)
    cq, ck = helpers.cu(q_lens), helpers.cu(kv_lens)
    total_rows = rows_for(kv_lens, block) + (extra or 0)
    if malformed:  # also tokens past cu_seqlens_q[-1] (q2k has more rows than the batch has tokens)
        cq = cq.clone()
        cq[-1] -= 3
    rp, qi, sched = build_k2q_csr(q2k, cq, ck, block, total_k=sum(kv_lens), total_rows=total_rows,
                                  qhead_per_kv=group, return_schedule=True)
    want = legacy_plan(q2k, cq, ck, block, total_rows, sched.q_tile)
    got = (rp, qi, sched.q_slot, sched.n_slots, sched.work, sched.work_count)
    for name, g, w in zip(("row_ptr", "q_indices", "q_slot", "n_slots", "work", "work_count"), got, want):
        assert g.dtype == w.dtype and g.shape == w.shape, (name, g.dtype, w.dtype, g.shape, w.shape)
        assert torch.equal(g, w), (name, (g != w).nonzero()[:5].tolist())
    assert int(sched.work_count) > 0
    rp2, qi2 = build_k2q_csr(q2k, cq, ck, block, total_k=sum(kv_lens), total_rows=total_rows)
    assert torch.equal(rp2, rp) and torch.equal(qi2, qi)  # the no-schedule path gathers q_local directly


@pytest.mark.gpu
@pytest.mark.parametrize("q_lens,kv_lens,hkv,group", [
    ([16384, 300], [262144, 4096], 4, 16),  # 1.07M selections (cub path), 8.3K schedule items (> bitonic limit)
    ([8192], [1048576], 1, 16),  # chunked-prefill shape: 8192 rows, 8K queries
])
def test_plan_gpu_equals_cpu_at_bench_size(q_lens, kv_lens, hkv, group):
    """The device build (radix sort, searchsorted, gathers) equals the CPU build bit for bit, without a host
    sync, at sizes where torch takes its large-sort paths."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device on this host")
    gen = torch.Generator().manual_seed(7)
    topk, block = 16, 128
    total_q = sum(q_lens)
    nblk = [-(-n // block) for n in kv_lens]
    q2k = torch.full((hkv, total_q, topk), -1, dtype=torch.int32)
    t = 0
    for ql, nb in zip(q_lens, nblk):  # one random block per stride: ascending, distinct, in range
        step = nb // topk
        q2k[:, t:t + ql] = (torch.arange(topk) * step + torch.randint(0, step, (hkv, ql, topk), generator=gen)).int()
        t += ql
    q2k[:, ::5, topk // 2:] = -1  # short lists too
    cq = torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), dtype=torch.int32)
    ck = torch.tensor([0] + torch.tensor(kv_lens).cumsum(0).tolist(), dtype=torch.int32)
    rows = sum(nblk)
    want = build_k2q_csr(q2k, cq, ck, block, total_k=sum(kv_lens), total_rows=rows, qhead_per_kv=group,
                         return_schedule=True)
    d = [x.cuda() for x in (q2k, cq, ck)]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        got = build_k2q_csr(*d, block, total_k=sum(kv_lens), total_rows=rows, qhead_per_kv=group,
                            return_schedule=True)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    pairs = [("row_ptr", got[0], want[0]), ("q_indices", got[1], want[1]), ("q_slot", got[2].q_slot, want[2].q_slot),
             ("n_slots", got[2].n_slots, want[2].n_slots), ("work", got[2].work, want[2].work),
             ("work_count", got[2].work_count, want[2].work_count)]
    for name, g, w in pairs:
        g = g.cpu()
        assert torch.equal(g, w), (name, (g != w).nonzero()[:5].tolist())
