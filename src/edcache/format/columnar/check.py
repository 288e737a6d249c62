"""Checking a format-v2 cache byte for byte (what ``edcache verify`` runs on v2 caches).

Every committed chunk of every column file is hashed and compared with the checksum
table (complete caches) or the commit log (builds in progress); a mismatch names the
file, its column and the examples of that chunk. Index files are checked for
structure (offsets inside the data, non-decreasing). Sizes declared by the manifest
are compared with the files before anything is iterated, so a crafted manifest cannot
make verification run long or allocate much. Nothing is decoded unless ``deep``.
"""

from __future__ import annotations

import io
import os
from typing import Any, Protocol

import numpy as np
import xxhash

from ...errors import CorruptCacheError, EdcacheError
from .files import open_fd
from .log import read_log
from .manifest import (
    COMMITS,
    LABELS_DIR,
    MANIFEST,
    TABLE,
    Manifest,
    Schema,
    owned_files,
    read_manifest,
)
from .schema import RAGGED, VARSHAPE


class Report(Protocol):
    length: int | None
    complete: bool
    shards_total: int
    shards_checked: int
    bytes_checked: int
    labels_checked: list
    notes: list

    def add(self, file: str, message: str, start: int | None = None, stop: int | None = None) -> None: ...


def check_cache(path: str, report: Report, deep: bool = False, allow_pickle: bool = False) -> None:
    """Add every problem of the v2 cache at ``path`` to ``report``."""
    try:
        manifest = read_manifest(path)
    except (CorruptCacheError, OSError) as exc:
        report.add(MANIFEST, f"is damaged: {exc}")
        state = read_log(path)
        if state is not None:
            report.notes.append("commits.log holds the build's parameters: the next build with the "
                                "same dataset recovers the manifest and keeps the committed chunks")
        return
    report.length = manifest.length
    report.complete = manifest.complete
    if manifest.complete:
        schema, segments = manifest.schema, _table_segments(path, manifest, report)
        if segments is None:
            return
        sizes = dict(manifest.files)
    else:
        state = read_log(path)
        if state is None:
            if os.path.exists(os.path.join(path, COMMITS)):
                report.add(COMMITS, "has no valid header line: the build cannot be resumed")
            elif _has_column_data(path):
                report.add(COMMITS, "is missing from an incomplete cache that holds column data: its "
                                    "committed chunks are lost (the next build starts over)",
                           0, manifest.length)
            schema, segments, sizes = Schema(), {}, {}
        else:
            schema, segments = state.schema, state.segments
            sizes = state.ends()
            if state.invalid or state.orphans:
                lost = f"; {state.orphans} later chunk record(s) no longer count" if state.orphans else ""
                report.add(COMMITS, f"holds {state.invalid} damaged line(s){lost}: examples committed "
                                    "after the damage are lost (the next build computes them again)",
                           state.committed * manifest.chunk_size, manifest.length)
    files = schema.files()
    report.shards_total = len(files)
    for gid, spec in enumerate(schema.columns):
        for f in spec.files():
            if _check_file(path, f, spec, gid, sizes[f], segments[f], manifest, report):
                report.shards_checked += 1
    if manifest.complete:
        _check_labels(path, manifest, report)
        if deep:
            _check_examples(path, manifest, report, allow_pickle)
    _note_strays(path, schema, manifest, report)


def _has_column_data(path: str) -> bool:
    folder = os.path.join(path, "columns")
    try:
        return any(e.is_file(follow_symlinks=False) and e.stat().st_size for e in os.scandir(folder))
    except OSError:
        return False


