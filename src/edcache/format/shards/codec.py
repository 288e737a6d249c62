"""The safe example codec: msgpack for structure, raw aligned bytes for numpy arrays.

An example is packed into two parts:

* a msgpack *record* holding the structure and every small value, where numpy arrays,
  numpy scalars, tuples and integers beyond 64 bits are msgpack extension types;
* a list of *blobs*: the raw, C-contiguous bytes of each array, which the shard writer
  lays out aligned so that readers can return them as zero-copy views of a memory map.

Decoding never calls pickle (unless the cache was written with ``allow_pickle=True``
and the reader opts in again) and never imports anything named by the file: an
unknown extension code, a bad dtype string or an out-of-bounds offset raises
:class:`~edcache.errors.CorruptCacheError`.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable
from typing import Any

import msgpack
import numpy as np

from ...errors import CodecError, CorruptCacheError, UnsafePickleError
from .deferred import _DecodeState, _Deferred, _resolve_deferred

#: Alignment of array payloads inside a shard (enough for every numpy dtype).
ALIGN = 16

EXT_ARRAY = 1  # payload: msgpack [dtype str, shape list, absolute offset in the shard]
EXT_COLUMN = 2  # payload: column number (u16 LE); the row is the example's position
EXT_TUPLE = 3  # payload: msgpack array of the items
EXT_SCALAR = 4  # payload: u8 len, dtype str, raw bytes
EXT_BIGINT = 5  # payload: signed big-endian bytes of an int beyond 64 bits
EXT_PICKLE = 6  # payload: a pickle; only with allow_pickle on both ends
EXT_WRAPPED = 7  # payload: msgpack [tag, dtype str, shape list, offset]: a tensor or PIL image (see ..wrap)

#: dtype kinds the codec stores: bool, ints, floats, complex, str, bytes, datetime, timedelta.
STORABLE_KINDS = frozenset("biufcUSMm")

_INT_MIN, _UINT_MAX = -(2**63), 2**64 - 1

#: Tuples nested deeper than this are refused when writing and are a
#: :class:`~edcache.errors.CorruptCacheError` when reading. A tuple is a msgpack extension
#: whose payload is unpacked by a call of its own: left unchecked, a file with tuples
#: nested a few hundred deep exhausts the C stack of the reader (a segfault).
MAX_TUPLE_DEPTH = 100

#: Lists and dicts nested deeper than this (msgpack refuses 512 levels) are refused
#: when writing; reading them needs no limit of ours (msgpack unpacks them without
#: recursion and refuses what it cannot).
MAX_NESTING = 500

#: Tuples nested up to this depth are decoded recursively inside msgpack's extension
#: hook (each level costs ~40 KiB of C stack); deeper ones are decoded afterwards in a
#: loop, so a thread with a small stack can read any record edcache writes.
_EAGER_TUPLE_DEPTH = 8


def _unwrap(value: Any) -> tuple[str, np.ndarray] | None:
    """(tag, array) of a tensor, PIL image or :class:`..wrap.Tagged`; else None."""
    from .. import wrap

    if type(value) is wrap.Tagged:
        return value.tag, value.array
    return wrap.unwrap(value)


def _is_storable_dtype(dtype: np.dtype) -> bool:
    return dtype.kind in STORABLE_KINDS and dtype.fields is None and dtype.subdtype is None


def _describe(value: Any) -> str:
    if isinstance(value, np.ndarray):
        return f"numpy array of dtype {value.dtype}"
    return f"value of type {type(value).__module__}.{type(value).__qualname__}"


class Encoder:
    """Packs one example into a record plus blobs.

    Parameters
    ----------
    allow_pickle : bool
        Store values the codec does not know as pickles instead of raising.
    """

    def __init__(self, allow_pickle: bool = False) -> None:
        self.allow_pickle = allow_pickle
        self._blobs: list[memoryview] = []
        self._blob_offsets: list[int] = []
        self._base = 0
        self._tuple_depth = 0
        self._packer = msgpack.Packer(default=self._default, strict_types=True, use_bin_type=True)

    # -- public ---------------------------------------------------------------------
    def encode(
        self, obj: Any, base_offset: int, column_refs: dict[Any, int] | None = None
    ) -> tuple[bytes, list[tuple[int, memoryview]]]:
        """Pack ``obj``; array payloads are placed from ``base_offset`` on (aligned).

        Returns the record bytes and a list of ``(absolute offset, bytes)`` blobs.
        ``column_refs`` maps top-level keys to column numbers: those values are stored
        by the shard's columns and only referenced here.
        """
        self._blobs, self._blob_offsets, self._base = [], [], base_offset
        self._tuple_depth = 0
        if column_refs:
            obj = {
                k: msgpack.ExtType(EXT_COLUMN, column_refs[k].to_bytes(2, "little"))
                if k in column_refs
                else v
                for k, v in obj.items()
            }
        try:
            record = self._packer.pack(obj)
        except OverflowError:
            self._packer.reset()
            self._blobs, self._blob_offsets, self._tuple_depth = [], [], 0
            record = self._packer.pack(_widen_ints(obj))
        except BaseException:
            self._packer.reset()  # a failed pack leaves partial bytes in the packer's buffer
            raise
        return record, list(zip(self._blob_offsets, self._blobs, strict=False))

    @property
    def end_offset(self) -> int:
        """First free (unaligned) offset after the blobs of the last ``encode`` call."""
        if not self._blobs:
            return self._base
        return self._blob_offsets[-1] + self._blobs[-1].nbytes

    # -- msgpack hook -----------------------------------------------------------------
    def _default(self, value: Any) -> Any:
        if isinstance(value, np.ndarray) and _is_storable_dtype(value.dtype):
            # (np.ascontiguousarray would turn a 0-d array into shape (1,))
            arr = value if value.flags.c_contiguous else np.ascontiguousarray(value)
            offset = _align(self.end_offset)
            self._blobs.append(raw_bytes(arr))
            self._blob_offsets.append(offset)
            meta = msgpack.packb([arr.dtype.str, list(value.shape), offset])
            return msgpack.ExtType(EXT_ARRAY, meta)
        if isinstance(value, np.generic) and _is_storable_dtype(value.dtype):
            dt = value.dtype.str.encode()
            return msgpack.ExtType(EXT_SCALAR, bytes([len(dt)]) + dt + value.tobytes())
        if type(value) is tuple or type(value) is _TupleOf:
            return msgpack.ExtType(EXT_TUPLE, self._pack_nested(list(value)))
        if isinstance(value, dict):  # dict subclasses (OrderedDict, ...) are stored as dict
            return dict(value)
        if isinstance(value, (str, bytes, float)) and not isinstance(value, np.generic):
            # subclasses of builtins other than numpy scalars: store as the builtin
            for base in (str, bytes, float):
                if isinstance(value, base):
                    return base(value)  # type: ignore[arg-type]
        if isinstance(value, int) and not isinstance(value, bool):
            return int(value)
        if isinstance(value, list):
            return list(value)
        wrapped = _unwrap(value)
        if wrapped is not None:
            tag, arr = wrapped
            arr = arr if arr.flags.c_contiguous else np.ascontiguousarray(arr)
            offset = _align(self.end_offset)
            self._blobs.append(raw_bytes(arr))
            self._blob_offsets.append(offset)
            return msgpack.ExtType(EXT_WRAPPED, msgpack.packb([tag, arr.dtype.str, list(arr.shape), offset]))
        if self.allow_pickle:
            return msgpack.ExtType(EXT_PICKLE, pickle.dumps(value, protocol=4))
        raise TypeError(_describe(value))

    def _pack_nested(self, obj: Any) -> bytes:
        # a nested packer shares our blob list, so arrays inside tuples still go to blobs
        if self._tuple_depth >= MAX_TUPLE_DEPTH:
            raise ValueError(f"tuples nested more than {MAX_TUPLE_DEPTH} deep")
        self._tuple_depth += 1
        try:
            packer = msgpack.Packer(default=self._default, strict_types=True, use_bin_type=True)
            return packer.pack(obj)
        finally:
            self._tuple_depth -= 1


def raw_bytes(arr: np.ndarray) -> memoryview:
    """The bytes of a C-contiguous array, without copying (any dtype, any shape)."""
    if not arr.nbytes:
        return memoryview(b"")
    return memoryview(arr.reshape(-1).view(np.uint8))  # type: ignore[arg-type]


def _widen_ints(obj: Any, depth: int = 0) -> Any:
    """Replace ints msgpack cannot hold by EXT_BIGINT (slow path, rare)."""
    if depth > MAX_NESTING:
        raise ValueError(f"values nested more than {MAX_NESTING} deep")
    depth += 1
    if isinstance(obj, bool):
        return obj
    if isinstance(obj, int) and not isinstance(obj, np.generic):
        if _INT_MIN <= obj <= _UINT_MAX:
            return int(obj)
        nbytes = (obj.bit_length() + 8) // 8
        return msgpack.ExtType(EXT_BIGINT, obj.to_bytes(nbytes, "big", signed=True))
    if isinstance(obj, dict):
        return {k: _widen_ints(v, depth) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_widen_ints(v, depth) for v in obj]
    if type(obj) is tuple:
        # keep the tuple marker: pack items now, wrapped in EXT_TUPLE by a sentinel list
        return _TupleOf([_widen_ints(v, depth) for v in obj])
    return obj


class _TupleOf(list):
    """A list that the encoder must store as a tuple (used by the big-int path)."""


def _align(offset: int) -> int:
    return (offset + ALIGN - 1) // ALIGN * ALIGN


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def find_problem(obj: Any, allow_pickle: bool = False) -> tuple[tuple, Any, str] | None:
    """The first value the codec cannot store: ``(key path, value, what is wrong)``, or None.

    Finds values of types the codec does not know (unless ``allow_pickle``), str (also
    dict keys) that are not valid UTF-8, containers that contain themselves, and
    nesting beyond :data:`MAX_TUPLE_DEPTH` tuples or :data:`MAX_NESTING` levels. Walks
    without recursion, so any input gives an answer.
    """
    # each entry: (value, key path, nesting depth, tuple depth, ids of the containers
    # above, whether the last element of the path is a dict key to check first)
    stack: list[tuple[Any, tuple, int, int, frozenset, bool]] = [(obj, (), 0, 0, frozenset(), False)]
    while stack:
        value, path, depth, tuples, above, keyed = stack.pop()
        what = _key_problem(path[-1]) if keyed else None
        if what is not None:
            return path, path[-1], what
        if isinstance(value, (dict, list, tuple)):
            tuples += type(value) is tuple
            what = _container_problem(value, depth, tuples, above)
            if what is not None:
                return path, value, what
            inner = above | {id(value)}
            is_dict = isinstance(value, dict)
            items = list(value.items()) if isinstance(value, dict) else list(enumerate(value))
            for k, v in reversed(items):  # depth first, in order
                stack.append((v, (*path, k), depth + 1, tuples, inner, is_dict))
            continue
        what = _leaf_problem(value, allow_pickle)
        if what is not None:
            return path, value, what
    return None


def _key_problem(key: Any) -> str | None:
    if not isinstance(key, (str, int, bytes, float, bool)) and key is not None:
        return _describe(key)
    if isinstance(key, str) and not _is_utf8(key):
        return _NOT_UTF8
    return None


def _container_problem(value: Any, depth: int, tuples: int, above: frozenset) -> str | None:
    if id(value) in above:
        return f"a {type(value).__name__} that contains itself"
    if type(value) is tuple and tuples > MAX_TUPLE_DEPTH:
        return f"tuples nested more than {MAX_TUPLE_DEPTH} deep"
    if depth >= MAX_NESTING:
        return f"values nested more than {MAX_NESTING} deep"
    return None


def _leaf_problem(value: Any, allow_pickle: bool) -> str | None:
    if value is None or isinstance(value, (bytes, bool, int, float)):
        return None
    if isinstance(value, str):
        return None if _is_utf8(value) else _NOT_UTF8
    if isinstance(value, (np.ndarray, np.generic)) and _is_storable_dtype(value.dtype):
        return None
    try:
        if _unwrap(value) is not None:
            return None
    except TypeError as exc:  # a tensor or image edcache cannot convert
        return str(exc)
    return None if allow_pickle else _describe(value)


_NOT_UTF8 = (
    "str that is not valid UTF-8 (it holds a lone surrogate, as os.fsdecode gives for a "
    "file name that is not UTF-8)"
)


def find_unsupported(obj: Any, allow_pickle: bool = False, path: tuple = ()) -> tuple[tuple, Any] | None:
    """Return ``(key path, value)`` of the first value the codec cannot store, or None
    (see :func:`find_problem`)."""
    found = find_problem(obj, allow_pickle)
    if found is None:
        return None
    return path + found[0], found[1]


def format_key_path(path: tuple) -> str:
    """``('meta', 'calib')`` → ``'meta/calib'``."""
    return "/".join(str(p) for p in path)


def codec_error(index: int, example: Any, allow_pickle: bool, cause: BaseException) -> CodecError:
    """Build the error for an example the codec refused, naming index and key path."""
    found = find_problem(example, allow_pickle)
    if found is None:
        return CodecError(f"example {index}: cannot be stored by the safe codec: {cause}")
    path, value, what = found
    where = f"key '{format_key_path(path)}'" if path else "the example itself"
    if what == _NOT_UTF8:
        return CodecError(
            f"example {index}, {where}: cannot store a {what}. Store the name as bytes "
            "(os.fsencode), or repair it (text.encode('utf-8', 'surrogateescape')"
            ".decode('utf-8', 'replace'))."
        )
    if "nested" in what or "contains itself" in what:
        return CodecError(
            f"example {index}, {where}: cannot store {what}. The codec stores trees of dicts, "
            f"lists and tuples at most {MAX_NESTING} levels deep (tuples at most "
            f"{MAX_TUPLE_DEPTH}); flatten the value, or convert it to a numpy array."
        )
    from ..wrap import conversion_hint

    hint = conversion_hint(value)
    return CodecError(
        f"example {index}, {where}: cannot store {what}. The codec stores dicts, "
        "lists, tuples, str, bytes, int, float, bool, None, numpy arrays of numeric, bool, "
        "str or datetime dtype, numpy scalars, torch tensors and PIL images; "
        + (f"{hint}, or pass " if hint else "convert the value, or pass ")
        + "allow_pickle=True to store it as a pickle (then also required to read the cache)."
    )


# -- decoding -----------------------------------------------------------------------
_DTYPES: dict[str, np.dtype] = {}


def _dtype(s: str) -> np.dtype:
    dt = _DTYPES.get(s)
    if dt is None:
        try:
            dt = np.dtype(s)
        except (TypeError, ValueError) as exc:
            raise CorruptCacheError(f"invalid dtype {s!r} in record") from exc
        if not _is_storable_dtype(dt):
            raise CorruptCacheError(f"dtype {s!r} is not storable")
        _DTYPES[s] = dt
    return dt


class Decoder:
    """Unpacks records of one shard whose bytes are ``buffer`` (usually a memory map).

    ``columns[n](row)`` returns the value of column ``n`` for the example at ``row``.
    """

    def __init__(
        self,
        buffer: Any,
        columns: list[Callable[[int], Any]],
        allow_pickle: bool = False,
        where: str = "shard",
    ) -> None:
        self.buffer = buffer
        self.size = len(buffer)
        self.columns = columns
        self.allow_pickle = allow_pickle
        self.where = where

    def decode(self, record: bytes | memoryview, row: int) -> Any:
        """Unpack one record; ``row`` selects the example's row in the columns."""
        state = _DecodeState()
        hook = self._hook(row, state)
        try:
            value = msgpack.unpackb(record, ext_hook=hook, raw=False, strict_map_key=False)
            if state.deferred:
                value = _resolve_deferred(value, lambda d: self._expand(d, hook, state, row))
            return value
        except (CorruptCacheError, UnsafePickleError):
            raise
        except Exception as exc:  # msgpack raises several types on garbage
            raise CorruptCacheError(f"{self.where}: undecodable record {row}: {exc}") from exc

    def _expand(
        self, item: _Deferred, hook: Callable[[int, bytes], Any], state: _DecodeState, row: int
    ) -> list:
        """The items of a tuple whose decoding was deferred (their own deeper tuples may
        be deferred again)."""
        state.base, state.level = item.depth, 0
        items = msgpack.unpackb(item.data, ext_hook=hook, raw=False, strict_map_key=False)
        if not isinstance(items, list):
            raise CorruptCacheError(f"{self.where}: malformed tuple in record {row}")
        return items

    def _hook(self, row: int, state: _DecodeState | None = None) -> Callable[[int, bytes], Any]:
        if state is None:
            state = _DecodeState()

        def hook(code: int, data: bytes) -> Any:
            if code == EXT_TUPLE:
                depth = state.base + state.level + 1
                if depth > MAX_TUPLE_DEPTH:
                    raise CorruptCacheError(
                        f"{self.where}: record {row} has tuples nested more than {MAX_TUPLE_DEPTH} "
                        "deep, which edcache never writes: the file is damaged or crafted"
                    )
                if state.level >= _EAGER_TUPLE_DEPTH:  # no deeper on the C stack: later, in a loop
                    state.deferred = True
                    return _Deferred(bytes(data), depth)
                state.level += 1
                try:
                    items = msgpack.unpackb(data, ext_hook=hook, raw=False, strict_map_key=False)
                finally:
                    state.level -= 1
                if not isinstance(items, list):
                    raise CorruptCacheError(f"{self.where}: malformed tuple in record {row}")
                return tuple(items)
            if code == EXT_COLUMN:
                col = int.from_bytes(data, "little")
                if col >= len(self.columns):
                    raise CorruptCacheError(f"{self.where}: record {row} names missing column {col}")
                return self.columns[col](row)
            if code == EXT_ARRAY:
                dtype_str, shape, offset = msgpack.unpackb(data)
                dt = _dtype(dtype_str)
                count = 1
                for n in shape:
                    if not isinstance(n, int) or n < 0:
                        raise CorruptCacheError(f"{self.where}: bad shape {shape} in record {row}")
                    count *= n
                if not isinstance(offset, int) or offset < 0 or offset + count * dt.itemsize > self.size:
                    raise CorruptCacheError(
                        f"{self.where}: array of record {row} lies outside the file"
                    )
                return np.frombuffer(self.buffer, dt, count, offset).reshape(shape)
            if code == EXT_WRAPPED:
                try:
                    tag, dtype_str, shape, offset = msgpack.unpackb(data)
                except (ValueError, TypeError) as exc:
                    raise CorruptCacheError(f"{self.where}: malformed wrapped value in record {row}") from exc
                from ..wrap import stored_dtype, valid_tag, wrapper

                if not valid_tag(tag) or _dtype(dtype_str) != stored_dtype(tag) or not isinstance(shape, list):
                    raise CorruptCacheError(f"{self.where}: bad wrapped value {tag!r} in record {row}")
                arr = hook(EXT_ARRAY, msgpack.packb([dtype_str, shape, offset]))
                return wrapper(tag)(arr)
            if code == EXT_SCALAR:
                n = data[0]
                dt = _dtype(bytes(data[1 : 1 + n]).decode())
                raw = data[1 + n :]
                if len(raw) != dt.itemsize:
                    raise CorruptCacheError(f"{self.where}: bad scalar in record {row}")
                return np.frombuffer(raw, dt, 1)[0]
            if code == EXT_BIGINT:
                return int.from_bytes(data, "big", signed=True)
            if code == EXT_PICKLE:
                if not self.allow_pickle:
                    raise UnsafePickleError(
                        f"{self.where}: record {row} holds a pickled value; the cache was built "
                        "with allow_pickle=True. Pass allow_pickle=True to read it if you trust "
                        "the files (unpickling can run arbitrary code)."
                    )
                return pickle.loads(data)
            raise CorruptCacheError(f"{self.where}: unknown extension type {code} in record {row}")

        return hook
