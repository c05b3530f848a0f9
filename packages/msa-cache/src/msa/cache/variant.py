"""Variant: one kernel build that warmup should make, as produced by a package's generator."""

from __future__ import annotations

from dataclasses import dataclass, field

from msa.cache.keys import canonical_json

__all__ = ["Variant"]


@dataclass(frozen=True)
class Variant:
    """A picklable build request. In a warmup worker ``build_target`` ("module.path:function") is imported and
    called as ``fn(**params)``; it builds through :func:`msa.cache.get_store` (``get_or_build``)."""

    package: str  # "msa-core"
    name: str  # "topk_select[sm_90a,fp32]"
    arch: str  # "sm_90a"
    build_target: str  # "msa.core.jit:build_topk_select"
    params: dict = field(default_factory=dict)  # JSON-able keyword arguments

    def __post_init__(self):
        for attr in ("package", "name", "arch", "build_target"):
            value = getattr(self, attr)
            if not isinstance(value, str) or not value:
                raise ValueError(f"Variant.{attr} must be a non-empty string, got {value!r}")
        module, sep, func = self.build_target.partition(":")
        if not sep or not module or not func:
            raise ValueError(f"Variant.build_target must look like 'module.path:function', got {self.build_target!r}")
        if not isinstance(self.params, dict):
            raise TypeError(f"Variant.params must be a dict, got {type(self.params).__name__}")
        canonical_json(self.params, "Variant.params")  # raises with the offending path if not JSON-able

    @property
    def ident(self) -> tuple[str, str, str]:
        return (self.package, self.name, self.arch)

    def __str__(self) -> str:
        return f"{self.package}:{self.name}"
