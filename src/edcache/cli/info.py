"""``edcache info PATH``: what a cache holds."""

from __future__ import annotations

import os
from typing import Any

from ..format import open_reader
from ..format.base import CacheReader


def disk_usage(path: str) -> int:
    """Bytes of all files under ``path`` (or of the file itself)."""
    if os.path.isfile(path):
        return os.path.getsize(path)
    total = 0
    for folder, _dirs, files in os.walk(path):
        total += sum(os.path.getsize(os.path.join(folder, f)) for f in files)
    return total


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    raise AssertionError


def _committed_v2(path: str, manifest: Any) -> int:
    from ..format.columnar.log import read_log

    if manifest.complete:
        return int(manifest.num_chunks)
    state = read_log(path)
    return state.committed if state else 0


def _manifest_lines(lines: list[str], manifest: Any, complete: bool, committed: int) -> None:
    m = manifest
    lines.append(f"dataset:     {m.dataset or '?'}")
    lines.append(f"examples:    {m.length}")
    lines.append(f"chunk size:  {m.chunk_size} ({m.num_chunks} chunks)")
    if complete:
        lines.append("complete:    yes")
    else:
        lines.append(f"complete:    no ({committed} of {m.num_chunks} chunks committed)")
    pickles = "allowed" if m.allow_pickle else "none (safe codec only)"
    lines.append(f"pickles:     {pickles}")
    identity = m.identity
    if identity:
        import json

        try:
            doc = json.loads(identity)
            lines.append(f"identity:    class {doc.get('class')}, source {doc.get('source') or '?'}, "
                         f"version {doc.get('version') if doc.get('version') is not None else '-'}")
        except (ValueError, AttributeError):
            lines.append(f"identity:    {identity}")
    if m.fingerprint:
        lines.append(f"config:      {m.fingerprint}")
    codecs = getattr(m, "codecs", None)  # v2 manifests only
    if codecs:
        asked = ", ".join(f"{'*' if k is None else k}={c}" for k, c in codecs)
        lines.append(f"codecs:      {asked} (as built: per column below)")


def _stored(col: dict) -> str:
    """Codec, stored and raw bytes of one column (``raw, 1.0 MiB`` when stored raw)."""
    codec = col.get("codec")
    if codec is None:
        return f"raw, {_size(col['bytes'])}" if col["kind"] in ("fixed", "ragged", "varshape") else _size(col["bytes"])
    from ..format.columnar.codec_names import is_lossy

    raw = col.get("raw_bytes") or 0
    ratio = f"{col['bytes'] / raw:.3f}" if raw else "-"
    lossy = " (lossy)" if is_lossy(codec) else ""
    return f"{codec}{lossy}, {_size(col['bytes'])} stored of {_size(raw)} raw (ratio {ratio})"


def _format_lines(path: str, reader: CacheReader, columns: list | None) -> list[str]:
    """Which format the cache is in, and what its manifest records."""
    manifest = reader.manifest
    lines: list[str] = []
    if manifest is not None and columns is not None:
        lines.append("format:      edcache v2 (one file or two per column)")
        _manifest_lines(lines, manifest, reader.complete, _committed_v2(path, manifest))
    elif manifest is not None:
        from ..format.shards.manifest import read_commits

        packed = manifest.complete and manifest.packed is not None
        layout = "packed: one column-wise file" if packed else "one shard per chunk"
        lines.append(f"format:      edcache v1, read-only ({layout}; `edcache convert` rewrites it as v2)")
        done = manifest.num_chunks if manifest.complete else len(read_commits(path, manifest.num_chunks))
        _manifest_lines(lines, manifest, manifest.complete, done)
    else:
        lines.append(f"format:      edflow legacy ({type(reader).__name__})")
        lines.append(f"examples:    {len(reader)}")
        lines.append(f"complete:    {'yes' if reader.complete else 'no'}")
    return lines


def _column_lines(columns: list | None) -> list[str]:
    if columns is None:
        return []
    lines = ["columns:"]
    for col in columns:
        shape = "" if col["shape"] is None else " (" + ", ".join(map(str, col["shape"])) + ")"
        dtype = f" {col['dtype']}" if col["dtype"] else ""
        key = "-" if col["key"] is None else repr(col["key"])
        wrap = f" as {col['wrap']}" if col.get("wrap") else ""
        lines.append(f"  {key}: {col['kind']}{dtype}{shape}{wrap}, {_stored(col)}")
    return lines


def _label_lines(reader: CacheReader) -> list[str]:
    try:
        labels = reader.labels
    except KeyError:
        return ["labels:      (not written yet)"]
    if not labels:
        return ["labels:      (none)"]
    lines = ["labels:"]
    for key, column in labels.items():
        if hasattr(column, "dtype"):
            lines.append(f"  {key}: {column.dtype} {tuple(column.shape)}")  # type: ignore[union-attr]
        else:
            lines.append(f"  {key}: list of {len(column)} values")
    return lines


def describe(path: str, *, allow_pickle: bool = False) -> str:
    """A human-readable summary: length, size on disk, completeness, columns, label keys
    and dtypes (``allow_pickle``: open a cache built with ``allow_pickle=True``)."""
    path = path.rstrip(os.sep) or path
    with open_reader(path, allow_pickle=allow_pickle) as reader:
        columns = reader.columns()
        lines = [f"path:        {path}", *_format_lines(path, reader, columns)]
        lines.append(f"size:        {_size(disk_usage(path))}")
        lines += _column_lines(columns)
        lines += _label_lines(reader)
    return "\n".join(lines)
