"""``edcache verify PATH``: check every byte of a cache against its recorded checksums.

:func:`verify_cache` checks a cache directory of the default format completely:

* ``manifest.json`` parses, is valid, and is byte for byte what edcache writes for its
  content (an edited or damaged manifest shows up even where JSON still parses);
* ``shards.idx`` (complete caches) or ``commits.log`` (builds in progress) has the
  recorded size and checksum, the right shape, and canonical lines;
* ``packed.shard`` (complete caches whose chunks were packed into one file) and
  every committed shard exists, has the recorded size and xxh3-64 checksum, and its
  header, footer, offsets index and column table are consistent (``deep=True`` also
  decodes every record);
* every label column has the recorded size and checksum and loads with the recorded
  dtype and length.

Each problem names the damaged file and, for shards, the range of example indices it
holds: those are the examples a rebuild (``force_cache=True``) recomputes. Leftovers that
are not damage (temporary files of an interrupted build, uncommitted shards) are listed as
notes. For an edflow zip (``.zip``) every member's CRC-32 is checked; pickles are never
loaded. Nothing here imports or executes anything named by the files.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import re
import sys
import zipfile
import zlib
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from .errors import CacheNotFoundError, EdcacheError

__all__ = ["Problem", "VerifyReport", "verify_cache", "main_verify"]

_SHARD_NAME = re.compile(r"^(\d{8})\.shard$")
_EXAMPLE_MEMBER = re.compile(r"^example_(\d+)\.p$")
_MAX_MANIFEST = 1 << 24


@dataclass
class Problem:
    """One damaged file: its path relative to the cache, what is wrong, and the
    example indices ``start .. stop-1`` it holds (``None`` where not one range)."""

    file: str
    message: str
    start: int | None = None
    stop: int | None = None

    def __str__(self) -> str:
        where = self.file
        if self.start is not None and self.stop is not None:
            where += f" (examples {self.start}..{self.stop - 1})"
        return f"{where}: {self.message}"


@dataclass
class VerifyReport:
    """What :func:`verify_cache` found. ``ok`` is True when nothing is damaged."""

    path: str
    format: str = "edcache"
    length: int | None = None
    complete: bool = False
    shards_total: int = 0
    shards_checked: int = 0
    bytes_checked: int = 0
    labels_checked: list[str] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def damaged_files(self) -> list[str]:
        return sorted({p.file for p in self.problems})

    @property
    def damaged_ranges(self) -> list[tuple[int, int]]:
        """``(start, stop)`` of every damaged shard, sorted."""
        return sorted({(p.start, p.stop) for p in self.problems if p.start is not None and p.stop is not None})

    def add(self, file: str, message: str, start: int | None = None, stop: int | None = None) -> None:
        self.problems.append(Problem(file, message, start, stop))

    def __str__(self) -> str:
        state = "complete" if self.complete else "INCOMPLETE (build in progress or interrupted)"
        lines = [f"edcache verify {self.path}"]
        size = f"{self.length} examples" if self.length is not None else "length unknown"
        lines.append(f"  format: {self.format}, {size}, {state}")
        lines.append(
            f"  checked: {self.shards_checked}/{self.shards_total} {'files' if self.format == 'edcache' else 'shards'} "
            f"({self.bytes_checked / 1e6:.1f} MB), {len(self.labels_checked)} label columns"
        )
        for note in self.notes:
            lines.append(f"  note: {note}")
        if self.ok:
            lines.append("OK: no damage found")
        else:
            lines.append(f"DAMAGED: {len(self.problems)} problem(s)")
            lines.extend(f"  {p}" for p in self.problems)
            if self.damaged_ranges:
                ranges = ", ".join(f"{a}..{b - 1}" for a, b in self.damaged_ranges)
                lines.append(f"  examples affected: {ranges}")
            if self.format == "edcache":
                lines.append(
                    "  rebuild with CachedDataset(dataset, force_cache=True, keep_existing=False) "
                    "(CLI: --force --no-keep-existing)"
                )
            elif self.format == "edcache v1":
                lines.append(
                    "  rebuild the damaged parts with CachedDataset(dataset, force_cache=True) "
                    "after deleting the damaged files (or force_cache=True, keep_existing=False)"
                )
        return "\n".join(lines)


def _hash_file(path: str) -> tuple[int, str]:
    """Size and xxh3-64 hex digest of a file, through a memory map."""
    from .format.shards.shard import checksum

    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            return 0, checksum(b"")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            return size, checksum(mm)


def verify_cache(path: str, *, deep: bool = False, allow_pickle: bool = False) -> VerifyReport:
    """Check the cache at ``path`` and return what was found (never raises for damage).

    Parameters
    ----------
    path : str
        A cache directory (``<root>/cached/<name>``) or an edflow ``.zip``.
    deep : bool
        Also decode every record of every shard (structure only; the checksum already
        covers every byte).
    allow_pickle : bool
        With ``deep``, decode records holding pickles (only for caches built with
        ``allow_pickle=True`` that you trust); otherwise such records count as fine
        as long as their checksum matches.

    Raises
    ------
    CacheNotFoundError
        If ``path`` holds no cache at all.
    """
    path = os.fspath(path)
    if path.endswith(".zip") and os.path.isfile(path):
        return _verify_zip(path)
    if not os.path.isdir(path):
        raise CacheNotFoundError(f"no cache at {path}")
    names = set(os.listdir(path))
    from .format.shards.manifest import COMMITS, MANIFEST, SHARD_TABLE, SHARDS_DIR

    if MANIFEST not in names:
        if names & {COMMITS, SHARD_TABLE, SHARDS_DIR, "columns", "checksums.npy"}:
            report = VerifyReport(path)
            report.add(MANIFEST, "is missing: the directory holds edcache files but no manifest")
            return report
        from .format.legacy import is_legacy_folder

        if is_legacy_folder(path):
            report = VerifyReport(path, format="edflow folder", complete=True)
            report.notes.append("edflow folder caches carry no checksums; nothing to verify")
            return report
        raise CacheNotFoundError(f"no edcache cache at {path} (no manifest.json)")
    from .format.columnar.manifest import peek_version

    if peek_version(path) == 1:
        report = VerifyReport(path, format="edcache v1")
        _verify_dir(path, report, deep, allow_pickle)
        return report
    from .format.columnar.check import check_cache

    report = VerifyReport(path)
    check_cache(path, report, deep, allow_pickle)
    return report


def _verify_dir(path: str, report: VerifyReport, deep: bool, allow_pickle: bool) -> None:
    from .format.shards.manifest import (
        COMMITS,
        MANIFEST,
        PACKED,
        SHARD_TABLE,
        SHARD_TABLE_DTYPE,
        SHARDS_DIR,
        Manifest,
    )

    # -- manifest --------------------------------------------------------------------
    mpath = os.path.join(path, MANIFEST)
    try:
        with open(mpath, "rb") as f:
            data = f.read(_MAX_MANIFEST + 1)
    except OSError as exc:
        report.add(MANIFEST, f"cannot be read ({exc})")
        return
    if len(data) > _MAX_MANIFEST:
        report.add(MANIFEST, f"is larger than {_MAX_MANIFEST} bytes: not a manifest edcache wrote")
        return
    try:
        manifest = Manifest.from_bytes(data, MANIFEST)
    except EdcacheError as exc:
        report.add(MANIFEST, f"is damaged: {exc}")
        return
    report.length = manifest.length
    report.complete = manifest.complete
    report.shards_total = manifest.num_chunks
    if manifest.to_bytes() != data:
        report.add(MANIFEST, "differs from what edcache writes for its content: it was edited or damaged")
    for message in _manifest_schema_problems(manifest):
        report.add(MANIFEST, message)

    # -- a packed cache: one file instead of the chunk shards ------------------------
    packed = manifest.packed if manifest.complete else None
    packed_rec = None
    if not manifest.complete:
        packed_rec = _read_packed_record(path, report)
        if packed_rec is not None:
            packed = packed_rec["p"]
    if packed is not None:
        if manifest.complete and os.path.exists(os.path.join(path, COMMITS)):
            report.notes.append(f"{COMMITS} left over next to a complete manifest (harmless)")
        if packed_rec is not None:
            report.notes.append("every chunk is committed and packed; the next build only marks "
                                "the cache complete")
        report.shards_total = 1
        _check_shard(os.path.join(path, PACKED), PACKED, 0, manifest.length, packed["nbytes"],
                     packed["xxh3"], report, deep, allow_pickle)
        shards_dir = os.path.join(path, SHARDS_DIR)
        if os.path.isdir(shards_dir):
            for name in sorted(os.listdir(shards_dir)):
                report.notes.append(f"{SHARDS_DIR}/{name}: left over from packing (harmless; "
                                    "removed by the next build)")
        _note_temp_files(path, report)
        if manifest.complete:
            _check_labels(path, manifest, report)
        return

    # -- which shards are committed, with which size and checksum --------------------
    expected: dict[int, tuple[int, str]] = {}
    if manifest.complete:
        table = _check_shard_table(path, manifest, report, SHARD_TABLE, SHARD_TABLE_DTYPE)
        if table is not None:
            expected = {c: (int(n), f"{int(h):016x}") for c, (n, h) in enumerate(table.tolist())}
        if os.path.exists(os.path.join(path, COMMITS)):
            report.notes.append(f"{COMMITS} left over next to a complete manifest (harmless)")
    else:
        expected = _check_commit_log(path, manifest, report, COMMITS)
        missing = manifest.num_chunks - len(expected)
        report.notes.append(
            f"{len(expected)} of {manifest.num_chunks} chunks committed; {missing} not yet built "
            "(resume with CachedDataset(dataset) or edcache --dataset ...)"
        )

    # -- shards ----------------------------------------------------------------------
    shards_dir = os.path.join(path, SHARDS_DIR)
    table_ok = not manifest.complete or expected
    for chunk in range(manifest.num_chunks):
        task = manifest.chunk(chunk)
        rel = f"{SHARDS_DIR}/{chunk:08d}.shard"
        full = os.path.join(path, rel)
        if chunk in expected:
            nbytes, digest = expected[chunk]
            _check_shard(full, rel, task.start, task.size, nbytes, digest, report, deep, allow_pickle)
        elif manifest.complete and not table_ok:
            # no trustworthy table: check structure at least
            size = _size(full)
            if size is None:
                report.add(rel, "is missing", task.start, task.stop)
            else:
                _check_shard(full, rel, task.start, task.size, size, None, report, deep, allow_pickle)
    if os.path.isdir(shards_dir) and not manifest.complete:
        unlogged = sorted(
            int(m.group(1)) for m in map(_SHARD_NAME.match, os.listdir(shards_dir))
            if m is not None and int(m.group(1)) < manifest.num_chunks and int(m.group(1)) not in expected
        )
        if len(unlogged) > 1:  # a crash leaves at most one renamed shard without its record
            report.add(COMMITS, f"has no record of {len(unlogged)} shard files (chunks {unlogged[:10]}); "
                                "a crash leaves at most one: records were lost. Those chunks are rebuilt "
                                "by the next build")
    if os.path.isdir(shards_dir):
        for name in sorted(os.listdir(shards_dir)):
            m = _SHARD_NAME.match(name)
            if name.startswith(".tmp-"):
                report.notes.append(f"{SHARDS_DIR}/{name}: temporary file of an interrupted build "
                                    "(removed by the next build)")
            elif m is None or int(m.group(1)) >= manifest.num_chunks:
                report.notes.append(f"{SHARDS_DIR}/{name}: not part of this cache")
            elif int(m.group(1)) not in expected and not manifest.complete:
                report.notes.append(f"{SHARDS_DIR}/{name}: written but not committed "
                                    "(removed and rebuilt by the next build)")
    elif manifest.num_chunks:
        report.add(SHARDS_DIR, "folder is missing", 0, manifest.length)
    _note_temp_files(path, report)
    if os.path.exists(os.path.join(path, PACKED)):
        report.notes.append(f"{PACKED}: written by a build killed before it committed the packing "
                            "(removed by the next build)")

    # -- labels ----------------------------------------------------------------------
    if manifest.complete:
        _check_labels(path, manifest, report)


def _note_temp_files(path: str, report: VerifyReport) -> None:
    for name in sorted(os.listdir(path)):
        if name.startswith(".tmp-"):
            report.notes.append(f"{name}: temporary file of an interrupted build (removed by the next build)")


def _read_packed_record(path: str, report: VerifyReport) -> dict | None:
    """The packing record of ``commits.log``, checked to be the log's last line."""
    from .format.shards.manifest import COMMITS, packed_record

    try:
        with open(os.path.join(path, COMMITS), "rb") as f:
            lines = f.read().split(b"\n")
    except OSError:
        return None
    for number, line in enumerate(lines[:-1], 1):
        if not line.startswith(_PACKED_START):
            continue
        try:
            rec = json.loads(line)
            ok = packed_record(rec["p"], rec["labels"]) == line + b"\n" and set(rec["p"]) == {"nbytes", "xxh3"}
        except (ValueError, KeyError, TypeError):
            ok = False
        if not ok or number != len(lines) - 1:
            report.add(COMMITS, f"line {number} is a damaged or misplaced packing record: {line[:80]!r}")
            return None
        return rec
    return None


