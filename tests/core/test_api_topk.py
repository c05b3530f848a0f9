"""Public msa.core.sparse_topk_select: results vs the reference, and a bad-input test per argument class."""

from __future__ import annotations

import pytest
import torch
from msa.core import KernelUnavailableError, sparse_topk_select
from msa.core.reference import sparse_topk_select_reference

META = torch.device("meta")


def scores(h=2, k=40, t=9, *, seed=0, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(h, k, t, generator=g)
    s[torch.rand(s.shape, generator=g) < 0.2] = float("-inf")
    s[:, :, 0] = torch.randint(0, 3, (h, k), generator=g).float()  # exact ties in one token
    return s.to(dtype).to(device)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_reference(dtype):
    ms = scores(dtype=dtype, seed=1)
    nvp = torch.tensor([40, 0, 1, 5, 39, 17, 40, 2, 30], dtype=torch.int32)
    for kw in (dict(), dict(num_valid_pages=25), dict(num_valid_pages=nvp, force_begin_blocks=1, force_end_blocks=2)):
        got = sparse_topk_select(ms, 16, validate=True, **kw)
        assert got.dtype == torch.int32 and got.shape == (9, 2, 16)
        assert torch.equal(got, sparse_topk_select_reference(ms, 16, **kw))


def test_writes_into_out_and_handles_empty():
    ms = scores(seed=2)
    out = torch.full((9, 2, 8), 12345, dtype=torch.int32)
    got = sparse_topk_select(ms, 8, out=out, force_end_blocks=1)
    assert got is out and (out != 12345).all()
    assert torch.equal(out, sparse_topk_select_reference(ms, 8, force_end_blocks=1))
    assert sparse_topk_select(torch.randn(2, 10, 0), 4).shape == (0, 2, 4)
    empty_k = sparse_topk_select(torch.randn(2, 0, 3), 4, num_valid_pages=0)
    assert (empty_k == -1).all()


def test_backend_kernel_on_cpu_raises():
    with pytest.raises(KernelUnavailableError):
        sparse_topk_select(scores(), 16, backend="kernel")


@pytest.mark.parametrize(
    "args,kwargs,exc,match",
    [
        ((scores().double(), 16), {}, TypeError, "^max_score:.*dtype"),
        ((scores().half(), 16), {}, TypeError, "^max_score:.*dtype"),
        ((scores()[0], 16), {}, ValueError, "^max_score:.*dimensions"),
        ((scores().transpose(0, 2).contiguous().transpose(0, 2), 16), {}, ValueError, "^max_score:.*contiguous"),
        (([[1.0]], 16), {}, TypeError, "^max_score"),
        ((scores(), 0), {}, ValueError, "^topk"),
        ((scores(), 65), {}, ValueError, "^topk"),
        ((scores(), 16.0), {}, TypeError, "^topk"),
        ((scores(), 16), dict(force_begin_blocks=-1), ValueError, "^force_begin_blocks"),
        ((scores(), 16), dict(force_end_blocks=1.5), TypeError, "^force_end_blocks"),
        ((scores(), 4), dict(force_begin_blocks=3, force_end_blocks=2), ValueError, "^force_end_blocks.*<= topk"),
        ((scores(), 16), dict(num_valid_pages=41), ValueError, "^num_valid_pages"),
        ((scores(), 16), dict(num_valid_pages=-1), ValueError, "^num_valid_pages"),
        ((scores(), 16), dict(num_valid_pages=3.0), TypeError, "^num_valid_pages"),
        ((scores(), 16), dict(num_valid_pages=torch.ones(9, dtype=torch.int64)), TypeError, "^num_valid_pages.*dtype"),
        (
            (scores(), 16),
            dict(num_valid_pages=torch.ones(8, dtype=torch.int32)),
            ValueError,
            r"^num_valid_pages.*\[9\]",
        ),
        (
            (scores(), 16),
            dict(num_valid_pages=torch.ones(9, dtype=torch.int32, device=META)),
            ValueError,
            "^num_valid_pages.*meta",
        ),
        (
            (scores(), 16),
            dict(num_valid_pages=torch.full((9,), 41, dtype=torch.int32), validate=True),
            ValueError,
            r"^num_valid_pages\[0\].*\[0, 40\]",
        ),
        (
            (scores(), 16),
            dict(num_valid_pages=torch.tensor([1] * 8 + [-1], dtype=torch.int32), validate=True),
            ValueError,
            r"^num_valid_pages\[8\]",
        ),
        ((scores(), 16), dict(out=torch.empty(9, 2, 16)), TypeError, "^out:.*dtype"),
        ((scores(), 16), dict(out=torch.empty(9, 2, 8, dtype=torch.int32)), ValueError, r"^out:.*\[9, 2, 16\]"),
        (
            (scores(), 16),
            dict(out=torch.empty(2, 9, 16, dtype=torch.int32).transpose(0, 1)),
            ValueError,
            "^out:.*contiguous",
        ),
        ((scores(), 16), dict(out=torch.empty(9, 2, 16, dtype=torch.int32, device=META)), ValueError, "^out:.*meta"),
        ((scores(), 16), dict(backend="triton"), ValueError, "^backend"),
    ],
)
def test_rejects_bad_arguments(args, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        sparse_topk_select(*args, **kwargs)


def test_out_of_range_num_valid_pages_unchecked_by_default_is_clamped():
    """Without validation there is no host sync; the reference clamps nvp to [0, K] instead of reading out of range."""
    ms = scores(seed=3)
    big = torch.full((9,), 99, dtype=torch.int32)
    assert torch.equal(sparse_topk_select(ms, 16, num_valid_pages=big), sparse_topk_select(ms, 16))


@pytest.mark.gpu
@pytest.mark.parametrize("k_tiles,total_q", [(128, 1000), (1024, 333), (16, 64)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_matches_cpu_reference(k_tiles, total_q, dtype):
    ms = scores(4, k_tiles, total_q, seed=k_tiles, dtype=dtype, device="cuda")
    g = torch.Generator().manual_seed(5)
    nvp = torch.randint(0, k_tiles + 1, (total_q,), generator=g, dtype=torch.int32)
    for kw in (
        dict(),
        dict(num_valid_pages=nvp.cuda(), force_begin_blocks=1, force_end_blocks=1),
        dict(num_valid_pages=k_tiles // 2),
    ):
        got = sparse_topk_select(ms, 16, validate=True, **kw)
        cpu_kw = {n: (x.cpu() if isinstance(x, torch.Tensor) else x) for n, x in kw.items()}
        assert torch.equal(got.cpu(), sparse_topk_select_reference(ms.cpu(), 16, **cpu_kw))
