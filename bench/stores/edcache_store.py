"""edcache: ``CachedDataset(DS(), num_workers=0)`` builds, ``CachedDataset.from_cache``
opens, ``ds[i]`` reads (adds ``index_``). Also reported: the reader underneath
(``ds.fork_safe_zip.read(i)``), ``ds.get_batch`` and ``ds.__getitems__`` when present."""

from __future__ import annotations

import os

from ..common import SHAPES
from .base import Skip, Store

NAME = "bench"
_EXAMPLES = None


def _dataset_class():
    from edcache import DatasetMixin

    class BenchDS(DatasetMixin):
        def __init__(self, root, n, keys):
            self.root, self.name, self._n, self.in_memory_keys = root, NAME, n, list(keys)

        def __len__(self):
            return self._n

        def get_example(self, i):
            return _EXAMPLES[i]

    return BenchDS


class PlainDS:
    """A plain map-style dataset (no edflow base, no root/name): what a PyTorch user has."""

    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return _EXAMPLES[i]


class EdcacheStore(Store):
    name = "edcache"
    label = "edcache"
    tuples = True
    #: ``codecs=`` of the build (the codec variants in codec_stores set it)
    codecs = None

    @classmethod
    def check(cls):
        try:
            import edcache

            edcache.CachedDataset, edcache.DatasetMixin  # noqa: B018
        except Exception as e:
            raise Skip(f"edcache not importable yet: {type(e).__name__}: {e}")

    @property
    def cpath(self):
        return os.path.join(self.path, "cached", NAME)

    def write(self, examples, n):
        global _EXAMPLES
        from edcache import CachedDataset

        _EXAMPLES = examples if isinstance(examples, list) else list(examples)
        keys = SHAPES[self.shape]["in_memory_keys"]
        try:
            codecs = {"codecs": self.codecs} if self.codecs else {}
            if SHAPES[self.shape].get("container") == "tuple":  # edcache.cache, the PyTorch form
                import edcache

                plain = PlainDS(n)
                plain.in_memory_keys = keys
                edcache.cache(plain, self.cpath, num_workers=0, **codecs)
            else:
                CachedDataset(_dataset_class()(self.path, n, keys), num_workers=0, **codecs)
        finally:
            _EXAMPLES = None

    def open(self):
        from edcache import CachedDataset

        self.ds = CachedDataset.from_cache(self.path, NAME)
        self._get = self.ds.__getitem__

    def read(self, i):
        return self._get(i)

    def read_variants(self):
        reader = getattr(self.ds, "fork_safe_zip", None)
        if reader is not None and hasattr(reader, "read"):
            return {"reader.read": reader.read}
        return {}

    def batch_methods(self):
        out = {}
        for m in ("get_batch", "__getitems__"):
            if hasattr(self.ds, m):
                out[m] = getattr(self.ds, m)
        return out

    def data_files(self):
        return self.cpath

    def nbytes(self):
        from ..common import du

        return du(self.cpath)

    def torch_dataset(self):
        # the CachedDataset itself, as a user would pass it (it re-opens per worker)
        from edcache import CachedDataset

        return CachedDataset.from_cache(self.path, NAME)
