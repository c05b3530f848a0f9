"""Timing: CUDA events (median after warm-up), CUDA-graph replay for short launches, host clock on the CPU.

Every measured callable comes as a list, one per input set; calls rotate through the sets so that, when the sets
together exceed twice the L2 size, memory-bound kernels read from HBM rather than from L2.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch


@dataclass
class Timing:
    median_ms: float
    std_ms: float
    samples: int
    mode: str  # "events", "graph", "host"
    first_call_s: float  # wall time of the first (compiling / JIT) call
    note: str = ""


@dataclass
class TimerConfig:
    dry_run_ms: float = 100.0
    repeat_ms: float = 300.0
    min_samples: int = 3
    max_samples: int = 1000
    graph_below_us: float = 50.0
    use_graphs: bool = True
    graph_target_ms: float = 2.0  # one replay should last about this long (amortises the launch of the graph)
    max_graph_calls: int = 2048


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def per_call_ms(fn: Callable[[], object], calls: int, device: torch.device) -> float:
    """Mean ms per call of ``calls`` back-to-back calls (queued: no sync between them): CUDA events around the batch on
    a GPU, the host clock elsewhere."""
    if device.type != "cuda":
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        return (time.perf_counter() - t0) * 1e3 / calls
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(calls):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / calls


def _spread(samples: Sequence[float]) -> tuple[float, float]:
    med = statistics.median(samples)
    std = statistics.pstdev(samples) if len(samples) > 1 else 0.0
    return med, std


def _host_timing(fns: Sequence[Callable[[], object]], cfg: TimerConfig, first_s: float) -> Timing:
    n = len(fns)
    t_end = time.perf_counter() + cfg.dry_run_ms / 1e3
    i = 0
    while time.perf_counter() < t_end:
        fns[i % n]()
        i += 1
    samples = []
    r = 0
    while True:  # the first sample doubles as the estimate of how many fit in repeat_ms
        t0 = time.perf_counter()
        fns[r % n]()
        samples.append((time.perf_counter() - t0) * 1e3)
        r += 1
        want = min(cfg.max_samples, max(cfg.min_samples, cfg.repeat_ms / max(samples[0], 1e-3)))
        if r >= want:
            break
    reps = len(samples)
    med, std = _spread(samples)
    return Timing(med, std, reps, "host", first_s)


def _event_samples(fns, reps: int, device) -> list[float]:
    n = len(fns)
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for r in range(reps):
        starts[r].record()
        fns[r % n]()
        ends[r].record()
    _sync(device)
    return [s.elapsed_time(e) for s, e in zip(starts, ends)]


def _graph_timing(fns, cfg: TimerConfig, est_ms: float, device, first_s: float) -> Timing:
    n = len(fns)
    calls = max(n, math.ceil(cfg.graph_target_ms / max(est_ms, 1e-4)))
    calls = min(max(calls, 1), max(cfg.max_graph_calls, n))
    graph = torch.cuda.CUDAGraph()
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for i in range(n):  # warm each set on the capture stream (lazy workspaces, handles)
            fns[i]()
    torch.cuda.current_stream(device).wait_stream(side)
    _sync(device)
    with torch.cuda.graph(graph):
        for i in range(calls):
            fns[i % n]()
    graph.replay()
    _sync(device)
    replay_ms = est_ms * calls
    reps = int(min(cfg.max_samples, max(cfg.min_samples, cfg.repeat_ms / max(replay_ms, 1e-3))))
    samples = [t / calls for t in _event_samples([graph.replay], reps, device)]
    med, std = _spread(samples)
    return Timing(med, std, reps, "graph", first_s, note=f"graph of {calls} calls")


def measure(fns: Sequence[Callable[[], object]], device: torch.device, cfg: TimerConfig,
            graph_ok: bool = True, warm: bool = False) -> Timing:
    """Median latency of one call, rotating through ``fns`` (one per input set).

    ``warm``: the caller already made the first (compiling) call of ``fns[0]``; it is not repeated.
    """
    if not fns:
        raise ValueError("fns: expected at least one callable, got an empty list")
    first_s = 0.0
    if not warm:
        t0 = time.perf_counter()
        fns[0]()
        _sync(device)
        first_s = time.perf_counter() - t0
    if device.type != "cuda":
        return _host_timing(fns, cfg, first_s)

    n = len(fns)
    # warm-up for dry_run_ms (at least one call per input set)
    t_end = time.perf_counter() + cfg.dry_run_ms / 1e3
    i = 0
    while i < n or time.perf_counter() < t_end:
        fns[i % n]()
        i += 1
        _sync(device)  # the clock must see device time: never queue more warm-up than dry_run_ms
    est = _event_samples(fns, min(max(n, 3), 16), device)
    est_ms = statistics.median(est)

    note = ""
    if graph_ok and cfg.use_graphs and est_ms * 1e3 < cfg.graph_below_us:
        try:
            return _graph_timing(fns, cfg, est_ms, device, first_s)
        except Exception as e:  # capture is best effort: a host sync inside fn makes it fail
            note = f"graph capture failed ({type(e).__name__}: {str(e)[:120]}); events"
            _sync(device)
    if len(est) >= cfg.min_samples and sum(est) >= cfg.repeat_ms:
        med, std = _spread(est)  # long calls: the estimate already spent the repeat budget
        return Timing(med, std, len(est), "events", first_s, note=note)
    min_samples = cfg.min_samples if est_ms < 2000 else 1
    reps = int(min(cfg.max_samples, max(min_samples, cfg.repeat_ms / max(est_ms, 1e-3))))
    samples = _event_samples(fns, reps, device)
    med, std = _spread(samples)
    return Timing(med, std, reps, "events", first_s, note=note)