def _table_segments(path: str, m: Manifest, report: Report) -> dict[str, list[tuple[int, int]]] | None:
    full = os.path.join(path, TABLE)
    try:
        with os.fdopen(open_fd(full), "rb") as f:
            data = f.read(m.table["nbytes"] + 1)  # type: ignore[index]
    except FileNotFoundError:
        report.add(TABLE, "is missing: the checksums of the column files are gone (rebuild with "
                          "force_cache=True, keep_existing=False)")
        return None
    except CorruptCacheError as exc:
        report.add(TABLE, str(exc))
        return None
    if len(data) != m.table["nbytes"] or xxhash.xxh3_64_hexdigest(data) != m.table["xxh3"]:  # type: ignore[index]
        report.add(TABLE, "fails its checksum (size or content differs from the manifest)")
        return None
    try:
        table = np.load(io.BytesIO(data), allow_pickle=False)
    except Exception as exc:
        report.add(TABLE, f"is not a valid table ({exc})")
        return None
    if table.dtype != np.dtype("<u8") or table.shape != (m.num_chunks, len(m.files), 2):
        report.add(TABLE, f"has shape {table.shape}, the manifest needs {(m.num_chunks, len(m.files), 2)}")
        return None
    return {f: [(int(e), int(h)) for e, h in table[:, j].tolist()] for j, (f, _) in enumerate(m.files)}


def _check_file(path: str, rel: str, spec: Any, gid: int, size: int, segments: list, m: Manifest,
                report: Report) -> bool:
    full = os.path.join(path, rel)
    name = f"{rel} (column {spec.key!r})" if spec.key is not None else rel
    try:
        fd = open_fd(full)
    except FileNotFoundError:
        report.add(rel, f"is missing (column {spec.key!r})", 0, min(len(segments) * m.chunk_size, m.length))
        return False
    except CorruptCacheError as exc:
        report.add(rel, str(exc))
        return False
    try:
        actual = os.fstat(fd).st_size
        if actual < size or (m.complete and actual != size):
            report.add(rel, f"has {actual} bytes, {size} were committed (column {spec.key!r}): truncated or "
                            "overwritten", 0, m.length)
            return False
        if actual > size:
            chunk_bytes = _chunk_bytes(spec, rel, m)
            if chunk_bytes and actual - size > chunk_bytes:
                # a killed build leaves at most the one chunk it was appending
                report.add(COMMITS, f"has lost commit records: {rel} holds {(actual - size) // chunk_bytes} "
                                    "chunks past the last one it records (the next build computes them "
                                    "again)", min(len(segments) * m.chunk_size, m.length), m.length)
            else:
                report.notes.append(f"{rel} has {actual - size} bytes past its last commit (an "
                                    "interrupted build; the next build removes them)")
        ok = True
        start = 0
        for c, (end, digest) in enumerate(segments):
            if end < start or end > size:
                report.add(rel, f"chunk {c}: recorded end {end} out of order", *_span(m, c))
                return False
            data = os.pread(fd, end - start, start) if end > start else b""
            report.bytes_checked += len(data)
            if xxhash.xxh3_64_intdigest(data) != digest:
                a, b = _span(m, c)
                if spec.offsets and rel.endswith(".index"):
                    b = min(b + 1, m.length)  # the chunk's last offset is where the next row starts
                report.add(rel, f"fails its checksum for chunk {c} (column {spec.key!r})", a, b)
                ok = False
            start = end
        if ok and spec.indexed:
            ok = _check_index(full, fd, spec, size, len(segments), m, report, rel, name)
        return ok
    finally:
        os.close(fd)


def _chunk_bytes(spec: Any, rel: str, m: Manifest) -> int:
    """Bytes one chunk adds to the file ``rel`` when that is known (raw fixed data), else 0."""
    if spec.kind == "fixed" and spec.codec is None and rel.endswith(".data"):
        return m.chunk_size * spec.row_bytes
    return 0


