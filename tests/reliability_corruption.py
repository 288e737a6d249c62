"""Damage a cache on purpose and classify what readers make of it.

Used by ``tests/test_reliability_integrity.py`` (hypothesis draws the damages) and as a
script that runs a seeded corruption matrix and prints the detection-rate table of
``docs/reliability.md``::

    PYTHONPATH=src:tests python tests/reliability_corruption.py --trials 200

Each trial copies a reference cache, applies one :class:`Damage`, then reads it three
ways: default reads (``CachedDataset.from_cache`` + every example + labels),
``verify=True`` reads, and :func:`edcache.verify.verify_cache`. A read outcome is

* ``detected``: an ``EdcacheError`` was raised for data that should have been readable;
* ``wrong``: some example or label came back different from the reference, silently;
* ``same``: everything read back exactly as the reference (the damage did not matter to
  readers, e.g. a JSON whitespace change in the manifest);

and any other exception type is a bug (the helper re-raises it).

Every helper takes the dataset class (``dataset=``, default :class:`SlowDataset`); the
script's ``--dataset`` picks ``slow``, ``uniform``, ``ragged``, ``mixed`` or ``all``. The
caches are format v2: column data and index files, label files, ``manifest.json``,
``checksums.npy`` (complete) and ``commits.log`` (incomplete).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import tempfile
import tracemalloc
from collections import Counter, defaultdict
from dataclasses import dataclass

import numpy as np

from edcache import CachedDataset
from edcache.errors import EdcacheError, IncompleteCacheError
from edcache.verify import verify_cache

from reliability_datasets import DATASETS, SlowDataset, assert_batch_equal, examples_equal

NAME = "fuzz"
LENGTH = 40
CHUNK = 8
FAIL_AT = 27  # the incomplete reference: chunks 0..2 committed, the build stopped in chunk 3


# -- reference caches -----------------------------------------------------------------
def build_reference(root: str, complete: bool = True, dataset: type = SlowDataset) -> str:
    """Build the reference cache of ``dataset`` under ``root``; return the cache directory."""
    ds = dataset(root, NAME, LENGTH, fail_at=None if complete else FAIL_AT)
    try:
        CachedDataset(ds, chunk_size=CHUNK, num_workers=0, progress=False)
    except EdcacheError:
        if complete:
            raise
    return os.path.join(root, "cached", NAME)


def committed_indices(complete: bool) -> set[int]:
    if complete:
        return set(range(LENGTH))
    return set(range(FAIL_AT // CHUNK * CHUNK))


def expected_labels(dataset: type = SlowDataset) -> dict[str, object]:
    return dataset.expected_labels(LENGTH)


def cache_files(cache_dir: str) -> list[str]:
    """Every file of a cache, relative to it, sorted."""
    out = []
    for dirpath, _, files in os.walk(cache_dir):
        for f in files:
            out.append(os.path.relpath(os.path.join(dirpath, f), cache_dir))
    return sorted(out)


def file_kind(rel: str) -> str:
    if rel.startswith("columns/"):
        return "column .data" if rel.endswith(".data") else "column .index"
    if rel.endswith(".npy") and rel.startswith("labels/"):
        return "label .npy"
    if rel.endswith(".list"):
        return "label .list"
    return rel


# -- damages --------------------------------------------------------------------------
@dataclass
class Damage:
    """One change to one (or two) files of a cache; ``apply`` returns False if a no-op."""

    kind: str
    file: str
    a: int = 0
    b: int = 0
    other: str = ""
    payload: bytes = b""

    def describe(self) -> str:
        extra = {"flip": f"byte {self.a} ^ {self.b:#04x}", "truncate": f"to {self.a} bytes",
                 "zero": f"bytes {self.a}..{self.b}", "swap": f"with {self.other}",
                 "extend": f"+{len(self.payload)} bytes", "garbage": f"{len(self.payload)} random bytes",
                 "field": self.other}.get(self.kind, "")
        return f"{self.kind} {self.file} {extra}".strip()

    def apply(self, cache_dir: str) -> bool:
        path = os.path.join(cache_dir, self.file)
        data = open(path, "rb").read()
        if not data and self.kind in ("flip", "truncate", "zero"):
            return False
        if self.kind == "flip":
            new = bytearray(data)
            new[self.a % len(data)] ^= self.b or 1
        elif self.kind == "truncate":
            new = data[: self.a % len(data)]
        elif self.kind == "zero":
            a = self.a % len(data)
            b = min(len(data), a + max(1, self.b))
            new = data[:a] + bytes(b - a) + data[b:]
        elif self.kind == "extend":
            new = data + (self.payload or b"\0")
        elif self.kind == "delete":
            os.unlink(path)
            return True
        elif self.kind == "garbage":
            new = self.payload
        elif self.kind == "swap":
            other = os.path.join(cache_dir, self.other)
            odata = open(other, "rb").read()
            if odata == data:
                return False
            open(other, "wb").write(data)
            new = odata
        elif self.kind == "field":
            new = self.payload  # prepared by the generator (a valid-looking manifest/log)
        else:
            raise ValueError(self.kind)
        if bytes(new) == data:
            return False
        with open(path, "wb") as f:
            f.write(bytes(new))
        return True


_JSON_VALUES = [None, True, False, 0, 1, -1, 7, 2**63, 2**64 + 5, -(2**70), 1.5, "", "x",
                "labels/../manifest.json", "/etc/passwd", "labels/9.npy", "<i8", "|O", "O",
                "<U99999999", [], [0], [2**40], [-3], {}, {"a": 1}]


def _paths(doc, prefix=()):
    yield prefix
    if isinstance(doc, dict):
        for k, v in doc.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            yield from _paths(v, prefix + (i,))


def manifest_field_damage(manifest_bytes: bytes, rng: random.Random) -> tuple[bytes, str]:
    """A well-formed manifest with one field set to a random (often hostile) value."""
    doc = json.loads(manifest_bytes)
    paths = [p for p in _paths(doc) if p]
    path = rng.choice(paths)
    value = rng.choice(_JSON_VALUES + [rng.randrange(-5, 10**6)])
    target = doc
    for k in path[:-1]:
        target = target[k]
    if rng.random() < 0.15 and isinstance(target, dict):
        del target[path[-1]]
        desc = f"delete {'/'.join(map(str, path))}"
    else:
        target[path[-1]] = value
        desc = f"{'/'.join(map(str, path))} = {value!r}"[:80]
    return (json.dumps(doc, indent=1, sort_keys=True) + "\n").encode(), desc


def commit_line_damage(log: bytes, rng: random.Random) -> tuple[bytes, str]:
    """A commit log with one record's field changed (still well-formed JSON, written as
    edcache writes its lines): a chunk record's chunk number, one end offset or one
    checksum; a schema record's column (kind, dtype, shape, stem) or segment; a header
    parameter."""
    lines = log.split(b"\n")
    n = rng.randrange(len(lines) - 1)
    rec = json.loads(lines[n])
    if "c" in rec:
        key = rng.choice(["c", "e", "h"])
        if key == "c":
            value = rng.choice([rec["c"] + 1, rec["c"] - 1, 0, 99, -1, None, "0"])
            rec["c"] = value
            desc = f"c = {value!r}"
        else:
            j = rng.randrange(len(rec[key]))
            old = rec[key][j]
            value = (rng.choice([old + 1, old - 1, old + 16, max(old - 16, 0), 0, 10**9, -1, None])
                     if key == "e" else rng.choice(["0" * 16, "ffffffffffffffff", f"{int(old, 16) ^ 1:016x}", "x"]))
            rec[key][j] = value
            desc = f"{key}[{j}] = {value!r}"
    elif "schema" in rec:
        cols = rec["schema"]["columns"]
        col = rng.choice(cols)
        key = rng.choice(["kind", "dtype", "shape", "stem", "key", "segments"])
        if key == "segments" and rec["segments"]:
            f = rng.choice(sorted(rec["segments"]))
            rec["segments"][f] = rng.choice([[], [[0, "0" * 16]], None])
            desc = f"segments[{f}] = {rec['segments'][f]!r}"
        else:
            key = "kind" if key == "segments" else key
            value = rng.choice({"kind": ["fixed", "ragged", "record", "str", "none"],
                                "dtype": ["<f8", "|u1", "<i2", "|O"], "shape": [[], [2], [4, 4, 3], [1]],
                                "stem": ["0000", "9999", "0001.1"], "key": ["label", "x", None]}[key])
            col[key] = value
            desc = f"schema column {col.get('stem')}: {key} = {value!r}"
    else:
        key = rng.choice(["length", "chunk_size", "dataset", "in_memory_keys", "build"])
        value = rng.choice([0, 1, 24, 39, 41, "x", None, [], ["label"]])
        rec[key] = value
        desc = f"header {key} = {value!r}"
    lines[n] = json.dumps(rec, separators=(",", ":")).encode()
    return b"\n".join(lines), f"line {n}: {desc}"[:80]


def table_damage(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    """``checksums.npy`` as a valid .npy with one entry changed (an end or a checksum)."""
    import io

    table = np.load(io.BytesIO(data), allow_pickle=False).copy()
    c, j, k = (rng.randrange(n) for n in table.shape)
    table[c, j, k] ^= np.uint64(rng.choice([1, 8, 1 << 20]))
    buf = io.BytesIO()
    np.save(buf, table, allow_pickle=False)
    return buf.getvalue(), f"valid table, [{c}, {j}, {'end' if k == 0 else 'xxh3'}] changed"


def label_npy_damage(rng: random.Random) -> tuple[bytes, str]:
    """A valid .npy file holding something else than the label column."""
    import io

    choice = rng.randrange(5)
    buf = io.BytesIO()
    if choice == 0:
        arr = np.arange(LENGTH, dtype=np.int32)
    elif choice == 1:
        arr = np.arange(LENGTH - 1, dtype=np.int64)
    elif choice == 2:
        arr = np.zeros((LENGTH, 2), dtype=np.int64)
    elif choice == 3:
        arr = np.array(["val"] * LENGTH)
    else:
        arr = np.arange(LENGTH, dtype=np.int64)[::-1].copy()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue(), f"valid .npy {arr.dtype}{arr.shape}"


def random_damage(cache_dir: str, rng: random.Random, kind: str | None = None,
                  file: str | None = None) -> Damage:
    """Draw one damage to a file of ``cache_dir``."""
    files = cache_files(cache_dir)
    file = file or rng.choice(files)
    size = os.path.getsize(os.path.join(cache_dir, file))
    kinds = ["flip", "flip", "truncate", "zero", "extend", "delete", "garbage", "swap", "field"]
    kind = kind or rng.choice(kinds)
    if kind == "flip":
        return Damage("flip", file, rng.randrange(max(size, 1)), rng.randrange(1, 256))
    if kind == "truncate":
        return Damage("truncate", file, rng.randrange(max(size, 1)))
    if kind == "zero":
        return Damage("zero", file, rng.randrange(max(size, 1)), rng.choice([1, 4, 8, 16, 64, 4096]))
    if kind == "extend":
        return Damage("extend", file, payload=rng.randbytes(rng.choice([1, 8, 100])))
    if kind == "garbage":
        return Damage("garbage", file, payload=rng.randbytes(rng.choice([0, 1, 16, size, 5000])))
    if kind == "swap":
        same = [f for f in files if f != file and file_kind(f) == file_kind(file)]
        others = same or [f for f in files if f != file]
        return Damage("swap", file, other=rng.choice(others))
    if kind == "field":
        data = open(os.path.join(cache_dir, file), "rb").read()
        if file == "manifest.json":
            payload, desc = manifest_field_damage(data, rng)
        elif file == "commits.log" and data.count(b"\n") >= 1:
            payload, desc = commit_line_damage(data, rng)
        elif file == "checksums.npy":
            payload, desc = table_damage(data, rng)
        elif file.endswith(".npy"):
            payload, desc = label_npy_damage(rng)
        else:
            return random_damage(cache_dir, rng, "flip", file)
        return Damage("field", file, other=desc, payload=payload)
    if kind == "delete":
        return Damage("delete", file)
    raise ValueError(kind)


# -- reading and classifying ----------------------------------------------------------
class UnexpectedException(AssertionError):
    """A reader raised something other than an EdcacheError (a bug)."""


def read_everything(root: str, complete: bool, verify: bool, dataset: type = SlowDataset) -> str:
    """Read every example and the labels (for a columnar dataset also one batch of
    every committed example, in reverse order); return ``detected``, ``wrong`` or
    ``same``."""
    committed = committed_indices(complete)
    errors = wrong = 0
    try:
        ds = CachedDataset.from_cache(root, NAME, verify=verify)
    except EdcacheError:
        return "detected"
    except Exception as exc:
        raise UnexpectedException(f"from_cache raised {type(exc).__name__}: {exc}") from exc
    try:
        if len(ds) != LENGTH:  # a silently different length is wrong data
            wrong += 1
        for i in range(min(len(ds), LENGTH)):
            try:
                got = ds[i]
            except IncompleteCacheError:
                if i in committed:
                    errors += 1
                continue
            except EdcacheError:
                errors += 1
                continue
            except Exception as exc:
                raise UnexpectedException(f"ds[{i}] raised {type(exc).__name__}: {exc}") from exc
            if i not in committed or not examples_equal(got, dataset.expected(i)):
                wrong += 1
        if dataset.columnar and committed and len(ds) == LENGTH:
            idx = sorted(committed, reverse=True)
            try:
                batch = ds.get_batch(idx)
            except EdcacheError:
                errors += 1
            except Exception as exc:
                raise UnexpectedException(f"get_batch raised {type(exc).__name__}: {exc}") from exc
            else:
                try:
                    assert_batch_equal(batch, idx, dataset)
                except AssertionError:
                    wrong += 1
        try:
            labels = ds.labels
        except IncompleteCacheError:
            if complete:
                errors += 1
        except EdcacheError:
            errors += 1
        except Exception as exc:
            raise UnexpectedException(f"labels raised {type(exc).__name__}: {exc}") from exc
        else:
            if not complete:
                wrong += 1
            else:
                want = expected_labels(dataset)
                try:
                    if list(labels) != list(want):
                        wrong += 1
                    for key, col in want.items():
                        got = labels.get(key)
                        if isinstance(col, np.ndarray):
                            ok = (isinstance(got, np.ndarray) and got.dtype == col.dtype
                                  and got.shape == col.shape and np.array_equal(got, col))
                        else:
                            ok = examples_equal(list(got) if isinstance(got, list) else got, col)
                        wrong += not ok
                except EdcacheError:
                    errors += 1
    finally:
        reader = getattr(ds, "_reader", None)
        if reader is not None:
            reader.close()
    if wrong:
        return "wrong"
    return "detected" if errors else "same"


def check_with_verify_cache(cache_dir: str) -> str:
    try:
        report = verify_cache(cache_dir)
    except EdcacheError:
        return "detected"
    except Exception as exc:
        raise UnexpectedException(f"verify_cache raised {type(exc).__name__}: {exc}") from exc
    return "same" if report.ok else "detected"


MODES = ("default", "verify=True", "edcache verify")


def open_peak(reference: str) -> int:
    """Peak allocation of opening an intact copy of ``reference`` and reading example 0."""
    with tempfile.TemporaryDirectory(prefix="edc-fuzz-") as root:
        shutil.copytree(reference, os.path.join(root, "cached", NAME))
        tracemalloc.start()
        try:
            CachedDataset.from_cache(root, NAME)[0]
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()


def run_trial(reference: str, damage: Damage, complete: bool, measure_memory: bool = False,
              dataset: type = SlowDataset, memory_slack: int = 0) -> dict[str, str] | None:
    """Apply ``damage`` to a copy of ``reference`` (a cache of ``dataset``); the outcome
    of each read mode.

    Returns None if the damage changed nothing. With ``measure_memory`` the peak
    allocation of the default reads is checked against the cache's size (plus
    ``memory_slack``: what opening an intact cache allocates beyond 4 MiB, while an open
    v2 bug makes every open allocate 64 MiB).
    """
    with tempfile.TemporaryDirectory(prefix="edc-fuzz-") as root:
        cache_dir = os.path.join(root, "cached", NAME)
        shutil.copytree(reference, cache_dir)
        if not damage.apply(cache_dir):
            return None
        out = {}
        total = sum(os.path.getsize(os.path.join(cache_dir, f)) for f in cache_files(cache_dir))
        if measure_memory:
            tracemalloc.start()
        try:
            out["default"] = read_everything(root, complete, verify=False, dataset=dataset)
            if measure_memory:
                _, peak = tracemalloc.get_traced_memory()
                limit = 2 * total + (4 << 20) + memory_slack
                if peak > limit:
                    raise UnexpectedException(f"reading allocated {peak} bytes (cache: {total} bytes)")
        finally:
            if measure_memory:
                tracemalloc.stop()
        out["verify=True"] = read_everything(root, complete, verify=True, dataset=dataset)
        out["edcache verify"] = check_with_verify_cache(cache_dir)
        return out


def reference_states(base: str, dataset: type) -> dict[str, tuple[str, bool]]:
    """The reference caches of ``dataset`` under ``base``: state name -> (cache dir,
    complete). State names are ``complete`` / ``incomplete`` for :class:`SlowDataset`,
    else prefixed with the dataset's kind (``mixed complete``)."""
    kind = next(k for k, cls in DATASETS.items() if cls is dataset)
    prefix = "" if dataset is SlowDataset else f"{kind} "
    return {
        f"{prefix}complete": (build_reference(os.path.join(base, f"{kind}-c"), True, dataset), True),
        f"{prefix}incomplete": (build_reference(os.path.join(base, f"{kind}-i"), False, dataset), False),
    }