#: how a packing record line starts (``json.dumps(..., sort_keys=True)``)
_PACKED_START = b'{"labels": '


def _prefix_regex() -> "re.Pattern[bytes]":
    """Matches every non-empty prefix of a commit record ``{"c": N, "n": N, "h": "<16 hex>"}``."""
    tokens = [re.escape(t) for t in '{"c": '] + [r"\d+"] + [re.escape(t) for t in ', "n": '] + [r"\d+"]
    tokens += [re.escape(t) for t in ', "h": "'] + ["HEX"] + [re.escape(t) for t in '"}']
    rx = ""
    for tok in reversed(tokens):
        if tok == "HEX":
            rx = f"(?:[0-9a-f]{{16}}(?:{rx})?|[0-9a-f]{{1,15}})"
        else:
            rx = f"(?:{tok}(?:{rx})?)" if rx else f"(?:{tok})"
    return re.compile(rx.encode())


_COMMIT_PREFIX = _prefix_regex()
_HEX16 = re.compile(r"[0-9a-f]{16}")


def _manifest_schema_problems(manifest) -> list[str]:
    """Values ``Manifest.from_bytes`` accepts but edcache never writes."""
    out = []
    if len(set(manifest.in_memory_keys)) != len(manifest.in_memory_keys):
        out.append(f"in_memory_keys repeat a key: {manifest.in_memory_keys}")
    if not isinstance(manifest.dataset, str) or not (manifest.parameters is None or isinstance(manifest.parameters, str)):
        out.append("dataset or parameters has the wrong type")
    if manifest.complete:
        name, table = ("packed", manifest.packed) if manifest.packed is not None else ("shard_table", manifest.shard_table)
        if set(table) != {"nbytes", "xxh3"} or type(table["nbytes"]) is not int or not (
            isinstance(table["xxh3"], str) and _HEX16.fullmatch(table["xxh3"])
        ):
            out.append(f"{name} entry is malformed: {table}")
        for n, key in enumerate(manifest.in_memory_keys):
            info = manifest.labels.get(key, {})
            kind = info.get("kind")
            fields = {"file", "kind", "nbytes", "xxh3"} | ({"dtype", "shape"} if kind == "array" else set())
            ok = (
                kind in ("array", "list")
                and set(info) == fields
                and info["file"] == f"labels/{n}.{'npy' if kind == 'array' else 'list'}"
                and type(info["nbytes"]) is int
                and isinstance(info["xxh3"], str) and _HEX16.fullmatch(info["xxh3"]) is not None
            )
            if ok and kind == "array":
                shape = info["shape"]
                ok = (isinstance(info["dtype"], str) and isinstance(shape, list) and len(shape) >= 1
                      and shape[0] == manifest.length and all(type(d) is int and d >= 0 for d in shape))
            if not ok:
                out.append(f"labels entry of {key!r} is malformed: {info}")
    elif manifest.labels or manifest.shard_table is not None or manifest.packed is not None:
        out.append("an incomplete manifest lists labels, a shard table or a packed file")
    return out


