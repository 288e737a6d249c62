"""Concurrency (issue 6, suite 5).

* Readers opened before and during a build see only committed data, and a reader opened
  while the build ran reads everything once it completes.
* Four processes construct the same ``CachedDataset`` at once: one complete, correct,
  byte-identical cache, every example computed exactly once; also when the process that
  holds the build lock is killed mid-build.
* A ``torch`` DataLoader with four workers reads a cache while another process resumes
  its build.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import time

import numpy as np
import pytest

from edcache import CachedDataset
from edcache.errors import CacheNotFoundError, IncompleteCacheError
from edcache.verify import verify_cache

from reliability_datasets import (
    CLI_CODE,
    SlowDataset,
    assert_example_equal,
    computations,
    expected,
    subprocess_env,
)
from test_reliability_crash import kill_group, tree

CHUNK = 8


def builder(root, name, length, *, delay, workers=2, count_dir=None, ready=None):
    args = [sys.executable, "-c", CLI_CODE, "build", root, name, str(length), "--delay", str(delay),
            "--chunk-size", str(CHUNK), "--workers", str(workers)]
    if count_dir:
        args += ["--count-dir", count_dir]
    if ready:
        args += ["--ready-file", ready]
    return subprocess.Popen(args, env=subprocess_env(), start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def finish(proc, timeout=180):
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err.decode()[-3000:]
    return out.decode()


def reference(tmp_path, name, length) -> dict[str, bytes]:
    ds = CachedDataset(SlowDataset(str(tmp_path / "ref"), name, length), chunk_size=CHUNK,
                       num_workers=0, progress=False)
    return tree(ds.path)


# -- readers during a build -----------------------------------------------------------------
@pytest.mark.timeout(180)
def test_readers_during_build_see_only_committed_data(tmp_path):
    root, name, length = str(tmp_path / "r"), "live", 480
    proc = builder(root, name, length, delay=0.004)
    rng = random.Random(0)
    early = None  # a reader opened while the build runs, used again after it completes
    reads = incomplete = 0
    try:
        while proc.poll() is None:
            try:
                ds = CachedDataset.from_cache(root, name, verify=rng.random() < 0.5)
            except CacheNotFoundError:
                time.sleep(0.01)
                continue
            early = early or ds
            for i in rng.sample(range(length), 20):
                for reader in (ds, early):
                    try:
                        got = reader[i]
                    except IncompleteCacheError:
                        incomplete += 1
                        continue
                    assert_example_equal(got, expected(i), f"example {i} during the build")
                    reads += 1
            try:  # refused until the build completes (it may complete in between)
                labels = ds.labels
            except IncompleteCacheError:
                incomplete += 1
            else:
                assert np.array_equal(labels["label"], np.arange(length) % 7)
        finish(proc)
    finally:
        if proc.poll() is None:
            kill_group(proc)
    assert early is not None and incomplete > 0, "no reader ran during the build"
    # the reader opened mid-build now reads everything, labels included
    for i in range(length):
        assert_example_equal(early[i], expected(i), f"example {i} after the build")
    assert np.array_equal(early.labels["label"], np.arange(length) % 7)
    print(f"\nreaders during a build: {reads} correct reads, {incomplete} refused as not yet cached")


# -- four builders at once ----------------------------------------------------------------
@pytest.mark.timeout(180)
def test_four_processes_build_the_same_cache_once(tmp_path):
    root, name, length = str(tmp_path / "r"), "four", 240
    count = tmp_path / "count"
    count.mkdir()
    want = reference(tmp_path, name, length)
    procs = [builder(root, name, length, delay=0.003, count_dir=str(count)) for _ in range(4)]
    for p in procs:
        finish(p)
    counts = computations(str(count))
    assert set(counts) == set(range(length))
    twice = {i: n for i, n in counts.items() if n != 1}
    assert not twice, f"examples computed more than once: {dict(list(twice.items())[:10])}"
    pids = {name.split(".")[1] for name in os.listdir(count)}
    cache_dir = os.path.join(root, "cached", name)
    assert tree(cache_dir) == want
    assert verify_cache(cache_dir).ok
    print(f"\nfour builders: one cache, {length} examples computed once each by {len(pids)} worker processes")


@pytest.mark.timeout(180)
def test_four_processes_builder_killed_others_finish(tmp_path):
    """The process building is SIGKILLed; a waiting one takes over and resumes."""
    root, name, length = str(tmp_path / "r"), "takeover", 480
    count = tmp_path / "count"
    count.mkdir()
    want = reference(tmp_path, name, length)
    procs = [builder(root, name, length, delay=0.004, count_dir=str(count))]
    time.sleep(0.3)  # let the first one take the lock
    procs += [builder(root, name, length, delay=0.004, count_dir=str(count)) for _ in range(3)]
    deadline = time.monotonic() + 60
    while len(os.listdir(count)) < 100 and time.monotonic() < deadline:
        time.sleep(0.01)
    # the builder is the process whose group holds the workers computing examples
    groups = {_pgid(int(n.split(".")[1])) for n in os.listdir(count)} - {None}
    building = [p for p in procs if p.pid in groups]
    assert len(building) == 1, "expected exactly one process to be building"
    kill_group(building[0])
    for p in procs:
        if p is not building[0]:
            finish(p)
    cache_dir = os.path.join(root, "cached", name)
    assert tree(cache_dir) == want
    counts = computations(str(count))
    assert set(counts) == set(range(length))
    # only chunks in flight at the kill may have been computed twice
    twice = {i // CHUNK for i, n in counts.items() if n > 1}
    assert len(twice) <= 2 * 2 * 2, f"too many chunks recomputed: {sorted(twice)}"


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None


# -- DataLoader while another process resumes the build --------------------------------------
def _identity(batch):
    return batch


@pytest.mark.timeout(240)
@pytest.mark.filterwarnings("ignore:This DataLoader will create 4 worker processes")
def test_dataloader_four_workers_while_build_resumes(tmp_path):
    torch = pytest.importorskip("torch")
    from torch.utils.data import DataLoader, Subset

    root, name, length = str(tmp_path / "r"), "loader", 480
    with pytest.raises(Exception):  # a first build that stops at index 200
        CachedDataset(SlowDataset(root, name, length, fail_at=200), chunk_size=CHUNK,
                      num_workers=0, progress=False)
    ds = CachedDataset.from_cache(root, name)
    assert not ds.complete
    committed = list(range(200 // CHUNK * CHUNK))
    proc = builder(root, name, length, delay=0.004)
    epochs = 0
    try:
        while proc.poll() is None or epochs < 2:
            loader = DataLoader(Subset(ds, committed), batch_size=16, shuffle=True, num_workers=4,
                                collate_fn=_identity, generator=torch.Generator().manual_seed(epochs))
            seen = []
            for batch in loader:
                for ex in batch:
                    i = ex["index_"]
                    assert_example_equal(ex, expected(i), f"example {i} (epoch {epochs})")
                    seen.append(i)
            assert sorted(seen) == committed
            epochs += 1
        finish(proc)
    finally:
        if proc.poll() is None:
            kill_group(proc)
    # the same dataset object (opened while incomplete) now serves every example
    loader = DataLoader(ds, batch_size=32, num_workers=4, collate_fn=_identity)
    seen = []
    for batch in loader:
        for ex in batch:
            assert_example_equal(ex, expected(ex["index_"]))
            seen.append(ex["index_"])
    assert seen == list(range(length))
    for i in range(0, length, 3):  # and in this process, through the reader opened before
        assert_example_equal(ds[i], expected(i))
    print(f"\nDataLoader(num_workers=4): {epochs} epochs over committed data during a resumed build")


# -- a reader whose manifest went stale ------------------------------------------------------
def test_reader_opened_incomplete_reads_after_completion(tmp_path):
    """Opened mid-build (no chunk read yet), used after the build finished and deleted
    commits.log: every example reads (no spurious 'not cached yet')."""
    root, name, length = str(tmp_path), "stale", 40
    with pytest.raises(Exception):
        CachedDataset(SlowDataset(root, name, length, fail_at=20), chunk_size=CHUNK,
                      num_workers=0, progress=False)
    old = CachedDataset.from_cache(root, name)
    assert not old.complete
    CachedDataset(SlowDataset(root, name, length), chunk_size=CHUNK, num_workers=0, progress=False)
    for i in range(length):
        assert_example_equal(old[i], expected(i))


def test_reader_opened_complete_reads_during_forced_rebuild(tmp_path):
    """Opened on a complete cache; another process starts force_cache=True (shards.idx is
    removed while it runs): the old reader reads kept chunks, never reports damage."""
    from edcache.format.shards import dataset_identity, prepare_cache_dir
    from reliability_datasets import IN_MEMORY_KEYS

    root, name, length = str(tmp_path), "rebuild", 40
    ds = CachedDataset(SlowDataset(root, name, length), chunk_size=CHUNK, num_workers=0, progress=False)
    old = CachedDataset.from_cache(root, name)
    sink = prepare_cache_dir(ds.path, length=length, chunk_size=CHUNK,
                             dataset=dataset_identity(SlowDataset(root, name, length)),
                             in_memory_keys=IN_MEMORY_KEYS, allow_pickle=False, keep_existing=True)
    sink.close()  # the rebuild is "running": manifest incomplete, every chunk in commits.log
    assert not os.path.exists(os.path.join(ds.path, "shards.idx"))
    for i in range(length):
        assert_example_equal(old[i], expected(i))
