#!/usr/bin/env python3
"""msa sweep benchmark: every msa row next to the best available peers, same process, same GPU.

Sections (upstream MSA's interface): prefill, paged_prefill, sparse_prefill, decode, paged_decode, sparse_decode,
topk, indexer. One TSV row per (case, implementation) with the columns
``q_len kv_len dtype batch_size q_head kv_head head_dim latency_ms std_ms tflops gbs mfu_mbu_pct impl``; the impl
column reads ``section[-nc]/name`` (``-nc``: non-causal). FLOPs and bytes are counted once per case (see
``_harness/flops.py``), so TFLOP/s and GB/s compare across rows. ``--dry`` runs tiny shapes on the CPU.

See benchmarks/README.md for the commands, the peers and how each number is defined.
"""

from __future__ import annotations

import argparse
import fnmatch
import gc
import math
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)

import torch  # noqa: E402
from _harness import flops as W  # noqa: E402
from _harness import msa_impls, peers  # noqa: E402
from _harness.cases import (  # noqa: E402
    BLOCK,
    DECODE_HEADS,
    DRY_DECODE_HEADS,
    DRY_TP_HEADS,
    ELEM_BYTES,
    TP_HEADS,
    Case,
    page_tables,
    ragged_qkv,
    randn,
    random_tile_selection,
    to_paged,
    token_positions,
)
from _harness.clocks import ClockSampler  # noqa: E402
from _harness.impl import Impl, Skip  # noqa: E402
from _harness.report import Row, TsvWriter, append_results_md, console_header, console_line, plot  # noqa: E402
from _harness.roofline import Roofline, l2_bytes, measure_roofline  # noqa: E402
from _harness.timing import TimerConfig, measure  # noqa: E402

