"""Encoded rows: one value stored with the safe codec (:mod:`..shards.codec`).

Byte layout of one row (what a ``record`` column holds per example, and what a
``labels/<n>.list`` file holds for a whole label list)::

    0      4            4+L        align16(4+L)                         row end
    | u32 L | msgpack (L) | zeros    | array payloads, each 16-aligned  | zeros to 16 |

Array extension types in the msgpack record give offsets relative to the start of
the payload area (``align16(4 + L)``), so a row can be encoded in a worker without
knowing where it will land; rows are padded to 16 bytes, so every row of a record
column starts 16-aligned and its arrays come back as aligned zero-copy views.
"""

from __future__ import annotations

from typing import Any

from ...errors import CorruptCacheError
from ..shards.codec import ALIGN, Decoder, Encoder

_HEAD = 4


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def encode_row(value: Any, encoder: Encoder) -> bytes:
    """The bytes of one row holding ``value`` (raises ``TypeError``/``ValueError`` for
    values the codec cannot store; the caller names the example and key)."""
    record, blobs = encoder.encode(value, 0)
    head = _align(_HEAD + len(record))
    parts: list[Any] = [len(record).to_bytes(4, "little"), record, bytes(head - _HEAD - len(record))]
    pos = 0
    for offset, blob in blobs:
        if offset > pos:
            parts.append(bytes(offset - pos))
        parts.append(blob)
        pos = offset + blob.nbytes
    parts.append(bytes(_align(pos) - pos))
    return b"".join(parts)


def decode_row(buffer: Any, start: int, stop: int, allow_pickle: bool, where: str) -> Any:
    """Decode the row at ``buffer[start:stop]`` (arrays are views of ``buffer``)."""
    if stop - start < _HEAD:
        raise CorruptCacheError(f"{where}: row of {stop - start} bytes is too short")
    view = memoryview(buffer)[start:stop]
    length = int.from_bytes(view[:_HEAD], "little")
    head = _align(_HEAD + length)
    if head > len(view):
        raise CorruptCacheError(f"{where}: record length {length} exceeds its row")
    decoder = Decoder(view[head:], [], allow_pickle, where=where)
    return decoder.decode(view[_HEAD : _HEAD + length], 0)
