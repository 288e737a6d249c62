"""Datasets for the parity tests; a module of its own so subprocesses can import it."""

from __future__ import annotations

import os
import signal

import numpy as np

from core_datasets import record_computation


class Versioned:
    """``{"i", "v", "noise"}`` where ``v`` is the dataset's ``version`` and ``noise`` is new
    at every computation (a random augmentation). No ``root``/``name`` unless given.

    ``kill_at`` SIGKILLs the process when that index is computed; ``log_dir`` records
    every computed index (see :func:`record_computation`).
    """

    in_memory_keys = ["v", "noise"]

    def __init__(self, n=20, version=0, kill_at=None, log_dir=None, root=None, name=None):
        self.n, self.version, self.kill_at, self.log_dir = n, version, kill_at, log_dir
        if root is not None:
            self.root = root
        if name is not None:
            self.name = name

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        if i == self.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        record_computation(self.log_dir, i)
        return {"i": i, "v": self.version, "noise": float(np.random.random())}



class Images:
    """Fixed-shape arrays and numbers only: what torch's default collate stacks."""

    in_memory_keys = ["label"]

    def __init__(self, root, n=40, name="images"):
        self.root, self.n, self.name = root, n, name

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return {"image": np.full((4, 5, 3), i, dtype=np.uint8), "label": i % 3,
                "weight": np.float32(i) / 2}


def recording_write_photo(job):
    """``edcache.demo._write_photo`` that also records which process wrote the photo."""
    from edcache import demo

    path, i = job
    with open(os.path.join(os.path.dirname(os.path.dirname(path)), f"pid-{os.getpid()}"), "a") as f:
        f.write(f"{i}\n")
    demo._ORIGINAL_WRITE_PHOTO(job)
