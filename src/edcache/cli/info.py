"""``edcache info PATH``: what a cache holds."""

from __future__ import annotations

import os

from ..format import open_reader


def disk_usage(path: str) -> int:
    """Bytes of all files under ``path`` (or of the file itself)."""
    if os.path.isfile(path):
        return os.path.getsize(path)
    total = 0
    for folder, _dirs, files in os.walk(path):
        total += sum(os.path.getsize(os.path.join(folder, f)) for f in files)
    return total


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    raise AssertionError


def _committed_v2(path: str, manifest: object) -> int:
    from ..format.columnar.log import read_log

    if getattr(manifest, "complete", False):
        return manifest.num_chunks  # type: ignore[attr-defined]
    state = read_log(path)
    return state.committed if state else 0


def _manifest_lines(lines: list[str], manifest: object, complete: bool, committed: int) -> None:
    m = manifest
    lines.append(f"dataset:     {m.dataset or '?'}")  # type: ignore[attr-defined]
    lines.append(f"examples:    {m.length}")  # type: ignore[attr-defined]
    lines.append(f"chunk size:  {m.chunk_size} ({m.num_chunks} chunks)")  # type: ignore[attr-defined]
    if complete:
        lines.append("complete:    yes")
    else:
        lines.append(f"complete:    no ({committed} of {m.num_chunks} chunks committed)")  # type: ignore[attr-defined]
    pickles = "allowed" if m.allow_pickle else "none (safe codec only)"  # type: ignore[attr-defined]
    lines.append(f"pickles:     {pickles}")
    identity = getattr(m, "identity", None)
    if identity:
        import json

        try:
            doc = json.loads(identity)
            lines.append(f"identity:    class {doc.get('class')}, source {doc.get('source') or '?'}, "
                         f"version {doc.get('version') if doc.get('version') is not None else '-'}")
        except (ValueError, AttributeError):
            lines.append(f"identity:    {identity}")
    if getattr(m, "fingerprint", None):
        lines.append(f"config:      {m.fingerprint}")  # type: ignore[attr-defined]
    if getattr(m, "codecs", None):
        asked = ", ".join(f"{'*' if k is None else k}={c}" for k, c in m.codecs)  # type: ignore[attr-defined]
        lines.append(f"codecs:      {asked} (as built: per column below)")


def _stored(col: dict) -> str:
    """Codec, stored and raw bytes of one column (``raw, 1.0 MiB`` when stored raw)."""
    codec = col.get("codec")
    if codec is None:
        return f"raw, {_size(col['bytes'])}" if col["kind"] in ("fixed", "ragged", "varshape") else _size(col["bytes"])
    from ..format.columnar.codecs import is_lossy

    raw = col.get("raw_bytes") or 0
    ratio = f"{col['bytes'] / raw:.3f}" if raw else "-"
    lossy = " (lossy)" if is_lossy(codec) else ""
    return f"{codec}{lossy}, {_size(col['bytes'])} stored of {_size(raw)} raw (ratio {ratio})"


def describe(path: str, *, allow_pickle: bool = False) -> str:
    """A human-readable summary: length, size on disk, completeness, columns, label keys
    and dtypes (``allow_pickle``: open a cache built with ``allow_pickle=True``)."""
    path = path.rstrip(os.sep) or path
    reader = open_reader(path, allow_pickle=allow_pickle)
    manifest = getattr(reader, "manifest", None)
    lines = [f"path:        {path}"]
    if manifest is not None and hasattr(reader, "columns"):
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
    lines.append(f"size:        {_size(disk_usage(path))}")
    if hasattr(reader, "columns"):
        lines.append("columns:")
        for col in reader.columns():
            shape = "" if col["shape"] is None else " (" + ", ".join(map(str, col["shape"])) + ")"
            dtype = f" {col['dtype']}" if col["dtype"] else ""
            key = "-" if col["key"] is None else repr(col["key"])
            wrap = f" as {col['wrap']}" if col.get("wrap") else ""
            lines.append(f"  {key}: {col['kind']}{dtype}{shape}{wrap}, {_stored(col)}")
    try:
        labels = reader.labels
    except KeyError:
        labels = None
    if labels is None:
        lines.append("labels:      (not written yet)")
    elif not labels:
        lines.append("labels:      (none)")
    else:
        lines.append("labels:")
        for key, column in labels.items():
            if hasattr(column, "dtype"):
                lines.append(f"  {key}: {column.dtype} {tuple(column.shape)}")
            else:
                lines.append(f"  {key}: list of {len(column)} values")
    reader.close()
    return "\n".join(lines)
