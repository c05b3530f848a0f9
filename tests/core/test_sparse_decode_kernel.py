"""Per-token block-sparse paged decode kernel (msa.core.kernels.sparse_decode).

- CPU: the split model, the per-token limits, the dispatch gate and registration, plan workspaces.
- compile (``-m compile``): the module builds for sm_90a and sm_100a, with a cubin for each.
- GPU (``-m gpu``): ``msa.core.fmha(..., kv_block_indexes=...)`` on the kernel against the fp64 reference:
  random inputs, NaN-poisoned outputs / LSE, NaN in every pool page no request references and past every
  request's end, shuffled page tables, -1 tails (tokens with fewer than k blocks, tokens with none), blocks past
  a token's causal limit and the partially visible last block, GQA 1/4/8/16, q_len 1/3/8/16, forced splits and
  a CUDA-graph replay. Bounds: relative L2 error of O < 1.5e-2 (bf16) / 4e-3 (fp16), max abs error
  < 4e-2 / 8e-3 (|O| <~ 3 here), LSE abs error <= 2e-3 * max(1, |lse|); rows that see no key are exactly 0 with
  LSE -inf.
"""

from __future__ import annotations

import math
import os
import zlib

import msa.core as core
import pytest
import torch
from msa.core import dispatch
from msa.core.kernels import sparse_decode as sd
from msa.core.reference import fmha_reference
from msa_core_testutil import built_module, need_kernel

# ---------------------------------------------------------------------------------------------------------------
# CPU


