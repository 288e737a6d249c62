"""MosaicML ``streaming`` (MDS shards, local directory, no compression).

``streaming`` 0.13 imports ``torchvision`` (for its vision datasets, which we do not
use) and ``transformers``. PyPI only has CUDA builds of torchvision, which cannot load
next to a CPU-only torch; when torchvision cannot be imported we register a stub that
only satisfies those imports (any use of it raises). This is recorded in the results."""

from __future__ import annotations

import os
import sys
import types

from ..common import SHAPES, is_ragged
from .base import Skip, Store

NOTE = None


def _import_streaming():
    global NOTE
    if "streaming" in sys.modules:
        return sys.modules["streaming"]
    try:
        import torchvision  # noqa: F401
    except Exception as e:
        for k in [k for k in sys.modules if k == "torchvision" or k.startswith("torchvision.")]:
            del sys.modules[k]
        # transformers checks find_spec("torchvision"); import the pieces streaming
        # needs before the stub exists so they see torchvision as absent
        try:
            import transformers.feature_extraction_utils  # noqa: F401
            import transformers.tokenization_utils_base  # noqa: F401
        except Exception as e2:
            raise Skip(f"streaming needs transformers, which does not import: {e2!r}")

        def unavailable(*a, **k):
            raise RuntimeError("torchvision stub (bench): not available")

        class VisionDataset:
            def __init__(self, *a, **k):
                unavailable()

        mods = {}
        for name in ("torchvision", "torchvision.datasets", "torchvision.transforms", "torchvision.transforms.functional"):
            m = types.ModuleType(name)
            m.__path__ = []
            mods[name] = m
            sys.modules[name] = m
        mods["torchvision"].datasets = mods["torchvision.datasets"]
        mods["torchvision"].transforms = mods["torchvision.transforms"]
        mods["torchvision.transforms"].functional = mods["torchvision.transforms.functional"]
        mods["torchvision.datasets"].VisionDataset = VisionDataset
        mods["torchvision.datasets"].CIFAR10 = VisionDataset
        mods["torchvision.transforms.functional"].to_tensor = unavailable
        NOTE = f"torchvision stubbed (real one fails: {type(e).__name__}: {str(e)[:80]})"
    try:
        import streaming
    except Exception as e:
        raise Skip(f"streaming does not import: {e!r}")
    return streaming


class MDSStore(Store):
    name = "mds"
    label = "MosaicML streaming (MDS)"
    iterable = True

    @classmethod
    def check(cls):
        _import_streaming()

    def columns(self):
        cols = {}
        for key, kind, dtype, shp in SHAPES[self.shape]["fields"]:
            if kind == "vararray":
                # MDS's ndarray encoding without a shape stores each sample's shape
                cols[key] = f"ndarray:{dtype}"
            elif kind == "array":
                cols[key] = f"ndarray:{dtype}:" + ",".join(str(s) for s in shp)
            elif kind == "int":
                cols[key] = "int64"
            elif kind == "float":
                cols[key] = "float64"
            else:
                cols[key] = "str"
        return cols

    def write(self, examples, n):
        _import_streaming()
        from streaming import MDSWriter

        with MDSWriter(out=self.path, columns=self.columns(), compression=None, size_limit=1 << 26, progress_bar=False) as w:
            for i, ex in enumerate(examples):
                try:
                    w.write(ex)
                except ValueError as e:
                    if not is_ragged(self.shape):
                        raise
                    # the ndarray encoding stores variable shapes, but no array with 0
                    # elements (mosaicml/streaming#695); a user would have to invent an
                    # encoding of their own for the examples with no boxes / no tokens
                    raise Skip(f"MDS ndarray columns refuse empty arrays (example {i}: {e})") from None

    def _dataset(self, shuffle=False):
        _import_streaming()
        from streaming import StreamingDataset
        from streaming.base.util import clean_stale_shared_memory

        clean_stale_shared_memory()
        return StreamingDataset(local=self.path, shuffle=shuffle, batch_size=64, shuffle_seed=1)

    def open(self):
        self.ds = self._dataset()
        self._get = self.ds.get_item

    def read(self, i):
        return self._get(i)

    def torch_dataset(self):
        return self._dataset(shuffle=True)

    def close(self):
        pass
