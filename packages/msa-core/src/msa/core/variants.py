"""msa-core's warmup generator (entry point ``msa.cache.generators: msa-core``).

Each kernel module under ``msa.core.kernels`` exposes ``jit_specs(preset: dict, arch: str) -> list[JitSpec]``;
this turns them into picklable msa-cache ``Variant`` records whose worker builds the spec through the store.
"""

from __future__ import annotations

import importlib
from typing import Iterable

KERNEL_MODULES = (
    "msa.core.kernels.topk", "msa.core.kernels.fmha_sm90", "msa.core.kernels.sparse_decode",
    "msa.core.kernels.qouter_union", "msa.core.kernels.fmha_sm90_qouter", "msa.core.kernels.kv_dequant",
)


def _spec_params(spec) -> dict:
    return {
        "family": spec.family,
        "sources": list(spec.sources),
        "params": dict(spec.params),
        "arch": spec.arch,
        "use_cutlass": spec.use_cutlass,
        "extra_cuda_cflags": list(spec.extra_cuda_cflags),
    }


def specs_for(preset: dict, archs: Iterable[str]):
    out = []
    for arch in archs:
        for modname in KERNEL_MODULES:
            try:
                mod = importlib.import_module(modname)
            except ModuleNotFoundError:
                continue  # kernel not written yet
            fn = getattr(mod, "jit_specs", None)
            if fn is not None:
                out.extend(fn(preset, arch))
    return out


def generate(preset: dict, archs: list[str]):
    from msa.cache import Variant

    seen = set()
    variants = []
    for spec in specs_for(preset, archs):
        if spec.name in seen:
            continue
        seen.add(spec.name)
        variants.append(
            Variant(
                package="msa-core",
                name=spec.name,
                arch=spec.arch,
                build_target="msa.core.variants:build_spec",
                params=_spec_params(spec),
            )
        )
    return variants


def build_spec(**params) -> str:
    """Worker side of a warmup: build one module through the store; returns the entry path."""
    from msa.core.jit import JitSpec

    entry = JitSpec(**params).build()
    return str(entry.path)
