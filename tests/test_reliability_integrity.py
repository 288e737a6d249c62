"""Integrity: damaged caches never crash readers, never return wrong data with verify=True,
and ``edcache verify`` names the damaged file and its examples (issue 6, suite 2).

The damage model and read classification live in ``tests/reliability_corruption.py``;
that script also prints the detection-rate table of ``docs/reliability.md``.

Reference states: ``complete`` / ``incomplete`` (:class:`SlowDataset`, chunk shards),
``packed`` (:class:`UniformDataset`, complete: one ``packed.shard``) and
``uniform-incomplete`` (its all-column chunk shards, read in batches too).
"""

from __future__ import annotations

import os
import random
import shutil

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edcache import CachedDataset
from edcache.errors import CacheNotFoundError, CorruptCacheError, EdcacheError
from edcache.verify import main_verify, verify_cache

import reliability_corruption as rc
from reliability_datasets import SlowDataset, UniformDataset, assert_example_equal, expected

FUZZ = settings(
    max_examples=120,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


#: reference state -> (complete, dataset class)
STATES = {
    "complete": (True, SlowDataset),
    "incomplete": (False, SlowDataset),
    "packed": (True, UniformDataset),
    "uniform-incomplete": (False, UniformDataset),
}


@pytest.fixture(scope="module")
def refs(tmp_path_factory):
    base = tmp_path_factory.mktemp("refs")
    out = {state: rc.build_reference(str(base / state), complete, dataset)
           for state, (complete, dataset) in STATES.items()}
    assert sorted(os.listdir(out["packed"])) == ["labels", "manifest.json", "packed.shard"]
    assert len(os.listdir(os.path.join(out["uniform-incomplete"], "shards"))) == 3
    return out


def _copy(ref: str, tmp_path) -> tuple[str, str]:
    root = str(tmp_path / "root")
    cache = os.path.join(root, "cached", rc.NAME)
    shutil.copytree(ref, cache)
    return root, cache


# -- verify_cache on intact and on named damage ----------------------------------------
def test_verify_cache_intact(refs):
    report = verify_cache(refs["complete"], deep=True)
    assert report.ok, str(report)
    assert report.complete and report.length == rc.LENGTH
    assert report.shards_checked == report.shards_total == rc.LENGTH // rc.CHUNK
    assert report.labels_checked == ["label", "split", "extra"]
    assert str(report).endswith("OK: no damage found")

    partial = verify_cache(refs["incomplete"], deep=True)
    assert partial.ok, str(partial)
    assert not partial.complete
    assert partial.shards_checked == 3
    assert any("3 of 5 chunks committed" in note for note in partial.notes)


def test_verify_names_damaged_shard_label_and_range(refs, tmp_path, capsys):
    root, cache = _copy(refs["complete"], tmp_path)
    rc.Damage("flip", "shards/00000003.shard", 200, 0x10).apply(cache)
    rc.Damage("flip", "labels/1.npy", 150, 0x01).apply(cache)
    report = verify_cache(cache)
    assert not report.ok
    assert report.damaged_files == ["labels/1.npy", "shards/00000003.shard"]
    assert report.damaged_ranges == [(24, 32)]
    shard_problem = next(p for p in report.problems if p.file.startswith("shards/"))
    assert str(shard_problem).startswith("shards/00000003.shard (examples 24..31): fails its checksum")
    assert main_verify([cache]) == 1
    out = capsys.readouterr().out
    assert "shards/00000003.shard (examples 24..31): fails its checksum" in out
    assert "labels/1.npy: (label 'split')" in out and "fails its checksum" in out
    assert "examples affected: 24..31" in out


def test_verify_cli_exit_codes(refs, tmp_path, capsys):
    assert main_verify([refs["complete"]]) == 0
    assert "OK: no damage found" in capsys.readouterr().out
    assert main_verify([str(tmp_path)]) == 2
    assert "no edcache cache at" in capsys.readouterr().err
    with pytest.raises(CacheNotFoundError):
        verify_cache(str(tmp_path / "nothing"))
    try:  # the lead's CLI dispatches ``edcache verify``
        from edcache.cli.main import main
    except ImportError:  # pragma: no cover
        return
    assert main(["verify", refs["complete"]]) == 0


def test_verify_repair_advice_rebuilds_identically(refs, tmp_path):
    """Delete what verify names, rerun with force_cache=True: the cache is whole again."""
    root, cache = _copy(refs["complete"], tmp_path)
    rc.Damage("zero", "shards/00000001.shard", 40, 16).apply(cache)
    rc.Damage("truncate", "labels/2.list", 30).apply(cache)
    report = verify_cache(cache)
    assert report.damaged_files == ["labels/2.list", "shards/00000001.shard"]
    for rel in report.damaged_files:
        os.unlink(os.path.join(cache, rel))
    count_dir = tmp_path / "count"
    count_dir.mkdir()
    ds = SlowDataset(root, rc.NAME, rc.LENGTH, count_dir=str(count_dir))
    CachedDataset(ds, force_cache=True, chunk_size=rc.CHUNK, num_workers=0, progress=False)
    assert sorted(int(n.split(".")[0]) for n in os.listdir(count_dir)) == list(range(8, 16))
    assert verify_cache(cache).ok
    for rel in rc.cache_files(refs["complete"]):
        with open(os.path.join(refs["complete"], rel), "rb") as a, open(os.path.join(cache, rel), "rb") as b:
            assert a.read() == b.read(), rel


def test_verify_reads_stop_at_damaged_shard_only(refs, tmp_path):
    """verify=True: the damaged shard raises, every other shard still reads correctly."""
    root, cache = _copy(refs["complete"], tmp_path)
    rc.Damage("flip", "shards/00000002.shard", 300, 0x80).apply(cache)
    ds = CachedDataset.from_cache(root, rc.NAME, verify=True)
    for i in range(rc.LENGTH):
        if 16 <= i < 24:
            with pytest.raises(CorruptCacheError, match=r"shard .*00000002\.shard \(examples 16\.\.23\) fails its checksum"):
                ds[i]
        else:
            assert_example_equal(ds[i], expected(i))


def test_verify_packed_names_damaged_file_and_repair(refs, tmp_path, capsys):
    """packed.shard: checked (deep too) when intact; a flip inside example 8's pixels is
    named with every example it holds, refused by verify=True reads, returned silently
    by default reads (the documented trade-off); deleting it and rerunning with
    force_cache=True rebuilds the cache byte for byte."""
    intact = verify_cache(refs["packed"], deep=True)
    assert intact.ok and intact.complete, str(intact)
    assert intact.shards_checked == intact.shards_total == 1
    assert intact.labels_checked == UniformDataset.in_memory_keys
    root, cache = _copy(refs["packed"], tmp_path)
    with open(os.path.join(cache, "packed.shard"), "rb") as f:
        data = f.read()
    pixels = UniformDataset.expected(8)["image"].tobytes()
    at = data.find(pixels)
    assert at > 0 and data.count(pixels) == 1
    rc.Damage("flip", "packed.shard", at + 5, 0x01).apply(cache)
    report = verify_cache(cache)
    assert not report.ok
    assert report.damaged_files == ["packed.shard"]
    assert report.damaged_ranges == [(0, rc.LENGTH)]
    assert str(report.problems[0]).startswith("packed.shard (examples 0..39): fails its checksum")
    assert main_verify([cache]) == 1
    out = capsys.readouterr().out
    assert "packed.shard (examples 0..39): fails its checksum" in out and "examples affected: 0..39" in out
    with pytest.raises(CorruptCacheError, match=r"packed\.shard \(examples 0\.\.39\) fails its checksum"):
        CachedDataset.from_cache(root, rc.NAME, verify=True)[30]
    with pytest.raises(CorruptCacheError, match="fails its checksum"):
        CachedDataset.from_cache(root, rc.NAME, verify=True).get_batch([1, 2])
    plain = CachedDataset.from_cache(root, rc.NAME)
    assert not (plain[8]["image"] == UniformDataset.expected(8)["image"]).all()
    assert not (plain.get_batch([8])["image"][0] == UniformDataset.expected(8)["image"]).all()
    del plain
    for rel in report.damaged_files:
        os.unlink(os.path.join(cache, rel))
    count_dir = tmp_path / "count"
    count_dir.mkdir()
    CachedDataset(UniformDataset(root, rc.NAME, rc.LENGTH, count_dir=str(count_dir)), force_cache=True,
                  chunk_size=rc.CHUNK, num_workers=0, progress=False)
    # the chunk shards were deleted when the cache was packed: everything is computed again
    assert sorted(int(n.split(".")[0]) for n in os.listdir(count_dir)) == list(range(rc.LENGTH))
    assert verify_cache(cache).ok
    assert rc.cache_files(cache) == rc.cache_files(refs["packed"])
    for rel in rc.cache_files(refs["packed"]):
        with open(os.path.join(refs["packed"], rel), "rb") as a, open(os.path.join(cache, rel), "rb") as b:
            assert a.read() == b.read(), rel


@pytest.mark.parametrize("state", ["packed", "uniform-incomplete"])
def test_get_batch_invalid_utf8_is_corrupt_cache_error(refs, tmp_path, state):
    """A damaged byte in a str column (invalid UTF-8): ds[i] and get_batch both raise a
    CorruptCacheError, never a bare UnicodeDecodeError. (Found by the fuzzing above.)"""
    root, cache = _copy(refs[state], tmp_path)
    rel = "packed.shard" if state == "packed" else "shards/00000000.shard"
    with open(os.path.join(cache, rel), "rb") as f:
        data = f.read()
    name = UniformDataset.expected(2)["name"].encode()  # "u2ééxx": é is 0xc3 0xa9
    at = data.find(name)  # the column's data (a chunk shard's labels record comes later)
    assert at > 0
    rc.Damage("flip", rel, at + 2, 0xc3 ^ 0xff).apply(cache)  # 0xff never occurs in UTF-8
    ds = CachedDataset.from_cache(root, rc.NAME)
    with pytest.raises(CorruptCacheError):
        ds[2]
    with pytest.raises(EdcacheError):
        CachedDataset.from_cache(root, rc.NAME).get_batch([0, 2, 5])


# -- fuzzing ---------------------------------------------------------------------------
KINDS = ["flip", "truncate", "zero", "extend", "delete", "garbage", "swap", "field"]


def _draw_damage(data, ref: str) -> rc.Damage:
    files = rc.cache_files(ref)
    file = data.draw(st.sampled_from(files), label="file")
    size = os.path.getsize(os.path.join(ref, file))
    kind = data.draw(st.sampled_from(KINDS), label="kind")
    if kind == "flip":
        return rc.Damage("flip", file, data.draw(st.integers(0, size - 1)), data.draw(st.integers(1, 255)))
    if kind == "truncate":
        return rc.Damage("truncate", file, data.draw(st.integers(0, size - 1)))
    if kind == "zero":
        return rc.Damage("zero", file, data.draw(st.integers(0, size - 1)),
                         data.draw(st.sampled_from([1, 3, 8, 16, 64, 4096])))
    if kind == "extend":
        return rc.Damage("extend", file, payload=data.draw(st.binary(min_size=1, max_size=64)))
    if kind == "garbage":
        return rc.Damage("garbage", file, payload=data.draw(st.binary(max_size=3000)))
    if kind == "swap":
        return rc.Damage("swap", file, other=data.draw(st.sampled_from([f for f in files if f != file])))
    if kind == "delete":
        return rc.Damage("delete", file)
    seed = data.draw(st.integers(0, 2**32))
    return rc.random_damage(ref, random.Random(seed), "field", file)


def _check(outcome: dict | None, damage: rc.Damage) -> None:
    if outcome is None:
        return  # the damage changed no byte
    what = damage.describe()
    assert outcome["verify=True"] != "wrong", f"verify=True returned wrong data after {what}"
    harmful = outcome["default"] != "same" or outcome["verify=True"] != "same"
    if harmful:
        assert outcome["verify=True"] == "detected", what
        assert outcome["edcache verify"] == "detected", what


@pytest.mark.timeout(240)
@pytest.mark.parametrize("state", ["complete", "incomplete", "packed", "uniform-incomplete"])
@FUZZ
@given(data=st.data())
def test_fuzz_damaged_cache(refs, state, data):
    """Default reads: correct data or an EdcacheError (never another type, no hang, no
    allocation beyond the cache's size); verify=True and edcache verify catch every
    damage that changes what a read returns."""
    ref = refs[state]
    complete, dataset = STATES[state]
    damage = _draw_damage(data, ref)
    outcome = rc.run_trial(ref, damage, complete, measure_memory=True, dataset=dataset)
    _check(outcome, damage)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("state", ["complete", "packed"])
@FUZZ
@given(data=st.data())
def test_fuzz_two_damages(refs, state, data):
    """Two independent damages at once (e.g. a shard and the table that describes it;
    packed.shard and the manifest or a label column)."""
    ref = refs[state]
    complete, dataset = STATES[state]
    first, second = _draw_damage(data, ref), _draw_damage(data, ref)
    class Both(rc.Damage):
        def apply(self, cache_dir):
            changed = False
            for d in (first, second):
                if os.path.exists(os.path.join(cache_dir, d.file)) and (
                    d.kind != "swap" or os.path.exists(os.path.join(cache_dir, d.other))
                ):
                    changed |= d.apply(cache_dir)
            return changed

        def describe(self):
            return f"{first.describe()} + {second.describe()}"

    damage = Both("both", "")
    outcome = rc.run_trial(ref, damage, complete, dataset=dataset)
    _check(outcome, damage)


def test_corruption_matrix_script_smoke():
    """The script behind the docs' table runs and agrees with the targets (both datasets)."""
    table, misses = rc.run_matrix(trials=1, seed=11, datasets=(SlowDataset, UniformDataset))
    text = rc.format_table(table)
    assert "| complete | shard: flip |" in text
    assert "| UniformDataset packed | packed.shard: flip |" in text
    totals = {k: sum(row[k] for row in table.values()) for k in ("verify=True:wrong", "harmful",
                                                                  "verify=True:harmful-detected",
                                                                  "edcache verify:harmful-detected")}
    assert totals["verify=True:wrong"] == 0
    assert totals["verify=True:harmful-detected"] == totals["harmful"]
    assert totals["edcache verify:harmful-detected"] == totals["harmful"]


@pytest.mark.parametrize("state,field,value", [
    ("incomplete", "length", 24),
    ("incomplete", "length", 0),
    ("complete", "dataset", "reliability_datasets.OtherDataset"),
    ("complete", "version", True),
])
def test_manifest_value_damage_detected(refs, tmp_path, state, field, value):
    """A manifest that is still valid JSON with one value changed (here: an incomplete
    cache claiming fewer examples) must not be read as if it were intact."""
    import json

    root, cache = _copy(refs[state], tmp_path)
    path = os.path.join(cache, "manifest.json")
    doc = json.load(open(path))
    doc[field] = value
    open(path, "w").write(json.dumps(doc, indent=1, sort_keys=True) + "\n")
    for verify in (False, True):
        with pytest.raises(CorruptCacheError, match=r"manifest\.json: fails its checksum"):
            CachedDataset.from_cache(root, rc.NAME, verify=verify)
    report = verify_cache(cache)
    assert report.damaged_files == ["manifest.json"]


def test_verify_legacy_zip_names_damaged_member(tmp_path):
    """``edcache verify`` on an edflow zip: every member's CRC, no unpickling."""
    import zipfile

    root = str(tmp_path)
    ds = CachedDataset(SlowDataset(root, "z", 12), _legacy=True, chunk_size=4, num_workers=0, progress=False)
    assert ds.path.endswith(".zip")
    report = verify_cache(ds.path)
    assert report.ok and report.format == "edflow zip" and report.length == 12, str(report)
    with zipfile.ZipFile(ds.path) as zf:
        info = zf.getinfo("example_5.p")
        offset = info.header_offset + 30 + len(info.filename) + len(info.extra) + info.compress_size // 2
    with open(ds.path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))
    report = verify_cache(ds.path)
    assert [str(p).split(":")[1] for p in report.problems] == ["example_5.p (examples 5..5)"]
    assert main_verify([ds.path]) == 1


def test_cached_dataset_verify_keyword(refs, tmp_path):
    """``CachedDataset(dataset, verify=True)`` checks like ``from_cache(..., verify=True)``;
    without it the same flip inside an array comes back silently (the documented trade-off)."""
    root, cache = _copy(refs["complete"], tmp_path)
    with open(os.path.join(cache, "shards/00000001.shard"), "rb") as f:
        data = f.read()
    at = data.find(expected(8)["image"].tobytes())  # example 8's pixels, stored raw
    assert at > 0
    rc.Damage("flip", "shards/00000001.shard", at + 5, 0x01).apply(cache)
    plain = CachedDataset(SlowDataset(root, rc.NAME, rc.LENGTH), chunk_size=rc.CHUNK, num_workers=0,
                          progress=False)
    got = plain[8]["image"]
    assert not (got == expected(8)["image"]).all()  # wrong, unseen without checksums
    checked = CachedDataset(SlowDataset(root, rc.NAME, rc.LENGTH), chunk_size=rc.CHUNK, num_workers=0,
                            progress=False, verify=True)
    assert_example_equal(checked[0], expected(0))
    with pytest.raises(CorruptCacheError, match="fails its checksum"):
        checked[8]
