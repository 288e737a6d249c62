"""Environment faults (issue 6, suite 6).

* Disk full (ENOSPC) or an I/O error (EIO) at every write of a format-v2 build (column
  ``pwrite``, log ``write``, ``ftruncate``, atomic file writes, ``fsync``, ``syncfs``): a
  clear error, committed chunks intact (``edcache verify`` is clean), and a resume once
  the fault is gone completes the cache byte-identically without recomputing committed
  chunks; for the four datasets. Also on a real, size-limited tmpfs (when this process
  may mount one).
* A read-only cache directory opens and reads, and nothing tries to write to it (a
  read-only bind mount where possible; otherwise every write call is intercepted).
* A cache moved or copied to another path opens without recomputing anything.
"""

from __future__ import annotations

import builtins
import errno
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from edcache import CachedDataset
from edcache.errors import CacheNotFoundError
from edcache.format.columnar.manifest import read_manifest
from edcache.verify import verify_cache

from reliability_datasets import (
    CLI_CODE,
    DATASETS,
    SlowDataset,
    assert_example_equal,
    committed_count,
    computations,
    expected,
    subprocess_env,
)
from test_reliability_crash import KINDS, temp_files, tree

NAME = "env"
LENGTH, CHUNK = 40, 8


def build(root, count_dir=None, dataset=SlowDataset, **kw):
    return CachedDataset(dataset(root, NAME, LENGTH, count_dir=count_dir), chunk_size=CHUNK,
                         num_workers=0, progress=False, **kw)


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    base = tmp_path_factory.mktemp("env-ref")
    return {kind: tree(build(str(base / kind), dataset=DATASETS[kind]).path) for kind in KINDS}


@pytest.fixture(scope="module")
def reference(references):
    return references["slow"]


def committed(cache_dir):
    n = committed_count(cache_dir)
    return set(range(n or 0))


