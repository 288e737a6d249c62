"""Packing a finished cache: all chunk shards merged into one column-wise shard file.

Chunk shards are the unit of a crash-safe commit while a build runs, but reading from
thousands of them costs a memory map, a parse and some Python state per shard in
every reader process, and a batch of random indices touches one shard per index. When
every chunk has the same all-column schema (the common case: every example is a dict
with the same keys and value types), the coordinator therefore merges them at
completion into ``packed.shard``: a shard file in the same format (``docs/format.md``)
that covers examples ``0 .. length-1``, whose columns are the chunks' columns
concatenated. Reading an example is then one row lookup per field in one memory map,
and a batch is one gather per field.

The merge is a sequential copy: a first pass checks every chunk shard against its
committed checksum and reads its footer (chunks whose schemas differ keep the
chunk-shard layout), a second copies its rows into place.
"""

from __future__ import annotations

import os
from typing import Any, Callable

import msgpack
import numpy as np
import xxhash

from ...errors import CorruptCacheError
from ..fsutil import fsync_dir, temp_name
from .manifest import PACKED, Manifest, shard_path
from .shard import BYTES, END_MAGIC, MAGIC, NONE, STR, VERSION, checksum, read_footer

#: Columns of the packed file start on a page boundary, so rows of page-sized arrays
#: do not straddle one more page than they must.
_PAGE = 4096


