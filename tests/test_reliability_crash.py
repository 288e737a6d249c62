"""Crash consistency (issue 6, suite 1).

* Random SIGKILLs of a builder's whole process group (coordinator, forkserver and pool
  workers) while it builds; resume with ``keep_existing=True``; the finished cache is
  byte-identical to an uninterrupted build, no temporary file is left, and committed
  chunks are never lost or recomputed. CI: 3 kills; ``-m long``: 20 kills.
* Every crash point: a build in a forked child is killed (SIGKILL, no cleanup) just
  before its k-th file-system operation on the cache (``os.open`` creating or writing,
  ``pwrite`` of column data, ``write`` of a log record, ``ftruncate``, ``replace``,
  ``unlink``, ``mkdir``/``rmdir``, ``fsync``/``syncfs``, each atomic file write), for
  every k (and with the k-th write torn in half); each intermediate state is a valid
  cache, and resuming completes it byte-identically without recomputing a committed
  chunk. Four datasets (format v2, one columnar layout for all): mixed values,
  uniform, variable-shape (ragged / varshape columns) and mixed-schema (optional keys,
  a per-row layout column, columns promoted mid-build: kills while a promoted column
  is rewritten and before its schema record).
* The same random kills for an edflow-zip build (``_legacy=True``).
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
import zipfile

import pytest

from edcache import CachedDataset
from edcache.errors import CacheNotFoundError, CorruptCacheError, EdcacheError, IncompleteCacheError
from edcache.format.columnar import CacheRebuiltError
from edcache.format.columnar.manifest import read_manifest
from edcache.verify import verify_cache

from reliability_datasets import (
    CLI_CODE,
    DATASETS,
    KIND_OF,
    SlowDataset,
    assert_batch_equal,
    assert_example_equal,
    committed_count,
    computations,
    expected,
    subprocess_env,
    verify_supports_v2,
)

NAME = "crash"
KINDS = ["slow", "uniform", "ragged", "mixed"]


# -- helpers ---------------------------------------------------------------------------
def tree(path: str) -> dict[str, bytes]:
    """Every file under ``path`` (relative name -> bytes)."""
    out = {}
    for dirpath, _, files in os.walk(path):
        for f in files:
            full = os.path.join(dirpath, f)
            with open(full, "rb") as fh:
                out[os.path.relpath(full, path)] = fh.read()
    return out


def temp_files(root: str) -> list[str]:
    found = []
    for dirpath, _, files in os.walk(root):
        found += [os.path.join(dirpath, f) for f in files if f.startswith(".tmp-") or f.endswith(".partial")]
    return found


def reference_cache(root: str, length: int, chunk: int, legacy: bool = False,
                    dataset: type = SlowDataset) -> str:
    ds = CachedDataset(dataset(root, NAME, length), chunk_size=chunk, num_workers=0,
                       progress=False, _legacy=True if legacy else None)
    return ds.path


def assert_v2_layout(files: dict[str, bytes], what: str = "reference") -> None:
    """A complete format-v2 cache: manifest, checksum table and column files only (no
    format-v1 chunk shards or packed.shard, no commit log)."""
    assert "manifest.json" in files and "checksums.npy" in files, f"the {what}: {sorted(files)}"
    assert any(f.startswith("columns/") for f in files), f"the {what} has no columns: {sorted(files)}"
    stray = [f for f in files if f not in ("manifest.json", "checksums.npy")
             and not f.startswith(("columns/", "labels/"))]
    assert not stray, f"the {what} holds {stray}"


def start_builder(root: str, length: int, chunk: int, *, delay: float, workers: int = 2,
                  count_dir: str | None = None, legacy: bool = False,
                  kind: str = "slow") -> subprocess.Popen:
    args = [sys.executable, "-c", CLI_CODE, "build", root, NAME, str(length), "--delay", str(delay),
            "--chunk-size", str(chunk), "--workers", str(workers)]
    if count_dir:
        args += ["--count-dir", count_dir]
    if legacy:
        args.append("--legacy")
    if kind != "slow":
        args += ["--kind", kind]
    return subprocess.Popen(args, env=subprocess_env(), start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the builder and every process of its group (forkserver, pool workers)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.communicate(timeout=30)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and _group_alive(proc.pid):
        time.sleep(0.02)
    assert not _group_alive(proc.pid), "processes of the killed builder survived"


def _group_alive(pgid: int) -> bool:
    """Whether a non-zombie process of group ``pgid`` exists."""
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


def wait_for_kill_moment(proc: subprocess.Popen, count_dir: str, rng: random.Random, length: int) -> None:
    """Sleep until a random moment of the build: during start-up (1 in 5), or after a
    random number of examples (up to half of those left) were computed by this run."""
    if rng.random() < 0.2:
        time.sleep(rng.uniform(0.0, 0.6))
        return
    before = len(os.listdir(count_dir))
    left = max(1, length - len({int(n.split(".")[0]) for n in os.listdir(count_dir)}))
    target = before + rng.randint(1, max(1, left // 2))
    deadline = time.monotonic() + 60
    while proc.poll() is None and len(os.listdir(count_dir)) < target and time.monotonic() < deadline:
        time.sleep(0.005)


def committed_chunks(cache_dir: str) -> set[int] | None:
    """Chunks a resume will keep; None before the first manifest; all when complete."""
    n = committed_count(cache_dir)
    return None if n is None else set(range(n))


def check_intermediate_state(root: str, length: int, dataset: type = SlowDataset) -> None:
    """A killed build leaves a valid cache: verify is clean, reads return only truth."""
    cache_dir = os.path.join(root, "cached", NAME)
    if not os.path.exists(os.path.join(cache_dir, "manifest.json")):
        with pytest.raises(CacheNotFoundError):
            CachedDataset.from_cache(root, NAME)
        return
    if verify_supports_v2():
        report = verify_cache(cache_dir)
        assert report.ok, str(report)
    ds = CachedDataset.from_cache(root, NAME, verify=True)
    assert len(ds) == length
    for i in range(0, length, 7):
        try:
            got = ds[i]
        except IncompleteCacheError:
            continue
        assert_example_equal(got, dataset.expected(i), f"example {i}")


def random_kill_loop(tmp_path, kills: int, length: int, chunk: int, delay: float,
                     seed: int, dataset: type = SlowDataset) -> tuple[str, str, int]:
    """Kill builds at random moments until ``kills`` landed; then finish without kill."""
    rng = random.Random(seed)
    root = str(tmp_path / "crashed")
    count_dir = tmp_path / "count"
    count_dir.mkdir()
    cache_dir = os.path.join(root, "cached", NAME)
    landed = 0
    previous: set[int] = set()
    while landed < kills:
        proc = start_builder(root, length, chunk, delay=delay, count_dir=str(count_dir),
                             kind=KIND_OF[dataset])
        wait_for_kill_moment(proc, str(count_dir), rng, length)
        if proc.poll() is not None:  # finished (or failed) before the kill
            out, err = proc.communicate()
            assert proc.returncode == 0, err.decode()
            break
        kill_group(proc)
        landed += 1
        now = committed_chunks(cache_dir)
        if now is not None:
            assert previous <= now, f"committed chunks lost by kill {landed}: {sorted(previous - now)}"
            previous = now
        check_intermediate_state(root, length, dataset)
    # the final, uninterrupted resume recomputes no committed chunk
    before = dict(computations(str(count_dir)))
    proc = start_builder(root, length, chunk, delay=0, count_dir=str(count_dir),
                         kind=KIND_OF[dataset])
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err.decode()
    after = computations(str(count_dir))
    recomputed = {i for i in range(length) if after.get(i, 0) > before.get(i, 0) and i // chunk in previous}
    assert not recomputed, f"the resume recomputed committed examples {sorted(recomputed)[:10]}"
    assert set(after) == set(range(length))
    return root, cache_dir, landed


# -- new format: random kills ----------------------------------------------------------
def _random_kills(tmp_path, kills, length, seed, kind="slow"):
    chunk = 8
    dataset = DATASETS[kind]
    ref = reference_cache(str(tmp_path / "ref"), length, chunk, dataset=dataset)
    root, cache_dir, landed = random_kill_loop(tmp_path, kills, length, chunk, 0.004, seed, dataset)
    assert landed == kills, f"only {landed} of {kills} kills landed before the build finished"
    assert_v2_layout(tree(ref))
    assert tree(cache_dir) == tree(ref), "resumed cache differs from an uninterrupted build"
    assert temp_files(root) == []
    ds = CachedDataset.from_cache(root, NAME, verify=True)
    for i in range(length):
        assert_example_equal(ds[i], dataset.expected(i), f"example {i}")
    if dataset.columnar:
        idx = list(range(length - 1, -1, -7))
        assert_batch_equal(ds.get_batch(idx), idx, dataset)
    if verify_supports_v2():
        assert verify_cache(cache_dir).ok
    print(f"\ncrash ({kind}): {landed}/{kills} kills survived (length {length}, chunk {chunk})")


@pytest.mark.timeout(180)
@pytest.mark.parametrize("kind", KINDS)
def test_random_sigkill_resume_byte_identical(tmp_path, kind):
    _random_kills(tmp_path, kills=3, length=480, seed=1, kind=kind)


@pytest.mark.long
@pytest.mark.timeout(1800)
@pytest.mark.parametrize("kind", KINDS)
def test_random_sigkill_resume_byte_identical_long(tmp_path, kind):
    seed = int(time.time())
    print(f"\nseed {seed}")
    _random_kills(tmp_path, kills=20, length=1600, seed=seed, kind=kind)


# -- new format: every crash point ------------------------------------------------------
CP_LENGTH, CP_CHUNK = 24, 8


class _Crash:
    """Patches the file-system calls edcache makes on the cache and dies at the k-th."""

    def __init__(self, root: str, at: int | None, torn: bool) -> None:
        self.root, self.at, self.torn, self.count = os.path.realpath(root), at, torn, 0
        self.kinds: list[str] = []
        self.names: list[str] = []

    def _mine(self, path, dir_fd=None) -> bool:
        try:
            path = os.fspath(path)
            if dir_fd is not None and not os.path.isabs(path):  # shutil.rmtree's unlink / rmdir
                path = os.path.join(os.readlink(f"/proc/self/fd/{dir_fd}"), path)
            return os.path.realpath(path).startswith(self.root)
        except (TypeError, OSError):
            return False

    def point(self, write=None, name: str = "") -> None:
        self.count += 1
        self.kinds.append("w" if write is not None else "o")
        self.names.append(name)
        if self.count == self.at:
            if self.torn and write is not None:
                write()
            os.kill(os.getpid(), signal.SIGKILL)

    def install(self) -> None:
        import edcache.format.columnar.writer as writer
        import edcache.format.fsutil as fsutil

        real = {name: getattr(os, name)
                for name in ("replace", "rename", "unlink", "rmdir", "mkdir", "fsync", "write", "pwrite",
                             "ftruncate", "open")}
        real_write_file = fsutil.write_file
        real_syncfs = fsutil.sync_filesystem
        changes = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND

        def wrap_path(name):
            def f(*args, **kwargs):
                if self._mine(args[0], kwargs.get("dir_fd", kwargs.get("src_dir_fd"))):
                    self.point(name=f"{name} {os.path.basename(os.fspath(args[0]))}")
                return real[name](*args, **kwargs)
            return f

        def fd_mine(fd):
            try:
                return self._mine(os.readlink(f"/proc/self/fd/{fd}"))
            except OSError:
                return False

        def open_(path, flags, *args, **kwargs):  # creating, truncating or opening to write
            if flags & changes and self._mine(path, kwargs.get("dir_fd")):
                self.point(name=f"open {os.path.basename(os.fspath(path))}")
            return real["open"](path, flags, *args, **kwargs)

        def fsync(fd):
            if fd_mine(fd):
                self.point(name="fsync")
            return real["fsync"](fd)

        def syncfs(path):
            if self._mine(path):
                self.point(name="syncfs")
            return real_syncfs(path)

        def write(fd, data):  # commits.log records
            if fd_mine(fd):
                self.point(lambda: real["write"](fd, bytes(data)[: len(data) // 2]), "write")
            return real["write"](fd, data)

        def pwrite(fd, data, offset):  # column data and index files
            if fd_mine(fd):
                self.point(lambda: real["pwrite"](fd, bytes(data)[: len(data) // 2], offset), "pwrite")
            return real["pwrite"](fd, data, offset)

        def ftruncate(fd, length):  # a resume cuts columns back to their committed ends
            if fd_mine(fd):
                self.point(name="ftruncate")
            return real["ftruncate"](fd, length)

        def write_file(path, data, *args, **kwargs):  # atomic_write's temporary file
            if self._mine(path):
                def half():
                    with open(path, "wb") as fh:
                        fh.write(bytes(data)[: len(data) // 2])
                self.point(half, f"write_file {os.path.basename(path)}")
            return real_write_file(path, data, *args, **kwargs)

        for name in ("replace", "rename", "unlink", "rmdir", "mkdir"):
            setattr(os, name, wrap_path(name))
        os.fsync, os.write, os.pwrite, os.ftruncate, os.open = fsync, write, pwrite, ftruncate, open_
        fsutil.write_file = write_file
        fsutil.sync_filesystem = writer.sync_filesystem = syncfs


def _build_in_child(root: str, at: int | None, torn: bool, force: bool = False,
                    dataset: type = SlowDataset, keep_existing: bool = True) -> tuple[int, str]:
    """Fork; the child builds with num_workers=0 and dies at point ``at``.
    Returns (signal that ended the child or 0, the kinds of the points it passed:
    ``w`` a write that can be torn, ``o`` another operation)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        code = 1
        try:
            os.close(r)
            crash = _Crash(root, at, torn)
            crash.install()
            CachedDataset(dataset(root, NAME, CP_LENGTH), chunk_size=CP_CHUNK, num_workers=0,
                          progress=False, force_cache=force, keep_existing=keep_existing)
            os.write(w, ("".join(crash.kinds) + "\n" + "|".join(crash.names)).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(w)
    _, status = os.waitpid(pid, 0)
    data = os.read(r, 1 << 16)
    os.close(r)
    if os.WIFSIGNALED(status):
        return os.WTERMSIG(status), ""
    assert os.WEXITSTATUS(status) == 0, "the child build failed"
    kinds, _, names = data.decode().partition("\n")
    POINT_NAMES[:] = names.split("|")
    return 0, kinds


#: what each point of the last uninterrupted :func:`_build_in_child` was (``open NAME``,
#: ``pwrite``, ``write`` (log), ``replace NAME``, ``fsync``, ...)
POINT_NAMES: list[str] = []


def _kept_chunks(cache_dir: str) -> tuple[set[int], str]:
    """The chunks a resume must not compute again, and the phase of the build a kill
    left: ``building`` (some chunks committed), ``finalizing`` (every chunk committed in
    ``commits.log``; labels, ``checksums.npy`` or the complete manifest being written)
    or ``complete``."""
    n = committed_count(cache_dir)
    if n is None:
        return set(), "building"
    m = read_manifest(cache_dir)
    if m.complete:
        return set(range(m.num_chunks)), "complete"
    return set(range(n)), "finalizing" if n == m.num_chunks else "building"


def _log_records(cache_dir: str) -> tuple[int, int]:
    """(schema records, chunk records) in ``commits.log`` (0, 0 if there is none)."""
    try:
        with open(os.path.join(cache_dir, "commits.log"), "rb") as f:
            lines = f.read().split(b"\n")
    except FileNotFoundError:
        return 0, 0
    return sum(line.startswith(b'{"schema"') for line in lines), sum(line.startswith(b'{"c"') for line in lines)


#: CI tries every 3rd crash point of the mixed-schema build (promotions, layouts) and
#: every 8th point of the other builds; ``-m long`` tries every point of every build.
CI_STRIDE = {"slow": 8, "uniform": 8, "ragged": 8, "mixed": 3}
KIND_STRIDES = [pytest.param(k, CI_STRIDE[k], id=k) for k in KINDS] + [
    pytest.param(k, 1, id=f"{k}-all", marks=pytest.mark.long) for k in KINDS if CI_STRIDE[k] != 1]


@pytest.mark.timeout(600)
@pytest.mark.parametrize("kind,stride", KIND_STRIDES)
def test_every_crash_point_resumes_byte_identical(tmp_path, kind, stride):
    dataset = DATASETS[kind]
    ref = tree(reference_cache(str(tmp_path / "ref"), CP_LENGTH, CP_CHUNK, dataset=dataset))
    assert_v2_layout(ref)
    sig, kinds = _build_in_child(str(tmp_path / "count"), None, False, dataset=dataset)
    points = len(kinds)
    assert sig == 0 and points > 10
    tried = survived = stale_logs = 0
    phases: dict[str, int] = {}
    forced_resumes = schema_changes_killed = 0
    for torn in (False, True):
        for at in range(1 + (int(torn) * 2) % stride, points + 1, stride):
            if torn and kinds[at - 1] != "w":
                continue
            root = str(tmp_path / f"cp-{int(torn)}-{at}")
            sig, _ = _build_in_child(root, at, torn, dataset=dataset)
            assert sig == signal.SIGKILL, f"point {at} was not reached"
            tried += 1
            cache_dir = os.path.join(root, "cached", NAME)
            where = f"crash point {at}{' (torn write)' if torn else ''}"
            kept, phase = _kept_chunks(cache_dir)
            schemas, chunks = _log_records(cache_dir)
            if schemas > 1 and phase == "building":
                schema_changes_killed += 1  # killed after a column was promoted
            if os.path.exists(os.path.join(cache_dir, "manifest.json")):
                if verify_supports_v2():
                    report = verify_cache(cache_dir)
                    problems = [p for p in report.problems if not (torn and "torn" in p.message)]
                    assert not problems, f"{where}: {report}"
                ds = CachedDataset.from_cache(root, NAME, verify=True)
                readable = 0
                for i in range(CP_LENGTH):
                    try:
                        assert_example_equal(ds[i], dataset.expected(i), f"{where}, example {i}")
                        readable += 1
                    except IncompleteCacheError:
                        pass
                # exactly the committed chunks read, whatever the phase
                assert readable == min(len(kept) * CP_CHUNK, CP_LENGTH), \
                    f"{where} ({phase}): {readable} read, {len(kept)} chunks committed"
                if dataset.columnar:
                    try:
                        batch = ds.get_batch(list(range(CP_LENGTH - 1, -1, -3)))
                    except IncompleteCacheError:
                        pass
                    else:
                        assert_batch_equal(batch, range(CP_LENGTH - 1, -1, -3), dataset, where)
            phases[phase] = phases.get(phase, 0) + 1
            killed_complete = (committed_chunks(cache_dir) or set()) == set(range(CP_LENGTH // CP_CHUNK)) \
                and read_manifest(cache_dir).complete
            count = tmp_path / f"count-{int(torn)}-{at}"
            count.mkdir()
            # resume by running the build again; every other point as a forced rerun
            # (force_cache=True, keep_existing=True), which must keep the work just as well
            forced = tried % 2 == 0
            forced_resumes += forced
            CachedDataset(dataset(root, NAME, CP_LENGTH, count_dir=str(count)), chunk_size=CP_CHUNK,
                          num_workers=0, progress=False, force_cache=forced)
            recomputed = sorted(i for i in computations(str(count)) if i // CP_CHUNK in kept)
            assert not recomputed, f"{where} ({phase}): the resume recomputed committed examples {recomputed}"
            got = tree(cache_dir)
            if killed_complete and "commits.log" in got:
                # Killed between writing the complete manifest and deleting the log: the
                # log stays (harmless, noted by verify) because opening a complete cache
                # writes nothing. See docs/reliability.md. A forced rerun removes it.
                assert not forced, f"{where}: a forced rerun left the stale commits.log"
                del got["commits.log"]
                stale_logs += 1
            assert got == ref, f"{where}: resumed cache differs from the reference"
            assert temp_files(root) == [], where
            survived += 1
    # the points cover every phase: before the first commit, between commits,
    # finalizing (labels, checksums.npy, manifest) and after completion
    assert phases.get("building", 0) >= 5, phases
    if stride <= 3:
        assert phases.get("finalizing", 0) >= 3 and phases.get("complete", 0) >= 1, phases
    if kind == "mixed":  # kills after a promotion's schema record, before later commits
        assert schema_changes_killed >= 3, schema_changes_killed
    print(f"\ncrash points ({kind}, every {stride}): {survived}/{tried} survived ({points} file-system operations "
          f"({kinds.count('w')} writes, also torn); {forced_resumes} resumed with force_cache=True); "
          f"stale commits.log left {stale_logs} times; "
          f"phases at the kill {dict(sorted(phases.items()))}, after a promotion {schema_changes_killed}")


# -- legacy zip: random kills ---------------------------------------------------------
def _zip_members(path: str) -> dict[str, bytes]:
    with zipfile.ZipFile(path) as zf:
        return {info.filename: zf.read(info) for info in zf.infolist()}


def _legacy_kills(tmp_path, kills, length, seed):
    try:
        from edcache.format.legacy import LegacyZipSink  # noqa: F401
    except ImportError:  # pragma: no cover
        pytest.skip("edcache.format.legacy.LegacyZipSink does not exist yet")
    chunk = 8
    ref = reference_cache(str(tmp_path / "ref"), length, chunk, legacy=True)
    rng = random.Random(seed)
    root = str(tmp_path / "crashed")
    count_dir = tmp_path / "count"
    count_dir.mkdir()
    landed = 0
    while landed < kills:
        proc = start_builder(root, length, chunk, delay=0.004, legacy=True, count_dir=str(count_dir))
        wait_for_kill_moment(proc, str(count_dir), rng, length)
        if proc.poll() is not None:
            assert proc.returncode == 0, proc.communicate()[1].decode()
            break
        kill_group(proc)
        landed += 1
    proc = start_builder(root, length, chunk, delay=0, legacy=True)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err.decode()
    assert landed == kills
    zip_path = os.path.join(root, "cached", NAME + ".zip")
    got, want = _zip_members(zip_path), _zip_members(ref)
    assert sorted(got) == sorted(want)
    from edcache.format.legacy import safe_loads

    for name in want:  # member order and timestamps follow commit times; the bytes do not
        if name == "labels.p":  # rebuilt from read-back values: same values, other pickle memo
            assert_example_equal(safe_loads(got[name], member=name), safe_loads(want[name], member=name), name)
        else:
            assert got[name] == want[name], name
    assert temp_files(root) == []
    assert sorted(os.listdir(os.path.join(root, "cached"))) == sorted(os.listdir(os.path.dirname(ref)))
    ds = CachedDataset.from_cache(root, NAME)
    for i in range(0, length, 5):
        got_ex = ds[i]
        assert got_ex["name"] == expected(i)["name"] and got_ex["label"] == expected(i)["label"]
    print(f"\ncrash (legacy zip): {landed}/{kills} kills survived")


@pytest.mark.timeout(180)
def test_random_sigkill_legacy_zip_resume(tmp_path):
    _legacy_kills(tmp_path, kills=3, length=480, seed=2)


@pytest.mark.long
@pytest.mark.timeout(1800)
def test_random_sigkill_legacy_zip_resume_long(tmp_path):
    seed = int(time.time())
    print(f"\nseed {seed}")
    _legacy_kills(tmp_path, kills=20, length=1600, seed=seed)


def test_killed_builder_never_leaves_unreadable_state_for_waiters(tmp_path):
    """After a kill, a new builder takes the lock (flock dies with the process) at once."""
    root = str(tmp_path / "r")
    proc = start_builder(root, 400, 8, delay=0.004)
    time.sleep(0.8)
    kill_group(proc)
    t = CachedDataset(SlowDataset(root, NAME, 400), chunk_size=8, num_workers=0, progress=False)
    assert len(t) == 400 and (not verify_supports_v2() or verify_cache(t.path).ok)


@pytest.mark.timeout(120)
def test_coordinator_killed_alone_workers_exit(tmp_path):
    """The OOM killer (or ``kill -9 PID``) ends only the coordinator: its pool workers must
    not live on forever, and a resumed build is still byte-identical."""
    length, chunk = 800, 8
    ref = reference_cache(str(tmp_path / "ref"), length, chunk)
    root = str(tmp_path / "r")
    count = tmp_path / "count"
    count.mkdir()
    args = [sys.executable, "-c", CLI_CODE, "build", root, NAME, str(length), "--delay", "0.004",
            "--chunk-size", str(chunk), "--workers", "2", "--count-dir", str(count)]
    # no pipes: orphaned workers would hold them open
    proc = subprocess.Popen(args, env=subprocess_env(), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while len(os.listdir(count)) < 100 and time.monotonic() < deadline:
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        deadline = time.monotonic() + 20
        while _group_alive(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        survivors = _group_alive(proc.pid)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert not survivors, "pool workers outlived their killed coordinator"
    resume = start_builder(root, length, chunk, delay=0)
    _, err = resume.communicate(timeout=120)
    assert resume.returncode == 0, err.decode()
    assert tree(os.path.join(root, "cached", NAME)) == tree(ref)
    assert temp_files(root) == []


FORCED_MODES = {
    # force_cache=True over a complete cache: nothing to do, nothing written
    "intact": (True, None),
    # ... whose label file was deleted: the label file is rewritten from the columns
    "label-lost": (True, "labels/1.npy"),
    # force_cache=True, keep_existing=False: start over (new log, incomplete manifest,
    # old files unlinked), then build everything again
    "start-over": (False, None),
}


FORCED_CASES = [pytest.param(k, m, 1, id=f"{k}-{m}") for k in KINDS for m in ("intact", "label-lost")] + [
    pytest.param("mixed", "start-over", 6, id="mixed-start-over")] + [
    pytest.param(k, "start-over", 1, id=f"{k}-start-over-all", marks=pytest.mark.long) for k in KINDS]


@pytest.mark.timeout(600)
@pytest.mark.parametrize("kind,mode,stride", FORCED_CASES)
def test_every_crash_point_of_a_forced_rerun_keeps_all_work(tmp_path, kind, mode, stride):
    """``force_cache=True`` over a complete cache, killed at every file-system operation:
    with ``keep_existing=True`` the next run recomputes nothing and the cache is
    byte-identical again; with ``keep_existing=False`` (start over) every state reads
    either the old complete cache or a valid incomplete one, and a resume finishes it
    byte-identically."""
    import shutil

    keep, damage = FORCED_MODES[mode]
    dataset = DATASETS[kind]
    ref_dir = reference_cache(str(tmp_path / "ref"), CP_LENGTH, CP_CHUNK, dataset=dataset)
    ref = tree(ref_dir)
    assert_v2_layout(ref)

    def copy(root: str) -> str:
        shutil.copytree(os.path.dirname(ref_dir), os.path.join(root, "cached"))
        cache_dir = os.path.join(root, "cached", NAME)
        if damage:
            os.unlink(os.path.join(cache_dir, damage))
        return cache_dir

    probe = str(tmp_path / "probe")
    copy(probe)
    sig, kinds = _build_in_child(probe, None, False, force=True, dataset=dataset, keep_existing=keep)
    assert sig == 0
    assert tree(os.path.join(probe, "cached", NAME)) == ref
    if mode == "intact":  # a complete cache is kept untouched: not one write (only the lock
        # file, and unlinks of v1 leftovers / a stale log that are not there)
        assert "w" not in kinds, list(zip(kinds, POINT_NAMES))
    else:
        assert len(kinds) > (30 if mode == "start-over" else 3), kinds
    lost, old_read = [], 0
    tried = 0
    for at in range(1, len(kinds) + 1, stride):
        tried += 1
        root = str(tmp_path / f"f-{at}")
        cache_dir = copy(root)
        sig, _ = _build_in_child(root, at, False, force=True, dataset=dataset, keep_existing=keep)
        assert sig == signal.SIGKILL
        where = f"crash point {at} of a forced rerun ({mode})"
        # the state left is valid: every example that reads is true
        try:
            ds = CachedDataset.from_cache(root, NAME, verify=True)
        except CorruptCacheError as exc:
            # the label file deleted before this run and not rewritten yet: opening
            # names it (v2 opens the label files with the columns)
            assert damage and damage in str(exc), f"{where}: {exc}"
            ds = None
        readable = 0
        for i in range(CP_LENGTH if ds is not None else 0):
            try:
                assert_example_equal(ds[i], dataset.expected(i), f"{where}, example {i}")
                readable += 1
            except IncompleteCacheError:
                pass
        old_read += readable == CP_LENGTH
        if keep and ds is not None:
            assert readable == CP_LENGTH, f"{where}: {readable} examples read"
        count = tmp_path / f"count-{at}"
        count.mkdir()
        # resuming = running the interrupted command again, with keep_existing=True (with
        # keep_existing=False it would start over once more)
        CachedDataset(dataset(root, NAME, CP_LENGTH, count_dir=str(count)), chunk_size=CP_CHUNK,
                      num_workers=0, progress=False, force_cache=True)
        if keep and computations(str(count)):
            lost.append((at, len(computations(str(count)))))
        got = tree(cache_dir)
        if "commits.log" in got and read_manifest(cache_dir).complete and not keep:
            del got["commits.log"]  # killed right after completion (see the crash-point test)
        assert got == ref, f"{where}: cache differs after resuming"
        assert temp_files(root) == []
    assert not lost, f"killed at these points, the resume recomputed committed examples: {lost}"
    print(f"\nforced rerun ({kind}, {mode}): {tried}/{tried} crash points (every {stride} of {len(kinds)}) "
          f"left a valid cache"
          f"{' and lost no work' if keep else f' (old cache wholly readable at {old_read})'}")


def test_resume_killed_before_columns_dir(tmp_path):
    """Killed at the ``mkdir columns`` of a new build: the directory holds the header-only
    ``commits.log`` and the incomplete manifest; the next run completes it. (Found by the
    crash points: every later run failed with FileNotFoundError; fixed in 999c6f5.)"""
    root = str(tmp_path / "r")
    probe = str(tmp_path / "probe")
    _build_in_child(probe, None, False)
    at = next(n for n, name in enumerate(POINT_NAMES, 1) if name == "mkdir columns")
    sig, _ = _build_in_child(root, at, False)
    assert sig == signal.SIGKILL
    ds = CachedDataset(SlowDataset(root, NAME, CP_LENGTH), chunk_size=CP_CHUNK, num_workers=0, progress=False)
    assert_example_equal(ds[CP_LENGTH - 1], SlowDataset.expected(CP_LENGTH - 1))


def test_read_schema_record_before_first_commit(tmp_path):
    """Killed (or read by another process) between the schema record and chunk 0's commit
    record: nothing is committed, so a read says 'not cached yet' and verify is clean; a
    resume starts afresh (nothing was committed), so a reader opened before says the
    cache was started over. (Found by the crash points and the readers during a build:
    CorruptCacheError 'index file has 0 bytes', for good, and verify said DAMAGED; fixed
    in 3d410af.)"""
    root = str(tmp_path / "r")
    _build_in_child(str(tmp_path / "probe"), None, False)
    at = [n for n, name in enumerate(POINT_NAMES, 1) if name == "write"][1]  # chunk 0's record
    sig, _ = _build_in_child(root, at, False)
    assert sig == signal.SIGKILL
    report = verify_cache(os.path.join(root, "cached", NAME))
    ds = CachedDataset.from_cache(root, NAME)
    problems = []
    try:
        ds[0]
    except IncompleteCacheError:
        pass
    except EdcacheError as exc:
        problems.append(f"read: {exc}")
    # edcache verify says DAMAGED "columns/0001.index (examples 0..-1): holds 0 bytes, 8
    # needed for 0 rows" for the same state
    if not report.ok:
        problems.append(str(report))
    # the reader opened in that state, after the build completed: the data, or "started over"
    CachedDataset(SlowDataset(root, NAME, CP_LENGTH), chunk_size=CP_CHUNK, num_workers=0, progress=False)
    try:
        assert_example_equal(ds[0], SlowDataset.expected(0))
    except CacheRebuiltError:
        pass
    except EdcacheError as exc:
        problems.append(f"same reader after completion: {exc}")
    assert not problems, problems


def test_kill_during_promotion_keeps_work(tmp_path):
    """MixedDataset: ``score`` is promoted (fixed int -> record) when chunk 1 arrives.
    Killed right after ``unlink columns/0003.data``: chunk 0 is committed, so it reads
    back, and a resume does not compute it again. (Found by the crash points: the old
    file was unlinked before the schema record naming the new one; fixed in 3d410af.)"""
    from reliability_datasets import MixedDataset

    root = str(tmp_path / "r")
    _build_in_child(str(tmp_path / "probe"), None, False, dataset=MixedDataset)
    at = POINT_NAMES.index("unlink 0003.data") + 2  # killed before the next operation
    sig, _ = _build_in_child(root, at, False, dataset=MixedDataset)
    assert sig == signal.SIGKILL
    cache_dir = os.path.join(root, "cached", NAME)
    assert committed_count(cache_dir) == 1
    problems = []
    try:
        assert_example_equal(CachedDataset.from_cache(root, NAME)[0], MixedDataset.expected(0))
    except EdcacheError as exc:
        problems.append(f"read: {exc}")
    count = tmp_path / "count"
    count.mkdir()
    CachedDataset(MixedDataset(root, NAME, CP_LENGTH, count_dir=str(count)), chunk_size=CP_CHUNK,
                  num_workers=0, progress=False)
    recomputed = sorted(i for i in computations(str(count)) if i < CP_CHUNK)
    if recomputed:
        problems.append(f"resume recomputed committed examples {recomputed}")
    assert not problems, problems
