"""Find the CUTLASS/CuTe C++ headers pinned by the repository's ``cutlass/cutlass.toml``."""

from __future__ import annotations

import functools
import os
import re
from pathlib import Path

try:  # py311+
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - py310
    import tomli as tomllib  # type: ignore[no-redef]

__all__ = ["cutlass_pin", "cutlass_include_dirs", "cutlass_version", "CutlassNotFoundError"]


class CutlassNotFoundError(RuntimeError):
    pass


def _pin_file() -> Path:
    here = Path(__file__).resolve().parent.parent
    packaged = here / "data" / "cutlass.toml"  # a symlink into the repo's cutlass/ in a checkout
    if packaged.exists():
        return packaged
    for parent in here.parents:  # editable install whose symlink was not materialised
        cand = parent / "cutlass" / "cutlass.toml"
        if cand.exists():
            return cand
    raise CutlassNotFoundError("cutlass.toml not found (expected msa/core/data/cutlass.toml or <repo>/cutlass/cutlass.toml)")


@functools.lru_cache(maxsize=1)
def cutlass_pin() -> dict:
    with open(_pin_file(), "rb") as f:
        return tomllib.load(f)["cutlass"]


def _read_version(include_dir: Path) -> str:
    text = (include_dir / "cutlass" / "version.h").read_text()
    parts = [re.search(rf"#define CUTLASS_{n}\s+(\d+)", text) for n in ("MAJOR", "MINOR", "PATCH")]
    if not all(parts):
        raise CutlassNotFoundError(f"cannot parse {include_dir / 'cutlass' / 'version.h'}")
    return ".".join(m.group(1) for m in parts)


@functools.lru_cache(maxsize=1)
def cutlass_include_dirs() -> tuple[str, ...]:
    """Include directories for CUTLASS (``include`` and ``tools/util/include``), version-checked against the pin."""
    pin = cutlass_pin()
    override = os.environ.get("MSA_CUTLASS_DIR")
    if override:
        root = Path(override)
        inc = root / "include" if (root / "include" / "cute").is_dir() else root
        util = root / "tools" / "util" / "include"
        dirs = [inc] + ([util] if util.is_dir() else [])
        source = f"MSA_CUTLASS_DIR={override}"
    else:
        try:
            import cutlass_library  # the nvidia-cutlass wheel
        except ImportError as e:
            raise CutlassNotFoundError(
                f"CUTLASS headers not found: install {pin['wheel']} or set MSA_CUTLASS_DIR to a CUTLASS checkout"
            ) from e
        base = Path(cutlass_library.__file__).resolve().parent
        dirs = [base / pin["include_subdir"], base / pin["util_include_subdir"]]
        source = f"{pin['wheel']} at {base}"
    if not (dirs[0] / "cute" / "tensor.hpp").exists():
        raise CutlassNotFoundError(f"{source}: no cute/tensor.hpp under {dirs[0]}")
    found = _read_version(dirs[0])
    if found != pin["version"] and os.environ.get("MSA_CUTLASS_ALLOW_MISMATCH") != "1":
        raise CutlassNotFoundError(
            f"CUTLASS version mismatch: cutlass/cutlass.toml pins {pin['version']}, {source} has {found} "
            "(set MSA_CUTLASS_ALLOW_MISMATCH=1 to build anyway; the version is part of every cache key)"
        )
    return tuple(str(d) for d in dirs)


def cutlass_version() -> str:
    return _read_version(Path(cutlass_include_dirs()[0]))
