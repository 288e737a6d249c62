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

Admitting a callable is not enough to be safe: ``collections.deque(range(10**15), 0)``
(87 bytes) loops for days and ``bytearray(10**13)`` allocates 10 TB. Every admitted
callable that can allocate or iterate is therefore called through a guard that
charges the work it is about to do (elements iterated, bytes allocated) against a
budget proportional to the pickle's length; exceeding it is a
:class:`~edcache.errors.CorruptCacheError`. Scalars (``int``, ``float``, ``complex``,
``str``, ``bool``, ``slice``) are admitted as they are.
"""

from __future__ import annotations

import _compat_pickle
import builtins
import collections
import functools
import importlib
import io
import pickle
from typing import Any

import numpy as np

from ...errors import CorruptCacheError, UnsafePickleError

__all__ = ["SAFE_GLOBALS", "safe_loads"]

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


@functools.lru_cache(maxsize=512)
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


#: Work a pickle may cause through admitted callables: this many units (elements
#: iterated or bytes allocated) per byte of pickle, plus a small allowance.
BUDGET_PER_BYTE = 8
BUDGET_BASE = 1 << 16

# Admitted callables that cannot allocate or loop beyond their (bounded) arguments:
# returned as they are, so they also work as classes (NEWOBJ, values).
_UNGUARDED = frozenset({bool, int, float, complex, str, slice})
# Called with an int n, these allocate n bytes (or elements).
_ALLOC_BY_INT = frozenset({bytes, bytearray, np.void})


_SIZED = frozenset({str, bytes, bytearray, list, tuple, dict, set, frozenset, collections.deque,
                    collections.OrderedDict, collections.Counter, collections.defaultdict, range})


def _reconstruct() -> Any:
    """numpy's ``_reconstruct`` (what array pickles call)."""
    return _resolve_safe("numpy._core.multiarray", "_reconstruct")


def _size(value: Any) -> int:
    """The work ``value`` stands for as an argument: its elements (bytes of an array)."""
    if isinstance(value, np.ndarray):
        return max(int(value.nbytes), int(value.size))
    if isinstance(value, (str, bytes, bytearray, list, tuple, dict, set, frozenset, collections.deque,
                          range)):
        return len(value)  # OverflowError for an astronomic range: caught as corrupt
    return 1


class _Guard:
    """An admitted callable as the unpickler sees it: charges, then calls ``target``."""

    __slots__ = ("reconstruct", "target", "unpickler", "used")

    def __init__(self, target: Any, unpickler: _RestrictedUnpickler) -> None:
        self.target = target
        self.unpickler = unpickler
        self.used = False
        self.reconstruct = target is _reconstruct()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.used = True
        target, u = self.target, self.unpickler
        if self.reconstruct and len(args) == 3 and not kwargs:  # every array: keep it cheap
            subtype, shape, dtype = args
            if type(subtype) is _Guard:
                subtype = u.unwrap(subtype)
            if shape != (0,):
                u.charge(_array_nbytes(shape, dtype))
            return target(subtype, shape, dtype)
        if kwargs:
            kwargs = {k: u.unwrap(v) for k, v in kwargs.items()}
        args, cost = self._unwrap_args(args)
        for v in kwargs.values():
            cost += _size(v)
        cost += self._allocation(args, kwargs)
        if cost:
            u.charge(cost)
        return target(*args, **kwargs)

    def _unwrap_args(self, args: tuple) -> tuple[tuple, int]:
        """``args`` with guarded callables unwrapped, and what the sized ones cost."""
        cost = 0
        unwrapped = None
        for i, a in enumerate(args):
            kind = type(a)
            if kind is _Guard:
                if unwrapped is None:
                    unwrapped = list(args)
                unwrapped[i] = self.unpickler.unwrap(a)
            elif kind in _SIZED:
                cost += len(a)
            elif kind is np.ndarray:
                cost += a.nbytes
            elif kind is int and self.target in _ALLOC_BY_INT:
                cost += a
        return (tuple(unwrapped) if unwrapped is not None else args), cost

    def _allocation(self, args: tuple, kwargs: dict[str, Any]) -> int:
        """What calling the target allocates, for the targets that allocate by their arguments."""
        if self.target is range:
            return len(range(*args))
        if self.target is np.ndarray:  # ndarray(shape, dtype=float, buffer=None, ...)
            shape = args[0] if args else kwargs.get("shape", ())
            return _array_nbytes(shape, args[1] if len(args) > 1 else kwargs.get("dtype", float))
        if self.reconstruct:  # (subtype, shape, dtype)
            return _array_nbytes(args[1] if len(args) > 1 else (), args[2] if len(args) > 2 else "b")
        return 0

    def __repr__(self) -> str:
        return f"<guarded {self.target!r}>"


