"""msa rows: whatever msa implements today, called through its public API (docs/API.md).

A row is labelled ``msa-reference`` when :func:`msa.core.dispatch.select_backend` says the PyTorch reference
serves the op on this device, ``msa`` when a kernel does (its name goes to the console note). On a GPU the
reference is skipped for cases whose work exceeds the caps (it is fp32 PyTorch: minutes per call at 128K).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

import torch

from .cases import BLOCK, TORCH_DTYPE, Case
from .impl import Impl, Prepared, Skip


@dataclass
class RefCaps:
    max_gflop: float = 2000.0  # reference rows on a GPU: skip above this much attention work
    max_gb: float = 4.0  # ... or above this many bytes of K/V


def _api(module: str, name: str):
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise Skip(f"{module}.{name} is not available yet ({type(e).__name__}: {e})") from e


def _backend(op: str, device: torch.device, features: dict | None = None) -> str:
    """The backend msa's dispatch picks for this call (``features`` as the op passes them; dropped when the
    installed dispatch or kernel does not take them)."""
    try:
        from msa.core.dispatch import select_backend

        if features:
            try:
                return select_backend(op, device, **features)
            except TypeError:
                pass
        return select_backend(op, device)
    except ImportError as e:
        raise Skip(f"msa.core.dispatch is not importable ({e})") from e
    except Exception as e:  # MSA_BACKEND=kernel with no kernel: the row cannot run
        raise Skip(f"msa backend selection for {op} failed: {e}") from e


def _label(op: str, device: torch.device, caps: RefCaps, flops: float, kv_bytes: float, base: str = "msa",
           features: dict | None = None):
    backend = _backend(op, device, features)
    if backend == "reference":
        if device.type == "cuda" and (flops > caps.max_gflop * 1e9 or kv_bytes > caps.max_gb * 1e9):
            raise Skip(f"{op} runs the PyTorch reference here; {flops / 1e9:.0f} GFLOP / {kv_bytes / 1e9:.1f} GB "
                       f"exceeds the reference caps (--ref-max-gflop {caps.max_gflop:g}, --ref-max-gb "
                       f"{caps.max_gb:g})")
        return f"{base}-reference", "PyTorch reference"
    return base, f"kernel {backend}"


def _cast(x: torch.Tensor, dtype: str) -> torch.Tensor:
    if dtype == "bf16":
        return x
    if dtype not in TORCH_DTYPE:
        raise Skip(f"msa dense/paged rows take bf16 or fp8 inputs, not {dtype}")
    return x.to(TORCH_DTYPE[dtype])


def _want(output_mode: str) -> tuple[bool, bool]:
    return output_mode in ("o", "full"), output_mode in ("maxscore", "full")


def fmha_impl(case: Case, device: torch.device, caps: RefCaps, *, paged: bool, sparse: bool, output_mode: str,
              flops: float, kv_bytes: float, work: tuple[float, float] | None = None) -> Impl:
    """msa.core.fmha on ragged or paged K/V, dense or with per-token ``kv_block_indexes``."""
    fmha = _api("msa.core", "fmha")
    fmha_plan = _api("msa.core", "fmha_plan")
    want_o, want_ms = _want(output_mode)
    if sparse:
        want_o, want_ms = True, False  # the sparse path produces O only
    features = dict(dtype=TORCH_DTYPE.get(case.dtype), head_dim_qk=case.d, head_dim_v=case.d,
                    page_size=BLOCK if paged else None, output_o=want_o, output_maxscore=want_ms, sparse=sparse,
                    per_head_scales=False, gqa_ratio=case.group)
    name, how = _label("fmha", device, caps, flops, kv_bytes, features=features)

    def prepare(inputs: dict) -> Prepared:
        b = case.batch
        plan = fmha_plan([case.q_len] * b, [case.kv_len] * b, case.hq, case.hkv,
                         page_size=BLOCK if paged else None, causal=case.causal,
                         output_maxscore=want_ms, kv_block_num=case.topk if sparse else None, device=device)
        q = _cast(inputs["q"], case.dtype)
        if paged:
            k, v = _cast(inputs["k_pages"], case.dtype), _cast(inputs["v_pages"], case.dtype)
            extra = {"kv_indices": inputs["kv_indices"]}
        else:
            k, v = _cast(inputs["k"], case.dtype), _cast(inputs["v"], case.dtype)
            extra = {}
        if sparse:
            extra["kv_block_indexes"] = inputs["kv_block_indexes"]
        out = torch.empty(case.total_q, case.hq, case.d, dtype=torch.bfloat16, device=device) if want_o else None
        ms = None
        if want_ms:
            ms = torch.empty(case.hq, plan.max_k_tiles, case.total_q, dtype=torch.float32, device=device)

        def fn():
            return fmha(q, k, v, plan, out=out, max_score=ms, output_o=want_o, output_maxscore=want_ms, **extra)

        def poison():
            for t in (out, ms):
                if t is not None:
                    t.fill_(float("nan"))

        return Prepared(fn, (lambda r: r[0]) if want_o else None, poison)

    tag = "" if output_mode == "o" or sparse else f"+{output_mode}"
    return Impl(name + tag, prepare, graph_ok=True, work=work, note=how)


def index_pass_impl(case: Case, device: torch.device, caps: RefCaps, flops: float, kv_bytes: float) -> Impl:
    """The bf16 score-only index pass: msa.core.fmha(output_o=False, output_maxscore=True)."""
    fmha = _api("msa.core", "fmha")
    fmha_plan = _api("msa.core", "fmha_plan")
    features = dict(dtype=TORCH_DTYPE.get(case.dtype), head_dim_qk=case.d, head_dim_v=case.d, page_size=None,
                    output_o=False, output_maxscore=True, sparse=False, per_head_scales=False, gqa_ratio=case.group)
    name, how = _label("fmha", device, caps, flops, kv_bytes, base="msa-index", features=features)

    def prepare(inputs: dict) -> Prepared:
        b = case.batch
        plan = fmha_plan([case.q_len] * b, [case.kv_len] * b, case.hq, case.hkv, causal=case.causal,
                         output_maxscore=True, device=device)
        q, k, v = (_cast(inputs[n], case.dtype) for n in ("q", "k", "v"))
        ms = torch.empty(case.hq, plan.max_k_tiles, case.total_q, dtype=torch.float32, device=device)
        nblk = case.num_blocks

        def fn():
            return fmha(q, k, v, plan, max_score=ms, output_o=False, output_maxscore=True)

        return Prepared(fn, lambda r: r[1][:, :nblk], lambda: ms.fill_(float("nan")))

    return Impl(name, prepare, graph_ok=True, note=how)


def topk_impl(case: Case, device: torch.device, caps: RefCaps, score_bytes: float) -> Impl:
    select = _api("msa.core", "sparse_topk_select")
    name, how = _label("sparse_topk_select", device, caps, 0.0, score_bytes)

    def prepare(inputs: dict) -> Prepared:
        scores, nvp = inputs["max_score"], inputs["num_valid_pages"]
        out = torch.empty(scores.shape[2], scores.shape[0], case.topk, dtype=torch.int32, device=device)

        def fn():
            return select(scores, case.topk, num_valid_pages=nvp, out=out)

        return Prepared(fn, lambda r: r, lambda: out.fill_(-7))

    return Impl(name, prepare, graph_ok=True, note=how)


def _sparse_prefill_features(case: Case, paged: bool) -> dict:
    """The features msa.cute.sparse_atten_func passes to its dispatch (without them the kernel's supports()
    refuses and the row would be labelled -- and skipped as -- the reference)."""
    return dict(q_dtype=torch.bfloat16, kv_dtype=torch.bfloat16, head_dim=case.d, head_dim_v=case.d, topk=case.topk,
                qhead_per_kv=case.group, paged=paged, blk_kv=BLOCK, causal=case.causal, partial_dtype=torch.bfloat16)


def cute_sparse_prefill_impl(case: Case, device: torch.device, caps: RefCaps, flops: float, kv_bytes: float) -> Impl:
    """msa.cute.sparse_atten_func on ragged K/V; the k2q CSR is built outside the timed call (it is the plan)."""
    func = _api("msa.cute", "sparse_atten_func")
    build = _api("msa.cute", "build_k2q_csr")
    name, how = _label("sparse_atten_func", device, caps, flops, kv_bytes, base="msa-cute",
                       features=_sparse_prefill_features(case, paged=False))
    if case.dtype != "bf16":
        raise Skip(f"msa-cute sparse prefill row is wired for bf16 only (asked {case.dtype})")

    def prepare(inputs: dict) -> Prepared:
        b = case.batch
        cu_q = torch.arange(0, (b + 1) * case.q_len, case.q_len, dtype=torch.int32, device=device)
        cu_k = torch.arange(0, (b + 1) * case.kv_len, case.kv_len, dtype=torch.int32, device=device)
        q2k = inputs["kv_block_indexes"].permute(1, 0, 2).contiguous()
        row_ptr, q_idx = build(q2k, cu_q, cu_k, BLOCK, total_k=case.total_kv, max_seqlen_k=case.kv_len,
                               max_seqlen_q=case.q_len, qhead_per_kv=case.group)
        q, k, v = inputs["q"], inputs["k"], inputs["v"]

        def fn():
            return func(q, k, v, row_ptr, q_idx, case.topk, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
                        max_seqlen_q=case.q_len, max_seqlen_k=case.kv_len, blk_kv=BLOCK, causal=case.causal)

        return Prepared(fn, lambda r: r[0] if isinstance(r, tuple) else r)

    return Impl(name, prepare, graph_ok=True, note=f"msa.cute.sparse_atten_func, CSR built untimed; {how}")


def cute_sparse_decode_impl(case: Case, device: torch.device, caps: RefCaps, flops: float, kv_bytes: float) -> Impl:
    func = _api("msa.cute", "sparse_decode_atten_func")
    name, how = _label("sparse_decode_atten_func", device, caps, flops, kv_bytes, base="msa-cute")
    if case.dtype != "bf16":
        raise Skip(f"msa-cute sparse decode row is wired for bf16 only (asked {case.dtype})")

    def prepare(inputs: dict) -> Prepared:
        b = case.batch
        seqused = torch.full((b,), case.kv_len, dtype=torch.int32, device=device)
        q2k = inputs["kv_block_indexes"].permute(1, 0, 2).contiguous()
        q, kp, vp, table = inputs["q"], inputs["k_pages"], inputs["v_pages"], inputs["page_table"]

        def fn():
            return func(q, kp, vp, q2k, page_table=table, seqused_k=seqused, seqlen_q=case.q_len,
                        max_seqlen_k=case.kv_len, blk_kv=BLOCK, causal=case.causal)

        return Prepared(fn, lambda r: r[0] if isinstance(r, tuple) else r)

    return Impl(name, prepare, graph_ok=True, note=f"msa.cute.sparse_decode_atten_func; {how}")


def _bridge_inputs(x: torch.Tensor, dtype: str, role: str):
    """The bridge row's tensors in the case dtype: bf16; fp8 e4m3 Q = K = V; nvfp4: bf16 Q over NVFP4 K/V
    (msa.cute.quant.Nvfp4Tensor, global scale from the amax; staged to bf16 inside the call, which is timed)."""
    if dtype == "nvfp4":
        if role == "q":
            return x
        from msa.cute.quant import quantize_nvfp4  # noqa: PLC0415

        return quantize_nvfp4(x, "auto")
    return _cast(x, dtype)


def bridge_sparse_impl(case: Case, device: torch.device, caps: RefCaps, flops: float, kv_bytes: float,
                       paged: bool = False) -> Impl:
    """msa.bridge.sparse_fmha (default schedule) with the same selection as the msa.core sparse row; ragged K/V
    (the Q-outer path serves routed items) or, with ``paged``, the page-128 cache (same schedule). The per-call
    work (union build / k2q CSR from the selection) is timed: the selection is a call argument. Inputs in the case
    dtype (until session 10 this row always ran bf16 whatever ``--dtype`` said: its fp8 numbers before were bf16's)."""
    fmha = _api("msa.bridge", "sparse_fmha")
    plan_fn = _api("msa.bridge", "sparse_fmha_plan")
    name, how = _label("sparse_atten_func", device, caps, flops, kv_bytes,
                       base="msa-bridge-paged" if paged else "msa-bridge",
                       features=_sparse_prefill_features(case, paged=paged))

    def prepare(inputs: dict) -> Prepared:
        b = case.batch
        plan = plan_fn([case.q_len] * b, [case.kv_len] * b, case.hq, case.hkv, page_size=BLOCK if paged else None,
                       causal=case.causal, kv_block_num=case.topk, device=device)
        out = torch.empty(case.total_q, case.hq, case.d, dtype=torch.bfloat16, device=device)
        if paged:
            q, kk, vv, extra = inputs["q"], inputs["k_pages"], inputs["v_pages"], {"kv_indices": inputs["kv_indices"]}
        elif "k" not in inputs:
            raise Skip("no contiguous K/V copy in this case (paged only): see the msa-bridge-paged row")
        else:
            q, kk, vv, extra = inputs["q"], inputs["k"], inputs["v"], {}
        q, kk, vv = (_bridge_inputs(x, case.dtype, role) for x, role in ((q, "q"), (kk, "k"), (vv, "v")))

        def fn():
            return fmha(q, kk, vv, plan, kv_block_indexes=inputs["kv_block_indexes"], out=out, **extra)

        return Prepared(fn, lambda r: r[0] if isinstance(r, tuple) else r, lambda: out.fill_(float("nan")))

    return Impl(name, prepare, graph_ok=True, note=how)


def fp4_indexer_impl(case: Case, device: torch.device, caps: RefCaps, flops: float, fmt: str = "nvfp4") -> Impl:
    """msa.cute.fp4_indexer_block_scores on NVFP4/MXFP4 index Q and paged index K (quantised untimed).

    The op applies no softmax scale; the checked output is rescaled by 1/sqrt(D) to compare with the bf16 rows.
    """
    func = _api("msa.cute", "fp4_indexer_block_scores")
    quant = _api("msa.cute", "quant")
    elem = 0.5 + 1.0 / (16 if fmt == "nvfp4" else 32)  # packed e2m1 + one scale byte per block
    q_b = case.total_q * case.hq * case.d * elem
    k_b = case.total_kv * case.hkv * case.d * elem
    ms_b = case.hq * case.num_blocks * case.total_q * 4
    name, how = _label("fp4_indexer_block_scores", device, caps, flops, k_b, base=f"msa-{fmt}-indexer")
    scale = case.d ** -0.5

    def prepare(inputs: dict) -> Prepared:
        b = case.batch
        quantize = quant.quantize_nvfp4 if fmt == "nvfp4" else quant.quantize_mxfp4
        qq = quantize(inputs["q"])
        kq = quantize(inputs["k_pages"])
        cu_q = torch.arange(0, (b + 1) * case.q_len, case.q_len, dtype=torch.int32, device=device)
        cu_k = torch.arange(0, (b + 1) * case.kv_len, case.kv_len, dtype=torch.int32, device=device)
        pages = case.num_blocks
        cu_p = torch.arange(0, (b + 1) * pages, pages, dtype=torch.int32, device=device)
        nblk = case.num_blocks

        def fn():
            return func(qq.data, kq.data, qq.scale, kq.scale, cu_q, cu_k, cu_p, max_seqlen_q=case.q_len,
                        max_seqlen_k=case.kv_len, kv_indices=inputs["kv_indices"], fp4_format=fmt,
                        causal=case.causal)

        return Prepared(fn, lambda r: r[:, :nblk] * scale)

    return Impl(name, prepare, graph_ok=True, dtype=fmt, work=(flops, q_b + k_b + ms_b),
                note=f"{fmt} Q/K quantised untimed; {how}")
