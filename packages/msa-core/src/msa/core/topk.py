"""Public top-k block selection over the index pass's max-score tensor (``docs/API.md``)."""

from __future__ import annotations

import torch

from . import dispatch
from .reference import sparse_topk_select_reference
from .validation import check_int, check_tensor, validation_enabled

__all__ = ["sparse_topk_select", "MAX_TOPK"]

MAX_TOPK = 64


def sparse_topk_select(
    max_score: torch.Tensor,
    topk: int,
    *,
    num_valid_pages=None,
    force_begin_blocks: int = 0,
    force_end_blocks: int = 0,
    out: torch.Tensor | None = None,
    validate: bool | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Per (token, head) top-``topk`` block ids of ``max_score [H, K, total_q]`` -> ``[total_q, H, topk]`` int32.

    Forced blocks ``0..force_begin_blocks-1`` and ``nvp-force_end_blocks..nvp-1`` (clipped to ``[0, nvp)``) are
    always chosen; the other slots take the best-scoring blocks ``b < nvp`` with score ``> -inf`` (NaN counts as
    ``-inf``), ties toward the lower index. Output ascending, ``-1`` tail. ``num_valid_pages``: None (= K), an
    int in ``[0, K]``, or a ``[total_q]`` int32 tensor on ``max_score``'s device (range-checked only when
    validation is on).
    """
    check_tensor("max_score", max_score, dtype=(torch.float32, torch.bfloat16), ndim=3, contiguous=True)
    n_heads, n_blocks, total_q = max_score.shape
    topk = check_int("topk", topk, min=1, max=MAX_TOPK)
    fb = check_int("force_begin_blocks", force_begin_blocks, min=0)
    fe = check_int("force_end_blocks", force_end_blocks, min=0)
    if fb + fe > topk:
        raise ValueError(
            f"force_end_blocks: expected force_begin_blocks + force_end_blocks <= topk = {topk}, got {fb} + {fe} = {fb + fe}"
        )
    device = max_score.device
    if num_valid_pages is None:
        nvp = n_blocks
    elif isinstance(num_valid_pages, torch.Tensor):
        check_tensor(
            "num_valid_pages",
            num_valid_pages,
            dtype=torch.int32,
            ndim=1,
            shape=[total_q],
            device=device,
            contiguous=True,
        )
        nvp = num_valid_pages
        if validation_enabled(validate) and nvp.numel():
            bad = (nvp < 0) | (nvp > n_blocks)
            if bool(bad.any()):
                i = int(bad.nonzero()[0, 0])
                raise ValueError(
                    f"num_valid_pages[{i}]: expected a value in [0, {n_blocks}] (max_score.shape[1]), got {int(nvp[i])}"
                )
    else:
        nvp = check_int("num_valid_pages", num_valid_pages, min=0, max=n_blocks)
    if out is not None:
        check_tensor("out", out, dtype=torch.int32, shape=[total_q, n_heads, topk], device=device, contiguous=True)
    else:
        out = torch.empty((total_q, n_heads, topk), dtype=torch.int32, device=device)

    chosen = dispatch.select_backend("sparse_topk_select", device, backend)
    if chosen != "reference":
        from .ops import sparse_topk_select_out  # noqa: PLC0415 - kernels load lazily (JIT, CUDA)

        nvp_tensor = nvp if isinstance(nvp, torch.Tensor) else None
        nvp_scalar = 0 if nvp_tensor is not None else int(nvp)
        sparse_topk_select_out(max_score, topk, nvp_tensor, nvp_scalar, fb, fe, out)
        return out
    return sparse_topk_select_reference(
        max_score, topk, num_valid_pages=nvp, force_begin_blocks=fb, force_end_blocks=fe, out=out
    )
