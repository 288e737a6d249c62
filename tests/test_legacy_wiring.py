"""CachedDataset / cachable on edflow zips: side files, killed zips, fork_safe_zip."""

from __future__ import annotations

import os
import pickle
import zipfile

import pytest

from edcache import CachedDataset, PathCachedDataset, cachable
from edcache.errors import CacheMismatchError
from legacy_writer import (
    EdflowLikeDataset,
    assert_same,
    cut_central_directory,
    edflow_example,
    edflow_read,
    edflow_run,
    write_cachable,
)


def test_cachable_zip_writes_edflow_side_files_and_reopens(tmp_path):
    path = str(tmp_path / "faces.zip")
    calls = []

    @cachable(path, num_workers=0, progress=False)
    def make(n, flip=False):
        calls.append(n)
        return EdflowLikeDataset(str(tmp_path), "faces", n)

    first = make(20, flip=True)
    assert pickle.loads(open(path + ".p", "rb").read()) == 20  # edflow's completion marker
    assert pickle.loads(open(path + "parameters.p", "rb").read()) == ((20,), {"flip": True})
    examples, _ = edflow_read(path)  # what edflow itself reads
    assert len(examples) == 20
    again = make(20, flip=True)
    assert calls == [20]
    assert_same(again[7], first[7])
    with pytest.raises(CacheMismatchError, match="with the arguments"):
        make(20, flip=False)


def test_path_cached_dataset_reads_edflow_cachable_length(tmp_path):
    path = str(tmp_path / "data.zip")
    write_cachable(path, 12, args=(3,), kwargs={"x": 1})
    ds = PathCachedDataset(None, path)
    assert len(ds) == 12
    assert ds[11]["index_"] == 11
    with pytest.raises(CacheMismatchError):
        cachable(path)(lambda n, x: None)(4, x=1)
    assert len(cachable(path)(lambda n, x: None)(3, x=1)) == 12


def test_legacy_build_over_a_killed_zip_salvages_and_completes(tmp_path):
    path = tmp_path / "cached" / "faces.zip"
    edflow_run(str(path), 30, stop_after=18)
    cut_central_directory(str(path), partial_last_member=True)
    with pytest.raises(zipfile.BadZipFile):
        zipfile.ZipFile(path)
    ds = CachedDataset(EdflowLikeDataset(str(tmp_path), "faces", 30), _legacy=True,
                       num_workers=0, progress=False)
    assert len(ds) == 30 and ds.complete
    examples, labels = edflow_read(str(path))
    assert len(examples) == 30 and not os.path.exists(str(path) + ".partial")
    for i in (0, 17, 29):
        assert_same(ds.store.read(i)["name"], edflow_example(i)["name"])
    assert isinstance(ds.fork_safe_zip, zipfile.ZipFile)
    assert ds.fork_safe_zip.read("example_3.p") == zipfile.ZipFile(path).read("example_3.p")
