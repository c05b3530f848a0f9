"""SM clock and board power while a row is timed (``nvidia-smi`` sampled in the background).

Why: under long tensor-core loads an H200 holds its 700 W board limit and its SM clock drifts between ~1540 and
~1760 MHz with its thermal state (benchmarks/RESULTS.md, session 14), so one kernel's TFLOP/s moves by a few percent
between rows and runs. Each row's mean clock and power let a reader tell a slower kernel from a hotter card (and
compare throughput per clock cycle).

``ClockSampler.start()`` returns None where there is no ``nvidia-smi`` (CPU hosts, dry runs): callers skip the
annotation then. Samples every ``period_ms``; ``window(t0, t1)`` averages the samples stamped inside
``[t0, t1]`` (``time.time()`` seconds).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
from dataclasses import dataclass
from datetime import datetime


@dataclass(frozen=True)
class ClockSample:
    t: float  # seconds since the epoch (nvidia-smi's timestamp, local time)
    sm_mhz: float
    power_w: float


def parse_smi_line(line: str) -> ClockSample | None:
    """One ``--query-gpu=timestamp,clocks.sm,power.draw --format=csv,noheader,nounits`` line (first GPU); None for
    anything else (a header, ``[N/A]``, a partial line)."""
    parts = [p.strip() for p in line.split(",")]
    if len(parts) != 3:
        return None
    try:
        t = datetime.strptime(parts[0], "%Y/%m/%d %H:%M:%S.%f").timestamp()
        return ClockSample(t, float(parts[1]), float(parts[2]))
    except ValueError:
        return None


def window_mean(samples, t0: float, t1: float) -> tuple[float, float] | None:
    """(mean SM MHz, mean W) of the samples with t0 <= t <= t1; None when there are none."""
    xs = [s for s in samples if t0 <= s.t <= t1]
    if not xs:
        return None
    return sum(s.sm_mhz for s in xs) / len(xs), sum(s.power_w for s in xs) / len(xs)


def smi_id(gpu_index: int, visible: str | None = None) -> str:
    """nvidia-smi's ``--id`` for torch's ``cuda:gpu_index``: entry ``gpu_index`` of CUDA_VISIBLE_DEVICES (an index or
    a UUID, both of which nvidia-smi takes) when that is set, else the index itself."""
    if visible is None:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible:
        ids = [x.strip() for x in visible.split(",") if x.strip()]
        if 0 <= gpu_index < len(ids):
            return ids[gpu_index]
    return str(gpu_index)


class ClockSampler:
    def __init__(self, proc: subprocess.Popen):
        self._proc = proc
        self._samples: list[ClockSample] = []
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    @classmethod
    def start(cls, gpu_index: int = 0, period_ms: int = 50) -> ClockSampler | None:
        """Sample the GPU torch calls ``cuda:gpu_index`` (nvidia-smi ignores CUDA_VISIBLE_DEVICES: mapped here)."""
        exe = shutil.which("nvidia-smi")
        if exe is None:
            return None
        try:
            proc = subprocess.Popen([exe, f"--id={smi_id(gpu_index)}", "--query-gpu=timestamp,clocks.sm,power.draw",
                                     "--format=csv,noheader,nounits", "-lms", str(period_ms)],
                                    stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        except OSError:
            return None
        return cls(proc)

    def _read(self) -> None:
        for line in self._proc.stdout:
            s = parse_smi_line(line)
            if s is not None:
                with self._lock:
                    self._samples.append(s)

    def window(self, t0: float, t1: float) -> tuple[float, float] | None:
        with self._lock:
            samples = list(self._samples)
        return window_mean(samples, t0, t1)

    def close(self) -> None:
        if self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=2)
            except subprocess.TimeoutExpired:
                self._proc.kill()
