"""Writing a format-v2 cache: chunks are appended to the column files in index order.

Workers turn chunks into column parts (:mod:`.chunk`); the coordinator, the only
writer, appends each chunk to the column files once its predecessors are in (results
that arrive early wait in a bounded reorder buffer, spilled to a temporary file past
:attr:`ColumnarSink.max_pending_bytes`), then appends its commit record to
``commits.log``. Each byte is written once, in place: no second copy, no packing.
"""

from __future__ import annotations

import contextlib
import io
import os
import pickle
import time
from collections.abc import Iterable
from dataclasses import replace
from typing import Any

import numpy as np
import xxhash

from ...errors import CorruptCacheError, LabelError
from ..base import ChunkEncoder, ChunkResult, ChunkSink, ChunkTask
from ..fsutil import atomic_write, fsync_dir, sync_filesystem, temp_name
from ..shards.codec import Encoder, raw_bytes
from .chunk import ChunkColumns, build_chunk, column_parts
from .codecs import same_rows
from .committed import open_views, present_rows
from .files import open_fd, remove_strays, unlink_if_present
from .label_files import repair_labels, write_labels
from .log import CommitLog, LogState, chunk_record, schema_record
from .manifest import COMMITS, TABLE, Manifest, write_manifest
from .schema import ABSENT, FIXED, ColumnSpec, Layout, merge


class ColumnarEncoder(ChunkEncoder):
    """Runs in the workers: one chunk of examples -> :class:`.chunk.ChunkColumns`."""

    def __init__(self, in_memory_keys: list[Any], allow_pickle: bool,
                 codecs: list[list[Any]] | None = None) -> None:
        self.in_memory_keys = list(in_memory_keys)
        self.allow_pickle = allow_pickle
        self.codecs = codecs

    def encode(self, task: ChunkTask, examples: Iterable[Any]) -> ChunkResult:
        columns = build_chunk(task.start, task.size, self._checked(task, examples), self.allow_pickle,
                              self.codecs)
        return ChunkResult(task.chunk_id, task.start, task.stop, "", columns.nbytes, payload=columns)

    def _checked(self, task: ChunkTask, examples: Iterable[Any]) -> Iterable[Any]:
        """The examples, checked for their label keys; a chunk whose label values mix
        kinds that cannot share a column (say int and str) is refused before it is
        committed (mixes across chunks are found when the labels are written)."""
        from ..shards.labels import check_label_kinds

        keys = self.in_memory_keys
        values: list[list[Any]] = [[] for _ in keys]
        for k, example in enumerate(examples):
            for n, key in enumerate(keys):
                try:
                    values[n].append(example[key])
                except (KeyError, TypeError, IndexError):
                    seen = list(example) if isinstance(example, dict) else type(example).__name__
                    raise LabelError(
                        f"example {task.start + k} has no in_memory_key {key!r} (it has {seen})"
                    ) from None
            yield example
        for key, chunk_values in zip(keys, values, strict=False):
            check_label_kinds(key, chunk_values, task.start)


