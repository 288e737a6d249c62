"""Format v2: one columnar layout for every dataset, written once in index order
(``docs/format.md``)."""

from __future__ import annotations

import os
import threading

import numpy as np
import pytest

from edcache import CachedDataset, DatasetMixin
from edcache.building.executors.base import Executor
from edcache.errors import CorruptCacheError, ExampleError
from edcache.format.columnar import CacheRebuiltError, ColumnarReader
from edcache.format.columnar.log import read_log
from edcache.format.columnar.writer import ColumnarSink
from edcache.verify import verify_cache

from core_datasets import Flat, flat_expected, record_computation
from helpers import assert_same, tree_bytes
from test_core_build import computed

HERE = os.path.dirname(__file__)


def _files(path):
    return sorted(os.path.relpath(os.path.join(d, f), path) for d, _, fs in os.walk(path) for f in fs)


class Ragged(DatasetMixin):
    """A detection-style dataset: an image, a variable number of boxes, variable-length
    tokens; ``vary`` adds a field whose shape changes in every axis and one that is
    present in some examples only."""

    in_memory_keys = ["cls"]
    fingerprint_exclude = ("log_dir", "fail_at")  # plumbing, not what the examples are

    def __init__(self, root, n=200, name="ragged", vary=False, log_dir=None, salt=0, fail_at=10**9):
        self.root, self.name, self.n, self.vary, self.log_dir, self.salt = str(root), name, n, vary, log_dir, salt
        self.fail_at = fail_at

    def __len__(self):
        return self.n

    def get_example(self, i):
        if i >= self.fail_at:
            raise RuntimeError(f"stop at {i}")
        record_computation(self.log_dir, i)
        rng = np.random.default_rng(i + self.salt)
        ex = {
            "image": rng.integers(0, 255, (8, 8, 3), dtype=np.uint8),
            "boxes": rng.standard_normal((i % 21, 4)).astype(np.float32),
            "tokens": rng.integers(0, 1000, i % 13, dtype=np.int32),
            "cls": i % 5,
        }
        if self.vary:
            ex["mask"] = np.ones((i % 3 + 1, i % 4 + 2), bool)
            if i % 3 == 0:
                ex["crowd"] = {"n": i, "ids": (i, str(i))}
        return ex


def ragged_expected(i, vary=False, salt=0):
    return Ragged("/nonexistent", n=10**9, vary=vary, salt=salt)[i]


def test_variable_shapes_are_columns_and_read_back(tmp_path):
    ds = CachedDataset(Ragged(tmp_path, vary=True), chunk_size=16, num_workers=2, progress=False)
    kinds = {c["key"]: c["kind"] for c in ds.store.columns()}
    assert kinds["image"] == "fixed" and kinds["boxes"] == "ragged" and kinds["tokens"] == "ragged"
    assert kinds["mask"] == "varshape" and kinds["crowd"] == "record"
    for i in list(range(200)) + [-1]:
        assert_same(ds[i], ragged_expected(i % 200, vary=True))
    batch = ds.get_batch([5, 0, 26])
    assert isinstance(batch["boxes"], list) and [b.shape for b in batch["boxes"]] == [(5, 4), (0, 4), (5, 4)]
    assert verify_cache(ds.path, deep=True).ok
    assert list(ds.labels["cls"]) == [i % 5 for i in range(200)]


def test_files_grow_with_columns_not_examples(tmp_path):
    small = CachedDataset(Ragged(tmp_path / "a", n=40), chunk_size=4, num_workers=0, progress=False)
    big = CachedDataset(Ragged(tmp_path / "b", n=800), chunk_size=4, num_workers=0, progress=False)
    assert _files(small.path) == _files(big.path)
    assert len(_files(big.path)) == 2 + 1 + 2 + 2 + 1 + 1  # manifest, table, image, boxes, tokens, cls, index_