SECTIONS = ["prefill", "paged_prefill", "sparse_prefill", "decode", "paged_decode", "sparse_decode", "topk", "indexer"]
MEMORY_BOUND = {"decode", "paged_decode", "sparse_decode", "topk"}
DECODE_Q = {"decode": 4, "paged_decode": 4, "sparse_decode": 8}  # upstream's decode query lengths
TOLERANCE = {"bf16": 2e-2, "fp8": 1e-1, "nvfp4": 2e-1, "mxfp4": 2e-1}
OOM = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--sections", default="prefill,decode,topk",
                   help="comma list of " + ",".join(SECTIONS) + " or all (default prefill,decode,topk)")
    p.add_argument("--dtype", choices=["bf16", "fp8", "nvfp4"], default="bf16",
                   help="msa rows' input dtype; peers always run bf16 (their dtype column says so)")
    p.add_argument("--seqs", default=None, help="q=k lengths of the prefill sections (default 8192,32768,131072)")
    p.add_argument("--tp", default="1,2,4", help="head configs for prefill: 1=64/4, 2=32/2, 4=16/1 (Hq/Hkv)")
    p.add_argument("--decode-k", default=None, help="KV lengths of the decode sections (default 8K..1M)")
    p.add_argument("--decode-b", default=None, help="decode batch sizes (default 32)")
    p.add_argument("--topk", type=int, default=None, help="selected 128-token blocks per token (default 16, dry 2)")
    p.add_argument("--topk-ctx", default=None, help="context lengths of the topk section (default: --seqs)")
    p.add_argument("--topk-q", default="64,4096", help="tokens per top-k call (default 64,4096)")
    p.add_argument("--indexer-q", type=int, default=8192, help="indexer section query length cap (default 8192)")
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--blk-kv", type=int, default=128)
    p.add_argument("--output_mode", "--output-mode", dest="output_mode", choices=["o", "maxscore", "full"],
                   default="o", help="what msa's dense rows produce: O, max-score (index pass) or both")
    p.add_argument("--causal", nargs="?", const="on", default="on", choices=["on", "off", "both"],
                   help="prefill-type sections: causal (default), --no-causal, or --causal both")
    p.add_argument("--no-causal", dest="causal", action="store_const", const="off")
    p.add_argument("--impls", default="*", help="comma list of implementation names or globs (default all)")
    p.add_argument("--dense-baselines", default="sdpa-cudnn,sdpa-flash,fa4",
                   help="dense peers shown as dense-<name> rows in the sparse sections")
    p.add_argument("--dry-run-ms", type=float, default=None, help="warm-up per row (default 100, dry 0)")
    p.add_argument("--repeat-ms", type=float, default=None, help="timed budget per row (default 300, dry 5)")
    p.add_argument("-o", "--output", default=None, help="TSV path")
    p.add_argument("--plot", default=None, help="PNG path: TFLOP/s or GB/s vs length, one panel per section")
    p.add_argument("--results-md", default=None, help="append a dated entry (card, driver, commit, table) here")
    p.add_argument("--commit", default=None,
                   help="commit for the RESULTS entry (default: git rev-parse in the repo; the GPU box's copy of the "
                        "tree has no .git, so pass it there)")
    p.add_argument("--fa4-dir", default=None, help="FA4 artifacts (default $MSA_FA4_DIR or <repo>/.gpu/fa4)")
    p.add_argument("--flex-compile-budget-s", type=float, default=120.0,
                   help="stop adding FlexAttention rows once their compiles took this long in total")
    p.add_argument("--ref-max-gflop", type=float, default=2000.0, help="GPU msa-reference rows: work cap")
    p.add_argument("--ref-max-gb", type=float, default=4.0, help="GPU msa-reference rows: K/V bytes cap")
    p.add_argument("--max-rotation-sets", type=int, default=256)
    p.add_argument("--time-budget-s", type=float, default=420.0,
                   help="skip the remaining cases after this many seconds (0 = no limit)")
    p.add_argument("--no-graphs", action="store_true", help="never time through CUDA graphs")
    p.add_argument("--no-clocks", action="store_true",
                   help="do not sample the SM clock / board power (nvidia-smi) while rows are timed")
    p.add_argument("--no-check", action="store_true", help="skip the output cross-check between rows")
    p.add_argument("--dry", action="store_true", help="CPU dry mode: tiny shapes, minimal repeats (CI)")
    p.add_argument("--seed", type=int, default=1701)
    args = p.parse_args(argv)

    dry = args.dry
    args.seqs = _ints(args.seqs) if args.seqs else ([128, 384] if dry else [8192, 32768, 131072])
    args.topk = args.topk if args.topk is not None else (2 if dry else 16)
    args.tp = _ints(args.tp) if not dry or "--tp" in (argv or sys.argv) else [1]
    args.decode_k = _ints(args.decode_k) if args.decode_k else (
        [256, 640] if dry else [8192, 32768, 131072, 524288, 1048576])
    args.decode_b = _ints(args.decode_b) if args.decode_b else ([2] if dry else [32])
    args.topk_ctx = _ints(args.topk_ctx) if args.topk_ctx else ([1024, 4096] if dry else list(args.seqs))
    args.topk_q = _ints(args.topk_q) if not dry or "--topk-q" in (argv or sys.argv) else [16, 64]
    if dry and args.indexer_q == 8192:
        args.indexer_q = 128
    args.dry_run_ms = args.dry_run_ms if args.dry_run_ms is not None else (0.0 if dry else 100.0)
    args.repeat_ms = args.repeat_ms if args.repeat_ms is not None else (5.0 if dry else 300.0)
    sections = [s.strip().lower() for s in args.sections.split(",") if s.strip()]
    unknown = sorted(set(sections) - set(SECTIONS) - {"all"})
    if unknown:
        p.error(f"--sections: unknown {unknown}; expected a comma list of {SECTIONS} or all")
    args.section_list = SECTIONS if "all" in sections else [s for s in SECTIONS if s in sections]
    for tp in args.tp:
        if tp not in TP_HEADS:
            p.error(f"--tp: expected values in {sorted(TP_HEADS)}, got {tp}")
    if args.head_dim != 128 or args.blk_kv != 128:
        p.error(f"--head-dim/--blk-kv: msa kernels take 128/128, got {args.head_dim}/{args.blk_kv}")
    if not 1 <= args.topk <= 64:
        p.error(f"--topk: expected 1..64, got {args.topk}")
    args.causal_list = {"on": [True], "off": [False], "both": [True, False]}[args.causal]
    args.impl_patterns = [x.strip() for x in args.impls.split(",") if x.strip()]
    args.dense_list = [x.strip() for x in args.dense_baselines.split(",") if x.strip()]
    if args.fa4_dir is None:
        default = os.path.join(REPO, ".gpu", "fa4")
        args.fa4_dir = os.environ.get("MSA_FA4_DIR") or (default if os.path.isdir(default) else None)
    return args


def log(msg: str) -> None:
    sys.stderr.write(f"  . {msg}\n")
    sys.stderr.flush()


