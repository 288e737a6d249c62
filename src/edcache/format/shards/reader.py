"""Reading a cache directory: lazily mapped shards, memory-mapped label columns."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from ...errors import CacheNotFoundError, CorruptCacheError, IncompleteCacheError
from ..base import CacheReader, Labels, check_pickle_allowed
from .labels import load_label
from .manifest import PACKED, Manifest, load_shard_table, read_log, read_manifest, shard_path
from .shard import ShardFile


class ShardCacheReader(CacheReader):
    """Read-only view of a cache directory in the default format.

    Opening reads only ``manifest.json``. Each shard is memory-mapped the first time
    one of its examples is read (and validated then; with ``verify=True`` also
    checksummed). Arrays come back as read-only zero-copy views of the map: copy them
    (``np.array(x)``) before modifying in place. Memory maps stay valid across
    ``fork``; pickling the reader drops them and the new process maps again.

    Parameters
    ----------
    path : str
        The cache directory (``<root>/cached/<name>``).
    verify : bool
        Check each shard's and label column's checksum on first use in a process.
    allow_pickle : bool
        Required to open a cache built with ``allow_pickle=True``.
    """

    def __init__(self, path: str, *, verify: bool = False, allow_pickle: bool = False) -> None:
        self.path = path
        self.verify = verify
        self.allow_pickle = allow_pickle
        try:
            self.manifest: Manifest = read_manifest(path)
        except FileNotFoundError as exc:
            raise CacheNotFoundError(f"no edcache cache at {path} (no manifest.json)") from exc
        check_pickle_allowed(path, self.manifest.allow_pickle, allow_pickle)
        self._reset()

    #: Most shards kept open (memory-mapped) at once per process; see :meth:`shard`.
    max_open_shards = 32768

    def _reset(self, packed: dict[str, Any] | None = None) -> None:
        # A packed cache is one shard covering every example: "chunk" 0. ``packed`` is
        # the packing record of a build that is completing (see _switch_if_packed).
        if packed is None and self.manifest.complete:
            packed = self.manifest.packed
        self._packed_info = packed
        self._packed = packed is not None
        self._chunk_size = max(self.manifest.length, 1) if self._packed else self.manifest.chunk_size
        self._length = self.manifest.length
        self._shards: dict[int, ShardFile] = {}
        self._verified: set[int] = set()
        self._schemas: dict[tuple, tuple] = {}
        self._table: np.ndarray | None = None
        self._commits: dict[int, tuple[int, str]] = {}
        self._labels: Labels | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path, "verify": self.verify, "allow_pickle": self.allow_pickle,
                "manifest": self.manifest}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._reset()

    def __len__(self) -> int:
        return self.manifest.length

    @property
    def is_packed(self) -> bool:
        """Whether the examples are read from one packed file (see ``docs/format.md``)."""
        return self._packed

    @property
    def complete(self) -> bool:
        if not self.manifest.complete:
            self._refresh()  # the build may have completed since
        return self.manifest.complete

    # -- shards ------------------------------------------------------------------------
    def _shard_info(self, chunk: int) -> tuple[int, str] | None:
        if self._packed:
            return self._packed_info["nbytes"], self._packed_info["xxh3"]  # type: ignore[index]
        if self.manifest.complete:
            if self._table is None:
                try:
                    self._table = load_shard_table(self.path, self.manifest, self.verify)
                except CorruptCacheError:
                    # a build started over the complete cache (force_cache=True) removes
                    # shards.idx and commits through commits.log again: follow it
                    self._refresh()
                    if self.manifest.complete:
                        raise
                    return self._shard_info(chunk)
            nbytes, digest = self._table[chunk]
            return int(nbytes), f"{int(digest):016x}"
        if chunk not in self._commits:  # the build may have committed it since
            # The log first, then the manifest: a build that completes writes the complete
            # manifest before deleting the log, so one of the two has the chunk.
            commits, packed = read_log(self.path, self.manifest.num_chunks)
            self._refresh()
            if self.manifest.complete or self._switch_if_packed(packed):
                return self._shard_info(chunk)
            self._commits = commits
        return self._commits.get(chunk)

    def _refresh(self) -> None:
        manifest = read_manifest(self.path)
        if manifest.length == self.manifest.length and manifest.chunk_size == self.manifest.chunk_size:
            self.manifest = manifest
            if manifest.complete and manifest.packed is not None and not self._packed:
                # the build completed and packed its chunks: switch to the packed file
                # (arrays already read stay valid: their maps live as long as they do)
                self._reset()

    def _switch_if_packed(self, packed: dict | None = None) -> bool:
        """Follow a build that has packed its chunks but not yet written the complete
        manifest (its chunk shards may be deleted already): read ``packed.shard`` as
        its packing record in ``commits.log`` describes it. Returns whether switched."""
        if self._packed:
            return True
        if packed is None:
            self._refresh()
            if self._packed:
                return True
            packed = read_log(self.path, self.manifest.num_chunks)[1]
        if packed is None:
            return False
        try:
            size = os.path.getsize(os.path.join(self.path, PACKED))
        except OSError:
            return False
        if size != packed["p"]["nbytes"]:
            return False
        self._reset(packed["p"])
        return True

    def _locate(self, index: int) -> tuple[ShardFile, int]:
        """The shard holding example ``index`` and its row there (opening it if needed)."""
        while True:
            cs = self._chunk_size
            chunk, row = divmod(index, cs)
            sf = self._shards.get(chunk) or self.shard(chunk)
            if self._chunk_size == cs:
                return sf, row

    def shard(self, chunk: int) -> ShardFile:
        """The mapped shard of chunk ``chunk`` (opened on first use)."""
        sf = self._shards.get(chunk)
        if sf is not None:
            return sf
        cs = self._chunk_size
        info = self._shard_info(chunk)
        task = self.manifest.chunk(chunk)
        if info is None:
            raise IncompleteCacheError(
                f"examples {task.start}..{task.stop - 1} (chunk {chunk}) of the cache at "
                f"{self.path} are not cached yet: the build is incomplete"
            )
        if self._chunk_size != cs:  # switched to the packed layout meanwhile
            return self.shard(0)
        nbytes, digest = info
        check = self.verify and chunk not in self._verified
        if self._packed:
            path, start, count = os.path.join(self.path, PACKED), 0, self.manifest.length
        else:
            path, start, count = shard_path(self.path, chunk), task.start, task.size
        try:
            sf = ShardFile(path, nbytes, start, count, digest if check else None, self.allow_pickle)
        except CorruptCacheError:
            # a chunk shard deleted because the build packed it meanwhile?
            if not self._packed and not os.path.exists(path) and self._switch_if_packed():
                return self.shard(0)
            raise
        if check:
            self._verified.add(chunk)
        if sf.schema is not None:  # one shared tuple per distinct schema: compared by identity
            sf.schema = self._schemas.setdefault(sf.schema, sf.schema)
        if len(self._shards) >= self.max_open_shards:
            # Each open shard is one memory map; Linux refuses more than vm.max_map_count
            # (65530 by default) per process. Forget the oldest: its map is released once
            # no array read from it is alive any more.
            del self._shards[next(iter(self._shards))]
        self._shards[chunk] = sf
        return sf

    def _out_of_range(self, index: int) -> IndexError:
        return IndexError(f"index {index} is out of range for a cache of {self.manifest.length} examples")

    def _check_range(self, idx: np.ndarray) -> None:
        if len(idx):
            bad = (idx < 0) | (idx >= self.manifest.length)
            if bad.any():
                raise self._out_of_range(int(idx[np.argmax(bad)]))

    def read(self, index: int) -> dict:
        if not 0 <= index < self._length:
            raise self._out_of_range(index)
        chunk, row = divmod(index, self._chunk_size)
        sf = self._shards.get(chunk)
        if sf is None:
            sf, row = self._locate(index)
        return sf.read(row)

    def read_indexed(self, index: int) -> dict:
        # read() with the shard's read_indexed; not sharing a helper saves a call per example
        if not 0 <= index < self._length:
            raise self._out_of_range(index)
        chunk, row = divmod(index, self._chunk_size)
        sf = self._shards.get(chunk)
        if sf is None:
            sf, row = self._locate(index)
        return sf.read_indexed(row, index)

    def read_many(self, indices: Sequence[int]) -> list[dict]:
        """Read several examples, visiting each shard once, in shard order."""
        idx = np.asarray(indices, dtype=np.int64)
        self._check_range(idx)
        out: list[Any] = [None] * len(idx)
        order = np.argsort(idx, kind="stable")
        values = idx.tolist()
        for pos in order.tolist():
            sf, row = self._locate(values[pos])
            out[pos] = sf.read(row)
        return out

    def read_batch(self, indices: np.ndarray) -> dict[Any, Any] | None:
        """Collate examples ``indices`` column by column, or None if their shards differ
        in schema or are not fully columnar.

        Array and number fields come back as arrays ``(len(indices), ...)`` gathered with
        one fancy index per shard; str, bytes and None fields as lists.
        """
        n = len(indices)
        if n == 0:
            return None
        indices = np.asarray(indices, dtype=np.int64)
        self._check_range(indices)
        if self._packed:
            sf = self._shards.get(0) or self.shard(0)
            if sf.schema is None:
                return None
            return {key: self._gather(sf, key, indices) for key, *_ in sf.schema}
        cs = self._chunk_size
        order = np.argsort(indices, kind="stable")
        chunks, rows = np.divmod(indices[order], cs)
        cut = (np.flatnonzero(chunks[1:] != chunks[:-1]) + 1).tolist()
        starts, ends = [0, *cut], [*cut, n]
        shards = [self._shards.get(c) or self.shard(c) for c in chunks[starts].tolist()]
        if self._chunk_size != cs:  # switched to the packed layout meanwhile
            return self.read_batch(indices)
        schema = shards[0].schema
        if schema is None or any(sf.schema is not schema for sf in shards):
            return None
        runs = _Runs(order, rows, starts, ends)
        batch: dict[Any, Any] = {}
        for key, _kind, _dtype, shape in schema:
            columns = [sf.column(key) for sf in shards]
            if columns[0] is not None:
                batch[key] = runs.gather_arrays(columns, (n, *shape))  # type: ignore[arg-type]
            else:
                batch[key] = runs.gather_values(shards, key, n)
        return batch

    @staticmethod
    def _gather(sf: ShardFile, key: Any, indices: np.ndarray) -> Any:
        col = sf.column(key)
        if col is not None:
            return col.take(indices, axis=0)  # one gather: a new (writable) array
        strings = sf.gather_strings(key, indices)
        if strings is not None:
            return strings
        get = sf.getter(key)
        return [get(r) for r in indices.tolist()]

    # -- labels ------------------------------------------------------------------------
    @property
    def labels(self) -> Labels:
        if self._labels is None:
            if not self.manifest.complete:
                self._refresh()
            if not self.manifest.complete:
                raise IncompleteCacheError(
                    f"labels of the cache at {self.path} are written when the build completes; "
                    "it is still incomplete"
                )
            self._labels = {
                key: load_label(self.path, key, self.manifest.labels[key], self.manifest.length, self.verify)
                for key in self.manifest.in_memory_keys
            }
        return self._labels

    def close(self) -> None:
        for sf in self._shards.values():
            sf.close()
        self._reset()


def is_shard_cache(path: str) -> bool:
    """Whether ``path`` is a directory holding an edcache manifest."""
    return os.path.isfile(os.path.join(path, "manifest.json"))


class _Runs:
    """The rows of a batch grouped by shard: run ``k`` is positions ``order[starts[k]:ends[k]]``
    of the batch, rows ``rows[starts[k]:ends[k]]`` of the k-th shard."""

    def __init__(self, order: np.ndarray, rows: np.ndarray, starts: list[int], ends: list[int]) -> None:
        self.order, self.rows, self.starts, self.ends = order, rows, starts, ends
        self.positions, self.rows_list = order.tolist(), rows.tolist()

    def gather_arrays(self, columns: list[np.ndarray], shape: tuple[int, ...]) -> np.ndarray:
        """One fixed-shape field: a new array, one fancy index per shard."""
        out = np.empty(shape, dtype=columns[0].dtype)
        for col, a, b in zip(columns, self.starts, self.ends, strict=False):
            if b - a == 1:
                out[self.positions[a]] = col[self.rows_list[a]]
            else:
                out[self.order[a:b]] = col[self.rows[a:b]]
        return out

    def gather_values(self, shards: list[ShardFile], key: Any, n: int) -> list[Any]:
        """One str, bytes or None field: a list."""
        values: list[Any] = [None] * n
        for sf, a, b in zip(shards, self.starts, self.ends, strict=False):
            got = sf.gather_strings(key, self.rows[a:b])
            if got is None:  # a None column
                get = sf.getter(key)
                got = [get(r) for r in self.rows_list[a:b]]
            for p, v in zip(self.positions[a:b], got, strict=False):
                values[p] = v
        return values
