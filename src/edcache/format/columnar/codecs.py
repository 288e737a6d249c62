"""Per-column codecs of format v2: each row of an array column compressed on its own.

A *coded* column keeps its kind (``fixed``, ``ragged``, ``varshape``), dtype, shape
and wrap, which describe the decoded rows; its ``codec`` (``zstd:3``, ``lz4``,
``png``, ``jpeg:90``, ``webp:90``, ``webp:lossless``) says how each row is stored.
``.data`` holds one encoded blob per row (zstd frames carry their content size and
a checksum of the content, so a damaged zstd row never decodes to wrong values); ``.index`` one u64 row
``(byte offset, byte length, dim 0, …)`` per row, whatever the kind (so a promotion
between array kinds never rewrites the rows). Reading row ``r`` decodes that blob and
nothing else; a damaged blob is a :class:`~edcache.errors.CorruptCacheError`.

Encoding runs in the build workers (:func:`apply_codec`, :func:`coded_parts`); the
libraries are imported on first use (``pip install 'edcache[codecs]'``). Codec strings
and the ``codecs=`` argument are parsed in :mod:`.codec_names`; which columns a codec
can take is :func:`.schema.unfit_column`.
"""

from __future__ import annotations

import io
import struct
import threading
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import numpy as np

from ...errors import CodecError, CorruptCacheError, MissingExtraError
from .codec_names import (  # noqa: F401  (re-exported: the codec API in one import)
    LIBRARIES,
    Codec,
    choice_for,
    is_lossy,
    normalize_codecs,
    parse_codec,
    valid_codecs_doc,
)
from .schema import ARRAY_KINDS, FIXED, RAGGED, ColumnSpec, row_ndim, unfit_column

#: a global (``codecs="zstd"``) or ``auto`` codec is kept for a column only when the
#: first chunk holding it is stored in at most this fraction of its raw bytes
MAX_STORED_FRACTION = 0.9
#: ``auto`` picks ``png`` over ``zstd`` only when it stores at most this fraction of
#: zstd's bytes (PNG decodes about 20x slower)
PNG_OVER_ZSTD = 0.75
#: a row that claims to decode to more bytes than this is damaged
MAX_ROW_BYTES = 1 << 36
EXTRA = "pip install 'edcache[codecs]'"
_PACKAGES = {"zstandard": "zstandard", "lz4.block": "lz4", "PIL.Image": "pillow", "simplejpeg": "simplejpeg"}
_IMAGE_MODES = {2: "L", 1: "L", 3: "RGB", 4: "RGBA"}  # by channels (2: an HxW row)


# -- which columns and rows a codec takes -------------------------------------------------
def unfit_row(shape: tuple, codec: Codec) -> str | None:
    """Why ``codec`` cannot store one row of ``shape`` (image codecs only; None: it can)."""
    if not codec.image:
        return None
    allowed = (1, 3) if codec.name == "jpeg" else (1, 3, 4)
    limit = {"jpeg": 65500, "webp": 16383, "png": 1 << 30}[codec.name]
    if len(shape) == 3 and shape[2] not in allowed:
        return f"{codec.name} stores HxWx{'/'.join(map(str, allowed))} images, this row is {shape}"
    if not all(1 <= d <= limit for d in shape[:2]):
        return f"{codec.name} stores images of 1..{limit} pixels a side, this row is {shape}"
    return None


# -- libraries ------------------------------------------------------------------------------
_local = threading.local()


def _module(name: str) -> Any:
    import importlib

    mod = LIBRARIES[name]
    try:
        return importlib.import_module(mod)
    except ImportError:
        package = _PACKAGES[mod]
        raise MissingExtraError(
            f"the codec {name!r} needs the package {package!r}, which is not installed: {EXTRA}"
        ) from None


def require(codec: Codec) -> None:
    """Import the codec's library now (``MissingExtraError`` naming the extra if absent)."""
    _module(codec.name)


def _zstd_compressor(level: int) -> Any:
    cache = _local.__dict__.setdefault("zc", {})
    if level not in cache:  # one per thread: zstandard's contexts are not thread-safe
        cache[level] = _module("zstd").ZstdCompressor(
            level=level, write_content_size=True, write_checksum=True, write_dict_id=False, threads=0)
    return cache[level]


