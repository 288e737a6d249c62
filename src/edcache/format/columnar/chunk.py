"""Worker side of format v2: turn the examples of one chunk into column parts.

Each example is taken apart as soon as the dataset returns it: arrays are copied
into memory the chunk owns and containers are encoded at once, so a dataset that
reuses one output buffer (or returns the same dict each call) is cached correctly.

The result, :class:`ChunkColumns`, holds per column its kind *for this chunk* and
its parts (data and index, indices local to the chunk). The coordinator merges the
kinds with the cache's (:func:`.schema.merge`) and appends the parts in index order.
It crosses process boundaries as a plain pickle of numpy arrays and bytes (it never
touches the disk, and is only ever unpickled by the coordinator that asked for it).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from ...errors import CodecError
from ..shards.codec import (
    Encoder,
    _is_storable_dtype,
    codec_error,
    find_unsupported,
    format_key_path,
)
from ..wrap import Tagged, unwrap
from .records import encode_row
from .schema import (
    ABSENT,
    BYTES,
    FIXED,
    NONE,
    RAGGED,
    RECORD,
    STR,
    VARSHAPE,
    ColumnSpec,
)

_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
_PY_FIXED = {bool: ("bool", np.dtype("|b1")), int: ("int", np.dtype("<i8")), float: ("float", np.dtype("<f8"))}
_SIMPLE = frozenset({str, bytes, int, float, bool, type(None)})
#: A chunk-local layout: (container, keys) with keys the dict keys or positions.
LayoutKey = tuple[str, tuple]
WHOLE: LayoutKey = ("whole", (None,))
#: More distinct top-level keys than this in one cache: further examples are stored whole.
MAX_COLUMNS = 1024


@dataclass
class ChunkColumn:
    """One column of a chunk: its kind here and its parts (``data`` first)."""

    spec: ColumnSpec
    parts: list[Any] = field(default_factory=list)


@dataclass
class ChunkColumns:
    """The encoded examples ``start .. start+count-1``."""

    start: int
    count: int
    layouts: list[LayoutKey]
    #: per-row index into ``layouts`` (uint32), or None when every row has layout 0
    row_layout: np.ndarray | None
    columns: list[ChunkColumn]

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes if isinstance(p, np.ndarray) else len(p) for c in self.columns for p in c.parts)


def layout_key(example: Any) -> LayoutKey:
    """The layout of one example (the dict's key order, or a tuple's/list's length)."""
    t = type(example)
    if t is dict:
        keys = tuple(example)
        if all(type(k) is str for k in keys):
            return ("dict", keys)
        return WHOLE
    if t is tuple or t is list:
        return ("tuple" if t is tuple else "list", tuple(range(len(example))))
    return WHOLE


class _Values:
    """The values of one key in one chunk, owned by the chunk (copied on arrival)."""

    __slots__ = ("buf", "key", "nbuf", "rows", "shape", "tagged", "values")

    def __init__(self, key: Any) -> None:
        self.key = key
        self.rows: list[int] = []
        self.values: list[Any] = []
        # fixed-shape arrays go straight into one preallocated block (one copy)
        self.buf: np.ndarray | None = None
        self.nbuf = 0
        self.shape: tuple = ()  # of one row of buf
        #: row -> tag of the rows that were tensors or PIL images (stored as their arrays)
        self.tagged: dict[int, str] | None = None

    def add(self, row: int, value: Any, count: int, encoder: Encoder, where: int) -> None:
        t = type(value)
        if t is not np.ndarray and t not in _SIMPLE and not isinstance(value, np.generic):
            try:
                wrapped = unwrap(value)
            except TypeError:
                wrapped = None  # the codec below names the problem
            if wrapped is not None:
                tag, value = wrapped
                if self.tagged is None:
                    self.tagged = {}
                self.tagged[row] = tag
                t = np.ndarray
        if t is np.ndarray:
            buf = self.buf
            if buf is not None and value.shape == buf.shape[1:] and value.dtype == buf.dtype:
                buf[row] = value
                self.rows.append(row)
                self.values.append(None)  # in buf
                self.nbuf += 1
                return
            if buf is None and not self.values and value.ndim and _is_storable_dtype(value.dtype):
                self.buf = np.empty((count, *value.shape), value.dtype)
                self.shape = value.shape
                self.buf[row] = value
                self.rows.append(row)
                self.values.append(None)
                self.nbuf = 1
                return
            self._unbuffer()
            value = value.copy()  # the dataset may reuse its array
        else:
            self._unbuffer()  # not an array: the column is not one block
            if t not in _SIMPLE and not isinstance(value, np.generic):
                # containers and anything else: encoded now, so later changes do not leak in
                value = _Encoded(_encode(value, encoder, where, self.key))
        self.rows.append(row)
        self.values.append(value)

    def _unbuffer(self) -> None:
        """Stop using the block: its rows become separate arrays (views of it)."""
        if self.buf is not None:
            buf = self.buf
            self.values = [buf[r] if v is None else v for r, v in zip(self.rows, self.values, strict=False)]
            self.buf, self.nbuf = None, 0


class _Encoded(bytes):
    """A value already encoded as a record row (containers are encoded on arrival)."""


def _encode(value: Any, encoder: Encoder, index: int, key: Any) -> bytes:
    try:
        return encode_row(value, encoder)
    except RecursionError:
        raise CodecError(
            f"example {index}, key {key!r}: the value is nested too deeply (or contains itself); "
            "the codec stores trees of containers, not cycles"
        ) from None
    except (TypeError, ValueError, OverflowError, UnicodeEncodeError) as exc:
        example = value if key is None else {key: value}
        raise codec_error(index, example, encoder.allow_pickle, exc) from None


def build_chunk(start: int, count: int, examples: Iterable[Any], allow_pickle: bool = False,
                codecs: list[list[Any]] | None = None) -> ChunkColumns:
    """Take apart the examples ``start .. start+count-1`` (an iterable: each is copied
    or encoded as soon as it arrives) into columns; ``codecs``: the build's column
    codecs (see :func:`.codecs.normalize_codecs`), applied here, in the worker."""
    encoder = Encoder(allow_pickle=allow_pickle)
    layouts: dict[LayoutKey, int] = {}
    row_layout: list[int] = []
    columns: dict[Any, _Values] = {}
    # per distinct layout: its number and the columns of its fields, in order
    entries: dict[LayoutKey, tuple[int, list[_Values] | None]] = {}
    row = -1
    last_keys: tuple | None = None
    entry: tuple[int, list[_Values] | None] = (0, None)
    ndarray, simple = np.ndarray, _SIMPLE
    for row, example in enumerate(examples):
        index = start + row
        if type(example) is dict:
            keys = tuple(example)
            if keys != last_keys:  # usually every example has the same keys: looked up once
                entry, last_keys = _entry(layout_key(example), layouts, entries, columns), keys
        else:
            entry, last_keys = _entry(layout_key(example), layouts, entries, columns), None
        lid, cols = entry
        row_layout.append(lid)
        if cols is None:  # stored whole
            col = columns[None]
            col.rows.append(row)
            col.values.append(_Encoded(_encode(example, encoder, index, None)))
            continue
        for col, value in zip(cols, example.values() if type(example) is dict else example, strict=False):
            t = type(value)
            if t is ndarray:
                buf = col.buf
                if buf is not None and value.shape == col.shape and value.dtype == buf.dtype:
                    buf[row] = value  # the common case: one copy into the chunk's block
                    col.rows.append(row)
                    col.values.append(None)
                    col.nbuf += 1
                else:
                    col.add(row, value, count, encoder, index)
            elif t in simple:
                if col.buf is not None:  # (None marks a row in the block: a real None must not)
                    col._unbuffer()
                col.rows.append(row)
                col.values.append(value)
            else:
                col.add(row, value, count, encoder, index)
    if row + 1 != count:
        raise CodecError(f"examples {start}..{start + count - 1}: got {row + 1} examples, expected {count}")
    out = [_finish_column(col, start, count, encoder, codecs) for col in columns.values()]
    return ChunkColumns(
        start, count, list(layouts), None if len(layouts) == 1 else np.asarray(row_layout, dtype="<u4"), out
    )


def _entry(lay: LayoutKey, layouts: dict, entries: dict, columns: dict) -> tuple[int, list[_Values] | None]:
    """The layout number and field columns of layout ``lay`` (created on first sight)."""
    found = entries.get(lay)
    if found is not None:
        return found
    if lay[0] != "whole" and len(columns) + len(lay[1]) > MAX_COLUMNS and not all(k in columns for k in lay[1]):
        # too many distinct fields: store this example whole
        found = entries[lay] = _entry(WHOLE, layouts, entries, columns)
        return found
    lid = layouts[lay] = len(layouts)
    if lay[0] == "whole":
        if None not in columns:
            columns[None] = _Values(None)
        found = (lid, None)
    else:
        cols = []
        for key in lay[1]:
            if key not in columns:
                columns[key] = _Values(key)
            cols.append(columns[key])
        found = (lid, cols)
    entries[lay] = found
    return found


# -- deciding a chunk's column kind and building its parts --------------------------------
def _kind_of(col: _Values) -> ColumnSpec:
    """The kind of column ``col`` in this chunk (see :mod:`.schema`)."""
    key, values = col.key, col.values
    if not values:
        return ColumnSpec(key, ABSENT)
    if col.buf is not None:  # every value went into the block
        return ColumnSpec(key, FIXED, col.buf.dtype.str, col.buf.shape[1:])
    first = values[0]
    t = type(first)
    if not all(type(v) is t for v in values):
        return ColumnSpec(key, RECORD)
    if t is np.ndarray:
        return _array_kind(key, first, values)
    return _scalar_kind(key, t, first, values)


def _array_kind(key: Any, first: np.ndarray, values: list[np.ndarray]) -> ColumnSpec:
    """The kind of a column whose values are all numpy arrays, ``first`` among them."""
    dt, nd = first.dtype, first.ndim
    if nd == 0 or not _is_storable_dtype(dt) or not all(v.dtype == dt and v.ndim == nd for v in values):
        return ColumnSpec(key, RECORD)
    shapes = {v.shape for v in values}
    if len(shapes) == 1:
        return ColumnSpec(key, FIXED, dt.str, first.shape)
    if len({s[1:] for s in shapes}) == 1:
        return ColumnSpec(key, RAGGED, dt.str, first.shape[1:])
    return ColumnSpec(key, VARSHAPE, dt.str, ndim=nd)


def _scalar_kind(key: Any, t: type, first: Any, values: list[Any]) -> ColumnSpec:
    """The kind of a column whose values are all of type ``t`` (not an array), ``first``
    among them."""
    if t in _PY_FIXED:
        py, dt = _PY_FIXED[t]
        if t is int and not all(_INT64_MIN <= v <= _INT64_MAX for v in values):
            return ColumnSpec(key, RECORD)
        return ColumnSpec(key, FIXED, dt.str, (), py=py)
    if t is str:
        return ColumnSpec(key, STR)
    if t is bytes:
        return ColumnSpec(key, BYTES)
    if first is None:
        return ColumnSpec(key, NONE)
    if isinstance(first, np.generic) and _is_storable_dtype(first.dtype):
        dt = first.dtype
        if all(v.dtype == dt for v in values):
            return ColumnSpec(key, FIXED, dt.str, (), py="scalar")
    return ColumnSpec(key, RECORD)


def _wrapped_kind(col: _Values, spec: ColumnSpec) -> tuple[ColumnSpec, list[Any], np.ndarray | None]:
    """The kind of a column some of whose rows were tensors or images: the array kind
    with the tag when every row has the same tag, else records (each tensor or image
    tagged for the codec)."""
    tagged, values, buf = col.tagged or {}, col.values, col.buf
    tags = set(tagged.values())
    if len(tags) == 1 and len(tagged) == len(col.rows):
        tag = tags.pop()
        if spec.kind in (FIXED, RAGGED, VARSHAPE) and spec.py == "array":
            return replace(spec, wrap=tag), values, buf
        if buf is None and len({(v.dtype, v.ndim) for v in values}) == 1 and values[0].ndim == 0:
            return ColumnSpec(col.key, FIXED, values[0].dtype.str, (), wrap=tag), values, None
    out = []
    for r, v in zip(col.rows, values, strict=False):
        if v is None and buf is not None:
            v = buf[r]
        out.append(Tagged(tagged[r], v) if r in tagged else v)
    return ColumnSpec(col.key, RECORD), out, None


def _finish_column(col: _Values, start: int, count: int, encoder: Encoder,
                   codecs: list[list[Any]] | None = None) -> ChunkColumn:
    spec = _kind_of(col)
    values, buf = col.values, col.buf
    if col.tagged:
        spec, values, buf = _wrapped_kind(col, spec)
    try:
        parts = column_parts(spec, col.rows, values, count, encoder, buf)
        if codecs and spec.kind != ABSENT:
            from .codecs import apply_codec, choice_for

            choice = choice_for(codecs, col.key)
            if choice is not None:
                spec, parts = apply_codec(spec, parts, col.rows, count, choice, start)
        return ChunkColumn(spec, parts)
    except CodecError:
        raise
    except (TypeError, ValueError, OverflowError, UnicodeError) as exc:
        for row, value in zip(col.rows, col.values, strict=False):
            if spec.kind == STR and isinstance(value, str):
                try:
                    value.encode()
                except UnicodeEncodeError as err:
                    raise CodecError(
                        f"example {start + row}, key {format_key_path((col.key,))!r}: the str "
                        f"cannot be stored as UTF-8 ({err.reason} at position {err.start}; a "
                        "file name decoded with os.fsdecode?). Store it as bytes "
                        "(os.fsencode) or fix the string."
                    ) from None
            if value is not None and find_unsupported(value, encoder.allow_pickle) is not None:
                raise codec_error(start + row, {col.key: value}, encoder.allow_pickle, exc) from None
        raise CodecError(
            f"examples {start}..{start + count - 1}, key {col.key!r}: cannot be encoded ({exc})"
        ) from None


def column_parts(
    spec: ColumnSpec,
    rows: list[int],
    values: list[Any],
    count: int,
    encoder: Encoder,
    block: np.ndarray | None = None,
) -> list[Any]:
    """The parts of a column of kind ``spec`` over ``count`` rows, of which ``rows``
    hold ``values`` (the others are absent: zeros or empty). ``block`` holds the rows
    whose value is None when values were gathered into one block (see :class:`_Values`).

    Also used by the coordinator to re-encode rows when a column is promoted. A coded
    column's rows are encoded one by one (:func:`.codecs.coded_parts`).
    """
    if spec.codec is None:
        return _raw_parts(spec, rows, values, count, encoder, block)
    from .codecs import coded_parts

    raw = _raw_parts(replace(spec, codec=None), rows, values, count, encoder, block)
    return coded_parts(spec, raw, rows, count)


def _raw_parts(spec: ColumnSpec, rows: list[int], values: list[Any], count: int, encoder: Encoder,
               block: np.ndarray | None) -> list[Any]:
    """The parts of an uncoded column (see :func:`column_parts`)."""
    kind = spec.kind
    if kind in (NONE, ABSENT):
        return []
    if kind == FIXED:
        return [_fixed_data(spec, rows, values, count, block)]
    if block is not None:  # a block promoted to a variable kind in this chunk
        values = [block[r] if v is None else v for r, v in zip(rows, values, strict=False)]
    if kind == RAGGED:
        return _ragged_parts(spec, rows, values, count)
    if kind == VARSHAPE:
        return _varshape_parts(spec, rows, values, count)
    if kind in (STR, BYTES, RECORD):
        return _blob_parts(kind, rows, values, count, encoder)
    raise ValueError(f"unknown column kind {kind!r}")


def _fixed_data(spec: ColumnSpec, rows: list[int], values: list[Any], count: int,
                block: np.ndarray | None) -> np.ndarray:
    """The data file of a fixed column: ``count`` rows, absent ones zeros."""
    if block is not None and len(rows) == count:
        return block
    dt = spec.np_dtype
    data = np.zeros((count, *spec.shape), dtype=dt)
    if block is not None:
        data[rows] = block[rows]
    elif values:
        if spec.py == "array" or spec.py == "scalar":
            stacked = np.stack([np.asarray(v) for v in values]) if spec.py == "array" else np.array(values)
        else:
            stacked = np.array(values, dtype=dt)
        if len(rows) == count:
            data = np.ascontiguousarray(stacked.astype(dt, copy=False))
        else:
            data[rows] = stacked
    return data


def _ragged_parts(spec: ColumnSpec, rows: list[int], values: list[Any], count: int) -> list[Any]:
    """Data (rows concatenated along axis 0) and ``count`` u64 item end offsets."""
    ends = np.zeros(count, dtype="<u8")
    ends[rows] = [v.shape[0] for v in values]
    np.cumsum(ends, out=ends)
    if values:
        data = np.concatenate([np.asarray(v, dtype=spec.np_dtype) for v in values], axis=0)
    else:
        data = np.zeros((0, *spec.shape), spec.np_dtype)
    return [np.ascontiguousarray(data), ends]


def _varshape_parts(spec: ColumnSpec, rows: list[int], values: list[Any], count: int) -> list[Any]:
    """Data (row bytes concatenated) and per row a u64 byte offset and ``ndim`` dims."""
    dt = spec.np_dtype
    index = np.zeros((count, 1 + spec.ndim), dtype="<u8")
    present = dict(zip(rows, values, strict=False))
    blobs = []
    pos = 0
    for r in range(count):  # absent rows: empty, at the running offset
        index[r, 0] = pos
        v = present.get(r)
        if v is not None:
            a = np.ascontiguousarray(v, dtype=dt)
            index[r, 1:] = a.shape
            blobs.append(a.tobytes())
            pos += a.nbytes
    return [b"".join(blobs), index]


def _blob_parts(kind: str, rows: list[int], values: list[Any], count: int, encoder: Encoder) -> list[Any]:
    """Data (str, bytes or record rows concatenated) and ``count`` u64 byte end offsets."""
    blobs = [b""] * count
    for r, v in zip(rows, values, strict=False):
        if kind == STR:
            blobs[r] = v.encode()
        elif kind == BYTES:
            blobs[r] = bytes(v)
        else:
            blobs[r] = v if type(v) is _Encoded else encode_row(v, encoder)
    ends = np.cumsum([len(b) for b in blobs], dtype="<u8") if count else np.zeros(0, "<u8")
    return [b"".join(blobs), ends.astype("<u8", copy=False)]