@pytest.mark.parametrize("workers", [0, 2])
def test_cache_is_byte_identical_whatever_the_workers(tmp_path, workers):
    ref = CachedDataset(Ragged(tmp_path / "a", vary=True), chunk_size=8, num_workers=0, progress=False)
    other = CachedDataset(Ragged(tmp_path / "b", vary=True), chunk_size=8, num_workers=workers, progress=False)
    assert tree_bytes(ref.path) == tree_bytes(other.path)


class _Reversed(Executor):
    """Computes the chunks in reverse order, so every result but the last arrives early."""

    staged = False

    def run(self, source, encoder, tasks, on_result):
        from edcache.building.compute import compute_chunk

        dataset = source.load()
        for task in reversed(list(tasks)):
            on_result(compute_chunk(dataset, encoder, task))


@pytest.mark.parametrize("spill", [False, True])
def test_chunks_arriving_out_of_order_give_the_same_bytes(tmp_path, monkeypatch, spill):
    if spill:  # early results go to temporary files instead of memory
        monkeypatch.setattr(ColumnarSink, "max_pending_bytes", 0)
    ref = CachedDataset(Ragged(tmp_path / "a", vary=True), chunk_size=8, num_workers=0, progress=False)
    rev = CachedDataset(Ragged(tmp_path / "b", vary=True), chunk_size=8, executor=_Reversed(), progress=False)
    assert tree_bytes(ref.path) == tree_bytes(rev.path)


class Evolving(DatasetMixin):
    """A field whose kind changes as the indices grow: fixed, then ragged, then varshape,
    then another type (record); keys that appear late; one example with int keys."""

    def __init__(self, root, n=96):
        self.root, self.name, self.n = str(root), "evolving", n

    def __len__(self):
        return self.n

    def get_example(self, i):
        if i < 24:
            x = np.full((2, 3), i, np.int16)
        elif i < 48:
            x = np.full((i % 4, 3), i, np.int16)
        elif i < 72:
            x = np.full((1, i % 5), i, np.int16)
        else:
            x = f"string {i}"
        ex = {"x": x, "n": i}
        if i >= 40:
            ex = {"late": float(i), **ex}
        if i == 90:
            ex[7] = "an int key"
        return ex


def test_columns_are_promoted_when_later_chunks_do_not_fit(tmp_path):
    ds = CachedDataset(Evolving(tmp_path), chunk_size=8, num_workers=0, progress=False)
    src = Evolving(tmp_path)
    for i in range(96):
        assert_same(ds[i], src[i])
    kinds = {c["key"]: c["kind"] for c in ds.store.columns() if c["key"] is not None}
    assert kinds["x"] == "record" and kinds["late"] == "fixed"
    assert sorted(c["kind"] for c in ds.store.columns() if c["key"] is None) == ["layout", "whole examples"]
    assert verify_cache(ds.path, deep=True).ok
    # only the current generation of a promoted column is left
    assert [f for f in _files(ds.path) if f.startswith("columns/0000")] == ["columns/0000.3.data", "columns/0000.3.index"]


class Tuples:
    """A torchvision-style dataset: (image, label) tuples, no DatasetMixin."""

    def __init__(self, root, n=50):
        self.root, self.name, self.n = str(root), "tuples", n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        if i == 7:
            return [np.zeros(2), i]  # a list keeps being a list
        return (np.full((2, 2), i, np.float32), i)


def test_tuple_and_list_examples_come_back_as_they_went_in(tmp_path):
    ds = CachedDataset(Tuples(tmp_path), chunk_size=8, num_workers=0, progress=False)
    src = Tuples(tmp_path)
    for i in range(50):
        assert_same(ds[i], src[i])
    for got, i in zip(ds[[3, 7, 9]], [3, 7, 9]):  # lists, slices, views, batches
        assert_same(got, src[i])
    assert_same(ds[5:7], [src[5], src[6]])
    assert_same(ds.subset([9, 7])[1], src[7])
    assert_same(ds.__getitems__([7, 8]), [src[7], src[8]])
    images, labels = ds.get_batch([1, 2, 7])  # collated by position; the list example mixes in
    assert labels.tolist() == [1, 2, 7] and images[1].shape == (2, 2)