class ColumnarSink(ChunkSink):
    """The coordinator's side of a format-v2 build (create with :func:`prepare_cache_dir`).

    Commits are made durable in groups: column data, then the log, at most every
    ``sync_interval`` seconds and always before completion; after a power loss the
    last second of chunks is computed again (their data fails the size check).
    """

    #: results that arrived before their predecessors kept in memory, at most
    max_pending_bytes = 256 << 20

    def __init__(self, cache_dir: str, manifest: Manifest, state: LogState | None,
                 *, complete: bool = False, sync_interval: float = 1.0) -> None:
        self.cache_dir = cache_dir
        self.manifest = manifest
        self.chunk_size = manifest.chunk_size
        self.progress = False
        self.sync_interval = sync_interval
        self._complete = complete
        self._log: CommitLog | None = None
        self._fds: dict[str, int] = {}
        self._pending: dict[int, ChunkColumns] = {}
        self._spilled: dict[int, str] = {}
        self._pending_bytes = 0
        self._encoder = Encoder(allow_pickle=manifest.allow_pickle)
        self._dirty = False
        self._last_sync = time.monotonic()
        self._obsolete: list[str] = []
        if complete:
            self.committed_chunks = manifest.num_chunks
            self.schema = manifest.schema
            self._key_col = {c.key: i for i, c in enumerate(self.schema.columns) if c.key is not None}
            self._ends = dict(manifest.files)
            return
        assert state is not None
        self.schema = state.schema
        self.segments = {f: list(s) for f, s in state.segments.items()}
        self.committed_chunks = state.committed
        self._log = CommitLog(cache_dir)
        self._key_col = {c.key: i for i, c in enumerate(self.schema.columns) if c.key is not None}
        self._whole = next((lay.columns[0] for lay in self.schema.layouts if lay.container == "whole"), None)
        self._layout_ids = {lay: i for i, lay in enumerate(self.schema.layouts)}
        self._tails: dict[int, int] = {}
        for i, spec in enumerate(self.schema.columns):
            for f in spec.files():
                self._fds[f] = open_fd(os.path.join(cache_dir, f), os.O_RDWR)
            if spec.offsets:
                idx = spec.files()[1]
                end = self._end(idx)
                self._tails[i] = int.from_bytes(os.pread(self._fds[idx], 8, end - 8), "little") if end else 0

    # -- ChunkSink ---------------------------------------------------------------------
    def committed(self) -> set[int]:
        return set(range(self.committed_chunks))

    def encoder(self, *, staged: bool) -> ColumnarEncoder:
        return ColumnarEncoder(self.manifest.in_memory_keys, self.manifest.allow_pickle, self.manifest.codecs)

    def commit(self, result: ChunkResult) -> bool:
        chunk = result.chunk_id
        if chunk < self.committed_chunks or chunk in self._pending or chunk in self._spilled:
            return False
        task = self.manifest.chunk(chunk)
        columns = result.payload
        if not isinstance(columns, ChunkColumns) or (columns.start, columns.count) != (task.start, task.size):
            raise CorruptCacheError(f"result for chunk {chunk} does not hold examples {task.start}..{task.stop - 1}")
        if chunk != self.committed_chunks:
            self._hold(chunk, columns)
            return True
        self._append(columns)
        while self.committed_chunks in self._pending or self.committed_chunks in self._spilled:
            self._append(self._take(self.committed_chunks))
        if time.monotonic() - self._last_sync >= self.sync_interval:
            self.sync()
        return True

    # -- the reorder buffer --------------------------------------------------------------
    def _hold(self, chunk: int, columns: ChunkColumns) -> None:
        if self._pending_bytes + columns.nbytes <= self.max_pending_bytes:
            self._pending[chunk] = columns
            self._pending_bytes += columns.nbytes
            return
        path = temp_name(os.path.join(self.cache_dir, f"pending-{chunk}"))
        with open(path, "wb") as f:
            pickle.dump(columns, f, protocol=pickle.HIGHEST_PROTOCOL)
        self._spilled[chunk] = path

    def _take(self, chunk: int) -> ChunkColumns:
        if chunk in self._pending:
            columns = self._pending.pop(chunk)
            self._pending_bytes -= columns.nbytes
            return columns
        path = self._spilled.pop(chunk)
        with open(path, "rb") as f:
            columns = pickle.load(f)  # written by this process a moment ago
        os.unlink(path)
        return columns

    # -- appending one chunk -------------------------------------------------------------
    def _end(self, f: str) -> int:
        segs = self.segments.get(f)
        return segs[-1][0] if segs else 0

    def _append(self, cc: ChunkColumns) -> None:
        """Append chunk ``cc`` (the next one): schema changes first, then its rows."""
        created: dict[str, list[tuple[int, int]]] = {}
        rows_layout, new_layouts = self._map_layouts(cc, created)
        promoted = self._promote_kinds(cc, created)
        if new_layouts or promoted:
            self._log.append(schema_record(self.schema, created))  # type: ignore[union-attr]
            for path in self._obsolete:
                unlink_if_present(path)
            self._obsolete = []
        self._append_rows(cc, rows_layout)

    def _map_layouts(self, cc: ChunkColumns, created: dict[str, list[tuple[int, int]]]) -> tuple[np.ndarray, bool]:
        """Each row's cache layout number, adding layouts (and the layout column) the
        cache lacks; and whether the schema changed."""
        changed = False
        local_to_global = []
        for container, keys in cc.layouts:
            if container == "whole":
                if self._whole is None:
                    self._whole = self._new_column(None)
                lay = Layout("whole", (self._whole,))
            else:
                lay = Layout(container, tuple(self._key_col[k] if k in self._key_col
                                              else self._add_key(k) for k in keys))
            lid = self._layout_ids.get(lay)
            if lid is None:
                lid = self._layout_ids[lay] = len(self.schema.layouts)
                self.schema.layouts.append(lay)
                changed = True
            local_to_global.append(lid)
        mapping = np.asarray(local_to_global, dtype="<u4")
        rows_layout = mapping[cc.row_layout] if cc.row_layout is not None else np.full(cc.count, mapping[0], "<u4")
        if self.schema.layout_column is None and rows_layout.any():
            self.schema.layout_column = self._new_column(None)
            self._promote(self.schema.layout_column, ColumnSpec(None, FIXED, "<u4", (), py="scalar"), created)
            changed = True
        return rows_layout, changed

    def _promote_kinds(self, cc: ChunkColumns, created: dict[str, list[tuple[int, int]]]) -> bool:
        """Promote the cache columns that cannot hold this chunk's values; whether any was."""
        changed = False
        for col in cc.columns:
            gid = self._whole if col.spec.key is None else self._key_col[col.spec.key]
            assert gid is not None  # _map_layouts made the whole-example column
            cache = self.schema.columns[gid]
            new = merge(cache, col.spec)
            if new is not cache:
                self._promote(gid, new, created)
                changed = True
        return changed

    def _append_rows(self, cc: ChunkColumns, rows_layout: np.ndarray) -> None:
        """Append every column's rows of the chunk, then its commit record."""
        by_key = {col.spec.key: col for col in cc.columns}
        ends: list[int] = []
        hashes: list[int] = []
        for gid, spec in enumerate(self.schema.columns):
            if gid == self.schema.layout_column:
                parts = [rows_layout]
            else:
                key = None if gid == self._whole else spec.key
                col = by_key.get(key) if (key is not None or gid == self._whole) else None
                parts = self._parts_for(spec, col, cc.count, _rows_with(cc, key) if col is not None else [])
            column_ends, column_hashes = self._write(gid, spec, parts)
            ends += column_ends
            hashes += column_hashes
        self._log.append(chunk_record(self.committed_chunks, ends, hashes))  # type: ignore[union-attr]
        for f, e, h in zip(self.schema.files(), ends, hashes, strict=True):
            self.segments[f].append((e, h))
        self.committed_chunks += 1
        self._dirty = True

    def _add_key(self, key: Any) -> int:
        gid = self._new_column(key)
        self._key_col[key] = gid
        return gid

    def _new_column(self, key: Any) -> int:
        gid = len(self.schema.columns)
        self.schema.columns.append(ColumnSpec(key, ABSENT, stem=f"{gid:04d}"))
        return gid

    def _parts_for(self, spec: ColumnSpec, col: Any, count: int, rows: list[int]) -> list[Any]:
        """This chunk's parts of a column in the cache's kind ``spec`` (``rows``: the
        rows of the chunk that hold the field)."""
        if col is None or col.spec.kind == ABSENT:  # no example of the chunk has the field
            return column_parts(spec, [], [], count, self._encoder)
        if col.spec.same_kind(spec) or same_rows(col.spec, spec):
            return col.parts
        values = _present_values(col.spec, col.parts, count, rows, self.manifest.allow_pickle)
        return column_parts(spec, rows, values, count, self._encoder)

    def _write(self, gid: int, spec: ColumnSpec, parts: list[Any]) -> tuple[list[int], list[int]]:
        files = spec.files()
        if not files:
            return [], []
        data_file = files[0]
        data = parts[0]
        bufs: list[list[Any]] = [[raw_bytes(np.ascontiguousarray(data)) if isinstance(data, np.ndarray) else data]]
        if len(files) > 1:
            index = parts[1]
            lead = [bytes(8)] if spec.offsets and self._end(files[1]) == 0 else []
            if spec.offsets:
                base = self._tails.get(gid, 0)
                shifted = (index + np.uint64(base)).astype("<u8") if base else index.astype("<u8", copy=False)
                if len(shifted):
                    self._tails[gid] = int(shifted[-1])
            else:  # varshape and coded columns: byte offsets in column 0
                shifted = index.astype("<u8", copy=True)
                shifted[:, 0] += np.uint64(self._end(data_file))
            bufs.append([*lead, raw_bytes(np.ascontiguousarray(shifted))])
        ends, hashes = [], []
        for f, pieces in zip(files, bufs, strict=False):
            fd, pos = self._fds[f], self._end(f)
            h = xxhash.xxh3_64()
            for piece in pieces:
                view = memoryview(piece).cast("B") if not isinstance(piece, bytes) else piece
                written = 0
                while written < len(view):
                    written += os.pwrite(fd, view[written:], pos + written)
                pos += len(view)
                h.update(view)
            ends.append(pos)
            hashes.append(h.intdigest())
        return ends, hashes

    # -- schema changes ------------------------------------------------------------------
    def _promote(self, gid: int, new: ColumnSpec, created: dict[str, list[tuple[int, int]]]) -> None:
        """Give column ``gid`` the kind ``new``: new files holding its rows so far
        (zeros and empty rows for a column new in this chunk, else its rows converted)."""
        old = self.schema.columns[gid]
        if same_rows(old, new):  # coded rows do not depend on the array kind: keep the files
            self.schema.columns[gid] = replace(new, stem=old.stem)
            return
        new = replace(new, stem=_next_stem(old.stem) if old.kind != ABSENT and old.files() else old.stem)
        n_chunks, cs = self.committed_chunks, self.chunk_size
        views = None
        if old.kind != ABSENT and n_chunks:
            views = open_views(self.cache_dir, self.schema, {f: self._end(f) for f in self.schema.files()},
                                n_chunks * cs,
                                self.manifest.allow_pickle, only=[gid, self.schema.layout_column])
        for f in new.files():
            path = os.path.join(self.cache_dir, f)
            fd = open_fd(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC)
            self._fds[f] = fd
            created[f] = []
            self.segments[f] = created[f]
        self.schema.columns[gid] = new
        self._tails.pop(gid, None)
        for chunk in range(n_chunks):
            rows = range(chunk * cs, (chunk + 1) * cs)
            if views is None:
                parts = column_parts(new, [], [], cs, self._encoder)
            else:
                present = present_rows(self.schema, gid, views, rows)
                get = views[gid].get
                parts = column_parts(new, [r - rows.start for r in present], [get(r) for r in present],
                                     cs, self._encoder)
            for f, (e, h) in zip(new.files(), zip(*self._write(gid, new, parts), strict=False), strict=False):
                created[f].append((e, h))
                # (segments[f] is created[f]: _end sees what was just written)
        for f in old.files():
            if f not in new.files():
                os.close(self._fds.pop(f))
                self.segments.pop(f, None)
                # deleted once the schema record naming the new files is in the log
                self._obsolete.append(os.path.join(self.cache_dir, f))

    # -- durability and completion -------------------------------------------------------
    def sync(self) -> None:
        """Make every commit so far durable: column data first, then the log."""
        if self._dirty and not sync_filesystem(self.cache_dir):
            for fd in self._fds.values():
                os.fsync(fd)
        if self._log is not None and not self._log.closed:
            self._log.sync()
        self._dirty = False
        self._last_sync = time.monotonic()

    def finalize(self) -> None:
        """Write the labels, the checksum table and the complete manifest. (Over a
        complete cache: rewrite label files that are missing or damaged.)"""
        if self._complete:
            self._repair_labels()
            return
        m = self.manifest
        if self.committed_chunks != m.num_chunks:
            raise CorruptCacheError(
                f"cannot finalize {self.cache_dir}: {m.num_chunks - self.committed_chunks} chunks missing"
            )
        self.sync()
        files = self.schema.files()
        m.labels = self._write_labels()
        table = np.zeros((m.num_chunks, len(files), 2), dtype="<u8")
        for j, f in enumerate(files):
            if m.num_chunks:
                table[:, j] = np.asarray(self.segments[f], dtype=np.uint64).reshape(-1, 2)
        buf = io.BytesIO()
        np.save(buf, table, allow_pickle=False)
        atomic_write(os.path.join(self.cache_dir, TABLE), buf.getvalue())
        m.schema = self.schema
        m.files = [(f, self._end(f)) for f in files]
        m.table = {"nbytes": len(buf.getvalue()), "xxh3": xxhash.xxh3_64_hexdigest(buf.getvalue())}
        m.complete = True
        write_manifest(self.cache_dir, m)
        unlink_if_present(os.path.join(self.cache_dir, COMMITS))  # right after: a stale log is ignored
        self.close()
        remove_strays(self.cache_dir, m.schema, m.labels)
        fsync_dir(self.cache_dir)
        self._complete = True

    def _repair_labels(self) -> None:
        repair_labels(self.cache_dir, self.manifest, self.schema, self._key_col, self._ends, self._encoder)

    def _write_labels(self) -> dict[str, dict[str, Any]]:
        ends = {f: self._end(f) for f in self.schema.files()}
        return write_labels(self.cache_dir, self.manifest, self.schema, self._key_col, ends, self._encoder)

    def close(self) -> None:
        if self._log is not None and not self._log.closed:
            # closing after a failure: what was committed stays valid
            with contextlib.suppress(OSError):
                self.sync()
            self._log.close()
        for fd in self._fds.values():
            os.close(fd)
        self._fds = {}
        for path in self._spilled.values():
            unlink_if_present(path)
        self._spilled = {}


