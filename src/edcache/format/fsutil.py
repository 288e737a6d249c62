"""Small file-system helpers for crash-safe writes."""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import stat
import uuid
from typing import IO, Any

from ..errors import CorruptCacheError


def fsync_file(path: str) -> None:
    """fsync an existing file (or directory) by name."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@functools.lru_cache(maxsize=1)
def _syncfs() -> Any:
    try:
        return ctypes.CDLL(None, use_errno=True).syncfs
    except (OSError, AttributeError):  # not Linux / no libc symbol
        return None


def sync_filesystem(path: str) -> bool:
    """Flush every file of the file system holding ``path`` with one call (Linux
    ``syncfs``). Returns False if that is unavailable or reports an error; the caller
    then fsyncs file by file (which raises the error)."""
    syncfs = _syncfs()
    if syncfs is None:
        return False
    fd = os.open(path, os.O_RDONLY)
    try:
        return syncfs(fd) == 0
    finally:
        os.close(fd)


def fsync_dir(path: str) -> None:
    """Make a rename or a new file in directory ``path`` durable."""
    fsync_file(path)


def temp_name(final_path: str, tag: str = "") -> str:
    """A name next to ``final_path`` unique to this attempt (process, host and time)."""
    head, tail = os.path.split(final_path)
    return os.path.join(head, f".tmp-{tail}{tag}-{uuid.uuid4().hex}")


def write_file(path: str, data: bytes, fsync: bool = True) -> None:
    """Write ``data`` to ``path`` (``path`` must not be a final name), fsync'd if asked."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        if fsync:
            os.fsync(f.fileno())


def atomic_write(path: str, data: bytes) -> None:
    """Replace ``path`` by ``data`` atomically: temp file, fsync, rename, fsync dir."""
    tmp = temp_name(path)
    try:
        write_file(tmp, data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(os.path.dirname(path) or ".")


def is_temp(name: str) -> bool:
    """Whether a directory entry is a leftover temporary file of :func:`temp_name`."""
    return name.startswith(".tmp-")


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
