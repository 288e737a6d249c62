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
# field: (key, kind, dtype, shape); kind in {"array", "vararray", "int", "float", "str"}
# "vararray": an array whose first dimension varies per example, 0 .. shape[0] (the
# shape given is the largest); "gen": "ragged" shapes share one generator, so
# "ragged_fixed" holds the same values as "ragged", zero-padded to the largest shape.
_RAGGED_FIELDS = [
    ("image", "array", "uint8", (32, 32, 3)),
    ("boxes", "vararray", "float32", (20, 4)),
    ("tokens", "vararray", "int32", (40,)),
    ("label", "int", "int64", ()),
]
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
    # the "small" data as torchvision-style examples: (image tensor, label, x, s) tuples
    # (issue 12: tuple/tensor examples against the same data as a dict of numpy arrays)
    "small_tensors": {
        "n": 100_000,
        "quick_n": 10_000,
        "container": "tuple",
        "fields": [
            ("image", "array", "uint8", (32, 32, 3)),
            ("label", "int", "int64", ()),
            ("x", "float", "float64", ()),
            ("s", "str", None, ()),
        ],
        "in_memory_keys": [1],
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
    "ragged": {
        "n": 100_000,
        "quick_n": 10_000,
        "gen": "ragged",
        "fields": _RAGGED_FIELDS,
        "in_memory_keys": ["label"],
    },
    "images": {
        # crops of real photos (sklearn's sample images), for the codec variants of the
        # stores (edcache-zstd, mds-jpeg90, ...): compressible, unlike the random shapes
        "n": 3_000,
        "quick_n": 600,
        "gen": "photos",
        "fields": [("image", "array", "uint8", (256, 256, 3)), ("label", "int", "int64", ())],
        "in_memory_keys": ["label"],
    },
    "ragged_fixed": {
        "n": 100_000,
        "quick_n": 10_000,
        "gen": "ragged",
        "fields": [(k, "array" if kind == "vararray" else kind, dt, shp) for k, kind, dt, shp in _RAGGED_FIELDS],
        "in_memory_keys": ["label"],
    },
}


def is_tuple(shape: str) -> bool:
    """Whether the examples of ``shape`` are tuples of tensors and scalars (not dicts)."""
    return SHAPES[shape].get("container") == "tuple"


def as_dict(shape: str, example: Any) -> dict:
    """An example of ``shape`` as a dict of numpy arrays and scalars (tuples by field)."""
    if not is_tuple(shape):
        return example
    keys = [key for key, _, _, _ in SHAPES[shape]["fields"]]
    return {k: (np.asarray(v) if hasattr(v, "numpy") else v) for k, v in zip(keys, example)}


def shape_n(shape: str, quick: bool) -> int:
    return SHAPES[shape]["quick_n" if quick else "n"]


def is_ragged(shape: str) -> bool:
    """Whether some field of ``shape`` has a per-example shape."""
    return any(kind == "vararray" for _, kind, _, _ in SHAPES[shape]["fields"])


def _fixed_bytes(shape: str) -> int:
    """Bytes of one example with every array at its largest shape."""
    total = 0
    for key, kind, dtype, shp in SHAPES[shape]["fields"]:
        if kind in ("array", "vararray"):
            total += int(np.prod(shp)) * np.dtype(dtype).itemsize
        elif kind in ("int", "float"):
            total += 8
        else:
            total += len("example-0000000")
    return total


# the ragged generator: examples are generated in blocks of this many, one seed per block
_RAGGED_BLOCK = 4096


def _ragged_lengths(block: int) -> tuple[np.ndarray, np.ndarray]:
    """(boxes k, token count) of the examples of one block (a stream of its own, so the
    lengths are known without generating the data)."""
    rng = np.random.default_rng([SEED, 1, block])
    return rng.integers(0, 21, _RAGGED_BLOCK), rng.integers(0, 41, _RAGGED_BLOCK)


