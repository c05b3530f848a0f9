"""sparse_topk_select CUDA kernel (msa.core.kernels.topk, csrc/topk).

Three layers:
- CPU replay (always runs where g++ exists): csrc/topk/topk_reg_emulate.cc replays the reg path's algorithm (lane
  partition, group values, bound, index-ordered candidates, rank / argmax-rounds fallback);
  csrc/topk/topk_cluster_emulate.cc replays the cluster path's
  algorithm (its partitions, bitonic merges, scan order, random remote-append order, fallback); csrc/topk/topk_emulate.cc runs the warp path's lane code on the host
  with random warp votes, for many launch shapes (splits, warps, capacities) the GPU heuristic rarely picks;
  csrc/topk/topk_block_emulate.cc runs the block path's CTA code with one host thread per CUDA thread, real
  barriers and atomics, shuffled atomic order and garbage-filled shared memory.
- compile (``-m compile``): JitSpec builds the module for sm_90a and sm_100a; a cubin for each arch is inside.
- GPU (``-m gpu``): the real kernel against the reference, exact set equality (the output is a sorted set, so
  tensor equality is set equality), poisoned outputs, determinism.
Every comparison is exact: the kernel must pick the same blocks as the brute-force oracle, ties included.
"""

from __future__ import annotations

import ctypes
import functools
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from msa.core.reference import sparse_topk_select_reference as reference
from msa_core_testutil import built_module

CSRC = Path(__file__).resolve().parents[2] / "packages/msa-core/src/msa/core/csrc/topk"
TOPKS = (1, 7, 16, 33, 64)
KS = (1, 5, 128, 1000, 16384)
POISON = -7


# ---------------------------------------------------------------------------------------------------------------
# inputs


def make_scores(kind: str, n_heads: int, n_blocks: int, total_q: int, dtype, gen: torch.Generator) -> torch.Tensor:
    """Random [H, K, Q] max-score tensors; never all zeros."""
    shape = (n_heads, n_blocks, total_q)
    if kind == "randn":
        s = torch.randn(shape, generator=gen)
    elif kind == "ties":  # a few distinct values: most of a row ties
        s = torch.randint(0, 4, shape, generator=gen).float() * 0.5 - 1.0
    elif kind == "causal":  # row t sees only its first t // 128 + 1 blocks
        s = torch.randn(shape, generator=gen)
        visible = torch.arange(total_q).view(1, 1, -1) // 128 + 1
        s = torch.where(torch.arange(n_blocks).view(1, -1, 1) < visible, s, torch.full_like(s, float("-inf")))
    elif kind == "nan":
        s = torch.randn(shape, generator=gen)
        s[torch.rand(shape, generator=gen) < 0.1] = float("nan")
        s[torch.rand(shape, generator=gen) < 0.1] = float("-inf")
        s[torch.rand(shape, generator=gen) < 0.05] = float("inf")
    elif kind == "ascending":  # worst case for a streaming threshold: every block beats the ones before it
        s = torch.arange(n_blocks, dtype=torch.float32).view(1, -1, 1).expand(shape).contiguous()
        s = s + 0.25 * torch.randint(0, 2, shape, generator=gen)
    elif kind == "zeros_signed":  # +0 and -0 must tie
        s = torch.randn(shape, generator=gen)
        s[:, ::2, ::2] = 0.0
        s[:, 1::2, ::2] = -0.0
    else:
        raise ValueError(kind)
    return s.to(dtype)


def random_nvp(total_q: int, n_blocks: int, gen: torch.Generator) -> torch.Tensor:
    nvp = torch.randint(0, n_blocks + 1, (total_q,), generator=gen, dtype=torch.int32)
    nvp[torch.rand(total_q, generator=gen) < 0.2] = 0
    nvp[torch.rand(total_q, generator=gen) < 0.2] = n_blocks
    return nvp


def brute_force(scores: torch.Tensor, topk: int, nvp, fb: int, fe: int) -> list[list[list[int]]]:
    """Independent per-row oracle: Python sort on (value desc, index asc) in float64."""
    n_heads, n_blocks, total_q = scores.shape
    s = scores.double()
    out = []
    for t in range(total_q):
        row_out = []
        n = n_blocks if nvp is None else (int(nvp[t]) if isinstance(nvp, torch.Tensor) else int(nvp))
        n = min(max(n, 0), n_blocks)
        for h in range(n_heads):
            forced = set(range(min(fb, n))) | set(range(max(n - fe, 0), n))
            vals = s[h, :, t].tolist()
            cands = [(-vals[b], b) for b in range(n) if b not in forced and vals[b] == vals[b] and vals[b] > float("-inf")]
            cands.sort()
            chosen = sorted(forced | {b for _, b in cands[: topk - len(forced)]})
            row_out.append(chosen + [-1] * (topk - len(chosen)))
        out.append(row_out)
    return out


# ---------------------------------------------------------------------------------------------------------------
# CPU replay of the kernel logic


@functools.lru_cache(maxsize=4)
def _emulator_lib(build_dir: str, name: str, n_launch_ints: int, threads: bool = False):
    """Build csrc/topk/<name>.cc into a shared library and return its ``msa_<name>`` entry point. Every emulator
    takes (scores, H, K, total_q, topk, nvp*, nvp, force_begin, force_end, <n_launch_ints launch ints>, seed, out)."""
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler on this host (the CPU replay of the top-k kernel needs g++)")
    so = Path(build_dir) / f"{name}.so"
    cmd = [cxx, "-O2", "-std=c++17", "-shared", "-fPIC", *(["-pthread"] if threads else []), "-Wno-unknown-pragmas",
           f"-I{CSRC}", str(CSRC / f"{name}.cc"), "-o", str(so)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, f"building the {name} emulator failed:\n{proc.stderr[-4000:]}"
    f = getattr(ctypes.CDLL(str(so)), f"msa_{name}")
    f.restype = ctypes.c_int
    f.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int, ctypes.c_void_p,
                  ctypes.c_int, ctypes.c_int, ctypes.c_int, *[ctypes.c_int] * n_launch_ints, ctypes.c_uint64,
                  ctypes.c_void_p]
    return f


def _emulator_io(scores, topk, nvp):
    """(fp32 scores, poisoned out, nvp pointer or None, scalar nvp, the contiguous nvp kept alive for the call)."""
    n_heads, n_blocks, total_q = scores.shape
    s32 = scores.float().contiguous()  # bf16 -> its exact float value, as the kernel's loads do
    out = torch.full((total_q, n_heads, topk), POISON, dtype=torch.int32)
    if isinstance(nvp, torch.Tensor):
        nvp = nvp.contiguous()
        return s32, out, nvp.data_ptr(), n_blocks, nvp
    return s32, out, None, (n_blocks if nvp is None else int(nvp)), None


@pytest.fixture(scope="module")
def emulate(tmp_path_factory):
    f = _emulator_lib(str(tmp_path_factory.mktemp("topk_emulate")), "topk_emulate", 4)

    def run(scores, topk, nvp, fb, fe, *, splits, warps, merge_warps, cap, seed):
        s32, out, nvp_ptr, nvp_scalar, _keep = _emulator_io(scores, topk, nvp)
        rc = f(s32.data_ptr(), *scores.shape, topk, nvp_ptr, nvp_scalar, fb, fe, splits, warps, merge_warps, cap, seed,
               out.data_ptr())
        assert rc == 0, "emulator rejected its arguments"
        return out

    return run


@pytest.fixture(scope="module")
def block_emulate(tmp_path_factory):
    f = _emulator_lib(str(tmp_path_factory.mktemp("topk_block_emulate")), "topk_block_emulate", 5, threads=True)

    def run(scores, topk, nvp, fb, fe, *, splits, g, p, cap, seed, v=16):
        s32, out, nvp_ptr, nvp_scalar, _keep = _emulator_io(scores, topk, nvp)
        rc = f(s32.data_ptr(), *scores.shape, topk, nvp_ptr, nvp_scalar, fb, fe, splits, g.bit_length() - 1, p, cap, v,
               seed, out.data_ptr())
        assert rc == 0, "block emulator rejected its arguments"
        return out

    return run


KINDS = ("randn", "ties", "causal", "nan", "ascending", "zeros_signed")


@pytest.mark.parametrize("case", range(240))
def test_emulated_kernel_matches_reference(emulate, case):
    from msa.core.kernels.topk import BATCH, column_capacity

    assert BATCH == 16, "topk_emulate.cc replays batch 16"
    gen = torch.Generator().manual_seed(1000 + case)
    pick = lambda seq: seq[int(torch.randint(0, len(seq), (1,), generator=gen))]  # noqa: E731
    topk = pick(TOPKS)
    n_blocks = pick((1, 5, 37, 128, 300, 1000, 2500))
    total_q = pick((1, 13, 32, 70))
    n_heads = pick((1, 2))
    fb = int(torch.randint(0, topk + 1, (1,), generator=gen)) if case % 3 == 0 else 0
    fe = int(torch.randint(0, topk - fb + 1, (1,), generator=gen)) if case % 4 < 2 else 0
    if case % 17 == 0:
        fe = topk - fb  # fb + fe == topk: nothing left to select
    kind = KINDS[case % len(KINDS)]
    dtype = torch.bfloat16 if case % 5 == 0 else torch.float32
    scores = make_scores(kind, n_heads, n_blocks, total_q, dtype, gen)
    nvp = (None, int(torch.randint(0, n_blocks + 1, (1,), generator=gen)), random_nvp(total_q, n_blocks, gen))[case % 3]
    m = topk - fb - fe
    cap = column_capacity(m) if case % 2 else m + BATCH + 1  # tight columns force many compactions
    kw = dict(splits=pick((1, 1, 2, 3, 8)), warps=pick((1, 2, 3, 4)), merge_warps=pick((1, 2, 4)), cap=cap,
              seed=case % 7)  # seed 0: votes = own predicate; else random extra votes
    want = reference(scores, topk, num_valid_pages=nvp, force_begin_blocks=fb, force_end_blocks=fe)
    got = emulate(scores, topk, nvp, fb, fe, **kw)
    assert torch.equal(got, want), f"{kind} topk={topk} K={n_blocks} q={total_q} fb={fb} fe={fe} {kw}"
    if case % 8 == 0 and n_blocks <= 300:
        assert got.tolist() == brute_force(scores, topk, nvp, fb, fe)


def test_emulated_kernel_votes_do_not_matter(emulate):
    """Same input, many vote sequences and launch shapes: one answer."""
    gen = torch.Generator().manual_seed(7)
    scores = make_scores("ties", 2, 777, 40, torch.float32, gen)
    want = reference(scores, 33, force_begin_blocks=1, force_end_blocks=2)
    for seed in range(6):
        for splits, warps in ((1, 1), (1, 4), (4, 2), (9, 3)):
            got = emulate(scores, 33, None, 1, 2, splits=splits, warps=warps, merge_warps=2, cap=31 + 17, seed=seed)
            assert torch.equal(got, want), (seed, splits, warps)


def _block_case(case: int):
    gen = torch.Generator().manual_seed(5000 + case)
    pick = lambda seq: seq[int(torch.randint(0, len(seq), (1,), generator=gen))]  # noqa: E731
    topk = pick(TOPKS)
    n_blocks = pick((1, 5, 37, 128, 300, 1000, 2500))
    total_q = pick((1, 13, 32, 70))
    n_heads = pick((1, 2))
    fb = int(torch.randint(0, topk + 1, (1,), generator=gen)) if case % 3 == 0 else 0
    fe = int(torch.randint(0, topk - fb + 1, (1,), generator=gen)) if case % 4 < 2 else 0
    if case % 17 == 0:
        fe = topk - fb  # nothing left to select
    kind = KINDS[case % len(KINDS)]
    dtype = torch.bfloat16 if case % 5 == 0 else torch.float32
    scores = make_scores(kind, n_heads, n_blocks, total_q, dtype, gen)
    nvp = (None, int(torch.randint(0, n_blocks + 1, (1,), generator=gen)), random_nvp(total_q, n_blocks, gen))[case % 3]
    m = topk - fb - fe
    p = pick((4, 8, 32, 64))  # P < M too: the max-of-maxima bound is then -inf and chunks overflow
    cap = m + p + (0 if case % 2 else max(32, m))  # the tightest legal buffer overflows often
    kw = dict(splits=pick((1, 1, 2, 3, 8)), g=pick((1, 2, 4, 8)), p=p, cap=cap, seed=case % 5, v=(16, 32)[case % 2])
    return scores, topk, nvp, fb, fe, kind, kw


def _check_block_case(block_emulate, case):
    scores, topk, nvp, fb, fe, kind, kw = _block_case(case)
    want = reference(scores, topk, num_valid_pages=nvp, force_begin_blocks=fb, force_end_blocks=fe)
    got = block_emulate(scores, topk, nvp, fb, fe, **kw)
    h, k, q = scores.shape
    assert torch.equal(got, want), f"{kind} topk={topk} K={k} q={q} H={h} fb={fb} fe={fe} {kw}"


@pytest.mark.parametrize("case", range(30))
def test_block_emulated_matches_reference(block_emulate, case):
    _check_block_case(block_emulate, case)


@pytest.mark.slow
@pytest.mark.parametrize("case", range(30, 230))
def test_block_emulated_matches_reference_more(block_emulate, case):
    _check_block_case(block_emulate, case)


def test_block_emulated_order_does_not_matter(block_emulate):
    """Ties everywhere (chunks overflow into the one-value-per-round path) and many launch shapes and atomic
    orders: one answer, the reference's."""
    gen = torch.Generator().manual_seed(8)
    scores = make_scores("ties", 2, 900, 11, torch.float32, gen)
    want = reference(scores, 33, force_begin_blocks=1, force_end_blocks=2)
    for seed in range(4):
        for splits, g, p, v in ((1, 1, 32, 16), (1, 4, 8, 32), (3, 2, 32, 32), (5, 8, 4, 16)):
            got = block_emulate(scores, 33, None, 1, 2, splits=splits, g=g, p=p, cap=30 + p, seed=seed, v=v)
            assert torch.equal(got, want), (seed, splits, g, p, v)