def rel_l2(a: torch.Tensor, b: torch.Tensor, chunk: int = 1 << 24) -> float:
    """||a - b|| / ||b|| in fp32, chunked so 128K-token outputs need no fp32 copy."""
    a, b = a.reshape(-1), b.reshape(-1)
    if a.numel() != b.numel():
        return float("nan")
    num = den = 0.0
    for i in range(0, a.numel(), chunk):
        x, y = a[i:i + chunk].float(), b[i:i + chunk].float()
        num += float(torch.sum((x - y) ** 2))
        den += float(torch.sum(y * y))
    return math.sqrt(num / den) if den > 0 else float("nan")


def compare(kind: str, got, ref) -> float:
    """Error of ``got`` against the anchor: rel L2 for outputs/scores (``-inf`` patterns must match), mismatch
    fraction for indices. NaN in ``got`` (an unwritten, poisoned element) gives NaN."""
    if kind == "indices":
        if got.shape != ref.shape:
            return 1.0
        return float((got.to(torch.int64) != ref.to(torch.int64)).float().mean())
    if kind == "scores":
        if got.shape != ref.shape:
            return float("nan")
        if torch.isnan(got).any():
            return float("nan")
        fin_g, fin_r = torch.isfinite(got), torch.isfinite(ref)
        if not torch.equal(fin_g, fin_r):
            return 1.0
        return rel_l2(got[fin_g], ref[fin_r])
    return rel_l2(got, ref)