def test_uniform_tuple_examples_batch_column_wise(tmp_path):
    class Pairs(Tuples):
        def __getitem__(self, i):
            return (np.full((2, 2), i, np.float32), i)

    ds = CachedDataset(Pairs(tmp_path), chunk_size=8, num_workers=0, progress=False)
    images, labels = ds.get_batch([4, 0, 4])
    assert images.shape == (3, 2, 2) and images[:, 0, 0].tolist() == [4, 0, 4]
    assert labels.tolist() == [4, 0, 4]
    images, labels = ds.subset([10, 11]).get_batch([1])
    assert labels.tolist() == [11]


class ReusesBuffer(DatasetMixin):
    """Decodes into one preallocated array and returns the same dict every call."""

    def __init__(self, root, n=40):
        self.root, self.name, self.n = str(root), "reuse", n
        self.buf = np.zeros((4, 4), np.float32)
        self.boxes = np.zeros((3, 4), np.float32)
        self.out = {}

    def __len__(self):
        return self.n

    def get_example(self, i):
        self.buf[:] = i
        self.boxes[:] = -i
        self.out["image"] = self.buf
        self.out["boxes"] = self.boxes[: i % 3]
        self.out["meta"] = {"arr": self.buf}
        return self.out


@pytest.mark.parametrize("workers", [0, 2])
def test_a_dataset_reusing_its_output_buffer_is_cached_correctly(tmp_path, workers):
    ds = CachedDataset(ReusesBuffer(tmp_path), chunk_size=8, num_workers=workers, progress=False)
    for i in range(40):
        ex = ds[i]
        assert (ex["image"] == i).all() and (ex["meta"]["arr"] == i).all(), i
        assert ex["boxes"].shape == (i % 3, 4) and (ex["boxes"] == -i).all()


def test_a_reader_keeps_reading_the_build_it_opened(tmp_path):
    old = CachedDataset(Ragged(tmp_path, n=64), chunk_size=8, num_workers=0, progress=False)
    reader = CachedDataset.from_cache(str(tmp_path), "ragged")
    before = reader[10]
    CachedDataset(Ragged(tmp_path, n=64, salt=1), chunk_size=8, num_workers=0, progress=False,
                  force_cache=True, keep_existing=False)
    for i in (10, 63, 0):  # the old build, never a mix
        assert_same(reader[i], ragged_expected(i))
    assert_same(before, old[10])
    assert_same(CachedDataset.from_cache(str(tmp_path), "ragged")[10], ragged_expected(10, salt=1))


def test_a_reader_of_an_incomplete_cache_says_when_it_was_started_over(tmp_path):
    with pytest.raises(ExampleError):
        CachedDataset(Ragged(tmp_path, n=64, fail_at=30), chunk_size=8, num_workers=0, progress=False)
    reader = ColumnarReader(str(tmp_path / "cached" / "ragged"))
    assert_same(reader.read(3), {k: v for k, v in ragged_expected(3).items()})
    with pytest.raises(ExampleError):
        CachedDataset(Ragged(tmp_path, n=64, fail_at=50, salt=1), chunk_size=8, num_workers=0, progress=False,
                      force_cache=True, keep_existing=False)
    assert_same(reader.read(3), ragged_expected(3))  # mapped already: still the old build
    with pytest.raises(CacheRebuiltError, match="started over"):
        reader.read(40)


def test_a_reader_follows_a_build_in_progress(tmp_path):
    with pytest.raises(ExampleError):
        CachedDataset(Ragged(tmp_path, n=64, fail_at=20), chunk_size=8, num_workers=0, progress=False)
    reader = ColumnarReader(str(tmp_path / "cached" / "ragged"))
    assert not reader.complete
    with pytest.raises(KeyError, match=r"examples 16\.\.23 \(chunk 2\)"):
        reader.read(17)
    CachedDataset(Ragged(tmp_path, n=64), chunk_size=8, num_workers=0, progress=False)
    assert_same(reader.read(17), ragged_expected(17))
    assert reader.complete and list(reader.labels["cls"])[:3] == [0, 1, 2]


