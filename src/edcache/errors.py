"""Every exception edcache raises on purpose.

All of them subclass :class:`EdcacheError`. Where a caller would naturally catch a
built-in (``KeyError`` for a missing example, ``ValueError`` for a bad argument), the
class also inherits that built-in, so ``except KeyError`` keeps working for edflow code.
"""

from __future__ import annotations


class EdcacheError(Exception):
    """Base class of all edcache errors."""


class DatasetInterfaceError(EdcacheError, TypeError):
    """The dataset object lacks something caching needs (``root``, ``name``, ``__len__`` ...)."""


class CodecError(EdcacheError, TypeError):
    """A value cannot be stored by the safe codec (names the example index and key path)."""


class CodecSpecError(EdcacheError, ValueError):
    """A ``codecs=`` argument names no known column codec (``zstd[:level]``, ``lz4``, ``png``,
    ``jpeg[:quality]``, ``webp[:quality|lossless]``, ``auto``, ``raw``)."""


class MissingExtraError(EdcacheError, ImportError):
    """A column codec needs a library that is not installed; the message names the pip extra."""


class ExampleError(EdcacheError):
    """The dataset raised while computing an example; carries the index and remote traceback."""

    def __init__(self, index: int, message: str, remote_traceback: str = "") -> None:
        super().__init__(message)
        self.index = index
        self.message = message
        self.remote_traceback = remote_traceback

    def __reduce__(self):  # keep index and traceback across process boundaries
        return (type(self), (self.index, self.message, self.remote_traceback))

    def __str__(self) -> str:
        if self.remote_traceback:
            return f"{self.message}\n\nTraceback in the worker:\n{self.remote_traceback}"
        return self.message


class LabelError(EdcacheError, ValueError):
    """An ``in_memory_key`` is missing from an example, or its values cannot form a column."""


class CorruptCacheError(EdcacheError):
    """A cache file is damaged: bad structure, wrong size, or checksum mismatch."""


class IncompleteCacheError(EdcacheError, KeyError):
    """The requested example or labels are not (yet) in the cache."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class CacheMismatchError(EdcacheError, ValueError):
    """The cache on disk was built from another dataset, length or set of parameters."""


class UnsafePickleError(EdcacheError):
    """A pickle would need a global that is not on the safe list (opt in with ``allow_pickle=True``)."""


class CacheNotFoundError(EdcacheError, FileNotFoundError):
    """No cache exists at the given location."""


class BuildError(EdcacheError, RuntimeError):
    """Building the cache failed for a reason other than the dataset raising."""


class ClusterError(EdcacheError, RuntimeError):
    """The distributed engine failed, refused credentials, or could not be reached."""


__all__ = [
    "BuildError",
    "CacheMismatchError",
    "CacheNotFoundError",
    "ClusterError",
    "CodecError",
    "CodecSpecError",
    "CorruptCacheError",
    "DatasetInterfaceError",
    "EdcacheError",
    "ExampleError",
    "IncompleteCacheError",
    "LabelError",
    "MissingExtraError",
    "UnsafePickleError",
]