# -- injected write errors ---------------------------------------------------------------
class Faults:
    """Fails the ``at``-th write-type call on the cache with ``err`` (half the data first)."""

    def __init__(self, monkeypatch, root, at, err):
        self.root, self.at, self.err, self.count = os.path.realpath(root), at, err, 0
        self.kinds: list[str] = []
        import edcache.format.columnar.writer as writer
        import edcache.format.fsutil as fsutil

        real_write_file, real_write, real_fsync = fsutil.write_file, os.write, os.fsync
        real_pwrite, real_ftruncate, real_syncfs = os.pwrite, os.ftruncate, fsutil.sync_filesystem

        def fail(kind):
            self.count += 1
            self.kinds.append(kind)
            if self.count == self.at:
                raise OSError(self.err, os.strerror(self.err))

        def mine_fd(fd):
            try:
                return os.readlink(f"/proc/self/fd/{fd}").startswith(self.root)
            except OSError:
                return False

        def write_file(path, data, *args, **kwargs):
            if os.path.realpath(path).startswith(self.root):
                try:
                    fail("write_file")
                except OSError as exc:
                    with open(path, "wb") as f:  # the disk filled up half-way
                        f.write(bytes(data)[: len(data) // 2])
                    exc.filename = path
                    raise
            return real_write_file(path, data, *args, **kwargs)

        def write(fd, data):
            if mine_fd(fd):
                fail("os.write")
            return real_write(fd, data)

        def pwrite(fd, data, offset):  # column files
            if mine_fd(fd):
                try:
                    fail("pwrite")
                except OSError:
                    real_pwrite(fd, bytes(data)[: len(data) // 2], offset)  # full half-way
                    raise
            return real_pwrite(fd, data, offset)

        def ftruncate(fd, length):
            if mine_fd(fd):
                fail("ftruncate")
            return real_ftruncate(fd, length)

        def fsync(fd):
            if mine_fd(fd):
                fail("fsync")
            return real_fsync(fd)

        def syncfs(path):  # syncfs reports an error by returning False: fsync file by file
            if os.path.realpath(path).startswith(self.root):
                try:
                    fail("syncfs")
                except OSError:
                    return False
            return real_syncfs(path)

        monkeypatch.setattr(fsutil, "write_file", write_file)
        monkeypatch.setattr(os, "write", write)  # the commit log's appends
        monkeypatch.setattr(os, "pwrite", pwrite)
        monkeypatch.setattr(os, "ftruncate", ftruncate)
        monkeypatch.setattr(os, "fsync", fsync)
        monkeypatch.setattr(fsutil, "sync_filesystem", syncfs)
        monkeypatch.setattr(writer, "sync_filesystem", syncfs)


def _count_points(tmp_path, monkeypatch, dataset=SlowDataset):
    with monkeypatch.context() as m:
        faults = Faults(m, str(tmp_path / "count-points"), None, errno.ENOSPC)
        build(str(tmp_path / "count-points"), dataset=dataset)
    return faults.kinds


#: (kind, errno, stride): CI injects ENOSPC at every 2nd point of the mixed-schema build
#: and every 4th of the others, EIO at every 6th point; ``-m long``: every point.
ERROR_CASES = [pytest.param(k, errno.ENOSPC, 2 if k == "mixed" else 4, id=f"{k}-ENOSPC") for k in KINDS] + [
    pytest.param(k, errno.EIO, 6, id=f"{k}-EIO") for k in KINDS] + [
    pytest.param(k, e, 1, id=f"{k}-{errno.errorcode[e]}-all", marks=pytest.mark.long)
    for k in KINDS for e in (errno.ENOSPC, errno.EIO)]


@pytest.mark.timeout(600)
@pytest.mark.parametrize("kind,err,stride", ERROR_CASES)
def test_write_error_at_every_point_keeps_work_and_resumes(tmp_path, monkeypatch, references, kind, err, stride):
    dataset, reference = DATASETS[kind], references[kind]
    kinds = _count_points(tmp_path, monkeypatch, dataset)
    assert {"write_file", "os.write", "pwrite", "fsync", "syncfs"} <= set(kinds), set(kinds)
    messages = set()
    absorbed = []
    tried = 0
    for at in range(1, len(kinds) + 1, stride):
        tried += 1
        root = str(tmp_path / f"e{at}")
        cache_dir = os.path.join(root, "cached", NAME)
        with monkeypatch.context() as m:
            Faults(m, root, at, err)
            try:
                build(root, dataset=dataset)
            except OSError as exc:
                assert exc.errno == err, f"point {at} ({kinds[at - 1]}): {exc!r}"
                messages.add(f"{kinds[at - 1]}: {exc}")
            else:  # an error edcache may ignore: a failed syncfs (it fsyncs file by file
                # instead), the fsync of a log it deletes right after
                absorbed.append(kinds[at - 1])
                assert tree(cache_dir) == reference
                continue
        kept = committed(cache_dir)
        if os.path.exists(os.path.join(cache_dir, "manifest.json")):
            report = verify_cache(cache_dir)
            assert report.ok, f"point {at} ({kinds[at - 1]}): {report}"
        count = tmp_path / f"count{at}"
        count.mkdir()
        build(root, str(count), dataset=dataset)  # space is back
        recomputed = {i // CHUNK for i in computations(str(count))} & kept
        assert not recomputed, f"point {at}: committed chunks {sorted(recomputed)} recomputed"
        got = tree(cache_dir)
        if "commits.log" in got and read_manifest(cache_dir).complete:
            del got["commits.log"]  # failed after the complete manifest, before deleting the log
        assert got == reference, f"point {at} ({kinds[at - 1]}): resumed cache differs"
        assert temp_files(root) == []
    assert set(absorbed) <= {"syncfs", "fsync"} and absorbed.count("fsync") <= 1, absorbed
    name = errno.errorcode[err]
    print(f"\n{name} ({kind}): {tried}/{tried} injected write errors recovered "
          f"(every {stride} of {len(kinds)} points; {len(absorbed)} harmlessly ignored: {absorbed})")
    for msg in sorted(messages):
        print("  ", msg[:200])


@pytest.mark.parametrize("kind", ["write_file", "os.write", "pwrite"])
def test_write_error_message(tmp_path, monkeypatch, kind):
    """The message says what failed, where, that committed work is kept, and what to do."""
    kinds = _count_points(tmp_path, monkeypatch)
    # a write after chunks 0 and 1 were committed (schema record, then a record per
    # chunk); write_file: the first label file, after the last commit record
    logs = [n for n, k in enumerate(kinds) if k == "os.write"]
    after = logs[-1] if kind == "write_file" else logs[2]
    at = kinds.index(kind, after + 1) + 1
    root = str(tmp_path / "r")
    cache = os.path.join(root, "cached", NAME)
    with monkeypatch.context() as m:
        Faults(m, root, at, errno.ENOSPC)
        with pytest.raises(OSError) as exc:
            build(root)
    assert exc.value.errno == errno.ENOSPC
    text = (f"[Errno 28] No space left on device while writing the cache at {cache}. The chunks "
            "committed so far are kept: free space (or fix the device) and run again to resume")
    if kind == "write_file":
        assert str(exc.value).startswith(text + ": '" + os.path.join(cache, "labels", ".tmp-")), str(exc.value)
    else:
        assert str(exc.value) == text
    assert committed(cache), "no committed chunk before the error"


# -- a real full disk ---------------------------------------------------------------------
@pytest.fixture
def small_tmpfs(tmp_path):
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("needs root to mount a size-limited tmpfs")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=96k", "tmpfs", str(mnt)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        yield str(mnt)
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


@pytest.mark.timeout(180)
@pytest.mark.parametrize("kind", ["slow", "ragged"])
def test_real_disk_full_with_pool_then_space_returns(small_tmpfs, tmp_path, kind):
    length = 480
    dataset = DATASETS[kind]
    ref = tree(CachedDataset(dataset(str(tmp_path / "ref"), NAME, length), chunk_size=CHUNK,
                             num_workers=0, progress=False).path)
    args = [sys.executable, "-c", CLI_CODE, "build", small_tmpfs, NAME, str(length),
            "--chunk-size", str(CHUNK), "--workers", "2", "--kind", kind]
    full = subprocess.run(args, env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert full.returncode != 0
    cache_dir = os.path.join(small_tmpfs, "cached", NAME)
    assert (f"[Errno 28] No space left on device while writing the cache at {cache_dir}. The chunks "
            "committed so far are kept: free space (or fix the device) and run again to resume"
            ) in full.stderr, full.stderr[-2000:]
    kept = committed(cache_dir)
    assert kept, "nothing was committed before the disk filled up"
    assert verify_cache(cache_dir).ok
    ds = CachedDataset.from_cache(small_tmpfs, NAME, verify=True)
    for c in kept:
        assert_example_equal(ds[c * CHUNK], dataset.expected(c * CHUNK))
    subprocess.run(["mount", "-o", "remount,size=8m", small_tmpfs], check=True)
    count = tmp_path / "count"
    count.mkdir()
    args += ["--count-dir", str(count)]
    again = subprocess.run(args, env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr[-2000:]
    assert not {i // CHUNK for i in computations(str(count))} & kept
    assert tree(cache_dir) == ref
    assert temp_files(small_tmpfs) == []
    print(f"\nreal ENOSPC (96 KiB tmpfs, {kind}): {len(kept)} chunks kept, resumed after remount")


# -- read-only cache ----------------------------------------------------------------------
def _read_everything(root, dataset=SlowDataset):
    ds = CachedDataset.from_cache(root, NAME, verify=True)
    for i in range(LENGTH):
        assert_example_equal(ds[i], dataset.expected(i))
    want = dataset.expected_labels(LENGTH)
    assert np.array_equal(ds.labels["label"], want["label"])
    same = CachedDataset(dataset(root, NAME, LENGTH), chunk_size=CHUNK, num_workers=0, progress=False)
    assert_example_equal(same[LENGTH - 1], dataset.expected(LENGTH - 1))
    assert same.get_batch([0, 9, 39])["label"].tolist() == want["label"][[0, 9, 39]].tolist()
    assert verify_cache(os.path.join(root, "cached", NAME), deep=True).ok


@pytest.mark.parametrize("kind", KINDS)
def test_read_only_cache_no_write_attempted(tmp_path, monkeypatch, kind):
    """Every call that could write under the cache's root is intercepted and fails."""
    root = str(tmp_path / "ro")
    dataset = DATASETS[kind]
    build(root, dataset=dataset)
    attempts = []
    real = os.path.realpath(root)

    def guard(what, path):
        try:
            inside = os.path.realpath(os.fspath(path)).startswith(real)
        except TypeError:
            inside = False
        if inside:
            attempts.append((what, path))
            raise PermissionError(errno.EACCES, "read-only (test)", path)

    real_open, real_os_open = builtins.open, os.open

    def fake_open(file, mode="r", *a, **k):
        if isinstance(file, (str, bytes, os.PathLike)) and any(c in mode for c in "wax+"):
            guard("open", file)
        return real_open(file, mode, *a, **k)

    def fake_os_open(path, flags, *a, **k):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC):
            guard("os.open", path)
        return real_os_open(path, flags, *a, **k)

    def wrap(name, arg=0):
        fn = getattr(os, name)

        def f(*a, **k):
            guard(name, a[arg])
            return fn(*a, **k)
        return f

    monkeypatch.setattr(builtins, "open", fake_open)
    monkeypatch.setattr(os, "open", fake_os_open)
    for name in ("replace", "rename", "unlink", "remove", "rmdir", "mkdir", "makedirs", "truncate", "chmod"):
        monkeypatch.setattr(os, name, wrap(name))
    _read_everything(root, dataset)
    assert attempts == []


def test_read_only_bind_mount(tmp_path):
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("needs root for a read-only bind mount")
    src, ro = tmp_path / "src", tmp_path / "ro"
    build(str(src))
    ro.mkdir()
    r = subprocess.run(["mount", "--bind", str(src), str(ro)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot bind-mount here: {r.stderr.strip()}")
    try:
        r = subprocess.run(["mount", "-o", "remount,ro,bind", str(ro)], capture_output=True, text=True)
        if r.returncode != 0:
            pytest.skip(f"cannot remount read-only: {r.stderr.strip()}")
        with pytest.raises(OSError):
            open(ro / "probe", "w")  # really read-only, even for root
        _read_everything(str(ro))
        # a DataLoader over the read-only cache, forked workers
        torch = pytest.importorskip("torch")
        loader = torch.utils.data.DataLoader(CachedDataset.from_cache(str(ro), NAME), batch_size=8,
                                             num_workers=2, collate_fn=lambda b: b)
        assert [e["index_"] for b in loader for e in b] == list(range(LENGTH))
    finally:
        subprocess.run(["umount", "-l", str(ro)], capture_output=True)


# -- moved and copied ---------------------------------------------------------------------
def test_moved_and_copied_cache_opens_without_recompute(tmp_path, reference):
    a, b, c = str(tmp_path / "a"), str(tmp_path / "b"), str(tmp_path / "c")
    build(a)
    shutil.copytree(os.path.join(a, "cached"), os.path.join(c, "cached"))
    os.makedirs(os.path.join(b, "cached"))
    shutil.move(os.path.join(a, "cached", NAME), os.path.join(b, "cached", NAME))
    with pytest.raises(CacheNotFoundError):
        CachedDataset.from_cache(a, NAME)
    for root in (b, c):
        count = tmp_path / f"count-{os.path.basename(root)}"
        count.mkdir()
        ds = build(root, str(count))
        assert computations(str(count)) == {}
        for i in range(LENGTH):
            assert_example_equal(ds[i], expected(i))
        assert tree(ds.path) == reference
        assert verify_cache(ds.path).ok


@pytest.mark.parametrize("kind", KINDS)
def test_moved_incomplete_cache_resumes(tmp_path, references, kind):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    dataset = DATASETS[kind]
    with pytest.raises(Exception):
        CachedDataset(dataset(a, NAME, LENGTH, fail_at=20), chunk_size=CHUNK, num_workers=0,
                      progress=False)
    kept = committed(os.path.join(a, "cached", NAME))
    assert kept == {0, 1}
    shutil.copytree(os.path.join(a, "cached"), os.path.join(b, "cached"))
    count = tmp_path / "count"
    count.mkdir()
    ds = build(b, str(count), dataset=dataset)
    assert not {i // CHUNK for i in computations(str(count))} & kept
    assert tree(ds.path) == references[kind]
