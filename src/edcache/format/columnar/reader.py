"""Reading a format-v2 cache: one memory map per column file, a row lookup per field.

Opening reads ``manifest.json`` and opens (does not map) the column files, so a
reader keeps reading the build it opened even if another process starts the cache
over (the old files are unlinked, never rewritten in place). The maps are made on
the first read. A reader of an incomplete cache reads ``commits.log`` and follows the
build when asked for an example beyond what was committed when it last looked.
"""

from __future__ import annotations

import contextlib
import io
import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import xxhash

from ...errors import (
    CacheNotFoundError,
    CorruptCacheError,
    IncompleteCacheError,
    UnsafePickleError,
)
from ..base import CacheReader, Labels
from .columns import ColumnView
from .files import open_fd
from .label_files import load_label_file
from .log import LogState, read_log
from .manifest import MANIFEST, TABLE, Manifest, Schema, read_manifest
from .rows import map_columns, row_builder
from .schema import Layout

INDEX_KEY = "index_"


class CacheRebuiltError(IncompleteCacheError):
    """The cache was started over by another process after this reader opened it."""


class ColumnarReader(CacheReader):
    """Read-only view of a format-v2 cache directory (see ``docs/format.md``).

    Arrays come back as read-only zero-copy views of the memory maps: copy them
    (``np.array(x)``) before changing them in place.

    Parameters
    ----------
    path : str
        The cache directory.
    verify : bool
        Check the checksums of every file's bytes of a chunk the first time one of its
        examples is read in this process (and of a label column when first used).
    allow_pickle : bool
        Required to open a cache built with ``allow_pickle=True``.
    pil : str
        ``"image"``: columns of PIL images come back as images; ``"array"``: as their
        pixel arrays (read-only views, like other arrays).
    """

    def __init__(self, path: str, *, verify: bool = False, allow_pickle: bool = False,
                 pil: str = "image") -> None:
        self.path = path
        self.verify = verify
        self.allow_pickle = allow_pickle
        self.pil = pil
        try:
            self.manifest: Manifest = read_manifest(path)
        except FileNotFoundError as exc:
            raise CacheNotFoundError(f"no edcache cache at {path} (no manifest.json)") from exc
        if self.manifest.allow_pickle and not allow_pickle:
            raise UnsafePickleError(
                f"the cache at {path} was built with allow_pickle=True and may hold pickled "
                "values; pass allow_pickle=True to open it if you trust its files "
                "(unpickling can run arbitrary code)."
            )
        self._fds: dict[str, int] = {}
        self._state: LogState | None = None
        self._reopen = False
        self._retries = 0
        self._load()

    # -- opening ---------------------------------------------------------------------------
    def _load(self) -> None:
        m = self.manifest
        self._length = m.length
        if m.complete:
            schema, ends, rows = m.schema, dict(m.files), m.length
            label_files = [e["file"] for e in m.labels.values() if isinstance(e.get("file"), str)]
        else:
            self._state = read_log(self.path, self._state)
            st = self._state
            schema = st.schema if st else Schema()
            ends = st.ends() if st else {}
            rows = min(st.committed * m.chunk_size, m.length) if st else 0
            label_files = []
        self._schema, self._ends, self._rows = schema, ends, rows
        for folder in ("columns", "labels"):
            if os.path.islink(os.path.join(self.path, folder)):
                raise CorruptCacheError(
                    f"{os.path.join(self.path, folder)} is a symbolic link; edcache never follows links "
                    "out of a cache directory. Remove the link (and rebuild) or delete the cache."
                )
        for f in [*schema.files(), *label_files]:
            if f not in self._fds:
                if f.startswith("/") or ".." in f.split("/"):
                    raise CorruptCacheError(f"{self.path}: manifest names a file outside the cache: {f!r}")
                try:
                    self._fds[f] = open_fd(os.path.join(self.path, f))
                except FileNotFoundError:
                    if not m.complete and self._retries < 5:
                        # a build promoted the column between our replay and this open: its
                        # next schema record names the new file; look again
                        self._retries += 1
                        self._state = None
                        return self._load()
                    raise CorruptCacheError(f"{os.path.join(self.path, f)} is missing") from None
        self._retries = 0
        self._views: dict[int, ColumnView] | None = None
        self._maps: list[Any] = []
        self._labels: Labels | None = None
        self._checked: set[int] = set()
        self._table: np.ndarray | None = None
        for name in ("read", "read_indexed", "row_indexed"):  # back to the class's methods,
            self.__dict__.pop(name, None)  # which set up first

    def _setup(self) -> None:
        """Map the columns and bind the read functions."""
        if getattr(self, "_reopen", False):  # closed: open again (CacheReader.close contract)
            self.__init__(self.path, verify=self.verify, allow_pickle=self.allow_pickle,  # type: ignore[misc]
                          pil=self.pil)
        schema = self._schema
        self._views, self._maps = map_columns(self.path, schema, self._ends, self._rows, self.allow_pickle,
                                              fds=self._fds, pil=self.pil)
        views = self._views
        plain, indexed = [], []
        for lay in schema.layouts:
            plain.append(self._builder(lay, views, False))
            indexed.append(self._builder(lay, views, True))
        self._plain, self._indexed = plain, indexed
        rows = self._rows
        read, read_indexed = self._by_layout(plain, views), self._by_layout(indexed, views)
        if self.verify:
            read, read_indexed = self._checking(read), self._checking(read_indexed)

        def bounded(fn: Callable[[int], Any]) -> Callable[[int], Any]:
            length = self._length

            def read_one(index: int) -> Any:
                if 0 <= index < rows:
                    return fn(index)
                if not 0 <= index < length:
                    raise self._out_of_range(index)
                return self._beyond(index, fn is read_indexed)
            return read_one
        self.read = bounded(read)  # type: ignore[method-assign,assignment]
        self.read_indexed = bounded(read_indexed)  # type: ignore[method-assign,assignment]
        # every row present: callers that checked the index skip the wrapper
        self.row_indexed = read_indexed if rows == self._length else self.read_indexed  # type: ignore[method-assign,assignment]

    def _by_layout(self, builders: list[Callable[[int], Any]], views: dict[int, ColumnView]) -> Callable[[int], Any]:
        """``r -> example`` through the builder of row ``r``'s layout."""
        lc = self._schema.layout_column
        if not builders:
            return self._missing
        if lc is None:
            return builders[0]
        ids = views[lc].array.item  # type: ignore[union-attr]
        nlay, path = len(builders), self.path

        def read(r: int) -> Any:
            lid = ids(r)
            if lid >= nlay:
                raise CorruptCacheError(f"{path}: example {r} names layout {lid}, which does not exist")
            return builders[lid](r)
        return read

    def _builder(self, lay: Layout, views: dict[int, ColumnView], indexed: bool) -> Callable[[int], Any]:
        cols = [self._schema.columns[g] for g in lay.columns]
        getters = [views[g].get for g in lay.columns]
        if lay.container == "whole":
            get = getters[0]
            if not indexed:
                return get

            def whole_indexed(r: int) -> Any:
                example = get(r)
                if type(example) is dict:
                    example[INDEX_KEY] = r
                return example
            return whole_indexed
        keys = [c.key for c in cols]
        index_at = None
        if indexed and lay.container == "dict":
            if INDEX_KEY in keys:
                index_at = keys.index(INDEX_KEY)
            else:
                keys, getters, index_at = [*keys, INDEX_KEY], [*getters, None], len(keys)  # type: ignore[list-item]
        return row_builder(lay.container, keys, getters, index_at)

    def _missing(self, r: int) -> Any:
        raise IncompleteCacheError(f"example {r} of the cache at {self.path} is not cached yet")

    def read(self, index: int) -> Any:
        """Example ``index`` (maps the columns on first use; then bound per instance)."""
        self._setup()
        return self.read(index)

    def read_indexed(self, index: int) -> Any:
        """Example ``index`` with ``index_`` set (dict examples)."""
        self._setup()
        return self.read_indexed(index)

    def row_indexed(self, index: int) -> Any:
        self._setup()
        return self.row_indexed(index)

    def _out_of_range(self, index: int) -> IndexError:
        return IndexError(f"index {index} is out of range for a cache of {self._length} examples")

    # -- following a build ---------------------------------------------------------------
    def _beyond(self, index: int, indexed: bool) -> Any:
        """Example ``index``, not committed when this reader last looked: look again."""
        self._follow()
        if index >= self._rows:
            task = self.manifest.chunk(index // self.manifest.chunk_size)
            raise IncompleteCacheError(
                f"examples {task.start}..{task.stop - 1} (chunk {task.chunk_id}) of the cache at "
                f"{self.path} are not cached yet: the build is incomplete"
            )
        return self.read_indexed(index) if indexed else self.read(index)

    def _follow(self) -> None:
        if self.manifest.complete:
            return
        try:
            manifest = read_manifest(self.path)
        except (FileNotFoundError, CorruptCacheError):
            manifest = None
        state = read_log(self.path, self._state) if manifest is None or not manifest.complete else None
        same_build = self._state is None or (state is not None and state.build == self._state.build)
        if manifest is not None and manifest.complete:
            same_build = self._same_files(manifest.schema.files())
        if manifest is None or not same_build:
            raise CacheRebuiltError(
                f"the cache at {self.path} was started over by another process after this "
                "reader opened it; open it again to read the new build"
            )
        self.manifest = manifest
        self._close_maps()
        if state is not None:
            self._state = state
        self._load()

    def _same_files(self, files: list[str]) -> bool:
        """Whether the files this reader holds are still the cache's (not replaced)."""
        for f, fd in self._fds.items():
            if f not in files:
                continue
            try:
                st = os.stat(os.path.join(self.path, f), follow_symlinks=False)
            except OSError:
                return False
            if (st.st_ino, st.st_dev) != (os.fstat(fd).st_ino, os.fstat(fd).st_dev):
                return False
        return True

    @property
    def complete(self) -> bool:
        if not self.manifest.complete:
            try:
                self._follow()
            except CacheRebuiltError:
                return False
        return self.manifest.complete

    def __len__(self) -> int:
        return self._length

    def columns(self) -> list[dict[str, Any]]:
        """One entry per column: ``key``, ``kind``, ``dtype``, ``shape`` (fixed: of a row;
        ragged: of an item along axis 0; varshape: ``ndim`` unknown dims), ``bytes``, ``wrap``
        (``torch:<dtype>``, ``pil:<mode>`` or None), ``codec`` (None: raw) and ``raw_bytes``
        (what the rows take decoded; ``bytes`` for raw columns)."""
        out = []
        for gid, spec in enumerate(self._schema.columns):
            if gid == self._schema.layout_column:
                kind = "layout"
            elif spec.key is None:
                kind = "whole examples"
            else:
                kind = spec.kind
            if spec.kind == "fixed":
                shape = tuple(spec.shape)
            elif spec.kind == "ragged":
                shape = ("*", *spec.shape)
            elif spec.kind == "varshape":
                shape = ("*",) * spec.ndim
            else:
                shape = None
            stored = sum(self._ends.get(f, 0) for f in spec.files())
            out.append({"key": spec.key, "kind": kind, "dtype": spec.dtype, "shape": shape,
                        "bytes": stored, "wrap": spec.wrap, "codec": spec.codec,
                        "raw_bytes": self._raw_bytes(gid) if spec.codec is not None else stored})
        return out

    def _raw_bytes(self, gid: int) -> int:
        if self._views is None:
            self._setup()
        return self._views[gid].coded.raw_nbytes()  # type: ignore[index]

    # -- checksums -----------------------------------------------------------------------
    def _segments(self, f: str) -> list[tuple[int, int]]:
        if self.manifest.complete:
            if self._table is None:
                self._table = self._load_table()
            j = self._schema.files().index(f)
            return [(int(e), int(h)) for e, h in self._table[:, j].tolist()]
        return self._state.segments[f] if self._state else []

    def _load_table(self) -> np.ndarray:
        m = self.manifest
        path = os.path.join(self.path, TABLE)
        try:
            with os.fdopen(open_fd(path), "rb") as fh:
                data = fh.read(m.table["nbytes"] + 1)  # type: ignore[index]
        except FileNotFoundError:
            raise CorruptCacheError(f"{path} is missing") from None
        if len(data) != m.table["nbytes"] or xxhash.xxh3_64_hexdigest(data) != m.table["xxh3"]:  # type: ignore[index]
            raise CorruptCacheError(f"{path} fails its checksum: the file is damaged")
        table = np.load(io.BytesIO(data), allow_pickle=False)
        if table.dtype != np.dtype("<u8") or table.shape != (m.num_chunks, len(m.files), 2):
            raise CorruptCacheError(f"{path} does not match the manifest")
        return table

    def check_chunk(self, chunk: int) -> None:
        """Compare every file's bytes of ``chunk`` with their checksums (for offsets
        files also the chunk before: its last entry is where this chunk's first row
        starts)."""
        for spec in self._schema.columns:
            for n, f in enumerate(spec.files()):
                previous = n == 1 and spec.offsets and chunk > 0
                for c in (chunk - 1, chunk) if previous else (chunk,):
                    self._check_segment(f, c, chunk)
        self._checked.add(chunk)

    def _check_segment(self, f: str, c: int, chunk: int) -> None:
        segs = self._segments(f)
        if c < len(segs):
            start = segs[c - 1][0] if c else 0
            end, digest = segs[c]
            data = os.pread(self._fds[f], end - start, start) if end > start else b""
            if len(data) != end - start or xxhash.xxh3_64_intdigest(data) != digest:
                task = self.manifest.chunk(chunk)
                raise CorruptCacheError(
                    f"{os.path.join(self.path, f)}: examples {task.start}..{task.stop - 1} "
                    f"(chunk {chunk}) fail their checksum: the file is damaged. Run "
                    f"`edcache verify {self.path}` for a full report."
                )

    def _checking(self, fn: Callable[[int], Any]) -> Callable[[int], Any]:
        cs, checked = self.manifest.chunk_size, self._checked

        def read_checked(r: int) -> Any:
            c = r // cs
            if c not in checked:
                self.check_chunk(c)
            return fn(r)
        return read_checked

    # -- batches -------------------------------------------------------------------------
    def read_many(self, indices: Sequence[int]) -> list[Any]:
        read = self.read
        return [read(int(i)) for i in indices]

    def read_batch(self, indices: np.ndarray) -> dict[Any, Any] | None:
        """Collate ``indices`` column by column when every example has the same dict
        layout (else None): one gather per fixed column; variable arrays stacked when
        their shapes agree, else lists; str, bytes and records as lists."""
        found = self.read_columns(indices)
        return found[1] if found is not None and found[0] == "dict" else None

    def read_columns(self, indices: np.ndarray) -> tuple[str, dict[Any, Any]] | None:
        """``(container, {key: values})`` for ``indices`` when every example has the same
        dict, tuple or list layout (else None): what :meth:`read_batch` returns, with the
        container, and for tuple and list examples keyed by position."""
        n = len(indices)
        if n == 0:
            return None
        idx = np.asarray(indices, dtype=np.int64)
        bad = (idx < 0) | (idx >= self._length)
        if bad.any():
            raise self._out_of_range(int(idx[np.argmax(bad)]))
        if int(idx.max()) >= self._rows:
            self._follow()
            if int(idx.max()) >= self._rows:
                return None  # the per-example path names the missing example
        if self._views is None:
            self._setup()
        schema = self._schema
        if schema.layout_column is not None or not schema.layouts \
                or schema.layouts[0].container not in ("dict", "tuple", "list"):
            return None
        if self.verify:
            for c in np.unique(idx // self.manifest.chunk_size).tolist():
                if c not in self._checked:
                    self.check_chunk(c)
        views = self._views
        layout = schema.layouts[0]
        return layout.container, {schema.columns[g].key: views[g].gather(idx)  # type: ignore[index]
                                  for g in layout.columns}

    # -- labels --------------------------------------------------------------------------
    @property
    def labels(self) -> Labels:
        if self._labels is None:
            self._follow()
            if not self.manifest.complete:
                raise IncompleteCacheError(
                    f"labels of the cache at {self.path} are written when the build completes; "
                    "it is still incomplete"
                )
            if self._views is None:
                self._setup()
            self._labels = {key: self._label(key) for key in self.manifest.in_memory_keys}
        return self._labels

    def _label(self, key: Any) -> np.ndarray | list:
        m = self.manifest
        entry = m.labels[str(key)]
        if "column" in entry:
            gid = entry["column"]
            if type(gid) is not int or not 0 <= gid < len(self._schema.columns) \
                    or self._views[gid].array is None:  # type: ignore[index]
                raise CorruptCacheError(f"{self.path}: label {key!r} names a column that is not an array")
            if self.verify:
                for c in range(m.num_chunks):
                    if c not in self._checked:
                        self.check_chunk(c)
            return self._column_memmap(gid)
        return load_label_file(self.path, key, entry, self._fds.get(entry.get("file", "")), m.length,
                               self.verify)

    def _column_memmap(self, gid: int) -> np.ndarray:
        """A fixed column as a read-only ``np.memmap`` of the file this reader holds."""
        spec, f = self._schema.columns[gid], self._schema.columns[gid].files()[0]
        shape = (self._length, *spec.shape)
        if not self._length or not spec.row_bytes:
            return self._views[gid].array  # type: ignore[index,return-value]
        with os.fdopen(os.dup(self._fds[f]), "rb") as fh:
            return np.memmap(fh, dtype=spec.np_dtype, mode="r", shape=shape)

    # -- lifecycle -----------------------------------------------------------------------
    def _close_maps(self) -> None:
        self._views = None
        for mm in self._maps:
            # arrays handed out still view the map: it closes when they are gone
            with contextlib.suppress(BufferError, AttributeError):
                mm.close()
        self._maps = []

    def close(self) -> None:
        self._close_maps()
        for fd in self._fds.values():
            with contextlib.suppress(OSError):
                os.close(fd)
        self._fds = {}
        self._reopen = True
        for name in ("read", "read_indexed", "row_indexed"):
            self.__dict__.pop(name, None)

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path, "verify": self.verify, "allow_pickle": self.allow_pickle, "pil": self.pil}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["path"], verify=state["verify"], allow_pickle=state["allow_pickle"],  # type: ignore[misc]
                      pil=state.get("pil", "image"))

    def __del__(self) -> None:
        for fd in getattr(self, "_fds", {}).values():
            with contextlib.suppress(OSError):
                os.close(fd)


def is_columnar_cache(path: str) -> bool:
    """Whether ``path`` holds a format-v2 manifest."""
    from .manifest import peek_version

    return os.path.isfile(os.path.join(path, MANIFEST)) and peek_version(path) == 2