def raw_example_bytes(shape: str, n: int | None = None) -> float:
    """Payload bytes of one example: array bytes + 8 per number + len of the str. For
    shapes with variable-shape arrays, the actual mean over examples ``0 .. n-1`` (the
    full run's N when ``n`` is None)."""
    if not is_ragged(shape):
        return _fixed_bytes(shape)
    n = SHAPES[shape]["n"] if n is None else n
    fields = {k: (dt, shp) for k, kind, dt, shp in SHAPES[shape]["fields"] if kind == "vararray"}
    per_box = 4 * np.dtype(fields["boxes"][0]).itemsize
    per_tok = np.dtype(fields["tokens"][0]).itemsize
    fixed = _fixed_bytes(shape) - fields["boxes"][1][0] * per_box - fields["tokens"][1][0] * per_tok
    var = 0
    for b0 in range(0, n, _RAGGED_BLOCK):
        k, t = _ragged_lengths(b0 // _RAGGED_BLOCK)
        m = min(_RAGGED_BLOCK, n - b0)
        var += int(k[:m].sum()) * per_box + int(t[:m].sum()) * per_tok
    return fixed + var / max(n, 1)


def make_examples(shape: str, n: int) -> list:
    """The same examples for every store (example i does not depend on ``n``): random,
    incompressible arrays, each example with its own buffer, generated in blocks from
    one seed. Tuple shapes: the same values as tuples, arrays as torch tensors."""
    if SHAPES[shape].get("gen") == "ragged":
        return _make_ragged(shape, n)
    if SHAPES[shape].get("gen") == "photos":
        return _make_photos(n)
    if is_tuple(shape):
        import torch

        examples = _make_examples(shape, n)
        return [tuple(torch.from_numpy(v) if isinstance(v, np.ndarray) else v for v in ex.values())
                for ex in examples]
    return _make_examples(shape, n)


def _make_examples(shape: str, n: int) -> list[dict]:
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


def _make_photos(n: int) -> list[dict]:
    """``images``: 256x256 crops of sklearn's two sample photos (427x640), each taken at
    a random scale (1-1.6x smaller, bilinear), flipped left-right with probability 1/2,
    with a random gain and offset per channel; example i depends only on i.

    The jitter matters: plain crops of two photos repeat the same bytes across
    examples, which compressors over whole chunks or shards (MDS, litdata) exploit
    and a dataset of distinct photos would not offer."""
    import tempfile

    cached = os.path.join(tempfile.gettempdir(), f"edcache-bench-photos-{SEED}-{n}.npy")
    if os.path.exists(cached):  # every task of a run needs them: computed once (~15 ms each)
        images = np.load(cached, mmap_mode="r")
        labels = [int(np.random.default_rng([SEED, 4, i]).integers(0, 1000)) for i in range(n)]
        return [{"image": np.array(images[i]), "label": labels[i]} for i in range(n)]
    out = _compute_photos(n)
    tmp = f"{cached}.{os.getpid()}.npy"
    np.save(tmp, np.stack([ex["image"] for ex in out]))
    os.replace(tmp, cached)
    return out


def _compute_photos(n: int) -> list[dict]:
    from sklearn.datasets import load_sample_images

    photos = load_sample_images().images
    out: list[dict] = []
    for i in range(n):
        rng = np.random.default_rng([SEED, 3, i])
        img = photos[int(rng.integers(len(photos)))]
        scale = rng.uniform(1.0, 1.6)
        h, w = (img.shape[0] - 1) / scale, (img.shape[1] - 1) / scale
        y, x = rng.uniform(0, h - 256), rng.uniform(0, w - 256)
        ys, xs = (y + np.arange(256)) * scale, (x + np.arange(256)) * scale
        y0, x0 = ys.astype(int), xs.astype(int)
        fy, fx = (ys - y0)[:, None, None].astype(np.float32), (xs - x0)[None, :, None].astype(np.float32)
        r0, r1, c0, c1 = y0[:, None], y0[:, None] + 1, x0[None, :], x0[None, :] + 1
        top = img[r0, c0] * (1 - fx) + img[r0, c1] * fx
        bottom = img[r1, c0] * (1 - fx) + img[r1, c1] * fx
        crop = (top * (1 - fy) + bottom * fy) * rng.uniform(0.8, 1.2, 3) + rng.uniform(-20, 20, 3)
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        out.append({"image": np.ascontiguousarray(np.clip(crop + 0.5, 0, 255).astype(np.uint8)),
                    "label": int(np.random.default_rng([SEED, 4, i]).integers(0, 1000))})
    return out


def _make_ragged(shape: str, n: int) -> list[dict]:
    """``ragged``: boxes (k, 4) float32 with k in 0..20 and tokens (t,) int32 with t in
    0..40 per example; ``ragged_fixed``: the same values zero-padded to (20, 4) and (40,)
    (no lengths stored: the same fields, so the two read paths compare like for like)."""
    ragged = is_ragged(shape)
    B = _RAGGED_BLOCK
    out: list[dict] = []
    for b0 in range(0, n, B):
        blk = b0 // B
        ks, ts = _ragged_lengths(blk)
        rng = np.random.default_rng([SEED, 2, blk])
        images = rng.integers(0, 256, (B, 32, 32, 3), dtype=np.uint8)
        boxes = rng.standard_normal((B, 20, 4), dtype=np.float32)
        tokens = rng.integers(0, 2**31 - 1, (B, 40), dtype=np.int32)
        labels = rng.integers(0, 1000, B)
        for j in range(min(B, n - b0)):
            k, t = int(ks[j]), int(ts[j])
            if ragged:
                bx, tk = boxes[j, :k].copy(), tokens[j, :t].copy()
            else:
                bx, tk = np.zeros((20, 4), np.float32), np.zeros(40, np.int32)
                bx[:k], tk[:t] = boxes[j, :k], tokens[j, :t]
            out.append({"image": images[j].copy(), "boxes": bx, "tokens": tk, "label": int(labels[j])})
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