class Runner:
    def __init__(self, args, device: torch.device, roof: Roofline, writer: TsvWriter):
        self.args, self.device, self.roof, self.writer = args, device, roof, writer
        self.rows: list[Row] = []
        self.skipped: list[str] = []
        self.mismatches: list[str] = []
        self.timer = TimerConfig(dry_run_ms=args.dry_run_ms, repeat_ms=args.repeat_ms,
                                 min_samples=1 if args.dry else 3, use_graphs=not args.no_graphs)
        self.caps = msa_impls.RefCaps(args.ref_max_gflop, args.ref_max_gb)
        self.flex = peers.FlexState(args.flex_compile_budget_s, use_compile=device.type == "cuda")
        self.fa4 = peers.FA4Artifacts(args.fa4_dir)
        self.gen = torch.Generator(device=device).manual_seed(args.seed)
        self.start = time.perf_counter()
        self.l2 = l2_bytes(device) if device.type == "cuda" else (256 * 1024 if args.dry else 0)
        self.header_printed = False
        # SM clock / power per row (GPU hosts with nvidia-smi): under long loads the card's clock moves with its
        # thermal and power state, so a row's TFLOP/s is read next to the clock it ran at.
        self.clocks = None if (device.type != "cuda" or args.no_clocks) else ClockSampler.start(
            torch.cuda.current_device() if device.index is None else device.index)

    # -- bookkeeping -------------------------------------------------------------------------------------------
    def over_budget(self) -> bool:
        b = self.args.time_budget_s
        return b > 0 and time.perf_counter() - self.start > b

    def wanted(self, *names: str) -> bool:
        return any(fnmatch.fnmatch(n, pat) for n in names for pat in self.args.impl_patterns)

    def skip(self, case: Case, name: str, reason: str) -> None:
        msg = f"{case.section}/{name} [{case.label()}]: {reason}"
        self.skipped.append(f"{case.section}/{name}: {reason}")
        log(f"SKIP {msg}")

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def free_memory(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def fits(self, case: Case, nbytes: float, what: str, quiet: bool = False) -> bool:
        if self.device.type != "cuda":
            return True
        free, _ = torch.cuda.mem_get_info(self.device)
        if nbytes + 2**30 > 0.95 * free:  # 1 GiB for the peers' outputs and workspaces
            if not quiet:
                self.skip(case, "*", f"{what} needs {nbytes / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free")
            return False
        return True

    def rotation_sets(self, set_bytes: float, memory_bound: bool) -> int:
        if not memory_bound or self.l2 <= 0 or set_bytes >= 2 * self.l2:
            return 1
        return int(min(self.args.max_rotation_sets, math.ceil(2 * self.l2 / max(set_bytes, 1))))

    # -- one case ----------------------------------------------------------------------------------------------
    def run_case(self, case: Case, sets: list[dict], factories: list, work: tuple[float, float],
                 check_kind: str | None, series: str = "") -> None:
        """``factories``: (nominal name, callable -> Impl, check) in anchor-preference order."""
        if self.over_budget():
            self.skip(case, "*", f"time budget --time-budget-s {self.args.time_budget_s:g} spent")
            return
        log(f"case {case.label()} ({len(sets)} input set{'s' if len(sets) > 1 else ''})")
        anchor = None  # (name, canonical output)
        for nominal, factory, checked in factories:
            if not (self.wanted(nominal) or self.wanted(nominal + "-reference")):
                continue
            if self.over_budget():
                self.skip(case, nominal, "time budget spent")
                continue
            try:
                impl = factory()
            except Skip as e:
                self.skip(case, nominal, str(e))
                continue
            if not self.wanted(nominal, impl.name):
                continue
            result = self.run_impl(case, sets, impl, work, check_kind if checked else None, anchor)
            if result is not None and anchor is None and checked and check_kind:
                anchor = (impl.name, result)
            self.free_memory()
        del anchor
        self.free_memory()

    def run_impl(self, case: Case, sets, impl: Impl, work, check_kind, anchor):
        """Check (poisoned output vs the anchor), then time; returns the canonical output when it can anchor."""
        while True:
            try:
                prepared = [impl.prepare(s) for s in sets]
                p0 = prepared[0]
                if p0.poison:
                    p0.poison()
                t0 = time.perf_counter()
                res = p0.fn()
                self.sync()
                first_s = time.perf_counter() - t0
                break
            except Skip as e:
                self.skip(case, impl.name, str(e))
                return None
            except OOM as e:
                prepared = None
                self.free_memory()
                self.skip(case, impl.name, f"out of memory ({str(e).splitlines()[0][:160]})")
                return None
            except Exception as e:
                prepared = None
                fallback = impl.extra.get("fallback")
                reason = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200] if str(e).strip() else ''}"
                if fallback is None:
                    self.skip(case, impl.name, f"failed ({reason})")
                    return None
                log(f"{impl.name}: {impl.note} failed ({reason}); falling back")
                replacement = fallback()
                replacement.name, replacement.work = impl.name, impl.work  # keep dense- prefixes and work
                impl = replacement
        if "flex_state" in impl.extra:
            impl.extra["flex_state"].spent_s += first_s
        check, canon = "-", None
        if impl.extra.get("exact") is False:
            check_kind = None
            check = "unchecked (different masking)"
        if check_kind and p0.canonical is not None and not self.args.no_check:
            canon = p0.canonical(res)
            if anchor is None:
                check = "anchor"
                if check_kind != "indices" and torch.isnan(canon.float()).any():
                    check = "NaN in output"  # reported, and not used as the anchor
                    self.mismatches.append(f"{case.section}/{impl.name} [{case.label()}]: NaN in output")
                    canon = None
            else:
                err = compare(check_kind, canon, anchor[1])
                tol = 0.0 if check_kind == "indices" else TOLERANCE.get(impl.dtype or case.dtype, 2e-2)
                ok = err <= tol  # NaN compares False
                check = f"{'ok' if ok else 'MISMATCH'} {err:.1e} vs {anchor[0]}"
                if not ok:
                    self.mismatches.append(f"{case.section}/{impl.name} [{case.label()}]: error {err:.3g} vs "
                                           f"{anchor[0]} (tolerance {tol:g})")
                    log(f"MISMATCH {impl.name}: {check}")
        del res
        try:
            t_wall0 = time.time()
            timing = measure([p.fn for p in prepared], self.device, self.timer, graph_ok=impl.graph_ok, warm=True)
            t_wall1 = time.time()
        except OOM as e:
            self.free_memory()
            self.skip(case, impl.name, f"out of memory while timing ({str(e).splitlines()[0][:160]})")
            return None
        except Exception as e:
            self.skip(case, impl.name, f"timing failed ({type(e).__name__}: {str(e)[:200]})")
            return None
        flops, nbytes = impl.work if impl.work is not None else work
        sec = timing.median_ms * 1e-3
        tflops = flops / sec / 1e12 if sec > 0 else 0.0
        gbs = nbytes / sec / 1e9 if sec > 0 else 0.0
        dtype = impl.dtype or case.dtype
        if case.section in MEMORY_BOUND:
            pct = 100.0 * gbs / self.roof.copy_gbs if self.roof.copy_gbs else 0.0
        else:
            pct = 100.0 * tflops / self.roof.peak_tflops(dtype) if self.roof.matmul_tflops else 0.0
        extra = {"series": case.extra.get("series", ""), "timing": timing.mode, "samples": timing.samples}
        clock = None
        if self.clocks is not None:
            time.sleep(0.15)  # nvidia-smi prints its samples with a short lag: let the window's last ones arrive
            clock = self.clocks.window(t_wall0, t_wall1)
        if clock is not None:
            extra["sm_mhz"], extra["power_w"] = round(clock[0]), round(clock[1])
        row = Row(case.section, case.causal, case.q_len, case.kv_len, dtype, case.batch, case.hq, case.hkv, case.d,
                  timing.median_ms, timing.std_ms, tflops, gbs, pct, impl.name, note=impl.note, check=check,
                  extra=extra)
        self.rows.append(row)
        self.writer.write(row)
        if not self.header_printed:
            print(console_header(), flush=True)
            self.header_printed = True
        print(console_line(row), flush=True)
        detail = [f"{timing.mode} x{timing.samples}", f"first call {first_s * 1e3:.0f} ms",
                  check]
        if clock is not None:
            detail.append(f"SM {clock[0]:.0f} MHz, {clock[1]:.0f} W while timed")
        if impl.note:
            detail.append(impl.note)
        if timing.note:
            detail.append(timing.note)
        log(f"{impl.name}: " + "; ".join(detail))
        return canon if check_kind else None


