"""Shared checks for msa-core tests."""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # for msa_core_testutil (importlib import mode puts no test directory on sys.path)
    sys.path.insert(0, str(HERE))


def fatbin_elf_archs(path: Path) -> set[int]:
    """SM numbers of the ELF (cubin) entries in every fatbin embedded in ``path`` (no CUDA tools needed)."""
    data = Path(path).read_bytes()
    magic = struct.pack("<I", 0xBA55ED50)
    archs, i = set(), data.find(magic)
    while i >= 0:
        _version, header_size, files_size = struct.unpack_from("<HHQ", data, i + 4)
        off, end = i + header_size, i + header_size + files_size
        while off < end:
            kind, _, entry_header, size = struct.unpack_from("<HHIQ", data, off)
            if kind == 2:
                archs.add(struct.unpack_from("<I", data, off + 28)[0])
            off += entry_header + size
        i = data.find(magic, end)
    return archs


def cuobjdump() -> str | None:
    for cand in (os.environ.get("CUDA_HOME", "/usr/local/cuda") + "/bin/cuobjdump", shutil.which("cuobjdump")):
        if cand and os.path.isfile(cand) and os.access(cand, os.X_OK):
            return cand
    return None


def assert_module_has_arch(so: Path, arch: str, sm: int) -> None:
    """``so`` holds an ``sm`` cubin (fatbin scan), and cuobjdump (where installed) lists ``<arch>.cubin``."""
    so = Path(so)
    assert so.is_file()
    assert sm in fatbin_elf_archs(so), f"{so}: no sm_{sm} cubin (found {sorted(fatbin_elf_archs(so))})"
    tool = cuobjdump()
    if tool:
        listing = subprocess.run([tool, "--list-elf", str(so)], capture_output=True, text=True).stdout
        assert f"{arch}.cubin" in listing, listing


@pytest.fixture
def module_arch_check():
    """``check(so_path, arch, sm)``: the compile tests' assertion that a built module carries the arch's cubin."""
    return assert_module_has_arch
