"""Column kinds of format v2, their files, and how a chunk's column merges into the cache's.

Every top-level field of the examples (a dict key, or a position of a tuple/list
example) is one column. A column has one *kind* for the whole cache:

========== =================================================== =============================
kind       holds (every present row)                           files
========== =================================================== =============================
fixed      arrays of one dtype and shape, or Python int/float/  ``data``: row ``r`` at
           bool, or numpy scalars of one dtype (``py`` says     ``r * row_bytes``
           which, so they read back with their type)
ragged     arrays of one dtype whose shapes differ only in the  ``data`` (rows concatenated
           first axis (boxes ``(k, 4)``, token ids ``(k,)``)    along axis 0), ``index``:
                                                                ``n + 1`` u64 item offsets
varshape   arrays of one dtype and ndim, any shapes              ``data``, ``index``: per row
                                                                u64 byte offset + ``ndim`` dims
str/bytes  str (UTF-8) / bytes                                   ``data``, ``index``: ``n + 1``
                                                                u64 byte offsets
record     anything else the safe codec stores (nested          ``data`` (16-byte aligned
           containers, mixed kinds, 0-d arrays, ...)            rows), ``index``: ``n + 1``
                                                                u64 byte offsets
none       only ``None``                                         (none)
========== =================================================== =============================

The cache's kind of a column is decided by the examples in index order: chunk 0
decides, and a later chunk whose values do not fit *promotes* the column with
:func:`merge` (fixed -> ragged -> varshape, anything -> record). Since chunks are
appended in index order, the result does not depend on workers or timing.

:class:`ColumnSpec` is the one place a column description is turned into JSON and
back (manifest and commit log both use :meth:`ColumnSpec.to_json`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from ...errors import CorruptCacheError
from ..shards.codec import _is_storable_dtype
from .codec_names import Codec, parse_codec

FIXED, RAGGED, VARSHAPE, STR, BYTES, RECORD, NONE = (
    "fixed", "ragged", "varshape", "str", "bytes", "record", "none",
)
#: a chunk in which no example has the field: fits any column kind
ABSENT = "absent"
KINDS = frozenset({FIXED, RAGGED, VARSHAPE, STR, BYTES, RECORD, NONE})
#: how a fixed column's rows read back
PY_KINDS = frozenset({"array", "int", "float", "bool", "scalar"})
#: kinds with an index file
INDEXED = frozenset({RAGGED, VARSHAPE, STR, BYTES, RECORD})
#: kinds whose index file holds ``n + 1`` offsets (the first a 0): row ``r`` starts where
#: row ``r - 1`` ends, so a chunk's first row starts in the previous chunk's bytes
OFFSETS = frozenset({RAGGED, STR, BYTES, RECORD})

#: Top-level container of an example, per layout.
CONTAINERS = frozenset({"dict", "tuple", "list", "whole"})


@dataclass(frozen=True)
class ColumnSpec:
    """What one column holds and where.

    Attributes
    ----------
    key : str, int or None
        The dict key (str) or tuple/list position (int); None for internal columns
        (the per-row layout column, the whole-example column).
    kind : str
        One of :data:`KINDS` (or :data:`ABSENT` in a chunk).
    dtype : str or None
        numpy dtype string of fixed, ragged and varshape columns.
    shape : tuple of int
        fixed: the shape of one row; ragged: the shape of one item along axis 0.
    ndim : int
        varshape: the number of dimensions of every row.
    py : str
        fixed: how a row reads back (``array``, ``int``, ``float``, ``bool``, ``scalar``).
    stem : str
        File name stem in the cache (set by the coordinator; empty in a chunk).
    wrap : str or None
        fixed, ragged and varshape: what each row is wrapped into when read
        (``torch:<dtype>`` or ``pil:<mode>``, see :mod:`edcache.format.wrap`); None for
        plain numpy arrays.
    codec : str or None
        fixed, ragged and varshape: how each row is stored (``zstd:3``, ``lz4``, ``png``,
        ``jpeg:90``, ``webp:90``, ``webp:lossless``; see :mod:`.codecs`); None: raw.
        Kind, dtype, shape and wrap describe the decoded rows.
    """

    key: Any
    kind: str
    dtype: str | None = None
    shape: tuple = ()
    ndim: int = 0
    py: str = "array"
    stem: str = ""
    wrap: str | None = None
    codec: str | None = None

    # -- files -----------------------------------------------------------------------
    def files(self) -> list[str]:
        """Relative paths of this column's files, data first."""
        if self.kind == NONE or self.kind == ABSENT:
            return []
        data = f"columns/{self.stem}.data"
        if self.indexed:
            return [data, f"columns/{self.stem}.index"]
        return [data]

    @property
    def indexed(self) -> bool:
        """Whether the column has an index file (variable-size and coded columns)."""
        return self.kind in INDEXED or self.codec is not None

    @property
    def offsets(self) -> bool:
        """Whether the index holds ``n + 1`` offsets (see :data:`OFFSETS`; not coded columns)."""
        return self.kind in OFFSETS and self.codec is None

    @property
    def np_dtype(self) -> np.dtype:
        return np.dtype(self.dtype)

    @property
    def row_bytes(self) -> int:
        """Bytes of one row of a fixed column (one item along axis 0 of a ragged one)."""
        return int(np.prod(self.shape, dtype=np.int64)) * self.np_dtype.itemsize

    @property
    def index_row_items(self) -> int:
        """u64 entries per row in the index file (varshape: offset + dims; coded: offset,
        length + dims; else 1)."""
        if self.codec is not None:
            return 2 + row_ndim(self)
        return 1 + self.ndim if self.kind == VARSHAPE else 1

    def same_kind(self, other: ColumnSpec) -> bool:
        """Whether ``other`` holds the same kind of values (ignoring key and files)."""
        return (self.kind, self.dtype, tuple(self.shape), self.ndim, self.py, self.wrap, self.codec) == (
            other.kind, other.dtype, tuple(other.shape), other.ndim, other.py, other.wrap, other.codec
        )

    # -- JSON ------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"key": self.key, "kind": self.kind, "stem": self.stem}
        if self.kind in (FIXED, RAGGED, VARSHAPE):
            doc["dtype"] = self.dtype
        if self.kind in (FIXED, RAGGED):
            doc["shape"] = list(self.shape)
        if self.kind == VARSHAPE:
            doc["ndim"] = self.ndim
        if self.kind == FIXED:
            doc["py"] = self.py
        if self.wrap is not None:
            doc["wrap"] = self.wrap
        if self.codec is not None:
            doc["codec"] = self.codec
        return doc

    @classmethod
    def from_json(cls, doc: Any, where: str) -> ColumnSpec:
        """Parse and validate a column description (``CorruptCacheError`` if malformed)."""
        def bad(what: str) -> CorruptCacheError:
            return CorruptCacheError(f"{where}: malformed column description ({what}): {doc!r:.200}")

        if not isinstance(doc, dict):
            raise bad("not a map")
        key, kind, stem = doc.get("key"), doc.get("kind"), doc.get("stem")
        if not (key is None or type(key) in (str, int)):
            raise bad("key")
        if not isinstance(kind, str) or kind not in KINDS:
            raise bad("kind")
        if not isinstance(stem, str) or not stem.replace("-", "").replace(".", "").isalnum():
            raise bad("stem")
        spec = cls(key=key, kind=kind, stem=stem)
        if kind in (FIXED, RAGGED, VARSHAPE):
            spec = replace(spec, dtype=_valid_dtype(doc.get("dtype"), bad))
        if kind in (FIXED, RAGGED):
            spec = replace(spec, shape=_valid_shape(doc.get("shape"), bad))
        if kind == VARSHAPE:
            spec = replace(spec, ndim=_valid_ndim(doc.get("ndim"), bad))
        if kind == FIXED:
            spec = replace(spec, py=_valid_py(spec, doc.get("py"), bad))
        wrap = doc.get("wrap")
        if wrap is not None:
            spec = replace(spec, wrap=_valid_wrap(spec, wrap, bad))
        if doc.get("codec") is not None:
            spec = replace(spec, codec=_valid_codec(spec, doc["codec"], bad))
        return spec