def _check_index(full: str, fd: int, spec: Any, index_size: int, chunks: int, m: Manifest,
                 report: Report, rel: str, name: str) -> bool:
    """Offsets of an index file: inside the data file and non-decreasing."""
    if not rel.endswith(".index"):
        return True
    rows = min(chunks * m.chunk_size, m.length)
    data_rel = rel[: -len(".index")] + ".data"
    try:
        data_size = os.stat(os.path.join(os.path.dirname(full), os.path.basename(data_rel)),
                            follow_symlinks=False).st_size
    except OSError:
        return True  # reported with the data file
    width = spec.index_row_items
    lead = 1 if spec.offsets and rows else 0
    need = 8 * (rows * width + lead)
    if index_size < need:
        report.add(rel, f"holds {index_size} bytes, {need} needed for {rows} rows", 0, rows)
        return False
    idx = np.frombuffer(os.pread(fd, need, 0), "<u8")
    if spec.codec is not None:  # (offset, length, dims): each blob inside the data
        table = idx.reshape(rows, width)
        bad = np.flatnonzero(table[:, 0] + table[:, 1] > data_size)
    elif spec.kind == VARSHAPE:
        table = idx.reshape(rows, width)
        nbytes = np.prod(table[:, 1:].astype(np.float64), axis=1) * spec.np_dtype.itemsize
        bad = np.flatnonzero(table[:, 0] + nbytes > data_size)
    else:
        limit = data_size // spec.row_bytes if spec.kind == RAGGED and spec.row_bytes else (
            2**63 if spec.kind == RAGGED else data_size)
        bad = np.flatnonzero((idx[1:] < idx[:-1]) | (idx[1:] > limit))
    if bad.size:
        r = int(bad[0])
        report.add(rel, f"row {r}: offsets outside the data or out of order ({name})",
                   r - r % m.chunk_size, min(r - r % m.chunk_size + m.chunk_size, m.length))
        return False
    return True


def _span(m: Manifest, chunk: int) -> tuple[int, int]:
    task = m.chunk(chunk)
    return task.start, task.stop


def _check_labels(path: str, m: Manifest, report: Report) -> None:
    from .label_files import load_label_file

    for key in m.in_memory_keys:
        entry = m.labels[str(key)]
        if "column" in entry:
            report.labels_checked.append(str(key))  # covered by its column's checksums
            continue
        rel = entry.get("file")
        if not isinstance(rel, str) or not rel.startswith(LABELS_DIR + "/") or ".." in rel:
            report.add(MANIFEST, f"label {key!r} names a bad file {rel!r}")
            continue
        try:
            fd = open_fd(os.path.join(path, rel))
        except FileNotFoundError:
            report.add(rel, f"is missing (label {key!r})")
            continue
        except CorruptCacheError as exc:
            report.add(rel, str(exc))
            continue
        try:
            load_label_file(path, key, entry, fd, m.length, verify=True)
            report.labels_checked.append(str(key))
        except (CorruptCacheError, EdcacheError) as exc:
            report.add(rel, f"{exc}")
        finally:
            os.close(fd)


def _check_examples(path: str, m: Manifest, report: Report, allow_pickle: bool) -> None:
    """``deep``: decode every example (the checksums already cover every byte)."""
    from .reader import ColumnarReader

    try:
        reader = ColumnarReader(path, allow_pickle=allow_pickle)
    except EdcacheError as exc:
        report.add(MANIFEST, str(exc))
        return
    try:
        for i in range(m.length):
            try:
                reader.read(i)
            except EdcacheError as exc:
                task = m.chunk(i // m.chunk_size)
                report.add("columns/", f"example {i} does not decode: {exc}", task.start, task.stop)
                return
    finally:
        reader.close()


def _note_strays(path: str, schema: Schema, m: Manifest, report: Report) -> None:
    keep = owned_files(schema, m.labels)
    for folder in ("", "columns", LABELS_DIR):
        full = os.path.join(path, folder) if folder else path
        if not os.path.isdir(full):
            continue
        for name in sorted(os.listdir(full)):
            rel = f"{folder}/{name}" if folder else name
            if rel in keep or (not folder and name in ("columns", LABELS_DIR)):
                continue
            report.notes.append(f"{rel} is not part of the cache (left by an interrupted build; the "
                                "next build deletes it)")
