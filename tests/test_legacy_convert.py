"""``convert``: edflow zip / folder <-> the new format, with salvage and verification."""

from __future__ import annotations

import os
import pickle
import zipfile
from dataclasses import dataclass

import pytest

from edcache import CachedDataset
from edcache.convert import convert
from edcache.errors import CodecError, CorruptCacheError, IncompleteCacheError, UnsafePickleError
from edcache.format.legacy import LegacyZipReader
from legacy_writer import (
    IN_MEMORY_KEYS,
    EdflowLikeDataset,
    assert_same,
    cut_central_directory,
    edflow_dumps,
    edflow_example,
    edflow_view,
    edflow_labels,
    edflow_read,
    edflow_run,
    write_edflow_folder,
)

N = 26


def _check_new_format(root, name, n=N, keys=IN_MEMORY_KEYS):
    ds = CachedDataset.from_cache(root, name)
    assert ds.path == os.path.join(root, "cached", name) and os.path.isdir(ds.path)
    assert len(ds) == n
    for i in range(n):
        assert_same(ds[i], edflow_view(i), f"example {i}")
    labels = ds.labels
    assert list(labels) == keys
    for key, values in edflow_labels(n, keys).items():
        assert labels[key].tolist() == values


@pytest.mark.parametrize("protocol,numpy1", [(4, True), (3, True), (4, False)])
def test_edflow_zip_to_new_format(tmp_path, protocol, numpy1):
    root = str(tmp_path)
    edflow_run(os.path.join(root, "cached", "faces.zip"), N, protocol=protocol, numpy1=numpy1)
    convert(os.path.join(root, "cached", "faces.zip"), os.path.join(root, "cached", "faces"), progress=False)
    _check_new_format(root, "faces")
    with pytest.raises(FileExistsError):  # a complete cache is never overwritten
        convert(os.path.join(root, "cached", "faces.zip"), os.path.join(root, "cached", "faces"), progress=False)


def test_edflow_folder_to_new_format_and_to_zip(tmp_path):
    root = str(tmp_path)
    write_edflow_folder(os.path.join(root, "src", "faces"), N)
    convert(os.path.join(root, "src", "faces"), os.path.join(root, "cached", "faces"), progress=False)
    _check_new_format(root, "faces")
    convert(os.path.join(root, "src", "faces"), os.path.join(root, "cached", "zipped.zip"), progress=False)
    examples, labels = edflow_read(os.path.join(root, "cached", "zipped.zip"))
    assert_same(examples[4], edflow_example(4))
    assert labels == edflow_labels(N, IN_MEMORY_KEYS)


def test_new_format_to_edflow_zip(tmp_path):
    root = str(tmp_path)
    CachedDataset(EdflowLikeDataset(root, "faces", N), chunk_size=8, num_workers=0, progress=False)
    dst = os.path.join(root, "cached", "faces.zip")
    convert(os.path.join(root, "cached", "faces"), dst, progress=False)
    examples, labels = edflow_read(dst)  # as edflow 0.4 reads it
    for i in range(N):
        assert_same(examples[i], edflow_view(i), f"example {i}")
    assert labels == edflow_labels(N, IN_MEMORY_KEYS)
    with zipfile.ZipFile(dst) as zf:
        assert zf.namelist()[-1] == "labels.p"
        assert all(info.compress_type == zipfile.ZIP_DEFLATED for info in zf.infolist())
        assert not any(b"numpy._core" in zf.read(n) for n in zf.namelist())
    ds = CachedDataset.from_cache(root, "faces", _legacy=True)
    assert ds.path == dst and len(ds) == N
    with pytest.raises(ValueError, match=".zip"):
        convert(os.path.join(root, "cached", "faces"), os.path.join(root, "cached", "again"), progress=False)


def test_killed_edflow_zip_salvaged_to_new_format(tmp_path):
    root = str(tmp_path)
    src = os.path.join(root, "old", "faces.zip")
    edflow_run(src, N)
    cut_central_directory(src)  # every member complete, central directory missing
    convert(src, os.path.join(root, "cached", "faces"), progress=False)
    _check_new_format(root, "faces")