# -- work and inputs --------------------------------------------------------------------------------------------


def dense_work(case: Case) -> tuple[float, float]:
    return (W.dense_flops(case.batch, case.q_len, case.kv_len, case.hq, case.d, case.d, case.causal),
            W.dense_bytes(case.batch, case.q_len, case.kv_len, case.hq, case.hkv, case.d, case.d,
                          ELEM_BYTES[case.dtype], 2))


def bf16_dense_work(case: Case) -> tuple[float, float]:
    f, _ = dense_work(case)
    return f, W.dense_bytes(case.batch, case.q_len, case.kv_len, case.hq, case.hkv, case.d, case.d, 2, 2)


def msa_dense_work(case: Case, mode: str) -> tuple[float, float]:
    pairs = case.batch * W.visible_pairs(case.q_len, case.kv_len, case.causal)
    e = ELEM_BYTES[case.dtype]
    q_b = case.total_q * case.hq * case.d * e
    k_b = case.total_kv * case.hkv * case.d * e
    ms_b = W.max_score_bytes(case.batch, case.q_len, case.kv_len, case.hq)
    if mode == "maxscore":
        return W.index_pass_flops(pairs, case.hq, case.d), q_b + k_b + ms_b
    f, b = dense_work(case)
    return f, b + (ms_b if mode == "full" else 0.0)


def sparse_work(case: Case, kbi: torch.Tensor) -> tuple[float, float]:
    pos = token_positions(case.batch, case.q_len, case.kv_len, kbi.device)
    pairs = W.sparse_selected_pairs(kbi, pos, case.kv_len, case.causal)  # summed over KV heads
    flops = 2.0 * (case.d + case.d) * case.group * pairs
    e = ELEM_BYTES[case.dtype]
    ids = kbi.view(case.batch, case.q_len, case.hkv, -1)
    kv = W.sparse_kv_bytes(ids, case.batch, case.kv_len, case.hkv, case.d, case.d, e)
    qo = case.total_q * case.hq * case.d * (e + 2)
    return flops, kv + qo


