"""``edcache verify`` of a format-v1 cache (read-only format; :mod:`edcache.verify` calls
:func:`check_cache`).

Checks ``manifest.json`` (parses, byte for byte what edcache writes, every field as edcache
writes it), ``shards.idx`` or ``commits.log``, ``packed.shard`` or every committed shard
(size, xxh3-64 checksum, structure; ``deep`` decodes every record) and every label column.
The records are parsed by their owner, :mod:`.manifest`; this module only judges them.
"""

from __future__ import annotations

import contextlib
import json
import mmap
import os
import re
from typing import TYPE_CHECKING, Any

import numpy as np

from ...errors import EdcacheError
from .manifest import (
    COMMITS,
    MANIFEST,
    MAX_MANIFEST_BYTES,
    PACKED,
    PACKED_START,
    SHARD_TABLE,
    SHARD_TABLE_DTYPE,
    SHARDS_DIR,
    CommitRecord,
    Manifest,
    packed_record,
)
from .shard import checksum

if TYPE_CHECKING:  # what edcache.verify.VerifyReport provides
    from ..columnar.check import Report as VerifyReport

_SHARD_NAME = re.compile(r"^(\d{8})\.shard$")
_HEX16 = re.compile(r"[0-9a-f]{16}")


def _hash_file(path: str) -> tuple[int, str]:
    """Size and xxh3-64 hex digest of a file, through a memory map."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            return 0, checksum(b"")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            return size, checksum(mm)


def check_cache(path: str, report: VerifyReport, deep: bool, allow_pickle: bool) -> None:
    """Check the v1 cache at ``path`` into ``report``."""
    manifest = _checked_manifest(path, report)
    if manifest is None:
        return
    if _check_packed(path, manifest, report, deep, allow_pickle):
        return
    expected = _committed_shards(path, manifest, report)
    _check_shards(path, manifest, expected, report, deep, allow_pickle)
    _check_shard_folder(path, manifest, expected, report)
    _note_temp_files(path, report)
    if os.path.exists(os.path.join(path, PACKED)):
        report.notes.append(f"{PACKED}: written by a build killed before it committed the packing "
                            "(removed by the next build)")
    if manifest.complete:
        _check_labels(path, manifest, report)


def _checked_manifest(path: str, report: VerifyReport) -> Manifest | None:
    """The manifest, if it parses; its damage and oddities go to ``report``."""
    try:
        with open(os.path.join(path, MANIFEST), "rb") as f:
            data = f.read(MAX_MANIFEST_BYTES + 1)
    except OSError as exc:
        report.add(MANIFEST, f"cannot be read ({exc})")
        return None
    if len(data) > MAX_MANIFEST_BYTES:
        report.add(MANIFEST, f"is larger than {MAX_MANIFEST_BYTES} bytes: not a manifest edcache wrote")
        return None
    try:
        manifest = Manifest.from_bytes(data, MANIFEST)
    except EdcacheError as exc:
        report.add(MANIFEST, f"is damaged: {exc}")
        return None
    report.length = manifest.length
    report.complete = manifest.complete
    report.shards_total = manifest.num_chunks
    if manifest.to_bytes() != data:
        report.add(MANIFEST, "differs from what edcache writes for its content: it was edited or damaged")
    for message in _manifest_schema_problems(manifest):
        report.add(MANIFEST, message)
    return manifest


def _check_packed(path: str, manifest: Manifest, report: VerifyReport, deep: bool, allow_pickle: bool) -> bool:
    """Check a packed cache (one file instead of the chunk shards); False if it is not one."""
    packed = manifest.packed if manifest.complete else None
    packed_rec = None
    if not manifest.complete:
        packed_rec = _read_packed_record(path, report)
        if packed_rec is not None:
            packed = packed_rec["p"]
    if packed is None:
        return False
    if manifest.complete and os.path.exists(os.path.join(path, COMMITS)):
        report.notes.append(f"{COMMITS} left over next to a complete manifest (harmless)")
    if packed_rec is not None:
        report.notes.append("every chunk is committed and packed; the next build only marks the cache complete")
    report.shards_total = 1
    _check_shard(os.path.join(path, PACKED), PACKED, 0, manifest.length, packed["nbytes"],
                 packed["xxh3"], report, deep, allow_pickle)
    shards_dir = os.path.join(path, SHARDS_DIR)
    if os.path.isdir(shards_dir):
        for name in sorted(os.listdir(shards_dir)):
            report.notes.append(f"{SHARDS_DIR}/{name}: left over from packing (harmless; removed by the next build)")
    _note_temp_files(path, report)
    if manifest.complete:
        _check_labels(path, manifest, report)
    return True


def _committed_shards(path: str, manifest: Manifest, report: VerifyReport) -> dict[int, tuple[int, str]]:
    """Which shards are committed, with which size and checksum (from ``shards.idx`` of a
    complete cache, else from ``commits.log``)."""
    expected: dict[int, tuple[int, str]] = {}
    if manifest.complete:
        table = _check_shard_table(path, manifest, report)
        if table is not None:
            expected = {c: (int(n), f"{int(h):016x}") for c, (n, h) in enumerate(table.tolist())}
        if os.path.exists(os.path.join(path, COMMITS)):
            report.notes.append(f"{COMMITS} left over next to a complete manifest (harmless)")
        return expected
    expected = _check_commit_log(path, manifest, report)
    missing = manifest.num_chunks - len(expected)
    report.notes.append(
        f"{len(expected)} of {manifest.num_chunks} chunks committed; {missing} not yet built "
        "(resume with CachedDataset(dataset) or edcache --dataset ...)"
    )
    return expected


def _check_shards(path: str, manifest: Manifest, expected: dict[int, tuple[int, str]], report: VerifyReport,
                  deep: bool, allow_pickle: bool) -> None:
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


def _shard_number(name: str) -> int | None:
    m = _SHARD_NAME.match(name)
    return None if m is None else int(m.group(1))


def _check_shard_folder(path: str, manifest: Manifest, expected: dict[int, tuple[int, str]],
                        report: VerifyReport) -> None:
    """Shard files without a commit record, files that are not shards of this cache."""
    shards_dir = os.path.join(path, SHARDS_DIR)
    if not os.path.isdir(shards_dir):
        if manifest.num_chunks:
            report.add(SHARDS_DIR, "folder is missing", 0, manifest.length)
        return
    names = sorted(os.listdir(shards_dir))
    if not manifest.complete:
        unlogged = [n for n in map(_shard_number, names)
                    if n is not None and n < manifest.num_chunks and n not in expected]
        if len(unlogged) > 1:  # a crash leaves at most one renamed shard without its record
            report.add(COMMITS, f"has no record of {len(unlogged)} shard files (chunks {unlogged[:10]}); "
                                "a crash leaves at most one: records were lost. Those chunks are rebuilt "
                                "by the next build")
    for name in names:
        number = _shard_number(name)
        if name.startswith(".tmp-"):
            report.notes.append(f"{SHARDS_DIR}/{name}: temporary file of an interrupted build "
                                "(removed by the next build)")
        elif number is None or number >= manifest.num_chunks:
            report.notes.append(f"{SHARDS_DIR}/{name}: not part of this cache")
        elif number not in expected and not manifest.complete:
            report.notes.append(f"{SHARDS_DIR}/{name}: written but not committed "
                                "(removed and rebuilt by the next build)")


def _note_temp_files(path: str, report: VerifyReport) -> None:
    for name in sorted(os.listdir(path)):
        if name.startswith(".tmp-"):
            report.notes.append(f"{name}: temporary file of an interrupted build (removed by the next build)")


def _read_packed_record(path: str, report: VerifyReport) -> dict | None:
    """The packing record of ``commits.log``, checked to be the log's last line."""
    try:
        with open(os.path.join(path, COMMITS), "rb") as f:
            lines = f.read().split(b"\n")
    except OSError:
        return None
    for number, line in enumerate(lines[:-1], 1):
        if not line.startswith(PACKED_START):
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


