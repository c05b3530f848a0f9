"""The harness on a GPU with small shapes (the lead runs this before a full sweep): every dense and sparse peer
that can run produces a row, msa rows appear, and all checked outputs agree."""

from __future__ import annotations

import csv
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BENCH = os.path.join(REPO, "benchmarks", "bench_sparse_attention_ops.py")


@pytest.mark.gpu
def test_small_gpu_sweep(tmp_path):
    tsv = tmp_path / "gpu.tsv"
    cmd = [sys.executable, BENCH, "--sections", "prefill,sparse_prefill,decode,sparse_decode,topk,indexer",
           "--seqs", "8192", "--tp", "1", "--decode-k", "8192", "--decode-b", "8", "--topk-ctx", "8192",
           "--topk-q", "64", "--indexer-q", "1024", "--causal", "both", "--dry-run-ms", "20", "--repeat-ms", "50",
           "-o", str(tsv), "--plot", str(tmp_path / "gpu.png")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-6000:]}\nstderr:\n{proc.stderr[-6000:]}"
    with open(tsv) as f:
        tags = {r["impl"] for r in csv.DictReader(f, delimiter="\t")}
    expected = ["prefill/sdpa-cudnn", "prefill/sdpa-flash", "prefill/flex", "prefill-nc/sdpa-cudnn",
                "sparse_prefill/flex", "decode/sdpa-flash", "decode/flex", "sparse_decode/flex", "topk/torch-topk",
                "indexer/torch-bmm-blockmax"]
    if os.path.isfile(os.path.join(REPO, ".gpu", "fa4", "manifest.json")) or os.environ.get("MSA_FA4_DIR"):
        expected += ["prefill/fa4", "prefill-nc/fa4", "decode/fa4"]
    missing = [t for t in expected if t not in tags]
    assert not missing, f"missing rows {missing}; have {sorted(tags)}\nstderr:\n{proc.stderr[-6000:]}"
    assert any(t.startswith("prefill/msa") for t in tags), sorted(tags)
    assert any(t.startswith("topk/msa") for t in tags), sorted(tags)
