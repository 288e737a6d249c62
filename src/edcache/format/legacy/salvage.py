"""Recovering the members of a zip whose writer died before the central directory.

A zip is a sequence of *local file headers*, each followed by its member's data, and
ends with a *central directory* that ``zipfile`` needs to open it. A killed writer (say
edflow caching under SIGKILL) leaves the headers and data but no central directory.
:func:`iter_salvaged_members` scans for local headers and yields each member whose data
is complete and matches its CRC-32; a member cut off mid-write is skipped.
"""

from __future__ import annotations

import mmap
import os
import struct
import zlib
from collections.abc import Iterator

__all__ = ["iter_salvaged_members", "salvage_members"]

_LOCAL = b"PK\x03\x04"
_DESCRIPTOR = b"PK\x07\x08"
_SIGNATURES = (_LOCAL, b"PK\x01\x02", b"PK\x05\x06", b"PK\x06\x06")
# signature, version, flags, method, time, date, crc32, compressed, uncompressed, name len, extra len
_HEADER = struct.Struct("<4sHHHHHIIIHH")
_STORED, _DEFLATED = 0, 8
_BLOCK = 1 << 20


def _zip64_sizes(extra: bytes, csize: int, usize: int) -> tuple[int, int]:
    pos = 0
    while pos + 4 <= len(extra):
        tag, size = struct.unpack_from("<HH", extra, pos)
        if tag == 1:
            fields = extra[pos + 4 : pos + 4 + size]
            at = 0
            if usize == 0xFFFFFFFF and at + 8 <= len(fields):
                (usize,) = struct.unpack_from("<Q", fields, at)
                at += 8
            if csize == 0xFFFFFFFF and at + 8 <= len(fields):
                (csize,) = struct.unpack_from("<Q", fields, at)
            break
        pos += 4 + size
    return csize, usize


def _inflate(buf: mmap.mmap | bytes, start: int) -> tuple[bytes, int] | None:
    """Inflate a raw deflate stream at ``start``; (data, compressed length) or None if cut off."""
    d = zlib.decompressobj(-15)
    out = []
    pos = start
    try:
        while not d.eof and pos < len(buf):
            piece = buf[pos : pos + _BLOCK]
            out.append(d.decompress(piece))
            pos += len(piece)
    except zlib.error:
        return None
    if not d.eof:
        return None
    return b"".join(out), pos - start - len(d.unused_data)


def _member_at(buf: mmap.mmap | bytes, pos: int) -> tuple[str, bytes, int] | None:
    """Parse the member whose local header starts at ``pos``; (name, data, end) or None."""
    if pos + _HEADER.size > len(buf):
        return None
    _, _, flags, method, _, _, crc, csize, usize, nlen, xlen = _HEADER.unpack_from(buf, pos)
    start = pos + _HEADER.size + nlen + xlen
    if start > len(buf) or flags & 0x1 or method not in (_STORED, _DEFLATED):
        return None  # cut off, encrypted, or a compression edflow never used
    raw_name = bytes(buf[pos + _HEADER.size : pos + _HEADER.size + nlen])
    name = raw_name.decode("utf-8" if flags & 0x800 else "cp437")
    csize, usize = _zip64_sizes(bytes(buf[pos + _HEADER.size + nlen : start]), csize, usize)
    if flags & 0x8:  # sizes and CRC follow the data, in a data descriptor
        found = _data_with_descriptor(buf, start, method)
    else:
        found = _data_of_size(buf, start, method, csize, usize, crc)
    if found is None:
        return None
    data, end, crc = found
    if zlib.crc32(data) != crc:
        return None
    return name, data, end


def _data_with_descriptor(buf: mmap.mmap | bytes, start: int, method: int) -> tuple[bytes, int, int] | None:
    """(data, end, crc) of a member whose sizes and CRC follow its data."""
    if method != _DEFLATED:
        return None  # the end of stored data cannot be found without trusting a signature scan
    inflated = _inflate(buf, start)
    if inflated is None:
        return None
    data, clen = inflated
    end = start + clen
    if bytes(buf[end : end + 4]) == _DESCRIPTOR:
        end += 4
    for fmt in ("<III", "<IQQ"):  # classic, then zip64 descriptor
        if end + struct.calcsize(fmt) <= len(buf):
            crc, dcsize, dusize = struct.unpack_from(fmt, buf, end)
            if (dcsize, dusize) == (clen, len(data)):
                return data, end + struct.calcsize(fmt), crc
    return None


def _data_of_size(buf: mmap.mmap | bytes, start: int, method: int, csize: int, usize: int,
                  crc: int) -> tuple[bytes, int, int] | None:
    """(data, end, crc) of a member whose local header holds its sizes and ``crc``."""
    end = start + csize
    if end > len(buf):
        return None
    if method == _DEFLATED:
        inflated = _inflate(buf[start:end], 0)
        if inflated is None or inflated[1] != csize:
            return None
        data = inflated[0]
    else:
        data = bytes(buf[start:end])
        # A header written before its data (all sizes still 0) looks like an empty
        # stored member; accept that only if another record really follows.
        if csize == 0 and end < len(buf) and bytes(buf[end : end + 4]) not in _SIGNATURES:
            return None
    if len(data) != usize:
        return None
    return data, end, crc


def iter_salvaged_members(path: str) -> Iterator[tuple[str, bytes]]:
    """Yield ``(name, data)`` of every complete, CRC-valid member, in file order.

    Works whether or not the zip has a central directory (which is ignored). A name
    may be yielded more than once (edflow appends one ``labels.p`` per run).

    Parameters
    ----------
    path : str
        The (possibly truncated) zip file.
    """
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            return
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            pos = buf.find(_LOCAL)
            while pos >= 0:
                member = _member_at(buf, pos)
                if member is None:
                    pos = buf.find(_LOCAL, pos + 4)
                    continue
                name, data, end = member
                yield name, data
                pos = buf.find(_LOCAL, end)


def salvage_members(path: str) -> dict[str, bytes]:
    """Return every complete member of a zip, scanning local headers.

    Meant for zips without a central directory (a writer killed mid-run). Members cut
    off or failing their CRC-32 are left out; for a repeated name the last one wins,
    as ``zipfile`` does.

    Parameters
    ----------
    path : str
        The zip file.

    Returns
    -------
    dict[str, bytes]
        Member name to uncompressed bytes.
    """
    return dict(iter_salvaged_members(path))
