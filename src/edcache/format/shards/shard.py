"""Shard files of format v1 (read-only): one immutable file per chunk of consecutive examples.

Byte layout (all integers little-endian; the full spec is ``docs/format.md``)::

    0          8        16                                        end-16          end-8      end
    | EDCSHARD | 0 (x8) | columns | blobs+records | labels | index | footer | len u64 | EDCSHEND |

* ``columns``: every top-level key whose values have one simple type in all examples
  of the chunk is stored column-wise: arrays of one dtype and shape stacked
  ``(count, *shape)``; Python ints, floats and bools as ``<i8``/``<f8``/``|b1``;
  numpy scalars of one dtype as an array of it; str and bytes as ``count + 1``
  offsets (``<u8``) plus the concatenated UTF-8/raw bytes; all-``None`` as nothing.
* ``blobs+records``: only when some field is not a column or key order differs: per
  example its non-column arrays (aligned) and a msgpack record (see :mod:`.codec`) in
  which column fields are references (extension type 2).
* ``labels``: one record ``{in_memory_key: [values of the chunk]}``.
* ``index``: ``count`` pairs ``(offset, length)`` of the records, if there are records.
* ``footer``: msgpack map ``{"v", "start", "count", "keys", "columns", "index", "labels"}``.

When every field is a column, reading an example is a handful of row lookups and no
msgpack decoding at all.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import struct
from collections.abc import Callable
from typing import Any

import msgpack
import numpy as np
import xxhash

from ...errors import CorruptCacheError
from .codec import Decoder, _is_storable_dtype

MAGIC = b"EDCSHARD"
END_MAGIC = b"EDCSHEND"
VERSION = 1
_HEAD = 16
_TAIL = 16

# column kinds
ARRAY, INT, FLOAT, BOOL, SCALAR, STR, BYTES, NONE = (
    "array", "int", "float", "bool", "scalar", "str", "bytes", "none",
)
_FIXED_DTYPES = {INT: np.dtype("<i8"), FLOAT: np.dtype("<f8"), BOOL: np.dtype("|b1")}


def checksum(data: Any) -> str:
    """The checksum edcache records for a file's bytes (xxh3-64, hex)."""
    return xxhash.xxh3_64_hexdigest(data)


_U64_PAIR = struct.Struct("<QQ")


def _row_builder(keys: list[Any], getters: list[Callable[[int], Any]], given: Any = None) -> Callable[..., dict]:
    """A function ``row -> {key: getter(row), ...}`` for one all-column schema; with
    ``given`` (a key), ``(row, value) -> {...}`` where field ``given`` is ``value``
    instead of read (in its stored position, else last).

    Generated once per field count as a single dict display, which is about 30% faster
    than a dict comprehension over (key, getter) pairs. Only generated names (``k0``,
    ``g0``, ...) appear in the source; keys and getters are bound as values, so nothing
    read from a cache file is ever compiled.
    """
    if given is not None:
        if given not in keys:
            keys, getters = [*keys, given], [*getters, None]  # type: ignore[list-item]
        at = keys.index(given)
    else:
        at = -1
    if len(keys) > 200:
        pairs = list(zip(keys, getters, strict=False))
        if given is None:
            return lambda r: {key: get(r) for key, get in pairs}
        return lambda r, j: {key: (j if n == at else get(r)) for n, (key, get) in enumerate(pairs)}
    make = _ROW_MAKERS.get((len(keys), at))
    if make is None:
        names = range(len(keys))
        params = ", ".join(f"k{i}, g{i}" for i in names)
        body = ", ".join(f"k{i}: j" if i == at else f"k{i}: g{i}(r)" for i in names)
        args = "r, j" if given is not None else "r"
        make = eval(f"lambda {params}: lambda {args}: {{{body}}}", {"__builtins__": {}})
        _ROW_MAKERS[(len(keys), at)] = make
    return make(*(x for pair in zip(keys, getters, strict=False) for x in pair))


