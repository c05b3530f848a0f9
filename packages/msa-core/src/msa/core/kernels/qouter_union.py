"""Q-outer union tables on the GPU (``csrc/qouter_union``): the CUDA twin of ``msa.cute.qouter.build_qouter_unions``.

Same contract, bit for bit (see ``msa.cute.qouter``'s module docstring): per work item (``T`` tokens x one KV
head) the ascending distinct selected block ids ``union [num_items, umax]`` (rest 0), ``union_len [num_items]``
(``U``, or ``-1`` when ``U > min(umax, route_max)``: the item is not routed and its rows are all 0), the token bit
mask ``mask [num_items, umax, ceil(T / 32)]`` and ``order [num_items]`` (the sequence the kernel's persistent CTAs take
items in: :func:`item_order`).
An entry counts iff its token is live (``t < item_ntok``), ``0 <= id < item_kv_blocks`` (when given) and
``id < INT32_MAX // T``; duplicate ids collapse. Rows of ``kv_block_indexes`` are read at
``clamp(item_token0 + t, 0, total_q - 1)`` like the torch builder; an item whose KV head is out of range (only
possible with validation off) selects nothing instead of reading out of bounds.

One warp per item, shared-memory bitmap over the item's id range (see ``qouter_union_kernel.cuh``); ``order`` is
:func:`item_order` on the device. No host synchronisation (unless ``validate``), CUDA-graph safe for
fixed shapes. Importing this module compiles nothing; the module is JIT-built on first use.
``msa.cute.qouter.build_qouter_unions`` calls :func:`build` for CUDA tensors (``MSA_QOUTER_UNION``: ``auto``
default, ``torch`` forces the torch ops, ``cuda`` requires this kernel). Tests: tests/core/test_qouter_union.py
(a host replay of the kernel code on CPU, the module on the GPU, both against the torch builder bit for bit).
"""

from __future__ import annotations

import os

import torch
from msa.core.validation import check_int, check_tensor, validation_enabled

from ._device import cuda_kernel_available, module_for_device

__all__ = ["build", "launch", "available", "spec", "jit_specs", "load_module", "item_order", "BITMAP_WORDS"]

FAMILY = "qouter_union"
SOURCES = ("qouter_union.cu.jinja",)
BITMAP_WORDS = 256  # 8192 ids per window: a whole 1M-token request in one pass
MASK_BITS = 32
INT32_MAX = 2**31 - 1
MAX_T = 4096


ORDER_ENV = "MSA_QOUTER_ORDER"
ORDERS = ("auto", "tile", "lpt")
# auto: "tile" from this many items on (~15 waves of 132 SMs: the load-balance tail LPT saves is a small fraction of
# the run there, while L2 reuse of the blocks neighbouring tokens share is worth more), "lpt" below it.
ORDER_TILE_MIN_ITEMS = 2048


_TILE_ORDERS: dict = {}  # (n, device) -> int32 arange(n), shared read-only


def _tile_order(n: int, device: torch.device) -> torch.Tensor:
    """``arange(n)`` (int32) on ``device``, made once per (n, device) for eager calls and then shared: the per-call
    arange was one more kernel launch in every Q-outer call (and the pair kernel does not read it). The tensor is
    read-only by contract (the kernels only read ``order``). Under CUDA-graph capture a fresh arange is recorded
    instead: a captured graph keeps raw pointers, and a cached tensor may be evicted (freed) while the graph lives."""
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return torch.arange(n, dtype=torch.int32, device=device)
    key = (n, str(device))
    t = _TILE_ORDERS.get(key)
    if t is None:
        if len(_TILE_ORDERS) >= 64:
            _TILE_ORDERS.pop(next(iter(_TILE_ORDERS)))
        t = _TILE_ORDERS[key] = torch.arange(n, dtype=torch.int32, device=device)
    return t


def item_order(union_len: torch.Tensor, policy: str | None = None) -> torch.Tensor:
    """The sequence (int32 ``[num_items]``) the Q-outer kernel's persistent CTAs take items in, on ``union_len``'s
    device. ``policy`` (default ``$MSA_QOUTER_ORDER`` or ``"auto"``):

    - ``"tile"``: the enumeration order (token tile major, KV head minor), so the CTAs in flight work on neighbouring
      tokens, whose selections overlap: their blocks are read from HBM about once and then hit L2 (a 64/4 S128K
      layer's K/V are ~270 MB, five times L2);
    - ``"lpt"``: ``union_len`` descending, stable (longest first, unrouted last): the best load balance for few items;
    - ``"auto"``: ``"tile"`` from ``ORDER_TILE_MIN_ITEMS`` items on, else ``"lpt"``.

    Both builders (torch and CUDA) call this, so their outputs stay bit-identical."""
    policy = policy or os.environ.get(ORDER_ENV, "auto")
    if policy not in ORDERS:
        raise ValueError(f"{ORDER_ENV}: expected one of {ORDERS}, got {policy!r}")
    n = int(union_len.shape[0])
    if policy == "auto":
        policy = "tile" if n >= ORDER_TILE_MIN_ITEMS else "lpt"
    if policy == "tile":
        return _tile_order(n, union_len.device)
    return torch.sort(union_len, descending=True, stable=True).indices.to(torch.int32)


def spec(arch: str):
    from msa.core.jit import JitSpec

    return JitSpec(family=FAMILY, sources=SOURCES, params={"bitmap_words": BITMAP_WORDS}, arch=arch,
                   use_cutlass=False)


