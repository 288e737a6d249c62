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


#: numpy's integer scalar types (not bool): indices as fast as Python ints
NUMPY_INTS = frozenset(t for t in np.sctypeDict.values() if isinstance(t, type) and issubclass(t, np.integer))


def int_list(indices: Any) -> list[int] | None:
    """``indices`` as a list of Python ints when they are ints, numpy integers or an
    integer array (else None: the caller takes its general path)."""
    if isinstance(indices, np.ndarray):
        return indices.reshape(-1).tolist() if indices.dtype.kind in "iu" else None
    indices = list(indices)
    if all(type(i) is int for i in indices):
        return indices
    if all(type(i) is int or type(i) in NUMPY_INTS for i in indices):
        return [int(i) for i in indices]
    return None


def int_array(indices: Any) -> Any:
    """``indices`` as an int64 array when they are ints or numpy integers (else as
    given, for :func:`normalize_indices` to check and report)."""
    if isinstance(indices, np.ndarray):
        return indices
    indices = list(indices) if not isinstance(indices, list) else indices
    if all(type(i) is int or type(i) in NUMPY_INTS for i in indices):
        return np.array(indices, dtype=np.int64)
    return indices


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
    _expand = False

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
            example["labels_"] = labels_at(self.labels, j)
        if self._expand:
            expand_callables(example)
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
        """Whether each example gets ``labels_``: every label at its index (nested dicts
        of labels are indexed leaf by leaf)."""
        return self._append_labels

    @append_labels.setter
    def append_labels(self, value: bool) -> None:
        self._append_labels = value

    @property
    def expand(self) -> bool:
        """edflow's late loading: when True, every callable found in an example (nested
        in dicts and lists too) is replaced by what it returns when called with no
        arguments, on access."""
        return self._expand

    @expand.setter
    def expand(self, value: bool) -> None:
        self._expand = value

    # -- edflow's dataset arithmetic ----------------------------------------------------
    def __add__(self, other: Any) -> ConcatenatedDataset:
        """``a + b``: the examples of ``a``, then those of ``b`` (a :class:`ConcatenatedDataset`)."""
        if not isinstance(other, DatasetMixin):
            return NotImplemented
        return ConcatenatedDataset(self, other)

    def __mul__(self, n: Any) -> Any:
        """``a * n``: ``a`` repeated ``n`` times (a :class:`ConcatenatedDataset`); as in
        edflow, ``n <= 1`` returns ``a`` itself."""
        if isinstance(n, (bool, np.bool_)) or not isinstance(n, (int, np.integer)):
            return NotImplemented
        return ConcatenatedDataset(*[self] * int(n)) if n > 1 else self

    __rmul__ = __mul__


def labels_at(labels: Any, j: int) -> Any:
    """The labels of example ``j``: ``labels`` with every leaf replaced by ``leaf[j]``.

    Dicts are walked (edflow's nested labels); anything else (array, list) is a
    per-example column.
    """
    if isinstance(labels, dict):
        return {k: labels_at(v, j) for k, v in labels.items()}
    return labels[j]


def expand_callables(value: Any) -> Any:
    """Replace, in place, every callable in the dicts and lists of ``value`` by its
    result (edflow's ``expand``); returns the expanded value."""
    if isinstance(value, dict):
        for k, v in value.items():
            value[k] = expand_callables(v)
        return value
    if isinstance(value, list):
        for k, v in enumerate(value):
            value[k] = expand_callables(v)
        return value
    if callable(value):
        return value()
    return value


class ConcatenatedDataset(DatasetMixin):
    """Several datasets one after the other (what ``a + b`` and ``n * a`` return, as in edflow).

    Example ``i`` is the example of the dataset it falls in, with ``index_`` set to
    ``i`` (its position in the concatenation) and ``dataset_index_`` to the number of
    that dataset. ``labels`` are the first dataset's label keys, each concatenated over
    all datasets.

    Parameters
    ----------
    *datasets : DatasetMixin
        The datasets, in order.
    balanced : bool
        Pad every dataset to the length of the longest by cycling through its examples.
    """

    def __init__(self, *datasets: Any, balanced: bool = False) -> None:
        self.balanced = balanced
        if balanced and datasets:
            longest = max(len(d) for d in datasets)
            datasets = tuple(
                d if len(d) == longest else _Cycled(d, longest) for d in datasets
            )
        self.datasets = list(datasets)
        self.lengths = [len(d) for d in self.datasets]
        self.boundaries = np.cumsum(self.lengths, dtype=np.int64)

    def __len__(self) -> int:
        return int(self.boundaries[-1]) if self.lengths else 0

    def get_example(self, i: int) -> dict:
        """Example ``i``: example ``i - offset`` of the dataset it falls in, with ``dataset_index_``."""
        did = int(np.searchsorted(self.boundaries, i, side="right"))
        local = i - (int(self.boundaries[did - 1]) if did > 0 else 0)
        example = self.datasets[did][local]
        example["dataset_index_"] = did
        return example

    @property
    def labels(self) -> dict:
        """The first dataset's label keys, each concatenated over all datasets (an array
        where the columns concatenate to one, else a list)."""
        if not hasattr(self, "_labels"):
            keys = list(self.datasets[0].labels.keys()) if self.datasets else []
            self._labels = {k: _concat([d.labels[k] for d in self.datasets]) for k in keys}
        return self._labels

    @labels.setter
    def labels(self, labels: dict) -> None:
        self._labels = labels


