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
from typing import Any, Callable

import msgpack
import numpy as np

from ...errors import CodecError, CorruptCacheError, UnsafePickleError

#: Alignment of array payloads inside a shard (enough for every numpy dtype).
ALIGN = 16

EXT_ARRAY = 1  # payload: msgpack [dtype str, shape list, absolute offset in the shard]
EXT_COLUMN = 2  # payload: column number (u16 LE); the row is the example's position
EXT_TUPLE = 3  # payload: msgpack array of the items
EXT_SCALAR = 4  # payload: u8 len, dtype str, raw bytes
EXT_BIGINT = 5  # payload: signed big-endian bytes of an int beyond 64 bits
EXT_PICKLE = 6  # payload: a pickle; only with allow_pickle on both ends

#: dtype kinds the codec stores: bool, ints, floats, complex, str, bytes, datetime, timedelta.
STORABLE_KINDS = frozenset("biufcUSMm")

_INT_MIN, _UINT_MAX = -(2**63), 2**64 - 1


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
            self._blobs, self._blob_offsets = [], []
            record = self._packer.pack(_widen_ints(obj))
        return record, list(zip(self._blob_offsets, self._blobs))

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
                    return base(value)
        if isinstance(value, int) and not isinstance(value, bool):
            return int(value)
        if isinstance(value, list):
            return list(value)
        if self.allow_pickle:
            return msgpack.ExtType(EXT_PICKLE, pickle.dumps(value, protocol=4))
        raise TypeError(_describe(value))

    def _pack_nested(self, obj: Any) -> bytes:
        # a nested packer shares our blob list, so arrays inside tuples still go to blobs
        packer = msgpack.Packer(default=self._default, strict_types=True, use_bin_type=True)
        return packer.pack(obj)


def raw_bytes(arr: np.ndarray) -> memoryview:
    """The bytes of a C-contiguous array, without copying (any dtype, any shape)."""
    if not arr.nbytes:
        return memoryview(b"")
    return memoryview(arr.reshape(-1).view(np.uint8))


def _widen_ints(obj: Any) -> Any:
    """Replace ints msgpack cannot hold by EXT_BIGINT (slow path, rare)."""
    if isinstance(obj, bool):
        return obj
    if isinstance(obj, int) and not isinstance(obj, np.generic):
        if _INT_MIN <= obj <= _UINT_MAX:
            return int(obj)
        nbytes = (obj.bit_length() + 8) // 8
        return msgpack.ExtType(EXT_BIGINT, obj.to_bytes(nbytes, "big", signed=True))
    if isinstance(obj, dict):
        return {k: _widen_ints(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_widen_ints(v) for v in obj]
    if type(obj) is tuple:
        # keep the tuple marker: pack items now, wrapped in EXT_TUPLE by a sentinel list
        return _TupleOf([_widen_ints(v) for v in obj])
    return obj


class _TupleOf(list):
    """A list that the encoder must store as a tuple (used by the big-int path)."""


def _align(offset: int) -> int:
    return (offset + ALIGN - 1) // ALIGN * ALIGN


def find_unsupported(obj: Any, allow_pickle: bool = False, path: tuple = ()) -> tuple[tuple, Any] | None:
    """Return ``(key path, value)`` of the first value the codec cannot store, or None."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            if not isinstance(k, (str, int, bytes, float, bool)) and k is not None:
                return path + (k,), k
            found = find_unsupported(v, allow_pickle, path + (k,))
            if found:
                return found
        return None
    if isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            found = find_unsupported(v, allow_pickle, path + (i,))
            if found:
                return found
        return None
    if obj is None or isinstance(obj, (str, bytes, bool, int, float)):
        return None
    if isinstance(obj, (np.ndarray, np.generic)) and _is_storable_dtype(obj.dtype):
        return None
    return None if allow_pickle else (path, obj)


def format_key_path(path: tuple) -> str:
    """``('meta', 'calib')`` → ``'meta/calib'``."""
    return "/".join(str(p) for p in path)


def codec_error(index: int, example: Any, allow_pickle: bool, cause: BaseException) -> CodecError:
    """Build the error for an example the codec refused, naming index and key path."""
    found = find_unsupported(example, allow_pickle)
    if found is None:
        return CodecError(f"example {index}: cannot be stored by the safe codec: {cause}")
    path, value = found
    where = f"key '{format_key_path(path)}'" if path else "the example itself"
    return CodecError(
        f"example {index}, {where}: cannot store {_describe(value)}. The codec stores dicts, "
        "lists, tuples, str, bytes, int, float, bool, None, numpy arrays of numeric, bool, "
        "str or datetime dtype and numpy scalars; convert the value, or pass "
        "allow_pickle=True to store it as a pickle (then also required to read the cache)."
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
        hook = self._hook(row)
        try:
            return msgpack.unpackb(record, ext_hook=hook, raw=False, strict_map_key=False)
        except (CorruptCacheError, UnsafePickleError):
            raise
        except Exception as exc:  # msgpack raises several types on garbage
            raise CorruptCacheError(f"{self.where}: undecodable record {row}: {exc}") from exc

    def _hook(self, row: int) -> Callable[[int, bytes], Any]:
        def hook(code: int, data: bytes) -> Any:
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
            if code == EXT_SCALAR:
                n = data[0]
                dt = _dtype(bytes(data[1 : 1 + n]).decode())
                raw = data[1 + n :]
                if len(raw) != dt.itemsize:
                    raise CorruptCacheError(f"{self.where}: bad scalar in record {row}")
                return np.frombuffer(raw, dt, 1)[0]
            if code == EXT_TUPLE:
                return tuple(msgpack.unpackb(data, ext_hook=hook, raw=False, strict_map_key=False))
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
