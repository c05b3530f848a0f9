"""``msa demo``: the MSA prefill pipeline end to end on a synthetic long context with planted structure.

Pipeline (chunked prefill: query chunk ``[s, e)`` against keys ``[0, e)``):

1. index pass - ``msa.core.fmha`` score-only with index Q ``[T, H_idx, 128]`` and one shared index-K head
   -> ``max_score [H_idx, tiles, chunk]``;
2. top-k - ``msa.core.sparse_topk_select`` with one forced local block (``force_end_blocks=1``) and
   ``num_valid_pages`` = the token's own block + 1;
3. sparse attention - ``msa.bridge.sparse_fmha`` (k2q CSR + ``sparse_atten_func``), index head ``r`` driving KV
   heads ``r*Hkv/H_idx ..``;
4. dense attention - ``msa.core.fmha`` on the same chunk, for the error and the timing comparison.

Planted structure: every 128-token block ``j`` has a key topic ``z[h, j]``, an index-key topic ``zk[j]`` and a
value topic ``u[h, j]``; a token's keys are its block's topics plus noise. Each query (per index head) targets its
own block plus two earlier "topic" blocks chosen per 256-token segment; ``--needles`` needle blocks sit in the first
quarter of the context and are the target of short runs of queries in the last quarter, and their values carry a
strong signal. The index branch sees the same targets through ``zk``, so a working pipeline selects the planted
blocks (recall) and the sparse output matches dense attention (error).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

BLOCK = 128
SEGMENT = 256  # tokens sharing the same topic blocks
N_SLOTS = 3  # planted targets per (token, index head): own block + 2 topics (or + needle)
NEEDLE_RUN = 8  # queries per needle


@dataclass
class DemoConfig:
    seq_len: int
    num_qo_heads: int
    num_kv_heads: int
    index_heads: int
    topk: int
    head_dim: int
    seed: int
    device: torch.device
    dtype: torch.dtype
    needles: int = 4
    chunk: int = 1024
    min_recall: float = 0.9
    max_rel_error: float = 0.25
    progress: bool = True
    index_dtype: torch.dtype | None = None  # the index pass's Q/K dtype (default: dtype); float8_e4m3fn: amax scales


@dataclass
class DemoResult:
    config: DemoConfig
    selected_fraction: float
    recall: float
    needle_recall: float
    rel_l2: float
    needle_rel_l2: float
    needle_signal_cos: float
    t_index: float
    t_topk: float
    t_sparse: float
    t_dense: float
    wall: float
    n_needles: int = 0

    @property
    def ok(self) -> bool:
        return self.recall >= self.config.min_recall and self.rel_l2 <= self.config.max_rel_error


def default_config(device: torch.device) -> dict:
    """Machine-sized defaults: the MiniMax-M3 attention shape at 128K on a GPU, a small GQA problem on a CPU."""
    if device.type == "cuda":
        return dict(seq_len=131072, num_qo_heads=64, num_kv_heads=4, index_heads=4, topk=16, head_dim=128,
                    chunk=8192)
    return dict(seq_len=8192, num_qo_heads=16, num_kv_heads=1, index_heads=1, topk=16, head_dim=128, chunk=1024)


class _Problem:
    """Synthetic inputs; Q and index-Q are generated per chunk (memory stays O(chunk * Hq * D))."""

    def __init__(self, cfg: DemoConfig):
        self.cfg = cfg
        dev, d = cfg.device, cfg.head_dim
        t, hkv, hi = cfg.seq_len, cfg.num_kv_heads, cfg.index_heads
        nb = -(-t // BLOCK)
        g = torch.Generator(device="cpu").manual_seed(cfg.seed)
        self.nb = nb
        # Topic vectors (unit-variance entries, so q.k / sqrt(D) of a matching pair is ~ sqrt(D)).
        self.z = torch.randn(hkv, nb, d, generator=g).to(dev)
        self.zk = torch.randn(nb, d, generator=g).to(dev)
        self.u = torch.randn(hkv, nb, d, generator=g).to(dev)
        block_of = torch.arange(t) // BLOCK
        # Planted targets [T, H_idx, 3] (-1 = none) and their weights.
        targets = torch.full((t, hi, N_SLOTS), -1, dtype=torch.int64)
        weight = torch.ones(t, hi, N_SLOTS)
        targets[:, :, 0] = block_of.view(-1, 1)
        for s0 in range(0, t, SEGMENT):
            first_block = s0 // BLOCK
            if first_block == 0:
                continue
            for r in range(hi):
                n = min(2, first_block)
                pick = torch.randperm(first_block, generator=g)[:n]
                targets[s0:s0 + SEGMENT, r, 1:1 + n] = pick
        self.needle_blocks = []
        self.needle_queries = []
        quarter = max(1, nb // 4)
        if cfg.needles > 0 and t >= 4 * BLOCK:
            blocks = torch.randperm(quarter, generator=g)[: cfg.needles].tolist()
            lo, hi_q = (3 * t) // 4, t - NEEDLE_RUN
            for nbk in blocks:
                start = int(torch.randint(lo, max(lo + 1, hi_q), (1,), generator=g))
                qs = list(range(start, min(t, start + NEEDLE_RUN)))
                targets[qs, :, 1] = nbk
                targets[qs, :, 2] = -1
                weight[qs, :, 1] = 1.3
                self.needle_blocks.append(nbk)
                self.needle_queries.append(qs)
        self.targets = targets.to(dev)
        self.weight = weight.to(dev)
        self.signal = torch.randn(len(self.needle_blocks), d, generator=g).to(dev)
        # Keys / values / index keys for the whole context (O(T * Hkv * D)); bulk noise comes from a generator on
        # the target device (fast on a GPU), the structure above from the CPU generator.
        dt = cfg.dtype
        blk = block_of.to(dev)
        self._gd = torch.Generator(device=dev).manual_seed(cfg.seed + 1)
        noise = lambda *shape: torch.randn(*shape, generator=self._gd, device=dev)  # noqa: E731
        self.k = (self.z[:, blk].transpose(0, 1) + 0.5 * noise(t, hkv, d)).to(dt).contiguous()
        v = self.u[:, blk].transpose(0, 1) + noise(t, hkv, d)
        for i, nbk in enumerate(self.needle_blocks):
            s, e = nbk * BLOCK, min(t, (nbk + 1) * BLOCK)
            v[s:e] = 2.0 * self.signal[i] + 0.5 * noise(e - s, hkv, d)
        self.v = v.to(dt).contiguous()
        self.ik = (self.zk[blk] + 0.5 * noise(t, d)).view(t, 1, d).to(dt).contiguous()

    def queries(self, s: int, e: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Main Q ``[n, Hq, D]`` and index Q ``[n, H_idx, D]`` for tokens ``[s, e)``."""
        cfg = self.cfg
        n, d, hkv, hi = e - s, cfg.head_dim, cfg.num_kv_heads, cfg.index_heads
        grp, kv_per_idx = cfg.num_qo_heads // hkv, hkv // hi
        tg = self.targets[s:e]
        w = self.weight[s:e] * (tg >= 0)
        tgc = tg.clamp(min=0)
        iq = (self.zk[tgc] * w.unsqueeze(-1)).sum(2)  # [n, H_idx, D]
        iq = iq + 0.5 * torch.randn(n, hi, d, generator=self._gd, device=cfg.device)
        tg_kv = tgc.repeat_interleave(kv_per_idx, dim=1)  # [n, Hkv, 3]
        w_kv = w.repeat_interleave(kv_per_idx, dim=1)
        h_idx = torch.arange(hkv, device=cfg.device).view(1, hkv, 1)
        base = (self.z[h_idx, tg_kv] * w_kv.unsqueeze(-1)).sum(2)  # [n, Hkv, D]
        q = base.repeat_interleave(grp, dim=1) + 0.5 * torch.randn(n, cfg.num_qo_heads, d, generator=self._gd,
                                                                    device=cfg.device)
        return q.to(cfg.dtype).contiguous(), iq.to(cfg.dtype).contiguous()


