"""Writing edflow 0.4 zips: exact layout, readable by edflow's own reader, crash-safe, resumable."""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import zipfile

import numpy as np
import pytest

from edcache import CachedDataset
from edcache.errors import BuildError, LabelError
from edcache.format.base import ChunkTask
from edcache.format.legacy import LegacyZipReader, LegacyZipSink, safe_loads
from legacy_writer import (
    IN_MEMORY_KEYS,
    EdflowLikeDataset,
    assert_same,
    cut_central_directory,
    edflow_example,
    edflow_labels,
    edflow_read,
    edflow_run,
)

TESTS = os.path.dirname(os.path.abspath(__file__))
N = 23


def stored(i):
    """What the writer stores for index i of EdflowLikeDataset (``index_`` set by the dataset)."""
    example = edflow_example(i)
    example["index_"] = i
    return example


def _check_layout(path, n, keys):
    with zipfile.ZipFile(path) as zf:
        infos = zf.infolist()
        assert zf.comment == b""
    names = [info.filename for info in infos]
    assert names[-1] == "labels.p" and names.count("labels.p") == 1
    assert sorted(names[:-1]) == sorted(f"example_{i}.p" for i in range(n))
    assert all(info.compress_type == zipfile.ZIP_DEFLATED for info in infos)
    assert not any(info.is_dir() for info in infos)
    with zipfile.ZipFile(path) as zf:
        for name in names:
            data = zf.read(name)
            assert data[:2] == b"\x80\x04", name  # protocol 4
            assert b"numpy._core" not in data, name  # numpy < 1.24 (edflow 0.4) has no numpy._core
        raw = safe_loads(zf.read("labels.p"), member="labels.p")
    assert list(raw) == keys and all(type(v) is list and len(v) == n for v in raw.values())


@pytest.mark.parametrize("num_workers", [0, 2])
def test_cached_dataset_writes_edflow_layout(tmp_path, num_workers):
    dataset = EdflowLikeDataset(str(tmp_path), "faces", N)
    ds = CachedDataset(dataset, _legacy=True, chunk_size=4, num_workers=num_workers, progress=False)
    path = str(tmp_path / "cached" / "faces.zip")
    assert ds.path == path
    leftovers = [f for f in os.listdir(tmp_path / "cached") if f != "faces.zip" and not f.endswith(".lock")]
    assert leftovers == []  # no .partial, no temporary files
    _check_layout(path, N, IN_MEMORY_KEYS)
    examples, labels = edflow_read(path)  # edflow's own way of reading
    for i in range(N):
        assert_same(examples[i], stored(i), f"example {i}")
    assert labels == edflow_labels(N, IN_MEMORY_KEYS)
    again = CachedDataset.from_cache(str(tmp_path), "faces", _legacy=True)
    assert_same(again[5], stored(5))
    assert again.labels["label"].tolist() == [i % 3 for i in range(N)]


def test_no_in_memory_keys_writes_empty_labels(tmp_path):
    CachedDataset(EdflowLikeDataset(str(tmp_path), "x", 5, keys=[]), _legacy=True, num_workers=0, progress=False)
    _check_layout(str(tmp_path / "cached" / "x.zip"), 5, [])
    assert edflow_read(str(tmp_path / "cached" / "x.zip"))[1] == {}


KILLED_BUILD = """
import sys
sys.path.insert(0, {tests!r})
from edcache import CachedDataset
from legacy_writer import EdflowLikeDataset
ds = EdflowLikeDataset({root!r}, "faces", {n}, kill_at={kill_at})
CachedDataset(ds, _legacy=True, chunk_size=4, num_workers=0, progress=False, force_cache=True,
              keep_existing={keep})
"""


def _killed_build(root, kill_at, keep=True):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    script = KILLED_BUILD.format(tests=TESTS, root=root, n=N, kill_at=kill_at, keep=keep)
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr


def test_sigkill_mid_build_leaves_no_broken_zip_and_resumes(tmp_path):
    root = str(tmp_path)
    _killed_build(root, kill_at=13)  # chunks 0..2 (indices 0..11) are committed
    path = str(tmp_path / "cached" / "faces.zip")
    assert not os.path.exists(path)  # never a zip without central directory at the cache path
    assert os.path.exists(path + ".partial")
    leftover = tmp_path / "cached" / ".tmp-faces.zip.chunk3-0123"  # a staged chunk of the dead run
    leftover.write_bytes(b"x")
    sink = LegacyZipSink(path, N, IN_MEMORY_KEYS, keep_existing=True, chunk_size=4)
    assert sink.committed() == {0, 1, 2}
    assert not leftover.exists()
    sink.close()
    dataset = EdflowLikeDataset(root, "faces", N)
    ds = CachedDataset(dataset, _legacy=True, chunk_size=4, num_workers=0, progress=False)
    assert sorted(dataset.calls) == list(range(12, N))  # committed chunks were not recomputed
    _check_layout(path, N, IN_MEMORY_KEYS)
    assert not os.path.exists(path + ".partial")
    for i in range(N):
        assert_same(ds[i], stored(i))
    assert edflow_read(path)[1] == edflow_labels(N, IN_MEMORY_KEYS)  # labels of kept chunks too


def test_sigkill_while_rebuilding_keeps_the_old_zip(tmp_path):
    root = str(tmp_path)
    path = str(tmp_path / "cached" / "faces.zip")
    CachedDataset(EdflowLikeDataset(root, "faces", N), _legacy=True, chunk_size=4, num_workers=0, progress=False)
    before = open(path, "rb").read()
    _killed_build(root, kill_at=9, keep=False)
    assert open(path, "rb").read() == before
    with zipfile.ZipFile(path) as zf:
        assert zf.testzip() is None


