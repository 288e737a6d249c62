"""Datasets for the build and scale figures (module level so worker processes can
unpickle them)."""

from __future__ import annotations

import time

import numpy as np

try:
    from edcache import DatasetMixin as _Base
except Exception:  # edcache not importable yet: the tasks that need it skip
    _Base = object


def _work(i: int, iters: int) -> np.ndarray:
    x = np.full(256, float(i % 97) / 97.0)
    for _ in range(iters):
        x = np.sin(x) * 0.5 + 0.25
    return x


def calibrate_iters(ms: float) -> int:
    """Iterations of the numpy loop that take about ``ms`` milliseconds here."""
    iters = 100
    _work(0, iters)
    while True:
        t0 = time.perf_counter()
        for i in range(5):
            _work(i, iters)
        per = (time.perf_counter() - t0) / 5
        if per > 0.5e-3:
            return max(1, int(iters * (ms * 1e-3) / per))
        iters *= 4


class CPUBound(_Base):
    """``get_example`` costs a fixed, known amount of CPU (a numpy loop)."""

    in_memory_keys = ["label"]

    def __init__(self, root: str, name: str, n: int, iters: int) -> None:
        self.root, self.name, self.n, self.iters = root, name, n, iters

    def __len__(self) -> int:
        return self.n

    def get_example(self, i: int) -> dict:
        return {"feat": _work(i, self.iters).astype(np.float32), "label": i % 10}


class Tiny(_Base):
    """Tiny examples (a few numbers) for the 1M-example scale figures."""

    in_memory_keys = ["label"]

    def __init__(self, root: str, name: str, n: int) -> None:
        self.root, self.name, self.n = root, name, n

    def __len__(self) -> int:
        return self.n

    def get_example(self, i: int) -> dict:
        return {"label": i % 1000, "x": i * 0.5, "y": i % 7, "z": -i}


class Images(_Base):
    """The medium shape (256x256x3 uint8 random image + int label), generated per index,
    for the peak-disk figure of a build."""

    in_memory_keys = ["label"]

    def __init__(self, root: str, name: str, n: int) -> None:
        self.root, self.name, self.n = root, name, n

    def __len__(self) -> int:
        return self.n

    def get_example(self, i: int) -> dict:
        rng = np.random.default_rng([20240611, 3, i])
        return {"image": rng.integers(0, 256, (256, 256, 3), dtype=np.uint8), "label": i % 1000}