def _valid_dtype(dtype: Any, bad: Callable[[str], CorruptCacheError]) -> str:
    """The canonical string of ``dtype`` if it names a storable numpy dtype."""
    try:
        dt = np.dtype(dtype) if isinstance(dtype, str) else None
    except (TypeError, ValueError):
        dt = None
    if dt is None or not _is_storable_dtype(dt):
        raise bad("dtype")
    return dt.str


def _valid_shape(shape: Any, bad: Callable[[str], CorruptCacheError]) -> tuple[int, ...]:
    """``shape`` as a tuple if it is a list of dimensions in range."""
    if not isinstance(shape, list) or not all(type(d) is int and 0 <= d < 2**40 for d in shape):
        raise bad("shape")
    return tuple(shape)


def _valid_ndim(ndim: Any, bad: Callable[[str], CorruptCacheError]) -> int:
    """``ndim`` if it is an int from 1 to 32."""
    if type(ndim) is not int or not 1 <= ndim <= 32:
        raise bad("ndim")
    return ndim


def _valid_py(spec: ColumnSpec, py: Any, bad: Callable[[str], CorruptCacheError]) -> str:
    """``py`` if it is a :data:`PY_KINDS` entry that fits the fixed column ``spec``."""
    if not isinstance(py, str) or py not in PY_KINDS:
        raise bad("py")
    if py in ("int", "float", "bool") and (spec.shape or spec.dtype != _PY_DTYPES[py].str):
        raise bad("py dtype")
    return py


