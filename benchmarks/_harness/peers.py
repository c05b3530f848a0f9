"""Peer implementations: torch SDPA (cuDNN, flash), FlexAttention, FlashAttention-4 (AOT artifacts), torch top-k
and a torch block-max index pass. Each factory raises :class:`Skip` with a reason when the peer cannot run."""

from __future__ import annotations

import ctypes
import glob
import gzip
import hashlib
import inspect
import json
import math
import os
import shutil
import sys
import tempfile
import zipfile

import torch
import torch.nn.functional as F

from .cases import BLOCK, Case, TileSelection
from .impl import Impl, Prepared, Skip

# ----------------------------------------------------------------------------------------------------------------
# layout helpers: msa's ragged [B*S, H, D] <-> [B, H, S, D] views (no copies)


def bhsd(x: torch.Tensor, batch: int) -> torch.Tensor:
    return x.view(batch, x.shape[0] // batch, x.shape[1], x.shape[2]).transpose(1, 2)


def from_bhsd(o: torch.Tensor) -> torch.Tensor:
    b, h, s, d = o.shape
    return o.transpose(1, 2).reshape(b * s, h, d)


def fold_gqa_q(q: torch.Tensor, case: Case) -> torch.Tensor:
    """``[B*Lq, Hq, D]`` -> ``[B, Hkv, G*Lq, D]`` (rows ordered (g, i)): GQA decode as MHA over the KV heads."""
    b, lq, hkv, g, d = case.batch, case.q_len, case.hkv, case.group, case.d
    return q.view(b, lq, hkv, g, d).permute(0, 2, 3, 1, 4).reshape(b, hkv, g * lq, d).contiguous()


def unfold_gqa_o(o: torch.Tensor, case: Case) -> torch.Tensor:
    b, lq, hkv, g, d = case.batch, case.q_len, case.hkv, case.group, case.d
    return o.view(b, hkv, g, lq, d).permute(0, 3, 1, 2, 4).reshape(b * lq, hkv * g, d)


# ----------------------------------------------------------------------------------------------------------------
# torch SDPA

_SDPA_BACKENDS = {
    "cudnn": "CUDNN_ATTENTION",
    "flash": "FLASH_ATTENTION",
    "math": "MATH",
    "efficient": "EFFICIENT_ATTENTION",
}


def _sdpa_ctx(backend: str):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([getattr(SDPBackend, _SDPA_BACKENDS[backend])])


def sdpa_impl(backend: str, case: Case, device: torch.device, fold: bool = False, contiguous: bool = False) -> Impl:
    """Prefill: GQA through ``enable_gqa``, causal through ``is_causal`` (top-left = bottom-right when q_len ==
    kv_len). Decode (q_len < kv_len, causal): the flash op's own ``is_causal`` is bottom-right (torch's CausalBias
    relies on it) and takes GQA natively; the other backends, or ``fold=True``, get GQA folded into query rows and
    run non-causal (at most q_len-1 extra keys per query; every row is credited the same causal work)."""
    name = f"sdpa-{backend}"
    if backend == "cudnn" and device.type != "cuda":
        raise Skip("cuDNN SDPA needs a CUDA device")
    decode_like = case.causal and case.q_len != case.kv_len
    native_decode = decode_like and backend == "flash" and not fold
    scale = 1.0 / math.sqrt(case.d)

    def prepare(inputs: dict) -> Prepared:
        q, k, v = inputs["q"], inputs["k"], inputs["v"]
        kb, vb = bhsd(k, case.batch), bhsd(v, case.batch)
        if not decode_like:
            qb = bhsd(q, case.batch)
            gqa = case.group > 1
            if contiguous:  # [B, H, S, D] copies, made untimed, for a backend that rejects the strided views
                qb, kb, vb = qb.contiguous(), kb.contiguous(), vb.contiguous()

            def fn():
                with _sdpa_ctx(backend):
                    return F.scaled_dot_product_attention(qb, kb, vb, is_causal=case.causal, scale=scale,
                                                          enable_gqa=gqa)

            return Prepared(fn, from_bhsd)
        if native_decode:
            qb = bhsd(q, case.batch)

            def fn():
                return torch.ops.aten._scaled_dot_product_flash_attention(qb, kb, vb, 0.0, True, False,
                                                                          scale=scale)[0]

            return Prepared(fn, from_bhsd)
        qf = fold_gqa_q(q, case)

        def fn():
            with _sdpa_ctx(backend):
                return F.scaled_dot_product_attention(qf, kb, vb, is_causal=False, scale=scale)

        return Prepared(fn, lambda o: unfold_gqa_o(o, case))

    if not decode_like:
        note = "contiguous [B, H, S, D] copies" if contiguous else ""
    elif native_decode:
        note = "bottom-right causal via aten flash op"
    else:
        note = "GQA folded into query rows, non-causal"
    impl = Impl(name, prepare, graph_ok=True, dtype="bf16" if case.dtype != "bf16" else None, note=note,
                kind="peer")
    if decode_like and not native_decode:
        impl.extra["exact"] = False  # a different (non-causal) function: timed, never checked or used as anchor
    if native_decode:
        impl.extra["fallback"] = lambda: sdpa_impl(backend, case, device, fold=True)
    elif not decode_like and not contiguous:
        impl.extra["fallback"] = lambda: sdpa_impl(backend, case, device, contiguous=True)
    return impl


# ----------------------------------------------------------------------------------------------------------------
# FlexAttention


class FlexState:
    """One compiled flex_attention shared by all rows, with a cap on the total time spent compiling."""

    def __init__(self, compile_budget_s: float, use_compile: bool):
        self.compile_budget_s = compile_budget_s
        self.use_compile = use_compile
        self.spent_s = 0.0
        self._fn = None

    def fn(self):
        if self._fn is None:
            from torch.nn.attention.flex_attention import flex_attention

            if self.use_compile:
                import torch._dynamo.config as dcfg

                # every case is a new shape (dynamic=False): keep dynamo from giving up and running flex eagerly,
                # which materialises the full score matrix
                for knob in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit",
                             "accumulated_cache_size_limit"):
                    if hasattr(dcfg, knob):
                        setattr(dcfg, knob, max(getattr(dcfg, knob), 256))
                self._fn = torch.compile(flex_attention, dynamic=False, fullgraph=True)
            else:
                self._fn = flex_attention
        return self._fn

    def check_budget(self):
        if self.use_compile and self.spent_s > self.compile_budget_s:
            raise Skip(f"FlexAttention compile budget spent ({self.spent_s:.0f} s > --flex-compile-budget-s "
                       f"{self.compile_budget_s:.0f})")


