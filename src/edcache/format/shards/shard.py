"""Shard files: one immutable file per chunk of consecutive examples.

Byte layout (all integers little-endian; see ``docs/format.md``)::

    0        8      16                                                  end-16   end-8  end
    | EDCSHARD | 0 (8) | columns | blobs+records ... | labels | index | footer | len u64 | EDCSHEND |

* ``columns``: for every top-level key whose value is a numpy array of the same dtype
  and shape in every example of the chunk, the stacked array ``(count, *shape)``,
  16-byte aligned. Records refer to it by column number; reads are zero-copy rows.
* ``blobs+records``: per example, its other arrays (aligned) followed by its msgpack
  record (see :mod:`.codec`).
* ``labels``: one record holding ``{in_memory_key: [values of the chunk]}``.
* ``index``: ``count`` pairs ``(offset, length)`` of the records, u64.
* ``footer``: msgpack map ``{"v", "start", "count", "columns", "index", "labels"}``.
"""

from __future__ import annotations

import mmap
import os
from typing import Any, Sequence

import msgpack
import numpy as np
import xxhash

from ...errors import CorruptCacheError
from .codec import Decoder, Encoder, _align, _is_storable_dtype, raw_bytes

MAGIC = b"EDCSHARD"
END_MAGIC = b"EDCSHEND"
VERSION = 1
_HEAD = 16
_TAIL = 16


def checksum(data: Any) -> str:
    """The checksum edcache records for a file's bytes (xxh3-64, hex)."""
    return xxhash.xxh3_64_hexdigest(data)


def _column_keys(examples: Sequence[Any]) -> list[tuple[Any, np.dtype, tuple]]:
    """Top-level keys holding arrays of one dtype and shape across all examples."""
    if not examples or not all(type(e) is dict for e in examples):
        return []
    cols = []
    for key, value in examples[0].items():
        if type(value) is not np.ndarray or not _is_storable_dtype(value.dtype) or value.ndim == 0:
            continue  # (a row of a column of 0-d arrays would read back as a scalar)
        dtype, shape = value.dtype, value.shape
        if all(
            type(e.get(key)) is np.ndarray and e[key].dtype == dtype and e[key].shape == shape
            for e in examples
        ):
            cols.append((key, dtype, shape))
    return cols


def encode_shard(
    examples: Sequence[Any],
    start: int,
    labels: dict[str, list] | None = None,
    allow_pickle: bool = False,
) -> bytes:
    """Encode a chunk of examples (``examples[k]`` is index ``start + k``) as shard bytes.

    Raises ``TypeError`` (from the codec) for a value it cannot store; the caller turns
    that into a :class:`~edcache.errors.CodecError` naming the index and key path.
    """
    parts: list[Any] = [MAGIC, bytes(8)]
    pos = _HEAD

    def put(data: Any, at: int) -> None:
        nonlocal pos
        if at > pos:
            parts.append(bytes(at - pos))
            pos = at
        parts.append(data)
        pos += memoryview(data).nbytes

    columns = []
    col_refs: dict[Any, int] = {}
    for number, (key, dtype, shape) in enumerate(_column_keys(examples)):
        stacked = np.ascontiguousarray(np.stack([e[key] for e in examples]))
        offset = _align(pos)
        put(raw_bytes(stacked), offset)
        columns.append([key, dtype.str, list(shape), offset])
        col_refs[key] = number

    encoder = Encoder(allow_pickle=allow_pickle)
    index = np.empty((len(examples), 2), dtype="<u8")
    for row, example in enumerate(examples):
        record, blobs = encoder.encode(example, _align(pos), col_refs or None)
        for offset, blob in blobs:
            put(blob, offset)
        index[row] = (pos, len(record))
        put(record, pos)

    label_span = None
    if labels is not None:
        record, blobs = encoder.encode(labels, _align(pos))
        for offset, blob in blobs:
            put(blob, offset)
        label_span = [pos, len(record)]
        put(record, pos)

    index_offset = _align(pos)
    put(index.tobytes(), index_offset)
    footer = msgpack.packb(
        {
            "v": VERSION,
            "start": start,
            "count": len(examples),
            "columns": columns,
            "index": index_offset,
            "labels": label_span,
        },
        use_bin_type=True,
    )
    put(footer, pos)
    put(len(footer).to_bytes(8, "little") + END_MAGIC, pos)
    return b"".join(parts)


