"""Key sensitivity: changing any ingredient (or stage, name, kind, ABI, host, schema) changes the digest."""

from __future__ import annotations

import copy
import hashlib
import json

import pytest
from msa.cache import get_store, keys
from msa.cache.keys import canonical_json, make_key


def _leaf_paths(value, prefix=()):
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _leaf_paths(v, prefix + (k,))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _leaf_paths(v, prefix + (i,))
    else:
        yield prefix


def _mutated(value, path):
    out = copy.deepcopy(value)
    target = out
    for p in path[:-1]:
        target = target[p]
    old = target[path[-1]]
    target[path[-1]] = (old + "x") if isinstance(old, str) else (old + 1 if isinstance(old, int) else "changed")
    return out


def test_every_ingredient_leaf_changes_the_digest(kit):
    base = kit.ingredients()
    base_key = make_key(stage="module", name="k", ingredients=base)
    digests = {base_key.digest}
    paths = list(_leaf_paths(base))
    assert len(paths) >= 9, paths
    for path in paths:
        k = make_key(stage="module", name="k", ingredients=_mutated(base, path))
        assert k.digest not in digests, f"changing ingredient {path} did not change the key"
        digests.add(k.digest)
    # adding or removing an ingredient changes it as well
    assert make_key(stage="module", name="k", ingredients={**base, "extra": None}).digest not in digests
    smaller = dict(base)
    del smaller["flags"]
    assert make_key(stage="module", name="k", ingredients=smaller).digest not in digests


def test_store_fields_change_the_digest(kit, monkeypatch):
    ing = kit.ingredients()
    base = make_key(stage="module", name="k", ingredients=ing)
    variants = [
        make_key(stage="object", name="k", ingredients=ing),
        make_key(stage="module", name="k2", ingredients=ing),
        make_key(stage="module", name="k", ingredients=ing, kind="tvm_ffi.module"),
        make_key(stage="module", name="k", ingredients=ing, python_abi_specific=True),
        make_key(stage="module", name="k", ingredients=ing, host="linux-aarch64"),
        make_key(stage="module", name="k", ingredients=ing, host=None),
        make_key(stage="module", name="k", ingredients=ing, schema=keys.SCHEMA_VERSION + 1),
    ]
    all_digests = {base.digest, *(v.digest for v in variants)}
    assert len(all_digests) == len(variants) + 1
    # the store's schema version is part of the hashed document
    assert base.document["schema"] == keys.SCHEMA_VERSION


def test_digest_is_sha256_of_canonical_json_and_ignores_dict_order(kit):
    ing = kit.ingredients()
    k = make_key(stage="module", name="k", ingredients=ing)
    assert k.digest == hashlib.sha256(canonical_json(k.document).encode()).hexdigest()
    reordered = dict(reversed(list(ing.items())))
    assert make_key(stage="module", name="k", ingredients=reordered).digest == k.digest
    # but list order is meaningful (flag order can change a compile)
    swapped = dict(ing, flags=list(reversed(ing["flags"])))
    assert make_key(stage="module", name="k", ingredients=swapped).digest != k.digest
    # and JSON types are kept apart: 1 vs 1.0 vs True vs "1"
    ds = {make_key(stage="module", name="k", ingredients={"v": v}).digest for v in (1, 1.0, True, "1")}
    assert len(ds) == 4


def test_python_abi_only_keyed_when_asked(kit, monkeypatch):
    ing = kit.ingredients()
    c_abi_311 = make_key(stage="module", name="k", ingredients=ing)
    py_abi_311 = make_key(stage="module", name="k", ingredients=ing, python_abi_specific=True)
    monkeypatch.setattr(keys, "python_abi_tag", lambda: "cpython-312-x86_64-linux-gnu")
    c_abi_312 = make_key(stage="module", name="k", ingredients=ing)
    py_abi_312 = make_key(stage="module", name="k", ingredients=ing, python_abi_specific=True)
    assert c_abi_311.digest == c_abi_312.digest, "a C-ABI (tvm-ffi) module must be found from cp312 when built on cp311"
    assert py_abi_311.digest != py_abi_312.digest
    assert "python_abi" not in c_abi_311.document


def test_source_stage_is_host_independent(kit, monkeypatch):
    ing = kit.ingredients()
    src = make_key(stage="source", name="k", ingredients=ing)
    mod = make_key(stage="module", name="k", ingredients=ing)
    monkeypatch.setattr(keys, "host_platform", lambda: "linux-aarch64")
    assert make_key(stage="source", name="k", ingredients=ing).digest == src.digest
    assert make_key(stage="module", name="k", ingredients=ing).digest != mod.digest


@pytest.mark.parametrize(
    "ingredients, error, match",
    [
        ({1: "x"}, TypeError, "non-str dict key"),
        ({"x": float("nan")}, ValueError, "finite"),
        ({"x": {1, 2}}, TypeError, r"ingredients\.x must be JSON-able"),
        ({"x": object()}, TypeError, "JSON-able"),
        ({"arch": 90}, TypeError, "arch"),
    ],
)
def test_bad_ingredients_are_rejected_with_the_path(ingredients, error, match):
    with pytest.raises(error, match=match):
        make_key(stage="module", name="k", ingredients=ingredients)


def test_bad_stage_and_name():
    with pytest.raises(ValueError, match="stage must be one of source, object, module; got 'modul'"):
        make_key(stage="modul", name="k", ingredients={})
    with pytest.raises(ValueError, match="name"):
        make_key(stage="module", name="", ingredients={})


def test_changed_ingredient_never_returns_the_old_artifact(kit):
    store = get_store()
    k1 = store.key(stage="module", name="k", ingredients=kit.ingredients())
    e1 = store.get_or_build(k1, kit.fake_builder(payload=b"built with nvcc 13.0.88"))
    k2 = store.key(stage="module", name="k", ingredients=kit.ingredients(compiler={"tool": "fake-nvcc", "version": "13.1.0"}))
    assert store.lookup(k2) is None
    e2 = store.get_or_build(k2, kit.fake_builder(payload=b"built with nvcc 13.1.0"))
    assert e2.path != e1.path
    assert e2.file("kernel.so").read_bytes() == b"built with nvcc 13.1.0"
    assert e1.file("kernel.so").read_bytes() == b"built with nvcc 13.0.88"
    # the key document (with all ingredients) is recorded in the manifest
    assert json.loads((e2.path / "manifest.json").read_text())["key"]["ingredients"]["compiler"]["version"] == "13.1.0"