def _valid_wrap(spec: ColumnSpec, wrap: Any, bad: Callable[[str], CorruptCacheError]) -> str:
    """``wrap`` if it is a valid tag whose stored dtype is that of the array column ``spec``."""
    from ..wrap import stored_dtype, valid_tag

    if spec.kind not in (FIXED, RAGGED, VARSHAPE) or not valid_tag(wrap) or spec.py != "array" \
            or np.dtype(spec.dtype) != stored_dtype(wrap):
        raise bad("wrap")
    return wrap


def _valid_codec(spec: ColumnSpec, codec: Any, bad: Callable[[str], CorruptCacheError]) -> str:
    """``codec`` if it is a canonical codec string that can store ``spec``'s rows."""
    try:
        parsed = parse_codec(codec)
    except ValueError:
        raise bad("codec") from None
    if parsed.text != codec or unfit_column(spec, parsed) is not None:
        raise bad("codec")
    return codec


_PY_DTYPES = {"int": np.dtype("<i8"), "float": np.dtype("<f8"), "bool": np.dtype("|b1")}


def merge(cache: ColumnSpec, chunk: ColumnSpec) -> ColumnSpec:
    merged = _merge(cache, chunk)
    return cache if merged.same_kind(cache) else merged


def _merge(cache: ColumnSpec, chunk: ColumnSpec) -> ColumnSpec:
    """The kind a column must have to hold the rows of both ``cache`` and ``chunk``.

    Returns ``cache`` itself when the chunk fits as it is. The order of promotion:
    fixed arrays -> ragged (first axis varies) -> varshape (any axis varies) ->
    record (kinds differ).
    """
    if chunk.kind == ABSENT or cache.same_kind(chunk):
        return cache
    if cache.kind == ABSENT:
        return replace(chunk, key=cache.key, stem=cache.stem)
    if chunk.codec != cache.codec:  # the first chunk holding the column decided its codec
        chunk = replace(chunk, codec=cache.codec)
        if cache.same_kind(chunk):
            return cache
    a, b = _as_array_kind(cache), _as_array_kind(chunk)
    if a is not None and b is not None and a[0] == b[0] and cache.wrap == chunk.wrap:
        (dtype, ndim_a, trail_a), (_, ndim_b, trail_b) = a, b
        if ndim_a == ndim_b and ndim_a >= 1:
            if trail_a == trail_b and trail_a is not None:
                return ColumnSpec(cache.key, RAGGED, dtype, trail_a, stem=cache.stem, wrap=cache.wrap,
                                  codec=cache.codec)
            return ColumnSpec(cache.key, VARSHAPE, dtype, ndim=ndim_a, stem=cache.stem, wrap=cache.wrap,
                              codec=cache.codec)
    return ColumnSpec(cache.key, RECORD, stem=cache.stem)


