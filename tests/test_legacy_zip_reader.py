"""LegacyZipReader / LegacyFolderReader on caches laid out exactly as edflow 0.4 wrote them."""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import zipfile

import numpy as np
import pytest

from edcache.errors import CacheNotFoundError, CorruptCacheError, IncompleteCacheError, UnsafePickleError
from edcache.format.legacy import (
    ExamplesFolder,
    LegacyFolderReader,
    LegacyZipReader,
    is_legacy_folder,
    read_cachable_length,
    read_cachable_parameters,
)
from legacy_writer import (
    IN_MEMORY_KEYS,
    assert_same,
    cut_central_directory,
    edflow_dumps,
    edflow_example,
    edflow_labels,
    edflow_run,
    write_cachable,
    write_edflow_folder,
)

N = 30


@pytest.fixture
def zpath(tmp_path):
    path = str(tmp_path / "cached" / "faces.zip")
    edflow_run(path, N)
    return path


def _snapshot(folder):
    return {
        os.path.join(d, f): (os.stat(os.path.join(d, f)).st_mtime_ns, open(os.path.join(d, f), "rb").read())
        for d, _, files in os.walk(folder) for f in files
    }


@pytest.mark.parametrize("protocol", [3, 4])
@pytest.mark.parametrize("numpy1", [True, False], ids=["numpy1", "numpy2"])
def test_full_cache_reads_as_edflow_wrote_it(tmp_path, protocol, numpy1):
    path = str(tmp_path / "cached" / "faces.zip")
    order = edflow_run(path, N, protocol=protocol, numpy1=numpy1)
    assert order[:4] == [0, 12, 1, 13]  # two workers' interleaved arrival order
    reader = LegacyZipReader(path)
    assert len(reader) == N and reader.complete
    for i in range(N):
        example = reader.read(i)
        assert_same(example, edflow_example(i), f"example {i}")
        assert type(example["index_"]) is np.int64
    labels = reader.labels
    assert list(labels) == IN_MEMORY_KEYS
    expected = edflow_labels(N, IN_MEMORY_KEYS)
    assert labels["label"].dtype.kind == "i" and labels["label"].tolist() == expected["label"]
    assert labels["split"].dtype.kind == "U" and labels["split"].tolist() == expected["split"]
    assert labels["score"].dtype == np.float64 and labels["score"].tolist() == expected["score"]


def test_duplicate_labels_last_wins(zpath):
    edflow_run(zpath, N, ["label"])  # a second (force_cache) run appends another labels.p
    with zipfile.ZipFile(zpath) as zf:
        assert zf.namelist().count("labels.p") == 2
    labels = LegacyZipReader(zpath).labels
    assert list(labels) == ["label"]


def test_no_in_memory_keys_gives_empty_labels(tmp_path):
    path = str(tmp_path / "x.zip")
    edflow_run(path, 5, [])
    assert LegacyZipReader(path).labels == {}


def test_partial_cache_counts_present_examples(tmp_path):
    path = str(tmp_path / "x.zip")
    written = edflow_run(path, N, stop_after=17)  # KeyboardInterrupt: valid zip, no labels.p
    reader = LegacyZipReader(path)
    assert len(reader) == 17 and not reader.complete
    for i in written:
        assert_same(reader.read(i), edflow_example(i))
    missing = sorted(set(range(N)) - set(written))[0]
    with pytest.raises(KeyError, match=f"example {missing} .*'example_{missing}.p'"):
        reader.read(missing)
    with pytest.raises(IncompleteCacheError, match="labels.p"):
        reader.labels
    with pytest.raises(KeyError):
        reader.labels


def test_resumed_edflow_run_completes_the_zip(tmp_path):
    path = str(tmp_path / "x.zip")
    edflow_run(path, N, stop_after=10)
    edflow_run(path, N)
    reader = LegacyZipReader(path)
    assert len(reader) == N and reader.complete
    assert_same(reader.read(N - 1), edflow_example(N - 1))


