"""Optional: edflow 0.4.0 itself reads the zips edcache writes, and edcache reads edflow's.

Runs only when ``EDCACHE_EDFLOW_PYTHON`` names a Python interpreter with edflow 0.4.0
installed (it needs ``numpy<1.24`` and chainer 7.8.1, built with ``setuptools<70`` and
``--no-build-isolation``); otherwise skipped. Not needed by CI.
"""

from __future__ import annotations

import os
import subprocess
import zipfile

import pytest

from edcache import CachedDataset
from edcache.convert import convert
from edcache.format.legacy import safe_loads
from legacy_writer import IN_MEMORY_KEYS, EdflowLikeDataset, assert_same, edflow_example, edflow_labels

EDFLOW_PYTHON = os.environ.get("EDCACHE_EDFLOW_PYTHON")
pytestmark = pytest.mark.skipif(not EDFLOW_PYTHON, reason="set EDCACHE_EDFLOW_PYTHON to a Python with edflow 0.4.0")

READ_WITH_EDFLOW = """
import pickle, sys
import numpy
assert numpy.__version__ < "1.24", numpy.__version__
from edflow.data.util.cached_dset import CachedDataset
ds = CachedDataset.from_cache(sys.argv[1], sys.argv[2])
out = {"len": len(ds), "examples": [ds[i] for i in range(len(ds))], "labels": ds.labels}
sys.stdout.buffer.write(pickle.dumps(out, protocol=4))
"""

N = 11


def _edflow_reads(root, name):
    proc = subprocess.run([EDFLOW_PYTHON, "-c", READ_WITH_EDFLOW, root, name], capture_output=True)
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    return safe_loads(proc.stdout, member="edflow's output")  # pickled under numpy 1.23


def _check(got, n=N):
    assert got["len"] == n
    for i, example in enumerate(got["examples"]):
        assert int(example.pop("index_")) == i
        expected = edflow_example(i)
        del expected["index_"]
        assert_same(example, expected, f"example {i}")
    assert got["labels"] == edflow_labels(n, IN_MEMORY_KEYS)


def test_edflow_reads_a_zip_edcache_built(tmp_path):
    CachedDataset(EdflowLikeDataset(str(tmp_path), "faces", N), _legacy=True, chunk_size=4,
                  num_workers=0, progress=False)
    _check(_edflow_reads(str(tmp_path), "faces"))


def test_edflow_reads_a_zip_converted_from_the_new_format(tmp_path):
    root = str(tmp_path)
    CachedDataset(EdflowLikeDataset(root, "faces", N), chunk_size=4, num_workers=0, progress=False)
    convert(os.path.join(root, "cached", "faces"), os.path.join(root, "out", "cached", "faces.zip"),
            progress=False)
    _check(_edflow_reads(os.path.join(root, "out"), "faces"))


# edflow's own caching: its queue server in a thread (cache_dataset), two worker
# processes running pickle_and_queue, as `edcache --server` / `edcache --address` did.
WRITE_WITH_EDFLOW = """
import functools, multiprocessing as mp, socket, sys, threading, time
sys.path.insert(0, sys.argv[3])
from edflow.data.dataset_mixin import DatasetMixin
import edflow.data.util.cached_dset as cd
import legacy_writer as W

ROOT, N = sys.argv[1], int(sys.argv[2])


class Data(DatasetMixin):
    root, name, in_memory_keys = ROOT, "faces", W.IN_MEMORY_KEYS

    def __len__(self):
        return N

    def get_example(self, i):
        example = W.edflow_example(int(i))
        del example["index_"]
        return example


def factory():
    return Data()


def worker(port):
    m = cd.make_client_manager("127.0.0.1", port)
    cd.pickle_and_queue(factory, m.get_inqueue(), m.get_outqueue())


if __name__ == "__main__":
    s = socket.socket(); s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]; s.close()
    cd.make_server_manager = functools.partial(cd.make_server_manager, port=port)
    t = threading.Thread(target=lambda: cd.CachedDataset(Data(), chunk_size=4).cache_dataset())
    t.start()
    while True:  # wait until the chunks are queued
        try:
            m = cd.make_client_manager("127.0.0.1", port)
            if m.get_inqueue().qsize() > 0:
                break
        except (ConnectionRefusedError, OSError):
            pass
        time.sleep(0.2)
    procs = [mp.get_context("fork").Process(target=worker, args=(port,)) for _ in range(2)]
    [p.start() for p in procs]
    [p.join() for p in procs]
    t.join()
"""


def test_edcache_reads_a_zip_edflow_built(tmp_path):
    tests = os.path.dirname(os.path.abspath(__file__))
    proc = subprocess.run([EDFLOW_PYTHON, "-c", WRITE_WITH_EDFLOW, str(tmp_path), str(N), tests],
                          capture_output=True, timeout=240)
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    path = tmp_path / "cached" / "faces.zip"
    with zipfile.ZipFile(path) as zf:
        assert {info.compress_type for info in zf.infolist()} == {zipfile.ZIP_DEFLATED}
        assert zf.namelist()[-1] == "labels.p"
    ds = CachedDataset.from_cache(str(tmp_path), "faces")
    assert len(ds) == N
    for i in range(N):
        assert_same(ds.store.read(i), edflow_example(i), f"example {i}")  # index_ is numpy.int64
        assert ds[i]["index_"] == i
    for key, values in edflow_labels(N, IN_MEMORY_KEYS).items():
        assert ds.labels[key].tolist() == values