class _Cycled(DatasetMixin):
    """``dataset`` cycled to ``length`` examples (for ``ConcatenatedDataset(balanced=True)``)."""

    def __init__(self, dataset: Any, length: int) -> None:
        self.dataset = dataset
        self.length = length

    def __len__(self) -> int:
        return self.length

    def get_example(self, i: int) -> dict:
        return self.dataset[i % len(self.dataset)]

    @property  # type: ignore[misc]  # derived from the cycled dataset's: not settable
    def labels(self) -> dict:
        n = len(self.dataset)
        idx = np.arange(self.length) % n
        return {k: _take(v, idx) for k, v in self.dataset.labels.items()}


def _take(column: Any, idx: np.ndarray) -> Any:
    if isinstance(column, dict):
        return {k: _take(v, idx) for k, v in column.items()}
    if isinstance(column, np.ndarray):
        return column[idx]
    return [column[int(i)] for i in idx]


def _concat(columns: list) -> Any:
    if all(isinstance(c, dict) for c in columns):
        return {k: _concat([c[k] for c in columns]) for k in columns[0]}
    if all(isinstance(c, np.ndarray) for c in columns):
        try:
            return np.concatenate(columns)
        except ValueError:  # shapes that do not line up: keep the values as a list
            pass
    out: list = []
    for c in columns:
        out.extend(c)
    return out


class CachedExamples(DatasetMixin):
    """What the views of a cache share (:class:`~edcache.CachedDataset` and its subset
    views): examples come back as stored, ``index_`` and labels for dicts only
    (edflow's contract), then the view's ``transform``; and :meth:`loader`."""

    transform: Any = None

    def _finish(self, example: Any, j: int) -> Any:
        if type(example) is dict:
            example = super()._finish(example, j)
        return example if self.transform is None else self.transform(example)

    def loader(self, batch_size: int, *, shuffle: bool = False, seed: int = 0, drop_last: bool = False,
               num_workers: int | None = None, rank: int | None = None, world_size: int | None = None,
               **dataloader_kwargs: Any) -> Any:
        """Batches for a training loop: a :class:`~edcache.loader.CacheLoader` (needs torch).

        Built on ``torch.utils.data.DataLoader``: workers read whole batches (one gather
        per column) and send them as numpy arrays; the order depends only on ``seed``,
        the epoch and ``rank``/``world_size``; ``state_dict()``/``load_state_dict()``
        resume mid-epoch exactly, at any world size. ``dataloader_kwargs`` go to the
        DataLoader (``pin_memory``, ``persistent_workers``, ...). See
        :class:`~edcache.loader.CacheLoader` for the parameters.
        """
        from .loader import make_loader

        return make_loader(self, batch_size, shuffle=shuffle, seed=seed, drop_last=drop_last,
                           num_workers=num_workers, rank=rank, world_size=world_size, **dataloader_kwargs)


def check_cachable(dataset: Any, *, needs_location: bool = True) -> None:
    """Raise a clear error if ``dataset`` lacks what caching needs.

    ``needs_location=False`` (an explicit cache path is given) does not ask for
    ``root`` and ``name``.
    """
    missing = [attr for attr in ("root", "name") if needs_location and not hasattr(dataset, attr)]
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
    if not needs_location:
        pass
    elif not isinstance(dataset.root, (str, bytes)) and not hasattr(dataset.root, "__fspath__"):
        raise DatasetInterfaceError(f"{type(dataset).__name__}.root must be a path, not {dataset.root!r}")
    if needs_location and (not isinstance(dataset.name, str) or not dataset.name or "/" in dataset.name):
        raise DatasetInterfaceError(
            f"{type(dataset).__name__}.name must be a non-empty string without '/', not {dataset.name!r}"
        )
    keys = getattr(dataset, "in_memory_keys", [])
    if not isinstance(keys, (list, tuple)):
        raise DatasetInterfaceError(
            f"{type(dataset).__name__}.in_memory_keys must be a list of str, not {keys!r}"
        )
    if not all(isinstance(k, str) or (type(k) is int and k >= 0) for k in keys):
        raise DatasetInterfaceError(
            f"{type(dataset).__name__}.in_memory_keys must be a list of str (dict keys) or "
            f"non-negative int (positions of tuple examples), not {keys!r}"
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