def _page_align(pos: int) -> int:
    return -(-pos // _PAGE) * _PAGE


def _schema(footer: dict) -> tuple | None:
    if footer.get("keys") is None or footer.get("index") is not None:
        return None
    return tuple(
        (c["key"], c["kind"], c.get("dtype"), tuple(c.get("shape") or ())) for c in footer["columns"]
    )


def pack_chunks(
    cache_dir: str,
    manifest: Manifest,
    commits: dict[int, tuple[int, str]],
    progress: Callable[[int], Any] | None = None,
) -> dict[str, Any] | None:
    """Merge every committed chunk shard of ``cache_dir`` into ``packed.shard``.

    Returns the manifest's ``packed`` entry ``{"nbytes", "xxh3"}``, or None (nothing
    written) when the chunks do not share one all-column schema. The file is written
    under a temporary name, fsync'd and renamed; the chunk shards are left in place.

    Raises
    ------
    CorruptCacheError
        If a chunk shard no longer matches its committed checksum; that shard is
        deleted, so the next build computes its chunk again.
    """
    n, chunks = manifest.length, range(manifest.num_chunks)
    if n == 0:
        return None
    # 1. every chunk's footer: one schema for all?  and the string columns' sizes
    schema = None
    var_sizes: list[list[int]] = []  # per chunk: data bytes of each str/bytes column
    for chunk in chunks:
        data = _read_verified(cache_dir, chunk, commits[chunk], manifest)
        path = shard_path(cache_dir, chunk)
        try:
            footer = read_footer(path, len(data), data)
            this = _schema(footer)
            sizes = [
                int.from_bytes(data[c["offset"] + 8 * footer["count"] : c["offset"] + 8 * footer["count"] + 8], "little")
                for c in footer["columns"] if c["kind"] in (STR, BYTES)
            ]
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            # its checksum matched what the worker wrote: a footer we cannot use is a bug
            raise CorruptCacheError(f"shard {path} has a footer packing cannot use ({exc})") from exc
        if this is None or (schema is not None and this != schema):
            return None
        schema = this
        var_sizes.append(sizes)
    assert schema is not None

    # 2. the layout: fixed-size columns, then the offsets of each str/bytes column,
    #    then their data
    pos = len(MAGIC) + 8
    columns: list[dict[str, Any]] = []
    var_totals = np.sum(np.array(var_sizes, dtype=np.int64).reshape(len(chunks), -1), axis=0).tolist()
    row_bytes: list[int] = []
    for key, kind, dtype, shape in schema:
        desc: dict[str, Any] = {"key": key, "kind": kind}
        size = 0
        if kind not in (STR, BYTES, NONE):
            size = np.dtype(dtype).itemsize * int(np.prod(shape, dtype=np.int64))
            pos = _page_align(pos)
            desc.update(dtype=dtype, shape=list(shape), offset=pos)
            pos += size * n
        row_bytes.append(size)
        columns.append(desc)
    var_columns = [d for d in columns if d["kind"] in (STR, BYTES)]
    for desc in var_columns:
        pos = _page_align(pos)
        desc["offset"] = pos
        pos += 8 * (n + 1)
    for desc, total in zip(var_columns, var_totals):
        desc["data"] = pos
        pos += total
    footer_bytes = msgpack.packb(
        {"v": VERSION, "start": 0, "count": n, "keys": [d["key"] for d in columns],
         "columns": columns, "index": None, "labels": None},
        use_bin_type=True,
    )
    size = pos + len(footer_bytes) + 16

    # 3. copy every chunk's rows into place
    final = os.path.join(cache_dir, PACKED)
    tmp = temp_name(final)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.ftruncate(fd, size)  # unwritten gaps (alignment) read as zeros
        os.pwrite(fd, MAGIC, 0)
        var_base = [0] * len(var_columns)
        for desc in var_columns:
            os.pwrite(fd, bytes(8), desc["offset"])  # offsets[0] = 0
        for chunk in chunks:
            _copy_chunk(cache_dir, chunk, commits[chunk], manifest, columns, row_bytes, var_columns,
                        var_base, fd)
            if progress is not None:
                progress(manifest.chunk(chunk).size)
        os.pwrite(fd, footer_bytes + len(footer_bytes).to_bytes(8, "little") + END_MAGIC, pos)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        os.unlink(tmp)
        raise
    os.close(fd)
    digest = _hash_file(tmp)
    os.replace(tmp, final)
    fsync_dir(cache_dir)
    return {"nbytes": size, "xxh3": digest}


def _read_verified(cache_dir: str, chunk: int, commit: tuple[int, str], manifest: Manifest) -> bytes:
    """The bytes of a chunk shard, checked against its commit (deleted if damaged)."""
    path = shard_path(cache_dir, chunk)
    nbytes, digest = commit
    with open(path, "rb") as f:
        data = f.read()
    if len(data) != nbytes or checksum(data) != digest:
        os.unlink(path)  # so that the next build computes this chunk again
        task = manifest.chunk(chunk)
        raise CorruptCacheError(
            f"shard {path} (examples {task.start}..{task.stop - 1}) was damaged after it was "
            "committed; it was deleted. Run the build again to compute that chunk anew."
        )
    return data


def _copy_chunk(cache_dir, chunk, commit, manifest, columns, row_bytes, var_columns, var_base, fd) -> None:
    path = shard_path(cache_dir, chunk)
    nbytes = commit[0]
    with open(path, "rb") as f:  # checked in the first pass; the build lock keeps it as it was
        data = f.read()
    footer = read_footer(path, nbytes, data)
    start, count = footer["start"], footer["count"]
    view = memoryview(data)
    v = 0
    for desc, src, rb in zip(columns, footer["columns"], row_bytes):
        kind = desc["kind"]
        if kind == NONE:
            continue
        if kind in (STR, BYTES):
            bounds = np.frombuffer(data, "<u8", count + 1, src["offset"])
            base = var_base[v]
            os.pwrite(fd, (bounds[1:] + np.uint64(base)).astype("<u8").tobytes(), desc["offset"] + 8 * (start + 1))
            os.pwrite(fd, view[src["data"] : src["data"] + int(bounds[-1])], desc["data"] + base)
            var_base[v] = base + int(bounds[-1])
            v += 1
        else:
            os.pwrite(fd, view[src["offset"] : src["offset"] + rb * count], desc["offset"] + rb * start)


def _hash_file(path: str) -> str:
    h = xxhash.xxh3_64()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()