def run_matrix(trials: int, seed: int = 0, progress: bool = False,
               datasets: tuple[type, ...] = (SlowDataset,)) -> tuple[dict, list]:
    """Run ``trials`` damages per (cache state, file kind, damage kind), for the
    reference caches of each of ``datasets``."""
    rng = random.Random(seed)
    table: dict[tuple[str, str], Counter] = defaultdict(Counter)
    misses: list[tuple[str, str, str]] = []  # (state, damage, mode) that returned wrong data / went unseen
    with tempfile.TemporaryDirectory(prefix="edc-ref-") as base:
        refs = {}
        for dataset in datasets:
            refs.update({state: (ref, complete, dataset)
                         for state, (ref, complete) in reference_states(base, dataset).items()})
        for state, (ref, complete, dataset) in refs.items():
            files = cache_files(ref)
            by_kind: dict[str, list[str]] = defaultdict(list)
            for f in files:
                by_kind[file_kind(f)].append(f)
            for fkind, members in sorted(by_kind.items()):
                for dkind in ["flip", "truncate", "zero", "extend", "delete", "garbage", "swap", "field"]:
                    if dkind == "swap" and len(files) < 2:
                        continue
                    done = 0
                    attempts = 0
                    while done < trials and attempts < trials * 3:
                        attempts += 1
                        damage = random_damage(ref, rng, dkind, rng.choice(members))
                        outcome = run_trial(ref, damage, complete, dataset=dataset)
                        if outcome is None:
                            continue
                        done += 1
                        row = table[(state, f"{fkind}: {dkind}")]
                        row["tried"] += 1
                        # harmful: some read (unverified or verified) does not return the reference
                        harmful = outcome["default"] != "same" or outcome["verify=True"] != "same"
                        row["harmful"] += harmful
                        for mode in MODES:
                            row[f"{mode}:{outcome[mode]}"] += 1
                            if harmful:
                                row[f"{mode}:harmful-detected"] += outcome[mode] == "detected"
                            if outcome[mode] != "detected" and mode != "default" and (harmful or mode == "edcache verify"):
                                misses.append((state, damage.describe(), f"{mode}: {outcome[mode]}"))
                    if progress:
                        print(f"{state:10s} {fkind:12s} {dkind:8s} {done}", file=sys.stderr)
    return table, misses


