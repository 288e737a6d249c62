"""``edcache --server`` / ``edcache --address`` end to end, on 127.0.0.1 with mutual TLS.

Every process is started by the test in its own process group and stopped by that
group's id. Datasets come from ``tests/dist_datasets.py`` (on the workers' PYTHONPATH).
"""

from __future__ import annotations

import os
import shlex
import signal
import time

import pytest

from dist_datasets import (
    EDCACHE,
    FAILURE_MARKER,
    Proc,
    Squares,
    free_port,
    read_commit_log,
    read_log,
    subprocess_env,
    tree_files,
)
from edcache import CachedDataset
from edcache.distributed.security import ensure_credentials

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(180)]

CHUNK = 8


@pytest.fixture
def cluster(tmp_path):
    """Start processes for one test; stop all of them (by process group) afterwards."""

    class Cluster:
        def __init__(self) -> None:
            self.procs: list[Proc] = []
            self.root = str(tmp_path / "dist")
            self.logdir = str(tmp_path / "logs")
            self.credentials = str(tmp_path / "creds" / "cluster.pem")
            self.example_log = str(tmp_path / "examples.log")
            os.makedirs(self.logdir)
            self.env: dict[str, str] = {}
            self.port = free_port()

        def configure(self, n: int, delay: float, credentials: bool = True, **extra: str) -> None:
            """Dataset parameters; ``credentials``: create the cluster's file now (as a
            previous server start would have), so workers can start before the server."""
            if credentials:
                ensure_credentials(self.credentials)
            self.n = n
            self.env = subprocess_env(
                EDCACHE_TEST_ROOT=self.root, EDCACHE_TEST_N=str(n), EDCACHE_TEST_DELAY=str(delay),
                EDCACHE_TEST_LOG=self.example_log, **extra,
            )

        def start(self, name: str, *args: str) -> Proc:
            proc = Proc(name, [*EDCACHE, *args], self.env, self.logdir)
            self.procs.append(proc)
            return proc

        def server(self, name: str = "server", *args: str) -> Proc:
            return self.start(
                name, "--server", "--dataset", "dist_datasets.make", "--host", "127.0.0.1",
                "--port", str(self.port), "--chunk-size", str(CHUNK), "--credentials",
                self.credentials, *args,
            )

        def worker(self, name: str, *args: str) -> Proc:
            return self.start(
                name, "--address", f"127.0.0.1:{self.port}", "--dataset", "dist_datasets.make",
                "--credentials", self.credentials, "--timeout", "60",
                *(args if "--nworkers" in args else ("--nworkers", "1", *args)),
            )

        @property
        def cache_dir(self) -> str:
            return os.path.join(self.root, "cached", "squares")

        def wait_commits(self, count: int, timeout: float = 60) -> set[int]:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                done = read_commit_log(self.cache_dir)
                if len(done) >= count:
                    return done
                time.sleep(0.02)
            outputs = "\n".join(f"--- {p.name}:\n{p.output()[-3000:]}" for p in self.procs)
            raise AssertionError(f"fewer than {count} chunks committed after {timeout} s\n{outputs}")

        def stop_all(self) -> None:
            for proc in self.procs:
                proc.stop()

    c = Cluster()
    try:
        yield c
    finally:
        c.stop_all()


def assert_equal_to_local_build(cluster, tmp_path) -> None:
    """The distributed cache is byte-identical (every file) to a local build."""
    local_root = str(tmp_path / "local")
    CachedDataset(Squares(local_root, n=cluster.n, delay=0), chunk_size=CHUNK, num_workers=0, progress=False)
    local = tree_files(os.path.join(local_root, "cached"))
    dist = tree_files(os.path.join(cluster.root, "cached"))
    assert sorted(dist) == sorted(local)
    for name in local:
        assert dist[name] == local[name], f"{name} differs from the local build"
    cached = CachedDataset.from_cache(cluster.root, "squares")
    assert len(cached) == cluster.n
    assert cached[cluster.n - 1]["text"] == f"example {cluster.n - 1}"


def listening_addresses(procs) -> list[tuple[str, int]]:
    import psutil

    found = []
    for proc in procs:
        for pid in proc.pids():
            try:
                conns = psutil.Process(pid).net_connections(kind="inet")
            except psutil.NoSuchProcess:
                continue
            found += [(c.laddr.ip, c.laddr.port) for c in conns if c.status == psutil.CONN_LISTEN]
    return found


