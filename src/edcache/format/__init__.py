"""On-disk formats and the one place that decides which format a path holds.

* :mod:`edcache.format.shards`: the default format (a directory, ``docs/format.md``).
* :mod:`edcache.format.legacy`: edflow's zip of pickles and its folder variant.
"""

from __future__ import annotations

import os

from ..errors import CacheNotFoundError, DatasetInterfaceError
from .base import CacheReader


def check_cache_name(name: object) -> str:
    """Return ``name`` if it can name a cache under ``<root>/cached``, else raise.

    A name must be one plain path component: not empty, not ``.`` or ``..`` (the cache
    would be written into ``<root>`` itself or above it, and a rebuild would delete
    what is there), without a path separator or a NUL.

    Raises
    ------
    DatasetInterfaceError
        If the name is not such a string.
    """
    seps = {os.sep, "/"} | ({os.altsep} if os.altsep else set())
    if (
        not isinstance(name, str)
        or name in ("", ".", "..")
        or any(sep in name for sep in seps)
        or "\x00" in name
    ):
        raise DatasetInterfaceError(
            f"the dataset's name {name!r} cannot name a cache: the cache goes to "
            "<root>/cached/<name>, so name must be a non-empty string that is not '.' or '..' "
            "and contains no path separator ('/') or NUL. Choose another name (e.g. "
            "'faces-256'), or give an explicit path with PathCachedDataset(dataset, path)."
        )
    return name


def cache_paths(root: str, name: str) -> tuple[str, str]:
    """The new-format directory and the legacy zip path of cache ``name`` under ``root``.

    Raises :class:`~edcache.errors.DatasetInterfaceError` for a name that is not one
    plain path component (see :func:`check_cache_name`).
    """
    base = os.path.join(root, "cached", check_cache_name(name))
    return base, base + ".zip"


def cache_name(path: str) -> str:
    """The cache name a path implies: its last component without ``.zip``."""
    name = os.path.basename(os.fspath(path).rstrip(os.sep))
    return name[:-4] if name.endswith(".zip") else name


def open_reader(
    path: str, *, legacy: bool | None = None, verify: bool = False, allow_pickle: bool = False,
    pil: str = "image",
) -> CacheReader:
    """Open the cache at ``path`` (a directory, or a ``.zip`` for edflow's layout).

    ``legacy=None`` opens whatever format is there; ``True`` insists on edflow's zip or
    folder layout; ``False`` on a directory (new format, or an edflow examples folder).
    """
    from .columnar import ColumnarReader
    from .columnar.manifest import peek_version
    from .shards import ShardCacheReader, is_shard_cache

    if path.endswith(".zip"):
        if legacy is False:
            raise CacheNotFoundError(f"{path} is a zip cache; open it with _legacy=True or None")
        if not os.path.isfile(path):
            raise CacheNotFoundError(f"no cache at {path}")
        from .legacy import LegacyZipReader

        return LegacyZipReader(path, allow_pickle=allow_pickle)
    if is_shard_cache(path):
        if peek_version(path) == 1:  # format v1 (read-only)
            return ShardCacheReader(path, verify=verify, allow_pickle=allow_pickle)
        return ColumnarReader(path, verify=verify, allow_pickle=allow_pickle, pil=pil)
    if os.path.isdir(path):
        from .legacy import LegacyFolderReader, is_legacy_folder

        if is_legacy_folder(path):
            return LegacyFolderReader(path, allow_pickle=allow_pickle)
    raise CacheNotFoundError(f"no cache at {path}")


def find_cache(root: str, name: str, legacy: bool | None = None) -> str | None:
    """The path of the existing cache ``name`` under ``root`` (new format first), or None."""
    directory, zip_path = cache_paths(root, name)
    candidates = {None: [directory, zip_path], True: [zip_path, directory], False: [directory]}[legacy]
    for path in candidates:
        if path.endswith(".zip") and os.path.isfile(path):
            return path
        if not path.endswith(".zip") and os.path.isdir(path) and os.listdir(path):
            return path
    return None


def remove_unused_cache_dir(cache_dir: str) -> bool:
    """Remove ``cache_dir`` if a build left it without any committed work.

    Called after a build that created the directory failed: it then holds an
    incomplete manifest, a commit log without chunk records, column files of nothing
    committed (perhaps temporary files) and nothing else. Anything else found there (a
    committed chunk, a file edcache does not write, a symbolic link) keeps the whole
    directory as it is. Returns whether it was removed; never raises for a file-system
    error (the directory is then simply left).
    """
    from .columnar.log import read_log
    from .columnar.manifest import read_manifest

    try:
        if os.path.islink(cache_dir) or not os.path.isdir(cache_dir):
            return False
        manifest = read_manifest(cache_dir)
        state = read_log(cache_dir)
        if manifest.complete or state is None or state.committed or state.invalid:
            return False
        entries = _unused_entries(cache_dir)
        if entries is None:
            return False
        _remove_unused(cache_dir, entries)
        return True
    except Exception:  # best effort cleanup after a failure (damaged files too)
        return False


def _unused_entries(cache_dir: str) -> set[str] | None:
    """The entries of a cache directory without committed work, if it holds only files a
    build writes before its first commit; None if it holds anything else."""
    import re

    from .columnar.manifest import COLUMNS_DIR, COMMITS, LABELS_DIR, MANIFEST
    from .fsutil import is_temp

    ours = re.compile(r"^\d{4}(\.\d+)?\.(data|index)$")
    entries = set(os.listdir(cache_dir))
    if not entries <= {MANIFEST, COMMITS, COLUMNS_DIR, LABELS_DIR} | {e for e in entries if is_temp(e)}:
        return None
    for sub in (os.path.join(cache_dir, d) for d in (COLUMNS_DIR, LABELS_DIR) if d in entries):
        if os.path.islink(sub) or not os.path.isdir(sub):
            return None
        if not all(is_temp(name) or ours.match(name) for name in os.listdir(sub)):
            return None
    return entries


def _remove_unused(cache_dir: str, entries: set[str]) -> None:
    from .columnar.manifest import COLUMNS_DIR, LABELS_DIR, MANIFEST

    for sub in (os.path.join(cache_dir, d) for d in (COLUMNS_DIR, LABELS_DIR) if d in entries):
        for name in os.listdir(sub):
            os.unlink(os.path.join(sub, name))
        os.rmdir(sub)
    for name in sorted(entries - {COLUMNS_DIR, LABELS_DIR, MANIFEST}):
        os.unlink(os.path.join(cache_dir, name))
    os.unlink(os.path.join(cache_dir, MANIFEST))  # last: until here it is a valid empty cache
    os.rmdir(cache_dir)