def format_table(table: dict) -> str:
    """Markdown: per damage, how many trials each mode detected / read wrong / read same."""
    head = ("| cache | file: damage | tried | default reads: detected / wrong / same "
            "| verify=True: detected / wrong / same | edcache verify: detected / missed |")
    lines = [head, "|" + "---|" * 6]
    totals: Counter = Counter()
    for (state, what), row in sorted(table.items()):
        totals.update(row)
        d = "{}:detected".format
        lines.append(
            f"| {state} | {what} | {row['tried']} "
            f"| {row[d('default')]} / {row['default:wrong']} / {row['default:same']} "
            f"| {row[d('verify=True')]} / {row['verify=True:wrong']} / {row['verify=True:same']} "
            f"| {row[d('edcache verify')]} / {row['edcache verify:same']} |"
        )
    lines.append(
        f"| **all** | | **{totals['tried']}** "
        f"| **{totals['default:detected']} / {totals['default:wrong']} / {totals['default:same']}** "
        f"| **{totals['verify=True:detected']} / {totals['verify=True:wrong']} / {totals['verify=True:same']}** "
        f"| **{totals['edcache verify:detected']} / {totals['edcache verify:same']}** |"
    )
    h = totals["harmful"]
    lines.append("")
    lines.append(f"Damages tried: {totals['tried']}; of these {h} change what an unverified or verified read returns.")
    for mode in MODES:
        det = totals[f"{mode}:harmful-detected"]
        lines.append(
            f"- {mode}: detected {det}/{h} ({100 * det / max(h, 1):.1f}%) of the damages that change read results; "
            f"all damages: {totals[f'{mode}:detected']}/{totals['tried']} detected, "
            f"{totals[f'{mode}:wrong']} returned wrong data silently"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trials", type=int, default=50, help="damages per (cache, file kind, damage kind)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--progress", action="store_true")
    p.add_argument("--dataset", choices=[*DATASETS, "all"], default="all",
                   help="which datasets' reference caches to damage (default: all four)")
    args = p.parse_args(argv)
    datasets = tuple(DATASETS.values()) if args.dataset == "all" else (DATASETS[args.dataset],)
    table, misses = run_matrix(args.trials, args.seed, args.progress, datasets)
    print(format_table(table))
    if misses:
        print("\nnot detected by verify=True reads or edcache verify:")
        for state, what, mode in misses:
            print(f"- {state}: {what} -> {mode}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