def test_server_and_two_workers_build_equals_local_build(cluster, tmp_path):
    """Server plus two separate `--address` worker processes started from the printed command."""
    cluster.configure(n=120, delay=0.03, credentials=False)  # enough work for both to join
    server = cluster.server()
    line = server.wait_for_output(r"(?m)^edcache --address .*$", 30).group(0)
    assert os.stat(cluster.credentials).st_mode & 0o777 == 0o600
    argv = shlex.split(line)
    assert argv[:3] == ["edcache", "--address", f"127.0.0.1:{cluster.port}"]
    assert argv[argv.index("--credentials") + 1] == cluster.credentials
    server.wait_for_output("waiting for workers", 30)
    workers = [cluster.start(f"w{i}", *argv[1:], "--nworkers", "1", "--timeout", "60") for i in range(2)]
    server.wait_for_output(r"2 worker\(s\) connected", 60)
    # nothing but the TLS scheduler/worker ports listens, and only on loopback
    listening = listening_addresses([server, *workers])
    assert ("127.0.0.1", cluster.port) in listening
    assert all(ip == "127.0.0.1" for ip, _ in listening), listening
    assert server.wait(120) == 0, server.output()
    for w in workers:
        assert w.wait(60) == 0, w.output()
        assert "the server reports the cache complete" in w.stderr()
    assert_equal_to_local_build(cluster, tmp_path)
    pids = {pid for _, pid in read_log(cluster.example_log)}
    assert len(pids) >= 2, "both workers should have computed examples"


def test_shared_filesystem_mode_equals_local_build(cluster, tmp_path):
    """--shared-fs: workers write shard files themselves, the server commits them."""
    cluster.configure(n=64, delay=0.005)
    server = cluster.server("server", "--shared-fs", "--local-workers", "2")
    assert server.wait(120) == 0, server.output()
    assert_equal_to_local_build(cluster, tmp_path)
    # started again on a complete cache: nothing to do, no scheduler, exit 0
    again = cluster.server("again", "--local-workers", "2")
    assert again.wait(60) == 0, again.output()
    assert "is complete" in again.stderr() and "scheduler at" not in again.stderr()


