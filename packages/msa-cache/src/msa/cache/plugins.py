"""Entry-point discovery (one function so tests can substitute fake plugins)."""

from __future__ import annotations

from importlib import metadata

GENERATORS = "msa.cache.generators"
RUNTIME_FILES = "msa.cache.runtime_files"
LOADERS = "msa.cache.loaders"


def entry_points(group: str) -> list:
    """Installed entry points of ``group``, sorted by name (deterministic warmup/bundle order)."""
    try:
        eps = list(metadata.entry_points(group=group))
    except TypeError:  # pragma: no cover - very old importlib.metadata
        eps = list(metadata.entry_points().get(group, []))
    unique = {}
    for ep in eps:
        unique.setdefault((ep.name, ep.value), ep)
    return sorted(unique.values(), key=lambda ep: (ep.name, ep.value))


def describe(ep) -> str:
    return f"{ep.name} ({ep.value})"