def test_block_emulated_long_rows(block_emulate):
    """Many chunks per CTA (prefetch + carried best list), bf16 and per-token nvp, at the kernel's default P."""
    gen = torch.Generator().manual_seed(9)
    for kind, v in (("randn", 16), ("ascending", 16), ("causal", 32), ("randn", 32)):
        scores = make_scores(kind, 1, 5000, 9, torch.bfloat16 if kind == "randn" else torch.float32, gen)
        nvp = random_nvp(9, 5000, gen)
        want = reference(scores, 16, num_valid_pages=nvp, force_begin_blocks=0, force_end_blocks=1)
        got = block_emulate(scores, 16, nvp, 0, 1, splits=1, g=2, p=32, cap=15 + 32 + 32, seed=1, v=v)
        assert torch.equal(got, want), (kind, v)


@pytest.fixture(scope="module")
def cluster_emulate(tmp_path_factory):
    f = _emulator_lib(str(tmp_path_factory.mktemp("topk_cluster_emulate")), "topk_cluster_emulate", 5)

    def run(scores, topk, nvp, fb, fe, *, g, slices, warps, cap, seed, flags=0):
        s32, out, nvp_ptr, nvp_scalar, _keep = _emulator_io(scores, topk, nvp)
        rc = f(s32.data_ptr(), *scores.shape, topk, nvp_ptr, nvp_scalar, fb, fe, g.bit_length() - 1, slices, warps, cap,
               flags, seed, out.data_ptr())
        assert rc == 0, "cluster emulator rejected its arguments"
        return out

    return run


@pytest.mark.parametrize("case", range(120))
def test_cluster_emulated_matches_reference(cluster_emulate, case):
    """Cluster path algorithm (topk_cluster_emulate.cc) over the random matrix: heavy ties (-> the fallback over all
    slices when the candidates overflow cap), -inf / NaN, forced blocks, k 1..64, ragged nvp, bf16, slices past K,
    G x S x W launch shapes, tight capacities, random remote-append orders."""
    _cluster_emulated_case(cluster_emulate, case, 4 if case % 7 == 3 else 0)  # sorted_merge: the v4 bound (A/B)


@pytest.mark.parametrize("case", range(120, 200))
def test_cluster_local_merge_emulated_matches_reference(cluster_emulate, case):
    """Local-merge variant (flag 8): per slice the exact local top M (local fallback when the slice's candidates
    overflow cap), the owner's bitonic merge tree of the S lists; the same random matrix (M > 32 takes the default
    algorithm, as the binding does)."""
    _cluster_emulated_case(cluster_emulate, case, 8 if case % 5 else 12)


def _cluster_emulated_case(cluster_emulate, case, flags):
    from msa.core.kernels.topk import row_capacity

    gen = torch.Generator().manual_seed(9000 + case)
    pick = lambda seq: seq[int(torch.randint(0, len(seq), (1,), generator=gen))]  # noqa: E731
    topk = pick((1, 7, 16, 33, 48, 64))
    n_blocks = pick((1, 37, 300, 1000, 2500, 8192))
    total_q = pick((1, 13, 64))
    n_heads = pick((1, 2))
    fb = int(torch.randint(0, topk + 1, (1,), generator=gen)) if case % 3 == 0 else 0
    fe = int(torch.randint(0, topk - fb + 1, (1,), generator=gen)) if case % 4 < 2 else 0
    if case % 17 == 0:
        fe = topk - fb
    kind = KINDS[case % len(KINDS)]
    dtype = torch.bfloat16 if case % 5 == 0 else torch.float32
    scores = make_scores(kind, n_heads, n_blocks, total_q, dtype, gen)
    nvp = (None, int(torch.randint(0, n_blocks + 1, (1,), generator=gen)), random_nvp(total_q, n_blocks, gen))[case % 3]
    m = topk - fb - fe
    g = pick((1, 2, 4, 8, 16))
    cap = row_capacity(m) if case % 2 else max(m, 1) + int(torch.randint(0, 8, (1,), generator=gen))
    kw = dict(g=g, slices=pick((1, 2, 3, 5, 8)), warps=max(g, pick((1, 4, 8, 16))), cap=cap, seed=case, flags=flags)
    want = reference(scores, topk, num_valid_pages=nvp, force_begin_blocks=fb, force_end_blocks=fe)
    got = cluster_emulate(scores, topk, nvp, fb, fe, **kw)
    assert torch.equal(got, want), f"{kind} topk={topk} K={n_blocks} q={total_q} fb={fb} fe={fe} {kw}"


def test_cluster_emulated_bound_is_tight(cluster_emulate):
    """iid scores at the 1M decode shape: the union-of-slices bound leaves few candidates (no fallback needed)
    -- checked indirectly: the smallest legal cap (M + 16) still gives the exact answer, and so does cap = M
    only through the fallback."""
    gen = torch.Generator().manual_seed(12)
    scores = make_scores("randn", 1, 8192, 8, torch.float32, gen)
    want = reference(scores, 16, force_end_blocks=1)
    for cap in (15, 31, 128):
        for flags in (0, 4, 8):
            got = cluster_emulate(scores, 16, None, 0, 1, g=8, slices=8, warps=8, cap=cap, seed=cap, flags=flags)
            assert torch.equal(got, want), (cap, flags)


def test_cluster_emulated_m_zero(cluster_emulate):
    """Every output forced (M = 0): nothing staged or selected, forced head / tail and -1 only (the GPU test
    matrix forces the cluster path for topk 1 with one forced block)."""
    gen = torch.Generator().manual_seed(13)
    for n_blocks, nvp in ((5, None), (128, 3), (1000, random_nvp(70, 1000, gen))):
        scores = make_scores("randn", 2, n_blocks, 70, torch.float32, gen)
        for topk, fb, fe in ((1, 0, 1), (1, 1, 0), (4, 2, 2)):
            want = reference(scores, topk, num_valid_pages=nvp, force_begin_blocks=fb, force_end_blocks=fe)
            got = cluster_emulate(scores, topk, nvp, fb, fe, g=2, slices=1, warps=8, cap=128, seed=1)
            assert torch.equal(got, want), (n_blocks, topk, fb, fe)


@pytest.fixture(scope="module")
def reg_emulate(tmp_path_factory):
    f = _emulator_lib(str(tmp_path_factory.mktemp("topk_reg_emulate")), "topk_reg_emulate", 3)

    def run(scores, topk, nvp, fb, fe, *, lanes, v, cap):
        s32, out, nvp_ptr, nvp_scalar, _keep = _emulator_io(scores, topk, nvp)
        rc = f(s32.data_ptr(), *scores.shape, topk, nvp_ptr, nvp_scalar, fb, fe, lanes, v, cap, 0, out.data_ptr())
        assert rc == 0, "reg emulator rejected its arguments"
        return out

    return run


def _reg_case(case: int):
    gen = torch.Generator().manual_seed(20000 + case)
    pick = lambda seq: seq[int(torch.randint(0, len(seq), (1,), generator=gen))]  # noqa: E731
    topk = pick((1, 7, 15, 16, 33, 48, 64))
    lanes = pick((4, 8, 16, 32))
    v = pick(tuple(x for x in (2, 4, 8, 16, 32) if lanes * x >= 5))
    n_blocks = max(1, min(lanes * v, pick((1, 5, 37, 64, 100, 256, 1000, lanes * v))))
    total_q = pick((1, 13, 64))
    n_heads = pick((1, 2))
    fb = int(torch.randint(0, topk + 1, (1,), generator=gen)) if case % 3 == 0 else 0
    fe = int(torch.randint(0, topk - fb + 1, (1,), generator=gen)) if case % 4 < 2 else 0
    if case % 17 == 0:
        fe = topk - fb
    kind = KINDS[case % len(KINDS)]
    dtype = torch.bfloat16 if case % 5 == 0 else torch.float32
    scores = make_scores(kind, n_heads, n_blocks, total_q, dtype, gen)
    nvp = (None, int(torch.randint(0, n_blocks + 1, (1,), generator=gen)), random_nvp(total_q, n_blocks, gen))[case % 3]
    m = topk - fb - fe
    cap = (max(n_blocks, m, 1), 128 if m <= 32 else 256, max(m, 1) + int(torch.randint(0, 8, (1,), generator=gen)))[case % 3]
    return scores, topk, nvp, fb, fe, kind, dict(lanes=lanes, v=v, cap=cap)


@pytest.mark.parametrize("case", range(160))
def test_reg_emulated_matches_reference(reg_emulate, case):
    """Reg path algorithm (topk_reg_emulate.cc): P lanes x V values per row, the 32-group bound (maxima or second
    largest for M > 32), index-ordered candidates, rank select or (n > cap: heavy ties, tight caps) the argmax-rounds
    fallback; -inf / NaN, forced blocks, ragged nvp, bf16, K not a multiple of P x V."""
    scores, topk, nvp, fb, fe, kind, kw = _reg_case(case)
    want = reference(scores, topk, num_valid_pages=nvp, force_begin_blocks=fb, force_end_blocks=fe)
    got = reg_emulate(scores, topk, nvp, fb, fe, **kw)
    h, k, q = scores.shape
    assert torch.equal(got, want), f"{kind} topk={topk} K={k} q={q} H={h} fb={fb} fe={fe} {kw}"


def test_reg_emulated_bench_shapes(reg_emulate, monkeypatch):
    """The plan's reg shapes at the bench's sizes (8K prefill / decode, 128K decode), iid and tied scores."""
    from msa.core.kernels.topk import plan

    monkeypatch.setenv("MSA_TOPK_PATH", "reg")  # 8K prefill: net by default; 128K decode: row by default
    gen = torch.Generator().manual_seed(21)
    for n_heads, n_blocks, total_q in ((4, 64, 512), (1, 64, 4096), (1, 64, 64), (4, 1024, 64), (1, 256, 300)):
        p = plan(n_heads, n_blocks, total_q, 15, 132)
        assert p.path == "reg"
        for kind in ("randn", "ties"):
            scores = make_scores(kind, n_heads, n_blocks, total_q, torch.float32, gen)
            want = reference(scores, 16, force_end_blocks=1)
            got = reg_emulate(scores, 16, None, 0, 1, lanes=p.threads_per_row, v=p.values_per_thread, cap=p.cap)
            assert torch.equal(got, want), (n_heads, n_blocks, total_q, kind)


@pytest.fixture(scope="module")
def net_emulate(tmp_path_factory):
    f = _emulator_lib(str(tmp_path_factory.mktemp("topk_net_emulate")), "topk_net_emulate", 2)

    def run(scores, topk, nvp, fb, fe, *, lanes, v):
        s32, out, nvp_ptr, nvp_scalar, _keep = _emulator_io(scores, topk, nvp)
        rc = f(s32.data_ptr(), *scores.shape, topk, nvp_ptr, nvp_scalar, fb, fe, lanes, v, 0, out.data_ptr())
        assert rc == 0, f"net emulator: rc {rc} (-1 arguments, -2 lanes disagree on the list, <= -3 offsets / counts)"
        return out

    return run


def _m16_case_rows(gen, case: int, topk: int, n_heads: int, n_blocks: int, total_q: int):
    """The rest of a random M <= 16 replay case (net, coop, ccoop): forced blocks with M = topk - fb - fe <= 16, the case's
    score kind and dtype, the scores, and no / scalar / per-token nvp. Returns (scores, fb, fe, kind, nvp)."""
    fb = int(torch.randint(0, topk + 1, (1,), generator=gen)) if case % 3 == 0 else 0
    fe = int(torch.randint(0, topk - fb + 1, (1,), generator=gen)) if case % 4 < 2 else 0
    if case % 17 == 0:
        fe = topk - fb
    if topk - fb - fe > 16:
        fe = topk - fb - 16
    kind = KINDS[case % len(KINDS)]
    dtype = torch.bfloat16 if case % 5 == 0 else torch.float32
    scores = make_scores(kind, n_heads, n_blocks, total_q, dtype, gen)
    nvp = (None, int(torch.randint(0, n_blocks + 1, (1,), generator=gen)), random_nvp(total_q, n_blocks, gen))[case % 3]
    return scores, fb, fe, kind, nvp


def _net_case(case: int):
    gen = torch.Generator().manual_seed(30000 + case)
    pick = lambda seq: seq[int(torch.randint(0, len(seq), (1,), generator=gen))]  # noqa: E731
    topk = pick((1, 2, 7, 15, 16, 17, 20))
    lanes = pick((1, 2, 4, 8, 16, 32))
    v = pick((16, 32, 64))
    n_blocks = max(1, min(lanes * v, pick((1, 5, 16, 17, 37, 64, 100, 256, lanes * v, lanes * v - 1))))
    total_q = pick((1, 13, 40))
    n_heads = pick((1, 2))
    scores, fb, fe, kind, nvp = _m16_case_rows(gen, case, topk, n_heads, n_blocks, total_q)
    return scores, topk, nvp, fb, fe, kind, dict(lanes=lanes, v=v)


@pytest.mark.parametrize("case", range(200))
def test_net_emulated_matches_reference(net_emulate, case):
    """Net variant (topk_net_emulate.cc, the kernel's network functions): P lanes x V values per row, sorted top-16
    lists merged in-lane and across lanes, T = the M-th largest, ge masks, tie quota by index; -inf / NaN / +inf,
    forced blocks, ragged nvp, bf16 (ties), K not a multiple of P x V, M = 0."""
    scores, topk, nvp, fb, fe, kind, kw = _net_case(case)
    want = reference(scores, topk, num_valid_pages=nvp, force_begin_blocks=fb, force_end_blocks=fe)
    got = net_emulate(scores, topk, nvp, fb, fe, **kw)
    h, k, q = scores.shape
    assert torch.equal(got, want), f"{kind} topk={topk} K={k} q={q} H={h} fb={fb} fe={fe} {kw}"


