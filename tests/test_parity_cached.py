"""edflow parity of CachedDataset, PathCachedDataset and cachable (issue 11 items 4-8 and
13; issue 16 items 5-6)."""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import textwrap
import zipfile

import pytest
from filelock import FileLock

from edcache import CachedDataset, PathCachedDataset, cachable
from edcache.errors import CacheMismatchError, DatasetInterfaceError, ExampleError, IncompleteCacheError

from core_datasets import Toy
from legacy_writer import EdflowLikeDataset, edflow_run
from parity_datasets import Versioned

TESTS = os.path.dirname(os.path.abspath(__file__))
QUIET = dict(num_workers=0, progress=False)


def _run(script: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([TESTS, *sys.path]))
    return subprocess.run([sys.executable, "-c", textwrap.dedent(script)], env=env,
                          capture_output=True, text=True, timeout=120)


def _killed(script: str) -> None:
    proc = _run(script)
    assert proc.returncode == -signal.SIGKILL, proc.stderr


def _values(ds, key="v"):
    return [ds[i][key] for i in range(len(ds))]


# -- item 4: an explicit path needs no root or name -------------------------------------
@pytest.mark.parametrize("suffix", ["dir", "x.zip"])
def test_path_cached_dataset_without_root_or_name(tmp_path, suffix):
    path = str(tmp_path / "caches" / suffix)
    ds = PathCachedDataset(Versioned(n=5), path, **QUIET)
    assert _values(ds, "i") == [0, 1, 2, 3, 4]
    assert ds.path == path and ds.root == str(tmp_path / "caches")
    assert os.path.exists(path)

    @cachable(str(tmp_path / "other" / suffix), **QUIET)
    def make(n):
        return Versioned(n=n)

    assert _values(make(3), "i") == [0, 1, 2]
    assert _values(make(3), "i") == [0, 1, 2]  # opened, not rebuilt


# -- item 5: PathCachedDataset writes edflow's completion marker ------------------------
def test_path_cached_dataset_zip_writes_length_marker(tmp_path):
    path = str(tmp_path / "x.zip")
    PathCachedDataset(Versioned(n=7), path, **QUIET)
    with open(path + ".p", "rb") as f:
        assert pickle.load(f) == 7
    again = PathCachedDataset(None, path)
    assert len(again) == 7 and again[6]["i"] == 6


# -- item 6: cachable's worker mode ------------------------------------------------------
def test_cachable_worker_mode_returns_the_recorded_dataset_uncached(tmp_path):
    path = str(tmp_path / "w.zip")
    calls = []

    @cachable(path, **QUIET)
    def make(n, version=0):
        calls.append((n, version))
        return Versioned(n=n, version=version, root=str(tmp_path), name="w")

    with open(path + "parameters.p", "wb") as f:  # what the server recorded when it started
        pickle.dump(((4,), {"version": 3}), f)
    lock = FileLock(str(tmp_path / ".w.zip.lock"))  # the server is building
    lock.acquire()
    try:
        ds = make(99)  # a worker calls with whatever arguments: the recorded ones win
    finally:
        lock.release()
    assert isinstance(ds, Versioned) and not isinstance(ds, CachedDataset)
    assert len(ds) == 4 and ds[0]["v"] == 3 and calls == [(4, 3)]
    assert not os.path.exists(path) and not os.path.exists(path + ".p")


# -- issue 16.5: cachable zip resumed with other arguments -------------------------------
def test_cachable_zip_records_arguments_before_building_and_checks_them_on_resume(tmp_path):
    path = str(tmp_path / "c.zip")
    _killed(f"""
        from edcache import cachable
        from parity_datasets import Versioned
        @cachable({path!r}, num_workers=0, progress=False, chunk_size=4)
        def make(version):
            return Versioned(n=20, version=version, kill_at=10, root="/nonexistent", name="c")
        make(1)
    """)
    assert os.path.exists(path + "parameters.p")

    @cachable(path, num_workers=0, progress=False, chunk_size=4)
    def make(version):
        return Versioned(n=20, version=version, root="/nonexistent", name="c")

    with pytest.raises(CacheMismatchError, match="interrupted build"):
        make(2)
    assert _values(make(1)) == [1] * 20  # the same arguments resume
    assert _values(make(1)) == [1] * 20
    with pytest.raises(CacheMismatchError):
        make(2)