def _prefix_regex() -> re.Pattern[bytes]:
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


def _manifest_schema_problems(manifest: Manifest) -> list[str]:
    """Values ``Manifest.from_bytes`` accepts but edcache never writes."""
    out = []
    if len(set(manifest.in_memory_keys)) != len(manifest.in_memory_keys):
        out.append(f"in_memory_keys repeat a key: {manifest.in_memory_keys}")
    if not isinstance(manifest.dataset, str) or not isinstance(manifest.parameters, (str, type(None))):
        out.append("dataset or parameters has the wrong type")
    if not manifest.complete:
        if manifest.labels or manifest.shard_table is not None or manifest.packed is not None:
            out.append("an incomplete manifest lists labels, a shard table or a packed file")
        return out
    name, table = ("packed", manifest.packed) if manifest.packed is not None else ("shard_table", manifest.shard_table)
    if not _file_entry_ok(table, {"nbytes", "xxh3"}):
        out.append(f"{name} entry is malformed: {table}")
    for n, key in enumerate(manifest.in_memory_keys):
        info = manifest.labels.get(key, {})
        if not _label_entry_ok(info, n, manifest.length):
            out.append(f"labels entry of {key!r} is malformed: {info}")
    return out


def _file_entry_ok(info: Any, fields: set[str]) -> bool:
    """An entry ``{"nbytes": int, "xxh3": 16 hex digits, ...}`` with exactly ``fields``."""
    return (set(info) == fields and type(info["nbytes"]) is int
            and isinstance(info["xxh3"], str) and _HEX16.fullmatch(info["xxh3"]) is not None)