def _compact(ids: torch.Tensor, keep: torch.Tensor, fill: int):
    """Move the kept ids of each row to the front (ascending); return (count int32, ids int32)."""
    big = torch.iinfo(torch.int64).max
    key = torch.where(keep, ids, torch.full_like(ids, big))
    key, _ = key.sort(dim=-1)
    count = keep.sum(-1).to(torch.int32)
    out = torch.where(key == big, torch.full_like(key, fill), key).to(torch.int32)
    return count, out


def flex_block_mask(sel: TileSelection, hq: int, device: torch.device, pad_limit: int = 1 << 30,
                    exact_mask_mod: bool = False):
    """BlockMask from a tile selection: blocks every query of the tile fully sees go to the *full* lists, the rest
    (the causal diagonal, a partial last block) to the masked lists with the bottom-right causal mask_mod.

    The compiled kernel visits only the listed blocks, so the causal mask_mod is exact there. Eager flex_attention
    (the CPU dry run) ignores the block lists and applies mask_mod to every (q, k): ``exact_mask_mod`` then makes
    mask_mod also test block membership through a [B, Hq, T, nblk] lookup table."""
    from torch.nn.attention.flex_attention import BlockMask

    ids = sel.tile_ids.to(device)  # [B, T, Hs, k]
    b, t, hs, k = ids.shape
    q_len, kv_len = sel.q_len, sel.kv_len
    offset = kv_len - q_len
    valid = ids >= 0
    tile = torch.arange(t, device=device).view(1, t, 1, 1)
    first_pos = tile * BLOCK + offset
    block_end = (ids + 1) * BLOCK  # exclusive
    full = valid & (block_end <= kv_len)
    if sel.causal:
        full &= block_end - 1 <= first_pos
    partial = valid & ~full
    ids = ids.permute(0, 2, 1, 3)  # [B, Hs, T, k]
    full, partial = full.permute(0, 2, 1, 3), partial.permute(0, 2, 1, 3)
    if hs not in (1, hq):
        g = hq // hs
        ids, full, partial = (x.repeat_interleave(g, dim=1) for x in (ids, full, partial))
    nblk = -(-kv_len // BLOCK)
    full_cnt, full_idx = _compact(ids, full, 0)
    part_cnt, part_idx = _compact(ids, partial, 0)

    def causal_mod(bb, hh, q_idx, kv_idx):
        return kv_idx <= q_idx + offset

    def bounds_mod(bb, hh, q_idx, kv_idx):
        return kv_idx < kv_len

    mask_mod = causal_mod if sel.causal else bounds_mod
    if exact_mask_mod:
        member = torch.zeros(b, ids.shape[1], t, nblk + 1, dtype=torch.bool, device=device)
        member.scatter_(3, torch.where(ids >= 0, ids, torch.full_like(ids, nblk)), True)
        member = member[..., :nblk].contiguous()
        if member.shape[1] == 1:
            member = member.expand(b, hq, t, nblk)
        base = mask_mod

        def mask_mod(bb, hh, q_idx, kv_idx):  # noqa: F811 - the exact variant wraps the causal/bounds one
            return base(bb, hh, q_idx, kv_idx) & member[bb, hh, q_idx // BLOCK, kv_idx // BLOCK]

    params = inspect.signature(BlockMask.from_kv_blocks).parameters
    kwargs = dict(BLOCK_SIZE=BLOCK, mask_mod=mask_mod, seq_lengths=(q_len, kv_len))
    # BlockMask helpers (to_dense, the eager path, the q-major transpose) read the number of KV blocks from the
    # last dim, so the lists get one column per KV block -- the layout create_block_mask makes. Only when that
    # would take more than pad_limit bytes (a 1M-token sparse prefill) do they stay top-k wide, without the
    # q-major transpose (forward only; the compiled kernel reads just the first kv_num_blocks entries).
    pad = nblk - k
    padded_bytes = 2 * full_idx.numel() // max(k, 1) * nblk * 4
    if pad > 0 and padded_bytes > pad_limit and "compute_q_blocks" in params:
        kwargs["compute_q_blocks"] = False
    elif pad > 0:
        full_idx = torch.nn.functional.pad(full_idx, (0, pad))
        part_idx = torch.nn.functional.pad(part_idx, (0, pad))
    return BlockMask.from_kv_blocks(part_cnt, part_idx, full_cnt, full_idx, **kwargs)


def flex_impl(case: Case, device: torch.device, state: FlexState, selection_key: str | None) -> Impl:
    """``selection_key``: name of the TileSelection in the input set (sparse), or None (dense causal)."""
    state.check_budget()
    scale = 1.0 / math.sqrt(case.d)
    gqa = case.group > 1

    def prepare(inputs: dict) -> Prepared:
        from .cases import causal_tile_blocks

        sel = inputs[selection_key] if selection_key else causal_tile_blocks(
            case.batch, case.q_len, case.kv_len, case.causal, device)
        mask = flex_block_mask(sel, case.hq, device, exact_mask_mod=not state.use_compile)
        qb, kb, vb = (bhsd(inputs[n], case.batch) for n in ("q", "k", "v"))
        flex = state.fn()

        def fn():
            return flex(qb, kb, vb, block_mask=mask, scale=scale, enable_gqa=gqa)

        return Prepared(fn, from_bhsd)

    note = "" if state.use_compile else "eager (dry mode)"
    if selection_key:
        note = (note + "; " if note else "") + "BlockMask = the msa tile selection (full blocks + masked diagonal)"
    return Impl("flex", prepare, graph_ok=True, dtype="bf16" if case.dtype != "bf16" else None, note=note,
                kind="peer", extra={"flex_state": state})


# ----------------------------------------------------------------------------------------------------------------
# torch top-k pipeline


def torch_topk_impl(case: Case) -> Impl:
    topk = case.topk

    def prepare(inputs: dict) -> Prepared:
        scores, nvp = inputs["max_score"], inputs["num_valid_pages"]
        heads, nblk, total_q = scores.shape
        k_eff = min(topk, nblk)
        blk = torch.arange(nblk, device=scores.device).view(1, 1, -1)
        sentinel = nblk + 1

        def fn():
            x = scores.permute(2, 0, 1)  # [total_q, H, K]
            x = x.masked_fill(blk >= nvp.view(-1, 1, 1), float("-inf"))
            vals, idx = torch.topk(x, k_eff, dim=-1)
            idx = torch.where(vals > float("-inf"), idx, torch.full_like(idx, sentinel))
            idx, _ = idx.sort(dim=-1)
            idx = idx.masked_fill(idx == sentinel, -1).to(torch.int32)
            if k_eff < topk:
                idx = torch.nn.functional.pad(idx, (0, topk - k_eff), value=-1)
            return idx

        return Prepared(fn, lambda r: r)

    return Impl("torch-topk", prepare, graph_ok=True, kind="peer",
                note="transpose, mask, torch.topk, sort, -1 fill, int32")


# ----------------------------------------------------------------------------------------------------------------
# torch block-max index pass (score-only): the index pass an msa user would write without a kernel


def torch_blockmax_impl(case: Case, chunk_bytes: int = 1 << 30) -> Impl:
    if case.batch != 1:
        raise Skip("torch-bmm-blockmax handles batch 1 only")
    if case.kv_len % BLOCK:
        raise Skip(f"torch-bmm-blockmax needs kv_len % {BLOCK} == 0, got {case.kv_len}")
    nblk, offset, scale = case.num_blocks, case.qo_offset, 1.0 / math.sqrt(case.d)
    qc = max(1, min(case.q_len, chunk_bytes // max(1, case.hq * case.kv_len * 2)))

    def prepare(inputs: dict) -> Prepared:
        q, k = inputs["q"], inputs["k"]
        kt = k.permute(1, 2, 0)  # [Hkv, D, S]
        out = torch.empty(case.hq, nblk, case.q_len, dtype=torch.float32, device=q.device)
        key_pos = torch.arange(case.kv_len, device=q.device)

        def fn():
            for c0 in range(0, case.q_len, qc):
                c1 = min(case.q_len, c0 + qc)
                n = c1 - c0
                qh = q[c0:c1].view(n, case.hkv, case.group, case.d).permute(1, 2, 0, 3).reshape(case.hkv, -1, case.d)
                s = torch.bmm(qh, kt).view(case.hkv, case.group, n, case.kv_len)
                if case.causal:
                    qpos = torch.arange(c0, c1, device=q.device) + offset
                    s = s.masked_fill(key_pos.view(1, 1, 1, -1) > qpos.view(1, 1, -1, 1), float("-inf"))
                m = s.view(case.hkv, case.group, n, nblk, BLOCK).amax(-1).float() * scale
                out[:, :, c0:c1] = m.reshape(case.hq, n, nblk).transpose(1, 2)
            return out

        return Prepared(fn, lambda r: r)

    return Impl("torch-bmm-blockmax", prepare, graph_ok=False, kind="peer",
                note=f"bf16 bmm + causal mask + amax over 128-key blocks, {qc} queries per chunk")


# ----------------------------------------------------------------------------------------------------------------
# FlashAttention-4 (SM90 forward, compiled on a GPU-less host by benchmarks/peers/fa4_build.py)


class FA4Artifacts:
    """The output of benchmarks/peers/fa4_build.py: manifest, kernels, the CuTe-DSL runtime and optionally the
    apache-tvm-ffi wheel. Nothing is installed: a gzipped runtime or a wheel is unpacked into a temp dir."""

    def __init__(self, directory: str | None):
        self.directory = directory
        self.manifest = None
        self.error = None
        self._functions: dict[str, object] = {}
        self._runtime_loaded = False
        if not directory:
            self.error = "no FA4 artifact directory (--fa4-dir or MSA_FA4_DIR; build: benchmarks/peers/fa4_build.py)"
            return
        path = os.path.join(directory, "manifest.json")
        if not os.path.isfile(path):
            self.error = f"no manifest.json in {directory} (build with benchmarks/peers/fa4_build.py)"
            return
        with open(path) as f:
            self.manifest = json.load(f)

    def find(self, case: Case, causal: bool) -> dict:
        if self.error:
            raise Skip(self.error)
        want = {"dtype": "bf16", "head_dim": case.d, "head_dim_v": case.d, "qhead_per_kvhead": case.group,
                "causal": causal}
        for entry in self.manifest.get("kernels", []):
            if all(entry.get(k) == v for k, v in want.items()):
                return entry
        have = [{k: e.get(k) for k in want} for e in self.manifest.get("kernels", [])]
        raise Skip(f"no FA4 artifact for {want} (built: {have})")

    def _unpack_dir(self) -> str:
        digest = hashlib.sha1(os.path.abspath(self.directory).encode()).hexdigest()[:12]
        d = os.path.join(tempfile.gettempdir(), f"msa_fa4_{os.getuid()}_{digest}")
        os.makedirs(d, exist_ok=True)
        return d

    def _import_tvm_ffi(self):
        try:
            import tvm_ffi

            return tvm_ffi
        except ImportError:
            pass
        tag = f"cp{sys.version_info.major}{sys.version_info.minor}"
        wheels = sorted(glob.glob(os.path.join(self.directory, f"apache_tvm_ffi-*-{tag}-*.whl")))
        if not wheels:
            raise Skip(f"tvm_ffi is not importable and {self.directory} has no apache_tvm_ffi-*-{tag}-*.whl "
                       "(fa4_build.py --tvm-ffi-wheel-python X.Y)")
        target = os.path.join(self._unpack_dir(), "site")
        if not os.path.isdir(os.path.join(target, "tvm_ffi")):
            with zipfile.ZipFile(wheels[-1]) as z:
                z.extractall(target)
        sys.path.insert(0, target)
        try:
            import tvm_ffi
        except ImportError as e:
            raise Skip(f"tvm_ffi from {wheels[-1]} does not import ({e})") from e
        return tvm_ffi

    def _load_runtime(self) -> None:
        if self._runtime_loaded:
            return
        name = self.manifest.get("runtime_library") or ""
        path = name if os.path.isabs(name) else os.path.join(self.directory, name)
        if not os.path.isfile(path):
            raise Skip(f"CuTe-DSL runtime library {path} not found")
        if path.endswith(".gz"):
            plain = os.path.join(self._unpack_dir(), os.path.basename(path)[:-3])
            if not os.path.isfile(plain):
                with gzip.open(path, "rb") as src, open(plain + ".tmp", "wb") as dst:
                    shutil.copyfileobj(src, dst)
                os.replace(plain + ".tmp", plain)
            path = plain
        # the kernels' DT_NEEDED libcute_dsl_runtime.so is satisfied by this (soname match): load it globally first
        ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
        self._runtime_loaded = True

    def load(self, entry: dict):
        if entry["so"] in self._functions:
            return self._functions[entry["so"]]
        tvm_ffi = self._import_tvm_ffi()
        self._load_runtime()
        mod = tvm_ffi.load_module(os.path.join(self.directory, entry["so"]))
        fn = getattr(mod, entry["function"])
        self._functions[entry["so"]] = fn
        return fn


def fa4_args(signature: list[dict], tensors: dict, scale: float) -> list:
    """Positional arguments from the manifest's parsed ``__call__`` signature."""
    args = []
    for p in signature:
        name, typ = p["name"], p["type"]
        if name in tensors:
            args.append(tensors[name])
        elif name == "softmax_scale":
            args.append(scale)
        elif typ == "None":
            args.append(None)
        elif typ.startswith("Tuple[") and set(x.strip() for x in typ[6:-1].split(",")) == {"None"}:
            args.append(tuple(None for _ in typ[6:-1].split(",")))
        else:
            raise Skip(f"FA4 artifact argument {name}: {typ} is not supported by the harness")
    return args


def fa4_impl(case: Case, device: torch.device, artifacts: FA4Artifacts) -> Impl:
    if device.type != "cuda":
        raise Skip("FA4 needs a CUDA device")
    cap = torch.cuda.get_device_capability(device)
    if cap[0] != 9:
        raise Skip(f"the FA4 artifacts are SM90 builds; this device is sm_{cap[0]}{cap[1]}")
    entry = artifacts.find(case, case.causal)
    scale = 1.0 / math.sqrt(case.d)

    def prepare(inputs: dict) -> Prepared:
        fn_ffi = artifacts.load(entry)
        b = case.batch
        q = inputs["q"].view(b, case.q_len, case.hq, case.d)
        k = inputs["k"].view(b, case.kv_len, case.hkv, case.d)
        v = inputs["v"].view(b, case.kv_len, case.hkv, case.d)
        out = torch.empty_like(q)
        args = fa4_args(entry["signature"], {"mQ": q, "mK": k, "mV": v, "mO": out}, scale)

        def fn():
            fn_ffi(*args)
            return out

        return Prepared(fn, lambda o: o.view(b * case.q_len, case.hq, case.d),
                        poison=lambda: out.fill_(float("nan")))

    return Impl("fa4", prepare, graph_ok=False, dtype="bf16" if case.dtype != "bf16" else None, kind="peer",
                note=f"flash-attn-4 {artifacts.manifest.get('flash_attn_version')} {entry['so']}")