def test_a_damaged_manifest_is_recovered_from_the_log_without_recomputing(tmp_path):
    log = tmp_path / "log"
    log.mkdir()
    with pytest.raises(ExampleError):
        CachedDataset(Ragged(tmp_path, n=64, fail_at=40), chunk_size=8, num_workers=0, progress=False)
    manifest = tmp_path / "cached" / "ragged" / "manifest.json"
    manifest.write_bytes(b"{ not json")
    ds = CachedDataset(Ragged(tmp_path, n=64, log_dir=str(log)), chunk_size=8, num_workers=0, progress=False)
    assert computed(log) == list(range(40, 64))  # the 5 committed chunks were kept
    assert_same(ds[5], ragged_expected(5))


def test_a_damaged_complete_manifest_is_kept_behind_a_clear_error(tmp_path):
    ds = CachedDataset(Ragged(tmp_path, n=16), chunk_size=8, num_workers=0, progress=False)
    (tmp_path / "cached" / "ragged" / "manifest.json").write_bytes(b"garbage")
    files = _files(ds.path)
    with pytest.raises(CorruptCacheError, match="force_cache=True, keep_existing=False"):
        CachedDataset(Ragged(tmp_path, n=16), chunk_size=8, num_workers=0, progress=False, force_cache=True)
    assert _files(ds.path) == files  # nothing deleted


def test_symlinks_in_a_cache_are_refused_and_never_followed(tmp_path):
    CachedDataset(Ragged(tmp_path / "r", n=16), chunk_size=8, num_workers=0, progress=False)
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "precious.txt").write_text("keep me")
    cache = tmp_path / "r" / "cached" / "ragged"
    os.rename(cache / "columns", tmp_path / "moved")
    os.symlink(victim, cache / "columns")
    for kwargs in ({}, {"force_cache": True, "keep_existing": False}):
        with pytest.raises(CorruptCacheError, match="symbolic link"):
            CachedDataset(Ragged(tmp_path / "r", n=16), chunk_size=8, num_workers=0, progress=False, **kwargs)
    assert (victim / "precious.txt").read_text() == "keep me" and os.listdir(victim) == ["precious.txt"]


def test_a_fifo_in_place_of_a_column_file_is_an_error_not_a_hang(tmp_path):
    ds = CachedDataset(Ragged(tmp_path, n=16), chunk_size=8, num_workers=0, progress=False)
    target = os.path.join(ds.path, "columns", "0001.data")
    os.unlink(target)
    os.mkfifo(target)
    result: list = []

    def attempt():
        for fn in (lambda: ColumnarReader(ds.path).read(0), lambda: verify_cache(ds.path)):
            try:
                result.append(fn())
            except CorruptCacheError as exc:
                result.append(exc)

    t = threading.Thread(target=attempt, daemon=True)
    t.start()
    t.join(20)
    assert not t.is_alive(), "a FIFO blocked the reader"
    assert isinstance(result[0], CorruptCacheError) and "not a regular file" in str(result[0])
    assert not result[1].ok and "not a regular file" in str(result[1])


def test_verify_true_checks_only_the_chunks_it_reads_and_verify_names_them(tmp_path):
    ds = CachedDataset(Ragged(tmp_path, n=64), chunk_size=8, num_workers=0, progress=False)
    from edcache.format.columnar.manifest import read_manifest

    boxes = next(f for f, _ in read_manifest(ds.path).files if f == "columns/0001.data")
    path = os.path.join(ds.path, boxes)
    start = read_table(ds.path, boxes)[3][0]  # the end of chunk 3: the first byte of chunk 4 (32..39)
    with open(path, "r+b") as f:
        f.seek(start)
        b = f.read(1)
        f.seek(start)
        f.write(bytes([b[0] ^ 0xFF]))
    reader = CachedDataset.from_cache(str(tmp_path), "ragged", verify=True)
    assert_same(reader[3], ragged_expected(3))  # chunk 0 is intact
    with pytest.raises(CorruptCacheError, match=r"examples 32\.\.39 \(chunk 4\)"):
        reader[35]
    report = verify_cache(ds.path)
    assert report.damaged_ranges == [(32, 40)] and report.damaged_files == [boxes]


