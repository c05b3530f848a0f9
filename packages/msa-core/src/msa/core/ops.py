"""torch custom ops (``torch.ops.msa.*``) wrapping msa-core kernels.

Registering the kernels as ``torch.library`` custom ops makes them opaque, correctly-described nodes for
``torch.compile`` (no graph break, no tracing into tvm-ffi) and keeps them safe under CUDA graph capture: the ops
mutate caller-provided outputs, never synchronise with the host and allocate only through torch's caching
allocator. The public functions (:func:`msa.core.sparse_topk_select`, ...) validate, then call these ops.
"""

from typing import Optional

import torch

__all__ = ["sparse_topk_select_out"]


@torch.library.custom_op("msa::sparse_topk_select_out", mutates_args=("out",))
def sparse_topk_select_out(
    max_score: torch.Tensor,
    topk: int,
    num_valid_pages: Optional[torch.Tensor],  # noqa: UP045 - torch.library parses this annotation
    num_valid_pages_scalar: int,
    force_begin_blocks: int,
    force_end_blocks: int,
    out: torch.Tensor,
) -> None:
    """Kernel top-k select into ``out`` (arguments already validated by msa.core.topk.sparse_topk_select)."""
    from msa.core.kernels import topk as topk_kernel

    nvp = num_valid_pages if num_valid_pages is not None else num_valid_pages_scalar
    topk_kernel.run(max_score, topk, nvp, force_begin_blocks, force_end_blocks, out)


@sparse_topk_select_out.register_fake
def _(max_score, topk, num_valid_pages, num_valid_pages_scalar, force_begin_blocks, force_end_blocks, out):
    return None
