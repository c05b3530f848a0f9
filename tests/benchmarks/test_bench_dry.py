"""The benchmark harness end to end in --dry mode (CPU, tiny shapes): every section writes rows with the exact TSV
columns, the torch peers and (when msa implements them) the msa rows appear, outputs agree across rows, and the
plot and the RESULTS.md entry are written."""

from __future__ import annotations

import csv
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BENCH = os.path.join(REPO, "benchmarks", "bench_sparse_attention_ops.py")
COLUMNS = ["q_len", "kv_len", "dtype", "batch_size", "q_head", "kv_head", "head_dim", "latency_ms", "std_ms",
           "tflops", "gbs", "mfu_mbu_pct", "impl"]
SECTIONS = ["prefill", "paged_prefill", "sparse_prefill", "decode", "paged_decode", "sparse_decode", "topk", "indexer"]


def _msa_has(module: str, name: str) -> bool:
    try:
        mod = __import__(module, fromlist=[name])
        getattr(mod, name)
        return True
    except (ImportError, AttributeError):
        return False


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    tsv, png, md = out / "dry.tsv", out / "dry.png", out / "RESULTS.md"
    md.write_text("# earlier entry\n\nkept as is\n")
    # 3 and 5 blocks of keys with top-2 selections, so the sparse sections really are sparse
    cmd = [sys.executable, BENCH, "--dry", "--sections", "all", "--seqs", "384", "--decode-k", "640",
           "--decode-b", "2", "--topk", "2", "--topk-ctx", "1024", "--topk-q", "16", "--causal", "on",
           "-o", str(tsv), "--plot", str(png), "--results-md", str(md)]
    env = dict(os.environ, MSA_BACKEND="auto")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=170, env=env, cwd=str(out))
    return proc, tsv, png, md


def _rows(tsv):
    with open(tsv) as f:
        reader = csv.reader(f, delimiter="\t")
        header = next(reader)
        return header, [dict(zip(header, r)) for r in reader]


def test_exit_code_and_no_mismatch(dry_run):
    proc, *_ = dry_run
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}"
    assert "MISMATCH" not in proc.stdout, proc.stdout


def test_tsv_columns_and_rows(dry_run):
    _, tsv, *_ = dry_run
    header, rows = _rows(tsv)
    assert header == COLUMNS
    assert rows, "no rows"
    for r in rows:
        assert len(r) == len(COLUMNS)
        assert float(r["latency_ms"]) > 0, r
        assert float(r["std_ms"]) >= 0, r
        section, _, impl = r["impl"].partition("/")
        assert section.replace("-nc", "") in SECTIONS and impl, r
        if section.startswith(("prefill", "sparse_prefill", "indexer")):
            assert float(r["tflops"]) > 0, r
        if section != "topk":
            assert int(r["head_dim"]) == 128 and int(r["q_head"]) % int(r["kv_head"]) == 0, r
    tags = {r["impl"] for r in rows}
    for section in SECTIONS:
        assert any(t.startswith(section + "/") for t in tags), f"no rows for {section}: {sorted(tags)}"
    # the torch peers run on the CPU
    for tag in ("prefill/sdpa-math", "prefill/flex", "decode/flex", "sparse_prefill/flex", "topk/torch-topk",
                "indexer/torch-bmm-blockmax"):
        assert tag in tags, f"missing {tag}: {sorted(tags)}"
    # msa rows, for whatever msa implements today (the reference on the CPU)
    if _msa_has("msa.core", "fmha"):
        for tag in ("prefill/msa-reference", "decode/msa-reference", "paged_prefill/msa-reference",
                    "sparse_prefill/msa-reference", "indexer/msa-index-reference"):
            assert tag in tags, f"missing {tag}: {sorted(tags)}"
    if _msa_has("msa.core", "sparse_topk_select"):
        assert "topk/msa-reference" in tags


def test_console_table_matches_tsv(dry_run):
    proc, tsv, *_ = dry_run
    _, rows = _rows(tsv)
    printed = [line.split() for line in proc.stdout.splitlines() if line.split() and line.split()[-1].count("/") == 1]
    assert len(printed) == len(rows)
    assert [p[-1] for p in printed] == [r["impl"] for r in rows]


def test_plot_and_results_entry(dry_run):
    _, tsv, png, md = dry_run
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = md.read_text()
    assert text.startswith("# earlier entry\n\nkept as is\n"), "earlier RESULTS.md content was not kept"
    assert "| q_len | kv_len |" in text and "prefill/" in text
    assert "- command: `python benchmarks/bench_sparse_attention_ops.py --dry" in text
    assert "interpretation:" in text
