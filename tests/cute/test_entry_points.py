"""msa-cache entry points of msa-cute: warmup generator (no kernels yet) and bundle runtime files."""

from __future__ import annotations

import subprocess
import sys

import pytest
from msa.cute import runtime, variants


def test_generate_rejects_bad_arguments():
    with pytest.raises(TypeError, match="preset"):
        variants.generate("m3", ["sm_90a"])
    with pytest.raises(TypeError, match="archs"):
        variants.generate({}, "sm_90a")


def test_runtime_files_points_at_the_cu13_runtime():
    files = runtime.runtime_files(["sm_90a"])
    lib = runtime.cute_dsl_runtime_library()
    if lib is None:
        assert files == []
    else:
        assert files == [lib] and lib.name == "libcute_dsl_runtime.so" and lib.parent.parent.name == "cu13"
        assert lib.is_file()


def test_import_is_lazy():
    code = ("import sys, msa.cute, msa.bridge; "
            "bad = [m for m in sys.modules if m.startswith(('cutlass', 'msa.cute.', 'msa.core.api', 'tqdm'))]; "
            "print(bad); assert not bad, bad")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
