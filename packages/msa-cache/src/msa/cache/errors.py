"""Exceptions raised by msa-cache. Every message names the key (name + digest) it is about."""

from __future__ import annotations

__all__ = [
    "CacheError",
    "CacheMissError",
    "LockTimeoutError",
    "CacheUnwritableError",
    "BundleError",
    "ToolchainUnavailableError",
]


class CacheError(RuntimeError):
    """Base class of every msa-cache error."""


class CacheMissError(CacheError):
    """MSA_JIT=0 (offline mode) and no tier holds the requested entry.

    Attributes: ``key`` (the :class:`~msa.cache.keys.CacheKey`), ``warmup_hint`` (the command that produces it),
    ``tiers`` (the tier roots that were searched).
    """

    def __init__(self, key, warmup_hint: str | None, tiers):
        self.key = key
        self.warmup_hint = warmup_hint
        self.tiers = [str(t) for t in tiers]
        how = (
            f"Produce it on a build host with:\n    {warmup_hint}\n"
            "then copy it here with `msa-cache bundle -o msa.tar.gz --arch ...` and `msa-cache import msa.tar.gz`, "
            "or point MSA_CACHE_PATH at a tier that has it"
            if warmup_hint
            else "Produce it with `msa-cache warmup --preset <preset> --arch <arch>` on a build host (the caller "
            "gave no warmup hint), or point MSA_CACHE_PATH at a tier that has it"
        )
        searched = ", ".join(self.tiers) or "(none)"
        super().__init__(
            f"msa-cache miss with MSA_JIT=0 (compiling is disabled): no entry for {key.name!r} "
            f"(stage {key.stage}, digest {key.digest}) in the tiers searched: {searched}.\n{how}; "
            "or unset MSA_JIT to allow compiling here."
        )


class LockTimeoutError(CacheError):
    """Waited longer than MSA_CACHE_LOCK_TIMEOUT for another process's build of the same key."""

    def __init__(self, key, lock_path, waited_s: float, holder: str):
        self.key = key
        self.lock_path = str(lock_path)
        self.waited_s = waited_s
        self.holder = holder
        super().__init__(
            f"msa-cache: timed out after {waited_s:.1f} s waiting for the build lock of {key.name!r} "
            f"(stage {key.stage}, digest {key.digest}); lock {self.lock_path} is held by {holder}. "
            "If that process is hung, stop it; if the lock is on a network filesystem, put MSA_CACHE_DIR on "
            "node-local disk. Raise the wait with MSA_CACHE_LOCK_TIMEOUT=<seconds>."
        )


class CacheUnwritableError(CacheError, OSError):
    """The local writable tier cannot be written (read-only, not a directory, permission denied, full)."""


class BundleError(CacheError):
    """A bundle cannot be exported or imported (bad archive, unsafe member, hash mismatch, ...)."""


class ToolchainUnavailableError(CacheError):
    """A toolchain identity is needed for a key but the tool is absent and no tier recorded its identity."""