class ShardFile:
    """A memory-mapped, validated shard, opened once per process.

    Parameters
    ----------
    path : str
        The shard file.
    expected_nbytes, expected_start, expected_count : int
        What the manifest says; any difference raises ``CorruptCacheError``.
    expected_checksum : str or None
        If given, the whole file is hashed once and compared (``verify=True``).
    """

    def __init__(
        self,
        path: str,
        expected_nbytes: int,
        expected_start: int,
        expected_count: int,
        expected_checksum: str | None = None,
        allow_pickle: bool = False,
    ) -> None:
        self.path = path
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError as exc:
            raise CorruptCacheError(f"shard {path} is missing") from exc
        try:
            size = os.fstat(fd).st_size
            if size != expected_nbytes:
                raise CorruptCacheError(
                    f"shard {path} has {size} bytes, the manifest says {expected_nbytes}"
                )
            if size < _HEAD + _TAIL:
                raise CorruptCacheError(f"shard {path} is too short ({size} bytes)")
            self._mmap = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
        finally:
            os.close(fd)
        mm = self._mmap
        if expected_checksum is not None and checksum(mm) != expected_checksum:
            raise CorruptCacheError(
                f"shard {path} (examples {expected_start}..{expected_start + expected_count - 1}) "
                "fails its checksum: the file is damaged"
            )
        self._parse(size, expected_start, expected_count, allow_pickle)

    def _bad(self, what: str) -> CorruptCacheError:
        return CorruptCacheError(f"shard {self.path} is damaged: {what}")

    def _parse(self, size: int, start: int, count: int, allow_pickle: bool) -> None:
        mm = self._mmap
        if mm[:8] != MAGIC or mm[size - 8 : size] != END_MAGIC:
            raise self._bad("bad magic bytes")
        flen = int.from_bytes(mm[size - 16 : size - 8], "little")
        if flen > size - _HEAD - _TAIL:
            raise self._bad("footer length out of range")
        try:
            footer = msgpack.unpackb(mm[size - 16 - flen : size - 16], raw=False)
            ok = (
                isinstance(footer, dict)
                and footer.get("v") == VERSION
                and footer.get("start") == start
                and footer.get("count") == count
            )
        except Exception as exc:
            raise self._bad(f"unreadable footer ({exc})") from exc
        if not ok:
            raise self._bad(f"footer does not describe examples {start}..{start + count - 1}")
        try:
            index_off = int(footer["index"])
            if index_off < _HEAD or index_off + 16 * count > size - 16 - flen:
                raise self._bad("index out of range")
            pairs = np.frombuffer(mm, "<u8", 2 * count, index_off).tolist()
            self._spans = [(pairs[2 * r], pairs[2 * r + 1]) for r in range(count)]
            for off, ln in self._spans:
                if off < _HEAD or off + ln > index_off:
                    raise self._bad("record out of range")
            self._columns = []
            self._column_numbers = {}
            for key, dtype_str, shape, offset in footer["columns"]:
                dt = np.dtype(dtype_str)
                if not _is_storable_dtype(dt):
                    raise self._bad(f"column dtype {dtype_str!r}")
                n = count
                for d in shape:
                    if not isinstance(d, int) or d < 0:
                        raise self._bad("column shape")
                    n *= d
                if offset < _HEAD or offset + n * dt.itemsize > index_off:
                    raise self._bad("column out of range")
                self._column_numbers[key] = len(self._columns)
                self._columns.append(
                    np.frombuffer(mm, dt, n, offset).reshape((count, *shape))
                )
            self._labels_span = footer["labels"]
        except CorruptCacheError:
            raise
        except Exception as exc:
            raise self._bad(f"malformed footer ({type(exc).__name__}: {exc})") from exc
        self.start, self.count = start, count
        self._decoder = Decoder(mm, self._columns, allow_pickle, where=f"shard {self.path}")

    def read(self, row: int) -> Any:
        """Decode the example at position ``row`` of this shard."""
        off, ln = self._spans[row]
        return self._decoder.decode(memoryview(self._mmap)[off : off + ln], row)

    def labels(self) -> dict[str, list]:
        """The chunk's ``in_memory_keys`` values, as recorded by the writer."""
        if self._labels_span is None:
            return {}
        off, ln = self._labels_span
        if not isinstance(off, int) or not isinstance(ln, int) or off < _HEAD or off + ln > len(self._mmap):
            raise self._bad("labels out of range")
        values = Decoder(self._mmap, [], where=f"shard {self.path}").decode(
            memoryview(self._mmap)[off : off + ln], 0
        )
        if not isinstance(values, dict) or not all(
            isinstance(v, list) and len(v) == self.count for v in values.values()
        ):
            raise self._bad("labels record malformed")
        return values

    def column(self, key: Any) -> np.ndarray | None:
        """The stacked column ``(count, *shape)`` for top-level ``key``, if stored as one."""
        number = self._column_numbers.get(key)
        return None if number is None else self._columns[number]

    def close(self) -> None:
        self._decoder = None  # type: ignore[assignment]
        self._columns = []
        try:
            self._mmap.close()
        except BufferError:
            pass  # arrays handed out still view the map; it closes when they are gone

