"""`msa demo` through the console entry point: the table is printed and the exit code reflects recall."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

TINY = ["demo", "--seq-len", "1024", "--heads", "4/2", "--index-heads", "2", "--head-dim", "32", "--topk", "4",
        "--chunk", "512", "--no-progress", "--device", "cpu"]


def run_msa(args, timeout=120):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "msa.bridge.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def test_msa_help_lists_commands():
    r = run_msa(["--help"])
    assert r.returncode == 0
    assert "demo" in r.stdout and "commands" in r.stdout


def test_demo_tiny_prints_table_and_succeeds():
    r = run_msa(TINY)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    for label in ("context length", "heads (Hq/Hkv/index)", "top-k", "blocks selected", "planted-block recall",
                  "output rel. L2 vs dense", "on needle queries", "time sparse attention", "time dense attention"):
        assert label in out, label
    assert "1,024 tokens" in out and "4/2/2, head dim 32" in out
    recall = float(re.search(r"planted-block recall\s*\|\s*([\d.]+)%", out).group(1))
    assert recall >= 90.0
    rel = float(re.search(r"output rel\. L2 vs dense\s*\|\s*([\d.e+-]+)", out).group(1))
    assert 0 < rel < 0.5  # sparse differs from dense, but not wildly (planted structure dominates attention)
    needle = float(re.search(r"on needle queries\s*\|\s*([\d.e+-]+)", out).group(1))
    assert needle < 0.1
    assert "msa demo: OK" in out


@pytest.mark.parametrize("flag", [["--min-recall", "1.01"], ["--max-rel-error", "1e-9"]])
def test_demo_exit_code_when_a_check_fails(flag):
    r = run_msa([*TINY, *flag])
    assert r.returncode == 1
    assert "FAILED" in r.stderr and "recall" in r.stderr and "rel. L2 error" in r.stderr


@pytest.mark.parametrize("bad,msg", [(["--heads", "5/2"], "Hkv dividing Hq"), (["--topk", "0"], "positive")])
def test_demo_rejects_bad_flags(bad, msg):
    r = run_msa(["demo", *bad])
    assert r.returncode == 2
    assert msg in r.stderr


def test_console_script_entry_point(capsys):
    from importlib.metadata import entry_points

    eps = [e for e in entry_points(group="console_scripts") if e.name == "msa"]
    assert eps and eps[0].value == "msa.bridge.cli:main"
    main = eps[0].load()
    assert main([]) == 0  # no command: prints help
    assert "demo" in capsys.readouterr().out