def test_choose_splits_shapes():
    # M3 decode, batch 32, q_len 1: 128 (token, KV head) pairs on 132 SMs: one CTA per SM already streams at the
    # SM's share of HBM bandwidth (H100: 86% of copy unsplit vs 80% at 2 splits) -> no split
    assert sd.choose_splits(32 * 4, 16, 16, 132) == 1
    assert sd.choose_splits(4 * 4, 16, 16, 132) > 1  # batch 4: 16 CTAs would leave most SMs idle
    # batch 128, q_len 8: 4096 pairs already fill 15 waves -> no split (no combine traffic)
    assert sd.choose_splits(128 * 8 * 4, 16, 16, 132) == 1
    for pairs in (1, 4, 37, 128, 500, 4096):
        for k in (1, 2, 7, 16, 33, 64, 65, 200):
            s = sd.choose_splits(pairs, k, 16, 132)
            bps = -(-k // s)
            assert 1 <= s <= k and bps <= sd.MAX_BLOCKS_PER_SPLIT and (s - 1) * bps < k, (pairs, k, s)
    assert sd.choose_splits(1, 16, 16, 132) > 1  # a single decode token spreads over the SMs
    # fp8 K/V (block_cost 0.5): batch 16 q_len 1 splits (H200: 27.0 us unsplit vs 19.1 at 2), batch 32+ does not
    assert sd.choose_splits(16 * 4, 16, 16, 132, block_cost=0.5) == 2
    assert sd.choose_splits(32 * 4, 16, 16, 132, block_cost=0.5) == 1


def test_plan_follows_the_kv_element_size(monkeypatch):
    """run() keeps one cached plan per FmhaPlan and re-plans when the K/V element size changes (fp8 <-> 16-bit)."""
    class FakeModule:
        def sparse_decode(self, *args):
            pass

    monkeypatch.setattr(sd, "load_module", lambda device, n_stages=sd.STAGES: FakeModule())
    monkeypatch.delenv("MSA_SPARSE_DECODE_SPLITS", raising=False)
    plan = core.fmha_plan([1] * 16, [3000] * 16, 64, 4, page_size=128, kv_block_num=16)
    q = torch.randn(16, 64, 128, dtype=torch.bfloat16)
    kv = torch.randn(30, 4, 128, 128, dtype=torch.bfloat16)
    idx = torch.zeros(plan.num_pages, dtype=torch.int32)
    blocks = torch.zeros(16, 4, 16, dtype=torch.int32)
    sd.run(q, kv, kv, plan, kv_indices=idx, kv_block_indexes=blocks)
    assert plan.kernel["sparse_decode"].kv_bytes == 2
    kv8 = kv.to(torch.float8_e4m3fn)
    sd.run(q, kv8, kv8, plan, kv_indices=idx, kv_block_indexes=blocks)
    dp = plan.kernel["sparse_decode"]
    assert dp.kv_bytes == 1 and dp.splits == sd.choose_splits(16 * 4, 16, 16, sd._sm_count(0) if
                                                                torch.cuda.is_available() else 132, block_cost=0.5)


def test_token_info_limits():
    p = core.fmha_plan([1, 3, 2], [300, 129, 5], 8, 2, page_size=128, kv_block_num=2)
    info = sd.token_info(p)
    # bases: kv_page_indptr [0, 3, 5]; causal limits: 300; 127, 128, 129; 4, 5
    assert info == [0, 300, 3, 127, 3, 128, 3, 129, 5, 4, 5, 5]
    p = core.fmha_plan([2], [500], 8, 2, page_size=128, kv_block_num=2, causal=False)
    assert sd.token_info(p) == [0, 500, 0, 500]
    p = core.fmha_plan([2], [500], 8, 2, page_size=128, kv_block_num=2, qo_offset=-2)
    assert sd.token_info(p) == [0, 0, 0, 0]  # query i sees keys j <= i - 2: none


def test_plan_workspace_and_override(monkeypatch):
    p = core.fmha_plan([1] * 3, [4096] * 3, 64, 4, page_size=128, kv_block_num=16)
    dp = sd.plan(p, sm_count=132)
    assert dp.splits > 1 and dp.splits * dp.blocks_per_split >= 16
    assert dp.part_o.numel() == 3 * 64 * dp.splits * 128 and dp.part_lse.numel() == 3 * 64 * dp.splits
    assert dp.tok_info.shape == (3, 2) and dp.tok_info.dtype == torch.int32
    monkeypatch.setenv("MSA_SPARSE_DECODE_SPLITS", "1")
    dp = sd.plan(p, sm_count=132)
    assert dp.splits == 1 and dp.part_o.numel() == 0
    monkeypatch.setenv("MSA_SPARSE_DECODE_SPLITS", "5")  # 16 blocks: 4 per split -> 4 splits, none empty
    dp = sd.plan(p, sm_count=132)
    assert (dp.splits, dp.blocks_per_split) == (4, 4)
    p = core.fmha_plan([2], [40000], 8, 8, page_size=128, kv_block_num=100)
    monkeypatch.setenv("MSA_SPARSE_DECODE_SPLITS", "1")
    assert sd.plan(p, sm_count=132).blocks_per_split <= 64  # k > 64 is always split
    p = core.fmha_plan([1], [128], 8, 8, page_size=64, kv_block_num=1)
    with pytest.raises(NotImplementedError, match="page_size"):
        sd.plan(p)


def test_supports_gate():
    ok = dict(dtype=torch.bfloat16, head_dim_qk=128, head_dim_v=128, page_size=128, sparse=True, gqa_ratio=16)
    assert sd.supports(**ok) == (True, "ok")
    assert sd.supports(**{**ok, "dtype": torch.float16})[0]
    assert sd.supports(**{**ok, "dtype": torch.float8_e4m3fn})[0]  # fp8 Q = K = V (output bf16)
    for bad, word in (
        ({"sparse": False}, "sparse"),
        ({"dtype": torch.float32}, "dtype"),
        ({"head_dim_qk": 64, "head_dim_v": 64}, "head dims"),
        ({"page_size": 64}, "page_size"),
        ({"page_size": None}, "page_size"),
        ({"output_maxscore": True}, "max_score"),
        ({"output_o": False}, "max_score"),
        ({"gqa_ratio": 32}, "32"),
    ):
        res, why = sd.supports(**{**ok, **bad})
        assert not res and word in why, (bad, why)


def test_registered_for_fmha():
    dispatch._load_builtin_kernels()
    names = dispatch.registered_kernels("fmha")
    assert "sparse_decode" in names and names.index("sparse_decode") > names.index("fmha_sm90")
    ok, why = sd.available(torch.device("cpu"))
    assert not ok and "CUDA" in why


def test_run_glue_passes_binding_arguments(monkeypatch):
    """run() on CPU tensors with the module replaced: the 15 arguments of the C++ binding, in order, with the
    folded scales, plan workspaces and output allocation (the GPU path differs only in the real module)."""
    calls = []

    class FakeModule:
        def sparse_decode(self, *args):
            calls.append(args)

    monkeypatch.setattr(sd, "load_module", lambda device, n_stages=sd.STAGES: FakeModule())
    monkeypatch.setenv("MSA_SPARSE_DECODE_SPLITS", "2")
    plan = core.fmha_plan([1, 2], [300, 500], 8, 2, page_size=128, kv_block_num=4)
    q = torch.randn(3, 8, 128, dtype=torch.bfloat16)
    kv = torch.randn(9, 2, 128, 128, dtype=torch.bfloat16)
    idx = torch.arange(plan.num_pages, dtype=torch.int32)
    blocks = torch.zeros(3, 2, 4, dtype=torch.int32)
    out, ms, lse = sd.run(q, kv, kv, plan, kv_indices=idx, kv_block_indexes=blocks, sm_scale=0.5, q_scale=2.0,
                          v_scale=3.0, return_lse=True)
    assert ms is None and out.shape == q.shape and lse.shape == (3, 8) and lse.dtype == torch.float32
    (args,) = calls
    assert len(args) == 17
    dp = plan.kernel["sparse_decode"]
    assert args[5] is dp.tok_info and args[6] is out and args[7] is lse and args[8] is dp.part_o
    assert args[11:13] == (2, 2) and args[15] is True and args[16] is False
    assert args[13] == pytest.approx(1.0 * math.log2(math.e)) and args[14] == pytest.approx(3.0)
    # per-head scale tensors: the [Hq, 2] table (logit scale in log2 units, output scale) instead of the scalars
    k_scale, o_scale = torch.tensor([0.5, 4.0]), torch.arange(1.0, 9.0)
    sd.run(q, kv, kv, plan, kv_indices=idx, kv_block_indexes=blocks, sm_scale=0.5, q_scale=2.0, k_scale=k_scale,
           v_scale=torch.tensor(3.0), o_scale=o_scale)
    args = calls[-1]
    assert args[16] is True and args[10].shape == (8, 2)
    want_logit = 0.5 * 2.0 * k_scale.repeat_interleave(4) * math.log2(math.e)
    assert torch.allclose(args[10][:, 0], want_logit) and torch.allclose(args[10][:, 1], 3.0 * o_scale)
    # fp8 Q = K = V: uint8 views go in, the output is bf16
    q8, kv8 = q.to(torch.float8_e4m3fn), kv.to(torch.float8_e4m3fn)
    out8, _ = sd.run(q8, kv8, kv8, plan, kv_indices=idx, kv_block_indexes=blocks)
    args = calls[-1]
    assert out8.dtype == torch.bfloat16 and args[0].dtype == args[1].dtype == args[2].dtype == torch.uint8
    with pytest.raises(NotImplementedError, match="q / k dtypes"):
        sd.run(q8, kv, kv, plan, kv_indices=idx, kv_block_indexes=blocks)


def _swz8(row: int, piece: int) -> int:
    return row * 128 + ((piece ^ (row & 7)) << 4)


def _fp8_tile_smem(tile: torch.Tensor) -> bytearray:
    """A [16, 128] fp8 tile as the kernel's cp.async writes it: 16-byte piece p of row r at swz8(r, p)."""
    raw = tile.view(torch.uint8).reshape(16, 128)
    smem = bytearray(16 * 128)
    for lane in range(32):
        for it in range(4):
            idx = lane + it * 32
            row, piece = idx >> 3, idx & 7
            smem[_swz8(row, piece):_swz8(row, piece) + 16] = bytes(raw[row, piece * 16:(piece + 1) * 16].tolist())
    return smem


def _word(smem: bytearray, addr: int) -> int:
    return int.from_bytes(smem[addr:addr + 4], "little")


def _f16_pair(lo: float, hi: float):
    return (lo, hi)


def _e4m3_pair(two_bytes: int):
    """The kernel's e4m3x2_to_f16x2: low byte -> first element (values as Python floats; e4m3 -> f16 is exact)."""
    b = torch.tensor([two_bytes & 0xFF, (two_bytes >> 8) & 0xFF], dtype=torch.uint8).view(torch.float8_e4m3fn)
    return (float(b[0]), float(b[1]))


def _byte_perm(a: int, b: int, sel: int) -> int:
    src = a.to_bytes(4, "little") + b.to_bytes(4, "little")
    return int.from_bytes(bytes(src[(sel >> (4 * i)) & 7] for i in range(4)), "little")


def _mma_m16n8k16(a_regs, b_regs):
    """C[16, 8] of one m16n8k16 from per-lane fragments (PTX ISA layout; a register = (first, second) element)."""
    A = [[0.0] * 16 for _ in range(16)]
    B = [[0.0] * 8 for _ in range(16)]
    for lane in range(32):
        g, t = lane >> 2, lane & 3
        for reg, (row, col) in enumerate(((g, 2 * t), (g + 8, 2 * t), (g, 2 * t + 8), (g + 8, 2 * t + 8))):
            A[row][col], A[row][col + 1] = a_regs[lane][reg]
        for reg, k0 in enumerate((2 * t, 2 * t + 8)):
            B[k0][g], B[k0 + 1][g] = b_regs[lane][reg]
    return torch.tensor(A, dtype=torch.float64) @ torch.tensor(B, dtype=torch.float64)


def test_fp8_fragment_orders_replayed_on_cpu():
    """The fp8 K/V path's lane addressing (sparse_decode_kernel.cuh, kKvFp8Q), replayed step by step: Q / K fragments
    in the permuted head-dim order give S = Q K^T, P / V fragments with the permuted output dims give O = P V once
    the warp merge's dim map (32u + 8q + 4e + w) is applied -- for every lane, k-step and n-tile."""
    gen = torch.Generator().manual_seed(3)
    q = (torch.randn(16, 128, generator=gen) * 2).to(torch.float8_e4m3fn)  # 16 query rows (G = 16)
    k = (torch.randn(16, 128, generator=gen) * 2).to(torch.float8_e4m3fn)  # one 16-key chunk
    v = (torch.randn(16, 128, generator=gen) * 2).to(torch.float8_e4m3fn)
    q_s, k_s, v_s = _fp8_tile_smem(q), _fp8_tile_smem(k), _fp8_tile_smem(v)
    # Q fragments qa[ks][reg]
    qa = [[[None] * 4 for _ in range(8)] for _ in range(32)]
    for lane in range(32):
        r, q4 = lane >> 2, lane & 3
        for g in range(2):
            for half in range(2):
                base = _swz8(r + 8 * half, 4 * g + q4)
                for j in range(4):
                    w = _word(q_s, base + 4 * j)
                    qa[lane][4 * g + j][half] = _e4m3_pair(w)
                    qa[lane][4 * g + j][2 + half] = _e4m3_pair(w >> 16)
    s = torch.zeros(16, 16, dtype=torch.float64)
    for nt in range(2):
        for g in range(2):
            for j in range(4):
                b_regs = []
                for lane in range(32):
                    r, q4 = lane >> 2, lane & 3
                    w = _word(k_s, _swz8(nt * 8 + r, 4 * g + q4) + 4 * j)
                    b_regs.append((_e4m3_pair(w), _e4m3_pair(w >> 16)))
                s[:, nt * 8:(nt + 1) * 8] += _mma_m16n8k16([qa[ln][4 * g + j] for ln in range(32)], b_regs)
    assert torch.allclose(s, q.double() @ k.double().t(), rtol=0, atol=1e-9)
    # P fragments from S accumulators (any values: use S scaled), V fragments, O dim map
    p = torch.randn(16, 16, generator=gen, dtype=torch.float64)
    pa = []
    for lane in range(32):
        g, t = lane >> 2, lane & 3
        pa.append([(p[g, 2 * t].item(), p[g, 2 * t + 1].item()), (p[g + 8, 2 * t].item(), p[g + 8, 2 * t + 1].item()),
                   (p[g, 8 + 2 * t].item(), p[g, 9 + 2 * t].item()),
                   (p[g + 8, 8 + 2 * t].item(), p[g + 8, 9 + 2 * t].item())])
    o = torch.zeros(16, 128, dtype=torch.float64)
    for u in range(4):
        tiles = [[None] * 32 for _ in range(4)]
        for lane in range(32):
            r, q4 = lane >> 2, lane & 3
            piece, within = 2 * u + (r >> 2), (r & 3) * 4
            a, b, c, d = (_word(v_s, _swz8(row, piece) + within) for row in (2 * q4, 2 * q4 + 1, 2 * q4 + 8,
                                                                             2 * q4 + 9))
            ab_lo, ab_hi = _byte_perm(a, b, 0x5140), _byte_perm(a, b, 0x7362)
            cd_lo, cd_hi = _byte_perm(c, d, 0x5140), _byte_perm(c, d, 0x7362)
            for w, (x, y) in enumerate(((ab_lo, cd_lo), (ab_lo >> 16, cd_lo >> 16), (ab_hi, cd_hi),
                                        (ab_hi >> 16, cd_hi >> 16))):
                tiles[w][lane] = (_e4m3_pair(x), _e4m3_pair(y))
        for w in range(4):
            c_tile = _mma_m16n8k16(pa, tiles[w])  # [16 rows, 8 fragment columns]
            for lane in range(32):
                g, q4 = lane >> 2, lane & 3
                for e in range(2):
                    col = u * 32 + 8 * q4 + w + 4 * e  # the merge's map of fragment column 2q + e
                    o[g, col] = c_tile[g, 2 * q4 + e]
                    o[g + 8, col] = c_tile[g + 8, 2 * q4 + e]
    assert torch.allclose(o, p @ v.double(), rtol=0, atol=1e-9)


def test_jit_specs_hook():
    assert [s.arch for s in sd.jit_specs({"dtypes": ["bf16"], "head_dim": [128]}, "sm_90a")] == ["sm_90a"]
    assert sd.jit_specs({"dtypes": ["bf16"], "head_dim": [64]}, "sm_90a") == []
    # one module serves every dtype (fp8 K/V included): an fp8-only preset builds it too
    assert [s.arch for s in sd.jit_specs({"dtypes": ["fp8"], "head_dim": [128]}, "sm_100a")] == ["sm_100a"]
    assert sd.jit_specs({"dtypes": ["fp32"], "head_dim": [128]}, "sm_90a") == []


@pytest.mark.compile
@pytest.mark.slow
@pytest.mark.parametrize("arch,sm", [("sm_90a", 90), ("sm_100a", 100)])
def test_module_builds_for_arch(arch, sm, module_arch_check):
    module_arch_check(built_module(sd.spec, arch), arch, sm)


# ---------------------------------------------------------------------------------------------------------------
# GPU


def make_case(qo_lens, kv_lens, hq, hkv, topk, dtype, causal, seed, empty_rows=True, device="cuda"):
    """Paged K/V in a shuffled pool with NaN everywhere no request may read, and per-token block lists."""
    gen = torch.Generator().manual_seed(seed)
    plan = core.fmha_plan(qo_lens, kv_lens, hq, hkv, page_size=128, causal=causal, kv_block_num=topk,
                          device=device)
    n_pages = plan.num_pages
    pool = n_pages + 5
    k = torch.full((pool, hkv, 128, 128), float("nan"))
    v = torch.full((pool, hkv, 128, 128), float("nan"))
    kv_indices = torch.randperm(pool, generator=gen)[:n_pages].to(torch.int32)
    for b, kl in enumerate(kv_lens):
        for j in range(-(-kl // 128)):
            page = int(kv_indices[plan.kv_page_indptr_host[b] + j])
            n = min(128, kl - j * 128)  # past the request's end stays NaN
            k[page, :, :n] = torch.randn(hkv, n, 128, generator=gen)
            v[page, :, :n] = torch.randn(hkv, n, 128, generator=gen)
    total_q = plan.total_q
    blocks = torch.full((total_q, hkv, topk), -1, dtype=torch.int32)
    t = 0
    for ql, kl in zip(qo_lens, kv_lens):
        nb = -(-kl // 128)
        for _ in range(ql):
            for h in range(hkv):
                r = torch.rand((), generator=gen).item()
                if empty_rows and r < 0.05:
                    continue  # all -1: the token sees nothing through this KV head
                n_sel = min(nb, topk) if r < 0.5 else int(torch.randint(1, min(nb, topk) + 1, (), generator=gen))
                pick = torch.randperm(nb, generator=gen)[:n_sel]
                if r < 0.8:  # the local block (partially visible / past the causal limit for early tokens)
                    pick[0] = nb - 1
                pick = torch.unique(pick)
                blocks[t, h, : len(pick)] = pick.to(torch.int32)
            t += 1
    q = torch.randn(total_q, hq, 128, generator=gen)
    return plan, q.to(device, dtype), k.to(device, dtype), v.to(device, dtype), kv_indices.to(device), blocks.to(device)


def reference(plan, q, k, v, kv_indices, blocks, sm_scale=None):
    o, _, lse = fmha_reference(q, k, v, qo_lens=plan.qo_lens, kv_lens=plan.kv_lens, page_size=128,
                               kv_indices=kv_indices, causal=plan.causal, kv_block_indexes=blocks, sm_scale=sm_scale,
                               return_lse=True, compute_dtype=torch.float64, out_dtype=torch.float64)
    return o, lse


def check(out, lse, ref_o, ref_lse, dtype):
    assert not torch.isnan(out).any(), "NaN in the output (unwritten poisoned elements or NaN pages read)"
    assert not torch.isnan(lse).any(), "NaN in the LSE"
    dead = torch.isinf(ref_lse)
    assert torch.equal(torch.isinf(lse) & (lse < 0), dead), "LSE must be -inf exactly where a row sees no key"
    assert (out[dead] == 0).all(), "rows that see no key must output 0"
    o = out.double()
    rel = ((o - ref_o).norm() / ref_o.norm().clamp_min(1e-6)).item()
    bound, abs_bound = (1.5e-2, 4e-2) if dtype == torch.bfloat16 else (4e-3, 8e-3)
    assert rel < bound, f"rel L2 error {rel:.3e} >= {bound}"
    err = (o - ref_o).abs().max().item()
    assert err < abs_bound, f"max abs error {err:.3e} >= {abs_bound}"
    live = ~dead
    if live.any():
        e = (lse[live].double() - ref_lse[live]).abs()
        assert (e <= 2e-3 * ref_lse[live].abs().clamp_min(1.0)).all(), f"LSE max err {e.max().item():.3e}"


def _need_kernel():
    need_kernel(sd)


# (name, qo_lens, kv_lens, hq, hkv, topk, dtype, causal)
CASES = [
    ("decode-gqa16-k16", [1] * 6, [5000, 128, 300, 20000, 1, 2049], 64, 4, 16, torch.bfloat16, True),
    ("mtp8-gqa16-k16", [8, 8, 3], [3000, 1030, 700], 32, 2, 16, torch.bfloat16, True),
    ("mtp16-gqa16", [16, 1], [4000, 900], 16, 1, 8, torch.bfloat16, True),
    ("q3-gqa8-k7", [3, 3, 1], [2000, 129, 640], 16, 2, 7, torch.bfloat16, True),
    ("gqa4-k1", [1, 2, 3], [1000, 500, 260], 16, 4, 1, torch.bfloat16, True),
    ("gqa1-k64", [1, 2], [9000, 16000], 4, 4, 64, torch.bfloat16, True),
    ("k100-split", [2, 1], [20000, 13000], 16, 2, 100, torch.bfloat16, True),
    ("noncausal-q8", [8, 1], [1500, 333], 64, 4, 16, torch.bfloat16, False),
    ("fp16-decode", [1] * 4, [3000, 129, 7000, 256], 64, 4, 16, torch.float16, True),
    ("fp16-mtp-noncausal", [3, 16], [900, 4100], 32, 4, 12, torch.float16, False),
    # fp8 e4m3 Q = K = V (f16 MMAs on converted fragments, output bf16): decode, MTP, GQA 1 with a split
    ("fp8-decode-gqa16", [1] * 6, [5000, 128, 300, 20000, 1, 2049], 64, 4, 16, torch.float8_e4m3fn, True),
    ("fp8-mtp8-noncausal", [8, 3], [3000, 700], 32, 2, 16, torch.float8_e4m3fn, False),
    ("fp8-gqa1-k64", [1, 2], [9000, 16000], 4, 4, 64, torch.float8_e4m3fn, True),
]


@pytest.mark.gpu
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("splits", [None, "1", "3"])
def test_fmha_sparse_matches_reference(case, splits, monkeypatch):
    _need_kernel()
    name, qo, kv, hq, hkv, topk, dtype, causal = case
    if splits:
        monkeypatch.setenv("MSA_SPARSE_DECODE_SPLITS", splits)
    plan, q, k, v, kv_indices, blocks = make_case(qo, kv, hq, hkv, topk, dtype, causal, seed=zlib.crc32(name.encode()) % 1000)
    fp8 = dtype == torch.float8_e4m3fn
    out = torch.full(q.shape, float("nan"), dtype=torch.bfloat16 if fp8 else dtype, device=q.device)
    o, ms, lse = core.fmha(q, k, v, plan, kv_indices=kv_indices, kv_block_indexes=blocks, out=out, return_lse=True,
                           backend="kernel", validate=True)
    assert o is out and ms is None
    assert plan.kernel["sparse_decode"].splits >= 1
    ref_o, ref_lse = reference(plan, q, k, v, kv_indices, blocks)
    check(out, lse, ref_o, ref_lse, torch.bfloat16 if fp8 else dtype)  # fp8: exact inputs, output rounded to bf16


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float8_e4m3fn])
def test_per_head_scales(dtype):
    """Per-head q / k / v / o scale tensors (the kernel's [Hq, 2] row table) vs the fp64
    reference applying the same scales; with splits (the combine applies the output scale) and without."""
    _need_kernel()
    plan, q, k, v, kv_indices, blocks = make_case([2, 1, 1], [3000, 777, 20000], 32, 4, 16, dtype, True, seed=9)
    dev = q.device
    scales = dict(sm_scale=0.07, q_scale=torch.linspace(0.5, 2.0, 32, device=dev),
                  k_scale=torch.tensor([0.8, 1.25, 2.0, 0.5], device=dev),
                  v_scale=torch.tensor([1.5, 0.75, 1.0, 2.5], device=dev),
                  o_scale=torch.linspace(2.0, 0.25, 32, device=dev))
    ref_o, _, ref_lse = fmha_reference(q, k, v, qo_lens=plan.qo_lens, kv_lens=plan.kv_lens, page_size=128,
                                       kv_indices=kv_indices, kv_block_indexes=blocks, compute_dtype=torch.float64,
                                       out_dtype=torch.float64, return_lse=True, **scales)
    for splits in ("1", "3"):
        os.environ["MSA_SPARSE_DECODE_SPLITS"] = splits
        try:
            plan.kernel.pop("sparse_decode", None)
            o, _, lse = core.fmha(q, k, v, plan, kv_indices=kv_indices, kv_block_indexes=blocks, backend="kernel",
                                  return_lse=True, **scales)
        finally:
            os.environ.pop("MSA_SPARSE_DECODE_SPLITS")
        torch.cuda.synchronize()
        rel = ((o.double() - ref_o).norm() / ref_o.norm()).item()
        assert not torch.isnan(o).any() and rel < 1.5e-2, f"splits {splits}: rel L2 error {rel:.3e}"
        live = torch.isfinite(ref_lse)
        err = (lse[live].double() - ref_lse[live]).abs()
        assert (err <= 2e-3 * ref_lse[live].abs().clamp_min(1.0)).all(), f"splits {splits}: LSE err {err.max():.3e}"


def test_fp8_cache_under_16bit_q_on_cpu():
    """msa.core.fmha takes an fp8 e4m3 K/V cache under a bf16 / fp16 q (the reference upcasts it exactly): equal to
    the call on the same values stored in q's dtype; other mixes name the argument."""
    plan, q, k, v, kvi, blocks = make_case([2, 1], [300, 777], 32, 4, 4, torch.bfloat16, True, seed=9, device="cpu")
    k8, v8 = k.to(torch.float8_e4m3fn), v.to(torch.float8_e4m3fn)
    o, _ = core.fmha(q, k8, v8, plan, kv_indices=kvi, kv_block_indexes=blocks, validate=True)
    o16, _ = core.fmha(q, k8.bfloat16(), v8.bfloat16(), plan, kv_indices=kvi, kv_block_indexes=blocks)
    assert o.dtype == torch.bfloat16 and torch.equal(o, o16)
    with pytest.raises(TypeError, match="k: expected dtype bfloat16"):
        core.fmha(q, k.half(), v.half(), plan, kv_indices=kvi, kv_block_indexes=blocks)
    with pytest.raises(TypeError, match="v: expected dtype float8_e4m3fn"):
        core.fmha(q, k8, v, plan, kv_indices=kvi, kv_block_indexes=blocks)
    assert not sd.supports(dtype=torch.bfloat16, kv_dtype=torch.float16, sparse=True, page_size=128)[0]
    assert sd.supports(dtype=torch.float16, kv_dtype=torch.float8_e4m3fn, sparse=True, page_size=128)[0]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fp8_cache_under_16bit_q(dtype):
    """bf16 / fp16 q over an fp8 e4m3 K/V cache through msa.core.fmha (the kernel's kKvFp8 path; output in q's
    dtype) vs the fp64 reference on the same fp8 values; decode and MTP rows, NaN pages, forced splits."""
    _need_kernel()
    plan, q, k, v, kv_indices, blocks = make_case([1, 1, 8, 1], [5000, 129, 3000, 20000], 64, 4, 16, dtype, True,
                                                  seed=13)
    k8, v8 = k.to(torch.float8_e4m3fn), v.to(torch.float8_e4m3fn)
    ref_o, ref_lse = reference(plan, q, k8, v8, kv_indices, blocks)
    for splits in ("1", "3"):
        os.environ["MSA_SPARSE_DECODE_SPLITS"] = splits
        try:
            plan.kernel.pop("sparse_decode", None)
            out = torch.full_like(q, float("nan"))
            o, _, lse = core.fmha(q, k8, v8, plan, kv_indices=kv_indices, kv_block_indexes=blocks, out=out,
                                  return_lse=True, backend="kernel", validate=True)
        finally:
            os.environ.pop("MSA_SPARSE_DECODE_SPLITS")
        assert o is out
        check(out, lse, ref_o, ref_lse, torch.bfloat16)  # f16 MMAs; bf16 output bound for both


@pytest.mark.gpu
def test_scales_and_no_lse():
    _need_kernel()
    plan, q, k, v, kv_indices, blocks = make_case([2, 1], [3000, 777], 32, 4, 16, torch.bfloat16, True, seed=5)
    scales = dict(sm_scale=0.05, q_scale=2.0, k_scale=0.5, v_scale=3.0, o_scale=0.5)
    o, _ = core.fmha(q, k, v, plan, kv_indices=kv_indices, kv_block_indexes=blocks, backend="kernel", **scales)
    ref_o, _, _ = fmha_reference(q, k, v, qo_lens=plan.qo_lens, kv_lens=plan.kv_lens, page_size=128,
                                 kv_indices=kv_indices, kv_block_indexes=blocks, compute_dtype=torch.float64,
                                 out_dtype=torch.float64, **scales)
    rel = ((o.double() - ref_o).norm() / ref_o.norm()).item()
    assert not torch.isnan(o).any() and rel < 1.5e-2, f"rel L2 error {rel:.3e}"


def test_case_builder_and_reference_on_cpu():
    """The GPU tests' inputs: valid block lists (value checks on), and the fp64 reference never touches the NaN
    pages / tails (so a NaN in the kernel's output means the kernel read them)."""
    plan, q, k, v, kv_indices, blocks = make_case([3, 1], [300, 129], 8, 2, 4, torch.bfloat16, True, seed=1,
                                                  device="cpu")
    assert torch.isnan(k.float()).any() and (blocks == -1).any()
    o, _, lse = core.fmha(q, k, v, plan, kv_indices=kv_indices, kv_block_indexes=blocks, return_lse=True,
                          validate=True)
    ref_o, ref_lse = reference(plan, q, k, v, kv_indices, blocks)
    assert not torch.isnan(ref_o).any() and not torch.isnan(ref_lse).any()
    check(o, lse, ref_o, ref_lse, torch.bfloat16)


@pytest.mark.gpu
def test_cuda_graph_replay():
    """Plan-sized workspace, no allocation with out / lse given, no host sync: capture and replay."""
    _need_kernel()
    plan, q, k, v, kv_indices, blocks = make_case([1] * 8, [4000] * 8, 64, 4, 16, torch.bfloat16, True, seed=9,
                                                  empty_rows=False)
    out = torch.empty_like(q)
    lse = torch.empty(q.shape[0], q.shape[1], dtype=torch.float32, device="cuda")

    def step():
        from msa.core.kernels import sparse_decode

        sparse_decode.run(q, k, v, plan, kv_indices=kv_indices, kv_block_indexes=blocks, out=out, lse=lse,
                          return_lse=True)

    step()
    torch.cuda.synchronize()
    assert plan.kernel["sparse_decode"].splits > 1  # 32 pairs: split (exercises the combine in the graph)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        step()
    out.fill_(float("nan"))
    lse.fill_(float("nan"))
    g.replay()
    torch.cuda.synchronize()
    ref_o, ref_lse = reference(plan, q, k, v, kv_indices, blocks)
    check(out, lse, ref_o, ref_lse, torch.bfloat16)


@pytest.mark.gpu
def test_deterministic_and_matches_unsplit(monkeypatch):
    _need_kernel()
    plan, q, k, v, kv_indices, blocks = make_case([1] * 4, [8000] * 4, 64, 4, 32, torch.bfloat16, True, seed=3)
    a = core.fmha(q, k, v, plan, kv_indices=kv_indices, kv_block_indexes=blocks, backend="kernel")[0]
    b = core.fmha(q, k, v, plan, kv_indices=kv_indices, kv_block_indexes=blocks, backend="kernel")[0]
    assert torch.equal(a, b)
    monkeypatch.setenv("MSA_SPARSE_DECODE_SPLITS", "1")
    plan.kernel.pop("sparse_decode")
    c = core.fmha(q, k, v, plan, kv_indices=kv_indices, kv_block_indexes=blocks, backend="kernel")[0]
    assert (a.float() - c.float()).abs().max().item() < 3e-2
    assert math.isfinite(c.float().abs().sum().item())