def _array_nbytes(shape: Any, dtype: Any) -> int:
    """Bytes of an array of ``shape`` and ``dtype`` (what ``_reconstruct`` allocates)."""
    if isinstance(shape, (int, np.integer)):
        shape = (shape,)
    count = 1
    for n in shape:
        count *= max(int(n), 0)
    try:
        itemsize = np.dtype(dtype).itemsize
    except (TypeError, ValueError):
        itemsize = 1
    return count * max(itemsize, 1)



class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, data: bytes, member: str, allow_pickle: bool) -> None:
        super().__init__(io.BytesIO(data))
        self._member = member
        self._allow_pickle = allow_pickle
        self._length = len(data)
        self._budget = BUDGET_PER_BYTE * len(data) + BUDGET_BASE
        self._guards: list[_Guard] = []

    def charge(self, units: int) -> None:
        """Spend ``units`` of the budget; :class:`CorruptCacheError` once it is exceeded."""
        self._budget -= units
        if self._budget < 0:
            raise CorruptCacheError(
                f"{self._member}: the pickle asks for far more memory or work than its "
                f"{self._length} bytes can hold (a crafted or damaged file); refusing it"
            )

    def unwrap(self, value: Any) -> Any:
        """A guard passed as an argument (``defaultdict(list)``, ``_reconstruct(ndarray,
        ...)``) stands for its target."""
        if type(value) is _Guard:
            value.used = True
            return value.target
        return value

    def guard(self, obj: Any) -> Any:
        if obj in _UNGUARDED or self._allow_pickle:
            return obj
        g = _Guard(obj, self)
        self._guards.append(g)
        return g

    def load(self) -> Any:
        value = super().load()
        if any(not g.used for g in self._guards):  # an admitted class stored as a value
            value = _unguard(value, 0)
        return value

    def find_class(self, module: str, name: str) -> Any:
        # Python 3 writes protocol <= 2 pickles with Python 2 names (``__builtin__.set``);
        # map them back as the default find_class does (fix_imports), then check.
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        elif module in _compat_pickle.IMPORT_MAPPING:
            module = _compat_pickle.IMPORT_MAPPING[module]
        obj = _resolve_safe(module, name)
        if obj is not None:
            return self.guard(obj)
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


def _unguard(value: Any, depth: int) -> Any:
    """``value`` with guards (admitted classes stored as values) replaced by the classes."""
    if type(value) is _Guard:
        return value.target
    if depth > 64:
        return value
    depth += 1
    if type(value) is list:
        value[:] = [_unguard(v, depth) for v in value]
    elif isinstance(value, dict):
        for k in list(value):
            value[k] = _unguard(value[k], depth)
    elif type(value) is tuple:
        return tuple(_unguard(v, depth) for v in value)
    elif type(value) in (set, frozenset):
        return type(value)(_unguard(v, depth) for v in value)
    return value


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
            KeyError, AttributeError, OverflowError, UnicodeDecodeError, MemoryError,
            RecursionError) as exc:
        raise CorruptCacheError(f"{member}: not a valid pickle ({type(exc).__name__}: {exc})") from exc

