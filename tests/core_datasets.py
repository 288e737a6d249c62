"""Datasets for the core tests; a module of its own so worker processes can import it."""

from __future__ import annotations

import os

import numpy as np

from edcache import DatasetMixin


def record_computation(log_dir, i):
    """Record one computation of example ``i`` as a new empty file in ``log_dir``."""
    if log_dir is not None:
        path = os.path.join(log_dir, f"{i}-{os.getpid()}-{os.urandom(4).hex()}")
        open(path, "w").close()


class Toy(DatasetMixin):
    """Examples with an image, scalars, a string, nested values and two label keys.

    If ``log_dir`` is set, every computed index is recorded as an empty file
    ``<log_dir>/<index>-<pid>-<n>`` so tests can count computations across processes.
    """

    #: test plumbing, not configuration (a fixed dataset resumes; issue 16 item 21)
    fingerprint_exclude = ("log_dir", "fail_at", "delay")

    in_memory_keys = ["cls", "split"]

    def __init__(self, root, n=200, name="toy", log_dir=None, fail_at=None, delay=0.0):
        self.root = str(root)
        self.name = name
        self.n = n
        self.log_dir = log_dir
        self.fail_at = fail_at
        self.delay = delay

    def __len__(self):
        return self.n

    def get_example(self, i):
        record_computation(self.log_dir, i)
        if self.fail_at is not None and i == self.fail_at:
            raise ValueError(f"broken example {i}")
        if self.delay:
            import time

            time.sleep(self.delay)
        return {
            "image": np.full((4, 5, 3), i % 251, dtype=np.uint8),
            "cls": i % 7,
            "split": "train" if i % 4 else "test",
            "weight": float(i) / 3,
            "meta": {"name": f"ex{i}", "pair": (i, np.float32(i / 2)), "ragged": np.arange(i % 5)},
        }


def make_toy():
    """Factory for CLI tests: root from $EDCACHE_TEST_ROOT."""
    return Toy(os.environ["EDCACHE_TEST_ROOT"], n=150)


def expected(i):
    """What Toy(...)[i] must read back as (computed independently of the cache)."""
    return Toy("/nonexistent", n=10**9)[i]


class DiesOnce(Toy):
    """Kills its own worker process (like a segfault) the first time it reaches ``die_at``."""

    fingerprint_exclude = ("log_dir", "fail_at", "delay", "die_at", "marker")

    def __init__(self, root, n, die_at, marker):
        super().__init__(root, n=n)
        self.die_at = die_at
        self.marker = marker

    def get_example(self, i):
        if i == self.die_at and not os.path.exists(self.marker):
            open(self.marker, "w").close()
            os._exit(9)
        return super().get_example(i)


class Flat(DatasetMixin):
    """Examples whose fields are all columns (same keys and kinds in every example):
    a finished cache of them is packed into one file. ``odd_at`` gives that one index
    a different schema (an extra key), which keeps the chunk-shard layout."""

    fingerprint_exclude = ("log_dir",)

    in_memory_keys = ["cls"]

    def __init__(self, root, n=300, name="flat", log_dir=None, odd_at=None):
        self.root = str(root)
        self.name = name
        self.n = n
        self.log_dir = log_dir
        self.odd_at = odd_at

    def __len__(self):
        return self.n

    def get_example(self, i):
        record_computation(self.log_dir, i)
        ex = {
            "image": np.full((3, 4), i % 251, dtype=np.uint8),
            "cls": i % 7,
            "weight": i / 3,
            "ok": bool(i % 2),
            "score": np.float32(i) / 2,
            "name": "é" * (i % 4) + str(i),
            "raw": bytes([i % 256]) * (i % 3),
            "none": None,
        }
        if i == self.odd_at:
            ex["extra"] = 1
        return ex


def flat_expected(i):
    return Flat("/nonexistent", n=10**9)[i]