def test_member_index_comes_from_the_central_directory_once(zpath):
    reader = LegacyZipReader(zpath)
    zf = reader.zipfile
    assert reader.zipfile is zf  # one handle per process
    reader.read(3)
    reader.labels
    assert reader.zipfile is zf


def test_zip_without_central_directory_says_how_to_salvage(zpath):
    cut_central_directory(zpath)
    with pytest.raises(CorruptCacheError) as info:
        LegacyZipReader(zpath)
    assert zpath in str(info.value) and "edcache convert" in str(info.value)


def test_not_a_zip_and_missing_file(tmp_path):
    bad = tmp_path / "bad.zip"
    bad.write_bytes(b"hello world")
    with pytest.raises(CorruptCacheError, match="not a zip"):
        LegacyZipReader(str(bad))
    with pytest.raises(CacheNotFoundError):
        LegacyZipReader(str(tmp_path / "nope.zip"))


def test_damaged_member_is_a_corrupt_cache_error(tmp_path):
    path = str(tmp_path / "x.zip")
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("example_0.p", edflow_dumps({"a": 1}))
        zf.writestr("labels.p", edflow_dumps({}))
        offset = zf.getinfo("example_0.p").header_offset + 30 + len("example_0.p")
    with open(path, "r+b") as f:
        f.seek(offset + 3)
        f.write(b"\xff")
    with pytest.raises(CorruptCacheError, match="example_0.p"):
        LegacyZipReader(path).read(0)


class Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("member", ["example_0.p", "labels.p"])
def test_malicious_member_is_never_run(tmp_path, member):
    marker = tmp_path / "pwned"
    path = str(tmp_path / "x.zip")
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        evil = pickle.dumps({"x": Payload(str(marker))})
        zf.writestr("example_0.p", evil if member == "example_0.p" else edflow_dumps({"a": 1}))
        zf.writestr("labels.p", evil if member == "labels.p" else edflow_dumps({}))
    reader = LegacyZipReader(path)
    with pytest.raises(UnsafePickleError) as info:
        reader.read(0) if member == "example_0.p" else reader.labels
    assert f"{path}:{member}" in str(info.value)
    assert f"{os.system.__module__}.system" in str(info.value)
    assert "allow_pickle=True" in str(info.value)
    assert not marker.exists()


def test_reader_pickles_without_its_handle_and_both_copies_work(zpath):
    reader = LegacyZipReader(zpath)
    reader.read(0)
    data = pickle.dumps(reader)
    assert b"ZipFile" not in data and len(data) < 500
    clone = pickle.loads(data)
    assert_same(clone.read(5), edflow_example(5))
    assert_same(reader.read(6), edflow_example(6))  # edflow's original broke here
    assert len(clone) == N and list(clone.labels) == IN_MEMORY_KEYS


def _child_reads(reader, queue):
    zf = reader.zipfile
    queue.put((reader._pid == os.getpid(), zf.fp is not None, reader.read(7)["name"], len(reader)))


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_zipfile_is_reopened_in_each_process(zpath, method):
    reader = LegacyZipReader(zpath)
    parent_zip = reader.zipfile  # opened before the fork
    ctx = mp.get_context(method)
    queue = ctx.Queue()
    proc = ctx.Process(target=_child_reads, args=(reader, queue))
    proc.start()
    result = queue.get(timeout=120)
    proc.join()
    assert result == (True, True, "img_0007", N)
    assert reader.zipfile is parent_zip
    assert_same(reader.read(8), edflow_example(8))


def test_reading_never_writes(zpath):
    folder = os.path.dirname(zpath)
    before = _snapshot(folder)
    reader = LegacyZipReader(zpath)
    for i in range(N):
        reader.read(i)
    reader.labels
    with pytest.raises(KeyError):
        reader.read(N)
    pickle.loads(pickle.dumps(reader)).read(1)
    reader.close()
    assert _snapshot(folder) == before


