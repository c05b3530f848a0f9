"""Fixtures for the msa-cache tests: an isolated cache per test, helpers to run the testkit in subprocesses."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import msa_cache_testkit  # noqa: E402
from msa.cache import store as store_module  # noqa: E402


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    """Every test gets its own local tier, no shared tiers, JIT on, a private temp dir for the tmp fallback."""
    for name in list(os.environ):
        if name.startswith("MSA_"):
            monkeypatch.delenv(name)
    local = tmp_path / "local"
    monkeypatch.setenv("MSA_CACHE_DIR", str(local))
    private_tmp = tmp_path / "systmp"
    private_tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(private_tmp))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    monkeypatch.setattr(store_module, "_STORE", None)
    yield local
    store_module._STORE = None


@pytest.fixture
def kit():
    return msa_cache_testkit


@pytest.fixture
def fake_plugin_site(tmp_path, monkeypatch):
    """A dist-info on sys.path/PYTHONPATH declaring real entry points for loaders (so subprocesses see them)."""
    site = tmp_path / "fake_site"
    info = site / "msa_cache_fake_plugins-0.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: msa-cache-fake-plugins\nVersion: 0.0\n")
    (info / "entry_points.txt").write_text("[msa.cache.loaders]\nfake.module = msa_cache_testkit:load_fake\n")
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(site), os.environ["PYTHONPATH"]]))
    return site
