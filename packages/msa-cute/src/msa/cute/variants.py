"""msa-cache warmup generator entry point (``msa.cache.generators``: ``msa-cute = msa.cute.variants:generate``).

Each kernel module under ``msa.cute.kernels`` that exposes ``cute_specs(preset: dict, arch: str) ->
list[CuteSpec]`` contributes its variants; this turns them into picklable msa-cache ``Variant`` records whose
worker (:func:`msa.cute.jit.build_variant`) builds the spec through the store. Nothing here imports the DSL: kernel
modules that need it are listed by name and asked only for their spec lists (``*_specs`` modules are DSL-free).
"""

from __future__ import annotations

import importlib
from typing import Iterable

__all__ = ["generate", "specs_for", "SPEC_MODULES"]

# DSL-free modules that list the CuteSpecs of a kernel family (the kernels themselves import cutlass).
SPEC_MODULES = ("msa.cute.kernels.specs",)


def _check(preset, archs) -> None:
    if not isinstance(preset, dict):
        raise TypeError(f"preset: expected a dict, got {type(preset).__name__}")
    if not isinstance(archs, (list, tuple)) or not all(isinstance(a, str) for a in archs):
        raise TypeError(f"archs: expected a list of arch strings, got {archs!r}")


def specs_for(preset: dict, archs: Iterable[str]) -> list:
    """Every CuteSpec the preset asks for on ``archs`` (deduplicated by name, in a stable order)."""
    _check(preset, list(archs) if not isinstance(archs, (list, tuple)) else archs)
    out, seen = [], set()
    for arch in archs:
        for modname in SPEC_MODULES:
            mod = importlib.import_module(modname)
            for spec in mod.cute_specs(preset, arch):
                if spec.name not in seen:
                    seen.add(spec.name)
                    out.append(spec)
    return out


def generate(preset: dict, archs: list[str]) -> list:
    """Variants of msa-cute kernels to warm for ``preset`` on ``archs``.

    ``preset["until"] == "object"`` (``msa-cache warmup --until object``) stops at exported objects.
    """
    from msa.cache import Variant

    _check(preset, archs)
    until = preset.get("until", "module")
    return [
        Variant(package="msa-cute", name=spec.name, arch=spec.arch, build_target="msa.cute.jit:build_variant",
                params={"until": until, **spec.to_params()})
        for spec in specs_for(preset, archs)
    ]
