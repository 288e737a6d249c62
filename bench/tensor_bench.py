"""Tuple-of-tensors examples against the same data as a dict of numpy arrays (issue 12).

The "small" shape of the benchmark (a 32x32x3 uint8 image, an int label, a float, a
short str), cached twice with format v2:

* ``dict``:  ``{"image": ndarray, "label": int, "x": float, "s": str}`` (edflow's form;
  arrays come back as zero-copy read-only views of the memory map);
* ``tuple``: ``(image_tensor, label, x, s)`` with ``image_tensor`` a uint8 ``torch.Tensor``
  (comes back as a tensor owning a copy of the row: never a view of the map).

Times ``ds[i]`` over a random order of the examples, and one epoch of
``DataLoader(ds, batch_size=256, num_workers=2)`` with the default collate, and prints
the ratios tuple/dict. Standalone: ``python bench/tensor_bench.py [--n 20000] [--repeat 3]``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

import torch
from torch.utils.data import DataLoader

import edcache

SEED = 20240611


class Small:
    """The small shape as a dict of numpy arrays (``tensors=False``) or a tuple of tensors."""

    def __init__(self, n: int, tensors: bool) -> None:
        rng = np.random.default_rng(SEED)
        self.images = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
        self.labels = rng.integers(0, 1000, n)
        self.xs = rng.random(n)
        self.n, self.tensors = n, tensors

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        img, label, x, s = self.images[i].copy(), int(self.labels[i]), float(self.xs[i]), f"example-{i:07d}"
        if self.tensors:
            return torch.from_numpy(img), label, x, s
        return {"image": img, "label": label, "x": x, "s": s}


def time_getitem(ds, order, repeat: int) -> float:
    """Median seconds per ``ds[i]``."""
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        for i in order:
            ds[i]
        times.append((time.perf_counter() - t0) / len(order))
    return statistics.median(times)


def time_epoch(ds, repeat: int) -> float:
    """Median seconds of one DataLoader epoch (workers started outside the timing)."""
    loader = DataLoader(ds, batch_size=256, num_workers=2, shuffle=True, persistent_workers=True,
                        generator=torch.Generator().manual_seed(0))
    for _ in loader:  # warm-up epoch: workers started, pages cached
        pass
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        for _batch in loader:
            pass
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def copy_cost(ds, order, repeat: int) -> None:
    """What the safe tensor costs per row: the row's copy plus ``torch.from_numpy``,
    against a numpy view (what the dict path hands out) and an unsafe tensor viewing the
    read-only map (what edcache never hands out)."""
    import warnings

    column = ds.store._views[0].array  # the fixed image column, (n, 32, 32, 3) uint8
    from_numpy = torch.from_numpy
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # from_numpy of a read-only array warns
        for label, fn in (("numpy view", column.__getitem__),
                          ("row copy", lambda r: column[r].copy()),
                          ("tensor of a copy", lambda r: from_numpy(column[r].copy())),
                          ("tensor viewing the map (unsafe)", lambda r: from_numpy(column[r]))):
            t = time_calls(fn, order, repeat)
            print(f"  per row: {label:32s} {t * 1e6:6.2f} us")


def time_calls(fn, order, repeat: int) -> float:
    """Median seconds per ``fn(i)``."""
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        for i in order:
            fn(i)
        times.append((time.perf_counter() - t0) / len(order))
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=20_000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--dir", default=None, help="where to build the caches (default: a temp dir)")
    args = ap.parse_args()
    root = args.dir or tempfile.mkdtemp(prefix="tensor_bench_")
    try:
        caches = {}
        for name, tensors in (("dict", False), ("tuple", True)):
            caches[name] = edcache.cache(Small(args.n, tensors), os.path.join(root, name), num_workers=0,
                                         chunk_size=1024, progress=False)
        order = np.random.default_rng(1).permutation(args.n).tolist()
        res = {}
        for name, ds in caches.items():
            get = time_getitem(ds, order, args.repeat)
            epoch = time_epoch(ds, args.repeat)
            res[name] = (get, epoch)
            print(f"{name:6s} ds[i] {get * 1e6:7.2f} us   DataLoader epoch {epoch:6.3f} s "
                  f"({args.n / epoch:,.0f} examples/s)")
        copy_cost(caches["tuple"], order, args.repeat)
        (g_d, e_d), (g_t, e_t) = res["dict"], res["tuple"]
        print(f"ratio tuple/dict: ds[i] {g_t / g_d:.2f}x (target <= 1.2x), "
              f"DataLoader throughput {e_d / e_t:.2f} of dict's (target >= 0.90)")
    finally:
        if args.dir is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