def jit_specs(preset: dict, arch: str) -> list:
    """Warmup hook (msa.core.variants): one small module per arch serves every shape."""
    return [spec(arch)]


def load_module(device: torch.device):
    return module_for_device(spec, device)


def available(device) -> tuple[bool, str]:
    """Cheap (no compilation): a CUDA device of a supported compute capability and tvm-ffi importable."""
    return cuda_kernel_available(device, "the Q-outer union builder")


def check_item_tables(kv_block_indexes, item_token0, item_ntok, item_kv_head, item_kv_blocks, *, num_items: int,
                      T: int, validate: bool | None = None) -> None:
    """The Q-outer item tables' dtype / shape / device (always) and values (with validation on: one device -> host
    copy). Shared by this kernel's :func:`build` and ``msa.cute.qouter.build_qouter_unions``."""
    dev = kv_block_indexes.device
    for name, t in (("item_token0", item_token0), ("item_ntok", item_ntok), ("item_kv_head", item_kv_head),
                    ("item_kv_blocks", item_kv_blocks)):
        if t is not None:
            check_tensor(name, t, dtype=torch.int32, ndim=1, shape=[num_items], device=dev)
    if validation_enabled(validate):
        _validate_items(kv_block_indexes, item_token0, item_ntok, item_kv_head, T)


def _validate_items(kv_block_indexes, item_token0, item_ntok, item_kv_head, T: int) -> None:
    total_q, hkv, _ = kv_block_indexes.shape
    t0 = item_token0.cpu().to(torch.int64)
    nt = item_ntok.cpu().to(torch.int64)
    hh = item_kv_head.cpu().to(torch.int64)
    for name, bad, what in (
        ("item_ntok", (nt < 1) | (nt > T), f"in [1, T = {T}]"),
        ("item_token0", (t0 < 0) | (t0 + nt > total_q), f"with item_token0 + item_ntok <= total_q = {total_q}"),
        ("item_kv_head", (hh < 0) | (hh >= hkv), f"in [0, Hkv = {hkv})"),
    ):
        if bool(bad.any()):
            i = int(bad.nonzero()[0])
            raise ValueError(f"{name}: expected values {what}; item {i} has token0 {int(t0[i])}, ntok {int(nt[i])}, "
                             f"kv head {int(hh[i])}")


def launch(kv_block_indexes, item_token0, item_ntok, item_kv_head, item_kv_blocks, union, union_len, mask, *,
           T: int, umax: int, cap: int, in_place: bool = False) -> None:
    """One kernel launch on the current stream writing ``union`` / ``union_len`` / ``mask`` whole; arguments
    already validated (the binding re-checks shapes). ``in_place`` forces the global-memory row path (tests)."""
    kv_blocks = item_kv_blocks if item_kv_blocks is not None else union_len
    load_module(kv_block_indexes.device).qouter_union(
        kv_block_indexes, item_token0, item_ntok, item_kv_head, kv_blocks, union, union_len, mask,
        T, umax, cap, item_kv_blocks is not None, bool(in_place),
    )


def build(
    kv_block_indexes: torch.Tensor,
    item_token0: torch.Tensor,
    item_ntok: torch.Tensor,
    item_kv_head: torch.Tensor,
    *,
    T: int,
    num_items: int,
    umax: int | None = None,
    route_max: int | None = None,
    item_kv_blocks: torch.Tensor | None = None,
    validate: bool | None = None,
    in_place: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(union, union_len, mask, order)`` of the Q-outer items on the GPU; arguments as
    ``msa.cute.qouter.build_qouter_unions`` (which calls this for CUDA tensors). ``kv_block_indexes`` may be any
    strided int32 ``[total_q, Hkv, topk]`` view; the item tables must be contiguous on the same device."""
    check_tensor("kv_block_indexes", kv_block_indexes, dtype=torch.int32, ndim=3)
    dev = kv_block_indexes.device
    ok, why = available(dev)
    if not ok:
        raise RuntimeError(f"kv_block_indexes: the Q-outer union kernel is not available ({why})")
    T = check_int("T", T, min=1, max=MAX_T)
    num_items = check_int("num_items", num_items, min=0)
    umax = T * kv_block_indexes.shape[2] if umax is None else check_int("umax", umax, min=0)
    cap = umax
    if route_max is not None:
        cap = min(umax, check_int("route_max", route_max, min=0))
    check_item_tables(kv_block_indexes, item_token0, item_ntok, item_kv_head, item_kv_blocks, num_items=num_items,
                      T=T, validate=validate)
    total_q, _, topk = kv_block_indexes.shape
    words = -(-T // MASK_BITS)
    i32 = dict(dtype=torch.int32, device=dev)
    if num_items == 0 or total_q == 0 or topk == 0:  # as the torch builder: every item routed with U = 0
        return (torch.zeros(num_items, umax, **i32), torch.zeros(num_items, **i32),
                torch.zeros(num_items, umax, words, **i32), torch.arange(num_items, **i32))
    union = torch.empty(num_items, umax, **i32)
    union_len = torch.empty(num_items, **i32)
    mask = torch.empty(num_items, umax, words, **i32)
    tables = [t.contiguous() for t in (item_token0, item_ntok, item_kv_head)]
    kvb = item_kv_blocks.contiguous() if item_kv_blocks is not None else None
    launch(kv_block_indexes, *tables, kvb, union, union_len, mask, T=T, umax=umax, cap=cap, in_place=in_place)
    return union, union_len, mask, item_order(union_len)
