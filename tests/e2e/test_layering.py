"""Dependency layering: msa-cache installs without torch; lower layers never depend on higher ones."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LAYERS = ["msa-cache", "msa-core", "msa-cute", "msa-bridge"]


def _deps(pkg: str) -> list[str]:
    text = (ROOT / "packages" / pkg / "pyproject.toml").read_text()
    block = re.search(r"^dependencies = \[(.*?)^\]", text, re.S | re.M).group(1)
    return [re.match(r"[A-Za-z0-9_.\-]+", s).group(0).lower() for s in re.findall(r'"([^"]+)"', block)]


def test_layers_only_depend_downwards():
    for i, pkg in enumerate(LAYERS):
        deps = _deps(pkg)
        for higher in LAYERS[i + 1 :]:
            assert higher not in deps, f"{pkg} must not depend on {higher}"
        if i > 0:
            assert LAYERS[i - 1] in deps, f"{pkg} should depend on {LAYERS[i - 1]}"
    assert "torch" not in _deps("msa-cache")
    assert "nvidia-cutlass-dsl" not in " ".join(_deps("msa-core")), "installing msa-core must not pull CuTe-DSL"


def test_torch_range_admits_gpu_box_torch():
    text = (ROOT / "packages" / "msa-core" / "pyproject.toml").read_text()
    spec = re.search(r'"torch([^"]*)"', text).group(1)
    assert ">=2.11" in spec, f"msa-core must admit torch 2.11 (the GPU box), got torch{spec}"


@pytest.mark.slow
def test_msa_cache_installs_into_a_fresh_venv_without_torch(tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = venv / "bin" / "python"
    subprocess.run([str(py), "-m", "pip", "install", "-q", str(ROOT / "packages" / "msa-cache")], check=True)
    out = subprocess.run(
        [str(py), "-c", "import sys, msa.cache; print('torch' in sys.modules); import importlib.util as u; "
         "print(u.find_spec('torch') is None)"],
        check=True, capture_output=True, text=True,
    ).stdout.split()
    assert out == ["False", "True"], out
    help_text = subprocess.run([str(venv / "bin" / "msa-cache"), "--help"], check=True, capture_output=True, text=True)
    assert "warmup" in help_text.stdout and "bundle" in help_text.stdout