def _as_array_kind(spec: ColumnSpec) -> tuple[str, int, tuple | None] | None:
    """(dtype, ndim, trailing shape or None) of an array column, else None."""
    if spec.kind == FIXED and spec.py == "array" and spec.shape:
        return spec.dtype, len(spec.shape), tuple(spec.shape[1:])  # type: ignore[return-value]
    if spec.kind == RAGGED:
        return spec.dtype, len(spec.shape) + 1, tuple(spec.shape)  # type: ignore[return-value]
    if spec.kind == VARSHAPE:
        return spec.dtype, spec.ndim, None  # type: ignore[return-value]
    return None


@dataclass(frozen=True)
class Layout:
    """How the columns make up an example: its container and the columns in order.

    ``container`` is ``dict`` (keys are the columns' keys), ``tuple`` or ``list``
    (columns are the positions), or ``whole`` (one record column holds the example).
    """

    container: str
    columns: tuple[int, ...]

    def to_json(self) -> list:
        return [self.container, list(self.columns)]

    @classmethod
    def from_json(cls, doc: Any, num_columns: int, where: str) -> Layout:
        if (
            not isinstance(doc, list) or len(doc) != 2 or not isinstance(doc[0], str) or doc[0] not in CONTAINERS
            or not isinstance(doc[1], list)
            or not all(type(c) is int and 0 <= c < num_columns for c in doc[1])
            or (doc[0] == "whole" and len(doc[1]) != 1)
        ):
            raise CorruptCacheError(f"{where}: malformed layout {doc!r:.200}")
        return cls(doc[0], tuple(doc[1]))


#: kinds a codec can store (rows of arrays)
ARRAY_KINDS = (FIXED, RAGGED, VARSHAPE)


def row_ndim(spec: ColumnSpec) -> int:
    """Dimensions of one row of an array column."""
    if spec.kind == FIXED:
        return len(spec.shape)
    if spec.kind == RAGGED:
        return 1 + len(spec.shape)
    return spec.ndim


def unfit_column(spec: ColumnSpec, codec: Codec) -> str | None:
    """Why ``codec`` cannot store the column ``spec`` (None if it can)."""
    if spec.kind not in ARRAY_KINDS or spec.py != "array":
        what = {"str": "str", "bytes": "bytes", "record": "mixed or nested values", "none": "None"}
        return f"it holds {what.get(spec.kind, 'numbers')}, not arrays"
    nd = row_ndim(spec)
    if nd == 0:
        return "its rows are 0-d"
    if not codec.image:
        return None
    if spec.dtype != "|u1":
        return f"{codec.name} stores uint8 images, the rows are {np.dtype(spec.dtype).name}"
    channels = spec.shape[-1] if spec.kind in (FIXED, RAGGED) and nd == 3 else None
    allowed = (1, 3) if codec.name == "jpeg" else (1, 3, 4)
    if nd not in (2, 3) or (channels is not None and channels not in allowed):
        shape = tuple(spec.shape) if spec.kind == FIXED else f"{nd}-d"
        return (f"{codec.name} stores images of shape HxW or HxWx{'/'.join(map(str, allowed))}, "
                f"the rows are {shape}")
    return None
