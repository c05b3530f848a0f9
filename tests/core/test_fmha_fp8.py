"""FP8 e4m3 mode of the SM90 dense FMHA (msa.core.kernels.fmha_sm90, issue 7).

CPU: the plan's transposed-V tile map and per-item tile bases, the feature gate, the warmup specs, the per-head
scale table, refusals. ``compile``: the fp8 module builds for sm_90a (and sm_100a is refused); a host program
checks, against CuTe's own wgmma layouts, that the P register mapping (S accumulator -> e4m3 A operand) and the
V pre-pass key permutation agree. ``gpu``: the kernel against an fp32 reference on the dequantized inputs
(random inputs, NaN-poisoned outputs), per-tensor and per-head scales, causal / non-causal, GQA, ragged lengths
including 1 and non-multiples of 128, rows that see no key, forced split-KV, and a sharp softmax (large logits:
P close to 1 in one column, the case where a P scaled past e4m3's 448 would saturate).

Error bounds (fp32 reference on the dequantized fp8 inputs, so only the kernel's own rounding counts):
O rel. L2 over the whole output < 5e-2 -- P is rounded to e4m3 (3 mantissa bits: ~2.4% rms relative error per
element, which O inherits about 1:1 for random V) before the PV GEMM. LSE |err| <= 2e-3 * max(1, |lse|) (the row
sums are fp32 and use the unrounded P). That is the exact (exp2) build, which runs whenever the LSE is returned.
The fast build (P's e4m3 code from two FMAs, row sums of the P used, on the tensor core): same O bound; its LSE is
that of the P it used, whose code is off the exact one by at most ~0.96 of a code step (linear-in-log2 mantissa,
centred, then rounded), i.e. a factor <= 1 +- 0.96 / 8: |err| <= FP8_FAST_LSE_ABS + 2e-3 * max(1, |lse|).
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from msa.core.kernels import fmha_sm90 as k90
from msa_core_testutil import FP8_FAST_LSE_ABS, check_fmha_output, need_kernel

FP8 = torch.float8_e4m3fn
E4M3_MAX = 448.0


def _cdiv(a, b):
    return -(-a // b)


# ---------------------------------------------------------------------------------------------------------
# CPU: plan, gate, specs, scales
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("causal", [True, False])
def test_fp8_plan_tile_map(causal):
    qo = [5, 0, 300, 129]
    kv = [1, 50, 1000, 128]
    kp = k90.plan(qo, kv, 8, 2, causal=causal, elem_size=1, device="cpu", num_sms=132)
    # the default (fast) fp8 build: 128-key tiles (what the module's block_n() reports); the exact build: 192 non-causal
    bn = 128
    assert kp.block_n == bn == k90.default_block_n(128, fp8=True, causal=causal)
    assert k90.default_block_n(128, fp8=True, causal=causal, fp8_p="exp2") == (128 if causal else 192)
    tiles = kp.vt_tiles.tolist()
    assert kp.vt_len == bn * len(tiles) == bn * sum(_cdiv(n, bn) for n in kv)
    # every source token appears exactly once, tiles of a request are consecutive and bn apart
    covered = []
    for start, valid in tiles:
        assert 1 <= valid <= bn
        covered += list(range(start, start + valid))
    assert covered == list(range(sum(kv)))
    bases = [sum(_cdiv(n, bn) for n in kv[:b]) for b in range(len(kv))]
    kv_starts = [sum(kv[:b]) for b in range(len(kv))]
    for row in kp.work.tolist():
        b = kv_starts.index(row[2]) if row[3] else None
        if b is not None and row[7] > 0:
            assert row[11] == bases[b], f"item {row}: V tile base {row[11]}, expected {bases[b]}"
            assert tiles[row[11]][0] == row[2]


@pytest.mark.parametrize("block_n", [192, 224])
def test_wide_tile_plan_counts_its_own_tiles(block_n):
    """Plans for wide-tile A/B builds (-DMSA_FMHA_SM90_BLOCK_N): n_block_max, the V^T tile map and the tile bases
    count block_n-key tiles; a KernelPlan whose tile differs from the module's is refused by name."""
    qo, kv = [300, 129], [1000, 4100]
    kp = k90.plan(qo, kv, 8, 2, causal=False, elem_size=1, device="cpu", num_sms=132, split_kv=None, block_n=block_n)
    assert kp.block_n == block_n
    tiles = kp.vt_tiles.tolist()
    assert kp.vt_len == block_n * len(tiles) == block_n * sum(_cdiv(n, block_n) for n in kv)
    assert all(1 <= valid <= block_n for _, valid in tiles)
    assert sorted({int(x) for x in kp.work[:, 7]}) == sorted({_cdiv(n, block_n) for n in kv})
    assert sorted({int(x) for x in kp.work[:, 11]}) == [0, _cdiv(kv[0], block_n)]
    causal = k90.plan([300], [300], 2, 2, causal=True, device="cpu", num_sms=4, block_n=block_n)
    assert sorted(int(x) for x in causal.work[:, 7]) == sorted([_cdiv(128, block_n)] * 2 + [_cdiv(256, block_n)] * 2
                                                               + [_cdiv(300, block_n)] * 2)
    paged = k90.plan([300], [300], 2, 2, causal=True, paged=True, device="cpu", num_sms=4, block_n=block_n)
    assert paged.block_n == block_n  # an explicit block_n is the module's tile, paged or not (pages fill tiles)
    assert k90._kernel_plan(kp, 128, 1, torch.device("cpu"), block_n) is kp
    with pytest.raises(ValueError, match=f"made for {block_n}-key KV tiles"):
        k90._kernel_plan(kp, 128, 1, torch.device("cpu"), 128)
    with pytest.raises(ValueError, match="block_n"):
        k90.plan([10], [10], 2, 2, causal=False, device="cpu", num_sms=4, block_n=100)