def _label_entry_ok(info: dict[str, Any], n: int, length: int) -> bool:
    """The manifest entry of label column ``n`` as edcache writes it."""
    kind = info.get("kind")
    if kind not in ("array", "list"):
        return False
    fields = {"file", "kind", "nbytes", "xxh3"} | ({"dtype", "shape"} if kind == "array" else set())
    if not _file_entry_ok(info, fields) or info["file"] != f"labels/{n}.{'npy' if kind == 'array' else 'list'}":
        return False
    if kind == "list":
        return True
    shape = info["shape"]
    return (isinstance(info["dtype"], str) and isinstance(shape, list) and len(shape) >= 1
            and shape[0] == length and all(type(d) is int and d >= 0 for d in shape))


def _size(path: str) -> int | None:
    try:
        return os.path.getsize(path)
    except OSError:
        return None


def _check_shard_table(path: str, manifest: Manifest, report: VerifyReport) -> np.ndarray | None:
    name, dtype = SHARD_TABLE, SHARD_TABLE_DTYPE
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
    except Exception as exc:  # any parse failure is damage
        report.add(name, f"is not a valid shard table ({type(exc).__name__}: {exc})")
        return None
    if table.dtype != dtype or table.shape != (manifest.num_chunks,):
        report.add(name, f"has shape {table.shape} and dtype {table.dtype}; expected "
                         f"({manifest.num_chunks},) and {dtype}")
        return None
    report.bytes_checked += size
    return table


def _check_commit_log(path: str, manifest: Manifest, report: VerifyReport) -> dict[int, tuple[int, str]]:
    name = COMMITS
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
        or tail.startswith(PACKED_START) or PACKED_START.startswith(tail)
    ):
        report.add(name, f"last record is torn ({tail[:40]!r}): power loss during a commit, or the "
                         "file was truncated; that chunk counts as not committed and the next build "
                         "rebuilds it")
    elif tail:
        report.add(name, f"ends in bytes that are not a commit record: {tail[:40]!r}")
    commits: dict[int, tuple[int, str]] = {}
    for number, line in enumerate(lines[:-1], 1):
        if line.startswith(PACKED_START):
            continue  # checked by _read_packed_record
        record = CommitRecord.parse(line, manifest.num_chunks, strict=True)
        if record is None:
            report.add(name, f"line {number} is damaged: {line[:80]!r}")
            continue
        entry = (record.nbytes, record.xxh3)
        if commits.get(record.chunk, entry) != entry:
            task = manifest.chunk(record.chunk)
            report.add(name, f"line {number} contradicts an earlier record of chunk {record.chunk}",
                       task.start, task.stop)
            continue
        commits[record.chunk] = entry
    report.bytes_checked += len(data)
    return commits


def _check_shard(full: str, rel: str, start: int, count: int, nbytes: int, digest: str | None,
                 report: VerifyReport, deep: bool, allow_pickle: bool) -> None:
    from .shard import ShardFile

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
            from ...errors import UnsafePickleError

            for row in range(count):
                # a pickle the cache was built with: its bytes are checksummed
                with contextlib.suppress(UnsafePickleError):
                    sf.read(row)
            sf.labels()
    except EdcacheError as exc:
        report.add(rel, f"bad record: {exc}", start, stop)
    finally:
        sf.close()


def _check_labels(path: str, manifest: Manifest, report: VerifyReport) -> None:
    from .labels import load_label

    for key in manifest.in_memory_keys:
        info = manifest.labels.get(key, {})
        named = info.get("file")
        safe = isinstance(named, str) and named.startswith("labels/") and ".." not in named
        rel = named if isinstance(named, str) and safe else f"label {key!r}"
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
