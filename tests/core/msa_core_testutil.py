"""Helpers shared by the msa-core tests (a plain module: test files must not import conftest)."""

from __future__ import annotations

import torch


def check_fmha_output(out, lse, ref_o, ref_lse, o_bound: float) -> None:
    """A kernel's O / LSE against the fp32 reference: every element written (outputs were NaN-poisoned), O rel-L2 <
    ``o_bound``, LSE -inf exactly where a row sees no key (and O 0 there), LSE within 2e-3 * max(1, |lse|)."""
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
        assert (err <= 2e-3 * ref_lse[live].abs().clamp_min(1.0)).all(), f"LSE max err {err.max().item():.3e}"