def test_plan_block_n_default_follows_the_environment(monkeypatch):
    monkeypatch.setenv(k90.BLOCK_N_ENV, "192")
    assert k90.plan([10], [10], 2, 2, causal=False, device="cpu", num_sms=4).block_n == 192
    # the wide-tile switch builds ragged O modules only: paged plans keep the default tile
    assert k90.plan([10], [10], 2, 2, causal=False, paged=True, device="cpu", num_sms=4).block_n == 128
    monkeypatch.delenv(k90.BLOCK_N_ENV)
    assert k90.plan([10], [10], 2, 2, causal=False, device="cpu", num_sms=4).block_n == 128


def test_module_block_n_of_old_and_new_modules():
    class Old:
        def implements_function(self, name):
            return False

    class New:
        def implements_function(self, name):
            return name == "block_n"

        def block_n(self):
            return 224

    assert k90.module_block_n(Old()) == 128 and k90.module_block_n(New()) == 224


def test_three_warpgroup_plan_counts_192_row_items(monkeypatch):
    """Plans for the three-consumer-warpgroup A/B builds (-DMSA_FMHA_SM90_MMA_WG=3, module block_m() == 192): items are
    192-row query tiles (causal limits from their last row), the split-KV partial O has 192 rows, a KernelPlan whose
    item height differs from the module's is refused by name, and old modules report 128."""
    qo, kv = [400, 190], [400, 700]
    kp = k90.plan(qo, kv, 4, 2, causal=True, elem_size=1, device="cpu", num_sms=132, split_kv=(10**6, 2),
                  block_n=96, block_m=192)
    assert kp.block_m == 192 and kp.partial_o.shape[1:] == (192, 128) and kp.partial_lse.shape[1] == 192
    whole = k90.plan(qo, kv, 4, 2, causal=True, elem_size=1, device="cpu", num_sms=132, split_kv=None, block_n=96,
                     block_m=192)
    rows = whole.work.tolist()
    assert len(rows) == 4 * (_cdiv(400, 192) + _cdiv(190, 192))
    for r in rows:  # q_start, qo_len, kv_start, kv_len, m_block, head, qo_offset, n_block_max
        last = min((r[4] + 1) * 192, r[1]) - 1
        assert r[7] == min(_cdiv(kv[qo.index(r[1])], 96), (last + r[6]) // 96 + 1)
    assert k90._kernel_plan(kp, 128, 1, torch.device("cpu"), 96, block_m=192) is kp
    with pytest.raises(ValueError, match="made for 192-row query tiles"):
        k90._kernel_plan(kp, 128, 1, torch.device("cpu"), 96)
    with pytest.raises(ValueError, match="block_m"):
        k90.plan([10], [10], 2, 2, causal=False, device="cpu", num_sms=4, block_m=256)
    monkeypatch.setenv(k90.BLOCK_M_ENV, "192")
    assert k90.plan([10], [10], 2, 2, causal=False, device="cpu", num_sms=4).block_m == 192
    monkeypatch.delenv(k90.BLOCK_M_ENV)
    assert k90.plan([10], [10], 2, 2, causal=False, device="cpu", num_sms=4).block_m == 128

    class Old:
        def implements_function(self, name):
            return name == "block_n"

    class New:
        def implements_function(self, name):
            return True

        def block_m(self):
            return 192

    assert k90.module_block_m(Old()) == 128 and k90.module_block_m(New()) == 192


def _exp2_poly_host(x):
    """fmha_sm90_kernel.cuh's exp2_poly step by step in float32 (same constants, same rounding points)."""
    import numpy as np

    x = np.maximum(np.asarray(x, dtype=np.float32), np.float32(-126.0))
    big = np.float32(12582912.0)
    t = np.floor(x.astype(np.float64)) + 12582912.0  # __fadd_rd: exact here (|x| < 2^22), rounded toward -inf
    t = t.astype(np.float32)
    j = t - big
    f = x - j
    c = [np.float32(v) for v in (0.07802402973175049, 0.22606706619262695, 0.6958339810371399, 0.9999251365661621)]
    p = ((c[0] * f + c[1]) * f + c[2]) * f + c[3]
    bits = (p.view(np.int32).astype(np.int64) + (t.view(np.int32).astype(np.int64) << 23)) & 0xFFFFFFFF
    return bits.astype(np.uint32).view(np.float32)


def test_exp2_poly_accuracy_over_the_softmax_range():
    """The FMA-pipe exp2 (FA4's MUFU offload, -DMSA_FMHA_SM90_EXP2_EMU): relative error <= 1e-4 against exp2 over
    [-125, 8] (fp8 P <= 2^8; 16-bit P <= 1; below, P is negligible next to the row max), monotone across integer
    boundaries, tiny (not garbage) below -126."""
    import numpy as np

    x = np.concatenate([np.linspace(-125.0, 8.0, 400001, dtype=np.float32), np.arange(-125, 9, dtype=np.float32),
                        np.arange(-124, 9, dtype=np.float32) - np.float32(1e-5)])
    got = _exp2_poly_host(x).astype(np.float64)
    ref = np.exp2(x.astype(np.float64))
    rel = np.abs(got / ref - 1.0)
    assert rel.max() <= 1e-4, f"max rel err {rel.max():.3e} at x={x[rel.argmax()]}"
    xs = np.sort(np.linspace(-20.0, 8.0, 100001, dtype=np.float32))
    ys = _exp2_poly_host(xs)
    assert (np.diff(ys.astype(np.float64)) >= -1e-4 * ys[1:]).all(), "not monotone within its error"
    low = _exp2_poly_host(np.array([-127.0, -200.0, -1e30], dtype=np.float32))
    assert (low >= 0).all() and (low <= 2.0**-126).all()  # clamp at -126: never negative / NaN


def test_bf16_plan_has_no_fp8_state():
    kp = k90.plan([300], [300], 4, 4, causal=True, device="cpu", num_sms=132)
    assert kp.vt_tiles is None and kp.vt_len == 0
    assert (kp.work[:, 11] == 0).all()


def test_fp8_feature_gate():
    assert k90.supports(dtype=FP8, head_dim_qk=128, head_dim_v=128)[0]
    assert k90.supports(dtype=FP8, head_dim_qk=128, head_dim_v=128, per_head_scales=True)[0]
    ok, why = k90.supports(dtype=FP8, head_dim_qk=128, page_size=128)
    assert not ok and "paged" in why
    ok, why = k90.supports(dtype=FP8, head_dim_qk=128, output_maxscore=True)
    assert not ok and "max_score" in why  # O + max_score
    # score-only (the index pass): float scales only
    assert k90.supports(dtype=FP8, head_dim_qk=128, output_o=False, output_maxscore=True)[0]
    ok, why = k90.supports(dtype=FP8, head_dim_qk=128, output_o=False, output_maxscore=True, per_head_scales=True)
    assert not ok and "per-head" in why
    ok, why = k90.supports(dtype=FP8, head_dim_qk=128, output_o=False, output_maxscore=True, page_size=128)
    assert not ok and "paged" in why
    ok, why = k90.supports(dtype=FP8, head_dim_qk=64)
    assert not ok and "head dim" in why
    # bf16 keeps its own gate
    assert not k90.supports(dtype=torch.bfloat16, head_dim_qk=128, per_head_scales=True)[0]


def test_fp8_specs_and_refusals():
    specs = k90.jit_specs({"dtypes": ["fp8"], "head_dim": [128]}, "sm_90a")
    modes = {v: k for k, v in k90.MODES.items()}
    assert sorted((modes[s.params["mode"]], s.params["causal"], s.params.get("fp8_p", "")) for s in specs) == [
        ("maxscore", False, ""), ("maxscore", True, ""), ("o", False, "code"), ("o", False, "exp2"),
        ("o", True, "code"), ("o", True, "exp2")]
    assert not any(s.params["paged"] for s in specs)
    assert all(s.params["dtype"] == "float8_e4m3fn" for s in specs)
    assert k90.jit_specs({"dtypes": ["fp8"]}, "sm_100a") == []
    with pytest.raises(NotImplementedError, match="sm_100a"):
        k90.jit_spec("float8_e4m3fn", 128, True, False, arch="sm_100a")
    with pytest.raises(NotImplementedError, match="ragged"):
        k90.jit_spec("float8_e4m3fn", 128, True, True)
    with pytest.raises(NotImplementedError, match="ragged"):
        k90.jit_spec("float8_e4m3fn", 128, True, False, mode="o_maxscore")
    with pytest.raises(NotImplementedError, match="paged"):
        k90.plan([10], [10], 2, 2, causal=True, paged=True, elem_size=1, device="cpu", num_sms=4)


def test_fp8_softmax_choice_follows_the_environment_and_the_lse(monkeypatch):
    """auto (default): the exact exp2 build when the call returns the LSE, the fast code build otherwise; fast / exact
    force one; anything else is refused by name."""
    monkeypatch.delenv(k90.FP8_SOFTMAX_ENV, raising=False)
    assert k90.fp8_p_variant(True) == "exp2" and k90.fp8_p_variant(False) == "code"
    for choice, want in (("fast", "code"), ("exact", "exp2"), (" Auto ", None)):
        monkeypatch.setenv(k90.FP8_SOFTMAX_ENV, choice)
        for lse in (True, False):
            assert k90.fp8_p_variant(lse) == (want or ("exp2" if lse else "code"))
    monkeypatch.setenv(k90.FP8_SOFTMAX_ENV, "approx")
    with pytest.raises(ValueError, match="MSA_FP8_SOFTMAX: expected one of"):
        k90.fp8_p_variant(False)


def test_fp8_softmax_builds_have_their_own_names_and_keys():
    fast = k90.jit_spec("float8_e4m3fn", 128, True, False)
    exact = k90.jit_spec("float8_e4m3fn", 128, True, False, fp8_p="exp2")
    assert fast.params["fp8_p"] == "code" and exact.params["fp8_p"] == "exp2" and fast.name != exact.name
    assert k90.variant_tag("float8_e4m3fn", 128, True, False) == "fmha_sm90_float8_e4m3fn_d128_causal1_paged0"
    assert k90.variant_tag("float8_e4m3fn", 128, True, False, fp8_p="exp2").endswith("_causal1_paged0_exp2")
    assert k90.variant_tag("float8_e4m3fn", 128, True, False, "sparse_q", fp8_p="exp2").endswith("_sparse_q_exp2")
    # one build elsewhere: the param is absent (16-bit and score-only keys unchanged) and the tag ignores it
    assert "fp8_p" not in k90.jit_spec("float8_e4m3fn", 128, True, False, mode="maxscore", fp8_p="exp2").params
    assert "fp8_p" not in k90.jit_spec("bfloat16", 128, True, False, fp8_p="exp2").params
    assert k90.variant_tag("bfloat16", 128, True, False, fp8_p="exp2") == "fmha_sm90_bfloat16_d128_causal1_paged0"
    with pytest.raises(ValueError, match="fp8_p: expected one of"):
        k90.jit_spec("float8_e4m3fn", 128, True, False, fp8_p="poly")


def test_fp8_head_scale_table():
    kp = k90.plan([10], [10], 4, 2, causal=True, elem_size=1, device="cpu", num_sms=4)
    t = k90.fp8_head_scales(kp, 4, 2, 0.5, 2.0, 3.0, 5.0, 7.0, torch.device("cpu"))
    assert torch.equal(t, torch.tensor([[3.0, 35.0]] * 4))
    assert k90.fp8_head_scales(kp, 4, 2, 0.5, 2.0, 3.0, 5.0, 7.0, torch.device("cpu")) is t  # cached
    qs = torch.tensor([1.0, 2.0, 3.0, -1.0])
    ks = torch.tensor([10.0, 100.0])
    vs = torch.tensor([0.5, 0.25])
    t = k90.fp8_head_scales(kp, 4, 2, 0.5, qs, ks, vs, None, torch.device("cpu"))
    expected_qk = torch.tensor([5.0, 10.0, 150.0, math.nan])
    torch.testing.assert_close(t[:, 0], expected_qk, equal_nan=True)  # non-positive -> NaN (never silent)
    torch.testing.assert_close(t[:, 1], torch.tensor([0.5, 0.5, 0.25, 0.25]))
    with pytest.raises(NotImplementedError, match="must be > 0"):
        k90.fp8_head_scales(kp, 4, 2, 0.5, -1.0, 1.0, 1.0, 1.0, torch.device("cpu"))
    with pytest.raises(ValueError, match=r"k_scale: expected a \[2\] tensor"):
        k90.fp8_head_scales(kp, 4, 2, 0.5, None, torch.ones(4), None, None, torch.device("cpu"))


def test_fp8_cpu_tensors_use_the_reference():
    """CPU fp8 inputs run the reference (the kernel is CUDA-only); output bf16."""
    import msa.core as mc

    torch.manual_seed(0)
    q = torch.randn(5, 2, 128).to(FP8)
    k = torch.randn(7, 2, 128).to(FP8)
    v = torch.randn(7, 2, 128).to(FP8)
    plan = mc.fmha_plan([5], [7], 2, 2, causal=True)
    out, _ = mc.fmha(q, k, v, plan)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()


# ---------------------------------------------------------------------------------------------------------
# compile
# ---------------------------------------------------------------------------------------------------------

_LAYOUT_CHECK = r"""
#include <cstdio>
#include <cute/tensor.hpp>
#include <cute/atom/mma_traits_sm90_gmma.hpp>
#include "fmha_sm90_kernel.cuh"
using namespace cute;
int main() {
  using E = cutlass::float_e4m3_t;
  using T = msa_fmha_sm90::FmhaTraits<E, 128, true, false, 0>;
  typename T::TiledMmaQK mqk;
  typename T::TiledMmaPV mpv;
  int bad = 0;
  for (int tid = 0; tid < 256; ++tid) {
    Tensor cS = mqk.get_thread_slice(tid).partition_C(make_identity_tensor(Shape<_128, _128>{}));
    Tensor cA = mpv.get_thread_slice(tid).partition_A(make_identity_tensor(Shape<_128, _128>{}));
    constexpr msa_fmha_sm90::Fp8PFromAcc<128> from_acc{};
    for (int i = 0; i < 64; ++i) {
      int const l = get<1>(cA(i)), j = from_acc(i), l16 = l % 16;
      int const key = (l / 16) * 16 + 8 * ((l16 % 4) / 2) + 2 * (l16 / 4) + l16 % 2;  // the V pre-pass order
      if (int(get<0>(cA(i))) != int(get<0>(cS(j))) || int(get<1>(cS(j))) != key) { ++bad; }
    }
  }
  printf("mismatches %d\n", bad);
  return bad != 0;
}
"""


def _nvcc():
    home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    path = Path(home) / "bin" / "nvcc"
    return str(path) if path.is_file() else None


@pytest.mark.compile
@pytest.mark.slow
def test_fp8_fragment_mapping(tmp_path):
    """S accumulator value from_acc(i) sits at the (row, key) that A-operand value i stands for, with the key
    order the V pre-pass writes (host program on CuTe's layouts; no GPU)."""
    nvcc = _nvcc()
    if nvcc is None or shutil.which("g++") is None:
        pytest.skip("needs nvcc and a host compiler")
    from msa.core.jit.cutlass import cutlass_include_dirs  # noqa: PLC0415

    src = tmp_path / "layout_check.cu"
    src.write_text(_LAYOUT_CHECK)
    csrc = Path(k90.__file__).parents[1] / "csrc" / "fmha_sm90"
    incs = [f"-I{d}" for d in cutlass_include_dirs()] + [f"-I{csrc}"]
    exe = tmp_path / "layout_check"
    subprocess.run(
        [nvcc, "-std=c++17", "--expt-relaxed-constexpr", *incs, str(src), "-o", str(exe)],
        check=True,
        capture_output=True,
    )
    res = subprocess.run([str(exe)], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "mismatches 0" in res.stdout


@pytest.mark.compile
@pytest.mark.slow
def test_fp8_module_builds_for_sm90a(module_arch_check):
    if _nvcc() is None:
        pytest.skip("needs nvcc")
    entry = k90.jit_spec("float8_e4m3fn", 128, True, False).build()
    so = entry.file("module.so")
    module_arch_check(so, "sm_90a", 90)
    blob = Path(so).read_bytes()
    assert b"fmha_fwd" in blob and b"fmha_sm90_vt_kernel" in blob and b"fmha_sm90_kernel" in blob


# ---------------------------------------------------------------------------------------------------------
# GPU correctness
# ---------------------------------------------------------------------------------------------------------


def _quantize(x, scale, heads_dim=1):
    """x fp32 [tokens, H, D], scale float or [H] -> (e4m3 tensor, dequantized fp32 tensor)."""
    s = scale if not isinstance(scale, torch.Tensor) else scale.view(1, -1, 1)
    xq = (x / s).clamp(-E4M3_MAX, E4M3_MAX).to(FP8)
    return xq, xq.float() * s


def reference(q, k, v, qo_lens, kv_lens, qo_offsets, causal, sm_scale, o_scale):
    """fp32 attention per request on dequantized inputs; o_scale float or [Hq]."""
    hq, hkv = q.shape[1], k.shape[1]
    g = hq // hkv
    out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    lse = torch.full(q.shape[:2], -math.inf, dtype=torch.float32, device=q.device)
    qs = ks = 0
    for qo, kv, off in zip(qo_lens, kv_lens, qo_offsets):
        if qo and kv:
            qb = q[qs : qs + qo].transpose(0, 1)
            kb = k[ks : ks + kv].transpose(0, 1).repeat_interleave(g, 0)
            vb = v[ks : ks + kv].transpose(0, 1).repeat_interleave(g, 0)
            s = torch.matmul(qb, kb.transpose(1, 2)) * sm_scale
            if causal:
                i = torch.arange(qo, device=q.device)[:, None]
                j = torch.arange(kv, device=q.device)[None, :]
                s = s.masked_fill(j > i + off, -math.inf)
            lb = torch.logsumexp(s, dim=-1)
            p = torch.exp(s - lb[..., None]).nan_to_num(0.0)
            out[qs : qs + qo] = torch.matmul(p, vb).transpose(0, 1)
            lse[qs : qs + qo] = lb.transpose(0, 1)
        qs += qo
        ks += kv
    o_s = o_scale if not isinstance(o_scale, torch.Tensor) else o_scale.view(1, -1, 1)
    return out * o_s, lse


O_BOUND = 5e-2


def _check(out, lse, ref_o, ref_lse):
    assert out.dtype == torch.bfloat16
    check_fmha_output(out, lse, ref_o, ref_lse, O_BOUND)


CASES = [
    # name, qo_lens, kv_lens, hq, hkv, causal, qo_offset (None: kv - qo), scales ("tensor" | "head"), sm_scale
    ("single-odd", [77], [77], 4, 4, True, None, "tensor", None),
    ("len1-and-multi", [1, 129, 256, 1000], [1, 129, 300, 1000], 8, 2, True, None, "tensor", None),
    ("noncausal-ragged", [33, 500, 128], [700, 1, 257], 8, 8, False, None, "tensor", None),
    ("gqa16-per-head", [200, 64], [2000, 4100], 16, 1, True, None, "head", None),
    ("gqa4-empty-requests-per-head", [0, 300, 5, 0], [50, 0, 1000, 0], 8, 2, True, None, "head", None),
    ("offset-unseen-rows", [300, 260], [300, 500], 4, 1, True, [-200, 17], "tensor", None),
    ("noncausal-per-head", [64, 400], [5, 1000], 8, 4, False, None, "head", None),
    ("sharp-softmax", [300, 1], [1000, 777], 4, 2, True, None, "tensor", 1.0),
    ("long-gqa8", [2048], [4096], 16, 2, True, None, "head", None),
]


def _make_inputs(qo_lens, kv_lens, hq, hkv, scales, seed):
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(seed)
    tq, tk, d = sum(qo_lens), sum(kv_lens), 128
    qf = torch.randn(tq, hq, d, device=dev, generator=g) * 3.0
    kf = torch.randn(tk, hkv, d, device=dev, generator=g) * 0.5
    vf = torch.randn(tk, hkv, d, device=dev, generator=g) * 2.0
    if scales == "tensor":
        sc = {"q_scale": 3.0 * 4 / E4M3_MAX, "k_scale": 0.5 * 4 / E4M3_MAX, "v_scale": 2.0 * 4 / E4M3_MAX, "o_scale": 1.5}
    else:  # per head: amax-based, different for every head
        def amax(x):
            return (x.abs().amax(dim=(0, 2)) / E4M3_MAX).clamp_min(1e-6) if x.numel() else torch.ones(x.shape[1], device=dev)

        sc = {
            "q_scale": amax(qf),
            "k_scale": amax(kf) * 1.5,
            "v_scale": amax(vf),
            "o_scale": torch.rand(hq, device=dev, generator=g) + 0.5,
        }
    q, qd = _quantize(qf, sc["q_scale"])
    k, kd = _quantize(kf, sc["k_scale"])
    v, vd = _quantize(vf, sc["v_scale"])
    return q, k, v, qd, kd, vd, sc


def _run(case, seed=0, split_kv="auto"):
    import msa.core as mc

    _, qo_lens, kv_lens, hq, hkv, causal, qo_offset, scales, sm = case
    dev = torch.device("cuda")
    q, k, v, qd, kd, vd, sc = _make_inputs(qo_lens, kv_lens, hq, hkv, scales, seed)
    offs = [b - a for a, b in zip(qo_lens, kv_lens)] if qo_offset is None else qo_offset
    sm_scale = 1.0 / math.sqrt(128) if sm is None else sm
    tq = sum(qo_lens)
    out = torch.full((tq, hq, 128), float("nan"), device=dev, dtype=torch.bfloat16)
    lse = torch.full((tq, hq), float("nan"), device=dev, dtype=torch.float32)
    if split_kv == "auto":
        plan = mc.fmha_plan(qo_lens, kv_lens, hq, hkv, causal=causal, qo_offset=qo_offset if causal else None, device=dev)
        res = mc.fmha(q, k, v, plan, out=out, return_lse=True, sm_scale=sm, backend="kernel", **sc)
        assert res[0] is out
        lse = res[2]
    else:
        bn = k90.default_block_n(128, fp8=True, causal=causal, fp8_p=k90.fp8_p_variant(True))  # the build that runs
        kp = k90.plan(qo_lens, kv_lens, hq, hkv, causal=causal, qo_offset=offs, split_kv=split_kv, elem_size=1,
                      device=dev, block_n=bn)
        assert kp.combine.shape[0] > 0, "the forced split did not cut any item"
        k90.run(q, k, v, kp, out=out, lse=lse, return_lse=True, causal=causal, sm_scale=sm_scale, **sc)
    torch.cuda.synchronize()
    ref_o, ref_lse = reference(qd, kd, vd, qo_lens, kv_lens, offs, causal, sm_scale, sc["o_scale"])
    return out, lse, ref_o, ref_lse


def _need_sm90():
    need_kernel(k90)


@pytest.mark.gpu
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_fp8_matches_fp32_reference(case):
    _need_sm90()
    _check(*_run(case))


@pytest.mark.gpu
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_fp8_fast_softmax_matches_fp32_reference(case, monkeypatch):
    """The fast build (forced, so the LSE can be checked too), and without the LSE under auto: the same O bitwise."""
    _need_sm90()
    monkeypatch.setenv(k90.FP8_SOFTMAX_ENV, "fast")
    out, lse, ref_o, ref_lse = _run(case)
    assert out.dtype == torch.bfloat16
    check_fmha_output(out, lse, ref_o, ref_lse, O_BOUND, lse_abs=FP8_FAST_LSE_ABS)
    monkeypatch.setenv(k90.FP8_SOFTMAX_ENV, "auto")
    import msa.core as mc

    _, qo_lens, kv_lens, hq, hkv, causal, qo_offset, scales, sm = case
    q, k, v, *_, sc = _make_inputs(qo_lens, kv_lens, hq, hkv, scales, 0)
    plan = mc.fmha_plan(qo_lens, kv_lens, hq, hkv, causal=causal, qo_offset=qo_offset if causal else None,
                        device=q.device)
    out2, _ = mc.fmha(q, k, v, plan, sm_scale=sm, backend="kernel", **sc)
    assert torch.equal(out2, out), "auto without the LSE must run the fast build"


@pytest.mark.gpu
@pytest.mark.parametrize("name,split", [("len1-and-multi", (10**6, 2)), ("gqa16-per-head", (7, 4)),
                                        ("noncausal-per-head", (10**6, 3))])
@pytest.mark.parametrize("softmax", ["exact", "fast"])
def test_fp8_split_kv_matches_fp32_reference(name, split, softmax, monkeypatch):
    """Forced split-KV: partial O / LSE pieces merged by the combine kernel, with either softmax build (the fast one's
    partial LSEs are those of the P it used, so the merge stays consistent)."""
    _need_sm90()
    monkeypatch.setenv(k90.FP8_SOFTMAX_ENV, softmax)
    case = next(c for c in CASES if c[0] == name)
    out, lse, ref_o, ref_lse = _run(case, split_kv=split)
    assert out.dtype == torch.bfloat16
    check_fmha_output(out, lse, ref_o, ref_lse, O_BOUND, lse_abs=FP8_FAST_LSE_ABS if softmax == "fast" else 0.0)


@pytest.mark.gpu
def test_fp8_nonpositive_head_scale_gives_nan_not_garbage():
    import msa.core as mc

    _need_sm90()
    dev = torch.device("cuda")
    q = torch.randn(100, 2, 128, device=dev).to(FP8)
    k = torch.randn(100, 2, 128, device=dev).to(FP8)
    v = torch.randn(100, 2, 128, device=dev).to(FP8)
    plan = mc.fmha_plan([100], [100], 2, 2, causal=True, device=dev)
    out, _ = mc.fmha(q, k, v, plan, q_scale=torch.tensor([1.0, -1.0], device=dev), backend="kernel")
    torch.cuda.synchronize()
    assert torch.isfinite(out[:, 0].float()).all()
    assert torch.isnan(out[:, 1].float()).all()


@pytest.mark.gpu
def test_fp8_replays_in_a_cuda_graph():
    """Float scales (cached table), plan-owned V^T workspace: capture and replay give the eager result."""
    _need_sm90()
    dev = torch.device("cuda")
    torch.manual_seed(3)
    qo, kv, hq, hkv = [300, 5], [1000, 700], 8, 2
    q = torch.randn(sum(qo), hq, 128, device=dev).to(FP8)
    k = torch.randn(sum(kv), hkv, 128, device=dev).to(FP8)
    v = torch.randn(sum(kv), hkv, 128, device=dev).to(FP8)
    kp = k90.plan(qo, kv, hq, hkv, causal=True, elem_size=1, device=dev)
    out = torch.full((sum(qo), hq, 128), float("nan"), device=dev, dtype=torch.bfloat16)
    lse = torch.full((sum(qo), hq), float("nan"), device=dev)
    kw = dict(out=out, lse=lse, return_lse=True, causal=True, q_scale=0.5, v_scale=2.0)
    k90.run(q, k, v, kp, **kw)
    eager_o, eager_lse = out.clone(), lse.clone()
    out.fill_(float("nan"))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        k90.run(q, k, v, kp, **kw)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, eager_o) and torch.equal(lse, eager_lse)


INDEX_CASES = [
    # name, qo_lens, kv_lens, hq (index heads), hkv (shared index-K heads), causal
    ("index-causal-ragged", [1, 190, 700, 64], [129, 300, 1500, 64], 4, 1, True),
    ("index-noncausal", [33, 500], [700, 257], 4, 2, False),
    ("index-chunk-offset", [256, 130], [1000, 130], 8, 1, True),
]


@pytest.mark.gpu
@pytest.mark.parametrize("case", INDEX_CASES, ids=[c[0] for c in INDEX_CASES])
def test_fp8_score_only_index_pass_matches_fp32_reference(case):
    """fp8 e4m3 score-only (the MSA index pass, output_o=False): max_score [Hq, tiles, total_q] = the max of each
    128-key tile's logits (sm_scale * q_scale * k_scale folded), -inf where no key is visible and on the padding tiles,
    vs fp32 on the dequantized inputs: |err| <= 1e-3 + 1e-3 |ref| (e4m3 products are exact; QGMMA accumulates in
    reduced fp32). Poisoned output; the refused per-head scale tensors name themselves."""
    import msa.core as mc
    from msa.core.reference import default_max_k_tiles, max_score_reference

    _need_sm90()
    name, qo_lens, kv_lens, hq, hkv, causal = case
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(11)
    tq, tk, d = sum(qo_lens), sum(kv_lens), 128
    qf = torch.randn(tq, hq, d, device=dev, generator=g) * 3.0
    kf = torch.randn(tk, hkv, d, device=dev, generator=g) * 0.5
    q_scale, k_scale = 3.0 * 4 / E4M3_MAX, 0.5 * 4 / E4M3_MAX
    q, qd = _quantize(qf, q_scale)
    k, kd = _quantize(kf, k_scale)
    plan = mc.fmha_plan(qo_lens, kv_lens, hq, hkv, causal=causal, output_maxscore=True, device=dev)
    tiles = default_max_k_tiles(max(kv_lens))
    ms = torch.full((hq, tiles, tq), float("nan"), device=dev, dtype=torch.float32)
    out, res = mc.fmha(q, k, None, plan, output_o=False, max_score=ms, q_scale=q_scale, k_scale=k_scale,
                       backend="kernel")
    torch.cuda.synchronize()
    assert out is None and res is ms
    offs = [b - a for a, b in zip(qo_lens, kv_lens)]
    ref = max_score_reference(qd, kd, qo_lens=qo_lens, kv_lens=kv_lens, causal=causal, qo_offset=offs,
                              sm_scale=1.0 / math.sqrt(d), max_k_tiles=tiles)
    assert ref.shape == ms.shape
    inf = torch.isinf(ref)
    assert torch.equal(torch.isinf(ms), inf) and (ms[inf] == ref[inf]).all(), "-inf pattern differs"
    assert not torch.isnan(ms).any(), "unwritten (poisoned) entries remain"
    err = (ms[~inf] - ref[~inf]).abs()
    bound = 1e-3 + 1e-3 * ref[~inf].abs()
    assert (err <= bound).all(), f"max |err| {err.max().item():.3g}"
    from msa.core.dispatch import KernelUnavailableError

    with pytest.raises(KernelUnavailableError, match="per-head scale tensors"):
        mc.fmha(q, k, None, plan, output_o=False, max_score=ms, backend="kernel",
                q_scale=torch.full((hq,), q_scale, device=dev))
