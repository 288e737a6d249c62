"""The two side files edflow's ``@cachable(path)`` / ``PathCachedDataset`` write.

Next to the zip at ``path`` edflow writes ``path + ".p"`` (``pickle.dumps(len(dataset))``,
written last: the completion marker) and ``path + "parameters.p"``
(``pickle.dumps((args, kwargs))`` of the decorated call). The names are plain string
concatenation: ``x.zip.p`` and ``x.zipparameters.p``.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

import numpy as np

from ...errors import CorruptCacheError
from .unpickler import safe_loads

__all__ = [
    "LENGTH_SUFFIX",
    "PARAMETERS_SUFFIX",
    "read_cachable_length",
    "read_cachable_parameters",
    "remove_length_marker",
    "write_length_marker",
    "write_parameters",
]

LENGTH_SUFFIX = ".p"
PARAMETERS_SUFFIX = "parameters.p"


def _load(path: str, allow_pickle: bool) -> Any:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return None
    return safe_loads(data, member=path, allow_pickle=allow_pickle)


def read_cachable_length(path: str, *, allow_pickle: bool = False) -> int | None:
    """The length edflow's ``cachable`` recorded for the zip at ``path``.

    Parameters
    ----------
    path : str
        The zip path given to ``@cachable(path)``.
    allow_pickle : bool
        Trust the marker file.

    Returns
    -------
    int or None
        The length, or ``None`` if ``path + ".p"`` does not exist (caching never finished).
    """
    marker = path + LENGTH_SUFFIX
    value = _load(marker, allow_pickle)
    if value is None and not os.path.exists(marker):
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise CorruptCacheError(f"{marker} should hold the dataset length, not {type(value).__name__}")
    return int(value)


def read_cachable_parameters(path: str, *, allow_pickle: bool = False) -> tuple[tuple, dict] | None:
    """The ``(args, kwargs)`` edflow's ``cachable`` recorded for the zip at ``path``.

    Returns ``None`` if ``path + "parameters.p"`` does not exist. Arguments that are not
    builtin or numpy values raise :class:`~edcache.errors.UnsafePickleError` unless
    ``allow_pickle=True``.
    """
    file = path + PARAMETERS_SUFFIX
    value = _load(file, allow_pickle)
    if value is None and not os.path.exists(file):
        return None
    if not (isinstance(value, tuple) and len(value) == 2
            and isinstance(value[0], (tuple, list)) and isinstance(value[1], dict)):
        raise CorruptCacheError(f"{file} should hold (args, kwargs), not {value!r:.80}")
    return tuple(value[0]), dict(value[1])


def write_length_marker(path: str, length: int) -> None:
    """Write edflow's completion marker ``path + ".p"`` (the pickled length), atomically."""
    from ..fsutil import atomic_write
    from .pickler import legacy_dumps

    atomic_write(path + LENGTH_SUFFIX, legacy_dumps(int(length)))


def remove_length_marker(path: str) -> None:
    """Remove ``path + ".p"``: a build of ``path`` starts, so the zip is not complete."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path + LENGTH_SUFFIX)


def write_parameters(path: str, args: tuple, kwargs: dict) -> None:
    """Record the ``(args, kwargs)`` of a ``cachable`` call in ``path + "parameters.p"``."""
    from ..fsutil import atomic_write
    from .pickler import legacy_dumps

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic_write(path + PARAMETERS_SUFFIX, legacy_dumps((tuple(args), dict(kwargs))))
