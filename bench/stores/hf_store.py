"""HuggingFace ``datasets``: Arrow, ``Dataset.from_generator`` + ``save_to_disk``;
read with ``load_from_disk(...).with_format("numpy")``."""

from __future__ import annotations

import os
import shutil

from ..common import SHAPES
from .base import Store

_EXAMPLES = None  # the generator reads this (keeps the data out of the fingerprint)


def _gen():
    yield from _EXAMPLES


class HFStore(Store):
    name = "hf"
    label = "HF datasets (Arrow)"

    @classmethod
    def check(cls):
        from .base import Skip

        try:
            import datasets  # noqa: F401
        except Exception as e:
            raise Skip(f"datasets not importable: {e!r}")

    def features(self):
        import datasets as hd

        feats = {}
        for key, kind, dtype, shp in SHAPES[self.shape]["fields"]:
            if kind == "vararray":
                # a variable number of rows: a list of fixed-length rows (boxes), or a
                # variable-length list of numbers (tokens)
                inner = hd.Value(dtype)
                for d in reversed(shp[1:]):
                    inner = hd.Sequence(inner, length=d)
                feats[key] = hd.Sequence(inner)
            elif kind == "array":
                if len(shp) == 3:
                    feats[key] = hd.Array3D(shape=shp, dtype=dtype)
                elif len(shp) == 2:
                    feats[key] = hd.Array2D(shape=shp, dtype=dtype)
                else:
                    feats[key] = hd.Sequence(hd.Value(dtype), length=shp[0])
            elif kind == "int":
                feats[key] = hd.Value("int64")
            elif kind == "float":
                feats[key] = hd.Value("float64")
            else:
                feats[key] = hd.Value("string")
        return hd.Features(feats)

    @property
    def dpath(self):
        return os.path.join(self.path, "ds")

    def write(self, examples, n):
        global _EXAMPLES
        import datasets as hd

        hd.disable_progress_bars()
        tmp_cache = os.path.join(self.path, "_gen_cache")
        _EXAMPLES = examples
        try:
            ds = hd.Dataset.from_generator(_gen, features=self.features(), cache_dir=tmp_cache)
            ds.save_to_disk(self.dpath)
        finally:
            _EXAMPLES = None
        del ds
        shutil.rmtree(tmp_cache, ignore_errors=True)  # the intermediate copy is not the store

    def open(self):
        import datasets as hd

        self.ds = hd.load_from_disk(self.dpath).with_format("numpy")
        self._get = self.ds.__getitem__

    def read(self, i):
        return self._get(i)

    def batch_methods(self):
        return {"ds[list]": self.ds.__getitem__}

    def data_files(self):
        return self.dpath

    def nbytes(self):
        from ..common import du

        return du(self.dpath)

    def torch_dataset(self):
        # HF datasets are handed to DataLoader as they are (they define __getitems__)
        import datasets as hd

        return hd.load_from_disk(self.dpath).with_format("numpy")
