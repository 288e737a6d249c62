"""Integrity: damaged caches never crash readers, never return wrong data with verify=True,
and ``edcache verify`` names the damaged file and its examples (issue 6, suite 2).

The damage model and read classification live in ``tests/reliability_corruption.py``;
that script also prints the detection-rate table of ``docs/reliability.md``.

Reference states (format v2): each of the four datasets (mixed values, uniform,
variable-shape, mixed-schema), complete (column files, labels, ``checksums.npy``) and
incomplete (3 of 5 chunks committed in ``commits.log``).
"""

from __future__ import annotations

import os
import random
import shutil

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edcache import CachedDataset
from edcache.errors import CacheNotFoundError, CorruptCacheError, EdcacheError
from edcache.verify import main_verify, verify_cache

import reliability_corruption as rc
from reliability_datasets import (
    DATASETS,
    MixedDataset,
    RaggedDataset,
    SlowDataset,
    UniformDataset,
    assert_example_equal,
    expected,
)

FUZZ = settings(
    max_examples=30,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


#: reference state -> (complete, dataset class)
STATES = {f"{kind}-{state}": (state == "complete", cls)
          for kind, cls in DATASETS.items() for state in ("complete", "incomplete")}


@pytest.fixture(scope="module")
def refs(tmp_path_factory):
    base = tmp_path_factory.mktemp("refs")
    out = {state: rc.build_reference(str(base / state), complete, dataset)
           for state, (complete, dataset) in STATES.items()}
    for state, path in out.items():
        files = rc.cache_files(path)
        assert ("checksums.npy" in files) == STATES[state][0] and ("commits.log" in files) != STATES[state][0]
    return out


def _copy(ref: str, tmp_path) -> tuple[str, str]:
    root = str(tmp_path / "root")
    cache = os.path.join(root, "cached", rc.NAME)
    shutil.copytree(ref, cache)
    return root, cache


def _column_file(cache: str, key: str, which: int = 0) -> str:
    """The data (0) or index (1) file of column ``key``."""
    from edcache.format.columnar.manifest import read_manifest

    spec = next(c for c in read_manifest(cache).schema.columns if c.key == key)
    return spec.files()[which]


# -- verify_cache on intact and on named damage ----------------------------------------
@pytest.mark.parametrize("kind", list(DATASETS))
def test_verify_cache_intact(refs, kind):
    report = verify_cache(refs[f"{kind}-complete"], deep=True)
    assert report.ok, str(report)
    assert report.complete and report.length == rc.LENGTH
    assert report.shards_checked == report.shards_total > 0  # every column file
    assert report.labels_checked == [str(k) for k in DATASETS[kind].in_memory_keys]
    assert str(report).endswith("OK: no damage found")

    partial = verify_cache(refs[f"{kind}-incomplete"], deep=True)
    assert partial.ok, str(partial)
    assert not partial.complete and partial.length == rc.LENGTH


def test_verify_names_damaged_column_label_and_range(refs, tmp_path, capsys):
    root, cache = _copy(refs["slow-complete"], tmp_path)
    image = _column_file(cache, "image")  # fixed (4, 4, 3) uint8: row r at r * 48
    rc.Damage("flip", image, 24 * 48 + 5, 0x10).apply(cache)  # example 24, chunk 3
    rc.Damage("flip", "labels/1.npy", 150, 0x01).apply(cache)
    report = verify_cache(cache)
    assert not report.ok
    assert report.damaged_files == sorted([image, "labels/1.npy"])
    assert report.damaged_ranges == [(24, 32)]
    problem = next(p for p in report.problems if p.file == image)
    assert str(problem) == f"{image} (examples 24..31): fails its checksum for chunk 3 (column 'image')"
    assert main_verify([cache]) == 1
    out = capsys.readouterr().out
    assert f"{image} (examples 24..31): fails its checksum for chunk 3 (column 'image')" in out
    assert "labels/1.npy" in out and "(key 'split') fails its checksum" in out
    assert "examples affected: 24..31" in out


def test_verify_cli_exit_codes(refs, tmp_path, capsys):
    assert main_verify([refs["slow-complete"]]) == 0
    assert "OK: no damage found" in capsys.readouterr().out
    assert main_verify([str(tmp_path)]) == 2
    assert "no edcache cache at" in capsys.readouterr().err
    with pytest.raises(CacheNotFoundError):
        verify_cache(str(tmp_path / "nothing"))
    try:  # the lead's CLI dispatches ``edcache verify``
        from edcache.cli.main import main
    except ImportError:  # pragma: no cover
        return
    assert main(["verify", refs["slow-complete"]]) == 0


@pytest.mark.parametrize("kind", ["slow", "mixed"])
def test_verify_repair_advice_rebuilds_identically(refs, tmp_path, kind):
    """A damaged column and label file: verify names them and advises a rebuild with
    force_cache=True, keep_existing=False; that rebuild is byte-identical."""
    dataset = DATASETS[kind]
    root, cache = _copy(refs[f"{kind}-complete"], tmp_path)
    col = _column_file(cache, "meta", 1)  # a record column's index
    rc.Damage("zero", col, 40, 16).apply(cache)
    rc.Damage("truncate", "labels/1.npy", 30).apply(cache)
    report = verify_cache(cache)
    assert report.damaged_files == sorted([col, "labels/1.npy"]), str(report)
    assert "force_cache=True, keep_existing=False" in str(report)
    count_dir = tmp_path / "count"
    count_dir.mkdir()
    ds = dataset(root, rc.NAME, rc.LENGTH, count_dir=str(count_dir))
    CachedDataset(ds, force_cache=True, keep_existing=False, chunk_size=rc.CHUNK, num_workers=0, progress=False)
    assert sorted({int(n.split(".")[0]) for n in os.listdir(count_dir)}) == list(range(rc.LENGTH))
    assert verify_cache(cache).ok
    assert rc.cache_files(cache) == rc.cache_files(refs[f"{kind}-complete"])
    for rel in rc.cache_files(refs[f"{kind}-complete"]):
        with open(os.path.join(refs[f"{kind}-complete"], rel), "rb") as a, open(os.path.join(cache, rel), "rb") as b:
            assert a.read() == b.read(), rel


@pytest.mark.parametrize("kind", ["slow", "uniform", "ragged", "mixed"])
def test_damaged_label_file_repaired_without_recompute(refs, tmp_path, kind):
    """Only a label file damaged: ``force_cache=True`` (keep_existing) rewrites it from the
    columns, computing nothing."""
    dataset = DATASETS[kind]
    root, cache = _copy(refs[f"{kind}-complete"], tmp_path)
    rc.Damage("flip", "labels/1.npy", 140, 0x04).apply(cache)
    assert verify_cache(cache).damaged_files == ["labels/1.npy"]
    count_dir = tmp_path / "count"
    count_dir.mkdir()
    CachedDataset(dataset(root, rc.NAME, rc.LENGTH, count_dir=str(count_dir)), force_cache=True,
                  chunk_size=rc.CHUNK, num_workers=0, progress=False)
    assert os.listdir(count_dir) == []
    assert verify_cache(cache).ok
    with open(os.path.join(cache, "labels/1.npy"), "rb") as a, \
            open(os.path.join(refs[f"{kind}-complete"], "labels/1.npy"), "rb") as b:
        assert a.read() == b.read()


def test_verify_reads_stop_at_damaged_chunk_only(refs, tmp_path):
    """verify=True: the damaged chunk raises, every other chunk still reads correctly."""
    root, cache = _copy(refs["slow-complete"], tmp_path)
    image = _column_file(cache, "image")
    rc.Damage("flip", image, 18 * 48 + 3, 0x80).apply(cache)  # chunk 2
    ds = CachedDataset.from_cache(root, rc.NAME, verify=True)
    for i in range(rc.LENGTH):
        if 16 <= i < 24:
            with pytest.raises(CorruptCacheError,
                               match=rf"{image}: examples 16\.\.23 \(chunk 2\) fail their checksum"):
                ds[i]
        else:
            assert_example_equal(ds[i], expected(i))


def test_verify_ragged_names_damaged_column_and_repair(refs, tmp_path, capsys):
    """A flip inside example 9's boxes (a ragged column): ``edcache verify`` names the
    file, its column and chunk 1; verify=True reads and batches refuse it; default reads
    return it silently (the documented trade-off); a rebuild is byte-identical."""
    root, cache = _copy(refs["ragged-complete"], tmp_path)
    boxes = _column_file(cache, "boxes")
    with open(os.path.join(cache, boxes), "rb") as f:
        data = f.read()
    want = RaggedDataset.expected(9)["boxes"]
    assert want.size, "example 9 has boxes"
    at = data.find(want.tobytes())
    assert at >= 0 and data.count(want.tobytes()) == 1
    rc.Damage("flip", boxes, at + 5, 0x01).apply(cache)
    report = verify_cache(cache)
    assert report.damaged_files == [boxes] and report.damaged_ranges == [(8, 16)], str(report)
    assert main_verify([cache]) == 1
    assert f"{boxes} (examples 8..15): fails its checksum for chunk 1 (column 'boxes')" in capsys.readouterr().out
    checked = CachedDataset.from_cache(root, rc.NAME, verify=True)
    with pytest.raises(CorruptCacheError, match="fail their checksum"):
        checked[9]
    with pytest.raises(CorruptCacheError, match="fail their checksum"):
        CachedDataset.from_cache(root, rc.NAME, verify=True).get_batch([1, 9])
    assert_example_equal(checked[20], RaggedDataset.expected(20))
    plain = CachedDataset.from_cache(root, rc.NAME)
    assert not np.array_equal(plain[9]["boxes"], want)
    del plain, checked
    CachedDataset(RaggedDataset(root, rc.NAME, rc.LENGTH), force_cache=True, keep_existing=False,
                  chunk_size=rc.CHUNK, num_workers=0, progress=False)
    with open(os.path.join(cache, boxes), "rb") as f:
        assert f.read() == data
    assert verify_cache(cache).ok


@pytest.mark.parametrize("state", ["uniform-complete", "uniform-incomplete"])
def test_get_batch_invalid_utf8_is_corrupt_cache_error(refs, tmp_path, state):
    """A damaged byte in a str column (invalid UTF-8): ds[i] and get_batch both raise a
    CorruptCacheError, never a bare UnicodeDecodeError."""
    root, cache = _copy(refs[state], tmp_path)
    rel = _column_file(cache, "name") if state.endswith("-complete") else "columns/0005.data"
    with open(os.path.join(cache, rel), "rb") as f:
        data = f.read()
    name = UniformDataset.expected(2)["name"].encode()  # "u2ééxx": é is 0xc3 0xa9
    at = data.find(name)
    assert at >= 0
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


def known_v2_bug(outcome: dict, damage: rc.Damage) -> str | None:
    """An outcome explained by a documented limit: ``commits.log`` cut at (or zeroed from)
    a record boundary is the state of a build killed that many commits earlier; ``edcache
    verify`` flags it where a fixed column holds more than one chunk past the last
    commit (test_verify_flags_log_cut_by_several_records), otherwise those chunks are
    simply computed again."""
    harmful = outcome["default"] != "same" or outcome["verify=True"] != "same"
    cut = [d for d in getattr(damage, "parts", [damage]) if d.file == "commits.log" and d.kind in ("truncate", "zero")]
    if cut and harmful and outcome["edcache verify"] == "same" and outcome["verify=True"] != "wrong":
        return "commits.log cut short: verify OK"  # test_verify_flags_log_cut_by_several_records
    return None


#: fuzzed outcomes explained by open v2 bugs
KNOWN_BUGS: dict[str, int] = {}


def _check(outcome: dict | None, damage: rc.Damage) -> None:
    if outcome is None:
        return  # the damage changed no byte
    what = damage.describe()
    bug = known_v2_bug(outcome, damage)
    if bug:
        KNOWN_BUGS[bug] = KNOWN_BUGS.get(bug, 0) + 1
        return
    assert outcome["verify=True"] != "wrong", f"verify=True returned wrong data after {what}"
    harmful = outcome["default"] != "same" or outcome["verify=True"] != "same"
    if harmful:
        assert outcome["verify=True"] == "detected", what
        assert outcome["edcache verify"] == "detected", what


@pytest.mark.timeout(300)
@pytest.mark.parametrize("state", sorted(STATES))
@FUZZ
@given(data=st.data())
def test_fuzz_damaged_cache(refs, state, data):
    """Default reads: correct data or an EdcacheError (never another type, no hang, no
    allocation beyond the cache's size); verify=True and edcache verify catch every
    damage that changes what a read returns."""
    ref = refs[state]
    complete, dataset = STATES[state]
    damage = _draw_damage(data, ref)
    outcome = rc.run_trial(ref, damage, complete, measure_memory=True, dataset=dataset,
                           memory_slack=_open_slack(ref))
    _check(outcome, damage)


_SLACK: dict[str, int] = {}


def _open_slack(ref: str) -> int:
    """What opening the intact reference allocates beyond 4 MiB (the open bug of
    test_open_allocates_little; 0 once fixed)."""
    if ref not in _SLACK:
        peak = rc.open_peak(ref)
        _SLACK[ref] = peak if peak > 4 << 20 else 0
    return _SLACK[ref]


@pytest.mark.timeout(200)
@pytest.mark.parametrize("state", ["slow-complete", "mixed-incomplete"])
@FUZZ
@given(data=st.data())
def test_fuzz_two_damages(refs, state, data):
    """Two independent damages at once (e.g. a column file and the checksum table that
    describes it; a column and the manifest or a label file)."""
    ref = refs[state]
    complete, dataset = STATES[state]
    first, second = _draw_damage(data, ref), _draw_damage(data, ref)
    class Both(rc.Damage):
        parts = [first, second]

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
    """The script behind the docs' table runs (mixed-values and mixed-schema datasets) and
    agrees with the targets."""
    table, misses = rc.run_matrix(trials=1, seed=11, datasets=(SlowDataset, MixedDataset))
    text = rc.format_table(table)
    assert "| complete | column .data: flip |" in text
    assert "| mixed incomplete | commits.log: field |" in text
    assert "| mixed complete | checksums.npy: field |" in text
    for (state, what), row in table.items():
        if what in ("commits.log: truncate", "commits.log: zero"):
            continue  # the documented limit of known_v2_bug
        assert row["verify=True:wrong"] == 0, (state, what)
        assert row["verify=True:harmful-detected"] == row["harmful"], (state, what)
        assert row["edcache verify:harmful-detected"] == row["harmful"], (state, what)


@pytest.mark.parametrize("state,field,value", [
    ("slow-incomplete", "length", 24),
    ("slow-incomplete", "length", 0),
    ("slow-complete", "dataset", "reliability_datasets.OtherDataset"),
    ("slow-complete", "version", True),
    ("mixed-complete", "files", []),
    ("ragged-complete", "labels", {}),
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
        with pytest.raises(CorruptCacheError, match=r"manifest\.json: (fails its checksum|format version True)"):
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
    root, cache = _copy(refs["slow-complete"], tmp_path)
    image = _column_file(cache, "image")
    rc.Damage("flip", image, 8 * 48 + 5, 0x01).apply(cache)  # example 8's pixels
    plain = CachedDataset(SlowDataset(root, rc.NAME, rc.LENGTH), chunk_size=rc.CHUNK, num_workers=0,
                          progress=False)
    got = plain[8]["image"]
    assert not (got == expected(8)["image"]).all()  # wrong, unseen without checksums
    checked = CachedDataset(SlowDataset(root, rc.NAME, rc.LENGTH), chunk_size=rc.CHUNK, num_workers=0,
                            progress=False, verify=True)
    assert_example_equal(checked[0], expected(0))
    with pytest.raises(CorruptCacheError, match="fail their checksum"):
        checked[8]


# -- v2 bugs found by the corruption matrix (fixed in 3d410af unless marked xfail) ------------
def test_verify_true_checks_first_row_offset(refs, tmp_path):
    """Slow cache: the ``name`` column's index entry 8 (bytes 64..71, the end of chunk
    0's segment) is row 8's start offset. With its lowest bit flipped,
    ``from_cache(verify=True)[8]`` raises and verify counts example 8 as damaged. (It
    returned 'tem-00008' silently; found by the corruption matrix, fixed in 3d410af.)"""
    root, cache = _copy(refs["slow-complete"], tmp_path)
    index = _column_file(cache, "name", 1)
    rc.Damage("flip", index, 64, 0x01).apply(cache)
    ds = CachedDataset.from_cache(root, rc.NAME, verify=True)
    problems = []
    try:
        got = ds[8]["name"]
    except CorruptCacheError:
        pass
    else:
        problems.append(f"verify=True read {got!r} for {expected(8)['name']!r}")
    report = verify_cache(cache)
    if (0, 8) in report.damaged_ranges and not any(a <= 8 < b for a, b in report.damaged_ranges):
        problems.append(f"edcache verify names {report.damaged_ranges}, example 8 is damaged too")
    assert not problems, problems


def test_log_schema_record_edit_detected(refs, tmp_path):
    """Uniform incomplete cache: ``"key":"score"`` -> ``"key":"x"`` in the schema record
    (line 2 of commits.log) is detected by verify=True reads and edcache verify. (They
    returned examples with a key 'x' and said OK; found by the corruption matrix, fixed
    in 3d410af: log records carry their own xxh3.)"""
    root, cache = _copy(refs["uniform-incomplete"], tmp_path)
    path = os.path.join(cache, "commits.log")
    lines = open(path, "rb").read().split(b"\n")
    assert b'"key":"score"' in lines[1]
    lines[1] = lines[1].replace(b'"key":"score"', b'"key":"x"')
    open(path, "wb").write(b"\n".join(lines))
    problems = []
    try:
        got = CachedDataset.from_cache(root, rc.NAME, verify=True)[0]
    except EdcacheError:
        pass
    else:
        if not rc.examples_equal(got, UniformDataset.expected(0)):
            problems.append(f"verify=True read keys {list(got)}")
    if verify_cache(cache).ok:
        problems.append("edcache verify: OK")
    assert not problems, problems


@pytest.mark.parametrize("damage", ["flip-middle-record", "delete"])
def test_log_lost_commits_reported(refs, tmp_path, damage):
    """Slow incomplete cache (chunks 0..2 committed): a flipped byte inside chunk 1's
    commit record (examples 8..23 no longer read), or ``commits.log`` deleted (0..23):
    ``edcache verify`` says so. (It said OK; found by the corruption matrix, fixed in
    3d410af.)"""
    root, cache = _copy(refs["slow-incomplete"], tmp_path)
    path = os.path.join(cache, "commits.log")
    data = open(path, "rb").read()
    if damage == "delete":
        os.unlink(path)
    else:
        at = data.index(b'{"c":1,') + 3
        rc.Damage("flip", "commits.log", at, 0x01).apply(cache)  # not JSON: chunks 1, 2 dropped
    with pytest.raises(EdcacheError):
        CachedDataset.from_cache(root, rc.NAME)[8 if damage != "delete" else 0]
    report = verify_cache(cache)
    assert not report.ok, str(report)


def test_open_allocates_little(refs):
    """Opening a 12 KB cache and reading one example allocates 67 MB at its peak
    (tracemalloc), from ``edcache.format.columnar.manifest.peek_version``."""
    peak = rc.open_peak(refs["slow-complete"])
    assert peak < 4 << 20, f"opening a cache allocated {peak} bytes"


def test_verify_flags_log_cut_by_several_records(refs, tmp_path):
    """Slow incomplete cache (chunks 0..2 committed), ``commits.log`` cut right before
    chunk 1's record: examples 8..23 no longer read; the ``image`` column (48 bytes a
    row) holds 768 bytes = 2 chunks past its last commit, which only damage leaves."""
    root, cache = _copy(refs["slow-incomplete"], tmp_path)
    path = os.path.join(cache, "commits.log")
    data = open(path, "rb").read()
    open(path, "wb").write(data[: data.index(b'{"c":1,')])
    with pytest.raises(EdcacheError):
        CachedDataset.from_cache(root, rc.NAME)[8]
    report = verify_cache(cache)
    assert not report.ok, str(report)


def test_known_bug_counts():
    """Prints how many fuzzed damages an open v2 bug explained (run with -s, after the fuzzing)."""
    print(f"\nfuzz outcomes explained by the documented log-cut limit: {KNOWN_BUGS}")
