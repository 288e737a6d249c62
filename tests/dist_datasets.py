"""Tiny datasets for the distributed tests, importable by worker subprocesses.

The factories read their parameters from environment variables, because ``edcache
--server --dataset tests.dist_datasets.make`` calls them without arguments:

* ``EDCACHE_TEST_ROOT``: the dataset's ``root`` (the cache goes to ``<root>/cached/``);
* ``EDCACHE_TEST_N``: number of examples (default 96);
* ``EDCACHE_TEST_DELAY``: seconds of work per example (default 0.005);
* ``EDCACHE_TEST_LOG``: if set, every computed index is appended as ``index pid``;
* ``EDCACHE_TEST_FAIL_AT``: if set, ``dataset[i]`` raises for that index;
* ``EDCACHE_TEST_CRASH_AT``: if set, ``dataset[i]`` kills its process for that index.
"""

from __future__ import annotations

import os
import time

import numpy as np

from edcache import DatasetMixin

FAILURE_MARKER = "dist-datasets-deliberate-failure"


class Squares(DatasetMixin):
    """Deterministic examples with arrays, strings and a label column."""

    #: test plumbing, not configuration (issue 16 item 21)
    fingerprint_exclude = ("delay", "log", "fail_at", "crash_at")

    name = "squares"
    in_memory_keys = ["label"]

    def __init__(self, root: str, n: int = 96, delay: float = 0.005, log: str | None = None,
                 fail_at: int | None = None, crash_at: int | None = None) -> None:
        self.root = root
        self.n = n
        self.delay = delay
        self.log = log
        self.fail_at = fail_at
        self.crash_at = crash_at

    def __len__(self) -> int:
        return self.n

    def get_example(self, i: int) -> dict:
        if self.log:
            fd = os.open(self.log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, f"{i} {os.getpid()}\n".encode())
            finally:
                os.close(fd)
        if self.delay:
            time.sleep(self.delay)
        if self.fail_at is not None and i == self.fail_at:
            _explode(i)
        if self.crash_at is not None and i == self.crash_at:
            os._exit(70)  # like a segfault or the OOM killer: no exception, the process is gone
        rng = np.random.default_rng(i)
        return {
            "image": rng.integers(0, 255, size=(8, 8, 3), dtype=np.uint8),
            "vector": np.arange(i, i + 5, dtype=np.float32),
            "label": i % 7,
            "text": f"example {i}",
            "ragged": np.zeros(i % 4, dtype=np.int16),
        }


def _explode(i: int) -> None:
    raise RuntimeError(f"{FAILURE_MARKER} at index {i}")


def make() -> Squares:
    """Factory of :class:`Squares` configured by the environment (see the module doc)."""
    env = os.environ
    fail, crash = env.get("EDCACHE_TEST_FAIL_AT"), env.get("EDCACHE_TEST_CRASH_AT")
    return Squares(
        env.get("EDCACHE_TEST_ROOT", "/nonexistent-edcache-test-root"),
        n=int(env.get("EDCACHE_TEST_N", "96")),
        delay=float(env.get("EDCACHE_TEST_DELAY", "0.005")),
        log=env.get("EDCACHE_TEST_LOG") or None,
        fail_at=int(fail) if fail else None,
        crash_at=int(crash) if crash else None,
    )


def broken_factory() -> Squares:
    raise RuntimeError("this factory is broken on purpose")


# -- helpers for the tests: processes started by a test, stopped by their own ids ----------
import json  # noqa: E402
import re  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
SRC = os.path.join(os.path.dirname(HERE), "src")
EDCACHE = [sys.executable, "-u", "-m", "edcache.cli.main"]  # the `edcache` command


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def subprocess_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([SRC, HERE, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["PYTHONUNBUFFERED"] = "1"
    env.update({k: str(v) for k, v in extra.items()})
    return env


class Proc:
    """A command started in its own process group, with its output in files."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], logdir: str) -> None:
        self.name = name
        self.argv = argv
        self.out_path = os.path.join(logdir, f"{name}.out")
        self.err_path = os.path.join(logdir, f"{name}.err")
        with open(self.out_path, "wb") as out, open(self.err_path, "wb") as err:
            self.popen = subprocess.Popen(argv, stdout=out, stderr=err, env=env, start_new_session=True)
        self.pid = self.popen.pid

    def stdout(self) -> str:
        with open(self.out_path, errors="replace") as f:
            return f.read()

    def stderr(self) -> str:
        with open(self.err_path, errors="replace") as f:
            return f.read()

    def output(self) -> str:
        return self.stdout() + self.stderr()

    def alive(self) -> bool:
        return self.popen.poll() is None

    def wait(self, timeout: float) -> int:
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"{self.name} still running after {timeout} s\n--- stdout:\n{self.stdout()[-3000:]}"
                f"\n--- stderr:\n{self.stderr()[-6000:]}"
            ) from None

    def wait_for_output(self, pattern: str, timeout: float) -> re.Match:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            m = re.search(pattern, self.output())
            if m:
                return m
            if not self.alive():
                m = re.search(pattern, self.output())
                if m:
                    return m
                raise AssertionError(f"{self.name} exited ({self.popen.returncode}) before printing "
                                     f"{pattern!r}:\n{self.output()[-6000:]}")
            time.sleep(0.05)
        raise AssertionError(f"{self.name} did not print {pattern!r} in {timeout} s:\n{self.output()[-6000:]}")

    def pids(self) -> list[int]:
        """This process and its descendants."""
        import psutil

        try:
            p = psutil.Process(self.pid)
            return [self.pid] + [c.pid for c in p.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def kill_group(self, sig: int = signal.SIGKILL) -> None:
        """Signal the process group this Proc created (its pgid is its own pid)."""
        try:
            os.killpg(self.pid, sig)
        except ProcessLookupError:
            pass

    def stop(self) -> None:
        if self.alive():
            self.kill_group(signal.SIGTERM)
            try:
                self.popen.wait(10)
            except subprocess.TimeoutExpired:
                pass
        self.kill_group(signal.SIGKILL)  # stragglers of the group (spawned workers)
        try:
            self.popen.wait(10)
        except subprocess.TimeoutExpired:
            pass


def read_log(path: str) -> list[tuple[int, int]]:
    """``(index, pid)`` lines written by :class:`Squares` with a log."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [tuple(map(int, line.split())) for line in f if line.strip().count(" ") == 1]


def read_commit_log(cache_dir: str) -> set[int]:
    """Chunk ids in the commit log of an unfinished shard cache."""
    path = os.path.join(cache_dir, "commits.log")
    if not os.path.exists(path):
        return set()
    out = set()
    with open(path) as f:
        for line in f:
            try:
                out.add(json.loads(line)["c"])
            except (ValueError, KeyError):
                pass
    return out


def tree_files(root: str) -> dict[str, bytes]:
    """Every file under ``root`` (relative path -> bytes)."""
    files = {}
    for dirpath, _, names in os.walk(root):
        for name in names:
            full = os.path.join(dirpath, name)
            with open(full, "rb") as f:
                files[os.path.relpath(full, root)] = f.read()
    return files
