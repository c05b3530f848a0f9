"""CLI commands, and proof that neither ``import msa.cache`` nor the CLI imports torch."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import msa.cache
from msa.cache import get_store
from msa.cache.cli import main as cli_main

PACKAGE_DIR = Path(msa.cache.__file__).resolve().parent


def test_no_torch_import_in_package_sources():
    offenders = []
    for path in PACKAGE_DIR.rglob("*.py"):
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if re.match(r"\s*(import torch|from torch)\b", line):
                offenders.append(f"{path.name}:{i}: {line.strip()}")
    assert offenders == []


def test_import_and_cli_commands_do_not_import_torch(tmp_path):
    script = textwrap.dedent(
        f"""
        import sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        import msa.cache
        from msa.cache import get_store
        from msa.cache.cli import main
        import msa_cache_testkit as kit
        store = get_store()
        for n in range(3):
            k = store.key(stage="module", name=f"k{{n}}", ingredients=kit.ingredients(n=n), kind="tvm_ffi.module")
            store.get_or_build(k, kit.fake_builder())
        bundle = {str(tmp_path / "b.tar")!r}
        for argv in (["ls"], ["info", "k1"], ["stats"], ["presets"], ["tiers"], ["verify", "--no-load"],
                     ["prune", "--dry-run"], ["bundle", "-o", bundle, "--arch", "sm_90a", "--no-runtime"],
                     ["--cache-dir", {str(tmp_path / "node")!r}, "import", bundle], ["clear"]):
            rc = main(argv)
            assert rc == 0, (argv, rc)
        heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "tvm_ffi", "cutlass", "numpy"))
        assert not heavy, heavy
        print("CLEAN")
        """
    )
    env = dict(os.environ)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    assert proc.stdout.strip().endswith("CLEAN")


def test_console_script_imports_no_torch(tmp_path):
    for argv in (["--help"], ["ls"], ["stats"], ["presets"]):
        proc = subprocess.run(
            [sys.executable, "-X", "importtime", "-m", "msa.cache", *argv], capture_output=True, text=True, timeout=60
        )
        assert proc.returncode == 0, proc.stderr
        imported = {line.split("|")[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}
        assert "msa.cache.cli" in imported
        assert not {m for m in imported if m.split(".")[0] in ("torch", "tvm_ffi")}, argv


def test_ls_info_stats_prune_clear(kit, capsys, isolated_cache):
    store = get_store()
    k = store.key(stage="object", name="topk_select[sm_90a,fp32]", ingredients=kit.ingredients())
    e = store.get_or_build(k, kit.fake_builder())
    store.lookup(k)
    store.flush_stats()
    assert cli_main(["ls"]) == 0
    out = capsys.readouterr().out
    assert k.digest[:12] in out and "topk_select[sm_90a,fp32]" in out and "1 entries" in out
    assert cli_main(["info", k.digest[:8]]) == 0
    out = capsys.readouterr().out
    assert k.digest in out and "kernel.so" in out and "pinned     no" in out
    assert cli_main(["info", "topk_select[sm_90a,fp32]"]) == 0
    assert cli_main(["info", "nothing-like-this"]) == 1
    capsys.readouterr()
    assert cli_main(["stats"]) == 0
    out = capsys.readouterr().out
    assert "builds 1" in out and "misses 1" in out
    # leftovers for prune: a dead builder's temp dir, a quarantined entry, a stale lock
    (isolated_cache / "tmp" / f"{'0' * 64}.somehost.1.abcd").mkdir()
    (isolated_cache / "quarantine").mkdir()
    (isolated_cache / "quarantine" / "old").mkdir()
    assert cli_main(["prune"]) == 0
    out = capsys.readouterr().out
    assert "removed tmp" in out and "removed quarantine" in out and "removed locks" in out
    assert list((isolated_cache / "tmp").iterdir()) == [] and list((isolated_cache / "quarantine").iterdir()) == []
    assert e.path.exists()
    assert cli_main(["clear"]) == 0
    assert "removed 1 entries" in capsys.readouterr().out
    assert not e.path.exists()
