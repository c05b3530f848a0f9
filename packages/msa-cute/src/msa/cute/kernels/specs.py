"""The CuteSpecs each warmup preset asks for (DSL-free: imported by ``msa.cute.variants`` on any host).

Preset fields read here (see msa-cache's shipped presets): ``dtypes``, ``head_dim``, ``block_size``, ``top_k``,
``heads = [{hq, hkv}, ...]``. Kernels whose preconditions a preset entry does not meet are skipped, not failed.
"""

from __future__ import annotations

from msa.cute.jit import CuteSpec

ELEMENTWISE = "msa.cute.kernels.dsl.elementwise:axpby"


def elementwise_specs(arch: str) -> list[CuteSpec]:
    """The route self-test kernel: every bundle carries it so a GPU node can prove load + launch first."""
    return [CuteSpec(ELEMENTWISE, {"dtype": "float32"}, arch)]


def cute_specs(preset: dict, arch: str) -> list[CuteSpec]:
    from msa.cute.kernels import sparse_prefill_sm90

    return elementwise_specs(arch) + sparse_prefill_sm90.cute_specs(preset, arch)
