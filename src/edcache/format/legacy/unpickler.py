"""A restricted unpickler for the pickles inside edflow caches.

edflow stored every example as ``pickle.dumps(example)``. Unpickling runs whatever
callable the pickle names, so a cache file from elsewhere could run arbitrary code.
:func:`safe_loads` only resolves the globals needed to rebuild builtin containers and
scalars, ``collections`` containers, and numpy arrays, dtypes and scalars (in the spirit
of ``torch.load(weights_only=True)``); any other global raises
:class:`~edcache.errors.UnsafePickleError` *before* it is called.

Pickles written under numpy 1.x name ``numpy.core.multiarray``, those written under
numpy 2.x ``numpy._core.multiarray``; both resolve to the installed numpy without
importing the deprecated ``numpy.core`` shim.
"""

from __future__ import annotations

import _compat_pickle
import builtins
import collections
import importlib
import io
import pickle
from typing import Any

import numpy as np

from ...errors import CorruptCacheError, UnsafePickleError

__all__ = ["safe_loads", "SAFE_GLOBALS"]

_BUILTIN_NAMES = (
    "bool", "int", "float", "complex", "str", "bytes", "bytearray",
    "list", "tuple", "dict", "set", "frozenset", "slice", "range",
)
_COLLECTIONS_NAMES = ("OrderedDict", "defaultdict", "deque", "Counter")
# name -> submodule of numpy's core package it lives in
_NUMPY_CORE_NAMES = {"_reconstruct": "multiarray", "scalar": "multiarray", "_frombuffer": "numeric"}

#: Every ``module.name`` the restricted unpickler resolves (numpy scalar types, e.g.
#: ``numpy.float32``, are admitted as well).
SAFE_GLOBALS: frozenset[str] = frozenset(
    [f"builtins.{n}" for n in _BUILTIN_NAMES]
    + [f"collections.{n}" for n in _COLLECTIONS_NAMES]
    + ["_codecs.encode", "numpy.ndarray", "numpy.dtype"]
    + [f"numpy.{core}.{sub}.{n}" for core in ("core", "_core") for n, sub in _NUMPY_CORE_NAMES.items()]
)


def _numpy_core_attr(submodule: str, name: str) -> Any:
    """``numpy._core.<submodule>.<name>``, or the numpy 1.x ``numpy.core`` equivalent."""
    for package in ("numpy._core", "numpy.core"):
        try:
            return getattr(importlib.import_module(f"{package}.{submodule}"), name)
        except (ImportError, AttributeError):
            continue
    raise ImportError(f"numpy has no {submodule}.{name}")


def _resolve_safe(module: str, name: str) -> Any | None:
    """The object behind a safe global, or ``None`` if ``module.name`` is not safe."""
    if module == "builtins" and name in _BUILTIN_NAMES:
        return getattr(builtins, name)
    if module == "collections" and name in _COLLECTIONS_NAMES:
        return getattr(collections, name)
    if module == "_codecs" and name == "encode":  # protocol <= 2 stores bytes this way
        import _codecs

        return _codecs.encode
    if module == "numpy":
        if name in ("ndarray", "dtype"):
            return getattr(np, name)
        obj = vars(np).get(name)  # not getattr: numpy's lazy __getattr__ imports modules
        if isinstance(obj, type) and issubclass(obj, np.generic):
            return obj
        return None
    for core in ("numpy.core.", "numpy._core."):
        if module.startswith(core):
            submodule = module[len(core):]
            if _NUMPY_CORE_NAMES.get(name) == submodule:
                return _numpy_core_attr(submodule, name)
    return None


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, data: bytes, member: str, allow_pickle: bool) -> None:
        super().__init__(io.BytesIO(data))
        self._member = member
        self._allow_pickle = allow_pickle

    def find_class(self, module: str, name: str) -> Any:
        # Python 3 writes protocol <= 2 pickles with Python 2 names (``__builtin__.set``);
        # map them back as the default find_class does (fix_imports), then check.
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        elif module in _compat_pickle.IMPORT_MAPPING:
            module = _compat_pickle.IMPORT_MAPPING[module]
        obj = _resolve_safe(module, name)
        if obj is not None:
            return obj
        if self._allow_pickle:
            # Still map numpy 1.x names so that trusting a file never needs numpy.core.
            if module.startswith("numpy.core.") and name in _NUMPY_CORE_NAMES:
                return _numpy_core_attr(module[len("numpy.core."):], name)
            return super().find_class(module, name)
        err = UnsafePickleError(
            f"{self._member}: refusing to unpickle the global '{module}.{name}': only builtin "
            "containers and scalars and numpy arrays, dtypes and scalars are loaded by "
            "default, because unpickling anything else can run arbitrary code. If you trust "
            "this file, pass allow_pickle=True."
        )
        err.member = self._member  # type: ignore[attr-defined]
        err.global_name = f"{module}.{name}"  # type: ignore[attr-defined]
        raise err

    def persistent_load(self, pid: Any) -> Any:
        raise CorruptCacheError(f"{self._member}: pickle uses a persistent id, edflow never wrote one")


def safe_loads(data: bytes, *, member: str, allow_pickle: bool = False) -> Any:
    """Unpickle ``data`` admitting only builtin containers/scalars and numpy objects.

    Parameters
    ----------
    data : bytes
        A pickle (any protocol up to 5) as edflow wrote it.
    member : str
        Where the bytes come from (``"cache.zip:example_3.p"``); used in error messages.
    allow_pickle : bool
        Trust the data: resolve every global as :func:`pickle.loads` would. Only for
        files you trust, since unpickling can run arbitrary code.

    Returns
    -------
    object
        The unpickled object.

    Raises
    ------
    UnsafePickleError
        The pickle names a global that is not safe; it is never called. The exception
        carries ``member`` and ``global_name`` attributes.
    CorruptCacheError
        ``data`` is not a valid pickle.
    """
    try:
        return _RestrictedUnpickler(data, member, allow_pickle).load()
    except (UnsafePickleError, CorruptCacheError):
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, IndexError,
            KeyError, AttributeError, OverflowError, UnicodeDecodeError) as exc:
        raise CorruptCacheError(f"{member}: not a valid pickle ({type(exc).__name__}: {exc})") from exc

