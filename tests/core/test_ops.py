"""torch.library registration of msa-core kernels: torch.compile and CUDA-graph capture."""

import msa.core.ops  # noqa: F401  (registers torch.ops.msa.*)
import pytest
import torch
from msa.core import sparse_topk_select
from msa.core.reference import sparse_topk_select_reference


def test_ops_are_registered():
    assert hasattr(torch.ops.msa, "sparse_topk_select_out")
    schema = str(torch.ops.msa.sparse_topk_select_out.default._schema)
    assert "Tensor(a6!) out" in schema and schema.endswith("-> ()"), schema


def _scores(h, k, q, device, seed):
    g = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randn(h, k, q, generator=g).to(device)


@pytest.mark.gpu
def test_opcheck_topk_op():
    ms = _scores(2, 300, 64, "cuda", 0)
    out = torch.empty(64, 2, 16, dtype=torch.int32, device="cuda")
    torch.library.opcheck(torch.ops.msa.sparse_topk_select_out.default, (ms, 16, None, 300, 0, 1, out))


@pytest.mark.gpu
@pytest.mark.parametrize("n_blocks,total_q", [(1000, 256), (8192, 64)], ids=["coop", "pool"])
def test_topk_under_torch_compile(n_blocks, total_q):
    def step(ms, out):
        sparse_topk_select(ms, 16, force_end_blocks=1, out=out)
        return out

    compiled = torch.compile(step)
    for seed in range(3):
        ms = _scores(4, n_blocks, total_q, "cuda", seed)
        out = torch.full((total_q, 4, 16), -7, dtype=torch.int32, device="cuda")
        got = compiled(ms, out)
        ref = sparse_topk_select_reference(ms.cpu(), 16, force_end_blocks=1)
        assert torch.equal(got.cpu(), ref)


@pytest.mark.gpu
@pytest.mark.parametrize("n_blocks,total_q", [(1024, 128), (8192, 64)], ids=["coop", "pool"])
def test_topk_cuda_graph_capture_and_replay(n_blocks, total_q):
    """Captured once, replayed on new data; the pool shape captures two launches and its workspace (torch's graph
    pool)."""
    from msa.core.kernels.topk import plan

    assert plan(4, n_blocks, total_q, 15, 132).path == ("pool" if n_blocks == 8192 else "coop")
    ms = _scores(4, n_blocks, total_q, "cuda", 1)
    nvp = torch.randint(1, n_blocks + 1, (total_q,), dtype=torch.int32, device="cuda")
    out = torch.empty(total_q, 4, 16, dtype=torch.int32, device="cuda")
    sparse_topk_select(ms, 16, num_valid_pages=nvp, force_end_blocks=1, out=out)  # warm-up: load, smem attrs
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        sparse_topk_select(ms, 16, num_valid_pages=nvp, force_end_blocks=1, out=out)
    for seed in range(2, 5):  # new data in the captured buffers, replay, compare
        ms.copy_(_scores(4, n_blocks, total_q, "cuda", seed))
        nvp.copy_(torch.randint(1, n_blocks + 1, (total_q,), dtype=torch.int32))
        out.fill_(-7)
        graph.replay()
        ref = sparse_topk_select_reference(ms.cpu(), 16, num_valid_pages=nvp.cpu(), force_end_blocks=1)
        assert torch.equal(out.cpu(), ref)
