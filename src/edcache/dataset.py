"""``DatasetMixin``: edflow's dataset base class, without the chainer dependency."""

from __future__ import annotations

from typing import Any

import numpy as np

from .errors import DatasetInterfaceError


def normalize_index(i: Any, length: int) -> int:
    """Turn ``i`` into a non-negative int index into a dataset of ``length`` examples.

    Raises ``TypeError`` for non-integers (floats, bools) and ``IndexError`` when out of range.
    """
    if isinstance(i, (bool, np.bool_)) or not isinstance(i, (int, np.integer)):
        raise TypeError(
            f"dataset indices must be integers, slices, lists or integer arrays, not "
            f"{type(i).__name__} ({i!r})"
        )
    j = int(i)
    if j < 0:
        j += length
    if not 0 <= j < length:
        raise IndexError(f"index {int(i)} is out of range for a dataset of length {length}")
    return j


def normalize_indices(indices: Any, length: int) -> np.ndarray:
    """:func:`normalize_index` for a sequence of indices, vectorized: an int64 array.

    Raises ``TypeError`` for non-integers and ``IndexError`` naming the first index out
    of range.
    """
    if isinstance(indices, np.ndarray) and indices.dtype.kind in "iu":
        idx = indices.astype(np.int64, copy=True).reshape(-1)
    else:
        idx = np.fromiter((normalize_index(i, length) for i in indices), dtype=np.int64)
        return idx
    idx[idx < 0] += length
    bad = (idx < 0) | (idx >= length)
    if bad.any():
        first = int(np.argmax(bad))
        raise IndexError(
            f"index {int(indices.reshape(-1)[first])} is out of range for a dataset of length {length}"
        )
    return idx


class DatasetMixin:
    """Base class of map-style datasets, as in edflow.

    Subclasses define ``get_example(i)`` (returning a dict) and ``__len__``.
    ``dataset[i]`` accepts an int (negative counts from the end), a slice, a list or a
    numpy array of ints; each example gets the key ``index_`` set to its index. A
    dataset with a ``data`` attribute forwards ``__len__``, ``get_example`` and
    ``labels`` to it. ``labels`` is a dict of per-example columns (may be empty).
    """

    _append_labels = False

    def get_example(self, i: int) -> dict:
        """Return example ``i`` as a dict (override this)."""
        if hasattr(self, "data"):
            return self.data.get_example(i)
        raise NotImplementedError(f"{type(self).__name__} must define get_example(i)")

    def __len__(self) -> int:
        if hasattr(self, "data"):
            return len(self.data)
        raise NotImplementedError(f"{type(self).__name__} must define __len__")

    def __getitem__(self, i: Any) -> Any:
        length = len(self)
        if type(i) is int and -length <= i < length:  # the common case, checked cheaply
            return self._indexed(i + length if i < 0 else i)
        if isinstance(i, slice):
            return [self._indexed(j) for j in range(*i.indices(length))]
        if isinstance(i, (list, tuple, np.ndarray)):
            if isinstance(i, np.ndarray) and i.dtype == bool:
                raise TypeError("boolean masks are not indices; use np.flatnonzero(mask)")
            return self._get_many([normalize_index(j, length) for j in i])
        return self._indexed(normalize_index(i, length))

    def _get_many(self, indices: list[int]) -> list[dict]:
        return [self._indexed(j) for j in indices]

    def _indexed(self, j: int) -> dict:
        example = self.get_example(j)
        return self._finish(example, j)

    def _finish(self, example: Any, j: int) -> dict:
        if not isinstance(example, dict):
            raise ValueError(
                "The edflow version of DatasetMixin requires the `get_example` method to "
                f"return a `dict`. Yours returned a {type(example)}"
            )
        example["index_"] = j
        if self._append_labels:
            example["labels_"] = {k: v[j] for k, v in self.labels.items()}
        return example

    @property
    def labels(self) -> dict:
        if hasattr(self, "data"):
            return self.data.labels
        return getattr(self, "_labels", {})

    @labels.setter
    def labels(self, labels: dict) -> None:
        if hasattr(self, "data"):
            self.data.labels = labels
        else:
            self._labels = labels

    @property
    def append_labels(self) -> bool:
        return self._append_labels

    @append_labels.setter
    def append_labels(self, value: bool) -> None:
        self._append_labels = value


def check_cachable(dataset: Any) -> None:
    """Raise a clear error if ``dataset`` lacks what caching needs."""
    missing = [attr for attr in ("root", "name") if not hasattr(dataset, attr)]
    if not hasattr(type(dataset), "__len__"):
        missing.append("__len__")
    if not (hasattr(type(dataset), "__getitem__") or hasattr(dataset, "get_example")):
        missing.append("__getitem__")
    if missing:
        raise DatasetInterfaceError(
            f"{type(dataset).__name__} cannot be cached: it has no {', '.join(missing)}. "
            "A dataset to cache needs root (folder to cache into), name (unique name), "
            "__len__ and __getitem__ (or get_example); in_memory_keys is optional."
        )
    if not isinstance(dataset.root, (str, bytes)) and not hasattr(dataset.root, "__fspath__"):
        raise DatasetInterfaceError(f"{type(dataset).__name__}.root must be a path, not {dataset.root!r}")
    if not isinstance(dataset.name, str) or not dataset.name or "/" in dataset.name:
        raise DatasetInterfaceError(
            f"{type(dataset).__name__}.name must be a non-empty string without '/', not {dataset.name!r}"
        )
    keys = getattr(dataset, "in_memory_keys", [])
    if not isinstance(keys, (list, tuple)) or not all(isinstance(k, str) for k in keys):
        raise DatasetInterfaceError(
            f"{type(dataset).__name__}.in_memory_keys must be a list of str, not {keys!r}"
        )


def checked_length(dataset: Any) -> int:
    """``len(dataset)``, which must be a non-negative int."""
    try:
        length = dataset.__len__()
    except (TypeError, ValueError, NotImplementedError) as exc:
        raise DatasetInterfaceError(f"len() of {type(dataset).__name__} failed: {exc}") from exc
    if isinstance(length, bool) or not isinstance(length, int) or length < 0:
        raise DatasetInterfaceError(
            f"{type(dataset).__name__}.__len__ returned {length!r}; it must be a non-negative int"
        )
    return length