#: compiled row-builder factories by (field count, position of the given field or -1);
#: compiling costs ~150 µs
_ROW_MAKERS: dict[tuple[int, int], Callable[..., Callable[..., dict]]] = {}


def _parse_footer(buf: Any, size: int, path: str) -> tuple[dict, int]:
    """The footer map of shard bytes ``buf`` (``size`` long) and where the body ends."""
    if size < _HEAD + _TAIL or buf[:8] != MAGIC or buf[size - 8 : size] != END_MAGIC:
        raise CorruptCacheError(f"shard {path} is damaged: bad magic bytes")
    flen = int.from_bytes(buf[size - 16 : size - 8], "little")
    if flen > size - _HEAD - _TAIL:
        raise CorruptCacheError(f"shard {path} is damaged: footer length out of range")
    try:
        footer = msgpack.unpackb(buf[size - 16 - flen : size - 16], raw=False)
    except Exception as exc:
        raise CorruptCacheError(f"shard {path} is damaged: malformed footer ({exc})") from exc
    if not isinstance(footer, dict) or footer.get("v") != VERSION:
        raise CorruptCacheError(f"shard {path} is damaged: not a version {VERSION} footer")
    return footer, size - 16 - flen


def read_footer(path: str, nbytes: int, data: bytes | None = None) -> dict:
    """The footer of the shard file ``path`` of ``nbytes`` bytes (parsed from ``data``
    if given, else read with two small reads, without mapping the file)."""
    if data is not None:
        return _parse_footer(data, nbytes, path)[0]
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size != nbytes or size < _HEAD + _TAIL:
            raise CorruptCacheError(f"shard {path} has {size} bytes, {nbytes} were committed")
        head = os.pread(f.fileno(), 8, 0)
        tail = os.pread(f.fileno(), _TAIL, size - _TAIL)
        flen = min(int.from_bytes(tail[:8], "little"), size - _HEAD - _TAIL)
        footer = os.pread(f.fileno(), flen, size - _TAIL - flen)
    # the same checks as on the whole file: head + footer + tail stand in for it
    return _parse_footer(head + bytes(8) + footer + tail, _HEAD + flen + _TAIL, path)[0]


def _decode_labels(mm: Any, span: Any, count: int, path: str) -> dict[str, list]:
    if span is None:
        return {}
    off, ln = span
    if not isinstance(off, int) or not isinstance(ln, int) or off < _HEAD or off + ln > len(mm):
        raise CorruptCacheError(f"shard {path} is damaged: labels out of range")
    values = Decoder(mm, [], where=f"shard {path}").decode(memoryview(mm)[off : off + ln], 0)
    if not isinstance(values, dict) or not all(
        isinstance(v, list) and len(v) == count for v in values.values()
    ):
        raise CorruptCacheError(f"shard {path} is damaged: labels record malformed")
    return values


