"""Environment faults (issue 6, suite 6).

* Disk full (ENOSPC) or an I/O error (EIO) at every kind of write of a build: a clear
  error, committed chunks intact (``edcache verify`` is clean), and a resume once the
  fault is gone completes the cache byte-identically without recomputing committed
  chunks. Also on a real, size-limited tmpfs (when this process may mount one).
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
from edcache.format.shards.manifest import read_commits, read_manifest
from edcache.verify import verify_cache

from reliability_datasets import (
    CLI_CODE,
    SlowDataset,
    assert_example_equal,
    computations,
    expected,
    subprocess_env,
)
from test_reliability_crash import temp_files, tree

NAME = "env"
LENGTH, CHUNK = 40, 8


def build(root, count_dir=None, **kw):
    return CachedDataset(SlowDataset(root, NAME, LENGTH, count_dir=count_dir), chunk_size=CHUNK,
                         num_workers=0, progress=False, **kw)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return tree(build(str(tmp_path_factory.mktemp("env-ref"))).path)


def committed(cache_dir):
    try:
        m = read_manifest(cache_dir)
    except FileNotFoundError:
        return set()
    return set(range(m.num_chunks)) if m.complete else set(read_commits(cache_dir, m.num_chunks))


# -- injected write errors ---------------------------------------------------------------
class Faults:
    """Fails the ``at``-th write-type call on the cache with ``err`` (half the data first)."""

    def __init__(self, monkeypatch, root, at, err):
        self.root, self.at, self.err, self.count = os.path.realpath(root), at, err, 0
        self.kinds: list[str] = []
        import edcache.format.fsutil as fsutil
        import edcache.format.shards.manifest as manifest
        import edcache.format.shards.sink as sink

        real_write_file, real_write, real_fsync = fsutil.write_file, os.write, os.fsync

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

        def fsync(fd):
            if mine_fd(fd):
                fail("fsync")
            return real_fsync(fd)

        monkeypatch.setattr(fsutil, "write_file", write_file)
        monkeypatch.setattr(sink, "write_file", write_file)
        monkeypatch.setattr(manifest.os, "write", write)  # the commit log's appends
        monkeypatch.setattr(os, "fsync", fsync)


def _count_points(tmp_path, monkeypatch):
    with monkeypatch.context() as m:
        faults = Faults(m, str(tmp_path / "count-points"), None, errno.ENOSPC)
        build(str(tmp_path / "count-points"))
    return faults.kinds


@pytest.mark.timeout(240)
@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EIO])
def test_write_error_at_every_point_keeps_work_and_resumes(tmp_path, monkeypatch, reference, err):
    kinds = _count_points(tmp_path, monkeypatch)
    assert {"write_file", "os.write", "fsync"} <= set(kinds)
    messages = set()
    absorbed = []
    for at in range(1, len(kinds) + 1):
        root = str(tmp_path / f"e{at}")
        cache_dir = os.path.join(root, "cached", NAME)
        with monkeypatch.context() as m:
            Faults(m, root, at, err)
            try:
                build(root)
            except OSError as exc:
                assert exc.errno == err, f"point {at} ({kinds[at - 1]}): {exc!r}"
                messages.add(f"{kinds[at - 1]}: {exc}")
            else:  # an error edcache may ignore: the fsync of a log it deletes right after
                absorbed.append(kinds[at - 1])
                assert tree(cache_dir) == reference
                continue
        kept = committed(cache_dir)
        if os.path.exists(os.path.join(cache_dir, "manifest.json")):
            report = verify_cache(cache_dir)
            assert report.ok, f"point {at} ({kinds[at - 1]}): {report}"
        count = tmp_path / f"count{at}"
        count.mkdir()
        build(root, str(count))  # space is back
        recomputed = {i // CHUNK for i in computations(str(count))} & kept
        assert not recomputed, f"point {at}: committed chunks {sorted(recomputed)} recomputed"
        got = tree(cache_dir)
        if "commits.log" in got and read_manifest(cache_dir).complete:
            del got["commits.log"]  # failed after the complete manifest, before deleting the log
        assert got == reference, f"point {at} ({kinds[at - 1]}): resumed cache differs"
        assert temp_files(root) == []
    assert absorbed in ([], ["fsync"]), absorbed
    name = errno.errorcode[err]
    print(f"\n{name}: {len(kinds)}/{len(kinds)} injected write errors recovered "
          f"({len(absorbed)} harmlessly ignored)")
    for msg in sorted(messages):
        print("  ", msg[:200])


@pytest.mark.parametrize("kind", ["write_file", "os.write"])
def test_write_error_message(tmp_path, monkeypatch, kind):
    """The message says what failed, where, that committed work is kept, and what to do."""
    kinds = _count_points(tmp_path, monkeypatch)
    at = kinds.index(kind, 4) + 1  # a write after the first chunks were committed
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
        assert str(exc.value).startswith(text + ": '" + os.path.join(cache, "shards", ".tmp-"))
    else:
        assert str(exc.value) == text


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
def test_real_disk_full_with_pool_then_space_returns(small_tmpfs, tmp_path):
    length = 480
    ref = tree(CachedDataset(SlowDataset(str(tmp_path / "ref"), NAME, length), chunk_size=CHUNK,
                             num_workers=0, progress=False).path)
    args = [sys.executable, "-c", CLI_CODE, "build", small_tmpfs, NAME, str(length),
            "--chunk-size", str(CHUNK), "--workers", "2"]
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
        assert_example_equal(ds[c * CHUNK], expected(c * CHUNK))
    subprocess.run(["mount", "-o", "remount,size=8m", small_tmpfs], check=True)
    count = tmp_path / "count"
    count.mkdir()
    args += ["--count-dir", str(count)]
    again = subprocess.run(args, env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr[-2000:]
    assert not {i // CHUNK for i in computations(str(count))} & kept
    assert tree(cache_dir) == ref
    assert temp_files(small_tmpfs) == []
    print(f"\nreal ENOSPC (96 KiB tmpfs): {len(kept)} chunks kept, resumed after remount")


# -- read-only cache ----------------------------------------------------------------------
def _read_everything(root):
    ds = CachedDataset.from_cache(root, NAME, verify=True)
    for i in range(LENGTH):
        assert_example_equal(ds[i], expected(i))
    assert np.array_equal(ds.labels["label"], np.arange(LENGTH) % 7)
    same = CachedDataset(SlowDataset(root, NAME, LENGTH), chunk_size=CHUNK, num_workers=0, progress=False)
    assert_example_equal(same[LENGTH - 1], expected(LENGTH - 1))
    assert same.get_batch([0, 9, 39])["label"].tolist() == [0, 2, 4]
    assert verify_cache(os.path.join(root, "cached", NAME), deep=True).ok


def test_read_only_cache_no_write_attempted(tmp_path, monkeypatch):
    """Every call that could write under the cache's root is intercepted and fails."""
    root = str(tmp_path / "ro")
    build(root)
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
    _read_everything(root)
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


def test_moved_incomplete_cache_resumes(tmp_path, reference):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    with pytest.raises(Exception):
        CachedDataset(SlowDataset(a, NAME, LENGTH, fail_at=20), chunk_size=CHUNK, num_workers=0,
                      progress=False)
    kept = committed(os.path.join(a, "cached", NAME))
    shutil.copytree(os.path.join(a, "cached"), os.path.join(b, "cached"))
    count = tmp_path / "count"
    count.mkdir()
    ds = build(b, str(count))
    assert not {i // CHUNK for i in computations(str(count))} & kept
    assert tree(ds.path) == reference
