"""Label columns: the ``in_memory_keys`` values of every example, one file per key.

A key whose values form a regular numpy array (numbers, bools, strings, arrays of one
shape) is stored as ``labels/<n>.npy`` and memory-mapped on read. Values that cannot
(ragged arrays, ``None`` mixed in, bytes, nested containers, strings ending in NUL,
which numpy's ``U`` dtype would strip) are stored as
``labels/<n>.list``, a one-record shard, and come back as a Python list.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from ...errors import CorruptCacheError, LabelError
from .shard import ShardFile, checksum

_CATEGORY_NAMES = {
    "bool": "bool",
    "number": "number",
    "str": "str",
    "array": "numpy array",
}


def _category(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, (bool, np.bool_)):
        return "bool"
    if isinstance(value, (int, float, complex, np.number)):
        return "number"
    if isinstance(value, (str, np.str_)):
        return "str"
    if isinstance(value, np.ndarray):
        return "array"
    return "other"


#: What a label error says about recovering.
LABEL_ADVICE = (
    "A label column holds one kind of value (numbers, bools, str or numpy arrays; None or "
    "other values among them make it a list). Fix the dataset, then rebuild with "
    "force_cache=True, keep_existing=False (CLI: --force --no-keep-existing): chunks already "
    "cached keep the values they were computed with."
)


def _kinds(values: list) -> dict[str, int]:
    """{kind: position of its first value}."""
    first_at: dict[str, int] = {}
    for i, v in enumerate(values):
        first_at.setdefault(_category(v), i)
    return first_at


def check_label_kinds(key: str, values: list, start: int = 0) -> set[str]:
    """Raise :class:`LabelError` if ``values`` (of examples ``start, start + 1, ...``)
    mix kinds that cannot share a column (say str and int). Values that make the
    column a list (``None``, containers) are never an error."""
    first_at = _kinds(values)
    cats = set(first_at)
    if len(cats) > 1 and not cats & {"none", "other"}:
        (a, ia), (b, ib) = sorted(first_at.items(), key=lambda kv: kv[1])[:2]
        raise LabelError(
            f"in_memory_key {key!r} has values of inconsistent types: "
            f"{_CATEGORY_NAMES[a]} (index {start + ia}: {values[ia]!r}) and "
            f"{_CATEGORY_NAMES[b]} (index {start + ib}: {values[ib]!r}). {LABEL_ADVICE}"
        )
    return cats


def to_column(key: str, values: list) -> np.ndarray | list:
    """Turn the values of one key into a numpy array if they form one, else a list.

    Raises
    ------
    LabelError
        If values mix scalar types that cannot share a column (say str and int).
    """
    if not values:
        return np.empty(0)
    cats = check_label_kinds(key, values)
    if cats & {"none", "other"}:
        return list(values)
    (cat,) = cats
    if cat == "array":
        shape = values[0].shape
        if any(v.shape != shape for v in values):
            return list(values)
        column = np.stack(values)
    elif cat == "str":
        if any(v.endswith("\x00") for v in values):
            # numpy's U dtype pads with NULs and strips trailing ones on read: keep the
            # values exactly, as a list
            return list(values)
        column = np.array(values, dtype=str)
    else:
        column = np.asarray(values)
    if column.dtype.kind == "O":
        return list(values)
    return column


def load_label(cache_dir: str, key: str, info: dict, length: int, verify: bool) -> np.ndarray | list:
    """Read one label column described by its manifest entry ``info``."""
    rel = info.get("file")
    if not isinstance(rel, str) or not rel.startswith("labels/") or ".." in rel:
        raise CorruptCacheError(f"manifest entry of label {key!r} names a bad file {rel!r}")
    path = os.path.join(cache_dir, rel)
    try:
        size = os.path.getsize(path)
    except FileNotFoundError as exc:
        raise CorruptCacheError(f"label file {path} (key {key!r}) is missing") from exc
    if size != info.get("nbytes"):
        raise CorruptCacheError(
            f"label file {path} (key {key!r}) has {size} bytes, the manifest says {info.get('nbytes')}"
        )
    if verify:
        with open(path, "rb") as f:
            if checksum(f.read()) != info.get("xxh3"):
                raise CorruptCacheError(f"label file {path} (key {key!r}) fails its checksum")
    if info.get("kind") == "list":
        values = ShardFile(path, size, 0, 1).read(0)
        if not isinstance(values, dict) or not isinstance(values.get("v"), list):
            raise CorruptCacheError(f"label file {path} (key {key!r}) is malformed")
        column: Any = values["v"]
    else:
        try:
            empty = 0 in (info.get("shape") or [0])
            column = np.load(path, mmap_mode=None if empty else "r", allow_pickle=False)
        except Exception as exc:
            raise CorruptCacheError(f"label file {path} (key {key!r}) is unreadable ({exc})") from exc
        if column.dtype.str != info.get("dtype") or list(column.shape) != info.get("shape"):
            raise CorruptCacheError(f"label file {path} (key {key!r}) does not match the manifest")
    if len(column) != length:
        raise CorruptCacheError(f"label {key!r} has {len(column)} values for {length} examples")
    return column