def test_resume_from_an_interrupted_edflow_run(tmp_path):
    path = str(tmp_path / "cached" / "faces.zip")
    written = edflow_run(path, N, stop_after=9)  # edflow's KeyboardInterrupt: valid zip, no labels.p
    dataset = EdflowLikeDataset(str(tmp_path), "faces", N)
    ds = CachedDataset(dataset, _legacy=True, chunk_size=4, num_workers=0, progress=False)
    kept = {i for i in written}
    assert set(dataset.calls) == set(range(N)) - kept  # only the missing examples (edflow's promise)
    _check_layout(path, N, IN_MEMORY_KEYS)
    examples, labels = edflow_read(path)
    for i in written:
        assert_same(examples[i], edflow_example(i))  # kept as edflow wrote it (index_ int64)
    assert labels == edflow_labels(N, IN_MEMORY_KEYS)
    assert len(ds) == N


def test_resume_from_a_killed_edflow_run_without_central_directory(tmp_path):
    path = str(tmp_path / "cached" / "faces.zip")
    written = edflow_run(path, N, stop_after=12)
    cut_central_directory(path, partial_last_member=True)  # the last member was mid-write
    kept = set(written[:-1])
    sink = LegacyZipSink(path, N, IN_MEMORY_KEYS, keep_existing=True, chunk_size=4)
    committed = sink.committed()
    assert committed == {c for c in range(6) if set(range(4 * c, min(4 * c + 4, N))) <= kept}
    for c in sorted(set(range(6)) - committed):
        sink.commit(_chunk(sink, c))
    sink.finalize()
    _check_layout(path, N, IN_MEMORY_KEYS)
    reader = LegacyZipReader(path)
    assert [reader.read(i)["name"] for i in range(N)] == [f"img_{i:04d}" for i in range(N)]
    assert reader.labels["score"].tolist() == [i / 7 for i in range(N)]


def test_keep_existing_false_recomputes_everything(tmp_path):
    path = str(tmp_path / "cached" / "faces.zip")
    edflow_run(path, N, stop_after=12)
    dataset = EdflowLikeDataset(str(tmp_path), "faces", N)
    CachedDataset(dataset, _legacy=True, keep_existing=False, chunk_size=4, num_workers=0, progress=False)
    assert sorted(dataset.calls) == list(range(N))
    _check_layout(path, N, IN_MEMORY_KEYS)


# -- the sink on its own ------------------------------------------------------------------------

def _chunk(sink, c, staged=False):
    task = ChunkTask(c, 4 * c, min(4 * c + 4, sink.length))
    return sink.encoder(staged=staged).encode(task, [stored(i) for i in range(task.start, task.stop)])


def test_sink_commits_are_idempotent_and_staged_files_are_removed(tmp_path):
    path = str(tmp_path / "x.zip")
    sink = LegacyZipSink(path, 10, ["label"], keep_existing=True, chunk_size=4)
    assert sink.committed() == set()
    encoder = sink.encoder(staged=True)
    assert pickle.loads(pickle.dumps(encoder)) == encoder
    first = _chunk(sink, 0, staged=True)
    assert first.data is None and os.path.isfile(first.staged_path)
    assert sink.commit(first) and not os.path.exists(first.staged_path)
    duplicate = _chunk(sink, 0, staged=True)
    assert sink.commit(duplicate) is False and not os.path.exists(duplicate.staged_path)
    for c in (2, 1):
        assert sink.commit(_chunk(sink, c))
    assert sink.committed() == {0, 1, 2}
    sink.finalize()
    sink.close()
    reader = LegacyZipReader(path)
    assert len(reader) == 10 and reader.labels["label"].tolist() == [i % 3 for i in range(10)]
    names = reader.zipfile.namelist()
    assert names[:4] == [f"example_{i}.p" for i in range(4)] and names[4] == "example_8.p"  # commit order


def test_sink_rejects_damaged_results_and_missing_chunks(tmp_path):
    sink = LegacyZipSink(str(tmp_path / "x.zip"), 8, [], keep_existing=True, chunk_size=4)
    result = _chunk(sink, 0)
    result.data = result.data[:-1] + b"!"
    with pytest.raises(BuildError, match="chunk 0"):
        sink.commit(result)
    sink.commit(_chunk(sink, 1))
    with pytest.raises(BuildError, match="missing"):
        sink.finalize()
    sink.close()
    assert not os.path.exists(str(tmp_path / "x.zip"))


def test_encoder_names_a_missing_label_key(tmp_path):
    sink = LegacyZipSink(str(tmp_path / "x.zip"), 4, ["nope"], keep_existing=True, chunk_size=4)
    with pytest.raises(LabelError, match="example 0 .*'nope'"):
        sink.encoder(staged=False).encode(ChunkTask(0, 0, 4), [stored(i) for i in range(4)])


def test_sink_drops_out_of_range_members_and_old_labels(tmp_path):
    path = str(tmp_path / "x.zip")
    edflow_run(path, 12)
    sink = LegacyZipSink(path, 8, ["label"], keep_existing=True, chunk_size=4)
    assert sink.committed() == {0, 1}
    sink.finalize()
    examples, labels = edflow_read(path)
    assert len(examples) == 8 and labels == {"label": [i % 3 for i in range(8)]}
    assert isinstance(examples[0]["image"], np.ndarray)
