"""The interface every benchmarked store implements."""

from __future__ import annotations

import os
import shutil
from typing import Any, Callable, Iterator

from ..common import du


class Skip(Exception):
    """Raised when a store cannot run here; the message is recorded as the reason."""


class Store:
    #: registry key and display name
    name = "?"
    label = "?"
    #: True when the torch dataset is an IterableDataset (shuffle is the store's own)
    iterable = False
    #: True when the store takes tuple examples (tensors, ints, floats, strs) as they are
    tuples = False

    def __init__(self, path: str, shape: str, quick: bool = False) -> None:
        self.path = path  # a directory owned by this store
        self.shape = shape
        self.quick = quick

    # -- life cycle -------------------------------------------------------------
    @classmethod
    def check(cls) -> None:
        """Raise Skip(reason) if the store's library is missing or broken."""

    def clear(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
        os.makedirs(self.path, exist_ok=True)

    def write(self, examples: Iterator[dict], n: int) -> None:
        raise NotImplementedError

    def open(self) -> None:
        """Open for reading (what a training process does once)."""
        raise NotImplementedError

    def read(self, i: int) -> Any:
        raise NotImplementedError

    def read_batch(self, indices: list[int]) -> Any:
        return [self.read(i) for i in indices]

    def batch_methods(self) -> dict[str, Callable[[list[int]], Any]]:
        """Native batched reads besides the per-example loop (name -> fn)."""
        return {}

    def read_variants(self) -> dict[str, Callable[[int], Any]]:
        """Extra per-example read paths worth reporting (name -> fn)."""
        return {}

    def nbytes(self) -> int:
        return du(self.path)

    def data_files(self) -> str:
        """What to read to warm the page cache."""
        return self.path

    def torch_dataset(self) -> Any:
        """What a user hands to torch's DataLoader (opened lazily in workers)."""
        return LazyMapDataset(type(self), self.path, self.shape, self.quick)

    def close(self) -> None:
        pass


class LazyMapDataset:
    """A map-style torch dataset that opens its store on first use in each process."""

    def __init__(self, cls: type, path: str, shape: str, quick: bool) -> None:
        self.cls, self.path, self.shape, self.quick = cls, path, shape, quick
        self._store = None
        self._pid = None
        self._n = None

    def _get(self) -> Store:
        if self._store is None or self._pid != os.getpid():
            self._store = self.cls(self.path, self.shape, self.quick)
            self._store.open()
            self._pid = os.getpid()
        return self._store

    def __len__(self) -> int:
        from ..common import shape_n

        return shape_n(self.shape, self.quick)

    def __getitem__(self, i: int) -> Any:
        # the fields edcache's (and any edflow DatasetMixin's) examples carry: index_ too,
        # so every map-style loader ships the same tensors per batch
        i = int(i)
        return {**self._get().read(i), "index_": i}

    def __getstate__(self) -> dict:
        d = dict(self.__dict__)
        d["_store"] = None
        d["_pid"] = None
        return d
