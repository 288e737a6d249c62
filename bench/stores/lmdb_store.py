"""LMDB of pickles: one environment, key = zero-padded index, value = pickle protocol 5.

Readers: readonly, lock=False, readahead=False, one long-lived read transaction with
buffers=True (values are zero-copy memoryviews into the map; pickle still copies the
arrays out), which is the fastest way to use LMDB from Python."""

from __future__ import annotations

import os
import pickle

from ..common import raw_example_bytes, shape_n
from .base import Skip, Store


def _key(i: int) -> bytes:
    return b"%010d" % i


class LmdbStore(Store):
    name = "lmdb"
    label = "LMDB of pickles"

    @classmethod
    def check(cls):
        try:
            import lmdb  # noqa: F401
        except Exception as e:  # pragma: no cover
            raise Skip(f"lmdb not importable: {e!r}")

    def write(self, examples, n):
        import lmdb

        raw = n * raw_example_bytes(self.shape, n)
        env = lmdb.open(self.path, map_size=int(raw * 2 + (1 << 30)), subdir=True, readahead=False, meminit=False)
        txn = env.begin(write=True)
        dumps, proto = pickle.dumps, 5
        for i, ex in enumerate(examples):
            txn.put(_key(i), dumps(ex, protocol=proto), append=True)
            if i % 1000 == 999:
                txn.commit()
                txn = env.begin(write=True)
        txn.commit()
        env.sync(True)
        env.close()

    def open(self):
        import lmdb

        self.env = lmdb.open(self.path, subdir=True, readonly=True, lock=False, readahead=False, meminit=False)
        self.txn = self.env.begin(buffers=True)
        self._get = self.txn.get
        self._loads = pickle.loads

    def read(self, i):
        return self._loads(self._get(_key(i)))

    def close(self):
        try:
            self.txn.abort()
            self.env.close()
        except Exception:
            pass
