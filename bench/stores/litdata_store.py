"""Lightning ``litdata``: ``litdata.optimize`` (chunked binary, local), read with
``litdata.StreamingDataset`` (``ds[i]`` with ``batch_decode=False`` for random access;
its own shuffle and default decoding in the DataLoader run). ``optimize`` always runs its workers in child processes; we use
``num_workers=1`` (one writer process)."""

from __future__ import annotations

import os

from .base import Skip, Store

_EXAMPLES = None


def _fn(i):
    return _EXAMPLES[i]


class LitdataStore(Store):
    name = "litdata"
    label = "litdata (optimize)"
    iterable = True

    @classmethod
    def check(cls):
        try:
            import litdata  # noqa: F401
        except Exception as e:
            raise Skip(f"litdata not importable: {e!r}")

    @property
    def dpath(self):
        return os.path.join(self.path, "data")

    def write(self, examples, n):
        global _EXAMPLES
        import contextlib
        import io

        import litdata as ld

        _EXAMPLES = list(examples)  # the worker is forked and reads them by index
        try:
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                ld.optimize(fn=_fn, inputs=list(range(n)), output_dir=self.dpath, num_workers=1,
                            chunk_bytes="64MB", mode="overwrite", start_method="fork")
        finally:
            _EXAMPLES = None

    def _dataset(self, shuffle=False, **kw):
        import litdata as ld

        return ld.StreamingDataset(self.dpath, shuffle=shuffle, **kw)

    def open(self):
        # batch_decode=False: the default ('auto') decodes ~256 neighbours around every
        # random index (~5 ms per ds[i] here); False is litdata's random-access setting
        self.ds = self._dataset(batch_decode=False)
        self._get = self.ds.__getitem__

    def read(self, i):
        return self._get(i)

    def data_files(self):
        return self.dpath

    def nbytes(self):
        from ..common import du

        return du(self.dpath)

    def torch_dataset(self):
        return self._dataset(shuffle=True)