def read_table(cache_dir, rel):
    from edcache.format.columnar.manifest import read_manifest

    m = read_manifest(cache_dir)
    table = np.load(os.path.join(cache_dir, "checksums.npy"))
    j = [f for f, _ in m.files].index(rel)
    return [(int(e), int(h)) for e, h in table[:, j]]


def test_format_v1_caches_still_open(tmp_path):
    root = os.path.join(HERE, "data", "v1")
    packed = CachedDataset.from_cache(root, "packed")
    assert packed.complete and len(packed) == 10
    assert packed[3]["name"] == "ex3" and (packed[3]["image"] == np.arange(48, dtype=np.uint8).reshape(4, 4, 3) + 3).all()
    assert list(packed.labels["label"]) == [i % 3 for i in range(10)]
    chunked = CachedDataset.from_cache(root, "chunked")
    assert chunked[7]["meta"] == {"id": 7, "t": (7, "x")} and chunked[6]["opt"] is None
    assert chunked[5]["boxes"].shape == (1, 4)
    incomplete = CachedDataset.from_cache(root, "incomplete")
    assert not incomplete.complete and incomplete[7]["name"] == "ex7"


def test_convert_rewrites_a_v1_cache_as_v2(tmp_path):
    import shutil
    import subprocess
    import sys

    src = tmp_path / "old"
    shutil.copytree(os.path.join(HERE, "data", "v1", "cached", "chunked"), src)
    out = subprocess.run([sys.executable, "-m", "edcache.cli.main", "convert", str(src), str(tmp_path / "new")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    from edcache.format import open_reader

    new = ColumnarReader(str(tmp_path / "new"))
    old = open_reader(str(src))
    for i in range(10):
        assert_same(new.read(i), old.read(i))
    assert verify_cache(str(tmp_path / "new")).ok


def test_index_is_set_in_place_of_the_stored_one_with_key_order_kept(tmp_path):
    ds = CachedDataset(Flat(tmp_path, n=40), chunk_size=8, num_workers=0, progress=False)
    for i in (0, 17, 39, -1):
        j = i % 40
        got, want = ds[i], flat_expected(j)
        assert list(got) == list(want) and got["index_"] == j
        assert_same(got, want)
    ds.append_labels = True
    assert ds[5]["labels_"] == {"cls": 5} and ds[5]["index_"] == 5


def test_get_batch_gathers_columns(tmp_path):
    ds = CachedDataset(Flat(tmp_path, n=200), chunk_size=16, num_workers=0, progress=False)
    idx = [199, 3, 3, 150, 0]
    batch = ds.get_batch(idx)
    assert batch["image"].shape == (5, 3, 4) and batch["image"].flags.writeable
    assert batch["image"][:, 0, 0].tolist() == [i % 251 for i in idx]
    assert batch["cls"].tolist() == [i % 7 for i in idx] and batch["score"].dtype == np.float32
    assert batch["name"] == [flat_expected(i)["name"] for i in idx]
    assert batch["raw"] == [flat_expected(i)["raw"] for i in idx]
    assert batch["none"] == [None] * 5 and batch["index_"].tolist() == idx
    with pytest.raises(IndexError, match="200"):
        ds.get_batch([1, 200])
    for got, i in zip(ds.__getitems__(idx), idx):
        assert_same(got, flat_expected(i))


def test_committed_chunks_are_a_prefix_in_the_log(tmp_path):
    with pytest.raises(ExampleError):
        CachedDataset(Ragged(tmp_path, n=64, fail_at=33), chunk_size=8, num_workers=2, progress=False)
    state = read_log(str(tmp_path / "cached" / "ragged"))
    assert state is not None and 0 < state.committed <= 4


def _paths(doc, prefix=()):
    """Every (path, value) in a JSON document."""
    yield prefix, doc
    if isinstance(doc, dict):
        for k, v in doc.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(doc, list):
        for n, v in enumerate(doc):
            yield from _paths(v, prefix + (n,))


def _set(doc, path, value):
    for p in path[:-1]:
        doc = doc[p]
    doc[path[-1]] = value


def test_type_confusion_in_a_vouched_for_manifest_is_always_a_corrupt_cache_error(tmp_path):
    """Valid JSON of the wrong shape, with a correct checksum (anyone can recompute it):
    opening, reading, labels, batches and verify raise CorruptCacheError, nothing else."""
    import json

    from edcache.errors import EdcacheError
    from edcache.format.columnar.manifest import _canonical, checksum

    ds = CachedDataset(Ragged(tmp_path, n=24, vary=True), chunk_size=8, num_workers=0, progress=False)
    path = os.path.join(ds.path, "manifest.json")
    original = json.loads(open(path, "rb").read())
    confusions = [None, -1, 2**70, "x", [1, "a"], {"a": 1}, 1.5]
    tried = 0
    for where, _ in list(_paths(original)):
        if not where or where == ("xxh3",):
            continue
        for bad in confusions:
            doc = json.loads(json.dumps(original))
            _set(doc, where, bad)
            doc.pop("xxh3")
            doc["xxh3"] = checksum(_canonical(doc))
            with open(path, "wb") as f:
                f.write(_canonical(doc))
            tried += 1
            for attempt in (lambda: ColumnarReader(ds.path).read(5), lambda: ColumnarReader(ds.path).labels,
                            lambda: ColumnarReader(ds.path).read_batch(np.arange(24)),
                            lambda: verify_cache(ds.path, deep=True)):
                try:
                    attempt()
                except EdcacheError:
                    pass
    assert tried > 150


def test_a_fifo_in_an_edflow_folder_cache_is_an_error_not_a_hang(tmp_path):
    import pickle

    from edcache.format import open_reader

    folder = tmp_path / "cached" / "old"
    folder.mkdir(parents=True)
    (folder / "example_0.p").write_bytes(pickle.dumps({"a": 1}))
    os.mkfifo(folder / "example_1.p")
    result: list = []

    def attempt():
        reader = open_reader(str(folder))
        result.append(reader.read(0))
        try:
            reader.read(1)
        except CorruptCacheError as exc:
            result.append(exc)

    t = threading.Thread(target=attempt, daemon=True)
    t.start()
    t.join(20)
    assert not t.is_alive(), "a FIFO blocked the reader"
    assert result[0]["a"] == 1 and "not a regular file" in str(result[1])


@pytest.mark.timeout(60)
@pytest.mark.parametrize("complete", [True, False])
def test_a_manifest_declaring_a_huge_length_is_checked_in_bounded_time(tmp_path, complete):
    """Issue 16 item 12: declared sizes are compared with the files before anything is
    iterated (a crafted manifest, checksum recomputed, length 10**12)."""
    import json

    from edcache.format.columnar.manifest import _canonical, checksum

    if complete:
        ds = CachedDataset(Ragged(tmp_path, n=24), chunk_size=8, num_workers=0, progress=False)
        path = ds.path
    else:
        with pytest.raises(ExampleError):
            CachedDataset(Ragged(tmp_path, n=24, fail_at=20), chunk_size=8, num_workers=0, progress=False)
        path = str(tmp_path / "cached" / "ragged")
    doc = json.loads(open(os.path.join(path, "manifest.json"), "rb").read())
    doc["length"] = 10**12
    doc.pop("xxh3")
    doc["xxh3"] = checksum(_canonical(doc))
    with open(os.path.join(path, "manifest.json"), "wb") as f:
        f.write(_canonical(doc))
    report = verify_cache(path)
    assert not report.ok or not complete
    reader = ColumnarReader(path)
    with pytest.raises((CorruptCacheError, KeyError)):
        reader.read(10**12 - 1)
    with pytest.raises((CorruptCacheError, KeyError)):
        reader.labels
