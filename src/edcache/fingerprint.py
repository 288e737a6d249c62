"""A dataset's configuration, recorded with its cache so that a changed one is noticed.

The class and the name of a dataset say which cache it uses; its *configuration*
(``size=224`` against ``size=112``) decides what the examples are. A cache opened or
resumed with another configuration would silently return (or mix in) examples of the
old one, so :class:`~edcache.CachedDataset` records :func:`dataset_fingerprint` in the
manifest and refuses a dataset whose fingerprint differs
(:class:`~edcache.errors.CacheMismatchError`).

What counts as configuration: the dataset object's public instance attributes whose
values are simple (None, bool, int, float, str, paths, numpy scalars, and small lists,
tuples and dicts of those). Everything else is left out: private attributes
(``_cache``), large containers, arrays, callables, other objects (a model, an open
file, a list of 100,000 file names), and the attributes that say where the cache is
(``root``, ``name``; moving a cache must keep it usable) or that are checked on their
own (``in_memory_keys``, ``cache_version``: see :func:`dataset_identity_record`). A
dataset may name more attributes to leave out in a class attribute ``fingerprint_exclude``
(e.g. a log directory), or define
``cache_fingerprint()`` returning a JSON-able value to use instead.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from typing import Any

import numpy as np

__all__ = ["dataset_fingerprint", "fingerprint_differences"]

#: Attributes never part of the fingerprint (where the cache is, what is checked apart).
ALWAYS_EXCLUDED = frozenset({"root", "name", "in_memory_keys", "fingerprint_exclude", "cache_version"})
#: Containers longer than this are not configuration (a file list, a table).
MAX_ITEMS = 64
#: Strings longer than this are not configuration either (a document, a blob).
MAX_STR = 4096
_MAX_DEPTH = 4


class _Skip(Exception):
    """The value is not simple configuration."""


#: What :func:`_simple_scalar` returns for a value that is not a scalar.
_NOT_SCALAR = object()


def _simple(value: Any, depth: int = 0) -> Any:
    """``value`` as canonical JSON-able data, or raise :class:`_Skip`."""
    scalar = _simple_scalar(value, depth)
    if scalar is not _NOT_SCALAR:
        return scalar
    if depth >= _MAX_DEPTH:
        raise _Skip
    return _simple_container(value, depth)


def _simple_scalar(value: Any, depth: int) -> Any:
    """A None, bool, number, str or path as JSON-able data; :data:`_NOT_SCALAR` for other values."""
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, np.generic) and value.dtype.kind in "biuf":
        value = value.item()
    if isinstance(value, int) and not isinstance(value, bool):
        return int(value)
    if isinstance(value, float):
        # JSON has no NaN/inf: spell them, so that the string stays deterministic
        return float(value) if math.isfinite(value) else repr(float(value))
    if isinstance(value, str):
        if len(value) > MAX_STR:
            raise _Skip
        return str(value)
    if isinstance(value, os.PathLike):
        path = os.fspath(value)
        return _simple(os.fsdecode(path) if isinstance(path, bytes) else path, depth)
    return _NOT_SCALAR


def _simple_container(value: Any, depth: int) -> Any:
    if isinstance(value, (list, tuple)):
        if len(value) > MAX_ITEMS:
            raise _Skip
        return [_simple(v, depth + 1) for v in value]
    if isinstance(value, dict):
        if len(value) > MAX_ITEMS or not all(isinstance(k, str) for k in value):
            raise _Skip
        return {k: _simple(v, depth + 1) for k, v in sorted(value.items())}
    raise _Skip


def _attributes(dataset: Any) -> dict[str, Any]:
    attrs: dict[str, Any] = {}
    with contextlib.suppress(TypeError):  # no __dict__
        attrs.update(vars(dataset))
    for cls in type(dataset).__mro__:
        slots = cls.__dict__.get("__slots__", ())
        for slot in (slots,) if isinstance(slots, str) else slots:
            if slot not in attrs and hasattr(dataset, slot):
                attrs[slot] = getattr(dataset, slot)
    return attrs


def dataset_fingerprint(dataset: Any) -> str | None:
    """The canonical JSON text of ``dataset``'s simple configuration attributes.

    Deterministic across processes and machines (keys sorted, no addresses or hash
    seeds). ``None`` if the dataset has no such attributes (nothing to compare), or
    is ``None``.
    """
    if dataset is None:
        return None
    custom = getattr(dataset, "cache_fingerprint", None)
    if callable(custom):
        return json.dumps({"cache_fingerprint": _simple_or_repr(custom())}, sort_keys=True)
    excluded = ALWAYS_EXCLUDED | set(getattr(dataset, "fingerprint_exclude", ()) or ())
    config: dict[str, Any] = {}
    for key, value in _attributes(dataset).items():
        if not isinstance(key, str) or key.startswith("_") or key in excluded or callable(value):
            continue
        try:
            config[key] = _simple(value)
        except (_Skip, RecursionError, TypeError, ValueError):
            continue
    if not config:
        return None
    return json.dumps(config, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _simple_or_repr(value: Any) -> Any:
    try:
        return _simple(value)
    except _Skip:
        return repr(value)


def fingerprint_differences(recorded: str | None, current: str | None) -> list[str]:
    """Human-readable differences between two fingerprints (``"size: 224 -> 112"``);
    empty if they are equal. Either may be None (no attributes)."""
    if recorded == current:
        return []

    def parse(text: str | None) -> dict[str, Any]:
        if text is None:
            return {}
        try:
            doc = json.loads(text)
        except ValueError:
            return {"?": text}
        return doc if isinstance(doc, dict) else {"?": doc}

    old, new = parse(recorded), parse(current)
    out = []
    for key in sorted(set(old) | set(new)):
        if key not in new:
            out.append(f"{key}: {json.dumps(old[key])} -> (absent)")
        elif key not in old:
            out.append(f"{key}: (absent) -> {json.dumps(new[key])}")
        elif old[key] != new[key]:
            out.append(f"{key}: {json.dumps(old[key])} -> {json.dumps(new[key])}")
    return out or ["(the recorded configuration differs)"]


# -- identity: class, class source, explicit version (issue 12 item 6) ------------------
def _class_source_hash(cls: type) -> str | None:
    """xxh3 of the source of ``cls`` (None where it has none: builtins, the REPL, ...)."""
    import inspect

    import xxhash

    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        return None
    return xxhash.xxh3_64_hexdigest(source.encode("utf-8", "surrogatepass"))


def dataset_identity_record(dataset: Any, version: Any = None) -> str | None:
    """The canonical JSON text of what identifies ``dataset``'s code: ``class``
    (module.qualname), ``source`` (a hash of the class's source, or null) and
    ``version`` (``version``, else the dataset's ``cache_version`` attribute, else null).
    None for no dataset."""
    if dataset is None:
        return None
    if version is None:
        version = getattr(dataset, "cache_version", None)
    if (version is not None and not isinstance(version, (str, int))) or isinstance(version, bool):
        raise TypeError(f"a cache version (fingerprint= or cache_version) is a str or int, not {version!r}")
    cls = type(dataset)
    doc = {"class": f"{cls.__module__}.{cls.__qualname__}", "source": _class_source_hash(cls),
           "version": version}
    return json.dumps(doc, sort_keys=True, separators=(",", ":"))


def identity_problems(recorded: str | None, current: str | None) -> tuple[str | None, str | None]:
    """``(error, warning)`` comparing a recorded identity with the current one: an error
    when the explicit versions differ; a warning when, without an explicit version, the
    class's source changed. Either is None; both are None when nothing was recorded."""
    if recorded is None or current is None or recorded == current:
        return None, None
    try:
        old, new = json.loads(recorded), json.loads(current)
    except ValueError:
        return None, None
    if not isinstance(old, dict) or not isinstance(new, dict):
        return None, None
    if old.get("version") != new.get("version"):
        return (f"version {json.dumps(old.get('version'))} -> {json.dumps(new.get('version'))}"), None
    if new.get("version") is None and old.get("source") and new.get("source") \
            and old.get("source") != new.get("source"):
        return None, (
            f"the source of {new.get('class')} changed since the cache was built (source hash "
            f"{old.get('source')} -> {new.get('source')})"
        )
    return None, None
