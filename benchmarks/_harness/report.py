"""Outputs: the TSV (exact upstream-style columns), the console table, the RESULTS.md entry and the plot."""

from __future__ import annotations

import datetime as _dt
import os
import shlex
import subprocess
import sys
from dataclasses import dataclass, field

TSV_COLUMNS = ["q_len", "kv_len", "dtype", "batch_size", "q_head", "kv_head", "head_dim", "latency_ms", "std_ms",
               "tflops", "gbs", "mfu_mbu_pct", "impl"]
COMPUTE_SECTIONS = {"prefill", "paged_prefill", "sparse_prefill", "indexer"}
MEMORY_SECTIONS = {"decode", "paged_decode", "sparse_decode", "topk"}
CAUSAL_SECTIONS = {"prefill", "paged_prefill", "sparse_prefill", "indexer"}
PREFILL_SECTIONS = {"prefill", "paged_prefill", "sparse_prefill"}


@dataclass
class Row:
    section: str
    causal: bool
    q_len: int
    kv_len: int
    dtype: str
    batch: int
    hq: int
    hkv: int
    d: int
    latency_ms: float
    std_ms: float
    tflops: float
    gbs: float
    pct: float
    impl: str
    note: str = ""
    check: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def tag(self) -> str:
        """``section[-nc]/impl``: the TSV has no section or causal column, so the impl column carries them."""
        sec = self.section + ("-nc" if self.section in CAUSAL_SECTIONS and not self.causal else "")
        return f"{sec}/{self.impl}"

    def values(self) -> list[str]:
        return [str(self.q_len), str(self.kv_len), self.dtype, str(self.batch), str(self.hq), str(self.hkv),
                str(self.d), f"{self.latency_ms:.4f}", f"{self.std_ms:.4f}", _num(self.tflops),
                _num(self.gbs), _num(self.pct), self.tag]


def _num(x: float) -> str:
    """Fixed 2 decimals from 1 up, 3 significant digits below (CPU dry rows are tiny), never rounded to 0."""
    return f"{x:.2f}" if abs(x) >= 1 or x == 0 else f"{x:.3g}"


class TsvWriter:
    """Writes the header once and flushes every row, so a run cut short keeps what it measured."""

    def __init__(self, path: str | None):
        self.path = path
        self._f = None
        if path:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            self._f = open(path, "w")
            self._f.write("\t".join(TSV_COLUMNS) + "\n")
            self._f.flush()

    def write(self, row: Row) -> None:
        if self._f:
            self._f.write("\t".join(row.values()) + "\n")
            self._f.flush()

    def close(self) -> None:
        if self._f:
            self._f.close()
            self._f = None


_WIDTHS = [8, 8, 6, 10, 6, 7, 8, 11, 9, 10, 11, 11, 0]


def console_header() -> str:
    cells = [f"{c:>{w}}" if w else c for c, w in zip(TSV_COLUMNS, _WIDTHS)]
    return " ".join(cells)


def console_line(row: Row) -> str:
    cells = [f"{v:>{w}}" if w else v for v, w in zip(row.values(), _WIDTHS)]
    return " ".join(cells)


def print_table(rows: list[Row], out=sys.stdout) -> None:
    print(console_header(), file=out)
    print("-" * 120, file=out)
    for r in rows:
        print(console_line(r), file=out)


def markdown_table(rows: list[Row]) -> str:
    lines = ["| " + " | ".join(TSV_COLUMNS) + " | check |", "|" + "---|" * (len(TSV_COLUMNS) + 1)]
    for r in rows:
        lines.append("| " + " | ".join(r.values()) + f" | {r.check or '-'} |")
    return "\n".join(lines)


def _run(cmd: list[str]) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=20).stdout.strip()
    except Exception:
        return ""


def environment_lines(device_name: str, repo_dir: str, commit: str | None = None) -> list[str]:
    import torch

    driver = _run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]).splitlines()
    dirty = ""
    if commit is None:
        commit = _run(["git", "-C", repo_dir, "rev-parse", "--short=12", "HEAD"]) or "unknown (no git here: --commit)"
        dirty = _run(["git", "-C", repo_dir, "status", "--porcelain", "--untracked-files=no"])
    try:
        import triton

        triton_v = triton.__version__
    except Exception:
        triton_v = "none"
    return [
        f"- card: {device_name}; driver: {driver[0] if driver else 'n/a (no nvidia-smi)'}",
        f"- torch {torch.__version__}, CUDA {torch.version.cuda}, triton {triton_v}",
        f"- commit: {commit}{' (uncommitted changes)' if dirty else ''}",
    ]


def append_results_md(path: str, *, device_name: str, repo_dir: str, argv: list[str], roofline_line: str,
                      rows: list[Row], skipped: list[str], mismatches: list[str], commit: str | None = None) -> None:
    """Append one dated entry; earlier entries are never touched (the file is opened for append)."""
    now = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    cmd = " ".join(shlex.quote(a) for a in ["python", *argv])
    parts = [f"\n## {now} — {device_name}\n", *environment_lines(device_name, repo_dir, commit),
             f"- command: `{cmd}`", f"- roofline: {roofline_line}", "", markdown_table(rows), ""]
    if mismatches:
        parts.append("- **output mismatches:** " + "; ".join(mismatches))
    if skipped:
        parts.append("- skipped: " + "; ".join(skipped[:40]) + (" …" if len(skipped) > 40 else ""))
    parts.append("- interpretation: _TODO (lead): ratios vs the best peer per case, and what they mean_")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a") as f:
        f.write("\n".join(parts) + "\n")


def plot(rows: list[Row], path: str) -> None:
    """TFLOP/s (compute sections) or GB/s (memory sections) vs length, one panel per section."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sections = []
    for r in rows:
        key = r.tag.split("/")[0]
        if key not in sections:
            sections.append(key)
    if not sections:
        return
    ncol = min(3, len(sections))
    nrow = -(-len(sections) // ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(6 * ncol, 4.2 * nrow), squeeze=False)
    for ax, sec in zip(axes.flat, sections):
        sec_rows = [r for r in rows if r.tag.split("/")[0] == sec]
        base = sec.split("-")[0]
        memory = base in MEMORY_SECTIONS
        configs = {(r.batch, r.hq, r.hkv, r.extra.get("series", "")) for r in sec_rows}
        series: dict[str, list[tuple[int, float]]] = {}
        for r in sec_rows:
            label = r.impl
            if len(configs) > 1:
                label += f" B{r.batch} H{r.hq}/{r.hkv}" + (f" {r.extra['series']}" if r.extra.get("series") else "")
            x = r.q_len if base in PREFILL_SECTIONS else r.kv_len
            series.setdefault(label, []).append((x, r.gbs if memory else r.tflops))
        for label, pts in sorted(series.items()):
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
        ax.set_xscale("log", base=2)
        ax.set_title(sec)
        ax.set_xlabel("q_len (= kv_len)" if base in PREFILL_SECTIONS else "kv_len")
        ax.set_ylabel("GB/s" if memory else "TFLOP/s")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(sections):]:
        ax.axis("off")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
