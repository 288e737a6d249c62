"""Compressed variants of the stores, for the ``images`` shape (issue 13).

* edcache: ``codecs={"image": ...}`` with ``zstd`` (level 3), ``png``, ``jpeg:90``: each
  row compressed on its own, decoded by the reader (``ds[i]``).
* MDS: ``compression="zstd"`` on ``ndarray`` columns (whole shards compressed; a
  reader decompresses a shard to a raw local copy on first access), and its ``png`` and
  ``jpeg`` column encodings (PIL images, decoded with PIL on read).
* litdata: ``compression="zstd"`` (whole chunks), and JPEG q90 as ``bytes`` decoded with
  PIL on read (litdata's own JPEG deserializer needs torchvision, which cannot load next
  to a CPU-only torch here).
* HF ``datasets``: the ``Image`` feature holding PNG (arrays given) or JPEG q90 bytes.

JPEG q90 is Pillow's ``quality=90`` (4:2:0) for the peers, ``simplejpeg`` at q90, 4:2:0
for edcache. Every read returns the decoded pixels as a numpy array (HxWx3 uint8).
"""

from __future__ import annotations

import io
import os
import shutil

import numpy as np
from torch.utils.data import IterableDataset

from .edcache_store import EdcacheStore
from .hf_store import HFStore
from .litdata_store import LitdataStore
from .mds_store import MDSStore, _import_streaming


def _images_only(store) -> None:
    if store.shape != "images":
        from .base import Skip

        raise Skip("the codec variants run on the images shape")


def _jpeg90(a: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _pixels(value) -> np.ndarray:
    """PIL image, bytes of an encoded image or a CHW tensor -> HxWxC array."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        from PIL import Image

        value = Image.open(io.BytesIO(value))
    if hasattr(value, "getbands"):  # PIL: decode now (Image.open is lazy)
        return np.asarray(value.convert("RGB"))
    return np.asarray(value)


# -- edcache --------------------------------------------------------------------------------
class _EdcacheCodec(EdcacheStore):
    codecs: dict | None = None
    lossy = False

    def write(self, examples, n):
        _images_only(self)
        super().write(examples, n)


class EdcacheZstd(_EdcacheCodec):
    name, label, codecs = "edcache-zstd", "edcache zstd:3", {"image": "zstd:3"}


class EdcachePng(_EdcacheCodec):
    name, label, codecs = "edcache-png", "edcache png", {"image": "png"}


class EdcacheJpeg(_EdcacheCodec):
    name, label, codecs, lossy = "edcache-jpeg90", "edcache jpeg:90", {"image": "jpeg:90"}, True


# -- MDS ------------------------------------------------------------------------------------
class _MDSCodec(MDSStore):
    encoding = "ndarray"
    compression = None
    lossy = False

    def write(self, examples, n):
        _images_only(self)
        _import_streaming()
        from PIL import Image
        from streaming import MDSWriter

        cols = {"image": "ndarray:uint8:256,256,3" if self.encoding == "ndarray" else self.encoding,
                "label": "int64"}
        src = os.path.join(self.path, "_src")
        os.makedirs(src, exist_ok=True)
        with MDSWriter(out=os.path.join(self.path, "mds"), columns=cols, compression=self.compression,
                       size_limit=1 << 26, progress_bar=False) as w:
            for i, ex in enumerate(examples):
                img = ex["image"]
                if self.encoding == "jpeg":  # a JPEG file, as MDS users store photos
                    path = os.path.join(src, f"{i}.jpg")
                    with open(path, "wb") as f:
                        f.write(_jpeg90(img))
                    img = Image.open(path)
                elif self.encoding == "png":
                    img = Image.fromarray(img)
                w.write({"image": img, "label": ex["label"]})
        shutil.rmtree(src)

    def _dataset(self, shuffle=False):
        _import_streaming()
        from streaming import StreamingDataset
        from streaming.base.util import clean_stale_shared_memory

        clean_stale_shared_memory()
        return StreamingDataset(local=os.path.join(self.path, "mds"), shuffle=shuffle, batch_size=64, shuffle_seed=1)

    def read(self, i):
        ex = self._get(i)
        return {"image": _pixels(ex["image"]), "label": ex["label"]}

    def torch_dataset(self):
        return _Decoded(self._dataset(shuffle=True))


class _Decoded(IterableDataset):
    """A streaming dataset whose images are decoded to arrays (in the DataLoader worker)."""

    def __init__(self, ds):
        self.ds = ds

    def __iter__(self):
        for ex in self.ds:
            yield {"image": _pixels(ex["image"]), "label": ex["label"]}

    def __len__(self):
        return len(self.ds)


class MDSZstd(_MDSCodec):
    name, label, compression = "mds-zstd", "MDS compression=zstd", "zstd"


class MDSPng(_MDSCodec):
    name, label, encoding = "mds-png", "MDS png column", "png"


class MDSJpeg(_MDSCodec):
    name, label, encoding, lossy = "mds-jpeg90", "MDS jpeg column (q90 files)", "jpeg", True


# -- litdata -----------------------------------------------------------------------------------
_EXAMPLES = None
_JPEG = False


def _fn(i):
    ex = _EXAMPLES[i]
    if _JPEG:
        return {"image": _jpeg90(ex["image"]), "label": ex["label"]}
    return ex


class _LitdataCodec(LitdataStore):
    compression = None
    jpeg = False
    lossy = False

    def write(self, examples, n):
        global _EXAMPLES, _JPEG
        import contextlib

        _images_only(self)

        import litdata as ld

        _EXAMPLES, _JPEG = list(examples), self.jpeg
        try:
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                ld.optimize(fn=_fn, inputs=list(range(n)), output_dir=self.dpath, num_workers=1,
                            chunk_bytes="64MB", mode="overwrite", start_method="fork",
                            compression=self.compression)
        finally:
            _EXAMPLES = None

    def read(self, i):
        ex = self._get(i)
        return {"image": _pixels(ex["image"]), "label": ex["label"]}

    def torch_dataset(self):
        return _Decoded(self._dataset(shuffle=True))


class LitdataZstd(_LitdataCodec):
    name, label, compression = "litdata-zstd", "litdata compression=zstd", "zstd"


class LitdataJpeg(_LitdataCodec):
    name, label, jpeg, lossy = "litdata-jpeg90", "litdata JPEG q90 bytes (PIL decode)", True, True


# -- HF datasets -------------------------------------------------------------------------------
class _HFCodec(HFStore):
    jpeg = False
    lossy = False

    def features(self):
        import datasets as hd

        return hd.Features({"image": hd.Image(), "label": hd.Value("int64")})

    def write(self, examples, n):
        _images_only(self)
        if self.jpeg:
            examples = ({"image": {"bytes": _jpeg90(ex["image"]), "path": None}, "label": ex["label"]}
                        for ex in examples)
        super().write(list(examples), n)

    def read(self, i):
        ex = self._get(i)
        return {"image": _pixels(ex["image"]), "label": ex["label"]}

    def batch_methods(self):
        return {}


class HFPng(_HFCodec):
    name, label = "hf-png", "HF Image feature (PNG)"


class HFJpeg(_HFCodec):
    name, label, jpeg, lossy = "hf-jpeg90", "HF Image feature (JPEG q90 bytes)", True, True
