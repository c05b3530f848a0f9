"""Public dense FMHA API: :func:`fmha_plan` (host-side work) and :func:`fmha` (validate, dispatch, run).

See ``docs/API.md`` for the contract. ``fmha`` never synchronises with the host unless value checks are on
(``validate=True`` or ``MSA_VALIDATE=1``); all length bookkeeping happens once in ``fmha_plan``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from . import dispatch
from .reference import BLOCK_SIZE, default_max_k_tiles, fmha_reference
from .validation import (
    check_bool,
    check_float,
    check_int,
    check_same_device,
    check_scale,
    check_tensor,
    dtype_name,
    host_int_list,
    validation_enabled,
)

__all__ = ["FmhaPlan", "fmha_plan", "fmha"]

_INT32_MAX = 2**31 - 1
_Q_DTYPES = (torch.bfloat16, torch.float16, torch.float8_e4m3fn)
_PAGE_SIZES = (16, 32, 64, 128, 256)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _prefix(lens: list[int]) -> list[int]:
    out = [0]
    for n in lens:
        out.append(out[-1] + n)
    return out


@dataclass(eq=False)
class FmhaPlan:
    """Everything ``fmha`` needs that depends only on lengths and options (built by :func:`fmha_plan`).

    Host lists: ``qo_lens``, ``kv_lens``, ``qo_offset_host`` (effective per-request causal offset; for
    ``causal=False`` it is ``kv_len``, i.e. every key visible), ``qo_indptr_host``, ``kv_indptr_host``,
    ``kv_page_indptr_host`` (paged only). Device int32 tensors on ``device``: ``qo_indptr [batch+1]``,
    ``kv_indptr [batch+1]``, ``kv_page_indptr [batch+1]`` (None when ragged), ``qo_offset [batch]``.
    ``kernel`` is a free-form slot the kernel planner fills (tile choices, workspaces, ...).
    """

    batch: int
    num_qo_heads: int
    num_kv_heads: int
    page_size: int | None
    causal: bool
    output_maxscore: bool
    kv_block_num: int | None
    device: torch.device
    total_q: int
    total_kv: int
    max_qo_len: int
    max_kv_len: int
    num_pages: int  # sum(ceil(kv_len / page_size)); 0 when ragged
    max_k_tiles: int  # ceil(ceil(max_kv_len/128)/128)*128: max_score's tile axis
    qo_lens: list[int] = field(repr=False)
    kv_lens: list[int] = field(repr=False)
    qo_offset_host: list[int] = field(repr=False)
    qo_indptr_host: list[int] = field(repr=False)
    kv_indptr_host: list[int] = field(repr=False)
    kv_page_indptr_host: list[int] | None = field(repr=False)
    qo_indptr: torch.Tensor = field(repr=False)
    kv_indptr: torch.Tensor = field(repr=False)
    kv_page_indptr: torch.Tensor | None = field(repr=False)
    qo_offset: torch.Tensor = field(repr=False)
    kernel: dict = field(default_factory=dict, repr=False)

    @property
    def paged(self) -> bool:
        return self.page_size is not None


def _plan_device(device, qo_lens, kv_lens) -> torch.device:
    if device is None:
        for t in (qo_lens, kv_lens):
            if isinstance(t, torch.Tensor):
                device = t.device
                break
        else:
            device = torch.device("cpu")
    if isinstance(device, (str, int)):
        device = torch.device(device)
    if not isinstance(device, torch.device):
        raise TypeError(f"device: expected a torch.device or str, got {type(device).__name__}")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def fmha_plan(
    qo_lens,
    kv_lens,
    num_qo_heads: int,
    num_kv_heads: int | None = None,
    *,
    page_size: int | None = None,
    causal: bool = True,
    qo_offset=None,
    output_maxscore: bool = False,
    kv_block_num: int | None = None,
    device=None,
) -> FmhaPlan:
    """Host-side planning for :func:`fmha` (see ``docs/API.md``).

    ``device=None`` means the device of ``qo_lens``/``kv_lens`` when they are tensors, else the CPU.
    ``num_kv_heads=None`` means ``num_qo_heads``. ``qo_offset`` (causal only) must lie in
    ``[-qo_len, kv_len]`` per request.
    """
    device = _plan_device(device, qo_lens, kv_lens)
    qo = host_int_list("qo_lens", qo_lens, min=0)
    kv = host_int_list("kv_lens", kv_lens, min=0)
    if len(qo) != len(kv):
        raise ValueError(f"kv_lens: expected {len(qo)} entries (one per request, as qo_lens), got {len(kv)}")
    hq = check_int("num_qo_heads", num_qo_heads, min=1)
    hkv = hq if num_kv_heads is None else check_int("num_kv_heads", num_kv_heads, min=1)
    if hq % hkv:
        raise ValueError(f"num_kv_heads: expected a divisor of num_qo_heads = {hq}, got {hkv}")
    if page_size is not None:
        check_int("page_size", page_size, choices=_PAGE_SIZES)
    causal = check_bool("causal", causal)
    output_maxscore = check_bool("output_maxscore", output_maxscore)
    if kv_block_num is not None:
        check_int("kv_block_num", kv_block_num, min=1)
    batch = len(qo)

    if causal:
        if qo_offset is None:
            offs = [k_ - q_ for q_, k_ in zip(qo, kv)]
        elif isinstance(qo_offset, int) and not isinstance(qo_offset, bool):
            offs = [qo_offset] * batch
        else:
            offs = host_int_list("qo_offset", qo_offset)
            if len(offs) != batch:
                raise ValueError(f"qo_offset: expected {batch} entries (one per request), got {len(offs)}")
        for b, (o, q_, k_) in enumerate(zip(offs, qo, kv)):
            if not -q_ <= o <= k_:
                raise ValueError(
                    f"qo_offset[{b}]: expected a value in [-qo_len, kv_len] = [{-q_}, {k_}] "
                    f"(query i sees keys j <= i + qo_offset), got {o}"
                )
    else:
        if qo_offset is not None:
            raise ValueError("qo_offset: only meaningful with causal=True (non-causal queries see every key)")
        offs = list(kv)

    qo_indptr, kv_indptr = _prefix(qo), _prefix(kv)
    total_q, total_kv = qo_indptr[-1], kv_indptr[-1]
    page_indptr = _prefix([_cdiv(n, page_size) for n in kv]) if page_size is not None else None
    for name, total in (("qo_lens", total_q), ("kv_lens", total_kv)):
        if total > _INT32_MAX:
            raise ValueError(f"{name}: expected a sum that fits int32 (<= {_INT32_MAX}), got {total}")
    max_kv = max(kv, default=0)

    # One host->device copy for all index tensors; the plan keeps views into it.
    host = qo_indptr + kv_indptr + (page_indptr or []) + offs
    packed = torch.tensor(host, dtype=torch.int32).to(device)
    n = batch + 1
    views = packed.split([n, n, n if page_indptr else 0, batch])

    return FmhaPlan(
        batch=batch,
        num_qo_heads=hq,
        num_kv_heads=hkv,
        page_size=page_size,
        causal=causal,
        output_maxscore=output_maxscore,
        kv_block_num=kv_block_num,
        device=device,
        total_q=total_q,
        total_kv=total_kv,
        max_qo_len=max(qo, default=0),
        max_kv_len=max_kv,
        num_pages=page_indptr[-1] if page_indptr else 0,
        max_k_tiles=default_max_k_tiles(max_kv),
        qo_lens=qo,
        kv_lens=kv,
        qo_offset_host=offs,
        qo_indptr_host=qo_indptr,
        kv_indptr_host=kv_indptr,
        kv_page_indptr_host=page_indptr,
        qo_indptr=views[0],
        kv_indptr=views[1],
        kv_page_indptr=views[2] if page_indptr else None,
        qo_offset=views[3],
    )


def _check_fmha_args(q, k, v, plan, kv_indices, kv_block_indexes, out, max_score, output_o, output_maxscore):
    """Metadata-only checks (no host synchronisation). Returns ``(d_qk, d_v, out_dtype)``."""
    hq, hkv = plan.num_qo_heads, plan.num_kv_heads
    check_tensor("q", q, dtype=_Q_DTYPES, ndim=3, shape=[plan.total_q, hq, None], device=plan.device, contiguous=True)
    d_qk = q.shape[2]
    if d_qk == 0:
        raise ValueError("q: expected a head dim (shape[2]) > 0, got 0")
    check_tensor("k", k)
    fp8_cache = k.dtype == torch.float8_e4m3fn and q.dtype in (torch.bfloat16, torch.float16)
    if k.dtype != q.dtype and not fp8_cache:
        raise TypeError(f"k: expected dtype {dtype_name(q.dtype)} (q's dtype; an fp8 e4m3 K/V cache under a bf16 / "
                        f"fp16 q also works), got {dtype_name(k.dtype)}")
    if plan.paged:
        ps = plan.page_size
        if k.dim() != 4 or k.shape[1:] != (hkv, ps, d_qk):
            raise ValueError(
                f"k: plan is paged (page_size={ps}): expected shape [pages, {hkv}, {ps}, {d_qk}], got {list(k.shape)}"
            )
    elif k.dim() != 3 or k.shape != (plan.total_kv, hkv, d_qk):
        raise ValueError(
            f"k: plan is ragged (page_size=None): expected shape [{plan.total_kv}, {hkv}, {d_qk}] "
            f"([total_kv, Hkv, Dqk]), got {list(k.shape)}"
        )
    check_tensor("k", k, device=q.device, contiguous=True)
    d_v = None
    if v is None:
        if output_o:
            raise TypeError("v: expected a torch.Tensor (needed unless output_o=False), got None")
    else:
        check_tensor("v", v)
        if v.dtype != k.dtype:
            raise TypeError(f"v: expected dtype {dtype_name(k.dtype)} (k's dtype), got {dtype_name(v.dtype)}")
        if v.dim() != k.dim() or v.shape[:-1] != k.shape[:-1] or v.shape[-1] == 0:
            raise ValueError(
                f"v: expected shape {list(k.shape[:-1]) + ['Dv']} (k's leading dims, Dv > 0), got {list(v.shape)}"
            )
        check_tensor("v", v, device=q.device, contiguous=True)
        d_v = v.shape[-1]

    if plan.paged:
        check_tensor(
            "kv_indices",
            kv_indices,
            dtype=torch.int32,
            ndim=1,
            shape=[plan.num_pages],
            device=q.device,
            contiguous=True,
        )
    elif kv_indices is not None:
        raise ValueError("kv_indices: given, but the plan is ragged (page_size=None); pass page_size to fmha_plan")

    if plan.kv_block_num is None:
        if kv_block_indexes is not None:
            raise ValueError("kv_block_indexes: given, but the plan was made without kv_block_num")
    else:
        if kv_block_indexes is None:
            raise TypeError(
                f"kv_block_indexes: expected a tensor (the plan has kv_block_num={plan.kv_block_num}), got None"
            )
        check_tensor(
            "kv_block_indexes",
            kv_block_indexes,
            dtype=torch.int32,
            ndim=3,
            shape=[plan.total_q, hkv, plan.kv_block_num],
            device=q.device,
            contiguous=True,
        )

    out_dtype = torch.bfloat16 if q.dtype == torch.float8_e4m3fn else q.dtype
    if out is not None:
        if not output_o:
            raise ValueError("out: given, but output_o=False")
        check_tensor("out", out, dtype=out_dtype, shape=[plan.total_q, hq, d_v], device=q.device, contiguous=True)
    if max_score is not None:
        check_tensor(
            "max_score",
            max_score,
            dtype=torch.float32,
            shape=[hq, plan.max_k_tiles, plan.total_q],
            device=q.device,
            contiguous=True,
        )
    return d_qk, d_v, out_dtype


def _first_bad(mask: torch.Tensor) -> tuple[int, ...]:
    return tuple(int(i) for i in mask.nonzero()[0].tolist())


def _check_fmha_values(k, plan, kv_indices, kv_block_indexes) -> None:
    """Value checks (host synchronisation): page ids in range; per-token block lists well formed."""
    if kv_indices is not None and kv_indices.numel():
        bad = (kv_indices < 0) | (kv_indices >= k.shape[0])
        if bool(bad.any()):
            (i,) = _first_bad(bad)
            raise ValueError(
                f"kv_indices[{i}]: expected a page id in [0, {k.shape[0]}) (k.shape[0]), got {int(kv_indices[i])}"
            )
    if kv_block_indexes is None or kv_block_indexes.numel() == 0:
        return
    idx = kv_block_indexes
    blocks_per_req = torch.tensor([_cdiv(n, BLOCK_SIZE) for n in plan.kv_lens], dtype=torch.int64)
    reps = torch.tensor(plan.qo_lens, dtype=torch.int64)
    limit = torch.repeat_interleave(blocks_per_req, reps).to(idx.device).view(-1, 1, 1)
    checks = [
        (idx < -1, "expected a block id >= 0 or the -1 tail marker"),
        ((idx >= 0) & (idx >= limit), "expected a block id < ceil(kv_len/128) of the token's request"),
    ]
    if idx.shape[2] > 1:
        prev, nxt = idx[..., :-1], idx[..., 1:]
        pad = torch.zeros_like(idx[..., :1], dtype=torch.bool)
        checks.append(
            (
                torch.cat([pad, (prev == -1) & (nxt != -1)], dim=-1),
                "-1 is only allowed as a tail (got a block after -1)",
            )
        )
        checks.append((torch.cat([pad, (nxt >= 0) & (nxt <= prev)], dim=-1), "expected strictly ascending block ids"))
    for bad, why in checks:
        if bool(bad.any()):
            t, h, s = _first_bad(bad)
            row = idx[t, h].tolist()
            lim = int(limit[t, 0, 0])
            raise ValueError(f"kv_block_indexes[{t}, {h}, {s}]: {why} (row {row}, request has {lim} blocks)")


def fmha(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor | None,
    plan: FmhaPlan,
    *,
    kv_indices: torch.Tensor | None = None,
    kv_block_indexes: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    max_score: torch.Tensor | None = None,
    sm_scale: float | None = None,
    q_scale=None,
    k_scale=None,
    v_scale=None,
    o_scale=None,
    output_o: bool = True,
    output_maxscore: bool = False,
    return_lse: bool = False,
    validate: bool | None = None,
    backend: str | None = None,
):
    """Dense / paged / per-token block-sparse attention with optional max-score output (``docs/API.md``).

    Returns ``(out | None, max_score | None)``, or ``(out | None, max_score | None, lse)`` with ``return_lse``.
    Passing ``max_score`` implies ``output_maxscore=True``; ``output_maxscore`` needs a plan made with
    ``output_maxscore=True``; ``return_lse`` needs ``output_o``.
    """
    if not isinstance(plan, FmhaPlan):
        raise TypeError(f"plan: expected an FmhaPlan from fmha_plan(), got {type(plan).__name__}")
    output_o = check_bool("output_o", output_o)
    output_maxscore = check_bool("output_maxscore", output_maxscore) or max_score is not None
    return_lse = check_bool("return_lse", return_lse)
    if not output_o and not output_maxscore:
        raise ValueError("output_o: nothing to compute (output_o=False and output_maxscore=False)")
    if return_lse and not output_o:
        raise ValueError("return_lse: needs output_o=True (the score-only pass computes no softmax)")
    if output_maxscore and not plan.output_maxscore:
        raise ValueError("output_maxscore: the plan was made with output_maxscore=False; pass it to fmha_plan too")
    d_qk, _, _ = _check_fmha_args(
        q, k, v, plan, kv_indices, kv_block_indexes, out, max_score, output_o, output_maxscore
    )
    check_same_device(
        q=q, k=k, v=v, kv_indices=kv_indices, kv_block_indexes=kv_block_indexes, out=out, max_score=max_score
    )
    sm = check_float("sm_scale", sm_scale, allow_none=True)
    sm = 1.0 / math.sqrt(d_qk) if sm is None else sm
    for name, s, heads, what in (
        ("q_scale", q_scale, plan.num_qo_heads, "query heads"),
        ("k_scale", k_scale, plan.num_kv_heads, "KV heads"),
        ("v_scale", v_scale, plan.num_kv_heads, "KV heads"),
        ("o_scale", o_scale, plan.num_qo_heads, "query heads"),
    ):
        check_scale(name, s, heads=heads, device=q.device, what=what)
    if validation_enabled(validate):
        _check_fmha_values(k, plan, kv_indices, kv_block_indexes)

    chosen = dispatch.select_backend(
        "fmha",
        q.device,
        backend,
        dtype=q.dtype,
        kv_dtype=k.dtype,
        head_dim_qk=d_qk,
        head_dim_v=v.shape[-1] if v is not None else None,
        page_size=plan.page_size,
        output_o=output_o,
        output_maxscore=output_maxscore,
        sparse=kv_block_indexes is not None,
        per_head_scales=any(isinstance(s, torch.Tensor) for s in (q_scale, k_scale, v_scale, o_scale)),
        gqa_ratio=plan.num_qo_heads // max(plan.num_kv_heads, 1),
    )
    if chosen == "sparse_decode":
        from .kernels import sparse_decode  # noqa: PLC0415 - kernels load lazily (JIT, CUDA)

        return sparse_decode.run(
            q, k, v, plan, kv_indices=kv_indices, kv_block_indexes=kv_block_indexes, out=out, sm_scale=sm,
            q_scale=q_scale, k_scale=k_scale, v_scale=v_scale, o_scale=o_scale, return_lse=return_lse,
        )
    if chosen != "reference":
        from .kernels import fmha_sm90  # noqa: PLC0415 - kernels load lazily (JIT, CUDA)

        return fmha_sm90.run(
            q,
            k,
            v,
            plan,
            kv_indices=kv_indices,
            kv_block_indexes=kv_block_indexes,
            out=out,
            max_score=max_score,
            sm_scale=sm,
            q_scale=q_scale,
            k_scale=k_scale,
            v_scale=v_scale,
            o_scale=o_scale,
            output_o=output_o,
            output_maxscore=output_maxscore,
            return_lse=return_lse,
        )

    o, ms, lse = fmha_reference(
        q,
        k,
        v if output_o else None,
        qo_lens=plan.qo_lens,
        kv_lens=plan.kv_lens,
        page_size=plan.page_size,
        kv_indices=kv_indices,
        kv_page_indptr=plan.kv_page_indptr_host,
        causal=plan.causal,
        qo_offset=plan.qo_offset_host,
        kv_block_indexes=kv_block_indexes,
        sm_scale=sm,
        q_scale=q_scale,
        k_scale=k_scale,
        v_scale=v_scale,
        o_scale=o_scale,
        output_o=output_o,
        output_maxscore=output_maxscore,
        max_k_tiles=plan.max_k_tiles,
        return_lse=return_lse,
        out=out,
        max_score=max_score,
    )
    return (o, ms, lse) if return_lse else (o, ms)
