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
