"""Opening and mapping cache files safely: regular files only, never through a link.

A FIFO, device or socket in place of a cache file would block a reader forever, and
a symbolic link would let a build delete or overwrite files outside the cache: both
are refused with :class:`~edcache.errors.CorruptCacheError` naming the entry.
"""

from __future__ import annotations

import mmap
import os
import stat
from typing import IO, Any

from ...errors import CorruptCacheError

_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_NONBLOCK = getattr(os, "O_NONBLOCK", 0)


def open_fd(path: str, flags: int = os.O_RDONLY, mode: int = 0o644) -> int:
    """``os.open`` that refuses links and anything but a regular file.

    ``FileNotFoundError`` passes through (callers decide what a missing file means).
    """
    try:
        fd = os.open(path, flags | _NOFOLLOW | _NONBLOCK, mode)
    except OSError as exc:
        if isinstance(exc, FileNotFoundError):
            raise
        if os.path.islink(path):
            raise CorruptCacheError(
                f"{path} is a symbolic link; edcache never follows links inside a cache "
                "(replace it by the real file, or delete the cache)"
            ) from None
        raise
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise CorruptCacheError(f"{path} is not a regular file (a FIFO, device or socket?); delete it")
    if _NONBLOCK and flags & os.O_ACCMODE == os.O_RDONLY:
        os.set_blocking(fd, True)
    return fd


def open_regular(path: str) -> IO[bytes]:
    """``open(path, "rb")`` for regular files only (see :func:`open_fd`)."""
    return os.fdopen(open_fd(path), "rb")


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
