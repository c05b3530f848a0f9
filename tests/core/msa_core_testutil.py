"""Helpers shared by the msa-core tests (a plain module: test files must not import conftest)."""

from __future__ import annotations

import torch

# The fast fp8 softmax build's LSE is that of the P it used, whose e4m3 code is off the exact one by at most ~0.96 of a
# code step (linear-in-log2 mantissa, centred, then rounded): a factor <= 1 +- 0.96 / 8, i.e. -ln(1 - 0.96 / 8) for a
# row dominated by one key (tests/core/test_fmha_fp8.py's docstring).
FP8_FAST_LSE_ABS = 0.13


def check_fmha_output(out, lse, ref_o, ref_lse, o_bound: float, lse_abs: float = 0.0) -> None:
    """A kernel's O / LSE against the fp32 reference: every element written (outputs were NaN-poisoned), O rel-L2 <
    ``o_bound``, LSE -inf exactly where a row sees no key (and O 0 there), LSE within lse_abs + 2e-3 * max(1, |lse|)."""
    assert not torch.isnan(out).any(), "unwritten (NaN-poisoned) output elements"
    assert not torch.isnan(lse).any(), "unwritten (NaN-poisoned) LSE elements"
    if out.numel():
        rel = ((out.float() - ref_o).norm() / ref_o.norm().clamp_min(1e-6)).item()
        assert rel < o_bound, f"rel L2 error {rel:.3e} >= {o_bound}"
    dead = torch.isinf(ref_lse)
    assert torch.equal(torch.isinf(lse) & (lse < 0), dead), "LSE must be -inf exactly where a row sees no key"
    assert (out[dead.unsqueeze(-1).expand_as(out)] == 0).all(), "rows that see no key must output 0"
    live = ~dead
    if live.any():
        err = (lse[live] - ref_lse[live]).abs()
        assert (err <= lse_abs + 2e-3 * ref_lse[live].abs().clamp_min(1.0)).all(), f"LSE max err {err.max().item():.3e}"


def paged_cache(k, v, kv_lens, page: int = 128, seed: int = 0, spare_pages: int = 0):
    """Ragged K/V ``[total_kv, Hkv, D]`` scattered into a shuffled page pool ``[pages + spare_pages, Hkv, page, D]``
    (request-major logical pages, each at a random physical page). Slots no request owns (spare pages, the tail of a
    request's last page) hold NaN: the kernels must mask K there and keep V there out of the PV GEMM (0 * NaN = NaN),
    so any garbage that reaches an output shows up as NaN.
    Returns ``(k_pages, v_pages, kv_indices)`` (int32 flat page table, on k's device)."""
    n_pages = sum(-(-n // page) for n in kv_lens)
    pool = n_pages + spare_pages
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(pool, generator=g)[:n_pages].to(torch.int32)
    hkv = k.shape[1]
    kp = torch.full((pool, hkv, page, k.shape[2]), float("nan"), dtype=k.dtype, device=k.device)
    vp = torch.full((pool, hkv, page, v.shape[2]), float("nan"), dtype=v.dtype, device=v.device)  # Dv may differ
    t = p = 0
    for n in kv_lens:
        for j in range(-(-n // page)):
            rows = min(page, n - j * page)
            kp[perm[p], :, :rows] = k[t + j * page : t + j * page + rows].transpose(0, 1)
            vp[perm[p], :, :rows] = v[t + j * page : t + j * page + rows].transpose(0, 1)
            p += 1
        t += n
    return kp, vp, perm.to(k.device)


def need_kernel(kernel) -> None:
    """Skip the calling GPU test, with the reason, unless a CUDA device is present and ``kernel.available`` (an
    msa-core kernel module: fmha_sm90, kv_dequant, qouter_union, sparse_decode, ...) accepts it."""
    import pytest

    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    ok, why = kernel.available(torch.device("cuda"))
    if not ok:
        pytest.skip(why)


def built_module(spec, arch: str):
    """Compile tests: build ``spec(arch)`` through msa-cache and return the module file's path (skip, with the
    reason, on a host without a CUDA toolchain)."""
    from pathlib import Path

    import pytest
    from msa.core.jit.toolchain import ToolchainError

    try:
        entry = spec(arch).build()
    except ToolchainError as e:
        pytest.skip(f"no CUDA toolchain: {e}")
    return Path(entry.file("module.so"))
