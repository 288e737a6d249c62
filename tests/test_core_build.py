"""Building, opening, resuming and forcing caches through the public API."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest

from edcache import CachedDataset, DatasetMixin
from edcache.errors import (
    CacheMismatchError,
    DatasetInterfaceError,
    ExampleError,
    IncompleteCacheError,
    LabelError,
)
from core_datasets import Toy, expected
from helpers import assert_same, tree_bytes


def computed(log_dir):
    return sorted(int(name.split("-")[0]) for name in os.listdir(log_dir))


def test_build_open_read_labels(tmp_path):
    ds = CachedDataset(Toy(tmp_path, n=150), num_workers=0, progress=False)
    assert len(ds) == 150 and ds.complete
    for i in (0, 63, 64, 149):
        assert_same(ds[i], {**expected(i), "index_": i})
    assert ds[-1]["index_"] == 149
    assert [e["index_"] for e in ds[10:13]] == [10, 11, 12]
    assert [e["index_"] for e in ds[[5, 3]]] == [5, 3]
    assert [e["index_"] for e in ds[np.array([7, 140])]] == [7, 140]
    cls, split = ds.labels["cls"], ds.labels["split"]
    assert isinstance(cls, np.ndarray) and cls.dtype == np.int64
    np.testing.assert_array_equal(cls, np.arange(150) % 7)
    mask = split == "train"
    assert mask.dtype == bool and mask.sum() == sum(1 for i in range(150) if i % 4)
    assert ds.root == str(tmp_path)


def test_open_complete_cache_without_touching_examples(tmp_path):
    CachedDataset(Toy(tmp_path, n=100), num_workers=0, progress=False)
    log = tmp_path / "log"
    log.mkdir()
    again = CachedDataset(Toy(tmp_path, n=100, log_dir=str(log)), num_workers=0, progress=False)
    assert again[99]["cls"] == 99 % 7
    assert computed(log) == []
    same = CachedDataset.from_cache(str(tmp_path), "toy")
    assert_same(same[42], {**expected(42), "index_": 42})
    np.testing.assert_array_equal(same.labels["cls"], again.labels["cls"])


@pytest.mark.parametrize("workers", [1, 2])
def test_byte_identical_whatever_the_workers_and_directory(tmp_path, workers):
    CachedDataset(Toy(tmp_path / "a", n=300), num_workers=0, progress=False)
    CachedDataset(Toy(tmp_path / "b", n=300), num_workers=workers, chunk_size=64, progress=False)
    a, b = tree_bytes(tmp_path / "a" / "cached" / "toy"), tree_bytes(tmp_path / "b" / "cached" / "toy")
    assert a.keys() == b.keys() and a == b
    assert not any(".tmp-" in name for name in a)
    moved = tmp_path / "moved" / "cached"
    moved.mkdir(parents=True)
    shutil.move(str(tmp_path / "b" / "cached" / "toy"), str(moved / "toy"))
    ds = CachedDataset.from_cache(str(tmp_path / "moved"), "toy")
    assert_same(ds[299], {**expected(299), "index_": 299})


def test_dataset_error_names_index_keeps_chunks_and_resumes(tmp_path):
    log = tmp_path / "log"
    log.mkdir()
    with pytest.raises(ExampleError) as err:
        CachedDataset(Toy(tmp_path, n=200, fail_at=150, log_dir=str(log)), num_workers=0,
                      chunk_size=50, progress=False)
    assert err.value.index == 150
    assert "the dataset raised ValueError for index 150: broken example 150" in str(err.value)
    assert "Traceback" in err.value.remote_traceback and "get_example" in err.value.remote_traceback
    assert computed(log) == list(range(151))
    for name in os.listdir(log):
        os.unlink(log / name)
    ds = CachedDataset(Toy(tmp_path, n=200, log_dir=str(log)), num_workers=0, chunk_size=50, progress=False)
    assert computed(log) == list(range(150, 200))  # chunks 0..2 were kept
    assert_same(ds[199], {**expected(199), "index_": 199})


def test_dataset_error_in_pool_worker(tmp_path):
    with pytest.raises(ExampleError) as err:
        CachedDataset(Toy(tmp_path, n=200, fail_at=130), num_workers=2, progress=False)
    assert err.value.index == 130
    assert "broken example 130" in err.value.remote_traceback


def test_force_cache_semantics(tmp_path):
    log = tmp_path / "log"
    log.mkdir()
    CachedDataset(Toy(tmp_path, n=100), num_workers=0, progress=False)
    # "cls" (ints) is read from its column; "split" (str) has a label file
    labels_file = tmp_path / "cached" / "toy" / "labels" / "1.npy"
    os.unlink(labels_file)
    ds = CachedDataset(Toy(tmp_path, n=100, log_dir=str(log)), force_cache=True, num_workers=0, progress=False)
    assert computed(log) == []  # keep_existing: nothing recomputed, labels rewritten
    assert labels_file.exists() and len(ds.labels["split"]) == 100 and len(ds.labels["cls"]) == 100
    CachedDataset(Toy(tmp_path, n=100, log_dir=str(log)), force_cache=True, keep_existing=False,
                  num_workers=0, progress=False)
    assert computed(log) == list(range(100))


def test_mismatched_dataset_is_refused(tmp_path):
    CachedDataset(Toy(tmp_path, n=100), num_workers=0, progress=False)
    with pytest.raises(CacheMismatchError) as err:
        CachedDataset(Toy(tmp_path, n=120), num_workers=0, progress=False)
    assert str(err.value) == (
        f"the cache at {tmp_path}/cached/toy holds 100 examples, the dataset has 120: the dataset "
        "changed since the cache was built. Rebuild it with force_cache=True, keep_existing=False "
        "(CLI: --force --no-keep-existing)."
    )


def test_incomplete_cache_readable_for_committed_chunks(tmp_path):
    with pytest.raises(ExampleError):
        CachedDataset(Toy(tmp_path, n=200, fail_at=100), num_workers=0, chunk_size=50, progress=False)
    partial = CachedDataset.from_cache(str(tmp_path), "toy")
    assert not partial.complete and len(partial) == 200
    assert_same(partial[99], {**expected(99), "index_": 99})
    with pytest.raises(KeyError, match=r"examples 100\.\.149 \(chunk 2\) .* not cached yet"):
        partial[120]
    with pytest.raises(IncompleteCacheError):
        partial.labels


class NoName(DatasetMixin):
    root = "/tmp"

    def __len__(self):
        return 1

    def get_example(self, i):
        return {}


class BadKeys(Toy):
    in_memory_keys = ["cls", "missing"]


def test_interface_errors(tmp_path):
    with pytest.raises(DatasetInterfaceError, match="NoName cannot be cached: it has no name"):
        CachedDataset(NoName())
    with pytest.raises(LabelError, match=r"example 0 has no in_memory_key 'missing'"):
        CachedDataset(BadKeys(tmp_path, n=10), num_workers=0, progress=False)


def test_index_errors(tmp_path):
    ds = CachedDataset(Toy(tmp_path, n=10), num_workers=0, progress=False)
    with pytest.raises(IndexError, match="index 10 is out of range for a dataset of length 10"):
        ds[10]
    with pytest.raises(IndexError):
        ds[-11]
    with pytest.raises(TypeError, match="not float"):
        ds[1.0]
    with pytest.raises(TypeError, match="not bool"):
        ds[True]


def test_batched_reads(tmp_path):
    ds = CachedDataset(Toy(tmp_path, n=200), num_workers=0, progress=False)
    idx = [150, 3, 64, 3, 199]
    many = ds.__getitems__(idx)
    for i, ex in zip(idx, many):
        assert_same(ex, {**expected(i), "index_": i})
    batch = ds.get_batch(idx)
    assert batch["image"].shape == (5, 4, 5, 3)
    np.testing.assert_array_equal(batch["image"][:, 0, 0, 0], np.array(idx) % 251)
    np.testing.assert_array_equal(batch["cls"], np.array(idx) % 7)
    assert batch["split"] == ["train" if i % 4 else "test" for i in idx]
    np.testing.assert_array_equal(batch["index_"], idx)


def test_ragged_and_none_labels_come_back_as_lists(tmp_path):
    class Ragged(Toy):
        in_memory_keys = ["meta_len", "maybe"]

        def get_example(self, i):
            ex = super().get_example(i)
            return {**ex, "meta_len": np.arange(i % 3), "maybe": None if i % 2 else i}

    ds = CachedDataset(Ragged(tmp_path, n=10), num_workers=0, progress=False)
    assert isinstance(ds.labels["meta_len"], list) and len(ds.labels["meta_len"][2]) == 2
    assert ds.labels["maybe"][:3] == [0, None, 2]