def read_chunk_labels(path: str, nbytes: int, start: int, count: int) -> dict[str, list]:
    """The labels record of a chunk shard, without setting up its columns (what
    completing a build needs from every shard)."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size != nbytes:
            raise CorruptCacheError(f"shard {path} has {size} bytes, the manifest says {nbytes}")
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    try:
        footer = _parse_footer(mm, size, path)[0]
        if footer.get("start") != start or footer.get("count") != count:
            raise CorruptCacheError(f"shard {path} is damaged: footer does not describe examples "
                                    f"{start}..{start + count - 1}")
        return _decode_labels(mm, footer.get("labels"), count, path)
    finally:
        with contextlib.suppress(BufferError):  # a decoded label array still views the map; it closes with it
            mm.close()


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
        if expected_checksum is not None and checksum(self._mmap) != expected_checksum:
            raise CorruptCacheError(
                f"shard {path} (examples {expected_start}..{expected_start + expected_count - 1}) "
                "fails its checksum: the file is damaged"
            )
        self.start, self.count = expected_start, expected_count
        try:
            self._parse(size, allow_pickle)
        except CorruptCacheError:
            raise
        except Exception as exc:  # any malformed value in the footer
            raise self._bad(f"malformed footer ({type(exc).__name__}: {exc})") from exc

    def _bad(self, what: str) -> CorruptCacheError:
        return CorruptCacheError(f"shard {self.path} is damaged: {what}")

    def _parse(self, size: int, allow_pickle: bool) -> None:
        mm, count = self._mmap, self.count
        footer, body_end = _parse_footer(mm, size, self.path)
        if footer.get("start") != self.start or footer.get("count") != count:
            raise self._bad(f"footer does not describe examples {self.start}..{self.start + count - 1}")

        self._spans: list[tuple[int, int]] | None = None
        index_off = footer["index"]
        if index_off is not None:
            if not isinstance(index_off, int) or index_off < _HEAD or index_off + 16 * count > body_end:
                raise self._bad("index out of range")
            pairs = np.frombuffer(mm, "<u8", 2 * count, index_off).tolist()
            self._spans = [(pairs[2 * r], pairs[2 * r + 1]) for r in range(count)]
            if any(off < _HEAD or off + ln > index_off for off, ln in self._spans):
                raise self._bad("record out of range")

        self._arrays: dict[Any, np.ndarray] = {}  # key -> gatherable column
        self._strings: dict[Any, tuple[np.ndarray, int, bool]] = {}  # key -> (offsets, data, is str)
        self._getters: list[Callable[[int], Any]] = []
        self._keys: list[Any] = []
        for desc in footer["columns"]:
            self._keys.append(desc["key"])
            self._getters.append(self._column_getter(desc, body_end))
        keys = footer["keys"]
        if keys is None and self._spans is None:
            raise self._bad("neither records nor a full column set")
        self._row = _row_builder(self._keys, self._getters) if keys is not None else None
        # the same with index_ given, not read: what CachedDataset returns for ds[i]
        self._row_indexed = _row_builder(self._keys, self._getters, "index_") if keys is not None else None
        #: ((key, kind, dtype, shape), ...) when every field is a column, else None
        self.schema = (
            tuple(
                (d["key"], d["kind"], d.get("dtype"), tuple(d.get("shape") or ()))
                for d in footer["columns"]
            )
            if keys is not None
            else None
        )
        self._labels_span = footer["labels"]
        self._decoder = Decoder(mm, self._getters, allow_pickle, where=f"shard {self.path}")

    def _column_getter(self, desc: dict, end: int) -> Callable[[int], Any]:
        kind = desc["kind"]
        if kind == NONE:
            return lambda r: None
        offset = desc["offset"]
        if not isinstance(offset, int) or offset < _HEAD:
            raise self._bad("column offset")
        if kind in (STR, BYTES):
            return self._string_getter(desc, offset, end)
        return self._array_getter(desc, offset, end)

    def _string_getter(self, desc: dict, offset: int, end: int) -> Callable[[int], Any]:
        """Rows of a str or bytes column: an offsets array, then the concatenated data."""
        mm, count, kind = self._mmap, self.count, desc["kind"]
        if offset + 8 * (count + 1) > end:
            raise self._bad("column out of range")
        bounds = np.frombuffer(mm, "<u8", count + 1, offset)
        data = desc["data"]
        if (
            not isinstance(data, int)
            or bounds[0] != 0
            or np.any(bounds[1:] < bounds[:-1])
            or data < offset
            or data + int(bounds[-1]) > end
        ):
            raise self._bad("string column bounds")
        # two offsets straight from the map: no per-row Python state, which matters
        # for a packed file of millions of rows read by many worker processes
        self._strings[desc["key"]] = (bounds, data, kind == STR)
        pair = _U64_PAIR.unpack_from
        if kind == STR:
            def get_str(r: int) -> str:
                a, b = pair(mm, offset + 8 * r)
                return mm[data + a : data + b].decode()
            return get_str

        def get_bytes(r: int) -> bytes:
            a, b = pair(mm, offset + 8 * r)
            return mm[data + a : data + b]
        return get_bytes

    def _array_getter(self, desc: dict, offset: int, end: int) -> Callable[[int], Any]:
        """Rows of a fixed-shape column: one array of ``count`` rows, mapped."""
        count, kind = self.count, desc["kind"]
        dt = np.dtype(desc["dtype"])
        if not _is_storable_dtype(dt):
            raise self._bad(f"column dtype {desc['dtype']!r}")
        if kind in _FIXED_DTYPES and dt != _FIXED_DTYPES[kind]:
            raise self._bad(f"{kind} column of dtype {dt}")
        shape = desc["shape"]
        n = count
        for d in shape:
            if not isinstance(d, int) or d < 0:
                raise self._bad("column shape")
            n *= d
        if offset + n * dt.itemsize > end:
            raise self._bad("column out of range")
        col = np.frombuffer(self._mmap, dt, n, offset).reshape((count, *shape))
        self._arrays[desc["key"]] = col
        if kind in (INT, FLOAT, BOOL):
            return col.item  # Python int / float / bool
        if kind in (ARRAY, SCALAR):
            return col.__getitem__
        raise self._bad(f"unknown column kind {kind!r}")

    def read_indexed(self, row: int, index: int) -> Any:
        """:meth:`read` with ``index_`` set to ``index`` (a stored ``index_`` is not read)."""
        if self._row_indexed is not None:
            try:
                return self._row_indexed(row, index)
            except UnicodeDecodeError as exc:
                raise self._bad(f"example {self.start + row}: invalid UTF-8 ({exc})") from exc
        example = self.read(row)
        if type(example) is dict:
            example["index_"] = index
        return example

    def read(self, row: int) -> Any:
        """Decode the example at position ``row`` of this shard."""
        try:
            if self._row is not None:
                return self._row(row)
            off, ln = self._spans[row]  # type: ignore[index]
            return self._decoder.decode(memoryview(self._mmap)[off : off + ln], row)
        except UnicodeDecodeError as exc:
            raise self._bad(f"example {self.start + row}: invalid UTF-8 ({exc})") from exc

    def labels(self) -> dict[str, list]:
        """The chunk's ``in_memory_keys`` values, as recorded by the writer."""
        return _decode_labels(self._mmap, self._labels_span, self.count, self.path)

    def getter(self, key: Any) -> Callable[[int], Any]:
        """``getter(key)(row)`` is the value of column ``key`` for the example at ``row``."""
        return self._getters[self._keys.index(key)]

    def gather_strings(self, key: Any, rows: np.ndarray) -> list | None:
        """The values of str or bytes column ``key`` at ``rows`` (offsets gathered at
        once), or None if ``key`` is not such a column."""
        entry = self._strings.get(key)
        if entry is None:
            return None
        bounds, data, is_str = entry
        mm = self._mmap
        starts = (bounds[rows] + data).tolist()
        stops = (bounds[rows + 1] + data).tolist()
        try:
            if is_str:
                return [mm[a:b].decode() for a, b in zip(starts, stops, strict=False)]
            return [mm[a:b] for a, b in zip(starts, stops, strict=False)]
        except UnicodeDecodeError as exc:
            raise self._bad(f"column {key!r}: invalid UTF-8 ({exc})") from exc

    def column(self, key: Any) -> np.ndarray | None:
        """The column array of top-level ``key`` (arrays stacked, numbers, bools, numpy
        scalars), or None if the key is not stored as such a column."""
        return self._arrays.get(key)

    def close(self) -> None:
        self._decoder = None  # type: ignore[assignment]
        self._arrays, self._getters, self._row, self._strings = {}, [], None, {}
        self._row_indexed = None
        with contextlib.suppress(BufferError):  # arrays handed out still view the map; it closes when they are gone
            self._mmap.close()
