"""msa-cache warmup generator entry point (``msa.cache.generators``: ``msa-cute = msa.cute.variants:generate``).

No CuTe-DSL kernels are registered yet, so there is nothing to pre-compile: the generator returns ``[]``. When the
sparse prefill / decode / indexer kernels land, this yields one variant per (kernel, dtype, topk, GQA, arch) of
the preset.
"""

from __future__ import annotations

__all__ = ["generate"]


def generate(preset: dict, archs: list[str]) -> list:
    """Variants of msa-cute kernels to warm for ``preset`` on ``archs`` (none yet)."""
    if not isinstance(preset, dict):
        raise TypeError(f"preset: expected a dict, got {type(preset).__name__}")
    if not isinstance(archs, (list, tuple)) or not all(isinstance(a, str) for a in archs):
        raise TypeError(f"archs: expected a list of arch strings, got {archs!r}")
    return []
