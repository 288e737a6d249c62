"""A view of some examples of a cached dataset, with labels kept consistent."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from .dataset import NUMPY_INTS, CachedExamples, int_array, int_list, normalize_indices


def _as_indices(selection: Any, length: int) -> np.ndarray:
    """Indices (int64, negatives resolved, range-checked) from indices or a bool mask."""
    sel = np.asarray(selection)
    if sel.dtype == bool:
        if sel.shape != (length,):
            raise IndexError(f"a boolean mask must have one entry per example ({length}), not shape {sel.shape}")
        return np.flatnonzero(sel).astype(np.int64)
    if sel.size == 0:
        return np.zeros(0, dtype=np.int64)
    if sel.dtype.kind not in "iu":
        raise TypeError(f"subset takes integer indices or a boolean mask, not {sel.dtype} values")
    return normalize_indices(sel.reshape(-1), length)


class CachedSubset(CachedExamples):
    """The examples ``indices`` of a :class:`~edcache.CachedDataset`, as a dataset.

    Made by :meth:`CachedDataset.subset`. Example ``k`` of the view is example
    ``indices[k]`` of the cache; as for any edflow dataset, its ``index_`` is ``k``
    (the position in the view), and :attr:`indices` maps back to the cache. ``labels``
    are the cache's label columns taken at ``indices`` (computed once per view, without
    reading any example), so ``view.labels[key][k]`` belongs to ``view[k]``. The view
    holds only the parent (which pickles without open files) and the index array: it
    is picklable, cheap to send to DataLoader workers, and reads through the parent's
    per-process reader.

    Parameters
    ----------
    parent : CachedDataset
        The cached dataset.
    indices : array-like of int
        Indices into ``parent`` (already normalized: non-negative, in range).
    transform : callable, None or "inherit"
        Applied to each example read through the view; ``"inherit"`` (default): the
        parent's ``transform``; None: none.
    """

    def __init__(self, parent: Any, indices: np.ndarray, transform: Any = "inherit") -> None:
        if transform != "inherit" and transform is not None and not callable(transform):
            raise TypeError(f"transform must be callable, None or 'inherit', not {transform!r}")
        self.parent = parent
        self._transform = transform
        self.indices = np.ascontiguousarray(indices, dtype=np.int64)
        self.indices.setflags(write=False)
        self._view_labels: dict | None = None

    def __len__(self) -> int:
        return len(self.indices)

    def get_example(self, k: int) -> dict:
        """Example ``indices[k]`` of the cache, as stored."""
        return self.parent.get_example(self.indices.item(k))

    @property
    def transform(self) -> Any:
        """The transform applied to examples read through this view (or None)."""
        t = self._transform
        return getattr(self.parent, "transform", None) if isinstance(t, str) else t

    def __getitem__(self, k: Any) -> Any:
        # fast path for one int (what a DataLoader asks for): one read, index_ = k
        n = len(self.indices)
        if type(k) is not int and type(k) in NUMPY_INTS:
            k = int(k)
        if type(k) is int and -n <= k < n and not (self._append_labels or self._expand):
            k = k + n if k < 0 else k
            example = self.parent.store.read_indexed(self.indices.item(k))
            if type(example) is dict:
                example["index_"] = k
            transform = self.transform
            return example if transform is None else transform(example)
        return super().__getitem__(k)

    def __getitems__(self, ks: Sequence[int]) -> list[dict]:
        """Batched fetch (what PyTorch's DataLoader calls)."""
        ints = int_list(ks)
        return [self[k] for k in ints] if ints is not None else self[list(ks)]

    def get_batch(self, ks: Sequence[int]) -> dict[str, Any]:
        """A collated batch of view positions ``ks`` (see :meth:`CachedDataset.get_batch`);
        ``index_`` holds the positions in the view."""
        ks_arr = normalize_indices(int_array(ks), len(self))
        batch = self.parent.get_batch(self.indices[ks_arr])
        if isinstance(batch, dict):  # (tuple examples: a tuple of columns, no index_)
            batch["index_"] = ks_arr
        return batch

    def subset(self, selection: Any, transform: Any = "inherit") -> CachedSubset:
        """A view of positions ``selection`` (indices or a boolean mask) of this view
        (with this view's transform unless ``transform`` is given)."""
        return CachedSubset(self.parent, self.indices[_as_indices(selection, len(self))],
                            transform=self._transform if isinstance(transform, str) else transform)

    @property
    def labels(self) -> dict:
        """The parent's label columns at :attr:`indices` (arrays stay arrays, lists lists)."""
        if self._view_labels is None:
            idx = self.indices
            self._view_labels = {
                key: (col[idx] if isinstance(col, np.ndarray) else [col[i] for i in idx.tolist()])
                for key, col in self.parent.labels.items()
            }
        return self._view_labels

    @labels.setter
    def labels(self, value: dict) -> None:
        raise AttributeError("labels of a subset come from its cache and cannot be set")

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_view_labels"] = None  # recomputed lazily where needed
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        state.setdefault("_transform", "inherit")
        self.__dict__.update(state)
        self.indices.setflags(write=False)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.parent!r}, {len(self)} of {len(self.parent)} examples)"


__all__ = ["CachedSubset"]