def test_killed_edflow_zip_with_holes_salvaged_to_zip_then_completed(tmp_path):
    root = str(tmp_path)
    src = os.path.join(root, "old", "faces.zip")
    written = edflow_run(src, N, stop_after=15)  # two workers: indices 0..7 and 12..18
    cut_central_directory(src, partial_last_member=True)
    salvaged = written[:-1]
    with pytest.raises(IncompleteCacheError, match=r"lacks example \d+.*\.zip"):
        convert(src, os.path.join(root, "cached", "faces"), progress=False)
    dst = os.path.join(root, "cached", "faces.zip")
    convert(src, dst, progress=False)
    reader = LegacyZipReader(dst)
    assert len(reader) == len(salvaged) and not reader.complete
    for i in salvaged:
        assert_same(reader.read(i), edflow_example(i))
    # The zip resumes like any interrupted legacy cache.
    dataset = EdflowLikeDataset(root, "faces", N)
    ds = CachedDataset(dataset, _legacy=True, chunk_size=4, num_workers=0, progress=False)
    assert set(dataset.calls) < set(range(N))
    assert [ds[i]["name"] for i in range(N)] == [f"img_{i:04d}" for i in range(N)]
    assert ds.labels["label"].tolist() == [i % 3 for i in range(N)]


class Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("dst", ["cached/x", "cached/x.zip"])
def test_convert_never_runs_a_malicious_pickle(tmp_path, dst):
    marker = tmp_path / "pwned"
    src = tmp_path / "evil.zip"
    with zipfile.ZipFile(src, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("example_0.p", pickle.dumps({"x": Payload(str(marker))}))
        zf.writestr("labels.p", edflow_dumps({}))
    with pytest.raises(UnsafePickleError) as info:
        convert(str(src), str(tmp_path / dst), progress=False)
    assert "example_0.p" in str(info.value) and f"{os.system.__module__}.system" in str(info.value)
    assert not marker.exists()
    assert not os.path.exists(tmp_path / "cached" / "x.zip")


@dataclass
class Point:
    x: int


def test_allow_pickle_trusts_the_source(tmp_path):
    src = tmp_path / "trusted.zip"
    with zipfile.ZipFile(src, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("example_0.p", pickle.dumps({"p": Point(1)}))
        zf.writestr("labels.p", edflow_dumps({}))
    with pytest.raises(UnsafePickleError, match="Point"):
        convert(str(src), str(tmp_path / "a.zip"), progress=False)
    convert(str(src), str(tmp_path / "a.zip"), allow_pickle=True, progress=False)
    assert LegacyZipReader(str(tmp_path / "a.zip"), allow_pickle=True).read(0) == {"p": Point(1)}
    with pytest.raises(CodecError):  # the new format stores no pickles unless asked to
        convert(str(src), str(tmp_path / "cached" / "b"), allow_pickle=True, progress=False)


def test_cli_convert_salvages_a_killed_zip(tmp_path, capsys):
    from edcache.cli.main import main

    root = str(tmp_path)
    src = os.path.join(root, "old", "cached", "faces.zip")
    edflow_run(src, N)
    cut_central_directory(src)
    with pytest.raises(CorruptCacheError, match=f"{src}.*edcache convert"):
        CachedDataset.from_cache(os.path.join(root, "old"), "faces")  # the error says how to recover
    assert main(["convert", src, os.path.join(root, "cached", "faces"), "--no-progress"]) == 0
    _check_new_format(root, "faces")
    evil = tmp_path / "evil.zip"
    with zipfile.ZipFile(evil, "w") as zf:
        zf.writestr("example_0.p", pickle.dumps({"x": Payload(str(tmp_path / "pwned"))}))
    assert main(["convert", str(evil), str(tmp_path / "out.zip"), "--no-progress"]) == 1
    assert "allow_pickle=True" in capsys.readouterr().err
    assert not (tmp_path / "pwned").exists()
