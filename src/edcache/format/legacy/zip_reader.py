"""Reading edflow's ``<root>/cached/<name>.zip`` caches."""

from __future__ import annotations

import os
import re
import stat
import zipfile
from typing import Any

from ...errors import CacheNotFoundError, CorruptCacheError, IncompleteCacheError
from ..base import CacheReader, Labels
from .labels import labels_to_columns
from .unpickler import safe_loads

__all__ = ["EXAMPLE_RE", "LABELS_MEMBER", "LegacyZipReader", "example_index", "example_member"]

#: Members edflow counts as examples (``example_{i}.p``).
EXAMPLE_RE = re.compile(r"example_(.*)\.p\Z", re.DOTALL)
LABELS_MEMBER = "labels.p"


def example_member(index: int) -> str:
    """The member name edflow gives example ``index``: ``example_{index}.p``."""
    return f"example_{index}.p"


def example_index(name: str) -> int | None:
    """The index of a member named exactly ``example_{i}.p`` (as edflow names them), else None."""
    m = EXAMPLE_RE.match(name)
    if m is None or not m.group(1).isdigit() or str(int(m.group(1))) != m.group(1):
        return None
    return int(m.group(1))


def _open_zip(path: str) -> zipfile.ZipFile:
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):  # a FIFO or device would block the reader
            raise CorruptCacheError(f"{path} is not a regular file (a FIFO, device or socket?)")
        return zipfile.ZipFile(path, "r")
    except FileNotFoundError as exc:
        raise CacheNotFoundError(f"no edflow cache at {path}") from exc
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        try:
            with open(path, "rb") as f:
                head = f.read(4)
        except OSError:
            head = b""
        if head == b"PK\x03\x04":
            raise CorruptCacheError(
                f"{path} has no zip central directory: the process writing it was probably "
                "killed. Its complete examples can be recovered into a new cache with "
                f"`edcache convert {path} DST`."
            ) from exc
        raise CorruptCacheError(f"{path} is not a zip file ({exc})") from exc


class LegacyZipReader(CacheReader):
    """An edflow 0.4 zip cache, read exactly as edflow's ``from_cache`` reads it.

    - ``len()`` is the number of distinct ``example_*.p`` members (edflow does not check
      that they are contiguous: a partial cache counts what it holds);
    - ``read(i)`` unpickles ``example_{i}.p`` with :func:`safe_loads` and returns it as
      stored (edflow's ``index_``, a ``numpy.int64``, included);
    - ``labels`` is the last ``labels.p`` member, with each regular list of values as a
      numpy array (see :func:`~edcache.format.legacy.labels.labels_to_columns`).

    The member index comes from the central directory, read once per process. The
    :class:`zipfile.ZipFile` is opened lazily in each process (and again after a fork);
    pickling the reader carries no handle. Nothing is ever written to the zip.

    Parameters
    ----------
    path : str
        The zip file (``<root>/cached/<name>.zip``).
    allow_pickle : bool
        Trust the file: unpickle arbitrary globals (see :func:`safe_loads`).

    Raises
    ------
    CacheNotFoundError
        ``path`` does not exist.
    CorruptCacheError
        ``path`` is not a readable zip; for a zip without a central directory the
        message says to recover it with ``edcache convert``.
    """

    def __init__(self, path: str, *, allow_pickle: bool = False) -> None:
        self.path = path
        self.allow_pickle = allow_pickle
        self._reset()
        self._length = len(self._example_names())

    def _reset(self) -> None:
        self._zip: zipfile.ZipFile | None = None
        self._pid: int | None = None
        self._labels: Labels | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path, "allow_pickle": self.allow_pickle, "_length": self._length}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._reset()

    def fork_safe_handle(self) -> Any:
        return self.zipfile

    @property
    def zipfile(self) -> zipfile.ZipFile:
        """This process's :class:`zipfile.ZipFile` on the cache (reopened after a fork)."""
        if self._zip is None or self._pid != os.getpid():
            # A handle inherited through fork shares its file offset with the parent;
            # leave it alone (closing it could disturb the parent) and open our own.
            self._zip = _open_zip(self.path)
            self._pid = os.getpid()
        return self._zip

    def _example_names(self) -> set[str]:
        return {n for n in self.zipfile.NameToInfo if EXAMPLE_RE.match(n)}

    def __len__(self) -> int:
        return self._length

    @property
    def complete(self) -> bool:
        """Whether the run that wrote the zip finished (edflow writes ``labels.p`` last)."""
        return LABELS_MEMBER in self.zipfile.NameToInfo

    def _member(self, name: str) -> bytes:
        try:
            return self.zipfile.read(name)
        except zipfile.BadZipFile as exc:
            raise CorruptCacheError(f"{self.path}:{name} is damaged ({exc})") from exc

    def read(self, index: int) -> dict:
        """Return example ``index``; ``IncompleteCacheError`` (a ``KeyError``) if absent."""
        name = example_member(index)
        if name not in self.zipfile.NameToInfo:
            raise IncompleteCacheError(
                f"example {index} is not in the edflow cache {self.path} (no member {name!r})"
            )
        return safe_loads(self._member(name), member=f"{self.path}:{name}", allow_pickle=self.allow_pickle)

    @property
    def labels(self) -> Labels:
        """The last ``labels.p`` (``{}`` if it is ``{}``); ``IncompleteCacheError`` if none."""
        if self._labels is None:
            if LABELS_MEMBER not in self.zipfile.NameToInfo:
                raise IncompleteCacheError(
                    f"the edflow cache {self.path} has no {LABELS_MEMBER!r}: the run that "
                    "wrote it did not finish"
                )
            member = f"{self.path}:{LABELS_MEMBER}"
            raw = safe_loads(self._member(LABELS_MEMBER), member=member, allow_pickle=self.allow_pickle)
            self._labels = labels_to_columns(raw, member)
        return self._labels

    def close(self) -> None:
        if self._zip is not None and self._pid == os.getpid():
            self._zip.close()
        self._reset()
