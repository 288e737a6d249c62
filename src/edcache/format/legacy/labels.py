"""Turning edflow's ``labels.p`` (a dict of lists) into label columns."""

from __future__ import annotations

from typing import Any

import numpy as np

from ...errors import CorruptCacheError

__all__ = ["labels_to_columns"]


def _kind(value: Any) -> str:
    if isinstance(value, (bool, np.bool_)):
        return "bool"
    if isinstance(value, (int, np.integer)):
        return "int"
    if isinstance(value, (float, np.floating)):
        return "float"
    if isinstance(value, (str, np.str_)):
        return "str"
    if isinstance(value, np.ndarray) and value.dtype.kind in "biufcUSmM":
        return f"array{value.shape}{value.dtype.str}"
    return "other"


def _column(values: Any) -> np.ndarray | list | Any:
    if not isinstance(values, (list, tuple)):
        return values  # edflow only ever wrote lists; leave anything else untouched
    kinds = {_kind(v) for v in values}
    if not values or "other" in kinds:
        return list(values)
    if kinds == {"int", "float"}:
        kinds = {"float"}
    if len(kinds) != 1:
        return list(values)
    (kind,) = kinds
    try:
        column = np.stack(values) if kind.startswith("array") else np.asarray(values)
    except (ValueError, OverflowError):  # e.g. Python ints beyond int64
        return list(values)
    return list(values) if column.dtype.kind == "O" else column


def labels_to_columns(raw: Any, member: str) -> dict[str, np.ndarray | list]:
    """Return edflow labels with each regular list of values as a numpy array.

    A key's list becomes an array when all its values are of one kind: bools, integers,
    real numbers (ints and floats mixed give floats), strings, or numeric arrays of one
    shape and dtype (stacked). Anything else (``None`` mixed in, ragged arrays, nested
    containers, mixed kinds) stays the list edflow stored. An empty list stays ``[]``.

    Parameters
    ----------
    raw : object
        The unpickled ``labels.p``.
    member : str
        Where it was read from, for the error message.

    Raises
    ------
    CorruptCacheError
        ``raw`` is not a dict.
    """
    if not isinstance(raw, dict):
        raise CorruptCacheError(f"{member} holds a {type(raw).__name__}, edflow writes a dict of lists")
    return {key: _column(values) for key, values in raw.items()}
