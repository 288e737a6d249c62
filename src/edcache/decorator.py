"""``@cachable``: a decorator that caches the dataset a function returns at a path, and
:class:`PathCachedDataset`, the cache at an explicit path it returns.

The arguments of the call are recorded with the cache (in its manifest, or in edflow's
side files ``path.p`` / ``pathparameters.p`` beside a zip), so a call with other
arguments is refused instead of returning the examples of the first.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable
from typing import Any

from .building.ensure import lock_path
from .cached import CachedDataset
from .errors import CacheMismatchError, CacheNotFoundError, EdcacheError
from .format import open_reader

#: The options of ``cachable`` that opening an existing cache takes.
_READ_OPTIONS = ("verify", "allow_pickle", "transform", "pil")


class PathCachedDataset(CachedDataset):
    """A :class:`CachedDataset` stored at an explicit ``path`` (used by :func:`cachable`).

    ``path`` is a directory for the new format, or a file ending in ``.zip`` for edflow's
    layout. With ``dataset=None`` an existing cache at ``path`` is opened. The dataset
    needs no ``root`` or ``name``: the path says where the cache goes. For a zip, the
    length is written to ``path + ".p"`` once the cache is complete, as edflow's
    ``PathCachedDataset`` does (edflow's sign that the zip is complete).
    """

    def __init__(self, dataset: Any, path: str, **kwargs: Any) -> None:
        path = os.fspath(path)
        if dataset is None:
            kwargs.setdefault("_root", os.path.dirname(path))
            read = {k: v for k, v in kwargs.items() if k in ("verify", "allow_pickle", "transform", "pil", "_root")}
            super().__init__(None, _path=path, _existing=True, **read)
            if self._legacy:  # edflow's cachable recorded the length in path + ".p"
                from .format.legacy import read_cachable_length

                recorded = read_cachable_length(path, allow_pickle=self.allow_pickle)
                if recorded is not None:
                    self._length = recorded
            return
        super().__init__(dataset, _path=path, **kwargs)
        if self._legacy:
            from .format.legacy.cachable import read_cachable_length, write_length_marker

            try:
                recorded = read_cachable_length(path, allow_pickle=self.allow_pickle)
            except EdcacheError:
                recorded = None
            if recorded != len(self):
                write_length_marker(path, len(self))



def _read_options(options: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in options.items() if k in _READ_OPTIONS}


def _canonical(value: Any) -> Any:
    """A JSON-able, address-free description of an argument (for cache keys)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_canonical(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _canonical(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if hasattr(value, "__fspath__"):
        return os.fspath(value)
    return repr(value)


def parameters_fingerprint(args: tuple, kwargs: dict) -> str:
    """The string ``cachable`` records for the arguments a cache was built from."""
    return json.dumps({"args": _canonical(list(args)), "kwargs": _canonical(kwargs)}, sort_keys=True)


def _build_running(cache_path: str) -> bool:
    """Whether another process holds the build lock of the cache at ``cache_path``."""
    from filelock import FileLock, Timeout

    cache_path = os.path.abspath(cache_path)
    if not os.path.isdir(os.path.dirname(cache_path)):
        return False
    lock = FileLock(lock_path(cache_path))
    try:
        lock.acquire(timeout=0)
    except (Timeout, RuntimeError):  # RuntimeError: held by this very thread
        return True
    lock.release()
    return False


def _cachable_zip(
    fn: Callable[..., Any], path: str, args: tuple, kwargs: dict, params: str, options: dict
) -> Any:
    """``cachable`` on an edflow zip: edflow's side files ``path.p`` and ``pathparameters.p``.

    The arguments are recorded before the first chunk is computed. While another process
    builds the zip (its lock is held) and ``path.p`` does not exist yet, the call is
    edflow's worker mode: it returns ``fn(*recorded args)``, uncached. Otherwise an
    interrupted build resumes if the arguments are the recorded ones.
    """
    from .format.legacy import read_cachable_length, read_cachable_parameters
    from .format.legacy.cachable import write_parameters
    from .format.legacy.zip_writer import PARTIAL_SUFFIX

    allow_pickle = options.get("allow_pickle", False)
    force = options.get("force_cache", False)
    fresh = force and not options.get("keep_existing", True)
    hint = ("Call it with those arguments to use (or resume) that cache, use another path per "
            "set of arguments, or rebuild with @cachable(path, force_cache=True, keep_existing=False).")
    if not force and read_cachable_length(path, allow_pickle=allow_pickle) is not None:
        recorded = read_cachable_parameters(path, allow_pickle=allow_pickle)
        if recorded is not None and parameters_fingerprint(*recorded) != params:
            raise CacheMismatchError(
                f"the cache at {path} was built by {fn.__qualname__} with the arguments "
                f"{parameters_fingerprint(*recorded)}, not {params}. {hint}"
            )
        return PathCachedDataset(None, path, **_read_options(options))
    recorded = None if fresh else read_cachable_parameters(path, allow_pickle=allow_pickle)
    if recorded is not None:
        if _build_running(path):  # edflow's worker mode: the dataset itself, uncached
            return fn(*recorded[0], **recorded[1])
        started = os.path.exists(path) or os.path.exists(path + PARTIAL_SUFFIX)
        if started and parameters_fingerprint(*recorded) != params:
            raise CacheMismatchError(
                f"the interrupted build at {path} was started by {fn.__qualname__} with the "
                f"arguments {parameters_fingerprint(*recorded)}, not {params}: resuming it would "
                f"mix examples of both. {hint}"
            )
    dataset = fn(*args, **kwargs)
    write_parameters(path, tuple(args), dict(kwargs))  # before the first chunk
    return PathCachedDataset(dataset, path, **options)  # writes path.p when complete


def _recorded_and_complete(fn: Callable[..., Any], path: str, params: str) -> bool:
    """Whether the directory cache at ``path`` is complete; raise if it was built (or
    begun) with other arguments than ``params``."""
    try:
        reader = open_reader(path)
    except CacheNotFoundError:
        return False
    with reader:
        recorded = reader.manifest.parameters if reader.manifest is not None else None
        if recorded is not None and recorded != params:
            raise CacheMismatchError(
                f"the cache at {path} was built by {fn.__qualname__} with the arguments "
                f"{recorded}, not {params}. Use another path per set of arguments, or delete it."
            )
        return reader.complete


def cachable(path: str, **options: Any) -> Callable[[Callable[..., Any]], Callable[..., CachedDataset]]:
    """Decorator: cache the dataset a function returns at ``path``.

    The first call runs the function and caches its dataset; later calls with the same
    arguments open the cache without calling the function. The arguments are recorded
    in the cache: calling with other arguments raises :class:`CacheMismatchError`
    instead of silently returning the old data. An interrupted build resumes.
    Keyword ``options`` go to :class:`PathCachedDataset` (``num_workers``, ...).
    """

    def decorator(fn: Callable[..., Any]) -> Callable[..., CachedDataset]:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> CachedDataset:
            params = parameters_fingerprint(args, kwargs)
            if path.endswith(".zip"):
                return _cachable_zip(fn, path, args, kwargs, params, options)
            if _recorded_and_complete(fn, path, params):
                return PathCachedDataset(None, path, **_read_options(options))
            return PathCachedDataset(fn(*args, **kwargs), path, _parameters=params, **options)

        return wrapper

    return decorator


__all__ = ["cachable", "parameters_fingerprint"]