def test_worker_killed_mid_chunk_then_all_gone_then_new_worker(cluster, tmp_path):
    """kill -9 of a worker host mid-chunk, then of the last one: a new worker finishes."""
    cluster.configure(n=192, delay=0.03)  # 24 chunks of 0.24 s
    server = cluster.server()
    a, b = cluster.worker("a"), cluster.worker("b")
    cluster.wait_commits(3)
    a_pids = wait_until_computing(cluster, a)  # kill host "a" while it computes a chunk
    a.kill_group(signal.SIGKILL)
    a.wait(10)
    killed_at = len(read_log(cluster.example_log))
    interrupted = {i // CHUNK for i, pid in read_log(cluster.example_log) if pid in a_pids}
    # then the last worker: nothing is connected; the server says it waits
    cluster.wait_commits(len(read_commit_log(cluster.cache_dir)) + 2)
    b_pids = set(b.pids())
    b.kill_group(signal.SIGKILL)
    b.wait(10)
    server.wait_for_output(r"no worker connected; waiting for workers(?![\s\S]*worker\(s\) connected)", 30)
    assert server.alive()
    committed_while_alone = read_commit_log(cluster.cache_dir)
    assert len(committed_while_alone) < 24
    c = cluster.worker("c")
    assert server.wait(120) == 0, server.output()
    assert c.wait(60) == 0, c.output()
    assert_equal_to_local_build(cluster, tmp_path)
    # a chunk that "a" was in the middle of was computed again by another worker
    log = read_log(cluster.example_log)
    redone = {i // CHUNK for i, pid in log[killed_at:] if pid not in a_pids}
    assert interrupted & redone, (interrupted, redone)
    assert any(pid not in a_pids | b_pids for _, pid in log), "the new worker did work"


def wait_until_computing(cluster, proc, timeout: float = 10) -> set[int]:
    """Wait until the last example computed came from ``proc``'s processes; return its pids."""
    pids = set(proc.pids())
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        log = read_log(cluster.example_log)
        if log and log[-1][1] in pids:
            return pids
        time.sleep(0.005)
    raise AssertionError(f"{proc.name} computed nothing for {timeout} s")


def test_hung_worker_host_is_dropped_after_worker_ttl(cluster, tmp_path):
    """SIGSTOP of a worker host mid-chunk: dropped after --worker-ttl, its chunk redone."""
    cluster.configure(n=320, delay=0.03)  # the healthy worker alone needs longer than the ttl
    server = cluster.server("server", "--worker-ttl", "3")
    a, b = cluster.worker("a"), cluster.worker("b")
    server.wait_for_output(r"2 worker\(s\) connected", 60)
    cluster.wait_commits(2)
    a_pids = wait_until_computing(cluster, a)
    a.kill_group(signal.SIGSTOP)
    stopped = time.monotonic()
    hung_chunk = read_log(cluster.example_log)[-1][0] // CHUNK
    server.wait_for_output(r"silent for \d+ s; dropping it", 30)
    # ttl 3 s + watchdog period + status poll; generous for loaded CI machines, and far
    # below Dask's own path (2 * ttl + a 30 s nanny timeout; 5 min ttl by default)
    assert time.monotonic() - stopped < 15
    a.kill_group(signal.SIGCONT)  # the zombie comes back: it must not break anything
    assert server.wait(120) == 0, server.output()
    assert_equal_to_local_build(cluster, tmp_path)
    redone_by = {pid for i, pid in read_log(cluster.example_log) if i // CHUNK == hung_chunk}
    assert redone_by - a_pids, "the hung host's chunk was computed by another worker"


def test_worker_before_server_and_server_restart_resumes(cluster, tmp_path):
    """Workers started first wait; the server is killed -9 and restarted: it resumes."""
    cluster.configure(n=192, delay=0.03)
    workers = cluster.worker("w", "--nworkers", "2")
    workers.wait_for_output("waiting for the server", 30)
    time.sleep(1)
    s1 = cluster.server("s1")
    cluster.wait_commits(4)
    s1.kill_group(signal.SIGKILL)
    s1.wait(10)
    committed = read_commit_log(cluster.cache_dir)
    assert 4 <= len(committed) < 24
    log_before = len(read_log(cluster.example_log))
    assert workers.alive()
    s2 = cluster.server("s2")
    assert s2.wait(120) == 0, s2.output()
    assert workers.wait(60) == 0, workers.output()
    assert "joined" in workers.stderr() and "again" in workers.stderr()
    assert_equal_to_local_build(cluster, tmp_path)
    recomputed = {i // CHUNK for i, _ in read_log(cluster.example_log)[log_before:]}
    assert not (recomputed & committed), "committed chunks must not be computed again"


def test_dataset_exception_reports_index_and_remote_traceback(cluster):
    cluster.configure(n=96, delay=0.002, EDCACHE_TEST_FAIL_AT="77")
    server = cluster.server("server", "--local-workers", "1")
    code = server.wait(120)
    err = server.stderr()
    assert code == 4, server.output()
    assert "index 77" in err
    assert FAILURE_MARKER in err
    assert "Traceback in the worker" in err and "_explode" in err  # the remote frames
    assert "Committed chunks are kept" in err
    committed = read_commit_log(cluster.cache_dir)
    assert committed and 77 // CHUNK not in committed
    assert committed == set(range(len(committed)))  # a prefix, appended in index order
    from edcache.verify import verify_cache

    assert verify_cache(cluster.cache_dir).ok


def test_chunk_that_kills_workers_stops_after_allowed_failures(cluster):
    """A chunk whose example kills the worker process: retried on restarted workers, then
    the build stops (exit 3) naming the chunk and allowed-failures; committed chunks kept."""
    cluster.configure(n=48, delay=0.002, EDCACHE_TEST_CRASH_AT="30")
    server = cluster.server("server", "--local-workers", "1", "--allowed-failures", "1")
    assert server.wait(120) == 3, server.output()
    err = server.stderr()
    assert "chunk 3 (examples 24..31)" in err and "allowed-failures" in err
    committed = read_commit_log(cluster.cache_dir)
    assert committed and 3 not in committed
    crashes = [pid for i, pid in read_log(cluster.example_log) if i == 30]
    assert len(set(crashes)) == 2  # the first attempt and one retry, in two processes


def test_worker_fails_fast_when_the_factory_cannot_be_imported(cluster):
    cluster.configure(n=8, delay=0)
    t0 = time.monotonic()
    w = cluster.start("w", "--address", f"127.0.0.1:{cluster.port}", "--dataset",
                      "no_such_module_anywhere.factory", "--credentials", cluster.credentials)
    assert w.wait(30) == 2
    assert time.monotonic() - t0 < 20
    assert "cannot import module 'no_such_module_anywhere'" in w.stderr()


def test_python_api_scheduler_keyword(cluster, tmp_path):
    """A bare `edcache --server` (no --dataset) serves `CachedDataset(..., scheduler=...)`."""
    cluster.configure(n=48, delay=0.002)
    server = cluster.start("server", "--server", "--host", "127.0.0.1", "--port", str(cluster.port),
                           "--credentials", cluster.credentials, "--local-workers", "2")
    server.wait_for_output(r"(?m)^edcache --address", 30)
    address = f"tls://127.0.0.1:{cluster.port}"
    ds = Squares(cluster.root, n=48, delay=0)
    ds.blob = bytes(200_000)  # a dataset object holding data: sent once per worker, not per task
    cached = CachedDataset(ds, chunk_size=CHUNK, scheduler=address, security=cluster.credentials,
                           progress=False)
    assert len(cached) == 48 and cached[5]["label"] == 5
    assert_equal_to_local_build(cluster, tmp_path)

    from edcache import cachable

    @cachable(str(tmp_path / "decorated"), scheduler=address, security=cluster.credentials,
              chunk_size=CHUNK, progress=False)
    def build(n):
        return Squares(str(tmp_path / "unused"), n=n, delay=0)

    assert build(20)[19]["text"] == "example 19"
    assert server.alive()
