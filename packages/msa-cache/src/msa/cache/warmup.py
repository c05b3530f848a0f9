"""Warmup: build every variant of a preset for some archs, GPU-less, in a process pool.

Generators come from the ``msa.cache.generators`` entry-point group: ``generate(preset: dict, archs: list[str])
-> Iterable[Variant]``. A generator that cannot be imported or raises is reported (and makes the run fail) but
does not stop the others. Each variant runs in a worker as ``fn(**params)``; the worker's store counters tell
"built" from "already present".
"""

from __future__ import annotations

import importlib
import multiprocessing
import os
import sys
import time
import traceback
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field

from msa.cache import plugins
from msa.cache.presets import load_preset
from msa.cache.variant import Variant

__all__ = ["VariantResult", "WarmupReport", "collect_variants", "run_warmup", "run_variant"]

_ERROR_CHARS = 4000


@dataclass
class VariantResult:
    variant: Variant
    status: str  # "built" | "present" | "failed"
    seconds: float = 0.0
    builds: int = 0
    compile_seconds: float = 0.0
    error: str | None = None
    detail: str | None = None

    def as_dict(self) -> dict:
        v = self.variant
        return {
            "package": v.package, "name": v.name, "arch": v.arch, "build_target": v.build_target,
            "status": self.status, "seconds": round(self.seconds, 3), "builds": self.builds,
            "compile_seconds": round(self.compile_seconds, 3), "error": self.error,
        }


@dataclass
class WarmupReport:
    preset: str
    archs: list[str]
    results: list[VariantResult] = field(default_factory=list)
    generator_errors: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    wall_seconds: float = 0.0
    jobs: int = 1

    def count(self, status: str) -> int:
        return sum(1 for r in self.results if r.status == status)

    @property
    def ok(self) -> bool:
        return not self.generator_errors and self.count("failed") == 0 and bool(self.results)

    def summary(self) -> str:
        compile_s = sum(r.compile_seconds for r in self.results)
        lines = [
            f"msa-cache warmup: preset {self.preset!r} for {','.join(self.archs)}: {len(self.results)} variants, "
            f"{self.jobs} job(s)",
            f"  built {self.count('built')}, already present {self.count('present')}, failed {self.count('failed')} "
            f"in {self.wall_seconds:.1f} s (compile {compile_s:.1f} s)",
        ]
        lines += [f"  note: {n}" for n in self.notes]
        for r in self.results:
            if r.status == "failed":
                lines.append(f"  FAILED {r.variant} ({r.variant.arch}): {r.error}")
        lines += [f"  GENERATOR FAILED {e}" for e in self.generator_errors]
        if not self.results and not self.generator_errors:
            lines.append("  nothing to build: no generator produced a variant for this preset and these archs")
        return "\n".join(lines)

    def as_dict(self) -> dict:
        return {
            "preset": self.preset, "archs": self.archs, "jobs": self.jobs, "wall_seconds": round(self.wall_seconds, 3),
            "built": self.count("built"), "present": self.count("present"), "failed": self.count("failed"),
            "generator_errors": self.generator_errors, "notes": self.notes,
            "results": [r.as_dict() for r in self.results], "ok": self.ok,
        }


def _describe_exc(e: BaseException) -> tuple[str, str]:
    text = f"{type(e).__name__}: {e}"
    for note in getattr(e, "__notes__", ()) or ():
        text += f" [{note}]"
    if len(text) > _ERROR_CHARS:
        text = text[:_ERROR_CHARS] + " ...(truncated)"
    detail = "".join(traceback.format_exception(type(e), e, e.__traceback__)[-6:])
    return text, detail


def collect_variants(preset: dict, archs: list[str], packages: list[str] | None = None):
    """(variants, generator_errors, notes) from every installed generator (or those named in ``packages``)."""
    variants: list[Variant] = []
    errors: list[str] = []
    notes: list[str] = []
    seen: set = set()
    eps = plugins.entry_points(plugins.GENERATORS)
    if packages:
        unknown = set(packages) - {ep.name for ep in eps}
        errors += [f"{p}: no generator registered under that name (entry-point group msa.cache.generators)" for p in sorted(unknown)]
        eps = [ep for ep in eps if ep.name in packages]
    if not eps and not errors:
        errors.append("no generators installed (entry-point group msa.cache.generators is empty)")
    for ep in eps:
        where = plugins.describe(ep)
        try:
            generate = ep.load()
        except Exception as e:
            errors.append(f"{where} could not be imported: {_describe_exc(e)[0]}")
            continue
        try:
            produced = list(generate(dict(preset), list(archs)))
        except Exception as e:
            errors.append(f"{where} raised {_describe_exc(e)[0]}")
            continue
        other_arch = 0
        for item in produced:
            if not isinstance(item, Variant):
                errors.append(f"{where} yielded {type(item).__name__} {item!r:.80}, expected msa.cache.Variant")
                break
            if item.arch not in archs:
                other_arch += 1
                continue
            if item.ident in seen:
                continue
            seen.add(item.ident)
            variants.append(item)
        if other_arch:
            notes.append(f"{where}: ignored {other_arch} variant(s) for archs not requested")
    return variants, errors, notes


