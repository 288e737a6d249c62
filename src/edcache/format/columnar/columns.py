"""Reading one column of format v2 from its mapped files: a row, or a batch of rows.

A :class:`ColumnView` is built from the column's spec and the bytes of its data and
index files (memory maps, or any buffer); every offset read from an index is checked
against the data before it is used, so a damaged index raises
:class:`~edcache.errors.CorruptCacheError` and never reads outside the file.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any

import numpy as np

from ...errors import CorruptCacheError
from .records import decode_row
from .schema import BYTES, FIXED, NONE, RAGGED, RECORD, STR, VARSHAPE, ColumnSpec

_PAIR = struct.Struct("<QQ")


class ColumnView:
    """Rows ``0 .. rows-1`` of one column.

    Parameters
    ----------
    spec : ColumnSpec
        What the column holds.
    data, index : buffer
        The bytes of the column's files (``index`` only for indexed kinds).
    rows : int
        Rows available (the committed part of the column).
    where : str
        Names the column in error messages.
    """

    def __init__(self, spec: ColumnSpec, data: Any, index: Any, rows: int, *,
                 allow_pickle: bool = False, where: str = "column", pil: str = "image") -> None:
        self.spec, self.rows, self.where = spec, rows, where
        self.data, self.index = data, index
        self.allow_pickle = allow_pickle
        self.pil = pil
        #: the column as one array ``(rows, *shape)`` for fixed columns, else None
        self.array: np.ndarray | None = None
        #: the decoder of a coded column (see :mod:`.codecs`), else None
        self.coded: Any = None
        get = self._make_getter()
        if spec.wrap is not None:  # tensors (copies of the row) or PIL images
            from ..wrap import fixed_tensor_getter, wrapper

            fast = fixed_tensor_getter(spec.wrap, self.array) if self.array is not None and spec.shape else None
            if fast is not None:
                get = fast
            else:
                conv, raw = wrapper(spec.wrap, pil), get
                def get(r):
                    return conv(raw(r))
        self.get: Callable[[int], Any] = get

    def _bad(self, what: str) -> CorruptCacheError:
        return CorruptCacheError(f"{self.where} is damaged: {what}")

    def _need(self, buf: Any, nbytes: int, what: str) -> None:
        if buf is None or len(buf) < nbytes:
            have = 0 if buf is None else len(buf)
            raise self._bad(f"{what} has {have} bytes, {nbytes} needed for {self.rows} rows")

    def _make_getter(self) -> Callable[[int], Any]:
        spec, n, kind = self.spec, self.rows, self.spec.kind
        if spec.codec is not None:  # one encoded blob per row, decoded on each read
            from .codecs import CodedRows

            self.coded = CodedRows(spec, self.data, self.index, n, self.where)
            return self.coded.get
        if kind == NONE:
            return lambda r: None
        if n == 0 and kind != FIXED:  # nothing committed yet: the files may still be empty
            def get_nothing(r: int) -> Any:
                raise self._bad(f"row {r} of 0")
            return get_nothing
        if kind == FIXED:
            dt = spec.np_dtype
            self._need(self.data, n * spec.row_bytes, "data file")
            count = n * int(np.prod(spec.shape, dtype=np.int64))
            arr = np.frombuffer(self.data, dt, count).reshape((n, *spec.shape))
            self.array = arr
            if spec.py in ("int", "float", "bool"):
                return arr.item  # a Python int / float / bool
            return arr.__getitem__
        if kind == VARSHAPE:
            return self._varshape_getter()
        self._need(self.index, 8 * (n + 1), "index file")
        idx, pair = self.index, _PAIR.unpack_from
        if kind == RAGGED:
            row_bytes = spec.row_bytes
            items = len(self.data) // row_bytes if row_bytes else 2**62
            if row_bytes:
                per_item = int(np.prod(spec.shape, dtype=np.int64))
                flat = np.frombuffer(self.data, spec.np_dtype, items * per_item).reshape((items, *spec.shape))

            def get_ragged(r: int) -> np.ndarray:
                a, b = pair(idx, 8 * r)
                if not a <= b <= items:
                    raise self._bad(f"row {r}: items {a}..{b} outside the data")
                if not row_bytes:
                    return np.zeros((b - a, *spec.shape), spec.np_dtype)
                return flat[a:b]
            return get_ragged
        data = self.data
        size = len(data)
        if kind == STR:
            def get_str(r: int) -> str:
                a, b = pair(idx, 8 * r)
                if not a <= b <= size:
                    raise self._bad(f"row {r}: bytes {a}..{b} outside the data")
                try:
                    return data[a:b].decode()
                except UnicodeDecodeError as exc:
                    raise self._bad(f"row {r}: invalid UTF-8 ({exc})") from None
            return get_str
        if kind == BYTES:
            def get_bytes(r: int) -> bytes:
                a, b = pair(idx, 8 * r)
                if not a <= b <= size:
                    raise self._bad(f"row {r}: bytes {a}..{b} outside the data")
                return bytes(data[a:b])
            return get_bytes
        if kind == RECORD:
            allow, where = self.allow_pickle, self.where

            def get_record(r: int) -> Any:
                a, b = pair(idx, 8 * r)
                if not a <= b <= size:
                    raise self._bad(f"row {r}: bytes {a}..{b} outside the data")
                return decode_row(data, a, b, allow, f"{where}, row {r}")
            return get_record
        raise self._bad(f"unknown kind {kind!r}")

    def _varshape_getter(self) -> Callable[[int], np.ndarray]:
        spec, n = self.spec, self.rows
        width = 8 * (1 + spec.ndim)
        self._need(self.index, n * width, "index file")
        row = struct.Struct(f"<{1 + spec.ndim}Q").unpack_from
        dt, itemsize, data, idx = spec.np_dtype, spec.np_dtype.itemsize, self.data, self.index
        size = len(data)

        def get_varshape(r: int) -> np.ndarray:
            off, *shape = row(idx, width * r)
            count = 1
            for d in shape:
                count *= d
            if off + count * itemsize > size:
                raise self._bad(f"row {r}: array of shape {tuple(shape)} at {off} outside the data")
            return np.frombuffer(data, dt, count, off).reshape(shape)
        return get_varshape

    def gather(self, rows: np.ndarray) -> Any:
        """The values at ``rows``: one array ``(len(rows), ...)`` for fixed columns and
        for variable arrays whose shapes agree, else a list."""
        wrap = self.spec.wrap
        if self.spec.codec is not None:
            from .codecs import coded_gather

            batch = coded_gather(self.coded, rows)
            if wrap is None:
                return batch
            from ..wrap import stack_wrapped, wrapper

            if isinstance(batch, np.ndarray):
                return stack_wrapped(wrap, batch, self.pil)
            return [wrapper(wrap, self.pil)(a) for a in batch]
        if self.array is not None:
            out = self.array.take(rows, axis=0)
            if wrap is None:
                return out
            from ..wrap import stack_wrapped

            return stack_wrapped(wrap, out, self.pil)
        if wrap is not None:
            from ..wrap import stack_wrapped, wrapper

            raw = self._make_getter()
            arrays = [raw(r) for r in rows.tolist()]
            if arrays and all(a.shape == arrays[0].shape for a in arrays):
                return stack_wrapped(wrap, np.stack(arrays), self.pil)
            conv = wrapper(wrap, self.pil)
            return [conv(a) for a in arrays]
        get = self.get
        values = [get(r) for r in rows.tolist()]
        if self.spec.kind in (RAGGED, VARSHAPE) and values:
            shape = values[0].shape
            if all(v.shape == shape for v in values):
                return np.stack(values)
        return values