def _size(path: str) -> int | None:
    try:
        return os.path.getsize(path)
    except OSError:
        return None


def _check_shard_table(path, manifest, report, name, dtype) -> np.ndarray | None:
    full = os.path.join(path, name)
    info = manifest.shard_table or {}
    try:
        size, digest = _hash_file(full)
    except FileNotFoundError:
        report.add(name, "is missing: per-shard checksums are unknown")
        return None
    except OSError as exc:
        report.add(name, f"cannot be read ({exc})")
        return None
    if size != info.get("nbytes"):
        report.add(name, f"has {size} bytes, the manifest says {info.get('nbytes')}")
        return None
    if digest != info.get("xxh3"):
        report.add(name, f"fails its checksum (xxh3 {digest}, the manifest says {info.get('xxh3')})")
        return None
    try:
        table = np.load(full, allow_pickle=False)
    except Exception as exc:  # noqa: BLE001 - any parse failure is damage
        report.add(name, f"is not a valid shard table ({type(exc).__name__}: {exc})")
        return None
    if table.dtype != dtype or table.shape != (manifest.num_chunks,):
        report.add(name, f"has shape {table.shape} and dtype {table.dtype}; expected "
                         f"({manifest.num_chunks},) and {dtype}")
        return None
    report.bytes_checked += size
    return table


