"""Pickling examples so that edflow 0.4 (numpy < 1.24) can read them back.

numpy 2 pickles arrays and scalars through ``numpy._core.multiarray``, a module numpy
< 1.26 does not have. :func:`legacy_dumps` writes those globals under their numpy 1.x
names (``numpy.core.multiarray._reconstruct``), which every numpy version resolves
(numpy 2 through its ``numpy.core`` compatibility package, edcache through
:func:`~edcache.format.legacy.safe_loads`).
"""

from __future__ import annotations

import io
import pickle
import types
from collections.abc import Callable
from typing import Any, ClassVar

__all__ = ["PROTOCOL", "legacy_dumps"]

#: The protocol edflow 0.4 used under Python >= 3.8 (``pickle.DEFAULT_PROTOCOL``).
PROTOCOL = 4


class _LegacyPickler(pickle._Pickler):
    """The pure-Python pickler, because only it lets us choose a global's module name.

    Array payloads are single ``bytes`` objects, so the slower pickler costs little.
    """

    # the pure-Python pickler's methods, which typeshed does not describe
    proto: int
    save: Callable[[Any], None]
    write: Callable[[bytes], None]
    memoize: Callable[[Any], None]

    def save_global(self, obj: Any, name: str | None = None) -> None:
        module = getattr(obj, "__module__", None)
        if isinstance(module, str) and (module == "numpy._core" or module.startswith("numpy._core.")):
            if name is None:
                name = obj.__qualname__
            legacy_module = "numpy.core" + module[len("numpy._core"):]
            if self.proto >= 4:
                self.save(legacy_module)
                self.save(name)
                self.write(pickle.STACK_GLOBAL)
            else:
                self.write(pickle.GLOBAL + f"{legacy_module}\n{name}\n".encode())
            self.memoize(obj)
            return
        super().save_global(obj, name)  # type: ignore[misc]

    # The class-level dispatch table holds the base class's function; route it here.
    dispatch: ClassVar[dict] = dict(pickle._Pickler.dispatch)
    dispatch[types.FunctionType] = save_global


def legacy_dumps(obj: Any, protocol: int = PROTOCOL) -> bytes:
    """Pickle ``obj`` as edflow 0.4 did, naming numpy's globals as numpy 1.x does.

    Parameters
    ----------
    obj : object
        The example (nested dicts, lists, tuples, scalars, numpy arrays ...).
    protocol : int
        Pickle protocol, at most 4 (edflow 0.4 runs on Pythons that read up to 4 or 5).

    Returns
    -------
    bytes
        The pickle.
    """
    if not 2 <= protocol <= 4:
        raise ValueError(f"legacy pickles use protocol 2 to 4, not {protocol}")
    buf = io.BytesIO()
    _LegacyPickler(buf, protocol).dump(obj)
    return buf.getvalue()
