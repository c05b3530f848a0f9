"""Interleaved A/B of fmha_sm90 module builds inside the whole sparse prefill call (``msa.bridge.sparse_fmha``),
read raw and per SM clock cycle.

Why this exists: under long tensor-core loads an H200 holds its 700 W limit and its SM clock drifts by 10-15% with
its thermal state, so one build's TFLOP/s moves by +-3% between 300 ms windows (benchmarks/RESULTS.md, session 14).
A build that does more work per cycle can even lose raw (it draws more power, so the card clocks lower). This tool
alternates the builds window by window (ABBA order per round), samples the SM clock and board power in each window
(``_harness/clocks.py``) and reports per variant the median eff TFLOP/s, the mean clock / power and the median
TFLOP/s per GHz, each also as a ratio to the first variant.

    python benchmarks/bench_ab_sparse.py --variants "base=DIR_A,cand=DIR_B" --shapes 32768:64:4,131072:16:1
    python benchmarks/bench_ab_sparse.py --dry     # CPU: tiny shape, reference path, no clocks (checks the plumbing)

A variant is ``LABEL=DIR``: a directory of prebuilt fmha_sm90 modules (``bench_fmha.py --prebuild``), loaded the way
``MSA_FMHA_SM90_PREBUILT`` loads them; ``LABEL=`` (empty DIR) is whatever the process would load by default. A variant
may add plan-time environment settings, ``LABEL=DIR@NAME=VALUE@...`` (e.g. ``pair=@MSA_QOUTER_PAIR=1``): each
variant's bridge plan is made with them set. Shapes are
``S:HQ:HKV`` (causal, q = kv = S, d 128, top-k 16); selections are the suite's per-128-query-tile ones
(``--selection tile``), every tile picking blocks 0..14 plus its diagonal (``fixed``: K / V stay L2-resident), or one
random draw per 8-token group (``group8``: neighbouring 8-token Q-outer items share only their diagonal block -- the
worst case for 2-CTA pair items, whose 16-token unions are then ~2x each half's).
Every variant's output is compared with the first one's (bit-identical expected for pure scheduling changes).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from _harness import flops as W  # noqa: E402
from _harness.cases import TileSelection, random_tile_selection, token_positions  # noqa: E402
from _harness.clocks import ClockSampler  # noqa: E402
from _harness.env import temporary_env  # noqa: E402
from _harness.timing import _sync as sync  # noqa: E402
from _harness.timing import per_call_ms  # noqa: E402

TOPK = 16
PLAN_ENV: dict[str, dict[str, str]] = {}  # per variant label: environment set while its bridge plan is made


def parse_variants(spec: str) -> list[tuple[str, str]]:
    """``LABEL=DIR[@NAME=VALUE...]`` items -> ``[(label, dir)]``; the plan-time settings are kept per label in
    :data:`PLAN_ENV` (read by :func:`run_shape`)."""
    out = []
    PLAN_ENV.clear()
    for item in filter(None, (x.strip() for x in spec.split(","))):
        label, sep, rest = item.partition("=")
        if not sep or not label:
            raise ValueError(f"--variants: expected LABEL=DIR (DIR may be empty: the default modules), got {item!r}")
        directory, *settings = rest.split("@")
        env = {}
        for kv in settings:
            name, eq, value = kv.partition("=")
            if not eq or not name:
                raise ValueError(f"--variants: {label}: expected @NAME=VALUE plan settings, got {kv!r}")
            env[name] = value
        if directory and not os.path.isdir(directory):
            raise ValueError(f"--variants: {label}: {directory!r} is not a directory")
        PLAN_ENV[label] = env
        out.append((label, directory))
    if len({lab for lab, _ in out}) != len(out):
        raise ValueError(f"--variants: labels must differ, got {[lab for lab, _ in out]}")
    if not out:
        raise ValueError("--variants: expected at least one LABEL=DIR")
    return out


def parse_shapes(spec: str) -> list[tuple[int, int, int]]:
    out = []
    for item in filter(None, (x.strip() for x in spec.split(","))):
        try:
            s, hq, hkv = (int(x) for x in item.split(":"))
        except ValueError:
            raise ValueError(f"--shapes: expected S:HQ:HKV, got {item!r}") from None
        if s < 128 or hq < 1 or hkv < 1 or hq % hkv:
            raise ValueError(f"--shapes: {item!r}: need S >= 128 and HKV dividing HQ")
        out.append((s, hq, hkv))
    return out


def group_selection(s: int, hkv: int, device, gen, group: int = 8) -> torch.Tensor:
    """Per-token ``[s, hkv, 16]`` int32: each ``group``-token run picks 15 random visible blocks + its diagonal."""
    groups = -(-s // group)
    last = torch.clamp((torch.arange(groups, device=device) + 1) * group, max=s) - 1
    diag = last // 128  # [groups]
    nblk = -(-s // 128)
    score = torch.rand(groups, hkv, nblk, device=device, generator=gen)
    score = score.masked_fill(torch.arange(nblk, device=device).view(1, 1, -1) >= diag.view(-1, 1, 1), -1.0)
    val, idx = torch.topk(score, min(TOPK - 1, nblk), dim=-1)
    ids = torch.full((groups, hkv, TOPK), 1 << 30, dtype=torch.int64, device=device)
    ids[..., : idx.shape[-1]] = torch.where(val >= 0, idx, 1 << 30)
    ids[..., TOPK - 1] = diag.view(-1, 1)
    ids = ids.sort(dim=-1).values
    ids = torch.where(ids >= 1 << 30, -1, ids)
    return ids.repeat_interleave(group, dim=0)[:s].to(torch.int32).contiguous()


def fixed_selection(s: int, hkv: int, device) -> TileSelection:
    """Every 128-query tile picks blocks 0..14 plus its own diagonal block (causal, q = kv)."""
    tiles = -(-s // 128)
    diag = torch.arange(tiles, device=device).view(1, -1, 1, 1)
    low = torch.arange(TOPK - 1, device=device).view(1, 1, 1, -1).expand(1, tiles, hkv, TOPK - 1)
    low = torch.where(low < diag, low, -1)
    ids = torch.cat([low, diag.expand(1, tiles, hkv, 1)], -1)
    key = torch.where(ids >= 0, ids, 1 << 30).sort(-1).values
    return TileSelection(torch.where(key >= 1 << 30, -1, key), s, s, True)


class ModuleSwitch:
    """Makes msa.core.kernels.fmha_sm90 load its modules from the current variant's directory (memoised per variant)."""

    def __init__(self, variants):
        from msa.core.kernels import fmha_sm90 as k90

        self.k90, self.dirs, self.cache, self.current = k90, dict(variants), {}, variants[0][0]
        self.default_env = os.environ.get(k90.PREBUILT_ENV)
        self.patched, self.orig = k90._load_module, k90._load_module.__wrapped__
        k90._load_module = self._load

    def restore(self) -> None:
        self.k90._load_module = self.patched
        if self.default_env is None:
            os.environ.pop(self.k90.PREBUILT_ENV, None)
        else:
            os.environ[self.k90.PREBUILT_ENV] = self.default_env

    def _load(self, *args):
        key = (self.current, *args)
        if key not in self.cache:
            directory = self.dirs[self.current] or self.default_env
            if directory:
                os.environ[self.k90.PREBUILT_ENV] = directory
            else:
                os.environ.pop(self.k90.PREBUILT_ENV, None)
            self.cache[key] = self.orig(*args)
        return self.cache[key]


