"""CPU model of fmha_sm90's online softmax with the lazy running max (OnlineSoftmax::kLazyMax).

The kernel keeps a row's running max unless a KV tile raises it by more than kMaxLag (log2 units of P), so the O
rescale is skipped on most tiles. This replays that update rule in float64 over random tiles (the lag constants are
read from the kernel source, so the model cannot drift from it) and checks what the kernel relies on:
- the normalised result and the LSE equal the exact softmax (the lag only changes the reference point);
- P = exp2(s * scale - m * scale + kLog2PScale) stays <= 2^(kLog2PScale + kMaxLag), which for fp8 (kLog2PScale 8)
  must stay below e4m3's 448;
- rows that see only masked keys stay at max -inf and produce no weight;
- on random logits most tiles skip the rescale (the point of the change).
"""

import math
import re
from pathlib import Path

import numpy as np
import pytest

KERNEL = Path(__file__).resolve().parents[2] / "packages/msa-core/src/msa/core/csrc/fmha_sm90/fmha_sm90_kernel.cuh"
E4M3_MAX = 448.0


def kernel_max_lag() -> tuple[float, float]:
    """(lag for kLog2PScale > 0, lag for kLog2PScale == 0) as written in the kernel."""
    m = re.search(r"kMaxLag\s*=\s*kLog2PScale\s*>\s*0\s*\?\s*([0-9.]+)f\s*:\s*([0-9.]+)f", KERNEL.read_text())
    assert m, "OnlineSoftmax::kMaxLag not found in fmha_sm90_kernel.cuh"
    return float(m.group(1)), float(m.group(2))


def lazy_softmax(s: np.ndarray, v: np.ndarray, scale_log2: float, tile: int, log2_pscale: int, lag: float):
    """One row block: s [rows, keys] logits (-inf = masked), v [keys, d]. Mirrors OnlineSoftmax::update + finalize
    with kLazyMax (tiles from the last to the first, as the kernel walks them). Returns o, lse (log2), max P,
    number of tiles that rescaled O."""
    rows, keys = s.shape
    row_max = np.full(rows, -np.inf)
    row_sum = np.zeros(rows)
    o = np.zeros((rows, v.shape[1]))
    p_max = 0.0
    rescales = 0
    starts = list(range(0, keys, tile))[::-1]
    for i, k0 in enumerate(starts):
        st = s[:, k0:k0 + tile]
        with np.errstate(invalid="ignore"):
            m = np.maximum(row_max, st.max(axis=1))
            if i > 0:
                keep = (m - row_max) * scale_log2 <= lag  # NaN (both -inf) -> False: m stays -inf
                m = np.where(keep, row_max, m)
        m_safe = np.where(np.isneginf(m), 0.0, m)
        if i > 0:
            factor = np.exp2((row_max - m_safe) * scale_log2)  # 0 where the row had no key yet (O, sum are 0)
            if np.any(factor != 1.0):
                rescales += 1
                o *= factor[:, None]
            row_sum *= factor
        row_max = m
        p = np.exp2(st * scale_log2 - (m_safe * scale_log2 - log2_pscale)[:, None])
        p_max = max(p_max, float(p.max(initial=0.0)))
        row_sum += p.sum(axis=1)
        o += p @ v[k0:k0 + tile]
    empty = ~(row_sum > 0)
    o_norm = np.where(empty, 0.0, 1.0 / np.where(empty, 1.0, row_sum))
    lse2 = np.where(empty, -np.inf, row_max * scale_log2 + np.log2(np.where(empty, 1.0, row_sum)) - log2_pscale)
    return o * o_norm[:, None], lse2, p_max, rescales


def exact(s: np.ndarray, v: np.ndarray, scale_log2: float):
    x = s * scale_log2
    mx = x.max(axis=1, keepdims=True)
    mx = np.where(np.isneginf(mx), 0.0, mx)
    p = np.exp2(x - mx)
    tot = p.sum(axis=1)
    empty = ~(tot > 0)
    o = (p @ v) / np.where(empty, 1.0, tot)[:, None]
    lse2 = np.where(empty, -np.inf, mx[:, 0] + np.log2(np.where(empty, 1.0, tot)))
    return np.where(empty[:, None], 0.0, o), lse2


@pytest.mark.parametrize("fp8", [True, False])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_lazy_max_matches_exact_softmax_and_bounds_p(fp8, seed):
    lag_fp8, lag16 = kernel_max_lag()
    lag, log2_pscale = (lag_fp8, 8) if fp8 else (lag16, 0)
    # the fp8 bound: P <= 2^(8 + lag) must fit e4m3
    assert 2.0 ** (8 + lag_fp8) < E4M3_MAX
    rng = np.random.default_rng(seed)
    rows, keys, d, tile = 64, 192 * 12 + 70, 32, 192 if fp8 else 128
    scale_log2 = (1 / math.sqrt(128)) * math.log2(math.e)
    # logits with a drifting max (the max keeps rising across tiles) and a few masked regions
    s = rng.standard_normal((rows, keys)) * 11.3 + np.linspace(0, 40, keys)[::-1][None, :] * rng.random((rows, 1))
    s[:5, :] = -np.inf  # rows without any key
    s[5:9, : keys // 2] = -np.inf  # rows whose early tiles are masked (the kernel walks from the last tile)
    s[9:12, keys - tile - 7:] = -np.inf  # rows whose first (last-index) tiles are fully masked
    v = rng.standard_normal((keys, d))
    o, lse2, p_max, rescales = lazy_softmax(s, v, scale_log2, tile, log2_pscale, lag)
    o_ref, lse_ref = exact(s, v, scale_log2)
    np.testing.assert_allclose(o, o_ref, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(lse2, lse_ref, rtol=1e-12, atol=1e-12)
    assert np.all(o[:5] == 0) and np.all(np.isneginf(lse2[:5]))
    assert p_max <= 2.0 ** (log2_pscale + lag) * (1 + 1e-12)
    if fp8:
        assert p_max < E4M3_MAX


def test_lazy_max_skips_most_rescales_on_random_logits():
    lag_fp8, lag16 = kernel_max_lag()
    rng = np.random.default_rng(7)
    rows, keys, d = 64, 8192, 16
    scale_log2 = (1 / math.sqrt(128)) * math.log2(math.e)
    s = rng.standard_normal((rows, keys)) * math.sqrt(128)
    v = rng.standard_normal((keys, d))
    tiles = keys // 128
    _, _, _, eager = lazy_softmax(s, v, scale_log2, 128, 0, 0.0)
    _, _, _, lazy = lazy_softmax(s, v, scale_log2, 128, 0, lag16)
    _, _, _, lazy8 = lazy_softmax(s, v, scale_log2, 192, 8, lag_fp8)
    assert eager > tiles // 4  # some row of the block moves its max on many tiles
    assert lazy <= 1 and lazy8 < eager // 2
