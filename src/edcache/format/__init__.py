"""On-disk formats and the one place that decides which format a path holds.

* :mod:`edcache.format.shards`: the default format (a directory, ``docs/format.md``).
* :mod:`edcache.format.legacy`: edflow's zip of pickles and its folder variant.
"""

from __future__ import annotations

import os

from ..errors import CacheNotFoundError
from .base import CacheReader


def cache_paths(root: str, name: str) -> tuple[str, str]:
    """The new-format directory and the legacy zip path of cache ``name`` under ``root``."""
    base = os.path.join(root, "cached", name)
    return base, base + ".zip"


def open_reader(
    path: str, *, legacy: bool | None = None, verify: bool = False, allow_pickle: bool = False
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
        return ColumnarReader(path, verify=verify, allow_pickle=allow_pickle)
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