def _zstd_decompressor() -> Any:
    if not hasattr(_local, "zd"):
        _local.zd = _module("zstd").ZstdDecompressor()
    return _local.zd


# -- one row ------------------------------------------------------------------------------
def encode(codec: Codec, row: np.ndarray) -> bytes:
    """One row's bytes (``row`` C-contiguous; image rows already checked by :func:`unfit_row`)."""
    if row.size == 0 and not codec.image:
        return b""
    if codec.name == "zstd":
        return _zstd_compressor(codec.level).compress(row.tobytes())  # type: ignore[arg-type]
    if codec.name == "lz4":
        return _module("lz4").compress(row.tobytes(), mode="default", store_size=False)
    if codec.name == "jpeg":
        gray = row.ndim == 2 or row.shape[2] == 1
        pixels = np.ascontiguousarray(row.reshape(*row.shape[:2], 1) if gray else row)
        return _module("jpeg").encode_jpeg(pixels, quality=codec.level, colorspace="GRAY" if gray else "RGB",
                                           colorsubsampling="420")
    image = _module("png")
    pixels = row[:, :, 0] if row.ndim == 3 and row.shape[2] == 1 else row
    img = image.fromarray(np.ascontiguousarray(pixels))
    buf = io.BytesIO()
    if codec.name == "png":
        img.save(buf, format="PNG", compress_level=6)
    else:
        if img.mode == "L":
            img = img.convert("RGB")
        if codec.level is None:
            img.save(buf, format="WEBP", lossless=True, exact=True, quality=80, method=4)
        else:
            img.save(buf, format="WEBP", quality=codec.level, method=4)
    return buf.getvalue()


