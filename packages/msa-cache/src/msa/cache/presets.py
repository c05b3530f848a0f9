"""Warmup presets: TOML files describing which kernel variants to build. msa-cache does not interpret them;
the dict goes unchanged (plus ``name`` and, with ``--until``, ``until``) to every generator.

Search order: directories in ``MSA_CACHE_PRESET_PATH`` (os.pathsep-separated), then the presets shipped in
``msa/cache/presets/``. ``--preset`` also accepts a path to a .toml file.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from msa.cache.errors import CacheError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = ["preset_dirs", "list_presets", "load_preset"]

BUILTIN_DIR = Path(__file__).resolve().parent / "presets"


def preset_dirs() -> list[Path]:
    extra = [Path(p).expanduser() for p in os.environ.get("MSA_CACHE_PRESET_PATH", "").split(os.pathsep) if p]
    return [*extra, BUILTIN_DIR]


def list_presets() -> dict[str, Path]:
    """{name: file}, the first directory that has a name wins."""
    found: dict[str, Path] = {}
    for d in preset_dirs():
        try:
            files = sorted(d.glob("*.toml"))
        except OSError:
            continue
        for f in files:
            found.setdefault(f.stem, f)
    return found


def load_preset(name_or_path: str) -> dict:
    path = Path(name_or_path)
    if not (name_or_path.endswith(".toml") and path.is_file()):
        presets = list_presets()
        if name_or_path not in presets:
            raise CacheError(
                f"unknown warmup preset {name_or_path!r}; available: {', '.join(sorted(presets)) or '(none)'} "
                f"(searched {', '.join(str(d) for d in preset_dirs())}; add directories with MSA_CACHE_PRESET_PATH)"
            )
        path = presets[name_or_path]
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise CacheError(f"cannot read warmup preset {path}: {e}") from e
    data.setdefault("name", path.stem)
    data["source"] = str(path)
    return data