def _resolve(target: str):
    module, _, func = target.partition(":")
    obj = importlib.import_module(module)
    for part in func.split("."):
        obj = getattr(obj, part)
    return obj


def run_variant(variant: Variant) -> VariantResult:
    """Build one variant in this process (what a warmup worker runs)."""
    from msa.cache.store import get_store

    store = get_store()
    builds0, compile0 = store.counters["builds"], store.counters["compile_seconds"]
    t0 = time.perf_counter()
    try:
        _resolve(variant.build_target)(**variant.params)
    except (Exception, SystemExit) as e:
        text, detail = _describe_exc(e)
        return VariantResult(variant, "failed", time.perf_counter() - t0, error=text, detail=detail)
    finally:
        store.flush_stats()
    builds = store.counters["builds"] - builds0
    return VariantResult(
        variant,
        "built" if builds else "present",
        time.perf_counter() - t0,
        builds=builds,
        compile_seconds=store.counters["compile_seconds"] - compile0,
    )


def _worker_init() -> None:
    # Warmup exists to compile: MSA_JIT=0 inherited from a production environment must not turn builds into misses.
    os.environ["MSA_JIT"] = "1"
    from msa.cache.store import get_store

    get_store(refresh=True)


def _new_pool(jobs: int) -> ProcessPoolExecutor:
    # spawn: workers must not inherit the parent's threads/locks (tqdm monitor, held flocks).
    return ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn"), initializer=_worker_init)


def run_warmup(
    preset: str | dict,
    archs: list[str],
    *,
    jobs: int | None = None,
    packages: list[str] | None = None,
    until: str | None = None,
    progress: bool | None = None,
) -> WarmupReport:
    """Build every variant of ``preset`` for ``archs``. ``jobs=0`` builds in this process (debugging)."""
    from tqdm import tqdm

    t0 = time.perf_counter()
    preset_dict = load_preset(preset) if isinstance(preset, str) else dict(preset)
    if until:
        preset_dict["until"] = until
    jobs = (os.cpu_count() or 1) if jobs is None else jobs
    if jobs < 0:
        raise ValueError(f"jobs must be >= 0, got {jobs}")
    report = WarmupReport(str(preset_dict.get("name", "?")), list(archs), jobs=jobs)
    variants, report.generator_errors, report.notes = collect_variants(preset_dict, list(archs), packages)
    if progress is None:
        progress = sys.stderr.isatty()
    bar = tqdm(total=len(variants), unit="variant", desc="warmup", disable=not progress, file=sys.stderr)

    def record(result: VariantResult) -> None:
        report.results.append(result)
        bar.update(1)
        bar.set_postfix(built=report.count("built"), present=report.count("present"), failed=report.count("failed"))
        if result.status == "failed" and progress:
            bar.write(f"FAILED {result.variant}: {result.error}", file=sys.stderr)

    try:
        if jobs == 0:
            for v in variants:
                record(run_variant(v))
        elif variants:
            crashed = _run_pool(variants, min(jobs, len(variants)), record)
            _retry_serially(crashed, record)
    finally:
        bar.close()
    order = {v.ident: i for i, v in enumerate(variants)}
    report.results.sort(key=lambda r: order.get(r.variant.ident, 0))
    report.wall_seconds = time.perf_counter() - t0
    return report


def _run_pool(variants: list[Variant], jobs: int, record) -> list[Variant]:
    """Run in parallel; returns the variants whose worker pool broke (one of them crashed a worker)."""
    crashed = []
    with _new_pool(jobs) as pool:
        futures = {pool.submit(run_variant, v): v for v in variants}
        for fut in as_completed(futures):
            v = futures[fut]
            try:
                record(fut.result())
            except BrokenProcessPool:
                crashed.append(v)
            except Exception as e:  # e.g. a result that cannot be pickled back
                record(VariantResult(v, "failed", error=_describe_exc(e)[0]))
    return crashed


def _retry_serially(variants: list[Variant], record) -> None:
    """After a worker died, run the affected variants one at a time so the crash lands on the right one."""
    pool = None
    try:
        for v in variants:
            if pool is None:
                pool = _new_pool(1)
            try:
                record(pool.submit(run_variant, v).result())
            except BrokenProcessPool:
                record(VariantResult(v, "failed", error="the worker process died while building it (crash or signal)"))
                pool.shutdown(wait=False, cancel_futures=True)
                pool = None
    finally:
        if pool is not None:
            pool.shutdown()