def _fmt(x: float) -> str:
    return f"{x:.1f}" if abs(x) >= 1 else f"{x:.3g}"


def run_shape(shape, variants, switch, args, device, clocks) -> list[str]:
    import msa.bridge as mb

    s, hq, hkv = shape
    gen = torch.Generator(device=device).manual_seed(args.seed)
    if args.selection == "group8":
        sel = group_selection(s, hkv, device, gen)
    else:
        sel_t = (random_tile_selection(1, s, s, hkv, TOPK, True, device, gen) if args.selection == "tile"
                 else fixed_selection(s, hkv, device))
        sel = sel_t.per_token()
    q = torch.randn(s, hq, 128, device=device, dtype=torch.bfloat16, generator=gen)
    k = torch.randn(s, hkv, 128, device=device, dtype=torch.bfloat16, generator=gen)
    v = torch.randn(s, hkv, 128, device=device, dtype=torch.bfloat16, generator=gen)
    out = torch.empty(s, hq, 128, device=device, dtype=torch.bfloat16)
    plans = {}
    for lab, _ in variants:
        with temporary_env(PLAN_ENV.get(lab, {})):
            plans[lab] = mb.sparse_fmha_plan([s], [s], hq, hkv, causal=True, kv_block_num=TOPK, device=device)
    flops = 2.0 * 256 * (hq // hkv) * W.sparse_selected_pairs(sel, token_positions(1, s, s, device), s, True)

    def call():
        return mb.sparse_fmha(q, k, v, plans[switch.current], kv_block_indexes=sel, out=out)

    lines, ref = [], None
    for label, _ in variants:  # warm each variant (loads its modules) and compare its output with the first's
        switch.current = label
        for _ in range(2):
            call()
        sync(device)
        o = out.float().clone()
        if ref is None:
            ref = o
        elif not torch.equal(o, ref):
            lines.append(f"  {label}: output differs from {variants[0][0]} (max abs {(o - ref).abs().max().item():.3e})")
    t0 = time.perf_counter()
    call()
    sync(device)
    est_ms = (time.perf_counter() - t0) * 1e3
    calls = max(2, int(args.window_ms / max(est_ms, 1e-3)))
    res = {lab: [] for lab, _ in variants}
    for r in range(args.rounds):
        for label, _ in (variants if r % 2 == 0 else variants[::-1]):
            switch.current = label
            call()
            sync(device)
            w0 = time.time()
            ms = per_call_ms(call, calls, device)
            res[label].append((flops / (ms * 1e-3) / 1e12, w0, time.time()))
    if clocks is not None:
        time.sleep(0.2)  # the last window's samples arrive with a short lag
    base_raw = base_clk = None
    head = f"S{s} {hq}/{hkv} {args.selection} ({calls} calls x {args.rounds} rounds)"
    for label, _ in variants:
        tf = [x[0] for x in res[label]]
        med = statistics.median(tf)
        cw = [clocks.window(a, b) for _, a, b in res[label]] if clocks is not None else []
        cw = [c for c in cw if c is not None]
        per = [x / c[0] * 1000 for x, c in zip(tf, cw)] if len(cw) == len(tf) else []
        base_raw = med if base_raw is None else base_raw
        line = f"{head} {label}: {_fmt(med)} eff TFLOP/s ({med / base_raw:.3f}x) [{_fmt(min(tf))}-{_fmt(max(tf))}]"
        if per:
            pm = statistics.median(per)
            base_clk = pm if base_clk is None else base_clk
            line += (f", {statistics.mean(c[0] for c in cw):.0f} MHz, {statistics.mean(c[1] for c in cw):.0f} W, "
                     f"{pm:.1f} per GHz ({pm / base_clk:.3f}x)")
        lines.append(line)
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variants", default="default=", help='"LABEL=DIR,..." prebuilt module dirs (empty DIR: default)')
    p.add_argument("--shapes", default="32768:64:4,131072:64:4,32768:16:1,131072:16:1", help="S:HQ:HKV,...")
    p.add_argument("--selection", choices=["tile", "fixed", "group8"], default="tile")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--window-ms", type=float, default=300.0, help="timed calls per window fill about this long")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dry", action="store_true", help="CPU, one tiny shape, 2 rounds (checks the plumbing)")
    args = p.parse_args(argv)
    if args.dry:
        device = torch.device("cpu")
        args.shapes, args.rounds, args.window_ms = "256:4:1", 2, 1.0
    else:
        if not torch.cuda.is_available():
            print("bench_ab_sparse: no CUDA device (use --dry on a CPU host)", file=sys.stderr)
            return 2
        device = torch.device("cuda")
    variants, shapes = parse_variants(args.variants), parse_shapes(args.shapes)
    switch = ModuleSwitch(variants)
    clocks = ClockSampler.start(device.index or 0) if device.type == "cuda" else None
    try:
        for shape in shapes:
            for line in run_shape(shape, variants, switch, args, device, clocks):
                print(line, flush=True)
    finally:
        switch.restore()
        if clocks is not None:
            clocks.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