def test_cachable_zip_other_arguments_after_nothing_was_committed(tmp_path):
    path = str(tmp_path / "c.zip")

    @cachable(path, num_workers=0, progress=False)
    def make(version, fail=False):
        if fail:
            raise RuntimeError("bad arguments")
        return Versioned(n=5, version=version, root="/nonexistent", name="c")

    with pytest.raises(RuntimeError):
        make(1, fail=True)
    assert _values(make(2)) == [2] * 5


# -- item 7: resuming an edflow zip computes only missing examples, keeps their labels ---
class Relabelled(EdflowLikeDataset):
    """Computes examples whose labels differ from those stored (changed data)."""

    def __getitem__(self, i):
        example = super().__getitem__(i)
        example["score"] = -1.0
        example["label"] = 99
        return example


def test_legacy_resume_computes_only_missing_examples_and_keeps_their_labels(tmp_path):
    path = str(tmp_path / "cached" / "faces.zip")
    written = edflow_run(path, 23, stop_after=9)  # arrival order: chunks partly written
    dataset = Relabelled(str(tmp_path), "faces", 23)
    ds = CachedDataset(dataset, _legacy=True, chunk_size=4, **QUIET)
    assert sorted(dataset.calls) == sorted(set(range(23)) - set(written))
    for i in range(23):
        example = ds[i]
        assert ds.labels["score"][i] == example["score"]
        assert ds.labels["label"][i] == example["label"]
        assert (example["label"] == 99) == (i not in written)


# -- item 8: every public constructor yields a complete object ----------------------------
def test_every_constructor_yields_a_complete_object(tmp_path):
    built = CachedDataset(Toy(tmp_path, n=10), **QUIET)
    full = set(vars(built))
    PathCachedDataset(Versioned(n=3), str(tmp_path / "p.zip"), **QUIET)
    others = [
        CachedDataset.from_cache(str(tmp_path), "toy"),
        PathCachedDataset(None, built.path),
        PathCachedDataset(None, str(tmp_path / "p.zip")),
    ]
    for ds in others:
        missing = [a for a in full if not hasattr(ds, a)]
        assert not missing, (type(ds).__name__, missing)
        ds.cache_dataset()  # complete: opens it (raised AttributeError: 'force_cache')
        assert ds[1]["index_"] == 1
        assert pickle.loads(pickle.dumps(ds))[1]["index_"] == 1
        repr(ds)


# -- item 13: a failed build that committed nothing does not demand force_cache ------------
class Broken(Toy):
    def __init__(self, root):
        super().__init__(root, n=10, name="fixme", fail_at=0)


def test_fixed_dataset_after_a_build_that_committed_nothing(tmp_path):
    with pytest.raises(ExampleError):
        CachedDataset(Broken(tmp_path), **QUIET)
    ds = CachedDataset(Toy(tmp_path, n=12, name="fixme"), **QUIET)  # other class and length
    assert len(ds) == 12 and ds[11]["cls"] == 11 % 7


def test_mismatch_still_raised_when_work_was_committed(tmp_path):
    with pytest.raises(ExampleError):
        CachedDataset(Toy(tmp_path, n=10, name="half", fail_at=7), chunk_size=4, **QUIET)
    with pytest.raises(CacheMismatchError):
        CachedDataset(Toy(tmp_path, n=12, name="half"), chunk_size=4, **QUIET)


# -- issue 16.6: an interrupted edflow zip rebuild ------------------------------------------
REBUILD = """
    from edcache import CachedDataset
    from parity_datasets import Versioned
    CachedDataset(Versioned(n=20, version=2, kill_at=10, root={root!r}, name="r"), _legacy=True,
                  chunk_size=4, num_workers={workers}, progress=False, force_cache=True,
                  keep_existing=False)
"""


