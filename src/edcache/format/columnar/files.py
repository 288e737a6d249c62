"""Opening, mapping and removing cache files safely: regular files only, never through a link.

A FIFO, device or socket in place of a cache file would block a reader forever, and
a symbolic link would let a build delete or overwrite files outside the cache: both
are refused with :class:`~edcache.errors.CorruptCacheError` naming the entry.
"""

from __future__ import annotations

import contextlib
import mmap
import os
from typing import Any

from ...errors import CorruptCacheError
from ..fsutil import is_temp, open_fd, open_regular
from .manifest import COLUMNS_DIR, LABELS_DIR, Schema, owned_files

__all__ = ["check_no_links", "map_fd", "open_fd", "open_regular", "remove_strays", "unlink_if_present"]

def map_fd(fd: int, size: int) -> Any:
    """A read-only map of the first ``size`` bytes of ``fd`` (``b""`` when empty)."""
    if size <= 0:
        return b""
    return mmap.mmap(fd, size, access=mmap.ACCESS_READ)


def check_no_links(cache_dir: str) -> None:
    """Refuse a cache directory that is, or holds, a symbolic link or special file."""
    if os.path.islink(cache_dir.rstrip(os.sep)):
        raise CorruptCacheError(
            f"{cache_dir} is a symbolic link; edcache writes only into real directories "
            "(point root at the real folder)"
        )
    for folder in (cache_dir, os.path.join(cache_dir, "columns"), os.path.join(cache_dir, "labels"),
                   os.path.join(cache_dir, "shards")):
        if folder != cache_dir and os.path.islink(folder):
            raise CorruptCacheError(
                f"{folder} is a symbolic link; edcache never follows links out of a cache "
                "directory. Remove the link (and rebuild) or delete the cache."
            )
        if not os.path.isdir(folder):
            continue
        for entry in os.scandir(folder):
            if entry.is_symlink():
                raise CorruptCacheError(
                    f"{entry.path} is a symbolic link; edcache never follows links out of a "
                    "cache directory. Remove the link (and rebuild) or delete the cache."
                )
            if not entry.is_file(follow_symlinks=False) and not entry.is_dir(follow_symlinks=False):
                raise CorruptCacheError(f"{entry.path} is not a regular file (a FIFO, device or socket?); delete it")


def remove_strays(cache_dir: str, schema: Schema, labels: dict | None = None) -> None:
    """Delete every file of ``cache_dir`` the cache does not use (temporary files,
    files of rewritten columns, a format-v1 build's leftovers)."""
    keep = owned_files(schema, labels)
    for folder in ("", COLUMNS_DIR, LABELS_DIR, "shards"):
        path = os.path.join(cache_dir, folder) if folder else cache_dir
        if not os.path.isdir(path) or os.path.islink(path):
            continue
        for entry in os.scandir(path):
            rel = f"{folder}/{entry.name}" if folder else entry.name
            if entry.is_dir(follow_symlinks=False):
                continue
            if rel not in keep or is_temp(entry.name):
                unlink_if_present(entry.path)
    for folder in ("shards",):  # an old v1 layout's folder
        with contextlib.suppress(OSError):
            os.rmdir(os.path.join(cache_dir, folder))
    for name in ("packed.shard", "shards.idx"):
        unlink_if_present(os.path.join(cache_dir, name))


def unlink_if_present(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
