"""Reading a folder of edflow pickles: ``example_{i}.p`` files plus ``labels.p``.

This is the layout edflow's ``_legacy=False`` mode meant to read (for example a zip
cache extracted by hand into ``<root>/cached/<name>/``); edflow itself never managed
to write it.
"""

from __future__ import annotations

import os
from typing import Any

from ...errors import CacheNotFoundError, IncompleteCacheError
from ..base import CacheReader, Labels
from ..fsutil import open_regular
from .labels import labels_to_columns
from .unpickler import safe_loads
from .zip_reader import EXAMPLE_RE, LABELS_MEMBER, example_member

__all__ = ["ExamplesFolder", "LegacyFolderReader", "is_legacy_folder"]

_MANIFEST = "manifest.json"  # the marker of the default format's cache directory


class ExamplesFolder:
    """Contains all examples and labels of a cached dataset (edflow's API).

    Parameters
    ----------
    root : str
        The folder holding ``example_{i}.p`` and ``labels.p``.
    """

    def __init__(self, root: str) -> None:
        self.root = root

    def read(self, name: str) -> bytes:
        """Return the bytes of the file ``name`` in the folder.

        Raises
        ------
        FileNotFoundError
            No such file.
        ValueError
            ``name`` is not a plain file name (it would leave the folder).
        """
        if not name or name != os.path.basename(name) or name in (".", ".."):
            raise ValueError(f"{name!r} is not a file name inside {self.root}")
        with open_regular(os.path.join(self.root, name)) as f:  # never blocks on a FIFO
            return f.read()

    def __repr__(self) -> str:
        return f"ExamplesFolder({self.root!r})"


def is_legacy_folder(path: str) -> bool:
    """Whether ``path`` is a folder of edflow pickles (``example_*.p``, no ``manifest.json``)."""
    try:
        with os.scandir(path) as entries:
            found = False
            for entry in entries:
                if entry.name == _MANIFEST:
                    return False
                found = found or bool(EXAMPLE_RE.match(entry.name))
            return found
    except (FileNotFoundError, NotADirectoryError):
        return False


class LegacyFolderReader(CacheReader):
    """A folder of ``example_{i}.p`` files plus ``labels.p``, read like a legacy zip.

    Same semantics as :class:`~edcache.format.legacy.LegacyZipReader`: ``len()`` counts
    the ``example_*.p`` files (listed once, when opened), ``read(i)`` unpickles
    ``example_{i}.p`` with :func:`safe_loads`, ``labels`` is ``labels.p``.

    Parameters
    ----------
    path : str
        The folder.
    allow_pickle : bool
        Trust the files: unpickle arbitrary globals.
    """

    def __init__(self, path: str, *, allow_pickle: bool = False) -> None:
        if not os.path.isdir(path):
            raise CacheNotFoundError(f"no folder of edflow examples at {path}")
        self.path = path
        self.allow_pickle = allow_pickle
        self.folder = ExamplesFolder(path)
        self._length = sum(1 for n in os.listdir(path) if EXAMPLE_RE.match(n))
        self._labels: Labels | None = None

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_labels"] = None
        return state

    def fork_safe_handle(self) -> Any:
        return self.zipfile

    @property
    def zipfile(self) -> ExamplesFolder:
        """The :class:`ExamplesFolder` (what edflow's ``fork_safe_zip`` returned here)."""
        return self.folder

    def __len__(self) -> int:
        return self._length

    @property
    def complete(self) -> bool:
        return os.path.isfile(os.path.join(self.path, LABELS_MEMBER))

    def _load(self, name: str, missing: str) -> Any:
        try:
            data = self.folder.read(name)
        except FileNotFoundError:
            raise IncompleteCacheError(missing) from None
        return safe_loads(data, member=os.path.join(self.path, name), allow_pickle=self.allow_pickle)

    def read(self, index: int) -> dict:
        """Return example ``index``; ``IncompleteCacheError`` (a ``KeyError``) if absent."""
        name = example_member(index)
        return self._load(name, f"example {index} is not in the folder {self.path} (no file {name!r})")

    @property
    def labels(self) -> Labels:
        """``labels.p`` as label columns; ``IncompleteCacheError`` if there is none."""
        if self._labels is None:
            raw = self._load(LABELS_MEMBER, f"the folder {self.path} has no {LABELS_MEMBER!r}")
            self._labels = labels_to_columns(raw, os.path.join(self.path, LABELS_MEMBER))
        return self._labels