def test_net_emulated_bench_shapes(net_emulate):
    """The plan's net shapes at the bench's sizes (8K prefill H1 / H4) and the A/B candidates, iid and tied."""
    from msa.core.kernels.topk import plan

    gen = torch.Generator().manual_seed(31)
    for n_heads, n_blocks, total_q in ((4, 64, 4096), (1, 64, 4096)):
        p = plan(n_heads, n_blocks, total_q, 15, 132)
        assert p.path == "net"
        for lanes, v in {(p.threads_per_row, p.values_per_thread), (1, 64), (2, 32), (4, 16)}:
            for kind, dtype in (("randn", torch.float32), ("ties", torch.bfloat16)):
                scores = make_scores(kind, 1, n_blocks, 256, dtype, gen)
                want = reference(scores, 16, force_end_blocks=1)
                got = net_emulate(scores, 16, None, 0, 1, lanes=lanes, v=v)
                assert torch.equal(got, want), (lanes, v, kind)


def _shared_rows_emulator(tmp_path_factory, name: str, codes: str):
    """The CPU replay of a path whose CTAs share G rows over W warps (coop, ccoop):
    run(scores, topk, nvp, fb, fe, tokens=G, warps=W, cap, seed) -> (out, number of rows that took the fallback).
    ``codes``: what the replay's negative return codes mean (the assertion message)."""
    f = _emulator_lib(str(tmp_path_factory.mktemp(name)), name, 3)

    def run(scores, topk, nvp, fb, fe, *, tokens, warps, cap=64, seed=0):
        s32, out, nvp_ptr, nvp_scalar, _keep = _emulator_io(scores, topk, nvp)
        rc = f(s32.data_ptr(), *scores.shape, topk, nvp_ptr, nvp_scalar, fb, fe, tokens, warps, cap, seed,
               out.data_ptr())
        assert rc >= 0, f"{name}: rc {rc} ({codes})"
        return out, rc

    return run


def _check_emulated_cases(emulate, make_case, n_cases: int) -> None:
    """Every case of ``make_case`` (a seeded generator: scores, topk, nvp, fb, fe, kind, emulator kwargs) replays
    exactly as the reference, and both branches run: some rows take the fallback, most do not."""
    fallbacks = direct = 0
    for case in range(n_cases):
        scores, topk, nvp, fb, fe, kind, kw = make_case(case)
        want = reference(scores, topk, num_valid_pages=nvp, force_begin_blocks=fb, force_end_blocks=fe)
        got, nfb = emulate(scores, topk, nvp, fb, fe, **kw)
        h, k, q = scores.shape
        assert torch.equal(got, want), f"case {case}: {kind} topk={topk} K={k} q={q} H={h} fb={fb} fe={fe} {kw}"
        fallbacks += nfb
        direct += q * h - nfb
    assert fallbacks > 0 and direct > fallbacks, (fallbacks, direct)


