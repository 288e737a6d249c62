"""Shapes, deterministic data, touch modes, timing helpers and machine info."""

from __future__ import annotations

import gc
import os
import platform
import statistics
import sys
import time
from typing import Any, Callable, Iterable, Sequence

import numpy as np

PAGE = 4096
SEED = 20240611

# name -> (n in the full run, n in the quick run, fields)
# field: (key, kind, dtype, shape); kind in {"array", "int", "float", "str"}
SHAPES: dict[str, dict[str, Any]] = {
    "small": {
        "n": 100_000,
        "quick_n": 10_000,
        "fields": [
            ("image", "array", "uint8", (32, 32, 3)),
            ("label", "int", "int64", ()),
            ("x", "float", "float64", ()),
            ("s", "str", None, ()),
        ],
        "in_memory_keys": ["label"],
    },
    "medium": {
        "n": 1_500,
        "quick_n": 150,
        "fields": [("image", "array", "uint8", (256, 256, 3)), ("label", "int", "int64", ())],
        "in_memory_keys": ["label"],
    },
    "large": {
        "n": 300,
        "quick_n": 30,
        "fields": [("data", "array", "float32", (262_144,))],
        "in_memory_keys": [],
    },
}


def shape_n(shape: str, quick: bool) -> int:
    return SHAPES[shape]["quick_n" if quick else "n"]


def raw_example_bytes(shape: str) -> int:
    """Payload bytes of one example: array bytes + 8 per number + len of the str."""
    total = 0
    for key, kind, dtype, shp in SHAPES[shape]["fields"]:
        if kind == "array":
            total += int(np.prod(shp)) * np.dtype(dtype).itemsize
        elif kind in ("int", "float"):
            total += 8
        else:
            total += len("example-0000000")
    return total


def make_examples(shape: str, n: int) -> list[dict]:
    """The same examples for every store (example i does not depend on ``n``): random,
    incompressible arrays, each example with its own buffer, generated in blocks from
    one seed."""
    fields = SHAPES[shape]["fields"]
    block = max(1, (64 << 20) // raw_example_bytes(shape))
    out: list[dict] = []
    for b0 in range(0, n, block):
        rng = np.random.default_rng([SEED, b0 // block])
        columns: dict[str, Any] = {}
        for key, kind, dtype, shp in fields:
            if kind == "array":
                if np.dtype(dtype).kind == "f":
                    columns[key] = rng.standard_normal((block, *shp), dtype=np.float32).astype(dtype, copy=False)
                else:
                    columns[key] = rng.integers(0, 256, (block, *shp), dtype=np.uint8).astype(dtype, copy=False)
            elif kind == "int":
                columns[key] = rng.integers(0, 1000, block)
            elif kind == "float":
                columns[key] = rng.random(block)
        for j in range(min(block, n - b0)):
            i = b0 + j
            ex: dict[str, Any] = {}
            for key, kind, dtype, shp in fields:
                if kind == "array":
                    ex[key] = columns[key][j].copy()
                elif kind == "int":
                    ex[key] = int(columns[key][j])
                elif kind == "float":
                    ex[key] = float(columns[key][j])
                else:
                    ex[key] = f"example-{i:07d}"
            out.append(ex)
        del columns
    return out


# -- touch modes ----------------------------------------------------------------------


def _touch_array_page(a: np.ndarray) -> float:
    """Read one byte per 4 KiB of the array (the first element if it is <= 4 KiB)."""
    if a.nbytes <= PAGE:
        return float(a.item(0)) if a.size else 0.0
    if a.flags.c_contiguous:
        b = a.reshape(-1).view(np.uint8)
    else:
        b = np.ascontiguousarray(a).reshape(-1).view(np.uint8)
    return float(b[::PAGE].sum())


_ND = np.ndarray


def touch(obj: Any, mode: str) -> float:
    """Consume an example so lazy/zero-copy stores pay for what a model would read.

    mode 'page': read one byte per 4 KiB page of every array.
    mode 'full': read every byte of every array (``arr.sum()``).
    Strings count their length; numbers are already materialized. Kept lean: it is
    part of every timed read, for every store alike."""
    t = type(obj)
    if t is dict:
        vals = obj.values()
    elif t is list or t is tuple:
        vals = obj
    else:
        vals = (obj,)
    s = 0.0
    page = mode == "page"
    for v in vals:
        tv = type(v)
        if tv is _ND or isinstance(v, _ND):
            s += _touch_array_page(v) if page else float(v.sum())
        elif tv is int or tv is float or tv is bool:
            continue
        elif tv is str or tv is bytes:
            s += len(v)
        elif tv is dict or tv is list or tv is tuple:
            s += touch(v, mode)
        elif hasattr(v, "numpy"):  # torch tensor
            s += touch(v.numpy(), mode)
        elif isinstance(v, np.generic):
            continue
    return s


# -- timing ---------------------------------------------------------------------------


class gc_paused:
    """Collect, then disable the cyclic GC for a timed section. Surviving objects are
    frozen (``gc.freeze``) so later collections do not rescan big imported libraries."""

    def __enter__(self):
        gc.collect()
        gc.freeze()
        self._was = gc.isenabled()
        gc.disable()
        return self

    def __exit__(self, *exc):
        if self._was:
            gc.enable()


def time_pass(read: Callable[[int], Any], indices: Sequence[int], mode: str) -> float:
    t = time.perf_counter
    tc = touch
    with gc_paused():
        t0 = t()
        for i in indices:
            tc(read(i), mode)
        return t() - t0


def time_batches(read_batch: Callable[[list], Any], batches: Sequence[list], mode: str) -> float:
    t = time.perf_counter
    with gc_paused():
        t0 = t()
        for b in batches:
            touch(read_batch(b), mode)
        return t() - t0


def median(xs: Iterable[float]) -> float:
    return float(statistics.median(list(xs)))


def random_sequence(n: int, count: int, seed: int = SEED + 1) -> list[int]:
    """The same random index stream for every store: concatenated permutations of n."""
    rng = np.random.default_rng(seed)
    out: list[int] = []
    while len(out) < count:
        out.extend(rng.permutation(n).tolist())
    return out[:count]


def warm_page_cache(path: str) -> int:
    """Read every file under ``path`` once (puts it in the OS page cache)."""
    total = 0
    paths = [path] if os.path.isfile(path) else [os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs]
    buf = bytearray(1 << 20)
    for p in paths:
        try:
            with open(p, "rb", buffering=0) as fh:
                while True:
                    k = fh.readinto(buf)
                    if not k:
                        break
                    total += k
        except OSError:
            pass
    return total


def du(path: str) -> int:
    """Bytes of the files under ``path`` (apparent size)."""
    if os.path.isfile(path):
        return os.path.getsize(path)
    total = 0
    for d, _, fs in os.walk(path):
        for f in fs:
            try:
                total += os.lstat(os.path.join(d, f)).st_size
            except OSError:
                pass
    return total


# -- machine --------------------------------------------------------------------------


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(mod: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(mod)
    except Exception:
        return None


def machine_info() -> dict[str, Any]:
    import datetime

    try:
        import psutil

        ram = psutil.virtual_memory().total
    except Exception:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return {
        "date": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "ram_gib": round(ram / 2**30, 1),
        "os": f"{platform.system()} {platform.release()}",
        "python": sys.version.split()[0],
        "numpy": np.__version__,
        "versions": {
            m: _version(m)
            for m in ("torch", "lmdb", "datasets", "pyarrow", "mosaicml-streaming", "litdata", "edcache", "psutil")
        },
    }