def _rows_with(cc: ChunkColumns, key: Any) -> list[int]:
    """Rows of a chunk whose layout has field ``key`` (None: the whole-example column)."""
    has = [(container == "whole") if key is None else (container != "whole" and key in keys)
           for container, keys in cc.layouts]
    if cc.row_layout is None:
        return list(range(cc.count)) if has[0] else []
    return np.flatnonzero(np.asarray(has, dtype=bool)[cc.row_layout]).tolist()


def _next_stem(stem: str) -> str:
    base, _, gen = stem.partition(".")
    return f"{base}.{int(gen or 0) + 1}"


def _present_values(spec: ColumnSpec, parts: list[Any], count: int, rows: list[int],
                    allow_pickle: bool) -> list[Any]:
    """The values at ``rows`` of one chunk column (to re-encode them in another kind)."""
    from .columns import ColumnView

    data = parts[0] if parts else b""
    data = raw_bytes(np.ascontiguousarray(data)) if isinstance(data, np.ndarray) else data
    index = None
    if spec.indexed:
        idx = parts[1]
        if spec.offsets:
            idx = np.concatenate([np.zeros(1, "<u8"), idx.astype("<u8")])
        index = raw_bytes(np.ascontiguousarray(idx))
    get = ColumnView(spec, data, index, count, allow_pickle=allow_pickle, where="chunk").get
    return [get(r) for r in rows]