def _to_e4m3(x: torch.Tensor) -> tuple[torch.Tensor, float]:
    """x -> (e4m3 tensor, per-tensor amax scale as a float: the fp8 index-pass kernel takes float scales)."""
    from msa.cute.quant import quantize_fp8  # noqa: PLC0415

    q, scale = quantize_fp8(x)
    return q, float(scale)


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def run_demo(cfg: DemoConfig) -> DemoResult:
    from msa.core import fmha, fmha_plan, sparse_topk_select  # noqa: PLC0415
    from tqdm.auto import tqdm  # noqa: PLC0415

    from .bridge import sparse_fmha, sparse_fmha_plan  # noqa: PLC0415

    t_wall = time.perf_counter()
    dev = cfg.device
    chunks = [(s, min(cfg.seq_len, s + cfg.chunk)) for s in range(0, cfg.seq_len, cfg.chunk)]
    bar = tqdm(total=1 + 4 * len(chunks), desc="msa demo", unit="step", disable=not cfg.progress, leave=False)
    bar.set_postfix_str("generate")
    prob = _Problem(cfg)
    bar.update(1)
    hq, hkv, hi, topk = cfg.num_qo_heads, cfg.num_kv_heads, cfg.index_heads, cfg.topk
    times = dict(index=0.0, topk=0.0, sparse=0.0, dense=0.0)
    err2 = ref2 = 0.0
    hits = planted = sel_blocks = vis_blocks = 0
    needle_err2 = needle_ref2 = 0.0
    needle_hits = needle_total = 0
    cos_sum, cos_n = 0.0, 0
    needle_pos = {q: i for i, qs in enumerate(prob.needle_queries) for q in qs}
    ik8 = ik_scale = None
    if cfg.index_dtype == torch.float8_e4m3fn:
        ik8, ik_scale = _to_e4m3(prob.ik)

    def timed(key, fn, *args, **kwargs):
        _sync(dev)
        t0 = time.perf_counter()
        r = fn(*args, **kwargs)
        _sync(dev)
        times[key] += time.perf_counter() - t0
        return r

    for s, e in chunks:
        n = e - s
        q, iq = prob.queries(s, e)
        kk, vv, ik = prob.k[:e], prob.v[:e], prob.ik[:e]
        bar.set_postfix_str(f"index pass [{s}:{e})")
        iplan = fmha_plan([n], [e], hi, 1, output_maxscore=True, device=dev)
        if ik8 is not None:  # fp8 index pass: index Q quantised per chunk (per-tensor amax scale), K once
            iq, iq_scale = _to_e4m3(iq)
            _, ms = timed("index", fmha, iq, ik8[:e], None, iplan, output_o=False, output_maxscore=True,
                          q_scale=iq_scale, k_scale=ik_scale)
        else:
            _, ms = timed("index", fmha, iq, ik, None, iplan, output_o=False, output_maxscore=True)
        bar.update(1)
        bar.set_postfix_str(f"top-k [{s}:{e})")
        own = (torch.arange(s, e, device=dev) // BLOCK + 1).to(torch.int32)
        sel = timed("topk", sparse_topk_select, ms, topk, num_valid_pages=own, force_end_blocks=1)
        del ms
        bar.update(1)
        bar.set_postfix_str(f"sparse attention [{s}:{e})")
        sel_kv = sel.repeat_interleave(hkv // hi, dim=1).contiguous()
        splan = sparse_fmha_plan([n], [e], hq, hkv, kv_block_num=topk, device=dev)
        o_sp, _ = timed("sparse", sparse_fmha, q, kk, vv, splan, kv_block_indexes=sel_kv)
        bar.update(1)
        bar.set_postfix_str(f"dense attention [{s}:{e})")
        dplan = fmha_plan([n], [e], hq, hkv, device=dev)
        o_dn, _ = timed("dense", fmha, q, kk, vv, dplan)
        bar.update(1)

        # Metrics for the chunk.
        diff = (o_sp.float() - o_dn.float()).pow(2).sum(dim=(1, 2))
        refn = o_dn.float().pow(2).sum(dim=(1, 2))
        err2 += float(diff.sum())
        ref2 += float(refn.sum())
        tg = prob.targets[s:e, :, 1:]  # planted non-local targets
        hit = (tg.unsqueeze(-1) == sel.to(torch.int64).unsqueeze(-2)).any(-1) & (tg >= 0)
        hits += int(hit.sum())
        planted += int((tg >= 0).sum())
        sel_blocks += int((sel >= 0).sum())
        vis_blocks += int(own.to(torch.int64).sum()) * hi
        for qi in [q_ for q_ in range(s, e) if q_ in needle_pos]:
            j = qi - s
            nid = needle_pos[qi]
            needle_err2 += float(diff[j])
            needle_ref2 += float(refn[j])
            needle_hits += int(hit[j, :, 0].sum())
            needle_total += hi
            sig = prob.signal[nid]
            cos_sum += float(torch.nn.functional.cosine_similarity(o_sp[j].float(), sig.view(1, -1), dim=-1).mean())
            cos_n += 1
    bar.close()
    return DemoResult(
        config=cfg,
        selected_fraction=sel_blocks / max(vis_blocks, 1),
        recall=hits / max(planted, 1),
        needle_recall=needle_hits / max(needle_total, 1) if needle_total else float("nan"),
        rel_l2=math.sqrt(err2 / max(ref2, 1e-30)),
        needle_rel_l2=math.sqrt(needle_err2 / max(needle_ref2, 1e-30)) if needle_total else float("nan"),
        needle_signal_cos=cos_sum / cos_n if cos_n else float("nan"),
        t_index=times["index"],
        t_topk=times["topk"],
        t_sparse=times["sparse"],
        t_dense=times["dense"],
        wall=time.perf_counter() - t_wall,
        n_needles=len(prob.needle_blocks),
    )


def _backend_note(dev: torch.device) -> str:
    from msa.core.dispatch import backend_mode, registered_kernels  # noqa: PLC0415

    mode = backend_mode()
    if dev.type != "cuda" or mode == "reference":
        return "PyTorch reference (CPU)" if dev.type != "cuda" else "PyTorch reference (forced)"
    kern = {op: registered_kernels(op) for op in ("fmha", "sparse_atten_func")}
    return ", ".join(f"{op}: {'/'.join(k) if k else 'reference'}" for op, k in kern.items())


def format_table(r: DemoResult) -> str:
    c = r.config
    speed = r.t_dense / r.t_sparse if r.t_sparse > 0 else float("nan")
    rows = [
        ("device", f"{c.device} ({_backend_note(c.device)})"),
        ("context length", f"{c.seq_len:,} tokens ({-(-c.seq_len // BLOCK)} blocks of {BLOCK})"),
        ("heads (Hq/Hkv/index)", f"{c.num_qo_heads}/{c.num_kv_heads}/{c.index_heads}, head dim {c.head_dim}, "
                                 f"{str(c.dtype).replace('torch.', '')}"
                                 + (f", index pass {str(c.index_dtype).replace('torch.', '')}"
                                    if c.index_dtype not in (None, c.dtype) else "")),
        ("top-k", f"{c.topk} blocks (1 forced local) = {c.topk * BLOCK} keys per query"),
        ("blocks selected", f"{100 * r.selected_fraction:.1f}% of causally visible blocks"),
        ("planted-block recall", f"{100 * r.recall:.2f}% (needles: {100 * r.needle_recall:.1f}%, "
                                 f"{r.n_needles} needles planted)"),
        ("output rel. L2 vs dense", f"{r.rel_l2:.3e} (all queries)"),
        ("  on needle queries", f"{r.needle_rel_l2:.3e} (cos(out, needle signal) = {r.needle_signal_cos:.3f})"),
        ("time index pass", f"{r.t_index:.2f} s"),
        ("time top-k", f"{r.t_topk:.2f} s"),
        ("time sparse attention", f"{r.t_sparse:.2f} s"),
        ("time dense attention", f"{r.t_dense:.2f} s (sparse is {speed:.2f}x dense)"),
        ("wall time", f"{r.wall:.1f} s"),
    ]
    wk = max(len(k) for k, _ in rows)
    wv = max(len(v) for _, v in rows)
    line = f"+-{'-' * wk}-+-{'-' * wv}-+"
    out = [line] + [f"| {k.ljust(wk)} | {v.ljust(wv)} |" for k, v in rows] + [line]
    return "\n".join(out)