def test_irregular_labels_stay_lists(tmp_path):
    path = str(tmp_path / "x.zip")
    raw = {
        "ragged": [np.zeros(2), np.zeros(3)],
        "with_none": [1, None],
        "mixed": [1, "a"],
        "nested": [{"a": 1}, {"a": 2}],
        "empty": [],
        "ints_and_floats": [1, 2.5],
        "stacked": [np.zeros((2, 2), np.float32), np.ones((2, 2), np.float32)],
        "bools": [True, np.bool_(False)],
        "huge_int": [2**70, 1],
    }
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("labels.p", edflow_dumps(raw))
    labels = LegacyZipReader(path).labels
    for key in ("ragged", "with_none", "mixed", "nested", "empty", "huge_int"):
        assert isinstance(labels[key], list), key
    assert labels["mixed"] == [1, "a"] and labels["empty"] == []
    assert labels["ints_and_floats"].dtype == np.float64
    assert labels["stacked"].shape == (2, 2, 2) and labels["stacked"].dtype == np.float32
    assert labels["bools"].dtype == bool


# -- the folder layout ---------------------------------------------------------------------

def test_examples_folder_reads_member_bytes(tmp_path):
    folder = str(tmp_path / "cached" / "faces")
    write_edflow_folder(folder, 4)
    ef = ExamplesFolder(folder)
    assert pickle.loads(ef.read("example_2.p"))["name"] == "img_0002"
    assert ef.read("labels.p") == open(os.path.join(folder, "labels.p"), "rb").read()
    with pytest.raises(FileNotFoundError):
        ef.read("example_9.p")
    with pytest.raises(ValueError):
        ef.read("../faces.zip")


def test_legacy_folder_reader(tmp_path):
    folder = str(tmp_path / "faces")
    write_edflow_folder(folder, 6, protocol=3)
    reader = LegacyFolderReader(folder)
    assert len(reader) == 6 and reader.complete
    assert isinstance(reader.zipfile, ExamplesFolder)
    for i in range(6):
        assert_same(reader.read(i), edflow_example(i))
    assert reader.labels["label"].tolist() == [i % 3 for i in range(6)]
    with pytest.raises(KeyError, match="example 6"):
        reader.read(6)
    clone = pickle.loads(pickle.dumps(reader))
    assert_same(clone.read(1), edflow_example(1))


def test_legacy_folder_without_labels(tmp_path):
    folder = str(tmp_path / "faces")
    write_edflow_folder(folder, 3, labels=False)
    reader = LegacyFolderReader(folder)
    assert not reader.complete
    with pytest.raises(IncompleteCacheError, match="labels.p"):
        reader.labels


def test_is_legacy_folder(tmp_path):
    folder = tmp_path / "faces"
    write_edflow_folder(str(folder), 2)
    assert is_legacy_folder(str(folder))
    (folder / "manifest.json").write_text("{}")
    assert not is_legacy_folder(str(folder))
    assert not is_legacy_folder(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    assert not is_legacy_folder(str(tmp_path / "empty"))
    (tmp_path / "file").write_text("x")
    assert not is_legacy_folder(str(tmp_path / "file"))


def test_malicious_folder_member_is_never_run(tmp_path):
    marker = tmp_path / "pwned"
    folder = tmp_path / "faces"
    folder.mkdir()
    (folder / "example_0.p").write_bytes(pickle.dumps({"x": Payload(str(marker))}))
    with pytest.raises(UnsafePickleError, match="example_0.p"):
        LegacyFolderReader(str(folder)).read(0)
    assert not marker.exists()


# -- @cachable's side files ------------------------------------------------------------------

def test_cachable_side_files(tmp_path):
    path = str(tmp_path / "data.zip")
    write_cachable(path, 7, args=(1, "a"), kwargs={"size": 32})
    assert os.path.isfile(path + ".p") and os.path.isfile(path + "parameters.p")
    assert read_cachable_length(path) == 7
    assert read_cachable_parameters(path) == ((1, "a"), {"size": 32})
    assert len(LegacyZipReader(path)) == 7
    assert read_cachable_length(str(tmp_path / "other.zip")) is None
    assert read_cachable_parameters(str(tmp_path / "other.zip")) is None
