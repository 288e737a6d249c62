"""The label files of a complete cache (``labels/<n>.npy`` or ``.list``): written
when a build completes, from the committed columns, for every ``in_memory_key``
whose column is not a raw fixed-size one (that label is a view of the column), and
read back by :func:`load_label_file`."""

from __future__ import annotations

import io
import os
from typing import Any

import numpy as np
import xxhash

from ...errors import CorruptCacheError, LabelError
from ..fsutil import atomic_write
from ..shards.codec import Encoder
from .committed import open_views, present_rows
from .files import map_fd
from .manifest import LABELS_DIR, Manifest, Schema
from .records import decode_row, encode_row
from .schema import FIXED


def write_labels(cache_dir: str, m: Manifest, schema: Schema, key_col: dict[Any, int], ends: dict[str, int],
                 encoder: Encoder, only: list[int] | None = None) -> dict[str, dict[str, Any]]:
    """Write the label files (of the keys numbered ``only``, or all) and return the
    manifest's ``labels`` entries."""
    from ..shards.labels import to_column

    out: dict[str, dict[str, Any]] = {}
    if not m.in_memory_keys:
        return out
    views = open_views(cache_dir, schema, ends, m.length, m.allow_pickle)
    os.makedirs(os.path.join(cache_dir, LABELS_DIR), exist_ok=True)
    for n, key in enumerate(m.in_memory_keys):
        if only is not None and n not in only:
            continue
        gid = key_col.get(key)
        present = present_rows(schema, gid, views, range(m.length)) if gid is not None else []
        if gid is None or len(present) != m.length:
            missing = min(set(range(m.length)) - set(present), default=0)
            raise LabelError(f"example {missing} has no in_memory_key {key!r}")
        spec = schema.columns[gid]
        if spec.kind == FIXED and spec.codec is None:  # (coded: decoded into a label file)
            out[str(key)] = {"column": gid}
            continue
        get = views[gid].get
        column = to_column(key, [get(r) for r in range(m.length)])
        if isinstance(column, np.ndarray):
            buf = io.BytesIO()
            np.save(buf, column, allow_pickle=False)
            data, rel, kind = buf.getvalue(), f"{LABELS_DIR}/{n}.npy", "array"
            extra = {"dtype": column.dtype.str, "shape": list(column.shape)}
        else:
            data, rel, kind, extra = encode_row(column, encoder), f"{LABELS_DIR}/{n}.list", "list", {}
        atomic_write(os.path.join(cache_dir, rel), data)
        out[str(key)] = {"file": rel, "kind": kind, "nbytes": len(data),
                         "xxh3": xxhash.xxh3_64_hexdigest(data), **extra}
    return out


def repair_labels(cache_dir: str, m: Manifest, schema: Schema, key_col: dict[Any, int], ends: dict[str, int],
                  encoder: Encoder) -> None:
    """Rewrite the label files of a complete cache that are missing or damaged; they
    must come out as the manifest records them."""
    broken = []
    for n, key in enumerate(m.in_memory_keys):
        entry = m.labels.get(str(key), {})
        if "file" not in entry:
            continue
        try:
            with open(os.path.join(cache_dir, entry["file"]), "rb") as f:
                ok = xxhash.xxh3_64_hexdigest(f.read()) == entry.get("xxh3")
        except OSError:
            ok = False
        if not ok:
            broken.append(n)
    if broken:
        labels = write_labels(cache_dir, m, schema, key_col, ends, encoder, only=broken)
        if any(labels[str(m.in_memory_keys[n])] != m.labels[str(m.in_memory_keys[n])] for n in broken):
            raise CorruptCacheError(
                f"the labels of {cache_dir} computed from its columns differ from its manifest: "
                "rebuild it with force_cache=True, keep_existing=False"
            )


def load_label_file(cache_dir: str, key: Any, entry: dict, fd: int | None, length: int, verify: bool) -> Any:
    """One label file (``labels/<n>.npy`` or ``.list``) described by its manifest entry."""
    rel = entry.get("file")
    path = os.path.join(cache_dir, str(rel))
    if fd is None:
        raise CorruptCacheError(f"label file {path} (key {key!r}) is missing")
    size = os.fstat(fd).st_size
    if size != entry.get("nbytes"):
        raise CorruptCacheError(
            f"label file {path} (key {key!r}) has {size} bytes, the manifest says {entry.get('nbytes')}"
        )
    mm = map_fd(fd, size)
    if verify and xxhash.xxh3_64_hexdigest(mm) != entry.get("xxh3"):
        raise CorruptCacheError(f"label file {path} (key {key!r}) fails its checksum")
    if entry.get("kind") == "list":
        values = decode_row(mm, 0, size, False, f"label file {path}")
        if not isinstance(values, list):
            raise CorruptCacheError(f"label file {path} (key {key!r}) is malformed")
        column: Any = values
    else:
        try:
            column = _npy_view(mm)
        except Exception as exc:
            raise CorruptCacheError(f"label file {path} (key {key!r}) is unreadable ({exc})") from exc
        if column.dtype.str != entry.get("dtype") or list(column.shape) != entry.get("shape"):
            raise CorruptCacheError(f"label file {path} (key {key!r}) does not match the manifest")
    if len(column) != length:
        raise CorruptCacheError(f"label {key!r} has {len(column)} values for {length} examples")
    return column


def _npy_view(buf: Any) -> np.ndarray:
    """A read-only array viewing the ``.npy`` bytes ``buf`` (no pickles, no copy)."""
    from numpy.lib import format as npy

    head = io.BytesIO(bytes(buf[:4096]) if len(buf) > 4096 else bytes(buf))
    version = npy.read_magic(head)
    read_header = npy.read_array_header_1_0 if version == (1, 0) else npy.read_array_header_2_0
    shape, fortran, dtype = read_header(head)
    if dtype.hasobject or fortran:
        raise ValueError("object or Fortran-ordered array")
    count = int(np.prod(shape, dtype=np.int64))
    return np.frombuffer(buf, dtype, count, head.tell()).reshape(shape)