def _leftovers(folder):
    return sorted(n for n in os.listdir(folder) if n != "r.zip" and not n.endswith(".lock"))


@pytest.mark.parametrize("then", ["plain", "forced", "forced-fresh"])
def test_interrupted_zip_rebuild_returns_only_current_data_and_cleans_up(tmp_path, then):
    root = str(tmp_path)
    old = CachedDataset(Versioned(n=20, version=1, root=root, name="r"), _legacy=True,
                        chunk_size=4, **QUIET)
    assert _values(old) == [1] * 20
    _killed(REBUILD.format(root=root, workers=0))
    with pytest.raises(IncompleteCacheError, match="rebuild"):
        CachedDataset.from_cache(root, "r")  # the zip there is the old cache
    options = {"plain": {}, "forced": {"force_cache": True},
               "forced-fresh": {"force_cache": True, "keep_existing": False}}[then]
    ds = CachedDataset(Versioned(n=20, version=2, root=root, name="r"), _legacy=True,
                       chunk_size=4, **QUIET, **options)
    assert _values(ds) == [2] * 20
    assert list(ds.labels["v"]) == [2] * 20
    assert _leftovers(os.path.join(root, "cached")) == []
    assert _values(CachedDataset.from_cache(root, "r")) == [2] * 20


def test_staged_and_partial_leftovers_beside_a_complete_zip_are_removed(tmp_path):
    root = str(tmp_path)
    CachedDataset(Versioned(n=20, version=1, root=root, name="r"), _legacy=True, chunk_size=4, **QUIET)
    folder = os.path.join(root, "cached")
    zip_path = os.path.join(folder, "r.zip")
    # what a killed force_cache=True (keep_existing) run and its workers leave behind
    with open(zip_path, "rb") as src, open(zip_path + ".partial", "wb") as dst:
        dst.write(src.read()[:300])
    open(os.path.join(folder, ".tmp-r.zip.chunk3-0123"), "wb").close()
    open(os.path.join(folder, ".tmp-r.zip.partial-4567"), "wb").close()
    with FileLock(os.path.join(folder, ".r.zip.lock")):  # a build running: its files stay
        CachedDataset.from_cache(root, "r")
        CachedDataset(Versioned(n=20, version=1, root=root, name="r"), _legacy=True, **QUIET)
        assert len(_leftovers(folder)) == 3
    ds = CachedDataset(Versioned(n=20, version=1, root=root, name="r"), _legacy=True, chunk_size=4, **QUIET)
    assert _values(ds) == [1] * 20
    assert _leftovers(folder) == []
    with zipfile.ZipFile(zip_path) as zf:
        assert zf.testzip() is None


def test_cachable_zip_rebuild_interrupted(tmp_path):
    path = str(tmp_path / "c.zip")

    @cachable(path, num_workers=0, progress=False, chunk_size=4)
    def make(version):
        return Versioned(n=20, version=version, root="/nonexistent", name="c")

    assert _values(make(1)) == [1] * 20
    _killed(f"""
        from edcache import cachable
        from parity_datasets import Versioned
        @cachable({path!r}, num_workers=0, progress=False, chunk_size=4, force_cache=True,
                  keep_existing=False)
        def make(version):
            return Versioned(n=20, version=version, kill_at=10, root="/nonexistent", name="c")
        make(2)
    """)
    assert not os.path.exists(path + ".p")  # not complete any more
    assert _values(make(2)) == [2] * 20
    assert os.path.exists(path + ".p")
    assert sorted(os.listdir(tmp_path)) == [".c.zip.lock", "c.zip", "c.zip.p", "c.zipparameters.p"]


def test_cache_dataset_of_an_incomplete_cache_opened_without_its_dataset(tmp_path):
    with pytest.raises(ExampleError):
        CachedDataset(Toy(tmp_path, n=10, name="half", fail_at=7), chunk_size=4, **QUIET)
    ds = CachedDataset.from_cache(str(tmp_path), "half")
    assert ds[1]["index_"] == 1  # committed examples read fine
    with pytest.raises(DatasetInterfaceError, match="without its dataset"):
        ds.cache_dataset()