def decode(codec: Codec, blob: Any, shape: tuple, dtype: np.dtype, out: np.ndarray | None = None) -> np.ndarray:
    """The row of ``shape`` and ``dtype`` that ``blob`` holds (into ``out`` if given).
    Any problem raises (the caller turns it into a ``CorruptCacheError``)."""
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if nbytes > MAX_ROW_BYTES:
        raise ValueError(f"a row of {nbytes} bytes")
    arr: np.ndarray | None
    if nbytes == 0 and not codec.image:
        if len(blob):
            raise ValueError("bytes stored for an empty row")
        arr = np.empty(shape, dtype)
    elif codec.name == "zstd":
        zstd = _module("zstd")
        if zstd.frame_content_size(blob) != nbytes:
            raise ValueError(f"the frame holds {zstd.frame_content_size(blob)} bytes, the row {nbytes}")
        raw = _zstd_decompressor().decompress(blob, max_output_size=nbytes)
        arr = np.frombuffer(raw, dtype, count=len(raw) // dtype.itemsize) if len(raw) == nbytes else None
    elif codec.name == "lz4":
        raw = _module("lz4").decompress(blob, uncompressed_size=nbytes)
        arr = np.frombuffer(raw, dtype, count=len(raw) // dtype.itemsize) if len(raw) == nbytes else None
    elif codec.name == "jpeg":
        return _decode_jpeg(blob, shape, out)
    else:
        arr = _decode_pillow(codec, blob, shape)
    if arr is None or arr.size * arr.itemsize != nbytes:
        raise ValueError(f"decodes to another size than the row's {nbytes} bytes")
    arr = arr.reshape(shape)
    if out is not None:
        out[...] = arr
        return out
    return arr


def _decode_jpeg(blob: Any, shape: tuple, out: np.ndarray | None) -> np.ndarray:
    jpeg = _module("jpeg")
    h, w, space, _ = jpeg.decode_jpeg_header(blob)
    gray = len(shape) == 2 or shape[2] == 1
    if (h, w) != tuple(shape[:2]) or (space == "Gray") != gray:
        raise ValueError(f"a {h}x{w} {space} image, the row is {shape}")
    target = None if out is None else out.reshape(h, w, 1 if gray else 3)
    arr = jpeg.decode_jpeg(blob, colorspace="GRAY" if gray else "RGB", strict=True, buffer=target)
    return arr.reshape(shape) if out is None else out


def _decode_pillow(codec: Codec, blob: Any, shape: tuple) -> np.ndarray:
    image = _module("png")
    img = image.open(io.BytesIO(bytes(blob)), formats=["PNG" if codec.name == "png" else "WEBP"])
    channels = 2 if len(shape) == 2 else shape[2]
    mode = _IMAGE_MODES[channels]
    want = ("RGB" if mode == "L" else mode) if codec.name == "webp" else mode
    if img.size != (shape[1], shape[0]) or img.mode != want:  # checked before anything is decoded
        raise ValueError(f"a {img.size[1]}x{img.size[0]} {img.mode} image, the row is {shape}")
    img.load()
    if img.mode != mode:
        img = img.convert(mode)  # gray stored as RGB in WebP: exact for lossless
    return np.asarray(img)


# -- a chunk's column: raw parts <-> coded parts ---------------------------------------------
def raw_rows(spec: ColumnSpec, parts: list[Any], count: int) -> Iterator[np.ndarray]:
    """Each row of a chunk's raw parts of an array column (what :func:`.chunk.column_parts`
    builds for a column without codec), absent rows as zeros or empty."""
    if spec.kind == FIXED:
        yield from parts[0]
    elif spec.kind == RAGGED:
        data, ends = parts
        start = 0
        for end in ends.tolist():
            yield data[start:end]
            start = end
    else:
        data, index = parts
        dt = spec.np_dtype
        for off, *shape in index.tolist():
            yield np.frombuffer(data, dt, int(np.prod(shape, dtype=np.int64)), off).reshape(shape)


def coded_parts(spec: ColumnSpec, raw: list[Any], rows: list[int], count: int, start: int | None = None) -> list[Any]:
    """``[blobs, index]`` of a chunk of the coded column ``spec`` from its raw parts;
    ``rows``: the present rows (the others store nothing). ``start`` names examples."""
    codec = parse_codec(spec.codec)
    nd = row_ndim(spec)
    index = np.zeros((count, 2 + nd), dtype="<u8")
    present = set(rows)
    blobs, pos = [], 0
    for r, row in enumerate(raw_rows(spec, raw, count)):
        index[r, 0] = pos
        if r not in present:
            continue
        why = unfit_row(row.shape, codec)
        if why is not None:
            where = f"example {start + r}" if start is not None else f"row {r} of a chunk"
            raise CodecError(f"{where}, field {spec.key!r}: cannot store it as {codec.text}: {why}")
        blob = encode(codec, np.ascontiguousarray(row))
        index[r, 1] = len(blob)
        index[r, 2:] = row.shape
        blobs.append(blob)
        pos += len(blob)
    return [b"".join(blobs), index]


def apply_codec(spec: ColumnSpec, raw: list[Any], rows: list[int], count: int,
                choice: tuple[str, bool], start: int) -> tuple[ColumnSpec, list[Any]]:
    """The spec and parts of a chunk's column under the ``codecs=`` choice for it (in
    the worker). An explicit codec that cannot store the column is a ``CodecError``
    naming the field; a default (or ``auto``) one is used only where it fits and the
    chunk's coded bytes are at most :data:`MAX_STORED_FRACTION` of its raw bytes."""
    text, explicit = choice
    if explicit and text != "auto":
        why = unfit_column(spec, parse_codec(text))
        if why is not None:
            raise CodecError(
                f"examples {start}..{start + count - 1}, field {spec.key!r}: codec {text!r} cannot "
                f"store this column: {why}. Name another codec for it, or leave it raw."
            )
        return replace(spec, codec=text), coded_parts(replace(spec, codec=text), raw, rows, count, start)
    best = _smallest(spec, raw, rows, count, ["zstd:3", "png"] if text == "auto" else [text], start)
    raw_size = sum(p.nbytes if isinstance(p, np.ndarray) else len(p) for p in raw[:1])
    if best is None or len(best[1][0]) > MAX_STORED_FRACTION * raw_size:
        return spec, raw
    return best


def _smallest(spec: ColumnSpec, raw: list[Any], rows: list[int], count: int, candidates: list[str],
              start: int) -> tuple[ColumnSpec, list[Any]] | None:
    """The coded spec and parts of the candidate that fits and stores the chunk smallest
    (``png`` only when at most :data:`PNG_OVER_ZSTD` of the others' bytes)."""
    best: tuple[ColumnSpec, list[Any]] | None = None
    if not rows:
        return None
    for text in candidates:
        if unfit_column(spec, parse_codec(text)) is not None:
            continue
        coded = replace(spec, codec=text)
        try:
            parts = coded_parts(coded, raw, rows, count, start)
        except CodecError:
            continue  # a row png cannot take (say 5 channels): not png
        if best is None or len(parts[0]) < (PNG_OVER_ZSTD if text == "png" else 1.0) * len(best[1][0]):
            best = (coded, parts)
    return best


def same_rows(a: ColumnSpec, b: ColumnSpec) -> bool:
    """Whether coded columns ``a`` and ``b`` store rows the same way (a promotion between
    them keeps the files: only the kind's description changes)."""
    return a.codec is not None and a.codec == b.codec and a.dtype == b.dtype and a.kind in ARRAY_KINDS \
        and b.kind in ARRAY_KINDS and row_ndim(a) == row_ndim(b)


# -- reading --------------------------------------------------------------------------------
class CodedRows:
    """Decoding rows of one coded column from its mapped ``data`` and ``index``."""

    def __init__(self, spec: ColumnSpec, data: Any, index: Any, rows: int, where: str) -> None:
        self.spec, self.rows, self.where = spec, rows, where
        self.codec = parse_codec(spec.codec)
        require(self.codec)
        self.nd = row_ndim(spec)
        self.width = 8 * (2 + self.nd)
        if index is None or len(index) < rows * self.width:
            have = 0 if index is None else len(index)
            raise self.bad(f"index file has {have} bytes, {rows * self.width} needed for {rows} rows")
        self.data = memoryview(data) if len(data) else b""
        self.size = len(data)
        self.index = index
        self.unpack = struct.Struct(f"<{2 + self.nd}Q").unpack_from
        self.dtype = spec.np_dtype

    def bad(self, what: str) -> CorruptCacheError:
        return CorruptCacheError(f"{self.where} is damaged: {what}")

    def locate(self, r: int) -> tuple[int, int, tuple]:
        """(offset, length, shape) of row ``r``, checked against the data and the kind."""
        if not 0 <= r < self.rows:
            raise self.bad(f"row {r} of {self.rows}")
        off, length, *shape = self.unpack(self.index, self.width * r)
        spec = self.spec
        if off + length > self.size:
            raise self.bad(f"row {r}: bytes {off}..{off + length} outside the data")
        if (spec.kind == FIXED and tuple(shape) != spec.shape) or \
                (spec.kind == RAGGED and tuple(shape[1:]) != spec.shape):
            raise self.bad(f"row {r}: shape {tuple(shape)} does not fit the column")
        return off, length, tuple(shape)

    def get(self, r: int, out: np.ndarray | None = None) -> np.ndarray:
        off, length, shape = self.locate(r)
        try:
            return decode(self.codec, self.data[off:off + length], shape, self.dtype, out)
        except Exception as exc:
            raise self.bad(f"row {r} does not decode as {self.codec.text} "
                           f"({type(exc).__name__}: {exc})") from None

    def shapes(self, rows: list[int]) -> list[tuple]:
        return [self.locate(r)[2] for r in rows]

    def raw_nbytes(self) -> int:
        """Bytes of the decoded rows (what the column would take raw)."""
        if not self.rows:
            return 0
        table = np.frombuffer(self.index, "<u8", self.rows * (2 + self.nd)).reshape(self.rows, 2 + self.nd)
        counts = np.prod(table[:, 2:].astype(np.float64), axis=1)
        return int(counts.sum()) * self.dtype.itemsize


def coded_gather(coded: CodedRows, wanted: np.ndarray) -> np.ndarray | list[np.ndarray]:
    """The decoded rows ``wanted``: one preallocated ``(n, *shape)`` array when their
    shapes agree, else a list."""
    order = wanted.tolist()
    shapes = coded.shapes(order)
    if not order or any(s != shapes[0] for s in shapes):
        return [coded.get(r) for r in order]
    out = np.empty((len(order), *shapes[0]), coded.dtype)
    for i, r in enumerate(order):
        coded.get(r, out[i])
    return out
