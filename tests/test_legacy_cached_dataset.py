"""Reading edflow caches through the public API: CachedDataset.from_cache, PathCachedDataset, cachable."""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import zipfile

import numpy as np
import pytest

from edcache import CachedDataset, PathCachedDataset, cachable
from edcache.errors import UnsafePickleError
from edcache.format.legacy import ExamplesFolder
from legacy_writer import (
    IN_MEMORY_KEYS,
    assert_same,
    edflow_example,
    edflow_view,
    edflow_labels,
    edflow_run,
    write_cachable,
    write_edflow_folder,
)

N = 30


@pytest.fixture
def root(tmp_path):
    edflow_run(str(tmp_path / "cached" / "faces.zip"), N)
    return str(tmp_path)


@pytest.mark.parametrize("legacy", [{}, {"_legacy": True}, {"_legacy": None}], ids=["default", "true", "none"])
@pytest.mark.parametrize("protocol", [3, 4])
def test_from_cache_reads_edflow_zips(tmp_path, legacy, protocol):
    edflow_run(str(tmp_path / "cached" / "faces.zip"), N, protocol=protocol)
    ds = CachedDataset.from_cache(str(tmp_path), "faces", **legacy)
    assert len(ds) == N
    for i in range(N):
        assert_same(ds[i], edflow_view(i), f"example {i}")
    assert_same(ds[-1], edflow_view(N - 1))
    assert [ex["index_"] for ex in ds[2:5]] == [2, 3, 4]
    labels = ds.labels
    for key, values in edflow_labels(N, IN_MEMORY_KEYS).items():
        assert labels[key].tolist() == values
    assert (labels["split"] == "train").sum() == sum(i % 4 != 0 for i in range(N))


def test_from_cache_duplicate_labels_and_no_labels(tmp_path):
    edflow_run(str(tmp_path / "cached" / "a.zip"), 5)
    edflow_run(str(tmp_path / "cached" / "a.zip"), 5, ["score"])
    assert list(CachedDataset.from_cache(str(tmp_path), "a").labels) == ["score"]
    edflow_run(str(tmp_path / "cached" / "b.zip"), 5, [])
    assert CachedDataset.from_cache(str(tmp_path), "b").labels == {}


def test_from_cache_partial_zip(tmp_path):
    written = edflow_run(str(tmp_path / "cached" / "p.zip"), N, stop_after=14)
    ds = CachedDataset.from_cache(str(tmp_path), "p", _legacy=True)
    assert len(ds) == 14
    present = sorted(i for i in written if i < 14)
    assert_same(ds[present[0]], edflow_view(present[0]))
    absent = sorted(set(range(14)) - set(written))[0]
    with pytest.raises(KeyError, match=f"example_{absent}.p"):
        ds[absent]
    with pytest.raises(KeyError, match="labels.p"):
        ds.labels


def test_from_cache_on_an_examples_folder(tmp_path):
    write_edflow_folder(str(tmp_path / "cached" / "faces"), 6)
    ds = CachedDataset.from_cache(str(tmp_path), "faces", _legacy=False)
    assert len(ds) == 6
    assert_same(ds[4], edflow_view(4))
    assert ds.labels["label"].tolist() == [i % 3 for i in range(6)]
    assert isinstance(ExamplesFolder(ds.path).read("example_0.p"), bytes)


def test_path_cached_dataset_and_cachable_read_edflow_cachable_output(tmp_path):
    path = str(tmp_path / "data.zip")
    write_cachable(path, 9, args=(3,), kwargs={})
    ds = PathCachedDataset(None, path)
    assert len(ds) == 9
    assert_same(ds[8], edflow_view(8))

    @cachable(path)
    def make(size):
        raise AssertionError("the cache is complete: the dataset must not be constructed")

    cached = make(3)
    assert len(cached) == 9 and cached.labels["label"].tolist() == [i % 3 for i in range(9)]


def _read(ds, i):
    return ds[i]["name"], os.getpid()


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_cached_dataset_on_a_legacy_zip_pickles_and_works_in_workers(root, method):
    ds = CachedDataset.from_cache(root, "faces")
    ds[0]  # open the zip in the parent first
    clone = pickle.loads(pickle.dumps(ds))
    assert_same(clone[3], edflow_view(3))
    assert_same(ds[4], edflow_view(4))  # the original still works (edflow broke here)
    with mp.get_context(method).Pool(2) as pool:
        results = pool.starmap(_read, [(ds, i) for i in range(N)])
    assert [name for name, _ in results] == [f"img_{i:04d}" for i in range(N)]
    assert os.getpid() not in {pid for _, pid in results}
    zf = ds.fork_safe_zip  # a per-process ZipFile, as in edflow
    assert isinstance(zf, zipfile.ZipFile) and zf.read("example_0.p")


def _identity(x):
    return x


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_dataloader_workers_on_a_legacy_zip(root, method):
    torch = pytest.importorskip("torch")
    ds = CachedDataset.from_cache(root, "faces")
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2, collate_fn=_identity,
                                         multiprocessing_context=method)
    got = list(loader)
    assert len(got) == N
    for i, example in enumerate(got):
        assert_same(example, edflow_view(i), f"example {i}")


class Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_never_runs_through_the_public_api(tmp_path):
    marker = tmp_path / "pwned"
    evil = pickle.dumps({"x": Payload(str(marker))})
    path = tmp_path / "cached" / "evil.zip"
    path.parent.mkdir()
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("example_0.p", evil)
        zf.writestr("labels.p", evil)
    folder = tmp_path / "cached" / "evilfolder"
    folder.mkdir()
    (folder / "example_0.p").write_bytes(evil)
    (folder / "labels.p").write_bytes(evil)
    attempts = [
        lambda: CachedDataset.from_cache(str(tmp_path), "evil")[0],
        lambda: CachedDataset.from_cache(str(tmp_path), "evil", _legacy=True).labels,
        lambda: CachedDataset.from_cache(str(tmp_path), "evilfolder", _legacy=False)[0],
        lambda: CachedDataset.from_cache(str(tmp_path), "evilfolder").labels,
        lambda: PathCachedDataset(None, str(path))[0],
    ]
    for attempt in attempts:
        with pytest.raises(UnsafePickleError) as info:
            attempt()
        assert f"{os.system.__module__}.system" in str(info.value)
        assert "allow_pickle=True" in str(info.value)
        assert "example_0.p" in str(info.value) or "labels.p" in str(info.value)
    assert not marker.exists()


def _snapshot(folder):
    out = {}
    for d, _, files in os.walk(folder):
        for f in files:
            p = os.path.join(d, f)
            with open(p, "rb") as fh:
                out[p] = (os.stat(p).st_mtime_ns, fh.read())
    return out


def test_reading_a_legacy_cache_never_writes(root):
    write_edflow_folder(os.path.join(root, "cached", "folder"), 3)
    before = _snapshot(root)
    ds = CachedDataset.from_cache(root, "faces")
    [ds[i] for i in range(N)]
    ds.labels
    pickle.loads(pickle.dumps(ds))[1]
    folder = CachedDataset.from_cache(root, "folder", _legacy=False)
    folder[2], folder.labels
    assert _snapshot(root) == before
    assert sorted(os.listdir(os.path.join(root, "cached"))) == ["faces.zip", "folder"]


def test_labels_are_numpy_arrays(root):
    labels = CachedDataset.from_cache(root, "faces").labels
    assert isinstance(labels["label"], np.ndarray) and labels["label"].shape == (N,)
