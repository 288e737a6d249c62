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


def describe(path: str) -> str:
    """A human-readable summary: length, size on disk, completeness, label keys and dtypes."""
    path = path.rstrip(os.sep) or path
    reader = open_reader(path)
    manifest = getattr(reader, "manifest", None)
    lines = [f"path:        {path}"]
    if manifest is not None:
        from ..format.shards.manifest import read_commits

        packed = manifest.complete and manifest.packed is not None
        layout = "packed: one column-wise file" if packed else "one shard per chunk"
        lines.append(f"format:      edcache v1 ({layout})")
        lines.append(f"dataset:     {manifest.dataset or '?'}")
        lines.append(f"examples:    {manifest.length}")
        lines.append(f"chunk size:  {manifest.chunk_size} ({manifest.num_chunks} chunks)")
        if manifest.complete:
            lines.append("complete:    yes")
        else:
            done = len(read_commits(path, manifest.num_chunks))
            lines.append(f"complete:    no ({done} of {manifest.num_chunks} chunks committed)")
        lines.append(f"pickles:     {'allowed' if manifest.allow_pickle else 'none (safe codec only)'}")
    else:
        lines.append(f"format:      edflow legacy ({type(reader).__name__})")
        lines.append(f"examples:    {len(reader)}")
        lines.append(f"complete:    {'yes' if reader.complete else 'no'}")
    lines.append(f"size:        {_size(disk_usage(path))}")
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
