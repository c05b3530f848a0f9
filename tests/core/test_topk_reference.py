"""sparse_topk_select_reference (vectorised) against a Python brute-force oracle written from docs/API.md."""

from __future__ import annotations

import math

import pytest
import torch
from msa.core.reference import sparse_topk_select_reference

NEG_INF = float("-inf")


def topk_bruteforce(max_score, topk, nvp=None, fb=0, fe=0):
    """Literal reading of the contract, one (token, head) row at a time."""
    n_heads, n_blocks, total_q = max_score.shape
    scores = max_score.double().tolist()
    if nvp is None:
        nvp = n_blocks
    per_token = nvp.tolist() if isinstance(nvp, torch.Tensor) else [nvp] * total_q
    out = torch.full((total_q, n_heads, topk), -1, dtype=torch.int32)
    for t in range(total_q):
        n = per_token[t]
        forced = {b for b in range(fb) if b < n} | {b for b in range(n - fe, n) if b >= 0}
        for h in range(n_heads):
            row = [scores[h][b][t] for b in range(n_blocks)]
            cands = [b for b in range(n) if b not in forced and not math.isnan(row[b]) and row[b] > NEG_INF]
            cands.sort(key=lambda b: (-row[b], b))
            chosen = sorted(forced) + cands[: topk - len(forced)]
            chosen.sort()
            out[t, h, : len(chosen)] = torch.tensor(chosen, dtype=torch.int32)
    return out


def random_scores(n_heads, n_blocks, total_q, *, seed, ties=False, neg_inf_frac=0.0, nan_frac=0.0, pos_inf_frac=0.0):
    g = torch.Generator().manual_seed(seed)
    if ties:  # few distinct values -> many exact ties
        s = torch.randint(-2, 3, (n_heads, n_blocks, total_q), generator=g).float() * 0.5
    else:
        s = torch.randn(n_heads, n_blocks, total_q, generator=g)
    for frac, val in ((neg_inf_frac, NEG_INF), (nan_frac, float("nan")), (pos_inf_frac, float("inf"))):
        if frac:
            s[torch.rand(s.shape, generator=g) < frac] = val
    return s


def check_row_format(out, topk):
    """Ascending valid ids then a -1 tail; no duplicates."""
    valid = out >= 0
    assert ((out == -1) | valid).all()
    # once -1 appears, everything after it is -1
    assert not ((out[..., :-1] == -1) & valid[..., 1:]).any()
    both = valid[..., :-1] & valid[..., 1:]
    assert (out[..., 1:][both] > out[..., :-1][both]).all()


CASES = [
    # n_heads, n_blocks, total_q, topk, fb, fe, kwargs for random_scores
    (2, 40, 9, 16, 0, 0, {}),
    (3, 40, 7, 16, 1, 2, dict(ties=True)),
    (2, 200, 5, 64, 4, 4, dict(ties=True, neg_inf_frac=0.5)),
    (2, 30, 6, 8, 0, 1, dict(nan_frac=0.3, neg_inf_frac=0.2)),
    (1, 5, 4, 16, 2, 3, dict(neg_inf_frac=0.4)),  # K < topk
    (2, 50, 6, 16, 8, 8, dict(pos_inf_frac=0.2, ties=True)),  # +inf ties must not push out forced blocks
    (4, 1, 3, 1, 0, 1, {}),
    (2, 17, 5, 16, 16, 0, dict(nan_frac=1.0)),  # every score NaN: only forced blocks
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", CASES)
def test_reference_matches_bruteforce(case, dtype):
    h, k, t, topk, fb, fe, kw = case
    ms = random_scores(h, k, t, seed=h * 100 + k + t, **kw).to(dtype)
    got = sparse_topk_select_reference(ms, topk, force_begin_blocks=fb, force_end_blocks=fe)
    assert got.dtype == torch.int32 and got.shape == (t, h, topk)
    assert torch.equal(got, topk_bruteforce(ms, topk, None, fb, fe))
    check_row_format(got, topk)


@pytest.mark.parametrize("fb,fe", [(0, 0), (1, 1), (3, 5)])
def test_per_token_num_valid_pages(fb, fe):
    h, k, t = 2, 60, 12
    ms = random_scores(h, k, t, seed=7, ties=True, neg_inf_frac=0.1)
    g = torch.Generator().manual_seed(8)
    nvp = torch.randint(0, k + 1, (t,), generator=g, dtype=torch.int32)
    nvp[0], nvp[1], nvp[2] = 0, k, 1
    got = sparse_topk_select_reference(ms, 16, num_valid_pages=nvp, force_begin_blocks=fb, force_end_blocks=fe)
    assert torch.equal(got, topk_bruteforce(ms, 16, nvp, fb, fe))
    assert (got[0] == -1).all()  # nvp = 0: nothing, not even forced blocks
    limit = nvp.view(-1, 1, 1).expand_as(got)
    assert (got < limit).all()
    check_row_format(got, 16)


@pytest.mark.parametrize("nvp", [0, 1, 13])
def test_int_num_valid_pages(nvp):
    ms = random_scores(3, 20, 5, seed=nvp)
    got = sparse_topk_select_reference(ms, 4, num_valid_pages=nvp, force_begin_blocks=1, force_end_blocks=1)
    assert torch.equal(got, topk_bruteforce(ms, 4, nvp, 1, 1))


def test_token_chunking_does_not_change_result():
    ms = random_scores(3, 70, 33, seed=5, ties=True, neg_inf_frac=0.2, nan_frac=0.05)
    base = sparse_topk_select_reference(ms, 16, force_begin_blocks=1, force_end_blocks=2)
    for chunk in (1, 4, 32):
        got = sparse_topk_select_reference(ms, 16, force_begin_blocks=1, force_end_blocks=2, token_chunk=chunk)
        assert torch.equal(got, base)


def test_picks_the_best_and_breaks_ties_low():
    """Hand-made row: explicit expected answer, independent of both implementations."""
    row = [0.5, 2.0, float("nan"), 2.0, -1.0, NEG_INF, 2.0, 0.5, 3.0]
    ms = torch.tensor(row).view(1, -1, 1)
    assert sparse_topk_select_reference(ms, 3)[0, 0].tolist() == [1, 3, 8]
    assert sparse_topk_select_reference(ms, 5)[0, 0].tolist() == [0, 1, 3, 6, 8]
    # forced: block 0 (begin) and 7..8 (end, nvp=9)
    assert sparse_topk_select_reference(ms, 4, force_begin_blocks=1, force_end_blocks=2)[0, 0].tolist() == [0, 1, 7, 8]
    # only 6 candidates are > -inf and not NaN: the rest of the 8 slots are -1
    assert sparse_topk_select_reference(ms, 8)[0, 0].tolist() == [0, 1, 3, 4, 6, 7, 8, -1]
    # nvp=4: blocks 0..3; NaN at 2 never chosen unless forced
    assert sparse_topk_select_reference(ms, 4, num_valid_pages=4)[0, 0].tolist() == [0, 1, 3, -1]
    assert sparse_topk_select_reference(ms, 4, num_valid_pages=4, force_end_blocks=2)[0, 0].tolist() == [0, 1, 2, 3]


def test_empty_inputs():
    assert sparse_topk_select_reference(torch.randn(2, 10, 0), 4).shape == (0, 2, 4)
    out = sparse_topk_select_reference(torch.randn(2, 0, 3), 4, force_begin_blocks=1)
    assert out.shape == (3, 2, 4) and (out == -1).all()