class Bench:
    def __init__(self, runner: Runner):
        self.r = runner
        self.args = runner.args
        self.dev = runner.device
        self.tp_heads = DRY_TP_HEADS if self.args.dry else TP_HEADS
        self.decode_heads = DRY_DECODE_HEADS if self.args.dry else DECODE_HEADS

    def dense_peers(self, case: Case, flex_sel: str | None = None, prefix: str = "", work=None, checked=True):
        r, dev = self.r, self.dev

        def wrap(make):
            def f():
                impl = make()
                if prefix:
                    impl.name = prefix + impl.name
                    impl.work = work
                return impl
            return f

        out = [
            (prefix + "sdpa-cudnn", wrap(lambda: peers.sdpa_impl("cudnn", case, dev)), checked),
            (prefix + "sdpa-flash", wrap(lambda: peers.sdpa_impl("flash", case, dev)), checked),
        ]
        if not prefix:
            out.append(("flex", wrap(lambda: peers.flex_impl(case, dev, r.flex, flex_sel)), checked))
        out.append((prefix + "fa4", wrap(lambda: peers.fa4_impl(case, dev, r.fa4)), checked))
        if dev.type != "cuda" and not prefix:
            out.append((prefix + "sdpa-math", wrap(lambda: peers.sdpa_impl("math", case, dev)), checked))
        return out

    # -- sections ----------------------------------------------------------------------------------------------
    def prefill(self, paged: bool):
        section = "paged_prefill" if paged else "prefill"
        tps = self.args.tp if not paged else [1]
        for tp in tps:
            hq, hkv = self.tp_heads[tp]
            for s in self.args.seqs:
                for causal in self.args.causal_list:
                    case = Case(section, s, s, 1, hq, hkv, self.args.head_dim, self.args.dtype, causal)
                    kv_bytes = case.total_kv * hkv * case.d * 2 * 2
                    if not self.r.fits(case, (3 if paged else 1.5) * kv_bytes + 3 * case.total_q * hq * case.d * 2,
                                       "inputs"):
                        continue
                    inputs = self.make_inputs(case, paged=paged)
                    self.run_attention(case, [inputs], paged=paged)
                    del inputs

    def make_inputs(self, case: Case, paged: bool, contiguous: bool = True) -> dict:
        """q, and K/V ragged (``k``, ``v``: what the peers read) and/or paged with shuffled pages (``k_pages``,
        ``v_pages``, ``kv_indices``, ``page_table``: what msa's paged rows read) holding the same data. Without
        ``contiguous`` the paged cache is drawn directly, so a cache as large as the GPU needs no second copy."""
        gen = self.r.gen
        if paged and not contiguous:
            q = randn((case.total_q, case.hq, case.d), torch.bfloat16, self.dev, gen)
            perm, kv_indices, table = page_tables(case.batch, case.kv_len, self.dev, gen)
            shape = (case.batch * case.num_blocks, case.hkv, BLOCK, case.d)
            return {"q": q, "k_pages": randn(shape, torch.bfloat16, self.dev, gen),
                    "v_pages": randn(shape, torch.bfloat16, self.dev, gen), "kv_indices": kv_indices,
                    "page_table": table}
        q, k, v = ragged_qkv(case, self.dev, gen)
        d = {"q": q, "k": k, "v": v}
        if paged:
            perm, kv_indices, table = page_tables(case.batch, case.kv_len, self.dev, gen)
            d.update(k_pages=to_paged(k, case.batch, case.kv_len, perm),
                     v_pages=to_paged(v, case.batch, case.kv_len, perm), kv_indices=kv_indices, page_table=table)
        return d

    def run_attention(self, case: Case, sets: list[dict], paged: bool):
        args, r, dev = self.args, self.r, self.dev
        flops, nbytes = msa_dense_work(case, args.output_mode)
        kv_b = case.total_kv * case.hkv * case.d * 2 * ELEM_BYTES[case.dtype]
        msa = ("msa", lambda: msa_impls.fmha_impl(case, dev, r.caps, paged=paged, sparse=False,
                                                 output_mode=args.output_mode, flops=flops, kv_bytes=kv_b,
                                                 work=(flops, nbytes)), args.output_mode != "maxscore")
        factories = []
        if "k" in sets[0]:
            factories = [(n, self._bf16_work(f, case), c) for n, f, c in self.dense_peers(case)]
        else:
            r.skip(case, "peers", "contiguous K/V copy for the peers does not fit next to the paged cache")
        factories.append(msa)
        r.run_case(case, sets, factories, dense_work(case), "attention")

    def _bf16_work(self, factory, case):
        def f():
            impl = factory()
            if impl.work is None and case.dtype != "bf16":
                impl.work = bf16_dense_work(case)
            return impl
        return f

    def sparse_prefill(self):
        for tp in self.args.tp:  # issue 8's bars are on 64/4 and 16/1 (--tp 1,4)
            hq, hkv = self.tp_heads[tp]
            for s in self.args.seqs:
                for causal in self.args.causal_list:
                    case = Case("sparse_prefill", s, s, 1, hq, hkv, self.args.head_dim, self.args.dtype, causal,
                                topk=self.args.topk)
                    kv_bytes = case.total_kv * hkv * case.d * 2 * 2
                    if not self.r.fits(case, 3 * kv_bytes + 3 * case.total_q * hq * case.d * 2, "inputs"):
                        continue
                    inputs = self.make_inputs(case, paged=True)
                    self.add_selection(case, inputs)
                    self.run_sparse(case, [inputs])
                    del inputs

    def add_selection(self, case: Case, inputs: dict):
        sel = random_tile_selection(case.batch, case.q_len, case.kv_len, case.hkv, case.topk, case.causal,
                                    self.dev, self.r.gen)
        inputs["selection"] = sel
        inputs["kv_block_indexes"] = sel.per_token()

    def run_sparse(self, case: Case, sets: list[dict]):
        args, r, dev = self.args, self.r, self.dev
        work = sparse_work(case, sets[0]["kv_block_indexes"])
        kv_b = work[1]
        factories = []
        has_contig = "k" in sets[0]
        if has_contig:
            factories.append(("flex", lambda: peers.flex_impl(case, dev, r.flex, "selection"), True))
        factories += [
            ("msa", lambda: msa_impls.fmha_impl(case, dev, r.caps, paged=True, sparse=True, output_mode="o",
                                                flops=work[0], kv_bytes=kv_b), True),
            ("msa-bridge", lambda: msa_impls.bridge_sparse_impl(case, dev, r.caps, work[0], kv_b), True),
            ("msa-bridge-paged", lambda: msa_impls.bridge_sparse_impl(case, dev, r.caps, work[0], kv_b, paged=True),
             True),
        ]
        if case.section == "sparse_prefill":
            factories.append(("msa-cute", lambda: msa_impls.cute_sparse_prefill_impl(case, dev, r.caps, work[0],
                                                                                    kv_b), True))
        else:
            factories.append(("msa-cute", lambda: msa_impls.cute_sparse_decode_impl(case, dev, r.caps, work[0],
                                                                                   kv_b), True))
        if has_contig:
            dense = dense_work(case) if case.dtype == "bf16" else bf16_dense_work(case)
            for name, f, _ in self.dense_peers(case, prefix="dense-", work=dense, checked=False):
                if name[len("dense-"):] in args.dense_list:
                    factories.append((name, f, False))
        else:
            r.skip(case, "flex/dense peers", "contiguous K/V copy for the peers does not fit next to the paged cache")
        r.run_case(case, sets, factories, work, "attention")

    def decode(self, section: str):
        hq, hkv = self.decode_heads
        paged = section != "decode"
        sparse = section == "sparse_decode"
        for b in self.args.decode_b:
            for kv in self.args.decode_k:
                case = Case(section, DECODE_Q[section], kv, b, hq, hkv, self.args.head_dim, self.args.dtype, True,
                            topk=self.args.topk if sparse else 0, extra={"series": f"B{b}"})
                set_bytes = case.total_kv * hkv * case.d * 2 * 2
                n = self.r.rotation_sets(set_bytes, True)
                contiguous = True
                if paged and not self.r.fits(case, 2.05 * n * set_bytes, "", quiet=True):
                    contiguous = False  # msa's paged cache alone; the peers need the contiguous copy
                if not self.r.fits(case, (2.05 if paged and contiguous else 1.02) * n * set_bytes, "inputs"):
                    continue
                sets = []
                for _ in range(n):
                    inp = self.make_inputs(case, paged=paged, contiguous=contiguous)
                    if sparse:
                        self.add_selection(case, inp)
                    sets.append(inp)
                if sparse:
                    self.run_sparse(case, sets)
                else:
                    self.run_attention(case, sets, paged=paged)
                del sets
                self.r.free_memory()

    def topk(self):
        hkv = self.tp_heads[1][1]
        for ctx in self.args.topk_ctx:
            for tq in self.args.topk_q:
                if tq > ctx:
                    continue
                case = Case("topk", tq, ctx, 1, hkv, hkv, 0, "fp32", True, topk=self.args.topk,
                            extra={"series": f"q{tq}"})
                nblk = case.num_blocks
                set_bytes = hkv * nblk * tq * 4
                n = self.r.rotation_sets(set_bytes, True)
                if not self.r.fits(case, n * set_bytes * 2.5, "scores"):
                    continue
                sets = [self.topk_inputs(case) for _ in range(n)]
                work = (0.0, W.topk_bytes(hkv, nblk, tq, case.topk))
                factories = [
                    ("torch-topk", lambda c=case: peers.torch_topk_impl(c), True),
                    ("msa", lambda c=case, b=set_bytes: msa_impls.topk_impl(c, self.dev, self.r.caps, b), True),
                ]
                self.r.run_case(case, sets, factories, work, "indices")
                del sets

    def topk_inputs(self, case: Case) -> dict:
        nblk = case.num_blocks
        scores = torch.randn(case.hq, nblk, case.q_len, device=self.dev, generator=self.r.gen)
        pos = token_positions(1, case.q_len, case.kv_len, self.dev)
        nvp = (pos // BLOCK + 1).to(torch.int32)
        blk = torch.arange(nblk, device=self.dev).view(1, -1, 1)
        scores = scores.masked_fill(blk >= nvp.view(1, 1, -1), float("-inf")).contiguous()
        return {"max_score": scores, "num_valid_pages": nvp}

    def indexer(self):
        hq, hkv = self.tp_heads[1]
        for s in self.args.seqs:
            ql = min(s, self.args.indexer_q)
            case = Case("indexer", ql, s, 1, hq, hkv, self.args.head_dim, self.args.dtype, True)
            pairs = W.visible_pairs(ql, s, True)
            e = ELEM_BYTES[case.dtype]
            ms_b = W.max_score_bytes(1, ql, s, hq)
            work = (W.index_pass_flops(pairs, hq, case.d), case.total_q * hq * case.d * e + s * hkv * case.d * e + ms_b)
            if not self.r.fits(case, 2.5 * ms_b + 3 * s * hkv * case.d * 2 + 2**30, "inputs + scores"):
                continue
            sets = [self.make_inputs(case, paged=True)]
            factories = [
                ("torch-bmm-blockmax", lambda c=case: peers.torch_blockmax_impl(c), True),
                ("msa-index", lambda c=case, f=work[0], b=s * hkv * case.d * 2:
                    msa_impls.index_pass_impl(c, self.dev, self.r.caps, f, b), True),
                ("msa-nvfp4-indexer", lambda c=case, f=work[0]:
                    msa_impls.fp4_indexer_impl(c, self.dev, self.r.caps, f, "nvfp4"), True),
                ("msa-mxfp4-indexer", lambda c=case, f=work[0]:
                    msa_impls.fp4_indexer_impl(c, self.dev, self.r.caps, f, "mxfp4"), True),
            ]
            self.r.run_case(case, sets, factories, work, "scores")
            del sets


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.dry:
        device = torch.device("cpu")
        torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    elif torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        print("error: no CUDA device; use --dry for the CPU dry mode", file=sys.stderr)
        return 2
    t_start = time.perf_counter()
    cfg = TimerConfig(dry_run_ms=args.dry_run_ms, repeat_ms=max(args.repeat_ms, 1.0),
                      min_samples=2 if args.dry else 5, use_graphs=False)
    roof = measure_roofline(device, cfg, dry=args.dry)
    print(f"msa benchmark | {roof.device_name} | dtype {args.dtype} | output_mode {args.output_mode} | "
          f"sections {','.join(args.section_list)}", flush=True)
    print(f"roofline: {roof.describe()}", flush=True)
    log(f"FA4 artifacts: {args.fa4_dir or 'none'}")
    writer = TsvWriter(args.output)
    runner = Runner(args, device, roof, writer)
    bench = Bench(runner)
    try:
        for section in args.section_list:
            if section in ("prefill", "paged_prefill"):
                bench.prefill(paged=section == "paged_prefill")
            elif section == "sparse_prefill":
                bench.sparse_prefill()
            elif section in ("decode", "paged_decode", "sparse_decode"):
                bench.decode(section)
            elif section == "topk":
                bench.topk()
            elif section == "indexer":
                bench.indexer()
    finally:
        writer.close()
        if runner.clocks is not None:
            runner.clocks.close()
    rows = runner.rows
    print(f"\n{len(rows)} rows, {len(runner.skipped)} skipped, {len(runner.mismatches)} mismatches, "
          f"{time.perf_counter() - t_start:.0f} s", flush=True)
    for m in runner.mismatches:
        print(f"MISMATCH {m}", flush=True)
    if args.output:
        log(f"TSV: {args.output}")
    if args.plot:
        try:
            plot(rows, args.plot)
            log(f"plot: {args.plot}")
        except Exception as e:  # a missing matplotlib must not lose the measurements
            log(f"plot failed: {type(e).__name__}: {e}")
    if args.results_md:
        argv_used = [os.path.relpath(os.path.abspath(sys.argv[0]), REPO) if argv is None else
                     "benchmarks/bench_sparse_attention_ops.py", *(sys.argv[1:] if argv is None else argv)]
        append_results_md(args.results_md, device_name=roof.device_name, repo_dir=REPO, argv=argv_used,
                          commit=args.commit,
                          roofline_line=roof.describe(), rows=rows, skipped=runner.skipped,
                          mismatches=runner.mismatches)
        log(f"results entry appended to {args.results_md}")
    return 1 if runner.mismatches else 0


if __name__ == "__main__":
    sys.exit(main())
