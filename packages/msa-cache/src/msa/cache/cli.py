"""``msa-cache`` command line: warmup, presets, ls, info, verify, prune, clear, stats, bundle, import, tiers."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

from msa.cache.errors import CacheError

log = logging.getLogger("msa.cache")


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _archs(value: str) -> list[str]:
    archs = [a.strip() for a in value.split(",") if a.strip()]
    if not archs:
        raise argparse.ArgumentTypeError("expected a comma-separated list like sm_90a,sm_100a")
    for a in archs:
        if not a.startswith("sm_"):
            raise argparse.ArgumentTypeError(f"arch {a!r} should look like sm_90a")
    return archs


def _store(args):
    from msa.cache.store import Store

    if args.cache_dir:
        os.environ["MSA_CACHE_DIR"] = args.cache_dir
    return Store.from_env()


def _print_json(value) -> None:
    print(json.dumps(value, indent=1, sort_keys=True, default=str))


# --- commands -----------------------------------------------------------------------------------------------------


def cmd_warmup(args) -> int:
    from msa.cache.warmup import run_warmup

    if args.cache_dir:
        os.environ["MSA_CACHE_DIR"] = args.cache_dir
    progress = None if args.progress is None else args.progress
    report = run_warmup(
        args.preset, args.arch, jobs=args.jobs, packages=args.package or None, until=args.until, progress=progress
    )
    print(report.summary())
    if args.verbose:
        for r in report.results:
            if r.detail:
                print(f"\n--- {r.variant} ---\n{r.detail}", file=sys.stderr)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report.as_dict(), f, indent=1)
    return 0 if report.ok else 1


def cmd_presets(args) -> int:
    from msa.cache.presets import list_presets, load_preset

    for name, path in sorted(list_presets().items()):
        desc = load_preset(str(path)).get("description", "")
        print(f"{name:<16} {desc}  [{path}]")
    return 0


def cmd_ls(args) -> int:
    from msa.cache.maintenance import entry_row

    store = _store(args)
    rows = [entry_row(e) for e in store.iter_entries()]
    if args.arch:
        rows = [r for r in rows if r["arch"] in args.arch or (isinstance(r["arch"], list) and set(r["arch"]) & set(args.arch))]
    if args.json:
        _print_json(rows)
        return 0
    if not rows:
        print(f"no entries (tiers: {', '.join(str(t.root) for t in store.tiers)})")
        return 0
    print(f"{'digest':<12}  {'stage':<6}  {'arch':<9}  {'size':>9}  {'compile':>7}  {'last used':<16}  tier  name")
    for r in rows:
        arch = "-" if r["arch"] is None else r["arch"] if isinstance(r["arch"], str) else ",".join(r["arch"])
        used = time.strftime("%Y-%m-%d %H:%M", time.localtime(r["last_used"])) if r["last_used"] else "-"
        tier = "local" if r["tier_origin"] in ("local", "tmp-fallback") else r["tier_origin"]
        flag = "  (BROKEN: " + "; ".join(r["problems"]) + ")" if r["problems"] else ""
        cs = r["compile_seconds"]
        print(
            f"{r['digest'][:12]}  {str(r['stage']):<6}  {str(arch):<9}  {_human(r['bytes']):>9}  "
            f"{(f'{cs:.1f}s' if isinstance(cs, (int, float)) else '-'):>7}  {used:<16}  {tier}  {r['name']}{flag}"
        )
    total = sum(r["bytes"] for r in rows)
    print(f"{len(rows)} entries, {_human(total)}")
    return 0


def cmd_info(args) -> int:
    from msa.cache.maintenance import is_pinned

    store = _store(args)
    matches = store.find(args.key)
    if not matches:
        print(f"no entry matches {args.key!r} (give a digest prefix of 4+ hex digits or an exact name)", file=sys.stderr)
        return 1
    if args.json:
        _print_json([{"path": str(e.path), "tier": str(e.tier.root), "meta": e.meta} for e in matches])
        return 0
    for e in matches:
        m = e.meta
        print(f"{m.get('name')}\n  digest     {e.digest}\n  stage      {m.get('stage')} (kind {m.get('kind')})")
        print(f"  arch       {m.get('arch')}\n  path       {e.path}\n  tier       {e.tier.root} ({e.tier.origin})")
        print(f"  built      {m.get('built_at')} on {m.get('built_by', {}).get('host')} in {m.get('compile_seconds')} s")
        print(f"  pinned     {'yes' if is_pinned(e.tier, e.digest) else 'no'}")
        for name, f in sorted(m.get("files", {}).items()):
            print(f"  file       {name}  {_human(f.get('size', 0))}  sha256 {str(f.get('sha256'))[:16]}...")
        print("  key        " + json.dumps(m.get("key", {}), sort_keys=True))
        if m.get("problems"):
            print("  PROBLEMS   " + "; ".join(m["problems"]))
    return 0


def cmd_verify(args) -> int:
    from msa.cache.maintenance import verify

    store = _store(args)
    results = verify(store, load=not args.no_load)
    bad = [r for r in results if not r["ok"]]
    if args.json:
        _print_json(results)
    else:
        for r in bad:
            what = "; ".join(r["problems"]) or r["load"]
            moved = f" -> quarantined to {r['quarantined_to']}" if r.get("quarantined_to") else ""
            print(f"BAD  {r['digest'][:12]}  {r['name']}  [{r['tier']}]: {what}{moved}")
        loaded = sum(1 for r in results if r["load"] == "ok")
        print(f"verified {len(results)} entries: {len(results) - len(bad)} ok ({loaded} test-loaded), {len(bad)} bad")
    return 1 if bad else 0


def cmd_prune(args) -> int:
    from msa.cache.maintenance import prune

    report = prune(_store(args), dry_run=args.dry_run)
    if args.json:
        _print_json(report)
        return 0
    verb = "would remove" if args.dry_run else "removed"
    for section, items in report.items():
        for item in items:
            print(f"{verb} {section}: {item}")
    print(f"prune: {verb} " + ", ".join(f"{len(v)} {k}" for k, v in report.items()))
    return 0


def cmd_clear(args) -> int:
    from msa.cache.maintenance import clear

    report = clear(_store(args), imported=args.imported)
    print(f"clear: removed {len(report['removed'])} entries")
    for p in report["pinned"]:
        print(f"  kept (pinned by a running process): {p}")
    for p in report["imported"]:
        print(f"  imported tier: {p}")
    return 0


def cmd_stats(args) -> int:
    from msa.cache import stats

    store = _store(args)
    data = {}
    for tier in [store.local] + ([store.fallback] if store.fallback and store.fallback.stats_path.exists() else []):
        data[str(tier.root)] = stats.read(tier.stats_path)
    if args.json:
        _print_json(data)
        return 0
    for root, s in data.items():
        lookups = s["hits"] + s["shared_hits"] + s["misses"]
        rate = f"{100 * (s['hits'] + s['shared_hits']) / lookups:.1f}%" if lookups else "-"
        print(f"{root}")
        print(f"  hits {s['hits']} (+{s['shared_hits']} from read-only tiers), misses {s['misses']}, hit rate {rate}")
        print(f"  builds {s['builds']} ({s['build_failures']} failed), compile {s['compile_seconds']:.1f} s")
        print(f"  quarantined {s['quarantined']}, evicted {s['evicted']}")
    return 0


def cmd_bundle(args) -> int:
    from msa.cache.bundle import export_bundle

    stages = tuple(args.stage or ("object", "module"))
    manifest = export_bundle(
        args.output, args.arch, store=_store(args), stages=stages, include_arch_neutral=args.include_arch_neutral,
        gzip=True if args.gzip else None, runtime=not args.no_runtime,
    )
    size = os.path.getsize(args.output)
    print(
        f"bundle {manifest['bundle_id']}: {len(manifest['entries'])} entries, {len(manifest['runtime_files'])} runtime "
        f"files for {','.join(manifest['archs'])} -> {args.output} ({_human(size)})"
    )
    if not manifest["entries"]:
        print("warning: the bundle has no entries (run `msa-cache warmup` for these archs first)", file=sys.stderr)
        return 1
    return 0


def cmd_import(args) -> int:
    from msa.cache.bundle import import_bundle

    result = import_bundle(args.path, dest=args.dest, store=_store(args), force=args.force)
    state = "already imported, verified" if result["already_present"] else "imported and verified"
    print(f"bundle {result['bundle_id']} {state}: {result['entries']} entries, runtime files "
          f"{result['runtime_files'] or '-'} at {result['path']} (registered as a read-only tier)")
    return 0


def cmd_tiers(args) -> int:
    store = _store(args)
    for t in store.tiers:
        print(f"{'rw' if t.writable else 'ro'}  {t.origin:<28} {t.root}")
    return 0


# --- parser ---------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="msa-cache", description="Build, store, find and ship msa kernel artifacts.")
    p.add_argument("--cache-dir", help="local writable tier (default: $MSA_CACHE_DIR or the user cache dir)")
    p.add_argument("-v", "--verbose", action="store_true", help="log what the store does")
    sub = p.add_subparsers(dest="command", required=True)

    w = sub.add_parser("warmup", help="compile a preset's kernel variants (no GPU needed)")
    w.add_argument("--preset", required=True, help="preset name (see `msa-cache presets`) or a .toml path")
    w.add_argument("--arch", required=True, type=_archs, help="comma-separated, e.g. sm_90a or sm_90a,sm_100a")
    w.add_argument("--jobs", "-j", type=int, default=None, help="worker processes (default: CPU count; 0 = in this process)")
    w.add_argument("--package", action="append", help="only this generator (repeatable), e.g. msa-core")
    w.add_argument("--until", choices=("source", "object", "module"), help="stop at this stage (passed to generators)")
    w.add_argument("--json", help="also write a JSON report here")
    g = w.add_mutually_exclusive_group()
    g.add_argument("--progress", dest="progress", action="store_true", default=None, help="progress bar (default: if a TTY)")
    g.add_argument("--no-progress", dest="progress", action="store_false")
    w.set_defaults(func=cmd_warmup)

    sub.add_parser("presets", help="list warmup presets").set_defaults(func=cmd_presets)

    ls = sub.add_parser("ls", help="list entries of all tiers")
    ls.add_argument("--arch", type=_archs)
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(func=cmd_ls)

    i = sub.add_parser("info", help="show one entry (digest prefix or exact name)")
    i.add_argument("key")
    i.add_argument("--json", action="store_true")
    i.set_defaults(func=cmd_info)

    v = sub.add_parser("verify", help="hash-check every entry (quarantine bad local ones) and test-load where possible")
    v.add_argument("--no-load", action="store_true", help="skip test loads")
    v.add_argument("--json", action="store_true")
    v.set_defaults(func=cmd_verify)

    pr = sub.add_parser("prune", help="remove leftovers: dead temp dirs, stale locks, quarantine, old-schema entries")
    pr.add_argument("--dry-run", action="store_true")
    pr.add_argument("--json", action="store_true")
    pr.set_defaults(func=cmd_prune)

    c = sub.add_parser("clear", help="remove every unpinned entry of the local tier")
    c.add_argument("--imported", action="store_true", help="also remove/unregister imported bundle tiers")
    c.set_defaults(func=cmd_clear)

    s = sub.add_parser("stats", help="hits, misses, builds, compile seconds")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_stats)

    b = sub.add_parser("bundle", help="export entries for some archs (+ runtime files) into one archive")
    b.add_argument("-o", "--output", required=True, help="archive path (.tar, or .tar.gz / .tgz to compress)")
    b.add_argument("--arch", required=True, type=_archs)
    b.add_argument("--stage", action="append", choices=("source", "object", "module"),
                   help="stages to include (repeatable; default object and module)")
    b.add_argument("--include-arch-neutral", action="store_true", help="also entries without an arch ingredient")
    b.add_argument("--gzip", action="store_true", help="compress whatever the file name")
    b.add_argument("--no-runtime", action="store_true", help="leave out msa.cache.runtime_files libraries")
    b.set_defaults(func=cmd_bundle)

    im = sub.add_parser("import", help="install a bundle as a read-only tier on this node")
    im.add_argument("path")
    im.add_argument("--dest", help="extract here instead of <local tier>/tiers/<bundle-id>")
    im.add_argument("--force", action="store_true", help="replace an existing, different directory at the destination")
    im.set_defaults(func=cmd_import)

    sub.add_parser("tiers", help="list tiers in search order").set_defaults(func=cmd_tiers)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO if args.verbose else logging.WARNING)
    log.propagate = False
    try:
        return args.func(args)
    except (CacheError, ValueError, OSError) as e:
        print(f"msa-cache {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"msa-cache {args.command}: interrupted", file=sys.stderr)
        return 130
    finally:
        log.removeHandler(handler)
        log.propagate = True


if __name__ == "__main__":
    sys.exit(main())
