"""Datasets and a tiny command line for the reliability suites (``tests/test_reliability_*``).

Importable by subprocesses (``PYTHONPATH=src:tests``) so that the class identity a cache
records is the same in every process: ``reliability_datasets.SlowDataset``.

Four datasets (format v2 gives every cache the same columnar layout):
:class:`SlowDataset` (every value kind the codec stores: nested records, ragged arrays,
a list label), :class:`UniformDataset` (fixed-shape arrays, numbers, str and bytes:
every column fixed or str/bytes), :class:`RaggedDataset` (a detection dataset: boxes
``(k, 4)``, token ids, crops of any shape) and :class:`MixedDataset` (keys present in
some examples only, columns promoted mid-build, nested dicts). Each class carries its own
``example`` / ``expected`` / ``expected_labels`` so helpers can take the class as a
parameter.

Subprocess use::

    python -c "import reliability_datasets as r; r.cli()" build ROOT NAME LENGTH \
        [--delay S] [--chunk-size N] [--workers N] [--count-dir DIR] [--legacy] [--uniform] ...
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import uuid

import numpy as np

from edcache import CachedDataset, DatasetMixin

IN_MEMORY_KEYS = ["label", "split", "extra"]


def example(i: int) -> dict:
    """Example ``i``: every kind of value the codec stores, deterministic in ``i``."""
    rng = np.random.default_rng(i)
    return {
        "image": rng.integers(0, 255, (4, 4, 3), dtype=np.uint8),  # fixed shape
        "feature": rng.standard_normal(i % 5 + 1).astype(np.float32),  # ragged: a blob
        "label": i % 7,
        "split": "train" if i % 4 else "val",
        "extra": None if i % 5 == 0 else [i, i + 1],  # list label column
        "name": f"item-{i:05d}",
        "meta": {
            "pair": (i, str(i)),
            "raw": bytes([i % 256]) * (i % 9),
            "flag": bool(i % 2),
            "weight": np.float64(i) / 3,
            "count": np.int64(i * 1000),
            "big": 2**70 + i,
            "nothing": None,
            "empty": np.zeros((0, 2), dtype=np.int16),
        },
    }


def expected(i: int) -> dict:
    """What ``CachedDataset[i]`` returns for example ``i`` (with ``index_``)."""
    ex = example(i)
    ex["index_"] = i
    return ex


class SlowDataset(DatasetMixin):
    """``length`` examples of :func:`example`, each taking ``delay`` seconds.

    With ``count_dir``, every computation of example ``i`` creates a new file
    ``<count_dir>/<i>.<pid>.<random>`` (so tests can count computations across
    processes). ``fail_at`` makes ``get_example`` raise for that index.
    """

    #: test plumbing, not configuration (a fixed dataset resumes; issue 16 item 21)
    fingerprint_exclude = ("delay", "count_dir", "fail_at")

    in_memory_keys = IN_MEMORY_KEYS
    #: every example one all-column schema (batches compare with assert_batch_equal)
    columnar = False

    @staticmethod
    def example(i: int) -> dict:
        return example(i)

    @staticmethod
    def expected(i: int) -> dict:
        return expected(i)

    @staticmethod
    def expected_labels(length: int) -> dict[str, object]:
        """The ``labels`` a complete cache of ``length`` examples returns."""
        exs = [expected(i) for i in range(length)]
        return {
            "label": np.array([e["label"] for e in exs]),
            "split": np.array([e["split"] for e in exs]),
            "extra": [e["extra"] for e in exs],
        }

    def __init__(
        self,
        root: str,
        name: str = "slow",
        length: int = 200,
        delay: float = 0.0,
        count_dir: str | None = None,
        fail_at: int | None = None,
    ) -> None:
        self.root = root
        self.name = name
        self.length = length
        self.delay = delay
        self.count_dir = count_dir
        self.fail_at = fail_at

    def __len__(self) -> int:
        return self.length

    def get_example(self, i: int) -> dict:
        if self.delay:
            time.sleep(self.delay)
        if self.fail_at is not None and i == self.fail_at:
            raise RuntimeError(f"planned failure at {i}")
        if self.count_dir is not None:
            with open(os.path.join(self.count_dir, f"{i}.{os.getpid()}.{uuid.uuid4().hex[:8]}"), "x"):
                pass
        return self.example(i)


class OtherDataset(SlowDataset):
    """Same examples, another class (for the "different dataset at the same name" case)."""


UNIFORM_KEYS = ["label", "name", "raw"]


def uniform_example(i: int) -> dict:
    """Example ``i`` of :class:`UniformDataset`: the same keys and value kinds in every
    example (fixed-shape array, int, float, bool, numpy scalar, str and bytes of varying
    length, None): every column is fixed, str, bytes or none."""
    rng = np.random.default_rng(10_000 + i)
    return {
        "image": rng.integers(0, 255, (4, 4, 3), dtype=np.uint8),
        "label": i % 7,
        "score": i / 3 - 5.0,
        "flag": bool(i % 3),
        "weight": np.float32(i) * np.float32(0.25),
        "name": f"u{i}" + "é" * (i % 4) + "x" * (i % 11),
        "raw": bytes([i % 256, 255 - i % 256]) * (i % 6),
        "nothing": None,
    }


def uniform_expected(i: int) -> dict:
    ex = uniform_example(i)
    ex["index_"] = i
    return ex


class UniformDataset(SlowDataset):
    """:class:`SlowDataset` (same constructor, ``delay``, ``count_dir``, ``fail_at``) with
    the examples of :func:`uniform_example`."""

    in_memory_keys = UNIFORM_KEYS
    columnar = True

    @staticmethod
    def example(i: int) -> dict:
        return uniform_example(i)

    @staticmethod
    def expected(i: int) -> dict:
        return uniform_expected(i)

    @staticmethod
    def expected_labels(length: int) -> dict[str, object]:
        exs = [uniform_example(i) for i in range(length)]
        return {
            "label": np.array([e["label"] for e in exs]),
            "name": np.array([e["name"] for e in exs]),
            "raw": [e["raw"] for e in exs],
        }


RAGGED_KEYS = ["label", "name"]


def ragged_example(i: int) -> dict:
    """Example ``i`` of :class:`RaggedDataset` (a detection dataset): a small image,
    ``k`` boxes ``(k, 4)`` float32 with ``k`` in 0..20 and a variable number of int32
    token ids (ragged columns), a crop whose two axes both vary (a varshape column), an
    int label and a str name (str label file)."""
    rng = np.random.default_rng(20_000 + i)
    k = int(rng.integers(0, 21))
    return {
        "image": rng.integers(0, 255, (8, 8, 3), dtype=np.uint8),
        "boxes": rng.random((k, 4), dtype=np.float32),
        "tokens": rng.integers(0, 30_000, int(rng.integers(1, 17)), dtype=np.int32),
        "crop": rng.integers(0, 255, (int(rng.integers(1, 5)), int(rng.integers(1, 5))), dtype=np.uint8),
        "label": i % 5,
        "name": f"img_{i:05d}.jpg",
    }


def ragged_expected(i: int) -> dict:
    ex = ragged_example(i)
    ex["index_"] = i
    return ex


class RaggedDataset(SlowDataset):
    """Variable-shape fields in every example (see :func:`ragged_example`)."""

    in_memory_keys = RAGGED_KEYS
    columnar = True

    @staticmethod
    def example(i: int) -> dict:
        return ragged_example(i)

    @staticmethod
    def expected(i: int) -> dict:
        return ragged_expected(i)

    @staticmethod
    def expected_labels(length: int) -> dict[str, object]:
        exs = [ragged_example(i) for i in range(length)]
        return {"label": np.array([e["label"] for e in exs]), "name": np.array([e["name"] for e in exs])}


MIXED_KEYS = ["label", "tag"]


def mixed_example(i: int) -> dict:
    """Example ``i`` of :class:`MixedDataset`: keys present in some examples only
    (``caption``, ``depth``: a per-row layout column), key order that varies, nested
    dicts, and fields whose kind changes with the index, so that with chunks of 8 a
    column is promoted mid-build: ``score`` is an int up to example 11, then a float32
    array (fixed -> record in chunk 1); ``feat`` is ``(2, 3)`` float32 below 8 (fixed),
    ``(k, 3)`` below 20 (ragged from chunk 1) and any 2-d shape after (varshape from
    chunk 2); ``note`` is None in chunk 0, then str (a none column becomes a record)."""
    rng = np.random.default_rng(30_000 + i)
    ex: dict = {"label": i % 3}
    if i % 3 == 0:
        ex["caption"] = f"a photo of {i} " + "ü" * (i % 5)
    ex["tag"] = ["cat", "dog", "bird"][i % 3]
    ex["score"] = i * 7 if i < 12 else rng.random(3).astype(np.float32)
    if i < 8:
        ex["feat"] = rng.standard_normal((2, 3)).astype(np.float32)
    elif i < 20:
        ex["feat"] = rng.standard_normal((i % 4, 3)).astype(np.float32)
    else:
        ex["feat"] = rng.standard_normal((i % 3 + 1, i % 2 + 1)).astype(np.float32)
    ex["note"] = None if i < 8 else f"n{i}"
    ex["meta"] = {"id": i, "nested": {"ok": bool(i % 2), "v": [i, (i, "x")]},
                  "opt": None if i % 4 else b"\x00" * (i % 7)}
    if i % 5 == 1:
        ex["depth"] = rng.integers(0, 9, (2, 2), dtype=np.int16)
    if i % 7 == 3:  # another key order: another layout
        ex = {"tag": ex.pop("tag"), **ex}
    return ex


def mixed_expected(i: int) -> dict:
    ex = mixed_example(i)
    ex["index_"] = i
    return ex


class MixedDataset(SlowDataset):
    """Mixed schema (see :func:`mixed_example`)."""

    in_memory_keys = MIXED_KEYS
    columnar = False

    @staticmethod
    def example(i: int) -> dict:
        return mixed_example(i)

    @staticmethod
    def expected(i: int) -> dict:
        return mixed_expected(i)

    @staticmethod
    def expected_labels(length: int) -> dict[str, object]:
        exs = [mixed_example(i) for i in range(length)]
        return {"label": np.array([e["label"] for e in exs]), "tag": np.array([e["tag"] for e in exs])}


#: dataset classes by the name the CLI and parametrized tests use
DATASETS = {"slow": SlowDataset, "uniform": UniformDataset, "ragged": RaggedDataset, "mixed": MixedDataset}
#: the dataset kind each class is built as by the CLI (``--kind``)
KIND_OF = {cls: kind for kind, cls in DATASETS.items()}


class BadDataset(SlowDataset):
    """A :class:`SlowDataset` that misbehaves at index ``at`` in the way ``mode`` names.

    Modes: ``nondict`` (returns a list), ``unstorable`` (``meta/calib`` is an object),
    ``raise`` (KeyError), ``missing_key`` (no ``label``), ``mixed_type`` (``label`` is a
    str), ``mixed_shape`` (``image`` label of another shape). ``mode=None`` behaves.
    """

    fingerprint_exclude = ("delay", "count_dir", "fail_at", "mode", "at")

    def __init__(self, root: str, name: str, length: int, mode: str | None, at: int,
                 count_dir: str | None = None, keys: list[str] | None = None) -> None:
        super().__init__(root, name, length, count_dir=count_dir)
        self.mode, self.at = mode, at
        if keys is not None:
            self.in_memory_keys = keys

    def get_example(self, i: int) -> dict:
        ex = super().get_example(i)
        if i != self.at or self.mode is None:
            return ex
        if self.mode == "nondict":
            return [ex]  # type: ignore[return-value]
        if self.mode == "unstorable":
            ex["meta"]["calib"] = Calibration()
        elif self.mode == "raise":
            raise KeyError(f"no such file: img_{i}.jpg")
        elif self.mode == "missing_key":
            del ex["label"]
        elif self.mode == "mixed_type":
            ex["label"] = "seven"
        elif self.mode == "mixed_shape":
            ex["image"] = ex["image"][:2]
        return ex


class Calibration:
    """A value the safe codec does not store."""


def computations(count_dir: str) -> dict[int, int]:
    """How often each index was computed, from the files :class:`SlowDataset` wrote."""
    counts: dict[int, int] = {}
    for name in os.listdir(count_dir):
        i = int(name.split(".", 1)[0])
        counts[i] = counts.get(i, 0) + 1
    return counts


def assert_example_equal(got: object, want: object, where: str = "") -> None:
    """Deep equality with types: tuple stays tuple, numpy dtype and shape kept."""
    assert type(got) is type(want), f"{where}: {type(got)} != {type(want)}"
    if isinstance(want, dict):
        assert list(got) == list(want), f"{where}: keys {list(got)} != {list(want)}"  # type: ignore[arg-type]
        for k in want:
            assert_example_equal(got[k], want[k], f"{where}/{k}")  # type: ignore[index]
    elif isinstance(want, (list, tuple)):
        assert len(got) == len(want), where  # type: ignore[arg-type]
        for k, (a, b) in enumerate(zip(got, want)):  # type: ignore[call-overload]
            assert_example_equal(a, b, f"{where}/{k}")
    elif isinstance(want, np.ndarray):
        assert got.dtype == want.dtype and got.shape == want.shape, where  # type: ignore[union-attr]
        assert np.array_equal(got, want), where  # type: ignore[arg-type]
    elif isinstance(want, np.generic):
        assert got.dtype == want.dtype and got == want, where  # type: ignore[union-attr]
    else:
        assert got == want, f"{where}: {got!r} != {want!r}"


def assert_batch_equal(batch: dict, indices, dataset: type, where: str = "") -> None:
    """``CachedDataset.get_batch(indices)`` of an all-column cache (e.g. a
    :class:`UniformDataset` or :class:`RaggedDataset` cache): numbers and arrays of one
    shape stacked in arrays of the stored dtype, arrays of several shapes, str / bytes /
    None fields as lists, ``index_`` the indices."""
    indices = [int(i) for i in indices]
    exs = [dataset.expected(i) for i in indices]
    assert set(batch) == set(exs[0]), f"{where}: batch keys {sorted(batch)}"
    for key in exs[0]:
        want = [ex[key] for ex in exs]
        got = batch[key]
        if isinstance(want[0], (str, bytes, type(None))):
            assert isinstance(got, list), f"{where}/{key}: {type(got)}"
            assert_example_equal(got, want, f"{where}/{key}")
            continue
        if isinstance(want[0], np.ndarray) and any(w.shape != want[0].shape for w in want):
            # a variable-shape column: a list of the arrays when their shapes differ
            assert isinstance(got, list), f"{where}/{key}: {type(got)}"
            assert_example_equal(got, want, f"{where}/{key}")
            continue
        assert isinstance(got, np.ndarray), f"{where}/{key}: {type(got)}"
        if isinstance(want[0], (np.ndarray, np.generic)):
            stacked = np.stack(want) if isinstance(want[0], np.ndarray) else np.array(want, dtype=want[0].dtype)
        else:  # Python bool / int / float: their int64 / float64 / bool column
            stacked = np.array(want, dtype={bool: np.bool_, int: np.int64, float: np.float64}[type(want[0])])
        assert got.dtype == stacked.dtype and got.shape == stacked.shape, \
            f"{where}/{key}: {got.dtype}{got.shape} != {stacked.dtype}{stacked.shape}"
        assert np.array_equal(got, stacked), f"{where}/{key}: values differ"


def examples_equal(got: object, want: object) -> bool:
    try:
        assert_example_equal(got, want)
    except AssertionError:
        return False
    return True


def cli(argv: list[str] | None = None) -> None:
    """``build`` a cache in this process (used by the subprocess tests)."""
    p = argparse.ArgumentParser(prog="reliability_datasets")
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build")
    b.add_argument("root")
    b.add_argument("name")
    b.add_argument("length", type=int)
    b.add_argument("--delay", type=float, default=0.0)
    b.add_argument("--chunk-size", type=int, default=8)
    b.add_argument("--workers", type=int, default=2)
    b.add_argument("--count-dir")
    b.add_argument("--fail-at", type=int)
    b.add_argument("--legacy", action="store_true")
    b.add_argument("--force", action="store_true")
    b.add_argument("--no-keep-existing", action="store_true")
    b.add_argument("--other-class", action="store_true")
    b.add_argument("--uniform", action="store_true", help="build a UniformDataset (same as --kind uniform)")
    b.add_argument("--kind", choices=sorted(DATASETS), default="slow", help="which dataset to build")
    b.add_argument("--ready-file", help="touched once the dataset object exists")
    args = p.parse_args(argv)
    cls = OtherDataset if args.other_class else UniformDataset if args.uniform else DATASETS[args.kind]
    ds = cls(args.root, args.name, args.length, args.delay, args.count_dir, args.fail_at)
    if args.ready_file:
        open(args.ready_file, "w").close()
    cached = CachedDataset(
        ds,
        force_cache=args.force,
        keep_existing=not args.no_keep_existing,
        _legacy=True if args.legacy else None,
        chunk_size=args.chunk_size,
        num_workers=args.workers,
        progress=False,
    )
    print(f"built {cached.path} {len(cached)}", flush=True)
    sys.exit(0)


if __name__ == "__main__":  # pragma: no cover - use cli() via -c so the class module is stable
    cli()


def subprocess_env() -> dict[str, str]:
    """The environment for ``sys.executable -c`` helpers: ``src`` and ``tests`` importable."""
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    src_dir = os.path.join(os.path.dirname(tests_dir), "src")
    env = dict(os.environ)
    parts = [src_dir, tests_dir] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(parts)
    env.pop("PYTEST_CURRENT_TEST", None)
    return env


#: ``sys.executable -c CLI_CODE build ...`` runs :func:`cli`.
CLI_CODE = "import reliability_datasets as r; r.cli()"


_V2_VERIFY: list[bool] = []


def verify_supports_v2() -> bool:
    """Whether ``edcache verify`` checks format-v2 caches (it is being written): a tiny
    v2 cache built in a temporary folder must verify clean. Suites skip their
    ``edcache verify`` assertions (not their read checks) until it does."""
    if not _V2_VERIFY:
        import shutil
        import tempfile

        from edcache.verify import verify_cache

        tmp = tempfile.mkdtemp(prefix="edcache-v2probe-")
        try:
            ds = CachedDataset(UniformDataset(tmp, "probe", 4), chunk_size=2, num_workers=0, progress=False)
            try:
                _V2_VERIFY.append(bool(verify_cache(ds.path).ok))
            except Exception:
                _V2_VERIFY.append(False)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return _V2_VERIFY[0]


def committed_count(cache_dir: str) -> int | None:
    """Chunks of a format-v2 cache a resume keeps: None before the first manifest,
    every chunk when complete, else the committed prefix of ``commits.log``."""
    from edcache.format.columnar.log import read_log
    from edcache.format.columnar.manifest import read_manifest

    try:
        m = read_manifest(cache_dir)
    except FileNotFoundError:
        return None
    if m.complete:
        return m.num_chunks
    state = read_log(cache_dir)
    return state.committed if state is not None else 0
