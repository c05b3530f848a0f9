"""Warmup CLI with fake generators: success, already-present on rerun, failures, broken generators, crashes."""

from __future__ import annotations

import json
import re
from importlib.metadata import EntryPoint

import pytest
from msa.cache import Variant, get_store, plugins
from msa.cache.cli import main as cli_main
from msa.cache.presets import list_presets, load_preset
from msa.cache.warmup import run_warmup


@pytest.fixture
def fake_generators(tmp_path, monkeypatch):
    """Preset dir with fake presets; generator discovery returns the testkit generator (+ extras a test adds)."""
    presets = tmp_path / "presets"
    presets.mkdir()
    (presets / "fake.toml").write_text('description = "fake kernels"\nsizes = [1, 2, 3]\n')
    (presets / "fake-fail.toml").write_text("sizes = [1, 2, 3]\nfail = [2]\n")
    (presets / "fake-crash.toml").write_text("sizes = [1, 2, 3]\ncrash = [3]\n")
    monkeypatch.setenv("MSA_CACHE_PRESET_PATH", str(presets))
    extra: list = []
    real = plugins.entry_points

    def fake_entry_points(group):
        if group == plugins.GENERATORS:
            return [EntryPoint("fake", "msa_cache_testkit:generate", group), *extra]
        return real(group)

    monkeypatch.setattr(plugins, "entry_points", fake_entry_points)
    return extra


def test_warmup_builds_then_reports_present(fake_generators, capsys, tmp_path, isolated_cache):
    report_path = tmp_path / "report.json"
    rc = cli_main(["warmup", "--preset", "fake", "--arch", "sm_90a,sm_100a", "--jobs", "2", "--json", str(report_path)])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "6 variants" in out and "built 6, already present 0, failed 0" in out
    report = json.loads(report_path.read_text())
    assert report["ok"] and {r["arch"] for r in report["results"]} == {"sm_90a", "sm_100a"}
    assert all(r["builds"] == 2 for r in report["results"])  # object + module stage each
    store = get_store(refresh=True)
    entries = list(store.iter_entries())
    assert len(entries) == 12 and {e.stage for e in entries} == {"object", "module"}
    modules = [e for e in entries if e.stage == "module"]
    objects = {e.digest for e in entries if e.stage == "object"}
    assert all(m.meta["depends"][0] in objects for m in modules)
    stats = json.loads((isolated_cache / "stats.json").read_text())
    assert stats["builds"] == 12 and stats["compile_seconds"] > 0
    # rerun: everything is already there
    assert cli_main(["warmup", "--preset", "fake", "--arch", "sm_90a,sm_100a", "--jobs", "2"]) == 0
    assert "built 0, already present 6, failed 0" in capsys.readouterr().out


def test_warmup_until_object_stops_early(fake_generators):
    report = run_warmup("fake", ["sm_90a"], jobs=0, until="object")
    assert report.ok and report.count("built") == 3
    assert {e.stage for e in get_store(refresh=True).iter_entries()} == {"object"}


def test_warmup_failure_exits_nonzero_and_names_the_variant(fake_generators, capsys):
    rc = cli_main(["warmup", "--preset", "fake-fail", "--arch", "sm_90a", "--jobs", "2"])
    out = capsys.readouterr().out
    assert rc == 1
    assert "built 2, already present 0, failed 1" in out
    assert "FAILED fake:fake_kernel[sm_90a,n=2]" in out and "fake nvcc: error: n=2 is not supported" in out


def test_broken_and_missing_generators_are_reported_not_fatal(fake_generators, capsys):
    fake_generators.append(EntryPoint("msa-missing", "msa_cache_no_such_module.variants:generate", plugins.GENERATORS))
    fake_generators.append(EntryPoint("msa-raises", "msa_cache_testkit:does_not_exist", plugins.GENERATORS))
    rc = cli_main(["warmup", "--preset", "fake", "--arch", "sm_90a", "--jobs", "1"])
    out = capsys.readouterr().out
    assert rc == 1
    assert "built 3, already present 0, failed 0" in out, "the working generator must still run"
    assert "msa-missing (msa_cache_no_such_module.variants:generate) could not be imported: ModuleNotFoundError" in out
    assert "msa-raises (msa_cache_testkit:does_not_exist) could not be imported: AttributeError" in out


def test_generator_that_raises_or_yields_junk(fake_generators, monkeypatch):
    import msa_cache_testkit

    def raising(preset, archs):
        raise KeyError("heads")

    def junk(preset, archs):
        yield {"name": "not a Variant"}

    monkeypatch.setattr(msa_cache_testkit, "raising", raising, raising=False)
    monkeypatch.setattr(msa_cache_testkit, "junk", junk, raising=False)
    fake_generators.append(EntryPoint("r", "msa_cache_testkit:raising", plugins.GENERATORS))
    fake_generators.append(EntryPoint("j", "msa_cache_testkit:junk", plugins.GENERATORS))
    report = run_warmup("fake", ["sm_90a"], jobs=0)
    assert not report.ok and report.count("built") == 3
    assert any("r (msa_cache_testkit:raising) raised KeyError" in e for e in report.generator_errors)
    assert any("expected msa.cache.Variant" in e for e in report.generator_errors)


def test_worker_crash_fails_only_its_variant(fake_generators, capsys):
    rc = cli_main(["warmup", "--preset", "fake-crash", "--arch", "sm_90a", "--jobs", "2"])
    out = capsys.readouterr().out
    assert rc == 1
    # the crash broke the pool: the other variants are re-run one at a time; one may have been published just
    # before the pool broke, so the re-run can find it already present
    built, present, failed = map(int, re.search(r"built (\d+), already present (\d+), failed (\d+)", out).groups())
    assert (built + present, failed) == (2, 1), out
    assert "FAILED fake:fake_kernel[sm_90a,n=3]" in out and "worker process died" in out


def test_unknown_preset_and_package(fake_generators, capsys):
    assert cli_main(["warmup", "--preset", "nope", "--arch", "sm_90a"]) == 2
    err = capsys.readouterr().err
    assert "unknown warmup preset 'nope'" in err and "fake" in err and "smoke" in err
    assert cli_main(["warmup", "--preset", "fake", "--arch", "sm_90a", "--package", "msa-nope", "--jobs", "0"]) == 1
    assert "msa-nope: no generator registered" in capsys.readouterr().out


def test_shipped_presets():
    presets = list_presets()
    assert {"smoke", "minimax-m3"} <= set(presets)
    m3 = load_preset("minimax-m3")
    assert m3["name"] == "minimax-m3"
    assert [(h["hq"], h["hkv"]) for h in m3["heads"]] == [(64, 4), (32, 2), (16, 1)]
    assert m3["head_dim"] == [128] and m3["block_size"] == [128] and m3["top_k"] == [16]
    assert m3["dtypes"] == ["bf16", "fp8"]
    smoke = load_preset("smoke")
    assert len(smoke["heads"]) * len(smoke["head_dim"]) * len(smoke["dtypes"]) <= 8


def test_variant_validation():
    with pytest.raises(ValueError, match="module.path:function"):
        Variant("p", "n", "sm_90a", "no_colon", {})
    with pytest.raises(TypeError, match=r"Variant\.params\.x must be JSON-able"):
        Variant("p", "n", "sm_90a", "m:f", {"x": object()})
    import pickle

    v = Variant("p", "n", "sm_90a", "m:f", {"a": [1, 2]})
    assert pickle.loads(pickle.dumps(v)) == v
