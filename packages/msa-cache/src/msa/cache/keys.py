"""Cache keys: canonical JSON of everything that changes a binary, hashed with sha256.

The key document is ``{"schema", "stage", "kind", "name", "host", "python_abi"?, "ingredients"}``; the caller
supplies ``ingredients`` (sources or their hashes, template parameters, toolchain identities, flags, target arch,
package versions), the store supplies the rest. ``digest = sha256(canonical_json(document))``.
"""

from __future__ import annotations

import hashlib
import json
import math
import platform
import sys
import sysconfig
from dataclasses import dataclass, field
from typing import Any

__all__ = ["SCHEMA_VERSION", "STAGES", "CacheKey", "KeyRef", "canonical_json", "make_key", "python_abi_tag", "host_platform"]

#: Bumped whenever the entry layout or the key document changes; old entries then never match and
#: ``msa-cache prune`` removes them.
SCHEMA_VERSION = 1

#: Staged build products: rendered source -> object (.o / cubin) -> loadable module (.so).
STAGES = ("source", "object", "module")


def python_abi_tag() -> str:
    """The interpreter's extension ABI, e.g. ``cpython-311-x86_64-linux-gnu`` (only keyed when asked for)."""
    soabi = sysconfig.get_config_var("SOABI")
    if soabi:
        return str(soabi)
    return f"{sys.implementation.cache_tag}-{platform.machine()}"


def host_platform() -> str:
    """OS and CPU of the host code in objects/modules, e.g. ``linux-x86_64`` (GPU arch is an ingredient)."""
    return f"{sys.platform}-{platform.machine()}"


def _check_jsonable(value: Any, where: str) -> None:
    """Reject anything whose JSON form is ambiguous or lossy (non-str keys, NaN, sets, objects)."""
    if value is None or isinstance(value, (bool, str)):
        return
    if isinstance(value, int):
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"{where} must be a finite number, got {value!r}")
        return
    if isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _check_jsonable(item, f"{where}[{i}]")
        return
    if isinstance(value, dict):
        for k, item in value.items():
            if not isinstance(k, str):
                raise TypeError(
                    f"{where} has a non-str dict key {k!r} ({type(k).__name__}); JSON would turn it "
                    "into a string and two different dicts could share a key"
                )
            _check_jsonable(item, f"{where}.{k}")
        return
    raise TypeError(
        f"{where} must be JSON-able (None, bool, int, float, str, list, dict with str keys), "
        f"got {type(value).__name__}: {value!r}"
    )


def canonical_json(value: Any, what: str = "value") -> str:
    """Deterministic JSON: sorted keys, no whitespace, UTF-8 kept, tuples as lists."""
    _check_jsonable(value, what)
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


@dataclass(frozen=True)
class CacheKey:
    """A content address. ``digest`` is the sha256 hex of the canonical key document."""

    digest: str
    name: str
    stage: str
    kind: str
    ingredients: dict = field(compare=False, hash=False, repr=False)
    document: dict = field(compare=False, hash=False, repr=False)

    @property
    def short(self) -> str:
        return self.digest[:12]

    @property
    def arch(self):
        """The ``arch`` ingredient (str or list of str) or None for arch-neutral entries."""
        return self.ingredients.get("arch")

    def __str__(self) -> str:
        return f"{self.name} [{self.stage}, {self.short}]"


@dataclass(frozen=True)
class KeyRef:
    """Name, stage and digest of an entry whose full key is not at hand (e.g. read back from a manifest)."""

    digest: str
    name: str
    stage: str

    @property
    def short(self) -> str:
        return self.digest[:12]

    def __str__(self) -> str:
        return f"{self.name} [{self.stage}, {self.short}]"


def make_key(
    *,
    stage: str,
    name: str,
    ingredients: dict,
    python_abi_specific: bool = False,
    kind: str | None = None,
    host: str | None | bool = True,
    schema: int = SCHEMA_VERSION,
) -> CacheKey:
    """Build a :class:`CacheKey`.

    ``host=True`` (default) keys the host platform for object/module stages (their host code is CPU-specific);
    pass a string to key another platform, or ``None``/``False`` to leave it out. ``python_abi_specific`` adds the
    interpreter ABI (only for artifacts that link libpython; tvm-ffi modules use a C ABI and must not set it).
    """
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {', '.join(STAGES)}; got {stage!r}")
    if not isinstance(name, str) or not name.strip() or "\n" in name:
        raise ValueError(f"name must be a non-empty one-line string, got {name!r}")
    if not isinstance(ingredients, dict):
        raise TypeError(f"ingredients must be a dict, got {type(ingredients).__name__}")
    _check_jsonable(ingredients, "ingredients")
    kind = kind or stage
    if not isinstance(kind, str) or not kind:
        raise ValueError(f"kind must be a non-empty string, got {kind!r}")
    arch = ingredients.get("arch")
    if arch is not None and not (
        isinstance(arch, str) or (isinstance(arch, (list, tuple)) and all(isinstance(a, str) for a in arch))
    ):
        raise TypeError(f"ingredient 'arch' must be a string like 'sm_90a' or a list of them, got {arch!r}")
    if host is True:
        host_value = host_platform() if stage != "source" else None
    elif host in (None, False):
        host_value = None
    else:
        host_value = str(host)
    document: dict[str, Any] = {
        "schema": schema,
        "stage": stage,
        "kind": kind,
        "name": name,
        "ingredients": ingredients,
    }
    if host_value is not None:
        document["host"] = host_value
    if python_abi_specific:
        document["python_abi"] = python_abi_tag()
    text = canonical_json(document, "key")
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
    # Keep a private, normalized copy so later mutation of the caller's dict cannot desync key and manifest.
    frozen_doc = json.loads(text)
    return CacheKey(
        digest=digest, name=name, stage=stage, kind=kind, ingredients=frozen_doc["ingredients"], document=frozen_doc
    )