def _check_commit_log(path: str, manifest, report: VerifyReport, name: str) -> dict[int, tuple[int, str]]:
    full = os.path.join(path, name)
    try:
        with open(full, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return {}  # the build has not started committing yet
    except OSError as exc:
        report.add(name, f"cannot be read ({exc})")
        return {}
    lines = data.split(b"\n")
    tail = lines[-1]
    # A kill cannot tear the single small write() of a record; power loss or damage can.
    if tail and (
        _COMMIT_PREFIX.fullmatch(tail) or not tail.strip(b"\0")
        or tail.startswith(_PACKED_START) or _PACKED_START.startswith(tail)
    ):
        report.add(name, f"last record is torn ({tail[:40]!r}): power loss during a commit, or the "
                         "file was truncated; that chunk counts as not committed and the next build "
                         "rebuilds it")
    elif tail:
        report.add(name, f"ends in bytes that are not a commit record: {tail[:40]!r}")
    commits: dict[int, tuple[int, str]] = {}
    for number, line in enumerate(lines[:-1], 1):
        if line.startswith(_PACKED_START):
            continue  # checked by _read_packed_record
        try:
            rec = json.loads(line)
            chunk, nbytes, digest = rec["c"], rec["n"], rec["h"]
            canonical = json.dumps({"c": chunk, "n": nbytes, "h": digest}).encode()
            valid = (
                type(chunk) is int and 0 <= chunk < manifest.num_chunks and type(nbytes) is int
                and isinstance(digest, str) and re.fullmatch(r"[0-9a-f]{16}", digest) is not None
                and canonical == line
            )
        except (ValueError, KeyError, TypeError):
            valid = False
        if not valid:
            report.add(name, f"line {number} is damaged: {line[:80]!r}")
            continue
        if chunk in commits and commits[chunk] != (nbytes, digest):
            task = manifest.chunk(chunk)
            report.add(name, f"line {number} contradicts an earlier record of chunk {chunk}",
                       task.start, task.stop)
            continue
        commits[chunk] = (nbytes, digest)
    report.bytes_checked += len(data)
    return commits


def _check_shard(full, rel, start, count, nbytes, digest, report, deep, allow_pickle) -> None:
    from .format.shards.shard import ShardFile

    stop = start + count
    try:
        size, actual = _hash_file(full)
    except FileNotFoundError:
        report.add(rel, "is missing", start, stop)
        return
    except OSError as exc:
        report.add(rel, f"cannot be read ({exc})", start, stop)
        return
    report.shards_checked += 1
    report.bytes_checked += size
    if size != nbytes:
        report.add(rel, f"has {size} bytes, {nbytes} were committed", start, stop)
        return
    if digest is not None and actual != digest:
        report.add(rel, f"fails its checksum (xxh3 {actual}, {digest} was committed)", start, stop)
        return
    try:
        sf = ShardFile(full, nbytes, start, count, None, allow_pickle)
    except EdcacheError as exc:
        report.add(rel, f"bad structure: {exc}", start, stop)
        return
    try:
        if deep:
            from .errors import UnsafePickleError

            for row in range(count):
                try:
                    sf.read(row)
                except UnsafePickleError:
                    pass  # a pickle the cache was built with; its bytes are checksummed
            sf.labels()
    except EdcacheError as exc:
        report.add(rel, f"bad record: {exc}", start, stop)
    finally:
        sf.close()


def _check_labels(path: str, manifest, report: VerifyReport) -> None:
    from .format.shards.labels import load_label

    for key in manifest.in_memory_keys:
        info = manifest.labels.get(key, {})
        named = info.get("file")
        safe = isinstance(named, str) and named.startswith("labels/") and ".." not in named
        rel = named if safe else f"label {key!r}"
        full = os.path.join(path, rel)
        if safe and os.path.isfile(full):
            try:
                size, digest = _hash_file(full)
            except OSError as exc:
                report.add(rel, f"(label {key!r}) cannot be read ({exc})")
                continue
            report.bytes_checked += size
            if size == info.get("nbytes") and digest != info.get("xxh3"):
                report.add(rel, f"(label {key!r}) fails its checksum (xxh3 {digest}, the manifest "
                                f"says {info.get('xxh3')})")
                continue
        try:
            column = load_label(path, key, info, manifest.length, verify=True)
        except EdcacheError as exc:
            message = str(exc).replace(f"label file {full} (key {key!r}) ", "")
            report.add(rel, f"(label {key!r}) {message}")
            continue
        del column
        report.labels_checked.append(key)


def _verify_zip(path: str) -> VerifyReport:
    """CRC-check every member of an edflow zip without unpickling anything."""
    report = VerifyReport(path, format="edflow zip", complete=True)
    name = os.path.basename(path)
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        report.add(name, f"is not a readable zip ({exc}); an interrupted edflow build leaves a zip "
                         "without central directory: edcache convert salvages its complete members")
        return report
    indices: set[int] = set()
    with zf:
        infos = zf.infolist()
        report.shards_total = len(infos)
        for info in infos:
            m = _EXAMPLE_MEMBER.match(info.filename)
            start = int(m.group(1)) if m else None
            if start is not None:
                indices.add(start)
            try:
                with zf.open(info) as member:
                    while member.read(1 << 20):
                        pass
            except (zipfile.BadZipFile, zlib.error, OSError, EOFError, ValueError,
                    NotImplementedError) as exc:
                report.add(f"{name}:{info.filename}", f"is damaged ({type(exc).__name__}: {exc})",
                           start, None if start is None else start + 1)
                continue
            report.shards_checked += 1
            report.bytes_checked += info.compress_size
    report.length = len(indices)
    if indices and indices != set(range(len(indices))):
        missing = sorted(set(range(max(indices) + 1)) - indices)
        report.add(name, f"examples missing from the zip: {missing[:10]}{' ...' if len(missing) > 10 else ''}")
    return report


def main_verify(argv: Sequence[str] | None = None) -> int:
    """``edcache verify PATH [--deep]``: 0 if intact, 1 if damaged, 2 if no cache there."""
    p = argparse.ArgumentParser(
        prog="edcache verify",
        description="Check every shard, label column and index file of a cache against its "
        "recorded sizes and xxh3 checksums; name each damaged file and the examples it holds.",
    )
    p.add_argument("path", help="cache directory (<root>/cached/<name>) or edflow .zip")
    p.add_argument("--deep", action="store_true", help="also decode every record")
    p.add_argument("--allow-pickle", action="store_true",
                   help="with --deep, decode pickled values of a trusted allow_pickle cache")
    args = p.parse_args(None if argv is None else list(argv))
    try:
        report = verify_cache(args.path, deep=args.deep, allow_pickle=args.allow_pickle)
    except CacheNotFoundError as exc:
        print(f"edcache verify: {exc}", file=sys.stderr)
        return 2
    print(report)
    return 0 if report.ok else 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main_verify())