def _decode_rows(kind: str, n_blocks: int, total_q: int, gen) -> torch.Tensor:
    """[1, n_blocks, total_q] decode rows: iid ("randn"), a random walk ("walk"), "ascending", "periodic" (blocks 0-2
    mod 32 high: three supergroups hold them all, past any candidate cap), or "lanes" (the pool select's lanes 0-13 --
    groups l + 32 i of 16 blocks -- hold three high groups each, distinct values: ~670 candidates above the bound, the
    CTA form's exact M-th-largest step), or "ulps" (values 1 + u ulps, u < 4096, and their negatives: about one value
    per ulp near the top, so the pool records' 16-ulp buckets straddle the cut: the records form's fallback)."""
    x = torch.randn((1, n_blocks, total_q), generator=gen)
    if kind == "ulps":
        u = torch.randint(0, 4096, x.shape, generator=gen).float() * 2.0**-23
        return torch.where(x > 0, 1.0 + u, -1.0 - u)
    if kind == "lanes":
        group = torch.arange(n_blocks) // 16
        high = (group % 32 < 14) & torch.isin(group // 32, torch.tensor([0, 5, 10]))
        return x + 10.0 * high.float().view(1, n_blocks, 1)
    if kind == "walk":
        x = x.cumsum(1) * 0.2 + torch.randn((1, n_blocks, total_q), generator=gen)
    elif kind == "ascending":
        x = torch.arange(n_blocks, dtype=torch.float32).view(1, n_blocks, 1).expand(1, n_blocks, total_q).contiguous()
    elif kind == "periodic":
        x = x + 10.0 * (torch.arange(n_blocks) % 32 < 3).float().view(1, n_blocks, 1)
    return x


@pytest.fixture(scope="module")
def coop_emulate(tmp_path_factory):
    return _shared_rows_emulator(tmp_path_factory, "topk_coop_emulate",
                                 "-1 arguments, -2 bound ranks, -3 / -4 rank select, <= -10 net")


COOP_SHAPES = [(1, 8), (2, 8), (4, 8), (2, 16), (4, 16), (8, 16)]
COOP_EMU_SHAPES = COOP_SHAPES + [(0, 8)]  # tokens 0: the tcoop layout (topk_coop_emulate.cc)


def _coop_case(case: int):
    gen = torch.Generator().manual_seed(40000 + case)
    pick = lambda seq: seq[int(torch.randint(0, len(seq), (1,), generator=gen))]  # noqa: E731
    topk = pick((1, 2, 7, 15, 16, 17, 20))
    tokens, warps = COOP_EMU_SHAPES[case % len(COOP_EMU_SHAPES)]
    n_blocks = pick((1, 5, 33, 257, 511, 1000, 1023, 1024))
    total_q = pick((1, 7, 20))
    n_heads = pick((1, 2))
    scores, fb, fe, kind, nvp = _m16_case_rows(gen, case, topk, n_heads, n_blocks, total_q)
    cap = (64, 32, 16)[case % 3]  # small caps send more rows to the fallback
    return scores, topk, nvp, fb, fe, kind, dict(tokens=tokens, warps=warps, cap=cap, seed=case)


def test_coop_emulated_matches_reference(coop_emulate):
    """Coop path (topk_coop_emulate.cc, the kernel's helpers): supergroup bound, candidates in a random append order,
    rank select + index order, the net fallback past cap; -inf / NaN / +inf, forced blocks, ragged nvp, bf16 ties,
    K not a multiple of R x V, M = 0; the tcoop layout too (tokens 0: its cluster loads checked to land as the
    selection expects). Both branches must be taken."""
    _check_emulated_cases(coop_emulate, _coop_case, 240)


def test_coop_emulated_bench_shapes(coop_emulate):
    """128K decode (K = 1024) at the plan's shapes: iid, random-walk and ascending rows stay under the cap (the
    interleaved supergroups), a row periodic in 32 blocks takes the fallback (still exact)."""
    from msa.core.kernels.topk import plan

    gen = torch.Generator().manual_seed(41)
    for n_heads in (1, 4):
        p = plan(n_heads, 1024, 64, 15, 132)
        assert p.path == ("tcoop" if n_heads == 1 else "coop"), p
        for tokens, warps in {(0 if p.path == "tcoop" else 1 << p.log_g, p.warps), (0, 8), (1, 8), (8, 16)}:
            for kind in ("randn", "walk", "ascending", "periodic"):  # periodic: 96 in 3 supergroups -> past the cap
                x = _decode_rows(kind, 1024, 64, gen)
                got, nfb = coop_emulate(x, 16, None, 0, 1, tokens=tokens, warps=warps)
                assert torch.equal(got, reference(x, 16, force_end_blocks=1)), (tokens, warps, kind)
                assert (nfb == 64) if kind == "periodic" else (nfb == 0), (tokens, warps, kind, nfb)


@pytest.fixture(scope="module")
def ccoop_emulate(tmp_path_factory):
    return _shared_rows_emulator(tmp_path_factory, "topk_ccoop_emulate",
                                 "-1 arguments, -2 bound ranks, -3 / -4 rank select / kept, -6 supergroups")


CCOOP_SHAPES = [(2, 8), (4, 8), (4, 16), (8, 16)]


def _ccoop_case(case: int):
    gen = torch.Generator().manual_seed(50000 + case)
    pick = lambda seq: seq[int(torch.randint(0, len(seq), (1,), generator=gen))]  # noqa: E731
    topk = pick((1, 2, 7, 15, 16, 17, 20))
    n_blocks = pick((1025, 1500, 2048, 3000, 4097, 8192))
    shapes = [sh for sh in CCOOP_SHAPES if sh[0] <= -(-n_blocks // 1024)]
    tokens, warps = shapes[case % len(shapes)]
    total_q = pick((1, 7, 20))
    n_heads = pick((1, 2))
    scores, fb, fe, kind, nvp = _m16_case_rows(gen, case, topk, n_heads, n_blocks, total_q)
    cap = (64, 32, 16)[case % 3]  # small caps send more rows to the fallback
    return scores, topk, nvp, fb, fe, kind, dict(tokens=tokens, warps=warps, cap=cap, seed=case)


def test_ccoop_emulated_matches_reference(ccoop_emulate):
    """Ccoop path (topk_ccoop_emulate.cc, the kernel's helpers): K split over 2-8 slices of 1024 blocks, supergroup
    bound over all slices, candidates in a random append order, rank select, the argmax-rounds fallback past cap;
    -inf / NaN / +inf, forced blocks, ragged nvp, bf16 ties, K not a multiple of 1024, M = 0. Both branches taken."""
    _check_emulated_cases(ccoop_emulate, _ccoop_case, 160)


def test_ccoop_emulated_bench_shapes(ccoop_emulate):
    """1M decode (K = 8192): iid, random-walk and ascending rows stay under the cap (the supergroups interleave
    across the slices), a row periodic in 32 blocks takes the fallback (still exact)."""
    gen = torch.Generator().manual_seed(51)
    for tokens, warps in CCOOP_SHAPES:
        for kind in ("randn", "walk", "ascending", "periodic"):  # periodic: 768 in 3 supergroups -> past the cap
            x = _decode_rows(kind, 8192, 16, gen)
            got, nfb = ccoop_emulate(x, 16, None, 0, 1, tokens=tokens, warps=warps)
            assert torch.equal(got, reference(x, 16, force_end_blocks=1)), (tokens, warps, kind)
            assert (nfb == 16) if kind == "periodic" else (nfb == 0), (tokens, warps, kind, nfb)


@pytest.fixture(scope="module")
def pool_emulate(tmp_path_factory):
    """CPU replay of the pool path: run(scores, topk, nvp, fb, fe, cap, group_cap, cta_cap, records) -> (out, [rows
    that refined the group bound, rows that refined the candidate bound, rows that took the rounds, CTA-form rows that
    fell back to the warp form, records-form rows that fell back to the warp form, records-form rows that gathered
    whole groups, records-form rows that refined the candidate bound]); cta_cap > 0: the select launch's CTA form with
    that candidate cap (the kernel's: 256); records: launch 1 writes records, the select reads them (bf16 scores:
    the kernel's bf16 instance, no bucket check)."""
    f = _emulator_lib(str(tmp_path_factory.mktemp("topk_pool_emulate")), "topk_pool_emulate", 2)
    f.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int, ctypes.c_void_p,
                  ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                  ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]
    codes = ("-1 arguments, -2 bound ranks, -3 bound, -4 a block >= theta outside the candidate groups (records: a block "
             "with a key >= th not an entry), -5 rank select, -6 list not in block order, -7 records")

    def run(scores, topk, nvp, fb, fe, cap=64, group_cap=32, cta_cap=0, records=False):
        s32, out, nvp_ptr, nvp_scalar, _keep = _emulator_io(scores, topk, nvp)
        stats = torch.zeros(7, dtype=torch.int32)
        rc = f(s32.data_ptr(), *scores.shape, topk, nvp_ptr, nvp_scalar, fb, fe, cap, group_cap, cta_cap,
               int(records), int(scores.dtype == torch.bfloat16), out.data_ptr(), stats.data_ptr())
        assert rc == 0, f"topk_pool_emulate: rc {rc} ({codes})"
        return out, stats.tolist()

    return run


def test_pool_emulated_matches_reference(pool_emulate):
    """Pool path (topk_pool_emulate.cc, the kernel's helpers): group maxima of 16 blocks over the masked row, the
    bound from 32 interleaved lane maxima, the candidate groups' values, the exact refinements of the group and
    candidate bounds past the caps, the argmax rounds past both; -inf / NaN / +inf, forced blocks, ragged nvp, bf16
    ties, K from 1 to 16384 (rows padded to 32 J groups), M = 0. Small caps send rows through every branch, and every
    branch must be taken. Each case also in the CTA form (cap 256 or 24: rows past it rerun in the warp form) and the
    records form (packed keys of each group's 4 best blocks; whole groups gathered, the candidate refinement, the
    fallback to the warp form past the caps or at a straddled bucket)."""
    totals = [0, 0, 0]
    cta_fallbacks, cta_rows = 0, 0
    rec = [0, 0, 0]  # records rows: fell back to the warp form, gathered whole groups, refined the candidate bound
    rows = 0
    for case in range(180):
        gen = torch.Generator().manual_seed(60000 + case)
        pick = lambda seq, gen=gen: seq[int(torch.randint(0, len(seq), (1,), generator=gen))]  # noqa: E731
        topk = pick((1, 2, 7, 15, 16, 17, 20))
        n_blocks = pick((1, 5, 100, 1025, 2049, 3000, 8192, 12345, 16384))
        total_q = pick((1, 7, 20))
        n_heads = pick((1, 2))
        scores, fb, fe, kind, nvp = _m16_case_rows(gen, case, topk, n_heads, n_blocks, total_q)
        cap, group_cap = ((64, 32), (32, 16), (16, 8))[case % 3]
        want = reference(scores, topk, num_valid_pages=nvp, force_begin_blocks=fb, force_end_blocks=fe)
        got, stats = pool_emulate(scores, topk, nvp, fb, fe, cap, group_cap)
        assert torch.equal(got, want), f"case {case}: {kind} topk={topk} K={n_blocks} q={total_q} H={n_heads} " \
                                       f"fb={fb} fe={fe} caps={cap, group_cap}"
        totals = [a + b for a, b in zip(totals, stats[:3])]
        rows += n_heads * total_q
        cta_cap = (256, 24)[case % 2]
        got, stats = pool_emulate(scores, topk, nvp, fb, fe, cap, group_cap, cta_cap)
        assert torch.equal(got, want), f"case {case} (CTA form, cap {cta_cap}): {kind} topk={topk} K={n_blocks}"
        cta_fallbacks += stats[3]
        cta_rows += n_heads * total_q if topk - fb - fe > 0 else 0
        got, stats = pool_emulate(scores, topk, nvp, fb, fe, cap, group_cap, records=True)
        assert torch.equal(got, want), f"case {case} (records form, cap {cap}): {kind} topk={topk} K={n_blocks}"
        rec = [a + b for a, b in zip(rec, stats[4:])]
    assert min(totals) > 0 and rows > 3 * totals[2], (totals, rows)
    assert 0 < cta_fallbacks < cta_rows, (cta_fallbacks, cta_rows)
    assert min(rec) > 0 and rec[0] < cta_rows // 2, (rec, cta_rows)


def test_pool_emulated_bench_shapes(pool_emulate):
    """1M decode (K = 8192) at the kernel's caps: iid rows select directly; rows whose best blocks sit together
    (random walk, ascending, 100 good recent blocks) keep the group bound but hold more than 64 candidates in their few
    good groups (the candidate refinement: one group of 16 holds many); rows periodic in 32 blocks (768 good blocks in
    every other group) mostly refine the group bound; all exact, none through the rounds. The CTA form (cap 256) takes
    every one of these rows directly (no refinement, no fallback to the warp form). The records form: iid rows from
    the records alone; recent / ascending / walk rows gather their whole groups (more than 4 of them: bounded by the
    records' M-th largest key, no refinement); most periodic rows (more than 32 candidate groups) and rows of values a
    few ulps apart (straddled buckets) fall back to the warp form."""
    gen = torch.Generator().manual_seed(61)
    for kind in ("randn", "walk", "ascending", "periodic", "recent", "ulps"):
        if kind == "recent":
            x = _decode_rows("randn", 8192, 16, gen) + 8.0 * (torch.arange(8192) >= 8192 - 100).float().view(1, -1, 1)
        else:
            x = _decode_rows(kind, 8192, 16, gen)
        want = reference(x, 16, force_end_blocks=1)
        got, stats = pool_emulate(x, 16, None, 0, 1)
        assert torch.equal(got, want), kind
        assert stats[2] == 0, (kind, stats)
        if kind == "randn":
            assert stats[:4] == [0, 0, 0, 0], (kind, stats)
        elif kind == "periodic":
            assert stats[0] > 0, (kind, stats)
        elif kind in ("ascending", "recent"):
            assert stats[1] == 16, (kind, stats)
        got, stats = pool_emulate(x, 16, None, 0, 1, cta_cap=256)
        assert torch.equal(got, want) and stats[:4] == [0, 0, 0, 0], (kind, stats)
        got, stats = pool_emulate(x, 16, None, 0, 1, records=True)
        assert torch.equal(got, want), (kind, stats)
        expect = {"randn": [0, 0, 0], "ascending": [0, 16, 0]}
        if kind in expect:
            assert stats[4:] == expect[kind], (kind, stats)
        elif kind == "ulps":  # a straddled bucket in nearly every row
            assert stats[4] >= 12 and stats[5] == 0, (kind, stats)
        elif kind == "recent":  # 7 whole groups + ~24 record groups: a row past the 32-group cap now and then; the
            # whole groups (112 values) bounded by the records' M-th largest key: no refinement
            assert stats[4] <= 2 and stats[4] + stats[5] == 16 and stats[6] == 0, (kind, stats)
        elif kind == "periodic":  # ~33 candidate groups of 3 good blocks: most rows past the 32-group cap
            assert 0 < stats[4] < 16 and stats[5] == 0, (kind, stats)
        else:  # walk: whole groups gathered in most rows, never the fallback
            assert stats[4] == 0 and stats[5] > 8, (kind, stats)
        got, stats = pool_emulate(x.bfloat16(), 16, None, 0, 1, records=True)  # bf16 buckets are the values
        assert torch.equal(got, reference(x.bfloat16(), 16, force_end_blocks=1)), (kind, "bf16")
    x = _decode_rows("lanes", 8192, 16, gen)  # 256 < candidates <= 1024: the kernel's (cap 1024) M-th-largest step
    assert torch.equal(pool_emulate(x, 16, None, 0, 1)[0], reference(x, 16, force_end_blocks=1))
    got, stats = pool_emulate(x, 16, None, 0, 1, cta_cap=1024)
    assert torch.equal(got, reference(x, 16, force_end_blocks=1)) and stats[3] == 0, stats
    assert pool_emulate(x, 16, None, 0, 1, cta_cap=256)[1][3] == 16  # past 256 at cap 256: the warp form


def test_net_sort16_all_01_inputs(net_emulate):
    """0-1 principle for the hard-coded 16-input sort and the top-16 merge (through random float lists)."""
    gen = torch.Generator().manual_seed(32)
    for kind in ("randn", "ties"):
        scores = make_scores(kind, 1, 64, 500, torch.float32, gen)
        want = reference(scores, 16)
        assert torch.equal(net_emulate(scores, 16, None, 0, 0, lanes=1, v=64), want)
        assert torch.equal(net_emulate(scores, 16, None, 0, 0, lanes=4, v=16), want)


# ---------------------------------------------------------------------------------------------------------------
# compile-only: both archs


@pytest.mark.compile
@pytest.mark.slow
@pytest.mark.parametrize("arch,sm", [("sm_90a", 90), ("sm_100a", 100)])
def test_module_builds_for_arch(arch, sm, module_arch_check):
    from msa.core.kernels import topk

    module_arch_check(built_module(topk.spec, arch), arch, sm)


def test_plan_shapes(monkeypatch):
    from msa.core.kernels.topk import (
        ROW_SMEM_BUDGET,
        SMEM_LIMIT,
        block_capacity,
        block_smem_bytes,
        cluster_smem_bytes,
        column_capacity,
        plan,
        reg_smem_bytes,
        row_smem_bytes,
        smem_bytes,
        threads_per_row_for,
    )

    for m in range(0, 65):
        assert column_capacity(m) >= m + 17
        p = threads_per_row_for(m)
        assert p >= m and block_capacity(m, p) >= m + p
        assert block_smem_bytes(8, p, block_capacity(m, p)) <= 227 * 1024
    for n_heads, n_blocks, total_q in ((4, 8192, 4096), (1, 1024, 4096), (4, 1024, 64), (1, 64, 64), (4, 8192, 64),
                                       (1, 64, 4096), (3, 5000, 300)):
        for m in (1, 15, 33, 64):
            p = plan(n_heads, n_blocks, total_q, m, 132)
            assert p.splits >= 1
            if p.path in ("coop", "tcoop"):  # 128K-like decode rows, M <= 16
                assert total_q * n_heads < 16 * 132 and 256 < n_blocks <= 1024 and 0 < m <= 16
                assert (1 << p.log_g, p.warps) in COOP_SHAPES and p.cap == 64
                assert p.path == "coop" or (2 * total_q * n_heads <= 132 and total_q >= 32 and (p.log_g, p.warps) == (0, 8))
                continue
            if p.path == "net":  # short prefill rows, M <= 16
                assert total_q * n_heads >= 16 * 132 and n_blocks <= 64 and 0 < m <= 16
                assert p.threads_per_row in (1, 2, 4, 8, 16, 32) and p.values_per_thread in (16, 32, 64)
                assert p.threads_per_row * p.values_per_thread >= n_blocks and 1 <= p.warps <= 8
                continue
            if p.path == "reg":  # rows in registers: K <= 256
                assert n_blocks <= 256 and 0 < m <= 64
                assert p.threads_per_row in (4, 8, 16, 32) and p.values_per_thread in (2, 4, 8, 16, 32)
                assert p.threads_per_row * p.values_per_thread >= n_blocks and p.cap >= m and 1 <= p.warps <= 8
                assert reg_smem_bytes(p.warps, p.threads_per_row, p.cap) <= 227 * 1024
                continue
            if p.path == "pool":  # decode rows of 256K-2M context, >= 64 rows, M <= 16: max-pool + a warp per row
                assert 1024 < n_blocks <= 16384 and 64 <= total_q * n_heads < 16 * 132 and 0 < m <= 16
                continue
            if p.path == "cluster":  # few long rows: K split over <= 8 CTAs of a cluster
                assert n_blocks >= 8192 and total_q * n_heads <= 512 and 0 < m <= 64
                assert 1 <= p.slices <= 8 and p.warps >= 1 << p.log_g and p.cap >= m
                assert cluster_smem_bytes(n_blocks, 1 << p.log_g, p.slices, p.cap) <= 112 * 1024
                continue
            if p.path == "row":  # rows of up to 2048 blocks (8192 for decode-like shapes), M <= 64
                assert n_blocks <= (8192 if total_q * n_heads < 16 * 132 else 2048) and 0 < m <= 64
                assert p.splits == 1
                assert row_smem_bytes(n_blocks, 1 << p.log_g, p.cap) <= 112 * 1024 and p.cap >= m
                assert p.warps >= 1 << p.log_g and p.warps <= 32
                continue
            assert p.path in ("block", "warp")
            if p.path == "warp":
                assert n_blocks <= 128
                continue
            n_threads = (1 << p.log_g) * p.threads_per_row
            assert n_threads <= 1024 and n_threads % 32 == 0
            assert p.values_per_thread in (16, 32) and (p.values_per_thread == 16 or n_threads <= 256)
            assert p.cap >= m + p.threads_per_row
    # 8K prefill H1 / H4: net, 4 lanes x 16 values per row, 8 tokens per warp, one warp per CTA (H100 session 6:
    # 3.72 / 6.07 us vs P2 V32 4.06 / 7.61, P1 V64 5.04 / 9.61)
    for n_heads in (1, 4):
        p = plan(n_heads, 64, 4096, 15, 132)
        assert (p.path, p.threads_per_row, p.values_per_thread, p.warps) == ("net", 4, 16, 1)
    # 128K decode: coop; one row per 8-warp CTA while the rows leave half the SMs free (as tcoop: the loads spread
    # over clusters of 8; H200 session 18), two rows per 16-warp CTA while those fit one per SM, then four rows per
    # 16-warp CTA, else two rows per 8-warp CTA (H200 session 8)
    for n_heads, total_q, g, w in ((1, 64, 1, 8), (4, 64, 2, 16), (4, 128, 4, 16), (2, 64, 2, 16), (1, 66, 1, 8),
                                   (1, 67, 2, 16), (8, 128, 2, 8)):
        p = plan(n_heads, 1024, total_q, 15, 132)
        path = "tcoop" if 2 * n_heads * total_q <= 132 and total_q >= 32 else "coop"
        assert (p.path, 1 << p.log_g, p.warps) == (path, g, w), (n_heads, total_q)
        monkeypatch.setenv("MSA_TOPK_TCOOP", "0")  # without it: coop everywhere
        p = plan(n_heads, 1024, total_q, 15, 132)
        assert (p.path, 1 << p.log_g, p.warps) == ("coop", g, w), (n_heads, total_q)
        monkeypatch.delenv("MSA_TOPK_TCOOP")
    monkeypatch.setenv("MSA_TOPK_COOP", "0")  # without it: net, one warp per row (32 lanes x 32 values)
    for n_heads in (1, 4):
        p = plan(n_heads, 1024, 64, 15, 132)
        assert (p.path, p.threads_per_row, p.values_per_thread, p.warps) == ("net", 32, 32, 1)
    monkeypatch.delenv("MSA_TOPK_COOP")
    monkeypatch.setenv("MSA_TOPK_PATH", "coop")
    monkeypatch.setenv("MSA_TOPK_G", "4")
    monkeypatch.setenv("MSA_TOPK_WARPS", "4")
    with pytest.raises(ValueError, match="coop path"):
        plan(1, 1024, 64, 15, 132)
    monkeypatch.setenv("MSA_TOPK_WARPS", "16")
    assert (plan(1, 1024, 64, 15, 132).log_g, plan(1, 1024, 64, 15, 132).warps) == (2, 16)
    with pytest.raises(ValueError, match="coop: not applicable"):
        plan(1, 2048, 64, 15, 132)
    for name in ("MSA_TOPK_PATH", "MSA_TOPK_G", "MSA_TOPK_WARPS"):
        monkeypatch.delenv(name)
    assert plan(4, 1024, 64, 17, 132).path == "row"  # M > 16: the row path as before
    assert plan(4, 256, 64, 15, 132).path == "reg"  # K <= 256 decode: reg
    assert plan(4, 2048, 64, 15, 132).path == "pool"  # K > 1024 decode, 256 rows: pool (session 19)
    assert plan(4, 2048, 64, 17, 132).path == "row"  # M > 16: the row path as before
    assert plan(1, 32, 4096, 15, 132).threads_per_row == 2 and plan(1, 32, 4096, 15, 132).values_per_thread == 16
    assert plan(4, 64, 4096, 17, 132).path == "reg"  # M > 16: no net path
    monkeypatch.setenv("MSA_TOPK_NET", "0")  # the reg shapes measured best on the H100 (session 5)
    p = plan(4, 64, 4096, 15, 132)
    assert (p.path, p.threads_per_row, p.values_per_thread) == ("reg", 8, 8)
    p = plan(1, 64, 4096, 15, 132)
    assert (p.path, p.threads_per_row, p.values_per_thread) == ("reg", 16, 4)
    assert plan(4, 1024, 64, 15, 132).path == "row"  # 128K decode without net: the row path (faster than reg)
    monkeypatch.delenv("MSA_TOPK_NET")
    assert plan(1, 64, 64, 15, 132).path == "reg" and plan(1, 64, 64, 15, 132).threads_per_row == 32  # 8K decode
    monkeypatch.setenv("MSA_TOPK_PATH", "net")
    monkeypatch.setenv("MSA_TOPK_LANES", "4")
    p = plan(1, 64, 64, 15, 132)
    assert (p.path, p.threads_per_row, p.values_per_thread) == ("net", 4, 16)
    with pytest.raises(ValueError, match="net: not applicable"):
        plan(1, 64, 64, 17, 132)
    monkeypatch.setenv("MSA_TOPK_V", "32")
    with pytest.raises(ValueError, match="MSA_TOPK_LANES"):
        plan(1, 1000, 64, 15, 132)
    for name in ("MSA_TOPK_PATH", "MSA_TOPK_LANES", "MSA_TOPK_V"):
        monkeypatch.delenv(name)
    assert plan(1, 1024, 4096, 15, 132).path == "row"  # 128K prefill: staged rows, one warp per row
    assert plan(1, 1024, 4096, 15, 132).log_g == 4  # 16 tokens per CTA
    assert plan(1, 1536, 4096, 15, 132).log_g == 3  # 16 staged rows of 1536 would exceed the two-CTA budget
    assert plan(4, 1791, 4096, 15, 132).log_g == 3 and plan(4, 1792, 4096, 15, 132).log_g == 4
    p = plan(1, 2048, 4096, 15, 132)  # 256K prefill: 16 rows of 2048 per CTA, one CTA per SM (session 22)
    assert (p.path, p.log_g, p.warps) == ("row", 4, 16)
    assert row_smem_bytes(2048, 16, p.cap) > ROW_SMEM_BUDGET and row_smem_bytes(2048, 16, p.cap) <= SMEM_LIMIT
    assert plan(4, 2048, 64, 17, 132).log_g == 1  # decode keeps its shape
    # block path, prefill rows longer than 1024: V = 32 (three CTAs per SM) past 4 CTAs per SM of grid, else V = 16
    # with the next chunk prefetched (session 22)
    assert plan(4, 8192, 4096, 15, 132).values_per_thread == 32 and plan(1, 8192, 4096, 15, 132).values_per_thread == 16
    assert plan(4, 4096, 1024, 15, 132).values_per_thread == 16  # 512 CTAs
    assert plan(4, 8192, 4096, 33, 132).values_per_thread == 16  # P = 64: 512 threads, past the V = 32 bound
    assert plan(4, 4096, 64, 15, 132).path == "pool"  # 512K decode, many rows: pool (session 19; row before)
    monkeypatch.setenv("MSA_TOPK_POOL", "0")
    assert plan(4, 4096, 64, 15, 132).path == "row"  # without it: row (cluster unmeasured there)
    monkeypatch.delenv("MSA_TOPK_POOL")
    assert plan(1, 4096, 64, 15, 132).path == "pool"  # 512K decode H1: pool records (session 21; ccoop before)
    assert plan(1, 4096, 16, 15, 132).path == "ccoop"  # few rows: ccoop (4 slices x 4 clusters)
    monkeypatch.setenv("MSA_TOPK_REG", "0")  # the previous default plan (A/B switch)
    assert plan(4, 64, 4096, 15, 132).path == "warp"  # many short rows
    assert plan(4, 1024, 64, 15, 132).path == "row"  # 128K decode: the row path measured faster (H100)
    assert plan(4, 512, 64, 15, 132).path == "row" and plan(4, 512, 64, 15, 132).warps == 8  # 64K decode
    monkeypatch.delenv("MSA_TOPK_REG")
    monkeypatch.setenv("MSA_TOPK_PATH", "reg")
    monkeypatch.setenv("MSA_TOPK_LANES", "8")
    monkeypatch.setenv("MSA_TOPK_V", "4")
    with pytest.raises(ValueError, match="MSA_TOPK_V"):
        plan(2, 100, 50, 15, 132)
    with pytest.raises(ValueError, match="MSA_TOPK_LANES"):
        plan(2, 1000, 50, 15, 132)
    monkeypatch.setenv("MSA_TOPK_V", "32")
    monkeypatch.setenv("MSA_TOPK_CAP", "20")
    p = plan(2, 100, 50, 15, 132)
    assert (p.path, p.threads_per_row, p.values_per_thread, p.cap) == ("reg", 8, 32, 20)
    with pytest.raises(ValueError, match="reg: not applicable"):
        plan(2, 2000, 50, 15, 132)
    for name in ("MSA_TOPK_PATH", "MSA_TOPK_LANES", "MSA_TOPK_V", "MSA_TOPK_CAP"):
        monkeypatch.delenv(name)
    assert plan(1, 1024, 4096, 65, 132).path == "block"  # M > 64: no row or cluster path
    assert plan(4, 8192, 64, 15, 132).path == "pool"  # 1M decode H4: pool (test_pool_plan_env)
    assert plan(1, 16384, 64, 15, 132).path == "pool"  # 2M decode
    monkeypatch.setenv("MSA_TOPK_POOL", "0")  # the cluster path's shapes where pool is the default
    p = plan(4, 8192, 64, 15, 132)  # 1M decode H4: 8 slices x 8 tokens x 4 heads = 256 CTAs
    assert (p.path, p.slices, p.log_g, p.warps) == ("cluster", 8, 3, 8)
    assert p.flags == 0  # the default kernel
    assert plan(1, 8192, 64, 15, 132).path == "ccoop"  # 1M decode H1: ccoop (test_ccoop_plan_env)
    monkeypatch.setenv("MSA_TOPK_CCOOP", "0")  # without it: the cluster path
    p = plan(1, 8192, 64, 15, 132)  # 1M decode H1: 8 tokens per CTA (64 CTAs), local merge + one load batch
    assert (p.path, p.slices, p.log_g, p.warps, p.flags) == ("cluster", 8, 3, 8, 24)
    monkeypatch.delenv("MSA_TOPK_CCOOP")
    p = plan(1, 8192, 64, 40, 132)  # M > 32: no local merge -> the default kernel, 4 tokens per CTA (128 CTAs)
    assert (p.path, p.slices, p.log_g, p.flags) == ("cluster", 8, 2, 0)
    assert plan(1, 16384, 64, 15, 132).path == "cluster"  # 2M decode: one launch, no workspace
    monkeypatch.delenv("MSA_TOPK_POOL")
    assert plan(1, 8192, 64, 0, 132).path != "cluster"  # nothing to select: the forced rows only
    assert plan(4, 8192, 64, 0, 132).splits == 1  # fb + fe == topk: nothing to merge
    monkeypatch.setenv("MSA_TOPK_PATH", "warp")
    p = plan(4, 8192, 4096, 15, 132)  # 1M context prefill: rows alone fill the GPU
    assert p.path == "warp" and p.splits == 1 and p.warps == 4
    p = plan(4, 8192, 64, 15, 132)  # decode: K split across CTAs
    assert p.splits > 1 and p.merge_warps >= 1
    p = plan(1, 64, 4096, 15, 132)  # 8K context: one warp per 32 tokens
    assert p.warps == 1 and p.splits == 1
    assert smem_bytes(plan(4, 8192, 64, 64, 132).warps, column_capacity(64)) <= 227 * 1024
    assert plan(4, 8192, 64, 0, 132).splits == 1
    monkeypatch.setenv("MSA_TOPK_PATH", "block")
    monkeypatch.setenv("MSA_TOPK_G", "4")
    monkeypatch.setenv("MSA_TOPK_P", "64")
    monkeypatch.setenv("MSA_TOPK_SPLITS", "3")
    monkeypatch.setenv("MSA_TOPK_V", "32")
    p = plan(2, 1000, 50, 15, 132)
    assert (p.path, p.log_g, p.threads_per_row, p.splits, p.values_per_thread) == ("block", 2, 64, 3, 32)
    monkeypatch.setenv("MSA_TOPK_V", "8")
    with pytest.raises(ValueError, match="MSA_TOPK_V"):
        plan(2, 1000, 50, 15, 132)
    monkeypatch.delenv("MSA_TOPK_V")
    monkeypatch.setenv("MSA_TOPK_G", "3")
    with pytest.raises(ValueError, match="MSA_TOPK_G"):
        plan(2, 1000, 50, 15, 132)
    monkeypatch.setenv("MSA_TOPK_PATH", "fast")
    with pytest.raises(ValueError, match="MSA_TOPK_PATH"):
        plan(2, 1000, 50, 15, 132)
    monkeypatch.setenv("MSA_TOPK_PATH", "row")
    monkeypatch.setenv("MSA_TOPK_G", "4")
    monkeypatch.setenv("MSA_TOPK_WARPS", "8")
    p = plan(2, 1000, 50, 15, 132)
    assert (p.path, p.log_g, p.warps, p.splits) == ("row", 2, 8, 1)
    monkeypatch.setenv("MSA_TOPK_WARPS", "2")
    with pytest.raises(ValueError, match="MSA_TOPK_WARPS"):
        plan(2, 1000, 50, 15, 132)
    with pytest.raises(ValueError, match="row: not applicable"):
        plan(2, 1000, 50, 65, 132)
    monkeypatch.setenv("MSA_TOPK_PATH", "cluster")
    monkeypatch.setenv("MSA_TOPK_SLICES", "3")
    monkeypatch.setenv("MSA_TOPK_WARPS", "4")
    p = plan(2, 1000, 50, 15, 132)
    assert (p.path, p.log_g, p.warps, p.slices) == ("cluster", 2, 4, 3)
    monkeypatch.setenv("MSA_TOPK_SLICES", "9")
    with pytest.raises(ValueError, match="MSA_TOPK_SLICES"):
        plan(2, 1000, 50, 15, 132)
    monkeypatch.setenv("MSA_TOPK_SLICES", "2")
    monkeypatch.setenv("MSA_TOPK_WARPS", "2")
    with pytest.raises(ValueError, match="MSA_TOPK_WARPS"):
        plan(2, 1000, 50, 15, 132)
    with pytest.raises(ValueError, match="cluster: not applicable"):
        plan(2, 1000, 50, 65, 132)
    for name in ("MSA_TOPK_G", "MSA_TOPK_SLICES", "MSA_TOPK_WARPS"):
        monkeypatch.delenv(name, raising=False)
    assert plan(2, 5, 70, 0, 132).path == "cluster"  # forced: M = 0 writes the forced blocks only
    monkeypatch.delenv("MSA_TOPK_PATH")
    from msa.core.kernels.topk import cluster_flags

    monkeypatch.setenv("MSA_TOPK_CLUSTER_FLAGS", "always_exit_sync+sorted_merge")
    assert cluster_flags() == 5
    monkeypatch.setenv("MSA_TOPK_CLUSTER_FLAGS", "2")
    assert cluster_flags() == 2
    monkeypatch.setenv("MSA_TOPK_CLUSTER_FLAGS", "local_merge+one_batch")
    assert cluster_flags() == 24
    for bad in ("32", "fast"):
        monkeypatch.setenv("MSA_TOPK_CLUSTER_FLAGS", bad)
        with pytest.raises(ValueError, match="MSA_TOPK_CLUSTER_FLAGS"):
            cluster_flags()


# ---------------------------------------------------------------------------------------------------------------
# GPU


def _kernel_call(scores, topk, nvp=None, fb=0, fe=0, out=None):
    from msa.core.kernels import topk as topk_kernel

    if out is None:
        out = torch.full((scores.shape[2], scores.shape[0], topk), POISON, dtype=torch.int32, device=scores.device)
    res = topk_kernel.run(scores, topk, nvp, fb, fe, out)
    torch.cuda.synchronize()
    return res


def _check(scores, topk, nvp=None, fb=0, fe=0):
    got = _kernel_call(scores, topk, nvp, fb, fe)
    cpu_nvp = nvp.cpu() if isinstance(nvp, torch.Tensor) else nvp
    want = reference(scores.cpu(), topk, num_valid_pages=cpu_nvp, force_begin_blocks=fb, force_end_blocks=fe)
    assert not (got == POISON).any(), "unwritten output"
    if not torch.equal(got.cpu(), want):
        bad = (got.cpu() != want).any(-1).nonzero()[0].tolist()
        raise AssertionError(f"row (t, h) = {bad}: kernel {got[bad[0], bad[1]].tolist()} "
                             f"reference {want[bad[0], bad[1]].tolist()}")
    return got


def _path_applies(path: str, topk: int, n_blocks: int) -> bool:
    """The reg path serves K <= 1024, the net path K <= 2048 with topk <= 17 (M <= 16 after a forced block), the coop
    path K <= 1024 with topk <= 17, the pool path K <= 16384 with topk <= 17."""
    if path == "reg":
        return n_blocks <= 1024
    if path == "net":
        return n_blocks <= 2048 and topk <= 17
    if path in ("coop", "tcoop"):
        return n_blocks <= 1024 and topk <= 17
    if path == "pool":
        return n_blocks <= 16384 and topk <= 17
    return True


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize(
    "topk,n_blocks,path",
    [(t, k, p) for t in TOPKS for k in KS
     for p in ("block", "warp", "row", "cluster", "reg", "net", "coop", "tcoop", "pool") if _path_applies(p, t, k)],
)
def test_kernel_matches_reference(monkeypatch, topk, n_blocks, dtype, path):
    monkeypatch.setenv("MSA_TOPK_PATH", path)
    gen = torch.Generator().manual_seed(topk * 100003 + n_blocks)
    total_q = 70 if n_blocks < 16384 else 40
    case = TOPKS.index(topk) + KS.index(n_blocks)
    kind = KINDS[case % len(KINDS)]
    fb, fe = [(0, 0), (1, 1), (min(2, topk), 0), (0, min(3, topk))][case % 4]
    fe = min(fe, topk - fb)  # the contract: fb + fe <= topk
    nvp = [None, random_nvp(total_q, n_blocks, gen).cuda(), max(0, n_blocks - 3)][case % 3]
    scores = make_scores(kind, 2, n_blocks, total_q, dtype, gen).cuda()
    _check(scores, topk, nvp, fb, fe)


@pytest.mark.gpu
@pytest.mark.parametrize("kind", KINDS)
def test_kernel_data_kinds_and_forced(kind):
    gen = torch.Generator().manual_seed(100 + KINDS.index(kind))
    scores = make_scores(kind, 3, 600, 100, torch.float32, gen).cuda()
    for topk, fb, fe in ((16, 0, 1), (16, 1, 15), (7, 7, 0), (64, 3, 4), (33, 0, 33)):
        _check(scores, topk, None, fb, fe)
        _check(scores, topk, random_nvp(100, 600, gen).cuda(), fb, fe)


@pytest.mark.gpu
@pytest.mark.parametrize("total_q", [1, 4096])
def test_kernel_total_q_extremes(total_q):
    gen = torch.Generator().manual_seed(total_q)
    scores = make_scores("causal", 2, 40, total_q, torch.float32, gen).cuda()  # 40 blocks: rows 0..5119 tokens
    _check(scores, 16, None, 0, 1)
    nvp = (torch.arange(total_q, dtype=torch.int32) // 128 + 1).cuda()
    _check(scores, 16, nvp, 1, 1)


@pytest.mark.gpu
@pytest.mark.parametrize("splits,warps", [(1, 1), (1, 3), (2, 4), (5, 2), (16, 4)])
def test_kernel_launch_shapes(monkeypatch, splits, warps):
    """Warp path: launch shapes the heuristic would not pick for this size (env overrides), incl. the merge."""
    monkeypatch.setenv("MSA_TOPK_PATH", "warp")
    monkeypatch.setenv("MSA_TOPK_SPLITS", str(splits))
    monkeypatch.setenv("MSA_TOPK_WARPS", str(warps))
    gen = torch.Generator().manual_seed(splits * 10 + warps)
    for dtype in (torch.float32, torch.bfloat16):
        scores = make_scores("ties", 2, 2000, 50, dtype, gen).cuda()
        _check(scores, 64, None, 0, 0)
        _check(scores, 16, random_nvp(50, 2000, gen).cuda(), 2, 2)


@pytest.mark.gpu
@pytest.mark.parametrize("g,p,splits,v", [(1, 32, 1, 16), (1, 64, 8, 32), (2, 32, 3, 16), (4, 64, 1, 32),
                                          (8, 32, 2, 32), (8, 128, 1, 16), (16, 64, 4, 16), (32, 32, 1, 16),
                                          (8, 32, 1, 32), (1, 32, 5, 32)])
def test_block_launch_shapes(monkeypatch, g, p, splits, v):
    """Block path: tokens per CTA x threads per token x splits (env overrides), incl. the merge launch, the
    overflow rounds (ties, P < M) and long rows (many chunks per CTA)."""
    monkeypatch.setenv("MSA_TOPK_PATH", "block")
    monkeypatch.setenv("MSA_TOPK_G", str(g))
    monkeypatch.setenv("MSA_TOPK_P", str(p))
    monkeypatch.setenv("MSA_TOPK_SPLITS", str(splits))
    monkeypatch.setenv("MSA_TOPK_V", str(v))
    gen = torch.Generator().manual_seed(g * 1000 + p * 10 + splits + v)
    for dtype in (torch.float32, torch.bfloat16):
        scores = make_scores("ties", 2, 2000, 50, dtype, gen).cuda()
        _check(scores, 64, None, 0, 0)
        _check(scores, 16, random_nvp(50, 2000, gen).cuda(), 2, 2)
    scores = make_scores("randn", 1, 9000, 37, torch.float32, gen).cuda()
    _check(scores, 16, None, 0, 1)
    _check(scores, 33, random_nvp(37, 9000, gen).cuda(), 1, 0)
    scores = make_scores("nan", 3, 700, 70, torch.float32, gen).cuda()
    _check(scores, 7, 650, 0, 0)


@pytest.mark.gpu
@pytest.mark.parametrize("g,warps", [(1, 1), (1, 8), (2, 8), (4, 4), (8, 8), (16, 16), (16, 32), (2, 32)])
def test_row_launch_shapes(monkeypatch, g, warps):
    """Row path: tokens per CTA x warps per CTA (env overrides), incl. the heavy-ties fallback (ties: more
    candidates than the buffer holds), M > 32 (second-largest group values), NaN / -inf and per-token nvp."""
    monkeypatch.setenv("MSA_TOPK_PATH", "row")
    monkeypatch.setenv("MSA_TOPK_G", str(g))
    monkeypatch.setenv("MSA_TOPK_WARPS", str(warps))
    gen = torch.Generator().manual_seed(g * 100 + warps)
    k_long = 2000
    for dtype in (torch.float32, torch.bfloat16):
        scores = make_scores("ties", 2, k_long, 50, dtype, gen).cuda()
        _check(scores, 64, None, 0, 0)
        _check(scores, 16, random_nvp(50, k_long, gen).cuda(), 2, 2)
        for total_q in (77, 96):
            scores = make_scores("randn", 2, 1024, total_q, dtype, gen).cuda()
            _check(scores, 16, None, 0, 1)
            _check(scores, 48, random_nvp(total_q, 1024, gen).cuda(), 1, 1)
    for kind in ("nan", "ascending", "causal", "zeros_signed"):
        for total_q in (70, 72):
            scores = make_scores(kind, 3, 700, total_q, torch.float32, gen).cuda()
            _check(scores, 7, 650, 0, 0)
            _check(scores, 33, None, 0, 0)
            _check(scores, 16, random_nvp(total_q, 700, gen).cuda(), 1, 2)
    if g <= 2:  # long rows: 9000 blocks staged per row
        scores = make_scores("randn", 1, 9000, 37, torch.float32, gen).cuda()
        _check(scores, 16, None, 0, 1)


def _check_cluster_edge_rows(gen):
    """The cluster-path cases every launch shape / variant must pass: NaN, ascending, causal -inf tails and signed
    zeros with a scalar / no / per-token nvp, then slices past K (64-block minimum)."""
    for kind in ("nan", "ascending", "causal", "zeros_signed"):
        scores = make_scores(kind, 3, 1500, 70, torch.float32, gen).cuda()
        _check(scores, 7, 650, 0, 0)
        _check(scores, 33, None, 0, 0)
        _check(scores, 16, random_nvp(70, 1500, gen).cuda(), 1, 2)
    scores = make_scores("randn", 1, 100, 9, torch.float32, gen).cuda()
    _check(scores, 16, None, 0, 1)


@pytest.mark.gpu
@pytest.mark.parametrize("g,slices,warps", [(1, 1, 1), (1, 8, 8), (2, 8, 8), (4, 8, 8), (8, 8, 8), (8, 4, 16),
                                            (16, 8, 16), (8, 3, 8), (2, 5, 4), (32, 2, 32)])
def test_cluster_launch_shapes(monkeypatch, g, slices, warps):
    """Cluster path: tokens per CTA x CTAs per cluster (slices of K) x warps (env overrides), incl. the heavy-ties
    fallback over remote slices (ties), M > 32, NaN / -inf, per-token nvp, ranges that end inside a slice,
    slices past K, and rows owned by a CTA that stages nothing of them."""
    monkeypatch.setenv("MSA_TOPK_PATH", "cluster")
    monkeypatch.setenv("MSA_TOPK_G", str(g))
    monkeypatch.setenv("MSA_TOPK_SLICES", str(slices))
    monkeypatch.setenv("MSA_TOPK_WARPS", str(warps))
    gen = torch.Generator().manual_seed(g * 100 + slices * 10 + warps)
    for dtype in (torch.float32, torch.bfloat16):
        scores = make_scores("ties", 2, 2000, 50, dtype, gen).cuda()
        _check(scores, 64, None, 0, 0)
        _check(scores, 16, random_nvp(50, 2000, gen).cuda(), 2, 2)
        scores = make_scores("randn", 2, 8192 if g <= 8 else 2048, 64, dtype, gen).cuda()
        _check(scores, 16, None, 0, 1)
        _check(scores, 48, random_nvp(64, scores.shape[1], gen).cuda(), 1, 1)
    _check_cluster_edge_rows(gen)


@pytest.mark.gpu
@pytest.mark.parametrize("flags", ["local_merge", "one_batch", "local_merge+one_batch"])
@pytest.mark.parametrize("g,slices,warps", [(8, 8, 8), (4, 8, 8), (2, 5, 4), (1, 1, 1), (8, 3, 8)])
def test_cluster_variants(monkeypatch, flags, g, slices, warps):
    """Cluster A/B variants (MSA_TOPK_CLUSTER_FLAGS): local merge (per-slice exact top M -> owner lists through
    DSMEM, one barrier, bitonic merge tree; its local heavy-ties fallback), one load batch (32 loads in flight);
    M > 32 (the local merge falls back to the default algorithm), NaN / -inf, per-token nvp, slices past K."""
    monkeypatch.setenv("MSA_TOPK_PATH", "cluster")
    monkeypatch.setenv("MSA_TOPK_CLUSTER_FLAGS", flags)
    monkeypatch.setenv("MSA_TOPK_G", str(g))
    monkeypatch.setenv("MSA_TOPK_SLICES", str(slices))
    monkeypatch.setenv("MSA_TOPK_WARPS", str(warps))
    gen = torch.Generator().manual_seed(g * 100 + slices * 10 + warps + len(flags))
    for dtype in (torch.float32, torch.bfloat16):
        scores = make_scores("ties", 2, 2000, 50, dtype, gen).cuda()
        _check(scores, 32, None, 0, 0)  # M = 32: a full list per slice
        _check(scores, 16, random_nvp(50, 2000, gen).cuda(), 2, 2)
        scores = make_scores("randn", 4, 8192, 64, dtype, gen).cuda()
        _check(scores, 16, None, 0, 1)
        _check(scores, 1, None, 0, 0)
        _check(scores, 48, random_nvp(64, 8192, gen).cuda(), 1, 1)
    _check_cluster_edge_rows(gen)
    scores = make_scores("ties", 4, 4096, 64, torch.float32, gen).cuda()
    assert torch.equal(_check(scores, 16, None, 0, 1), _kernel_call(scores, 16, None, 0, 1))  # deterministic


# Launch-shape tests of the register paths (reg, net, coop): the same input grid, each path's own topk cases.
M16_CASES = ((16, 0, 1), (1, 0, 0), (16, 0, 0), (7, 2, 2), (20, 2, 2), (3, 1, 2))  # (topk, fb, fe), M <= 16
M16_SHAPED = ((16, 0, 1), (16, 0, 0), (20, 2, 4))


def _launch_shape_grid(gen, block_counts, kmax, cases, shaped, nvp_topk=16, scalar_topk=12, check=None):
    """fp32 / bf16 x K in block_counts x random / heavy ties / NaN-inf rows: every (topk, fb, fe) in cases, plus
    per-token nvp (nvp_topk) and a scalar nvp (scalar_topk); ascending / signed-zero / causal rows of K = kmax:
    every case in shaped with and without per-token nvp. check defaults to _check (kernel vs reference)."""
    check = check or _check
    for dtype in (torch.float32, torch.bfloat16):
        for n_blocks in block_counts:
            for kind, total_q in (("randn", 77), ("ties", 50), ("nan", 33)):
                scores = make_scores(kind, 2, n_blocks, total_q, dtype, gen).cuda()
                for topk, fb, fe in cases:
                    check(scores, topk, None, fb, fe)
                check(scores, nvp_topk, random_nvp(total_q, n_blocks, gen).cuda(), 1, 2)
                check(scores, scalar_topk, max(0, n_blocks - 2), 0, 3)
    for kind in ("ascending", "zeros_signed", "causal"):
        scores = make_scores(kind, 3, kmax, 70, torch.float32, gen).cuda()
        for topk, fb, fe in shaped:
            check(scores, topk, None, fb, fe)
            check(scores, topk, random_nvp(70, kmax, gen).cuda(), fb, fe)


REG_SHAPES = [(4, 16, 4, 0), (8, 8, 2, 0), (16, 4, 1, 0), (32, 2, 1, 0), (32, 32, 1, 0), (32, 32, 2, 20), (4, 32, 8, 0),
              (8, 32, 1, 0), (16, 16, 4, 0), (16, 32, 1, 0), (8, 16, 3, 17), (4, 8, 1, 0), (32, 8, 4, 0)]


@pytest.mark.gpu
@pytest.mark.parametrize("lanes,v,warps,cap", REG_SHAPES)
def test_reg_launch_shapes(monkeypatch, lanes, v, warps, cap):
    """Reg path: P lanes x V values per row x warps per CTA (env overrides), cap 0 = the plan's (MSA_TOPK_CAP: tight
    caps force the argmax-rounds fallback): random, heavy ties, NaN / -inf / +inf, ascending, signed zeros, causal;
    per-token / scalar / no nvp; forced head and tail; topk 1..64 (M > 32: second-largest bound); K from 1 to
    P x V (rows shorter than the lanes); total_q not a multiple of the rows per CTA; fp32 and bf16."""
    monkeypatch.setenv("MSA_TOPK_PATH", "reg")
    monkeypatch.setenv("MSA_TOPK_LANES", str(lanes))
    monkeypatch.setenv("MSA_TOPK_V", str(v))
    monkeypatch.setenv("MSA_TOPK_WARPS", str(warps))
    if cap:
        monkeypatch.setenv("MSA_TOPK_CAP", str(cap))
    gen = torch.Generator().manual_seed(lanes * 1000 + v * 10 + warps + cap)
    kmax = lanes * v

    def check(scores, topk, nvp, fb, fe):
        if not cap or topk - fb - fe <= cap:  # the plan refuses cap < M
            _check(scores, topk, nvp, fb, fe)

    _launch_shape_grid(gen, sorted({kmax, max(1, kmax - 3), max(1, kmax // 2 + 1), 5}), kmax,
                       ((16, 0, 1), (1, 0, 0), (64, 0, 0), (7, 2, 2), (48, 1, 1), (33, 0, 0)),
                       ((16, 0, 1), (32, 0, 0), (64, 3, 4)), scalar_topk=40, check=check)
    scores = make_scores("ties", 4, kmax, 64, torch.float32, gen).cuda()
    a = _check(scores, 16, None, 0, 1)
    assert torch.equal(a, _kernel_call(scores, 16, None, 0, 1))  # deterministic


@pytest.mark.gpu
@pytest.mark.parametrize("reg", ["1", "0"])
@pytest.mark.parametrize("n_heads,n_blocks,total_q", [(1, 64, 64), (4, 64, 64), (1, 1024, 64), (4, 1024, 64),
                                                     (1, 64, 4096), (4, 64, 4096), (2, 256, 1000), (3, 200, 3000)])
def test_reg_default_plan_shapes(monkeypatch, reg, n_heads, n_blocks, total_q):
    """The shapes the plan sends to the reg path (and the previous default with MSA_TOPK_REG=0): iid, ties,
    per-token nvp."""
    monkeypatch.setenv("MSA_TOPK_REG", reg)
    gen = torch.Generator().manual_seed(n_heads * n_blocks + total_q)
    scores = make_scores("randn", n_heads, n_blocks, total_q, torch.float32, gen).cuda()
    _check(scores, 16, None, 0, 1)
    _check(scores, 64, random_nvp(total_q, n_blocks, gen).cuda(), 1, 1)
    scores = make_scores("ties", n_heads, n_blocks, total_q, torch.bfloat16, gen).cuda()
    _check(scores, 16, None, 0, 1)


NET_SHAPES = [(1, 64, 1), (1, 64, 4), (2, 32, 1), (2, 32, 2), (4, 16, 1), (4, 16, 8), (8, 16, 2), (1, 32, 2),
              (1, 16, 1), (16, 64, 1), (32, 32, 1), (32, 64, 2), (8, 64, 3)]


@pytest.mark.gpu
@pytest.mark.parametrize("lanes,v,warps", NET_SHAPES)
def test_net_launch_shapes(monkeypatch, lanes, v, warps):
    """Net variant: P lanes x V values per row x warps per CTA (env overrides): random, heavy ties, NaN / -inf /
    +inf, ascending, signed zeros, causal; per-token / scalar / no nvp; forced head and tail; M 0..16; K from 1 to
    P x V; total_q not a multiple of the rows per CTA; fp32 and bf16."""
    monkeypatch.setenv("MSA_TOPK_PATH", "net")
    monkeypatch.setenv("MSA_TOPK_LANES", str(lanes))
    monkeypatch.setenv("MSA_TOPK_V", str(v))
    monkeypatch.setenv("MSA_TOPK_WARPS", str(warps))
    gen = torch.Generator().manual_seed(lanes * 1000 + v * 10 + warps + 7)
    kmax = lanes * v
    _launch_shape_grid(gen, sorted({kmax, max(1, kmax - 3), max(1, kmax // 2 + 1), 5}), kmax, M16_CASES, M16_SHAPED)
    scores = make_scores("ties", 4, kmax, 64, torch.float32, gen).cuda()
    assert torch.equal(_check(scores, 16, None, 0, 1), _kernel_call(scores, 16, None, 0, 1))  # deterministic


@pytest.mark.gpu
@pytest.mark.parametrize("tokens,warps", COOP_SHAPES)
def test_coop_launch_shapes(monkeypatch, tokens, warps):
    """Coop path: G rows x W warps per CTA (env overrides): random, heavy ties, NaN / -inf / +inf, ascending (every
    row through the net fallback), signed zeros, causal; per-token / scalar / no nvp; forced head and tail; M 0..16;
    K from 1 to 1024; total_q not a multiple of G; fp32 and bf16; deterministic."""
    monkeypatch.setenv("MSA_TOPK_PATH", "coop")
    monkeypatch.setenv("MSA_TOPK_G", str(tokens))
    monkeypatch.setenv("MSA_TOPK_WARPS", str(warps))
    gen = torch.Generator().manual_seed(tokens * 1000 + warps + 11)
    _launch_shape_grid(gen, (1024, 1021, 513, 300, 5), 1024, M16_CASES, M16_SHAPED)
    scores = make_scores("ties", 4, 1024, 64, torch.float32, gen).cuda()
    assert torch.equal(_check(scores, 16, None, 0, 1), _kernel_call(scores, 16, None, 0, 1))


@pytest.mark.gpu
def test_tcoop_launch_shapes(monkeypatch):
    """Tcoop path (MSA_TOPK_PATH=tcoop): one row per CTA, clusters of 8 CTAs sharing the loads of 8 tokens: random,
    heavy ties, NaN / -inf / +inf, ascending (every row through the net fallback), signed zeros, causal; per-token /
    scalar / no nvp; forced head and tail; M 0..16; K from 1 to 1024 (slices past K); total_q not a multiple of 8
    (clusters with rows past total_q still load for the others); H > 1; fp32 and bf16; deterministic."""
    monkeypatch.setenv("MSA_TOPK_PATH", "tcoop")
    gen = torch.Generator().manual_seed(17)
    _launch_shape_grid(gen, (1024, 1021, 513, 300, 129, 5), 1024, M16_CASES, M16_SHAPED)
    for total_q in (1, 7, 9):
        _check(make_scores("randn", 3, 1024, total_q, torch.float32, gen).cuda(), 16, None, 0, 1)
    scores = make_scores("ties", 4, 1024, 64, torch.float32, gen).cuda()
    assert torch.equal(_check(scores, 16, None, 0, 1), _kernel_call(scores, 16, None, 0, 1))


def test_tcoop_plan_env(monkeypatch):
    """tcoop is the default where coop would run one row per CTA (rows <= SMs / 2, 256 < K <= 1024, M <= 16) with
    total_q >= 32; MSA_TOPK_TCOOP=0 (or MSA_TOPK_COOP=0) turns it off; MSA_TOPK_PATH=tcoop forces it and refuses
    K > 1024 / M > 16."""
    from msa.core.kernels.topk import plan

    assert plan(1, 1024, 64, 15, 132).path == "tcoop"
    assert plan(2, 1024, 33, 15, 132).path == "tcoop"  # 66 rows = half the SMs
    assert plan(1, 1024, 32, 15, 132).path == "tcoop"
    for total_q in (1, 4, 8, 16, 31):  # few tokens: coop's one-row CTAs (measured faster there)
        p = plan(1, 1024, total_q, 15, 132)
        assert (p.path, p.log_g, p.warps) == ("coop", 0, 8), total_q
    assert plan(1, 1024, 67, 15, 132).path == "coop"
    assert plan(1, 512, 64, 15, 132).path == "tcoop"  # 64K decode
    assert plan(1, 256, 64, 15, 132).path != "tcoop"  # K <= 256: reg
    assert plan(1, 1024, 64, 17, 132).path != "tcoop"  # M > 16
    monkeypatch.setenv("MSA_TOPK_TCOOP", "0")
    p = plan(1, 1024, 64, 15, 132)
    assert (p.path, p.log_g, p.warps) == ("coop", 0, 8)
    monkeypatch.setenv("MSA_TOPK_TCOOP", "1")
    monkeypatch.setenv("MSA_TOPK_COOP", "0")
    assert plan(1, 1024, 64, 15, 132).path == "net"
    monkeypatch.delenv("MSA_TOPK_COOP")
    monkeypatch.setenv("MSA_TOPK_PATH", "tcoop")
    assert plan(8, 1024, 128, 15, 132).path == "tcoop"  # forced outside the default's range
    assert plan(1, 7, 3, 0, 132).path == "tcoop"
    with pytest.raises(ValueError, match="tcoop: not applicable"):
        plan(1, 1025, 64, 15, 132)
    with pytest.raises(ValueError, match="tcoop: not applicable"):
        plan(1, 1024, 64, 17, 132)


@pytest.mark.gpu
@pytest.mark.parametrize("tokens,warps", CCOOP_SHAPES)
def test_ccoop_launch_shapes(monkeypatch, tokens, warps):
    """Ccoop path (experimental, MSA_TOPK_PATH=ccoop): G rows per cluster of ceil(K / 1024) CTAs of W warps: random,
    heavy ties (-> the argmax-rounds fallback), NaN / -inf / +inf, ascending, signed zeros, causal; per-token / scalar
    / no nvp; forced head and tail; M 0..16; K from 1025 to 8192; total_q not a multiple of G; fp32 and bf16;
    deterministic."""
    monkeypatch.setenv("MSA_TOPK_PATH", "ccoop")
    monkeypatch.setenv("MSA_TOPK_G", str(tokens))
    monkeypatch.setenv("MSA_TOPK_WARPS", str(warps))
    gen = torch.Generator().manual_seed(tokens * 1000 + warps + 13)
    counts = [k for k in (8192, 8191, 5000, 2049, 1025) if tokens <= -(-k // 1024)]
    _launch_shape_grid(gen, counts, 8192, M16_CASES, M16_SHAPED)
    scores = make_scores("ties", 4, 8192, 64, torch.float32, gen).cuda()
    assert torch.equal(_check(scores, 16, None, 0, 1), _kernel_call(scores, 16, None, 0, 1))


def test_ccoop_plan_env(monkeypatch):
    """ccoop is the default for decode with few rows at 256K-1M context (smallest G whose grid fills <= half the SMs);
    MSA_TOPK_CCOOP=0 turns it off; MSA_TOPK_PATH=ccoop forces it: its shapes, slices and refusals. Since session 21
    the pool path's records form takes decode from 32 rows first (test_pool_plan_env): ccoop keeps fewer rows, and
    all of its shapes with MSA_TOPK_POOL_REC=0."""
    from msa.core.kernels.topk import plan

    assert plan(1, 8192, 64, 15, 132).path == "pool" and plan(1, 8192, 16, 15, 132).path == "ccoop"
    assert plan(1, 8192, 31, 15, 132).path == "ccoop" and plan(2, 8192, 16, 15, 132).path == "pool"
    monkeypatch.setenv("MSA_TOPK_POOL_REC", "0")

    def shape(*a):
        p = plan(*a)
        return p.path, 1 << p.log_g, p.warps, p.slices

    assert shape(1, 8192, 64, 15, 132) == ("ccoop", 8, 16, 8)  # 8 slices x 8 clusters = 64 CTAs
    assert shape(1, 8192, 32, 15, 132) == ("ccoop", 4, 8, 8)
    assert shape(1, 2048, 64, 15, 132) == ("ccoop", 2, 8, 2)
    assert shape(1, 5000, 1, 15, 132) == ("ccoop", 2, 8, 5)
    assert shape(1, 8192, 64, 15, 264)[:3] == ("ccoop", 4, 8)  # twice the SMs: more clusters fit
    for n_heads, n_blocks, total_q, m in ((2, 8192, 64, 15), (4, 8192, 64, 15), (1, 8192, 4096, 15),
                                          (1, 1024, 64, 15), (1, 8192, 64, 17), (1, 16384, 64, 15)):
        assert plan(n_heads, n_blocks, total_q, m, 132).path != "ccoop", (n_heads, n_blocks, total_q, m)
    assert plan(1, 1024, 64, 15, 132).path == "tcoop"
    monkeypatch.setenv("MSA_TOPK_CCOOP", "0")
    assert plan(1, 8192, 64, 15, 132).path == "pool"
    monkeypatch.setenv("MSA_TOPK_POOL", "0")
    assert plan(1, 8192, 64, 15, 132).path == "cluster"
    monkeypatch.delenv("MSA_TOPK_POOL")
    monkeypatch.delenv("MSA_TOPK_CCOOP")
    monkeypatch.setenv("MSA_TOPK_PATH", "ccoop")
    assert shape(4, 8192, 64, 15, 132) == ("ccoop", 4, 16, 8)  # forced outside the default's range: G4W16
    assert plan(4, 5000, 64, 15, 132).slices == 5
    with pytest.raises(ValueError, match="ccoop: not applicable"):
        plan(1, 1024, 64, 15, 132)
    with pytest.raises(ValueError, match="ccoop: not applicable"):
        plan(1, 8192, 64, 17, 132)
    monkeypatch.setenv("MSA_TOPK_G", "8")
    with pytest.raises(ValueError, match="tokens <= ceil"):
        plan(1, 2000, 64, 15, 132)
    monkeypatch.setenv("MSA_TOPK_WARPS", "8")
    with pytest.raises(ValueError, match="for the ccoop path"):
        plan(1, 8192, 64, 15, 132)
    monkeypatch.delenv("MSA_TOPK_POOL_REC")


@pytest.mark.gpu
@pytest.mark.parametrize("form", ["rec", "cta", "warp"])
@pytest.mark.parametrize("pdl", ["1", "0"], ids=["dependent", "plain"])
def test_pool_launch_shapes(monkeypatch, pdl, form):
    """Pool path (MSA_TOPK_PATH=pool): max-pool launch + the select launch in records form (launch 1 writes each
    group's 4 best blocks as packed keys; a warp per row ranks them, gathering only whole groups; the warp form past its
    caps or at a straddled fp32 bucket: "ulps" rows), CTA form (a row per CTA: speculative gather, the rank by warp 0
    or by the whole CTA, the warp form past 256 candidates) or warp form (a warp per row), programmatic-dependent (warp
    form: 4 rows per CTA) or plain: random, heavy ties, NaN / -inf / +inf, ascending, signed zeros, causal; per-token /
    scalar / no nvp; forced head and tail; M 0..16; K from 5 to 16384 (rows padded to 32 J groups); rows that refine
    the group bound (periodic), the candidate bound (100 good recent blocks, ascending; CTA form: ranked by the whole
    CTA; "lanes": ~670 candidates, the CTA form's exact M-th largest) or take the rounds (all equal; CTA form: through
    the warp form); total_q 1..77 (CTAs with rows past total_q); fp32 and bf16; deterministic."""
    monkeypatch.setenv("MSA_TOPK_PATH", "pool")
    monkeypatch.setenv("MSA_TOPK_POOL_PDL", pdl)
    monkeypatch.setenv("MSA_TOPK_POOL_REC", "1" if form == "rec" else "0")
    monkeypatch.setenv("MSA_TOPK_POOL_CTA", "1" if form == "cta" else "0")
    gen = torch.Generator().manual_seed(19)
    _launch_shape_grid(gen, (16384, 12345, 8192, 5000, 2049, 1025, 300, 5), 8192, M16_CASES, M16_SHAPED)
    for kind in ("randn", "walk", "ascending", "periodic", "lanes", "recent", "equal", "ulps"):
        if kind == "recent":
            x = _decode_rows("randn", 8192, 33, gen) + 8.0 * (torch.arange(8192) >= 8192 - 100).float().view(1, -1, 1)
        elif kind == "equal":
            x = torch.ones((1, 8192, 7))
        else:
            x = _decode_rows(kind, 8192, 33, gen)
        _check(x.cuda(), 16, None, 0, 1)
        _check(x.cuda(), 16, random_nvp(x.shape[2], 8192, gen).cuda(), 1, 2)
    for total_q in (1, 7, 64):
        _check(make_scores("randn", 4, 8192, total_q, torch.float32, gen).cuda(), 16, None, 0, 1)
    scores = make_scores("ties", 4, 8192, 64, torch.float32, gen).cuda()
    assert torch.equal(_check(scores, 16, None, 0, 1), _kernel_call(scores, 16, None, 0, 1))


def test_pool_plan_env(monkeypatch):
    """pool is the default for decode-like rows of 1024 < K <= 16384 blocks, M <= 16: in records form (flags bits 7
    and 4: a warp per row, one per CTA, programmatic-dependent; workspace H * total_q * pool_row_groups(K) * 4 words)
    from 32 rows, ahead of ccoop; MSA_TOPK_POOL_PDL=0 makes it plain. MSA_TOPK_POOL_REC=0 (or MSA_TOPK_POOL_CTA=1)
    restores the session-20 plan: pool with >= 64 rows where ccoop does not apply, H * total_q * pool_row_groups(K)
    words; up to 256 rows the select launch programmatic-dependent (bit 4) and, from K > 2048, in CTA form (flags bit
    6, J warps), else a warp per row (4 per CTA); above, plain, a warp per row; MSA_TOPK_POOL_CTA / MSA_TOPK_POOL_PDL
    override each (the warp form dependent: 4 rows per CTA). MSA_TOPK_POOL=0 turns pool off; MSA_TOPK_PATH=pool forces
    it and refuses K > 16384 / M > 16."""
    from msa.core.kernels.topk import plan, pool_row_groups

    for n_heads, n_blocks, total_q in ((4, 8192, 64), (2, 8192, 64), (4, 8192, 128), (4, 8192, 32), (4, 4096, 64),
                                       (2, 4096, 64), (4, 2048, 64), (1, 16384, 64), (1, 8192, 96), (1, 8192, 64),
                                       (1, 4096, 64), (1, 2048, 64), (1, 8192, 32), (4, 8192, 512)):
        p = plan(n_heads, n_blocks, total_q, 15, 132)
        assert (p.path, p.warps, p.flags) == ("pool", 1, 128 | 16), (n_heads, n_blocks, total_q)
        assert p.workspace_words(n_heads, total_q, 15, n_blocks) == n_heads * total_q * pool_row_groups(n_blocks) * 4
        assert p.workspace_words(n_heads, total_q, 0, n_blocks) == 0
    for n_heads, n_blocks, total_q, m in ((1, 8192, 31, 15), (1, 16384, 8, 15), (4, 1024, 64, 15), (4, 8192, 64, 17),
                                          (4, 8192, 4096, 15), (1, 20000, 64, 15), (4, 8192, 528, 15)):
        assert plan(n_heads, n_blocks, total_q, m, 132).path != "pool", (n_heads, n_blocks, total_q, m)
    monkeypatch.setenv("MSA_TOPK_POOL_PDL", "0")
    assert plan(1, 8192, 64, 15, 132).flags == 128  # records, plain
    monkeypatch.delenv("MSA_TOPK_POOL_PDL")

    monkeypatch.setenv("MSA_TOPK_POOL_REC", "0")  # the session-20 plan
    for n_heads, n_blocks, total_q in ((4, 8192, 64), (2, 8192, 64), (4, 8192, 128), (4, 8192, 32), (4, 4096, 64),
                                       (2, 4096, 64), (4, 2048, 64), (1, 16384, 64), (1, 8192, 96)):
        assert plan(n_heads, n_blocks, total_q, 15, 132).path == "pool", (n_heads, n_blocks, total_q)
    for n_heads, n_blocks, total_q, m in ((1, 8192, 64, 15), (1, 4096, 64, 15), (1, 2048, 64, 15), (1, 16384, 8, 15),
                                          (4, 1024, 64, 15), (4, 8192, 64, 17), (4, 8192, 4096, 15),
                                          (1, 20000, 64, 15)):
        assert plan(n_heads, n_blocks, total_q, m, 132).path != "pool", (n_heads, n_blocks, total_q, m)
    p = plan(4, 8192, 64, 15, 132)
    assert p.workspace_words(4, 64, 15, 8192) == 4 * 64 * 512 and p.workspace_words(4, 64, 0, 8192) == 0
    assert (p.warps, p.flags) == (16, 16 | 64)  # <= 256 rows: CTA form (J = 16 warps), dependent
    assert plan(4, 4096, 64, 15, 132).warps == 8 and plan(1, 16384, 64, 15, 132).warps == 32  # J warps
    assert (plan(4, 2048, 64, 15, 132).warps, plan(4, 2048, 64, 15, 132).flags) == (4, 16)  # J = 4: warp form
    p = plan(4, 8192, 128, 15, 132)
    assert (p.path, p.warps, p.flags) == ("pool", 1, 0)  # 512 rows: warp form, plain, a row per CTA

    def shape(n_heads, total_q):
        p = plan(n_heads, 8192, total_q, 15, 132)
        return p.warps, p.flags

    monkeypatch.setenv("MSA_TOPK_POOL_PDL", "0")
    assert shape(4, 64) == (16, 64)  # CTA form, plain
    monkeypatch.setenv("MSA_TOPK_POOL_CTA", "0")
    assert shape(4, 64) == (1, 0)  # warp form, plain
    monkeypatch.setenv("MSA_TOPK_POOL_PDL", "1")
    assert shape(4, 64) == (4, 16) and shape(4, 128) == (4, 16)  # warp form, dependent: 4 rows per CTA
    monkeypatch.delenv("MSA_TOPK_POOL_PDL")
    monkeypatch.setenv("MSA_TOPK_POOL_CTA", "1")
    monkeypatch.delenv("MSA_TOPK_POOL_REC")
    assert shape(4, 128) == (16, 64)  # CTA form asked for (records off) at 512 rows, plain
    monkeypatch.setenv("MSA_TOPK_PATH", "pool")
    assert plan(4, 8192, 64, 0, 132).flags == 0  # M = 0: no max-pool launch to depend on, no select to shape
    monkeypatch.delenv("MSA_TOPK_POOL_CTA")
    assert plan(4, 8192, 64, 0, 132).flags == 0 and plan(4, 8192, 64, 15, 132).flags == 144
    with pytest.raises(ValueError, match="pool: not applicable"):
        plan(4, 16385, 64, 15, 132)
    with pytest.raises(ValueError, match="pool: not applicable"):
        plan(4, 8192, 64, 17, 132)
    monkeypatch.delenv("MSA_TOPK_PATH")
    assert [pool_row_groups(k) for k in (1, 2048, 2049, 8192, 8193, 16384)] == [128, 128, 256, 512, 1024, 1024]
    monkeypatch.setenv("MSA_TOPK_POOL", "0")
    assert plan(4, 8192, 64, 15, 132).path == "cluster" and plan(1, 8192, 64, 15, 132).path == "ccoop"
    monkeypatch.delenv("MSA_TOPK_POOL")


@pytest.mark.gpu
@pytest.mark.parametrize("coop", ["1", "0"])
@pytest.mark.parametrize("n_heads,total_q", [(1, 64), (4, 64), (2, 64), (4, 128), (3, 130), (8, 128)])
def test_coop_default_plan_shapes(monkeypatch, coop, n_heads, total_q):
    """128K decode under the default plan (tcoop with few rows, else coop) and with MSA_TOPK_COOP=0 (net): iid, ties
    (bf16), per-token nvp."""
    from msa.core.kernels.topk import plan

    monkeypatch.setenv("MSA_TOPK_COOP", coop)
    want = "net" if coop == "0" else ("tcoop" if 2 * n_heads * total_q <= 132 and total_q >= 32 else "coop")
    assert plan(n_heads, 1024, total_q, 15, 132).path == want
    gen = torch.Generator().manual_seed(n_heads * 64 + total_q + int(coop))
    scores = make_scores("randn", n_heads, 1024, total_q, torch.float32, gen).cuda()
    _check(scores, 16, None, 0, 1)
    _check(scores, 16, random_nvp(total_q, 1024, gen).cuda(), 1, 1)
    scores = make_scores("ties", n_heads, 1024, total_q, torch.bfloat16, gen).cuda()
    _check(scores, 16, None, 0, 1)


@pytest.mark.gpu
@pytest.mark.parametrize("net", ["1", "0"])
@pytest.mark.parametrize("n_heads,total_q", [(1, 4096), (4, 4096), (3, 3000)])
def test_net_default_plan_shapes(monkeypatch, net, n_heads, total_q):
    """8K prefill under the default plan (net) and with MSA_TOPK_NET=0 (reg): iid, ties (bf16), per-token nvp."""
    monkeypatch.setenv("MSA_TOPK_NET", net)
    gen = torch.Generator().manual_seed(n_heads * 64 + total_q + int(net))
    scores = make_scores("randn", n_heads, 64, total_q, torch.float32, gen).cuda()
    _check(scores, 16, None, 0, 1)
    _check(scores, 16, random_nvp(total_q, 64, gen).cuda(), 1, 1)
    scores = make_scores("ties", n_heads, 64, total_q, torch.bfloat16, gen).cuda()
    _check(scores, 16, None, 0, 1)


@pytest.mark.gpu
@pytest.mark.parametrize("n_heads,n_blocks,total_q", [(1, 1024, 64), (4, 1024, 64), (1, 8192, 64), (4, 8192, 64),
                                                     (1, 1024, 4096), (4, 64, 4096), (1, 64, 4096), (2, 8192, 1500),
                                                     (1, 16384, 64), (4, 64, 64)])
def test_kernel_bench_shapes(n_heads, n_blocks, total_q):
    """The benchmark's shapes under the default plan (whatever path and launch shape it picks)."""
    gen = torch.Generator().manual_seed(n_heads * n_blocks + total_q)
    scores = make_scores("randn", n_heads, n_blocks, total_q, torch.float32, gen).cuda()
    _check(scores, 16, None, 0, 1)


@pytest.mark.gpu
@pytest.mark.parametrize("path", ["block", "row", "cluster"])
def test_kernel_deterministic_and_out_reuse(monkeypatch, path):
    monkeypatch.setenv("MSA_TOPK_PATH", path)  # decode shape: block = split + merge, row = whole rows staged,
    # cluster = K over 8 CTAs with remote appends in any order (ties: the fallback too)
    gen = torch.Generator().manual_seed(3)
    scores = make_scores("ties", 4, 4096, 64, torch.float32, gen).cuda()
    a = _kernel_call(scores, 16, None, 0, 1)
    b = _kernel_call(scores, 16, None, 0, 1)
    assert torch.equal(a, b)
    out = torch.full_like(a, POISON)
    res = _kernel_call(scores, 16, None, 0, 1, out=out)
    assert res.data_ptr() == out.data_ptr() and torch.equal(out, a)


@pytest.mark.gpu
def test_kernel_selected_beat_unselected():
    """Property check independent of any oracle: every chosen block scores >= every eligible unchosen one."""
    gen = torch.Generator().manual_seed(11)
    scores = make_scores("randn", 2, 3000, 96, torch.float32, gen).cuda()
    got = _kernel_call(scores, 32).cpu()
    s = scores.cpu().permute(2, 0, 1)  # [Q, H, K]
    idx = torch.where(got < 0, torch.full_like(got, s.shape[-1]), got).long()  # -1 -> a spare column
    chosen = torch.zeros(s.shape[:-1] + (s.shape[-1] + 1,), dtype=torch.bool).scatter_(-1, idx, True)[..., :-1]
    worst_chosen = torch.where(chosen, s, torch.full_like(s, float("inf"))).amin(-1)
    best_other = torch.where(chosen, torch.full_like(s, float("-inf")), s).amax(-1)
    assert bool((worst_chosen >= best_other).all())
    assert bool((got.diff(dim=-1) > 0).all()), "rows must be strictly ascending"
